//! Replicas (`cluster:`) against skewed clocks and misused frames (issue 24, items 4 and
//! 5): an admin state dated in the future (a hand-edited state file, a replica whose
//! clock runs ahead) never outvotes a later operator action, every replica and every
//! state file ends with the newest one, and the API answers 200 only once the cluster
//! holds it; a frame captured on its way to one peer is refused by another (counted as
//! `misdirected`) and a replay from a third address draws no answer.

mod common;

use common::cluster::{Ports as Replica, alive_peers, metric, ports as replicas};
use common::*;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SECRET: &str = "test-secret-0123456789";

fn config(
    node: &str,
    me: &Replica,
    peers: &[String],
    w: &UdpPair,
    state_file: Option<&Path>,
) -> String {
    config_with(node, me, peers, w, state_file, "1s", "2s")
}

fn config_with(
    node: &str,
    me: &Replica,
    peers: &[String],
    w: &UdpPair,
    state_file: Option<&Path>,
    peer_timeout: &str,
    sync_timeout: &str,
) -> String {
    let peers = peers
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let state = state_file
        .map(|p| format!("  state_file: \"{}\"\n", p.display()))
        .unwrap_or_default();
    format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - {{ name: rtp, protocol: udp, listen: "127.0.0.1:{listen}", upstream: media }}
upstreams:
  media:
    primary: ["{primary}"]
    backup: ["{backup}"]
    health: {{ type: udp, send: ping, interval: 100ms, timeout: 100ms, rise: 2 }}
cluster:
  listen: "127.0.0.1:{cluster}"
  peers: [{peers}]
  secret: "{SECRET}"
  node_id: {node}
  peer_timeout: {peer_timeout}
  gossip_interval: 100ms
  sync_timeout: {sync_timeout}
{state}"#,
        admin = me.admin,
        listen = me.listen,
        cluster = me.cluster,
        primary = w.primary_addr,
        backup = w.backup_addr,
    )
}

fn cluster_addr(r: &Replica) -> String {
    format!("127.0.0.1:{}", r.cluster)
}

