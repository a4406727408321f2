"""FineTuneJob v1alpha1: the API types, the single source of truth.

The CRD YAML in crds/ is generated from these models (see kubetune.api.crd), and the
trainer and the operator both read a FineTuneJob through them. Field names are camelCase
because they are the Kubernetes wire format; defaults here are the documented defaults.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

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
# Left out of the trainer's copy of the job: placement, the image and priority class (on the pod
# itself), and spec.suspend (the operator's alone; its value when the Job was made says nothing
# to the trainer).
NOT_IN_TRAINER_COPY = (*PLACEMENT_FIELDS, "image", "priorityClassName", "suspend")

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


# user:password@ in a URI would copy a credential into the pod annotation, the manifest and the
# status: credentials come from Secrets only.
NO_USERINFO = _cel(
    "!self.matches('^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@')",
    "credentials (user:password@) are not allowed in a URI; put them in a Secret",
)
_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@")


def _no_userinfo(value: str) -> str:
    if _USERINFO.match(value):
        raise ValueError(NO_USERINFO["message"])
    return value


def _storage_uri(value: str) -> str:
    uris.parse_uri(value)  # a UriError is a ValueError: reported on the field
    return _no_userinfo(value)


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
            json_schema_extra={"x-kubernetes-validations": [no_parent, NO_USERINFO]},
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


def _with_rules(*rules: dict[str, str]) -> ConfigDict:
    """_Model's config plus CEL rules on the object (cross-field checks at admission)."""
    return ConfigDict(
        **_Model.model_config, json_schema_extra={"x-kubernetes-validations": list(rules)}
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


# peft's init_lora_weights values kubetune offers (default: peft's True).
LoraInit = Literal["default", "gaussian", "pissa", "olora", "loftq", "eva"]
# Initialisations that rewrite the base weights (base = residual + adapter).
BASE_MUTATING_INITS = ("pissa", "olora")
LORA_INIT_QLORA_MESSAGE = (
    "lora.init pissa and olora need a full-precision base (method: lora): on a 4-bit base the "
    "residual weights would be quantised again; use init: loftq for qlora"
)
LOFTQ_MESSAGE = "lora.init loftq is only valid with method: qlora (it corrects 4-bit error)"
LOFTQ_CPU_MESSAGE = "lora.init loftq needs a GPU (resources.gpus >= 1): peft computes it with CUDA"
EVA_OBJECTIVE_MESSAGE = (
    "lora.init eva needs objective: sft (it reads the layer inputs of tokenised sft rows)"
)
DORA_INIT_MESSAGE = (
    "lora.useDora cannot be combined with init pissa or olora (the published adapter could "
    "not be converted back to the original base)"
)


class LoraSpec(_Model):
    """LoRA adapter settings (method lora or qlora)."""

    model_config = _with_rules(
        _cel(
            "!(has(self.useDora) && self.useDora && has(self.init) && "
            "self.init in ['pissa', 'olora'])",
            DORA_INIT_MESSAGE,
            ".useDora",
        )
    )

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
        "'all-linear' adapts every linear layer but the output head, and the fused expert "
        "weights of mixture-of-experts models, and can be combined with other names. "
        "Default: all-linear. A name that matches nothing is a warning; none "
        "matching is an error, found before the weights load.",
        json_schema_extra={"default": DEFAULT_TARGET_MODULES},
    )

    useRslora: bool = Field(
        False,
        description="Rank-stabilised LoRA: scale the adapter by alpha / sqrt(r) instead of "
        "alpha / r, so that high ranks keep learning (peft use_rslora).",
    )
    useDora: bool = Field(
        False,
        description="DoRA: train each weight's magnitude and direction separately (peft "
        "use_dora); closer to full fine-tuning at low rank, slower per step. Not with init "
        "pissa or olora.",
    )
    init: LoraInit = Field(
        "default",
        description="Adapter initialisation: default (A random, B zero), gaussian, pissa "
        "(principal singular vectors of each weight; lora only), olora (QR decomposition; "
        "lora only), loftq (minimises the 4-bit quantisation error of base + adapter; qlora "
        "only), eva (A from the principal directions of each layer's inputs on the first "
        "training batches, B zero; the rank stays r on every layer). pissa and olora move part "
        "of each base weight into the adapter: the published adapter is converted back to a "
        "standard LoRA adapter of rank 2r on the original base.",
    )

    @property
    def effective_alpha(self) -> int:
        return self.alpha if self.alpha is not None else 2 * self.r

    @model_validator(mode="after")
    def _dora_needs_a_convertible_init(self) -> LoraSpec:
        # Mirrors the CEL rule for `kubetune run`.
        if self.useDora and self.init in BASE_MUTATING_INITS:
            raise ValueError(DORA_INIT_MESSAGE)
        return self


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
        description="Jinja chat template for chat data (instead of the tokenizer's). Its "
        "end-of-turn marker becomes the tokenizer's eos and a stop token for generation (it "
        "must be one token of the vocabulary). Loss: {% generation %} markers when present, "
        "else each answer must be rendered verbatim before that marker (see docs/trainer.md).",
    )
    revision: str | None = Field(None, max_length=255, description="Hub revision; hf:// only.")
    promptTemplate: Literal["auto", "alpaca", "chat"] = Field(
        "auto",
        description="How alpaca rows become text: alpaca (### Instruction/### Response), chat "
        "(one user and one assistant turn through the tokenizer's chat template), or auto: "
        "chat when the tokenizer has a chat template (the format the model is served with), "
        "else alpaca.",
    )


