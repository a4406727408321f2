"""The real node: containerd 2.x with runc and the CNI bridge plugin, kubelet and
kube-proxy (iptables mode), and CoreDNS as a Deployment behind the cluster DNS Service.
Driven by DevCluster (`NodeConfig(runtime="containerd")`); see docs/local-node.md.

Everything it makes lives under `<state-dir>/node/` (containerd's root and state, the
kubelet's root dir, pod logs, CNI config and IP allocations, network namespaces) except
what cannot: the bridge, the iptables rules, the cgroups, sysctls, and a few files at
paths fixed in containerd's shims, CNI and the kubelet. `teardown` removes all of it,
from another process too (`kubetune dev down`): what it must undo is recorded in
`<state-dir>/node/network.json`.

Network rule: traffic stays on this machine. Pods live on a bridge whose gateway address
is the host's; the API server listens there too, so pods reach it through the
`kubernetes` Service. Pod traffic is never masqueraded to the outside, a FORWARD rule
drops anything from the pod range that would leave through another interface, CoreDNS
forwards nothing, and the Service range is routed onto the bridge so an unknown
ClusterIP never goes to the default gateway.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import string
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetune_devcluster.binaries import find_binary, image_archive, image_ref
from kubetune_devcluster.processes import wait_for
from kubetune_devcluster.rest import MERGE, ApiError, KubeRest

BRIDGE = "ktune0"
POD_CIDR = "10.244.0.0/24"
GATEWAY = "10.244.0.1"  # the bridge's address: the host as pods see it
SERVICE_CIDR = "10.0.0.0/24"
DNS_SERVICE_IP = "10.0.0.10"
CLUSTER_DOMAIN = "cluster.local"
CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
CNI_NETWORK = "kubetune"
# Fixed paths outside the state dir (shim sockets, CNI's result cache): see
# remove_runtime_files.
SHIM_SOCKET_DIR = Path("/run/containerd/s")
CNI_CACHE_DIR = Path("/var/lib/cni/results")
DEVICE_PLUGIN_DIR = Path("/var/lib/kubelet/device-plugins")  # fixed in the kubelet
FORWARD_CHAIN = "KUBETUNE-FORWARD"
BRIDGE_ALIAS_TAG = "kubetune-dev"  # the bridge's alias names the node that made it
IFALIAS_MAX = 255  # the kernel's limit on an interface alias
# Set for the node's life, restored on teardown: forwarding between the bridge and the
# host (Services), and netfilter on bridged traffic (a reply from a Service's pod to a
# pod on the same bridge must be un-NATed).
SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    "net/bridge/bridge-nf-call-iptables": "1",
}
# The kubelet sets these machine-wide (vm.overcommit_memory=1, kernel.panic=10, ...);
# their values before it ran are restored on teardown.
KUBELET_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
COREDNS_PORT = 1053  # unprivileged: CoreDNS runs as a non-root user
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class NodePaths:
    """Where the real node keeps things, all under `<state-dir>/node`."""

    root: Path

    @property
    def containerd(self) -> Path:
        return self.root / "containerd"

    @property
    def containerd_root(self) -> Path:
        return self.containerd / "root"

    @property
    def socket(self) -> Path:
        return self.containerd / "containerd.sock"

    @property
    def runc_root(self) -> Path:
        return self.root / "runc"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def cni_ipam_dir(self) -> Path:
        return self.root / "cni" / "ipam"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def pod_logs(self) -> Path:
        return self.root / "pod-logs"

    @property
    def network_record(self) -> Path:
        return self.root / "network.json"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name


# ---- the network: bridge, routes, forwarding rule, sysctls --------------------------------


# containerd refuses a unix socket path longer than this (Go's portable limit), and its
# longest is the ttrpc socket next to the main one.
MAX_SOCKET_PATH = 104


def check_socket_path(paths: NodePaths) -> None:
    """Refuse a state dir so deep that containerd could not create its sockets in it."""
    longest = f"{paths.socket}.ttrpc"
    if len(longest) > MAX_SOCKET_PATH:
        raise ValueError(
            f"state dir too deep for containerd's sockets: {longest} is {len(longest)} "
            f"characters (at most {MAX_SOCKET_PATH}); use a shorter --state-dir"
        )


def check_can_run() -> None:
    """Refuse early, with the reason, where the real node cannot run. A bridge left by
    a node whose processes are all gone (its owner was killed, e.g. with its CI job) is
    not a reason: what that node left is removed first."""
    if os.geteuid() != 0:
        raise PermissionError("the real node needs root (network, mounts, cgroups)")
    if _run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        return
    owner = bridge_owner()
    if owner is None:
        raise RuntimeError(
            f"bridge {BRIDGE} exists and names no dev cluster; remove it with "
            f"`ip link del {BRIDGE}` if nothing uses it"
        )
    pid, paths = owner
    state_dir = paths.root.parent
    if _another_process_alive(pid) or node_processes(paths):
        raise RuntimeError(
            f"another real-node dev cluster runs on this machine (state dir {state_dir}); "
            f"stop it with `kubetune dev down --state-dir {state_dir}` first"
        )
    print(
        f"removing what a lost real-node dev cluster left (state dir {state_dir})", file=sys.stderr
    )
    remove_node(paths)


def bridge_owner() -> tuple[int, NodePaths] | None:
    """The process that made the bridge and its node's paths, from the bridge's alias
    (so the record goes when the bridge goes)."""
    shown = _run("ip", "-j", "link", "show", BRIDGE, check=False)
    if shown.returncode != 0:
        return None
    alias = (json.loads(shown.stdout)[0].get("ifalias") or "").split(" ", 2)
    if len(alias) != 3 or alias[0] != BRIDGE_ALIAS_TAG or not alias[1].startswith("pid="):
        return None
    return int(alias[1].removeprefix("pid=")), NodePaths(Path(alias[2].removeprefix("node=")))


def node_processes(paths: NodePaths) -> list[int]:
    """The node's and its control plane's processes (they all name files in the state
    dir), not its shims, which outlive a killed containerd."""
    shims = set(shim_pids(paths))
    return [pid for pid in pids_naming(paths.root.parent) if pid not in shims]


def _another_process_alive(pid: int) -> bool:
    """Whether `pid` runs and is not this process (a node this process made, whose
    processes are all gone, was lost all the same)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def create_network(paths: NodePaths) -> None:
    """The bridge pods attach to (the CNI bridge plugin reuses it), with the gateway
    address the API server also listens on."""
    record: dict[str, Any] = {"bridge": BRIDGE, "sysctls": {}}
    paths.root.mkdir(parents=True, exist_ok=True)
    for name in (*SYSCTLS, *KUBELET_SYSCTLS):
        record["sysctls"][name] = _sysctl_path(name).read_text().strip()
    paths.network_record.write_text(json.dumps(record))
    for name, value in SYSCTLS.items():
        _sysctl_path(name).write_text(value)
    _run("ip", "link", "add", BRIDGE, "type", "bridge")
    alias = f"{BRIDGE_ALIAS_TAG} pid={os.getpid()} node={paths.root.resolve()}"
    if len(alias.encode()) <= IFALIAS_MAX:  # else no owner: a later start refuses
        _run("ip", "link", "set", BRIDGE, "alias", alias)
    _run("ip", "addr", "add", f"{GATEWAY}/{POD_CIDR.split('/')[1]}", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    _run("ip", "route", "add", SERVICE_CIDR, "dev", BRIDGE)
    _run("iptables", "-w", "-N", FORWARD_CHAIN)
    _run("iptables", "-w", "-A", FORWARD_CHAIN, "-s", POD_CIDR, "!", "-o", BRIDGE, "-j", "DROP")
    _run("iptables", "-w", "-I", "FORWARD", "1", "-j", FORWARD_CHAIN)


def remove_network(paths: NodePaths) -> None:
    """Undo create_network (and whatever pods left on the bridge); idempotent."""
    for line in _run("ip", "-o", "link", "show", "master", BRIDGE, check=False).stdout.splitlines():
        port = line.split(":")[1].strip().split("@")[0]
        _run("ip", "link", "del", port, check=False)
    _run("ip", "link", "del", BRIDGE, check=False)
    while _run("iptables", "-w", "-D", "FORWARD", "-j", FORWARD_CHAIN, check=False).returncode == 0:
        pass
    _run("iptables", "-w", "-F", FORWARD_CHAIN, check=False)
    _run("iptables", "-w", "-X", FORWARD_CHAIN, check=False)
    if paths.network_record.exists():
        record = json.loads(paths.network_record.read_text())
        for name, value in record.get("sysctls", {}).items():
            with contextlib.suppress(OSError):
                _sysctl_path(name).write_text(value)
        paths.network_record.unlink()


def write_cni_config(paths: NodePaths) -> None:
    """One bridge network with host-local IPAM; no masquerading (ipMasq false)."""
    paths.cni_conf_dir.mkdir(parents=True, exist_ok=True)
    conflist = {
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(paths.cni_ipam_dir),
                },
            }
        ],
    }
    (paths.cni_conf_dir / "10-kubetune.conflist").write_text(json.dumps(conflist, indent=2))