fn admin_state(b: &Balancer, server: SocketAddr) -> String {
    let status = b.status();
    upstream_of(&status, "media")["servers"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["address"] == server.to_string()))
        .and_then(|s| s["admin_state"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The stored entry of `server` in a state file, if any.
fn stored(path: &Path, server: SocketAddr) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let e = v["media"][server.to_string()].clone();
    (!e.is_null()).then_some(e)
}

/// Three replicas; r1's state file holds `maint` for the primary dated `ahead` in the
/// future (a hand-edited file, or written by a replica whose clock ran ahead, in the
/// format of the releases before versions). Every replica takes the `maint`. Then each
/// of `actions` (replica index, state) is given through that replica's API, one right
/// after the other: each is answered 200, and every replica applies it and keeps it in
/// its state file.
fn future_dated_maint_then(ahead: Duration, actions: &[(usize, &str)]) {
    let w = UdpPair::start();
    let r = replicas(3);
    let peers: Vec<String> = r.iter().map(cluster_addr).collect();
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("r{}.json", i + 1)))
        .collect();
    let future = now_ms() + ahead.as_millis() as u64;
    std::fs::write(
        &files[0],
        format!(
            r#"{{"media":{{"{}":{{"at_ms":{future},"state":"maint","origin":"r1"}}}}}}"#,
            w.primary_addr
        ),
    )
    .unwrap();
    let cfg = |i: usize| config(&format!("r{}", i + 1), &r[i], &peers, &w, Some(&files[i]));
    let b: Vec<Balancer> = (0..3)
        .map(|i| Balancer::start(&cfg(i), r[i].admin))
        .collect();
    for x in &b {
        wait_until(
            Duration::from_secs(10),
            "every replica sees 2 live peers",
            || alive_peers(x) == 2,
        );
    }
    for x in &b {
        wait_until(
            Duration::from_secs(3),
            "the stored maint everywhere",
            || admin_state(x, w.primary_addr) == "maint",
        );
    }
    // Taken in clamped: r1 rewrote its entry no further ahead than a second (+ margin).
    wait_until(Duration::from_secs(3), "r1's file rewritten", || {
        stored(&files[0], w.primary_addr)
            .and_then(|e| e["at_ms"].as_u64())
            .is_some_and(|t| t <= now_ms() + 1_500)
    });

    for &(i, state) in actions {
        let asked = Instant::now();
        let (code, body) = http(
            b[i].admin,
            "POST",
            &format!("/upstreams/media/servers/{}/state", w.primary_addr),
            Some(&format!(r#"{{"state":"{state}"}}"#)),
        )
        .expect("POST state");
        assert_eq!(code, 200, "{state} on r{}: {body}", i + 1);
        // 200 means this replica applied it and every live peer holds it.
        assert_eq!(admin_state(&b[i], w.primary_addr), state);
        for (j, x) in b.iter().enumerate() {
            wait_until(
                Duration::from_secs(2),
                &format!("{state} (given to r{}) applied by r{}", i + 1, j + 1),
                || admin_state(x, w.primary_addr) == state,
            );
        }
        eprintln!(
            "{state} on r{}: answered and applied everywhere after {:?}",
            i + 1,
            asked.elapsed()
        );
        // Every state file holds the same action: this one.
        wait_until(Duration::from_secs(2), "the state files agree", || {
            let entries: Vec<_> = files
                .iter()
                .filter_map(|f| stored(f, w.primary_addr))
                .collect();
            entries.len() == 3
                && entries.iter().all(|e| {
                    e["state"] == state
                        && e["origin"] == format!("r{}", i + 1)
                        && e["version"] == entries[0]["version"]
                })
        });
    }
    // And it holds: nothing flips back while the future date is still ahead.
    std::thread::sleep(Duration::from_millis(500));
    let (last_i, last) = *actions.last().unwrap();
    for x in &b {
        assert_eq!(admin_state(x, w.primary_addr), last);
    }
    let want = if last == "enable" {
        w.primary_addr
    } else {
        w.backup_addr
    };
    for x in &b {
        assert_eq!(x.active("media"), vec![want.to_string()]);
    }
    for f in &files {
        let e = stored(f, w.primary_addr).unwrap();
        assert_eq!(e["state"], last, "{}", f.display());
        assert_eq!(e["origin"], format!("r{}", last_i + 1));
    }
}

#[test]
fn future_dated_state_file_entry_then_enable_on_another_replica_reaches_every_replica() {
    future_dated_maint_then(Duration::from_secs(86_400), &[(1, "enable")]);
}

/// A replica whose clock runs 20 s ahead (under the 30 s frame age limit, so its frames
/// pass) set `maint`; actions given right after, on any replica and the skewed one
/// included, win in the order they are given.
#[test]
fn clock_ahead_replica_does_not_outvote_later_actions() {
    future_dated_maint_then(
        Duration::from_secs(20),
        &[(0, "enable"), (2, "drain"), (1, "enable")],
    );
}

/// A live peer that does not take the change (stopped, still inside its `peer_timeout`)
/// within `sync_timeout`: 202 naming it, not 200; it applies the change once it runs.
#[test]
fn change_a_live_peer_has_not_taken_is_not_answered_200() {
    let w = UdpPair::start();
    let r = replicas(2);
    let peers: Vec<String> = r.iter().map(cluster_addr).collect();
    let cfg = |i: usize| {
        config_with(
            &format!("r{}", i + 1),
            &r[i],
            &peers,
            &w,
            None,
            "5s",
            "300ms",
        )
    };
    let r1 = Balancer::start(&cfg(0), r[0].admin);
    let r2 = Balancer::start(&cfg(1), r[1].admin);
    wait_until(Duration::from_secs(10), "r1 and r2 see each other", || {
        alive_peers(&r1) == 1 && alive_peers(&r2) == 1
    });
    r2.proc.signal(nix::sys::signal::Signal::SIGSTOP);
    let (code, body) = http(
        r1.admin,
        "POST",
        &format!("/upstreams/media/servers/{}/state", w.primary_addr),
        Some(r#"{"state":"drain"}"#),
    )
    .expect("POST state");
    r2.proc.signal(nix::sys::signal::Signal::SIGCONT);
    assert_eq!(code, 202, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pending = v["pending"].as_array().cloned().unwrap_or_default();
    assert!(pending.contains(&serde_json::json!("r2")), "{body}");
    // Published all the same: both replicas apply it (the stopped one once it runs).
    wait_until(Duration::from_secs(2), "r1 applies the drain", || {
        admin_state(&r1, w.primary_addr) == "drain"
    });
    wait_until(Duration::from_secs(3), "r2 takes the drain", || {
        admin_state(&r2, w.primary_addr) == "drain"
    });
}

#[test]
fn frame_for_one_peer_replayed_to_another_is_dropped_counted_and_unanswered() {
    let w = UdpPair::start();
    let r = replicas(2);
    // Peer A, as far as r1 knows: it receives r1's genuine frames, addressed to it.
    let peer_a = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer_a
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    // A third address, no peer of anyone's.
    let third = UdpSocket::bind("127.0.0.1:0").unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let r1_peers = vec![
        cluster_addr(&r[1]),
        peer_a.local_addr().unwrap().to_string(),
    ];
    let r2_peers = vec![cluster_addr(&r[0])];
    let r1 = Balancer::start(&config("r1", &r[0], &r1_peers, &w, None), r[0].admin);
    let r2 = Balancer::start(&config("r2", &r[1], &r2_peers, &w, None), r[1].admin);
    wait_until(Duration::from_secs(10), "r1 and r2 see each other", || {
        alive_peers(&r1) == 1 && alive_peers(&r2) == 1
    });
    let r1_addr = SocketAddr::from(([127, 0, 0, 1], r[0].cluster));
    let r2_addr = SocketAddr::from(([127, 0, 0, 1], r[1].cluster));
    let rejected = |b: &Balancer, reason: &str| {
        metric(
            b,
            &format!("mediagate_cluster_messages_rejected_total{{reason=\"{reason}\"}}"),
        )
    };
    let misdirected0 = rejected(&r2, "misdirected");
    let mut replayed = 0;
    let mut answers = Vec::new();
    // Several captures, each replayed at once (well inside the replay window of r1's
    // counters at r2), from the third address.
    let deadline = Instant::now() + Duration::from_secs(10);
    while replayed < 5 && Instant::now() < deadline {
        let mut buf = [0u8; 65536];
        let Ok((n, from)) = peer_a.recv_from(&mut buf) else {
            continue;
        };
        if from != r1_addr {
            continue;
        }
        third.send_to(&buf[..n], r2_addr).unwrap();
        replayed += 1;
        let mut reply = [0u8; 65536];
        while let Ok((m, src)) = third.recv_from(&mut reply) {
            answers.push((src, m));
        }
    }
    assert_eq!(replayed, 5, "too few frames of r1 reached peer A");
    let mut reply = [0u8; 65536];
    third
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while let Ok((m, src)) = third.recv_from(&mut reply) {
        answers.push((src, m));
    }
    assert!(
        answers.is_empty(),
        "the third address was answered: {answers:?}"
    );
    wait_until(
        Duration::from_secs(3),
        "the misdirected frames counted",
        || rejected(&r2, "misdirected") >= misdirected0 + 5.0,
    );
    // The genuine cluster goes on.
    assert_eq!(alive_peers(&r2), 1);
    assert_eq!(alive_peers(&r1), 1);
}
