"""Resumable checkpoints in the output location: `<run>/checkpoints/checkpoint-<step>/`.

The trainer saves a checkpoint on local scratch; `CheckpointUploader` copies the folder to
the artifact store and writes the completeness marker LAST, so a checkpoint whose upload was
cut short (the pod killed mid-copy) is never resumed from. Uploads run in a background
thread, so training does not wait for the network; the queue is bounded (one checkpoint
waiting, one uploading: a slow store slows training down rather than filling the disk), and
the end of training waits for the last upload, so nothing is published before it.
The marker records a fingerprint of everything that decides the training trajectory, so a
changed job never resumes from another configuration's checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune_trainer import distributed
from kubetune_trainer.progress import Reporter, make_event, now_rfc3339
from kubetune_trainer.storage import ArtifactStore

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "_COMPLETE"  # written last: its presence means the upload finished
_STEP_PATTERN = re.compile(r"checkpoint-(\d+)/")

# Settings that change how often things are logged or saved, not what is learned.
_NOT_TRAJECTORY = {"logEverySteps", "evalEverySteps", "checkpointEverySteps", "checkpointsToKeep"}


def training_fingerprint(
    spec: FineTuneJobSpec,
    data_digest: str,
    resolved_revision: str | None = None,
    *,
    world_size: int | None = None,
) -> str:
    """A digest of the model (and the hub commit it resolved to, so a moved branch does not
    resume another model's checkpoint), method, adapter, data and optimisation settings, and
    the gang's shape: `world_size` processes (by default the world torchrun started)."""
    world = distributed.current().world_size if world_size is None else world_size
    parts = spec.model_dump(
        mode="json", include={"model", "method", "lora", "quantization", "dataset", "training"}
    )
    parts["training"] = {k: v for k, v in parts["training"].items() if k not in _NOT_TRAJECTORY}
    parts["dataDigest"] = data_digest
    if spec.objective != "sft":  # what training optimises (sft jobs keep their old digest)
        parts["objective"] = spec.model_dump(
            mode="json", by_alias=True, include={"objective", "preference", "grpo", "rewards"}
        )
    if world > 1:
        # The data order and the optimizer's shards follow the gang's shape: a checkpoint is
        # resumed by the same world size and strategy only (a changed gang starts over).
        parts["gang"] = {"worldSize": world, "strategy": spec.strategy_for(world)}
    if resolved_revision is not None:
        parts["resolvedRevision"] = resolved_revision
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def checkpoints_prefix(run_prefix: str) -> str:
    return f"{run_prefix}{CHECKPOINTS}/"


def checkpoint_prefix(run_prefix: str, step: int) -> str:
    return f"{checkpoints_prefix(run_prefix)}checkpoint-{step}/"


@dataclass(frozen=True)
class RemoteCheckpoint:
    step: int
    complete: bool
    fingerprint: str | None


def list_checkpoints(store: ArtifactStore, run_prefix: str) -> list[RemoteCheckpoint]:
    """Checkpoints under the run, by step; incomplete ones included (complete=False)."""
    base = checkpoints_prefix(run_prefix)
    steps: dict[int, bool] = {}
    for key in store.list_keys(base):
        match = _STEP_PATTERN.match(key[len(base) :])
        if match:
            step = int(match.group(1))
            done = key.endswith(f"/{COMPLETE_MARKER}")
            steps[step] = steps.get(step, False) or done
    found = []
    for step, complete in sorted(steps.items()):
        fingerprint = None
        if complete:
            marker = json.loads(
                store.read_text(checkpoint_prefix(run_prefix, step) + COMPLETE_MARKER)
            )
            fingerprint = marker.get("fingerprint")
        found.append(RemoteCheckpoint(step, complete, fingerprint))
    return found


def latest_resumable(store: ArtifactStore, run_prefix: str, fingerprint: str) -> int | None:
    """The step of the newest complete checkpoint made with the same settings, if any."""
    usable = [
        c.step
        for c in list_checkpoints(store, run_prefix)
        if c.complete and c.fingerprint == fingerprint
    ]
    return max(usable) if usable else None


def download_checkpoint(store: ArtifactStore, run_prefix: str, step: int, local_root: Path) -> Path:
    """Copy checkpoint `step` into `local_root/checkpoint-<step>` (replacing what is there)."""
    local = Path(local_root) / f"checkpoint-{step}"
    shutil.rmtree(local, ignore_errors=True)
    store.get_dir(checkpoint_prefix(run_prefix, step), local)
    (local / COMPLETE_MARKER).unlink(missing_ok=True)
    return local


def upload_checkpoint(
    store: ArtifactStore, run_prefix: str, step: int, local_dir: Path, fingerprint: str
) -> None:
    prefix = checkpoint_prefix(run_prefix, step)
    store.delete_prefix(prefix)  # leftovers of an earlier, interrupted upload of this step
    store.put_dir(local_dir, prefix)
    marker = {"step": step, "fingerprint": fingerprint, "time": now_rfc3339()}
    store.write_text(prefix + COMPLETE_MARKER, json.dumps(marker))


def prune_checkpoints(store: ArtifactStore, run_prefix: str, keep: int) -> list[int]:
    """Keep the `keep` newest complete checkpoints; delete older ones and any incomplete
    checkpoint older than the newest complete one. Returns the deleted steps."""
    checkpoints = list_checkpoints(store, run_prefix)
    complete = [c.step for c in checkpoints if c.complete]
    if not complete:
        return []
    kept = set(complete[-keep:])
    newest = complete[-1]
    deleted = [c.step for c in checkpoints if c.step not in kept and c.step < newest]
    for step in deleted:
        # The marker goes first, so a half-deleted checkpoint is never taken for complete.
        prefix = checkpoint_prefix(run_prefix, step)
        store.delete_keys([prefix + COMPLETE_MARKER])
        store.delete_prefix(prefix)
    return deleted


def snapshot_dir(source: Path, target: Path) -> Path:
    """A copy of `source` that outlives the trainer's rotation of its local checkpoints:
    hard links where the file system allows (no bytes copied), else a copy."""
    shutil.rmtree(target, ignore_errors=True)
    try:
        shutil.copytree(source, target, copy_function=os.link)
    except OSError:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
    return target


class CheckpointUploader(TrainerCallback):
    """After each local save: queue the checkpoint; a background thread uploads it, marks it
    complete, prunes old ones and reports `checkpoint`. The end of training waits for the
    queue; an upload error fails training there (or at the next save)."""

    _STOP = None

    def __init__(
        self,
        store: ArtifactStore,
        run_prefix: str,
        *,
        keep: int,
        fingerprint: str,
        reporter: Reporter,
        queue_size: int = 1,
        is_main: bool | None = None,
    ) -> None:
        self.store = store
        self.run_prefix = run_prefix
        self.keep = keep
        self.fingerprint = fingerprint
        self.reporter = reporter
        # In a gang, rank 0 alone uploads: the checkpoint folder on its node is complete
        # (DDP and FSDP's full state dict are written by rank 0).
        self.is_main = distributed.current().is_main if is_main is None else is_main
        self._queue: queue.Queue[tuple[int, int, Path] | None] = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
            self._thread.start()

    def _raise_upload_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"checkpoint upload failed: {self._error}") from self._error

    def on_save(self, args, state, control, **kwargs):
        # Every rank has written its part (its RNG state) before rank 0 snapshots the folder.
        distributed.barrier()
        if not self.is_main:
            return
        self._raise_upload_error()
        step = state.global_step
        local = Path(args.output_dir) / f"checkpoint-{step}"
        if not local.is_dir():
            log.warning("checkpoint %s not found locally; not uploaded", local)
            return
        snapshot = snapshot_dir(local, Path(args.output_dir) / "upload-queue" / local.name)
        self._start()
        self._queue.put((step, state.max_steps, snapshot))  # blocks while the queue is full

    def on_train_end(self, args, state, control, **kwargs):
        self.wait()

    def wait(self) -> None:
        """Block until every queued checkpoint is uploaded; raise the first upload error."""
        if self._thread is not None:
            self._queue.put(self._STOP)
            self._thread.join()
            self._thread = None
        self._raise_upload_error()

    def _run(self) -> None:
        while (item := self._queue.get()) is not self._STOP:
            step, total, snapshot = item
            try:
                if self._error is None:
                    self._upload(step, total, snapshot)
            except Exception as error:  # noqa: BLE001 - surfaced by wait() / the next save
                self._error = error
            finally:
                shutil.rmtree(snapshot, ignore_errors=True)

    def _upload(self, step: int, total: int, snapshot: Path) -> None:
        upload_checkpoint(self.store, self.run_prefix, step, snapshot, self.fingerprint)
        prune_checkpoints(self.store, self.run_prefix, self.keep)
        self.reporter.emit(
            make_event(
                "checkpoint",
                step=step,
                totalSteps=total,
                message=self.store.uri_for(checkpoint_prefix(self.run_prefix, step)),
            )
        )
