"""Where the dev cluster's binaries and images are (same lookup order and cache layout
as hack/k8s-binaries.sh).

The versions are read from the Go modules that pin them (hack/k8s-binaries/<module>/
go.mod), the one place each is written down: the Kubernetes version is that of the
control plane, kubelet and kube-proxy alike.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

MODULES_DIR = Path(__file__).resolve().parents[2] / "k8s-binaries"


@functools.cache
def module_version(module: str, path: str) -> str:
    """The version `hack/k8s-binaries/<module>/go.mod` requires of Go module `path`."""
    go_mod = (MODULES_DIR / module / "go.mod").read_text()
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(path)}\s+(v\S+)", go_mod, re.MULTILINE)
    if not match:
        raise LookupError(f"{MODULES_DIR / module / 'go.mod'}: no version of {path}")
    return match.group(1)


K8S_VERSION = module_version("kube", "k8s.io/kubernetes")
CONTAINERD_VERSION = module_version("containerd", "github.com/containerd/containerd/v2")
COREDNS_VERSION = module_version("coredns", "github.com/coredns/coredns")
IMAGES_VERSION = (MODULES_DIR / "images" / "VERSION").read_text().strip()

CONTROL_PLANE_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
ALL_BINARIES = (*CONTROL_PLANE_BINARIES, "kubectl", "helm")
NODE_BINARIES = ("kubelet", "kube-proxy", "containerd", "containerd-shim-runc-v2", "ctr")
# The real node's images: name -> (reference, archive file under <cache>/images/).
NODE_IMAGES = {
    "pause": (f"localhost/kubetune/pause:{IMAGES_VERSION}", f"pause-{IMAGES_VERSION}.oci.tar"),
    "testbox": (
        f"localhost/kubetune/testbox:{IMAGES_VERSION}",
        f"testbox-{IMAGES_VERSION}.oci.tar",
    ),
    "coredns": (
        f"localhost/kubetune/coredns:{COREDNS_VERSION}",
        f"coredns-{COREDNS_VERSION}.oci.tar",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE_DIR") or Path.home() / ".cache" / "kubetune")


def build_dir(name: str = "kube-apiserver") -> Path:
    """Where hack/k8s-binaries.sh builds `name` into."""
    if name in ("containerd", "containerd-shim-runc-v2", "ctr"):
        return cache_dir() / "bin" / f"containerd-{CONTAINERD_VERSION}"
    return cache_dir() / "bin" / K8S_VERSION


def search_dirs(name: str = "kube-apiserver") -> list[Path]:
    dirs = [os.environ.get("KUBETUNE_BIN_DIR"), os.environ.get("KUBEBUILDER_ASSETS")]
    return [Path(d) for d in dirs if d] + [build_dir(name)]


def find_binary(name: str) -> Path | None:
    for directory in search_dirs(name):
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_binaries(names: tuple[str, ...] = ALL_BINARIES) -> dict[str, Path | None]:
    return {name: find_binary(name) for name in names}


def image_program(name: str) -> Path:
    """The static program inside one of the node's own images (pause, testbox, coredns)."""
    if name == "coredns":
        return cache_dir() / "bin" / f"coredns-{COREDNS_VERSION}" / "coredns"
    return cache_dir() / "bin" / f"images-{IMAGES_VERSION}" / name


def image_archive(name: str) -> Path:
    """The OCI archive of one of the node's own images (built by hack/k8s-binaries.sh)."""
    return cache_dir() / "images" / NODE_IMAGES[name][1]


def image_ref(name: str) -> str:
    return NODE_IMAGES[name][0]


def missing_binaries(names: tuple[str, ...] = (*CONTROL_PLANE_BINARIES, "kubectl")) -> list[str]:
    return [name for name, path in find_binaries(names).items() if path is None]


def missing_node_parts() -> list[str]:
    """What the real node needs and this machine lacks: binaries, images, Debian tools."""
    missing = missing_binaries(NODE_BINARIES)
    missing += [f"{name} image" for name in NODE_IMAGES if not image_archive(name).is_file()]
    missing += [tool for tool in ("runc", "iptables") if not _on_path(tool)]
    if not Path("/usr/lib/cni/bridge").exists():
        missing.append("CNI plugins (containernetworking-plugins)")
    return missing


def _on_path(tool: str) -> bool:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return any(os.access(Path(d) / tool, os.X_OK) for d in path.split(":") if d)


def require_binaries(
    names: tuple[str, ...] = (*CONTROL_PLANE_BINARIES, "kubectl"),
) -> dict[str, Path]:
    found = find_binaries(names)
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise FileNotFoundError(
            f"missing Kubernetes binaries: {', '.join(missing)} (looked in "
            f"{', '.join(str(d) for d in search_dirs(missing[0]))}); build them with "
            "`bash hack/k8s-binaries.sh`"
        )
    return {name: path for name, path in found.items() if path is not None}
