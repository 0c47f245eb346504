#!/usr/bin/env bash
# UDP benchmark the way pods see their network (also `NETNS=1 scripts/bench-udp.sh`):
# clients, the proxies and the echo workers each in their own network namespace, joined by
# veth pairs through the proxies' namespace:
#
#   ebpf-c (clients) 10.77.1.2 ──veth── 10.77.1.1  ebpf-m (proxies)  10.77.2.1 ──veth── 10.77.2.2 ebpf-w (echo)
#
# Targets, in one run: the direct path (clients → echo, routed by ebpf-m's kernel: the
# ceiling), nginx stream, mediagate in user space, and mediagate with the kernel fast path
# (`offload: ebpf`; a second listener of the same process). For each flow count and size
# it sweeps every target to its highest rate with < 0.1% loss, then measures RTT and CPU
# on every target at half of mediagate user space's highest rate (ROUNDS rotated rounds,
# medians).
#
# What it measures is the forwarder, not the load generator:
# - the echo "workers" cost nothing: by default (ECHO=xdp) an XDP program on the echo
#   namespace's veth (scripts/bpf/xdp_reflect.c) sends every datagram straight back;
# - the proxies run on CPU 1, the generator on CPU 0 (PIN=1, the default);
# - CPU per round trip (the generator sleeps rather than spins while ahead of schedule,
#   so its CPU time is work): on two cores the highest rates are bounded by the generator (the
#   kernel does a veth datagram's whole receive path, fast path included, in the
#   sender's context), so every latency run also adds up the CPU time of everything on
#   the path (generator, proxy processes, echo processes, ksoftirqd) from the kernel's
#   per-task clocks and divides by the replies. "above direct" is that minus the direct
#   path's cost: what forwarding through the proxy costs per round trip. Per-task clocks
#   are not disturbed by other processes on the machine, unlike rates.
#
# Usage: scripts/bench-udp-netns.sh   (root; ~6 minutes after the build; hard limit 9.5)
# Environment: WORKERS=1 FLOWS="1 1000" SIZES="64 1200" TRIAL=1s LAT=1s ROUNDS=3 OUT=file
#   SKIP_BUILD=1, SMOKE=1 (seconds, 10 flows of 64 B, debug binaries), as bench-udp.sh.
#   ECHO=xdp|socket  the XDP reflector (default) or mediagate-load echo processes
#   PIN=1|0          pin the proxies to CPU 1 and the generator to CPU 0 (default 1)
#   MODE=sessions    instead of the comparison: the fast path's CPU per round trip with
#                    1000 live flows while the kernel's session map holds SESSIONS
#                    sessions (default "1000 10000 100000"; the ones beyond the live flows
#                    are synthetic entries that never match, written with bpftool batch:
#                    a process may hold only 20000 descriptors here, a real session one)
# Needs root (ip netns), nginx, clang and bpftool, and a build with clang (the fast path).
# Creates only the namespaces ebpf-c, ebpf-m, ebpf-w and the veths inside them; removes
# them on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-common.sh
if [[ $SMOKE = 1 ]]; then
  FLOWS=${FLOWS:-10}; SIZES=${SIZES:-64}; TRIAL=${TRIAL:-300ms}; LAT=${LAT:-300ms}
  ROUNDS=${ROUNDS:-1}; SWEEP_MAX=${SWEEP_MAX:-20000}; STEPS=${STEPS:-1}
  SESSIONS=${SESSIONS:-"20 300"}; LIVE=${LIVE:-10}; RATE=${RATE:-5000}
  START=${START:-1000} # a loaded machine and debug binaries: start the sweeps low
fi
START=${START:-10000}
MODE=${MODE:-compare}
ECHO=${ECHO:-xdp}
PIN=${PIN:-1}
SESSIONS=${SESSIONS:-"1000 10000 100000"}
LIVE=${LIVE:-1000}
RATE=${RATE:-50000}
WORKERS=${WORKERS:-1}
FLOWS=${FLOWS:-"1 1000"}
SIZES=${SIZES:-"64 1200"}
TRIAL=${TRIAL:-1s}
LAT=${LAT:-1s}
ROUNDS=${ROUNDS:-3}
SRC_BASE=${SRC_BASE:-10000}
SWEEP_MAX=${SWEEP_MAX:-4000000}
STEPS=${STEPS:-4}
[[ $(id -u) = 0 ]] || { echo "needs root (ip netns)" >&2; exit 2; }

