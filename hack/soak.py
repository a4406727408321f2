"""The soak, by hand: N small FineTuneJobs at once on a fresh dev cluster, all verified.

    uv run python hack/soak.py --jobs 50 [--concurrency 4] [--steps 2] [--json out.json]

Starts a control plane with the process node (pods as host processes, offering --cpu and
--memory to the scheduler), moto's S3 server and the operator as a host process; submits
the jobs at once, waits for all and prints the report of tests/fixtures/soak.py: wall
time, peak Running at once, every job Succeeded, every artifact checked against its
manifest.json, the operator's RSS (start, warm, peak, end). Exits 1 if any check failed.
tests/e2e/test_soak.py runs the same driver with a few jobs in CI.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from kubetune_devcluster.controlplane import DevCluster, NodeConfig
from kubetune_devcluster.processes import wait_for
from tests.fixtures.cluster import running_cluster
from tests.fixtures.ftj import add_credentials_secret
from tests.fixtures.operator import OperatorProcess, install_crd
from tests.fixtures.s3 import S3Server, running_s3
from tests.fixtures.soak import SoakPlan, run_soak
from tests.fixtures.tiny_model import upload_tiny_assets

TRAINER = [sys.executable, "-m", "kubetune_trainer"]
NAMESPACE = "soak"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=4, help="trainers at once (max)")
    parser.add_argument("--steps", type=int, default=2, help="maxSteps of each job")
    parser.add_argument("--cpu", default="8", help="CPU the process node offers")
    parser.add_argument("--memory", default="32Gi", help="memory the process node offers")
    parser.add_argument("--rss-bound-mib", type=float, default=SoakPlan.rss_bound_mib)
    parser.add_argument("--timeout", type=float, default=3600, help="for all jobs, seconds")
    parser.add_argument("--json", type=Path, help="write the full report (with samples)")
    parser.add_argument("--log-dir", type=Path, help="keep the operator log here")
    return parser.parse_args(argv)


def soak_namespace(cluster: DevCluster, s3: S3Server) -> str:
    """The namespace, once its default ServiceAccount exists, with the `s3-creds` Secret
    the FineTuneJobs name."""
    api = cluster.rest()
    api.post(
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
    )
    wait_for(
        lambda: api.get(f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default"),
        timeout=30,
        what="default ServiceAccount",
    )
    add_credentials_secret(cluster, NAMESPACE, dict(s3.env))
    return NAMESPACE


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's log of every request
    plan = SoakPlan(
        jobs=args.jobs,
        concurrency=args.concurrency,
        steps=args.steps,
        timeout_s=args.timeout,
        rss_bound_mib=args.rss_bound_mib,
    )
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="kubetune-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    node = NodeConfig(cpu=args.cpu, memory=args.memory)
    with running_s3() as s3, running_cluster("kubetune-soak-", node) as cluster:
        install_crd(cluster)
        bucket = upload_tiny_assets(s3.client(), "kubetune-soak", rows=64)
        ns = soak_namespace(cluster, s3)
        operator = OperatorProcess(cluster, log_dir, trainer_command=TRAINER)
        operator.start()
        try:
            report = run_soak(cluster, operator, s3, ns, bucket, plan)
        finally:
            operator.stop()
    print(report.summary())
    print(f"operator log: {log_dir / 'operator.log'}")
    if args.json:
        args.json.write_text(report.to_json())
        print(f"report: {args.json}")
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
