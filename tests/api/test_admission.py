"""Malformed FineTuneJobs are refused at admission, each with the field named.

Every case is sent to a real API server holding the generated CRD (server-side dry run, so
admission and schema validation run in full and nothing is stored), and also to the same
pydantic model `kubetune run` and the trainer use: both must refuse it, naming the field.
"""

# ruff: noqa: E501  (the case table reads best one case per line)
from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kubetune.api import v1alpha1 as api
from kubetune.api.errors import describe_validation_error
from tests.fixtures.operator import install_crd

ROOT = Path(__file__).resolve().parents[2]
DELETE = object()  # remove the field

BASE: dict[str, Any] = {
    "apiVersion": f"{api.GROUP}/{api.VERSION}",
    "kind": "FineTuneJob",
    "metadata": {"name": "admission-case", "namespace": "default"},
    "spec": {
        "model": {"uri": "hf://meta-llama/Meta-Llama-3-8B-Instruct"},
        "method": "lora",
        "dataset": {"uri": "s3://datasets/support.jsonl"},
        "output": {"uri": "s3://artifacts/", "credentialsSecretRef": {"name": "s3"}},
    },
}

# (case id, {dotted path under spec: new value}, the field the refusal must name)
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("model-uri-scheme", {"model.uri": "http://example.com/model"}, "spec.model.uri"),
    ("model-uri-empty", {"model.uri": ""}, "spec.model.uri"),
    ("model-missing", {"model": DELETE}, "spec.model"),
    ("model-token-ref-no-name", {"model.tokenSecretRef": {"key": "token"}}, "spec.model.tokenSecretRef.name"),
    ("model-trust-not-bool", {"model.trustRemoteCode": "yes"}, "spec.model.trustRemoteCode"),
    ("method-unknown", {"method": "dpo"}, "spec.method"),
    ("lora-rank-zero", {"lora": {"r": 0}}, "spec.lora.r"),
    ("lora-rank-huge", {"lora": {"r": 5000}}, "spec.lora.r"),
    ("lora-alpha-zero", {"lora": {"alpha": 0}}, "spec.lora.alpha"),
    ("lora-dropout-one", {"lora": {"dropout": 1.0}}, "spec.lora.dropout"),
    ("lora-no-target-modules", {"lora": {"targetModules": []}}, "spec.lora.targetModules"),
    ("lora-with-full", {"method": "full", "lora": {"r": 8}}, "spec.lora"),
    ("quantization-with-lora", {"quantization": {"bits": 4}}, "spec.quantization"),
    ("quantization-8-bit", {"method": "qlora", "quantization": {"bits": 8}}, "spec.quantization.bits"),
    ("quantization-type", {"method": "qlora", "quantization": {"quantType": "int4"}}, "spec.quantization.quantType"),
    ("dataset-uri-scheme", {"dataset.uri": "ftp://host/data.jsonl"}, "spec.dataset.uri"),
    ("dataset-missing", {"dataset": DELETE}, "spec.dataset"),
    ("dataset-format", {"dataset.format": "sharegpt"}, "spec.dataset.format"),
    ("validation-split-one", {"dataset.validationSplit": 1.0}, "spec.dataset.validationSplit"),
    ("validation-split-negative", {"dataset.validationSplit": -0.1}, "spec.dataset.validationSplit"),
    ("epochs-zero", {"training": {"epochs": 0}}, "spec.training.epochs"),
    ("learning-rate-negative", {"training": {"learningRate": -1}}, "spec.training.learningRate"),
    ("learning-rate-above-one", {"training": {"learningRate": 2}}, "spec.training.learningRate"),
    ("scheduler-unknown", {"training": {"lrScheduler": "step"}}, "spec.training.lrScheduler"),
    ("batch-size-zero", {"training": {"batchSize": 0}}, "spec.training.batchSize"),
    ("batch-size-text", {"training": {"batchSize": "four"}}, "spec.training.batchSize"),
    ("seq-length-tiny", {"training": {"maxSeqLength": 8}}, "spec.training.maxSeqLength"),
    ("warmup-too-long", {"training": {"warmupRatio": 0.9}}, "spec.training.warmupRatio"),
    ("keep-no-checkpoint", {"training": {"checkpointsToKeep": 0}}, "spec.training.checkpointsToKeep"),
    ("training-typo", {"training": {"learningrate": 1e-4}}, "spec.training.learningrate"),
    ("output-to-hub", {"output.uri": "hf://org/name"}, "spec.output.uri"),
    ("output-uri-credentials", {"output.uri": "s3://AKIA:secret@bucket/runs/"}, "spec.output.uri"),
    ("dataset-uri-credentials", {"dataset.uri": "s3://user@bucket/data.jsonl"}, "spec.dataset.uri"),
    ("mlflow-uri-credentials", {"tracking": {"mlflow": {"uri": "https://u:p@mlflow.example"}}}, "spec.tracking.mlflow.uri"),
    ("output-missing", {"output": DELETE}, "spec.output"),
    ("output-secret-empty", {"output.credentialsSecretRef": {"name": ""}}, "spec.output.credentialsSecretRef.name"),
    ("gpus-negative", {"resources": {"gpus": -1}}, "spec.resources.gpus"),
    ("gpus-too-many", {"resources": {"gpus": 65}}, "spec.resources.gpus"),
    ("memory-words", {"resources": {"memory": "lots"}}, "spec.resources.memory"),
    ("cpu-words", {"resources": {"cpu": "two"}}, "spec.resources.cpu"),
    ("regex-without-pattern", {"evaluation": {"format": {"type": "regex"}}}, "spec.evaluation.format"),
    ("threshold-above-one", {"evaluation": {"thresholds": {"minTokenF1": 1.5}}}, "spec.evaluation.thresholds.minTokenF1"),
    ("max-new-tokens-zero", {"evaluation": {"maxNewTokens": 0}}, "spec.evaluation.maxNewTokens"),
    ("backoff-negative", {"backoffLimit": -1}, "spec.backoffLimit"),
    ("deadline-zero", {"activeDeadlineSeconds": 0}, "spec.activeDeadlineSeconds"),
    ("spec-typo", {"resource": {"gpus": 1}}, "spec.resource"),
    ("model-uri-parent", {"model.uri": "pvc://models/../../etc"}, "spec.model.uri"),
    ("dataset-uri-parent", {"dataset.uri": "s3://data/team-a/../team-b/x.jsonl"}, "spec.dataset.uri"),
    ("gguf-quantization-unknown", {"output.gguf": {"quantizations": ["q4_k_m"]}}, "spec.output.gguf.quantizations"),
    ("gguf-quantization-twice", {"output.gguf": {"quantizations": ["f16", "q8_0", "f16"]}}, "spec.output.gguf.quantizations"),
    ("gguf-no-quantization", {"output.gguf": {"quantizations": []}}, "spec.output.gguf.quantizations"),
    ("output-uri-parent", {"output.uri": "s3://artifacts/team-a/../"}, "spec.output.uri"),
    ("lora-init-unknown", {"lora": {"init": "corda"}}, "spec.lora.init"),
    ("eva-with-dpo", {"objective": "dpo", "lora": {"init": "eva"}}, "spec.lora.init"),
    ("loftq-without-qlora", {"lora": {"init": "loftq"}}, "spec.lora.init"),
    ("loftq-on-cpu", {"method": "qlora", "lora": {"init": "loftq"}, "resources": {"gpus": 0}}, "spec.lora.init"),
    ("pissa-on-4-bit", {"method": "qlora", "lora": {"init": "pissa"}}, "spec.lora.init"),
    ("dora-with-olora", {"lora": {"useDora": True, "init": "olora"}}, "spec.lora"),
    ("optimizer-unknown", {"training": {"optimizer": "sgd"}}, "spec.training.optimizer"),
    ("neftune-zero", {"training": {"neftuneNoiseAlpha": 0}}, "spec.training.neftuneNoiseAlpha"),
    ("split-without-packing", {"training": {"packing": False, "packingStrategy": "bfd_split"}}, "spec.training"),
    ("liger-on-cpu", {"training": {"ligerKernels": True}, "resources": {"gpus": 0}}, "spec.training.ligerKernels"),
    ("regression-uri-parent", {"evaluation": {"regressionUri": "file:///data/../etc/passwd"}}, "spec.evaluation.regressionUri"),
    ("objective-unknown", {"objective": "ppo"}, "spec.objective"),
    ("preference-with-sft", {"preference": {"beta": 0.2}}, "spec.preference"),
    ("orpo-reference-model", {"objective": "orpo", "preference": {"referenceModel": "live"}}, "spec.preference.referenceModel"),
    ("dpo-kto-loss", {"objective": "dpo", "preference": {"lossType": "kto"}}, "spec.preference.lossType"),
    ("beta-zero", {"objective": "dpo", "preference": {"beta": 0}}, "spec.preference.beta"),
    ("grpo-without-rewards", {"objective": "grpo"}, "spec.rewards"),
    ("rewards-with-dpo", {"objective": "dpo", "rewards": [{"type": "json"}]}, "spec.rewards"),
    ("reward-regex-without-pattern", {"objective": "grpo", "rewards": [{"type": "regex"}]}, "spec.rewards"),
    ("grpo-generations-too-many", {"objective": "grpo", "rewards": [{"type": "json"}], "grpo": {"numGenerations": 65}}, "spec.grpo.numGenerations"),
    ("grpo-batch-not-multiple", {"objective": "grpo", "rewards": [{"type": "json"}], "grpo": {"numGenerations": 3}}, "spec.grpo.numGenerations"),
    ("objective-with-format", {"objective": "dpo", "dataset.format": "chat"}, "spec.dataset.format"),
    ("strategy-unknown", {"distributed": {"strategy": "zero3"}}, "spec.distributed.strategy"),
    ("wandb-no-project", {"tracking": {"wandb": {"entity": "team"}}}, "spec.tracking.wandb.project"),
    ("suspend-text", {"suspend": "yes"}, "spec.suspend"),
    ("dry-run-text", {"dryRun": "yes"}, "spec.dryRun"),
    ("dry-run-dpo", {"objective": "dpo", "dryRun": True}, "spec.dryRun"),
    ("grace-zero", {"terminationGracePeriodSeconds": 0}, "spec.terminationGracePeriodSeconds"),
]  # fmt: skip


