//! What an operator reads from a running balancer: plain log lines in a pipe, a log level
//! that follows `POST /log-level` and a reload, a `/metrics` that `promtool` accepts, and
//! `process_*` metrics that match what the kernel says about the process.

mod common;

use common::*;
use std::io::Read;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A UDP listener in front of two echo workers plus a TURN listener (so the TURN
/// families are in the exposition too), at `level`.
fn config(w: &UdpPair, turn_port: u16, level: &str) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin}", token: obs-token }}
log: {{ level: {level} }}
listeners:
  - {{ name: rtp, protocol: udp, listen: "127.0.0.1:{listen}", upstream: media }}
upstreams:
  media:
    primary: ["{primary}"]
    backup: ["{backup}"]
    health: {{ type: udp, interval: 200ms, timeout: 200ms }}
turn:
  realm: obs
  public_address: 127.0.0.1
  listeners:
    - {{ protocol: udp, listen: "127.0.0.1:{turn_port}" }}
  auth:
    type: static
    users: [{{ username: u, password: p }}]
  relay:
    address: 127.0.0.1
    port_range: 63000-63049
    peers: [127.0.0.1/32]
"#,
        admin = w.admin,
        listen = w.listen,
        primary = w.primary_addr,
        backup = w.backup_addr,
    )
}

