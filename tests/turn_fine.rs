//! The fine cases of the TURN service, with the `turn` crate's client and raw STUN
//! requests where the exact answer matters: Binding on every listener, Allocate/Refresh
//! lifetimes and deallocation (RFC 8656 §7; an ended allocation frees its relay port at
//! once, whatever a reader cached), expired REST credentials, the per-user
//! quota, channel rebinding rules, the peer policy following upstream changes, TCP
//! allocations ending with their connection, malformed input, and the bounded socket
//! buffers of TCP clients (`turn.relay.tcp_buffer`), and UDP clients spread over several
//! threads (`turn.relay.threads`), which end with the service.

mod turn_support;

use mediagate::turn::{AuthFailure, ephemeral_password, ephemeral_username};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use stun::message::*;
use tokio::net::UdpSocket;
use turn::client::{Client, ClientConfig};
use turn_support::*;
use webrtc_util::Conn;

async fn crate_client(server: SocketAddr, user: &str, password: &str) -> Client {
    let conn = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let c = Client::new(ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username: user.into(),
        password: password.into(),
        realm: REALM.into(),
        software: String::new(),
        rto_in_ms: 200,
        conn,
        vnet: None,
    })
    .await
    .expect("client");
    c.listen().await.expect("listen");
    c
}

fn binding_request(txid: u8) -> Vec<u8> {
    let mut b = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    b.extend_from_slice(&[txid; 12]);
    b
}

#[tokio::test]
async fn binding_is_answered_on_every_listener() {
    let gw = Gateway::start(config(Auth::Static, &["upstreams"], 10)).await;
    for mut c in [
        RawClient::udp(gw.udp, USER, PASSWORD).await,
        RawClient::tcp(gw.tcp, USER, PASSWORD).await,
    ] {
        c.send_raw(&binding_request(7)).await;
        let raw = c
            .recv_raw(Duration::from_secs(2))
            .await
            .expect("binding response");
        let mut m = Message::new();
        m.raw = raw;
        m.decode().unwrap();
        assert_eq!(m.typ, BINDING_SUCCESS);
        let mut x = stun::xoraddr::XorMappedAddress::default();
        x.get_from(&m).unwrap();
        assert_eq!(SocketAddr::new(x.ip, x.port), c.local_addr());
    }
    gw.svc.close().await;
}

