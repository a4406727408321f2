"""Training data of the preference and reward objectives: recognised, checked row by row.

Formats (the column names TRL's trainers expect), plain text or conversational:

- preference (dpo, orpo; kto unpairs it): prompt, chosen, rejected. Plain: three strings.
  Conversational: prompt a list of {role, content} messages, chosen and rejected lists of
  assistant messages;
- unpaired-preference (kto): prompt, completion, label (true: desirable, false: not);
- prompt-only (grpo): prompt, plus any reference columns the rewards read (e.g. answer).

Bad rows fail before training with the file and row named (exit code 3, as for SFT data):
a missing or empty side, chosen equal to rejected, a label that is not a boolean.
"""

from __future__ import annotations

import random
from typing import Any

import datasets

from kubetune.api.v1alpha1 import DatasetSpec
from kubetune_trainer.data import (
    CHAT_ROLES,
    RawRows,
    TrainingData,
    read_source,
    row_refs,
    validation_count,
)
from kubetune_trainer.errors import BadInputError

# What each objective trains on; the first format is what it needs, others are converted.
OBJECTIVE_FORMATS = {
    "dpo": ("preference",),
    "orpo": ("preference",),
    "kto": ("unpaired-preference", "preference"),
    "grpo": ("prompt-only",),
}
REQUIRED_COLUMNS = {
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired-preference": ("prompt", "completion", "label"),
    "prompt-only": ("prompt",),
}
# CSV cells are text: these spell a KTO label there.
CSV_BOOLEANS = {"true": True, "false": False}


def detect_objective_format(columns: list[str], objective: str, source: str) -> str:
    """The row format for `objective` the columns point to; BadInputError otherwise."""
    present = set(columns)
    for fmt in OBJECTIVE_FORMATS[objective]:
        if present.issuperset(REQUIRED_COLUMNS[fmt]):
            return fmt
    wanted = " or ".join(
        f"{'+'.join(REQUIRED_COLUMNS[fmt])} ({fmt})" for fmt in OBJECTIVE_FORMATS[objective]
    )
    seen = ", ".join(columns) or "none"
    raise BadInputError(f"{source}: objective {objective} needs {wanted} columns, found [{seen}]")


