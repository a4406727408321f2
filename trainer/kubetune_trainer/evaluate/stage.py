"""The evaluation stage's interface with the pipeline.

The pipeline builds an `EvalInputs` after training and calls `evaluate_after_training`;
everything it needs back is in the `EvalOutcome`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJobSpec


@dataclass
class EvalInputs:
    spec: FineTuneJobSpec  # the resolved job spec (spec.evaluation, spec.method, ...)
    model: Any  # the tuned model in memory (a PeftModel for lora/qlora)
    tokenizer: Any
    base_model_path: Path  # local path of the base model (full fine-tuning reloads it)
    eval_rows: list[dict]  # converted held-out rows: {prompt, completion} | {messages} | {text}
    data_format: str  # prompt-completion | chat | text
    out_dir: Path  # local folder for report.json, report.md, PNGs; published by the pipeline
    log_history: list[dict] = field(default_factory=list)  # trainer.state.log_history
    train_seconds: float | None = None


@dataclass
class EvalOutcome:
    metrics: dict[str, float | int | bool | None]  # keys of kubetune.api.v1alpha1.Metrics
    files: list[Path]  # written under out_dir, to be published next to the artifacts
    passed: bool | None = None  # None when no thresholds are set
    missed: list[str] = field(default_factory=list)  # "exactMatch 0.12 < minExactMatch 0.5"
    seconds: float = 0.0


def evaluate_after_training(inputs: EvalInputs) -> EvalOutcome:
    """Placeholder until the evaluation stage lands: evaluates nothing."""
    return EvalOutcome(metrics={}, files=[])
