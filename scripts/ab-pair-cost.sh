#!/usr/bin/env bash
# What a change costs (or saves) through a sealpipe pair, counted in instructions
# (valgrind --tool=callgrind) and system calls (strace -c), which repeat on a loaded machine
# where timings do not. Two builds, A and B, alternate run by run (A B A B ...).
#
# For each build and each of REPS runs:
#   bulk  a pair (decrypt and encrypt, one shard each, both under callgrind) carries MIB MiB
#         each way between a client and an echo backend (python, not measured); the
#         instructions of both sealpipe processes, start to exit, are summed and given per GiB
#         carried (2 x MIB MiB), with the share of the encrypt process spent in memmove/memcpy
#         (glibc's, by function name, self cost).
#   rr    the same pair carries RR_N1, then (a fresh pair) RR_N2 round trips of 64 bytes on one
#         connection; the difference of the two sums over RR_N2 - RR_N1 is the instructions per
#         request, start-up and connection setup cancelled out.
#   conn  likewise CONN_N1 and CONN_N2 connections, one after another (connect, one 64-byte
#         round trip, close): instructions and heap allocations (calls to malloc, calloc,
#         realloc and the aligned allocators, counted by callgrind) per connection.
# Then, unless SYSCALLS=0, once per build without valgrind: `strace -c -f` on both processes
# while RR_N2 round trips run on one connection: system calls per request, by name.
#
# usage: scripts/ab-pair-cost.sh A_BIN B_BIN [MIB] [REPS]      (defaults 32 and 2)
#   ARGS_A / ARGS_B  extra arguments for each build's two processes (e.g. "--io-backend uring")
#   RR_N1 [1000]  RR_N2 [4000]  CONN_N1 [100]  CONN_N2 [400]  SECTIONS [bulk rr conn]
#   SYSCALLS [1]  OUT [a temporary dir]
# needs: valgrind, strace, python3. Kills only the processes it started (their PIDs), on any
# exit. Results: a summary on stdout; the callgrind and strace outputs stay in OUT if given.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
a_bin=$(realpath "${1:?usage: $0 A_BIN B_BIN [MIB] [REPS]}")
b_bin=$(realpath "${2:?usage: $0 A_BIN B_BIN [MIB] [REPS]}")
mib=${3:-32}
reps=${4:-2}
rr1=${RR_N1:-1000}
rr2=${RR_N2:-4000}
cn1=${CONN_N1:-100}
cn2=${CONN_N2:-400}
sections=${SECTIONS:-bulk rr conn}
for t in valgrind python3 callgrind_annotate; do
  command -v $t >/dev/null || { echo "ab-pair-cost: $t not found"; exit 1; }
done
H="python3 $root/scripts/e2e_helper.py"
keep=${OUT:-}
tmp=${OUT:-$(mktemp -d)}
mkdir -p "$tmp"
. scripts/own_pids.sh
cleanup() {
  stop_own_pids
  [ -z "$keep" ] && rm -rf "$tmp"
}
trap cleanup EXIT

cat > "$tmp/rr.py" <<'PY'
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
c = socket.create_connection(("127.0.0.1", port), timeout=900)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
req = b"x" * 64
for _ in range(n):
    c.sendall(req)
    got = b""
    while len(got) < len(req):
        b = c.recv(4096)
        assert b, "closed early"
        got += b
    assert got == req
c.close()
PY
cat > "$tmp/conn.py" <<'PY'
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
for _ in range(n):
    c = socket.create_connection(("127.0.0.1", port), timeout=900)
    c.sendall(b"x" * 64)
    got = b""
    while len(got) < 64:
        b = c.recv(4096)
        assert b, "closed early"
        got += b
    c.close()
PY
# calls to the allocator's entry points in a callgrind output
allocs_of() {
  python3 - "$1" <<'PYA'
import re, sys
names, total, cur = {}, 0, None
alloc = {"malloc", "calloc", "realloc", "posix_memalign", "aligned_alloc", "memalign"}
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"(c?)fn=\((\d+)\)(?: (.*))?", line)
    if m:
        if m.group(3):
            names[m.group(2)] = m.group(3).strip()
        if m.group(1):
            cur = names.get(m.group(2), "")
        continue
    m = re.match(r"calls=(\d+)", line)
    if m and cur in alloc:
        total += int(m.group(1))
        cur = None
