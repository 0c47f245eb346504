//! Headless mode (`relay.peers: [self]`): two clients relay to each other through the
//! gateway, each using the other's relayed address as its peer, with the `turn` crate's
//! client. Anything that is not a live allocation of this gateway stays refused, and a
//! relayed address stops being a valid peer when its allocation ends.

mod turn_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;
use turn::client::{Client, ClientConfig};
use turn_support::*;
use webrtc_util::Conn;

async fn client(server: SocketAddr) -> Client {
    let conn = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let c = Client::new(ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username: USER.into(),
        password: PASSWORD.into(),
        realm: REALM.into(),
        software: String::new(),
        rto_in_ms: 200,
        conn,
        vnet: None,
    })
    .await
    .unwrap();
    c.listen().await.unwrap();
    c
}

async fn recv(conn: &impl Conn, within: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 1500];
    let (n, from) = tokio::time::timeout(within, conn.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some((buf[..n].to_vec(), from))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_relay_to_each_other() {
    let gw = Gateway::start(config(Auth::Static, &["self"], 10)).await;
    let (ca, cb) = (client(gw.udp).await, client(gw.udp).await);
    let a = ca.allocate().await.expect("allocate A");
    let b = cb.allocate().await.expect("allocate B");
    let (ra, rb) = (a.local_addr().unwrap(), b.local_addr().unwrap());

    // B lets A in (its first send creates the permission), then A talks to B.
    b.send_to(b"hello-from-b", ra).await.expect("B -> A");
    let mut from_a = None;
    for i in 0..20 {
        a.send_to(format!("ping {i}").as_bytes(), rb)
            .await
            .expect("A -> B");
        if let Some(got) = recv(&b, Duration::from_millis(200)).await {
            from_a = Some(got);
            break;
        }
    }
    let (data, from) = from_a.expect("B receives from A through the gateway");
    assert!(data.starts_with(b"ping"), "{data:?}");
    assert_eq!(from, ra, "B sees A's relayed address");
    b.send_to(b"pong", ra).await.unwrap();
    let mut got_pong = false;
    for _ in 0..10 {
        match recv(&a, Duration::from_millis(300)).await {
            Some((d, f)) if d == b"pong" && f == rb => {
                got_pong = true;
                break;
            }
            Some(_) => continue,
            None => break,
        }
    }
    assert!(got_pong, "A receives B's reply");

    // Not a relay of this gateway: refused. (The crate's client keys permissions by IP
    // and already holds one for 127.0.0.1, so it sends a Send indication / ChannelBind
    // without waiting: the gateway refuses and counts them.)
    let outsider = Sink::bind("127.0.0.1:0").await;
    assert_eq!(gw.metrics.permission_denied.get(), 0);
    let _ = a.send_to(b"x", outsider.addr).await;
    assert!(
        wait_until(Duration::from_secs(2), || gw
            .metrics
            .permission_denied
            .get()
            >= 1)
        .await,
        "sending to a non-relay peer must be refused"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(outsider.count(), 0);
    let denied = gw.metrics.permission_denied.get();

    // B's allocation ends: its address is no longer a peer; A's data is dropped.
    b.close().await.unwrap();
    assert!(wait_until(Duration::from_secs(3), || gw.svc.allocations() == 1).await);
    let sent_before = gw.metrics.packets_to_peer.get();
    let _ = a.send_to(b"after-close", rb).await;
    assert!(
        wait_until(Duration::from_secs(2), || gw
            .metrics
            .permission_denied
            .get()
            > denied)
        .await,
        "data to an ended allocation must be refused"
    );
    assert_eq!(gw.metrics.packets_to_peer.get(), sent_before);
    ca.close().await.unwrap();
    cb.close().await.unwrap();
    gw.svc.close().await;
}