# ---- containerd -----------------------------------------------------------------------------


def containerd_config(paths: NodePaths, root: Path | None = None) -> str:
    """containerd's config (version 4): everything under the state dir (its root there
    too unless given), cgroupfs, the local pause image, Debian's runc and CNI plugins."""
    runc = shutil.which("runc", path=SYSTEM_PATH) or "/usr/sbin/runc"  # Debian's
    return f"""version = 4
root = "{root or paths.containerd_root}"
state = "{paths.containerd / "state"}"
temp = "{paths.containerd / "tmp"}"
imports = []
disabled_plugins = [
  "io.containerd.nri.v1.nri",
  "io.containerd.internal.v1.tracing",
  "io.containerd.image-verifier.v1.bindir",
]

[plugins."io.containerd.server.v1.grpc"]
  address = "{paths.socket}"

[plugins."io.containerd.server.v1.ttrpc"]
  address = "{paths.socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{paths.containerd / "opt"}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{image_ref("pause")}"

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  # This machine refuses a negative oom_score_adj (EIO), which the kubelet asks for
  # sandboxes (-998) and Guaranteed pods (-997): clamp to containerd's own (0).
  restrict_oom_score_adj = true
  cdi_spec_dirs = []
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{paths.runc_root}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{paths.cni_conf_dir}"

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def containerd_argv(
    paths: NodePaths, root: Path | None = None, config: Path | None = None
) -> list[str]:
    config = config or paths.containerd / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(containerd_config(paths, root))
    return [str(_binary("containerd")), f"--config={config}", "--log-level=warn"]


def containerd_env() -> dict[str, str]:
    """containerd finds its shim on PATH: its own build dir first."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET",)}
    env["PATH"] = f"{_binary('containerd').parent}:{SYSTEM_PATH}"
    return env


