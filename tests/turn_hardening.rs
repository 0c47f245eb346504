//! TURN hardening (issue 11) through the real `mediagate run`: relays never reach the
//! gateway's own ports, partial TCP frames and idle TCP connections are bounded in memory,
//! time and number, EVEN-PORT reservations count against the quota and expire on their
//! own, and a global allocation cap answers 508. Every attack runs next to an existing
//! relayed flow that must keep working and a `/healthz` probe that must keep answering.

mod common;
mod turn_support;

use common::*;
use std::net::SocketAddr;
use std::time::Duration;
use stun::attributes::*;
use stun::message::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};
use turn_support::{
    Attr, PASSWORD, RawClient, USER, code, collect, data_indication, metric, relayed,
};

/// The partial-frame test holds thousands of ephemeral TCP ports; a balancer started by
/// another test meanwhile could find its TURN TCP port taken. It runs alone (write lock),
/// the others share the read lock.
static PORTS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A balancer with a TURN service (UDP and TCP on one port) and, optionally, a UDP proxy
/// listener in front of `worker`.
struct Gateway {
    b: Balancer,
    turn: SocketAddr,
    proxy: SocketAddr,
    relay_first: u16,
    worker: SocketAddr,
    _worker: Proc,
}

impl Gateway {
    fn start(quota: &str) -> Gateway {
        let (turn_port, admin, proxy_port) =
            (free_udp_and_tcp_port(), free_tcp_port(), free_udp_port());
        let worker_addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
        let w = worker("udp-echo", "w1", worker_addr, None);
        let relay_first = turn_support::relay_range_below_ephemeral();
        let yaml = format!(
            r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - {{ name: media, protocol: udp, listen: "127.0.0.1:{proxy_port}", upstream: media }}
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
    peers: ["127.0.0.0/8"]
  quota: {quota}
"#,
            relay_first + 299
        );
        let b = Balancer::start(&yaml, admin);
        Gateway {
            b,
            turn: SocketAddr::from(([127, 0, 0, 1], turn_port)),
            proxy: SocketAddr::from(([127, 0, 0, 1], proxy_port)),
            relay_first,
            worker: worker_addr,
            _worker: w,
        }
    }

    fn pid(&self) -> i32 {
        self.b.proc.pid().as_raw()
    }

    fn metric(&self, name: &str) -> f64 {
        metric(&self.b.metrics(), name)
    }
}

