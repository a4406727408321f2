"""The trainer's pipeline: model source -> dataset -> model build -> train -> evaluate -> publish.

Everything that can be wrong with the input (output location, model, data, settings) is
checked before training starts, so bad input fails in seconds with a `BadInputError`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.contract import TrainerResult
from kubetune.api.v1alpha1 import Artifacts, FineTuneJob, Metrics
from kubetune_trainer import publish
from kubetune_trainer.checkpoints import (
    CheckpointUploader,
    download_checkpoint,
    latest_resumable,
    training_fingerprint,
)
from kubetune_trainer.data import ensure_chat_template, load_eval_rows, load_training_data
from kubetune_trainer.evaluate import EvalInputs, EvalOutcome, evaluate_after_training
from kubetune_trainer.model_source import resolve_model
from kubetune_trainer.modeling import Hardware, build_model
from kubetune_trainer.progress import ProgressCallback, Reporter, make_event
from kubetune_trainer.storage import ArtifactStore, open_store
from kubetune_trainer.train import TrainOutcome, perplexity, train_model

log = logging.getLogger(__name__)

# TrainingData.format -> the row shape the evaluation stage receives.
EVAL_FORMATS = {"alpaca": "prompt-completion", "prompt-completion": "prompt-completion"}


class EvaluationGateError(Exception):
    """Thresholds missed with spec.evaluation.failOnThresholds (artifacts are published)."""


@dataclass
class RunOptions:
    work_dir: Path  # scratch: caches, local checkpoints, staging
    namespace: str  # <output>/<namespace>/<name>/
    hardware: Hardware | None = None  # detected when None


@contextlib.contextmanager
def stage(reporter: Reporter, name: str) -> Iterator[None]:
    reporter.emit(make_event("stage", stage=name))
    started = time.monotonic()
    yield
    log.info("stage %s took %.1fs", name, time.monotonic() - started)


def eval_rows_for(job: FineTuneJob, validation: Any, cache_dir: Path) -> list[dict]:
    """The evaluation data: spec.evaluation.datasetUri, else the validation split."""
    evaluation = job.spec.evaluation
    if evaluation.datasetUri:
        return load_eval_rows(
            evaluation.datasetUri, cache_dir=cache_dir, revision=job.spec.dataset.revision
        )
    return validation.to_list() if validation is not None else []


def headline_metrics(
    outcome: TrainOutcome, evaluation: EvalOutcome | None, duration: float
) -> dict[str, Any]:
    """Keys of `Metrics`: training numbers, overridden by the evaluation stage's where set."""
    metrics: dict[str, Any] = {
        "trainLoss": outcome.train_loss,
        "evalLoss": outcome.eval_loss,
        "perplexity": perplexity(outcome.eval_loss),
        "tokensTrained": outcome.tokens_trained,
        "trainSamples": outcome.train_samples,
        "durationSeconds": round(duration, 3),
    }
    if evaluation is not None:
        for key, value in evaluation.metrics.items():
            if key in Metrics.model_fields and value is not None:
                metrics[key] = value
        if evaluation.passed is not None:
            metrics["evalPassed"] = evaluation.passed
    return {k: v for k, v in metrics.items() if v is not None}


def stage_eval_files(evaluation: EvalOutcome | None, out_dir: Path, staging: Path) -> list[str]:
    """Copy the evaluation stage's files into the staging folder; returns their keys."""
    if evaluation is None:
        return []
    keys = []
    for path in evaluation.files:
        path = Path(path)
        relative = path.relative_to(out_dir) if path.is_relative_to(out_dir) else Path(path.name)
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        keys.append(relative.as_posix())
    return keys


