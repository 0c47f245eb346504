//! The routing snapshot: an immutable picture of one upstream (which servers exist, which
//! form the active set, which are eligible) that the control plane publishes through
//! arc-swap and the data plane reads without locks on every new session.

use super::control::Control;
use super::select;
use super::server::PROTOCOL_HOLD;
use super::server::ServerHandle;
use crate::config::{Balance, Protocol, ProtocolSet};
use crate::health::Reason;
use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// One upstream as published by its controller.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Bumped on every publish.
    pub generation: u64,
    pub balance: Balance,
    /// Every server, in priority order (primary then backup).
    pub servers: Vec<Arc<ServerHandle>>,
    /// Servers that take new sessions now, in priority order.
    pub active: Vec<Arc<ServerHandle>>,
    /// Every server that is up and enabled, in priority order: where a connection goes
    /// when the active set's servers refuse it.
    pub eligible: Vec<Arc<ServerHandle>>,
}

/// What listeners hold for their upstream: the current snapshot and the way back to the
/// control plane for passive signals.
#[derive(Debug)]
pub struct UpstreamRoute {
    pub name: String,
    snapshot: ArcSwap<Snapshot>,
    rr: AtomicUsize,
    control: mpsc::Sender<Control>,
    /// Whether passive signals seen by UDP sessions / TCP connects mark servers down
    /// (`passive`, `passive_scope`); a reload may change them.
    passive_udp: AtomicBool,
    passive_tcp: AtomicBool,
    /// TCP connect timeout in milliseconds; a reload may change it.
    connect_timeout_ms: AtomicU64,
    /// The servers are probed (`health.type` is not `none`): an ambiguous passive signal
    /// (a connect timeout) asks the prober to confirm instead of marking the server down.
    probed: AtomicBool,
    /// `mediagate_sessions_migrated_total{upstream}`.
    pub migrated: Counter,
}

impl UpstreamRoute {
    pub fn new(
        name: String,
        control: mpsc::Sender<Control>,
        passive: ProtocolSet,
        connect_timeout: Duration,
        migrated: Counter,
    ) -> Self {
        UpstreamRoute {
            name,
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            rr: AtomicUsize::new(0),
            control,
            passive_udp: AtomicBool::new(passive.udp),
            passive_tcp: AtomicBool::new(passive.tcp),
            connect_timeout_ms: AtomicU64::new(connect_timeout.as_millis() as u64),
            probed: AtomicBool::new(true),
            migrated,
        }
    }

    /// Whether the servers are probed (see the `probed` field); set by the controller.
    pub(crate) fn set_probed(&self, probed: bool) {
        self.probed.store(probed, Ordering::Relaxed);
    }

    /// TCP connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.load(Ordering::Relaxed))
    }

    pub(crate) fn set_options(&self, passive: ProtocolSet, connect_timeout: Duration) {
        self.passive_udp.store(passive.udp, Ordering::Relaxed);
        self.passive_tcp.store(passive.tcp, Ordering::Relaxed);
        self.connect_timeout_ms
            .store(connect_timeout.as_millis() as u64, Ordering::Relaxed);
    }

    /// The current snapshot.
    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    pub(crate) fn publish(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    /// Server for a new session from `client_ip`, avoiding `exclude` (servers that just
    /// failed this session). Falls back from the active set to any other eligible server
    /// in priority order, so a refused connect still finds a home.
    pub fn pick(
        &self,
        client_ip: IpAddr,
        exclude: &[Arc<ServerHandle>],
    ) -> Option<Arc<ServerHandle>> {
        let snap = self.snapshot.load();
        let allowed = |s: &&Arc<ServerHandle>| !exclude.iter().any(|e| Arc::ptr_eq(e, s));
        let rr = match snap.balance {
            crate::config::Balance::RoundRobin => self.rr.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        if let Some(s) = select::pick(
            snap.balance,
            snap.active.iter().filter(allowed),
            client_ip,
            rr,
        ) {
            return Some(s.clone());
        }
        if exclude.is_empty() {
            return None;
        }
        snap.eligible.iter().find(allowed).cloned()
    }

    /// A passive failure seen by the data plane (ECONNREFUSED, connect timeout) on a
    /// `protocol` session. When that protocol speaks for the server (see
    /// [`crate::config::authoritative_protocols`]) the control plane marks the server
    /// down: at most one signal per server until it is healthy again. Otherwise only new
    /// sessions of that protocol avoid the server for a while. A connect timeout may be a
    /// lost SYN: on a probed upstream it only makes the prober confirm at once (the
    /// server is down when every confirmation probe fails). Never blocks.
    pub fn report_passive(
        &self,
        server: &Arc<ServerHandle>,
        protocol: Protocol,
        reason: Reason,
        detail: String,
    ) {
        let authoritative = match protocol {
            Protocol::Udp => self.passive_udp.load(Ordering::Relaxed),
            Protocol::Tcp => self.passive_tcp.load(Ordering::Relaxed),
        };
        if !authoritative {
            server.hold(protocol, PROTOCOL_HOLD);
            return;
        }
        if reason == Reason::ConnectTimeout && self.probed.load(Ordering::Relaxed) {
            server.suspect();
            return;
        }
        if !server.claim_passive_report() {
            return;
        }
        let msg = Control::Passive {
            server: server.clone(),
            reason,
            detail,
            at: std::time::Instant::now(),
        };
        if self.control.try_send(msg).is_err() {
            // The controller is saturated or gone; let the next failure try again.
            server.rearm_passive_report();
        }
    }
}
