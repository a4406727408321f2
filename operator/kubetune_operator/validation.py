"""Checks the CRD schema cannot express, as pure functions.

`validate()` takes what it needs from the cluster as plain data (which Secrets exist and
their keys), so the handlers fetch and this decides.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlparse

from kubetune_operator.builders import REQUIRED_S3_KEYS, credentials_secret
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


def estimate_gpu_memory_gib(method: str, billions: float) -> float:
    return billions * 1e9 * BYTES_PER_PARAM[method] * OVERHEAD / 2**30


def check_gpus(spec: dict, settings: OperatorSettings) -> Problem | None:
    billions = model_size_billions(spec["model"]["uri"])
    if billions is None:
        return None  # unknown size: nothing to say
    method = spec.get("method", "lora")
    gpus = (spec.get("resources") or {}).get("gpus", 1)
    need = estimate_gpu_memory_gib(method, billions)
    have = gpus * settings.gpu_memory_gib
    if need <= have:
        return None
    least = math.ceil(need / settings.gpu_memory_gib)
    hint = " or use method: qlora" if method != "qlora" else ""
    return Problem(
        "Failed",
        "InsufficientGPUs",
        f"method {method} on a ~{billions:g}B model needs about {need:.0f} GiB of GPU memory "
        f"but {gpus} GPU(s) of {settings.gpu_memory_gib:g} GiB give {have:.0f} GiB: "
        f"request spec.resources.gpus >= {least}{hint}",
    )


def _uris(spec: dict) -> list[tuple[str, str]]:
    evaluation = spec.get("evaluation") or {}
    pairs = [
        ("spec.model.uri", spec["model"]["uri"]),
        ("spec.dataset.uri", spec["dataset"]["uri"]),
        ("spec.dataset.validationUri", spec["dataset"].get("validationUri")),
        ("spec.evaluation.datasetUri", evaluation.get("datasetUri")),
        ("spec.evaluation.regressionUri", evaluation.get("regressionUri")),
        ("spec.output.uri", spec["output"]["uri"]),
    ]
    return [(path, uri) for path, uri in pairs if uri]


def check_uris(spec: dict, settings: OperatorSettings) -> Problem | None:
    for path, uri in _uris(spec):
        scheme = urlparse(uri).scheme.lower()
        if scheme not in settings.allowed_schemes:
            allowed = ", ".join(f"{s}://" for s in settings.allowed_schemes)
            return Problem(
                "Failed",
                "URISchemeNotAllowed",
                f"{path}: {scheme}:// is not allowed on this cluster (allowed: {allowed})",
            )
        prefixes = settings.allowed_s3_prefixes
        if scheme == "s3" and prefixes and not any(uri.startswith(p) for p in prefixes):
            return Problem(
                "Failed",
                "URINotAllowed",
                f"{path}: {uri} is outside the allowed S3 locations ({', '.join(prefixes)})",
            )
    return None


def _credentials(spec: dict, settings: OperatorSettings | None) -> tuple[str | None, str]:
    """The credentials Secret a job uses and how to name it in a message."""
    own = (spec["output"].get("credentialsSecretRef") or {}).get("name")
    if own or settings is None:
        return own, "spec.output.credentialsSecretRef"
    return (
        credentials_secret(spec, settings),
        "spec.output.credentialsSecretRef (unset, so the operator's default)",
    )


def check_secrets(
    spec: dict,
    secrets: Mapping[str, frozenset[str]],
    settings: OperatorSettings | None = None,
) -> Problem | None:
    """`secrets`: name -> keys of each Secret that exists in the FineTuneJob's namespace.

    With `settings`, a job without credentialsSecretRef is checked against the operator's
    default credentials Secret (settings.default_credentials_secret).
    """
    creds, where = _credentials(spec, settings)
    if creds:
        if creds not in secrets:
            return Problem("Pending", "SecretNotFound", f"{where}: Secret {creds!r} not found")
        missing = [k for k in REQUIRED_S3_KEYS if k not in secrets[creds]]
        if missing:
            return Problem(
                "Pending",
                "SecretKeyMissing",
                f"{where}: Secret {creds!r} has no key {', '.join(missing)}",
            )
    token = spec["model"].get("tokenSecretRef")
    if token:
        key = token.get("key", "token")
        if token["name"] not in secrets:
            return Problem(
                "Pending",
                "SecretNotFound",
                f"spec.model.tokenSecretRef: Secret {token['name']!r} not found",
            )
        if key not in secrets[token["name"]]:
            return Problem(
                "Pending",
                "SecretKeyMissing",
                f"spec.model.tokenSecretRef: Secret {token['name']!r} has no key {key!r}",
            )
    return None


def referenced_secrets(spec: dict, settings: OperatorSettings | None = None) -> list[str]:
    """Secrets the job's pod will read (with `settings`: including the default credentials)."""
    names = [_credentials(spec, settings)[0]]
    names.append((spec["model"].get("tokenSecretRef") or {}).get("name"))
    return sorted({n for n in names if n})


def validate(
    spec: dict, settings: OperatorSettings, secrets: Mapping[str, frozenset[str]]
) -> Problem | None:
    """The first problem that keeps this FineTuneJob from starting, or None.

    Permanent problems (Failed) come before ones that may fix themselves (Pending).
    """
    return (
        check_uris(spec, settings)
        or check_gpus(spec, settings)
        or check_secrets(spec, secrets, settings)
    )
