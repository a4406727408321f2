"""The real node: kubelet, containerd 2.x, runc, the CNI bridge, kube-proxy and CoreDNS
under the dev control plane. Pods run from images imported into the runtime.

One cluster for the module (starting it takes about a minute); the last tests stop it
and check that nothing is left behind, then bring a second one up and down through the
`kubetune dev` command. Nothing sleeps to synchronise: every wait is on a condition.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kubetune_devcluster import cli, realnode
from kubetune_devcluster.binaries import (
    CONTAINERD_VERSION,
    MODULES_DIR,
    image_archive,
    image_program,
    image_ref,
    missing_node_parts,
)
from kubetune_devcluster.controlplane import DevCluster, NodeConfig
from kubetune_devcluster.processes import wait_for
from tests.fixtures.cluster import STATE_DIR_PREFIX, cluster_or_skip, running_cluster

pytestmark = pytest.mark.cluster

TESTBOX = image_ref("testbox")
POD_TIMEOUT = 90


def real_node_or_skip() -> None:
    cluster_or_skip()
    reasons = [f"missing {', '.join(missing_node_parts())}"] if missing_node_parts() else []
    if os.geteuid() != 0:
        reasons.append("not root")
    if not reasons:
        return
    reason = f"the real node cannot run here: {'; '.join(reasons)} (bash hack/k8s-binaries.sh)"
    if os.environ.get("KUBETUNE_REQUIRE_CLUSTER"):
        pytest.fail(f"KUBETUNE_REQUIRE_CLUSTER is set but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def real_cluster() -> Iterator[DevCluster]:
    real_node_or_skip()
    node = NodeConfig(runtime="containerd", gpus=2)
    with running_cluster("kubetune-realnode-", node) as cluster:
        yield cluster


@pytest.fixture
def namespace(real_cluster: DevCluster) -> Iterator[str]:
    name = f"rn-{uuid.uuid4().hex[:8]}"
    real_cluster.kubectl("create", "namespace", name)
    wait_for(
        lambda: (
            real_cluster.kubectl(
                "get", "serviceaccount", "default", "-n", name, check=False
            ).returncode
            == 0
        ),
        timeout=30,
        what=f"default ServiceAccount in {name}",
    )
    yield name
    real_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


# ---- helpers ----------------------------------------------------------------------------------


def pod_manifest(name: str, args: list[str], **spec: Any) -> dict[str, Any]:
    container = {
        "name": "main",
        "image": TESTBOX,
        "imagePullPolicy": "Never",
        "args": args,
        **spec.pop("container", {}),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": spec.pop("labels", {"app": name})},
        "spec": {"containers": [container], "terminationGracePeriodSeconds": 1, **spec},
    }


def create(cluster: DevCluster, namespace: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def pod(cluster: DevCluster, namespace: str, name: str) -> dict[str, Any]:
    return cluster.rest().get(f"/api/v1/namespaces/{namespace}/pods/{name}")


def wait_running(cluster: DevCluster, namespace: str, name: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        current = pod(cluster, namespace, name)
        conditions = {c["type"]: c["status"] for c in current["status"].get("conditions", [])}
        return current if conditions.get("Ready") == "True" else None

    return wait_for(ready, timeout=POD_TIMEOUT, what=f"pod {namespace}/{name} ready")  # type: ignore[return-value]


def wait_terminated(cluster: DevCluster, namespace: str, name: str) -> dict[str, Any]:
    def terminated() -> dict[str, Any] | None:
        statuses = pod(cluster, namespace, name)["status"].get("containerStatuses") or []
        return statuses[0]["state"].get("terminated") if statuses else None

    return wait_for(terminated, timeout=POD_TIMEOUT, what=f"pod {namespace}/{name} ended")  # type: ignore[return-value]


def exec_in(cluster: DevCluster, namespace: str, name: str, *argv: str) -> str:
    return cluster.kubectl("exec", "-n", namespace, name, "--", *argv).stdout


def bridge_ports() -> list[str]:
    links = subprocess.run(
        ["ip", "-o", "link", "show", "master", realnode.BRIDGE], capture_output=True, text=True
    ).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()]


NOTHING_LEFT: dict[str, list] = {
    "interfaces": [],
    "iptables": [],
    "mounts": [],
    "shims": [],
    "cgroups": [],
    "runtime files": [],
}


def leftovers(state_dir: Path, interfaces: list[str]) -> dict[str, list]:
    """What a stopped real node could leave on the machine (`interfaces`: its pods')."""
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()]
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    mounts = Path("/proc/mounts").read_text()
    return {
        "interfaces": [name for name in names if name in (realnode.BRIDGE, *interfaces)],
        "iptables": [
            line
            for line in rules.splitlines()
            if line.startswith(":KUBE-") or line.startswith(f":{realnode.FORWARD_CHAIN}")
        ],
        "mounts": [line for line in mounts.splitlines() if str(state_dir) in line],
        "shims": realnode.shim_pids(realnode.NodePaths(state_dir / "node")),
        "cgroups": [str(p) for p in Path("/sys/fs/cgroup").glob("*/kubepods")],
        "runtime files": [
            *(p.name for p in realnode.SHIM_SOCKET_DIR.glob("*")),
            *(p.name for p in realnode.CNI_CACHE_DIR.glob(f"{realnode.CNI_NETWORK}-*")),
            *(p.name for p in realnode.DEVICE_PLUGIN_DIR.glob("kubelet*")),
        ],
    }


