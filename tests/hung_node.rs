//! A hung node (its link goes down: no answer, no refusal) behind 20 flows of 50
//! datagrams/s that get replies: the data plane notices the silence before the next probe
//! is due (passive silence detection), the prober confirms at once, and the flows move to
//! the backup. Measured: the worst gap between two replies any flow saw.

mod common;

use common::netns::VethHost;
use common::*;
use mediagate::flows::Flows;
use std::net::SocketAddr;
use std::time::Duration;

/// The worst reply gap of 20 flows × 50 pps when the primary's node hangs, with `health`.
async fn worst_gap(idx: u8, health: &str) -> (Duration, String) {
    let node = VethHost::create("mg-hang", "mgh", 235, idx);
    let primary = SocketAddr::from((node.addr, 7000));
    let _p = worker("udp-echo", "primary", primary, Some(&node.ns));
    let backup = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let _b = worker("udp-echo", "backup", backup, None);
    let (listen, admin) = (free_udp_port(), free_tcp_port());
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:{admin} }}\n\
         listeners:\n  - {{ name: rtp, protocol: udp, listen: 127.0.0.1:{listen}, upstream: media }}\n\
         upstreams:\n  media:\n    primary: [\"{primary}\"]\n    backup: [\"{backup}\"]\n    \
         health: {{ type: udp{health} }}\n"
    );
    let b = Balancer::start(&yaml, admin);
    let flows = Flows::start(
        SocketAddr::from(([127, 0, 0, 1], listen)),
        20,
        Duration::from_millis(20),
        16,
    )
    .await
    .expect("flows");
    wait_until_async(
        Duration::from_secs(5),
        "every flow answered by the primary",
        || {
            flows
                .snapshot()
                .iter()
                .all(|f| f.received > 10 && f.last_worker == "primary")
        },
    )
    .await;
    flows.reset_gaps();
    node.cut();
    wait_until_async(Duration::from_secs(5), "every flow on the backup", || {
        flows.snapshot().iter().all(|f| f.last_worker == "backup")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let worst = flows
        .snapshot()
        .iter()
        .map(|f| f.max_gap)
        .max()
        .unwrap_or_default();
    let st = b.status();
    let ev = upstream_of(&st, "media")["events"]
        .as_array()
        .and_then(|e| e.last().cloned())
        .unwrap_or_default();
    (worst, ev.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_node_costs_a_flow_with_replies_about_100ms_whatever_the_probe_interval() {
    if !nix::unistd::Uid::effective().is_root() {
        panic!("this test needs root for ip netns");
    }
    let (fast, ev_fast) = worst_gap(1, ", interval: 100ms, timeout: 100ms").await;
    let (default, ev_default) = worst_gap(2, "").await;
    eprintln!(
        "hung node, worst flow gap: {fast:?} with 100 ms probes ({ev_fast}), {default:?} with the default probes ({ev_default})"
    );
    // A flow sees the move at its next datagram after it: its gap is the time to the
    // verdict rounded up to its own 20 ms schedule, so the bounds (100 ms, 150 ms) carry
    // one send interval (a quiet machine measures ~81 ms for both).
    let period = Duration::from_millis(20);
    assert!(
        fast <= Duration::from_millis(100) + period,
        "100 ms probes: {fast:?} ({ev_fast})"
    );
    assert!(
        default <= Duration::from_millis(150) + period,
        "default probes: {default:?} ({ev_default})"
    );
}
