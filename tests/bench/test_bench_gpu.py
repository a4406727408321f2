"""bench/bench_gpu.py runs end to end (tiny shape on CPU), so it works the first time it meets
a GPU; its FLOP accounting is what its docstring says; and its peaks are the exact device
model's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_gpu.py"


def _load():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_flop_accounting_of_the_8b_shape():
    bench = _load()
    shape = bench.SHAPES["8b"]
    # Llama-3-8B has 8.03e9 parameters; the accounting must land there.
    assert bench.total_parameters(shape) == pytest.approx(8.03e9, rel=0.01)
    n = bench.matmul_parameters(shape)
    # One 2048-token example: 4N per token plus causal attention 6 * L * d * n^2.
    expected = 4 * n * 2048 + 6 * 32 * 4096 * 2048**2
    assert bench.model_flops([2048], shape, n) == expected
    assert bench.steady_throughput([(0.0, 0), (1.0, 100), (3.0, 500)], warmup=1) == (200.0, 2.0)


@pytest.mark.parametrize(
    ("name", "model", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", "H100 NVL", 835.0),
        ("NVIDIA H200", "H200 SXM", 989.0),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA L40S", "L40S", 362.0),
        ("NVIDIA L4", "L4", 121.0),
        ("NVIDIA A10", "A10", 125.0),
        ("NVIDIA GeForce RTX 4090", None, None),
    ],
)
def test_peak_is_the_exact_device_models(name, model, peak):
    assert _load().device_peak(name) == (model, peak)


@pytest.mark.slow
def test_gpu_benchmark_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run(
        # qlora only: each variant is its own process, and qlora is the path with the most
        # to get wrong (4-bit load, adapter precision); lora differs by the quantisation only.
        [sys.executable, str(BENCH), "--shape", "tiny", "--seq", "128", "--steps", "3"]
        + ["--methods", "qlora"]
        + ["--warmup", "1", "--baseline-batch", "2", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert {(r["variant"], r["method"]) for r in results} == {
        (v, "qlora") for v in ("kubetune", "trl-packed", "trl")
    }
    for result in results:
        assert result["steps"] == 3 and result["tokens_per_second"] > 0
        assert result["peak_memory_gib"] > 0 and result["operator_estimate_gib"] is not None
        assert result["memory_vs_estimate"] > 0
        assert result["mfu"] is None  # no peak FLOP/s known for a CPU
        assert result["adapter_dtype"] == "float32"  # equal adapter precision, qlora included
        assert "4 N n" in result["flop_convention"]
    assert "kubetune / TRL packed tokens per second" in done.stdout
    assert "kubetune / TRL tokens per second" in done.stdout
