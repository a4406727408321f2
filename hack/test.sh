#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what is missing, builds the Kubernetes
# binaries (control plane and the real node) and kubetune's two images, then runs pytest.
#   bash hack/test.sh [pytest args...]
# Heavy things are cached outside the checkout and rebuilt only when their inputs change:
# Python wheels by uv (~/.cache/uv), the Kubernetes binaries and Go caches under
# ~/.cache/kubetune/ (keyed by version), the images' Debian base (keyed by its version) and
# their dependency layers (keyed by uv.lock) in podman's storage, their OCI archives under
# ~/.cache/kubetune/images/ (rewritten only when an image changed). A second run spends its
# time in the tests.
#
# The end-to-end tests of tests/e2e/test_real_node.py run kubetune as its users do: the
# operator from its image installed with `helm install`, trainer pods from the trainer
# image under the real node (kubelet + containerd, root needed). The other cluster tests
# run on the process node (pods as host processes), which tests the operator's API
# behaviour in seconds; see docs/local-node.md.
set -euo pipefail
cd "$(dirname "$0")/.."

source hack/lib.sh
ensure_python_env

step "Kubernetes binaries (control plane and real node)"
start=$SECONDS
bash hack/k8s-binaries.sh
echo "binaries ready in $((SECONDS - start)) s"

step "Kueue (for the quota tests)"
start=$SECONDS
bash hack/kueue.sh
echo "Kueue ready in $((SECONDS - start)) s"

step "serving: KServe's CRDs and the vLLM environment (for tests/serving)"
start=$SECONDS
bash hack/kserve.sh
bash hack/vllm.sh
bash hack/llamacpp.sh
echo "serving parts ready in $((SECONDS - start)) s"

step "images (operator and trainer)"
start=$SECONDS
nice bash hack/images.sh
echo "images ready in $((SECONDS - start)) s"

step "lint"
uv run --frozen --no-sync ruff check .
uv run --frozen --no-sync ruff format --check .
uv run --frozen --no-sync python -m kubetune.api.crd --check

step "tests"
# Cluster tests must not be skipped here: missing binaries or images are an error.
export KUBETUNE_REQUIRE_CLUSTER=1 KUBETUNE_REQUIRE_IMAGES=1
uv run --frozen --no-sync pytest -q -ra --durations=25 "$@"
