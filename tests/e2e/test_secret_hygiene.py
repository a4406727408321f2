"""Nothing secret leaks: runs that used every Secret a FineTuneJob can name (S3 keys, the hub
token, MLflow credentials, the W&B API key) leave no secret value in the FineTuneJobs' status,
their Events, the Job or pod objects, the trainers' and the operator's logs, the operator's
/metrics, any object written to S3 (artifacts, checkpoints, manifest, report), or what the
MLflow tracking server stored (its database and artifact root) — on each way a run ends:
Succeeded, a trainer failure (bad input: the trainer's own line becomes the status message) and
a missed evaluation gate. (A 2-node gang: tests/e2e/test_gang_real_node.py.)

The credentials are canaries: values that appear nowhere else, so finding one anywhere is a
leak. moto's S3 and a plain MLflow server accept any credentials, so the runs work with them.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path

import pytest

from kubetune_devcluster.controlplane import DevCluster
from tests.fixtures.ftj import (
    FTJ_API,
    add_credentials_secret,
    create,
    ftj_manifest,
    leaks,
    pods_of,
    s3_texts,
    wait_phase,
)
from tests.fixtures.mlflow import MlflowServer
from tests.fixtures.operator import OperatorProcess
from tests.fixtures.s3 import S3Server

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def canary(kind: str) -> str:
    return f"kubetune-canary-{kind}-{uuid.uuid4().hex}"


def secret(cluster: DevCluster, ns: str, name: str, data: dict[str, str]) -> None:
    cluster.rest().post(
        f"/api/v1/namespaces/{ns}/secrets",
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data},
    )


def stored_by_mlflow(server: MlflowServer) -> dict[str, str]:
    """Every file of the MLflow server's store (its SQLite database, the artifacts)."""
    return {
        f"mlflow {path.relative_to(server.root)}": path.read_bytes().decode("utf-8", "replace")
        for path in sorted(Path(server.root).rglob("*"))
        if path.is_file() and path.name != "server.log"
    }


# name -> (what the job changes, the phase it ends in)
RUNS = {
    "canary-ok": ({}, "Succeeded"),
    "canary-bad-input": ({"dataset.uri": "data/bad.jsonl"}, "Failed"),
    # Published, but the EvalPassed condition False (reason ThresholdsMissed).
    "canary-gate": ({"evaluation.thresholds": {"maxEvalLoss": 0.0}}, "Succeeded"),
}


def canary_job(name: str, bucket: str, mlflow_url: str, changes: dict) -> dict:
    manifest = ftj_manifest(name, bucket, steps=4)
    spec = manifest["spec"]
    # An s3:// model never uses the hub token; the trainer still receives it, as a real
    # job with an hf:// model would, so it must not print it either.
    spec["model"]["tokenSecretRef"] = {"name": "hf", "key": "token"}
    spec["tracking"] = {
        "mlflow": {"uri": mlflow_url, "credentialsSecretRef": {"name": "mlflow"}},
        "wandb": {
            "project": "canary",
            "mode": "offline",
            "apiKeySecretRef": {"name": "wandb", "key": "api-key"},
        },
    }
    spec["backoffLimit"] = 0
    if "dataset.uri" in changes:
        spec["dataset"]["uri"] = f"s3://{bucket}/{changes['dataset.uri']}"
    if "evaluation.thresholds" in changes:
        spec["evaluation"]["thresholds"] = changes["evaluation.thresholds"]
    return manifest


