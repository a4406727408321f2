"""From a finished FineTuneJob to a served model: KServe and vLLM manifests.

Pure functions of the FineTuneJob (spec + status): the trainer writes the same documents
into `serve/` beside the artifacts, and `kubetune serve NAME` prints them for
`kubectl apply -f -`. The KServe shapes follow KServe v0.20's CRDs (the version the tests
validate against with a server-side dry run):

- `InferenceService` (serving.kserve.io/v1beta1) on the Hugging Face runtime with its vLLM
  backend: the base model and the adapter are two `storageUris`, each mounted at its own
  path by KServe's storage initializer; the adapter is registered with vLLM's
  `--enable-lora --lora-modules`.
- `LLMInferenceService` (serving.kserve.io/v1alpha2): `spec.model.uri` is the base model and
  `spec.model.lora.adapters` the adapter.
- `vllm serve` arguments, for a plain vLLM server over local copies of the artifacts.

A full fine-tune, or a job asked to serve its merged model, serves one model and no adapter.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

from kubetune.api.uris import UriError, parse_uri
from kubetune.api.v1alpha1 import BASE_MUTATING_INITS

TARGETS = ("inferenceservice", "llminferenceservice", "vllm")
KSERVE_VERSION = "v0.20.0"  # the CRDs the manifests are validated against
ISVC_API_VERSION = "serving.kserve.io/v1beta1"
LLMISVC_API_VERSION = "serving.kserve.io/v1alpha2"

# vLLM accepts only these values for --max-lora-rank (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Where KServe's storage initializer puts each storage URI in the predictor container.
BASE_MOUNT = "/mnt/models"
ADAPTER_MOUNT = "/mnt/adapter"
# What KServe's storage initializer can download (its own URI schemes).
KSERVE_SCHEMES = ("s3", "hf", "pvc")


class ServingError(ValueError):
    """The job cannot be served (yet); the message is one line for the user."""


@dataclass(frozen=True)
class ServedModel:
    """What a serving manifest needs to know about a finished job."""

    name: str  # the served model name: the FineTuneJob's name
    namespace: str
    base_uri: str  # spec.model.uri
    adapter_uri: str | None  # the LoRA/QLoRA adapter folder; None when serving one model
    model_uri: str | None  # the full (or merged) model folder; None when serving an adapter
    lora_rank: int | None
    gpus: int = 1

    @property
    def is_adapter(self) -> bool:
        return self.adapter_uri is not None


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds an adapter of `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ServingError(
        f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]}): "
        "serve the merged model instead (spec.output.mergeAdapter)"
    )


# What vLLM's adapter loader refuses (vllm.lora.peft_helper.PEFTHelper._validate_features):
# these `init_lora_weights` values only set the initial weights, every other string init
# (PiSSA, OLoRA, LoftQ ...) changes the base model when PEFT loads the adapter.
VLLM_LORA_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


def vllm_adapter_limits(adapter_config: dict[str, Any]) -> list[str]:
    """Why vLLM would refuse a PEFT adapter (its adapter_config.json), one reason each; [] when
    it loads. The merged model has none of these limits."""
    problems = []
    saved = [
        m for m in adapter_config.get("modules_to_save") or [] if m not in ("classifier", "score")
    ]
    if saved:
        problems.append(f"modules_to_save {saved} (vLLM loads only the LoRA matrices)")
    if adapter_config.get("use_dora"):
        problems.append("DoRA (use_dora; vLLM does not implement it)")
    if adapter_config.get("lora_bias"):
        problems.append("LoRA bias (lora_bias)")
    init = adapter_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_LORA_INITS:
        problems.append(f"init_lora_weights {init!r} (it changes the base model's weights)")
    ranks = [adapter_config.get("r") or 0, *(adapter_config.get("rank_pattern") or {}).values()]
    if max(ranks) > VLLM_LORA_RANKS[-1]:
        problems.append(
            f"rank {max(ranks)} above vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}"
        )
    return problems


def served_model(ftj: dict[str, Any], *, merged: bool = False, force: bool = False) -> ServedModel:
    """The ServedModel of a FineTuneJob object as read from the API server.

    Refuses a job that has not Succeeded or has no published model, and (unless `force`) one
    whose evaluation gate failed: serving a model that missed its own thresholds should be a
    decision, not an accident.
    """
    meta, spec, status = ftj.get("metadata") or {}, ftj.get("spec") or {}, ftj.get("status") or {}
    name = meta.get("name") or "model"
    phase = status.get("phase") or "Pending"
    if phase != "Succeeded":
        raise ServingError(f"{name} is {phase}: only a Succeeded FineTuneJob can be served")
    passed = (status.get("metrics") or {}).get("evalPassed")
    if passed is False and not force:
        raise ServingError(
            f"{name} missed its evaluation thresholds (status.metrics.evalPassed is false); "
            "see `kubetune report`, or pass --force to serve it anyway"
        )
    artifacts = status.get("artifacts") or {}
    note = artifacts.get("servingNote")
    if note and not merged and not force:
        raise ServingError(f"{name}: {note} (serve it with --merged, or pass --force)")
    return model_to_serve(name, meta.get("namespace") or "default", spec, artifacts, merged=merged)


def model_to_serve(
    name: str,
    namespace: str,
    spec: dict[str, Any],
    artifacts: dict[str, str],
    *,
    merged: bool = False,
) -> ServedModel:
    """The ServedModel of a job's spec (as JSON) and its published artifacts (role -> URI)."""
    method = spec.get("method", "lora")
    is_adapter = method in ("lora", "qlora") and not merged
    if merged:
        if not artifacts.get("mergedModel"):
            raise ServingError(
                f"{name} published no merged model (set spec.output.mergeAdapter: true)"
            )
        adapter_uri, model_uri = None, artifacts["mergedModel"]
    elif not artifacts.get("model"):
        raise ServingError(f"{name} has no published model in status.artifacts")
    elif is_adapter:
        adapter_uri, model_uri = artifacts["model"], None
    else:
        adapter_uri, model_uri = None, artifacts["model"]
    lora = spec.get("lora") or {}
    return ServedModel(
        name=name,
        namespace=namespace,
        base_uri=(spec.get("model") or {}).get("uri", ""),
        adapter_uri=adapter_uri,
        model_uri=model_uri,
        lora_rank=published_rank(lora) if adapter_uri else None,
        gpus=max(1, int((spec.get("resources") or {}).get("gpus", 1))),
    )