find_nginx
bench_init bench-udp-netns
DEADLINE=$((SECONDS + 570))
C=ebpf-c; M=ebpf-m; W=ebpf-w
PRIMARY=7001; BACKUP=7002; NGINX_PORT=7010; MG_PORT=7020; FAST_PORT=7030; ADMIN=7090
inns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
netns_cleanup() {
  for ns in $C $M $W; do ip netns del $ns 2>/dev/null || true; done
}
trap 'bench_cleanup; netns_cleanup' EXIT
netns_cleanup
for ns in $C $M $W; do ip netns add $ns; inns $ns ip link set lo up; done
ip link add ebc0 netns $C type veth peer name ebm0 netns $M
ip link add ebw0 netns $W type veth peer name ebm1 netns $M
inns $C ip addr add 10.77.1.2/24 dev ebc0; inns $C ip link set ebc0 up
inns $M ip addr add 10.77.1.1/24 dev ebm0; inns $M ip link set ebm0 up
inns $M ip addr add 10.77.2.1/24 dev ebm1; inns $M ip link set ebm1 up
inns $W ip addr add 10.77.2.2/24 dev ebw0; inns $W ip link set ebw0 up
inns $C ip route add default via 10.77.1.1
inns $W ip route add default via 10.77.2.1
inns $M sysctl -qw net.ipv4.ip_forward=1   # the direct path is routed by this namespace

PROXY_CPU=(); CLIENT_CPU=()
if [[ $PIN = 1 ]]; then PROXY_CPU=(taskset -c 1); CLIENT_CPU=(taskset -c 0); fi
LOAD="$BIN/mediagate-load"
ECHO_PIDS=()
if [[ $ECHO = xdp ]] && ! command -v clang >/dev/null; then
  echo "clang not found: user-space echo workers instead of the XDP reflector (ECHO=socket)" >&2
  ECHO=socket
fi
if [[ $ECHO = xdp ]]; then
  clang -O2 -g -target bpf -I/usr/include/"$(uname -m)"-linux-gnu -c scripts/bpf/xdp_reflect.c -o "$TMP/xdp_reflect.o"
  inns $W ip link set dev ebw0 xdp obj "$TMP/xdp_reflect.o" sec xdp program reflect
  # A veth accepts the reflected (XDP_TX) frames only in NAPI mode: an XDP program on it.
  inns $M ip link set dev ebm1 xdp obj "$TMP/xdp_reflect.o" sec xdp program pass
else
  for p in $PRIMARY $BACKUP; do
    ip netns exec $W $LOAD echo --listen 10.77.2.2:$p --threads "$WORKERS" --lifetime 10m >"$TMP/echo-$p.out" 2>&1 &
    PIDS+=($!); ECHO_PIDS+=($!)
  done
fi

cat >"$TMP/nginx.conf" <<CONF
load_module $STREAM_MOD;
worker_processes $WORKERS;
worker_rlimit_nofile 20000;
daemon off;
pid $TMP/nginx.pid;
error_log $TMP/nginx-error.log warn;
events { worker_connections 9000; }
stream {
  upstream media { server 10.77.2.2:$PRIMARY; server 10.77.2.2:$BACKUP backup; }
  server { listen 10.77.1.1:$NGINX_PORT udp reuseport; proxy_pass media; proxy_timeout 30s; }
}
CONF
ip netns exec $M ${PROXY_CPU[@]} $NGINX -e "$TMP/nginx-error.log" -p "$TMP" -c "$TMP/nginx.conf" &
PIDS+=($!)

listener() { # name port offload
  cat <<EOF
  - name: $1
    protocol: udp
    listen: "10.77.1.1:$2"
    upstream: media
    offload: $3
    session: { idle_timeout: 30s, max_sessions: 100000, new_per_source_per_second: 0, max_per_source: 0 }
EOF
}
{
  echo "admin: { listen: \"127.0.0.1:$ADMIN\" }"
  echo "log: { level: warn }"
  echo "listeners:"
  listener user $MG_PORT none
  listener fast $FAST_PORT ebpf
  cat <<EOF
upstreams:
  media:
    primary: ["10.77.2.2:$PRIMARY"]
    backup: ["10.77.2.2:$BACKUP"]
    health: { type: udp, send: ping, interval: 1s, timeout: 500ms }
shutdown: { drain_timeout: 1s }
EOF
} >"$TMP/mediagate.yaml"
MEDIAGATE_UDP_WORKERS=$WORKERS ip netns exec $M ${PROXY_CPU[@]} $BIN/mediagate run -c "$TMP/mediagate.yaml" 2>"$TMP/mediagate.log" &
MG_PID=$!
PIDS+=($MG_PID)
for _ in $(seq 100); do inns $M curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
inns $M curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null || { cat "$TMP/mediagate.log" >&2; exit 1; }
metrics() { inns $M curl -sf "http://127.0.0.1:$ADMIN/metrics"; }
if metrics | grep -q '^mediagate_offload_errors_total{reason="\(built_without_clang\|permission\|load\|attach\|disabled\)"} [1-9]'; then
  echo "the fast path is unavailable:" >&2; grep -i offload "$TMP/mediagate.log" >&2; exit 1
