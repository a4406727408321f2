"""`kubetune preview`: the trainer's data stage shown, on the tiny model; bad input as the
real run refuses it (exit code 3, the same one-line message)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from kubetune.api.contract import EXIT_BAD_INPUT
from kubetune_cli import preview as preview_cli
from kubetune_trainer.modeling import load_tokenizer
from kubetune_trainer.tokens import row_tokens
from tests.fixtures.tiny_model import job_manifest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GEMMA = (
    Path(__file__).resolve().parents[1] / "trainer" / "chat_templates" / "gemma.jinja"
).read_text()
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Where does Hana live?"},
    {"role": "assistant", "content": "Hana lives in Oslo."},
    {"role": "user", "content": "And her job?"},
    {"role": "assistant", "content": "She is a pilot."},
]


def kubetune_preview(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kubetune")
    preview_cli.register(parser.add_subparsers())
    args = parser.parse_args(["preview", *argv])
    return args.func(args)


def chat_job(tmp_path: Path, model_dir: Path, rows: int = 4, **dataset) -> Path:
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(rows)))
    manifest = job_manifest(model_dir, data, "s3://not-touched-by-preview/")
    manifest["spec"]["dataset"].update(dataset)
    manifest["spec"]["training"]["maxSeqLength"] = 512
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(manifest))
    return job_file


def test_preview_json_marks_exactly_the_tokens_training_uses(tiny_model_dir, tmp_path, capsys):
    job_file = chat_job(tmp_path, tiny_model_dir, validationSplit=0)
    code = kubetune_preview([str(job_file), "--rows", "2", "--json", "--work-dir", str(tmp_path)])
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    assert [row["ref"] for row in document["rows"]] == ["chat.jsonl: row 1", "chat.jsonl: row 2"]
    tokenizer = load_tokenizer(tiny_model_dir)
    ids, mask = row_tokens({"messages": CONVERSATION}, tokenizer)
    segments = document["rows"][0]["segments"]
    assert "".join(s["text"] for s in segments) == tokenizer.decode(ids)
    trained = [s["text"] for s in segments if s["trained"]]
    eos = tokenizer.eos_token
    assert trained == [f"Hana lives in Oslo.{eos}", f"She is a pilot.{eos}"]
    assert document["rows"][0]["trained_tokens"] == sum(mask)
    totals = document["totals"]
    assert totals["train_rows"] == 4 and totals["tokens"] == 4 * len(ids)
    assert totals["packing"] is True and totals["sequences"] == 1  # 4 short rows, one slot
    assert totals["packing_efficiency"] == round(4 * len(ids) / 512, 4)
    assert totals["steps_per_epoch"] == 1 and totals["parameters"] > 0


def test_preview_prints_rows_and_totals(tiny_job, tmp_path, capsys):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(tiny_job("s3://unused/", training={"packing": False})))
    assert kubetune_preview([str(job_file), "--rows", "1", "--work-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "train.jsonl: row" in printed and "carry loss" in printed
    assert "Totals" in printed and "steps per epoch" in printed and "packing efficiency" in printed


def test_preview_refuses_what_the_run_refuses_with_exit_3(tiny_model_dir, tmp_path, capsys):
    # Gemma's template refuses a system message: the trainer would fail the same way.
    job_file = chat_job(tmp_path, tiny_model_dir, chatTemplate=GEMMA)
    code = kubetune_preview([str(job_file), "--work-dir", str(tmp_path)])
    assert code == EXIT_BAD_INPUT
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: chat.jsonl: row ") and "\n" not in error
    assert error.endswith("the chat template refuses this conversation: System role not supported")
