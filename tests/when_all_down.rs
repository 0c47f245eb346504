//! No blackhole (`when_all_down`): the only server's HTTP probe starts answering 503
//! while its media path (a UDP echo) keeps working. With the default `keep_last` the
//! flows lose nothing and `/status` shows the upstream `degraded`; with `drop` (the old
//! behaviour, as a control) the same probe failure drops the flows' datagrams.

mod common;

use common::*;
use mediagate::flows::Flows;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A health endpoint that answers 200, or 503 while `failing` is set.
fn health_endpoint(failing: Arc<AtomicBool>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let failing = failing.clone();
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let reply: &[u8] = if failing.load(Ordering::Relaxed) {
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                };
                let _ = s.write_all(reply);
            });
        }
    });
    port
}

struct Setup {
    _echo: Proc,
    balancer: Balancer,
    listen: SocketAddr,
    failing: Arc<AtomicBool>,
}

fn setup(when_all_down: &str) -> Setup {
    let echo = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let echo_proc = worker("udp-echo", "only", echo, None);
    let failing = Arc::new(AtomicBool::new(false));
    let http = health_endpoint(failing.clone());
    let (listen, admin) = (free_udp_port(), free_tcp_port());
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:{admin} }}\n\
         listeners:\n  - {{ name: rtp, protocol: udp, listen: 127.0.0.1:{listen}, upstream: media }}\n\
         upstreams:\n  media:\n    primary: [\"{echo}\"]\n    when_all_down: {when_all_down}\n    \
         health: {{ type: http, port: {http}, path: /janus/info, interval: 100ms, timeout: 100ms }}\n"
    );
    let balancer = Balancer::start(&yaml, admin);
    Setup {
        _echo: echo_proc,
        balancer,
        listen: SocketAddr::from(([127, 0, 0, 1], listen)),
        failing,
    }
}

fn degraded(b: &Balancer) -> bool {
    upstream_of(&b.status(), "media")["degraded"] == true
}

/// Runs flows through a probe outage of `outage` and returns the datagrams they lost
/// during it.
async fn lost_during_outage(s: &Setup, outage: Duration) -> u64 {
    let flows = Flows::start(s.listen, 10, Duration::from_millis(20), 16)
        .await
        .expect("flows");
    wait_until_async(Duration::from_secs(3), "every flow answered", || {
        flows.snapshot().iter().all(|f| f.received > 5)
    })
    .await;
    let before: Vec<u64> = flows.snapshot().iter().map(|f| f.sent).collect();
    s.failing.store(true, Ordering::Relaxed);
    tokio::time::sleep(outage).await;
    let after: Vec<u64> = flows.snapshot().iter().map(|f| f.sent).collect();
    s.failing.store(false, Ordering::Relaxed);
    // Let the last datagrams of the outage come back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let snap = flows.snapshot();
    snap.iter()
        .zip(before.iter().zip(&after))
        .map(|(f, (b, a))| f.lost_between(*b, *a))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_probe_on_the_only_server_drops_no_media_and_shows_degraded() {
    let s = setup("keep_last");
    let flows_lost = {
        let s = &s;
        let watch = async {
            wait_until_async(Duration::from_secs(3), "degraded", || degraded(&s.balancer)).await;
        };
        let (lost, ()) = tokio::join!(lost_during_outage(s, Duration::from_millis(1500)), watch);
        lost
    };
    assert_eq!(
        flows_lost, 0,
        "keep_last must not drop media while only the probe fails"
    );
    wait_until_async(Duration::from_secs(3), "no longer degraded", || {
        !degraded(&s.balancer)
    })
    .await;
    let st = s.balancer.status();
    let events = upstream_of(&st, "media")["events"]
        .as_array()
        .unwrap()
        .clone();
    let all_down = events
        .iter()
        .find(|e| e["kind"] == "all_down")
        .unwrap_or_else(|| panic!("an all_down event in {events:?}"));
    assert_eq!(all_down["reason"], "probe_failed", "{all_down}");
    assert!(all_down["confirmed_by"].as_u64().is_some(), "{all_down}");
    let m = s.balancer.metrics();
    assert!(
        m.lines()
            .any(|l| l.starts_with("mediagate_upstream_all_down_total{upstream=\"media\"} 1")),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_drop_the_same_probe_failure_drops_the_media() {
    let s = setup("drop");
    let lost = lost_during_outage(&s, Duration::from_millis(1500)).await;
    assert!(
        lost > 50,
        "drop leaves the upstream without a server: lost {lost}"
    );
    assert!(!degraded(&s.balancer));
}
