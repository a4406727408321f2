"""Pure parts of the operator: child manifests and the checks the schema cannot make."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from kubetune.api import contract
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune_operator import builders, names, validation
from kubetune_operator.settings import OperatorSettings

SETTINGS = OperatorSettings(
    trainer_image="registry.example/trainer:1",
    trainer_command=["kubetune-trainer"],
    progress_base_url="http://op.kubetune-system:8080",
    s3_endpoint=None,
)


def make_ftj(name: str = "tune", **spec: object) -> dict:
    base = {
        "model": {"uri": "s3://models/tiny-llama"},
        "dataset": {"uri": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/runs/", "credentialsSecretRef": {"name": "s3-creds"}},
        "resources": {"gpus": 2, "cpu": "4", "memory": "32Gi"},
    }
    base.update(spec)
    manifest = FineTuneJob.model_validate(
        {"metadata": {"name": name, "namespace": "team-a"}, "spec": base}
    ).wire()
    manifest["metadata"].update(uid="uid-1234", generation=1)
    return manifest


def env_of(job: dict) -> dict[str, dict]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in container["env"]}


def test_job_runs_the_trainer_with_the_agreed_failure_policy_and_limits() -> None:
    ftj = make_ftj(backoffLimit=5, activeDeadlineSeconds=3600)
    job = builders.build_job(ftj, SETTINGS)
    assert job["metadata"]["name"] == "tune-trainer"
    assert job["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "name": "tune",
            "uid": "uid-1234",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    spec = job["spec"]
    assert spec["backoffLimit"] == 5 and spec["activeDeadlineSeconds"] == 3600
    assert spec["suspend"] is False
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {
            "containerName": "trainer",
            "operator": "In",
            "values": [contract.EXIT_BAD_INPUT],
        },
    }
    assert rules[1]["action"] == "Ignore"
    assert rules[1]["onPodConditions"][0]["type"] == "DisruptionTarget"
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["image"] == "registry.example/trainer:1"
    assert container["command"] == ["kubetune-trainer"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "32Gi"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["runAsUser"] == 1000
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/kubetune"]["readOnly"] is True
    assert "/dev/shm" in mounts and "/workspace" in mounts
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"


def test_defaults_backoff_two_and_no_gpu_limit_for_cpu_jobs() -> None:
    job = builders.build_job(make_ftj(resources={"gpus": 0}), SETTINGS)
    assert job["spec"]["backoffLimit"] == 2
    assert "activeDeadlineSeconds" not in job["spec"]
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits


def test_credentials_only_through_secret_refs() -> None:
    ftj = make_ftj(model={"uri": "hf://org/m", "tokenSecretRef": {"name": "hf", "key": "tok"}})
    env = env_of(builders.build_job(ftj, SETTINGS, frozenset({"AWS_ACCESS_KEY_ID"})))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": key}
        assert "value" not in env[key]
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "tok"}
    token = env[contract.ENV_PROGRESS_TOKEN]["valueFrom"]["secretKeyRef"]
    assert token == {"name": "tune-progress", "key": "token"}
    assert env[contract.ENV_PROGRESS_URL]["value"] == (
        "http://op.kubetune-system:8080/v1/progress/team-a/tune"
    )
    assert env[contract.ENV_JOB_CONFIG]["value"] == "/etc/kubetune/job.yaml"
    # The Secret has no endpoint key and the operator has no default: no endpoint at all.
    assert "AWS_ENDPOINT_URL" not in env


def test_operator_endpoint_fills_in_only_when_the_secret_has_none() -> None:
    settings = SETTINGS.model_copy(update={"s3_endpoint": "http://minio:9000"})
    ftj = make_ftj()
    without = env_of(builders.build_job(ftj, settings, frozenset(builders.REQUIRED_S3_KEYS)))
    assert without["AWS_ENDPOINT_URL"] == {"name": "AWS_ENDPOINT_URL", "value": "http://minio:9000"}
    keys = frozenset({*builders.REQUIRED_S3_KEYS, "AWS_ENDPOINT_URL"})
    with_key = env_of(builders.build_job(ftj, settings, keys))
    assert with_key["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"


def test_scheduling_fields_pass_through() -> None:
    ftj = make_ftj(
        nodeSelector={"gpu": "h100"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        affinity={"nodeAffinity": {"x": 1}},
        priorityClassName="training",
        imagePullSecrets=[{"name": "regcred"}],
        image="my/trainer:2",
    )
    pod = builders.build_job(ftj, SETTINGS)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["affinity"] == {"nodeAffinity": {"x": 1}}
    assert pod["priorityClassName"] == "training"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["containers"][0]["image"] == "my/trainer:2"


def test_queue_label_makes_a_suspended_job_with_the_label() -> None:
    ftj = make_ftj()
    ftj["metadata"]["labels"] = {names.LABEL_QUEUE: "gpu-queue"}
    job = builders.build_job(ftj, SETTINGS)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][names.LABEL_QUEUE] == "gpu-queue"
    by_spec = builders.build_job(make_ftj(queueName="q2"), SETTINGS)
    assert by_spec["metadata"]["labels"][names.LABEL_QUEUE] == "q2"
    assert by_spec["spec"]["suspend"] is True


def test_suspend_in_spec_creates_the_job_suspended() -> None:
    assert builders.build_job(make_ftj(suspend=True), SETTINGS)["spec"]["suspend"] is True


def test_pvc_uris_mount_claims_read_only_for_inputs() -> None:
    ftj = make_ftj(
        model={"uri": "pvc://models/llama"},
        dataset={"uri": "pvc://data/train.jsonl"},
        output={"uri": "pvc://results/out"},
    )
    pod = builders.build_job(ftj, SETTINGS)["spec"]["template"]["spec"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"models": True, "data": True, "results": False}
    mounts = {m["mountPath"]: m.get("readOnly") for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/mnt/pvc/models"] is True and mounts["/mnt/pvc/results"] is False


def test_config_map_holds_the_resolved_manifest_the_trainer_can_load() -> None:
    cm = builders.build_config_map(make_ftj())
    assert cm["metadata"]["name"] == "tune-config"
    manifest = yaml.safe_load(cm["data"]["job.yaml"])
    parsed = FineTuneJob.model_validate(manifest)
    assert parsed.spec.lora is not None and parsed.spec.lora.r == 16  # defaults filled in
    assert parsed.metadata.namespace == "team-a"
    assert "status" not in manifest and "uid" not in manifest["metadata"]


def test_token_secret() -> None:
    secret = builders.build_token_secret(make_ftj(), "s3cr3t")
    assert secret["metadata"]["name"] == "tune-progress"
    assert secret["stringData"] == {"token": "s3cr3t"}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1234"


def test_long_names_are_shortened_stably_to_63_characters() -> None:
    long = "a" * 80
    first, second = names.job_name(long), names.job_name(long)
    assert first == second and len(first) <= 63 and first.endswith("-trainer")
    assert names.job_name("a" * 79 + "b") != first
    assert len(names.child_labels(long)[names.LABEL_FINETUNEJOB]) <= 63


def test_spec_hashes_tell_which_fields_changed_and_ignore_suspend() -> None:
    ftj = make_ftj()
    recorded = json.loads(
        builders.build_job(ftj, SETTINGS)["metadata"]["annotations"][names.ANNOTATION_SPEC_HASHES]
    )
    edited = copy.deepcopy(ftj["spec"])
    edited["suspend"] = True
    assert builders.changed_fields(recorded, edited) == []
    edited["training"]["learningRate"] = 0.1
    edited["backoffLimit"] = 7
    assert builders.changed_fields(recorded, edited) == ["backoffLimit", "training"]


# --- validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "billions"),
    [
        ("hf://meta-llama/Llama-3.1-8B-Instruct", 8),
        ("hf://mistralai/Mixtral-8x7B-v0.1", 56),
        ("s3://models/qwen2.5-0.5b/", 0.5),
        ("hf://meta-llama/Llama-2-70b-hf", 70),
        ("s3://models/tiny-llama", None),
        ("hf://org/bert-base", None),
    ],
)
def test_model_size_from_uri(uri: str, billions: float | None) -> None:
    assert validation.model_size_billions(uri) == billions


def test_gpu_plausibility() -> None:
    full70 = make_ftj(model={"uri": "hf://meta-llama/Llama-2-70b-hf"}, method="full")
    full70["spec"]["resources"]["gpus"] = 1
    problem = validation.validate(full70["spec"], SETTINGS, {"s3-creds": frozenset()})
    assert problem is not None and problem.phase == "Failed"
    assert problem.reason == "InsufficientGPUs"
    assert "70B" in problem.message and "spec.resources.gpus >=" in problem.message
    qlora7 = make_ftj(model={"uri": "hf://org/llama-7b"}, method="qlora")
    qlora7["spec"]["resources"]["gpus"] = 1
    assert validation.check_gpus(qlora7["spec"], SETTINGS) is None
    lora70_8 = make_ftj(model={"uri": "hf://org/llama-70b"}, method="lora")
    lora70_8["spec"]["resources"]["gpus"] = 8
    assert validation.check_gpus(lora70_8["spec"], SETTINGS) is None


def test_uri_schemes_and_bucket_prefixes() -> None:
    ftj = make_ftj(dataset={"uri": "file:///etc/passwd"})
    problem = validation.check_uris(ftj["spec"], SETTINGS)
    assert problem and problem.phase == "Failed" and problem.reason == "URISchemeNotAllowed"
    assert problem.message.startswith("spec.dataset.uri: file://")
    restricted = SETTINGS.model_copy(update={"allowed_s3_prefixes": ["s3://models/", "s3://data/"]})
    problem = validation.check_uris(make_ftj()["spec"], restricted)
    assert problem and problem.reason == "URINotAllowed"
    assert problem.message.startswith("spec.output.uri: s3://out/runs/")


def test_missing_secrets_and_keys_leave_the_job_pending() -> None:
    spec = make_ftj(model={"uri": "hf://o/m", "tokenSecretRef": {"name": "hf"}})["spec"]
    problem = validation.check_secrets(spec, {})
    assert problem and problem.phase == "Pending" and problem.reason == "SecretNotFound"
    assert "'s3-creds'" in problem.message
    problem = validation.check_secrets(spec, {"s3-creds": frozenset({"AWS_ACCESS_KEY_ID"})})
    assert problem and problem.reason == "SecretKeyMissing"
    assert "AWS_SECRET_ACCESS_KEY" in problem.message
    creds = frozenset(builders.REQUIRED_S3_KEYS)
    problem = validation.check_secrets(spec, {"s3-creds": creds, "hf": frozenset({"x"})})
    assert (
        problem and "spec.model.tokenSecretRef" in problem.message and "'token'" in problem.message
    )
    assert validation.check_secrets(spec, {"s3-creds": creds, "hf": frozenset({"token"})}) is None


def test_settings_from_env() -> None:
    env = {
        "KUBETUNE_OPERATOR_NAMESPACES": "a, b",
        "KUBETUNE_OPERATOR_PATCH_INTERVAL_S": "2.5",
        "KUBETUNE_OPERATOR_TRAINER_COMMAND": "python -m kubetune_trainer",
        "KUBETUNE_OPERATOR_ALLOWED_SCHEMES": "s3,file",
    }
    settings = OperatorSettings.from_env(env, listen_port=9999)
    assert settings.namespaces == ["a", "b"]
    assert settings.patch_interval_s == 2.5
    assert settings.trainer_command == ["python", "-m", "kubetune_trainer"]
    assert settings.allowed_schemes == ["s3", "file"]
    assert settings.effective_progress_base_url == "http://127.0.0.1:9999"
