"""Tenant safety on the real node's cluster: the chart's guardrails profiles, the roles it
aggregates to Kubernetes' built-in ones, and the policy bounding the operator itself.

A tenant is a user bound to the built-in `edit` ClusterRole in its team namespace, as a
platform team would set one up; everything it tries goes through `kubectl --as`. Server-side
dry runs: authorization and admission run in full, and nothing is left behind for an operator
to act on. Each escape is refused by the API server with a message naming the profile key. In
a second team namespace the tenant's own compliant job trains to Succeeded under the real stack's
operator, and an image the platform does not list is failed by the operator without a Job.
"""

# ruff: noqa: E501  (the case tables read best one case per line)
from __future__ import annotations

import copy
import json
import subprocess
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
from tests.fixtures.ftj import CREDENTIALS_SECRET, add_credentials_secret, jobs_of, wait_phase
from tests.fixtures.real_node import RUN_TIMEOUT, RealStack, manifest

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROFILE: dict[str, Any] = {
    "allowedModelPrefixes": ["hf://meta-llama/", "s3://team-models/"],
    "allowedDatasetPrefixes": ["s3://team-data/", "pvc://", "hf://tatsu-lab/"],
    "allowedOutputPrefixes": ["s3://team-artifacts/"],
    "requirePinnedRevision": True,
    "allowTrustRemoteCode": False,
    "allowedImages": ["registry.internal/kubetune/"],
    "allowedSecretNames": ["team-s3", "team-hf", "team-mlflow"],
    "allowUserPlacement": False,
    "allowedPriorityClasses": ["training-low"],
    "maxGpusPerNode": 2,
    "maxNodes": 2,
    "maxTotalGpus": 3,
    "maxCpu": "8",
    "maxMemory": "64Gi",
    "maxWorkDirSize": "100Gi",
    "maxActiveDeadlineSeconds": 86400,
    "requireQueueName": True,
    "allowedMethods": ["lora"],
    "allowedClaims": ["team-claim"],
}
PLATFORM_WORK_DIR_SIZE = "40Gi"  # the chart's trainer.workDirSize: within maxWorkDirSize
TEST_LABEL = "kubetune.io/test-guardrails"
PROFILE_LABEL = "kubetune.io/guardrails-profile"


def compliant_job(name: str, namespace: str) -> dict[str, Any]:
    """Everything the profile allows, and a bit of each thing it limits."""
    job = yaml.safe_load((ROOT / "examples" / "lora-llama3-8b.yaml").read_text())
    job["metadata"] = {"name": name, "namespace": namespace}
    spec = job["spec"]
    spec.pop("tolerations")
    spec["model"].update(revision=COMMIT, tokenSecretRef={"name": "team-hf", "key": "token"})
    spec["dataset"]["uri"] = "s3://team-data/support.jsonl"
    spec["output"] = {
        "uri": "s3://team-artifacts/runs/",
        "credentialsSecretRef": {"name": "team-s3"},
    }
    spec["resources"] = {"gpus": 1, "nodes": 2, "cpu": "4", "memory": "32Gi", "workDirSize": "50Gi"}
    spec["activeDeadlineSeconds"] = 3600
    spec["queueName"] = "team-queue"
    spec["priorityClassName"] = "training-low"
    spec["image"] = "registry.internal/kubetune/trainer:1.2"
    spec["tracking"] = {
        "mlflow": {
            "uri": "https://mlflow.internal",
            "credentialsSecretRef": {"name": "team-mlflow"},
        }
    }
    return job


