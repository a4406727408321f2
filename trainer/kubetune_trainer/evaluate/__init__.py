"""Evaluation stage: tuned vs base model on held-out data (metrics, report, gates)."""

from kubetune_trainer.evaluate.stage import EvalInputs, EvalOutcome, evaluate_after_training

__all__ = ["EvalInputs", "EvalOutcome", "evaluate_after_training"]
