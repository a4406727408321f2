"""dpo, orpo, kto and grpo trained for real on the tiny model (CPU), through the pipeline.

The preference data (tests/fixtures/preference_data.py) asks half the prompts for JSON and
half for prose, so the random base model prefers the right answer about half the time; after
a short run the tuned model must prefer it in at least 90% of the held-out pairs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.report import render_report_table
from kubetune_trainer.modeling import Hardware
from kubetune_trainer.pipeline import RunOptions, run_pipeline
from tests.fixtures.preference_data import preference_rows, write_jsonl
from tests.fixtures.tiny_model import job_manifest

CPU = Hardware("cpu", bf16_supported=False)
ROWS = 64
PREFERENCE_TRAINING = {
    "epochs": 3,
    "batchSize": 8,
    "learningRate": 1e-2,
    "evalEverySteps": 1000,  # the evaluation stage measures; no per-epoch eval pass
}


class Events:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def emit(self, event: Any) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


def run(model_dir: Path, data: Path, tmp_path: Path, **spec: Any) -> tuple[Any, Events, Path]:
    training = spec.pop("training", PREFERENCE_TRAINING)
    spec_lora = spec.pop("lora", {"r": 8, "dropout": 0.0})
    evaluation = {"enabled": True, "maxSamples": 64, "sampleOutputs": 2, **spec.pop("eval", {})}
    if not evaluation["enabled"]:
        evaluation = {"enabled": False}
    manifest = job_manifest(
        model_dir,
        data,
        (tmp_path / "out").as_uri(),
        training=training,
        evaluation=evaluation,
        **spec,
    )
    manifest["spec"]["dataset"]["validationSplit"] = 0.2
    manifest["spec"]["lora"] = spec_lora
    events = Events()
    options = RunOptions(work_dir=tmp_path / "work", namespace="ns", hardware=CPU)
    result = run_pipeline(FineTuneJob.model_validate(manifest), events, options)
    return result, events, tmp_path / "out" / "ns" / "tiny"


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pref") / "pairs.jsonl", preference_rows(ROWS))


def parses_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto"])
def test_preference_objective_learns_the_preference(
    objective, tiny_model_dir, preference_data, tmp_path
):
    # ORPO's preference term is weighted by beta next to its SFT loss: a strong weight
    # learns the preference within this short run.
    settings = {"preference": {"beta": 1.0}} if objective == "orpo" else {}
    result, events, published = run(
        tiny_model_dir,
        preference_data,
        tmp_path,
        objective=objective,
        eval={
            "thresholds": {"minPreferenceAccuracy": 0.9, "minFormatCompliance": 0.0},
            "format": {"type": "json"},
            "maxNewTokens": 24,
        },
        **settings,
    )
    metrics = result.metrics
    assert metrics.basePreferenceAccuracy <= 0.7, metrics  # about chance (13 pairs)
    assert metrics.preferenceAccuracy >= 0.9, metrics
    assert metrics.preferenceMargin > metrics.basePreferenceMargin
    assert metrics.evalPassed is True
    assert metrics.tokensTrained > 0  # every objective counts what it trains (orpo too)
    # Progress reached the status path, as for SFT.
    steps = [e.step for e in events.events if e.event == "step"]
    assert steps and steps[-1] == result.totalSteps
    # The adapter is published alone: the reference was the base with the adapter off.
    adapter = published / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "ref").exists()
    report = json.loads((published / "report.json").read_text())
    assert report["objective"] == objective
    assert "| Preference accuracy |" in render_report_table(report)
    # The SFT generation metrics: greedy answers to the held-out prompts, scored against
    # chosen, under SFT's names (the minFormatCompliance gate above found its metric).
    for name in ("formatCompliance", "exactMatch", "tokenF1", "rougeL"):
        tuned, base = getattr(metrics, name), getattr(metrics, f"base{name[0].upper()}{name[1:]}")
        assert tuned is not None and 0 <= tuned <= 1, (name, metrics)
        assert base is not None and 0 <= base <= 1, (name, metrics)
    # The tiny model's short run learns which answer is better more than to write one.
    assert metrics.formatCompliance >= metrics.baseFormatCompliance
    assert report["generatedExamples"] == report["examples"] == 13
    held_out = {row["prompt"]: row["chosen"] for row in preference_rows(ROWS)}
    samples = report["samples"]
    assert len(samples) == 2
    for sample in samples:
        assert sample["reference"] == held_out[sample["prompt"]]  # chosen is the reference
        # Each model's generated answer, checked by the format check.
        assert sample["tunedFormatOk"] == parses_as_json(sample["tuned"])
        assert sample["baseFormatOk"] == parses_as_json(sample["base"])
    assert "| Format compliance |" in render_report_table(report)


@pytest.mark.slow
def test_grpo_format_reward_raises_the_mean_reward(tiny_model_dir, tmp_path):
    """Reward: the answer starts with a capital letter (a regex format check). About half
    the random base's greedy answers pass it; GRPO must raise the held-out mean by >= 0.4."""
    prompts = [{"prompt": row["prompt"]} for row in preference_rows(ROWS)]
    data = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    result, _, published = run(
        tiny_model_dir,
        data,
        tmp_path,
        objective="grpo",
        rewards=[{"type": "regex", "pattern": "[A-Z].*"}],
        grpo={"numGenerations": 4, "maxCompletionLength": 4},
        training={"epochs": 2, "batchSize": 8, "learningRate": 1e-2},
        lora={"r": 16, "dropout": 0.05},
    )
    metrics = result.metrics
    assert metrics.meanReward >= metrics.baseMeanReward + 0.4, metrics
    assert metrics.fullRewardShare == metrics.meanReward  # one binary reward
    assert metrics.tokensTrained > 0
    report = json.loads((published / "report.json").read_text())
    assert report["samples"] and "| Mean reward |" in render_report_table(report)


