#!/usr/bin/env bash
# The io_uring experiment (ARCHITECTURE.md, "Completion-based I/O: measured, not kept"):
# redis GET through a one-thread relay, epoll vs io_uring, interleaved:
#   1. REPS rounds of redis-benchmark -c 50 (N requests) and -c 1 (N/5): req/s, p50, and the
#      relay's CPU per request (utime + stime from /proc, 10 ms ticks: keep N large);
#   2. system calls per request (strace -c), each mode and concurrency;
#   3. where the relay's CPU goes (perf record -e cpu-clock, kernel symbols), c50.
# usage: scripts/bench/uring-probe/run.sh      (N [200000], REPS [5], STEPS ["ab strace perf"])
# needs: redis-server, redis-benchmark, strace, perf, cargo. Loopback only; ports 16400-16600.
# Kills only what it started, by PID.
set -u
cd "$(dirname "$0")"
cargo build --release -q || exit 1
P=$PWD/target/release/uring-probe
N=${N:-200000}; REPS=${REPS:-5}; STEPS=${STEPS:-ab strace perf}
OUT=${OUT:-$(mktemp -d)}
REDIS=16400; L=16401
hz=$(getconf CLK_TCK)
redis-server --port $REDIS --save "" --appendonly no --daemonize no >"$OUT/redis.log" 2>&1 &
rp=$!
trap 'kill $rp 2>/dev/null; wait $rp 2>/dev/null' EXIT
for i in $(seq 50); do redis-cli -p $REDIS ping >/dev/null 2>&1 && break; sleep 0.1; done
start() {  # start MODE: a relay on a fresh port; sets L and pp
  L=$((L + 1)); $P "$1" $L $REDIS & pp=$!
  for i in $(seq 50); do redis-cli -p $L ping >/dev/null 2>&1 && return; sleep 0.1; done
}
stop() { kill $pp; wait $pp 2>/dev/null; }
if [[ " $STEPS " == *" ab "* ]]; then
  for r in $(seq 1 "$REPS"); do
    for mode in epoll uring; do
      start $mode
      for c in 50 1; do
        n=$N; [ $c = 1 ] && n=$((N / 5))
        t0=$(awk '{print $14+$15}' /proc/$pp/stat)
        out=$(redis-benchmark -p $L -t get -c $c -n $n -q --csv 2>/dev/null | tail -1)
        t1=$(awk '{print $14+$15}' /proc/$pp/stat)
        rps=$(echo "$out" | cut -d, -f2 | tr -d '"'); p50=$(echo "$out" | cut -d, -f5 | tr -d '"')
        cpu=$(python3 -c "print(f'{($t1-$t0)/$hz*1e6/$n:.2f}')")
        echo "rep $r $mode c$c: $rps req/s, p50 $p50 ms, relay CPU $cpu us/req"
      done
      stop
    done
  done
fi
if [[ " $STEPS " == *" strace "* ]]; then
  for mode in epoll uring; do
    for c in 50 1; do
      start $mode
      strace -c -f -o "$OUT/strace-$mode-c$c.txt" -p $pp 2>/dev/null & sp=$!
      sleep 0.5  # strace attaching: setup, not synchronisation of results
      redis-benchmark -p $L -t get -c $c -n 20000 -q >/dev/null 2>&1
      kill -INT $sp; wait $sp 2>/dev/null
      stop
      echo "$mode c$c syscalls per request:" $(awk '$4 ~ /^[0-9]+$/ && $NF != "total" && $4 >= 200 {printf "%s %.2f  ", $NF, $4/20000}' "$OUT/strace-$mode-c$c.txt")
    done
  done
fi
if [[ " $STEPS " == *" perf "* ]]; then
  for mode in epoll uring; do
    start $mode
    perf record -e cpu-clock -F 4999 -g -p $pp -o "$OUT/perf-$mode.data" 2>/dev/null & pr=$!
    sleep 0.3
    redis-benchmark -p $L -t get -c 50 -n 150000 -q >/dev/null 2>&1
    kill -INT $pr; wait $pr 2>/dev/null
    stop
    echo "== $mode, c50: CPU by object, then the syscall/ring interface's own symbols"
    perf report -i "$OUT/perf-$mode.data" --stdio --no-children --sort dso -g none 2>/dev/null | grep "%" | grep -v "^#" | head -4
    perf report -i "$OUT/perf-$mode.data" --stdio --no-children --sort sym -g none 2>/dev/null | grep -v "^#" |
      grep -E "do_syscall|__sys_|ep_|epoll|fdget|io_uring|io_issue|io_recv|io_send|__io_|io_cq|sock_recvmsg|sock_sendmsg" | head -16
  done
fi
echo "raw files in $OUT"
