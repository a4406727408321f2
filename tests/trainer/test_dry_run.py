"""spec.dryRun in the trainer pod: the data stage only, its preview written beside the run's
artifacts (the document `kubetune preview --json` prints), the totals in the termination
message; bad input exits 3 naming the row, as the real run does. Nothing is trained."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from kubetune.api.contract import TrainerResult
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune_trainer.errors import BadInputError
from kubetune_trainer.preview import dry_run
from kubetune_trainer.progress import MultiReporter
from tests.cli.test_preview_command import kubetune_preview
from tests.fixtures.tiny_model import trainer_pod_files


def run_trainer(manifest: dict, tmp_path) -> tuple[subprocess.CompletedProcess, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    termination_log, env = trainer_pod_files(manifest, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, termination_log.read_text() if termination_log.exists() else ""


@pytest.mark.slow
def test_a_dry_run_writes_the_preview_and_its_totals_and_trains_nothing(tiny_job, tmp_path, capsys):
    out = tmp_path / "out"
    manifest = tiny_job(out.as_uri(), dryRun=True, resources={"gpus": 0})
    proc, message = run_trainer(manifest, tmp_path / "pod")
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[-1]["event"] == "completed"
    assert not any(e["event"] == "step" for e in events)  # nothing trained
    (preview_path,) = out.glob("*/tiny/preview.json")
    document = json.loads(preview_path.read_text())
    # The same document `kubetune preview --json` prints for the same manifest.
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(manifest))
    code = kubetune_preview([str(job_file), "--json", "--work-dir", str(tmp_path / "cli")])
    assert code == 0
    assert document == json.loads(capsys.readouterr().out)
    assert document["rows"] and document["totals"]["steps_per_epoch"] >= 1
    # Totals in the termination message, for status.preview.
    result = TrainerResult.model_validate_json(message)
    totals = document["totals"]
    assert result.preview.uri == preview_path.resolve().as_uri()
    assert (result.preview.trainRows, result.preview.tokens) == (
        totals["train_rows"],
        totals["tokens"],
    )
    assert result.preview.stepsPerEpoch == totals["steps_per_epoch"]
    assert result.preview.trainedTokens == totals["trained_tokens"]
    # No model, no manifest: the run did not train.
    assert sorted(p.name for p in preview_path.parent.iterdir()) == ["preview.json"]


def test_a_dry_run_on_a_bad_row_is_bad_input_naming_it(tiny_job, tmp_path):
    """The real run's message (main turns BadInputError into exit code 3)."""
    data = tmp_path / "bad.jsonl"
    rows = [{"instruction": "Say hi.", "output": "Hi."}] * 4 + [{"colour": "blue"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    manifest = tiny_job(out.as_uri(), dryRun=True, resources={"gpus": 0})
    manifest["spec"]["dataset"]["uri"] = data.as_uri()
    job = FineTuneJob.model_validate(manifest)
    with pytest.raises(BadInputError, match=r"bad\.jsonl.*row 5"):
        dry_run(job, MultiReporter([]), tmp_path / "work", "default")
    assert not list(out.glob("*/tiny/preview.json"))
