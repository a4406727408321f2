"""Derive a FineTuneJob's status from what is observed, as a pure function.

    desired = derive_status(Observed(ftj=..., job=..., pods=..., progress=...), now)

The FineTuneJob comes in validated (typed), its Job and pods as the API server's JSON;
nothing is fetched here, so every case (queued, unschedulable, a missing Secret, OOMKilled,
bad input, deadline, success with the trainer's result) is unit-tested on hand-made objects.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from kubetune.api import contract
from kubetune.api.contract import Condition, Reason
from kubetune.api.v1alpha1 import (
    MAX_ATTEMPTS_SHOWN,
    TERMINAL_PHASES,
    FineTuneJob,
    FineTuneJobStatus,
)
from kubetune_operator import deadline, gang, names
from kubetune_operator.validation import Problem

# The kubelet's words (CreateContainerConfigError) for a missing Secret or key of a secretKeyRef.
_SECRET_NOT_FOUND = re.compile(r'secrets? "(?P<name>[^"]+)" not found')
_SECRET_KEY_MISSING = re.compile(r"couldn't find key (?P<key>\S+) in Secret [^/\s]+/(?P<name>\S+)")
# The kubelet's eviction message for an emptyDir past its sizeLimit, for the work dir.
_WORK_DIR_EVICTION = re.compile(rf'EmptyDir volume "{contract.WORK_VOLUME}" exceeds the limit')
# DisruptionTarget reasons of a pod removed because its node was lost: the taint manager's
# eviction from a NotReady/unreachable node, the pod GC's on a node gone or out of service.
_NODE_LOST_DISRUPTIONS = ("DeletionByTaintManager", "DeletionByPodGC")
# Status keys whose change is worth a patch at once; progress alone waits for the interval.
# status.attempts changes with the pods (whose changes move the phase or reason anyway) and
# with the trainer's `resumed` event: that one rides on the next progress patch.
_PROGRESS_ONLY = frozenset({"progress", "resumedFromStep", "usage", "attempts"})
# status.progress figures people read (`kubectl get ftj` shows the loss): 4 significant digits
# say all a loss curve needs; 0.6844789981842041 says more than is true and reads badly.
_DISPLAY_FIGURES = ("epoch", "loss", "evalLoss", "learningRate", "tokensPerSecond", "etaSeconds")
DISPLAY_DIGITS = 4


def significant(value: float, digits: int = DISPLAY_DIGITS) -> float:
    """`value` rounded to `digits` significant digits (0.6844789981842041 -> 0.6845)."""
    return float(f"{value:.{digits}g}")


@dataclass(frozen=True)
class Observed:
    """What the operator knows about one FineTuneJob at one moment."""

    ftj: FineTuneJob
    previous: dict[str, Any] = field(default_factory=dict)  # its status as last written
    job: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    # The last state of pods that ended and were deleted: read for status.attempts only.
    ended_pods: list[dict[str, Any]] = field(default_factory=list)
    progress: dict[str, Any] | None = None  # merged ProgressEvent fields, latest wins
    problem: Problem | None = None
    # Spec fields changed since the Job was created; None when unknown (no Job observed yet,
    # e.g. just after an operator restart), which keeps the earlier condition as it was.
    changed_fields: list[str] | None = field(default_factory=list)
    gpu_hour_price: float = 0.0  # the operator's setting, for usage.estimatedCost
    currency: str = "USD"
    # Why a stopped trainer may not fit a checkpoint in its grace period (grace.py), or None.
    grace_too_short: str | None = None


@dataclass(frozen=True)
class Outcome:
    phase: str
    reason: str
    message: str
    result: contract.TrainerResult | None = None


# --- pods ----------------------------------------------------------------------------


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    begin = datetime.fromisoformat(start.replace("Z", "+00:00"))
    finish = datetime.fromisoformat(end.replace("Z", "+00:00"))
    return max(0.0, (finish - begin).total_seconds())


def trainer_seconds(pod: dict, now: str) -> float | None:
    """How long the pod's trainer container has run (so far, or in all)."""
    state = _trainer_status(pod).get("state") or {}
    if "terminated" in state:
        return _seconds_between(
            state["terminated"].get("startedAt"), state["terminated"].get("finishedAt")
        )
    if "running" in state:
        return _seconds_between(state["running"].get("startedAt"), now)
    return None


