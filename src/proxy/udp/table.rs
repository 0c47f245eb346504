//! A worker's session table: the sessions it owns (a slab indexed by client), how a new
//! session is admitted and opened, and how sessions end (idle expiry, shutdown).

use super::failover::open_upstream;
use super::fastpath::offload_remove;
use super::forward::forward;
use super::listener::UdpListener;
use super::ring::Ring;
use super::worker::{PortSock, Tally};
use crate::fdbudget::{self, Permit};
use crate::offload::{ListenerOffload, SessionKeys};
use crate::proxy::ports::PortLease;
use crate::proxy::sources::{Admission, Refusal, Sources};
use crate::upstream::ServerHandle;
use nix::sys::epoll::Epoll;
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// One client flow, owned by one worker thread.
pub(super) struct Session {
    pub(super) client: SocketAddr,
    /// Index of the listen port (into the worker's `ports`).
    pub(super) port: u16,
    pub(super) server: Arc<ServerHandle>,
    /// The server's eviction epoch when this session was pinned to it.
    pub(super) pinned_epoch: u64,
    pub(super) upstream: UdpSocket,
    /// The local port `upstream` holds for its server. Declared after `upstream`: the
    /// port is handed out again only once the socket is closed.
    pub(super) lease: PortLease,
    /// Last packet either way, in ms since the listener's epoch.
    pub(super) last_activity_ms: u64,
    /// Ring slot holding a copy of the last datagram sent to the server.
    pub(super) last_sent: Option<u32>,
    /// The upstream socket reported a refusal (ICMP unreachable) on the reply side: the
    /// last datagram never arrived; move and re-send it with the next client datagram.
    pub(super) refused: bool,
    /// How the session counts in its source's share (released when it closes).
    pub(super) admission: Admission,
    /// Its entries in the kernel fast path, while installed.
    pub(super) offload: Option<SessionKeys>,
    /// Installing was tried for the current server (not retried per datagram).
    pub(super) offload_tried: bool,
    /// The descriptor `upstream` holds in the process's budget. Declared last: given
    /// back only once the socket is closed.
    pub(super) _permit: Permit,
}

/// Where a worker finds a client's session: (listen port index, client address) to the
/// session's slab slot. Public for the micro-benchmarks of the per-packet path.
#[derive(Default)]
pub struct SessionIndex {
    pub(super) map: HashMap<(u16, SocketAddr), u32>,
}

impl SessionIndex {
    #[inline]
    pub fn get(&self, port: u16, client: SocketAddr) -> Option<&u32> {
        self.map.get(&(port, client))
    }
    pub fn insert(&mut self, port: u16, client: SocketAddr, slot: u32) {
        self.map.insert((port, client), slot);
    }
    pub fn remove(&mut self, port: u16, client: SocketAddr) -> Option<u32> {
        self.map.remove(&(port, client))
    }
    pub fn clear(&mut self) {
        self.map.clear();
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A slab slot: the generation tells a stale epoll token from the slot's current session.
pub(super) struct Slot {
    pub(super) gen_: u32,
    pub(super) session: Option<Session>,
}

/// Everything a worker owns except its receive batch (kept apart so a received
/// datagram can be borrowed while the tables are updated).
pub(super) struct Tables {
    pub(super) shared: Arc<UdpListener>,
    pub(super) epoll: Epoll,
    pub(super) ports: Vec<PortSock>,
    pub(super) index: SessionIndex,
    pub(super) slab: Vec<Slot>,
    pub(super) free: Vec<u32>,
    pub(super) ring: Ring,
    pub(super) tally: Tally,
    pub(super) now_ms: u64,
    /// This worker's share of the per-source limits.
    pub(super) sources: Sources,
    /// The kernel fast path (`offload: ebpf`), if available.
    pub(super) offload: Option<Arc<ListenerOffload>>,
    /// Woken when a server is evicted (with `offload` only).
    pub(super) waker: Option<crate::offload::Waker>,
}

#[inline]
pub(super) fn token(idx: u32, gen_: u32) -> u64 {
    (u64::from(gen_ & 0x7fff_ffff) << 32) | u64::from(idx)
}

impl Tables {
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
