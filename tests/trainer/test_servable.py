"""What makes a published output load in a server as it is (kubetune_trainer/servable.py):
merges that could not be made or served are refused before training, the stop tokens
evaluation used travel with the adapter and the merged model, and an adapter vLLM would
refuse is said so in the status."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kubetune.api.contract import EXIT_BAD_INPUT
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune_trainer import servable
from kubetune_trainer.errors import BadInputError
from kubetune_trainer.modeling import Hardware
from kubetune_trainer.pipeline import RunOptions, run_pipeline
from tests.fixtures.tiny_model import job_manifest, trainer_pod_files

CPU = Hardware("cpu", bf16_supported=False)
# A base model given ChatML: its turns end with <|im_end|>, a token of its own (not the eos).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Recorder:
    def __init__(self) -> None:
        self.events: list = []

    def emit(self, event) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


def base_copy(tiny_model_dir: Path, target: Path, **config_changes) -> Path:
    """The tiny base model with keys of its config.json changed."""
    shutil.copytree(tiny_model_dir, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **config_changes}))
    return target


def run(manifest: dict, tmp_path: Path, recorder: Recorder | None = None):
    job = FineTuneJob.model_validate(manifest)
    options = RunOptions(work_dir=tmp_path / "work", namespace="ns", hardware=CPU)
    return run_pipeline(job, recorder or Recorder(), options)


def test_memory_quantities_are_read_as_kubernetes_writes_them() -> None:
    assert servable.memory_bytes("64Gi") == 64 * 2**30
    assert servable.memory_bytes("500M") == 500 * 10**6
    assert servable.memory_bytes("1.5Ki") == 1536
    assert servable.memory_bytes("1024") == 1024


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}},
            "spec.output.mergeAdapter: the base model runs its own Python code (auto_map in "
            "config.json)",
        ),
        (
            {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
            "spec.output.mergeAdapter: the base model is stored quantised (bitsandbytes 4-bit)",
        ),
    ],
)
def test_a_merge_that_cannot_be_served_is_refused_before_training(
    tiny_model_dir, demo_dataset_path, tmp_path, config, message
) -> None:
    base = base_copy(tiny_model_dir, tmp_path / "base", **config)
    manifest = job_manifest(base, demo_dataset_path, (tmp_path / "out").as_uri())
    manifest["spec"]["model"]["trustRemoteCode"] = True
    manifest["spec"]["output"]["mergeAdapter"] = True
    recorder = Recorder()
    with pytest.raises(BadInputError) as error:
        run(manifest, tmp_path, recorder)
    assert str(error.value).startswith(message) and "mergeAdapter: false" in str(error.value)
    # Refused as soon as the model files are there: no dataset, no model build, no training.
    assert [e.stage for e in recorder.events if e.event == "stage"] == ["model-download"]


def test_a_cpu_merge_larger_than_the_pods_memory_is_refused(tiny_model_dir, tiny_job) -> None:
    from transformers import AutoModelForCausalLM

    parameters = AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()
    assert servable.parameter_count(tiny_model_dir) == parameters
    # The merged copy in bf16 (2 bytes) beside the fp32 model that trained (4 bytes).
    need = servable.merge_memory_bytes(parameters, torch.bfloat16, 4)
    assert need == parameters * 6

    def spec(memory: str, method: str = "lora"):
        manifest = tiny_job("s3://unused/", method=method, resources={"memory": memory, "gpus": 0})
        manifest["spec"]["output"]["mergeAdapter"] = True
        return FineTuneJob.model_validate(manifest).spec

    check = {"device": "cpu", "published": torch.bfloat16, "held_bytes": 4}
    with pytest.raises(BadInputError, match=r"^spec.output.mergeAdapter: merging on the CPU .* "
                       r"more than spec.resources.memory 100Ki: raise the memory"):  # fmt: skip
        servable.check_merge(spec("100Ki"), tiny_model_dir, **check)
    servable.check_merge(spec(str(need)), tiny_model_dir, **check)  # fits exactly
    servable.check_merge(spec("100Ki"), tiny_model_dir, **{**check, "device": "cuda"})
    servable.check_merge(spec("100Ki", "full"), tiny_model_dir, **check)  # nothing to merge


def test_the_trainer_exits_3_with_one_line_before_training(
    tiny_model_dir, demo_dataset_path, tmp_path
) -> None:
    base = base_copy(tiny_model_dir, tmp_path / "base", auto_map={"AutoConfig": "c.C"})
    manifest = job_manifest(base, demo_dataset_path, (tmp_path / "out").as_uri())
    manifest["spec"]["model"]["trustRemoteCode"] = True
    manifest["spec"]["output"]["mergeAdapter"] = True
    termination_log, env = trainer_pod_files(manifest, tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer"], env=env, capture_output=True, timeout=300
    )
    assert done.returncode == EXIT_BAD_INPUT, done.stderr.decode()[-2000:]
    message = termination_log.read_text()
    assert message.startswith("spec.output.mergeAdapter: the base model runs its own Python code")
    assert "\n" not in message.strip()
    assert not (tmp_path / "work" / "checkpoints").exists()


@pytest.mark.slow
def test_adapter_and_merged_model_carry_the_stop_tokens_evaluation_used(
    tiny_model_dir, demo_dataset_path, tmp_path
) -> None:
    """A base model trained on a custom chat template: its end-of-turn marker ends
    generation in evaluation, so the published generation_config.json stops there too, beside
    the tokenizer and the template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer.evaluate.inference import stop_token_ids

    base = tmp_path / "base"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(base)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(base)
    im_end, eos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id

    out = tmp_path / "out"
    manifest = job_manifest(
        base,
        demo_dataset_path,
        out.as_uri(),
        training={"maxSteps": 1},
        dataset={"uri": demo_dataset_path.as_uri(), "chatTemplate": CHATML},
        output={"uri": out.as_uri(), "mergeAdapter": True},
    )
    result = run(manifest, tmp_path)
    published = out / "ns" / "tiny"
    for folder in ("adapter", "merged-model"):
        config = json.loads((published / folder / "generation_config.json").read_text())
        assert config["eos_token_id"] == [im_end, eos], folder
        saved = AutoTokenizer.from_pretrained(published / folder)
        assert saved.chat_template == CHATML and saved.eos_token == "<|im_end|>", folder
    # What evaluation computes from the published merged model is that same list.
    merged = AutoModelForCausalLM.from_pretrained(published / "merged-model")
    saved = AutoTokenizer.from_pretrained(published / "merged-model")
    assert stop_token_ids(merged, saved) == [im_end, eos]
    assert result.artifacts.servingNote is None


@pytest.mark.slow
def test_an_adapter_vllm_would_refuse_is_said_so_in_the_status(tiny_job, tmp_path) -> None:
    manifest = tiny_job((tmp_path / "out").as_uri(), training={"maxSteps": 1})
    manifest["spec"]["lora"] = {"r": 8, "useDora": True}
    result = run(manifest, tmp_path)
    note = result.artifacts.servingNote
    assert note and note.startswith("vLLM cannot load this adapter: DoRA")
    published = json.loads((tmp_path / "out" / "ns" / "tiny" / "manifest.json").read_text())
    assert note in published["notes"]
