"""Operator benchmark on the local control plane (not a timed test).

    .venv/bin/python bench/bench_operator.py [--n 500] [--running 3] [--window 60]

1. Bare baseline: a bare client creates N suspended Jobs (the same manifests the operator
   would build) directly, with the same concurrency the benchmark uses to create FTJs.
2. Floor baseline: a bare client makes exactly the writes a burst makes (N FineTuneJobs,
   then for each its Job, its status patch and its Event) with the same concurrency (the
   client's POSTs, the operator's workers and Event slots), in a namespace the operator does
   not serve: what the burst would take with an operator that cost nothing.
3. Burst: N FineTuneJobs with a Kueue queue name are created at once; their Jobs are
   created suspended and their status becomes Queued. Watches record when each Job, status
   and Event appear: p50/p99 latencies, total time against both baselines; the operator's
   API writes and CPU per FineTuneJob.
4. Running: a few FineTuneJobs run a stand-in trainer (this file with --fake-trainer)
   that pushes progress 10 times a second; status writes per job per minute are counted.
5. Peak RSS of the operator process (VmHWM).
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


def fake_trainer(seconds: float) -> int:
    """Stand-in trainer: progress pushes at 10 Hz with its projected token, then a result."""
    url = os.environ["KUBETUNE_PROGRESS_URL"]
    token_file = Path(os.environ["KUBETUNE_PROGRESS_TOKEN_FILE"])
    total = int(seconds * 10)
    for step in range(1, total + 1):
        token = token_file.read_text().strip()
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


def typed(manifest: dict, namespace: str, uid: str):  # noqa: ANN201
    """The validated FineTuneJob the operator would hold for `manifest`."""
    from kubetune.api.v1alpha1 import FineTuneJob

    meta = {**manifest["metadata"], "namespace": namespace, "uid": uid}
    return FineTuneJob.model_validate({"metadata": meta, "spec": manifest["spec"]})


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
    """Records the first time each object matching `accept` is seen on a watch.

    Objects are keyed by `key(obj)` (default: their name). `ready` is set once the watch's
    starting point is fixed, so nothing created afterwards can be missed.
    """

    def __init__(self, rest, path: str, accept, key=None) -> None:  # noqa: ANN001
        super().__init__(daemon=True)
        self.rest, self.path, self.accept = rest, path, accept
        self.key = key or (lambda obj: obj["metadata"].get("name"))
        self.first: dict[str, float] = {}
        self.modified: dict[str, int] = {}
        self.ready = threading.Event()
        self.stop = False

    def run(self) -> None:
        version = self.rest.get(self.path)["metadata"]["resourceVersion"]
        self.ready.set()
        while not self.stop:
            for event in self.rest.watch(self.path, resourceVersion=version, timeoutSeconds=30):
                obj = event["object"]
                version = obj["metadata"].get("resourceVersion", version)
                name = self.key(obj)
                if event["type"] == "MODIFIED":
                    self.modified[name] = self.modified.get(name, 0) + 1
                if name not in self.first and self.accept(obj):
                    self.first[name] = time.monotonic()
                if self.stop:
                    return

    def wait_for(self, count: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while len(self.first) < count and time.monotonic() < deadline:
            time.sleep(0.1)  # a benchmark's own polling, not test synchronisation


def start_watchers(*watchers: Watcher) -> None:
    for w in watchers:
        w.start()
    for w in watchers:
        w.ready.wait(30)


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """user+system CPU seconds each process (threads included) has used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    used = {}
    for name, pid in pids.items():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        used[name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return used


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: round(after[name] - before[name], 2) for name in before}


Request = tuple[str, str, dict, str]  # method, path, body, content type


async def send_all(kube, requests: list[Request], concurrency: int) -> list[float]:  # noqa: ANN001
    """Send every request with `concurrency` in flight; returns when each one was answered."""
    done = [0.0] * len(requests)
    pending = iter(range(len(requests)))

    async def worker() -> None:
        for i in pending:  # one shared iterator: each request is taken once
            method, path, body, content_type = requests[i]
            await kube.request(method, path, body, content_type=content_type)
            done[i] = time.monotonic()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


