# Extra paths for scripts/bench/peers.sh (EXTRA_PATHS=scripts/bench/extra-paths.sh):
#   sealmet   the sealpipe pair with --metrics on both sides (the cost of metrics)
#   sealnofs  the sealpipe pair with --no-forward-secrecy (cheaper connection setup)
#   seal1     the sealpipe pair with --threads 1 on both sides
#   sealcold  the sealpipe pair without warm sessions (--warm-max 0 on the encrypt side: each new
#             client waits for its own connect and handshake, as before warm sessions)
#   sealfwd1  sealpipe forward --threads 1 (one shard; compare with sealfwd = all CPUs)
start_sealmet() {
  local mid; mid=$(mid_port "$1")
  sealpipe_key || return 1
  "$SEALPIPE_BIN" decrypt --listen "127.0.0.1:$mid" --target "$2:$3" --key "$CONF/sealpipe.key" \
      --metrics "127.0.0.1:$((mid + 5))" $SEALPIPE_ARGS >>"$RUN/sealpipe.log" 2>&1 &
  track $!
  "$SEALPIPE_BIN" encrypt --listen "127.0.0.1:$1" --target "127.0.0.1:$mid" --key "$CONF/sealpipe.key" \
      --metrics "127.0.0.1:$((mid + 6))" $SEALPIPE_ARGS >>"$RUN/sealpipe.log" 2>&1 &
  track $!
  need_listen "$mid" && need_listen "$1"
}
start_sealnofs() { SEALPIPE_ARGS="$SEALPIPE_ARGS --no-forward-secrecy" start_sealpipe "$@"; }
start_seal1() { SEALPIPE_ARGS="$SEALPIPE_ARGS --threads 1" start_sealpipe "$@"; }
start_sealcold() { SEALPIPE_ENC_ARGS="${SEALPIPE_ENC_ARGS:-} --warm-max 0" start_sealpipe "$@"; }
start_sealfwd1() { SEALPIPE_ARGS="$SEALPIPE_ARGS --threads 1" start_sealfwd "$@"; }
#   sealpin      the pair with shards pinned (--pin)
#   sealpinicpu  the pair pinned and steered by receiving CPU (--pin --incoming-cpu)
#   sealfwdpin   sealpipe forward, pinned
#   sealold, sealfwdold  the pair / forward from a second build (SEALPIPE_OLD_BIN), so two builds
#                are measured in one run, alternating (e.g. before and after a change)
start_sealpin() { SEALPIPE_ARGS="$SEALPIPE_ARGS --pin" start_sealpipe "$@"; }
start_sealpinicpu() { SEALPIPE_ARGS="$SEALPIPE_ARGS --pin --incoming-cpu" start_sealpipe "$@"; }
start_sealfwdpin() { SEALPIPE_ARGS="$SEALPIPE_ARGS --pin" start_sealfwd "$@"; }
start_sealold() { SEALPIPE_BIN="${SEALPIPE_OLD_BIN:?set SEALPIPE_OLD_BIN}" start_sealpipe "$@"; }
start_sealfwdold() { SEALPIPE_BIN="${SEALPIPE_OLD_BIN:?set SEALPIPE_OLD_BIN}" start_sealfwd "$@"; }
