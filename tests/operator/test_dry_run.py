"""spec.dryRun in the operator: one pod without a GPU runs the trainer's data stage, and a
passed run ends in phase Validated with the preview's totals in the status."""

from __future__ import annotations

import json

from kubetune.api import contract
from kubetune.api.contract import Reason
from kubetune.api.v1alpha1 import TERMINAL_PHASES
from kubetune_operator import builders, grace, status
from kubetune_operator.settings import Toleration
from tests.operator.test_builders import SETTINGS, env_of, make_ftj
from tests.operator.test_status import T0, T1, T2, job_for, pod

GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
GPU_NODES = SETTINGS.model_copy(
    update={
        "default_node_selector": {"nvidia.com/gpu.present": "true"},
        "default_tolerations": [Toleration(**GPU_TAINT)],
        "default_cpu": "1",
        "default_memory": "3Gi",
    }
)
PREVIEW = {
    "uri": "s3://out/runs/team-a/tune/preview.json",
    "format": "chat",
    "trainRows": 90,
    "validationRows": 5,
    "tokens": 4000,
    "trainedTokens": 1500,
    "truncatedRows": 2,
    "excludedRows": 1,
    "excludedExamples": ["train.jsonl: row 7"],
    "packing": True,
    "sequences": 12,
    "packingEfficiency": 0.91,
    "stepsPerEpoch": 6,
    "parameters": 1000000,
}


def gang(**spec: object):
    """A two-node, eight-GPU job with a big request: what a dry run must not ask for."""
    resources = {"gpus": 8, "nodes": 2, "cpu": "64", "memory": "512Gi"}
    return make_ftj(resources=resources, **spec)


def pod_spec(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def test_a_dry_run_is_one_pod_without_a_gpu_gpu_placement_or_gang() -> None:
    real = builders.build_job(gang(), GPU_NODES)
    dry = builders.build_job(gang(dryRun=True), GPU_NODES)
    # The same job without dryRun is a GPU gang (the contrast the dry run removes).
    assert real["spec"]["completions"] == 2 and pod_spec(real).get("subdomain")
    container = pod_spec(real)["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert contract.ENV_NNODES in env_of(real)

    spec = dry["spec"]
    assert "completions" not in spec and "completionMode" not in spec
    assert "parallelism" not in spec and "subdomain" not in pod_spec(dry)
    assert builders.build_service(dry) is None and builders.build_gang_network_policy(dry) is None
    container = pod_spec(dry)["containers"][0]
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "3Gi"},  # the operator's defaults, not 64 / 512Gi
        "limits": {"memory": "3Gi"},
    }
    assert "nvidia.com/gpu" not in json.dumps(dry)  # no request, selector or toleration
    env = env_of(dry)
    assert not {contract.ENV_NNODES, contract.ENV_NPROC_PER_NODE} & set(env)
    assert spec["backoffLimit"] == 2  # spec.backoffLimit, not x nodes
    # Nothing to checkpoint: the chart's floor, no size-based grace period.
    assert pod_spec(dry)["terminationGracePeriodSeconds"] == SETTINGS.trainer_grace_seconds
    assert grace.grace_too_short(gang(dryRun=True).spec, GPU_NODES) is None
    # The trainer reads spec.dryRun from its copy of the job; the real shape is kept there, so
    # steps per epoch and the memory estimate describe the real run.
    annotations = dry["spec"]["template"]["metadata"]["annotations"]
    document = json.loads(annotations[contract.JOB_ANNOTATION])
    assert document["spec"]["dryRun"] is True
    assert document["spec"]["resources"] | {"gpus": 8, "nodes": 2} == document["spec"]["resources"]


def test_a_dry_run_keeps_the_jobs_own_placement() -> None:
    selector = {"pool": "cpu"}
    dry = builders.build_job(gang(dryRun=True, nodeSelector=selector), GPU_NODES)
    assert pod_spec(dry)["nodeSelector"] == selector


def dry_run_done(ftj, result: contract.TrainerResult) -> status.Observed:
    done = {
        "exitCode": 0,
        "reason": "Completed",
        "message": result.model_dump_json(exclude_none=True),
        "startedAt": T0,
        "finishedAt": T1,
    }
    return status.Observed(
        ftj=ftj,
        job=job_for(ftj, conditions=[("Complete", "", "")], startTime=T0, completionTime=T1),
        pods=[pod("Succeeded", terminated=done)],
    )


def test_a_passed_dry_run_is_validated_with_its_totals_and_no_gpu_time() -> None:
    ftj = gang(dryRun=True)
    result = contract.TrainerResult(preview=PREVIEW, message=PREVIEW["uri"])
    derived = status.derive_status(dry_run_done(ftj, result), T2)
    assert derived.phase == "Validated" and "Validated" in TERMINAL_PHASES
    assert derived.reason == Reason.DRY_RUN_PASSED
    assert derived.preview.model_dump(exclude_none=True) == PREVIEW
    assert "90 training rows" in derived.message and PREVIEW["uri"] in derived.message
    assert "2 truncated, 1 excluded" in derived.message
    assert derived.completionTime and not derived.artifacts and not derived.metrics
    assert derived.usage.gpuSeconds == 0  # 8 GPUs asked for training, none for the dry run
    conditions = {c.type: c.status for c in derived.conditions}
    assert conditions["Succeeded"] == "False" and conditions["Failed"] == "False"
    # Terminal: once the Job is gone the outcome stands.
    again = status.derive_status(status.Observed(ftj=ftj, previous=derived.wire()), T2)
    assert again.phase == "Validated" and again.preview == derived.preview


def test_the_same_completion_without_dry_run_is_succeeded() -> None:
    derived = status.derive_status(dry_run_done(gang(), contract.TrainerResult()), T2)
    assert derived.phase == "Succeeded" and derived.preview is None


def test_a_dry_run_that_finds_bad_input_fails_at_once_naming_the_row() -> None:
    ftj = gang(dryRun=True)
    message = "train.jsonl: row 3: no 'messages', 'text' or 'instruction' field"
    ended = {"exitCode": contract.EXIT_BAD_INPUT, "message": message, "finishedAt": T1}
    job = job_for(ftj, conditions=[("Failed", "PodFailurePolicy", "")], failed=1)
    derived = status.derive_status(
        status.Observed(ftj=ftj, job=job, pods=[pod("Failed", terminated=ended)]), T2
    )
    assert (derived.phase, derived.reason) == ("Failed", Reason.BAD_INPUT)
    assert "row 3" in derived.message and derived.preview is None
