#!/usr/bin/env bash
# Check deploy/sysctl/*.conf: every line is a comment, blank, or `key = value` whose key names a
# real kernel setting (a /proc/sys path on this machine, when /proc/sys has that subtree) and
# whose paragraph starts with a one-line reason comment.
# usage: scripts/validate-sysctl.sh [FILE]   (default deploy/sysctl/99-sealpipe.conf)
set -euo pipefail
cd "$(dirname "$0")/.."
f=${1:-deploy/sysctl/99-sealpipe.conf}
python3 - "$f" <<'PY'
import os, re, sys
path = sys.argv[1]
errs, n = [], 0
prev_comment = False          # the current paragraph started with a comment line
para_has_reason = False
required = {"net.core.somaxconn", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_migrate_req", "fs.file-max"}
seen = set()
for i, line in enumerate(open(path), 1):
    s = line.strip()
    if not s:
        para_has_reason = False
        continue
    if s.startswith("#"):
        if len(s.lstrip("#").strip()) > 0:
            para_has_reason = True
        continue
    m = re.fullmatch(r"([a-z0-9_.\-]+)\s*=\s*(\S.*)", s)
    if not m:
        errs.append(f"{path}:{i}: not `key = value`: {s}")
        continue
    key, val = m.groups()
    n += 1
    if key in seen:
        errs.append(f"{path}:{i}: {key} set twice")
    seen.add(key)
    if not para_has_reason:
        errs.append(f"{path}:{i}: {key} has no reason comment above it")
    proc = "/proc/sys/" + key.replace(".", "/")
    top = "/proc/sys/" + key.split(".")[0]
    # Only judge keys whose subtree this kernel/namespace exposes (containers hide some).
    if os.path.isdir(os.path.dirname(proc)) and not os.path.exists(proc):
        errs.append(f"{path}:{i}: {key}: no such kernel setting ({proc} missing)")
    if not re.fullmatch(r"-?\d+( +-?\d+)*", val):
        errs.append(f"{path}:{i}: {key}: value {val!r} is not numeric")
for k in sorted(required - seen):
    errs.append(f"{path}: required setting {k} missing")
for e in errs:
    print("validate-sysctl: FAIL", e)
if errs:
    sys.exit(1)
print(f"validate-sysctl: ok   {path} ({n} settings)")
PY
