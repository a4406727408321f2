"""Held-out rows turned into what evaluation needs: token ids for the loss and for generation.

Token ids and loss mask come from `kubetune_trainer.tokens.row_tokens`, the function training
uses, so the eval loss measures the tokens training optimised: the completion (eos included)
of prompt-completion rows, every assistant turn of chat rows, every token of text rows, or
every token of every row with trainOnPrompt. Generation starts from the prompt: the prompt of
a prompt-completion row, the conversation before the last assistant turn of a chat row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune_trainer.chat_masks import render_messages
from kubetune_trainer.errors import BadInputError
from kubetune_trainer.tokens import chat_ids, row_tokens

# Formats the evaluation understands (alpaca rows arrive converted to prompt-completion).


@dataclass(frozen=True)
class EvalExample:
    input_ids: list[int]  # the whole example, as trained on
    loss_mask: list[int]  # 1: the loss covers this token (as in training)
    prompt_ids: list[int] | None  # what generation starts from (None for text rows)
    prompt: str  # the prompt as text, for the report and the unsupported-content check
    reference: str  # the expected answer ("" for text rows)


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


def _prompt_completion_example(row: dict[str, Any], tokenizer: Any, train_on_prompt: bool):
    ids, mask = row_tokens(row, tokenizer, train_on_prompt=train_on_prompt)
    return EvalExample(
        input_ids=ids,
        loss_mask=mask,
        prompt_ids=list(tokenizer(row["prompt"])["input_ids"]),
        prompt=row["prompt"],
        reference=row["completion"],
    )


def _chat_example(row: dict[str, Any], tokenizer: Any, train_on_prompt: bool) -> EvalExample:
    messages = row["messages"]
    last_answer = max(
        (i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None
    )
    if last_answer is None:
        raise BadInputError("evaluation chat row has no assistant message to compare against")
    context = render_messages(messages[:last_answer])  # without Arrow's None-filled keys
    ids, mask = row_tokens(
        {**row, "messages": messages[: last_answer + 1]}, tokenizer, train_on_prompt=train_on_prompt
    )
    return EvalExample(
        input_ids=ids,
        loss_mask=mask,
        prompt_ids=chat_ids(tokenizer, context, generation_prompt=True),
        prompt=tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True),
        reference=messages[last_answer]["content"],
    )


def _text_example(row: dict[str, Any], tokenizer: Any, train_on_prompt: bool) -> EvalExample:
    ids, mask = row_tokens(row, tokenizer, train_on_prompt=train_on_prompt)
    return EvalExample(ids, mask, prompt_ids=None, prompt=row["text"], reference="")


def build_example(
    row: dict[str, Any], tokenizer: Any, *, train_on_prompt: bool = False
) -> EvalExample:
    """One converted row ({prompt, completion} | {messages} | {text}) as an EvalExample."""
    fmt = row_format(row)
    if fmt == "chat":
        return _chat_example(row, tokenizer, train_on_prompt)
    if fmt == "prompt-completion":
        return _prompt_completion_example(row, tokenizer, train_on_prompt)
    return _text_example(row, tokenizer, train_on_prompt)
