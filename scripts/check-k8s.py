#!/usr/bin/env python3
"""Validate rendered Kubernetes manifests (`kubectl kustomize deploy/k8s` output on stdin or a file).

- built-in kinds: kubernetes-validate, strict (unexpected properties are errors), against the
  oldest Kubernetes the manifests claim (1.30: native sidecars + preStop sleep) and the newest
  schema the package ships. A kind with no schema is an error, not a warning.
- ServiceMonitor (a CRD, absent from kubernetes-validate's schemas): jsonschema against the
  vendored subset scripts/schemas/servicemonitor-v1.minimal.json. Any other CRD kind fails.
- policy: every sealpipe container has /readyz readiness and /healthz liveness probes, resource
  requests, and the pod's terminationGracePeriodSeconds exceeds preStop sleep + 30 s drain.
usage: kubectl kustomize deploy/k8s | scripts/check-k8s.py [-]
"""
import json
import os
import sys

import jsonschema
import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
VERSIONS = ["1.30.0", None]  # None = the package's newest
DRAIN_TIMEOUT = 30
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): "schemas/servicemonitor-v1.minimal.json"}


def newest():
    d = os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema")
    vs = [v.split("-")[0].lstrip("v") for v in os.listdir(d) if v.endswith("-local-strict")]
    return max(vs, key=lambda v: tuple(int(x) for x in v.split(".")))


def pod_spec(doc):
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return doc["spec"]["template"]["spec"]
    if kind == "Pod":
        return doc["spec"]
    return None


def policy(doc, errs):
    spec = pod_spec(doc)
    if spec is None:
        return
    name = f'{doc["kind"]}/{doc["metadata"]["name"]}'
    conts = spec.get("containers", []) + spec.get("initContainers", [])
    ours = [c for c in conts if str(c.get("image", "")).split(":")[0].endswith("sealpipe")]
    for c in ours:
        where = f"{name} container {c['name']}"
        rp = (c.get("readinessProbe") or {}).get("httpGet", {}).get("path")
        lp = (c.get("livenessProbe") or {}).get("httpGet", {}).get("path")
        if rp != "/readyz":
            errs.append(f"{where}: readinessProbe must be httpGet /readyz (got {rp})")
        if lp != "/healthz":
            errs.append(f"{where}: livenessProbe must be httpGet /healthz (got {lp})")
        req = (c.get("resources") or {}).get("requests") or {}
        if "cpu" not in req or "memory" not in req:
            errs.append(f"{where}: resources.requests.cpu and .memory are required")
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False or sc.get("readOnlyRootFilesystem") is not True:
            errs.append(f"{where}: needs allowPrivilegeEscalation: false and readOnlyRootFilesystem: true")
        pre = ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if grace <= pre + DRAIN_TIMEOUT:
            errs.append(f"{where}: terminationGracePeriodSeconds {grace} must exceed preStop {pre} + drain {DRAIN_TIMEOUT}")
    if ours and not (spec.get("securityContext") or {}).get("runAsNonRoot"):
        errs.append(f"{name}: pod securityContext.runAsNonRoot must be true")


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "-"
    text = sys.stdin.read() if src == "-" else open(src).read()
    docs = [d for d in yaml.safe_load_all(text) if d]
    if not docs:
        print("check-k8s: FAIL no documents")
        return 1
    errs, n_builtin, n_crd = [], 0, 0
    versions = [v or newest() for v in VERSIONS]
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        name = f'{key[1]}/{(doc.get("metadata") or {}).get("name")}'
        if key in CRD_SCHEMAS:
            schema = json.load(open(os.path.join(HERE, CRD_SCHEMAS[key])))
            for e in jsonschema.Draft202012Validator(schema).iter_errors(doc):
                errs.append(f"{name}: {'/'.join(map(str, e.absolute_path))}: {e.message} (vendored CRD subset)")
            n_crd += 1
            continue
        for v in versions:
            try:
                kubernetes_validate.validate(doc, v, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                errs.append(f"{name}: no schema for {key[0]} {key[1]} in Kubernetes {v} (unknown kind or CRD without a vendored schema)")
            except kubernetes_validate.ValidationError as e:
                path = "/".join(map(str, e.path))
                errs.append(f"{name}: Kubernetes {v}: {path}: {e.message}")
        n_builtin += 1
        policy(doc, errs)
    for e in errs:
        print("check-k8s: FAIL", e)
    if errs:
        return 1
    print(f"check-k8s: ok   {n_builtin} built-in objects (strict, k8s {' and '.join(versions)}), {n_crd} ServiceMonitor (vendored subset schema)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
