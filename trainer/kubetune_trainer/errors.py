"""Bad input and how the trainer reports it.

A `BadInputError` means retrying cannot help (a malformed dataset, a missing model, a
contradictory setting): the trainer exits with `EXIT_BAD_INPUT` and its one-line message
becomes the container's termination message, which the operator copies into the
FineTuneJob's status. One line, because `kubectl get` and condition messages show one line.
"""

from __future__ import annotations

import os
from pathlib import Path

from kubetune.api.contract import (
    DEFAULT_TERMINATION_LOG,
    ENV_TERMINATION_LOG,
    TERMINATION_MESSAGE_LIMIT,
)


def one_line(text: str) -> str:
    """`text` with line breaks and runs of whitespace folded into single spaces."""
    return " ".join(text.split())


class BadInputError(Exception):
    """Input the user must fix; str(error) is one line naming the file, row or field."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))

    @property
    def message(self) -> str:
        return str(self)


def termination_log_path() -> Path | None:
    """Where the termination message goes: the env override, else Kubernetes' file if present."""
    override = os.environ.get(ENV_TERMINATION_LOG)
    if override:
        return Path(override)
    default = Path(DEFAULT_TERMINATION_LOG)
    return default if default.exists() else None


def truncate_utf8(text: str, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
    """`text` cut to at most `limit` UTF-8 bytes without splitting a character."""
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def write_termination_message(text: str) -> None:
    """Write `text` (at most 4 KiB, what Kubernetes keeps) as the termination message.

    Does nothing outside a pod (no env override and no /dev/termination-log), so local runs
    never create stray files.
    """
    path = termination_log_path()
    if path is None:
        return
    path.write_text(truncate_utf8(text), encoding="utf-8")
