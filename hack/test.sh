#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what is missing, then runs pytest.
#   bash hack/test.sh [pytest args...]
# Heavy things are cached outside the checkout: Python wheels by uv (~/.cache/uv), the
# Kubernetes binaries and Go caches under ~/.cache/kubetune/.
set -euo pipefail
cd "$(dirname "$0")/.."

source hack/lib.sh
ensure_python_env

step "Kubernetes control-plane binaries"
bash hack/k8s-binaries.sh

step "lint"
uv run --frozen --no-sync ruff check .
uv run --frozen --no-sync python -m kubetune.api.crd --check

step "tests"
# Cluster tests must not be skipped here: missing binaries are an error, not a skip.
export KUBETUNE_REQUIRE_CLUSTER=1
uv run --frozen --no-sync pytest -q -ra --durations=15 "$@"
