"""Pure functions from a FineTuneJob to the manifests of its children.

Nothing here talks to the API server: the handlers call these and send the result, and
the unit tests check the manifests directly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import yaml

from kubetune.api import contract
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune_operator import names
from kubetune_operator.settings import OperatorSettings

_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
CONFIG_MOUNT = "/etc/kubetune"
WORK_DIR = contract.DEFAULT_WORK_DIR
PVC_ROOT = "/mnt/pvc"  # the trainer maps pvc://claim/path to $KUBETUNE_PVC_ROOT/claim/path
ENV_PVC_ROOT = "KUBETUNE_PVC_ROOT"

# With a read-only root filesystem the trainer writes only to its volumes: temporary files
# and tool caches (Hugging Face, torch, pip...) go to the work dir. The trainer image sets
# HF_HOME, TRITON_CACHE_DIR and MPLCONFIGDIR under it too (Dockerfile.trainer).
TMP_DIR = WORK_DIR
CACHE_DIR = f"{WORK_DIR}/.cache"

REQUIRED_S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_S3_KEYS = ("AWS_ENDPOINT_URL", "AWS_REGION")
# Spec fields whose change does not touch the work already running.
_LIFECYCLE_FIELDS = ("suspend",)


@dataclass(frozen=True)
class Children:
    """Everything the operator creates for one FineTuneJob."""

    config_map: dict[str, Any]
    token_secret: dict[str, Any]
    job: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def _meta(ftj: dict, name: str, **extra: Any) -> dict[str, Any]:
    meta = {
        "name": name,
        "namespace": ftj["metadata"]["namespace"],
        "labels": names.child_labels(ftj["metadata"]["name"]),
        "ownerReferences": [names.owner_reference(ftj)],
    }
    meta.update(extra)
    return meta


def resolved_manifest(ftj: dict) -> dict[str, Any]:
    """The FineTuneJob with every default filled in, as the trainer will read it."""
    meta = ftj["metadata"]
    model = FineTuneJob.model_validate(
        {
            "apiVersion": ftj.get("apiVersion", "kubetune.io/v1alpha1"),
            "kind": "FineTuneJob",
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                **({"labels": meta["labels"]} if meta.get("labels") else {}),
            },
            "spec": ftj["spec"],
        }
    )
    return model.wire()


def build_config_map(ftj: dict) -> dict[str, Any]:
    # The C dumper (when libyaml is there) is ~3x faster; this runs once per FineTuneJob.
    text = yaml.dump(resolved_manifest(ftj), Dumper=_YAML_DUMPER, sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(ftj, names.config_map_name(ftj["metadata"]["name"])),
        "data": {names.CONFIG_KEY: text},
    }


def build_token_secret(ftj: dict, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _meta(ftj, names.token_secret_name(ftj["metadata"]["name"])),
        "stringData": {names.TOKEN_KEY: token},
    }


def spec_hashes(spec: dict) -> dict[str, str]:
    """A short hash of each top-level spec field, to tell later which fields changed."""
    return {
        key: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]
        for key, value in sorted(spec.items())
        if key not in _LIFECYCLE_FIELDS
    }


def changed_fields(recorded: dict[str, str], spec: dict) -> list[str]:
    current = spec_hashes(spec)
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))


def pvc_claims(ftj: dict) -> dict[str, bool]:
    """Claims named by pvc:// URIs -> whether the trainer needs to write to it."""
    spec = ftj["spec"]
    read = [
        spec["model"]["uri"],
        spec["dataset"]["uri"],
        spec["dataset"].get("validationUri"),
        (spec.get("evaluation") or {}).get("datasetUri"),
        (spec.get("evaluation") or {}).get("regressionUri"),
    ]
    claims: dict[str, bool] = {}
    for uri in read:
        if uri and uri.startswith("pvc://"):
            claims.setdefault(urlparse(uri).netloc, False)
    out = spec["output"]["uri"]
    if out.startswith("pvc://"):
        claims[urlparse(out).netloc] = True
    return claims