#[tokio::test]
async fn allocate_refresh_lifetimes_and_deallocation() {
    let gw = Gateway::start(config(Auth::Static, &["127.0.0.1/32"], 10)).await;

    // Allocate lifetimes are clamped to default..max (600..3600 s).
    let mut a = RawClient::udp(gw.udp, USER, PASSWORD).await;
    let r = a
        .request(METHOD_ALLOCATE, &[Attr::Transport(17), Attr::Lifetime(30)])
        .await;
    assert_eq!(code(&r), None, "{r}");
    assert_eq!(lifetime(&r), 600);
    let mut b = RawClient::udp(gw.udp, USER, PASSWORD).await;
    let r = b
        .request(
            METHOD_ALLOCATE,
            &[Attr::Transport(17), Attr::Lifetime(7200)],
        )
        .await;
    assert_eq!(lifetime(&r), 3600);
    assert_eq!(relayed(&r).ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
    // A second Allocate on the same 5-tuple is 437; the retransmission of the first is
    // answered with the original response.
    let r = b.allocate().await;
    assert_eq!(code(&r), Some(437));
    // Unsupported transport.
    let mut c = RawClient::udp(gw.udp, USER, PASSWORD).await;
    assert_eq!(
        code(&c.request(METHOD_ALLOCATE, &[Attr::Transport(6)]).await),
        Some(442)
    );
    assert_eq!(code(&c.request(METHOD_ALLOCATE, &[]).await), Some(400));
    // Refresh without an allocation.
    assert_eq!(code(&c.request(METHOD_REFRESH, &[]).await), Some(437));
    assert_eq!(gw.svc.allocations(), 2);
    assert_eq!(gw.metrics.allocations.get(), 2);

    // Refresh: capped at 3600, then shortened to 1 s: the allocation expires.
    let r = a.request(METHOD_REFRESH, &[Attr::Lifetime(7200)]).await;
    assert_eq!((code(&r), lifetime(&r)), (None, 3600));
    let r = a.request(METHOD_REFRESH, &[Attr::Lifetime(1)]).await;
    assert_eq!((code(&r), lifetime(&r)), (None, 1));
    assert!(
        wait_until(Duration::from_secs(5), || gw.svc.allocations() == 1).await,
        "refreshed allocation did not expire"
    );
    assert_eq!(code(&a.request(METHOD_REFRESH, &[]).await), Some(437));

    // Lifetime 0 deletes at once.
    let r = b.request(METHOD_REFRESH, &[Attr::Lifetime(0)]).await;
    assert_eq!((code(&r), lifetime(&r)), (None, 0));
    assert_eq!(gw.svc.allocations(), 0);
    let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
    assert_eq!(
        code(
            &b.request(METHOD_CREATE_PERMISSION, &[Attr::Peer(peer)])
                .await
        ),
        Some(437)
    );

    // The same through the crate's client: close() sends Refresh with lifetime 0.
    let client = crate_client(gw.udp, USER, PASSWORD).await;
    let relay = client.allocate().await.expect("allocate");
    assert_eq!(gw.svc.allocations(), 1);
    relay.close().await.unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || gw.svc.allocations() == 0).await,
        "lifetime 0 from the crate client did not deallocate"
    );
    assert_eq!(gw.metrics.allocations.get(), 0);
    assert_eq!(gw.metrics.allocations_created.get(), 3);
    client.close().await.unwrap();
    gw.svc.close().await;
}

#[tokio::test]
async fn expired_and_malformed_rest_credentials_get_401() {
    let gw = Gateway::start(config(Auth::Ephemeral, &["127.0.0.1/32"], 10)).await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();

    let expired = ephemeral_username(now - 10, "dave");
    let password = ephemeral_password(SECRET, &expired);
    let mut raw = RawClient::udp(gw.udp, &expired, &password).await;
    assert_eq!(code(&raw.allocate().await), Some(401));
    assert_eq!(gw.metrics.auth_failures_total(AuthFailure::Expired), 1);

    let client = crate_client(gw.udp, &expired, &password).await;
    let err = client
        .allocate()
        .await
        .err()
        .expect("expired credential refused");
    assert!(err.to_string().contains("401"), "{err}");
    assert_eq!(gw.metrics.auth_failures_total(AuthFailure::Expired), 2);

    let mut bad = RawClient::udp(gw.udp, "dave", &ephemeral_password(SECRET, "dave")).await;
    assert_eq!(code(&bad.allocate().await), Some(401));
    assert_eq!(gw.metrics.auth_failures_total(AuthFailure::BadUsername), 1);

    // The same user with a valid expiry works.
    let valid = ephemeral_username(now + 60, "dave");
    let mut ok = RawClient::udp(gw.udp, &valid, &ephemeral_password(SECRET, &valid)).await;
    assert_eq!(code(&ok.allocate().await), None);
    assert_eq!(gw.metrics.allocations_created.get(), 1);
    client.close().await.unwrap();
    gw.svc.close().await;
}

