//! STUN Binding probe (`type: stun`): sends an RFC 5389 Binding request over UDP
//! and is healthy on a Binding success response carrying our transaction id.
//!
//! The request is encoded with the `stun` crate (webrtc-rs, the TURN service's own STUN
//! stack): a 20-byte header (type 0x0001, magic cookie 0x2112A442, random 96-bit
//! transaction id) followed by a FINGERPRINT attribute (CRC-32 by the crate). The
//! FINGERPRINT matters for ICE agents: libnice (Janus) runs in a mode that demands it
//! and silently drops requests without one, which would look like a timeout.
//!
//! Replies are parsed defensively. A datagram that is not a well-formed STUN message,
//! has a bad FINGERPRINT, carries another transaction id, or is not a Binding response is
//! ignored and the probe keeps waiting (the caller's timeout bounds it): such datagrams
//! say nothing about this probe. A Binding error response fails the probe at once.
//!
//! ICE ports: an ICE agent requires short-term credentials (USERNAME and
//! MESSAGE-INTEGRITY) that a load balancer cannot know, so libnice (Janus) answers this
//! unauthenticated request with a 400 error response, and a TURN server that insists on
//! authentication may answer 401. Such an answer carries our transaction id, so a live
//! STUN stack produced it: errors 400 and 401 count as healthy. Any other error code
//! (500 Server Error, 503…) fails the probe.

use super::udp::{RECV_BUF, connected_socket, socket_error};
use super::{CheckFuture, HealthCheck, ProbeError, Reason};
use std::net::SocketAddr;
use stun::agent::TransactionId as StunTransactionId;
use stun::attributes::{ATTR_ERROR_CODE, ATTR_FINGERPRINT};
use stun::error_code::ErrorCodeAttribute;
use stun::fingerprint::FINGERPRINT;
use stun::message::{
    BINDING_ERROR, BINDING_REQUEST, BINDING_SUCCESS, Getter, MAGIC_COOKIE, MESSAGE_HEADER_SIZE,
    Message, TRANSACTION_ID_SIZE,
};

const HEADER_LEN: usize = MESSAGE_HEADER_SIZE;
/// Longest reason phrase quoted from an error response.
const MAX_REASON_LEN: usize = 128;

type TransactionId = [u8; TRANSACTION_ID_SIZE];

/// Healthy on a Binding success response to a fresh Binding request.
pub struct StunCheck;

impl HealthCheck for StunCheck {
    fn check(&self, target: SocketAddr) -> CheckFuture<'_> {
        Box::pin(async move {
            // A new id per check, so nothing from an earlier check can be mistaken for ours.
            let txid: TransactionId = rand::random();
            let request = encode_binding_request(&txid).map_err(|e| {
                ProbeError::new(Reason::ProbeFailed, format!("encoding the request: {e}"))
            })?;
            let sock = connected_socket(target).await?;
            sock.send(&request)
                .await
                .map_err(|e| socket_error("send", &e))?;
            let mut buf = [0u8; RECV_BUF];
            loop {
                let n = sock
                    .recv(&mut buf)
                    .await
                    .map_err(|e| socket_error("recv", &e))?;
                match classify(&buf[..n], &txid) {
                    Reply::Success | Reply::AliveButRefused => return Ok(()),
                    Reply::Error(detail) => {
                        return Err(ProbeError::new(Reason::ProbeFailed, detail));
                    }
                    Reply::Ignore(why) => {
                        tracing::debug!(%target, why, len = n, "stun probe ignored a datagram");
                    }
                }
            }
        })
    }
}

/// What a received datagram means for the probe.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Success,
    /// A Binding error response proving the agent alive (400/401: it wants credentials).
    AliveButRefused,
    /// Any other Binding error response; the text goes to `ProbeError::detail`.
    Error(String),
    /// Not an answer to our request; keep waiting.
    Ignore(&'static str),
}

