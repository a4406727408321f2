"""derive_status() on hand-made FineTuneJob / Job / Pod objects, one case each."""

from __future__ import annotations

import json

import pytest

from kubetune.api import contract
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune_operator import builders, cache, status, validation
from kubetune_operator.settings import OperatorSettings
from tests.operator.test_builders import make_ftj

T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z", "2026-01-01T00:02:00Z"
SETTINGS = OperatorSettings(progress_base_url="http://op:8080")


def job_for(
    ftj: FineTuneJob, *, suspend: bool = False, conditions=(), failed: int = 0, **st
) -> dict:
    job = builders.build_job(ftj, SETTINGS)
    job["metadata"]["uid"] = "job-uid"
    job["spec"]["suspend"] = suspend
    job["status"] = {
        "conditions": [
            {"type": t, "status": "True", "reason": r, "message": m} for t, r, m in conditions
        ],
        "failed": failed,
        **st,
    }
    return job


def pod(phase: str, *, terminated=None, waiting=None, running=False, conditions=None, name="p"):
    state = {}
    if terminated is not None:
        state["terminated"] = terminated
    if waiting is not None:
        state["waiting"] = waiting
    if running:
        state["running"] = {"startedAt": T0}
    return {
        "metadata": {"name": name, "uid": name, "creationTimestamp": T0},
        "spec": {"containers": [{"name": "trainer", "image": "registry.example/trainer:1"}]},
        "status": {
            "phase": phase,
            "conditions": conditions or [],
            "containerStatuses": [{"name": "trainer", "state": state}] if state else [],
        },
    }


def derive(
    ftj, job=None, pods=(), progress=None, problem=None, changed=(), now=T1, prev=None
) -> dict:
    obs = status.Observed(
        ftj=ftj,
        previous=prev or {},
        job=job,
        pods=list(pods),
        progress=progress,
        problem=problem,
        changed_fields=None if changed is None else list(changed),
    )
    return status.derive_status(obs, now).wire()


def cond(st: dict, type_: str) -> dict:
    return next(c for c in st["conditions"] if c["type"] == type_)


def test_pending_before_the_job_exists() -> None:
    st = derive(make_ftj())
    assert st["phase"] == "Pending" and st["reason"] == "Creating"
    assert st["observedGeneration"] == 1
    assert cond(st, "Accepted")["status"] == "True"
    assert "jobName" not in st and "startTime" not in st


def test_validation_problem_shows_at_once_without_a_job() -> None:
    problem = validation.Problem("Failed", "InsufficientGPUs", "needs 1120 GiB")
    st = derive(make_ftj(), problem=problem)
    assert (st["phase"], st["reason"], st["message"]) == (
        "Failed",
        "InsufficientGPUs",
        "needs 1120 GiB",
    )
    accepted = cond(st, "Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "InsufficientGPUs"
    assert "completionTime" not in st  # nothing ran


def test_queued_while_kueue_has_not_admitted_the_job() -> None:
    ftj = make_ftj(queueName="gpu")
    st = derive(ftj, job_for(ftj, suspend=True))
    assert st["phase"] == "Queued" and "gpu" in st["message"]
    assert st["jobName"] == "tune-trainer"


def test_suspended_by_spec() -> None:
    ftj = make_ftj(suspend=True)
    st = derive(ftj, job_for(ftj, suspend=True))
    assert st["phase"] == "Suspended"
    assert cond(st, "Suspended")["status"] == "True"


def test_running_with_progress_summary_and_start_time() -> None:
    ftj = make_ftj()
    job = job_for(ftj, startTime=T0, active=1)
    progress = {"step": 120, "totalSteps": 300, "loss": 1.25, "epoch": 0.4, "updatedAt": T1}
    st = derive(ftj, job, [pod("Running", running=True)], progress)
    assert st["phase"] == "Running" and st["startTime"] == T0
    assert st["progress"]["summary"] == "120/300 (40%)" and st["progress"]["percent"] == 40.0
    assert st["progress"]["loss"] == 1.25 and st["progress"]["updatedAt"] == T1
    assert cond(st, "Running")["status"] == "True"
    assert st["restarts"] == 0


def test_unschedulable_pending_carries_the_scheduler_message() -> None:
    ftj = make_ftj()
    scheduled = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
    }
    st = derive(ftj, job_for(ftj, active=1), [pod("Pending", conditions=[scheduled])])
    assert st["phase"] == "Pending" and st["reason"] == "Unschedulable"
    assert "1 Insufficient nvidia.com/gpu" in st["message"]


