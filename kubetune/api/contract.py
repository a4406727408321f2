"""The contract between the operator and the trainer pod: env vars, exit codes, messages.

Both sides import these names, so a change here is a change to both.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kubetune.api.v1alpha1 import (
    MAX_STEPS,
    Artifacts,
    Metrics,
    PreviewStatus,
    ProgressNumbers,
    Rfc3339,
    TrackingStatus,
)

# Exit code for bad input (dataset, model, settings). The operator's podFailurePolicy fails
# the Job at once on it instead of retrying: retrying cannot fix the input.
EXIT_BAD_INPUT = 3
# Evaluation missed a threshold with spec.evaluation.failOnThresholds: artifacts are
# published (manifest says evalPassed false); a retry would train the same model again.
EXIT_EVAL_THRESHOLDS = 4
# A gang's launcher gave up at the rendezvous: the other pods did not join within
# RENDEZVOUS_TIMEOUT_S (one unschedulable, say). Retried, up to spec.backoffLimit.
EXIT_RENDEZVOUS_TIMEOUT = 6
# How long the pods of a gang wait at torchrun's rendezvous for each other (every pod, rank 0
# holding its resources meanwhile). Without Kueue's gang admission nothing else bounds a gang
# whose last pod cannot be scheduled. 10 minutes covers a cold node pulling the trainer image
# (a few minutes for ~7 GB) with room to spare. It reaches torchrun as ENV_RDZV_CONF
# (`timeout=600`); a pod environment with another PET_RDZV_CONF overrides it (tests).
RENDEZVOUS_TIMEOUT_S = 600
# Exit codes after which the operator fails the Job at once instead of retrying.
NON_RETRYABLE_EXIT_CODES = (EXIT_BAD_INPUT, EXIT_EVAL_THRESHOLDS)
# Anything else non-zero is an ordinary failure, retried up to spec.backoffLimit.
EXIT_FAILURE = 1
# Stopped by SIGTERM after finishing its optimizer step and uploading a checkpoint of it: the
# next attempt resumes from that step. The operator's podFailurePolicy ignores it (it does not
# count against spec.backoffLimit) and status.attempts[].reason reads Reason.PREEMPTED.
EXIT_PREEMPTED = 5

# The trainer's failure message when S3 stayed down past its outage bound begins with this;
# the operator reports such a failure as Reason.S3_UNAVAILABLE.
S3_UNAVAILABLE_PREFIX = "S3 unavailable: "

# Where Kubernetes reads the container's termination message (4 KiB at most).
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
TERMINATION_MESSAGE_LIMIT = 4096

# Environment of the trainer container.
ENV_JOB_CONFIG = "KUBETUNE_JOB_CONFIG"  # path of the FineTuneJob manifest (JSON or YAML)
ENV_PROGRESS_URL = "KUBETUNE_PROGRESS_URL"  # operator's progress endpoint for this job
# File holding the bearer token for progress pushes: a projected ServiceAccount token bound to
# the pod, with the operator's audience only (the API server refuses it), rotated by the
# kubelet; read again for every push.
ENV_PROGRESS_TOKEN_FILE = "KUBETUNE_PROGRESS_TOKEN_FILE"
ENV_PROGRESS_TOKEN = "KUBETUNE_PROGRESS_TOKEN"  # a fixed token instead (tests, local tools)
# PEM of the CA the progress endpoint's certificate chains to, when it serves HTTPS.
ENV_PROGRESS_CA = "KUBETUNE_PROGRESS_CA"
ENV_WORK_DIR = "KUBETUNE_WORK_DIR"  # scratch space: model/dataset cache, local checkpoints
ENV_TERMINATION_LOG = "KUBETUNE_TERMINATION_LOG"  # override of DEFAULT_TERMINATION_LOG
ENV_HF_TOKEN = "HF_TOKEN"
# A gang (world size above 1) gets torchrun's own environment, as Kubeflow's torch plugin
# sets it: every `torchrun --foo-bar` flag defaults to PET_FOO_BAR. The operator sets these on
# the gang's pods and `kubetune run --processes N` on its local torchrun; the trainer's
# launcher starts `python -m torch.distributed.run` with no topology flags, and the workers
# take the gang's shape from what torchrun sets in them (WORLD_SIZE, LOCAL_WORLD_SIZE, RANK).
# Nothing else carries the topology: the trainer never takes its own run's shape from
# spec.resources (a dry run's preview projects the spec's gang, which it does not run).
ENV_NNODES = "PET_NNODES"  # pods in the gang (spec.resources.nodes)
ENV_NPROC_PER_NODE = "PET_NPROC_PER_NODE"  # trainer processes per pod (one per GPU, or 1)
ENV_NODE_RANK = "PET_NODE_RANK"  # the pod's completion index (COMPLETION_INDEX_FIELD)
ENV_MASTER_ADDR = "PET_MASTER_ADDR"  # where rank 0 listens (index 0's DNS name)
ENV_MASTER_PORT = "PET_MASTER_PORT"
ENV_RDZV_BACKEND = "PET_RDZV_BACKEND"  # static: fixed node ranks, no etcd, no elastic joins
ENV_RDZV_CONF = "PET_RDZV_CONF"  # timeout=RENDEZVOUS_TIMEOUT_S
# No elastic restarts: a failed gang is restarted as a whole (by Kubernetes) from the latest
# checkpoint.
ENV_MAX_RESTARTS = "PET_MAX_RESTARTS"
RDZV_BACKEND = "static"
# An Indexed Job's pod index, which the Job controller writes on each pod (the same field
# its JOB_COMPLETION_INDEX variable reads): the pod's node rank, through the downward API.
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
COMPLETION_INDEX_FIELD = f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
GANG_PORT = 29500


def gang_environment(
    nnodes: int,
    nproc_per_node: int,
    *,
    master_addr: str = "127.0.0.1",
    master_port: int = GANG_PORT,
    rendezvous_timeout_s: int = RENDEZVOUS_TIMEOUT_S,
) -> dict[str, str]:
    """torchrun's environment for one node of a gang, but the node rank (ENV_NODE_RANK: each
    pod's own, from COMPLETION_INDEX_FIELD; 0 on one machine)."""
    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError(f"bad gang: {nnodes} nodes x {nproc_per_node} processes")
    return {
        ENV_NNODES: str(nnodes),
        ENV_NPROC_PER_NODE: str(nproc_per_node),
        ENV_MASTER_ADDR: master_addr,
        ENV_MASTER_PORT: str(master_port),
        ENV_RDZV_BACKEND: RDZV_BACKEND,
        # How long each pod waits at the static rendezvous for the others (the TCPStore's
        # wait for its clients, and a client's wait for the store): a member that never
        # starts (unschedulable) ends the attempt instead of holding rank 0 forever.
        ENV_RDZV_CONF: f"timeout={rendezvous_timeout_s}",
        ENV_MAX_RESTARTS: "0",
    }


