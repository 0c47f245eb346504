#!/usr/bin/python3
"""The example's publisher: a live VP8 test picture sent as RTP to mediagate's UDP
listener, which forwards it to the streaming mountpoint of whichever Janus node is active.

It makes a keyframe when asked (`POST /keyframe` on its control port), so a viewer that
re-joins on the other node after a failover sees a picture at once instead of waiting for
the next scheduled keyframe (one every 10 s here, as a camera or an encoder tuned for
bandwidth would send). The app server asks on every failover and when a viewer's new
PeerConnection is up. This is what an RTCP PLI from the viewer would do on a direct path;
Janus's RTP mountpoints only relay PLI to a source that sends RTCP from a known port, and
behind a load balancer that port belongs to mediagate.

Needs Debian's python3-gi, gir1.2-gstreamer-1.0, gir1.2-gst-plugins-base-1.0 and
gstreamer1.0-plugins-{base,good}.

    publisher.py --rtp 127.0.0.1:5004 --control 127.0.0.1:8091
"""

import argparse
import http.server
import threading

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstVideo", "1.0")
from gi.repository import GLib, Gst, GstVideo  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtp", required=True, help="host:port to send RTP to (mediagate)")
    ap.add_argument("--control", required=True, help="host:port of the control API")
    ap.add_argument("--fps", type=int, default=30)
    args = ap.parse_args()
    host, port = args.rtp.rsplit(":", 1)

    Gst.init(None)
    pipeline = Gst.parse_launch(
        f"videotestsrc is-live=true pattern=ball ! "
        f"video/x-raw,width=320,height=240,framerate={args.fps}/1 ! "
        f"vp8enc name=enc deadline=1 cpu-used=8 target-bitrate=300000 "
        f"keyframe-max-dist={10 * args.fps} error-resilient=partitions ! "
        f"rtpvp8pay pt=100 mtu=1200 picture-id-mode=15-bit ! "
        f"udpsink host={host} port={port} sync=false async=false"
    )
    enc = pipeline.get_by_name("enc")
    keyframes = [0]

    def force_keyframe():
        # An upstream force-key-unit event on the encoder's source pad: the next frame
        # it encodes is a keyframe.
        ev = GstVideo.video_event_new_upstream_force_key_unit(
            Gst.CLOCK_TIME_NONE, True, keyframes[0]
        )
        enc.get_static_pad("src").send_event(ev)
        keyframes[0] += 1
        return False

    class Control(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            if self.path != "/keyframe":
                self.send_error(404)
                return
            GLib.idle_add(force_keyframe)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    chost, cport = args.control.rsplit(":", 1)
    server = http.server.ThreadingHTTPServer((chost, int(cport)), Control)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    pipeline.set_state(Gst.State.PLAYING)
    print(f"publishing VP8 RTP to {args.rtp}, control on {args.control}", flush=True)
    loop = GLib.MainLoop()
    bus = pipeline.get_bus()
    bus.add_signal_watch()

    def on_message(_bus, msg):
        if msg.type == Gst.MessageType.ERROR:
            err, dbg = msg.parse_error()
            print(f"gstreamer error: {err} {dbg}", flush=True)
            loop.quit()

    bus.connect("message", on_message)
    try:
        loop.run()
    finally:
        pipeline.set_state(Gst.State.NULL)


if __name__ == "__main__":
    main()
