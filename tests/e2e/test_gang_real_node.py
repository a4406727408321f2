"""A multi-node gang on the real node: a FineTuneJob with `resources.nodes: 2` runs as the 2
pods of one Indexed Job (trainer image, kubelet + containerd), which rendezvous (torchrun, gloo
on CPU) at index 0's DNS name through the headless Service the operator creates; rank 0 alone
publishes, and no value of the canary credentials it was given shows in the status, Events,
Job, pods, either pod's log, the operators' logs or what it wrote to S3. A worker pod killed
mid-run fails the gang at once and the whole gang restarts from the latest complete
checkpoint. Polls conditions; never sleeps to sync.

    KUBETUNE_REQUIRE_CLUSTER=1 .venv/bin/pytest -q tests/e2e/test_gang_real_node.py

Needs what tests/e2e/test_real_node.py needs (root, the node's binaries, the images).
The output goes to a bucket of its own with versioning on, so a key written twice (a second
publish, a rank other than 0 writing) shows as a second version.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
import uuid

import pytest

from kubetune.api import contract
from kubetune_devcluster import realnode
from kubetune_devcluster.controlplane import DevCluster
from kubetune_devcluster.processes import wait_for
from kubetune_operator import names
from tests.fixtures.ftj import (
    FTJ_API,
    add_credentials_secret,
    create,
    jobs_of,
    leaks,
    loss_history,
    pods_of,
    s3_texts,
    status_of,
    wait_phase,
)
from tests.fixtures.real_node import RUN_TIMEOUT, RealStack, manifest, step_of

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

GANG = {"nodes": 2, "gpus": 0, "cpu": "500m", "memory": "2Gi"}
# Two trainers import torch at once on a machine of 2 shared CPUs.
GANG_TIMEOUT = 2 * RUN_TIMEOUT
# A killed worker must fail its peer long before the collective timeout (600 s) would:
# the peer's next collective sees the closed connection.
GANG_FAILS_WITHIN_S = 120
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
INDEX_LABEL = INDEX_ANNOTATION  # Indexed Jobs set both
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
WRITES = ("PUT", "POST", "DELETE")


def gang_manifest(
    name: str, assets: str, output_bucket: str, *, steps: int = 6, **spec: object
) -> dict:
    body = manifest(name, assets, steps=steps, **spec)
    body["spec"]["resources"].update(GANG)
    body["spec"]["output"]["uri"] = f"s3://{output_bucket}/runs/"
    return body


def versioned_bucket(real_stack: RealStack, name: str) -> str:
    client = real_stack.s3.client()
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def versions_by_key(real_stack: RealStack, bucket: str, prefix: str) -> dict[str, int]:
    pages = (
        real_stack.s3.client()
        .get_paginator("list_object_versions")
        .paginate(Bucket=bucket, Prefix=prefix)
    )
    counts: dict[str, int] = {}
    for page in pages:
        for version in page.get("Versions", []):
            counts[version["Key"]] = counts.get(version["Key"], 0) + 1
    return counts


def complete_checkpoints(real_stack: RealStack, bucket: str, prefix: str) -> list[int]:
    """Steps of the checkpoints whose _COMPLETE marker is uploaded."""
    keys = versions_by_key(real_stack, bucket, prefix)
    return sorted(
        int(m.group(1)) for k in keys if (m := re.search(r"checkpoint-(\d+)/_COMPLETE$", k))
    )


def index_of(pod: dict) -> str:
    return pod["metadata"]["annotations"][INDEX_ANNOTATION]


def env_of(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in pod["spec"]["containers"][0]["env"]}


def logs_of(cluster: DevCluster, ns: str, pod: dict) -> str:
    name = pod["metadata"]["name"]
    return cluster.kubectl("logs", "-n", ns, name, "-c", "trainer", check=False).stdout


def trainer_state(pod: dict) -> dict:
    statuses = pod["status"].get("containerStatuses") or [{}]
    return statuses[0].get("state") or {}


def container_id(pod: dict) -> str:
    """The containerd ID of the pod's trainer container."""
    statuses = pod["status"].get("containerStatuses") or [{}]
    return statuses[0]["containerID"].removeprefix("containerd://")


