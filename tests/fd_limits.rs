//! Descriptor and memory edges through the real binary (issue 11 item 2, issue 24 item 7):
//! the admin API keeps answering when the process has run out of descriptors (its spare
//! ones), probes failing with EMFILE mark no server down, a TURN configuration that cannot
//! fit the open-file limit is refused at start with what to change, `check` warns about a
//! configuration that may not fit, and memory comes back after a reload to 10,000 servers
//! and back.

mod common;

use common::metric_sum as metric;
use common::*;
use mediagate::flows::Flows;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

/// Sets the open-file limit of a running process, as `prlimit --pid` does (the hard
/// limit can only come down: tests run without CAP_SYS_RESOURCE).
fn set_nofile(pid: u32, soft: u64, hard: u64) {
    let lim = nix::libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
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

/// Opens up to `n` connections to `addr` that send the first byte of a request and
/// nothing more (slowloris), quickly. (The byte takes them past the admin listener's
/// `TCP_DEFER_ACCEPT`, so they hold the balancer's descriptors at once.)
fn idle_connections(addr: std::net::SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    use std::io::Write;
    (0..n)
        .filter_map(|_| {
            let mut s =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
            s.write_all(b"G").ok()?;
            Some(s)
        })
        .collect()
}

fn assert_no_server_down(b: &Balancer) {
    let st = b.status();
    let up = upstream_of(&st, "media");
    assert_eq!(up["failovers"], 0, "no failover: {up}");
    for s in up["servers"].as_array().unwrap() {
        assert_eq!(s["health"], "up", "server marked down: {s}");
    }
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
    set_nofile(pid, limit, HARD);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = lowest_free_fd(pid);
        if now < limit {
            limit = now;
            set_nofile(pid, limit, HARD);
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
    set_nofile(pid, HARD, HARD);
    drop(clients);
    assert_no_server_down(&b);
}

/// TURN with its default quotas (10,000 allocations, 4,096 TCP connections) under a
/// nofile of 4,096: before, the balancer started with a data-plane budget of 0 and only a
/// WARN said so; now it refuses to start and says what to change. With quotas that fit,
/// the same limit starts.
#[test]
fn turn_defaults_that_cannot_fit_4096_descriptors_refuse_to_start() {
    // Below the default relay range (49152-65535), which a listener may not overlap.
    let turn_port = (0..8000u16)
        .map(|i| 40_000 + (std::process::id() as u16 % 8000 + i) % 8000)
        .find(|&p| UdpSocket::bind(("127.0.0.1", p)).is_ok())
        .expect("a free UDP port below 48000");
    let admin = free_tcp_port();
    let yaml = |quota: &str| {
        format!(
            r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
turn:
  realm: mediagate
  public_address: 127.0.0.1
  listeners:
    - {{ protocol: udp, listen: "127.0.0.1:{turn_port}" }}
  auth: {{ type: ephemeral, secret: test-secret, ttl: 1h }}
  relay:
    address: 127.0.0.1
    peers: ["127.0.0.1/32"]
{quota}"#
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mediagate.yaml");
    std::fs::write(&path, yaml("")).unwrap();
    let mut child = std::process::Command::new("prlimit")
        .args(["--nofile=4096:4096", MEDIAGATE, "run", "-c"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("prlimit");
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mediagate kept running with a budget of 0 under nofile 4096");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    eprintln!("{stderr}");
    assert!(!status.success(), "refused to start: {status:?}");
    assert!(
        stderr.contains("open-file limit is 4096")
            && stderr.contains("turn.quota.max_allocations")
            && stderr.contains("turn.quota.max_tcp_connections")
            && stderr.contains("LimitNOFILE"),
        "the error says what to change: {stderr}"
    );
    // Quotas that fit the limit: it starts and answers.
    std::fs::write(
        &path,
        yaml("  quota: { max_allocations: 2000, max_tcp_connections: 500 }\n"),
    )
    .unwrap();
    let mut child = std::process::Command::new("prlimit")
        .args(["--nofile=4096:4096", MEDIAGATE, "run", "-c"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("prlimit");
    let admin_addr = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    wait_until(Duration::from_secs(15), "/readyz", || {
        matches!(http(admin_addr, "GET", "/readyz", None), Ok((200, _)))
    });
    let (code, body) = http(admin_addr, "GET", "/status", None).unwrap();
    assert_eq!(code, 200);
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    eprintln!("fds with quotas that fit: {}", st["fds"]);
    assert_eq!(st["fds"]["limit"], 4096);
    assert!(
        st["fds"]["budget"].as_u64().unwrap() > 1000,
        "{}",
        st["fds"]
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Probes that fail with EMFILE are the balancer's problem, not the servers': here the
/// admin API may hold more connections (1,000) than the open-file limit (lowered to 256
/// under the running process) holds, and 400 idle admin connections take every
/// descriptor for two seconds. (A configuration that reserves more than the limit at
/// start is refused: the limit comes down afterwards.) The
/// probes fail locally the whole time; they are counted as `local_error`, and neither
/// server is marked down (before the fix both were, and the upstream failed over to
/// nothing).
#[test]
fn probes_failing_with_emfile_do_not_mark_servers_down() {
    let pair = UdpPair::start();
    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin}", max_connections: 1000, header_read_timeout: 30s }}
listeners:
  - {{ name: rtp, protocol: udp, listen: "127.0.0.1:{listen}", upstream: media }}
upstreams:
  media:
    primary: ["{primary}"]
    backup: ["{backup}"]
    health: {{ type: udp, send: ping, interval: 100ms, timeout: 100ms }}
"#,
        admin = pair.admin,
        listen = pair.listen,
        primary = pair.primary_addr,
        backup = pair.backup_addr,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mediagate.yaml");
    std::fs::write(&path, yaml).unwrap();
    let b = Balancer::start_path_with(dir, path, pair.admin, Some(2048), &[]);
    let pid = b.proc.child.id();
    set_nofile(pid, 256, 2048);
    let conns = idle_connections(b.admin, 400);
    let exhausted = open_fds(pid);
    eprintln!("{} idle admin connections: {exhausted:?}", conns.len());
    assert!(exhausted >= 250, "every descriptor taken: {exhausted:?}");
    std::thread::sleep(Duration::from_secs(2));
    drop(conns);
    wait_until(Duration::from_secs(10), "/healthz answers again", || {
        matches!(http(b.admin, "GET", "/healthz", None), Ok((200, _)))
    });
    let m = b.metrics();
    let local = metric(&m, "mediagate_probes_total{upstream=\"media\",server=\"");
    let local_errors: f64 = m
        .lines()
        .filter(|l| l.starts_with("mediagate_probes_total") && l.contains("result=\"local_error\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    eprintln!("probes: {local} in all, {local_errors} local errors");
    assert!(
        local_errors >= 5.0,
        "probes hit EMFILE and were counted as local errors"
    );
    assert_no_server_down(&b);
}

/// `mediagate check` warns (exit 0) when the configuration may use more descriptors than
/// the open-file limit `run` would get.
#[test]
fn check_warns_when_the_config_does_not_fit_the_open_file_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        "listeners:\n  - { name: rtp, protocol: udp, listen: 127.0.0.1:5004, upstream: u }\nupstreams:\n  u:\n    primary: [127.0.0.1]\n",
    )
    .unwrap();
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(MEDIAGATE);
    cmd.args(["check", "-c"]).arg(&path);
    // SAFETY: setrlimit only, in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 1024, 1024)
                .map_err(std::io::Error::from)
        });
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    assert!(
        stderr.contains("warning:") && stderr.contains("open-file limit is 1024"),
        "{stderr}"
    );
}

/// Resident memory after a reload to 10,000 servers and back comes back near where it
/// started (issue 24, item 7: it stayed at 127 MB from 13 MB): the balancer gives the
/// allocator's free memory back to the system after a reload.
#[test]
fn memory_comes_back_after_a_reload_to_10000_servers_and_back() {
    let w = UdpPair::start();
    let base = |servers: &str| {
        format!(
            "admin: {{ listen: \"127.0.0.1:{admin}\" }}\n\
             listeners:\n  - {{ name: rtp, protocol: udp, listen: \"127.0.0.1:{listen}\", upstream: media, session: {{ max_sessions: 100 }} }}\n\
             upstreams:\n  media:\n    primary: [{servers}]\n    \
             health: {{ type: udp, interval: 1s, timeout: 500ms }}\n",
            admin = w.admin,
            listen = w.listen,
        )
    };
    let one = format!("\"{}\"", w.primary_addr);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mediagate.yaml");
    std::fs::write(&path, base(&one)).unwrap();
    let b = Balancer::start_path_with(dir, path.clone(), w.admin, None, &[]);
    let pid = b.proc.child.id();
    std::thread::sleep(Duration::from_secs(1));
    let baseline = rss_kib(pid);
    // 10,000 servers on loopback addresses where nothing listens.
    let many: Vec<String> = (0..10_000u32)
        .map(|i| format!("\"127.3.{}.{}:5004\"", i / 250, i % 250 + 1))
        .collect();
    std::fs::write(&path, base(&many.join(", "))).unwrap();
    let (code, body) = http(b.admin, "POST", "/reload", None).unwrap();
    assert_eq!(code, 200, "{body}");
    wait_until(Duration::from_secs(20), "10,000 servers in /status", || {
        upstream_of(&b.status(), "media")["servers"]
            .as_array()
            .is_some_and(|s| s.len() == 10_000)
    });
    std::thread::sleep(Duration::from_secs(2));
    let peak = rss_kib(pid);
    std::fs::write(&path, base(&one)).unwrap();
    let (code, body) = http(b.admin, "POST", "/reload", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let mut after = rss_kib(pid);
    let limit = 2 * baseline + 16 * 1024;
    let t = Instant::now();
    while after > limit && t.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(250));
        after = rss_kib(pid);
    }
    eprintln!(
        "RSS: {baseline} KiB at start, {peak} KiB with 10,000 servers, {after} KiB after the \
         reload back ({:?} after it); {} fds open",
        t.elapsed(),
        open_fds(pid)
    );
    assert!(
        after <= limit,
        "memory came back: {after} KiB after, {baseline} KiB at start, {peak} KiB at the peak"
    );
    // The one server serves again once the reload's probe round has seen it.
    wait_until(
        Duration::from_secs(10),
        "the one server active again",
        || b.active("media") == vec![w.primary_addr.to_string()],
    );
    let stale = b.metrics().lines().filter(|l| l.contains("127.3.")).count();
    assert_eq!(stale, 0, "no metric series of removed servers is left");
}
