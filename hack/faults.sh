#!/usr/bin/env bash
# The fault campaign of docs/reliability.md, run RUNS times (default 1), each run with a new
# seed for the operator burst's kill points:
#   bash hack/faults.sh [RUNS] [pytest args...]
#   KUBETUNE_FAULT_BURST=500 bash hack/faults.sh 3     a bigger burst, three times
# CI runs each fault once, in `bash hack/test.sh`. A failing burst prints its seed; replay it
# with KUBETUNE_FAULT_SEED=<seed>.
set -euo pipefail
cd "$(dirname "$0")/.."

source hack/lib.sh
ensure_python_env

runs="${1:-1}"
shift || true
export KUBETUNE_REQUIRE_CLUSTER=1
for run in $(seq 1 "$runs"); do
  step "fault campaign: run $run of $runs"
  uv run --frozen --no-sync pytest -q -s -ra --durations=5 \
    tests/e2e/test_faults_operator.py \
    tests/e2e/test_faults_trainer.py \
    tests/e2e/test_faults_control_plane.py "$@"
done