# ---- the node -------------------------------------------------------------------------------


def test_node_is_ready_with_containerd_and_real_capacity(real_cluster: DevCluster) -> None:
    wide = real_cluster.kubectl("get", "node", "-o", "wide").stdout
    print(wide)
    row = wide.splitlines()[1].split()
    assert row[0] == real_cluster.node.name and row[1] == "Ready"
    assert f"containerd://{CONTAINERD_VERSION.lstrip('v')}" in wide
    assert realnode.GATEWAY in row  # INTERNAL-IP: the bridge's gateway
    node = real_cluster.rest().get(f"/api/v1/nodes/{real_cluster.node.name}")
    capacity = node["status"]["capacity"]
    assert capacity["cpu"] == str(os.cpu_count())  # the machine's, not NodeConfig.cpu
    memory_kib = int(capacity["memory"].removesuffix("Ki"))
    assert memory_kib * 1024 == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_pod_traffic_cannot_leave_the_machine(real_cluster: DevCluster) -> None:
    """The network rule, checked on the node's configuration (never by sending)."""

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True)

    # Anything from the pod range that would leave through another interface is dropped.
    assert run("iptables", "-C", "FORWARD", "-j", realnode.FORWARD_CHAIN).returncode == 0
    drop = ("-s", realnode.POD_CIDR, "!", "-o", realnode.BRIDGE, "-j", "DROP")
    assert run("iptables", "-C", realnode.FORWARD_CHAIN, *drop).returncode == 0
    # No masquerading by the CNI plugin; an unknown ClusterIP goes to the bridge.
    conflist = json.loads(
        (real_cluster.node_paths.cni_conf_dir / "10-kubetune.conflist").read_text()
    )
    assert conflist["plugins"][0]["ipMasq"] is False
    route = run("ip", "route", "get", "10.0.0.250").stdout
    assert f"dev {realnode.BRIDGE}" in route
    # CoreDNS is linked and configured without an upstream.
    corefile = real_cluster.rest().get("/api/v1/namespaces/kube-system/configmaps/coredns")
    assert "forward" not in corefile["data"]["Corefile"]