def test_image_pull_backoff() -> None:
    ftj = make_ftj()
    waiting = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x"'}
    st = derive(ftj, job_for(ftj, active=1), [pod("Pending", waiting=waiting)])
    assert (st["phase"], st["reason"]) == ("Pending", "ImagePullBackOff")
    assert "registry.example/trainer:1" in st["message"]


def test_succeeded_takes_artifacts_and_metrics_from_the_termination_message() -> None:
    ftj = make_ftj()
    result = contract.TrainerResult(
        artifacts={"model": "s3://out/runs/team-a/tune/adapter/", "report": "s3://out/r.md"},
        metrics={"trainLoss": 0.5, "evalLoss": 0.7, "tokensTrained": 1000, "evalPassed": True},
        totalSteps=300,
        resumedFromStep=100,
    )
    terminated = {"exitCode": 0, "reason": "Completed", "message": result.model_dump_json()}
    job = job_for(ftj, conditions=[("Complete", "", "")], startTime=T0, completionTime=T2)
    prev = {"phase": "Running", "progress": {"step": 290, "totalSteps": 300, "etaSeconds": 3}}
    st = derive(ftj, job, [pod("Succeeded", terminated=terminated)], prev=prev)
    assert st["phase"] == "Succeeded" and st["completionTime"] == T2
    assert st["artifacts"]["model"] == "s3://out/runs/team-a/tune/adapter/"
    assert st["metrics"]["trainLoss"] == 0.5 and st["metrics"]["tokensTrained"] == 1000
    assert st["progress"]["summary"] == "300/300 (100%)" and "etaSeconds" not in st["progress"]
    assert st["resumedFromStep"] == 100
    assert cond(st, "Succeeded")["status"] == "True"
    assert cond(st, "EvalPassed")["status"] == "True"


def test_tracking_state_reaches_the_status() -> None:
    ftj = make_ftj()
    result = contract.TrainerResult(
        tracking=[
            {"backend": "mlflow", "state": "Unavailable", "message": "start: connection refused"},
            {"backend": "wandb", "state": "Logged", "run": "https://wandb.ai/t/p/runs/x"},
        ]
    )
    terminated = {"exitCode": 0, "reason": "Completed", "message": result.model_dump_json()}
    job = job_for(ftj, conditions=[("Complete", "", "")], startTime=T0, completionTime=T2)
    st = derive(ftj, job, [pod("Succeeded", terminated=terminated)])
    assert st["phase"] == "Succeeded"
    assert st["tracking"] == [
        {"backend": "mlflow", "state": "Unavailable", "message": "start: connection refused"},
        {"backend": "wandb", "state": "Logged", "run": "https://wandb.ai/t/p/runs/x"},
    ]


def test_bad_input_fails_with_the_trainers_own_line() -> None:
    ftj = make_ftj()
    line = "s3://data/train.jsonl: row 7: field 'output' is missing"
    terminated = {"exitCode": 3, "reason": "Error", "message": line}
    job = job_for(
        ftj,
        conditions=[("Failed", "PodFailurePolicy", "Container trainer ... exit code 3")],
        failed=1,
    )
    st = derive(ftj, job, [pod("Failed", terminated=terminated)])
    assert (st["phase"], st["reason"], st["message"]) == ("Failed", "BadInput", line)
    assert st["restarts"] == 0  # failed at once, no retry
    assert cond(st, "Failed")["message"] == line


def test_oom_killed() -> None:
    ftj = make_ftj()
    terminated = {"exitCode": 137, "reason": "OOMKilled"}
    job = job_for(ftj, conditions=[("Failed", "BackoffLimitExceeded", "")], failed=3)
    st = derive(ftj, job, [pod("Failed", terminated=terminated)])
    assert st["reason"] == "OOMKilled"
    assert "ran out of memory (memory limit 32Gi)" in st["message"]
    assert "failed 3 time(s)" in st["message"]
    assert st["restarts"] == 2


