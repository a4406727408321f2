"""A published fine-tune answers requests in a real vLLM server exactly as HF + PEFT does.

Real fine-tunes of a tiny Llama (the trainer's own pipeline) publish to the test S3 server: a
LoRA (mergeAdapter on), a QLoRA and a full fine-tune. KServe's own storage initializer code
(`kserve_storage.Storage`, from PyPI) downloads what they published as KServe would. vLLM's
CPU build (`vllm.entrypoints.openai.api_server`, the `vllm serve` server) then serves
  1. the base with both adapters registered through `--lora-modules`, as `kubetune serve
     --target vllm` writes them (the QLoRA adapter on the unquantised base, as vLLM serves
     it: the 4-bit base was only how it trained),
  2. the merged model alone, and
  3. the full fine-tune alone,
and greedy completions over the OpenAI API must equal HF (+ PEFT)'s greedy tokens on every
prompt. The environment comes from hack/vllm.sh (its own torch, cached by lock hash).

vLLM's CPU attention has no kernel for head_dim 16 (the default tiny model's), so this model
has 2 heads of 32.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune import serving
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune_devcluster.processes import free_port, wait_for
from tests.fixtures.tiny_model import job_manifest
from tests.serving.parts import cached_part

ROOT = Path(__file__).resolve().parents[2]
NEW_TOKENS = 12
SERVER_START_TIMEOUT = 600  # seconds; vLLM imports torch and starts an engine process


def vllm_python() -> Path:
    return cached_part("vllm.sh", "the vLLM environment") / "bin" / "python"


def kserve_download(python: Path, wanted: dict[str, Path], s3_env: dict[str, str]) -> None:
    """Fetch each URI into its folder with KServe's storage initializer code (one process), as
    an InferenceService would."""
    script = (
        "import json, sys; from kserve_storage import Storage; wanted = json.loads(sys.argv[1]); "
        "Storage.download_files(list(wanted), list(wanted.values()))"
    )
    env = {**os.environ, **s3_env, "S3_VERIFY_SSL": "0", "AWS_ENDPOINT_URL": s3_env["endpoint"]}
    targets = json.dumps({uri: str(path) for uri, path in wanted.items()})
    subprocess.run([str(python), "-c", script, targets], env=env, check=True, timeout=300)


@contextlib.contextmanager
def vllm_server(python: Path, model: Path, *args: str) -> Iterator[str]:
    """A `vllm serve` OpenAI server on a free port; yields its base URL, stopped afterwards."""
    port = free_port()
    log = model.parent / f"vllm-{model.name}.log"
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", "256", "--enforce-eager", *args,
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"vllm exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    try:
        wait_for(ready, timeout=SERVER_START_TIMEOUT, interval=1, what="vllm serving")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def vllm_greedy(url: str, model: str, prompts: list[str]) -> dict[str, list[int]]:
    body = {
        "model": model,
        "prompt": prompts,
        "max_tokens": NEW_TOKENS,
        "min_tokens": NEW_TOKENS,  # like HF's min_new_tokens: no early stop on either side
        "temperature": 0,
        "return_token_ids": True,
    }
    request = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        choices = json.load(response)["choices"]
    return {prompts[c["index"]]: c["token_ids"] for c in choices}


def hf_greedy(
    model_dir: Path, adapter_dir: Path | None, prompts: list[str]
) -> dict[str, list[int]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    out = {}
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")
            generated = model.generate(
                **ids, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS
            )
            out[prompt] = generated[0, ids["input_ids"].shape[1] :].tolist()
    return out


class NoProgress:
    def emit(self, event: Any) -> None:
        pass

    def close(self) -> None:
        pass


def tiny_base(tmp_path: Path) -> Path:
    from kubetune_trainer.demo_assets import TinyModelShape, write_tiny_model

    shape = TinyModelShape(num_attention_heads=2, num_key_value_heads=1)
    return write_tiny_model(tmp_path / "base", seed=0, shape=shape, pretrain_steps=20)


def fine_tune(
    base: Path,
    dataset: Path,
    bucket: str,
    tmp_path: Path,
    name: str,
    method: str,
    training: dict[str, Any] | None = None,
    **spec: Any,
) -> tuple[dict[str, Any], Any]:
    """A real run of the trainer's pipeline publishing to s3://bucket/runs/; returns the
    FineTuneJob as the API server would show it once Succeeded, and the run's artifacts."""
    from kubetune_trainer.modeling import Hardware
    from kubetune_trainer.pipeline import RunOptions, run_pipeline

    manifest = job_manifest(
        base,
        dataset,
        f"s3://{bucket}/runs/",
        name=name,
        method=method,
        training=training or {"maxSteps": 8},
        **spec,
    )
    manifest["metadata"]["namespace"] = "team-a"
    result = run_pipeline(
        FineTuneJob.model_validate(manifest),
        NoProgress(),
        RunOptions(
            work_dir=tmp_path / f"work-{name}",
            namespace="team-a",
            hardware=Hardware("cpu", bf16_supported=False),
        ),
    )
    artifacts = result.artifacts
    status = {"phase": "Succeeded", "artifacts": artifacts.model_dump(exclude_none=True)}
    return {**manifest, "status": status}, artifacts


def demo_prompts(dataset: Path) -> list[str]:
    rows = [json.loads(line) for line in dataset.read_text().splitlines()[:8]]
    return [f"{row['instruction']}\n{row['input']}\n" for row in rows]