def sequence_token_bounds(model_dir: Path, rows: list[dict[str, str]], objective: str):
    """(fewest, most) tokens one trained sequence of `objective` can have on `rows`: a
    prompt with one completion (chosen, rejected; for grpo 1..COMPLETION generated tokens),
    up to two special tokens more (BOS/EOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    if objective == "grpo":
        prompts = [length(row["prompt"]) for row in rows]
        return min(prompts) + 1, max(prompts) + COMPLETION + 2
    lengths = [
        length(row["prompt"]) + length(row[side]) for row in rows for side in ("chosen", "rejected")
    ]
    return min(lengths), max(lengths) + 2


def test_trained_tokens_count_every_trained_sequence():
    import torch

    from kubetune_trainer.objectives.training import trained_tokens

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # two sequences, 3 and 2 tokens
    assert trained_tokens("dpo", {"attention_mask": mask, "input_ids": mask}) == 5
    assert trained_tokens("kto", {"attention_mask": mask, "KL_attention_mask": mask}) == 5
    orpo = {"chosen_attention_mask": mask, "rejected_attention_mask": mask[:1]}
    assert trained_tokens("orpo", {**orpo, "prompt_attention_mask": mask}) == 8


COMPLETION = 4  # grpo.maxCompletionLength of the runs below
GRPO_SPEC = {
    "rewards": [{"type": "regex", "pattern": "[A-Z].*"}],
    "grpo": {"numGenerations": 2, "maxCompletionLength": COMPLETION},
}


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto", "grpo"])
def test_two_rank_gloo_run_publishes_one_adapter(objective, tiny_model_dir, tmp_path):
    """Each objective as a 2-process DDP gang on CPU (`kubetune run --processes 2`, the
    trainer pod's launcher): both ranks train, rank 0 evaluates and publishes one adapter,
    the manifest records the gang, and tokensTrained counts both ranks' sequences."""
    from tests.trainer.test_distributed import _kubetune_run, _metrics

    rows = preference_rows(32)
    if objective == "grpo":
        data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in rows])
    else:
        data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    steps, batch = 2, 2  # per rank: 2 pairs (dpo, orpo), rows (kto) or completions (grpo)
    name = f"{objective}-ddp"
    manifest = job_manifest(
        tiny_model_dir,
        data,
        (tmp_path / "out").as_uri() + "/",
        name=name,
        training={"maxSteps": steps, "batchSize": batch, "gradientAccumulationSteps": 1},
        evaluation={"enabled": True, "maxSamples": 4, "sampleOutputs": 0},
        objective=objective,
        resources={"gpus": 0, "nodes": 2},
        **(GRPO_SPEC if objective == "grpo" else {}),
    )
    manifest["spec"]["lora"] = {"r": 8, "dropout": 0.0}
    _kubetune_run(manifest, tmp_path, 2)
    metrics = _metrics(tmp_path / "out", name)
    assert metrics["totalSteps"] == steps
    metric = "meanReward" if objective == "grpo" else "preferenceAccuracy"
    assert metrics["metrics"][metric] is not None
    assert metrics["metrics"][f"base{metric[0].upper()}{metric[1:]}"] is not None
    # Both ranks' sequences: dpo and orpo train prompt+chosen and prompt+rejected per pair.
    sequences = 2 * steps * batch * (2 if objective in ("dpo", "orpo") else 1)
    fewest, most = sequence_token_bounds(tiny_model_dir, rows, objective)
    assert sequences * fewest <= metrics["metrics"]["tokensTrained"] <= sequences * most
    published = tmp_path / "out" / "local" / name
    manifest_doc = json.loads((published / "manifest.json").read_text())
    assert manifest_doc["topology"]["worldSize"] == 2
    assert manifest_doc["metrics"][metric] == metrics["metrics"][metric]
    assert (published / "adapter" / "adapter_model.safetensors").is_file()
    assert not (published / "adapter" / "ref").exists()


@pytest.mark.slow
def test_dpo_resumes_from_a_checkpoint_with_the_same_remaining_steps(
    tiny_model_dir, preference_data, tmp_path
):
    """A DPO run's checkpoints resume like SFT's: with the last checkpoint removed (as a kill
    after step 2 leaves the output location), the rerun resumes at step 2 and its steps 3
    and 4 have the uninterrupted run's losses."""
    import shutil

    from kubetune_trainer.publish import MANIFEST

    training = {"maxSteps": 4, "batchSize": 4, "checkpointEverySteps": 2, "checkpointsToKeep": 5}
    spec = {"objective": "dpo", "training": training, "eval": {"enabled": False}}
    first, _, published = run(tiny_model_dir, preference_data, tmp_path, **spec)
    assert first.totalSteps == 4
    losses = _step_losses(published)
    shutil.rmtree(published / "checkpoints" / "checkpoint-4")
    (published / MANIFEST).unlink()

    again, events, _ = run(tiny_model_dir, preference_data, tmp_path, **spec)
    assert again.resumedFromStep == 2 and again.totalSteps == 4
    assert [e.step for e in events.events if e.event == "step"] == [3, 4]
    resumed = _step_losses(published)
    for step in (3, 4):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-4), step


def _step_losses(published: Path) -> dict[int, float]:
    history = json.loads((published / "metrics.json").read_text())["logHistory"]
    return {e["step"]: e["loss"] for e in history if "loss" in e}
