"""kubetune the way its users run it: the operator from its image, installed with `helm
install`, trainer pods from the trainer image under a real kubelet and containerd, which
enforce the image, the user, the read-only root, volumes, memory limits and networking.
S3 is the moto server on the node's host address. Polls conditions; never sleeps to sync.

    KUBETUNE_REQUIRE_CLUSTER=1 .venv/bin/pytest -q tests/e2e/test_real_node.py

Needs root, the real node's binaries (`bash hack/k8s-binaries.sh`) and the images
(`bash hack/images.sh`); see tests/fixtures/real_node.py.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from kubetune_devcluster import imagestore, stack
from kubetune_devcluster.nodefaults import pod_paused
from kubetune_devcluster.processes import wait_for
from tests.fixtures.ftj import (
    FTJ_API,
    StepWatch,
    create,
    jobs_of,
    pods_of,
    s3_keys,
    status_of,
    wait_phase,
    wait_reason,
)
from tests.fixtures.real_node import (
    RUN_TIMEOUT,
    TRAINER_IMAGE,
    RealStack,
    both_replicas_ready,
    leader_pod,
    manifest,
    running_trainer_pod,
    step_of,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def kubectl_exec(
    real_stack: RealStack, real_ns: str, pod: str, *argv: str
) -> subprocess.CompletedProcess:
    return real_stack.cluster.kubectl(
        "exec", "-n", real_ns, pod, "-c", "trainer", "--", *argv, check=False
    )


# The trainer image's Python tries each write and prints what happened, one JSON object.
WRITE_PROBE = """
import json, os
result = {"uid": os.getuid(), "gid": os.getgid()}
for path in ("/probe", "/opt/probe", "/tmp/probe", "/workspace/probe", "/dev/shm/probe"):
    try:
        with open(path, "w") as f:
            f.write("x")
        os.remove(path)
        result[path] = "ok"
    except OSError as exc:
        result[path] = exc.strerror
