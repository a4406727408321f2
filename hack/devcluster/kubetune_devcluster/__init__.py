"""A real Kubernetes control plane on loopback plus a local node that runs pods as
processes: for tests and the local demo, never for real workloads (see
docs/local-node.md)."""

from kubetune_devcluster.binaries import K8S_VERSION, find_binaries, missing_binaries
from kubetune_devcluster.controlplane import DevCluster, NodeConfig, stop_cluster
from kubetune_devcluster.processes import wait_for

__all__ = [
    "K8S_VERSION",
    "DevCluster",
    "NodeConfig",
    "find_binaries",
    "missing_binaries",
    "stop_cluster",
    "wait_for",
]
