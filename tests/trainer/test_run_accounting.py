"""What a run says about itself: tokens trained, published dtype, topology in the manifest."""

from __future__ import annotations

from pathlib import Path

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune_trainer.data import load_training_data
from kubetune_trainer.modeling import Hardware, build_model
from kubetune_trainer.tokens import tokenize_training_data
from kubetune_trainer.train import train_model

CPU = Hardware("cpu", bf16_supported=False)


def _job(tiny_job, tmp_path: Path, method: str, **training) -> FineTuneJob:
    manifest = tiny_job((tmp_path / "out").as_uri(), method=method, training=training)
    return FineTuneJob.model_validate(manifest)


def test_packed_tokens_trained_counts_eos_when_pad_is_eos(tiny_job, tiny_model_dir, tmp_path):
    """Models without a pad token get pad = eos; packed rows have no padding at all, so every
    token of every row is trained, its eos tokens included."""
    job = _job(tiny_job, tmp_path, "lora", packing=True, epochs=1, maxSteps=None)
    data = load_training_data(job.spec.dataset, seed=7, cache_dir=tmp_path / "cache")
    built = build_model(job.spec, tiny_model_dir, hardware=CPU)
    built.tokenizer.pad_token = built.tokenizer.eos_token  # what load_tokenizer does then
    assert built.packing
    tokenized = tokenize_training_data(data, built.tokenizer, max_length=128, train_on_prompt=False)
    tokenized.train = tokenized.train.select(range(8))  # two packed steps are enough
    row_tokens = sum(len(ids) for ids in tokenized.train["input_ids"])
    eos = sum(ids.count(built.tokenizer.eos_token_id) for ids in tokenized.train["input_ids"])
    assert eos > 0
    outcome = train_model(
        built, data, job.spec.training, output_dir=tmp_path / "ckpt", tokenized=tokenized
    )
    assert outcome.tokens_trained == row_tokens


class _Quiet:
    def emit(self, event) -> None:
        pass

    def close(self) -> None:
        pass


def test_full_fine_tune_publishes_16_bit_with_topology_in_manifest(tiny_job, tmp_path):
    """Training keeps fp32 master weights; the published model is stored in 16 bits (the
    tiny base is fp32, so bf16), config dtype included. The manifest says what ran."""
    import json

    from safetensors import safe_open

    from kubetune_trainer.pipeline import RunOptions, run_pipeline

    out = tmp_path / "out"
    job = FineTuneJob.model_validate(
        tiny_job(out.as_uri(), method="full", training={"maxSteps": 1, "batchSize": 2})
    )
    run_pipeline(job, _Quiet(), RunOptions(work_dir=tmp_path / "w", namespace="ns", hardware=CPU))
    run = out / "ns" / "tiny"
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    with safe_open(run / "model" / "model.safetensors", "pt") as weights:
        names = weights.keys()  # a safetensors file handle is not iterable
        dtypes = {str(weights.get_slice(name).get_dtype()) for name in names}
    assert dtypes == {"BF16"}
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["topology"] == {
        "worldSize": 1,
        "nodes": 1,
        "processesPerNode": 1,
        "gpusPerNode": 0,
        "device": "cpu",
        "strategy": "none",
        "requestedStrategy": "auto",
        "perDeviceBatchSize": 2,
        "gradientAccumulationSteps": 1,
        "effectiveBatchSize": 2,
    }


def test_topology_of_a_two_node_gang():
    from kubetune_trainer.distributed import Rank
    from kubetune_trainer.topology import run_topology

    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "gang"},
        "spec": {
            "model": {"uri": "hf://org/model"},
            "method": "full",
            "dataset": {"uri": "s3://b/train.jsonl"},
            "training": {"batchSize": 4, "gradientAccumulationSteps": 2},
            "resources": {"gpus": 8, "nodes": 2},
            "output": {"uri": "s3://b/out/"},
        },
    }
    spec = FineTuneJob.model_validate(manifest).spec
    topology = run_topology(
        Rank(rank=3, local_rank=3, world_size=16, local_world_size=8), spec, "cuda"
    )
    assert topology["nodes"] == 2 and topology["gpusPerNode"] == 8
    assert topology["strategy"] == "fsdp" and topology["requestedStrategy"] == "auto"
    assert topology["effectiveBatchSize"] == 4 * 2 * 16
    # On CPU workers FSDP runs as DDP: the manifest says what ran.
    assert run_topology(Rank(world_size=2, local_world_size=1), spec, "cpu")["strategy"] == "ddp"
    # The shape is torchrun's (`kubetune run --processes 3` of this manifest), not the
    # resources': three processes on one machine, no GPU.
    local = run_topology(Rank(world_size=3, local_world_size=3), spec, "cpu")
    assert (local["worldSize"], local["nodes"], local["processesPerNode"]) == (3, 1, 3)
    assert (local["gpusPerNode"], local["effectiveBatchSize"]) == (0, 4 * 2 * 3)
    alone = run_topology(Rank(), spec, "cuda")
    assert (alone["worldSize"], alone["nodes"], alone["strategy"]) == (1, 1, "none")


