"""Pure parts of the operator: the Job manifest and the checks the schema cannot make."""

from __future__ import annotations

import json

import pytest

from kubetune.api import contract
from kubetune.api.contract import Reason
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune_operator import __main__ as operator_main
from kubetune_operator import builders, names, validation
from kubetune_operator.settings import OperatorSettings, Toleration

SETTINGS = OperatorSettings(
    trainer_image="registry.example/trainer:1",
    trainer_command=["kubetune-trainer"],
    progress_base_url="http://op.kubetune-system:8080",
    s3_endpoint=None,
)


def make_ftj(name: str = "tune", labels: dict | None = None, **spec: object) -> FineTuneJob:
    """A validated FineTuneJob, as the operator's cache holds it."""
    base = {
        "model": {"uri": "s3://models/tiny-llama"},
        "dataset": {"uri": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/runs/", "credentialsSecretRef": {"name": "s3-creds"}},
        "resources": {"gpus": 2, "cpu": "4", "memory": "32Gi"},
    }
    base.update(spec)
    meta = {"name": name, "namespace": "team-a", "uid": "uid-1234", "generation": 1}
    return FineTuneJob.model_validate({"metadata": {**meta, "labels": labels}, "spec": base})


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
            "values": [contract.EXIT_BAD_INPUT, contract.EXIT_EVAL_THRESHOLDS],
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
    assert mounts[contract.PROGRESS_TOKEN_DIR]["readOnly"] is True
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
    env = env_of(builders.build_job(ftj, SETTINGS))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": key}
        assert "value" not in env[key]
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "tok"}
    assert env[contract.ENV_PROGRESS_URL]["value"] == (
        "http://op.kubetune-system:8080/v1/progress/team-a/tune"
    )
    assert env[contract.ENV_JOB_CONFIG]["value"] == "/etc/kubetune/job.json"
    # The Secret's endpoint, if it has one; the operator has none to offer.
    assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True
    # Nothing else names a Secret: no per-job Secret, no ConfigMap.
    sources = [e["valueFrom"] for e in env.values() if "valueFrom" in e]
    refs = [source["secretKeyRef"]["name"] for source in sources if "secretKeyRef" in source]
    assert set(refs) == {"s3-creds", "hf"}
    # The other sources read the pod itself (a gang's node rank: its completion index).
    assert {k for source in sources for k in source} <= {"secretKeyRef", "fieldRef"}


def test_job_is_the_only_object_and_carries_everything_the_trainer_reads() -> None:
    ftj = make_ftj(nodeSelector={"gpu": "h100"})
    job = builders.build_job(ftj, SETTINGS)
    pod = job["spec"]["template"]["spec"]
    volume_kinds = {v["name"]: set(v) - {"name"} for v in pod["volumes"]}
    assert volume_kinds == {
        "job": {"downwardAPI"},
        "progress-token": {"projected"},
        "work": {"emptyDir"},
        "shm": {"emptyDir"},
    }
    # The resolved job, in the annotation the downward-API volume turns into job.json.
    (item,) = next(v for v in pod["volumes"] if v["name"] == "job")["downwardAPI"]["items"]
    assert item == {
        "path": "job.json",
        "fieldRef": {"fieldPath": "metadata.annotations['kubetune.io/job']"},
    }
    document = json.loads(job["spec"]["template"]["metadata"]["annotations"]["kubetune.io/job"])
    parsed = FineTuneJob.model_validate(document)
    assert parsed.spec.lora is not None and parsed.spec.lora.r == 16  # defaults filled in
    assert parsed.metadata.name == "tune" and parsed.metadata.namespace == "team-a"
    assert "uid" not in document["metadata"] and "status" not in document
    assert "nodeSelector" not in document["spec"]  # placement is the pod's, not the trainer's


def test_progress_token_is_projected_for_the_operators_audience_only() -> None:
    pod = builders.build_job(make_ftj(), SETTINGS)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False  # no token for the API server
    (source,) = next(v for v in pod["volumes"] if v["name"] == "progress-token")["projected"][
        "sources"
    ]
    assert source == {
        "serviceAccountToken": {
            "audience": "kubetune.io/progress",
            "expirationSeconds": 600,
            "path": "token",
        }
    }
    env = env_of(builders.build_job(make_ftj(), SETTINGS))
    assert env[contract.ENV_PROGRESS_TOKEN_FILE]["value"] == (
        "/var/run/secrets/kubetune.io/progress/token"
    )
    assert contract.ENV_PROGRESS_TOKEN not in env


