"""Training as a gang on torch.distributed: real torchrun processes over gloo on CPU.

The process tests run the same launcher code as a trainer pod and `kubetune run --processes`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune_trainer import distributed
from kubetune_trainer.checkpoints import training_fingerprint
from kubetune_trainer.train import distributed_settings
from tests.trainer.test_resume import EventStream

# --- the launcher ---------------------------------------------------------------------------


TOPOLOGY_FLAGS = ("--nnodes", "--nproc", "--node", "--master", "--rdzv", "--max-restarts")


def test_torchrun_argv_has_no_topology_flags() -> None:
    """torchrun reads the gang's shape from its PET_* environment, the one channel: a flag
    would override what the operator set on the pod."""
    argv = distributed.torchrun_argv(["-m", "kubetune_trainer"])
    assert argv == [sys.executable, "-m", "torch.distributed.run", "-m", "kubetune_trainer"]


def test_local_gang_env_is_what_the_operator_sets_on_a_one_pod_gang() -> None:
    env = distributed.local_gang_env(4, master_port=1234, environ={"HOME": "/h"})
    assert env == {
        "HOME": "/h",
        "PET_NNODES": "1",
        "PET_NPROC_PER_NODE": "4",
        "PET_NODE_RANK": "0",
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": "1234",
        "PET_RDZV_BACKEND": "static",
        "PET_RDZV_CONF": f"timeout={distributed.RENDEZVOUS_TIMEOUT_S}",
        "PET_MAX_RESTARTS": "0",
    }
    assert distributed.is_gang_pod(env) and distributed.gang_shape(env) == (1, 4)
    # A torchrun worker (LOCAL_RANK set) is not the launcher, whatever it inherited.
    assert not distributed.is_gang_pod({**env, "LOCAL_RANK": "0"})
    assert not distributed.is_gang_pod({}) and distributed.gang_shape({}) == (1, 1)


def test_a_node_rank_outside_the_gang_is_refused() -> None:
    with pytest.raises(ValueError, match="node rank 2"):
        distributed.check_gang({"PET_NNODES": "2", "PET_NODE_RANK": "2"})
    distributed.check_gang({"PET_NNODES": "2", "PET_NODE_RANK": "1"})


class _Launched:
    pid = 0

    def wait(self) -> int:
        return 0


def test_the_pod_launcher_starts_torchrun_without_flags(monkeypatch, tmp_path) -> None:
    """The pod's entry point with the operator's environment: torchrun's argv carries the
    program only, and the environment it inherits carries the gang (PET_*)."""
    started: dict[str, Any] = {}

    def launch(command: list[str], **popen: Any) -> tuple[_Launched, Path]:
        started.update(command=command, env=dict(popen.get("env") or os.environ))
        (tmp_path / "codes").mkdir()
        return _Launched(), tmp_path / "codes"

    for name in [n for n in os.environ if n.startswith("PET_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv(distributed.ENV_LOCAL_RANK, raising=False)
    operator_env = {"PET_NNODES": "3", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "2"}
    for name, value in operator_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "launch", launch)
    assert distributed.main(["--work-dir", "/w"]) == 0
    command = started["command"]
    assert command == distributed.torchrun_argv(["-m", "kubetune_trainer", "--work-dir", "/w"])
    assert not [arg for arg in command if arg.startswith(TOPOLOGY_FLAGS)], command
    assert operator_env.items() <= started["env"].items()


def test_torchrun_takes_the_gang_from_its_environment(tmp_path) -> None:
    """A real torchrun, given PET_* and no flags, starts the gang they describe: every worker
    sees the world size, the processes per node and its rank (what the trainer reads)."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import json, os, pathlib\n"
        "names = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'GROUP_RANK')\n"
        f"out = pathlib.Path({str(tmp_path)!r}) / f\"rank-{{os.environ['RANK']}}.json\"\n"
        "out.write_text(json.dumps({n: os.environ[n] for n in names}))\n"
    )
    command, env = distributed.torchrun_argv([str(script)]), distributed.local_gang_env(2)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    for rank, worker in enumerate(seen):
        assert worker["RANK"] == worker["LOCAL_RANK"] == str(rank)
        shape = (worker["WORLD_SIZE"], worker["LOCAL_WORLD_SIZE"], worker["GROUP_RANK"])
        assert shape == ("2", "2", "0")
        topology = distributed.current(worker)
        assert (topology.world_size, topology.local_world_size, topology.nodes) == (2, 2, 1)