def _trainer_status(pod: dict) -> dict:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == names.TRAINER_CONTAINER:
            return cs
    return {}


def _terminated(pod: dict) -> dict | None:
    return (_trainer_status(pod).get("state") or {}).get("terminated")


def _pod_time(pod: dict) -> str:
    term = _terminated(pod) or {}
    return term.get("finishedAt") or pod["metadata"].get("creationTimestamp") or ""


def _latest(pods: list[dict], phase: str) -> dict | None:
    matching = [p for p in pods if (p.get("status") or {}).get("phase") == phase]
    return max(matching, key=_pod_time) if matching else None


def parse_result(message: str | None) -> contract.TrainerResult | None:
    """The trainer's TrainerResult from a termination message, or None if it is not one."""
    if not message or not message.lstrip().startswith("{"):
        return None
    try:
        return contract.TrainerResult.model_validate(json.loads(message))
    except (ValueError, ValidationError):
        return None


def _first_line(text: str | None, limit: int = 1024) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:limit]


def _work_dir_limit(pod: dict) -> str | None:
    """The sizeLimit the pod's work dir volume was given (the spec's or the default)."""
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        if volume.get("name") == contract.WORK_VOLUME:
            return (volume.get("emptyDir") or {}).get("sizeLimit")
    return None


def _eviction(pod: dict, work_dir_size: str | None) -> tuple[str, str] | None:
    """(reason, message) of a pod the kubelet evicted; its work dir's limit by name."""
    status = pod.get("status") or {}
    if status.get("reason") != "Evicted":
        return None
    message = (status.get("message") or "").strip()
    if _WORK_DIR_EVICTION.search(message):
        source = "spec.resources.workDirSize" if work_dir_size else "the platform's default"
        limit = work_dir_size or _work_dir_limit(pod)
        return (
            Reason.WORK_DIR_FULL,
            f"the trainer's work dir ({contract.DEFAULT_WORK_DIR}, emptyDir volume "
            f"{contract.WORK_VOLUME!r}) outgrew {source} ({limit}) "
            "and the kubelet evicted the pod: raise spec.resources.workDirSize",
        )
    return Reason.EVICTED, f"the trainer pod was evicted: {message}".strip(": ")


def _pod_failure(
    pod: dict, memory: str | None, work_dir_size: str | None = None
) -> tuple[str, str] | None:
    """(reason, message) of a failed trainer pod, in the user's words."""
    term = _terminated(pod) or {}
    evicted = _eviction(pod, work_dir_size)
    if evicted and evicted[0] == Reason.WORK_DIR_FULL:
        # The job's own work dir outgrew its limit: a retry would fill it again, whether or
        # not the trainer saved its step on the way out.
        return evicted
    if term.get("exitCode") == contract.EXIT_PREEMPTED:
        # Stopped with its checkpoint saved, whatever stopped it (the eviction, if any, adds
        # the cause).
        cause = f" ({evicted[1]})" if evicted else ""
        return Reason.PREEMPTED, (_first_line(term.get("message")) or "preempted") + cause
    # An evicted pod's container shows as killed (137): the eviction is the cause.
    if evicted:
        return evicted
    term = _terminated(pod)
    if not term:
        return None
    code = term.get("exitCode")
    result = parse_result(term.get("message"))
    if code == contract.EXIT_BAD_INPUT:
        text = (result.message if result else None) or _first_line(term.get("message"))
        return Reason.BAD_INPUT, text or "the trainer rejected its input (exit code 3)"
    if code == contract.EXIT_EVAL_THRESHOLDS:
        text = _first_line(term.get("message"))
        return Reason.EVAL_THRESHOLDS_MISSED, text or "the evaluation missed a threshold"
    if code == contract.EXIT_RENDEZVOUS_TIMEOUT:
        text = _first_line(term.get("message"))
        return Reason.RENDEZVOUS_TIMEOUT, text or "the gang's pods did not all reach the rendezvous"
    if term.get("reason") == "OOMKilled":
        limit = f" (memory limit {memory})" if memory else ""
        return (
            Reason.OOM_KILLED,
            f"the trainer ran out of memory{limit}: raise spec.resources.memory or lower "
            "spec.training.batchSize / maxSeqLength",
        )
    if result and result.message:
        return Reason.TRAINER_FAILED, result.message
    tail = _first_line(term.get("message"))
    # "StorageUnavailableError: S3 unavailable: s3://... did not answer for 600 s (...)"
    s3_down = tail.find(contract.S3_UNAVAILABLE_PREFIX)
    if s3_down >= 0:
        return Reason.S3_UNAVAILABLE, tail[s3_down:]
    return Reason.TRAINER_FAILED, f"the trainer exited with code {code}" + (
        f": {tail}" if tail else ""
    )


