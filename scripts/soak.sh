#!/usr/bin/env bash
# Soak: N idle connections held through a sealpipe pair while connection churn and
# request/response traffic run beside them, for a bounded time. Samples both sealpipe
# processes (RSS, open fds, buffer pool, error counters) every few seconds, then checks:
#   - RSS and live pool bytes flat after warm-up (second half of the run vs the first half),
#   - open fds back to their baseline once the clients have left,
#   - no error counter moved (nothing is injected here; tests/faults.rs injects faults),
#   - every loadtest scenario passed (all bytes verified, no failures).
# Prints a table and exits 0 only if every check passed.
#
#   scripts/soak.sh                               # 10,000 connections, 120 s
#   scripts/soak.sh --debug --conns 500 --duration 10   # the CI form
#
# Options: --conns N (10000), --duration S (120), --interval S (5), --churn-rate R (200/s),
# --rr-conns N (16), --debug (debug binaries: CI has them built already), --no-build,
# --keep (leave the work directory).
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=10000 DURATION=120 INTERVAL=5 CHURN_RATE=200 RR_CONNS=16 BUILD=1 KEEP=0 PROFILE=release
while [ $# -gt 0 ]; do
  case "$1" in
    --conns) CONNS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --interval) INTERVAL=$2; shift 2 ;;
    --churn-rate) CHURN_RATE=$2; shift 2 ;;
    --rr-conns) RR_CONNS=$2; shift 2 ;;
    --debug) PROFILE=debug; shift ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "soak: unknown option $1" >&2; exit 2 ;;
  esac
done

# Each sealpipe process holds two fds per connection (idle, rr, and churn connections in
# flight, more of them while the idle holder's connects queue up), plus a few dozen of its own.
# Short of that, accept pauses on EMFILE and the run fails on turned-away connections.
NEED=$((2 * (CONNS + RR_CONNS + 512) + 256))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$NEED" ]; then
  ulimit -n "$NEED" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
fi
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$NEED" ]; then
  echo "soak: need $NEED file descriptors, the hard limit is $(ulimit -Hn) (raise it as root: prlimit / ulimit -Hn)" >&2
  exit 2
fi

if [ "$BUILD" = 1 ]; then
  if [ "$PROFILE" = release ]; then
    cargo build --release --locked -p sealpipe -p loadtest >&2
  else
    cargo build --locked -p sealpipe -p loadtest >&2
  fi
fi
SP=target/$PROFILE/sealpipe
LT=target/$PROFILE/loadtest

WORK=$(mktemp -d /tmp/sealpipe-soak.XXXXXX)
PIDS=()
cleanup() {
  # Only the processes this script started, by their ids.
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "$KEEP" = 1 ]; then echo "soak: work directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
PB=$(free_port) PD=$(free_port) PE=$(free_port) MD=$(free_port) ME=$(free_port)

"$SP" keygen --out "$WORK/k.key" >/dev/null
"$LT" backend --listen "127.0.0.1:$PB" --mode echo --threads 2 >"$WORK/backend.log" 2>&1 &
PIDS+=($!)
common=(--key "$WORK/k.key" --log-level warn --drain-timeout 5)
"$SP" decrypt --listen "127.0.0.1:$PD" --target "127.0.0.1:$PB" --metrics "127.0.0.1:$MD" \
  "${common[@]}" 2>"$WORK/decrypt.log" &
DEC=$!; PIDS+=("$DEC")
"$SP" encrypt --listen "127.0.0.1:$PE" --target "127.0.0.1:$PD" --metrics "127.0.0.1:$ME" \
  "${common[@]}" 2>"$WORK/encrypt.log" &
ENC=$!; PIDS+=("$ENC")

# Ready when /readyz answers (probing the tunnel ports would count a failed handshake).
for m in "$MD" "$ME"; do
  for _ in $(seq 1 200); do
    curl -fs "http://127.0.0.1:$m/readyz" >/dev/null 2>&1 && break
    sleep 0.05
  done
  curl -fs "http://127.0.0.1:$m/readyz" >/dev/null || { echo "soak: sealpipe on :$m never became ready" >&2; exit 1; }
done
for _ in $(seq 1 200); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PB") 2>/dev/null && break
  sleep 0.05
done