DRY_RUN_OBJECTIVE_MESSAGE = (
    "dryRun previews the sft data stage only (what `kubetune preview` shows); "
    "it is not available for objective dpo, orpo, kto or grpo"
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


PackingStrategy = Literal["bfd", "bfd_split"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"]
SPLIT_NEEDS_PACKING_MESSAGE = "packingStrategy bfd_split needs packing: true"
LIGER_CPU_MESSAGE = (
    "training.ligerKernels: true needs a GPU (resources.gpus >= 1): Liger's kernels are "
    "Triton kernels for CUDA"
)


class TrainingSpec(_Model):
    """Optimisation settings."""

    model_config = _with_rules(
        _cel(
            "!has(self.packingStrategy) || self.packingStrategy != 'bfd_split' || "
            "!has(self.packing) || self.packing",
            SPLIT_NEEDS_PACKING_MESSAGE,
            ".packingStrategy",
        )
    )

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
    packingStrategy: PackingStrategy = Field(
        "bfd",
        description="How examples are packed (packing: true): bfd (best-fit decreasing) cuts "
        "a row longer than maxSeqLength at maxSeqLength; bfd_split splits it into pieces of at "
        "most maxSeqLength tokens, each trained as its own example (no token lost; a later "
        "piece does not see the earlier ones).",
    )
    optimizer: Optimizer = Field(
        "adamw",
        description="adamw (PyTorch AdamW, fp32 state); adamw_8bit (bitsandbytes, 8-bit state: "
        "a quarter of the optimizer memory); paged_adamw and paged_adamw_8bit (state in CUDA "
        "unified memory, paged to host memory under pressure; on CPU they run unpaged).",
    )
    neftuneNoiseAlpha: float | None = Field(
        None,
        gt=0,
        le=100,
        description="NEFTune: add uniform noise of scale alpha / sqrt(tokens x hidden) to the "
        "input embeddings while training (5 is the paper's usual value). Unset: off.",
    )
    ligerKernels: bool | None = Field(
        None,
        description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU ...) on GPUs. Unset: "
        "on for CUDA runs of architectures Liger supports, off otherwise; never on CPU "
        "(true needs resources.gpus >= 1).",
    )

    @model_validator(mode="after")
    def _split_needs_packing(self) -> TrainingSpec:
        # Mirrors the CEL rule for `kubetune run`.
        if self.packingStrategy == "bfd_split" and not self.packing:
            raise ValueError(SPLIT_NEEDS_PACKING_MESSAGE)
        return self


GgufQuantization = Literal["f32", "f16", "bf16", "q8_0"]
GGUF_UNIQUE_MESSAGE = "each GGUF quantization may be listed once"


class GgufSpec(_Model):
    """GGUF files for llama.cpp and Ollama, written by llama.cpp's own converter."""

    quantizations: list[GgufQuantization] = Field(
        min_length=1,
        max_length=4,
        description="One gguf/<name>-<quantization>.gguf of the merged model (or, for full, "
        "of the model) per entry: f32, f16, bf16 or q8_0 (llama.cpp's 8-bit).",
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("self.all(q, self.exists_one(p, p == q))", GGUF_UNIQUE_MESSAGE)
            ]
        },
    )

    @field_validator("quantizations")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        # Mirrors the CEL rule for `kubetune run`.
        if len(set(value)) != len(value):
            raise ValueError(GGUF_UNIQUE_MESSAGE)
        return value


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
    gguf: GgufSpec | None = Field(
        None,
        description="Also publish GGUF files (gguf/) for llama.cpp and Ollama. Converted from "
        "the merged model, so for lora and qlora it implies mergeAdapter (merged-model/ is "
        "published too); a LoRA job also gets gguf/<name>-lora-f16.gguf, the adapter as a "
        "llama.cpp LoRA. The base model's architecture and tokenizer are checked with the "
        "converter before training.",
    )

    @property
    def publishes_merged(self) -> bool:
        """LoRA/QLoRA: whether merged-model/ is published (mergeAdapter, or GGUF files,
        which are converted from it)."""
        return self.mergeAdapter or self.gguf is not None


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
    minPreferenceAccuracy: float | None = Field(
        None, ge=0, le=1, description="dpo, orpo, kto: least share of held-out pairs preferred."
    )
    minMeanReward: float | None = Field(
        None, ge=0, le=1, description="grpo: least mean combined reward on held-out prompts."
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

    uri: Annotated[str, AfterValidator(_no_userinfo)] = Field(
        pattern=r"^https?://.+",
        max_length=2048,
        description="Tracking server, e.g. http://mlflow.mlops:5000 (credentials go in "
        "credentialsSecretRef, never in the URI).",
        json_schema_extra={"x-kubernetes-validations": [NO_USERINFO]},
    )
    experiment: str = Field(
        "kubetune", min_length=1, max_length=256, description="Experiment the run is logged in."
    )
    credentialsSecretRef: SecretRef | None = Field(
        None,
        description="Secret with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
        "MLFLOW_TRACKING_TOKEN (all optional keys).",
    )
    registeredModel: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
        description="Register the published adapter (or model) as a new version of this model "
        "in MLflow's Model Registry, pointing at its artifacts and tagged with the base model, "
        "the evaluation metrics and the gate result. A job whose evaluation gate failed is not "
        "registered.",
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


Objective = Literal["sft", "dpo", "orpo", "kto", "grpo"]
PREFERENCE_OBJECTIVES = ("dpo", "orpo", "kto")
# TRL's loss variants that fit each objective's data (DPOConfig / KTOConfig loss_type).
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "bco_pair", "apo_zero", "apo_down")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
PreferenceLossType = Literal[
    "sigmoid", "ipo", "hinge", "robust", "bco_pair", "apo_zero", "apo_down", "kto",
    "apo_zero_unpaired",
]  # fmt: skip


