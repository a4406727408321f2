"""Full, LoRA and QLoRA fine-tuning for real on CPU: the loss falls and the saved result loads
back and generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune_trainer.data import load_training_data
from kubetune_trainer.modeling import Hardware, build_model, quantization_config
from kubetune_trainer.publish import save_model_files
from kubetune_trainer.train import release_training_state, sft_config, train_model

CPU = Hardware("cpu", bf16_supported=False)


def _job(tiny_job, tmp_path: Path, method: str, **training) -> FineTuneJob:
    manifest = tiny_job((tmp_path / "out").as_uri(), method=method, training=training)
    return FineTuneJob.model_validate(manifest)


def _generate(model, tokenizer) -> tuple[int, int]:
    prompt = "### Instruction:\nExtract the person's name, city and job as JSON.\n\n### Response:\n"
    inputs = tokenizer(prompt, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    return inputs["input_ids"].shape[1], output.shape[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "learning_rate"), [("full", 1e-3), ("lora", 5e-3), ("qlora", 5e-3)]
)
def test_method_trains_and_published_model_loads(
    method, learning_rate, tiny_job, tiny_model_dir, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = _job(tiny_job, tmp_path, method, learningRate=learning_rate, epochs=2)
    data = load_training_data(job.spec.dataset, seed=7, cache_dir=tmp_path / "cache")
    built = build_model(job.spec, tiny_model_dir, hardware=CPU)
    if method == "qlora":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in built.model.modules())
        assert any("computeDtype bfloat16 ignored on CPU" in n for n in built.notes)

    outcome = train_model(built, data, job.spec.training, output_dir=tmp_path / "ckpt")
    # Evaluation runs without the optimizer state (Adam: two values per trained parameter).
    import gc
    import weakref

    optimizer = weakref.ref(outcome.trainer.optimizer.optimizer)
    release_training_state(outcome.trainer)
    gc.collect()
    assert optimizer() is None

    assert outcome.global_step == outcome.max_steps > 4
    assert outcome.first_loss > outcome.train_loss, outcome.log_history
    assert outcome.eval_loss is not None
    assert outcome.tokens_trained > 0
    if method == "qlora":
        # Adapter weights stay float32 on CPU (TRL would have made them bf16).
        trainable = [p for p in outcome.model.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable)

    staging = tmp_path / "publish"
    folder = save_model_files(
        outcome.model, built.tokenizer, is_adapter=built.is_adapter, staging=staging
    )
    saved = staging / folder
    tokenizer = AutoTokenizer.from_pretrained(saved)
    if method == "full":
        assert folder == "model"
        assert (saved / "model.safetensors").is_file() and (saved / "config.json").is_file()
        reloaded = AutoModelForCausalLM.from_pretrained(saved)
        trained = outcome.model.state_dict()
        name = "model.layers.0.mlp.down_proj.weight"
        assert torch.equal(reloaded.state_dict()[name], trained[name].cpu())
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        assert not torch.equal(base.state_dict()[name], reloaded.state_dict()[name])
    else:
        assert folder == "adapter"
        assert (saved / "adapter_config.json").is_file()
        assert (saved / "adapter_model.safetensors").is_file()
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        reloaded = PeftModel.from_pretrained(base, saved)
        lora_b = [p for n, p in reloaded.named_parameters() if "lora_B" in n]
        # LoRA B starts at zero: a non-zero B means the trained adapter was saved.
        assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    prompt_length, total_length = _generate(reloaded, tokenizer)
    assert total_length == prompt_length + 6


def test_training_spec_maps_onto_sft_config(tmp_path):
    from kubetune.api.v1alpha1 import TrainingSpec

    spec = TrainingSpec(
        epochs=2,
        maxSteps=50,
        learningRate=1e-4,
        lrScheduler="linear",
        warmupRatio=0.1,
        weightDecay=0.01,
        batchSize=8,
        gradientAccumulationSteps=2,
        maxSeqLength=512,
        packing=True,
        gradientCheckpointing=False,
        seed=3,
        logEverySteps=5,
        evalEverySteps=20,
        checkpointEverySteps=25,
    )
    config = sft_config(spec, output_dir=tmp_path, has_validation=True, hardware=CPU)
    assert (config.num_train_epochs, config.max_steps) == (2, 50)
    assert config.learning_rate == 1e-4 and config.lr_scheduler_type == "linear"
    assert config.warmup_steps == 0.1 and config.weight_decay == 0.01
    assert config.per_device_train_batch_size == 8 and config.gradient_accumulation_steps == 2
    assert config.max_length == 512 and config.packing and config.packing_strategy == "bfd"
    assert not config.activation_checkpointing and config.seed == 3
    assert config.logging_steps == 5
    assert config.eval_strategy == "steps" and config.eval_steps == 20
    assert config.save_steps == 25
    assert config.report_to == [] or config.report_to == "none"
    assert config.disable_tqdm and not config.bf16 and not config.fp16

    # Default: evaluate at each epoch end when there is validation data, never without.
    default = TrainingSpec()
    assert (
        sft_config(default, output_dir=tmp_path, has_validation=True, hardware=CPU).eval_strategy
        == "epoch"
    )
    assert (
        sft_config(default, output_dir=tmp_path, has_validation=False, hardware=CPU).eval_strategy
        == "no"
    )
    assert (
        sft_config(default, output_dir=tmp_path, has_validation=False, hardware=CPU).max_steps == -1
    )


def test_qlora_compute_dtype_follows_hardware():
    from kubetune.api.v1alpha1 import QuantizationSpec

    spec = QuantizationSpec(computeDtype="bfloat16", quantType="fp4", doubleQuant=False)
    on_cpu, note = quantization_config(spec, CPU)
    assert on_cpu.bnb_4bit_compute_dtype == torch.float32 and "ignored on CPU" in note
    assert on_cpu.bnb_4bit_quant_type == "fp4" and not on_cpu.bnb_4bit_use_double_quant
    on_gpu, note = quantization_config(spec, Hardware("cuda", bf16_supported=True))
    assert on_gpu.bnb_4bit_compute_dtype == torch.bfloat16 and note is None
    old_gpu, note = quantization_config(spec, Hardware("cuda", bf16_supported=False))
    assert old_gpu.bnb_4bit_compute_dtype == torch.float16 and "float16" in note


def test_unknown_lora_target_module_is_bad_input(tiny_job, tiny_model_dir, tmp_path):
    from kubetune_trainer.errors import BadInputError

    manifest = tiny_job((tmp_path / "out").as_uri(), method="lora")
    manifest["spec"]["lora"] = {"targetModules": ["qkv_fused"]}
    job = FineTuneJob.model_validate(manifest)
    with pytest.raises(BadInputError, match=r"^spec\.lora\.targetModules: .*qkv_fused"):
        build_model(job.spec, tiny_model_dir, hardware=CPU)