def uses_s3(spec: dict) -> bool:
    """Whether any URI of the job (model, data, evaluation, output) is s3://."""
    evaluation = spec.get("evaluation") or {}
    uris = [
        spec["model"]["uri"],
        spec["dataset"]["uri"],
        spec["dataset"].get("validationUri"),
        evaluation.get("datasetUri"),
        evaluation.get("regressionUri"),
        spec["output"]["uri"],
    ]
    return any(uri and uri.lower().startswith("s3://") for uri in uris)


def credentials_secret(spec: dict, settings: OperatorSettings) -> str | None:
    """The S3 credentials Secret of a job: its own credentialsSecretRef, else the operator's
    default when the job touches S3 at all (a pvc:// or hf:// job needs no S3 keys)."""
    own = (spec["output"].get("credentialsSecretRef") or {}).get("name")
    if own:
        return own
    if settings.default_credentials_secret and uses_s3(spec):
        return settings.default_credentials_secret
    return None


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def build_env(
    ftj: dict, settings: OperatorSettings, credential_keys: frozenset[str] | None
) -> list[dict[str, Any]]:
    """Trainer environment. Credentials only as secretKeyRef, never as values.

    `credential_keys` are the keys present in the credentials Secret (None: unknown), so
    the operator's default S3 endpoint and region fill in only when the Secret has none.
    """
    meta, spec = ftj["metadata"], ftj["spec"]
    progress_url = (
        f"{settings.effective_progress_base_url}/v1/progress/{meta['namespace']}/{meta['name']}"
    )
    env: list[dict[str, Any]] = [
        {"name": contract.ENV_JOB_CONFIG, "value": f"{CONFIG_MOUNT}/{names.CONFIG_KEY}"},
        {"name": contract.ENV_WORK_DIR, "value": WORK_DIR},
        {"name": contract.ENV_TERMINATION_LOG, "value": contract.DEFAULT_TERMINATION_LOG},
        {"name": contract.ENV_PROGRESS_URL, "value": progress_url},
        _secret_env(
            contract.ENV_PROGRESS_TOKEN, names.token_secret_name(meta["name"]), names.TOKEN_KEY
        ),
        {"name": ENV_PVC_ROOT, "value": PVC_ROOT},
        # Unbuffered output so `kubetune logs` shows progress as it happens.
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "TMPDIR", "value": TMP_DIR},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
    ]
    creds = credentials_secret(spec, settings)
    from_secret: set[str] = set()
    if creds:
        env += [_secret_env(key, creds, key) for key in REQUIRED_S3_KEYS]
        for key in OPTIONAL_S3_KEYS:
            if credential_keys is None or key in credential_keys:
                env.append(_secret_env(key, creds, key, optional=True))
                from_secret.add(key)
    defaults = {"AWS_ENDPOINT_URL": settings.s3_endpoint, "AWS_REGION": settings.s3_region}
    env += [
        {"name": key, "value": value}
        for key, value in defaults.items()
        if value and key not in from_secret
    ]
    token_ref = spec["model"].get("tokenSecretRef")
    if token_ref:
        env.append(
            _secret_env(contract.ENV_HF_TOKEN, token_ref["name"], token_ref.get("key", "token"))
        )
    return env


def build_resources(spec: dict, settings: OperatorSettings) -> dict[str, Any]:
    res = spec.get("resources") or {}
    gpus = res.get("gpus", 1)
    memory = res.get("memory") or settings.default_memory
    requests = {"cpu": res.get("cpu") or settings.default_cpu, "memory": memory}
    limits: dict[str, Any] = {"memory": memory}
    if gpus:
        # Extended resources: the limit is the request.
        limits["nvidia.com/gpu"] = str(gpus)
    return {"requests": requests, "limits": limits}


