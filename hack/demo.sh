#!/usr/bin/env bash
# The full local demo, the README's main command:
#   bash hack/demo.sh            (extra arguments go to `kubetune demo`, e.g. --keep)
# Installs the Python environment from the project's own files (uv, then the locked
# dependencies with the trainer extra and the dev group, which has the S3 server), builds the
# Kubernetes binaries if they are missing (about 7 minutes once, then cached), then runs
# `kubetune demo`: a local control plane and node, an S3 endpoint and the operator run
# examples/quickstart-cluster.yaml as a FineTuneJob, with live progress, the artifacts in S3
# and the evaluation summary; everything is stopped at the end. About a minute on 2 CPU cores
# once the binaries exist.
#
# Without a cluster, the trainer alone: see the top of examples/quickstart.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."

source hack/lib.sh
ensure_python_env

if ! bash hack/k8s-binaries.sh --check >/dev/null 2>&1; then
  step "building the Kubernetes binaries (once; about 7 minutes, then cached)"
  bash hack/k8s-binaries.sh
fi

step "kubetune demo"
uv run --frozen --no-sync kubetune demo "$@"