def _messages(value: list[Any], where: str, name: str, *, assistant_only: bool) -> list[dict]:
    if not value:
        raise BadInputError(f"{where}: field {name!r} is an empty list of messages")
    messages = []
    for index, message in enumerate(value, start=1):
        at = f"{where}: {name} message {index}"
        if not isinstance(message, dict):
            raise BadInputError(f"{at}: expected an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise BadInputError(f"{at}: unknown role {role!r} (expected system, user or assistant)")
        if assistant_only and role != "assistant":
            raise BadInputError(f"{at}: {name} holds assistant messages only, got {role!r}")
        if not isinstance(content, str):
            raise BadInputError(f"{at}: field 'content' must be a string")
        messages.append({"role": role, "content": content})
    return messages


def _side(row: dict[str, Any], name: str, fmt: str, where: str, conversational: bool) -> Any:
    """A completion side (chosen, rejected, completion): a non-empty string, or assistant
    messages when the prompt is a conversation."""
    value = row.get(name)
    if value is None:
        raise BadInputError(f"{where}: missing field {name!r} (format {fmt})")
    if conversational:
        if not isinstance(value, list):
            raise BadInputError(
                f"{where}: field {name!r} must be a list of assistant messages, like the "
                f"conversational prompt (format {fmt})"
            )
        messages = _messages(value, where, name, assistant_only=True)
        if not any(m["content"].strip() for m in messages):
            raise BadInputError(f"{where}: field {name!r} is empty (format {fmt})")
        return messages
    if not isinstance(value, str):
        raise BadInputError(
            f"{where}: field {name!r} must be a string, got {type(value).__name__} (format {fmt})"
        )
    if not value.strip():
        raise BadInputError(f"{where}: field {name!r} is empty (format {fmt})")
    return value


def _prompt(row: dict[str, Any], fmt: str, where: str) -> tuple[Any, bool]:
    """(prompt, conversational)."""
    value = row.get("prompt")
    if value is None:
        raise BadInputError(f"{where}: missing field 'prompt' (format {fmt})")
    if isinstance(value, list):
        return _messages(value, where, "prompt", assistant_only=False), True
    if not isinstance(value, str):
        raise BadInputError(
            f"{where}: field 'prompt' must be a string or a list of messages, "
            f"got {type(value).__name__} (format {fmt})"
        )
    if fmt == "prompt-only" and not value.strip():
        raise BadInputError(f"{where}: field 'prompt' is empty (format {fmt})")
    return value, False


def _label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in CSV_BOOLEANS:
        return CSV_BOOLEANS[value.strip().lower()]
    shown = "missing" if value is None else f"{value!r}"
    raise BadInputError(
        f"{where}: field 'label' must be true or false, got {shown} (format unpaired-preference)"
    )


def convert_objective_row(row: dict[str, Any], fmt: str, row_number: int, source: str) -> dict:
    """One row in TRL's form for `fmt`; BadInputError naming the file, row and field."""
    where = f"{source}: row {row_number}"
    prompt, conversational = _prompt(row, fmt, where)
    if fmt == "preference":
        chosen = _side(row, "chosen", fmt, where, conversational)
        rejected = _side(row, "rejected", fmt, where, conversational)
        if chosen == rejected:
            raise BadInputError(f"{where}: chosen and rejected are the same (nothing to prefer)")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if fmt == "unpaired-preference":
        completion = _side(row, "completion", fmt, where, conversational)
        return {
            "prompt": prompt,
            "completion": completion,
            "label": _label(row.get("label"), where),
        }
    # prompt-only: the reference columns the rewards read travel with the prompt.
    extra = {k: v for k, v in row.items() if k != "prompt"}
    return {"prompt": prompt, **extra}


def unpair(rows: list[dict[str, Any]], refs: list[str]) -> tuple[list[dict], list[str]]:
    """Preference pairs as KTO rows: chosen desirable, rejected undesirable."""
    out, out_refs = [], []
    for row, ref in zip(rows, refs, strict=True):
        out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
        out_refs += [f"{ref} (chosen)", f"{ref} (rejected)"]
    return out, out_refs


def _converted(raw: RawRows, fmt: str) -> list[dict[str, Any]]:
    return [
        convert_objective_row(row, fmt, number, name)
        for row, (name, number) in zip(raw.rows, raw.refs, strict=True)
    ]


def _read(uri: str, objective: str, cache_dir: Any, revision: str | None) -> tuple:
    raw = read_source(uri, cache_dir=cache_dir, revision=revision)
    if not raw.rows:
        raise BadInputError(f"{raw.name}: dataset is empty (no rows)")
    fmt = detect_objective_format(raw.columns, objective, raw.name)
    return raw, fmt, _converted(raw, fmt)


def is_conversational(rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and isinstance(rows[0].get("prompt"), list)


def load_objective_data(
    spec: DatasetSpec, objective: str, *, seed: int, cache_dir: Any
) -> TrainingData:
    """Training and held-out rows for `objective`, checked before any training. Pairs are
    held out whole (a KTO run unpairs them afterwards, so the evaluation keeps its pairs)."""
    raw, fmt, rows = _read(spec.uri, objective, cache_dir, spec.revision)
    refs = row_refs(raw)
    validation_rows: list[dict] = []
    validation_refs: list[str] = []
    validation_source = None
    validation_digest = None
    if spec.validationUri:
        val_raw, val_fmt, validation_rows = _read(
            spec.validationUri, objective, cache_dir, spec.revision
        )
        if val_fmt != fmt:
            raise BadInputError(
                f"{val_raw.name}: validation data is {val_fmt} but the training data is {fmt}"
            )
        validation_refs = row_refs(val_raw)
        validation_source, validation_digest = spec.validationUri, val_raw.digest
    else:
        held_out = validation_count(len(rows), spec.validationSplit)
        if held_out >= len(rows) and held_out:
            raise BadInputError(
                f"{raw.name}: validationSplit {spec.validationSplit} of {len(rows)} rows "
                "leaves no training rows (lower spec.dataset.validationSplit or add rows)"
            )
        if held_out:
            order = datasets.Dataset.from_dict({"i": list(range(len(rows)))})
            split = order.train_test_split(test_size=held_out, seed=seed, shuffle=True)
            train_positions, test_positions = split["train"]["i"], split["test"]["i"]
            validation_rows = [rows[i] for i in test_positions]
            validation_refs = [refs[i] for i in test_positions]
            rows, refs = [rows[i] for i in train_positions], [refs[i] for i in train_positions]
            validation_source = f"{spec.uri} (held out: {held_out} rows, seed {seed})"
    train_format = fmt
    if objective == "kto" and fmt == "preference":
        rows, refs = unpair(rows, refs)
        train_format = "unpaired-preference"
    if objective == "kto":
        # TRL's KTO reads rows in order (its KL term pairs neighbours): mix them, seeded.
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        rows, refs = [rows[i] for i in order], [refs[i] for i in order]
    return TrainingData(
        train=datasets.Dataset.from_list(rows),
        # The evaluation reads the held-out rows as they are (pairs stay pairs).
        validation=datasets.Dataset.from_list(validation_rows) if validation_rows else None,
        format=train_format,
        digest=raw.digest,
        train_rows=len(rows),
        validation_rows=len(validation_rows),
        source=spec.uri,
        validation_source=validation_source,
        validation_digest=validation_digest,
        train_refs=refs,
        validation_refs=validation_refs,
    )
