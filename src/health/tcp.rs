//! TCP connect probe (`type: tcp`): the target is healthy when a TCP handshake
//! completes. Also home of the connect-error mapping the HTTP probe reuses.

use super::{CheckFuture, HealthCheck, ProbeError, Reason};
use std::io;
use std::net::SocketAddr;
use tokio::net::TcpStream;

/// Healthy when `connect()` succeeds; the connection is closed again at once.
pub struct TcpCheck;

impl HealthCheck for TcpCheck {
    fn check(&self, target: SocketAddr) -> CheckFuture<'_> {
        Box::pin(async move {
            // Dropping the stream closes it; we only care that the handshake completed.
            TcpStream::connect(target).await.map_err(connect_error)?;
            Ok(())
        })
    }
}

/// Maps a failed TCP connect: an RST (nothing listening) gets its own reason because it
/// is a definite "down", everything else keeps the OS error for `/status`.
/// Out of descriptors or local ports is `LocalError`: the balancer's problem, not the
/// server's.
pub(super) fn connect_error(e: io::Error) -> ProbeError {
    let reason = if e.kind() == io::ErrorKind::ConnectionRefused {
        Reason::ConnectRefused
    } else {
        Reason::ProbeFailed
    };
    super::probe_error(&e, reason, format!("connect: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use tokio::net::TcpListener;
    use tokio::time::timeout;

    #[tokio::test]
    async fn tcp_live_target_is_ok() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        // The kernel completes the handshake from the backlog; no accept needed.
        let res = timeout(Duration::from_secs(2), TcpCheck.check(target)).await;
        assert_eq!(res, Ok(Ok(())));
    }

    #[test]
    fn local_resource_errors_are_local_not_server_failures() {
        use nix::errno::Errno;
        for errno in [
            Errno::EMFILE,
            Errno::ENFILE,
            Errno::ENOBUFS,
            Errno::ENOMEM,
            Errno::EADDRNOTAVAIL,
        ] {
            let err = connect_error(io::Error::from_raw_os_error(errno as i32));
            assert_eq!(err.reason, Reason::LocalError, "{errno}: {err}");
        }
        let refused = connect_error(io::Error::from_raw_os_error(Errno::ECONNREFUSED as i32));
        assert_eq!(refused.reason, Reason::ConnectRefused);
        let other = connect_error(io::Error::from_raw_os_error(Errno::ETIMEDOUT as i32));
        assert_eq!(other.reason, Reason::ProbeFailed);
    }

    #[tokio::test]
    async fn tcp_closed_port_is_connect_refused_quickly() {
        let target = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let started = Instant::now();
        let res = timeout(Duration::from_secs(1), TcpCheck.check(target))
            .await
            .expect("refused connect must not wait for the caller's timeout");
        let err = res.expect_err("nothing listens there");
        assert_eq!(err.reason, Reason::ConnectRefused, "{err}");
        assert!(started.elapsed() < Duration::from_millis(500));
    }
}
