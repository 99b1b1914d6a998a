#!/usr/bin/env bash
# peers.sh -- side-by-side performance anchors for TCP proxies, loopback only.
# sealpipe's own harness (scripts/bench/README.md); run from the project root.
#
# Measures, for every "path" (a way of getting from a client to a backend):
#   A  bulk throughput      iperf3 -P1 / -P8 (optionally -R), + proxy CPU s/GiB
#   B  request/response     redis-benchmark ping_inline,set,get  -c50 and -c1
#   C  connection setup     tools/connrate.py (connect, PING/PONG, close) c=1, c=8
#   D  memory per idle conn tools/idle.py (5000 idle conns, proxy VmRSS/Pss delta)
#   E  crypto limit         openssl speed -evp aes-256-gcm / aes-128-gcm (+cpu flags)
# REPS repetitions, interleaved (rep1: all paths, rep2: all paths, ...), medians
# printed at the end by tools/summarize.py (also written to $RUN/summary.md).
#
# ---- Adding a path (e.g. the new Rust proxy) --------------------------------
# Write a function   start_<name> LPORT THOST TPORT   that starts processes so
# that 127.0.0.1:LPORT forwards to THOST:TPORT, *in the foreground* (no
# daemonising) with `cmd ... &`, calls `track $!` for every process it starts
# and `need_listen PORT` for every port that must be listening before use.
# Two-process (encrypting pair) paths use MID=$(mid_port "$1") for the inner
# hop.  Teardown is generic (stop_path: SIGTERM, then SIGKILL after 3 s, to the
# tracked PIDs and their descendants, by PID).  Then add <name> to PATHS, e.g.
#     PATHS="direct haproxy spiped rustproxy" ./peers.sh
# and define start_rustproxy in a file passed as EXTRA_PATHS=/path/to/file.sh
# (sourced after the built-in paths) or directly below.
# -----------------------------------------------------------------------------
# Environment knobs (defaults in brackets):
#   PATHS    [direct haproxy socat spiped ssgcm stunnel sealpipe sealfwd]
#   SECTIONS [A B C D E]        REPS [3]
#   IPERF_T [4]  IPERF_REVERSE [0]  (1 adds iperf3 -R -P1)
#   RB_N [30000] (c=50)  RB_N1 [10000] (c=1)  CONN_N [2000]  IDLE_N [5000]
#   (defaults sized so one run of 6 paths x 3 reps takes ~8 min on 2 cores)
#   D_PATHS  [all non-direct PATHS]   RUN [results/run-<timestamp>]
#   WARMUP [1]  untimed short pass over all paths first (results discarded)
#   EXTRA_PATHS  file with more start_<name> functions
# Everything listens on / connects to 127.0.0.1 only.
set -u
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PY:-/usr/bin/python3}
PATHS=${PATHS:-"direct haproxy socat spiped ssgcm stunnel sealpipe sealfwd"}
SECTIONS=${SECTIONS:-"A B C D E"}
REPS=${REPS:-3}
IPERF_T=${IPERF_T:-4}
IPERF_REVERSE=${IPERF_REVERSE:-0}
RB_N=${RB_N:-30000}
RB_N1=${RB_N1:-10000}
CONN_N=${CONN_N:-2000}
IDLE_N=${IDLE_N:-5000}
WARMUP=${WARMUP:-1}
RUN=${RUN:-${TMPDIR:-/tmp}/sealpipe-bench/run-$(date +%Y%m%d-%H%M%S)}
CONF=${CONF:-${TMPDIR:-/tmp}/sealpipe-bench/conf}
IPERF_PORT=15201
REDIS_PORT=16379
SS_PASSWORD=${SS_PASSWORD:-anchors-bench-password}
mkdir -p "$RUN" "$CONF"
RES=$RUN/results.tsv
LOG=$RUN/harness.log
: >"$RES"
ulimit -n "$(ulimit -Hn)" 2>/dev/null   # 5000 idle conns need >10000 fds per proxy

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }
# result REP SECTION PATH METRIC VALUE
result() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RES"; }

# ----------------------------------------------------------------------------
# process tracking / teardown (by PID only)
PIDS=()        # processes of the path under test
BACK_PIDS=()   # backend servers (iperf3, redis)
track() { PIDS+=("$1"); }

