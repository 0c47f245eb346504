#!/usr/bin/python3
"""The example's application server: what a Janus application adds so that a viewer's
call survives a node failure behind mediagate.

It serves the viewer page (index.html, with janus.js and adapter.js from Debian's
libjs-janus-gateway and libjs-webrtc-adapter) and follows mediagate's `GET /events`:

- on a `failover` (or `failback`) that moves the upstream the Janus sessions live on
  (`--session-upstream`, the Janus HTTP API), it tells every page to re-create its Janus
  session and handle at once (Server-Sent Events on `/updates`): the sessions on the old
  node are gone with it, and the page's next request already reaches the new node;
- on a move of the media upstream (`--media-upstream`, where the publisher's RTP goes) it
  asks the publisher for a keyframe, so the new node has a picture to give viewers;
- on `all_down` nothing moved (mediagate kept the last servers), so nothing is re-created;
- after a reconnect it resumes with `Last-Event-ID`; when mediagate answers with a
  `reset` (the history no longer reaches back, or another replica answered), it reads
  `/status` and re-creates if the active node changed meanwhile.

Only the Python standard library. Every page report (`POST /report`) is printed as one
JSON line on stdout (the test reads them), and snapshots a page sends are saved as PNG
files in `--shots`.

    app.py --listen 127.0.0.1:8090 --admin http://127.0.0.1:9090 --events-token T \
           --janus http://127.0.0.1:8088/janus --publisher http://127.0.0.1:8091
"""

import argparse
import base64
import http.server
import json
import os
import queue
import sys
import threading
import time
import urllib.parse
import urllib.request

JANUS_JS = "/usr/share/javascript/janus-gateway/janus.js"
ADAPTER_JS = "/usr/share/javascript/webrtc-adapter/adapter.js"
HERE = os.path.dirname(os.path.abspath(__file__))


LOG_LOCK = threading.Lock()


def log(what, **fields):
    """One JSON object per line on stdout, written whole: the event thread and the
    request threads log at the same moments, and print()'s separate writes of a line and
    its newline would interleave two lines into one that no reader can parse."""
    fields["log"] = what
    fields["t"] = time.time()
    line = json.dumps(fields) + "\n"
    with LOG_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


class Pages:
    """The open `/updates` streams: one queue per page, fed by broadcast()."""

    def __init__(self):
        self.lock = threading.Lock()
        self.queues = set()

    def add(self):
        q = queue.Queue(maxsize=64)
        with self.lock:
            self.queues.add(q)
        return q

    def remove(self, q):
        with self.lock:
            self.queues.discard(q)

    def broadcast(self, msg):
        with self.lock:
            targets = list(self.queues)
        for q in targets:
            try:
                q.put_nowait(msg)
            except queue.Full:
                pass  # a stuck page misses it; it reconnects and re-creates anyway
        return len(targets)


class App:
    def __init__(self, args):
        self.args = args
        self.pages = Pages()
        self.last_id = None
        self.active = {}  # upstream -> list of active servers, from /status after a reset

    # ---- mediagate ---------------------------------------------------------------
    def admin_get(self, path, token):
        req = urllib.request.Request(self.args.admin + path)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.load(r)

    def ice(self):
        token = self.args.ice_token or self.args.events_token
        return self.admin_get("/ice?username=viewer", token)

    def active_of(self, status, name):
        for up in status.get("upstreams", []):
            if up.get("name") == name:
                return up.get("active", [])
        return []

    def keyframe(self):
        if not self.args.publisher:
            return
        try:
            req = urllib.request.Request(self.args.publisher + "/keyframe", method="POST")
            urllib.request.urlopen(req, timeout=2).close()
        except OSError as e:
            log("publisher_error", error=str(e))

    def moved(self, ev):
        """Upstreams an event moved: the event's own, or each of a node group's."""
        ups = ev.get("upstreams")
        if isinstance(ups, list) and ups:
            return {u.get("upstream") for u in ups}
        return {ev.get("upstream")}

    def on_event(self, ev):
        kind = ev.get("kind")
        log("event", kind=kind, seq=ev.get("seq"), event_at=ev.get("at"),
            upstreams=sorted(u for u in self.moved(ev) if u))
        if kind in ("failover", "failback"):
            moved = self.moved(ev)
            # Pages first: the keyframe request waits for the publisher's answer.
            if self.args.session_upstream in moved:
                n = self.pages.broadcast({"type": "recreate", "kind": kind,
                                          "from": ev.get("from"), "to": ev.get("to"),
                                          "seq": ev.get("seq")})
                log("recreate", kind=kind, pages=n, seq=ev.get("seq"), event_at=ev.get("at"),
                    reason=ev.get("reason"), frm=ev.get("from"), to=ev.get("to"))
            if self.args.media_upstream in moved:
                self.keyframe()
        elif kind == "all_down":
            # mediagate keeps the last servers: sessions still work, nothing to re-create.
            log("all_down", upstream=ev.get("upstream"), seq=ev.get("seq"))
        elif kind == "reset":
            self.resync()

    def resync(self):
        """After a `reset`: compare the active servers with the last ones known."""
        try:
            status = self.admin_get("/status", self.args.events_token)
        except OSError as e:
            log("status_error", error=str(e))
            return
        name = self.args.session_upstream
        now = self.active_of(status, name)
        before = self.active.get(name)
        self.active[name] = now
        if before is not None and before != now:
            n = self.pages.broadcast({"type": "recreate", "kind": "reset", "to": now})
            log("recreate", kind="reset", pages=n, to=now)
            self.keyframe()

    def follow_events(self):
        """Reads /events for ever, reconnecting with Last-Event-ID."""
        while True:
            try:
                self.active[self.args.session_upstream] = self.active_of(
                    self.admin_get("/status", self.args.events_token),
                    self.args.session_upstream)
                req = urllib.request.Request(self.args.admin + "/events")
                req.add_header("Accept", "text/event-stream")
                if self.args.events_token:
                    req.add_header("Authorization", f"Bearer {self.args.events_token}")
                if self.last_id:
                    req.add_header("Last-Event-ID", self.last_id)
                with urllib.request.urlopen(req, timeout=60) as r:
                    log("events_connected", last_id=self.last_id)
                    data = []
                    for raw in r:
                        line = raw.decode("utf-8", "replace").rstrip("\r\n")
                        if line.startswith("id:"):
                            self.last_id = line[3:].strip()
                        elif line.startswith("data:"):
                            data.append(line[5:].strip())
                        elif line == "" and data:
                            try:
                                ev = json.loads("\n".join(data))
                            except ValueError:
                                ev = None
                            data = []
                            if isinstance(ev, dict):
                                self.on_event(ev)
            except Exception as e:  # noqa: BLE001 - any failure: reconnect
                log("events_disconnected", error=str(e))
            time.sleep(0.2)


