"""The evaluation report files: report.json, report.md and the loss-curve PNG.

Importable without torch (the operator's CLI renders reports): rendering lives in the core
package `kubetune.report` and is re-exported here; matplotlib is imported only to plot.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kubetune.report import (
    HALLUCINATION_PROXY_NOTE,
    REPORT_SCHEMA_VERSION,
    render_gate_summary,
    render_report_markdown,
    render_report_table,
)

__all__ = [
    "HALLUCINATION_PROXY_NOTE",
    "LOSS_CURVE_FILE",
    "REPORT_JSON_FILE",
    "REPORT_MD_FILE",
    "REPORT_SCHEMA_VERSION",
    "loss_curves",
    "plot_loss_curves",
    "render_gate_summary",
    "render_report_markdown",
    "render_report_table",
    "write_report_files",
]

REPORT_JSON_FILE = "report.json"
REPORT_MD_FILE = "report.md"
LOSS_CURVE_FILE = "eval_loss_curve.png"


def _finite(value: Any) -> Any:
    # JSON has no NaN or Infinity; a number that is not finite was not measured usefully.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def loss_curves(
    log_history: list[dict[str, Any]],
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(train, eval) as (step, loss) points from a Trainer's `state.log_history`."""
    train, evaluation = [], []
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        if isinstance(entry.get("loss"), int | float):
            train.append((float(step), float(entry["loss"])))
        if isinstance(entry.get("eval_loss"), int | float):
            evaluation.append((float(step), float(entry["eval_loss"])))
    return train, evaluation


def plot_loss_curves(log_history: list[dict[str, Any]], path: Path) -> Path | None:
    """Training and eval loss against the step as a PNG; None when nothing was logged."""
    train, evaluation = loss_curves(log_history)
    if not train and not evaluation:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display in a pod
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if train:
            axes.plot(*zip(*train, strict=True), label="training loss")
        if evaluation:
            axes.plot(*zip(*evaluation, strict=True), marker="o", label="eval loss")
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.set_title("Loss curves")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
    return path


def write_report_files(
    report: dict[str, Any], out_dir: Path, log_history: list[dict[str, Any]] | None = None
) -> list[Path]:
    """Write report.json, report.md and (when losses were logged) the loss-curve PNG."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = _finite(report)
    json_path = out_dir / REPORT_JSON_FILE
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", "utf-8")
    md_path = out_dir / REPORT_MD_FILE
    md_path.write_text(render_report_markdown(report), "utf-8")
    files = [json_path, md_path]
    curve = plot_loss_curves(log_history or [], out_dir / LOSS_CURVE_FILE)
    if curve is not None:
        files.append(curve)
    return files
