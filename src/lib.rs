//! mediagate: an active-passive failover load balancer for WebRTC media gateways.
//!
//! Where a packet goes: `proxy::udp` / `proxy::tcp` receive it, look up or create the
//! session, ask `upstream::snapshot` (an immutable routing snapshot published by the
//! control plane in `upstream::controller`) for a server, and forward it. Health
//! (`health`) and discovery feed the controller; `admin` reads snapshots and sends it
//! commands; `app` wires everything together.

pub mod config;
pub mod health;
pub mod turn;
pub mod metrics;
pub mod upstream;
pub mod proxy;
pub mod admin;
pub mod app;
pub mod cli;
pub mod demo;
pub mod logging;
pub mod run;
pub mod workers;
pub mod flows;
pub mod loadgen;
pub mod discovery;
