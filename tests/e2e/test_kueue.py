"""Kueue, for real: the Kueue controller manager (built by `bash hack/kueue.sh`) with its
webhooks, on a dev cluster of its own, queueing the operator's trainer Jobs against a
GPU quota. The operator is a subprocess, the trainer the real one on a tiny model, S3 the
moto server. Polls conditions; never sleeps to sync.

    KUBETUNE_REQUIRE_CLUSTER=1 .venv/bin/pytest -q -m cluster tests/e2e/test_kueue.py

The node offers more GPUs (2) than the ClusterQueue's quota (1), so what holds the second
job back is Kueue, not the scheduler.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.v1alpha1 import ResourcesSpec
from kubetune_devcluster.controlplane import DevCluster, NodeConfig
from kubetune_devcluster.kueue import (
    KUEUE_API,
    KUEUE_VERSION,
    Kueue,
    create_objects,
    gpu_queue_objects,
)
from kubetune_devcluster.processes import wait_for
from kubetune_devcluster.rest import ApiError, KubeRest
from tests.fixtures import kueue as kueue_fixtures
from tests.fixtures.kueue import condition, kueue_or_skip
from tests.fixtures.operator import LOCAL_TRAINER, OperatorProcess, install_crd
from tests.fixtures.s3 import S3Server
from tests.fixtures.tiny_model import upload_tiny_assets

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

FTJ_API = "/apis/kubetune.io/v1alpha1"
NAMESPACE = "team-a"
LOCAL_QUEUE = "gpu-small"
GPU_LABEL = "nvidia.com/gpu.product"
GPU_PRODUCT = "dev-gpu"


@dataclass
class QueuedCluster:
    cluster: DevCluster
    kueue: Kueue
    operator: OperatorProcess
    bucket: str


@pytest.fixture(scope="module")
def queued(
    s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[QueuedCluster]:
    """A cluster with Kueue, the operator, one GPU of quota in team-a's LocalQueue, and a
    bucket with the tiny model and the demo dataset."""
    kueue_or_skip()
    state_dir = Path(tempfile.mkdtemp(prefix="kubetune-kueue-"))
    node = NodeConfig(gpus=2, labels={GPU_LABEL: GPU_PRODUCT})
    cluster = DevCluster.start(state_dir, node=node)
    kueue = operator = None
    try:
        kueue = Kueue.start(cluster)
        api = cluster.rest()
        api.post(
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        )
        wait_for(
            lambda: api.get(f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default"),
            timeout=30,
            what="the default ServiceAccount",
        )
        api.post(
            f"/api/v1/namespaces/{NAMESPACE}/secrets",
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "s3-creds"},
                "stringData": dict(s3_server.env),
            },
        )
        create_objects(
            api,
            gpu_queue_objects(
                namespace=NAMESPACE,
                local_queue=LOCAL_QUEUE,
                gpus=1,
                cpu="4",
                memory="16Gi",
                node_labels={GPU_LABEL: GPU_PRODUCT},
            ),
        )
        install_crd(cluster)
        operator = OperatorProcess(
            cluster, tmp_path_factory.mktemp("operator"), trainer_command=LOCAL_TRAINER
        )
        operator.start()
        yield QueuedCluster(cluster, kueue, operator, upload_assets(s3_server))
    finally:
        if operator is not None:
            operator.stop()
        if kueue is not None:
            kueue.stop()
        cluster.stop()
        if os.environ.get("KUBETUNE_KEEP_CLUSTER_STATE"):
            print(f"cluster state kept in {state_dir}")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)


def upload_assets(s3_server: S3Server) -> str:
    return upload_tiny_assets(s3_server.client(), "kubetune-kueue", rows=48)


def ftj_manifest(name: str, bucket: str, *, steps: int = 6) -> dict:
    """A small LoRA job on one GPU, queued in team-a's LocalQueue."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "queueName": LOCAL_QUEUE,
            "model": {"uri": f"s3://{bucket}/models/tiny/"},
            "method": "lora",
            "lora": {"r": 4},
            "dataset": {"uri": f"s3://{bucket}/data/train.jsonl"},
            "training": {
                "maxSteps": steps,
                "batchSize": 4,
                "gradientAccumulationSteps": 1,
                "maxSeqLength": 64,
                "gradientCheckpointing": False,
                "logEverySteps": 1,
            },
            "evaluation": {"enabled": False},
            "output": {"uri": f"s3://{bucket}/runs/", "credentialsSecretRef": {"name": "s3-creds"}},
            "resources": {"gpus": 1, "cpu": "500m", "memory": "2Gi", "shmSize": "64Mi"},
            "backoffLimit": 1,
        },
    }


