"""Node faults on the real node (kubelet + containerd), with the operator from its image:

- the node stops answering while a job trains (its kubelet and the trainer frozen): the
  node goes NotReady, then unreachable; the taint manager evicts the trainer pod after the
  operator's lost-node toleration; when the node is back the Job replaces the pod, outside
  backoffLimit, and training resumes from the last complete checkpoint in S3;
- the work dir outgrows spec.resources.workDirSize: the kubelet evicts the pod, the job
  fails with WorkDirFull naming the volume and the limit, and every checkpoint marked
  complete in S3 is whole.

The measured times are printed (run with -s) and recorded in docs/reliability.md.

    KUBETUNE_REQUIRE_CLUSTER=1 .venv/bin/pytest -q -s tests/e2e/test_faults_real_node.py

Needs what tests/e2e/test_real_node.py needs (root, the node's binaries, the images). The
node is always given back running, whatever the test ends with.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict

import pytest

from kubetune_devcluster.nodefaults import node_down, standby_node
from kubetune_devcluster.processes import wait_for
from tests.fixtures.ftj import (
    create,
    events_for,
    jobs_of,
    pods_of,
    s3_keys,
    status_of,
    wait_phase,
    wait_reason,
)
from tests.fixtures.real_node import (
    RUN_TIMEOUT,
    RealStack,
    manifest,
    running_trainer_pod,
    step_of,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# About 0.6 s a step on the real node: enough steps to stop the node after the first
# checkpoint and before the end.
STEPS = 24
CHECKPOINT_EVERY = 2  # the manifest's checkpointEverySteps
# The controller manager's --node-monitor-grace-period (Kubernetes's default, 50 s) and the
# chart's trainer.nodeLostTolerationSeconds (60 s): the pod is evicted this long after the
# kubelet's last report, give or take a status interval.
NODE_MONITOR_GRACE_S = 50
NODE_LOST_TOLERATION_S = 60
LOST_NODE_TAINTS = {"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"}
_CHECKPOINT_KEY = re.compile(r"checkpoints/checkpoint-(\d+)/(.+)$")


def checkpoints(real_stack: RealStack, bucket: str, ns: str, name: str) -> dict[int, set[str]]:
    """Checkpoint step -> the file names S3 holds for it."""
    found: dict[int, set[str]] = defaultdict(set)
    for key in s3_keys(real_stack.s3, f"s3://{bucket}/runs/{ns}/{name}/checkpoints/"):
        if match := _CHECKPOINT_KEY.search(key):
            found[int(match[1])].add(match[2])
    return dict(found)


def complete_steps(real_stack: RealStack, bucket: str, ns: str, name: str) -> list[int]:
    found = checkpoints(real_stack, bucket, ns, name)
    return sorted(step for step, files in found.items() if "_COMPLETE" in files)


def node_ready(real_stack: RealStack) -> str:
    node = real_stack.cluster.rest().get(f"/api/v1/nodes/{real_stack.cluster.node.name}")
    conds = node["status"].get("conditions") or []
    return next((c["status"] for c in conds if c["type"] == "Ready"), "Unknown")


def node_taints(real_stack: RealStack, name: str) -> set[str]:
    node = real_stack.cluster.rest().get(f"/api/v1/nodes/{name}")
    return {t["key"] for t in node["spec"].get("taints") or []}


def disruption(pod: dict) -> dict | None:
    for cond in pod["status"].get("conditions") or []:
        if cond["type"] == "DisruptionTarget" and cond["status"] == "True":
            return cond
    return None


def test_node_lost_mid_run_resumes_from_its_checkpoint_outside_backoff_limit(
    real_stack: RealStack, real_ns: str, real_assets: str
) -> None:
    cluster, name = real_stack.cluster, "nodelost"
    node = cluster.node.name
    # backoffLimit 0: a disruption counted as a failure would fail the job.
    create(cluster, real_ns, manifest(name, real_assets, steps=STEPS, backoffLimit=0))
    # Kubernetes evicts nothing when every node is down: a second, heartbeat-only node
    # makes this one node of two.
    with standby_node(cluster) as standby:
        standby_name = standby["metadata"]["name"]
        wait_for(
            lambda: not node_taints(real_stack, standby_name) & LOST_NODE_TAINTS,
            timeout=60,
            interval=0.5,
            what="the standby node Ready",
        )
        pod_name = running_trainer_pod(real_stack, real_ns)
        pod = cluster.rest().get(f"/api/v1/namespaces/{real_ns}/pods/{pod_name}")
        tolerated = {
            t["key"]: t.get("tolerationSeconds")
            for t in pod["spec"]["tolerations"]
            if t.get("effect") == "NoExecute"
        }
        assert {k: tolerated.get(k) for k in LOST_NODE_TAINTS} == dict.fromkeys(
            LOST_NODE_TAINTS, NODE_LOST_TOLERATION_S
        ), pod["spec"]["tolerations"]
        wait_for(
            lambda: complete_steps(real_stack, real_assets, real_ns, name),
            timeout=RUN_TIMEOUT,
            interval=0.3,
            what="a complete checkpoint in S3",
        )
        times: dict[str, float] = {}
        start = time.monotonic()
        with node_down(cluster, real_ns, pod_name):
            # Frozen: nothing more is saved until the pod is gone.
            saved = complete_steps(real_stack, real_assets, real_ns, name)[-1]
            step_at_stop = step_of(real_stack, real_ns, name)
            assert step_at_stop < STEPS, "the job finished before the node was stopped"
            wait_for(
                lambda: node_ready(real_stack) != "True",
                timeout=NODE_MONITOR_GRACE_S + 30,
                what=f"node {node} NotReady",
            )
            times["node not ready"] = time.monotonic() - start

            def evicted() -> dict | None:
                pod = cluster.rest().get(f"/api/v1/namespaces/{real_ns}/pods/{pod_name}")
                return disruption(pod)

            cond = wait_for(
                evicted,
                timeout=NODE_MONITOR_GRACE_S + NODE_LOST_TOLERATION_S + 60,
                interval=0.5,
                what="the trainer pod evicted from the lost node",
            )
            times["pod evicted"] = time.monotonic() - start
            assert cond["reason"] == "DeletionByTaintManager", cond
            lost = wait_reason(cluster, real_ns, name, "NodeLost", timeout=30)
            assert lost["phase"] == "Running", lost
            assert f"node {node} stopped answering" in lost["message"], lost
            assert pod_name in lost["message"], lost
        back = time.monotonic()

        def replacement_running() -> str | None:
            for p in pods_of(cluster, real_ns):
                if p["metadata"]["name"] != pod_name and p["status"].get("phase") == "Running":
                    return p["metadata"]["name"]
            return None

        wait_for(replacement_running, timeout=RUN_TIMEOUT, interval=0.5, what="a new trainer pod")
        times["replacement running"] = time.monotonic() - start

        def resumed_and_training() -> dict | None:
            st = status_of(cluster, real_ns, name)
            resumed = st.get("resumedFromStep")
            step = (st.get("progress") or {}).get("step") or 0
            return st if resumed and step > resumed else None

        resumed = wait_for(
            resumed_and_training, timeout=RUN_TIMEOUT, interval=0.3, what="training resumed"
        )
        times["training again"] = time.monotonic() - start
        times["node back -> training again"] = time.monotonic() - back

    st = wait_phase(cluster, real_ns, name, "Succeeded", "Failed", timeout=RUN_TIMEOUT)
    assert st["phase"] == "Succeeded", st
    # Resumed from the newest checkpoint complete when the node stopped (or one the trainer
    # finished uploading in the moment between the node's return and its SIGTERM).
    assert resumed["resumedFromStep"] >= saved, (resumed, saved)
    # The evicted trainer may save more between the node's return and its SIGTERM.
    lost_steps = max(0, step_at_stop - resumed["resumedFromStep"])
    assert st["restarts"] == 0, st  # the disruption is not a trainer failure
    (job,) = jobs_of(cluster, real_ns)
    assert not job["status"].get("failed"), job["status"]
    reasons = [e["reason"] for e in events_for(cluster, real_ns, name)]
    assert "NodeLost" in reasons, reasons
    print(
        f"\nnode lost: checkpoint {saved} complete and step {step_at_stop} in the status (it "
        f"lags) when the node stopped, "
        f"resumed from step {resumed['resumedFromStep']} ({lost_steps} steps lost; bound "
        f"{CHECKPOINT_EVERY} and an upload in flight); "
        + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    )
    # The bound: the controller's grace period plus the toleration, plus status intervals.
    assert times["pod evicted"] < NODE_MONITOR_GRACE_S + NODE_LOST_TOLERATION_S + 30, times


def test_work_dir_too_small_for_a_checkpoint_fails_with_work_dir_full(
    real_stack: RealStack, real_ns: str, real_assets: str
) -> None:
    cluster, name = real_stack.cluster, "wdfull"
    # Full fine-tuning of the tiny model: about 0.7 MB of work dir before the first
    # checkpoint (model, data, caches), 2.5 MB after it (weights, optimizer state). The
    # kubelet measures emptyDir usage once a minute: the run must outlast that, with room to
    # spare on a quiet machine (400 steps once finished in under a minute).
    body = manifest(name, real_assets, steps=3000, backoffLimit=0, method="full")
    del body["spec"]["lora"]
    body["spec"]["evaluation"] = {"enabled": False}
    body["spec"]["resources"]["workDirSize"] = "1536Ki"
    create(cluster, real_ns, body)
    start = time.monotonic()
    st = wait_phase(cluster, real_ns, name, "Failed", "Succeeded", timeout=RUN_TIMEOUT)
    elapsed = time.monotonic() - start
    assert st["phase"] == "Failed" and st["reason"] == "WorkDirFull", st
    assert "spec.resources.workDirSize (1536Ki)" in st["message"], st
    assert "emptyDir volume 'work'" in st["message"], st
    # The attempt says why it ended (its pod may be gone: when the trainer saved its step on
    # the eviction's SIGTERM, the operator ends the job by deleting its Job, pods included).
    assert st["attempts"][0]["reason"] == "WorkDirFull", st["attempts"]
    assert len(st["attempts"]) <= 2, st["attempts"]  # no retry loop: at most the one started
    for pod in pods_of(cluster, real_ns):
        if pod["status"].get("reason") == "Evicted":
            assert 'EmptyDir volume "work" exceeds the limit' in pod["status"]["message"]
    # Every checkpoint marked complete is whole: the trainer's files and a trainer state
    # of that very step. An upload cut short by the eviction has no marker.
    found = checkpoints(real_stack, real_assets, real_ns, name)
    complete = {step: files for step, files in found.items() if "_COMPLETE" in files}
    whole = {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"}
    client = real_stack.s3.client()
    for step, files in complete.items():
        assert whole <= files, (step, sorted(files))
        key = f"runs/{real_ns}/{name}/checkpoints/checkpoint-{step}/trainer_state.json"
        state = json.loads(client.get_object(Bucket=real_assets, Key=key)["Body"].read())
        assert state["global_step"] == step, (step, state["global_step"])
    incomplete = sorted(set(found) - set(complete))
    print(
        f"\nwork dir full: failed after {elapsed:.0f} s at step "
        f"{(st.get('progress') or {}).get('step')}; complete checkpoints {sorted(complete)}, "
        f"incomplete (no marker) {incomplete}"
    )
