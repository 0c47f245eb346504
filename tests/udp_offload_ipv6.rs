//! The kernel fast path (`listeners[].offload: ebpf`) for IPv6 sessions, through the
//! real binary as root on IPv6 loopback (`::1`): an IPv6 listener's flows are forwarded
//! by the kernel (`mg_flows6`) and still counted, and a failover moves them to the backup,
//! where they are offloaded again. A v6 client of a v4 server stays in user space.
//! (The IPv4 cases: `tests/udp_offload.rs`.)

mod common;

use common::*;
use mediagate::flows::Flows;
use std::net::SocketAddr;
use std::time::Duration;

fn config(listen: SocketAddr, admin: u16, primary: SocketAddr, backup: SocketAddr) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
shutdown: {{ drain_timeout: 1s }}
listeners:
  - name: rtp
    protocol: udp
    listen: "{listen}"
    upstream: media
    offload: ebpf
    session: {{ idle_timeout: 60s }}
upstreams:
  media:
    primary: ["{primary}"]
    backup: ["{backup}"]
    health: {{ type: udp, send: ping, interval: 100ms, timeout: 100ms }}
"#
    )
}

/// The value of the sample `name` (exact label set) in a /metrics text, 0 if absent.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn offload_lines(m: &str) -> String {
    m.lines()
        .filter(|l| l.contains("offload") || l.contains("packets_total"))
        .collect::<Vec<_>>()
        .join("\n")
}

const PKT_TO_SERVER: &str = "mediagate_packets_total{listener=\"rtp\",direction=\"to_server\"}";
const PKT_TO_CLIENT: &str = "mediagate_packets_total{listener=\"rtp\",direction=\"to_client\"}";
const OFF_TO_SERVER: &str =
    "mediagate_offload_packets_total{listener=\"rtp\",direction=\"to_server\"}";
const OFF_TO_CLIENT: &str =
    "mediagate_offload_packets_total{listener=\"rtp\",direction=\"to_client\"}";
const OFF_SESSIONS: &str = "mediagate_offload_sessions{listener=\"rtp\"}";

fn v6(port: u16) -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))
}

/// Waits for `n` offloaded sessions, then for 500 more datagrams forwarded by the kernel
/// towards the servers, and checks that (almost) none of them went through user space.
async fn assert_offloaded(b: &Balancer, n: usize, what: &str) {
    wait_until_async(
        Duration::from_secs(10),
        &format!("{n} sessions offloaded ({what})"),
        || sample(&b.metrics(), OFF_SESSIONS) == n as f64,
    )
    .await;
    // Let datagrams sent before the install drain through user space.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m0 = b.metrics();
    wait_until_async(
        Duration::from_secs(10),
        &format!("500 datagrams offloaded ({what})"),
        || sample(&b.metrics(), OFF_TO_SERVER) >= sample(&m0, OFF_TO_SERVER) + 500.0,
    )
    .await;
    let m1 = b.metrics();
    let delta = |name: &str| sample(&m1, name) - sample(&m0, name);
    eprintln!(
        "{what}: to server {} counted, {} offloaded; to client {} counted, {} offloaded",
        delta(PKT_TO_SERVER),
        delta(OFF_TO_SERVER),
        delta(PKT_TO_CLIENT),
        delta(OFF_TO_CLIENT)
    );
    assert!(delta(OFF_TO_SERVER) >= 500.0, "{}", offload_lines(&m1));
    assert!(delta(OFF_TO_CLIENT) >= 450.0, "{}", offload_lines(&m1));
    for (total, off) in [
        (PKT_TO_SERVER, OFF_TO_SERVER),
        (PKT_TO_CLIENT, OFF_TO_CLIENT),
    ] {
        let user_space = delta(total) - delta(off);
        assert!(
            (0.0..=2.0).contains(&user_space),
            "{what}: {user_space} datagrams went through user space:\n{}",
            offload_lines(&m1)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_flows_are_forwarded_by_the_kernel_and_fail_over() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the fast path needs root (CAP_BPF, CAP_NET_ADMIN)"
    );
    let (primary_addr, backup_addr) = (v6(free_udp_port()), v6(free_udp_port()));
    let mut primary = worker("udp-echo", "primary", primary_addr, None);
    let _backup = worker("udp-echo", "backup", backup_addr, None);
    let (listen, admin) = (v6(free_udp_port()), free_tcp_port());
    let b = Balancer::start(&config(listen, admin, primary_addr, backup_addr), admin);
    let flows = Flows::start(listen, 10, Duration::from_millis(10), 64)
        .await
        .expect("flows");
    assert_offloaded(&b, 10, "primary").await;
    assert!(
        flows.snapshot().iter().all(|f| f.last_worker == "primary"),
        "{:?}",
        flows.snapshot()
    );

    // The primary dies: the offloaded sessions leave the kernel, re-pin to the backup in
    // user space and are installed again there.
    primary.kill();
    wait_until_async(
        Duration::from_secs(10),
        "every flow answered by the backup",
        || flows.snapshot().iter().all(|f| f.last_worker == "backup"),
    )
    .await;
    assert_offloaded(&b, 10, "backup").await;
    let stats = flows.finish(Duration::from_millis(200)).await;
    for f in &stats {
        assert_eq!(f.last_worker, "backup");
        assert!(f.received + 5 >= f.sent, "flow lost replies: {f:?}");
    }
    let m = b.metrics();
    assert!(
        m.lines()
            .filter(|l| l.starts_with("mediagate_offload_errors_total{"))
            .all(|l| l.ends_with(" 0")),
        "{}",
        offload_lines(&m)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_client_of_an_ipv4_server_stays_in_user_space() {
    let primary_addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let backup_addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let _primary = worker("udp-echo", "primary", primary_addr, None);
    let _backup = worker("udp-echo", "backup", backup_addr, None);
    let (listen, admin) = (v6(free_udp_port()), free_tcp_port());
    let b = Balancer::start(&config(listen, admin, primary_addr, backup_addr), admin);
    let flows = Flows::start(listen, 5, Duration::from_millis(10), 64)
        .await
        .expect("flows");
    wait_until_async(Duration::from_secs(10), "300 datagrams answered", || {
        flows.snapshot().iter().map(|f| f.received).sum::<u64>() >= 300
    })
    .await;
    let m = b.metrics();
    assert_eq!(sample(&m, OFF_SESSIONS), 0.0, "{}", offload_lines(&m));
    assert_eq!(sample(&m, OFF_TO_SERVER), 0.0, "{}", offload_lines(&m));
    assert!(sample(&m, PKT_TO_SERVER) >= 300.0, "{}", offload_lines(&m));
    flows.finish(Duration::from_millis(100)).await;
}
