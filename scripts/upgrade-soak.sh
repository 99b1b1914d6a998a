#!/usr/bin/env bash
# The long form of tests/upgrade.rs's connections_survive_an_upgrade_of_each_side_under_mixed_traffic
# (issue 17): a sealpipe pair under a byte-verified bulk stream both ways, a pub/sub subscriber
# getting a message every 10 ms, idle connections and connection churn with echo checks, while
# each side is upgraded several times (--handoff moving every established connection): the
# first encrypt upgrade with forward secrecy on, the decrypt side after a key rotation (the new
# key accepted, then primary), every upgrade with the idle connections hibernating. Passes only
# with 0 resets, 0 byte mismatches, every pub/sub message once and in order, every idle
# connection echoing afterwards and no failed churn connection; prints the run's figures
# (pauses, old process exit times) as JSON.
#
#   scripts/upgrade-soak.sh                         # 60 s, 3 + 3 upgrades, 1,000 idle, 200 conn/s
#   scripts/upgrade-soak.sh --secs 20 --rounds 1 --idle 300 --churn 25   # the CI form (cargo test)
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=60 ROUNDS=3 IDLE=1000 CHURN=200 RATE=$((8 << 20)) PROFILE=--release
while [ $# -gt 0 ]; do
  case "$1" in
    --secs) SECS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --idle) IDLE=$2; shift 2 ;;
    --churn) CHURN=$2; shift 2 ;;
    --bulk-rate) RATE=$2; shift 2 ;;
    --debug) PROFILE=; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "upgrade-soak: unknown option $1" >&2; exit 2 ;;
  esac
done
# Each sealpipe process holds two descriptors per connection, four while a connection moves.
NEED=$((4 * (IDLE + 64) + 256))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$NEED" ]; then
  ulimit -n "$NEED" 2>/dev/null || { echo "upgrade-soak: needs ulimit -n >= $NEED" >&2; exit 2; }
fi
REPORT=$(mktemp)
trap 'rm -f "$REPORT"' EXIT
SEALPIPE_UPGRADE_SECS=$SECS SEALPIPE_UPGRADE_ROUNDS=$ROUNDS SEALPIPE_UPGRADE_IDLE=$IDLE \
SEALPIPE_UPGRADE_CHURN=$CHURN SEALPIPE_UPGRADE_BULK_RATE=$RATE SEALPIPE_UPGRADE_REPORT=$REPORT \
  cargo test $PROFILE --locked -p sealpipe --test tests \
    upgrade::connections_survive_an_upgrade_of_each_side_under_mixed_traffic -- --exact --nocapture
echo "upgrade-soak: passed: $(cat "$REPORT")"
