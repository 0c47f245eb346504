//! A reload is a transaction (issue 11): a reload that fails while binding (a port taken
//! by another process, the open-file limit running out in a large port range) changes
//! nothing that serves, and a later good reload applies; reloading to an upstream of
//! 10,000 servers and back answers promptly, after which SIGHUP and file edits still
//! reload, and SIGTERM stops the process even in the middle of a reload. `/healthz` is
//! polled throughout every test and must always answer.

mod common;

use common::*;
use mediagate::flows::Flows;
use nix::sys::signal::Signal;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

fn post_reload(b: &Balancer) -> (u16, String) {
    http(b.admin, "POST", "/reload", None).expect("POST /reload")
}

/// (name, listen) of every listener `/status` reports.
fn listeners(b: &Balancer) -> Vec<(String, String)> {
    b.status()["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .map(|l| {
            (
                l["name"].as_str().unwrap_or("").to_string(),
                l["listen"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Addresses of an upstream's servers in `/status`.
fn servers(b: &Balancer, upstream: &str) -> Vec<String> {
    upstream_of(&b.status(), upstream)["servers"]
        .as_array()
        .map(|s| {
            s.iter()
                .map(|x| x["address"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn reloads(b: &Balancer, result: &str) -> u64 {
    let needle = format!("mediagate_config_reloads_total{{result=\"{result}\"}} ");
    b.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(needle.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Datagrams of `flows` lost since `before` (the last few in flight are not counted).
fn lost_since(before: &[mediagate::flows::FlowStats], flows: &Flows) -> u64 {
    let after = flows.snapshot();
    before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.lost_between(b.sent, a.sent.saturating_sub(5)))
        .sum()
}

/// A new client (one flow) is answered through `target`.
async fn new_client_served(target: SocketAddr, what: &str) {
    let f = Flows::start(target, 1, Duration::from_millis(20), 64)
        .await
        .expect("flow");
    wait_until_async(Duration::from_secs(5), what, || {
        f.snapshot()[0].received >= 3
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_into_a_taken_port_changes_nothing() {
    let w = UdpPair::start();
    let extra = free_udp_port();
    let config = |rtp: u16, extra_listener: bool, backups: &str| {
        let extra = if extra_listener {
            format!(
                "  - {{ name: extra, protocol: udp, listen: \"127.0.0.1:{extra}\", upstream: media }}\n"
            )
        } else {
            String::new()
        };
        format!(
            r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - {{ name: rtp, protocol: udp, listen: "127.0.0.1:{rtp}", upstream: media }}
{extra}upstreams:
  media:
    primary: ["{primary}"]
    backup: [{backups}]
    health: {{ type: udp, interval: 200ms, timeout: 200ms }}
"#,
            admin = w.admin,
            primary = w.primary_addr,
        )
    };
    let original = config(w.listen, false, &format!("\"{}\"", w.backup_addr));
    let b = Balancer::start(&original, w.admin);
    let target = w.listen_addr();
    let flows = Flows::start(target, 5, Duration::from_millis(20), 64)
        .await
        .expect("flows");
    wait_until_async(Duration::from_secs(10), "flows answered", || {
        flows.snapshot().iter().all(|f| f.received > 5)
    })
    .await;
    let health = HealthWatch::start(b.admin);
    let before = flows.snapshot();
    let listeners_before = listeners(&b);
    let servers_before = servers(&b, "media");

    // Another process holds the port rtp is to move to. The same edit adds a listener
    // and drops the backup: all of it must stay unapplied.
    let taken = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    std::fs::write(&b.config, config(taken_port, true, "")).expect("write");
    let (code, body) = post_reload(&b);
    assert_eq!(code, 422, "{body}");
    assert!(body.contains(&taken_port.to_string()), "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(listeners(&b), listeners_before, "/status lists what serves");
    assert_eq!(
        b.status()["listeners"][0]["sessions"],
        5,
        "rtp keeps its sessions"
    );
    assert_eq!(servers(&b, "media"), servers_before, "upstream unchanged");
    assert!(
        UdpSocket::bind(("127.0.0.1", extra)).is_ok(),
        "the extra listener's port was released"
    );
    let lost = lost_since(&before, &flows);
    eprintln!("failed reload (port taken): {lost} datagrams lost");
    assert_eq!(lost, 0, "the existing flows keep flowing");
    new_client_served(target, "a new client after the failed reload").await;
    let st = b.status();
    assert!(
        st["config"]["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains(&taken_port.to_string())),
        "{st}"
    );

    // The original file again: ok, and everything still serves.
    std::fs::write(&b.config, &original).expect("write");
    let (code, body) = post_reload(&b);
    assert_eq!(code, 200, "{body}");
    let before = flows.snapshot();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(lost_since(&before, &flows), 0);
    new_client_served(target, "a new client after the good reload").await;
    assert_eq!(listeners(&b), listeners_before);

    // And the move itself works once the port is free: the port is bound before rtp's
    // old one is given up, and /status follows.
    drop(taken);
    std::fs::write(&b.config, config(taken_port, false, "")).expect("write");
    let (code, body) = post_reload(&b);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        listeners(&b),
        vec![("rtp".to_string(), format!("127.0.0.1:{taken_port}"))]
    );
    new_client_served(
        SocketAddr::from(([127, 0, 0, 1], taken_port)),
        "served on the new port",
    )
    .await;
    health.finish().assert_healthy("taken port");
}

/// Runs `mediagate run -c config` with RLIMIT_NOFILE set to `nofile` (soft and hard, so
/// the process cannot raise it).
fn start_with_nofile(b_dir: tempfile::TempDir, yaml: &str, admin: u16, nofile: u64) -> Balancer {
    let config = b_dir.path().join("mediagate.yaml");
    std::fs::write(&config, yaml).expect("write config");
    Balancer::start_path_with(
        b_dir,
        config,
        admin,
        Some(nofile),
        &[("MEDIAGATE_UDP_WORKERS", "2")],
    )
}

/// `count` consecutive free UDP ports on 127.0.0.1 (checked by binding each once).
fn free_udp_range(count: u16) -> u16 {
    'next: for attempt in 0..50u16 {
        let first = 21_000 + attempt * 701 % 30_000;
        for p in first..first + count {
            if UdpSocket::bind(("127.0.0.1", p)).is_err() {
                continue 'next;
            }
        }
        return first;
    }
    panic!("no free range of {count} UDP ports");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_that_runs_out_of_fds_changes_nothing() {
    let w = UdpPair::start();
    let config = |idle: &str, range: Option<(u16, u16)>| {
        let range = range
            .map(|(first, last)| {
                format!(
                    "  - {{ name: wide, protocol: udp, listen: \"127.0.0.1:{first}-{last}\", upstream: wide }}\n"
                )
            })
            .unwrap_or_default();
        // The range forwards each port to the same port: a port-less server.
        let wide = if range.is_empty() {
            ""
        } else {
            "  wide:\n    primary: [\"127.0.0.1\"]\n    health: { type: none }\n"
        };
        format!(
            r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - name: rtp
    protocol: udp
    listen: "127.0.0.1:{rtp}"
    upstream: media
    session: {{ idle_timeout: {idle}, max_sessions: 100 }}
{range}upstreams:
  media:
    primary: ["{primary}"]
    backup: ["{backup}"]
    health: {{ type: udp, interval: 200ms, timeout: 200ms }}
{wide}"#,
            admin = w.admin,
            rtp = w.listen,
            primary = w.primary_addr,
            backup = w.backup_addr,
        )
    };
    const NOFILE: u64 = 256;
    let original = config("60s", None);
    let b = start_with_nofile(
        tempfile::tempdir().expect("tempdir"),
        &original,
        w.admin,
        NOFILE,
    );
    let target = w.listen_addr();
    let flows = Flows::start(target, 5, Duration::from_millis(20), 64)
        .await
        .expect("flows");
    wait_until_async(Duration::from_secs(10), "flows answered", || {
        flows.snapshot().iter().all(|f| f.received > 5)
    })
    .await;
    let fds_before = open_fds(b.proc.pid());
    let health = HealthWatch::start(b.admin);
    let before = flows.snapshot();
    let listeners_before = listeners(&b);

    // rtp changes (idle_timeout: a new listener on rtp's sockets) and a listener of 300
    // ports (600 sockets with 2 workers) needs more descriptors than the limit leaves.
    let first = free_udp_range(300);
    std::fs::write(&b.config, config("30s", Some((first, first + 299)))).expect("write");
    let (code, body) = post_reload(&b);
    eprintln!(
        "reload into {first}-{} with {fds_before} of {NOFILE} fds open: {code} {body}",
        first + 299
    );
    assert_eq!(code, 422, "{body}");
    // EMFILE while binding; a file-descriptor budget that refuses the listener before it
    // binds anything is the same outcome.
    let lower = body.to_lowercase();
    assert!(
        lower.contains("too many open files")
            || lower.contains("open-file")
            || lower.contains("descriptor"),
        "{body}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(listeners(&b), listeners_before, "/status lists what serves");
    let st = b.status();
    assert_eq!(
        st["listeners"][0]["sessions"], 5,
        "the running rtp listener keeps its sessions: {st}"
    );
    let lost = lost_since(&before, &flows);
    eprintln!("failed reload (fds): {lost} datagrams lost");
    assert_eq!(lost, 0, "the existing flows keep flowing");
    new_client_served(target, "a new client after the failed reload").await;
    let fds_after = open_fds(b.proc.pid());
    eprintln!("open fds: {fds_before} before, {fds_after} after the failed reload");
    assert!(
        fds_after <= fds_before + 4,
        "the failed reload released its descriptors ({fds_before} -> {fds_after})"
    );

    // The original file again: ok; the changed rtp alone fits and applies too.
    std::fs::write(&b.config, &original).expect("write");
    let (code, body) = post_reload(&b);
    assert_eq!(code, 200, "{body}");
    std::fs::write(&b.config, config("30s", None)).expect("write");
    let (code, body) = post_reload(&b);
    assert_eq!(code, 200, "{body}");
    new_client_served(target, "a new client after the good reloads").await;
    assert_eq!(listeners(&b), listeners_before);
    health.finish().assert_healthy("fd exhaustion");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_to_ten_thousand_servers_and_back_stays_responsive() {
    let w = UdpPair::start();
    // 10,000 backups on 127.0.x.y: nothing listens there, so every UDP probe fails at
    // once (port unreachable), which is the probe-result flood the controller must take.
    let many: Vec<String> = (0..10_000)
        .map(|i| format!("\"127.0.{}.{}:9\"", 100 + i / 250, 1 + i % 250))
        .collect();
    let config = |backups: &str, failback: &str| {
        format!(
            r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
shutdown: {{ drain_timeout: 1s }}
listeners:
  - {{ name: rtp, protocol: udp, listen: "127.0.0.1:{rtp}", upstream: media }}
upstreams:
  media:
    primary: ["{primary}"]
    backup: [{backups}]
    failback: {failback}
    health: {{ type: udp, interval: 1s, timeout: 500ms }}
"#,
            admin = w.admin,
            rtp = w.listen,
            primary = w.primary_addr,
        )
    };
    let small = config(&format!("\"{}\"", w.backup_addr), "new-sessions");
    let big = config(&many.join(", "), "new-sessions");
    let b = Balancer::start(&small, w.admin);
    let target = w.listen_addr();
    let flows = Flows::start(target, 5, Duration::from_millis(20), 64)
        .await
        .expect("flows");
    wait_until_async(Duration::from_secs(10), "flows answered", || {
        flows.snapshot().iter().all(|f| f.received > 5)
    })
    .await;
    let health = HealthWatch::start(b.admin);
    let before = flows.snapshot();

    let timed_reload = |what: &str| {
        let t = Instant::now();
        let (code, body) = post_reload(&b);
        let took = t.elapsed();
        eprintln!("{what}: POST /reload answered {code} in {took:?}");
        assert_eq!(code, 200, "{what}: {body}");
        assert!(took < Duration::from_secs(10), "{what} took {took:?}");
    };
    std::fs::write(&b.config, &big).expect("write");
    timed_reload("to 10,000 servers");
    wait_until_async(Duration::from_secs(10), "10,001 servers listed", || {
        servers(&b, "media").len() == 10_001
    })
    .await;
    // Let the probe results of 10,000 servers pour in for a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    std::fs::write(&b.config, &small).expect("write");
    timed_reload("back to 2 servers");
    assert_eq!(
        servers(&b, "media"),
        vec![w.primary_addr.to_string(), w.backup_addr.to_string()]
    );
    let m = b.metrics();
    let probe_series = m
        .lines()
        .filter(|l| l.starts_with("mediagate_probes_total{"))
        .count();
    // Two servers × four results (ok, failed, timeout, local_error).
    assert!(
        probe_series <= 8,
        "probe series of removed servers are gone: {probe_series}"
    );

    // SIGHUP (file unchanged, so the watcher has nothing to do) still reloads...
    let ok = reloads(&b, "ok");
    b.proc.signal(Signal::SIGHUP);
    wait_until_async(Duration::from_secs(5), "SIGHUP reload", || {
        reloads(&b, "ok") > ok
    })
    .await;
    // ...and so does a file edit on its own.
    let ok = reloads(&b, "ok");
    std::fs::write(&b.config, config(&format!("\"{}\"", w.backup_addr), "all")).expect("write");
    wait_until_async(Duration::from_secs(5), "file-change reload", || {
        reloads(&b, "ok") > ok && b.status()["upstreams"][0]["failback"] == "all"
    })
    .await;
    let lost = lost_since(&before, &flows);
    eprintln!("10k reloads: {lost} datagrams lost by the live flows");
    assert_eq!(lost, 0);
    health.finish().assert_healthy("10k servers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_reload_stops_within_the_drain_timeout() {
    let w = UdpPair::start();
    // A server that never answers: a new upstream's first probe round waits for its
    // whole probe timeout (8 s), so the reload below is in progress for that long.
    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let silent = silent.local_addr().expect("addr");
    let listen2 = free_udp_port();
    let config = |slow: bool| {
        let slow = if slow {
            format!(
                r#"  - {{ name: slow, protocol: udp, listen: "127.0.0.1:{listen2}", upstream: slow }}
"#
            )
        } else {
            String::new()
        };
        let slow_upstream = if !slow.is_empty() {
            format!(
                r#"  slow:
    primary: ["{silent}"]
    health: {{ type: udp, interval: 9s, timeout: 8s }}
"#
            )
        } else {
            String::new()
        };
        format!(
            r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
shutdown: {{ drain_timeout: 1s }}
listeners:
  - {{ name: rtp, protocol: udp, listen: "127.0.0.1:{rtp}", upstream: media }}
{slow}upstreams:
  media:
    primary: ["{primary}"]
    health: {{ type: udp, interval: 200ms, timeout: 200ms }}
{slow_upstream}"#,
            admin = w.admin,
            rtp = w.listen,
            primary = w.primary_addr,
        )
    };
    let mut b = Balancer::start(&config(false), w.admin);
    let flows = Flows::start(w.listen_addr(), 2, Duration::from_millis(20), 64)
        .await
        .expect("flows");
    wait_until_async(Duration::from_secs(10), "flows answered", || {
        flows.snapshot().iter().all(|f| f.received > 5)
    })
    .await;
    let health = HealthWatch::start(b.admin);
    // SIGHUP starts the reload (the signal loop itself ran reloads before the fix).
    let ok = reloads(&b, "ok");
    std::fs::write(&b.config, config(true)).expect("write");
    b.proc.signal(Signal::SIGHUP);
    // The reload is waiting for the slow upstream's first probe.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(reloads(&b, "ok"), ok, "the reload is still in progress");
    assert_eq!(listeners(&b).len(), 1, "nothing of it is visible yet");
    health.finish().assert_healthy("before SIGTERM");
    let t = Instant::now();
    b.proc.signal(Signal::SIGTERM);
    let code = b.proc.wait_exit(Duration::from_secs(6));
    let took = t.elapsed();
    eprintln!("SIGTERM during a reload: exit {code:?} after {took:?}");
    assert_eq!(code, Some(0), "mediagate exits cleanly");
    assert!(
        took < Duration::from_secs(4),
        "stopped within the 1 s drain timeout (plus slack), not after the reload: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_listener_keeps_its_sockets() {
    let w = UdpPair::start();
    let tcp_worker_addr = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let _tcp_worker = worker("tcp-echo", "tcp", tcp_worker_addr, None);
    let tcp_listen = free_tcp_port();
    // Both listeners change on every edit: rtp its idle timeout, sig its upstream.
    let config = |idle: &str| {
        let sig_upstream = if idle == "45s" {
            "signalling2"
        } else {
            "signalling"
        };
        format!(
            r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - name: rtp
    protocol: udp
    listen: "127.0.0.1:{rtp}"
    upstream: media
    session: {{ idle_timeout: {idle} }}
  - {{ name: sig, protocol: tcp, listen: "127.0.0.1:{tcp_listen}", upstream: {sig_upstream} }}
upstreams:
  media:
    primary: ["{primary}"]
    health: {{ type: udp, interval: 200ms, timeout: 200ms }}
  signalling:
    primary: ["{tcp_worker_addr}"]
    health: {{ type: tcp, interval: 200ms, timeout: 200ms }}
  signalling2:
    primary: ["{tcp_worker_addr}"]
    health: {{ type: tcp, interval: 200ms, timeout: 200ms }}
"#,
            admin = w.admin,
            rtp = w.listen,
            primary = w.primary_addr,
        )
    };
    let b = Balancer::start(&config("60s"), w.admin);
    let target = w.listen_addr();
    let flows = Flows::start(target, 5, Duration::from_millis(20), 64)
        .await
        .expect("flows");
    wait_until_async(Duration::from_secs(10), "flows answered", || {
        flows.snapshot().iter().all(|f| f.received > 5)
    })
    .await;
    let health = HealthWatch::start(b.admin);
    let before = flows.snapshot();
    for (i, idle) in ["30s", "45s", "60s"].iter().enumerate() {
        // The sockets never close. A datagram the old listener forwarded just before it
        // stopped may lose its reply (its session ends with it).
        std::fs::write(&b.config, config(idle)).expect("write");
        let (code, body) = post_reload(&b);
        assert_eq!(code, 200, "edit {i}: {body}");
        assert_eq!(
            listeners(&b),
            vec![
                ("rtp".to_string(), target.to_string()),
                ("sig".to_string(), format!("127.0.0.1:{tcp_listen}"))
            ]
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A TCP client connects and is echoed through the rebuilt TCP listener.
        let mut s = std::net::TcpStream::connect(("127.0.0.1", tcp_listen)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        std::io::Write::write_all(&mut s, b"ping\n").expect("write");
        let mut buf = [0u8; 64];
        let n = std::io::Read::read(&mut s, &mut buf).expect("echo");
        assert!(n > 0, "edit {i}: echoed");
    }
    let lost = lost_since(&before, &flows);
    let after = flows.snapshot();
    let gap = after.iter().map(|f| f.max_gap).max().unwrap_or_default();
    eprintln!(
        "3 reloads of a changed UDP listener under 5 flows: {lost} datagrams lost, longest gap {gap:?}"
    );
    assert!(
        lost <= 3 * 5,
        "at most one reply per flow and reload: {lost}"
    );
    assert!(
        after.iter().all(|f| f.received > before[0].received + 20),
        "every flow kept flowing"
    );
    health.finish().assert_healthy("changed listener");
}
