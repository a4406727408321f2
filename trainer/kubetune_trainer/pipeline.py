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
from functools import partial
from pathlib import Path
from typing import Any

from kubetune.api.contract import TrainerResult
from kubetune.api.v1alpha1 import Artifacts, FineTuneJob, Metrics
from kubetune_trainer import distributed, gguf, publish, servable
from kubetune_trainer.chat_masks import register_turn_end
from kubetune_trainer.checkpoints import (
    CheckpointUploader,
    checkpoint_prefix,
    download_checkpoint,
    latest_resumable,
    training_fingerprint,
)
from kubetune_trainer.data import (
    TrainingData,
    ensure_chat_template,
    load_eval_rows,
    load_training_data,
    resolve_prompt_template,
)
from kubetune_trainer.evaluate import EvalInputs, EvalOutcome, evaluate_after_training
from kubetune_trainer.model_source import model_reference, resolve_model, resolved_revision
from kubetune_trainer.modeling import BuiltModel, Hardware, build_model, load_tokenizer
from kubetune_trainer.objectives.pipeline import (
    evaluate_objective,
    load_objective_rows,
    train_objective,
)
from kubetune_trainer.preemption import Preempted, StopAtStepEnd
from kubetune_trainer.progress import ProgressCallback, Reporter, make_event
from kubetune_trainer.storage import ArtifactStore, open_store
from kubetune_trainer.tokens import TokenizedData, tokenize_training_data
from kubetune_trainer.topology import gpus_used, published_dtype, run_topology
from kubetune_trainer.tracking import TrackingCallback, flat_params, make_tracking, numeric
from kubetune_trainer.train import (
    TrainOutcome,
    perplexity,
    release_training_state,
    splits_overlong_rows,
    train_model,
)

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


@dataclass
class PreparedRun:
    """Everything checked and loaded before training: input is good from here on."""

    job: FineTuneJob
    work: Path
    prefix: str  # the run's key prefix in the output location
    store: ArtifactStore
    model_path: Path
    revision: str | None  # hub commit of a hf:// model
    data: TrainingData
    tokenized: TokenizedData
    eval_rows: list[dict]
    built: BuiltModel
    serving_note: str | None = None  # set at publishing: why vLLM would refuse the adapter

    @property
    def spec(self) -> Any:
        return self.job.spec

    @property
    def alpaca_as_chat(self) -> bool:
        return self.data.prompt_template == "chat"


def eval_rows_for(
    job: FineTuneJob, validation: Any, cache_dir: Path, *, alpaca_as_chat: bool = False
) -> list[dict]:
    """The evaluation data: spec.evaluation.datasetUri, else the validation split."""
    evaluation = job.spec.evaluation
    if evaluation.datasetUri:
        return load_eval_rows(
            evaluation.datasetUri,
            cache_dir=cache_dir,
            revision=job.spec.dataset.revision,
            alpaca_as_chat=alpaca_as_chat,
        )
    return validation.to_list() if validation is not None else []


def headline_metrics(
    outcome: TrainOutcome,
    evaluation: EvalOutcome | None,
    duration: float,
    run: PreparedRun | None = None,
) -> dict[str, Any]:
    """Keys of `Metrics`: training numbers, overridden by the evaluation stage's where set."""
    metrics: dict[str, Any] = {
        "trainLoss": outcome.train_loss,
        "evalLoss": outcome.eval_loss,
        # Only a token cross-entropy has a perplexity (not a preference or reward loss).
        "perplexity": perplexity(outcome.eval_loss)
        if run is None or run.spec.objective == "sft"
        else None,
        "tokensTrained": outcome.tokens_trained,
        "trainSamples": outcome.train_samples,
        "durationSeconds": round(duration, 3),
    }
    if run is not None:
        lengths = run.tokenized.train_lengths
        metrics["truncatedRows"] = lengths.truncated
        metrics["excludedRows"] = len(lengths.excluded)
        metrics["packing"] = run.built.packing
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


