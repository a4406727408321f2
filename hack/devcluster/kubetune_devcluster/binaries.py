"""Where the control plane binaries are (same lookup order as hack/k8s-binaries.sh)."""

from __future__ import annotations

import os
from pathlib import Path

K8S_VERSION = "v1.36.3"
CONTROL_PLANE_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
ALL_BINARIES = (*CONTROL_PLANE_BINARIES, "kubectl", "helm")


def cache_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE_DIR") or Path.home() / ".cache" / "kubetune")


def build_dir() -> Path:
    """Where hack/k8s-binaries.sh builds into."""
    return cache_dir() / "bin" / K8S_VERSION


def search_dirs() -> list[Path]:
    dirs = [os.environ.get("KUBETUNE_BIN_DIR"), os.environ.get("KUBEBUILDER_ASSETS")]
    return [Path(d) for d in dirs if d] + [build_dir()]


def find_binary(name: str) -> Path | None:
    for directory in search_dirs():
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_binaries(names: tuple[str, ...] = ALL_BINARIES) -> dict[str, Path | None]:
    return {name: find_binary(name) for name in names}


def missing_binaries(names: tuple[str, ...] = (*CONTROL_PLANE_BINARIES, "kubectl")) -> list[str]:
    return [name for name, path in find_binaries(names).items() if path is None]


def require_binaries(
    names: tuple[str, ...] = (*CONTROL_PLANE_BINARIES, "kubectl"),
) -> dict[str, Path]:
    found = find_binaries(names)
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise FileNotFoundError(
            f"missing Kubernetes binaries: {', '.join(missing)} (looked in "
            f"{', '.join(str(d) for d in search_dirs())}); build them with "
            "`bash hack/k8s-binaries.sh`"
        )
    return {name: path for name, path in found.items() if path is not None}
