"""The local node: a Node object plus an agent that runs the pods bound to it as host
processes. A test and demo device standing in for a kubelet; see docs/local-node.md.

    python -m kubetune_devcluster.localnode --kubeconfig KUBECONFIG --state-dir DIR

The agent registers the Node (CPU, memory, nvidia.com/gpu), keeps it Ready with a Lease
heartbeat, watches pods with spec.nodeName=<node>, and runs each pod in a worker thread:
volumes materialised under the state dir, each container a process in a private mount
namespace with those volumes bind-mounted at their mountPaths, status reported back as
a kubelet would. It also answers the API server's /containerLogs requests, so
`kubectl logs` works.

On-disk layout, per pod (read by read_container_log / read_container_pids):
    <state-dir>/pods/<namespace>/<pod>/<uid>/
        pod.json                        containers in spec order
        volumes/<volume>/               materialised volumes
        containers/<name>/<n>.log       stdout+stderr of run n (0, 1, ... per restart)
        containers/<name>/<n>.termination-log
        containers/<name>/pid           {"pid", "start_time"} while it runs
        work/                           default working directory
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import platform
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kubetune.formatting import now_rfc3339
from kubetune_devcluster import podspec
from kubetune_devcluster.binaries import K8S_VERSION
from kubetune_devcluster.podspec import ContainerConfigError, Pod
from kubetune_devcluster.processes import _die_with_parent, process_start_time
from kubetune_devcluster.rest import MERGE, ApiError, KubeRest

log = logging.getLogger("kubetune.localnode")

LEASE_DURATION_SECONDS = 40
LEASE_RENEW_SECONDS = 10
NODE_STATUS_SECONDS = 60
MAX_GRACE_SECONDS = 30


def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---- on-disk layout, shared with the harness ---------------------------------------------


def pod_dirs(node_state_dir: Path, namespace: str, pod: str) -> list[Path]:
    """This pod name's run directories (one per UID), oldest first."""
    base = Path(node_state_dir) / "pods" / namespace / pod
    if not base.is_dir():
        return []
    return sorted((d for d in base.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)


def _latest_pod_dir(node_state_dir: Path, namespace: str, pod: str) -> Path:
    dirs = pod_dirs(node_state_dir, namespace, pod)
    if not dirs:
        raise FileNotFoundError(f"pod {namespace}/{pod} has never run on the local node")
    return dirs[-1]


def _container_runs(container_dir: Path) -> list[int]:
    return sorted(int(p.name.split(".")[0]) for p in container_dir.glob("*.log"))


def container_log_path(
    node_state_dir: Path,
    namespace: str,
    pod: str,
    container: str | None = None,
    *,
    previous: bool = False,
) -> Path:
    pod_dir = _latest_pod_dir(node_state_dir, namespace, pod)
    if container is None:
        meta = json.loads((pod_dir / "pod.json").read_text())
        container = meta["containers"][0]
    container_dir = pod_dir / "containers" / container
    runs = _container_runs(container_dir)
    if not runs or (previous and len(runs) < 2):
        raise FileNotFoundError(
            f"no {'previous ' if previous else ''}log for container {container!r} of "
            f"pod {namespace}/{pod}"
        )
    return container_dir / f"{runs[-2] if previous else runs[-1]}.log"


def read_container_log(
    node_state_dir: Path,
    namespace: str,
    pod: str,
    container: str | None = None,
    *,
    previous: bool = False,
) -> str:
    """What the container printed (stdout and stderr interleaved); the first container
    when `container` is None; the run before the last with `previous`."""
    path = container_log_path(node_state_dir, namespace, pod, container, previous=previous)
    return path.read_text(errors="replace")


def read_container_pids(node_state_dir: Path, namespace: str, pod: str) -> list[int]:
    """Host PIDs of the pod's containers that run now."""
    pids = []
    for pid_file in (_latest_pod_dir(node_state_dir, namespace, pod) / "containers").glob("*/pid"):
        try:
            record = json.loads(pid_file.read_text())
        except (OSError, ValueError):
            continue
        if process_start_time(record["pid"]) == record["start_time"]:
            pids.append(record["pid"])
    return pids


# ---- shared node resources -----------------------------------------------------------------


class MountPoints:
    """Creates missing mount points on the host and removes the ones it created once no
    container uses them, so pods leave no empty directories behind.

    Several agents (several dev clusters, e.g. parallel test sessions) may share a
    mount point path, and removing a path that is a mount point in another container's
    namespace detaches that mount there; so the users are counted machine-wide, in a
    JSON file under an flock, with each user tagged by its agent's PID (users of dead
    agents are dropped)."""

    def __init__(self, registry: Path | None = None) -> None:
        self.registry = registry or Path(tempfile.gettempdir()) / "kubetune-mountpoints.json"
        self._lock = threading.Lock()
        self._tag = f"{os.getpid()}:{process_start_time(os.getpid())}"

    @contextlib.contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        with self._lock, open(self.registry.with_suffix(".lock"), "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                state = json.loads(self.registry.read_text())
            except (OSError, ValueError):
                state = {}
            state.setdefault("created", [])
            users: dict[str, list[str]] = state.setdefault("users", {})
            for path, tags in list(users.items()):
                users[path] = [t for t in tags if _agent_alive(t)]
                if not users[path]:
                    del users[path]
            yield state
            tmp = self.registry.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(self.registry)

    def acquire(self, mounts: list[podspec.Mount], owner: str) -> list[str]:
        """Make the mount points exist; returns the paths to hand back to release()."""
        tag = f"{self._tag}:{owner}"
        targets = [m.target for m in mounts]
        with self._state() as state:
            for mount in mounts:
                missing = []
                probe = Path(mount.target)
                while not probe.exists() and probe != probe.parent:
                    missing.append(probe)
                    probe = probe.parent
                for path in reversed(missing):
                    try:
                        if str(path) == mount.target and not mount.source.is_dir():
                            path.touch()
                        else:
                            path.mkdir()
                    except OSError:
                        break  # the shell in the namespace reports it
                    state["created"].append(str(path))
            for target in targets:
                state["users"].setdefault(target, []).append(tag)
        return targets

    def release(self, targets: list[str], owner: str) -> None:
        tag = f"{self._tag}:{owner}"
        with self._state() as state:
            users = state["users"]
            for target in targets:
                if tag in users.get(target, []):
                    users[target].remove(tag)
                    if not users[target]:
                        del users[target]
            in_use = list(users)
            # Deepest first, so a created parent goes after its created children.
            for path in sorted(state["created"], key=lambda p: -len(Path(p).parts)):
                if any(u == path or u.startswith(path.rstrip("/") + "/") for u in in_use):
                    continue
                try:
                    p = Path(path)
                    if p.is_dir():
                        p.rmdir()
                    elif p.stat().st_size == 0:
                        p.unlink()
                except FileNotFoundError:
                    pass
                except OSError:
                    continue
                state["created"].remove(path)


def _agent_alive(tag: str) -> bool:
    pid, start_time = tag.split(":")[:2]
    return str(process_start_time(int(pid))) == start_time


class GpuAllocator:
    """Hands out GPU indices 0..n-1 to containers (the scheduler already made sure they
    fit); exported to the container as NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES."""

    def __init__(self, count: int) -> None:
        self._free = list(range(count))
        self._lock = threading.Lock()

    def allocate(self, n: int) -> list[int]:
        with self._lock:
            taken, self._free = self._free[:n], self._free[n:]
            return taken

    def release(self, indices: list[int]) -> None:
        with self._lock:
            self._free = sorted(set(self._free) | set(indices))


# ---- one container run ----------------------------------------------------------------------


@dataclass
class ContainerRun:
    """A container's process, or the state it is in when it has none."""

    spec: dict[str, Any]
    directory: Path
    restart_count: int = 0
    runs: int = 0
    proc: subprocess.Popen | None = None
    pid_record: dict[str, int] | None = None
    started_at: str | None = None
    state: dict[str, Any] = field(
        default_factory=lambda: podspec.waiting_state("ContainerCreating")
    )
    last_state: dict[str, Any] = field(default_factory=dict)
    restart_at: float | None = None  # monotonic time of a scheduled restart
    done: bool = False  # terminated and not to be restarted
    mount_targets: list[str] = field(default_factory=list)
    gpus: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec["name"]

    def status(self) -> dict[str, Any]:
        running = "running" in self.state
        status = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": running,
            "started": running,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.pid_record:
            status["containerID"] = f"local://{self.pid_record['pid']}"
        return status


# ---- one pod ---------------------------------------------------------------------------------


class PodWorker(threading.Thread):
    """Runs one pod from binding to deletion, as kubelet's pod worker does."""

    def __init__(self, agent: LocalNodeAgent, pod: Pod) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self._pod = pod
        self._lock = threading.Lock()
        self.wake = threading.Event()
        self.gone = threading.Event()  # the API object no longer exists
        self.dir = agent.state_dir / "pods" / self.namespace / self.pod_name / self.uid
        self.init_runs: list[ContainerRun] = []
        self.runs: list[ContainerRun] = []
        self.phase = "Pending"
        self.initialized = False
        self.start_time = now_rfc3339()
        self._sent_status: dict[str, Any] | None = None
        self._conditions: dict[str, dict[str, Any]] = {}
        self._delete_sent = False
        self._env_base: dict[str, str] = {}
        self._volume_dirs: dict[str, Path] = {}
        self._memory_dirs: list[Path] = []
        # Projected volumes holding service-account tokens, rewritten before the tokens
        # expire as kubelet does; with the Secrets and ConfigMaps they were built from.
        self._token_volumes: list[tuple[dict[str, Any], Path]] = []
        self._referenced: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
        self.tokens_renew_at: float | None = None

    # -- inputs from the watch ---------------------------------------------------------------

    def update(self, pod: Pod) -> None:
        with self._lock:
            self._pod = pod
        self.wake.set()

    def mark_gone(self) -> None:
        self.gone.set()
        self.wake.set()

    @property
    def pod(self) -> Pod:
        with self._lock:
            return self._pod

    def deletion_requested(self) -> bool:
        return self.gone.is_set() or bool(self.pod["metadata"].get("deletionTimestamp"))

    def should_stop(self) -> bool:
        return self.deletion_requested() or self.agent.stopping.is_set()

    def grace_seconds(self) -> float:
        if self.gone.is_set() or self.agent.stopping.is_set():
            return 2.0
        meta, spec = self.pod["metadata"], self.pod["spec"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds", 30)
        return float(min(max(grace, 0), MAX_GRACE_SECONDS))

    # -- the lifecycle -----------------------------------------------------------------------

    def run(self) -> None:
        phase = self.pod.get("status", {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            # Finished before this agent started: nothing to run, only its deletion.
            self.phase = phase
            self._sent_status = self.build_status()
        else:
            try:
                self._lifecycle()
            except Exception:
                log.exception("pod %s/%s: worker failed", self.namespace, self.pod_name)
                self.phase = "Failed"
            finally:
                self._kill_all(self.grace_seconds())
                self._release_node_resources()
                if self.deletion_requested():
                    self._set_terminal_phase()
                self._report_status()
        # Stay until the API object is gone, finishing a graceful deletion ourselves.
        while not self.gone.is_set() and not self.agent.stopping.is_set():
            if self.deletion_requested() and not self._delete_sent:
                self._delete_sent = self.agent.finalize_deletion(self.pod)
            self.wake.wait(5)
            self.wake.clear()
        self._cleanup_files()

    def _lifecycle(self) -> None:
        spec = self.pod["spec"]
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "work").mkdir(exist_ok=True)
        containers = spec.get("containers") or []
        (self.dir / "pod.json").write_text(
            json.dumps(
                {
                    "uid": self.uid,
                    "containers": [c["name"] for c in containers],
                    "initContainers": [c["name"] for c in spec.get("initContainers") or []],
                }
            )
        )
        self.init_runs = [self._new_run(c) for c in spec.get("initContainers") or []]
        self.runs = [self._new_run(c) for c in containers]
        self._report_status()

        if not self._retry_until_configured(self._prepare_volumes):
            return
        for run in self.init_runs:
            if not self._run_init_container(run):
                return
        self.initialized = True
        self._report_status()
        for run in self.runs:
            self._start_or_wait(run)
        self._update_phase()
        self._report_status()
        self._supervise()

    def _new_run(self, container: dict[str, Any]) -> ContainerRun:
        directory = self.dir / "containers" / container["name"]
        directory.mkdir(parents=True, exist_ok=True)
        return ContainerRun(spec=container, directory=directory)

    def _retry_until_configured(self, step: Any, run: ContainerRun | None = None) -> bool:
        """Retry `step` while it raises ContainerConfigError (a secret that does not exist
        yet...), until it succeeds (True) or the pod is deleted (False)."""
        attempt = 0
        while not self.should_stop():
            try:
                step()
                return True
            except ContainerConfigError as exc:
                reason = "CreateContainerConfigError"
                for r in [run] if run else [*self.init_runs, *self.runs]:
                    r.state = podspec.waiting_state(reason, str(exc))
                self._report_status()
                log.info("pod %s/%s: %s", self.namespace, self.pod_name, exc)
                self.wake.wait(min(10.0, 0.5 * 2**attempt))
                self.wake.clear()
                attempt += 1
        return False

    def _prepare_volumes(self) -> None:
        pod = self.pod
        self._referenced = self.agent.fetch_referenced(pod)
        volume_root = self.dir / "volumes"
        for volume in pod["spec"].get("volumes") or []:
            name = volume["name"]
            if "hostPath" in volume:
                path = Path(volume["hostPath"]["path"])
                if volume["hostPath"].get("type") in ("DirectoryOrCreate",):
                    path.mkdir(parents=True, exist_ok=True)
                self._volume_dirs[name] = path
                continue
            if (volume.get("emptyDir") or {}).get("medium") == "Memory":
                # tmpfs-backed: /dev/shm is a tmpfs on Linux.
                target = Path("/dev/shm") / f"kubetune-{self.uid}" / name
                self._memory_dirs.append(target.parent)
            else:
                target = volume_root / name
            target.mkdir(parents=True, exist_ok=True)
            self._write_volume_files(volume, target)
            if podspec.token_lifetimes(volume):
                self._token_volumes.append((volume, target))
            self._volume_dirs[name] = target
        self._schedule_token_renewal()
        self._env_base = self.agent.base_env(pod)

    def _write_volume_files(self, volume: dict[str, Any], target: Path) -> None:
        secrets, configmaps = self._referenced
        files = podspec.volume_files(
            volume,
            self.pod,
            secrets,
            configmaps,
            lambda audience, seconds: self.agent.service_account_token(self.pod, audience, seconds),
        )
        for rel_path, content in (files or {}).items():
            file_path = target / rel_path
            file_path.parent.mkdir(parents=True, exist_ok=True)
            # Write, then rename: a container re-reading a renewed token never sees half of it.
            partial = file_path.with_name(f".{file_path.name}.partial")
            partial.write_bytes(content.data)
            partial.chmod(content.mode)
            partial.replace(file_path)

    def _schedule_token_renewal(self) -> None:
        lifetimes = [
            s for volume, _ in self._token_volumes for s in podspec.token_lifetimes(volume)
        ]
        self.tokens_renew_at = (
            time.monotonic() + podspec.token_renew_after(min(lifetimes)) if lifetimes else None
        )

    def renew_tokens(self) -> None:
        """Rewrite the projected service-account tokens with fresh ones (kubelet renews a
        token once 80% of its lifetime has passed); retried in 10 s if the API refuses."""
        try:
            for volume, target in self._token_volumes:
                self._write_volume_files(volume, target)
        except ContainerConfigError as exc:
            log.warning("pod %s/%s: renewing tokens: %s", self.namespace, self.pod_name, exc)
            self.tokens_renew_at = time.monotonic() + 10.0
            return
        self._schedule_token_renewal()

    def _run_init_container(self, run: ContainerRun) -> bool:
        """Run an init container to success (restarting it unless restartPolicy is Never);
        False when the pod failed or is being deleted."""
        policy = self.pod["spec"].get("restartPolicy", "Always")
        while not self.should_stop():
            if not self._start_or_wait(run):
                return False
            self._report_status()
            while run.proc is not None and not self.should_stop():
                self.wake.wait(1)
                self.wake.clear()
                self._reap(run)
            if self.should_stop():
                return False
            if run.state["terminated"]["exitCode"] == 0:
                run.done = True
                self._report_status()
                return True
            if policy == "Never":
                run.done = True
                self.phase = "Failed"
                return False
            delay = podspec.restart_backoff(run.restart_count)
            run.state = podspec.waiting_state("CrashLoopBackOff", f"back-off {delay:.0f}s")
            self._report_status()
            self.wake.wait(delay)
            self.wake.clear()
            run.restart_count += 1
        return False

    def _start_or_wait(self, run: ContainerRun) -> bool:
        return self._retry_until_configured(lambda: self._start(run), run)

    def _start(self, run: ContainerRun) -> None:
        pod, container = self.pod, run.spec
        secrets, configmaps = self.agent.fetch_referenced(pod)
        env = podspec.build_pod_env(
            pod,
            container,
            secrets,
            configmaps,
            base=self._env_base,
            node_allocatable=self.agent.allocatable,
        )
        argv = podspec.container_argv(container, env)
        wanted_gpus = podspec.gpu_request(container)
        if wanted_gpus and not run.gpus:
            run.gpus = self.agent.gpus.allocate(wanted_gpus)
        if run.gpus:
            devices = ",".join(str(i) for i in run.gpus)
            env.setdefault("NVIDIA_VISIBLE_DEVICES", devices)
            env.setdefault("CUDA_VISIBLE_DEVICES", devices)
        elif "CUDA_VISIBLE_DEVICES" not in env:
            env["CUDA_VISIBLE_DEVICES"] = ""  # like a container that asked for no GPU

        mounts = podspec.container_mounts(container, self._volume_dirs, env)
        n = run.runs
        log_path = run.directory / f"{n}.log"
        message_path = run.directory / f"{n}.termination-log"
        message_path.write_bytes(b"")
        mounts.append(
            podspec.Mount(
                message_path,
                container.get("terminationMessagePath") or podspec.DEFAULT_TERMINATION_MESSAGE_PATH,
                False,
            )
        )
        if not run.mount_targets:
            run.mount_targets = self.agent.mount_points.acquire(mounts, f"{self.uid}/{run.name}")
        workdir = container.get("workingDir") or str(self.dir / "work")
        with open(log_path, "ab") as log_file:
            run.proc = subprocess.Popen(
                podspec.mount_namespace_argv(mounts, workdir, argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.dir / "work",
                start_new_session=True,
                # The container dies with the agent (this thread lives as long as it runs).
                preexec_fn=_die_with_parent(signal.SIGKILL),
            )
        run.runs += 1
        run.started_at = now_rfc3339()
        run.pid_record = {"pid": run.proc.pid, "start_time": process_start_time(run.proc.pid) or -1}
        (run.directory / "pid").write_text(json.dumps(run.pid_record))
        run.state = podspec.running_state(run.started_at)
        run.restart_at = None
        threading.Thread(target=self._wait_process, args=(run.proc,), daemon=True).start()
        log.info(
            "pod %s/%s: started %s (pid %d)", self.namespace, self.pod_name, run.name, run.proc.pid
        )

    def _wait_process(self, proc: subprocess.Popen) -> None:
        proc.wait()
        self.wake.set()

    def _reap(self, run: ContainerRun) -> bool:
        """If the container's process has exited, record its termination; True if so."""
        if run.proc is None or run.proc.poll() is None:
            return False
        exit_code = podspec.exit_code_from_returncode(run.proc.returncode)
        n = run.runs - 1
        message_file = run.directory / f"{n}.termination-log"
        log_path = run.directory / f"{n}.log"
        message = podspec.termination_message(
            run.spec,
            _read_head(message_file, podspec.MAX_TERMINATION_MESSAGE_BYTES),
            _read_tail(log_path, 64 * 1024),
            exit_code,
        )
        run.state = podspec.terminated_state(
            exit_code, run.started_at, now_rfc3339(), message, f"local://{run.proc.pid}"
        )
        run.proc = None
        (run.directory / "pid").unlink(missing_ok=True)
        log.info("pod %s/%s: %s exited %d", self.namespace, self.pod_name, run.name, exit_code)
        return True

    def _supervise(self) -> None:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        while not self.should_stop():
            changed = False
            now = time.monotonic()
            for run in self.runs:
                if self._reap(run):
                    changed = True
                    exit_code = run.state["terminated"]["exitCode"]
                    if podspec.should_restart(policy, exit_code):
                        run.restart_at = now + podspec.restart_backoff(run.restart_count)
                    else:
                        run.done = True
                if run.restart_at is not None and now >= run.restart_at:
                    run.last_state = run.state
                    run.restart_count += 1
                    run.restart_at = None
                    self._start_or_wait(run)
                    changed = True
            if changed:
                self._update_phase()
                self._report_status()
            if all(run.done for run in self.runs):
                return
            if self.tokens_renew_at is not None and now >= self.tokens_renew_at:
                self.renew_tokens()
            pending = [r.restart_at for r in self.runs if r.restart_at is not None]
            if self.tokens_renew_at is not None:
                pending.append(self.tokens_renew_at)
            timeout = max(0.05, min(pending) - time.monotonic()) if pending else 5.0
            self.wake.wait(timeout)
            self.wake.clear()

    def _update_phase(self) -> None:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        restart_pending = any(r.restart_at is not None for r in self.runs)
        self.phase = podspec.pod_phase(policy, [r.state for r in self.runs], restart_pending)

    def _kill_all(self, grace: float) -> None:
        """SIGTERM every container's process group, SIGKILL after `grace` seconds."""
        runs = [r for r in [*self.init_runs, *self.runs] if r.proc is not None]
        for run in runs:
            _signal_group(run.proc, signal.SIGTERM)  # type: ignore[arg-type]
        deadline = time.monotonic() + grace
        for run in runs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.proc.wait(timeout=max(0.0, deadline - time.monotonic()))  # type: ignore[union-attr]
        for run in runs:
            _signal_group(run.proc, signal.SIGKILL)  # type: ignore[arg-type]
            run.proc.wait()  # type: ignore[union-attr]
            self._reap(run)

    def _set_terminal_phase(self) -> None:
        """kubelet gives a deleted pod a terminal phase (the Job controller counts it)."""
        if self.phase in ("Succeeded", "Failed"):
            return
        codes = [r.state.get("terminated", {}).get("exitCode", 137) for r in self.runs]
        self.phase = "Succeeded" if codes and all(c == 0 for c in codes) else "Failed"

    def _release_node_resources(self) -> None:
        for run in [*self.init_runs, *self.runs]:
            if run.mount_targets:
                self.agent.mount_points.release(run.mount_targets, f"{self.uid}/{run.name}")
                run.mount_targets = []
            if run.gpus:
                self.agent.gpus.release(run.gpus)
                run.gpus = []
            if run.state.get("waiting", {}).get("reason") == "ContainerCreating" and (
                self.deletion_requested()
            ):
                run.state = podspec.terminated_state(
                    137, None, now_rfc3339(), "pod deleted before the container started"
                )
        for directory in self._memory_dirs:
            shutil.rmtree(directory, ignore_errors=True)

    def _cleanup_files(self) -> None:
        # Logs stay (tests and `read_pod_logs` read them after the pod is gone);
        # materialised secrets do not.
        shutil.rmtree(self.dir / "volumes", ignore_errors=True)

    # -- status ------------------------------------------------------------------------------

    def _condition(self, kind: str, ok: bool, reason: str | None) -> dict[str, Any]:
        status = "True" if ok else "False"
        previous = self._conditions.get(kind)
        since = (
            previous["lastTransitionTime"]
            if previous and previous["status"] == status
            else now_rfc3339()
        )
        # reason None (JSON null) removes an earlier reason: status patches merge.
        entry: dict[str, Any] = {
            "type": kind,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": since,
            "reason": None if ok else reason,
        }
        self._conditions[kind] = entry
        return entry

    def build_status(self) -> dict[str, Any]:
        terminal = self.phase in ("Succeeded", "Failed")
        all_running = bool(self.runs) and all("running" in r.state for r in self.runs)
        not_ready = "PodCompleted" if terminal else "ContainersNotReady"
        status: dict[str, Any] = {
            "phase": self.phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "qosClass": self.pod.get("status", {}).get("qosClass"),
            "conditions": [
                self._condition(
                    "PodReadyToStartContainers",
                    bool(self._volume_dirs) or not self.pod["spec"].get("volumes"),
                    None,
                ),
                self._condition("Initialized", self.initialized, "ContainersNotInitialized"),
                self._condition("ContainersReady", all_running and not terminal, not_ready),
                self._condition("Ready", all_running and not terminal, not_ready),
            ],
            "containerStatuses": [r.status() for r in self.runs],
        }
        if self.init_runs:
            status["initContainerStatuses"] = [r.status() for r in self.init_runs]
        return status

    def _report_status(self) -> None:
        status = self.build_status()
        if status == self._sent_status or self.gone.is_set() or self.agent.stopping.is_set():
            return
        if self.agent.patch_pod_status(self.namespace, self.pod_name, self.uid, status):
            self._sent_status = status


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _read_head(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return b""


def _read_tail(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - limit))
            return f.read()
    except OSError:
        return b""


# ---- the agent ---------------------------------------------------------------------------


@dataclass
class NodeSpec:
    name: str
    cpu: str
    memory: str
    gpus: int
    pods: int
    labels: dict[str, str]
    kubelet_port: int = 0


class LocalNodeAgent:
    def __init__(self, api: KubeRest, node: NodeSpec, state_dir: Path) -> None:
        self.api = api
        self.node = node
        self.state_dir = Path(state_dir)
        self.server = urllib.parse.urlparse(api.server)
        self.stopping = threading.Event()
        self.workers: dict[str, PodWorker] = {}
        self.workers_lock = threading.Lock()
        self.mount_points = MountPoints()
        self.gpus = GpuAllocator(node.gpus)
        self.allocatable = {
            "cpu": node.cpu,
            "memory": node.memory,
            "pods": str(node.pods),
            podspec.GPU_RESOURCE: str(node.gpus),
        }

    # -- node registration and heartbeat -----------------------------------------------------

    def register_node(self) -> None:
        labels = {
            "kubernetes.io/hostname": self.node.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": {"x86_64": "amd64", "aarch64": "arm64"}.get(
                platform.machine(), platform.machine()
            ),
            "kubetune.dev/local-node": "true",
            **self.node.labels,
        }
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node.name, "labels": labels},
        }
        try:
            self.api.post("/api/v1/nodes", body)
        except ApiError as exc:
            if exc.status != 409:
                raise
            self.api.patch(f"/api/v1/nodes/{self.node.name}", {"metadata": {"labels": labels}})
        self.report_node_status()

    def report_node_status(self) -> None:
        now = now_rfc3339()
        capacity = {**self.allocatable, "ephemeral-storage": "100Gi"}

        def condition(kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }

        status = {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
                condition("Ready", "True", "KubeletReady", "local node agent is running"),
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.node.kubelet_port}},
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": platform.release(),
                "osImage": "kubetune local node",
                "containerRuntimeVersion": "kubetune-local://0.1.0",
                "kubeletVersion": K8S_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        self.api.patch(f"/api/v1/nodes/{self.node.name}/status", {"status": status})

    def renew_lease(self) -> None:
        path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
        spec = {
            "holderIdentity": self.node.name,
            "leaseDurationSeconds": LEASE_DURATION_SECONDS,
            "renewTime": now_micro(),
        }
        try:
            self.api.patch(f"{path}/{self.node.name}", {"spec": spec}, MERGE)
        except ApiError as exc:
            if exc.status != 404:
                raise
            node = self.api.get(f"/api/v1/nodes/{self.node.name}")
            self.api.post(
                path,
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {
                        "name": self.node.name,
                        "namespace": "kube-node-lease",
                        "ownerReferences": [
                            {
                                "apiVersion": "v1",
                                "kind": "Node",
                                "name": self.node.name,
                                "uid": node["metadata"]["uid"],
                            }
                        ],
                    },
                    "spec": spec,
                },
            )

    def heartbeat_loop(self) -> None:
        last_status = time.monotonic()
        while not self.stopping.wait(LEASE_RENEW_SECONDS):
            try:
                self.renew_lease()
                if time.monotonic() - last_status >= NODE_STATUS_SECONDS:
                    self.report_node_status()
                    last_status = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - the next beat retries
                log.warning("heartbeat failed: %s", exc)

    # -- API helpers used by pod workers -----------------------------------------------------

    def fetch_referenced(self, pod: Pod) -> tuple[dict[str, Any], dict[str, Any]]:
        """The secrets and configmaps the pod refers to that exist, by name, as JSON."""
        secret_names, configmap_names = podspec.referenced_objects(pod)
        namespace = pod["metadata"]["namespace"]
        found: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
        for names, resource, into in (
            (secret_names, "secrets", found[0]),
            (configmap_names, "configmaps", found[1]),
        ):
            for name in names:
                try:
                    into[name] = self.api.get(f"/api/v1/namespaces/{namespace}/{resource}/{name}")
                except ApiError as exc:
                    if exc.status != 404:
                        raise ContainerConfigError(f"reading {resource}/{name}: {exc}") from exc
                except OSError as exc:
                    raise ContainerConfigError(f"reading {resource}/{name}: {exc}") from exc
        return found

    def service_account_token(self, pod: Pod, audience: str | None, seconds: int) -> str:
        meta = pod["metadata"]
        account = pod["spec"].get("serviceAccountName") or "default"
        spec: dict[str, Any] = {
            "expirationSeconds": podspec.token_lifetime(seconds),
            "boundObjectRef": {
                "kind": "Pod",
                "apiVersion": "v1",
                "name": meta["name"],
                "uid": meta["uid"],
            },
        }
        if audience:
            spec["audiences"] = [audience]
        try:
            response = self.api.post(
                f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
            )
        except (ApiError, OSError) as exc:
            raise ContainerConfigError(f"service account token for {account}: {exc}") from exc
        return response["status"]["token"]

    def base_env(self, pod: Pod) -> dict[str, str]:
        """What every container starts from: the host's PATH and locale, and the
        in-cluster API address (this API server, so in-cluster config works)."""
        env = {
            key: os.environ[key]
            for key in ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER")
            if key in os.environ
        }
        env.update(
            {
                "HOSTNAME": pod["metadata"]["name"],
                "KUBERNETES_SERVICE_HOST": self.server.hostname or "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": str(self.server.port or 443),
                "KUBERNETES_SERVICE_PORT_HTTPS": str(self.server.port or 443),
            }
        )
        return env

    def patch_pod_status(self, namespace: str, name: str, uid: str, status: dict[str, Any]) -> bool:
        """True when the status is stored (or the pod is gone: nothing left to report)."""
        # metadata.uid makes the patch a precondition: never a same-named successor.
        try:
            self.api.patch(
                f"/api/v1/namespaces/{namespace}/pods/{name}/status",
                {"metadata": {"uid": uid}, "status": status},
            )
            return True
        except ApiError as exc:
            if exc.status not in (404, 409):
                log.warning("status of %s/%s: %s", namespace, name, exc)
            return exc.status in (404, 409)
        except OSError as exc:
            log.warning("status of %s/%s: %s", namespace, name, exc)
            return False

    def finalize_deletion(self, pod: Pod) -> bool:
        """The containers are gone: delete the pod for good, as kubelet does."""
        meta = pod["metadata"]
        try:
            self.api.delete(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                {
                    "apiVersion": "v1",
                    "kind": "DeleteOptions",
                    "gracePeriodSeconds": 0,
                    "preconditions": {"uid": meta["uid"]},
                },
            )
            return True
        except ApiError as exc:
            return exc.status in (404, 409)
        except OSError as exc:
            log.warning("deleting %s/%s: %s", meta["namespace"], meta["name"], exc)
            return False

    # -- the watch ---------------------------------------------------------------------------

    def handle(self, event_type: str, pod: Pod) -> None:
        uid = pod["metadata"]["uid"]
        with self.workers_lock:
            worker = self.workers.get(uid)
            if event_type == "DELETED":
                if worker:
                    worker.mark_gone()
                    del self.workers[uid]
                return
            if worker:
                worker.update(pod)
                return
            if self.stopping.is_set():
                return
            worker = PodWorker(self, pod)
            self.workers[uid] = worker
        worker.start()

    def watch_pods(self) -> None:
        """List+watch the pods bound to this node, re-listing when the watch expires."""
        selector = f"spec.nodeName={self.node.name}"
        resource_version = None
        while not self.stopping.is_set():
            try:
                if resource_version is None:
                    listing = self.api.get("/api/v1/pods", fieldSelector=selector)
                    resource_version = listing["metadata"]["resourceVersion"]
                    live = {p["metadata"]["uid"] for p in listing["items"]}
                    with self.workers_lock:
                        vanished = [u for u in self.workers if u not in live]
                    for uid in vanished:
                        self.handle("DELETED", {"metadata": {"uid": uid}})
                    for item in listing["items"]:
                        self.handle("MODIFIED", item)
                for event in self.api.watch(
                    "/api/v1/pods",
                    fieldSelector=selector,
                    resourceVersion=resource_version,
                    timeoutSeconds=60,
                    allowWatchBookmarks="true",
                ):
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        resource_version = None  # 410 Gone and friends: list again
                        break
                    resource_version = obj["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self.handle(event["type"], obj)
                    if self.stopping.is_set():
                        return
            except Exception as exc:  # noqa: BLE001 - list again and go on
                if not self.stopping.is_set():
                    log.warning("pod watch: %s", exc)
                resource_version = None
                self.stopping.wait(1)

    def run(self) -> None:
        self.register_node()
        self.renew_lease()
        threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True).start()
        self.watch_pods()

    def shutdown(self) -> None:
        """Stop every pod's processes (each worker kills its own)."""
        self.stopping.set()
        with self.workers_lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.wake.set()
        for worker in workers:
            worker.join(timeout=5)


