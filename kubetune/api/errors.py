"""Pydantic validation errors as the one-line messages users see.

One wording everywhere: `kubetune submit`, `kubetune run`, the trainer's termination
message and the operator's settings errors all read `source: spec.field: reason`.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

# Pydantic prefixes the messages of errors raised by validators; the field path says enough.
_VALIDATOR_PREFIXES = ("Value error, ", "Assertion failed, ")


def field_path(loc: tuple[int | str, ...]) -> str:
    """Pydantic's error location as a dotted path, list items as `[i]`: `spec.tolerations[0]`."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith("function-"):  # pydantic's internal validator frames
            path += f".{part}" if path else str(part)
    return path


def error_text(error: dict[str, Any], whole: str | None = None) -> str:
    """One pydantic error as `field.path: reason` (`whole: reason` for an error about the
    whole object, when `whole` names it)."""
    message = str(error["msg"])
    for prefix in _VALIDATOR_PREFIXES:
        message = message.removeprefix(prefix)
    path = field_path(tuple(error["loc"]))
    if not path:
        return f"{whole}: {message}" if whole else message
    # A model-level validator names its fields itself ("spec.lora settings are not valid ...").
    if message.startswith(f"{path}."):
        return message
    return f"{path}: {message}"


def describe_validation_error(
    error: ValidationError,
    source: str | None = None,
    *,
    first_only: bool = False,
    whole: str | None = None,
) -> str:
    """Pydantic's errors (or the first) on one line: `job.yaml: spec.x: msg; spec.y: msg`."""
    errors = error.errors()[:1] if first_only else error.errors()
    text = "; ".join(error_text(e, whole) for e in errors)
    return f"{source}: {text}" if source else text