def run_pipeline(job: FineTuneJob, reporter: Reporter, options: RunOptions) -> TrainerResult:
    """Run the whole job; returns the TrainerResult (raises on failure, BadInputError first)."""
    started = time.monotonic()
    spec = job.spec
    work = Path(options.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    prefix = publish.run_prefix(options.namespace, job.metadata.name)

    with stage(reporter, "model-download"):
        store: ArtifactStore = open_store(spec.output.uri)
        store.check_access()  # a wrong bucket or key must fail now, not after hours of training
        model_path = resolve_model(spec.model, work / "models")

    with stage(reporter, "dataset"):
        data = load_training_data(spec.dataset, seed=spec.training.seed, cache_dir=work / "data")
        eval_rows = (
            eval_rows_for(job, data.validation, work / "data") if spec.evaluation.enabled else []
        )

    with stage(reporter, "model-build"):
        built = build_model(spec, model_path, hardware=options.hardware)
        for note in built.notes:
            log.info("%s", note)
        if data.format == "chat":
            ensure_chat_template(built.tokenizer, spec.dataset.chatTemplate, spec.model.uri)

    # Input is good: from here on, a failure is worth retrying and resuming.
    publish.remove_stale_manifest(store, prefix)
    fingerprint = training_fingerprint(spec, data.digest)
    resume_step = latest_resumable(store, prefix, fingerprint)
    resume_dir = None
    if resume_step is not None:
        resume_dir = download_checkpoint(store, prefix, resume_step, work / "resume")
        log.info(
            "resuming from %s", store.uri_for(f"{prefix}checkpoints/checkpoint-{resume_step}/")
        )

    with stage(reporter, "train"):
        local_checkpoints = work / "checkpoints"
        shutil.rmtree(local_checkpoints, ignore_errors=True)
        callbacks = [
            ProgressCallback(reporter, resumed_from_step=resume_step),
            CheckpointUploader(
                store,
                prefix,
                keep=spec.training.checkpointsToKeep,
                fingerprint=fingerprint,
                reporter=reporter,
            ),
        ]
        outcome = train_model(
            built,
            data,
            spec.training,
            output_dir=local_checkpoints,
            callbacks=callbacks,
            resume_from=resume_dir,
            resumed_from_step=resume_step,
        )

    staging = publish.fresh_dir(work / "publish")
    model_folder = publish.save_model_files(
        outcome.model, built.tokenizer, is_adapter=built.is_adapter, staging=staging
    )

    evaluation: EvalOutcome | None = None
    eval_dir = publish.fresh_dir(work / "evaluation")
    if spec.evaluation.enabled:
        with stage(reporter, "evaluate"):
            evaluation = evaluate_after_training(
                EvalInputs(
                    spec=spec,
                    model=outcome.model,
                    tokenizer=built.tokenizer,
                    base_model_path=model_path,
                    eval_rows=eval_rows,
                    data_format=EVAL_FORMATS.get(data.format, data.format),
                    out_dir=eval_dir,
                    log_history=outcome.log_history,
                    train_seconds=outcome.seconds,
                )
            )

    with stage(reporter, "publish"):
        artifacts = {"model": f"{model_folder}/"}
        if built.is_adapter and spec.output.mergeAdapter:
            publish.save_merged_model(
                model_path,
                staging / model_folder,
                built.tokenizer,
                staging / publish.MERGED_DIR,
                built.hardware.weights_dtype,
            )
            artifacts["mergedModel"] = f"{publish.MERGED_DIR}/"
        eval_keys = stage_eval_files(evaluation, eval_dir, staging)
        report = next((k for k in eval_keys if k.endswith("report.md")), None) or next(
            (k for k in eval_keys if k.endswith("report.json")), None
        )
        if report:
            artifacts["report"] = report
        artifacts["metrics"] = publish.METRICS
        metrics = headline_metrics(outcome, evaluation, time.monotonic() - started)
        summary = publish.RunSummary(
            job=job,
            namespace=options.namespace,
            data=data,
            metrics=metrics,
            log_history=outcome.log_history,
            total_steps=outcome.global_step,
            resumed_from_step=resume_step,
            duration_seconds=time.monotonic() - started,
            train_seconds=outcome.seconds,
            first_loss=outcome.first_loss,
            mean_train_loss=outcome.mean_train_loss,
            eval_passed=evaluation.passed if evaluation else None,
            eval_missed=list(evaluation.missed) if evaluation else [],
            artifacts=artifacts,
        )
        publish.write_run_documents(summary, staging)
        publish.upload_run(store, prefix, staging, summary)

    if evaluation is not None and spec.evaluation.failOnThresholds and evaluation.passed is False:
        raise EvaluationGateError("evaluation thresholds missed: " + "; ".join(evaluation.missed))

    uris = {role: store.uri_for(prefix + relative) for role, relative in artifacts.items()}
    return TrainerResult(
        result="succeeded",
        artifacts=Artifacts(manifest=store.uri_for(prefix + publish.MANIFEST), **uris),
        metrics=Metrics(**metrics),
        resumedFromStep=resume_step,
        totalSteps=outcome.global_step,
    )