def test_no_secret_value_appears_anywhere_on_success_failure_or_a_missed_gate(
    k8s_cluster: DevCluster,
    operator: OperatorProcess,  # noqa: F811
    k8s_namespace: str,
    assets: str,  # noqa: F811
    s3_server: S3Server,
    mlflow_server: MlflowServer,
) -> None:
    ns, rest = k8s_namespace, k8s_cluster.rest()
    secrets = {
        "AWS_ACCESS_KEY_ID": canary("access-key"),
        "AWS_SECRET_ACCESS_KEY": canary("secret-key"),
        "HF_TOKEN": canary("hf-token"),
        "MLFLOW_TRACKING_USERNAME": canary("mlflow-user"),
        "MLFLOW_TRACKING_PASSWORD": canary("mlflow-password"),
        "WANDB_API_KEY": canary("wandb-key"),
    }
    add_credentials_secret(
        k8s_cluster,
        ns,
        {
            "AWS_ACCESS_KEY_ID": secrets["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": secrets["AWS_SECRET_ACCESS_KEY"],
            "AWS_ENDPOINT_URL": s3_server.env["AWS_ENDPOINT_URL"],
            "AWS_REGION": s3_server.env["AWS_REGION"],
        },
    )
    secret(k8s_cluster, ns, "hf", {"token": secrets["HF_TOKEN"]})
    secret(
        k8s_cluster,
        ns,
        "mlflow",
        {key: secrets[key] for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")},
    )
    secret(k8s_cluster, ns, "wandb", {"api-key": secrets["WANDB_API_KEY"]})
    # The server's first tracking request loads its store: made here, not by a trainer whose
    # requests time out after 10 s (then its run goes on untracked).
    search = f"{mlflow_server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    with urllib.request.urlopen(search, timeout=120) as response:
        assert response.status == 200
    for name, (changes, _) in RUNS.items():
        create(k8s_cluster, ns, canary_job(name, assets, mlflow_server.url, changes))
    ended = {
        name: wait_phase(k8s_cluster, ns, name, "Succeeded", "Failed", timeout=400) for name in RUNS
    }
    assert {name: st["phase"] for name, st in ended.items()} == {
        name: phase for name, (_, phase) in RUNS.items()
    }, ended
    assert ended["canary-bad-input"]["reason"] == "BadInput", ended["canary-bad-input"]
    gate = {c["type"]: c for c in ended["canary-gate"]["conditions"]}["EvalPassed"]
    assert (gate["status"], gate["reason"]) == ("False", "ThresholdsMissed"), gate

    with urllib.request.urlopen(f"{operator.url}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    places: dict[str, str] = {
        "FineTuneJobs": json.dumps(rest.get(f"{FTJ_API}/namespaces/{ns}/finetunejobs")),
        "events": json.dumps(rest.get(f"/api/v1/namespaces/{ns}/events")),
        "jobs": json.dumps(rest.get(f"/apis/batch/v1/namespaces/{ns}/jobs")),
        "pods": json.dumps(pods_of(k8s_cluster, ns)),
        "operator log": operator.logs(),
        "operator /metrics": metrics,
        **stored_by_mlflow(mlflow_server),
    }
    for pod in pods_of(k8s_cluster, ns):
        name = pod["metadata"]["name"]
        places[f"log of {name}"] = k8s_cluster.read_pod_logs(ns, name, "trainer")
    places.update(s3_texts(s3_server, f"s3://{assets}/runs/{ns}/"))

    # The checks must be able to see what they look for: every trainer logged, the manifest
    # names the credentials Secret (by name), MLflow stored the runs (their params name the
    # Secrets), the metrics describe these jobs.
    logs = [text for place, text in places.items() if place.startswith("log of ")]
    assert len(logs) == len(RUNS) and all(text.strip() for text in logs), list(places)
    assert "s3-creds" in places[f"s3://{assets}/runs/{ns}/canary-ok/manifest.json"]
    assert any("mlflow.db" in place for place in places)
    # A run the trainer logged to MLflow (status.tracking says so; on a loaded machine a
    # request can time out, and the run then goes on without it) is in the server's store.
    logged = [
        name
        for name, st in ended.items()
        if any(
            t.get("backend") == "mlflow" and t.get("state") == "Logged"
            for t in st.get("tracking") or []
        )
    ]
    assert logged, {name: st.get("tracking") for name, st in ended.items()}
    stored = "".join(t for p, t in places.items() if p.startswith("mlflow "))
    assert all(name in stored for name in logged), logged
    assert ns in metrics
    assert leaks(places, secrets) == []
