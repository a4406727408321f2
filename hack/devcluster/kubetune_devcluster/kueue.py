"""Kueue on the dev cluster: the real controller manager, built from the Go module proxy
by hack/kueue.sh, run as a host process next to the control plane, webhooks included.

    kueue = Kueue.start(cluster)     # CRDs, Configuration, certificates, webhooks; < 60 s
    ...                              # ResourceFlavor / ClusterQueue / LocalQueue, Jobs
    kueue.stop()                     # webhooks unregistered first, then the process

or from a shell, against a cluster from `kubetune dev up` (runs until Ctrl-C):

    python -m kubetune_devcluster.kueue [--state-dir DIR]

What differs from an in-cluster install, and why:
- Kueue's webhook server listens on 127.0.0.1 and the webhook configurations (and the
  CRD conversion webhooks) point at it with `clientConfig.url`, so no Service routing is
  needed; its serving certificate is issued here by the dev cluster's CA.
- Kueue's internal certificate management is off (it would issue certificates for the
  in-cluster Service name). With it off, Kueue reads its metrics certificate from the
  fixed path /etc/kueue/metrics/certs: the process runs in a private mount namespace
  where that path is this instance's certificate directory, bind-mounted (the host
  keeps only the empty mount point).
- It authenticates with the cluster's admin kubeconfig rather than its own RBAC.
- Only the webhooks of Kueue's own resources and of batch/v1 Jobs are registered: the
  integrations enabled here. Kueue registers no-op handlers for the rest, but a pod
  webhook with failurePolicy Fail would put every pod in the cluster behind this process.
- The visibility API server (VisibilityOnDemand) is off: it is an aggregated API server
  that needs a Service.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubetune_devcluster import pki
from kubetune_devcluster.binaries import cache_dir
from kubetune_devcluster.controlplane import DevCluster
from kubetune_devcluster.processes import (
    ProcessRecord,
    free_port,
    start_process,
    stop_processes,
    wait_for,
)
from kubetune_devcluster.rest import ApiError, KubeRest

KUEUE_VERSION = "v0.17.0"
NAMESPACE = "kueue-system"
DEFAULT_FRAMEWORKS = ("batch/job",)
# Kueue reads its metrics serving certificate from here when it does not manage its own.
METRICS_CERT_DIR = "/etc/kueue/metrics/certs"
MUTATING = "kueue-mutating-webhook-configuration"
VALIDATING = "kueue-validating-webhook-configuration"
# API groups whose webhooks are registered (see the module docstring).
WEBHOOK_GROUPS = {"kueue.x-k8s.io", "batch"}
# The CRDs that upstream serves through the conversion webhook (config/components/crd).
CONVERTED_CRDS = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")
KUEUE_API = "/apis/kueue.x-k8s.io/v1beta2"


def kueue_dir() -> Path:
    """Where hack/kueue.sh puts the binary and the manifests of the pinned version."""
    override = os.environ.get("KUBETUNE_KUEUE_DIR")
    return Path(override) if override else cache_dir() / "bin" / f"kueue-{KUEUE_VERSION}"


def missing_kueue() -> str | None:
    """Why Kueue cannot be started, or None when the build is complete."""
    directory = kueue_dir()
    binary = directory / "kueue"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return f"Kueue {KUEUE_VERSION} is not built ({binary} missing); run `bash hack/kueue.sh`"
    if not (directory / "manifests" / "webhooks.yaml").is_file():
        return f"Kueue manifests missing under {directory}; run `bash hack/kueue.sh`"
    return None


# ---- manifests --------------------------------------------------------------------------


def crd_documents(manifests: Path, webhook_url: str, ca_bundle: str) -> list[dict]:
    """The release's CRDs, the served-through-conversion ones pointed at `webhook_url`."""
    crds = []
    for path in sorted((manifests / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["plural"] in CONVERTED_CRDS:
            crd["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {
                    "clientConfig": {"url": f"{webhook_url}/convert", "caBundle": ca_bundle},
                    "conversionReviewVersions": ["v1"],
                },
            }
        crds.append(crd)
    return crds


def webhook_documents(manifests: Path, webhook_url: str, ca_bundle: str) -> list[dict]:
    """The release's webhook configurations, reduced to WEBHOOK_GROUPS, with each
    service reference replaced by `webhook_url` + the webhook's path."""
    names = {"MutatingWebhookConfiguration": MUTATING, "ValidatingWebhookConfiguration": VALIDATING}
    documents = []
    for source in yaml.safe_load_all((manifests / "webhooks.yaml").read_text()):
        document = copy.deepcopy(source)
        document["metadata"] = {"name": names[document["kind"]]}
        kept = []
        for webhook in document["webhooks"]:
            groups = {g for rule in webhook["rules"] for g in rule["apiGroups"]}
            if not groups <= WEBHOOK_GROUPS:
                continue
            path = webhook["clientConfig"]["service"]["path"]
            webhook["clientConfig"] = {"url": f"{webhook_url}{path}", "caBundle": ca_bundle}
            kept.append(webhook)
        document["webhooks"] = kept
        documents.append(document)
    return documents


def configuration(ports: dict[str, int], cert_dir: Path, frameworks: tuple[str, ...]) -> dict:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2) for a host process."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports['health']}"},
        "metrics": {"bindAddress": f"127.0.0.1:{ports['metrics']}"},
        "webhook": {"host": "127.0.0.1", "port": ports["webhook"], "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "integrations": {"frameworks": list(frameworks)},
        "featureGates": {"VisibilityOnDemand": False},
    }


