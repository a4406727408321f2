"""Building the model to train: full (all parameters), LoRA, or QLoRA (LoRA on a 4-bit base).

Precision follows the hardware: bf16 on GPUs with native bf16 (compute capability 8.0 and
newer), fp16 mixed precision on older GPUs, fp32 on CPU (CPUs have no fast half-precision
matmuls, and fp32 keeps tiny test runs numerically stable). Full fine-tuning keeps fp32 master
weights and computes in half precision under autocast; LoRA freezes a half-precision base and
trains fp32 adapters.

Attention follows the batch layout. Packed (padding-free) batches hold several examples in one
row, delimited by `cu_seq_lens`. transformers' `sdpa` turns that into a dense block-diagonal
mask and computes attention over the whole row, the masked blocks between examples included;
a variable-length kernel computes only each example's own causal triangle. That is
FlashAttention 2's varlen path on GPUs that have it installed, PyTorch's own varlen kernel on
other GPUs, and on CPU `varlen_sdpa_attention` below: causal SDPA once per packed example.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    set_seed,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import is_flash_attn_2_available

from kubetune.api.v1alpha1 import FineTuneJobSpec, LoraSpec, QuantizationSpec
from kubetune_trainer import distributed, moe, options
from kubetune_trainer.errors import BadInputError

log = logging.getLogger(__name__)

Precision = Literal["bf16", "fp16", "fp32"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def native_bf16(capability: tuple[int, int] | None) -> bool:
    """bf16 tensor cores exist from Ampere (compute capability 8.0) on.

    `torch.cuda.is_bf16_supported()` also says yes on T4/V100, where bf16 is emulated: slow,
    and it hides the fp16 mixed precision those GPUs are built for.
    """
    return capability is not None and capability >= (8, 0)


@dataclass(frozen=True)
class Hardware:
    """What the trainer runs on; decides precision and device placement."""

    device: Literal["cuda", "cpu"]
    bf16_supported: bool  # native bf16 (see `native_bf16`), not emulated
    capability: tuple[int, int] | None = None  # CUDA compute capability
    device_count: int = 1

    @classmethod
    def detect(cls) -> Hardware:
        if torch.cuda.is_available():
            capability = torch.cuda.get_device_capability(0)
            return cls("cuda", native_bf16(capability), capability, torch.cuda.device_count())
        return cls("cpu", False, None, 0)

    @property
    def precision(self) -> Precision:
        if self.device == "cpu":
            return "fp32"
        return "bf16" if self.bf16_supported else "fp16"

    @property
    def weights_dtype(self) -> torch.dtype:
        """Dtype of frozen weights (the base under a LoRA adapter, a merged export)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            self.precision
        ]

    def train_dtype(self, method: str) -> torch.dtype:
        """Dtype the model loads in for `method`.

        Full fine-tuning keeps fp32 master weights and optimizer state and computes in
        bf16/fp16 under autocast (16 bytes per parameter, what the operator's estimate
        assumes): pure-bf16 updates of 2e-5 vanish against bf16's 8-bit mantissa. LoRA
        freezes the base in half precision; its adapter is fp32 (peft).
        """
        return torch.float32 if method == "full" else self.weights_dtype

    @property
    def tf32(self) -> bool:
        """TF32 matmuls for the fp32 parts of training: Ampere (8.0) and newer."""
        return self.device == "cuda" and native_bf16(self.capability)

    def device_map(self) -> dict[str, Any] | None:
        """Load weights straight onto this process's GPU (no full copy in host memory first):
        under a distributed launcher each process owns the GPU of its LOCAL_RANK."""
        if self.device != "cuda":
            return None
        return {"": distributed.current().local_rank}


def check_single_process(hardware: Hardware, environ: dict[str, str] | None = None) -> None:
    """Refuse several GPUs in one process.

    transformers' Trainer wraps the model in `nn.DataParallel` when one process sees several
    GPUs: every step replicates the model from GPU 0, which holds all gradients, optimizer
    state and outputs; slower than one GPU for LoRA and out of memory for large models.
    Several GPUs need one process per GPU (a distributed launcher sets WORLD_SIZE).
    """
    if hardware.device != "cuda" or hardware.device_count <= 1:
        return
    if distributed.current(environ).distributed:
        return
    raise BadInputError(
        f"spec.resources.gpus: this trainer sees {hardware.device_count} GPUs in one process; "
        "it trains on one GPU per process: run it under torchrun (the operator does for "
        "gpus > 1; locally `kubetune run --processes N`)"
    )


