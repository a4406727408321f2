"""Pure functions from a validated FineTuneJob to the one object the operator creates: its Job.

Nothing here talks to the API server: the controller sends the result, and the unit tests
check the manifest directly. Every default comes from the typed spec (kubetune.api.v1alpha1)
or the operator's settings; none is restated here.

The trainer receives the resolved job in a pod-template annotation that a downward-API volume
turns into a file, and authenticates its progress pushes with a projected ServiceAccount token
of the operator's audience: the Job is the only object per FineTuneJob, and nothing secret is
in it (credentials are secretKeyRefs the kubelet resolves).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kubetune.api import contract
from kubetune.api.v1alpha1 import NOT_IN_TRAINER_COPY, FineTuneJob, FineTuneJobSpec
from kubetune_operator import grace, names
from kubetune_operator.settings import OperatorSettings

WORK_DIR = contract.DEFAULT_WORK_DIR
WORK_VOLUME = contract.WORK_VOLUME
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


def spec_dict(ftj: FineTuneJob) -> dict[str, Any]:
    return ftj.spec.model_dump(mode="json", by_alias=True, exclude_none=True)


def trainer_document(ftj: FineTuneJob, spec: dict[str, Any] | None = None) -> str:
    """The resolved FineTuneJob as the trainer reads it: compact JSON, every default filled
    in, without the pod placement fields (they are on the pod itself) and spec.suspend.
    `spec`: spec_dict(ftj) when the caller has it already."""
    spec = spec if spec is not None else spec_dict(ftj)
    spec = {k: v for k, v in spec.items() if k not in NOT_IN_TRAINER_COPY}
    document = {
        "apiVersion": ftj.apiVersion,
        "kind": ftj.kind,
        "metadata": {"name": ftj.metadata.name, "namespace": ftj.namespace},
        "spec": spec,
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def annotation_size(value: str) -> int:
    """Bytes an annotation counts against the API server's limit (key and value)."""
    return len(contract.JOB_ANNOTATION) + len(value.encode())


def spec_hashes(spec: dict[str, Any]) -> dict[str, str]:
    """A short hash of each top-level spec field, to tell later which fields changed."""
    return {
        key: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]
        for key, value in sorted(spec.items())
        if key not in _LIFECYCLE_FIELDS
    }


def changed_fields(recorded: dict[str, str], spec: dict[str, Any]) -> list[str]:
    current = spec_hashes(spec)
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))


def pvc_claims(spec: FineTuneJobSpec) -> dict[str, bool]:
    """Claims named by pvc:// URIs -> whether the trainer needs to write to it."""
    claims: dict[str, bool] = {}
    for uri in spec.uris().values():
        if uri.startswith("pvc://"):
            claims.setdefault(uri.removeprefix("pvc://").split("/", 1)[0], False)
    if spec.output.uri.startswith("pvc://"):
        claims[spec.output.uri.removeprefix("pvc://").split("/", 1)[0]] = True
    return claims


def credentials_secret(spec: FineTuneJobSpec, settings: OperatorSettings) -> str | None:
    """The S3 credentials Secret of a job: its own credentialsSecretRef, else the operator's
    default when the job touches S3 at all (a pvc:// or hf:// job needs no S3 keys)."""
    if spec.output.credentialsSecretRef:
        return spec.output.credentialsSecretRef.name
    uses_s3 = any(uri.lower().startswith("s3://") for uri in spec.uris().values())
    if settings.default_credentials_secret and uses_s3:
        return settings.default_credentials_secret
    return None


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _s3_env(spec: FineTuneJobSpec, settings: OperatorSettings) -> list[dict[str, Any]]:
    """S3 credentials as secretKeyRefs; the operator's endpoint and region as values.

    The operator does not read Secrets, so it cannot tell whether the Secret holds an endpoint
    or a region: the operator's value comes first and the Secret's optional key after it. The
    kubelet lets a later entry of the same name win and skips an optional key that is absent,
    so the Secret's value wins when it has one.
    """
    env = [
        {"name": key, "value": value}
        for key, value in (
            ("AWS_ENDPOINT_URL", settings.s3_endpoint),
            ("AWS_REGION", settings.s3_region),
        )
        if value
    ]
    creds = credentials_secret(spec, settings)
    if creds:
        env += [_secret_env(key, creds, key) for key in REQUIRED_S3_KEYS]
        env += [_secret_env(key, creds, key, optional=True) for key in OPTIONAL_S3_KEYS]
    return env


