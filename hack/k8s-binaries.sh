#!/usr/bin/env bash
# Provides the Kubernetes binaries the dev cluster and the cluster tests run:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and helm.
#
# Each binary is taken from the first place that has it:
#   1. $KUBETUNE_BIN_DIR          (binaries you provide yourself)
#   2. $KUBEBUILDER_ASSETS        (envtest assets: usually etcd, kube-apiserver, kubectl)
#   3. the build cache            ~/.cache/kubetune/bin/<k8s-version>/
# and whatever is still missing is built from source with the Go toolchain into the
# build cache, from the Go modules pinned in hack/k8s-binaries/{kube,etcd,helm}.
#
# Usage:
#   bash hack/k8s-binaries.sh              build what is missing, print where each binary is
#   bash hack/k8s-binaries.sh --print-dir  only print the build cache directory
#   bash hack/k8s-binaries.sh --check      exit 1 (building nothing) if any binary is missing
#
# Environment: KUBETUNE_BIN_DIR, KUBEBUILDER_ASSETS, KUBETUNE_CACHE_DIR (default
# ~/.cache/kubetune), GO (default: go on PATH), KUBETUNE_BUILD_JOBS (default 2).
set -euo pipefail

K8S_VERSION=v1.36.3
HELM_VERSION=v3.22.0
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl helm)

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODULES="$HERE/k8s-binaries"
CACHE_DIR="${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}"
BUILD_DIR="$CACHE_DIR/bin/$K8S_VERSION"
GO="${GO:-go}"

mode="${1:-build}"
case "$mode" in
  build|--build) mode=build ;;
  --print-dir) echo "$BUILD_DIR"; exit 0 ;;
  --check) mode=check ;;
  -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
  *) echo "unknown argument: $mode" >&2; exit 2 ;;
esac

# Where an existing copy of a binary is, or nothing.
find_binary() {
  local name="$1" dir
  for dir in "${KUBETUNE_BIN_DIR:-}" "${KUBEBUILDER_ASSETS:-}" "$BUILD_DIR"; do
    if [[ -n "$dir" && -x "$dir/$name" ]]; then
      echo "$dir/$name"
      return 0
    fi
  done
  return 1
}

missing=()
for name in "${BINARIES[@]}"; do
  find_binary "$name" >/dev/null || missing+=("$name")
done

if [[ ${#missing[@]} -eq 0 ]]; then
  for name in "${BINARIES[@]}"; do echo "$name: $(find_binary "$name")"; done
  echo "all binaries present, nothing to build"
  exit 0
fi
if [[ "$mode" == check ]]; then
  echo "missing: ${missing[*]}" >&2
  exit 1
fi

command -v "$GO" >/dev/null || { echo "the Go toolchain ($GO) is needed to build: ${missing[*]}" >&2; exit 1; }

# The module and build caches live beside the binaries so a second run is quick and
# nothing is written into the checkout.
export GOPATH="$CACHE_DIR/go"
export GOMODCACHE="$CACHE_DIR/go/mod"
export GOCACHE="$CACHE_DIR/go/cache"
export GOFLAGS="-p=${KUBETUNE_BUILD_JOBS:-2} -buildvcs=false -trimpath"
export CGO_ENABLED=0
export GOTOOLCHAIN=local
mkdir -p "$BUILD_DIR"

build_date="$(date -u -d "@${SOURCE_DATE_EPOCH:-$(date +%s)}" +%Y-%m-%dT%H:%M:%SZ)"
kube_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kube_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION"
  kube_ldflags+=" -X $pkg.gitMajor=$(echo "$K8S_VERSION" | sed -E 's/^v([0-9]+)\..*/\1/')"
  kube_ldflags+=" -X $pkg.gitMinor=$(echo "$K8S_VERSION" | sed -E 's/^v[0-9]+\.([0-9]+)\..*/\1/')"
  kube_ldflags+=" -X $pkg.gitTreeState=clean"
  kube_ldflags+=" -X $pkg.buildDate=$build_date"
done
helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"

# module dir, Go package and link flags for one binary
build_spec() {
  case "$1" in
    kube-apiserver|kube-controller-manager|kube-scheduler|kubectl)
      echo "kube|k8s.io/kubernetes/cmd/$1|$kube_ldflags" ;;
    etcd) echo "etcd|.|-s -w" ;;
    helm) echo "helm|helm.sh/helm/v3/cmd/helm|$helm_ldflags" ;;
  esac
}

echo "building ${missing[*]} into $BUILD_DIR (Kubernetes $K8S_VERSION, $("$GO" version | awk '{print $3}'), ${KUBETUNE_BUILD_JOBS:-2} jobs)"
total_start=$(date +%s)
for name in "${missing[@]}"; do
  IFS='|' read -r module pkg ldflags <<<"$(build_spec "$name")"
  start=$(date +%s)
  echo "==> $name ($pkg)"
  # Build to a temporary name so an interrupted build never leaves a broken binary
  # that a later run would take as done.
  (cd "$MODULES/$module" && nice -n 10 "$GO" build -ldflags "$ldflags" -o "$BUILD_DIR/.$name.tmp" "$pkg")
  mv -f "$BUILD_DIR/.$name.tmp" "$BUILD_DIR/$name"
  echo "    $name built in $(( $(date +%s) - start ))s"
done
echo "built ${#missing[@]} binaries in $(( $(date +%s) - total_start ))s total"
for name in "${BINARIES[@]}"; do echo "$name: $(find_binary "$name")"; done