def test_operator_endpoint_comes_first_so_the_secrets_own_wins() -> None:
    settings = SETTINGS.model_copy(update={"s3_endpoint": "http://minio:9000"})
    container = builders.build_job(make_ftj(), settings)["spec"]["template"]["spec"]
    endpoint = [e for e in container["containers"][0]["env"] if e["name"] == "AWS_ENDPOINT_URL"]
    # The kubelet: a later entry of the same name wins; an absent optional key is skipped.
    assert endpoint == [
        {"name": "AWS_ENDPOINT_URL", "value": "http://minio:9000"},
        {
            "name": "AWS_ENDPOINT_URL",
            "valueFrom": {
                "secretKeyRef": {"name": "s3-creds", "key": "AWS_ENDPOINT_URL", "optional": True}
            },
        },
    ]


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
    ftj = make_ftj(labels={names.LABEL_QUEUE: "gpu-queue"})
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
    edited = builders.spec_dict(ftj)
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
    one_gpu = {"gpus": 1}
    full70 = make_ftj(
        model={"uri": "hf://meta-llama/Llama-2-70b-hf"}, method="full", resources=one_gpu
    )
    problem = validation.validate(full70, SETTINGS)
    assert problem is not None and problem.phase == "Failed"
    assert problem.reason == Reason.INSUFFICIENT_GPUS
    assert "70B" in problem.message and "spec.resources.gpus >=" in problem.message
    qlora7 = make_ftj(model={"uri": "hf://org/llama-7b"}, method="qlora", resources=one_gpu)
    assert validation.check_gpus(qlora7.spec, SETTINGS) is None
    # DDP replicates: an adapter on a 70B base needs the whole base on each of the 8 GPUs.
    lora70_8 = make_ftj(model={"uri": "hf://org/llama-70b"}, method="lora", resources={"gpus": 8})
    problem = validation.check_gpus(lora70_8.spec, SETTINGS)
    assert problem is not None and "replicated on each of 8 GPU(s)" in problem.message
    assert "use method: qlora" in problem.message
    qlora70_8 = make_ftj(model={"uri": "hf://org/llama-70b"}, method="qlora", resources={"gpus": 8})
    assert validation.check_gpus(qlora70_8.spec, SETTINGS) is None


def test_gpu_plausibility_with_fsdp_sharding() -> None:
    """Full fine-tuning of 70B (~1.25 TiB with optimizer state): FSDP over one node of 8 GPUs
    does not fit 80 GiB GPUs (~156 GiB each); over 2 x 8 it does. The advice names a gang
    that fits."""
    settings = SETTINGS.model_copy(update={"gpu_memory_gib": 80.0})
    full70 = {"model": {"uri": "hf://meta-llama/Llama-2-70b-hf"}, "method": "full"}
    small = make_ftj(**full70, resources={"gpus": 8})
    problem = validation.check_gpus(small.spec, settings)
    assert problem is not None and "sharded (fsdp) over 8 GPU(s)" in problem.message
    assert "spec.resources.nodes >= 2" in problem.message, problem.message
    big = make_ftj(**full70, resources={"gpus": 8, "nodes": 2})
    assert validation.check_gpus(big.spec, settings) is None
    ddp = make_ftj(**full70, resources={"gpus": 8, "nodes": 2}, distributed={"strategy": "ddp"})
    problem = validation.check_gpus(ddp.spec, settings)
    assert problem is not None and "replicated" in problem.message
    assert "spec.distributed.strategy: fsdp" in problem.message


def test_uri_schemes_and_bucket_prefixes() -> None:
    ftj = make_ftj(dataset={"uri": "file:///etc/passwd"})
    problem = validation.check_uris(ftj.spec, SETTINGS)
    assert problem and problem.phase == "Failed" and problem.reason == "URISchemeNotAllowed"
    assert problem.message.startswith("spec.dataset.uri: file://")
    restricted = SETTINGS.model_copy(update={"allowed_s3_prefixes": ["s3://models/", "s3://data/"]})
    problem = validation.check_uris(make_ftj().spec, restricted)
    assert problem and problem.reason == "URINotAllowed"
    assert problem.message.startswith("spec.output.uri: s3://out/runs/")


def test_a_job_too_large_for_the_annotation_is_refused_naming_the_field() -> None:
    # The format's JSON Schema is free-form: the one part the CRD cannot bound.
    schema = {
        "type": "object",
        "properties": {f"field{i}": {"type": "string"} for i in range(9000)},
    }
    ftj = make_ftj(evaluation={"format": {"type": "jsonSchema", "schema": schema}})
    problem = validation.check_size(ftj, builders.build_job(ftj, SETTINGS))
    assert problem and problem.phase == "Failed" and problem.reason == Reason.SPEC_TOO_LARGE
    assert "shorten spec.evaluation.format.schema" in problem.message
    assert validation.check_size(make_ftj(), builders.build_job(make_ftj(), SETTINGS)) is None


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


