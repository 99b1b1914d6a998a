#!/usr/bin/env bash
# Scaling on a 16-core machine (issue "Performance", last goal), in one call:
#   the loopback ceiling; HAProxy nbthread T; sealpipe forward with T shards as ONE process
#   serving 8 tunnels (`sealpipe run --config`), for T in 1 2 4 8; 8 iperf3 client/server
#   process pairs (iperf3 is single-threaded per process). Proxies on CPUs 0..T-1, clients on
#   8-11, servers on 12-15. Everything on 127.0.0.0/8.
# Prepare here (needs a package registry):  scripts/bench/make-scale-kit.sh .scalekit
#   and cargo build --release; then on the 16-core machine, carrying .scalekit and
#   target/release:  KIT=.scalekit SEALPIPE_BIN=target/release/sealpipe scripts/scale16.sh
# (This is scripts/bench/scale16.sh with one sealpipe process instead of one per port, the
# setup that harness recommends once `sealpipe run --config` exists.)
set -u
K=${KIT:-.scalekit}; K=$(cd "$K" && pwd); export LD_LIBRARY_PATH=$K/lib
SPB=${SEALPIPE_BIN:-target/release/sealpipe}
CL=${CL:-8-11}; SV=${SV:-12-15}
T_LIST=${TS:-1 2 4 8}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
echo "nproc=$(nproc) kernel=$(uname -r) cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
ulimit -n 65536 2>/dev/null
SP=()
for i in 0 1 2 3 4 5 6 7; do taskset -c "$SV" "$K/bin/iperf3" -s -p $((6000+i)) -B 127.0.0.2 >/dev/null 2>&1 & SP+=($!); done
sleep 0.5
sum8() { python3 - "$W" <<'PY'
import json, sys
t = 0
for i in range(8):
    try:
        t += json.load(open(f"{sys.argv[1]}/c{i}.json"))["end"]["sum_received"]["bits_per_second"]
    except Exception:
        pass
print(round(t / 1e9, 2))
PY
}
run8() { local i; for i in 0 1 2 3 4 5 6 7; do taskset -c "$CL" "$K/bin/iperf3" -c "$1" -p $((6000+i)) -t 3 -J >"$W/c$i.json" 2>/dev/null & done; wait; sum8; }
one() { taskset -c "$CL" "$K/bin/iperf3" -c "$1" -p 6000 -t 3 -J 2>/dev/null | python3 -c "import json,sys; print(round(json.load(sys.stdin)['end']['sum_received']['bits_per_second']/1e9,2))"; }
wait_port() { local n; for n in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }
echo "direct: 1 stream $(one 127.0.0.2) Gbit/s; 8 procs $(run8 127.0.0.2) Gbit/s"
for T in $T_LIST; do
  printf 'global\n  nbthread %s\n  maxconn 2000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nlisten fwd\n  bind 127.0.0.1:6000-6007\n  server s1 127.0.0.2\n' "$T" >"$W/h$T.cfg"
  taskset -c 0-$((T-1)) "$K/bin/haproxy" -f "$W/h$T.cfg" -db >"$W/h$T.log" 2>&1 & H=$!
  wait_port 6007
  echo "haproxy nbthread=$T: 1 stream $(one 127.0.0.1) Gbit/s; 8 procs $(run8 127.0.0.1) Gbit/s"
  kill $H; wait $H 2>/dev/null
  if [ -x "$SPB" ]; then
    { printf '[log]\nlevel = "warn"\n[limits]\nthreads = %s\n' "$T"
      for i in 0 1 2 3 4 5 6 7; do
        printf '[[tunnel]]\nname = "p%s"\nmode = "forward"\nlisten = "127.0.0.1:%s"\ntargets = ["127.0.0.2:%s"]\n' "$i" $((6000+i)) $((6000+i))
      done; } >"$W/sp$T.toml"
    taskset -c 0-$((T-1)) "$SPB" run --config "$W/sp$T.toml" >"$W/sp$T.log" 2>&1 & P=$!
    wait_port 6007
    echo "sealpipe forward threads=$T (one process, 8 tunnels): 1 stream $(one 127.0.0.1) Gbit/s; 8 procs $(run8 127.0.0.1) Gbit/s"
    kill $P; wait $P 2>/dev/null
  fi
done
kill "${SP[@]}" 2>/dev/null
