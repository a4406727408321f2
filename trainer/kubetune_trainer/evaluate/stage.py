"""The evaluation stage's interface with the pipeline.

The pipeline builds an `EvalInputs` after training and calls `evaluate_after_training`;
everything it needs back is in the `EvalOutcome`. The tuned model and the base model are
measured on the same examples with the same greedy decoding: for lora/qlora the base is the
same model with its adapter disabled (no second load), for full fine-tuning it is loaded
from `base_model_path`.

Torch is imported lazily so that `kubetune_trainer.evaluate.report` stays importable in the
torch-free operator install.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import BASE_MUTATING_INITS, FineTuneJobSpec
from kubetune_trainer.evaluate.examples import EvalExample, build_example
from kubetune_trainer.evaluate.formats import FormatChecker, build_format_checker
from kubetune_trainer.evaluate.gates import check_thresholds, gates_document
from kubetune_trainer.evaluate.metrics import perplexity
from kubetune_trainer.evaluate.report import (
    HALLUCINATION_PROXY_NOTE,
    REPORT_SCHEMA_VERSION,
    write_report_files,
)
from kubetune_trainer.evaluate.scoring import Scored, score_outputs

DEFAULT_BATCH_SIZE = 8
QLORA_NOTE = (
    "QLoRA: these numbers describe the model as trained, the 4-bit base with the adapter. "
    "The merged model (mergeAdapter: the 16-bit base with the adapter merged) is a slightly "
    "different model: its loss on the same examples is status.metrics.mergedEvalLoss."
)


@dataclass
class EvalInputs:
    spec: FineTuneJobSpec  # the resolved job spec (spec.evaluation, spec.method, ...)
    model: Any  # the tuned model in memory (a PeftModel for lora/qlora)
    tokenizer: Any
    base_model_path: Path  # local path of the base model (full fine-tuning reloads it)
    eval_rows: list[dict]  # converted held-out rows: {prompt, completion} | {messages} | {text}
    data_format: str  # prompt-completion | chat | text
    out_dir: Path  # local folder for report.json, report.md, PNGs; published by the pipeline
    log_history: list[dict] = field(default_factory=list)  # trainer.state.log_history
    train_seconds: float | None = None
    tokens_trained: int | None = None  # all attempts (a resumed run counts what it resumed)
    # Where datasetUri / regressionUri data is downloaded (default: a temporary folder).
    cache_dir: Path | None = None
    # Examples per forward pass (loss) and per generate() call.
    batch_size: int = DEFAULT_BATCH_SIZE
    # Alpaca rows of datasetUri rendered as conversations, like the training data.
    alpaca_as_chat: bool = False
    # GPUs the gang trained on, from torchrun's world (topology.gpus_used), for report usage.
    gpus: int = 0


@dataclass
class EvalOutcome:
    metrics: dict[str, float | int | bool | None]  # keys of kubetune.api.v1alpha1.Metrics
    files: list[Path]  # written under out_dir, to be published next to the artifacts
    passed: bool | None = None  # None when no thresholds are set
    missed: list[str] = field(default_factory=list)  # "exactMatch 0.12 < minExactMatch 0.5"
    seconds: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)  # what report.json holds
    # Every example the loss was measured on (to measure another form of the model alike).
    loss_examples: list[EvalExample] = field(default_factory=list)


@dataclass
class ModelResult:
    """One model (tuned or base) measured on the evaluation and regression examples."""

    loss: float | None
    loss_tokens: int
    outputs: list[str]
    scored: Scored
    regression_loss: float | None
    generation_seconds: float
    loss_seconds: float

    def metrics(self) -> dict[str, float | int | None]:
        return {
            "evalLoss": self.loss,
            "perplexity": perplexity(self.loss),
            "lossTokens": self.loss_tokens,
            **self.scored.metrics(),
        }


@dataclass(frozen=True)
class EvalData:
    examples: list[EvalExample]  # the first maxSamples: generation and its task metrics
    source: str
    regression: list[EvalExample] | None
    regression_source: str | None
    # Every example: evalLoss, perplexity and the maxEvalLoss gate are over the whole set.
    loss_examples: list[EvalExample] = field(default_factory=list)


@dataclass(frozen=True)
class RunSettings:
    max_new_tokens: int
    max_length: int
    batch_size: int
    checker: FormatChecker | None


@dataclass(frozen=True)
class Answers:
    """One model's greedy answers to the generative examples, scored against their references."""

    outputs: list[str]
    scored: Scored
    seconds: float


