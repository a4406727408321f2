"""FineTuneJob v1alpha1: the API types, the single source of truth.

The CRD YAML in crds/ is generated from these models (see kubetune.api.crd), and the
trainer and the operator both read a FineTuneJob through them. Field names are camelCase
because they are the Kubernetes wire format; defaults here are the documented defaults.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from kubetune.api import uris

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]

MODEL_URI_PATTERN = r"^(hf|s3|pvc|file)://.+"
DATASET_URI_PATTERN = r"^(hf|s3|pvc|file)://.+"
OUTPUT_URI_PATTERN = r"^(s3|file|pvc)://.+"

# Every linear layer but the output head: fits any architecture (fused qkv_proj, out_proj,
# dense, c_attn ...), as LLaMA-Factory and the QLoRA paper do.
DEFAULT_TARGET_MODULES = ["all-linear"]
# Method-dependent default learning rates (LoRA trains few, freshly initialised weights).
DEFAULT_LEARNING_RATES = {"full": 2.0e-5, "lora": 2.0e-4, "qlora": 2.0e-4}

# The trainer gets the resolved job in a pod annotation (kubetune.api.contract.JOB_ANNOTATION),
# so every spec the API server admits must fit in one. Short strings have their own maxLength;
# these long ones (CEL paths under the spec) share one budget of characters instead, enforced
# by a CEL rule on the spec (and by FineTuneJobSpec for `kubetune run`). tests/api checks that
# the worst case of the whole spec fits contract.JOB_ANNOTATION_BUDGET.
LONG_TEXT_FIELDS = (
    "model.uri",
    "dataset.uri",
    "dataset.validationUri",
    "dataset.chatTemplate",
    "evaluation.datasetUri",
    "evaluation.regressionUri",
    "evaluation.format.pattern",
    "output.uri",
    "tracking.mlflow.uri",
)
LONG_TEXT_BUDGET = 24576
# Where the trainer pod runs: set on the pod itself, not part of the trainer's copy of the job.
PLACEMENT_FIELDS = ("nodeSelector", "tolerations", "affinity", "imagePullSecrets")

# A JSON object whose shape Kubernetes owns (tolerations, affinity, JSON schemas):
# kept as-is and marked x-kubernetes-preserve-unknown-fields in the CRD.
FreeForm = Annotated[
    dict[str, Any], Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
]


def _cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> dict:
    validation = {"rule": rule, "message": message}
    if field_path:
        validation["fieldPath"] = field_path
    if reason:
        validation["reason"] = reason
    return validation


def _storage_uri(value: str) -> str:
    uris.parse_uri(value)  # a UriError is a ValueError: reported on the field
    return value


def _uri_type(pattern: str) -> Any:
    """A storage URI string: the admission rule and the local check refuse the same URIs."""
    no_parent = _cel(
        "!self.split('/').exists(s, s == '..')",
        "'..' is not allowed in a URI (it would leave its bucket or volume)",
    )
    return Annotated[
        str,
        Field(
            pattern=pattern,
            max_length=2048,
            json_schema_extra={"x-kubernetes-validations": [no_parent]},
        ),
        AfterValidator(_storage_uri),
    ]


ModelUri = _uri_type(MODEL_URI_PATTERN)
DatasetUri = _uri_type(DATASET_URI_PATTERN)
OutputUri = _uri_type(OUTPUT_URI_PATTERN)


class _Model(BaseModel):
    # Unknown fields are an error, as they are for a structural CRD schema (pruning aside):
    # a typo such as `learningrate` must not be silently ignored by `kubetune run`.
    # Strict types, as the API server checks them: `trustRemoteCode: "yes"` is an error, not True.
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, validate_default=True, strict=True
    )


class SecretKeyRef(_Model):
    """A key in a Secret in the FineTuneJob's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")
    key: str = Field("token", min_length=1, max_length=253, description="Key in the Secret.")


