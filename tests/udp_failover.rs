//! UDP failover end to end: 100 flows through the real binary to echo workers that run as
//! separate processes; the primary dies, hangs, or loses its network link. Each case runs
//! twice: in user space, and with the kernel fast path (`offload: ebpf`, needs root and a
//! build with clang), where it must keep the same bounds.

mod common;

use common::*;
use mediagate::flows::{FlowStats, Flows};
use nix::sys::signal::Signal;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

const FLOWS: usize = 100;
const EVERY: Duration = Duration::from_millis(20);

fn config(
    listen: u16,
    admin: u16,
    primary: SocketAddr,
    backup: SocketAddr,
    offload: bool,
) -> String {
    let offload = if offload { "ebpf" } else { "none" };
    format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - {{ name: rtp, protocol: udp, listen: "127.0.0.1:{listen}", upstream: media, offload: {offload} }}
upstreams:
  media:
    primary: ["{primary}"]
    backup: ["{backup}"]
    health: {{ type: udp, send: ping, interval: 100ms, timeout: 100ms }}
"#
    )
}

fn all_on(flows: &Flows, worker: &str) -> bool {
    flows.snapshot().iter().all(|f| f.last_worker == worker)
}

struct Outcome {
    worst_loss: u64,
    total_loss: u64,
    worst_gap: Duration,
    moved_after: Duration,
}

