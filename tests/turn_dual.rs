//! Dual-stack TURN (RFC 8656 §7.2): `turn.relay.address` with one IPv4 and one IPv6
//! address; an Allocate's REQUESTED-ADDRESS-FAMILY picks the family of its relayed
//! address (440 when that family has no relay address), ADDITIONAL-ADDRESS-FAMILY asks for
//! an IPv6 relayed address beside the IPv4 one (two XOR-RELAYED-ADDRESS, two quota units),
//! and permissions, channels and data follow the peer's family (443 for a family the
//! allocation has no relayed address of). The client is the tests' raw STUN client; peers
//! are plain sockets on 127.0.0.1 and ::1.

mod turn_support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use stun::message::*;
use tokio::net::UdpSocket;
use turn_support::{Attr, Auth, Gateway, PASSWORD, RawClient, USER, code, config};

const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
const ADDRESS_ERROR_CODE: u16 = 0x8001;
const XOR_RELAYED_ADDRESS: u16 = 0x0016;
const IPV6: [u8; 4] = [2, 0, 0, 0];

/// A gateway relaying from `relay` (e.g. "127.0.0.1,::1") to peers on loopback.
async fn gateway(relay: &str, quota: usize) -> Gateway {
    let mut cfg = config(Auth::Static, &["127.0.0.1/32", "::1/128"], quota);
    cfg.relay.address = relay.parse().unwrap();
    Gateway::start(cfg).await
}

/// Every attribute of type `typ` in a message, in order.
fn attrs(m: &Message, typ: u16) -> Vec<Vec<u8>> {
    m.attributes
        .0
        .iter()
        .filter(|a| a.typ.value() == typ)
        .map(|a| a.value.clone())
        .collect()
}

/// An XOR-…-ADDRESS value decoded (RFC 8489 §14.2).
fn xor_addr(v: &[u8], txid: &[u8; 12]) -> SocketAddr {
    let port = u16::from_be_bytes([v[2], v[3]]) ^ 0x2112;
    let mut key = vec![0x21, 0x12, 0xA4, 0x42];
    key.extend_from_slice(txid);
    let ip: IpAddr = match v[1] {
        1 => {
            let b: [u8; 4] = std::array::from_fn(|i| v[4 + i] ^ key[i]);
            b.into()
        }
        _ => {
            let b: [u8; 16] = std::array::from_fn(|i| v[4 + i] ^ key[i]);
            b.into()
        }
    };
    SocketAddr::new(ip, port)
}

fn relayed_all(m: &Message) -> Vec<SocketAddr> {
    attrs(m, XOR_RELAYED_ADDRESS)
        .iter()
        .map(|v| xor_addr(v, &m.transaction_id.0))
        .collect()
}

/// The (channel, payload) of a ChannelData frame.
fn channel_data(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    if raw.len() < 4 || raw[0] & 0xC0 != 0x40 {
        return None;
    }
    let len = u16::from_be_bytes([raw[2], raw[3]]) as usize;
    Some((
        u16::from_be_bytes([raw[0], raw[1]]),
        raw.get(4..4 + len)?.to_vec(),
    ))
}

/// The next datagram on `peer` within 3 s: its payload and source.
async fn peer_recv(peer: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 2048];
    let (n, from) = tokio::time::timeout(Duration::from_secs(3), peer.recv_from(&mut buf))
        .await
        .expect("the peer receives within 3 s")
        .unwrap();
    (buf[..n].to_vec(), from)
}

/// ChannelData frames the client receives within 3 s until `want` are all seen.
async fn client_channels(c: &mut RawClient, want: &[(u16, &[u8])]) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut missing: Vec<(u16, Vec<u8>)> = want.iter().map(|(n, d)| (*n, d.to_vec())).collect();
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(raw) = c.recv_raw(left).await else {
            return false;
        };
        if let Some(got) = channel_data(&raw) {
            missing.retain(|w| *w != got);
        }
    }
    true
}

