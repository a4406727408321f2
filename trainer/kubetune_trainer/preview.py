"""What a job would train on, without training: the trainer's own model-source and dataset
stages (`pipeline.load_data`, the same code and the same BadInputError messages), then the
first rows as tokenised with the tokens that carry loss marked, and totals.

No model weights are loaded and no GPU is needed: the tokenizer and the data decide what is
trained; the parameter count is read from the safetensors headers.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.contract import TrainerResult
from kubetune.api.sizing import memory_estimate_gib
from kubetune.api.v1alpha1 import PREVIEW_ROWS_NAMED, FineTuneJob, PreviewStatus
from kubetune_trainer.model_source import resolve_model
from kubetune_trainer.tokens import IGNORE_INDEX, ROWS_NAMED

DEFAULT_ROWS = 3


@dataclass
class Segment:
    text: str
    trained: bool


@dataclass
class PreviewRow:
    ref: str  # "<file>: row <n>"
    tokens: int
    trained_tokens: int
    segments: list[Segment]


@dataclass
class Totals:
    train_rows: int
    validation_rows: int
    tokens: int  # training split, after maxSeqLength
    trained_tokens: int  # of which carry loss
    truncated_rows: int
    excluded_rows: int
    excluded_examples: list[str]
    packing: bool
    sequences: int  # what one epoch feeds the model: packed rows, or rows
    packing_efficiency: float | None  # real tokens / slot tokens of the packed rows
    steps_per_epoch: int
    parameters: int | None  # of the base model, from its safetensors headers
    format: str
    memory_estimate_gib_per_gpu: float | None  # as the operator estimates it; None on CPU


@dataclass
class Preview:
    job: str
    rows: list[PreviewRow]
    totals: Totals
    notes: list[str] = field(default_factory=list)

    def document(self) -> dict[str, Any]:
        return asdict(self)


def segments(tokenizer: Any, ids: list[int], labels: list[int]) -> list[Segment]:
    """Runs of tokens that do or do not carry loss, as text; the texts concatenate to
    `tokenizer.decode(ids)` (each run is the decoded text it adds, so a character split over
    two tokens is never lost)."""
    runs: list[tuple[int, int, bool]] = []
    for position, label in enumerate(labels):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][2] == trained:
            runs[-1] = (runs[-1][0], position + 1, trained)
        else:
            runs.append((position, position + 1, trained))
    whole = tokenizer.decode(ids)
    found, consumed = [], 0
    for number, (_, end, trained) in enumerate(runs):
        upto = len(whole) if number == len(runs) - 1 else len(tokenizer.decode(ids[:end]))
        upto = max(consumed, min(upto, len(whole)))
        found.append(Segment(whole[consumed:upto], trained))
        consumed = upto
    return [segment for segment in found if segment.text]


def safetensors_parameters(model_path: Path) -> int | None:
    """Parameter count from the safetensors headers (no weights read); None without them."""
    total, seen = 0, False
    for path in sorted(Path(model_path).glob("*.safetensors")):
        with path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                total += math.prod(entry["shape"])
                seen = True
    return total if seen else None


def pack_count(lengths: list[int], max_length: int) -> int:
    """Rows TRL's best-fit-decreasing packing makes of sequences of these lengths."""
    import datasets
    from trl.data_utils import pack_dataset

    if not lengths:
        return 0
    data = datasets.Dataset.from_dict({"input_ids": [[0] * n for n in lengths]})
    return len(pack_dataset(data, max_length, strategy="bfd"))


def steps_per_epoch(sequences: int, spec: Any) -> int:
    training = spec.training
    batches = math.ceil(sequences / (training.batchSize * max(spec.world_size, 1)))
    return math.ceil(batches / training.gradientAccumulationSteps)