result["token"] = os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token")
print(json.dumps(result))
"""


def test_lora_job_succeeds_from_the_images_with_progress_logs_and_exec(
    real_stack: RealStack, real_ns: str, real_assets: str
) -> None:
    # Long enough that the status (patched at most once a second) shows a step between the
    # first and the last: on a fast machine 12 steps fit in one patch interval.
    cluster, steps = real_stack.cluster, 60
    create(cluster, real_ns, manifest("e2e", real_assets, steps=steps))
    pod = running_trainer_pod(real_stack, real_ns)
    # The pod runs the trainer image, never pulled: the archive imported into containerd.
    spec = cluster.rest().get(f"/api/v1/namespaces/{real_ns}/pods/{pod}")["spec"]
    assert spec["containers"][0]["image"] == TRAINER_IMAGE
    progress_url = next(
        e["value"] for e in spec["containers"][0]["env"] if e["name"] == "KUBETUNE_PROGRESS_URL"
    )
    # Progress goes to the operator's Service by its cluster DNS name.
    assert f".{real_stack.namespace}.svc:" in progress_url, progress_url

    def finished() -> dict | None:
        st = status_of(cluster, real_ns, "e2e")
        return st if st.get("phase") in ("Succeeded", "Failed") else None

    def probed() -> dict | None:
        probe = kubectl_exec(real_stack, real_ns, pod, "python3", "-c", WRITE_PROBE)
        return json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else None

    # kubectl exec needs the container running: the trainer is paused meanwhile, so the run
    # cannot end inside a slow exec.
    with pod_paused(cluster, real_ns, pod):
        exec_result = wait_for(probed, timeout=RUN_TIMEOUT, interval=1, what="kubectl exec")
    # Sampled on a thread: progress is pushed several times a second.
    with StepWatch(cluster, real_ns, "e2e") as watch:
        st = wait_for(finished, timeout=RUN_TIMEOUT, interval=0.3, what="e2e finished")
    assert st["phase"] == "Succeeded", st
    seen = {step for _, step in watch.samples}
    assert any(0 < s < steps for s in seen), f"no intermediate progress seen: {seen}"
    assert exec_result["uid"] == 1000 and exec_result["/workspace/probe"] == "ok"
    assert exec_result["/opt/probe"] == "Read-only file system", exec_result
    for field in ("model", "manifest", "report"):
        uri = st["artifacts"][field]
        assert uri.startswith(f"s3://{real_assets}/runs/{real_ns}/e2e/"), uri
        assert s3_keys(real_stack.s3, uri), f"{field}: nothing at {uri}"
    manifest_uri = st["artifacts"]["manifest"]
    bucket, _, key = manifest_uri.removeprefix("s3://").partition("/")
    body = real_stack.s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert json.loads(body)  # the manifest is JSON the trainer wrote
    logs = cluster.kubectl("logs", "-n", real_ns, pod, "-c", "trainer")
    assert '"event": "completed"' in logs.stdout.replace('":"', '": "'), logs.stdout[-2000:]
    node = cluster.kubectl("get", "node", "-o", "wide").stdout
    assert "containerd://2." in node, node


def test_trainer_cannot_write_outside_its_volumes(
    real_stack: RealStack, real_ns: str, real_assets: str
) -> None:
    """The operator's pod template (taken from a suspended FineTuneJob's Job), run with the
    trainer image's Python probing writes instead of training: the runtime enforces the
    read-only root, the non-root user and the absence of an API token."""
    cluster = real_stack.cluster
    create(cluster, real_ns, manifest("rofs", real_assets, suspend=True))
    (job,) = wait_for(lambda: jobs_of(cluster, real_ns), timeout=60, what="the suspended Job")
    template = job["spec"]["template"]
    pod_spec = template["spec"]
    pod_spec["containers"][0]["command"] = ["python3", "-c", WRITE_PROBE]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "write-probe"},
        "spec": pod_spec,
    }
    cluster.rest().post(f"/api/v1/namespaces/{real_ns}/pods", pod)

    def done() -> dict | None:
        status = cluster.rest().get(f"/api/v1/namespaces/{real_ns}/pods/write-probe")["status"]
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = wait_for(done, timeout=120, interval=0.5, what="write-probe finished")
    logs = cluster.kubectl("logs", "-n", real_ns, "write-probe").stdout
    assert status["phase"] == "Succeeded", logs
    result = json.loads(logs.strip().splitlines()[-1])
    assert result["uid"] == 1000 and result["gid"] == 1000, result
    for path in ("/probe", "/opt/probe", "/tmp/probe"):
        assert result[path] == "Read-only file system", result
    assert result["/workspace/probe"] == "ok" and result["/dev/shm/probe"] == "ok", result
    assert result["token"] is False, result


def test_image_that_does_not_exist_is_reported_naming_it(
    real_stack: RealStack, real_ns: str, real_assets: str
) -> None:
    image = "localhost/kubetune/no-such-trainer:missing"
    create(real_stack.cluster, real_ns, manifest("noimage", real_assets, image=image))

    def pull_failed() -> dict | None:
        st = status_of(real_stack.cluster, real_ns, "noimage")
        return st if st.get("reason") in ("ErrImagePull", "ImagePullBackOff") else None

    st = wait_for(pull_failed, timeout=120, interval=0.5, what="an image pull failure")
    assert image in st["message"], st


def test_memory_limit_too_small_is_oomkilled(
    real_stack: RealStack, real_ns: str, real_assets: str
) -> None:
    body = manifest("tight", real_assets, backoffLimit=0)
    # Importing torch alone takes more than this.
    body["spec"]["resources"]["memory"] = "150Mi"
    create(real_stack.cluster, real_ns, body)
    st = wait_phase(
        real_stack.cluster, real_ns, "tight", "Failed", "Succeeded", timeout=RUN_TIMEOUT
    )
    assert st["phase"] == "Failed" and st["reason"] == "OOMKilled", st
    assert "150Mi" in st["message"], st


def test_active_deadline_exceeded(real_stack: RealStack, real_ns: str, real_assets: str) -> None:
    create(
        real_stack.cluster,
        real_ns,
        manifest("late", real_assets, steps=500, activeDeadlineSeconds=20),
    )
    st = wait_phase(real_stack.cluster, real_ns, "late", "Failed", "Succeeded", timeout=180)
    assert st["phase"] == "Failed" and st["reason"] == "DeadlineExceeded", st


def test_missing_secret_and_missing_key_are_named_within_seconds(
    real_stack: RealStack, real_ns: str, real_assets: str
) -> None:
    cluster = real_stack.cluster
    nosecret = manifest("nosecret", real_assets)
    nosecret["spec"]["output"]["credentialsSecretRef"]["name"] = "missing"
    create(cluster, real_ns, nosecret)
    cluster.rest().post(
        f"/api/v1/namespaces/{real_ns}/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "half"},
            "stringData": {"AWS_ACCESS_KEY_ID": "only-the-id"},
        },
    )
    halfsecret = manifest("halfsecret", real_assets)
    halfsecret["spec"]["output"]["credentialsSecretRef"]["name"] = "half"
    create(cluster, real_ns, halfsecret)
    st = wait_reason(cluster, real_ns, "nosecret", "SecretNotFound", timeout=60)
    assert st["message"] == "spec.output.credentialsSecretRef: Secret 'missing' not found"
    st = wait_reason(cluster, real_ns, "halfsecret", "SecretKeyMissing", timeout=60)
    assert st["message"] == (
        "spec.output.credentialsSecretRef: Secret 'half' has no key AWS_SECRET_ACCESS_KEY"
    )


def test_operator_pod_deleted_mid_run_the_new_one_carries_on(
    real_stack: RealStack, real_ns: str, real_assets: str
) -> None:
    cluster = real_stack.cluster
    create(cluster, real_ns, manifest("steady", real_assets, steps=60))
    wait_for(
        lambda: step_of(real_stack, real_ns, "steady") > 0,
        timeout=RUN_TIMEOUT,
        interval=0.5,
        what="progress",
    )
    old = leader_pod(real_stack)

    (trainer,) = pods_of(cluster, real_ns)
    # The trainer is paused while the operator restarts: a fast machine would otherwise
    # finish the run inside the restart, and progress after it is what is under test.
    with pod_paused(cluster, real_ns, trainer["metadata"]["name"]):
        before = step_of(real_stack, real_ns, "steady")
        killed = time.monotonic()
        cluster.kubectl("delete", "pod", "-n", real_stack.namespace, old["metadata"]["name"])
        wait_for(
            lambda: both_replicas_ready(real_stack, not_uids={old["metadata"]["uid"]}),
            timeout=180,
            interval=0.5,
            what="the new operator pod Ready",
        )
    assert status_of(cluster, real_ns, "steady")["phase"] == "Running"
    # Progress keeps flowing to the new pod through the Service.
    wait_for(
        lambda: step_of(real_stack, real_ns, "steady") > before,
        timeout=RUN_TIMEOUT,
        interval=0.5,
        what="progress after the operator's restart",
    )
    # The other replica leads now (the deleted pod released its Lease on SIGTERM).
    assert leader_pod(real_stack)["metadata"]["uid"] != old["metadata"]["uid"]
    print(f"\nleader pod deleted: progress again {time.monotonic() - killed:.1f} s later")
    st = wait_phase(cluster, real_ns, "steady", "Succeeded", "Failed", timeout=RUN_TIMEOUT)
    assert st["phase"] == "Succeeded", st
    assert st["progress"]["step"] == 60
    assert len(jobs_of(cluster, real_ns)) == 1
    assert len(pods_of(cluster, real_ns)) == 1  # one trainer pod: no second run
    cluster.rest().delete(f"{FTJ_API}/namespaces/{real_ns}/finetunejobs/steady")


def test_the_node_started_with_both_images_from_the_store(real_stack: RealStack) -> None:
    """kubetune_devcluster.imagestore: the real stack's node came up with the operator and
    trainer images (linked from the store kept across clusters), so none was imported."""
    if "cluster start" not in real_stack.timings:
        pytest.skip("the real stack reuses a cluster it did not start")
    assert not [k for k in real_stack.timings if k.startswith("import")], real_stack.timings
    node = stack.node_image_digests(real_stack.cluster)
    for ref, archive in stack.image_archives().items():
        assert node.get(ref) == imagestore.archive_digest(archive), ref
