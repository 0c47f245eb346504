//! Discovery: turns the server references of an upstream (`10.0.0.1:5004`, DNS names,
//! `node/NAME`, `node/*`) into the concrete, ordered server list its controller runs.
//!
//! Each upstream gets a `watch` channel of [`Target`] lists: the full list in priority
//! order (primary refs first, in written order, then backup refs), re-sent whole on every
//! change. Static entries never change; DNS entries follow their records' TTL; `node/…`
//! entries follow Kubernetes EndpointSlices and Node readiness.

use crate::health::Reason;
use crate::upstream::Tier;
use std::net::IpAddr;

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
