"""Operator failover time on the local control plane: two elected replicas, the leader
SIGKILLed, SIGSTOPped (it keeps its Lease until it expires) and stopped gracefully (SIGTERM:
it releases the Lease). Each time: seconds from the signal to the first Job the new leader
creates for a FineTuneJob made right after it (kill to first reconcile by the new leader).

    .venv/bin/python bench/bench_failover.py [--lease 15 --renew 10 --retry 2]

The defaults are the chart's lease timing. Suspended FineTuneJobs: nothing trains.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path


def ftj(name: str) -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "s3://bench/models/tiny/"},
            "dataset": {"uri": "s3://bench/data/train.jsonl"},
            "output": {"uri": "s3://bench/runs/"},
            "resources": {"gpus": 0, "cpu": "10m", "memory": "64Mi"},
            "suspend": True,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lease", type=int, default=15)
    parser.add_argument("--renew", type=float, default=10)
    parser.add_argument("--retry", type=float, default=2)
    args = parser.parse_args()

    from kubetune_devcluster.controlplane import DevCluster
    from kubetune_devcluster.operatorprocess import OperatorProcess
    from kubetune_devcluster.processes import wait_for
    from kubetune_devcluster.rest import ApiError
    from kubetune_devcluster.stack import install_crd

    state = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    cluster = DevCluster.start(state)
    rest = cluster.rest()
    ns = "bench"
    lease = f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/kubetune-operator"
    try:
        install_crd(cluster)
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
        rest.post("/api/v1/namespaces", namespace)
        election = [
            "--leader-election", "true", "--lease-namespace", ns, "--namespace", ns,
            "--lease-duration-s", str(args.lease), "--renew-deadline-s", str(args.renew),
            "--retry-period-s", str(args.retry),
        ]  # fmt: skip
        replicas = {
            name: OperatorProcess(cluster, state / f"operator-{name}.log", extra_args=election)
            for name in ("a", "b")
        }

        def leader() -> OperatorProcess:
            holder = rest.get(lease)["spec"].get("holderIdentity") or ""
            return next(op for op in replicas.values() if holder.endswith(f"@{op.url}"))

        def first_job_after(name: str, since: float) -> float:
            rest.post(f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs", ftj(name))

            def has_job() -> bool:
                try:
                    rest.get(f"/apis/batch/v1/namespaces/{ns}/jobs/{name}-trainer")
                except ApiError:
                    return False
                return True

            wait_for(has_job, timeout=120, interval=0.05, what=f"the Job of {name}")
            return round(time.monotonic() - since, 2)

        replicas["a"].start()
        wait_for(lambda: leader() is replicas["a"], timeout=60, what="a leads")
        replicas["b"].start()
        results: dict[str, object] = {"lease_s": args.lease, "renew_s": args.renew}
        results["retry_s"] = args.retry

        old = leader()
        killed = time.monotonic()
        old.stop(signal.SIGKILL)
        results["sigkill_s"] = first_job_after("after-kill", killed)
        old.start()

        old = leader()
        assert old.proc is not None
        os.killpg(old.proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            results["sigstop_s"] = first_job_after("after-stop", stopped)
        finally:
            os.killpg(old.proc.pid, signal.SIGCONT)
        results["stopped_leader_exit_code"] = old.proc.wait(timeout=60)
        old.start()

        old = leader()
        assert old.proc is not None
        old.proc.send_signal(signal.SIGTERM)
        termed = time.monotonic()
        results["sigterm_s"] = first_job_after("after-term", termed)
        old.proc.wait(timeout=60)
        results["terminated_leader_exit_code"] = old.proc.returncode

        jobs = rest.get(f"/apis/batch/v1/namespaces/{ns}/jobs")["items"]
        results["jobs"] = sorted(j["metadata"]["name"] for j in jobs)
        print(json.dumps(results, indent=2))
        for op in replicas.values():
            op.stop()
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
