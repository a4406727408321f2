"""Names, labels and annotations of the objects the operator owns.

Every child name is a pure function of the FineTuneJob's name, so a restarted operator
finds (and adopts) what an earlier one created instead of creating a second copy.
"""

from __future__ import annotations

import hashlib

from kubetune.api import v1alpha1 as api

MANAGER = "kubetune-operator"
LABEL_FINETUNEJOB = "kubetune.io/finetunejob"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_SPEC_HASHES = "kubetune.io/spec-hashes"
TRAINER_CONTAINER = "trainer"
TOKEN_KEY = "token"
CONFIG_KEY = "job.yaml"

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


def config_map_name(ftj_name: str) -> str:
    return child_name(ftj_name, "config")


def token_secret_name(ftj_name: str) -> str:
    return child_name(ftj_name, "progress")


def child_labels(ftj_name: str) -> dict[str, str]:
    # Label values are limited to 63 characters too; the owner reference is the real link.
    value = ftj_name if len(ftj_name) <= _MAX_NAME else child_name(ftj_name, "x")[:-2]
    return {LABEL_FINETUNEJOB: value, LABEL_MANAGED_BY: MANAGER}


def owner_reference(ftj: dict) -> dict:
    meta = ftj["metadata"]
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def queue_name(ftj: dict) -> str | None:
    """The Kueue LocalQueue: spec.queueName or the queue-name label on the FineTuneJob."""
    labels = ftj.get("metadata", {}).get("labels") or {}
    return ftj.get("spec", {}).get("queueName") or labels.get(LABEL_QUEUE) or None