# --- operator defaults for trainer pods --------------------------------------------------

GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
DEFAULTS = SETTINGS.model_copy(
    update={
        "default_node_selector": {"nvidia.com/gpu.present": "true"},
        "default_tolerations": [Toleration(**GPU_TAINT)],
        "default_credentials_secret": "team-s3",
        "s3_region": "eu-west-1",
    }
)


# What every trainer pod tolerates of a lost node (the operator's node_lost_toleration_s).
LOST_NODE = [
    {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60}
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
]


def pod_of(ftj: FineTuneJob, settings: OperatorSettings = DEFAULTS) -> dict:
    return builders.build_job(ftj, settings)["spec"]["template"]["spec"]


def test_default_placement_applies_when_the_job_sets_none() -> None:
    pod = pod_of(make_ftj())
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [GPU_TAINT, *LOST_NODE]
    # Without defaults the pod carries no placement but the lost-node tolerations.
    bare = pod_of(make_ftj(), SETTINGS)
    assert "nodeSelector" not in bare and bare["tolerations"] == LOST_NODE


def test_a_jobs_own_placement_replaces_the_defaults() -> None:
    own_toleration = {"key": "team-a", "operator": "Equal", "value": "yes", "effect": "NoExecute"}
    pod = pod_of(make_ftj(nodeSelector={"pool": "a100"}, tolerations=[own_toleration]))
    assert pod["nodeSelector"] == {"pool": "a100"}  # replaced, not merged
    assert pod["tolerations"] == [own_toleration, *LOST_NODE]
    # Setting only one of them keeps the default of the other.
    only_selector = pod_of(make_ftj(nodeSelector={"pool": "a100"}))
    assert only_selector["tolerations"] == [GPU_TAINT, *LOST_NODE]


def test_queued_jobs_get_no_default_placement() -> None:
    pod = pod_of(make_ftj(queueName="gpu-small"))
    assert "nodeSelector" not in pod and pod["tolerations"] == LOST_NODE
    own = pod_of(make_ftj(queueName="gpu-small", nodeSelector={"pool": "a100"}))
    assert own["nodeSelector"] == {"pool": "a100"}


def test_lost_node_tolerations_yield_to_the_jobs_own_and_can_be_turned_off() -> None:
    # A job that names one of the taints keeps its own seconds for it; the other is added.
    patient = {
        "key": "node.kubernetes.io/unreachable",
        "operator": "Exists",
        "effect": "NoExecute",
        "tolerationSeconds": 900,
    }
    pod = pod_of(make_ftj(tolerations=[patient]))
    assert pod["tolerations"] == [patient, LOST_NODE[0]]
    # A job that tolerates every taint gets nothing added.
    everything = {"operator": "Exists"}
    assert pod_of(make_ftj(tolerations=[everything]))["tolerations"] == [everything]
    # Unset: Kubernetes's own default (300 s, added by the API server) applies.
    off = SETTINGS.model_copy(update={"node_lost_toleration_s": None})
    assert "tolerations" not in pod_of(make_ftj(), off)
    quick = SETTINGS.model_copy(update={"node_lost_toleration_s": 15})
    assert {t["tolerationSeconds"] for t in pod_of(make_ftj(), quick)["tolerations"]} == {15}
    env = {"KUBETUNE_OPERATOR_NODE_LOST_TOLERATION_S": ""}
    assert OperatorSettings.from_env(env).node_lost_toleration_s is None


def test_work_dir_size_limits_the_work_volume() -> None:
    volumes = {v["name"]: v for v in pod_of(make_ftj(), SETTINGS)["volumes"]}
    assert volumes["work"]["emptyDir"] == {}  # unset: no limit
    spec = {"gpus": 0, "workDirSize": "20Mi"}
    volumes = {v["name"]: v for v in pod_of(make_ftj(resources=spec), SETTINGS)["volumes"]}
    assert volumes["work"]["emptyDir"] == {"sizeLimit": "20Mi"}
    # The chart's trainer.workDirSize bounds a job that sets none; the job's own wins.
    bounded = SETTINGS.model_copy(update={"default_work_dir_size": "50Gi"})
    volumes = {v["name"]: v for v in pod_of(make_ftj(), bounded)["volumes"]}
    assert volumes["work"]["emptyDir"] == {"sizeLimit": "50Gi"}
    volumes = {v["name"]: v for v in pod_of(make_ftj(resources=spec), bounded)["volumes"]}
    assert volumes["work"]["emptyDir"] == {"sizeLimit": "20Mi"}
    env = {"KUBETUNE_OPERATOR_DEFAULT_WORK_DIR_SIZE": "50Gi"}
    assert OperatorSettings.from_env(env).default_work_dir_size == "50Gi"
    with pytest.raises(ValueError, match="default_work_dir_size"):
        OperatorSettings.from_env({"KUBETUNE_OPERATOR_DEFAULT_WORK_DIR_SIZE": "lots"})


