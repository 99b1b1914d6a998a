#!/usr/bin/env bash
# Validate the systemd units with `systemd-analyze verify`, failing on ANY output line
# (systemd-analyze exits 0 on many warnings, e.g. unknown keys or bad values).
#
# usage: scripts/validate-systemd.sh [UNIT_DIR]     (default deploy/systemd)
#
# verify checks that ExecStart's binary exists and is executable. The units name the installed
# path /usr/bin/sealpipe (the package's), which may not exist on a build machine, so the units are copied to
# a temp dir with that one path rewritten to a real binary: $SEALPIPE_BIN, else
# target/release/sealpipe, else target/debug/sealpipe. Only when no binary was built does it use a
# stub script, and it says so. Nothing else in the unit is changed.
set -euo pipefail
cd "$(dirname "$0")/.."
unit_dir=${1:-deploy/systemd}

bin=""
for cand in "${SEALPIPE_BIN:-}" target/release/sealpipe target/debug/sealpipe; do
  if [ -n "$cand" ] && [ -x "$cand" ]; then bin=$(realpath "$cand"); break; fi
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -z "$bin" ]; then
  printf '#!/bin/sh\nexit 0\n' > "$tmp/sealpipe-stub"; chmod +x "$tmp/sealpipe-stub"
  bin=$tmp/sealpipe-stub
  echo "validate-systemd: NOTE no sealpipe binary built; ExecStart points at a stub for verify"
else
  echo "validate-systemd: ExecStart rewritten to $bin for verify"
fi

mkdir "$tmp/units"
shopt -s nullglob
units=("$unit_dir"/*.service "$unit_dir"/*.socket)
[ ${#units[@]} -gt 0 ] || { echo "validate-systemd: no units in $unit_dir"; exit 1; }
for u in "${units[@]}"; do
  sed "s#/usr/bin/sealpipe#$bin#g" "$u" > "$tmp/units/$(basename "$u")"
done

fail=0
for u in "$tmp"/units/*.service "$tmp"/units/*.socket; do
  name=$(basename "$u")
  # A socket's instance needs its service's instance beside it (verify loads both).
  case $name in
    *@.service) inst="${name%@.service}@example.service" ;;
    *@.socket) inst="${name%@.socket}@example.socket"
               ln -s "${name%@.socket}@.service" "$tmp/units/${name%@.socket}@example.service" 2>/dev/null || true ;;
    *) inst=$name ;;
  esac
  # verify wants an instance of a template; an alias file in the same dir gives it one.
  ln -s "$name" "$tmp/units/$inst" 2>/dev/null || true
  out=$(cd "$tmp/units" && SYSTEMD_LOG_COLOR=0 systemd-analyze verify --man=no "$tmp/units/$inst" 2>&1) && rc=0 || rc=$?
  # Any output at all is a failure: verify prints warnings (unknown key, bad value, missing
  # binary, unsafe setting) and still exits 0.
  if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
    echo "validate-systemd: FAIL $name (rc=$rc)"; printf '%s\n' "$out"; fail=1
  else
    echo "validate-systemd: ok   $name"
  fi
done

# The handoff holder must stay a copy of the main unit (same user, hardening, paths).
main=$unit_dir/sealpipe@.service hold=$unit_dir/sealpipe-handoff@.service
if [ -f "$main" ] && [ -f "$hold" ]; then
  norm() { grep -v -e '^#' -e '^Description=' -e '^Restart=' -e '^$' "$1" | sed '/^\[Install\]/,$d'; }
  if ! diff <(norm "$main") <(norm "$hold") >"$tmp/diff"; then
    echo "validate-systemd: FAIL sealpipe-handoff@.service drifted from sealpipe@.service:"; cat "$tmp/diff"; fail=1
  fi
  grep -q '^Restart=no$' "$hold" || { echo "validate-systemd: FAIL handoff holder must have Restart=no"; fail=1; }
fi
# The socket unit: names its socket after the instance (the tunnel that serves it), leaves
# accepting to sealpipe, and activates the service of the same instance.
sock=$unit_dir/sealpipe@.socket
if [ -f "$sock" ]; then
  for want in '^FileDescriptorName=%i$' '^Accept=no$' '^ListenStream=' '^WantedBy=sockets.target$'; do
    grep -qE "$want" "$sock" || { echo "validate-systemd: FAIL $sock lacks /$want/"; fail=1; }
  done
fi
# Policy checks that verify cannot know about.
if [ -f "$main" ]; then
  for want in '^DynamicUser=yes$' '^NoNewPrivileges=yes$' '^ProtectSystem=strict$' '^ProtectHome=yes$' \
              '^PrivateTmp=yes$' '^CapabilityBoundingSet=$' '^RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX$' \
              '^SystemCallFilter=@system-service$' '^ExecReload=/bin/kill -HUP \$MAINPID$' '^Restart=on-failure$' '^LimitCORE=0$'; do
    grep -qE "$want" "$main" || { echo "validate-systemd: FAIL $main lacks /$want/"; fail=1; }
  done
  stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)$/\1/p' "$main")
  nofile=$(sed -n 's/^LimitNOFILE=\([0-9]*\)$/\1/p' "$main")
  [ "${stop:-0}" -gt 30 ] || { echo "validate-systemd: FAIL TimeoutStopSec (${stop:-unset}) must exceed the 30 s drain timeout"; fail=1; }
  [ "${nofile:-0}" -ge 65536 ] || { echo "validate-systemd: FAIL LimitNOFILE (${nofile:-unset}) must be >= 65536"; fail=1; }
fi
exit $fail
