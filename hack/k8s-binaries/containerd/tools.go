//go:build tools

// Pins the containerd commands the real dev node runs (containerd, its runc shim and
// ctr) so `go mod tidy` keeps their dependencies; they are built by package path.
package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
