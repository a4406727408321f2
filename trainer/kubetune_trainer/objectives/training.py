"""Training for dpo, orpo, kto and grpo with TRL's own trainers (DPOTrainer, KTOTrainer,
GRPOTrainer and trl.experimental's ORPOTrainer), set up like the SFT run: the same
optimisation settings, checkpoints, callbacks (progress, checkpoint upload, tracking) and
distributed settings, from the same TrainingSpec.

Reference model (dpo, kto): with lora/qlora it is the base model with the adapter switched
off, inside the one model in memory (TRL would otherwise add a frozen copy of the adapter
named "ref"; a fresh adapter starts at zero, so both are the base). With full fine-tuning TRL
loads a frozen copy of the base, or, with `referenceModel: precomputed`, computes the
reference log-probabilities once before training and keeps no copy. orpo needs none; grpo
only with a KL penalty (`grpo.beta` > 0).

The rows arrive untokenised: each TRL trainer tokenises its own format (prompt and
completions, chat template for conversational rows). Packing does not apply.

Tokens trained (`state.num_input_tokens_seen`, the status's tokensTrained) are the
non-padding prompt + completion tokens of the sequences each step trains on, on all ranks:
dpo and orpo count both the prompt+chosen and the prompt+rejected sequence, kto its
prompt+completion sequence (not the mismatched pairs of its KL estimate, which train
nothing), grpo the prompt + generated completion of every generation (TRL counts these).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune_trainer.data import TrainingData
from kubetune_trainer.modeling import BuiltModel
from kubetune_trainer.objectives.data import unpair
from kubetune_trainer.objectives.rewards import RewardModel
from kubetune_trainer.train import (
    TrainOutcome,
    _losses,
    keep_adapter_dtype,
    outcome_of,
    training_arguments,
)

log = logging.getLogger(__name__)

DEFAULT_LOSS_TYPES = {"dpo": "sigmoid", "kto": "kto"}
# TRL's name for the adapter it copies as the reference of a PEFT model.
TRL_REFERENCE_ADAPTER = "ref"
# The attention masks of the sequences a collated batch trains on, per objective (grpo's
# batches are generated inside its training step; TRL counts those tokens itself).
TRAINED_SEQUENCE_MASKS = {
    "dpo": ("attention_mask",),  # prompt+chosen and prompt+rejected, concatenated
    "kto": ("attention_mask",),  # prompt+completion (KL_attention_mask: no gradient)
    "orpo": ("chosen_attention_mask", "rejected_attention_mask"),
}


def common_arguments(
    spec: FineTuneJobSpec, *, output_dir: Path, has_validation: bool, hardware: Any, strategy: str
) -> dict[str, Any]:
    """The TrainingArguments every objective shares, as the SFT run sets them."""
    return {
        **training_arguments(
            spec.training,
            output_dir=output_dir,
            has_validation=has_validation,
            hardware=hardware,
            strategy=strategy,
        ),
        # Counted by count_trained_tokens (dpo, kto, orpo) or by TRL's GRPOTrainer itself.
        "include_num_input_tokens_seen": "non_padding"
        if spec.objective in TRAINED_SEQUENCE_MASKS
        else "no",
    }


def trained_tokens(objective: str, batch: Mapping[str, Any]) -> int:
    """The non-padding tokens of the sequences one collated `batch` of `objective` trains on."""
    return sum(int(batch[key].sum()) for key in TRAINED_SEQUENCE_MASKS[objective])


def count_trained_tokens(trainer: Any, objective: str) -> None:
    """Make `trainer` count each micro-batch's trained tokens (all ranks) into
    state.num_input_tokens_seen, in place of the Trainer's count of `input_ids`, which
    orpo's batches do not have."""

    def track(inputs: Mapping[str, Any]) -> None:
        tokens = torch.tensor(trained_tokens(objective, inputs), device=trainer.args.device)
        trainer.state.num_input_tokens_seen += int(trainer.accelerator.gather(tokens).sum())

    trainer._track_num_input_tokens = track