def test_the_strategy_follows_the_world_torchrun_started_not_the_resources() -> None:
    """`kubetune run --processes 2` of a manifest asking for one GPU: two processes, so DDP
    (and the checkpoint fingerprint of a 2-process gang); one process of a gang's manifest
    runs no strategy at all."""
    one_gpu = _spec(gpus=1)
    assert distributed.run_strategy(one_gpu, distributed.Rank(world_size=2)) == "ddp"
    gang = _spec(gpus=2, nodes=2)
    assert distributed.run_strategy(gang, distributed.Rank(world_size=1)) == "none"
    assert distributed.run_strategy(gang, distributed.Rank(world_size=4)) == "ddp"
    assert training_fingerprint(one_gpu, "sha256:d", world_size=4) == training_fingerprint(
        gang, "sha256:d", world_size=4
    )


def test_gang_exit_code_keeps_bad_input_and_threshold_codes(tmp_path: Path) -> None:
    def gang_exit_code(launcher_code: int, rank_codes: dict[int, str]) -> int:
        folder = tmp_path / "codes"
        folder.mkdir()
        for rank, code in rank_codes.items():
            (folder / f"rank-{rank}").write_text(code)
        code = distributed.gang_exit_code(launcher_code, folder)
        assert not folder.exists()  # nothing left in the temp dir
        return code

    assert gang_exit_code(0, {0: "0", 1: "0"}) == 0
    assert gang_exit_code(1, {1: "1"}) == 1
    assert gang_exit_code(1, {0: "3", 1: "1"}) == 3  # bad input: the operator must not retry
    assert gang_exit_code(1, {0: "1", 1: "4"}) == 4  # thresholds missed: the same
    assert gang_exit_code(1, {0: "5", 1: "5"}) == 5  # stopped with a checkpoint: Preempted
    assert gang_exit_code(1, {0: "5", 1: "3"}) == 3  # a non-retryable code still wins


