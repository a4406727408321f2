"""Operator configuration: every setting from a flag or an environment variable.

`OperatorSettings.from_env()` reads KUBETUNE_OPERATOR_* variables; `__main__` lets flags
override them. Defaults are the documented defaults (docs/operator.md).
"""

from __future__ import annotations

import json
import os
import typing
from collections.abc import Mapping
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kubetune.api.errors import describe_validation_error

ENV_PREFIX = "KUBETUNE_OPERATOR_"


class SettingsError(ValueError):
    """A setting that cannot be read; the message is one line naming the variable."""


class Toleration(BaseModel):
    """A Kubernetes toleration (core/v1 Toleration), checked when the operator starts so a
    typo fails there and not in every trainer pod."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = Field(None, ge=0)  # the Kubernetes field name

    def manifest(self) -> dict[str, object]:
        return self.model_dump(exclude_none=True)


class OperatorSettings(BaseModel):
    """How the operator runs and what trainer pods it creates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespaces: list[str] = Field(
        default_factory=list, description="Namespaces to watch; empty = all namespaces."
    )
    trainer_image: str = Field(
        "ghcr.io/kubetune/trainer:latest", description="Image when spec.image is not set."
    )
    trainer_allowed_images: list[str] = Field(
        default_factory=list,
        description="Images spec.image may name besides trainer_image: a prefix ending in '/' "
        "or ':' (registry.internal/ml/) or a whole reference (pinned: ...@sha256:...); "
        "empty = trainer_image only.",
    )
    trainer_command: list[str] = Field(
        default_factory=lambda: ["kubetune-trainer"],
        description="Command of the trainer container (explicit, so any image or the local "
        "node runs the same program).",
    )
    s3_endpoint: str | None = Field(
        default_factory=lambda: os.environ.get("AWS_ENDPOINT_URL") or None,
        description="AWS_ENDPOINT_URL for trainer pods when the credentials Secret has none.",
    )
    s3_region: str | None = Field(
        None, description="AWS_REGION for trainer pods when the credentials Secret has none."
    )
    default_credentials_secret: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        description="Secret (in the job's namespace) with the S3 credentials of jobs that set "
        "no spec.output.credentialsSecretRef but use s3:// URIs; unset = none.",
    )
    default_node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Trainer pod nodeSelector when spec.nodeSelector is unset "
        "(not for Kueue-queued jobs: their ResourceFlavor places them).",
    )
    default_tolerations: list[Toleration] = Field(
        default_factory=list,
        description="Trainer pod tolerations when spec.tolerations is unset "
        "(not for Kueue-queued jobs).",
    )
    node_lost_toleration_s: int | None = Field(
        60,
        ge=0,
        description="How long a trainer pod stays bound to a node that is not ready or "
        "unreachable before Kubernetes evicts it (NoExecute tolerations of "
        "node.kubernetes.io/not-ready and /unreachable, on every trainer pod whose tolerations "
        "do not name those taints). The Job replaces it on a ready node and the trainer "
        "resumes from its last checkpoint, without counting against spec.backoffLimit. "
        "Unset (empty): Kubernetes's default, 300 s.",
    )
    trainer_read_only_root: bool = Field(
        True,
        description="readOnlyRootFilesystem on the trainer container: it writes only to its "
        "volumes (work dir, /dev/shm, PVCs); TMPDIR and XDG_CACHE_HOME point into the work dir.",
    )
    progress_base_url: str | None = Field(
        None,
        description="URL trainer pods reach the progress server at "
        "(default: http://<listen host>:<port>).",
    )
    progress_audience: str = Field(
        "kubetune.io/progress",
        min_length=1,
        description="Audience of the trainer's projected ServiceAccount token: the operator "
        "accepts only this audience; the API server, which wants its own, refuses the token.",
    )
    progress_token_ttl_s: int = Field(
        600,
        ge=600,
        le=86400,
        description="Lifetime of that token (the API server's minimum is 600 s); the kubelet "
        "renews it at 80 %.",
    )
    listen_host: str = Field("0.0.0.0", description="Progress/metrics/health server address.")
    listen_port: int = Field(8080, ge=0, le=65535, description="Its port (0 = any free port).")
    patch_interval_s: float = Field(
        5.0, ge=0.0, description="Least time between two progress-only status patches of a job."
    )
    allowed_schemes: list[str] = Field(
        default_factory=lambda: ["hf", "s3", "pvc"],
        description="URI schemes FineTuneJobs may use for model, data and output.",
    )
    allowed_s3_prefixes: list[str] = Field(
        default_factory=list,
        description="s3:// URIs must start with one of these (e.g. s3://team-bucket/); "
        "empty = any bucket.",
    )
    gpu_memory_gib: float = Field(
        80.0, gt=0, description="Memory of one GPU, for the plausibility check of requests."
    )
    default_cpu: str = Field("2", description="CPU request when spec.resources.cpu is unset.")
    default_memory: str = Field(
        "8Gi", description="Memory request when spec.resources.memory is unset."
    )
    default_work_dir_size: str = Field(
        "",
        pattern=r"^([0-9]+(\.[0-9]+)?([KMGTPE]i?)?)?$",
        description="Size limit of the trainer's work dir (an emptyDir on the node's disk) "
        "when spec.resources.workDirSize is unset; empty = no limit.",
    )
    run_as_user: int = Field(1000, ge=1, description="UID of the trainer container (non-root).")
    trainer_grace_seconds: int = Field(
        60,
        ge=1,
        description="Trainer pods' terminationGracePeriodSeconds before the checkpoint "
        "estimate is added (when spec.terminationGracePeriodSeconds is unset): time to finish "
        "the optimizer step under way when SIGTERM arrives.",
    )
    checkpoint_mib_per_s: float = Field(
        200.0,
        gt=0,
        description="Assumed speed of writing and uploading a checkpoint, which sizes the "
        "grace period from the checkpoint estimate (parameters named in the model URI).",
    )
    gpu_hour_price: float = Field(
        0.0,
        ge=0,
        description="Price of one GPU-hour, for status.usage.estimatedCost (0 = no estimate).",
    )
    currency: str = Field("USD", pattern="^[A-Z]{3}$", description="Currency of that price.")
    workers: int = Field(8, ge=1, le=256, description="Concurrent reconciles.")
    api_threads: int = Field(16, ge=1, le=256, description="Threads for Kubernetes API calls.")
    log_format: str = Field("json", pattern="^(json|text)$", description="Log format.")
    leader_election: bool = Field(
        False,
        description="Elect one leader among the operator's replicas through a Lease; only "
        "the leader reconciles, the others forward progress pushes to it (the chart turns it "
        "on). Off: this process acts alone.",
    )
    lease_name: str = Field("kubetune-operator", min_length=1, description="The Lease's name.")
    lease_namespace: str | None = Field(
        default_factory=lambda: os.environ.get("POD_NAMESPACE") or None,
        description="The Lease's namespace (default: $POD_NAMESPACE, the operator's own).",
    )
    lease_duration_s: int = Field(
        15, ge=2, description="A leader not renewing for this long is replaced (whole seconds)."
    )
    renew_deadline_s: float = Field(
        10.0, ge=1.5, description="A leader stops (exits) when it could not renew for this long."
    )
    retry_period_s: float = Field(
        2.0, ge=1, description="How often the leader renews and the others try to take over."
    )
    peer_url: str | None = Field(
        None,
        description="URL the other replicas forward progress pushes to while this one leads "
        "(default: http://$POD_IP:<port>, else http://<listen host>:<port>).",
    )
    tls_dir: str | None = Field(
        None,
        description="Folder of a mounted kubernetes.io/tls Secret (tls.crt, tls.key, and "
        "ca.crt when the certificate is not self-signed): the progress endpoint serves HTTPS "
        "with it and trainer pods verify it against that CA. Unset: plain HTTP.",
    )
    watch_dead_after_s: float = Field(
        300.0,
        gt=0,
        description="/healthz fails (and the liveness probe restarts the operator) when a "
        "watch stream has delivered nothing and failed its freshness check for this long.",
    )

    @model_validator(mode="after")
    def _lease_timing(self) -> OperatorSettings:
        # The library's own rules: the deadline must leave room for retries, and a follower
        # must wait longer than the leader keeps trying.
        if not (self.lease_duration_s > self.renew_deadline_s > 1.2 * self.retry_period_s):
            raise ValueError(
                "lease_duration_s: need lease_duration_s > renew_deadline_s > 1.2 x retry_period_s"
            )
        if self.leader_election and not self.lease_namespace:
            raise ValueError("lease_namespace: required with leader_election (or $POD_NAMESPACE)")
        return self

    @field_validator("allowed_schemes")
    @classmethod
    def _schemes_lower(cls, value: list[str]) -> list[str]:
        return [s.lower().removesuffix("://") for s in value]

    @property
    def scheme(self) -> str:
        return "https" if self.tls_dir else "http"

    @property
    def effective_progress_base_url(self) -> str:
        if self.progress_base_url:
            return self.progress_base_url.rstrip("/")
        host = "127.0.0.1" if self.listen_host in ("0.0.0.0", "") else self.listen_host
        return f"{self.scheme}://{host}:{self.listen_port}"

    def tls_file(self, name: str) -> str:
        assert self.tls_dir, "only with tls_dir"
        return os.path.join(self.tls_dir, name)

    @property
    def progress_ca_pem(self) -> str | None:
        """The CA trainers verify the progress endpoint with: ca.crt, else the certificate
        itself (self-signed). Read when needed: the kubelet updates the mounted Secret."""
        if not self.tls_dir:
            return None
        for name in ("ca.crt", "tls.crt"):
            path = self.tls_file(name)
            if os.path.exists(path):
                with open(path) as f:
                    return f.read()
        return None

    @property
    def effective_peer_url(self) -> str:
        if self.peer_url:
            return self.peer_url.rstrip("/")
        pod_ip = os.environ.get("POD_IP")
        if pod_ip:
            host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
        else:
            host = "127.0.0.1" if self.listen_host in ("0.0.0.0", "") else self.listen_host
        return f"{self.scheme}://{host}:{self.listen_port}"

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, **overrides: object
    ) -> OperatorSettings:
        """Settings from KUBETUNE_OPERATOR_<FIELD> variables: lists comma-separated or JSON,
        mappings and tolerations JSON; `overrides` (already typed) win."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = parse_setting(ENV_PREFIX + name.upper(), name, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)


def parse_setting(source: str, field: str, raw: str) -> object:
    """One setting's text (from `source`, a variable or a flag) as its field wants it."""
    if field == "trainer_command":
        return raw.split()  # a command line: split on spaces, not commas
    return parse_env_value(source, raw, OperatorSettings.model_fields[field].annotation)


def parse_env_value(variable: str, raw: str, annotation: object) -> object:
    """One variable's text as the field's type wants it (pydantic checks the result)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    text = raw.strip()
    if not text and type(None) in args:
        return None  # an empty variable leaves an optional setting unset
    if origin in (list, dict) and text.startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"{variable}: not valid JSON: {exc}") from None
    if origin is dict or (origin is list and args and args[0] is not str):
        if not text:
            return {} if origin is dict else []
        kind = "object" if origin is dict else "list"
        raise SettingsError(f"{variable}: expected a JSON {kind}, got {text[:60]!r}")
    if origin is list:
        return [part.strip() for part in raw.split(",") if part.strip()]
    return raw


def describe_error(error: Exception, *, first_only: bool = False, whole: str = "settings") -> str:
    """A pydantic error as one line, `<field>: <reason>` for each bad field (or the first
    only); `whole` names the object when the error is about all of it. Used for settings,
    FineTuneJobs that do not validate and progress pushes."""
    if not isinstance(error, ValidationError):
        return str(error)
    return describe_validation_error(error, first_only=first_only, whole=whole)