def ctr(paths: NodePaths, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(_binary("ctr")), f"--address={paths.socket}", "--namespace=k8s.io", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"ctr {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def image_digests(paths: NodePaths) -> dict[str, str]:
    """Image name -> manifest digest, as the runtime's k8s.io namespace has them."""
    listing = ctr(paths, "images", "ls").stdout.splitlines()[1:]
    return {cols[0]: cols[2] for cols in (line.split() for line in listing) if len(cols) > 2}


def containerd_ready(paths: NodePaths) -> bool:
    return paths.socket.exists() and bool(ctr(paths, "version", timeout=10).stdout)


def import_image(paths: NodePaths, archive: Path) -> list[str]:
    """Import an OCI (or docker) archive into the runtime's k8s.io namespace, where
    kubelet sees it; returns the image names it carried."""
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: no such image archive")
    before = set(ctr(paths, "images", "ls", "-q").stdout.split())
    ctr(paths, "images", "import", str(archive), timeout=600)
    after = ctr(paths, "images", "ls", "-q").stdout.split()
    return [name for name in after if name not in before and not name.startswith("sha256:")]


# ---- kubelet and kube-proxy -----------------------------------------------------------------


def kubelet_config(
    paths: NodePaths,
    *,
    port: int,
    healthz_port: int,
    max_pods: int,
    ca_file: Path,
    cert_file: Path,
    key_file: Path,
) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": GATEWAY,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        # `kubectl logs/exec` reach the kubelet through the API server, which the kubelet
        # authenticates (client certificate) and authorizes (SubjectAccessReview).
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca_file)},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(cert_file),
        "tlsPrivateKeyFile": str(key_file),
        "containerRuntimeEndpoint": f"unix://{paths.socket}",
        "imageServiceEndpoint": f"unix://{paths.socket}",
        # This machine: cgroup v1 without systemd, no swap accounting.
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "clusterDNS": [DNS_SERVICE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        # No host nameservers or search domains in pods: DNS stays in the cluster.
        "resolvConf": str(paths.root / "resolv.conf"),
        "podLogsDir": str(paths.pod_logs),
        "volumePluginDir": str(paths.root / "volume-plugins"),
        "maxPods": max_pods,
        "podCIDR": POD_CIDR,
        "serializeImagePulls": False,
        # A shared development disk: never evict pods or collect the local images.
        "evictionHard": {
            "memory.available": "50Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "nodeStatusReportFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
    }


def kubelet_argv(
    paths: NodePaths, *, kubeconfig: Path, node_name: str, labels: dict[str, str], config: dict
) -> list[str]:
    config_path = paths.root / "kubelet-config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    (paths.root / "resolv.conf").write_text("")
    argv = [
        str(_binary("kubelet")),
        f"--config={config_path}",
        f"--kubeconfig={kubeconfig}",
        f"--root-dir={paths.kubelet_root}",
        f"--cert-dir={paths.root / 'kubelet-pki'}",
        f"--node-ip={GATEWAY}",
        f"--hostname-override={node_name}",
        "--v=1",
    ]
    if labels:
        argv.append("--node-labels=" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())))
    return argv


