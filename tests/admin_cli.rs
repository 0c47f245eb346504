//! The admin API and the CLI as an operator uses them: JSON bodies whatever their
//! `Content-Type` (`curl -d`), a bare IP that names several servers refused with the list,
//! `mediagate reload`, `mediagate log-level`, `status -o json`, `status --all` over every
//! replica a host name resolves to, and `status --watch` without screen codes in a pipe.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn cli(args: &[&str]) -> (i32, String, String) {
    run_cli(args)
}

/// Two UDP echo servers on 127.0.0.1 (one IP, two ports) behind one upstream.
fn start() -> (UdpPair, Balancer) {
    let w = UdpPair::start();
    let yaml = format!(
        "admin: {{ listen: \"127.0.0.1:{admin}\" }}\n\
         listeners:\n  - {{ name: rtp, protocol: udp, listen: \"127.0.0.1:{listen}\", upstream: media }}\n\
         upstreams:\n  media:\n    primary: [\"{primary}\"]\n    backup: [\"{backup}\"]\n    \
         health: {{ type: udp, interval: 100ms, timeout: 100ms }}\n",
        admin = w.admin,
        listen = w.listen,
        primary = w.primary_addr,
        backup = w.backup_addr,
    );
    let b = Balancer::start(&yaml, w.admin);
    (w, b)
}

#[test]
fn json_bodies_are_taken_whatever_their_content_type() {
    let (w, b) = start();
    // What `curl -d '{"level":"debug"}'` sends.
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let (code, body) = http_with(
        b.admin,
        "POST",
        "/log-level",
        Some("{\"level\":\"debug\"}"),
        &form,
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let path = format!("/upstreams/media/servers/{}/state", w.primary_addr);
    let (code, body) =
        http_with(b.admin, "POST", &path, Some("{\"state\":\"drain\"}"), &form).unwrap();
    assert_eq!(code, 200, "{body}");
    // A body that is not JSON says what is expected.
    let (code, body) =
        http_with(b.admin, "POST", "/log-level", Some("level=debug"), &form).unwrap();
    assert_eq!(code, 400);
    assert!(
        body.contains("must be JSON such as {\\\"level\\\":\\\"debug\\\"}"),
        "{body}"
    );
}

#[test]
fn a_bare_ip_of_several_servers_is_refused_with_the_list() {
    let (w, b) = start();
    let admin = format!("http://{}", b.admin);
    let (code, _, err) = cli(&["server", "drain", "media", "127.0.0.1", "--admin", &admin]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("409"), "{err}");
    assert!(
        err.contains(&w.primary_addr.to_string()) && err.contains(&w.backup_addr.to_string()),
        "both servers listed: {err}"
    );
    // Nothing changed.
    let st = b.status();
    let servers = upstream_of(&st, "media")["servers"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        servers.iter().all(|s| s["admin_state"] == "enable"),
        "{servers:?}"
    );
    // ip:port names one; the answer and the event carry it.
    let primary = w.primary_addr.to_string();
    let (code, out, err) = cli(&["server", "drain", "media", &primary, "--admin", &admin]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&primary), "{out}");
    let st = b.status();
    let ev = upstream_of(&st, "media")["events"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|e| e["reason"] == "admin")
        .cloned()
        .expect("an admin event");
    assert_eq!(ev["from"][0], primary.as_str(), "{ev}");
    // A server that is not there: 404 with the servers it has.
    let (code, _, err) = cli(&["server", "drain", "media", "10.9.9.9", "--admin", &admin]);
    assert_eq!(code, 1);
    assert!(err.contains("404") && err.contains(&primary), "{err}");
}

#[test]
fn reload_and_log_level_from_the_cli() {
    let (w, b) = start();
    let admin = format!("http://{}", b.admin);
    let (code, out, err) = cli(&["reload", "--admin", &admin]);
    assert_eq!((code, out.trim()), (0, "reloaded"), "{err}");
    // A broken file: refused, every error shown, the running configuration stays.
    let good = std::fs::read_to_string(&b.config).unwrap();
    std::fs::write(&b.config, good.replace("interval: 100ms", "interval: soon")).unwrap();
    let (code, _, err) = cli(&["reload", "--admin", &admin]);
    assert_eq!(code, 1);
    assert!(
        err.contains("reload refused") && err.contains("interval"),
        "{err}"
    );
    std::fs::write(&b.config, &good).unwrap();
    assert_eq!(b.active("media"), vec![w.primary_addr.to_string()]);

    let (code, out, _) = cli(&["log-level", "mediagate=debug", "--admin", &admin]);
    assert_eq!((code, out.trim()), (0, "mediagate=debug"));
    let (code, out, _) = cli(&["log-level", "--admin", &admin]);
    assert_eq!((code, out.trim()), (0, "mediagate=debug"));
    let (code, _, err) = cli(&["log-level", "no such level!", "--admin", &admin]);
    assert_eq!(code, 1, "{err}");
}

