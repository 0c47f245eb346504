#!/usr/bin/env bash
# Session memory: mediagate's RSS with N concurrent UDP sessions (default 15000: the
# development machines cap a process at 20000 open files, and every session holds one
# upstream socket), the bytes per session, and the extrapolation to 100k sessions.
#
# Usage: scripts/bench-sessions.sh [SESSIONS]     (about 30 s)
# Prints user-space RSS (what a container's memory limit counts besides kernel socket
# buffers) and the growth of the kernel's unreclaimable slab during the run.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-15000}
BASE=${BASE_PORT:-24000}
source scripts/bench-common.sh
bench_init bench-sessions

$BIN/mediagate-load echo --listen 127.0.0.1:$BASE --lifetime 2m >/dev/null &
PIDS+=($!)
cat >"$TMP/mg.yaml" <<EOF2
admin: { listen: "127.0.0.1:$((BASE + 2))" }
log: { level: warn }
listeners:
  - name: rtp
    protocol: udp
    listen: "127.0.0.1:$((BASE + 1))"
    upstream: media
    session: { idle_timeout: 60s, max_sessions: 100000 }
upstreams:
  media:
    primary: ["127.0.0.1:$BASE"]
    health: { type: udp, send: ping, interval: 1s, timeout: 500ms }
EOF2
MEDIAGATE_UDP_WORKERS=${WORKERS:-2} $BIN/mediagate run -c "$TMP/mg.yaml" 2>"$TMP/mg.log" &
MG=$!
PIDS+=($MG)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$((BASE + 2))/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
# Warm the data plane with a few flows first, so the baseline includes touched buffers.
timeout 30 $BIN/mediagate-load run --target 127.0.0.1:$((BASE + 1)) --flows 10 --rate 20000 --duration 1s --size 1200 >/dev/null
sleep 0.5
rss() { awk '/^VmRSS/ { print $2 * 1024 }' /proc/$MG/status; }
slab() { awk '/^SUnreclaim/ { print $2 * 1024 }' /proc/meminfo; }
R0=$(rss); S0=$(slab)
timeout 90 $BIN/mediagate-load run --target 127.0.0.1:$((BASE + 1)) --flows "$N" --rate "$N" --duration 12s --prime 20s --src-base 2000 >"$TMP/load.out" 2>&1 &
LOAD=$!
PIDS+=($LOAD)
live=0
for _ in $(seq 300); do
  live=$(curl -sf "http://127.0.0.1:$((BASE + 2))/status" | grep -o '"sessions":[0-9]*' | head -1 | cut -d: -f2 || echo 0)
  ((live >= N)) && break
  sleep 0.1
done
sleep 2
R1=$(rss); S1=$(slab)
wait $LOAD || true
awk -v n="$live" -v r0="$R0" -v r1="$R1" -v s0="$S0" -v s1="$S1" 'BEGIN {
  per = (r1 - r0) / n
  printf "sessions: %d\n", n
  printf "RSS idle: %.1f MiB; with sessions: %.1f MiB; %.0f bytes per session (user space)\n", r0 / 1048576, r1 / 1048576, per
  printf "extrapolated RSS at 100k sessions: %.1f MiB\n", (r0 + per * 100000) / 1048576
  printf "kernel unreclaimable slab growth: %.1f MiB for %d sessions, ~%.0f bytes per session (both ends: the generator socket and the mediagate socket + epoll entry; not in RSS)\n", (s1 - s0) / 1048576, n, (s1 - s0) / n
}'
echo "load: $(cat "$TMP/load.out" | tail -1)"
