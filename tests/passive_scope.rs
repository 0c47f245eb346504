//! Passive signals per protocol: a UDP and a TCP listener share one upstream whose servers
//! only speak UDP (as RTP workers do). TCP connects refused by those servers must not
//! fail the UDP media over; with `passive_scope: server` the operator asks that they do.

mod common;

use common::*;
use mediagate::flows::Flows;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn config(w: &UdpPair, tcp_listen: u16, scope: &str) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - {{ name: rtp, protocol: udp, listen: "127.0.0.1:{udp}", upstream: media }}
  - {{ name: sig, protocol: tcp, listen: "127.0.0.1:{tcp_listen}", upstream: media }}
upstreams:
  media:
    primary: ["{p}"]
    backup: ["{b}"]
    passive_scope: {scope}
    health: {{ type: udp, send: ping, interval: 100ms, timeout: 100ms }}
"#,
        admin = w.admin,
        udp = w.listen,
        p = w.primary_addr,
        b = w.backup_addr,
    )
}

/// Opens a TCP connection through the balancer and waits until the balancer gives up on
/// it (no server accepts TCP): the client sees the connection end.
fn refused_tcp_connection(listen: u16) {
    let addr = SocketAddr::from(([127, 0, 0, 1], listen));
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(s) => s,
        // The balancer accepted and already reset it: the connection has ended.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
        Err(e) => panic!("connect to the balancer: {e}"),
    };
    if s.set_read_timeout(Some(Duration::from_secs(5))).is_err() {
        return;
    }
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("{n} bytes from a server that has no TCP side"),
    }
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn failovers(b: &Balancer) -> f64 {
    let m = b.metrics();
    m.lines()
        .filter(|l| l.starts_with("mediagate_failovers_total{upstream=\"media\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_tcp_connect_does_not_fail_the_udp_side_over() {
    let w = UdpPair::start();
    let tcp_listen = free_tcp_port();
    let b = Balancer::start(&config(&w, tcp_listen, "protocol"), w.admin);
    let flows = Flows::start(w.listen_addr(), 10, Duration::from_millis(20), 64)
        .await
        .expect("flows");
    wait_until_async(Duration::from_secs(10), "flows answered by primary", || {
        flows.snapshot().iter().all(|f| f.last_worker == "primary")
    })
    .await;

    for _ in 0..5 {
        tokio::task::spawn_blocking(move || refused_tcp_connection(tcp_listen))
            .await
            .expect("tcp client");
    }
    let ok_probes = format!(
        "mediagate_probes_total{{upstream=\"media\",server=\"{}\",result=\"ok\"}}",
        w.primary_addr
    );
    // The controller has handled the passive signals and probed the primary three more
    // times since: any failover they caused would show by now.
    let probes_then = metric(&b.metrics(), &ok_probes);
    wait_until_async(Duration::from_secs(5), "three more probe rounds", || {
        metric(&b.metrics(), &ok_probes) >= probes_then + 3.0
    })
    .await;
    assert_eq!(b.active("media"), vec![w.primary_addr.to_string()]);
    assert_eq!(failovers(&b), 0.0, "{}", b.metrics());
    let m = b.metrics();
    assert!(
        metric(
            &m,
            "mediagate_sessions_rejected_total{listener=\"sig\",reason=\"no_server\"}"
        ) >= 5.0,
        "{m}"
    );
    let stats = flows.finish(Duration::from_millis(200)).await;
    for f in &stats {
        assert_eq!(f.by_worker.get("backup"), None, "a flow moved: {f:?}");
        assert!(f.lost() <= 1, "{f:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_scope_server_fails_everything_over_on_a_tcp_refusal() {
    let w = UdpPair::start();
    let tcp_listen = free_tcp_port();
    let b = Balancer::start(&config(&w, tcp_listen, "server"), w.admin);
    tokio::task::spawn_blocking(move || refused_tcp_connection(tcp_listen))
        .await
        .expect("tcp client");
    wait_until_async(Duration::from_secs(5), "a connect_refused failover", || {
        metric(
            &b.metrics(),
            "mediagate_failovers_total{upstream=\"media\",reason=\"connect_refused\"}",
        ) >= 1.0
    })
    .await;
}
