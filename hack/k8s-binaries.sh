#!/usr/bin/env bash
# Provides the binaries and images the dev cluster and the cluster tests run.
#
#   control plane  etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
#                  kubectl, helm
#   real node      kubelet, kube-proxy (same Kubernetes pin), containerd 2.x with
#                  containerd-shim-runc-v2 and ctr, and three OCI image archives built
#                  FROM scratch here (nothing is pulled): pause (the pod sandbox),
#                  coredns (the cluster DNS) and testbox (a test server and client);
#                  runc, the CNI plugins, iptables and conntrack from Debian packages.
#
# Each binary is taken from the first place that has it:
#   1. $KUBETUNE_BIN_DIR          (binaries you provide yourself)
#   2. $KUBEBUILDER_ASSETS        (envtest assets: usually etcd, kube-apiserver, kubectl)
#   3. the build cache            ~/.cache/kubetune/bin/<version>/
# and whatever is still missing is built from source with the Go toolchain into the
# build cache, from the Go modules pinned in hack/k8s-binaries/<module>/. The versions
# are those pinned in each module's go.mod (the one place they are written down);
# the cache is keyed by them: bin/<k8s version>/, bin/containerd-<version>/,
# bin/coredns-<version>/, bin/images-<images/VERSION>/ and images/*.oci.tar.
#
# Usage:
#   bash hack/k8s-binaries.sh                  build what is missing, print where it is
#   bash hack/k8s-binaries.sh --control-plane  the same for the control plane only
#   bash hack/k8s-binaries.sh --print-dir      only print the control plane's cache dir
#   bash hack/k8s-binaries.sh --check [--control-plane]
#                                              exit 1 (building nothing) if any is missing
#
# Environment: KUBETUNE_BIN_DIR, KUBEBUILDER_ASSETS, KUBETUNE_CACHE_DIR (default
# ~/.cache/kubetune), GO (default: go on PATH), KUBETUNE_BUILD_JOBS (default 2).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODULES="$HERE/k8s-binaries"
CACHE_DIR="${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}"
GO="${GO:-go}"

# The version a module dir pins for a Go module path (from its go.mod).
module_version() {
  awk -v path="$2" '($1 == path || ($1 == "require" && $2 == path)) { print ($1 == path ? $2 : $3); exit }' \
    "$MODULES/$1/go.mod"
}

K8S_VERSION="$(module_version kube k8s.io/kubernetes)"
HELM_VERSION="$(module_version helm helm.sh/helm/v3)"
CONTAINERD_VERSION="$(module_version containerd github.com/containerd/containerd/v2)"
COREDNS_VERSION="$(module_version coredns github.com/coredns/coredns)"
IMAGES_VERSION="$(cat "$MODULES/images/VERSION")"

BUILD_DIR="$CACHE_DIR/bin/$K8S_VERSION"
CONTAINERD_DIR="$CACHE_DIR/bin/containerd-$CONTAINERD_VERSION"
COREDNS_DIR="$CACHE_DIR/bin/coredns-$COREDNS_VERSION"
IMAGES_BIN_DIR="$CACHE_DIR/bin/images-$IMAGES_VERSION"
IMAGES_DIR="$CACHE_DIR/images"

CONTROL_PLANE=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl helm)
NODE_BINARIES=(kubelet kube-proxy containerd containerd-shim-runc-v2 ctr)
# image name -> archive; their programs (coredns, pause, testbox) are built first.
declare -A IMAGE_ARCHIVES=(
  [pause]="$IMAGES_DIR/pause-$IMAGES_VERSION.oci.tar"
  [testbox]="$IMAGES_DIR/testbox-$IMAGES_VERSION.oci.tar"
  [coredns]="$IMAGES_DIR/coredns-$COREDNS_VERSION.oci.tar"
)
DEBIAN_PACKAGES=(runc containernetworking-plugins iptables conntrack)

mode=build
scope=all
for arg in "$@"; do
  case "$arg" in
    build|--build) mode=build ;;
    --control-plane) scope=control-plane ;;
    --print-dir) echo "$BUILD_DIR"; exit 0 ;;
    --check) mode=check ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

# The cache directory a binary is built into.
output_dir() {
  case "$1" in
    containerd|containerd-shim-runc-v2|ctr) echo "$CONTAINERD_DIR" ;;
    coredns) echo "$COREDNS_DIR" ;;
    pause|testbox) echo "$IMAGES_BIN_DIR" ;;
    *) echo "$BUILD_DIR" ;;
  esac
}

# Where an existing copy of a binary is, or nothing.
find_binary() {
  local name="$1" dir
  for dir in "${KUBETUNE_BIN_DIR:-}" "${KUBEBUILDER_ASSETS:-}" "$(output_dir "$name")"; do
    if [[ -n "$dir" && -x "$dir/$name" ]]; then
      echo "$dir/$name"
      return 0
    fi
  done
  return 1
}

wanted=("${CONTROL_PLANE[@]}")
[[ "$scope" == all ]] && wanted+=("${NODE_BINARIES[@]}")
missing=()
for name in "${wanted[@]}"; do
  find_binary "$name" >/dev/null || missing+=("$name")
