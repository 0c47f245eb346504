# Shared by the benchmark scripts (sourced, not run): release binaries, a scratch
# directory whose background processes die with the script, and the nginx stream
# configuration every comparison uses (the same primary/backup pair as mediagate).

# bench_init NAME: builds the release binaries (unless SKIP_BUILD=1), sets BIN, TMP and
# PIDS, and kills every PID in PIDS and removes TMP on exit.
bench_init() {
  [[ -n "${SKIP_BUILD:-}" ]] || cargo build --release --quiet --bin mediagate --bin mediagate-load
  BIN=target/release
  TMP=$(mktemp -d "/tmp/$1.XXXXXX")
  PIDS=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
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