def writes_by_client(caplog: pytest.LogCaptureFixture) -> dict[str, list[str]]:
    """Client address -> the write requests (method and path) the S3 server logged."""
    writes: dict[str, list[str]] = {}
    for record in caplog.records:
        if record.name != "werkzeug":
            continue
        line = record.getMessage()
        m = re.match(r'(\S+) - - \[[^]]*\] "(\S+) (\S+)', line)
        if m and m.group(2) in WRITES:
            writes.setdefault(m.group(1), []).append(f"{m.group(2)} {m.group(3)}")
    return writes


def test_two_node_gang_rendezvous_through_the_headless_service_and_publishes_once(
    real_stack: RealStack, real_ns: str, real_assets: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="werkzeug")  # the S3 server's request log
    cluster = real_stack.cluster
    out = versioned_bucket(real_stack, f"gang-{real_ns}")
    # Canary credentials (moto takes any keys): no value may show anywhere, from either pod.
    canaries = {
        "AWS_ACCESS_KEY_ID": f"kubetune-canary-access-{uuid.uuid4().hex}",
        "AWS_SECRET_ACCESS_KEY": f"kubetune-canary-secret-{uuid.uuid4().hex}",
        "HF_TOKEN": f"kubetune-canary-hf-{uuid.uuid4().hex}",
    }
    s3_env = dict(real_stack.s3.env)
    add_credentials_secret(
        cluster,
        real_ns,
        {**s3_env, **{k: canaries[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}},
        name="canary-creds",
    )
    add_credentials_secret(cluster, real_ns, {"token": canaries["HF_TOKEN"]}, name="hf")
    body = gang_manifest("gang", real_assets, out)
    body["spec"]["output"]["credentialsSecretRef"] = {"name": "canary-creds"}
    body["spec"]["model"]["tokenSecretRef"] = {"name": "hf", "key": "token"}
    started = time.monotonic()
    ftj = create(cluster, real_ns, body)
    st = wait_phase(cluster, real_ns, "gang", "Succeeded", "Failed", timeout=GANG_TIMEOUT)
    print(f"\n2-node gang, 6 steps: Succeeded after {time.monotonic() - started:.0f} s")
    pods = sorted(pods_of(cluster, real_ns), key=index_of)
    logs = {index_of(p): logs_of(cluster, real_ns, p) for p in pods}
    assert st["phase"] == "Succeeded", (st, {i: text[-3000:] for i, text in logs.items()})

    # One Indexed Job, one pod per completion index, each finished.
    (job,) = jobs_of(cluster, real_ns)
    assert (job["spec"]["completionMode"], job["spec"]["completions"]) == ("Indexed", 2)
    assert [index_of(p) for p in pods] == ["0", "1"]
    assert all(p["status"]["phase"] == "Succeeded" for p in pods)
    assert all(p["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"] for p in pods)

    # The headless Service, owned by the FineTuneJob, gives index 0 its stable DNS name.
    service_name = names.service_name("gang")
    service = cluster.rest().get(f"/api/v1/namespaces/{real_ns}/services/{service_name}")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    (owner,) = service["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("FineTuneJob", ftj["metadata"]["uid"])
    master = f"{names.job_name('gang')}-0.{service_name}.{real_ns}.svc"
    for pod in pods:
        index = index_of(pod)
        assert pod["spec"]["subdomain"] == service_name
        env = env_of(pod)
        assert env[contract.ENV_MASTER_ADDR] == master and env[contract.ENV_NNODES] == "2"
        # The pod's launcher line: torchrun's environment for a gang of 2, node rank =
        # completion index (through the downward API), rendezvous at index 0's name, and
        # torchrun itself without topology flags; then its worker joined the world of 2.
        launcher = logs[index].splitlines()[0]
        torchrun = (
            f"{contract.ENV_NNODES}=2",
            f"{contract.ENV_NODE_RANK}={index}",
            f"{contract.ENV_MASTER_ADDR}={master}",
        )
        for setting in torchrun:
            assert setting in launcher.split(), launcher
        assert "--nnodes" not in launcher and "--node-rank" not in launcher, launcher
        assert f"rank {index} of 2 joined (gloo)" in logs[index], logs[index][-3000:]

    assert st["worldSize"] == 2
    assert st["effectiveBatchSize"] == 4 * 1 * 2  # batchSize x accumulation x world size

    # Published exactly once: every key of the run has a single version, and only rank 0's
    # pod wrote to S3 (the S3 server logs each request's client address).
    run_prefix = f"runs/{real_ns}/gang/"
    versions = versions_by_key(real_stack, out, run_prefix)
    for field in ("model", "manifest", "report"):
        key = st["artifacts"][field].removeprefix(f"s3://{out}/")
        assert any(k.startswith(key) for k in versions), (field, key, sorted(versions))
    assert f"{run_prefix}manifest.json" in versions
    written_twice = {k: n for k, n in versions.items() if n != 1}
    assert not written_twice, written_twice
    writes = writes_by_client(caplog)
    rank0_ip, rank1_ip = (p["status"]["podIP"] for p in pods)
    assert any(f"/{out}/{run_prefix}manifest.json" in w for w in writes.get(rank0_ip, []))
    assert rank1_ip not in writes, writes[rank1_ip]
    assert '"event"' not in logs["1"], "rank 1 reported progress"
    assert "message" not in trainer_state(pods[1])["terminated"], "rank 1 wrote a result"

    rest = cluster.rest()
    places = {
        "FineTuneJob": json.dumps(rest.get(f"{FTJ_API}/namespaces/{real_ns}/finetunejobs/gang")),
        "events": json.dumps(rest.get(f"/api/v1/namespaces/{real_ns}/events")),
        "Job": json.dumps(job),
        "pods": json.dumps(pods),
        **{f"log of index {index}": text for index, text in logs.items()},
        **{
            f"log of {p['metadata']['name']}": cluster.kubectl(
                "logs", "-n", real_stack.namespace, p["metadata"]["name"], check=False
            ).stdout
            for p in real_stack.operator_pods()
        },
    }
    places.update(s3_texts(real_stack.s3, f"s3://{out}/{run_prefix}"))
    assert "canary-creds" in places[f"s3://{out}/{run_prefix}manifest.json"]  # by name
    assert leaks(places, canaries) == []


def test_worker_pod_killed_mid_run_restarts_the_gang_from_its_checkpoint(
    real_stack: RealStack, real_ns: str, real_assets: str
) -> None:
    cluster = real_stack.cluster
    out = versioned_bucket(real_stack, f"gang-kill-{real_ns}")
    # One retry allowed: the gang's restart must count once, not once per pod.
    body = gang_manifest("kill", real_assets, out, steps=20, backoffLimit=1)
    create(cluster, real_ns, body)
    checkpoints = f"runs/{real_ns}/kill/checkpoints/"
    wait_for(
        lambda: complete_checkpoints(real_stack, out, checkpoints),
        timeout=GANG_TIMEOUT,
        interval=0.3,
        what="a complete checkpoint",
    )
    first = {index_of(p): p for p in pods_of(cluster, real_ns)}
    victim, peer = first["1"], first["0"]
    # SIGKILL to the container's init from the node (as the OOM killer or a crash would):
    # every process of the worker pod dies, no clean shutdown.
    container = container_id(victim)
    killed = time.monotonic()
    realnode.ctr(cluster.node_paths, "task", "kill", "-s", "SIGKILL", container)
    step_at_kill = step_of(real_stack, real_ns, "kill")

    def ended(pod: dict) -> dict | None:
        name = pod["metadata"]["name"]
        fresh = cluster.rest().get(f"/api/v1/namespaces/{real_ns}/pods/{name}")
        return trainer_state(fresh).get("terminated")

    victim_end = wait_for(lambda: ended(victim), timeout=60, interval=0.2, what="the kill")
    assert victim_end["exitCode"] == 137, victim_end
    peer_end = wait_for(lambda: ended(peer), timeout=600, interval=0.2, what="index 0 failing")
    gang_failed_s = time.monotonic() - killed
    # The latest complete checkpoint when the gang died: the one the new gang must resume.
    latest = complete_checkpoints(real_stack, out, checkpoints)[-1]

    def resumed() -> dict | None:
        st = status_of(cluster, real_ns, "kill")
        return (
            st if st.get("resumedFromStep") or st.get("phase") in ("Succeeded", "Failed") else None
        )

    st = wait_for(resumed, timeout=GANG_TIMEOUT, interval=0.5, what="the gang resumed")
    resumed_s = time.monotonic() - killed
    print(
        f"\nkilled index 1 at step {step_at_kill}; index 0 failed after {gang_failed_s:.1f} s "
        f"(exit {peer_end['exitCode']}); the new gang resumed from step "
        f"{st.get('resumedFromStep')} {resumed_s:.0f} s after the kill"
    )
    assert peer_end["exitCode"] != 0, peer_end
    assert gang_failed_s < GANG_FAILS_WITHIN_S, f"the peer took {gang_failed_s:.0f} s to fail"
    # gloo's error for a peer gone ("Connection closed by peer", "Read error ..."): the
    # message names the remote worker either way.
    assert "gloo" in peer_end.get("message", "") and "remote worker" in peer_end["message"]

    st = wait_phase(cluster, real_ns, "kill", "Succeeded", "Failed", timeout=GANG_TIMEOUT)
    pods = pods_of(cluster, real_ns)
    assert st["phase"] == "Succeeded", (
        st,
        {p["metadata"]["name"]: logs_of(cluster, real_ns, p)[-2000:] for p in pods},
    )
    assert st["resumedFromStep"] == latest > 0, (st["resumedFromStep"], latest)
    assert st["progress"]["step"] == 20

    # The whole gang restarted: both indexes ran twice, the first pair failed.
    by_phase = sorted((index_of(p), p["status"]["phase"]) for p in pods)
    assert by_phase == [("0", "Failed"), ("0", "Succeeded"), ("1", "Failed"), ("1", "Succeeded")]
    # spec.backoffLimit counts gang retries: the Job counts pods, 2 per failed attempt here,
    # within its limit of backoffLimit x nodes; the status shows one restart.
    (job,) = jobs_of(cluster, real_ns)
    assert job["spec"]["backoffLimit"] == 1 * 2
    assert job["status"]["failed"] == 2 and st["restarts"] == 1, (job["status"], st)

    # The killed attempt published nothing: each published key has a single version.
    versions = versions_by_key(real_stack, out, f"runs/{real_ns}/kill/")
    published = {k: n for k, n in versions.items() if "/checkpoints/" not in k}
    assert f"runs/{real_ns}/kill/manifest.json" in published
    assert set(published.values()) == {1}, published


def test_drain_evicting_one_gang_member_stops_both_after_one_step_and_resumes_there(
    real_stack: RealStack, real_ns: str, real_assets: str
) -> None:
    """`kubectl drain` of the node, for index 1's pod only (the operator's and CoreDNS's pods
    stay): the eviction's SIGTERM reaches one member; the stop flag, all-reduced each step,
    stops both after the same step with its checkpoint saved (exit 5, not counted against
    backoffLimit 0). After `kubectl uncordon` the new gang resumes from exactly that step."""
    cluster, name, steps = real_stack.cluster, "drained", 16
    out = versioned_bucket(real_stack, f"gang-drain-{real_ns}")
    body = gang_manifest(name, real_assets, out, steps=steps, backoffLimit=0)
    body["spec"]["training"]["checkpointEverySteps"] = 1000  # the stop's is the only one
    # Without dropout a resume replays the same computation: the losses must match a run
    # that was never stopped (trained after this one, the node having room for one gang).
    body["spec"]["lora"] = {"r": 4, "dropout": 0.0}
    create(cluster, real_ns, body)
    wait_for(
        lambda: step_of(real_stack, real_ns, name) >= 2,
        timeout=GANG_TIMEOUT,
        interval=0.3,
        what="the gang training",
    )
    first = {index_of(p): p for p in pods_of(cluster, real_ns)}
    node = cluster.node.name
    try:
        step_at_drain = step_of(real_stack, real_ns, name)
        drained = time.monotonic()
        job_name = first["1"]["metadata"]["labels"][JOB_NAME_LABEL]
        cluster.kubectl(
            "drain", node, "--pod-selector", f"{INDEX_LABEL}=1,{JOB_NAME_LABEL}={job_name}",
            "--delete-emptydir-data", "--ignore-daemonsets", "--timeout", "300s",
        )  # fmt: skip
        drain_s = time.monotonic() - drained

        def stopped() -> dict | None:
            pod = cluster.rest().get(
                f"/api/v1/namespaces/{real_ns}/pods/{first['0']['metadata']['name']}"
            )
            return trainer_state(pod).get("terminated")

        peer_end = wait_for(stopped, timeout=300, interval=0.3, what="index 0 stopping")

        def read_as_preempted() -> dict | None:
            st = status_of(cluster, real_ns, name)
            attempts = st.get("attempts") or []
            return st if attempts and attempts[0].get("reason") == "Preempted" else None

        preempted = wait_for(
            read_as_preempted,
            timeout=120,
            interval=0.3,
            what="the attempt read as Preempted",
        )
    finally:
        cluster.kubectl("uncordon", node)
    (saved,) = complete_checkpoints(real_stack, out, f"runs/{real_ns}/{name}/checkpoints/")
    st = wait_phase(cluster, real_ns, name, "Succeeded", "Failed", timeout=GANG_TIMEOUT)
    assert st["phase"] == "Succeeded", st
    # Index 0 got no signal: it stopped because its peer did, after the same step.
    assert peer_end["exitCode"] == contract.EXIT_PREEMPTED, peer_end
    assert f"after step {saved};" in peer_end.get("message", ""), peer_end
    assert step_at_drain <= saved < steps
    first_attempt = preempted["attempts"][0]
    assert (first_attempt["result"], first_attempt["exitCode"]) == ("Stopped", 5), first_attempt
    assert st["attempts"][1]["resumedFromStep"] == saved == st["resumedFromStep"]
    assert st["restarts"] == 0 and st["progress"]["step"] == steps
    (job,) = jobs_of(cluster, real_ns)
    assert not job["status"].get("failed"), job["status"]  # exit 5: the Job's Ignore rule

    steady = copy.deepcopy(body)
    steady["metadata"]["name"] = "steady"
    create(cluster, real_ns, steady)
    reference = wait_phase(cluster, real_ns, "steady", "Succeeded", "Failed", timeout=GANG_TIMEOUT)
    assert reference["phase"] == "Succeeded" and reference["restarts"] == 0, reference
    stopped, uninterrupted = loss_history(real_stack.s3, st), loss_history(real_stack.s3, reference)
    assert sorted(stopped) == sorted(uninterrupted) == list(range(1, steps + 1))
    for step, loss in uninterrupted.items():
        assert stopped[step] == pytest.approx(loss, rel=1e-4), (step, stopped, uninterrupted)
    print(
        f"\ndrain of index 1 at step {step_at_drain}: drain returned in {drain_s:.1f} s, "
        f"both ranks stopped after step {saved} (exit 5), resumed there after uncordon; the "
        f"losses of all {steps} steps match an uninterrupted run's (rel 1e-4)"
    )
