"""Converted rows to token ids and loss masks: what training optimises and evaluation measures.

The trainer tokenises every row itself and hands TRL ready `input_ids` and `labels`, so that
one function decides which tokens carry loss, for training, for the validation loss and for
the evaluation stage alike:

- prompt-completion (alpaca rendered with the alpaca template included): the tokens after
  the prompt, eos included, as TRL does (`completion + eos` tokenised after the prompt);
- chat: every assistant turn (tool calls included), its end-of-turn token included (so the
  model learns to stop); system, user and tool turns carry none. The turns are found in one
  rendering of the whole conversation (see `chat_masks`), so templates that render a prefix
  of the conversation differently (Mistral v0.3, Qwen3) are masked right;
- text: every token;
- `trainOnPrompt: true`: every token of every format.

Rows longer than `maxSeqLength` are cut at the end (`truncated`). A row whose loss tokens
would all be cut away teaches nothing (a packed row would carry no loss, an unpacked one TRL
would drop silently): it is left out and counted (`excluded`), and when more than
`MAX_EXCLUDED_SHARE` of the training rows would be left out the job fails before training,
naming them: maxSeqLength is then wrong for this data, not the odd row.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets

from kubetune_trainer.chat_masks import apply_template, chat_tokens, render_messages
from kubetune_trainer.errors import BadInputError

IGNORE_INDEX = -100  # labels the loss skips, as in transformers
# Above this share of training rows with nothing left to learn from, the job fails.
MAX_EXCLUDED_SHARE = 0.05
# Rows named in errors and manifests (the counts are always complete).
ROWS_NAMED = 10
# Tokenising in several processes pays off only for large data (process start, pickling).
PARALLEL_TOKENISE_ROWS = 20_000


@dataclass
class LengthReport:
    """What maxSeqLength did to one split."""

    rows: int  # rows before exclusion
    truncated: int = 0  # cut at maxSeqLength, some loss tokens kept
    excluded: list[str] = field(default_factory=list)  # refs of rows with every loss token cut

    @property
    def kept(self) -> int:
        return self.rows - len(self.excluded)

    def document(self) -> dict[str, Any]:
        return {
            "truncatedRows": self.truncated,
            "excludedRows": len(self.excluded),
            "excludedExamples": self.excluded[:ROWS_NAMED],
        }


@dataclass
class TokenizedData:
    train: datasets.Dataset  # input_ids, labels
    validation: datasets.Dataset | None
    train_lengths: LengthReport
    validation_lengths: LengthReport | None


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def _ids(encoding: Any) -> list[int]:
    ids = encoding["input_ids"] if not isinstance(encoding, list) else encoding
    return list(ids)


def chat_ids(tokenizer: Any, messages: list[dict], *, generation_prompt: bool) -> list[int]:
    encoding = apply_template(
        tokenizer,
        render_messages(messages),
        "row",
        tokenize=True,
        return_dict=True,
        add_generation_prompt=generation_prompt,
    )
    return _ids(encoding)


def row_tools(row: dict[str, Any]) -> list | None:
    """A chat row's tool definitions (stored as JSON text, see data.TOOLS_FIELD)."""
    tools = row.get("tools")
    return json.loads(tools) if isinstance(tools, str) and tools else (tools or None)


def _prompt_completion_tokens(
    tokenizer: Any, prompt: str, completion: str
) -> tuple[list[int], list[int]]:
    eos = tokenizer.eos_token or ""
    target = completion if not eos or completion.endswith(eos) else completion + eos
    prompt_ids = _ids(tokenizer(prompt))
    ids = _ids(tokenizer(prompt + target))
    start = common_prefix_length(prompt_ids, ids)
    return ids, [0] * start + [1] * (len(ids) - start)


