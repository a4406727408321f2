"""Small formatting helpers shared by every layer (timestamps, sizes)."""

from __future__ import annotations

from datetime import UTC, datetime


def now_rfc3339(*, milliseconds: bool = False) -> str:
    """The current UTC time as Kubernetes writes it: `2026-01-02T03:04:05Z`."""
    timespec = "milliseconds" if milliseconds else "seconds"
    return datetime.now(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def human_size(size: int) -> str:
    """`512 B`, `1.5 KiB`, `3.2 GiB`: binary units, one decimal above bytes."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