def serving_certificate(cluster: DevCluster) -> pki.KeyPair:
    """A certificate for 127.0.0.1, signed by the dev cluster's CA (the one the API server
    trusts already, so the webhooks' caBundle is that CA)."""
    pki_dir = cluster.state_dir / "pki"
    ca = pki.KeyPair((pki_dir / "ca.crt").read_bytes(), (pki_dir / "ca.key").read_bytes())
    return pki.issue_cert(
        ca, "kueue-webhook", dns_names=("localhost",), ip_addresses=("127.0.0.1",), server=True
    )


# ---- the process ------------------------------------------------------------------------


@dataclass
class Kueue:
    cluster: DevCluster
    state_dir: Path
    ports: dict[str, int]
    record: ProcessRecord | None = None
    _popen: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def webhook_url(self) -> str:
        return f"https://127.0.0.1:{self.ports['webhook']}"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "kueue.log"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @classmethod
    def start(
        cls,
        cluster: DevCluster,
        state_dir: Path | None = None,
        *,
        frameworks: tuple[str, ...] = DEFAULT_FRAMEWORKS,
        ready_timeout: float = 120.0,
    ) -> Kueue:
        """Install Kueue into `cluster` and run it; returns once its webhooks answer."""
        reason = missing_kueue()
        if reason:
            raise FileNotFoundError(reason)
        state_dir = Path(state_dir or cluster.state_dir / "kueue").resolve()
        state_dir.mkdir(parents=True, exist_ok=True)
        ports = {"webhook": free_port(), "health": free_port(), "metrics": free_port()}
        kueue = cls(cluster, state_dir, ports)
        try:
            kueue._start(frameworks, ready_timeout)
        except BaseException:
            kueue.stop()
            raise
        return kueue

    def _start(self, frameworks: tuple[str, ...], ready_timeout: float) -> None:
        deadline = time.monotonic() + ready_timeout

        def remaining() -> float:
            return max(1.0, deadline - time.monotonic())

        manifests = kueue_dir() / "manifests"
        ca_bundle = base64.b64encode((self.cluster.state_dir / "pki" / "ca.crt").read_bytes())
        ca_bundle_text = ca_bundle.decode()
        self._apply(crd_documents(manifests, self.webhook_url, ca_bundle_text))
        self._wait_crds_established(remaining())
        self._ensure_namespace()

        cert_dir = self.state_dir / "certs"
        cert_dir.mkdir(exist_ok=True)
        pki.write_pair(serving_certificate(self.cluster), cert_dir, "tls")
        config_path = self.state_dir / "config.yaml"
        config_path.write_text(yaml.safe_dump(configuration(self.ports, cert_dir, frameworks)))

        self._spawn(config_path, cert_dir)
        wait_for(self._healthy, timeout=remaining(), interval=0.5, what="Kueue /readyz")
        self._apply(webhook_documents(manifests, self.webhook_url, ca_bundle_text))
        wait_for(
            self._job_webhook_answers,
            timeout=remaining(),
            interval=0.5,
            what="Kueue's Job webhook in the API server's path",
        )

    def _spawn(self, config_path: Path, cert_dir: Path) -> None:
        # A private mount namespace where Kueue's fixed metrics path is our cert_dir.
        Path(METRICS_CERT_DIR).mkdir(parents=True, exist_ok=True)
        argv = [
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh",
            str(cert_dir), METRICS_CERT_DIR,
            str(kueue_dir() / "kueue"), f"--config={config_path}", "--zap-log-level=2",
        ]  # fmt: skip
        env = {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)}
        self._popen, self.record = start_process(
            "kueue", argv, self.log_path, env=env, cwd=self.state_dir, die_with_parent=True
        )

    def _healthy(self) -> bool:
        if self._popen is not None and self._popen.poll() is not None:
            raise RuntimeError(f"kueue exited ({self._popen.returncode}):\n{self.logs()[-3000:]}")
        url = f"http://127.0.0.1:{self.ports['health']}/readyz"
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200

    def _job_webhook_answers(self) -> bool:
        """A server-side dry run of a queued, unsuspended Job comes back suspended: Kueue's
        mutating webhook ran (the API server picks up new configurations with a lag). In
        `default`: Kueue leaves its own namespace and kube-system alone."""
        self._healthy()
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "generateName": "kueue-probe-",
                "labels": {"kueue.x-k8s.io/queue-name": "kueue-probe"},
            },
            "spec": {
                "suspend": False,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "probe", "image": "probe", "command": ["true"]}],
                    }
                },
            },
        }
        answer = self.cluster.rest().request(
            "POST", "/apis/batch/v1/namespaces/default/jobs", job, query={"dryRun": "All"}
        )
        return answer["spec"].get("suspend") is True

    def _apply(self, documents: list[dict]) -> None:
        # Server-side: the CRDs are too large for kubectl's last-applied annotation.
        self.cluster.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=kubetune-devcluster",
            "-f",
            "-",
            input=yaml.safe_dump_all(documents),
            timeout=120,
        )

    def _wait_crds_established(self, timeout: float) -> None:
        api = self.cluster.rest()

        def established() -> bool:
            crds = api.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")["items"]
            ours = [c for c in crds if c["spec"]["group"] == "kueue.x-k8s.io"]
            return bool(ours) and all(_established(c) for c in ours)

        wait_for(established, timeout=timeout, what="Kueue CRDs Established")
        wait_for(
            lambda: api.get(f"{KUEUE_API}/clusterqueues") is not None,
            timeout=timeout,
            what="clusterqueues served",
        )

    def _ensure_namespace(self) -> None:
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        with contextlib.suppress(ApiError):
            self.cluster.rest().post("/api/v1/namespaces", namespace)
        wait_for(
            lambda: self.cluster.rest().get(f"/api/v1/namespaces/{NAMESPACE}"),
            timeout=30,
            what=f"namespace {NAMESPACE}",
        )

    def stop(self, timeout: float = 15.0) -> None:
        """Unregister the webhooks (so the cluster keeps working without Kueue), then stop
        the process. The CRDs and Kueue's objects stay."""
        api = self.cluster.rest()
        for kind, name in (
            ("mutatingwebhookconfigurations", MUTATING),
            ("validatingwebhookconfigurations", VALIDATING),
        ):
            with contextlib.suppress(ApiError, OSError):
                api.delete(f"/apis/admissionregistration.k8s.io/v1/{kind}/{name}")
        if self.record is not None:

            def reap(pid: int) -> None:
                if self._popen is not None and self._popen.pid == pid:
                    self._popen.poll()

            stop_processes([self.record], timeout=timeout, reap=reap)


