#!/usr/bin/env python3
"""Checks everything in deploy/ without a cluster.

- yamllint over every YAML file;
- every kustomization renders (`kubectl kustomize`, when kubectl is present; otherwise each
  resource file is checked on its own) and validates strictly against the Kubernetes schemas
  (kubernetes-validate, offline); custom resources (cert-manager, prometheus-operator) are checked
  for their required fields;
- the gateway.toml of every ConfigMap passes `cloudcasa-gateway --check --config-only`;
- the PrometheusRule carries exactly the groups of prometheus/alerts.yaml;
- the Dockerfile is multi-stage, builds with --locked, runs as a numeric non-root user on a
  distroless base, and exposes the proxy and admin ports.

Usage: deploy/check.py PATH-TO-cloudcasa-gateway-BINARY
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
KUSTOMIZATIONS = [
    "kubernetes/sidecar",
    "kubernetes/gateway/base",
    "kubernetes/gateway/overlays/example",
    "kubernetes/gateway/overlays/monitored",
]
KUBERNETES_VERSION = "1.33.0"
CUSTOM_KINDS = {
    ("cert-manager.io/v1", "Certificate"): ["secretName", "issuerRef", "dnsNames"],
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ["selector", "endpoints"],
    ("monitoring.coreos.com/v1", "PrometheusRule"): ["groups"],
}
failures = []


def fail(what):
    failures.append(what)
    print(f"FAIL: {what}")


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def yamllint():
    files = [str(p) for p in DEPLOY.rglob("*.yaml")]
    r = run([sys.executable, "-m", "yamllint", "-s", "-c", str(DEPLOY / ".yamllint.yaml"), *files])
    if r.returncode != 0:
        fail(f"yamllint:\n{r.stdout}{r.stderr}")
    else:
        print(f"ok: yamllint, {len(files)} files")


def render(directory):
    """The resources of a kustomization: rendered by kubectl, or read file by file."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        r = run([kubectl, "kustomize", str(DEPLOY / directory)])
        if r.returncode != 0:
            fail(f"kubectl kustomize {directory}: {r.stderr}")
            return []
        return [d for d in yaml.safe_load_all(r.stdout) if d]
    docs = []
    for f in sorted((DEPLOY / directory).glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        docs.extend(d for d in yaml.safe_load_all(f.read_text()) if d)
    # ConfigMaps come from configMapGenerator: check their files directly.
    for toml in (DEPLOY / directory).glob("*.toml"):
        if toml.name == "gateway.toml":
            docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": f"(generated from {toml})"},
                         "data": {"gateway.toml": toml.read_text()}})
    return docs


def validate(directory, docs, binary, scratch):
    before = len(failures)
    if not docs:
        if shutil.which("kubectl"):
            fail(f"{directory}: no resources")
        else:
            print(f"note: {directory} has no resource files of its own; it renders only with kubectl")
        return
    builtin = []
    for d in docs:
        key = (d.get("apiVersion"), d.get("kind"))
        if key in CUSTOM_KINDS:
            missing = [f for f in CUSTOM_KINDS[key] if f not in (d.get("spec") or {})]
            if missing or not d.get("metadata", {}).get("name"):
                fail(f"{directory}: {key[1]} lacks {missing or 'metadata.name'}")
        else:
            builtin.append(d)
    path = scratch / (directory.replace("/", "_") + ".yaml")
    path.write_text(yaml.safe_dump_all(builtin))
    r = run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet",
             "-k", KUBERNETES_VERSION, str(path)])
    if r.returncode != 0:
        fail(f"kubernetes-validate {directory}:\n{r.stdout}{r.stderr}")
    kinds = sorted({d["kind"] for d in docs})
    if len(failures) == before:
        print(f"ok: {directory} renders and validates ({len(docs)} resources: {', '.join(kinds)})")

    for d in docs:
        if d.get("kind") != "ConfigMap" or "gateway.toml" not in (d.get("data") or {}):
            continue
        toml = scratch / "gateway.toml"
        toml.write_text(d["data"]["gateway.toml"])
        env = dict(os.environ, KUBERNETES_SERVICE_HOST="10.0.0.1", KUBERNETES_SERVICE_PORT="443")
        r = run([binary, "--config", str(toml), "--check", "--config-only"], env=env)
        name = d["metadata"]["name"]
        if r.returncode != 0:
            fail(f"{directory}: ConfigMap {name}: gateway.toml rejected:\n{r.stderr}")
        else:
            print(f"ok: {directory}: ConfigMap {name}: gateway.toml passes --check")


def alerts_agree():
    plain = yaml.safe_load((DEPLOY / "prometheus/alerts.yaml").read_text())
    rule = yaml.safe_load((DEPLOY / "kubernetes/components/prometheus/prometheusrule.yaml").read_text())
    if rule["spec"] != plain:
        fail("prometheusrule.yaml does not carry the groups of prometheus/alerts.yaml")
    names = [r["alert"] for g in plain["groups"] for r in g["rules"]]
    print(f"ok: alerts agree ({', '.join(names)})")


def dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    checks = {
        "multi-stage": len(stages) >= 2,
        "distroless runtime": "distroless" in stages[-1],
        "cargo build --release --locked": re.search(r"cargo build --release --locked", text),
        "numeric non-root USER": re.search(r"^USER\s+([1-9][0-9]*)(:[0-9]+)?\s*$", text, re.M),
        "EXPOSE proxy and admin": re.search(r"^EXPOSE\s+.*8080.*9901", text, re.M),
        "config at /etc/cloudcasa-gateway/gateway.toml": "/etc/cloudcasa-gateway/gateway.toml" in text,
        "exec-form ENTRYPOINT (no shell)": re.search(r'^ENTRYPOINT\s+\[', text, re.M),
    }
    for what, ok in checks.items():
        if not ok:
            fail(f"Dockerfile: {what}")
    ignore = (DEPLOY.parent / ".dockerignore").read_text().split()
    if "target" not in ignore:
        fail(".dockerignore must exclude target")
    print("ok: Dockerfile and .dockerignore")


def dashboard():
    d = json.loads((DEPLOY / "grafana/cloudcasa-gateway.json").read_text())
    ids = [p["id"] for p in d["panels"]]
    if len(ids) != len(set(ids)) or not all(p.get("targets") for p in d["panels"]):
        fail("dashboard: panel ids must be unique and every panel needs a query")
    print(f"ok: dashboard, {len(ids)} panels", flush=True)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    binary = sys.argv[1]
    if not shutil.which("kubectl"):
        print("note: kubectl not found; checking each resource file instead of rendered overlays")
    yamllint()
    directories = KUSTOMIZATIONS
    if not shutil.which("kubectl"):
        directories = KUSTOMIZATIONS + ["kubernetes/components/cert-manager", "kubernetes/components/prometheus"]
    with tempfile.TemporaryDirectory() as tmp:
        for k in directories:
            validate(k, render(k), binary, Path(tmp))
    alerts_agree()
    dockerfile()
    dashboard()
    if failures:
        print(f"{len(failures)} deploy check(s) failed", file=sys.stderr)
        sys.exit(1)
    print("deploy checks passed")


if __name__ == "__main__":
    main()