def test_default_credentials_secret_for_s3_jobs_without_their_own() -> None:
    no_ref = make_ftj(output={"uri": "s3://out/runs/"})
    env = env_of(builders.build_job(no_ref, DEFAULTS))
    for key in builders.REQUIRED_S3_KEYS:
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "team-s3", "key": key}
    # The job's own Secret wins.
    env = env_of(builders.build_job(make_ftj(), DEFAULTS))
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    # A job that touches no s3:// URI gets no S3 keys at all (the Secret may not exist).
    pvc_only = make_ftj(
        model={"uri": "hf://org/m"},
        dataset={"uri": "pvc://data/train.jsonl"},
        output={"uri": "pvc://results/out"},
    )
    assert "AWS_ACCESS_KEY_ID" not in env_of(builders.build_job(pvc_only, DEFAULTS))
    # An s3:// input alone is enough.
    s3_model = make_ftj(model={"uri": "s3://models/m/"}, output={"uri": "pvc://results/out"})
    assert builders.credentials_secret(s3_model.spec, DEFAULTS) == "team-s3"


def test_only_the_s3_variables_may_repeat_with_the_secrets_value_last() -> None:
    settings = DEFAULTS.model_copy(update={"s3_endpoint": "http://minio:9000"})
    env = builders.build_job(make_ftj(), settings)["spec"]["template"]["spec"]["containers"][0]
    names_in_order = [e["name"] for e in env["env"]]
    repeated = {n for n in names_in_order if names_in_order.count(n) > 1}
    assert repeated == {"AWS_ENDPOINT_URL", "AWS_REGION"}
    for name in repeated:
        first, last = [e for e in env["env"] if e["name"] == name]
        assert "value" in first and last["valueFrom"]["secretKeyRef"]["optional"] is True


def test_trainer_root_filesystem_is_read_only_and_scratch_goes_to_the_work_dir() -> None:
    pod = pod_of(make_ftj(), SETTINGS)
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = env_of(builders.build_job(make_ftj(), SETTINGS))
    # Every path the trainer writes to is a volume: TMPDIR and caches in the work dir.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for var in ("TMPDIR", "XDG_CACHE_HOME", contract.ENV_WORK_DIR):
        path = env[var]["value"]
        mount = max((m for m in mounts if path == m or path.startswith(m + "/")), key=len)
        assert not mounts[mount].get("readOnly"), (var, mount)
        assert "emptyDir" in volumes[mounts[mount]["name"]], (var, mount)
    off = SETTINGS.model_copy(update={"trainer_read_only_root": False})
    assert (
        pod_of(make_ftj(), off)["containers"][0]["securityContext"]["readOnlyRootFilesystem"]
        is False
    )


