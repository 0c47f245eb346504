#!/usr/bin/env bash
# Failover decisions side by side: false failovers on a lossy link, and the gap a hung
# node costs, for mediagate, nginx stream (passive max_fails/fail_timeout) and HAProxy
# (active checks, fall/rise), in one run, in front of the same primary/backup workers.
#
# The primary's echo workers (UDP :7000, TCP :7001) run in a network namespace behind a
# veth pair; nftables drops LOSS % of the UDP and TCP packets that enter and leave it
# (`numgen random`; this kernel has no netem). The backups run on loopback. 20 flows
# (scripts/failover-flows.py) send every 20 ms through each balancer:
#
#   UDP: mediagate (udp probe every 100 ms, defaults otherwise) vs nginx stream
#        (max_fails=1 fail_timeout=10s, proxy_timeout 200ms, proxy_responses 1)
#   TCP: mediagate (tcp probe every 100 ms) vs haproxy (check inter 100 fall 1 rise 2,
#        on-marked-down shutdown-sessions)
#
# Per loss level and balancer: "moved" = answers that came from the backup while the
# primary was alive (each is a flow served by the wrong node: for WebRTC a call cut),
# and "down" = times the balancer marked the primary down (mediagate: failovers_total;
# haproxy: chkdown; nginx has no such counter). Then, without loss, the primary's link is
# cut: the worst gap any flow saw.
#
#   LOSSES="0 1 2 5"   loss levels (percent, each way)
#   DURATION=30        seconds per balancer and loss level
#   SMOKE=1            2 s at 5 % loss, the debug binaries (scripts/test-bench-smoke.sh)
#
# Needs root (ip netns, nft), nginx (nginx-light + libnginx-mod-stream), haproxy, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-common.sh

if [[ $SMOKE = 1 ]]; then
  LOSSES=${LOSSES:-5}
  DURATION=${DURATION:-2}
else
  LOSSES=${LOSSES:-"0 1 2 5"}
  DURATION=${DURATION:-30}
fi
[[ $(id -u) = 0 ]] || { echo "bench-failover needs root (ip netns, nft)" >&2; exit 2; }
find_nginx
HAPROXY=${HAPROXY:-$(command -v haproxy || echo /usr/sbin/haproxy)}
[[ -x $HAPROXY ]] || { echo "haproxy not found (apt-get install haproxy)" >&2; exit 2; }
command -v nft >/dev/null || { echo "nft not found (apt-get install nftables)" >&2; exit 2; }

bench_init bench-failover
NS=mg-bfail
P_IP=10.236.0.2
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cleanup_ns() {
  ip link del mgbf-h 2>/dev/null || true
  ip netns del $NS 2>/dev/null || true
}
trap 'bench_cleanup; cleanup_ns' EXIT
cleanup_ns
ip netns add $NS
ip link add mgbf-h type veth peer name mgbf-n netns $NS
ip addr add 10.236.0.1/24 dev mgbf-h
ip link set mgbf-h up
ip netns exec $NS ip link set lo up
ip netns exec $NS ip addr add $P_IP/24 dev mgbf-n
ip netns exec $NS ip link set mgbf-n up

# set_loss PERCENT: replaces the namespace's drop rules.
set_loss() {
  local pm=$(( $1 * 10 ))
  ip netns exec $NS nft delete table inet mgbf 2>/dev/null || true
  ip netns exec $NS nft -f - <<NFT
table inet mgbf {
  chain rx { type filter hook input priority 0; policy accept;
    iifname "mgbf-n" numgen random mod 1000 < $pm drop
  }
  chain tx { type filter hook output priority 0; policy accept;
    oifname "mgbf-n" numgen random mod 1000 < $pm drop
  }
}
NFT
}

TK=target/debug/mediagate-testkit
[[ $SMOKE = 1 ]] || TK=target/release/mediagate-testkit
if [[ ! -x $TK && -z "${SKIP_BUILD:-}" ]]; then
  if [[ $SMOKE = 1 ]]; then cargo build --quiet --bin mediagate-testkit; else cargo build --release --quiet --bin mediagate-testkit; fi
fi
U_BACKUP=$(free_port); T_BACKUP=$(free_port)
ip netns exec $NS $TK udp-echo --name primary --listen $P_IP:7000 >/dev/null & PIDS+=($!)
ip netns exec $NS $TK tcp-echo --name primary --listen $P_IP:7001 >/dev/null & PIDS+=($!)
$TK udp-echo --name backup --listen 127.0.0.1:$U_BACKUP >/dev/null & PIDS+=($!)
$TK tcp-echo --name backup --listen 127.0.0.1:$T_BACKUP >/dev/null & PIDS+=($!)
sleep 0.5

# start_lb NAME: starts balancer NAME, sets LB_PORT (where flows go), LB_PID, LB_ADMIN.
start_lb() {
  LB_PORT=$(free_port); LB_ADMIN=$(free_port)
  case $1 in
    mediagate-udp|mediagate-tcp)
      local proto=${1#mediagate-} primary backup
      if [[ $proto = udp ]]; then primary=$P_IP:7000 backup=127.0.0.1:$U_BACKUP; else primary=$P_IP:7001 backup=127.0.0.1:$T_BACKUP; fi
      cat >"$TMP/mg.yaml" <<YAML
admin: { listen: 127.0.0.1:$LB_ADMIN }
listeners:
  - { name: l, protocol: $proto, listen: 127.0.0.1:$LB_PORT, upstream: u }
upstreams:
  u:
    primary: ["$primary"]
    backup: ["$backup"]
    health: { type: $proto, interval: 100ms, timeout: 100ms }
YAML
      RUST_LOG=error $BIN/mediagate run -c "$TMP/mg.yaml" >"$TMP/mg.log" 2>&1 & LB_PID=$!
      wait_ready "$LB_ADMIN" "$TMP/mg.log"
      ;;
    nginx-udp)
      cat >"$TMP/nginx.conf" <<CONF
