#!/usr/bin/env bash
# The quickstart, end to end on this machine in about a minute: no GPU, no cloud, no model hub.
#   bash hack/demo.sh
# Installs the Python environment from the project's own files (uv, then the locked
# dependencies with the trainer extra), writes a tiny random model and an instruction data
# set to /tmp/kubetune-quickstart, fine-tunes it with LoRA (examples/quickstart.yaml) and
# shows the artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."

source hack/lib.sh
ensure_python_env

demo_dir=/tmp/kubetune-quickstart  # the paths examples/quickstart.yaml names

step "demo inputs: tiny random model and instruction data in $demo_dir"
# A fresh start: checkpoints left by an earlier demo would be resumed from.
rm -rf "$demo_dir"
uv run --frozen --no-sync python -m kubetune_trainer.demo_assets "$demo_dir"

step "kubetune run examples/quickstart.yaml"
start=$SECONDS
uv run --frozen --no-sync kubetune run examples/quickstart.yaml
echo "fine-tuned in $((SECONDS - start)) s"

step "artifacts"
run_dir="$demo_dir/out/local/quickstart"
find "$run_dir" -path "$run_dir/checkpoints" -prune -o -type f -printf '%9s  %P\n' | sort -k2
echo
echo "manifest:    $run_dir/manifest.json"
echo "report:      $run_dir/report.md"
echo "loss curve:  $run_dir/loss_curve.png"
