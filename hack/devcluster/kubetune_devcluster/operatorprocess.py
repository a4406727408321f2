"""The kubetune operator as a process of this host, against a dev cluster: what the demo's
process node and the end-to-end tests and benchmark run.

    op = OperatorProcess(cluster, log_path, trainer_command=[...], extra_args=[...], env={})
    op.start()            # waits for /readyz; OperatorExited (with the log's tail) if it dies
    op.metric(name, labels) op.logs() op.tail() op.url op.port op.proc op.record
    op.restart()          # SIGKILL, then start again on the same port
    op.stop()             # SIGTERM to its process group, SIGKILL after a timeout

Its port is chosen up front so that trainer pods, host processes on the process node, reach
its progress endpoint at http://127.0.0.1:<port>. It dies with the thread that started it,
even when that is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubetune_devcluster.processes import (
    ProcessRecord,
    free_port,
    start_process,
    stop_processes,
    wait_for,
)

# The process node runs no images: any reference will do.
LOCAL_TRAINER_IMAGE = "kubetune/trainer:local"


class OperatorExited(RuntimeError):
    """The operator exited before it was ready; the message ends with its log's tail."""


def local_trainer_command() -> list[str]:
    """This environment's trainer: the console script next to the interpreter."""
    script = Path(sys.executable).with_name("kubetune-trainer")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kubetune_trainer"]


class OperatorProcess:
    """`python -m kubetune_operator` with its own port, logging to `log_path` (appended to
    across restarts, each start marked). `extra_args` come last, so they override the
    defaults; `env` is added to the cluster's (KUBECONFIG)."""

    def __init__(
        self,
        cluster: Any,
        log_path: Path,
        *,
        trainer_command: Sequence[str] | None = None,
        trainer_image: str = LOCAL_TRAINER_IMAGE,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        ready_timeout: float = 90,
    ) -> None:
        self.cluster = cluster
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.trainer_command = list(trainer_command or local_trainer_command())
        self.trainer_image = trainer_image
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.record: ProcessRecord | None = None
        self.starts = 0

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "kubetune_operator",
            # Trainer pods are processes on this host: they reach it on loopback.
            "--listen-host", "127.0.0.1",
            "--listen-port", str(self.port),
            "--progress-base-url", self.url,
            "--trainer-command", " ".join(self.trainer_command),
            "--trainer-image", self.trainer_image,
            "--patch-interval", "1",
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> None:
        """Start it and wait until it is ready."""
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as log:
            log.write(f"--- start {self.starts} ---\n")
        self.proc, self.record = start_process(
            "operator",
            self.argv(),
            self.log_path,
            env={**self.cluster.env(), **self.env},
            die_with_parent=True,
        )
        try:
            self.wait_ready(self.ready_timeout)
        except BaseException:
            self.stop()  # not left running by a start that failed
            raise

    def wait_ready(self, timeout: float) -> None:
        """Until /readyz answers 200; OperatorExited at once if it exits meanwhile."""
        proc = self.proc
        assert proc is not None, "start() first"

        def ready_or_exited() -> bool:
            if proc.poll() is not None:
                return True
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as response:
                return response.status == 200

        try:
            wait_for(ready_or_exited, timeout=timeout, what="operator /readyz")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; see {self.log_path}:\n{self.tail()}") from None
        if proc.poll() is not None:
            raise OperatorExited(
                f"the operator exited with {proc.returncode}; see {self.log_path}:\n{self.tail()}"
            )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """`sig` to its process group, then SIGTERM and, after `timeout`, SIGKILL."""
        proc, record = self.proc, self.record
        if proc is None or record is None or proc.poll() is not None:
            return
        if sig != signal.SIGTERM:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        stop_processes([record], timeout=timeout, reap=lambda _pid: proc.poll())

    def restart(self, sig: int = signal.SIGKILL) -> None:
        """Kill it (by default without a chance to clean up) and start it again."""
        self.stop(sig)
        self.start()

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample of its Prometheus /metrics (0 when absent); `labels` must list the
        sample's labels in their exposition order."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as response:
            text = response.read().decode()
        if labels:
            want = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
        else:
            want = name + " "
        for line in text.splitlines():
            if line.startswith(want):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def __enter__(self) -> OperatorProcess:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
