//! mediagate: an active-passive failover load balancer for WebRTC media gateways.
//!
//! Where a packet goes: `proxy::udp` / `proxy::tcp` receive it, look up or create the
//! session, ask `upstream::snapshot` (an immutable routing snapshot published by the
//! control plane in `upstream::controller`) for a server, and forward it. Health
//! (`health`) and discovery feed the controller; `admin` reads snapshots and sends it
//! commands; `app` wires everything together.

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
pub mod tlsclient;
pub mod turn;
pub mod upstream;
pub mod workers;
