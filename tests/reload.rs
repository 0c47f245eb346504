//! Live edits: the backup list is edited and reloaded 20 times (SIGHUP and file change,
//! through a ConfigMap-style symlink swap) while 100 flows stream, with a broken file in
//! the middle; and the drain / maint admin states with live flows. Each case runs twice:
//! in user space, and with the kernel fast path (`offload: ebpf`, needs root and a build
//! with clang), where every flow must be offloaded before the edits and keep the bounds.

mod common;

use common::*;
use mediagate::flows::Flows;
use nix::sys::signal::Signal;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

fn config(
    listen: u16,
    admin: u16,
    primary: SocketAddr,
    backups: &[SocketAddr],
    offload: bool,
) -> String {
    let backup: Vec<String> = backups.iter().map(|b| format!("\"{b}\"")).collect();
    let offload = if offload { "ebpf" } else { "none" };
    format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - {{ name: rtp, protocol: udp, listen: "127.0.0.1:{listen}", upstream: media, offload: {offload} }}
upstreams:
  media:
    primary: ["{primary}"]
    backup: [{}]
    health: {{ type: udp, interval: 100ms, timeout: 100ms }}
"#,
        backup.join(", ")
    )
}

/// Writes `text` as a new ConfigMap revision and swaps the `..data` symlink atomically,
/// exactly as the kubelet updates a mounted ConfigMap.
fn configmap_swap(dir: &Path, revision: usize, text: &str) {
    let rev = dir.join(format!("..rev{revision}"));
    std::fs::create_dir(&rev).expect("revision dir");
    std::fs::write(rev.join("mediagate.yaml"), text).expect("write");
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..rev{revision}"), &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap");
}