def test_work_dir_eviction_names_the_volume_and_the_limit() -> None:
    ftj = make_ftj(resources={"gpus": 0, "workDirSize": "20Mi"})
    evicted = pod("Failed", terminated={"exitCode": 137, "reason": "Error"})
    evicted["status"].update(
        reason="Evicted", message='Usage of EmptyDir volume "work" exceeds the limit "20Mi". '
    )
    job = job_for(ftj, conditions=[("Failed", "BackoffLimitExceeded", "")], failed=1)
    st = derive(ftj, job, [evicted])
    assert st["phase"] == "Failed" and st["reason"] == "WorkDirFull", st
    assert "spec.resources.workDirSize (20Mi)" in st["message"]
    assert "emptyDir volume 'work'" in st["message"]
    # Without the spec's size, the limit is the one the pod was given (the chart default).
    unsized = make_ftj(resources={"gpus": 0})
    evicted["status"]["reason"] = "Evicted"
    evicted.setdefault("spec", {})["volumes"] = [{"name": "work", "emptyDir": {"sizeLimit": "5Gi"}}]
    st = derive(
        unsized,
        job_for(unsized, conditions=[("Failed", "BackoffLimitExceeded", "")], failed=1),
        [evicted],
    )
    assert st["reason"] == "WorkDirFull" and "the platform's default (5Gi)" in st["message"], st
    # Any other eviction keeps the kubelet's words.
    evicted["status"]["message"] = "The node was low on resource: memory."
    st = derive(ftj, job, [evicted])
    assert st["reason"] == "Evicted" and "low on resource: memory" in st["message"]


def test_a_lost_node_is_named_until_the_replacement_runs() -> None:
    ftj = make_ftj(backoffLimit=0)
    job = job_for(ftj, active=1, startTime=T0)
    disrupted = {
        "type": "DisruptionTarget",
        "status": "True",
        "reason": "DeletionByTaintManager",
        "message": "Taint manager: deleting due to NoExecute taint",
    }
    old = pod("Running", running=True, conditions=[disrupted], name="a")
    old["metadata"]["deletionTimestamp"] = T1
    old["spec"]["nodeName"] = "node-1"
    # As the operator's cache keeps it.
    st = derive(ftj, job, [cache.slim_pod(old)])
    assert st["phase"] == "Running" and st["reason"] == "NodeLost", st
    assert "node node-1 stopped answering" in st["message"] and "pod a" in st["message"]
    assert st["restarts"] == 0
    # The old pod terminal and a replacement pending: still the node's doing.
    old["status"]["phase"] = "Failed"
    st = derive(ftj, job, [old, pod("Pending", name="b")])
    assert st["reason"] == "NodeLost"
    # The replacement running: training again.
    st = derive(ftj, job, [old, pod("Running", running=True, name="b")])
    assert st["reason"] == "Training"


def test_deadline_exceeded() -> None:
    ftj = make_ftj(activeDeadlineSeconds=600)
    job = job_for(ftj, conditions=[("Failed", "DeadlineExceeded", "Job was active longer")])
    st = derive(ftj, job, [])
    assert st["reason"] == "DeadlineExceeded" and "600 s" in st["message"]


def test_crash_without_result_reports_exit_code_and_log_tail() -> None:
    ftj = make_ftj()
    terminated = {"exitCode": 1, "reason": "Error", "message": "Traceback...\nRuntimeError: boom"}
    job = job_for(ftj, conditions=[("Failed", "BackoffLimitExceeded", "")], failed=3)
    st = derive(ftj, job, [pod("Failed", terminated=terminated)])
    assert st["reason"] == "TrainerFailed"
    assert "exited with code 1: RuntimeError: boom" in st["message"]


def test_s3_down_past_the_bound_is_reported_as_s3_unavailable() -> None:
    ftj = make_ftj()
    message = (
        "StorageUnavailableError: S3 unavailable: s3://runs did not answer for 600 s "
        "(upload checkpoint: Could not connect); checkpoints already uploaded are intact"
    )
    job = job_for(ftj, conditions=[("Failed", "BackoffLimitExceeded", "")], failed=3)
    terminated = {"exitCode": 1, "reason": "Error", "message": message}
    st = derive(ftj, job, [pod("Failed", terminated=terminated)])
    assert st["reason"] == "S3Unavailable"
    assert st["message"] == (
        "the trainer failed 3 time(s), giving up: S3 unavailable: s3://runs did not answer for "
        "600 s (upload checkpoint: Could not connect); checkpoints already uploaded are intact"
    )


def test_retry_counts_restarts_and_keeps_resumed_step() -> None:
    ftj = make_ftj()
    job = job_for(ftj, failed=1, active=1, startTime=T0)
    pods = [
        pod("Failed", terminated={"exitCode": 137}, name="a"),
        pod("Running", running=True, name="b"),
    ]
    st = derive(ftj, job, pods, {"step": 12, "totalSteps": 20, "resumedFromStep": 10})
    assert st["phase"] == "Running"
    assert st["restarts"] == 1 and st["resumedFromStep"] == 10