def run_settings(inputs: EvalInputs) -> RunSettings:
    """spec.evaluation's decoding settings and format check. A bad schema or pattern is bad
    input: it is reported here, before any time is spent on generation."""
    evaluation = inputs.spec.evaluation
    return RunSettings(
        max_new_tokens=evaluation.maxNewTokens,
        max_length=inputs.spec.training.maxSeqLength,
        batch_size=max(1, inputs.batch_size),
        checker=build_format_checker(evaluation.format) if evaluation.format else None,
    )


def evaluate_after_training(inputs: EvalInputs) -> EvalOutcome:
    """Measure tuned and base model, write the report files, check the thresholds."""
    started = time.perf_counter()
    evaluation = inputs.spec.evaluation
    if not evaluation.enabled:
        return EvalOutcome(metrics={}, files=[])
    settings = run_settings(inputs)
    data = _load_data(inputs)

    model = inputs.model
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        tuned = _measure(model, inputs.tokenizer, data, settings)
        with _base_model(inputs) as base:
            base_result = _measure(base, inputs.tokenizer, data, settings)
    finally:
        if was_training:
            model.train()

    seconds = time.perf_counter() - started
    report = build_report(inputs, data, tuned, base_result, seconds)
    files = write_report_files(report, inputs.out_dir, inputs.log_history)
    gates = report["gates"]
    return EvalOutcome(
        metrics=headline_metrics(report),
        files=files,
        passed=gates["passed"],
        missed=list(gates["missed"]),
        seconds=time.perf_counter() - started,
        report=report,
        loss_examples=data.loss_examples,
    )


def _load_data(inputs: EvalInputs) -> EvalData:
    evaluation = inputs.spec.evaluation
    with _cache_dir(inputs.cache_dir) as cache:
        if evaluation.datasetUri:
            rows = _rows_from_uri(evaluation.datasetUri, cache, inputs.alpaca_as_chat)
            source = evaluation.datasetUri
        else:
            rows, source = inputs.eval_rows, "validation split"
        regression_rows = (
            _rows_from_uri(evaluation.regressionUri, cache, inputs.alpaca_as_chat)
            if evaluation.regressionUri
            else None
        )
    limit = evaluation.maxSamples
    tokenizer = inputs.tokenizer
    whole = inputs.spec.training.trainOnPrompt
    every = [build_example(row, tokenizer, train_on_prompt=whole) for row in rows]
    return EvalData(
        examples=every[:limit],
        loss_examples=every,
        source=source,
        regression=(
            [build_example(row, tokenizer) for row in regression_rows[:limit]]
            if regression_rows is not None
            else None
        ),
        regression_source=evaluation.regressionUri,
    )


@contextlib.contextmanager
def _cache_dir(cache_dir: Path | None) -> Iterator[Path]:
    if cache_dir is not None:
        yield Path(cache_dir)
        return
    with tempfile.TemporaryDirectory(prefix="kubetune-eval-") as temporary:
        yield Path(temporary)


def _rows_from_uri(uri: str, cache_dir: Path, alpaca_as_chat: bool = False) -> list[dict]:
    # The training data loader: same formats, same conversion, same one-line errors.
    from kubetune_trainer.data import load_eval_rows

    return load_eval_rows(uri, cache_dir=cache_dir, alpaca_as_chat=alpaca_as_chat)


@contextlib.contextmanager
def _base_model(inputs: EvalInputs) -> Iterator[Any]:
    """The base model: the tuned PeftModel with its adapter off, or a fresh load (full)."""
    model = inputs.model
    # PiSSA/OLoRA train on a residual base: with the adapter off it is not the base model.
    residual = inputs.spec.lora is not None and inputs.spec.lora.init in BASE_MUTATING_INITS
    if (
        inputs.spec.method in ("lora", "qlora")
        and hasattr(model, "disable_adapter")
        and not residual
    ):
        with model.disable_adapter():
            yield model
        return
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.evaluate.inference import input_device

    device = input_device(model)
    # Straight onto the tuned model's device (no host copy on a GPU).
    base = AutoModelForCausalLM.from_pretrained(
        inputs.base_model_path,
        dtype=model.dtype,
        trust_remote_code=inputs.spec.model.trustRemoteCode,
        device_map={"": device} if device.type == "cuda" else None,
    )
    base.to(device)
    base.eval()
    try:
        yield base
    finally:
        del base
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def generative_examples(examples: Sequence[EvalExample]) -> list[EvalExample]:
    """The examples with a prompt to answer (text rows have none: loss only)."""
    return [e for e in examples if e.prompt_ids is not None]


