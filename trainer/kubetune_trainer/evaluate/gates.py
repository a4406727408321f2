"""Quality gates: `spec.evaluation.thresholds` against the measured metrics."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.api.v1alpha1 import EvalThresholds


@dataclass(frozen=True)
class Gate:
    threshold: str  # field of EvalThresholds
    metric: str  # key in the metrics mapping
    passes: Callable[[float, float], bool]  # (value, limit) -> ok
    fails_as: str  # the comparison shown when it is missed


GATES = (
    Gate("minFormatCompliance", "formatCompliance", operator.ge, "<"),
    Gate("maxEvalLoss", "evalLoss", operator.le, ">"),
    Gate("minExactMatch", "exactMatch", operator.ge, "<"),
    Gate("minTokenF1", "tokenF1", operator.ge, "<"),
    Gate("minRougeL", "rougeL", operator.ge, "<"),
    Gate("maxUnsupportedContentRate", "unsupportedContentRate", operator.le, ">"),
    Gate("maxRegressionPerplexityIncrease", "regressionPerplexityIncrease", operator.le, ">"),
    Gate("minPreferenceAccuracy", "preferenceAccuracy", operator.ge, "<"),
    Gate("minMeanReward", "meanReward", operator.ge, "<"),
)


def format_number(value: float) -> str:
    """Short and stable: 4 significant digits, no exponent for everyday magnitudes."""
    return f"{value:.4g}"


def check_thresholds(
    metrics: Mapping[str, float | int | bool | None], thresholds: EvalThresholds | None
) -> tuple[bool | None, list[str]]:
    """(passed, missed): passed is None when no threshold is set.

    Each missed line names the metric, its value, and the threshold, e.g.
    `exactMatch 0.12 < minExactMatch 0.5`. A threshold on a metric that was not measured
    (no format check configured, no regressionUri, no examples) is missed too: a gate that
    cannot be checked must not pass silently.
    """
    if thresholds is None:
        return None, []
    missed: list[str] = []
    checked = 0
    for gate in GATES:
        limit = getattr(thresholds, gate.threshold)
        if limit is None:
            continue
        checked += 1
        value = metrics.get(gate.metric)
        if value is None:
            missed.append(
                f"{gate.metric} not measured ({gate.threshold} {format_number(limit)} is set)"
            )
        elif not gate.passes(float(value), limit):
            missed.append(
                f"{gate.metric} {format_number(float(value))} {gate.fails_as} "
                f"{gate.threshold} {format_number(limit)}"
            )
    if checked == 0:
        return None, []
    return not missed, missed


def gates_document(
    passed: bool | None, missed: list[str], thresholds: EvalThresholds | None
) -> dict[str, Any]:
    """The report's `gates` section: the verdict, what was missed, the thresholds set."""
    return {
        "passed": passed,
        "missed": missed,
        "thresholds": thresholds.model_dump(mode="json", exclude_none=True) if thresholds else None,
    }