def test_condition_transition_time_moves_only_when_status_flips() -> None:
    ftj = make_ftj()
    job = job_for(ftj, active=1, startTime=T0)
    first = derive(ftj, job, [pod("Running", running=True)], {"step": 1, "totalSteps": 10}, now=T1)
    running = [pod("Running", running=True)]
    second = derive(ftj, job, running, {"step": 2, "totalSteps": 10}, now=T2, prev=first)
    assert cond(second, "Running")["lastTransitionTime"] == T1
    assert second["startTime"] == first["startTime"]
    done = job_for(ftj, conditions=[("Complete", "", "")])
    third = derive(ftj, done, [pod("Succeeded", terminated={"exitCode": 0})], now=T2, prev=second)
    assert cond(third, "Running")["status"] == "False"
    assert cond(third, "Running")["lastTransitionTime"] == T2
    assert cond(third, "Accepted")["lastTransitionTime"] == T1


def test_spec_change_after_start_is_a_condition_not_a_restart() -> None:
    ftj = make_ftj()
    job = job_for(ftj, active=1, startTime=T0)
    st = derive(ftj, job, [pod("Running", running=True)], changed=["training"])
    assert st["phase"] == "Running"
    changed = cond(st, "SpecChangedAfterStart")
    assert changed["status"] == "True" and "spec.training" in changed["message"]
    assert changed["observedGeneration"] == 1


def test_spec_change_condition_survives_a_moment_without_the_job() -> None:
    # Just after an operator restart the Job may not be observed yet: the change is then
    # unknown, not undone.
    ftj = make_ftj()
    job = job_for(ftj, active=1, startTime=T0)
    prev = derive(ftj, job, [pod("Running", running=True)], changed=["training"])
    st = derive(ftj, None, [], changed=None, prev=prev)
    assert cond(st, "SpecChangedAfterStart")["status"] == "True"
    st = derive(ftj, job, [pod("Running", running=True)], changed=[], prev=prev)
    assert cond(st, "SpecChangedAfterStart")["status"] == "False"


def test_finished_job_whose_job_was_deleted_keeps_its_outcome() -> None:
    ftj = make_ftj()
    prev = {"phase": "Succeeded", "jobName": "tune-trainer", "artifacts": {"model": "s3://x"}}
    assert derive(ftj, prev=prev) == prev


def test_result_json_is_parsed_only_when_it_is_one() -> None:
    assert status.parse_result("not json") is None
    assert status.parse_result('{"artifacts": {"model": "s3://m"}}').artifacts.model == "s3://m"
    assert status.parse_result(json.dumps({"artifacts": "bad"})) is None


def test_progress_alone_waits_for_the_interval_but_phase_changes_do_not() -> None:
    old = {"phase": "Running", "progress": {"step": 1}}
    assert not status.needs_immediate_patch(old, {"phase": "Running", "progress": {"step": 2}})
    assert status.needs_immediate_patch(old, {"phase": "Succeeded", "progress": {"step": 2}})


def test_merge_patch_nulls_removed_keys() -> None:
    old = {"phase": "Pending", "reason": "X", "progress": {"step": 1, "etaSeconds": 5}}
    new = {"phase": "Running", "progress": {"step": 2}}
    assert status.merge_patch(old, new) == {
        "phase": "Running",
        "reason": None,
        "progress": {"step": 2, "etaSeconds": None},
    }


def test_between_pod_end_and_job_verdict_the_job_stays_running() -> None:
    ftj = make_ftj()
    job = job_for(ftj, startTime=T0)  # no Complete condition yet
    st = derive(ftj, job, [pod("Succeeded", terminated={"exitCode": 0})])
    assert (st["phase"], st["reason"]) == ("Running", "Completing")
    retry = derive(ftj, job_for(ftj, failed=1), [pod("Failed", terminated={"exitCode": 137})])
    assert (retry["phase"], retry["reason"]) == ("Running", "Restarting")


