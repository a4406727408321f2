"""Stopping on SIGTERM without losing work: finish the optimizer step, checkpoint it, exit.

Kubernetes stops a pod (eviction, Kueue preemption, node drain, spot reclaim, `kubectl delete`)
with SIGTERM, then SIGKILL after the pod's terminationGracePeriodSeconds. While training runs,
SIGTERM only raises a flag; `StopAtStepEnd` reads it after each optimizer step and, in a gang,
all-reduces it (MAX) over the process group, so every rank stops after the same step even when
only one of them was signalled. The Trainer then saves a checkpoint of that step, the
checkpoint uploader uploads it before training returns, and the pipeline raises `Preempted`:
the trainer exits with EXIT_PREEMPTED and the next attempt resumes from that step.

Outside training (downloads, evaluation, publishing) there is nothing a checkpoint could
keep, so SIGTERM stops the process at once, as before.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from transformers import TrainerCallback


class Preempted(Exception):
    """Training stopped on SIGTERM after `step`, whose checkpoint is uploaded (at `uri`)."""

    def __init__(self, step: int, uri: str | None = None) -> None:
        self.step = step
        self.uri = uri
        where = f" ({uri})" if uri else ""
        super().__init__(
            f"stopped by SIGTERM after step {step}; its checkpoint{where} is saved and the "
            "next attempt resumes from it"
        )


class StopSignal:
    """What SIGTERM does in this process: exit at once (`on_idle`), or, while armed (during
    training), only note the request for the next step's end. Later signals change nothing."""

    def __init__(self, on_idle: Callable[[], None]) -> None:
        self.on_idle = on_idle
        self.armed = False
        self.requested = False

    def handle(self, signum: int, frame: object) -> None:
        if self.requested:
            return  # already stopping (torchrun stops a worker whose peer exited first)
        if not self.armed:
            self.on_idle()
            return
        self.requested = True
        # Not `log`: a handler runs between two bytecodes, maybe inside the logging lock.
        print("SIGTERM: stopping after this optimizer step", flush=True, file=sys.stderr)

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.handle)


_current: StopSignal | None = None


def install(on_idle: Callable[[], None]) -> StopSignal:
    """Make SIGTERM stop the process gracefully (see the module docstring); call once."""
    global _current
    _current = StopSignal(on_idle)
    _current.install()
    return _current


def current_signal() -> StopSignal:
    """The installed StopSignal; a fresh, never-signalled one when none is installed (library
    use, tests calling the pipeline in-process)."""
    return _current if _current is not None else StopSignal(lambda: None)


def agree_to_stop(local: bool) -> bool:
    """True on every rank when any rank wants to stop (one all-reduce of one number per
    optimizer step; `local` itself without a gang)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return local
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class StopAtStepEnd(TrainerCallback):
    """Arms the StopSignal for training; after each optimizer step, when a stop is requested
    on any rank, has the Trainer save a checkpoint of this step and stop. `stopped_at` is that
    step (None: training ran to its end)."""

    def __init__(self, stop: StopSignal | None = None) -> None:
        self.stop = stop or current_signal()
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop.armed = True

    def on_step_end(self, args, state, control, **kwargs):
        if agree_to_stop(self.stop.requested):
            self.stop.requested = True  # a rank told by its peers ignores its own SIGTERM now
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # no epoch-end evaluation within the grace period
            control.should_evaluate = False
            control.should_save = False
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.stopped_at is None:
            self.stop.armed = False  # evaluation and publishing: SIGTERM stops at once again
            if self.stop.requested:
                # Signalled after the last step's end (in the final evaluation): no step is
                # left to stop after, so it stops now, as outside training.
                self.stop.on_idle()
