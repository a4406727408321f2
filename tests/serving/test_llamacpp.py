"""A published GGUF export loads in real llama.cpp and answers as HF does.

A real LoRA fine-tune of a tiny Llama (the trainer's own pipeline) with
`spec.output.gguf: {quantizations: [f16, q8_0]}` publishes gguf/<name>-f16.gguf,
gguf/<name>-q8_0.gguf (the merged model, converted by llama.cpp's own converter) and
gguf/<name>-lora-f16.gguf (the adapter as a llama.cpp LoRA). llama-cpp-python, compiled from
its PyPI sdist for this CPU (hack/llamacpp.sh, its own cached environment), loads each file;
greedy decoding of NEW_TOKENS tokens for 8 prompts (fed as the HF tokenizer's ids):
  - f16 equals HF's greedy tokens on the published merged model exactly;
  - q8_0 agrees on at least Q8_MIN_SHARE of the tokens (8-bit weights move the logits);
  - the f16 base GGUF with the GGUF LoRA applied (`--lora`) equals the merged model.

llama.cpp's converter recognises a byte-level BPE tokenizer only by the hash of its output on a
fixed text (the known pre-tokenizers of published models); the tiny model's trained tokenizer
is unknown, so the trainer refuses it before training (tests/trainer/test_gguf.py). Here its
tokenizer.json is marked as a Llama (SentencePiece-style, byte-fallback) BPE, which llama.cpp
converts without the hash: HF tokenizes exactly as before, and the comparison is on token ids.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.v1alpha1 import FineTuneJob
from tests.fixtures.tiny_model import job_manifest
from tests.serving.parts import cached_part

HERE = Path(__file__).resolve().parent
NEW_TOKENS = 12
PROMPTS = 8
# Measured: q8_0 agreed with HF on 96 of 96 tokens (100%); the 10 points allowed are for
# 8-bit rounding flipping a near-tie (a flip also changes every later token of its prompt).
Q8_MIN_SHARE = 0.9


def as_llama_bpe(model_dir: Path) -> None:
    """Mark the tiny model's byte-level BPE as byte-fallback (a Llama BPE for llama.cpp's
    converter); its tokenization is unchanged (every byte is already in the vocabulary)."""
    path = model_dir / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    tokenizer["model"]["byte_fallback"] = True
    tokenizer["decoder"] = {"type": "Sequence", "decoders": [tokenizer["decoder"]]}
    path.write_text(json.dumps(tokenizer))


def llamacpp_greedy(python: Path, model: Path, prompts: list[list[int]], lora: Path | None = None):
    command = [str(python), str(HERE / "llamacpp_greedy.py"), str(model)]
    command += ["--tokens", str(NEW_TOKENS), *(["--lora", str(lora)] if lora else [])]
    out = subprocess.run(
        command, input=json.dumps(prompts), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def hf_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            generated = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
            )
            out.append(generated[0, len(ids) :].tolist())
    return out


def share_equal(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [
        (x, y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True)
    ]
    return sum(x == y for x, y in pairs) / len(pairs)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_published_gguf_files_decode_in_llamacpp_as_hf(
    demo_dataset_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    from kubetune_trainer import gguf
    from kubetune_trainer.demo_assets import TinyModelShape, write_tiny_model
    from kubetune_trainer.modeling import Hardware
    from kubetune_trainer.pipeline import RunOptions, run_pipeline

    llamacpp = cached_part("llamacpp.sh", "llama.cpp (llama-cpp-python and the converter)")
    python = llamacpp / "venv" / "bin" / "python"
    monkeypatch.setenv(gguf.CONVERTER_ENV, str(llamacpp / "converter"))

    shape = TinyModelShape(num_attention_heads=2, num_key_value_heads=1)
    base = write_tiny_model(tmp_path / "base", seed=0, shape=shape, pretrain_steps=20)
    as_llama_bpe(base)
    output = tmp_path / "runs"
    manifest = job_manifest(
        base,
        demo_dataset_path,
        output.as_uri() + "/",
        name="served",
        training={"maxSteps": 8},
        output={"uri": output.as_uri() + "/", "gguf": {"quantizations": ["f16", "q8_0"]}},
        lora={"r": 8, "dropout": 0.0},
    )

    class NoProgress:
        def emit(self, event: Any) -> None:
            pass

        def close(self) -> None:
            pass

    result = run_pipeline(
        FineTuneJob.model_validate(manifest),
        NoProgress(),
        RunOptions(
            work_dir=tmp_path / "work",
            namespace="team-a",
            hardware=Hardware("cpu", bf16_supported=False),
        ),
    )
    published = output / "team-a" / "served"
    assert result.artifacts.gguf == (published / "gguf").as_uri() + "/"
    files = json.loads((published / "manifest.json").read_text())["files"]
    expected = {"gguf/served-f16.gguf", "gguf/served-q8_0.gguf", "gguf/served-lora-f16.gguf"}
    assert expected <= set(files)
    merged = published / "merged-model"  # gguf implies the merged model

    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = [json.loads(line) for line in demo_dataset_path.read_text().splitlines()[:PROMPTS]]
    prompts = [tokenizer(f"{row['instruction']}\n{row['input']}\n")["input_ids"] for row in rows]
    expected_merged = hf_greedy(merged, prompts)
    assert expected_merged != hf_greedy(base, prompts), "the adapter changes nothing"

    gguf_dir = published / "gguf"
    assert llamacpp_greedy(python, gguf_dir / "served-f16.gguf", prompts) == expected_merged
    q8 = llamacpp_greedy(python, gguf_dir / "served-q8_0.gguf", prompts)
    share = share_equal(q8, expected_merged)
    assert share >= Q8_MIN_SHARE, f"q8_0 agrees with HF on {share:.1%} of the tokens"

    # The adapter GGUF on the base (converted by the same converter) answers as the merged
    # model.
    (base_gguf,) = gguf.convert_model(base, tmp_path / "base-gguf", "base", ["f16"])
    with_lora = llamacpp_greedy(
        python, tmp_path / "base-gguf" / base_gguf, prompts, gguf_dir / "served-lora-f16.gguf"
    )
    assert with_lora == expected_merged
