"""Evaluation of the preference and reward objectives, base model against tuned model.

dpo, orpo, kto: on held-out pairs, each model's mean log-likelihood per token of `chosen`
and of `rejected` after the prompt. Preference accuracy is the share of pairs where chosen
scores higher; the margin is the mean difference (chosen - rejected, nats per token).
Per token, so that a shorter answer is not preferred for being short. Unpaired KTO rows are
paired by prompt (a desirable and an undesirable completion of the same prompt).

The SFT evaluation's generation metrics apply to dpo, orpo and kto too: greedy answers to
the held-out prompts (spec.evaluation's maxNewTokens, maxSamples, format), scored by the SFT
scoring code with the preferred answer (`chosen`, a desirable KTO completion) as reference:
exact match, token F1, ROUGE-L, unsupported content, format compliance. The same names in
status.metrics, so the same gates (minFormatCompliance, ...) hold.

grpo: greedy answers to held-out prompts (at most grpo.maxCompletionLength tokens), scored
by spec.rewards: the mean combined reward and the share of answers with the full reward.

The base model is the tuned one with its adapter off (lora, qlora) or a fresh load (full),
as in the SFT evaluation; the report has the same shape, so `kubetune report` shows it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune_trainer.evaluate.examples import EvalExample, build_example
from kubetune_trainer.evaluate.gates import check_thresholds, gates_document
from kubetune_trainer.evaluate.report import REPORT_SCHEMA_VERSION, write_report_files
from kubetune_trainer.evaluate.stage import (
    Answers,
    EvalInputs,
    EvalOutcome,
    RunSettings,
    _base_model,
    answer_samples,
    generate_and_score,
    generative_examples,
    run_settings,
)
from kubetune_trainer.objectives.rewards import FULL_REWARD, RewardModel, completion_text

PAIR_METRICS = ("preferenceAccuracy", "preferenceMargin")
REWARD_METRICS = ("meanReward", "fullRewardShare")
BATCH_SIZE = 8


def prompt_and_completion_ids(tokenizer: Any, prompt: Any, completion: Any) -> tuple[list, list]:
    """Token ids of the prompt and of the completion after it, as the model sees them
    (through the chat template for conversational rows; eos ends a plain completion)."""
    if isinstance(prompt, list):
        prompt_ids = list(
            tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        )
        whole = list(tokenizer.apply_chat_template(prompt + completion, tokenize=True))
        if whole[: len(prompt_ids)] == prompt_ids:
            return prompt_ids, whole[len(prompt_ids) :]
        text = completion_text(completion)  # a template that renders the prompt differently
        return prompt_ids, tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt)["input_ids"] if prompt else []
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    return list(prompt_ids), list(completion_ids)


def mean_logprobs(
    model: Any, sequences: Sequence[tuple[list[int], list[int]]], max_length: int
) -> list[float]:
    """Mean log-probability per completion token of each (prompt ids, completion ids)."""
    import torch

    from kubetune_trainer.evaluate.inference import input_device

    device = input_device(model)
    results: list[float] = []
    for start in range(0, len(sequences), BATCH_SIZE):
        batch = sequences[start : start + BATCH_SIZE]
        rows = [(p + c)[-max_length:] for p, c in batch]
        lengths = [min(len(c), len(r) - 1) for (_, c), r in zip(batch, rows, strict=True)]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for i, row in enumerate(rows):
            n = lengths[i]
            if n <= 0:
                results.append(float("nan"))
                continue
            targets = torch.tensor(row[len(row) - n :])
            picked = logprobs[i, len(row) - n - 1 : len(row) - 1].gather(1, targets[:, None])
            results.append(float(picked.mean()))
    return results


def pairs_of(rows: Sequence[dict[str, Any]]) -> list[tuple[Any, Any, Any]]:
    """(prompt, chosen, rejected) from preference rows, or from unpaired rows by prompt."""
    if rows and "chosen" in rows[0]:
        return [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    good: dict[str, Any] = {}
    bad: dict[str, Any] = {}
    prompts: dict[str, Any] = {}
    for row in rows:
        key = repr(row["prompt"])
        prompts.setdefault(key, row["prompt"])
        (good if row["label"] else bad).setdefault(key, row["completion"])
    return [(prompts[k], good[k], bad[k]) for k in prompts if k in good and k in bad]


def preferred_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each held-out prompt with its preferred answer as an SFT row: {prompt, completion},
    or (conversational) {messages}: the prompt, then the answer. Unpaired rows: the first
    desirable completion of each prompt."""
    if rows and "chosen" in rows[0]:
        preferred = [(r["prompt"], r["chosen"]) for r in rows]
    else:
        first: dict[str, tuple[Any, Any]] = {}
        for row in rows:
            if row["label"]:
                first.setdefault(repr(row["prompt"]), (row["prompt"], row["completion"]))
        preferred = list(first.values())
    out = []
    for prompt, answer in preferred:
        if isinstance(prompt, list):
            reply = (
                answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]
            )
            out.append({"messages": [*prompt, *reply]})
        else:
            out.append({"prompt": prompt, "completion": completion_text(answer)})
    return out


