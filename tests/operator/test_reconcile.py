"""The reconcile decision without a cluster: Snapshot in, Plan out, one case each."""

from __future__ import annotations

from kubetune.api.contract import Reason
from kubetune_operator import builders, cache, names
from kubetune_operator.reconcile import NAME_TAKEN_RETRY_S, Plan, Snapshot, decide
from kubetune_operator.settings import OperatorSettings

NOW = "2026-01-01T00:00:00Z"
SETTINGS = OperatorSettings(progress_base_url="http://op:8080")
KEY = ("team-a", "tune")


def ftj_object(**spec: object) -> dict:
    """A FineTuneJob as the watch delivers it."""
    body = {
        "model": {"uri": "s3://models/tiny"},
        "dataset": {"uri": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/", "credentialsSecretRef": {"name": "s3-creds"}},
        "resources": {"gpus": 0},
        **spec,
    }
    meta = {"name": "tune", "namespace": "team-a", "uid": "uid-1", "generation": 1}
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": meta,
        "spec": body,
    }


def snapshot(obj: dict | None, **known: object) -> Snapshot:
    return Snapshot(key=KEY, ftj=obj, parsed=cache.parse(obj) if obj else None, **known)


def created_job(obj: dict) -> dict:
    """The Job decide() asked for, as the watch brings it back."""
    job = decide(snapshot(obj), SETTINGS, NOW).create_job
    assert job is not None
    job = cache.slim_job({**job, "metadata": {**job["metadata"], "uid": "job-uid"}})
    return job


def test_a_new_finetunejob_gets_its_job_then_one_status() -> None:
    obj = ftj_object(queueName="gpu")
    first = decide(snapshot(obj), SETTINGS, NOW)
    assert first.create_job == builders.build_job(cache.parse(obj), SETTINGS)
    assert first.status is None  # the status waits for the Job, so it is written once
    second = decide(snapshot(obj, job=created_job(obj)), SETTINGS, NOW)
    assert second.create_job is None and second.set_suspend is None
    assert (second.status["phase"], second.status["reason"]) == ("Queued", "WaitingForAdmission")
    assert second.status["jobName"] == "tune-trainer"


def test_an_unchanged_status_is_not_written_again() -> None:
    obj = ftj_object(queueName="gpu")
    job = created_job(obj)
    written = decide(snapshot(obj, job=job), SETTINGS, NOW).status
    again = decide(snapshot(obj, job=job, written=written), SETTINGS, NOW)
    assert again == Plan(current=written)
    # What this operator wrote counts over the (older) status in the watched object.
    stale = {**obj, "status": {"phase": "Pending"}}
    assert decide(snapshot(stale, job=job, written=written), SETTINGS, NOW).status is None


def test_a_problem_fails_the_job_without_creating_one() -> None:
    obj = ftj_object(dataset={"uri": "file:///etc/passwd"})
    plan = decide(snapshot(obj), SETTINGS, NOW)
    assert plan.create_job is None
    assert (
        plan.status["phase"] == "Failed" and plan.status["reason"] == Reason.URI_SCHEME_NOT_ALLOWED
    )


def test_a_job_too_large_for_its_annotation_fails_without_a_job() -> None:
    schema = {"properties": {f"field{i}": {"type": "string"} for i in range(9000)}}
    obj = ftj_object(evaluation={"format": {"type": "jsonSchema", "schema": schema}})
    plan = decide(snapshot(obj), SETTINGS, NOW)
    assert plan.create_job is None
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == Reason.SPEC_TOO_LARGE


def test_an_object_the_models_reject_fails_naming_the_field() -> None:
    obj = ftj_object(training={"learningRate": -1})
    plan = decide(snapshot(obj), SETTINGS, NOW)
    assert plan.create_job is None
    assert plan.status["reason"] == Reason.INVALID_SPEC
    assert plan.status["message"].startswith("spec.training.learningRate:")


def test_a_finished_job_whose_job_is_gone_gets_no_second_job() -> None:
    obj = {**ftj_object(), "status": {"phase": "Succeeded", "jobName": "tune-trainer"}}
    assert decide(snapshot(obj), SETTINGS, NOW) == Plan(current=obj["status"])


def test_a_job_of_an_earlier_finetunejob_of_that_name_is_waited_for() -> None:
    obj = ftj_object()
    job = created_job(obj)
    job["metadata"]["ownerReferences"][0]["uid"] = "uid-of-the-deleted-one"
    plan = decide(snapshot(obj, job=job), SETTINGS, NOW)
    assert plan.create_job is None and plan.requeue_after == NAME_TAKEN_RETRY_S
    assert plan.status["reason"] == Reason.JOB_NAME_TAKEN


def test_suspend_follows_the_spec_but_never_unsuspends_a_queued_job() -> None:
    running = ftj_object()
    job = created_job(running)
    assert decide(snapshot(running, job=job), SETTINGS, NOW).set_suspend is None
    suspended = ftj_object(suspend=True)
    assert decide(snapshot(suspended, job=job), SETTINGS, NOW).set_suspend is True
    resumed_job = {**job, "spec": {"suspend": True}}
    assert decide(snapshot(running, job=resumed_job), SETTINGS, NOW).set_suspend is False
    queued = ftj_object(queueName="gpu")
    assert decide(snapshot(queued, job=resumed_job), SETTINGS, NOW).set_suspend is None
    finished = {**job, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert decide(snapshot(suspended, job=finished), SETTINGS, NOW).set_suspend is None


def test_only_a_seen_deletion_deletes_the_job() -> None:
    job = created_job(ftj_object())
    # Not seen yet (a Job event before the first FineTuneJob list): hands off.
    assert decide(snapshot(None, job=job), SETTINGS, NOW) == Plan()
    plan = decide(snapshot(None, job=job, deleted=True), SETTINGS, NOW)
    assert plan.delete_job == names.job_name("tune") and plan.forget


def test_a_finetunejob_being_deleted_is_left_alone() -> None:
    obj = ftj_object()
    obj["metadata"]["deletionTimestamp"] = NOW
    assert decide(snapshot(obj), SETTINGS, NOW) == Plan()


def test_spec_changes_after_the_job_are_reported_not_applied() -> None:
    obj = ftj_object()
    job = created_job(obj)
    edited = ftj_object(training={"learningRate": 0.001})
    plan = decide(snapshot(edited, job=job), SETTINGS, NOW)
    assert plan.create_job is None
    changed = next(c for c in plan.status["conditions"] if c["type"] == "SpecChangedAfterStart")
    assert changed["status"] == "True" and "spec.training" in changed["message"]