def test_gpus_are_advertised_and_a_pod_asking_for_one_is_admitted(
    real_cluster: DevCluster, namespace: str
) -> None:
    node = real_cluster.rest().get(f"/api/v1/nodes/{real_cluster.node.name}")
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "2"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "2"
    gpu = {"resources": {"limits": {"nvidia.com/gpu": "1"}}}
    create(real_cluster, namespace, pod_manifest("gpu", ["sleep", "300"], container=gpu))
    running = wait_running(real_cluster, namespace, "gpu")
    assert running["spec"]["nodeName"] == real_cluster.node.name
    three = {"resources": {"limits": {"nvidia.com/gpu": "3"}}}
    create(real_cluster, namespace, pod_manifest("too-many", ["id"], container=three))
    wait_for(
        lambda: any(
            c["reason"] == "Unschedulable"
            for c in pod(real_cluster, namespace, "too-many")["status"].get("conditions", [])
        ),
        timeout=30,
        what="a pod asking for 3 of 2 GPUs unschedulable",
    )


# ---- pods -----------------------------------------------------------------------------------


def test_pod_from_an_imported_archive_has_its_own_ip_logs_and_exec(
    real_cluster: DevCluster, namespace: str, tmp_path: Path
) -> None:
    # An archive made here, under a name the node has never seen, loaded as a user would.
    name = f"localhost/kubetune/imported:{uuid.uuid4().hex[:6]}"
    archive = tmp_path / "imported.oci.tar"
    testbox = image_program("testbox")
    subprocess.run(
        [
            sys.executable,
            str(MODULES_DIR / "images" / "oci_archive.py"),
            f"--name={name}",
            f"--out={archive}",
            f"--file={testbox}:/testbox:0755",
            "--entrypoint=/testbox",
            "--user=65532:65532",
        ],
        check=True,
    )
    assert real_cluster.load_image(archive) == [name]
    manifest = pod_manifest("web", ["serve", "8080"])
    manifest["spec"]["containers"][0]["image"] = name
    create(real_cluster, namespace, manifest)
    running = wait_running(real_cluster, namespace, "web")
    pod_ip = ipaddress.ip_address(running["status"]["podIP"])
    assert pod_ip in ipaddress.ip_network(realnode.POD_CIDR)
    assert str(pod_ip) != realnode.GATEWAY
    assert "serving on :8080" in real_cluster.kubectl("logs", "-n", namespace, "web").stdout
    # The image's user (65532:65532) runs it; its group does not: the kubelet passes the
    # numeric user on and the runtime finds no /etc/passwd entry for a group, so 0.
    assert exec_in(real_cluster, namespace, "web", "/testbox", "id") == "uid=65532 gid=0\n"
    # Its process, as the host sees it: the image's program, in its own PID namespace.
    (pid,) = real_cluster.pod_pids(namespace, "web")
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"/testbox", b"serve"]
    assert os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    # The pod's own network namespace: it reaches itself on its IP.
    body = exec_in(real_cluster, namespace, "web", "/testbox", "get", f"http://{pod_ip}:8080/me")
    assert body == "web /me\n"