def answer_examples(tokenizer: Any, rows: Sequence[dict[str, Any]]) -> list[EvalExample]:
    """The preferred rows as the SFT evaluation's examples (same prompt ids, same reference)."""
    return [build_example(row, tokenizer) for row in preferred_rows(rows)]


def preference_metrics(
    model: Any, tokenizer: Any, pairs: Sequence[tuple], max_length: int
) -> dict[str, float | None]:
    sequences = []
    for prompt, chosen, rejected in pairs:
        sequences.append(prompt_and_completion_ids(tokenizer, prompt, chosen))
        sequences.append(prompt_and_completion_ids(tokenizer, prompt, rejected))
    scores = mean_logprobs(model, sequences, max_length)
    margins = [c - r for c, r in zip(scores[::2], scores[1::2], strict=True) if c == c and r == r]
    if not margins:
        return {"preferenceAccuracy": None, "preferenceMargin": None}
    return {
        "preferenceAccuracy": sum(m > 0 for m in margins) / len(margins),
        "preferenceMargin": sum(margins) / len(margins),
    }


def prompt_ids_of(tokenizer: Any, prompt: Any) -> list[int]:
    if isinstance(prompt, list):
        return list(
            tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        )
    return list(tokenizer(prompt)["input_ids"])


def reward_outputs(
    model: Any, tokenizer: Any, rows: Sequence[dict], rewards: RewardModel, spec: Any
) -> tuple[dict[str, float | None], list[str]]:
    from kubetune_trainer.evaluate.inference import generate_greedy

    outputs = generate_greedy(
        model,
        tokenizer,
        [prompt_ids_of(tokenizer, row["prompt"]) for row in rows],
        max_new_tokens=spec.grpo.maxCompletionLength,
        batch_size=BATCH_SIZE,
        max_prompt_length=spec.training.maxSeqLength,
    )
    scores = [rewards.combined(text, row) for text, row in zip(outputs, rows, strict=True)]
    if not scores:
        return {"meanReward": None, "fullRewardShare": None}, outputs
    metrics = {
        "meanReward": sum(scores) / len(scores),
        "fullRewardShare": sum(s >= FULL_REWARD for s in scores) / len(scores),
    }
    return metrics, outputs


@dataclass
class Measured:
    """Base and tuned model on the held-out rows."""

    tuned: dict[str, float | None]
    base: dict[str, float | None]
    samples: list[dict[str, Any]]  # the report's sample outputs
    generated: int  # answers generated per model
    settings: RunSettings | None = None  # the generation metrics' settings (not grpo)


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _preference_metrics_and_answers(
    model: Any,
    inputs: EvalInputs,
    rows: list[dict],
    examples: list[EvalExample],
    settings: RunSettings,
) -> tuple[dict[str, float | None], Answers]:
    max_length = inputs.spec.training.maxSeqLength
    metrics = preference_metrics(model, inputs.tokenizer, pairs_of(rows), max_length)
    answers = generate_and_score(model, inputs.tokenizer, examples, settings)
    return {**metrics, **answers.scored.metrics()}, answers


def _measure_preference(inputs: EvalInputs, rows: list[dict]) -> Measured:
    """Preference accuracy and margin, and the SFT generation metrics against chosen."""
    settings = run_settings(inputs)  # a bad format check fails before any generation
    examples = generative_examples(answer_examples(inputs.tokenizer, rows))
    tuned, tuned_answers = _preference_metrics_and_answers(
        inputs.model, inputs, rows, examples, settings
    )
    with _base_model(inputs) as base:
        base_metrics, base_answers = _preference_metrics_and_answers(
            base, inputs, rows, examples, settings
        )
    count = inputs.spec.evaluation.sampleOutputs
    samples = answer_samples(examples, tuned_answers, base_answers, count)
    return Measured(tuned, base_metrics, samples, len(examples), settings)


