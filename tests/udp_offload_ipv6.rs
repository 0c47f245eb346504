//! The kernel fast path (`listeners[].offload: ebpf`) for IPv6 sessions, through the
//! real binary as root on IPv6 loopback (`::1`): an IPv6 listener's flows are forwarded
//! by the kernel (`mg_flows6`) and still counted, and a failover moves them to the backup,
//! where they are offloaded again; across veth links to network namespaces, with
//! checksum offload off so the receivers verify the UDP checksums the program rewrote.
//! Idle expiry reads the IPv6 entries' last-seen times. A listener on `[::]` offloads its IPv6 clients and its IPv4 ones. A v6 client of a v4
//! server stays in user space. (The IPv4 cases:
//! `tests/udp_offload.rs`.)

mod common;

use common::netns::{VethHost, sh};
use common::offload::{self, *};
use common::*;
use mediagate::flows::Flows;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

fn config(listen: SocketAddr, admin: u16, primary: SocketAddr, backup: SocketAddr) -> String {
    config_idle(listen, admin, primary, backup, "60s")
}

fn config_idle(
    listen: SocketAddr,
    admin: u16,
    primary: SocketAddr,
    backup: SocketAddr,
    idle: &str,
) -> String {
    offload::config(&listen.to_string(), admin, primary, backup, idle)
}

fn v6(port: u16) -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))
}

