"""Preemption and the deadline, as the operator decides them: a trainer stopped with its step
saved (EXIT_PREEMPTED) is `Preempted`, not a failure, and the next attempt's resumedFromStep is
that step; the grace period fits a checkpoint or the status says it does not; the deadline
counts run time over all attempts, so suspend/resume cannot extend it."""

from __future__ import annotations

from kubetune.api import contract
from kubetune.api.contract import Condition, Reason
from kubetune_operator import builders, deadline, grace
from kubetune_operator.reconcile import decide
from kubetune_operator.settings import OperatorSettings
from tests.operator.test_attempts import NOW, at, attempts, starts, trainer_pod
from tests.operator.test_builders import SETTINGS, make_ftj
from tests.operator.test_reconcile import SETTINGS as RECONCILE_SETTINGS
from tests.operator.test_reconcile import created_job, ftj_object, snapshot
from tests.operator.test_status import derive, job_for

STOPPED = (
    "Preempted: stopped by SIGTERM after step 37; its checkpoint (s3://out/ns/tune/checkpoints/"
    "checkpoint-37/) is saved and the next attempt resumes from it"
)


def test_the_preempted_exit_code_is_ignored_by_the_jobs_failure_policy() -> None:
    ftj = make_ftj(backoffLimit=2, resources={"gpus": 1, "nodes": 2})
    job = builders.build_job(ftj, SETTINGS)["spec"]
    ignored = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "Ignore"]
    assert {"containerName": "trainer", "operator": "In", "values": [5]} in [
        r.get("onExitCodes") for r in ignored
    ]
    assert contract.EXIT_PREEMPTED == 5
    assert contract.EXIT_PREEMPTED not in contract.NON_RETRYABLE_EXIT_CODES
    # Ignored pods are not counted: a gang's backoffLimit stays retries x pods.
    assert job["backoffLimit"] == 2 * 2


def test_a_preempted_attempt_says_so_and_the_next_resumes_at_its_step() -> None:
    pods = [
        # Deleted (drain, kubectl delete): still Preempted, since its step was saved.
        trainer_pod(
            "p1", at(0), started=at(0, 5), ended=at(2), exit_code=5, message=STOPPED, deleted=True
        ),
        trainer_pod("p2", at(2, 10), started=at(2, 12)),
    ]
    seen = attempts(pods, progress=starts((at(0, 20), 0), (at(2, 30), 37)))
    assert [(a["attempt"], a["result"], a["reason"], a["exitCode"]) for a in seen[:1]] == [
        (1, "Stopped", Reason.PREEMPTED, 5)
    ]
    assert seen[1]["resumedFromStep"] == 37 and seen[1]["result"] == "Running"
    # A pod killed without a checkpoint is not Preempted.
    killed = attempts([trainer_pod("p1", at(0), started=at(0, 5), ended=at(2), exit_code=137)])
    assert killed[0]["reason"] != Reason.PREEMPTED


def test_between_a_preemption_and_the_next_attempt_the_job_is_not_restarting_a_failure() -> None:
    ftj = make_ftj()
    stopped = trainer_pod("p1", at(0), started=at(0, 5), ended=at(2), exit_code=5, message=STOPPED)
    st = derive(ftj, job_for(ftj), [stopped], now=NOW)
    assert (st["phase"], st["reason"]) == ("Running", Reason.PREEMPTED)
    assert "after step 37" in st["message"] and "next attempt" in st["message"]
    assert st["restarts"] == 0  # the Job counted no failed pod


def test_the_grace_period_fits_a_checkpoint_of_the_estimated_size() -> None:
    settings = OperatorSettings(trainer_grace_seconds=60, checkpoint_mib_per_s=100)
    full = make_ftj(model={"uri": "s3://models/Llama-3-8B"}, method="full").spec
    # 8e9 parameters x 10 bytes = 74.5 GiB at 100 MiB/s: 763 s, plus the floor.
    assert grace.checkpoint_seconds(full, settings) == 763
    assert grace.grace_period(full, settings) == 60 + 763
    assert grace.grace_too_short(full, settings) is None
    lora = make_ftj(model={"uri": "s3://models/Llama-3-8B"}, method="lora").spec
    assert grace.grace_period(lora, settings) == 60 + 10
    unknown = make_ftj(model={"uri": "s3://models/tiny-llama"}).spec
    assert grace.grace_period(unknown, settings) == 60

    pod = builders.build_job(make_ftj(), SETTINGS)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == grace.grace_period(make_ftj().spec, SETTINGS)
    chosen = make_ftj(terminationGracePeriodSeconds=900)
    pod = builders.build_job(chosen, SETTINGS)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 900


