//! `GET /ice` as a drop-in for STUNner's auth service, against the real binary: its query
//! parameters are honoured or refused with 400; `turns:` URLs appear for a tls listener;
//! `turn.ice.token` opens `/ice` (and only `/ice`) besides the admin token; CORS origins
//! from `turn.ice.cors_origins` get the headers and an answered preflight, others do not;
//! credentials signed with the first of `turn.auth.secrets`.

mod common;
mod turn_support;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One request; returns (status, lower-cased head, body).
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (code, head.to_ascii_lowercase(), body.to_string())
}

#[test]
fn ice_speaks_stunners_parameters_with_cors_and_its_own_token() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = turn_support::self_signed(dir.path(), "server", "turn.test");
    let admin = free_tcp_port();
    let (udp, tls) = (free_udp_port(), free_tcp_port());
    let relay = relay_range_above_ephemeral(admin + 300);
    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin}", token: admin-token }}
turn:
  public_address: 127.0.0.1
  listeners:
    - {{ protocol: udp, listen: "127.0.0.1:{udp}" }}
    - {{ protocol: tls, listen: "127.0.0.1:{tls}", cert: "{}", key: "{}" }}
  auth: {{ type: ephemeral, secrets: [new-secret, old-secret], ttl: 1h }}
  relay: {{ address: 127.0.0.1, port_range: {relay}-{}, peers: ["127.0.0.1/32"] }}
  ice:
    cors_origins: ["https://app.example"]
    token: ice-token
"#,
        cert.display(),
        key.display(),
        relay + 20
    );
    let b = Balancer::start(&yaml, admin);
    let ice_auth = [("Authorization", "Bearer ice-token")];

    // The /ice token and the admin token both work; nothing else does.
    let (code, _, _) = request(b.admin, "GET", "/ice", &[]);
    assert_eq!(code, 401);
    let (code, _, _) = request(b.admin, "GET", "/ice", &[("Authorization", "Bearer nope")]);
    assert_eq!(code, 401);
    let (code, _, _) = request(
        b.admin,
        "GET",
        "/ice",
        &[("Authorization", "Bearer admin-token")],
    );
    assert_eq!(code, 200);
    // The /ice token opens nothing else.
    let (code, _, _) = request(b.admin, "POST", "/reload", &ice_auth);
    assert_eq!(code, 401);

    // STUNner's parameters, honoured.
    let (code, _, body) = request(
        b.admin,
        "GET",
        "/ice?service=turn&username=bob&ttl=600&iceTransportPolicy=all",
        &ice_auth,
    );
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["iceTransportPolicy"], "all");
    let urls = v["iceServers"][0]["urls"].as_array().unwrap();
    assert!(urls.contains(&serde_json::json!(format!(
        "turn:127.0.0.1:{udp}?transport=udp"
    ))));
    assert!(urls.contains(&serde_json::json!(format!(
        "turns:127.0.0.1:{tls}?transport=tcp"
    ))));
    let user = v["iceServers"][0]["username"].as_str().unwrap();
    assert!(user.ends_with(":bob"), "{user}");
    let expiry: u64 = user.split(':').next().unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(expiry > now + 590 && expiry <= now + 601, "ttl honoured");
    assert_eq!(
        v["iceServers"][0]["credential"],
        mediagate::turn::ephemeral_password("new-secret", user),
        "the first secret signs"
    );
    let (code, _, body) = request(b.admin, "GET", "/ice?listener=tls", &ice_auth);
    assert_eq!(code, 200, "{body}");
    assert!(
        !body.contains("transport=udp") && body.contains("turns:"),
        "{body}"
    );

    // Parameters it cannot honour are refused, never ignored.
    for q in [
        "service=stun",
        "namespace=stunner",
        "gateway=udp-gateway",
        "iceTransportPolicy=none",
        "ttl=86400",
        "colour=blue",
        "listener=dtls",
    ] {
        let (code, _, body) = request(b.admin, "GET", &format!("/ice?{q}"), &ice_auth);
        assert_eq!(code, 400, "{q}: {body}");
    }

    // CORS: the allowed origin gets the headers and its preflight; another origin not.
    let (code, head, _) = request(
        b.admin,
        "OPTIONS",
        "/ice",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "GET"),
            ("Access-Control-Request-Headers", "authorization"),
        ],
    );
    assert_eq!(code, 204, "{head}");
    assert!(
        head.contains("access-control-allow-origin: https://app.example"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-headers: authorization"),
        "{head}"
    );
    let (code, head, _) = request(
        b.admin,
        "GET",
        "/ice",
        &[("Origin", "https://app.example"), ice_auth[0]],
    );
    assert_eq!(code, 200);
    assert!(
        head.contains("access-control-allow-origin: https://app.example"),
        "{head}"
    );
    let (code, head, _) = request(
        b.admin,
        "OPTIONS",
        "/ice",
        &[("Origin", "https://evil.example")],
    );
    assert_eq!(code, 403);
    assert!(!head.contains("access-control-allow-origin"), "{head}");
    let (_, head, _) = request(
        b.admin,
        "GET",
        "/ice",
        &[("Origin", "https://evil.example"), ice_auth[0]],
    );
    assert!(!head.contains("access-control-allow-origin"), "{head}");
    // Credentials are never cached, and a cache keys the answer on the origin either way
    // (an answer without CORS headers must not be served to the allowed origin).
    for origin in ["https://evil.example", "https://app.example"] {
        let (code, head, _) = request(b.admin, "GET", "/ice", &[("Origin", origin), ice_auth[0]]);
        assert_eq!(code, 200);
        assert!(head.contains("cache-control: no-store"), "{origin}: {head}");
        assert!(head.contains("vary: origin"), "{origin}: {head}");
    }
    let (_, head, _) = request(
        b.admin,
        "GET",
        "/ice",
        &[("authorization", "bearer ice-token")],
    );
    assert!(
        head.starts_with("http/1.1 200"),
        "the scheme in any case: {head}"
    );
}

