#!/usr/bin/env bash
# UDP data-plane benchmark: the direct path (no proxy), nginx stream and mediagate, side
# by side in one run, in front of the same primary/backup echo workers on 127.0.0.1.
#
# For 1 and 1000 flows at 64 B and 1200 B it sweeps each target to its highest rate with
# under 0.1% loss (mediagate-load sweep), then measures RTT at half of nginx's highest
# rate on every target, and prints a table with the mediagate/nginx ratios.
#
# Usage: scripts/bench-udp.sh            (about 7 minutes after the build; hard limit 9.5)
# Environment:
#   WORKERS=1        nginx worker_processes and mediagate UDP worker threads
#   FLOWS="1 1000"   SIZES="64 1200"
#   TRIAL=1s         length of each sweep trial
#   LAT=1s ROUNDS=11 latency: ROUNDS runs of LAT per target, rotated order, median kept;
#                    a round also pairs mediagate's p99 with nginx's run next to it
#   SRC_BASE=10000   flow i always sends from port SRC_BASE+i, so every trial and round
#                    drives the same long-lived sessions through each proxy (as media
#                    flows do), and no proxy fills up with sessions of earlier rounds
#   JOIN=1           every latency round opens its flows' sessions at once (fresh source
#                    ports, no priming: a mass join, as after a replica restart), the
#                    proxies' idle timeout is IDLE (default 5s, so earlier rounds' sessions
#                    expire, in bulk, during later ones); the table adds each target's
#                    first-datagram RTT (median of the runs' p50 and of their worst)
#   SKIP_BUILD=1     use the release binaries already built
#   OUT=file         also write the table there (markdown)
#   PIN=1            pin the proxies to CPU 1, the generator and echo workers to CPU 0
#   RT=1             run both proxies at real-time priority (SCHED_FIFO 10; needs root)
#   RT=all           the latency rounds run every process of the benchmark (generator,
#                    echo workers, nginx, mediagate) at SCHED_RR 10, sweeps as usual: no
#                    process of the benchmark then waits for a CPU behind the machine's
#                    other tenants (see README, "The tail at 1000 flows"); needs root
#   SLOW=µs          each latency run also reports when its replies slower than this
#                    were sent, per 10 ms window (mediagate-load --slow-us; a stall
#                    shows as one window with many)
#   SMOKE=1          a few seconds: 10 flows of 64 B, short trials capped at 20k pps,
#                    2 latency rounds, debug binaries (proves the script works)
# Needs: nginx (Debian nginx-light + libnginx-mod-stream). Traffic stays on 127.0.0.1.
#   NETNS=1          the namespaced mode instead (clients, proxies, echo workers in three
#                    network namespaces; adds mediagate with the kernel fast path):
#                    scripts/bench-udp-netns.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ${NETNS:-} = 1 ]]; then exec scripts/bench-udp-netns.sh; fi
source scripts/bench-common.sh
if [[ $SMOKE = 1 ]]; then
  FLOWS=${FLOWS:-10}; SIZES=${SIZES:-64}; TRIAL=${TRIAL:-300ms}; LAT=${LAT:-300ms}
  ROUNDS=${ROUNDS:-2}; SWEEP_MAX=${SWEEP_MAX:-20000}; STEPS=${STEPS:-1}
fi

WORKERS=${WORKERS:-1}
FLOWS=${FLOWS:-"1 1000"}
SIZES=${SIZES:-"64 1200"}
TRIAL=${TRIAL:-1s}
LAT=${LAT:-1s}
ROUNDS=${ROUNDS:-11}
SRC_BASE=${SRC_BASE:-10000}
JOIN=${JOIN:-0}
LAT_ARGS=(--src-base "$SRC_BASE")
if [[ $JOIN = 1 ]]; then IDLE=${IDLE:-5s}; LAT_ARGS=(--src-base 0 --prime 0s); fi
IDLE=${IDLE:-30s} # the proxies' session idle timeout
SWEEP_MAX=${SWEEP_MAX:-2000000}
STEPS=${STEPS:-4}
BASE=${BASE_PORT:-21000}
PROXY_CPU=(); CLIENT_CPU=()
if [[ -n "${PIN:-}" ]]; then PROXY_CPU=(taskset -c 1); CLIENT_CPU=(taskset -c 0); fi
# RT=1: both proxies (every thread, nginx's workers too) at SCHED_FIFO priority 10, so
# that they never wait for a CPU behind the generator and the echo workers: what is left
# of their tail is their own work.
if [[ ${RT:-0} = 1 ]]; then PROXY_CPU=(chrt -f 10 "${PROXY_CPU[@]}"); fi
LAT_PREFIX=""
if [[ ${RT:-0} = all ]]; then LAT_PREFIX="chrt -r 10"; fi
if [[ -n ${SLOW:-} ]]; then LAT_ARGS+=(--slow-us "$SLOW"); fi

find_nginx
bench_init bench-udp
DEADLINE=$((SECONDS + 570)) # after the build: the budget is for measuring
LOAD="${CLIENT_CPU[*]} $BIN/mediagate-load"

