//! mediagate: an active-passive failover load balancer for WebRTC media gateways.
//!
//! Where a packet goes: `proxy::udp` / `proxy::tcp` receive it, look up or create the
//! session, ask `upstream::snapshot` (an immutable routing snapshot published by the
//! control plane in `upstream::controller`) for a server, and forward it. Health
//! (`health`) and discovery feed the controller; `admin` reads snapshots and sends it
//! commands; `app` wires everything together.
//!
//! The modules stand on floors, and a module imports only from the floors below it (a
//! lower floor that needs something from above takes it as a value, a trait or a
//! callback). `ARCHITECTURE.md` explains each floor, the packet path and the control
//! path; `tests/architecture.rs` checks every import against this table, which must match
//! the one there:
//!
//! ```text
//! 0 base: sockio ratelog tlsclient proxyproto flows workers
//! 1 configuration: config
//! 2 observability: metrics logging
//! 3 signals: health offload fdbudget events
//! 4 discovery: discovery
//! 5 control plane: upstream
//! 6 data plane and replicas: proxy turn cluster
//! 7 admin API: admin
//! 8 wiring: app
//! 9 entry points: cli run demo
//! ```

pub mod admin;
pub mod app;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod events;
pub mod fdbudget;
pub mod flows;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod offload;
pub mod proxy;
pub mod proxyproto;
pub(crate) mod ratelog;
pub mod run;
pub mod sockio;
pub mod tlsclient;
pub mod turn;
pub mod upstream;
pub mod workers;
