#!/usr/bin/env python3
"""Check Grafana dashboard JSON and extract its PromQL for the end-to-end check.

Checks, for every dashboard file given (default grafana/dashboards/*.json):
  - valid JSON, a non-empty uid unique across the files, a title
  - panel ids present and unique (rows and nested row panels included), gridPos on every panel,
    no two panels overlapping on the grid
  - a template variable `datasource` of type datasource (query prometheus), and every panel and
    every target uses it: datasource {"type": "prometheus", "uid": "${datasource}"}
  - every target of a non-row panel has a non-empty expr and a refId unique within its panel
  - every $variable an expr or variable query uses is defined; template variables appear only as
    regex matchers (=~ or !~), so that substituting `.*` keeps the query's meaning ("all")
Outputs (for scripts/e2e-prometheus.sh):
  --exprs-out FILE      every panel target's expr, one per line, whitespace collapsed, with
                        `=~"$var"` -> `=~".*"` and $__rate_interval/$__interval -> --rate-interval
  --var-exprs-out FILE  every label_values(METRIC{...}, label) variable query as the PromQL
                        `group by (label) (METRIC{...})`, same substitution
Exit status 1 on any problem (all problems are listed).
"""
import argparse
import glob
import json
import re
import sys

DS_UID = "${datasource}"
BUILTIN = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"}
VAR_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
MATCHER_VAR_RE = re.compile(r'(=~|!~)"(?:\$\{\w+(?::\w+)?\}|\$\w+|\[\[\w+\]\])"')


def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


def substitute(expr, rate_interval):
    expr = MATCHER_VAR_RE.sub(lambda m: f'{m.group(1)}".*"', expr)
    for v in ("__rate_interval", "__interval", "__range"):
        expr = expr.replace("${%s}" % v, rate_interval).replace("$" + v, rate_interval)
    return " ".join(expr.split())


def uses_ds_var(ds):
    if isinstance(ds, dict):
        return ds.get("uid") == DS_UID and ds.get("type", "prometheus") == "prometheus"
    return ds == DS_UID


def check(path, errs, exprs, var_exprs, rate_interval, uids):
    def err(msg):
        errs.append(f"{path}: {msg}")
    try:
        d = json.load(open(path))
    except (OSError, ValueError) as e:
        err(f"not valid JSON: {e}")
        return
    uid = d.get("uid")
    if not uid:
        err("dashboard has no uid")
    elif uid in uids:
        err(f"uid {uid!r} also used by {uids[uid]}")
    else:
        uids[uid] = path
    if not d.get("title"):
        err("dashboard has no title")

    tvars = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    dsv = tvars.get("datasource")
    if not dsv or dsv.get("type") != "datasource" or dsv.get("query") != "prometheus":
        err('no template variable "datasource" of type datasource with query "prometheus"')

    def check_vars(text, where):
        for m in VAR_RE.finditer(text):
            name = m.group(1) or m.group(2) or m.group(3)
            if name not in tvars and name not in BUILTIN:
                err(f"{where}: uses undefined variable ${name}")
        stripped = MATCHER_VAR_RE.sub("", text)
        for m in VAR_RE.finditer(stripped):
            name = m.group(1) or m.group(2) or m.group(3)
            if name not in BUILTIN:
                err(f"{where}: variable ${name} used outside a =~/!~ matcher (\".*\" substitution would change the query)")

    for name, v in tvars.items():
        if v.get("type") != "query":
            continue
        if not uses_ds_var(v.get("datasource")):
            err(f"variable {name}: datasource must be {DS_UID}")
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        check_vars(q, f"variable {name}")
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", q, re.S)
        if m:
            var_exprs.append(substitute(f"group by ({m.group(2)}) ({m.group(1)})", rate_interval))
        else:
            err(f"variable {name}: only label_values(metric{{...}}, label) queries are supported, got {q!r}")

    ids, boxes = {}, []
    for p in walk_panels(d.get("panels", [])):
        pid, title = p.get("id"), p.get("title", "?")
        where = f"panel {pid} {title!r}"
        if not isinstance(pid, int):
            err(f"panel {title!r} has no integer id")
        elif pid in ids:
            err(f"panel id {pid} used by both {ids[pid]!r} and {title!r}")
        else:
            ids[pid] = title
        g = p.get("gridPos")
        if not g or not all(k in g for k in ("x", "y", "w", "h")):
            err(f"{where}: missing gridPos")
        else:
            if g["x"] + g["w"] > 24:
                err(f"{where}: gridPos wider than 24 columns")
            for (ob, ow) in boxes:
                if (g["x"] < ob["x"] + ob["w"] and ob["x"] < g["x"] + g["w"]
                        and g["y"] < ob["y"] + ob["h"] and ob["y"] < g["y"] + g["h"]):
                    err(f"{where}: overlaps {ow}")
            boxes.append((g, where))
        if p.get("type") == "row":
            continue
        if not uses_ds_var(p.get("datasource")):
            err(f"{where}: panel datasource must be {{\"type\": \"prometheus\", \"uid\": \"{DS_UID}\"}}")
        targets = p.get("targets") or []
        if not targets:
            err(f"{where}: no targets")
        refs = set()
        for t in targets:
            ref = t.get("refId")
            tw = f"{where} target {ref}"
            if not ref or ref in refs:
                err(f"{tw}: missing or duplicate refId")
            refs.add(ref)
            if not uses_ds_var(t.get("datasource")):
                err(f"{tw}: target datasource must use {DS_UID}")
            expr = (t.get("expr") or "").strip()
            if not expr:
                err(f"{tw}: empty expr")
                continue
            check_vars(expr, tw)
            exprs.append(substitute(expr, rate_interval))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*")
    ap.add_argument("--exprs-out")
    ap.add_argument("--var-exprs-out")
    ap.add_argument("--rate-interval", default="1m")
    a = ap.parse_args()
    files = a.files or sorted(glob.glob("grafana/dashboards/*.json"))
    if not files:
        print("check-dashboard: FAIL no dashboard files")
        return 1
    errs, exprs, var_exprs, uids = [], [], [], {}
    for f in files:
        check(f, errs, exprs, var_exprs, a.rate_interval, uids)
    for e in errs:
        print("check-dashboard: FAIL", e)
    if a.exprs_out:
        with open(a.exprs_out, "w") as fh:
            fh.write("".join(e + "\n" for e in exprs))
    if a.var_exprs_out:
        with open(a.var_exprs_out, "w") as fh:
            fh.write("".join(e + "\n" for e in var_exprs))
    if errs:
        return 1
    print(f"check-dashboard: ok   {len(files)} dashboard(s), {len(exprs)} panel queries, {len(var_exprs)} variable queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
