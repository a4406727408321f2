"""A gang that cannot start says so: status derived from hand-made pods of a 2-pod gang whose
second member the scheduler cannot place (rank 0 running, waiting at the rendezvous)."""

from __future__ import annotations

from kubetune.api import contract
from kubetune.api.contract import Reason
from tests.operator.test_builders import make_ftj
from tests.operator.test_status import derive, job_for, pod

INSUFFICIENT_CPU = (
    "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available"
)
UNSCHEDULABLE = {
    "type": "PodScheduled",
    "status": "False",
    "reason": "Unschedulable",
    "message": INSUFFICIENT_CPU,
}
RENDEZVOUS_FAILED = "the gang did not meet: node rank 0 waited 600 s at the rendezvous"


def member(index: int, phase: str, **state) -> dict:
    p = pod(phase, name=f"tune-trainer-{index}-x", **state)
    p["metadata"]["labels"] = {"batch.kubernetes.io/job-completion-index": str(index)}
    return p


def gang():
    return make_ftj(resources={"gpus": 0, "nodes": 2})


def test_rank_zero_running_while_a_member_is_unschedulable_is_pending() -> None:
    ftj = gang()
    pods = [member(0, "Running", running=True), member(1, "Pending", conditions=[UNSCHEDULABLE])]
    st = derive(ftj, job_for(ftj, active=2), pods)
    assert (st["phase"], st["reason"]) == ("Pending", Reason.UNSCHEDULABLE)
    assert "gang member 1 of 2 (pod tune-trainer-1-x) cannot be scheduled" in st["message"]
    assert INSUFFICIENT_CPU in st["message"]
    assert f"at most {contract.RENDEZVOUS_TIMEOUT_S} s" in st["message"]
    assert "the trainer is running" not in st["message"]


def test_a_placed_gang_is_running() -> None:
    ftj = gang()
    pods = [member(0, "Running", running=True), member(1, "Running", running=True)]
    st = derive(ftj, job_for(ftj, active=2), pods)
    assert (st["phase"], st["reason"]) == ("Running", Reason.TRAINING)


def test_a_single_pod_job_ignores_gang_rules() -> None:
    ftj = make_ftj()
    st = derive(ftj, job_for(ftj, active=1), [pod("Pending", conditions=[UNSCHEDULABLE])])
    assert (st["phase"], st["reason"]) == ("Pending", Reason.UNSCHEDULABLE)
    assert "gang member" not in st["message"]


def test_a_retry_after_the_rendezvous_timeout_stays_pending_with_the_cause() -> None:
    ftj = gang()
    gave_up = {"exitCode": contract.EXIT_RENDEZVOUS_TIMEOUT, "message": RENDEZVOUS_FAILED}
    pods = [
        member(0, "Failed", terminated=gave_up),
        member(1, "Pending", conditions=[UNSCHEDULABLE]),
    ]
    st = derive(ftj, job_for(ftj, active=1, failed=1), pods)
    assert (st["phase"], st["reason"]) == ("Pending", Reason.UNSCHEDULABLE)
    assert st["attempts"][0]["reason"] == Reason.RENDEZVOUS_TIMEOUT


def test_out_of_retries_the_job_fails_with_the_unschedulable_member() -> None:
    ftj = gang()
    gave_up = {"exitCode": contract.EXIT_RENDEZVOUS_TIMEOUT, "message": RENDEZVOUS_FAILED}
    pods = [
        member(0, "Failed", terminated=gave_up),
        member(1, "Pending", conditions=[UNSCHEDULABLE]),
    ]
    job = job_for(ftj, conditions=[("Failed", "BackoffLimitExceeded", "")], failed=6)
    st = derive(ftj, job, pods)
    assert (st["phase"], st["reason"]) == ("Failed", Reason.UNSCHEDULABLE)
    assert "gang member 1 of 2" in st["message"] and INSUFFICIENT_CPU in st["message"]


def test_a_rendezvous_timeout_without_a_visible_cause_says_so() -> None:
    ftj = gang()
    gave_up = {"exitCode": contract.EXIT_RENDEZVOUS_TIMEOUT, "message": RENDEZVOUS_FAILED}
    job = job_for(ftj, conditions=[("Failed", "BackoffLimitExceeded", "")], failed=6)
    st = derive(ftj, job, [member(0, "Failed", terminated=gave_up)])
    assert (st["phase"], st["reason"]) == ("Failed", Reason.RENDEZVOUS_TIMEOUT)
    assert RENDEZVOUS_FAILED in st["message"]
