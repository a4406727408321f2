"""kubetune installed on a dev cluster, as the demo and the tests install it.

install_crd(cluster)                  the CRD from crds/, applied and served (for an
                                      operator run as a host process: operatorprocess)
load_images(cluster)                  the operator and trainer images (hack/images.sh's
                                      archives) into the real node's containerd, each
                                      unless the node already has that very image
helm_install(cluster, ChartValues(s3_endpoint=...))
                                      the chart as a platform team installs it (`helm
                                      upgrade --install`): the local images, never
                                      pulled, and the given S3 endpoint
"""

from __future__ import annotations

import functools
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api import v1alpha1 as api
from kubetune.api.crd import CRD_PATH
from kubetune_devcluster import imagestore, realnode
from kubetune_devcluster.processes import wait_for

REPO_ROOT = Path(__file__).resolve().parents[3]
CHART = REPO_ROOT / "helm" / "kubetune"
RELEASE = "kubetune"
OPERATOR_NAMESPACE = "kubetune-system"
OPERATOR_SELECTOR = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator"
CRD_NAME = f"{api.PLURAL}.{api.GROUP}"
FTJ_API = f"/apis/{api.GROUP}/{api.VERSION}"


class StackError(Exception):
    """A one-line reason kubetune could not be installed; `detail` holds the output."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


# --- the CRD ----------------------------------------------------------------------------


def install_crd(cluster: Any, timeout: float = 60) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_PATH))
    wait_crd_served(cluster, timeout)


def wait_crd_served(cluster: Any, timeout: float = 60) -> None:
    rest = cluster.rest()

    def served() -> bool:
        crd = rest.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}")
        conds = {c["type"]: c["status"] for c in crd.get("status", {}).get("conditions", [])}
        # Discovery can lag the Established condition: also wait until the resource is served.
        return (
            conds.get("Established") == "True" and rest.get(f"{FTJ_API}/{api.PLURAL}") is not None
        )

    wait_for(served, timeout=timeout, what="the FineTuneJob CRD served")


# --- the images -------------------------------------------------------------------------


@functools.cache
def image_archives() -> dict[str, Path]:
    """Image reference -> OCI archive, as hack/images.sh names them (whether built or not)."""
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "hack" / "images.sh"), "--print"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {ref: Path(path) for ref, path in (line.split() for line in out.splitlines())}


def image_ref(which: str) -> str:
    """The reference of the "operator" or "trainer" image."""
    return next(ref for ref in image_archives() if f"kubetune-{which}:" in ref)


def archive_digest(archive: Path) -> str:
    try:
        return imagestore.archive_digest(archive)
    except imagestore.ImageStoreError as exc:
        raise StackError(str(exc)) from None


def node_image_digests(cluster: Any) -> dict[str, str]:
    """Image name -> manifest digest, as the node's containerd has them."""
    return realnode.image_digests(cluster.node_paths)


def load_images(cluster: Any) -> dict[str, float]:
    """Both images into the real node; returns the seconds each import took, for those
    imported (a node that already has an image with the archive's digest skips it)."""
    imported = {}
    for ref, archive in image_archives().items():
        if not archive.is_file():
            raise StackError(f"{archive}: image archive missing; run `bash hack/images.sh`")
        digest = archive_digest(archive)
        if node_image_digests(cluster).get(ref) == digest:
            continue
        start = time.monotonic()
        cluster.load_image(archive)
        if node_image_digests(cluster).get(ref) != digest:
            raise StackError(f"{archive}: imported, but the node has no {ref}@{digest}")
        imported[ref] = time.monotonic() - start
    return imported


# --- the chart --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChartValues:
    """What the local install sets: the local images, an S3 endpoint the pods reach, and
    trainer defaults that fit a small machine."""

    s3_endpoint: str
    s3_region: str = "us-east-1"
    trainer_cpu: str = "1"
    trainer_memory: str = "4Gi"
    patch_interval_s: int = 1
    log_format: str = "text"

    def helm_args(self) -> list[str]:
        """`--set-string`/`--set` arguments."""
        op_repo, _, op_tag = image_ref("operator").rpartition(":")
        tr_repo, _, tr_tag = image_ref("trainer").rpartition(":")
        values = {
            "image.repository": op_repo,
            "image.tag": op_tag,
            "image.pullPolicy": "Never",  # imported by load_images, in no registry
            "trainer.image.repository": tr_repo,
            "trainer.image.tag": tr_tag,
            "trainer.resources.cpu": self.trainer_cpu,
            "trainer.resources.memory": self.trainer_memory,
            "s3.endpoint": self.s3_endpoint,
            "s3.region": self.s3_region,
            "logFormat": self.log_format,
            # Jobs may name other local images (the real-node tests name a missing one).
            "trainer.allowedImages[0]": "localhost/kubetune/",
        }
        strings = [a for key, value in values.items() for a in ("--set-string", f"{key}={value}")]
        return [*strings, "--set", f"progress.patchIntervalSeconds={self.patch_interval_s}"]


def helm(cluster: Any, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The cluster's helm binary against the cluster; output captured."""
    return subprocess.run(
        [str(cluster.bin_dir / "helm"), *args],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def helm_install(
    cluster: Any,
    values: ChartValues,
    *,
    namespace: str = OPERATOR_NAMESPACE,
    wait: str = "300s",
    log_path: Path | None = None,
) -> float:
    """`helm upgrade --install` of the chart (a reused cluster is upgraded in place), waits
    for the operator's Deployment and the CRD; returns the seconds it took."""
    start = time.monotonic()
    done = helm(
        cluster,
        "upgrade", "--install", RELEASE, str(CHART),
        "--namespace", namespace, "--create-namespace", "--wait", "--timeout", wait,
        *values.helm_args(),
    )  # fmt: skip
    if log_path is not None:
        log_path.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        logs = cluster.kubectl(
            "logs", "-n", namespace, "-l", OPERATOR_SELECTOR, "--tail=40", check=False
        )
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        where = f"; see {log_path}" if log_path is not None else ""
        detail = f"{done.stderr}\noperator logs:\n{logs.stdout}{logs.stderr}"
        if log_path is not None:
            log_path.write_text(done.stdout + detail)
        raise StackError(f"helm upgrade --install failed: {reason}{where}", detail)
    wait_crd_served(cluster)
    return time.monotonic() - start


def operator_pods(cluster: Any, namespace: str = OPERATOR_NAMESPACE) -> list[dict]:
    """The pods of the chart's operator Deployment."""
    return cluster.rest().get(
        f"/api/v1/namespaces/{namespace}/pods", labelSelector=OPERATOR_SELECTOR
    )["items"]
