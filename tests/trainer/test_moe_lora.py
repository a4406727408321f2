"""LoRA on a mixture-of-experts model: the fused expert weights are adapted and trained, and
the run says what the adapter covers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune_trainer.data import load_training_data
from kubetune_trainer.modeling import Hardware, build_model
from kubetune_trainer.moe import expert_parameters
from kubetune_trainer.train import train_model

CPU = Hardware("cpu", bf16_supported=False)


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory) -> Path:
    """A random Qwen3-MoE (2 layers, 4 experts of which 2 per token) with the demo tokenizer."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from kubetune_trainer.demo_assets import build_tokenizer

    directory = tmp_path_factory.mktemp("tiny-moe") / "model"
    tokenizer = build_tokenizer(768, seed=0)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _job(tiny_job, model_dir: Path, tmp_path: Path, **lora) -> FineTuneJob:
    manifest = tiny_job((tmp_path / "out").as_uri(), method="lora", training={"maxSteps": 1})
    manifest["spec"]["model"]["uri"] = model_dir.resolve().as_uri()
    if lora:
        manifest["spec"]["lora"] = lora
    return FineTuneJob.model_validate(manifest)


def _expert_lora(model) -> dict[str, torch.Tensor]:
    return {
        name: parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and ".experts." in name and "lora_B" in name
    }


def test_all_linear_adapts_and_trains_the_fused_experts(tiny_job, tiny_moe_dir, tmp_path):
    job = _job(tiny_job, tiny_moe_dir, tmp_path)  # targetModules default: all-linear
    built = build_model(job.spec, tiny_moe_dir, hardware=CPU)
    assert built.adapter_targets["expertParameters"] == [
        "experts.down_proj",
        "experts.gate_up_proj",
    ]
    assert built.adapter_targets["expertParametersNotAdapted"] == []
    assert "q_proj" in built.adapter_targets["modules"]
    before = _expert_lora(built.model)
    # LoRA on both fused weights of both layers (peft nests one wrapper per parameter).
    assert len(before) == 4 and all(float(b.abs().sum()) == 0 for b in before.values())
    assert any("dropout" in warning for warning in built.warnings)  # 0.05 cannot apply

    data = load_training_data(job.spec.dataset, seed=7, cache_dir=tmp_path / "cache")
    train_model(built, data, job.spec.training, output_dir=tmp_path / "ckpt")
    after = _expert_lora(built.model)
    assert all(float(after[name].abs().sum()) > 0 for name in before), "experts did not train"


def test_experts_left_out_are_named(tiny_job, tiny_moe_dir, tmp_path):
    job = _job(tiny_job, tiny_moe_dir, tmp_path, targetModules=["q_proj", "v_proj"], dropout=0.0)
    built = build_model(job.spec, tiny_moe_dir, hardware=CPU)
    assert built.adapter_targets["expertParameters"] == []
    assert built.adapter_targets["expertParametersNotAdapted"] == [
        "experts.down_proj",
        "experts.gate_up_proj",
    ]
    assert any("experts of this qwen3_moe model are not adapted" in w for w in built.warnings)
    # A dense model has no fused experts.
    assert not expert_parameters(torch.nn.Linear(2, 2))
