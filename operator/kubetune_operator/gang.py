"""What the pods of a multi-node gang say about it, as pure functions.

A gang trains only when every member runs: rank 0 running while another member cannot be
scheduled is a gang waiting at the rendezvous (for at most contract.RENDEZVOUS_TIMEOUT_S),
not a trainer that is running.
"""

from __future__ import annotations

from kubetune.api import contract
from kubetune.api.contract import Reason

# The Job controller's label of an Indexed Job's pod: its completion index, the node rank.
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


def _scheduler_refusal(pod: dict) -> str | None:
    """The scheduler's message for a pod it cannot place (its PodScheduled condition)."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return (cond.get("message") or "").strip() or "no reason given"
    return None


def unschedulable_member(pods: list[dict], nodes: int) -> tuple[str, str] | None:
    """(Unschedulable, message) naming the first gang member the scheduler cannot place and
    the scheduler's words; None when every member is placed (or pending for other reasons)."""
    members = sorted(
        (p for p in pods if (p.get("status") or {}).get("phase") in ("Pending", None)),
        key=lambda p: int((p["metadata"].get("labels") or {}).get(COMPLETION_INDEX_LABEL, 0)),
    )
    for pod in members:
        refusal = _scheduler_refusal(pod)
        if refusal is None:
            continue
        index = (pod["metadata"].get("labels") or {}).get(COMPLETION_INDEX_LABEL, "?")
        return (
            Reason.UNSCHEDULABLE,
            f"gang member {index} of {nodes} (pod {pod['metadata'].get('name')}) cannot be "
            f"scheduled: {refusal}; the other members wait at the rendezvous for at most "
            f"{contract.RENDEZVOUS_TIMEOUT_S} s, then the attempt fails and is retried "
            "(spec.backoffLimit)",
        )
    return None