#[tokio::test]
async fn requested_address_family_ipv6_gets_an_ipv6_relay_that_relays() {
    let g = gateway("127.0.0.1,::1", 10).await;
    let mut c = RawClient::udp(g.udp, USER, PASSWORD).await;
    let r = c
        .request(
            METHOD_ALLOCATE,
            &[
                Attr::Transport(17),
                Attr::Raw(REQUESTED_ADDRESS_FAMILY, IPV6.to_vec()),
            ],
        )
        .await;
    assert_eq!(code(&r), None, "IPv6 Allocate succeeds: {r}");
    let relays = relayed_all(&r);
    assert_eq!(relays.len(), 1);
    let relay6 = relays[0];
    assert_eq!(relay6.ip(), "::1".parse::<IpAddr>().unwrap());
    assert!((61000..=64999).contains(&relay6.port()));

    // An IPv4 peer has no relayed address of its family: 443.
    let peer4 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let r = c
        .request(
            METHOD_CREATE_PERMISSION,
            &[Attr::Peer(peer4.local_addr().unwrap())],
        )
        .await;
    assert_eq!(code(&r), Some(443));

    // The gateway's own IPv6 relay ports are no peers (no relay loops).
    let r = c
        .request(METHOD_CREATE_PERMISSION, &[Attr::Peer(relay6)])
        .await;
    assert_eq!(code(&r), Some(403));

    // An IPv6 peer: ChannelData both ways through [::1]:relay.
    let peer6 = UdpSocket::bind("[::1]:0").await.unwrap();
    let p6 = peer6.local_addr().unwrap();
    c.bind_channel(0x4001, p6).await;
    c.channel_data(0x4001, b"to-v6").await;
    let (d, from) = peer_recv(&peer6).await;
    assert_eq!((d.as_slice(), from), (&b"to-v6"[..], relay6));
    peer6.send_to(b"from-v6", relay6).await.unwrap();
    assert!(client_channels(&mut c, &[(0x4001, b"from-v6")]).await);
    g.svc.close().await;
}

#[tokio::test]
async fn a_dual_allocation_relays_both_families_and_takes_two_quota_units() {
    // Quota 3: one dual allocation (2 units) and one single (1 unit), no more.
    let g = gateway("127.0.0.1,::1", 3).await;
    let mut c = RawClient::udp(g.udp, USER, PASSWORD).await;
    let dual = [
        Attr::Transport(17),
        Attr::Raw(ADDITIONAL_ADDRESS_FAMILY, IPV6.to_vec()),
    ];
    let r = c.request(METHOD_ALLOCATE, &dual).await;
    assert_eq!(code(&r), None, "dual Allocate succeeds: {r}");
    assert!(attrs(&r, ADDRESS_ERROR_CODE).is_empty());
    let relays = relayed_all(&r);
    assert_eq!(relays.len(), 2, "two XOR-RELAYED-ADDRESS: {relays:?}");
    let (relay4, relay6) = (relays[0], relays[1]);
    assert!(relay4.is_ipv4() && relay6.is_ipv6(), "{relays:?}");
    assert_eq!(g.svc.allocations(), 1);

    let peer4 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer6 = UdpSocket::bind("[::1]:0").await.unwrap();
    let (p4, p6) = (peer4.local_addr().unwrap(), peer6.local_addr().unwrap());
    // One CreatePermission with a peer of each family.
    let r = c
        .request(METHOD_CREATE_PERMISSION, &[Attr::Peer(p4), Attr::Peer(p6)])
        .await;
    assert_eq!(code(&r), None, "{r}");
    // Send indications: each family leaves from its own relayed address.
    c.send_indication(p4, b"send-v4").await;
    c.send_indication(p6, b"send-v6").await;
    assert_eq!(peer_recv(&peer4).await, (b"send-v4".to_vec(), relay4));
    assert_eq!(peer_recv(&peer6).await, (b"send-v6".to_vec(), relay6));
    // Channels, one per family.
    for (n, p) in [(0x4000, p4), (0x4001, p6)] {
        c.bind_channel(n, p).await;
    }
    c.channel_data(0x4000, b"cd-v4").await;
    c.channel_data(0x4001, b"cd-v6").await;
    assert_eq!(peer_recv(&peer4).await, (b"cd-v4".to_vec(), relay4));
    assert_eq!(peer_recv(&peer6).await, (b"cd-v6".to_vec(), relay6));
    peer4.send_to(b"back-v4", relay4).await.unwrap();
    peer6.send_to(b"back-v6", relay6).await.unwrap();
    assert!(client_channels(&mut c, &[(0x4000, b"back-v4"), (0x4001, b"back-v6")]).await);

    // The dual allocation holds two of the three units: another dual one is refused.
    let mut c2 = RawClient::udp(g.udp, USER, PASSWORD).await;
    let r = c2.request(METHOD_ALLOCATE, &dual).await;
    assert_eq!(code(&r), Some(486), "{r}");
    let r = c2.allocate().await;
    assert_eq!(code(&r), None, "a single allocation fits: {r}");
    // Deleting the dual allocation gives both units back.
    let r = c.request(METHOD_REFRESH, &[Attr::Lifetime(0)]).await;
    assert_eq!(code(&r), None);
    let mut c3 = RawClient::udp(g.udp, USER, PASSWORD).await;
    let r = c3.request(METHOD_ALLOCATE, &dual).await;
    assert_eq!(code(&r), None, "units given back: {r}");
    assert_eq!(relayed_all(&r).len(), 2);
    // Refresh 0 with REQUESTED-ADDRESS-FAMILY IPv6 deletes the IPv6 half alone: IPv6
    // peers get 443 from then on, IPv4 ones still work, and one unit is given back.
    let r = c3
        .request(
            METHOD_REFRESH,
            &[
                Attr::Lifetime(0),
                Attr::Raw(REQUESTED_ADDRESS_FAMILY, IPV6.to_vec()),
            ],
        )
        .await;
    assert_eq!(code(&r), None, "{r}");
    let r = c3
        .request(METHOD_CREATE_PERMISSION, &[Attr::Peer(p6)])
        .await;
    assert_eq!(code(&r), Some(443));
    let r = c3
        .request(METHOD_CREATE_PERMISSION, &[Attr::Peer(p4)])
        .await;
    assert_eq!(code(&r), None, "the IPv4 half lives on: {r}");
    let mut c4 = RawClient::udp(g.udp, USER, PASSWORD).await;
    assert_eq!(code(&c4.allocate().await), None, "one unit given back");
    let mut c5 = RawClient::udp(g.udp, USER, PASSWORD).await;
    assert_eq!(code(&c5.allocate().await), Some(486), "and only one");
    g.svc.close().await;
}

