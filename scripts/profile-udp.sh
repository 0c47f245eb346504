#!/usr/bin/env bash
# Profiles mediagate's UDP data plane with perf while mediagate-load drives it through an
# echo worker on 127.0.0.1, and prints where the time goes (flat profile, by symbol).
#
# Usage: scripts/profile-udp.sh [FLOWS] [SIZE] [RATE]     (defaults 1000 64 30000; ~20 s)
# Needs: perf (Debian linux-perf). Set SKIP_BUILD=1 to reuse the release binaries.
# SMOKE=1: 10 flows at 2000/s for 3 s with a 1 s profile, debug binaries; when perf is
# missing or not allowed here, says so and runs the rest without the profile.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-common.sh
if [[ $SMOKE = 1 ]]; then
  FLOWS=${1:-10}; SIZE=${2:-64}; RATE=${3:-2000}
  LOAD_DUR=${LOAD_DUR:-3s}; WARM=${WARM:-1}; PERF_SECS=${PERF_SECS:-1}
else
  FLOWS=${1:-1000}; SIZE=${2:-64}; RATE=${3:-30000}
  LOAD_DUR=${LOAD_DUR:-10s}; WARM=${WARM:-4}; PERF_SECS=${PERF_SECS:-5}
fi
BASE=${BASE_PORT:-22000}
bench_init profile-udp

PERF=1
if ! command -v perf >/dev/null 2>&1 || ! perf record -q -o "$TMP/probe.data" -- true >/dev/null 2>&1; then
  if [[ $SMOKE = 1 ]]; then
    echo "perf is missing or not permitted here (kernel.perf_event_paranoid=$(cat /proc/sys/kernel/perf_event_paranoid 2>/dev/null || echo ?)): skipping the profile, running the load" >&2
    PERF=0
  else
    echo "perf is missing or not permitted (apt-get install linux-perf; run as root)" >&2
    exit 2
  fi
fi

$BIN/mediagate-load echo --listen 127.0.0.1:$BASE --lifetime 2m >/dev/null &
PIDS+=($!)
cat >"$TMP/mg.yaml" <<EOF2
admin: { listen: "127.0.0.1:$((BASE + 2))" }
log: { level: warn }
listeners:
  - { name: rtp, protocol: udp, listen: "127.0.0.1:$((BASE + 1))", upstream: media }
upstreams:
  media:
    primary: ["127.0.0.1:$BASE"]
    health: { type: udp, send: ping, interval: 1s, timeout: 500ms }
# The benchmark stops it with SIGTERM: no need to drain sessions for long.
shutdown: { drain_timeout: 1s }
EOF2
MEDIAGATE_UDP_WORKERS=${WORKERS:-1} $BIN/mediagate run -c "$TMP/mg.yaml" 2>"$TMP/mg.log" &
MG=$!
PIDS+=($MG)
wait_ready $((BASE + 2)) "$TMP/mg.log"

timeout 60 $BIN/mediagate-load run --target 127.0.0.1:$((BASE + 1)) --flows "$FLOWS" --size "$SIZE" --rate "$RATE" --duration "$LOAD_DUR" >"$TMP/load.out" &
LOADPID=$!
sleep "$WARM"
if [[ $PERF = 1 ]]; then
  timeout 30 perf record -F 1999 -g -p "$MG" -o "$TMP/perf.data" -- sleep "$PERF_SECS" 2>/dev/null >/dev/null
fi
wait $LOADPID || true
echo "== load: $(cat "$TMP/load.out")"
smoke_require "load through mediagate" "$(grep -o 'received=[1-9][0-9]*' "$TMP/load.out" || true)"
[[ $PERF = 1 ]] || exit 0
R() { perf report -i "$TMP/perf.data" --stdio -g none "$@" 2>/dev/null | grep -E '^ +[0-9]' || true; }
echo "== user space vs kernel (self time by DSO) =="
R --no-children --sort dso | head -8
echo "== syscalls and main paths (time including callees) =="
R --children --sort symbol | grep -E 'sys_(sendmmsg|recvmmsg|sendto|recvfrom|epoll_wait|read|write)|Worker::run|on_listen_ready|on_reply_ready|forward|schedule$|finish_task_switch|net_rx_action|udp_sendmsg|udp_recvmsg|tokio' | head -30 || true
echo "== flat profile (self time, top 30) =="
FLAT=$(R --no-children --sort symbol | head -30)
echo "$FLAT"
smoke_require "perf samples" "$FLAT"
