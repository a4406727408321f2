"""A trainer killed mid-run resumes from its latest complete checkpoint in the output location
and ends at the same total step count as an uninterrupted run."""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kubetune_trainer.checkpoints import COMPLETE_MARKER
from tests.fixtures.tiny_model import trainer_pod_files


class EventStream:
    """The trainer's JSON-lines stdout, read on a thread so waits can have deadlines."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.events: list[dict] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, predicate, timeout: float) -> dict | None:
        """The first new event matching `predicate`; None when the stream ends first."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching event within {timeout}s: {self.events[-3:]}")
            line = self._lines.get(timeout=remaining)
            if line is None:
                return None
            event = json.loads(line)  # stdout holds JSON lines only
            self.events.append(event)
            if predicate(event):
                return event


def _start(env: dict[str, str], stderr_path: Path) -> tuple[subprocess.Popen, EventStream]:
    process = subprocess.Popen(
        [sys.executable, "-m", "kubetune_trainer"],
        stdout=subprocess.PIPE,
        stderr=stderr_path.open("w"),
        text=True,
        env=env,
    )
    return process, EventStream(process)


@pytest.mark.slow
def test_killed_trainer_resumes_with_same_total_steps(tiny_job, tmp_path):
    out = tmp_path / "out"
    manifest = tiny_job(
        out.as_uri(),
        training={"epochs": 3, "checkpointEverySteps": 3, "checkpointsToKeep": 2},
    )
    termination_log, env = trainer_pod_files(manifest, tmp_path)

    first, first_events = _start(env, tmp_path / "first.stderr")
    try:
        started = first_events.wait_for(lambda e: e["event"] == "started", timeout=180)
        checkpoint = first_events.wait_for(
            lambda e: e["event"] == "checkpoint" and e["step"] > 0, timeout=120
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert started is not None and checkpoint is not None
    total_steps = started["totalSteps"]
    assert checkpoint["step"] < total_steps  # killed mid-run

    run = out / "default" / "tiny"
    checkpoints = run / "checkpoints"
    complete = sorted(
        int(p.parent.name.removeprefix("checkpoint-"))
        for p in checkpoints.glob(f"*/{COMPLETE_MARKER}")
    )
    assert complete, list(checkpoints.rglob("*"))
    latest = complete[-1]
    # A later checkpoint whose upload was cut short (no marker, a truncated file) is ignored.
    partial = checkpoints / f"checkpoint-{latest + 1}"
    shutil.copytree(checkpoints / f"checkpoint-{latest}", partial)
    (partial / COMPLETE_MARKER).unlink()
    (partial / "optimizer.pt").write_bytes(b"truncat")

    second, second_events = _start(env, tmp_path / "second.stderr")
    try:
        last = second_events.wait_for(lambda e: e["event"] in ("completed", "failed"), timeout=240)
        assert second_events.wait_for(lambda e: True, timeout=60) is None  # nothing after it
        assert second.wait(timeout=60) == 0, (tmp_path / "second.stderr").read_text()[-3000:]
    finally:
        if second.poll() is None:
            second.kill()

    events = second_events.events
    kinds = [e["event"] for e in events]
    assert "started" not in kinds
    resumed = next(e for e in events if e["event"] == "resumed")
    assert resumed["resumedFromStep"] == latest > 0
    assert resumed["totalSteps"] == total_steps
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == list(range(latest + 1, total_steps + 1))
    assert last["event"] == "completed" and last["step"] == total_steps

    result = json.loads(termination_log.read_text())
    assert result["result"] == "succeeded"
    assert result["resumedFromStep"] == latest and result["totalSteps"] == total_steps
    manifest_doc = json.loads((run / "manifest.json").read_text())
    assert manifest_doc["resumedFromStep"] == latest and manifest_doc["totalSteps"] == total_steps
    kept = sorted(p.parent.name for p in checkpoints.glob(f"*/{COMPLETE_MARKER}"))
    assert len(kept) == 2 and f"checkpoint-{total_steps}" in kept


def _fake_checkpoint(tmp_path, store, prefix, step, fingerprint, complete=True):
    from kubetune_trainer.checkpoints import upload_checkpoint

    local = tmp_path / f"local-{step}"
    local.mkdir()
    (local / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    upload_checkpoint(store, prefix, step, local, fingerprint)
    if not complete:
        store.delete_keys([f"{prefix}checkpoints/checkpoint-{step}/{COMPLETE_MARKER}"])


def test_resume_picks_newest_complete_checkpoint_of_the_same_settings(tmp_path):
    from kubetune_trainer.checkpoints import latest_resumable, list_checkpoints, prune_checkpoints
    from kubetune_trainer.storage import open_store

    store = open_store((tmp_path / "out").as_uri())
    prefix = "ns/job/"
    _fake_checkpoint(tmp_path, store, prefix, 10, "sha256:a")
    _fake_checkpoint(tmp_path, store, prefix, 20, "sha256:a")
    _fake_checkpoint(tmp_path, store, prefix, 30, "sha256:a", complete=False)
    _fake_checkpoint(tmp_path, store, prefix, 40, "sha256:other")
    assert latest_resumable(store, prefix, "sha256:a") == 20
    assert latest_resumable(store, prefix, "sha256:other") == 40
    assert latest_resumable(store, prefix, "sha256:new") is None

    # Keep the 2 newest complete ones; the older complete one and the incomplete one go.
    assert prune_checkpoints(store, prefix, keep=2) == [10, 30]
    left = [(c.step, c.complete) for c in list_checkpoints(store, prefix)]
    assert left == [(20, True), (40, True)]


def test_fingerprint_ignores_reporting_settings_only(tiny_job, tmp_path):
    from kubetune.api.v1alpha1 import FineTuneJob
    from kubetune_trainer.checkpoints import training_fingerprint

    def fingerprint(data_digest="sha256:d", **training):
        manifest = tiny_job((tmp_path / "o").as_uri(), training=training)
        return training_fingerprint(FineTuneJob.model_validate(manifest).spec, data_digest)

    base = fingerprint()
    assert fingerprint(logEverySteps=5, checkpointEverySteps=7, checkpointsToKeep=9) == base
    assert fingerprint(learningRate=0.001) != base
    assert fingerprint(data_digest="sha256:changed") != base
