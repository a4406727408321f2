"""The evaluation stage on a real (tiny) model: tuned vs base, report files, gates.

The slow test fine-tunes a random tiny Llama for a few seconds with TRL on answers of one
fixed JSON shape, so the tuned model's format compliance and exact match are far above the
base model's; the others need no training.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path

import pytest
import torch

from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune_trainer.demo_assets import _CITIES, _NAMES, write_tiny_model
from kubetune_trainer.errors import BadInputError
from kubetune_trainer.evaluate import EvalInputs, evaluate_after_training
from kubetune_trainer.evaluate.examples import build_example
from kubetune_trainer.evaluate.inference import generate_greedy, token_loss

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
    "required": ["name", "city"],
    "additionalProperties": False,
}


def person_rows() -> list[dict[str, str]]:
    """Every name/city pair once, shuffled: prompt-completion rows with a fixed JSON answer."""
    pairs = list(itertools.product(_NAMES, _CITIES))
    random.Random(0).shuffle(pairs)
    return [
        {
            "prompt": f"Person: {name}\nCity: {city}\nJSON: ",
            "completion": json.dumps({"name": name, "city": city}),
        }
        for name, city in pairs
    ]


def job_spec(method: str = "full", **evaluation) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "file:///models/tiny"},
            "method": method,
            "dataset": {"uri": "file:///data/train.jsonl"},
            "output": {"uri": "file:///out"},
            "evaluation": evaluation,
        }
    )


def load_tiny(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tuned(tiny_model_dir: Path, tmp_path_factory):
    """A full fine-tune of the tiny model on 80 rows; 20 unseen name/city pairs held out."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    rows = person_rows()
    model, tokenizer = load_tiny(tiny_model_dir)
    config = SFTConfig(
        output_dir=str(tmp_path_factory.mktemp("sft")),
        max_steps=100,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        per_device_train_batch_size=16,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        packing=False,
        seed=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows[:80]),
        processing_class=tokenizer,
    )
    started = time.perf_counter()
    trainer.train()
    return {
        "model": trainer.model,
        "tokenizer": tokenizer,
        "held_out": rows[80:],
        "log_history": trainer.state.log_history,
        "train_seconds": time.perf_counter() - started,
    }


