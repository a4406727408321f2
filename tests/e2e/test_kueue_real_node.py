"""Kueue preemption on the real node: the Kueue controller manager (built by `bash
hack/kueue.sh`, webhooks included) queueing the trainer Jobs of the operator the chart
installed, trainer pods from the trainer image under the real kubelet. A higher-priority
FineTuneJob evicts a running one; the kubelet's SIGTERM makes the trainer save the step under
way (exit 5, attempt `Preempted`, no restart counted), and after Kueue admits it again it
resumes from exactly that step, with the losses of a run that was never preempted.

    KUBETUNE_REQUIRE_CLUSTER=1 .venv/bin/pytest -q -s tests/e2e/test_kueue_real_node.py
"""

from __future__ import annotations

import contextlib
import copy
import uuid
from collections.abc import Iterator

import pytest

from kubetune_devcluster.kueue import KUEUE_API, Kueue, create_objects, gpu_queue_objects
from kubetune_devcluster.nodefaults import pod_paused
from kubetune_devcluster.processes import wait_for
from kubetune_devcluster.rest import ApiError
from tests.fixtures.ftj import (
    create,
    jobs_of,
    loss_history,
    pods_of,
    s3_keys,
    status_of,
    wait_phase,
)
from tests.fixtures.kueue import condition, kueue_or_skip, set_preemption, wait_condition
from tests.fixtures.real_node import RUN_TIMEOUT, RealStack, manifest, step_of

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# Room for one trainer pod (500m) in the queue: the second waits, or preempts.
QUOTA_CPU = "500m"


@pytest.fixture
def kueue_queue(real_stack: RealStack, real_ns: str) -> Iterator[dict[str, str]]:
    """Kueue on the real stack's cluster, a ClusterQueue with room for one trainer pod that
    preempts lower priorities, a LocalQueue in the test's namespace, and two PriorityClasses.
    All removed afterwards (Kueue's webhooks first: no other test's Job goes through them)."""
    kueue_or_skip()
    cluster = real_stack.cluster
    api = cluster.rest()
    suffix = uuid.uuid4().hex[:6]
    names = {
        "cluster_queue": f"rn-{suffix}",
        "local_queue": "team",
        "flavor": f"rn-flavor-{suffix}",
        "low": f"rn-low-{suffix}",
        "high": f"rn-high-{suffix}",
    }
    kueue = Kueue.start(cluster)
    try:
        for key, value in (("low", 10), ("high", 1000)):
            api.post(
                "/apis/scheduling.k8s.io/v1/priorityclasses",
                {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                 "metadata": {"name": names[key]}, "value": value},
            )  # fmt: skip
        create_objects(
            api,
            gpu_queue_objects(
                flavor=names["flavor"],
                cluster_queue=names["cluster_queue"],
                local_queue=names["local_queue"],
                namespace=real_ns,
                gpus=0,
                cpu=QUOTA_CPU,
                memory="4Gi",
            ),
        )
        set_preemption(api, names["cluster_queue"], {"withinClusterQueue": "LowerPriority"})
        yield names
    finally:
        cluster.kubectl("delete", "finetunejobs", "--all", "-n", real_ns, "--wait=true")
        kueue.stop()
        for path in (
            f"{KUEUE_API}/clusterqueues/{names['cluster_queue']}",
            f"{KUEUE_API}/resourceflavors/{names['flavor']}",
            f"/apis/scheduling.k8s.io/v1/priorityclasses/{names['low']}",
            f"/apis/scheduling.k8s.io/v1/priorityclasses/{names['high']}",
        ):
            with contextlib.suppress(ApiError):
                api.delete(path)


def queued_manifest(name: str, assets: str, queue: str, priority: str, steps: int) -> dict:
    body = manifest(name, assets, steps=steps)
    body["spec"].update(queueName=queue, priorityClassName=priority)
    body["spec"]["training"]["checkpointEverySteps"] = 1000  # the stop's is the only one
    # Without dropout a resume replays the same computation: the losses must match a run
    # that was never stopped.
    body["spec"]["lora"] = {"r": 4, "dropout": 0.0}
    body["spec"]["evaluation"] = {"enabled": False}
    return body


