#!/usr/bin/env bash
# TURN relay benchmark: mediagate's TURN service and coturn, in one run, driven by
# `mediagate-load turn` (open loop, several threads, hand-rolled ChannelData) until each
# loses packets. For every case (allocations x transport x payload size):
#   - the highest rate (packets/s sent by the clients) with < MAX_LOSS loss, per server;
#   - at half of coturn's highest rate, both servers: RTT p50/p99 and the server's CPU time
#     per relayed packet (every packet is relayed twice: client -> peer, peer -> client);
#   - the ratios mediagate/coturn.
#
#   scripts/bench-turn.sh                       # the full matrix (~15 min)
#   ALLOCS="100" TRANSPORTS="udp" SIZES="160" scripts/bench-turn.sh   # one case
#   PROFILE=1 KEEP_TMP=1 ...                    # also `perf record` mediagate at half rate (kept)
#   PROFILE=all KEEP_TMP=1 ...                  # `perf record -a` (whole machine) at half rate,
#                                               # for each server
#   STAT=1 ...                                  # also count both servers' syscalls and context
#                                               # switches per relayed packet at half rate
#   MG_BIN=path SKIP_BUILD=1 ...                # another mediagate build (A/B runs)
#   MG_THREADS=1 ...                            # turn.relay.threads (default 0: one per core)
#   MG_GSO=false ...                            # turn.relay.udp_gso (default true)
#   AT_MAX=1 ...                                # also both servers at coturn's highest lossless
#                                               # rate: p99 and loss of each there
#   DROPS=1 ...                                 # where the fixed-rate runs lost datagrams: UDP
#                                               # receive-buffer drops on the host (the servers'
#                                               # sockets) and in the generator's namespace, and
#                                               # the veths' own drop counters
#   SWEEPS=9 ...                                # each server's highest rate found 9 times, the
#                                               # servers alternating (who goes first too); the
#                                               # medians are kept and every value is listed
#                                               # (one sweep's result moves by up to 1.5x here)
#   SMOKE=1 scripts/bench-turn.sh               # seconds: 2 allocations, one fixed rate
#
# Topology: the generator in a network namespace of its own and the echo peer in another,
# each behind a veth pair whose namespace end computes
# UDP checksums in software (`ethtool -K tx off`), so datagrams reach the servers with full
# checksums as they do from a network (mediagate's kernel fast path leaves datagrams of
# local sockets, whose checksum is left to offload, to user space). Both servers listen on
# the clients' veth host address and relay from the peer veth's host address.
# mediagate runs with `turn.relay.offload: ebpf` (OFFLOAD=none: user space only).
# CPU per relayed packet is given twice: the server process's own, and the whole
# machine's (/proc/stat, all cores: generator, echo, softirq and server together), since
# what the kernel relays is not charged to the server process.
# Threads: mediagate's runtime uses every core (tokio's default); coturn runs with
# --relay-threads=$(nproc). The generator reports its own kernel drops and schedule lag:
# a trial where those are not zero measures the generator, not the server.
# The echo peer costs nothing by default (ECHO=xdp): an XDP program on the peer
# namespace's veth (scripts/bpf/xdp_reflect.c, as in bench-udp-netns.sh) sends every
# datagram straight back, so the table shows the servers' limits, not the peer's (a
# user-space echo saturates near 70k pps here). ECHO=socket: `mediagate-load echo` with
# two threads (its drops are reported as peer_drops). Without clang: socket.
# Needs root (ip netns, BPF), coturn's turnserver and ethtool (scripts/install-test-deps.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source "$ROOT/scripts/bench-common.sh"
[[ $(id -u) = 0 ]] || { echo "needs root (ip netns)" >&2; exit 2; }
command -v turnserver >/dev/null || { echo "turnserver missing: run scripts/install-test-deps.sh" >&2; exit 1; }
command -v ethtool >/dev/null || [[ -x /usr/sbin/ethtool ]] || { echo "ethtool missing: run scripts/install-test-deps.sh" >&2; exit 1; }
PATH=$PATH:/usr/sbin

if [[ $SMOKE = 1 ]]; then
    ALLOCS=${ALLOCS:-2}; TRANSPORTS=${TRANSPORTS:-"udp tcp"}; SIZES=${SIZES:-64}
    DURATION=${DURATION:-1s}; FIXED_RATE=${FIXED_RATE:-200}