VARLEN_SDPA = "kubetune_varlen_sdpa"


def _window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal band: position i sees j when 0 <= i - j < window (transformers' convention)."""
    positions = torch.arange(length, device=device)
    distance = positions[:, None] - positions[None, :]
    return (distance >= 0) & (distance < window)


def _example_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    dropout: float,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """Causal SDPA over one packed example, within its sliding window when the model has one."""
    length = query.shape[2]
    windowed = sliding_window is not None and length > sliding_window
    return torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=_window_mask(length, sliding_window, query.device) if windowed else None,
        dropout_p=dropout,
        is_causal=not windowed,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )


def torch_varlen_available() -> bool:
    """PyTorch's own variable-length attention kernel (torch >= 2.9, CUDA only)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _gpu_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    *,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """One varlen kernel call for the whole packed row (no host sync, no per-example loop)."""
    from torch.nn.attention.varlen import varlen_attn

    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    cu = cu_seq_lens.to(device=query.device, dtype=torch.int32)
    out = varlen_attn(
        query[0].transpose(0, 1),  # (tokens, heads, head_dim)
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        cu,
        cu,
        max_length,
        max_length,
        scale=scaling,
        window_size=window,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.unsqueeze(0)  # (1, tokens, heads, head_dim)


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
    """Attention over a padding-free packed row: each example attends only to itself.

    `query` is (1, heads, tokens, head_dim); TRL's padding-free collator delimits the examples
    with `cu_seq_lens_q` (start offsets plus the total) and `max_length_q`. On a GPU in half
    precision this is PyTorch's varlen kernel (one call); elsewhere causal SDPA once per
    example. A model's `sliding_window` (Mistral, Qwen2 ...) is honoured on both paths.
    Anything else (padded batches, generation with a cache) goes to transformers' own SDPA
    attention unchanged.
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
    sliding_window = kwargs.get("sliding_window")
    max_length = kwargs.get("max_length_q")
    if (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and max_length is not None
        and dropout == 0.0
        and torch_varlen_available()
    ):
        out = _gpu_varlen(
            query,
            key,
            value,
            cu_seq_lens_q,
            int(max_length),
            scaling=scaling,
            sliding_window=sliding_window,
        )
        return out, None
    bounds = cu_seq_lens_q.tolist()
    outputs = [
        _example_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            dropout=dropout,
            scaling=scaling,
            sliding_window=sliding_window,
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

    GPU: FlashAttention 2's varlen kernel where the package is installed; otherwise
    `varlen_sdpa_attention`, which calls PyTorch's own varlen kernel (torch >= 2.9) with the
    row's `cu_seq_lens`. Both compute only each example's causal triangle; `sdpa` with a
    dense block-diagonal mask (the last resort, for older torch) computes the whole
    flattened batch: 4x the attention FLOPs at 4 examples per row.
    CPU: causal SDPA once per packed example (PyTorch's flash kernel for CPU). Measured with
    a 512-token row of six examples (LoRA, one thread, see docs/benchmarks.md): 16% less
    time per training step than `sdpa` with the block-diagonal mask, 38% less than `eager`;
    `flex_attention` has no backward pass on CPU.
    """
    if hardware.device == "cuda":
        if is_flash_attn_2_available():
            return "flash_attention_2"
        return VARLEN_SDPA if torch_varlen_available() else "sdpa"
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
    packing: bool = False  # packed rows with per-example attention (may differ from the spec)
    warnings: list[str] = field(default_factory=list)  # where the run deviates from the spec
    # lora/qlora: modules, fused expert parameters adapted and not (moe.AdapterTargets)
    adapter_targets: dict[str, Any] = field(default_factory=dict)
    initial_adapter: Path | None = None  # PiSSA/OLoRA: the adapter as initialised
    liger: bool = False  # Liger's kernels applied by the trainer

    @property
    def is_adapter(self) -> bool:
        return isinstance(self.model, PeftModel)


def lora_config(
    lora: LoraSpec,
    target_modules: list[str] | str | None = None,
    target_parameters: list[str] | None = None,
) -> LoraConfig:
    """peft's LoraConfig; `target_modules` as resolved by `resolve_target_modules`,
    `target_parameters` the fused expert weights (`moe.split_targets`), adapted without
    dropout (peft's parameter adapters have none)."""
    targets: list[str] | str = target_modules if target_modules is not None else lora.targetModules
    if targets == ["all-linear"]:
        targets = "all-linear"  # peft's shorthand: every linear layer except the output head
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.effective_alpha,
        lora_dropout=0.0 if target_parameters else lora.dropout,
        target_modules=targets,
        target_parameters=target_parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=lora.useRslora,
        use_dora=lora.useDora,
        init_lora_weights=options.init_lora_weights(lora),
        eva_config=options.eva_config() if lora.init == "eva" else None,
    )


def meta_model(model_path: Path, *, trust_remote_code: bool = False) -> Any:
    """The model's module tree without weights (meta device): seconds for any size."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise BadInputError(f"{model_path}: cannot load model ({_first_line(error)})") from None


def linear_layer_names(model: Any) -> list[str]:
    """Last name component of every linear layer but the output head (what all-linear means)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if name and isinstance(module, torch.nn.Linear | Conv1D) and module is not head
        }
    )


