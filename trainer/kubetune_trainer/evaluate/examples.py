"""Held-out rows turned into what evaluation needs: token ids for the loss and for generation.

Tokenisation mirrors TRL's SFTTrainer, so the eval loss measures what training optimised:
prompt-completion rows are tokenised as prompt and as prompt + completion + eos, and the
loss covers the tokens after their common prefix; chat rows are rendered with the chat
template with and without the final assistant turn the same way; text rows count every
token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune_trainer.errors import BadInputError

# Formats the evaluation understands (alpaca rows arrive converted to prompt-completion).
GENERATIVE_FORMATS = ("prompt-completion", "chat")


@dataclass(frozen=True)
class EvalExample:
    input_ids: list[int]  # the whole example, as trained on
    loss_start: int  # tokens before this index carry no loss (the prompt)
    prompt_ids: list[int] | None  # what generation starts from (None for text rows)
    prompt: str  # the prompt as text, for the report and the unsupported-content check
    reference: str  # the expected answer ("" for text rows)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def row_format(row: dict[str, Any]) -> str:
    """The converted format of one row, from its keys."""
    if "messages" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "prompt-completion"
    if "text" in row:
        return "text"
    raise BadInputError(
        f"evaluation row has columns {sorted(row)}; expected prompt/completion, messages or text"
    )


def _ids(encoding: Any) -> list[int]:
    ids = encoding["input_ids"] if not isinstance(encoding, list) else encoding
    return list(ids)


def _chat_template_ids(
    tokenizer: Any, messages: list[dict], *, generation_prompt: bool
) -> list[int]:
    encoding = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
    )
    return _ids(encoding)


def _prompt_completion_example(row: dict[str, Any], tokenizer: Any) -> EvalExample:
    prompt, completion = row["prompt"], row["completion"]
    eos = tokenizer.eos_token or ""
    # TRL appends the eos token to the completion text before tokenising.
    target = completion if not eos or completion.endswith(eos) else completion + eos
    prompt_ids = _ids(tokenizer(prompt))
    full_ids = _ids(tokenizer(prompt + target))
    return EvalExample(
        input_ids=full_ids,
        loss_start=common_prefix_length(prompt_ids, full_ids),
        prompt_ids=prompt_ids,
        prompt=prompt,
        reference=completion,
    )


def _chat_example(row: dict[str, Any], tokenizer: Any) -> EvalExample:
    messages = row["messages"]
    last_answer = max(
        (i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None
    )
    if last_answer is None:
        raise BadInputError("evaluation chat row has no assistant message to compare against")
    context, conversation = messages[:last_answer], messages[: last_answer + 1]
    prompt_ids = _chat_template_ids(tokenizer, context, generation_prompt=True)
    full_ids = _chat_template_ids(tokenizer, conversation, generation_prompt=False)
    prompt_text = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
    return EvalExample(
        input_ids=full_ids,
        loss_start=common_prefix_length(prompt_ids, full_ids),
        prompt_ids=prompt_ids,
        prompt=prompt_text,
        reference=messages[last_answer]["content"],
    )


def _text_example(row: dict[str, Any], tokenizer: Any) -> EvalExample:
    text = row["text"]
    return EvalExample(
        input_ids=_ids(tokenizer(text)), loss_start=0, prompt_ids=None, prompt=text, reference=""
    )


def build_example(row: dict[str, Any], tokenizer: Any) -> EvalExample:
    """One converted row ({prompt, completion} | {messages} | {text}) as an EvalExample."""
    fmt = row_format(row)
    if fmt == "chat":
        return _chat_example(row, tokenizer)
    if fmt == "prompt-completion":
        return _prompt_completion_example(row, tokenizer)
    return _text_example(row, tokenizer)
