"""Leader election: of the operator's replicas, only the holder of one Lease reconciles.

The election itself is the official client's (`kubernetes.aio.leaderelection` with a
`coordination.k8s.io/v1` Lease, the same protocol as client-go's): a candidate takes the
Lease when its holder has not renewed it for `lease_duration_s`, and the holder renews it
every `retry_period_s`. Around it, this module adds what the operator needs:

- `is_leader` is true only while the last successful renewal is younger than
  `renew_deadline_s`, measured on this process's monotonic clock from when that renewal
  *started*. The library's own loop would notice a lost Lease only when a renewal call
  returns, and its calls have no timeout; a process that was stopped (SIGSTOP, a frozen VM)
  must not act on a Lease another replica took meanwhile.
- Losing the Lease ends the process (`on_lost`, by default exit code LOST_LEASE_EXIT): its
  in-memory state is a leader's, so the simplest safe follower is a fresh one, and the
  Deployment restarts it as one.
- A graceful stop releases the Lease, so the other replica takes over after one retry
  period instead of a whole lease duration (rolling updates, drains).
- The holder identity carries the leader's progress URL: followers forward progress pushes
  there (docs/operator.md says why forwarding rather than a leader-only readiness).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from kubernetes.aio import client
from kubernetes.aio.client.rest import ApiException
from kubernetes.aio.leaderelection import electionconfig, leaderelection
from kubernetes.aio.leaderelection.leaderelectionrecord import LeaderElectionRecord
from kubernetes.aio.leaderelection.resourcelock.leaselock import LeaseLock

from kubetune.kube import Kube

logger = logging.getLogger("kubetune.operator.leader")

# The exit code of a leader that lost its Lease (the Deployment restarts it as a follower).
LOST_LEASE_EXIT = 3
# Separates the candidate's name from its progress URL in the Lease's holderIdentity.
URL_SEPARATOR = "@"


def lease_path(namespace: str, name: str) -> str:
    return f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"


def make_identity(host: str, progress_url: str | None) -> str:
    """`<host>_<random>` (unique across restarts of one pod), then `@<progress URL>`."""
    identity = f"{host}_{uuid.uuid4().hex[:8]}"
    return f"{identity}{URL_SEPARATOR}{progress_url}" if progress_url else identity


def url_of(identity: str | None) -> str | None:
    """The progress URL a holder identity advertises, if any."""
    if not identity or URL_SEPARATOR not in identity:
        return None
    return identity.split(URL_SEPARATOR, 1)[1] or None


@dataclass(frozen=True)
class LeaseTiming:
    """client-go's defaults (15 s / 10 s / 2 s). A killed leader is replaced after at most
    lease_duration_s + retry_period_s; a leader that cannot renew stops acting after
    renew_deadline_s, before any other replica may take the Lease."""

    lease_duration_s: int = 15  # whole seconds: the Lease's leaseDurationSeconds
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0


class _LeaseLock(LeaseLock):
    """The library's Lease lock, creating the Lease without its `pretty=True`: the pinned
    client's typed API refuses a bool there, so the library's own create always fails."""

    async def create(
        self, name: str, namespace: str, election_record: LeaderElectionRecord
    ) -> bool:
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(name=name), spec=self.update_lease(election_record)
        )
        try:
            await self.api_instance.create_namespaced_lease(namespace, body)
        except ApiException as exc:
            logger.info("could not create the Lease: %s", exc.reason)
            return False
        return True


class _Election(leaderelection.LeaderElection):
    """The library's election, telling when each successful acquire or renewal started, and
    taking a connection error for a failed attempt (the library lets it end the election)."""

    def __init__(self, config: electionconfig.Config, on_renewed: Callable[[float], None]):
        super().__init__(config)
        self._on_renewed = on_renewed

    async def try_acquire_or_renew(self) -> bool:
        started = time.monotonic()
        try:
            held = await super().try_acquire_or_renew()
        except Exception as exc:  # the library catches API errors only: a failed attempt too
            logger.warning("could not reach the Lease: %s", exc)
            return False
        if held:
            self._on_renewed(started)
        return held


class Leadership:
    """One candidate for the Lease `namespace/name`; `run()` campaigns until the Lease is lost
    (then `on_lost`) or the task is cancelled."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        timing: LeaseTiming = LeaseTiming(),
        on_started: Callable[[], None] = lambda: None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.timing = timing
        self.on_started = on_started
        self.on_lost = on_lost or exit_lost_lease
        self._renewed_at: float | None = None  # monotonic start of the last good renewal
        self._lost = False
        self._released = False  # given up on purpose (a graceful stop): not a loss
        lock = _LeaseLock(name, namespace, identity, kube.api_client)
        config = electionconfig.Config(
            lock,
            lease_duration=timing.lease_duration_s,
            renew_deadline=timing.renew_deadline_s,
            retry_period=timing.retry_period_s,
            onstarted_leading=self._lead,
            onstopped_leading=self._stopped,
        )
        self._election = _Election(config, self._renewed)

    @property
    def is_leader(self) -> bool:
        renewed = self._renewed_at
        return (
            not self._lost
            and renewed is not None
            and time.monotonic() - renewed < self.timing.renew_deadline_s
        )

    @property
    def leader_identity(self) -> str | None:
        """The holder as last observed (this candidate's own identity while it leads)."""
        record = self._election.observed_record
        return record.holder_identity if record else None

    def leader_url(self) -> str | None:
        return url_of(self.leader_identity)

    def _renewed(self, started: float) -> None:
        first = self._renewed_at is None
        self._renewed_at = started
        if first:
            logger.info("became the leader", extra={"lease": self.name, "identity": self.identity})
            self.on_started()

    async def _lead(self) -> None:
        """While leading: end leadership as soon as the last renewal is too old, even while a
        renewal call hangs."""
        step = min(0.5, self.timing.retry_period_s / 2)
        while self.is_leader:
            await asyncio.sleep(step)
        self._lose("the Lease was not renewed within the renew deadline")

    async def _stopped(self) -> None:
        self._lose("the Lease could not be renewed")

    def _lose(self, why: str) -> None:
        if self._lost or self._released:
            return
        self._lost = True
        logger.error("lost the leadership: %s; stopping", why, extra={"lease": self.name})
        self.on_lost()

    async def run(self) -> None:
        await self._election.run()

    async def release(self) -> bool:
        """Give the Lease up if this candidate holds it (a graceful stop): the next
        candidate's retry takes it at once. False when it held nothing to release."""
        if self._renewed_at is None or self._lost:
            return False
        self._released = True
        self._lost = True  # from here on this process does not act as the leader
        path = lease_path(self.namespace, self.name)
        with contextlib.suppress(Exception):  # best effort: the Lease expires anyway
            lease = await self.kube.get(path)
            spec = (lease or {}).get("spec") or {}
            if lease and spec.get("holderIdentity") == self.identity:
                lease["spec"] = {**spec, "holderIdentity": None, "leaseDurationSeconds": 1}
                await self.kube.request("PUT", path, lease, ok=(409,))
                logger.info("released the Lease", extra={"lease": self.name})
                return True
        return False


def exit_lost_lease() -> None:
    """A leader without its Lease must stop at once: no cleanup that could still write."""
    logging.shutdown()
    os._exit(LOST_LEASE_EXIT)
