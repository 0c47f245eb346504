//! The data a worker owns, apart from what it does with it: a session, the session table
//! (slab and index), a listen port as the worker sees it, and the counts of one wakeup.
//! The files that act on the table (`table`, `forward`, `reply`, `failover`, `fastpath`,
//! `worker`) all build on these definitions and import them one way.

use super::listener::UdpListener;
use super::ring::Ring;
use crate::fdbudget::Permit;
use crate::metrics::ListenerMetrics;
use crate::offload::{ListenerOffload, SessionKeys};
use crate::proxy::ports::PortLease;
use crate::proxy::sources::{Admission, Sources};
use crate::sockio::MsgBatch;
use crate::upstream::ServerHandle;
use nix::sys::epoll::Epoll;
use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

/// Receive buffer limit of each upstream socket.
pub(super) const UPSTREAM_RCVBUF: usize = 1 << 20;
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
    /// The server's last reply to this session (ms since the listener's epoch; 0: none
    /// yet): only a session that was getting replies can suspect its server.
    pub(super) last_reply_ms: u64,
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

impl Session {
    /// The server answered this session at `now_ms`.
    #[inline]
    pub(super) fn heard(&mut self, now_ms: u64) {
        self.last_reply_ms = now_ms.max(1);
        self.server.replied();
    }

    /// Before sending a client datagram: a session that was getting replies, whose server
    /// has answered no session for a few of its usual reply gaps, makes the server's
    /// prober probe at once (passive silence detection). A session never answered (an
    /// ingest flow) is left to the probes.
    #[inline]
    pub(super) fn check_silence(&self, now_ms: u64) {
        let quiet = now_ms.saturating_sub(self.last_reply_ms);
        // The common case, a session answered within the floor, reads nothing shared.
        if self.last_reply_ms == 0
            || quiet <= crate::upstream::server::SILENCE_FLOOR.as_millis() as u64
        {
            return;
        }
        let limit = self.server.silence_limit_ms();
        if quiet > limit && self.server.silent_for_ms().is_some_and(|s| s > limit) {
            self.server.suspect();
        }
    }
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

/// Datagrams of new clients a worker set aside for a later wakeup: a wakeup forwards the
/// datagrams of established sessions first and opens at most a few sessions (each costs
/// a socket, a bind, a connect and an epoll registration), so a flood of new sources never
/// keeps the worker from draining its listen sockets. Bounded in count and bytes; beyond
/// that a new client's datagram is dropped (counted) and its next one tries again.
#[derive(Default)]
pub(super) struct Backlog {
    pub(super) queue: VecDeque<(u16, SocketAddr, Box<[u8]>)>,
    pub(super) bytes: usize,
    /// Datagrams pushed during the current wakeup (the newest in `queue`).
    pub(super) fresh: usize,
}

impl Backlog {
    /// Datagrams held at most.
    pub(super) const MAX_DATAGRAMS: usize = 4096;
    /// Payload bytes held at most.
    pub(super) const MAX_BYTES: usize = 2 << 20;

    /// Keeps a copy of `data`; false (nothing kept) when full.
    pub(super) fn push(&mut self, p: u16, client: SocketAddr, data: &[u8]) -> bool {
        if self.queue.len() >= Self::MAX_DATAGRAMS || self.bytes + data.len() > Self::MAX_BYTES {
            return false;
        }
        self.bytes += data.len();
        self.fresh += 1;
        self.queue.push_back((p, client, data.into()));
        true
    }

    pub(super) fn pop(&mut self) -> Option<(u16, SocketAddr, Box<[u8]>)> {
        let d = self.queue.pop_front()?;
        self.bytes -= d.2.len();
        Some(d)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Lets go of the memory a burst left behind once the backlog is empty.
    pub(super) fn shrink(&mut self) {
        if self.queue.is_empty() && self.queue.capacity() > 64 {
            self.queue = VecDeque::new();
        }
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
    /// Datagrams of new clients left for a later wakeup.
    pub(super) backlog: Backlog,
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

/// A listen port as one worker sees it.
pub(super) struct PortSock {
    pub(super) sock: Arc<UdpSocket>,
    pub(super) local_port: u16,
    /// The listen address (the fast path matches datagrams sent to it).
    pub(super) local: SocketAddr,
    /// Replies of this wakeup waiting to go out through `sock`.
    pub(super) out: MsgBatch,
}

/// Packet and byte counts of one wakeup, added to the shared counters once.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) packets_to_server: u64,
    pub(super) bytes_to_server: u64,
    pub(super) packets_to_client: u64,
    pub(super) bytes_to_client: u64,
    pub(super) send_errors: u64,
    pub(super) stale: u64,
}

impl Tally {
    #[inline]
    pub(super) fn add_to_server(&mut self, n: usize) {
        self.packets_to_server += 1;
        self.bytes_to_server += n as u64;
    }

    pub(super) fn publish(&mut self, m: &ListenerMetrics) {
        if self.packets_to_server > 0 {
            m.packets_to_server.inc_by(self.packets_to_server);
            m.bytes_to_server.inc_by(self.bytes_to_server);
        }
        if self.packets_to_client > 0 {
            m.packets_to_client.inc_by(self.packets_to_client);
            m.bytes_to_client.inc_by(self.bytes_to_client);
        }
        if self.send_errors > 0 {
            m.dropped_send_error.inc_by(self.send_errors);
        }
        if self.stale > 0 {
            m.dropped_stale_server.inc_by(self.stale);
        }
        *self = Tally::default();
    }
}

#[cfg(test)]
mod tests {
    use super::Backlog;
    use std::net::SocketAddr;

    #[test]
    fn the_backlog_is_bounded_in_count_and_bytes_and_first_in_first_out() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut b = Backlog::default();
        for i in 0..Backlog::MAX_DATAGRAMS {
            assert!(b.push(0, a, &[i as u8]));
        }
        assert!(!b.push(0, a, b"x"), "full by count");
        assert_eq!(b.pop().unwrap().2[0], 0);
        assert_eq!(b.fresh, Backlog::MAX_DATAGRAMS);
        while b.pop().is_some() {}
        assert_eq!(b.bytes, 0);
        b.shrink();
        assert_eq!(b.queue.capacity(), 0);
        let big = vec![0u8; Backlog::MAX_BYTES / 2];
        assert!(b.push(0, a, &big) && b.push(0, a, &big));
        assert!(!b.push(0, a, b"x"), "full by bytes");
    }
}