def load_data(
    job: FineTuneJob, model_path: Path, work: Path
) -> tuple[Any, TrainingData, TokenizedData, list[dict]]:
    """The tokenizer, the training data (alpaca rows in the chosen prompt template), its
    tokenised splits (too many rows without a response left fails here) and eval rows."""
    spec = job.spec
    tokenizer = load_tokenizer(model_path, trust_remote_code=spec.model.trustRemoteCode)
    if spec.dataset.chatTemplate:
        ensure_chat_template(tokenizer, spec.dataset.chatTemplate, spec.model.uri)
    if spec.objective != "sft":  # TRL's preference and reward trainers tokenise their rows
        return (tokenizer, *load_objective_rows(spec, tokenizer, work))
    template = resolve_prompt_template(spec.dataset.promptTemplate, tokenizer, spec.model.uri)
    as_chat = template == "chat"
    data = load_training_data(
        spec.dataset, seed=spec.training.seed, cache_dir=work / "data", alpaca_as_chat=as_chat
    )
    if data.format == "chat":
        ensure_chat_template(tokenizer, spec.dataset.chatTemplate, spec.model.uri)
    tokenized = tokenize_training_data(
        data,
        tokenizer,
        max_length=spec.training.maxSeqLength,
        train_on_prompt=spec.training.trainOnPrompt,
        split_overlong=splits_overlong_rows(spec.training),
    )
    lengths = tokenized.train_lengths
    if lengths.truncated or lengths.excluded:
        log.warning(
            "maxSeqLength %d: %d training rows truncated, %d excluded (no response left)",
            spec.training.maxSeqLength,
            lengths.truncated,
            len(lengths.excluded),
        )
    eval_rows = (
        eval_rows_for(job, data.validation, work / "data", alpaca_as_chat=as_chat)
        if spec.evaluation.enabled
        else []
    )
    return tokenizer, data, tokenized, eval_rows


def init_eva(built: BuiltModel, tokenized: TokenizedData, spec: Any) -> None:
    """lora.init eva: the adapters set from the first training batches, before training."""
    from kubetune_trainer import options as lora_options
    from kubetune_trainer.evaluate.inference import pad_token_id

    lora_options.apply_eva(
        built.model,
        tokenized.train,
        pad_token_id(built.tokenizer),
        spec.training.batchSize,
        spec.lora.r,
    )


