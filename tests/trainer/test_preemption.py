"""SIGTERM during training: the trainer finishes its optimizer step, uploads a checkpoint of
it to S3 and exits with EXIT_PREEMPTED; the next run resumes at that step and reproduces the
uninterrupted run's losses. A 2-rank gang stops every rank after the same step even when only
one rank is signalled; the gang's launcher passes the kubelet's SIGTERM to every worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from kubetune.api.contract import EXIT_PREEMPTED
from kubetune_trainer import distributed
from kubetune_trainer.checkpoints import COMPLETE_MARKER
from kubetune_trainer.preemption import StopAtStepEnd, StopSignal
from tests.fixtures.tiny_model import trainer_pod_files
from tests.trainer.test_resume import EventStream

STEPS = 12
# One loss per step, no dropout (the tiny Llama has none; LoRA's is set to 0).
TRAINING = {"maxSteps": STEPS, "logEverySteps": 1, "checkpointEverySteps": 1000}
LORA = {"r": 8, "dropout": 0.0}


def _step_losses(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events if e["event"] == "step" and "loss" in e}


def _checkpoints(s3, bucket: str, run: str) -> dict[int, bool]:
    """Step -> complete, of the checkpoints under `run` in the bucket."""
    found: dict[int, bool] = {}
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"{run}checkpoints/")
    for item in listing.get("Contents", []):
        folder, name = item["Key"][len(run) + len("checkpoints/") :].split("/", 1)
        step = int(folder.removeprefix("checkpoint-"))
        found[step] = found.get(step, False) or name == COMPLETE_MARKER
    return found


def _pod_dir(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    return folder


def _run(env: dict[str, str], stderr: Path, *, stop_at: int | None = None, signal_pid=None):
    """The trainer (or a gang's launcher) as a pod runs it; with `stop_at`, SIGTERM goes to
    `signal_pid(process)` (default: the process itself) once step `stop_at` is reported.
    Returns (exit code, events, the step event seen when the signal was sent)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "kubetune_trainer"],
        stdout=subprocess.PIPE,
        stderr=stderr.open("w"),
        text=True,
        env=env,
    )
    events = EventStream(process)
    seen = None
    try:
        if stop_at is not None:
            seen = events.wait_for(lambda e: e["event"] == "step" and e["step"] >= stop_at, 600)
            assert seen is not None, stderr.read_text()[-3000:]
            os.kill(signal_pid(process) if signal_pid else process.pid, signal.SIGTERM)
        while events.wait_for(lambda e: True, timeout=600) is not None:
            pass
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
    return code, events.events, seen


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_the_resumed_run_matches(
    tiny_job, tmp_path, s3_env, s3_server
):
    bucket, s3 = s3_env, s3_server.client()
    reference_manifest = tiny_job(f"s3://{bucket}/ref/", training=TRAINING, lora=LORA)
    _, env = trainer_pod_files(reference_manifest, _pod_dir(tmp_path, "reference"))
    code, reference_events, _ = _run(env, tmp_path / "reference.stderr")
    assert code == 0, (tmp_path / "reference.stderr").read_text()[-3000:]
    reference = _step_losses(reference_events)
    assert sorted(reference) == list(range(1, STEPS + 1))

    manifest = tiny_job(f"s3://{bucket}/runs/", training=TRAINING, lora=LORA)
    termination_log, env = trainer_pod_files(manifest, _pod_dir(tmp_path, "pod"))
    code, first, seen = _run(env, tmp_path / "first.stderr", stop_at=2)
    assert code == EXIT_PREEMPTED, (tmp_path / "first.stderr").read_text()[-3000:]
    steps = _step_losses(first)
    stopped = max(steps)
    # It stopped after the step under way (on a loaded machine the signal may land a step or
    # two after the event it answers), long before the end, and trained no step after it.
    assert seen["step"] <= stopped < STEPS
    assert sorted(steps) == list(range(1, stopped + 1))
    message = termination_log.read_text()
    assert message.startswith(f"Preempted: stopped by SIGTERM after step {stopped};"), message
    # Its checkpoint is in S3, complete, and the only one (the periodic interval is 1000).
    run = "runs/default/tiny/"
    assert _checkpoints(s3, bucket, run) == {stopped: True}

    code, second, _ = _run(env, tmp_path / "second.stderr")
    assert code == 0, (tmp_path / "second.stderr").read_text()[-3000:]
    resumed = next(e for e in second if e["event"] == "resumed")
    assert resumed["resumedFromStep"] == stopped
    after = _step_losses(second)
    assert sorted(after) == list(range(stopped + 1, STEPS + 1))
    # Dropout 0 and the restored RNG and data order: the very same losses.
    assert {**steps, **after} == reference
    assert json.loads(termination_log.read_text())["resumedFromStep"] == stopped