class PreferenceSpec(_Model):
    """Settings of the preference objectives (dpo, orpo, kto)."""

    beta: float = Field(
        0.1,
        gt=0,
        le=100,
        description="dpo and kto: how far the tuned model may move from the reference model "
        "(higher: closer); orpo: weight of the odds-ratio term next to the SFT loss.",
    )
    lossType: PreferenceLossType | None = Field(
        None,
        description="dpo: sigmoid (default), ipo, hinge, robust, bco_pair, apo_zero, apo_down; "
        "kto: kto (default) or apo_zero_unpaired; orpo has none.",
    )
    referenceModel: Literal["live", "precomputed"] | None = Field(
        None,
        description="dpo and kto: live (default) computes the reference log-probabilities "
        "during training: with lora/qlora the reference is the base model with the adapter "
        "switched off (no second copy), with full a frozen copy of the base; precomputed "
        "computes them once before training, so no reference copy stays in memory. orpo needs "
        "no reference model.",
    )


class RewardSpec(_Model):
    """One built-in verifiable reward for grpo; each scores a completion in [0, 1]."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "self.type != 'regex' || has(self.pattern)", "reward type regex needs pattern"
                ),
                _cel(
                    "self.type != 'jsonSchema' || has(self.schema)",
                    "reward type jsonSchema needs schema",
                ),
                _cel(
                    "self.type != 'length' || has(self.targetLength)",
                    "reward type length needs targetLength",
                ),
            ]
        },
    )

    type: Literal["json", "jsonSchema", "regex", "exactMatch", "contains", "length"] = Field(
        description="json: the completion parses as JSON; jsonSchema: it validates against "
        "schema; regex: the whole completion matches pattern; exactMatch / contains: it equals "
        "/ contains the row's reference column (surrounding whitespace ignored); length: 1 at "
        "targetLength characters, falling linearly to 0 at twice (or zero) that length."
    )
    weight: float = Field(1.0, gt=0, le=100, description="Weight in the combined reward.")
    schema_: FreeForm | None = Field(
        None, alias="schema", description="jsonSchema: the JSON Schema the completion must meet."
    )
    pattern: str | None = Field(
        None,
        max_length=96,
        description="regex: the expression the whole completion matches (the job travels to "
        "the trainer in a pod annotation, hence the short limit).",
    )
    column: str = Field(
        "answer",
        min_length=1,
        max_length=32,
        description="exactMatch and contains: the data column holding the reference.",
    )
    targetLength: int | None = Field(
        None, ge=1, le=100000, description="length: the ideal completion length in characters."
    )

    @model_validator(mode="after")
    def _needs_its_argument(self) -> RewardSpec:
        # Mirrors the CEL rules above for `kubetune run`.
        for kind, name, value in (
            ("regex", "pattern", self.pattern),
            ("jsonSchema", "schema", self.schema_),
            ("length", "targetLength", self.targetLength),
        ):
            if self.type == kind and value is None:
                raise ValueError(f"reward type {kind} needs {name}")
        return self


class GrpoSpec(_Model):
    """Settings of the grpo objective: completions sampled per prompt, scored by spec.rewards."""

    numGenerations: int = Field(
        4,
        ge=2,
        le=64,
        description="Completions sampled per prompt (the group whose rewards are compared); "
        "batchSize x gradientAccumulationSteps must be a multiple of it.",
    )
    maxCompletionLength: int = Field(
        256, ge=1, le=8192, description="Most tokens sampled per completion."
    )
    temperature: float = Field(1.0, gt=0, le=2, description="Sampling temperature.")
    beta: float = Field(
        0.0,
        ge=0,
        le=10,
        description="KL penalty towards the reference model; 0 (default) needs no reference model.",
    )


def _objective_rules() -> list[dict]:
    """CEL: which objective settings go together (mirrored in FineTuneJobSpec)."""
    dpo = ", ".join(f"'{t}'" for t in DPO_LOSS_TYPES)
    kto = ", ".join(f"'{t}'" for t in KTO_LOSS_TYPES)
    lossless = "!has(self.preference) || !has(self.preference.lossType)"
    return [
        _cel(
            "!has(self.preference) || self.objective in ['dpo', 'orpo', 'kto']",
            "preference settings are only valid with objective dpo, orpo or kto",
            ".preference",
        ),
        _cel(
            "!(self.objective == 'orpo' && has(self.preference) && "
            "has(self.preference.referenceModel))",
            "objective orpo needs no reference model: remove preference.referenceModel",
            ".preference.referenceModel",
        ),
        _cel(
            f"self.objective != 'orpo' || {lossless}",
            "objective orpo has no lossType",
            ".preference.lossType",
        ),
        _cel(
            f"self.objective != 'dpo' || {lossless} || self.preference.lossType in [{dpo}]",
            f"objective dpo: lossType must be one of {', '.join(DPO_LOSS_TYPES)}",
            ".preference.lossType",
        ),
        _cel(
            f"self.objective != 'kto' || {lossless} || self.preference.lossType in [{kto}]",
            f"objective kto: lossType must be one of {', '.join(KTO_LOSS_TYPES)}",
            ".preference.lossType",
        ),
        _cel(
            "!has(self.grpo) || self.objective == 'grpo'",
            "grpo settings are only valid with objective grpo",
            ".grpo",
        ),
        _cel(
            "!has(self.rewards) || self.objective == 'grpo'",
            "rewards are only valid with objective grpo",
            ".rewards",
        ),
        _cel(
            "self.objective != 'grpo' || (has(self.rewards) && size(self.rewards) > 0)",
            "objective grpo needs at least one reward in rewards",
            ".rewards",
        ),
        _cel(
            "self.objective != 'grpo' || !has(self.training) || "
            "(self.training.batchSize * self.training.gradientAccumulationSteps) % "
            "(has(self.grpo) ? self.grpo.numGenerations : 4) == 0",
            "objective grpo: training.batchSize x gradientAccumulationSteps must be a multiple "
            "of grpo.numGenerations",
            ".grpo.numGenerations",
        ),
        _cel(
            "self.objective == 'sft' || self.dataset.format == 'auto'",
            "dataset.format must be auto for objective dpo, orpo, kto or grpo (the objective "
            "decides the row format)",
            ".dataset.format",
        ),
    ]


def objective_problem(spec: Any) -> str | None:
    """What `_objective_rules` refuses, as one line naming the field (for `kubetune run`)."""
    objective, preference = spec.objective, spec.preference
    loss = preference.lossType if preference is not None else None
    if preference is not None and objective not in PREFERENCE_OBJECTIVES:
        return "spec.preference: only valid with objective dpo, orpo or kto"
    if objective == "orpo" and preference is not None and preference.referenceModel:
        return "spec.preference.referenceModel: objective orpo needs no reference model"
    if objective == "orpo" and loss:
        return "spec.preference.lossType: objective orpo has no lossType"
    for name, allowed in (("dpo", DPO_LOSS_TYPES), ("kto", KTO_LOSS_TYPES)):
        if objective == name and loss and loss not in allowed:
            return (
                f"spec.preference.lossType: objective {name}: must be one of {', '.join(allowed)}"
            )
    if spec.grpo is not None and objective != "grpo":
        return "spec.grpo: only valid with objective grpo"
    if spec.rewards is not None and objective != "grpo":
        return "spec.rewards: only valid with objective grpo"
    if objective == "grpo":
        if not spec.rewards:
            return "spec.rewards: objective grpo needs at least one reward"
        generations = spec.grpo.numGenerations if spec.grpo is not None else 4
        per_step = spec.training.batchSize * spec.training.gradientAccumulationSteps
        if per_step % generations:
            return (
                f"spec.grpo.numGenerations: training.batchSize x gradientAccumulationSteps "
                f"({per_step}) must be a multiple of {generations}"
            )
    if objective != "sft" and spec.dataset.format != "auto":
        return f"spec.dataset.format: must be auto for objective {objective}"
    return None


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
                _cel(
                    "!(has(self.lora) && has(self.lora.init) && self.lora.init == 'loftq' && "
                    "self.method != 'qlora')",
                    LOFTQ_MESSAGE,
                    ".lora.init",
                ),
                _cel(
                    "!(has(self.lora) && has(self.lora.init) && self.lora.init == 'loftq' && "
                    "has(self.resources) && has(self.resources.gpus) && self.resources.gpus == 0)",
                    LOFTQ_CPU_MESSAGE,
                    ".lora.init",
                ),
                _cel(
                    "!(has(self.lora) && has(self.lora.init) && "
                    "self.lora.init in ['pissa', 'olora'] && self.method == 'qlora')",
                    LORA_INIT_QLORA_MESSAGE,
                    ".lora.init",
                ),
                _cel(
                    "!(has(self.training) && has(self.training.ligerKernels) && "
                    "self.training.ligerKernels && has(self.resources) && "
                    "has(self.resources.gpus) && self.resources.gpus == 0)",
                    LIGER_CPU_MESSAGE,
                    ".training.ligerKernels",
                ),
                _cel(
                    "!(has(self.dryRun) && self.dryRun && has(self.objective) && "
                    "self.objective != 'sft')",
                    DRY_RUN_OBJECTIVE_MESSAGE,
                    ".dryRun",
                ),
                _cel(
                    "!(has(self.lora) && has(self.lora.init) && self.lora.init == 'eva' && "
                    "has(self.objective) && self.objective != 'sft')",
                    EVA_OBJECTIVE_MESSAGE,
                    ".lora.init",
                ),
                _cel(_long_text_rule(), LONG_TEXT_MESSAGE),
                *_objective_rules(),
            ]
        },
    )

    model: ModelSource = Field(description="Base model.")
    method: Literal["full", "lora", "qlora"] = Field(
        "lora", description="full: all parameters; lora: adapter; qlora: adapter on a 4-bit base."
    )
    objective: Objective = Field(
        "sft",
        description="What training optimises: sft (imitate the answers), dpo / orpo (prefer "
        "chosen over rejected answers), kto (desirable vs undesirable answers), grpo (sample "
        "answers and reinforce those the rewards score highest). Orthogonal to method.",
    )
    preference: PreferenceSpec | None = Field(
        None, description="dpo, orpo and kto settings (defaults filled in)."
    )
    grpo: GrpoSpec | None = Field(None, description="grpo settings (defaults filled in).")
    rewards: list[RewardSpec] | None = Field(
        None,
        min_length=1,
        max_length=4,
        description="grpo: built-in verifiable rewards, combined as their weighted mean.",
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
    dryRun: bool = Field(
        False,
        description="Check the job without training: one trainer pod without a GPU runs the "
        "model-source and dataset stages (what `kubetune preview` runs) and writes the preview "
        "(first rows as tokenised, loss tokens marked, totals) to <output>/<namespace>/<name>/"
        "preview.json. The job ends in phase Validated with the totals in status.preview, or "
        "Failed (BadInput) naming the problem the real run would refuse. Nothing is trained or "
        "published; to train, create the job again without dryRun.",
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
        None,
        ge=1,
        description="Fail the job (DeadlineExceeded) when the trainer has run longer than "
        "this, summed over all attempts: suspending and resuming does not restart it.",
    )
    terminationGracePeriodSeconds: int | None = Field(
        None,
        ge=1,
        le=86400,
        description="Time a stopped trainer pod gets to finish its step and upload a "
        "checkpoint before it is killed (default: the operator's floor plus the checkpoint "
        "size estimate).",
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
    def trainer_pods(self) -> int:
        """Pods the operator runs: one per node, or one for a dry run (no gang)."""
        return 1 if self.dryRun else self.resources.nodes

    @property
    def pod_gpus(self) -> int:
        """GPUs each trainer pod requests: none for a dry run."""
        return 0 if self.dryRun else self.resources.gpus

    @property
    def strategy(self) -> Literal["none", "ddp", "fsdp"]:
        """The resolved strategy of the gang the resources ask for (the operator's view; the
        trainer resolves it for the world size torchrun started, `strategy_for`)."""
        return self.strategy_for(self.world_size)

    def strategy_for(self, world_size: int) -> Literal["none", "ddp", "fsdp"]:
        """The strategy `world_size` processes run: none for one process; auto -> fsdp for
        full, else ddp."""
        if world_size <= 1:
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
        problem = objective_problem(self)
        if problem:
            raise ValueError(problem)
        if self.dryRun and self.objective != "sft":
            raise ValueError(f"spec.dryRun: {DRY_RUN_OBJECTIVE_MESSAGE}")
        if self.objective in PREFERENCE_OBJECTIVES and self.preference is None:
            self.preference = PreferenceSpec()
        if self.objective == "grpo" and self.grpo is None:
            self.grpo = GrpoSpec()
        init = self.lora.init if self.lora is not None else "default"
        if init == "loftq" and self.method != "qlora":
            raise ValueError(f"spec.lora.init: {LOFTQ_MESSAGE}")
        if init == "loftq" and self.resources.gpus == 0:
            raise ValueError(f"spec.lora.init: {LOFTQ_CPU_MESSAGE}")
        if init == "eva" and self.objective != "sft":
            raise ValueError(f"spec.lora.init: {EVA_OBJECTIVE_MESSAGE}")
        if init in BASE_MUTATING_INITS and self.method == "qlora":
            raise ValueError(f"spec.lora.init: {LORA_INIT_QLORA_MESSAGE}")
        if self.training.ligerKernels and self.resources.gpus == 0:
            raise ValueError(f"spec.{LIGER_CPU_MESSAGE}")
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

# Validated: a dry run (spec.dryRun) that passed; it never trains.
Phase = Literal["Pending", "Queued", "Running", "Suspended", "Succeeded", "Failed", "Validated"]
PHASES: tuple[str, ...] = (
    "Pending",
    "Queued",
    "Running",
    "Suspended",
    "Succeeded",
    "Failed",
    "Validated",
)
TERMINAL_PHASES = ("Succeeded", "Failed", "Validated")


# Status parts forbid unknown keys: a key the operator misspells fails in its tests, instead
# of being pruned by the API server without a word.
_STATUS_CONFIG = ConfigDict(extra="forbid")
# Bounds of the progress numbers: the trainer pushes them over HTTP, so each is checked before
# it is stored (finite, in range); a status patch with NaN in it would not even be JSON.
MAX_STEPS = 10**9
MAX_SECONDS = 10**9


# An RFC 3339 timestamp, as Kubernetes writes them (2026-01-01T00:00:00Z).
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def _rfc3339(value: str) -> str:
    if not RFC3339.fullmatch(value):
        raise ValueError(f"not an RFC 3339 time: {value[:64]!r}")
    datetime.fromisoformat(value.upper())  # a month 13 or a 25th hour is refused here
    return value


# A timestamp that is checked, not just named: other code parses it and must not choke on it.
Rfc3339 = Annotated[
    str, AfterValidator(_rfc3339), Field(max_length=40, json_schema_extra={"format": "date-time"})
]


class Condition(BaseModel):
    """A Kubernetes-style condition."""

    model_config = _STATUS_CONFIG

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    lastTransitionTime: str | None = Field(None, json_schema_extra={"format": "date-time"})
    observedGeneration: int | None = None


class ProgressNumbers(BaseModel):
    """The numbers of a progress report: declared once, for the trainer's pushes
    (kubetune.api.contract.ProgressEvent) and status.progress alike."""

    model_config = _STATUS_CONFIG

    step: int | None = Field(None, ge=0, le=MAX_STEPS, description="Optimizer steps done.")
    totalSteps: int | None = Field(
        None, ge=0, le=MAX_STEPS, description="Optimizer steps of the whole run."
    )
    epoch: float | None = Field(
        None, ge=0, le=MAX_STEPS, allow_inf_nan=False, description="Passes over the data so far."
    )
    loss: float | None = Field(None, allow_inf_nan=False, description="Latest training loss.")
    evalLoss: float | None = Field(
        None, allow_inf_nan=False, description="Latest loss on the validation split."
    )
    learningRate: float | None = Field(None, allow_inf_nan=False)
    tokensPerSecond: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Non-padding tokens trained per second."
    )
    etaSeconds: float | None = Field(
        None, ge=0, le=MAX_SECONDS, allow_inf_nan=False, description="Estimated seconds left."
    )


class Progress(ProgressNumbers):
    """Latest training progress reported by the trainer (epoch, losses, learning rate, rate
    and ETA to 4 significant digits)."""

    percent: float | None = None
    summary: str | None = Field(None, description="Human-readable, e.g. '120/300 (40%)'.")
    updatedAt: str | None = Field(None, json_schema_extra={"format": "date-time"})


class Artifacts(BaseModel):
    """Where the results are."""

    model_config = _STATUS_CONFIG

    model: str | None = Field(None, description="Adapter (LoRA/QLoRA) or model (full) location.")
    mergedModel: str | None = None
    manifest: str | None = None
    report: str | None = None
    metrics: str | None = None
    serving: str | None = Field(
        None,
        description="Serving manifests: KServe InferenceService and LLMInferenceService and "
        "the vllm serve line (serve/; serve/merged/ for the merged model).",
    )
    servingNote: str | None = Field(
        None,
        description="Why vLLM would refuse the published adapter (modules_to_save, DoRA, a "
        "rank above 512 ...); serve the merged model instead. Unset: it loads.",
    )
    gguf: str | None = Field(
        None,
        description="GGUF files (spec.output.gguf): gguf/<name>-<quantization>.gguf and, "
        "for LoRA jobs, gguf/<name>-lora-f16.gguf.",
    )


class Metrics(BaseModel):
    """Headline numbers of a finished run."""

    model_config = _STATUS_CONFIG

    trainLoss: float | None = None
    evalLoss: float | None = None
    perplexity: float | None = None
    baseEvalLoss: float | None = None
    mergedEvalLoss: float | None = Field(
        None,
        description="QLoRA with mergeAdapter: evalLoss of the published merged model (16-bit "
        "base with the adapter merged) on the same examples; the other metrics describe the "
        "model as trained, the 4-bit base with the adapter.",
    )
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
    preferenceAccuracy: float | None = Field(
        None,
        description="dpo, orpo, kto: share of held-out pairs whose mean log-likelihood per "
        "token favours chosen over rejected.",
    )
    basePreferenceAccuracy: float | None = None
    preferenceMargin: float | None = Field(
        None, description="Mean of that log-likelihood margin (chosen - rejected, per token)."
    )
    basePreferenceMargin: float | None = None
    meanReward: float | None = Field(
        None, description="grpo: mean combined reward of greedy answers to held-out prompts."
    )
    baseMeanReward: float | None = None
    fullRewardShare: float | None = Field(
        None, description="grpo: share of those answers with the full reward (1)."
    )
    baseFullRewardShare: float | None = None
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

    model_config = _STATUS_CONFIG

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


# Rows a dry run's status names (of those left out); the preview document lists more.
PREVIEW_ROWS_NAMED = 5


class PreviewStatus(BaseModel):
    """What a dry run (spec.dryRun) found: the totals of `kubetune preview`; the whole preview
    (first rows as tokenised, loss tokens marked) is the JSON document at `uri`."""

    model_config = _STATUS_CONFIG

    uri: str | None = Field(None, description="The preview document (JSON).")
    format: str | None = Field(None, description="Row format as detected, e.g. chat.")
    trainRows: int | None = Field(None, description="Training rows.")
    validationRows: int | None = Field(None, description="Validation rows.")
    tokens: int | None = Field(None, description="Training tokens after maxSeqLength.")
    trainedTokens: int | None = Field(None, description="Of which carry loss.")
    truncatedRows: int | None = Field(None, description="Rows cut at maxSeqLength.")
    excludedRows: int | None = Field(
        None, description="Rows left out: maxSeqLength would cut away every loss token."
    )
    excludedExamples: list[str] | None = Field(
        None,
        max_length=PREVIEW_ROWS_NAMED,
        description=f"The first {PREVIEW_ROWS_NAMED} rows left out, by file and row.",
    )
    packing: bool | None = None
    sequences: int | None = Field(
        None, description="What one epoch feeds the model: packed rows, or rows."
    )
    packingEfficiency: float | None = Field(
        None, description="Real tokens / slot tokens of the packed rows."
    )
    stepsPerEpoch: int | None = Field(None, description="Optimizer steps per epoch.")
    parameters: int | None = Field(None, description="Parameters of the base model.")
    memoryEstimateGiBPerGpu: float | None = Field(
        None, description="GPU memory per GPU as the operator estimates it (unset on CPU)."
    )


class TrackingStatus(BaseModel):
    """Where one tracking backend logged the run, or why it could not."""

    model_config = _STATUS_CONFIG

    backend: Literal["mlflow", "wandb"]
    state: Literal["Logged", "Unavailable"]
    run: str | None = Field(None, description="The run: an MLflow run URL or W&B run path.")
    message: str | None = Field(None, description="Why logging stopped, when it did.")
    modelVersion: str | None = Field(
        None, description="The Model Registry version this run registered: NAME/VERSION."
    )


# Status keeps this many attempts (the newest): a job retried without end must not grow its
# object without bound.
MAX_ATTEMPTS_SHOWN = 20
# Stopped: ended by a suspension, not by the trainer or the node.
AttemptResult = Literal["Pending", "Running", "Succeeded", "Failed", "Stopped"]


class Attempt(BaseModel):
    """One run of the trainer (in a gang: of rank 0's pod), as the operator saw it."""

    model_config = _STATUS_CONFIG

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

    model_config = _STATUS_CONFIG

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
    preview: PreviewStatus | None = Field(
        None, description="A dry run's totals (spec.dryRun); the preview document's URI."
    )

    def wire(self) -> dict[str, Any]:
        """The status as the API server stores it (no unset fields): what patches diff."""
        return self.model_dump(mode="json", exclude_none=True)


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
