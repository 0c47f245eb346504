//! UDP sessions beyond the ephemeral port range: upstream sockets to different servers
//! share local ports, so the range limits sessions per server, not per process.
//!
//! The test runs in a network namespace of its own whose ephemeral range is narrowed to
//! 100 ports, and opens 240 sessions over three servers through the real binary. With
//! one port per session (the kernel's pick) only about 100 sessions could open.

mod common;

use common::*;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

const FLOWS: u16 = 240;

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sessions_to_different_servers_share_local_ports() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root for ip netns (CI runs as root)"
    );
    let ns = Netns(format!("mgports{}", std::process::id()));
    let _ = Command::new("ip").args(["netns", "del", &ns.0]).output();
    run(&["ip", "netns", "add", &ns.0]);
    run(&["ip", "-n", &ns.0, "link", "set", "lo", "up"]);
    run(&[
        "ip",
        "netns",
        "exec",
        &ns.0,
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ip_local_port_range=40000 40099",
    ]);
    let name = ns.0.clone();
    // Everything below runs on a thread that has entered the namespace: the sockets it
    // opens and the processes it starts live there.
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{name}")).expect("open netns");
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        in_namespace();
    })
    .join()
    .expect("test thread");
}

fn in_namespace() {
    let servers: Vec<SocketAddr> = (0..3)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], 5001 + i)))
        .collect();
    let _workers: Vec<Proc> = servers
        .iter()
        .enumerate()
        .map(|(i, a)| worker("udp-echo", &format!("s{i}"), *a, None))
        .collect();
    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:5010" }}
listeners:
  - name: rtp
    protocol: udp
    listen: "127.0.0.1:5000"
    upstream: media
upstreams:
  media:
    balance: least_sessions
    primary: ["{}", "{}", "{}"]
    health: {{ type: udp, send: ping, interval: 1s, timeout: 500ms }}
"#,
        servers[0], servers[1], servers[2]
    );
    let b = Balancer::start(&yaml, 5010);
    wait_until(Duration::from_secs(5), "three servers up", || {
        http(b.admin, "GET", "/status", None)
            .map(|(_, body)| body.matches("\"up\"").count() >= 3)
            .unwrap_or(false)
    });
    // Client ports below the narrowed range, so the clients take none of it.
    let clients: Vec<UdpSocket> = (0..FLOWS)
        .map(|i| {
            let s = UdpSocket::bind(("127.0.0.1", 2000 + i)).expect("bind client");
            s.connect("127.0.0.1:5000").expect("connect");
            s.set_nonblocking(true).expect("nonblocking");
            s
        })
        .collect();
    let mut answered = vec![None::<String>; clients.len()];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 256];
    while answered.iter().any(Option::is_none) && Instant::now() < deadline {
        for (i, s) in clients.iter().enumerate() {
            if answered[i].is_none() {
                let _ = s.send(format!("flow{i}").as_bytes());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        for (i, s) in clients.iter().enumerate() {
            while let Ok(n) = s.recv(&mut buf) {
                let reply = String::from_utf8_lossy(&buf[..n]).to_string();
                let (server, payload) = reply.split_once('|').expect("name|payload");
                assert_eq!(
                    payload,
                    format!("flow{i}"),
                    "a reply reached the wrong client"
                );
                answered[i] = Some(server.to_string());
            }
        }
    }
    let missing = answered.iter().filter(|a| a.is_none()).count();
    assert_eq!(missing, 0, "{missing} of {FLOWS} sessions got no answer");
    for s in ["s0", "s1", "s2"] {
        let n = answered.iter().filter(|a| a.as_deref() == Some(s)).count();
        assert!(
            n <= 100,
            "{s} holds {n} sessions, more than the range has ports"
        );
    }
    let (_, metrics) = http(b.admin, "GET", "/metrics", None).expect("metrics");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("mediagate_sessions{"))
        .unwrap_or_default()
        .to_string();
    assert!(
        line.ends_with(&format!(" {FLOWS}")),
        "live sessions: {line:?}"
    );
    eprintln!("{FLOWS} sessions over 3 servers through 100 local ports: {line}");
}
