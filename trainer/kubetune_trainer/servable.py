"""What makes the published output load in a server as it is, checked or written by the trainer.

- Before training (`check_merge`): a merged model (spec.output.mergeAdapter) that could not
  be made or served is refused with the reason, not found out after hours of training: a base
  that runs its own code, a base stored quantised, a merge that does not fit the pod's memory.
- At publishing: `generation_config.json` beside the adapter, the full model and the merged
  model stops on the tokens evaluation stopped on (`write_generation_config`), and an
  adapter vLLM would refuse is said so (`vllm_adapter_note`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune_trainer.errors import BadInputError
from kubetune_trainer.model_source import needs_remote_code

GENERATION_CONFIG = "generation_config.json"
# Kubernetes quantity suffixes (resources.memory's pattern allows these).
_SUFFIXES = {
    "": 1,
    **{s: 1000**i for i, s in enumerate("KMGTPE", 1)},
    **{f"{s}i": 1024**i for i, s in enumerate("KMGTPE", 1)},
}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([KMGTPE]i?)?$")


def memory_bytes(quantity: str) -> int:
    """Bytes of a Kubernetes memory quantity such as '64Gi', '500M' or '1.5Gi'."""
    match = _QUANTITY.match(quantity.strip())
    if not match:
        raise BadInputError(f"spec.resources.memory: {quantity!r} is not a memory quantity")
    return int(float(match.group(1)) * _SUFFIXES[match.group(2) or ""])


def parameter_count(model_path: Path, *, trust_remote_code: bool = False) -> int:
    """Parameters of the model at `model_path`, from its module tree alone (no weights)."""
    from kubetune_trainer.modeling import meta_model

    model = meta_model(model_path, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def stored_quantization(model_path: Path) -> str | None:
    """The quantisation a checkpoint is stored in (config.json's quantization_config), e.g.
    'bitsandbytes 4-bit'; None for ordinary weights."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quant, dict):
        return None
    method = str(quant.get("quant_method") or "unknown")
    bits = "4-bit" if quant.get("load_in_4bit") else "8-bit" if quant.get("load_in_8bit") else ""
    return f"{method} {bits}".strip()


def merge_memory_bytes(parameters: int, published: torch.dtype, held_bytes: float) -> int:
    """Host memory a merge on the CPU needs: the merged copy in its published dtype, while the
    trained model (`held_bytes` per parameter: 4 in fp32, 0.5 for a 4-bit base) is still in
    memory."""
    return int(parameters * (published.itemsize + held_bytes))


def check_merge(
    spec: FineTuneJobSpec,
    model_path: Path,
    *,
    device: str,
    published: torch.dtype,
    held_bytes: float,
) -> None:
    """BadInputError, before any training, when spec.output.mergeAdapter (or gguf) asks for a merged
    model this run could not make or that no server would load as it is."""
    if spec.method == "full" or not spec.output.publishes_merged:
        return
    field = "spec.output.mergeAdapter" if spec.output.mergeAdapter else "spec.output.gguf"
    if needing := needs_remote_code(model_path):
        raise BadInputError(
            f"{field}: the base model runs its own Python code (auto_map in "
            f"{', '.join(needing)}), so a merged copy would need that code and "
            "--trust-remote-code wherever it is served, and vLLM and KServe load only "
            "architectures they implement: publish the adapter alone (mergeAdapter: false)"
        )
    if quantization := stored_quantization(model_path):
        raise BadInputError(
            f"{field}: the base model is stored quantised ({quantization}); a merge into "
            "quantised weights would round the adapter away, and the merged model must be the "
            "16-bit base with the adapter added: point spec.model.uri at the 16-bit base (QLoRA "
            "quantises it while loading) or publish the adapter alone (mergeAdapter: false)"
        )
    if device != "cpu" or not spec.resources.memory:
        return  # on a GPU the merge loads shard by shard into GPU memory
    parameters = parameter_count(model_path, trust_remote_code=spec.model.trustRemoteCode)
    need = merge_memory_bytes(parameters, published, held_bytes)
    if need > memory_bytes(spec.resources.memory):
        raise BadInputError(
            f"{field}: merging on the CPU holds the merged model ({parameters / 1e9:.2f}B "
            f"parameters in {str(published).removeprefix('torch.')}) beside the trained one, "
            f"about {need / 2**30:.1f} GiB, more than "
            f"spec.resources.memory {spec.resources.memory}: raise the memory, merge on a GPU, "
            "or publish the adapter alone (mergeAdapter: false)"
        )


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens evaluation stops generation on (the model's eos list and the tokenizer's)."""
    from kubetune_trainer.evaluate.inference import stop_token_ids as evaluation_stops

    return evaluation_stops(model, tokenizer)


def write_generation_config(folder: Path, model: Any, tokenizer: Any) -> list[int]:
    """`folder`/generation_config.json: the trained model's generation settings, with
    eos_token_id the tokens evaluation stopped on (a custom chat template's end-of-turn marker
    among them), so a server stops where evaluation did. Returns those tokens."""
    from transformers import GenerationConfig

    stops = stop_token_ids(model, tokenizer)
    source = getattr(model, "generation_config", None)
    config = GenerationConfig.from_dict(source.to_dict()) if source is not None else None
    config = config or GenerationConfig()
    config.eos_token_id = stops
    if config.pad_token_id is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    if config.bos_token_id is None and tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    config.save_pretrained(folder)
    return stops


def vllm_adapter_note(adapter_dir: Path) -> str | None:
    """One line when vLLM would refuse the adapter in `adapter_dir`, naming why; else None."""
    from kubetune import serving

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    problems = serving.vllm_adapter_limits(config)
    if not problems:
        return None
    return (
        "vLLM cannot load this adapter: "
        + "; ".join(problems)
        + ". Serve the merged model (spec.output.mergeAdapter) or load the adapter with PEFT"
    )
