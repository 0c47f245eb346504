//! TCP proxying end to end: a refused primary sends connections to the backup, an
//! established connection on a server that goes down is reset promptly so that the
//! client's reconnect lands on the backup, and closes reach the other side as they came
//! (a FIN as a half-close, a reset as a reset).

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Connects, reads the worker's `NAME|` greeting and checks the echo works.
fn greet(listen: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect_timeout(&listen, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    while s.read_exact(&mut byte).is_ok() && byte[0] != b'|' {
        name.push(byte[0]);
    }
    s.write_all(b"ping").expect("write");
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).expect("echo");
    assert_eq!(&echo, b"ping");
    (s, String::from_utf8_lossy(&name).into_owned())
}

/// A read that `who` did must have failed with a connection reset.
fn assert_reset(r: &std::io::Result<usize>, who: &str) {
    assert!(
        matches!(r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{who} must see a reset, got {r:?}"
    );
}

#[test]
fn refused_primary_sends_connections_to_the_backup() {
    let (p, bk, l, a) = (
        free_tcp_port(),
        free_tcp_port(),
        free_tcp_port(),
        free_tcp_port(),
    );
    let backup_addr = SocketAddr::from(([127, 0, 0, 1], bk));
    let _backup = worker("tcp-echo", "backup", backup_addr, None);
    // No probes (type none): the primary looks fine until a connect is refused.
    let b = Balancer::start(
        &format!(
            r#"
admin: {{ listen: "127.0.0.1:{a}" }}
listeners:
  - {{ name: http, protocol: tcp, listen: "127.0.0.1:{l}", upstream: web }}
upstreams:
  web:
    primary: ["127.0.0.1:{p}"]
    backup: ["{backup_addr}"]
    health: {{ type: none }}
"#
        ),
        a,
    );
    let listen = SocketAddr::from(([127, 0, 0, 1], l));
    let (_c, name) = greet(listen);
    assert_eq!(
        name, "backup",
        "the refused connect must fall through to the backup"
    );
    let st = b.status();
    let primary = &upstream_of(&st, "web")["servers"][0];
    assert_eq!(primary["health"], "down", "{st}");
    assert!(
        primary["last_error"]
            .as_str()
            .unwrap_or("")
            .starts_with("connect_refused"),
        "{st}"
    );
    // Every later connection goes straight to the backup.
    for _ in 0..5 {
        assert_eq!(greet(listen).1, "backup");
    }
    assert!(
        b.metrics()
            .contains("mediagate_failovers_total{upstream=\"web\",reason=\"connect_refused\"} 1")
    );
}

#[test]
fn connection_on_a_failed_server_is_closed_and_reconnect_lands_on_backup() {
    // Distinct loopback IPs so both workers can serve health on the same port.
    let (port, health) = (free_tcp_port(), free_tcp_port());
    let primary_addr: SocketAddr = format!("127.0.0.2:{port}").parse().expect("addr");
    let backup_addr: SocketAddr = format!("127.0.0.3:{port}").parse().expect("addr");
    let spawn = |name: &str, addr: SocketAddr| {
        let mut cmd = std::process::Command::new(TESTKIT);
        cmd.args([
            "tcp-echo",
            "--name",
            name,
            "--listen",
            &addr.to_string(),
            "--http-port",
            &health.to_string(),
        ])
        .stdout(std::process::Stdio::null());
        Proc {
            child: cmd.spawn().expect("spawn"),
            name: name.into(),
        }
    };
    let primary = spawn("primary", primary_addr);
    let _backup = spawn("backup", backup_addr);
    wait_until(Duration::from_secs(5), "workers listening", || {
        TcpStream::connect(primary_addr).is_ok() && TcpStream::connect(backup_addr).is_ok()
    });
    let (l, a) = (free_tcp_port(), free_tcp_port());
    let interval = Duration::from_millis(200);
    let b = Balancer::start(
        &format!(
            r#"
admin: {{ listen: "127.0.0.1:{a}" }}
listeners:
  - {{ name: http, protocol: tcp, listen: "127.0.0.1:{l}", upstream: web }}
upstreams:
  web:
    primary: ["{primary_addr}"]
    backup: ["{backup_addr}"]
    health: {{ type: http, port: {health}, path: /health, interval: 200ms, timeout: 100ms }}
"#
        ),
        a,
    );
    let listen = SocketAddr::from(([127, 0, 0, 1], l));
    let (mut conn, name) = greet(listen);
    assert_eq!(name, "primary");

    // A hung primary: the kernel keeps its sockets open, so only mediagate can end them.
    primary.signal(Signal::SIGSTOP);
    let t = Instant::now();
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    let r = conn.read(&mut buf);
    let closed_after = t.elapsed();
    assert_reset(&r, "the client, when mediagate cuts the connection");
    eprintln!(
        "established connection closed {closed_after:?} after SIGSTOP (2 probe intervals = {:?})",
        interval * 2
    );
    assert!(
        closed_after <= interval * 2,
        "closed only after {closed_after:?}"
    );

    let (_c, name) = greet(listen);
    assert_eq!(name, "backup");
    assert_eq!(b.active("web"), vec![backup_addr.to_string()]);
}

#[test]
fn closes_are_passed_on_as_they_came() {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").expect("bind backend");
    let backend_addr = backend.local_addr().expect("addr");
    let (l, a) = (free_tcp_port(), free_tcp_port());
    let _b = Balancer::start(
        &format!(
            r#"
admin: {{ listen: "127.0.0.1:{a}" }}
listeners:
  - {{ name: app, protocol: tcp, listen: "127.0.0.1:{l}", upstream: app }}
upstreams:
  app:
    primary: ["{backend_addr}"]
    health: {{ type: none }}
"#
        ),
        a,
    );
    let listen = SocketAddr::from(([127, 0, 0, 1], l));
    let timeout = Some(Duration::from_secs(3));
    let connect = || {
        let c = TcpStream::connect_timeout(&listen, Duration::from_secs(2)).expect("connect");
        c.set_read_timeout(timeout).expect("timeout");
        let (s, _) = backend.accept().expect("accept");
        s.set_read_timeout(timeout).expect("timeout");
        (c, s)
    };
    let reset = |s: TcpStream| {
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(s);
    };

    // Half-close: the request ends with a FIN, the answer still comes back.
    let (mut client, mut server) = connect();
    client.write_all(b"request").expect("write");
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    let mut got = Vec::new();
    server.read_to_end(&mut got).expect("server reads to EOF");
    assert_eq!(got, b"request");
    server.write_all(b"answer").expect("answer");
    drop(server);
    let mut got = Vec::new();
    client.read_to_end(&mut got).expect("client reads to EOF");
    assert_eq!(
        got, b"answer",
        "a half-closed connection must carry the answer back"
    );

    // The client resets: the server sees a reset, not a clean end of data.
    let (mut client, mut server) = connect();
    client.write_all(b"x").expect("write");
    let mut byte = [0u8; 1];
    server.read_exact(&mut byte).expect("server reads");
    reset(client);
    assert_reset(
        &server.read(&mut byte),
        "the server, after the client's reset",
    );

    // The server resets: the client sees a reset.
    let (mut client, mut server) = connect();
    server.write_all(b"y").expect("write");
    client.read_exact(&mut byte).expect("client reads");
    reset(server);
    assert_reset(
        &client.read(&mut byte),
        "the client, after the server's reset",
    );
}