def _measure_rewards(inputs: EvalInputs, rows: list[dict], rewards: RewardModel) -> Measured:
    tokenizer, spec = inputs.tokenizer, inputs.spec
    tuned, tuned_outputs = reward_outputs(inputs.model, tokenizer, rows, rewards, spec)
    with _base_model(inputs) as base:
        base_metrics, base_outputs = reward_outputs(base, tokenizer, rows, rewards, spec)
    samples = [
        {
            "prompt": completion_text(row["prompt"]),
            "reference": str(row.get("answer") or ""),
            "base": base_text,
            "tuned": tuned_text,
        }
        for row, tuned_text, base_text in list(
            zip(rows, tuned_outputs, base_outputs, strict=False)
        )[: spec.evaluation.sampleOutputs]
    ]
    return Measured(tuned, base_metrics, samples, len(rows))


def evaluate_objective(inputs: EvalInputs) -> EvalOutcome:
    """Base and tuned model on the held-out rows; report files; the gates."""
    started = time.perf_counter()
    spec = inputs.spec
    evaluation = spec.evaluation
    rows = list(inputs.eval_rows[: evaluation.maxSamples])
    rewards = RewardModel(spec.rewards) if spec.objective == "grpo" and spec.rewards else None
    with _eval_mode(inputs.model):
        if rewards is None:
            measured = _measure_preference(inputs, rows)
        else:
            measured = _measure_rewards(inputs, rows, rewards)
    tuned, base_metrics, settings = measured.tuned, measured.base, measured.settings
    passed, missed = check_thresholds(tuned, evaluation.thresholds)
    seconds = time.perf_counter() - started
    report = {
        "schemaVersion": REPORT_SCHEMA_VERSION,
        "method": spec.method,
        "objective": spec.objective,
        "dataFormat": inputs.data_format,
        "source": evaluation.datasetUri or "validation split",
        "examples": len(rows) if rewards else len(pairs_of(rows)),
        "generatedExamples": measured.generated,
        "lossScope": "the objective's loss (see notes)",
        "generation": {
            "decoding": "greedy",
            "maxNewTokens": spec.grpo.maxCompletionLength if rewards else evaluation.maxNewTokens,
            "maxSamples": evaluation.maxSamples,
            "batchSize": settings.batch_size if settings else BATCH_SIZE,
        },
        "format": (
            evaluation.format.model_dump(mode="json", by_alias=True, exclude_none=True)
            if evaluation.format and not rewards
            else None
        ),
        "tuned": tuned,
        "base": base_metrics,
        "delta": {
            key: (tuned[key] - base_metrics[key])
            if tuned.get(key) is not None and base_metrics.get(key) is not None
            else None
            for key in tuned
        },
        "gates": gates_document(passed, missed, evaluation.thresholds),
        "samples": measured.samples,
        "timing": {"evalSeconds": seconds, "trainSeconds": inputs.train_seconds},
        "usage": {
            "gpus": inputs.gpus,
            "trainSeconds": inputs.train_seconds,
            "tokensTrained": inputs.tokens_trained,
        },
        "notes": [NOTES["grpo" if rewards else "preference"]],
    }
    files = write_report_files(report, inputs.out_dir, inputs.log_history)
    metrics = {**tuned, **{f"base{k[0].upper()}{k[1:]}": v for k, v in base_metrics.items()}}
    metrics["evalPassed"] = passed
    return EvalOutcome(
        metrics={k: v for k, v in metrics.items() if v is not None},
        files=files,
        passed=passed,
        missed=missed,
        seconds=time.perf_counter() - started,
        report=report,
    )


NOTES = {
    "preference": "Preference accuracy: share of held-out pairs whose mean log-likelihood per "
    "token is higher for chosen than for rejected; margin: the mean of that difference "
    "(nats per token). Eval loss is the objective's own loss on the held-out rows. Exact "
    "match, token F1, ROUGE-L, unsupported content and format compliance score greedy answers "
    "to the held-out prompts against the preferred answer (chosen), as for SFT.",
    "grpo": "Mean reward: the weighted mean of spec.rewards (each in [0, 1]) over greedy "
    "answers to held-out prompts; full reward: the share of answers that pass every reward.",
}
