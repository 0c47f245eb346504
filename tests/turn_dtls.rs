//! TURN over DTLS (`turns:…?transport=udp`): coturn's `turnutils_uclient -S` (DTLS over
//! UDP) relays through a `dtls` listener with static and TURN REST API credentials; a
//! DTLS client (webrtc-rs `dtls`, which checks the chain and the name as a browser would)
//! that trusts another CA, or expects another host name, fails the handshake while the
//! right one gets its STUN Binding answered; a certificate renewed in place is served to
//! new handshakes while a running relay goes on; `turn.quota.max_dtls_sessions` refuses
//! sessions beyond it, and a closed session frees its place.

mod turn_support;

use mediagate::config::TurnAuthType;
use rustls::pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use stun::message::*;
use stun::xoraddr::XorMappedAddress;
use tokio::net::UdpSocket;
use tokio::time::timeout;
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

/// A DTLS client session trusting only `ca` and expecting the server to be `name`.
async fn dtls_connect(
    addr: SocketAddr,
    ca: &Path,
    name: &str,
) -> Result<(dtls::conn::DTLSConn, SocketAddr), String> {
    dtls_connect_within(addr, ca, name, Duration::from_secs(10)).await
}

async fn dtls_connect_within(
    addr: SocketAddr,
    ca: &Path,
    name: &str,
    within: Duration,
) -> Result<(dtls::conn::DTLSConn, SocketAddr), String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(addr).await.unwrap();
    let local = sock.local_addr().unwrap();
    let cfg = dtls::config::Config {
        roots_cas: roots,
        server_name: name.to_string(),
        extended_master_secret: dtls::config::ExtendedMasterSecretType::Require,
        ..Default::default()
    };
    let conn: Arc<dyn webrtc_util::Conn + Send + Sync> = Arc::new(sock);
    match timeout(within, dtls::conn::DTLSConn::new(conn, cfg, true, None)).await {
        Ok(Ok(c)) => Ok((c, local)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("handshake timed out".into()),
    }
}

/// Sends a Binding request over the session and returns the XOR-MAPPED-ADDRESS.
async fn binding(c: &dtls::conn::DTLSConn) -> SocketAddr {
    let mut b = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    b.extend_from_slice(&[7u8; 12]);
    c.write(&b, None).await.unwrap();
    let mut buf = vec![0u8; 1500];
    let n = c
        .read(&mut buf, Some(Duration::from_secs(5)))
        .await
        .expect("binding answered in time");
    let mut m = Message::new();
    m.raw = buf[..n].to_vec();
    m.decode().unwrap();
    assert_eq!(m.typ, BINDING_SUCCESS);
    let mut x = XorMappedAddress::default();
    x.get_from(&m).unwrap();
    SocketAddr::new(x.ip, x.port)
}

