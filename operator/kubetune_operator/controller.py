"""The controller: watch events in, the reconcile decision carried out.

kopf delivers watch events for FineTuneJobs, their Jobs and their pods (handlers.py); the
Cache keeps the latest of each and the WorkQueue runs the FineTuneJobs' keys through
`reconcile`, which asks the pure `decide()` (reconcile.py) what to do and does it: create the
Job, patch its suspend, write the status (StatusWriter, which also posts the Events).
Progress pushes are authenticated here too: the token checked against the API server's
signing keys, then a TokenReview names the pod, and the cache maps it to exactly one
FineTuneJob. The progress server calls that from its own thread (server.py): the token check
runs there, its API calls and the pod check on the controller's loop (`self.loop`, loops.py).
"""

from __future__ import annotations

import asyncio
import logging

from kubetune.api.contract import ProgressEvent
from kubetune.kube import Kube, core_path, job_path
from kubetune_operator import builders, names
from kubetune_operator.auth import PodIdentity, TokenReviewer
from kubetune_operator.cache import Cache, Key, slim_job, slim_pod
from kubetune_operator.loops import ControllerLoop, KubeOnLoop
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.reconcile import NAME_TAKEN_RETRY_S, Plan, Snapshot, decide
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.workqueue import WorkQueue
from kubetune_operator.writer import EventPoster, StatusWriter, now_rfc3339

logger = logging.getLogger("kubetune.operator")


