"""How long a stopped trainer pod may take to save its work: terminationGracePeriodSeconds.

On SIGTERM the trainer finishes its optimizer step, writes a checkpoint and uploads it before
exiting (contract.EXIT_PREEMPTED); the kubelet SIGKILLs it when the pod's grace period ends.
The period is spec.terminationGracePeriodSeconds, else the chart's floor
(`trainer_grace_seconds`) plus the time a checkpoint of the estimated size takes at the
chart's `checkpoint_mib_per_s` (local write and upload together). A spec value too short for
that estimate is kept (the user's call) and the status says so at admission.
"""

from __future__ import annotations

import math

from kubetune.api.v1alpha1 import FineTuneJobSpec

# The module, not its names: validation imports builders, which imports this one.
from kubetune_operator import validation
from kubetune_operator.settings import OperatorSettings

# Checkpoint bytes per parameter of the base model. Full: weights (bf16) and Adam's two fp32
# moments. LoRA/QLoRA: only the adapter (about 1 % of the base) in fp32 and its moments.
CHECKPOINT_BYTES_PER_PARAM = {"full": 10.0, "lora": 0.12, "qlora": 0.12}


def checkpoint_gib(spec: FineTuneJobSpec) -> float | None:
    """Estimated checkpoint size, from the parameter count named in the model URI (None:
    unknown size)."""
    billions = validation.model_size_billions(spec.model.uri)
    if billions is None:
        return None
    return billions * 1e9 * CHECKPOINT_BYTES_PER_PARAM[spec.method] / 2**30


def checkpoint_seconds(spec: FineTuneJobSpec, settings: OperatorSettings) -> int:
    """Estimated time to write and upload one checkpoint (0 when the size is unknown, and for
    a dry run, which trains nothing)."""
    size = checkpoint_gib(spec)
    if size is None or spec.dryRun:
        return 0
    return math.ceil(size * 1024 / settings.checkpoint_mib_per_s)


def grace_period(spec: FineTuneJobSpec, settings: OperatorSettings) -> int:
    """The trainer pod's terminationGracePeriodSeconds."""
    if spec.terminationGracePeriodSeconds is not None:
        return spec.terminationGracePeriodSeconds
    return settings.trainer_grace_seconds + checkpoint_seconds(spec, settings)


def grace_too_short(spec: FineTuneJobSpec, settings: OperatorSettings) -> str | None:
    """Why a stopped trainer may be killed before its checkpoint is uploaded, or None."""
    grace, needed = grace_period(spec, settings), checkpoint_seconds(spec, settings)
    if grace >= needed:
        return None
    size = checkpoint_gib(spec) or 0.0
    return (
        f"spec.terminationGracePeriodSeconds ({grace} s) is shorter than the ~{needed} s a "
        f"~{size:.1f} GiB checkpoint takes to write and upload at "
        f"{settings.checkpoint_mib_per_s:g} MiB/s: a stopped or preempted trainer loses the "
        "steps since its last periodic checkpoint (unset it for a sized default)"
    )
