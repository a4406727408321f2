"""Which tokens training learns from, how alpaca rows are rendered, default learning rates and
precision, provenance, background checkpoint uploads and the unsupported-content rate."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kubetune.api.v1alpha1 import FineTuneJobSpec, ModelSource
from kubetune_trainer.data import load_training_data, resolve_prompt_template
from kubetune_trainer.errors import BadInputError
from kubetune_trainer.evaluate.examples import build_example
from kubetune_trainer.evaluate.metrics import unsupported_content
from kubetune_trainer.modeling import BuiltModel, Hardware, load_tokenizer
from kubetune_trainer.tokens import row_tokens

CHAT = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "One."},
        {"role": "user", "content": "Second question?"},
        {"role": "assistant", "content": "Two."},
    ]
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def _loss_text(tokenizer, row, **kwargs) -> str:
    ids, mask = row_tokens(row, tokenizer, **kwargs)
    return tokenizer.decode([t for t, keep in zip(ids, mask, strict=True) if keep])


# --- 9. loss on assistant turns only, unless trainOnPrompt --------------------------------


def test_chat_rows_train_on_every_assistant_turn_only(tokenizer):
    eos = tokenizer.eos_token
    learned = _loss_text(tokenizer, CHAT)
    assert learned == f"One.{eos}\nTwo.{eos}\n" or learned == f"One.{eos}Two.{eos}", learned
    assert "question" not in learned and "terse" not in learned
    whole = _loss_text(tokenizer, CHAT, train_on_prompt=True)
    assert "You are terse." in whole and "Second question?" in whole


def test_prompt_completion_rows_train_on_the_completion_and_eos(tokenizer):
    row = {"prompt": "### Instruction:\nSay hi.\n\n### Response:\n", "completion": "hi"}
    assert _loss_text(tokenizer, row).strip() == f"hi{tokenizer.eos_token}"
    assert "Instruction" in _loss_text(tokenizer, row, train_on_prompt=True)


def test_evaluation_loss_covers_the_tokens_training_covers(tokenizer):
    for whole in (False, True):
        example = build_example(CHAT, tokenizer, train_on_prompt=whole)
        ids, mask = row_tokens(CHAT, tokenizer, train_on_prompt=whole)
        assert example.input_ids == ids and example.loss_mask == mask
    # Generation still starts from the conversation before the last answer.
    example = build_example(CHAT, tokenizer)
    assert tokenizer.decode(example.prompt_ids).endswith("### assistant:\n")
    assert example.reference == "Two."


def test_train_on_prompt_defaults_off():
    spec = FineTuneJobSpec.model_validate(
        {"model": {"uri": "hf://o/m"}, "dataset": {"uri": "hf://o/d"}, "output": {"uri": "s3://b/"}}
    )
    assert spec.training.trainOnPrompt is False


# --- 10. alpaca rows through the model's chat template ------------------------------------


def test_prompt_template_auto_follows_the_tokenizer(
    tiny_model_dir, tiny_model_dir_no_chat_template, demo_dataset_path, tmp_path
):
    with_template = load_tokenizer(tiny_model_dir)
    without = load_tokenizer(tiny_model_dir_no_chat_template)
    assert resolve_prompt_template("auto", with_template, "m") == "chat"
    assert resolve_prompt_template("auto", without, "m") == "alpaca"
    assert resolve_prompt_template("alpaca", with_template, "m") == "alpaca"
    with pytest.raises(BadInputError, match=r"^spec\.dataset\.promptTemplate chat: m has no"):
        resolve_prompt_template("chat", without, "m")

    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": tiny_model_dir.as_uri()},
            "dataset": {"uri": demo_dataset_path.as_uri(), "validationSplit": 0.125},
            "output": {"uri": "s3://b/"},
        }
    )
    data = load_training_data(spec.dataset, seed=1, cache_dir=tmp_path, alpaca_as_chat=True)
    first = data.train[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert (
        first[0]["content"].startswith("Extract the person's name")
        and "\n\n" in first[0]["content"]
    )
    assert data.format == "alpaca" and data.prompt_template == "chat"
    assert data.validation is not None and "messages" in data.validation[0]
    assert len(data.train_refs) == 56 and data.train_refs[0].startswith("train.jsonl: row ")


# --- 11, 12. learning rate by method; fp32 master weights; fp32 QLoRA adapters ------------


@pytest.mark.parametrize(("method", "rate"), [("full", 2e-5), ("lora", 2e-4), ("qlora", 2e-4)])
def test_default_learning_rate_depends_on_the_method(method, rate):
    base = {
        "model": {"uri": "hf://o/m"},
        "dataset": {"uri": "hf://o/d"},
        "output": {"uri": "s3://b/"},
    }
    assert FineTuneJobSpec.model_validate({**base, "method": method}).training.learningRate == rate
    chosen = {**base, "method": method, "training": {"learningRate": 1e-3}}
    assert FineTuneJobSpec.model_validate(chosen).training.learningRate == 1e-3


def test_full_fine_tuning_keeps_fp32_master_weights():
    ampere, turing = Hardware("cuda", True, (8, 0)), Hardware("cuda", False, (7, 5))
    assert ampere.train_dtype("full") is torch.float32 and ampere.precision == "bf16"
    assert turing.train_dtype("full") is torch.float32 and turing.precision == "fp16"
    assert ampere.train_dtype("lora") is torch.bfloat16
    assert turing.train_dtype("lora") is torch.float16


def test_qlora_adapters_stay_fp32_on_gpu(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.train import keep_adapter_dtype

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(target_modules=["q_proj"])
    )
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)  # what TRL does to QLoRA adapters
    gpu = Hardware("cuda", True, (9, 0))
    keep_adapter_dtype(model, BuiltModel(model, None, "qlora", gpu, quantized=True))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


# --- 15. provenance -----------------------------------------------------------------------


def test_hub_commit_names_the_base_and_enters_the_fingerprint(tmp_path):
    from kubetune_trainer.checkpoints import training_fingerprint
    from kubetune_trainer.model_source import model_reference, resolved_revision
    from kubetune_trainer.publish import BaseModelRef, name_adapter_base

    hub = ModelSource(uri="hf://org/tiny", revision="main")
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / ("c" * 40)
    assert resolved_revision(hub, snapshot) == "c" * 40
    assert model_reference(hub) == "org/tiny"
    local = ModelSource(uri="file:///models/tiny")
    assert resolved_revision(local, Path("/models/tiny")) is None
    assert model_reference(local) == "file:///models/tiny"

    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "hf://org/tiny"},
            "dataset": {"uri": "hf://o/d"},
            "output": {"uri": "s3://b/"},
        }
    )
    assert training_fingerprint(spec, "sha256:x", "a" * 40) != training_fingerprint(
        spec, "sha256:x", "b" * 40
    )

    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"base_model_name_or_path": "/workspace/models/x", "r": 8}))
    name_adapter_base(config, BaseModelRef("org/tiny", "c" * 40))
    written = json.loads(config.read_text())
    assert written["base_model_name_or_path"] == "org/tiny" and written["revision"] == "c" * 40
    assert written["r"] == 8


# --- 16. checkpoint uploads in the background ----------------------------------------------


class SlowStore:
    """A real local store whose directory uploads wait until released."""

    def __init__(self, root: Path) -> None:
        from kubetune_trainer.storage import open_store

        self.inner = open_store(root.as_uri())
        self.release = threading.Event()
        self.started = threading.Event()

    def put_dir(self, local_dir, prefix):
        self.started.set()
        assert self.release.wait(30), "upload never released"
        return self.inner.put_dir(local_dir, prefix)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_checkpoint_upload_does_not_block_training_and_is_waited_for(tmp_path):
    from kubetune_trainer.checkpoints import COMPLETE_MARKER, CheckpointUploader

    store = SlowStore(tmp_path / "bucket")
    events = []
    uploader = CheckpointUploader(
        store,
        "ns/job/",
        keep=2,
        fingerprint="sha256:f",
        reporter=SimpleNamespace(emit=events.append),
    )
    output = tmp_path / "checkpoints"
    local = output / "checkpoint-3"
    local.mkdir(parents=True)
    (local / "weights.bin").write_bytes(b"w" * 1000)
    args, state = (
        SimpleNamespace(output_dir=str(output)),
        SimpleNamespace(global_step=3, max_steps=9),
    )

    started = time.monotonic()
    uploader.on_save(args, state, None)
    assert time.monotonic() - started < 5  # returned while the upload is held
    assert store.started.wait(10)
    # The trainer rotates its local checkpoints: the upload must not depend on the folder.
    import shutil

    shutil.rmtree(local)
    marker = "ns/job/checkpoints/checkpoint-3/" + COMPLETE_MARKER
    assert not store.inner.exists(marker) and events == []

    waiter = threading.Thread(target=uploader.on_train_end, args=(args, state, None))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # the end of training waits for the upload
    store.release.set()
    waiter.join(30)
    assert not waiter.is_alive()
    assert store.inner.exists(marker)
    assert store.inner.read_bytes("ns/job/checkpoints/checkpoint-3/weights.bin") == b"w" * 1000
    assert [e.event for e in events] == ["checkpoint"]


def test_checkpoint_upload_error_fails_training(tmp_path):
    from kubetune_trainer.checkpoints import CheckpointUploader

    class BrokenStore(SlowStore):
        def put_dir(self, local_dir, prefix):
            raise OSError("bucket gone")

    store = BrokenStore(tmp_path / "bucket")
    uploader = CheckpointUploader(
        store, "p/", keep=1, fingerprint="f", reporter=SimpleNamespace(emit=lambda e: None)
    )
    output = tmp_path / "out"
    (output / "checkpoint-1").mkdir(parents=True)
    args, state = (
        SimpleNamespace(output_dir=str(output)),
        SimpleNamespace(global_step=1, max_steps=2),
    )
    uploader.on_save(args, state, None)
    with pytest.raises(RuntimeError, match="checkpoint upload failed: bucket gone"):
        uploader.on_train_end(args, state, None)


# --- 18. unsupported content: every content word, wherever it stands ----------------------


def test_sentence_position_and_case_do_not_decide_what_is_content():
    prompt = "Where does Alice live? She lives in paris."
    found = unsupported_content("However, she lives in Paris. Yes.", prompt)
    assert found.unsupported == ("however",) and found.claims == 3  # however, lives, paris
    listed = unsupported_content("Answer:\n- Yes\n- Alice is 30", prompt)
    assert listed.unsupported == ("30", "answer")
    assert unsupported_content("Alice met Bob", prompt).unsupported == ("met", "bob")