def _established(crd: dict[str, Any]) -> bool:
    conditions = crd.get("status", {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


# ---- queue objects ----------------------------------------------------------------------


def gpu_queue_objects(
    *,
    flavor: str = "default-flavor",
    cluster_queue: str = "gpu",
    local_queue: str = "gpu-small",
    namespace: str = "default",
    gpus: int = 1,
    cpu: str = "8",
    memory: str = "32Gi",
    node_labels: dict[str, str] | None = None,
) -> list[dict]:
    """A ResourceFlavor, a ClusterQueue with a GPU quota over it, and a LocalQueue in
    `namespace` pointing at it: the objects docs/platform.md shows."""
    flavor_spec: dict[str, Any] = {"nodeLabels": node_labels} if node_labels else {}
    return [
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ResourceFlavor",
            "metadata": {"name": flavor},
            "spec": flavor_spec,
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ClusterQueue",
            "metadata": {"name": cluster_queue},
            "spec": {
                "namespaceSelector": {},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                        "flavors": [
                            {
                                "name": flavor,
                                "resources": [
                                    {"name": "cpu", "nominalQuota": cpu},
                                    {"name": "memory", "nominalQuota": memory},
                                    {"name": "nvidia.com/gpu", "nominalQuota": gpus},
                                ],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": local_queue, "namespace": namespace},
            "spec": {"clusterQueue": cluster_queue},
        },
    ]


def create_objects(api: KubeRest, objects: list[dict]) -> None:
    """POST each Kueue object to its collection (through Kueue's webhooks)."""
    for obj in objects:
        plural = {"ResourceFlavor": "resourceflavors", "ClusterQueue": "clusterqueues"}.get(
            obj["kind"]
        )
        if plural:
            api.post(f"{KUEUE_API}/{plural}", obj)
        else:
            namespace = obj["metadata"]["namespace"]
            api.post(f"{KUEUE_API}/namespaces/{namespace}/localqueues", obj)


# ---- command line -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from kubetune_devcluster.cli import default_state_dir

    parser = argparse.ArgumentParser(
        prog="python -m kubetune_devcluster.kueue",
        description="Run Kueue against a running dev cluster until interrupted.",
    )
    parser.add_argument("--state-dir", default=str(default_state_dir()), help="the dev cluster's")
    parser.add_argument(
        "--framework",
        action="append",
        dest="frameworks",
        help=f"a Kueue integration to enable (default: {', '.join(DEFAULT_FRAMEWORKS)})",
    )
    args = parser.parse_args(argv)
    reason = missing_kueue()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    cluster = DevCluster.from_state(Path(args.state_dir))
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    kueue = Kueue.start(cluster, frameworks=tuple(args.frameworks or DEFAULT_FRAMEWORKS))
    print(f"kueue {KUEUE_VERSION} running; webhooks at {kueue.webhook_url}")
    print(f"log: {kueue.log_path}  (Ctrl-C stops it and unregisters the webhooks)")
    try:
        while not stopping.wait(1.0):
            if kueue._popen is not None and kueue._popen.poll() is not None:
                print(f"kueue exited; see {kueue.log_path}", file=sys.stderr)
                return 1
    finally:
        kueue.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
