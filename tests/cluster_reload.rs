//! `cluster:` reloads live: a replica that starts alone joins by a reload and takes the
//! admin states, a new peers list and a removed section apply without touching its
//! sessions, a bad section changes nothing; and an admin state reaches a server that
//! appears later (a reload), from a peer and from the state file; a replaced member
//! keeps the peers' verdict in force, and another secret cuts a replica off.

mod common;

use common::*;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

const SECRET: &str = "test-secret-0123456789";

struct Ports {
    admin: u16,
    listen: u16,
    cluster: u16,
}

fn ports() -> Ports {
    Ports {
        admin: free_tcp_port(),
        listen: free_udp_port(),
        cluster: free_udp_port(),
    }
}

fn peer(p: &Ports) -> String {
    format!("127.0.0.1:{}", p.cluster)
}

/// The `cluster:` section of one replica (empty `peers`: it waits to be found).
fn cluster_section(node: &str, me: &Ports, peers: &[String], extra: &str) -> String {
    let peers = peers
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"cluster:
  listen: "127.0.0.1:{cluster}"
  peers: [{peers}]
  secret: "{SECRET}"
  node_id: {node}
  peer_timeout: 1s
  gossip_interval: 100ms
  sync_timeout: 300ms
{extra}"#,
        cluster = me.cluster,
    )
}