@pytest.mark.parametrize(
    ("kubelet_message", "reason", "message"),
    [
        (
            'secret "s3-creds" not found',
            "SecretNotFound",
            "spec.output.credentialsSecretRef: Secret 's3-creds' not found",
        ),
        (
            "couldn't find key AWS_SECRET_ACCESS_KEY in Secret team-a/s3-creds",
            "SecretKeyMissing",
            "spec.output.credentialsSecretRef: Secret 's3-creds' has no key AWS_SECRET_ACCESS_KEY",
        ),
        (
            "couldn't find key token in Secret team-a/hf",
            "SecretKeyMissing",
            "spec.model.tokenSecretRef: Secret 'hf' has no key token",
        ),
        (
            'secret "team-s3" not found',
            "SecretNotFound",
            "the operator's default credentials Secret: Secret 'team-s3' not found",
        ),
    ],
)
def test_a_missing_secret_or_key_shows_from_the_pod_naming_both(
    kubelet_message: str, reason: str, message: str
) -> None:
    # The operator reads no Secrets: the kubelet's CreateContainerConfigError tells.
    ftj = make_ftj(model={"uri": "hf://org/m", "tokenSecretRef": {"name": "hf"}})
    waiting = {"reason": "CreateContainerConfigError", "message": kubelet_message}
    st = derive(ftj, job_for(ftj, active=1), [pod("Pending", waiting=waiting)])
    assert (st["phase"], st["reason"], st["message"]) == ("Pending", reason, message)
    # Other container-config errors keep the kubelet's words.
    other = {"reason": "CreateContainerConfigError", "message": "volume x: no such thing"}
    st = derive(ftj, job_for(ftj, active=1), [pod("Pending", waiting=other)])
    assert st["reason"] == "CreateContainerConfigError" and "no such thing" in st["message"]


def test_usage_sums_every_attempt_and_prices_gpu_hours() -> None:
    ftj = make_ftj()  # 2 GPUs per pod
    first = pod(
        "Failed",
        name="tune-trainer-a",
        terminated={"exitCode": 137, "startedAt": T0, "finishedAt": T1},
    )
    second = pod("Running", name="tune-trainer-b", running=True)
    job = job_for(ftj, active=1, failed=1)
    obs = status.Observed(
        ftj=ftj, job=job, pods=[first, second], gpu_hour_price=3.6, currency="EUR"
    )
    usage = status.derive_status(obs, T2).wire()["usage"]
    # 60 s of the first attempt, 120 s so far of the second (running since T0).
    assert usage["attempts"] == {"tune-trainer-a": 60.0, "tune-trainer-b": 120.0}
    assert (usage["wallSeconds"], usage["gpuSeconds"]) == (180.0, 360.0)
    assert (usage["estimatedCost"], usage["currency"]) == (0.36, "EUR")

    # The first attempt's pod is gone (deleted, or an operator restart forgot it): its
    # seconds stay, and the usage never shrinks.
    later = status.Observed(
        ftj=ftj, job=job, pods=[second], previous={"usage": usage}, gpu_hour_price=3.6
    )
    again = status.derive_status(later, "2026-01-01T00:03:00Z").wire()["usage"]
    assert again["attempts"] == {"tune-trainer-a": 60.0, "tune-trainer-b": 180.0}
    assert again["gpuSeconds"] == 480.0


def test_usage_has_no_cost_without_a_price_and_is_throttled_like_progress() -> None:
    ftj = make_ftj()
    running = pod("Running", name="tune-trainer-a", running=True)
    obs = status.Observed(ftj=ftj, job=job_for(ftj, active=1), pods=[running])
    first = status.derive_status(obs, T1).wire()
    assert "estimatedCost" not in first["usage"] and first["usage"]["gpuSeconds"] == 120.0
    later = status.Observed(ftj=ftj, job=obs.job, pods=[running], previous=first)
    second = status.derive_status(later, T2).wire()
    assert second["usage"] != first["usage"]
    assert not status.needs_immediate_patch(first, second)  # ticking seconds wait their turn


def test_chargeback_counters_grow_by_what_each_write_adds() -> None:
    from kubetune_operator.metrics import OperatorMetrics

    metrics = OperatorMetrics()
    first = {"gpuSeconds": 100.0, "tokensTrained": 5000, "estimatedCost": 0.1, "currency": "USD"}
    second = {"gpuSeconds": 160.0, "tokensTrained": 8000, "estimatedCost": 0.16, "currency": "USD"}
    metrics.count_usage("team-a", None, first)
    metrics.count_usage("team-a", first, second)
    metrics.count_usage("team-a", second, second)  # a write that added nothing
    metrics.count_usage("team-b", None, {"gpuSeconds": 7.0})

    def sample(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels)

    assert sample("kubetune_gpu_seconds_total", namespace="team-a") == 160.0
    assert sample("kubetune_tokens_trained_total", namespace="team-a") == 8000
    assert sample("kubetune_estimated_cost_total", namespace="team-a", currency="USD") == 0.16
    assert sample("kubetune_gpu_seconds_total", namespace="team-b") == 7.0
