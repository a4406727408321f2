"""The dev cluster: a real control plane plus the local node running pods as processes.

Cluster tests wait on conditions with timeouts; nothing sleeps to synchronise.
"""

from __future__ import annotations

import base64
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune_devcluster import localnode, podspec
from kubetune_devcluster.controlplane import DevCluster, NodeConfig
from kubetune_devcluster.processes import process_start_time, wait_for
from kubetune_devcluster.rest import ApiError
from tests.fixtures.cluster import cluster_or_skip

# ---- pure functions (no cluster) ---------------------------------------------------------

POD = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "x"}},
    "spec": {"nodeName": "n"},
}


def test_expand_vars_follows_kubernetes_rules() -> None:
    env = {"A": "1", "B": "two"}
    assert podspec.expand_vars("$(A)-$(B)-$(C)", env) == "1-two-$(C)"
    assert podspec.expand_vars("$$(A) costs $$5", env) == "$(A) costs $5"


def test_build_pod_env_resolves_every_source() -> None:
    container = {
        "name": "c",
        "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
        "env": [
            {"name": "PLAIN", "value": "v-$(CM_k)"},
            {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}},
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {
                "name": "OPT",
                "valueFrom": {"secretKeyRef": {"name": "none", "key": "k", "optional": True}},
            },
        ],
    }
    secrets = {"s": {"data": {"token": base64.b64encode(b"hunter2").decode()}}}
    configmaps = {"cm": {"data": {"k": "from-cm"}}}
    env = podspec.build_pod_env(POD, container, secrets, configmaps, base={"PATH": "/bin"})
    assert env == {
        "PATH": "/bin",
        "CM_k": "from-cm",
        "PLAIN": "v-from-cm",
        "SECRET": "hunter2",
        "NAME": "p",
        "UID": "u-1",
        "APP": "x",
    }


def test_missing_secret_is_a_config_error() -> None:
    container = {
        "name": "c",
        "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}],
    }
    with pytest.raises(podspec.ContainerConfigError, match="absent"):
        podspec.build_pod_env(POD, container, {}, {})


def test_container_without_command_cannot_run() -> None:
    with pytest.raises(podspec.ContainerConfigError, match="no command"):
        podspec.container_argv({"name": "c", "image": "busybox"}, {})


def test_exit_status_and_termination_message() -> None:
    assert podspec.exit_code_from_returncode(-9) == 137
    assert podspec.exit_code_from_returncode(3) == 3
    state = podspec.terminated_state(1, "t0", "t1", "boom")["terminated"]
    assert (state["reason"], state["exitCode"], state["message"]) == ("Error", 1, "boom")
    assert podspec.terminated_state(0, "t0", "t1")["terminated"]["reason"] == "Completed"
    fallback = {"terminationMessagePolicy": "FallbackToLogsOnError"}
    assert podspec.termination_message(fallback, b"", b"a\nlast words\n", 2) == "a\nlast words\n"
    assert podspec.termination_message({}, b"x" * 5000, b"", 1) == "x" * 4096


def test_pod_phase_follows_restart_policy() -> None:
    ok, failed = podspec.terminated_state(0, "", ""), podspec.terminated_state(1, "", "")
    running = podspec.running_state("t")
    assert (
        podspec.pod_phase("Never", [podspec.waiting_state("ContainerCreating")], False) == "Pending"
    )
    assert podspec.pod_phase("Never", [running, ok], False) == "Running"
    assert podspec.pod_phase("Never", [ok, ok], False) == "Succeeded"
    assert podspec.pod_phase("Never", [ok, failed], False) == "Failed"
    assert podspec.pod_phase("OnFailure", [failed], True) == "Running"
    assert podspec.should_restart("OnFailure", 1) and not podspec.should_restart("OnFailure", 0)
    assert podspec.should_restart("Always", 0) and not podspec.should_restart("Never", 1)


# ---- helpers for cluster tests -----------------------------------------------------------


def job_manifest(
    name: str,
    namespace: str,
    script: str,
    *,
    backoff_limit: int = 0,
    extra_container: dict[str, Any] | None = None,
) -> str:
    container = {
        "name": "main",
        "image": "unused:latest",
        "command": ["/bin/sh", "-c", script],
        **(extra_container or {}),
    }
    import yaml

    return yaml.safe_dump(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "backoffLimit": backoff_limit,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "terminationGracePeriodSeconds": 5,
                        "containers": [container],
                    }
                },
            },
        }
    )


def job_condition(cluster: DevCluster, namespace: str, name: str) -> str | None:
    job = cluster.rest().get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
    for condition in job.get("status", {}).get("conditions") or []:
        if condition["type"] in ("Complete", "Failed") and condition["status"] == "True":
            return condition["type"]
    return None