load_module $STREAM_MOD;
worker_processes 1;
daemon off;
pid $TMP/nginx.pid;
error_log $TMP/nginx-error.log crit;
events { worker_connections 4096; }
stream {
  upstream media {
    server $P_IP:7000 max_fails=1 fail_timeout=10s;
    server 127.0.0.1:$U_BACKUP backup;
  }
  server {
    listen 127.0.0.1:$LB_PORT udp;
    proxy_pass media;
    proxy_timeout 200ms;
    proxy_responses 1;
  }
}
CONF
      $NGINX -c "$TMP/nginx.conf" >"$TMP/nginx.log" 2>&1 & LB_PID=$!
      sleep 0.5
      ;;
    haproxy-tcp)
      cat >"$TMP/haproxy.cfg" <<CFG
global
  stats socket $TMP/haproxy.sock mode 600 level admin
defaults
  mode tcp
  timeout connect 1s
  timeout client 30s
  timeout server 30s
listen l
  bind 127.0.0.1:$LB_PORT
  default-server inter 100 fall 1 rise 2 on-marked-down shutdown-sessions
  server p $P_IP:7001 check
  server b 127.0.0.1:$T_BACKUP check backup
CFG
      $HAPROXY -db -f "$TMP/haproxy.cfg" >"$TMP/haproxy.log" 2>&1 & LB_PID=$!
      sleep 0.5
      ;;
  esac
}

# downs NAME: times the balancer marked the primary down ("-" when it cannot tell).
downs() {
  case $1 in
    mediagate-*)
      curl -s "http://127.0.0.1:$LB_ADMIN/metrics" |
        awk '/^mediagate_failovers_total\{/ {s += $NF} END {print s + 0}' ;;
    haproxy-tcp)
      python3 - "$TMP/haproxy.sock" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"show stat\n")
data = b""
while True:
    c = s.recv(65536)
    if not c: break
    data += c
lines = data.decode().splitlines()
head = lines[0].lstrip("# ").split(",")
for l in lines[1:]:
    f = l.split(",")
    if len(f) > 1 and f[1] == "p":
        print(f[head.index("chkdown")])
PY
      ;;
    *) echo - ;;
  esac
}

# stop_lb: at once (no drain: the next run starts clean).
# SIGKILL does not reach an nginx master's workers, and a running master replaces a
# worker that dies: stop the master, kill its children, then kill it.
stop_lb() {
  kill -STOP "$LB_PID" 2>/dev/null || true
  pkill -KILL -P "$LB_PID" 2>/dev/null || true
  kill -KILL "$LB_PID" 2>/dev/null || true
  wait "$LB_PID" 2>/dev/null || true
}

flows() { python3 scripts/failover-flows.py "$1" 127.0.0.1:$LB_PORT --flows 20 --interval 0.02 --duration "$2"; }
# field EXPR JSON: a Python expression over the flows' result `d`.
field() { python3 -c "import json,sys; d=json.loads(sys.argv[1]); print($1)" "$2"; }

declare -A MOVED DOWN GAP
LBS="mediagate-udp nginx-udp mediagate-tcp haproxy-tcp"
for loss in $LOSSES; do
  set_loss "$loss"
  for lb in $LBS; do
    start_lb "$lb"
    out=$(flows "${lb#*-}" "$DURATION")
    MOVED[$lb,$loss]=$(field "d['by_worker'].get('backup', 0)" "$out")
    DOWN[$lb,$loss]=$(downs "$lb")
    stop_lb
    echo "loss $loss%: $lb: $out, primary marked down ${DOWN[$lb,$loss]} times" >&2
    smoke_require "answers through $lb" "$(field "d['answered'] or ''" "$out")"
  done
done

# A hung node: the primary's link goes down 1 s into the run.
set_loss 0
for lb in $LBS; do
  ip netns exec $NS ip link set mgbf-n up
  start_lb "$lb"
  sleep 1
  ( sleep 1; ip netns exec $NS ip link set mgbf-n down ) &
  out=$(flows "${lb#*-}" 3)
  GAP[$lb]=$(field "d['worst_gap_ms']" "$out")
  stop_lb
  echo "hung node: $lb: $out" >&2
  smoke_require "gap through $lb" "${GAP[$lb]}"
done
ip netns exec $NS ip link set mgbf-n up

echo
echo "| balancer | $(for l in $LOSSES; do printf '%s%% loss: moved / marked down | ' "$l"; done)hung node: worst flow gap |"
echo "|---|$(for _ in $LOSSES; do printf -- '---|'; done)---|"
for lb in $LBS; do
  printf '| %s | ' "$lb"
  for l in $LOSSES; do printf '%s / %s | ' "${MOVED[$lb,$l]}" "${DOWN[$lb,$l]}"; done
  printf '%s ms |\n' "${GAP[$lb]}"
done