# One sample line per process: phase time side rss_kib fds pool_live errors stalls warm
# (warm: the side's warm sessions, ready on the encrypt side or held unopened on the decrypt
# side: each holds one descriptor on purpose, so "fds back to baseline" discounts them)
ERRS='^sealpipe_(connections_closed_total\{reason="(peer_reset|client_reset|upstream_reset|tampered|truncated|handshake_failed|upstream_failed|drain_deadline|idle_timeout)"|handshakes_total\{result="(bad_mac|malformed|unknown_key|replay|version|truncated|too_large|timeout|fs_required|not_sealpipe)"|upstream_connect_failures_total|connections_rejected_total)'
sample() { # $1 = phase label
  local t=$(( $(date +%s) - T0 ))
  for side in decrypt encrypt; do
    local pid port
    if [ "$side" = decrypt ]; then pid=$DEC port=$MD; else pid=$ENC port=$ME; fi
    local m rss
    m=$(curl -fs "http://127.0.0.1:$port/metrics") || m=""
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$t" "$side" "$rss" \
      "$(awk '/^process_open_fds / {print $2}' <<<"$m")" \
      "$(awk '/^sealpipe_buffer_pool_bytes\{.*state="live"/ {s+=$2} END {print s+0}' <<<"$m")" \
      "$(grep -E "$ERRS" <<<"$m" | awk '{s+=$2} END {print s+0}')" \
      "$(awk '/^sealpipe_loop_stall_total/ {s+=$2} END {print s+0}' <<<"$m")" \
      "$(awk '/^sealpipe_warm_sessions[{ ]/ {s+=$2} END {print s+0}' <<<"$m")"
  done >>"$WORK/samples.tsv"
}

T0=$(date +%s)
: >"$WORK/samples.tsv"
sample baseline
curl -fs "http://127.0.0.1:$MD/metrics" >"$WORK/decrypt.baseline.prom"
curl -fs "http://127.0.0.1:$ME/metrics" >"$WORK/encrypt.baseline.prom"

# The idle holder connects first; churn and rr run for the same bounded time beside it.
"$LT" idle --target "127.0.0.1:$PE" --conns "$CONNS" --hold "$DURATION" --concurrency 256 \
  --phase-timeout 120 --pid "$ENC" --pid "$DEC" --quiet --json "$WORK/idle.json" \
  >"$WORK/idle.out" 2>&1 &
IDLE=$!; PIDS+=("$IDLE")
# Churn and rr start once the idle connections are in: the holder's connects complete at kernel
# speed, so while they pour in, a loop descheduled for a moment (2 shared cores) lets the 1024
# accept backlog fill and a churn SYN is dropped (a 1 s retry, past churn's 2 s budget).
for _ in $(seq 1 1200); do
  n=$(curl -fs "http://127.0.0.1:$ME/metrics" | awk '/^sealpipe_connections_active/ {s+=$2} END {print s+0}')
  [ "$n" -ge "$CONNS" ] && break
  kill -0 "$IDLE" 2>/dev/null || break
  sleep 0.1
done
"$LT" churn --target "127.0.0.1:$PE" --rate "$CHURN_RATE" --duration "$DURATION" --quiet \
  --json "$WORK/churn.json" >"$WORK/churn.out" 2>&1 &
CHURN=$!; PIDS+=("$CHURN")
"$LT" rr --target "127.0.0.1:$PE" --conns "$RR_CONNS" --size 512 --duration "$DURATION" --quiet \
  --json "$WORK/rr.json" >"$WORK/rr.out" 2>&1 &
RR=$!; PIDS+=("$RR")

# Sample while any client runs (bounded: the clients have their own deadlines).
LIMIT=$(( DURATION + 300 ))
while kill -0 "$IDLE" 2>/dev/null || kill -0 "$CHURN" 2>/dev/null || kill -0 "$RR" 2>/dev/null; do
  [ $(( $(date +%s) - T0 )) -lt "$LIMIT" ] || { echo "soak: clients still running after ${LIMIT}s" >&2; exit 1; }
  sample load
  sleep "$INTERVAL"
done
status=0
for n in idle churn rr; do
  eval "pid=\$$(tr a-z A-Z <<<"$n")"
  if wait "$pid"; then echo "ok" >"$WORK/$n.status"; else echo "FAILED($?)" >"$WORK/$n.status"; status=1; fi
done

# After the clients leave: fds must come back to baseline, less the warm sessions the pair keeps
# on purpose (poll with a deadline).
base_fds() { awk -F'\t' -v s="$1" '$1=="baseline" && $3==s {print $5}' "$WORK/samples.tsv"; }
for _ in $(seq 1 300); do
  sample after
  ok=1
  for side in decrypt encrypt; do
    now=$(awk -F'\t' -v s="$side" '$1=="after" && $3==s {v=$5-$9} END {print v}' "$WORK/samples.tsv")
    [ "${now:-999999}" -le "$(base_fds "$side")" ] || ok=0
  done
  [ "$ok" = 1 ] && break
  sleep 0.1
done

curl -fs "http://127.0.0.1:$MD/metrics" >"$WORK/decrypt.final.prom"
curl -fs "http://127.0.0.1:$ME/metrics" >"$WORK/encrypt.final.prom"

