//! `cluster:` — optional membership of replicas that act as one balancer (see
//! `crate::cluster`). Absent: a single process, as without it.

use super::values::Dur;
use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;

/// `cluster:` settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// UDP address of the peer (gossip) protocol. Required.
    pub listen: SocketAddr,
    /// Address peers use to reach this replica. Default: `listen` (required when `listen`
    /// is a wildcard address, e.g. to the pod IP through `${POD_IP}:7946`).
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// Peers, `host:port` each: a static address or a DNS name (a headless Service); this
    /// replica's own address in the list is ignored. Default: none.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Shared secret: every peer message carries an HMAC-SHA256 made with it. Required,
    /// at least 16 bytes (or `secret_file`).
    #[serde(default)]
    pub secret: String,
    /// A file holding `secret` (one line). Default none.
    #[serde(default)]
    pub secret_file: Option<String>,
    /// Name of this replica in the cluster (status, `peer:<node>:<reason>`). Default: the
    /// `HOSTNAME` variable (the pod name), else the advertised address.
    #[serde(default)]
    pub node_id: Option<String>,
    /// A peer not heard from for this long leaves the health vote and the status.
    /// Default 3s.
    #[serde(default = "default_peer_timeout")]
    pub peer_timeout: Dur,
    /// Periodic gossip round (changes are also pushed to every peer at once). Default 200ms.
    #[serde(default = "default_gossip_interval")]
    pub gossip_interval: Dur,
    /// Longest a starting replica waits for its peers' admin states before it turns
    /// ready. Default 2s.
    #[serde(default = "default_sync_timeout")]
    pub sync_timeout: Dur,
    /// File that keeps the admin states across restarts of every replica (written with
    /// a temporary file and a rename). Default: none.
    #[serde(default)]
    pub state_file: Option<String>,
    /// In Kubernetes: a ConfigMap (`namespace/name`, or `name` in the pod's namespace)
    /// that keeps the admin states across restarts of every replica (key `state.json`).
    /// Needs get/create/patch on it. Default: none.
    #[serde(default)]
    pub state_configmap: Option<String>,
}

fn default_peer_timeout() -> Dur {
    Dur(Duration::from_secs(3))
}
fn default_gossip_interval() -> Dur {
    Dur(Duration::from_millis(200))
}
fn default_sync_timeout() -> Dur {
    Dur(Duration::from_secs(2))
}
