//! Placeholder: STUN Binding probe.
use super::{CheckFuture, HealthCheck};
use std::net::SocketAddr;
pub struct StunCheck;
impl HealthCheck for StunCheck {
    fn check(&self, _target: SocketAddr) -> CheckFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}
