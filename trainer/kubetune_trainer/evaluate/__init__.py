"""Evaluation stage: tuned vs base model on held-out data (metrics, report, gates).

Importing this package does not import torch (the stage loads it when it runs), so the
torch-free CLI can use `kubetune_trainer.evaluate.report`.
"""

from kubetune_trainer.evaluate.gates import check_thresholds
from kubetune_trainer.evaluate.report import render_report_markdown, render_report_table
from kubetune_trainer.evaluate.stage import EvalInputs, EvalOutcome, evaluate_after_training

__all__ = [
    "EvalInputs",
    "EvalOutcome",
    "check_thresholds",
    "evaluate_after_training",
    "render_report_markdown",
    "render_report_table",
]
