#!/usr/bin/env bash
# TCP data-plane benchmark: bulk throughput and connections per second through the direct
# path, nginx stream, haproxy and mediagate, side by side in one run, in front of the same
# primary/backup backends on 127.0.0.1 (mediagate-load tcp-server).
#
# Usage: scripts/bench-tcp.sh          (about 2 minutes; hard limit 9 minutes)
# Environment:
#   WORKERS=1      nginx worker_processes, haproxy nbthread, mediagate runtime threads
#   CONNS="1 16"   concurrent connections for the throughput test
#   CPS_WORKERS=16 concurrent connect loops for the connections-per-second test
#   DUR=4s         length of each measurement        SKIP_BUILD=1, OUT=file as in bench-udp.sh
#   SMOKE=1        a few seconds: 1 connection, 2 connect loops, 1 s runs, debug binaries
# Needs: nginx (nginx-light + libnginx-mod-stream) and haproxy.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-common.sh
if [[ $SMOKE = 1 ]]; then
  CONNS=${CONNS:-1}; CPS_WORKERS=${CPS_WORKERS:-2}; DUR=${DUR:-1s}; SETTLE=${SETTLE:-0.2}
fi

WORKERS=${WORKERS:-1}
CONNS=${CONNS:-"1 16"}
CPS_WORKERS=${CPS_WORKERS:-16}
DUR=${DUR:-4s}
SETTLE=${SETTLE:-1}
BASE=${BASE_PORT:-23000}
DEADLINE=$((SECONDS + 540))

find_nginx
HAPROXY=${HAPROXY:-$(command -v haproxy || echo /usr/sbin/haproxy)}
[[ -x $HAPROXY ]] || { echo "haproxy not found (apt-get install haproxy)" >&2; exit 2; }
bench_init bench-tcp
LOAD=$BIN/mediagate-load

PRIMARY=$BASE; BACKUP=$((BASE + 1)); NGINX_PORT=$((BASE + 2)); HAPROXY_PORT=$((BASE + 3))
MG_PORT=$((BASE + 4)); ADMIN=$((BASE + 5))

for p in $PRIMARY $BACKUP; do
  $LOAD tcp-server --listen 127.0.0.1:$p --lifetime 10m >/dev/null 2>&1 &
  PIDS+=($!)
done

nginx_stream_conf "$TMP/nginx.conf" ""
$NGINX -e "$TMP/nginx-error.log" -p "$TMP" -c "$TMP/nginx.conf" &
PIDS+=($!)

cat >"$TMP/haproxy.cfg" <<EOF
global
  maxconn 9000
  nbthread $WORKERS
defaults
  mode tcp
  timeout connect 2s
  timeout client 30s
  timeout server 30s
frontend media
  bind 127.0.0.1:$HAPROXY_PORT
  default_backend media
backend media
  server primary 127.0.0.1:$PRIMARY
  server backup 127.0.0.1:$BACKUP backup
EOF
$HAPROXY -db -f "$TMP/haproxy.cfg" >"$TMP/haproxy.log" 2>&1 &
PIDS+=($!)

cat >"$TMP/mediagate.yaml" <<EOF
admin: { listen: "127.0.0.1:$ADMIN" }
log: { level: warn }
listeners:
  - { name: media, protocol: tcp, listen: "127.0.0.1:$MG_PORT", upstream: media }
upstreams:
  media:
    primary: ["127.0.0.1:$PRIMARY"]
    backup: ["127.0.0.1:$BACKUP"]
    health: { type: tcp, interval: 1s, timeout: 500ms }
# The benchmark stops it with SIGTERM: no need to drain sessions for long.
shutdown: { drain_timeout: 1s }
EOF
TOKIO_WORKER_THREADS=$WORKERS $BIN/mediagate run -c "$TMP/mediagate.yaml" 2>"$TMP/mediagate.log" &
PIDS+=($!)
wait_ready "$ADMIN" "$TMP/mediagate.log"
sleep 0.3

declare -A PORT=([direct]=$PRIMARY [nginx]=$NGINX_PORT [haproxy]=$HAPROXY_PORT [mediagate]=$MG_PORT)
TARGETS="direct nginx haproxy mediagate"
declare -A TP CPS
field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"; }
say() { echo "$*" >&2; }

say "machine: $(nproc) CPU ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(uname -r); workers: $WORKERS"
for c in $CONNS; do
  for t in $TARGETS; do
    ((SECONDS < DEADLINE)) || break 2
    line=$(timeout 60 $LOAD tcp-throughput --target 127.0.0.1:${PORT[$t]} --conns "$c" --duration "$DUR" 2>&1 || true)
    TP[$t,$c]=$(field gbit_per_sec "$line")
    say "throughput $t conns=$c: $line"
  done
done
for t in $TARGETS; do
  ((SECONDS < DEADLINE)) || break
  line=$(timeout 60 $LOAD tcp-cps --target 127.0.0.1:${PORT[$t]} --workers "$CPS_WORKERS" --duration "$DUR" 2>&1 || true)
  CPS[$t]=$(field conn_per_sec "$line")
  say "cps $t: $line"
  sleep "$SETTLE" # let TIME_WAIT sockets of this target settle before the next one
done

ratio() { awk -v a="${1:-0}" -v b="${2:-0}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'; }
{
  echo
  echo "| test | direct | nginx | haproxy | mediagate | mediagate/haproxy | mediagate/nginx |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for c in $CONNS; do
    echo "| throughput Gbit/s, $c conn | ${TP[direct,$c]:--} | ${TP[nginx,$c]:--} | ${TP[haproxy,$c]:--} | ${TP[mediagate,$c]:--} | $(ratio "${TP[mediagate,$c]:-}" "${TP[haproxy,$c]:-}") | $(ratio "${TP[mediagate,$c]:-}" "${TP[nginx,$c]:-}") |"
  done
  echo "| connections/s, $CPS_WORKERS loops | ${CPS[direct]:--} | ${CPS[nginx]:--} | ${CPS[haproxy]:--} | ${CPS[mediagate]:--} | $(ratio "${CPS[mediagate]:-}" "${CPS[haproxy]:-}") | $(ratio "${CPS[mediagate]:-}" "${CPS[nginx]:-}") |"
} | tee "${OUT:-/dev/null}"
for t in $TARGETS; do
  for c in $CONNS; do smoke_require "$t throughput ($c conns)" "${TP[$t,$c]:-}"; done
  smoke_require "$t connections/s" "${CPS[$t]:-}"
done
