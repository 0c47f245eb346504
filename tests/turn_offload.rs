//! The TURN relay's kernel fast path (`turn.relay.offload: ebpf`), as root, with clients
//! and peers in network namespaces of the test's own whose veths send full checksums (as
//! datagrams arriving from a network do; see `crate::offload::turn`):
//! - coturn's `turnutils_uclient` relays through channels to `turnutils_peer` without
//!   loss, and most datagrams both ways are relayed by the kernel (counted as relayed);
//! - exact payloads of odd and large sizes both ways, a peer port without a channel still
//!   gets Data indications from user space, and an ended allocation's channel relays
//!   nothing more;
//! - the program itself stops relaying at an entry's end (`expires_ns`), between user
//!   space's sweeps;
//! - a peer the policy stops allowing (its upstream went away) leaves the kernel within
//!   the sweep's second, and nothing more is relayed to or from it;
//! - IPv6 clients and peers (listener, relayed address, peer all IPv6) are relayed by the
//!   kernel both ways, byte for byte; a channel of mixed families (an IPv4 client with an
//!   IPv6 relayed address) stays in user space and is relayed there;
//! - clients and peers on this host's loopback (their checksums left to offload,
//!   CHECKSUM_PARTIAL) are relayed by the kernel too, without loss.

mod turn_support;

use mediagate::config::DefaultFamily;
use mediagate::offload::{TurnCounters, acquire_turn};
use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdp};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::Duration;
use stun::message::*;
use tokio::net::UdpSocket;
use tokio::time::timeout;
use turn::proto::chandata::ChannelData;
use turn_support::*;

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "{}: {} (this test needs root, iproute2 and ethtool: scripts/install-test-deps.sh)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace behind a veth pair: `host` on this side, `inside` in it. The
/// namespace's end computes UDP checksums in software (`tx off`), so its datagrams arrive
/// with full checksums.
struct Net {
    ns: String,
    dev: String,
    host: IpAddr,
    inside: IpAddr,
}

impl Net {
    fn create(tag: &str, subnet: u8) -> Net {
        let id = std::process::id() % 250;
        let host: IpAddr = format!("10.{subnet}.{id}.1").parse().unwrap();
        let inside: IpAddr = format!("10.{subnet}.{id}.2").parse().unwrap();
        Net::with_addrs(tag, host, inside, 30)
    }

    /// The same with IPv6 addresses (`fd00:SUBNET:ID::1` and `::2`).
    fn create6(tag: &str, subnet: u8) -> Net {
        let id = std::process::id() % 250;
        let host: IpAddr = format!("fd00:{subnet}:{id}::1").parse().unwrap();
        let inside: IpAddr = format!("fd00:{subnet}:{id}::2").parse().unwrap();
        Net::with_addrs(tag, host, inside, 64)
    }

    fn with_addrs(tag: &str, host: IpAddr, inside: IpAddr, prefix: u8) -> Net {
        let id = std::process::id() % 250;
        let ns = format!("mgo{tag}{}", std::process::id());
        let dev = format!("mgo{tag}{id}");
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &dev]).output();
        run(&["ip", "netns", "add", &ns]);
        let net = Net {
            ns,
            dev,
            host,
            inside,
        };
        let peer = format!("{}p", net.dev);
        run(&[
            "ip", "link", "add", &net.dev, "type", "veth", "peer", "name", &peer, "netns", &net.ns,
        ]);
        // nodad: an IPv6 address is usable at once (no duplicate detection to wait for).
        let nodad: &[&str] = if host.is_ipv6() { &["nodad"] } else { &[] };
        let addr = |ip: IpAddr, dev: &str| {
            let mut a = vec![
                "ip".to_string(),
                "addr".into(),
                "add".into(),
                format!("{ip}/{prefix}"),
                "dev".into(),
                dev.into(),
            ];
            a.extend(nodad.iter().map(|s| s.to_string()));
            a
        };
        let host_addr = addr(host, &net.dev);
        run(&host_addr.iter().map(String::as_str).collect::<Vec<_>>());
        run(&["ip", "link", "set", &net.dev, "up"]);
        let exec = |args: &[&str]| {
            let mut full = vec!["ip", "netns", "exec", &net.ns];
            full.extend_from_slice(args);
            run(&full);
        };
        let inside_addr = addr(inside, &peer);
        exec(&inside_addr.iter().map(String::as_str).collect::<Vec<_>>());
        exec(&["ip", "link", "set", &peer, "up"]);
        exec(&["ip", "link", "set", "lo", "up"]);
        exec(&["ethtool", "-K", &peer, "tx", "off"]);
        net
    }

    /// A UDP socket bound inside the namespace.
    fn socket(&self, port: u16) -> StdUdp {
        let ns = self.ns.clone();
        let addr = SocketAddr::new(self.inside, port);
        std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
            nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            StdUdp::bind(addr).expect("bind in netns")
        })
        .join()
        .expect("netns thread")
    }

    fn tokio_socket(&self, port: u16) -> UdpSocket {
        let s = self.socket(port);
        s.set_nonblocking(true).unwrap();
        UdpSocket::from_std(s).unwrap()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip").args(["link", "del", &self.dev]).output();
    }
}