def build_env(ftj: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    """Trainer environment. Credentials only as secretKeyRef, never as values."""
    progress_url = (
        f"{settings.effective_progress_base_url}/v1/progress/{ftj.namespace}/{ftj.metadata.name}"
    )
    env: list[dict[str, Any]] = [
        {"name": contract.ENV_JOB_CONFIG, "value": contract.DEFAULT_JOB_CONFIG},
        {"name": contract.ENV_WORK_DIR, "value": WORK_DIR},
        {"name": contract.ENV_TERMINATION_LOG, "value": contract.DEFAULT_TERMINATION_LOG},
        {"name": contract.ENV_PROGRESS_URL, "value": progress_url},
        {
            "name": contract.ENV_PROGRESS_TOKEN_FILE,
            "value": f"{contract.PROGRESS_TOKEN_DIR}/{contract.PROGRESS_TOKEN_FILE}",
        },
        {"name": ENV_PVC_ROOT, "value": PVC_ROOT},
        # Unbuffered output so `kubetune logs` shows progress as it happens.
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "TMPDIR", "value": TMP_DIR},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        *_s3_env(ftj.spec, settings),
    ]
    if ca := settings.progress_ca_pem:  # an HTTPS progress endpoint: the CA to verify it
        env.append({"name": contract.ENV_PROGRESS_CA, "value": ca})
    token_ref = ftj.spec.model.tokenSecretRef
    if token_ref:
        env.append(_secret_env(contract.ENV_HF_TOKEN, token_ref.name, token_ref.key))
    return env + _tracking_env(ftj.spec) + gang_env(ftj)


# The keys of spec.tracking.mlflow.credentialsSecretRef the MLflow client reads (each optional:
# a server takes a user and password, or a token).
MLFLOW_SECRET_KEYS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


def _tracking_env(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """Tracking credentials, from the Secrets the spec names (secretKeyRef only)."""
    tracking, env = spec.tracking, []
    if tracking and tracking.mlflow and tracking.mlflow.credentialsSecretRef:
        secret = tracking.mlflow.credentialsSecretRef.name
        env += [_secret_env(key, secret, key, optional=True) for key in MLFLOW_SECRET_KEYS]
    if tracking and tracking.wandb and tracking.wandb.apiKeySecretRef:
        ref = tracking.wandb.apiKeySecretRef
        env.append(_secret_env("WANDB_API_KEY", ref.name, ref.key))
    return env


GANG_PORT = contract.GANG_PORT  # torchrun's static rendezvous and store, on index 0


def gang_env(ftj: FineTuneJob) -> list[dict[str, Any]]:
    """torchrun's own environment (PET_*, as Kubeflow's torch plugin sets it; nothing for one
    process): the gang's shape, where rank 0 listens, the static rendezvous and its timeout.
    The trainer's launcher starts torchrun with no topology flags, so this is the one place
    the gang's shape comes from. The node rank is the pod's completion index, which the Job
    controller writes on each pod (read through the downward API)."""
    spec = ftj.spec
    if spec.world_size == 1 or spec.dryRun:  # a dry run is one process, whatever the gang
        return []
    nodes = spec.resources.nodes
    master = "127.0.0.1"
    if nodes > 1:
        # Index 0's stable name through the headless Service (pod hostname.subdomain).
        service = names.service_name(ftj.metadata.name)
        master = f"{names.job_name(ftj.metadata.name)}-0.{service}.{ftj.namespace}.svc"
    torchrun = contract.gang_environment(
        nodes, max(spec.resources.gpus, 1), master_addr=master, master_port=GANG_PORT
    )
    node_rank = {
        "name": contract.ENV_NODE_RANK,
        "valueFrom": {"fieldRef": {"fieldPath": contract.COMPLETION_INDEX_FIELD}},
    }
    return [{"name": name, "value": value} for name, value in torchrun.items()] + [node_rank]


def build_service(job: dict[str, Any]) -> dict[str, Any] | None:
    """The headless Service of a multi-node gang's Job (None for one pod): it gives each pod
    the DNS name <job>-<index>.<service>, published before the pods are ready, since the
    rendezvous happens before anything could report ready. Owned by the FineTuneJob, like
    the Job, and created before it."""
    subdomain = job["spec"]["template"]["spec"].get("subdomain")
    if not subdomain:
        return None
    meta = job["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": subdomain,
            "namespace": meta["namespace"],
            "labels": {k: v for k, v in meta["labels"].items() if k != names.LABEL_QUEUE},
            "ownerReferences": meta["ownerReferences"],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {names.POD_JOB_LABELS[0]: meta["name"]},
            "ports": [{"name": "rendezvous", "port": GANG_PORT, "targetPort": GANG_PORT}],
        },
    }


