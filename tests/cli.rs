//! The command line and admin API as a user meets them: `check`, `demo`, `status`,
//! `server`, the bearer token, and graceful shutdown.

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

const ENV: [(&str, &str); 4] = [
    ("TURN_SECRET", "example-secret"),
    ("PUBLIC_IP", "203.0.113.10"),
    ("MEDIAGATE_ADMIN_TOKEN", "example-token"),
    ("POD_IP", "10.244.1.7"),
];

#[test]
fn every_example_config_passes_check() {
    let mut n = 0;
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/config")).expect("config/")
    {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let out = std::process::Command::new(MEDIAGATE)
            .args(["check", "-c"])
            .arg(&path)
            .envs(ENV)
            .output()
            .expect("run check");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}{}",
            path.display(),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.trim(), "ok");
        n += 1;
    }
    assert!(n >= 2, "expected the example configs in config/");
}

#[test]
fn broken_config_names_file_line_and_key_and_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "listeners:\n  - { name: a, protocol: udp, listen: \"127.0.0.1:5004\", upstream: u }\nupstreams:\n  u:\n    primary: [\"127.0.0.1:6000\"]\n    health:\n      interval: 10 ms\n",
    )
    .expect("write");
    let p = path.to_string_lossy().into_owned();
    let (code, stdout, stderr) = run_cli(&["check", "-c", &p]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert_eq!(
        stderr.trim(),
        format!("{p}:7:17: upstreams.u.health.interval: invalid duration \"10 ms\"")
    );
    // `run` refuses it the same way, without binding anything.
    let (code, _, stderr2) = run_cli(&["run", "-c", &p]);
    assert_eq!(code, 2);
    assert_eq!(stderr2.trim(), stderr.trim());
    // A missing file is a configuration error too, in one line.
    let (code, _, stderr) = run_cli(&["check", "-c", "/nonexistent/mediagate.yaml"]);
    assert_eq!(code, 2);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn demo_shows_failover_and_failback_and_exits_0() {
    let out = std::process::Command::new(MEDIAGATE)
        .arg("demo")
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "primary killed",
        "event: failover",
        "reason icmp_unreachable",
        "event: failback",
        "reason probe_timeout",
        "datagrams lost: ",
    ] {
        assert!(
            stdout.contains(needle),
            "demo output lacks {needle:?}:\n{stdout}"
        );
    }
    // The kill costs a flow at most the datagram that was inside the dying worker (under
    // load, the worker may die holding one unanswered).
    let worst: u64 = stdout
        .split("at most ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no per-flow loss in the demo output:\n{stdout}"));
    assert!(
        worst <= 1,
        "a flow lost {worst} datagrams to the kill:\n{stdout}"
    );
}

fn simple(listen: u16, admin: u16, primary: SocketAddr, backup: SocketAddr, extra: &str) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin}"{extra} }}
listeners:
  - {{ name: rtp, protocol: udp, listen: "127.0.0.1:{listen}", upstream: media }}
upstreams:
  media:
    primary: ["{primary}"]
    backup: ["{backup}"]
    health: {{ type: udp, interval: 100ms, timeout: 100ms }}
shutdown: {{ drain_timeout: 2s }}
"#
    )
}

