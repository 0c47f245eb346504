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
//!
//! Bounds against clients that hold connections (slowloris): a listener holds at most
//! `max_connections` (a connection beyond it is reset at once and counted), each takes
//! two descriptors from the process's budget (`crate::fdbudget`), and a connection with
//! no byte either way for `session.idle_timeout` is reset. A connect that fails for a
//! local reason (EMFILE, ENOBUFS, no local port) is the balancer's problem: counted
//! (`reason="local_error"`), logged rate-limited, never reported against the server.
//!
//! PROXY protocol v2 (`crate::proxyproto`): with `accept_proxy_protocol` every connection
//! must start with a header (from a cloud load balancer) whose source address then is the
//! client address (server choice, logs, the header sent on); without a valid one within
//! 5 s it is reset and counted (`reason="proxy_header"`). With `proxy_protocol: v2` a
//! header carrying the client address is written to the server right after connecting,
//! before any client byte.

use crate::config::{ListenerConfig, Protocol};
use crate::fdbudget;
use crate::health::Reason;
use crate::metrics::ListenerMetrics;
use crate::ratelog::RateLimit;
use crate::upstream::{ServerHandle, UpstreamRoute};
use prometheus_client::metrics::counter::Counter;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener as TokioListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Copy buffer per direction per connection.
const COPY_BUF: usize = 32 * 1024;

/// PROXY protocol settings of a TCP listener.
#[derive(Debug, Clone, Default)]
pub struct ProxyProtocol {
    /// `proxy_protocol: v2`: send a v2 header to the server.
    pub send: bool,
    /// `accept_proxy_protocol`: require a v2 header from the client side.
    pub accept: bool,
    /// `trusted_proxies`: who may send it.
    pub trusted: crate::proxyproto::Trusted,
}

impl ProxyProtocol {
    /// The settings of listener `l`.
    pub fn of(l: &ListenerConfig) -> Self {
        ProxyProtocol {
            send: l.proxy_protocol.is_some(),
            accept: l.accept_proxy_protocol,
            trusted: crate::proxyproto::Trusted::parse(&l.trusted_proxies),
        }
    }
}

/// What all connections of one TCP listener share.
pub struct TcpListener {
    pub name: String,
    pub route: Arc<UpstreamRoute>,
    pub metrics: ListenerMetrics,
    /// No byte either way for this long resets the connection (`session.idle_timeout`).
    pub idle_timeout: Duration,
    /// Connections held at most, counting those still connecting (`max_connections`).
    pub max_connections: usize,
    /// PROXY protocol v2 in and out.
    pub proxy_protocol: ProxyProtocol,
    /// Connections accepted and not yet closed (including those still connecting).
    held: AtomicUsize,
    /// Connections relaying to a server.
    live: AtomicUsize,
    /// Accept failures and local connect failures: a few lines per window.
    accept_log: RateLimit,
    local_log: RateLimit,
    proxy_log: RateLimit,
}