# Valid combinations of the training options: admitted by both.
ADMITTED: list[tuple[str, dict[str, Any]]] = [
    ("qlora-loftq-dora", {"method": "qlora", "lora": {"init": "loftq", "useDora": True, "useRslora": True}}),
    ("lora-pissa-rslora", {"lora": {"init": "pissa", "useRslora": True}}),
    ("qlora-eva", {"method": "qlora", "lora": {"init": "eva"}}),
    ("options", {"training": {"optimizer": "paged_adamw_8bit", "neftuneNoiseAlpha": 5.0, "packingStrategy": "bfd_split", "ligerKernels": True}}),
    ("cpu-liger-off", {"training": {"ligerKernels": False}, "resources": {"gpus": 0}}),
    ("dry-run-of-a-gang", {"dryRun": True, "resources": {"gpus": 8, "nodes": 2}}),
    ("gguf-qlora", {"method": "qlora", "output.gguf": {"quantizations": ["f16", "bf16", "q8_0", "f32"]}}),
]  # fmt: skip
# Spec sections without a case: what they take is Kubernetes's own shape, passed through to the
# pod (placement, pull secrets, priority class) or a name only an object elsewhere checks
# (image, queue).
UNCASED_SECTIONS = {
    "affinity",
    "nodeSelector",
    "tolerations",
    "imagePullSecrets",
    "priorityClassName",
    "image",
    "queueName",
}
# Cases about a field the schema does not have (a typo), by id.
UNKNOWN_FIELD_CASES = {"training-typo", "spec-typo"}


