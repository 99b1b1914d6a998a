#!/usr/bin/env bash
# Two builds side by side on bulk through a pair: iperf3 -P P through `A encrypt -> A decrypt`,
# then the same through B, alternating REPS times (A B A B ...), each run on a fresh pair.
# Prints, per run, Gbit/s and the proxy CPU (both sealpipe processes, user + system, from
# /proc) per GiB carried, then the medians. Timings move on a shared machine; the paired,
# alternating runs are what make a few percent visible.
#
# usage: scripts/bench/bulk-ab.sh A_BIN B_BIN [P] [REPS] [SECS]     (defaults 8, 6, 5)
#   ARGS: extra arguments for both builds' processes (e.g. "--warm-max 0"); ARGS_A / ARGS_B
#   for one side only (one build twice with ARGS_B="--threads 1" compares two settings)
#   MODE: pair (default) or forward (one `sealpipe forward` hop: the floor's other term)
# needs: iperf3, python3, ss (iproute2). Loopback only; kills only the processes it started (their PIDs).
set -euo pipefail
cd "$(dirname "$0")/../.."
a_bin=$(realpath "${1:?usage: $0 A_BIN B_BIN [P] [REPS] [SECS]}")
b_bin=$(realpath "${2:?usage: $0 A_BIN B_BIN [P] [REPS] [SECS]}")
par=${3:-8}
reps=${4:-6}
secs=${5:-5}
args=${ARGS:-}
mode=${MODE:-pair}
case $mode in pair|forward) ;; *) echo "bulk-ab: MODE is pair or forward"; exit 2 ;; esac
H="python3 scripts/e2e_helper.py"
tmp=$(mktemp -d)
. scripts/own_pids.sh
cleanup() {
  stop_own_pids
  rm -rf "$tmp"
}
trap cleanup EXIT
"$a_bin" keygen --out "$tmp/k.key" >/dev/null

# cpu_ticks PID... -> user+system clock ticks of those processes
cpu_ticks() {
  local s=0 p a
  for p in "$@"; do
    read -r -a a <"/proc/$p/stat"
    s=$((s + a[13] + a[14]))
  done
  echo "$s"
}

# wait_listen PORT: until something listens on 127.0.0.1:PORT (at most 10 s), without
# connecting to it (a connection would be iperf3's one client)
wait_listen() {
  local i
  for i in $(seq 1 200); do
    [ -n "$(ss -Hltn "sport = :$1")" ] && return 0
    sleep 0.05
  done
  echo "bulk-ab: nothing listens on port $1"; return 1
}

# one BIN EXTRA_ARGS -> "GBPS S_PER_GIB"
one() {
  local bin=$1 extra=$2 p_srv p_dec p_enc srv procs=() c0 c1 out
  read -r p_srv p_dec p_enc <<<"$($H free-ports 3)"
  iperf3 -s -1 -B 127.0.0.1 -p "$p_srv" >/dev/null 2>&1 &
  srv=$!; pids+=("$srv")
  wait_listen "$p_srv"
  if [ "$mode" = pair ]; then
    # shellcheck disable=SC2086
    "$bin" decrypt --listen "127.0.0.1:$p_dec" --target "127.0.0.1:$p_srv" --key "$tmp/k.key" \
      --log-level error $args $extra &
    procs+=($!); pids+=($!)
    wait_listen "$p_dec"
    # shellcheck disable=SC2086
    "$bin" encrypt --listen "127.0.0.1:$p_enc" --target "127.0.0.1:$p_dec" --key "$tmp/k.key" \
      --log-level error $args $extra &
  else
    # shellcheck disable=SC2086
    "$bin" forward --listen "127.0.0.1:$p_enc" --target "127.0.0.1:$p_srv" \
      --log-level error $args $extra &
  fi
  procs+=($!); pids+=($!)
  wait_listen "$p_enc"
  c0=$(cpu_ticks "${procs[@]}")
  out=$(timeout $((secs + 30)) iperf3 -c 127.0.0.1 -p "$p_enc" -P "$par" -t "$secs" -J)
  c1=$(cpu_ticks "${procs[@]}")
  kill -TERM "${procs[@]}" "$srv" 2>/dev/null || true
  wait "${procs[@]}" "$srv" 2>/dev/null || true
  python3 -c '
import json, os, sys
e = json.loads(sys.argv[1])["end"]["sum_received"]
n, secs = e["bytes"], e["seconds"]
cpu = (int(sys.argv[3]) - int(sys.argv[2])) / os.sysconf("SC_CLK_TCK")
print(f"{n * 8 / secs / 1e9:.2f} {cpu / (n / 2**30):.3f}")' "$out" "$c0" "$c1"
}

declare -A gb cpu
gb[A]=""; gb[B]=""; cpu[A]=""; cpu[B]=""
for r in $(seq 1 "$reps"); do
  for side in A B; do
    if [ $side = A ]; then bin=$a_bin; extra=${ARGS_A:-}; else bin=$b_bin; extra=${ARGS_B:-}; fi
    read -r g c <<<"$(one "$bin" "$extra")"
    [ -n "${c:-}" ] || { echo "bulk-ab: run $r $side gave no figure"; exit 1; }
    echo "run $r $side: $g Gbit/s, proxy CPU $c s/GiB ($mode, iperf3 -P $par, $secs s)"
    gb[$side]+="$g "; cpu[$side]+="$c "
  done
done
python3 - "${gb[A]}" "${cpu[A]}" "${gb[B]}" "${cpu[B]}" <<'PY'
import statistics as st, sys
ga, ca, gb, cb = ([float(x) for x in s.split()] for s in sys.argv[1:5])
print(f"median: A {st.median(ga):.2f} Gbit/s at {st.median(ca):.3f} s/GiB; "
      f"B {st.median(gb):.2f} Gbit/s at {st.median(cb):.3f} s/GiB; "
      f"B/A CPU per GiB {st.median(cb) / st.median(ca):.3f}; "
      f"B cheaper in {sum(b < a for a, b in zip(ca, cb))} of {len(ca)} pairs")
PY