class Controller:
    def __init__(
        self,
        settings: OperatorSettings,
        kube: Kube,
        metrics: OperatorMetrics,
        loop: ControllerLoop | None = None,
    ) -> None:
        """`loop`: the controller's event loop (by default the running one)."""
        self.settings = settings
        self.kube = kube
        self.metrics = metrics
        self.loop = loop or ControllerLoop(asyncio.get_running_loop())
        self.cache = Cache()
        self.queue = WorkQueue(self.reconcile)
        self.queue.on_handled = self._count_reconcile
        self.events = EventPoster(kube, metrics, slots=settings.workers)
        self.status = StatusWriter(kube, metrics, self.events, settings.patch_interval_s)
        # Used from the progress server's thread: its API calls cross to the controller's loop.
        self.reviewer = TokenReviewer(
            KubeOnLoop(kube, self.loop),  # type: ignore[arg-type]  # request() is all it uses
            settings.progress_audience,
            on_review=metrics.token_reviews.inc,
        )
        metrics.track_phases(self.status.count_phase)

    def start(self) -> None:
        self.queue.start(self.settings.workers)

    async def stop(self, events_grace_s: float = 5.0) -> None:
        await self.queue.stop()
        await self.events.drain(events_grace_s)

    def _count_reconcile(self, ok: bool) -> None:
        self.metrics.reconciles.inc()
        if not ok:
            self.metrics.reconcile_errors.inc()

    # ---- watch events and progress pushes ---------------------------------------------

    def observe_ftj(self, event_type: str | None, body: dict) -> None:
        key, replaced = self.cache.observe_ftj(event_type, body)
        if replaced:  # deleted and created again under the same name
            self.status.forget(key)
            self.queue.forget(key)
        self.queue.add(key)

    def observe_job(self, event_type: str | None, body: dict) -> None:
        if key := self.cache.observe_job(event_type, body):
            self.queue.add(key)

    def observe_pod(self, event_type: str | None, body: dict) -> None:
        if key := self.cache.observe_pod(event_type, body):
            self.queue.add(key)

    def observe_progress(self, key: Key, event: ProgressEvent) -> None:
        if self.cache.observe_progress(key, event):
            self.queue.add(key)

    async def authorize(self, key: Key, token: str) -> bool:
        """Whether `token` is the progress token of a running trainer pod of this very
        FineTuneJob. Called in the progress server's loop: the token is checked there (a
        forged one costs this loop nothing), the pod it names on the controller's loop."""
        identity = await self.reviewer.identify(token)
        if identity is None or identity.namespace != key[0]:
            return False
        return await self.loop.run(self.pod_may_push, key, identity, limited=True)

    async def pod_may_push(self, key: Key, identity: PodIdentity) -> bool:
        """(In the controller's loop.) Whether the pod of a genuine token is a running trainer
        pod of this FineTuneJob."""
        pod = self.cache.pod(identity.pod_uid) or await self._fetch_pod(
            identity.namespace, identity.pod_name
        )
        if pod is None:
            return False
        job = self.cache.jobs.get((key[0], names.pod_job_name(pod) or ""))
        entry = self.cache.ftjs.get(key)
        return progress_allowed(identity.pod_uid, pod, job, entry.raw if entry else None)

    def hand_over_progress(self, key: Key, event: ProgressEvent) -> None:
        """An accepted push, from the progress server's loop: recorded on the controller's."""
        self.loop.post(self.observe_progress, key, event)

    async def _fetch_pod(self, namespace: str, name: str) -> dict | None:
        """A pod the watch has not brought yet (a push right after the pod started)."""
        pod = await self.kube.get(core_path("pods", namespace, name))
        return slim_pod(pod) if pod else None

    # ---- reconcile --------------------------------------------------------------------

    def snapshot(self, key: Key) -> Snapshot:
        entry = self.cache.ftjs.get(key)
        job = self.cache.jobs.get((key[0], names.job_name(key[1])))
        return Snapshot(
            key=key,
            ftj=entry.raw if entry else None,
            parsed=entry.parsed if entry else None,
            deleted=key in self.cache.deleted,
            job=job,
            pods=self.cache.job_pods(job) if job else [],
            ended_pods=self.cache.ended_job_pods(job) if job else [],
            progress=self.cache.progress.get(key),
            written=self.status.written.get(key),
        )

    async def reconcile(self, key: Key) -> None:
        plan = decide(self.snapshot(key), self.settings, now_rfc3339())
        if plan.create_job is not None:
            if not await self._create_job(key, plan.create_job):
                return
            plan = decide(self.snapshot(key), self.settings, now_rfc3339())
        await self._carry_out(key, plan)

    async def _carry_out(self, key: Key, plan: Plan) -> None:
        if plan.forget:
            self.cache.forget(key)
            self.status.forget(key)
            self.queue.forget(key)
        if plan.delete_job:
            # The FineTuneJob is gone, or ran past its deadline: its Job goes now, pods included.
            await self.kube.delete(job_path(key[0], plan.delete_job), propagation="Background")
        if plan.set_suspend is not None:
            await self._set_suspend(key, plan.set_suspend)
        entry = self.cache.ftjs.get(key)  # (gone if deleted while the Job was created)
        if plan.status is not None and entry is not None:
            wait = await self.status.write(key, entry.raw, plan.current, plan.status)
            if wait:
                self.queue.add(key, wait)
        if plan.requeue_after:
            self.queue.add(key, plan.requeue_after)

    async def _create_job(self, key: Key, manifest: dict) -> bool:
        """Create the Job (or find the one already there) and put it in the cache; False
        when there is none to go on with yet."""
        for child in (
            builders.build_gang_network_policy(manifest),
            builders.build_service(manifest),
        ):
            if child is not None:
                await self.kube.create_quietly(child)  # one that exists already is fine
        created, was_created = await self.kube.create(manifest)
        if was_created and created:
            self.metrics.jobs_created.inc()
            logger.info("created Job", extra={"namespace": key[0], "finetunejob": key[1]})
            job = created
        else:
            # An earlier attempt's, or an earlier FineTuneJob's (decide tells which).
            job = await self.kube.get(job_path(key[0], manifest["metadata"]["name"]))
            if job is None:
                self.queue.add(key, NAME_TAKEN_RETRY_S)  # deleted in between
                return False
        job_key = (key[0], job["metadata"]["name"])
        self.cache.jobs.setdefault(job_key, slim_job(job))  # the watch brings newer versions
        return True

    async def _set_suspend(self, key: Key, suspend: bool) -> None:
        name = names.job_name(key[1])
        patched = await self.kube.merge_patch(
            job_path(key[0], name), {"spec": {"suspend": suspend}}
        )
        if patched:
            self.cache.jobs[(key[0], name)] = slim_job(patched)


def progress_allowed(pod_uid: str, pod: dict, job: dict | None, ftj: dict | None) -> bool:
    """The push's pod is the one its token is bound to, its Job's, whose owner is this
    FineTuneJob; and it is still running: a token replayed after its pod finished opens
    nothing, although the API server still vouches for it while the pod object exists."""
    if pod["metadata"].get("uid") != pod_uid or job is None or ftj is None:
        return False
    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return False
    job_owner, pod_owner = names.controller_owner(job), names.controller_owner(pod, "Job")
    return bool(
        job_owner
        and pod_owner
        and pod_owner.get("uid") == job["metadata"].get("uid")
        and job_owner.get("uid") == ftj["metadata"].get("uid")
    )