def test_qlora_reports_the_loss_of_the_published_merged_model(tiny_job, tiny_model_dir, tmp_path):
    """QLoRA evaluates the 4-bit base + adapter it trained; the merged model it publishes is
    the 16-bit base + merged adapter: its own loss on the same examples is reported beside."""
    import json

    import pytest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer.evaluate.examples import build_example
    from kubetune_trainer.evaluate.inference import token_loss
    from kubetune_trainer.pipeline import RunOptions, eval_rows_for, run_pipeline

    out = tmp_path / "out"
    manifest = tiny_job(
        out.as_uri(),
        method="qlora",
        training={"maxSteps": 1},
        evaluation={"enabled": True, "maxSamples": 1, "maxNewTokens": 1},
    )
    manifest["spec"]["output"]["mergeAdapter"] = True
    job = FineTuneJob.model_validate(manifest)
    result = run_pipeline(
        job, _Quiet(), RunOptions(work_dir=tmp_path / "w", namespace="ns", hardware=CPU)
    )
    run = out / "ns" / "tiny"
    # As published (bf16), computed in bf16 as the trainer computed it.
    merged = AutoModelForCausalLM.from_pretrained(run / "merged-model", dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(run / "merged-model")
    # The tiny model has a chat template: alpaca rows are trained and evaluated as chat.
    data = load_training_data(
        job.spec.dataset, seed=7, cache_dir=tmp_path / "cache", alpaca_as_chat=True
    )
    rows = eval_rows_for(job, data.validation, tmp_path / "cache")
    examples = [build_example(row, tokenizer) for row in rows]
    published = token_loss(merged, examples, pad_id=tokenizer.pad_token_id, batch_size=4,
                           max_length=128).loss  # fmt: skip
    assert result.metrics.mergedEvalLoss == pytest.approx(published, rel=1e-4)
    assert result.metrics.evalLoss is not None
    assert json.loads((run / "manifest.json").read_text())["metrics"]["mergedEvalLoss"]
    report = json.loads((run / "report.json").read_text())
    assert any(note.startswith("QLoRA: these numbers describe") for note in report["notes"])
    assert_merged_into_the_16_bit_base(tiny_model_dir, run)


def assert_merged_into_the_16_bit_base(base_dir: Path, run: Path) -> None:
    """The merged model is the base's own weights plus the adapter's product, stored in bf16:
    not a merge into the 4-bit base QLoRA trained on (its rounding is far larger)."""
    import json

    import bitsandbytes.functional as bnbf
    import torch
    from safetensors.torch import load_file

    merged_dir = run / "merged-model"
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    merged = load_file(merged_dir / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    base = load_file(base_dir / "model.safetensors")
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    scaling = adapter_config["lora_alpha"] / adapter_config["r"]
    checked = 0
    for key in adapter:
        if not key.endswith("lora_A.weight"):
            continue
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        a, b = adapter[key].float(), adapter[key.replace("lora_A", "lora_B")].float()
        expected = base[name].float() + scaling * (b @ a)
        rounding = expected.abs().max() * 2**-7  # bf16's step at the largest value
        assert (merged[name].float() - expected).abs().max() <= rounding, name
        packed, state = bnbf.quantize_4bit(base[name].float(), quant_type="nf4")
        four_bit = bnbf.dequantize_4bit(packed, state).float()
        assert (four_bit - base[name].float()).abs().max() > 4 * rounding, name
        checked += 1
    assert checked