def secret_fields(ftj: FineTuneJob) -> dict[str, str]:
    """Secret name -> the spec field that names it, for messages."""
    fields = {}
    if ftj.spec.model.tokenSecretRef:
        fields[ftj.spec.model.tokenSecretRef.name] = "spec.model.tokenSecretRef"
    if ftj.spec.output.credentialsSecretRef:
        fields[ftj.spec.output.credentialsSecretRef.name] = "spec.output.credentialsSecretRef"
    return fields


def secret_problem(message: str, ftj: FineTuneJob) -> tuple[str, str] | None:
    """(reason, message) for the kubelet's "Secret or key missing" error, naming both."""
    fields = secret_fields(ftj)

    def where(name: str) -> str:
        return fields.get(name, "the operator's default credentials Secret")

    if match := _SECRET_KEY_MISSING.search(message):
        name, key = match["name"], match["key"]
        return Reason.SECRET_KEY_MISSING, f"{where(name)}: Secret {name!r} has no key {key}"
    if match := _SECRET_NOT_FOUND.search(message):
        name = match["name"]
        return Reason.SECRET_NOT_FOUND, f"{where(name)}: Secret {name!r} not found"
    return None


def _waiting_problem(pods: list[dict], ftj: FineTuneJob) -> tuple[str, str] | None:
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("phase") != "Pending":
            continue
        for cond in status.get("conditions") or []:
            if (
                cond.get("type") == "PodScheduled"
                and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"
            ):
                return (
                    Reason.UNSCHEDULABLE,
                    "the scheduler cannot place the trainer pod: "
                    + (cond.get("message") or "").strip(),
                )
        waiting = (_trainer_status(pod).get("state") or {}).get("waiting") or {}
        if waiting.get("reason") == Reason.CREATE_CONTAINER_CONFIG_ERROR:
            found = secret_problem(waiting.get("message") or "", ftj)
            if found:
                return found
        if waiting.get("reason") in contract.STUCK_WAITING_REASONS:
            detail = waiting.get("message") or ""
            image = ((pod.get("spec") or {}).get("containers") or [{}])[0].get("image", "")
            what = (
                f"image {image}: "
                if "Image" in waiting["reason"] or "Pull" in waiting["reason"]
                else ""
            )
            return waiting["reason"], f"{waiting['reason']}: {what}{detail}".rstrip(": ")
    return None


def _node_lost(pods: list[dict]) -> str | None:
    """What happened to a trainer pod whose node was lost, while it is still listed (until
    it is terminal and the Job has replaced it)."""
    for pod in pods:
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if (
                cond.get("type") == "DisruptionTarget"
                and cond.get("status") == "True"
                and cond.get("reason") in _NODE_LOST_DISRUPTIONS
            ):
                node = (pod.get("spec") or {}).get("nodeName") or "(unknown)"
                return (
                    f"node {node} stopped answering (not ready or unreachable): trainer pod "
                    f"{pod['metadata']['name']} was evicted from it; the Job replaces it on a "
                    "ready node and training resumes from the last complete checkpoint "
                    "(not counted against spec.backoffLimit)"
                )
    return None


# --- the Job --------------------------------------------------------------------------


def _job_conditions(job: dict) -> dict[str, dict]:
    return {
        c["type"]: c
        for c in (job.get("status") or {}).get("conditions") or []
        if c.get("status") == "True"
    }


