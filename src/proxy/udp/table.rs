//! A worker's session table at work (the table itself is in `session`): how a new session
//! is admitted and opened (after the wakeup's established traffic, a bounded number per
//! wakeup, from the backlog), and how sessions end (idle expiry, shutdown).

use super::failover::open_upstream;
use super::fastpath::offload_remove;
use super::forward::forward;
use super::session::{Session, Slot, Tables, token};
use crate::fdbudget;
use crate::proxy::sources::Refusal;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

impl Tables {
    /// A datagram from a client with no session: refusals that need no work (draining,
    /// `max_sessions`, the fd budget used up) are counted at once; otherwise it waits in
    /// the backlog for [`Tables::admit_backlog`].
    pub(super) fn defer_new(&mut self, p: u16, client: SocketAddr, data: &[u8]) {
        let shared = &self.shared;
        let m = &shared.metrics;
        if shared.draining.load(Ordering::Acquire) {
            m.dropped_draining.inc();
            m.rejected_draining.inc();
            return;
        }
        if shared.live.load(Ordering::Relaxed) >= shared.max_sessions {
            m.dropped_max_sessions.inc();
            m.rejected_max_sessions.inc();
            return;
        }
        if fdbudget::global().refuses_new() {
            m.dropped_fd_budget.inc();
            m.rejected_fd_budget.inc();
            return;
        }
        if !self.backlog.push(p, client, data) {
            m.dropped_backlog.inc();
            m.rejected_backlog.inc();
        }
    }

    /// After a wakeup's established traffic: opens sessions for at most `most` datagrams
    /// of the backlog, oldest first (a later datagram of a client whose session just
    /// opened is forwarded on it). What is left waits for the next wakeup and is counted
    /// as deferred once.
    pub(super) fn admit_backlog(&mut self, most: usize) {
        let mut opened = 0;
        while opened < most {
            let Some((p, client, data)) = self.backlog.pop() else {
                break;
            };
            if let Some(&idx) = self.index.get(p, client) {
                self.forward_existing(idx, &data);
            } else {
                self.new_session(p, client, &data);
                opened += 1;
            }
        }
        let deferred = self.backlog.fresh.min(self.backlog.queue.len());
        self.backlog.fresh = 0;
        if deferred > 0 {
            self.shared.metrics.deferred_new.inc_by(deferred as u64);
        }
        self.backlog.shrink();
    }

    pub(super) fn new_session(&mut self, p: u16, client: SocketAddr, data: &[u8]) {
        let shared = &self.shared;
        let m = &shared.metrics;
        if shared.draining.load(Ordering::Acquire) {
            m.dropped_draining.inc();
            m.rejected_draining.inc();
            return;
        }
        if shared.live.load(Ordering::Relaxed) >= shared.max_sessions {
            m.dropped_max_sessions.inc();
            m.rejected_max_sessions.inc();
            return;
        }
        let admission = match self.sources.admit(client.ip(), self.now_ms) {
            Ok(a) => a,
            Err(Refusal::Rate) => {
                m.dropped_source_rate.inc();
                m.rejected_source_rate.inc();
                return;
            }
            Err(Refusal::Sessions) => {
                m.dropped_source_sessions.inc();
                m.rejected_source_sessions.inc();
                return;
            }
        };
        // One descriptor: the session's upstream socket.
        let Some(permit) = fdbudget::global().try_acquire(1) else {
            self.sources.closed(client.ip(), admission);
            m.dropped_fd_budget.inc();
            m.rejected_fd_budget.inc();
            return;
        };
        let Some(server) = shared.route.pick(client.ip(), &[]) else {
            self.sources.closed(client.ip(), admission);
            m.dropped_no_server.inc();
            m.rejected_no_server.inc();
            return;
        };
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slab.push(Slot {
                    gen_: 0,
                    session: None,
                });
                (self.slab.len() - 1) as u32
            }
        };
        let slot = &mut self.slab[idx as usize];
        slot.gen_ = slot.gen_.wrapping_add(1) & 0x7fff_ffff;
        let gen_ = slot.gen_;
        let local_port = self.ports[usize::from(p)].local_port;
        let pinned_epoch = server.epoch();
        let (upstream, lease) = match open_upstream(
            &self.epoll,
            server.dest(local_port),
            token(idx, gen_),
        ) {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, buffers or local ports: the balancer's own problem,
                // never the server's; logged a few times per window, counted always.
                if shared.open_failures.allow() {
                    tracing::warn!(listener = %shared.name, server = %server.label, error = %e, "cannot open upstream socket; new session refused");
                }
                if crate::health::is_local_error(&e) {
                    m.dropped_local_error.inc();
                    m.rejected_local_error.inc();
                } else {
                    m.dropped_send_error.inc();
                }
                self.sources.closed(client.ip(), admission);
                self.free.push(idx);
                return;
            }
        };
        server.session_opened();
        shared.live.fetch_add(1, Ordering::Relaxed);
        m.sessions.inc();
        m.created.inc();
        let session = slot.session.insert(Session {
            client,
            port: p,
            server,
            pinned_epoch,
            upstream,
            lease,
            last_activity_ms: self.now_ms,
            last_sent: None,
            last_reply_ms: 0,
            refused: false,
            admission,
            offload: None,
            offload_tried: false,
            _permit: permit,
        });
        self.index.insert(p, client, idx);
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

    /// Closes the sessions idle for `idle_ms`; sweeps run every `every`.
    pub(super) fn sweep_idle(&mut self, idle_ms: u64, every: Duration) {
        let now = self.now_ms;
        self.offload_last_seen(idle_ms, every);
        let mut removed = 0usize;
        for slot in &mut self.slab {
            let expired = slot
                .session
                .as_ref()
                .is_some_and(|s| now.saturating_sub(s.last_activity_ms) >= idle_ms);
            if expired && let Some(mut s) = slot.session.take() {
                offload_remove(self.offload.as_deref(), &mut s);
                self.index.remove(s.port, s.client);
                self.sources.closed(s.client.ip(), s.admission);
                s.server.session_closed();
                removed += 1;
            }
        }
        self.sources.sweep(now);
        if removed > 0 {
            self.shared.metrics.closed_idle.inc_by(removed as u64);
            self.free.clear();
            for (i, slot) in self.slab.iter().enumerate() {
                if slot.session.is_none() {
                    self.free.push(i as u32);
                }
            }
            self.forget(removed);
        }
    }

    pub(super) fn close_all(&mut self) {
        let mut removed = 0;
        for slot in &mut self.slab {
            if let Some(mut s) = slot.session.take() {
                offload_remove(self.offload.as_deref(), &mut s);
                s.server.session_closed();
                removed += 1;
            }
        }
        self.index.clear();
        self.forget(removed);
    }

    pub(super) fn forget(&self, removed: usize) {
        if removed > 0 {
            self.shared.live.fetch_sub(removed, Ordering::Relaxed);
            self.shared.metrics.sessions.dec_by(removed as i64);
        }
    }
}
