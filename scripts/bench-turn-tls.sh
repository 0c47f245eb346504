#!/usr/bin/env bash
# TURN over TLS benchmark: the same turnutils_uclient load (uclient -t -S) against
# mediagate's TLS listener and coturn's, on this machine, in one run. Prints relayed
# packets per second, server CPU time per relayed packet, loss, and the mediagate/coturn
# ratios. (UDP and TCP at saturation are measured by scripts/bench-turn-tls.sh with
# `mediagate-load turn`, which does not speak TLS; this script keeps uclient for TLS.)
#
#   scripts/bench-turn-tls.sh                 # defaults below (TLS)
#   PROCS=4 CLIENTS=25 MSGS=2000 LEN=160 scripts/bench-turn-tls.sh
#   TRANSPORT=tcp scripts/bench-turn-tls.sh   # TURN over TCP instead of UDP
#   TRANSPORT=udp scripts/bench-turn-tls.sh   # the same uclient load over UDP
#   (TLS: uclient -t -S; both servers get
#                                         # the same self-signed P-256 certificate)
#
# TLS and coturn: turnutils_uclient reads TLS as one message per SSL_read, but coturn
# packs back-to-back responses and ChannelData into one TLS record under load, so
# uclient misreads them ("Wrong integrity in a message received from server", "received
# buffer have wrong length") and counts them lost although coturn relayed them (its
# session log says so). It is not the credentials: the same config relays without loss
# at -z 5, and over plain TCP at -z 0. So in TLS mode coturn runs with -v and its
# relayed packets are taken from its own per-session "peer usage" lines (server side);
# the rate is uclient's send rate scaled by relayed/sent, and uclient's parse loss is
# printed apart. mediagate writes one TLS record per message, so uclient's own counts hold.
#   PROFILE=1 scripts/bench-turn-tls.sh       # also `perf record` mediagate (perf.data in $OUT)
#   SMOKE=1 scripts/bench-turn-tls.sh         # seconds: 1 x 2 allocations x 50 messages, debug
#                                         # build, PROFILE=1 when perf works here
#
# Load: PROCS parallel turnutils_uclient processes, each with CLIENTS allocations over
# UDP or TCP (channels, no RTCP), each sending MSGS messages of LEN bytes as fast as uclient
# goes (-z 0) to a turnutils_peer echo on loopback. Every message is relayed twice
# (client -> peer, peer -> client), so relayed packets = sent + received.
# The rate is taken from uclient's per-second progress lines, between its first and its
# last second with traffic (uclient idles ~2 s while it allocates).
# Needs: coturn's turnserver, turnutils_uclient, turnutils_peer (scripts/install-test-deps.sh).
# Builds the `turn_server` example in release mode.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/scripts/bench-common.sh"
if [[ $SMOKE = 1 ]]; then
    PROCS=${PROCS:-1}; CLIENTS=${CLIENTS:-2}; MSGS=${MSGS:-50}; LEN=${LEN:-100}
    if [[ -z "${PROFILE:-}" ]]; then
        PROFILE=0
        if command -v perf >/dev/null 2>&1 && perf record -q -o /dev/null -- true >/dev/null 2>&1; then
            PROFILE=1
        else
            echo "perf is missing or not permitted here: smoke run without PROFILE" >&2
        fi
    fi
fi
PROCS=${PROCS:-4}
CLIENTS=${CLIENTS:-25}
MSGS=${MSGS:-2000}
LEN=${LEN:-160}
PROFILE=${PROFILE:-0}
TRANSPORT=${TRANSPORT:-tls}
case "$TRANSPORT" in
    udp) TFLAG="" ;;
    tcp) TFLAG="-t" ;;
    tls) TFLAG="-t -S" ;;
    *) echo "TRANSPORT must be udp, tcp or tls" >&2; exit 2 ;;
esac
# A smoke run removes its scratch directory (unless OUT names one); a real run keeps it.
OUT_AUTO=
if [[ -z "${OUT:-}" ]]; then
    OUT=$(mktemp -d /tmp/bench-turn-tls.XXXXXX)
    [[ $SMOKE = 1 ]] && OUT_AUTO=1
fi
mkdir -p "$OUT"

for t in turnserver turnutils_uclient turnutils_peer; do
    command -v "$t" >/dev/null || { echo "$t missing: run scripts/install-test-deps.sh" >&2; exit 1; }
done

if [[ $SMOKE = 1 ]]; then
    echo "building mediagate turn_server (debug, smoke run)..." >&2
    (cd "$ROOT" && cargo build --quiet --example turn_server)
    MG_BIN="$ROOT/target/debug/examples/turn_server"
