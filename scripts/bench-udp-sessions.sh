# Sourced by scripts/bench-udp-netns.sh with MODE=sessions (not run on its own; see there):
# does the fast path's cost per datagram stay flat as its session map fills? For each
# count in SESSIONS (ascending) it fills mediagate's `mg_flows` up to that many sessions
# and measures, at RATE datagrams/s of 64 B over LIVE live flows, the CPU per round trip
# (median of ROUNDS runs) of the fast path, and of the direct path as a reference (the
# program also looks up every datagram of the direct path, and misses).
#
# The sessions beyond the live flows are synthetic: two entries each, keyed by source
# addresses in 10.100.0.0/14 that no datagram carries, written with `bpftool batch`.
# Real sessions cannot go that far here: a session holds a socket and a process may hold
# only 20000 descriptors on these machines (see scripts/bench-sessions.sh).

# The flow map of our mediagate: the BPF map descriptor in its fdinfo shaped like mg_flows.
flows_map_id() {
  local f
  for f in /proc/"$MG_PID"/fdinfo/*; do
    # (mg_turn_peer has the same key and value; mg_flows is the large one.)
    if grep -q '^key_size:[[:space:]]*12$' "$f" 2>/dev/null && grep -q '^value_size:[[:space:]]*64$' "$f" 2>/dev/null &&
        grep -q '^max_entries:[[:space:]]*262144$' "$f" 2>/dev/null; then
      sed -n 's/^map_id:[[:space:]]*//p' "$f"
      return
    fi
  done
}
MAP_ID=$(flows_map_id)
[[ -n $MAP_ID ]] || { echo "no fast-path flow map in mediagate $MG_PID" >&2; exit 1; }
command -v bpftool >/dev/null || PATH=$PATH:/usr/sbin
# fill FROM TO: synthetic entries FROM..TO-1 (two per session).
fill() {
  awk -v id="$MAP_ID" -v from="$1" -v to="$2" 'BEGIN {
    zero = ""; for (i = 0; i < 64; i++) zero = zero " 00"
    for (j = from; j < to; j++)
      printf "map update id %d key hex 0a %02x %02x %02x 0a 4d 01 01 00 01 1b 76 value hex%s\n",
        id, 100 + int(j / 65536), int(j / 256) % 256, j % 256, zero
  }' >"$TMP/fill.batch"
  bpftool batch file "$TMP/fill.batch" >/dev/null
}
declare -A SCOST SP99 DCOST
entries=0
for n in $SESSIONS; do
  want=$((2 * (n > LIVE ? n - LIVE : 0)))
  t0=$SECONDS
  if ((want > entries)); then fill "$entries" "$want"; entries=$want; fi
  say "sessions=$n: $entries synthetic entries in the map (filled in $((SECONDS - t0)) s)"
  fc=""; fp=""; dc=""
  for ((r = 0; r < ROUNDS; r++)); do
    if ((SECONDS > DEADLINE)); then say "time budget spent; stopping"; break 2; fi
    line=$(measure fast "$LIVE" 64 "$RATE")
    say "fast sessions=$n (round $((r + 1))): $line"
    fc+=" $(field cpu_us_per_rt "$line")"; fp+=" $(field p99_us "$line")"
    line=$(measure direct "$LIVE" 64 "$RATE")
    say "direct sessions=$n (round $((r + 1))): $line"
    dc+=" $(field cpu_us_per_rt "$line")"
  done
  SCOST[$n]=$(median $fc); SP99[$n]=$(median $fp); DCOST[$n]=$(median $dc)
done
{
  echo
  echo "| sessions in the fast path's map | map entries | fast path: CPU µs per round trip | fast path p99 µs | direct path: CPU µs per round trip |"
  echo "|---:|---:|---:|---:|---:|"
  for n in $SESSIONS; do
    echo "| $n | $((2 * n)) | ${SCOST[$n]:--} | ${SP99[$n]:--} | ${DCOST[$n]:--} |"
  done
  echo
  echo "$LIVE live flows of 64 B at $RATE datagrams/s, median of $ROUNDS runs of $LAT; the other sessions are synthetic map entries (echo: $ECHO; pinned: $PIN)."
} | tee "${OUT:-/dev/null}"
for n in $SESSIONS; do smoke_require "fast path CPU with $n sessions" "${SCOST[$n]:-}"; done