def kube_proxy_argv(
    paths: NodePaths, *, kubeconfig: Path, node_name: str, healthz_port: int, metrics_port: int
) -> list[str]:
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": node_name,
        "clusterCIDR": POD_CIDR,
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        # NodePorts only on the bridge, never on the machine's own interfaces.
        "nodePortAddresses": [POD_CIDR],
        "iptables": {"localhostNodePorts": False},
        # Leave the machine's conntrack limits alone.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }
    config_path = paths.root / "kube-proxy-config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return [str(_binary("kube-proxy")), f"--config={config_path}", "--v=1"]


def cleanup_kube_rules() -> None:
    """kube-proxy's own cleanup of its rules, then what it leaves and the kubelet made
    (KUBE-FIREWALL, KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT), IPv4 and IPv6."""
    kube_proxy = find_binary("kube-proxy")
    if kube_proxy is not None:
        subprocess.run(
            [str(kube_proxy), "--cleanup", "--v=0"], capture_output=True, timeout=60, check=False
        )
    for tool in ("iptables", "ip6tables"):
        remove_chains(tool, "KUBE-")


def remove_chains(tool: str, prefix: str) -> None:
    """Delete the rules that jump to chains named `prefix*`, then those chains."""
    dump = _run(f"{tool}-save", check=False).stdout
    tables = [line[1:] for line in dump.splitlines() if line.startswith("*")]
    for table in tables:
        lines = _table_lines(dump, table)
        ours = [c[1:].split()[0] for c in lines if c.startswith(f":{prefix}")]
        for rule in (line for line in lines if line.startswith("-A ")):
            words = shlex.split(rule)
            target = words[words.index("-j") + 1] if "-j" in words else None
            if words[1] not in ours and target in ours:
                _run(tool, "-w", "-t", table, "-D", *words[1:], check=False)
        for chain in ours:
            _run(tool, "-w", "-t", table, "-F", chain, check=False)
        for chain in ours:
            _run(tool, "-w", "-t", table, "-X", chain, check=False)


def _table_lines(dump: str, table: str) -> list[str]:
    lines, inside = [], False
    for line in dump.splitlines():
        if line.startswith("*"):
            inside = line[1:] == table
        elif inside:
            lines.append(line)
    return lines


# ---- on the API: extended resources, CoreDNS ------------------------------------------------


def advertise_gpus(api: KubeRest, node_name: str, gpus: int) -> None:
    """Offer `nvidia.com/gpu` as an extended resource (no device plugin: a count only).
    Allocatable too: the kubelet would copy it from capacity only at its next status
    update, and until then the scheduler would see no GPU."""
    count = {"nvidia.com/gpu": str(gpus)}
    patch = {"status": {"capacity": count, "allocatable": count}}
    api.patch(f"/api/v1/nodes/{node_name}/status", patch, MERGE)


