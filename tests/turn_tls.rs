//! TURN over TLS (`turns:`): coturn's `turnutils_uclient -t -S` relays through a `tls`
//! listener with static and TURN REST API credentials; a (rustls) client that trusts
//! another CA, or expects another host name, fails the handshake; a
//! certificate renewed in place is served to new handshakes while a running relay goes on;
//! with `accept_proxy_protocol` the client address comes from the PROXY v2 header and a
//! connection without one is refused and counted; a `tcp` listener with a certificate
//! serves TLS and plain TURN on one port.

mod turn_support;

use mediagate::config::TurnAuthType;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls_pki_types::pem::PemObject;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use stun::message::*;
use stun::xoraddr::XorMappedAddress;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use turn_support::*;

const HOST: &str = "turn.test";

fn ok_run(what: &str, r: &Uclient) {
    assert!(r.ok, "{what}: uclient failed:\n{}", r.out);
    let sent = r.sent.unwrap_or(0);
    assert!(sent > 0, "{what}: nothing sent:\n{}", r.out);
    assert_eq!(
        r.received,
        Some(sent),
        "{what}: echo incomplete:\n{}",
        r.out
    );
}

fn binding_request() -> Vec<u8> {
    let mut b = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    b.extend_from_slice(&[5u8; 12]);
    b
}

/// A rustls client trusting only `ca`, expecting the server to be `name`.
fn connector(ca: &std::path::Path) -> TlsConnector {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(cfg))
}

async fn tls_connect(
    addr: SocketAddr,
    ca: &std::path::Path,
    name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    timeout(Duration::from_secs(10), connector(ca).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))?
}

/// Sends a Binding request and returns the XOR-MAPPED-ADDRESS of the answer.
async fn binding<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> SocketAddr {
    s.write_all(&binding_request()).await.unwrap();
    let mut head = [0u8; 20];
    timeout(Duration::from_secs(5), s.read_exact(&mut head))
        .await
        .expect("binding answered in time")
        .unwrap();
    let len = u16::from_be_bytes([head[2], head[3]]) as usize;
    let mut raw = head.to_vec();
    raw.resize(20 + len, 0);
    s.read_exact(&mut raw[20..]).await.unwrap();
    let mut m = Message::new();
    m.raw = raw;
    m.decode().unwrap();
    assert_eq!(m.typ, BINDING_SUCCESS);
    let mut x = XorMappedAddress::default();
    x.get_from(&m).unwrap();
    SocketAddr::new(x.ip, x.port)
}