def _text_tokens(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    eos = tokenizer.eos_token or ""
    ids = _ids(tokenizer(text if not eos or text.endswith(eos) else text + eos))
    return ids, [1] * len(ids)


def row_tokens(
    row: dict[str, Any], tokenizer: Any, *, train_on_prompt: bool = False, where: str = "row"
) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one converted row ({messages[, tools]} | {prompt,
    completion} | {text}); mask 1 marks a token the loss is computed on. `where` names the
    row in errors."""
    if "messages" in row:
        ids, mask = chat_tokens(tokenizer, row["messages"], tools=row_tools(row), where=where)
    elif "prompt" in row and "completion" in row:
        ids, mask = _prompt_completion_tokens(tokenizer, row["prompt"], row["completion"])
    else:
        ids, mask = _text_tokens(tokenizer, row["text"])
    if train_on_prompt:
        mask = [1] * len(ids)
    return ids, mask


def labels_for(ids: Sequence[int], mask: Sequence[int]) -> list[int]:
    return [token if keep else IGNORE_INDEX for token, keep in zip(ids, mask, strict=True)]


def _tokenize_row(
    row: dict[str, Any],
    index: int,
    tokenizer: Any,
    max_length: int,
    train_on_prompt: bool,
    refs: Sequence[str],
) -> dict[str, Any]:
    where = refs[index] if index < len(refs) else f"row {index + 1}"
    ids, mask = row_tokens(row, tokenizer, train_on_prompt=train_on_prompt, where=where)
    had_loss = any(mask)
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    return {
        "input_ids": ids,
        "labels": labels_for(ids, mask),
        "truncated": truncated,
        "excluded": had_loss and not any(mask),
    }


def tokenise_processes(rows: int, cpus: int | None = None) -> int | None:
    """Worker processes for tokenising `rows` rows (None: in this process)."""
    cpus = cpus or os.cpu_count() or 1
    if rows < PARALLEL_TOKENISE_ROWS or cpus < 2:
        return None
    return min(8, cpus)


def tokenize_split(
    dataset: datasets.Dataset,
    refs: Sequence[str],
    tokenizer: Any,
    *,
    max_length: int,
    train_on_prompt: bool,
) -> tuple[datasets.Dataset, LengthReport]:
    """`dataset`'s rows as input_ids and labels, excluded rows left out, and the report."""
    mapped = dataset.map(
        _tokenize_row,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_length": max_length,
            "train_on_prompt": train_on_prompt,
            "refs": list(refs),
        },
        with_indices=True,
        remove_columns=dataset.column_names,
        num_proc=tokenise_processes(len(dataset)),
    )
    excluded = [index for index, flag in enumerate(mapped["excluded"]) if flag]
    report = LengthReport(
        rows=len(mapped),
        truncated=sum(mapped["truncated"]) - len(excluded),
        excluded=[refs[index] if index < len(refs) else f"row {index + 1}" for index in excluded],
    )
    if excluded:
        gone = set(excluded)
        mapped = mapped.select([i for i in range(len(mapped)) if i not in gone])
    return mapped.remove_columns(["truncated", "excluded"]), report


def check_excluded_share(
    report: LengthReport, max_length: int, limit: float = MAX_EXCLUDED_SHARE
) -> None:
    """BadInputError when more than `limit` of the training rows would teach nothing."""
    if not report.excluded or len(report.excluded) <= limit * report.rows:
        return
    named = "; ".join(report.excluded[:ROWS_NAMED])
    more = len(report.excluded) - ROWS_NAMED
    raise BadInputError(
        f"{len(report.excluded)} of {report.rows} training rows have no response left within "
        f"spec.training.maxSeqLength {max_length} (more than {limit:.0%}): {named}"
        + (f" and {more} more" if more > 0 else "")
        + " (raise maxSeqLength or shorten the prompts)"
    )


def tokenize_training_data(
    data: Any,
    tokenizer: Any,
    *,
    max_length: int,
    train_on_prompt: bool,
    split_overlong: bool = False,
) -> TokenizedData:
    """Training and validation splits of a `TrainingData`, tokenised; fails before training
    when too many training rows would be left out (see `check_excluded_share`).
    `split_overlong` (packingStrategy bfd_split): training rows are kept whole, for the packer
    to split into pieces of `max_length`; validation rows are still cut."""
    train, train_lengths = tokenize_split(
        data.train,
        data.train_refs,
        tokenizer,
        max_length=sys.maxsize if split_overlong else max_length,
        train_on_prompt=train_on_prompt,
    )
    check_excluded_share(train_lengths, max_length)
    if not len(train):
        raise BadInputError("no training rows left within spec.training.maxSeqLength")
    validation, validation_lengths = None, None
    if data.validation is not None:
        validation, validation_lengths = tokenize_split(
            data.validation,
            data.validation_refs,
            tokenizer,
            max_length=max_length,
            train_on_prompt=train_on_prompt,
        )
        if not len(validation):
            validation = None
    return TokenizedData(train, validation, train_lengths, validation_lengths)
