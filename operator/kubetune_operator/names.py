"""Names, labels and annotations of the objects the operator owns.

The Job's name is a pure function of the FineTuneJob's name, so a restarted operator finds
(and adopts) what an earlier one created instead of creating a second copy.
"""

from __future__ import annotations

import hashlib

from kubetune.api import v1alpha1 as api

MANAGER = "kubetune-operator"
LABEL_FINETUNEJOB = "kubetune.io/finetunejob"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
# The Job controller labels its pods with their Job's name (the older label, too).
POD_JOB_LABELS = ("batch.kubernetes.io/job-name", "job-name")
ANNOTATION_SPEC_HASHES = "kubetune.io/spec-hashes"
TRAINER_CONTAINER = "trainer"

# Job names end up in the `batch.kubernetes.io/job-name` pod label: 63 characters at most.
_MAX_NAME = 63


def child_name(ftj_name: str, suffix: str) -> str:
    """`<name>-<suffix>`, shortened with a stable hash when it would exceed 63 characters."""
    name = f"{ftj_name}-{suffix}"
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(ftj_name.encode()).hexdigest()[:8]
    keep = _MAX_NAME - len(suffix) - len(digest) - 2
    return f"{ftj_name[:keep].rstrip('-.')}-{digest}-{suffix}"


def job_name(ftj_name: str) -> str:
    return child_name(ftj_name, "trainer")


def service_name(ftj_name: str) -> str:
    """The headless Service that gives a multi-node gang's pods stable DNS names."""
    return child_name(ftj_name, "workers")


def child_labels(ftj_name: str) -> dict[str, str]:
    # Label values are limited to 63 characters too; the owner reference is the real link.
    value = ftj_name if len(ftj_name) <= _MAX_NAME else child_name(ftj_name, "x")[:-2]
    return {LABEL_FINETUNEJOB: value, LABEL_MANAGED_BY: MANAGER}


def owner_reference(ftj: api.FineTuneJob) -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": ftj.metadata.name,
        "uid": ftj.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def controller_owner(obj: dict, kind: str = api.KIND) -> dict | None:
    """The owner reference with controller: true of that kind, if any."""
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == kind and ref.get("controller"):
            return ref
    return None


def pod_job_name(pod: dict) -> str | None:
    labels = pod.get("metadata", {}).get("labels") or {}
    return next((labels[k] for k in POD_JOB_LABELS if labels.get(k)), None)


def queue_name(ftj: api.FineTuneJob) -> str | None:
    """The Kueue LocalQueue: spec.queueName or the queue-name label on the FineTuneJob."""
    labels = ftj.metadata.labels or {}
    return ftj.spec.queueName or labels.get(LABEL_QUEUE) or None
