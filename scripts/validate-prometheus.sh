#!/usr/bin/env bash
# promtool check config / check rules / test rules on deploy/prometheus (Debian package prometheus).
# usage: scripts/validate-prometheus.sh [DIR]   (default deploy/prometheus)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-deploy/prometheus}
command -v promtool >/dev/null || { echo "validate-prometheus: FAIL promtool not found (apt-get install prometheus)"; exit 1; }
promtool check config "$dir/prometheus.yml"
promtool check rules "$dir/alerts.yml"
promtool test rules "$dir/alerts_test.yml"
# Every alert must have a unit test (an alert_rule_test naming it).
missing=$(python3 - "$dir" <<'PY'
import sys, yaml
d = sys.argv[1]
rules = {r["alert"] for g in yaml.safe_load(open(f"{d}/alerts.yml"))["groups"] for r in g["rules"] if "alert" in r}
tested = {t["alertname"] for c in yaml.safe_load(open(f"{d}/alerts_test.yml"))["tests"] for t in c.get("alert_rule_test", [])}
print(" ".join(sorted(rules - tested)))
PY
)
[ -z "$missing" ] || { echo "validate-prometheus: FAIL alerts without a unit test: $missing"; exit 1; }
echo "validate-prometheus: ok   $dir"
