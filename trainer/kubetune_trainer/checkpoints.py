"""Resumable checkpoints in the output location: `<run>/checkpoints/checkpoint-<step>/`.

The trainer saves a checkpoint on local scratch; `CheckpointUploader` copies the folder to
the artifact store and writes the completeness marker LAST, so a checkpoint whose upload was
cut short (the pod killed mid-copy) is never resumed from. The marker records a fingerprint
of everything that decides the training trajectory, so a changed job never resumes from
another configuration's checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune_trainer.progress import Reporter, make_event, now_rfc3339
from kubetune_trainer.storage import ArtifactStore

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "_COMPLETE"  # written last: its presence means the upload finished
_STEP_PATTERN = re.compile(r"checkpoint-(\d+)/")

# Settings that change how often things are logged or saved, not what is learned.
_NOT_TRAJECTORY = {"logEverySteps", "evalEverySteps", "checkpointEverySteps", "checkpointsToKeep"}


def training_fingerprint(spec: FineTuneJobSpec, data_digest: str) -> str:
    """A digest of the model, method, adapter, data and optimisation settings."""
    parts = spec.model_dump(
        mode="json", include={"model", "method", "lora", "quantization", "dataset", "training"}
    )
    parts["training"] = {k: v for k, v in parts["training"].items() if k not in _NOT_TRAJECTORY}
    parts["dataDigest"] = data_digest
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


class CheckpointUploader(TrainerCallback):
    """After each local save: upload, mark complete, prune, then report `checkpoint`."""

    def __init__(
        self,
        store: ArtifactStore,
        run_prefix: str,
        *,
        keep: int,
        fingerprint: str,
        reporter: Reporter,
    ) -> None:
        self.store = store
        self.run_prefix = run_prefix
        self.keep = keep
        self.fingerprint = fingerprint
        self.reporter = reporter

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        local = Path(args.output_dir) / f"checkpoint-{step}"
        if not local.is_dir():
            log.warning("checkpoint %s not found locally; not uploaded", local)
            return
        upload_checkpoint(self.store, self.run_prefix, step, local, self.fingerprint)
        prune_checkpoints(self.store, self.run_prefix, self.keep)
        self.reporter.emit(
            make_event(
                "checkpoint",
                step=step,
                totalSteps=state.max_steps,
                message=self.store.uri_for(checkpoint_prefix(self.run_prefix, step)),
            )
        )