def malformed(changes: dict[str, Any]) -> dict[str, Any]:
    manifest = copy.deepcopy(BASE)
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        target = manifest["spec"]
        for key in parents:
            target = target.setdefault(key, {})
        if value is DELETE:
            target.pop(leaf, None)
        else:
            target[leaf] = value
    return manifest


def _declared(path: str) -> bool:
    """Whether `spec.a.b` is a field of the FineTuneJob models (the CRD is generated from them)."""
    model: Any = api.FineTuneJobSpec
    for name in path.split(".")[1:]:
        fields = getattr(model, "model_fields", None)
        if not fields or name not in fields:
            return False
        annotation = fields[name].annotation
        args = [a for a in getattr(annotation, "__args__", ()) if hasattr(a, "model_fields")]
        model = args[0] if args else annotation
    return True


def test_the_cases_reach_every_spec_section_and_name_declared_fields() -> None:
    """A new spec section gets a case (or a reason in UNCASED_SECTIONS), and a case's field
    cannot drift from the models unnoticed (it would then pass for the wrong reason)."""
    assert len({case_id for case_id, _, _ in CASES}) == len(CASES)
    sections = {field.split(".")[1] for _, _, field in CASES}
    assert set(api.FineTuneJobSpec.model_fields) - UNCASED_SECTIONS - sections == set()
    for case_id, _, field in CASES:
        assert _declared(field) != (case_id in UNKNOWN_FIELD_CASES), (case_id, field)


