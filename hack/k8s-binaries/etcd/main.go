// Command etcd is the upstream etcd server, built from its published module so the
// control plane needs nothing but the Go toolchain.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