def post_request(manifest: dict) -> Request:
    from kubetune.kube import ftj_path, path_for

    if manifest["kind"] == "FineTuneJob":
        path = ftj_path(manifest["metadata"]["namespace"])
    else:
        path = path_for(manifest)
    return "POST", path, manifest, "application/json"


async def create_all(kube, manifests: list[dict], concurrency: int) -> dict[str, float]:  # noqa: ANN001
    """POST every manifest with `concurrency` in flight; returns name -> time created."""
    done = await send_all(kube, [post_request(m) for m in manifests], concurrency)
    return {m["metadata"]["name"]: t for m, t in zip(manifests, done, strict=True)}


def event_manifest(namespace: str, name: str, uid: str) -> dict:
    from kubetune_operator.writer import event_manifest as operator_event

    ftj = {"metadata": {"name": name, "namespace": namespace, "uid": uid}}
    desired = {"phase": "Queued", "reason": "WaitingForAdmission", "message": "waiting"}
    return operator_event(ftj, desired, "bench", "2030-01-01T00:00:00Z")


QUEUED_STATUS = {
    "status": {"phase": "Queued", "reason": "WaitingForAdmission", "jobName": "x-trainer",
               "message": "waiting for admission in queue bench", "observedGeneration": 1}
}  # fmt: skip
MERGE = "application/merge-patch+json"


def write_cost_requests(n: int, namespace: str, settings) -> dict[str, list[Request]]:  # noqa: ANN001
    """n of each write the operator's burst makes, by kind, for the per-write cost."""
    from kubetune.kube import ftj_path
    from kubetune_operator import builders

    ftjs, jobs = [], []
    for i in range(n):
        ftj = ftj_manifest(f"cost-{i:04d}", queue="bench")
        ftj["metadata"]["namespace"] = namespace
        ftjs.append(ftj)
        job = builders.build_job(typed(ftj, namespace, f"0-0-0-0-{i:012d}"), settings)
        job["metadata"].pop("ownerReferences")
        jobs.append(job)
    return {
        "FineTuneJob create": [post_request(f) for f in ftjs],
        "Job create (suspended)": [post_request(j) for j in jobs],
        "FineTuneJob status patch": [
            ("PATCH", ftj_path(namespace, f["metadata"]["name"], "status"), QUEUED_STATUS, MERGE)
            for f in ftjs
        ],
        "Event create": [post_request(event_manifest(namespace, "cost", "u")) for _ in range(n)],
    }


async def floor_burst(
    kube, manifests: list[dict], settings, concurrency: int, workers: int
) -> float:  # noqa: ANN001
    """The burst's writes by a bare client: `concurrency` FineTuneJob POSTs in flight; as each
    is created, one of `workers` makes its Job and status patch and leaves its Event to at
    most `workers` posts in flight, as the operator does. Returns when the last is answered."""
    from kubetune.kube import ftj_path
    from kubetune_operator import builders

    created: asyncio.Queue = asyncio.Queue()
    event_slots = asyncio.Semaphore(workers)
    events: list[asyncio.Task] = []

    async def post_event(namespace: str, name: str, uid: str) -> None:
        async with event_slots:
            await kube.create_quietly(event_manifest(namespace, name, uid))

    async def operator_like() -> None:
        while (item := await created.get()) is not None:
            manifest, uid = item
            namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
            await kube.create(builders.build_job(typed(manifest, namespace, uid), settings))
            path = ftj_path(namespace, name, "status")
            await kube.request("PATCH", path, QUEUED_STATUS, content_type=MERGE, want_body=False)
            events.append(asyncio.create_task(post_event(namespace, name, uid)))

    async def client() -> None:
        pending = iter(manifests)

        async def poster() -> None:
            for manifest in pending:
                body = (await kube.request(*post_request(manifest)[:3])).body
                await created.put((manifest, body["metadata"]["uid"]))

        await asyncio.gather(*(poster() for _ in range(concurrency)))
        for _ in range(workers):
            await created.put(None)

    await asyncio.gather(client(), *(operator_like() for _ in range(workers)))
    await asyncio.gather(*events)
    return time.monotonic()