/// A new key and leaf certificate for `name` signed by the CA already in `dir`
/// (`{file}-ca.crt`, `{file}-ca.key`), as cert-manager issues on renewal.
fn renew(
    dir: &std::path::Path,
    file: &str,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let ca = dir.join(format!("{file}-ca.crt"));
    let ca_key = dir.join(format!("{file}-ca.key"));
    let (csr, cert, key, ext) = (
        dir.join("r.csr"),
        dir.join("r.crt"),
        dir.join("r.key"),
        dir.join("r.ext"),
    );
    std::fs::write(
        &ext,
        format!("subjectAltName=DNS:{name}\nbasicConstraints=critical,CA:FALSE\n"),
    )
    .unwrap();
    let ok = |c: &mut std::process::Command| assert!(c.status().unwrap().success());
    ok(std::process::Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .args(["-subj", &format!("/CN={name}"), "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .stderr(std::process::Stdio::null()));
    ok(std::process::Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null()));
    (cert, key)
}

/// The leaf certificate the server presents to a new handshake.
async fn presented(addr: SocketAddr, ca: &std::path::Path) -> Option<Vec<u8>> {
    let s = tls_connect(addr, ca, HOST).await.ok()?;
    let (_, conn) = s.get_ref();
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uclient_relays_over_tls_with_static_and_rest_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = cert_chain(dir.path(), "server", HOST);
    let (_peer, port) = echo_peer().await;
    let p = port.to_string();
    let ca = ca.to_str().unwrap().to_string();
    for auth in [Auth::Static, Auth::Ephemeral] {
        let mut cfg = config(auth, &["127.0.0.1/32"], 10);
        add_tls(&mut cfg, &cert, &key, false);
        let ephemeral = cfg.auth.kind == TurnAuthType::Ephemeral;
        let gw = Gateway::start(cfg).await;
        let tls = gw.tls.expect("tls listener").port().to_string();
        // -t -S: TLS over TCP; -E: verify the server certificate against this CA.
        let mut args: Vec<&str> = vec!["-t", "-S", "-E", &ca, "-p", &tls, "-e", "127.0.0.1"];
        args.extend(["-r", &p, "-m", "2", "-n", "20", "-z", "5", "-l", "101"]);
        if ephemeral {
            args.extend(["-W", SECRET, "-u", "bob"]);
        } else {
            args.extend(["-u", USER, "-w", PASSWORD]);
        }
        let r = uclient(&args).await;
        ok_run(if ephemeral { "tls rest" } else { "tls static" }, &r);
        assert!(gw.metrics.allocations_created.get() >= 2);
        assert!(gw.metrics.bytes_to_client.get() >= 2 * 20 * 100);
        gw.svc.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_certificate_or_host_name_fails_on_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = cert_chain(dir.path(), "server", HOST);
    let (_, _, other_ca) = cert_chain(dir.path(), "other", HOST);
    let mut cfg = config(Auth::Static, &["127.0.0.1/32"], 10);
    add_tls(&mut cfg, &cert, &key, false);
    let gw = Gateway::start(cfg).await;
    let addr = gw.tls.unwrap();

    // The right CA and name: the handshake completes and STUN Binding is answered.
    let mut good = tls_connect(addr, &ca, HOST).await.expect("handshake");
    let local = good.get_ref().0.local_addr().unwrap();
    assert_eq!(binding(&mut good).await, local);

    // Another host name, or another CA: the client refuses the server.
    let wrong_name = tls_connect(addr, &ca, "other.test").await;
    assert!(
        wrong_name.is_err(),
        "a certificate for {HOST} passed as other.test"
    );
    let wrong_ca = tls_connect(addr, &other_ca, HOST).await;
    assert!(wrong_ca.is_err(), "a certificate from another CA passed");

    // (coturn's turnutils_uclient 4.6 does not verify the server certificate even with
    // -E, so the client side of this check is a rustls client, as browsers verify.)
    assert_eq!(gw.metrics.allocations_created.get(), 0);
    // The server saw failed handshakes (the client aborts with an alert).
    assert!(
        wait_until(Duration::from_secs(5), || gw
            .metrics
            .tcp_closed_count("tls_handshake")
            >= 2)
        .await,
        "tls_handshake closes: {}",
        gw.metrics.tcp_closed_count("tls_handshake")
    );
    drop(good);
    gw.svc.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_renewed_in_place_is_served_without_dropping_allocations() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = cert_chain(dir.path(), "server", HOST);
    let mut cfg = config(Auth::Static, &["127.0.0.1/32"], 10);
    add_tls(&mut cfg, &cert, &key, false);
    let gw = Gateway::start(cfg).await;
    let addr = gw.tls.unwrap();
    let first = presented(addr, &ca).await.expect("first certificate");

    // A relay over TLS that runs for ~3 s while the certificate changes under it.
    let (_peer, port) = echo_peer().await;
    let (p, t) = (port.to_string(), addr.port().to_string());
    let ca_arg = ca.to_str().unwrap().to_string();
    let run = tokio::spawn(uclient(&[
        "-t",
        "-S",
        "-E",
        &ca_arg,
        "-p",
        &t,
        "-e",
        "127.0.0.1",
        "-r",
        &p,
        "-n",
        "150",
        "-z",
        "20",
        "-u",
        USER,
        "-w",
        PASSWORD,
    ]));
    assert!(
        wait_until(Duration::from_secs(10), || gw.svc.allocations() >= 1).await,
        "the relay did not start"
    );

    // cert-manager renews: new key and certificate (same CA) written over the same files.
    let staging = dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    std::fs::copy(&ca, staging.join("server-ca.crt")).unwrap();
    std::fs::copy(
        dir.path().join("server-ca.key"),
        staging.join("server-ca.key"),
    )
    .unwrap();
    let (new_cert, new_key) = renew(&staging, "server", HOST);
    std::fs::copy(&new_key, &key).unwrap();
    std::fs::copy(&new_cert, &cert).unwrap();
    assert!(
        new_certificate_served(&first, || presented(addr, &ca)).await,
        "new handshakes never got the new certificate"
    );
    assert!(
        gw.metrics.cert_reloads_ok.get() >= 2,
        "initial load + reload"
    );

    let r = run.await.unwrap();
    ok_run("relay across the renewal", &r);
    gw.svc.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_header_gives_the_client_address_and_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = cert_chain(dir.path(), "server", HOST);
    let mut cfg = config(Auth::Static, &["127.0.0.1/32"], 10);
    add_tls(&mut cfg, &cert, &key, true);
    let gw = Gateway::start(cfg).await;
    let addr = gw.tls.unwrap();

    // As a cloud load balancer: the PROXY v2 header, then TLS.
    let client: SocketAddr = "198.51.100.7:40123".parse().unwrap();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&mediagate::proxyproto::header_v2(client, addr))
        .await
        .unwrap();
    let name = ServerName::try_from(HOST.to_string()).unwrap();
    let mut tls = connector(&ca).connect(name, tcp).await.expect("handshake");
    assert_eq!(binding(&mut tls).await, client, "XOR-MAPPED-ADDRESS");

    // No header: the TLS ClientHello is not a PROXY header, the connection is refused.
    let direct = tls_connect(addr, &ca, HOST).await;
    assert!(
        direct.is_err(),
        "a connection without a PROXY header was served"
    );
    assert!(
        wait_until(Duration::from_secs(5), || gw
            .metrics
            .tcp_closed_count("proxy_header")
            >= 1)
        .await
    );
    drop(tls);
    gw.svc.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_listener_with_a_certificate_serves_tls_and_plain_turn_on_one_port() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = cert_chain(dir.path(), "server", HOST);
    let mut cfg = config(Auth::Static, &["127.0.0.1/32"], 10);
    // The tcp listener (index 1) also gets the certificate.
    cfg.listeners[1].cert = Some(cert.clone());
    cfg.listeners[1].key = Some(key.clone());
    let gw = Gateway::start(cfg).await;
    let addr = gw.tcp;

    // TLS on the port: handshake, then STUN Binding.
    let mut tls = tls_connect(addr, &ca, HOST).await.expect("handshake");
    let local = tls.get_ref().0.local_addr().unwrap();
    assert_eq!(binding(&mut tls).await, local);
    // Plain STUN on the same port.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    let local = plain.local_addr().unwrap();
    assert_eq!(binding(&mut plain).await, local);

    // uclient relays over both, on the one port.
    let (_peer, port) = echo_peer().await;
    let (p, t) = (port.to_string(), addr.port().to_string());
    for secure in [true, false] {
        let mut args: Vec<&str> = if secure { vec!["-t", "-S"] } else { vec!["-t"] };
        args.extend(["-p", &t, "-e", "127.0.0.1", "-r", &p, "-n", "10", "-z", "5"]);
        args.extend(["-u", USER, "-w", PASSWORD]);
        let r = uclient(&args).await;
        ok_run(
            if secure {
                "tls on the tcp port"
            } else {
                "plain tcp"
            },
            &r,
        );
    }
    drop((tls, plain));
    gw.svc.close().await;
}