def published_rank(lora: dict[str, Any]) -> int:
    """The rank of the published adapter: spec.lora.r, doubled for PiSSA/OLoRA, whose adapter
    is published as its difference from the initial one (peft's conversion, rank 2r)."""
    rank = int(lora.get("r", 16))
    return 2 * rank if lora.get("init") in BASE_MUTATING_INITS else rank


def serving_files(model: ServedModel) -> tuple[dict[str, str], list[str]]:
    """File name -> text of every serving document for `model`, and why any is missing."""
    import yaml

    files = {"vllm.sh": render_vllm(model)}
    notes = []
    for target in ("inferenceservice", "llminferenceservice"):
        try:
            manifest = build_manifest(model, target)
        except ServingError as exc:
            notes.append(f"no {target}.yaml: {exc}")
            continue
        files[f"{target}.yaml"] = yaml.safe_dump(manifest, sort_keys=False)
    return files, notes


def kserve_uri(uri: str, what: str) -> str:
    """`uri` as a KServe storage URI; a file:// location is on no cluster node."""
    try:
        parsed = parse_uri(uri)
    except UriError as exc:
        raise ServingError(f"{what}: {exc}") from None
    if parsed.scheme not in KSERVE_SCHEMES:
        raise ServingError(
            f"{what} {uri}: KServe cannot download {parsed.scheme}:// locations "
            "(use s3://, hf:// or pvc://)"
        )
    return uri.rstrip("/") if parsed.scheme != "hf" else f"hf://{parsed.repo_id}"


def _gpu_resources(model: ServedModel) -> dict[str, Any]:
    gpus = str(model.gpus)
    return {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}}


def _metadata(model: ServedModel) -> dict[str, Any]:
    return {
        "name": model.name,
        "namespace": model.namespace,
        "labels": {"kubetune.io/finetunejob": model.name},
    }


