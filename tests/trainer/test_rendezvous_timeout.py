"""A gang whose other pod never starts gives up at the rendezvous: a real torchrun launch of
node rank 0 of a 2-pod gloo gang, through the trainer pod's own entry point, with a short
rendezvous timeout. It ends with the contract's exit code and a termination message saying
why, instead of waiting for ever."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from kubetune.api import contract
from kubetune_trainer import distributed

TIMEOUT_S = 3


def test_rank_zero_alone_gives_up_at_the_rendezvous(tmp_path: Path) -> None:
    termination_log = tmp_path / "termination-log"
    env = {
        **os.environ,
        contract.ENV_NNODES: "2",
        contract.ENV_NPROC_PER_NODE: "1",
        contract.ENV_NODE_RANK: "0",
        contract.ENV_MASTER_ADDR: "127.0.0.1",
        contract.ENV_MASTER_PORT: str(distributed.free_port()),
        contract.ENV_RDZV_CONF: f"timeout={TIMEOUT_S}",  # torchrun's own setting
        contract.ENV_TERMINATION_LOG: str(termination_log),
    }
    env.pop(distributed.ENV_LOCAL_RANK, None)
    started = time.monotonic()
    # The job config is never read: no worker starts without the second pod.
    run = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(tmp_path / "job.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert run.returncode == contract.EXIT_RENDEZVOUS_TIMEOUT, run.stderr[-2000:]
    assert "waiting for clients. 1/2 clients joined" in run.stderr
    message = termination_log.read_text()
    assert message.startswith("the gang did not meet: node rank 0 waited 3 s")
    assert "(PET_RDZV_CONF)" in message
    assert elapsed >= TIMEOUT_S


def test_a_worker_that_ran_keeps_its_own_exit_code(tmp_path: Path) -> None:
    """Not a rendezvous failure: a worker started (and was killed before it said how it
    ended), or said how it ended."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "started-0").touch()
    assert distributed.gang_exit_code(1, tmp_path / "a") == 1
    (tmp_path / "b").mkdir()
    assert distributed.gang_exit_code(1, tmp_path / "b") == contract.EXIT_RENDEZVOUS_TIMEOUT
    (tmp_path / "c").mkdir()
    assert distributed.gang_exit_code(0, tmp_path / "c") == 0


def test_the_rendezvous_timeout_is_torchruns_rdzv_conf() -> None:
    assert distributed.rendezvous_timeout_s({}) == contract.RENDEZVOUS_TIMEOUT_S
    assert distributed.rendezvous_timeout_s({"PET_RDZV_CONF": "timeout=42"}) == 42
    assert distributed.rendezvous_timeout_s({"PET_RDZV_CONF": "read_timeout=9, timeout=7"}) == 7
