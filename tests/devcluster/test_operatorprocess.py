"""The operator-process harness the demo, the end-to-end tests and the benchmark share,
driven with a stand-in operator (a real process serving /readyz and /metrics on the port
the harness chose) so that its start, readiness, metrics, restart and stop are checked in
seconds, without a cluster."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from kubetune_devcluster.operatorprocess import OperatorExited, OperatorProcess
from kubetune_devcluster.processes import is_alive, listening_ports

STAND_IN = """
import http.server, sys
port = int(sys.argv[sys.argv.index("--listen-port") + 1])
METRICS = (
    b'kubetune_api_writes_total{resource="jobs"} 3.0\\n'
    b'kubetune_api_writes_total{resource="events"} 1.0\\n'
    b"kubetune_token_reviews_total 2.0\\n"
)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"/readyz": b"ok", "/metrics": METRICS}.get(self.path)
        self.send_response(200 if body else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass

print("stand-in operator serving", " ".join(sys.argv[1:]), flush=True)
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""

EXITS = "print('cannot reach the API server', flush=True); raise SystemExit(3)"


class Cluster:
    """What the harness uses of a DevCluster: the environment of its processes."""

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": "/nonexistent"}


class StandIn(OperatorProcess):
    """The harness with `python -c script` in place of `python -m kubetune_operator`."""

    def __init__(self, script: str, log_path: Path, **kwargs: object) -> None:
        super().__init__(Cluster(), log_path, trainer_command=["true"], **kwargs)
        self.script = script

    def argv(self) -> list[str]:
        real = super().argv()
        assert real[1:3] == ["-m", "kubetune_operator"]
        return [sys.executable, "-c", self.script, *real[3:]]


def test_argv_points_trainers_at_its_port_and_puts_extra_args_last(tmp_path: Path) -> None:
    op = OperatorProcess(
        Cluster(), tmp_path / "op.log", trainer_command=["t", "x"], extra_args=["--workers", "2"]
    )
    argv = op.argv()
    assert argv[argv.index("--progress-base-url") + 1] == f"http://127.0.0.1:{op.port}"
    assert argv[argv.index("--listen-port") + 1] == str(op.port)
    assert argv[argv.index("--trainer-command") + 1] == "t x"
    assert argv[-2:] == ["--workers", "2"]


def test_start_metrics_restart_and_stop(tmp_path: Path) -> None:
    op = StandIn(STAND_IN, tmp_path / "op.log", env={"KUBETUNE_MARK": "1"}, ready_timeout=30)
    with op:
        first = op.record
        assert first is not None and is_alive(first)
        assert op.metric("kubetune_api_writes_total", {"resource": "jobs"}) == 3.0
        assert op.metric("kubetune_api_writes_total", {"resource": "events"}) == 1.0
        assert op.metric("kubetune_token_reviews_total") == 2.0
        assert op.metric("kubetune_absent_total") == 0.0

        op.restart()  # SIGKILL, then a new process on the same port
        assert not is_alive(first) and op.proc is not None and op.proc.pid != first.pid
        assert op.metric("kubetune_token_reviews_total") == 2.0
        second = op.record
    assert second is not None and not is_alive(second)
    assert op.port not in listening_ports()
    logs = op.logs()
    assert "--- start 1 ---" in logs and "--- start 2 ---" in logs
    assert logs.count("stand-in operator serving") == 2


def test_an_operator_that_exits_is_reported_at_once_with_its_log(tmp_path: Path) -> None:
    op = StandIn(EXITS, tmp_path / "op.log", ready_timeout=60)
    started = time.monotonic()
    with pytest.raises(OperatorExited) as exited:
        op.start()
    assert time.monotonic() - started < 30, "the exit waited for the readiness timeout"
    assert "exited with 3" in str(exited.value)
    assert "cannot reach the API server" in str(exited.value)


def test_stop_by_signal_ends_the_process(tmp_path: Path) -> None:
    op = StandIn(STAND_IN, tmp_path / "op.log", ready_timeout=30)
    op.start()
    record = op.record
    assert record is not None
    op.stop(signal.SIGKILL)
    assert not is_alive(record)
    op.stop()  # stopping a stopped operator is a no-op