/// The credential `/ice` hands out now, with its username.
fn ice_credential(admin: SocketAddr) -> (String, String) {
    let (code, _, body) = request(
        admin,
        "GET",
        "/ice?username=carol",
        &[("Authorization", "Bearer admin-token")],
    );
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let s = &v["iceServers"][0];
    (
        s["username"].as_str().unwrap().to_string(),
        s["credential"].as_str().unwrap().to_string(),
    )
}

/// Whether the running TURN service accepts these credentials (an Allocate over UDP).
async fn turn_accepts(server: SocketAddr, user: &str, password: &str) -> bool {
    let mut c = turn_support::RawClient::udp(server, user, password).await;
    let m = c.allocate().await;
    let accepted = match turn_support::code(&m) {
        None => true,
        Some(401) => false,
        Some(other) => panic!("Allocate answered {other}"),
    };
    // Keep the client's port for the rest of the test: a later client bound to the same
    // port would meet this allocation (437 Allocation Mismatch).
    KEEP.lock().unwrap().push(c);
    accepted
}

/// The clients of `turn_accepts`, alive until the test process ends.
static KEEP: std::sync::Mutex<Vec<turn_support::RawClient>> = std::sync::Mutex::new(Vec::new());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_follows_the_turn_secrets_of_a_reload() {
    let admin = free_tcp_port();
    let udp = free_udp_port();
    let relay = relay_range_above_ephemeral(admin + 700);
    let yaml = |secrets: &str| {
        format!(
            r#"
admin: {{ listen: "127.0.0.1:{admin}", token: admin-token }}
turn:
  public_address: 127.0.0.1
  listeners:
    - {{ protocol: udp, listen: "127.0.0.1:{udp}" }}
  auth: {{ type: ephemeral, secrets: [{secrets}], ttl: 1h }}
  relay: {{ address: 127.0.0.1, port_range: {relay}-{}, peers: ["127.0.0.1/32"] }}
"#,
            relay + 20
        )
    };
    let b = Balancer::start(&yaml("old-secret"), admin);
    let server: SocketAddr = format!("127.0.0.1:{udp}").parse().unwrap();
    let (old_user, old_cred) = ice_credential(b.admin);
    assert_eq!(
        old_cred,
        mediagate::turn::ephemeral_password("old-secret", &old_user)
    );
    assert!(turn_accepts(server, &old_user, &old_cred).await);

    // Rotation, step 1: a new secret first, the old one still verifying.
    std::fs::write(&b.config, yaml("new-secret, old-secret")).unwrap();
    let (code, _, body) = request(
        b.admin,
        "POST",
        "/reload",
        &[("Authorization", "Bearer admin-token")],
    );
    assert_eq!(code, 200, "{body}");
    let (new_user, new_cred) = ice_credential(b.admin);
    assert_eq!(
        new_cred,
        mediagate::turn::ephemeral_password("new-secret", &new_user),
        "/ice signs with the new first secret"
    );
    assert!(
        turn_accepts(server, &new_user, &new_cred).await,
        "the running service takes what /ice hands out"
    );
    assert!(
        turn_accepts(server, &old_user, &old_cred).await,
        "credentials signed with the old secret still work"
    );

    // Step 2: the old secret retired.
    std::fs::write(&b.config, yaml("new-secret")).unwrap();
    let (code, _, body) = request(
        b.admin,
        "POST",
        "/reload",
        &[("Authorization", "Bearer admin-token")],
    );
    assert_eq!(code, 200, "{body}");
    assert!(turn_accepts(server, &new_user, &new_cred).await);
    assert!(
        !turn_accepts(server, &old_user, &old_cred).await,
        "the retired secret no longer verifies"
    );
}