fi
ALLOCS=${ALLOCS:-"1 100 1000"}
TRANSPORTS=${TRANSPORTS:-"udp tcp"}
SIZES=${SIZES:-"64 1200"}
DURATION=${DURATION:-2s}
MAX_LOSS=${MAX_LOSS:-0.005}
THREADS=${THREADS:-2}
PROFILE=${PROFILE:-0}
STAT=${STAT:-0}
FIXED_RATE=${FIXED_RATE:-}
# Both servers and the generator run at this nice level, so that other work on a shared
# machine (builds) disturbs the comparison less; same level for both servers.
NICE=${NICE:--10}
OFFLOAD=${OFFLOAD:-ebpf}
# turn.relay.threads: mediagate's UDP threads (0: one per core, as coturn's relay threads).
MG_THREADS=${MG_THREADS:-0}
MG_GSO=${MG_GSO:-true}
AT_MAX=${AT_MAX:-0}
SWEEPS=${SWEEPS:-1}
DROPS=${DROPS:-0}
ECHO=${ECHO:-xdp}
if [[ $ECHO = xdp ]] && ! command -v clang >/dev/null; then
    echo "clang not found: a user-space echo peer instead of the XDP reflector (ECHO=socket)" >&2
    ECHO=socket
fi

bench_init bench-turn
if [[ $SMOKE = 1 ]]; then
    [[ -n "${SKIP_BUILD:-}" ]] || cargo build --quiet --example turn_server
    MG_BIN=target/debug/examples/turn_server
else
    [[ -n "${SKIP_BUILD:-}" ]] || cargo build --release --quiet --example turn_server
    MG_BIN=${MG_BIN:-target/release/examples/turn_server}
fi
LOAD=$BIN/mediagate-load

NS=mgturn$$ CNS=mgturnc$$
VH=mgth$$ VP=mgtp$$ CH=mgtch$$ CP=mgtcp$$
N=$(($$ % 200 + 20))
HOST_IP=10.213.$N.1 PEER_IP=10.213.$N.2
SERVER_IP=10.214.$N.1 CLIENT_IP=10.214.$N.2
netns_cleanup() {
    ip netns del "$NS" 2>/dev/null || true; ip link del "$VH" 2>/dev/null || true
    ip netns del "$CNS" 2>/dev/null || true; ip link del "$CH" 2>/dev/null || true
}
trap 'bench_cleanup; netns_cleanup' EXIT
# veth_ns NS HOSTDEV NSDEV HOSTIP NSIP: a namespace behind a veth pair, software checksums.
veth_ns() {
    ip netns add "$1"
    ip link add "$2" type veth peer name "$3" netns "$1"
    ip addr add "$4/30" dev "$2"; ip link set "$2" up
    ip netns exec "$1" ip addr add "$5/30" dev "$3"
    ip netns exec "$1" ip link set "$3" up
    ip netns exec "$1" ip link set lo up
    ip netns exec "$1" ethtool -K "$3" tx off >/dev/null
}
veth_ns "$NS" "$VH" "$VP" "$HOST_IP" "$PEER_IP"
veth_ns "$CNS" "$CH" "$CP" "$SERVER_IP" "$CLIENT_IP"
if [[ $ECHO = xdp ]]; then
    # The reflector answers UDP ports 7000-7099 at the veth's XDP hook; the host end
    # needs an XDP program too (a veth takes XDP_TX frames only in NAPI mode).
    clang -O2 -g -target bpf -I/usr/include/"$(uname -m)"-linux-gnu -c scripts/bpf/xdp_reflect.c -o "$TMP/xdp_reflect.o"
    ip netns exec "$NS" ip link set dev "$VP" xdp obj "$TMP/xdp_reflect.o" sec xdp program reflect
    ip link set dev "$VH" xdp obj "$TMP/xdp_reflect.o" sec xdp program pass
    PEER=$PEER_IP:7000
    PEER_ARGS=()
else
    # Two echo threads: one saturates before either server does (the generator reports
    # the echo's own drops as peer_drops, so a trial limited by the peer shows).
    ip netns exec "$NS" nice -n "$NICE" "$LOAD" echo --listen "$PEER_IP:9000" --threads 2 --lifetime 30m >"$TMP/echo.out" 2>&1 &
    PIDS+=($!)
    PEER=$PEER_IP:9000
    PEER_ARGS=(--peer-pid "$!")
fi

free_port() { # a port free for UDP and TCP on the servers' address
    python3 - <<'EOF'
import socket, random
for _ in range(200):
    p = random.randrange(20000, 30000)
    try:
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            s = socket.socket(socket.AF_INET, kind); s.bind(("0.0.0.0", p)); s.close()
        print(p); break
    except OSError:
        pass
EOF
}