# ---- reading the cluster ----------------------------------------------------------------


def status_of(cluster: DevCluster, name: str) -> dict:
    ftj = cluster.rest().get(f"{FTJ_API}/namespaces/{NAMESPACE}/finetunejobs/{name}")
    return ftj.get("status") or {}


def wait_phase(cluster: DevCluster, name: str, *phases: str, timeout: float = 300) -> dict:
    def reached() -> dict | None:
        st = status_of(cluster, name)
        return st if st.get("phase") in phases else None

    try:
        return wait_for(reached, timeout=timeout, interval=0.5, what=f"{name} in {phases}")
    except TimeoutError:
        raise AssertionError(f"{name} not in {phases}: {status_of(cluster, name)}") from None


def job_of(cluster: DevCluster, name: str) -> dict:
    return cluster.rest().get(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{name}-trainer")


def workload_of(cluster: DevCluster, name: str) -> dict | None:
    return kueue_fixtures.workload_of(cluster, NAMESPACE, name)


def wait_condition(cluster: DevCluster, name: str, kind: str) -> dict:
    return kueue_fixtures.wait_condition(cluster, NAMESPACE, name, kind)


def pods_of(cluster: DevCluster, name: str) -> list[dict]:
    pods = cluster.rest().get(
        f"/api/v1/namespaces/{NAMESPACE}/pods",
        labelSelector=f"kubetune.io/finetunejob={name}",
    )
    return pods["items"]


# ---- tests ------------------------------------------------------------------------------


def test_admission_goes_through_kueues_webhooks(queued: QueuedCluster) -> None:
    api = queued.cluster.rest()
    configs = api.get("/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations")
    urls = [
        w["clientConfig"]["url"]
        for c in configs["items"]
        if c["metadata"]["name"].startswith("kueue-")
        for w in c["webhooks"]
    ]
    assert urls and all(u.startswith(queued.kueue.webhook_url) for u in urls)
    # Defaulting: Kueue's mutating webhook put its finalizer on the ClusterQueue.
    cluster_queue = api.get(f"{KUEUE_API}/clusterqueues/gpu")
    assert "kueue.x-k8s.io/resource-in-use" in cluster_queue["metadata"]["finalizers"]
    # Validation that only the webhook does (the CRD schema lets this selector through).
    broken = copy.deepcopy(cluster_queue)
    broken["metadata"] = {"name": "broken"}
    broken["spec"]["namespaceSelector"] = {"matchExpressions": [{"key": "team", "operator": "In"}]}
    broken.pop("status", None)
    with pytest.raises(ApiError) as refused:
        api.request("POST", f"{KUEUE_API}/clusterqueues", broken, query={"dryRun": "All"})
    assert 'admission webhook "vclusterqueue.kb.io" denied the request' in str(refused.value)
    assert "spec.namespaceSelector" in str(refused.value)


def test_one_gpu_of_quota_runs_one_job_and_queues_the_other_until_it_finishes(
    queued: QueuedCluster,
) -> None:
    cluster, bucket = queued.cluster, queued.bucket
    api = cluster.rest()
    api.post(f"{FTJ_API}/namespaces/{NAMESPACE}/finetunejobs", ftj_manifest("first", bucket))
    first_admitted = wait_condition(cluster, "first", "Admitted")
    # The second asks while the first holds the only GPU of quota (still starting up).
    api.post(f"{FTJ_API}/namespaces/{NAMESPACE}/finetunejobs", ftj_manifest("second", bucket))
    st = wait_phase(cluster, "second", "Queued", timeout=60)
    assert st["reason"] == "WaitingForAdmission" and LOCAL_QUEUE in st["message"], st

    def held_back_for_gpu() -> dict | None:
        reserved = condition(workload_of(cluster, "second"), "QuotaReserved")
        return reserved if "nvidia.com/gpu" in reserved.get("message", "") else None

    reserved = wait_for(held_back_for_gpu, timeout=60, what="second held back by the GPU quota")
    assert reserved["status"] == "False", reserved
    assert "insufficient" in reserved["message"], reserved
    # ...and it was held back while the first was not done: Kueue queued it, not timing.
    assert status_of(cluster, "first").get("phase") in ("Pending", "Running"), status_of(
        cluster, "first"
    )
    assert job_of(cluster, "second")["spec"]["suspend"] is True
    assert pods_of(cluster, "second") == []
    assert status_of(cluster, "second")["phase"] == "Queued"

    # Kueue placed the admitted job with its flavor's node labels.
    first_job = job_of(cluster, "first")
    assert first_job["spec"]["suspend"] is False
    node_selector = first_job["spec"]["template"]["spec"].get("nodeSelector") or {}
    assert node_selector.get(GPU_LABEL) == GPU_PRODUCT, node_selector
    assert first_admitted["status"]["admission"]["clusterQueue"] == "gpu"

    first = wait_phase(cluster, "first", "Succeeded", "Failed")
    assert first["phase"] == "Succeeded", first
    second_admitted = wait_condition(cluster, "second", "Admitted")
    second = wait_phase(cluster, "second", "Succeeded", "Failed")
    assert second["phase"] == "Succeeded", second
    # Admitted only once the first had finished and given its quota back.
    first_finished = condition(workload_of(cluster, "first"), "Finished")
    assert first_finished.get("status") == "True", first_finished
    admitted_at = condition(second_admitted, "Admitted")["lastTransitionTime"]
    assert admitted_at >= first_finished["lastTransitionTime"]  # RFC 3339 UTC: sortable


@pytest.mark.skipif(
    "nodes" not in ResourcesSpec.model_fields, reason="spec.resources.nodes not in the API yet"
)
def test_multi_node_job_is_admitted_as_one_unit(queued: QueuedCluster) -> None:
    """Two nodes of one GPU each against one GPU of quota: Kueue admits all or nothing, so
    no trainer pod starts at all (rather than one of two, waiting for its peer); with two
    GPUs of quota both pods start together."""
    cluster, api = queued.cluster, queued.cluster.rest()
    manifest = ftj_manifest("gang", queued.bucket)
    manifest["spec"]["resources"]["nodes"] = 2
    api.post(f"{FTJ_API}/namespaces/{NAMESPACE}/finetunejobs", manifest)
    wait_phase(cluster, "gang", "Queued", timeout=60)

    def held_back() -> dict | None:
        workload = workload_of(cluster, "gang")
        reserved = condition(workload, "QuotaReserved")
        return workload if "insufficient" in reserved.get("message", "") else None

    workload = wait_for(held_back, timeout=60, what="the gang's Workload held back")
    pod_sets: list[dict[str, Any]] = workload["spec"]["podSets"]
    assert sum(p["count"] for p in pod_sets) == 2, pod_sets  # one unit of two pods
    assert condition(workload, "Admitted").get("status") != "True"
    assert pods_of(cluster, "gang") == []

    # With two GPUs of quota the whole gang is admitted at once: both pods are created.
    set_gpu_quota(api, 2)
    try:
        wait_condition(cluster, "gang", "Admitted")
        wait_for(lambda: len(pods_of(cluster, "gang")) == 2, timeout=60, what="both gang pods")
    finally:
        api.delete(f"{FTJ_API}/namespaces/{NAMESPACE}/finetunejobs/gang")
        set_gpu_quota(api, 1)


def set_gpu_quota(api: KubeRest, gpus: int) -> None:
    """Change the ClusterQueue's nominal GPU quota (through Kueue's webhooks)."""
    path = f"{KUEUE_API}/clusterqueues/gpu"
    cluster_queue = api.get(path)
    for resource in cluster_queue["spec"]["resourceGroups"][0]["flavors"][0]["resources"]:
        if resource["name"] == "nvidia.com/gpu":
            resource["nominalQuota"] = gpus
    api.request("PUT", path, cluster_queue)


def test_kueue_version_is_the_pinned_release(queued: QueuedCluster) -> None:
    assert f'"gitVersion":"{KUEUE_VERSION}"' in queued.kueue.logs().replace(" ", "")