COLLECTIONS = {
    "ServiceAccount": "/api/v1/namespaces/{namespace}/serviceaccounts",
    "ConfigMap": "/api/v1/namespaces/{namespace}/configmaps",
    "Service": "/api/v1/namespaces/{namespace}/services",
    "Deployment": "/apis/apps/v1/namespaces/{namespace}/deployments",
    "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
}


def coredns_objects() -> list[dict]:
    """The cluster DNS (coredns.yaml beside this file): RBAC, Corefile, Deployment, Service."""
    template = string.Template((Path(__file__).parent / "coredns.yaml").read_text())
    text = template.substitute(
        image=image_ref("coredns"),
        port=COREDNS_PORT,
        dns_ip=DNS_SERVICE_IP,
        domain=CLUSTER_DOMAIN,
    )
    return [obj for obj in yaml.safe_load_all(text) if obj]


def deploy_coredns(api: KubeRest) -> None:
    for obj in coredns_objects():
        namespace = obj["metadata"].get("namespace", "")
        try:
            api.post(COLLECTIONS[obj["kind"]].format(namespace=namespace), obj)
        except ApiError as exc:
            if exc.status != 409:  # already there (a restarted node)
                raise


def coredns_ready(api: KubeRest) -> bool:
    deployment = api.get("/apis/apps/v1/namespaces/kube-system/deployments/coredns")
    return (deployment.get("status") or {}).get("readyReplicas", 0) >= 1


# ---- teardown -------------------------------------------------------------------------------


def kill_containers(paths: NodePaths) -> None:
    """SIGKILL every container process and the shims of this node's containerd (shims
    daemonize, so stopping containerd's process group does not reach them)."""
    shims = shim_pids(paths)
    children = _children_by_parent()
    victims: list[int] = []
    pending = list(shims)
    while pending:
        pid = pending.pop()
        for child in children.get(pid, []):
            victims.append(child)
            pending.append(child)
    for pid in [*victims, *shims]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not shim_pids(paths), timeout=10, interval=0.1, what="shims gone")


def shim_pids(paths: NodePaths) -> list[int]:
    """This node's shims: their command line names its containerd socket."""
    return pids_naming(paths.root, also=b"containerd-shim")


def kill_processes_naming(directory: Path) -> None:
    """SIGKILL every process whose command line names a path under `directory`: for a
    cluster whose process records are lost (etcd, the API server, containerd, kubelet
    and the rest all name files in the state dir)."""
    for pid in pids_naming(directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def pids_naming(directory: Path, also: bytes = b"") -> list[int]:
    pids = []
    marker = f"{directory}/".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline and also in cmdline:
            pids.append(int(entry.name))
    return pids


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def unmount_under(directory: Path) -> None:
    """Detach every mount at or below `directory`, deepest first (overlays, volume
    tmpfs, network namespaces, bind mounts)."""
    prefix = str(directory.resolve())
    for _ in range(5):  # a detach can reveal a mount stacked below it
        targets = [m for m in mount_points() if m == prefix or m.startswith(prefix + "/")]
        if not targets:
            return
        for target in sorted(targets, key=lambda m: m.count("/"), reverse=True):
            _run("umount", "-l", target, check=False)


def mount_points() -> list[str]:
    points = []
    for line in Path("/proc/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        points.append(target)
    return points


def remove_pod_cgroups() -> None:
    """The kubelet's cgroup tree (cgroup v1: one per controller), deepest first."""
    for controller in Path("/sys/fs/cgroup").iterdir():
        top = controller / "kubepods"
        if not top.is_dir():
            continue
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts))
        for directory in [*reversed(dirs), top]:
            with contextlib.suppress(OSError):
                directory.rmdir()