def job_pods(cluster: DevCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    return cluster.rest().get(
        f"/api/v1/namespaces/{namespace}/pods", labelSelector=f"job-name={name}"
    )["items"]


def pod_condition(pod: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in pod["status"].get("conditions") or [] if c["type"] == kind), None)


def pid_alive(pid: int, start_time: int | None) -> bool:
    return start_time is not None and process_start_time(pid) == start_time


# ---- cluster tests -----------------------------------------------------------------------


@pytest.mark.cluster
def test_job_runs_to_completion_on_local_node(
    k8s_cluster: DevCluster, k8s_namespace: str, tmp_path: Path
) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        job_manifest(
            "hello",
            k8s_namespace,
            'echo "hello from $POD_NAME"; echo "to stderr" >&2',
            extra_container={
                "env": [
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
                ]
            },
        )
    )
    k8s_cluster.kubectl("apply", "-f", str(manifest))

    wait_for(
        lambda: job_condition(k8s_cluster, k8s_namespace, "hello") == "Complete",
        timeout=60,
        what="job Complete",
    )
    [pod] = job_pods(k8s_cluster, k8s_namespace, "hello")
    name = pod["metadata"]["name"]
    assert pod["spec"]["nodeName"] == k8s_cluster.node.name  # bound by the real scheduler
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["status"]["podIP"] == "127.0.0.1"
    assert pod_condition(pod, "PodScheduled")["status"] == "True"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
    logs = k8s_cluster.read_pod_logs(k8s_namespace, name)
    assert f"hello from {name}" in logs and "to stderr" in logs
    # The API server reaches the node's log endpoint too.
    assert f"hello from {name}" in k8s_cluster.kubectl("logs", "-n", k8s_namespace, name).stdout


@pytest.mark.cluster
def test_pod_asking_for_more_gpus_than_the_node_has_stays_pending(
    k8s_cluster: DevCluster, k8s_namespace: str
) -> None:
    gpus = str(k8s_cluster.node.gpus + 1)
    api = k8s_cluster.rest()
    api.post(
        f"/api/v1/namespaces/{k8s_namespace}/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "greedy"},
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "image": "unused",
                        "command": ["true"],
                        "resources": {"limits": {"nvidia.com/gpu": gpus}},
                    }
                ]
            },
        },
    )

    def unschedulable() -> dict[str, Any] | None:
        pod = api.get(f"/api/v1/namespaces/{k8s_namespace}/pods/greedy")
        condition = pod_condition(pod, "PodScheduled")
        return condition if condition and condition["status"] == "False" else None

    condition = wait_for(unschedulable, timeout=30, what="PodScheduled=False")
    assert condition["reason"] == "Unschedulable"
    assert "nvidia.com/gpu" in condition["message"]
    pod = api.get(f"/api/v1/namespaces/{k8s_namespace}/pods/greedy")
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")


@pytest.mark.cluster
def test_failing_container_reports_exit_code_and_message_and_job_retries(
    k8s_cluster: DevCluster, k8s_namespace: str
) -> None:
    script = 'echo "attempt failed"; printf "out of cheese" > /dev/termination-log; exit 3'
    k8s_cluster.kubectl(
        "apply", "-f", "-", input=job_manifest("flaky", k8s_namespace, script, backoff_limit=1)
    )

    # The Job controller waits ~10 s before the retry.
    wait_for(
        lambda: job_condition(k8s_cluster, k8s_namespace, "flaky") == "Failed",
        timeout=90,
        what="job Failed after its retry",
    )
    job = k8s_cluster.rest().get(f"/apis/batch/v1/namespaces/{k8s_namespace}/jobs/flaky")
    assert job["status"]["failed"] == 2
    pods = job_pods(k8s_cluster, k8s_namespace, "flaky")
    assert len(pods) == 2
    for pod in pods:
        assert pod["status"]["phase"] == "Failed"
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 3
        assert terminated["reason"] == "Error"
        assert terminated["message"] == "out of cheese"
        assert terminated["startedAt"] and terminated["finishedAt"]
        assert "attempt failed" in k8s_cluster.read_pod_logs(k8s_namespace, pod["metadata"]["name"])


