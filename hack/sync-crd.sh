#!/usr/bin/env bash
# Regenerates the FineTuneJob CRD from kubetune/api/v1alpha1.py into both places that ship it:
# crds/ (kubectl apply -f crds/) and the Helm chart's crds/ (installed by `helm install`).
# tests/chart/test_helm.py fails when the two differ or are stale.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
cd "$ROOT"
"$PYTHON" -m kubetune.api.crd
"$PYTHON" -m kubetune.api.crd --out helm/kubetune/crds/kubetune.io_finetunejobs.yaml