class SecretRef(_Model):
    """A Secret in the FineTuneJob's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")


class LocalObjectReference(_Model):
    name: str = Field(min_length=1, max_length=253, description="Name of the referenced object.")


class ModelSource(_Model):
    """Where the base model comes from."""

    uri: ModelUri = Field(
        description="Base model: hf://org/name, s3://bucket/prefix, pvc://claim/path or file:///abs/path.",
    )
    revision: str | None = Field(
        None, max_length=255, description="Hub revision (branch, tag or commit); hf:// only."
    )
    tokenSecretRef: SecretKeyRef | None = Field(
        None,
        description="Secret key holding a Hugging Face token (passed to the trainer as HF_TOKEN).",
    )
    trustRemoteCode: bool = Field(
        False, description="Allow model repositories to run their own Python code when loading."
    )


class LoraSpec(_Model):
    """LoRA adapter settings (method lora or qlora)."""

    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int | None = Field(
        None, ge=1, le=4096, description="LoRA alpha (scaling numerator). Default: 2 x r."
    )
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    targetModules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        max_length=64,
        description="Module names to adapt (a name matches a module whose name ends with it); "
        "'all-linear' adapts every linear layer but the output head and can be combined with "
        "other names. Default: all-linear. A name that matches nothing is a warning; none "
        "matching is an error, found before the weights load.",
        json_schema_extra={"default": DEFAULT_TARGET_MODULES},
    )

    @property
    def effective_alpha(self) -> int:
        return self.alpha if self.alpha is not None else 2 * self.r


class QuantizationSpec(_Model):
    """bitsandbytes quantisation of the frozen base model (method qlora)."""

    bits: Literal[4] = Field(4, description="Bits per weight of the frozen base model.")
    quantType: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    doubleQuant: bool = Field(True, description="Quantise the quantisation constants too.")
    computeDtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype of the matmuls on the dequantised weights."
    )


DatasetFormat = Literal["auto", "alpaca", "chat", "prompt-completion", "text"]


class DatasetSpec(_Model):
    """The training data."""

    uri: DatasetUri = Field(
        description="Training data (.jsonl .json .csv .parquet): s3://, hf://, pvc:// or file://.",
    )
    format: DatasetFormat = Field(
        "auto",
        description="Row format: alpaca (instruction/input/output), chat (messages), "
        "prompt-completion, text; auto detects it from the columns.",
    )
    validationSplit: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of rows held out for validation (seeded)."
    )
    validationUri: DatasetUri | None = Field(
        None,
        description="Separate validation data; when set, validationSplit is not used.",
    )
    chatTemplate: str | None = Field(
        None,
        max_length=65536,
        description="Jinja chat template for chat data when the tokenizer has none.",
    )
    revision: str | None = Field(None, max_length=255, description="Hub revision; hf:// only.")
    promptTemplate: Literal["auto", "alpaca", "chat"] = Field(
        "auto",
        description="How alpaca rows become text: alpaca (### Instruction/### Response), chat "
        "(one user and one assistant turn through the tokenizer's chat template), or auto: "
        "chat when the tokenizer has a chat template (the format the model is served with), "
        "else alpaca.",
    )


MAX_NODES = 64
DistributedStrategy = Literal["auto", "ddp", "fsdp"]
QLORA_FSDP_MESSAGE = (
    "distributed.strategy fsdp is not supported with method: qlora; use ddp (or auto): "
    "the 4-bit base is replicated on every GPU and only the adapter's gradients are averaged"
)


class DistributedSpec(_Model):
    """How several trainer processes share the work (world size above 1 only)."""

    strategy: DistributedStrategy = Field(
        "auto",
        description="ddp: every process holds the whole model and gradients are averaged; "
        "fsdp: parameters, gradients and optimizer state are sharded across processes. "
        "auto: ddp for lora and qlora, fsdp for full.",
    )


LrScheduler = Literal["cosine", "linear", "constant", "constant_with_warmup"]


class TrainingSpec(_Model):
    """Optimisation settings."""

    epochs: float = Field(3.0, gt=0, le=1000, description="Passes over the training data.")
    maxSteps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    learningRate: float | None = Field(
        None,
        gt=0,
        le=1.0,
        description="Peak learning rate. Default by method: 2e-5 for full, 2e-4 for lora "
        "and qlora.",
    )
    lrScheduler: LrScheduler = Field("cosine", description="Learning-rate schedule.")
    warmupRatio: float = Field(0.03, ge=0, le=0.5, description="Share of steps spent warming up.")
    weightDecay: float = Field(0.0, ge=0, le=1.0, description="AdamW weight decay.")
    batchSize: int = Field(4, ge=1, le=4096, description="Per-device batch size.")
    gradientAccumulationSteps: int = Field(
        4, ge=1, le=4096, description="Micro-batches per optimizer step."
    )
    maxSeqLength: int = Field(2048, ge=16, le=1048576, description="Tokens per training sequence.")
    packing: bool = Field(
        True,
        description="Pack several examples into each sequence (no cross-example attention "
        "where the model supports it) instead of padding.",
    )
    gradientCheckpointing: bool = Field(
        True, description="Recompute activations in the backward pass to save memory."
    )
    trainOnPrompt: bool = Field(
        False,
        description="Train on whole sequences (prompts, system and user turns included). "
        "Default: loss on the completion / assistant turns only; the eval loss measures the "
        "same tokens.",
    )
    seed: int = Field(42, ge=0, description="Seed for data order, validation split and init.")
    logEverySteps: int = Field(1, ge=1, description="Report progress every N optimizer steps.")
    evalEverySteps: int | None = Field(
        None, ge=1, description="Evaluate every N steps (default: at the end of each epoch)."
    )
    checkpointEverySteps: int = Field(
        100, ge=1, description="Write a resumable checkpoint every N optimizer steps."
    )
    checkpointsToKeep: int = Field(2, ge=1, le=100, description="Most recent checkpoints kept.")


class OutputSpec(_Model):
    """Where artifacts are published: <uri>/<namespace>/<name>/."""

    uri: OutputUri = Field(
        description="Artifact location: s3://bucket/prefix/ (file:// or pvc:// for local runs).",
    )
    credentialsSecretRef: SecretRef | None = Field(
        None,
        description="Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optional "
        "AWS_ENDPOINT_URL, AWS_REGION; also used for s3:// model and dataset URIs.",
    )
    mergeAdapter: bool = Field(
        False, description="LoRA/QLoRA: also publish the base model with the adapter merged in."
    )


class ResourcesSpec(_Model):
    """Compute for the trainer pods."""

    gpus: int = Field(
        1, ge=0, le=64, description="GPUs (nvidia.com/gpu) per node: one trainer process each."
    )
    nodes: int = Field(
        1,
        ge=1,
        le=MAX_NODES,
        description="Trainer pods (one per node), trained as one gang over torch.distributed. "
        "World size: nodes x max(gpus, 1) processes; gpus: 0 runs CPU workers over gloo.",
    )
    cpu: str | None = Field(
        None,
        pattern=r"^[0-9]+(\.[0-9]+)?m?$",
        max_length=32,
        description="CPU request, e.g. '8'.",
    )
    memory: str | None = Field(
        None,
        pattern=r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?)?$",
        max_length=32,
        description="Memory request and limit, e.g. '64Gi'.",
    )
    shmSize: str = Field(
        "8Gi",
        pattern=r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?)?$",
        max_length=32,
        description="Size of the /dev/shm memory volume (data-loader workers).",
    )
    workDirSize: str | None = Field(
        None,
        pattern=r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?)?$",
        max_length=32,
        description="Size limit of the trainer's work dir (an emptyDir on the node's disk: "
        "model and dataset cache, local checkpoints); the kubelet evicts a pod that writes "
        "more, and the job fails with reason WorkDirFull. Unset: no limit.",
    )


class FormatCheck(_Model):
    """What a generated answer must look like."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "self.type != 'regex' || has(self.pattern)", "format type regex needs pattern"
                ),
                _cel(
                    "self.type != 'jsonSchema' || has(self.schema)",
                    "format type jsonSchema needs schema",
                ),
            ]
        },
    )

    type: Literal["json", "jsonSchema", "regex"] = Field(description="Kind of check.")
    schema_: FreeForm | None = Field(
        None, alias="schema", description="JSON Schema the output must validate against."
    )
    pattern: str | None = Field(
        None, max_length=4096, description="Regular expression the whole output must match."
    )

    @model_validator(mode="after")
    def _needs_its_argument(self) -> FormatCheck:
        # Mirrors the CEL rules above for `kubetune run`.
        if self.type == "regex" and self.pattern is None:
            raise ValueError("format type regex needs pattern")
        if self.type == "jsonSchema" and self.schema_ is None:
            raise ValueError("format type jsonSchema needs schema")
        return self


