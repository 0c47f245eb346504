//! Interop with coturn's tools: `turnutils_uclient` allocates, sets permissions, binds
//! channels and relays to `turnutils_peer` through the gateway over UDP and TCP, with
//! static and TURN REST API credentials; REST credentials work both ways between
//! mediagate and a real coturn; a wrong password gets 401 and relays nothing; peers
//! outside the policy never receive a byte and every refusal is counted.

mod turn_support;

use mediagate::turn::{AuthFailure, ice_config};
use std::process::Stdio;
use std::time::{Duration, SystemTime};
use tokio::process::Command;
use turn_support::*;

fn ok_run(what: &str, r: &Uclient) {
    assert!(r.ok, "{what}: uclient failed:\n{}", r.out);
    let sent = r.sent.unwrap_or(0);
    assert!(sent > 0, "{what}: nothing sent:\n{}", r.out);
    assert_eq!(
        r.received,
        Some(sent),
        "{what}: echo incomplete:\n{}",
        r.out
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_and_tcp_relay_with_static_credentials() {
    let gw = Gateway::start(config(Auth::Static, &["127.0.0.1/32"], 10)).await;
    let (_peer, port) = echo_peer().await;
    let (p, u, t) = (
        port.to_string(),
        gw.udp.port().to_string(),
        gw.tcp.port().to_string(),
    );
    let common = [
        "-e",
        "127.0.0.1",
        "-r",
        &p,
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-n",
        "20",
        "-z",
        "5",
    ];
    // UDP: RTP + RTCP pair (EVEN-PORT + RESERVATION-TOKEN) over channels.
    let mut udp: Vec<&str> = vec!["-p", &u];
    udp.extend(common);
    // TCP: 2 clients, 101-byte messages (ChannelData padded on the stream).
    let mut tcp: Vec<&str> = vec!["-t", "-p", &t, "-m", "2", "-l", "101"];
    tcp.extend(common);
    let (ru, rt) = tokio::join!(uclient(&udp), uclient(&tcp));
    ok_run("udp", &ru);
    ok_run("tcp", &rt);

    let m = &gw.metrics;
    assert!(
        m.allocations_created.get() >= 4,
        "created {}",
        m.allocations_created.get()
    );
    assert!(
        m.bytes_to_peer.get() >= 20 * 100,
        "to_peer {}",
        m.bytes_to_peer.get()
    );
    assert!(
        m.bytes_to_client.get() >= 20 * 100,
        "to_client {}",
        m.bytes_to_client.get()
    );
    assert_eq!(m.permission_denied.get(), 0);
    // TCP allocations end with their connections.
    assert!(
        wait_until(Duration::from_secs(5), || gw.svc.allocations() <= 3).await,
        "allocations left: {}",
        gw.svc.allocations()
    );
    gw.svc.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api_credentials_work_both_ways_with_coturn() {
    let gw = Gateway::start(config(Auth::Ephemeral, &["127.0.0.1/32"], 10)).await;
    let (_peer, port) = echo_peer().await;
    let p = port.to_string();
    let (u, t) = (gw.udp.port().to_string(), gw.tcp.port().to_string());

    // coturn-style credentials: uclient derives them from the secret (-W).
    let coturn_style_udp = uclient(&[
        "-W",
        SECRET,
        "-u",
        "bob",
        "-p",
        &u,
        "-e",
        "127.0.0.1",
        "-r",
        &p,
        "-s",
        "-c",
        "-n",
        "10",
        "-z",
        "5",
    ]);
    let coturn_style_tcp = uclient(&[
        "-t",
        "-W",
        SECRET,
        "-u",
        "bob",
        "-p",
        &t,
        "-e",
        "127.0.0.1",
        "-r",
        &p,
        "-c",
        "-n",
        "10",
        "-z",
        "5",
    ]);

    // Credentials mediagate issues (/ice), used against mediagate and against coturn.
    let ice = ice_config(
        &gw.cfg,
        "carol",
        Some(Duration::from_secs(600)),
        SystemTime::now(),
    )
    .unwrap();
    let user = ice["iceServers"][0]["username"]
        .as_str()
        .unwrap()
        .to_string();
    let cred = ice["iceServers"][0]["credential"]
        .as_str()
        .unwrap()
        .to_string();
    let issued_here = uclient(&[
        "-u",
        &user,
        "-w",
        &cred,
        "-p",
        &u,
        "-e",
        "127.0.0.1",
        "-r",
        &p,
        "-c",
        "-n",
        "10",
        "-z",
        "5",
    ]);

    let coturn_port = free_port_pair();
    let _coturn = Command::new(tool("turnserver"))
        .args([
            "-n",
            "--listening-ip=127.0.0.1",
            &format!("--listening-port={coturn_port}"),
            "--relay-ip=127.0.0.1",
            "--min-port=51000",
            "--max-port=51999",
            "--allow-loopback-peers",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--realm=mediagate",
            "--use-auth-secret",
            &format!("--static-auth-secret={SECRET}"),
            "--log-file=stdout",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn turnserver");
    let coturn_addr = format!("127.0.0.1:{coturn_port}").parse().unwrap();
    let mut up = false;
    for _ in 0..50 {
        let mut probe = RawClient::udp(coturn_addr, "x", "y").await;
        probe.send_raw(&binding_request()).await;
        if probe.recv_raw(Duration::from_millis(100)).await.is_some() {
            up = true;
            break;
        }
    }
    assert!(up, "coturn did not start");
    let cp = coturn_port.to_string();
    let at_coturn = uclient(&[
        "-u",
        &user,
        "-w",
        &cred,
        "-p",
        &cp,
        "-e",
        "127.0.0.1",
        "-r",
        &p,
        "-c",
        "-n",
        "10",
        "-z",
        "5",
    ]);
    let wrong_at_coturn = uclient(&[
        "-u",
        &user,
        "-w",
        "not-the-credential",
        "-p",
        &cp,
        "-e",
        "127.0.0.1",
        "-r",
        &p,
        "-c",
        "-n",
        "3",
    ]);

    let (a, b, c, d, e) = tokio::join!(
        coturn_style_udp,
        coturn_style_tcp,
        issued_here,
        at_coturn,
        wrong_at_coturn
    );
    ok_run("uclient -W (UDP, Send indications) at mediagate", &a);
    ok_run("uclient -W (TCP, channels) at mediagate", &b);
    ok_run("mediagate-issued credential at mediagate", &c);
    ok_run("mediagate-issued credential at coturn", &d);
    assert!(
        !e.ok && e.received.unwrap_or(0) == 0,
        "coturn must refuse a wrong credential:\n{}",
        e.out
    );
    assert_eq!(
        gw.metrics.auth_failures_total(AuthFailure::WrongPassword),
        0
    );
    gw.svc.close().await;
}

fn binding_request() -> Vec<u8> {
    let mut b = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    b.extend_from_slice(&[9u8; 12]);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_gets_401_and_relays_nothing() {
    let gw = Gateway::start(config(Auth::Static, &["127.0.0.1/32"], 10)).await;
    // A listening socket where the relayed data would arrive.
    let port = free_port_pair();
    let sink_a = Sink::bind(&format!("127.0.0.1:{port}")).await;
    let sink_b = Sink::bind(&format!("127.0.0.1:{}", port + 1)).await;
    let tap = Tap::start(gw.udp).await;
    let p = port.to_string();
    let tp = tap.addr.port().to_string();
    let t = gw.tcp.port().to_string();
    let udp = uclient(&[
        "-u",
        USER,
        "-w",
        "wrong",
        "-p",
        &tp,
        "-e",
        "127.0.0.1",
        "-r",
        &p,
        "-c",
        "-n",
        "3",
    ]);
    let tcp = uclient(&[
        "-t",
        "-u",
        USER,
        "-w",
        "wrong",
        "-p",
        &t,
        "-e",
        "127.0.0.1",
        "-r",
        &p,
        "-c",
        "-n",
        "3",
    ]);
    let (ru, rt) = tokio::join!(udp, tcp);
    assert!(
        !ru.ok && !rt.ok,
        "allocation must fail:\n{}\n{}",
        ru.out,
        rt.out
    );

    let codes = tap.codes.lock().unwrap().clone();
    assert!(
        codes.contains(&401),
        "expected 401 on the wire, saw {codes:?}"
    );
    assert!(
        codes.iter().all(|c| *c == 401),
        "only 401s expected, saw {codes:?}"
    );
    assert_eq!(*tap.successes.lock().unwrap(), 0, "no request may succeed");
    let failures = gw.metrics.auth_failures_total(AuthFailure::WrongPassword);
    assert!(failures >= 2, "wrong_password failures counted: {failures}");
    assert_eq!(gw.metrics.allocations_created.get(), 0);
    assert_eq!(gw.metrics.packets_to_peer.get(), 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sink_a.count() + sink_b.count(), 0, "the peer received data");
    gw.svc.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_peers_never_receive_a_byte() {
    // Default policy: only upstream servers, and the only upstream is elsewhere.
    let gw = Gateway::start(config(Auth::Static, &["upstreams"], 10)).await;
    gw.policy
        .set_upstream_ips(["198.51.100.77".parse().unwrap()]);
    let port = free_port_pair();
    let loop_a = Sink::bind(&format!("127.0.0.1:{port}")).await;
    let loop_b = Sink::bind(&format!("127.0.0.1:{}", port + 1)).await;
    // "Another host": an address the test creates on a dummy interface (local delivery,
    // no traffic leaves the machine) with a listening socket.
    let test_addr = TestAddr::create();
    let other = Some(test_addr.ip);
    let other_sink = match other {
        Some(ip) => Some(Sink::bind(&format!("{ip}:0")).await),
        None => None,
    };
    let u = gw.udp.port().to_string();
    let t = gw.tcp.port().to_string();
    let p = port.to_string();
    let creds = ["-u", USER, "-w", PASSWORD, "-c", "-n", "5", "-z", "5"];
    // Local peers first (listening sockets prove nothing arrives); the outside addresses
    // run only once the gateway has refused those, so a broken policy cannot send
    // anything off the host.
    let mut local: Vec<Vec<String>> = vec![
        // channels (ChannelBind) and Send indications (CreatePermission) to loopback
        vec!["-p", &u, "-e", "127.0.0.1", "-r", &p],
        vec!["-p", &u, "-s", "-e", "127.0.0.1", "-r", &p],
        vec!["-t", "-p", &t, "-e", "127.0.0.1", "-r", &p],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(String::from).collect())
    .collect();
    if let Some(s) = &other_sink {
        let (ip, port) = (s.addr.ip().to_string(), s.addr.port().to_string());
        local.push(
            ["-p", &u, "-e", &ip, "-r", &port]
                .into_iter()
                .map(String::from)
                .collect(),
        );
    }
    let outside: Vec<Vec<String>> = vec![
        // cloud metadata
        vec!["-p", &u, "-e", "169.254.169.254", "-r", "80"],
        // a host outside the policy that nobody listens on: refused before any send
        vec!["-p", &u, "-s", "-e", "198.51.100.10", "-r", "5000"],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(String::from).collect())
    .collect();
    let expected = (local.len() + outside.len()) as u64;
    for group in [&local, &outside] {
        for r in group.iter() {
            let mut args: Vec<&str> = r.iter().map(String::as_str).collect();
            args.extend(creds);
            let res = uclient(&args).await;
            assert!(!res.ok, "uclient {r:?} must fail:\n{}", res.out);
            assert!(
                res.out.contains("403"),
                "uclient {r:?} must see 403:\n{}",
                res.out
            );
            assert_eq!(res.received.unwrap_or(0), 0, "{r:?}");
            assert_eq!(gw.metrics.packets_to_peer.get(), 0, "relayed for {r:?}");
        }
    }
    let m = &gw.metrics;
    assert!(
        m.permission_denied.get() >= expected,
        "refusals counted: {} < {expected}",
        m.permission_denied.get()
    );
    assert_eq!(
        m.packets_to_peer.get(),
        0,
        "the gateway sent a datagram to a peer"
    );
    assert!(m.allocations_created.get() >= expected);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        loop_a.count() + loop_b.count(),
        0,
        "loopback peer received data"
    );
    if let Some(s) = other_sink {
        assert_eq!(s.count(), 0, "the other host received data");
    }
    gw.svc.close().await;
}
