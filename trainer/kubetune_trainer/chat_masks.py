"""Which tokens of a rendered conversation carry loss: every assistant turn, its end-of-turn
marker included; system, user and tool turns none.

Chat templates do not render a conversation's prefix the way they render it inside the whole
conversation (Mistral v0.3 moves the system text into the *last* user turn; Qwen3 adds an
empty `<think>` block to the last assistant turn only), so turns are found in ONE rendering
of the whole conversation:

1. a template with `{% generation %}` markers: transformers' assistant mask
   (`return_assistant_tokens_mask`), accepted when it marks one span per assistant message;
2. otherwise each assistant message is located in the rendered text, in order, as its content
   followed by the template's end-of-turn marker (an assistant message with tool calls and no
   content: the text the template renders for it alone, found verbatim); tokens overlapping
   those character spans carry loss;
3. when neither works the row is refused, naming the template problem, rather than trained on
   guessed tokens.

A template's `raise_exception` (Gemma refusing a system message, Mistral v0.1 requiring
alternating roles) is bad input naming the row, not a crash to retry.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

from jinja2.exceptions import TemplateError

from kubetune_trainer.errors import BadInputError

# The same check TRL makes (trl.chat_template_utils.has_generation_markers).
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Probe conversation for the end-of-turn marker: text unlikely to be changed by a template.
_PROBE_USER, _PROBE_ANSWER = "kubetune-probe-question", "kubetune-probe-answer"
_THINK_END = "</think>"


def has_generation_markers(template: Any) -> bool:
    if isinstance(template, dict):
        template = template.get("default", "")
    return bool(template) and GENERATION_MARKER.search(template) is not None


def render_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as templates expect them: keys the dataset filled with None removed (Arrow
    gives every message every column) and tool-call arguments stored as JSON text parsed back."""
    rendered = []
    for message in messages:
        clean = {k: v for k, v in message.items() if v is not None}
        if clean.get("tool_calls"):
            clean["tool_calls"] = [_tool_call(call) for call in clean["tool_calls"]]
        else:
            clean.pop("tool_calls", None)
        rendered.append(clean)
    return rendered


def _tool_call(call: dict[str, Any]) -> dict[str, Any]:
    call = {k: v for k, v in call.items() if v is not None}
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        # Not JSON: the template gets the text as written.
        with contextlib.suppress(json.JSONDecodeError):
            function["arguments"] = json.loads(arguments)
    call["function"] = function
    return call