def _gang_env(tiny_job, tmp_path: Path, bucket: str, name: str) -> dict[str, str]:
    manifest = tiny_job(
        f"s3://{bucket}/runs/",
        name=name,
        training={**TRAINING, "maxSteps": 200, "batchSize": 2},
        lora=LORA,
        resources={"gpus": 0, "nodes": 2},
    )
    _, env = trainer_pod_files(manifest, tmp_path)
    # A one-pod gang of two processes (torchrun's PET_* environment, as the operator sets it):
    # the pod's launcher starts torchrun.
    env.update(distributed.local_gang_env(2, environ={}))
    return env


def _a_worker(launcher: subprocess.Popen) -> int:
    """The pid of one worker, likely rank 1 (the later of torchrun's two children)."""
    torchrun = psutil.Process(launcher.pid).children()[0]
    return max(p.pid for p in torchrun.children())


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_gang_with_one_rank_given_sigterm_stops_every_rank_after_the_same_step(
    tiny_job, tmp_path, s3_env, s3_server
):
    """One run through the pod's launcher (torchrun under it): only one rank gets SIGTERM,
    both stop after the same step (the all-reduced flag), rank 0 uploads that step, and the
    launcher exits 5. How the launcher passes the kubelet's SIGTERM on: the test below."""
    bucket, s3 = s3_env, s3_server.client()
    env = _gang_env(tiny_job, tmp_path, bucket, name="gang")
    code, events, seen = _run(env, tmp_path / "gang.stderr", stop_at=2, signal_pid=_a_worker)
    log = (tmp_path / "gang.stderr").read_text()
    assert code == EXIT_PREEMPTED, log[-3000:]
    stopped = max(_step_losses(events))
    assert seen["step"] <= stopped < 200
    # Both ranks stopped after the same step (each says so), and rank 0 uploaded it.
    assert log.count(f"Preempted: stopped by SIGTERM after step {stopped};") == 2, log[-3000:]
    assert _checkpoints(s3, bucket, "runs/default/gang/") == {stopped: True}


# torchrun's stand-in: a parent that exits with its child's code; the child exits 7 on SIGTERM.
_CHILD = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)
_PARENT = (
    "import subprocess, sys\n"
    f"child = subprocess.Popen([sys.executable, '-c', {_CHILD!r}])\n"
    "sys.exit(child.wait())\n"
)


def test_the_launcher_passes_sigterm_to_the_workers_not_to_torchrun():
    """torchrun's agent, given SIGTERM, would SIGKILL its workers 30 s later: the launcher
    signals the workers only, and torchrun ends on their exit codes."""
    torchrun = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert torchrun.stdout.readline().strip() == "ready"
        distributed.stop_workers(torchrun.pid, signal.SIGTERM)
        assert torchrun.wait(timeout=60) == 7  # the parent itself was not signalled
    finally:
        if torchrun.poll() is None:
            for child in psutil.Process(torchrun.pid).children(recursive=True):
                child.kill()
            torchrun.kill()


def test_a_stop_is_agreed_after_the_step_and_only_while_armed():
    """The decision without a gang: SIGTERM before training calls the idle action; during
    training it only asks the Trainer to save and stop after the current step."""
    idle: list[bool] = []
    stop = StopSignal(lambda: idle.append(True))
    stop.handle(signal.SIGTERM, None)
    assert idle == [True] and not stop.requested

    from transformers import TrainerControl, TrainerState

    callback = StopAtStepEnd(stop)
    state, control = TrainerState(global_step=7, max_steps=20), TrainerControl()
    callback.on_train_begin(None, state, control)
    callback.on_step_end(None, state, control)
    assert not control.should_save and callback.stopped_at is None
    stop.handle(signal.SIGTERM, None)
    stop.handle(signal.SIGTERM, None)  # repeated: still one stop, no idle exit
    assert idle == [True] and stop.requested
    callback.on_step_end(None, state, control)
    assert control.should_save and control.should_training_stop and callback.stopped_at == 7

    # Signalled after the last step's end (the final evaluation): it stops at once.
    late = StopSignal(lambda: idle.append(True))
    callback = StopAtStepEnd(late)
    callback.on_train_begin(None, state, TrainerControl())
    late.handle(signal.SIGTERM, None)
    callback.on_train_end(None, state, TrainerControl())
    assert idle == [True, True] and not late.armed
