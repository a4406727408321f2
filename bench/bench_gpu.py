"""GPU training throughput: kubetune's training path vs TRL's SFTTrainer, one GPU.

A randomly initialised Llama of the 8B shape (hidden 4096, 32 layers, 32 heads with 8 KV
heads, MLP 14336, vocabulary 128256) is fine-tuned with LoRA and with QLoRA at sequence
length 2048 on variable-length instruction data, by three variants:

- kubetune: `build_model` + `train_model`, the trainer's own path (padding-free packed rows
  of `--seq` tokens, one per optimizer step, per-example attention, kubetune's precision);
- trl-packed: TRL as a user who knows it would set it up: `packing=True` with its
  best-fit-decreasing strategy (padding-free rows of `--seq` tokens, one per optimizer step:
  the same tokens per step as kubetune), the model's default attention;
- trl: a plain `SFTTrainer` as in TRL's examples (padded batches of `--baseline-batch`
  examples truncated at `--seq`, its default collator and attention).

All three use the same LoRA settings, learning rate, gradient checkpointing, precision and
adapter precision (fp32 adapter weights: TRL would cast a QLoRA adapter to bf16; here it is
cast back, as kubetune keeps it).

Each variant runs in its own process (its peak memory is its own). Printed per variant:

- tokens/s: non-padding tokens per second of wall time over the steps after the first
  `--warmup` (the trainer's `num_input_tokens_seen`, CUDA synchronised at each step end);
- MFU: model FLOPs per second over the GPU's dense bf16 peak, looked up by the exact device
  model (`PEAK_TFLOPS`: H100 SXM 989, H100 PCIe 756, H100 NVL 835 ...; `--peak-tflops`
  overrides). FLOP convention: model FLOPs per example of n tokens: 4 * N * n for
  LoRA/QLoRA (forward 2N per token and the backward pass's activation gradients 2N; frozen
  weights get no weight gradients) plus causal attention 3 * 2 * layers * hidden * n^2 (QK^T
  and AV, forward and twice for backward, half the square for causality), N the
  non-embedding parameters plus the output head. Adapter FLOPs (under 1%), activation
  recomputation (gradient checkpointing) and 4-bit dequantisation are not counted, as MFU's
  definition asks; padding is not counted for any variant;
- peak memory: `torch.cuda.max_memory_allocated` (peak RSS on CPU) next to the operator's
  admission estimate for the method and parameter count, and their ratio.

    .venv/bin/python bench/bench_gpu.py                       # 8B shape, on a GPU
    .venv/bin/python bench/bench_gpu.py --shape tiny --seq 128 --steps 4   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SEED = 5
LEARNING_RATE = 2e-4
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]}
VARIANTS = ("kubetune", "trl-packed", "trl")
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets, by exact
# device model: the first pattern that matches `torch.cuda.get_device_name()` counts (SXM
# parts report no form factor: "NVIDIA H100 80GB HBM3").
PEAK_TFLOPS = (
    ("H100 NVL", r"H100.*NVL", 835.0),
    ("H100 PCIe", r"H100.*PCIe", 756.0),
    ("H100 SXM", r"H100", 989.0),
    ("H200 NVL", r"H200.*NVL", 835.0),
    ("H200 SXM", r"H200", 989.0),
    ("A100", r"A100", 312.0),
    ("L40S", r"L40S", 362.0),
    ("L4", r"\bL4\b", 121.0),
    ("A10", r"\bA10\b", 125.0),
)
FLOP_CONVENTION = (
    "model FLOPs: 4 N n + 6 L d n^2 / example of n tokens (LoRA: no weight gradients of the "
    "frozen base; no recomputation, adapter or dequantisation FLOPs); dense bf16 peak"
)


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int


SHAPES = {
    "8b": Shape(4096, 32, 32, 8, 14336, 128256),
    "tiny": Shape(64, 2, 4, 2, 128, 1024),
}


def write_model(directory: Path, shape: Shape) -> None:
    """A random Llama of `shape` (bf16 safetensors, made on the GPU when there is one) and
    the demo byte-level tokenizer (its ids are a subset of the model's vocabulary)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubetune_trainer.demo_assets import build_tokenizer

    tokenizer = build_tokenizer(768, seed=SEED, chat_template=False)
    config = LlamaConfig(
        **asdict(shape),
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def write_data(path: Path, rows: int) -> None:
    from kubetune_trainer.demo_assets import write_demo_dataset

    write_demo_dataset(path, rows, seed=SEED, long_tail=True)


def model_flops(lengths: list[int], shape: Shape, matmul_params: int) -> float:
    """Model FLOPs of one pass over examples of `lengths` tokens (see the module docstring)."""
    per_token = 4.0 * matmul_params
    attention = 3 * 2 * shape.num_hidden_layers * shape.hidden_size
    return sum(per_token * n + attention * n * n for n in lengths)


def matmul_parameters(shape: Shape) -> int:
    """Parameters in matmuls: every layer's projections and the output head (embeddings and
    norms are lookups and elementwise)."""
    head_dim = shape.hidden_size // shape.num_attention_heads
    attention = 2 * shape.hidden_size * shape.hidden_size + 2 * shape.hidden_size * (
        shape.num_key_value_heads * head_dim
    )
    mlp = 3 * shape.hidden_size * shape.intermediate_size
    return shape.num_hidden_layers * (attention + mlp) + shape.hidden_size * shape.vocab_size


def total_parameters(shape: Shape) -> int:
    return matmul_parameters(shape) + shape.hidden_size * shape.vocab_size  # + embeddings


class StepTimer:
    """Wall time and non-padding tokens at each optimizer step end (CUDA synchronised)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self) -> None:
                self.marks: list[tuple[float, int]] = []

            def on_step_end(self, args, state, control, **kwargs):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.marks.append((time.perf_counter(), int(state.num_input_tokens_seen or 0)))

        return _Timer()


def steady_throughput(marks: list[tuple[float, int]], warmup: int) -> tuple[float, float]:
    """(tokens per second, seconds) over the steps after the first `warmup`."""
    start = min(warmup, len(marks) - 2) if len(marks) >= 2 else 0
    (t0, n0), (t1, n1) = marks[start], marks[-1]
    seconds = max(t1 - t0, 1e-9)
    return (n1 - n0) / seconds, seconds


def example_lengths(tokenizer, rows: list[dict], seq: int) -> list[int]:
    return [
        min(seq, len(tokenizer(row["prompt"] + row["completion"])["input_ids"]) + 1) for row in rows
    ]


def run_kubetune(workdir: Path, method: str, args: argparse.Namespace, timer) -> dict:
    from kubetune.api.v1alpha1 import FineTuneJob
    from kubetune_trainer.data import load_training_data
    from kubetune_trainer.modeling import build_model
    from kubetune_trainer.progress import quiet_libraries
    from kubetune_trainer.train import train_model

    quiet_libraries()
    spec = {
        "model": {"uri": (workdir / "model").as_uri()},
        "method": method,
        "lora": LORA,
        "dataset": {
            "uri": (workdir / "train.jsonl").as_uri(),
            "validationSplit": 0,
            "promptTemplate": "alpaca",
        },
        "training": {
            "maxSteps": args.steps,
            "learningRate": LEARNING_RATE,
            "batchSize": 1,  # one packed row of --seq tokens
            "gradientAccumulationSteps": 1,
            "maxSeqLength": args.seq,
            "gradientCheckpointing": True,
            "seed": SEED,
            "logEverySteps": 1,
            "checkpointEverySteps": 10**6,
        },
        "output": {"uri": (workdir / "out").as_uri()},
    }
    job = FineTuneJob.model_validate({"metadata": {"name": "bench"}, "spec": spec})
    data = load_training_data(job.spec.dataset, seed=SEED, cache_dir=workdir / "cache")
    built = build_model(job.spec, workdir / "model")
    outcome = train_model(
        built, data, job.spec.training, output_dir=workdir / f"ckpt-{method}", callbacks=[timer]
    )
    return {
        "precision": built.hardware.precision,
        "adapter_dtype": adapter_dtype(outcome.model),
        "notes": built.notes,
    }


def run_trl(
    workdir: Path, method: str, args: argparse.Namespace, timer, packed: bool = False
) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from kubetune_trainer.data import load_eval_rows

    datasets.disable_progress_bars()
    cuda = torch.cuda.is_available()
    half = torch.bfloat16 if cuda else torch.float32
    kwargs = {"dtype": half}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=half,
        )
        kwargs["device_map"] = {"": 0 if cuda else "cpu"}
    elif cuda:
        kwargs["device_map"] = {"": 0}
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", **kwargs)
    rows = load_eval_rows((workdir / "train.jsonl").as_uri(), cache_dir=workdir / "cache")
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(workdir / f"trl-{method}"),
            max_steps=args.steps,
            # Packed: one row of --seq tokens per step, as kubetune's; else padded examples.
            per_device_train_batch_size=1 if packed else args.baseline_batch,
            packing=packed,
            packing_strategy="bfd",
            learning_rate=LEARNING_RATE,
            max_length=args.seq,
            gradient_checkpointing=True,
            seed=SEED,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            bf16=cuda,
            use_cpu=not cuda,
            disable_tqdm=True,
            include_num_input_tokens_seen="non_padding",
        ),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
        callbacks=[timer],
    )
    # Equal adapter precision: TRL casts a QLoRA adapter to bf16, kubetune keeps it fp32.
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)
    trainer.train()
    return {
        "precision": "bf16" if cuda else "fp32",
        "adapter_dtype": adapter_dtype(trainer.model),
        "notes": [],
    }


def adapter_dtype(model) -> str:
    """The dtype(s) of the trained parameters, e.g. 'float32'."""
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad}
    return ",".join(sorted(dtypes))


def operator_estimate_gib(method: str, parameters: int) -> float | None:
    try:
        from kubetune_operator.validation import estimate_gpu_memory_gib
    except ImportError:  # a trainer-only install
        return None
    return float(f"{estimate_gpu_memory_gib(method, parameters / 1e9):.4g}")


def device_peak(name: str) -> tuple[str, float] | tuple[None, None]:
    """(device model, dense bf16 peak TFLOP/s) for a CUDA device name, or (None, None)."""
    import re

    for model, pattern, peak in PEAK_TFLOPS:
        if re.search(pattern, name):
            return model, peak
    return None, None


def peak_tflops(override: float | None) -> tuple[str | None, float | None]:
    """(where the peak comes from, the peak)."""
    import torch

    if override:
        return "--peak-tflops", override
    if not torch.cuda.is_available():
        return None, None
    return device_peak(torch.cuda.get_device_name(0))


def measure(variant: str, method: str, workdir: Path, args: argparse.Namespace) -> dict:
    import torch

    from kubetune_trainer.data import load_eval_rows
    from kubetune_trainer.modeling import load_tokenizer

    shape = SHAPES[args.shape]
    timer = StepTimer()
    started = time.perf_counter()
    if variant == "kubetune":
        extra = run_kubetune(workdir, method, args, timer)
    else:
        extra = run_trl(workdir, method, args, timer, packed=variant == "trl-packed")
    wall = time.perf_counter() - started
    tokens_per_second, steady_seconds = steady_throughput(timer.marks, args.warmup)

    # Model FLOPs per token from the data's own example lengths (same data for both).
    tokenizer = load_tokenizer(workdir / "model")
    rows = load_eval_rows((workdir / "train.jsonl").as_uri(), cache_dir=workdir / "cache")
    lengths = example_lengths(tokenizer, rows, args.seq)
    flops_per_token = model_flops(lengths, shape, matmul_parameters(shape)) / sum(lengths)
    peak_model, peak = peak_tflops(args.peak_tflops)
    achieved = flops_per_token * tokens_per_second / 1e12
    cuda = torch.cuda.is_available()
    memory = (
        torch.cuda.max_memory_allocated() / 2**30
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    estimate = operator_estimate_gib(method, total_parameters(shape))
    return {
        "variant": variant,
        "method": method,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "peak_model": peak_model,
        "peak_tflops": peak,
        "flop_convention": FLOP_CONVENTION,
        "precision": extra["precision"],
        "adapter_dtype": extra["adapter_dtype"],
        "notes": extra["notes"],
        "steps": len(timer.marks),
        "tokens_per_second": round(tokens_per_second, 1),
        "steady_seconds": round(steady_seconds, 2),
        "wall_seconds": round(wall, 1),
        "model_tflops_per_second": float(f"{achieved:.4g}"),
        "mfu": round(achieved / peak, 4) if peak else None,
        "peak_memory_gib": float(f"{memory:.4g}"),
        "memory_kind": "cuda max_memory_allocated" if cuda else "peak RSS",
        "operator_estimate_gib": estimate,
        "memory_vs_estimate": round(memory / estimate, 3) if estimate else None,
        "parameters": total_parameters(shape),
    }


def rows_needed(args: argparse.Namespace) -> int:
    # Enough examples for every step of every variant (~150 tokens a row on average).
    per_step = max(args.seq // 100, args.baseline_batch)
    return max(64, args.steps * per_step * 2)


def print_table(results: list[dict]) -> None:
    keys = ["tokens_per_second", "mfu", "peak_memory_gib", "operator_estimate_gib", "steps"]
    print(f"{'variant':>10} {'method':>6} " + " ".join(f"{k:>22}" for k in keys))
    for result in results:
        cells = " ".join(f"{str(result[k]):>22}" for k in keys)
        print(f"{result['variant']:>10} {result['method']:>6} {cells}")
    by = {(r["variant"], r["method"]): r for r in results}
    for method in sorted({r["method"] for r in results}):
        ours = by.get(("kubetune", method))
        for variant, label in (("trl-packed", "TRL packed"), ("trl", "TRL")):
            other = by.get((variant, method))
            if ours and other and other["tokens_per_second"]:
                ratio = ours["tokens_per_second"] / other["tokens_per_second"]
                print(f"{method}: kubetune / {label} tokens per second {ratio:.2f}x")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--methods", default="lora,qlora", help="comma-separated: lora,qlora")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s")
    parser.add_argument("--baseline-batch", type=int, default=4, help="TRL examples per step")
    parser.add_argument("--peak-tflops", type=float, help="GPU dense bf16 peak for MFU")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child_command(args: argparse.Namespace, variant: str, method: str, workdir: Path) -> list:
    command = [sys.executable, __file__, "--variant", variant, "--method", method]
    command += ["--workdir", str(workdir), "--shape", args.shape, "--seq", str(args.seq)]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--baseline-batch", str(args.baseline_batch)]
    if args.peak_tflops:
        command += ["--peak-tflops", str(args.peak_tflops)]
    return command


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variant:  # child process: one variant, JSON on the last stdout line
        print(json.dumps(measure(args.variant, args.method, args.workdir, args)))
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="kubetune-gpu-bench-") as tmp:
        workdir = Path(tmp)
        write_model(workdir / "model", SHAPES[args.shape])
        write_data(workdir / "train.jsonl", rows_needed(args))
        for method in args.methods.split(","):
            for variant in args.variants.split(","):
                done = subprocess.run(
                    child_command(args, variant, method, workdir),
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if done.returncode != 0:
                    print(done.stderr[-4000:], file=sys.stderr)
                    return 1
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), file=sys.stderr)
    print_table(results)
    document = {
        "shape": args.shape,
        "seq": args.seq,
        "steps": args.steps,
        "flop_convention": FLOP_CONVENTION,
        "results": results,
    }
    print(json.dumps(document))
    if args.json:
        args.json.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