impl TcpListener {
    pub fn new(
        name: String,
        route: Arc<UpstreamRoute>,
        idle_timeout: Duration,
        max_connections: usize,
        metrics: ListenerMetrics,
        proxy_protocol: ProxyProtocol,
    ) -> Arc<Self> {
        Arc::new(TcpListener {
            name,
            route,
            metrics,
            idle_timeout,
            max_connections,
            proxy_protocol,
            held: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            accept_log: RateLimit::new("tcp_accept", Duration::from_secs(10), 5),
            local_log: RateLimit::new("tcp_connect_local", Duration::from_secs(10), 5),
            proxy_log: RateLimit::new("tcp_proxy_header", Duration::from_secs(10), 5),
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
                            let Some(admitted) = this.admit(&client) else {
                                continue;
                            };
                            let this = this.clone();
                            let kill = kill.clone();
                            tokio::spawn(async move {
                                let _admitted = admitted;
                                this.handle(client, peer, local_port, kill).await
                            });
                        }
                        Err(e) => {
                            // EMFILE and friends: back off briefly instead of spinning.
                            if this.accept_log.allow() {
                                tracing::warn!(listener = %this.name, error = %e, "accept failed");
                            }
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    },
                }
            }
        }))
    }

    /// Whether a just-accepted connection may stay: within `max_connections` and with two
    /// descriptors (client and server) from the budget. A refused one is reset at once.
    fn admit(self: &Arc<Self>, client: &TcpStream) -> Option<Admitted> {
        let m = &self.metrics;
        if self.held.fetch_add(1, Ordering::AcqRel) >= self.max_connections {
            self.held.fetch_sub(1, Ordering::AcqRel);
            m.rejected_max_connections.inc();
            reset_on_close(client);
            return None;
        }
        let permit = fdbudget::global().try_acquire(2);
        let admitted = Admitted {
            listener: self.clone(),
            _permit: permit,
        };
        if admitted._permit.is_none() {
            m.rejected_fd_budget.inc();
            reset_on_close(client);
            return None; // dropping `admitted` gives the connection slot back
        }
        Some(admitted)
    }

    async fn handle(
        &self,
        mut client: TcpStream,
        mut peer: SocketAddr,
        local_port: u16,
        kill: CancellationToken,
    ) {
        let m = &self.metrics;
        if self.proxy_protocol.accept && !self.proxy_protocol.trusted.allows(peer.ip()) {
            m.rejected_proxy_header.inc();
            if self.proxy_log.allow() {
                tracing::warn!(listener = %self.name, %peer, "connection refused: a PROXY header from a source outside trusted_proxies");
            }
            reset_on_close(&client);
            return;
        }
        if self.proxy_protocol.accept {
            let header = tokio::select! {
                h = crate::proxyproto::read_v2(&mut client) => h,
                _ = kill.cancelled() => return,
            };
            match header {
                Ok(Some(real)) => peer = real,
                Ok(None) => {}
                Err(e) => {
                    m.rejected_proxy_header.inc();
                    if self.proxy_log.allow() {
                        tracing::warn!(listener = %self.name, %peer, error = %e, "connection refused: accept_proxy_protocol needs a valid PROXY v2 header");
                    }
                    reset_on_close(&client);
                    return;
                }
            }
        }
        let (server, mut upstream, evicted) = match self.connect(peer, local_port).await {
            Ok(c) => c,
            Err(Unconnected::NoServer) => {
                m.rejected_no_server.inc();
                reset_on_close(&client);
                return;
            }
            Err(Unconnected::Local) => {
                m.rejected_local_error.inc();
                reset_on_close(&client);
                return;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        if self.proxy_protocol.send {
            let local = client
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::new(peer.ip(), local_port));
            let header = crate::proxyproto::header_v2(peer, local);
            if upstream.write_all(&header).await.is_err() {
                reset_on_close(&client);
                reset_on_close(&upstream);
                return;
            }
        }
        self.live.fetch_add(1, Ordering::Relaxed);
        server.session_opened();
        m.sessions.inc();
        m.created.inc();

        // When either side last sent a byte, in ms since `started` (for the idle timeout).
        let started = Instant::now();
        let last_io = AtomicU64::new(0);
        // Whether the connection ends abortively (reset) rather than with FINs.
        let aborted = {
            // Borrowed halves: dropping them does not shut anything down, so an abort
            // below is not preceded by a FIN.
            let (cr, cw) = client.split();
            let (ur, uw) = upstream.split();
            // Both directions until both have ended; an abort in either ends both at once.
            let both = async {
                tokio::try_join!(
                    pump(cr, uw, m.bytes_to_server.clone(), started, &last_io),
                    pump(ur, cw, m.bytes_to_client.clone(), started, &last_io)
                )
            };
            let idle = idle_watch(self.idle_timeout, started, &last_io);
            tokio::select! {
                r = both => r.is_err(),
                _ = idle => {
                    tracing::debug!(listener = %self.name, %peer, "resetting connection: idle timeout");
                    m.closed_idle.inc();
                    true
                }
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
    /// A local failure (out of descriptors or ports) ends the attempt without blaming
    /// the server: the next one would fail the same way.
    async fn connect(
        &self,
        peer: SocketAddr,
        local_port: u16,
    ) -> Result<(Arc<ServerHandle>, TcpStream, CancellationToken), Unconnected> {
        let mut tried: Vec<Arc<ServerHandle>> = Vec::new();
        // Servers whose TCP side failed lately without that marking them down (their
        // UDP side speaks for them, `passive_scope: protocol`) are tried last.
        let mut held: Vec<Arc<ServerHandle>> = self
            .route
            .snapshot()
            .eligible
            .iter()
            .filter(|s| s.is_held(Protocol::Tcp))
            .cloned()
            .collect();
        loop {
            let avoid: Vec<Arc<ServerHandle>> = tried.iter().chain(&held).cloned().collect();
            let server = match self.route.pick(peer.ip(), &avoid) {
                Some(s) => s,
                None if !held.is_empty() => {
                    held.clear();
                    continue;
                }
                None => return Err(Unconnected::NoServer),
            };
            // Taken before connecting, so an eviction during the connect is not missed.
            let evicted = server.eviction_token();
            let dest = server.dest(local_port);
            let connect_timeout = self.route.connect_timeout();
            match tokio::time::timeout(connect_timeout, TcpStream::connect(dest)).await {
                Ok(Ok(stream)) => {
                    server.release(Protocol::Tcp);
                    return Ok((server, stream, evicted));
                }
                Ok(Err(e)) if crate::health::is_local_error(&e) => {
                    if self.local_log.allow() {
                        tracing::warn!(listener = %self.name, %dest, error = %e, "cannot connect: local resources exhausted (not counted against the server)");
                    }
                    return Err(Unconnected::Local);
                }
                Ok(Err(e)) => {
                    let reason = match e.kind() {
                        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                            Reason::IcmpUnreachable
                        }
                        _ => Reason::ConnectRefused,
                    };
                    self.route.report_passive(
                        &server,
                        Protocol::Tcp,
                        reason,
                        format!("connect {dest}: {e}"),
                    );
                }
                Err(_) => self.route.report_passive(
                    &server,
                    Protocol::Tcp,
                    Reason::ConnectTimeout,
                    format!("connect {dest}: no answer within {:?}", connect_timeout),
                ),
            }
            tried.push(server);
        }
    }
}

/// Why no server connection was made.
enum Unconnected {
    /// No eligible server (left).
    NoServer,
    /// The balancer ran out of descriptors, buffers or local ports.
    Local,
}

/// A connection counted in its listener's `held` and the fd budget until dropped.
struct Admitted {
    listener: Arc<TcpListener>,
    _permit: Option<fdbudget::Permit>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.listener.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Resolves once no byte has gone either way for `idle` (never when `idle` is zero).
async fn idle_watch(idle: Duration, started: Instant, last_io: &AtomicU64) {
    if idle.is_zero() {
        return std::future::pending().await;
    }
    loop {
        let last = started + Duration::from_millis(last_io.load(Ordering::Relaxed));
        let deadline = last + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// Connections the kernel may queue for a TCP listener (tokio's default too).
const ACCEPT_BACKLOG: i32 = 1024;

/// Binds a TCP listen socket.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    crate::sockio::bind_tcp_listener(addr, ACCEPT_BACKLOG)
}

/// The connection was aborted: by a reset from one side, or a write that failed.
struct Aborted;

/// Copies one direction, counting bytes. On EOF it half-closes the other side and returns
/// `Ok`; a reset (read error) or a failed write returns `Err`, and the caller resets both.
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    bytes: Counter,
    started: Instant,
    last_io: &AtomicU64,
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
                last_io.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
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
