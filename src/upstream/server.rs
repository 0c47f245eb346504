//! [`ServerHandle`]: what the data plane knows about one server, shared between every
//! session pinned to it and the control plane.
//!
//! Moving sessions off a server is one atomic increment (`evict`): each UDP session
//! remembers the epoch it was pinned under and re-pins on its next datagram when the epoch
//! moved; each TCP connection waits on the cancellation token of its epoch.

use crate::config::Protocol;
use arc_swap::ArcSwap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long new connections of one protocol avoid a server after a passive failure that
/// does not speak for the whole server (`passive_scope: protocol`), like nginx's
/// `fail_timeout`.
pub const PROTOCOL_HOLD: Duration = Duration::from_secs(10);
/// How long after a false suspicion the data plane may not suspect the server again.
pub const SUSPICION_HOLDOFF: Duration = Duration::from_secs(1);
/// Silence shorter than this never raises a suspicion, however busy the server.
pub const SILENCE_FLOOR: Duration = Duration::from_millis(30);
/// Usual reply gaps the server must miss before it is suspected.
pub const SILENCE_GAPS: u64 = 4;

pub use crate::discovery::Tier;

/// One server of one upstream, as the data plane sees it.
#[derive(Debug)]
pub struct ServerHandle {
    /// The server's IP.
    pub ip: IpAddr,
    /// Explicit port; `None` means "the port the client used" (listener port or range).
    pub port: Option<u16>,
    /// `ip:port` as shown in `/status` and metric labels (port-less servers show the
    /// upstream's first listener port).
    pub label: String,
    pub tier: Tier,
    sessions: AtomicUsize,
    epoch: AtomicU64,
    token: ArcSwap<CancellationToken>,
    passive_reported: AtomicBool,
    /// Per protocol (UDP, TCP): until when new sessions of that protocol avoid this server
    /// (milliseconds on [`clock_ms`]; 0 = not held).
    held_until_ms: [AtomicU64; 2],
    /// When the server last answered any UDP session (ms on [`clock_ms`]; 0 = never).
    last_reply_ms: AtomicU64,
    /// The usual gap between its replies over all sessions (EWMA, ms; 0 = unknown).
    reply_gap_ms: AtomicU64,
    /// The data plane suspects the server went silent; its prober probes at once.
    suspected: AtomicBool,
    suspicion: tokio::sync::Notify,
    /// No new suspicion before this (ms on [`clock_ms`]): set when a suspicion proved
    /// false, so a flow the server legitimately stopped answering costs one extra probe
    /// round per [`SUSPICION_HOLDOFF`] at most.
    suspect_not_before_ms: AtomicU64,
}

/// Milliseconds on a process-wide monotonic clock.
fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

fn proto_index(p: Protocol) -> usize {
    match p {
        Protocol::Udp => 0,
        Protocol::Tcp => 1,
    }
}

impl ServerHandle {
    pub fn new(ip: IpAddr, port: Option<u16>, label_port: u16, tier: Tier) -> Self {
        let label = SocketAddr::new(ip, port.unwrap_or(label_port)).to_string();
        ServerHandle {
            ip,
            port,
            label,
            tier,
            sessions: AtomicUsize::new(0),
            epoch: AtomicU64::new(0),
            token: ArcSwap::from_pointee(CancellationToken::new()),
            passive_reported: AtomicBool::new(false),
            held_until_ms: [AtomicU64::new(0), AtomicU64::new(0)],
            last_reply_ms: AtomicU64::new(0),
            reply_gap_ms: AtomicU64::new(0),
            suspected: AtomicBool::new(false),
            suspicion: tokio::sync::Notify::new(),
            suspect_not_before_ms: AtomicU64::new(0),
        }
    }

    /// A UDP session got a reply from this server (the data plane, once per wakeup and
    /// session at most): moves the server's last-reply time and learns its usual gap
    /// between replies over all sessions (an EWMA updated without a lock: concurrent
    /// workers may lose an update, it is an estimate).
    #[inline]
    pub fn replied(&self) {
        let now = clock_ms();
        let last = self.last_reply_ms.swap(now, Ordering::Relaxed);
        if last != 0 && now > last {
            let gap = now - last;
            let avg = self.reply_gap_ms.load(Ordering::Relaxed);
            let avg = if avg == 0 { gap } else { (7 * avg + gap) / 8 };
            self.reply_gap_ms.store(avg.max(1), Ordering::Relaxed);
        }
    }

