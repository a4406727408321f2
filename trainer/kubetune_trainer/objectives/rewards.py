"""The built-in verifiable rewards of spec.rewards: no user code runs in the trainer.

Each reward scores one completion in [0, 1]; the combined reward is their weighted mean, so 1
means every check passed. The format checks are the evaluation's own (`evaluate.formats`):
a completion that passes `json` here passes the `json` format check of the report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kubetune.api.v1alpha1 import FormatCheck, RewardSpec
from kubetune_trainer.errors import BadInputError
from kubetune_trainer.evaluate.formats import build_format_checker

# score(completion text, the row's columns) -> [0, 1]
Score = Callable[[str, dict[str, Any]], float]
FULL_REWARD = 1.0 - 1e-9  # a combined reward at least this counts as the full reward


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or (conversational) its assistant messages."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content") or "" for message in completion)


def _reference(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    return "" if value is None else str(value).strip()


def build_score(reward: RewardSpec, index: int) -> Score:
    """One reward as a function; a bad schema or pattern fails here, naming the field."""
    kind = reward.type
    if kind in ("json", "jsonSchema", "regex"):
        check = FormatCheck(type=kind, schema=reward.schema_, pattern=reward.pattern)
        try:
            passes = build_format_checker(check)
        except BadInputError as error:
            # The format check names spec.evaluation.format; this one is a reward.
            message = str(error).replace("spec.evaluation.format", f"spec.rewards[{index}]")
            raise BadInputError(message) from None
        return lambda text, row: 1.0 if passes(text) else 0.0
    if kind == "exactMatch":
        return lambda text, row: 1.0 if text.strip() == _reference(row, reward.column) else 0.0
    if kind == "contains":
        return lambda text, row: (
            1.0 if (ref := _reference(row, reward.column)) and ref in text else 0.0
        )
    target = reward.targetLength or 1
    return lambda text, row: max(0.0, 1.0 - abs(len(text.strip()) - target) / target)


def check_reference_columns(
    rewards: Sequence[RewardSpec], rows: Sequence[dict[str, Any]], refs: Sequence[str]
) -> None:
    """Every row carries the reference column an exactMatch or contains reward reads."""
    for index, reward in enumerate(rewards):
        if reward.type not in ("exactMatch", "contains"):
            continue
        for row, ref in zip(rows, refs, strict=False):
            if row.get(reward.column) is None:
                raise BadInputError(
                    f"{ref}: missing field {reward.column!r} that spec.rewards[{index}] "
                    f"({reward.type}) compares against"
                )


class RewardModel:
    """spec.rewards compiled once: per-reward functions for TRL, and the combined score."""

    def __init__(self, rewards: Sequence[RewardSpec]):
        self.specs = list(rewards)
        self.scores = [build_score(reward, i) for i, reward in enumerate(self.specs)]
        total = sum(reward.weight for reward in self.specs)
        self.weights = [reward.weight / total for reward in self.specs]

    def combined(self, completion: Any, row: dict[str, Any]) -> float:
        text = completion_text(completion)
        return sum(w * score(text, row) for w, score in zip(self.weights, self.scores, strict=True))

    def trl_functions(self) -> list[Callable[..., list[float]]]:
        """One function per reward, in TRL's signature (the dataset's columns arrive as
        keyword lists, one value per completion); weighted by GRPOConfig.reward_weights."""
        functions = []
        for index, (reward, score) in enumerate(zip(self.specs, self.scores, strict=True)):

            def function(prompts: list, completions: list, _score: Score = score, **columns: Any):
                rows = [
                    {k: v[i] for k, v in columns.items() if isinstance(v, list)}
                    for i in range(len(completions))
                ]
                return [
                    _score(completion_text(c), row)
                    for c, row in zip(completions, rows, strict=True)
                ]

            function.__name__ = f"reward_{index}_{reward.type}"
            functions.append(function)
        return functions