class EvalThresholds(_Model):
    """Quality gates; a missed one sets the EvalPassed condition to False."""

    minFormatCompliance: float | None = Field(None, ge=0, le=1)
    maxEvalLoss: float | None = Field(None, ge=0)
    minExactMatch: float | None = Field(None, ge=0, le=1)
    minTokenF1: float | None = Field(None, ge=0, le=1)
    minRougeL: float | None = Field(None, ge=0, le=1)
    maxUnsupportedContentRate: float | None = Field(None, ge=0, le=1)
    maxRegressionPerplexityIncrease: float | None = Field(
        None, ge=0, description="Largest allowed relative increase, e.g. 0.1 for +10%."
    )


class EvaluationSpec(_Model):
    """Evaluation after training, against the base model."""

    enabled: bool = Field(True, description="Run the evaluation stage.")
    datasetUri: DatasetUri | None = Field(
        None,
        description="Evaluation data (default: validation split).",
    )
    maxSamples: int = Field(64, ge=1, le=100000, description="Examples generated for task metrics.")
    maxNewTokens: int = Field(128, ge=1, le=8192, description="Generation length limit.")
    format: FormatCheck | None = Field(None, description="Format compliance check.")
    regressionUri: DatasetUri | None = Field(
        None,
        description="General text unrelated to the task; base vs tuned perplexity on it.",
    )
    thresholds: EvalThresholds | None = Field(None, description="Quality gates.")
    failOnThresholds: bool = Field(False, description="Fail the job when a threshold is missed.")
    sampleOutputs: int = Field(
        5, ge=0, le=100, description="Base vs tuned outputs kept in the report."
    )


