"""Several trainer processes as one gang, on torch.distributed.

The launcher is torchrun (`python -m torch.distributed.run`): it starts one worker per GPU (one
per node on CPU nodes), sets RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE in each, and fails
the whole node's gang as soon as one worker fails. torchrun takes the gang's shape from its own
environment (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, ...: the defaults of
its flags, names in kubetune.api.contract), never from flags built here: the operator sets them
on a gang's pods, `kubetune run --processes N` on one machine. Multi-node runs use torchrun's
static rendezvous: every node names the same master (index 0's stable DNS name in the cluster)
and its own node rank (the pod's completion index). `python -m kubetune_trainer.distributed` is
the pod's entry point; the workers read the topology from what torchrun set in them (`current`).

Inside the gang, rank 0 alone reports progress, evaluates, publishes and tracks; the other
ranks train, then wait for rank 0's outcome through the rendezvous store (not a collective, so
a long evaluation cannot time one out) and exit with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from kubetune.api.contract import (  # torchrun's environment: set on a gang's pods
    ENV_MASTER_ADDR,
    ENV_NNODES,
    ENV_NODE_RANK,
    ENV_NPROC_PER_NODE,
    ENV_RDZV_CONF,
    EXIT_PREEMPTED,
    EXIT_RENDEZVOUS_TIMEOUT,
    RENDEZVOUS_TIMEOUT_S,
    gang_environment,
)

log = logging.getLogger(__name__)

# Set by torchrun in every worker.
ENV_RANK = "RANK"
ENV_LOCAL_RANK = "LOCAL_RANK"
ENV_WORLD_SIZE = "WORLD_SIZE"
ENV_LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
ENV_TIMEOUT = "KUBETUNE_COLLECTIVE_TIMEOUT_S"
ENV_EXIT_CODES = "KUBETUNE_EXIT_CODE_DIR"  # where each worker leaves its exit code

# Worker exit codes that decide the gang's (contract: 3 bad input, 4 thresholds missed).
NON_RETRYABLE = (3, 4)
# A worker's code after a stop with a checkpoint: the gang's, when no worker had a
# non-retryable one.
PREEMPTED = EXIT_PREEMPTED

# How long a collective may wait for a peer before the process group gives up. Inside training
# every optimizer step is a collective; the longest stretch without one is a checkpoint save
# (seconds to a few minutes: rank 0 writes the model and optimizer to local disk; uploads run
# in a background thread). A peer that died without torchrun or Kubernetes noticing then fails
# the gang after 10 minutes, not torch's default 30 (gloo) and never an indefinite hang.
COLLECTIVE_TIMEOUT_S = 600
# Non-zero ranks wait this long for rank 0 to evaluate and publish (bounded in a cluster by
# spec.activeDeadlineSeconds; a dead rank 0 takes the store down, which ends the wait at once).
OUTCOME_WAIT = timedelta(hours=48)
OUTCOME_KEY = "kubetune/outcome"
SUCCEEDED, GATE_MISSED, FAILED = "succeeded", "gate-missed", "failed"


@dataclass(frozen=True)
class Rank:
    """This process's place in the gang (rank 0 of a world of 1 without a launcher)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def nodes(self) -> int:
        """Nodes (pods) in the gang: torchrun runs local_world_size workers on each."""
        return max(1, self.world_size // max(1, self.local_world_size))


def current(environ: dict[str, str] | None = None) -> Rank:
    env = os.environ if environ is None else environ
    world = int(env.get(ENV_WORLD_SIZE) or 1)
    return Rank(
        rank=int(env.get(ENV_RANK) or 0),
        local_rank=int(env.get(ENV_LOCAL_RANK) or 0),
        world_size=world,
        local_world_size=int(env.get(ENV_LOCAL_WORLD_SIZE) or world),
    )


CPU_FSDP_NOTE = (
    "distributed.strategy fsdp runs as ddp on CPU workers: accelerate shards models on "
    "accelerators only (its FSDP mode is never enabled for multi-CPU), so each CPU worker "
    "holds the whole model"
)


def run_strategy(spec: Any, rank: Rank | None = None) -> str:
    """The strategy this gang runs: spec.distributed.strategy resolved for the world size
    torchrun started (not spec.resources: `kubetune run --processes N` runs N processes
    whatever the manifest's resources say)."""
    return spec.strategy_for((rank or current()).world_size)


def effective_strategy(strategy: str, device: str) -> str:
    """What the gang actually runs: the spec's resolved strategy, except FSDP on CPU workers
    (accelerate would silently fall back to DDP; this says so)."""
    if strategy == "fsdp" and device != "cuda":
        return "ddp"
    return strategy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TORCHRUN = ["-m", "torch.distributed.run"]


def torchrun_argv(program: list[str]) -> list[str]:
    """The torchrun command line running `program` (a module and its arguments, e.g.
    ["-m", "kubetune_trainer"]). No topology flags: torchrun reads the gang's shape, the
    static rendezvous and its timeout from its PET_* environment (`local_gang_env`, or the
    operator's on a gang's pods)."""
    return [sys.executable, *TORCHRUN, *program]


def gang_shape(environ: dict[str, str] | None = None) -> tuple[int, int]:
    """(nodes, processes per node) of the gang torchrun is told to start (1, 1 without one)."""
    env = os.environ if environ is None else environ
    # torchrun also takes a range of nodes (min:max); a static gang's is one number.
    nnodes = int((env.get(ENV_NNODES) or "1").rpartition(":")[2])
    return nnodes, int(env.get(ENV_NPROC_PER_NODE) or 1)


def check_gang(environ: dict[str, str]) -> None:
    """Refuse a gang torchrun could not form (it would wait at the rendezvous for nothing)."""
    nnodes, nproc = gang_shape(environ)
    node_rank = int(environ.get(ENV_NODE_RANK) or 0)
    if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(f"bad gang: {nnodes} nodes x {nproc}, node rank {node_rank}")


def local_gang_env(
    nproc_per_node: int, *, master_port: int | None = None, environ: dict[str, str] | None = None
) -> dict[str, str]:
    """`environ` (the process's by default) with torchrun's environment for `nproc_per_node`
    processes on this machine: what the operator sets on a one-pod gang, node rank 0."""
    base = dict(os.environ if environ is None else environ)
    torchrun = gang_environment(1, nproc_per_node, master_port=master_port or free_port())
    return {**base, **torchrun, ENV_NODE_RANK: "0"}


def rendezvous_timeout_s(environ: dict[str, str] | None = None) -> int:
    """How long torchrun waits at the static rendezvous (its PET_RDZV_CONF's timeout)."""
    env = os.environ if environ is None else environ
    for item in (env.get(ENV_RDZV_CONF) or "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "timeout" and value.strip():
            return int(value)
    return RENDEZVOUS_TIMEOUT_S  # torchrun's static rendezvous has the same default


def collective_timeout() -> timedelta:
    return timedelta(seconds=int(os.environ.get(ENV_TIMEOUT) or COLLECTIVE_TIMEOUT_S))


def init_process_group(device: str) -> None:
    """Join the gang (no-op for one process): NCCL between GPUs, gloo between CPUs. The
    trainer's accelerate state finds and reuses this group."""
    import torch
    import torch.distributed as dist

    rank = current()
    if not rank.distributed or dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(rank.local_rank)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=collective_timeout())
    log.info("rank %d of %d joined (%s)", rank.rank, rank.world_size, backend)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def node_lock(work_dir: Path) -> Iterator[None]:
    """One local rank at a time (a file lock, no timeout): the first downloads the model and
    data into the node's shared scratch, the others then find them there."""
    if current().local_world_size <= 1:
        yield
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    with (work_dir / ".node.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _store() -> Any:
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def announce_outcome(outcome: str) -> None:
    """Rank 0: tell the waiting ranks how the job ended (SUCCEEDED, GATE_MISSED, FAILED)."""
    import torch.distributed as dist

    if dist.is_initialized() and current().is_main:
        _store().set(OUTCOME_KEY, outcome)


def wait_for_outcome() -> str:
    """Non-zero ranks: rank 0's outcome. A rank 0 that died takes the store with it (or its
    launcher stops this process), so this never outlives the gang."""
    store = _store()
    store.wait([OUTCOME_KEY], OUTCOME_WAIT)
    return store.get(OUTCOME_KEY).decode()


def agree(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object); `value` itself without a gang."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def destroy() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def record_start() -> None:
    """A worker: say it started, so past the rendezvous (only under a launcher that asked)."""
    folder = os.environ.get(ENV_EXIT_CODES)
    if folder:
        (Path(folder) / f"started-{current().rank}").touch()


def record_exit_code(code: int) -> None:
    """A worker: leave `code` for the launcher (only under one that asked for it)."""
    folder = os.environ.get(ENV_EXIT_CODES)
    if folder:
        (Path(folder) / f"rank-{current().rank}").write_text(str(code))


def gang_exit_code(launcher_code: int, folder: Path) -> int:
    """The gang's exit code: a worker's bad-input (3) or thresholds-missed (4) code wins over
    torchrun's generic 1, so the operator does not retry what cannot succeed; then preempted
    (5), so a stop with a checkpoint is not counted as a failure. The folder is removed."""
    import shutil

    codes = {int(f.read_text() or 1) for f in Path(folder).glob("rank-*")}
    started = any(Path(folder).glob("started-*"))
    shutil.rmtree(folder, ignore_errors=True)
    if launcher_code == 0:
        return 0
    if not codes and not started:
        return EXIT_RENDEZVOUS_TIMEOUT  # no worker of this pod ever ran: the gang never met
    return next((code for code in (*NON_RETRYABLE, PREEMPTED) if code in codes), launcher_code)


def stop_workers(launcher_pid: int, signum: int) -> None:
    """Pass SIGTERM to torchrun's workers, not to torchrun: its agent would pass it on too, but
    SIGKILL the workers 30 s later (a fixed timeout), cutting a large checkpoint's upload short.
    The workers stop after their current step and exit; torchrun then ends on their codes."""
    import psutil  # accelerate's dependency

    try:
        workers = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.send_signal(signum)


def rendezvous_failure_message(environ: dict[str, str]) -> str:
    """The termination message of a pod whose gang never met, for the operator's status."""
    nnodes, _ = gang_shape(environ)
    rank = int(environ.get(ENV_NODE_RANK) or 0)
    master = environ.get(ENV_MASTER_ADDR) or "127.0.0.1"
    return (
        f"the gang did not meet: node rank {rank} waited {rendezvous_timeout_s(environ)} s at "
        f"the rendezvous ({master}) for the other {nnodes - 1} pod(s) of the gang "
        f"({ENV_RDZV_CONF}); is one of them unschedulable?"
    )


def launch(command: list[str], **popen: Any) -> tuple[Any, Path]:
    """Start torchrun (its topology in `env`, the process's environment by default); the
    workers record their exit codes in a fresh folder (returned)."""
    import subprocess
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="kubetune-exit-"))
    env = {**(popen.pop("env", None) or os.environ), ENV_EXIT_CODES: str(folder)}
    return subprocess.Popen(command, env=env, **popen), folder


