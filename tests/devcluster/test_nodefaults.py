"""The node-fault helpers (kubetune_devcluster.nodefaults) on their own: the standby node
against the real node lifecycle controller, and the freezing of a process tree. The faults
themselves run on the real node in tests/e2e/test_faults_real_node.py."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from kubetune_devcluster.controlplane import DevCluster
from kubetune_devcluster.nodefaults import LEASES, process_tree, signal_all, standby_node
from kubetune_devcluster.processes import wait_for
from kubetune_devcluster.rest import ApiError


def state_of(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_process_tree_stops_and_continues_a_process_and_its_children() -> None:
    shell = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    try:
        tree = wait_for(
            lambda: len(found := process_tree([shell.pid])) == 3 and found,
            timeout=10,
            what="the shell and its two children",
        )
        assert tree[0] == shell.pid
        signal_all(tree, signal.SIGSTOP)
        wait_for(lambda: {state_of(p) for p in tree} == {"T"}, timeout=10, what="all stopped")
        signal_all(tree, signal.SIGCONT)
        wait_for(lambda: "T" not in {state_of(p) for p in tree}, timeout=10, what="all running")
    finally:
        signal_all(process_tree([shell.pid]), signal.SIGKILL)
        shell.wait()


@pytest.mark.cluster
def test_standby_node_is_kept_ready_runs_nothing_and_goes_away(k8s_cluster: DevCluster) -> None:
    api = k8s_cluster.rest()
    with standby_node(k8s_cluster, name="standby-test") as node:
        assert node["spec"]["unschedulable"] is True

        def ready_and_untainted() -> bool:
            current = api.get("/api/v1/nodes/standby-test")
            conds = {c["type"]: c["status"] for c in current["status"].get("conditions") or []}
            keys = {t["key"] for t in current["spec"].get("taints") or []}
            # The lifecycle controller taints a node not-ready until it reports Ready.
            return conds.get("Ready") == "True" and "node.kubernetes.io/not-ready" not in keys

        wait_for(ready_and_untainted, timeout=60, interval=0.5, what="standby node Ready")
        lease = api.get(f"{LEASES}/standby-test")
        assert lease["spec"]["holderIdentity"] == "standby-test"
    with pytest.raises(ApiError) as gone:
        api.get("/api/v1/nodes/standby-test")
    assert gone.value.status == 404
