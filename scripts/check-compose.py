#!/usr/bin/env python3
"""Check deploy/compose/compose.yaml without a Docker engine.

- valid YAML with a `services` mapping; every service has an image or a build
- every bind-mount source (relative to the compose file), build context and Dockerfile exists
- named volumes used are declared under `volumes`; depends_on names existing services
- every bind-mounted *.toml parses, and each key file it names lies under one of that
  service's mount targets (else the container could not read it)
- every bind-mounted Prometheus config: its rule_files and the Grafana dashboard provider path
  are mount targets of their service, and each scrape target's host is a compose service
usage: scripts/check-compose.py [COMPOSE_FILE]   (default deploy/compose/compose.yaml)
"""
import os
import sys
import tomllib

import yaml


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "deploy/compose/compose.yaml"
    base = os.path.dirname(os.path.abspath(path))
    errs = []
    try:
        doc = yaml.safe_load(open(path))
    except (OSError, yaml.YAMLError) as e:
        print(f"check-compose: FAIL {path}: {e}")
        return 1
    services = (doc or {}).get("services")
    if not isinstance(services, dict) or not services:
        print(f"check-compose: FAIL {path}: no services")
        return 1
    declared_vols = set((doc.get("volumes") or {}).keys())

    def mounts(svc):
        out = []
        for v in svc.get("volumes", []) or []:
            if isinstance(v, str):
                parts = v.split(":")
                out.append((parts[0], parts[1] if len(parts) > 1 else parts[0]))
            else:
                out.append((v.get("source"), v.get("target")))
        return out

    def is_bind(src):
        return src.startswith((".", "/", "~"))

    for name, svc in services.items():
        where = f"service {name}"
        if not isinstance(svc, dict):
            errs.append(f"{where}: not a mapping")
            continue
        if "image" not in svc and "build" not in svc:
            errs.append(f"{where}: neither image nor build")
        b = svc.get("build")
        if b:
            ctx = os.path.join(base, b if isinstance(b, str) else b.get("context", "."))
            if not os.path.isdir(ctx):
                errs.append(f"{where}: build context {ctx} missing")
            df = "Dockerfile" if isinstance(b, str) else b.get("dockerfile", "Dockerfile")
            if not os.path.isfile(os.path.join(ctx, df)):
                errs.append(f"{where}: Dockerfile {df} missing in {ctx}")
        deps = svc.get("depends_on") or []
        for d in (deps if isinstance(deps, list) else deps.keys()):
            if d not in services:
                errs.append(f"{where}: depends_on unknown service {d}")
        targets = [t for _, t in mounts(svc)]
        for src, tgt in mounts(svc):
            if src is None or tgt is None:
                errs.append(f"{where}: volume without source/target")
                continue
            if not is_bind(src):
                if src not in declared_vols:
                    errs.append(f"{where}: named volume {src} not declared under volumes:")
                continue
            host = os.path.normpath(os.path.join(base, os.path.expanduser(src)))
            if not os.path.exists(host):
                errs.append(f"{where}: bind mount source {src} -> {host} does not exist")
                continue
            if host.endswith(".toml"):
                try:
                    cfg = tomllib.load(open(host, "rb"))
                except tomllib.TOMLDecodeError as e:
                    errs.append(f"{where}: {src}: invalid TOML: {e}")
                    continue
                for t in cfg.get("tunnel", []):
                    for k in t.get("keys", []):
                        if not any(k == m or k.startswith(m.rstrip("/") + "/") for m in targets):
                            errs.append(f"{where}: {src}: key {k} is not under any mount of the service")
            if os.path.basename(host) == "prometheus.yml" and os.path.isfile(host):
                try:
                    pc = yaml.safe_load(open(host))
                except yaml.YAMLError as e:
                    errs.append(f"{where}: {src}: invalid YAML: {e}")
                    continue
                for rf in pc.get("rule_files", []) or []:
                    if rf not in targets:
                        errs.append(f"{where}: {src}: rule file {rf} is not mounted")
                for sc in pc.get("scrape_configs", []) or []:
                    for st in sc.get("static_configs", []) or []:
                        for t in st.get("targets", []):
                            if t.rsplit(":", 1)[0] not in services:
                                errs.append(f"{where}: {src}: scrape target {t} is not a compose service")
            if tgt.rstrip("/").endswith("provisioning/dashboards") and os.path.isdir(host):
                for f in os.listdir(host):
                    prov = yaml.safe_load(open(os.path.join(host, f)))
                    for p in prov.get("providers", []):
                        pp = (p.get("options") or {}).get("path")
                        if pp and pp.rstrip("/") not in [x.rstrip("/") for x in targets]:
                            errs.append(f"{where}: dashboard provider path {pp} is not mounted")
    for e in errs:
        print(f"check-compose: FAIL {path}: {e}")
    if errs:
        return 1
    print(f"check-compose: ok   {path} ({len(services)} services)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
