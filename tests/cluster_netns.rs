//! Partial view across real network namespaces: three replicas, each in its own netns, on
//! one bridge with the primary and the backup. The primary is cut from replica 1's
//! namespace only (an unreachable route there): every replica fails over, within one
//! probe interval + 50 ms of replica 1, and flows through every replica land on the
//! backup. Healing the cut brings every replica back to the primary.

mod common;

use common::*;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

const NET: &str = "10.213.0";
const HUB: &str = "cluster-hub";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn in_ns(ns: &str, args: &[&str]) {
    let mut all = vec!["netns", "exec", ns, "ip"];
    all.extend_from_slice(args);
    ip(&all);
}

/// The hub namespace with a bridge (primary .1, backup .2), one namespace per replica
/// (.11, .12, .13) and the test's own access from the root namespace (.254).
struct Topology;

impl Topology {
    fn create() -> Topology {
        Topology::cleanup();
        ip(&["netns", "add", HUB]);
        in_ns(HUB, &["link", "set", "lo", "up"]);
        in_ns(HUB, &["link", "add", "br0", "type", "bridge"]);
        in_ns(HUB, &["addr", "add", &format!("{NET}.1/24"), "dev", "br0"]);
        in_ns(HUB, &["addr", "add", &format!("{NET}.2/24"), "dev", "br0"]);
        in_ns(HUB, &["link", "set", "br0", "up"]);
        // Root namespace access.
        ip(&[
            "link",
            "add",
            "clu-root",
            "type",
            "veth",
            "peer",
            "name",
            "clu-rootp",
        ]);
        ip(&["link", "set", "clu-rootp", "netns", HUB]);
        in_ns(HUB, &["link", "set", "clu-rootp", "master", "br0"]);
        in_ns(HUB, &["link", "set", "clu-rootp", "up"]);
        ip(&["addr", "add", &format!("{NET}.254/24"), "dev", "clu-root"]);
        ip(&["link", "set", "clu-root", "up"]);
        for i in 1..=3 {
            let ns = format!("cluster-r{i}");
            let (h, n) = (format!("clu-h{i}"), format!("clu-n{i}"));
            ip(&["netns", "add", &ns]);
            in_ns(&ns, &["link", "set", "lo", "up"]);
            ip(&["link", "add", &h, "type", "veth", "peer", "name", &n]);
            ip(&["link", "set", &h, "netns", HUB]);
            ip(&["link", "set", &n, "netns", &ns]);
            in_ns(HUB, &["link", "set", &h, "master", "br0"]);
            in_ns(HUB, &["link", "set", &h, "up"]);
            in_ns(&ns, &["addr", "add", &format!("{NET}.1{i}/24"), "dev", &n]);
            in_ns(&ns, &["link", "set", &n, "up"]);
        }
        Topology
    }

    fn cleanup() {
        let _ = Command::new("ip")
            .args(["link", "del", "clu-root"])
            .output();
        for ns in [HUB, "cluster-r1", "cluster-r2", "cluster-r3"] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        Topology::cleanup();
    }
}

fn addr(host: u8, port: u16) -> SocketAddr {
    format!("{NET}.{host}:{port}").parse().unwrap()
}

