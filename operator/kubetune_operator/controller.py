"""The reconciler: watch events in, idempotent API calls and status patches out.

kopf delivers watch events for FineTuneJobs, their Jobs and their pods (handlers.py);
this keeps the latest of each in memory and runs a work queue of FineTuneJob keys, level
triggered like a controller-runtime reconciler: whatever the event, a reconcile looks at
everything known about the FineTuneJob, creates what is missing, and writes the status
`derive_status()` computes. A restarted operator relists, finds the Jobs by their
deterministic names and carries on; it never creates a second Job for a FineTuneJob.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import socket
import time
from datetime import UTC, datetime

from kubetune.api import v1alpha1 as api
from kubetune.api.contract import ProgressEvent
from kubetune.kube import Kube, core_path, ftj_path, job_path
from kubetune_operator import builders, names, status, validation
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.settings import OperatorSettings

logger = logging.getLogger("kubetune.operator")

Key = tuple[str, str]  # (namespace, FineTuneJob name)
WARNING_REASONS = frozenset(
    {
        "Unschedulable",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "SecretNotFound",
        "SecretKeyMissing",
        "JobNameTaken",
    }
)
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _controller_owner(obj: dict, kind: str) -> dict | None:
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == kind and ref.get("controller"):
            return ref
    return None


def slim_pod(pod: dict) -> dict:
    """What status derivation reads from a pod; the rest is not kept in memory."""
    meta = pod.get("metadata", {})
    keep = ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "labels")
    containers = (pod.get("spec") or {}).get("containers") or []
    return {
        "metadata": {k: meta[k] for k in keep if k in meta}
        | {"ownerReferences": meta.get("ownerReferences") or []},
        "spec": {
            "containers": [{"name": c.get("name"), "image": c.get("image")} for c in containers]
        },
        "status": pod.get("status") or {},
    }


def slim_job(job: dict) -> dict:
    meta = job.get("metadata", {})
    keep = ("name", "namespace", "uid", "annotations", "labels", "ownerReferences", "generation")
    return {
        "metadata": {k: meta[k] for k in keep if k in meta},
        "spec": {"suspend": (job.get("spec") or {}).get("suspend", False)},
        "status": job.get("status") or {},
    }


class Controller:
    def __init__(self, settings: OperatorSettings, kube: Kube, metrics: OperatorMetrics) -> None:
        self.settings = settings
        self.kube = kube
        self.metrics = metrics
        self.ftjs: dict[Key, dict] = {}
        self.jobs: dict[Key, dict] = {}  # by (namespace, Job name)
        self.pods: dict[Key, dict[str, dict]] = {}  # (namespace, Job name) -> uid -> pod
        self.progress: dict[Key, dict] = {}
        self.written: dict[Key, dict] = {}  # the status last written, per FineTuneJob
        self.last_patch: dict[Key, float] = {}
        self.tokens: dict[Key, str] = {}
        # FineTuneJobs whose deletion was seen. Only these get their Job deleted at once: a
        # FineTuneJob merely not seen yet (e.g. a Job event that arrives before the first
        # FineTuneJob list after a restart) must never cost a running trainer its Job.
        self.deleted: set[Key] = set()
        self.failures: dict[Key, int] = {}
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._dirty: set[Key] = set()
        self._busy: set[Key] = set()
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._workers: list[asyncio.Task] = []
        # Events are posted beside the reconciles, not in their way (at most `workers` at once).
        self._event_tasks: set[asyncio.Task] = set()
        self._event_slots = asyncio.Semaphore(settings.workers)
        self._instance = socket.gethostname()
        metrics.track_phases(self.count_phase)

    # ---- queue ------------------------------------------------------------------------

    def enqueue(self, key: Key, delay: float = 0.0) -> None:
        if delay > 0:
            loop = asyncio.get_running_loop()
            timer = self._timers.get(key)
            due = loop.time() + delay
            if timer is not None and timer.when() <= due:
                return  # an earlier wake-up is already set
            if timer is not None:
                timer.cancel()
            self._timers[key] = loop.call_at(due, self._wake, key)
            return
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._busy:
            self._queue.put_nowait(key)

    def _wake(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.enqueue(key)

    def start(self) -> None:
        for i in range(self.settings.workers):
            self._workers.append(asyncio.create_task(self._work(), name=f"reconcile-{i}"))

    async def stop(self, events_grace_s: float = 5.0) -> None:
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for timer in self._timers.values():
            timer.cancel()
        if self._event_tasks:  # let the Events already decided on go out, briefly
            _, late = await asyncio.wait(self._event_tasks, timeout=events_grace_s)
            for task in late:
                task.cancel()

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._dirty.discard(key)
            self._busy.add(key)
            try:
                self.metrics.reconciles.inc()
                await self.reconcile(key)
                self.failures.pop(key, None)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.metrics.reconcile_errors.inc()
                count = self.failures[key] = self.failures.get(key, 0) + 1
                delay = RETRY_DELAYS[min(count, len(RETRY_DELAYS)) - 1]
                logger.exception(
                    "reconcile failed; retrying in %.0f s",
                    delay,
                    extra={"namespace": key[0], "finetunejob": key[1]},
                )
                self.enqueue(key, delay)
            finally:
                self._busy.discard(key)
                if key in self._dirty:
                    self._queue.put_nowait(key)

    # ---- watch events -----------------------------------------------------------------

    def observe_ftj(self, event_type: str | None, body: dict) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event_type == "DELETED":
            self.ftjs.pop(key, None)
            self.deleted.add(key)
            self.enqueue(key)
            return
        self.deleted.discard(key)
        old = self.ftjs.get(key)
        if old and old["metadata"].get("uid") != body["metadata"].get("uid"):
            self._forget(key)  # deleted and created again under the same name
        self.ftjs[key] = body
        self.enqueue(key)

    def observe_job(self, event_type: str | None, body: dict) -> None:
        meta = body["metadata"]
        job_key = (meta["namespace"], meta["name"])
        if event_type == "DELETED":
            if self.jobs.get(job_key, {}).get("metadata", {}).get("uid") == meta.get("uid"):
                self.jobs.pop(job_key, None)
        else:
            self.jobs[job_key] = slim_job(body)
        owner = _controller_owner(body, api.KIND)
        if owner:
            self.enqueue((meta["namespace"], owner["name"]))

    def observe_pod(self, event_type: str | None, body: dict) -> None:
        meta = body["metadata"]
        job = (meta.get("labels") or {}).get("batch.kubernetes.io/job-name") or (
            meta.get("labels") or {}
        ).get("job-name")
        if not job:
            return
        job_key = (meta["namespace"], job)
        pods = self.pods.setdefault(job_key, {})
        if event_type == "DELETED":
            pods.pop(meta["uid"], None)
            if not pods:
                self.pods.pop(job_key, None)
        else:
            pods[meta["uid"]] = slim_pod(body)
        owner = _controller_owner(self.jobs.get(job_key, {}), api.KIND)
        ftj_name = (
            owner["name"] if owner else (meta.get("labels") or {}).get(names.LABEL_FINETUNEJOB)
        )
        if ftj_name:
            self.enqueue((meta["namespace"], ftj_name))

    def observe_progress(self, key: Key, event: ProgressEvent) -> None:
        if key not in self.ftjs:
            return
        merged = self.progress.setdefault(key, {})
        data = event.model_dump(exclude_none=True)
        merged.update({k: v for k, v in data.items() if k not in ("event", "time", "message")})
        merged["updatedAt"] = event.time
        merged["lastEvent"] = event.event
        self.enqueue(key)

    def _forget(self, key: Key) -> None:
        for store in (self.progress, self.written, self.last_patch, self.tokens, self.failures):
            store.pop(key, None)

    def count_phase(self, phase: str) -> int:
        return sum(1 for s in self.written.values() if s.get("phase") == phase)

    async def lookup_token(self, key: Key) -> str | None:
        """The progress token of a FineTuneJob (cached; read from its Secret once)."""
        if key in self.tokens:
            return self.tokens[key]
        if key not in self.ftjs:
            return None
        secret = await self.kube.get(core_path("secrets", key[0], names.token_secret_name(key[1])))
        if not secret or names.TOKEN_KEY not in (secret.get("data") or {}):
            return None
        token = base64.b64decode(secret["data"][names.TOKEN_KEY]).decode()
        self.tokens[key] = token
        return token

    # ---- reconcile --------------------------------------------------------------------

    async def reconcile(self, key: Key) -> None:
        ftj = self.ftjs.get(key)
        if ftj is None:
            if key in self.deleted:
                self.deleted.discard(key)
                await self._cleanup(key)
            return
        if ftj["metadata"].get("deletionTimestamp"):
            return
        namespace, name = key
        current = self.written.get(key)
        if current is None:
            current = ftj.get("status") or {}
        observed_ftj = {**ftj, "status": current}
        spec = ftj["spec"]
        job_key = (namespace, names.job_name(name))
        job = self.jobs.get(job_key)
        problem: validation.Problem | None = None

        if job is not None:
            owner = _controller_owner(job, api.KIND)
            if not owner or owner.get("uid") != ftj["metadata"]["uid"]:
                # A Job of an earlier FineTuneJob of the same name, still being deleted.
                problem = validation.Problem(
                    "Pending",
                    "JobNameTaken",
                    f"waiting for Job {job_key[1]} (not owned by this FineTuneJob) to go away",
                )
                job = None
                self.enqueue(key, 5.0)

        finished = current.get("phase") in api.TERMINAL_PHASES and current.get("jobName")
        if job is None and problem is None and not finished:
            problem, secret_keys = await self._validate(ftj)
            if problem is None:
                job = await self._create_children(ftj, secret_keys)
            elif problem.phase == "Pending":
                self.enqueue(key, self.settings.requeue_pending_s)

        changed: list[str] | None = None  # unknown until the Job is seen
        if job is not None:
            await self._sync_suspend(ftj, job)
            recorded = (job["metadata"].get("annotations") or {}).get(names.ANNOTATION_SPEC_HASHES)
            changed = builders.changed_fields(json.loads(recorded), spec) if recorded else []

        pods = []
        if job is not None:
            job_uid = job["metadata"].get("uid")
            pods = [
                p
                for p in self.pods.get(job_key, {}).values()
                if any(r.get("uid") == job_uid for r in p["metadata"].get("ownerReferences", []))
                or not job_uid
            ]
        observed = status.Observed(
            ftj=observed_ftj,
            job=job,
            pods=pods,
            progress=self.progress.get(key),
            problem=problem,
            changed_fields=changed,
        )
        desired = status.derive_status(observed, now_rfc3339())
        await self._write_status(key, ftj, current, desired)

    async def _validate(
        self, ftj: dict
    ) -> tuple[validation.Problem | None, dict[str, frozenset[str]]]:
        spec, namespace = ftj["spec"], ftj["metadata"]["namespace"]
        first = validation.check_uris(spec, self.settings) or validation.check_gpus(
            spec, self.settings
        )
        if first:
            return first, {}
        found: dict[str, frozenset[str]] = {}
        for secret_name in validation.referenced_secrets(spec, self.settings):
            secret = await self.kube.get(core_path("secrets", namespace, secret_name))
            if secret is not None:
                found[secret_name] = frozenset((secret.get("data") or {}).keys())
        return validation.check_secrets(spec, found, self.settings), found

    async def _create_children(
        self, ftj: dict, secret_keys: dict[str, frozenset[str]]
    ) -> dict | None:
        namespace, name = ftj["metadata"]["namespace"], ftj["metadata"]["name"]
        key = (namespace, name)
        creds = builders.credentials_secret(ftj["spec"], self.settings)
        keys = secret_keys.get(creds) if creds else None
        token = self.tokens.get(key) or secrets.token_urlsafe(32)
        children = builders.build_children(ftj, self.settings, token, keys)
        inputs = (
            self.kube.create_quietly(children.config_map),
            self.kube.create_quietly(children.token_secret),
        )
        # (An existing ConfigMap, an earlier attempt's, is as good as a new one.)
        if children.job["spec"].get("suspend"):
            # A suspended Job has no pod to need its ConfigMap and Secret yet: all three
            # at once, one round trip instead of two.
            _, secret_created, (created, was_created) = await asyncio.gather(
                *inputs, self.kube.create(children.job)
            )
        else:
            # A running Job's pod mounts both; it must not start before they exist.
            _, secret_created = await asyncio.gather(*inputs)
            created, was_created = await self.kube.create(children.job)
        if secret_created:
            self.tokens[key] = token
        else:
            self.tokens.pop(key, None)  # an earlier operator's token: read it when needed
        if was_created and created:
            self.metrics.jobs_created.inc()
            logger.info("created Job", extra={"namespace": namespace, "finetunejob": name})
            job = slim_job(created)
        else:
            existing = await self.kube.get(job_path(namespace, names.job_name(name)))
            if existing is None:
                return None  # deleted in between: the next event brings us back
            job = slim_job(existing)
            owner = _controller_owner(existing, api.KIND)
            if not owner or owner.get("uid") != ftj["metadata"]["uid"]:
                self.enqueue(key, 5.0)
                return None
        job_key = (namespace, job["metadata"]["name"])
        self.jobs.setdefault(job_key, job)  # the watch will bring newer versions
        return self.jobs[job_key]

    async def _sync_suspend(self, ftj: dict, job: dict) -> None:
        conds = {
            c.get("type")
            for c in (job.get("status") or {}).get("conditions") or []
            if c.get("status") == "True"
        }
        if conds & {"Complete", "Failed", "FailureTarget", "SuccessCriteriaMet"}:
            return
        want = bool(ftj["spec"].get("suspend"))
        have = bool(job["spec"].get("suspend"))
        if want == have:
            return
        if not want and names.queue_name(ftj):
            return  # Kueue decides when a queued Job runs; never unsuspend it ourselves
        meta = job["metadata"]
        patched = await self.kube.merge_patch(
            job_path(meta["namespace"], meta["name"]), {"spec": {"suspend": want}}
        )
        if patched:
            self.jobs[(meta["namespace"], meta["name"])] = slim_job(patched)
            job["spec"]["suspend"] = want

    async def _write_status(self, key: Key, ftj: dict, current: dict, desired: dict) -> None:
        if desired == current:
            return
        loop_now = time.monotonic()
        if not status.needs_immediate_patch(current, desired):
            wait = self.last_patch.get(key, 0.0) + self.settings.patch_interval_s - loop_now
            if wait > 0:
                self.enqueue(key, wait)  # coalesce progress: at most one patch per interval
                return
        patch = status.merge_patch(current, desired)
        namespace, name = key
        path = ftj_path(namespace, name, "status")
        if not await self.kube.merge_patch_quietly(path, {"status": patch}):
            return  # deleted meanwhile
        self.metrics.status_patches.inc()
        self.last_patch[key] = loop_now
        self.written[key] = desired
        if (current.get("phase"), current.get("reason")) != (
            desired.get("phase"),
            desired.get("reason"),
        ):
            task = asyncio.create_task(self._post_event(ftj, desired))
            self._event_tasks.add(task)
            task.add_done_callback(self._event_tasks.discard)

    async def _post_event(self, ftj: dict, desired: dict) -> None:
        phase, reason = desired.get("phase"), desired.get("reason") or desired.get("phase")
        warning = phase == "Failed" or reason in WARNING_REASONS
        stamp = now_rfc3339()
        meta = ftj["metadata"]
        event = {
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
            "reportingInstance": self._instance,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            async with self._event_slots:
                await self.kube.create_quietly(event)
        except Exception:  # an event is a courtesy: never fail a reconcile on it
            logger.warning("could not post event", exc_info=True)

    async def _cleanup(self, key: Key) -> None:
        """The FineTuneJob is gone: delete its Job now, pods included (the rest by GC)."""
        namespace, name = key
        self._forget(key)
        timer = self._timers.pop(key, None)
        if timer:
            timer.cancel()
        job_key = (namespace, names.job_name(name))
        if job_key in self.jobs:
            await self.kube.delete(job_path(*job_key), propagation="Background")