def test_runtime_enforces_read_only_root_and_user_ids(
    real_cluster: DevCluster, namespace: str
) -> None:
    restricted = {
        "securityContext": {
            "runAsUser": 1234,
            "runAsGroup": 5678,
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
    }
    spec = {
        "restartPolicy": "Never",
        "volumes": [{"name": "scratch", "emptyDir": {}}],
        "container": restricted,
    }
    create(real_cluster, namespace, pod_manifest("ro", ["write", "/etc/x", "no"], **spec))
    ended = wait_terminated(real_cluster, namespace, "ro")
    assert ended["exitCode"] == 1
    assert "read-only file system" in real_cluster.read_pod_logs(namespace, "ro")

    spec["restartPolicy"] = "Always"
    create(real_cluster, namespace, pod_manifest("rw", ["sleep", "300"], **spec))
    wait_running(real_cluster, namespace, "rw")
    assert exec_in(real_cluster, namespace, "rw", "/testbox", "id") == "uid=1234 gid=5678\n"
    exec_in(real_cluster, namespace, "rw", "/testbox", "write", "/scratch/x", "yes")
    assert exec_in(real_cluster, namespace, "rw", "/testbox", "cat", "/scratch/x") == "yes"

    # runAsNonRoot with a root user: the kubelet refuses to start the container.
    root = {"securityContext": {"runAsUser": 0, "runAsNonRoot": True}}
    create(real_cluster, namespace, pod_manifest("root", ["id"], container=root))

    def refused() -> str | None:
        statuses = pod(real_cluster, namespace, "root")["status"].get("containerStatuses") or []
        waiting = statuses[0]["state"].get("waiting") if statuses else None
        return waiting["message"] if waiting and "non-root" in waiting.get("message", "") else None

    wait_for(refused, timeout=POD_TIMEOUT, what="runAsNonRoot refusal")


def test_memory_limit_is_enforced_as_oom_kill(real_cluster: DevCluster, namespace: str) -> None:
    limits = {"resources": {"limits": {"memory": "32Mi"}}}
    manifest = pod_manifest("hog", ["alloc", "256"], container=limits, restartPolicy="Never")
    create(real_cluster, namespace, manifest)
    ended = wait_terminated(real_cluster, namespace, "hog")
    assert (ended["reason"], ended["exitCode"]) == ("OOMKilled", 137)


# ---- Services, DNS, reaching the host ---------------------------------------------------------


def test_cluster_ip_and_headless_services_resolve_and_route(
    real_cluster: DevCluster, namespace: str
) -> None:
    labels = {"app": "echo"}
    create(real_cluster, namespace, pod_manifest("echo", ["serve", "8080"], labels=labels))
    for service_name, cluster_ip in (("echo", {}), ("echo-headless", {"clusterIP": "None"})):
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": service_name},
            "spec": {
                "selector": labels,
                "ports": [{"port": 80, "targetPort": 8080}],
                **cluster_ip,
            },
        }
        create(real_cluster, namespace, service)
    echo = wait_running(real_cluster, namespace, "echo")
    create(real_cluster, namespace, pod_manifest("client", ["sleep", "300"]))
    wait_running(real_cluster, namespace, "client")
    cluster_ip = real_cluster.rest().get(f"/api/v1/namespaces/{namespace}/services/echo")["spec"][
        "clusterIP"
    ]
    fqdn = f"echo.{namespace}.svc.cluster.local"

    def lookup(name: str) -> list[str]:
        return exec_in(real_cluster, namespace, "client", "/testbox", "lookup", name).split()

    assert wait_for(lambda: lookup(fqdn) == [cluster_ip], timeout=30, what=f"{fqdn} resolves")
    assert lookup("echo") == [cluster_ip]  # the pod's search path
    headless = f"echo-headless.{namespace}.svc.cluster.local"
    assert wait_for(
        lambda: lookup(headless) == [echo["status"]["podIP"]], timeout=30, what=headless
    )
    body = exec_in(real_cluster, namespace, "client", "/testbox", "get", "http://echo/hi")
    assert body == "echo /hi\n"
    body = exec_in(real_cluster, namespace, "client", "/testbox", "get", f"http://{headless}:8080/")
    assert body == "echo /\n"
    # Names outside the cluster are not forwarded anywhere.
    result = real_cluster.kubectl(
        "exec", "-n", namespace, "client", "--", "/testbox", "lookup", "example.com", check=False
    )
    assert result.returncode != 0