def remove_kubelet_files(paths: NodePaths) -> None:
    """What the kubelet keeps at fixed paths whatever its root dir: links to container
    logs in /var/log/containers and the device-plugin socket and checkpoint in
    /var/lib/kubelet/device-plugins. The directories go too when nothing else is left
    in them."""
    links = Path("/var/log/containers")
    if links.is_dir():
        for link in links.iterdir():
            with contextlib.suppress(OSError):
                if link.is_symlink() and os.readlink(link).startswith(str(paths.pod_logs)):
                    link.unlink()
    for name in ("kubelet.sock", "kubelet_internal_checkpoint"):
        (DEVICE_PLUGIN_DIR / name).unlink(missing_ok=True)
    for directory in (links, DEVICE_PLUGIN_DIR, DEVICE_PLUGIN_DIR.parent):
        with contextlib.suppress(OSError):
            directory.rmdir()


def remove_runtime_files(paths: NodePaths) -> None:
    """Files containerd's shims and CNI keep outside the state dir, at fixed paths: the
    shims' sockets (/run/containerd/s/<sha256 of socket/namespace/id>) and CNI's cached
    results (/var/lib/cni/results/<network>-<sandbox id>-<interface>), normally removed
    when a pod stops cleanly, which a teardown's SIGKILL skips."""
    tasks = paths.containerd / "state" / "io.containerd.runtime.v2.task" / "k8s.io"
    sandboxes = paths.containerd_root / "io.containerd.grpc.v1.cri" / "sandboxes"
    ids: set[str] = set()
    for parent in (tasks, sandboxes):
        if parent.is_dir():
            ids.update(entry.name for entry in parent.iterdir())
    for task_id in ids:
        for suffix in ("", "/debug"):
            digest = hashlib.sha256(f"{paths.socket}/k8s.io/{task_id}{suffix}".encode())
            Path(SHIM_SOCKET_DIR, digest.hexdigest()).unlink(missing_ok=True)
        for network in (CNI_NETWORK, "cni-loopback"):
            for cached in CNI_CACHE_DIR.glob(f"{network}-{task_id}-*"):
                cached.unlink(missing_ok=True)
    for directory in (SHIM_SOCKET_DIR, SHIM_SOCKET_DIR.parent):
        with contextlib.suppress(OSError):  # only if empty: another runtime may use it
            directory.rmdir()


def teardown(paths: NodePaths) -> None:
    """After kubelet, containerd and kube-proxy are stopped: what they leave behind.
    Only for a node that made its network (the record says so): a start refused because
    another real node runs must not tear that one down."""
    unmount_under(paths.root)
    if paths.network_record.exists():
        remove_node(paths)


def remove_node(paths: NodePaths) -> None:
    """Everything a node whose processes are stopped leaves on the machine."""
    kill_containers(paths)
    cleanup_kube_rules()
    unmount_under(paths.root)
    remove_runtime_files(paths)
    remove_network(paths)
    remove_pod_cgroups()
    remove_kubelet_files(paths)


# ---- helpers --------------------------------------------------------------------------------


def _binary(name: str) -> Path:
    path = find_binary(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found: build it with `bash hack/k8s-binaries.sh`")
    return path


NODE_OWN_IMAGES = ("pause", "coredns", "testbox")


def node_image_archives(extra: Sequence[str | Path] = ()) -> list[Path]:
    """The node's own images' archives and the `extra` ones a cluster starts with."""
    return [image_archive(name) for name in NODE_OWN_IMAGES] + [Path(a) for a in extra]


def preload_images(paths: NodePaths, extra: Sequence[str | Path] = ()) -> None:
    """The node's own images (pause, coredns, testbox) and `extra` into the runtime."""
    for archive in node_image_archives(extra):
        import_image(paths, archive)


def pod_container_pids(paths: NodePaths, namespace: str, pod: str) -> list[int]:
    """Host PIDs of the running containers (not the sandbox) of one pod."""
    pids = []
    for line in ctr(paths, "tasks", "ls").stdout.splitlines()[1:]:
        task_id, pid, status = line.split()[:3]
        if status != "RUNNING":
            continue
        info = json.loads(ctr(paths, "containers", "info", task_id).stdout)
        labels = info.get("Labels") or {}
        if (
            labels.get("io.kubernetes.pod.namespace") == namespace
            and labels.get("io.kubernetes.pod.name") == pod
            and labels.get("io.cri-containerd.kind") == "container"
        ):
            pids.append(int(pid))
    return pids
