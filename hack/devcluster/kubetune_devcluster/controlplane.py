"""A real Kubernetes control plane on loopback: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, plus the local node agent.

This is a test and demo device in the spirit of controller-runtime's envtest (which
runs only etcd and the API server): the controller manager runs the Job controller,
the garbage collector and the namespace controller, the scheduler binds pods, and the
local node (kubetune_devcluster.localnode) runs bound pods as host processes.

    cluster = DevCluster.start(state_dir)     # blocks until ready, < 30 s
    cluster.kubectl("get", "nodes")
    cluster.stop()

`state.json` in the state directory records every process (PID and start time) and
port, so a cluster started detached (`kubetune dev up`) can be stopped by another
process (`kubetune dev down`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_devcluster import imagestore, pki, realnode
from kubetune_devcluster.binaries import (
    K8S_VERSION,
    NODE_BINARIES,
    find_binary,
    require_binaries,
)
from kubetune_devcluster.kubeconfig import render_kubeconfig, write_kubeconfig
from kubetune_devcluster.processes import (
    ProcessRecord,
    free_port,
    is_alive,
    port_in_use,
    start_process,
    stop_processes,
    wait_for,
)
from kubetune_devcluster.rest import KubeRest

SERVICE_CIDR = realnode.SERVICE_CIDR
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
DEFAULT_NODE_NAME = "kubetune-local"
STATE_FILE = "state.json"
NODE_RUNTIMES = ("local", "containerd")
# Each on 127.0.0.1, except the API server's and the kubelet's (`node_agent`), which
# are on the bridge's gateway address with the real node.
PORTS = (
    "etcd_client",
    "etcd_peer",
    "apiserver",
    "controller_manager",
    "scheduler",
    "node_agent",
    "kubelet_healthz",
    "proxy_healthz",
    "proxy_metrics",
)


@dataclass
class NodeConfig:
    """The node: which kind, and what it offers the scheduler.

    `runtime`: "local" (kubetune_devcluster.localnode: pods as host processes, offering
    `cpu`, `memory` and `pods` as given) or "containerd" (a real kubelet and container
    runtime: it reports the machine's real CPU and memory, so `cpu` and `memory` are
    ignored). Both advertise `gpus` as `nvidia.com/gpu`.
    """

    name: str = DEFAULT_NODE_NAME
    runtime: str = "local"
    cpu: str = "8"
    memory: str = "32Gi"
    gpus: int = 1
    pods: int = 110
    labels: dict[str, str] = field(default_factory=dict)
    # Image archives a real node starts with, through the image store kept across
    # clusters (kubetune_devcluster.imagestore): linked, not imported, when unchanged.
    images: list[str] = field(default_factory=list)


@dataclass
class DevCluster:
    state_dir: Path
    bin_dir: Path
    kubeconfig: Path
    server: str
    ports: dict[str, int]
    processes: list[ProcessRecord]
    node: NodeConfig
    # Where this machine is reachable from pods (and where tests bind servers that pods
    # must reach): loopback for the local node, the bridge's gateway for the real one.
    host_address: str = "127.0.0.1"
    _popen: dict[int, subprocess.Popen] = field(default_factory=dict, repr=False)

    # ---- starting -------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        state_dir: Path,
        *,
        node: NodeConfig | None = None,
        detached: bool = False,
        ready_timeout: float | None = None,
    ) -> DevCluster:
        """Start everything and wait until pods can run.

        `node.runtime` picks the node: "local" (pods as host processes, ready in
        seconds) or "containerd" (a real kubelet, containerd and kube-proxy; needs root).
        `detached=False` (tests): the processes die with this process (PDEATHSIG) and
        are stopped at interpreter exit and on SIGTERM/SIGHUP too. `detached=True`
        (`kubetune dev up`): they outlive it; stop them with `stop_cluster(state_dir)`.
        """
        binaries = require_binaries()
        node = node or NodeConfig()
        if node.runtime not in NODE_RUNTIMES:
            raise ValueError(f"node runtime {node.runtime!r}: expected one of {NODE_RUNTIMES}")
        if node.runtime == "containerd":
            binaries.update(require_binaries(NODE_BINARIES))
            realnode.check_can_run()
        state_dir = Path(state_dir).resolve()
        if node.runtime == "containerd":
            realnode.check_socket_path(realnode.NodePaths(state_dir / "node"))
        state_dir.mkdir(parents=True, exist_ok=True)
        if (state_dir / STATE_FILE).exists():
            raise RuntimeError(f"{state_dir} already holds a cluster (state.json); stop it first")
        for sub in ("pki", "logs", "etcd", "kubeconfigs", "node"):
            (state_dir / sub).mkdir(exist_ok=True)
        ports = {name: free_port() for name in PORTS}
        host_address = realnode.GATEWAY if node.runtime == "containerd" else "127.0.0.1"
        cluster = cls(
            state_dir=state_dir,
            bin_dir=binaries["kube-apiserver"].parent,
            kubeconfig=state_dir / "kubeconfig",
            server=f"https://{host_address}:{ports['apiserver']}",
            ports=ports,
            processes=[],
            node=node,
            host_address=host_address,
        )
        if not detached:
            _register_cleanup(cluster)
        if ready_timeout is None:
            ready_timeout = 60.0 if node.runtime == "local" else 240.0
        try:
            cluster._start_all(binaries, detached=detached, ready_timeout=ready_timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_all(
        self, binaries: dict[str, Path], *, detached: bool, ready_timeout: float
    ) -> None:
        started = time.monotonic()
        deadline = started + ready_timeout

        def remaining() -> float:
            return max(1.0, deadline - time.monotonic())

        paths = self._write_pki()
        self._save_state()
        if self.real_node:
            # The API server listens on the bridge's gateway address: create it first.
            realnode.create_network(self.node_paths)
        self._start_etcd(binaries, detached=detached, timeout=remaining())
        self._start_apiserver(binaries, paths, detached=detached, timeout=remaining())
        self._start_controllers(binaries, paths, detached=detached)
        if self.real_node:
            self._start_real_node(binaries, paths, detached=detached, timeout=remaining())
        else:
            self._spawn(
                "localnode", self.node_agent_argv(paths), detached=detached, env=node_agent_env()
            )
        self._wait_ready(timeout=remaining())
        if self.real_node:
            self._start_cluster_dns(timeout=remaining())
        self.ready_seconds = round(time.monotonic() - started, 1)
        self._save_state()

    def _start_etcd(self, binaries: dict[str, Path], *, detached: bool, timeout: float) -> None:
        client_url = f"http://127.0.0.1:{self.ports['etcd_client']}"
        peer_url = f"http://127.0.0.1:{self.ports['etcd_peer']}"
        self._spawn(
            "etcd",
            [
                str(binaries["etcd"]),
                "--name=default",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                # A throwaway store: durability buys nothing and fsync costs seconds.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            detached=detached,
        )
        wait_for(
            lambda: _http_ok(f"{client_url}/health"),
            timeout=timeout,
            what="etcd /health",
            interval=0.1,
        )

    def _start_apiserver(
        self,
        binaries: dict[str, Path],
        paths: dict[str, Path],
        *,
        detached: bool,
        timeout: float,
    ) -> None:
        pki_dir = self.state_dir / "pki"
        self._spawn(
            "kube-apiserver",
            [
                str(binaries["kube-apiserver"]),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd_client']}",
                # Loopback for the local node; the bridge's gateway for the real one, so
                # pods reach it through the `kubernetes` Service.
                f"--bind-address={self.host_address}",
                f"--advertise-address={self.host_address}",
                f"--secure-port={self.ports['apiserver']}",
                f"--cert-dir={pki_dir}",
                f"--tls-cert-file={paths['apiserver.crt']}",
                f"--tls-private-key-file={paths['apiserver.key']}",
                f"--client-ca-file={paths['ca.crt']}",
                f"--kubelet-client-certificate={paths['apiserver-kubelet-client.crt']}",
                f"--kubelet-client-key={paths['apiserver-kubelet-client.key']}",
                f"--kubelet-certificate-authority={paths['ca.crt']}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={paths['sa.pub']}",
                f"--service-account-signing-key-file={paths['sa.key']}",
                "--authorization-mode=Node,RBAC",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                # The node's name does not resolve: reach its kubelet by address.
                "--kubelet-preferred-address-types=InternalIP",
                "--profiling=false",
                "--v=1",
            ],
            detached=detached,
        )
        wait_for(
            self._apiserver_ready, timeout=timeout, what="kube-apiserver /readyz", interval=0.2
        )

    def _start_controllers(
        self, binaries: dict[str, Path], paths: dict[str, Path], *, detached: bool
    ) -> None:
        pki_dir = self.state_dir / "pki"
        self._spawn(
            "kube-controller-manager",
            [
                str(binaries["kube-controller-manager"]),
                f"--kubeconfig={paths['controller-manager.kubeconfig']}",
                f"--authentication-kubeconfig={paths['controller-manager.kubeconfig']}",
                f"--authorization-kubeconfig={paths['controller-manager.kubeconfig']}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['controller_manager']}",
                f"--cert-dir={pki_dir / 'controller-manager'}",
                "--controllers=*",
                # Each controller as its own service account, bound by the built-in
                # system:controller:* roles (the controller manager's user alone may not
                # create pods), as kubeadm runs it.
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                f"--root-ca-file={paths['ca.crt']}",
                f"--service-account-private-key-file={paths['sa.key']}",
                f"--cluster-signing-cert-file={paths['ca.crt']}",
                f"--cluster-signing-key-file={paths['ca.key']}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--profiling=false",
                "--v=1",
            ],
            detached=detached,
        )
        self._spawn(
            "kube-scheduler",
            [
                str(binaries["kube-scheduler"]),
                f"--kubeconfig={paths['scheduler.kubeconfig']}",
                f"--authentication-kubeconfig={paths['scheduler.kubeconfig']}",
                f"--authorization-kubeconfig={paths['scheduler.kubeconfig']}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['scheduler']}",
                f"--cert-dir={pki_dir / 'scheduler'}",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ],
            detached=detached,
        )

    def _start_real_node(
        self,
        binaries: dict[str, Path],
        paths: dict[str, Path],
        *,
        detached: bool,
        timeout: float,
    ) -> None:
        """containerd (with the node's own images and `node.images`, from the image store
        when it can serve this node), then kubelet and kube-proxy."""
        node_paths = self.node_paths
        realnode.write_cni_config(node_paths)
        archives = realnode.node_image_archives(self.node.images)
        seeded = not node_paths.containerd_root.exists() and imagestore.seed(
            node_paths.containerd_root, archives
        )
        self._spawn(
            "containerd",
            realnode.containerd_argv(node_paths),
            detached=detached,
            env=realnode.containerd_env(),
        )
        wait_for(
            lambda: realnode.containerd_ready(node_paths),
            timeout=timeout,
            what="containerd",
            interval=0.1,
        )
        if not seeded:
            realnode.preload_images(node_paths, self.node.images)
        config = realnode.kubelet_config(
            node_paths,
            port=self.ports["node_agent"],
            healthz_port=self.ports["kubelet_healthz"],
            max_pods=self.node.pods,
            ca_file=paths["ca.crt"],
            cert_file=paths["node.crt"],
            key_file=paths["node.key"],
        )
        argv = realnode.kubelet_argv(
            node_paths,
            kubeconfig=paths["kubelet.kubeconfig"],
            node_name=self.node.name,
            labels=self.node.labels,
            config=config,
        )
        self._spawn("kubelet", argv, detached=detached, env=realnode.containerd_env())
        argv = realnode.kube_proxy_argv(
            node_paths,
            kubeconfig=paths["kube-proxy.kubeconfig"],
            node_name=self.node.name,
            healthz_port=self.ports["proxy_healthz"],
            metrics_port=self.ports["proxy_metrics"],
        )
        self._spawn("kube-proxy", argv, detached=detached, env=realnode.containerd_env())

    def _wait_ready(self, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout

        def remaining() -> float:
            return max(1.0, deadline - time.monotonic())

        api = self.rest()
        wait_for(
            lambda: api.get("/api/v1/namespaces/default/serviceaccounts/default"),
            timeout=remaining(),
            what="the default ServiceAccount (controller manager)",
        )
        if self.real_node and self.node.gpus:
            wait_for(
                lambda: api.get(f"/api/v1/nodes/{self.node.name}"),
                timeout=remaining(),
                what=f"node {self.node.name} registered (kubelet)",
            )
            realnode.advertise_gpus(api, self.node.name, self.node.gpus)
        wait_for(
            lambda: _node_ready(api.get(f"/api/v1/nodes/{self.node.name}")),
            timeout=remaining(),
            what=f"node {self.node.name} Ready and untainted",
        )
        wait_for(
            lambda: _http_ok(f"https://127.0.0.1:{self.ports['scheduler']}/healthz", insecure=True),
            timeout=remaining(),
            what="kube-scheduler /healthz",
        )

    def _start_cluster_dns(self, *, timeout: float) -> None:
        api = self.rest()
        realnode.deploy_coredns(api)
        wait_for(
            lambda: realnode.coredns_ready(api),
            timeout=timeout,
            what="CoreDNS ready (kube-system/coredns)",
        )

    @property
    def real_node(self) -> bool:
        return self.node.runtime == "containerd"

    @property
    def node_paths(self) -> realnode.NodePaths:
        return realnode.NodePaths(self.state_dir / "node")

    def node_agent_argv(self, paths: dict[str, Path]) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "kubetune_devcluster.localnode",
            f"--kubeconfig={self.kubeconfig}",
            f"--node-name={self.node.name}",
            f"--state-dir={self.state_dir / 'node'}",
            f"--cpu={self.node.cpu}",
            f"--memory={self.node.memory}",
            f"--gpus={self.node.gpus}",
            f"--pods={self.node.pods}",
            f"--kubelet-port={self.ports['node_agent']}",
            f"--serving-cert={paths['node.crt']}",
            f"--serving-key={paths['node.key']}",
            f"--client-ca={paths['ca.crt']}",
        ]
        argv += [f"--label={k}={v}" for k, v in self.node.labels.items()]
        return argv

    def _spawn(
        self, name: str, argv: list[str], *, detached: bool, env: dict[str, str] | None = None
    ) -> None:
        proc, record = start_process(
            name,
            argv,
            self.state_dir / "logs" / f"{name}.log",
            env=env,
            cwd=self.state_dir,
            die_with_parent=not detached,
        )
        self.processes.append(record)
        self._popen[proc.pid] = proc
        self._save_state()

    def _write_pki(self) -> dict[str, Path]:
        pki_dir = self.state_dir / "pki"
        ca = pki.new_ca()
        paths: dict[str, Path] = {}
        paths["ca.crt"], paths["ca.key"] = pki.write_pair(ca, pki_dir, "ca")
        serving = pki.issue_cert(
            ca,
            "kube-apiserver",
            dns_names=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            ip_addresses=("127.0.0.1", "10.0.0.1", self.host_address),
            server=True,
        )
        paths["apiserver.crt"], paths["apiserver.key"] = pki.write_pair(
            serving, pki_dir, "apiserver"
        )
        kubelet_client = pki.issue_cert(
            ca, "kube-apiserver-kubelet-client", organizations=("system:masters",), client=True
        )
        paths["apiserver-kubelet-client.crt"], paths["apiserver-kubelet-client.key"] = (
            pki.write_pair(kubelet_client, pki_dir, "apiserver-kubelet-client")
        )
        # The node agent's own serving certificate (kubectl logs goes through it).
        node_serving = pki.issue_cert(
            ca,
            f"system:node:{self.node.name}",
            organizations=("system:nodes",),
            dns_names=("localhost", self.node.name),
            ip_addresses=("127.0.0.1", self.host_address),
            server=True,
        )
        paths["node.crt"], paths["node.key"] = pki.write_pair(node_serving, pki_dir, "node")
        paths.update(self._write_service_account_key(pki_dir))
        paths.update(self._write_user_kubeconfigs(ca, pki_dir))
        return paths

    @staticmethod
    def _write_service_account_key(pki_dir: Path) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        sa_private, sa_public = pki.new_service_account_key()
        paths["sa.key"], paths["sa.pub"] = pki_dir / "sa.key", pki_dir / "sa.pub"
        paths["sa.key"].touch(mode=0o600)
        paths["sa.key"].write_bytes(sa_private)
        paths["sa.pub"].write_bytes(sa_public)
        return paths

    def _write_user_kubeconfigs(self, ca: pki.KeyPair, pki_dir: Path) -> dict[str, Path]:
        """A client certificate and kubeconfig for each user of the API server."""
        paths: dict[str, Path] = {}
        users = {
            # O=system:masters: the admin is authorized for everything.
            "admin": ("kubetune-admin", ("system:masters",), self.kubeconfig),
            # The built-in RBAC roles bind these user names.
            "controller-manager": (
                "system:kube-controller-manager",
                (),
                pki_dir / "controller-manager.kubeconfig",
            ),
            "scheduler": ("system:kube-scheduler", (), pki_dir / "scheduler.kubeconfig"),
            # The real node's: the Node authorizer knows a kubelet by this name and
            # group; the built-in system:node-proxier role binds kube-proxy's.
            "kubelet": (
                f"system:node:{self.node.name}",
                ("system:nodes",),
                pki_dir / "kubelet.kubeconfig",
            ),
            "kube-proxy": ("system:kube-proxy", (), pki_dir / "kube-proxy.kubeconfig"),
        }
        for user, (common_name, orgs, path) in users.items():
            pair = pki.issue_cert(ca, common_name, organizations=orgs, client=True)
            if user == "admin":  # also as files, for plain HTTPS health checks
                pki.write_pair(pair, pki_dir, "admin")
            write_kubeconfig(
                path,
                render_kubeconfig(self.server, ca.cert_pem, pair.cert_pem, pair.key_pem, user=user),
            )
            paths[path.name] = path
        return paths

    # ---- using ----------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        pki_dir = self.state_dir / "pki"
        ctx = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
        ctx.load_cert_chain(str(pki_dir / "admin.crt"), str(pki_dir / "admin.key"))
        return ctx

    def _apiserver_ready(self) -> bool:
        with urllib.request.urlopen(
            f"{self.server}/readyz", context=self._ssl_context(), timeout=5
        ) as response:
            return response.status == 200

    def rest(self) -> KubeRest:
        """A plain JSON client (dicts in and out) for the admin user."""
        return KubeRest(self.kubeconfig)

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should talk to this cluster."""
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this cluster; raises on failure when `check`."""
        kubectl = find_binary("kubectl") or self.bin_dir / "kubectl"
        result = subprocess.run(
            # Its discovery cache in the state dir, not in ~/.kube/cache.
            [
                str(kubectl),
                f"--kubeconfig={self.kubeconfig}",
                f"--cache-dir={self.state_dir / 'kubectl-cache'}",
                *args,
            ],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result

    def read_pod_logs(
        self, namespace: str, pod: str, container: str | None = None, *, previous: bool = False
    ) -> str:
        """What a pod's container printed (stdout and stderr), read from the node."""
        from kubetune_devcluster.localnode import read_container_log

        if self.real_node:
            args = ["logs", "-n", namespace, pod]
            args += [f"--container={container}"] if container else []
            args += ["--previous"] if previous else []
            return self.kubectl(*args).stdout
        return read_container_log(
            self.state_dir / "node", namespace, pod, container, previous=previous
        )

    def pod_pids(self, namespace: str, pod: str) -> list[int]:
        """Host PIDs of the pod's running containers (as the node records them)."""
        from kubetune_devcluster.localnode import read_container_pids

        if self.real_node:
            return realnode.pod_container_pids(self.node_paths, namespace, pod)
        return read_container_pids(self.state_dir / "node", namespace, pod)

    def load_image(self, archive_path: Path) -> list[str]:
        """Import an image archive (`podman save --format oci-archive`, or a docker
        archive) into the real node's container runtime; returns the names it carried.
        Pods use it with `imagePullPolicy: IfNotPresent` or `Never` (nothing is pulled)."""
        if not self.real_node:
            raise RuntimeError(
                "the local node runs no images; start the cluster with the real node"
            )
        return realnode.import_image(self.node_paths, Path(archive_path))

    # ---- stopping -------------------------------------------------------------------

    def alive_processes(self) -> list[ProcessRecord]:
        return [record for record in self.processes if is_alive(record)]

    def ports_in_use(self) -> list[int]:
        return [port for port in self.ports.values() if port_in_use(port)]

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every process, last started first (the node agent first kills its pods)."""

        def reap(pid: int) -> None:
            proc = self._popen.get(pid)
            if proc is not None:
                proc.poll()

        # The node first, while the API server is up. The local node agent stops its
        # pods' processes; the kubelet would restart containers, so it goes before they
        # are killed, and containerd after.
        by_name = {record.name: record for record in self.processes}
        first = [by_name[n] for n in ("localnode", "kubelet", "kube-proxy") if n in by_name]
        stop_processes(first, timeout=timeout, reap=reap)
        if self.real_node:
            realnode.kill_containers(self.node_paths)
        # etcd last: an API server that loses etcd first spends its whole shutdown
        # timeout retrying to remove its endpoint lease.
        others = [r for r in reversed(self.processes) if r not in first and r.name != "etcd"]
        stop_processes(others, timeout=timeout, reap=reap)
        stop_processes([r for r in self.processes if r.name == "etcd"], timeout=timeout, reap=reap)
        if self.real_node:
            realnode.teardown(self.node_paths)
        for proc in self._popen.values():
            proc.poll()
        # A multi-threaded process shows as a zombie a moment before its last thread has
        # closed its sockets: wait for the listening ports to go too.
        with contextlib.suppress(TimeoutError):
            wait_for(
                lambda: not self.ports_in_use(), timeout=5, interval=0.05, what="ports released"
            )
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)
        _unregister_cleanup(self)

    def _save_state(self) -> None:
        state = {
            "k8s_version": K8S_VERSION,
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "bin_dir": str(self.bin_dir),
            "ports": self.ports,
            "node": self.node.__dict__,
            "host_address": self.host_address,
            "processes": [record.to_json() for record in self.processes],
            "ready_seconds": getattr(self, "ready_seconds", None),
        }
        path = self.state_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(path)

    @classmethod
    def from_state(cls, state_dir: Path) -> DevCluster:
        """The cluster recorded in `state_dir` (started by another process)."""
        state_dir = Path(state_dir).resolve()
        state = json.loads((state_dir / STATE_FILE).read_text())
        cluster = cls(
            state_dir=state_dir,
            bin_dir=Path(state["bin_dir"]),
            kubeconfig=Path(state["kubeconfig"]),
            server=state["server"],
            ports=state["ports"],
            processes=[ProcessRecord(**record) for record in state["processes"]],
            node=NodeConfig(**state["node"]),
            host_address=state.get("host_address", "127.0.0.1"),
        )
        cluster.ready_seconds = state.get("ready_seconds")
        return cluster


def stop_cluster(state_dir: Path, timeout: float = 15.0) -> bool:
    """Stop the cluster recorded in `state_dir`; False if none is recorded there.

    A real node whose state file is gone (an `up` killed half way) still left its
    network record: then its processes, mounts and network are removed all the same."""
    state_dir = Path(state_dir)
    if (state_dir / STATE_FILE).exists():
        DevCluster.from_state(state_dir).stop(timeout=timeout)
        return True
    node_paths = realnode.NodePaths(state_dir / "node")
    if not node_paths.network_record.exists():
        return False
    realnode.kill_containers(node_paths)
    realnode.kill_processes_naming(state_dir.resolve())
    realnode.teardown(node_paths)
    return True


def node_agent_env() -> dict[str, str]:
    """The agent runs pod commands with this PATH: this interpreter's bin dir first, so
    `python` in a pod's command is the project's Python."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "/usr/local/bin:/usr/bin:/bin")])
    return env


