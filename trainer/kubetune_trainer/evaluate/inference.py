"""Running a model over evaluation examples: pooled token loss, and greedy batched generation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kubetune_trainer.evaluate.examples import EvalExample

IGNORE_INDEX = -100  # labels the loss skips (prompt and padding), as in transformers


@dataclass(frozen=True)
class LossResult:
    loss: float | None  # mean cross-entropy per loss token; None when no token carried loss
    tokens: int


def input_device(model: Any) -> torch.device:
    # With a device map the inputs go where the embeddings are.
    return model.get_input_embeddings().weight.device


def pad_token_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends an answer: the model's generation_config eos list (`<|eot_id|>`,
    `<end_of_turn>`, `<|end|>` ...) and the tokenizer's eos."""
    found: list[int] = []
    config = getattr(model, "generation_config", None)
    candidates = getattr(config, "eos_token_id", None) if config is not None else None
    if isinstance(candidates, int):
        candidates = [candidates]
    for token in [*(candidates or []), tokenizer.eos_token_id]:
        if token is not None and int(token) not in found:
            found.append(int(token))
    return found


def until_stop(tokens: list[int], stops: Sequence[int]) -> list[int]:
    """The answer before its first stop token (a stop token need not be a special token)."""
    for position, token in enumerate(tokens):
        if token in stops:
            return tokens[:position]
    return tokens


def _batches(indices: Sequence[int], size: int) -> list[Sequence[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def _by_length(lengths: Sequence[int]) -> list[int]:
    # Similar lengths in one batch waste less compute on padding.
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


@torch.inference_mode()
def token_loss(
    model: Any,
    examples: Sequence[EvalExample],
    *,
    pad_id: int,
    batch_size: int,
    max_length: int,
) -> LossResult:
    """Cross-entropy pooled over every loss token of every example (token-weighted mean).

    Sequences longer than `max_length` are cut at the end, like training does.
    """
    device = input_device(model)
    sequences = [e.input_ids[:max_length] for e in examples]
    total, tokens = 0.0, 0
    for batch in _batches(_by_length([len(s) for s in sequences]), batch_size):
        width = max(len(sequences[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            seq = sequences[index]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            mask_bits = torch.tensor(examples[index].loss_mask[: len(seq)], dtype=torch.bool)
            labels[row, : len(seq)] = torch.where(
                mask_bits, torch.tensor(seq), torch.tensor(IGNORE_INDEX)
            )
        # The model predicts token t+1 from position t: the first label never counts.
        batch_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        if batch_tokens == 0:
            continue
        output = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)
        )
        total += float(output.loss) * batch_tokens
        tokens += batch_tokens
    return LossResult(loss=total / tokens if tokens else None, tokens=tokens)


@torch.inference_mode()
def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    max_prompt_length: int,
) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding, decoded without
    special tokens and with surrounding whitespace stripped."""
    from transformers import GenerationConfig

    device = input_device(model)
    pad_id = pad_token_id(tokenizer)
    stops = stop_token_ids(model, tokenizer)
    # Deterministic decoding regardless of the model's own generation_config (temperature...).
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=stops or None,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
    )
    # Keep the end of an over-long prompt: that is where the question is. An empty prompt
    # starts from bos, so every row attends to at least one token.
    start = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id]
    prompts = [list(p[-max_prompt_length:]) if p else start for p in prompts]
    outputs: list[str] = [""] * len(prompts)
    for batch in _batches(_by_length([len(p) for p in prompts]), batch_size):
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            prompt = prompts[index]
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        generated = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
        )
        new_tokens = generated[:, width:].cpu()
        for row, index in enumerate(batch):
            answer = until_stop(new_tokens[row].tolist(), stops)
            text = tokenizer.decode(answer, skip_special_tokens=True)
            outputs[index] = text.strip()
    return outputs
