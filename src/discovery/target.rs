//! What discovery hands the upstream layer: one concrete server ([`Target`]), its place in
//! the list ([`Tier`]) and discovery's own verdict on it ([`Readiness`]). They live here,
//! below `upstream` (ARCHITECTURE.md), which runs them and re-exports [`Tier`].

use crate::health::Reason;
use std::net::IpAddr;

/// Position of a server in its upstream's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    Primary,
    Backup,
}

impl Tier {
    pub fn as_str(&self) -> &'static str {
        match self {
            Tier::Primary => "primary",
            Tier::Backup => "backup",
        }
    }
}

/// One concrete server of an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub ip: IpAddr,
    /// `None`: the listener's port (or each port of its range).
    pub port: Option<u16>,
    pub tier: Tier,
    /// Discovery's own verdict: a Kubernetes endpoint that is not ready, or whose node is
    /// NotReady, is down at once whatever the probes say.
    pub readiness: Readiness,
}

/// Whether discovery considers a target usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Down at once, with the reason used in events and metrics
    /// (`endpoint_not_ready`, `node_not_ready`).
    NotReady(Reason),
}