DEFAULT_WORK_DIR = "/workspace"
WORK_VOLUME = "work"  # the pod volume mounted there (the kubelet's eviction message names it)

# The resolved FineTuneJob reaches the trainer as this pod-template annotation (compact JSON),
# which a downward-API volume exposes as DEFAULT_JOB_CONFIG: no ConfigMap per job.
JOB_ANNOTATION = "kubetune.io/job"
JOB_CONFIG_DIR = "/etc/kubetune"
JOB_CONFIG_FILE = "job.json"
DEFAULT_JOB_CONFIG = f"{JOB_CONFIG_DIR}/{JOB_CONFIG_FILE}"
# Kubernetes caps an object's annotations at 256 KiB (keys and values together). The job may
# use this much of it; the rest is left to what others add to the pod (Kueue, webhooks).
ANNOTATION_SIZE_LIMIT = 256 * 1024
JOB_ANNOTATION_BUDGET = 224 * 1024

# Where the projected progress token is mounted in the trainer container.
PROGRESS_TOKEN_DIR = "/var/run/secrets/kubetune.io/progress"
PROGRESS_TOKEN_FILE = "token"


class TrainerResult(BaseModel):
    """What a trainer that finished writes to its termination message (JSON).

    The operator takes the outcome from here, never from the progress stream, so a lost
    progress event loses nothing that matters. Kept well under 4 KiB.
    """

    model_config = ConfigDict(extra="ignore")

    result: str = Field("succeeded", description="succeeded | failed")
    artifacts: Artifacts = Field(default_factory=Artifacts)
    metrics: Metrics = Field(default_factory=Metrics)
    resumedFromStep: int | None = None
    totalSteps: int | None = None
    message: str | None = None
    tracking: list[TrackingStatus] | None = None
    # A dry run (spec.dryRun): its totals and where the preview document is; nothing trained.
    preview: PreviewStatus | None = None


# Bounds of a pushed event's strings: a stage is a short name; a message a line or a few.
MAX_STAGE_LENGTH = 64
MAX_EVENT_MESSAGE_LENGTH = TERMINATION_MESSAGE_LIMIT
ProgressEventKind = Literal[
    "started", "resumed", "step", "eval", "checkpoint", "stage", "completed", "failed"
]


class ProgressEvent(ProgressNumbers):
    """One machine-readable progress event (a JSON line on stdout, or an HTTP push).

    Checked strictly, since the operator takes it from the network: finite numbers in range,
    bounded strings, an RFC 3339 time; the operator answers a push that fails with 400 naming
    the field and stores nothing of it. Unknown keys are dropped (a newer trainer may send
    more)."""

    model_config = ConfigDict(extra="ignore")

    event: ProgressEventKind
    time: Rfc3339
    stage: str | None = Field(None, max_length=MAX_STAGE_LENGTH)
    resumedFromStep: int | None = Field(None, ge=0, le=MAX_STEPS)
    message: str | None = Field(None, max_length=MAX_EVENT_MESSAGE_LENGTH)


