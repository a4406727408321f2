"""`kubetune run` end to end on file:// URIs, and bad input through the trainer's entrypoint:
exit code 3, one line on stderr and in the termination log, nothing trained."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import yaml

from kubetune.api.contract import EXIT_BAD_INPUT
from kubetune_cli import run as local_run
from tests.fixtures.tiny_model import trainer_pod_files


def kubetune_run(argv: list[str]) -> int:
    """`kubetune run ...` through the subcommand's own registration."""
    parser = argparse.ArgumentParser(prog="kubetune")
    local_run.register(parser.add_subparsers())
    args = parser.parse_args(["run", *argv])
    return args.func(args)


@pytest.mark.slow
def test_kubetune_run_writes_artifacts_and_prints_them(tiny_job, tmp_path, capsys):
    manifest = tiny_job(
        "s3://not-used-when-output-is-given/",
        name="local-demo",
        training={"maxSteps": 4},
        evaluation={"enabled": True, "maxSamples": 2, "maxNewTokens": 4, "sampleOutputs": 1},
    )
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(manifest))
    out = tmp_path / "artifacts"

    code = kubetune_run([str(job_file), "--output", str(out), "--work-dir", str(tmp_path / "w")])

    assert code == 0
    run = out / "local" / "local-demo"
    published = json.loads((run / "manifest.json").read_text())
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert published["job"] == {"name": "local-demo", "namespace": "local"}
    assert published["config"]["output"]["uri"] == out.resolve().as_uri() + "/"
    printed = capsys.readouterr().out
    assert str(run.as_uri()) in printed.replace("\n", "")
    assert "adapter/adapter_model.safetensors" in printed and "manifest.json" in printed
    # The evaluation summary is report.json's base-vs-tuned table, as `kubetune report` shows.
    assert "Evaluation" in printed and "Eval loss" in printed
    assert "Token F1" in printed and "ROUGE-L" in printed and "Thresholds:" in printed


def test_kubetune_run_of_a_dry_run_writes_the_preview_and_trains_nothing(
    tiny_job, tmp_path, capsys
):
    manifest = tiny_job("s3://not-used-when-output-is-given/", dryRun=True)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(manifest))
    out = tmp_path / "artifacts"

    code = kubetune_run([str(job_file), "--output", str(out), "--work-dir", str(tmp_path / "w")])

    assert code == 0
    run = out / "local" / "tiny"
    assert sorted(p.name for p in run.iterdir()) == ["preview.json"]  # no model, no manifest
    assert json.loads((run / "preview.json").read_text())["totals"]["train_rows"] > 0
    printed = capsys.readouterr().out.replace("\n", "")
    assert "nothing trained" in printed and (run / "preview.json").as_uri() in printed


def test_kubetune_run_bad_manifest_is_one_line_and_exit_3(tmp_path, capsys):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        "apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: x}\n"
    )
    assert kubetune_run([str(job_file)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: job.yaml: spec: Field required")
    assert "\n" not in err


def test_trainer_bad_dataset_row_exits_3_before_training(tiny_job, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    manifest = tiny_job((tmp_path / "out").as_uri())
    manifest["spec"]["dataset"]["uri"] = data.as_uri()
    termination_log, env = trainer_pod_files(manifest, tmp_path)

    done = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )

    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-2000:]
    message = termination_log.read_text()
    assert "\n" not in message and "train.jsonl" in message and "row 2" in message
    assert done.stderr.strip().splitlines()[-1] == message
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[-1]["event"] == "failed" and events[-1]["message"] == message
    assert not any(e["event"] in ("started", "step") for e in events)
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written == []  # nothing published, not even a checkpoint


class _Gang:
    """torchrun's stand-in: no events on stdout, exit 0."""

    pid = 0
    stdout: list[str] = []

    def wait(self) -> int:
        return 0


def test_kubetune_run_processes_sets_torchruns_environment_not_the_job(tmp_path, monkeypatch):
    """`--processes N` is torchrun's PET_* environment for one machine (what the operator
    sets on a one-pod gang); the job the ranks read is the manifest as written, its resources
    untouched (the trainer takes the gang's shape from torchrun)."""
    from kubetune.api.v1alpha1 import FineTuneJob
    from kubetune_trainer import distributed

    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "gang"},
            "spec": {
                "model": {"uri": "hf://org/model"},
                "dataset": {"uri": "file:///data/train.jsonl"},
                "output": {"uri": "file:///out/"},
                "resources": {"gpus": 1, "nodes": 1},
            },
        }
    )
    started: dict = {}

    def launch(command: list[str], **popen) -> tuple[_Gang, object]:
        started.update(command=command, env=popen["env"])
        (tmp_path / "codes").mkdir()
        return _Gang(), tmp_path / "codes"

    monkeypatch.setattr(distributed, "launch", launch)
    code, message = local_run.run_gang(job, 3, tmp_path / "work", reporter=None)
    assert (code, message) == (0, None)
    command, env = started["command"], started["env"]
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[3:5] == ["-m", "kubetune_trainer"]
    assert not [arg for arg in command if arg.startswith(("--nnodes", "--nproc", "--master"))]
    assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"], env["PET_NODE_RANK"]) == ("1", "3", "0")
    assert env["PET_MASTER_ADDR"] == "127.0.0.1" and int(env["PET_MASTER_PORT"]) > 0
    written = yaml.safe_load((tmp_path / "work" / "job.yaml").read_text())
    assert written["spec"]["resources"] == job.wire()["spec"]["resources"]
    assert (written["spec"]["resources"]["gpus"], written["spec"]["resources"]["nodes"]) == (1, 1)
