"""Fault: kube-apiserver, then etcd, SIGKILLed and started again while a trainer runs.

The trainer is a host process on the local node; the operator loses its watches and cannot
check progress pushes until the API server is back. The trainer is paused (SIGSTOP) for each
fault, so a fast machine cannot finish the run inside the outage and leave nothing to observe
afterwards. Asserted: the status' step moves again within PROGRESS_RESUME_BOUND_S of the
component being healthy, the step shown never goes backwards, the trainer trains each step
exactly once (one Job, one pod), and the job Succeeds.

    KUBETUNE_REQUIRE_CLUSTER=1 .venv/bin/pytest -q -s tests/e2e/test_faults_control_plane.py
"""

from __future__ import annotations

import contextlib
import json

import pytest

from kubetune_devcluster.controlplane import DevCluster
from kubetune_devcluster.faults import restart_component
from kubetune_devcluster.nodefaults import pod_paused
from kubetune_devcluster.processes import wait_for
from tests.fixtures.ftj import (
    StepWatch,
    add_credentials_secret,
    create,
    ftj_manifest,
    jobs_of,
    pods_of,
    wait_phase,
)
from tests.fixtures.operator import OperatorProcess
from tests.fixtures.s3 import S3Server
from tests.fixtures.tiny_model import upload_tiny_assets

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1200)]

STEPS = 200
# From the component healthy again to the next step shown in the status. What it is made
# of: the operator's watch reconnect back-off (1, 2, 5, 10 s), the trainer's next push, and
# one status patch interval (1 s in these tests); on a loaded CI machine, slack on top.
PROGRESS_RESUME_BOUND_S = 30.0


def trainer_steps(cluster: DevCluster, ns: str, pod: str) -> list[int]:
    steps = []
    for line in cluster.read_pod_logs(ns, pod, "trainer").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "step":
                steps.append(event["step"])
    return steps


def test_api_server_and_etcd_restarts_mid_run_cost_no_progress_and_no_work(
    k8s_cluster: DevCluster,
    operator: OperatorProcess,
    k8s_namespace: str,
    s3_server: S3Server,
) -> None:
    ns = k8s_namespace
    add_credentials_secret(k8s_cluster, ns, dict(s3_server.env))
    bucket = upload_tiny_assets(s3_server.client(), f"cp-{ns}", rows=96)
    manifest = ftj_manifest("steady", bucket, steps=STEPS)
    manifest["spec"]["evaluation"] = {"enabled": False}
    create(k8s_cluster, ns, manifest)

    resumed_after = {}
    with StepWatch(k8s_cluster, ns, "steady") as watch:
        wait_for(lambda: watch.latest() > 0, timeout=300, interval=0.2, what="the first step")
        (trainer,) = pods_of(k8s_cluster, ns)
        for component in ("kube-apiserver", "etcd"):
            # Paused as soon as progress was seen: the run must outlast both faults.
            with pod_paused(k8s_cluster, ns, trainer["metadata"]["name"]):
                before = watch.latest()
                assert before < STEPS, f"finished before the {component} fault: nothing tested"
                restart = restart_component(k8s_cluster, component)
            seen = wait_for(
                lambda r=restart, b=before: watch.first_after(r.healthy_at, b),
                timeout=PROGRESS_RESUME_BOUND_S + 60,
                interval=0.2,
                what=f"progress after the {component} restart",
            )
            resumed_after[component] = (
                round(restart.outage_seconds, 1),
                round(seen - restart.healthy_at, 1),
            )
        print(f"(outage s, healthy to next step s) by component: {resumed_after}")
        st = wait_phase(k8s_cluster, ns, "steady", "Succeeded", "Failed", timeout=600)
    assert st["phase"] == "Succeeded", st
    for component, (_, delay) in resumed_after.items():
        assert delay <= PROGRESS_RESUME_BOUND_S, (component, delay)

    steps = [s for _, s in watch.samples]
    assert steps == sorted(steps), "the status' step went backwards"
    # One Job, one pod, each step trained once: nothing was redone.
    assert len(jobs_of(k8s_cluster, ns)) == 1
    (pod,) = pods_of(k8s_cluster, ns)
    assert trainer_steps(k8s_cluster, ns, pod["metadata"]["name"]) == list(range(1, STEPS + 1))
    assert st["restarts"] == 0 and [a["result"] for a in st["attempts"]] == ["Succeeded"]
