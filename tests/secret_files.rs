//! Secrets read from files (`turn.auth.secret_file`, `admin.token_file`, and the
//! `/events` and `/ice` tokens' `admin.events_token_file`, `turn.ice.token_file`), as a Kubernetes
//! Secret mounted as files delivers them, rotated in place under the real `mediagate run`:
//! the new TURN secret and the new admin token are in force within seconds without a
//! restart, the old ones are refused once they leave the file, and a broken file keeps the
//! running secrets (one rejected reload, not one per poll).

mod common;
mod turn_support;

use common::*;
use mediagate::turn::{ephemeral_password, ephemeral_username};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use turn_support::{RawClient, code};

/// Replaces `path` the way the kubelet updates a Secret volume: a new file renamed over it.
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// The ERROR-CODE of an Allocate made with a REST credential of `secret` (None: allocated).
async fn allocate_with(server: std::net::SocketAddr, secret: &str) -> Option<u16> {
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let username = ephemeral_username(expiry, "alice");
    let mut c = RawClient::udp(server, &username, &ephemeral_password(secret, &username)).await;
    code(&c.allocate().await)
}

/// Polls (bounded) until the Allocate made with `secret` gets `want`.
async fn until_allocate(server: std::net::SocketAddr, secret: &str, want: Option<u16>) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if allocate_with(server, secret).await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

fn post_reload(admin: std::net::SocketAddr, token: &str) -> u16 {
    let auth = format!("Bearer {token}");
    http_with(admin, "POST", "/reload", None, &[("Authorization", &auth)])
        .map(|(c, _)| c)
        .unwrap_or(0)
}

