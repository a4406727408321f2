"""Publishing a finished run to `<output.uri>/<namespace>/<name>/`.

Layout: `adapter/` (lora, qlora) or `model/` (full) with the tokenizer alongside,
`merged-model/` when spec.output.mergeAdapter (or gguf), `gguf/` when spec.output.gguf
(kubetune_trainer.gguf), `metrics.json`, `loss_curve.png`, the evaluation files, and
`manifest.json` LAST: the manifest lists every file with its sha256, so its presence means
the run completed and everything it names is in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune_trainer.data import TrainingData
from kubetune_trainer.evaluate.report import plot_loss_curves
from kubetune_trainer.storage import ArtifactStore

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
METRICS = "metrics.json"
LOSS_CURVE = "loss_curve.png"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
MERGED_DIR = "merged-model"
SERVE_DIR = "serve"  # serving manifests: serve/ for the adapter (or model), serve/merged/
LIBRARIES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate")


def run_prefix(namespace: str, name: str) -> str:
    """Key prefix of a job's artifacts inside the output location."""
    return f"{namespace}/{name}/"


def remove_stale_manifest(store: ArtifactStore, prefix: str) -> None:
    """Delete an earlier run's manifest before training, so that "manifest.json exists"
    always means "the latest run completed"."""
    key = prefix + MANIFEST
    if store.exists(key):
        store.delete_keys([key])


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in (*LIBRARIES, "kubetune"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entries(staging: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> {sha256, size} of every file under `staging`, sorted."""
    entries = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        entries[path.relative_to(staging).as_posix()] = {
            "sha256": sha256_file(path),
            "size": path.stat().st_size,
        }
    return entries


@dataclass(frozen=True)
class BaseModelRef:
    """How artifacts name the base model: hub id or URI, and the resolved hub commit."""

    name: str
    revision: str | None = None


def save_model_files(
    model: Any,
    tokenizer: Any,
    *,
    is_adapter: bool,
    staging: Path,
    base: BaseModelRef | None = None,
    dtype: Any = None,
    initial_adapter: Path | None = None,
) -> str:
    """Save the adapter (or full model) and tokenizer under `staging`; returns the folder name.

    An adapter's config names `base` (hub id or URI, and the commit), not the pod-local path
    the base was loaded from, so `PeftModel.from_pretrained` finds it anywhere. A full model
    is cast to `dtype` (`topology.published_dtype`) first, in place: training is over, and
    the fp32 master weights would double the published size.
    `initial_adapter` (PiSSA/OLoRA, which trained on a residual base): the adapter is saved as
    its difference from that initial adapter, a standard LoRA adapter of twice the rank on
    the original base (peft's conversion).
    """
    folder = ADAPTER_DIR if is_adapter else MODEL_DIR
    target = staging / folder
    if dtype is not None and not is_adapter:
        model.to(dtype)
    if initial_adapter is not None:
        model.save_pretrained(target, path_initial_model_for_weight_conversion=str(initial_adapter))
    else:
        model.save_pretrained(target)  # safetensors by default
    tokenizer.save_pretrained(target)
    if is_adapter and base is not None:
        name_adapter_base(target / "adapter_config.json", base)
    return folder


def name_adapter_base(config_path: Path, base: BaseModelRef) -> None:
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base.name
    config["revision"] = base.revision
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def save_merged_model(
    base_model_path: Path,
    adapter_dir: Path,
    tokenizer: Any,
    target: Path,
    dtype: Any,
    device_map: dict[str, Any] | None = None,
    published_dtype: Any = None,
) -> Any:
    """The base model (reloaded unquantised) with the adapter merged into its weights.

    With `device_map` (a GPU) the base loads straight into GPU memory and the merge runs
    there; on CPU transformers loads shard by shard into the final tensors, so host memory
    holds one copy of the merged model (2 bytes per parameter in bf16), not two.
    Returns the merged model (to measure what is published; the caller drops it).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # Loaded in the dtype it is published in, so the merged model in memory is the published
    # one (casting a loaded model would also cast its fp32 rotary buffers).
    kwargs: dict[str, Any] = {"dtype": published_dtype or dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    base = AutoModelForCausalLM.from_pretrained(base_model_path, **kwargs)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return merged.eval()


def write_serving_files(
    job: FineTuneJob, namespace: str, uris: dict[str, str], staging: Path
) -> None:
    """KServe manifests and the `vllm serve` line for the published model (and the merged
    one) under `staging`/serve/, as `kubetune serve` prints them. What could not be written
    (e.g. KServe manifests for a file:// base model, which KServe cannot fetch) is said, with
    the reason, in serve/SKIPPED.txt."""
    from kubetune import serving

    spec = job.spec.model_dump(mode="json", exclude_none=True)
    variants = [(SERVE_DIR, False)]
    if "mergedModel" in uris:
        variants.append((f"{SERVE_DIR}/merged", True))
    skipped = []
    for folder, merged in variants:
        model = serving.model_to_serve(job.metadata.name, namespace, spec, uris, merged=merged)
        files, missing = serving.serving_files(model)
        (staging / folder).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (staging / folder / name).write_text(text)
        skipped += [f"{folder}/: {note}" for note in missing]
    if skipped:
        (staging / SERVE_DIR / "SKIPPED.txt").write_text("\n".join(skipped) + "\n")


@dataclass
class RunSummary:
    """Everything publish needs to know about the run, besides the files themselves."""

    job: FineTuneJob
    namespace: str
    data: TrainingData
    metrics: dict[str, Any]  # headline metrics (keys of kubetune.api.v1alpha1.Metrics)
    log_history: list[dict[str, Any]]
    total_steps: int
    resumed_from_step: int | None
    duration_seconds: float
    train_seconds: float
    first_loss: float | None
    mean_train_loss: float | None
    eval_passed: bool | None = None
    eval_missed: list[str] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)  # role -> relative folder/file
    resolved_revision: str | None = None  # hub commit of a hf:// base model
    lengths: dict[str, Any] = field(default_factory=dict)  # split -> LengthReport.document()
    notes: list[str] = field(default_factory=list)  # how the run deviated from the spec, why
    topology: dict[str, Any] = field(default_factory=dict)  # topology.run_topology
    adapter: dict[str, Any] = field(default_factory=dict)  # what a LoRA adapter covers


def metrics_document(summary: RunSummary) -> dict[str, Any]:
    return {
        "metrics": summary.metrics,
        "firstTrainLoss": summary.first_loss,
        "meanTrainLoss": summary.mean_train_loss,
        "totalSteps": summary.total_steps,
        "resumedFromStep": summary.resumed_from_step,
        "trainSeconds": round(summary.train_seconds, 3),
        "durationSeconds": round(summary.duration_seconds, 3),
        "logHistory": summary.log_history,
    }


def manifest_document(summary: RunSummary, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec = summary.job.spec
    data = summary.data
    return {
        "job": {"name": summary.job.metadata.name, "namespace": summary.namespace},
        "createdAt": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "method": spec.method,
        "baseModel": {
            "uri": spec.model.uri,
            "revision": spec.model.revision,
            "resolvedRevision": summary.resolved_revision,
        },
        "dataset": {
            "uri": spec.dataset.uri,
            "format": data.format,
            "promptTemplate": data.prompt_template,
            "maxSeqLength": spec.training.maxSeqLength,
            **summary.lengths.get("train", {}),
            "validationLengths": summary.lengths.get("validation"),
            "digest": data.digest,
            "trainRows": data.train_rows,
            "validationRows": data.validation_rows,
            "validationSource": data.validation_source,
            "validationDigest": data.validation_digest,
        },
        "config": spec.model_dump(mode="json", by_alias=True),
        "topology": summary.topology,
        "adapter": summary.adapter or None,
        "libraries": library_versions(),
        "durationSeconds": round(summary.duration_seconds, 3),
        "tokensTrained": summary.metrics.get("tokensTrained"),
        "totalSteps": summary.total_steps,
        "resumedFromStep": summary.resumed_from_step,
        "metrics": summary.metrics,
        "evalPassed": summary.eval_passed,
        "evalMissed": summary.eval_missed,
        "notes": summary.notes,
        "artifacts": summary.artifacts,
        "files": files,
    }


def write_run_documents(summary: RunSummary, staging: Path) -> None:
    """metrics.json and loss_curve.png into `staging`."""
    (staging / METRICS).write_text(json.dumps(metrics_document(summary), indent=2))
    plot_loss_curves(summary.log_history, staging / LOSS_CURVE)


def upload_run(
    store: ArtifactStore, prefix: str, staging: Path, summary: RunSummary
) -> dict[str, Any]:
    """Upload everything under `staging`, then the manifest (last). Returns the manifest."""
    files = file_entries(staging)
    for relative in files:
        store.put_file(staging / relative, prefix + relative)
    manifest = manifest_document(summary, files)
    store.write_text(prefix + MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
