"""The reconcile decision, as a pure function: what is known about one FineTuneJob in, what to
do about it out. The controller gathers the Snapshot from its cache and carries out the Plan;
tests/operator/test_reconcile.py checks every decision without a cluster.

Level-triggered: whatever the event, the decision looks at everything known, so a restarted
operator that relists finds the Job by its deterministic name and carries on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from kubetune.api.contract import Reason
from kubetune.api.v1alpha1 import TERMINAL_PHASES, FineTuneJob, FineTuneJobStatus
from kubetune_operator import builders, grace, names, status, validation
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.validation import Problem

Key = tuple[str, str]
# How soon to look again while a Job of an earlier FineTuneJob of the same name goes away.
NAME_TAKEN_RETRY_S = 5.0
_JOB_FINISHED = frozenset({"Complete", "Failed", "FailureTarget", "SuccessCriteriaMet"})


@dataclass(frozen=True)
class Snapshot:
    """Everything the operator knows about one FineTuneJob at one moment."""

    key: Key
    ftj: dict[str, Any] | None  # as watched; None when gone (or not seen yet)
    parsed: FineTuneJob | Problem | None = None  # the typed model, or why it does not validate
    deleted: bool = False  # its deletion was seen
    job: dict[str, Any] | None = None  # the Job of its deterministic name
    pods: list[dict[str, Any]] = field(default_factory=list)  # that Job's pods
    # The last state of that Job's pods that ended and were deleted (status.attempts only).
    ended_pods: list[dict[str, Any]] = field(default_factory=list)
    progress: dict[str, Any] | None = None
    written: dict[str, Any] | None = None  # the status this operator last wrote


@dataclass(frozen=True)
class Plan:
    """What to do, in this order. Empty: nothing."""

    delete_job: str | None = None  # name of the Job to delete (its FineTuneJob is gone)
    create_job: dict[str, Any] | None = None  # then decide again with the Job created
    set_suspend: bool | None = None  # the Job's spec.suspend to patch
    status: dict[str, Any] | None = None  # the desired status, when it differs
    current: dict[str, Any] = field(default_factory=dict)  # the status it replaces
    requeue_after: float | None = None
    forget: bool = False  # drop what is remembered about the key


def decide(snap: Snapshot, settings: OperatorSettings, now: str) -> Plan:
    if snap.ftj is None:
        if not snap.deleted:
            return Plan()  # not seen yet: never touch a Job on a guess
        return Plan(delete_job=snap.job["metadata"]["name"] if snap.job else None, forget=True)
    if snap.ftj["metadata"].get("deletionTimestamp"):
        return Plan()
    current = snap.written if snap.written is not None else snap.ftj.get("status") or {}
    if isinstance(snap.parsed, Problem):  # the object does not validate: say so, do nothing
        return _with_status(Plan(current=current), _invalid_status(snap, current, snap.parsed))
    ftj = snap.parsed
    assert ftj is not None
    job, problem, requeue = snap.job, None, None
    if job is not None and not _owned_by(job, ftj):
        # A Job of an earlier FineTuneJob of the same name, still being deleted.
        problem = Problem(
            "Pending",
            Reason.JOB_NAME_TAKEN,
            f"waiting for Job {job['metadata']['name']} (not owned by this FineTuneJob) to go away",
        )
        job, requeue = None, NAME_TAKEN_RETRY_S
    finished = current.get("phase") in TERMINAL_PHASES and current.get("jobName")
    if job is None and problem is None and not finished:
        problem = validation.validate(ftj, settings)
        if problem is None:
            manifest = builders.build_job(ftj, settings)
            problem = validation.check_size(ftj, manifest)
            if problem is None:
                return Plan(create_job=manifest)
    observed = status.Observed(
        ftj=ftj,
        previous=current,
        job=job,
        pods=snap.pods if job is not None else [],
        ended_pods=snap.ended_pods if job is not None else [],
        progress=snap.progress,
        problem=problem,
        changed_fields=changed_fields(ftj, job),
        gpu_hour_price=settings.gpu_hour_price,
        currency=settings.currency,
        grace_too_short=grace.grace_too_short(ftj.spec, settings),
    )
    plan = Plan(
        set_suspend=desired_suspend(ftj, job) if job is not None else None,
        current=current,
        requeue_after=requeue,
    )
    desired = status.derive_status(observed, now)
    if job is not None and _ended_by_the_operator(desired, job):
        # The operator ended the job (its deadline over all attempts, a full work dir): stop
        # its trainer.
        plan = replace(plan, delete_job=job["metadata"]["name"], set_suspend=None)
    return _with_status(plan, desired.wire())


# Failures the operator decides while the Job still runs: the Job itself would not end it.
_OPERATOR_ENDED = (Reason.DEADLINE_EXCEEDED, Reason.WORK_DIR_FULL)


def _ended_by_the_operator(desired: FineTuneJobStatus, job: dict) -> bool:
    """The status says Failed for a reason the operator enforces (the deadline over all
    attempts, not the Job's own; a work dir past its size) while the Job has not finished."""
    if desired.phase != "Failed" or desired.reason not in _OPERATOR_ENDED:
        return False
    conditions = (job.get("status") or {}).get("conditions") or []
    return not any(c.get("type") in _JOB_FINISHED and c.get("status") == "True" for c in conditions)


def _with_status(plan: Plan, desired: dict[str, Any]) -> Plan:
    """The plan, writing `desired` unless it is what the status already says."""
    return replace(plan, status=desired) if desired != plan.current else plan


def _invalid_status(snap: Snapshot, current: dict, problem: Problem) -> dict[str, Any]:
    generation = snap.ftj["metadata"].get("generation") if snap.ftj else None
    return FineTuneJobStatus(
        jobName=current.get("jobName"),
        startTime=current.get("startTime"),
        phase=problem.phase,
        reason=problem.reason,
        message=problem.message,
        observedGeneration=generation,
    ).wire()


def changed_fields(ftj: FineTuneJob, job: dict | None) -> list[str] | None:
    """Spec fields changed since the Job was made; None while no Job is seen (unknown)."""
    if job is None:
        return None
    recorded = (job["metadata"].get("annotations") or {}).get(names.ANNOTATION_SPEC_HASHES)
    return (
        builders.changed_fields(json.loads(recorded), builders.spec_dict(ftj)) if recorded else []
    )


def desired_suspend(ftj: FineTuneJob, job: dict) -> bool | None:
    """The Job's spec.suspend to set, or None to leave it."""
    conditions = (job.get("status") or {}).get("conditions") or []
    if any(c.get("type") in _JOB_FINISHED and c.get("status") == "True" for c in conditions):
        return None
    want, have = ftj.spec.suspend, bool(job["spec"].get("suspend"))
    if want == have or (not want and names.queue_name(ftj)):
        return None  # Kueue decides when a queued Job runs; never unsuspend it ourselves
    return want


def _owned_by(job: dict, ftj: FineTuneJob) -> bool:
    owner = names.controller_owner(job)
    return bool(owner and owner.get("uid") == ftj.metadata.uid)