fi
sleep 0.3
NGINX_PID=$(cat "$TMP/nginx.pid" 2>/dev/null || true)
# pids_where FIELD VALUE: processes whose /proc/PID/stat FIELD (2: comm, 4: parent) is VALUE.
pids_where() {
  local f stat pid comm rest v
  for f in /proc/[0-9]*/stat; do
    { read -r stat <"$f"; } 2>/dev/null || continue
    pid=${f#/proc/}; pid=${pid%/stat}
    comm=${stat#*(}; comm=${comm%)*}
    read -ra rest <<<"${stat##*) }" # from field 3 on
    if [[ $1 = 2 ]]; then v=$comm; else v=${rest[$(($1 - 3))]:-}; fi
    if [[ $v = "$2" ]]; then echo "$pid"; fi
  done | xargs
}
NGINX_PIDS="$NGINX_PID $(pids_where 4 "${NGINX_PID:-1}")"

# cpu_ns PID...: CPU time so far of every thread of the processes, ns (the scheduler's
# per-task clock; with no IRQ time accounting it includes softirq work done in them).
cpu_ns() {
  local total=0 f v
  for pid in "$@"; do
    for f in /proc/"$pid"/task/*/schedstat; do
      read -r v _ <"$f" 2>/dev/null && total=$((total + v))
    done
  done
  echo $total
}
KSOFTIRQD="$(for c in $(seq 0 $(($(nproc) - 1))); do pids_where 2 "ksoftirqd/$c"; done | xargs)"
declare -A PROXY_PIDS=([direct]="" [nginx]="$NGINX_PIDS" [user]="$MG_PID" [fast]="$MG_PID")
# measure TARGET FLOWS SIZE RATE: one latency run; prints the generator's line plus
# cpu_us_per_rt= (CPU of everything on the path per reply).
measure() {
  local t=$1 before after line cpu rcv
  before=$(cpu_ns ${PROXY_PIDS[$t]} ${ECHO_PIDS[@]} $KSOFTIRQD)
  line=$(timeout 60 ip netns exec $C ${CLIENT_CPU[@]} $LOAD run --target ${ADDR[$t]} --flows "$2" --size "$3" \
    --src-base "$SRC_BASE" --rate "$4" --duration "$LAT" --sleep-only 2>/dev/null || true)
  after=$(cpu_ns ${PROXY_PIDS[$t]} ${ECHO_PIDS[@]} $KSOFTIRQD)
  cpu=$(field cpu_ms "$line"); rcv=$(field received "$line")
  echo "$line cpu_us_per_rt=$(awk -v g="${cpu:-0}" -v d=$((after - before)) -v n="${rcv:-0}" 'BEGIN { if (n > 0) printf "%.2f", (g * 1e6 + d) / n / 1000; else printf "-" }')"
}

declare -A ADDR=([direct]=10.77.2.2:$PRIMARY [nginx]=10.77.1.1:$NGINX_PORT [user]=10.77.1.1:$MG_PORT [fast]=10.77.1.1:$FAST_PORT)
TARGETS="direct nginx user fast"
field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"; }
say() { echo "$*" >&2; }
ratio() { awk -v a="${1:-0}" -v b="${2:-0}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'; }
declare -A MAX P50 P99 HALF COST
say "machine: $(nproc) CPU ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(uname -r)"
say "workers: $WORKERS; trial $TRIAL; latency: $ROUNDS rounds of $LAT; echo: $ECHO; pinned: $PIN"
if [[ $MODE = sessions ]]; then source scripts/bench-udp-sessions.sh; exit 0; fi
for flows in $FLOWS; do
  for size in $SIZES; do
    k=$flows,$size
    for t in $TARGETS; do
      if ((SECONDS > DEADLINE)); then say "time budget spent; stopping"; break 3; fi
      line=$(timeout 120 ip netns exec $C ${CLIENT_CPU[@]} $LOAD sweep --target ${ADDR[$t]} --flows "$flows" --size "$size" \
        --src-base "$SRC_BASE" --duration "$TRIAL" --start "$START" --max "$SWEEP_MAX" --steps "$STEPS" 2>"$TMP/sweep-$t-$k.log" | grep '^best' || true)
      MAX[$t,$k]=$(field pps "$line")
      say "sweep $t flows=$flows size=$size: max ${MAX[$t,$k]:-?} pps"
      [[ -n "${MAX[$t,$k]}" ]] || tail -3 "$TMP/sweep-$t-$k.log" >&2
    done
    half=$(awk -v r="${MAX[user,$k]:-0}" 'BEGIN { printf "%d", r / 2 }')
    HALF[$k]=$half
    ((half > 0)) || continue
    declare -A L50=() L99=() LCPU=()
    order=($TARGETS)
    for ((r = 0; r < ROUNDS; r++)); do
      for ((j = 0; j < ${#order[@]}; j++)); do
        t=${order[$(((j + r) % ${#order[@]}))]}
        if ((SECONDS > DEADLINE)); then say "time budget spent; stopping"; break 4; fi
        line=$(measure "$t" "$flows" "$size" "$half")
        L50[$t]+=" $(field p50_us "$line")"; L99[$t]+=" $(field p99_us "$line")"
        LCPU[$t]+=" $(field cpu_us_per_rt "$line")"
        say "latency $t flows=$flows size=$size at $half pps (round $((r + 1))): $line"
      done
    done
    for t in $TARGETS; do
      P50[$t,$k]=$(median ${L50[$t]}); P99[$t,$k]=$(median ${L99[$t]}); COST[$t,$k]=$(median ${LCPU[$t]})
    done
  done
done
OFFLOADED=$(metrics | sed -n 's/^mediagate_offload_packets_total{listener="fast",direction="to_server"} //p')

{
  echo
  echo "| flows | size | direct max pps | nginx | mediagate user | mediagate fast path | fast/user | fast/direct | fast/nginx | at pps (½ user max) | p50/p99 µs direct | nginx | user | fast | CPU µs per round trip direct / nginx / user / fast | above direct: nginx / user / fast | CPU user/fast |"
  echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---|---|---:|"
  for flows in $FLOWS; do
    for size in $SIZES; do
      k=$flows,$size
      lat() { echo "${P50[$1,$k]:--}/${P99[$1,$k]:--}"; }
      above() { awk -v a="${COST[$1,$k]:-}" -v d="${COST[direct,$k]:-}" 'BEGIN { if (a != "" && a != "-" && d != "" && d != "-") printf "%.2f", a - d; else printf "-" }'; }
      echo "| $flows | $size | ${MAX[direct,$k]:--} | ${MAX[nginx,$k]:--} | ${MAX[user,$k]:--} | ${MAX[fast,$k]:--} | $(ratio "${MAX[fast,$k]:-}" "${MAX[user,$k]:-}") | $(ratio "${MAX[fast,$k]:-}" "${MAX[direct,$k]:-}") | $(ratio "${MAX[fast,$k]:-}" "${MAX[nginx,$k]:-}") | ${HALF[$k]:--} | $(lat direct) | $(lat nginx) | $(lat user) | $(lat fast) | ${COST[direct,$k]:--} / ${COST[nginx,$k]:--} / ${COST[user,$k]:--} / ${COST[fast,$k]:--} | $(above nginx) / $(above user) / $(above fast) | $(ratio "${COST[user,$k]:-}" "${COST[fast,$k]:-}") |"
    done
  done
  echo
  echo "Three namespaces joined by veths (clients | proxies | echo workers; echo: $ECHO; pinned: $PIN). Max pps: highest total rate (replies/s) with < 0.1% loss, $TRIAL trials; latency and CPU: open loop at half of mediagate user space's max, median of $ROUNDS rotated runs of $LAT. CPU per round trip: generator + proxy + echo processes + ksoftirqd, per reply. Datagrams the fast path forwarded to the server: ${OFFLOADED:-0}."
} | tee "${OUT:-/dev/null}"
smoke_require "datagrams forwarded by the fast path" "$( [[ ${OFFLOADED:-0} != 0 ]] && echo "$OFFLOADED" )"
for flows in $FLOWS; do
  for size in $SIZES; do
    for t in $TARGETS; do smoke_require "$t max pps (flows=$flows size=$size)" "${MAX[$t,$flows,$size]:-}"; done
    smoke_require "fast path p99 (flows=$flows size=$size)" "${P99[fast,$flows,$size]:-}"
    smoke_require "fast path CPU per round trip (flows=$flows size=$size)" "${COST[fast,$flows,$size]:-}"
  done
done
