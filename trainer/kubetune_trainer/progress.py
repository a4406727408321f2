"""Progress events: where they go (stdout, the operator, a terminal bar) and where they come from.

Every reporter takes `kubetune.api.contract.ProgressEvent`s. Reporting must never slow down
or break training: the HTTP reporter pushes from a background thread through a small queue
and drops (and counts) what it cannot deliver; the operator takes the outcome from the
termination message, not from this stream.
"""

from __future__ import annotations

import logging
import os
import queue
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

from pydantic import ValidationError
from transformers import TrainerCallback

from kubetune import formatting
from kubetune.api.contract import (
    ENV_PROGRESS_CA,
    ENV_PROGRESS_TOKEN,
    ENV_PROGRESS_TOKEN_FILE,
    ENV_PROGRESS_URL,
    MAX_EVENT_MESSAGE_LENGTH,
    ProgressEvent,
)

log = logging.getLogger(__name__)


def now_rfc3339() -> str:
    return formatting.now_rfc3339(milliseconds=True)


def make_event(kind: str, **fields: Any) -> ProgressEvent:
    """A `ProgressEvent` of `kind` stamped with the current time. The operator refuses an
    event with a figure out of its bounds, and reporting must never fail the run: a long
    message is cut to the bound, and a figure out of bounds (a diverged run's NaN or infinite
    loss, an absurd ETA) is left out."""
    if isinstance(fields.get("message"), str):
        fields["message"] = fields["message"][:MAX_EVENT_MESSAGE_LENGTH]
    try:
        return ProgressEvent(event=kind, time=now_rfc3339(), **fields)
    except ValidationError as error:
        bad = {str(e["loc"][0]) for e in error.errors() if e["loc"]}
        kept = {name: value for name, value in fields.items() if name not in bad}
        return ProgressEvent(event=kind, time=now_rfc3339(), **kept)


class Reporter(Protocol):
    def emit(self, event: ProgressEvent) -> None: ...

    def close(self) -> None: ...


