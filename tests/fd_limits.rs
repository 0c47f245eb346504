//! Descriptor and memory edges of issue 24, item 7, through the real binary: the admin
//! API keeps answering when the process has run out of descriptors (its spare ones), a
//! TURN configuration that cannot fit the open-file limit is refused at start with what to
//! change, and memory comes back after a reload to 10,000 servers and back.

mod common;

use common::*;
use mediagate::flows::Flows;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

/// Sets the soft open-file limit of a running process whose hard limit is `HARD`, as
/// `prlimit --pid` does.
fn set_nofile(pid: u32, n: u64) {
    let lim = nix::libc::rlimit {
        rlim_cur: n,
        rlim_max: HARD,
    };
    // SAFETY: prlimit reads `lim` and writes nothing (old limit pointer null).
    let rc = unsafe {
        nix::libc::prlimit(
            pid as nix::libc::pid_t,
            nix::libc::RLIMIT_NOFILE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// The lowest descriptor number `pid` has free: with the open-file limit set to it, the
/// process can open nothing more until it closes something.
fn lowest_free_fd(pid: u32) -> u64 {
    let mut used: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    used.sort_unstable();
    let mut n = 0;
    for u in used {
        if u != n {
            break;
        }
        n += 1;
    }
    n
}

/// The open-file limit the balancer starts with.
const HARD: u64 = 512;

/// Sum of every sample of `metrics` whose line starts with `prefix`.
fn metric(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The data plane holds its whole budget (500 clients for ~350 descriptors), then the
/// process runs out of descriptors altogether (its limit lowered under it to the lowest
/// free number, as when something takes more than its share): `/healthz` still answers
/// through the admin API's spare descriptors, and the existing flow keeps forwarding.
/// Before, the admin API's `accept` failed with EMFILE and `/healthz` timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn healthz_answers_and_a_flow_forwards_when_descriptors_run_out() {
    let pair = UdpPair::start();
    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin}", max_connections: 64 }}
listeners:
  - name: rtp
    protocol: udp
    listen: "127.0.0.1:{listen}"
    upstream: media
upstreams:
  media:
    primary: ["{primary}"]
    backup: ["{backup}"]
    health: {{ type: udp, send: ping, interval: 250ms, timeout: 250ms, fall: 2 }}
"#,
        admin = pair.admin,
        listen = pair.listen,
        primary = pair.primary_addr,
        backup = pair.backup_addr,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mediagate.yaml");
    std::fs::write(&path, yaml).unwrap();
    let b = Balancer::start_path_with(dir, path, pair.admin, Some(HARD), &[]);
    let pid = b.proc.child.id();
    let flows = Flows::start(pair.listen_addr(), 1, Duration::from_millis(20), 160)
        .await
        .expect("flow");
    wait_until_async(Duration::from_secs(10), "the flow answered", || {
        flows.snapshot().iter().all(|f| f.received > 0)
    })
    .await;
    // Many sessions: more clients than the data plane's budget.
    let clients: Vec<UdpSocket> = (0..500u32)
        .map(|i| {
            // Many sources (each within its own new-session rate).
            let ip = std::net::Ipv4Addr::from(0x7f02_0001 + i);
            let c = UdpSocket::bind((ip, 0)).unwrap();
            c.send_to(b"hello", pair.listen_addr()).unwrap();
            c
        })
        .collect();
    wait_until_async(Duration::from_secs(10), "the budget is used up", || {
        let m = b.metrics();
        metric(
            &m,
            "mediagate_sessions_rejected_total{listener=\"rtp\",reason=\"fd_budget\"}",
        ) > 0.0
    })
    .await;
    let st = b.status();
    eprintln!("fds with the budget used up: {}", st["fds"]);
    // Out of descriptors altogether: the limit comes down to the lowest free number
    // (again while the process closes something below it).
    let mut limit = lowest_free_fd(pid);
    set_nofile(pid, limit);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = lowest_free_fd(pid);
        if now < limit {
            limit = now;
            set_nofile(pid, limit);
        }
    }
    eprintln!("open-file limit lowered to {limit}; {} open", open_fds(pid));
    let start = flows.snapshot();
    let t = Instant::now();
    let mut answered = 0;
    let mut failed = Vec::new();
    while t.elapsed() < Duration::from_secs(3) {
        match http(b.admin, "GET", "/healthz", None) {
            Ok((200, _)) => answered += 1,
            other => failed.push(format!("{other:?}")),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let end = flows.finish(Duration::from_millis(300)).await;
    let lost = end[0].lost_between(start[0].sent, end[0].sent);
    let sent = end[0].sent - start[0].sent;
    eprintln!(
        "out of descriptors: /healthz answered {answered}, failed {}; the flow lost {lost} of {sent}",
        failed.len()
    );
    assert!(
        failed.is_empty() && answered >= 10,
        "/healthz answered throughout: {answered} answered, failed {failed:?}"
    );
    assert!(sent > 50, "the flow kept sending: {sent}");
    assert_eq!(lost, 0, "the existing flow kept forwarding");
    set_nofile(pid, HARD);
    drop(clients);
    let st = b.status();
    for s in upstream_of(&st, "media")["servers"].as_array().unwrap() {
        assert_eq!(s["health"], "up", "not the servers' fault: {s}");
    }
}
