//! The `/status` document. Field names are a contract: add, never rename.

use super::Backend;
pub use crate::events::EventStatus;
use serde::{Deserialize, Serialize};
use std::time::SystemTime;

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_seconds: f64,
    pub ready: bool,
    pub config: ConfigStatus,
    pub listeners: Vec<ListenerStatus>,
    pub upstreams: Vec<UpstreamStatus>,
    /// Present when the TURN service runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn: Option<TurnStatus>,
    /// The file-descriptor budget (see `fdbudget`); absent in documents of older versions.
    #[serde(default)]
    pub fds: Option<FdStatus>,
    /// The replica's peers (`cluster:`), absent without a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterStatus>,
}

/// `fds` in `/status`: the open-file limit and how it is shared.
#[derive(Debug, Serialize, Deserialize)]
pub struct FdStatus {
    /// The open-file limit (RLIMIT_NOFILE).
    pub limit: usize,
    /// Descriptors the process has open now.
    pub open: usize,
    /// Reserved for listen sockets, probes, discovery, admin connections and TURN.
    pub reserve: usize,
    /// What UDP sessions and TCP connections may hold.
    pub budget: usize,
    /// What they hold now.
    pub in_use: usize,
    /// What the configuration may use in all (more than `limit`: it does not fit).
    pub demand: usize,
    /// Sessions and connections refused for lack of budget since start.
    pub refused: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TurnStatus {
    pub allocations: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ConfigStatus {
    pub path: String,
    pub loaded_at: String,
    pub last_reload_error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub protocol: String,
    pub listen: String,
    pub upstream: String,
    pub sessions: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct UpstreamStatus {
    pub name: String,
    pub balance: String,
    pub failback: String,
    pub active: Vec<String>,
    /// No server is eligible and `active` lists the servers that served last, down but
    /// kept (`when_all_down: keep_last`).
    #[serde(default)]
    pub degraded: bool,
    pub failovers: u64,
    pub servers: Vec<ServerStatus>,
    pub events: Vec<EventStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServerStatus {
    pub address: String,
    pub tier: String,
    pub health: String,
    pub admin_state: String,
    pub sessions: usize,
    pub last_change: String,
    pub last_error: Option<String>,
}

/// RFC 3339 with milliseconds, as every time in the document.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Builds the document from the live state.
pub fn build(app: &dyn Backend) -> Status {
    let listeners = app.listeners();
    let upstreams = app
        .upstreams()
        .values()
        .map(|u| {
            let view = u.view();
            UpstreamStatus {
                name: u.name.clone(),
                balance: view.balance.to_string(),
                failback: view.failback.to_string(),
                active: view.active.clone(),
                degraded: view.degraded,
                failovers: view.failovers,
                servers: view
                    .servers
                    .iter()
                    .map(|s| ServerStatus {
                        address: s.handle.label.clone(),
                        tier: s.handle.tier.as_str().to_string(),
                        health: s.health.to_string(),
                        admin_state: s.admin_state.as_str().to_string(),
                        sessions: s.handle.sessions(),
                        last_change: rfc3339(s.last_change),
                        last_error: s.last_error.clone(),
                    })
                    .collect(),
                events: view.events.iter().map(EventStatus::from).collect(),
            }
        })
        .collect();
    Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_seconds: (app.uptime().as_millis() as f64) / 1000.0,
        ready: app.ready(),
        config: app.config_status(),
        listeners,
        upstreams,
        turn: app
            .turn_allocations()
            .map(|allocations| TurnStatus { allocations }),
        fds: Some(fd_status()),
        cluster: app.cluster().map(|c| c.status()),
    }
}

fn fd_status() -> FdStatus {
    let b = crate::fdbudget::global();
    FdStatus {
        limit: b.limit(),
        open: crate::fdbudget::open_now(),
        reserve: b.reserve(),
        budget: b.budget(),
        in_use: b.in_use(),
        demand: b.demand(),
        refused: b.refused(),
    }
}
