"""The operator on the real control plane: a subprocess operator, the real trainer run as
pods on the local node, S3 = the moto server. Polls conditions; never sleeps to sync.

    .venv/bin/pytest -q -m cluster tests/e2e/test_operator_cluster.py
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_devcluster.controlplane import DevCluster
from kubetune_devcluster.nodefaults import pod_paused
from kubetune_devcluster.processes import wait_for
from kubetune_devcluster.rest import ApiError
from tests.cli.test_preview_command import kubetune_preview
from tests.fixtures.ftj import (
    FTJ_API,
    checkpoint_written,
    create,
    events_for,
    ftj,
    ftj_manifest,
    jobs_of,
    kubetune,
    patch_spec,
    pods_of,
    push,
    s3_keys,
    status_of,
    wait_phase,
    wait_reason,
)
from tests.fixtures.operator import (
    OperatorProcess,
    get_or_none,
)
from tests.fixtures.s3 import S3Server

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


# --- tests ----------------------------------------------------------------------------


def test_end_to_end_succeeds_with_progress_artifacts_and_events(
    k8s_cluster: DevCluster,
    operator: OperatorProcess,
    ns: str,
    assets: str,
    s3_server: S3Server,
    tmp_path: Path,
) -> None:
    manifest_file = tmp_path / "e2e.yaml"
    # Enough steps to outlast the operator's patch interval (1 s here) on a quiet machine,
    # where 10 tiny steps once finished between two progress patches.
    body = ftj_manifest("e2e", assets, steps=40)
    body["spec"]["training"]["checkpointEverySteps"] = 10
    manifest_file.write_text(yaml.safe_dump(body))
    submitted = kubetune(k8s_cluster, "submit", str(manifest_file), "-n", ns)
    assert submitted.returncode == 0, submitted.stderr
    seen: set[int] = set()

    def finished() -> dict | None:
        st = status_of(k8s_cluster, ns, "e2e")
        step = (st.get("progress") or {}).get("step")
        if st.get("phase") == "Running" and step is not None:
            seen.add(step)
        return st if st.get("phase") in ("Succeeded", "Failed") else None

    st = wait_for(finished, timeout=300, interval=0.3, what="e2e finished")
    assert st["phase"] == "Succeeded", st
    assert any(0 < s < 40 for s in seen), f"no intermediate progress seen: {seen}"
    assert st["progress"]["summary"] == "40/40 (100%)"
    assert st["jobName"] == "e2e-trainer" and st["startTime"] and st["completionTime"]
    assert st["restarts"] == 0
    artifacts = st["artifacts"]
    for field in ("model", "manifest", "report"):
        uri = artifacts[field]
        assert uri.startswith(f"s3://{assets}/runs/{ns}/e2e/"), uri
        assert s3_keys(s3_server, uri), f"{field}: nothing at {uri}"
    assert st["metrics"]["trainLoss"] > 0
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert conds["Succeeded"] == "True" and conds["Running"] == "False"
    # Events go out beside the status patch, not before it: wait for them.
    wait_for(
        lambda: (
            {"Training", "Completed"} <= {e["reason"] for e in events_for(k8s_cluster, ns, "e2e")}
        ),
        timeout=30,
        what="Training and Completed events",
    )
    # The Job the operator made follows the agreed shape.
    (job,) = jobs_of(k8s_cluster, ns)
    assert job["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [3, 4]
    assert operator.metric("kubetune_progress_events_total", {"result": "accepted"}) > 0

    # The user CLI sees the same: list, watch (returns at once: finished), logs, report.
    listed = kubetune(k8s_cluster, "list", "-n", ns)
    assert listed.returncode == 0 and "e2e" in listed.stdout and "Succeeded" in listed.stdout
    watched = kubetune(k8s_cluster, "watch", "e2e", "-n", ns)
    assert watched.returncode == 0, watched.stderr
    assert artifacts["model"] in watched.stdout.replace("\n", "")
    logs = kubetune(k8s_cluster, "logs", "e2e", "-n", ns)
    assert logs.returncode == 0 and '"event": "completed"' in logs.stdout.replace('":"', '": "')
    report = kubetune(k8s_cluster, "report", "e2e", "-n", ns, env=s3_server.env)
    assert report.returncode == 0, report.stderr
    assert "Thresholds" in report.stdout and "report.md" in report.stdout


def test_bad_dataset_fails_at_once_with_the_trainers_message(
    k8s_cluster: DevCluster, operator: OperatorProcess, ns: str, assets: str
) -> None:
    manifest = ftj_manifest("bad", assets)
    manifest["spec"]["dataset"]["uri"] = f"s3://{assets}/data/bad.jsonl"
    create(k8s_cluster, ns, manifest)
    st = wait_phase(k8s_cluster, ns, "bad", "Failed", "Succeeded")
    assert st["phase"] == "Failed" and st["reason"] == "BadInput", st
    assert "bad.jsonl" in st["message"]
    assert st["restarts"] == 0
    (job,) = jobs_of(k8s_cluster, ns)
    assert job["status"].get("failed") == 1  # no retry
    wait_for(
        lambda: "Warning" in {e["type"] for e in events_for(k8s_cluster, ns, "bad")},
        timeout=30,
        what="a Warning event",
    )


def test_a_dry_run_is_validated_without_a_gpu_with_the_previews_totals(
    k8s_cluster: DevCluster,
    operator: OperatorProcess,
    ns: str,
    assets: str,
    s3_server: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Eight GPUs on each of two nodes: far more than the node offers (the job below would stay
    # Unschedulable, as the test after this one shows); a dry run asks for none.
    manifest = ftj_manifest("dry", assets, dryRun=True)
    manifest["spec"]["resources"].update(gpus=8, nodes=2)
    create(k8s_cluster, ns, manifest)
    st = wait_phase(k8s_cluster, ns, "dry", "Validated", "Failed", "Succeeded")
    assert (st["phase"], st["reason"]) == ("Validated", "DryRunPassed"), st
    (job,) = jobs_of(k8s_cluster, ns)
    assert "nvidia.com/gpu" not in json.dumps(job["spec"]["template"])
    assert job["spec"].get("completions", 1) == 1 and job["status"].get("succeeded") == 1
    preview = st["preview"]
    assert preview["uri"] == f"s3://{assets}/runs/{ns}/dry/preview.json"
    assert s3_keys(s3_server, f"s3://{assets}/runs/{ns}/dry/") == [f"runs/{ns}/dry/preview.json"]
    bucket, _, key = preview["uri"].removeprefix("s3://").partition("/")
    document = json.loads(s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    # The totals are what `kubetune preview --json` computes for the same manifest.
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    job_file = tmp_path / "dry.yaml"
    job_file.write_text(yaml.safe_dump({**manifest, "metadata": {"name": "dry", "namespace": ns}}))
    code = kubetune_preview([str(job_file), "--json", "--work-dir", str(tmp_path / "work")])
    assert code == 0
    local = json.loads(capsys.readouterr().out)
    assert document == local
    totals = local["totals"]
    assert preview["trainRows"] == totals["train_rows"] and preview["tokens"] == totals["tokens"]
    assert preview["trainedTokens"] == totals["trained_tokens"]
    assert preview["stepsPerEpoch"] == totals["steps_per_epoch"]  # the real 16-process run's
    assert preview["memoryEstimateGiBPerGpu"] == totals["memory_estimate_gib_per_gpu"]
    assert "metrics" not in st and "artifacts" not in st
    listed = kubetune(k8s_cluster, "list", "-n", ns)
    assert listed.returncode == 0 and "Validated" in listed.stdout, listed.stdout
    watched = kubetune(k8s_cluster, "watch", "dry", "-n", ns)
    assert watched.returncode == 0, watched.stdout + watched.stderr


def test_a_dry_run_on_a_bad_row_fails_with_bad_input_naming_it(
    k8s_cluster: DevCluster, operator: OperatorProcess, ns: str, assets: str, s3_server: S3Server
) -> None:
    rows = [{"instruction": "Say hi.", "output": "Hi."}] * 6
    rows[2] = {"colour": "blue"}
    body = "".join(json.dumps(row) + "\n" for row in rows).encode()
    s3_server.client().put_object(Bucket=assets, Key="data/bad-row.jsonl", Body=body)
    manifest = ftj_manifest("dry-bad", assets, dryRun=True)
    manifest["spec"]["dataset"]["uri"] = f"s3://{assets}/data/bad-row.jsonl"
    create(k8s_cluster, ns, manifest)
    st = wait_phase(k8s_cluster, ns, "dry-bad", "Failed", "Validated", "Succeeded")
    assert (st["phase"], st["reason"]) == ("Failed", "BadInput"), st
    assert "bad-row.jsonl" in st["message"] and "row 3" in st["message"], st["message"]
    assert "preview" not in st and st["restarts"] == 0


def test_more_gpus_than_the_node_has_stays_pending_with_the_schedulers_message(
    k8s_cluster: DevCluster, operator: OperatorProcess, ns: str, assets: str
) -> None:
    manifest = ftj_manifest("greedy", assets)
    manifest["spec"]["resources"]["gpus"] = 8
    create(k8s_cluster, ns, manifest)

    def unschedulable() -> dict | None:
        st = status_of(k8s_cluster, ns, "greedy")
        return st if st.get("reason") == "Unschedulable" else None

    st = wait_for(unschedulable, timeout=60, what="Unschedulable status")
    assert st["phase"] == "Pending"
    assert "nvidia.com/gpu" in st["message"]


def test_operator_checks_reject_at_once_without_a_job(
    k8s_cluster: DevCluster, operator: OperatorProcess, ns: str, assets: str
) -> None:
    huge = ftj_manifest("huge", assets, method="full")
    huge["spec"].pop("lora")
    huge["spec"]["model"]["uri"] = "hf://meta-llama/Llama-2-70b-hf"
    huge["spec"]["resources"]["gpus"] = 1
    create(k8s_cluster, ns, huge)
    st = wait_phase(k8s_cluster, ns, "huge", "Failed", timeout=30)
    assert st["reason"] == "InsufficientGPUs" and "spec.resources.gpus >=" in st["message"]
    assert jobs_of(k8s_cluster, ns) == []


def test_a_missing_secret_or_key_shows_within_seconds_naming_it(
    k8s_cluster: DevCluster, operator: OperatorProcess, ns: str, assets: str
) -> None:
    # The operator reads no Secrets: the kubelet's container-config error tells.
    nosecret = ftj_manifest("nosecret", assets)
    nosecret["spec"]["output"]["credentialsSecretRef"]["name"] = "missing"
    create(k8s_cluster, ns, nosecret)
    halfsecret = ftj_manifest("halfsecret", assets)
    halfsecret["spec"]["output"]["credentialsSecretRef"]["name"] = "half"
    k8s_cluster.rest().post(
        f"/api/v1/namespaces/{ns}/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "half"},
            "stringData": {"AWS_ACCESS_KEY_ID": "only-the-id"},
        },
    )
    create(k8s_cluster, ns, halfsecret)
    st = wait_reason(k8s_cluster, ns, "nosecret", "SecretNotFound", timeout=30)
    assert st["phase"] == "Pending"
    assert st["message"] == "spec.output.credentialsSecretRef: Secret 'missing' not found"
    st = wait_reason(k8s_cluster, ns, "halfsecret", "SecretKeyMissing", timeout=30)
    assert st["phase"] == "Pending"
    assert st["message"] == (
        "spec.output.credentialsSecretRef: Secret 'half' has no key AWS_SECRET_ACCESS_KEY"
    )


def test_killed_trainer_is_retried_and_resumes_from_its_checkpoint(
    k8s_cluster: DevCluster, operator: OperatorProcess, ns: str, assets: str, s3_server: S3Server
) -> None:
    create(k8s_cluster, ns, ftj_manifest("retry", assets, steps=60))
    prefix = f"s3://{assets}/runs/{ns}/retry/checkpoints/"

    def checkpoint_and_pod() -> tuple[str, list[int]] | None:
        if not any(k.endswith("_COMPLETE") for k in s3_keys(s3_server, prefix)):
            return None
        running = [p for p in pods_of(k8s_cluster, ns) if p["status"].get("phase") == "Running"]
        if not running:
            return None
        name = running[0]["metadata"]["name"]
        pids = k8s_cluster.pod_pids(ns, name)
        return (name, pids) if pids else None

    _, pids = wait_for(checkpoint_and_pod, timeout=240, interval=0.2, what="a checkpoint")
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    st = wait_phase(k8s_cluster, ns, "retry", "Succeeded", "Failed", timeout=300)
    assert st["phase"] == "Succeeded", st
    assert st["restarts"] == 1
    assert st["resumedFromStep"] > 0


def test_suspend_stops_the_trainer_and_resume_continues_from_the_checkpoint(
    k8s_cluster: DevCluster, operator: OperatorProcess, ns: str, assets: str, s3_server: S3Server
) -> None:
    create(k8s_cluster, ns, ftj_manifest("pausable", assets, steps=60))
    wait_for(
        lambda: checkpoint_written(s3_server, assets, ns, "pausable"),
        timeout=240,
        interval=0.2,
        what="a checkpoint",
    )
    # The trainer is paused until the operator has suspended its Job, so a fast machine
    # cannot finish the run first; the SIGTERM that follows waits for it to carry on.
    (trainer,) = pods_of(k8s_cluster, ns)
    with pod_paused(k8s_cluster, ns, trainer["metadata"]["name"]):
        patch_spec(k8s_cluster, ns, "pausable", {"suspend": True})
        wait_for(
            lambda: [j["spec"].get("suspend") for j in jobs_of(k8s_cluster, ns)] == [True],
            timeout=60,
            what="the Job suspended",
        )
    st = wait_phase(k8s_cluster, ns, "pausable", "Suspended", "Succeeded", timeout=60)
    assert st["phase"] == "Suspended", st
    wait_for(
        lambda: not [p for p in pods_of(k8s_cluster, ns) if p["status"].get("phase") == "Running"],
        timeout=60,
        what="the trainer pod stopped",
    )
    patch_spec(k8s_cluster, ns, "pausable", {"suspend": False})
    # Resumed from its checkpoint, the trainer trains the rest again: slow on a busy machine.
    st = wait_phase(k8s_cluster, ns, "pausable", "Succeeded", "Failed", timeout=600)
    assert st["phase"] == "Succeeded", st
    assert st["resumedFromStep"] > 0
    assert len(jobs_of(k8s_cluster, ns)) == 1
    # The suspension's SIGTERM was a preemption: the step under way saved (exit code 5), no
    # retry used, and the next attempt resumed from that step.
    first, second = st["attempts"][:2]
    assert (first["result"], first["reason"], first["exitCode"]) == ("Stopped", "Preempted", 5)
    assert st["restarts"] == 0
    assert second["resumedFromStep"] == st["resumedFromStep"]


def test_operator_restart_mid_job_keeps_one_job_and_status_moving(
    k8s_cluster: DevCluster, operator: OperatorProcess, ns: str, assets: str
) -> None:
    create(k8s_cluster, ns, ftj_manifest("steady", assets, steps=60))

    def step_now() -> int:
        return (status_of(k8s_cluster, ns, "steady").get("progress") or {}).get("step") or 0

    wait_for(lambda: step_now() > 0, timeout=240, interval=0.3, what="progress")
    # Started: model, method and dataset are frozen by the CRD's transition rules...
    with pytest.raises(ApiError) as rejected:
        patch_spec(k8s_cluster, ns, "steady", {"model": {"uri": f"s3://{assets}/other/"}})
    assert rejected.value.status == 422
    assert "spec.model cannot change after the job has started" in str(rejected.value)
    # ...other edits are accepted and shown, not applied to the running trainer.
    patch_spec(k8s_cluster, ns, "steady", {"training": {"learningRate": 5e-4}})

    before = status_of(k8s_cluster, ns, "steady")
    assert before["phase"] == "Running", "finished before the restart: nothing to test"
    operator.restart(signal.SIGKILL)
    st = wait_phase(k8s_cluster, ns, "steady", "Succeeded", "Failed", timeout=300)
    assert st["phase"] == "Succeeded", st
    # The new operator wrote the outcome and the progress after the restart.
    assert st["progress"]["step"] == 60 > before["progress"]["step"]
    changed = next(c for c in st["conditions"] if c["type"] == "SpecChangedAfterStart")
    assert changed["status"] == "True" and "spec.training" in changed["message"]
    assert st["observedGeneration"] == ftj(k8s_cluster, ns, "steady")["metadata"]["generation"]
    assert len(jobs_of(k8s_cluster, ns)) == 1
    assert len(pods_of(k8s_cluster, ns)) == 1  # the one trainer pod: no second run

    # Deleting the FineTuneJob takes the Job and its pod with it.
    k8s_cluster.rest().delete(f"{FTJ_API}/namespaces/{ns}/finetunejobs/steady")
    wait_for(
        lambda: not jobs_of(k8s_cluster, ns) and not pods_of(k8s_cluster, ns),
        timeout=60,
        what="Job and pods deleted",
    )


def api_writes(operator: OperatorProcess) -> dict[str, float]:
    return {
        resource: operator.metric("kubetune_api_writes_total", {"resource": resource})
        for resource in ("jobs", "finetunejobs/status", "events", "configmaps", "secrets")
    }


def operator_objects(cluster: DevCluster, ns: str, kind: str) -> list[dict]:
    items = cluster.rest().get(f"/api/v1/namespaces/{ns}/{kind}")["items"]
    managed = "app.kubernetes.io/managed-by"
    return [o for o in items if (o["metadata"].get("labels") or {}).get(managed)]


def test_queued_job_costs_three_writes_and_deletion_takes_its_job(
    k8s_cluster: DevCluster, operator: OperatorProcess, ns: str, assets: str
) -> None:
    before = api_writes(operator)
    manifest = ftj_manifest("queued", assets)
    manifest["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpu-queue"}
    create(k8s_cluster, ns, manifest)
    st = wait_phase(k8s_cluster, ns, "queued", "Queued", timeout=30)
    assert "gpu-queue" in st["message"]
    (job,) = jobs_of(k8s_cluster, ns)
    assert job["spec"]["suspend"] is True  # Kueue admits it; the operator never unsuspends
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    wait_for(lambda: events_for(k8s_cluster, ns, "queued"), timeout=30, what="the Queued event")
    # From creation to Queued: the Job, one status patch, one Event. Nothing else.
    after = api_writes(operator)
    assert {k: after[k] - before[k] for k in after} == {
        "jobs": 1,
        "finetunejobs/status": 1,
        "events": 1,
        "configmaps": 0,
        "secrets": 0,
    }
    assert operator_objects(k8s_cluster, ns, "configmaps") == []
    assert operator_objects(k8s_cluster, ns, "secrets") == []

    k8s_cluster.rest().delete(f"{FTJ_API}/namespaces/{ns}/finetunejobs/queued")
    wait_for(
        lambda: (
            get_or_none(k8s_cluster, f"/apis/batch/v1/namespaces/{ns}/jobs/queued-trainer") is None
        ),
        timeout=60,
        what="the Job of the deleted FineTuneJob gone",
    )


def pod_of_job(cluster: DevCluster, ns: str, name: str) -> dict:
    def pod() -> dict | None:
        pods = [
            p
            for p in pods_of(cluster, ns)
            if p["metadata"]["labels"].get("kubetune.io/finetunejob") == name
        ]
        return pods[0] if pods else None

    return wait_for(pod, timeout=60, what=f"the pod of {name}")


def bound_token(cluster: DevCluster, pod: dict, audience: str | None) -> str:
    """A token bound to `pod`, as the kubelet requests one for a projected volume."""
    meta = pod["metadata"]
    spec: dict[str, Any] = {
        "expirationSeconds": 600,
        "boundObjectRef": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": meta["name"],
            "uid": meta["uid"],
        },
    }
    if audience:
        spec["audiences"] = [audience]
    account = pod["spec"].get("serviceAccountName") or "default"
    path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token"
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
    return cluster.rest().post(path, request)["status"]["token"]


def api_server_status(cluster: DevCluster, ns: str, token: str) -> int:
    """The API server's answer to a plain read made with `token`."""
    server = cluster.server.rstrip("/")
    request = urllib.request.Request(
        f"{server}/api/v1/namespaces/{ns}/pods", headers={"Authorization": f"Bearer {token}"}
    )
    context = ssl.create_default_context(cafile=str(cluster.state_dir / "pki" / "ca.crt"))
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_progress_tokens_open_one_job_and_nothing_on_the_api_server(
    k8s_cluster: DevCluster, operator: OperatorProcess, ns: str, assets: str
) -> None:
    # Two jobs whose pods exist but never run (no node has 8 GPUs): tokens bound to them.
    for name in ("mine", "other"):
        manifest = ftj_manifest(name, assets)
        manifest["spec"]["resources"]["gpus"] = 8
        create(k8s_cluster, ns, manifest)
    mine, other = pod_of_job(k8s_cluster, ns, "mine"), pod_of_job(k8s_cluster, ns, "other")
    (projected,) = [v for v in mine["spec"]["volumes"] if v["name"] == "progress-token"]
    audience = projected["projected"]["sources"][0]["serviceAccountToken"]["audience"]
    assert audience == "kubetune.io/progress"
    assert mine["spec"]["automountServiceAccountToken"] is False
    my_token, other_token = (
        bound_token(k8s_cluster, mine, audience),
        bound_token(k8s_cluster, other, audience),
    )

    url = f"{operator.url}/v1/progress/{ns}/mine"
    event = b'{"event": "step", "time": "2026-01-01T00:00:00Z", "step": 7, "totalSteps": 50}'
    version = ftj(k8s_cluster, ns, "mine")["metadata"]["resourceVersion"]
    rejected_before = operator.metric("kubetune_progress_events_total", {"result": "rejected"})
    assert push(url, None, event) == 401
    assert push(url, "not-the-token", event) == 401
    assert push(url, other_token, event) == 401  # genuine, but another job's pod
    api_token = bound_token(k8s_cluster, mine, None)  # this pod's, for the API server
    assert push(url, api_token, event) == 401
    rejected = operator.metric("kubetune_progress_events_total", {"result": "rejected"})
    assert rejected - rejected_before == 4
    assert ftj(k8s_cluster, ns, "mine")["metadata"]["resourceVersion"] == version

    # The pod's own token works (and is reviewed once, then cached), and the status shows it.
    reviews = operator.metric("kubetune_token_reviews_total")
    assert push(url, my_token, event) == 202
    assert push(url, my_token, event) == 202
    assert operator.metric("kubetune_token_reviews_total") - reviews == 1
    wait_for(
        lambda: (
            (status_of(k8s_cluster, ns, "mine").get("progress") or {}).get("summary")
            == "7/50 (14%)"
        ),
        timeout=30,
        what="pushed progress in status",
    )
    # The trainer's token opens nothing on the API server; the API server's token works there.
    assert api_server_status(k8s_cluster, ns, my_token) == 401
    assert api_server_status(k8s_cluster, ns, api_token) == 403  # authenticated, not allowed
