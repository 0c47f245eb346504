//! Tiny echo workers used by `mediagate demo` and the test tool: they stand in for a media
//! worker. A UDP worker answers every datagram with `NAME|payload`, so a client can tell
//! which worker served it; it can be paused (hung: no replies, no ICMP) or stopped (its
//! port closes, so the kernel answers ICMP port unreachable).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

/// A running UDP echo worker.
pub struct UdpEcho {
    pub addr: SocketAddr,
    paused: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl UdpEcho {
    /// Binds `addr` (port 0 for any) and starts answering.
    pub async fn start(name: &str, addr: SocketAddr) -> std::io::Result<UdpEcho> {
        let sock = UdpSocket::bind(addr).await?;
        // As large a receive buffer as the host allows: a flood through the balancer
        // lands here too, and a test measures the balancer's losses, not the echo's.
        let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(8 << 20);
        let addr = sock.local_addr()?;
        let paused = Arc::new(AtomicBool::new(false));
        let p = paused.clone();
        let prefix = format!("{name}|").into_bytes();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            let mut out = Vec::with_capacity(65_536 + prefix.len());
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                if p.load(Ordering::Relaxed) {
                    continue;
                }
                out.clear();
                out.extend_from_slice(&prefix);
                out.extend_from_slice(&buf[..n]);
                let _ = sock.send_to(&out, from).await;
            }
        });
        Ok(UdpEcho { addr, paused, task })
    }

    /// Stop answering but keep the port open (a hung process).
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// Close the port (a dead process).
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// A TCP echo worker: every connection gets `NAME|` then an echo of what it sends.
pub async fn tcp_echo(
    name: &str,
    addr: SocketAddr,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let hello = format!("{name}|").into_bytes();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let hello = hello.clone();
            tokio::spawn(async move {
                if conn.write_all(&hello).await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; 16_384];
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok((addr, task))
}

/// A health endpoint: answers every HTTP request with `200 OK` and closes.
pub async fn http_ok(addr: SocketAddr) -> std::io::Result<JoinHandle<()>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf).await;
                let _ = conn
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
                    )
                    .await;
            });
        }
    }))
}
