//! The server → client path: replies read straight into the per-port outgoing batch and
//! sent back to their clients with one `sendmmsg` per listen port and wakeup.

use super::failover::passive_reason;
use super::fastpath::offload_remove;
use super::session::Tables;
use crate::config::Protocol;
use std::os::fd::AsRawFd;

impl Tables {
    /// Reads whatever the server of session `idx` sent, straight into the outgoing batch
    /// of the session's listen port.
    pub(super) fn on_reply_ready(&mut self, idx: u32, gen_: u32) {
        let Some(slot) = self.slab.get_mut(idx as usize) else {
            return;
        };
        if slot.gen_ != gen_ {
            return; // the session that owned this token is gone
        }
        let Some(session) = slot.session.as_mut() else {
            return;
        };
        let port = &mut self.ports[usize::from(session.port)];
        let fd = session.upstream.as_raw_fd();
        // A few rounds at most, so one busy session cannot starve the others.
        for _ in 0..4 {
            if port.out.is_full() {
                let (_, dropped) = port.out.flush(port.sock.as_raw_fd());
                self.tally.send_errors += dropped as u64;
            }
            let room = port.out.capacity() - port.out.len();
            match port.out.recv_append(fd, room) {
                Ok(0) => return,
                Ok(n) => {
                    if session.server.epoch() != session.pinned_epoch {
                        // The session has left this server; its late replies are dropped.
                        port.out.truncate_by(n);
                        self.tally.stale += n as u64;
                    } else {
                        let bytes = port.out.address_last(n, session.client);
                        self.tally.packets_to_client += n as u64;
                        self.tally.bytes_to_client += bytes as u64;
                        session.last_activity_ms = self.now_ms;
                        session.heard(self.now_ms);
                    }
                    if n < room {
                        return;
                    }
                }
                Err(e) => {
                    if passive_reason(&e).is_some() {
                        // A refused offloaded datagram: the next one must come up here
                        // now (to re-pin), not at the next tick's eviction scan.
                        offload_remove(self.offload.as_deref(), session);
                    }
                    if let Some(reason) = passive_reason(&e)
                        && session.server.epoch() == session.pinned_epoch
                    {
                        tracing::debug!(client = %session.client, server = %session.server.label, error = %e, "server refused");
                        self.shared.route.report_passive(
                            &session.server,
                            Protocol::Udp,
                            reason,
                            e.to_string(),
                        );
                        session.refused = true;
                    }
                    return;
                }
            }
        }
    }

    /// Sends the replies gathered in this wakeup.
    pub(super) fn flush_replies(&mut self) {
        for port in &mut self.ports {
            if !port.out.is_empty() {
                let (_, dropped) = port.out.flush(port.sock.as_raw_fd());
                self.tally.send_errors += dropped as u64;
            }
        }
    }
}