#[tokio::test]
async fn a_family_without_a_relay_address_gets_440() {
    let g = gateway("127.0.0.1", 10).await;
    let mut c = RawClient::udp(g.udp, USER, PASSWORD).await;
    let r = c
        .request(
            METHOD_ALLOCATE,
            &[
                Attr::Transport(17),
                Attr::Raw(REQUESTED_ADDRESS_FAMILY, IPV6.to_vec()),
            ],
        )
        .await;
    assert_eq!(code(&r), Some(440));
    // ADDITIONAL-ADDRESS-FAMILY: the IPv4 allocation, and ADDRESS-ERROR-CODE 440 for IPv6.
    let r = c
        .request(
            METHOD_ALLOCATE,
            &[
                Attr::Transport(17),
                Attr::Raw(ADDITIONAL_ADDRESS_FAMILY, IPV6.to_vec()),
            ],
        )
        .await;
    assert_eq!(code(&r), None, "{r}");
    assert_eq!(relayed_all(&r).len(), 1);
    let e = attrs(&r, ADDRESS_ERROR_CODE);
    assert_eq!(e.len(), 1);
    assert_eq!(&e[0][..4], &[2, 0, 4, 40]);
    // An IPv6 peer on an IPv4-only allocation: 443.
    let r = c
        .request(
            METHOD_CREATE_PERMISSION,
            &[Attr::Peer("[::1]:40000".parse().unwrap())],
        )
        .await;
    assert_eq!(code(&r), Some(443));
    g.svc.close().await;

    // IPv6 only: a default (IPv4) Allocate gets 440; both family attributes at once 400.
    let g = gateway("::1", 10).await;
    let mut c = RawClient::udp(g.udp, USER, PASSWORD).await;
    assert_eq!(code(&c.allocate().await), Some(440));
    let r = c
        .request(
            METHOD_ALLOCATE,
            &[
                Attr::Transport(17),
                Attr::Raw(REQUESTED_ADDRESS_FAMILY, IPV6.to_vec()),
                Attr::Raw(ADDITIONAL_ADDRESS_FAMILY, IPV6.to_vec()),
            ],
        )
        .await;
    assert_eq!(code(&r), Some(400));
    g.svc.close().await;
}