#[tokio::test]
async fn quota_exceeded_gets_486_until_an_allocation_ends() {
    let gw = Gateway::start(config(Auth::Static, &["127.0.0.1/32"], 2)).await;
    let c1 = crate_client(gw.udp, USER, PASSWORD).await;
    let c2 = crate_client(gw.udp, USER, PASSWORD).await;
    let c3 = crate_client(gw.udp, USER, PASSWORD).await;
    let r1 = c1.allocate().await.expect("first");
    let _r2 = c2.allocate().await.expect("second");
    let err = c3.allocate().await.err().expect("third is over quota");
    assert!(err.to_string().contains("486"), "{err}");
    assert_eq!(gw.metrics.quota_exceeded.get(), 1);
    assert_eq!(gw.svc.allocations(), 2);

    r1.close().await.unwrap();
    assert!(wait_until(Duration::from_secs(3), || gw.svc.allocations() == 1).await);
    let c4 = crate_client(gw.udp, USER, PASSWORD).await;
    let _r4 = c4.allocate().await.expect("quota released");
    assert_eq!(gw.svc.allocations(), 2);
    for c in [c1, c2, c3, c4] {
        c.close().await.unwrap();
    }
    gw.svc.close().await;
}

#[tokio::test]
async fn channel_binding_rules_and_data_both_ways() {
    let gw = Gateway::start(config(Auth::Static, &["127.0.0.1/32"], 10)).await;
    let peer_a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sink_b = Sink::bind("127.0.0.1:0").await;
    let a = peer_a.local_addr().unwrap();
    let mut c = RawClient::udp(gw.udp, USER, PASSWORD).await;
    let relay = relayed(&c.allocate().await);

    let bind = |n: u16, p: SocketAddr| [Attr::Channel(n), Attr::Peer(p)];
    assert_eq!(
        code(&c.request(METHOD_CHANNEL_BIND, &bind(0x4000, a)).await),
        None
    );
    // Refreshing the same binding is fine.
    assert_eq!(
        code(&c.request(METHOD_CHANNEL_BIND, &bind(0x4000, a)).await),
        None
    );
    // The channel is taken by another peer, the peer by another channel.
    assert_eq!(
        code(
            &c.request(METHOD_CHANNEL_BIND, &bind(0x4000, sink_b.addr))
                .await
        ),
        Some(400)
    );
    assert_eq!(
        code(&c.request(METHOD_CHANNEL_BIND, &bind(0x4001, a)).await),
        Some(400)
    );
    // Outside the channel range, or without a peer.
    assert_eq!(
        code(
            &c.request(METHOD_CHANNEL_BIND, &bind(0x3FFF, sink_b.addr))
                .await
        ),
        Some(400)
    );
    assert_eq!(
        code(
            &c.request(METHOD_CHANNEL_BIND, &[Attr::Channel(0x4002)])
                .await
        ),
        Some(400)
    );
    // A second channel for another peer.
    assert_eq!(
        code(
            &c.request(METHOD_CHANNEL_BIND, &bind(0x4001, sink_b.addr))
                .await
        ),
        None
    );

    c.channel_data(0x4000, b"to-a").await;
    let mut buf = [0u8; 64];
    let (n, from) = tokio::time::timeout(Duration::from_secs(2), peer_a.recv_from(&mut buf))
        .await
        .expect("data reaches peer A")
        .unwrap();
    assert_eq!((&buf[..n], from), (&b"to-a"[..], relay));
    c.channel_data(0x4001, b"to-b").await;
    assert!(wait_until(Duration::from_secs(2), || sink_b.count() == 1).await);

    // Peer A answers: the client gets ChannelData on 0x4000.
    peer_a.send_to(b"from-a", relay).await.unwrap();
    let got = c
        .recv_raw(Duration::from_secs(2))
        .await
        .expect("ChannelData from A");
    assert_eq!(&got[..2], &[0x40, 0x00]);
    assert_eq!(&got[4..10], b"from-a");
    // Counted right after the send: the datagram may arrive first.
    assert!(
        wait_until(Duration::from_secs(2), || gw.metrics.bytes_to_peer.get()
            == 8
            && gw.metrics.bytes_to_client.get() == 6)
        .await,
        "to peer {} bytes, to client {}",
        gw.metrics.bytes_to_peer.get(),
        gw.metrics.bytes_to_client.get()
    );
    gw.svc.close().await;
}

