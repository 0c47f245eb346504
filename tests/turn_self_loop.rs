//! `turn.relay.peers: [upstreams, self, <CIDR covering the gateway>]` through the real
//! `mediagate run` (issue 24, item 1): `self` opens the relayed addresses of live
//! allocations (relay-to-relay between two clients of this gateway works) and nothing
//! else — a relay never reaches the gateway's own TURN listener (no nested Allocate is
//! answered), a free relay port, or its UDP/TCP proxy listeners, although the CIDR covers
//! their address. Refusals are counted in the existing peer-policy metrics.

mod common;
mod turn_support;

use common::*;
use std::net::SocketAddr;
use std::time::Duration;
use stun::message::*;
use turn_support::{Attr, PASSWORD, RawClient, USER, code, collect, metric, relayed};

/// A port free for both UDP and TCP on 127.0.0.1.
fn free_udp_and_tcp_port() -> u16 {
    for _ in 0..100 {
        let p = free_udp_port();
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no port free for both UDP and TCP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_opens_relays_but_never_the_gateways_own_listeners() {
    let (turn_port, admin, udp_proxy, tcp_proxy) = (
        free_udp_and_tcp_port(),
        free_tcp_port(),
        free_udp_port(),
        free_tcp_port(),
    );
    let worker_addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let _w = worker("udp-echo", "w1", worker_addr, None);
    let relay_first = turn_support::relay_range_below_ephemeral();
    // 127.0.0.0/8 plays the part of `10.0.0.0/8` on a gateway at 10.x: a CIDR that covers
    // the gateway's own address (loopback needs a CIDR inside it to be named at all).
    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - {{ name: media, protocol: udp, listen: "127.0.0.1:{udp_proxy}", upstream: media }}
  - {{ name: signalling, protocol: tcp, listen: "127.0.0.1:{tcp_proxy}", upstream: media }}
upstreams:
  media:
    primary: ["{worker_addr}"]
    health: {{ type: udp, send: ping, interval: 200ms, timeout: 200ms }}
turn:
  realm: mediagate
  public_address: 127.0.0.1
  listeners:
    - {{ protocol: udp, listen: "127.0.0.1:{turn_port}" }}
    - {{ protocol: tcp, listen: "127.0.0.1:{turn_port}" }}
  auth:
    type: static
    users: [{{ username: {USER}, password: {PASSWORD} }}]
  relay:
    address: 127.0.0.1
    port_range: {relay_first}-{}
    peers: [upstreams, self, "127.0.0.0/8"]
"#,
        relay_first + 299
    );
    let b = Balancer::start(&yaml, admin);
    let turn = SocketAddr::from(([127, 0, 0, 1], turn_port));

    let mut a = RawClient::udp(turn, USER, PASSWORD).await;
    let a_alloc = a.allocate().await;
    assert_eq!(code(&a_alloc), None, "{a_alloc}");
    let relay_a = relayed(&a_alloc);
    let mut c = RawClient::udp(turn, USER, PASSWORD).await;
    let c_alloc = c.allocate().await;
    assert_eq!(code(&c_alloc), None, "{c_alloc}");
    let relay_c = relayed(&c_alloc);

    // Relay-to-relay between two allocations of this gateway: what `self` is for.
    for (cl, peer) in [(&mut a, relay_c), (&mut c, relay_a)] {
        let p = cl
            .request(METHOD_CREATE_PERMISSION, &[Attr::Peer(peer)])
            .await;
        assert_eq!(code(&p), None, "permission to the other relay {peer}: {p}");
    }
    a.send_indication(relay_c, b"relay-to-relay").await;
    let got = collect(&mut c, Duration::from_secs(2)).await;
    assert!(
        got.iter()
            .any(|(from, d)| *from == relay_a && d == b"relay-to-relay"),
        "relay-to-relay with self: {got:?}"
    );

    let own = [
        ("the TURN listener", turn),
        (
            "a free port of the relay range",
            SocketAddr::from(([127, 0, 0, 1], relay_first + 299)),
        ),
        (
            "the UDP proxy listener",
            SocketAddr::from(([127, 0, 0, 1], udp_proxy)),
        ),
        (
            "the TCP proxy listener",
            SocketAddr::from(([127, 0, 0, 1], tcp_proxy)),
        ),
        ("the admin port", b.admin),
    ];
    let loops_before = metric(&b.metrics(), "mediagate_turn_loop_refused_total");
    let denied_before = metric(&b.metrics(), "mediagate_turn_permission_denied_total");
    for (what, addr) in own {
        let p = a
            .request(METHOD_CREATE_PERMISSION, &[Attr::Peer(addr)])
            .await;
        assert_eq!(
            code(&p),
            Some(403),
            "CreatePermission to {what} {addr}: {p}"
        );
        let cb = a
            .request(
                METHOD_CHANNEL_BIND,
                &[Attr::Channel(0x4001), Attr::Peer(addr)],
            )
            .await;
        assert_eq!(code(&cb), Some(403), "ChannelBind to {what} {addr}: {cb}");
    }

    // Per datagram: A holds a permission for 127.0.0.1 (the other relay's IP), yet a
    // nested Allocate sent to the TURN listener through the relay draws no answer, and a
    // datagram to the UDP proxy listener (which would reach the echo worker and come
    // back) is dropped.
    let mut nested = Message::new();
    nested
        .build(&[
            Box::new(stun::agent::TransactionId::new()),
            Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
            Box::new(turn::proto::reqtrans::RequestedTransport {
                protocol: turn::proto::PROTO_UDP,
            }),
        ])
        .unwrap();
    a.send_indication(turn, &nested.raw).await;
    a.send_indication(SocketAddr::from(([127, 0, 0, 1], udp_proxy)), b"loop")
        .await;
    let got = collect(&mut a, Duration::from_secs(1)).await;
    assert!(
        got.is_empty(),
        "a datagram reached one of the gateway's own listeners through the relay: {got:?}"
    );

    let text = b.metrics();
    let loops = metric(&text, "mediagate_turn_loop_refused_total") - loops_before;
    let denied = metric(&text, "mediagate_turn_permission_denied_total") - denied_before;
    eprintln!("loop refusals {loops}, permission denials {denied}");
    assert!(loops >= 12.0, "loop refusals counted: {loops}");
    assert!(denied >= 12.0, "refusals counted as denied too: {denied}");
}
