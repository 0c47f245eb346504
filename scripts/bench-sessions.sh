#!/usr/bin/env bash
# Session memory: mediagate's RSS with N concurrent UDP sessions (default 100000), the
# bytes per session, and the kernel memory the sockets take besides.
#
# Every session holds one upstream socket, and the development machines cap a process at
# 20000 open files (a hard limit: the sandbox withholds CAP_SYS_RESOURCE, so not even
# root can raise it). Above SHARD sessions (default 16000) the run is therefore split into
# shards: each shard is a network namespace of its own (its own loopback and ephemeral
# port range) with an echo worker, one mediagate and one generator, all shards loaded at
# the same time. One shard per mediagate process; the sums are the machine's totals.
#
# Usage: scripts/bench-sessions.sh [SESSIONS]     (about 40 s; shards need root and `ip`)
#   SMOKE=1: 300 sessions in two shards of 150 (so the namespace path runs too), a 3 s
#   load, debug binaries; fails unless every session was seen live.
# Prints user-space RSS (what a container's memory limit counts besides kernel socket
# buffers) and the growth of the kernel's unreclaimable slab during the run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-common.sh
if [[ $SMOKE = 1 ]]; then
  N=${1:-300}; SHARD=${SHARD:-150}; LOAD_DUR=${LOAD_DUR:-3s}; SETTLE=${SETTLE:-0.3}
fi
N=${N:-${1:-100000}}
SHARD=${SHARD:-16000}
LOAD_DUR=${LOAD_DUR:-25s}
SETTLE=${SETTLE:-2}
BASE=${BASE_PORT:-24000}
bench_init bench-sessions

SHARDS=$(((N + SHARD - 1) / SHARD))
PER=$(((N + SHARDS - 1) / SHARDS))
NSES=()
cleanup() {
  bench_cleanup
  for ns in "${NSES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
}
trap cleanup EXIT

# inshard SHARD CMD...: runs CMD in the shard's namespace (the host itself with one shard).
# Background commands use ${PFX[i]} directly instead, so that $! is the command's own PID
# (`ip netns exec` and `env` exec what they run).
PFX=()
inshard() {
  local i=$1
  shift
  ${PFX[$i]} "$@"
}
live_sessions() { # shard
  local n
  n=$(inshard "$1" curl -sf "http://127.0.0.1:$((BASE + 2))/status" 2>/dev/null | grep -o '"sessions":[0-9]*' | head -1 | cut -d: -f2 || true)
  echo "${n:-0}"
}
rss() { awk '/^VmRSS/ { print $2 * 1024 }' "/proc/$1/status"; }
slab() { awk '/^SUnreclaim/ { print $2 * 1024 }' /proc/meminfo; }

cat >"$TMP/mg.yaml" <<EOF2
admin: { listen: "127.0.0.1:$((BASE + 2))" }
log: { level: warn }
listeners:
  - name: rtp
    protocol: udp
    listen: "127.0.0.1:$((BASE + 1))"
    upstream: media
    # One load generator is one source IP: no per-source limits.
    session: { idle_timeout: 60s, max_sessions: 100000, new_per_source_per_second: 0, max_per_source: 0 }
upstreams:
  media:
    primary: ["127.0.0.1:$BASE"]
    health: { type: udp, send: ping, interval: 1s, timeout: 500ms }
# The benchmark stops it with SIGTERM: no need to drain sessions for long.
shutdown: { drain_timeout: 1s }
EOF2

MG=()
for ((i = 0; i < SHARDS; i++)); do
  if ((SHARDS > 1)); then
    ns="mgbench$$-$i"
    ip netns add "$ns"
    NSES+=("$ns")
    ip -n "$ns" link set lo up
    PFX[i]="ip netns exec $ns"
  else
    PFX[i]=""
  fi
  ${PFX[i]} $BIN/mediagate-load echo --listen 127.0.0.1:$BASE --lifetime 2m >/dev/null &
  PIDS+=($!)
  ${PFX[i]} env MEDIAGATE_UDP_WORKERS="${WORKERS:-2}" $BIN/mediagate run -c "$TMP/mg.yaml" 2>"$TMP/mg-$i.log" &
  MG+=($!)
  PIDS+=($!)
done
R0=(); RSUM0=0
for ((i = 0; i < SHARDS; i++)); do
  for _ in $(seq 100); do inshard $i curl -sf "http://127.0.0.1:$((BASE + 2))/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  # Warm the data plane with a few flows first, so the baseline includes touched buffers.
  inshard $i timeout 30 $BIN/mediagate-load run --target 127.0.0.1:$((BASE + 1)) --flows 10 --rate 20000 --duration 1s --size 1200 >/dev/null
done
sleep 0.5
for ((i = 0; i < SHARDS; i++)); do R0[i]=$(rss "${MG[i]}"); RSUM0=$((RSUM0 + R0[i])); done
S0=$(slab)

# All shards at once: every flow primes its session (one datagram, answered), then the
# flows keep sending at one datagram per flow every 5 s until the measurement is taken.
for ((i = 0; i < SHARDS; i++)); do
  ${PFX[i]} timeout 90 $BIN/mediagate-load run --target 127.0.0.1:$((BASE + 1)) --flows "$PER" \
    --rate $((PER / 5 + 1)) --duration "$LOAD_DUR" --prime 30s --src-base 2000 >"$TMP/load-$i.out" 2>&1 &
  PIDS+=($!)
done
deadline=$((SECONDS + 60))
for ((i = 0; i < SHARDS; i++)); do
  while (($(live_sessions $i) < PER && SECONDS < deadline)); do sleep 0.2; done
done
sleep "$SETTLE"
LIVE=0; RSUM1=0
for ((i = 0; i < SHARDS; i++)); do
  l=$(live_sessions $i); r1=$(rss "${MG[i]}")
  LIVE=$((LIVE + l)); RSUM1=$((RSUM1 + r1))
  awk -v i="$i" -v n="$l" -v r0="${R0[i]}" -v r1="$r1" 'BEGIN {
    printf "shard %d: %d sessions, RSS %.1f MiB idle, %.1f MiB with sessions\n", i, n, r0 / 1048576, r1 / 1048576 }'
done
S1=$(slab)
awk -v n="$LIVE" -v k="$SHARDS" -v r0="$RSUM0" -v r1="$RSUM1" -v s0="$S0" -v s1="$S1" -v one="${R0[0]}" 'BEGIN {
  per = (r1 - r0) / n
  printf "sessions: %d concurrent, in %d mediagate process%s\n", n, k, (k > 1 ? "es" : "")
  printf "RSS, all processes: %.1f MiB idle, %.1f MiB with sessions; %.0f bytes per session (user space)\n", r0 / 1048576, r1 / 1048576, per
  printf "one process holding 100k sessions (its idle RSS + 100k x bytes per session): %.1f MiB\n", (one + per * 100000) / 1048576
  printf "kernel unreclaimable slab growth: %.1f MiB, ~%.0f bytes per session (both ends: the generator socket and the mediagate socket + epoll entry; not in RSS)\n", (s1 - s0) / 1048576, (s1 - s0) / n
}'
for ((i = 0; i < SHARDS; i++)); do
  wait "${PIDS[$((2 * SHARDS + i))]}" 2>/dev/null || true
  echo "load $i: $(tail -1 "$TMP/load-$i.out")"
done
if [[ $SMOKE = 1 ]] && ((LIVE < SHARDS * PER)); then
  echo "smoke: $LIVE live sessions, expected $((SHARDS * PER))" >&2
  exit 1
fi