#[tokio::test]
async fn peer_policy_follows_the_upstreams() {
    let gw = Gateway::start(config(Auth::Static, &["upstreams"], 10)).await;
    // An "upstream server" on this host's own address: allowed only while listed.
    let addr = TestAddr::create();
    let ip = addr.ip;
    let upstream = UdpSocket::bind((ip, 0)).await.unwrap();
    let up = upstream.local_addr().unwrap();
    let loopback = Sink::bind("127.0.0.1:0").await;
    let metadata: SocketAddr = "169.254.169.254:80".parse().unwrap();

    let mut c = RawClient::udp(gw.udp, USER, PASSWORD).await;
    let relay = relayed(&c.allocate().await);
    let m = &gw.metrics;
    // Not an upstream yet: 403, counted.
    assert_eq!(
        code(&c.request(METHOD_CREATE_PERMISSION, &[Attr::Peer(up)]).await),
        Some(403)
    );
    assert_eq!(m.permission_denied.get(), 1);
    // Loopback and metadata are refused even when listed as upstreams.
    gw.policy
        .set_upstream_ips([ip, "127.0.0.1".parse().unwrap(), metadata.ip()]);
    let r = c
        .request(
            METHOD_CREATE_PERMISSION,
            &[Attr::Peer(up), Attr::Peer(loopback.addr)],
        )
        .await;
    assert_eq!(code(&r), Some(403), "one refused peer refuses the request");
    let r = c
        .request(
            METHOD_CHANNEL_BIND,
            &[Attr::Channel(0x4005), Attr::Peer(metadata)],
        )
        .await;
    assert_eq!(code(&r), Some(403));
    c.send_indication(loopback.addr, b"nope").await;
    assert!(wait_until(Duration::from_secs(2), || m.permission_denied.get() == 4).await);

    // Listed: permission, channel and data flow.
    c.bind_channel(0x4000, up).await;
    c.channel_data(0x4000, b"hello").await;
    let mut buf = [0u8; 64];
    let (n, from) = tokio::time::timeout(Duration::from_secs(2), upstream.recv_from(&mut buf))
        .await
        .expect("upstream receives")
        .unwrap();
    assert_eq!((&buf[..n], from), (&b"hello"[..], relay));

    // Removed from the upstreams: the existing channel and Send indications stop at once,
    // and replies from it are not relayed to the client.
    gw.policy
        .set_upstream_ips(["198.51.100.77".parse().unwrap()]);
    c.channel_data(0x4000, b"late").await;
    c.send_indication(up, b"late").await;
    upstream.send_to(b"reply", relay).await.unwrap();
    assert!(wait_until(Duration::from_secs(2), || m.permission_denied.get() == 6).await);
    assert!(wait_until(Duration::from_secs(2), || m.peer_not_allowed_total() == 1).await);
    let late = tokio::time::timeout(Duration::from_millis(300), upstream.recv_from(&mut buf)).await;
    assert!(late.is_err(), "a removed upstream received data");
    assert!(
        c.recv_raw(Duration::from_millis(200)).await.is_none(),
        "a reply was relayed"
    );
    assert_eq!(m.packets_to_peer.get(), 1);
    assert_eq!(loopback.count(), 0);

    // The crate's client sees the refusal as a failed send.
    let client = crate_client(gw.udp, USER, PASSWORD).await;
    let rc = client.allocate().await.unwrap();
    assert!(rc.send_to(b"x", loopback.addr).await.is_err());
    assert_eq!(loopback.count(), 0);
    client.close().await.unwrap();
    gw.svc.close().await;
}

#[tokio::test]
async fn tcp_allocation_ends_with_its_connection() {
    let gw = Gateway::start(config(Auth::Static, &["127.0.0.1/32"], 10)).await;
    let mut c = RawClient::tcp(gw.tcp, USER, PASSWORD).await;
    assert_eq!(code(&c.allocate().await), None);
    assert_eq!(gw.svc.allocations(), 1);
    drop(c);
    assert!(
        wait_until(Duration::from_secs(3), || gw.svc.allocations() == 0).await,
        "allocation outlived its TCP connection"
    );
    gw.svc.close().await;
}

