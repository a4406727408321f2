"""Guardrails: the chart's ValidatingAdmissionPolicy, on a real API server.

A namespace's limits are a ConfigMap in that namespace; the API server itself denies a
FineTuneJob that breaks one, with a message naming the rule and the limit. Namespaces
without the ConfigMap are not restricted. Server-side dry runs: admission runs in full, and
nothing is left behind for an operator to act on.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.test_helm import (
    CHART,
    _create_namespace,
    _kubectl,
    by_kind,
    render,
    require_binary,
    run_helm,
)

ROOT = Path(__file__).resolve().parents[2]
LIMITS = {
    "allowedModelPrefixes": "hf://meta-llama/, s3://team-models/",
    "allowedOutputPrefixes": "s3://team-artifacts/",
    "allowedMethods": "lora, full",
    "maxGpusPerNode": "2",
    "maxNodes": "1",
    "maxActiveDeadlineSeconds": "86400",
    "requireQueueName": "true",
}


def compliant_job(name: str, namespace: str) -> dict[str, Any]:
    job = yaml.safe_load((ROOT / "examples" / "lora-llama3-8b.yaml").read_text())
    job["metadata"] = {"name": name, "namespace": namespace}
    job["spec"]["output"]["uri"] = "s3://team-artifacts/runs/"
    job["spec"]["activeDeadlineSeconds"] = 3600
    job["spec"]["queueName"] = "team-queue"
    return job


def with_change(job: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(job)
    *parents, leaf = path.split(".")
    target = changed["spec"]
    for key in parents:
        target = target.setdefault(key, {})
    if value is None:
        target.pop(leaf, None)
    else:
        target[leaf] = value
    return changed


# (what is changed, new value, the words the denial must contain)
VIOLATIONS = [
    ("model.uri", "hf://mistralai/Mistral-7B-v0.3", ["allowedModelPrefixes", "hf://meta-llama/"]),
    ("output.uri", "s3://someone-else/", ["allowedOutputPrefixes", "s3://team-artifacts/"]),
    ("method", "qlora", ["allowedMethods", "lora, full"]),
    ("resources.gpus", 4, ["maxGpusPerNode", "limit of 2"]),
    ("activeDeadlineSeconds", 172800, ["maxActiveDeadlineSeconds", "86400", "got 172800"]),
    ("activeDeadlineSeconds", None, ["maxActiveDeadlineSeconds", "86400", "unset"]),
    ("queueName", None, ["requireQueueName", "spec.queueName"]),
]


def dry_run_create(kubeconfig: Path, job: dict[str, Any]) -> tuple[bool, str]:
    result = _kubectl(kubeconfig, "create", "--dry-run=server", "-f", "-", input=json.dumps(job))
    return result.returncode == 0, result.stderr.strip()


@pytest.fixture(scope="module")
def guarded(k8s_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    helm_bin = require_binary("helm")
    kubeconfig = Path(k8s_cluster.kubeconfig)
    suffix = uuid.uuid4().hex[:6]
    ns = {"release": f"kt-guard-{suffix}", "team": f"guarded-{suffix}", "free": f"free-{suffix}"}
    for name in ns.values():
        _create_namespace(kubeconfig, name)
    values = tmp_path_factory.mktemp("guardrails") / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {"guardrails": {"enabled": True}, "nodeSelector": {"kubetune.io/test": "never"}}
        )
    )
    release = f"guard-{suffix}"
    run_helm(
        helm_bin, "install", release, str(CHART), "--kubeconfig", str(kubeconfig),
        "--namespace", ns["release"], "-f", str(values),
    )  # fmt: skip
    limits = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "kubetune-guardrails", "namespace": ns["team"]},
        "data": LIMITS,
    }
    applied = _kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps(limits))
    assert applied.returncode == 0, applied.stderr
    context = {"kubeconfig": kubeconfig, "ns": ns}
    wait_until_enforced(context)
    yield context
    run_helm(
        helm_bin, "uninstall", release, "--kubeconfig", str(kubeconfig),
        "--namespace", ns["release"], check=False,
    )  # fmt: skip
    for name in ns.values():
        _kubectl(kubeconfig, "delete", "namespace", name, "--wait=false")


def wait_until_enforced(context: dict, timeout: float = 60) -> None:
    """The API server loads a new policy and its binding asynchronously."""
    probe = with_change(compliant_job("probe", context["ns"]["team"]), "method", "qlora")
    deadline = time.monotonic() + timeout
    while True:
        allowed, _ = dry_run_create(context["kubeconfig"], probe)
        if not allowed:
            return
        assert time.monotonic() < deadline, "the guardrails policy was never enforced"
        time.sleep(0.5)  # polling the condition, not synchronising on time


def test_disabled_by_default_and_rendered_when_enabled(tmp_path: Path) -> None:
    helm = require_binary("helm")
    assert not by_kind(render(helm, tmp_path), "ValidatingAdmissionPolicy")
    objects = render(helm, tmp_path, {"guardrails": {"enabled": True}})
    [policy] = by_kind(objects, "ValidatingAdmissionPolicy")
    [binding] = by_kind(objects, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["paramRef"]["parameterNotFoundAction"] == "Allow"
    # Status writes (the operator's) are not FineTuneJob writes: the policy leaves them alone.
    assert policy["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["finetunejobs"]


@pytest.mark.cluster
def test_a_compliant_job_is_admitted(guarded: dict) -> None:
    allowed, error = dry_run_create(
        guarded["kubeconfig"], compliant_job("ok", guarded["ns"]["team"])
    )
    assert allowed, error


@pytest.mark.cluster
@pytest.mark.parametrize(("path", "value", "words"), VIOLATIONS, ids=[v[0] for v in VIOLATIONS])
def test_a_violation_is_denied_naming_the_rule_and_the_limit(
    guarded: dict, path: str, value: Any, words: list[str]
) -> None:
    job = with_change(compliant_job("bad", guarded["ns"]["team"]), path, value)
    allowed, error = dry_run_create(guarded["kubeconfig"], job)
    assert not allowed
    assert "ValidatingAdmissionPolicy" in error and "denied" in error, error
    for word in words:
        assert word in error, error
    # One rule broken, one message: the other rules stay quiet.
    assert error.count("guardrail ") == 1, error


@pytest.mark.cluster
def test_a_namespace_without_limits_is_unaffected(guarded: dict) -> None:
    job = with_change(compliant_job("free", guarded["ns"]["free"]), "method", "qlora")
    job = with_change(job, "resources.gpus", 8)
    job = with_change(job, "queueName", None)
    allowed, error = dry_run_create(guarded["kubeconfig"], job)
    assert allowed, error