@pytest.mark.cluster
def test_deleting_a_job_garbage_collects_its_pods_and_stops_their_processes(
    k8s_cluster: DevCluster, k8s_namespace: str
) -> None:
    k8s_cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=job_manifest("sleeper", k8s_namespace, "echo started; exec sleep 600"),
    )

    def running_pod() -> dict[str, Any] | None:
        pods = job_pods(k8s_cluster, k8s_namespace, "sleeper")
        return pods[0] if pods and pods[0]["status"].get("phase") == "Running" else None

    pod = wait_for(running_pod, timeout=60, what="sleeper pod Running")
    name = pod["metadata"]["name"]
    assert pod_condition(pod, "Ready")["status"] == "True"
    assert pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
    [pid] = wait_for(
        lambda: k8s_cluster.pod_pids(k8s_namespace, name), timeout=10, what="container pid"
    )
    start_time = process_start_time(pid)
    assert pid_alive(pid, start_time)

    k8s_cluster.rest().delete(
        f"/apis/batch/v1/namespaces/{k8s_namespace}/jobs/sleeper",
        {"propagationPolicy": "Background"},
    )

    def pod_gone() -> bool:
        try:
            k8s_cluster.rest().get(f"/api/v1/namespaces/{k8s_namespace}/pods/{name}")
        except ApiError as exc:
            return exc.status == 404
        return False

    wait_for(pod_gone, timeout=60, what="pod garbage-collected and finalized")
    assert not pid_alive(pid, start_time)


@pytest.mark.cluster
def test_volumes_and_env_are_where_the_container_expects_them(
    k8s_cluster: DevCluster, k8s_namespace: str
) -> None:
    api = k8s_cluster.rest()
    ns = k8s_namespace
    api.post(
        f"/api/v1/namespaces/{ns}/configmaps",
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "settings"},
            "data": {"model.yaml": "name: tiny\n", "other": "ignored"},
        },
    )
    api.post(
        f"/api/v1/namespaces/{ns}/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "creds"},
            "stringData": {"access-key": "AKIA-test", "secret-key": "s3cr3t"},
        },
    )
    config_dir = f"/etc/kubetune-test-{ns}/config"
    script = textwrap.dedent(f"""\
        cat {config_dir}/model.yaml
        echo "secret-file=$(cat /var/run/creds/secret-key)"
        echo "env-key=$ACCESS_KEY pod=$POD_NAME ns=$POD_NS uid=$POD_UID"
        echo scratch > /scratch/file && echo "scratch=$(cat /scratch/file)"
        echo "fast=$(df -P /fast | tail -1 | cut -d' ' -f1)"
        ls {config_dir}
        """)
    api.post(
        f"/api/v1/namespaces/{ns}/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "reader"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "main",
                        "image": "unused",
                        "command": ["/bin/sh", "-c", script],
                        "env": [
                            {
                                "name": "ACCESS_KEY",
                                "valueFrom": {
                                    "secretKeyRef": {"name": "creds", "key": "access-key"}
                                },
                            },
                            {
                                "name": "POD_NAME",
                                "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                            },
                            {
                                "name": "POD_NS",
                                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                            },
                            {
                                "name": "POD_UID",
                                "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}},
                            },
                        ],
                        "volumeMounts": [
                            {"name": "settings", "mountPath": config_dir, "readOnly": True},
                            {"name": "creds", "mountPath": "/var/run/creds", "readOnly": True},
                            {"name": "scratch", "mountPath": "/scratch"},
                            {"name": "fast", "mountPath": "/fast"},
                        ],
                    }
                ],
                "volumes": [
                    {
                        "name": "settings",
                        "configMap": {
                            "name": "settings",
                            "items": [{"key": "model.yaml", "path": "model.yaml"}],
                        },
                    },
                    {"name": "creds", "secret": {"secretName": "creds"}},
                    {"name": "scratch", "emptyDir": {}},
                    {"name": "fast", "emptyDir": {"medium": "Memory"}},
                ],
            },
        },
    )

    def finished() -> dict[str, Any] | None:
        pod = api.get(f"/api/v1/namespaces/{ns}/pods/reader")
        return pod if pod["status"].get("phase") in ("Succeeded", "Failed") else None

    pod = wait_for(finished, timeout=60, what="reader pod finished")
    logs = k8s_cluster.read_pod_logs(ns, "reader")
    assert pod["status"]["phase"] == "Succeeded", logs
    uid = pod["metadata"]["uid"]
    assert "name: tiny" in logs
    assert "secret-file=s3cr3t" in logs
    assert f"env-key=AKIA-test pod=reader ns={ns} uid={uid}" in logs
    assert "scratch=scratch" in logs
    assert "fast=tmpfs" in logs
    assert logs.strip().endswith("model.yaml")  # only the listed item, not "other"
    # Mount points made for the pod do not outlive it on the host.
    api.delete(f"/api/v1/namespaces/{ns}/pods/reader")
    wait_for(lambda: not Path(config_dir).exists(), timeout=30, what="mount point removed")
    assert not Path(f"/etc/kubetune-test-{ns}").exists()


