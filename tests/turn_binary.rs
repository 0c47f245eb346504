//! TURN served by the real `mediagate run` (not the in-process service): a relayed echo
//! with REST API credentials that `GET /ice` (and `mediagate ice`) handed out, the
//! allocation visible in /status, and the TURN metrics exported.

mod common;
mod turn_support;

use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_relays_with_credentials_from_ice() {
    let (turn_port, admin) = (free_udp_port(), free_tcp_port());
    // Relay ports above the ephemeral range, where no peer of the test binds: a relay port
    // is never a valid peer (no loops through the gateway).
    let relay = 61000 + turn_support::free_port_pair() % 2000;
    let b = Balancer::start(
        &format!(
            r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
turn:
  realm: mediagate
  public_address: 127.0.0.1
  listeners:
    - {{ protocol: udp, listen: "127.0.0.1:{turn_port}" }}
  auth: {{ type: ephemeral, secret: test-secret, ttl: 1h }}
  relay:
    address: 127.0.0.1
    port_range: {relay}-{}
    peers: ["127.0.0.1/32"]
"#,
            relay + 200
        ),
        admin,
    );

    // GET /ice: the STUNner-style document with fresh REST credentials.
    let (code, body) = http(b.admin, "GET", "/ice?username=alice&ttl=600", None).expect("GET /ice");
    assert_eq!(code, 200, "{body}");
    let ice: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(ice["iceTransportPolicy"], "relay");
    let server = &ice["iceServers"][0];
    assert_eq!(
        server["urls"][0],
        format!("turn:127.0.0.1:{turn_port}?transport=udp")
    );
    let username = server["username"].as_str().expect("username").to_string();
    let credential = server["credential"]
        .as_str()
        .expect("credential")
        .to_string();
    assert!(username.ends_with(":alice"), "{username}");

    // The CLI prints the same shape.
    let (code, out, err) = run_cli(&[
        "ice",
        "--admin",
        &format!("http://127.0.0.1:{admin}"),
        "--user",
        "bob",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("ice json");
    assert!(
        v["iceServers"][0]["username"]
            .as_str()
            .is_some_and(|u| u.ends_with(":bob"))
    );

    // coturn's client relays through the binary to coturn's echo peer.
    let (_peer, peer_port) = turn_support::echo_peer().await;
    let port = turn_port.to_string();
    let pp = peer_port.to_string();
    let r = turn_support::uclient(&[
        "-p",
        &port,
        "-u",
        &username,
        "-w",
        &credential,
        "-e",
        "127.0.0.1",
        "-r",
        &pp,
        "-n",
        "20",
        "-m",
        "1",
        "-z",
        "5",
        "-c",
    ])
    .await;
    assert!(r.ok, "{}", r.out);
    assert!(
        r.received.unwrap_or(0) >= 18,
        "relayed echo: {:?}/{:?}\n{}",
        r.received,
        r.sent,
        r.out
    );

    let m = b.metrics();
    for name in [
        "mediagate_turn_allocations ",
        "mediagate_turn_allocations_created_total ",
        "mediagate_turn_relayed_bytes_total{direction=",
        "mediagate_turn_auth_failures_total{reason=",
        "mediagate_turn_permission_denied_total 0",
    ] {
        assert!(m.contains(name), "metrics lack {name}:\n{m}");
    }
    let created: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("mediagate_turn_allocations_created_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(created >= 1, "allocations counted: {created}");
    assert!(b.status()["turn"]["allocations"].is_u64());

    // Bad query: a clear 400, not a crash.
    let (code, _) = http(b.admin, "GET", "/ice?ttl=notanumber", None).expect("GET /ice");
    assert_eq!(code, 400);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// A terminating pod keeps its TURN allocations for `shutdown.drain_timeout` (they are
/// calls, like UDP sessions): SIGTERM with one live allocation and no proxied session does
/// not end the process; the allocation's end (Refresh with lifetime 0) does, long before
/// the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_turn_allocations() {
    use stun::message::METHOD_REFRESH;
    use turn_support::{Attr, RawClient, code};
    let (turn_port, admin) = (free_udp_port(), free_tcp_port());
    let relay = 61000 + turn_support::free_port_pair() % 2000;
    let mut b = Balancer::start(
        &format!(
            r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
turn:
  realm: mediagate
  public_address: 127.0.0.1
  listeners:
    - {{ protocol: udp, listen: "127.0.0.1:{turn_port}" }}
  auth: {{ type: ephemeral, secret: test-secret, ttl: 1h }}
  relay:
    address: 127.0.0.1
    port_range: {relay}-{}
    peers: ["127.0.0.1/32"]
shutdown:
  drain_timeout: 30s
"#,
            relay + 20
        ),
        admin,
    );
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let user = mediagate::turn::ephemeral_username(expiry, "alice");
    let pass = mediagate::turn::ephemeral_password("test-secret", &user);
    let server = std::net::SocketAddr::from(([127, 0, 0, 1], turn_port));
    let mut c = RawClient::udp(server, &user, &pass).await;
    assert_eq!(code(&c.allocate().await), None, "allocated");

    b.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let t = std::time::Instant::now();
    wait_until_async(Duration::from_secs(3), "/readyz 503 while draining", || {
        matches!(http(b.admin, "GET", "/readyz", None), Ok((503, _)))
    })
    .await;
    // No proxied session at all: before, the drain ended here. The allocation holds it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        b.proc.wait_exit(Duration::ZERO),
        None,
        "exited with an allocation alive"
    );
    // The allocation still answers (a refresh keeps it), then its end ends the drain.
    assert_eq!(
        code(&c.request(METHOD_REFRESH, &[Attr::Lifetime(600)]).await),
        None
    );
    assert_eq!(
        code(&c.request(METHOD_REFRESH, &[Attr::Lifetime(0)]).await),
        None
    );
    let exit = tokio::task::spawn_blocking(move || b.proc.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(exit, Some(0));
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "exited at the allocation's end, not at drain_timeout: {:?}",
        t.elapsed()
    );
}
