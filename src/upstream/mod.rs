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
pub mod select;
pub mod server;
pub mod snapshot;
pub mod state;

pub use control::{Control, UpstreamSpec};
pub use controller::UpstreamRuntime;
pub use server::{ServerHandle, Tier};
pub use snapshot::{Snapshot, UpstreamRoute};
pub use state::{AdminState, Event, EventKind, UpstreamState};
