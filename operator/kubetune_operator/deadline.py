"""spec.activeDeadlineSeconds over the whole job, enforced by the operator.

Kubernetes counts a Job's activeDeadlineSeconds from its latest start and restarts the count
when a suspended Job resumes, so toggling spec.suspend would extend any deadline. The operator
counts the trainer's run time instead, summed over every attempt as status.usage records it
(its per-pod seconds only grow and survive pods that are gone); a gang's attempt runs all of
its pods at once, so its run time is the pods' sum divided by their number. Past the deadline
the job fails with reason DeadlineExceeded and its Job is deleted (the Job's own
activeDeadlineSeconds stays as a bound within one attempt).
"""

from __future__ import annotations

from typing import Any

from kubetune.api.v1alpha1 import FineTuneJobSpec


def run_seconds(usage: dict[str, Any] | None, nodes: int) -> float:
    """The trainer's run time over all attempts, from status.usage."""
    pods = (usage or {}).get("attempts") or {}
    return sum(pods.values()) / max(nodes, 1)


def deadline_exceeded(spec: FineTuneJobSpec, usage: dict[str, Any] | None) -> str | None:
    """The failure message when the job has run past spec.activeDeadlineSeconds, else None."""
    deadline = spec.activeDeadlineSeconds
    if not deadline:
        return None
    ran = run_seconds(usage, spec.trainer_pods)
    if ran <= deadline:
        return None
    return (
        f"the trainer ran {ran:.0f} s over all attempts, longer than "
        f"spec.activeDeadlineSeconds ({deadline} s); stopped"
    )
