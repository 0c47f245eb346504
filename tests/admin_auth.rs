//! The admin token guards every endpoint that changes state or hands out credentials, and
//! it is checked before anything else of the request is read: an unauthenticated client
//! cannot make the API wait for (or buffer) a body, and cannot fetch TURN credentials.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn config(admin: u16, turn_port: u16, relay: u16) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin}", token: secret-token }}
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
        relay + 50
    )
}

/// Sends only the head of a POST that announces a large JSON body, and returns the status
/// line the server answered with (or the read error).
fn post_head_only(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
    )?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}

#[test]
fn the_token_is_checked_before_the_body_is_read() {
    let admin = free_tcp_port();
    let b = Balancer::start(
        &config(admin, free_udp_port(), relay_range_above_ephemeral(admin)),
        admin,
    );
    for path in ["/upstreams/media/servers/x/state", "/reload"] {
        let started = Instant::now();
        let line = post_head_only(b.admin, path)
            .unwrap_or_else(|e| panic!("{path}: no answer without the body: {e}"));
        assert!(line.contains(" 401 "), "{path}: {line}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{path}: answered only after {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn ice_needs_the_admin_token_when_one_is_set() {
    let admin = free_tcp_port();
    let b = Balancer::start(
        &config(
            admin,
            free_udp_port(),
            relay_range_above_ephemeral(admin + 100),
        ),
        admin,
    );
    let (code, body) = http(b.admin, "GET", "/ice?username=alice", None).expect("GET /ice");
    assert_eq!(code, 401, "{body}");
    assert!(!body.contains("credential"), "{body}");
    let (code, body) = http_with(
        b.admin,
        "GET",
        "/ice?username=alice",
        None,
        &[("Authorization", "Bearer wrong")],
    )
    .expect("GET /ice");
    assert_eq!(code, 401, "{body}");
    let (code, body) = http_with(
        b.admin,
        "GET",
        "/ice?username=alice",
        None,
        &[("Authorization", "Bearer secret-token")],
    )
    .expect("GET /ice");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("credential"), "{body}");
    // Reading endpoints stay open: probes and dashboards carry no token.
    for path in ["/healthz", "/readyz", "/status", "/metrics"] {
        let (code, _) = http(b.admin, "GET", path, None).expect(path);
        assert_eq!(code, 200, "{path}");
    }
}