def build_gang_network_policy(job: dict[str, Any]) -> dict[str, Any] | None:
    """A multi-node gang's NetworkPolicy (None for one pod): its pods accept connections only
    from pods of the same Job. torch's rendezvous store on GANG_PORT is unauthenticated, and
    NCCL/gloo open further ports between the peers, so any port, but no other pod. Owned by
    the FineTuneJob and created before the Job, like the Service."""
    subdomain = job["spec"]["template"]["spec"].get("subdomain")
    if not subdomain:
        return None
    meta = job["metadata"]
    same_job = {"matchLabels": {names.POD_JOB_LABELS[0]: meta["name"]}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": subdomain,  # the Service's name: one gang, one name
            "namespace": meta["namespace"],
            "labels": {k: v for k, v in meta["labels"].items() if k != names.LABEL_QUEUE},
            "ownerReferences": meta["ownerReferences"],
        },
        "spec": {
            "podSelector": same_job,
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": same_job}]}],
        },
    }


def build_resources(spec: FineTuneJobSpec, settings: OperatorSettings) -> dict[str, Any]:
    if spec.dryRun:
        # The data stage only: a tokenizer and the rows, no weights and no GPU. The operator's
        # defaults, not the training run's (sized for the model).
        memory, cpu = settings.default_memory, settings.default_cpu
    else:
        memory = spec.resources.memory or settings.default_memory
        cpu = spec.resources.cpu or settings.default_cpu
    requests = {"cpu": cpu, "memory": memory}
    limits: dict[str, Any] = {"memory": memory}
    if spec.pod_gpus:
        # Extended resources: the limit is the request.
        limits["nvidia.com/gpu"] = str(spec.pod_gpus)
    return {"requests": requests, "limits": limits}


