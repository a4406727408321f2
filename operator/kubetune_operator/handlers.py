"""kopf handlers: watch FineTuneJobs, their Jobs and pods; start the controller and server.

`kubetune-operator` (__main__.py) runs these with the settings from its flags and
environment. The handlers only record watch events; the decisions are in reconcile.py.
The controller lives in kopf's event loop; the progress/health/metrics server on a thread and
loop of its own (server.py), calling into the controller's through loops.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Any

import kopf

from kubetune.api import v1alpha1 as api
from kubetune.kube import Kube, core_path, ftj_path, job_path
from kubetune_operator import names, server
from kubetune_operator.controller import Controller
from kubetune_operator.forwarding import forwarding_middleware
from kubetune_operator.leader import Leadership, LeaseTiming, lease_path, make_identity
from kubetune_operator.loops import ControllerLoop
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.ratelimit import FailureLimiter, failure_limit_middleware
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.signing_keys import ServiceAccountKeys
from kubetune_operator.watchhealth import Watch, WatchHealth

logger = logging.getLogger("kubetune.operator")
CHILD_LABELS = {names.LABEL_MANAGED_BY: names.MANAGER}
CHILD_SELECTOR = ",".join(f"{k}={v}" for k, v in CHILD_LABELS.items())
# Failed progress pushes one address may make: a burst, then this many a second (ratelimit.py).
PUSH_FAILURES_PER_S, PUSH_FAILURE_BURST = 5.0, 50.0


class NoDiffBase(kopf.DiffBaseStorage):
    """Keeps no 'essence' of objects: we have no on.create/on.update handlers.

    kopf deep-copies every watched object on every event to detect field changes for such
    handlers; ours only record the latest body (the reconciler compares states itself),
    so that copy is pure overhead, a large one in a burst.
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


class _State:
    controller: Controller | None = None
    progress_server: server.ServerThread | None = None
    kube: Kube | None = None
    ready: bool = False
    leadership: Leadership | None = None
    health: WatchHealth | None = None
    tasks: list[asyncio.Task] = []


class NotLeader(RuntimeError):
    """A write attempted by a replica that does not hold the Lease (refused)."""


state = _State()


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    op_settings: OperatorSettings = memo.get("settings") or OperatorSettings.from_env()
    # We post our own Events for phase changes; kopf's per-handler log events would be noise.
    settings.posting.enabled = False
    settings.peering.standalone = True
    settings.watching.server_timeout = 600
    settings.networking.error_backoffs = [1, 2, 5, 10]
    settings.persistence.diffbase_storage = NoDiffBase()
    # Only our own Jobs and pods: filtered by the API server, not after the fact here
    # (a cluster's pods would otherwise all stream through this process).
    settings.watching.label_selectors["batch", "v1", "jobs"] = CHILD_SELECTOR
    settings.watching.label_selectors["", "v1", "pods"] = CHILD_SELECTOR

    metrics = OperatorMetrics()
    kube = await Kube.connect(
        pool_size=op_settings.api_threads, on_write=guarded_writes(metrics.count_write)
    )
    # Bind first: the Jobs we create carry the progress URL with the real port.
    placeholder = Controller(op_settings, kube, metrics, ControllerLoop(asyncio.get_running_loop()))
    # Progress tokens are verified against the API server's signing keys before any review
    # (in the server's thread; the keys are read through the reviewer's cross-loop client).
    placeholder.reviewer.keys = ServiceAccountKeys(placeholder.reviewer.kube)
    placeholder.reviewer.on_refused = lambda why: metrics.tokens_refused.labels(why).inc()
    await placeholder.reviewer.keys.refresh(force=True)
    health = WatchHealth(own_watches(op_settings), op_settings.watch_dead_after_s)
    progress_server, op_settings = await serve(op_settings, placeholder, metrics, health)
    placeholder.settings = op_settings
    state.controller, state.progress_server = placeholder, progress_server
    state.kube, state.health = kube, health
    state.tasks = [asyncio.create_task(health.run(kube), name="watch-health")]
    if op_settings.leader_election:
        # Watches run and fill the cache and the queue on every replica; only the leader
        # starts the workers that act on them, so a new leader starts warm.
        state.leadership = candidate(op_settings, kube, on_started=placeholder.start)
        state.tasks.append(asyncio.create_task(state.leadership.run(), name="leader-election"))
    else:
        placeholder.start()
    state.ready = True
    logger.info(
        "operator started",
        extra={
            "progress_url": op_settings.effective_progress_base_url,
            "namespaces": op_settings.namespaces or "all",
            "leader_election": op_settings.leader_election,
        },
    )