def measure_write_costs(
    kube_run, requests: dict[str, list[Request]], pids: dict[str, int], settle_s: float = 1.0
) -> dict[str, dict[str, float]]:
    """API server and etcd CPU per write, by kind (idle CPU subtracted).

    Each kind's CPU is counted until `settle_s` after its last answer, so the watch
    fan-out and the controllers' reactions to it (the Job controller's status write
    for a new Job) are in its cost, as they are in the burst's.
    """
    server = {k: v for k, v in pids.items() if k in ("kube-apiserver", "etcd")}
    before, t0 = cpu_seconds(server), time.monotonic()
    time.sleep(settle_s * 2)
    idle_rate = sum(cpu_delta(before, cpu_seconds(server)).values()) / (time.monotonic() - t0)
    costs = {}
    for kind, batch in requests.items():
        before, t0 = cpu_seconds(server), time.monotonic()
        kube_run(batch)
        wall = time.monotonic() - t0
        time.sleep(settle_s)  # the benchmark's own settling, not test synchronisation
        used = sum(cpu_delta(before, cpu_seconds(server)).values())
        used -= idle_rate * (time.monotonic() - t0)
        costs[kind] = {
            "cpu_ms_per_write": round(1000 * used / len(batch), 2),
            "writes_per_s": round(len(batch) / wall, 1),
        }
    return costs


def read_rss_mb(pid: int) -> float:
    status_text = Path(f"/proc/{pid}/status").read_text()
    hwm = next(line for line in status_text.splitlines() if line.startswith("VmHWM"))
    return round(int(hwm.split()[1]) / 1024, 1)


