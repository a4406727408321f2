"""Operator benchmark on the local control plane (not a timed test).

    .venv/bin/python bench/bench_operator.py [--n 500] [--running 3] [--window 60]

1. Baseline: a bare client creates N suspended Jobs (the same manifests the operator
   would build) directly, with the same concurrency the benchmark uses to create FTJs.
2. Burst: N FineTuneJobs with a Kueue queue name are created at once; their Jobs are
   created suspended and their status becomes Queued. Watches record when each Job and
   each first status appear: p50/p99 latencies, total time against the baseline.
3. Running: a few FineTuneJobs run a stand-in trainer (this file with --fake-trainer)
   that pushes progress 10 times a second; status writes per job per minute are counted.
4. Peak RSS of the operator process (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fake_trainer(seconds: float) -> int:
    """Stand-in trainer: progress pushes at 10 Hz, then a TrainerResult."""
    url, token = os.environ["KUBETUNE_PROGRESS_URL"], os.environ["KUBETUNE_PROGRESS_TOKEN"]
    total = int(seconds * 10)
    for step in range(1, total + 1):
        body = json.dumps(
            {"event": "step", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "step": step, "totalSteps": total, "loss": 1.0 / step}
        ).encode()  # fmt: skip
        request = urllib.request.Request(
            url, data=body, headers={"Authorization": f"Bearer {token}"}, method="POST"
        )
        urllib.request.urlopen(request, timeout=10).close()
        time.sleep(0.1)  # the pace of a fast trainer's log steps
    result = {"artifacts": {"model": "s3://bench/none/"}, "totalSteps": total}
    Path(os.environ["KUBETUNE_TERMINATION_LOG"]).write_text(json.dumps(result))
    return 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def ftj_manifest(name: str, *, queue: str | None, gpus: int = 0) -> dict:
    labels = {"kueue.x-k8s.io/queue-name": queue} if queue else {}
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "model": {"uri": "s3://bench/models/tiny/"},
            "dataset": {"uri": "s3://bench/data/train.jsonl"},
            "output": {"uri": "s3://bench/runs/"},
            "resources": {"gpus": gpus, "cpu": "10m", "memory": "64Mi", "shmSize": "1Mi"},
        },
    }


class Watcher(threading.Thread):
    """Records the first time each object matching `accept` is seen on a watch."""

    def __init__(self, rest, path: str, accept) -> None:  # noqa: ANN001
        super().__init__(daemon=True)
        self.rest, self.path, self.accept = rest, path, accept
        self.first: dict[str, float] = {}
        self.modified: dict[str, int] = {}
        self.stop = False

    def run(self) -> None:
        version = self.rest.get(self.path)["metadata"]["resourceVersion"]
        while not self.stop:
            for event in self.rest.watch(self.path, resourceVersion=version, timeoutSeconds=30):
                obj = event["object"]
                version = obj["metadata"].get("resourceVersion", version)
                name = obj["metadata"].get("name")
                if event["type"] == "MODIFIED":
                    self.modified[name] = self.modified.get(name, 0) + 1
                if name not in self.first and self.accept(obj):
                    self.first[name] = time.monotonic()
                if self.stop:
                    return


async def create_all(kube, manifests: list[dict], concurrency: int) -> dict[str, float]:  # noqa: ANN001
    """POST every manifest with `concurrency` in flight; returns name -> time created."""
    from kubetune_operator.kube import path_for

    created: dict[str, float] = {}
    queue: asyncio.Queue = asyncio.Queue()
    for m in manifests:
        queue.put_nowait(m)

    async def worker() -> None:
        while not queue.empty():
            manifest = queue.get_nowait()
            if manifest["kind"] == "FineTuneJob":
                ns = manifest["metadata"]["namespace"]
                path = f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs"
            else:
                path = path_for(manifest)
            await kube.request("POST", path, manifest)
            created[manifest["metadata"]["name"]] = time.monotonic()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return created


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--running", type=int, default=3)
    parser.add_argument("--window", type=float, default=60.0, help="seconds of running jobs")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--fake-trainer", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fake_trainer is not None:
        return fake_trainer(args.fake_trainer)

    from kubetune.devcluster.controlplane import DevCluster
    from kubetune_operator import builders
    from kubetune_operator.kube import Kube
    from kubetune_operator.settings import OperatorSettings
    from tests.fixtures.operator import OperatorProcess, install_crd

    state = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    cluster = DevCluster.start(state)
    rest = cluster.rest()
    results: dict[str, object] = {"n": args.n}
    try:
        install_crd(cluster)
        for ns in ("bench-bare", "bench"):
            rest.post(
                "/api/v1/namespaces",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
            )
        seconds = args.window + 10
        trainer = [sys.executable, str(Path(__file__).resolve()), "--fake-trainer", str(seconds)]
        # The default patch interval (5 s), not the tests' 1 s.
        op = OperatorProcess(
            cluster, state, trainer_command=trainer, extra_args=["--patch-interval", "5"]
        )
        op.start()

        async def run_creates(manifests: list[dict]) -> tuple[dict[str, float], float, float]:
            os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
            kube = await Kube.connect(pool_size=args.concurrency)
            try:
                start = time.monotonic()
                created = await create_all(kube, manifests, args.concurrency)
                return created, start, time.monotonic()
            finally:
                await kube.close()

        # 1. Baseline: the same Jobs, created directly.
        settings = OperatorSettings(progress_base_url=op.url)
        bare = []
        for i in range(args.n):
            ftj = ftj_manifest(f"ftj-{i:04d}", queue="bench")
            ftj["metadata"].update(namespace="bench-bare", uid=f"00000000-0000-0000-0000-{i:012d}")
            job = builders.build_job(ftj, settings)
            job["metadata"].pop("ownerReferences")  # no owner exists in the baseline
            bare.append(job)
        _, bare_start, bare_end = asyncio.run(run_creates(bare))
        results["bare_jobs_total_s"] = round(bare_end - bare_start, 2)

        # 2. Burst of FineTuneJobs.
        jobs = Watcher(rest, "/apis/batch/v1/namespaces/bench/jobs", lambda o: True)
        statuses = Watcher(
            rest,
            "/apis/kubetune.io/v1alpha1/namespaces/bench/finetunejobs",
            lambda o: bool((o.get("status") or {}).get("phase")),
        )
        jobs.start(), statuses.start()
        burst = [ftj_manifest(f"ftj-{i:04d}", queue="bench") for i in range(args.n)]
        for m in burst:
            m["metadata"]["namespace"] = "bench"
        created, start, _ = asyncio.run(run_creates(burst))
        deadline = time.monotonic() + 600
        while (
            len(jobs.first) < args.n or len(statuses.first) < args.n
        ) and time.monotonic() < deadline:
            time.sleep(0.2)  # a benchmark's own polling, not test synchronisation
        job_lat = [
            jobs.first[f"{n}-trainer"] - t
            for n, t in created.items()
            if f"{n}-trainer" in jobs.first
        ]
        st_lat = [statuses.first[n] - t for n, t in created.items() if n in statuses.first]
        results.update(
            jobs_created=len(job_lat),
            statuses_seen=len(st_lat),
            create_to_job_p50_s=round(percentile(job_lat, 50), 3),
            create_to_job_p99_s=round(percentile(job_lat, 99), 3),
            create_to_status_p50_s=round(percentile(st_lat, 50), 3),
            create_to_status_p99_s=round(percentile(st_lat, 99), 3),
            operator_total_s=round(max(jobs.first.values()) - start, 2),
        )
        results["ratio_to_bare"] = round(
            results["operator_total_s"] / results["bare_jobs_total_s"], 2
        )
        queued = sum(1 for _ in statuses.first)
        results["queued_with_status"] = queued

        # 3. Running jobs: status writes per job per minute while progress streams in.
        running = [f"run-{i}" for i in range(args.running)]
        runs = [ftj_manifest(name, queue=None) for name in running]
        for m in runs:
            m["metadata"]["namespace"] = "bench"
        statuses.modified.clear()
        asyncio.run(run_creates(runs))
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds + 30:
            phases = {
                n: (
                    rest.get(f"/apis/kubetune.io/v1alpha1/namespaces/bench/finetunejobs/{n}").get(
                        "status"
                    )
                    or {}
                ).get("phase")
                for n in running
            }
            if all(p in ("Succeeded", "Failed") for p in phases.values()):
                break
            time.sleep(1)
        elapsed_min = (time.monotonic() - t0) / 60
        writes = [statuses.modified.get(n, 0) for n in running]
        results["running_phases"] = phases
        results["status_patches_per_running_job_per_min"] = round(
            statistics.mean(writes) / elapsed_min, 1
        )
        results["progress_events_accepted"] = op.metric(
            "kubetune_progress_events_total", {"result": "accepted"}
        )

        # 4. Memory.
        status_text = Path(f"/proc/{op.proc.pid}/status").read_text()
        hwm = next(line for line in status_text.splitlines() if line.startswith("VmHWM"))
        results["operator_peak_rss_mb"] = round(int(hwm.split()[1]) / 1024, 1)
        jobs.stop = statuses.stop = True
        op.stop()
    finally:
        cluster.stop()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