/// A port free for both UDP and TCP on 127.0.0.1 (TURN listens on both).
fn free_udp_and_tcp_port() -> u16 {
    for _ in 0..100 {
        let p = free_udp_port();
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no port free for both UDP and TCP");
}

/// A relayed flow to the echo worker: allocated and permitted, checked with `check`.
struct Flow {
    c: RawClient,
    worker: SocketAddr,
    seq: u32,
}

impl Flow {
    async fn start(g: &Gateway) -> Flow {
        let mut c = RawClient::udp(g.turn, USER, PASSWORD).await;
        let a = c.allocate().await;
        assert_eq!(code(&a), None, "flow allocation: {a}");
        let p = c
            .request(METHOD_CREATE_PERMISSION, &[Attr::Peer(g.worker)])
            .await;
        assert_eq!(code(&p), None, "flow permission: {p}");
        let mut f = Flow {
            c,
            worker: g.worker,
            seq: 0,
        };
        f.check("before").await;
        f
    }

    /// Sends 20 datagrams through the relay; the worker's echoes must come back.
    async fn check(&mut self, when: &str) {
        let mut answered = 0;
        for _ in 0..20 {
            self.seq += 1;
            let payload = format!("flow-{}", self.seq);
            self.c
                .send_indication(self.worker, payload.as_bytes())
                .await;
            let want = format!("w1|{payload}").into_bytes();
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                let Some(raw) = self.c.recv_raw(left).await else {
                    break;
                };
                if data_indication(&raw).is_some_and(|(_, d)| d == want) {
                    answered += 1;
                    break;
                }
            }
            sleep(Duration::from_millis(10)).await;
        }
        assert!(
            answered >= 19,
            "the existing relayed flow lost {} of 20 datagrams ({when})",
            20 - answered
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_never_reach_the_gateways_own_ports() {
    let _ports = PORTS.read().await;
    let g = Gateway::start("{ allocations_per_user: 10 }");
    let health = HealthWatch::start(g.b.admin);
    let mut flow = Flow::start(&g).await;

    let mut a = RawClient::udp(g.turn, USER, PASSWORD).await;
    assert_eq!(code(&a.allocate().await), None);
    let mut b = RawClient::udp(g.turn, USER, PASSWORD).await;
    let b_alloc = b.allocate().await;
    assert_eq!(code(&b_alloc), None);
    let relay_b = relayed(&b_alloc);
    assert!(relay_b.port() >= g.relay_first);

    // Both may reach the worker (127.0.0.0/8 is listed), which also opens 127.0.0.1 for
    // datagrams on either relay (permissions are per IP).
    for c in [&mut a, &mut b] {
        let p = c
            .request(METHOD_CREATE_PERMISSION, &[Attr::Peer(g.worker)])
            .await;
        assert_eq!(code(&p), None, "the worker is an allowed peer: {p}");
    }

    let turn_listener = g.turn;
    let admin = g.b.admin;
    let own = [
        ("the TURN listener", turn_listener),
        ("another allocation's relay", relay_b),
        (
            "a free port of the relay range",
            SocketAddr::from(([127, 0, 0, 1], g.relay_first + 299)),
        ),
        ("the UDP proxy listener", g.proxy),
        ("the admin port", admin),
    ];
    let before = g.metric("mediagate_turn_loop_refused_total");
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
    let refused = g.metric("mediagate_turn_loop_refused_total") - before;
    assert!(refused >= 10.0, "loop refusals counted: {refused}");

    // Per datagram: the permission for 127.0.0.1 exists, yet a Send indication to the
    // proxy listener (which would hand it to the worker and loop the echo back) or to B's
    // relay is dropped.
    a.send_indication(g.proxy, b"through-the-proxy").await;
    a.send_indication(relay_b, b"relay-to-relay").await;
    let got_a = collect(&mut a, Duration::from_secs(1)).await;
    assert!(
        got_a.is_empty(),
        "a datagram looped through the gateway's own proxy listener: {got_a:?}"
    );
    let got_b = collect(&mut b, Duration::from_millis(300)).await;
    assert!(
        got_b.is_empty(),
        "a datagram went from one relay to another: {got_b:?}"
    );

    flow.check("after").await;
    health.finish().assert_healthy("during the attack");
}

/// Raises RLIMIT_NOFILE (inherited by the balancer started afterwards) for 3,000+ sockets.
fn raise_nofile(want: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < want {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard);
    }
}

/// The first `total` bytes announce a STUN Binding request of `len` body bytes.
fn partial_stun(len: u16, send: usize) -> Vec<u8> {
    let mut b = vec![0u8; 20 + send];
    b[0..2].copy_from_slice(&0x0001u16.to_be_bytes());
    b[2..4].copy_from_slice(&len.to_be_bytes());
    b[4..8].copy_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
    b
}

/// Opens `n` TCP connections to `addr`, each sending `bytes` (write errors ignored: the
/// server may close first).
async fn park(addr: SocketAddr, n: usize, bytes: &[u8]) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let _ = timeout(Duration::from_secs(2), s.write_all(bytes)).await;
        conns.push(s);
    }
    conns
}

