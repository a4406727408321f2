"""Results that used to be silently wrong: each test fails on the behaviour it guards against."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune_trainer.data import load_training_data
from kubetune_trainer.errors import BadInputError
from kubetune_trainer.modeling import (
    PACKING_OFF_NOTE,
    VARLEN_SDPA,
    Hardware,
    build_model,
    check_single_process,
    meta_model,
    native_bf16,
    resolve_target_modules,
)
from kubetune_trainer.tokens import tokenize_training_data

CPU = Hardware("cpu", bf16_supported=False)


def _spec(tiny_job, tmp_path: Path, **kwargs):
    return FineTuneJob.model_validate(tiny_job((tmp_path / "out").as_uri(), **kwargs)).spec


# --- 1. the seed decides the LoRA initialisation -----------------------------------------


def _lora_a(built) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in built.model.named_parameters() if "lora_A" in n}


def test_same_seed_gives_the_same_lora_initialisation(tiny_job, tiny_model_dir, tmp_path):
    spec = _spec(tiny_job, tmp_path, method="lora")
    first = _lora_a(build_model(spec, tiny_model_dir, hardware=CPU))
    torch.manual_seed(1234)  # whatever ran before must not matter
    second = _lora_a(build_model(spec, tiny_model_dir, hardware=CPU))
    assert first and first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)

    other = _spec(tiny_job, tmp_path, method="lora", training={"seed": 8})
    third = _lora_a(build_model(other, tiny_model_dir, hardware=CPU))
    assert not all(torch.equal(first[name], third[name]) for name in first)


# --- 2. over-long rows are counted, excluded, reported ------------------------------------


def _alpaca_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


SHORT = {"instruction": "Say hi.", "output": "hi"}
LONG_PROMPT = {"instruction": "word " * 60, "output": "ok"}  # prompt alone is over 32 tokens
LONG_ANSWER = {"instruction": "Say hi.", "output": "hello " * 40}  # answer cut, some kept


def _tokenized(tiny_job, tmp_path, rows, *, max_length=32, training=None, **dataset):
    training = {"maxSeqLength": max_length, **(training or {})}
    manifest = tiny_job((tmp_path / "out").as_uri(), training=training)
    manifest["spec"]["dataset"].update(
        uri=_alpaca_file(tmp_path / "train.jsonl", rows).as_uri(),
        validationSplit=0,
        promptTemplate="alpaca",
        **dataset,
    )
    spec = FineTuneJob.model_validate(manifest).spec
    data = load_training_data(spec.dataset, seed=1, cache_dir=tmp_path / "cache")
    from kubetune_trainer.modeling import load_tokenizer

    tokenizer = load_tokenizer(Path(spec.model.uri.removeprefix("file://")))
    return data, tokenize_training_data(
        data, tokenizer, max_length=max_length, train_on_prompt=spec.training.trainOnPrompt
    )


def test_over_long_rows_are_truncated_or_excluded_and_counted(tiny_job, tmp_path):
    rows = [SHORT] * 38 + [LONG_ANSWER, LONG_PROMPT]  # 1 of 40 excluded: under the limit
    data, tokenized = _tokenized(tiny_job, tmp_path, rows)
    report = tokenized.train_lengths
    assert report.rows == 40 and report.truncated == 1
    assert report.excluded == ["train.jsonl: row 40"]
    assert len(tokenized.train) == 39
    for labels in tokenized.train["labels"]:
        assert len(labels) <= 32 and any(label != -100 for label in labels)


def test_too_many_rows_without_a_response_fail_before_training(tiny_job, tmp_path):
    rows = [SHORT] * 8 + [LONG_PROMPT] * 2  # 20% excluded: above the 5% limit
    with pytest.raises(BadInputError, match=r"^2 of 10 training rows .*maxSeqLength 32") as error:
        _tokenized(tiny_job, tmp_path, rows)
    assert "train.jsonl: row 9; train.jsonl: row 10" in str(error.value)
    assert "\n" not in str(error.value)


def test_train_on_prompt_keeps_rows_whose_prompt_fills_the_length(tiny_job, tmp_path):
    rows = [SHORT] * 8 + [LONG_PROMPT] * 2
    _, tokenized = _tokenized(tiny_job, tmp_path, rows, training={"trainOnPrompt": True})
    assert tokenized.train_lengths.excluded == [] and tokenized.train_lengths.truncated == 2
    assert len(tokenized.train) == 10


# --- 3. LoRA targets that fit the architecture, checked before the weights load ----------


ARCHITECTURES = {
    # model_type: (config class name, small config kwargs, names the default must adapt)
    "phi3": (
        "Phi3Config",
        {"pad_token_id": 0},
        {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    ),
    "opt": ("OPTConfig", {"ffn_dim": 64, "word_embed_proj_dim": 32}, {"out_proj", "fc1"}),
    "phi": ("PhiConfig", {}, {"q_proj", "dense", "fc1", "fc2"}),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_head": 2, "n_layer": 1}, {"c_attn", "c_proj"}),
    "falcon": ("FalconConfig", {}, {"query_key_value", "dense"}),
    "gpt_neox": ("GPTNeoXConfig", {}, {"query_key_value", "dense"}),
}


def _config_dir(tmp_path: Path, model_type: str) -> Path:
    import transformers

    class_name, extra, _ = ARCHITECTURES[model_type]
    small = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    if model_type == "gpt2":
        small = {"vocab_size": 64}
    config = getattr(transformers, class_name)(**small, **extra)
    directory = tmp_path / model_type
    config.save_pretrained(directory)  # config only: no weights to load
    return directory


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_default_targets_adapt_attention_and_mlp_of_every_architecture(model_type, tmp_path):
    from kubetune.api.v1alpha1 import LoraSpec

    model = meta_model(_config_dir(tmp_path, model_type))
    targets, warnings = resolve_target_modules(LoraSpec().targetModules, model)
    assert ARCHITECTURES[model_type][2] <= set(targets), targets
    assert "lm_head" not in targets and warnings == []


def test_all_linear_combines_and_unmatched_names_warn(tmp_path):
    model = meta_model(_config_dir(tmp_path, "opt"))
    targets, warnings = resolve_target_modules(["all-linear", "lm_head", "q_proj_x"], model)
    assert {"lm_head", "out_proj", "q_proj"} <= set(targets)
    assert len(warnings) == 1 and "'q_proj_x' matches no module of this opt model" in warnings[0]


def test_targets_matching_nothing_fail_before_the_weights_load(tiny_job, tmp_path):
    # A model folder with a config and no weights: the check must come before loading them.
    model_dir = _config_dir(tmp_path, "gpt2")
    manifest = tiny_job((tmp_path / "out").as_uri(), method="lora")
    manifest["spec"]["lora"] = {"targetModules": ["q_proj", "v_proj"]}
    spec = FineTuneJob.model_validate(manifest).spec
    tokenizer = object()  # never used: the error comes first
    with pytest.raises(BadInputError, match=r"^spec\.lora\.targetModules: q_proj, v_proj .*c_attn"):
        build_model(spec, model_dir, hardware=CPU, tokenizer=tokenizer)


# --- 4. bf16 only where it is native -----------------------------------------------------


def test_bf16_only_on_compute_capability_8_and_newer(monkeypatch):
    assert not native_bf16((7, 5)) and not native_bf16((7, 0)) and not native_bf16(None)
    assert native_bf16((8, 0)) and native_bf16((9, 0))
    # A T4: torch says bf16 is supported (emulated); training must use fp16.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    t4 = Hardware.detect()
    assert t4.precision == "fp16" and not t4.tf32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    a100 = Hardware.detect()
    assert a100.precision == "bf16" and a100.tf32


# --- 5. generation stops on the model's own stop tokens ---------------------------------


def test_generation_stops_on_generation_config_eos_list(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer.evaluate.inference import generate_greedy

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt = tokenizer("### user:\nhello\n### assistant:\n")["input_ids"]
    with torch.no_grad():
        first = int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())
    assert first != tokenizer.eos_token_id
    run = dict(max_new_tokens=8, batch_size=1, max_prompt_length=64)
    assert generate_greedy(model, tokenizer, [prompt], **run) != [""]
    # An end-of-turn token the model's generation_config lists besides the tokenizer's eos.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, first]
    assert generate_greedy(model, tokenizer, [prompt], **run) == [""]


# --- 6. sliding window in the CPU per-example attention ---------------------------------


def test_packed_attention_honours_sliding_window(tmp_path):
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    config = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        use_cache=False,
    )
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    ours = AutoModelForCausalLM.from_pretrained(
        tmp_path / "mistral", attn_implementation=VARLEN_SDPA
    )
    eager = AutoModelForCausalLM.from_pretrained(tmp_path / "mistral", attn_implementation="eager")
    examples = [
        torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 12)
    ]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": e.tolist()} for e in examples]
    )
    packed = ours(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    alone = torch.cat([eager(input_ids=e[None]).logits[0] for e in examples])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)


# --- 7. several GPUs in one process are refused ------------------------------------------


def test_several_gpus_in_one_process_are_refused():
    four = Hardware("cuda", True, (8, 0), device_count=4)
    with pytest.raises(BadInputError, match=r"^spec\.resources\.gpus: .*4 GPUs in one process"):
        check_single_process(four, environ={})
    check_single_process(four, environ={"WORLD_SIZE": "4"})  # one process per GPU: fine
    check_single_process(Hardware("cuda", True, (8, 0), device_count=1), environ={})
    check_single_process(CPU, environ={})


# --- 8. remote-code models without per-example attention do not pack ---------------------

REMOTE_MODELING = """
from transformers import LlamaConfig, LlamaForCausalLM


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
    # Like many remote-code models: its own attention, not transformers' interface.
    _supports_attention_backend = False
"""


def remote_code_model(tiny_model_dir: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(tiny_model_dir, target)
    (target / "modeling_tiny_remote.py").write_text(REMOTE_MODELING)
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = "tiny_remote"
    config["architectures"] = ["TinyRemoteForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "modeling_tiny_remote.TinyRemoteConfig",
        "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM",
    }
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_remote_code_model_trains_unpacked_and_says_so(tiny_job, tiny_model_dir, tmp_path):
    model_dir = remote_code_model(tiny_model_dir, tmp_path / "remote")
    manifest = tiny_job((tmp_path / "out").as_uri(), method="lora")
    manifest["spec"]["model"] = {"uri": model_dir.as_uri(), "trustRemoteCode": True}
    spec = FineTuneJob.model_validate(manifest).spec
    assert spec.training.packing
    built = build_model(spec, model_dir, hardware=CPU)
    assert type(built.model.base_model.model).__name__ == "TinyRemoteForCausalLM"
    assert built.packing is False and built.warnings == [PACKING_OFF_NOTE]

    plain = build_model(_spec(tiny_job, tmp_path, method="lora"), tiny_model_dir, hardware=CPU)
    assert plain.packing is True and plain.warnings == []
