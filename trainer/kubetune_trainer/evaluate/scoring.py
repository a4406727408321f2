"""Scoring a set of generated outputs against their references (pure, no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kubetune_trainer.evaluate.formats import FormatChecker
from kubetune_trainer.evaluate.metrics import (
    exact_match,
    mean,
    rouge_l,
    token_f1,
    unsupported_content,
    unsupported_content_rate,
)


@dataclass(frozen=True)
class Scored:
    """Task metrics of one model's outputs (None: not measured) and per-output format results."""

    exactMatch: float | None
    tokenF1: float | None
    rougeL: float | None
    formatCompliance: float | None
    unsupportedContentRate: float | None
    format_ok: tuple[bool, ...] | None  # per output, None without a format check

    def metrics(self) -> dict[str, float | None]:
        return {
            "exactMatch": self.exactMatch,
            "tokenF1": self.tokenF1,
            "rougeL": self.rougeL,
            "formatCompliance": self.formatCompliance,
            "unsupportedContentRate": self.unsupportedContentRate,
        }


def score_outputs(
    outputs: Sequence[str],
    references: Sequence[str],
    prompts: Sequence[str],
    checker: FormatChecker | None = None,
) -> Scored:
    """Mean exact match, token F1 and ROUGE-L, format compliance (with a checker) and the
    pooled unsupported-content rate of `outputs`."""
    if not (len(outputs) == len(references) == len(prompts)):
        raise ValueError("outputs, references and prompts must have the same length")
    triples = list(zip(outputs, references, prompts, strict=True))
    format_ok = tuple(checker(o) for o in outputs) if checker is not None else None
    return Scored(
        exactMatch=mean(exact_match(o, r) for o, r, _ in triples),
        tokenF1=mean(token_f1(o, r) for o, r, _ in triples),
        rougeL=mean(rouge_l(o, r) for o, r, _ in triples),
        formatCompliance=mean(map(float, format_ok)) if format_ok is not None else None,
        unsupportedContentRate=unsupported_content_rate(
            unsupported_content(o, p, r) for o, r, p in triples
        ),
        format_ok=format_ok,
    )