def test_the_base_manifest_is_valid() -> None:
    api.FineTuneJob.model_validate(BASE)


@pytest.mark.parametrize(("case_id", "changes", "field"), CASES, ids=[c[0] for c in CASES])
def test_local_validation_refuses_naming_the_field(
    case_id: str, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as error:
        api.FineTuneJob.model_validate(malformed(changes))
    message = describe_validation_error(error.value, "job.yaml")
    assert "\n" not in message
    assert field in message, message


@pytest.fixture(scope="module")
def admission(k8s_cluster: Any) -> Any:
    install_crd(k8s_cluster)
    return k8s_cluster


@pytest.mark.cluster
def test_the_api_server_admits_the_base_manifest(admission: Any) -> None:
    allowed, error = dry_run_create(admission, BASE)
    assert allowed, error


@pytest.mark.parametrize(("case_id", "changes"), ADMITTED, ids=[c[0] for c in ADMITTED])
def test_valid_options_pass_local_validation(case_id: str, changes: dict[str, Any]) -> None:
    api.FineTuneJob.model_validate(malformed(changes))


@pytest.mark.cluster
@pytest.mark.parametrize(("case_id", "changes"), ADMITTED, ids=[c[0] for c in ADMITTED])
def test_the_api_server_admits_valid_options(
    admission: Any, case_id: str, changes: dict[str, Any]
) -> None:
    allowed, error = dry_run_create(admission, malformed(changes))
    assert allowed, error


@pytest.mark.cluster
@pytest.mark.parametrize(("case_id", "changes", "field"), CASES, ids=[c[0] for c in CASES])
def test_the_api_server_refuses_naming_the_field(
    admission: Any, case_id: str, changes: dict[str, Any], field: str
) -> None:
    allowed, error = dry_run_create(admission, malformed(changes))
    assert not allowed, f"{case_id} was admitted"
    assert field in error, error


def dry_run_create(cluster: Any, manifest: dict[str, Any]) -> tuple[bool, str]:
    """`kubectl create --dry-run=server` with strict field validation (kubectl's default)."""
    result = subprocess.run(
        [
            str(cluster.bin_dir / "kubectl"),
            f"--kubeconfig={cluster.kubeconfig}",
            "create",
            "--dry-run=server",
            "--validate=strict",
            "-f",
            "-",
        ],
        input=yaml.safe_dump(manifest),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode == 0, result.stderr.strip() or json.dumps(result.stdout)