def build_trainer(
    spec: FineTuneJobSpec,
    built: BuiltModel,
    data: TrainingData,
    *,
    output_dir: Path,
    callbacks: list[TrainerCallback],
    strategy: str,
) -> Any:
    """TRL's trainer for spec.objective, configured from the spec."""
    objective = spec.objective
    validation = data.validation if objective != "grpo" else None
    if validation is not None and objective == "kto":
        rows, _ = unpair(validation.to_list(), [""] * len(validation))
        validation = type(validation).from_list(rows)
    common = common_arguments(
        spec,
        output_dir=output_dir,
        has_validation=validation is not None,
        hardware=built.hardware,
        strategy=strategy,
    )
    max_length = spec.training.maxSeqLength
    inputs = {
        "model": built.model,
        "train_dataset": data.train,
        "eval_dataset": validation,
        "processing_class": built.tokenizer,
        "callbacks": callbacks,
    }
    if objective == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        assert spec.grpo is not None and spec.rewards
        rewards = RewardModel(spec.rewards)
        config = GRPOConfig(
            **common,
            num_generations=spec.grpo.numGenerations,
            max_completion_length=spec.grpo.maxCompletionLength,
            temperature=spec.grpo.temperature,
            beta=spec.grpo.beta,
            reward_weights=rewards.weights,
        )
        inputs.pop("eval_dataset")
        return GRPOTrainer(reward_funcs=rewards.trl_functions(), args=config, **inputs)
    assert spec.preference is not None
    preference = spec.preference
    if objective == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        config = ORPOConfig(**common, beta=preference.beta, max_length=max_length)
        trainer = ORPOTrainer(args=config, **inputs)
        count_trained_tokens(trainer, objective)
        return trainer
    precomputed = preference.referenceModel == "precomputed"
    loss_type = preference.lossType or DEFAULT_LOSS_TYPES[objective]
    if objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(
            **common,
            beta=preference.beta,
            loss_type=[loss_type],
            max_length=max_length,
            precompute_ref_log_probs=precomputed,
        )
        trainer = DPOTrainer(args=config, **inputs)
    else:
        from trl import KTOConfig, KTOTrainer

        config = KTOConfig(
            **common,
            beta=preference.beta,
            loss_type=loss_type,
            max_length=max_length,
            precompute_ref_log_probs=precomputed,
        )
        trainer = KTOTrainer(args=config, **inputs)
    count_trained_tokens(trainer, objective)
    drop_reference_adapter(trainer.model)
    return trainer


def drop_reference_adapter(model: Any) -> None:
    """The reference of a fresh adapter is the base: compute it with the adapter off rather
    than through TRL's frozen copy of the adapter (which would also be published)."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config and TRL_REFERENCE_ADAPTER in peft_config:
        model.delete_adapter(TRL_REFERENCE_ADAPTER)
        model.set_adapter("default")


def train_objective(
    spec: FineTuneJobSpec,
    built: BuiltModel,
    data: TrainingData,
    training: Any = None,  # spec.training: the SFT trainer's signature (spec has it)
    *,
    output_dir: Path,
    callbacks: list[TrainerCallback] | None = None,
    resume_from: Path | None = None,
    resumed_from_step: int | None = None,
    strategy: str = "none",
    **_: Any,
) -> TrainOutcome:
    """Train `built.model` for spec.objective; resume from the local checkpoint folder
    `resume_from`. The outcome has the SFT run's shape (losses, steps, timings)."""
    trainer = build_trainer(
        spec, built, data, output_dir=output_dir, callbacks=callbacks or [], strategy=strategy
    )
    trainer.remove_callback(PrinterCallback)  # stdout is for JSON events
    keep_adapter_dtype(trainer.model, built)
    started, cpu_started = time.monotonic(), time.process_time()
    summary = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds, cpu_seconds = time.monotonic() - started, time.process_time() - cpu_started
    history = list(trainer.state.log_history)
    eval_losses = _losses(history, "eval_loss")
    return outcome_of(
        trainer,
        summary,
        history=history,
        eval_loss=eval_losses[-1] if eval_losses else None,
        train_samples=len(data.train),
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        resumed_from_step=resumed_from_step,
    )
