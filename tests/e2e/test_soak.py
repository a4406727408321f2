"""The soak, small: KUBETUNE_SOAK_JOBS (default 6) FineTuneJobs submitted at once on the
dev cluster, at most 4 running at a time. All Succeed, every artifact matches its
manifest.json, each has exactly one Job, and the operator's RSS stays flat. hack/soak.py
runs the same driver with 50 jobs (figures in docs/reliability.md).

    KUBETUNE_REQUIRE_CLUSTER=1 uv run pytest -q -s tests/e2e/test_soak.py
"""

from __future__ import annotations

import os

import pytest

from kubetune_devcluster.controlplane import DevCluster
from tests.fixtures.operator import OperatorProcess
from tests.fixtures.s3 import S3Server
from tests.fixtures.soak import SoakPlan, run_soak

JOBS = int(os.environ.get("KUBETUNE_SOAK_JOBS", "6"))
CONCURRENCY = 4

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    # Trainers run CONCURRENCY at a time; a tiny job takes well under a minute of wall time.
    pytest.mark.timeout(max(600, 60 * JOBS)),
]


def test_many_small_jobs_at_once_all_succeed_verified_with_flat_operator_memory(
    k8s_cluster: DevCluster,
    operator: OperatorProcess,  # noqa: F811
    ns: str,  # noqa: F811
    assets: str,  # noqa: F811
    s3_server: S3Server,
) -> None:
    plan = SoakPlan(jobs=JOBS, concurrency=CONCURRENCY, timeout_s=max(540, 55 * JOBS))
    report = run_soak(k8s_cluster, operator, s3_server, ns, assets, plan)
    print("\n" + report.summary())

    assert report.failures() == []
    assert report.phases == {"Succeeded": JOBS}
    # Every published run was read back: at least the adapter, its config and the metrics.
    assert report.files_verified >= 3 * JOBS
    # Jobs did run side by side, and no more at once than the CPU requests allow.
    assert 1 < report.peak_pods_running <= CONCURRENCY
    assert report.peak_running > 1
    assert report.rss_start > 0 and report.rss_growth_mib <= plan.rss_bound_mib
