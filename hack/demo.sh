#!/usr/bin/env bash
# The full local demo, the README's main command:
#   bash hack/demo.sh            (extra arguments go to `kubetune demo`, e.g. --keep)
# Installs the Python environment from the project's own files (uv, then the locked
# dependencies with the trainer extra and the dev group, which has the S3 server), builds the
# Kubernetes binaries and the real node (once, then cached) and kubetune's two images (once;
# then only what changed), then runs `kubetune demo` as its users run kubetune: a local
# control plane with a real node (kubelet + containerd), the operator from its image
# installed by `helm install`, examples/quickstart-cluster.yaml as a FineTuneJob whose trainer
# pod runs the trainer image, with live progress, the artifacts in S3 and the evaluation
# summary; everything is stopped at the end. Needs root (the node's network and mounts).
# Under a minute on 2 CPU cores once binaries and images exist: the node's images come from
# a store kept across clusters (the first run imports the 6.7 GB trainer image into it, about
# 2 minutes), the tiny model from a cache.
#
# `bash hack/demo.sh --node local` runs the operator and the trainer as host processes
# instead (no root, no images). Without a cluster, the trainer alone: see the top of
# examples/quickstart.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."

source hack/lib.sh
ensure_python_env

if ! bash hack/k8s-binaries.sh --check >/dev/null 2>&1; then
  step "building the Kubernetes binaries and the real node (once, then cached)"
  bash hack/k8s-binaries.sh
fi

if [[ " $* " != *" --node local "* ]]; then
  step "images (operator and trainer; cached, rebuilt only when something changed)"
  nice bash hack/images.sh
fi

step "kubetune demo"
uv run --frozen --no-sync kubetune demo "$@"
