#!/usr/bin/env bash
# End-to-end check of the observability stack against a real sealpipe and a real Prometheus:
#   backend (python echo) <- sealpipe decrypt (2 targets: backend + a dead port)
#                         <== sealpipe encrypt (right key, upstream rate limit) <- clients
#                         <== sealpipe encrypt (WRONG key) <- clients   (handshake failures)
#   backend <- sealpipe forward --max-conns 1                           (max_conns rejections)
# A Prometheus server on 127.0.0.1 scrapes all four metrics endpoints every 1 s and loads
# deploy/prometheus/alerts.yml. Then every Grafana panel expr must parse and return data, every
# variable query must return data, every alert expr must parse, every loaded rule must evaluate
# without error, and `promtool check metrics` must pass on a live scrape of each process.
# Finally SIGHUP must count a reload and SIGTERM must drain and exit 0.
#
# usage: SEALPIPE_BIN=target/release/sealpipe scripts/e2e-prometheus.sh
# needs: prometheus + promtool (Debian package prometheus), python3 with PyYAML.
# It kills only the processes it started (their PIDs), on any exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bin=${SEALPIPE_BIN:-target/release/sealpipe}
[ -x "$bin" ] || { echo "e2e: FAIL sealpipe binary $bin not found (cargo build --release, or set SEALPIPE_BIN)"; exit 1; }
bin=$(realpath "$bin")
for t in prometheus promtool python3; do command -v $t >/dev/null || { echo "e2e: FAIL $t not found"; exit 1; }; done
H="python3 $root/scripts/e2e_helper.py"