def placement(ftj: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """nodeSelector and tolerations of the trainer pod.

    The job's own value replaces the operator's default (no merging, so a job can always
    opt out of a default). Kueue-queued jobs get no defaults: their ResourceFlavor injects
    its node labels and tolerations, and a default could contradict it. Every pod gets the
    lost-node tolerations (node_lost_tolerations) its tolerations do not already have.
    A dry run gets no defaults either: they place GPU work, and it requests no GPU.
    """
    queued = names.queue_name(ftj) is not None or ftj.spec.dryRun
    node_selector = ftj.spec.nodeSelector or (
        {} if queued else dict(settings.default_node_selector)
    )
    tolerations = ftj.spec.tolerations or (
        [] if queued else [t.manifest() for t in settings.default_tolerations]
    )
    tolerations = [*tolerations, *node_lost_tolerations(tolerations, settings)]
    out: dict[str, Any] = {}
    if node_selector:
        out["nodeSelector"] = node_selector
    if tolerations:
        out["tolerations"] = tolerations
    return out


# The taints the node lifecycle controller puts on a node whose kubelet stops reporting.
NODE_LOST_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")


def node_lost_tolerations(
    tolerations: list[dict[str, Any]], settings: OperatorSettings
) -> list[dict[str, Any]]:
    """NoExecute tolerations of a lost node's taints, for `node_lost_toleration_s`.

    Kubernetes gives every pod 300 s; a training job resumes from its checkpoints, so
    waiting that long for a node that may never come back wastes more than a restart
    costs. Set for every trainer pod, Kueue-queued ones too (a ResourceFlavor does not set
    these), unless its tolerations already name the taint.
    """
    seconds = settings.node_lost_toleration_s
    if seconds is None:
        return []
    if any(not t.get("key") and t.get("operator") == "Exists" for t in tolerations):
        return []  # tolerates every taint already
    named = {t.get("key") for t in tolerations}
    return [
        {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": seconds}
        for key in NODE_LOST_TAINTS
        if key not in named
    ]


def _volumes(ftj: FineTuneJob, settings: OperatorSettings) -> list[tuple[dict, dict]]:
    """(volume, mount) pairs of the trainer container."""
    job_file = {
        "name": "job",
        "downwardAPI": {
            "items": [
                {
                    "path": contract.JOB_CONFIG_FILE,
                    "fieldRef": {"fieldPath": f"metadata.annotations['{contract.JOB_ANNOTATION}']"},
                }
            ]
        },
    }
    # Bound to the pod, for the operator's audience only, short-lived and renewed by the
    # kubelet: it identifies this pod to the operator and opens nothing on the API server.
    token = {
        "name": "progress-token",
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": settings.progress_audience,
                        "expirationSeconds": settings.progress_token_ttl_s,
                        "path": contract.PROGRESS_TOKEN_FILE,
                    }
                }
            ]
        },
    }
    # On the node's disk; past spec.resources.workDirSize (or the chart's default) the
    # kubelet evicts the pod.
    work: dict[str, Any] = {"name": WORK_VOLUME, "emptyDir": {}}
    if work_dir_size := ftj.spec.resources.workDirSize or settings.default_work_dir_size:
        work["emptyDir"]["sizeLimit"] = work_dir_size
    shm = {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": ftj.spec.resources.shmSize}}
    pairs = [
        (job_file, {"name": "job", "mountPath": contract.JOB_CONFIG_DIR, "readOnly": True}),
        (
            token,
            {"name": "progress-token", "mountPath": contract.PROGRESS_TOKEN_DIR, "readOnly": True},
        ),
        (work, {"name": WORK_VOLUME, "mountPath": WORK_DIR}),
        (shm, {"name": "shm", "mountPath": "/dev/shm"}),
    ]
    for i, (claim, writable) in enumerate(sorted(pvc_claims(ftj.spec).items())):
        volume = {
            "name": f"pvc-{i}",
            "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable},
        }
        mount = {"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": not writable}
        pairs.append((volume, mount))
    return pairs


def build_pod_spec(ftj: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    spec = ftj.spec
    volumes = _volumes(ftj, settings)
    container = {
        "name": names.TRAINER_CONTAINER,
        "image": spec.image or settings.trainer_image,
        # A job's own image is pulled every time, so the registry checks this namespace's pull
        # credentials: a node's cached copy of another team's private image opens nothing.
        "imagePullPolicy": "Always" if spec.image else "IfNotPresent",
        "command": list(settings.trainer_command),
        "env": build_env(ftj, settings),
        "resources": build_resources(spec, settings),
        "volumeMounts": [mount for _, mount in volumes],
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
        # Time to finish the step and upload a checkpoint when stopped (see grace.py).
        "terminationGracePeriodSeconds": grace.grace_period(spec, settings),
        # No API credentials in the pod: its only token is the progress token above.
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "fsGroup": settings.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [volume for volume, _ in volumes],
    }
    pod.update(placement(ftj, settings))
    if spec.affinity:
        pod["affinity"] = spec.affinity
    if spec.priorityClassName:
        pod["priorityClassName"] = spec.priorityClassName
    if spec.imagePullSecrets:
        pod["imagePullSecrets"] = [{"name": s.name} for s in spec.imagePullSecrets]
    return pod


def _pod_failure_policy() -> dict[str, Any]:
    return {
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
            {
                # Stopped by SIGTERM with a checkpoint of its step saved (whatever sent it):
                # the next attempt resumes there; not a failure, not counted as a retry.
                "action": "Ignore",
                "onExitCodes": {
                    "containerName": names.TRAINER_CONTAINER,
                    "operator": "In",
                    "values": [contract.EXIT_PREEMPTED],
                },
            },
        ]
    }


def job_backoff_limit(spec: FineTuneJobSpec) -> int:
    """The Job's backoffLimit counts failed pods; spec.backoffLimit counts retries of the
    trainer. A gang is retried as a whole and one failure fails every pod of it (a dead peer
    fails the others' next collective), so each retry of an N-pod gang costs N failed pods."""
    return spec.backoffLimit * spec.trainer_pods


def build_job(ftj: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """The trainer Job, owned by the FineTuneJob (whose metadata.uid must be set)."""
    spec, resolved = ftj.spec, spec_dict(ftj)
    name = ftj.metadata.name
    queue = names.queue_name(ftj)
    labels = names.child_labels(name)
    job_spec: dict[str, Any] = {
        "backoffLimit": job_backoff_limit(spec),
        # Kueue admits a queued Job by unsuspending it; without a queue, spec.suspend rules.
        "suspend": spec.suspend or bool(queue),
        "podFailurePolicy": _pod_failure_policy(),
        "template": {
            "metadata": {
                "labels": labels,
                "annotations": {contract.JOB_ANNOTATION: trainer_document(ftj, resolved)},
            },
            "spec": build_pod_spec(ftj, settings),
        },
    }
    if spec.activeDeadlineSeconds:
        job_spec["activeDeadlineSeconds"] = spec.activeDeadlineSeconds
    if spec.trainer_pods > 1:
        # One pod per node, all at once (Kueue admits the Job, hence the gang, as one unit);
        # each pod's completion index is its node rank and names its hostname.
        nodes = spec.trainer_pods
        job_spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes)
        job_spec["template"]["spec"]["subdomain"] = names.service_name(name)
    hashes = json.dumps(spec_hashes(resolved), sort_keys=True)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": names.job_name(name),
            "namespace": ftj.namespace,
            "labels": {**labels, **({names.LABEL_QUEUE: queue} if queue else {})},
            "annotations": {names.ANNOTATION_SPEC_HASHES: hashes},
            "ownerReferences": [names.owner_reference(ftj)],
        },
        "spec": job_spec,
    }