def preview_job(job: FineTuneJob, work_dir: Path, *, rows: int = DEFAULT_ROWS) -> Preview:
    """The data stage of `job` and what it would train on; BadInputError as the real run."""
    from kubetune_trainer.pipeline import load_data

    spec = job.spec
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(spec.model, work / "models")
    tokenizer, data, tokenized, _ = load_data(job, model_path, work)
    train = tokenized.train
    lengths = [len(ids) for ids in train["input_ids"]]
    trained = sum(sum(1 for t in labels if t != IGNORE_INDEX) for labels in train["labels"])
    shown = []
    for index in range(min(rows, len(train))):
        row = train[index]
        ids, labels = list(row["input_ids"]), list(row["labels"])
        ref = data.train_refs[index] if index < len(data.train_refs) else f"row {index + 1}"
        shown.append(
            PreviewRow(
                ref=ref,
                tokens=len(ids),
                trained_tokens=sum(1 for t in labels if t != IGNORE_INDEX),
                segments=segments(tokenizer, ids, labels),
            )
        )
    max_length = spec.training.maxSeqLength
    packing = bool(spec.training.packing)
    sequences = pack_count(lengths, max_length) if packing else len(lengths)
    report = tokenized.train_lengths
    parameters = safetensors_parameters(model_path)
    notes = []
    if packing:
        notes.append(
            "packing as configured; the model build may turn it off for models without "
            "per-example attention (the run's status says so)"
        )
    totals = Totals(
        train_rows=data.train_rows,
        validation_rows=data.validation_rows,
        tokens=sum(lengths),
        trained_tokens=trained,
        truncated_rows=report.truncated,
        excluded_rows=len(report.excluded),
        excluded_examples=report.excluded[:ROWS_NAMED],
        packing=packing,
        sequences=sequences,
        packing_efficiency=(
            round(sum(lengths) / (sequences * max_length), 4) if packing and sequences else None
        ),
        steps_per_epoch=steps_per_epoch(sequences, spec),
        parameters=parameters,
        format=data.format if data.prompt_template is None else f"alpaca ({data.prompt_template})",
        memory_estimate_gib_per_gpu=memory_estimate_gib(spec, parameters),
    )
    return Preview(job=job.metadata.name or "", rows=shown, totals=totals, notes=notes)


# Where a dry run puts the preview document, under the run's prefix of the output location.
PREVIEW_DOCUMENT = "preview.json"


def preview_status(preview: Preview, uri: str) -> PreviewStatus:
    """The totals a dry run reports in status.preview (the document at `uri` has the rest)."""
    totals = preview.totals
    return PreviewStatus(
        uri=uri,
        format=totals.format,
        trainRows=totals.train_rows,
        validationRows=totals.validation_rows,
        tokens=totals.tokens,
        trainedTokens=totals.trained_tokens,
        truncatedRows=totals.truncated_rows,
        excludedRows=totals.excluded_rows,
        excludedExamples=[ref[:256] for ref in totals.excluded_examples[:PREVIEW_ROWS_NAMED]],
        packing=totals.packing,
        sequences=totals.sequences,
        packingEfficiency=totals.packing_efficiency,
        stepsPerEpoch=totals.steps_per_epoch,
        parameters=totals.parameters,
        memoryEstimateGiBPerGpu=totals.memory_estimate_gib_per_gpu,
    )


def dry_run(job: FineTuneJob, reporter: Any, work_dir: Path, namespace: str) -> TrainerResult:
    """spec.dryRun in the trainer pod: the output location checked, the preview computed as
    `kubetune preview` computes it, its document (what `kubetune preview --json` prints)
    written to <output>/<namespace>/<name>/preview.json. Nothing is trained or published (no
    manifest.json: the run did not train). BadInputError for what the real run would refuse."""
    from kubetune_trainer.pipeline import stage
    from kubetune_trainer.publish import run_prefix
    from kubetune_trainer.storage import open_store

    with stage(reporter, "model-download"):
        store = open_store(job.spec.output.uri)
        store.check_access()
    with stage(reporter, "preview"):
        preview = preview_job(job, work_dir)
    key = run_prefix(namespace, job.metadata.name) + PREVIEW_DOCUMENT
    text = json.dumps(preview.document(), ensure_ascii=False, indent=2)
    with stage(reporter, "publish"):
        store.write_text(key, text)
    uri = store.uri_for(key)
    return TrainerResult(result="succeeded", preview=preview_status(preview, uri), message=uri)
