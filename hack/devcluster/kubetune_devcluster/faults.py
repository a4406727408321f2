"""Faults to inject into a running dev cluster: restart a control-plane component in place.

    restart_component(cluster, "kube-apiserver")   stop it, start it again with the same
    restart_component(cluster, "etcd")             argv, environment, ports and state; wait
                                                   until it is healthy again

The component comes back as the very same server: same command line (read from
/proc/<pid>/cmdline), environment, working directory, log file and data (etcd's data
directory, the API server's certificates), so clients only see a connection drop and an
outage. Used by tests/e2e/test_faults_control_plane.py; `docs/reliability.md` has the figures.
"""

from __future__ import annotations

import os
import signal
import ssl
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kubetune_devcluster.controlplane import DevCluster
from kubetune_devcluster.processes import (
    ProcessRecord,
    is_alive,
    start_process,
    stop_processes,
    wait_for,
)

RESTARTABLE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


@dataclass(frozen=True)
class Restart:
    """What one restart took, in seconds (monotonic clock)."""

    component: str
    stopped_at: float  # the old process is gone
    healthy_at: float  # the new one answers its health check

    @property
    def outage_seconds(self) -> float:
        return self.healthy_at - self.stopped_at


def _record(cluster: DevCluster, component: str) -> ProcessRecord:
    for record in cluster.processes:
        if record.name == component and is_alive(record):
            return record
    raise RuntimeError(f"no running {component} in the cluster at {cluster.state_dir}")


def _read_nul_list(path: Path) -> list[str]:
    return [part.decode() for part in path.read_bytes().split(b"\0") if part]


def _healthy(cluster: DevCluster, component: str) -> bool:
    if component == "etcd":
        url = f"http://127.0.0.1:{cluster.ports['etcd_client']}/health"
        context = None
    elif component == "kube-apiserver":
        url, context = f"{cluster.server}/readyz", _admin_context(cluster)
    else:  # the controller manager and scheduler serve /healthz on their secure port
        port = cluster.ports["controller_manager" if "controller" in component else "scheduler"]
        url, context = f"https://127.0.0.1:{port}/healthz", ssl._create_unverified_context()
    with urllib.request.urlopen(url, context=context, timeout=5) as response:
        return response.status == 200


def _admin_context(cluster: DevCluster) -> ssl.SSLContext:
    pki_dir = cluster.state_dir / "pki"
    context = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
    context.load_cert_chain(str(pki_dir / "admin.crt"), str(pki_dir / "admin.key"))
    return context


def restart_component(
    cluster: DevCluster,
    component: str,
    *,
    sig: int = signal.SIGKILL,
    down_seconds: float = 0.0,
    timeout: float = 60.0,
) -> Restart:
    """Stop `component` (SIGKILL by default: a crash, not a graceful shutdown), keep it down
    for `down_seconds`, start it again exactly as it ran, and wait until it is healthy."""
    if component not in RESTARTABLE:
        raise ValueError(f"component {component!r}: expected one of {RESTARTABLE}")
    old = _record(cluster, component)
    proc_dir = Path(f"/proc/{old.pid}")
    argv = _read_nul_list(proc_dir / "cmdline")
    env = dict(item.split("=", 1) for item in _read_nul_list(proc_dir / "environ") if "=" in item)
    cwd = os.readlink(proc_dir / "cwd")
    popen = cluster._popen.pop(old.pid, None)  # noqa: SLF001 - the cluster's own children

    os.killpg(old.pid, sig)
    stop_processes([old], timeout=15, reap=lambda pid: popen.poll() if popen else None)
    stopped_at = time.monotonic()
    if down_seconds > 0:
        # The outage itself is the fault being injected: this wait is its length, not a
        # synchronisation.
        time.sleep(down_seconds)

    proc, record = start_process(
        component,
        argv,
        Path(old.log),
        env=env,
        cwd=Path(cwd),
        die_with_parent=popen is not None,  # as it was started: with the tests, or detached
    )
    cluster.processes[cluster.processes.index(old)] = record
    if popen is not None:
        cluster._popen[proc.pid] = proc  # noqa: SLF001
    cluster._save_state()  # noqa: SLF001 - `kubetune dev down` must find the new pid

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{component} exited with {proc.returncode}; see {old.log}")
        return _healthy(cluster, component)

    wait_for(healthy, timeout=timeout, interval=0.1, what=f"{component} healthy again")
    return Restart(component, stopped_at, time.monotonic())