#[tokio::test]
async fn malformed_packets_are_dropped_and_counted() {
    let gw = Gateway::start(config(Auth::Static, &["127.0.0.1/32"], 10)).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut lying = binding_request(1);
    lying[3] = 8; // claims 8 bytes of attributes that are not there
    let mut bad_attr = binding_request(2);
    bad_attr[3] = 8;
    bad_attr.extend_from_slice(&[0x00, 0x06, 0xFF, 0xFF, 1, 2, 3, 4]); // attribute overruns
    let mut response = binding_request(3);
    response[1] = 0x01;
    response[0] = 0x01; // Binding success response from a client
    let mut bad_mi = binding_request(4);
    bad_mi[1] = 0x03; // Allocate request with a 4-byte MESSAGE-INTEGRITY
    bad_mi[3] = 8;
    bad_mi.extend_from_slice(&[0x00, 0x08, 0x00, 0x04, 0, 0, 0, 0]);
    let garbage: Vec<Vec<u8>> = vec![
        vec![0xFF; 40],
        vec![],
        vec![0x00, 0x01],
        lying,
        bad_attr,
        response,
        vec![0x40, 0x00, 0xFF, 0xFF, 1, 2, 3, 4], // ChannelData longer than the datagram
        vec![0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4], // ChannelData without an allocation
    ];
    for g in &garbage {
        sock.send_to(g, gw.udp).await.unwrap();
    }
    sock.send_to(&bad_mi, gw.udp).await.unwrap();
    let m = &gw.metrics;
    assert!(
        wait_until(Duration::from_secs(2), || m.malformed_total() == 7).await,
        "malformed counted: {}",
        m.malformed_total()
    );
    // The bad MESSAGE-INTEGRITY is a malformed credential: 400, counted as an auth failure.
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
        .await
        .expect("an answer to the Allocate")
        .unwrap();
    let mut resp = Message::new();
    resp.raw = buf[..n].to_vec();
    resp.decode().unwrap();
    assert_eq!(code(&resp), Some(400), "{resp}");

    // TCP: a stream that is not STUN (here a TLS ClientHello) is closed and counted.
    let mut t = tokio::net::TcpStream::connect(gw.tcp).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    t.write_all(&[
        0x16, 0x03, 0x01, 0x00, 0x2e, 0x01, 0x00, 0x00, 0x2a, 0x03, 0x03,
    ])
    .await
    .unwrap();
    let mut b = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(2), t.read(&mut b)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "connection not closed: {closed:?}"
    );
    assert_eq!(m.malformed_total(), 8);

    // The service still works.
    let mut c = RawClient::udp(gw.udp, USER, PASSWORD).await;
    assert_eq!(code(&c.allocate().await), None);
    gw.svc.close().await;
}

/// The server side's socket buffers of the connection from `client`, as the kernel shows
/// them (`ss -tm`: `rb` receive, `tb` send).
fn server_buffers(server: SocketAddr, client: SocketAddr) -> Option<(u64, u64)> {
    let out = std::process::Command::new("ss")
        .args([
            "-tmnH",
            "state",
            "established",
            &format!(
                "( sport = :{} and dport = :{} )",
                server.port(),
                client.port()
            ),
        ])
        .output()
        .expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        let at = text.find(&format!(",{name}"))? + name.len() + 1;
        let digits: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.parse().ok()
    };
    Some((field("rb")?, field("tb")?))
}

