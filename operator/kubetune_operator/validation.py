"""Checks the CRD schema cannot express, as pure functions of the validated FineTuneJob and
the operator's settings: URI policy, GPU plausibility, the size of the trainer's copy.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

from kubetune.api import contract
from kubetune.api.contract import Reason
from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobSpec
from kubetune_operator import builders
from kubetune_operator.settings import OperatorSettings

# Bytes of GPU memory per parameter, weights + gradients + optimizer state, before
# activations: full = bf16 weights and grads + fp32 master weights + two fp32 Adam moments;
# lora = frozen bf16 weights (the adapter is tiny); qlora = 4-bit weights + constants.
BYTES_PER_PARAM = {"full": 16.0, "lora": 2.0, "qlora": 0.55}
# Activations, CUDA context, fragmentation: a rough margin on top.
OVERHEAD = 1.2
# Sizes written like 7b, 8B, 1.5b, 70B, 0.5b in a model name; "8x7b" mixtures count whole.
_SIZE = re.compile(r"(?<![0-9a-z.])(?:(\d+)x)?(\d+(?:\.\d+)?)b(?![a-z0-9])", re.IGNORECASE)


@dataclass(frozen=True)
class Problem:
    """Why a FineTuneJob cannot start. `phase` Pending: may fix itself; Failed: will not."""

    phase: Literal["Pending", "Failed"]
    reason: str
    message: str


def model_size_billions(uri: str) -> float | None:
    """Parameter count (in billions) named in the model URI, e.g. 'Llama-3-8B' -> 8."""
    last = uri.rstrip("/").rsplit("/", 1)[-1]
    match = _SIZE.search(last) or _SIZE.search(uri)
    if not match:
        return None
    experts = int(match.group(1)) if match.group(1) else 1
    return experts * float(match.group(2))


def estimate_gpu_memory_gib(method: str, billions: float, shards: int = 1) -> float:
    """GPU memory per GPU: the whole estimate on each (one process, or DDP, which replicates
    the model), or 1/shards of it with FSDP (weights, gradients and optimizer state sharded)."""
    return billions * 1e9 * BYTES_PER_PARAM[method] * OVERHEAD / 2**30 / shards


def check_gpus(spec: FineTuneJobSpec, settings: OperatorSettings) -> Problem | None:
    billions = model_size_billions(spec.model.uri)
    if billions is None:
        return None  # unknown size: nothing to say
    method, gpus, nodes = spec.method, spec.resources.gpus, spec.resources.nodes
    if gpus == 0:
        return None  # CPU workers: no GPU memory to check
    world, per_gpu = spec.world_size, settings.gpu_memory_gib
    sharded = spec.strategy == "fsdp"
    need = estimate_gpu_memory_gib(method, billions, world if sharded else 1)
    if need <= per_gpu:
        return None
    layout = f"{nodes} node(s) x {gpus} GPU(s)" if nodes > 1 else f"{gpus} GPU(s)"
    how = "sharded (fsdp) over" if sharded else "replicated on each of"
    return Problem(
        "Failed",
        Reason.INSUFFICIENT_GPUS,
        f"method {method} on a ~{billions:g}B model needs about {need:.0f} GiB per GPU, "
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


def _largest_field(value: Any, path: str, depth: int = 3) -> str:
    """The path of the biggest part of a JSON value, `depth` levels down at most."""
    if depth == 0 or not isinstance(value, dict) or not value:
        return path
    key, child = max(value.items(), key=lambda kv: len(json.dumps(kv[1], ensure_ascii=False)))
    return _largest_field(child, f"{path}.{key}", depth - 1)


def check_size(ftj: FineTuneJob, job: dict[str, Any]) -> Problem | None:
    """The job must fit the pod annotation the trainer reads it from (`job`: its Job). The CRD
    bounds every field but the free-form JSON Schema of evaluation.format, which only this
    check can measure."""
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    size = builders.annotation_size(annotations[contract.JOB_ANNOTATION])
    if size <= contract.JOB_ANNOTATION_BUDGET:
        return None
    biggest = _largest_field(builders.spec_dict(ftj), "spec")
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
    return check_uris(ftj.spec, settings) or check_gpus(ftj.spec, settings)