def s3_settings(s3_server: Any) -> dict[str, str]:
    return {**s3_server.env, "endpoint": s3_server.endpoint_url}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two vLLM server starts; minutes each on a busy 2-core machine
def test_published_adapters_and_merged_model_serve_in_vllm_exactly_as_hf(
    s3_env: str, s3_server: Any, demo_dataset_path: Path, tmp_path: Path
) -> None:
    python = vllm_python()
    base = tiny_base(tmp_path)
    lora = {"r": 8, "dropout": 0.0}
    lora_job, artifacts = fine_tune(
        base, demo_dataset_path, s3_env, tmp_path, "served", "lora", lora=lora,
        output={"uri": f"s3://{s3_env}/runs/", "mergeAdapter": True},
    )  # fmt: skip
    qlora_job, qlora_artifacts = fine_tune(
        base, demo_dataset_path, s3_env, tmp_path, "served-qlora", "qlora", lora=lora
    )
    # What `kubetune serve --target vllm` prints for each job registers the same adapter.
    served = serving.served_model(lora_job)
    modules, ranks = [], []
    for job, folder in ((lora_job, "adapter"), (qlora_job, "qlora-adapter")):
        args = serving.build_vllm_args(
            serving.served_model(job), adapter_dir=str(tmp_path / folder)
        )
        modules.append(args[args.index("--lora-modules") + 1])
        ranks.append(int(args[args.index("--max-lora-rank") + 1]))

    # The run published the same serving documents beside its artifacts.
    client, prefix = s3_server.client(), "runs/team-a/served/serve/"

    def published(key: str) -> str:
        return client.get_object(Bucket=s3_env, Key=prefix + key)["Body"].read().decode()

    assert artifacts.serving == f"s3://{s3_env}/{prefix}"
    assert published("vllm.sh") == serving.render_vllm(served)
    assert "lora-modules" not in published("merged/vllm.sh")
    assert "KServe cannot download file://" in published("SKIPPED.txt")  # a local base model

    adapter, merged, qlora = tmp_path / "adapter", tmp_path / "merged", tmp_path / "qlora-adapter"
    wanted = {artifacts.model: adapter, artifacts.mergedModel: merged, qlora_artifacts.model: qlora}
    kserve_download(python, wanted, s3_settings(s3_server))
    for folder in (adapter, qlora):
        assert (folder / "adapter_config.json").is_file(), sorted(os.listdir(folder))
        assert (folder / "generation_config.json").is_file(), sorted(os.listdir(folder))
    assert (merged / "config.json").is_file(), sorted(os.listdir(merged))
    # Trained on a 4-bit base, published as a plain LoRA adapter of the 16-bit base.
    qlora_config = json.loads((qlora / "adapter_config.json").read_text())
    assert qlora_config["base_model_name_or_path"] == qlora_job["spec"]["model"]["uri"]

    prompts = demo_prompts(demo_dataset_path)
    expected_tuned = hf_greedy(base, adapter, prompts)
    expected_qlora = hf_greedy(base, qlora, prompts)
    expected_base = hf_greedy(base, None, prompts)
    # Each adapter is shown to change the answers, so the checks are not blind.
    assert expected_tuned != expected_base, "the adapter changes nothing"
    assert expected_qlora != expected_base, "the QLoRA adapter changes nothing"

    with vllm_server(
        python, base, "--enable-lora", "--max-loras", "2", "--max-lora-rank", str(max(ranks)),
        "--lora-modules", *modules,
    ) as url:  # fmt: skip
        assert vllm_greedy(url, "served", prompts) == expected_tuned
        assert vllm_greedy(url, "served-qlora", prompts) == expected_qlora
        assert vllm_greedy(url, str(base), prompts) == expected_base

    # The merged model is published in bf16 (the adapter folded into the base), so it is
    # compared with HF on the same files rather than with the fp32 base + adapter.
    expected_merged = hf_greedy(merged, None, prompts)
    with vllm_server(python, merged) as url:
        assert vllm_greedy(url, str(merged), prompts) == expected_merged


@pytest.mark.slow
@pytest.mark.timeout(1200)  # one vLLM server start
def test_a_published_full_fine_tune_serves_in_vllm_exactly_as_hf(
    s3_env: str, s3_server: Any, demo_dataset_path: Path, tmp_path: Path
) -> None:
    python = vllm_python()
    base = tiny_base(tmp_path)
    job, artifacts = fine_tune(
        base, demo_dataset_path, s3_env, tmp_path, "served-full", "full",
        training={"maxSteps": 8, "learningRate": 0.0005},
    )  # fmt: skip
    args = serving.build_vllm_args(serving.served_model(job))
    assert args[:3] == ["vllm", "serve", "./model"] and "--enable-lora" not in args
    model = tmp_path / "model"
    kserve_download(python, {artifacts.model: model}, s3_settings(s3_server))
    assert (model / "generation_config.json").is_file(), sorted(os.listdir(model))

    # Published in bf16 like the merged model: compared with HF on the same files.
    prompts = demo_prompts(demo_dataset_path)
    expected = hf_greedy(model, None, prompts)
    assert expected != hf_greedy(base, None, prompts), "the fine-tune changes nothing"
    with vllm_server(python, model, *args[3:]) as url:
        assert vllm_greedy(url, job["metadata"]["name"], prompts) == expected
