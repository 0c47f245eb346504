//! What an upstream's controller is told: the [`Control`] messages (from probers, the data
//! plane, the admin API, discovery, reloads and the cluster) and the [`UpstreamSpec`] it
//! takes from the configuration. Kept apart from the controller task so the routing
//! snapshot can send passive signals without depending on the controller.

use super::server::ServerHandle;
use super::state::{AdminState, Policy};
use crate::config::{HealthType, UpstreamConfig};
use crate::discovery::Target;
use crate::health::{ProbeError, Reason};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::oneshot;

/// Messages to an upstream's controller.
#[derive(Debug)]
pub enum Control {
    Probe {
        server: Arc<ServerHandle>,
        result: Result<(), ProbeError>,
        at: Instant,
    },
    Passive {
        server: Arc<ServerHandle>,
        reason: Reason,
        detail: String,
        at: Instant,
    },
    SetAdmin {
        server: String,
        state: AdminState,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Failback {
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// A new server list, in priority order (discovery, reload).
    Servers(Vec<Target>),
    /// The peers' health verdict (`cluster:`): label → `peer:<node>:<reason>` for every
    /// server some live peer sees down.
    PeerDown(HashMap<String, String>),
    /// The node group's verdict: host → `group:<upstream>:<reason>` for every host another
    /// member sees down. Answered with the events it caused (published by the group).
    GroupDown {
        down: HashMap<std::net::IpAddr, String>,
        reply: oneshot::Sender<Vec<crate::events::EventStatus>>,
    },
    /// A reload: new settings, then a new server list; answered once both apply.
    Reload {
        spec: Box<UpstreamSpec>,
        targets: Vec<Target>,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// What a controller takes from the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSpec {
    pub config: UpstreamConfig,
    /// Port probed and shown for port-less servers (the first listener's port).
    pub default_port: u16,
    /// Protocols whose passive failures mark a server down.
    pub passive: crate::config::ProtocolSet,
}

impl UpstreamSpec {
    pub(super) fn policy(&self) -> Policy {
        let c = &self.config;
        Policy {
            balance: c.balance,
            failback: c.failback,
            failback_delay: c.failback_delay.get(),
            keep_last: c.when_all_down == crate::config::WhenAllDown::KeepLast,
            fall: c.health.fall,
            rise: c.health.rise,
            probe_less: c.health.kind == HealthType::None,
        }
    }
}
