"""GGUF export (spec.output.gguf) with llama.cpp's own converters.

The converters (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`, their `conversion/`
package and `gguf-py/`) come from llama-cpp-python's PyPI sdist, which vendors llama.cpp: the
trainer image holds them at /opt/llama.cpp (Dockerfile.trainer), `hack/llamacpp.sh` caches
them for local runs (KUBETUNE_LLAMACPP_CONVERTER names the folder). They run as subprocesses
of the trainer's interpreter: they insert their own `gguf-py` into sys.path.

Before training, `check_convertible` asks the converter whether it knows the base model's
architecture (its registered model classes) and converts the base's vocabulary alone
(`--vocab-only`, seconds): an unknown architecture or a tokenizer llama.cpp cannot represent is
bad input (exit 3), not a failure after hours of training.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from kubetune_trainer.errors import BadInputError, one_line

log = logging.getLogger(__name__)

CONVERTER_ENV = "KUBETUNE_LLAMACPP_CONVERTER"
DEFAULT_CONVERTER = Path("/opt/llama.cpp")
GGUF_DIR = "gguf"
LORA_SUFFIX = "lora-f16"
CHECK_TIMEOUT = 600  # seconds: imports torch and reads the tokenizer
CONVERT_TIMEOUT = 6 * 3600

# Run by the converter's interpreter: for each architecture, whether the converter has a
# registered model class for it (conversion.get_model_class, as convert_hf_to_gguf.py looks it
# up).
_ARCH_PROBE = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
from conversion import get_model_class
known = {}
for name in json.loads(sys.argv[2]):
    try:
        get_model_class(name)
        known[name] = True
    except NotImplementedError:
        known[name] = False
print(json.dumps(known))
"""


def converter_dir() -> Path:
    """The folder with llama.cpp's converters; BadInputError when it is not installed."""
    folder = Path(os.environ.get(CONVERTER_ENV) or DEFAULT_CONVERTER)
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise BadInputError(
            f"spec.output.gguf: llama.cpp's converter is not installed at {folder} "
            f"(set {CONVERTER_ENV}, or run bash hack/llamacpp.sh --converter)"
        )
    return folder


def _run(command: list[str], *, timeout: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def _last_error(process: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "ERROR" in line]
    return one_line((errors or lines or [f"exit code {process.returncode}"])[-1])


def architectures(model_dir: Path) -> list[str]:
    config = json.loads((model_dir / "config.json").read_text())
    return list(config.get("architectures") or [])


def check_convertible(model_dir: Path, work: Path) -> None:
    """BadInputError unless llama.cpp's converter can convert `model_dir` (architecture and
    tokenizer), checked before training."""
    converter = converter_dir()
    names = architectures(model_dir)
    if not names:
        raise BadInputError(
            "spec.output.gguf: the base model's config.json names no architectures, so "
            "llama.cpp's converter cannot pick a model class"
        )
    probe = _run(
        [sys.executable, "-c", _ARCH_PROBE, str(converter), json.dumps(names)],
        timeout=CHECK_TIMEOUT,
    )
    if probe.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter does not load: {_last_error(probe)}")
    known = json.loads(probe.stdout.strip().splitlines()[-1])
    if not any(known.values()):
        raise BadInputError(
            f"spec.output.gguf: llama.cpp's converter does not support the architecture "
            f"{', '.join(names)} of spec.model (no GGUF export for it; remove spec.output.gguf)"
        )
    work.mkdir(parents=True, exist_ok=True)
    outfile = work / "vocab-check.gguf"
    vocab = _run(
        [
            sys.executable, str(converter / "convert_hf_to_gguf.py"), "--vocab-only",
            "--outfile", str(outfile), str(model_dir),
        ],
        timeout=CHECK_TIMEOUT,
    )  # fmt: skip
    outfile.unlink(missing_ok=True)
    if vocab.returncode != 0:
        raise BadInputError(
            f"spec.output.gguf: llama.cpp's converter cannot convert the tokenizer of "
            f"spec.model: {_last_error(vocab)}"
        )


def model_file(name: str, quantization: str) -> str:
    return f"{GGUF_DIR}/{name}-{quantization}.gguf"


def lora_file(name: str) -> str:
    return f"{GGUF_DIR}/{name}-{LORA_SUFFIX}.gguf"


def convert_model(model_dir: Path, staging: Path, name: str, quantizations: list[str]) -> list[str]:
    """gguf/<name>-<q>.gguf under `staging` for each quantization; returns their keys."""
    converter = converter_dir()
    written = []
    for quantization in quantizations:
        key = model_file(name, quantization)
        (staging / key).parent.mkdir(parents=True, exist_ok=True)
        process = _run(
            [
                sys.executable, str(converter / "convert_hf_to_gguf.py"),
                "--outtype", quantization, "--outfile", str(staging / key), str(model_dir),
            ],
            timeout=CONVERT_TIMEOUT,
        )  # fmt: skip
        if process.returncode != 0:
            raise RuntimeError(f"GGUF conversion ({quantization}) failed: {_last_error(process)}")
        log.info("wrote %s", key)
        written.append(key)
    return written


def adapter_unsupported(adapter_dir: Path) -> str | None:
    """Why llama.cpp cannot load this adapter as a GGUF LoRA (None: it can)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        return f"a {config.get('peft_type')} adapter"
    if config.get("use_dora"):
        return "a DoRA adapter (llama.cpp applies plain LoRA only)"
    if config.get("modules_to_save"):
        return "an adapter with modules_to_save (fully trained modules, not LoRA)"
    return None


def convert_adapter(adapter_dir: Path, base_dir: Path, staging: Path, name: str) -> str:
    """gguf/<name>-lora-f16.gguf: the LoRA adapter for llama.cpp (--lora), for the base whose
    config is in `base_dir`."""
    converter = converter_dir()
    key = lora_file(name)
    (staging / key).parent.mkdir(parents=True, exist_ok=True)
    process = _run(
        [
            sys.executable, str(converter / "convert_lora_to_gguf.py"), "--outtype", "f16",
            "--base", str(base_dir), "--outfile", str(staging / key), str(adapter_dir),
        ],
        timeout=CONVERT_TIMEOUT,
    )  # fmt: skip
    if process.returncode != 0:
        raise RuntimeError(f"GGUF LoRA conversion failed: {_last_error(process)}")
    log.info("wrote %s", key)
    return key
