#!/usr/bin/env bash
# Runs the example on one machine (as root): two Janus nodes in network namespaces
# (janus-a at 10.210.1.2, janus-b at 10.210.2.2), mediagate in front of them, the
# GStreamer publisher and the app server. Open http://127.0.0.1:8090/ in a browser on
# this machine, then take a node away and watch the viewer move:
#
#   ip netns exec mgx-a ip link set mgx-a-n down     # cut node A's link
#   ip netns exec mgx-a ip link set mgx-a-n up       # bring it back
#   pkill -f 'janus.*-n janus-a'                     # or kill Janus A
#   mediagate failback janus-api --admin http://127.0.0.1:9090 --token "$MG_ADMIN_TOKEN"
#
# Needs: janus, libjs-janus-gateway, libjs-webrtc-adapter, python3-gi,
# gir1.2-gst-plugins-base-1.0, gstreamer1.0-plugins-good (scripts/install-test-deps.sh
# installs them) and mediagate on PATH or built in target/ (`cargo build`).
# Ctrl-C stops everything and removes the namespaces.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mg=${MEDIAGATE:-$(command -v mediagate || echo "$root/target/debug/mediagate")}

export MG_ADMIN_PORT=${MG_ADMIN_PORT:-9090} MG_HTTP_PORT=${MG_HTTP_PORT:-8088}
export MG_RTP_PORT=${MG_RTP_PORT:-5004} MG_TURN_PORT=${MG_TURN_PORT:-3478}
export MG_ADMIN_TOKEN=${MG_ADMIN_TOKEN:-example-admin-token}
export MG_EVENTS_TOKEN=${MG_EVENTS_TOKEN:-example-events-token}
export MG_ICE_TOKEN=${MG_ICE_TOKEN:-example-ice-token}
export MG_TURN_SECRET=${MG_TURN_SECRET:-example-turn-secret-change-me}
export MG_RELAY_ADDRESS=10.210.0.1 JANUS_A=10.210.1.2 JANUS_B=10.210.2.2

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for n in a b; do
        ip link del "mgx-$n-h" 2>/dev/null || true
        ip netns del "mgx-$n" 2>/dev/null || true
    done
    ip addr del "$MG_RELAY_ADDRESS/32" dev lo 2>/dev/null || true
}
trap cleanup EXIT INT TERM
cleanup

# The relay address: a host address on `lo`, reached from both namespaces by their
# default route.
ip addr add "$MG_RELAY_ADDRESS/32" dev lo
i=1
for n in a b; do
    ip netns add "mgx-$n"
    ip link add "mgx-$n-h" type veth peer name "mgx-$n-n" netns "mgx-$n"
    ip addr add "10.210.$i.1/24" dev "mgx-$n-h"
    ip link set "mgx-$n-h" up
    ip netns exec "mgx-$n" ip link set lo up
    ip netns exec "mgx-$n" ip addr add "10.210.$i.2/24" dev "mgx-$n-n"
    ip netns exec "mgx-$n" ip link set "mgx-$n-n" up
    ip netns exec "mgx-$n" ip route add default via "10.210.$i.1"
    ip netns exec "mgx-$n" janus -F "$here/janus" -n "janus-$n" >"/tmp/janus-$n.log" 2>&1 &
    pids+=($!)
    i=$((i + 1))
done

"$mg" run -c "$here/mediagate.yaml" &
pids+=($!)
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$MG_ADMIN_PORT/readyz" >/dev/null && break
    sleep 0.1
done

/usr/bin/python3 "$here/publisher.py" --rtp "127.0.0.1:$MG_RTP_PORT" --control 127.0.0.1:8091 &
pids+=($!)
/usr/bin/python3 "$here/app.py" --listen 127.0.0.1:8090 --admin "http://127.0.0.1:$MG_ADMIN_PORT" \
    --events-token "$MG_EVENTS_TOKEN" --ice-token "$MG_ICE_TOKEN" \
    --janus "http://127.0.0.1:$MG_HTTP_PORT/janus" --publisher http://127.0.0.1:8091 &
pids+=($!)
echo "viewer: http://127.0.0.1:8090/   (Ctrl-C stops everything)"
wait
