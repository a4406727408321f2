"""Starting and stopping the dev cluster's processes.

Every process is started as the leader of its own process group so that stopping it
also stops whatever it spawned. A process is identified by (pid, start time) so that a
recorded PID that the kernel has since reused for something else is never signalled.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int
    start_time: int  # clock ticks since boot, field 22 of /proc/<pid>/stat
    log: str

    def to_json(self) -> dict:
        return asdict(self)


def process_start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def is_alive(record: ProcessRecord) -> bool:
    """True while the recorded process exists (and is not a zombie)."""
    if process_start_time(record.pid) != record.start_time:
        return False
    try:
        state = Path(f"/proc/{record.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _die_with_parent(sig: int) -> Callable[[], None]:
    """A preexec_fn: the child gets `sig` when the thread that started it exits."""
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return preexec


def start_process(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    die_with_parent: bool = False,
) -> tuple[subprocess.Popen, ProcessRecord]:
    """Start `argv` in a new session, stdout and stderr appended to `log_path`.

    With `die_with_parent` the kernel kills it if this process dies, so even a
    SIGKILLed test run leaves nothing behind.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent(signal.SIGKILL) if die_with_parent else None,
        )
    start_time = process_start_time(proc.pid)
    if start_time is None:  # exited at once; keep a record that matches nothing
        start_time = -1
    return proc, ProcessRecord(name, proc.pid, start_time, str(log_path))


def _signal_group(record: ProcessRecord, sig: int) -> None:
    if not is_alive(record):
        return
    try:
        os.killpg(record.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:  # not a group leader any more; signal the process itself
        os.kill(record.pid, sig)


def group_members(pgid: int) -> list[int]:
    """PIDs of the live processes in process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            after_comm = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(after_comm[2]) == pgid and after_comm[0] != "Z":
            members.append(int(entry.name))
    return members


def stop_processes(
    records: Sequence[ProcessRecord],
    *,
    timeout: float = 10.0,
    reap: Callable[[int], None] | None = None,
) -> None:
    """SIGTERM each process group, wait up to `timeout`, then SIGKILL what is left."""
    for record in records:
        _signal_group(record, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    pending = list(records)
    while pending and time.monotonic() < deadline:
        for record in pending:
            if reap:
                reap(record.pid)
        pending = [r for r in pending if is_alive(r) or group_members(r.pid)]
        if pending:
            time.sleep(0.05)
    for record in pending:
        _signal_group(record, signal.SIGKILL)
        for pid in group_members(record.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for record in records:
        if reap:
            reap(record.pid)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_ports() -> set[int]:
    """TCP ports something listens on (from /proc/net/tcp{,6}: state 0A is LISTEN).
    Reading the table, unlike connecting, cannot be fooled by a loopback self-connect."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def port_in_use(port: int) -> bool:
    return port in listening_ports()


def wait_for(
    condition: Callable[[], object],
    *,
    timeout: float,
    interval: float = 0.2,
    what: str = "condition",
) -> object:
    """Poll `condition` until it returns something truthy; TimeoutError after `timeout`.

    Exceptions raised by `condition` count as "not yet" (the last one is reported).
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = condition()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - reported on timeout
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)
