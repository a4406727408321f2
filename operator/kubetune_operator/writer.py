"""The operator's two kinds of status output: throttled status patches and Events.

A status patch goes out at once when anything but progress changed, otherwise at most once
per patch interval. Each phase or reason change also gets one Event, posted beside the
reconciles (at most `slots` at a time), never in their way.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from kubetune.api import v1alpha1 as api
from kubetune.api.contract import WARNING_REASONS
from kubetune.formatting import now_rfc3339
from kubetune.kube import Kube, ftj_path
from kubetune_operator import names, status
from kubetune_operator.metrics import OperatorMetrics

logger = logging.getLogger("kubetune.operator")
Key = tuple[str, str]


def event_manifest(ftj: dict, desired: dict, instance: str, stamp: str) -> dict:
    """The Event of a phase or reason change of a FineTuneJob."""
    phase, reason = desired.get("phase"), desired.get("reason") or desired.get("phase")
    warning = phase == "Failed" or reason in WARNING_REASONS
    meta = ftj["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "reason": reason,
        "message": f"{phase}: {desired.get('message') or ''}".strip(": ")[:1024],
        "type": "Warning" if warning else "Normal",
        "source": {"component": names.MANAGER},
        "reportingComponent": names.MANAGER,
        "reportingInstance": instance,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


class EventPoster:
    def __init__(self, kube: Kube, metrics: OperatorMetrics, slots: int) -> None:
        self.kube = kube
        self.metrics = metrics
        self._slots = asyncio.Semaphore(slots)
        self._tasks: set[asyncio.Task] = set()
        self._instance = socket.gethostname()

    def post(self, ftj: dict, desired: dict) -> None:
        """Post in the background; the caller moves on."""
        event = event_manifest(ftj, desired, self._instance, now_rfc3339())
        task = asyncio.create_task(self._send(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, event: dict) -> None:
        try:
            async with self._slots:
                await self.kube.create_quietly(event)
            self.metrics.events_posted.inc()
        except Exception:  # an event is a courtesy: never fail a reconcile on it
            logger.warning("could not post event", exc_info=True)

    async def drain(self, grace_s: float) -> None:
        """Let the Events already decided on go out, briefly."""
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=grace_s)
            for task in late:
                task.cancel()


class StatusWriter:
    def __init__(
        self, kube: Kube, metrics: OperatorMetrics, events: EventPoster, interval_s: float
    ) -> None:
        self.kube = kube
        self.metrics = metrics
        self.events = events
        self.interval_s = interval_s
        self.written: dict[Key, dict] = {}  # the status last written, per FineTuneJob
        self._last_patch: dict[Key, float] = {}

    async def write(self, key: Key, ftj: dict, current: dict, desired: dict) -> float | None:
        """Patch the status from `current` to `desired`; or, for progress alone within the
        interval, nothing yet: then the seconds to wait before trying again."""
        now = time.monotonic()
        if not status.needs_immediate_patch(current, desired):
            wait = self._last_patch.get(key, 0.0) + self.interval_s - now
            if wait > 0:
                return wait  # coalesce progress: at most one patch per interval
        patch = status.merge_patch(current, desired)
        path = ftj_path(key[0], key[1], "status")
        if not await self.kube.merge_patch_quietly(path, {"status": patch}):
            return None  # deleted meanwhile
        self.metrics.status_patches.inc()
        self.metrics.count_usage(key[0], current.get("usage"), desired.get("usage"))
        self._last_patch[key] = now
        self.written[key] = desired
        changed = (current.get("phase"), current.get("reason")) != (
            desired.get("phase"),
            desired.get("reason"),
        )
        if changed:
            self.events.post(ftj, desired)
        return None

    def forget(self, key: Key) -> None:
        self.written.pop(key, None)
        self._last_patch.pop(key, None)

    def count_phase(self, phase: str) -> int:
        return sum(1 for s in self.written.values() if s.get("phase") == phase)
