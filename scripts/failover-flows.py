#!/usr/bin/env python3
"""Flows for scripts/bench-failover.sh: N clients through a load balancer to the
testkit's echo workers, each sending every INTERVAL seconds, for DURATION seconds.

UDP: one socket per flow; every datagram is answered `NAME|payload` by whichever worker
got it. TCP: one connection per flow; the worker says `NAME|` first, then echoes; a
closed or reset connection is re-opened at once (as a client would).

Prints one JSON object: datagrams/messages sent and answered, answers per worker, and
the worst gap between two answers any flow saw (ms).
"""
import argparse
import json
import selectors
import socket
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("proto", choices=["udp", "tcp"])
    ap.add_argument("target")
    ap.add_argument("--flows", type=int, default=20)
    ap.add_argument("--interval", type=float, default=0.02)
    ap.add_argument("--duration", type=float, default=10.0)
    a = ap.parse_args()
    host, port = a.target.rsplit(":", 1)
    addr = (host, int(port))
    sel = selectors.DefaultSelector()
    flows = []
    for i in range(a.flows):
        flows.append({"sock": None, "next": time.monotonic() + a.interval * i / a.flows,
                      "last": None, "gap": 0.0, "buf": b""})
    by_worker = {}
    sent = answered = 0

    def open_flow(f):
        if f["sock"] is not None:
            try:
                sel.unregister(f["sock"])
            except (KeyError, ValueError):
                pass
            f["sock"].close()
        if a.proto == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.connect(addr)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(1.0)
            try:
                s.connect(addr)
            except OSError:
                s.close()
                f["sock"] = None
                return
        s.setblocking(False)
        f["sock"] = s
        f["buf"] = b""
        f.pop("worker", None)  # a new connection says which worker it reached
        sel.register(s, selectors.EVENT_READ, f)

    def answer(f, worker):
        nonlocal answered
        now = time.monotonic()
        if f["last"] is not None:
            f["gap"] = max(f["gap"], now - f["last"])
        f["last"] = now
        answered += 1
        by_worker[worker] = by_worker.get(worker, 0) + 1

    for f in flows:
        open_flow(f)
    end = time.monotonic() + a.duration
    while True:
        now = time.monotonic()
        if now >= end:
            break
        for f in flows:
            if now >= f["next"]:
                f["next"] += a.interval
                if f["sock"] is None:
                    open_flow(f)
                    if f["sock"] is None:
                        continue
                try:
                    f["sock"].send(b"x" * 16 if a.proto == "udp" else b"x")
                    sent += 1
                except OSError:
                    if a.proto == "tcp":
                        open_flow(f)
        timeout = max(0.0, min(f["next"] for f in flows) - time.monotonic())
        for key, _ in sel.select(timeout):
            f = key.data
            try:
                data = f["sock"].recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if a.proto == "udp":
                if data:
                    answer(f, data.split(b"|", 1)[0].decode(errors="replace"))
                continue
            if not data:
                open_flow(f)  # closed or reset: reconnect, as a client would
                continue
            f["buf"] += data
            if b"|" in f["buf"] and "worker" not in f:
                f["worker"] = f["buf"].split(b"|", 1)[0].decode(errors="replace")
                f["buf"] = f["buf"].split(b"|", 1)[1]
            if "worker" in f:
                for _ in range(f["buf"].count(b"x")):
                    answer(f, f["worker"])
                f["buf"] = b""
    print(json.dumps({
        "sent": sent,
        "answered": answered,
        "by_worker": by_worker,
        "worst_gap_ms": round(max(f["gap"] for f in flows) * 1000, 1),
    }))


if __name__ == "__main__":
    main()