/// How many of `conns` the server has closed (EOF or reset) within `within`.
async fn closed_by_server(conns: &mut [TcpStream], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let mut closed = 0;
    for s in conns.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut buf = [0u8; 64];
        match timeout(left.max(Duration::from_millis(1)), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    closed
}

const CONNS: usize = 3000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_tcp_frames_are_bounded_and_freed() {
    let _ports = PORTS.write().await;
    raise_nofile(20_000);
    // All connections come from 127.0.0.1: the per-source caps (turn_per_source.rs) are
    // lifted so that the frame, allocation and idle limits are what closes them.
    let g = Gateway::start(
        "{ allocations_per_user: 10, max_connections_per_source: 100000, \
           max_handshakes_per_source: 100000, handshake_timeout: 60s }",
    );
    let pid = g.pid();
    let health = HealthWatch::start(g.b.admin);
    let mut flow = Flow::start(&g).await;
    let rss_before = rss_kib(pid);
    let fds_before = open_fds(pid);
    let started = Instant::now();

    // Connections that never send anything and never allocate.
    let mut idle = park(g.turn, 50, &[]).await;

    // The reported attack: an almost complete 64 KiB frame per unauthenticated connection.
    let big = partial_stun(65532, 60_000);
    let mut attack = park(g.turn, CONNS, &big).await;
    sleep(Duration::from_secs(1)).await;
    let rss_big = rss_kib(pid);
    let fds_big = open_fds(pid);
    flow.check("during the 64 KiB frames").await;
    let oversized = closed_by_server(&mut attack, Duration::from_secs(10)).await;
    drop(attack);

    // Small partial frames (under the 4 KiB limit for connections without an
    // allocation): kept only for the frame timeout.
    let small = partial_stun(4000, 3000);
    let mut parked = park(g.turn, CONNS, &small).await;
    sleep(Duration::from_secs(1)).await;
    let rss_small = rss_kib(pid);
    let fds_small = open_fds(pid);
    flow.check("during the partial frames").await;
    let parked_at = Instant::now();
    let timed_out = closed_by_server(&mut parked, Duration::from_secs(40)).await;
    let frame_close = parked_at.elapsed();
    drop(parked);
    let idle_closed = closed_by_server(&mut idle, Duration::from_secs(45)).await;
    let idle_close = started.elapsed();
    drop(idle);

    // Everything closed: memory and descriptors come back.
    let mut rss_after = rss_kib(pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rss_after > rss_before + 16 * 1024 && Instant::now() < deadline {
        sleep(Duration::from_millis(200)).await;
        rss_after = rss_kib(pid);
    }
    // The server counts a connection out just after closing it.
    turn_support::wait_until(Duration::from_secs(5), || {
        metric(&g.b.metrics(), "mediagate_turn_tcp_connections") == 0.0
    })
    .await;
    let fds_after = open_fds(pid);
    let text = g.b.metrics();
    eprintln!(
        "RSS KiB before {rss_before}, 64KiB-frames {rss_big}, partial-frames {rss_small}, after {rss_after}; \
         fds before {fds_before}, 64KiB {fds_big}, partial {fds_small}, after {fds_after}; \
         oversized closed {oversized}/{CONNS}, partial closed {timed_out}/{CONNS} within {frame_close:?}, \
         idle closed {idle_closed}/50 after {idle_close:?}"
    );

    assert_eq!(
        oversized, CONNS,
        "64 KiB frames before an allocation are refused"
    );
    assert!(
        rss_big < rss_before + 48 * 1024,
        "3,000 parked 64 KiB frames cost {} KiB",
        rss_big - rss_before
    );
    assert!(
        rss_small < rss_before + 64 * 1024,
        "3,000 parked partial frames cost {} KiB",
        rss_small - rss_before
    );
    assert_eq!(timed_out, CONNS, "partial frames time out");
    assert!(
        frame_close < Duration::from_secs(25),
        "partial frames were held {frame_close:?}"
    );
    assert_eq!(
        idle_closed, 50,
        "connections without an allocation are closed"
    );
    assert!(
        rss_after <= rss_before + 16 * 1024,
        "RSS did not come back: {rss_before} KiB before, {rss_after} KiB after"
    );
    assert!(
        fds_after <= fds_before + 5,
        "fds {fds_before} -> {fds_after}"
    );
    assert!(
        metric(
            &text,
            "mediagate_turn_tcp_closed_total{reason=\"oversized_frame\"}"
        ) >= CONNS as f64
    );
    assert!(
        metric(
            &text,
            "mediagate_turn_tcp_closed_total{reason=\"frame_timeout\"}"
        ) >= CONNS as f64
    );
    assert!(
        metric(
            &text,
            "mediagate_turn_tcp_closed_total{reason=\"no_allocation\"}"
        ) >= 50.0
    );
    assert_eq!(metric(&text, "mediagate_turn_tcp_connections"), 0.0);

    flow.check("after").await;
    health.finish().assert_healthy("during the attack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_tcp_connections_are_capped() {
    let _ports = PORTS.read().await;
    // One source (127.0.0.1): the per-source caps are lifted to reach the global one.
    let g = Gateway::start(
        "{ allocations_per_user: 10, max_tcp_connections: 100, \
           max_connections_per_source: 1000, max_handshakes_per_source: 1000 }",
    );
    let health = HealthWatch::start(g.b.admin);
    let mut flow = Flow::start(&g).await;
    let pid = g.pid();
    let fds_before = open_fds(pid);

    let mut conns = park(g.turn, 150, &[]).await;
    sleep(Duration::from_millis(500)).await;
    let fds_during = open_fds(pid);
    let refused = closed_by_server(&mut conns, Duration::from_secs(3)).await;
    flow.check("during").await;
    eprintln!("fds before {fds_before}, during {fds_during}; refused {refused}/150");
    assert_eq!(
        refused, 50,
        "connections beyond max_tcp_connections are closed"
    );
    assert!(
        fds_during <= fds_before + 105,
        "fds {fds_before} -> {fds_during}"
    );
    let text = g.b.metrics();
    assert_eq!(
        metric(&text, "mediagate_turn_tcp_closed_total{reason=\"limit\"}"),
        50.0
    );
    assert_eq!(metric(&text, "mediagate_turn_tcp_connections"), 100.0);

    // A TCP client that comes when room is made is served.
    drop(conns);
    let ok = turn_support::wait_until(Duration::from_secs(10), || {
        metric(&g.b.metrics(), "mediagate_turn_tcp_connections") == 0.0
    })
    .await;
    assert!(ok, "closed connections are released");
    let mut t = RawClient::tcp(g.turn, USER, PASSWORD).await;
    assert_eq!(code(&t.allocate().await), None);
    health.finish().assert_healthy("during the attack");
}

/// EVEN-PORT with the R bit (reserve the next port too).
fn even_port_r() -> Attr {
    Attr::Raw(ATTR_EVEN_PORT.value(), vec![0x80])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn even_port_reservations_count_against_the_quota_and_expire() {
    let _ports = PORTS.read().await;
    const QUOTA: usize = 4;
    let g = Gateway::start(&format!("{{ allocations_per_user: {QUOTA} }}"));
    let pid = g.pid();
    let health = HealthWatch::start(g.b.admin);
    let fds_before = open_fds(pid);

    // One credential: allocate with EVEN-PORT R=1, delete the allocation, again.
    let (mut ok, mut quota) = (0, 0);
    let flood = Instant::now();
    for _ in 0..200 {
        let mut c = RawClient::udp(g.turn, USER, PASSWORD).await;
        let r = c
            .request(METHOD_ALLOCATE, &[Attr::Transport(17), even_port_r()])
            .await;
        match code(&r) {
            None => {
                ok += 1;
                let d = c.request(METHOD_REFRESH, &[Attr::Lifetime(0)]).await;
                assert_eq!(code(&d), None, "{d}");
            }
            Some(486) => quota += 1,
            other => panic!("unexpected answer {other:?}: {r}"),
        }
    }
    let flood_took = flood.elapsed();
    sleep(Duration::from_millis(300)).await;
    let fds_during = open_fds(pid);
    let reserved = g.metric("mediagate_turn_reserved_ports");
    eprintln!(
        "EVEN-PORT flood: {ok} allocated, {quota} refused with 486 in {flood_took:?}; \
         reserved ports {reserved}; fds {fds_before} -> {fds_during}"
    );
    assert!(
        ok < QUOTA,
        "{ok} EVEN-PORT allocations with a quota of {QUOTA}"
    );
    assert!(
        reserved <= QUOTA as f64 && reserved >= 1.0,
        "reserved ports {reserved}"
    );
    assert!(
        fds_during <= fds_before + QUOTA + 2,
        "reserved ports escaped the quota: fds {fds_before} -> {fds_during}"
    );
    assert!(g.metric("mediagate_turn_quota_exceeded_total") >= quota as f64);

    // Without any further Allocate, the reservations go after ~30 s.
    let expired = turn_support::wait_until(Duration::from_secs(45), || {
        metric(&g.b.metrics(), "mediagate_turn_reserved_ports") == 0.0
    })
    .await;
    let fds_after = open_fds(pid);
    eprintln!("reservations expired: {expired}; fds after {fds_after}");
    assert!(expired, "reservations did not expire on their own");
    assert!(
        fds_after <= fds_before + 1,
        "fds {fds_before} -> {fds_after}"
    );

    // And the quota is free again.
    let mut c = RawClient::udp(g.turn, USER, PASSWORD).await;
    let r = c
        .request(METHOD_ALLOCATE, &[Attr::Transport(17), even_port_r()])
        .await;
    assert_eq!(code(&r), None, "{r}");
    health.finish().assert_healthy("during the attack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_allocation_cap_answers_508() {
    let _ports = PORTS.read().await;
    let g = Gateway::start("{ allocations_per_user: 100, max_allocations: 5 }");
    let health = HealthWatch::start(g.b.admin);
    let mut flow = Flow::start(&g).await; // one of the five

    let mut held = Vec::new();
    let mut codes = Vec::new();
    for _ in 0..8 {
        let mut c = RawClient::udp(g.turn, USER, PASSWORD).await;
        let r = c.allocate().await;
        codes.push(code(&r));
        held.push(c);
    }
    assert_eq!(
        codes,
        [
            None,
            None,
            None,
            None,
            Some(508),
            Some(508),
            Some(508),
            Some(508)
        ],
        "four more allocations fit under max_allocations: 5"
    );
    assert_eq!(g.metric("mediagate_turn_capacity_exceeded_total"), 4.0);
    flow.check("at the cap").await;

    // A reservation needs room too; deleting an allocation makes room.
    let d = held[0].request(METHOD_REFRESH, &[Attr::Lifetime(0)]).await;
    assert_eq!(code(&d), None);
    let mut c = RawClient::udp(g.turn, USER, PASSWORD).await;
    let r = c
        .request(METHOD_ALLOCATE, &[Attr::Transport(17), even_port_r()])
        .await;
    assert_eq!(
        code(&r),
        Some(508),
        "allocation + reservation need two units: {r}"
    );
    let r = c.allocate().await;
    assert_eq!(code(&r), None, "{r}");
    health.finish().assert_healthy("during the attack");
}

/// A TCP client that never reads while its peer floods it: the gateway buffers a bounded
/// amount for it and drops the rest, counted as `client_backpressure`; another TCP
/// client fed between the flood's bursts still gets every one of its datagrams, and the
/// stalled connection is still served once it reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_client_that_does_not_read_loses_its_own_frames_only() {
    let _ports = PORTS.read().await;
    let g = Gateway::start("{ allocations_per_user: 10 }");
    let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let mut relays = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut c = RawClient::tcp(g.turn, USER, PASSWORD).await;
        let a = c.allocate().await;
        assert_eq!(code(&a), None, "allocation: {a}");
        let p = c
            .request(METHOD_CREATE_PERMISSION, &[Attr::Peer(peer_addr)])
            .await;
        assert_eq!(code(&p), None, "permission: {p}");
        relays.push(relayed(&a));
        clients.push(c);
    }
    let (mut stalled, mut good) = (clients.remove(0), clients.remove(0));

    // 40 bursts of 500 x 1000 B (20 MB) towards the stalled client, far beyond its
    // outbox and the kernel's buffers; one datagram to the good client after each burst.
    let blob = vec![0xAB; 1000];
    let dropped = "mediagate_turn_dropped_packets_total{reason=\"client_backpressure\"}";
    for i in 0..40u32 {
        for _ in 0..500 {
            let _ = peer.send_to(&blob, relays[0]).await;
        }
        peer.send_to(format!("good-{i}").as_bytes(), relays[1])
            .await
            .unwrap();
        sleep(Duration::from_millis(5)).await;
    }
    wait_until_async(
        Duration::from_secs(5),
        "frames to a client that does not read dropped",
        || g.metric(dropped) > 0.0,
    )
    .await;

    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while got < 40 && Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(raw) = good.recv_raw(left).await else {
            break;
        };
        if let Some((from, d)) = data_indication(&raw) {
            assert_eq!(from, peer_addr);
            assert_eq!(d, format!("good-{got}").into_bytes(), "in order, none lost");
            got += 1;
        }
    }
    assert_eq!(got, 40, "the other TCP client lost datagrams");

    // The stalled client reads again: what was buffered arrives as whole frames, then
    // new datagrams go through again.
    let mut drained = 0;
    while let Some(raw) = stalled.recv_raw(Duration::from_millis(500)).await {
        let (_, d) = data_indication(&raw).expect("whole Data indications only");
        assert_eq!(d, blob);
        drained += 1;
    }
    assert!(drained > 0, "nothing was buffered for the stalled client");
    peer.send_to(b"after", relays[0]).await.unwrap();
    let raw = stalled.recv_raw(Duration::from_secs(2)).await;
    let seen_new = raw
        .and_then(|r| data_indication(&r))
        .is_some_and(|(_, d)| d == b"after");
    assert!(
        seen_new,
        "the stalled client was not served after reading again"
    );
}
