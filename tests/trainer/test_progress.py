"""Progress reporting: JSON lines, HTTP pushes to a real local endpoint, and trainer logs
turned into events."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from kubetune.api.contract import MAX_EVENT_MESSAGE_LENGTH, ProgressEvent
from kubetune_trainer.progress import (
    HttpReporter,
    JsonLinesReporter,
    MultiReporter,
    ProgressCallback,
    make_event,
)

TOKEN = "s3cret-token"


class Endpoint:
    """The operator's progress endpoint, as far as the trainer can tell: 204, or 401."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.rejected = 0
        self._arrived = threading.Condition()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with endpoint._arrived:
                    if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                        endpoint.rejected += 1
                        self.send_response(401)
                    else:
                        endpoint.received.append(json.loads(body))
                        self.send_response(204)
                    endpoint._arrived.notify_all()
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/progress/ns/job"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 10) -> None:
        with self._arrived:
            assert self._arrived.wait_for(
                lambda: len(self.received) + self.rejected >= count, timeout
            ), (self.received, self.rejected)


@pytest.fixture
def endpoint():
    server = Endpoint()
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_json_lines_one_flushed_object_per_event():
    stream = io.StringIO()
    reporter = JsonLinesReporter(stream)
    reporter.emit(make_event("stage", stage="dataset"))
    reporter.emit(make_event("step", step=3, totalSteps=10, loss=1.25))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "stage" and first["stage"] == "dataset"
    assert "step" not in first  # unset fields are left out
    assert ProgressEvent.model_validate(second).loss == 1.25
    assert second["time"].endswith("Z")


def test_http_reporter_posts_events_with_bearer_token(endpoint):
    reporter = HttpReporter(endpoint.url, TOKEN)
    for step in (1, 2, 3):
        reporter.emit(make_event("step", step=step, totalSteps=3))
    reporter.close()  # delivers what is queued
    assert [e["step"] for e in endpoint.received] == [1, 2, 3]
    assert all(e["event"] == "step" and e["totalSteps"] == 3 for e in endpoint.received)
    assert (reporter.stats.sent, reporter.stats.failed, reporter.stats.dropped) == (3, 0, 0)


def test_http_reporter_counts_rejections_without_raising(endpoint):
    reporter = HttpReporter(endpoint.url, "wrong-token")
    reporter.emit(make_event("step", step=1))
    reporter.emit(make_event("step", step=2))
    endpoint.wait_for(2)
    reporter.close()
    assert endpoint.rejected == 2 and not endpoint.received
    assert reporter.stats.failed == 2 and reporter.stats.sent == 0


def test_http_reporter_never_blocks_on_a_hung_endpoint():
    # A socket that accepts connections into its backlog but never answers.
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    try:
        url = f"http://127.0.0.1:{hung.getsockname()[1]}/"
        reporter = HttpReporter(url, TOKEN, timeout_s=0.5, queue_size=4, close_timeout_s=2)
        started = time.monotonic()
        for step in range(200):
            reporter.emit(make_event("step", step=step))
        assert time.monotonic() - started < 0.5  # emit only ever enqueues
        assert reporter.stats.dropped >= 200 - 4 - 1
        reporter.close()
    finally:
        hung.close()


def test_http_reporter_from_env(monkeypatch, endpoint):
    monkeypatch.delenv("KUBETUNE_PROGRESS_URL", raising=False)
    assert HttpReporter.from_env() is None
    monkeypatch.setenv("KUBETUNE_PROGRESS_URL", endpoint.url)
    monkeypatch.setenv("KUBETUNE_PROGRESS_TOKEN", TOKEN)
    reporter = HttpReporter.from_env()
    reporter.emit(make_event("completed"))
    reporter.close()
    assert [e["event"] for e in endpoint.received] == ["completed"]


def test_multi_reporter_survives_a_broken_reporter():
    class Broken:
        def emit(self, event):
            raise OSError("disk full")

        def close(self):
            pass

    stream = io.StringIO()
    multi = MultiReporter([Broken(), JsonLinesReporter(stream)])
    multi.emit(make_event("stage", stage="train"))
    multi.close()
    assert json.loads(stream.getvalue())["stage"] == "train"