/// `mediagate run` with stderr into a pipe (as under kubectl or journald), without
/// `RUST_LOG`, so `log.level` decides; returns the process and everything it logged.
fn start_piped(dir: &tempfile::TempDir, yaml: &str, admin: u16) -> (Proc, Arc<Mutex<String>>) {
    let path = dir.path().join("mediagate.yaml");
    std::fs::write(&path, yaml).expect("write config");
    let mut child = Command::new(MEDIAGATE)
        .args(["run", "-c"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mediagate");
    let mut stderr = child.stderr.take().expect("stderr");
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let mut proc = Proc {
        child,
        name: "mediagate".into(),
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], admin));
    // Not `wait_until`: a failed start must say why (its log), not only that it timed out.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !matches!(http(addr, "GET", "/readyz", None), Ok((200, _))) {
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!(
                "mediagate exited ({status}) before ready; its log:\n{}",
                log.lock().unwrap()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mediagate not ready after 15 s; its log:\n{}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (proc, log)
}

fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

const MALFORMED: &str = "mediagate_turn_dropped_packets_total{reason=\"malformed\"}";
const DEBUG_LINE: &str = "TURN: malformed packet dropped";

#[test]
fn logs_in_a_pipe_are_plain_and_the_level_follows_the_api_and_reloads() {
    let w = UdpPair::start();
    let turn_port = free_udp_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_mg, log) = start_piped(&dir, &config(&w, turn_port, "info"), w.admin);
    let admin = SocketAddr::from(([127, 0, 0, 1], w.admin));
    let turn = SocketAddr::from(([127, 0, 0, 1], turn_port));
    let junk = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let auth = [("Authorization", "Bearer obs-token")];
    let debug_lines = || log.lock().unwrap().matches(DEBUG_LINE).count();
    let malformed = || metric(&http(admin, "GET", "/metrics", None).unwrap().1, MALFORMED);

    wait_until(Duration::from_secs(5), "the ready line", || {
        log.lock().unwrap().contains("mediagate ready")
    });
    let text = log.lock().unwrap().clone();
    assert!(
        !text.contains("\x1b["),
        "ANSI codes in piped logs: {text:?}"
    );

    // At info, a malformed TURN datagram is counted but not logged.
    junk.send_to(b"not stun", turn).expect("send");
    wait_until(Duration::from_secs(5), "the malformed drop counted", || {
        malformed() == Some(1.0)
    });
    assert_eq!(debug_lines(), 0, "{}", log.lock().unwrap());

    // POST /log-level: token, then a checked directive.
    let post = |body: &str, headers: &[(&str, &str)]| {
        http_with(admin, "POST", "/log-level", Some(body), headers).expect("POST /log-level")
    };
    assert_eq!(post(r#"{"level":"debug"}"#, &[]).0, 401);
    let (code, body) = post(r#"{"level":"debgu"}"#, &auth);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("invalid log level"), "{body}");
    assert_eq!(post("level=debug", &auth).0, 400);
    let (code, body) = post(r#"{"level":"info,mediagate=debug"}"#, &auth);
    assert_eq!(
        (code, body.as_str()),
        (200, r#"{"level":"info,mediagate=debug"}"#)
    );
    wait_until(Duration::from_secs(20), "a debug line after POST", || {
        junk.send_to(b"not stun", turn).expect("send");
        std::thread::sleep(Duration::from_millis(100));
        debug_lines() > 0
    });

    // Back to info through the API, then a reload that changes log.level to debug.
    assert_eq!(post(r#"{"level":"info"}"#, &auth).0, 200);
    let seen = debug_lines();
    std::fs::write(
        dir.path().join("mediagate.yaml"),
        config(&w, turn_port, "debug"),
    )
    .expect("rewrite config");
    let (code, body) = http_with(admin, "POST", "/reload", None, &auth).expect("reload");
    assert_eq!(code, 200, "{body}");
    let (_, level) = http(admin, "GET", "/log-level", None).expect("GET /log-level");
    assert_eq!(level, r#"{"level":"debug"}"#);
    wait_until(
        Duration::from_secs(20),
        "a debug line after the reload",
        || {
            junk.send_to(b"not stun", turn).expect("send");
            std::thread::sleep(Duration::from_millis(100));
            debug_lines() > seen
        },
    );
    let text = log.lock().unwrap().clone();
    assert!(
        !text.contains("\x1b["),
        "ANSI codes in piped logs: {text:?}"
    );
}

/// The exposition as Prometheus scrapes it with `Accept: text/plain`.
fn prometheus_text(admin: SocketAddr) -> String {
    let (code, body) = http_with(
        admin,
        "GET",
        "/metrics",
        None,
        &[("Accept", "text/plain;version=0.0.4")],
    )
    .expect("GET /metrics");
    assert_eq!(code, 200);
    body
}

#[test]
fn promtool_accepts_the_prometheus_text_and_openmetrics_stays_available() {
    let w = UdpPair::start();
    let turn_port = free_udp_port();
    let b = Balancer::start(&config(&w, turn_port, "info"), w.admin);
    // Traffic, so that the labelled families have samples.
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    client.send_to(b"12345678", w.listen_addr()).expect("send");
    let mut buf = [0u8; 64];
    client
        .recv_from(&mut buf)
        .expect("echo through the balancer");

    let text = prometheus_text(b.admin);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian `prometheus`; run scripts/install-test-deps.sh)");
    std::io::Write::write_all(&mut promtool.stdin.take().expect("stdin"), text.as_bytes())
        .expect("feed promtool");
    let out = promtool.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics: {:?}\n{report}\n--- exposition:\n{text}",
        out.status
    );
    for line in [
        "# TYPE mediagate_packets_total counter",
        "# TYPE mediagate_build_info gauge",
        "# TYPE mediagate_turn_dropped_packets_total counter",
        "# TYPE mediagate_failover_detection_seconds histogram",
        "# TYPE process_cpu_seconds_total counter",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(!text.contains("# EOF"));

    let (code, om) = http_with(
        b.admin,
        "GET",
        "/metrics",
        None,
        &[("Accept", "application/openmetrics-text;version=1.0.0")],
    )
    .expect("GET /metrics");
    assert_eq!(code, 200);
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE mediagate_build info"), "{om}");
}

#[test]
fn process_metrics_match_what_the_kernel_reports() {
    let w = UdpPair::start();
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let b = Balancer::start(&config(&w, free_udp_port(), "info"), w.admin);
    let pid = b.proc.child.id();
    let text = prometheus_text(b.admin);
    let get = |name: &str| metric(&text, name).unwrap_or_else(|| panic!("no {name} in\n{text}"));

    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count() as f64;
    let open = get("process_open_fds");
    assert!(
        (open - fds).abs() <= 10.0,
        "open fds {open}, /proc says {fds}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let soft: f64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .expect("soft NOFILE");
    assert_eq!(get("process_max_fds"), soft);
    assert!(open > 3.0 && open < soft);

    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("status field")
    };
    let rss = get("process_resident_memory_bytes");
    let rss_now = kib("VmRSS:") * 1024.0;
    assert!(
        rss > 1e6 && rss < 1e9 && (rss - rss_now).abs() < rss_now * 0.5,
        "RSS {rss}, /proc says {rss_now}"
    );
    assert!(get("process_virtual_memory_bytes") >= rss);
    assert!(get("process_threads") >= 2.0);

    let start = get("process_start_time_seconds");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        start >= before - 2.0 && start <= now + 1.0,
        "start time {start} outside [{before}, {now}]"
    );
    let cpu = get("process_cpu_seconds_total");
    assert!(cpu > 0.0 && cpu < 600.0, "cpu {cpu}");
    wait_until(Duration::from_secs(10), "CPU seconds growing", || {
        metric(&prometheus_text(b.admin), "process_cpu_seconds_total").unwrap_or(0.0) > cpu
    });
}