def generate_and_score(
    model: Any, tokenizer: Any, examples: Sequence[EvalExample], settings: RunSettings
) -> Answers:
    """Greedy answers to the generative examples, scored by the task metrics (and the format
    check) against each example's reference."""
    from kubetune_trainer.evaluate.inference import generate_greedy

    generative = generative_examples(examples)
    started = time.perf_counter()
    outputs = generate_greedy(
        model,
        tokenizer,
        [e.prompt_ids or [] for e in generative],
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        max_prompt_length=max(1, settings.max_length - settings.max_new_tokens),
    )
    seconds = time.perf_counter() - started
    scored = score_outputs(
        outputs,
        [e.reference for e in generative],
        [e.prompt for e in generative],
        settings.checker,
    )
    return Answers(outputs=outputs, scored=scored, seconds=seconds)


def _measure(model: Any, tokenizer: Any, data: EvalData, settings: RunSettings) -> ModelResult:
    from kubetune_trainer.evaluate.inference import pad_token_id, token_loss

    pad_id = pad_token_id(tokenizer)
    started = time.perf_counter()
    loss = token_loss(
        model,
        data.loss_examples,
        pad_id=pad_id,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
    )
    regression_loss = (
        token_loss(
            model,
            data.regression,
            pad_id=pad_id,
            batch_size=settings.batch_size,
            max_length=settings.max_length,
        ).loss
        if data.regression
        else None
    )
    loss_seconds = time.perf_counter() - started

    # Text rows have no answer to generate; task metrics cover the others.
    answers = generate_and_score(model, tokenizer, data.examples, settings)
    return ModelResult(
        loss=loss.loss,
        loss_tokens=loss.tokens,
        outputs=answers.outputs,
        scored=answers.scored,
        regression_loss=regression_loss,
        generation_seconds=answers.seconds,
        loss_seconds=loss_seconds,
    )


def _difference(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) - float(b)
    return None


def regression_summary(
    tuned_loss: float | None, base_loss: float | None, rows: int, source: str | None
) -> dict[str, Any]:
    """Base vs tuned perplexity on the regression set and the relative change (+0.1 = +10%)."""
    tuned_ppl, base_ppl = perplexity(tuned_loss), perplexity(base_loss)
    change = tuned_ppl / base_ppl - 1 if tuned_ppl is not None and base_ppl else None
    return {
        "source": source,
        "rows": rows,
        "tunedLoss": tuned_loss,
        "baseLoss": base_loss,
        "tunedPerplexity": tuned_ppl,
        "basePerplexity": base_ppl,
        "relativeIncrease": change,
    }


def answer_samples(
    examples: Sequence[EvalExample],
    tuned: ModelResult | Answers,
    base: ModelResult | Answers,
    count: int,
) -> list[dict[str, Any]]:
    """The report's sample outputs: the first `count` generative examples, both answers."""
    generative = generative_examples(examples)
    samples = []
    for index, example in enumerate(generative[:count]):
        sample = {
            "prompt": example.prompt,
            "reference": example.reference,
            "base": base.outputs[index],
            "tuned": tuned.outputs[index],
        }
        if tuned.scored.format_ok is not None and base.scored.format_ok is not None:
            sample["baseFormatOk"] = base.scored.format_ok[index]
            sample["tunedFormatOk"] = tuned.scored.format_ok[index]
        samples.append(sample)
    return samples


def _loss_scope(examples: Sequence[EvalExample], train_on_prompt: bool) -> str:
    if train_on_prompt:
        return "all tokens (trainOnPrompt), as in training"
    if examples and all(e.prompt_ids is None for e in examples):
        return "all tokens (text data)"
    return "completion / assistant-turn tokens, as in training"


