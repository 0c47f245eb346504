#!/usr/bin/env bash
# Runs every benchmark and profiling script in smoke mode (SMOKE=1: seconds, tiny sizes,
# debug binaries, the same peers: nginx, haproxy, coturn, perf), so that a script that no
# longer works fails the test suite instead of waiting to be found. About 50 s on two
# cores once the debug binaries are built. Needs what scripts/install-test-deps.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --quiet --bins --example turn_server
export SMOKE=1 SKIP_BUILD=1
failed=()
# The peers and servers the scripts start; none may outlive its script.
PEERS='^(nginx|haproxy|turnserver|mediagate|mediagate-load|turn_server)$'
peers() { ps -e -o stat=,comm= | awk '$1 !~ /^Z/ { print $2 }' | grep -c -E "$PEERS" || true; }
peers_before=$(peers)
total=$SECONDS
run() { # NAME COMMAND...
  local name=$1 t=$SECONDS log
  shift
  log=$(mktemp /tmp/bench-smoke.XXXXXX)
  if "$@" >"$log" 2>&1; then
    echo "bench smoke: $name ok ($((SECONDS - t)) s)"
  else
    echo "bench smoke: $name FAILED ($((SECONDS - t)) s); its output:"
    sed 's/^/    /' "$log"
    failed+=("$name")
  fi
  rm -f "$log"
}
run bench-udp scripts/bench-udp.sh
run bench-udp-join env JOIN=1 RT=all SLOW=1000 scripts/bench-udp.sh
run bench-udp-netns scripts/bench-udp-netns.sh
run bench-udp-netns-sessions env MODE=sessions scripts/bench-udp-netns.sh
run bench-tcp scripts/bench-tcp.sh
run bench-sessions scripts/bench-sessions.sh
run profile-udp scripts/profile-udp.sh
run bench-turn env DROPS=1 scripts/bench-turn.sh
run bench-turn-tls scripts/bench-turn-tls.sh
run bench-failover scripts/bench-failover.sh
echo "bench smoke: $((SECONDS - total)) s in all"
if (($(peers) > peers_before)); then
  echo "bench smoke: processes left behind by the scripts:" >&2
  ps -e -o pid=,stat=,comm=,args= | awk -v re="$PEERS" '$2 !~ /^Z/ && $3 ~ re' >&2
  failed+=("leftover-processes")
fi
if ((${#failed[@]})); then
  echo "bench smoke: failed: ${failed[*]}" >&2
  exit 1
fi
