# Sourced (not run) by the scripts that start processes: each PID they start goes into `pids`,
# and `stop_own_pids` (from their EXIT trap) stops those and no other: TERM to each, then waits
# for each. Usage: `. scripts/own_pids.sh` from the repository root, then `pids+=($!)`.
pids=()
stop_own_pids() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