def prepare(job: FineTuneJob, reporter: Reporter, options: RunOptions) -> PreparedRun:
    """Stages model-download, dataset and model-build: every input checked, BadInputError
    for anything wrong, before any training."""
    spec = job.spec
    work = Path(options.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    # Local ranks share the node's scratch: one downloads, the others find the files there.
    with distributed.node_lock(work), stage(reporter, "model-download"):
        store: ArtifactStore = open_store(spec.output.uri)
        store.check_access()  # a wrong bucket or key must fail now, not after hours of training
        model_path = resolve_model(spec.model, work / "models")
        hardware = options.hardware or Hardware.detect()
        # Bytes per parameter of the trained model, still in memory while merging.
        held = 0.5 if spec.method == "qlora" else hardware.train_dtype(spec.method).itemsize
        # A merged model that could not be made or served is refused now, not after training.
        servable.check_merge(
            spec,
            model_path,
            device=hardware.device,
            published=published_dtype(model_path),
            held_bytes=held,
        )
        if spec.output.gguf is not None:  # an architecture llama.cpp lacks: refused now
            gguf.check_convertible(model_path, work / "gguf-check")

    with distributed.node_lock(work), stage(reporter, "dataset"):
        tokenizer, data, tokenized, eval_rows = load_data(job, model_path, work)

    with stage(reporter, "model-build"):
        built = build_model(spec, model_path, hardware=hardware, tokenizer=tokenizer)
        if spec.lora is not None and spec.lora.init == "eva":
            init_eva(built, tokenized, spec)
        if spec.dataset.chatTemplate:  # a base model's new turns must end generation
            stop_note = register_turn_end(built.model, built.tokenizer)
            if stop_note:
                built.warnings.append(stop_note)
        for note in built.notes:
            log.info("%s", note)
        for warning in built.warnings:
            reporter.emit(make_event("stage", stage="model-build", message=warning))
    return PreparedRun(
        job=job,
        work=work,
        prefix=publish.run_prefix(options.namespace, job.metadata.name),
        store=store,
        model_path=model_path,
        revision=resolved_revision(spec.model, model_path),
        data=data,
        tokenized=tokenized,
        eval_rows=eval_rows,
        built=built,
    )


def train_stage(
    run: PreparedRun, reporter: Reporter, extra_callbacks: list[Any] | None = None
) -> TrainOutcome:
    """Resume from the newest matching checkpoint if any, train, upload checkpoints."""
    spec, store, prefix = run.spec, run.store, run.prefix
    rank = distributed.current()
    # Input is good: from here on, a failure is worth retrying and resuming.
    if rank.is_main:
        publish.remove_stale_manifest(store, prefix)
    fingerprint = training_fingerprint(
        spec, run.data.digest, run.revision, world_size=rank.world_size
    )
    resume_step = latest_resumable(store, prefix, fingerprint)
    # Every rank agrees on the step (rank 0 could upload a newer one while another lists).
    resume_step = distributed.agree(resume_step)
    resume_dir = None
    if resume_step is not None:
        # One copy per node (a 70B checkpoint with its optimizer state is ~1 TB): the node's
        # first local rank downloads it, the others read it once the barrier says it is
        # complete. Nobody deletes it while the gang trains; the next attempt replaces it.
        resume_root = run.work / "resume"
        if rank.is_local_main:
            download_checkpoint(store, prefix, resume_step, resume_root)
        distributed.barrier()
        resume_dir = resume_root / f"checkpoint-{resume_step}"
        log.info(
            "resuming from %s", store.uri_for(f"{prefix}checkpoints/checkpoint-{resume_step}/")
        )

    resolved = distributed.run_strategy(spec, rank)  # for the world torchrun started
    strategy = distributed.effective_strategy(resolved, run.built.hardware.device)
    if strategy != resolved:
        log.warning("%s", distributed.CPU_FSDP_NOTE)
        if distributed.CPU_FSDP_NOTE not in run.built.warnings:
            run.built.warnings.append(distributed.CPU_FSDP_NOTE)  # in the manifest's notes
    with stage(reporter, "train"):
        local_checkpoints = run.work / "checkpoints"
        if rank.is_local_main:
            shutil.rmtree(local_checkpoints, ignore_errors=True)
        distributed.barrier()  # nobody writes a checkpoint into the folder being cleared
        # Rank 0 alone reports: its step count and the gathered token count are the gang's.
        progress = [ProgressCallback(reporter, resumed_from_step=resume_step)]
        stop = StopAtStepEnd()
        callbacks = [
            *(progress if rank.is_main else []),
            stop,
            CheckpointUploader(
                store,
                prefix,
                keep=spec.training.checkpointsToKeep,
                fingerprint=fingerprint,
                reporter=reporter,
            ),
            *(extra_callbacks or []),
        ]
        train = train_model if spec.objective == "sft" else partial(train_objective, spec)
        outcome = train(
            run.built,
            run.data,
            spec.training,
            output_dir=local_checkpoints,
            callbacks=callbacks,
            resume_from=resume_dir,
            resumed_from_step=resume_step,
            tokenized=run.tokenized,
            strategy=strategy,
        )
    if stop.stopped_at is not None:
        distributed.barrier()  # rank 0 has uploaded the checkpoint: no rank exits before that
        uri = store.uri_for(checkpoint_prefix(prefix, stop.stopped_at))
        raise Preempted(stop.stopped_at, uri)
    if strategy == "fsdp":
        outcome.final_model = gather_full_model(outcome, run)
    # Evaluation needs the model, not the optimizer state (two fp32 values per parameter).
    release_training_state(outcome.trainer)
    return outcome


def gather_full_model(outcome: TrainOutcome, run: PreparedRun) -> Any:
    """FSDP: every rank holds a shard. All ranks gather the full state dict into HF files
    (rank 0 writes them); rank 0 loads them as an ordinary model to evaluate and publish."""
    final_dir = run.work / "fsdp-final"
    outcome.trainer.save_model(str(final_dir))
    distributed.barrier()
    if not distributed.current().is_main:
        return None
    from transformers import AutoModelForCausalLM

    hardware = run.built.hardware
    model = AutoModelForCausalLM.from_pretrained(
        final_dir,
        dtype=hardware.train_dtype(run.spec.method),
        device_map=hardware.device_map(),
        trust_remote_code=run.spec.model.trustRemoteCode,
    )
    return model.eval()


def evaluate_stage(
    run: PreparedRun, outcome: TrainOutcome, reporter: Reporter
) -> tuple[EvalOutcome | None, Path]:
    eval_dir = publish.fresh_dir(run.work / "evaluation")
    if not run.spec.evaluation.enabled:
        return None, eval_dir
    evaluate = evaluate_after_training if run.spec.objective == "sft" else evaluate_objective
    with stage(reporter, "evaluate"):
        evaluation = evaluate(
            EvalInputs(
                spec=run.spec,
                model=outcome.model,
                tokenizer=run.built.tokenizer,
                base_model_path=run.model_path,
                eval_rows=run.eval_rows,
                data_format=eval_format(run.data),
                out_dir=eval_dir,
                log_history=outcome.log_history,
                train_seconds=outcome.seconds,
                tokens_trained=outcome.tokens_trained,
                alpaca_as_chat=run.alpaca_as_chat,
                gpus=gpus_used(distributed.current(), run.built.hardware.device),
            )
        )
    return evaluation, eval_dir


def eval_format(data: TrainingData) -> str:
    if data.prompt_template == "chat":
        return "chat"
    return EVAL_FORMATS.get(data.format, data.format)


def publish_stage(
    run: PreparedRun,
    outcome: TrainOutcome,
    evaluation: EvalOutcome | None,
    eval_dir: Path,
    started: float,
    options: RunOptions,
) -> tuple[dict[str, str], dict[str, Any]]:
    """Model files, merged model, evaluation files, metrics and the manifest (last).
    Returns the artifacts (role -> relative key) and the headline metrics."""
    spec, built = run.spec, run.built
    staging = publish.fresh_dir(run.work / "publish")
    base = publish.BaseModelRef(model_reference(spec.model), run.revision)
    stored_dtype = published_dtype(run.model_path)
    model_folder = publish.save_model_files(
        outcome.model,
        built.tokenizer,
        is_adapter=built.is_adapter,
        staging=staging,
        base=base,
        dtype=stored_dtype,
        initial_adapter=built.initial_adapter,
    )
    # The stop tokens evaluation used, for servers (a custom template's end of turn among them).
    servable.write_generation_config(staging / model_folder, outcome.model, built.tokenizer)
    if built.is_adapter:
        run.serving_note = servable.vllm_adapter_note(staging / model_folder)
    artifacts = {"model": f"{model_folder}/"}
    merged_loss = None
    if built.is_adapter and spec.output.publishes_merged:
        merged = publish.save_merged_model(
            run.model_path,
            staging / model_folder,
            built.tokenizer,
            staging / publish.MERGED_DIR,
            built.hardware.weights_dtype,
            device_map=built.hardware.device_map(),
            published_dtype=stored_dtype,
        )
        servable.write_generation_config(
            staging / publish.MERGED_DIR, outcome.model, built.tokenizer
        )
        artifacts["mergedModel"] = f"{publish.MERGED_DIR}/"
        if built.quantized and evaluation is not None:
            merged_loss = merged_eval_loss(merged, evaluation, run)
        del merged
    if spec.output.gguf is not None:
        artifacts["gguf"] = publish_gguf(run, staging, artifacts, model_folder)
    eval_keys = stage_eval_files(evaluation, eval_dir, staging)
    report = next((k for k in eval_keys if k.endswith("report.md")), None) or next(
        (k for k in eval_keys if k.endswith("report.json")), None
    )
    if report:
        artifacts["report"] = report
    artifacts["metrics"] = publish.METRICS
    uris = {role: run.store.uri_for(run.prefix + key) for role, key in artifacts.items()}
    publish.write_serving_files(run.job, options.namespace, uris, staging)
    artifacts["serving"] = f"{publish.SERVE_DIR}/"
    metrics = headline_metrics(outcome, evaluation, time.monotonic() - started, run)
    if merged_loss is not None:
        metrics["mergedEvalLoss"] = merged_loss
    lengths = {"train": run.tokenized.train_lengths.document()}
    if run.tokenized.validation_lengths is not None:
        lengths["validation"] = run.tokenized.validation_lengths.document()
    summary = publish.RunSummary(
        job=run.job,
        namespace=options.namespace,
        data=run.data,
        metrics=metrics,
        log_history=outcome.log_history,
        total_steps=outcome.global_step,
        resumed_from_step=outcome.resumed_from_step,
        duration_seconds=time.monotonic() - started,
        train_seconds=outcome.seconds,
        first_loss=outcome.first_loss,
        mean_train_loss=outcome.mean_train_loss,
        eval_passed=evaluation.passed if evaluation else None,
        eval_missed=list(evaluation.missed) if evaluation else [],
        artifacts=artifacts,
        resolved_revision=run.revision,
        lengths=lengths,
        notes=[*built.warnings, *([run.serving_note] if run.serving_note else [])],
        topology=run_topology(distributed.current(), spec, built.hardware.device),
        adapter=built.adapter_targets,
    )
    publish.write_run_documents(summary, staging)
    publish.upload_run(run.store, run.prefix, staging, summary)
    return artifacts, metrics


def publish_gguf(
    run: PreparedRun, staging: Path, artifacts: dict[str, str], model_folder: str
) -> str:
    """gguf/: the merged model (full: the model) in each quantization, and a LoRA job's
    adapter as a llama.cpp LoRA where llama.cpp can apply it (else a note saying why not)."""
    spec, name = run.spec, run.job.metadata.name or "model"
    model_dir = staging / artifacts.get("mergedModel", f"{model_folder}/")
    gguf.convert_model(model_dir, staging, name, list(spec.output.gguf.quantizations))
    if run.built.is_adapter:
        why_not = gguf.adapter_unsupported(staging / model_folder)
        if why_not is None:
            gguf.convert_adapter(staging / model_folder, run.model_path, staging, name)
        else:
            run.built.warnings.append(f"no GGUF LoRA adapter: {why_not}")
    return f"{gguf.GGUF_DIR}/"


def merged_eval_loss(merged: Any, evaluation: EvalOutcome, run: PreparedRun) -> float | None:
    """QLoRA: the published merged model (16-bit base + merged adapter) is not the model that
    was evaluated (4-bit base + adapter); its loss on the same examples, reported beside."""
    from kubetune_trainer.evaluate.inference import pad_token_id, token_loss

    if not evaluation.loss_examples:
        return None
    return token_loss(
        merged,
        evaluation.loss_examples,
        pad_id=pad_token_id(run.built.tokenizer),
        batch_size=run.spec.training.batchSize,
        max_length=run.spec.training.maxSeqLength,
    ).loss


def run_pipeline(job: FineTuneJob, reporter: Reporter, options: RunOptions) -> TrainerResult | None:
    """Run the whole job; returns the TrainerResult (raises on failure, BadInputError first).
    In a gang, the ranks other than 0 train, wait for rank 0 to publish and return None."""
    started = time.monotonic()
    run = prepare(job, reporter, options)
    distributed.init_process_group(run.built.hardware.device)
    if not distributed.current().is_main:
        return follow(run, reporter)
    try:
        result = lead(job, run, reporter, options, started)
    except EvaluationGateError:
        distributed.announce_outcome(distributed.GATE_MISSED)
        raise
    except BaseException:
        distributed.announce_outcome(distributed.FAILED)
        raise
    distributed.announce_outcome(distributed.SUCCEEDED)
    return result


def follow(run: PreparedRun, reporter: Reporter) -> None:
    """A rank other than 0: train, then wait for rank 0's evaluation and publishing."""
    train_stage(run, reporter)
    outcome = distributed.wait_for_outcome()
    if outcome == distributed.GATE_MISSED:
        raise EvaluationGateError("evaluation thresholds missed (see rank 0)")
    if outcome != distributed.SUCCEEDED:
        raise GangFailedError("rank 0 failed after training; see its log")
    return None


class GangFailedError(Exception):
    """Rank 0 failed: the other ranks fail with it, so the gang is restarted as a whole."""


def registry_tags(
    job: FineTuneJob,
    namespace: str,
    revision: str | None,
    metrics: dict[str, Any],
    evaluation: EvalOutcome | None,
) -> dict[str, str]:
    """Tags of a Model Registry version: what it was tuned from, how, and how it scored."""
    tags = {
        "kubetune.job": f"{namespace}/{job.metadata.name}",
        "kubetune.method": job.spec.method,
        "kubetune.baseModel": job.spec.model.uri,
        "kubetune.evalPassed": "none" if evaluation is None else str(evaluation.passed).lower(),
    }
    if revision:
        tags["kubetune.baseModelRevision"] = revision
    tags.update({f"metrics.{k}": f"{v:.6g}" for k, v in numeric(metrics).items()})
    return tags


def lead(
    job: FineTuneJob, run: PreparedRun, reporter: Reporter, options: RunOptions, started: float
) -> TrainerResult:
    """Rank 0 (or the only process): train, evaluate, publish, track."""
    tracking = make_tracking(job, run.work)
    tracking.start(job.metadata.name or "kubetune", flat_params(job))
    try:
        outcome = train_stage(run, reporter, [TrackingCallback(tracking)])
        evaluation, eval_dir = evaluate_stage(run, outcome, reporter)
        with stage(reporter, "publish"):
            artifacts, metrics = publish_stage(run, outcome, evaluation, eval_dir, started, options)
    except BaseException:
        tracking.finish(succeeded=False)
        raise

    store, prefix = run.store, run.prefix
    uris = {role: store.uri_for(prefix + relative) for role, relative in artifacts.items()}
    tracking.log_summary(numeric(metrics), {f"artifacts.{role}": uri for role, uri in uris.items()})
    gate = job.spec.evaluation.failOnThresholds
    passed = not (evaluation is not None and gate and evaluation.passed is False)
    if evaluation is None or evaluation.passed is not False:
        tags = registry_tags(job, options.namespace, run.revision, metrics, evaluation)
        tracking.register_model(uris["model"], tags)
    tracking.finish(succeeded=passed)
    if not passed:
        raise EvaluationGateError("evaluation thresholds missed: " + "; ".join(evaluation.missed))
    return TrainerResult(
        result="succeeded",
        artifacts=Artifacts(
            manifest=store.uri_for(prefix + publish.MANIFEST), servingNote=run.serving_note, **uris
        ),
        metrics=Metrics(**metrics),
        resumedFromStep=outcome.resumed_from_step,
        totalSteps=outcome.global_step,
        tracking=tracking.status() or None,
    )
