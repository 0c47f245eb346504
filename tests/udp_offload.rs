//! The kernel fast path (`listeners[].offload: ebpf`) end to end, through the real binary
//! as root: offloaded datagrams bypass user space and are still counted, idle expiry
//! follows the kernel's last-seen times, nothing stays attached after exit, and the
//! fallback to user space when the fast path is unavailable. (Failover with the fast path
//! on: `tests/udp_failover.rs`, the `offloaded_*` cases.)

mod common;

use common::offload::{self, *};
use common::*;
use mediagate::flows::Flows;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn config(listen: u16, admin: u16, primary: SocketAddr, backup: SocketAddr, idle: &str) -> String {
    offload::config(&format!("127.0.0.1:{listen}"), admin, primary, backup, idle)
}

/// Program ids of the `mg_ingress` programs loaded now (empty without bpftool).
fn loaded_programs() -> Vec<u64> {
    let Ok(out) = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
    else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .filter(|p| p["name"] == "mg_ingress")
                .filter_map(|p| p["id"].as_u64())
                .collect()
        })
        .unwrap_or_default()
}

fn has_bpftool() -> bool {
    Command::new("bpftool")
        .arg("version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offloaded_flows_bypass_user_space_are_counted_and_detached_at_exit() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the fast path needs root (CAP_BPF, CAP_NET_ADMIN)"
    );
    let before = loaded_programs();
    let w = UdpPair::start();
    let mut b = Balancer::start(
        &config(w.listen, w.admin, w.primary_addr, w.backup_addr, "60s"),
        w.admin,
    );
    let flows = Flows::start(w.listen_addr(), 10, Duration::from_millis(10), 64)
        .await
        .expect("flows");
    wait_until_async(Duration::from_secs(10), "10 sessions offloaded", || {
        sample(&b.metrics(), OFF_SESSIONS) == 10.0
    })
    .await;
    // Let datagrams sent before the install drain through user space.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m0 = b.metrics();
    wait_until_async(Duration::from_secs(10), "500 datagrams offloaded", || {
        sample(&b.metrics(), OFF_TO_SERVER) >= sample(&m0, OFF_TO_SERVER) + 500.0
    })
    .await;
    let m1 = b.metrics();
    let delta = |name: &str| sample(&m1, name) - sample(&m0, name);
    eprintln!(
        "to server: {} counted, {} offloaded; to client: {} counted, {} offloaded",
        delta(PKT_TO_SERVER),
        delta(OFF_TO_SERVER),
        delta(PKT_TO_CLIENT),
        delta(OFF_TO_CLIENT)
    );
    // Offloaded traffic is in the totals, and (almost) nothing went through user space.
    assert!(delta(OFF_TO_SERVER) >= 500.0, "{}", offload_lines(&m1));
    assert!(delta(OFF_TO_CLIENT) >= 450.0, "{}", offload_lines(&m1));
    for (total, off) in [
        (PKT_TO_SERVER, OFF_TO_SERVER),
        (PKT_TO_CLIENT, OFF_TO_CLIENT),
    ] {
        let user_space = delta(total) - delta(off);
        assert!(
            (0.0..=2.0).contains(&user_space),
            "{user_space} datagrams went through user space:\n{}",
            offload_lines(&m1)
        );
    }
    let stats = flows.finish(Duration::from_millis(200)).await;
    for f in &stats {
        assert_eq!(f.last_worker, "primary");
        assert!(f.received + 2 >= f.sent, "flow lost replies: {f:?}");
    }
    assert!(
        m1.lines()
            .filter(|l| l.starts_with("mediagate_offload_errors_total{"))
            .all(|l| l.ends_with(" 0")),
        "{}",
        offload_lines(&m1)
    );

    // Everything the process attached goes with it (nothing is pinned).
    if has_bpftool() {
        let ours: Vec<u64> = loaded_programs()
            .into_iter()
            .filter(|id| !before.contains(id))
            .collect();
        assert!(!ours.is_empty(), "bpftool shows no mg_ingress program");
        b.proc.signal(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(b.proc.wait_exit(Duration::from_secs(15)), Some(0));
        wait_until(
            Duration::from_secs(5),
            "programs unloaded after exit",
            || {
                let now = loaded_programs();
                ours.iter().all(|id| !now.contains(id))
            },
        );
    } else {
        eprintln!("bpftool missing: attachment after exit not checked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_expiry_follows_the_kernels_last_seen_times() {
    assert!(nix::unistd::Uid::effective().is_root(), "needs root");
    let w = UdpPair::start();
    let b = Balancer::start(
        &config(w.listen, w.admin, w.primary_addr, w.backup_addr, "1s"),
        w.admin,
    );
    let created = "mediagate_sessions_created_total{listener=\"rtp\"}";
    let closed = "mediagate_sessions_closed_total{listener=\"rtp\",reason=\"idle_timeout\"}";
    let flows = Flows::start(w.listen_addr(), 1, Duration::from_millis(50), 64)
        .await
        .expect("flows");
    wait_until_async(Duration::from_secs(10), "session offloaded", || {
        sample(&b.metrics(), OFF_SESSIONS) == 1.0
    })
    .await;
    // 3 s of traffic only the kernel sees: three idle timeouts, and the session lives.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = b.metrics();
    assert_eq!(sample(&m, created), 1.0, "{}", offload_lines(&m));
    assert_eq!(
        sample(&m, closed),
        0.0,
        "an active offloaded session expired"
    );
    assert!(sample(&m, OFF_TO_SERVER) >= 40.0, "{}", offload_lines(&m));
    let stopped = Instant::now();
    let stats = flows.finish(Duration::from_millis(100)).await;
    assert!(stats[0].received + 2 >= stats[0].sent, "{:?}", stats[0]);
    // Silent now: it expires after the timeout (plus a sweep), and leaves the kernel map.
    wait_until_async(Duration::from_secs(5), "idle session closed", || {
        let m = b.metrics();
        sample(&m, closed) == 1.0 && sample(&m, OFF_SESSIONS) == 0.0
    })
    .await;
    assert!(
        stopped.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before its idle timeout",
        stopped.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_fast_path_falls_back_to_user_space() {
    let w = UdpPair::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mediagate.yaml");
    std::fs::write(
        &path,
        config(w.listen, w.admin, w.primary_addr, w.backup_addr, "60s"),
    )
    .expect("write");
    // MEDIAGATE_OFFLOAD=off stands for any reason the kernel refuses (no clang at build
    // time, no CAP_BPF): the same path, logged once and counted.
    let child = Command::new(MEDIAGATE)
        .args(["run", "-c"])
        .arg(&path)
        .env("MEDIAGATE_OFFLOAD", "off")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut p = Proc {
        child,
        name: "mediagate".into(),
    };
    let admin = SocketAddr::from(([127, 0, 0, 1], w.admin));
    wait_until(Duration::from_secs(15), "readyz", || {
        matches!(http(admin, "GET", "/readyz", None), Ok((200, _)))
    });
    let flows = Flows::start(w.listen_addr(), 3, Duration::from_millis(10), 64)
        .await
        .expect("flows");
    wait_until_async(Duration::from_secs(10), "100 datagrams answered", || {
        let (_, m) = http(admin, "GET", "/metrics", None).expect("metrics");
        sample(&m, PKT_TO_CLIENT) >= 100.0
    })
    .await;
    let stats = flows.finish(Duration::from_millis(200)).await;
    assert!(stats.iter().all(|f| f.last_worker == "primary"));
    let (_, m) = http(admin, "GET", "/metrics", None).expect("metrics");
    assert_eq!(
        sample(&m, "mediagate_offload_errors_total{reason=\"disabled\"}"),
        1.0,
        "{}",
        offload_lines(&m)
    );
    assert_eq!(sample(&m, OFF_SESSIONS), 0.0);
    assert_eq!(sample(&m, OFF_TO_SERVER), 0.0);
    p.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(15)), Some(0));
    let mut err = String::new();
    use std::io::Read;
    p.child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read stderr");
    assert_eq!(
        err.matches("offload unavailable").count(),
        1,
        "logged once:\n{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_turning_offload_off_detaches_and_keeps_flows() {
    assert!(nix::unistd::Uid::effective().is_root(), "needs root");
    if !has_bpftool() {
        eprintln!("bpftool missing: skipped (scripts/install-test-deps.sh installs it)");
        return;
    }
    let before = loaded_programs();
    let w = UdpPair::start();
    let yaml = config(w.listen, w.admin, w.primary_addr, w.backup_addr, "60s");
    let b = Balancer::start(&yaml, w.admin);
    let flows = Flows::start(w.listen_addr(), 3, Duration::from_millis(10), 64)
        .await
        .expect("flows");
    wait_until_async(Duration::from_secs(10), "3 sessions offloaded", || {
        sample(&b.metrics(), OFF_SESSIONS) == 3.0
    })
    .await;
    let ours: Vec<u64> = loaded_programs()
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    assert!(!ours.is_empty(), "bpftool shows no mg_ingress program");
    std::fs::write(&b.config, yaml.replace("offload: ebpf", "offload: none")).expect("write");
    b.proc.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until_async(
        Duration::from_secs(10),
        "program unloaded by the reload",
        || {
            let now = loaded_programs();
            ours.iter().all(|id| !now.contains(id))
        },
    )
    .await;
    // The flows go on through user space.
    let m0 = b.metrics();
    wait_until_async(Duration::from_secs(10), "100 replies in user space", || {
        sample(&b.metrics(), PKT_TO_CLIENT) >= sample(&m0, PKT_TO_CLIENT) + 100.0
    })
    .await;
    let m1 = b.metrics();
    assert_eq!(sample(&m1, OFF_TO_CLIENT), sample(&m0, OFF_TO_CLIENT));
    let stats = flows.finish(Duration::from_millis(200)).await;
    assert!(stats.iter().all(|f| f.last_worker == "primary"));
}
