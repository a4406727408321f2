"""kopf handlers: watch FineTuneJobs, their Jobs and pods; start the controller and server.

`kubetune-operator` (__main__.py) runs these with the settings from its flags and
environment. The handlers only record watch events; the decisions are in reconcile.py.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubetune.api import v1alpha1 as api
from kubetune.kube import Kube
from kubetune_operator import names, server
from kubetune_operator.controller import Controller
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.settings import OperatorSettings

logger = logging.getLogger("kubetune.operator")
CHILD_LABELS = {names.LABEL_MANAGED_BY: names.MANAGER}
CHILD_SELECTOR = ",".join(f"{k}={v}" for k, v in CHILD_LABELS.items())


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
    runner: Any = None
    kube: Kube | None = None
    ready: bool = False


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
    kube = await Kube.connect(pool_size=op_settings.api_threads, on_write=metrics.count_write)
    # Bind first: the Jobs we create carry the progress URL with the real port.
    placeholder = Controller(op_settings, kube, metrics)
    app = server.build_app(
        authorize=placeholder.authorize,
        on_progress=placeholder.observe_progress,
        metrics=metrics,
        ready=lambda: state.ready,
    )
    runner, port = await server.start_server(app, op_settings.listen_host, op_settings.listen_port)
    if port != op_settings.listen_port:
        op_settings = op_settings.model_copy(update={"listen_port": port})
        placeholder.settings = op_settings
    placeholder.start()
    state.controller, state.runner, state.kube = placeholder, runner, kube
    state.ready = True
    logger.info(
        "operator started",
        extra={
            "progress_url": op_settings.effective_progress_base_url,
            "namespaces": op_settings.namespaces or "all",
        },
    )


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    state.ready = False
    if state.controller:
        await state.controller.stop()
    if state.runner:
        await state.runner.cleanup()
    if state.kube:
        await state.kube.close()


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
async def finetunejob_event(event: dict, **_: Any) -> None:
    if state.controller and event.get("object"):
        state.controller.observe_ftj(event.get("type"), event["object"])


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
async def job_event(event: dict, **_: Any) -> None:
    if state.controller and event.get("object"):
        state.controller.observe_job(event.get("type"), event["object"])


@kopf.on.event("", "v1", "pods", labels=CHILD_LABELS)
async def pod_event(event: dict, **_: Any) -> None:
    if state.controller and event.get("object"):
        state.controller.observe_pod(event.get("type"), event["object"])
