//! Failback policies end to end (new-sessions, all, manual) and `balance: hash` agreeing
//! across two independent balancer processes.

mod common;

use common::*;
use mediagate::flows::Flows;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

fn config(
    listen: u16,
    admin: u16,
    primary: SocketAddr,
    backup: SocketAddr,
    failback: &str,
) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - {{ name: rtp, protocol: udp, listen: "127.0.0.1:{listen}", upstream: media }}
upstreams:
  media:
    primary: ["{primary}"]
    backup: ["{backup}"]
    failback: {failback}
    health: {{ type: udp, send: ping, interval: 100ms, timeout: 100ms, rise: 2 }}
"#
    )
}

fn workers_on(flows: &Flows) -> Vec<String> {
    flows
        .snapshot()
        .into_iter()
        .map(|f| f.last_worker)
        .collect()
}

/// Sends one datagram from a fresh source port and returns the answering worker.
fn one_shot(target: SocketAddr, bind_ip: &str) -> String {
    let s = UdpSocket::bind(format!("{bind_ip}:0")).expect("bind");
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    for _ in 0..10 {
        s.send_to(b"12345678hello", target).expect("send");
        let mut buf = [0u8; 256];
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
            return reply.split('|').next().unwrap_or_default().to_string();
        }
    }
    panic!("no answer from {target}");
}

struct Setup {
    primary: Proc,
    _backup: Proc,
    primary_addr: SocketAddr,
    balancer: Balancer,
    listen: SocketAddr,
}

fn setup(failback: &str) -> Setup {
    let w = UdpPair::start();
    let balancer = Balancer::start(
        &config(w.listen, w.admin, w.primary_addr, w.backup_addr, failback),
        w.admin,
    );
    Setup {
        listen: w.listen_addr(),
        primary_addr: w.primary_addr,
        primary: w.primary,
        _backup: w.backup,
        balancer,
    }
}

/// Kills the primary, waits for the flows on the backup, restarts the primary and waits
/// until the balancer sees it healthy again.
async fn fail_and_recover(s: &mut Setup, flows: &Flows) -> Proc {
    wait_until_async(Duration::from_secs(10), "flows on primary", || {
        workers_on(flows).iter().all(|w| w == "primary")
    })
    .await;
    s.primary.kill();
    wait_until_async(Duration::from_secs(5), "flows on backup", || {
        workers_on(flows).iter().all(|w| w == "backup")
    })
    .await;
    let restarted = worker("udp-echo", "primary", s.primary_addr, None);
    let b = &s.balancer;
    wait_until_async(Duration::from_secs(5), "primary healthy again", || {
        let st = b.status();
        upstream_of(&st, "media")["servers"][0]["health"] == "up"
    })
    .await;
    restarted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_new_sessions_keeps_old_flows_on_backup() {
    let mut s = setup("new-sessions");
    let flows = Flows::start(s.listen, 10, Duration::from_millis(20), 16)
        .await
        .expect("flows");
    let _p = fail_and_recover(&mut s, &flows).await;
    wait_until_async(Duration::from_secs(3), "primary active again", || {
        s.balancer.active("media") == vec![s.primary_addr.to_string()]
    })
    .await;
    // Existing sessions stay on the backup...
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        workers_on(&flows).iter().all(|w| w == "backup"),
        "{:?}",
        workers_on(&flows)
    );
    // ...new ones go to the recovered primary.
    assert_eq!(one_shot(s.listen, "127.0.0.1"), "primary");
    let st = s.balancer.status();
    let kinds: Vec<_> = upstream_of(&st, "media")["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["kind"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(kinds, vec!["failover", "failback"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_all_moves_existing_flows_home() {
    let mut s = setup("all");
    let flows = Flows::start(s.listen, 10, Duration::from_millis(20), 16)
        .await
        .expect("flows");
    let _p = fail_and_recover(&mut s, &flows).await;
    wait_until_async(
        Duration::from_secs(3),
        "every flow back on the primary",
        || workers_on(&flows).iter().all(|w| w == "primary"),
    )
    .await;
    assert!(
        s.balancer
            .metrics()
            .contains("mediagate_failbacks_total{upstream=\"media\"} 1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_manual_waits_for_the_operator() {
    let mut s = setup("manual");
    let flows = Flows::start(s.listen, 10, Duration::from_millis(20), 16)
        .await
        .expect("flows");
    let _p = fail_and_recover(&mut s, &flows).await;
    // Healthy primary, but nothing moves: not the flows, not the active set.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(s.balancer.active("media"), vec![s.primary_addr.to_string()]);
    assert_eq!(one_shot(s.listen, "127.0.0.1"), "backup");
    assert!(workers_on(&flows).iter().all(|w| w == "backup"));
    // The operator's failback moves everything home.
    let (code, body) =
        http(s.balancer.admin, "POST", "/upstreams/media/failback", None).expect("POST");
    assert_eq!(code, 200, "{body}");
    assert_eq!(s.balancer.active("media"), vec![s.primary_addr.to_string()]);
    wait_until_async(
        Duration::from_secs(3),
        "every flow back on the primary",
        || workers_on(&flows).iter().all(|w| w == "primary"),
    )
    .await;
}

#[test]
fn hash_picks_the_same_server_in_two_independent_balancers() {
    // Three workers on distinct loopback IPs; client IPs 127.0.0.10..=127.0.0.39.
    let port = free_udp_port();
    let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let _workers: Vec<Proc> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            worker(
                "udp-echo",
                &format!("w{i}"),
                format!("{ip}:{port}").parse().expect("addr"),
                None,
            )
        })
        .collect();
    let start = |listen: u16, admin: u16| {
        Balancer::start(
            &format!(
                r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - {{ name: rtp, protocol: udp, listen: "127.0.0.1:{listen}", upstream: media }}
upstreams:
  media:
    primary: [{}, {}, {}]
    balance: hash
    health: {{ type: udp, port: {port}, interval: 200ms, timeout: 200ms }}
"#,
                format_args!("\"{}:{port}\"", ips[0]),
                format_args!("\"{}:{port}\"", ips[1]),
                format_args!("\"{}:{port}\"", ips[2]),
            ),
            admin,
        )
    };
    let (l1, l2) = (free_udp_port(), free_udp_port());
    let a = start(l1, free_tcp_port());
    let b = start(l2, free_tcp_port());
    let mut seen = std::collections::HashSet::new();
    for i in 10..40 {
        let client = format!("127.0.0.{i}");
        let via_a = one_shot(SocketAddr::from(([127, 0, 0, 1], l1)), &client);
        let via_b = one_shot(SocketAddr::from(([127, 0, 0, 1], l2)), &client);
        assert_eq!(via_a, via_b, "client {client}: balancers disagree");
        // Another source port of the same client IP lands on the same server.
        assert_eq!(
            one_shot(SocketAddr::from(([127, 0, 0, 1], l1)), &client),
            via_a
        );
        seen.insert(via_a);
    }
    assert_eq!(
        seen.len(),
        3,
        "30 clients should spread over all 3 servers: {seen:?}"
    );
    drop((a, b));
}
