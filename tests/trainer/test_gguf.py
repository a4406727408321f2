"""spec.output.gguf: what llama.cpp's converter cannot convert is refused before training.

The converter is llama.cpp's own (from llama-cpp-python's sdist, `bash hack/llamacpp.sh
--converter`); tests/serving/test_llamacpp.py proves the files it writes in llama.cpp.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.api.contract import EXIT_BAD_INPUT
from kubetune.api.v1alpha1 import GGUF_UNIQUE_MESSAGE, OutputSpec
from tests.fixtures.tiny_model import trainer_pod_files

ROOT = Path(__file__).resolve().parents[2]


def llamacpp_converter() -> Path:
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / "llamacpp.sh"), "--print-dir"],
        capture_output=True,
        text=True,
        check=True,
    )
    converter = Path(out.stdout.strip()) / "converter"
    if not (converter / ".complete").exists():
        if os.environ.get("KUBETUNE_REQUIRE_CLUSTER"):
            pytest.fail(f"llama.cpp's converter is missing from {converter}: bash hack/llamacpp.sh")
        pytest.skip("llama.cpp's converter is not installed (bash hack/llamacpp.sh --converter)")
    return converter


def test_quantizations_are_listed_once() -> None:
    assert OutputSpec(uri="s3://b/p/", gguf={"quantizations": ["f16", "q8_0"]}).publishes_merged
    with pytest.raises(ValueError, match=GGUF_UNIQUE_MESSAGE):
        OutputSpec(uri="s3://b/p/", gguf={"quantizations": ["f16", "f16"]})
    with pytest.raises(ValueError, match="q4_k"):
        OutputSpec(uri="s3://b/p/", gguf={"quantizations": ["q4_k"]})


@pytest.mark.slow
@pytest.mark.parametrize(
    ("architecture", "message"),
    [
        (
            "KubetuneToyForCausalLM",
            "spec.output.gguf: llama.cpp's converter does not support the architecture "
            "KubetuneToyForCausalLM of spec.model",
        ),
        # A real Llama whose byte-level BPE tokenizer llama.cpp does not recognise (it knows
        # the pre-tokenizers of published models by a hash of their output).
        (
            None,
            "spec.output.gguf: llama.cpp's converter cannot convert the tokenizer of "
            "spec.model: NotImplementedError: BPE pre-tokenizer was not recognized",
        ),
    ],
)
def test_what_llamacpp_cannot_convert_is_refused_before_training(
    tiny_model_dir: Path,
    tiny_job,
    tmp_path: Path,
    architecture: str | None,
    message: str,
) -> None:
    converter = llamacpp_converter()
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    if architecture:
        config = json.loads((base / "config.json").read_text())
        config["architectures"] = [architecture]
        (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    manifest = tiny_job(
        out.as_uri(), output={"uri": out.as_uri(), "gguf": {"quantizations": ["f16"]}}
    )
    manifest["spec"]["model"]["uri"] = base.as_uri()
    termination_log, env = trainer_pod_files(manifest, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer"],
        env={**env, "KUBETUNE_LLAMACPP_CONVERTER": str(converter)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    text = termination_log.read_text().strip()
    assert text.startswith(message), text
    assert "\n" not in text
    stages = [
        json.loads(line).get("stage") for line in proc.stdout.splitlines() if line.startswith("{")
    ]
    assert "model-download" in stages, proc.stdout[-2000:]
    assert "train" not in stages and "dataset" not in stages, stages  # refused before
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))