else
    echo "building mediagate turn_server (release)..." >&2
    (cd "$ROOT" && cargo build --release --quiet --example turn_server)
    MG_BIN="$ROOT/target/release/examples/turn_server"
fi

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ -z "$OUT_AUTO" ]] || rm -rf "$OUT"
}
trap cleanup EXIT

free_port() { # a UDP+TCP port pair base nobody uses
    python3 - <<'EOF'
import socket, random
for _ in range(200):
    p = random.randrange(20000, 30000, 2)
    try:
        for q in (p, p + 1):
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                s = socket.socket(socket.AF_INET, kind); s.bind(("127.0.0.1", q)); s.close()
        print(p); break
    except OSError:
        pass
EOF
}

PEER_PORT=$(free_port)
turnutils_peer -L 127.0.0.1 -p "$PEER_PORT" >/dev/null 2>&1 &
PIDS+=($!)

# TLS: one certificate for both servers, on the second port of each pair.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj /CN=bench.test -keyout "$OUT/tls.key" -out "$OUT/tls.crt" >/dev/null 2>&1

MG_PORT=$(free_port)
cat >"$OUT/mediagate.yaml" <<EOF
turn:
  realm: bench
  public_address: 127.0.0.1
  listeners:
    - { protocol: udp, listen: 127.0.0.1:$MG_PORT }
    - { protocol: tcp, listen: 127.0.0.1:$MG_PORT }
    - { protocol: tls, listen: 127.0.0.1:$((MG_PORT + 1)), cert: $OUT/tls.crt, key: $OUT/tls.key }
  auth:
    type: static
    users: [{ username: bench, password: bench }]
  relay:
    address: 127.0.0.1
    port_range: 40000-44999
    peers: [127.0.0.1/32]
  # Every allocation of the load is the one user's (coturn runs with --user-quota=0,
  # no limit); the quota must be at least 1, so it is the load's size, with room.
  quota:
    allocations_per_user: $((2 * PROCS * CLIENTS))
EOF
RUST_LOG=warn "$MG_BIN" "$OUT/mediagate.yaml" >"$OUT/mediagate.out" 2>"$OUT/mediagate.err" &
MG_PID=$!
PIDS+=("$MG_PID")

CT_PORT=$(free_port)
CT_VERBOSE=
[[ $TRANSPORT = tls ]] && CT_VERBOSE=-v
turnserver -n $CT_VERBOSE --listening-ip=127.0.0.1 --listening-port="$CT_PORT" --relay-ip=127.0.0.1 \
    --min-port=45000 --max-port=49999 --allow-loopback-peers --no-cli --no-dtls \
    --tls-listening-port="$((CT_PORT + 1))" --cert="$OUT/tls.crt" --pkey="$OUT/tls.key" \
    --realm=bench --lt-cred-mech --user=bench:bench --total-quota=0 --user-quota=0 \
    --log-file=stdout --simple-log --no-stdout-log >"$OUT/coturn.out" 2>&1 &
