//! The data plane: UDP and TCP listeners that forward client traffic to the server the
//! routing snapshot picks. Start reading at `udp.rs`.

pub mod tcp;
pub mod sys;
pub mod udp;