def build_inference_service(model: ServedModel) -> dict[str, Any]:
    """A KServe InferenceService on the Hugging Face runtime's vLLM backend."""
    args = [f"--model_name={model.name}"]
    if model.is_adapter:
        storage = [
            {"uri": kserve_uri(model.base_uri, "the base model"), "mountPath": BASE_MOUNT},
            {"uri": kserve_uri(model.adapter_uri or "", "the adapter"), "mountPath": ADAPTER_MOUNT},
        ]
        args += [
            "--enable-lora",
            f"--max-lora-rank={vllm_max_lora_rank(model.lora_rank or 16)}",
            f"--lora-modules={model.name}={ADAPTER_MOUNT}",
        ]
    else:
        storage = [{"uri": kserve_uri(model.model_uri or "", "the model"), "mountPath": BASE_MOUNT}]
    return {
        "apiVersion": ISVC_API_VERSION,
        "kind": "InferenceService",
        "metadata": _metadata(model),
        "spec": {
            "predictor": {
                "storageUris": storage,
                "model": {
                    "modelFormat": {"name": "huggingface"},
                    "args": args,
                    "resources": _gpu_resources(model),
                },
            }
        },
    }


def build_llm_inference_service(model: ServedModel) -> dict[str, Any]:
    """A KServe LLMInferenceService: the base as spec.model.uri, the adapter as a LoRA."""
    spec_model: dict[str, Any] = {"name": model.name}
    if model.is_adapter:
        spec_model["uri"] = kserve_uri(model.base_uri, "the base model")
        spec_model["lora"] = {
            "adapters": [
                {"name": model.name, "uri": kserve_uri(model.adapter_uri or "", "the adapter")}
            ],
            "maxRank": vllm_max_lora_rank(model.lora_rank or 16),
        }
    else:
        spec_model["uri"] = kserve_uri(model.model_uri or "", "the model")
    return {
        "apiVersion": LLMISVC_API_VERSION,
        "kind": "LLMInferenceService",
        "metadata": _metadata(model),
        "spec": {
            "model": spec_model,
            "replicas": 1,
            "template": {
                "containers": [{"name": "main", "resources": _gpu_resources(model)}],
            },
        },
    }


def vllm_base_model(uri: str) -> str:
    """What `vllm serve` is given for the base: the hub id, or a local copy's folder."""
    parsed = parse_uri(uri)
    if parsed.scheme == "hf":
        return parsed.repo_id
    return "./base-model"  # s3:// or pvc:// bases: copy them here first (see docs/serving.md)


def build_vllm_args(model: ServedModel, *, adapter_dir: str = "./adapter") -> list[str]:
    """`vllm serve` arguments. The adapter (or model) is a local folder: vLLM loads LoRA
    adapters from disk, so copy the published folder there first."""
    if not model.is_adapter:
        return ["vllm", "serve", "./model", "--served-model-name", model.name]
    module = {"name": model.name, "path": adapter_dir, "base_model_name": model.base_uri}
    return [
        "vllm",
        "serve",
        vllm_base_model(model.base_uri),
        "--enable-lora",
        "--max-lora-rank",
        str(vllm_max_lora_rank(model.lora_rank or 16)),
        "--lora-modules",
        json.dumps(module, separators=(",", ":")),
    ]


def render_vllm(model: ServedModel) -> str:
    """A shell snippet: fetch the published folder, then `vllm serve` it."""
    source = model.adapter_uri if model.is_adapter else model.model_uri
    target = "./adapter" if model.is_adapter else "./model"
    lines = []
    if source and source.startswith("s3://"):
        lines.append(f"aws s3 cp --recursive {shlex.quote(source)} {target}")
    if model.is_adapter and not model.base_uri.startswith("hf://"):
        lines.append(f"# copy the base model {model.base_uri} to ./base-model")
    lines.append(shlex.join(build_vllm_args(model)))
    return "\n".join(lines) + "\n"


def build_manifest(model: ServedModel, target: str) -> dict[str, Any]:
    if target == "inferenceservice":
        return build_inference_service(model)
    if target == "llminferenceservice":
        return build_llm_inference_service(model)
    raise ServingError(f"unknown target {target!r} (expected one of {', '.join(TARGETS)})")
