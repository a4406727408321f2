"""GPU code paths decided on the CPU: where weights load, TF32, data-loader workers and
parallel tokenisation. (The GPU kernels themselves run only on a GPU: bench/bench_gpu.py.)"""

from __future__ import annotations

from kubetune_trainer.modeling import Hardware
from kubetune_trainer.tokens import PARALLEL_TOKENISE_ROWS, tokenise_processes
from kubetune_trainer.train import dataloader_workers

CPU = Hardware("cpu", bf16_supported=False)
A100 = Hardware("cuda", True, (8, 0))
T4 = Hardware("cuda", False, (7, 5))


def test_weights_load_straight_onto_the_gpu():
    assert A100.device_map() == {"": 0} and T4.device_map() == {"": 0}
    assert CPU.device_map() is None


def test_tf32_from_ampere_on():
    assert A100.tf32 and not T4.tf32 and not CPU.tf32


def test_dataloader_workers_only_on_gpu():
    assert dataloader_workers(CPU, cpus=16) == 0  # they would compete with training
    assert dataloader_workers(A100, cpus=16) == 4
    assert dataloader_workers(A100, cpus=2) == 1
    assert dataloader_workers(A100, cpus=1) == 0


def test_tokenisation_runs_in_parallel_for_large_data_only():
    assert tokenise_processes(1000, cpus=16) is None
    assert tokenise_processes(PARALLEL_TOKENISE_ROWS, cpus=16) == 8
    assert tokenise_processes(PARALLEL_TOKENISE_ROWS, cpus=4) == 4
    assert tokenise_processes(PARALLEL_TOKENISE_ROWS, cpus=1) is None
