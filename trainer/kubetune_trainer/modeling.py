"""Building the model to train: full (all parameters), LoRA, or QLoRA (LoRA on a 4-bit base).

Precision follows the hardware: bf16 on GPUs that support it, fp16 mixed precision on older
GPUs, fp32 on CPU (CPUs have no fast half-precision matmuls, and fp32 keeps tiny test runs
numerically stable).

Attention follows the batch layout. Packed (padding-free) batches hold several examples in one
row, delimited by `cu_seq_lens`. transformers' `sdpa` turns that into a dense block-diagonal
mask and computes attention over the whole row, the masked blocks between examples included;
a variable-length kernel computes only each example's own causal triangle. That is
FlashAttention 2's varlen path on GPUs that have it installed, and on CPU
`varlen_sdpa_attention` below: causal SDPA once per packed example.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import is_flash_attn_2_available

from kubetune.api.v1alpha1 import FineTuneJobSpec, LoraSpec, QuantizationSpec
from kubetune_trainer.errors import BadInputError

log = logging.getLogger(__name__)

Precision = Literal["bf16", "fp16", "fp32"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Hardware:
    """What the trainer runs on; decides precision and device placement."""

    device: Literal["cuda", "cpu"]
    bf16_supported: bool

    @classmethod
    def detect(cls) -> Hardware:
        if torch.cuda.is_available():
            return cls("cuda", torch.cuda.is_bf16_supported())
        return cls("cpu", False)

    @property
    def precision(self) -> Precision:
        if self.device == "cpu":
            return "fp32"
        return "bf16" if self.bf16_supported else "fp16"

    @property
    def weights_dtype(self) -> torch.dtype:
        # fp16 training keeps fp32 master weights (autocast); bf16 trains in bf16.
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


VARLEN_SDPA = "kubetune_varlen_sdpa"


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over a padding-free packed row, one causal SDPA call per packed example.

    `query` is (1, heads, tokens, head_dim); TRL's padding-free collator delimits the examples
    with `cu_seq_lens_q` (start offsets plus the total). Anything else (padded batches,
    generation with a cache) goes to transformers' own SDPA attention unchanged.
    """
    packed = (
        cu_seq_lens_q is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]
        and (cu_seq_lens_k is None or torch.equal(cu_seq_lens_q, cu_seq_lens_k))
    )
    if not packed:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    bounds = cu_seq_lens_q.tolist()
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
        if end > start
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


# The attention function ignores the mask for packed rows, but unpacked batches still need
# transformers' SDPA mask (padding, causal skip), so the mask builder is SDPA's.
AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)


def packed_attention(hardware: Hardware) -> str:
    """The attention implementation for padding-free packed rows, per device.

    GPU: FlashAttention 2's varlen kernel where the package is installed (one kernel call for
    the whole row, in the bf16/fp16 GPUs train in); without it transformers' `sdpa` with the
    block-diagonal mask (SDPA's memory-efficient kernel). The per-example loop is not used on
    GPUs: reading the example bounds there is a device-to-host sync in every layer, and it
    launches kernels per example.
    CPU: causal SDPA once per packed example (PyTorch's flash kernel for CPU). Measured with
    a 512-token row of six examples (LoRA, one thread, see docs/benchmarks.md): 16% less
    time per training step than `sdpa` with the block-diagonal mask, 38% less than `eager`;
    `flex_attention` has no backward pass on CPU.
    """
    if hardware.device == "cuda":
        return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"
    return VARLEN_SDPA


def use_packed_attention(model: Any, hardware: Hardware) -> str | None:
    """Switch `model` to the packed-row attention; returns its name, or None when the model
    keeps its own (remote-code models that do not dispatch through transformers' attention
    interface, or flash-attn not supporting the model)."""
    if not getattr(model, "_supports_attention_backend", False):
        return None
    implementation = packed_attention(hardware)
    try:
        model.set_attn_implementation(implementation)
    except (ValueError, ImportError) as error:
        log.info("keeping %s attention: %s", model.config._attn_implementation, error)
        return None
    return implementation


@dataclass
class BuiltModel:
    """The model ready for the trainer, its tokenizer, and why it was built this way."""

    model: Any  # PreTrainedModel, or PeftModel for lora/qlora
    tokenizer: Any
    method: str
    hardware: Hardware
    quantized: bool
    notes: list[str] = field(default_factory=list)

    @property
    def is_adapter(self) -> bool:
        return isinstance(self.model, PeftModel)