tmp=$(mktemp -d)
. scripts/own_pids.sh
cleanup() {
  rc=$?
  stop_own_pids
  if [ $rc -ne 0 ]; then
    for f in "$tmp"/*.log; do [ -f "$f" ] && { echo "---- $(basename "$f") (last 30 lines)"; tail -n 30 "$f"; }; done
  fi
  rm -rf "$tmp"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
start() { # start NAME CMD...: background, log to $tmp/NAME.log, remember the PID
  local name=$1; shift
  "$@" >"$tmp/$name.log" 2>&1 &
  pids+=($!)
  eval "pid_${name//-/_}=$!"
}

read -r p_back p_dead p_dec p_enc p_wrong p_fwd m_dec m_enc m_wrong m_fwd p_prom <<<"$($H free-ports 11)"

"$bin" keygen --out "$tmp/right.key"
"$bin" keygen --out "$tmp/wrong.key"

start backend python3 "$root/scripts/e2e_helper.py" backend "$p_back"
start decrypt "$bin" decrypt --listen "127.0.0.1:$p_dec" --target "127.0.0.1:$p_back,127.0.0.1:$p_dead" \
  --key "$tmp/right.key" --threads 2 --metrics "127.0.0.1:$m_dec" --connect-timeout 2 --balance round-robin
start encrypt "$bin" encrypt --listen "127.0.0.1:$p_enc" --target "127.0.0.1:$p_dec" \
  --key "$tmp/right.key" --threads 2 --metrics "127.0.0.1:$m_enc" --upstream-rate 64MB --rate-burst 1MiB
start wrongkey "$bin" encrypt --listen "127.0.0.1:$p_wrong" --target "127.0.0.1:$p_dec" \
  --key "$tmp/wrong.key" --threads 1 --metrics "127.0.0.1:$m_wrong"
start forward "$bin" forward --listen "127.0.0.1:$p_fwd" --target "127.0.0.1:$p_back" \
  --threads 1 --max-conns 1 --metrics "127.0.0.1:$m_fwd"

cat > "$tmp/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $root/deploy/prometheus/alerts.yml
scrape_configs:
  - job_name: sealpipe
    static_configs:
      - targets: ["127.0.0.1:$m_dec"]
        labels: {side: decrypt}
      - targets: ["127.0.0.1:$m_enc"]
        labels: {side: encrypt}
      - targets: ["127.0.0.1:$m_wrong"]
        labels: {side: encrypt-wrong-key}
      - targets: ["127.0.0.1:$m_fwd"]
        labels: {side: forward}
YML
promtool check config "$tmp/prometheus.yml" >/dev/null
start prometheus prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/data" \
  --web.listen-address="127.0.0.1:$p_prom" --log.level=warn
prom=127.0.0.1:$p_prom

# Sync on readiness, never on sleeps.
$H wait-tcp "$p_back" 20
for m in "$m_dec" "$m_enc" "$m_wrong" "$m_fwd"; do $H wait-http "http://127.0.0.1:$m/readyz" 200 30; done
$H wait-http "http://$prom/-/ready" 200 60

$H traffic "$p_enc" "$p_wrong" "$p_fwd"

# The encrypt side's rate limit held the bulk transfer back (and counted it).
$H wait-metric "127.0.0.1:$m_enc" '^sealpipe_throttled_total\{[^}]*direction="upstream"[^}]*\} [1-9]' 15
echo "e2e: upstream rate limit throttled the bulk transfer"

# Reload: SIGHUP must be counted as ok.
kill -HUP "$pid_decrypt"
$H wait-metric "127.0.0.1:$m_dec" '^sealpipe_config_reloads_total\{[^}]*result="ok"[^}]*\} [1-9]' 15
echo "e2e: SIGHUP reload counted"

# Enough scrapes after the traffic for rate() windows to hold >= 2 samples of every new series.
$H wait-scrapes "$prom" sealpipe 4 "$(date +%s)" 4 60

# A forward tunnel has no keys, no handshakes and no warm sessions (a pair's): those families may
# be absent there (every other family docs/METRICS.md lists must be present on every process).
no_crypto=sealpipe_keys_loaded,sealpipe_key_sessions_total,sealpipe_handshakes_total,sealpipe_handshake_duration_seconds,sealpipe_warm_sessions,sealpipe_warm_events_total
for m in "$m_dec" "$m_enc" "$m_wrong" "$m_fwd"; do
  if [ "$m" = "$m_fwd" ]; then $H check-endpoints "127.0.0.1:$m" "$no_crypto"; else $H check-endpoints "127.0.0.1:$m"; fi
  python3 -c 'import sys,urllib.request;sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1]).read())' \
    "http://127.0.0.1:$m/metrics" > "$tmp/scrape.txt"
  promtool check metrics < "$tmp/scrape.txt" || { echo "e2e: FAIL promtool check metrics on 127.0.0.1:$m"; exit 1; }
done
echo "e2e: promtool check metrics ok on all 4 processes"

# E2E_DASHBOARDS: dashboard files to check instead of grafana/dashboards/*.json (for testing the check).
# shellcheck disable=SC2086
python3 scripts/check-dashboard.py ${E2E_DASHBOARDS:-} --exprs-out "$tmp/panel-exprs.txt" --var-exprs-out "$tmp/var-exprs.txt" --rate-interval 1m
python3 - "$root/deploy/prometheus/alerts.yml" > "$tmp/rule-exprs.txt" <<'PY'
import sys, yaml
for g in yaml.safe_load(open(sys.argv[1]))["groups"]:
    for r in g["rules"]:
        print(" ".join(r["expr"].split()))
PY
$H eval "$prom" "$tmp/panel-exprs.txt" panel
$H eval "$prom" "$tmp/var-exprs.txt" variable
$H eval "$prom" "$tmp/rule-exprs.txt" rule
$H rules-health "$prom"

# Drain: SIGTERM with no open connections must exit 0 well within the 30 s drain timeout.
kill -TERM "$pid_decrypt"
deadline=$((SECONDS + 35))
while kill -0 "$pid_decrypt" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
if kill -0 "$pid_decrypt" 2>/dev/null; then echo "e2e: FAIL decrypt side still running 35 s after SIGTERM"; exit 1; fi
wait "$pid_decrypt" && drc=0 || drc=$?
[ "$drc" -eq 0 ] || { echo "e2e: FAIL decrypt side exited $drc after SIGTERM, want 0"; exit 1; }
echo "e2e: SIGTERM drained and exited 0"
echo "e2e: PASS"