/// Streams 100 flows, runs `fail` on the primary, waits for every flow to be answered by
/// the backup, and measures loss and silence per flow.
async fn fail_primary(b: &Balancer, offload: bool, listen: u16, fail: impl FnOnce()) -> Outcome {
    let target = SocketAddr::from(([127, 0, 0, 1], listen));
    let flows = Flows::start(target, FLOWS, EVERY, 64).await.expect("flows");
    wait_until_async(
        Duration::from_secs(10),
        "every flow answered by the primary",
        || all_on(&flows, "primary"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    if offload {
        // The failover must happen with every flow in the kernel fast path.
        let m = b.metrics();
        assert!(
            m.contains(&format!(
                "mediagate_offload_sessions{{listener=\"rtp\"}} {FLOWS}"
            )),
            "flows not offloaded:\n{}",
            m.lines()
                .filter(|l| l.contains("offload"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let before = flows.snapshot();
    flows.reset_gaps();
    let t = Instant::now();
    fail();
    wait_until_async(
        Duration::from_secs(5),
        "every flow answered by the backup",
        || all_on(&flows, "backup"),
    )
    .await;
    let moved_after = t.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after: Vec<FlowStats> = flows.finish(Duration::from_millis(200)).await;
    let losses: Vec<u64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.lost_between(b.sent, a.sent))
        .collect();
    Outcome {
        worst_loss: losses.iter().copied().max().unwrap_or(0),
        total_loss: losses.iter().sum(),
        worst_gap: after.iter().map(|f| f.max_gap).max().unwrap_or_default(),
        moved_after,
    }
}

fn last_failover(b: &Balancer) -> serde_json::Value {
    let st = b.status();
    let events = upstream_of(&st, "media")["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    events
        .into_iter()
        .rev()
        .find(|e| e["kind"] == "failover")
        .unwrap_or_else(|| panic!("no failover event in {st}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_death_costs_each_flow_at_most_one_datagram() {
    process_death(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offloaded_process_death_costs_each_flow_at_most_one_datagram() {
    process_death(true).await;
}

async fn process_death(offload: bool) {
    let mut w = UdpPair::start();
    let (l, backup_addr) = (w.listen, w.backup_addr);
    let b = Balancer::start(
        &config(l, w.admin, w.primary_addr, backup_addr, offload),
        w.admin,
    );

    let out = fail_primary(&b, offload, l, || w.primary.kill()).await;
    eprintln!(
        "process death: worst loss {} datagram(s)/flow, total {} over {FLOWS} flows, longest silence {:?}, all flows on backup after {:?}",
        out.worst_loss, out.total_loss, out.worst_gap, out.moved_after
    );
    assert!(
        out.worst_loss <= 1,
        "a flow lost {} datagrams",
        out.worst_loss
    );
    let ev = last_failover(&b);
    assert_eq!(ev["reason"], "icmp_unreachable", "{ev}");
    assert_eq!(ev["to"][0], backup_addr.to_string());
    assert!(
        b.metrics().contains(
            "mediagate_failovers_total{upstream=\"media\",reason=\"icmp_unreachable\"} 1"
        ),
        "failover not counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_worker_flows_resume_within_300ms() {
    hung_worker(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offloaded_hung_worker_flows_resume_within_300ms() {
    hung_worker(true).await;
}

async fn hung_worker(offload: bool) {
    let w = UdpPair::start();
    let l = w.listen;
    let b = Balancer::start(
        &config(l, w.admin, w.primary_addr, w.backup_addr, offload),
        w.admin,
    );

    let out = fail_primary(&b, offload, l, || w.primary.signal(Signal::SIGSTOP)).await;
    eprintln!(
        "hung worker (SIGSTOP): longest silence {:?}, all flows on backup after {:?}, lost {} in total",
        out.worst_gap, out.moved_after, out.total_loss
    );
    assert!(
        out.worst_gap <= Duration::from_millis(300),
        "a flow was silent for {:?}",
        out.worst_gap
    );
    let ev = last_failover(&b);
    assert_eq!(ev["reason"], "probe_timeout", "{ev}");
    assert!(
        ev["detection_ms"].as_u64().is_some_and(|d| d <= 250),
        "{ev}"
    );
}

/// A network namespace with a veth pair, removed on drop.
struct TestHost {
    ns: String,
    host_if: String,
    ns_if: String,
    addr: std::net::Ipv4Addr,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestHost {
    /// `variant` keeps the two node-gone tests apart when they run in one process.
    fn create(variant: u32) -> TestHost {
        let id = (std::process::id() % 100) * 2 + variant + 20;
        let ns = format!("mgtest{id}");
        let host_if = format!("mgh{id}");
        let ns_if = format!("mgn{id}");
        // A /30 of our own, reachable only through the veth this test creates.
        let net = format!("10.211.{id}");
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &ns]);
        ip(&["addr", "add", &format!("{net}.1/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "netns",
            "exec",
            &ns,
            "ip",
            "addr",
            "add",
            &format!("{net}.2/30"),
            "dev",
            &ns_if,
        ]);
        ip(&["netns", "exec", &ns, "ip", "link", "set", &ns_if, "up"]);
        ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        TestHost {
            addr: format!("{net}.2").parse().expect("addr"),
            ns,
            host_if,
            ns_if,
        }
    }

    fn link_down(&self) {
        ip(&[
            "netns",
            "exec",
            &self.ns,
            "ip",
            "link",
            "set",
            &self.ns_if,
            "down",
        ]);
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_gone_flows_resume_within_300ms() {
    node_gone(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offloaded_node_gone_flows_resume_within_300ms() {
    node_gone(true).await;
}

async fn node_gone(offload: bool) {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root for ip netns (CI runs as root)"
    );
    let host = TestHost::create(u32::from(offload));
    let (p, bk, l, a) = (
        free_udp_port(),
        free_udp_port(),
        free_udp_port(),
        free_tcp_port(),
    );
    let primary_addr = SocketAddr::from((host.addr, p));
    let backup_addr = SocketAddr::from(([127, 0, 0, 1], bk));
    let _primary = worker("udp-echo", "primary", primary_addr, Some(&host.ns));
    let _backup = worker("udp-echo", "backup", backup_addr, None);
    let b = Balancer::start(&config(l, a, primary_addr, backup_addr, offload), a);
    assert_eq!(b.active("media"), vec![primary_addr.to_string()]);

    let out = fail_primary(&b, offload, l, || host.link_down()).await;
    eprintln!(
        "node gone (netns link down): longest silence {:?}, all flows on backup after {:?}, lost {} in total",
        out.worst_gap, out.moved_after, out.total_loss
    );
    assert!(
        out.worst_gap <= Duration::from_millis(300),
        "a flow was silent for {:?}",
        out.worst_gap
    );
    let ev = last_failover(&b);
    assert_eq!(ev["reason"], "probe_timeout", "{ev}");
}
