"""The contract between the operator and the trainer pod: env vars, exit codes, messages.

Both sides import these names, so a change here is a change to both.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from kubetune.api.v1alpha1 import Artifacts, Metrics, TrackingStatus

# Exit code for bad input (dataset, model, settings). The operator's podFailurePolicy fails
# the Job at once on it instead of retrying: retrying cannot fix the input.
EXIT_BAD_INPUT = 3
# Evaluation missed a threshold with spec.evaluation.failOnThresholds: artifacts are
# published (manifest says evalPassed false); a retry would train the same model again.
EXIT_EVAL_THRESHOLDS = 4
# Exit codes after which the operator fails the Job at once instead of retrying.
NON_RETRYABLE_EXIT_CODES = (EXIT_BAD_INPUT, EXIT_EVAL_THRESHOLDS)
# Anything else non-zero is an ordinary failure, retried up to spec.backoffLimit.
EXIT_FAILURE = 1

# Where Kubernetes reads the container's termination message (4 KiB at most).
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
TERMINATION_MESSAGE_LIMIT = 4096

# Environment of the trainer container.
ENV_JOB_CONFIG = "KUBETUNE_JOB_CONFIG"  # path of the FineTuneJob manifest (from the ConfigMap)
ENV_PROGRESS_URL = "KUBETUNE_PROGRESS_URL"  # operator's progress endpoint for this job
ENV_PROGRESS_TOKEN = "KUBETUNE_PROGRESS_TOKEN"  # per-job bearer token (from a Secret)
ENV_WORK_DIR = "KUBETUNE_WORK_DIR"  # scratch space: model/dataset cache, local checkpoints
ENV_TERMINATION_LOG = "KUBETUNE_TERMINATION_LOG"  # override of DEFAULT_TERMINATION_LOG
ENV_HF_TOKEN = "HF_TOKEN"

DEFAULT_JOB_CONFIG = "/etc/kubetune/job.yaml"
DEFAULT_WORK_DIR = "/workspace"


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


class ProgressEvent(BaseModel):
    """One machine-readable progress event (a JSON line on stdout, or an HTTP push)."""

    model_config = ConfigDict(extra="ignore")

    event: str = Field(
        description="started | resumed | step | eval | checkpoint | stage | completed | failed"
    )
    time: str = Field(description="RFC 3339 timestamp.")
    stage: str | None = None
    step: int | None = None
    totalSteps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    evalLoss: float | None = None
    learningRate: float | None = None
    tokensPerSecond: float | None = None
    etaSeconds: float | None = None
    resumedFromStep: int | None = None
    message: str | None = None