def _node_ready(node: dict[str, Any]) -> bool:
    """Ready, and without the taints the node lifecycle controller puts on a node that
    was not Ready yet when it first saw it (the scheduler would keep pods off it)."""
    taints = node.get("spec", {}).get("taints") or []
    if any(t["key"].startswith("node.kubernetes.io/") for t in taints):
        return False
    for condition in node.get("status", {}).get("conditions") or []:
        if condition["type"] == "Ready":
            return condition["status"] == "True"
    return False


def _http_ok(url: str, *, insecure: bool = False) -> bool:
    ctx = None
    if insecure:  # components' self-signed health endpoints
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(url, timeout=2, context=ctx) as response:
        return response.status == 200


# ---- cleanup when the owning process ends ---------------------------------------------

_owned: list[DevCluster] = []
_owned_lock = threading.Lock()
_handlers_installed = False


def _stop_owned() -> None:
    with _owned_lock:
        clusters = list(_owned)
    for cluster in clusters:
        with contextlib.suppress(Exception):  # best effort while exiting
            cluster.stop(timeout=5)


def _on_signal(signum: int, frame: object) -> None:
    _stop_owned()
    # Die of the same signal, as if the handler had not been there.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _register_cleanup(cluster: DevCluster) -> None:
    global _handlers_installed
    with _owned_lock:
        _owned.append(cluster)
        if _handlers_installed:
            return
        _handlers_installed = True
    atexit.register(_stop_owned)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) in (signal.SIG_DFL, None):
                signal.signal(signum, _on_signal)


def _unregister_cleanup(cluster: DevCluster) -> None:
    with _owned_lock:
        if cluster in _owned:
            _owned.remove(cluster)