def apply_template(
    tokenizer: Any, messages: list[dict], where: str, *, tools: list | None = None, **kwargs: Any
) -> Any:
    """tokenizer.apply_chat_template; the template's own refusal is BadInputError naming `where`."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, **kwargs)
    except TemplateError as error:
        raise BadInputError(
            f"{where}: the chat template refuses this conversation: {error}"
        ) from None


def turn_end_marker(tokenizer: Any) -> str:
    """What the template writes after an assistant answer that ends the conversation (e.g.
    `<|im_end|>`, `</s>`, `<|eot_id|>`), trailing whitespace removed; "" when it cannot tell."""
    probe = [
        {"role": "user", "content": _PROBE_USER},
        {"role": "assistant", "content": _PROBE_ANSWER},
    ]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except (TemplateError, TypeError, ValueError):
        return ""
    if not isinstance(text, str) or _PROBE_ANSWER not in text:
        return ""
    return text.rsplit(_PROBE_ANSWER, 1)[1].strip()


def _runs(mask: list[int]) -> int:
    return sum(1 for i, bit in enumerate(mask) if bit and (i == 0 or not mask[i - 1]))


def _assistant_count(messages: list[dict]) -> int:
    return sum(1 for m in messages if m.get("role") == "assistant")


def _marked_tokens(
    tokenizer: Any, messages: list[dict], tools: list | None, where: str
) -> tuple[list[int], list[int]] | None:
    encoding = apply_template(
        tokenizer,
        messages,
        where,
        tools=tools,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, mask = list(encoding["input_ids"]), list(encoding["assistant_masks"])
    if _runs(mask) != _assistant_count(messages):
        return None  # markers that do not wrap every assistant turn: not trusted
    return ids, mask


def _find(text: str, needle: str, start: int) -> int:
    return text.find(needle, start) if needle else -1


def _answer_span(text: str, content: str, marker: str, cursor: int) -> tuple[int, int] | None:
    """Where the answer `content` and the end-of-turn `marker` after it sit, from `cursor`."""
    candidates = [content.strip()]
    if _THINK_END in content:  # reasoning a template drops from earlier turns
        candidates.append(content.split(_THINK_END)[-1].strip())
    for candidate in candidates:
        if not candidate:
            continue
        pattern = re.escape(candidate) + (r"\s*" + re.escape(marker) if marker else "")
        found = re.compile(pattern).search(text, cursor)
        if found:
            return found.start(), found.end()
    return None


def _rendered_alone(
    tokenizer: Any, messages: list[dict], index: int, tools: list | None, where: str
) -> str:
    """The text the template adds for messages[index] after the generation prompt before it."""
    before = apply_template(
        tokenizer, messages[:index], where, tools=tools, tokenize=False, add_generation_prompt=True
    )
    through = apply_template(tokenizer, messages[: index + 1], where, tools=tools, tokenize=False)
    shared = 0
    for a, b in zip(before, through, strict=False):
        if a != b:
            break
        shared += 1
    return through[shared:].rstrip()


def _located_tokens(
    tokenizer: Any, messages: list[dict], tools: list | None, where: str
) -> tuple[list[int], list[int]]:
    text = apply_template(tokenizer, messages, where, tools=tools, tokenize=False)
    marker = turn_end_marker(tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content") or ""
        if not isinstance(content, str):
            content = ""
        if role != "assistant":
            # Prompt turns only move the cursor, so an answer is never found inside one. A
            # system text counts only before the first user turn (Mistral v0.3 renders it
            # inside the last user turn, after earlier answers).
            at = _find(text, content.strip(), cursor)
            if role == "system" and at >= 0:
                first_user = next((m for m in messages if m.get("role") == "user"), None)
                user_at = _find(text, str((first_user or {}).get("content") or "").strip(), 0)
                at = at if user_at >= 0 and at < user_at else -1
            if at >= 0:
                cursor = at + len(content.strip())
            continue
        span = _answer_span(text, content, marker, cursor) if content.strip() else None
        if span is None and message.get("tool_calls"):
            alone = _rendered_alone(tokenizer, messages, index, tools, where)
            # Rendered last, a Qwen3-style turn gets a <think> block it has not in context.
            for candidate in dict.fromkeys([alone, alone.split(_THINK_END)[-1].strip()]):
                at = _find(text, candidate, cursor)
                if at >= 0:
                    span = (at, at + len(candidate))
                    break
        if span is None:
            raise BadInputError(
                f"{where}: cannot tell which tokens of assistant message {index + 1} to train: "
                "the chat template neither marks assistant turns with {% generation %} nor "
                "renders the answer verbatim followed by its end-of-turn marker "
                f"{marker or '(none found)'!r} (add {{% generation %}} markers to "
                "spec.dataset.chatTemplate)"
            )
        spans.append(span)
        cursor = span[1]
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), encoding["offset_mapping"]
    mask = [
        int(any(start < span_end and end > span_start for span_start, span_end in spans))
        for start, end in offsets
    ]
    return ids, mask


def chat_tokens(
    tokenizer: Any, messages: list[dict], *, tools: list | None = None, where: str = "row"
) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a conversation: 1 on every assistant turn's tokens and its
    end-of-turn marker, 0 elsewhere; BadInputError naming `where` when the template refuses
    the conversation or its assistant turns cannot be found soundly."""
    messages = render_messages(messages)
    if has_generation_markers(getattr(tokenizer, "chat_template", None)):
        marked = _marked_tokens(tokenizer, messages, tools, where)
        if marked is not None:
            return marked
    return _located_tokens(tokenizer, messages, tools, where)


def register_turn_end(model: Any, tokenizer: Any) -> str | None:
    """Make a custom template's end-of-turn marker end generation, as TRL's
    `clone_chat_template` does: the tokenizer's eos becomes the marker (saved with the model,
    so servers stop there too) and the model's generation config stops on it as well as on the
    old eos (evaluation stops there). Returns a note when the marker cannot stop generation."""
    marker = turn_end_marker(tokenizer)
    if not marker or marker == tokenizer.eos_token:
        return None
    ids = tokenizer.encode(marker, add_special_tokens=False)
    if len(ids) != 1:
        return (
            f"spec.dataset.chatTemplate: the end-of-turn marker {marker!r} is {len(ids)} tokens "
            "of this tokenizer, so generation cannot stop on it (end turns with a single token "
            "of the vocabulary, e.g. the eos token)"
        )
    previous = tokenizer.eos_token_id
    tokenizer.eos_token = marker
    stops = [ids[0], *([previous] if previous is not None else [])]
    config = getattr(model, "generation_config", None)
    if config is not None:
        existing = config.eos_token_id
        existing = [existing] if isinstance(existing, int) else list(existing or [])
        config.eos_token_id = list(dict.fromkeys([*stops, *existing]))
    return None
