//! Placeholder: UDP request/reply probe.
use super::{CheckFuture, HealthCheck};
use std::net::SocketAddr;
pub struct UdpCheck;
impl UdpCheck {
    pub fn new(_send: Vec<u8>, _expect: Option<Vec<u8>>) -> Self {
        UdpCheck
    }
}
impl HealthCheck for UdpCheck {
    fn check(&self, _target: SocketAddr) -> CheckFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}