MG_PORT=$(free_port)
cat >"$TMP/mediagate.yaml" <<EOF
turn:
  realm: bench
  public_address: $SERVER_IP
  listeners:
    - { protocol: udp, listen: $SERVER_IP:$MG_PORT }
    - { protocol: tcp, listen: $SERVER_IP:$MG_PORT }
  auth:
    type: static
    users: [{ username: bench, password: bench }]
  relay:
    address: $HOST_IP
    port_range: 40000-44999
    peers: [$PEER_IP/32]
    offload: $OFFLOAD
    threads: $MG_THREADS
    udp_gso: $MG_GSO
  quota:
    allocations_per_user: 5000
EOF
RUST_LOG=warn nice -n "$NICE" "$MG_BIN" "$TMP/mediagate.yaml" >"$TMP/mediagate.out" 2>"$TMP/mediagate.err" &
MG_PID=$!
PIDS+=("$MG_PID")

CT_PORT=$(free_port)
nice -n "$NICE" turnserver -n --listening-ip="$SERVER_IP" --listening-port="$CT_PORT" --relay-ip="$HOST_IP" \
    --min-port=45000 --max-port=49999 --no-cli --no-dtls --no-tls \
    --relay-threads="$(nproc)" --realm=bench --lt-cred-mech --user=bench:bench \
    --total-quota=0 --user-quota=0 --max-bps=0 \
    --log-file=stdout --simple-log --no-stdout-log >"$TMP/coturn.out" 2>&1 &
CT_PID=$!
PIDS+=("$CT_PID")
for _ in $(seq 50); do
    ss -lnu | grep -q ":$MG_PORT " && ss -lnu | grep -q ":$CT_PORT " && break
    sleep 0.1
