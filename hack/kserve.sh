#!/usr/bin/env bash
# Provides KServe's CRDs (InferenceService, LLMInferenceService) for the serving tests: the
# API server validates kubetune's serving manifests against them (`kubectl apply
# --dry-run=server`). The version is the one kubetune/serving.py writes manifests for; the
# CRDs come from the github.com/kserve/kserve module zip (the Go module proxy) and are
# copied into ~/.cache/kubetune/kserve-<version>/. A second run downloads nothing.
#
# Usage:
#   bash hack/kserve.sh              fetch what is missing, print where it is
#   bash hack/kserve.sh --print-dir  only print the directory of this version
#
# Environment: KUBETUNE_CACHE_DIR (default ~/.cache/kubetune), GO (default: go on PATH).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KSERVE_VERSION="$(awk -F'"' '/^KSERVE_VERSION = / {print $2}' "$ROOT/kubetune/serving.py")"
CACHE_DIR="${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}"
OUT_DIR="$CACHE_DIR/kserve-$KSERVE_VERSION"
GO="${GO:-go}"
CRDS=(serving.kserve.io_inferenceservices.yaml llmisvc/serving.kserve.io_llminferenceservices.yaml)

case "${1:-}" in
  --print-dir) echo "$OUT_DIR"; exit 0 ;;
  "") ;;
  *) echo "unknown argument: $1" >&2; exit 2 ;;
esac
[[ -n "$KSERVE_VERSION" ]] || { echo "no KSERVE_VERSION in kubetune/serving.py" >&2; exit 1; }

if [[ -f "$OUT_DIR/.complete" ]]; then
  echo "kserve CRDs $KSERVE_VERSION: $OUT_DIR (nothing to fetch)"
  exit 0
fi
command -v "$GO" >/dev/null || { echo "the Go toolchain ($GO) is needed to fetch KServe's CRDs" >&2; exit 1; }

# Same module cache as hack/k8s-binaries.sh and hack/kueue.sh.
export GOPATH="$CACHE_DIR/go" GOMODCACHE="$CACHE_DIR/go/mod" GOFLAGS=-mod=mod GOTOOLCHAIN=local
source_dir="$(cd "$(mktemp -d)" && "$GO" mod download -json "github.com/kserve/kserve@$KSERVE_VERSION" \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')"
mkdir -p "$OUT_DIR"
for crd in "${CRDS[@]}"; do
  cp -f "$source_dir/config/crd/full/$crd" "$OUT_DIR/"
done
chmod -R u+w "$OUT_DIR"
touch "$OUT_DIR/.complete"
echo "kserve CRDs $KSERVE_VERSION: $OUT_DIR"