fn config(me: &Ports, backups: &[SocketAddr], primary: SocketAddr, cluster: &str) -> String {
    let backups = backups
        .iter()
        .map(|b| format!("\"{b}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - {{ name: rtp, protocol: udp, listen: "127.0.0.1:{listen}", upstream: media }}
upstreams:
  media:
    primary: ["{primary}"]
    backup: [{backups}]
    health: {{ type: udp, send: ping, interval: 100ms, timeout: 100ms, rise: 2 }}
{cluster}"#,
        admin = me.admin,
        listen = me.listen,
    )
}

fn admin_state(b: &Balancer, addr: SocketAddr) -> String {
    let st = b.status();
    upstream_of(&st, "media")["servers"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["address"] == addr.to_string()))
        .map(|s| s["admin_state"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// (node, alive) of every peer in /status.
fn peers(b: &Balancer) -> Vec<(String, bool)> {
    b.status()["cluster"]["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["node"].as_str().unwrap_or("").to_string(),
                        p["alive"] == true,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn alive(b: &Balancer, node: &str) -> bool {
    peers(b).iter().any(|(n, a)| n == node && *a)
}

fn reload(b: &Balancer, yaml: &str) -> (u16, String) {
    std::fs::write(&b.config, yaml).unwrap();
    http(b.admin, "POST", "/reload", None).expect("POST /reload")
}

fn set_state(b: &Balancer, server: SocketAddr, state: &str) {
    let (code, body) = http(
        b.admin,
        "POST",
        &format!("/upstreams/media/servers/{server}/state"),
        Some(&format!("{{\"state\":\"{state}\"}}")),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
}

/// One UDP flow through a replica: every exchange must be answered by the same worker.
struct Flow {
    sock: UdpSocket,
    to: SocketAddr,
}

impl Flow {
    fn new(to: SocketAddr) -> Flow {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        Flow { sock, to }
    }

    /// The worker that answers (a few tries: the first datagram may race the session).
    fn answer(&self) -> String {
        for _ in 0..10 {
            self.sock.send_to(b"12345678hello", self.to).unwrap();
            let mut buf = [0u8; 256];
            if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                return text
                    .split(|c: char| !c.is_alphanumeric())
                    .next()
                    .unwrap_or("")
                    .into();
            }
        }
        panic!("no answer through {}", self.to);
    }
}

fn sessions(b: &Balancer) -> u64 {
    b.status()["listeners"][0]["sessions"].as_u64().unwrap_or(0)
}

#[test]
fn reload_adds_changes_and_removes_the_cluster_section_live() {
    let w = UdpPair::start();
    let (p1, p2, p3) = (ports(), ports(), ports());
    let backups = [w.backup_addr];
    // r1 and r3 list nobody: they learn of each other only through r2.
    let r1 = Balancer::start(
        &config(
            &p1,
            &backups,
            w.primary_addr,
            &cluster_section("r1", &p1, &[], ""),
        ),
        p1.admin,
    );
    let r3 = Balancer::start(
        &config(
            &p3,
            &backups,
            w.primary_addr,
            &cluster_section("r3", &p3, &[], ""),
        ),
        p3.admin,
    );
    // r2 starts on its own, with a flow through it.
    let alone = config(&p2, &backups, w.primary_addr, "");
    let r2 = Balancer::start(&alone, p2.admin);
    let flow = Flow::new(SocketAddr::from(([127, 0, 0, 1], p2.listen)));
    assert_eq!(flow.answer(), "primary");
    assert_eq!(sessions(&r2), 1);
    assert!(r2.status()["cluster"].is_null());

    // A drain set on r1 while r2 is not in the cluster stays on r1.
    set_state(&r1, w.primary_addr, "drain");
    assert_eq!(admin_state(&r2, w.primary_addr), "enable");

    // 1. Reload adds `cluster:` to r2 (peers: r1): it joins and takes the drain.
    let joined = config(
        &p2,
        &backups,
        w.primary_addr,
        &cluster_section("r2", &p2, &[peer(&p1)], ""),
    );
    let t = Instant::now();
    let (code, body) = reload(&r2, &joined);
    assert_eq!(code, 200, "{body}");
    wait_until(Duration::from_secs(3), "r2 takes the drain from r1", || {
        admin_state(&r2, w.primary_addr) == "drain"
    });
    eprintln!("drain taken by r2 {:?} after the reload", t.elapsed());
    wait_until(Duration::from_secs(3), "r1 sees r2", || alive(&r1, "r2"));
    assert_eq!(r2.status()["cluster"]["node"], "r2");

    // 2. Bad sections change nothing: a secret too short (refused by the check) and a
    //    peer port that another socket holds (refused while preparing).
    let (code, body) = reload(&r2, &joined.replace(SECRET, "short"));
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("cluster.secret"), "{body}");
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let busy = joined.replace(
        &format!("listen: \"127.0.0.1:{}\"", p2.cluster),
        &format!("listen: \"{}\"", taken.local_addr().unwrap()),
    );
    let (code, body) = reload(&r2, &busy);
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("cluster: bind"), "{body}");
    std::fs::write(&r2.config, &joined).unwrap();
    let st = r2.status();
    assert_eq!(st["cluster"]["address"], peer(&p2));
    assert!(st["config"]["last_reload_error"].as_str().is_some(), "{st}");
    // Liveness is gossip's view: a heartbeat late on a loaded machine can flip it for a
    // moment; a cluster the bad reloads had broken would not come back.
    wait_until(Duration::from_secs(3), "r2 still sees r1", || {
        alive(&r2, "r1")
    });

    // 3. A new peers list (r3 instead of r1) and another peer_timeout: r3 learns of r2
    //    and, through it, of r1, and takes the drain.
    let moved = config(
        &p2,
        &backups,
        w.primary_addr,
        &cluster_section("r2", &p2, &[peer(&p3)], "")
            .replace("peer_timeout: 1s", "peer_timeout: 800ms"),
    );
    let (code, body) = reload(&r2, &moved);
    assert_eq!(code, 200, "{body}");
    wait_until(Duration::from_secs(5), "r3 takes the drain", || {
        admin_state(&r3, w.primary_addr) == "drain"
    });
    wait_until(Duration::from_secs(5), "r3 sees r1 and r2", || {
        alive(&r3, "r1") && alive(&r3, "r2")
    });
    // The newer generation of r2 replaces the older one in every peer's list.
    wait_until(Duration::from_secs(3), "one r2 in r1's list", || {
        peers(&r1).iter().filter(|(n, _)| n == "r2").count() == 1 && alive(&r1, "r2")
    });
    assert_eq!(admin_state(&r2, w.primary_addr), "drain");

    // 4. Removing `cluster:`: the others drop r2 after their peer_timeout; r2 keeps its
    //    admin states, and the flow went on through every reload on the same session.
    let (code, body) = reload(&r2, &alone);
    assert_eq!(code, 200, "{body}");
    let removed = Instant::now();
    assert!(r2.status()["cluster"].is_null());
    for b in [&r1, &r3] {
        wait_until(Duration::from_secs(5), "r2 dropped by its peers", || {
            !alive(b, "r2")
        });
    }
    eprintln!(
        "r2 dropped by r1 and r3 {:?} after its reload",
        removed.elapsed()
    );
    assert!(removed.elapsed() >= Duration::from_millis(500));
    assert!(
        r2.metrics()
            .lines()
            .any(|l| l.starts_with("mediagate_cluster_peers_alive ")
                && l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
                    == Some(0.0)),
        "peers_alive not back to 0"
    );
    assert_eq!(admin_state(&r2, w.primary_addr), "drain");
    assert_eq!(flow.answer(), "primary", "the session stays on its server");
    assert_eq!(sessions(&r2), 1, "the reloads did not touch the session");
}

#[test]
fn admin_state_reaches_a_server_that_appears_later() {
    let w = UdpPair::start();
    let (p1, p2) = (ports(), ports());
    // A server only r1 has for now (no worker behind it: its admin state is what counts).
    let later = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let state_line = format!("  state_file: \"{}\"\n", state.display());
    let r1 = Balancer::start(
        &config(
            &p1,
            &[w.backup_addr, later],
            w.primary_addr,
            &cluster_section("r1", &p1, &[peer(&p2)], ""),
        ),
        p1.admin,
    );
    let without = config(
        &p2,
        &[w.backup_addr],
        w.primary_addr,
        &cluster_section("r2", &p2, &[peer(&p1)], &state_line),
    );
    let with = config(
        &p2,
        &[w.backup_addr, later],
        w.primary_addr,
        &cluster_section("r2", &p2, &[peer(&p1)], &state_line),
    );
    // r2 starts without a state file.
    let no_file = without.replace(&state_line, "");
    let mut r2 = Balancer::start(&no_file, p2.admin);
    wait_until(Duration::from_secs(5), "r1 and r2 see each other", || {
        alive(&r1, "r2") && alive(&r2, "r1")
    });

    // From a peer: r1 puts the server r2 does not have yet in maintenance; a reload
    // gives r2 a state file, which keeps it.
    set_state(&r1, later, "maint");
    let (code, body) = reload(&r2, &without);
    assert_eq!(code, 200, "{body}");
    wait_until(
        Duration::from_secs(3),
        "r2 keeps it in its new state file",
        || std::fs::read_to_string(&state).is_ok_and(|t| t.contains(&later.to_string())),
    );
    let (code, body) = reload(&r2, &with);
    assert_eq!(code, 200, "{body}");
    let added = Instant::now();
    wait_until(
        Duration::from_secs(2),
        "the new server is in maint on r2",
        || admin_state(&r2, later) == "maint",
    );
    eprintln!(
        "admin state applied {:?} after the reload added the server",
        added.elapsed()
    );

    // From the state file: r2 alone, restarted without the server, then a reload adds it.
    drop(r1);
    r2.proc.kill();
    drop(r2);
    let alone_without = without.replace(&format!("\"{}\"", peer(&p1)), "");
    let alone_with = with.replace(&format!("\"{}\"", peer(&p1)), "");
    let dir2 = tempfile::tempdir().unwrap();
    let path = dir2.path().join("mediagate.yaml");
    std::fs::write(&path, &alone_without).unwrap();
    let r2 = Balancer::start_path(dir2, path, p2.admin);
    assert_eq!(admin_state(&r2, later), "", "not in the upstream yet");
    let (code, body) = reload(&r2, &alone_with);
    assert_eq!(code, 200, "{body}");
    wait_until(Duration::from_secs(2), "maint from the state file", || {
        admin_state(&r2, later) == "maint"
    });
}

#[test]
fn replacing_the_member_keeps_the_peers_verdict_in_force() {
    let w = UdpPair::start();
    let (p1, p2) = (ports(), ports());
    let backups = [w.backup_addr];
    // r1 only accepts the backup's answer: it alone sees the primary down.
    let r1 = Balancer::start(
        &config(
            &p1,
            &backups,
            w.primary_addr,
            &cluster_section("r1", &p1, &[peer(&p2)], ""),
        )
        .replace("rise: 2 }", "rise: 2, expect: backup }"),
        p1.admin,
    );
    let yaml = config(
        &p2,
        &backups,
        w.primary_addr,
        &cluster_section("r2", &p2, &[peer(&p1)], ""),
    );
    let r2 = Balancer::start(&yaml, p2.admin);
    let backup = vec![w.backup_addr.to_string()];
    wait_until(
        Duration::from_secs(5),
        "r2 on the backup by r1's verdict",
        || r2.active("media") == backup,
    );
    let events = |b: &Balancer| {
        upstream_of(&b.status(), "media")["events"]
            .as_array()
            .map(|a| a.len())
            .unwrap_or(0)
    };
    let before = events(&r2);

    // A new member for r2 (another peer_timeout): the verdict stays in force while it
    // hears r1 again, so r2 never goes back to the primary in between.
    let (code, body) = reload(
        &r2,
        &yaml.replace("peer_timeout: 1s", "peer_timeout: 900ms"),
    );
    assert_eq!(code, 200, "{body}");
    let t = Instant::now();
    let mut flapped = false;
    wait_until(
        Duration::from_secs(5),
        "r1 hears the new member of r2",
        || {
            flapped |= r2.active("media") != backup;
            peers(&r1).iter().filter(|(n, _)| n == "r2").count() == 1 && alive(&r1, "r2")
        },
    );
    while t.elapsed() < Duration::from_millis(300) {
        flapped |= r2.active("media") != backup;
    }
    assert!(!flapped, "r2 left the backup during the reload");
    assert_eq!(events(&r2), before, "no failback/failover event on r2");
    assert!(alive(&r2, "r1"));

    // Another secret on r2 only: the two no longer understand each other. r1 counts
    // r2's frames as forged, each drops the other after peer_timeout, and r2, no longer
    // bound by r1's verdict, goes back to the primary.
    let bad_mac = |b: &Balancer| {
        b.metrics()
            .lines()
            .find_map(|l| {
                l.strip_prefix("mediagate_cluster_messages_rejected_total{reason=\"bad_mac\"} ")
            })
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let forged = bad_mac(&r1);
    let (code, body) = reload(&r2, &yaml.replace(SECRET, "another-secret-0123456789"));
    assert_eq!(code, 200, "{body}");
    wait_until(Duration::from_secs(3), "r1 refuses r2's frames", || {
        bad_mac(&r1) > forged
    });
    wait_until(Duration::from_secs(5), "r1 drops r2", || !alive(&r1, "r2"));
    let primary = vec![w.primary_addr.to_string()];
    wait_until(Duration::from_secs(5), "r2 back on the primary", || {
        r2.active("media") == primary
    });
}
