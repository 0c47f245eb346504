#!/usr/bin/env python3
"""The Pod Security Standards (kubernetes.io/docs/concepts/security/pod-security-standards,
policy version "latest" as of Kubernetes 1.33), checked the way the PodSecurity admission
plugin evaluates a pod template: every rule of "baseline", then every rule of "restricted".

No packaged checker of these rules is installable here (the upstream one is a Go library),
so they are written out from the published standard. scripts/test-manifests.sh imports it
(every pod of every component combination against its namespace's enforce level) and runs
its self-test (each rule refuses what it should). By hand, on rendered manifests:

    kubectl kustomize manifests/ | python3 scripts/pod_security.py

prints each pod template's level and exits 1 when one is below its namespace's level.
"""

import copy
import sys

BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                 "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}
LEVELS = ["restricted", "baseline", "privileged"]


def pod_containers(spec):
    return [c for k in ("initContainers", "containers", "ephemeralContainers") for c in spec.get(k) or []]


def baseline_violations(spec, annotations):
    v = []
    psc = spec.get("securityContext") or {}
    ctrs = pod_containers(spec)
    scs = [(c["name"], c.get("securityContext") or {}) for c in ctrs]
    for k in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(k):
            v.append(f"host namespaces: {k}=true")
    if (psc.get("windowsOptions") or {}).get("hostProcess") or any(
            (sc.get("windowsOptions") or {}).get("hostProcess") for _, sc in scs):
        v.append("hostProcess")
    for n, sc in scs:
        if sc.get("privileged"):
            v.append(f"privileged: container {n}")
        bad = [c for c in (sc.get("capabilities") or {}).get("add") or [] if c not in BASELINE_CAPS]
        if bad:
            v.append(f"capabilities: container {n} adds {bad}")
        if sc.get("procMount") not in (None, "Default"):
            v.append(f"procMount: container {n}")
    for vol in spec.get("volumes") or []:
        if "hostPath" in vol:
            v.append(f"hostPath volume {vol['name']}")
    for c in ctrs:
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                v.append(f"hostPort {port['hostPort']}: container {c['name']}")
    for who, sc in [("pod", psc)] + scs:
        t = (sc.get("appArmorProfile") or {}).get("type")
        if t not in (None, "RuntimeDefault", "Localhost"):
            v.append(f"appArmorProfile {t}: {who}")
        se = sc.get("seLinuxOptions") or {}
        if se.get("type", "") not in SELINUX_TYPES or se.get("user") or se.get("role"):
            v.append(f"seLinuxOptions: {who}")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            v.append(f"seccomp Unconfined: {who}")
    for k, val in (annotations or {}).items():
        if k.startswith("container.apparmor.security.beta.kubernetes.io/") and \
                not (val == "runtime/default" or val.startswith("localhost/")):
            v.append(f"AppArmor annotation {k}={val}")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            v.append(f"sysctl {sysctl.get('name')}")
    return v


def restricted_violations(spec, annotations):
    v = baseline_violations(spec, annotations)
    psc = spec.get("securityContext") or {}
    for vol in spec.get("volumes") or []:
        kinds = [k for k in vol if k != "name"]
        if any(k not in RESTRICTED_VOLUMES for k in kinds):
            v.append(f"volume {vol['name']} of type {kinds}")
    pod_nonroot = psc.get("runAsNonRoot") is True
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type") in ("RuntimeDefault", "Localhost")
    if psc.get("runAsUser") == 0:
        v.append("runAsUser 0: pod")
    for c in pod_containers(spec):
        n, sc = c["name"], c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            v.append(f"allowPrivilegeEscalation not false: container {n}")
        nonroot = sc.get("runAsNonRoot")
        if nonroot is False or (nonroot is None and not pod_nonroot):
            v.append(f"runAsNonRoot not true: container {n}")
        if sc.get("runAsUser") == 0:
            v.append(f"runAsUser 0: container {n}")
        t = (sc.get("seccompProfile") or {}).get("type")
        if not (t in ("RuntimeDefault", "Localhost") or (t is None and pod_seccomp)):
            v.append(f"seccomp not RuntimeDefault/Localhost: container {n}")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            v.append(f"capabilities not dropping ALL: container {n}")
        if any(c2 != "NET_BIND_SERVICE" for c2 in caps.get("add") or []):
            v.append(f"capabilities: container {n} adds {caps.get('add')}")
    return v


def pss_level(spec, annotations=None):
    """The strictest level the pod template meets, and what the stricter ones refuse."""
    r = restricted_violations(spec, annotations)
    if not r:
        return "restricted", []
    b = baseline_violations(spec, annotations)
    return ("baseline", r) if not b else ("privileged", b)


POD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"}


def selftest():
    """Each rule refuses what it should: a restricted pod, then one breach at a time.
    Returns (number of cases, problems)."""
    good = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "c", "image": "x", "securityContext": {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
        "volumes": [{"name": "v", "configMap": {"name": "x"}}],
    }
    p = []
    if pss_level(good)[0] != "restricted":
        p.append(f"a restricted pod is {pss_level(good)}")
    cases = [
        ("baseline", lambda s: s["securityContext"].pop("runAsNonRoot")),
        ("baseline", lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation")),
        ("baseline", lambda s: s["containers"][0]["securityContext"].update(capabilities={"drop": ["ALL"], "add": ["CHOWN"]})),
        ("baseline", lambda s: s["containers"][0]["securityContext"].update(runAsUser=0)),
        ("baseline", lambda s: s["securityContext"].pop("seccompProfile")),
        ("baseline", lambda s: s["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}})),
        ("privileged", lambda s: s["containers"][0]["securityContext"].update(capabilities={"drop": ["ALL"], "add": ["BPF", "NET_ADMIN"]})),
        ("privileged", lambda s: s.update(hostNetwork=True)),
        ("privileged", lambda s: s["containers"][0]["securityContext"].update(privileged=True)),
        ("privileged", lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}})),
        ("privileged", lambda s: s["containers"][0].update(ports=[{"containerPort": 1, "hostPort": 1}])),
        ("privileged", lambda s: s["securityContext"].update(seccompProfile={"type": "Unconfined"})),
        ("privileged", lambda s: s["securityContext"].update(sysctls=[{"name": "net.core.rmem_max", "value": "1"}])),
    ]
    for i, (want, breach) in enumerate(cases):
        spec = copy.deepcopy(good)
        breach(spec)
        got = pss_level(spec)[0]
        if got != want:
            p.append(f"case {i}: {want} expected, got {got}")
    return len(cases), p


def main():
    import yaml
    docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
    levels = {d["metadata"]["name"]: (d["metadata"].get("labels") or {}).get(
        "pod-security.kubernetes.io/enforce") for d in docs if d["kind"] == "Namespace"}
    bad = 0
    for d in docs:
        if d["kind"] not in POD_KINDS:
            continue
        tmpl = d["spec"]["template"]
        got, why = pss_level(tmpl["spec"], tmpl.get("metadata", {}).get("annotations"))
        enforce = levels.get(d["metadata"].get("namespace"))
        ok = enforce not in LEVELS or LEVELS.index(got) <= LEVELS.index(enforce)
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {d['kind']}/{d['metadata']['name']}: {got} "
              f"(namespace enforces {enforce}){': ' + '; '.join(why) if why and not ok else ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
