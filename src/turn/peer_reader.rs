//! The reader of one allocation's relay socket: datagrams from peers to the client.
//!
//! Started when the Allocate succeeded (the client end is known); before that, no peer
//! has a permission, so nothing could be relayed. The socket is registered with the
//! runtime for reading only; sends (the data path's, towards peers) are plain
//! non-blocking `sendto` calls from the client's reader.
//!
//! Per datagram: the peer policy (refusals counted in `dropped{peer_not_allowed}`), the
//! permission of the peer's IP, then a ChannelData header written in front of the
//! payload where it was received (or a Data indication for peers without a channel),
//! handed to the client's sink. Receives are `recvmmsg` batches of up to [`SLOTS`]: a
//! batch that is not full means the queue was empty, and the readiness is cleared right
//! there, without a second call that only says so. The ChannelData of one batch goes to
//! the client together (over TCP one write, one segment): when the reader falls behind
//! under load, several datagrams wait in the socket and leave in one write, the more the
//! busier, and with no added delay when it keeps up. The batch buffer belongs to the
//! thread, not to the allocation (receive and relay happen without an await in
//! between), so thousands of allocations do not each hold one. The reader ends when the
//! allocation does.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::sockio::MsgBatch;

use super::metrics::DropReason;
use super::relay::{ClientEnd, RelayFactory, RelayState};

/// Largest datagram read from a peer.
const PEER_DATAGRAM: usize = 2048;
/// Room in front of each received datagram for the ChannelData header.
const HEADROOM: usize = 4;
/// Datagrams per receive call.
const SLOTS: usize = 16;

thread_local! {
    /// The receive batch of the relay readers running on this thread (32 KiB).
    static BATCH: std::cell::RefCell<MsgBatch> =
        std::cell::RefCell::new(MsgBatch::with_headroom(SLOTS, PEER_DATAGRAM, HEADROOM));
}

/// Reads `state`'s relay socket until the allocation ends.
/// Sets the allocation's client end and starts its relay socket's reader (once).
pub(crate) fn start(factory: &Arc<RelayFactory>, state: &Arc<RelayState>, client: ClientEnd) {
    if state.set_client_end(client) {
        tokio::spawn(run(Arc::clone(state), Arc::clone(factory)));
    }
}

async fn run(state: Arc<RelayState>, factory: Arc<RelayFactory>) {
    let stopped = state.stopped();
    tokio::pin!(stopped);
    // SAFETY: the `Arc` held by the `AsyncFd` keeps the socket, and so its descriptor,
    // open and unchanged for the `AsyncFd`'s whole life.
    let registered =
        unsafe { AsyncFd::register_with_interest(state.shared_socket(), Interest::READABLE) };
    let socket = match registered {
        Ok(s) => s,
        Err(e) => return failed(&state, &factory, e.into(), stopped).await,
    };
    let fd = socket.as_raw_fd();
    let mut scratch = Vec::new();
    loop {
        let mut guard = tokio::select! {
            _ = &mut stopped => return,
            r = socket.readable() => match r {
                Ok(g) => g,
                Err(e) => return failed(&state, &factory, e, stopped).await,
            },
        };
        let error = BATCH.with_borrow_mut(|batch| {
            let mut got = 0;
            let r = guard.try_io(|_| {
                got = batch.recv_from(fd)?;
                if got < batch.capacity() {
                    Err(std::io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(())
                }
            });
            if let Ok(Err(e)) = r {
                return (!transient(&e)).then_some(e);
            }
            relay(&state, &factory, batch, got, &mut scratch);
            None
        });
        if let Some(e) = error {
            return failed(&state, &factory, e, stopped).await;
        }
    }
}

/// Relays the first `got` datagrams of the batch to the client (ChannelData together,
/// in order), or drops and counts them.
fn relay(
    state: &RelayState,
    factory: &RelayFactory,
    batch: &mut MsgBatch,
    got: usize,
    scratch: &mut Vec<u8>,
) {
    let Some(client) = state.client_end() else {
        return; // not started before the client end is set
    };
    let m = factory.metrics();
    // ChannelData whose header is written, waiting to go out together.
    let mut ready = [0usize; SLOTS];
    let mut n_ready = 0;
    for i in 0..got {
        let (frame, src, truncated) = batch.frame_mut(i);
        let Some(peer) = src else {
            continue;
        };
        if truncated {
            m.dropped(DropReason::Malformed).inc();
            continue;
        }
        if !factory.policy.allows(peer) {
            m.dropped(DropReason::PeerNotAllowed).inc();
            continue;
        }
        if !state.has_permission(peer.ip()) {
            m.dropped(DropReason::NoPermission).inc();
            continue;
        }
        let n = frame.len() - HEADROOM;
        if let Some(number) = state.peer_channel(peer) {
            frame[0..2].copy_from_slice(&number.to_be_bytes());
            frame[2..4].copy_from_slice(&(n as u16).to_be_bytes());
            ready[n_ready] = i;
            n_ready += 1;
        } else {
            // Keep the order: what is ready goes first.
            flush(client, batch, &ready[..n_ready]);
            n_ready = 0;
            let (frame, _, _) = batch.frame_mut(i);
            super::wire::data_indication(scratch, peer, &frame[HEADROOM..]);
            client.sink.send_frame(scratch, client.addr);
        }
    }
    flush(client, batch, &ready[..n_ready]);
}

/// Sends the ChannelData frames of datagrams `ready` to the client together.
fn flush(client: &ClientEnd, batch: &MsgBatch, ready: &[usize]) {
    if ready.is_empty() {
        return;
    }
    let mut frames = [&[][..]; SLOTS];
    for (f, i) in frames.iter_mut().zip(ready) {
        *f = batch.frame(*i);
    }
    client.sink.send_frames(&frames[..ready.len()], client.addr);
}

/// A receive error that is not transient: logged, and the reader waits for the
/// allocation to end (the client keeps its allocation; nothing more arrives from peers).
async fn failed(
    state: &RelayState,
    factory: &RelayFactory,
    e: std::io::Error,
    stopped: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) {
    if factory.error_log().allow() {
        tracing::error!(relay = %state.advertised, error = %e, "TURN relay socket failed");
    }
    stopped.await;
}

/// Errors a relay socket reports for one datagram (ICMP errors of earlier sends and the
/// like): the socket goes on working.
fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused
            | ConnectionReset
            | Interrupted
            | WouldBlock
            | HostUnreachable
            | NetworkUnreachable
    )
}