/// Waits for `n` offloaded sessions, then for 500 more datagrams forwarded by the kernel
/// towards the servers, and checks that (almost) none of them went through user space.
async fn assert_offloaded(b: &Balancer, n: usize, what: &str) {
    wait_until_async(
        Duration::from_secs(10),
        &format!("{n} sessions offloaded ({what})"),
        || sample(&b.metrics(), OFF_SESSIONS) == n as f64,
    )
    .await;
    // Let datagrams sent before the install drain through user space.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m0 = b.metrics();
    wait_until_async(
        Duration::from_secs(10),
        &format!("500 datagrams offloaded ({what})"),
        || sample(&b.metrics(), OFF_TO_SERVER) >= sample(&m0, OFF_TO_SERVER) + 500.0,
    )
    .await;
    let m1 = b.metrics();
    let delta = |name: &str| sample(&m1, name) - sample(&m0, name);
    eprintln!(
        "{what}: to server {} counted, {} offloaded; to client {} counted, {} offloaded",
        delta(PKT_TO_SERVER),
        delta(OFF_TO_SERVER),
        delta(PKT_TO_CLIENT),
        delta(OFF_TO_CLIENT)
    );
    assert!(delta(OFF_TO_SERVER) >= 500.0, "{}", offload_lines(&m1));
    assert!(delta(OFF_TO_CLIENT) >= 450.0, "{}", offload_lines(&m1));
    for (total, off) in [
        (PKT_TO_SERVER, OFF_TO_SERVER),
        (PKT_TO_CLIENT, OFF_TO_CLIENT),
    ] {
        let user_space = delta(total) - delta(off);
        assert!(
            (0.0..=2.0).contains(&user_space),
            "{what}: {user_space} datagrams went through user space:\n{}",
            offload_lines(&m1)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_flows_are_forwarded_by_the_kernel_and_fail_over() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the fast path needs root (CAP_BPF, CAP_NET_ADMIN)"
    );
    let (primary_addr, backup_addr) = (v6(free_udp_port()), v6(free_udp_port()));
    let mut primary = worker("udp-echo", "primary", primary_addr, None);
    let _backup = worker("udp-echo", "backup", backup_addr, None);
    let (listen, admin) = (v6(free_udp_port()), free_tcp_port());
    let b = Balancer::start(&config(listen, admin, primary_addr, backup_addr), admin);
    let flows = Flows::start(listen, 10, Duration::from_millis(10), 64)
        .await
        .expect("flows");
    assert_offloaded(&b, 10, "primary").await;
    assert!(
        flows.snapshot().iter().all(|f| f.last_worker == "primary"),
        "{:?}",
        flows.snapshot()
    );

    // The primary dies: the offloaded sessions leave the kernel, re-pin to the backup in
    // user space and are installed again there.
    primary.kill();
    wait_until_async(
        Duration::from_secs(10),
        "every flow answered by the backup",
        || flows.snapshot().iter().all(|f| f.last_worker == "backup"),
    )
    .await;
    assert_offloaded(&b, 10, "backup").await;
    let stats = flows.finish(Duration::from_millis(200)).await;
    for f in &stats {
        assert_eq!(f.last_worker, "backup");
        assert!(f.received + 5 >= f.sent, "flow lost replies: {f:?}");
    }
    let m = b.metrics();
    assert!(
        m.lines()
            .filter(|l| l.starts_with("mediagate_offload_errors_total{"))
            .all(|l| l.ends_with(" 0")),
        "{}",
        offload_lines(&m)
    );
}

/// A listener on `[::]:port`, clients and servers on `lo` of one family: its sessions
/// are offloaded (the kernel learns the address the clients sent to).
async fn wildcard_listener(v4: bool) {
    let ip: std::net::IpAddr = if v4 {
        std::net::Ipv4Addr::LOCALHOST.into()
    } else {
        std::net::Ipv6Addr::LOCALHOST.into()
    };
    let primary_addr = SocketAddr::new(ip, free_udp_port());
    let backup_addr = SocketAddr::new(ip, free_udp_port());
    let _primary = worker("udp-echo", "primary", primary_addr, None);
    let _backup = worker("udp-echo", "backup", backup_addr, None);
    let (port, admin) = (free_udp_port(), free_tcp_port());
    let listen = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    let b = Balancer::start(&config(listen, admin, primary_addr, backup_addr), admin);
    let flows = Flows::start(SocketAddr::new(ip, port), 10, Duration::from_millis(10), 64)
        .await
        .expect("flows");
    assert_offloaded(
        &b,
        10,
        if v4 {
            "[::] listener, IPv4"
        } else {
            "[::] listener, IPv6"
        },
    )
    .await;
    flows.finish(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_ipv6_listener_offloads_ipv6_clients() {
    wildcard_listener(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_ipv6_listener_offloads_ipv4_clients() {
    wildcard_listener(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_client_of_an_ipv4_server_stays_in_user_space() {
    let primary_addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let backup_addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let _primary = worker("udp-echo", "primary", primary_addr, None);
    let _backup = worker("udp-echo", "backup", backup_addr, None);
    let (listen, admin) = (v6(free_udp_port()), free_tcp_port());
    let b = Balancer::start(&config(listen, admin, primary_addr, backup_addr), admin);
    let flows = Flows::start(listen, 5, Duration::from_millis(10), 64)
        .await
        .expect("flows");
    wait_until_async(Duration::from_secs(10), "300 datagrams answered", || {
        flows.snapshot().iter().map(|f| f.received).sum::<u64>() >= 300
    })
    .await;
    let m = b.metrics();
    assert_eq!(sample(&m, OFF_SESSIONS), 0.0, "{}", offload_lines(&m));
    assert_eq!(sample(&m, OFF_TO_SERVER), 0.0, "{}", offload_lines(&m));
    assert!(sample(&m, PKT_TO_SERVER) >= 300.0, "{}", offload_lines(&m));
    flows.finish(Duration::from_millis(100)).await;
}

/// `VethHost` with IPv6 on its link (`fd00:238:IDX::1` outside, `::2` inside, no DAD)
/// and transmit checksum offload off inside, so the datagrams it sends carry a full
/// checksum and the ones it receives are verified in software.
fn v6_host(idx: u8) -> (VethHost, std::net::Ipv6Addr, std::net::Ipv6Addr) {
    let h = VethHost::create("mg-v6o", "mg6o", 238, idx);
    let (out, inside) = (format!("fd00:238:{idx}::1"), format!("fd00:238:{idx}::2"));
    sh(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{out}/64"),
        "dev",
        &h.host_dev,
        "nodad",
    ]);
    h.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{inside}/64"),
        "dev",
        &h.ns_dev,
        "nodad",
    ]);
    h.exec(&["ethtool", "-K", &h.ns_dev, "tx", "off"]);
    (h, out.parse().unwrap(), inside.parse().unwrap())
}

/// A UDP socket bound inside `ns`.
fn socket_in(ns: &str, addr: SocketAddr) -> UdpSocket {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        UdpSocket::bind(addr).expect("bind in netns")
    })
    .join()
    .expect("netns thread")
}

#[test]
fn ipv6_flows_between_namespaces_keep_valid_checksums() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the fast path needs root (CAP_BPF, CAP_NET_ADMIN)"
    );
    // Client in namespace 1, primary in 2, backup in 3; mediagate in the root namespace
    // (its devices exist before it starts, so the program is attached to them).
    let (client, listen_ip, client_ip) = v6_host(1);
    let (primary, _, primary_ip) = v6_host(2);
    let (backup, _, backup_ip) = v6_host(3);
    let primary_addr = SocketAddr::from((primary_ip, 7000));
    let backup_addr = SocketAddr::from((backup_ip, 7000));
    let _p = worker("udp-echo", "primary", primary_addr, Some(&primary.ns));
    let _b = worker("udp-echo", "backup", backup_addr, Some(&backup.ns));
    let (listen, admin) = (
        SocketAddr::from((listen_ip, free_udp_port())),
        free_tcp_port(),
    );
    let b = Balancer::start(&config(listen, admin, primary_addr, backup_addr), admin);

    let sock = socket_in(&client.ns, SocketAddr::from((client_ip, 0)));
    sock.connect(listen).expect("connect");
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    // One datagram at a time, each answered before the next (bounded: 600 rounds,
    // 30 s): a datagram whose rewritten checksum were wrong would be dropped by the
    // receiver and its round would time out.
    let (mut answered, mut buf) = (0u32, [0u8; 256]);
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..600u32 {
        if Instant::now() > deadline {
            break;
        }
        sock.send(format!("ping {i:060}").as_bytes()).expect("send");
        if sock.recv(&mut buf).is_ok() {
            answered += 1;
        }
    }
    let m = b.metrics();
    eprintln!(
        "{answered}/600 answered; to server {} counted, {} offloaded; to client {} counted, {} offloaded",
        sample(&m, PKT_TO_SERVER),
        sample(&m, OFF_TO_SERVER),
        sample(&m, PKT_TO_CLIENT),
        sample(&m, OFF_TO_CLIENT)
    );
    assert!(
        answered >= 598,
        "{answered}/600 answered\n{}",
        offload_lines(&m)
    );
    assert!(sample(&m, OFF_TO_SERVER) >= 590.0, "{}", offload_lines(&m));
    assert!(sample(&m, OFF_TO_CLIENT) >= 590.0, "{}", offload_lines(&m));
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_idle_expiry_follows_the_kernels_last_seen_times() {
    assert!(nix::unistd::Uid::effective().is_root(), "needs root");
    let (primary_addr, backup_addr) = (v6(free_udp_port()), v6(free_udp_port()));
    let _primary = worker("udp-echo", "primary", primary_addr, None);
    let _backup = worker("udp-echo", "backup", backup_addr, None);
    let (listen, admin) = (v6(free_udp_port()), free_tcp_port());
    let b = Balancer::start(
        &config_idle(listen, admin, primary_addr, backup_addr, "1s"),
        admin,
    );
    let created = "mediagate_sessions_created_total{listener=\"rtp\"}";
    let closed = "mediagate_sessions_closed_total{listener=\"rtp\",reason=\"idle_timeout\"}";
    let flows = Flows::start(listen, 1, Duration::from_millis(50), 64)
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
    flows.finish(Duration::from_millis(100)).await;
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
