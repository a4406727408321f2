"""The options users expect (rsLoRA, DoRA, LoRA initialisations, NEFTune, 8-bit and paged
AdamW, bfd_split packing, Liger kernels): each reaches peft / TRL / transformers as the
documented setting, and the ones that change the model train for real on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubetune.api.v1alpha1 import FineTuneJob, LoraSpec, TrainingSpec
from kubetune_trainer import options
from kubetune_trainer.data import load_training_data
from kubetune_trainer.modeling import Hardware, build_model, lora_config
from kubetune_trainer.train import sft_config

CPU = Hardware("cpu", bf16_supported=False)


def _job(tiny_job, tmp_path: Path, method: str = "lora", *, lora=None, **training) -> FineTuneJob:
    extra = {"lora": lora} if lora is not None else {}
    manifest = tiny_job((tmp_path / "out").as_uri(), method=method, training=training, **extra)
    return FineTuneJob.model_validate(manifest)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, {"use_rslora": False, "use_dora": False, "init_lora_weights": True}),
        ({"useRslora": True}, {"use_rslora": True}),
        ({"useDora": True}, {"use_dora": True}),
        ({"init": "pissa"}, {"init_lora_weights": "pissa"}),
        ({"init": "olora"}, {"init_lora_weights": "olora"}),
        ({"init": "gaussian"}, {"init_lora_weights": "gaussian"}),
        ({"init": "eva"}, {"init_lora_weights": "eva"}),
        # LoftQ replaces the default-initialised adapter once the 4-bit base is loaded.
        ({"init": "loftq"}, {"init_lora_weights": True}),
    ],
)
def test_lora_options_reach_peft(spec, expected):
    config = lora_config(LoraSpec.model_validate(spec))
    for name, value in expected.items():
        assert getattr(config, name) == value, name


def test_eva_keeps_rank_r_on_every_layer():
    config = lora_config(LoraSpec.model_validate({"init": "eva"}))
    assert config.eva_config is not None and config.eva_config.rho == 1.0
    assert lora_config(LoraSpec()).eva_config is None


@pytest.mark.slow
def test_eva_sets_lora_a_to_the_principal_directions_of_the_layer_inputs_and_trains(
    tiny_job, tiny_model_dir, tmp_path
):
    """EVA's A is the top-r principal directions of each adapted layer's inputs on the first
    training batches (loss tokens only): orthonormal rows spanning those directions. peft's
    default (Kaiming-uniform) A is neither, so a silently ignored init fails here."""
    from kubetune_trainer.pipeline import init_eva
    from kubetune_trainer.tokens import IGNORE_INDEX, tokenize_training_data
    from kubetune_trainer.train import train_model

    r = 4
    lora = {"r": r, "init": "eva", "targetModules": ["q_proj"]}
    job = _job(tiny_job, tmp_path, lora=lora, maxSteps=2, batchSize=4)
    data = load_training_data(job.spec.dataset, seed=7, cache_dir=tmp_path / "cache")
    built = build_model(job.spec, tiny_model_dir, hardware=CPU)
    tokenized = tokenize_training_data(
        data, built.tokenizer, max_length=job.spec.training.maxSeqLength, train_on_prompt=False
    )
    layers = {n: m for n, m in built.model.named_modules() if n.endswith("q_proj")}
    # The inputs of the first q_proj on EVA's batches, as peft's hook sees them.
    batches = options.eva_batches(tokenized.train, built.tokenizer.pad_token_id or 0, 4, r)
    first = next(iter(layers.values()))
    seen: list[torch.Tensor] = []
    handle = first.base_layer.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        for batch in batches:
            built.model(**batch)
    handle.remove()
    masks = [(b["attention_mask"].bool() & (b["labels"] != IGNORE_INDEX)) for b in batches]
    inputs = torch.cat([x[m] for x, m in zip(seen, masks, strict=True)]).float()
    default_a = first.lora_A["default"].weight.detach().clone()

    init_eva(built, tokenized, job.spec)

    for name, layer in layers.items():
        a = layer.lora_A["default"].weight.detach().float()
        assert a.shape[0] == r, name  # rho 1: no rank moved between layers
        torch.testing.assert_close(a @ a.T, torch.eye(r), atol=1e-3, rtol=0)
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # starts as the base
    gram = default_a @ default_a.T
    assert not torch.allclose(gram, torch.eye(r), atol=1e-2)  # the default is not orthonormal
    # A spans the top principal directions of the centred inputs (PCA, as peft computes it).
    a = first.lora_A["default"].weight.detach().float()
    _, _, vh = torch.linalg.svd(inputs - inputs.mean(0), full_matrices=False)
    captured = (a @ vh[:r].T).square().sum() / r  # 1.0: the same subspace
    assert captured > 0.9, captured
    assert (default_a.float() @ vh[:r].T).square().sum() / r < 0.5

    outcome = train_model(built, data, job.spec.training, output_dir=tmp_path / "ckpt")
    assert outcome.global_step == 2 and outcome.first_loss is not None


def test_training_options_reach_the_sft_config(tmp_path):
    default = sft_config(TrainingSpec(), output_dir=tmp_path, has_validation=False, hardware=CPU)
    assert default.optim == "adamw_torch" and default.neftune_noise_alpha is None
    assert default.packing_strategy == "bfd" and not default.use_liger_kernel

    spec = TrainingSpec.model_validate(
        {"optimizer": "paged_adamw_8bit", "neftuneNoiseAlpha": 5.0, "packingStrategy": "bfd_split"}
    )
    config = sft_config(spec, output_dir=tmp_path, has_validation=False, hardware=CPU, liger=True)
    assert config.optim == "paged_adamw_8bit"
    assert config.neftune_noise_alpha == 5.0
    assert config.packing and config.packing_strategy == "bfd_split"
    assert config.use_liger_kernel
    names = {
        name: options.optimizer_name(TrainingSpec(optimizer=name)) for name in options.OPTIMIZERS
    }
    assert names == {
        "adamw": "adamw_torch",
        "adamw_8bit": "adamw_bnb_8bit",
        "paged_adamw": "paged_adamw_32bit",
        "paged_adamw_8bit": "paged_adamw_8bit",
    }


def test_liger_is_never_on_on_cpu_and_on_by_default_on_cuda_where_supported():
    # CPU: off whatever the setting; asking for it explains why.
    assert options.use_liger(None, "cpu", "llama") == (False, None)
    on_cpu, note = options.use_liger(True, "cpu", "llama")
    assert not on_cpu and "CUDA" in note
    # CUDA: unset means on for architectures Liger has kernels for, off for others.
    assert options.use_liger(None, "cuda", "llama") == (True, None)
    assert options.use_liger(None, "cuda", "qwen3") == (True, None)
    assert options.use_liger(None, "cuda", "no-such-model") == (False, None)
    assert options.use_liger(False, "cuda", "llama") == (False, None)
    asked, note = options.use_liger(True, "cuda", "no-such-model")
    assert not asked and "no-such-model" in note


def test_a_cpu_build_never_enables_liger(tiny_job, tiny_model_dir, tmp_path):
    job = _job(tiny_job, tmp_path, "full", ligerKernels=True)
    built = build_model(job.spec, tiny_model_dir, hardware=CPU)
    assert not built.liger
    assert any("ligerKernels off" in warning for warning in built.warnings)
    config = sft_config(
        job.spec.training,
        output_dir=tmp_path,
        has_validation=False,
        hardware=CPU,
        liger=built.liger,
    )
    assert not config.use_liger_kernel


def test_bfd_split_keeps_every_token_of_an_overlong_row(tiny_model_dir):
    """bfd cuts a row at maxSeqLength; bfd_split keeps the whole row for TRL's packer, which
    splits it into pieces of at most maxSeqLength tokens."""
    import datasets
    from trl.data_utils import pack_dataset

    from kubetune_trainer.modeling import load_tokenizer
    from kubetune_trainer.tokens import tokenize_training_data

    class Data:
        format = "text"
        train = datasets.Dataset.from_list([{"text": "word " * 150}, {"text": "short row"}])
        train_refs = ["row 1", "row 2"]
        validation = None
        validation_refs: list[str] = []

    tokenizer = load_tokenizer(tiny_model_dir)
    kwargs = {"max_length": 64, "train_on_prompt": False}
    cut = tokenize_training_data(Data, tokenizer, **kwargs)
    whole = tokenize_training_data(Data, tokenizer, split_overlong=True, **kwargs)
    lengths = [len(ids) for ids in whole.train["input_ids"]]
    assert cut.train_lengths.truncated == 1 and max(len(i) for i in cut.train["input_ids"]) == 64
    assert whole.train_lengths.truncated == 0 and max(lengths) > 64

    packed = pack_dataset(whole.train, 64, "bfd_split")
    rows = packed["input_ids"]
    assert all(len(row) <= 64 for row in rows)
    assert sum(len(row) for row in rows) == sum(lengths)


@pytest.mark.slow
def test_pissa_adapter_is_published_as_a_lora_on_the_original_base(
    tiny_job, tiny_model_dir, tmp_path
):
    """PiSSA trains on a residual base; the published adapter, applied to the original base
    model, must give the trained model's outputs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.data import load_training_data
    from kubetune_trainer.publish import save_model_files
    from kubetune_trainer.train import train_model

    lora = {"r": 4, "init": "pissa", "useRslora": True, "targetModules": ["q_proj", "v_proj"]}
    job = _job(tiny_job, tmp_path, lora=lora, maxSteps=3, learningRate=1e-2, neftuneNoiseAlpha=5.0)
    data = load_training_data(job.spec.dataset, seed=7, cache_dir=tmp_path / "cache")
    built = build_model(job.spec, tiny_model_dir, hardware=CPU)
    assert built.initial_adapter is not None
    outcome = train_model(built, data, job.spec.training, output_dir=tmp_path / "ckpt")
    assert outcome.global_step == 3

    folder = save_model_files(
        outcome.model,
        built.tokenizer,
        is_adapter=True,
        staging=tmp_path / "publish",
        initial_adapter=built.initial_adapter,
    )
    ids = torch.tensor([built.tokenizer("### Instruction:\nName a city.")["input_ids"]])
    trained = outcome.model.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        untouched = base(input_ids=ids).logits
        published = PeftModel.from_pretrained(base, tmp_path / "publish" / folder).eval()
        got = published(input_ids=ids).logits
    assert published.peft_config["default"].r == 8  # [A | A0]: twice the rank
    assert not torch.allclose(untouched, expected, atol=1e-4)  # training changed the model
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "lora", "optimizer"),
    [
        ("qlora", {"useDora": True}, "paged_adamw_8bit"),
        ("lora", {"init": "olora"}, "adamw_8bit"),
        ("qlora", {"init": "eva", "useDora": True}, "adamw"),
    ],
    ids=["qlora-dora-paged8bit", "lora-olora-8bit", "qlora-eva-dora"],
)
def test_options_train_on_cpu(method, lora, optimizer, tiny_job, tiny_model_dir, tmp_path):
    from kubetune_trainer.data import load_training_data
    from kubetune_trainer.train import train_model

    lora = {"r": 4, "targetModules": ["q_proj", "v_proj"], **lora}
    job = _job(tiny_job, tmp_path, method, lora=lora, maxSteps=2, optimizer=optimizer)
    data = load_training_data(job.spec.dataset, seed=7, cache_dir=tmp_path / "cache")
    built = build_model(job.spec, tiny_model_dir, hardware=CPU)
    if lora.get("init") == "eva":
        from kubetune_trainer.pipeline import init_eva
        from kubetune_trainer.tokens import tokenize_training_data

        tokenized = tokenize_training_data(
            data, built.tokenizer, max_length=128, train_on_prompt=False
        )
        init_eva(built, tokenized, job.spec)
        for name, a in built.model.named_parameters():
            if "lora_A" in name:  # EVA's rows are orthonormal principal directions
                gram = a.detach().float() @ a.detach().float().T
                torch.testing.assert_close(gram, torch.eye(4), atol=1e-3, rtol=0)
    before = {n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad}
    if lora.get("useDora"):
        assert any("lora_magnitude_vector" in name for name in before)
    outcome = train_model(built, data, job.spec.training, output_dir=tmp_path / "ckpt")
    assert outcome.global_step == 2
    if optimizer != "adamw":
        assert type(outcome.trainer.optimizer.optimizer).__module__.startswith("bitsandbytes")
    after = dict(outcome.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)


