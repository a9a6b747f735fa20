#!/usr/bin/env python3
"""Checks everything in deploy/ without a cluster.

- yamllint over every YAML file;
- every kustomization renders (`kubectl kustomize`, when kubectl is present; otherwise each
  resource file is checked on its own) and validates strictly against the Kubernetes schemas
  (kubernetes-validate, offline); custom resources (cert-manager, prometheus-operator) are checked
  for their required fields;
- the gateway.toml of every ConfigMap passes `cloudcasa-gateway --check --config-only`;
- every pod can read the Secret (and ConfigMap) files it mounts, as the kubelet lays them out:
  root:root with defaultMode, or root:fsGroup with the group read bit added when the pod sets
  fsGroup; its containers' runAsUser/runAsGroup/supplementalGroups decide (a self-test proves the
  rule flags the 0440-without-fsGroup mistake);
- the gateway's pods give SIGTERM enough time: terminationGracePeriodSeconds exceeds
  server.shutdown_delay + server.drain_timeout of the gateway.toml they mount, a Deployment's
  shutdown_delay is not 0, and a CronJob's Jobs have activeDeadlineSeconds and backoffLimit;
- the PrometheusRule carries exactly the groups of prometheus/alerts.yaml;
- the Dockerfile is multi-stage, pins every base image by digest (tag in a comment), carries the
  OCI labels, builds with --locked, runs as a numeric non-root user on a distroless base, exposes
  the proxy and admin ports, and its built-in gateway.toml (a sidecar config) passes --check;
- at run time (needs root and setpriv from util-linux; skipped, saying so, when not root, and
  failed instead when CI=true): the binary, run as uid/gid 65532, reads a token laid out as the
  kubelet writes a Secret volume with fsGroup 65532 (/readyz 200), and without fsGroup fails with
  a log line naming the file and "Permission denied" (/readyz stays 503). CI passes the debug
  binary: whether uid 65532 may open a root:root 0440 file is decided by the kernel at open(2),
  and the code that opens, reports and retries the token file is the same source in both
  profiles (no cfg(debug_assertions) on that path), so the outcome cannot differ; building the
  release binary (fat LTO) would add minutes to CI for no extra coverage. Pass
  target/release/cloudcasa-gateway to run it against the release binary;
- every metric name the dashboard's, alerts' and PrometheusRule's queries select (and any
  cloudcasa_gateway_* or process_* name elsewhere in them) is exported by the binary's /metrics
  after some traffic (against a mock upstream on 127.0.0.1).

Usage: deploy/check.py PATH-TO-cloudcasa-gateway-BINARY
"""

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
KUSTOMIZATIONS = [
    "kubernetes/sidecar",
    "kubernetes/gateway/base",
    "kubernetes/gateway/overlays/example",
    "kubernetes/gateway/overlays/monitored",
    "kubernetes/gateway/overlays/fleet",
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


# --- Pods: can each container read the Secret files it mounts? -------------------------------

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def pod_specs(doc):
    """(description, pod spec, workload spec) for every pod template in a resource."""
    kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
    spec = doc.get("spec") or {}
    if kind == "Pod":
        yield f"Pod {name}", spec, {}
    elif kind in WORKLOADS:
        yield f"{kind} {name}", (spec.get("template") or {}).get("spec") or {}, spec
    elif kind == "CronJob":
        job = (spec.get("jobTemplate") or {}).get("spec") or {}
        yield f"CronJob {name}", (job.get("template") or {}).get("spec") or {}, job


def mounted_files(volume):
    """[(what, mode)] for the files of a Secret or ConfigMap volume (projected sources included);
    None for other volume types (projected ServiceAccount tokens get their owner set by the
    kubelet, emptyDirs and the like are not written by it)."""
    def items(source, default):
        modes = [i["mode"] for i in source.get("items") or [] if i.get("mode") is not None]
        # Keys not listed in items (or all keys, without items) get the default mode.
        return sorted(set(modes + ([default] if not source.get("items") else [])))
    if "secret" in volume:
        src = volume["secret"]
        return [(f"Secret {src.get('secretName')}", m) for m in items(src, src.get("defaultMode", 0o644))]
    if "configMap" in volume:
        src = volume["configMap"]
        return [(f"ConfigMap {src.get('name')}", m) for m in items(src, src.get("defaultMode", 0o644))]
    if "projected" in volume:
        default = volume["projected"].get("defaultMode", 0o644)
        files = []
        for source in volume["projected"].get("sources") or []:
            for key, what in (("secret", "Secret"), ("configMap", "ConfigMap")):
                if key in source:
                    files += [(f"{what} {source[key].get('name')}", m) for m in items(source[key], default)]
        return files
    return None


def kubelet_file(mode, fs_group):
    """(uid, gid, mode) of a Secret/ConfigMap file as the kubelet writes it: root-owned with the
    volume's mode; with fsGroup, group-owned by it and made owner- and group-readable
    (SetVolumeOwnership on a read-only volume: mode | 0440)."""
    if fs_group is None:
        return 0, 0, mode
    return 0, fs_group, mode | 0o440


def can_read(file, uid, gid, groups):
    """Whether a process with these ids may read the file (no CAP_DAC_OVERRIDE: all dropped)."""
    f_uid, f_gid, mode = file
    if uid is not None and uid == f_uid:
        return bool(mode & 0o400)
    if f_gid == gid or f_gid in groups:
        return bool(mode & 0o040)
    return bool(mode & 0o004)


def unreadable_mounts(pod):
    """[(container, volume, what, mode, why)] for every mounted Secret/ConfigMap file its
    container could not read."""
    psc = pod.get("securityContext") or {}
    fs_group = psc.get("fsGroup")
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    found = []
    for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
        csc = c.get("securityContext") or {}
        uid = csc.get("runAsUser", psc.get("runAsUser"))
        gid = csc.get("runAsGroup", psc.get("runAsGroup"))
        groups = set(psc.get("supplementalGroups") or []) | ({fs_group} if fs_group is not None else set())
        for m in c.get("volumeMounts") or []:
            files = mounted_files(volumes.get(m["name"], {}))
            for what, mode in files or []:
                file = kubelet_file(mode, fs_group)
                if not can_read(file, uid, gid, groups):
                    why = (f"files are {file[0]}:{file[1]} {file[2]:04o}, the container runs as "
                           f"uid {uid if uid is not None else '(image default)'} gid "
                           f"{gid if gid is not None else '(image default)'} groups {sorted(groups)}")
                    found.append((c["name"], m["name"], what, mode, why))
    return found


def secret_files_readable(directory, docs):
    before, pods = len(failures), 0
    for d in docs:
        for what, pod, _ in pod_specs(d):
            pods += 1
            for container, volume, source, mode, why in unreadable_mounts(pod):
                fail(f"{directory}: {what}: container {container} cannot read volume {volume} "
                     f"({source}, mode {mode:04o}): {why}; set fsGroup in the pod's securityContext "
                     f"(to the containers' group) or make the mode world-readable")
    if pods and len(failures) == before:
        print(f"ok: {directory}: every pod ({pods}) can read the Secret/ConfigMap files it mounts")


def readability_self_test():
    """The rule flags the mistake the shipped manifests once had, and accepts the fix."""
    pod = {"securityContext": {"runAsUser": 65532, "runAsGroup": 65532},
           "containers": [{"name": "gw", "volumeMounts": [{"name": "t", "mountPath": "/t"}]}],
           "volumes": [{"name": "t", "secret": {"secretName": "s", "defaultMode": 0o440}}]}
    without = unreadable_mounts(pod)
    pod["securityContext"]["fsGroup"] = 65532
    with_fs_group = unreadable_mounts(pod)
    del pod["securityContext"]["fsGroup"]
    pod["volumes"][0]["secret"]["defaultMode"] = 0o444
    world = unreadable_mounts(pod)
    if not without or with_fs_group or world:
        fail(f"readability rule self-test: 0440 without fsGroup {without}, with fsGroup "
             f"{with_fs_group}, 0444 {world}")
    else:
        print("ok: readability rule flags 0440 without fsGroup, accepts fsGroup or 0444")


# --- Pods: shutdown budget and Job deadlines ----------------------------------------------

UNITS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def seconds(text):
    """A humantime duration ("5s", "1m 30s", "250ms") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text)
    if not parts or re.sub(r"[\d.\sa-z]", "", text):
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * UNITS[u] for n, u in parts)


def gateway_configs(docs):
    """{ConfigMap name: parsed gateway.toml}."""
    configs = {}
    for d in docs:
        if d.get("kind") == "ConfigMap" and "gateway.toml" in (d.get("data") or {}):
            configs[d["metadata"]["name"]] = tomllib.loads(d["data"]["gateway.toml"])
    return configs


def shutdown_budget(directory, docs):
    before, checked = len(failures), []
    configs = gateway_configs(docs)
    for d in docs:
        for what, pod, workload in pod_specs(d):
            if d.get("kind") == "CronJob":
                missing = [k for k in ("activeDeadlineSeconds", "backoffLimit") if k not in workload]
                if missing:
                    fail(f"{directory}: {what}: its Jobs need {missing} (a stuck Job blocks a "
                         f"concurrencyPolicy: Forbid CronJob for good)")
            names = [v["configMap"]["name"] for v in pod.get("volumes") or [] if "configMap" in v]
            mounted = [configs[n] for n in names if n in configs]
            if not mounted and len(configs) == 1 and not shutil.which("kubectl"):
                mounted = list(configs.values())  # file by file: generated names are not known
            for config in mounted:
                server = config.get("server") or {}
                delay = seconds(server.get("shutdown_delay", "0s"))
                drain = seconds(server.get("drain_timeout", "20s"))
                grace = pod.get("terminationGracePeriodSeconds", 30)
                if grace <= delay + drain:
                    fail(f"{directory}: {what}: terminationGracePeriodSeconds {grace} does not cover "
                         f"server.shutdown_delay {delay:g}s + server.drain_timeout {drain:g}s")
                if d.get("kind") == "Deployment" and delay <= 0:
                    fail(f"{directory}: {what}: server.shutdown_delay is 0: behind a Service, a rollout "
                         f"refuses connections while the endpoint removal propagates")
                checked.append(f"{what} (grace {grace}s > delay {delay:g}s + drain {drain:g}s)")
    if checked and len(failures) == before:
        print(f"ok: {directory}: shutdown budget: {'; '.join(checked)}")


# --- Run time: the binary as uid/gid 65532 against kubelet-style Secret volumes ------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=2.0, method="GET", data=None):
    """(status, body); status 0 when nothing answered."""
    req = urllib.request.Request(url, method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


class Gateway:
    """The binary on loopback ports with a minimal config; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, binary, scratch, token_file, extra="", upstream="http://127.0.0.1:9",
                 prefix=(), audit_dir=None, server_extra=""):
        self.proxy, self.admin = free_port(), free_port()
        audit_dir = audit_dir or scratch
        self.config = scratch / f"gateway-{self.admin}.toml"
        self.config.write_text(
            f'[server]\nlisten = "127.0.0.1:{self.proxy}"\n{server_extra}'
            f'[admin]\nlisten = "127.0.0.1:{self.admin}"\n'
            f'[upstream]\nurl = "{upstream}"\ntimeout = "5s"\n'
            f'[token]\nfile = "{token_file}"\n'
            f'[audit]\npath = "{audit_dir}/audit-{self.admin}.jsonl"\n'
            f'[log]\nformat = "json"\n{extra}')
        self.config.chmod(0o644)
        self.stderr_path = scratch / f"gateway-{self.admin}.stderr"
        self.cmd = [*prefix, binary, "--config", str(self.config)]
        self.proc = None

    def __enter__(self):
        self.stderr = open(self.stderr_path, "w")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RUST_LOG": "info"}
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self.stderr, env=env)
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.stderr.close()

    def url(self, path, admin=False):
        return f"http://127.0.0.1:{self.admin if admin else self.proxy}{path}"

    def wait_listening(self, seconds=15):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.proc.poll() is None:
            if http_get(self.url("/healthz", admin=True), timeout=1)[0] == 200:
                return True
            time.sleep(0.1)
        return False

    def readyz_within(self, seconds):
        """/readyz's status once it is 200, or its last status after `seconds`."""
        deadline, status = time.monotonic() + seconds, 0
        while time.monotonic() < deadline and self.proc.poll() is None:
            status = http_get(self.url("/readyz", admin=True), timeout=1)[0]
            if status == 200:
                break
            time.sleep(0.2)
        return status

    def log(self):
        self.stderr.flush()
        return self.stderr_path.read_text(errors="replace")