/// Echoes every datagram on `sock` back to its sender until the test ends; counts those
/// that came from a relay port (61000-64999) in `relayed`.
fn echo(sock: UdpSocket, relayed: Arc<AtomicUsize>) {
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            if (61000..=64999).contains(&from.port()) {
                relayed.fetch_add(1, Ordering::Relaxed);
            }
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
}

/// An echo peer on [::1]:P and P+1 (uclient's RTP and RTCP peers); returns P.
async fn echo_peer6(relayed: &Arc<AtomicUsize>) -> u16 {
    for _ in 0..50 {
        let a = UdpSocket::bind("[::1]:0").await.unwrap();
        let p = a.local_addr().unwrap().port();
        if p == u16::MAX {
            continue;
        }
        if let Ok(b) = UdpSocket::bind(("::1", p + 1)).await {
            echo(a, Arc::clone(relayed));
            echo(b, Arc::clone(relayed));
            return p;
        }
    }
    panic!("no free port pair on ::1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coturn_uclient_relays_over_ipv6() {
    let mut cfg = config(Auth::Static, &["::1/128"], 10);
    cfg.relay.address = "127.0.0.1,::1".parse().unwrap();
    for l in &mut cfg.listeners {
        l.listen = "[::1]:0".parse().unwrap();
    }
    let g = Gateway::start(cfg).await;
    let relayed = Arc::new(AtomicUsize::new(0));
    let peer = echo_peer6(&relayed).await.to_string();
    let port = g.udp.port().to_string();
    // -x: REQUESTED-ADDRESS-FAMILY IPv6; the client reaches the gateway on ::1 too.
    let args = [
        "-x", "-e", "::1", "-r", &peer, "-u", USER, "-w", PASSWORD, "-n", "20", "-z", "5", "-p",
        &port, "::1",
    ];
    let out = tokio::time::timeout(
        Duration::from_secs(40),
        tokio::process::Command::new(turn_support::tool("turnutils_uclient"))
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("turnutils_uclient finished in time")
    .expect("turnutils_uclient runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "uclient failed:\n{text}");
    let m = &g.metrics;
    assert!(m.allocations_created.get() >= 2, "{text}");
    assert!(
        m.bytes_to_peer.get() >= 20 * 100,
        "to peer {}",
        m.bytes_to_peer.get()
    );
    assert!(
        m.bytes_to_client.get() >= 20 * 100,
        "to client {}",
        m.bytes_to_client.get()
    );
    // The echo peer listens on ::1 only: what it got came from IPv6 relayed addresses.
    let got = relayed.load(Ordering::Relaxed);
    assert!(
        got >= 20,
        "the IPv6 peer got {got} datagrams from relay ports"
    );
    g.svc.close().await;
}

#[tokio::test]
async fn a_dual_allocation_over_tcp_relays_the_ipv6_peer_back_on_the_connection() {
    let g = gateway("127.0.0.1,::1", 10).await;
    let mut c = RawClient::tcp(g.tcp, USER, PASSWORD).await;
    let r = c
        .request(
            METHOD_ALLOCATE,
            &[
                Attr::Transport(17),
                Attr::Raw(ADDITIONAL_ADDRESS_FAMILY, IPV6.to_vec()),
            ],
        )
        .await;
    assert_eq!(code(&r), None, "{r}");
    let relay6 = relayed_all(&r)[1];
    let peer6 = UdpSocket::bind("[::1]:0").await.unwrap();
    let p6 = peer6.local_addr().unwrap();
    c.bind_channel(0x4002, p6).await;
    c.channel_data(0x4002, b"tcp-v6").await;
    assert_eq!(peer_recv(&peer6).await, (b"tcp-v6".to_vec(), relay6));
    peer6.send_to(b"tcp-back", relay6).await.unwrap();
    assert!(client_channels(&mut c, &[(0x4002, b"tcp-back")]).await);
    g.svc.close().await;
}