def lora_config(lora: LoraSpec) -> LoraConfig:
    targets: list[str] | str = lora.targetModules
    if targets == ["all-linear"]:
        targets = "all-linear"  # peft's shorthand: every linear layer except the output head
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.effective_alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def quantization_config(
    quant: QuantizationSpec, hardware: Hardware
) -> tuple[BitsAndBytesConfig, str | None]:
    """bitsandbytes settings for the frozen base; on CPU the compute dtype is float32."""
    compute = _DTYPES[quant.computeDtype]
    note = None
    if hardware.device == "cpu" and compute is not torch.float32:
        note = (
            f"quantization.computeDtype {quant.computeDtype} ignored on CPU: using float32 "
            "(CPU half-precision matmuls are slow and lossy)"
        )
        compute = torch.float32
    elif compute is torch.bfloat16 and not hardware.bf16_supported:
        note = "quantization.computeDtype bfloat16 not supported by this GPU: using float16"
        compute = torch.float16
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quantType,
        bnb_4bit_use_double_quant=quant.doubleQuant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=torch.uint8,
    )
    return config, note


def load_tokenizer(model_path: Path, *, trust_remote_code: bool = False) -> Any:
    """The base model's tokenizer, with a pad token (eos when the model defines none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise BadInputError(f"{model_path}: cannot load tokenizer ({first_line})") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise BadInputError(f"{model_path}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    model_path: Path,
    *,
    hardware: Hardware,
    quantization: BitsAndBytesConfig | None = None,
    trust_remote_code: bool = False,
) -> Any:
    kwargs: dict[str, Any] = {
        "dtype": hardware.weights_dtype,
        "trust_remote_code": trust_remote_code,
    }
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        # bitsandbytes quantises while loading, on the device the weights land on.
        kwargs["device_map"] = {"": 0 if hardware.device == "cuda" else "cpu"}
    try:
        return AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise BadInputError(f"{model_path}: cannot load model ({first_line})") from None


def keep_4bit_weights_differentiable(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, a Linear4bit run in eval mode without grad (the evaluation
    between epochs) repacks its weight for a kernel that has no backward, and keeps it
    that way: later training steps then get no gradient through the frozen base layers.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def build_model(
    spec: FineTuneJobSpec, model_path: Path, *, hardware: Hardware | None = None
) -> BuiltModel:
    """Load the base model at `model_path` and prepare it for `spec.method`."""
    hardware = hardware or Hardware.detect()
    trust = spec.model.trustRemoteCode
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust)
    notes = [f"device {hardware.device}, precision {hardware.precision}"]

    def load(quantization: BitsAndBytesConfig | None = None) -> Any:
        model = load_base_model(
            model_path, hardware=hardware, quantization=quantization, trust_remote_code=trust
        )
        # Packing in train.py is padding-free (TRL's bfd strategy): rows carry cu_seq_lens.
        if spec.training.packing and (attention := use_packed_attention(model, hardware)):
            notes.append(f"attention {attention} (packed rows)")
        return model

    if spec.method == "full":
        model = load()
        return BuiltModel(model, tokenizer, spec.method, hardware, quantized=False, notes=notes)

    assert spec.lora is not None  # filled in by the spec's validator for lora/qlora
    quantized = spec.method == "qlora"
    bnb = None
    if quantized:
        assert spec.quantization is not None
        bnb, note = quantization_config(spec.quantization, hardware)
        if note:
            notes.append(note)
    model = load(bnb)
    if quantized and hardware.device == "cpu":
        keep_4bit_weights_differentiable(model)
    if quantized:
        # Casts norms to fp32 and makes inputs require grad so checkpointing works on a
        # frozen 4-bit base.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.training.gradientCheckpointing
        )
    try:
        model = get_peft_model(model, lora_config(spec.lora))
    except ValueError as error:
        # peft names the missing modules: "Target modules {'x_proj'} not found in the base model"
        raise BadInputError(f"spec.lora.targetModules: {str(error).splitlines()[0]}") from None
    trainable, total = model.get_nb_trainable_parameters()
    notes.append(f"trainable parameters {trainable:,} of {total:,}")
    return BuiltModel(model, tokenizer, spec.method, hardware, quantized=quantized, notes=notes)