/// A Binding request with a FINGERPRINT, ready to send (the `stun` crate's encoder).
fn encode_binding_request(txid: &TransactionId) -> Result<Vec<u8>, stun::Error> {
    let mut m = Message::new();
    m.build(&[
        Box::new(StunTransactionId(*txid)),
        Box::new(BINDING_REQUEST),
        Box::new(FINGERPRINT),
    ])?;
    Ok(m.raw)
}

/// Decides what `datagram` means for the request with transaction id `txid`. The framing
/// checks that tell a STUN answer from other traffic on a media port come first; the
/// attributes are then decoded by the `stun` crate. Whatever arrives, this returns.
fn classify(datagram: &[u8], txid: &TransactionId) -> Reply {
    let Some(header) = datagram.get(..HEADER_LEN) else {
        return Reply::Ignore("shorter than a STUN header");
    };
    // The two top bits of every STUN message are zero (RFC 5389 §6); this is what lets
    // STUN share a port with RTP/DTLS, and what a media port's other traffic fails.
    if header[0] & 0xC0 != 0 {
        return Reply::Ignore("not STUN (leading bits)");
    }
    if header[4..8] != MAGIC_COOKIE.to_be_bytes() {
        return Reply::Ignore("not STUN (magic cookie)");
    }
    let body_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if body_len % 4 != 0 || HEADER_LEN + body_len != datagram.len() {
        return Reply::Ignore("length field does not match datagram");
    }
    if header[8..HEADER_LEN] != txid[..] {
        return Reply::Ignore("another transaction");
    }
    let mut m = Message::new();
    m.raw = datagram.to_vec();
    if m.decode().is_err() {
        return Reply::Ignore("truncated attribute");
    }
    // FINGERPRINT is last and covers everything before it (RFC 5389 §15.5); a mismatch
    // means a corrupted or foreign datagram, which the RFC says to drop.
    if m.contains(ATTR_FINGERPRINT)
        && (m.attributes.0.last().map(|a| a.typ) != Some(ATTR_FINGERPRINT)
            || FINGERPRINT.check(&m).is_err())
    {
        return Reply::Ignore("bad FINGERPRINT");
    }

    if m.typ == BINDING_SUCCESS {
        return Reply::Success;
    }
    if m.typ != BINDING_ERROR {
        return Reply::Ignore("not a Binding response");
    }
    match error_code(&m) {
        Some((400 | 401, _)) => Reply::AliveButRefused,
        Some((code, reason)) if reason.is_empty() => Reply::Error(format!("binding error {code}")),
        Some((code, reason)) => Reply::Error(format!("binding error {code} {reason}")),
        None => Reply::Error("binding error response without ERROR-CODE".to_owned()),
    }
}