# ---- the kubelet endpoint `kubectl logs` goes through --------------------------------------


def serve_container_logs(
    agent: LocalNodeAgent, port: int, cert: Path, key: Path, client_ca: Path
) -> ThreadingHTTPServer:
    """GET /containerLogs/<ns>/<pod>/<container>[?previous=&tailLines=&limitBytes=&follow=]
    over TLS with client certificates (the API server's kubelet client certificate)."""
    node_dir = agent.state_dir

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            log.debug(format, *args)

        def do_GET(self) -> None:
            url = urllib.parse.urlparse(self.path)
            query = urllib.parse.parse_qs(url.query)
            parts = url.path.strip("/").split("/")
            if url.path in ("/healthz", "/readyz"):
                return self._reply(200, b"ok")
            if len(parts) != 4 or parts[0] != "containerLogs":
                return self._reply(404, b"not found")
            _, namespace, pod, container = parts
            previous = query.get("previous", ["false"])[0] == "true"
            try:
                path = container_log_path(node_dir, namespace, pod, container, previous=previous)
            except (FileNotFoundError, KeyError, ValueError) as exc:
                return self._reply(404, str(exc).encode())
            data = path.read_bytes()
            if "tailLines" in query:
                lines = data.splitlines(keepends=True)
                data = (
                    b"".join(lines[-int(query["tailLines"][0]) :])
                    if int(query["tailLines"][0])
                    else b""
                )
            if "limitBytes" in query:
                data = data[: int(query["limitBytes"][0])]
            follow = query.get("follow", ["false"])[0] == "true"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            if not follow:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            if follow and not previous:
                self._follow(path, path.stat().st_size)

        def _follow(self, path: Path, offset: int) -> None:
            pid_file = path.parent / "pid"
            with open(path, "rb") as f:
                f.seek(offset)
                while not agent.stopping.is_set():
                    chunk = f.read(65536)
                    if chunk:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        continue
                    if not pid_file.exists():
                        return
                    time.sleep(0.2)  # polling a growing file

        def _reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    context.load_verify_locations(str(client_ca))
    context.verify_mode = ssl.CERT_REQUIRED
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name="kubelet-endpoint", daemon=True).start()
    return server


