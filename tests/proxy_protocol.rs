//! PROXY protocol v2 through the real binary: a TCP listener with `proxy_protocol: v2`
//! tells the server (a small TCP server here that parses the header the way coturn's
//! `--proxy-protocol` does) the client's real address; a listener with
//! `accept_proxy_protocol: true` takes the client address from the load balancer's header
//! and passes it on, and refuses (resets, counts) a connection without a valid header.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A TCP server that reads one PROXY v2 header per connection and answers with the
/// client address it carries (`none` for a LOCAL header), then echoes.
fn header_server() -> (SocketAddr, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            // Bounded: the test makes a handful of connections.
            for _ in 0..8 {
                let Ok(Ok((mut s, _))) =
                    tokio::time::timeout(Duration::from_secs(30), l.accept()).await
                else {
                    return;
                };
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let said = match mediagate::proxyproto::read_v2(&mut s).await {
                        Ok(Some(a)) => a.to_string(),
                        Ok(None) => "none".to_string(),
                        Err(e) => format!("error {e}"),
                    };
                    let _ = s.write_all(format!("{said}|").as_bytes()).await;
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
    });
    (addr, h)
}

/// Reads the server's `ADDRESS|` line through `s`.
fn seen_by_server(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while s.read_exact(&mut byte).is_ok() && byte[0] != b'|' {
        out.push(byte[0]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn the_server_sees_the_client_address_both_ways() {
    let (server, _h) = header_server();
    let (plain, behind_lb, a) = (free_tcp_port(), free_tcp_port(), free_tcp_port());
    let elsewhere = free_tcp_port();
    let b = Balancer::start(
        &format!(
            r#"
admin: {{ listen: "127.0.0.1:{a}" }}
listeners:
  - {{ name: send, protocol: tcp, listen: "127.0.0.1:{plain}", upstream: pp, proxy_protocol: v2 }}
  - {{ name: lb, protocol: tcp, listen: "127.0.0.1:{behind_lb}", upstream: pp, proxy_protocol: v2, accept_proxy_protocol: true, trusted_proxies: ["127.0.0.1/32"] }}
  - {{ name: other, protocol: tcp, listen: "127.0.0.1:{elsewhere}", upstream: pp, proxy_protocol: v2, accept_proxy_protocol: true, trusted_proxies: ["10.99.0.0/16"] }}
upstreams:
  pp:
    primary: ["{server}"]
    health: {{ type: none }}
"#
        ),
        a,
    );

    // Sent: the server learns the client's own address.
    let mut c = TcpStream::connect(("127.0.0.1", plain)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(seen_by_server(&mut c), c.local_addr().unwrap().to_string());
    c.write_all(b"ping").unwrap();
    let mut echo = [0u8; 4];
    c.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"ping", "data flows after the header");

    // Accepted and passed on: the address the load balancer announced reaches the server.
    let real: SocketAddr = "198.51.100.9:5555".parse().unwrap();
    let lb_addr = SocketAddr::from(([127, 0, 0, 1], behind_lb));
    let mut c = TcpStream::connect(lb_addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(&mediagate::proxyproto::header_v2(real, lb_addr))
        .unwrap();
    c.write_all(b"pong").unwrap();
    assert_eq!(seen_by_server(&mut c), real.to_string());
    c.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"pong", "bytes right behind the header are not lost");

    // No header: refused with a reset, counted.
    let mut c = TcpStream::connect(lb_addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    refused_and_counted(
        &b,
        &mut c,
        "lb",
        "a connection without a PROXY header was served",
    );

    // A valid header from a source outside trusted_proxies: refused before it is read,
    // the server never hears of it, counted.
    let other = SocketAddr::from(([127, 0, 0, 1], elsewhere));
    let mut c = TcpStream::connect(other).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = c.write_all(&mediagate::proxyproto::header_v2(real, other));
    refused_and_counted(
        &b,
        &mut c,
        "other",
        "a header from an untrusted source was taken",
    );
    // And `check` refuses accept_proxy_protocol without trusted_proxies.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.yaml");
    std::fs::write(
        &path,
        format!(
            "listeners:\n  - {{ name: lb, protocol: tcp, listen: \"127.0.0.1:1\", upstream: pp, accept_proxy_protocol: true }}\nupstreams:\n  pp:\n    primary: [\"{server}\"]\n"
        ),
    )
    .unwrap();
    let (code, _, err) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("listeners[0].trusted_proxies"), "{err}");
}

/// `c` was reset without an answer, and listener `listener` counted one
/// `reason="proxy_header"` rejection.
fn refused_and_counted(b: &Balancer, c: &mut TcpStream, listener: &str, what: &str) {
    let mut buf = [0u8; 16];
    let r = c.read(&mut buf);
    assert!(matches!(r, Err(_) | Ok(0)), "{what}: {r:?}");
    wait_until(Duration::from_secs(5), "proxy_header counted", || {
        b.metrics().lines().any(|l| {
            l.starts_with("mediagate_sessions_rejected_total")
                && l.contains(&format!("listener=\"{listener}\""))
                && l.contains("reason=\"proxy_header\"")
                && l.ends_with(" 1")
        })
    });
}