@pytest.mark.slow
def test_tuned_model_beats_base_and_the_report_says_so(tuned, tiny_model_dir, tmp_path):
    regression = tmp_path / "general.jsonl"
    regression.write_text(
        "".join(
            json.dumps({"text": t}) + "\n"
            for t in ["The quick brown fox jumps over the lazy dog.", "Rivers flow to the sea."]
        )
    )
    spec = job_spec(
        "full",
        maxSamples=20,
        maxNewTokens=32,
        sampleOutputs=3,
        format={"type": "jsonSchema", "schema": SCHEMA},
        regressionUri=f"file://{regression}",
        thresholds={"minExactMatch": 0.5, "minFormatCompliance": 0.9, "maxEvalLoss": 1.0},
    )
    outcome = evaluate_after_training(
        EvalInputs(
            spec=spec,
            model=tuned["model"],
            tokenizer=tuned["tokenizer"],
            base_model_path=tiny_model_dir,
            eval_rows=tuned["held_out"],
            data_format="prompt-completion",
            out_dir=tmp_path / "eval",
            log_history=tuned["log_history"],
            train_seconds=tuned["train_seconds"],
        )
    )
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    t, b = report["tuned"], report["base"]
    print(
        f"\nevaluation cost: train {tuned['train_seconds']:.1f} s, eval {outcome.seconds:.1f} s, "
        f"exact match {b['exactMatch']} -> {t['exactMatch']}, "
        f"timing {report['timing']}"
    )

    # Measurably better than the base on the same 20 unseen examples.
    assert report["examples"] == 20
    assert t["formatCompliance"] >= 0.9 and b["formatCompliance"] <= 0.1
    assert t["exactMatch"] >= 0.5 and b["exactMatch"] == 0.0
    assert t["tokenF1"] > b["tokenF1"] + 0.5
    assert t["rougeL"] > b["rougeL"] + 0.5
    assert t["evalLoss"] < 1.0 < b["evalLoss"]
    assert report["delta"]["exactMatch"] == pytest.approx(t["exactMatch"] - b["exactMatch"])

    # Full fine-tuning: the base numbers are those of the model as loaded from disk.
    base_model, tokenizer = load_tiny(tiny_model_dir)
    examples = [build_example(row, tokenizer) for row in tuned["held_out"]]
    fresh = token_loss(base_model, examples, pad_id=0, batch_size=8, max_length=2048)
    assert b["evalLoss"] == pytest.approx(fresh.loss, rel=1e-5)

    # Regression set: perplexity of both models on general text and the relative change.
    regression_report = report["regression"]
    assert regression_report["rows"] == 2
    assert regression_report["relativeIncrease"] == pytest.approx(
        regression_report["tunedPerplexity"] / regression_report["basePerplexity"] - 1
    )

    # Gates, headline metrics for the status, files for the pipeline to publish.
    assert outcome.passed is True and outcome.missed == []
    assert outcome.metrics["exactMatch"] == t["exactMatch"]
    assert outcome.metrics["baseFormatCompliance"] == b["formatCompliance"]
    assert outcome.metrics["evalPassed"] is True
    assert [f.name for f in outcome.files] == ["report.json", "report.md", "eval_loss_curve.png"]

    samples = report["samples"]
    assert len(samples) == 3
    assert samples[0]["reference"] == tuned["held_out"][0]["completion"]
    assert samples[0]["tunedFormatOk"] is True
    markdown = (tmp_path / "eval" / "report.md").read_text()
    assert f"| Exact match | 0.0% | {100 * t['exactMatch']:.1f}% |" in markdown
    assert "(better)" in markdown and "Thresholds: all passed." in markdown
    assert markdown.count("Tuned model:") == 3
    assert samples[0]["tuned"] in markdown
    assert 0 < report["timing"]["evalShareOfRun"] < 1


@pytest.mark.slow
def test_left_padded_batches_generate_what_single_prompts_do(tuned):
    tokenizer = tuned["tokenizer"]
    # Prompts of different lengths, so the batch really is padded.
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in tuned["held_out"][:6]]
    prompts[1] = tokenizer("Person: Alice\nCity: Osaka and Lima, far away\nJSON: ")["input_ids"]
    settings = {"max_new_tokens": 24, "max_prompt_length": 512}
    one_by_one = generate_greedy(tuned["model"], tokenizer, prompts, batch_size=1, **settings)
    batched = generate_greedy(tuned["model"], tokenizer, prompts, batch_size=6, **settings)
    assert batched == one_by_one
    assert len({len(p) for p in prompts}) > 1


