#!/usr/bin/env bash
# Real clients through a real sealpipe pair: redis-benchmark and redis-cli against a real
# redis-server, iperf3 against a real iperf3 server. Loopback only; kills only its own PIDs.
#   SEALPIPE_BIN=target/release/sealpipe scripts/e2e-clients.sh
set -euo pipefail
BIN=${SEALPIPE_BIN:-target/release/sealpipe}
DIR=$(mktemp -d /tmp/sealpipe-e2e-clients.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT
say() { echo "e2e-clients: $*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {  # wait_port PORT: until something accepts, at most 20 s
  local deadline=$((SECONDS + 20))
  until python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),1)" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { say "port $1 never came up"; exit 1; }
  done
}

"$BIN" keygen --out "$DIR/k.key" >/dev/null
pair() {  # pair BACKEND_PORT -> sets ENTRY (no subshell: the PIDs must stay ours)
  local mid entry
  mid=$(free_port); entry=$(free_port)
  "$BIN" decrypt --listen "127.0.0.1:$mid" --target "127.0.0.1:$1" --key "$DIR/k.key" --threads 1 --log-level warn 2>>"$DIR/sealpipe.log" &
  PIDS+=($!)
  "$BIN" encrypt --listen "127.0.0.1:$entry" --target "127.0.0.1:$mid" --key "$DIR/k.key" --threads 1 --log-level warn 2>>"$DIR/sealpipe.log" &
  PIDS+=($!)
  wait_port "$mid"; wait_port "$entry"
  ENTRY=$entry
}

# Redis
RPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no >"$DIR/redis.log" 2>&1 &
PIDS+=($!)
wait_port "$RPORT"
pair "$RPORT"
say "redis $RPORT behind the pair at $ENTRY"
head -c 300000 /dev/urandom | base64 -w0 >"$DIR/big"
redis-cli -p "$ENTRY" -x SET big <"$DIR/big" >/dev/null
redis-cli -p "$ENTRY" --raw GET big | head -c -1 >"$DIR/got"
cmp -s "$DIR/big" "$DIR/got" || { say "a 400 KB value came back different"; exit 1; }
say "redis-cli: a 400 KB value round-trips byte-exact"
out=$(redis-benchmark -p "$ENTRY" -q -n 20000 -c 50 -t set,get 2>&1 | tr '\r' '\n' | grep "requests per second")
echo "$out" | sed 's/^/  /'
echo "$out" | grep -q "GET:" || { say "redis-benchmark did not finish"; exit 1; }
if echo "$out" | grep -qi "error"; then say "redis-benchmark saw errors"; exit 1; fi

# iperf3
IPORT=$(free_port)
iperf3 -s -p "$IPORT" -B 127.0.0.1 >"$DIR/iperf.log" 2>&1 &
PIDS+=($!)
wait_port "$IPORT"
pair "$IPORT"
for dir in "" "-R"; do
  gbps=$(iperf3 -c 127.0.0.1 -p "$ENTRY" -t 2 $dir -J | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9,2))')
  say "iperf3 ${dir:-(upload)} through the pair: $gbps Gbit/s"
  python3 -c "import sys; sys.exit(0 if $gbps > 0.05 else 1)" || { say "iperf3 moved almost nothing"; exit 1; }
done
if grep -q "ERROR\|panicked" "$DIR/sealpipe.log"; then say "sealpipe logged errors:"; cat "$DIR/sealpipe.log"; exit 1; fi
say PASS