class Reason:
    """`status.reason` values and condition reasons the operator writes (kubectl, the CLI and
    alerting rules match on them)."""

    # Pending / Queued / Running / Suspended
    CREATING = "Creating"
    STARTING = "Starting"
    WAITING_FOR_ADMISSION = "WaitingForAdmission"
    SUSPENDED = "Suspended"
    TRAINING = "Training"
    COMPLETING = "Completing"
    RESTARTING = "Restarting"
    POD_DELETED = "PodDeleted"  # an attempt's pod went away before it finished
    # The trainer pod's node stopped answering (NotReady / unreachable): the pod is evicted
    # and replaced when a node is ready; this does not count against spec.backoffLimit.
    NODE_LOST = "NodeLost"
    # The trainer was stopped (SIGTERM: eviction, preemption, drain, pod deletion) and saved a
    # checkpoint of the step it was on; the next attempt resumes there, not counted as a retry.
    PREEMPTED = "Preempted"
    JOB_NAME_TAKEN = "JobNameTaken"
    # The trainer pod cannot start (from the pod's status).
    UNSCHEDULABLE = "Unschedulable"
    IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
    ERR_IMAGE_PULL = "ErrImagePull"
    INVALID_IMAGE_NAME = "InvalidImageName"
    CREATE_CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"
    CREATE_CONTAINER_ERROR = "CreateContainerError"
    SECRET_NOT_FOUND = "SecretNotFound"
    SECRET_KEY_MISSING = "SecretKeyMissing"
    # Rejected by the operator's checks, before any Job.
    INVALID_SPEC = "InvalidSpec"
    URI_SCHEME_NOT_ALLOWED = "URISchemeNotAllowed"
    URI_NOT_ALLOWED = "URINotAllowed"
    INSUFFICIENT_GPUS = "InsufficientGPUs"
    SPEC_TOO_LARGE = "SpecTooLarge"
    IMAGE_NOT_ALLOWED = "ImageNotAllowed"  # spec.image outside the operator's allowed images
    # Finished.
    COMPLETED = "Completed"
    DRY_RUN_PASSED = "DryRunPassed"  # phase Validated: spec.dryRun found nothing wrong
    BAD_INPUT = "BadInput"
    EVAL_THRESHOLDS_MISSED = "EvalThresholdsMissed"
    OOM_KILLED = "OOMKilled"
    EVICTED = "Evicted"
    WORK_DIR_FULL = "WorkDirFull"  # the kubelet evicted the pod: its work dir passed its size
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    TRAINER_FAILED = "TrainerFailed"
    # A gang's pods did not all reach the rendezvous within RENDEZVOUS_TIMEOUT_S.
    RENDEZVOUS_TIMEOUT = "RendezvousTimeout"
    # S3 did not answer for the trainer's outage bound (KUBETUNE_S3_OUTAGE_SECONDS).
    S3_UNAVAILABLE = "S3Unavailable"
    # Condition reasons.
    VALIDATED = "Validated"
    SPEC_CHANGED = "SpecChanged"
    SPEC_MATCHES = "SpecMatches"
    GRACE_PERIOD_TOO_SHORT = "GracePeriodTooShort"
    THRESHOLDS_MET = "ThresholdsMet"
    THRESHOLDS_MISSED = "ThresholdsMissed"


# Container waiting reasons a user has to act on: the trainer will not start by itself.
STUCK_WAITING_REASONS = (
    Reason.IMAGE_PULL_BACK_OFF,
    Reason.ERR_IMAGE_PULL,
    Reason.INVALID_IMAGE_NAME,
    Reason.CREATE_CONTAINER_CONFIG_ERROR,
    Reason.CREATE_CONTAINER_ERROR,
)
# Reasons whose Event is a Warning (besides every Failed phase).
WARNING_REASONS = frozenset(
    {
        Reason.UNSCHEDULABLE,
        *STUCK_WAITING_REASONS,
        Reason.SECRET_NOT_FOUND,
        Reason.SECRET_KEY_MISSING,
        Reason.JOB_NAME_TAKEN,
        Reason.NODE_LOST,
    }
)


class Condition:
    """Condition types of a FineTuneJob."""

    ACCEPTED = "Accepted"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SPEC_CHANGED_AFTER_START = "SpecChangedAfterStart"
    # False when the pod's grace period is shorter than a checkpoint is estimated to take.
    CHECKPOINT_ON_STOP = "CheckpointOnStop"
    EVAL_PASSED = "EvalPassed"


# Where the operator's merged progress of a job lists the trainer's `started` and `resumed`
# events ({"at": time, "step": resumedFromStep or 0}), for status.attempts.
PROGRESS_STARTS = "starts"

# The progress numbers a ProgressEvent carries into status.progress (declared once, there).
PROGRESS_FIELDS = tuple(ProgressNumbers.model_fields)
