"""Training options that map one-to-one onto peft, TRL and transformers settings.

Each FineTuneJob field here becomes the pinned library's own setting; this module only
decides the mapping and what cannot apply on this hardware (Liger's kernels are CUDA-only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import (
    BASE_MUTATING_INITS,
    LOFTQ_CPU_MESSAGE,
    LoraSpec,
    TrainingSpec,
)
from kubetune_trainer.errors import BadInputError

# spec.training.optimizer -> transformers' `optim` (bitsandbytes for the 8-bit and paged ones).
OPTIMIZERS = {
    "adamw": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw": "paged_adamw_32bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
}
PAGED_CPU_NOTE = "optimizer {name}: paging needs CUDA; on CPU bitsandbytes runs it unpaged"
LIGER_CPU_NOTE = "ligerKernels off: Liger's kernels are Triton kernels for CUDA, not CPU"


def init_lora_weights(lora: LoraSpec) -> bool | str:
    """peft's `init_lora_weights` for spec.lora.init (loftq is applied after the adapter is
    built, see `apply_loftq`, so the adapter starts as peft's default)."""
    if lora.init in ("default", "loftq"):
        return True
    return lora.init


# EVA: the batches of training rows whose layer inputs set the adapters (peft cycles over them
# until the principal directions converge), and the loss tokens each batch needs at least
# per unit of rank (peft skips a batch with fewer tokens than the rank).
EVA_BATCHES = 8
EVA_TOKENS_PER_RANK = 2


def eva_config() -> Any:
    """peft's EvaConfig: rho 1 keeps rank r on every layer (no redistribution), so the
    published adapter is a plain rank-r LoRA adapter that every server loads."""
    from peft import EvaConfig

    return EvaConfig(rho=1.0)


def eva_batches(
    rows: Any, pad_id: int, batch_size: int, rank: int, batches: int = EVA_BATCHES
) -> list[dict[str, Any]]:
    """Padded batches of the first tokenised training rows (input_ids, attention_mask,
    labels), each with at least EVA_TOKENS_PER_RANK x rank loss tokens."""
    import torch

    from kubetune_trainer.tokens import IGNORE_INDEX

    out: list[dict[str, Any]] = []
    pending: list[tuple[list[int], list[int]]] = []
    for index in range(len(rows)):
        if len(out) == batches:
            break
        row = rows[index]
        pending.append((list(row["input_ids"]), list(row["labels"])))
        trained = sum(1 for _, labels in pending for t in labels if t != IGNORE_INDEX)
        if len(pending) < batch_size or trained < EVA_TOKENS_PER_RANK * rank:
            continue
        width = max(len(ids) for ids, _ in pending)
        out.append(
            {
                "input_ids": torch.tensor(
                    [ids + [pad_id] * (width - len(ids)) for ids, _ in pending]
                ),
                "attention_mask": torch.tensor(
                    [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in pending]
                ),
                "labels": torch.tensor(
                    [labels + [IGNORE_INDEX] * (width - len(labels)) for _, labels in pending]
                ),
            }
        )
        pending = []
    if not out:
        raise BadInputError(
            f"spec.lora.init: eva needs at least {EVA_TOKENS_PER_RANK * rank} tokens that carry "
            f"loss in the training data (2 x lora.r); lower lora.r or use another init"
        )
    return out


def apply_eva(model: Any, rows: Any, pad_id: int, batch_size: int, rank: int) -> None:
    """EVA: each adapter's A set to the principal directions of its layer's inputs on the
    first training batches (peft's `initialize_lora_eva_weights`); B stays zero, so the model
    starts as the base model."""
    from peft import initialize_lora_eva_weights

    batches = eva_batches(rows, pad_id, batch_size, rank)
    initialize_lora_eva_weights(model, dataloader=batches, show_progress_bar=False)


def mutates_base(lora: LoraSpec | None) -> bool:
    """PiSSA and OLoRA move part of each base weight into the adapter: the trained model's
    base is a residual, not the published base model."""
    return lora is not None and lora.init in BASE_MUTATING_INITS


def save_initial_adapter(model: Any, directory: Path) -> Path:
    """The adapter as initialised (PiSSA/OLoRA), so that publishing can convert the trained
    adapter into a standard LoRA adapter on the original base (peft's
    `path_initial_model_for_weight_conversion`)."""
    target = directory / "initial-adapter"
    model.save_pretrained(str(target))
    return target


def apply_loftq(model: Any, model_path: Path) -> None:
    """LoftQ for a 4-bit base: each adapter is set so that quantised base + adapter is as
    close as possible to the original weights, read from the model's safetensors files."""
    from peft import replace_lora_weights_loftq

    if not next(model.parameters()).is_cuda:
        # Admission refuses loftq with gpus: 0; this is a local run on a CPU.
        raise BadInputError(f"spec.lora.init: {LOFTQ_CPU_MESSAGE}")

    replace_lora_weights_loftq(model, model_path=str(Path(model_path) / "model.safetensors"))


def optimizer_name(training: TrainingSpec) -> str:
    return OPTIMIZERS[training.optimizer]


def optimizer_note(training: TrainingSpec, device: str) -> str | None:
    if device != "cuda" and training.optimizer.startswith("paged"):
        return PAGED_CPU_NOTE.format(name=training.optimizer)
    return None


def liger_supported(model_type: str | None) -> bool:
    """Liger has kernels for this architecture (its own table) and can be imported."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    return model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def use_liger(setting: bool | None, device: str, model_type: str | None) -> tuple[bool, str | None]:
    """Whether to apply Liger's kernels, and a note when the setting is not followed.

    Unset: on for CUDA runs of supported architectures. Never on CPU, whatever the setting
    (admission refuses true with gpus: 0; a local CPU run turns it off with a note).
    """
    if device != "cuda":
        return False, LIGER_CPU_NOTE if setting else None
    supported = liger_supported(model_type)
    if setting is None:
        return supported, None
    if setting and not supported:
        return False, f"ligerKernels off: Liger has no kernels for model type {model_type}"
    return setting, None