done
for p in "$MG_PID" "$CT_PID"; do
    kill -0 "$p" 2>/dev/null || { echo "a server failed to start; see $TMP" >&2; cat "$TMP"/*.err >&2; exit 1; }
done

# Drop counters, "name=value" each: UDP receive-buffer errors on the host (the servers'
# sockets; of them, the two servers' listener sockets apart) and in the generator's
# namespace, and every veth end's rx/tx drops (a veth in NAPI mode drops when its ring is
# full).
drop_counters() {
    local snmp='/^Udp: [0-9]/{print $6}'
    echo "host_udp_rcvbuf=$(awk "$snmp" /proc/net/snmp)"
    echo "gen_udp_rcvbuf=$(ip netns exec "$CNS" awk "$snmp" /proc/net/snmp)"
    # The listeners' own share (/proc/net/udp's last column, summed over a port's sockets).
    echo "mg_listener=$(awk -v p="$(printf ':%04X' "$MG_PORT")" 'NR > 1 && substr($2, length($2) - 4) == p { d += $NF } END { print d + 0 }' /proc/net/udp)"
    echo "ct_listener=$(awk -v p="$(printf ':%04X' "$CT_PORT")" 'NR > 1 && substr($2, length($2) - 4) == p { d += $NF } END { print d + 0 }' /proc/net/udp)"
    local d
    for d in "$VH" "$CH"; do
        echo "${d}_rx=$(cat "/sys/class/net/$d/statistics/rx_dropped")"
        echo "${d}_tx=$(cat "/sys/class/net/$d/statistics/tx_dropped")"
    done
    for d in "$VP:$NS" "$CP:$CNS"; do
        echo "${d%%:*}_rx=$(ip netns exec "${d#*:}" cat "/sys/class/net/${d%%:*}/statistics/rx_dropped")"
        echo "${d%%:*}_tx=$(ip netns exec "${d#*:}" cat "/sys/class/net/${d%%:*}/statistics/tx_dropped")"
    done
}
# drop_delta BEFORE AFTER: the counters that moved, "name=+N".
drop_delta() {
    join -t= <(sort <<<"$1") <(sort <<<"$2") | awk -F= '$3 != $2 { printf "%s=+%d ", $1, $3 - $2 } END { print "" }'
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Busy ticks of the whole machine (all cores; everything but idle and iowait).
machine_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
field() { tr ' ' '\n' <<<"$2" | sed -n "s/^$1=//p" | head -1; }

# gen PORT TRANSPORT ALLOCS SIZE ARGS...: one generator invocation; prints its last line.
gen() {
    local port=$1 tr=$2 n=$3 size=$4
    shift 4
    timeout 600 ip netns exec "$CNS" nice -n "$NICE" "$LOAD" turn --server "$SERVER_IP:$port" --peer "$PEER" --transport "$tr" \
        --allocations "$n" --size "$size" --threads "$THREADS" --duration "$DURATION" \
        "${PEER_ARGS[@]}" "$@" \
        2>>"$TMP/gen.err" | tail -1
}

# sweep NAME PORT TR N SIZE: highest rate under MAX_LOSS (packets/s sent).
sweep() {
    local line
    line=$(gen "$2" "$3" "$4" "$5" --max-loss "$MAX_LOSS" --start 10000 --steps 5)
    echo "$1 $3 n=$4 size=$5 $line" >>"$TMP/results.txt"
    field target_pps "$line"
}

# fixed NAME PORT PID TR N SIZE RATE: one run at RATE; prints
# "p50 p99 server_cpu_us_per_pkt loss machine_cpu_us_per_pkt".
fixed() {
    local name=$1 port=$2 pid=$3 c0 c1 m0 m1 line perf_pid="" stat_pid=""
    c0=$(cpu_ticks "$pid")
    m0=$(machine_ticks)
    if [[ $PROFILE = 1 && $name = mediagate ]]; then
        perf record -F 999 -g -p "$pid" -o "$TMP/perf-$4-$5-$6.data" >/dev/null 2>&1 &
        perf_pid=$!
    elif [[ $PROFILE = all ]]; then
        perf record -F 999 -g -a -o "$TMP/perf-all-$name-$4-$5-$6.data" >/dev/null 2>&1 &
        perf_pid=$!
    fi
    if [[ $STAT = 1 ]]; then
        perf stat -x, -e raw_syscalls:sys_enter,context-switches,cpu-migrations -p "$pid" \
            -o "$TMP/stat-$name-$4-$5-$6.csv" >/dev/null 2>&1 &
        stat_pid=$!
    fi
    local d0
    d0=$(drop_counters)
    line=$(gen "$port" "$4" "$5" "$6" --rate "$7")
    echo "$name $4 n=$5 size=$6 rate=$7 loss=$(field loss "$line") drops: $(drop_delta "$d0" "$(drop_counters)")" >>"$TMP/drops.txt"
    c1=$(cpu_ticks "$pid")
    m1=$(machine_ticks)
    [[ -z "$perf_pid" ]] || { kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true; }
    if [[ -n "$stat_pid" ]]; then
        kill -INT "$stat_pid"; wait "$stat_pid" 2>/dev/null || true
        python3 - "$TMP/stat-$name-$4-$5-$6.csv" "$line" "$name $4 n=$5 size=$6" >>"$TMP/stat.txt" <<'EOF'
import sys
kv = dict(x.split("=", 1) for x in sys.argv[2].split() if "=" in x)
relayed = int(kv.get("sent", 0)) + int(kv.get("received", 0)) or 1
counts = {}
for row in open(sys.argv[1]):
    f = row.strip().split(",")
    if len(f) > 2 and f[0].replace(".", "").isdigit():
        counts[f[2]] = float(f[0])
print(sys.argv[3], " ".join(f"{k}/pkt={v / relayed:.3f}" for k, v in counts.items()))
EOF
    fi
    echo "$name $4 n=$5 size=$6 fixed $line" >>"$TMP/results.txt"
    python3 - "$line" "$((c1 - c0))" "$(getconf CLK_TCK)" "$((m1 - m0))" <<'EOF'
import sys
kv = dict(x.split("=", 1) for x in sys.argv[1].split() if "=" in x)
ticks, hz, machine = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
relayed = int(kv.get("sent", 0)) + int(kv.get("received", 0))
cpu = ticks / hz * 1e6 / relayed if relayed else float("nan")
mcpu = machine / hz * 1e6 / relayed if relayed else float("nan")
print(kv.get("p50_us", "nan"), kv.get("p99_us", "nan"), f"{cpu:.2f}", kv.get("loss", "nan"), f"{mcpu:.2f}")
EOF
}

ratio() { python3 -c "a,b=float('$1' or 0),float('$2' or 0); print(f'{a/b:.2f}' if b>0 else 'n/a')"; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load: mediagate-load turn, $THREADS thread pairs, loss < $MAX_LOSS, trials of $DURATION; echo peer: $ECHO; mediagate relay offload: $OFFLOAD" | tee "$TMP/table.txt"
printf '%-5s %6s %5s | %10s %10s %6s | %9s %9s %6s | %8s %8s %6s | %8s %8s %6s\n' \
    tr allocs size mg_max_pps ct_max_pps ratio mg_p99_us ct_p99_us ratio mg_cpu_us ct_cpu_us ratio mg_all_us ct_all_us ratio | tee -a "$TMP/table.txt"
failed=0
for tr in $TRANSPORTS; do
    for n in $ALLOCS; do
        for size in $SIZES; do
            if [[ -n "$FIXED_RATE" ]]; then
                mg_max=$FIXED_RATE ct_max=$FIXED_RATE
            else
                mg_all_max=() ct_all_max=() ratios=()
                for ((r = 0; r < SWEEPS; r++)); do
                    if ((r % 2 == 0)); then
                        m=$(sweep mediagate "$MG_PORT" "$tr" "$n" "$size")
                        c=$(sweep coturn "$CT_PORT" "$tr" "$n" "$size")
                    else
                        c=$(sweep coturn "$CT_PORT" "$tr" "$n" "$size")
                        m=$(sweep mediagate "$MG_PORT" "$tr" "$n" "$size")
                    fi
                    # A sweep that found nothing (the generator failed: see gen.err) shows as "-".
                    mg_all_max+=("${m:--}") ct_all_max+=("${c:--}") ratios+=("$(ratio "$m" "$c")")
                done
                mg_max=$(median "${mg_all_max[@]}") ct_max=$(median "${ct_all_max[@]}")
                if ((SWEEPS > 1)); then
                    echo "  $SWEEPS sweeps ($tr n=$n size=$size): mediagate ${mg_all_max[*]}; coturn ${ct_all_max[*]}; paired ratios ${ratios[*]} (median $(median "${ratios[@]}")); medians below" | tee -a "$TMP/table.txt"
                fi
            fi
            half=$(( ${ct_max:-0} / 2 ))
            [[ $SMOKE = 1 ]] && half=$FIXED_RATE
            ((half > 0)) || half=1000
            read -r mg_p50 mg_p99 mg_cpu mg_loss mg_all < <(fixed mediagate "$MG_PORT" "$MG_PID" "$tr" "$n" "$size" "$half")
            read -r ct_p50 ct_p99 ct_cpu ct_loss ct_all < <(fixed coturn "$CT_PORT" "$CT_PID" "$tr" "$n" "$size" "$half")
            printf '%-5s %6s %5s | %10s %10s %6s | %9s %9s %6s | %8s %8s %6s | %8s %8s %6s\n' "$tr" "$n" "$size" \
                "$mg_max" "$ct_max" "$(ratio "$mg_max" "$ct_max")" \
                "$mg_p99" "$ct_p99" "$(ratio "$mg_p99" "$ct_p99")" \
                "$mg_cpu" "$ct_cpu" "$(ratio "$mg_cpu" "$ct_cpu")" \
                "$mg_all" "$ct_all" "$(ratio "$mg_all" "$ct_all")" | tee -a "$TMP/table.txt"
            if [[ $AT_MAX = 1 ]]; then
                # Both at coturn's highest lossless rate: is mediagate's p99 there no worse?
                read -r mp50 mp99 _ mloss _ < <(fixed mediagate "$MG_PORT" "$MG_PID" "$tr" "$n" "$size" "$ct_max")
                read -r cp50 cp99 _ closs _ < <(fixed coturn "$CT_PORT" "$CT_PID" "$tr" "$n" "$size" "$ct_max")
                echo "  at coturn's max ($ct_max pps): p99 us mediagate $mp99 (loss $mloss) coturn $cp99 (loss $closs) ratio $(ratio "$mp99" "$cp99")" | tee -a "$TMP/table.txt"
            fi
            if [[ $SMOKE = 1 ]]; then
                for r in "mediagate $mg_loss" "coturn $ct_loss"; do
                    read -r name loss <<<"$r"
                    if ! python3 -c "import sys; sys.exit(0 if float('$loss') < 0.2 else 1)" 2>/dev/null; then
                        echo "smoke: $name ($tr): loss $loss" >&2; failed=1
                    fi
                done
            fi
        done
    done
done
echo "half: fixed-rate runs at half of coturn's highest rate (p99 RTT; CPU per relayed packet: the server's own (cpu), the whole machine's (all))" | tee -a "$TMP/table.txt"
[[ $DROPS = 0 ]] || cat "$TMP/drops.txt"
if [[ $SMOKE = 1 ]]; then
    for name in mediagate coturn; do
        grep -q "^$name .* fixed .*received=[1-9]" "$TMP/results.txt" \
            || { echo "smoke: $name relayed nothing" >&2; failed=1; }
    done
    ((failed == 0)) || { cat "$TMP/results.txt" "$TMP/gen.err" >&2; exit 1; }
else
    cp "$TMP/results.txt" "$TMP/table.txt" /tmp/ 2>/dev/null || true
    [[ $STAT = 0 ]] || { cat "$TMP/stat.txt"; cp "$TMP/stat.txt" /tmp/ 2>/dev/null || true; }
    echo "every trial: /tmp/results.txt" >&2
fi