def resolve_target_modules(targets: list[str], model: Any) -> tuple[list[str], list[str]]:
    """The module names to adapt in `model` (a meta model will do) and warnings.

    A name matches a module whose name is it or ends with "." + it (peft's rule);
    'all-linear' stands for every linear layer but the output head and combines with names.
    A name that matches nothing is a warning; when nothing matches, BadInputError.
    """
    module_names = [name for name, _ in model.named_modules() if name]
    linear = linear_layer_names(model)
    resolved: set[str] = set()
    unmatched: list[str] = []
    for target in targets:
        if target == "all-linear":
            resolved.update(linear)
        elif any(name == target or name.endswith("." + target) for name in module_names):
            resolved.add(target)
        else:
            unmatched.append(target)
    model_type = getattr(model.config, "model_type", "this")
    if not resolved:
        raise BadInputError(
            f"spec.lora.targetModules: {', '.join(targets)} match no module of this {model_type} "
            f"model; its linear layers are {', '.join(linear)} (or use all-linear)"
        )
    warnings = [
        f"spec.lora.targetModules: {name!r} matches no module of this {model_type} model "
        f"(linear layers: {', '.join(linear)})"
        for name in unmatched
    ]
    return sorted(resolved), warnings


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
        raise BadInputError(f"{model_path}: cannot load tokenizer ({_first_line(error)})") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise BadInputError(f"{model_path}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    model_path: Path,
    *,
    hardware: Hardware,
    dtype: torch.dtype | None = None,
    quantization: BitsAndBytesConfig | None = None,
    trust_remote_code: bool = False,
    sharded: bool = False,
) -> Any:
    """The base model, loaded straight onto its device: on a GPU the weights go from the
    files to GPU memory shard by shard, so host memory never holds the whole model.
    `sharded` (FSDP): load into host memory; FSDP moves each process's shard to its GPU, so
    no GPU ever holds the whole model."""
    kwargs: dict[str, Any] = {
        "dtype": dtype or hardware.weights_dtype,
        "trust_remote_code": trust_remote_code,
    }
    device_map = None if sharded else hardware.device_map()
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        # bitsandbytes quantises while loading, on the device the weights land on.
        device_map = device_map or {"": "cpu"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError) as error:
        raise BadInputError(f"{model_path}: cannot load model ({_first_line(error)})") from None


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
    spec: FineTuneJobSpec,
    model_path: Path,
    *,
    hardware: Hardware | None = None,
    tokenizer: Any | None = None,
) -> BuiltModel:
    """Load the base model at `model_path` and prepare it for `spec.method`.

    Everything that can be wrong with the settings (GPU count, LoRA target names) is checked
    before the weights load.
    """
    hardware = hardware or Hardware.detect()
    check_single_process(hardware)
    trust = spec.model.trustRemoteCode
    tokenizer = tokenizer or load_tokenizer(model_path, trust_remote_code=trust)
    notes = [f"device {hardware.device}, precision {hardware.precision}"]
    targets, warnings = None, []
    experts = None
    if spec.lora is not None:
        skeleton = meta_model(model_path, trust_remote_code=trust)
        experts = moe.split_targets(spec.lora.targetModules, skeleton)
        targets = []
        if experts.remaining or not experts.parameters:
            targets, warnings = resolve_target_modules(experts.remaining, skeleton)
        model_type = getattr(skeleton.config, "model_type", "this")
        if experts.not_adapted:
            warnings.append(moe.not_adapted_warning(experts.not_adapted, model_type))
        if experts.parameters and spec.lora.dropout:
            warnings.append(moe.DROPOUT_NOTE.format(dropout=spec.lora.dropout))
        del skeleton

    quantized = spec.method == "qlora"
    bnb = None
    if quantized:
        assert spec.quantization is not None
        bnb, note = quantization_config(spec.quantization, hardware)
        if note:
            notes.append(note)
    # The seed decides the LoRA initialisation (and any weight the checkpoint lacks).
    set_seed(spec.training.seed)
    model = load_base_model(
        model_path,
        hardware=hardware,
        dtype=hardware.train_dtype(spec.method),
        quantization=bnb,
        trust_remote_code=trust,
        sharded=distributed.run_strategy(spec) == "fsdp",
    )
    packing = spec.training.packing and packing_supported(model, hardware, notes, warnings)
    liger = liger_setting(spec, model, hardware, notes, warnings)
    if optimizer_note := options.optimizer_note(spec.training, hardware.device):
        warnings.append(optimizer_note)  # a deviation from the spec: in the manifest's notes
    for warning in warnings:
        log.warning("%s", warning)
    if spec.method == "full":
        return BuiltModel(
            model, tokenizer, spec.method, hardware, False, notes, packing, warnings, liger=liger
        )

    assert spec.lora is not None  # filled in by the spec's validator for lora/qlora
    if quantized and hardware.device == "cpu":
        keep_4bit_weights_differentiable(model)
    if quantized:
        # Casts norms to fp32 and makes inputs require grad so checkpointing works on a
        # frozen 4-bit base.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.training.gradientCheckpointing
        )
    set_seed(spec.training.seed)
    assert experts is not None
    try:
        model = get_peft_model(model, lora_config(spec.lora, targets, experts.parameters))
    except ValueError as error:
        # peft names the missing modules: "Target modules {'x_proj'} not found in the base model"
        raise BadInputError(f"spec.lora.targetModules: {str(error).splitlines()[0]}") from None
    initial_adapter = None
    if options.mutates_base(spec.lora):
        initial_adapter = options.save_initial_adapter(model, Path(tempfile.mkdtemp()))
    if spec.lora.init == "loftq":
        options.apply_loftq(model, model_path)
    notes.append(
        f"lora init {spec.lora.init}, rslora {spec.lora.useRslora}, dora {spec.lora.useDora}"
    )
    trainable, total = model.get_nb_trainable_parameters()
    notes.append(f"trainable parameters {trainable:,} of {total:,}")
    adapted = experts.document(targets)
    notes.append(f"adapted: {adapted}")
    return BuiltModel(
        model,
        tokenizer,
        spec.method,
        hardware,
        quantized,
        notes,
        packing,
        warnings,
        adapter_targets=adapted,
        initial_adapter=initial_adapter,
        liger=liger,
    )


def liger_setting(
    spec: FineTuneJobSpec, model: Any, hardware: Hardware, notes: list[str], warnings: list[str]
) -> bool:
    """Whether the trainer applies Liger's kernels (see `options.use_liger`)."""
    model_type = getattr(model.config, "model_type", None)
    liger, note = options.use_liger(spec.training.ligerKernels, hardware.device, model_type)
    if note:
        warnings.append(note)
    if liger:
        notes.append("liger kernels on")
    return liger


PACKING_OFF_NOTE = (
    "packing off: this model does not use transformers' attention interface (remote code), "
    "so examples packed into one row would attend to each other"
)


def packing_supported(
    model: Any, hardware: Hardware, notes: list[str], warnings: list[str]
) -> bool:
    """Switch `model` to per-example attention for packed rows; False (with a warning) when
    it cannot: then examples sharing a row would attend to each other, so packing goes off."""
    attention = use_packed_attention(model, hardware)
    if attention is None:
        warnings.append(PACKING_OFF_NOTE)
        return False
    notes.append(f"attention {attention} (packed rows)")
    return True
