//! Per-source caps of TURN over TCP/TLS through the real `mediagate run` (issue 24,
//! item 3): one source holding hundreds of partial TLS handshakes no longer locks every
//! `turns:` and `turn:?transport=tcp` user out — beyond `max_handshakes_per_source` its
//! connections are closed at accept, those it holds are closed after
//! `handshake_timeout` (a connection that sent nothing useful), and a source keeps at
//! most `max_connections_per_source` connections; all of it counted.

mod common;
mod turn_support;

use turn_support::metric;

use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls_pki_types::pem::PemObject;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use stun::message::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

const HOST: &str = "turn.test";

fn closed(text: &str, reason: &str) -> f64 {
    metric(
        text,
        &format!("mediagate_turn_tcp_closed_total{{reason=\"{reason}\"}}"),
    )
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(from, 0))?;
    s.connect(to).await
}

fn binding_request() -> Vec<u8> {
    let mut b = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    b.extend_from_slice(&[5u8; 12]);
    b
}

/// Sends a Binding request; whether a Binding success came back within 3 s.
async fn binding<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> bool {
    if s.write_all(&binding_request()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 20];
    match timeout(Duration::from_secs(3), s.read_exact(&mut head)).await {
        Ok(Ok(_)) => {}
        _ => return false,
    }
    let len = u16::from_be_bytes([head[2], head[3]]) as usize;
    let mut raw = head.to_vec();
    raw.resize(20 + len, 0);
    if s.read_exact(&mut raw[20..]).await.is_err() {
        return false;
    }
    let mut m = Message::new();
    m.raw = raw;
    m.decode().is_ok() && m.typ == BINDING_SUCCESS
}

/// A `turns:` client from 127.0.0.1: TLS handshake (trusting `ca`) and a Binding.
async fn legit_tls(addr: SocketAddr, ca: &std::path::Path) -> bool {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let Ok(tcp) = TcpStream::connect(addr).await else {
        return false;
    };
    let name = ServerName::try_from(HOST.to_string()).unwrap();
    let connector = TlsConnector::from(Arc::new(cfg));
    match timeout(Duration::from_secs(5), connector.connect(name, tcp)).await {
        Ok(Ok(mut tls)) => binding(&mut tls).await,
        _ => false,
    }
}

/// How many of `conns` the server has closed (EOF or reset) within `within`.
async fn closed_by_server(conns: &mut [TcpStream], within: Duration) -> usize {
    let mut n = 0;
    let deadline = tokio::time::Instant::now() + within;
    for c in conns.iter_mut() {
        let mut b = [0u8; 64];
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Ok(r) = timeout(left, c.read(&mut b)).await
            && matches!(r, Ok(0) | Err(_))
        {
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_hold_every_turn_tcp_and_tls_slot() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = turn_support::cert_chain(dir.path(), "server", HOST);
    let (tls_port, tcp_port, admin) = (free_tcp_port(), free_tcp_port(), free_tcp_port());
    let relay = 61000 + turn_support::free_port_pair() % 2000;
    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
turn:
  realm: mediagate
  public_address: 127.0.0.1
  listeners:
    - {{ protocol: tls, listen: "127.0.0.1:{tls_port}", cert: "{}", key: "{}" }}
    - {{ protocol: tcp, listen: "127.0.0.1:{tcp_port}" }}
  auth: {{ type: ephemeral, secret: test-secret, ttl: 1h }}
  relay:
    address: 127.0.0.1
    port_range: {relay}-{}
    peers: ["127.0.0.1/32"]
  quota:
    max_tcp_connections: 200
    max_connections_per_source: 40
    max_handshakes_per_source: 16
    handshake_timeout: 2s
"#,
        cert.display(),
        key.display(),
        relay + 100
    );
    let b = Balancer::start(&yaml, admin);
    let tls = SocketAddr::from(([127, 0, 0, 1], tls_port));
    let tcp = SocketAddr::from(([127, 0, 0, 1], tcp_port));
    assert!(legit_tls(tls, &ca).await, "turns: works before the attack");

    // One source (127.0.0.2) opens 300 connections, each with the first bytes of a TLS
    // record and nothing more: partial handshakes.
    let attacker: IpAddr = "127.0.0.2".parse().unwrap();
    let mut parked = Vec::new();
    for _ in 0..300 {
        if let Ok(mut s) = connect_from(attacker, tls).await {
            let _ = s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await;
            parked.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ok = 0;
    for _ in 0..5 {
        if legit_tls(tls, &ca).await {
            ok += 1;
        }
    }
    let text = b.metrics();
    eprintln!(
        "partial TLS handshakes from one source: {}; legit turns: {ok}/5 during; \
         closed: limit {}, source_handshakes {}, source_limit {}",
        parked.len(),
        closed(&text, "limit"),
        closed(&text, "source_handshakes"),
        closed(&text, "source_limit"),
    );
    assert_eq!(ok, 5, "turns: clients of other sources during the attack");
    assert!(
        closed(&text, "source_handshakes") >= 280.0,
        "connections beyond max_handshakes_per_source are refused and counted"
    );
    assert_eq!(
        closed(&text, "limit"),
        0.0,
        "the global cap is never reached"
    );

    // What the source holds is closed after handshake_timeout (nothing useful sent).
    let gone = closed_by_server(&mut parked, Duration::from_secs(6)).await;
    assert_eq!(gone, parked.len(), "every parked connection is closed");
    let text = b.metrics();
    assert!(
        closed(&text, "tls_handshake") >= 16.0,
        "stalled handshakes closed after handshake_timeout: {}",
        closed(&text, "tls_handshake")
    );
    drop(parked);

    // A plain TCP connection that sends nothing is closed after handshake_timeout too.
    let mut silent = vec![connect_from(attacker, tcp).await.unwrap()];
    assert_eq!(
        closed_by_server(&mut silent, Duration::from_secs(5)).await,
        1
    );
    assert!(closed(&b.metrics(), "no_request") >= 1.0);

    // Connections that did send something useful: at most max_connections_per_source.
    let busy: IpAddr = "127.0.0.3".parse().unwrap();
    let mut served = Vec::new();
    let mut refused = 0;
    for _ in 0..50 {
        let mut s = connect_from(busy, tcp).await.unwrap();
        if binding(&mut s).await {
            served.push(s);
        } else {
            refused += 1;
        }
    }
    let text = b.metrics();
    eprintln!(
        "useful connections from one source: served {}, refused {refused} (source_limit {})",
        served.len(),
        closed(&text, "source_limit")
    );
    assert_eq!(served.len(), 40, "max_connections_per_source");
    assert_eq!(closed(&text, "source_limit"), 10.0);
    assert!(
        binding(&mut TcpStream::connect(tcp).await.unwrap()).await,
        "another source is served meanwhile"
    );
}
