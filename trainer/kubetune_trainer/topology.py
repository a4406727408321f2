"""What the run ran on and how the published model is stored: provenance that changes the
result (the effective batch size sets the optimisation, the precision the weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kubetune_trainer.distributed import Rank, effective_strategy, run_strategy

# Half-precision dtypes a base checkpoint may be stored in; anything else publishes as bf16.
_HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def run_topology(rank: Rank, spec: Any, device: str) -> dict[str, Any]:
    """The gang's shape for manifest.json, as torchrun started it (the worker's WORLD_SIZE and
    LOCAL_WORLD_SIZE, not spec.resources): processes, nodes, accelerators, the strategy that
    ran (FSDP runs as DDP on CPU workers) and the examples per optimizer step."""
    training = spec.training
    per_node = max(1, rank.local_world_size)
    return {
        "worldSize": rank.world_size,
        "nodes": rank.nodes,
        "processesPerNode": per_node,
        "gpusPerNode": per_node if device == "cuda" else 0,
        "device": device,
        "strategy": effective_strategy(run_strategy(spec, rank), device),
        "requestedStrategy": spec.distributed.strategy,
        "perDeviceBatchSize": training.batchSize,
        "gradientAccumulationSteps": training.gradientAccumulationSteps,
        # Rows per optimizer step (packed: packed rows of up to maxSeqLength tokens).
        "effectiveBatchSize": training.batchSize
        * training.gradientAccumulationSteps
        * rank.world_size,
    }


def gpus_used(rank: Rank, device: str) -> int:
    """GPUs the gang trains on (one per process on GPU nodes; none on CPU workers)."""
    return rank.world_size if device == "cuda" else 0


def published_dtype(base_model_path: Path) -> torch.dtype:
    """The dtype a full or merged model is published in: the base checkpoint's own when it is
    16-bit, else bf16. Training keeps fp32 master weights (and CPU runs compute in fp32), but
    publishing them would double the download for no quality a 16-bit base had to begin with."""
    try:
        config = json.loads((Path(base_model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.bfloat16
    stored = config.get("dtype") or config.get("torch_dtype")
    return _HALF.get(stored, torch.bfloat16)
