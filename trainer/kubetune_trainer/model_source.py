"""The base model: a local directory with config.json, wherever spec.model.uri points.

hf://org/name comes from the Hugging Face Hub (revision honoured, token from HF_TOKEN,
HF_HUB_OFFLINE=1 means the local cache only); s3://bucket/prefix is synced into the cache
(files already there with the same size and ETag are skipped, so a restarted pod does not
download again); pvc:// and file:// are used in place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from kubetune.api.contract import ENV_HF_TOKEN
from kubetune.api.v1alpha1 import ModelSource
from kubetune_trainer.errors import BadInputError
from kubetune_trainer.storage import NotFoundError, fetch_s3, parse_uri

# Files a model needs; the rest of a hub repository (other weight formats, ONNX and GGUF
# exports, images) is not downloaded.
HF_ALLOW_PATTERNS = [
    "*.json",
    "*.model",  # sentencepiece
    "*.tiktoken",
    "*.txt",  # merges.txt, vocab.txt
    "*.py",  # trustRemoteCode models
    "*.jinja",  # chat templates kept as separate files
]
SAFETENSORS_WEIGHTS = ["*.safetensors"]
# Only for repositories without safetensors: many ship both, and the pickles double the size.
PYTORCH_WEIGHTS = ["*.bin", "*.pt"]


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE read now, not at import (huggingface_hub reads it once at import)."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(
        os.environ.get("TRANSFORMERS_OFFLINE")
    )


def hub_cache_dir(cache_dir: Path) -> Path:
    """The hub cache: HF_HUB_CACHE or HF_HOME/hub when set (a pre-filled cache volume),
    else under the job's cache directory."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return cache_dir / "huggingface"


def resolve_hf(uri: str, revision: str | None, cache_dir: Path) -> Path:
    parsed = parse_uri(uri)
    at = f" at revision {revision!r}" if revision else ""
    offline = hub_offline()

    def download(weights: list[str]) -> Path:
        return Path(
            snapshot_download(
                parsed.repo_id,
                revision=revision,
                cache_dir=hub_cache_dir(cache_dir),
                token=os.environ.get(ENV_HF_TOKEN) or None,
                local_files_only=offline,
                allow_patterns=HF_ALLOW_PATTERNS + weights,
            )
        )

    try:
        path = download(SAFETENSORS_WEIGHTS)
        if not offline and not any(path.glob("*.safetensors")):
            path = download(PYTORCH_WEIGHTS)
    except RevisionNotFoundError:
        raise BadInputError(f"model not found: {uri}{at} (no such revision)") from None
    except GatedRepoError:
        raise BadInputError(
            f"model not found: {uri} (gated repository: accept its terms and set a token)"
        ) from None
    except RepositoryNotFoundError:
        raise BadInputError(
            f"model not found: {uri} (no such repository, or the token has no access)"
        ) from None
    except HFValidationError as error:
        raise BadInputError(f"model not found: {uri} (invalid repository name: {error})") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        if offline:
            raise BadInputError(
                f"model not found: {uri}{at} (not in the local cache and HF_HUB_OFFLINE is set)"
            ) from None
        raise  # the hub is unreachable: a transient failure, worth a retry
    return path


def require_model_dir(path: Path, uri: str) -> Path:
    """`path` if it is a model directory (holds config.json), else BadInputError."""
    if not path.exists():
        raise BadInputError(f"model not found: {uri}")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise BadInputError(f"model not found: {uri} (no config.json in {path})")
    return path


def needs_remote_code(model_dir: Path) -> list[str]:
    """The files whose `auto_map` makes transformers import the repository's own Python."""
    needing = []
    for name in ("config.json", "tokenizer_config.json", "processor_config.json"):
        path = model_dir / name
        try:
            config = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            continue  # an unreadable file is reported by the loader that needs it
        if isinstance(config, dict) and config.get("auto_map"):
            needing.append(name)
    return needing


def refuse_remote_code(model_dir: Path, source: ModelSource) -> Path:
    """`model_dir`, unless it would run its own code and the spec does not allow that."""
    needing = needs_remote_code(model_dir)
    if needing and not source.trustRemoteCode:
        raise BadInputError(
            f"{source.uri}: the model runs its own Python code (auto_map in "
            f"{', '.join(needing)}); set spec.model.trustRemoteCode: true only if you trust it"
        )
    return model_dir


def resolve_model(source: ModelSource, cache_dir: Path) -> Path:
    """A local directory holding the base model named by `source`; one that needs remote
    code only when the spec allows it."""
    return refuse_remote_code(_resolve_model_dir(source, cache_dir), source)


def _resolve_model_dir(source: ModelSource, cache_dir: Path) -> Path:
    uri = source.uri
    parsed = parse_uri(uri)
    if parsed.scheme == "hf":
        return require_model_dir(resolve_hf(uri, source.revision, Path(cache_dir)), uri)
    if source.revision:
        raise BadInputError(f"spec.model.revision: only valid with hf:// models, not {uri}")
    if parsed.scheme == "s3":
        dest = Path(cache_dir) / "s3" / parsed.bucket / parsed.key.strip("/")
        try:
            # Always a prefix: a model is a folder of files.
            fetch_s3(parse_uri(f"s3://{parsed.bucket}/{parsed.key.strip('/')}/"), dest)
        except NotFoundError:
            raise BadInputError(f"model not found: {uri}") from None
        return require_model_dir(dest, uri)
    return require_model_dir(parsed.local_path, uri)


def resolved_revision(source: ModelSource, path: Path) -> str | None:
    """The hub commit a hf:// model resolved to (its snapshot folder is named after it);
    None for other sources, which have no revisions."""
    if parse_uri(source.uri).scheme != "hf":
        return None
    name = Path(path).name
    return name if len(name) == 40 and all(c in "0123456789abcdef" for c in name) else None


def model_reference(source: ModelSource) -> str:
    """How published artifacts name the base model: the hub id (loadable with
    `from_pretrained` anywhere), else the model URI; never a pod-local path."""
    parsed = parse_uri(source.uri)
    return parsed.repo_id if parsed.scheme == "hf" else source.uri
