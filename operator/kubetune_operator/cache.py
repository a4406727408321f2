"""The operator's view of the cluster: the latest FineTuneJobs, their Jobs and pods, as the
watches deliver them, and the progress the trainers pushed. Nothing here calls the API.

Each FineTuneJob is validated into the typed model once per event (`parsed`), so the rest of
the operator never reads a raw spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from kubetune.api import contract
from kubetune.api import v1alpha1 as api
from kubetune.api.contract import ProgressEvent, Reason
from kubetune_operator import names
from kubetune_operator.settings import describe_error
from kubetune_operator.validation import Problem, largest_field

Key = tuple[str, str]  # (namespace, name)


def slim_pod(pod: dict) -> dict:
    """What status derivation and progress authentication read from a pod; the rest is not
    kept in memory."""
    meta = pod.get("metadata", {})
    keep = ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "labels")
    containers = (pod.get("spec") or {}).get("containers") or []
    return {
        "metadata": {k: meta[k] for k in keep if k in meta}
        | {"ownerReferences": meta.get("ownerReferences") or []},
        "spec": {
            "containers": [{"name": c.get("name"), "image": c.get("image")} for c in containers]
        }
        # The node, to name it when it is lost.
        | ({"nodeName": node} if (node := (pod.get("spec") or {}).get("nodeName")) else {}),
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


def slim_ftj(ftj: dict) -> dict:
    """What the reconcile reads from the raw FineTuneJob besides the parsed spec: identity,
    generation, deletion and the status. Not the spec (the parsed model holds it once), nor
    managedFields or `kubectl apply`'s last-applied annotation, each about as large again."""
    meta = ftj.get("metadata", {})
    keep = (
        "name",
        "namespace",
        "uid",
        "generation",
        "resourceVersion",
        "creationTimestamp",
        "deletionTimestamp",
        "labels",
    )
    return {"metadata": {k: meta[k] for k in keep if k in meta}, "status": ftj.get("status") or {}}


def parse(ftj: dict) -> api.FineTuneJob | Problem:
    """The typed FineTuneJob, or why the API server's object does not validate (an older CRD
    or a field the models reject that the schema let through). A spec larger than the pod
    annotation that carries it to the trainer can never run: refused here, unparsed, so such
    objects (up to etcd's 1.5 MiB each, through the free-form JSON Schema of
    evaluation.format, which no CRD rule can size) cost the operator's memory nothing."""
    meta = ftj["metadata"]
    spec = ftj.get("spec") or {}
    size = len(json.dumps(spec, separators=(",", ":"), ensure_ascii=False).encode())
    if size > contract.JOB_ANNOTATION_BUDGET:
        return Problem(
            "Failed",
            Reason.SPEC_TOO_LARGE,
            f"the spec takes {size} bytes, more than the {contract.JOB_ANNOTATION_BUDGET} a pod "
            f"annotation can carry to the trainer; shorten {largest_field(spec, 'spec')}",
        )
    try:
        return api.FineTuneJob.model_validate(
            {
                "metadata": {
                    k: meta[k]
                    for k in ("name", "namespace", "uid", "generation", "labels")
                    if meta.get(k) is not None
                },
                "spec": ftj.get("spec") or {},
            }
        )
    except ValidationError as exc:
        return Problem("Failed", Reason.INVALID_SPEC, describe_error(exc, first_only=True))


@dataclass
class Entry:
    """One FineTuneJob as last watched."""

    raw: dict[str, Any]
    parsed: api.FineTuneJob | Problem


