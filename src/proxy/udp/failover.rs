//! Moving a session off its server: re-pinning to the current active set through a new
//! upstream socket when the server was evicted or refused a datagram, and re-sending the
//! datagram it refused.

use super::fastpath::offload_remove;
use super::listener::UdpListener;
use super::ring::Ring;
use super::session::{PortSock, Session, Tally, UPSTREAM_RCVBUF, token};
use crate::health::Reason;
use crate::proxy::ports::{self, PortLease};
use crate::sockio as sys;
use crate::upstream::ServerHandle;
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

/// Re-pins a session whose server was evicted (down, maint, removed, failback) or refused
/// its last datagram, before its next datagram goes out; re-sends the refused one. False
/// when the datagram must be dropped (no server left, or no new socket).
#[allow(clippy::too_many_arguments)]
pub(super) fn repin_moved(
    shared: &UdpListener,
    epoll: &Epoll,
    ports: &[PortSock],
    ring: &Ring,
    tally: &mut Tally,
    idx: u32,
    gen_: u32,
    session: &mut Session,
) -> bool {
    // The server was evicted (down, maint, removed, failback) or refused the last
    // datagram: re-pin now. If the old socket holds a refusal, the previous
    // datagram never arrived.
    let pending = session.upstream.take_error();
    let refused =
        session.refused || matches!(pending, Ok(Some(ref e)) if passive_reason(e).is_some());
    tracing::debug!(client = %session.client, ?pending, refused, "re-pinning");
    let exclude = if refused {
        std::slice::from_ref(&session.server)
    } else {
        &[]
    };
    let Some(server) = shared.route.pick(session.client.ip(), exclude) else {
        shared.metrics.dropped_no_server.inc();
        return false;
    };
    let local_port = ports[usize::from(session.port)].local_port;
    if let Err(e) = repin(shared, epoll, local_port, idx, gen_, session, server) {
        tracing::debug!(listener = %shared.name, error = %e, "re-pin failed");
        tally.send_errors += 1;
        return false;
    }
    shared.route.migrated.inc();
    if refused {
        resend_previous(ring, idx, gen_, session, tally);
    }
    true
}

/// Re-sends the session's previous datagram (refused by its old server) to its new one.
pub(super) fn resend_previous(
    ring: &Ring,
    idx: u32,
    gen_: u32,
    session: &Session,
    tally: &mut Tally,
) {
    let Some(prev) = session.last_sent.and_then(|slot| ring.get(slot, idx, gen_)) else {
        tracing::debug!(client = %session.client, "no copy of the refused datagram left to re-send");
        return;
    };
    tracing::debug!(client = %session.client, len = prev.len(), "re-sending the datagram the old server refused");
    if sys::send(session.upstream.as_raw_fd(), prev).is_ok() {
        tally.add_to_server(prev.len());
    }
}

/// Errors on a connected UDP socket that mean the server (or its host) is gone.
pub(super) fn passive_reason(e: &io::Error) -> Option<Reason> {
    match e.kind() {
        io::ErrorKind::ConnectionRefused
        | io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkUnreachable => Some(Reason::IcmpUnreachable),
        _ => None,
    }
}

/// A non-blocking socket connected to `dest`, from a local port no other session to
/// `dest` holds (see [`ports`]), registered in `epoll` under `tok`.
pub(super) fn open_upstream(
    epoll: &Epoll,
    dest: SocketAddr,
    tok: u64,
) -> io::Result<(UdpSocket, PortLease)> {
    let (sock, lease) = ports::connect_shared(dest, UPSTREAM_RCVBUF)?;
    epoll
        .add(sock.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, tok))
        .map_err(io::Error::from)?;
    Ok((sock, lease))
}

/// Moves `session` to `server` through a new upstream socket; replies still in flight
/// from the old server die with the old socket.
pub(super) fn repin(
    shared: &UdpListener,
    epoll: &Epoll,
    local_port: u16,
    idx: u32,
    gen_: u32,
    session: &mut Session,
    server: Arc<ServerHandle>,
) -> io::Result<()> {
    let pinned_epoch = server.epoch();
    let (upstream, lease) = open_upstream(epoll, server.dest(local_port), token(idx, gen_))?;
    offload_remove(shared.offload.get().map(|o| &**o), session);
    session.offload_tried = false;
    session.server.session_closed();
    server.session_opened();
    // Dropping the old socket closes it, which also removes it from the epoll set; then
    // its port goes back to the table.
    session.upstream = upstream;
    session.lease = lease;
    session.server = server;
    session.pinned_epoch = pinned_epoch;
    // The new server has not answered yet: only its replies make the session a witness.
    session.last_reply_ms = 0;
    session.refused = false;
    Ok(())
}