def kubelet_secret_volume(root, files, mode, fs_group):
    """A Secret volume as the kubelet's atomic writer lays it out: the files in a timestamped
    directory, `..data` -> that directory, and each key a symlink to `..data/<key>`. Without
    fsGroup everything is root:root and the files have `mode`; with it, the group is fsGroup,
    directories get setgid and files mode | 0440 (SetVolumeOwnership, read-only volume)."""
    root.mkdir()
    ts = root / "..2026_01_01_00_00_00.000000001"
    ts.mkdir()
    for key, content in files.items():
        (ts / key).write_text(content)
        (root / key).symlink_to(f"..data/{key}")
    (root / "..data").symlink_to(ts.name)
    group = fs_group if fs_group is not None else 0
    setgid = 0o2000 if fs_group is not None else 0
    os.chown(root, 0, group)
    os.chmod(root, 0o777 | setgid)  # the volume's tmpfs (an emptyDir)
    os.chown(ts, 0, group)
    os.chmod(ts, 0o755 | setgid)
    for key in files:
        os.chown(ts / key, 0, group)
        os.chmod(ts / key, mode | 0o440 if fs_group is not None else mode)


def sidecar_identity():
    """(runAsUser, runAsGroup, fsGroup, Secret defaultMode) of the shipped sidecar CronJob."""
    cronjob = yaml.safe_load((DEPLOY / "kubernetes/sidecar/cronjob.yaml").read_text())
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    mode = next(v["secret"].get("defaultMode", 0o644) for v in pod["volumes"] if "secret" in v)
    return psc["runAsUser"], psc["runAsGroup"], psc.get("fsGroup"), mode


