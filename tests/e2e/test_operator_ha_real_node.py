"""The chart's two operator replicas (leader election on a Lease, a PDB) on the real node,
disturbed the ways a cluster disturbs them: the leader's processes killed (SIGKILL) or frozen
(SIGSTOP keeps its Lease until it expires), each during a burst of FineTuneJob creations and
while a trainer pushes progress, and `helm upgrade` rolling both replicas during a run. Each
time: no FineTuneJob is lost or gets a second Job, progress goes on, and the run Succeeds. The
old leader's container exits 137 (killed) or 3 (continued, it finds its Lease gone). Prints the
failover times docs/reliability.md records (chart timing: lease 15 s, renew 10 s, retry 2 s).

    KUBETUNE_REQUIRE_CLUSTER=1 .venv/bin/pytest -q -s tests/e2e/test_operator_ha_real_node.py

The trainer is paused (SIGSTOP) while the operator is disturbed where a fast machine could
otherwise finish the run inside the disturbance and leave nothing to observe.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from kubetune_devcluster import stack
from kubetune_devcluster.nodefaults import pod_paused, process_tree, signal_all
from kubetune_devcluster.processes import wait_for
from tests.fixtures.ftj import FTJ_API, create, jobs_of, pods_of, wait_phase
from tests.fixtures.real_node import (
    RUN_TIMEOUT,
    RealStack,
    both_replicas_ready,
    leader_pod,
    lease_holder,
    manifest,
    running_trainer_pod,
    step_of,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

BURST = 100
KILL_AFTER = 30  # creations before the leader is killed
# The chart's leaseDurationSeconds; a takeover needs the Lease to expire, plus a retry period
# and a loaded machine's slack.
LEASE_DURATION_S = 15
TAKEOVER_TIMEOUT_S = LEASE_DURATION_S + 45


def container_restarts(pod: dict) -> tuple[int, int | None]:
    """The operator container's restart count and the exit code of its last run."""
    (status,) = pod["status"].get("containerStatuses") or [{}]
    last = (status.get("lastState") or {}).get("terminated") or {}
    return status.get("restartCount", 0), last.get("exitCode")


def operator_pod(real_stack: RealStack, uid: str) -> dict | None:
    return next((p for p in real_stack.operator_pods() if p["metadata"]["uid"] == uid), None)


def wait_for_new_leader(real_stack: RealStack, old_holder: str) -> None:
    wait_for(
        lambda: lease_holder(real_stack) not in ("", old_holder),
        timeout=TAKEOVER_TIMEOUT_S,
        interval=0.1,
        what="another replica holding the Lease",
    )


def started_run(real_stack: RealStack, ns: str, assets: str, name: str, steps: int) -> str:
    """Two Ready replicas, then a job of `steps` steps training; returns its trainer pod."""
    wait_for(lambda: both_replicas_ready(real_stack), timeout=120, what="two Ready replicas")
    create(real_stack.cluster, ns, manifest(name, assets, steps=steps))
    trainer = running_trainer_pod(real_stack, ns)
    wait_for(
        lambda: step_of(real_stack, ns, name) > 0,
        timeout=RUN_TIMEOUT,
        interval=0.3,
        what="progress",
    )
    return trainer


@contextlib.contextmanager
def leader_disturbed(real_stack: RealStack, leader: dict, how: str) -> Iterator[None]:
    """SIGKILL: a crash, every process of the leader's container killed (the kubelet restarts
    it). SIGSTOP: frozen for the block, keeping its Lease until it expires; continued after."""
    cluster, name = real_stack.cluster, leader["metadata"]["name"]
    if how == "SIGSTOP":
        with pod_paused(cluster, real_stack.namespace, name):
            yield
        return
    signal_all(process_tree(cluster.pod_pids(real_stack.namespace, name)), signal.SIGKILL)
    yield


def wait_for_the_old_leaders_exit(real_stack: RealStack, leader: dict, restarts_before: int) -> int:
    """The exit code of the old leader's container run that was disturbed: 137 when killed;
    3 when continued after a freeze (it finds its Lease gone and exits without acting). Its
    container comes back as a follower."""
    uid = leader["metadata"]["uid"]

    def exited() -> tuple[int, int | None] | None:
        pod = operator_pod(real_stack, uid)
        restarts = container_restarts(pod) if pod else (restarts_before, None)
        return restarts if restarts[0] > restarts_before else None

    _, exit_code = wait_for(exited, timeout=120, what="the old leader's exit")
    return exit_code


