"""Data-parallel scaling on CPU: tokens/s per rank with 1 and 2 trainer processes (gloo).

Each run fine-tunes the same tiny random Llama (the demo model) with the same LoRA adapter and
the same per-rank batch (weak scaling: 2 ranks train twice the rows per optimizer step), for
the same number of optimizer steps, through the launcher trainer pods use (torchrun, one
thread per rank). Throughput is the trainer's own count of non-padding tokens trained (summed
over ranks) over the training wall time; per rank divides by the world size; efficiency is
per-rank throughput at N ranks over that at 1.

    .venv/bin/python bench/bench_scaling.py [--ranks 1 2] [--steps 30] [--repeats 2]

A 2-rank run needs 2 free cores to scale; on a shared machine the fastest of `--repeats`
runs counts. Multi-GPU numbers (NCCL) need a machine with several GPUs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_assets(folder: Path, rows: int) -> tuple[Path, Path]:
    from kubetune_trainer.demo_assets import write_demo_dataset, write_tiny_model

    model = write_tiny_model(folder / "model", seed=0)
    data = write_demo_dataset(folder / "train.jsonl", rows, 0)
    return model, data


def manifest(model: Path, data: Path, out: Path, ranks: int, steps: int, batch: int) -> dict:
    from tests.fixtures.tiny_model import job_manifest

    return job_manifest(
        model,
        data,
        out.as_uri() + "/",
        name=f"scale-{ranks}",
        training={
            "maxSteps": steps,
            "batchSize": batch,
            "gradientAccumulationSteps": 1,
            "maxSeqLength": 256,
            "checkpointEverySteps": 10_000,
            "logEverySteps": steps,
        },
        resources={"gpus": 0, "nodes": ranks},
        evaluation={"enabled": False},
    )


def run(ranks: int, folder: Path, model: Path, data: Path, steps: int, batch: int) -> dict:
    import yaml

    from kubetune_trainer.distributed import local_gang_env, torchrun_argv

    out = folder / f"out-{ranks}"
    job = manifest(model, data, out, ranks, steps, batch)
    job["spec"]["dataset"]["validationSplit"] = 0.0
    config = folder / f"job-{ranks}.yaml"
    config.write_text(yaml.safe_dump(job))
    program = ["-m", "kubetune_trainer", "--config", str(config), "--namespace", "bench"]
    program += ["--work-dir", str(folder / f"work-{ranks}")]
    command = torchrun_argv(program)
    env = {**local_gang_env(ranks), "OMP_NUM_THREADS": "1"}  # one core per rank, in every run
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{ranks} ranks failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "bench" / f"scale-{ranks}" / "metrics.json").read_text())
    tokens = metrics["metrics"]["tokensTrained"]
    seconds = metrics["trainSeconds"]
    return {"ranks": ranks, "tokens": tokens, "seconds": round(seconds, 2),
            "tokensPerSecond": round(tokens / seconds, 1),
            "tokensPerSecondPerRank": round(tokens / seconds / ranks, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4, help="rows per rank per step")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kubetune-scaling-") as tmp:
        folder = Path(tmp)
        rows = max(args.ranks) * args.batch * args.steps  # one pass, no row seen twice
        model, data = write_assets(folder, rows)
        best: dict[int, dict] = {}
        for _ in range(args.repeats):
            for ranks in args.ranks:
                result = run(ranks, folder, model, data, args.steps, args.batch)
                print(json.dumps(result), flush=True)
                if ranks not in best or result["seconds"] < best[ranks]["seconds"]:
                    best[ranks] = result
    base = best[min(best)]["tokensPerSecondPerRank"]
    print("\n| ranks | tokens/s (all ranks) | tokens/s per rank | efficiency |")
    print("|---|---|---|---|")
    for ranks, result in sorted(best.items()):
        efficiency = result["tokensPerSecondPerRank"] / base
        print(
            f"| {ranks} | {result['tokensPerSecond']:,.0f} | "
            f"{result['tokensPerSecondPerRank']:,.0f} | {efficiency:.0%} |"
        )


if __name__ == "__main__":
    main()
