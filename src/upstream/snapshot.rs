//! The routing snapshot: an immutable picture of one upstream (which servers exist, which
//! form the active set, which are eligible) that the control plane publishes through
//! arc-swap and the data plane reads without locks on every new session.

use super::controller::Control;
use super::select;
use super::server::ServerHandle;
use crate::config::Balance;
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
    /// Whether passive signals mark servers down (`passive:`); a reload may change it.
    passive: AtomicBool,
    /// TCP connect timeout in milliseconds; a reload may change it.
    connect_timeout_ms: AtomicU64,
    /// `mediagate_sessions_migrated_total{upstream}`.
    pub migrated: Counter,
}

impl UpstreamRoute {
    pub fn new(
        name: String,
        control: mpsc::Sender<Control>,
        passive: bool,
        connect_timeout: Duration,
        migrated: Counter,
    ) -> Self {
        UpstreamRoute {
            name,
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            rr: AtomicUsize::new(0),
            control,
            passive: AtomicBool::new(passive),
            connect_timeout_ms: AtomicU64::new(connect_timeout.as_millis() as u64),
            migrated,
        }
    }

    /// TCP connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.load(Ordering::Relaxed))
    }

    pub(crate) fn set_options(&self, passive: bool, connect_timeout: Duration) {
        self.passive.store(passive, Ordering::Relaxed);
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

    /// A passive failure seen by the data plane (ECONNREFUSED, connect timeout). Sends at
    /// most one signal per server until it is healthy again; never blocks.
    pub fn report_passive(&self, server: &Arc<ServerHandle>, reason: Reason, detail: String) {
        if !self.passive.load(Ordering::Relaxed) || !server.claim_passive_report() {
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
