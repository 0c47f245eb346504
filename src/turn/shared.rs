//! [`Core`]: the state every listener of the TURN service shares (credentials, nonces,
//! the peer policy, metrics, the allocation table, rate-limited logs). It sits below the
//! listeners (`server`, `requests`) and the data path (`datapath`), which all use it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::auth::{Authenticator, Nonces};
use super::metrics::TurnMetrics;
use super::policy::{PeerPolicy, Verdict};
use super::ratelog::RateLimit;
use super::table::Allocations;

/// State shared by all listeners of the service.
pub(crate) struct Core {
    pub(super) auth: Authenticator,
    pub(super) nonces: Nonces,
    pub(crate) policy: Arc<PeerPolicy>,
    pub(crate) metrics: TurnMetrics,
    /// Allocations, reservations and their quota units.
    pub(crate) allocs: Allocations,
    pub(super) auth_log: RateLimit,
    pub(crate) refusal_log: Arc<RateLimit>,
    /// TURN-over-TCP accept errors, refused and closed connections.
    pub(crate) tcp_log: Arc<RateLimit>,
    pub(super) malformed_log: RateLimit,
    pub(crate) misc_log: Arc<RateLimit>,
    /// Debug lines about allocations being created and deleted.
    pub(crate) alloc_log: RateLimit,
}

impl Core {
    /// Counts and logs peers refused by the policy (`what`: the request or indication).
    pub(crate) fn refused(
        &self,
        src: SocketAddr,
        username: &str,
        peers: &[SocketAddr],
        what: &'static str,
    ) {
        self.metrics.permission_denied.inc_by(peers.len() as u64);
        let loops = peers
            .iter()
            .filter(|p| self.policy.verdict(**p) == Verdict::Loop)
            .count();
        self.metrics.loop_refused.inc_by(loops as u64);
        if self.refusal_log.allow() {
            tracing::warn!(
                client = %src,
                username = ?loggable(username),
                peers = ?peers,
                request = what,
                own_ports = loops,
                "TURN: peer outside turn.relay.peers refused (own_ports: the gateway's own ports, a loop)"
            );
        }
    }
}

impl Core {
    pub(crate) fn new(
        auth: Authenticator,
        policy: Arc<PeerPolicy>,
        metrics: TurnMetrics,
        quota: usize,
        max_units: usize,
    ) -> Self {
        let window = Duration::from_secs(10);
        Core {
            auth,
            nonces: Nonces::new(),
            policy,
            allocs: Allocations::new(metrics.clone(), quota, max_units),
            metrics,
            auth_log: RateLimit::new("turn_auth_failure", window, 10),
            refusal_log: Arc::new(RateLimit::new("turn_peer_refused", window, 10)),
            tcp_log: Arc::new(RateLimit::new("turn_tcp", window, 10)),
            malformed_log: RateLimit::new("turn_malformed", window, 5),
            misc_log: Arc::new(RateLimit::new("turn_other", window, 10)),
            alloc_log: RateLimit::new("turn_allocation", window, 20),
        }
    }
}

/// A username fit for a log line: bounded and escaped by `Debug` formatting.
pub(crate) fn loggable(username: &str) -> String {
    username.chars().take(64).collect()
}
