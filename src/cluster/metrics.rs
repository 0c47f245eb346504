//! The cluster's metrics (`mediagate_cluster_…`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Why a frame was dropped (the `reason` label of `mediagate_cluster_messages_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    Malformed,
    BadMac,
    Stale,
    /// Addressed to another replica (a frame captured on its way to one peer, replayed
    /// to another).
    Misdirected,
    Replay,
}

impl Reject {
    pub const ALL: [Reject; 5] = [
        Reject::Malformed,
        Reject::BadMac,
        Reject::Stale,
        Reject::Misdirected,
        Reject::Replay,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::BadMac => "bad_mac",
            Reject::Stale => "stale",
            Reject::Misdirected => "misdirected",
            Reject::Replay => "replay",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Handles of the cluster metrics.
#[derive(Clone, Debug)]
pub struct ClusterMetrics {
    /// `mediagate_cluster_peers_known`: peers this replica has heard of.
    pub peers_known: Gauge,
    /// `mediagate_cluster_peers_alive`: peers heard within `peer_timeout`.
    pub peers_alive: Gauge,
    /// `mediagate_cluster_messages_sent_total`.
    pub sent: Counter,
    /// `mediagate_cluster_messages_received_total`: accepted (authenticated) messages.
    pub received: Counter,
    /// `mediagate_cluster_messages_rejected_total{reason}`: malformed, bad_mac, stale,
    /// misdirected, replay.
    rejected: Family<ReasonLabels, Counter>,
    /// `mediagate_cluster_disagreements`: live peers whose view of down servers differs
    /// from this replica's own.
    pub disagreements: Gauge,
}

impl ClusterMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = ClusterMetrics {
            peers_known: Gauge::default(),
            peers_alive: Gauge::default(),
            sent: Counter::default(),
            received: Counter::default(),
            rejected: Family::default(),
            disagreements: Gauge::default(),
        };
        for r in Reject::ALL {
            let _ = m
                .rejected
                .get_or_create(&ReasonLabels { reason: r.as_str() });
        }
        registry.register(
            "mediagate_cluster_peers_known",
            "Peer replicas known",
            m.peers_known.clone(),
        );
        registry.register(
            "mediagate_cluster_peers_alive",
            "Peer replicas heard within cluster.peer_timeout",
            m.peers_alive.clone(),
        );
        registry.register(
            "mediagate_cluster_messages_sent",
            "Peer protocol messages sent",
            m.sent.clone(),
        );
        registry.register(
            "mediagate_cluster_messages_received",
            "Authenticated peer protocol messages received",
            m.received.clone(),
        );
        registry.register(
            "mediagate_cluster_messages_rejected",
            "Peer protocol messages dropped, by reason",
            m.rejected.clone(),
        );
        registry.register(
            "mediagate_cluster_disagreements",
            "Live peers whose down servers differ from this replica's own view",
            m.disagreements.clone(),
        );
        m
    }

    /// Back to no peers (the `cluster:` section was removed).
    pub fn clear(&self) {
        self.peers_known.set(0);
        self.peers_alive.set(0);
        self.disagreements.set(0);
    }

    pub fn rejected(&self, r: Reject) {
        self.rejected
            .get_or_create(&ReasonLabels { reason: r.as_str() })
            .inc();
    }
}