#[test]
fn status_as_json_and_watch_in_a_pipe() {
    let (w, b) = start();
    let admin = format!("http://{}", b.admin);
    let (code, out, err) = cli(&["status", "-o", "json", "--admin", &admin]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        upstream_of(&v, "media")["active"][0],
        w.primary_addr.to_string()
    );

    // --watch into a pipe: refreshes one after the other, no screen codes.
    let mut child = Command::new(MEDIAGATE)
        .args(["status", "--watch", "--admin", &admin])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = child.kill();
    let _ = child.wait();
    let text = reader.join().unwrap();
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(!text.contains('\x1b'), "screen codes in a pipe: {text:?}");
    assert!(
        text.matches("mediagate ").count() >= 2,
        "two refreshes: {text}"
    );
}

/// `status --all`: two replicas in a namespace whose /etc/hosts (`ip netns exec` mounts
/// /etc/netns/NAME/hosts) gives one name both their addresses.
#[test]
fn status_all_asks_every_replica_of_a_name() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root for ip netns"
    );
    // A name of this process: a leftover of another run cannot be in the way.
    let ns: &'static str = Box::leak(format!("mg-cli{}", std::process::id()).into_boxed_str());
    let etc = format!("/etc/netns/{ns}");
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
    common::netns::sh(&["ip", "netns", "add", ns]);
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        format!("{etc}/hosts"),
        "127.0.0.1 replicas\n127.0.0.2 replicas\n",
    )
    .unwrap();
    struct Cleanup(&'static str);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", self.0]).output();
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.0));
        }
    }
    let _cleanup = Cleanup(ns);
    common::netns::sh(&["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"]);
    let dir = tempfile::tempdir().unwrap();
    let mut replicas = Vec::new();
    for ip in ["127.0.0.1", "127.0.0.2"] {
        let cfg = dir.path().join(format!("{ip}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "admin: {{ listen: \"{ip}:9300\" }}\n\
                 listeners:\n  - {{ name: rtp, protocol: udp, listen: \"{ip}:9301\", upstream: media }}\n\
                 upstreams:\n  media:\n    primary: [\"{ip}:9302\"]\n    health: {{ type: none }}\n"
            ),
        )
        .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, MEDIAGATE, "run", "-c"])
            .arg(&cfg)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        replicas.push(Proc {
            child,
            name: format!("mediagate {ip}"),
        });
    }
    let run = || {
        let out = Command::new("ip")
            .args([
                "netns", "exec", ns, MEDIAGATE, "status", "--all", "-o", "json",
            ])
            .args(["--admin", "http://replicas:9300"])
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    };
    let mut got = serde_json::Value::Null;
    wait_until(Duration::from_secs(15), "both replicas answer", || {
        got = run();
        got.as_array()
            .is_some_and(|a| a.len() == 2 && a.iter().all(|r| r.get("status").is_some()))
    });
    let names: Vec<&str> = got
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["replica"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["127.0.0.1:9300", "127.0.0.2:9300"]);
    for r in got.as_array().unwrap() {
        let ip = r["replica"].as_str().unwrap().split(':').next().unwrap();
        let listen = r["status"]["listeners"][0]["listen"].as_str().unwrap();
        assert!(listen.starts_with(ip), "{r}");
    }
    // The table names each replica; one that is gone shows its error, the others still.
    replicas.remove(1);
    let out = Command::new("ip")
        .args(["netns", "exec", ns, MEDIAGATE, "status", "--all"])
        .args(["--admin", "http://replicas:9300"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("== replica 127.0.0.1:9300 =="), "{text}");
    assert!(
        text.contains("== replica 127.0.0.2:9300 ==\nerror:"),
        "{text}"
    );
}

#[test]
fn check_warns_on_short_secrets_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("m.yaml");
    std::fs::write(
        &cfg,
        "admin: { listen: 127.0.0.1:9, token: abc, events_token: 0123456789abcdef }\n\
         turn:\n  public_address: 203.0.113.7\n  listeners: [{ protocol: udp, listen: 127.0.0.1:3478 }]\n  \
         auth: { type: ephemeral, secret: hunter2 }\n",
    )
    .unwrap();
    let (code, _, err) = cli(&["check", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "a warning, not an error: {err}");
    assert!(err.contains("admin.token: only 3 characters"), "{err}");
    assert!(err.contains("turn.auth.secret: only 7 characters"), "{err}");
    assert!(
        !err.contains("admin.events_token"),
        "16 characters are enough: {err}"
    );
}

#[test]
fn json_logs_are_flat() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("m.yaml");
    let (admin, udp) = (free_tcp_port(), free_udp_port());
    std::fs::write(
        &cfg,
        format!(
            "log: {{ format: json }}\nadmin: {{ listen: 127.0.0.1:{admin} }}\n\
             listeners: [ {{ name: a, protocol: udp, listen: 127.0.0.1:{udp}, upstream: u }} ]\n\
             upstreams:\n  u:\n    primary: [127.0.0.1:9]\n    health: {{ type: none }}\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(MEDIAGATE)
        .args(["run", "-c", cfg.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let ready = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(15))
            .expect("a `mediagate ready` line");
        let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
        if v["message"] == "mediagate ready" {
            break v;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(ready["level"], "INFO", "{ready}");
    assert_eq!(ready["target"], "mediagate::app", "{ready}");
    assert_eq!(ready["listeners"], 1, "fields at the top level: {ready}");
    assert!(ready.get("fields").is_none(), "{ready}");
}