def make_handler(app):
    args = app.args

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def send_body(self, code, ctype, body, extra=()):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def send_file(self, path, ctype):
            try:
                with open(path, "rb") as f:
                    body = f.read()
            except OSError:
                self.send_body(404, "text/plain", b"missing: " + path.encode())
                return
            self.send_body(200, ctype, body)

        def do_GET(self):
            path = urllib.parse.urlsplit(self.path).path
            if path == "/":
                self.send_file(os.path.join(HERE, "index.html"), "text/html; charset=utf-8")
            elif path == "/janus.js":
                self.send_file(JANUS_JS, "text/javascript")
            elif path == "/adapter.js":
                self.send_file(ADAPTER_JS, "text/javascript")
            elif path == "/config":
                try:
                    ice = app.ice()
                except OSError as e:
                    self.send_body(502, "text/plain", f"mediagate /ice: {e}".encode())
                    return
                cfg = {"janus": args.janus, "mountpoint": args.mountpoint,
                       "iceServers": ice.get("iceServers", []),
                       "iceTransportPolicy": ice.get("iceTransportPolicy", "relay")}
                self.send_body(200, "application/json", json.dumps(cfg).encode())
            elif path == "/updates":
                self.updates()
            else:
                self.send_body(404, "text/plain", b"not found")

        def updates(self):
            q = app.pages.add()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(b": hello\n\n")
                self.wfile.flush()
                while True:
                    try:
                        msg = q.get(timeout=15)
                        self.wfile.write(f"data: {json.dumps(msg)}\n\n".encode())
                    except queue.Empty:
                        self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
            except OSError:
                pass
            finally:
                app.pages.remove(q)
                self.close_connection = True

        def read_json(self):
            n = int(self.headers.get("Content-Length") or 0)
            if n > 4 << 20:
                raise ValueError("body too large")
            return json.loads(self.rfile.read(n) or b"{}")

        def do_POST(self):
            path = urllib.parse.urlsplit(self.path).path
            if path == "/keyframe":
                app.keyframe()
                self.send_body(204, "text/plain", b"")
            elif path == "/report":
                try:
                    rep = self.read_json()
                except ValueError:
                    self.send_body(400, "text/plain", b"bad JSON")
                    return
                png = rep.pop("png", None)
                if png and args.shots and rep.get("shot"):
                    name = "".join(c for c in rep["shot"] if c.isalnum() or c in "-_")
                    data = base64.b64decode(png.split(",", 1)[-1])
                    with open(os.path.join(args.shots, name + ".png"), "wb") as f:
                        f.write(data)
                log("report", **rep)
                self.send_body(204, "text/plain", b"")
            elif path == "/shot":
                # Asks every page for a snapshot of its video (the test uses it).
                name = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get(
                    "name", ["shot"])[0]
                n = app.pages.broadcast({"type": "shot", "name": name})
                self.send_body(200, "application/json", json.dumps({"pages": n}).encode())
            else:
                self.send_body(404, "text/plain", b"not found")

    return Handler


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", default="127.0.0.1:8090")
    ap.add_argument("--admin", required=True, help="mediagate's admin API base URL")
    ap.add_argument("--events-token", default=os.environ.get("MEDIAGATE_EVENTS_TOKEN"),
                    help="admin.events_token (or the admin token)")
    ap.add_argument("--ice-token", default=os.environ.get("MEDIAGATE_ICE_TOKEN"),
                    help="turn.ice.token (default: the events token)")
    ap.add_argument("--janus", required=True,
                    help="the Janus HTTP API as pages reach it: mediagate's TCP listener")
    ap.add_argument("--publisher", help="the publisher's control URL (keyframes)")
    ap.add_argument("--session-upstream", default="janus-api")
    ap.add_argument("--media-upstream", default="janus-rtp")
    ap.add_argument("--mountpoint", type=int, default=1)
    ap.add_argument("--shots", help="directory for page snapshots")
    args = ap.parse_args()

    app = App(args)
    threading.Thread(target=app.follow_events, daemon=True).start()
    host, port = args.listen.rsplit(":", 1)
    server = http.server.ThreadingHTTPServer((host, int(port)), make_handler(app))
    server.daemon_threads = True
    log("listening", listen=args.listen)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