print(total)
PYA
}

"$a_bin" keygen --out "$tmp/k.key" >/dev/null

# start_pair BIN ARGS WRAP_DEC WRAP_ENC -> sets p_back p_dec p_enc pb pd pe
start_pair() {
  local bin=$1 args=$2 wd=$3 we=$4
  read -r p_back p_dec p_enc <<<"$($H free-ports 3)"
  python3 "$root/scripts/e2e_helper.py" backend "$p_back" >/dev/null 2>&1 &
  pb=$!; pids+=($pb)
  $H wait-tcp "$p_back" 20
  # shellcheck disable=SC2086
  $wd "$bin" decrypt --listen "127.0.0.1:$p_dec" --target "127.0.0.1:$p_back" --key "$tmp/k.key" \
    --threads 1 --log-level error $args &
  pd=$!; pids+=($pd)
  $H wait-tcp "$p_dec" 120
  # shellcheck disable=SC2086
  $we "$bin" encrypt --listen "127.0.0.1:$p_enc" --target "127.0.0.1:$p_dec" --key "$tmp/k.key" \
    --threads 1 --log-level error $args &
  pe=$!; pids+=($pe)
  $H wait-tcp "$p_enc" 120
}
stop_pair() {
  kill -TERM "$pe"; wait "$pe" || true
  kill -TERM "$pd"; wait "$pd" || true
  kill -TERM "$pb"; wait "$pb" 2>/dev/null || true
}
ir_of() { awk '/^(summary|totals):/ {print $2; exit}' "$1"; }
# self cost of memmove/memcpy in a callgrind output, in instructions
mem_of() {
  callgrind_annotate --inclusive=no --threshold=100 "$1" 2>/dev/null |
    awk '/mem(move|cpy)/ { gsub(",", "", $1); s += $1 } END { print s + 0 }'
}

# run_cg BIN ARGS TAG CLIENT_SCRIPT N -> prints "IR_TOTAL IR_ENC MEM_ENC"
run_cg() {
  local bin=$1 args=$2 tag=$3 script=$4 n=$5
  local cg="valgrind --tool=callgrind -q --callgrind-out-file"
  start_pair "$bin" "$args" "$cg=$tmp/$tag.dec.out" "$cg=$tmp/$tag.enc.out"
  python3 "$script" "$p_enc" "$n"
  stop_pair
  local d e
  d=$(ir_of "$tmp/$tag.dec.out"); e=$(ir_of "$tmp/$tag.enc.out")
  echo "$((d + e)) $e $(mem_of "$tmp/$tag.enc.out")"
}

declare -A bulk_ir bulk_mem rr_ir conn_ir conn_al
for side in A B; do
  bulk_ir[$side]=""; bulk_mem[$side]=""; rr_ir[$side]=""; conn_ir[$side]=""; conn_al[$side]=""
