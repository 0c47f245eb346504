//! Where the data path sends frames for a client: [`ClientSink`], implemented by each
//! listener's transport (UDP, TCP/TLS connections, DTLS). Kept on its own so the relay
//! socket (which holds a client's sink) and the data path (which defines the frames) both
//! build on it without importing each other.

use std::net::SocketAddr;

/// Where frames for a client go: the listener's transport, without blocking.
pub(crate) trait ClientSink: Send + Sync {
    /// Sends one TURN frame (ChannelData or a Data indication) to `client`. Never blocks:
    /// a frame that cannot be sent now is dropped and counted. Counts what it relays.
    fn send_frame(&self, frame: &[u8], client: SocketAddr);

    /// Sends several frames to `client`, in order (the relay socket's reader, for what
    /// one receive brought). Over TCP they leave in one write.
    fn send_frames(&self, frames: &[&[u8]], client: SocketAddr) {
        for f in frames {
            self.send_frame(f, client);
        }
    }
}