class MlflowTracking(_Model):
    """Log the run to an MLflow tracking server."""

    uri: str = Field(
        pattern=r"^https?://.+",
        max_length=2048,
        description="Tracking server, e.g. http://mlflow.mlops:5000.",
    )
    experiment: str = Field(
        "kubetune", min_length=1, max_length=256, description="Experiment the run is logged in."
    )
    credentialsSecretRef: SecretRef | None = Field(
        None,
        description="Secret with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
        "MLFLOW_TRACKING_TOKEN (all optional keys).",
    )


class WandbTracking(_Model):
    """Log the run to Weights & Biases."""

    project: str = Field(min_length=1, max_length=128, description="W&B project.")
    entity: str | None = Field(None, max_length=128, description="W&B team or user.")
    apiKeySecretRef: SecretKeyRef | None = Field(
        None, description="Secret key holding the W&B API key (online mode)."
    )
    mode: Literal["online", "offline"] = Field(
        "online", description="offline writes the run files to the work directory only."
    )


class TrackingSpec(_Model):
    """Experiment tracking. A tracking server that is down never fails the training: the
    status says so instead."""

    mlflow: MlflowTracking | None = Field(None, description="MLflow tracking.")
    wandb: WandbTracking | None = Field(None, description="Weights & Biases tracking.")


LONG_TEXT_MESSAGE = (
    f"URIs, chatTemplate and format pattern together must stay under {LONG_TEXT_BUDGET} "
    "characters (the trainer receives the job in a pod annotation)"
)


def _long_text_rule() -> str:
    """CEL: the summed length of LONG_TEXT_FIELDS (absent ones count 0) within the budget."""
    terms = []
    for path in LONG_TEXT_FIELDS:
        parts = path.split(".")
        guards = [f"has(self.{'.'.join(parts[: i + 1])})" for i in range(len(parts))]
        terms.append(f"({' && '.join(guards)} ? size(self.{path}) : 0)")
    return f"{' + '.join(terms)} <= {LONG_TEXT_BUDGET}"


