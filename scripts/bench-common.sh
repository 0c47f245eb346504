# Shared by the benchmark scripts (sourced, not run): release binaries, a scratch
# directory whose background processes die with the script, and the nginx stream
# configuration every comparison uses (the same primary/backup pair as mediagate).

# SMOKE=1 (every benchmark script): a few seconds at tiny sizes with the debug binaries
# the test suite builds anyway, to prove the script still runs end to end (peers, config,
# load, parsing); scripts/test-bench-smoke.sh runs them all so. The numbers mean nothing.
SMOKE=${SMOKE:-0}

# bench_init NAME: builds the binaries (release; debug with SMOKE=1; none with
# SKIP_BUILD=1), sets BIN, TMP and PIDS, and kills every PID in PIDS and removes TMP on
# exit.
bench_init() {
  if [[ $SMOKE = 1 ]]; then
    [[ -n "${SKIP_BUILD:-}" ]] || cargo build --quiet --bin mediagate --bin mediagate-load
    BIN=target/debug
  else
    [[ -n "${SKIP_BUILD:-}" ]] || cargo build --release --quiet --bin mediagate --bin mediagate-load
    BIN=target/release
  fi
  TMP=$(mktemp -d "/tmp/$1.XXXXXX")
  PIDS=()
  trap bench_cleanup EXIT
}

# wait_ready PORT [LOG]: waits up to 10 s for mediagate's /readyz on 127.0.0.1:PORT (in
# the current network namespace); on failure prints LOG and exits 1.
wait_ready() {
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "mediagate not ready on 127.0.0.1:$1" >&2
  [[ -z "${2:-}" ]] || cat "$2" >&2
  exit 1
}

bench_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ "${KEEP_TMP:-0}" = 1 ]]; then
    echo "kept: $TMP" >&2
  else
    rm -rf "$TMP"
  fi
}

# find_nginx: sets NGINX and STREAM_MOD, or exits 2 naming the missing package.
find_nginx() {
  NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
  STREAM_MOD=${STREAM_MOD:-/usr/lib/nginx/modules/ngx_stream_module.so}
  [[ -x $NGINX ]] || { echo "nginx not found (apt-get install nginx-light libnginx-mod-stream)" >&2; exit 2; }
  [[ -f $STREAM_MOD ]] || { echo "nginx stream module not found: $STREAM_MOD" >&2; exit 2; }
}

# nginx_stream_conf FILE LISTEN_ARGS [SERVER_LINES]: nginx stream in front of
# 127.0.0.1:$PRIMARY with 127.0.0.1:$BACKUP as `backup`, listening on
# 127.0.0.1:$NGINX_PORT LISTEN_ARGS, WORKERS worker processes.
nginx_stream_conf() {
  cat >"$1" <<CONF
load_module $STREAM_MOD;
worker_processes $WORKERS;
worker_rlimit_nofile 20000;
daemon off;
pid $TMP/nginx.pid;
error_log $TMP/nginx-error.log warn;
events { worker_connections 9000; }
stream {
  upstream media {
    server 127.0.0.1:$PRIMARY;
    server 127.0.0.1:$BACKUP backup;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT $2;
    proxy_pass media;
    ${3:-}
  }
}
CONF
}

# smoke_require WHAT VALUE: with SMOKE=1, fails the script when a measurement came out
# empty (a peer that did not start, a load that did not run, output no longer parsed).
smoke_require() {
  if [[ $SMOKE = 1 && ( -z "${2:-}" || "${2:-}" = - ) ]]; then
    echo "smoke: no $1 measured" >&2
    exit 1
  fi
}

# median VALUE...: the median of the numeric values (anything else, such as "-" for a
# measurement that failed or "n/a", is left out); prints nothing when none is numeric.
median() {
  printf '%s\n' "$@" | grep -E '^-?[0-9.]+([eE][-+]?[0-9]+)?$' | sort -g \
    | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'
}