def test_lora_base_is_the_model_with_its_adapter_disabled(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, tokenizer = load_tiny(tiny_model_dir)
    rows = person_rows()[:6]
    examples = [build_example(row, tokenizer) for row in rows]
    base_loss = token_loss(base, examples, pad_id=0, batch_size=4, max_length=2048).loss
    base_outputs = generate_greedy(
        base, tokenizer, [e.prompt_ids for e in examples], max_new_tokens=8,
        batch_size=4, max_prompt_length=512,
    )  # fmt: skip
    # A random (not zero) adapter, so the tuned model differs from the base.
    torch.manual_seed(1)
    model = get_peft_model(
        load_tiny(tiny_model_dir)[0],
        LoraConfig(
            r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    outcome = evaluate_after_training(
        EvalInputs(
            spec=job_spec("lora", maxNewTokens=8, sampleOutputs=6),
            model=model,
            tokenizer=tokenizer,
            base_model_path=tmp_path / "must-not-be-loaded",
            eval_rows=rows,
            data_format="prompt-completion",
            out_dir=tmp_path / "eval",
        )
    )
    report = outcome.report
    assert report["base"]["evalLoss"] == pytest.approx(base_loss, rel=1e-5)
    assert [s["base"] for s in report["samples"]] == base_outputs
    assert report["tuned"]["evalLoss"] != pytest.approx(base_loss, rel=1e-3)
    # The adapter is back on afterwards: the tuned model still differs from the base.
    after = token_loss(model, examples, pad_id=0, batch_size=4, max_length=2048).loss
    assert after == pytest.approx(report["tuned"]["evalLoss"], rel=1e-5)
    assert outcome.passed is None and "evalPassed" not in outcome.metrics


def test_text_rows_count_every_token_and_have_no_task_metrics(tiny_model_dir, tmp_path):
    model, tokenizer = load_tiny(tiny_model_dir)
    rows = [{"text": "Alice lives in Paris."}, {"text": "Bruno is a baker in Lima, 3 days a week."}]
    outcome = evaluate_after_training(
        EvalInputs(
            spec=job_spec("full", thresholds={"minExactMatch": 0.1}),
            model=model,
            tokenizer=tokenizer,
            base_model_path=tiny_model_dir,
            eval_rows=rows,
            data_format="text",
            out_dir=tmp_path / "eval",
        )
    )
    report = outcome.report
    # As in training: the text and eos (TRL's language-modelling rows end with it too).
    token_counts = [len(tokenizer(r["text"] + tokenizer.eos_token)["input_ids"]) - 1 for r in rows]
    assert report["tuned"]["lossTokens"] == sum(token_counts)
    assert report["lossScope"] == "all tokens (text data)"
    assert report["tuned"]["exactMatch"] is None and report["samples"] == []
    # Same weights on both sides: same loss.
    assert report["base"]["evalLoss"] == pytest.approx(report["tuned"]["evalLoss"], rel=1e-5)
    # A gate on a metric that text data cannot measure is missed, not silently passed.
    assert outcome.passed is False
    assert outcome.missed == ["exactMatch not measured (minExactMatch 0.1 is set)"]


def test_dataset_uri_is_read_with_the_training_data_loader(tiny_model_dir, tmp_path):
    model, tokenizer = load_tiny(tiny_model_dir)
    data = tmp_path / "eval.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": "Say the city.", "input": c, "output": c}) + "\n"
            for c in _CITIES[:5]
        )
    )
    inputs = EvalInputs(
        spec=job_spec("full", datasetUri=f"file://{data}", maxSamples=3, maxNewTokens=4),
        model=model,
        tokenizer=tokenizer,
        base_model_path=tiny_model_dir,
        eval_rows=[],
        data_format="prompt-completion",
        out_dir=tmp_path / "eval",
        cache_dir=tmp_path / "cache",
    )
    report = evaluate_after_training(inputs).report
    assert report["source"] == f"file://{data}" and report["examples"] == 3
    assert report["samples"][0]["reference"] == _CITIES[0]
    assert "### Input:\nParis" in report["samples"][0]["prompt"]  # the alpaca conversion

    data.write_text('{"instruction": "x", "output": "y"}\n{"instruction": 5, "output": "y"}\n')
    with pytest.raises(BadInputError, match="eval.jsonl: row 2"):
        evaluate_after_training(inputs)


def test_disabled_evaluation_writes_nothing(tmp_path):
    outcome = evaluate_after_training(
        EvalInputs(
            spec=job_spec(enabled=False),
            model=None,
            tokenizer=None,
            base_model_path=tmp_path,
            eval_rows=[{"prompt": "p", "completion": "c"}],
            data_format="prompt-completion",
            out_dir=tmp_path / "eval",
        )
    )
    assert outcome.metrics == {} and outcome.files == []
    assert not (tmp_path / "eval").exists()
