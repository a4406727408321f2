"""The pipeline's entry points for objectives other than sft: data, training, evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune_trainer.data import TrainingData, ensure_chat_template
from kubetune_trainer.objectives.data import is_conversational, load_objective_data
from kubetune_trainer.objectives.evaluation import evaluate_objective
from kubetune_trainer.objectives.rewards import RewardModel, check_reference_columns
from kubetune_trainer.objectives.training import train_objective
from kubetune_trainer.tokens import LengthReport, TokenizedData

__all__ = ["evaluate_objective", "load_objective_rows", "train_objective"]


def load_objective_rows(
    spec: FineTuneJobSpec, tokenizer: Any, work: Path
) -> tuple[TrainingData, TokenizedData, list[dict]]:
    """The checked rows for spec.objective, the length summary the run reports (TRL
    truncates at maxSeqLength itself) and the held-out rows for the evaluation."""
    data = load_objective_data(
        spec.dataset, spec.objective, seed=spec.training.seed, cache_dir=work / "data"
    )
    rows = data.train.to_list()
    if is_conversational(rows):
        ensure_chat_template(tokenizer, spec.dataset.chatTemplate, spec.model.uri)
    if spec.rewards:
        RewardModel(spec.rewards)  # a bad schema or pattern fails now, naming the reward
        check_reference_columns(spec.rewards, rows, data.train_refs)
    lengths = LengthReport(rows=data.train_rows)
    validation_lengths = LengthReport(rows=data.validation_rows) if data.validation else None
    tokenized = TokenizedData(data.train, data.validation, lengths, validation_lengths)
    evaluation = spec.evaluation
    eval_rows: list[dict] = []
    if evaluation.enabled:
        if evaluation.datasetUri:
            eval_spec = spec.dataset.model_copy(
                update={"uri": evaluation.datasetUri, "validationUri": None, "validationSplit": 0}
            )
            eval_data = load_objective_data(
                eval_spec, spec.objective, seed=spec.training.seed, cache_dir=work / "data"
            )
            eval_rows = eval_data.train.to_list()
        elif data.validation is not None:
            eval_rows = data.validation.to_list()
    return data, tokenized, eval_rows
