"""Trainer throughput: kubetune's training path vs a plain TRL SFTTrainer set up as in a
typical TRL example (no packing, default collator), and vs TRL with its own packing.

Three variants: `baseline` (TRL, padded batches of 8 examples), `trl-packed` (TRL with
`packing=True`, best-fit-decreasing, padding-free rows of 512 tokens, one row per step: the
same tokens per optimizer step as kubetune's), and `ours` (kubetune's training path).

Both fine-tune the same random Llama (hidden 256, 4 layers) with the same LoRA adapter,
learning rate, seed and number of epochs on the same variable-length instruction data, then
get the same evaluation: mean completion-token loss on held-out rows, computed one example at
a time (no packing, no padding), so the number does not depend on how training batched.

Throughput counts useful tokens (prompt + completion + eos of every training example, per
epoch) over training time; padding is not credited to anyone. Training runs on one thread
and time is the process's CPU time, which other load on a shared machine does not inflate
the way it inflates wall time (wall time is printed too).

    .venv/bin/python bench/bench_trainer.py [--rows 512] [--epochs 1]

Each variant runs in its own process so that peak RSS is its own; the variants alternate
`--repeats` times and the fastest run of each counts, because a shared machine's load comes
and goes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEED = 11
LEARNING_RATE = 3e-3
# Baseline: 8 padded examples per step, as in TRL's examples. Ours: one packed row of 512
# tokens per step (about 6 of these examples), so that both take a similar number of
# optimizer steps per epoch (48 and 63): fewer, larger steps lose eval loss at one epoch.
BASELINE_BATCH = 8
OURS_BATCH = 1
OURS_SEQ = 512
VARIANTS = ("baseline", "trl-packed", "ours")


def bench_shape():
    from kubetune_trainer.demo_assets import TinyModelShape

    return TinyModelShape(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=768,
        vocab_size=768,
    )


def prepare(workdir: Path, rows: int, long_tail: bool) -> None:
    from kubetune_trainer.demo_assets import write_demo_dataset, write_tiny_model

    write_tiny_model(workdir / "model", seed=SEED, shape=bench_shape())
    write_demo_dataset(workdir / "train.jsonl", rows, seed=SEED, long_tail=long_tail)
    write_demo_dataset(workdir / "validation.jsonl", 64, seed=SEED + 1, long_tail=long_tail)


def converted_rows(path: Path) -> list[dict]:
    from kubetune_trainer.data import load_eval_rows

    return load_eval_rows(path.as_uri(), cache_dir=path.parent / "cache")


def useful_tokens(tokenizer, rows: list[dict]) -> int:
    return sum(
        len(tokenizer(row["prompt"] + row["completion"])["input_ids"]) + 1  # + eos
        for row in rows
    )


def completion_loss(model, tokenizer, rows: list[dict]) -> float:
    """Token-weighted NLL of the completions (+ eos) given the prompts, one row at a time."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer(row["prompt"])["input_ids"]
            full = tokenizer(row["prompt"] + row["completion"])["input_ids"] + [
                tokenizer.eos_token_id
            ]
            labels = [-100] * len(prompt) + full[len(prompt) :]
            out = model(input_ids=torch.tensor([full]), labels=torch.tensor([labels]))
            n = sum(1 for label in labels[1:] if label != -100)
            total += out.loss.item() * n
            count += n
    return total / count


def lora_settings() -> dict:
    return {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}


def run_ours(workdir: Path, epochs: float, attention: str | None = None) -> dict:
    from kubetune.api.v1alpha1 import FineTuneJob
    from kubetune_trainer.data import load_training_data
    from kubetune_trainer.modeling import build_model
    from kubetune_trainer.progress import quiet_libraries
    from kubetune_trainer.train import train_model

    quiet_libraries()
    job = FineTuneJob.model_validate(
        {
            "metadata": {"name": "bench"},
            "spec": {
                "model": {"uri": (workdir / "model").as_uri()},
                "method": "lora",
                "lora": lora_settings(),
                # The baseline trains on the alpaca template; so does ours (not the chat one).
                "dataset": {
                    "uri": (workdir / "train.jsonl").as_uri(),
                    "validationSplit": 0,
                    "promptTemplate": "alpaca",
                },
                # Everything not set here is kubetune's default (packing on, bfd, ...).
                "training": {
                    "epochs": epochs,
                    "learningRate": LEARNING_RATE,
                    "batchSize": OURS_BATCH,
                    "gradientAccumulationSteps": 1,
                    "maxSeqLength": OURS_SEQ,
                    "seed": SEED,
                    "logEverySteps": 10,
                    "checkpointEverySteps": 100000,
                },
                "output": {"uri": (workdir / "out").as_uri()},
            },
        }
    )
    data = load_training_data(job.spec.dataset, seed=SEED, cache_dir=workdir / "cache")
    built = build_model(job.spec, workdir / "model")
    if attention:  # ablation: another attention implementation for the packed rows
        built.model.set_attn_implementation(attention)
    outcome = train_model(built, data, job.spec.training, output_dir=workdir / "ours-ckpt")
    return {
        "seconds": outcome.seconds,
        "cpu_seconds": outcome.cpu_seconds,
        "steps": outcome.global_step,
        "model": outcome.model,
        "tokenizer": built.tokenizer,
    }


