"""Two operator replicas with leader election on the process-node cluster: the leader
SIGKILLed mid-run, then the new leader SIGSTOPped (it keeps the Lease until it expires). Each
time the other replica takes over, no FineTuneJob is lost or gets a second Job, and the
running job's progress resumes (pushes to the follower reach the leader). The run is not
waited for to the end: tests/e2e/test_operator_cluster.py shows a restarted operator finishing
one. Prints the failover
times (kill to the first Job created by the new leader) that docs/reliability.md records.

    KUBETUNE_REQUIRE_CLUSTER=1 .venv/bin/pytest -q -s tests/e2e/test_operator_failover.py
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from kubetune_devcluster.controlplane import DevCluster
from kubetune_devcluster.processes import wait_for
from kubetune_operator.leader import LOST_LEASE_EXIT
from tests.fixtures.ftj import StepWatch, create, ftj_manifest, jobs_of, status_of
from tests.fixtures.operator import LOCAL_TRAINER, OperatorProcess, install_crd
from tests.fixtures.s3 import S3Server

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

LEASE = "kubetune-operator"
# Short lease timing, so a failover takes seconds (the chart's is 15 / 10 / 2).
LEASE_DURATION_S, RENEW_DEADLINE_S, RETRY_PERIOD_S = 4, 3, 1


def replica(cluster: DevCluster, log_dir: Path, name: str, lease_ns: str) -> OperatorProcess:
    return OperatorProcess(
        cluster,
        log_dir / name,
        trainer_command=LOCAL_TRAINER,
        extra_args=[
            "--leader-election", "true",
            "--lease-namespace", lease_ns,
            "--lease-duration-s", str(LEASE_DURATION_S),
            "--renew-deadline-s", str(RENEW_DEADLINE_S),
            "--retry-period-s", str(RETRY_PERIOD_S),
        ],
    )  # fmt: skip


def holder_url(cluster: DevCluster, ns: str) -> str | None:
    lease = cluster.rest().get(f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{LEASE}")
    holder = (lease.get("spec") or {}).get("holderIdentity") or ""
    return holder.split("@", 1)[1] if "@" in holder else None


def job_created_after(cluster: DevCluster, ns: str, name: str, since: float) -> float:
    """Seconds from `since` until the FineTuneJob `name` has its Job."""
    wait_for(
        lambda: any(j["metadata"]["name"] == f"{name}-trainer" for j in jobs_of(cluster, ns)),
        timeout=30,
        interval=0.1,
        what=f"the Job of {name}",
    )
    return time.monotonic() - since


def test_the_follower_takes_over_a_killed_or_stopped_leader(
    k8s_cluster: DevCluster, ns: str, assets: str, s3_server: S3Server, tmp_path: Path
) -> None:
    install_crd(k8s_cluster)
    a = replica(k8s_cluster, tmp_path, "a", ns)
    b = replica(k8s_cluster, tmp_path, "b", ns)
    a.start()
    wait_for(lambda: holder_url(k8s_cluster, ns) == a.url, timeout=30, what="a leads")
    b.start()
    try:
        # Long enough to be mid-run at the kill; the test does not wait for its end (the
        # restart tests do): one Job, progress moving again, is what failover must keep.
        steady = ftj_manifest("steady", assets, steps=400, evaluation={"enabled": False})
        create(k8s_cluster, ns, steady)
        with StepWatch(k8s_cluster, ns, "steady") as steps:
            wait_for(lambda: steps.latest() > 0, timeout=240, interval=0.3, what="progress")
            assert b.metric("kubetune_jobs_created_total") == 0  # the follower acts on nothing

            # 1. SIGKILL the leader mid-run; a FineTuneJob created meanwhile waits for b.
            before = steps.latest()
            a.stop(signal.SIGKILL)
            killed = time.monotonic()
            create(k8s_cluster, ns, ftj_manifest("after-kill", assets, suspend=True))
            kill_failover = job_created_after(k8s_cluster, ns, "after-kill", killed)
            assert holder_url(k8s_cluster, ns) == b.url
            # The trainer pushes to a's address: a, back as a follower, forwards to b.
            a.start()
            wait_for(
                lambda: steps.first_after(killed, before) is not None,
                timeout=120,
                interval=0.3,
                what="progress after the failover",
            )
            assert status_of(k8s_cluster, ns, "steady")["phase"] == "Running"
        assert a.metric("kubetune_progress_events_total", {"result": "forwarded"}) > 0
        assert b.metric("kubetune_progress_events_total", {"result": "accepted"}) > 0
        assert a.metric("kubetune_jobs_created_total") == 0  # a follower since its restart

        # 2. SIGSTOP the leader (b): it keeps the Lease until it expires; a takes over, and b,
        # continued, exits at once (without acting) instead of leading alongside a.
        assert b.proc is not None
        os.killpg(b.proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            create(k8s_cluster, ns, ftj_manifest("after-stop", assets, suspend=True))
            stop_failover = job_created_after(k8s_cluster, ns, "after-stop", stopped)
            assert holder_url(k8s_cluster, ns) == a.url
        finally:
            os.killpg(b.proc.pid, signal.SIGCONT)
        assert b.proc.wait(timeout=RENEW_DEADLINE_S + 10) == LOST_LEASE_EXIT
        assert "lost the leadership" in b.logs()

        # Nothing lost, nothing doubled: one Job per FineTuneJob.
        names = sorted(j["metadata"]["name"] for j in jobs_of(k8s_cluster, ns))
        assert names == ["after-kill-trainer", "after-stop-trainer", "steady-trainer"]
        print(
            f"\nfailover (kill to the new leader's first Job): SIGKILL {kill_failover:.1f} s, "
            f"SIGSTOP {stop_failover:.1f} s (lease {LEASE_DURATION_S} s, renew deadline "
            f"{RENEW_DEADLINE_S} s, retry {RETRY_PERIOD_S} s)"
        )
        limit = LEASE_DURATION_S + 2 * RETRY_PERIOD_S + 3
        assert kill_failover < limit and stop_failover < limit
    finally:
        a.stop()
        b.stop()