#[test]
fn status_and_server_commands_drive_a_running_balancer() {
    let w = UdpPair::start();
    let (pa, ba, a) = (w.primary_addr, w.backup_addr, w.admin);
    let b = Balancer::start(&simple(w.listen, a, pa, ba, ", token: secret-token"), a);
    let admin = format!("http://127.0.0.1:{a}");

    let (code, out, err) = run_cli(&["status", "--admin", &admin]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("UPSTREAM") && out.contains(&pa.to_string()),
        "{out}"
    );
    let line = out
        .lines()
        .find(|l| l.contains(&pa.to_string()))
        .expect("primary row");
    assert!(
        line.contains("primary") && line.contains("up") && line.trim_end().ends_with('*'),
        "{line}"
    );

    // --watch refreshes until stopped (into a pipe: one refresh after the other, no
    // screen codes).
    let mut watch = std::process::Command::new(MEDIAGATE)
        .args(["status", "--watch", "--admin", &admin])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("status --watch");
    let mut stdout = watch.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match std::io::Read::read(&mut stdout, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            if String::from_utf8_lossy(&seen).matches("mediagate ").count() >= 2 {
                break;
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let seen = reader.join().expect("reader");
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(
        seen.matches("mediagate ").count() >= 2 && !seen.contains('\x1b'),
        "two refreshes without screen codes expected: {seen:?}"
    );
    assert!(seen.contains(&pa.to_string()));

    // POST endpoints need the token.
    let (code, _) = http(
        b.admin,
        "POST",
        "/upstreams/media/servers/x/state",
        Some("{\"state\":\"maint\"}"),
    )
    .expect("post");
    assert_eq!(code, 401);
    let (code, _, err) = run_cli(&[
        "server",
        "maint",
        "media",
        &pa.to_string(),
        "--admin",
        &admin,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");

    // maint moves the active set (and sessions) to the backup at once.
    let out = std::process::Command::new(MEDIAGATE)
        .args([
            "server",
            "maint",
            "media",
            &pa.to_string(),
            "--admin",
            &admin,
        ])
        .env("MEDIAGATE_ADMIN_TOKEN", "secret-token")
        .output()
        .expect("server maint");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(b.active("media"), vec![ba.to_string()]);
    let st = b.status();
    assert_eq!(
        upstream_of(&st, "media")["servers"][0]["admin_state"],
        "maint"
    );
    assert_eq!(upstream_of(&st, "media")["events"][0]["reason"], "admin");

    // Unknown servers and states are clear errors.
    let (code, _, err) = run_cli(&["server", "maint", "media", "10.9.9.9:1", "--admin", &admin]);
    assert_eq!(code, 1);
    assert!(!err.contains("panicked"), "{err}");
    let (code, _, err) = run_cli(&[
        "server",
        "sleep",
        "media",
        &pa.to_string(),
        "--admin",
        &admin,
    ]);
    // A mistyped state is a usage error.
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("invalid value 'sleep'"), "{err}");

    // Metrics carry the spec names.
    let m = b.metrics();
    for name in [
        "mediagate_build_info",
        "mediagate_server_up{upstream=\"media\"",
        "mediagate_upstream_active{upstream=\"media\"",
        "mediagate_probes_total{",
        "mediagate_sessions{listener=\"rtp\"}",
    ] {
        assert!(m.contains(name), "metrics lack {name}");
    }
    // The admin state as a gauge per state: the server in maint, its backup enabled.
    for (server, state, value) in [
        (pa.to_string(), "maint", 1),
        (pa.to_string(), "enable", 0),
        (pa.to_string(), "drain", 0),
        (ba.to_string(), "enable", 1),
        (ba.to_string(), "maint", 0),
    ] {
        let line = format!(
            "mediagate_server_admin_state{{upstream=\"media\",server=\"{server}\",state=\"{state}\"}} {value}"
        );
        assert!(m.lines().any(|l| l == line), "metrics lack {line}:\n{m}");
    }
}

#[test]
fn sigterm_drains_udp_sessions_then_exits_0() {
    sigterm_drains(false);
}

/// The same with the kernel fast path (`offload: ebpf`, needs root and a build with
/// clang): the session keeps flowing in the kernel while draining.
#[test]
fn offloaded_sigterm_drains_udp_sessions_then_exits_0() {
    sigterm_drains(true);
}

fn sigterm_drains(offload: bool) {
    let w = UdpPair::start();
    let mut config = simple(w.listen, w.admin, w.primary_addr, w.backup_addr, "");
    if offload {
        config = config.replace("upstream: media }", "upstream: media, offload: ebpf }");
    }
    let mut b = Balancer::start(&config, w.admin);
    let listen = w.listen_addr();
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    client.send_to(b"12345678", listen).expect("send");
    client.recv_from(&mut buf).expect("first reply");
    if offload {
        // The second datagram teaches the fast path its way; from then on it forwards.
        let want = "mediagate_offload_sessions{listener=\"rtp\"} 1";
        wait_until(Duration::from_secs(5), "session offloaded", || {
            client.send_to(b"12345678", listen).expect("send");
            let _ = client.recv_from(&mut buf);
            b.metrics().lines().any(|l| l == want) && offloaded_to_server(&b) > 0
        });
    }
    let offloaded = offloaded_to_server(&b);

    b.proc.signal(Signal::SIGTERM);
    let t = Instant::now();
    wait_until(Duration::from_secs(2), "/readyz 503 while draining", || {
        matches!(http(b.admin, "GET", "/readyz", None), Ok((503, _)))
    });
    // The existing session still flows during the drain...
    client.send_to(b"12345678", listen).expect("send");
    assert!(
        client.recv_from(&mut buf).is_ok(),
        "existing session must keep flowing while draining"
    );
    if offload {
        wait_until(Duration::from_secs(1), "drained datagram offloaded", || {
            offloaded_to_server(&b) > offloaded
        });
    }
    // ...a new one is refused.
    let newcomer = UdpSocket::bind("127.0.0.1:0").expect("bind");
    newcomer
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    newcomer.send_to(b"12345678", listen).expect("send");
    assert!(
        newcomer.recv_from(&mut buf).is_err(),
        "new sessions are refused while draining"
    );
    // drain_timeout is 2s: the process exits 0 soon after.
    let code = b.proc.wait_exit(Duration::from_secs(5));
    assert_eq!(code, Some(0));
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "exited before the drain timeout"
    );
}

/// Datagrams the fast path forwarded to the servers of listener `rtp`.
fn offloaded_to_server(b: &Balancer) -> u64 {
    b.metrics()
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "mediagate_offload_packets_total{listener=\"rtp\",direction=\"to_server\"} ",
            )
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn every_client_command_takes_admin_and_token() {
    // Nothing listens on the admin address: every command parses its arguments, tries,
    // and fails with a runtime error (1), not a usage error (2).
    let admin = format!("http://127.0.0.1:{}", free_tcp_port());
    let commands: [&[&str]; 4] = [
        &["status"],
        &["server", "drain", "media", "127.0.0.1:6000"],
        &["ice", "--user", "alice"],
        &["failback", "media"],
    ];
    for cmd in commands {
        let mut args = cmd.to_vec();
        args.extend(["--admin", &admin, "--token", "t0ken"]);
        let (code, out, err) = run_cli(&args);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(
            err.contains("cannot reach the admin API"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    let cases: [&[&str]; 6] = [
        &["server", "drian", "media", "127.0.0.1:6000"],
        &["status", "--admin", "ftp://127.0.0.1:8086"],
        &["status", "--admin", "not a url"],
        &["ice", "--ttl", "soon"],
        &["failback"],
        &["statuss"],
    ];
    for args in cases {
        let (code, out, err) = run_cli(args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(!err.trim().is_empty(), "{args:?}: no message");
    }
}

#[test]
fn status_watch_survives_an_unreachable_balancer() {
    let w = UdpPair::start();
    let admin = format!("http://127.0.0.1:{}", w.admin);
    // Started before the balancer: the first fetches fail.
    let mut watch = std::process::Command::new(MEDIAGATE)
        .args(["status", "--watch", "--admin", &admin])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("status --watch");
    let mut stdout = watch.stdout.take().expect("stdout");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let text = || seen.lock().unwrap().clone();
    wait_until(Duration::from_secs(10), "two failed fetches shown", || {
        text().matches("cannot reach the admin API").count() >= 2
    });
    assert_eq!(watch.try_wait().expect("try_wait"), None, "--watch gave up");

    let _b = Balancer::start(
        &simple(w.listen, w.admin, w.primary_addr, w.backup_addr, ""),
        w.admin,
    );
    let primary = w.primary_addr.to_string();
    wait_until(
        Duration::from_secs(10),
        "the table once the balancer is up",
        || text().contains(&primary),
    );
    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn check_reports_the_errors_of_every_stage_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.yaml");
    // A type error (deserialization) and a semantic error (validation) in one file.
    std::fs::write(
        &path,
        "listeners:\n  - { name: a, protocol: udp, listen: \"127.0.0.1:5004\", upstream: nowhere }\nupstreams:\n  u:\n    primary: [\"127.0.0.1:6000\"]\n    health:\n      interval: 10 ms\n",
    )
    .expect("write");
    let p = path.to_string_lossy().into_owned();
    let (code, stdout, stderr) = run_cli(&["check", "-c", &p]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert_eq!(
        stderr.trim(),
        format!(
            "{p}:2:67: listeners[0].upstream: unknown upstream \"nowhere\" (defined: u)\n\
             {p}:7:17: upstreams.u.health.interval: invalid duration \"10 ms\""
        )
    );
}

#[test]
fn version_says_whether_the_kernel_fast_path_is_compiled_in() {
    let (code, out, err) = run_cli(&["--version"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(kernel fast path: "), "{out}");
    // The test suite installs clang before it builds (scripts/install-test-deps.sh), and
    // build.rs notices clang even when an earlier build ran without it.
    assert!(out.contains("kernel fast path: compiled in"), "{out}");
}