def long_text_size(spec: BaseModel) -> int:
    """What the CEL rule sums, for a FineTuneJobSpec."""
    total = 0
    for path in LONG_TEXT_FIELDS:
        value: Any = spec
        for part in path.split("."):
            value = getattr(value, part, None)
        total += len(value) if isinstance(value, str) else 0
    return total


class FineTuneJobSpec(_Model):
    """What to fine-tune, how, and where the result goes."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!has(self.quantization) || self.method == 'qlora'",
                    "quantization is only valid with method: qlora",
                    ".quantization",
                ),
                _cel(
                    "!has(self.lora) || self.method != 'full'",
                    "lora settings are not valid with method: full",
                    ".lora",
                ),
                _cel(
                    "!(self.method == 'qlora' && has(self.distributed) && "
                    "self.distributed.strategy == 'fsdp')",
                    QLORA_FSDP_MESSAGE,
                    ".distributed.strategy",
                ),
                _cel(_long_text_rule(), LONG_TEXT_MESSAGE),
            ]
        },
    )

    model: ModelSource = Field(description="Base model.")
    method: Literal["full", "lora", "qlora"] = Field(
        "lora", description="full: all parameters; lora: adapter; qlora: adapter on a 4-bit base."
    )
    lora: LoraSpec | None = Field(None, description="LoRA settings (lora and qlora).")
    quantization: QuantizationSpec | None = Field(None, description="Quantisation (qlora only).")
    dataset: DatasetSpec = Field(description="Training data.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Evaluation.")
    output: OutputSpec = Field(description="Where artifacts go.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Compute.")
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="Multi-process training (world size > 1)."
    )
    tracking: TrackingSpec | None = Field(None, description="Experiment tracking.")

    # Scheduling and lifecycle (used by the operator; ignored by `kubetune run`).
    image: str | None = Field(
        None, max_length=1024, description="Trainer image (default: operator's)."
    )
    suspend: bool = Field(
        False, description="Stop the running trainer, keeping checkpoints; false resumes it."
    )
    backoffLimit: int = Field(
        2,
        ge=0,
        le=100,
        description=(
            "Retries of a failed trainer attempt (a multi-node gang's failure counts once);"
            " lost nodes and preemptions do not count."
        ),
    )
    activeDeadlineSeconds: int | None = Field(
        None, ge=1, description="Fail the job when it runs longer than this."
    )
    queueName: str | None = Field(
        None, max_length=253, description="Kueue LocalQueue (same as the queue-name label)."
    )
    priorityClassName: str | None = Field(None, max_length=253)
    nodeSelector: dict[str, str] | None = Field(None, description="Trainer pod node selector.")
    tolerations: list[FreeForm] | None = Field(None, description="Trainer pod tolerations.")
    affinity: FreeForm | None = Field(None, description="Trainer pod affinity.")
    imagePullSecrets: list[LocalObjectReference] | None = Field(None)

    @property
    def world_size(self) -> int:
        """Trainer processes in the gang: one per GPU, or one per node on CPU nodes."""
        return self.resources.nodes * max(self.resources.gpus, 1)

    @property
    def strategy(self) -> Literal["none", "ddp", "fsdp"]:
        """The resolved strategy: none for one process; auto -> fsdp for full, else ddp."""
        if self.world_size == 1:
            return "none"
        chosen = self.distributed.strategy
        if chosen == "auto":
            return "fsdp" if self.method == "full" else "ddp"
        return chosen

    @property
    def effective_batch_size(self) -> int:
        """Rows per optimizer step over the whole gang."""
        training = self.training
        return training.batchSize * training.gradientAccumulationSteps * self.world_size

    def uris(self) -> dict[str, str]:
        """Every URI the job reads or writes (model, data, evaluation, output), by field."""
        candidates = {
            "spec.model.uri": self.model.uri,
            "spec.dataset.uri": self.dataset.uri,
            "spec.dataset.validationUri": self.dataset.validationUri,
            "spec.evaluation.datasetUri": self.evaluation.datasetUri,
            "spec.evaluation.regressionUri": self.evaluation.regressionUri,
            "spec.output.uri": self.output.uri,
        }
        return {path: uri for path, uri in candidates.items() if uri}

    @model_validator(mode="after")
    def _cross_field_rules(self) -> FineTuneJobSpec:
        # Mirrors the CEL rules so `kubetune run` rejects the same manifests as the API server,
        # then fills in the method-dependent defaults.
        if self.quantization is not None and self.method != "qlora":
            raise ValueError("spec.quantization is only valid with method: qlora")
        if self.lora is not None and self.method == "full":
            raise ValueError("spec.lora settings are not valid with method: full")
        if self.method == "qlora" and self.distributed.strategy == "fsdp":
            raise ValueError(f"spec.distributed.strategy: {QLORA_FSDP_MESSAGE}")
        if long_text_size(self) > LONG_TEXT_BUDGET:
            raise ValueError(f"spec: {LONG_TEXT_MESSAGE}")
        if self.method in ("lora", "qlora") and self.lora is None:
            self.lora = LoraSpec()
        if self.method == "qlora" and self.quantization is None:
            self.quantization = QuantizationSpec()
        if self.training.learningRate is None:
            self.training.learningRate = DEFAULT_LEARNING_RATES[self.method]
        return self


class ObjectMeta(BaseModel):
    """The parts of metadata kubetune reads; everything else is kept."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