/// The first ERROR-CODE of `m` (RFC 5389 §15.6) as code and printable reason phrase.
fn error_code(m: &Message) -> Option<(u16, String)> {
    if !m.contains(ATTR_ERROR_CODE) {
        return None;
    }
    let mut attr = ErrorCodeAttribute::default();
    attr.get_from(m).ok()?;
    // The class is 3 bits; the crate keeps the reserved bits of its byte, we drop them.
    let (class, number) = (attr.code.0 / 100, attr.code.0 % 100);
    let code = (class & 0x07) * 100 + number;
    let phrase = &attr.reason[..attr.reason.len().min(MAX_REASON_LEN)];
    // The phrase is only for humans; lossy decoding keeps a broken one from mattering.
    let reason = String::from_utf8_lossy(phrase)
        .chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
        .trim()
        .to_owned();
    Some((code, reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tokio::net::UdpSocket;
    use tokio::time::timeout;

    const TXID: TransactionId = *b"0123456789ab";

    // The test side builds messages by hand, independently of the `stun` crate, so the
    // crate's encoding and CRC are checked against RFC 5389 rather than against themselves.
    const BINDING_REQUEST: u16 = 0x0001;
    const BINDING_SUCCESS: u16 = 0x0101;
    const BINDING_ERROR: u16 = 0x0111;
    const ATTR_ERROR_CODE: u16 = 0x0009;
    const ATTR_FINGERPRINT: u16 = 0x8028;
    const FINGERPRINT_XOR: u32 = 0x5354_554E;

    /// CRC-32 (ISO-HDLC, reflected polynomial 0xEDB88320), bitwise.
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in data {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                let mask = (crc & 1).wrapping_neg();
                crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
            }
        }
        !crc
    }

    /// Builds a STUN message of `msg_type` with the given attributes (type, value);
    /// values are padded, the length field is filled in, and an optional FINGERPRINT
    /// is appended.
    fn message(
        msg_type: u16,
        txid: &TransactionId,
        attrs: &[(u16, &[u8])],
        fingerprint: bool,
    ) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&msg_type.to_be_bytes());
        m.extend_from_slice(&[0, 0]);
        m.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        m.extend_from_slice(txid);
        for (t, v) in attrs {
            m.extend_from_slice(&t.to_be_bytes());
            m.extend_from_slice(&(v.len() as u16).to_be_bytes());
            m.extend_from_slice(v);
            m.resize(m.len().next_multiple_of(4), 0);
        }
        let set_len = |m: &mut Vec<u8>, extra: usize| {
            let len = (m.len() - HEADER_LEN + extra) as u16;
            m[2..4].copy_from_slice(&len.to_be_bytes());
        };
        if fingerprint {
            set_len(&mut m, 8);
            let fp = crc32(&m) ^ FINGERPRINT_XOR;
            m.extend_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
            m.extend_from_slice(&4u16.to_be_bytes());
            m.extend_from_slice(&fp.to_be_bytes());
        } else {
            set_len(&mut m, 0);
        }
        m
    }

    /// XOR-MAPPED-ADDRESS for 127.0.0.1:1 — the content is irrelevant to the probe but
    /// makes the canned responses look like real ones.
    const XOR_MAPPED: (u16, &[u8]) = (0x0020, &[0, 1, 0x21, 0x13, 0x5e, 0x12, 0xa4, 0x43]);

    /// A fake STUN server: for each request it sends the datagrams `respond` builds from
    /// the request's transaction id.
    async fn fake_server<F>(respond: F) -> SocketAddr
    where
        F: Fn(&TransactionId) -> Vec<Vec<u8>> + Send + 'static,
    {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                let Some(txid) = buf[..n]
                    .get(8..HEADER_LEN)
                    .and_then(|t| TransactionId::try_from(t).ok())
                else {
                    continue;
                };
                for datagram in respond(&txid) {
                    let _ = sock.send_to(&datagram, peer).await;
                }
            }
        });
        addr
    }

    async fn probe(target: SocketAddr) -> Result<(), ProbeError> {
        timeout(Duration::from_secs(2), StunCheck.check(target))
            .await
            .expect("probe should have finished well before 2 s")
    }

    #[test]
    fn crc32_check_value() {
        // The standard CRC-32 check value, by the test's CRC and by the crate's FINGERPRINT.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(
            stun::fingerprint::fingerprint_value(b"123456789") ^ FINGERPRINT_XOR,
            0xCBF4_3926
        );
    }

    #[test]
    fn request_layout() {
        let m = encode_binding_request(&TXID).unwrap();
        assert_eq!(m.len(), 28, "header + FINGERPRINT");
        assert_eq!(&m[0..2], &[0x00, 0x01], "Binding request");
        assert_eq!(&m[2..4], &[0x00, 0x08], "length covers FINGERPRINT");
        assert_eq!(&m[4..8], &[0x21, 0x12, 0xA4, 0x42], "magic cookie");
        assert_eq!(&m[8..20], &TXID);
        assert_eq!(&m[20..24], &[0x80, 0x28, 0x00, 0x04], "FINGERPRINT header");
        // Same bytes as the independent test builder.
        assert_eq!(m, message(BINDING_REQUEST, &TXID, &[], true));
    }

    #[test]
    fn classify_responses() {
        let ok = message(BINDING_SUCCESS, &TXID, &[XOR_MAPPED], true);
        assert_eq!(classify(&ok, &TXID), Reply::Success);
        let ok_no_fp = message(BINDING_SUCCESS, &TXID, &[XOR_MAPPED], false);
        assert_eq!(classify(&ok_no_fp, &TXID), Reply::Success);

        let err = message(
            BINDING_ERROR,
            &TXID,
            &[(ATTR_ERROR_CODE, b"\0\0\x04\x00Bad Request")],
            true,
        );
        assert_eq!(classify(&err, &TXID), Reply::AliveButRefused);
        let bare_err = message(BINDING_ERROR, &TXID, &[], false);
        assert_eq!(
            classify(&bare_err, &TXID),
            Reply::Error("binding error response without ERROR-CODE".into())
        );

        let other = message(BINDING_SUCCESS, b"zzzzzzzzzzzz", &[XOR_MAPPED], true);
        assert_eq!(
            classify(&other, &TXID),
            Reply::Ignore("another transaction")
        );

        let mut corrupt = ok.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        assert_eq!(classify(&corrupt, &TXID), Reply::Ignore("bad FINGERPRINT"));

        // A request echoed back (same id) is not a response.
        let echo = encode_binding_request(&TXID).unwrap();
        assert_eq!(
            classify(&echo, &TXID),
            Reply::Ignore("not a Binding response")
        );
    }

    #[test]
    fn classify_never_panics_on_garbage() {
        let ok = message(
            BINDING_ERROR,
            &TXID,
            &[XOR_MAPPED, (ATTR_ERROR_CODE, b"\0\0\x05\x03\xff\xfe")],
            true,
        );
        // Every prefix, and every single-byte corruption of a valid message.
        for cut in 0..=ok.len() {
            let _ = classify(&ok[..cut], &TXID);
        }
        for i in 0..ok.len() {
            for b in [0x00, 0x7f, 0xff] {
                let mut m = ok.clone();
                m[i] = b;
                let _ = classify(&m, &TXID);
            }
        }
        // Attribute lengths that run past the end.
        let mut m = message(BINDING_SUCCESS, &TXID, &[(0x8022, b"abcd")], false);
        m[22..24].copy_from_slice(&0xfffcu16.to_be_bytes());
        assert_eq!(classify(&m, &TXID), Reply::Ignore("truncated attribute"));
        assert_eq!(
            classify(&[0u8; 19], &TXID),
            Reply::Ignore("shorter than a STUN header")
        );
        assert_eq!(
            classify(&[0x80; 20], &TXID),
            Reply::Ignore("not STUN (leading bits)")
        );
    }

    #[test]
    fn error_code_phrase_is_sanitised() {
        let code = |value: &[u8]| {
            let raw = message(BINDING_ERROR, &TXID, &[(ATTR_ERROR_CODE, value)], false);
            let mut m = Message::new();
            m.raw = raw;
            m.decode().unwrap();
            error_code(&m)
        };
        assert_eq!(
            code(b"\0\0\x04\x01Unauthorized\r\n"),
            Some((401, "Unauthorized".into()))
        );
        assert_eq!(code(b"\0\0\x05\x00\xff"), Some((500, "\u{fffd}".into())));
        // Reserved bits above the 3-bit class are ignored.
        assert_eq!(code(b"\0\0\xfc\x01"), Some((401, String::new())));
        assert_eq!(code(b"\0\0\x04"), None);
    }

    #[tokio::test]
    async fn stun_success_response_is_ok() {
        let target =
            fake_server(|txid| vec![message(BINDING_SUCCESS, txid, &[XOR_MAPPED], true)]).await;
        assert_eq!(probe(target).await, Ok(()));
    }

    #[tokio::test]
    async fn stun_error_response_is_probe_failed() {
        let target = fake_server(|txid| {
            vec![message(
                BINDING_ERROR,
                txid,
                &[(ATTR_ERROR_CODE, b"\0\0\x05\x00Server Error")],
                true,
            )]
        })
        .await;
        let err = probe(target).await.unwrap_err();
        assert_eq!(err.reason, Reason::ProbeFailed);
        assert_eq!(err.detail, "binding error 500 Server Error");
    }

    #[tokio::test]
    async fn stun_credential_errors_prove_the_agent_alive() {
        // libnice answers an unauthenticated Binding request with 400; TURN servers may 401.
        for code in [
            b"\0\0\x04\x00Bad Request".as_slice(),
            b"\0\0\x04\x01Unauthorized",
        ] {
            let code = code.to_vec();
            let target = fake_server(move |txid| {
                vec![message(
                    BINDING_ERROR,
                    txid,
                    &[(ATTR_ERROR_CODE, &code)],
                    true,
                )]
            })
            .await;
            assert_eq!(probe(target).await, Ok(()));
        }
    }

    #[tokio::test]
    async fn stun_ignores_wrong_transaction_and_garbage_then_accepts_ours() {
        let target = fake_server(|txid| {
            let mut wrong = *txid;
            wrong[0] ^= 0xff;
            vec![
                message(BINDING_SUCCESS, &wrong, &[XOR_MAPPED], true),
                // An error for another transaction must not fail us either.
                message(BINDING_ERROR, &wrong, &[], false),
                b"\x80\x00garbage RTP-looking datagram".to_vec(),
                Vec::new(),
                message(BINDING_SUCCESS, txid, &[XOR_MAPPED], true),
            ]
        })
        .await;
        assert_eq!(probe(target).await, Ok(()));
    }

    #[tokio::test]
    async fn stun_wrong_transaction_only_keeps_waiting() {
        let target = fake_server(|txid| {
            let mut wrong = *txid;
            wrong[11] ^= 0x01;
            vec![message(BINDING_SUCCESS, &wrong, &[XOR_MAPPED], true)]
        })
        .await;
        let started = Instant::now();
        let res = timeout(Duration::from_millis(200), StunCheck.check(target)).await;
        assert!(
            res.is_err(),
            "a foreign transaction id was accepted: {res:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn stun_closed_port_is_icmp_unreachable_quickly() {
        let target = {
            let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            sock.local_addr().unwrap()
        };
        let started = Instant::now();
        let err = probe(target).await.unwrap_err();
        assert_eq!(err.reason, Reason::IcmpUnreachable, "{err}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "took {:?}",
            started.elapsed()
        );
    }

    /// Probes `target` until it answers Ok or `deadline` passes; returns the last result.
    /// Used to wait for a freshly started server to come up.
    async fn probe_until_ok(
        target: SocketAddr,
        deadline: Instant,
        mut still_running: impl FnMut() -> Result<(), String>,
    ) -> Result<(), String> {
        loop {
            let last = match timeout(Duration::from_millis(200), StunCheck.check(target)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "probe timed out".to_owned(),
            };
            still_running()?;
            if Instant::now() >= deadline {
                return Err(format!("not up before the deadline; last probe: {last}"));
            }
            // Refusals come back in microseconds; pace the retries a little.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A loopback port that is free for both UDP and TCP (coturn listens on both).
    fn free_port() -> u16 {
        for _ in 0..50 {
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let port = udp.local_addr().unwrap().port();
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
        panic!("no loopback port free for both UDP and TCP");
    }

    fn find_turnserver() -> std::path::PathBuf {
        let on_path = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|dir| dir.join("turnserver"))
            .find(|p| p.is_file());
        let fallback = std::path::PathBuf::from("/usr/bin/turnserver");
        match on_path {
            Some(p) => p,
            None if fallback.is_file() => fallback,
            None => panic!(
                "coturn's `turnserver` is not installed, so the STUN probe cannot be tested \
                 against it: run scripts/install-test-deps.sh"
            ),
        }
    }

    /// Kills the child on drop, so a failing assertion never leaves a turnserver behind.
    struct KillOnDrop(std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[tokio::test]
    async fn stun_against_coturn() {
        let bin = find_turnserver();
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("turnserver.log");
        let port = free_port();
        let target: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = std::fs::File::create(&log_path).unwrap();
        let child = std::process::Command::new(&bin)
            .arg("-n") // no config file: only what is given here
            .arg("--listening-ip=127.0.0.1")
            .arg(format!("--listening-port={port}"))
            .args(["--no-tls", "--no-dtls", "--no-tcp", "--no-cli"])
            // No second port for NAT discovery: keeps us to the one port we checked.
            .arg("--no-rfc5780")
            .arg(format!("--pidfile={}", dir.path().join("pid").display()))
            .arg(format!("--userdb={}", dir.path().join("turndb").display()))
            .args(["--log-file=stdout", "--simple-log"])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut child = KillOnDrop(child);
        let log_tail = || {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let start = text.len().saturating_sub(2000);
            text.get(start..).unwrap_or_default().to_owned()
        };

        let up = probe_until_ok(
            target,
            Instant::now() + Duration::from_secs(10),
            || match child.0.try_wait() {
                Ok(None) => Ok(()),
                Ok(Some(status)) => Err(format!("turnserver exited early: {status}")),
                Err(e) => Err(format!("turnserver wait failed: {e}")),
            },
        )
        .await;
        if let Err(e) = up {
            panic!(
                "coturn on {target}: {e}\n--- turnserver log ---\n{}",
                log_tail()
            );
        }
        // And once more, as a single probe, which is what the assertion is about.
        assert_eq!(probe(target).await, Ok(()), "{}", log_tail());

        child.0.kill().unwrap();
        // Once reaped, every socket of the process is closed.
        child.0.wait().unwrap();
        let started = Instant::now();
        let err = probe(target).await.unwrap_err();
        assert_eq!(err.reason, Reason::IcmpUnreachable, "{err}");
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    /// mediagate's own TURN listener is built on the webrtc-rs `turn` crate; make sure
    /// its Binding handling satisfies the probe.
    #[tokio::test]
    async fn stun_against_webrtc_rs_turn_server() {
        use turn::auth::AuthHandler;
        use turn::relay::relay_static::RelayAddressGeneratorStatic;
        use turn::server::Server;
        use turn::server::config::{ConnConfig, ServerConfig};

        struct NoUsers;
        impl AuthHandler for NoUsers {
            fn auth_handle(
                &self,
                _username: &str,
                _realm: &str,
                _src: SocketAddr,
            ) -> Result<Vec<u8>, turn::Error> {
                Err(turn::Error::ErrNoSuchUser)
            }
        }

        let conn = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let target = conn.local_addr().unwrap();
        let server = Server::new(ServerConfig {
            conn_configs: vec![ConnConfig {
                conn,
                relay_addr_generator: Box::new(RelayAddressGeneratorStatic {
                    relay_address: [127, 0, 0, 1].into(),
                    address: "127.0.0.1".to_owned(),
                    net: Arc::new(webrtc_util::vnet::net::Net::new(None)),
                }),
            }],
            realm: "mediagate.test".to_owned(),
            auth_handler: Arc::new(NoUsers),
            channel_bind_timeout: Duration::ZERO,
            alloc_close_notify: None,
        })
        .await
        .unwrap();

        // The socket was bound before the server started reading, so no waiting needed.
        assert_eq!(probe(target).await, Ok(()));
        server.close().await.unwrap();
    }
}