def placement(ftj: dict, settings: OperatorSettings) -> dict[str, Any]:
    """nodeSelector and tolerations of the trainer pod.

    The job's own value replaces the operator's default (no merging, so a job can always
    opt out of a default). Kueue-queued jobs get no defaults: their ResourceFlavor injects
    its node labels and tolerations, and a default could contradict it.
    """
    spec = ftj["spec"]
    queued = names.queue_name(ftj) is not None
    node_selector = spec.get("nodeSelector") or (
        {} if queued else dict(settings.default_node_selector)
    )
    tolerations = spec.get("tolerations") or (
        [] if queued else [t.manifest() for t in settings.default_tolerations]
    )
    out: dict[str, Any] = {}
    if node_selector:
        out["nodeSelector"] = node_selector
    if tolerations:
        out["tolerations"] = tolerations
    return out


def build_pod_spec(
    ftj: dict, settings: OperatorSettings, credential_keys: frozenset[str] | None = None
) -> dict[str, Any]:
    spec = ftj["spec"]
    name = ftj["metadata"]["name"]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "work", "mountPath": WORK_DIR},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": names.config_map_name(name)}},
        {"name": "work", "emptyDir": {}},
        {
            "name": "shm",
            "emptyDir": {
                "medium": "Memory",
                "sizeLimit": (spec.get("resources") or {}).get("shmSize", "8Gi"),
            },
        },
    ]
    for i, (claim, writable) in enumerate(sorted(pvc_claims(ftj).items())):
        volume = f"pvc-{i}"
        volumes.append(
            {
                "name": volume,
                "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable},
            }
        )
        mounts.append(
            {"name": volume, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": not writable}
        )
    container = {
        "name": names.TRAINER_CONTAINER,
        "image": spec.get("image") or settings.trainer_image,
        "imagePullPolicy": "IfNotPresent",
        "command": list(settings.trainer_command),
        "env": build_env(ftj, settings, credential_keys),
        "resources": build_resources(spec, settings),
        "volumeMounts": mounts,
        "terminationMessagePath": contract.DEFAULT_TERMINATION_LOG,
        # A crash without a message still tells the user something: the log's tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": settings.trainer_read_only_root,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "fsGroup": settings.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    pod.update(placement(ftj, settings))
    for key in ("affinity", "priorityClassName"):
        if spec.get(key):
            pod[key] = spec[key]
    if spec.get("imagePullSecrets"):
        pod["imagePullSecrets"] = [{"name": s["name"]} for s in spec["imagePullSecrets"]]
    return pod


def build_job(
    ftj: dict, settings: OperatorSettings, credential_keys: frozenset[str] | None = None
) -> dict[str, Any]:
    spec = ftj["spec"]
    name = ftj["metadata"]["name"]
    queue = names.queue_name(ftj)
    labels = names.child_labels(name)
    job_labels = {**labels, **({names.LABEL_QUEUE: queue} if queue else {})}
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.get("backoffLimit", 2),
        # Kueue admits a queued Job by unsuspending it; without a queue, spec.suspend rules.
        "suspend": bool(spec.get("suspend")) or bool(queue),
        "podFailurePolicy": {
            "rules": [
                {
                    # Bad input or missed evaluation gates: retrying cannot help.
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": names.TRAINER_CONTAINER,
                        "operator": "In",
                        "values": list(contract.NON_RETRYABLE_EXIT_CODES),
                    },
                },
                {
                    # Preemption, eviction, node drain: not the trainer's fault.
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
            ]
        },
        "template": {
            "metadata": {"labels": labels},
            "spec": build_pod_spec(ftj, settings, credential_keys),
        },
    }
    if spec.get("activeDeadlineSeconds"):
        job_spec["activeDeadlineSeconds"] = spec["activeDeadlineSeconds"]
    annotations = {names.ANNOTATION_SPEC_HASHES: json.dumps(spec_hashes(spec), sort_keys=True)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(ftj, names.job_name(name), annotations=annotations)
        | {"labels": job_labels},
        "spec": job_spec,
    }


def build_children(
    ftj: dict, settings: OperatorSettings, token: str, credential_keys: frozenset[str] | None
) -> Children:
    return Children(
        config_map=build_config_map(ftj),
        token_secret=build_token_secret(ftj, token),
        job=build_job(ftj, settings, credential_keys),
    )
