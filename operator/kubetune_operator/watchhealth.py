"""Are the watch streams alive? The liveness probe's question.

kopf reconnects a stream that goes quiet (its inactivity timeout) and retries a failing one
forever, and it passes neither bookmarks nor reconnects to handlers: an operator whose
watches keep failing (RBAC revoked, an API server it cannot reach, a wedged connection)
would answer /healthz forever while reconciling nothing. A quiet stream is not a dead one,
though: with nothing changing there are no events.

So each watch has a heartbeat: any event it delivers, or a *freshness check* that passes. The
check lists the watched objects' metadata (one cheap list per quiet watch per interval) and
compares each object's resourceVersion with the last one the watch delivered: equal, the
watch has missed nothing, however quiet. /healthz fails once a watch has had no heartbeat
for `dead_after_s`: its events stopped while the objects changed, or the API server could
not be asked at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kubetune.kube import Kube

logger = logging.getLogger("kubetune.operator.watchhealth")
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"


@dataclass
class Watch:
    """One watched collection: where to list it, and what its stream last delivered."""

    name: str
    list_paths: list[str]  # one per namespace, or one cluster-wide
    label_selector: str = ""
    versions: dict[str, str] = field(default_factory=dict)  # uid -> resourceVersion
    heartbeat: float = 0.0


def seen_versions(items: list[dict]) -> dict[str, str]:
    return {
        meta["uid"]: meta.get("resourceVersion", "")
        for item in items
        if (meta := item.get("metadata") or {}).get("uid")
    }


def missed(watch_versions: dict[str, str], listed: dict[str, str]) -> list[str]:
    """The uids whose listed version the watch has not delivered (changed, created, or deleted
    without an event)."""
    return sorted(
        uid
        for uid in watch_versions.keys() | listed.keys()
        if watch_versions.get(uid) != listed.get(uid)
    )


class WatchHealth:
    def __init__(
        self,
        watches: list[Watch],
        dead_after_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.watches = {w.name: w for w in watches}
        self.dead_after_s = dead_after_s
        self.clock = clock
        now = clock()
        for watch in watches:
            watch.heartbeat = now

    def observe(self, name: str, event_type: str | None, body: dict) -> None:
        """A watch event: its heartbeat, and the version it delivered."""
        watch = self.watches[name]
        watch.heartbeat = self.clock()
        meta = body.get("metadata") or {}
        uid = meta.get("uid")
        if not uid:
            return
        if event_type == "DELETED":
            watch.versions.pop(uid, None)
        else:
            watch.versions[uid] = meta.get("resourceVersion", "")

    def dead(self) -> list[str]:
        """The watches without a heartbeat for longer than dead_after_s."""
        now = self.clock()
        return [w.name for w in self.watches.values() if now - w.heartbeat > self.dead_after_s]

    async def check(self, kube: Kube, quiet_for_s: float) -> None:
        """The freshness check of each watch quiet for `quiet_for_s`: a heartbeat when the
        API server's objects are exactly the versions the watch delivered."""
        for watch in self.watches.values():
            if self.clock() - watch.heartbeat < quiet_for_s:
                continue
            started = self.clock()
            try:
                listed: dict[str, str] = {}
                for path in watch.list_paths:
                    query = {"labelSelector": watch.label_selector} if watch.label_selector else {}
                    response = await kube.request("GET", path, query=query, accept=METADATA_LIST)
                    listed |= seen_versions((response.body or {}).get("items") or [])
            except Exception as exc:  # no answer is no heartbeat
                logger.warning("freshness check of the %s watch failed: %s", watch.name, exc)
                continue
            behind = missed(watch.versions, listed)
            if not behind:
                watch.heartbeat = max(watch.heartbeat, started)
            else:
                logger.warning(
                    "the %s watch has not delivered %d change(s), e.g. %s",
                    watch.name,
                    len(behind),
                    behind[0],
                )

    async def run(self, kube: Kube) -> None:
        """Check quiet watches every third of the bound, so a live but quiet watch always has
        had two chances before it is called dead."""
        interval = self.dead_after_s / 3
        while True:
            await asyncio.sleep(interval)
            await self.check(kube, quiet_for_s=interval)
