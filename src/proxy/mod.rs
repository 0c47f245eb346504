//! The data plane: UDP and TCP listeners that forward client traffic to the server the
//! routing snapshot picks. Start reading at `udp/mod.rs`.

pub mod ports;
pub mod sources;
pub mod sys;
pub mod tcp;
pub mod udp;