@dataclass
class Cache:
    ftjs: dict[Key, Entry] = field(default_factory=dict)
    jobs: dict[Key, dict] = field(default_factory=dict)  # by (namespace, Job name)
    pods: dict[Key, dict[str, dict]] = field(default_factory=dict)  # Job key -> uid -> pod
    pod_jobs: dict[str, Key] = field(default_factory=dict)  # pod uid -> Job key
    progress: dict[Key, dict] = field(default_factory=dict)
    # FineTuneJobs whose deletion was seen. Only these get their Job deleted at once: a
    # FineTuneJob merely not seen yet (e.g. a Job event that arrives before the first
    # FineTuneJob list after a restart) must never cost a running trainer its Job.
    deleted: set[Key] = field(default_factory=set)
    # The last state of trainer pods deleted after they ended (Job key -> uid -> pod): a
    # suspended Job's pod can end and be deleted between two reconciles, and its exit code
    # (5: stopped with its step saved) is only in its last state.
    ended_pods: dict[Key, dict[str, dict]] = field(default_factory=dict)

    def observe_ftj(self, event_type: str | None, body: dict) -> tuple[Key, bool]:
        """Record a FineTuneJob event: (its key, whether it was replaced by a new object of
        the same name, so that what was known about the old one must be forgotten)."""
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event_type == "DELETED":
            self.ftjs.pop(key, None)
            self.deleted.add(key)
            return key, False
        self.deleted.discard(key)
        old = self.ftjs.get(key)
        replaced = bool(old and old.raw["metadata"].get("uid") != body["metadata"].get("uid"))
        if replaced:
            self.progress.pop(key, None)
        self.ftjs[key] = Entry(slim_ftj(body), parse(body))
        return key, replaced

    def observe_job(self, event_type: str | None, body: dict) -> Key | None:
        """Record a Job event; the key of its FineTuneJob, if it has one."""
        meta = body["metadata"]
        job_key = (meta["namespace"], meta["name"])
        if event_type == "DELETED":
            if self.jobs.get(job_key, {}).get("metadata", {}).get("uid") == meta.get("uid"):
                self.jobs.pop(job_key, None)
                self.ended_pods.pop(job_key, None)
        else:
            self.jobs[job_key] = slim_job(body)
        owner = names.controller_owner(body)
        return (meta["namespace"], owner["name"]) if owner else None

    def observe_pod(self, event_type: str | None, body: dict) -> Key | None:
        """Record a pod event; the key of the FineTuneJob its Job belongs to, if known."""
        meta = body["metadata"]
        job = names.pod_job_name(body)
        if not job:
            return None
        job_key = (meta["namespace"], job)
        pods = self.pods.setdefault(job_key, {})
        if event_type == "DELETED":
            pods.pop(meta["uid"], None)
            self.pod_jobs.pop(meta["uid"], None)
            if not pods:
                self.pods.pop(job_key, None)
            if _trainer_ended(body):
                ended = self.ended_pods.setdefault(job_key, {})
                ended[meta["uid"]] = slim_pod(body)
                for uid in list(ended)[: -api.MAX_ATTEMPTS_SHOWN]:
                    del ended[uid]
        else:
            pods[meta["uid"]] = slim_pod(body)
            self.pod_jobs[meta["uid"]] = job_key
        owner = names.controller_owner(self.jobs.get(job_key, {}))
        labels = meta.get("labels") or {}
        ftj_name = owner["name"] if owner else labels.get(names.LABEL_FINETUNEJOB)
        return (meta["namespace"], ftj_name) if ftj_name else None

    def observe_progress(self, key: Key, event: ProgressEvent) -> bool:
        """Merge a pushed event into the job's latest progress; False when nothing changed
        (an unknown job, or an event older than what is merged)."""
        if key not in self.ftjs:
            return False
        merged = self.progress.setdefault(key, {})
        if event.event in ("started", "resumed"):
            # When each attempt began and from which step: status.attempts places them by time.
            starts = merged.setdefault(contract.PROGRESS_STARTS, [])
            starts.append({"at": event.time, "step": event.resumedFromStep or 0})
            del starts[: -api.MAX_ATTEMPTS_SHOWN]
        if _older(event.time, merged.get("updatedAt")):
            # Pushes are handled concurrently: one held up (its token review slow while the
            # API server recovers) can land after a newer one. Its numbers are stale.
            return event.event in ("started", "resumed")
        data = event.model_dump(exclude_none=True)
        if event.event == "checkpoint":
            # Sent when the upload is done, while training has moved on: its step is the
            # checkpoint's, not how far training is, and must not move progress back.
            data.pop("step", None)
        merged.update({k: v for k, v in data.items() if k not in ("event", "time", "message")})
        merged["updatedAt"] = event.time
        merged["lastEvent"] = event.event
        return True

    def pod(self, uid: str) -> dict | None:
        job_key = self.pod_jobs.get(uid)
        return self.pods.get(job_key, {}).get(uid) if job_key else None

    def job_pods(self, job: dict) -> list[dict]:
        """The pods of this very Job (not of an earlier Job of the same name)."""
        meta = job["metadata"]
        pods = self.pods.get((meta["namespace"], meta["name"]), {}).values()
        uid = meta.get("uid")
        return [p for p in pods if not uid or _owned_by(p, uid)]

    def ended_job_pods(self, job: dict) -> list[dict]:
        """The last state of this Job's pods that ended and are deleted."""
        meta = job["metadata"]
        pods = self.ended_pods.get((meta["namespace"], meta["name"]), {}).values()
        uid = meta.get("uid")
        return [p for p in pods if not uid or _owned_by(p, uid)]

    def forget(self, key: Key) -> None:
        self.progress.pop(key, None)
        self.deleted.discard(key)


def _trainer_ended(pod: dict) -> bool:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return any(
        s.get("name") == names.TRAINER_CONTAINER and "terminated" in (s.get("state") or {})
        for s in statuses
    )


def _older(stamp: str, than: str | None) -> bool:
    if not than:
        return False
    try:
        return _instant(stamp) < _instant(than)
    except ValueError:
        return False  # not a time we can compare: take the event as it comes


def _instant(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _owned_by(obj: dict, uid: str) -> bool:
    return any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])