/// The leaf certificate a new handshake is given.
async fn presented(addr: SocketAddr, ca: &Path) -> Option<Vec<u8>> {
    let (c, _) = dtls_connect(addr, ca, HOST).await.ok()?;
    let state = c.connection_state().await;
    let _ = c.close().await;
    state.peer_certificates.first().cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uclient_relays_over_dtls_with_static_and_rest_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _ca) = cert_chain(dir.path(), "server", HOST);
    let (_peer, port) = echo_peer().await;
    let p = port.to_string();
    for auth in [Auth::Static, Auth::Ephemeral] {
        let mut cfg = config(auth, &["127.0.0.1/32"], 10);
        add_dtls(&mut cfg, &cert, &key);
        let ephemeral = cfg.auth.kind == TurnAuthType::Ephemeral;
        let gw = Gateway::start(cfg).await;
        let dtls = gw.dtls.expect("dtls listener").port().to_string();
        // -S without -t: DTLS over UDP.
        let mut args: Vec<&str> = vec!["-S", "-p", &dtls, "-e", "127.0.0.1"];
        args.extend(["-r", &p, "-m", "2", "-n", "20", "-z", "5", "-l", "101"]);
        if ephemeral {
            args.extend(["-W", SECRET, "-u", "bob"]);
        } else {
            args.extend(["-u", USER, "-w", PASSWORD]);
        }
        let r = uclient(&args).await;
        ok_run(
            if ephemeral {
                "dtls rest"
            } else {
                "dtls static"
            },
            &r,
        );
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
    add_dtls(&mut cfg, &cert, &key);
    let gw = Gateway::start(cfg).await;
    let addr = gw.dtls.unwrap();

    // The right CA and name: the handshake completes and STUN Binding is answered.
    let (good, local) = dtls_connect(addr, &ca, HOST).await.expect("handshake");
    assert_eq!(binding(&good).await, local);
    assert!(
        wait_until(Duration::from_secs(5), || gw.metrics.dtls_sessions.get()
            == 1)
        .await
    );

    // Another host name, or another CA: the client refuses the server.
    let wrong_name = dtls_connect(addr, &ca, "other.test").await;
    assert!(
        wrong_name.is_err(),
        "a certificate for {HOST} passed as other.test"
    );
    let wrong_ca = dtls_connect(addr, &other_ca, HOST).await;
    assert!(wrong_ca.is_err(), "a certificate from another CA passed");
    assert_eq!(gw.metrics.allocations_created.get(), 0);

    // A datagram that is not a ClientHello opens no session.
    let stray = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    stray.send_to(&[0u8; 40], addr).await.unwrap();
    assert!(wait_until(Duration::from_secs(5), || gw.metrics.malformed_total() >= 1).await);
    assert_eq!(gw.metrics.dtls_sessions.get(), 1);

    let _ = good.close().await;
    gw.svc.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_renewed_in_place_is_served_without_dropping_allocations() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = cert_chain(dir.path(), "server", HOST);
    let mut cfg = config(Auth::Static, &["127.0.0.1/32"], 10);
    add_dtls(&mut cfg, &cert, &key);
    let gw = Gateway::start(cfg).await;
    let addr = gw.dtls.unwrap();
    let first = presented(addr, &ca).await.expect("first certificate");

    // A relay over DTLS that runs for ~3 s while the certificate changes under it.
    let (_peer, port) = echo_peer().await;
    let (p, d) = (port.to_string(), addr.port().to_string());
    let run = tokio::spawn(uclient(&[
        "-S",
        "-p",
        &d,
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

    // cert-manager renews: a new key and certificate written over the same files.
    let staging = dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let (new_cert, new_key, _) = cert_chain(&staging, "server", HOST);
    std::fs::copy(&new_key, &key).unwrap();
    std::fs::copy(&new_cert, &cert).unwrap();
    let new_ca = staging.join("server-ca.crt");
    assert!(
        new_certificate_served(&first, || presented(addr, &new_ca)).await,
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
async fn sessions_beyond_max_dtls_sessions_are_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = cert_chain(dir.path(), "server", HOST);
    let mut cfg = config(Auth::Static, &["127.0.0.1/32"], 10);
    cfg.quota.max_dtls_sessions = 1;
    add_dtls(&mut cfg, &cert, &key);
    let gw = Gateway::start(cfg).await;
    let addr = gw.dtls.unwrap();

    let (first, local) = dtls_connect(addr, &ca, HOST).await.expect("handshake");
    assert_eq!(binding(&first).await, local);
    // The second session finds the cap reached: its ClientHellos are dropped.
    let second = dtls_connect_within(addr, &ca, HOST, Duration::from_secs(3)).await;
    assert!(second.is_err(), "a session beyond the cap was served");
    assert!(gw.metrics.dtls_closed_count("limit") >= 1);

    // The first one closes (close_notify): its place is free again.
    let _ = first.close().await;
    assert!(
        wait_until(Duration::from_secs(5), || gw.metrics.dtls_sessions.get()
            == 0)
        .await
    );
    let (third, local) = dtls_connect(addr, &ca, HOST)
        .await
        .expect("handshake after close");
    assert_eq!(binding(&third).await, local);
    let _ = third.close().await;
    gw.svc.close().await;
}