@pytest.mark.cluster
def test_stopping_the_harness_leaves_no_process_or_port_behind() -> None:
    cluster_or_skip()
    with tempfile.TemporaryDirectory(prefix="kubetune-stop-") as state_dir:
        cluster = DevCluster.start(Path(state_dir), node=NodeConfig(name="stop-test", gpus=0))
        try:
            assert cluster.ready_seconds < 30
            api = cluster.rest()
            wait_for(
                lambda: api.get("/api/v1/namespaces/default/serviceaccounts/default"),
                timeout=30,
                what="default ServiceAccount",
            )
            api.post(
                "/api/v1/namespaces/default/pods",
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "long"},
                    "spec": {
                        "containers": [
                            {"name": "main", "image": "unused", "command": ["sleep", "600"]}
                        ]
                    },
                },
            )
            [pod_pid] = wait_for(
                lambda: cluster.pod_pids("default", "long"), timeout=60, what="pod process"
            )
            pod_start = process_start_time(pod_pid)
            records = list(cluster.processes)
            assert len(records) == 5 and all(map(cluster_alive, records))
        finally:
            cluster.stop()
        assert not cluster.alive_processes()
        assert not any(map(cluster_alive, records))
        assert not pid_alive(pod_pid, pod_start)
        assert cluster.ports_in_use() == []


def cluster_alive(record: Any) -> bool:
    from kubetune_devcluster.processes import is_alive

    return is_alive(record)


def test_token_renewal_comes_at_80_percent_of_the_lifetime() -> None:
    volume = {
        "projected": {
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 7200}},
                {"downwardAPI": {"items": []}},
            ]
        }
    }
    assert podspec.token_lifetimes(volume) == [7200]
    assert podspec.token_lifetimes({"emptyDir": {}}) == []
    assert podspec.token_renew_after(7200) == pytest.approx(5760)
    # The API server's floor is 10 minutes, so a shorter request renews after 8.
    assert podspec.token_renew_after(60) == pytest.approx(480)


@pytest.mark.cluster
def test_projected_tokens_are_renewed_in_place_before_they_expire(
    k8s_cluster: DevCluster, k8s_namespace: str, tmp_path: Path
) -> None:
    """The process node rewrites a projected token with a fresh one, as kubelet does, so a
    container that re-reads the file (the trainer's progress push) outlives the first token."""
    api = k8s_cluster.rest()
    audience = "kubetune.io/progress"
    token_source = {"path": "token", "audience": audience, "expirationSeconds": 600}
    pod = api.post(
        f"/api/v1/namespaces/{k8s_namespace}/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "holder"},
            # Bound to a node that does not exist: the object is real, nothing runs it.
            "spec": {
                "nodeName": "nowhere",
                "containers": [{"name": "main", "image": "unused"}],
                "volumes": [
                    {
                        "name": "progress",
                        "projected": {"sources": [{"serviceAccountToken": token_source}]},
                    }
                ],
            },
        },
    )

    def reviewed(token: str) -> dict[str, Any]:
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview"}
        review["spec"] = {"token": token, "audiences": [audience]}
        return api.post("/apis/authentication.k8s.io/v1/tokenreviews", review)["status"]

    try:
        first, second = issue_and_renew(api, pod, tmp_path)
        # Both are the pod's tokens for the progress audience (valid while the pod exists).
        for token in (first, second):
            status = reviewed(token)
            assert status.get("authenticated") is True, status
            assert status["user"]["extra"]["authentication.kubernetes.io/pod-name"] == ["holder"]
    finally:
        # No kubelet runs on "nowhere" to finish a graceful deletion.
        api.delete(f"/api/v1/namespaces/{k8s_namespace}/pods/holder", {"gracePeriodSeconds": 0})


def issue_and_renew(api: Any, pod: dict[str, Any], state_dir: Path) -> tuple[str, str]:
    """The process node's pod worker writes the pod's projected token, then renews it;
    returns both tokens."""
    node = localnode.NodeSpec(name="probe", cpu="1", memory="1Gi", gpus=0, pods=1, labels={})
    worker = localnode.PodWorker(localnode.LocalNodeAgent(api, node, state_dir), pod)
    worker._prepare_volumes()
    token_file = worker._volume_dirs["progress"] / "token"
    first = token_file.read_text()
    assert worker.tokens_renew_at is not None
    assert worker.tokens_renew_at - time.monotonic() == pytest.approx(480, abs=5)

    worker.renew_tokens()
    second = token_file.read_text()
    assert second != first
    assert worker.tokens_renew_at - time.monotonic() == pytest.approx(480, abs=5)
    assert not list(token_file.parent.glob(".*partial"))
    return first, second