fn reloads(b: &Balancer, result: &str) -> u64 {
    let needle = format!("mediagate_config_reloads_total{{result=\"{result}\"}} ");
    b.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(needle.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// With the fast path: waits until all `n` sessions of listener `rtp` are offloaded.
async fn wait_offloaded(b: &Balancer, n: usize) {
    let want = format!("mediagate_offload_sessions{{listener=\"rtp\"}} {n}");
    wait_until_async(Duration::from_secs(5), "every flow offloaded", || {
        b.metrics().lines().any(|l| l == want)
    })
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_live_edits_and_a_broken_file_lose_no_datagram() {
    live_edits(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offloaded_twenty_live_edits_and_a_broken_file_lose_no_datagram() {
    live_edits(true).await;
}

async fn live_edits(offload: bool) {
    let ports: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let _workers: Vec<Proc> = ["primary", "b1", "b2"]
        .iter()
        .zip(&addrs)
        .map(|(n, a)| worker("udp-echo", n, *a, None))
        .collect();
    let (l, a) = (free_udp_port(), free_tcp_port());

    // ConfigMap layout: mediagate.yaml -> ..data/mediagate.yaml, ..data -> ..rev0
    let dir = tempfile::tempdir().expect("tempdir");
    configmap_swap(
        dir.path(),
        0,
        &config(l, a, addrs[0], &addrs[1..2], offload),
    );
    let path = dir.path().join("mediagate.yaml");
    std::os::unix::fs::symlink("..data/mediagate.yaml", &path).expect("link");
    let b = Balancer::start_path(dir, path, a);
    let dir = b.dir.path().to_path_buf();

    let target = SocketAddr::from(([127, 0, 0, 1], l));
    let flows = Flows::start(target, 100, Duration::from_millis(20), 64)
        .await
        .expect("flows");
    wait_until_async(Duration::from_secs(10), "flows answered", || {
        flows.snapshot().iter().all(|f| f.last_worker == "primary")
    })
    .await;
    if offload {
        wait_offloaded(&b, 100).await;
    }
    let offloaded_before = offloaded_to_server(&b);
    let before = flows.snapshot();
    let lists: [&[SocketAddr]; 3] = [&addrs[1..3], &addrs[2..3], &addrs[1..2]];
    let mut ok = reloads(&b, "ok");
    for i in 1..=20 {
        if i == 10 {
            // A broken edit: rejected, the running config keeps serving.
            configmap_swap(&dir, 100, "listeners: [ {name: rtp\n");
            b.proc.signal(Signal::SIGHUP);
            wait_until_async(Duration::from_secs(5), "broken reload counted", || {
                reloads(&b, "error") >= 1
            })
            .await;
            let st = b.status();
            let err = st["config"]["last_reload_error"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(
                err.contains("mediagate.yaml:"),
                "error names the file: {st}"
            );
        }
        let backups = lists[i % 3];
        configmap_swap(&dir, i, &config(l, a, addrs[0], backups, offload));
        if i % 2 == 0 {
            b.proc.signal(Signal::SIGHUP);
        } // odd edits: the file watcher notices the symlink swap by itself
        wait_until_async(Duration::from_secs(5), "reload applied", || {
            reloads(&b, "ok") > ok
        })
        .await;
        ok = reloads(&b, "ok");
        let st = b.status();
        assert!(
            st["config"]["last_reload_error"].is_null(),
            "a good edit clears the error: {st}"
        );
        let servers: Vec<String> = upstream_of(&st, "media")["servers"]
            .as_array()
            .map(|s| {
                s.iter()
                    .skip(1)
                    .map(|x| x["address"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default();
        let want: Vec<String> = backups.iter().map(|a| a.to_string()).collect();
        assert_eq!(servers, want, "edit {i} applied");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = flows.snapshot();
    let lost: u64 = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.lost_between(b.sent, a.sent.saturating_sub(5)))
        .sum();
    eprintln!("21 reloads (1 broken) under 100 flows: {lost} datagrams lost");
    assert_eq!(lost, 0);
    // The listener kept its sessions: none was created again.
    let m = b.metrics();
    assert!(
        m.contains("mediagate_sessions_created_total{listener=\"rtp\"} 100"),
        "{m}"
    );
    assert!(reloads(&b, "error") >= 1);
    if offload {
        // The flows stayed in the kernel through every reload.
        wait_offloaded(&b, 100).await;
        assert!(
            offloaded_to_server(&b) > offloaded_before + 1000,
            "the fast path kept forwarding during the edits"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_keeps_sessions_and_maint_moves_them() {
    drain_and_maint(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offloaded_drain_keeps_sessions_and_maint_moves_them() {
    drain_and_maint(true).await;
}

async fn drain_and_maint(offload: bool) {
    let w = UdpPair::start();
    let (pa, ba) = (w.primary_addr, w.backup_addr);
    let b = Balancer::start(&config(w.listen, w.admin, pa, &[ba], offload), w.admin);
    let target = w.listen_addr();
    let flows = Flows::start(target, 10, Duration::from_millis(20), 64)
        .await
        .expect("flows");
    wait_until_async(Duration::from_secs(10), "on primary", || {
        flows.snapshot().iter().all(|f| f.last_worker == "primary")
    })
    .await;
    if offload {
        wait_offloaded(&b, 10).await;
    }
    let post = |state: &str| {
        let (code, body) = http(
            b.admin,
            "POST",
            &format!("/upstreams/media/servers/{pa}/state"),
            Some(&format!("{{\"state\":\"{state}\"}}")),
        )
        .expect("post");
        assert_eq!(code, 200, "{body}");
    };
    post("drain");
    // New sessions go to the backup...
    let newcomer = Flows::start(target, 1, Duration::from_millis(20), 64)
        .await
        .expect("flow");
    wait_until_async(Duration::from_secs(3), "newcomer on backup", || {
        newcomer.snapshot()[0].last_worker == "backup"
    })
    .await;
    // ...existing ones stay on the draining primary (in the kernel, with the fast path).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(flows.snapshot().iter().all(|f| f.last_worker == "primary"));
    if offload {
        wait_offloaded(&b, 11).await;
    }
    post("maint");
    wait_until_async(Duration::from_secs(1), "maint moves every flow", || {
        flows.snapshot().iter().all(|f| f.last_worker == "backup")
    })
    .await;
    if offload {
        // Re-pinned in user space, then installed again for the backup.
        wait_offloaded(&b, 11).await;
    }
    post("enable");
    assert_eq!(b.active("media"), vec![pa.to_string()]);
}
