#!/usr/bin/env bash
# Provides Kueue for the dev cluster and the Kueue end-to-end test: the controller
# manager binary and the manifests (CRDs, webhook configurations) of the same release.
#
# The binary is built from the Go module pinned in hack/k8s-binaries/kueue into the
# build cache ~/.cache/kubetune/bin/kueue-<version>/kueue, and the manifests are copied
# from the module zip (config/components/{crd/bases,webhook}) into
# ~/.cache/kubetune/bin/kueue-<version>/manifests/. A second run builds nothing.
#
# Usage:
#   bash hack/kueue.sh              build what is missing, print where it is
#   bash hack/kueue.sh --print-dir  only print the directory of this version
#   bash hack/kueue.sh --check      exit 1 (building nothing) if anything is missing
#
# Environment: KUBETUNE_CACHE_DIR (default ~/.cache/kubetune), GO (default: go on PATH),
# KUBETUNE_BUILD_JOBS (default 2). The build takes several minutes on two cores.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODULE_DIR="$HERE/k8s-binaries/kueue"
KUEUE_VERSION="$(awk '$1 == "sigs.k8s.io/kueue" {print $2}' "$MODULE_DIR/go.mod")"
CACHE_DIR="${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}"
BUILD_DIR="$CACHE_DIR/bin/kueue-$KUEUE_VERSION"
GO="${GO:-go}"

mode="${1:-build}"
case "$mode" in
  build|--build) mode=build ;;
  --print-dir) echo "$BUILD_DIR"; exit 0 ;;
  --check) mode=check ;;
  -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
  *) echo "unknown argument: $mode" >&2; exit 2 ;;
esac

complete() { [[ -x "$BUILD_DIR/kueue" && -f "$BUILD_DIR/manifests/webhooks.yaml" ]]; }

if complete; then
  echo "kueue $KUEUE_VERSION: $BUILD_DIR (nothing to build)"
  exit 0
fi
if [[ "$mode" == check ]]; then
  echo "kueue $KUEUE_VERSION is missing from $BUILD_DIR" >&2
  exit 1
fi
command -v "$GO" >/dev/null || { echo "the Go toolchain ($GO) is needed to build Kueue" >&2; exit 1; }

# Same caches as hack/k8s-binaries.sh, so shared dependencies are downloaded once.
export GOPATH="$CACHE_DIR/go"
export GOMODCACHE="$CACHE_DIR/go/mod"
export GOCACHE="$CACHE_DIR/go/cache"
export GOFLAGS="-p=${KUBETUNE_BUILD_JOBS:-2} -buildvcs=false -trimpath"
export CGO_ENABLED=0
export GOTOOLCHAIN=local
mkdir -p "$BUILD_DIR/manifests/crds"

start=$(date +%s)
echo "building kueue $KUEUE_VERSION into $BUILD_DIR ($("$GO" version | awk '{print $3}'))"
ldflags="-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION"
# A temporary name first, so an interrupted build never looks finished.
(cd "$MODULE_DIR" && nice -n 10 "$GO" build -ldflags "$ldflags" -o "$BUILD_DIR/.kueue.tmp" sigs.k8s.io/kueue/cmd/kueue)

source_dir="$(cd "$MODULE_DIR" && "$GO" list -m -f '{{.Dir}}' sigs.k8s.io/kueue)"
cp -f "$source_dir"/config/components/crd/bases/*.yaml "$BUILD_DIR/manifests/crds/"
cp -f "$source_dir/config/components/webhook/manifests.yaml" "$BUILD_DIR/manifests/.webhooks.tmp"
chmod -R u+w "$BUILD_DIR/manifests"
mv -f "$BUILD_DIR/manifests/.webhooks.tmp" "$BUILD_DIR/manifests/webhooks.yaml"
mv -f "$BUILD_DIR/.kueue.tmp" "$BUILD_DIR/kueue"
echo "kueue $KUEUE_VERSION built in $(( $(date +%s) - start ))s: $BUILD_DIR"
