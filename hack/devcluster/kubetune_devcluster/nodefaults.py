"""Node faults on the dev cluster's real node, for the reliability tests.

    with node_down(cluster, namespace, pod):     # the node hangs: NotReady, then unreachable
        ...                                       # the node is back when the block ends

A hung node is simulated by stopping (SIGSTOP) its kubelet and the processes of the pods
that should die with it; containerd, kube-proxy and every other pod keep running, as on a
node whose agent froze. SIGCONT brings it back exactly where it stopped: no process is
restarted, so the cluster's recorded pids stay true.

Kubernetes evicts nothing from the last node standing: when every node of a zone is not
ready the node lifecycle controller assumes the control plane lost the network and stops
evicting. `standby_node` registers a second, cordoned node that only answers heartbeats,
so a one-node dev cluster behaves like a cluster that lost one node of several.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune_devcluster.controlplane import DevCluster
from kubetune_devcluster.processes import ProcessRecord, is_alive
from kubetune_devcluster.rest import MERGE, ApiError, KubeRest

STANDBY_NODE = "kubetune-standby"
STANDBY_TAINT = {"key": "kubetune.io/standby", "value": "heartbeat-only", "effect": "NoSchedule"}
HEARTBEAT_SECONDS = 5.0
LEASES = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"


# ---- the kubelet ----------------------------------------------------------------------


def kubelet_record(cluster: DevCluster) -> ProcessRecord:
    """The cluster's running kubelet (a real node's), as its state records it."""
    for record in cluster.processes:
        if record.name == "kubelet" and is_alive(record):
            return record
    raise RuntimeError(f"{cluster.state_dir}: no running kubelet (is the node a real one?)")


def stop_kubelet(cluster: DevCluster) -> None:
    """Freeze the kubelet: it stops reporting, so the node goes NotReady, then unreachable."""
    os.kill(kubelet_record(cluster).pid, signal.SIGSTOP)


def start_kubelet(cluster: DevCluster) -> None:
    """Let the frozen kubelet carry on: it reports Ready again and syncs its pods."""
    os.kill(kubelet_record(cluster).pid, signal.SIGCONT)


# ---- a pod's processes ------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in task.read_text().split()]
    return found


def process_tree(pids: list[int]) -> list[int]:
    """`pids` and every process below them."""
    seen: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo += _children(pid)
    return seen


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@contextlib.contextmanager
def pod_paused(cluster: DevCluster, namespace: str, pod: str) -> Iterator[list[int]]:
    """Every process of the pod `namespace/pod` stops (SIGSTOP) for as long as the block
    runs and carries on where it stopped afterwards, whatever the block raised; yields the
    frozen pids. Works on either node: the pids come from the node, not the API server."""
    pids = process_tree(cluster.pod_pids(namespace, pod))
    if not pids:
        raise RuntimeError(f"{namespace}/{pod}: no running container to stop")
    signal_all(pids, signal.SIGSTOP)
    try:
        yield pids
    finally:
        signal_all(pids, signal.SIGCONT)


@contextlib.contextmanager
def node_down(cluster: DevCluster, namespace: str, pod: str) -> Iterator[list[int]]:
    """The node hangs with the pod `namespace/pod` on it for as long as the block runs;
    yields the pod's frozen pids. The kubelet and the pod carry on afterwards, whatever
    the block raised (other tests use the node next)."""
    with pod_paused(cluster, namespace, pod) as pids:
        stop_kubelet(cluster)
        try:
            yield pids
        finally:
            start_kubelet(cluster)


# ---- a standby node -----------------------------------------------------------------------


def _now(micro: bool = False) -> str:
    stamp = datetime.now(UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def _beat(api: KubeRest, name: str, uid: str) -> None:
    """One heartbeat: the node's Lease renewed and its Ready condition reported."""
    spec = {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": _now(micro=True)}
    try:
        api.patch(f"{LEASES}/{name}", {"spec": spec}, MERGE)
    except ApiError as exc:
        if exc.status != 404:
            raise
        owner = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}
        meta = {"name": name, "namespace": "kube-node-lease", "ownerReferences": [owner]}
        api.post(LEASES, {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                          "metadata": meta, "spec": spec})  # fmt: skip
    now = _now()
    ready = {
        "type": "Ready",
        "status": "True",
        "reason": "KubeletReady",
        "message": "standby node: heartbeats only, runs no pods",
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    }
    api.patch(f"/api/v1/nodes/{name}/status", {"status": {"conditions": [ready]}})


@contextlib.contextmanager
def standby_node(cluster: DevCluster, name: str = STANDBY_NODE) -> Iterator[dict[str, Any]]:
    """A second node, Ready for as long as the block runs, on which nothing is scheduled
    (cordoned and tainted). Removed afterwards."""
    api = cluster.rest()
    with contextlib.suppress(ApiError):  # left over by a run that was killed
        api.delete(f"/api/v1/nodes/{name}")
    node = api.post(
        "/api/v1/nodes",
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {"unschedulable": True, "taints": [STANDBY_TAINT]},
        },
    )
    stopping = threading.Event()

    def heartbeats() -> None:
        while True:
            with contextlib.suppress(Exception):  # the next beat tries again
                _beat(api, name, node["metadata"]["uid"])
            if stopping.wait(HEARTBEAT_SECONDS):
                return

    thread = threading.Thread(target=heartbeats, name=f"{name}-heartbeat", daemon=True)
    thread.start()
    try:
        yield node
    finally:
        stopping.set()
        thread.join()
        with contextlib.suppress(ApiError):
            api.delete(f"/api/v1/nodes/{name}")
        with contextlib.suppress(ApiError):
            api.delete(f"{LEASES}/{name}")