def secret_permissions_at_run_time(binary, scratch):
    if os.geteuid() != 0:
        why = ("Secret permissions at run time: needs root (to chown the files and to setpriv to "
               "uid 65532)")
        # CI runs as root: there a skip would be a check that silently stopped running.
        if os.environ.get("CI", "").lower() in ("true", "1"):
            fail(f"{why}, and CI={os.environ['CI']} is set: CI must run it as root")
        else:
            print(f"SKIP: {why}; CI runs as root (and fails here if it does not)")
        return
    setpriv = shutil.which("setpriv")
    if not setpriv:
        fail("Secret permissions at run time: setpriv not found (Debian: util-linux)")
        return
    before = len(failures)
    uid, gid, fs_group, mode = sidecar_identity()
    if fs_group is None:
        fs_group = gid  # the manifest check reports the missing fsGroup; test the fix anyway
    # A directory every user may traverse, with its own copy of the binary (the checkout may not
    # be reachable by uid 65532).
    root = scratch / "run-as"
    root.mkdir()
    os.chmod(scratch, 0o755)
    os.chmod(root, 0o755)
    gw_binary = root / "cloudcasa-gateway"
    shutil.copyfile(binary, gw_binary)
    os.chmod(gw_binary, 0o755)
    audit = root / "audit"
    audit.mkdir()
    os.chown(audit, uid, gid)
    r = run([setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", str(gw_binary), "--version"])
    if r.returncode != 0:
        fail(f"Secret permissions at run time: uid {uid} cannot run the binary: {r.stderr}")
        return
    cases = [
        ("with fsGroup", fs_group, ["--groups", str(fs_group)]),
        ("without fsGroup", None, ["--clear-groups"]),
    ]
    for name, group, groups_args in cases:
        volume = root / f"secret-{name.replace(' ', '-')}"
        kubelet_secret_volume(volume, {"token": "token-from-the-secret\n"}, mode, group)
        token = volume / "token"
        prefix = [setpriv, f"--reuid={uid}", f"--regid={gid}", *groups_args]
        with Gateway(str(gw_binary), root, token, prefix=prefix, audit_dir=audit) as gw:
            if not gw.wait_listening():
                fail(f"Secret permissions at run time, {name}: the gateway did not start:\n{gw.log()}")
                continue
            status = gw.readyz_within(5 if group is not None else 3)
            log = gw.log()
        layout = f"token {0}:{group if group is not None else 0} {mode | 0o440 if group is not None else mode:04o}"
        if group is not None:
            if status != 200:
                fail(f"Secret permissions at run time, {name} ({layout}, process {uid}:{gid} groups "
                     f"[{group}]): /readyz is {status}, not 200:\n{log}")
            else:
                print(f"ok: as {uid}:{gid} with supplementary group {group}, {layout}: /readyz 200")
        else:
            lines = [l for l in log.splitlines() if str(token) in l and "Permission denied" in l]
            if status != 503 or not lines:
                fail(f"Secret permissions at run time, {name} ({layout}, process {uid}:{gid} no "
                     f"groups): expected /readyz 503 and a log line naming {token} with "
                     f"'Permission denied'; got /readyz {status}, log:\n{log}")
            else:
                print(f"ok: as {uid}:{gid} without fsGroup, {layout}: /readyz 503, and the log says: "
                      f"{lines[0].strip()[:300]}")
    if len(failures) == before:
        print("ok: Secret permissions at run time")


# --- Run time: every metric the dashboard and alerts name is exported -----------------------

METRIC_SOURCES = ["grafana/*.json", "prometheus/*.yaml", "kubernetes/components/prometheus/*.yaml"]


class MockUpstream(http.server.BaseHTTPRequestHandler):
    """Answers every GET with a small JSON document and an ETag (304 to a matching If-None-Match);
    /api/v1/reset drops the connection (an unreachable upstream)."""

    def do_GET(self):
        if self.path.startswith("/api/v1/reset"):
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if self.headers.get("If-None-Match") == '"v1"':
            self.send_response(304)
            self.send_header("ETag", '"v1"')
            self.end_headers()
            return
        body = b'{"_items": [], "_meta": {"total": 0}}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("ETag", '"v1"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


# PromQL words that look like metric names: aggregations (`sum by (le) (...)` puts a keyword, not
# a parenthesis, after `sum`), binary and set operators, modifiers. tests/deploy.rs has the same.
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio", "by", "without", "on", "ignoring", "group_left",
    "group_right", "offset", "bool", "and", "or", "unless", "atan2", "inf", "nan", "start", "end",
}


def promql_names(expr):
    """The metric names a PromQL expression selects: every identifier outside strings, label
    matchers ({...}), ranges ([...]) and label lists (by (...), on (...), ...) that is neither a
    function call nor a PromQL word, so a bare `process_max_fds` counts as much as a name with
    matchers."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', " ", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*(?!\s*\()", expr):
        word = m.group(0)
        # A regex backtracks a called name to a shorter prefix (`rat` of `rate(`): keep whole
        # words only.
        end = m.end()
        if end < len(expr) and re.match(r"[A-Za-z0-9_:]", expr[end]):
            continue
        if word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def expressions(value):
    """Every `expr` string in a parsed dashboard or rules document."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "expr" and isinstance(v, str):
                yield v
            else:
                yield from expressions(v)
    elif isinstance(value, list):
        for v in value:
            yield from expressions(v)


def referenced_metrics():
    """{file: names} of every metric name the dashboards, rule files and PrometheusRule use: the
    names their queries select, and any cloudcasa_gateway_* or process_* name elsewhere in them
    (descriptions, legends)."""
    used = {}
    for pattern in METRIC_SOURCES:
        for f in sorted(DEPLOY.glob(pattern)):
            text = f.read_text()
            names = set(re.findall(r"\b(?:cloudcasa_gateway|process)_[a-z0-9_]*[a-z0-9]", text))
            docs = [json.loads(text)] if f.suffix == ".json" else list(yaml.safe_load_all(text))
            for expr in expressions(docs):
                names |= promql_names(expr)
            if names:
                used[str(f.relative_to(DEPLOY))] = names
    return used


def promql_self_test():
    """The extraction finds bare and matched names, and no functions, keywords or labels."""
    expr = ('histogram_quantile(0.99, sum by (le, method) (rate(a_bucket{x=~"b|c"}[5m]))) '
            '/ (process_open_fds{namespace=~"$namespace"} / process_max_fds) '
            'and on (namespace, instance) build_info > 1e3 or vector(1) unless max(up offset 5m)')
    got = promql_names(expr)
    want = {"a_bucket", "build_info", "process_max_fds", "process_open_fds", "up"}
    if got != want:
        fail(f"metrics: promql_names self-test: got {sorted(got)}, want {sorted(want)}")


def exported_metrics(exposition):
    """Every name a query may use: sample names, and those of each described family (a counter's
    X_total, a histogram's X_bucket/X_sum/X_count, a gauge's X) even before it has a sample."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()[:4]
            # A counter's or histogram's bare family name is no series Prometheus stores.
            names |= {"counter": {family + "_total"},
                      "histogram": {family + s for s in ("_bucket", "_sum", "_count")},
                      "summary": {family + s for s in ("_sum", "_count")}}.get(kind, {family})
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def metrics_exported(binary, scratch):
    before = len(failures)
    promql_self_test()
    used = referenced_metrics()
    if len(used) < 3 or any(len(n) < 5 or "process_open_fds" not in n for n in used.values()):
        fail(f"metrics: expected the dashboard, alerts.yaml and the PrometheusRule to name metrics: "
             f"{ {f: sorted(n) for f, n in used.items()} }")
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MockUpstream)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    token = scratch / "metrics-token"
    token.write_text("token-a\n")
    policy = ('[[policy]]\nclients = ["local"]\npaths = ["/api/v1/**"]\ncredential = "default"\n')
    try:
        with Gateway(binary, scratch, token, upstream=f"http://127.0.0.1:{upstream.server_port}",
                     extra=policy, server_extra='max_body_size = "1KiB"\n') as gw:
            if gw.readyz_within(15) != 200:
                fail(f"metrics: the gateway did not become ready:\n{gw.log()}")
                return
            # Traffic touching every family: a miss, a revalidation, a 413, a 403, a 502.
            for _ in range(2):
                http_get(gw.url("/api/v1/clusters"))
            http_get(gw.url("/api/v1/usergroups"), method="POST", data=b"x" * 2048)
            http_get(gw.url("/version"))
            http_get(gw.url("/api/v1/reset"))
            time.sleep(0.5)
            status, exposition = http_get(gw.url("/metrics", admin=True))
            if status != 200:
                fail(f"metrics: /metrics answered {status}:\n{gw.log()}")
                return
    finally:
        upstream.shutdown()
        upstream.server_close()
    exported = exported_metrics(exposition)
    for f, names in used.items():
        missing = sorted(names - exported)
        if missing:
            fail(f"metrics: {f} uses names the binary does not export: {missing}\n"
                 f"exported: {sorted(exported)}")
    if len(failures) == before:
        total = set().union(*used.values()) if used else set()
        print(f"ok: metrics: the {len(total)} names used by {', '.join(used)} are all exported")


# --- The rest ---------------------------------------------------------------------------

def alerts_agree():
    plain = yaml.safe_load((DEPLOY / "prometheus/alerts.yaml").read_text())
    rule = yaml.safe_load((DEPLOY / "kubernetes/components/prometheus/prometheusrule.yaml").read_text())
    if rule["spec"] != plain:
        fail("prometheusrule.yaml does not carry the groups of prometheus/alerts.yaml")
    names = [r["alert"] for g in plain["groups"] for r in g["rules"]]
    print(f"ok: alerts agree ({', '.join(names)})")


def dockerfile(binary, scratch):
    before = len(failures)
    text = (DEPLOY / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    lines = text.splitlines()
    # Every base image pinned by digest, with the tag it was taken from in the comment just above.
    for i, line in enumerate(lines):
        m = re.match(r"FROM\s+(\S+)", line)
        if not m:
            continue
        image = m.group(1)
        if not re.fullmatch(r"[a-z0-9.\-/]+@sha256:[0-9a-f]{64}", image):
            fail(f"Dockerfile: base image {image} is not pinned by digest (name@sha256:<64 hex>)")
            continue
        repo = image.split("@")[0].split("/")[-1]
        comments = []
        for j in range(i - 1, -1, -1):
            if not lines[j].startswith("#"):
                break
            comments.append(lines[j])
        if not any(re.search(rf"\b{re.escape(repo)}:[\w.\-]+", c) for c in comments):
            fail(f"Dockerfile: FROM {image}: say which tag the digest is (a comment line above "
                 f"it naming {repo}:<tag>)")
    labels = ["org.opencontainers.image.source", "org.opencontainers.image.revision",
              "org.opencontainers.image.version", "org.opencontainers.image.title"]
    checks = {
        "multi-stage": len(froms) >= 2,
        "distroless runtime": froms and "distroless" in froms[-1],
        "cargo build --release --locked": re.search(r"cargo build --release --locked", text),
        "numeric non-root USER": re.search(r"^USER\s+([1-9][0-9]*)(:[0-9]+)?\s*$", text, re.M),
        "EXPOSE proxy and admin": re.search(r"^EXPOSE\s+.*8080.*9901", text, re.M),
        "config at /etc/cloudcasa-gateway/gateway.toml": "/etc/cloudcasa-gateway/gateway.toml" in text,
        "exec-form ENTRYPOINT (no shell)": re.search(r'^ENTRYPOINT\s+\[', text, re.M),
        "ARG REVISION and ARG VERSION for the labels": re.search(r"^ARG REVISION\b", text, re.M)
        and re.search(r"^ARG VERSION\b", text, re.M),
    }
    checks.update({f"LABEL {label}": re.search(rf"\b{re.escape(label)}=\S", text) for label in labels})
    checks["the revision label comes from ARG REVISION"] = re.search(
        r"org\.opencontainers\.image\.revision=\"?\$\{?REVISION\b", text)
    checks["the version label comes from ARG VERSION"] = re.search(
        r"org\.opencontainers\.image\.version=\"?\$\{?VERSION\b", text)
    for what, ok in checks.items():
        if not ok:
            fail(f"Dockerfile: {what}")
    ignore = (DEPLOY.parent / ".dockerignore").read_text().split()
    if "target" not in ignore:
        fail(".dockerignore must exclude target")
    # The image's own configuration: a heredoc (the build context excludes deploy/), a sidecar
    # config that passes --check.
    m = re.search(r'^COPY\b[^\n]*<<"?(\w+)"?\s+/etc/cloudcasa-gateway/gateway\.toml\n(.*?)^\1$',
                  text, re.M | re.S)
    if not m:
        fail("Dockerfile: the image's default gateway.toml (a COPY <<EOF heredoc) not found")
    else:
        config = tomllib.loads(m.group(2))
        toml = scratch / "image-gateway.toml"
        toml.write_text(m.group(2))
        r = run([binary, "--config", str(toml), "--check", "--config-only"])
        if r.returncode != 0:
            fail(f"Dockerfile: the image's default gateway.toml is rejected:\n{r.stderr}")
        proxy = (config.get("server") or {}).get("listen", "127.0.0.1:8080")
        admin = (config.get("admin") or {}).get("listen", "127.0.0.1:9901")
        if not proxy.startswith("127.0.0.1:") or not admin.endswith(":9901") or admin.startswith("127."):
            fail(f"Dockerfile: the default config should be a sidecar's: proxy on loopback (is "
                 f"{proxy}), admin on 9901 reachable by the kubelet's probes (is {admin})")
    if len(failures) == before:
        print(f"ok: Dockerfile ({len(froms)} base images pinned by digest, OCI labels, default "
              f"sidecar config passes --check) and .dockerignore")


def dashboard():
    d = json.loads((DEPLOY / "grafana/cloudcasa-gateway.json").read_text())
    ids = [p["id"] for p in d["panels"]]
    if len(ids) != len(set(ids)) or not all(p.get("targets") for p in d["panels"]):
        fail("dashboard: panel ids must be unique and every panel needs a query")
    print(f"ok: dashboard, {len(ids)} panels", flush=True)


def fleet_config_follows_base():
    """The fleet component's gateway.toml is the base's plus [fleet], nothing else."""
    base = (DEPLOY / "kubernetes/gateway/base/gateway.toml").read_text()
    fleet = (DEPLOY / "kubernetes/components/fleet-redis/gateway.toml").read_text()
    if not fleet.startswith(base):
        fail("components/fleet-redis/gateway.toml must start with gateway/base/gateway.toml "
             "(copy the base again and keep the [fleet] section)")
        return
    added = tomllib.loads(fleet[len(base):])
    if list(added) != ["fleet"]:
        fail(f"components/fleet-redis/gateway.toml adds {list(added)} to the base; only [fleet]")
        return
    print("ok: the fleet component's gateway.toml is the base's plus [fleet]")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    binary = sys.argv[1]
    if not shutil.which("kubectl"):
        print("note: kubectl not found; checking each resource file instead of rendered overlays")
    yamllint()
    directories = KUSTOMIZATIONS
    if not shutil.which("kubectl"):
        directories = KUSTOMIZATIONS + ["kubernetes/components/cert-manager", "kubernetes/components/prometheus",
                                        "kubernetes/components/fleet-redis"]
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        readability_self_test()
        for k in directories:
            docs = render(k)
            validate(k, docs, binary, scratch)
            secret_files_readable(k, docs)
            shutdown_budget(k, docs)
        alerts_agree()
        fleet_config_follows_base()
        dockerfile(binary, scratch)
        dashboard()
        secret_permissions_at_run_time(binary, scratch)
        metrics_exported(binary, scratch)
    if failures:
        print(f"{len(failures)} deploy check(s) failed", file=sys.stderr)
        sys.exit(1)
    print("deploy checks passed")


if __name__ == "__main__":
    main()