    /// Milliseconds since the server last answered any UDP session (None: never).
    #[inline]
    pub fn silent_for_ms(&self) -> Option<u64> {
        match self.last_reply_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(clock_ms().saturating_sub(at)),
        }
    }

    /// How long the server may answer no session before the data plane suspects it: a
    /// few ([`SILENCE_GAPS`]) of its usual reply gaps, at least [`SILENCE_FLOOR`].
    #[inline]
    pub fn silence_limit_ms(&self) -> u64 {
        let gap = self.reply_gap_ms.load(Ordering::Relaxed);
        (SILENCE_GAPS * gap).max(SILENCE_FLOOR.as_millis() as u64)
    }

    /// The data plane suspects the server went silent: its prober starts a round at once.
    /// Cheap to call per datagram: only the first call until the next verdict does more
    /// than two loads.
    #[inline]
    pub fn suspect(&self) {
        if self.suspected.load(Ordering::Relaxed)
            || clock_ms() < self.suspect_not_before_ms.load(Ordering::Relaxed)
        {
            return;
        }
        if !self.suspected.swap(true, Ordering::AcqRel) {
            self.suspicion.notify_one();
        }
    }

    /// Resolves when the data plane suspects the server (see [`ServerHandle::suspect`]).
    pub async fn suspected(&self) {
        loop {
            self.suspicion.notified().await;
            if self.suspected.load(Ordering::Acquire) {
                return;
            }
        }
    }

    /// A verdict was reached (`healthy`: the server answered): the next silence may raise
    /// a new suspicion, after [`SUSPICION_HOLDOFF`] when this one proved false.
    pub fn clear_suspicion(&self, healthy: bool) {
        if self.suspected.swap(false, Ordering::AcqRel) && healthy {
            self.suspect_not_before_ms.store(
                clock_ms() + SUSPICION_HOLDOFF.as_millis() as u64,
                Ordering::Relaxed,
            );
        }
    }

    /// New `protocol` sessions avoid this server for `d` (a failure of that protocol
    /// alone, which does not mark the server down).
    pub fn hold(&self, protocol: Protocol, d: Duration) {
        self.held_until_ms[proto_index(protocol)]
            .store(clock_ms() + d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether new `protocol` sessions should avoid this server now.
    pub fn is_held(&self, protocol: Protocol) -> bool {
        let until = self.held_until_ms[proto_index(protocol)].load(Ordering::Relaxed);
        until != 0 && clock_ms() < until
    }

    /// Ends every protocol hold (the server was marked down and is back, or a connect
    /// succeeded).
    pub fn release(&self, protocol: Protocol) {
        self.held_until_ms[proto_index(protocol)].store(0, Ordering::Relaxed);
    }

    /// Where a datagram or connection that arrived on `local_port` goes.
    #[inline]
    pub fn dest(&self, local_port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, self.port.unwrap_or(local_port))
    }

    /// Current eviction epoch; a session pinned under an older epoch must move.
    #[inline]
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Token cancelled when the sessions pinned now must leave (TCP connections wait on it).
    pub fn eviction_token(&self) -> CancellationToken {
        (**self.token.load()).clone()
    }

    /// Moves every session off this server: bumps the epoch and cancels the token.
    pub fn evict(&self) {
        let old = self.token.swap(Arc::new(CancellationToken::new()));
        self.epoch.fetch_add(1, Ordering::AcqRel);
        old.cancel();
        // Offloaded sessions do not pass user space: their workers must look now.
        crate::offload::evicted();
    }

    /// Live sessions pinned here.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    pub fn session_opened(&self) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }

    pub fn session_closed(&self) {
        // Saturating: a close can never push the gauge below zero.
        let _ = self
            .sessions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    /// True for the first caller after the server was last healthy: lets a burst of
    /// refused datagrams send one passive signal, not thousands.
    pub fn claim_passive_report(&self) -> bool {
        !self.passive_reported.swap(true, Ordering::AcqRel)
    }

    /// Re-arms passive reporting (the control plane calls it when the server is back up).
    pub fn rearm_passive_report(&self) {
        self.passive_reported.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evict_moves_epoch_and_cancels_only_old_token() {
        let s = ServerHandle::new("10.0.0.1".parse().unwrap(), None, 5004, Tier::Primary);
        assert_eq!(s.label, "10.0.0.1:5004");
        assert_eq!(
            s.dest(5006),
            "10.0.0.1:5006".parse::<std::net::SocketAddr>().unwrap()
        );
        let t = s.eviction_token();
        let e = s.epoch();
        s.evict();
        assert!(t.is_cancelled());
        assert_ne!(s.epoch(), e);
        assert!(!s.eviction_token().is_cancelled());
    }

    #[test]
    fn protocol_holds_are_per_protocol_and_expire() {
        let s = ServerHandle::new("127.0.0.1".parse().unwrap(), None, 80, Tier::Primary);
        assert!(!s.is_held(Protocol::Tcp));
        s.hold(Protocol::Tcp, Duration::from_secs(60));
        assert!(s.is_held(Protocol::Tcp));
        assert!(!s.is_held(Protocol::Udp));
        s.release(Protocol::Tcp);
        assert!(!s.is_held(Protocol::Tcp));
        s.hold(Protocol::Udp, Duration::ZERO);
        assert!(!s.is_held(Protocol::Udp));
    }

    #[test]
    fn passive_report_is_claimed_once() {
        let s = ServerHandle::new("10.0.0.1".parse().unwrap(), Some(1), 1, Tier::Backup);
        assert!(s.claim_passive_report());
        assert!(!s.claim_passive_report());
        s.rearm_passive_report();
        assert!(s.claim_passive_report());
    }

    #[test]
    fn session_count_never_underflows() {
        let s = ServerHandle::new("10.0.0.1".parse().unwrap(), Some(1), 1, Tier::Backup);
        s.session_closed();
        assert_eq!(s.sessions(), 0);
        s.session_opened();
        assert_eq!(s.sessions(), 1);
    }
}