fn root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the fast path needs root (CAP_BPF, CAP_NET_ADMIN)"
    );
}

/// A gateway with `turn.relay.offload: ebpf`: its UDP listener on `listen`, relay sockets
/// on `relay`, peers allowed in `peers`.
async fn gateway(listen: SocketAddr, relay: IpAddr, peers: &str) -> Gateway {
    gateway_with(listen, relay, peers, DefaultFamily::Ipv4).await
}

/// [`gateway`] whose Allocates without a family get `family`'s relayed address.
async fn gateway_with(
    listen: SocketAddr,
    relay: IpAddr,
    peers: &str,
    family: DefaultFamily,
) -> Gateway {
    let mut cfg = config(Auth::Static, &[peers], 10);
    cfg.listeners
        .retain(|l| l.protocol == mediagate::config::TurnTransport::Udp);
    cfg.listeners[0].listen = listen;
    cfg.relay.address = relay.into();
    cfg.relay.default_family = family;
    cfg.relay.offload = mediagate::config::Offload::Ebpf;
    cfg.listeners.push(mediagate::config::TurnListenerConfig {
        protocol: mediagate::config::TurnTransport::Tcp,
        listen: "127.0.0.1:0".parse().unwrap(),
        cert: None,
        key: None,
        accept_proxy_protocol: false,
        trusted_proxies: Vec::new(),
    });
    Gateway::start(cfg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uclient_channels_are_relayed_by_the_kernel_without_loss() {
    root();
    let clients = Net::create("c", 215);
    let peers = Net::create("p", 216);
    // A specific listener address, relay sockets on 0.0.0.0 (the kernel learns the relay
    // address from the peer's first datagram).
    let gw = gateway(
        SocketAddr::new(clients.host, 0),
        "0.0.0.0".parse().unwrap(),
        &format!("{}/32", peers.inside),
    )
    .await;
    let peer_ip = peers.inside.to_string();
    let mut echo = tokio::process::Command::new("ip")
        .args(["netns", "exec", &peers.ns, &tool("turnutils_peer")])
        .args(["-L", &peer_ip, "-p", "3480"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("turnutils_peer");
    // The echo is up when it answers a datagram from the host.
    let probe = UdpSocket::bind(SocketAddr::new(peers.host, 0))
        .await
        .unwrap();
    let mut up = false;
    for _ in 0..50 {
        let _ = probe.send_to(b"ping", (peers.inside, 3480)).await;
        let mut b = [0u8; 16];
        if let Ok(Ok(_)) = timeout(Duration::from_millis(100), probe.recv_from(&mut b)).await {
            up = true;
            break;
        }
    }
    assert!(up, "turnutils_peer echoes");

    let port = gw.udp.port().to_string();
    let u = uclient_in(
        &clients.ns,
        &clients.host.to_string(),
        &[
            "-u", USER, "-w", PASSWORD, "-p", &port, "-e", &peer_ip, "-r", "3480", "-c", "-n",
            "400", "-l", "170", "-z", "2",
        ],
    )
    .await;
    let (sent, received) = (u.sent.unwrap_or(0), u.received.unwrap_or(0));
    // The kernel's counters are added at a scrape (mediagate's /metrics), here directly.
    mediagate::offload::refresh_metrics();
    let m = &gw.metrics;
    let (to_peer, to_client) = (m.packets_to_peer.get(), m.packets_to_client.get());
    let (k_peer, k_client) = (m.offload_to_peer.get(), m.offload_to_client.get());
    eprintln!(
        "uclient sent {sent}, received {received}; relayed to peer {to_peer} ({k_peer} by the kernel), to client {to_client} ({k_client} by the kernel)"
    );
    assert!(u.ok && sent >= 400, "uclient ran: {}", u.out);
    assert_eq!(received, sent, "no datagram lost: {}", u.out);
    assert!(
        to_peer >= sent && to_client >= sent,
        "every datagram counted"
    );
    assert!(
        k_peer * 2 >= sent && k_client * 2 >= sent,
        "most datagrams relayed by the kernel"
    );
    let _ = echo.kill().await;
    gw.svc.close().await;
    assert_eq!(
        m.offload_channels.get(),
        0,
        "channels removed with their allocations"
    );
}

/// Sends `data` as unpadded ChannelData on `channel` (what browsers send over UDP).
async fn channel_data(c: &mut RawClient, channel: u16, data: &[u8]) {
    let mut b = channel.to_be_bytes().to_vec();
    b.extend_from_slice(&(data.len() as u16).to_be_bytes());
    b.extend_from_slice(data);
    c.send_raw(&b).await;
}

/// The next ChannelData for the client, decoded: (channel, payload).
async fn next_channel_data(c: &mut RawClient) -> Option<(u16, Vec<u8>)> {
    loop {
        let raw = c.recv_raw(Duration::from_secs(2)).await?;
        if ChannelData::is_channel_data(&raw) {
            let mut cd = ChannelData {
                raw,
                ..Default::default()
            };
            cd.decode().ok()?;
            return Some((cd.number.0, cd.data));
        }
    }
}

/// Sends ChannelData on `channel` and a datagram from `peer` to `relay`: neither is
/// relayed (`when` names the case).
async fn nothing_relayed(
    c: &mut RawClient,
    channel: u16,
    peer: &UdpSocket,
    relay: SocketAddr,
    when: &str,
) {
    channel_data(c, channel, b"late").await;
    peer.send_to(b"late", relay).await.unwrap();
    let mut buf = [0u8; 64];
    assert!(
        timeout(Duration::from_millis(300), peer.recv_from(&mut buf))
            .await
            .is_err(),
        "nothing reaches the peer {when}"
    );
    assert_eq!(
        next_channel_data(c).await,
        None,
        "nothing reaches the client {when}"
    );
}

fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

/// Binds `channel` to `peer`: bound, and installed in the kernel.
async fn bind_installed(gw: &Gateway, c: &mut RawClient, channel: u16, peer: SocketAddr) {
    c.bind_channel(channel, peer).await;
    assert_eq!(gw.metrics.offload_channels.get(), 1, "channel installed");
}

/// The allocation ends: its channel leaves the kernel, nothing is relayed any more.
async fn end_allocation(
    gw: &Gateway,
    c: &mut RawClient,
    channel: u16,
    peer: &UdpSocket,
    relay: SocketAddr,
) {
    let r = c.request(METHOD_REFRESH, &[Attr::Lifetime(0)]).await;
    assert_eq!(code(&r), None);
    assert!(
        wait_until(Duration::from_secs(3), || gw.metrics.offload_channels.get()
            == 0)
        .await,
        "channel removed"
    );
    nothing_relayed(c, channel, peer, relay, "after the allocation ended").await;
}

/// On a channel just installed: the first datagram each way teaches the entries their
/// devices (through user space); then odd, tiny and large payloads, byte for byte, both
/// ways, every one of them relayed by the kernel.
async fn teach_then_exact_payloads(
    gw: &Gateway,
    c: &mut RawClient,
    channel: u16,
    peer: &UdpSocket,
    relay: SocketAddr,
) {
    let mut buf = vec![0u8; 4096];
    channel_data(c, channel, b"hello").await;
    let (n, from) = timeout(Duration::from_secs(2), peer.recv_from(&mut buf))
        .await
        .expect("peer gets the first datagram")
        .unwrap();
    assert_eq!((&buf[..n], from), (&b"hello"[..], relay));
    peer.send_to(b"welcome", relay).await.unwrap();
    assert_eq!(
        next_channel_data(c).await,
        Some((channel, b"welcome".to_vec()))
    );

    mediagate::offload::refresh_metrics();
    let before = (
        gw.metrics.offload_to_peer.get(),
        gw.metrics.offload_to_client.get(),
    );
    let sizes = [1usize, 3, 64, 333, 1200, 1400];
    for (i, &size) in sizes.iter().enumerate() {
        let up = payload(size, i as u8);
        channel_data(c, channel, &up).await;
        let (n, from) = timeout(Duration::from_secs(2), peer.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("peer gets {size} bytes"))
            .unwrap();
        assert_eq!(from, relay);
        assert_eq!(&buf[..n], &up[..], "{size} bytes to the peer");
        let down = payload(size, 0x80 | i as u8);
        peer.send_to(&down, relay).await.unwrap();
        assert_eq!(
            next_channel_data(c).await,
            Some((channel, down)),
            "{size} bytes to the client"
        );
    }
    mediagate::offload::refresh_metrics();
    let after = (
        gw.metrics.offload_to_peer.get(),
        gw.metrics.offload_to_client.get(),
    );
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (sizes.len() as u64, sizes.len() as u64),
        "every one of these relayed by the kernel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_payloads_both_ways_and_nothing_after_the_allocation_ends() {
    root();
    let clients = Net::create("d", 217);
    let peers = Net::create("q", 218);
    // A wildcard listener (the kernel learns which address the client used), relay
    // sockets on the peers' side address.
    let gw = gateway(
        "0.0.0.0:0".parse().unwrap(),
        peers.host,
        &format!("{}/32", peers.inside),
    )
    .await;
    let server = SocketAddr::new(clients.host, gw.udp.port());
    let mut c = RawClient::udp_socket(clients.socket(0), server, USER, PASSWORD);
    let relay = relayed(&c.allocate().await);
    let relay = SocketAddr::new(peers.host, relay.port());
    let peer = peers.tokio_socket(0);
    let other = peers.tokio_socket(0);
    let peer_addr = peer.local_addr().unwrap();
    bind_installed(&gw, &mut c, 0x4001, peer_addr).await;

    teach_then_exact_payloads(&gw, &mut c, 0x4001, &peer, relay).await;

    // A permitted peer IP from a port without a channel: a Data indication, from user
    // space.
    other.send_to(b"no channel", relay).await.unwrap();
    let raw = c
        .recv_raw(Duration::from_secs(2))
        .await
        .expect("a Data indication");
    let mut m = Message::new();
    m.raw = raw;
    m.decode().expect("STUN");
    assert_eq!(m.typ, MessageType::new(METHOD_DATA, CLASS_INDICATION));

    end_allocation(&gw, &mut c, 0x4001, &peer, relay).await;
    gw.svc.close().await;
}

/// IPv6 end to end: client, listener (`[::]`, a wildcard), relayed address and peer all
/// IPv6; the channel goes to `mg_turn_chan6`/`mg_turn_peer6` and exact payloads are
/// relayed by the kernel both ways; the allocation's end removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_channels_are_relayed_by_the_kernel_both_ways() {
    root();
    let clients = Net::create6("e", 219);
    let peers = Net::create6("r", 220);
    let gw = gateway_with(
        "[::]:0".parse().unwrap(),
        peers.host,
        &format!("{}/128", peers.inside),
        DefaultFamily::Keep,
    )
    .await;
    let server = SocketAddr::new(clients.host, gw.udp.port());
    let mut c = RawClient::udp_socket(clients.socket(0), server, USER, PASSWORD);
    let relay = relayed(&c.allocate().await);
    assert!(relay.is_ipv6(), "an IPv6 relayed address: {relay}");
    let relay = SocketAddr::new(peers.host, relay.port());
    let peer = peers.tokio_socket(0);
    let peer_addr = peer.local_addr().unwrap();
    bind_installed(&gw, &mut c, 0x4002, peer_addr).await;

    teach_then_exact_payloads(&gw, &mut c, 0x4002, &peer, relay).await;

    end_allocation(&gw, &mut c, 0x4002, &peer, relay).await;
    gw.svc.close().await;
}

/// Mixed families stay in user space: an IPv4 client with an IPv6 relayed address (and
/// peer) binds a channel, nothing is installed in the kernel, and user space relays both
/// ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_of_mixed_families_is_relayed_by_user_space() {
    root();
    let gw = gateway_with(
        "127.0.0.1:0".parse().unwrap(),
        "::1".parse().unwrap(),
        "::1/128",
        DefaultFamily::Ipv6,
    )
    .await;
    let mut c = RawClient::udp(gw.udp, USER, PASSWORD).await;
    let relay = relayed(&c.allocate().await);
    assert!(relay.is_ipv6(), "an IPv6 relayed address: {relay}");
    let peer = UdpSocket::bind("[::1]:0").await.unwrap();
    let r = c
        .request(
            METHOD_CHANNEL_BIND,
            &[
                Attr::Channel(0x4003),
                Attr::Peer(peer.local_addr().unwrap()),
            ],
        )
        .await;
    assert_eq!(code(&r), None, "channel bound");
    let mut buf = [0u8; 256];
    for i in 0..5u8 {
        channel_data(&mut c, 0x4003, &[i; 40]).await;
        let (n, from) = timeout(Duration::from_secs(2), peer.recv_from(&mut buf))
            .await
            .expect("the peer gets it")
            .unwrap();
        assert_eq!((&buf[..n], from.port()), (&[i; 40][..], relay.port()));
        peer.send_to(&[i | 0x80; 30], from).await.unwrap();
        assert_eq!(
            next_channel_data(&mut c).await,
            Some((0x4003, vec![i | 0x80; 30]))
        );
    }
    mediagate::offload::refresh_metrics();
    let m = &gw.metrics;
    assert_eq!(m.offload_channels.get(), 0, "nothing installed");
    assert_eq!(
        (m.offload_to_peer.get(), m.offload_to_client.get()),
        (0, 0),
        "nothing relayed by the kernel"
    );
    assert!(
        wait_until(Duration::from_secs(2), || m.packets_to_peer.get() >= 5
            && m.packets_to_client.get() >= 5)
        .await
    );
    gw.svc.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_the_policy_stops_allowing_leaves_the_kernel() {
    root();
    let clients = Net::create("f", 221);
    let peers = Net::create("s", 222);
    let gw = gateway(SocketAddr::new(clients.host, 0), peers.host, "upstreams").await;
    gw.policy.set_upstream_ips([peers.inside]);
    let server = SocketAddr::new(clients.host, gw.udp.port());
    let mut c = RawClient::udp_socket(clients.socket(0), server, USER, PASSWORD);
    let relay = relayed(&c.allocate().await);
    let peer = peers.tokio_socket(0);
    let r = c
        .request(
            METHOD_CHANNEL_BIND,
            &[
                Attr::Channel(0x4002),
                Attr::Peer(peer.local_addr().unwrap()),
            ],
        )
        .await;
    assert_eq!(code(&r), None, "channel bound");
    let mut buf = vec![0u8; 2048];
    // Learn both ways, then one datagram each way by the kernel.
    channel_data(&mut c, 0x4002, b"a").await;
    timeout(Duration::from_secs(2), peer.recv_from(&mut buf))
        .await
        .expect("peer gets a")
        .unwrap();
    peer.send_to(b"b", relay).await.unwrap();
    assert_eq!(
        next_channel_data(&mut c).await,
        Some((0x4002, b"b".to_vec()))
    );
    channel_data(&mut c, 0x4002, b"c").await;
    timeout(Duration::from_secs(2), peer.recv_from(&mut buf))
        .await
        .expect("peer gets c")
        .unwrap();
    mediagate::offload::refresh_metrics();
    assert!(
        gw.metrics.offload_to_peer.get() >= 1,
        "relayed by the kernel"
    );

    // The peer's upstream goes away (a reload, DNS): no longer a permitted peer.
    gw.policy.set_upstream_ips([]);
    assert!(
        wait_until(Duration::from_secs(3), || gw.metrics.offload_channels.get()
            == 0)
        .await,
        "the sweep removes the channel"
    );
    nothing_relayed(&mut c, 0x4002, &peer, relay, "with the refused peer").await;
    assert!(
        gw.metrics.permission_denied.get() >= 1,
        "user space refused the client's datagram"
    );
    gw.svc.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_program_stops_relaying_at_the_entrys_end() {
    root();
    let clients = Net::create("e", 219);
    let peers = Net::create("r", 220);
    let counters = TurnCounters::default();
    let errors = Default::default();
    let off = acquire_turn(&errors, counters.clone()).expect("fast path available");
    // No TURN server: plain sockets where the listener and the relay would be, so that
    // only the kernel can relay between the client and the peer.
    let listen = UdpSocket::bind(SocketAddr::new(clients.host, 0))
        .await
        .unwrap();
    let relay = UdpSocket::bind(SocketAddr::new(peers.host, 0))
        .await
        .unwrap();
    let (listen_addr, relay_addr) = (listen.local_addr().unwrap(), relay.local_addr().unwrap());
    let client = clients.tokio_socket(0);
    let peer = peers.tokio_socket(0);
    let (client_addr, peer_addr) = (client.local_addr().unwrap(), peer.local_addr().unwrap());
    let end = mediagate::offload::monotonic_ns() + 1_500_000_000;
    let entries = off
        .install(client_addr, listen_addr, relay_addr, peer_addr, 0x4abc, end)
        .expect("installed");
    let mut buf = [0u8; 2048];
    let cd = |data: &[u8]| {
        let mut b = 0x4abcu16.to_be_bytes().to_vec();
        b.extend_from_slice(&(data.len() as u16).to_be_bytes());
        b.extend_from_slice(data);
        b
    };
    // Learning: the client's datagram teaches the peer entry (and goes to the plain
    // listener socket), the peer's the channel entry (and is relayed).
    client.send_to(&cd(b"one"), listen_addr).await.unwrap();
    let (n, _) = timeout(Duration::from_secs(2), listen.recv_from(&mut buf))
        .await
        .expect("first datagram up to user space")
        .unwrap();
    assert_eq!(&buf[..n], &cd(b"one")[..]);
    peer.send_to(b"two", relay_addr).await.unwrap();
    let (n, from) = timeout(Duration::from_secs(2), client.recv_from(&mut buf))
        .await
        .expect("the kernel relays the peer's datagram")
        .unwrap();
    assert_eq!((&buf[..n], from), (&cd(b"two")[..], listen_addr));
    client.send_to(&cd(b"three"), listen_addr).await.unwrap();
    let (n, from) = timeout(Duration::from_secs(2), peer.recv_from(&mut buf))
        .await
        .expect("the kernel relays the client's datagram")
        .unwrap();
    assert_eq!((&buf[..n], from), (&b"three"[..], relay_addr));
    // Past the end, both go up to user space (the plain sockets), not across.
    let wait = end.saturating_sub(mediagate::offload::monotonic_ns());
    tokio::time::sleep(Duration::from_nanos(wait) + Duration::from_millis(50)).await;
    client.send_to(&cd(b"four"), listen_addr).await.unwrap();
    let (n, _) = timeout(Duration::from_secs(2), listen.recv_from(&mut buf))
        .await
        .expect("expired: the client's datagram goes up")
        .unwrap();
    assert_eq!(&buf[..n], &cd(b"four")[..]);
    peer.send_to(b"five", relay_addr).await.unwrap();
    let (n, _) = timeout(Duration::from_secs(2), relay.recv_from(&mut buf))
        .await
        .expect("expired: the peer's datagram goes up")
        .unwrap();
    assert_eq!(&buf[..n], b"five");
    // A refresh moves the end: relayed again.
    off.set_expiry(
        &entries,
        mediagate::offload::monotonic_ns() + 10_000_000_000,
    );
    peer.send_to(b"six", relay_addr).await.unwrap();
    let (n, _) = timeout(Duration::from_secs(2), client.recv_from(&mut buf))
        .await
        .expect("refreshed: relayed by the kernel again")
        .unwrap();
    assert_eq!(&buf[..n], &cd(b"six")[..]);
    off.remove(&entries);
    assert_eq!(counters.channels.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_clients_with_checksum_offload_are_relayed_by_the_kernel() {
    root();
    let gw = gateway(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1".parse().unwrap(),
        "127.0.0.1/32",
    )
    .await;
    let (_peer, port) = echo_peer().await;
    let (u, p) = (gw.udp.port().to_string(), port.to_string());
    let r = uclient(&[
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-p",
        &u,
        "-e",
        "127.0.0.1",
        "-r",
        &p,
        "-c",
        "-n",
        "200",
        "-z",
        "2",
    ])
    .await;
    assert!(r.ok, "{}", r.out);
    assert_eq!(r.received, r.sent, "{}", r.out);
    mediagate::offload::refresh_metrics();
    let m = &gw.metrics;
    let sent = r.sent.unwrap_or(0);
    assert!(sent >= 200 && m.packets_to_peer.get() >= sent, "{}", r.out);
    assert!(
        m.offload_to_peer.get() * 2 >= sent && m.offload_to_client.get() * 2 >= sent,
        "most datagrams relayed by the kernel: {} and {} of {sent}",
        m.offload_to_peer.get(),
        m.offload_to_client.get()
    );
    gw.svc.close().await;
}