CT_PID=$!
PIDS+=("$CT_PID")
sleep 1.5
for p in "$MG_PID" "$CT_PID"; do
    kill -0 "$p" 2>/dev/null || { echo "a server failed to start; see $OUT" >&2; exit 1; }
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run NAME PORT PID: the load against one server; prints "pps cpu_us_per_pkt lost sent"
run() {
    local name=$1 port=$2 pid=$3 i
    local t0 c0 c1 log_from
    c0=$(cpu_ticks "$pid")
    log_from=$(wc -l <"$OUT/coturn.out")
    local perf_pid=""
    if [ "$PROFILE" = 1 ] && [ "$name" = mediagate ]; then
        perf record -F 499 -g -p "$pid" -o "$OUT/perf.data" >/dev/null 2>&1 &
        perf_pid=$!
    fi
    for i in $(seq 1 "$PROCS"); do
        turnutils_uclient $TFLAG -p "$port" -e 127.0.0.1 -r "$PEER_PORT" -u bench -w bench -c \
            -m "$CLIENTS" -n "$MSGS" -l "$LEN" -z 0 127.0.0.1 >"$OUT/$name.$i.log" 2>&1 &
    done
    wait $(jobs -p | tail -n "$PROCS")
    c1=$(cpu_ticks "$pid")
    if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true; fi
    # coturn over TLS: what it relayed, from its session log (sessions end with uclient).
    local server_relayed=-1
    if [[ $TRANSPORT = tls && $name = coturn ]]; then
        sleep 2
        server_relayed=$(tail -n "+$((log_from + 1))" "$OUT/coturn.out" | grep -a 'peer usage:' |
            sed -E 's/.* rp=([0-9]+),.* sp=([0-9]+),.*/\1 \2/' | awk '{s += $1 + $2} END {print s + 0}')
    fi
    python3 - "$OUT" "$name" "$PROCS" "$((c1 - c0))" "$(getconf CLK_TCK)" "$server_relayed" <<'EOF'
import re, sys
out, name, procs, ticks, hz = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
server_relayed = int(sys.argv[6])
rate = relayed = lost = sent = send_rate = 0.0
for i in range(1, procs + 1):
    prog, total = [], None
    for line in open(f"{out}/{name}.{i}.log", errors="replace"):
        m = re.match(r"(\d+): : start_mclient: msz=\d+, tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", line)
        if m:
            prog.append(tuple(int(x) for x in m.groups()))
        m = re.match(r"\d+: : start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", line)
        if m:
            total = tuple(int(x) for x in m.groups())
    if total is None:
        sys.exit(f"{name}.{i}: uclient did not finish (see {out}/{name}.{i}.log)")
    sent += total[0]
    lost += total[0] - total[1]
    relayed += total[0] + total[1]
    busy = [p for p in prog if p[1] > 0]
    if len(busy) >= 2 and busy[-1][0] > busy[0][0]:
        (t0, s0, r0), (t1, s1, r1) = busy[0], busy[-1]
        rate += ((s1 - s0) + (r1 - r0)) / (t1 - t0)
        send_rate += (s1 - s0) / (t1 - t0)
if server_relayed >= 0 and sent:
    # The server's own count (both directions); uclient's receive count is not reliable.
    print(f"{name}: server relayed {server_relayed} packets for {sent:.0f} sent; uclient parsed {relayed - sent:.0f} of them back", file=sys.stderr)
    rate = send_rate * server_relayed / sent
    lost = max(0.0, 2 * sent - server_relayed)
    relayed = server_relayed
cpu_us = ticks / hz * 1e6 / relayed if relayed else float("nan")
print(f"{rate:.0f} {cpu_us:.2f} {lost:.0f} {sent:.0f}")
EOF
}

echo "load: $PROCS x turnutils_uclient $TFLAG -m $CLIENTS -n $MSGS -l $LEN -z 0 ($TRANSPORT, channels)" >&2
OFF=0
[[ $TRANSPORT = tls ]] && OFF=1
read -r MG_PPS MG_CPU MG_LOST MG_SENT < <(run mediagate "$((MG_PORT + OFF))" "$MG_PID")
read -r CT_PPS CT_CPU CT_LOST CT_SENT < <(run coturn "$((CT_PORT + OFF))" "$CT_PID")

smoke_require "mediagate relayed messages" "$MG_SENT"
smoke_require "coturn relayed messages" "$CT_SENT"
# A smoke run is too short for a rate (uclient reports once a second): it checks that
# both servers relayed the load back, nearly all of it.
if [[ $SMOKE = 1 ]]; then
    for r in "mediagate $MG_SENT $MG_LOST" "coturn $CT_SENT $CT_LOST"; do
        read -r name sent lost <<<"$r"
        if ((sent == 0 || lost * 10 > sent)); then
            echo "smoke: $name: $sent messages sent, $lost lost" >&2
            exit 1
        fi
    done
fi
printf '%-10s %14s %16s %10s %10s\n' server relayed_pps cpu_us_per_pkt sent lost
printf '%-10s %14s %16s %10s %10s\n' mediagate "$MG_PPS" "$MG_CPU" "$MG_SENT" "$MG_LOST"
printf '%-10s %14s %16s %10s %10s\n' coturn "$CT_PPS" "$CT_CPU" "$CT_SENT" "$CT_LOST"
python3 -c "
mg, ct = float('$MG_PPS'), float('$CT_PPS')
mc, cc = float('$MG_CPU'), float('$CT_CPU')
r = lambda a, b: f'{a / b:.2f}x' if b > 0 else 'n/a'
print(f'ratio mediagate/coturn: throughput {r(mg, ct)}, CPU per packet {r(mc, cc)}')
"
if [ "$PROFILE" = 1 ]; then
    smoke_require "perf samples" "$(perf report -i "$OUT/perf.data" --stdio 2>/dev/null | grep -m1 -E '^ +[0-9]' || true)"
    echo "profile: perf report -i $OUT/perf.data --no-children --sort symbol" >&2
fi
echo "logs: $OUT" >&2
