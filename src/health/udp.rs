//! UDP request/reply probe (`type: udp`), plus the connected-socket plumbing it
//! shares with the STUN probe.
//!
//! Every check uses a fresh ephemeral socket that is `connect`ed to the target. That buys
//! two things: the kernel drops datagrams from anyone but the target, and an ICMP error
//! for our datagram (port/host/network unreachable) is reported on the socket, so a dead
//! target fails at once instead of running into the caller's timeout. A fresh socket per
//! check also means a late reply to an earlier check can never be taken for this one.
//!
//! Non-matching replies: when `expect` is set and the target answers with a datagram that
//! does not contain it, the check fails at once with `ProbeFailed` (the detail shows what
//! came back). Only the target can send to our connected socket and nothing else is in
//! flight on it, so such a datagram is the target's answer to this probe — typically a
//! "not ready"/"draining" reply — and waiting for the timeout would only slow detection.

use super::{CheckFuture, HealthCheck, ProbeError, Reason};
use nix::errno::Errno;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use tokio::net::UdpSocket;

/// Receive buffer for replies. Health replies are tiny; the kernel truncates a longer
/// datagram, so `expect` must occur within the first `RECV_BUF` bytes of the reply.
pub(super) const RECV_BUF: usize = 2048;

/// How much of a payload is quoted in a failure detail.
const EXCERPT_LEN: usize = 64;

/// Sends `send`, healthy on the first reply (that contains `expect`, when set).
pub struct UdpCheck {
    send: Vec<u8>,
    expect: Option<Vec<u8>>,
}

impl UdpCheck {
    pub fn new(send: Vec<u8>, expect: Option<Vec<u8>>) -> Self {
        UdpCheck { send, expect }
    }
}

impl HealthCheck for UdpCheck {
    fn check(&self, target: SocketAddr) -> CheckFuture<'_> {
        Box::pin(async move {
            let sock = connected_socket(target).await?;
            sock.send(&self.send)
                .await
                .map_err(|e| socket_error("send", &e))?;
            let mut buf = [0u8; RECV_BUF];
            let n = sock
                .recv(&mut buf)
                .await
                .map_err(|e| socket_error("recv", &e))?;
            let reply = &buf[..n];
            match &self.expect {
                Some(want) if !contains(reply, want) => Err(ProbeError::new(
                    Reason::ProbeFailed,
                    format!(
                        "reply {} does not contain {}",
                        excerpt(reply),
                        excerpt(want)
                    ),
                )),
                _ => Ok(()),
            }
        })
    }
}

/// A fresh ephemeral UDP socket of the target's address family, connected to it.
pub(super) async fn connected_socket(target: SocketAddr) -> Result<UdpSocket, ProbeError> {
    let local: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local)
        .await
        .map_err(|e| super::probe_error(&e, Reason::ProbeFailed, format!("bind {local}: {e}")))?;
    // Connecting a UDP socket sends nothing, but fails at once when there is no route.
    sock.connect(target)
        .await
        .map_err(|e| socket_error("connect", &e))?;
    Ok(sock)
}

/// Maps an error on a connected UDP socket. The kernel turns ICMP destination-unreachable
/// messages into these errnos (port → ECONNREFUSED, host/net → EHOSTUNREACH/ENETUNREACH,
/// unknown host → EHOSTDOWN, isolated host → ENONET); all of them mean the target
/// cannot be reached right now, which is `IcmpUnreachable`.
pub(super) fn socket_error(op: &str, e: &io::Error) -> ProbeError {
    let icmp = matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    ) || matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EHOSTDOWN | Errno::ENONET)
    );
    let reason = if icmp {
        Reason::IcmpUnreachable
    } else {
        Reason::ProbeFailed
    };
    // ENOBUFS on send, EMFILE on socket(): the balancer's problem, not the target's.
    super::probe_error(e, reason, format!("{op}: {e}"))
}

