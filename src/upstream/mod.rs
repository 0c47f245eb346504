//! Upstreams: ordered primary/backup server lists and everything that decides where a new
//! session goes.
//!
//! - `server`: [`ServerHandle`], the data plane's view of one server (session count,
//!   eviction epoch).
//! - `select`: the balancing policies, pure functions over a snapshot.
//! - `snapshot`: the immutable routing snapshot and [`UpstreamRoute`], the arc-swap the
//!   data plane reads on every new session.
//! - `state`: the control logic — health, admin states, active set, failover/failback
//!   events — as plain synchronous code.
//! - `controller`: the task that feeds probe results and passive signals into `state` and
//!   publishes snapshots.

pub mod control;
pub mod controller;
pub mod group;
pub mod select;
pub mod server;
pub mod snapshot;
pub mod state;

pub use control::{Control, UpstreamSpec};
pub use controller::UpstreamRuntime;
pub use group::NodeGroups;
pub use server::{ServerHandle, Tier};
pub use snapshot::{Snapshot, UpstreamRoute};
pub use state::{AdminState, Event, EventKind, UpstreamState};

impl From<&Event> for crate::events::EventStatus {
    fn from(e: &Event) -> Self {
        crate::events::EventStatus {
            at: humantime::format_rfc3339_millis(e.at).to_string(),
            kind: match e.kind {
                EventKind::Failover => "failover",
                EventKind::Failback => "failback",
                EventKind::AllDown => "all_down",
            }
            .to_string(),
            from: e.from.clone(),
            to: e.to.clone(),
            reason: e.reason.map(str::to_string),
            detection_ms: e.detection_ms,
            confirmed_by: e.confirmed_by,
            confirm_ms: e.confirm_ms,
            sessions_moved: e.sessions_moved,
        }
    }
}