def test_a_grace_period_too_short_for_a_checkpoint_is_a_condition_at_admission() -> None:
    obj = ftj_object(
        model={"uri": "s3://models/Llama-3-8B"}, method="full", terminationGracePeriodSeconds=30
    )
    plan = decide(snapshot(obj, job=created_job(obj)), RECONCILE_SETTINGS, NOW)
    condition = next(
        c for c in plan.status["conditions"] if c["type"] == Condition.CHECKPOINT_ON_STOP
    )
    assert (condition["status"], condition["reason"]) == ("False", "GracePeriodTooShort")
    assert condition["message"].startswith("spec.terminationGracePeriodSeconds (30 s)")
    assert plan.create_job is None  # said, not refused: the job still runs


def test_run_time_is_summed_over_attempts_and_a_gang_counts_once() -> None:
    usage = {"attempts": {"a-0": 100.0, "a-1": 100.0, "b-0": 50.0, "b-1": 50.0}}
    assert deadline.run_seconds(usage, nodes=2) == 150.0
    assert deadline.run_seconds(None, nodes=1) == 0.0
    spec = make_ftj(activeDeadlineSeconds=149, resources={"gpus": 1, "nodes": 2}).spec
    assert "150 s over all attempts" in deadline.deadline_exceeded(spec, usage)
    assert (
        deadline.deadline_exceeded(spec.model_copy(update={"activeDeadlineSeconds": 150}), usage)
        is None
    )
    assert deadline.deadline_exceeded(make_ftj().spec, usage) is None  # no deadline


def test_suspend_and_resume_cannot_extend_the_deadline() -> None:
    """Two attempts of 60 s each, a suspension between them: a 100 s deadline is past although
    the resumed Job's own timer (restarted on resume) is at 60 s. The job fails and the
    operator deletes its Job; it stays failed once the Job is gone."""
    obj = ftj_object(activeDeadlineSeconds=100)
    first = trainer_pod("tune-trainer-a", at(0), started=at(0), ended=at(1), exit_code=5)
    second = trainer_pod("tune-trainer-b", at(5), started=at(5))
    job = created_job(obj)
    job["status"] = {"active": 1}
    prev = {"phase": "Running", "jobName": "tune-trainer", "usage": {"attempts": {}}}
    plan = decide(
        snapshot(obj, job=job, pods=[first, second], written=prev), RECONCILE_SETTINGS, at(6)
    )
    assert (plan.status["phase"], plan.status["reason"]) == ("Failed", Reason.DEADLINE_EXCEEDED)
    assert "120 s over all attempts" in plan.status["message"]
    assert plan.delete_job == "tune-trainer" and plan.create_job is None

    # The Job is gone: the outcome stands and no new Job is made.
    after = decide(snapshot(obj, written=plan.status), RECONCILE_SETTINGS, at(7))
    assert after.create_job is None and after.delete_job is None
    assert after.status is None or after.status["reason"] == Reason.DEADLINE_EXCEEDED

    # Under the deadline nothing happens.
    calm = decide(
        snapshot(obj, job=job, pods=[second], written=prev), RECONCILE_SETTINGS, at(5, 30)
    )
    assert calm.delete_job is None and calm.status["phase"] == "Running"


def test_a_full_work_dir_fails_the_job_even_when_the_trainer_saved_its_step() -> None:
    """The kubelet evicts a pod whose work dir passed spec.resources.workDirSize with SIGTERM;
    the trainer saves its step and exits Preempted, which the Job's failure policy ignores.
    Retrying would fill the work dir again without end: the operator fails the job and
    deletes its Job."""
    obj = ftj_object()
    evicted = trainer_pod("tune-trainer-a", at(0), started=at(0), ended=at(1), exit_code=5)
    evicted["status"].update(
        reason="Evicted", message='Usage of EmptyDir volume "work" exceeds the limit "1536Ki". '
    )
    job = created_job(obj)
    job["status"] = {"active": 1}
    prev = {"phase": "Running", "jobName": "tune-trainer"}
    plan = decide(snapshot(obj, job=job, pods=[evicted], written=prev), RECONCILE_SETTINGS, at(2))
    assert (plan.status["phase"], plan.status["reason"]) == ("Failed", Reason.WORK_DIR_FULL)
    assert "spec.resources.workDirSize" in plan.status["message"]
    assert plan.delete_job == "tune-trainer" and plan.create_job is None
    assert plan.status["attempts"][0]["reason"] == Reason.WORK_DIR_FULL
    # Deleting the Job deletes the pod: the attempt keeps its cause.
    evicted["metadata"]["deletionTimestamp"] = at(3)
    again = decide(
        snapshot(obj, job=job, pods=[evicted], written=plan.status), RECONCILE_SETTINGS, at(3)
    )
    shown = again.status or plan.status
    assert shown["attempts"][0]["reason"] == Reason.WORK_DIR_FULL
    del evicted["metadata"]["deletionTimestamp"]
    # Another eviction (node pressure) of a trainer that saved its step stays a preemption.
    evicted["status"]["message"] = "The node was low on resource: memory."
    plan = decide(snapshot(obj, job=job, pods=[evicted], written=prev), RECONCILE_SETTINGS, at(2))
    assert plan.delete_job is None and plan.status["reason"] == Reason.PREEMPTED