def run_baseline(workdir: Path, epochs: float, packed: bool = False) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    train = datasets.Dataset.from_list(converted_rows(workdir / "train.jsonl"))
    lora = lora_settings()
    # TRL's own packing: rows of OURS_SEQ tokens, OURS_BATCH per step (kubetune's shape).
    packing = {"packing": True, "packing_strategy": "bfd", "max_length": OURS_SEQ} if packed else {}
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(workdir / "baseline-out"),
            num_train_epochs=epochs,
            per_device_train_batch_size=OURS_BATCH if packed else BASELINE_BATCH,
            **packing,
            learning_rate=LEARNING_RATE,
            seed=SEED,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            bf16=False,
            use_cpu=True,
            disable_tqdm=True,
        ),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["targetModules"],
            task_type="CAUSAL_LM",
        ),
    )
    started, cpu_started = time.monotonic(), time.process_time()
    trainer.train()
    return {
        "seconds": time.monotonic() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "steps": trainer.state.global_step,
        "model": trainer.model,
        "tokenizer": tokenizer,
    }


def measure(variant: str, workdir: Path, epochs: float, attention: str | None) -> dict:
    import torch

    # One thread: CPU time then measures the work done, which other processes on a shared
    # machine cannot inflate the way they inflate wall time.
    torch.set_num_threads(1)
    train_rows = converted_rows(workdir / "train.jsonl")
    validation_rows = converted_rows(workdir / "validation.jsonl")
    if variant == "ours":
        run = run_ours(workdir, epochs, attention)
    else:
        run = run_baseline(workdir, epochs, packed=variant == "trl-packed")
    lengths = [useful_tokens(run["tokenizer"], [row]) for row in train_rows]
    # Packing truncates rows longer than a packed row; none may be, or ours would be
    # credited with tokens it never trained on.
    assert max(lengths) <= OURS_SEQ, f"a row has {max(lengths)} tokens > {OURS_SEQ}"
    tokens = sum(lengths) * epochs
    return {
        "variant": variant,
        "train_cpu_seconds": round(run["cpu_seconds"], 2),
        "train_wall_seconds": round(run["seconds"], 2),
        "optimizer_steps": run["steps"],
        "examples_per_second": round(len(train_rows) * epochs / run["cpu_seconds"], 2),
        "tokens_per_second": round(tokens / run["cpu_seconds"], 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "eval_loss": round(completion_loss(run["model"], run["tokenizer"], validation_rows), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512, help="training rows (default 512)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument(
        "--lengths",
        choices=["long-tail", "short"],
        default="long-tail",
        help="row lengths: log-normal like real instruction data (default), or 40-100 tokens",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant (default 2)")
    parser.add_argument(
        "--ours-attention",
        choices=["sdpa", "eager", "kubetune_varlen_sdpa"],
        help="ablation: train kubetune's packed rows with this attention implementation "
        "instead of the one kubetune picks",
    )
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # child process: one variant, JSON on the last stdout line
        print(json.dumps(measure(args.variant, args.workdir, args.epochs, args.ours_attention)))
        return 0

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        workdir = Path(tmp)
        prepare(workdir, args.rows, args.lengths == "long-tail")
        results: dict[str, dict] = {}
        for _ in range(args.repeats):
            for variant in VARIANTS:
                done = subprocess.run(
                    [sys.executable, __file__, "--variant", variant, "--workdir", str(workdir)]
                    + ["--epochs", str(args.epochs)]
                    + (["--ours-attention", args.ours_attention] if args.ours_attention else []),
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    return 1
                result = json.loads(done.stdout.strip().splitlines()[-1])
                print(json.dumps(result), file=sys.stderr)
                best = results.get(variant)
                if best is None or result["train_cpu_seconds"] < best["train_cpu_seconds"]:
                    results[variant] = result

    keys = list(results["ours"])[1:]
    print(f"{'':22}{'baseline TRL':>14}{'TRL packed':>14}{'kubetune':>14}")
    for key in keys:
        cells = "".join(f"{results[v][key]:>14}" for v in VARIANTS)
        print(f"{key:22}{cells}")
    ours = results["ours"]["tokens_per_second"]
    speedup = ours / results["baseline"]["tokens_per_second"]
    packed_speedup = ours / results["trl-packed"]["tokens_per_second"]
    print(f"throughput ratio (kubetune / baseline): {speedup:.2f}x")
    print(f"throughput ratio (kubetune / TRL packed): {packed_speedup:.2f}x")
    summary = {
        "rows": args.rows,
        "lengths": args.lengths,
        "epochs": args.epochs,
        "ours_attention": args.ours_attention or "default",
    }
    ratios = {"ratio": round(speedup, 3), "ratio_trl_packed": round(packed_speedup, 3)}
    print(json.dumps({**summary, **results, **ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
