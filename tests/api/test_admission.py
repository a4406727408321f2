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
    ("output-uri-parent", {"output.uri": "s3://artifacts/team-a/../"}, "spec.output.uri"),
    ("regression-uri-parent", {"evaluation": {"regressionUri": "file:///data/../etc/passwd"}}, "spec.evaluation.regressionUri"),
]  # fmt: skip


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


def test_there_are_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30
    assert len({case_id for case_id, _, _ in CASES}) == len(CASES)


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
