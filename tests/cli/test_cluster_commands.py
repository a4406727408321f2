"""Pure parts of the cluster-user CLI (kubetune submit/list/report)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from kubetune_cli import cluster as usercli

GOOD = """
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata: {name: demo}
spec:
  model: {uri: "hf://org/model"}
  dataset: {uri: "s3://b/train.jsonl"}
  output: {uri: "s3://b/out/"}
"""


def test_submit_reads_and_validates_every_document(tmp_path: Path) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text(GOOD + "---\n" + GOOD.replace("demo", "second"))
    names = [m["metadata"]["name"] for m in usercli.load_manifests(path)]
    assert names == ["demo", "second"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace('"s3://b/train.jsonl"', '"ftp://x"'), "job.yaml: spec.dataset.uri: String"),
        (
            GOOD.replace("metadata: {name: demo}", "metadata: {}"),
            "job.yaml: metadata.name: Field required",
        ),
        (GOOD + "  learningrate: 3\n", "job.yaml: spec.learningrate: Extra inputs"),
        ("a: [", "job.yaml: not YAML"),
        ("", "job.yaml: no FineTuneJob in the file"),
    ],
)
def test_submit_errors_name_the_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(usercli.CliError) as err:
        usercli.load_manifests(path)
    assert str(err.value).startswith(str(tmp_path / message)), str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(usercli.CliError, match="nope.yaml: No such file"):
        usercli.load_manifests(tmp_path / "nope.yaml")


def test_list_rows_show_phase_progress_loss_usage_and_age() -> None:
    now = datetime(2026, 1, 1, 2, 0, 0, tzinfo=UTC)
    items = [
        {
            "metadata": {"name": "b", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"method": "qlora", "model": {"uri": "hf://m"}},
            "status": {
                "phase": "Running",
                "progress": {"summary": "3/10 (30%)", "loss": 1.23456},
                "usage": {"gpuSeconds": 4500.0, "estimatedCost": 3.75, "currency": "EUR"},
            },
        },
        {"metadata": {"name": "a", "creationTimestamp": "2026-01-01T01:59:30Z"}, "spec": {}},
    ]
    assert usercli.list_rows(items, now) == [
        ["a", "-", "-", "-", "-", "-", "-", "-", "30s"],
        ["b", "Running", "qlora", "hf://m", "3/10 (30%)", "1.2346", "1.25", "3.75 EUR", "2h"],
    ]


def test_report_json_sits_next_to_report_md() -> None:
    assert usercli.report_json_uri("s3://b/ns/j/eval/report.md") == "s3://b/ns/j/eval/report.json"
    assert usercli.split_s3("s3://b/k/report.json") == ("b", "k/report.json")
    with pytest.raises(usercli.CliError, match="only s3://"):
        usercli.split_s3("file:///tmp/report.json")


def test_usage_line_for_kubetune_report() -> None:
    usage = {
        "gpuSeconds": 4500.0,
        "tokensTrained": 1234567,
        "estimatedCost": 3.75,
        "currency": "EUR",
        "attempts": {"a": 1000.0, "b": 1250.0},
    }
    assert usercli.usage_line(usage) == (
        "usage (all attempts): 1.25 GPU-hours, 2 attempt(s), 1,234,567 tokens, "
        "estimated cost 3.75 EUR"
    )
