#!/usr/bin/env bash
# Profiles mediagate's UDP data plane with perf while mediagate-load drives it through an
# echo worker on 127.0.0.1, and prints where the time goes (flat profile, by symbol).
#
# Usage: scripts/profile-udp.sh [FLOWS] [SIZE] [RATE]     (defaults 1000 64 30000; ~20 s)
# Needs: perf (Debian linux-perf). Set SKIP_BUILD=1 to reuse the release binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
FLOWS=${1:-1000}; SIZE=${2:-64}; RATE=${3:-30000}
BASE=${BASE_PORT:-22000}
source scripts/bench-common.sh
bench_init profile-udp

$BIN/mediagate-load echo --listen 127.0.0.1:$BASE --lifetime 2m >/dev/null &
PIDS+=($!)
cat >"$TMP/mg.yaml" <<EOF
admin: { listen: "127.0.0.1:$((BASE + 2))" }
log: { level: warn }
listeners:
  - { name: rtp, protocol: udp, listen: "127.0.0.1:$((BASE + 1))", upstream: media }
upstreams:
  media:
    primary: ["127.0.0.1:$BASE"]
    health: { type: udp, send: ping, interval: 1s, timeout: 500ms }
EOF
MEDIAGATE_UDP_WORKERS=${WORKERS:-1} $BIN/mediagate run -c "$TMP/mg.yaml" 2>"$TMP/mg.log" &
MG=$!
PIDS+=($MG)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$((BASE + 2))/readyz" >/dev/null 2>&1 && break; sleep 0.1; done

timeout 60 $BIN/mediagate-load run --target 127.0.0.1:$((BASE + 1)) --flows "$FLOWS" --size "$SIZE" --rate "$RATE" --duration 10s &
LOADPID=$!
sleep 4
timeout 30 perf record -F 1999 -g -p "$MG" -o "$TMP/perf.data" -- sleep 5 2>/dev/null >/dev/null
wait $LOADPID || true
R() { perf report -i "$TMP/perf.data" --stdio -g none "$@" 2>/dev/null | grep -E '^ +[0-9]'; }
echo "== user space vs kernel (self time by DSO) =="
R --no-children --sort dso | head -8
echo "== syscalls and main paths (time including callees) =="
R --children --sort symbol | grep -E 'sys_(sendmmsg|recvmmsg|sendto|recvfrom|epoll_wait|read|write)|Worker::run|on_listen_ready|on_reply_ready|forward|schedule$|finish_task_switch|net_rx_action|udp_sendmsg|udp_recvmsg|tokio' | head -30
echo "== flat profile (self time, top 30) =="
R --no-children --sort symbol | head -30