async def serve(
    settings: OperatorSettings,
    controller: Controller,
    metrics: OperatorMetrics,
    health: WatchHealth,
) -> tuple[server.ServerThread, OperatorSettings]:
    """Start the progress/health/metrics server on its own thread and event loop; returns it
    (to stop it) and the settings with the port it bound (for --listen-port 0)."""
    bound = settings
    app = server.build_app(
        authorize=controller.authorize,
        on_progress=controller.hand_over_progress,
        metrics=metrics,
        ready=lambda: state.ready,
        unhealthy=lambda: describe_dead(health.dead(), settings.watch_dead_after_s),
        controller=controller.loop,
    )
    forward = forwarding_middleware(
        lambda: state.leadership, metrics, lambda: bound.effective_peer_url, settings
    )
    limiter = FailureLimiter(PUSH_FAILURES_PER_S, PUSH_FAILURE_BURST)
    app.middlewares.append(failure_limit_middleware(limiter, metrics))  # outermost
    app.middlewares.append(forward)
    app.on_cleanup.append(forward.close)
    thread = server.ServerThread(
        app, settings.listen_host, settings.listen_port, serving_tls(settings)
    )
    port = await thread.start()
    if port != settings.listen_port:
        bound = settings.model_copy(update={"listen_port": port})
    return thread, bound


def candidate(settings: OperatorSettings, kube: Kube, on_started: Any) -> Leadership:
    """This replica as a candidate for the Lease, advertising where to forward pushes."""
    assert settings.lease_namespace  # (the settings require it with leader_election)
    return Leadership(
        kube,
        settings.lease_namespace,
        settings.lease_name,
        make_identity(socket.gethostname(), settings.effective_peer_url),
        LeaseTiming(settings.lease_duration_s, settings.renew_deadline_s, settings.retry_period_s),
        on_started=on_started,
    )


def serving_tls(settings: OperatorSettings) -> ssl.SSLContext | None:
    """HTTPS for the progress endpoint from the mounted certificate, when there is one. (The
    certificate is read at start: restart the operator after renewing it.)"""
    if not settings.tls_dir:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_file("tls.crt"), settings.tls_file("tls.key"))
    return context


def guarded_writes(count: Any) -> Any:
    """The Kube client's write hook: counts each write, and refuses it from a replica that
    is not (or no longer) the leader, so one that was paused past its Lease cannot act on
    it before it notices and exits. The Lease itself is always writable."""

    def on_write(method: str, path: str) -> None:
        leadership = state.leadership
        if (
            leadership is not None
            and not leadership.is_leader
            and not path.startswith(lease_path(leadership.namespace, ""))
        ):
            raise NotLeader(f"{method} {path}: this replica does not hold the Lease")
        count(method, path)

    return on_write


def own_watches(settings: OperatorSettings) -> list[Watch]:
    """The three watches kopf runs for these handlers, as lists the health check can make."""
    namespaces = settings.namespaces
    cluster = not namespaces
    return [
        Watch(
            "finetunejobs",
            [f"/apis/{api.GROUP}/{api.VERSION}/{api.PLURAL}"]
            if cluster
            else [ftj_path(ns) for ns in namespaces],
        ),
        Watch(
            "jobs",
            ["/apis/batch/v1/jobs"] if cluster else [job_path(ns) for ns in namespaces],
            CHILD_SELECTOR,
        ),
        Watch(
            "pods",
            ["/api/v1/pods"] if cluster else [core_path("pods", ns) for ns in namespaces],
            CHILD_SELECTOR,
        ),
    ]


def describe_dead(dead: list[str], bound_s: float) -> str | None:
    if not dead:
        return None
    return f"watch stream(s) {', '.join(dead)} delivered nothing for over {bound_s:.0f} s"


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    state.ready = False
    for task in state.tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if state.controller:
        await state.controller.stop()
    if state.leadership:
        await state.leadership.release()  # after the workers stopped: nothing writes now
    if state.progress_server:
        await state.progress_server.stop()
    if state.kube:
        await state.kube.close()


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
async def finetunejob_event(event: dict, **_: Any) -> None:
    if state.health and event.get("object"):
        state.health.observe("finetunejobs", event.get("type"), event["object"])
    if state.controller and event.get("object"):
        state.controller.observe_ftj(event.get("type"), event["object"])


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
async def job_event(event: dict, **_: Any) -> None:
    if state.health and event.get("object"):
        state.health.observe("jobs", event.get("type"), event["object"])
    if state.controller and event.get("object"):
        state.controller.observe_job(event.get("type"), event["object"])


@kopf.on.event("", "v1", "pods", labels=CHILD_LABELS)
async def pod_event(event: dict, **_: Any) -> None:
    if state.health and event.get("object"):
        state.health.observe("pods", event.get("type"), event["object"])
    if state.controller and event.get("object"):
        state.controller.observe_pod(event.get("type"), event["object"])
