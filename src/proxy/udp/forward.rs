//! The client → server path: a client datagram finds its session (or opens one) and goes
//! out on the session's upstream socket; a send the server refuses moves the session.

use super::failover::{passive_reason, repin, repin_moved, resend_previous};
use super::listener::UdpListener;
use super::ring::Ring;
use super::session::{PortSock, Session, Tables, Tally};
use crate::config::Protocol;
use crate::sockio as sys;
use nix::sys::epoll::Epoll;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

impl Tables {
    /// Routes one client datagram that arrived on listen port `p`: an established
    /// session's goes out at once; a new client's waits in the backlog until the wakeup's
    /// established traffic is out (see [`Tables::admit_backlog`]).
    pub(super) fn on_datagram(&mut self, p: u16, client: SocketAddr, data: &[u8]) {
        if let Some(&idx) = self.index.get(p, client) {
            self.forward_existing(idx, data);
            return;
        }
        self.defer_new(p, client, data);
    }

    pub(super) fn forward_existing(&mut self, idx: u32, data: &[u8]) {
        let shared = &self.shared;
        let now_ms = self.now_ms;
        let Some(slot) = self.slab.get_mut(idx as usize) else {
            return;
        };
        let gen_ = slot.gen_;
        let Some(session) = slot.session.as_mut() else {
            return;
        };
        if (session.refused || session.server.epoch() != session.pinned_epoch)
            && !repin_moved(
                shared,
                &self.epoll,
                &self.ports,
                &self.ring,
                &mut self.tally,
                idx,
                gen_,
                session,
            )
        {
            return;
        }
        session.last_activity_ms = now_ms;
        session.check_silence(now_ms);
        forward(
            shared,
            &self.epoll,
            &self.ports,
            &mut self.ring,
            &mut self.tally,
            idx,
            gen_,
            session,
            data,
        );
        self.offload_install(idx);
    }
}

/// Sends one client datagram to the session's server. A send refused by the server's host
/// (ICMP port unreachable reported on the connected socket) marks the server down and
/// re-sends both the refused previous datagram and this one to the next server.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(super) fn forward(
    shared: &UdpListener,
    epoll: &Epoll,
    ports: &[PortSock],
    ring: &mut Ring,
    tally: &mut Tally,
    idx: u32,
    gen_: u32,
    session: &mut Session,
    data: &[u8],
) {
    for _attempt in 0..3 {
        match sys::send(session.upstream.as_raw_fd(), data) {
            Ok(_) => {
                tally.add_to_server(data.len());
                session.last_sent = ring.put(idx, gen_, data);
                return;
            }
            Err(e) => {
                let Some(reason) = passive_reason(&e) else {
                    // A full send buffer: drop, as the network would.
                    tally.send_errors += 1;
                    return;
                };
                let failed = session.server.clone();
                tracing::debug!(client = %session.client, server = %failed.label, error = %e, "send refused");
                shared
                    .route
                    .report_passive(&failed, Protocol::Udp, reason, e.to_string());
                let Some(next) = shared
                    .route
                    .pick(session.client.ip(), std::slice::from_ref(&failed))
                else {
                    shared.metrics.dropped_no_server.inc();
                    return;
                };
                let local_port = ports[usize::from(session.port)].local_port;
                if repin(shared, epoll, local_port, idx, gen_, session, next).is_err() {
                    tally.send_errors += 1;
                    return;
                }
                shared.route.migrated.inc();
                resend_previous(ring, idx, gen_, session, tally);
            }
        }
    }
    tally.send_errors += 1;
}