PRIMARY=$BASE; BACKUP=$((BASE + 1)); NGINX_PORT=$((BASE + 2)); MG_PORT=$((BASE + 3)); ADMIN=$((BASE + 4))

start_echo() { # name port
  $LOAD echo --listen 127.0.0.1:$2 --threads "$WORKERS" --lifetime 10m >"$TMP/$1.out" 2>&1 &
  PIDS+=($!)
}
start_echo primary $PRIMARY
start_echo backup $BACKUP

nginx_stream_conf "$TMP/nginx.conf" "udp reuseport" "proxy_timeout $IDLE;"
${PROXY_CPU[@]} $NGINX -e "$TMP/nginx-error.log" -p "$TMP" -c "$TMP/nginx.conf" &
PIDS+=($!)

cat >"$TMP/mediagate.yaml" <<EOF
admin: { listen: "127.0.0.1:$ADMIN" }
log: { level: warn }
listeners:
  - name: rtp
    protocol: udp
    listen: "127.0.0.1:$MG_PORT"
    upstream: media
    # One load generator is one source IP: no per-source limits.
    session: { idle_timeout: $IDLE, max_sessions: 100000, new_per_source_per_second: 0, max_per_source: 0 }
upstreams:
  media:
    primary: ["127.0.0.1:$PRIMARY"]
    backup: ["127.0.0.1:$BACKUP"]
    health: { type: udp, send: ping, interval: 1s, timeout: 500ms }
# The benchmark stops it with SIGTERM: no need to drain sessions for long.
shutdown: { drain_timeout: 1s }
EOF
MEDIAGATE_UDP_WORKERS=$WORKERS ${PROXY_CPU[@]} $BIN/mediagate run -c "$TMP/mediagate.yaml" 2>"$TMP/mediagate.log" &
MG_PID=$!
PIDS+=($MG_PID)

wait_ready "$ADMIN" "$TMP/mediagate.log"
sleep 0.3
NGINX_PID=$(cat "$TMP/nginx.pid" 2>/dev/null || true)

# RT=all: every thread of the benchmark's long-running processes (echo workers, nginx's
# master and workers, mediagate) to SCHED_RR 10 for the latency rounds ("rt"), back to
# SCHED_OTHER for the sweeps ("normal").
sched_all() {
  [[ ${RT:-0} = all ]] || return 0
  local p
  for p in "${PIDS[@]}" $(pgrep -P "${NGINX_PID:-0}" || true); do
    if [[ $1 = rt ]]; then chrt -r -a -p 10 "$p" >/dev/null; else chrt -o -a -p 0 "$p" >/dev/null; fi
  done
}

