"""Training with TRL's SFTTrainer: the FineTuneJob's TrainingSpec mapped onto an SFTConfig.

The rows arrive tokenised, with their labels (`kubetune_trainer.tokens`: which tokens carry
loss, what maxSeqLength cut), so TRL only packs or pads them. Packing uses TRL's
best-fit-decreasing strategy, which is padding-free: examples are packed into rows of
`maxSeqLength` tokens, each keeps its own position ids, and attention does not cross example
boundaries. No compute is spent on pad tokens. The model built for packing attends per
example (`modeling.packed_attention`: a varlen kernel on GPUs, causal SDPA per example on
CPU), so no compute is spent between examples either.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from kubetune.api.v1alpha1 import DEFAULT_LEARNING_RATES, TrainingSpec
from kubetune_trainer import options
from kubetune_trainer.data import TrainingData
from kubetune_trainer.modeling import BuiltModel, Hardware
from kubetune_trainer.tokens import TokenizedData, tokenize_training_data

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    """What training produced, besides the model itself (kept on `trainer.model`)."""

    trainer: SFTTrainer
    log_history: list[dict[str, Any]]
    global_step: int
    max_steps: int
    first_loss: float | None  # first logged training loss
    train_loss: float | None  # last logged training loss
    mean_train_loss: float | None  # the trainer's average over this process's steps
    eval_loss: float | None  # loss on the validation split of the final model
    tokens_trained: int  # non-padding tokens over the whole run (resumed runs included)
    train_samples: int  # training rows trained on (excluded rows not counted)
    seconds: float  # wall time of this process's training
    cpu_seconds: float  # CPU time of this process's training (all threads)
    resumed_from_step: int | None
    final_model: Any = None  # FSDP: the gathered full model on rank 0 (shards stay sharded)

    @property
    def model(self) -> Any:
        return self.final_model if self.final_model is not None else self.trainer.model


def eval_strategy(training: TrainingSpec, has_validation: bool) -> dict[str, Any]:
    if not has_validation:
        return {"eval_strategy": "no"}
    if training.evalEverySteps:
        return {"eval_strategy": "steps", "eval_steps": training.evalEverySteps}
    return {"eval_strategy": "epoch"}


def dataloader_workers(hardware: Hardware, cpus: int | None = None) -> int:
    """Data-loader worker processes: on a GPU, collating the next batch overlaps the step;
    on a CPU the workers would compete with training for the same cores."""
    if hardware.device != "cuda":
        return 0
    return max(0, min(4, (cpus or os.cpu_count() or 1) // 2))


def distributed_settings(strategy: str, gradient_checkpointing: bool) -> dict[str, Any]:
    """The Trainer's settings for the resolved strategy (none, ddp or fsdp).

    DDP: every process holds the model; `find_unused_parameters` off (LoRA's frozen base has no
    gradients by design, and the search costs a graph traversal per step). FSDP2: parameters,
    gradients and optimizer state sharded per decoder layer (the model's `_no_split_modules`);
    checkpoints hold the full state dict, gathered on rank 0, so the one folder rank 0 uploads
    is complete whatever the number of nodes, and the final model saves as ordinary HF files.
    FSDP does its own activation checkpointing (the Trainer's would all-gather twice).
    """
    from kubetune_trainer.distributed import collective_timeout

    if strategy == "none":
        return {}
    settings: dict[str, Any] = {"ddp_timeout": int(collective_timeout().total_seconds())}
    if strategy == "ddp":
        settings["ddp_find_unused_parameters"] = False
        return settings
    settings["fsdp"] = True
    settings["fsdp_config"] = {
        "version": 2,
        "reshard_after_forward": True,
        "state_dict_type": "FULL_STATE_DICT",
        "activation_checkpointing": gradient_checkpointing,
    }
    return settings


def training_arguments(
    training: TrainingSpec,
    *,
    output_dir: Path,
    has_validation: bool,
    hardware: Hardware,
    strategy: str = "none",
    liger: bool = False,
) -> dict[str, Any]:
    """The TrainingArguments every objective shares (SFT's SFTConfig, DPO's DPOConfig, ...).
    Checkpoints go to `output_dir` (local scratch); uploading and pruning them in the output
    location is the checkpoint callback's job. `strategy`: the resolved distributed strategy
    (none, ddp, fsdp)."""
    precision = hardware.precision
    learning_rate = training.learningRate
    if learning_rate is None:  # a bare TrainingSpec; a FineTuneJobSpec resolves it by method
        learning_rate = DEFAULT_LEARNING_RATES["lora"]
    workers = dataloader_workers(hardware)
    return {
        "output_dir": str(output_dir),
        "num_train_epochs": training.epochs,
        "max_steps": training.maxSteps or -1,
        "learning_rate": learning_rate,
        "lr_scheduler_type": training.lrScheduler,
        "warmup_steps": training.warmupRatio,  # a float below 1 is a ratio of the total steps
        "weight_decay": training.weightDecay,
        "per_device_train_batch_size": training.batchSize,
        "per_device_eval_batch_size": training.batchSize,
        "gradient_accumulation_steps": training.gradientAccumulationSteps,
        "optim": options.optimizer_name(training),
        "neftune_noise_alpha": training.neftuneNoiseAlpha,
        "use_liger_kernel": liger,
        "activation_checkpointing": training.gradientCheckpointing and strategy != "fsdp",
        "seed": training.seed,
        "data_seed": training.seed,
        "logging_strategy": "steps",
        "logging_steps": training.logEverySteps,
        **eval_strategy(training, has_validation),
        "save_strategy": "steps",
        "save_steps": training.checkpointEverySteps,
        "save_total_limit": 1,  # local scratch; the output location keeps checkpointsToKeep
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "tf32": True if hardware.tf32 else None,
        "use_cpu": hardware.device == "cpu",
        "report_to": "none",
        "disable_tqdm": True,  # progress goes through the reporters (JSON lines in a pod)
        "log_level": "warning",
        "dataloader_pin_memory": hardware.device == "cuda",
        "dataloader_num_workers": workers,
        "dataloader_persistent_workers": workers > 0,
        **distributed_settings(strategy, training.gradientCheckpointing),
    }


def sft_config(
    training: TrainingSpec,
    *,
    output_dir: Path,
    has_validation: bool,
    hardware: Hardware,
    packing: bool | None = None,
    strategy: str = "none",
    liger: bool = False,
) -> SFTConfig:
    """The SFTConfig for a TrainingSpec (see `training_arguments`). `packing`: what the built
    model supports (default: the spec's)."""
    packed = training.packing if packing is None else packing
    return SFTConfig(
        **training_arguments(
            training,
            output_dir=output_dir,
            has_validation=has_validation,
            hardware=hardware,
            strategy=strategy,
            liger=liger,
        ),
        max_length=training.maxSeqLength,
        packing=packed,
        packing_strategy=training.packingStrategy,
        # Packed rows are padding-free and carry no attention mask: "non_padding" would count
        # `input_ids != pad`, dropping every eos when pad = eos. Every packed token is real.
        include_num_input_tokens_seen="all" if packed else "non_padding",
    )


def splits_overlong_rows(training: TrainingSpec) -> bool:
    """Rows longer than maxSeqLength are split by the packer rather than cut."""
    return training.packing and training.packingStrategy == "bfd_split"


def cut_rows(dataset: Any, max_length: int) -> Any:
    """Each row's input_ids and labels cut at `max_length`."""
    return dataset.map(lambda row: {key: row[key][:max_length] for key in ("input_ids", "labels")})


def keep_adapter_dtype(model: Any, built: BuiltModel) -> None:
    """TRL casts QLoRA adapter weights to bf16; they stay float32, on every device: the
    QLoRA recipe keeps the adapters (and their optimizer updates) in full precision, and bf16
    adapters lose small updates."""
    if built.quantized:
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.to(torch.float32)


def _losses(log_history: list[dict[str, Any]], key: str) -> list[float]:
    return [float(entry[key]) for entry in log_history if key in entry]


def release_training_state(trainer: SFTTrainer) -> None:
    """Drop the optimizer (Adam keeps two fp32 values per trained parameter) and scheduler
    once training is over, so evaluation does not hold them next to a second model."""
    trainer.optimizer = None
    trainer.lr_scheduler = None
    trainer.callback_handler.optimizer = None
    trainer.callback_handler.lr_scheduler = None
    if hasattr(trainer, "accelerator"):
        trainer.accelerator._optimizers.clear()
        trainer.accelerator._schedulers.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_model(
    built: BuiltModel,
    data: TrainingData,
    training: TrainingSpec,
    *,
    output_dir: Path,
    callbacks: list[TrainerCallback] | None = None,
    resume_from: Path | None = None,
    resumed_from_step: int | None = None,
    tokenized: TokenizedData | None = None,
    strategy: str = "none",
) -> TrainOutcome:
    """Train `built.model` on `data` (tokenised here unless `tokenized` is given); resume
    from the local checkpoint folder `resume_from`."""
    if tokenized is None:
        tokenized = tokenize_training_data(
            data,
            built.tokenizer,
            max_length=training.maxSeqLength,
            train_on_prompt=training.trainOnPrompt,
            split_overlong=splits_overlong_rows(training),
        )
    train_rows = tokenized.train
    if splits_overlong_rows(training) and not built.packing:
        # Packing went off (the model cannot keep packed examples apart): nothing splits
        # the whole rows kept for it, so they are cut here as bfd would have cut them.
        train_rows = cut_rows(train_rows, training.maxSeqLength)
    config = sft_config(
        training,
        output_dir=output_dir,
        has_validation=tokenized.validation is not None,
        hardware=built.hardware,
        packing=built.packing,
        strategy=strategy,
        liger=built.liger,
    )
    trainer = SFTTrainer(
        model=built.model,
        args=config,
        train_dataset=train_rows,
        eval_dataset=tokenized.validation,
        processing_class=built.tokenizer,
        callbacks=callbacks or [],
    )
    # With tqdm off, transformers prints every log dict to stdout; stdout is for JSON events.
    trainer.remove_callback(PrinterCallback)
    keep_adapter_dtype(trainer.model, built)
    started, cpu_started = time.monotonic(), time.process_time()
    summary = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds, cpu_seconds = time.monotonic() - started, time.process_time() - cpu_started

    state = trainer.state
    history = list(state.log_history)
    eval_losses = _losses(history, "eval_loss")
    last_eval_step = max((e["step"] for e in history if "eval_loss" in e), default=None)
    eval_loss = eval_losses[-1] if eval_losses else None
    final = state.global_step >= state.max_steps  # else stopped early (preempted): no report
    if tokenized.validation is not None and last_eval_step != state.global_step and final:
        # The reported eval loss is always the final model's.
        eval_loss = float(trainer.evaluate()["eval_loss"])
        history = list(state.log_history)
    return outcome_of(
        trainer,
        summary,
        history=history,
        eval_loss=eval_loss,
        train_samples=len(tokenized.train),
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        resumed_from_step=resumed_from_step,
    )


def outcome_of(
    trainer: Any,
    summary: Any,
    *,
    history: list[dict[str, Any]],
    eval_loss: float | None,
    train_samples: int,
    seconds: float,
    cpu_seconds: float,
    resumed_from_step: int | None,
) -> TrainOutcome:
    """The TrainOutcome of a finished `trainer.train()` (any objective's trainer)."""
    state = trainer.state
    train_losses = _losses(history, "loss")
    mean_loss = summary.metrics.get("train_loss") if summary else None
    return TrainOutcome(
        trainer=trainer,
        log_history=history,
        global_step=state.global_step,
        max_steps=state.max_steps,
        first_loss=train_losses[0] if train_losses else None,
        train_loss=train_losses[-1] if train_losses else None,
        mean_train_loss=float(mean_loss) if mean_loss is not None else None,
        eval_loss=eval_loss,
        tokens_trained=int(state.num_input_tokens_seen or 0),
        train_samples=train_samples,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        resumed_from_step=resumed_from_step,
    )


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 50 else math.inf