def test_higher_priority_job_preempts_and_the_preempted_one_resumes_from_its_step(
    real_stack: RealStack, real_ns: str, real_assets: str, kueue_queue: dict[str, str]
) -> None:
    # The status lags the trainer by up to a patch interval, tens of these fast steps: the
    # run must be long enough to still be training when it is paused.
    cluster, steps = real_stack.cluster, 200
    queue = kueue_queue["local_queue"]
    low = queued_manifest("low", real_assets, queue, kueue_queue["low"], steps)
    create(cluster, real_ns, low)
    wait_for(
        lambda: step_of(real_stack, real_ns, "low") >= 2,
        timeout=RUN_TIMEOUT,
        interval=0.3,
        what="low training",
    )
    (pod,) = [p for p in pods_of(cluster, real_ns) if p["status"].get("phase") == "Running"]
    high = queued_manifest("high", real_assets, queue, kueue_queue["high"], steps=4)
    # Paused until Kueue has suspended low's Job, so a fast machine cannot finish it first;
    # the kubelet's SIGTERM then waits for it to carry on.
    with pod_paused(cluster, real_ns, pod["metadata"]["name"]):
        step_before = step_of(real_stack, real_ns, "low")
        create(cluster, real_ns, high)
        evicted = wait_condition(cluster, real_ns, "low", "Evicted")
        wait_for(
            lambda: (
                cluster.rest().get(f"/apis/batch/v1/namespaces/{real_ns}/jobs/low-trainer")["spec"][
                    "suspend"
                ]
                is True
            ),
            timeout=60,
            what="Kueue suspending low's Job",
        )
    assert condition(evicted, "Evicted")["reason"] == "Preempted", evicted

    def preempted() -> dict | None:
        st = status_of(cluster, real_ns, "low")
        attempts = st.get("attempts") or []
        return st if attempts and attempts[0].get("reason") == "Preempted" else None

    first = wait_for(preempted, timeout=180, interval=0.3, what="low's attempt Preempted")
    assert (first["attempts"][0]["result"], first["attempts"][0]["exitCode"]) == ("Stopped", 5)
    high_st = wait_phase(cluster, real_ns, "high", "Succeeded", "Failed", timeout=RUN_TIMEOUT)
    assert high_st["phase"] == "Succeeded", high_st
    st = wait_phase(cluster, real_ns, "low", "Succeeded", "Failed", timeout=RUN_TIMEOUT)
    assert st["phase"] == "Succeeded", st
    saved = st["attempts"][1]["resumedFromStep"]
    assert step_before <= saved < steps and saved == st["resumedFromStep"], st["attempts"]
    assert st["restarts"] == 0 and st["progress"]["step"] == steps
    low_job = next(j for j in jobs_of(cluster, real_ns) if j["metadata"]["name"] == "low-trainer")
    assert not low_job["status"].get("failed"), low_job["status"]  # exit 5: the Ignore rule
    # The only checkpoints: the one saved on the SIGTERM, and the run's last step.
    bucket = low["spec"]["output"]["uri"].removeprefix("s3://").split("/")[0]
    keys = s3_keys(real_stack.s3, f"s3://{bucket}/runs/{real_ns}/low/checkpoints/")
    complete = {k.split("/")[-2] for k in keys if k.endswith("/_COMPLETE")}
    assert f"checkpoint-{saved}" in complete <= {f"checkpoint-{saved}", f"checkpoint-{steps}"}

    # The same losses as a run of the same spec never preempted (alone in the queue now).
    steady = copy.deepcopy(low)
    steady["metadata"]["name"] = "steady"
    create(cluster, real_ns, steady)
    reference = wait_phase(cluster, real_ns, "steady", "Succeeded", "Failed", timeout=RUN_TIMEOUT)
    assert reference["phase"] == "Succeeded" and reference["restarts"] == 0, reference
    preempted_losses = loss_history(real_stack.s3, st)
    uninterrupted = loss_history(real_stack.s3, reference)
    assert sorted(preempted_losses) == sorted(uninterrupted) == list(range(1, steps + 1))
    for step, loss in uninterrupted.items():
        assert preempted_losses[step] == pytest.approx(loss, rel=1e-4), step
    print(
        f"\npreempted by Kueue on the real node at step {step_before} (status), saved "
        f"{saved}, resumed there; all {steps} losses match an uninterrupted run's"
    )