# --- status -----------------------------------------------------------------------------

Phase = Literal["Pending", "Queued", "Running", "Suspended", "Succeeded", "Failed"]
PHASES: tuple[str, ...] = ("Pending", "Queued", "Running", "Suspended", "Succeeded", "Failed")
TERMINAL_PHASES = ("Succeeded", "Failed")


class Condition(BaseModel):
    """A Kubernetes-style condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    lastTransitionTime: str | None = Field(None, json_schema_extra={"format": "date-time"})
    observedGeneration: int | None = None


class Progress(BaseModel):
    """Latest training progress reported by the trainer."""

    step: int | None = None
    totalSteps: int | None = None
    percent: float | None = None
    epoch: float | None = None
    loss: float | None = None
    evalLoss: float | None = None
    learningRate: float | None = None
    tokensPerSecond: float | None = None
    etaSeconds: float | None = None
    summary: str | None = Field(None, description="Human-readable, e.g. '120/300 (40%)'.")
    updatedAt: str | None = Field(None, json_schema_extra={"format": "date-time"})


class Artifacts(BaseModel):
    """Where the results are."""

    model: str | None = Field(None, description="Adapter (LoRA/QLoRA) or model (full) location.")
    mergedModel: str | None = None
    manifest: str | None = None
    report: str | None = None
    metrics: str | None = None


class Metrics(BaseModel):
    """Headline numbers of a finished run."""

    trainLoss: float | None = None
    evalLoss: float | None = None
    perplexity: float | None = None
    baseEvalLoss: float | None = None
    exactMatch: float | None = None
    baseExactMatch: float | None = None
    formatCompliance: float | None = None
    baseFormatCompliance: float | None = None
    tokenF1: float | None = None
    baseTokenF1: float | None = None
    rougeL: float | None = None
    baseRougeL: float | None = None
    unsupportedContentRate: float | None = None
    baseUnsupportedContentRate: float | None = None
    regressionPerplexityIncrease: float | None = Field(
        None, description="Tuned vs base perplexity on the regression set (+0.1 = +10%)."
    )
    tokensTrained: int | None = None
    trainSamples: int | None = None
    durationSeconds: float | None = None
    evalPassed: bool | None = None
    truncatedRows: int | None = Field(
        None, description="Training rows cut at maxSeqLength (some loss tokens kept)."
    )
    excludedRows: int | None = Field(
        None,
        description="Training rows left out: maxSeqLength would cut away every loss token.",
    )
    packing: bool | None = Field(
        None,
        description="Whether examples were packed; false when packing was asked for but the "
        "model cannot keep packed examples apart (see the manifest's notes).",
    )


class Usage(BaseModel):
    """What the job used, summed over every attempt (restarts and resumes included)."""

    gpuSeconds: float | None = Field(None, description="GPU time: trainer pods' run time x GPUs.")
    wallSeconds: float | None = Field(None, description="Trainer pods' run time, all attempts.")
    tokensTrained: int | None = Field(None, description="Non-padding tokens trained.")
    estimatedCost: float | None = Field(
        None, description="gpuSeconds x the operator's price per GPU-hour (unset when none)."
    )
    currency: str | None = Field(None, description="Currency of estimatedCost, e.g. USD.")
    attempts: dict[str, float] | None = Field(
        None, description="Run seconds of each trainer pod so far, by pod name."
    )


class TrackingStatus(BaseModel):
    """Where one tracking backend logged the run, or why it could not."""

    backend: Literal["mlflow", "wandb"]
    state: Literal["Logged", "Unavailable"]
    run: str | None = Field(None, description="The run: an MLflow run URL or W&B run path.")
    message: str | None = Field(None, description="Why logging stopped, when it did.")


# Status keeps this many attempts (the newest): a job retried without end must not grow its
# object without bound.
MAX_ATTEMPTS_SHOWN = 20
# Stopped: ended by a suspension, not by the trainer or the node.
AttemptResult = Literal["Pending", "Running", "Succeeded", "Failed", "Stopped"]


class Attempt(BaseModel):
    """One run of the trainer (in a gang: of rank 0's pod), as the operator saw it."""

    attempt: int = Field(ge=1, description="1 for the first trainer pod, counting up.")
    pod: str | None = Field(None, description="The trainer pod (rank 0's in a gang).")
    startedAt: str | None = Field(None, json_schema_extra={"format": "date-time"})
    endedAt: str | None = Field(None, json_schema_extra={"format": "date-time"})
    resumedFromStep: int | None = Field(
        None,
        description="The checkpoint step it resumed from; 0: it started from scratch; unset: "
        "not reported (yet).",
    )
    result: AttemptResult | None = None
    reason: str | None = Field(None, description="Why it ended, e.g. TrainerFailed, OOMKilled.")
    exitCode: int | None = Field(None, description="The trainer container's exit code.")


class FineTuneJobStatus(BaseModel):
    """Observed state, written by the operator."""

    phase: Phase | None = None
    reason: str | None = Field(None, description="Machine-readable cause of the phase.")
    message: str | None = Field(None, description="Why, in words a user can act on.")
    observedGeneration: int | None = None
    conditions: list[Condition] | None = Field(
        None,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    jobName: str | None = None
    startTime: str | None = Field(None, json_schema_extra={"format": "date-time"})
    completionTime: str | None = Field(None, json_schema_extra={"format": "date-time"})
    progress: Progress | None = None
    artifacts: Artifacts | None = None
    metrics: Metrics | None = None
    usage: Usage | None = Field(None, description="GPU time, tokens and cost, all attempts.")
    tracking: list[TrackingStatus] | None = Field(
        None, description="Experiment tracking: where the run was logged, or why not."
    )
    restarts: int | None = Field(None, description="Trainer pods that failed and were retried.")
    resumedFromStep: int | None = Field(
        None, description="The checkpoint step the latest attempt resumed from."
    )
    attempts: list[Attempt] | None = Field(
        None,
        max_length=MAX_ATTEMPTS_SHOWN,
        description=f"Each trainer attempt, oldest first (the newest {MAX_ATTEMPTS_SHOWN}).",
    )
    worldSize: int | None = Field(
        None, description="Trainer processes in the gang: nodes x max(gpus, 1)."
    )
    effectiveBatchSize: int | None = Field(
        None,
        description="Rows per optimizer step: batchSize x gradientAccumulationSteps x worldSize.",
    )


class FineTuneJob(BaseModel):
    """A FineTuneJob manifest (what `kubectl apply` and `kubetune run` take)."""

    model_config = ConfigDict(extra="forbid")

    apiVersion: Literal["kubetune.io/v1alpha1"] = API_VERSION
    kind: Literal["FineTuneJob"] = KIND
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"

    def wire(self) -> dict[str, Any]:
        """The manifest as Kubernetes sees it (camelCase keys, no unset optionals)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# Spec fields that cannot change once the trainer has started (see kubetune.api.crd).
IMMUTABLE_AFTER_START = ("model", "method", "dataset")