class JsonLinesReporter:
    """One JSON object per line, flushed at once (the pod log is the machine-readable record)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._lock = threading.Lock()

    def emit(self, event: ProgressEvent) -> None:
        line = event.model_dump_json(exclude_none=True)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def close(self) -> None:
        with self._lock:
            self._stream.flush()


@dataclass
class HttpStats:
    sent: int = 0
    dropped: int = 0  # queue full: training outpaced the endpoint
    failed: int = 0  # refused, timed out, or not 2xx


class HttpReporter:
    """POSTs each event as JSON to the operator, from a background thread.

    `emit` never blocks: when the queue is full the event is dropped and counted. A failed
    POST is counted and not retried (the next event carries newer progress anyway).
    """

    _STOP = object()

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout_s: float = 5.0,
        queue_size: int = 64,
        close_timeout_s: float = 10.0,
        token_file: str | None = None,
        ca_pem: str | None = None,
    ) -> None:
        self.url = url
        self._token = token
        # An HTTPS endpoint is verified against the operator's CA (and no other).
        self._tls = ssl.create_default_context(cadata=ca_pem) if ca_pem else None
        # Read for every push: the kubelet renews the projected token in place.
        self._token_file = Path(token_file) if token_file else None
        self._timeout_s = timeout_s
        self._close_timeout_s = close_timeout_s
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.stats = HttpStats()
        self._thread = threading.Thread(target=self._run, name="progress-http", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls) -> HttpReporter | None:
        url = os.environ.get(ENV_PROGRESS_URL)
        if not url:
            return None
        return cls(
            url,
            os.environ.get(ENV_PROGRESS_TOKEN),
            token_file=os.environ.get(ENV_PROGRESS_TOKEN_FILE),
            ca_pem=os.environ.get(ENV_PROGRESS_CA) or None,
        )

    def emit(self, event: ProgressEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.stats.dropped += 1

    def _post(self, event: ProgressEvent) -> None:
        headers = {"Content-Type": "application/json"}
        token = self._token_file.read_text().strip() if self._token_file else self._token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        body = event.model_dump_json(exclude_none=True).encode()
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(
            request, timeout=self._timeout_s, context=self._tls
        ) as response:
            if not 200 <= response.status < 300:
                raise urllib.error.HTTPError(self.url, response.status, "not 2xx", None, None)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            try:
                self._post(item)
                self.stats.sent += 1
            except Exception as error:  # noqa: BLE001 - progress must never fail training
                self.stats.failed += 1
                log.debug("progress push to %s failed: %s", self.url, error)

    def close(self) -> None:
        """Deliver what is queued (bounded by close_timeout_s), then stop the thread."""
        try:
            self._queue.put(self._STOP, timeout=self._close_timeout_s)
        except queue.Full:
            return
        self._thread.join(self._close_timeout_s)
        if self.stats.dropped or self.stats.failed:
            log.warning(
                "progress endpoint: %d sent, %d dropped, %d failed",
                self.stats.sent,
                self.stats.dropped,
                self.stats.failed,
            )


class MultiReporter:
    """Sends each event to several reporters; one failing reporter does not stop the others."""

    def __init__(self, reporters: list[Reporter]) -> None:
        self.reporters = reporters

    def emit(self, event: ProgressEvent) -> None:
        for reporter in self.reporters:
            try:
                reporter.emit(event)
            except Exception as error:  # noqa: BLE001 - a broken sink must not stop training
                log.warning("progress reporter %s failed: %s", type(reporter).__name__, error)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()


class RichReporter:
    """A terminal progress bar for `kubetune run`: stages as lines, training as a bar."""

    def __init__(self, console: Any | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._task: Any = None
        self._started = False

    def _ensure_bar(self, total: int | None) -> None:
        if self._task is None:
            self._progress.start()
            self._started = True
            self._task = self._progress.add_task("train", total=total, detail="")

    def emit(self, event: ProgressEvent) -> None:
        kind = event.event
        if kind == "stage":
            self.console.print(f"[cyan]»[/] {event.stage}")
        elif kind in ("started", "resumed"):
            self._ensure_bar(event.totalSteps)
            if kind == "resumed":
                self.console.print(f"resumed from step {event.resumedFromStep}")
                self._progress.update(self._task, completed=event.resumedFromStep or 0)
        elif kind == "step":
            self._ensure_bar(event.totalSteps)
            detail = f"loss {event.loss:.4f}" if event.loss is not None else ""
            if event.tokensPerSecond:
                detail += f"  {event.tokensPerSecond:,.0f} tok/s"
            self._progress.update(
                self._task, completed=event.step, total=event.totalSteps, detail=detail
            )
        elif kind == "eval" and event.evalLoss is not None:
            self.console.print(f"  eval loss {event.evalLoss:.4f} at step {event.step}")
        elif kind == "checkpoint":
            self.console.print(f"  checkpoint at step {event.step}")
        elif kind == "failed":
            self.close()
            self.console.print(f"[red]failed:[/] {event.message}")

    def close(self) -> None:
        if self._started:
            self._progress.stop()
            self._started = False


def quiet_libraries() -> None:
    """Silence the libraries' own progress bars and chatter: progress goes through reporters."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    # Deprecation notices from inside the libraries are noise to someone fine-tuning a model.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|peft)")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class ProgressCallback(TrainerCallback):
    """Turns the trainer's logs into `started`/`resumed`, `step` and `eval` events.

    Tokens per second counts the tokens actually trained (the trainer's non-padding count,
    `num_input_tokens_seen`) in this process's wall time, so a resumed run is not credited
    with the steps before the restart.
    """

    def __init__(
        self,
        reporter: Reporter,
        *,
        resumed_from_step: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reporter = reporter
        self.resumed_from_step = resumed_from_step
        self._clock = clock
        self._t0 = 0.0
        self._step0 = 0
        self._tokens0 = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = self._clock()
        self._step0 = state.global_step
        self._tokens0 = state.num_input_tokens_seen or 0
        if self.resumed_from_step:
            self.reporter.emit(
                make_event(
                    "resumed",
                    resumedFromStep=self.resumed_from_step,
                    step=state.global_step,
                    totalSteps=state.max_steps,
                )
            )
        else:
            self.reporter.emit(make_event("started", step=0, totalSteps=state.max_steps))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            elapsed = max(self._clock() - self._t0, 1e-9)
            steps_done = state.global_step - self._step0
            tokens = (state.num_input_tokens_seen or 0) - self._tokens0
            eta = None
            if steps_done > 0 and state.max_steps:
                eta = round((state.max_steps - state.global_step) * elapsed / steps_done, 1)
            self.reporter.emit(
                make_event(
                    "step",
                    step=state.global_step,
                    totalSteps=state.max_steps,
                    epoch=_round(state.epoch, 4),
                    loss=_round(logs.get("loss"), 6),
                    learningRate=logs.get("learning_rate"),
                    tokensPerSecond=round(tokens / elapsed, 1) if tokens else None,
                    etaSeconds=eta,
                )
            )
        if "eval_loss" in logs:
            self.reporter.emit(
                make_event(
                    "eval",
                    step=state.global_step,
                    totalSteps=state.max_steps,
                    epoch=_round(state.epoch, 4),
                    evalLoss=_round(logs["eval_loss"], 6),
                )
            )


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)