def test_structured_settings_from_env_and_flags() -> None:
    env = {
        "KUBETUNE_OPERATOR_DEFAULT_NODE_SELECTOR": '{"nvidia.com/gpu.present": "true"}',
        "KUBETUNE_OPERATOR_DEFAULT_TOLERATIONS": json.dumps([GPU_TAINT]),
        "KUBETUNE_OPERATOR_DEFAULT_CREDENTIALS_SECRET": "team-s3",
        "KUBETUNE_OPERATOR_S3_REGION": "eu-west-1",
        "KUBETUNE_OPERATOR_TRAINER_READ_ONLY_ROOT": "false",
        "KUBETUNE_OPERATOR_S3_ENDPOINT": "",  # empty = unset
    }
    settings = OperatorSettings.from_env(env)
    assert settings.default_node_selector == {"nvidia.com/gpu.present": "true"}
    assert [t.manifest() for t in settings.default_tolerations] == [GPU_TAINT]
    assert settings.default_credentials_secret == "team-s3"
    assert settings.s3_region == "eu-west-1"
    assert settings.trainer_read_only_root is False
    assert settings.s3_endpoint is None
    empty = OperatorSettings.from_env(
        {"KUBETUNE_OPERATOR_DEFAULT_NODE_SELECTOR": "", "KUBETUNE_OPERATOR_DEFAULT_TOLERATIONS": ""}
    )
    assert empty.default_node_selector == {} and empty.default_tolerations == []

    args = operator_main.build_parser().parse_args(
        ["--default-node-selector", '{"pool": "a100"}', "--s3-region", "us-east-2"]
    )
    with_flags = operator_main.settings_from_args(args)
    assert with_flags.default_node_selector == {"pool": "a100"}
    assert with_flags.s3_region == "us-east-2"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        (
            {"KUBETUNE_OPERATOR_DEFAULT_NODE_SELECTOR": "gpu=h100"},
            "KUBETUNE_OPERATOR_DEFAULT_NODE_SELECTOR: expected a JSON object",
        ),
        (
            {"KUBETUNE_OPERATOR_DEFAULT_TOLERATIONS": '[{"key": "x"'},
            "KUBETUNE_OPERATOR_DEFAULT_TOLERATIONS: not valid JSON",
        ),
        (
            {"KUBETUNE_OPERATOR_DEFAULT_TOLERATIONS": '[{"key": "x", "effect": "Never"}]'},
            "default_tolerations[0].effect: Input should be 'NoSchedule'",
        ),
    ],
)
def test_bad_settings_fail_in_one_line_naming_the_setting(env: dict, fragment: str) -> None:
    from kubetune_operator.settings import describe_error

    with pytest.raises(ValueError) as error:
        OperatorSettings.from_env(env)
    message = describe_error(error.value)
    assert fragment in message and "\n" not in message


def test_operator_exits_with_the_one_line_error(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("KUBETUNE_OPERATOR_DEFAULT_TOLERATIONS", "not json")
    with pytest.raises(SystemExit) as exited:
        operator_main.main([])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kubetune-operator: invalid settings")
    assert "KUBETUNE_OPERATOR_DEFAULT_TOLERATIONS: expected a JSON list" in err
    assert "\n" not in err


def test_kopf_scans_the_cluster_only_when_serving_all_namespaces() -> None:
    # Listed namespaces: no cluster-scoped listing of namespaces or CRDs (RBAC has none).
    assert operator_main.kopf_settings(
        SETTINGS.model_copy(update={"namespaces": ["a"]})
    ).scanning.disabled
    assert not operator_main.kopf_settings(SETTINGS).scanning.disabled


def test_every_setting_has_a_flag_that_reads_like_its_variable() -> None:
    parser = operator_main.build_parser()
    flags = {a.dest: a.option_strings for a in parser._actions if a.option_strings}
    assert set(OperatorSettings.model_fields) <= set(flags)
    argv = [
        "-n", "a", "--namespace", "b",
        "--trainer-command", "python -m kubetune_trainer",
        "--allowed-schemes", "s3,pvc",
        "--default-tolerations", json.dumps([GPU_TAINT]),
        "--patch-interval", "2.5",
        "--progress-token-ttl-s", "900",
        "--trainer-read-only-root", "false",
    ]  # fmt: skip
    settings = operator_main.settings_from_args(parser.parse_args(argv))
    assert settings.namespaces == ["a", "b"]
    assert settings.trainer_command == ["python", "-m", "kubetune_trainer"]
    assert settings.allowed_schemes == ["s3", "pvc"]
    assert [t.manifest() for t in settings.default_tolerations] == [GPU_TAINT]
    assert settings.patch_interval_s == 2.5 and settings.progress_token_ttl_s == 900
    assert settings.trainer_read_only_root is False
    with pytest.raises(ValueError, match="--default-node-selector: expected a JSON object"):
        operator_main.settings_from_args(parser.parse_args(["--default-node-selector", "gpu=h100"]))


def test_tracking_credentials_come_only_from_the_named_secrets() -> None:
    tracking = {
        "mlflow": {"uri": "http://mlflow:5000", "credentialsSecretRef": {"name": "mlf"}},
        "wandb": {"project": "p", "apiKeySecretRef": {"name": "wb", "key": "apiKey"}},
    }
    env = env_of(builders.build_job(make_ftj(tracking=tracking), SETTINGS))
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {
            "name": "mlf",
            "key": key,
            "optional": True,
        }
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "wb", "key": "apiKey"}
    assert not any("value" in e for name, e in env.items() if "MLFLOW" in name or "WANDB" in name)
    untracked = env_of(builders.build_job(make_ftj(), SETTINGS))
    assert not any("MLFLOW" in name or "WANDB" in name for name in untracked)
