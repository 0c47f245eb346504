//! The TCP proxy: accept, pick a server, connect (trying the next eligible server when a
//! connect is refused or times out, and reporting that as a passive failure), then copy
//! both ways until either side closes, the server is evicted, or shutdown ends the drain.
//!
//! A close is passed on the way it came: a FIN (end of data) half-closes the other side
//! and the other direction keeps flowing; a reset (or a write that fails) aborts the
//! other side with a reset too, at once. A connection that mediagate itself cuts (its
//! server left the active set, or the shutdown drain ran out) is reset on both sides: a
//! FIN would tell the client its stream ended cleanly when it did not. Besides telling
//! each end the truth, an abortive close leaves no TIME_WAIT entry on the proxy's
//! server-side socket, so a flood of aborted connections does not make every new
//! `connect` search a crowded ephemeral port range (HAProxy closes the same way).

use crate::health::Reason;
use crate::metrics::ListenerMetrics;
use crate::upstream::{ServerHandle, UpstreamRoute};
use prometheus_client::metrics::counter::Counter;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener as TokioListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Copy buffer per direction per connection.
const COPY_BUF: usize = 32 * 1024;

/// What all connections of one TCP listener share.
pub struct TcpListener {
    pub name: String,
    pub route: Arc<UpstreamRoute>,
    pub metrics: ListenerMetrics,
    live: AtomicUsize,
}

impl TcpListener {
    pub fn new(name: String, route: Arc<UpstreamRoute>, metrics: ListenerMetrics) -> Arc<Self> {
        Arc::new(TcpListener {
            name,
            route,
            metrics,
            live: AtomicUsize::new(0),
        })
    }

    /// Open connections.
    pub fn sessions(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Accepts on `socket` until `stop_accepting` fires; connections end when they close,
    /// when their server is evicted, or when `kill` fires (end of the shutdown drain).
    /// The socket is registered here (the fallible part); accepting begins once `start`
    /// fires, so a reload can prepare a listener and still drop it.
    pub fn serve(
        self: &Arc<Self>,
        socket: std::net::TcpListener,
        stop_accepting: CancellationToken,
        kill: CancellationToken,
        start: CancellationToken,
    ) -> io::Result<JoinHandle<()>> {
        socket.set_nonblocking(true)?;
        let listener = TokioListener::from_std(socket)?;
        let local_port = listener.local_addr()?.port();
        let this = self.clone();
        Ok(tokio::spawn(async move {
            tokio::select! {
                _ = start.cancelled() => {}
                _ = stop_accepting.cancelled() => return,
            }
            loop {
                tokio::select! {
                    _ = stop_accepting.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok((client, peer)) => {
                            let this = this.clone();
                            let kill = kill.clone();
                            tokio::spawn(async move { this.handle(client, peer, local_port, kill).await });
                        }
                        Err(e) => {
                            // EMFILE and friends: back off briefly instead of spinning.
                            tracing::warn!(listener = %this.name, error = %e, "accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    },
                }
            }
        }))
    }

    async fn handle(
        &self,
        mut client: TcpStream,
        peer: SocketAddr,
        local_port: u16,
        kill: CancellationToken,
    ) {
        let m = &self.metrics;
        let Some((server, mut upstream, evicted)) = self.connect(peer, local_port).await else {
            m.rejected_no_server.inc();
            return;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        self.live.fetch_add(1, Ordering::Relaxed);
        server.session_opened();
        m.sessions.inc();
        m.created.inc();

        // Whether the connection ends abortively (reset) rather than with FINs.
        let aborted = {
            // Borrowed halves: dropping them does not shut anything down, so an abort
            // below is not preceded by a FIN.
            let (cr, cw) = client.split();
            let (ur, uw) = upstream.split();
            // Both directions until both have ended; an abort in either ends both at once.
            let both = async {
                tokio::try_join!(
                    pump(cr, uw, m.bytes_to_server.clone()),
                    pump(ur, cw, m.bytes_to_client.clone())
                )
            };
            tokio::select! {
                r = both => r.is_err(),
                _ = evicted.cancelled() => {
                    tracing::debug!(listener = %self.name, %peer, server = %server.label, "resetting connection: server left the active set");
                    true
                }
                _ = kill.cancelled() => true,
            }
        };
        if aborted {
            reset_on_close(&client);
            reset_on_close(&upstream);
        }
        drop((client, upstream));
        server.session_closed();
        m.sessions.dec();
        self.live.fetch_sub(1, Ordering::Relaxed);
    }

    /// Connects to the best server, falling through to the next eligible one on failure.
    async fn connect(
        &self,
        peer: SocketAddr,
        local_port: u16,
    ) -> Option<(Arc<ServerHandle>, TcpStream, CancellationToken)> {
        let mut tried: Vec<Arc<ServerHandle>> = Vec::new();
        loop {
            let server = self.route.pick(peer.ip(), &tried)?;
            // Taken before connecting, so an eviction during the connect is not missed.
            let evicted = server.eviction_token();
            let dest = server.dest(local_port);
            let connect_timeout = self.route.connect_timeout();
            match tokio::time::timeout(connect_timeout, TcpStream::connect(dest)).await {
                Ok(Ok(stream)) => return Some((server, stream, evicted)),
                Ok(Err(e)) => {
                    let reason = match e.kind() {
                        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                            Reason::IcmpUnreachable
                        }
                        _ => Reason::ConnectRefused,
                    };
                    self.route
                        .report_passive(&server, reason, format!("connect {dest}: {e}"));
                }
                Err(_) => self.route.report_passive(
                    &server,
                    Reason::ConnectTimeout,
                    format!("connect {dest}: no answer within {:?}", connect_timeout),
                ),
            }
            tried.push(server);
        }
    }
}

/// Binds a TCP listen socket.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(false).ok();
    }
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

/// The connection was aborted: by a reset from one side, or a write that failed.
struct Aborted;

/// Copies one direction, counting bytes. On EOF it half-closes the other side and returns
/// `Ok`; a reset (read error) or a failed write returns `Err`, and the caller resets both.
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    bytes: Counter,
) -> Result<(), Aborted> {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        match from.read(&mut buf).await {
            Ok(0) => {
                let _ = to.shutdown().await;
                return Ok(());
            }
            Err(_) => return Err(Aborted),
            Ok(n) => {
                to.write_all(&buf[..n]).await.map_err(|_| Aborted)?;
                bytes.inc_by(n as u64);
            }
        }
    }
}

/// SO_LINGER 0: closing `sock` sends a reset instead of a FIN, and leaves no TIME_WAIT.
fn reset_on_close(sock: &TcpStream) {
    let _ = socket2::SockRef::from(sock).set_linger(Some(std::time::Duration::ZERO));
}