def _result(pods: list[dict]) -> contract.TrainerResult | None:
    """The TrainerResult of a finished Job: from the newest succeeded pod that holds one (in a
    gang only rank 0's pod, index 0, writes it; the others end without a message)."""
    succeeded = [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
    for pod in sorted(succeeded, key=_pod_time, reverse=True):
        result = parse_result((_terminated(pod) or {}).get("message"))
        if result is not None:
            return result
    return None


def dry_run_message(result: contract.TrainerResult | None) -> str:
    """What a passed dry run found, in one line."""
    preview = result.preview if result else None
    if preview is None:
        return "dry run passed; nothing was trained"
    parts = [
        f"{preview.trainRows} training rows",
        f"{preview.tokens} tokens ({preview.trainedTokens} carry loss)",
        f"{preview.stepsPerEpoch} steps per epoch",
    ]
    if preview.truncatedRows or preview.excludedRows:
        parts.append(f"{preview.truncatedRows} truncated, {preview.excludedRows} excluded")
    return f"dry run passed, nothing trained: {', '.join(parts)}; preview at {preview.uri}"


def failed_attempts(ftj: FineTuneJob, job: dict) -> int:
    """Failed attempts of the trainer: failed pods, where a gang's attempt fails all of its
    `nodes` pods at once (rounded up: the Job may stop the last ones before they fail)."""
    failed = (job.get("status") or {}).get("failed") or 0
    return -(-failed // ftj.spec.trainer_pods)


def job_outcome(ftj: FineTuneJob, job: dict, pods: list[dict]) -> Outcome:
    spec = ftj.spec
    conds = _job_conditions(job)
    memory = spec.resources.memory
    if "Complete" in conds or "SuccessCriteriaMet" in conds:
        result = _result(pods)
        if result and result.result == "failed":
            return Outcome(
                "Failed", Reason.TRAINER_FAILED, result.message or "the trainer failed", result
            )
        if spec.dryRun:
            return Outcome("Validated", Reason.DRY_RUN_PASSED, dry_run_message(result), result)
        return Outcome("Succeeded", Reason.COMPLETED, "training finished", result)
    failed = conds.get("Failed") or conds.get("FailureTarget")
    if failed:
        job_reason = failed.get("reason") or "Failed"
        if job_reason == Reason.DEADLINE_EXCEEDED:
            deadline = spec.activeDeadlineSeconds
            return Outcome(
                "Failed",
                Reason.DEADLINE_EXCEEDED,
                f"the job ran longer than spec.activeDeadlineSeconds ({deadline} s); stopped",
            )
        pod = _latest(pods, "Failed")
        pod_failure = _pod_failure(pod, memory, spec.resources.workDirSize) if pod else None
        result = parse_result((_terminated(pod) or {}).get("message")) if pod else None
        if pod_failure:
            reason, message = pod_failure
            if reason == Reason.RENDEZVOUS_TIMEOUT:
                # The cause, when the scheduler still says it: a member it cannot place.
                reason, message = gang.unschedulable_member(pods, spec.trainer_pods) or (
                    reason,
                    message,
                )
            if job_reason == "BackoffLimitExceeded" and reason not in (
                Reason.BAD_INPUT,
                Reason.EVAL_THRESHOLDS_MISSED,
            ):
                tries = failed_attempts(ftj, job) or 1
                message = f"the trainer failed {tries} time(s), giving up: {message}"
            return Outcome("Failed", reason, message, result)
        return Outcome("Failed", job_reason, failed.get("message") or "the trainer Job failed")
    for pod in pods:
        evicted = _eviction(pod, spec.resources.workDirSize)
        if evicted and evicted[0] == Reason.WORK_DIR_FULL:
            # Ended here, not by the Job: a trainer that saved its step on SIGTERM exits with
            # the Preempted code, which the Job's failure policy ignores, so it would retry
            # (and fill the work dir again) without end. The operator deletes the Job.
            return Outcome("Failed", *evicted)
    if (job.get("spec") or {}).get("suspend"):
        if spec.suspend:
            return Outcome(
                "Suspended", Reason.SUSPENDED, "suspended by spec.suspend; checkpoints are kept"
            )
        queue = names.queue_name(ftj)
        where = f" in queue {queue}" if queue else ""
        return Outcome("Queued", Reason.WAITING_FOR_ADMISSION, f"waiting for admission{where}")
    live = [
        p
        for p in pods
        if (p.get("status") or {}).get("phase") in ("Pending", "Running", None)
        and not p["metadata"].get("deletionTimestamp")
    ]
    nodes = spec.trainer_pods
    if nodes > 1 and (member := gang.unschedulable_member(live, nodes)):
        return Outcome("Pending", *member)  # rank 0 may run: it waits at the rendezvous
    if any((p.get("status") or {}).get("phase") == "Running" for p in live):
        return Outcome("Running", Reason.TRAINING, "the trainer is running")
    lost = _node_lost(pods)
    if lost:
        return Outcome("Running", Reason.NODE_LOST, lost)
    stuck = _waiting_problem(live, ftj)
    if stuck:
        return Outcome("Pending", *stuck)
    # Between a pod's end and the Job's verdict (or the retry's start) the job is still
    # under way: saying Pending there would flap.
    if _latest(pods, "Succeeded"):
        return Outcome("Running", Reason.COMPLETING, "the trainer finished; completing the Job")
    if latest_failed := _latest(pods, "Failed"):
        stopped = _pod_failure(latest_failed, memory)
        if stopped and stopped[0] == Reason.PREEMPTED:
            return Outcome("Running", Reason.PREEMPTED, f"{stopped[1]}; starting the next attempt")
        return Outcome("Running", Reason.RESTARTING, "the trainer pod failed; starting a retry")
    return Outcome("Pending", Reason.STARTING, "waiting for the trainer pod to start")


# --- progress and conditions ----------------------------------------------------------


def build_progress(
    previous: dict | None, latest: dict | None, phase: str, total_steps: int | None = None
) -> dict | None:
    progress = {k: v for k, v in (previous or {}).items() if v is not None}
    for key in (*contract.PROGRESS_FIELDS, "updatedAt"):
        if latest and latest.get(key) is not None:
            progress[key] = latest[key]
    for key in _DISPLAY_FIGURES:
        if isinstance(progress.get(key), float):
            progress[key] = significant(progress[key])
    if total_steps:
        progress["totalSteps"] = total_steps
    if phase == "Succeeded" and progress.get("totalSteps"):
        progress["step"] = progress["totalSteps"]
        progress.pop("etaSeconds", None)
    step, total = progress.get("step"), progress.get("totalSteps")
    if step is not None and total:
        progress["percent"] = round(100.0 * min(step, total) / total, 1)
        progress["summary"] = f"{step}/{total} ({progress['percent']:.0f}%)"
        stage = (latest or {}).get("stage")
        if stage and stage not in ("train", "training") and phase == "Running":
            progress["summary"] += f" {stage}"
    return progress or None


def merge_conditions(
    previous: list[dict] | None, desired: list[dict], now: str, generation: int | None
) -> list[dict]:
    """Kubernetes-style: lastTransitionTime moves only when a condition's status flips."""
    before = {c["type"]: c for c in previous or []}
    merged = []
    for cond in desired:
        old = before.get(cond["type"])
        flipped = old is None or old.get("status") != cond["status"]
        out = {**cond, "lastTransitionTime": now if flipped else old.get("lastTransitionTime", now)}
        if generation is not None:
            out["observedGeneration"] = generation
        merged.append({k: v for k, v in out.items() if v is not None})
    return merged


def _conditions(
    phase: str, reason: str, message: str, obs: Observed, metrics: dict | None
) -> list[dict]:
    def cond(type_: str, true: bool, why: str | None = None, text: str | None = None) -> dict:
        return {
            "type": type_,
            "status": "True" if true else "False",
            "reason": why or (reason if true else phase),
            "message": text if text is not None else (message if true else None),
        }

    problem = obs.problem
    desired = [
        cond(
            Condition.ACCEPTED,
            problem is None,
            Reason.VALIDATED if problem is None else problem.reason,
            "the spec passed the operator's checks" if problem is None else problem.message,
        ),
        cond(Condition.RUNNING, phase == "Running"),
        cond(Condition.SUSPENDED, phase == "Suspended"),
        cond(Condition.SUCCEEDED, phase == "Succeeded"),
        cond(Condition.FAILED, phase == "Failed"),
    ]
    previous_change = next(
        (
            c
            for c in obs.previous.get("conditions") or []
            if c.get("type") == Condition.SPEC_CHANGED_AFTER_START
        ),
        None,
    )
    if obs.changed_fields is None:
        if previous_change is not None:
            desired.append(
                {k: previous_change.get(k) for k in ("type", "status", "reason", "message")}
            )
    elif obs.changed_fields or previous_change is not None:
        fields = ", ".join(f"spec.{f}" for f in obs.changed_fields)
        desired.append(
            cond(
                Condition.SPEC_CHANGED_AFTER_START,
                bool(obs.changed_fields),
                Reason.SPEC_CHANGED if obs.changed_fields else Reason.SPEC_MATCHES,
                f"{fields} changed after the trainer started; the running job keeps the "
                "settings it started with (create a new FineTuneJob to use the new ones)"
                if obs.changed_fields
                else "",
            )
        )
    if metrics and metrics.get("evalPassed") is not None:
        passed = bool(metrics["evalPassed"])
        desired.append(
            cond(
                Condition.EVAL_PASSED,
                passed,
                Reason.THRESHOLDS_MET if passed else Reason.THRESHOLDS_MISSED,
                "evaluation met the thresholds"
                if passed
                else "evaluation missed a threshold (see the report)",
            )
        )
    return desired


# --- the whole status -----------------------------------------------------------------


def derive_status(obs: Observed, now: str) -> FineTuneJobStatus:
    """The status the FineTuneJob should have, typed: a key the model does not declare is an
    error here (the API server would prune it silently). `.wire()` is what patches diff."""
    ftj, job = obs.ftj, obs.job
    prev = obs.previous
    generation = ftj.metadata.generation
    result: contract.TrainerResult | None = None

    if job is None and prev.get("phase") in TERMINAL_PHASES and prev.get("jobName"):
        # Finished, and the Job is gone (deleted by hand, or TTL): the outcome stands.
        return FineTuneJobStatus.model_validate(prev)
    if job is None and obs.problem is not None:
        outcome = Outcome(obs.problem.phase, obs.problem.reason, obs.problem.message)
    elif job is None:
        outcome = Outcome("Pending", Reason.CREATING, "creating the trainer Job")
    else:
        outcome = job_outcome(ftj, job, obs.pods)
        result = outcome.result
    phase = outcome.phase

    job_status = (job or {}).get("status") or {}
    start = prev.get("startTime")
    if not start and (phase in ("Running", *TERMINAL_PHASES)) and job is not None:
        start = job_status.get("startTime") or now
    completion = None
    if phase in TERMINAL_PHASES and job is not None:
        completion = prev.get("completionTime") or job_status.get("completionTime") or now

    total = result.totalSteps if result else None
    attempts = attempts_of(obs, now)
    failed = failed_attempts(ftj, job) if job is not None else 0
    job_failed = phase == "Failed" and job is not None
    restarts = max(prev.get("restarts") or 0, failed - (1 if job_failed and failed else 0))
    resumed = (
        (result.resumedFromStep if result else None)
        or (obs.progress or {}).get("resumedFromStep")
        or next((a["resumedFromStep"] for a in reversed(attempts) if a.get("resumedFromStep")), 0)
        or prev.get("resumedFromStep")
    )

    artifacts = dict(prev.get("artifacts") or {})
    metrics = dict(prev.get("metrics") or {})
    preview = prev.get("preview")
    if result and result.preview is not None:
        preview = result.preview.model_dump(exclude_none=True)
    if result:
        artifacts.update(result.artifacts.model_dump(exclude_none=True))
        metrics.update(result.metrics.model_dump(exclude_none=True))
    usage = usage_of(obs, metrics, now)
    over = deadline.deadline_exceeded(ftj.spec, usage) if job is not None else None
    if over and phase not in TERMINAL_PHASES:
        # Enforced here, over all attempts: resuming a suspended Job restarts its own timer.
        phase, outcome = "Failed", Outcome("Failed", Reason.DEADLINE_EXCEEDED, over)
        completion = prev.get("completionTime") or now
    tracking = [t.model_dump(exclude_none=True) for t in (result.tracking or [])] if result else []

    conditions = _conditions(phase, outcome.reason, outcome.message, obs, metrics)
    if obs.grace_too_short:
        conditions.append(
            {
                "type": Condition.CHECKPOINT_ON_STOP,
                "status": "False",
                "reason": Reason.GRACE_PERIOD_TOO_SHORT,
                "message": obs.grace_too_short,
            }
        )
    return FineTuneJobStatus(
        phase=phase,
        reason=outcome.reason,
        message=outcome.message,
        observedGeneration=generation,
        jobName=job["metadata"]["name"] if job is not None else None,
        startTime=start or None,
        completionTime=completion,
        progress=build_progress(prev.get("progress"), obs.progress, phase, total),
        attempts=attempts or None,
        restarts=restarts if job is not None else None,
        resumedFromStep=resumed or None,
        worldSize=ftj.spec.world_size,
        effectiveBatchSize=ftj.spec.effective_batch_size,
        artifacts=artifacts or None,
        metrics=metrics or None,
        usage=usage,
        tracking=tracking or prev.get("tracking") or None,
        preview=preview,
        conditions=merge_conditions(prev.get("conditions"), conditions, now, generation),
    )


def usage_of(obs: Observed, metrics: dict, now: str) -> dict[str, Any] | None:
    """Usage summed over every trainer pod seen so far. Pods of earlier attempts may be gone
    (the Job controller deletes some, an operator restart forgets them): their seconds stay
    in the recorded `attempts`, so the sum only grows."""
    previous = obs.previous.get("usage") or {}
    attempts = dict(previous.get("attempts") or {})
    for pod in obs.pods:
        seconds = trainer_seconds(pod, now)
        name = pod["metadata"].get("name")
        if seconds is not None and name:
            attempts[name] = round(max(attempts.get(name, 0.0), seconds), 1)
    if not attempts:
        return None
    wall = round(sum(attempts.values()), 1)
    gpu_seconds = round(wall * obs.ftj.spec.pod_gpus, 1)
    usage: dict[str, Any] = {
        "gpuSeconds": gpu_seconds,
        "wallSeconds": wall,
        "tokensTrained": metrics.get("tokensTrained") or previous.get("tokensTrained"),
        "attempts": attempts,
    }
    if obs.gpu_hour_price > 0:
        usage["estimatedCost"] = round(gpu_seconds / 3600 * obs.gpu_hour_price, 4)
        usage["currency"] = obs.currency
    return {k: v for k, v in usage.items() if v is not None}


# --- attempts ---------------------------------------------------------------------------

# A gang's pods carry their completion index; rank 0's pod stands for the attempt.
COMPLETION_INDEX_LABEL = gang.COMPLETION_INDEX_LABEL


def _attempt_pods(pods: list[dict]) -> list[dict]:
    """Rank 0's pods (every pod of a one-pod Job), oldest first."""
    chosen = [
        p
        for p in pods
        if (p["metadata"].get("labels") or {}).get(COMPLETION_INDEX_LABEL) in (None, "0")
    ]
    return sorted(
        chosen,
        key=lambda p: (
            p["metadata"].get("creationTimestamp") or "",
            p["metadata"].get("name") or "",
        ),
    )


def _seen_attempt(pod: dict, memory: str | None) -> dict[str, Any]:
    """What one trainer pod says about its attempt (no None values)."""
    state = _trainer_status(pod).get("state") or {}
    phase = (pod.get("status") or {}).get("phase")
    term = state.get("terminated") or {}
    seen: dict[str, Any] = {
        "startedAt": (state.get("running") or term).get("startedAt")
        or (pod.get("status") or {}).get("startTime"),
        "endedAt": term.get("finishedAt"),
        "exitCode": term.get("exitCode"),
    }
    if phase == "Succeeded":
        seen["result"] = "Succeeded"
    elif phase == "Failed":
        seen["result"] = "Failed"
        failure = _pod_failure(pod, memory)
        deleted = pod["metadata"].get("deletionTimestamp")
        seen["reason"] = Reason.POD_DELETED if deleted else (failure[0] if failure else "Failed")
        if failure and failure[0] == Reason.WORK_DIR_FULL:
            seen["reason"] = Reason.WORK_DIR_FULL  # also once the operator deleted its Job
        if failure and failure[0] == Reason.PREEMPTED:
            # Not a failure, also when its pod was deleted: it stopped with its step saved.
            seen.update(result="Stopped", reason=Reason.PREEMPTED)
    else:
        seen["result"] = "Running" if "running" in state else "Pending"
    if result := parse_result(term.get("message")):
        seen["resumedFromStep"] = result.resumedFromStep or 0
    return {k: v for k, v in seen.items() if v is not None}


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _place_starts(attempts: list[dict], starts: list[dict]) -> None:
    """Give each attempt the step its trainer said it started from (a `started` or `resumed`
    event): the event belongs to the attempt that started last before it, unless that one had
    already ended (its successor is not seen yet; a later reconcile places it)."""
    timed = [a for a in attempts if a.get("startedAt")]
    for start in starts:
        at = _time(start["at"]).replace(microsecond=0)  # pod times have whole seconds
        before = [a for a in timed if _time(a["startedAt"]) <= at]
        if not before:
            continue
        owner = max(before, key=lambda a: _time(a["startedAt"]))
        if owner.get("endedAt") and _time(owner["endedAt"]) < at:
            continue
        owner.setdefault("resumedFromStep", start["step"])


def attempts_of(obs: Observed, now: str) -> list[dict[str, Any]]:
    """status.attempts: each trainer attempt, oldest first, the newest MAX_ATTEMPTS_SHOWN.

    Level-based: the recorded attempts are merged with the pods seen now, so an attempt
    whose pod is gone (deleted, or pruned by the Job controller) keeps what was recorded,
    and one whose end was missed is closed once a newer attempt or the Job's end shows it
    is over."""
    previous = [dict(a) for a in obs.previous.get("attempts") or []]
    by_pod = {a.get("pod"): a for a in previous if a.get("pod")}
    number = max((a.get("attempt", 0) for a in previous), default=0)
    memory = obs.ftj.spec.resources.memory
    present = {p["metadata"].get("name") for p in obs.pods}
    # A pod deleted after it ended is read from its last state: its exit code is the
    # truth about how it ended. It is not `present`: if it had not ended, it is closed below.
    gone = [p for p in obs.ended_pods if p["metadata"].get("name") not in present]
    for pod in _attempt_pods(obs.pods + gone):
        name = pod["metadata"].get("name") or ""
        seen = _seen_attempt(pod, memory)
        if name in by_pod:
            # The pod is the truth; only the resume step (from a progress event) is kept.
            entry = by_pod[name]
            kept = {k: entry[k] for k in ("attempt", "pod", "resumedFromStep") if k in entry}
            entry.clear()
            entry.update(kept | seen)
        else:
            number += 1
            entry = {"attempt": number, "pod": name, **seen}
            previous.append(entry)
            by_pod[name] = entry
    attempts = sorted(previous, key=lambda a: a.get("attempt", 0))
    _close_vanished(attempts, present, obs, now)
    _place_starts(attempts, ((obs.progress or {}).get(contract.PROGRESS_STARTS)) or [])
    return attempts[-MAX_ATTEMPTS_SHOWN:]


def _close_vanished(attempts: list[dict], present: set[str], obs: Observed, now: str) -> None:
    """An unfinished attempt whose pod is gone ended when it was noticed: only once a newer
    pod is seen, or the Job is over or suspended (a pod merely not listed yet right after an
    operator restart must not be closed on a guess)."""
    job = obs.job or {}
    conditions = _job_conditions(job)
    complete = "Complete" in conditions or "SuccessCriteriaMet" in conditions
    over = complete or "Failed" in conditions
    suspended = bool((job.get("spec") or {}).get("suspend"))
    newest = max((a["attempt"] for a in attempts if a.get("pod") in present), default=0)
    last = attempts[-1]["attempt"] if attempts else 0
    for attempt in attempts:
        if attempt.get("pod") in present or attempt.get("result") not in ("Pending", "Running"):
            continue
        if not (over or suspended or attempt["attempt"] < newest):
            continue
        attempt["endedAt"] = attempt.get("endedAt") or now
        if complete and attempt["attempt"] == last:
            attempt.update(result="Succeeded")  # the Job says so; its pod went before we saw it
        elif suspended and not over:
            attempt.update(result="Stopped", reason=Reason.SUSPENDED)
        else:
            attempt.update(result="Failed", reason=Reason.POD_DELETED)


def needs_immediate_patch(old: dict, new: dict) -> bool:
    """True when something other than progress changed (phase, conditions, results)."""
    keys = (set(old) | set(new)) - _PROGRESS_ONLY
    return any(old.get(k) != new.get(k) for k in keys)


def merge_patch(old: dict, new: dict) -> dict:
    """RFC 7386 merge patch that turns `old` into `new` (removed keys become null)."""
    patch: dict[str, Any] = {}
    for key in set(old) | set(new):
        if key not in new:
            patch[key] = None
        elif isinstance(new[key], dict) and isinstance(old.get(key), dict):
            sub = merge_patch(old[key], new[key])
            if sub:
                patch[key] = sub
        elif old.get(key) != new[key]:
            patch[key] = new[key]
    return patch
