"""Rough sizes of a job from its spec: the base model's parameter count named in its URI and
the GPU memory per GPU the operator checks requests against. Shared by the operator's
admission checks and the trainer's preview (`kubetune preview`, a dry run's status), so both
say the same number.
"""

from __future__ import annotations

import re
from typing import Any

# Bytes of GPU memory per parameter, weights + gradients + optimizer state, before
# activations: full = bf16 weights and grads + fp32 master weights + two fp32 Adam moments;
# lora = frozen bf16 weights (the adapter is tiny); qlora = 4-bit weights + constants.
BYTES_PER_PARAM = {"full": 16.0, "lora": 2.0, "qlora": 0.55}
# Activations, CUDA context, fragmentation: a rough margin on top.
OVERHEAD = 1.2
# A frozen bf16 copy of the base as the reference model (dpo, kto; grpo with a KL penalty)
# with full fine-tuning; an adapter's reference is its base with the adapter off.
REFERENCE_BYTES_PER_PARAM = 2.0
# Sizes written like 7b, 8B, 1.5b, 70B, 0.5b in a model name; "8x7b" mixtures count whole.
_SIZE = re.compile(r"(?<![0-9a-z.])(?:(\d+)x)?(\d+(?:\.\d+)?)b(?![a-z0-9])", re.IGNORECASE)


def model_size_billions(uri: str) -> float | None:
    """Parameter count (in billions) named in the model URI, e.g. 'Llama-3-8B' -> 8."""
    last = uri.rstrip("/").rsplit("/", 1)[-1]
    match = _SIZE.search(last) or _SIZE.search(uri)
    if not match:
        return None
    experts = int(match.group(1)) if match.group(1) else 1
    return experts * float(match.group(2))


def estimate_gpu_memory_gib(
    method: str, billions: float, shards: int = 1, *, reference_copy: bool = False
) -> float:
    """GPU memory per GPU: the whole estimate on each (one process, or DDP, which replicates
    the model), or 1/shards of it with FSDP (weights, gradients and optimizer state sharded).
    `reference_copy`: a frozen copy of the base is held as the reference model too."""
    per_param = BYTES_PER_PARAM[method] + (REFERENCE_BYTES_PER_PARAM if reference_copy else 0)
    return billions * 1e9 * per_param * OVERHEAD / 2**30 / shards


def memory_estimate_gib(spec: Any, parameters: int | None) -> float | None:
    """GPU memory per GPU of a FineTuneJobSpec as the operator estimates it at admission, from
    the real parameter count when known, else the size in the model URI (None on CPU workers
    or for an unknown model size)."""
    billions = parameters / 1e9 if parameters else model_size_billions(spec.model.uri)
    if billions is None or spec.resources.gpus == 0:
        return None
    shards = spec.world_size if spec.strategy == "fsdp" else 1
    return round(estimate_gpu_memory_gib(spec.method, billions, shards), 2)