def is_gang_pod(environ: dict[str, str] | None = None) -> bool:
    """A trainer pod of a gang, not yet under torchrun (whose workers have LOCAL_RANK)."""
    env = os.environ if environ is None else environ
    if ENV_LOCAL_RANK in env:
        return False
    nnodes, nproc = gang_shape(env)
    return nnodes * nproc > 1


def main(argv: list[str] | None = None) -> int:
    """The trainer pod's entry point: one worker without a gang, else torchrun. SIGTERM (the
    kubelet stopping the pod) is passed on to torchrun's workers (`stop_workers`)."""
    import signal

    args = list(sys.argv[1:] if argv is None else argv)
    program = ["-m", "kubetune_trainer", *args]
    if not is_gang_pod():
        os.execv(sys.executable, [sys.executable, *program])
    check_gang(dict(os.environ))
    command = torchrun_argv(program)
    torchrun = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("PET_"))
    print(" ".join([*torchrun, *command]), file=sys.stderr, flush=True)
    gang, folder = launch(command)
    signal.signal(signal.SIGTERM, lambda signum, _frame: stop_workers(gang.pid, signum))
    code = gang_exit_code(gang.wait(), folder)
    if code == EXIT_RENDEZVOUS_TIMEOUT:
        from kubetune_trainer.errors import write_termination_message

        message = rendezvous_failure_message(dict(os.environ))
        print(message, file=sys.stderr, flush=True)
        write_termination_message(message)
    return code


if __name__ == "__main__":
    sys.exit(main())