def test_rank_from_environment() -> None:
    rank = distributed.current({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (rank.rank, rank.local_rank, rank.world_size, rank.is_main) == (3, 1, 4, False)
    assert distributed.current({}).is_main and not distributed.current({}).distributed


def test_trainer_settings_per_strategy() -> None:
    assert distributed_settings("none", True) == {}
    ddp = distributed_settings("ddp", True)
    assert ddp["ddp_find_unused_parameters"] is False
    assert ddp["ddp_timeout"] == distributed.COLLECTIVE_TIMEOUT_S
    fsdp = distributed_settings("fsdp", True)
    assert fsdp["fsdp"] is True and fsdp["fsdp_config"]["version"] == 2
    assert fsdp["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_config"]["activation_checkpointing"] is True


def _spec(**resources: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "hf://org/model"},
            "dataset": {"uri": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/"},
            "resources": resources,
        }
    )


def test_checkpoints_are_resumed_by_the_same_gang_only() -> None:
    """The gang's shape in the fingerprint is the world torchrun started (WORLD_SIZE)."""
    spec = _spec(gpus=1)
    one = training_fingerprint(spec, "sha256:d", world_size=1)
    assert one == training_fingerprint(_spec(gpus=1, memory="8Gi"), "sha256:d", world_size=1)
    assert one == training_fingerprint(spec, "sha256:d")  # no torchrun here: a world of 1
    two = training_fingerprint(spec, "sha256:d", world_size=2)
    four = training_fingerprint(spec, "sha256:d", world_size=4)
    assert len({one, two, four}) == 3


# --- real gangs -----------------------------------------------------------------------------

# Global batch 4 rows per optimizer step in every run below: 1 process x 4, or 2 x 2.
STEPS = 6
# Each gang run starts torch and transformers in 3 processes: minutes on a loaded 2-core box.
SLOW_RUN = pytest.mark.timeout(1800)
LORA = {"r": 8, "dropout": 0.0}  # no dropout: no random numbers differ between the layouts


def _manifest(tiny_job, out: Path, *, name: str, processes: int, **training: Any) -> dict:
    manifest = tiny_job(
        out.as_uri() + "/",
        name=name,
        training={
            "maxSteps": STEPS,
            "batchSize": 4 // processes,
            "gradientAccumulationSteps": 1,
            "checkpointEverySteps": 2,
            "checkpointsToKeep": 100,
            **training,
        },
        resources={"gpus": 0, "nodes": processes},
    )
    if manifest["spec"]["method"] != "full":
        manifest["spec"]["lora"] = LORA
    return manifest


def _kubetune_run(manifest: dict, tmp_path: Path, processes: int) -> subprocess.CompletedProcess:
    job = tmp_path / f"{manifest['metadata']['name']}.yaml"
    job.write_text(yaml.safe_dump(manifest))
    command = [sys.executable, "-m", "kubetune_cli.main", "run", str(job)]
    command += ["--work-dir", str(tmp_path / f"work-{manifest['metadata']['name']}")]
    if processes > 1:
        command += ["--processes", str(processes)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    log = tmp_path / f"work-{manifest['metadata']['name']}" / "trainer.log"
    detail = (log.read_text()[-3000:] if log.exists() else "") + done.stderr[-3000:]
    assert done.returncode == 0, detail
    return done


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _metrics(out: Path, name: str) -> dict:
    return json.loads((out / "local" / name / "metrics.json").read_text())


def _losses(metrics: dict, key: str = "loss") -> dict[int, float]:
    return {e["step"]: e[key] for e in metrics["logHistory"] if key in e}


@pytest.fixture(scope="module")
def two_rank_lora(tiny_model_dir, demo_dataset_path, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted 2-rank DDP LoRA run (the reference for the tests below)."""
    from tests.fixtures.tiny_model import job_manifest

    def tiny_job(output_uri: str, **kwargs: Any) -> dict:
        return job_manifest(tiny_model_dir, demo_dataset_path, output_uri, **kwargs)

    tmp = tmp_path_factory.mktemp("ddp")
    manifest = _manifest(tiny_job, tmp / "out", name="ddp", processes=2)
    _kubetune_run(manifest, tmp, 2)
    return tmp / "out", manifest


@pytest.mark.slow
@SLOW_RUN
def test_two_rank_ddp_lora_matches_one_process(two_rank_lora, tiny_job, tmp_path) -> None:
    """Same global batch, same rows in the same order (accelerate hands consecutive
    per-rank batches to consecutive ranks), so the same gradients: the only difference is
    the order of the float32 sums (all-reduce of two halves vs one batch), about 1e-7
    relative per step; a 1e-4 relative tolerance allows that to grow over 6 Adam steps and
    still fails for any real difference (a lost rank halves the batch: ~1e-2)."""
    out2, _ = two_rank_lora
    manifest = _manifest(tiny_job, tmp_path / "out", name="single", processes=1)
    _kubetune_run(manifest, tmp_path, 1)

    single, gang = _metrics(tmp_path / "out", "single"), _metrics(out2, "ddp")
    assert gang["totalSteps"] == single["totalSteps"] == STEPS
    one, two = _losses(single), _losses(gang)
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    assert one[STEPS] < one[1]  # it learned
    assert _losses(gang, "eval_loss") == pytest.approx(_losses(single, "eval_loss"), rel=1e-4)
    # Rank 0 alone published: one manifest, one adapter, the global token count.
    manifest_doc = json.loads((out2 / "local" / "ddp" / "manifest.json").read_text())
    assert manifest_doc["metrics"]["tokensTrained"] == single["metrics"]["tokensTrained"]


@pytest.mark.slow
@SLOW_RUN
def test_killed_gang_resumes_with_the_same_remaining_steps(two_rank_lora, tmp_path) -> None:
    """SIGKILL of both ranks (and their launcher) after the first uploaded checkpoint; a new
    2-rank gang resumes from it and its remaining steps' losses are the uninterrupted run's.

    A tiny run outpaces the kill on a loaded machine, so whatever the kill caught, the
    checkpoints after the first are removed before the restart: the output location is then
    exactly as a kill right after that checkpoint leaves it."""
    out, manifest = two_rank_lora
    manifest = json.loads(json.dumps(manifest))
    manifest["metadata"]["name"] = "ddp-killed"
    manifest["spec"]["output"]["uri"] = (tmp_path / "out").as_uri() + "/"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(manifest))
    program = ["-m", "kubetune_trainer", "--config", str(config), "--namespace", "local"]
    program += ["--work-dir", str(tmp_path / "work")]
    command = distributed.torchrun_argv(program)

    def start(log_name: str) -> tuple[subprocess.Popen, EventStream]:
        gang = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=(tmp_path / log_name).open("w"),
            text=True,
            env=distributed.local_gang_env(2),  # a fresh master port each time
        )
        return gang, EventStream(gang)

    first, events = start("first.log")
    try:
        events.wait_for(lambda e: e["event"] == "checkpoint", timeout=600)
    finally:
        # torchrun starts each worker in its own session: kill them by pid, as the kubelet
        # kills a pod's whole cgroup.
        for pid in [first.pid, *descendants(first.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        first.wait(timeout=60)
    checkpoints = tmp_path / "out" / "local" / "ddp-killed" / "checkpoints"
    for later in sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name[11:]))[1:]:
        shutil.rmtree(later)

    second, events = start("second.log")
    resumed = events.wait_for(lambda e: e["event"] == "resumed", timeout=600)
    done = events.wait_for(lambda e: e["event"] in ("completed", "failed"), timeout=600)
    assert second.wait(timeout=120) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert done is not None and done["event"] == "completed", done

    start_step = resumed["resumedFromStep"]
    assert start_step == 2
    # One copy of the checkpoint on the node, read by both ranks (not one per rank).
    copies = sorted(p.relative_to(tmp_path / "work" / "resume").as_posix()
                    for p in (tmp_path / "work" / "resume").rglob("checkpoint-*"))  # fmt: skip
    assert copies == ["checkpoint-2"]
    reference = _losses(_metrics(out, "ddp"))
    after = {
        e["step"]: e["loss"]
        for e in events.events
        if e["event"] == "step" and e.get("loss") is not None
    }
    assert sorted(after) == list(range(start_step + 1, STEPS + 1))
    for step, loss in after.items():
        assert loss == pytest.approx(reference[step], rel=1e-4), step


def test_fsdp_settings_make_an_fsdp2_plugin(tmp_path) -> None:
    """The settings `fsdp` hands the Trainer build accelerate's FSDP2 plugin (what a GPU gang
    runs: per-layer sharding, full state dict checkpoints)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from kubetune.api.v1alpha1 import TrainingSpec
    from kubetune_trainer.modeling import Hardware
    from kubetune_trainer.train import sft_config

    config = sft_config(
        TrainingSpec(),
        output_dir=tmp_path,
        has_validation=False,
        hardware=Hardware("cpu", False),
        strategy="fsdp",
    )
    assert config.activation_checkpointing is False  # FSDP checkpoints activations itself
    plugin = FullyShardedDataParallelPlugin(**config.fsdp_plugin_args)
    assert plugin.fsdp_version == 2 and plugin.activation_checkpointing is True
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    assert distributed.effective_strategy("fsdp", "cuda") == "fsdp"
    assert distributed.effective_strategy("fsdp", "cpu") == "ddp"


@pytest.mark.slow
@SLOW_RUN
def test_two_rank_full_fine_tune_publishes_the_trained_model(tiny_job, tmp_path) -> None:
    """method full with 2 ranks resolves to fsdp; on CPU workers accelerate cannot shard
    (see docs/distributed.md), so this runs the closest real path: a 2-rank full fine-tune,
    rank 0 publishing. The published model loads and holds the trained weights: those of
    the last checkpoint, different from the base model's."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    manifest = _manifest(tiny_job, out, name="full", processes=2, learningRate=0.001)
    manifest["spec"]["method"] = "full"
    del manifest["spec"]["lora"]
    assert FineTuneJobSpec.model_validate(manifest["spec"]).strategy == "fsdp"
    _kubetune_run(manifest, tmp_path, 2)

    run = out / "local" / "full"
    published = AutoModelForCausalLM.from_pretrained(run / "model", dtype="auto").state_dict()
    trained = load_file(run / "checkpoints" / f"checkpoint-{STEPS}" / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(
        Path(manifest["spec"]["model"]["uri"].removeprefix("file://"))
    ).state_dict()
    changed = [k for k in trained if not torch.equal(trained[k], base[k])]
    assert len(changed) > len(trained) // 2, "training changed too few tensors"
    # Published in bf16 (the base's own 16-bit dtype or bf16; the fp32 master weights would
    # double the size): the trained weights rounded to it.
    for key, tensor in trained.items():
        assert published[key].dtype == torch.bfloat16, key
        assert torch.equal(published[key], tensor.to(torch.bfloat16)), key
    doc = json.loads((run / "manifest.json").read_text())
    assert distributed.CPU_FSDP_NOTE in doc.get("notes", []), doc.get("notes")