/// Byte-substring search; an empty needle is found everywhere.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    // `windows(0)` would panic, and an empty `expect` can only mean "any reply".
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// A printable, bounded quote of a payload for `/status`.
fn excerpt(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(EXCERPT_LEN)];
    let ellipsis = if bytes.len() > EXCERPT_LEN { "…" } else { "" };
    format!("\"{}{ellipsis}\"", shown.escape_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use tokio::time::timeout;

    /// A UDP responder on loopback that answers every datagram with `reply`.
    async fn responder(reply: &'static [u8]) -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((_, peer)) = sock.recv_from(&mut buf).await {
                let _ = sock.send_to(reply, peer).await;
            }
        });
        addr
    }

    /// A loopback port nobody listens on: bound once to reserve a number, then closed.
    async fn dead_udp_port() -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.local_addr().unwrap()
    }

    async fn probe(check: &UdpCheck, target: SocketAddr) -> Result<(), ProbeError> {
        timeout(Duration::from_secs(2), check.check(target))
            .await
            .expect("probe should have finished well before 2 s")
    }

    #[tokio::test]
    async fn udp_any_reply_is_ok_without_expect() {
        let target = responder(b"whatever").await;
        let check = UdpCheck::new(b"ping".to_vec(), None);
        assert_eq!(probe(&check, target).await, Ok(()));
    }

    #[tokio::test]
    async fn udp_expect_matching_substring_is_ok() {
        let target = responder(b"status: PONG ok").await;
        let check = UdpCheck::new(b"ping".to_vec(), Some(b"PONG".to_vec()));
        assert_eq!(probe(&check, target).await, Ok(()));
    }

    #[tokio::test]
    async fn udp_expect_not_matching_fails_at_once() {
        let target = responder(b"DRAINING\x00\xff").await;
        let check = UdpCheck::new(b"ping".to_vec(), Some(b"PONG".to_vec()));
        let err = probe(&check, target).await.unwrap_err();
        assert_eq!(err.reason, Reason::ProbeFailed);
        assert_eq!(
            err.detail,
            r#"reply "DRAINING\x00\xff" does not contain "PONG""#
        );
    }

    #[tokio::test]
    async fn udp_empty_expect_matches_any_reply() {
        let target = responder(b"").await;
        let check = UdpCheck::new(b"ping".to_vec(), Some(Vec::new()));
        assert_eq!(probe(&check, target).await, Ok(()));
    }

    #[tokio::test]
    async fn udp_closed_port_is_icmp_unreachable_quickly() {
        let target = dead_udp_port().await;
        let check = UdpCheck::new(b"ping".to_vec(), None);
        let started = Instant::now();
        let err = probe(&check, target).await.unwrap_err();
        assert_eq!(err.reason, Reason::IcmpUnreachable, "{err}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "took {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn udp_hung_target_waits_for_the_callers_timeout() {
        // Bound, so no ICMP comes back, but it never answers.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = silent.local_addr().unwrap();
        let check = UdpCheck::new(b"ping".to_vec(), None);
        let started = Instant::now();
        let res = timeout(Duration::from_millis(200), check.check(target)).await;
        assert!(res.is_err(), "probe completed without a reply: {res:?}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(silent);
    }

    #[test]
    fn local_errors_on_the_probe_socket_are_local() {
        use nix::errno::Errno;
        for errno in [Errno::EMFILE, Errno::ENOBUFS, Errno::ENFILE] {
            let e = io::Error::from_raw_os_error(errno as i32);
            assert_eq!(socket_error("send", &e).reason, Reason::LocalError);
        }
        let refused = io::Error::from_raw_os_error(Errno::ECONNREFUSED as i32);
        assert_eq!(
            socket_error("recv", &refused).reason,
            Reason::IcmpUnreachable
        );
    }

    #[test]
    fn excerpt_is_bounded_and_printable() {
        let long = vec![b'a'; 100];
        let e = excerpt(&long);
        assert_eq!(e, format!("\"{}…\"", "a".repeat(EXCERPT_LEN)));
        assert_eq!(excerpt(b"\r\n"), r#""\r\n""#);
    }

    #[test]
    fn contains_handles_edge_cases() {
        assert!(contains(b"abc", b""));
        assert!(contains(b"abc", b"abc"));
        assert!(contains(b"xabcx", b"bc"));
        assert!(!contains(b"ab", b"abc"));
        assert!(!contains(b"", b"a"));
    }
}