def build_report(
    inputs: EvalInputs, data: EvalData, tuned: ModelResult, base: ModelResult, seconds: float
) -> dict[str, Any]:
    """Everything report.json holds (every number; see kubetune.report for its rendering)."""
    evaluation = inputs.spec.evaluation
    tuned_metrics, base_metrics = tuned.metrics(), base.metrics()
    regression = (
        regression_summary(
            tuned.regression_loss,
            base.regression_loss,
            len(data.regression),
            data.regression_source,
        )
        if data.regression is not None
        else None
    )
    gate_metrics = {
        **tuned_metrics,
        "regressionPerplexityIncrease": regression["relativeIncrease"] if regression else None,
    }
    passed, missed = check_thresholds(gate_metrics, evaluation.thresholds)
    generative = sum(e.prompt_ids is not None for e in data.examples)
    notes = [HALLUCINATION_PROXY_NOTE]
    if inputs.spec.method == "qlora":
        notes.append(QLORA_NOTE)
    if generative < len(data.examples):
        notes.append(
            f"{len(data.examples) - generative} text rows have no reference answer: they count "
            "towards loss and perplexity only."
        )
    train_seconds = inputs.train_seconds
    return {
        "schemaVersion": REPORT_SCHEMA_VERSION,
        "method": inputs.spec.method,
        "dataFormat": inputs.data_format,
        "source": data.source,
        "examples": len(data.examples),
        "generatedExamples": generative,
        "lossExamples": len(data.loss_examples),
        "lossScope": _loss_scope(data.examples, inputs.spec.training.trainOnPrompt),
        "generation": {
            "decoding": "greedy",
            "maxNewTokens": evaluation.maxNewTokens,
            "maxSamples": evaluation.maxSamples,
            "batchSize": max(1, inputs.batch_size),
        },
        "format": (
            evaluation.format.model_dump(mode="json", by_alias=True, exclude_none=True)
            if evaluation.format
            else None
        ),
        "tuned": tuned_metrics,
        "base": base_metrics,
        "delta": {
            key: _difference(tuned_metrics[key], base_metrics.get(key)) for key in tuned_metrics
        },
        "regression": regression,
        "gates": gates_document(passed, missed, evaluation.thresholds),
        "samples": answer_samples(data.examples, tuned, base, evaluation.sampleOutputs),
        "timing": {
            "evalSeconds": seconds,
            "tunedGenerationSeconds": tuned.generation_seconds,
            "tunedLossSeconds": tuned.loss_seconds,
            "baseGenerationSeconds": base.generation_seconds,
            "baseLossSeconds": base.loss_seconds,
            "trainSeconds": train_seconds,
            "evalShareOfRun": seconds / (train_seconds + seconds) if train_seconds else None,
        },
        "usage": {
            "gpus": inputs.gpus,
            "trainSeconds": train_seconds,
            "tokensTrained": inputs.tokens_trained,
        },
        "notes": notes,
    }


def headline_metrics(report: dict[str, Any]) -> dict[str, float | int | bool | None]:
    """The numbers that go into status.metrics (only kubetune.api.v1alpha1.Metrics keys;
    unmeasured ones are left out so they do not overwrite anything)."""
    tuned, base = report["tuned"], report["base"]
    values: dict[str, float | int | bool | None] = {
        "evalLoss": tuned.get("evalLoss"),
        "perplexity": tuned.get("perplexity"),
        "baseEvalLoss": base.get("evalLoss"),
        "exactMatch": tuned.get("exactMatch"),
        "baseExactMatch": base.get("exactMatch"),
        "formatCompliance": tuned.get("formatCompliance"),
        "baseFormatCompliance": base.get("formatCompliance"),
        "tokenF1": tuned.get("tokenF1"),
        "baseTokenF1": base.get("tokenF1"),
        "rougeL": tuned.get("rougeL"),
        "baseRougeL": base.get("rougeL"),
        "unsupportedContentRate": tuned.get("unsupportedContentRate"),
        "baseUnsupportedContentRate": base.get("unsupportedContentRate"),
        "regressionPerplexityIncrease": (report.get("regression") or {}).get("relativeIncrease"),
        "evalPassed": report["gates"]["passed"],
    }
    return {key: value for key, value in values.items() if value is not None}
