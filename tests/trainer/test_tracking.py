"""Experiment tracking for real: a tiny LoRA run logged to a real MLflow tracking server
(started here) and to W&B in offline mode; and a tracking server that is down, which must
neither fail nor stall the training."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune_trainer.data import load_training_data
from kubetune_trainer.modeling import Hardware, build_model
from kubetune_trainer.tracking import TrackingCallback, flat_params, make_tracking
from kubetune_trainer.train import train_model
from tests.fixtures.mlflow import MlflowServer, free_port

CPU = Hardware("cpu", bf16_supported=False)


def train_with_tracking(tiny_job: Any, tmp_path: Path, tracking_spec: dict) -> tuple[Any, Any]:
    manifest = tiny_job(
        (tmp_path / "out").as_uri(),
        name="tracked",
        training={"maxSteps": 4},
        tracking=tracking_spec,
    )
    job = FineTuneJob.model_validate(manifest)
    tracking = make_tracking(job, tmp_path / "work")
    tracking.start("tracked", flat_params(job))
    data = load_training_data(job.spec.dataset, seed=7, cache_dir=tmp_path / "cache")
    built = build_model(job.spec, Path(job.spec.model.uri.removeprefix("file://")), hardware=CPU)
    outcome = train_model(
        built,
        data,
        job.spec.training,
        output_dir=tmp_path / "ckpt",
        callbacks=[TrackingCallback(tracking)],
    )
    tracking.log_summary({"evalLoss": outcome.eval_loss}, {"artifacts.model": "s3://b/k/adapter/"})
    tracking.finish(succeeded=True)
    return outcome, tracking


@pytest.mark.slow
def test_the_whole_run_is_logged_to_mlflow(
    mlflow_server: MlflowServer, s3_env: str, tiny_job: Any, tmp_path: Path
) -> None:
    """Through the pipeline, as `kubetune run` and the trainer pod run it."""
    from mlflow.tracking import MlflowClient

    from kubetune_trainer.pipeline import RunOptions, run_pipeline
    from kubetune_trainer.progress import JsonLinesReporter

    manifest = tiny_job(
        f"s3://{s3_env}/out/",  # the registry takes remote sources only
        name="tracked",
        training={"maxSteps": 4},
        evaluation={"enabled": True, "maxSamples": 2, "maxNewTokens": 4, "sampleOutputs": 1},
        tracking={
            "mlflow": {
                "uri": mlflow_server.url,
                "experiment": "kubetune-tests",
                "registeredModel": "support-assistant",
            }
        },
    )
    job = FineTuneJob.model_validate(manifest)
    options = RunOptions(work_dir=tmp_path / "work", namespace="default", hardware=CPU)
    result = run_pipeline(job, JsonLinesReporter(io.StringIO()), options)

    [status] = result.tracking
    assert (status.backend, status.state, status.message) == ("mlflow", "Logged", None)
    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("kubetune-tests")
    [run] = client.search_runs([experiment.experiment_id], "attributes.run_name = 'tracked'")
    assert status.run.endswith(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "lora"
    assert run.data.params["training.maxSteps"] == "4"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    assert run.data.metrics["evalLoss"] == pytest.approx(result.metrics.evalLoss)
    assert run.data.metrics["tokenF1"] == pytest.approx(result.metrics.tokenF1)
    assert run.data.tags["artifacts.model"] == result.artifacts.model
    assert run.data.tags["artifacts.report"] == result.artifacts.report

    # The published adapter is the registered model's first version, pointing at it.
    [version] = client.search_model_versions("name = 'support-assistant'")
    assert status.modelVersion == f"support-assistant/{version.version}" == "support-assistant/1"
    assert (version.source, version.run_id) == (result.artifacts.model, run.info.run_id)
    assert version.tags["kubetune.baseModel"] == job.spec.model.uri
    assert version.tags["kubetune.method"] == "lora"
    assert version.tags["kubetune.evalPassed"] == "none"  # no thresholds set
    assert float(version.tags["metrics.evalLoss"]) == pytest.approx(result.metrics.evalLoss)


@pytest.mark.slow
def test_a_run_that_missed_its_thresholds_is_not_registered(
    mlflow_server: MlflowServer, tiny_job: Any, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from kubetune_trainer.pipeline import RunOptions, run_pipeline
    from kubetune_trainer.progress import JsonLinesReporter

    manifest = tiny_job(
        (tmp_path / "out").as_uri(),
        name="missed",
        training={"maxSteps": 2},
        evaluation={
            "enabled": True,
            "maxSamples": 1,
            "maxNewTokens": 2,
            "sampleOutputs": 0,
            "thresholds": {"maxEvalLoss": 0.0001},
        },
        tracking={"mlflow": {"uri": mlflow_server.url, "registeredModel": "never-registered"}},
    )
    options = RunOptions(work_dir=tmp_path / "work", namespace="default", hardware=CPU)
    result = run_pipeline(
        FineTuneJob.model_validate(manifest), JsonLinesReporter(io.StringIO()), options
    )
    assert result.metrics.evalPassed is False
    [status] = result.tracking
    assert (status.state, status.modelVersion) == ("Logged", None)
    client = MlflowClient(tracking_uri=mlflow_server.url)
    assert client.search_model_versions("name = 'never-registered'") == []


@pytest.mark.slow
def test_wandb_offline_writes_its_run_files(tiny_job: Any, tmp_path: Path) -> None:
    spec = {"wandb": {"project": "kubetune-tests", "mode": "offline"}}
    outcome, tracking = train_with_tracking(tiny_job, tmp_path, spec)

    [status] = tracking.status()
    assert status.state == "Logged", status
    [run_dir] = (tmp_path / "work" / "wandb" / "wandb").glob("offline-run-*")
    assert status.run.endswith(run_dir.name.rsplit("-", 1)[1])
    # The run file (what `wandb sync` uploads later) holds protobuf records whose strings
    # are stored as they are: the config, each step's loss, the summary.
    [run_file] = run_dir.glob("run-*.wandb")
    recorded = run_file.read_bytes()
    for expected in (b"training.maxSteps", b"evalLoss", b"s3://b/k/adapter/"):
        assert expected in recorded, expected
    assert recorded.count(b"\x12\x04loss") >= outcome.global_step  # a `loss` item per step


@pytest.mark.slow
def test_a_tracking_server_that_is_down_neither_fails_nor_stalls_training(
    tiny_job: Any, tmp_path: Path
) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    outcome, tracking = train_with_tracking(tiny_job, tmp_path, {"mlflow": {"uri": down}})

    assert outcome.global_step == 4
    [status] = tracking.status()
    assert status.state == "Unavailable"
    assert status.message.startswith("start: ") and "127.0.0.1" in status.message
    # The client gives up within seconds (one retry), not after minutes of backoff.
    assert time.monotonic() - started < 120


def test_params_hold_secret_names_never_secret_values(tiny_job: Any, tmp_path: Path) -> None:
    manifest = tiny_job(
        "s3://bucket/out/",
        tracking={"wandb": {"project": "p", "apiKeySecretRef": {"name": "wb", "key": "k"}}},
    )
    manifest["spec"]["output"]["credentialsSecretRef"] = {"name": "s3-creds"}
    params = flat_params(FineTuneJob.model_validate(manifest))
    assert params["output.credentialsSecretRef.name"] == "s3-creds"
    assert not any(key.startswith("tracking") for key in params)
    assert os.environ.get("AWS_SECRET_ACCESS_KEY", "\0") not in params.values()
