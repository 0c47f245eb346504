//! DTLS handshake slots under a flood of cookie-less ClientHellos from spoofed sources,
//! through the real `mediagate run` (issue 24, item 2): a few hundred ClientHellos per
//! second from addresses that never answer the HelloVerifyRequest (loopback sources that
//! are closed right after sending) must not lock legitimate DTLS clients out; only a
//! ClientHello that echoes the cookie it was given takes a handshake slot, and the
//! sources that never answer are dropped after the short cookie deadline, counted.

mod common;
mod turn_support;

use turn_support::metric;

use common::*;
use rustls::pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use stun::message::*;
use tokio::net::UdpSocket;
use tokio::time::{Instant, timeout};

const HOST: &str = "turn.test";

fn client_config(ca: &Path) -> dtls::config::Config {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    dtls::config::Config {
        roots_cas: roots,
        server_name: HOST.to_string(),
        extended_master_secret: dtls::config::ExtendedMasterSecretType::Require,
        ..Default::default()
    }
}

/// The first datagram a DTLS client sends: a real ClientHello without a cookie.
async fn captured_client_hello(ca: &Path) -> Vec<u8> {
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(server.local_addr().unwrap()).await.unwrap();
    let conn: Arc<dyn webrtc_util::Conn + Send + Sync> = Arc::new(sock);
    let cfg = client_config(ca);
    let client =
        tokio::spawn(async move { dtls::conn::DTLSConn::new(conn, cfg, true, None).await });
    let mut buf = vec![0u8; 2048];
    let (n, _) = timeout(Duration::from_secs(5), server.recv_from(&mut buf))
        .await
        .expect("the client sends a ClientHello")
        .unwrap();
    client.abort();
    assert_eq!(buf[0], 22, "a handshake record");
    assert_eq!(buf[13], 1, "a ClientHello");
    buf[..n].to_vec()
}

/// User plus system CPU time of a process, in clock ticks (1/100 s).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// One legitimate client: DTLS handshake within `within`, then a STUN Binding answered.
async fn legit(addr: SocketAddr, ca: &Path, within: Duration) -> bool {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(addr).await.unwrap();
    let conn: Arc<dyn webrtc_util::Conn + Send + Sync> = Arc::new(sock);
    let cfg = client_config(ca);
    let c = match timeout(within, dtls::conn::DTLSConn::new(conn, cfg, true, None)).await {
        Ok(Ok(c)) => c,
        _ => return false,
    };
    let mut b = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    b.extend_from_slice(&[7u8; 12]);
    if c.write(&b, None).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; 1500];
    let ok = match c.read(&mut buf, Some(Duration::from_secs(3))).await {
        Ok(n) => {
            let mut m = Message::new();
            m.raw = buf[..n].to_vec();
            m.decode().is_ok() && m.typ == BINDING_SUCCESS
        }
        Err(_) => false,
    };
    let _ = c.close().await;
    ok
}

/// Sends `hello` from `count` different loopback addresses (127.77.x.y, each socket
/// closed right away: nobody answers the HelloVerifyRequest) at `per_sec`, or until
/// `stop`. Returns how many were sent.
fn flood(
    target: SocketAddr,
    hello: Vec<u8>,
    count: usize,
    per_sec: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let mut sent = 0;
        for i in 0..count {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let src = Ipv4Addr::new(127, 77, (i / 250) as u8, (i % 250) as u8 + 1);
            if let Ok(s) = std::net::UdpSocket::bind((src, 0))
                && s.send_to(&hello, target).is_ok()
            {
                sent += 1;
            }
            let due = started + Duration::from_micros(1_000_000 * (i as u64 + 1) / per_sec);
            if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        sent
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_less_client_hellos_do_not_lock_out_dtls_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = turn_support::cert_chain(dir.path(), "server", HOST);
    let (dtls_port, admin) = (free_udp_port(), free_tcp_port());
    let relay = 61000 + turn_support::free_port_pair() % 2000;
    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
turn:
  realm: mediagate
  public_address: 127.0.0.1
  listeners:
    - {{ protocol: dtls, listen: "127.0.0.1:{dtls_port}", cert: "{}", key: "{}" }}
  auth: {{ type: ephemeral, secret: test-secret, ttl: 1h }}
  relay:
    address: 127.0.0.1
    port_range: {relay}-{}
    peers: ["127.0.0.1/32"]
"#,
        cert.display(),
        key.display(),
        relay + 100
    );
    let b = Balancer::start(&yaml, admin);
    let target = SocketAddr::from(([127, 0, 0, 1], dtls_port));
    assert!(
        legit(target, &ca, Duration::from_secs(5)).await,
        "a DTLS client is served before the flood"
    );

    let hello = captured_client_hello(&ca).await;
    let pid = b.proc.pid().as_raw();
    let rss_before = rss_kib(pid);
    let cpu_before = cpu_ticks(pid);
    let stop = Arc::new(AtomicBool::new(false));
    // 200 per second while the legitimate clients try (at most 6,000, 30 s): with 10 s
    // handshake slots, 256 slots are full after under two seconds unless a slot needs the
    // cookie.
    let flooder = flood(target, hello, 6000, 200, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut ok = 0;
    let attempts = 6;
    let started = Instant::now();
    for _ in 0..attempts {
        if legit(target, &ca, Duration::from_secs(4)).await {
            ok += 1;
        }
    }
    let during = started.elapsed();
    let rss_during = rss_kib(pid);
    let cpu = (cpu_ticks(pid) - cpu_before) as f64 / 100.0;
    stop.store(true, Ordering::Relaxed);
    let sent = flooder.join().unwrap();
    let text = b.metrics();
    let closed = |r: &str| {
        metric(
            &text,
            &format!("mediagate_turn_dtls_closed_total{{reason=\"{r}\"}}"),
        )
    };
    eprintln!(
        "RSS {rss_before} KiB before, {rss_during} KiB during; CPU {cpu:.2} s; \
         spoofed ClientHellos sent {sent}; legit handshakes {ok}/{attempts} in {during:?}; \
         closed: handshake_limit {}, no_cookie {}, unverified_limit {}, dtls_handshake {}",
        closed("handshake_limit"),
        closed("no_cookie"),
        closed("unverified_limit"),
        closed("dtls_handshake"),
    );
    assert!(
        ok >= attempts - 1,
        "legitimate DTLS handshakes during the flood: {ok}/{attempts}"
    );
    assert_eq!(
        closed("handshake_limit"),
        0.0,
        "no ClientHello waited for a handshake slot: the spoofed ones never take one"
    );
    // The spoofed sources that never answered are dropped after the cookie deadline.
    wait_until_async(Duration::from_secs(15), "unanswered cookies expire", || {
        let t = b.metrics();
        metric(&t, "mediagate_turn_dtls_closed_total{reason=\"no_cookie\"}")
            + metric(
                &t,
                "mediagate_turn_dtls_closed_total{reason=\"unverified_limit\"}",
            )
            >= sent as f64 * 0.9
    })
    .await;
    assert!(
        legit(target, &ca, Duration::from_secs(5)).await,
        "a DTLS client is served after the flood"
    );
}