class Recorder:
    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []

    def emit(self, event: ProgressEvent) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


def _trainer_parts(tmp_path, **state):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    return args, TrainerState(**state), TrainerControl()


def test_callback_turns_logs_into_step_and_eval_events(tmp_path):
    recorder = Recorder()
    clock = iter([100.0, 104.0]).__next__  # training began at 100 s; logged at 104 s
    callback = ProgressCallback(recorder, clock=clock)
    args, state, control = _trainer_parts(tmp_path, max_steps=10, global_step=0)
    state.num_input_tokens_seen = 0
    callback.on_train_begin(args, state, control)
    state.global_step, state.epoch, state.num_input_tokens_seen = 2, 0.2, 4096
    callback.on_log(args, state, control, logs={"loss": 2.5, "learning_rate": 1e-4})
    callback.on_log(args, state, control, logs={"eval_loss": 2.25})
    callback.on_log(args, state, control, logs={"train_runtime": 3.0})  # summary: no event

    started, step, evaluation = recorder.events
    assert started.event == "started" and started.totalSteps == 10
    assert step.event == "step" and (step.step, step.totalSteps) == (2, 10)
    assert (step.loss, step.learningRate, step.epoch) == (2.5, 1e-4, 0.2)
    assert step.tokensPerSecond == 1024.0  # 4096 tokens in 4 s
    assert step.etaSeconds == 16.0  # 8 steps left at 2 s per step
    assert evaluation.event == "eval" and evaluation.evalLoss == 2.25


def test_callback_reports_resume_and_counts_only_new_tokens(tmp_path):
    recorder = Recorder()
    clock = iter([0.0, 2.0]).__next__
    callback = ProgressCallback(recorder, resumed_from_step=6, clock=clock)
    args, state, control = _trainer_parts(tmp_path, max_steps=10, global_step=6)
    state.num_input_tokens_seen = 10**9  # tokens of the run before the restart
    callback.on_train_begin(args, state, control)
    state.global_step, state.num_input_tokens_seen = 7, 10**9 + 100
    callback.on_log(args, state, control, logs={"loss": 1.0})
    resumed, step = recorder.events
    assert resumed.event == "resumed" and resumed.resumedFromStep == 6
    assert resumed.totalSteps == 10
    # Throughput and ETA of this process only: 100 new tokens and 1 step in 2 s.
    assert step.tokensPerSecond == 50.0
    assert step.etaSeconds == 6.0


def test_http_reporter_reads_the_projected_token_file_for_every_push(
    endpoint, tmp_path, monkeypatch
):
    # The kubelet renews a projected token in place: a push after the renewal uses the new one.
    token_file = tmp_path / "token"
    token_file.write_text("expired-token\n")
    monkeypatch.setenv("KUBETUNE_PROGRESS_URL", endpoint.url)
    monkeypatch.setenv("KUBETUNE_PROGRESS_TOKEN_FILE", str(token_file))
    monkeypatch.delenv("KUBETUNE_PROGRESS_TOKEN", raising=False)
    reporter = HttpReporter.from_env()
    reporter.emit(make_event("step", step=1))
    endpoint.wait_for(1)
    token_file.write_text(TOKEN + "\n")
    reporter.emit(make_event("step", step=2))
    reporter.close()
    assert endpoint.rejected == 1
    assert [e["step"] for e in endpoint.received] == [2]


def test_an_event_never_breaks_the_operators_bounds() -> None:
    """A diverged run's NaN or infinite loss is left out and a long message cut, so the event
    is one the operator accepts (it refuses non-finite numbers and over-long strings)."""
    event = make_event(
        "step",
        step=3,
        loss=float("nan"),
        evalLoss=float("inf"),
        etaSeconds=1e12,
        learningRate=2e-4,
        message="x" * 10_000,
    )
    assert event.loss is None and event.evalLoss is None and event.etaSeconds is None
    assert event.step == 3 and event.learningRate == 2e-4
    wire = event.model_dump_json()
    assert ProgressEvent.model_validate_json(wire).message == "x" * MAX_EVENT_MESSAGE_LENGTH