def test_pods_reach_the_api_server_and_the_host_address(
    real_cluster: DevCluster, namespace: str
) -> None:
    class Hello(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello from the host\n")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((real_cluster.host_address, 0), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        create(real_cluster, namespace, pod_manifest("caller", ["sleep", "300"]))
        wait_running(real_cluster, namespace, "caller")
        url = f"http://{real_cluster.host_address}:{server.server_address[1]}/"
        assert exec_in(real_cluster, namespace, "caller", "/testbox", "get", url) == (
            "hello from the host\n"
        )
        # The `kubernetes` Service routes to the API server.
        assert "connected" in exec_in(
            real_cluster, namespace, "caller", "/testbox", "dial", "kubernetes.default:443"
        )
    finally:
        server.shutdown()
        server.server_close()


# ---- stopping -----------------------------------------------------------------------------------


def test_stopping_leaves_nothing_behind(real_cluster: DevCluster, namespace: str) -> None:
    create(real_cluster, namespace, pod_manifest("left", ["sleep", "300"]))
    wait_running(real_cluster, namespace, "left")
    assert realnode.shim_pids(real_cluster.node_paths)  # something to clean up
    pod_interfaces = bridge_ports()
    assert pod_interfaces
    real_cluster.stop()
    assert not real_cluster.alive_processes()
    assert leftovers(real_cluster.state_dir, pod_interfaces) == NOTHING_LEFT


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A state-dir parent as short as a test cluster's: pytest's tmp_path can be too deep for
    containerd's socket paths (realnode.check_socket_path)."""
    path = Path(tempfile.mkdtemp(prefix=f"{STATE_DIR_PREFIX}dev-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_state_dir_too_deep_for_containerd_is_refused_before_anything_starts() -> None:
    deep = realnode.NodePaths(Path("/tmp") / ("d" * 80) / "node")
    with pytest.raises(ValueError, match=r"state dir too deep .* \(at most 104\); use a short"):
        realnode.check_socket_path(deep)
    realnode.check_socket_path(realnode.NodePaths(Path("/tmp/kubetune-cluster-abc/node")))


def test_dev_up_status_load_image_down_and_up_again(
    real_cluster: DevCluster, tmp_path: Path, short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After the module's cluster is gone: the command drives a second one, twice."""
    state_dir = short_dir / "dev"
    base = ["dev", "--state-dir", str(state_dir)]
    for lose_state in (False, True):
        try:
            assert cli.main([*base, "up", "--runtime", "containerd", "--gpus", "1"]) == 0
            assert cli.main([*base, "status"]) == 0
            assert "(containerd)" in capsys.readouterr().out
            assert cli.main([*base, "load-image", str(image_archive("pause"))]) == 0
            assert cli.main([*base, "load-image", str(tmp_path / "missing.tar")]) == 1
            if lose_state:  # as after an `up` killed half way: no process records
                (state_dir / "state.json").unlink()
        finally:
            assert cli.main([*base, "down"]) == 0
        assert not realnode.pids_naming(state_dir)
        assert leftovers(state_dir, []) == NOTHING_LEFT


def test_a_live_node_refuses_a_second_and_a_lost_one_is_removed_by_the_next(
    real_cluster: DevCluster, short_dir: Path
) -> None:
    """A node whose processes were killed without a teardown (its CI job was) leaves its
    bridge, mounts, rules and running containers; the next start removes them. A node
    that still runs is never touched: the start is refused, naming its state dir."""
    lost_dir, next_dir = short_dir / "lost", short_dir / "next"
    assert cli.main(["dev", "--state-dir", str(lost_dir), "up", "--runtime", "containerd"]) == 0
    lost = realnode.NodePaths(lost_dir.resolve() / "node")
    assert realnode.bridge_owner() == (os.getpid(), lost)
    with pytest.raises(RuntimeError, match=f"another real-node dev cluster runs.*{lost_dir}"):
        DevCluster.start(next_dir, node=NodeConfig(runtime="containerd"))
    assert not next_dir.exists()  # refused before anything was made
    tasks = realnode.ctr(lost, "tasks", "ls").stdout.splitlines()[1:]
    containers = [int(line.split()[1]) for line in tasks]
    assert containers  # CoreDNS runs: its containers will outlive the node
    for pid in realnode.node_processes(lost):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not realnode.node_processes(lost), timeout=30, what="the node killed")
    assert leftovers(lost_dir, [])["mounts"]  # nothing was torn down
    with running_cluster("kubetune-realnode-next-", NodeConfig(runtime="containerd")) as cluster:
        assert realnode.bridge_owner() == (os.getpid(), cluster.node_paths)
        assert not realnode.pids_naming(lost_dir.resolve())
        assert not [pid for pid in containers if Path(f"/proc/{pid}").exists()]
        assert leftovers(lost_dir, [])["mounts"] == []
    assert leftovers(lost_dir, []) == NOTHING_LEFT