done
for r in $(seq 1 "$reps"); do
  for side in A B; do
    if [ $side = A ]; then bin=$a_bin; args=${ARGS_A:-}; else bin=$b_bin; args=${ARGS_B:-}; fi
    if [[ " $sections " == *" bulk "* ]]; then
      read -r tot enc mem <<<"$(run_cg "$bin" "$args" "bulk$side$r" "$root/scripts/bulk_echo_client.py" "$mib")"
      per_gib=$(python3 -c "print(round($tot / ($mib * 2 / 1024)))")
      share=$(python3 -c "print(f'{100 * $mem / $enc:.2f}')")
      echo "bulk $side run $r: $tot instructions for $mib MiB each way = $per_gib per GiB; encrypt process memmove/memcpy $share% of its $enc"
      bulk_ir[$side]+="$per_gib "; bulk_mem[$side]+="$share "
    fi
    if [[ " $sections " == *" rr "* ]]; then
      read -r t1 _ _ <<<"$(run_cg "$bin" "$args" "rr1$side$r" "$tmp/rr.py" "$rr1")"
      read -r t2 _ _ <<<"$(run_cg "$bin" "$args" "rr2$side$r" "$tmp/rr.py" "$rr2")"
      per=$(( (t2 - t1) / (rr2 - rr1) ))
      echo "rr $side run $r: $per instructions per 64-byte request/response (both processes; $rr1 vs $rr2 requests)"
      rr_ir[$side]+="$per "
    fi
    if [[ " $sections " == *" conn "* ]]; then
      read -r t1 _ _ <<<"$(run_cg "$bin" "$args" "conn1$side$r" "$tmp/conn.py" "$cn1")"
      a1=$(( $(allocs_of "$tmp/conn1$side$r.dec.out") + $(allocs_of "$tmp/conn1$side$r.enc.out") ))
      read -r t2 _ _ <<<"$(run_cg "$bin" "$args" "conn2$side$r" "$tmp/conn.py" "$cn2")"
      a2=$(( $(allocs_of "$tmp/conn2$side$r.dec.out") + $(allocs_of "$tmp/conn2$side$r.enc.out") ))
      per=$(( (t2 - t1) / (cn2 - cn1) ))
      al=$(python3 -c "print(f'{($a2 - $a1) / ($cn2 - $cn1):.2f}')")
      echo "conn $side run $r: $per instructions and $al heap allocations per connection (both processes; $cn1 vs $cn2 connections)"
      conn_ir[$side]+="$per "; conn_al[$side]+="$al "
    fi
  done
done

if [ "${SYSCALLS:-1}" = 1 ] && command -v strace >/dev/null; then
  for side in A B; do
    if [ $side = A ]; then bin=$a_bin; args=${ARGS_A:-}; else bin=$b_bin; args=${ARGS_B:-}; fi
    start_pair "$bin" "$args" "" ""
    strace -c -f -o "$tmp/strace$side.txt" -p "$pe" -p "$pd" 2>/dev/null &
    st=$!; pids+=($st)
    sleep 1  # strace attaching to every thread; a setup delay, not a synchronisation of results
    python3 "$tmp/rr.py" "$p_enc" "$rr2"
    kill -INT "$st"; wait "$st" || true
    stop_pair
    echo "syscalls $side, $rr2 round trips (both processes), per request:"
    awk -v n="$rr2" '$NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ && $NF != "total" { printf "  %-16s %.2f\n", $NF, $4 / n } $NF == "total" { printf "  %-16s %.2f\n", "total", $3 / n }' "$tmp/strace$side.txt"
  done
fi

python3 - "${bulk_ir[A]}" "${bulk_ir[B]}" "${bulk_mem[A]}" "${bulk_mem[B]}" "${rr_ir[A]}" "${rr_ir[B]}" \
  "${conn_ir[A]}" "${conn_ir[B]}" "${conn_al[A]}" "${conn_al[B]}" <<'PY'
import sys, statistics as st
def nums(s): return [float(x) for x in s.split()]
ba, bb, ma, mb, ra, rb, ca, cb, la, lb = map(nums, sys.argv[1:])
def line(name, a, b, unit):
    if not a or not b: return
    ma_, mb_ = st.mean(a), st.mean(b)
    print(f"{name}: A {ma_:,.0f} (runs {', '.join(f'{x:,.0f}' for x in a)}), "
          f"B {mb_:,.0f} (runs {', '.join(f'{x:,.0f}' for x in b)}) {unit}; B/A {mb_ / ma_:.3f}")
line("bulk instructions per GiB", ba, bb, "")
if ma and mb:
    print(f"encrypt process memmove/memcpy share: A {st.mean(ma):.2f}%, B {st.mean(mb):.2f}%")
line("instructions per request", ra, rb, "")
line("instructions per connection", ca, cb, "")
if la and lb:
    print(f"heap allocations per connection: A {st.mean(la):.2f}, B {st.mean(lb):.2f}")
PY