#[tokio::test]
async fn tcp_client_buffers_are_bounded_by_tcp_buffer() {
    // The kernel doubles what it is given (bookkeeping), and caps it at rmem_max/wmem_max.
    for (set, shown) in [(32_768usize, 65_536u64), (20_000, 40_000)] {
        let mut cfg = config(Auth::Static, &["127.0.0.1/32"], 10);
        cfg.relay.tcp_buffer = set;
        let gw = Gateway::start(cfg).await;
        let mut c = RawClient::tcp(gw.tcp, USER, PASSWORD).await;
        assert_eq!(code(&c.allocate().await), None);
        let (rb, tb) = server_buffers(gw.tcp, c.local_addr()).expect("the server's socket");
        assert_eq!((rb, tb), (shown, shown), "tcp_buffer {set}");
        gw.svc.close().await;
    }
}

/// Whether anything still holds UDP `addr` (a bind to it fails).
fn udp_port_held(addr: SocketAddr) -> bool {
    std::net::UdpSocket::bind(addr).is_err()
}

#[tokio::test]
async fn an_ended_allocation_frees_its_relay_port_at_once() {
    let gw = Gateway::start(config(Auth::Static, &["127.0.0.1/32"], 10)).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut c = RawClient::udp(gw.udp, USER, PASSWORD).await;
    let relay = relayed(&c.allocate().await);
    let bind = [
        Attr::Channel(0x4000),
        Attr::Peer(peer.local_addr().unwrap()),
    ];
    assert_eq!(code(&c.request(METHOD_CHANNEL_BIND, &bind).await), None);
    // Data through the listener's reader: it caches the route to this allocation.
    c.channel_data(0x4000, b"cached").await;
    let mut buf = [0u8; 64];
    tokio::time::timeout(Duration::from_secs(2), peer.recv_from(&mut buf))
        .await
        .expect("data reaches the peer")
        .unwrap();
    assert!(udp_port_held(relay), "the live allocation holds {relay}");

    // Deallocate; the client sends nothing more, so the reader's cached route is never
    // looked at again: it must not keep the relay socket (descriptor and port) open.
    let r = c.request(METHOD_REFRESH, &[Attr::Lifetime(0)]).await;
    assert_eq!(code(&r), None);
    assert!(
        wait_until(Duration::from_secs(3), || !udp_port_held(relay)).await,
        "the relay port {relay} is still bound after the allocation ended"
    );
    gw.svc.close().await;
}

/// The names of this process's threads.
/// A UDP peer on loopback that answers every datagram to its sender (with `tag`, the
/// answer starts with the sender's address and `|`): its address and its task.
async fn udp_echo(tag: bool, gw: &Gateway) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    // The gateway's own ports are never peers, whatever the protocol: an ephemeral UDP
    // port that happens to be its TCP listener's would be refused (403) as a loop.
    let mut peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    while peer.local_addr().unwrap().port() == gw.tcp.port() {
        peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    }
    let addr = peer.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 256];
        while let Ok((n, from)) = peer.recv_from(&mut buf).await {
            let mut out = if tag {
                format!("{from}|").into_bytes()
            } else {
                Vec::new()
            };
            out.extend_from_slice(&buf[..n]);
            let _ = peer.send_to(&out, from).await;
        }
    });
    (addr, task)
}

/// Sends `msg` on channel 0x4000 and returns the payload of the ChannelData that comes
/// back on it within `within`.
async fn channel_echo(c: &mut RawClient, msg: &str, within: Duration, who: &str) -> String {
    c.channel_data(0x4000, msg.as_bytes()).await;
    let got = c
        .recv_raw(within)
        .await
        .unwrap_or_else(|| panic!("{who} gets its echo"));
    assert_eq!(&got[..2], &[0x40, 0x00], "{who}");
    let len = u16::from_be_bytes([got[2], got[3]]) as usize;
    String::from_utf8_lossy(&got[4..4 + len]).into_owned()
}

fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
                .map(|s| s.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// `turn.relay.threads: 3`: the UDP listener is a group of three sockets, one per thread;
/// 40 clients (spread over them by the kernel) each relay both ways through their own
/// allocation, and closing the service ends the threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_clients_on_every_thread_are_relayed_and_the_threads_end_with_the_service() {
    let mut cfg = config(Auth::Static, &["127.0.0.1/32"], 100);
    cfg.relay.threads = 3;
    let gw = Gateway::start(cfg).await;
    let shard_threads = || {
        let mut t: Vec<String> = thread_names()
            .into_iter()
            .filter(|n| n.starts_with("turn-udp-"))
            .collect();
        t.sort();
        t
    };
    // A spawned thread names itself once it runs: wait for the names, not only the spawn.
    let want = ["turn-udp-0", "turn-udp-1", "turn-udp-2"];
    assert!(
        wait_until(Duration::from_secs(3), || shard_threads() == want).await,
        "threads: {:?}",
        shard_threads()
    );
    // One echo peer for all: it answers each relayed address with what it got.
    let (peer_addr, echo) = udp_echo(false, &gw).await;
    let mut clients = Vec::new();
    for _ in 0..40 {
        let mut c = RawClient::udp(gw.udp, USER, PASSWORD).await;
        c.allocate().await;
        c.bind_channel(0x4000, peer_addr).await;
        clients.push(c);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let msg = format!("client {i}");
        let who = format!("client {i}");
        assert_eq!(
            channel_echo(c, &msg, Duration::from_secs(2), &who).await,
            msg
        );
    }
    assert_eq!(gw.metrics.allocations.get(), 40);
    gw.svc.close().await;
    echo.abort();
    assert!(
        wait_until(Duration::from_secs(3), || shard_threads().is_empty()).await,
        "threads left: {:?}",
        shard_threads()
    );
}

/// Allocates that arrive at once on every UDP thread and TCP connection each get their
/// own relay: no 508, no two clients on one relayed address, and what a client sends
/// leaves from its own relayed address and comes back to it alone. (Each allocation's
/// relay state used to be handed over in one slot of the relay factory, "the last one
/// created", which concurrent Allocates overwrote: a 508 for one client, and another
/// client's relay for the other. Chromium's two peer connections hit it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_allocates_each_get_their_own_relay() {
    let mut cfg = config(Auth::Static, &["127.0.0.1/32"], 1000);
    cfg.relay.threads = 4;
    let gw = Gateway::start(cfg).await;
    // The peer answers every datagram with the address it came from, then the payload.
    let (peer_addr, echo) = udp_echo(true, &gw).await;
    // Every client is kept to the end: a new client bound to the UDP port of an earlier
    // one would meet that one's allocation (same 5-tuple) instead of a challenge.
    let mut kept = Vec::new();
    for round in 0..4 {
        // The challenge first, so that the authenticated Allocates all go out together.
        let mut clients = Vec::new();
        for i in 0..32 {
            let mut c = if i % 2 == 0 {
                RawClient::udp(gw.udp, USER, PASSWORD).await
            } else {
                RawClient::tcp(gw.tcp, USER, PASSWORD).await
            };
            let r = c.request(METHOD_REFRESH, &[Attr::Lifetime(0)]).await;
            assert_eq!(code(&r), Some(437), "the challenge is answered");
            clients.push(c);
        }
        let tasks: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                tokio::spawn(async move {
                    let r = c.allocate().await;
                    (i, c, r)
                })
            })
            .collect();
        let mut relays = std::collections::HashSet::new();
        for t in tasks {
            let (i, mut c, r) = t.await.unwrap();
            assert_eq!(code(&r), None, "round {round}, client {i}: allocated");
            let relay = relayed(&r);
            assert!(relays.insert(relay), "round {round}: {relay} given twice");
            c.bind_channel(0x4000, peer_addr).await;
            let msg = format!("round {round} client {i}");
            let who = format!("round {round}, client {i}");
            assert_eq!(
                channel_echo(&mut c, &msg, Duration::from_secs(3), &who).await,
                format!("{relay}|{msg}"),
                "{who}: sent from its own relay, answered to it"
            );
            kept.push(c);
        }
    }
    echo.abort();
    gw.svc.close().await;
}
