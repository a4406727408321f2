"""Test clusters' state dirs left by a killed session are removed by the next one; a
recent one, or one a process still uses, is kept."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.fixtures.cluster import LOST_STATE_DIR_AGE, remove_lost_state_dirs


def state_dir(parent: Path, name: str, age: float) -> Path:
    directory = parent / name
    (directory / "etcd").mkdir(parents=True)
    then = time.time() - age
    os.utime(directory, (then, then))
    return directory


def test_only_old_unused_cluster_state_dirs_go(tmp_path: Path) -> None:
    lost = state_dir(tmp_path, "kubetune-realstack-lost", LOST_STATE_DIR_AGE + 60)
    recent = state_dir(tmp_path, "kubetune-cluster-recent", 5)
    used = state_dir(tmp_path, "kubetune-cluster-used", LOST_STATE_DIR_AGE + 60)
    other = tmp_path / "kubetune-exit-old"  # not a cluster's: no etcd dir
    other.mkdir()
    os.utime(other, (0, 0))
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", f"{used}/etcd"],
        stdin=subprocess.PIPE,
    )
    try:
        remove_lost_state_dirs(tmp_path)
    finally:
        sleeper.communicate()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (recent, used, other)
    )
    assert not lost.exists()
