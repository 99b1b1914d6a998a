#!/usr/bin/env bash
# What `overflow-checks = true` in [profile.release] costs on the data path, counted in
# instructions (valgrind --tool=callgrind), which repeat under load where timings do not.
#
# For each of two release builds of sealpipe, one with overflow checks and one without (the
# same profile otherwise, selected with CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS), a pair (decrypt
# and encrypt, one shard each, both under callgrind) carries a fixed MIB MiB each way between a
# client and an echo backend (python, not measured); the instructions of the two sealpipe
# processes, from start to exit after SIGTERM, are summed. Runs each build REPS times.
#
# usage: scripts/overflow-checks-cost.sh [MIB] [REPS]     (defaults 64 and 2)
# needs: valgrind, python3. Builds into target/ and target/overflow-cost-{on,off}/.
# It kills only the processes it started (their PIDs), on any exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
mib=${1:-64}
reps=${2:-2}
for t in valgrind python3; do command -v $t >/dev/null || { echo "overflow-cost: $t not found"; exit 1; }; done
H="python3 $root/scripts/e2e_helper.py"

tmp=$(mktemp -d)
. scripts/own_pids.sh
cleanup() {
  stop_own_pids
  rm -rf "$tmp"
}
trap cleanup EXIT

for mode in off on; do
  flag=false; [ $mode = on ] && flag=true
  echo "== building release with overflow-checks = $flag"
  CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=$flag CARGO_TARGET_DIR="$root/target/overflow-cost-$mode" \
    cargo build --release --locked --bin sealpipe 2>&1 | tail -1
done

"$root/target/overflow-cost-off/release/sealpipe" keygen --out "$tmp/k.key" >/dev/null

# summed Ir of one pair run
run_pair() {
  local bin=$1 tag=$2
  read -r p_back p_dec p_enc <<<"$($H free-ports 3)"
  python3 "$root/scripts/e2e_helper.py" backend "$p_back" >/dev/null 2>&1 &
  local pb=$!; pids+=($pb)
  $H wait-tcp "$p_back" 20
  valgrind --tool=callgrind --callgrind-out-file="$tmp/$tag.dec.out" -q \
    "$bin" decrypt --listen "127.0.0.1:$p_dec" --target "127.0.0.1:$p_back" --key "$tmp/k.key" \
    --threads 1 --log-level error &
  local pd=$!; pids+=($pd)
  $H wait-tcp "$p_dec" 120
  valgrind --tool=callgrind --callgrind-out-file="$tmp/$tag.enc.out" -q \
    "$bin" encrypt --listen "127.0.0.1:$p_enc" --target "127.0.0.1:$p_dec" --key "$tmp/k.key" \
    --threads 1 --log-level error &
  local pe=$!; pids+=($pe)
  $H wait-tcp "$p_enc" 120
  python3 "$root/scripts/bulk_echo_client.py" "$p_enc" "$mib"
  kill -TERM "$pe"; wait "$pe" || true
  kill -TERM "$pd"; wait "$pd" || true
  kill -TERM "$pb"; wait "$pb" 2>/dev/null || true
  local ir=0 x
  for f in "$tmp/$tag.dec.out" "$tmp/$tag.enc.out"; do
    x=$(awk '/^(summary|totals):/ {print $2; exit}' "$f")
    ir=$((ir + x))
  done
  echo "$ir"
}

declare -A sum
for mode in off on; do sum[$mode]=0; done
for r in $(seq 1 "$reps"); do
  for mode in off on; do
    ir=$(run_pair "$root/target/overflow-cost-$mode/release/sealpipe" "$mode$r")
    echo "overflow-checks $mode, run $r: $ir instructions ($mib MiB each way through the pair)"
    sum[$mode]=$((sum[$mode] + ir))
  done
done
python3 - "${sum[off]}" "${sum[on]}" "$reps" "$mib" <<'PY'
import sys
off, on, reps, mib = (int(x) for x in sys.argv[1:])
print(f"mean instructions per run: off {off / reps:,.0f}, on {on / reps:,.0f}; "
      f"overflow checks cost {100 * (on - off) / off:+.2f}% "
      f"({(on - off) / reps / (2 * mib):,.0f} instructions per MiB moved)")
PY