descendants() {  # all live descendants of the given PIDs
  local p k
  for p in "$@"; do
    for k in $(ps -o pid= --ppid "$p" 2>/dev/null); do echo "$k"; descendants "$k"; done
  done
}
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) || return 1; [[ -n "$s" && "$s" != Z* ]]; }

kill_pids() {  # kill_pids PID...  (TERM, wait <=3 s, KILL, reap)
  local all=() p i any
  for p in "$@"; do all+=("$p"); all+=($(descendants "$p")); done
  [ ${#all[@]} -eq 0 ] && return 0
  for p in "${all[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for i in $(seq 30); do
    any=0; for p in "${all[@]}"; do alive "$p" && { any=1; break; }; done
    [ $any = 0 ] && break; sleep 0.1
  done
  for p in "${all[@]}"; do alive "$p" && kill -KILL "$p" 2>/dev/null; done
  for p in "$@"; do wait "$p" 2>/dev/null; done
  return 0
}
stop_path() { kill_pids "${PIDS[@]}"; PIDS=(); }
cleanup() { stop_path; kill_pids "${BACK_PIDS[@]}"; BACK_PIDS=(); }
trap 'cleanup' EXIT
trap 'log "interrupted"; exit 130' INT TERM

listening() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }
need_listen() {  # wait (<=5 s) until 127.0.0.1:PORT is listening, without connecting
  local i p; for i in $(seq 50); do
    listening "$1" && return 0
    for p in "${PIDS[@]}"; do alive "$p" || { log "ERROR: pid $p exited before port $1 listened"; return 1; }; done
    sleep 0.1
  done
  log "ERROR: port $1 not listening"; return 1
}
mid_port() { echo $(( $1 + 1 )); }

# CPU time (seconds) used so far by the path's processes (+ reaped children)
cpu_s() {
  local t=0 p
  for p in "${PIDS[@]}"; do
    [ -r "/proc/$p/stat" ] && t=$(( t + $(awk '{print $14+$15+$16+$17}' "/proc/$p/stat") ))
  done
  for p in $(descendants "${PIDS[@]}"); do
    [ -r "/proc/$p/stat" ] && t=$(( t + $(awk '{print $14+$15}' "/proc/$p/stat") ))
  done
  awk -v t="$t" -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.3f", t/hz}'
}

# ----------------------------------------------------------------------------
# PATHS.  Contract: start_<name> LPORT THOST TPORT  (see header)
start_direct() { ENTRY_PORT=$3; }   # no proxy: client talks to the backend

start_haproxy() {  # one hop, plaintext, TCP mode, nbthread 2
  local cfg=$RUN/haproxy-$1.cfg
  cat >"$cfg" <<EOF
global
    nbthread 2
    maxconn 9000
defaults
    mode tcp
    maxconn 9000
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend fe
    bind 127.0.0.1:$1
    default_backend be
backend be
    server s1 $2:$3
EOF
  haproxy -db -f "$cfg" >>"$RUN/haproxy.log" 2>&1 &
  track $!; need_listen "$1"
}

start_socat() {  # one hop, plaintext, fork per connection, default options (-b 8192)
  socat TCP-LISTEN:"$1",bind=127.0.0.1,fork,reuseaddr,backlog=4096 TCP:"$2":"$3" \
    >>"$RUN/socat.log" 2>&1 &
  track $!; need_listen "$1"
}

start_haproxytls() {  # pair: HAProxy (LPORT, TLS client) -TLS1.3-> HAProxy (MID, TLS server) -> target
  local mid; mid=$(mid_port "$1")
  cat "$CONF/stunnel.pem" "$CONF/stunnel.key" >"$CONF/haproxy.pem"
  local common="global
    nbthread 2
    maxconn 9000
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
defaults
    mode tcp
    maxconn 9000
    timeout connect 5s
    timeout client 10m
    timeout server 10m"
  printf '%s\nfrontend fe\n    bind 127.0.0.1:%s ssl crt %s\n    default_backend be\nbackend be\n    server s1 %s:%s\n' \
    "$common" "$mid" "$CONF/haproxy.pem" "$2" "$3" >"$RUN/haproxytls-srv-$1.cfg"
  printf '%s\nfrontend fe\n    bind 127.0.0.1:%s\n    default_backend be\nbackend be\n    server s1 127.0.0.1:%s ssl verify none\n' \
    "$common" "$1" "$mid" >"$RUN/haproxytls-cli-$1.cfg"
  haproxy -db -f "$RUN/haproxytls-srv-$1.cfg" >>"$RUN/haproxytls.log" 2>&1 &
  track $!
  haproxy -db -f "$RUN/haproxytls-cli-$1.cfg" >>"$RUN/haproxytls.log" 2>&1 &
  track $!
  need_listen "$mid" && need_listen "$1"
}

start_spiped() {  # pair: spiped -e (LPORT) -> spiped -d (MID) -> target; default PFS handshake
  local mid; mid=$(mid_port "$1")
  spiped -F -d -s "[127.0.0.1]:$mid" -t "[$2]:$3" -k "$CONF/spiped.key" -n 0 \
    >>"$RUN/spiped.log" 2>&1 &
  track $!
  spiped -F -e -s "[127.0.0.1]:$1" -t "[127.0.0.1]:$mid" -k "$CONF/spiped.key" -n 0 \
    >>"$RUN/spiped.log" 2>&1 &
  track $!
  need_listen "$mid" && need_listen "$1"
}

start_ssgcm() {  # pair: ss-tunnel (LPORT, -L target) -> ss-server (MID) -> target, aes-256-gcm
  local mid; mid=$(mid_port "$1")
  ss-server -s 127.0.0.1 -p "$mid" -k "$SS_PASSWORD" -m aes-256-gcm -t 600 -n 20000 \
    $SS_EXTRA >>"$RUN/ss.log" 2>&1 &
  track $!
  ss-tunnel -s 127.0.0.1 -p "$mid" -b 127.0.0.1 -l "$1" -L "$2:$3" -k "$SS_PASSWORD" \
    -m aes-256-gcm -t 600 -n 20000 $SS_EXTRA >>"$RUN/ss.log" 2>&1 &
  track $!
  need_listen "$mid" && need_listen "$1"
}
SS_EXTRA=${SS_EXTRA:-}   # e.g. SS_EXTRA=--no-delay

# shadowsocks-rust (tokio), the Rust peer: not a Debian package; `cargo install shadowsocks-rust
# --no-default-features --features "local,server,local-tunnel,aead-cipher"` and SSRUST_BIN=its bin dir.
SSRUST_BIN=${SSRUST_BIN:-$(dirname "$(command -v ssserver 2>/dev/null || echo /nonexistent/x)")}
start_ssrust() {  # pair: sslocal tunnel (LPORT) -> ssserver (MID) -> target, aes-256-gcm, TCP_NODELAY
  local mid; mid=$(mid_port "$1")
  "$SSRUST_BIN/ssserver" -s "127.0.0.1:$mid" -m aes-256-gcm -k "$SS_PASSWORD" --tcp-no-delay \
    >>"$RUN/ssrust.log" 2>&1 &
  track $!
  "$SSRUST_BIN/sslocal" --protocol tunnel -b "127.0.0.1:$1" -f "$2:$3" -s "127.0.0.1:$mid" \
    -m aes-256-gcm -k "$SS_PASSWORD" --tcp-no-delay >>"$RUN/ssrust.log" 2>&1 &
  track $!
  need_listen "$mid" && need_listen "$1"
}

start_stunnel() {  # pair: stunnel client (LPORT) -TLS1.3-> stunnel server (MID) -> target
  local mid; mid=$(mid_port "$1")
  cat >"$RUN/stunnel-srv-$1.conf" <<EOF
foreground = yes
pid =
debug = 4
[srv]
accept = 127.0.0.1:$mid
connect = $2:$3
cert = $CONF/stunnel.pem
key = $CONF/stunnel.key
sslVersionMin = TLSv1.3
EOF
  cat >"$RUN/stunnel-cli-$1.conf" <<EOF
foreground = yes
pid =
debug = 4
[cli]
client = yes
accept = 127.0.0.1:$1
connect = 127.0.0.1:$mid
sslVersionMin = TLSv1.3
EOF
  stunnel "$RUN/stunnel-srv-$1.conf" >>"$RUN/stunnel.log" 2>&1 &
  track $!
  stunnel "$RUN/stunnel-cli-$1.conf" >>"$RUN/stunnel.log" 2>&1 &
  track $!
  need_listen "$mid" && need_listen "$1"
}

# sealpipe, built from the project: SEALPIPE_BIN (default ./target/release/sealpipe, relative to
# the directory the harness is started from, i.e. the project root). SEALPIPE_ENC_ARGS adds
# options to the encrypt side alone (e.g. --warm-max 0). SEALPIPE_ARGS adds options
# to both sides (e.g. "--threads 2" or "--no-forward-secrecy").
SEALPIPE_BIN=${SEALPIPE_BIN:-$PWD/target/release/sealpipe}
SEALPIPE_ARGS=${SEALPIPE_ARGS:-}
sealpipe_key() {
  [ -s "$CONF/sealpipe.key" ] || "$SEALPIPE_BIN" keygen --out "$CONF/sealpipe.key" >/dev/null
}
start_sealpipe() {  # pair: sealpipe encrypt (LPORT) -> sealpipe decrypt (MID) -> target
  local mid; mid=$(mid_port "$1")
  sealpipe_key || return 1
  "$SEALPIPE_BIN" decrypt --listen "127.0.0.1:$mid" --target "$2:$3" --key "$CONF/sealpipe.key" \
      $SEALPIPE_ARGS >>"$RUN/sealpipe.log" 2>&1 &
  track $!
  "$SEALPIPE_BIN" encrypt --listen "127.0.0.1:$1" --target "127.0.0.1:$mid" --key "$CONF/sealpipe.key" \
      $SEALPIPE_ARGS ${SEALPIPE_ENC_ARGS:-} >>"$RUN/sealpipe.log" 2>&1 &
  track $!
  need_listen "$mid" && need_listen "$1"
}
start_sealfwd() {  # one plaintext hop: sealpipe forward (LPORT) -> target, the reactor's own cost
  "$SEALPIPE_BIN" forward --listen "127.0.0.1:$1" --target "$2:$3" $SEALPIPE_ARGS >>"$RUN/sealfwd.log" 2>&1 &
  track $!
  need_listen "$1"
}

[ -n "${EXTRA_PATHS:-}" ] && source "$EXTRA_PATHS"

# start_path NAME IDX TARGET(iperf|redis): sets ENTRY_PORT
start_path() {
  local name=$1 idx=$2 tgt=$3 lport tport
  if [ "$tgt" = iperf ]; then tport=$IPERF_PORT; lport=$((20000 + idx * 20)); else
    tport=$REDIS_PORT; lport=$((20010 + idx * 20)); fi
  ENTRY_PORT=$lport
  if ! declare -F "start_$name" >/dev/null; then log "ERROR: no start_$name"; return 1; fi
  "start_$name" "$lport" 127.0.0.1 "$tport" || { log "ERROR: start_$name failed"; stop_path; return 1; }
}

# ----------------------------------------------------------------------------
# backends
setup_keys() {
  [ -s "$CONF/spiped.key" ] || { dd if=/dev/urandom of="$CONF/spiped.key" bs=32 count=1 2>/dev/null; chmod 600 "$CONF/spiped.key"; }
  [ -s "$CONF/stunnel.pem" ] || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -nodes -days 3650 -subj /CN=localhost -keyout "$CONF/stunnel.key" -out "$CONF/stunnel.pem" 2>/dev/null
}
start_backends() {
  iperf3 -s -B 127.0.0.1 -p "$IPERF_PORT" >>"$RUN/iperf3-server.log" 2>&1 &
  BACK_PIDS+=($!)
  cat >"$RUN/redis.conf" <<EOF
port $REDIS_PORT
bind 127.0.0.1
protected-mode no
daemonize no
save ""
appendonly no
maxclients 12000
dir $RUN
logfile $RUN/redis.log
EOF
  redis-server "$RUN/redis.conf" &
  BACK_PIDS+=($!)
  need_listen "$IPERF_PORT" && need_listen "$REDIS_PORT"
}
restart_iperf_server() {  # iperf3 -s can wedge after an aborted test
  kill_pids "${BACK_PIDS[0]}"
  iperf3 -s -B 127.0.0.1 -p "$IPERF_PORT" >>"$RUN/iperf3-server.log" 2>&1 &
  BACK_PIDS[0]=$!; need_listen "$IPERF_PORT"
}

versions() {
  {
    echo "date: $(date -Is)"; echo "kernel: $(uname -r)"; echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
    echo "nproc: $(nproc)"; echo "mem: $(free -g | awk '/Mem:/{print $2" GiB"}')"
    for p in haproxy spiped shadowsocks-libev socat iperf3 redis-server redis-tools stunnel4 openssl; do
      dpkg-query -W -f='${Package} ${Version}\n' "$p" 2>/dev/null
    done
    echo "python: $($PY --version 2>&1)"
  } >"$RUN/versions.txt"
}

# ----------------------------------------------------------------------------
# sections
sec_A() {  # rep name
  local rep=$1 name=$2 P c0 c1 out v
  local tests="1:P1 8:P8"; [ "$IPERF_REVERSE" = 1 ] && tests="$tests 1:P1R"
  for t in $tests; do
    P=${t%%:*}; local tag=${t#*:} rflag=""; [ "$tag" = P1R ] && rflag=-R
    out=$RUN/iperf-$name-$tag-r$rep.json
    c0=$(cpu_s)
    timeout $((IPERF_T + 20)) iperf3 -c 127.0.0.1 -p "$ENTRY_PORT" -t "$IPERF_T" -P "$P" $rflag \
      --connect-timeout 3000 -J >"$out" 2>>"$LOG"
    sleep 0.3; c1=$(cpu_s)
    v=$($PY - "$out" "$c0" "$c1" <<'EOF'
import json, sys
try:
    j = json.load(open(sys.argv[1])); s = j["end"]["sum_received"]
    gib = s["bytes"] / 2**30; cpu = float(sys.argv[3]) - float(sys.argv[2])
    print("%.3f %.4f" % (s["bits_per_second"] / 1e9, cpu / gib if gib else float("nan")))
except Exception as e:
    print("NA NA")
EOF
)
    if [ "${v%% *}" = NA ]; then log "A $name $tag rep$rep FAILED (see $out)"; restart_iperf_server; fi
    result "$rep" A "$name" "gbps_$tag" "${v%% *}"
    [ "$name" != direct ] && result "$rep" A "$name" "cpu_s_per_gib_$tag" "${v##* }"
    log "A $name $tag rep$rep: ${v%% *} Gbit/s (proxy cpu s/GiB ${v##* })"
  done
}

sec_B() {  # rep name
  local rep=$1 name=$2 c n out c0 c1
  for c in 50 1; do
    n=$RB_N; [ "$c" = 1 ] && n=$RB_N1
    out=$RUN/rb-$name-c$c-r$rep.csv
    c0=$(cpu_s)
    timeout 120 redis-benchmark -h 127.0.0.1 -p "$ENTRY_PORT" -t ping_inline,set,get -n "$n" -c "$c" \
      --csv >"$out" 2>>"$LOG"
    c1=$(cpu_s)
    $PY - "$out" "$rep" "$name" "$c" "$c0" "$c1" "$n" >>"$RES" <<'EOF'
import csv, sys
f, rep, name, c, c0, c1, n = sys.argv[1:]
rows = [r for r in csv.DictReader(open(f)) if r.get("test")]
for r in rows:
    t = r["test"].split()[0]
    for k, m in (("rps", "rps"), ("p50_latency_ms", "p50_ms"), ("p99_latency_ms", "p99_ms")):
        if k in r:
            print(f"{rep}\tB\t{name}\t{t}.c{c}.{m}\t{r[k]}")
if rows and name != "direct":
    us = (float(c1) - float(c0)) * 1e6 / (int(n) * len(rows))
    print(f"{rep}\tB\t{name}\tcpu_us_per_req.c{c}\t{us:.2f}")
if not rows:
    print(f"{rep}\tB\t{name}\tFAILED.c{c}\t1")
EOF
    log "B $name c$c rep$rep: $(tr '\n' ' ' <"$out" | cut -c1-200)"
  done
}

sec_C() {  # rep name
  local rep=$1 name=$2 c out c0 c1
  for c in 1 8; do
    c0=$(cpu_s)
    out=$(timeout 90 $PY "$HERE/tools/connrate.py" --port "$ENTRY_PORT" -n "$CONN_N" -c "$c" --deadline 45 2>>"$LOG")
    c1=$(cpu_s)
    echo "$name c$c rep$rep $out" >>"$RUN/connrate.log"
    $PY - "$out" "$rep" "$name" "$c" "$c0" "$c1" >>"$RES" <<'EOF'
import json, sys
o, rep, name, c, c0, c1 = sys.argv[1:]
try:
    j = json.loads(o)
except Exception:
    print(f"{rep}\tC\t{name}\tFAILED.c{c}\t1"); sys.exit()
print(f"{rep}\tC\t{name}\tconns_per_s.c{c}\t{j['conns_per_s']}")
print(f"{rep}\tC\t{name}\tfail.c{c}\t{j['fail']}")
if c == "1":
    print(f"{rep}\tC\t{name}\tp50_ms.c1\t{j['p50_ms']}")
    print(f"{rep}\tC\t{name}\tp99_ms.c1\t{j['p99_ms']}")
if name != "direct" and j["ok"]:
    print(f"{rep}\tC\t{name}\tcpu_us_per_conn.c{c}\t{(float(c1)-float(c0))*1e6/j['ok']:.1f}")
EOF
    log "C $name c$c rep$rep: $out"
  done
}

sec_D() {  # rep name
  local rep=$1 name=$2 out pids
  pids=$(IFS=,; echo "${PIDS[*]}")
  out=$(timeout 150 $PY "$HERE/tools/idle.py" --port "$ENTRY_PORT" --pids "$pids" -n "$IDLE_N" --deadline 100 2>>"$LOG")
  echo "$name rep$rep $out" >>"$RUN/idle.log"
  $PY - "$out" "$rep" "$name" >>"$RES" <<'EOF'
import json, sys
o, rep, name = sys.argv[1:]
try:
    j = json.loads(o)
except Exception:
    print(f"{rep}\tD\t{name}\tFAILED\t1"); sys.exit()
for k in ("rss_kib_per_conn", "pss_kib_per_conn", "open", "fail", "open_s", "rss_before_kib",
          "rss_after_kib", "threads_after", "procs_after"):
    print(f"{rep}\tD\t{name}\t{k}\t{j[k]}")
EOF
  log "D $name rep$rep: $out"
}

sec_E() {
  local flags
  flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'aes|pclmulqdq|avx2|vaes|vpclmulqdq|sha_ni|avx512f' | tr '\n' ' ')
  log "E cpu flags: $flags"
  echo "$flags" >"$RUN/cpuflags.txt"
  for k in aes pclmulqdq avx2 vaes vpclmulqdq sha_ni avx512f; do
    if grep -qw "$k" <<<"$flags"; then result 1 E cpuflag "$k" 1; else result 1 E cpuflag "$k" 0; fi
  done
  local ciph
  for ciph in aes-256-gcm aes-128-gcm; do
    timeout 60 openssl speed -evp "$ciph" -seconds 2 >"$RUN/openssl-$ciph.txt" 2>&1
  done
  timeout 30 openssl speed -evp chacha20-poly1305 -seconds 2 -bytes 16384 >"$RUN/openssl-chacha20-poly1305.txt" 2>&1
  $PY - "$RUN" >>"$RES" <<'EOF'
import re, sys, glob, os
for f in sorted(glob.glob(os.path.join(sys.argv[1], "openssl-*.txt"))):
    name = os.path.basename(f)[8:-4]
    txt = open(f).read()
    hdr = re.search(r"^type\s+(.*)$", txt, re.M)
    row = [l for l in txt.splitlines() if l.lower().startswith(name.lower() + " ")]
    if not hdr or not row:
        print(f"1\tE\t{name}\tFAILED\t1"); continue
    sizes = re.findall(r"(\d+) bytes", hdr.group(1))
    vals = re.findall(r"([\d.]+)k", row[-1])
    for s, v in zip(sizes, vals):
        print(f"1\tE\t{name}\tgbit_s.{s}B\t{float(v)*1000*8/1e9:.3f}")
EOF
  log "E done: $(grep -h -E '^(AES|ChaCha)' "$RUN"/openssl-*.txt | tr -s ' ' | tr '\n' '|')"
}

# ----------------------------------------------------------------------------
path_index() {  # stable index of a path name in $PATHS (ports depend on it, not on order)
  local i=0 p; for p in $PATHS; do i=$((i + 1)); [ "$p" = "$1" ] && { echo $i; return; }; done; echo 99
}
run_rep() {  # run_rep REP "path1 path2 ..."  -- sections A, B, C for each path
  local rep=$1 name idx has=" $SECTIONS "
  for name in $2; do
    idx=$(path_index "$name")
    if [[ $has == *" A "* ]]; then
      start_path "$name" "$idx" iperf && { sec_A "$rep" "$name"; stop_path; }
    fi
    if [[ $has == *" B "* || $has == *" C "* ]]; then
      if start_path "$name" "$idx" redis; then
        [[ $has == *" B "* ]] && sec_B "$rep" "$name"
        [[ $has == *" C "* ]] && sec_C "$rep" "$name"
        stop_path
      fi
    fi
  done
}
STEAL0=$(awk '/^cpu /{print $9}' /proc/stat)
steal_note() {  # hypervisor steal ticks since start (as far as the guest can see it)
  echo "steal ticks so far: $(( $(awk '/^cpu /{print $9}' /proc/stat) - STEAL0 ))"
}

# Paths whose programs are not installed are dropped with a log line, so a clone with only some
# peers installed still measures the ones it has.
path_needs() {
  case $1 in
    haproxy|haproxytls) echo haproxy ;;  socat) echo socat ;;  spiped) echo spiped ;;
    ssgcm) echo "ss-server ss-tunnel" ;;  stunnel) echo stunnel ;;
    ssrust) echo "$SSRUST_BIN/ssserver $SSRUST_BIN/sslocal" ;;
    seal*) echo "$SEALPIPE_BIN" ;;  *) echo "" ;;
  esac
}
drop_missing() {
  local kept="" p c ok
  for p in $PATHS; do
    ok=1; for c in $(path_needs "$p"); do command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || ok=0; done
    if [ $ok = 1 ]; then kept="$kept $p"; else log "skipping path $p: $(path_needs "$p") not installed"; fi
  done
  PATHS=${kept# }
}

main() {
  local t0=$SECONDS rep idx name
  drop_missing
  log "run dir: $RUN ; PATHS=$PATHS ; SECTIONS=$SECTIONS ; REPS=$REPS"
  log "NOTE: $(nproc) CPUs shared by load generator, proxies and backend -- compare ratios vs direct"
  setup_keys; versions; start_backends || exit 1
  local has=" $SECTIONS "
  if [[ "$WARMUP" = 1 && ( $has == *" A "* || $has == *" B "* || $has == *" C "* ) ]]; then
    # Untimed warm-up pass (results -> warmup.tsv, not summarised): on this VM the
    # first pass after idle was 30-50% slower for every path (guest memory being
    # faulted in / CPU boost), which otherwise biases rep 1.
    log "warm-up pass (discarded)"
    local sv="$RES $IPERF_T $RB_N $RB_N1 $CONN_N"
    RES=$RUN/warmup.tsv IPERF_T=1 RB_N=5000 RB_N1=1000 CONN_N=300
    run_rep 0 "$PATHS"
    read -r RES IPERF_T RB_N RB_N1 CONN_N <<<"$sv"
    log "warm-up done at $((SECONDS - t0)) s"
  fi
  local order=($PATHS) n=${#order[@]}
  for rep in $(seq "$REPS"); do
    # rotate the path order every rep so slow drifts do not always hit the same path
    local rot=() k
    for k in $(seq 0 $((n - 1))); do rot+=("${order[$(( (k + rep - 1) % n ))]}"); done
    run_rep "$rep" "${rot[*]}"
    log "rep $rep done at $((SECONDS - t0)) s; $(steal_note)"
  done
  if [[ $has == *" D "* ]]; then
    for name in $PATHS; do
      idx=$(path_index "$name")
      [ "$name" = direct ] && continue
      [[ -n "${D_PATHS:-}" && " $D_PATHS " != *" $name "* ]] && continue
      start_path "$name" "$idx" redis && { sec_D 1 "$name"; stop_path; }
    done
  fi
  [[ $has == *" E "* ]] && sec_E
  cleanup
  log "total $((SECONDS - t0)) s"
  $PY "$HERE/tools/summarize.py" "$RUN" | tee "$RUN/summary.md"
}
main "$@"