WRITE_RESOURCES = ("jobs", "finetunejobs/status", "events", "configmaps", "secrets")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--running", type=int, default=3)
    parser.add_argument("--window", type=float, default=60.0, help="seconds of running jobs")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--write-costs", type=int, default=300, help="writes per kind for the cost table (0: skip)"
    )
    parser.add_argument("--fake-trainer", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fake_trainer is not None:
        return fake_trainer(args.fake_trainer)

    from kubetune.kube import Kube
    from kubetune_devcluster.controlplane import DevCluster
    from kubetune_devcluster.operatorprocess import OperatorProcess
    from kubetune_devcluster.stack import install_crd
    from kubetune_operator import builders, names
    from kubetune_operator.settings import OperatorSettings

    state = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    cluster = DevCluster.start(state)
    rest = cluster.rest()
    results: dict[str, object] = {"n": args.n}
    try:
        install_crd(cluster)
        for ns in ("bench-bare", "bench-floor", "bench"):
            rest.post(
                "/api/v1/namespaces",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
            )
        seconds = args.window + 10
        trainer = [sys.executable, str(Path(__file__).resolve()), "--fake-trainer", str(seconds)]
        # The default patch interval (5 s), not the tests' 1 s. Only namespace `bench`: the
        # baselines' namespaces cost the operator nothing.
        op = OperatorProcess(
            cluster,
            state / "operator.log",
            trainer_command=trainer,
            extra_args=["--patch-interval", "5", "--namespace", "bench"],
        )
        op.start()
        workers = OperatorSettings().workers
        os.environ["KUBECONFIG"] = str(cluster.kubeconfig)

        async def run_creates(manifests: list[dict]) -> tuple[dict[str, float], float, float]:
            kube = await Kube.connect(pool_size=args.concurrency)
            try:
                start = time.monotonic()
                created = await create_all(kube, manifests, args.concurrency)
                return created, start, time.monotonic()
            finally:
                await kube.close()

        async def run_floor(manifests: list[dict]) -> tuple[float, float]:
            kube = await Kube.connect(pool_size=args.concurrency + 2 * workers)
            try:
                start = time.monotonic()
                end = await floor_burst(kube, manifests, settings, args.concurrency, workers)
                return start, end
            finally:
                await kube.close()

        async def run_requests(requests: list[Request]) -> None:
            kube = await Kube.connect(pool_size=args.concurrency)
            try:
                await send_all(kube, requests, args.concurrency)
            finally:
                await kube.close()

        pids = {r.name: r.pid for r in cluster.processes if r.name != "localnode"}
        pids.update(operator=op.proc.pid, bench=os.getpid())
        ns_path = "/apis/{}/namespaces/{}/{}".format

        # 1. Bare baseline: the same Jobs, created directly by a bare client.
        settings = OperatorSettings(progress_base_url=op.url)
        bare = []
        for i in range(args.n):
            ftj = ftj_manifest(f"ftj-{i:04d}", queue="bench")
            job = builders.build_job(
                typed(ftj, "bench-bare", f"00000000-0000-0000-0000-{i:012d}"), settings
            )
            job["metadata"].pop("ownerReferences")  # no owner exists in the baseline
            bare.append(job)
        # Every run is timed the same way: from the first POST until a watch has seen the
        # last object (the watch costs the benchmark process the same in each).
        bare_jobs = Watcher(rest, ns_path("batch/v1", "bench-bare", "jobs"), lambda o: True)
        start_watchers(bare_jobs)
        cpu_before = cpu_seconds(pids)
        _, bare_start, bare_end = asyncio.run(run_creates(bare))
        bare_jobs.wait_for(args.n)
        results["bare_cpu_s"] = cpu_delta(cpu_before, cpu_seconds(pids))
        bare_jobs.stop = True
        results["bare_posts_total_s"] = round(bare_end - bare_start, 2)
        results["bare_jobs_total_s"] = round(max(bare_jobs.first.values()) - bare_start, 2)

        # 2. Floor baseline: the burst's very writes, by a bare client.
        def burst_watchers(namespace: str) -> tuple[Watcher, Watcher, Watcher]:
            return (
                Watcher(rest, ns_path("batch/v1", namespace, "jobs"), lambda o: True),
                Watcher(
                    rest,
                    ns_path("kubetune.io/v1alpha1", namespace, "finetunejobs"),
                    lambda o: bool((o.get("status") or {}).get("phase")),
                ),
                Watcher(
                    rest,
                    f"/api/v1/namespaces/{namespace}/events",
                    lambda o: o["involvedObject"].get("kind") == "FineTuneJob",
                    key=lambda o: o.get("involvedObject", {}).get("name"),
                ),
            )

        floor_watchers = burst_watchers("bench-floor")
        start_watchers(*floor_watchers)
        floor = [ftj_manifest(f"ftj-{i:04d}", queue="bench") for i in range(args.n)]
        for m in floor:
            m["metadata"]["namespace"] = "bench-floor"
        cpu_before = cpu_seconds(pids)
        floor_start, floor_end = asyncio.run(run_floor(floor))
        for watcher in floor_watchers:
            watcher.wait_for(args.n)
        results["floor_cpu_s"] = cpu_delta(cpu_before, cpu_seconds(pids))
        results["floor_writes_answered_s"] = round(floor_end - floor_start, 2)
        results["floor_all_written_s"] = round(
            max(max(w.first.values()) for w in floor_watchers) - floor_start, 2
        )
        for watcher in floor_watchers:
            watcher.stop = True

        # 3. Burst of FineTuneJobs.
        jobs, statuses, events = burst_watchers("bench")
        start_watchers(jobs, statuses, events)
        burst = [ftj_manifest(f"ftj-{i:04d}", queue="bench") for i in range(args.n)]
        for m in burst:
            m["metadata"]["namespace"] = "bench"
        writes_before = {
            r: op.metric("kubetune_api_writes_total", {"resource": r}) for r in WRITE_RESOURCES
        }
        cpu_before = cpu_seconds(pids)
        created, start, posts_end = asyncio.run(run_creates(burst))
        for watcher in (jobs, statuses, events):
            watcher.wait_for(args.n)
        cpu_burst = cpu_delta(cpu_before, cpu_seconds(pids))
        writes = {
            r: op.metric("kubetune_api_writes_total", {"resource": r}) - writes_before[r]
            for r in WRITE_RESOURCES
        }

        def latencies(seen: dict[str, float], suffix: str = "") -> list[float]:
            return [seen[n + suffix] - t for n, t in created.items() if n + suffix in seen]

        job_lat = latencies(jobs.first, "-trainer")
        st_lat, ev_lat = latencies(statuses.first), latencies(events.first)
        results.update(
            ftj_posts_total_s=round(posts_end - start, 2),
            jobs_created=len(job_lat),
            statuses_seen=len(st_lat),
            events_seen=len(ev_lat),
            create_to_job_p50_s=round(percentile(job_lat, 50), 3),
            create_to_job_p99_s=round(percentile(job_lat, 99), 3),
            create_to_status_p50_s=round(percentile(st_lat, 50), 3),
            create_to_status_p99_s=round(percentile(st_lat, 99), 3),
            create_to_event_p50_s=round(percentile(ev_lat, 50), 3),
            create_to_event_p99_s=round(percentile(ev_lat, 99), 3),
            operator_total_s=round(max(jobs.first.values()) - start, 2),
            operator_all_written_s=round(
                max(max(w.first.values()) for w in (jobs, statuses, events)) - start, 2
            ),
            burst_cpu_s=cpu_burst,
            operator_writes_by_resource=writes,
            operator_writes_per_ftj=round(sum(writes.values()) / args.n, 2),
            operator_cpu_ms_per_ftj=round(1000 * cpu_burst["operator"] / args.n, 2),
        )
        results["ratio_to_floor"] = round(
            results["operator_all_written_s"] / results["floor_all_written_s"], 2
        )
        results["ratio_to_bare"] = round(
            results["operator_total_s"] / results["bare_jobs_total_s"], 2
        )
        results["ratio_all_written_to_bare"] = round(
            results["operator_all_written_s"] / results["bare_jobs_total_s"], 2
        )
        for metric in ("reconciles", "status_patches", "jobs_created", "events_posted"):
            results[f"burst_operator_{metric}"] = op.metric(f"kubetune_{metric}_total")
        for kind in ("configmaps", "secrets"):
            items = rest.get(f"/api/v1/namespaces/bench/{kind}")["items"]
            results[f"{kind}_created"] = sum(
                1
                for o in items
                if (o["metadata"].get("labels") or {}).get(names.LABEL_MANAGED_BY) == names.MANAGER
            )
        events.stop = True
        results["operator_peak_rss_after_burst_mb"] = read_rss_mb(op.proc.pid)

        # 4. Running jobs: status writes per job per minute while progress streams in.
        running = [f"run-{i}" for i in range(args.running)]
        phases: dict[str, str | None] = {}
        runs = [ftj_manifest(name, queue=None) for name in running]
        for m in runs:
            m["metadata"]["namespace"] = "bench"
        statuses.modified.clear()
        asyncio.run(run_creates(runs))
        t0 = time.monotonic()
        while running and time.monotonic() - t0 < seconds + 30:
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
        status_writes = [statuses.modified.get(n, 0) for n in running]
        results["running_phases"] = phases
        if status_writes:
            results["status_patches_per_running_job_per_min"] = round(
                statistics.mean(status_writes) / elapsed_min, 1
            )
        results["progress_events_accepted"] = op.metric(
            "kubetune_progress_events_total", {"result": "accepted"}
        )
        results["token_reviews"] = op.metric("kubetune_token_reviews_total")

        # 5. Memory.
        results["operator_peak_rss_mb"] = read_rss_mb(op.proc.pid)
        jobs.stop = statuses.stop = True
        op.stop()

        # 6. What one write of each kind costs the API server (and etcd), operator stopped.
        if args.write_costs:
            rest.post(
                "/api/v1/namespaces",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench-cost"}},
            )
            requests = write_cost_requests(args.write_costs, "bench-cost", settings)
            results["server_cost_per_write"] = measure_write_costs(
                lambda batch: asyncio.run(run_requests(batch)), requests, pids
            )
    finally:
        cluster.stop()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
