"""Experiment tracking: the run's parameters, per-step metrics, evaluation metrics and
artifact locations, logged to MLflow and/or Weights & Biases.

Tracking is a side channel. A tracking server that is down, slow or refusing never fails or
stalls the training: the backend that failed is switched off for the rest of the run, and its
state (Unavailable, with the reason) goes to the status through the termination message.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from kubetune.api.v1alpha1 import FineTuneJob, MlflowTracking, TrackingStatus, WandbTracking

log = logging.getLogger(__name__)

# An MLflow client retries a refused request for minutes by default; the training must not
# wait on it. A few seconds per request, one retry.
MLFLOW_CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}


def one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:limit]


def flat_params(job: FineTuneJob) -> dict[str, str]:
    """The resolved spec as `section.field: value` (Secret names only, never their data)."""
    params: dict[str, str] = {"name": job.metadata.name or ""}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif value is not None:
            params[prefix] = str(value)[:500]  # MLflow limits a param value

    spec = job.spec.model_dump(mode="json", exclude_none=True, by_alias=True)
    spec.pop("tracking", None)
    for section in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets"):
        spec.pop(section, None)  # placement: nothing to compare runs by
    walk("", spec)
    return params


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and v == v
    }  # v == v drops NaN


class Tracker(ABC):
    """One tracking backend. Every method may raise: `Tracking` isolates the failure."""

    backend: str
    run: str | None = None  # where the run can be found, once started

    @abstractmethod
    def start(self, run_name: str, params: dict[str, str]) -> None: ...

    @abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    @abstractmethod
    def log_summary(self, metrics: dict[str, float], tags: dict[str, str]) -> None:
        """Final metrics (evaluation) and tags (artifact URIs)."""

    @abstractmethod
    def finish(self, succeeded: bool) -> None: ...

    model_version: str | None = None  # NAME/VERSION once registered

    def register_model(self, source: str, tags: dict[str, str]) -> None:  # noqa: B027
        """A new version of the spec's registered model; backends without a registry
        (W&B here) do nothing."""


class MlflowTracker(Tracker):
    backend = "mlflow"

    def __init__(self, spec: MlflowTracking) -> None:
        for key, value in MLFLOW_CLIENT_ENV.items():
            os.environ.setdefault(key, value)
        from mlflow.tracking import MlflowClient

        self.spec = spec
        self.client = MlflowClient(tracking_uri=spec.uri)
        self.run_id: str | None = None

    def start(self, run_name: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        experiment = self.client.get_experiment_by_name(self.spec.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(self.spec.experiment)
        )
        run = self.client.create_run(experiment_id, run_name=run_name)
        self.run_id = run.info.run_id
        self.run = f"{self.spec.uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{self.run_id}"
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_summary(self, metrics: dict[str, float], tags: dict[str, str]) -> None:
        import time

        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )

    def finish(self, succeeded: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if succeeded else "FAILED")

    def register_model(self, source: str, tags: dict[str, str]) -> None:
        from mlflow.exceptions import MlflowException

        name = self.spec.registeredModel
        if not name:
            return
        try:
            self.client.create_registered_model(
                name, description="Fine-tuned by kubetune FineTuneJobs."
            )
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(
            name, source=source, run_id=self.run_id, tags=tags
        )
        self.model_version = f"{name}/{version.version}"


class WandbTracker(Tracker):
    backend = "wandb"

    def __init__(self, spec: WandbTracking, work_dir: Path) -> None:
        self.spec = spec
        self.dir = Path(work_dir) / "wandb"
        self.handle: Any = None

    def start(self, run_name: str, params: dict[str, str]) -> None:
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        self.handle = wandb.init(
            project=self.spec.project,
            entity=self.spec.entity,
            name=run_name,
            mode=self.spec.mode,
            dir=str(self.dir),
            config=params,
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        self.run = (
            self.handle.url
            if self.spec.mode == "online"
            else f"{self.dir}/wandb/offline-run-*-{self.handle.id}"
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.handle.log(metrics, step=step)

    def log_summary(self, metrics: dict[str, float], tags: dict[str, str]) -> None:
        self.handle.summary.update({**metrics, **tags})

    def finish(self, succeeded: bool) -> None:
        import wandb

        self.handle.finish(exit_code=0 if succeeded else 1)
        # The run file is written by W&B's service process: wait until it has all of it
        # (its atexit hook would too, but not where multiprocessing or torchrun end us).
        wandb.teardown()


class Tracking:
    """Every configured backend, each switched off at its first failure."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers
        self.failures: dict[str, str] = {}

    def _each(self, call: Callable[[Tracker], None], what: str) -> None:
        for tracker in self.trackers:
            if tracker.backend in self.failures:
                continue
            try:
                call(tracker)
            except Exception as error:  # noqa: BLE001 (tracking never fails the training)
                reason = f"{what}: {one_line(error)}"
                self.failures[tracker.backend] = reason
                log.warning("%s tracking stopped (%s); training goes on", tracker.backend, reason)

    def start(self, run_name: str, params: dict[str, str]) -> None:
        self._each(lambda t: t.start(run_name, params), "start")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            self._each(lambda t: t.log_metrics(metrics, step), "log")

    def log_summary(self, metrics: dict[str, float], tags: dict[str, str]) -> None:
        self._each(lambda t: t.log_summary(metrics, tags), "summary")

    def finish(self, succeeded: bool) -> None:
        self._each(lambda t: t.finish(succeeded), "finish")

    def register_model(self, source: str, tags: dict[str, str]) -> None:
        self._each(lambda t: t.register_model(source, tags), "register model")

    def status(self) -> list[TrackingStatus]:
        return [
            TrackingStatus(
                backend=t.backend,
                state="Unavailable" if t.backend in self.failures else "Logged",
                run=t.run,
                message=self.failures.get(t.backend),
                modelVersion=t.model_version,
            )
            for t in self.trackers
        ]


def make_tracking(job: FineTuneJob, work_dir: Path) -> Tracking:
    """The backends the spec asks for (none: a Tracking that does nothing)."""
    spec = job.spec.tracking
    trackers: list[Tracker] = []
    if spec is not None and spec.mlflow is not None:
        trackers.append(MlflowTracker(spec.mlflow))
    if spec is not None and spec.wandb is not None:
        trackers.append(WandbTracker(spec.wandb, work_dir))
    return Tracking(trackers)


class TrackingCallback(TrainerCallback):
    """The trainer's logged values (loss, learning rate, eval loss...) at each logging step."""

    def __init__(self, tracking: Tracking, *, is_main_process: bool = True) -> None:
        self.tracking = tracking
        self.is_main_process = is_main_process

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **_: Any):
        if self.is_main_process and logs:
            self.tracking.log_metrics(numeric(logs), state.global_step)
