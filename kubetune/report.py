"""Rendering an evaluation report (report.json) as text: pure functions, no torch.

The trainer writes report.json and report.md with these functions; `kubetune report NAME` and
`kubetune run` print the same table from a downloaded report.json, so the torch-free CLI
and the trainer always show identical numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

REPORT_SCHEMA_VERSION = 1
HALLUCINATION_PROXY_NOTE = (
    "Unsupported content rate is a hallucination proxy, not a fact check: per answer, the "
    "share of its content (numbers and words other than English function words; a list's "
    "numbering is not content) that appears in neither the prompt nor the reference, "
    "averaged over answers. It is lexical: synonyms and true facts the reference omits count "
    "as unsupported, a false statement made of supported words does not."
)


@dataclass(frozen=True)
class MetricRow:
    key: str  # key in report["tuned"] / report["base"]
    label: str
    higher_is_better: bool
    is_rate: bool  # a share in [0, 1], shown as a percentage


METRIC_ROWS = (
    MetricRow("evalLoss", "Eval loss", higher_is_better=False, is_rate=False),
    MetricRow("perplexity", "Perplexity", higher_is_better=False, is_rate=False),
    MetricRow("exactMatch", "Exact match", higher_is_better=True, is_rate=True),
    MetricRow("tokenF1", "Token F1", higher_is_better=True, is_rate=True),
    MetricRow("rougeL", "ROUGE-L", higher_is_better=True, is_rate=True),
    MetricRow("formatCompliance", "Format compliance", higher_is_better=True, is_rate=True),
    MetricRow(
        "unsupportedContentRate",
        "Unsupported content (hallucination proxy)",
        higher_is_better=False,
        is_rate=True,
    ),
    MetricRow("preferenceAccuracy", "Preference accuracy", higher_is_better=True, is_rate=True),
    MetricRow(
        "preferenceMargin", "Preference margin (nats/token)", higher_is_better=True, is_rate=False
    ),
    MetricRow("meanReward", "Mean reward", higher_is_better=True, is_rate=False),
    MetricRow("fullRewardShare", "Full reward", higher_is_better=True, is_rate=True),
)


def format_value(value: float | None, *, is_rate: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if is_rate else f"{value:.4g}"


def format_delta(delta: float | None, *, is_rate: bool, higher_is_better: bool) -> str:
    """Signed change, rates in percentage points, marked better/worse."""
    if delta is None:
        return "-"
    text = f"{100 * delta:+.1f} pp" if is_rate else f"{delta:+.4g}"
    if abs(delta) < 1e-12:
        return text
    better = (delta > 0) == higher_is_better
    return f"{text} ({'better' if better else 'worse'})"


def _delta(tuned: float | None, base: float | None) -> float | None:
    return None if tuned is None or base is None else tuned - base


def render_report_table(report: dict[str, Any]) -> str:
    """Base vs tuned as a Markdown table (readable as plain text too), one row per metric.

    Metrics missing from both sides (e.g. format compliance without a format check) are left
    out; regression perplexity gets its own row when measured.
    """
    tuned, base = report.get("tuned") or {}, report.get("base") or {}
    lines = ["| Metric | Base | Tuned | Delta |", "|---|---:|---:|---:|"]
    for row in METRIC_ROWS:
        t, b = tuned.get(row.key), base.get(row.key)
        if t is None and b is None:
            continue
        delta = format_delta(
            _delta(t, b), is_rate=row.is_rate, higher_is_better=row.higher_is_better
        )
        lines.append(
            f"| {row.label} | {format_value(b, is_rate=row.is_rate)} | "
            f"{format_value(t, is_rate=row.is_rate)} | {delta} |"
        )
    regression = report.get("regression")
    if regression:
        t, b = regression.get("tunedPerplexity"), regression.get("basePerplexity")
        change = regression.get("relativeIncrease")
        change_text = "-" if change is None else f"{100 * change:+.1f}%"
        lines.append(
            f"| Regression perplexity | {format_value(b, is_rate=False)} | "
            f"{format_value(t, is_rate=False)} | {change_text} |"
        )
    return "\n".join(lines)


def render_gate_summary(report: dict[str, Any]) -> str:
    """One line: whether the thresholds passed, and which were missed."""
    gates = report.get("gates") or {}
    passed = gates.get("passed")
    if passed is None:
        return "Thresholds: none set."
    if passed:
        return "Thresholds: all passed."
    return "Thresholds: MISSED: " + "; ".join(gates.get("missed") or [])


def _fenced(text: str) -> str:
    # A fence longer than any backtick run inside, so model output cannot break out of it.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def render_usage(usage: dict[str, Any] | None) -> str | None:
    """The report's usage line. The trainer sees its own attempt's time; the FineTuneJob's
    status.usage (`kubetune report`, `kubectl get ftj -o wide`) sums every attempt."""
    if not usage:
        return None
    parts = []
    if usage.get("tokensTrained"):
        parts.append(f"{usage['tokensTrained']:,} tokens trained (all attempts)")
    seconds, gpus = usage.get("trainSeconds"), usage.get("gpus") or 0
    if seconds is not None:
        parts.append(
            f"this attempt trained for {seconds:.0f} s on {gpus} GPU(s) "
            f"({seconds * gpus:.0f} GPU-seconds)"
        )
    if not parts:
        return None
    return "Usage: " + "; ".join(parts) + "; status.usage sums the GPU time of every attempt."


def _loss_rows(report: dict[str, Any]) -> str:
    # Loss and perplexity cover the whole evaluation set, generation its first maxSamples.
    rows = report.get("lossExamples")
    return f" of all {rows} examples" if rows is not None else ""


def render_report_markdown(report: dict[str, Any]) -> str:
    """The whole report.md: summary, the base vs tuned table, gates, notes, sample outputs."""
    generation = report.get("generation") or {}
    lines = [
        "# Evaluation report",
        "",
        f"{report.get('examples', 0)} held-out examples ({report.get('dataFormat', '?')} data, "
        f"method {report.get('method', '?')}), greedy decoding, at most "
        f"{generation.get('maxNewTokens', '?')} new tokens; loss on "
        f"{report.get('lossScope', 'completion tokens')}"
        f"{_loss_rows(report)}.",
        "",
        render_report_table(report),
        "",
        render_gate_summary(report),
    ]
    regression = report.get("regression")
    if regression:
        lines += [
            "",
            f"Regression set: {regression.get('rows', 0)} rows from {regression.get('source')}.",
        ]
    timing = report.get("timing") or {}
    if timing.get("evalSeconds") is not None:
        lines += ["", f"Evaluation took {timing['evalSeconds']:.1f} s."]
    usage_text = render_usage(report.get("usage"))
    if usage_text:
        lines += ["", usage_text]
    lines += ["", "## Notes", ""]
    lines += [f"- {note}" for note in report.get("notes") or [HALLUCINATION_PROXY_NOTE]]
    samples = report.get("samples") or []
    if samples:
        lines += ["", "## Sample outputs"]
        for number, sample in enumerate(samples, start=1):
            lines += [
                "",
                f"### Example {number}",
                "",
                "Prompt:",
                _fenced(sample.get("prompt", "")),
                "Reference:",
                _fenced(sample.get("reference", "")),
                "Base model:",
                _fenced(sample.get("base", "")),
                "Tuned model:",
                _fenced(sample.get("tuned", "")),
            ]
    return "\n".join(lines) + "\n"
