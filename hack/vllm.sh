#!/usr/bin/env bash
# Provides the serving test environment: vLLM's CPU build (the real `vllm` OpenAI server)
# and KServe's storage initializer code (`kserve-storage`), installed from PyPI with uv
# from hack/serving/vllm.lock into ~/.cache/kubetune/vllm-<lock hash>/. A second run
# installs nothing; a changed lock makes a new environment.
#
# Usage:
#   bash hack/vllm.sh              install what is missing, print where it is
#   bash hack/vllm.sh --print-dir  only print the environment's directory
#
# Environment: KUBETUNE_CACHE_DIR (default ~/.cache/kubetune).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCK="$ROOT/hack/serving/vllm.lock"
CACHE_DIR="${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}"
KEY="$(sha256sum "$LOCK" | cut -c1-12)"
ENV_DIR="$CACHE_DIR/vllm-$KEY"

case "${1:-}" in
  --print-dir) echo "$ENV_DIR"; exit 0 ;;
  "") ;;
  *) echo "unknown argument: $1" >&2; exit 2 ;;
esac

if [[ -f "$ENV_DIR/.complete" ]]; then
  echo "vllm environment: $ENV_DIR (nothing to install)"
  exit 0
fi
rm -rf "$ENV_DIR"
uv venv --quiet --python 3.11 "$ENV_DIR"
VIRTUAL_ENV="$ENV_DIR" uv pip sync --quiet "$LOCK"
"$ENV_DIR/bin/python" -c "import vllm, kserve_storage"
touch "$ENV_DIR/.complete"
echo "vllm environment: $ENV_DIR"
# Environments of older locks are removed: each is several GB.
for old in "$CACHE_DIR"/vllm-*; do
  [[ "$old" != "$ENV_DIR" && -d "$old" ]] && rm -rf "$old"
done
exit 0