done
missing_images=()
missing_packages=()
if [[ "$scope" == all ]]; then
  for image in pause testbox coredns; do
    [[ -f "${IMAGE_ARCHIVES[$image]}" ]] || missing_images+=("$image")
  done
  for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing_packages+=("$pkg")
  done
fi

report() {
  for name in "${wanted[@]}"; do echo "$name: $(find_binary "$name")"; done
  if [[ "$scope" == all ]]; then
    for image in pause testbox coredns; do echo "$image image: ${IMAGE_ARCHIVES[$image]}"; done
  fi
}

if [[ ${#missing[@]} -eq 0 && ${#missing_images[@]} -eq 0 && ${#missing_packages[@]} -eq 0 ]]; then
  report
  echo "all present, nothing to build"
  exit 0
fi
if [[ "$mode" == check ]]; then
  echo "missing: ${missing[*]} ${missing_images[*]/%/ image} ${missing_packages[*]/%/ (Debian)}" >&2
  exit 1
fi

if [[ ${#missing_packages[@]} -gt 0 ]]; then
  # shellcheck source=hack/lib.sh
  source "$HERE/lib.sh"
  ensure_apt_packages "${missing_packages[@]}"
fi

# An image needs its program: build that too when the archive is missing.
for image in "${missing_images[@]}"; do
  find_binary "$image" >/dev/null || missing+=("$image")
done
[[ ${#missing[@]} -gt 0 || ${#missing_images[@]} -gt 0 ]] || { report; exit 0; }

command -v "$GO" >/dev/null || { echo "the Go toolchain ($GO) is needed to build: ${missing[*]}" >&2; exit 1; }

# The module and build caches live beside the binaries so a second run is quick and
# nothing is written into the checkout.
export GOPATH="$CACHE_DIR/go"
export GOMODCACHE="$CACHE_DIR/go/mod"
export GOCACHE="$CACHE_DIR/go/cache"
export GOFLAGS="-p=${KUBETUNE_BUILD_JOBS:-2} -buildvcs=false -trimpath"
export CGO_ENABLED=0
export GOTOOLCHAIN=local

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
# kubelet reports this as the node's containerRuntimeVersion (containerd://2.x.y).
containerd_ldflags="-s -w -X github.com/containerd/containerd/v2/version.Version=${CONTAINERD_VERSION#v}"
coredns_ldflags="-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION"

# module dir, Go package and link flags for one binary
build_spec() {
  case "$1" in
    kube-apiserver|kube-controller-manager|kube-scheduler|kubectl|kubelet|kube-proxy)
      echo "kube|k8s.io/kubernetes/cmd/$1|$kube_ldflags" ;;
    etcd) echo "etcd|.|-s -w" ;;
    helm) echo "helm|helm.sh/helm/v3/cmd/helm|$helm_ldflags" ;;
    containerd|containerd-shim-runc-v2|ctr)
      echo "containerd|github.com/containerd/containerd/v2/cmd/$1|$containerd_ldflags" ;;
    coredns) echo "coredns|.|$coredns_ldflags" ;;
    pause|testbox) echo "images|./$1|-s -w" ;;
  esac
}

echo "building ${missing[*]} (Kubernetes $K8S_VERSION, containerd $CONTAINERD_VERSION, CoreDNS $COREDNS_VERSION, $("$GO" version | awk '{print $3}'), ${KUBETUNE_BUILD_JOBS:-2} jobs)"
total_start=$(date +%s)
for name in "${missing[@]}"; do
  IFS='|' read -r module pkg ldflags <<<"$(build_spec "$name")"
  out="$(output_dir "$name")"
  mkdir -p "$out"
  start=$(date +%s)
  echo "==> $name ($pkg) into $out"
  # Build to a temporary name so an interrupted build never leaves a broken binary
  # that a later run would take as done.
  (cd "$MODULES/$module" && nice -n 10 "$GO" build -ldflags "$ldflags" -o "$out/.$name.tmp" "$pkg")
  mv -f "$out/.$name.tmp" "$out/$name"
  echo "    $name built in $(( $(date +%s) - start ))s"
done

# The images: one layer each, written as an OCI archive by a standard-library script.
# CoreDNS runs as a non-root user on an unprivileged port (the DNS Service maps 53 to it).
build_image() {
  local image="$1" archive="${IMAGE_ARCHIVES[$1]}" tag
  local args=(--out "$archive")
  case "$image" in
    pause) tag="$IMAGES_VERSION"; args+=(--file "$(find_binary pause):/pause:0755" --entrypoint /pause --user 65535:65535) ;;
    testbox) tag="$IMAGES_VERSION"; args+=(--file "$(find_binary testbox):/testbox:0755" --dir /tmp:1777 --entrypoint /testbox --user 65532:65532) ;;
    coredns) tag="$COREDNS_VERSION"; args+=(--file "$(find_binary coredns):/coredns:0755" --entrypoint /coredns --user 65532:65532) ;;
  esac
  mkdir -p "$IMAGES_DIR"
  python3 "$MODULES/images/oci_archive.py" --name "localhost/kubetune/$image:$tag" "${args[@]}"
  echo "==> image localhost/kubetune/$image:$tag: $archive ($(du -h "$archive" | cut -f1))"
}
for image in "${missing_images[@]}"; do build_image "$image"; done

echo "built ${#missing[@]} binaries and ${#missing_images[@]} images in $(( $(date +%s) - total_start ))s total"
report
