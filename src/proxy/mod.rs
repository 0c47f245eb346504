//! The data plane: UDP and TCP listeners that forward client traffic to the server the
//! routing snapshot picks. Start reading at `udp/mod.rs`.

pub mod ports;
pub mod sources;
pub mod tcp;
pub mod udp;

/// The batched socket calls, where they lived before they moved below the data plane (the
/// TURN relay uses them too); kept so `mediagate::proxy::sys` paths still work.
pub use crate::sockio as sys;
