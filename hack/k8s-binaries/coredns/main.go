// Command coredns is CoreDNS with only the plugins the dev cluster's DNS uses: it
// answers for the cluster domain from the Kubernetes API and forwards nothing (the
// dev cluster must not send traffic off the machine, so no forward plugin is linked).
package main

import (
	_ "github.com/coredns/coredns/core/dnsserver" // the server and its directive order
	"github.com/coredns/coredns/coremain"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	coremain.Run()
}
