//! Placeholder: TCP connect probe.
use super::{CheckFuture, HealthCheck};
use std::net::SocketAddr;
pub struct TcpCheck;
impl HealthCheck for TcpCheck {
    fn check(&self, _target: SocketAddr) -> CheckFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}