python3 - "$WORK" "$DURATION" "$CONNS" "$ERRS" <<'EOF' || status=1
import json, re, sys, statistics
work, duration, conns, errs = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), re.compile(sys.argv[4])
def counters(path):
    out = {}
    for line in open(path):
        if errs.match(line):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out
rows = [l.rstrip("\n").split("\t") for l in open(f"{work}/samples.tsv") if l.strip()]
def num(x):
    try: return float(x)
    except ValueError: return 0.0
ok = True
def check(cond, msg):
    global ok
    print(("PASS  " if cond else "FAIL  ") + msg)
    ok = ok and cond
warm = max(3.0, duration / 4)
print(f"\nsoak: {conns} idle connections + churn + rr for {duration:.0f}s, samples every few s\n")
hdr = f"{'side':8} {'RSS base':>9} {'RSS warm':>9} {'RSS peak':>9} {'RSS end':>9} {'pool warm':>10} {'pool peak':>10} {'fds base':>8} {'fds peak':>8} {'fds after':>9} {'errors Δ':>8} {'stalls':>6}"
print(hdr); print("-" * len(hdr))
for side in ("decrypt", "encrypt"):
    s = [r for r in rows if r[2] == side]
    base = [r for r in s if r[0] == "baseline"][0]
    load = [r for r in s if r[0] == "load"]
    after = [r for r in s if r[0] == "after"]
    steady = [r for r in load if num(r[1]) >= warm] or load
    half = max(1, len(steady) // 2)
    first, second = steady[:half], steady[half:] or steady[-1:]
    rss = lambda rs: [num(r[3]) for r in rs]
    pool = lambda rs: [num(r[5]) for r in rs]
    mib = lambda kib: f"{kib/1024:.1f}M"
    pm = lambda b: f"{b/2**20:.2f}M"
    err_d = num(after[-1][6]) - num(base[6])
    print(f"{side:8} {mib(num(base[3])):>9} {mib(statistics.mean(rss(first))):>9} {mib(max(rss(load))):>9} "
          f"{mib(num(after[-1][3])):>9} {pm(statistics.mean(pool(first))):>10} {pm(max(pool(load))):>10} "
          f"{num(base[4]):>8.0f} {max(num(r[4]) for r in load):>8.0f} {num(after[-1][4]):>9.0f} {err_d:>8.0f} {num(after[-1][7]):>6.0f}")
    r1, r2 = statistics.mean(rss(first)), statistics.mean(rss(second))
    check(r2 <= r1 * 1.10 + 8 * 1024, f"{side}: RSS flat after warm-up ({r1/1024:.1f} -> {r2/1024:.1f} MiB, allowed +10% +8 MiB)")
    p1, p2 = statistics.mean(pool(first)), statistics.mean(pool(second))
    check(p2 <= p1 * 1.25 + 4 * 2**20, f"{side}: live pool flat after warm-up ({p1/2**20:.2f} -> {p2/2**20:.2f} MiB, allowed +25% +4 MiB)")
    warm_n = num(after[-1][8]) if len(after[-1]) > 8 else 0.0
    check(num(after[-1][4]) - warm_n <= num(base[4]),
          f"{side}: open fds back to baseline ({num(after[-1][4]):.0f} less {warm_n:.0f} warm sessions <= {num(base[4]):.0f})")
    check(err_d == 0, f"{side}: no error counter moved (delta {err_d:.0f})")
    b, f = counters(f"{work}/{side}.baseline.prom"), counters(f"{work}/{side}.final.prom")
    for k in sorted(f):
        if f[k] != b.get(k, 0.0):
            print(f"        {k} +{f[k] - b.get(k, 0.0):.0f}")
print()
for n in ("idle", "churn", "rr"):
    st = open(f"{work}/{n}.status").read().strip()
    try:
        j = json.load(open(f"{work}/{n}.json"))
        res = j.get("results", {})
        keys = {"idle": ("established", "checked_ok", "dropped"),
                "churn": ("completed", "conns_per_s", "reset", "timeout", "mismatch"),
                "rr": ("requests", "requests_per_s", "mismatches")}[n]
        detail = ", ".join(f"{k}={res.get(k)}" for k in keys)
        if n == "idle":
            detail += ", " + ", ".join(f"pid {r['pid']}: {r['kib_per_conn']:.1f} KiB/conn" for r in res.get("rss", []))
    except Exception as e:
        detail = f"(no report: {e})"
    check(st == "ok", f"loadtest {n}: {st}: {detail}")
sys.exit(0 if ok else 1)
EOF
if [ "$status" != 0 ]; then
  echo "soak: FAILED (work directory: $WORK; logs and samples kept)" >&2
  KEEP=1
  exit 1
fi
echo "soak: passed"
