#!/usr/bin/env bash
# Render deploy/k8s with `kubectl kustomize` and validate the result (scripts/check-k8s.py:
# kubernetes-validate --strict for built-in kinds, a vendored schema for the ServiceMonitor CRD).
# kubectl: any kubectl on PATH; CI installs Debian's kubernetes-client when none is there.
# usage: scripts/validate-k8s.sh [KUSTOMIZE_DIR]   (default deploy/k8s)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-deploy/k8s}
command -v kubectl >/dev/null || { echo "validate-k8s: FAIL kubectl not found (apt-get install kubernetes-client)"; exit 1; }
tmp=$(mktemp); trap 'rm -f "$tmp"' EXIT
kubectl kustomize "$dir" > "$tmp"
python3 scripts/check-k8s.py "$tmp"
