"""Nothing secret leaks: a run that used credentials leaves no secret value in the
FineTuneJob's status, its Events, the Job or pod objects, the trainer's and the operator's
logs, or any object it wrote to S3 (artifacts, checkpoints, manifest, report).

The credentials are canaries: values that appear nowhere else, so finding one anywhere is a
leak. moto's S3 accepts any keys, so the run works with them.
"""

from __future__ import annotations

import json
import uuid

import pytest

from kubetune_devcluster.controlplane import DevCluster
from tests.fixtures.ftj import (
    FTJ_API,
    add_credentials_secret,
    create,
    ftj_manifest,
    pods_of,
    s3_keys,
    wait_phase,
)
from tests.fixtures.operator import OperatorProcess
from tests.fixtures.s3 import S3Server

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def canary(kind: str) -> str:
    return f"kubetune-canary-{kind}-{uuid.uuid4().hex}"


def test_no_secret_value_appears_in_status_events_logs_or_artifacts(
    k8s_cluster: DevCluster,
    operator: OperatorProcess,  # noqa: F811
    k8s_namespace: str,
    assets: str,  # noqa: F811
    s3_server: S3Server,
) -> None:
    ns, rest = k8s_namespace, k8s_cluster.rest()
    secrets = {
        "AWS_ACCESS_KEY_ID": canary("access-key"),
        "AWS_SECRET_ACCESS_KEY": canary("secret-key"),
        "HF_TOKEN": canary("hf-token"),
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
    rest.post(
        f"/api/v1/namespaces/{ns}/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "hf"},
            "stringData": {"token": secrets["HF_TOKEN"]},
        },
    )
    manifest = ftj_manifest("canary", assets, steps=4)
    # An s3:// model never uses the hub token; the trainer still receives it, as a real
    # job with an hf:// model would, so it must not print it either.
    manifest["spec"]["model"]["tokenSecretRef"] = {"name": "hf", "key": "token"}
    create(k8s_cluster, ns, manifest)
    status = wait_phase(k8s_cluster, ns, "canary", "Succeeded", "Failed", timeout=300)
    assert status["phase"] == "Succeeded", status

    places: dict[str, str] = {
        "status": json.dumps(rest.get(f"{FTJ_API}/namespaces/{ns}/finetunejobs/canary")),
        "events": json.dumps(rest.get(f"/api/v1/namespaces/{ns}/events")),
        "jobs": json.dumps(rest.get(f"/apis/batch/v1/namespaces/{ns}/jobs")),
        "pods": json.dumps(pods_of(k8s_cluster, ns)),
        "operator log": operator.logs(),
    }
    for pod in pods_of(k8s_cluster, ns):
        name = pod["metadata"]["name"]
        places[f"log of {name}"] = k8s_cluster.read_pod_logs(ns, name, "trainer")
    s3 = s3_server.client()
    keys = s3_keys(s3_server, f"s3://{assets}/runs/{ns}/canary/")
    assert any(key.endswith("manifest.json") for key in keys), keys
    for key in keys:
        body = s3.get_object(Bucket=assets, Key=key)["Body"].read()
        places[f"s3://{assets}/{key}"] = body.decode("utf-8", errors="replace")

    # The checks must be able to see what they look for: the trainer did log, and the
    # manifest names the credentials Secret (by name).
    assert any(text.strip() for place, text in places.items() if place.startswith("log of "))
    assert "s3-creds" in places[f"s3://{assets}/runs/{ns}/canary/manifest.json"]
    leaks = [
        f"{name} in {place}"
        for place, text in places.items()
        for name, value in secrets.items()
        if value in text
    ]
    assert leaks == []