fn reload_errors(b: &Balancer) -> u64 {
    b.metrics()
        .lines()
        .find_map(|l| l.strip_prefix("mediagate_config_reloads_total{result=\"error\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Writes `files` (name, content) into a `secrets` directory, then starts `mediagate run`
/// with an admin API and a UDP TURN listener on loopback; `sections` gets the files'
/// paths and returns the lines added under `admin:` and under `turn:` (indented). Returns
/// the balancer, the files' paths and the TURN listener's address.
fn start_with_files(
    files: [(&str, &str); 2],
    sections: impl FnOnce(&[PathBuf; 2]) -> (String, String),
) -> (Balancer, [PathBuf; 2], std::net::SocketAddr) {
    let (turn_port, admin) = (free_udp_port(), free_tcp_port());
    let relay = 61000 + turn_support::free_port_pair() % 2000;
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let paths = files.map(|(name, _)| secrets.join(name));
    for ((_, content), path) in files.iter().zip(&paths) {
        replace(path, content);
    }
    let (admin_extra, turn_extra) = sections(&paths);
    let config = dir.path().join("mediagate.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
admin:
  listen: "127.0.0.1:{admin}"
{admin_extra}
turn:
  realm: mediagate
  public_address: 127.0.0.1
  listeners:
    - {{ protocol: udp, listen: "127.0.0.1:{turn_port}" }}
{turn_extra}
  relay:
    address: 127.0.0.1
    port_range: {relay}-{}
    peers: ["127.0.0.1/32"]
"#,
            relay + 50,
        ),
    )
    .unwrap();
    let b = Balancer::start_path(dir, config, admin);
    (
        b,
        paths,
        std::net::SocketAddr::from(([127, 0, 0, 1], turn_port)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_secret_and_admin_token_rotate_from_files_without_restart() {
    let (b, [turn_file, token_file], server) = start_with_files(
        [
            ("turn-secret", "old-turn-secret-0123456789\n"),
            ("admin-token", "old-admin-token-0123456789\n"),
        ],
        |[turn, token]| {
            (
                format!("  token_file: {}", token.display()),
                format!(
                    "  auth: {{ type: ephemeral, secret_file: {}, ttl: 1h }}",
                    turn.display()
                ),
            )
        },
    );
    let (old, new) = ("old-turn-secret-0123456789", "new-turn-secret-9876543210");

    // The file's secret is in force; a credential of the next secret is not yet.
    assert_eq!(
        allocate_with(server, old).await,
        None,
        "old secret at start"
    );
    assert_eq!(
        allocate_with(server, new).await,
        Some(401),
        "new secret before rotation"
    );

    // Step 1 of a rotation: both lines, the new one first (it signs, both verify).
    replace(&turn_file, &format!("{new}\n{old}\n"));
    assert!(
        until_allocate(server, new, None).await,
        "new secret accepted after the file changed"
    );
    assert_eq!(
        allocate_with(server, old).await,
        None,
        "old secret still verifies in step 1"
    );
    let (c, body) = http_with(
        b.admin,
        "GET",
        "/ice?username=bob",
        None,
        &[("Authorization", "Bearer old-admin-token-0123456789")],
    )
    .expect("GET /ice");
    assert_eq!(c, 200, "{body}");
    let ice: serde_json::Value = serde_json::from_str(&body).unwrap();
    let user = ice["iceServers"][0]["username"].as_str().unwrap();
    assert_eq!(
        ice["iceServers"][0]["credential"].as_str().unwrap(),
        ephemeral_password(new, user),
        "/ice signs with the file's first secret"
    );

    // Step 2: the old secret leaves the file and is refused.
    replace(&turn_file, &format!("{new}\n"));
    assert!(
        until_allocate(server, old, Some(401)).await,
        "old secret refused after rotation"
    );
    assert_eq!(
        allocate_with(server, new).await,
        None,
        "new secret in force"
    );

    // The admin token: the old one works, then the file's new one replaces it.
    assert_eq!(post_reload(b.admin, "old-admin-token-0123456789"), 200);
    replace(&token_file, "new-admin-token-0123456789\n");
    wait_until(
        Duration::from_secs(10),
        "the new admin token accepted",
        || post_reload(b.admin, "new-admin-token-0123456789") == 200,
    );
    assert_eq!(
        post_reload(b.admin, "old-admin-token-0123456789"),
        401,
        "old token refused"
    );

    // A broken secret file (empty): one rejected reload, the running secrets stay.
    let errors = reload_errors(&b);
    replace(&turn_file, "");
    wait_until(
        Duration::from_secs(10),
        "the empty secret file rejected",
        || reload_errors(&b) == errors + 1,
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        reload_errors(&b),
        errors + 1,
        "a broken file is tried once, not every poll"
    );
    assert_eq!(
        allocate_with(server, new).await,
        None,
        "the running secret stays in force"
    );
    assert!(
        b.status()["config"]["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("turn.auth.secret_file") && e.contains("is empty")),
        "{}",
        b.status()["config"]
    );
}

/// The status code of `GET path` with a bearer `token`, read from the status line alone
/// (`/events` is a stream that does not end).
fn status_of(admin: std::net::SocketAddr, path: &str, token: &str) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(2)) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    let mut head = [0u8; 12];
    if s.read_exact(&mut head).is_err() {
        return 0;
    }
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn events_and_ice_tokens_rotate_from_files_without_restart() {
    let (b, [events_file, ice_file], _) = start_with_files(
        [
            ("events-token", "old-events-token-0123456789\n"),
            ("ice-token", "old-ice-token-0123456789\n"),
        ],
        |[events, ice]| {
            (
                format!(
                    "  token: admin-token-0123456789abcdef\n  events_token_file: {}",
                    events.display()
                ),
                format!(
                    "  auth: {{ type: ephemeral, secret: turn-secret-0123456789abcdef, ttl: 1h }}\n  ice: {{ token_file: {} }}",
                    ice.display()
                ),
            )
        },
    );
    let ice = "/ice?username=bob";
    assert_eq!(
        status_of(b.admin, "/events", "old-events-token-0123456789"),
        200
    );
    assert_eq!(
        status_of(b.admin, "/events", "new-events-token-0123456789"),
        401
    );
    assert_eq!(status_of(b.admin, ice, "old-ice-token-0123456789"), 200);
    assert_eq!(
        post_reload(b.admin, "old-events-token-0123456789"),
        401,
        "the events token opens /events only"
    );

    replace(&events_file, "new-events-token-0123456789\n");
    replace(&ice_file, "new-ice-token-0123456789\n");
    wait_until(Duration::from_secs(10), "the new events token", || {
        status_of(b.admin, "/events", "new-events-token-0123456789") == 200
    });
    wait_until(Duration::from_secs(10), "the new /ice token", || {
        status_of(b.admin, ice, "new-ice-token-0123456789") == 200
    });
    assert_eq!(
        status_of(b.admin, "/events", "old-events-token-0123456789"),
        401,
        "old events token refused"
    );
    assert_eq!(
        status_of(b.admin, ice, "old-ice-token-0123456789"),
        401,
        "old /ice token refused"
    );
    // The admin token opens both throughout.
    assert_eq!(
        status_of(b.admin, "/events", "admin-token-0123456789abcdef"),
        200
    );
    assert_eq!(status_of(b.admin, ice, "admin-token-0123456789abcdef"), 200);
}