declare -A PORT=([direct]=$PRIMARY [nginx]=$NGINX_PORT [mediagate]=$MG_PORT)
TARGETS="direct nginx mediagate"
field() { # key line
  sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"
}
declare -A MAX P99 P50 P999 SIL HALF WINS PAIRED F50 FMAX
say() { echo "$*" >&2; }
ratio() { awk -v a="${1:-0}" -v b="${2:-0}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'; }
TOTAL_WINS=0; TOTAL_PAIRED=0; SLOW_SEEN=

say "machine: $(nproc) CPU ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(uname -r)"
say "workers: $WORKERS (nginx worker_processes, mediagate UDP threads, echo threads); trial $TRIAL, latency runs $LAT"
for flows in $FLOWS; do
  for size in $SIZES; do
    k=$flows,$size
    for t in $TARGETS; do
      if ((SECONDS > DEADLINE)); then say "time budget spent; stopping"; break 3; fi
      line=$(timeout 120 $LOAD sweep --target 127.0.0.1:${PORT[$t]} --flows "$flows" --size "$size" \
        --src-base "$SRC_BASE" --duration "$TRIAL" --start 10000 --max "$SWEEP_MAX" --steps "$STEPS" 2>"$TMP/sweep-$t-$flows-$size.log" | grep '^best' || true)
      MAX[$t,$k]=$(field pps "$line")
      say "sweep $t flows=$flows size=$size: max ${MAX[$t,$k]:-?} pps"
    done
    half=$(awk -v r="${MAX[nginx,$k]:-0}" 'BEGIN { printf "%d", r / 2 }')
    HALF[$k]=$half
    ((half > 0)) || continue
    # Latency: ROUNDS short runs per target, the order rotated every round so that
    # background load hits every target alike; the median of each percentile is kept.
    declare -A L50=() L99=() L999=() LSIL=() LF50=() LFMAX=()
    order=($TARGETS)
    wins=0; paired=0; ratios=""
    sched_all rt
    for ((r = 0; r < ROUNDS; r++)); do
      declare -A R99=()
      for ((j = 0; j < ${#order[@]}; j++)); do
        t=${order[$(((j + r) % ${#order[@]}))]}
        if ((SECONDS > DEADLINE)); then say "time budget spent; stopping"; break 4; fi
        line=$(timeout 60 $LAT_PREFIX $LOAD run --target 127.0.0.1:${PORT[$t]} --flows "$flows" --size "$size" \
          "${LAT_ARGS[@]}" --rate "$half" --duration "$LAT" 2>"$TMP/lat.err" || true)
        if [[ -n ${SLOW:-} ]] && grep -q '^slow_us=' "$TMP/lat.err"; then
          say "  $(grep '^slow_us=' "$TMP/lat.err")"; SLOW_SEEN=1
        fi
        L50[$t]+=" $(field p50_us "$line")"; L99[$t]+=" $(field p99_us "$line")"
        L999[$t]+=" $(field p999_us "$line")"; LSIL[$t]+=" $(field max_silence_ms "$line")"
        LF50[$t]+=" $(field first_p50_us "$line")"; LFMAX[$t]+=" $(field first_max_us "$line")"
        R99[$t]=$(field p99_us "$line")
        say "latency $t flows=$flows size=$size at $half pps (round $((r + 1))): $line"
      done
      # Paired: the two proxies ran back to back in this round, under the same background.
      if [[ -n "${R99[nginx]:-}" && -n "${R99[mediagate]:-}" ]]; then
        paired=$((paired + 1))
        awk -v m="${R99[mediagate]}" -v n="${R99[nginx]}" 'BEGIN { exit !(m <= n) }' && wins=$((wins + 1))
        ratios+=" $(ratio "${R99[nginx]}" "${R99[mediagate]}")"
      fi
    done
    sched_all normal
    WINS[$k]="$wins/$paired"
    PAIRED[$k]=$(median $ratios)
    TOTAL_WINS=$((TOTAL_WINS + wins)); TOTAL_PAIRED=$((TOTAL_PAIRED + paired))
    for t in $TARGETS; do
      P50[$t,$k]=$(median ${L50[$t]}); P99[$t,$k]=$(median ${L99[$t]})
      P999[$t,$k]=$(median ${L999[$t]}); SIL[$t,$k]=$(median ${LSIL[$t]})
      F50[$t,$k]=$(median ${LF50[$t]}); FMAX[$t,$k]=$(median ${LFMAX[$t]})
    done
  done
done

{
  echo
  echo "| flows | size | direct max pps | nginx max pps | mediagate max pps | mediagate/nginx | at pps (½ nginx max) | p50/p99/p99.9 µs direct | nginx | mediagate | p99 nginx/mediagate (medians) | paired rounds: p99 nginx/mediagate (median), mediagate ≤ nginx | max silence ms nginx / mediagate |"
  echo "|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|---:|---|"
  for flows in $FLOWS; do
    for size in $SIZES; do
      k=$flows,$size
      lat() { echo "${P50[$1,$k]:--}/${P99[$1,$k]:--}/${P999[$1,$k]:--}"; }
      echo "| $flows | $size | ${MAX[direct,$k]:--} | ${MAX[nginx,$k]:--} | ${MAX[mediagate,$k]:--} | $(ratio "${MAX[mediagate,$k]:-}" "${MAX[nginx,$k]:-}") | ${HALF[$k]:--} | $(lat direct) | $(lat nginx) | $(lat mediagate) | $(ratio "${P99[nginx,$k]:-}" "${P99[mediagate,$k]:-}") | ${PAIRED[$k]:--}, ${WINS[$k]:--} | ${SIL[nginx,$k]:--} / ${SIL[mediagate,$k]:--} |"
    done
  done
  echo
  echo "Max pps: highest total rate (replies/s) with < 0.1% loss, $TRIAL trials. Latency: open loop at half of nginx's max rate, median of $ROUNDS rotated runs of $LAT."
  echo "Paired rounds (nginx and mediagate run back to back): mediagate's p99 ≤ nginx's in $TOTAL_WINS of $TOTAL_PAIRED."
  case ${RT:-0} in
    all) echo "Latency rounds: every process of the benchmark at SCHED_RR 10 (RT=all)." ;;
    1) echo "Both proxies at SCHED_FIFO 10 throughout (RT=1)." ;;
  esac
  if [[ $JOIN = 1 ]]; then
    echo "Mass join (JOIN=1: every latency round opened its sessions at once, idle timeout $IDLE). First datagram of each flow, µs, p50/worst (medians over rounds):"
    for flows in $FLOWS; do
      for size in $SIZES; do
        k=$flows,$size
        echo "- $flows flows × $size B: direct ${F50[direct,$k]:--}/${FMAX[direct,$k]:--}, nginx ${F50[nginx,$k]:--}/${FMAX[nginx,$k]:--}, mediagate ${F50[mediagate,$k]:--}/${FMAX[mediagate,$k]:--}"
      done
    done
  fi
} | tee "${OUT:-/dev/null}"
[[ -z ${SLOW:-} ]] || smoke_require "slow-reply windows (SLOW=$SLOW)" "$SLOW_SEEN"
for flows in $FLOWS; do
  for size in $SIZES; do
    for t in $TARGETS; do smoke_require "$t max pps (flows=$flows size=$size)" "${MAX[$t,$flows,$size]:-}"; done
    smoke_require "mediagate p99 (flows=$flows size=$size)" "${P99[mediagate,$flows,$size]:-}"
    [[ $JOIN = 0 ]] || smoke_require "mediagate first-datagram RTT (flows=$flows size=$size)" "${FMAX[mediagate,$flows,$size]:-}"
  done
done