EXIT_CODE = {"SIGKILL": 128 + signal.SIGKILL, "SIGSTOP": 3}


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_leader_disturbed_during_a_burst_of_creations_loses_no_job(
    real_stack: RealStack, real_ns: str, real_assets: str, how: str
) -> None:
    cluster = real_stack.cluster
    wait_for(lambda: both_replicas_ready(real_stack), timeout=120, what="two Ready replicas")
    leader = leader_pod(real_stack)
    old_holder = lease_holder(real_stack)
    restarts_before, _ = container_restarts(leader)

    created: list[str] = []
    errors: list[BaseException] = []
    enough = threading.Event()

    def burst() -> None:
        try:
            for i in range(BURST):
                body = manifest(f"burst-{i:03d}", real_assets)
                body["spec"]["suspend"] = True  # a Job each, and no trainer pod
                create(cluster, real_ns, body)
                created.append(body["metadata"]["name"])
                if len(created) == KILL_AFTER:
                    enough.set()
        except BaseException as exc:  # reported by the test below
            errors.append(exc)
            enough.set()

    creator = threading.Thread(target=burst, name="burst", daemon=True)
    creator.start()
    assert enough.wait(timeout=120), "the burst did not start"
    disturbed = time.monotonic()
    with leader_disturbed(real_stack, leader, how):
        wait_for_new_leader(real_stack, old_holder)
        took_over = time.monotonic() - disturbed
        jobs_at_takeover = len(jobs_of(cluster, real_ns))
        creator.join(timeout=300)
        assert not errors, errors
        assert len(created) == BURST
        # The new leader's first Job: a creation it reconciled, not one from the old leader.
        wait_for(
            lambda: len(jobs_of(cluster, real_ns)) > jobs_at_takeover,
            timeout=120,
            interval=0.1,
            what="a Job from the new leader",
        )
        first_job = time.monotonic() - disturbed

    def all_suspended() -> bool:
        items = cluster.rest().get(f"{FTJ_API}/namespaces/{real_ns}/finetunejobs")["items"]
        phases = [(i.get("status") or {}).get("phase") for i in items]
        return len(items) == BURST and set(phases) == {"Suspended"}

    wait_for(all_suspended, timeout=600, interval=2, what=f"{BURST} FineTuneJobs Suspended")
    assert wait_for_the_old_leaders_exit(real_stack, leader, restarts_before) == EXIT_CODE[how]
    jobs = jobs_of(cluster, real_ns)
    owners = [ref["uid"] for job in jobs for ref in job["metadata"].get("ownerReferences") or []]
    assert len(jobs) == BURST and len(set(owners)) == BURST, "a lost or a second Job"
    print(
        f"\nleader {how} after {KILL_AFTER} of {BURST} creations: Lease taken over "
        f"{took_over:.1f} s later, the new leader's first Job {first_job:.1f} s later"
    )
    cluster.kubectl("delete", "finetunejobs", "--all", "-n", real_ns, "--wait=false")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_leader_disturbed_mid_run_is_replaced_and_the_run_goes_on(
    real_stack: RealStack, real_ns: str, real_assets: str, how: str
) -> None:
    cluster, name = real_stack.cluster, f"leader-{how.lower()}"
    trainer = started_run(real_stack, real_ns, real_assets, name, steps=20)
    leader = leader_pod(real_stack)
    old_holder = lease_holder(real_stack)
    restarts_before, _ = container_restarts(leader)
    disturbed = time.monotonic()
    with leader_disturbed(real_stack, leader, how):
        with pod_paused(cluster, real_ns, trainer):
            before = step_of(real_stack, real_ns, name)
            wait_for_new_leader(real_stack, old_holder)
            took_over = time.monotonic() - disturbed
        # A frozen old leader is still frozen here: progress reaches the new one.
        wait_for(
            lambda: step_of(real_stack, real_ns, name) > before,
            timeout=120,
            interval=0.3,
            what="progress through the new leader",
        )
        progress_again = time.monotonic() - disturbed
    assert wait_for_the_old_leaders_exit(real_stack, leader, restarts_before) == EXIT_CODE[how]
    st = wait_phase(cluster, real_ns, name, "Succeeded", "Failed", timeout=RUN_TIMEOUT)
    assert st["phase"] == "Succeeded", st
    assert st["progress"]["step"] == 20
    assert len(jobs_of(cluster, real_ns)) == 1 and len(pods_of(cluster, real_ns)) == 1
    print(
        f"\nleader {how} mid-run: Lease taken over {took_over:.1f} s later, progress "
        f"through the new leader {progress_again:.1f} s later"
    )


def test_helm_upgrade_mid_run_rolls_both_replicas_and_loses_nothing(
    real_stack: RealStack, real_ns: str, real_assets: str
) -> None:
    cluster = real_stack.cluster
    trainer = started_run(real_stack, real_ns, real_assets, "upgraded", steps=20)
    old_uids = {p["metadata"]["uid"] for p in real_stack.operator_pods()}
    with pod_paused(cluster, real_ns, trainer):
        before = step_of(real_stack, real_ns, "upgraded")
        started = time.monotonic()
        # A changed pod annotation: what any upgrade that touches the pod template does.
        done = real_stack.helm(
            "upgrade", stack.RELEASE, str(stack.CHART), "--namespace", real_stack.namespace,
            "--reuse-values", "--set-string", f"podAnnotations.rollout={uuid.uuid4().hex[:8]}",
            "--wait", "--timeout", "5m",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        wait_for(
            lambda: (
                both_replicas_ready(real_stack, not_uids=old_uids)
                and not {p["metadata"]["uid"] for p in real_stack.operator_pods()} & old_uids
            ),
            timeout=180,
            what="both replicas replaced",
        )
        rolled = time.monotonic() - started
    wait_for(
        lambda: step_of(real_stack, real_ns, "upgraded") > before,
        timeout=120,
        interval=0.3,
        what="progress through the upgraded operator",
    )
    st = wait_phase(cluster, real_ns, "upgraded", "Succeeded", "Failed", timeout=RUN_TIMEOUT)
    assert st["phase"] == "Succeeded", st
    assert st["progress"]["step"] == 20 and st["restarts"] == 0
    assert len(jobs_of(cluster, real_ns)) == 1 and len(pods_of(cluster, real_ns)) == 1
    assert leader_pod(real_stack)["metadata"]["uid"] not in old_uids
    print(f"\nhelm upgrade mid-run: both replicas replaced in {rolled:.1f} s, nothing lost")