# ---- entry point -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_devcluster.localnode",
        description="Run the pods bound to a node as local processes (test/demo only).",
    )
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", default="kubetune-local")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--cpu", default="8")
    parser.add_argument("--memory", default="32Gi")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--pods", type=int, default=110)
    parser.add_argument(
        "--label", action="append", default=[], help="extra node label KEY=VALUE (repeatable)"
    )
    parser.add_argument(
        "--kubelet-port",
        type=int,
        default=0,
        help="serve /containerLogs here (for kubectl logs); 0: do not",
    )
    parser.add_argument("--serving-cert", type=Path)
    parser.add_argument("--serving-key", type=Path)
    parser.add_argument("--client-ca", type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s"
    )
    api = KubeRest(Path(args.kubeconfig))
    node = NodeSpec(
        name=args.node_name,
        cpu=args.cpu,
        memory=args.memory,
        gpus=args.gpus,
        pods=args.pods,
        labels=dict(label.split("=", 1) for label in args.label),
        kubelet_port=args.kubelet_port,
    )
    args.state_dir.mkdir(parents=True, exist_ok=True)
    agent = LocalNodeAgent(api, node, args.state_dir)

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %d: stopping pods", signum)
        agent.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.kubelet_port and args.serving_cert and args.serving_key and args.client_ca:
        serve_container_logs(
            agent, args.kubelet_port, args.serving_cert, args.serving_key, args.client_ca
        )
    agent.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