struct Replica {
    _proc: Proc,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Replica {
    fn status(&self) -> serde_json::Value {
        let (code, body) = http(self.admin, "GET", "/status", None).expect("GET /status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }
    fn active(&self) -> Vec<String> {
        upstream_of(&self.status(), "media")["active"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }
    fn last_failover(&self) -> Option<(SystemTime, String)> {
        let st = self.status();
        let e = upstream_of(&st, "media")["events"]
            .as_array()?
            .iter()
            .rev()
            .find(|e| e["kind"] == "failover")?
            .clone();
        Some((
            humantime::parse_rfc3339(e["at"].as_str()?).ok()?,
            e["reason"].as_str()?.to_string(),
        ))
    }
}

fn start_replica(i: u8) -> Replica {
    let me = 10 + i;
    let peers: Vec<String> = (11..=13)
        .map(|h| format!("\"{}\"", addr(h, 7946)))
        .collect();
    let yaml = format!(
        r#"
admin: {{ listen: "{admin}" }}
listeners:
  - {{ name: rtp, protocol: udp, listen: "{listen}", upstream: media }}
upstreams:
  media:
    primary: ["{primary}"]
    backup: ["{backup}"]
    health: {{ type: udp, send: ping, interval: 100ms, timeout: 100ms, rise: 2 }}
cluster:
  listen: "{cluster}"
  peers: [{peers}]
  secret: "netns-secret-0123456789"
  node_id: r{i}
  peer_timeout: 1s
  gossip_interval: 100ms
"#,
        admin = addr(me, 8086),
        listen = addr(me, 5004),
        primary = addr(1, 9000),
        backup = addr(2, 9000),
        cluster = addr(me, 7946),
        peers = peers.join(", "),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mediagate.yaml");
    std::fs::write(&path, yaml).unwrap();
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("cluster-r{i}"),
            MEDIAGATE,
            "run",
            "-c",
        ])
        .arg(&path)
        .env(
            "RUST_LOG",
            std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let r = Replica {
        _proc: Proc {
            child,
            name: format!("r{i}"),
        },
        admin: addr(me, 8086),
        _dir: dir,
    };
    wait_until(Duration::from_secs(15), "replica /readyz", || {
        matches!(http(r.admin, "GET", "/readyz", None), Ok((200, _)))
    });
    r
}

fn answer_via(listen: SocketAddr) -> String {
    let s = UdpSocket::bind(format!("{NET}.254:0")).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    for _ in 0..10 {
        s.send_to(b"12345678hello", listen).unwrap();
        let mut buf = [0u8; 256];
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            return String::from_utf8_lossy(&buf[..n]).into_owned();
        }
    }
    panic!("no answer through {listen}");
}

#[test]
fn primary_cut_from_one_replica_fails_every_replica_over() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root for ip netns"
    );
    let _topo = Topology::create();
    let _primary = worker("udp-echo", "primary", addr(1, 9000), Some(HUB));
    let _backup = worker("udp-echo", "backup", addr(2, 9000), Some(HUB));
    let replicas: Vec<Replica> = (1..=3).map(start_replica).collect();
    let primary = vec![addr(1, 9000).to_string()];
    let backup = vec![addr(2, 9000).to_string()];
    for r in &replicas {
        wait_until(Duration::from_secs(10), "2 live peers", || {
            r.status()["cluster"]["peers"]
                .as_array()
                .is_some_and(|a| a.iter().filter(|p| p["alive"] == true).count() == 2)
        });
        assert_eq!(r.active(), primary);
    }

    // Cut the primary from replica 1's namespace only.
    in_ns(
        "cluster-r1",
        &["route", "add", "unreachable", &format!("{NET}.1/32")],
    );
    for r in &replicas {
        wait_until(
            Duration::from_secs(5),
            "every replica on the backup",
            || r.active() == backup,
        );
    }
    let (t1, reason1) = replicas[0].last_failover().expect("r1 failover");
    assert_ne!(reason1, "peer");
    for r in &replicas[1..] {
        let (t, reason) = r.last_failover().expect("failover");
        assert_eq!(reason, "peer");
        let lag = t.duration_since(t1).unwrap_or_default();
        eprintln!("failover behind replica 1 by {lag:?}");
        assert!(lag <= Duration::from_millis(150), "lag {lag:?}");
    }
    for i in 1..=3u8 {
        let got = answer_via(addr(10 + i, 5004));
        assert!(got.starts_with("backup"), "through r{i}: {got}");
    }

    // Heal: every replica fails back (failback: new-sessions, rise 2).
    in_ns(
        "cluster-r1",
        &["route", "del", "unreachable", &format!("{NET}.1/32")],
    );
    for r in &replicas {
        wait_until(
            Duration::from_secs(5),
            "every replica back on the primary",
            || r.active() == primary,
        );
    }
    for i in 1..=3u8 {
        let fresh = answer_via(addr(10 + i, 5004));
        assert!(fresh.starts_with("primary"), "through r{i}: {fresh}");
    }
}
