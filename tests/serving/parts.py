"""Where the serving tests' heavy parts are: each hack/ script prints its cached folder."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cached_part(script: str, what: str) -> Path:
    """The folder `hack/<script> --print-dir` names, once the script has completed it; missing,
    a failure under `hack/test.sh` (KUBETUNE_REQUIRE_CLUSTER), a skip elsewhere."""
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / script), "--print-dir"],
        capture_output=True,
        text=True,
        check=True,
    )
    path = Path(out.stdout.strip())
    if not (path / ".complete").exists():
        if os.environ.get("KUBETUNE_REQUIRE_CLUSTER"):
            pytest.fail(f"{what} is missing from {path}: run bash hack/{script}")
        pytest.skip(f"{what} is not installed (bash hack/{script})")
    return path