def test_loftq_on_cpu_is_refused_naming_the_field(tiny_job, tiny_model_dir, tmp_path):
    from kubetune_trainer.errors import BadInputError

    job = _job(tiny_job, tmp_path, "qlora", lora={"r": 4, "init": "loftq"}, maxSteps=1)
    with pytest.raises(BadInputError, match="spec.lora.init: lora.init loftq needs a GPU"):
        build_model(job.spec, tiny_model_dir, hardware=CPU)


def test_bfd_split_reaches_the_trainer_data_stage(tiny_job, tiny_model_dir, tmp_path):
    """At maxSeqLength 32 most demo rows would lose every response token and the job would
    fail before training; with bfd_split they are kept whole for the packer to split."""
    from kubetune_trainer.errors import BadInputError
    from kubetune_trainer.pipeline import load_data

    cut = _job(tiny_job, tmp_path, maxSeqLength=32)
    with pytest.raises(BadInputError, match="no response left within"):
        load_data(cut, tiny_model_dir, tmp_path / "cut")

    split = _job(tiny_job, tmp_path, maxSeqLength=32, packingStrategy="bfd_split")
    _, _, tokenized, _ = load_data(split, tiny_model_dir, tmp_path / "split")
    lengths = tokenized.train_lengths
    assert lengths.truncated == 0 and not lengths.excluded
    assert max(len(ids) for ids in tokenized.train["input_ids"]) > 32
