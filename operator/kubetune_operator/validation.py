"""Checks the CRD schema cannot express, as pure functions of the validated FineTuneJob and
the operator's settings: URI policy, GPU plausibility, the size of the trainer's copy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

from kubetune.api import contract
from kubetune.api.contract import Reason

# The estimates live in the API package: the trainer's preview says the same numbers.
from kubetune.api.sizing import estimate_gpu_memory_gib, model_size_billions
from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobSpec
from kubetune_operator import builders
from kubetune_operator.settings import OperatorSettings


@dataclass(frozen=True)
class Problem:
    """Why a FineTuneJob cannot start. `phase` Pending: may fix itself; Failed: will not."""

    phase: Literal["Pending", "Failed"]
    reason: str
    message: str


def holds_reference_copy(spec: FineTuneJobSpec) -> bool:
    """Full fine-tuning with a live reference model keeps a second copy of the base."""
    if spec.method != "full":
        return False
    if spec.objective in ("dpo", "kto"):
        return spec.preference is None or spec.preference.referenceModel != "precomputed"
    return spec.objective == "grpo" and spec.grpo is not None and spec.grpo.beta > 0


def check_gpus(spec: FineTuneJobSpec, settings: OperatorSettings) -> Problem | None:
    billions = model_size_billions(spec.model.uri)
    if billions is None:
        return None  # unknown size: nothing to say
    method, gpus, nodes = spec.method, spec.resources.gpus, spec.resources.nodes
    if gpus == 0:
        return None  # CPU workers: no GPU memory to check
    world, per_gpu = spec.world_size, settings.gpu_memory_gib
    sharded = spec.strategy == "fsdp"
    reference = holds_reference_copy(spec)
    need = estimate_gpu_memory_gib(
        method, billions, world if sharded else 1, reference_copy=reference
    )
    if need <= per_gpu:
        return None
    layout = f"{nodes} node(s) x {gpus} GPU(s)" if nodes > 1 else f"{gpus} GPU(s)"
    how = "sharded (fsdp) over" if sharded else "replicated on each of"
    with_reference = f" with objective {spec.objective}'s reference copy" if reference else ""
    return Problem(
        "Failed",
        Reason.INSUFFICIENT_GPUS,
        f"method {method}{with_reference} on a ~{billions:g}B model needs about {need:.0f} GiB "
        f"per GPU, "
        f"{how} {layout} of {per_gpu:g} GiB: {advice(spec, billions, per_gpu)}",
    )


def advice(spec: FineTuneJobSpec, billions: float, per_gpu: float) -> str:
    """A configuration that fits: full fine-tuning shards (fsdp) over enough GPUs; an
    adapter's frozen base is replicated (ddp), so it needs a smaller footprint per GPU."""
    method, gpus = spec.method, max(spec.resources.gpus, 1)
    if method == "full":
        world = math.ceil(estimate_gpu_memory_gib("full", billions) / per_gpu)
        nodes = math.ceil(world / gpus)
        fsdp = "" if spec.distributed.strategy == "auto" else ", spec.distributed.strategy: fsdp"
        return (
            f"shard it over >= {world} GPUs (spec.resources.gpus >= {min(world, gpus)}, "
            f"spec.resources.nodes >= {nodes}{fsdp}) or use method: qlora"
        )
    if method == "lora" and estimate_gpu_memory_gib("qlora", billions) <= per_gpu:
        return "use method: qlora (a 4-bit base fits one GPU; ddp replicates it)"
    return "use GPUs with more memory (an adapter's base model is replicated on every GPU)"


def check_uris(spec: FineTuneJobSpec, settings: OperatorSettings) -> Problem | None:
    for path, uri in spec.uris().items():
        scheme = urlparse(uri).scheme.lower()
        if scheme not in settings.allowed_schemes:
            allowed = ", ".join(f"{s}://" for s in settings.allowed_schemes)
            return Problem(
                "Failed",
                Reason.URI_SCHEME_NOT_ALLOWED,
                f"{path}: {scheme}:// is not allowed on this cluster (allowed: {allowed})",
            )
        prefixes = settings.allowed_s3_prefixes
        if scheme == "s3" and prefixes and not any(uri.startswith(p) for p in prefixes):
            return Problem(
                "Failed",
                Reason.URI_NOT_ALLOWED,
                f"{path}: {uri} is outside the allowed S3 locations ({', '.join(prefixes)})",
            )
    return None


def image_allowed(image: str, settings: OperatorSettings) -> bool:
    """The trainer image itself, or one the platform listed: a whole reference, or a prefix
    ending in '/' or ':' (so registry.internal/ml/ does not admit registry.internal/ml-evil)."""
    for allowed in [settings.trainer_image, *settings.trainer_allowed_images]:
        if image == allowed or (allowed.endswith(("/", ":")) and image.startswith(allowed)):
            return True
    return False


def check_image(spec: FineTuneJobSpec, settings: OperatorSettings) -> Problem | None:
    """A custom image runs its own code with the job's Secrets: only listed images may."""
    if not spec.image or image_allowed(spec.image, settings):
        return None
    allowed = ", ".join([settings.trainer_image, *settings.trainer_allowed_images])
    return Problem(
        "Failed",
        Reason.IMAGE_NOT_ALLOWED,
        f"spec.image: {spec.image} is not an allowed trainer image (allowed: {allowed})",
    )


def largest_field(value: Any, path: str, depth: int = 3) -> str:
    """The path of the biggest part of a JSON value, `depth` levels down at most."""
    if depth == 0 or not isinstance(value, dict) or not value:
        return path
    key, child = max(value.items(), key=lambda kv: len(json.dumps(kv[1], ensure_ascii=False)))
    return largest_field(child, f"{path}.{key}", depth - 1)


def check_size(ftj: FineTuneJob, job: dict[str, Any]) -> Problem | None:
    """The job must fit the pod annotation the trainer reads it from (`job`: its Job). The CRD
    bounds every field but the free-form JSON Schema of evaluation.format, which only this
    check can measure."""
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    size = builders.annotation_size(annotations[contract.JOB_ANNOTATION])
    if size <= contract.JOB_ANNOTATION_BUDGET:
        return None
    biggest = largest_field(builders.spec_dict(ftj), "spec")
    return Problem(
        "Failed",
        Reason.SPEC_TOO_LARGE,
        f"the job takes {size} bytes, more than the {contract.JOB_ANNOTATION_BUDGET} a pod "
        f"annotation can carry to the trainer; shorten {biggest}",
    )


def validate(ftj: FineTuneJob, settings: OperatorSettings) -> Problem | None:
    """The first problem that keeps this FineTuneJob from getting a Job, or None. All of them
    are permanent: a missing Secret shows from the pod (the operator reads no Secrets); the
    size of the trainer's copy is checked on the Job itself (check_size)."""
    return (
        check_image(ftj.spec, settings)
        or check_uris(ftj.spec, settings)
        or check_gpus(ftj.spec, settings)
    )