def with_changes(job: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`changes`: dotted paths under spec -> new value (None removes the field)."""
    changed = copy.deepcopy(job)
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        target = changed["spec"]
        for key in parents:
            target = target.setdefault(key, {})
        if value is None:
            target.pop(leaf, None)
        else:
            target[leaf] = value
    return changed


OTHER = {"name": "platform-admin-creds"}
# (case id, changes, the words the denial must contain: the key and the limit)
ESCAPES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("image-any", {"image": "evil.example/trainer:1"}, ["allowedImages", "registry.internal/kubetune/"]),
    ("image-prefix-lookalike", {"image": "registry.internal/kubetune-evil/t:1"}, ["allowedImages"]),
    ("secret-hf-token", {"model.tokenSecretRef": {**OTHER, "key": "token"}}, ["allowedSecretNames", "spec.model.tokenSecretRef platform-admin-creds", "team-s3"]),
    ("secret-s3", {"output.credentialsSecretRef": OTHER}, ["allowedSecretNames", "spec.output.credentialsSecretRef"]),
    ("secret-mlflow", {"tracking.mlflow.credentialsSecretRef": OTHER}, ["allowedSecretNames", "spec.tracking.mlflow.credentialsSecretRef"]),
    ("secret-wandb", {"tracking.wandb": {"project": "p", "apiKeySecretRef": {**OTHER, "key": "k"}}}, ["allowedSecretNames", "spec.tracking.wandb.apiKeySecretRef"]),
    ("secret-image-pull", {"imagePullSecrets": [OTHER]}, ["allowedSecretNames", "spec.imagePullSecrets"]),
    ("placement-tolerations", {"tolerations": [{"operator": "Exists"}]}, ["allowUserPlacement", "spec.tolerations"]),
    ("placement-node-selector", {"nodeSelector": {"node-role.kubernetes.io/control-plane": ""}}, ["allowUserPlacement", "spec.nodeSelector"]),
    ("placement-affinity", {"affinity": {"nodeAffinity": {}}}, ["allowUserPlacement", "spec.affinity"]),
    ("priority-class", {"priorityClassName": "system-cluster-critical"}, ["allowedPriorityClasses", "training-low"]),
    ("model-prefix", {"model.uri": "hf://mistralai/Mistral-7B-v0.3"}, ["allowedModelPrefixes", "hf://meta-llama/"]),
    ("dataset-uri", {"dataset.uri": "s3://other-team/data.jsonl"}, ["allowedDatasetPrefixes", "spec.dataset.uri", "s3://team-data/"]),
    ("validation-uri", {"dataset.validationUri": "s3://other-team/v.jsonl"}, ["allowedDatasetPrefixes", "spec.dataset.validationUri"]),
    ("evaluation-uri", {"evaluation.datasetUri": "s3://other-team/e.jsonl"}, ["allowedDatasetPrefixes", "spec.evaluation.datasetUri"]),
    ("regression-uri", {"evaluation.regressionUri": "s3://other-team/r.jsonl"}, ["allowedDatasetPrefixes", "spec.evaluation.regressionUri"]),
    ("output-prefix-lookalike", {"output.uri": "s3://team-artifacts-evil/"}, ["allowedOutputPrefixes", "s3://team-artifacts/"]),
    ("revision-pull-request", {"model.revision": "refs/pr/7"}, ["requirePinnedRevision", "refs/pr/7"]),
    ("revision-unset", {"model.revision": None}, ["requirePinnedRevision", "unset"]),
    ("hub-dataset-unpinned", {"dataset.uri": "hf://tatsu-lab/alpaca"}, ["requirePinnedRevision", "spec.dataset.uri"]),
    ("trust-remote-code", {"model.trustRemoteCode": True}, ["allowTrustRemoteCode", "false"]),
    ("gpus-per-node", {"resources.gpus": 3, "resources.nodes": 1}, ["maxGpusPerNode", "limit of 2"]),
    ("nodes", {"resources.nodes": 3}, ["maxNodes", "limit of 2"]),
    ("total-gpus", {"resources.gpus": 2}, ["maxTotalGpus", "4", "limit of 3"]),
    ("cpu", {"resources.cpu": "16"}, ["maxCpu", "limit of 8"]),
    ("memory", {"resources.memory": "128Gi"}, ["maxMemory", "limit of 64Gi"]),
    ("work-dir-size", {"resources.workDirSize": "1Ti"}, ["maxWorkDirSize", "100Gi", "got 1Ti"]),
    ("deadline", {"activeDeadlineSeconds": 172800}, ["maxActiveDeadlineSeconds", "86400", "got 172800"]),
    ("deadline-unset", {"activeDeadlineSeconds": None}, ["maxActiveDeadlineSeconds", "unset"]),
    ("queue-unset", {"queueName": None}, ["requireQueueName", "spec.queueName"]),
    ("method", {"method": "qlora"}, ["allowedMethods", "lora"]),
    ("pvc-claim", {"dataset.uri": "pvc://other-claim/data.jsonl"}, ["allowedClaims", "other-claim", "team-claim"]),
]  # fmt: skip


def dry_run_create(
    context: dict, job: dict[str, Any], as_user: str | None = None
) -> tuple[bool, str]:
    who = ["--as", as_user] if as_user else []
    result = _kubectl(
        context["kubeconfig"], *who, "create", "--dry-run=server", "-f", "-", input=json.dumps(job)
    )
    return result.returncode == 0, result.stderr.strip()


def can_i(context: dict, who: str, verb: str, resource: str, namespace: str) -> bool:
    resource, _, subresource = resource.partition("/")
    args = ["auth", "can-i", verb, resource, "--as", who, "--namespace", namespace]
    args += [f"--subresource={subresource}"] if subresource else []
    result = _kubectl(context["kubeconfig"], *args)
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), result.stderr
    return answer == "yes"


def wait_until(check: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)  # polling a condition, not synchronising on time


def runnable_profile(bucket: str) -> dict[str, Any]:
    """A profile the real stack's tiny jobs fit: its bucket's prefixes, its Secret, CPU only."""
    return {
        "allowedModelPrefixes": [f"s3://{bucket}/models/"],
        "allowedDatasetPrefixes": [f"s3://{bucket}/data/"],
        "allowedOutputPrefixes": [f"s3://{bucket}/runs/"],
        "allowedSecretNames": [CREDENTIALS_SECRET],
        "requirePinnedRevision": True,
        "allowTrustRemoteCode": False,
        "allowUserPlacement": False,
        "maxNodes": 1,
        "maxTotalGpus": 0,
        "maxCpu": "1",
        "maxMemory": "4Gi",
        "maxWorkDirSize": "10Gi",
        "maxActiveDeadlineSeconds": 3600,
        "allowedMethods": ["lora"],
    }


def runnable_job(name: str, namespace: str, bucket: str) -> dict[str, Any]:
    job = manifest(name, bucket, steps=4)
    job["metadata"]["namespace"] = namespace
    job["spec"]["resources"]["workDirSize"] = "1Gi"
    job["spec"]["activeDeadlineSeconds"] = 1800
    return job


@pytest.fixture(scope="module")
def tenancy(
    real_stack: RealStack, real_assets: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    """One more release with two profiles on the real stack's cluster (whose own release runs
    the operator); governed namespaces carry this module's test label, so other tests'
    namespaces on the shared API server are not governed."""
    helm_bin = require_binary("helm")
    kubeconfig = Path(real_stack.cluster.kubeconfig)
    suffix = uuid.uuid4().hex[:6]
    governed = {TEST_LABEL: suffix}
    ns = {
        "release": f"kt-guard-{suffix}",
        "team": f"team-{suffix}",
        "bare": f"bare-{suffix}",
        "unknown": f"unknown-{suffix}",
        "exempt": f"exempt-{suffix}",
        "run": f"run-{suffix}",
    }
    _create_namespace(kubeconfig, ns["release"])
    _create_namespace(kubeconfig, ns["team"], {**governed, PROFILE_LABEL: "strict"})
    _create_namespace(kubeconfig, ns["bare"], governed)
    _create_namespace(kubeconfig, ns["unknown"], {**governed, PROFILE_LABEL: "no-such-profile"})
    _create_namespace(kubeconfig, ns["exempt"], governed)
    _create_namespace(kubeconfig, ns["run"], {**governed, PROFILE_LABEL: "runnable"})
    add_credentials_secret(real_stack.cluster, ns["run"], dict(real_stack.s3.env))
    values = {
        "guardrails": {
            "enabled": True,
            "requireProfile": True,
            "exemptNamespaces": [ns["exempt"]],
            "namespaceSelector": {"matchLabels": governed},
            "profiles": {"strict": PROFILE, "runnable": runnable_profile(real_assets)},
        },
        "nodeSelector": {"kubetune.io/test": "never"},  # this release's operator never runs
        "trainer": {"workDirSize": PLATFORM_WORK_DIR_SIZE},
    }
    values_file = tmp_path_factory.mktemp("guardrails") / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    release = f"guard-{suffix}"
    run_helm(
        helm_bin, "install", release, str(CHART), "--kubeconfig", str(kubeconfig),
        "--namespace", ns["release"], "-f", str(values_file),
    )  # fmt: skip
    tenant, viewer = f"tenant-{suffix}", f"viewer-{suffix}"
    for user, role, namespace in (
        (tenant, "edit", ns["team"]),
        (viewer, "view", ns["team"]),
        (tenant, "edit", ns["run"]),
    ):
        bound = _kubectl(
            kubeconfig, "create", "rolebinding", f"{user}-{role}", f"--clusterrole={role}",
            f"--user={user}", "--namespace", namespace,
        )  # fmt: skip
        assert bound.returncode == 0, bound.stderr
    context = {
        "cluster": real_stack.cluster,
        "bucket": real_assets,
        "kubeconfig": kubeconfig,
        "ns": ns,
        "release": release,
        "tenant": tenant,
        "viewer": viewer,
        "operator": f"system:serviceaccount:{ns['release']}:{release}-kubetune",
    }
    # The aggregation controller and the policies' loading are asynchronous.
    wait_until(
        lambda: can_i(context, tenant, "create", "finetunejobs.kubetune.io", ns["team"]),
        "edit to aggregate the FineTuneJob rules",
    )
    probe = with_changes(compliant_job("probe", ns["team"]), {"method": "qlora"})
    wait_until(lambda: not dry_run_create(context, probe)[0], "the guardrails to be enforced")
    wait_until(
        lambda: not dry_run_create(context, compliant_job("probe", ns["bare"]))[0],
        "the profile requirement to be enforced",
    )
    yield context
    run_helm(
        helm_bin, "uninstall", release, "--kubeconfig", str(kubeconfig),
        "--namespace", ns["release"], check=False,
    )  # fmt: skip
    for name in ns.values():
        _kubectl(kubeconfig, "delete", "namespace", name, "--wait=false")


# ---- rendering -------------------------------------------------------------------------------


def test_off_by_default_and_fail_closed_when_on(tmp_path: Path) -> None:
    helm = require_binary("helm")
    default = by_kind(render(helm, tmp_path), "ValidatingAdmissionPolicyBinding")
    assert [b["metadata"]["name"] for b in default] == ["kt-kubetune-operator-bounds"]
    objects = render(helm, tmp_path, {"guardrails": {"enabled": True, "profiles": {"a": PROFILE}}})
    bindings = {
        b["metadata"]["name"]: b for b in by_kind(objects, "ValidatingAdmissionPolicyBinding")
    }
    profile = bindings["kt-kubetune-guardrails-a"]
    # The limits live in the release's namespace, and a missing one denies.
    assert profile["spec"]["paramRef"] == {
        "name": "kt-kubetune-guardrails-a",
        "namespace": "kubetune-system",
        "parameterNotFoundAction": "Deny",
    }
    [params] = [
        c
        for c in by_kind(objects, "ConfigMap")
        if c["metadata"]["name"] == "kt-kubetune-guardrails-a"
    ]
    assert params["metadata"]["namespace"] == "kubetune-system"
    assert params["data"]["maxTotalGpus"] == "3"
    assert params["data"]["allowedOutputPrefixes"] == "s3://team-artifacts/"


@pytest.mark.parametrize(
    ("profile", "words"),
    [
        ({"allowedOutputPrefixes": ["s3://team-a"]}, ["allowedOutputPrefixes"]),
        ({"maxGpus": 2}, ["maxGpus"]),
        ({"allowedMethods": ["dpo"]}, ["allowedMethods"]),
    ],
    ids=["output-prefix-without-slash", "unknown-key", "unknown-method"],
)
def test_the_chart_refuses_a_bad_profile(tmp_path: Path, profile: dict, words: list[str]) -> None:
    helm = require_binary("helm")
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"guardrails": {"enabled": True, "profiles": {"a": profile}}}))
    result = subprocess.run(
        [str(helm), "template", "x", str(CHART), "-f", str(values)], capture_output=True, text=True
    )
    assert result.returncode != 0
    for word in words:
        assert word in result.stderr, result.stderr


# ---- on a real API server, as the tenant -----------------------------------------------------


@pytest.mark.cluster
def test_a_compliant_job_is_admitted(tenancy: dict) -> None:
    job = compliant_job("ok", tenancy["ns"]["team"])
    allowed, error = dry_run_create(tenancy, job, tenancy["tenant"])
    assert allowed, error


@pytest.mark.cluster
def test_the_tenants_compliant_job_succeeds_and_an_unlisted_image_gets_no_job(
    tenancy: dict,
) -> None:
    """On the real node, created by the tenant itself: a job within its profile trains to
    Succeeded (the chart's operator, the trainer image); one naming an image the platform's
    `trainer.allowedImages` does not list passes admission (the profile names no images) and
    is failed by the operator at once, ImageNotAllowed, without a Job."""
    cluster, run_ns, tenant = tenancy["cluster"], tenancy["ns"]["run"], tenancy["tenant"]
    ok = runnable_job("compliant", run_ns, tenancy["bucket"])
    other = runnable_job("other-image", run_ns, tenancy["bucket"])
    other["spec"]["image"] = "registry.example/other/trainer:1"
    outside = with_changes(ok, {"output.uri": f"s3://{tenancy['bucket']}-evil/runs/"})
    allowed, error = dry_run_create(tenancy, outside, tenant)
    assert not allowed and "guardrail allowedOutputPrefixes" in error, error
    for job in (ok, other):
        made = _kubectl(
            tenancy["kubeconfig"], "--as", tenant, "create", "-f", "-", input=json.dumps(job)
        )
        assert made.returncode == 0, made.stderr
    refused = wait_phase(cluster, run_ns, "other-image", "Failed", timeout=60)
    assert refused["reason"] == "ImageNotAllowed", refused
    st = wait_phase(cluster, run_ns, "compliant", "Succeeded", "Failed", timeout=RUN_TIMEOUT)
    assert st["phase"] == "Succeeded", st
    jobs = [j["metadata"]["name"] for j in jobs_of(cluster, run_ns)]
    assert jobs == ["compliant-trainer"], jobs


@pytest.mark.cluster
def test_a_job_without_a_work_dir_size_gets_the_platform_default(tenancy: dict) -> None:
    # The operator gives its work dir the chart's trainer.workDirSize (tests/operator); the
    # profile's maxWorkDirSize admits it because that default fits.
    job = with_changes(
        compliant_job("unsized", tenancy["ns"]["team"]), {"resources.workDirSize": None}
    )
    allowed, error = dry_run_create(tenancy, job, tenancy["tenant"])
    assert allowed, error


def max_work_dir_rule(objects: list[dict]) -> dict:
    [policy] = [
        p
        for p in by_kind(objects, "ValidatingAdmissionPolicy")
        if any("maxWorkDirSize" in v["expression"] for v in p["spec"]["validations"])
    ]
    return next(v for v in policy["spec"]["validations"] if "maxWorkDirSize" in v["expression"])


def test_without_a_platform_default_an_unsized_job_is_denied(tmp_path: Path) -> None:
    helm = require_binary("helm")
    on = {"guardrails": {"enabled": True, "profiles": {"a": PROFILE}}}
    rule = max_work_dir_rule(render(helm, tmp_path, on))
    assert rule["expression"].rstrip().endswith(": false)"), rule  # unset: no limit, denied
    assert "the platform sets no default" in rule["messageExpression"]
    rule = max_work_dir_rule(render(helm, tmp_path, {**on, "trainer": {"workDirSize": "40Gi"}}))
    assert (
        "!quantity('40Gi').isGreaterThan(quantity(variables.p.maxWorkDirSize))"
        in rule["expression"]
    )
    assert "the platform default 40Gi is larger" in rule["messageExpression"]


@pytest.mark.cluster
@pytest.mark.parametrize(("case_id", "changes", "words"), ESCAPES, ids=[e[0] for e in ESCAPES])
def test_every_escape_is_refused_naming_the_key(
    tenancy: dict, case_id: str, changes: dict[str, Any], words: list[str]
) -> None:
    job = with_changes(compliant_job("escape", tenancy["ns"]["team"]), changes)
    allowed, error = dry_run_create(tenancy, job, tenancy["tenant"])
    assert not allowed, case_id
    assert "ValidatingAdmissionPolicy" in error and "denied" in error, error
    for word in words:
        assert word in error, error
    assert error.count("guardrail ") == 1, error  # one rule broken, one message


@pytest.mark.cluster
def test_namespaces_without_a_known_profile_are_denied(tenancy: dict) -> None:
    ns = tenancy["ns"]
    allowed, error = dry_run_create(tenancy, compliant_job("bare", ns["bare"]))
    assert not allowed and "guardrail requireProfile" in error and PROFILE_LABEL in error, error
    allowed, error = dry_run_create(tenancy, compliant_job("unknown", ns["unknown"]))
    assert not allowed and "unknown profile no-such-profile" in error, error
    # The platform's exempt namespace is not governed at all.
    free = with_changes(compliant_job("free", ns["exempt"]), {"method": "qlora", "image": None})
    allowed, error = dry_run_create(tenancy, free)
    assert allowed, error


@pytest.mark.cluster
def test_the_tenant_cannot_touch_its_limits_or_the_status(tenancy: dict) -> None:
    ns, tenant = tenancy["ns"], tenancy["tenant"]
    for verb in ("update", "patch", "delete"):
        assert not can_i(tenancy, tenant, verb, "configmaps", ns["release"])
        assert not can_i(tenancy, tenant, verb, "namespaces", ns["team"])  # its profile label
        assert not can_i(tenancy, tenant, verb, "validatingadmissionpolicies", ns["team"])
        assert not can_i(tenancy, tenant, verb, "validatingadmissionpolicybindings", ns["team"])
        assert not can_i(tenancy, tenant, verb, "finetunejobs.kubetune.io/status", ns["team"])
    # And really trying: the profile's ConfigMap stays the platform's.
    loosened = _kubectl(
        tenancy["kubeconfig"], "--as", tenant, "--namespace", ns["release"], "patch", "configmap",
        f"{tenancy['release']}-kubetune-guardrails-strict",
        "--type=merge", "-p", json.dumps({"data": {"maxGpusPerNode": "64"}}),
    )  # fmt: skip
    assert loosened.returncode != 0 and "forbidden" in loosened.stderr, loosened.stderr


@pytest.mark.cluster
def test_the_built_in_roles_get_finetunejobs(tenancy: dict) -> None:
    team, tenant, viewer = tenancy["ns"]["team"], tenancy["tenant"], tenancy["viewer"]
    for verb in ("get", "list", "watch", "create", "update", "patch", "delete"):
        assert can_i(tenancy, tenant, verb, "finetunejobs.kubetune.io", team), verb
    for verb in ("get", "list", "watch"):
        assert can_i(tenancy, viewer, verb, "finetunejobs.kubetune.io", team), verb
        assert can_i(tenancy, viewer, verb, "finetunejobs.kubetune.io/status", team), verb
    for verb in ("create", "update", "patch", "delete"):
        assert not can_i(tenancy, viewer, verb, "finetunejobs.kubetune.io", team), verb


# ---- the operator's own bounds ---------------------------------------------------------------


def operator_job(namespace: str, **pod: Any) -> dict[str, Any]:
    """A Job as the operator makes one: its labels, owned by a FineTuneJob."""
    from kubetune_operator import names

    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "bounded-trainer",
            "namespace": namespace,
            "labels": names.child_labels("bounded"),
            "ownerReferences": [
                {
                    "apiVersion": "kubetune.io/v1alpha1",
                    "kind": "FineTuneJob",
                    "name": "bounded",
                    "uid": "00000000-0000-0000-0000-000000000001",
                    "controller": True,
                }
            ],
        },
        "spec": {
            "template": {
                "metadata": {"labels": names.child_labels("bounded")},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "trainer", "image": "trainer:1"}],
                    **pod,
                },
            }
        },
    }


ESCALATIONS = [
    ("service-account", {"serviceAccountName": "admin"}, "default ServiceAccount"),
    ("host-network", {"hostNetwork": True}, "hostNetwork"),
    (
        "host-path",
        {"volumes": [{"name": "root", "hostPath": {"path": "/"}}]},
        "hostPath",
    ),
    (
        "privileged",
        {"containers": [{"name": "t", "image": "x", "securityContext": {"privileged": True}}]},
        "privileged",
    ),
    (
        "capabilities",
        {
            "containers": [
                {
                    "name": "t",
                    "image": "x",
                    "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}},
                }
            ]
        },
        "added capabilities",
    ),
]


@pytest.mark.cluster
def test_the_operator_may_create_its_trainer_jobs(tenancy: dict) -> None:
    job = operator_job(tenancy["ns"]["team"])
    allowed, error = dry_run_create(tenancy, job, tenancy["operator"])
    assert allowed, error


@pytest.mark.cluster
@pytest.mark.parametrize(("case_id", "pod", "words"), ESCALATIONS, ids=[e[0] for e in ESCALATIONS])
def test_the_operator_cannot_create_more_than_a_trainer(
    tenancy: dict, case_id: str, pod: dict, words: str
) -> None:
    job = operator_job(tenancy["ns"]["team"], **pod)
    allowed, error = dry_run_create(tenancy, job, tenancy["operator"])
    assert not allowed and "operator bounds" in error and words in error, error


@pytest.mark.cluster
def test_the_operator_cannot_create_objects_not_its_own(tenancy: dict) -> None:
    job = operator_job(tenancy["ns"]["team"])
    job["metadata"]["labels"] = {"app": "anything"}
    allowed, error = dry_run_create(tenancy, job, tenancy["operator"])
    assert not allowed and "managed-by=kubetune-operator" in error, error
    job = operator_job(tenancy["ns"]["team"])
    del job["metadata"]["ownerReferences"]
    allowed, error = dry_run_create(tenancy, job, tenancy["operator"])
    assert not allowed and "owned by a FineTuneJob" in error, error
