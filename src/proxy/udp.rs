//! The UDP proxy: where a client datagram goes (SPEC §4, §6).
//!
//! Each listen port has one task that owns its session table outright (no lock): it
//! receives a datagram, finds the client's session or creates one (one upstream socket
//! connected to the chosen server, plus a task that carries the server's replies back),
//! and forwards it. Before forwarding it compares the session's pinned eviction epoch
//! with its server's: when the control plane evicted the server, the session re-pins to
//! the current active set through a new upstream socket right there, so a failover takes
//! effect on the next client datagram rather than at the idle timeout.
//!
//! Per packet: no allocation (one receive buffer per port task; replies use a per-thread
//! buffer), no lock, one atomic load of the server's epoch.

use crate::health::Reason;
use crate::metrics::ListenerMetrics;
use crate::upstream::{ServerHandle, UpstreamRoute};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_536;

/// What all port tasks of one UDP listener share.
pub struct UdpListener {
    pub name: String,
    pub route: Arc<UpstreamRoute>,
    pub idle_timeout: Duration,
    pub max_sessions: usize,
    pub metrics: ListenerMetrics,
    /// Live sessions over all ports of this listener.
    live: AtomicUsize,
    /// Set on shutdown: new sessions are refused, existing ones keep flowing.
    draining: AtomicBool,
    /// Reference point for the coarse per-session activity clock.
    epoch: Instant,
}

impl UdpListener {
    pub fn new(
        name: String,
        route: Arc<UpstreamRoute>,
        idle_timeout: Duration,
        max_sessions: usize,
        metrics: ListenerMetrics,
    ) -> Arc<Self> {
        Arc::new(UdpListener {
            name,
            route,
            idle_timeout,
            max_sessions,
            metrics,
            live: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            epoch: Instant::now(),
        })
    }

    /// Live sessions.
    pub fn sessions(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Refuse new sessions from now on (graceful shutdown).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Serves one bound port until `stop` fires.
    pub fn serve(
        self: &Arc<Self>,
        socket: std::net::UdpSocket,
        stop: CancellationToken,
    ) -> io::Result<JoinHandle<()>> {
        socket.set_nonblocking(true)?;
        let socket = Arc::new(UdpSocket::from_std(socket)?);
        let port = PortTask {
            port: Port {
                shared: self.clone(),
                local_port: socket.local_addr()?.port(),
                socket,
            },
            sessions: HashMap::new(),
            ring: Ring::new(),
        };
        Ok(tokio::spawn(port.run(stop)))
    }
}

/// Binds one UDP listen socket with room for bursts.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(false).ok();
    }
    // Media arrives in bursts; a bigger buffer absorbs them while the task is busy.
    let _ = sock.set_recv_buffer_size(4 << 20);
    let _ = sock.set_send_buffer_size(4 << 20);
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// One client flow.
struct Session {
    server: Arc<ServerHandle>,
    /// The server's eviction epoch when this session was pinned to it.
    pinned_epoch: u64,
    upstream: Arc<UdpSocket>,
    shared: Arc<SessionShared>,
    replies: JoinHandle<()>,
    /// Ring slot holding a copy of the last datagram sent to the server.
    last_sent: Option<u32>,
}

/// Session state the reply task writes.
struct SessionShared {
    /// Last packet either way, in ms since the listener's epoch.
    last_activity_ms: AtomicU64,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.replies.abort();
        self.server.session_closed();
    }
}

/// Copies of recently forwarded datagrams, one fixed slot each, overwritten in turn.
///
/// When a server's port closes, the first datagram sent to it is refused by ICMP after
/// it left: the error only surfaces on the session's *next* send. Keeping a copy of each
/// session's last datagram lets that one be re-sent to the new server too, so a dead
/// server costs a flow only what was inside the dying process. One ring per port task
/// keeps the memory bounded (it does not grow with sessions).
struct Ring {
    data: Box<[u8]>,
    owner: Vec<Option<(SocketAddr, u16)>>,
    next: usize,
}

/// Slots per port task and bytes per slot: ~4 MiB, enough to cover the ~20 ms between
/// two packets of a flow at ~100k packets/s per port.
const RING_SLOTS: usize = 2048;
const RING_SLOT_BYTES: usize = 2048;

impl Ring {
    fn new() -> Self {
        Ring {
            data: vec![0u8; RING_SLOTS * RING_SLOT_BYTES].into_boxed_slice(),
            owner: vec![None; RING_SLOTS],
            next: 0,
        }
    }

    /// Stores a copy of `data` for `client`; returns the slot, or None if too large.
    fn put(&mut self, client: SocketAddr, data: &[u8]) -> Option<u32> {
        if data.len() > RING_SLOT_BYTES {
            return None;
        }
        let slot = self.next;
        self.next = (self.next + 1) % RING_SLOTS;
        let start = slot * RING_SLOT_BYTES;
        self.data[start..start + data.len()].copy_from_slice(data);
        self.owner[slot] = Some((client, data.len() as u16));
        Some(slot as u32)
    }

    /// The copy in `slot`, if it still belongs to `client`.
    fn get(&self, slot: u32, client: SocketAddr) -> Option<&[u8]> {
        let slot = slot as usize;
        match self.owner.get(slot)? {
            Some((owner, len)) if *owner == client => {
                let start = slot * RING_SLOT_BYTES;
                Some(&self.data[start..start + usize::from(*len)])
            }
            _ => None,
        }
    }
}

/// What every function of a port task needs besides the session table.
struct Port {
    shared: Arc<UdpListener>,
    local_port: u16,
    socket: Arc<UdpSocket>,
}

struct PortTask {
    port: Port,
    sessions: HashMap<SocketAddr, Session>,
    ring: Ring,
}

impl PortTask {
    async fn run(mut self, stop: CancellationToken) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let period = (self.port.shared.idle_timeout / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut sweep = tokio::time::interval(period);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let socket = self.port.socket.clone();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                r = socket.recv_from(&mut buf) => match r {
                    Ok((n, client)) => {
                        self.on_datagram(client, &buf[..n]);
                        // Drain whatever else is queued without going back through select.
                        for _ in 0..64 {
                            match socket.try_recv_from(&mut buf) {
                                Ok((n, client)) => self.on_datagram(client, &buf[..n]),
                                Err(_) => break,
                            }
                        }
                    }
                    // ICMP errors for replies we sent to clients surface here; they are
                    // the client's problem, not the listener's.
                    Err(e) => tracing::debug!(listener = %self.port.shared.name, error = %e, "udp recv"),
                },
                _ = sweep.tick() => self.sweep_idle(),
            }
        }
        let n = self.sessions.len();
        self.sessions.clear();
        self.forget(n);
    }

    fn on_datagram(&mut self, client: SocketAddr, data: &[u8]) {
        let port = &self.port;
        let shared = &port.shared;
        let now_ms = shared.now_ms();
        let m = &shared.metrics;
        if let Some(session) = self.sessions.get_mut(&client) {
            if session.server.epoch() != session.pinned_epoch {
                // The server was evicted (down, maint, removed, failback): re-pin now.
                // If the old socket holds a refusal, the previous datagram never arrived.
                let pending = session.upstream.take_error();
                tracing::debug!(%client, ?pending, "server evicted: re-pinning");
                let refused = matches!(pending, Ok(Some(e)) if passive_reason(&e).is_some());
                let Some(server) = shared.route.pick(client.ip(), &[]) else {
                    m.dropped_no_server.inc();
                    return;
                };
                if let Err(e) = repin(port, client, session, server) {
                    tracing::debug!(listener = %shared.name, error = %e, "re-pin failed");
                    m.dropped_send_error.inc();
                    return;
                }
                shared.route.migrated.inc();
                if refused {
                    resend_previous(port, &self.ring, client, session);
                }
            }
            session
                .shared
                .last_activity_ms
                .store(now_ms, Ordering::Relaxed);
            forward(port, &mut self.ring, client, session, data);
            return;
        }

        // A new session.
        if shared.draining.load(Ordering::Acquire) {
            m.dropped_draining.inc();
            m.rejected_draining.inc();
            return;
        }
        if shared.live.load(Ordering::Relaxed) >= shared.max_sessions {
            m.dropped_max_sessions.inc();
            m.rejected_max_sessions.inc();
            return;
        }
        let Some(server) = shared.route.pick(client.ip(), &[]) else {
            m.dropped_no_server.inc();
            m.rejected_no_server.inc();
            return;
        };
        let mut session = match open_session(port, client, server, now_ms) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(listener = %shared.name, error = %e, "cannot open upstream socket");
                m.dropped_send_error.inc();
                return;
            }
        };
        shared.live.fetch_add(1, Ordering::Relaxed);
        m.sessions.inc();
        m.created.inc();
        forward(port, &mut self.ring, client, &mut session, data);
        self.sessions.insert(client, session);
    }

    fn sweep_idle(&mut self) {
        let now = self.port.shared.now_ms();
        let idle = self.port.shared.idle_timeout.as_millis() as u64;
        let before = self.sessions.len();
        self.sessions.retain(|_, s| {
            now.saturating_sub(s.shared.last_activity_ms.load(Ordering::Relaxed)) < idle
        });
        self.forget(before - self.sessions.len());
    }

    fn forget(&self, removed: usize) {
        if removed > 0 {
            self.port.shared.live.fetch_sub(removed, Ordering::Relaxed);
            self.port.shared.metrics.sessions.dec_by(removed as i64);
        }
    }
}

/// Sends one client datagram to the session's server. A send refused by the server's host
/// (ICMP port unreachable reported on the connected socket) marks the server down and
/// re-sends both the refused previous datagram and this one to the next server.
fn forward(port: &Port, ring: &mut Ring, client: SocketAddr, session: &mut Session, data: &[u8]) {
    let shared = &port.shared;
    let m = &shared.metrics;
    for _attempt in 0..3 {
        match send_now(&session.upstream, data) {
            Ok(_) => {
                m.packets_to_server.inc();
                m.bytes_to_server.inc_by(data.len() as u64);
                session.last_sent = ring.put(client, data);
                return;
            }
            Err(e) => {
                let Some(reason) = passive_reason(&e) else {
                    // A full send buffer: drop, as the network would.
                    m.dropped_send_error.inc();
                    return;
                };
                let failed = session.server.clone();
                tracing::debug!(%client, server = %failed.label, error = %e, "send refused");
                shared.route.report_passive(&failed, reason, e.to_string());
                let Some(next) = shared
                    .route
                    .pick(client.ip(), std::slice::from_ref(&failed))
                else {
                    m.dropped_no_server.inc();
                    return;
                };
                if repin(port, client, session, next).is_err() {
                    m.dropped_send_error.inc();
                    return;
                }
                shared.route.migrated.inc();
                resend_previous(port, ring, client, session);
            }
        }
    }
    m.dropped_send_error.inc();
}

/// Re-sends the session's previous datagram (refused by its old server) to its new one.
fn resend_previous(port: &Port, ring: &Ring, client: SocketAddr, session: &Session) {
    let Some(prev) = session.last_sent.and_then(|slot| ring.get(slot, client)) else {
        tracing::debug!(%client, "no copy of the refused datagram left to re-send");
        return;
    };
    tracing::debug!(%client, len = prev.len(), "re-sending the datagram the old server refused");
    if send_now(&session.upstream, prev).is_ok() {
        let m = &port.shared.metrics;
        m.packets_to_server.inc();
        m.bytes_to_server.inc_by(prev.len() as u64);
    }
}

/// Sends on a connected socket with a direct syscall. tokio's `try_send` consults the
/// reactor's cached readiness first and reports WouldBlock on a socket the reactor has
/// not polled yet — which every freshly connected session socket is — so the first
/// datagram of a session would be dropped. A UDP send only blocks on a full buffer.
fn send_now(sock: &UdpSocket, data: &[u8]) -> io::Result<usize> {
    socket2::SockRef::from(sock).send(data)
}

/// `send_now` for the unconnected listen socket.
fn send_to_now(sock: &UdpSocket, data: &[u8], to: SocketAddr) -> io::Result<usize> {
    socket2::SockRef::from(sock).send_to(data, &to.into())
}

/// Errors on a connected UDP socket that mean the server (or its host) is gone.
fn passive_reason(e: &io::Error) -> Option<Reason> {
    match e.kind() {
        io::ErrorKind::ConnectionRefused
        | io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkUnreachable => Some(Reason::IcmpUnreachable),
        _ => None,
    }
}

/// A socket connected to `dest`, from an ephemeral port of the same family.
fn connect_upstream(dest: SocketAddr) -> io::Result<Arc<UdpSocket>> {
    let local: SocketAddr = match dest.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = std::net::UdpSocket::bind(local)?;
    sock.connect(dest)?;
    sock.set_nonblocking(true)?;
    Ok(Arc::new(UdpSocket::from_std(sock)?))
}

fn open_session(
    port: &Port,
    client: SocketAddr,
    server: Arc<ServerHandle>,
    now_ms: u64,
) -> io::Result<Session> {
    let pinned_epoch = server.epoch();
    let upstream = connect_upstream(server.dest(port.local_port))?;
    let state = Arc::new(SessionShared {
        last_activity_ms: AtomicU64::new(now_ms),
    });
    server.session_opened();
    let replies = spawn_replies(port, client, &server, pinned_epoch, &upstream, &state);
    Ok(Session {
        server,
        pinned_epoch,
        upstream,
        shared: state,
        replies,
        last_sent: None,
    })
}

/// Moves `session` to `server` through a new upstream socket; replies still in flight
/// from the old server die with the old socket.
fn repin(
    port: &Port,
    client: SocketAddr,
    session: &mut Session,
    server: Arc<ServerHandle>,
) -> io::Result<()> {
    let pinned_epoch = server.epoch();
    let upstream = connect_upstream(server.dest(port.local_port))?;
    session.replies.abort();
    session.server.session_closed();
    server.session_opened();
    session.replies = spawn_replies(
        port,
        client,
        &server,
        pinned_epoch,
        &upstream,
        &session.shared,
    );
    session.server = server;
    session.pinned_epoch = pinned_epoch;
    session.upstream = upstream;
    Ok(())
}

thread_local! {
    /// Reply buffer shared by every session on this worker thread: a datagram is read and
    /// sent on without an await in between, so one buffer per thread is enough.
    static REPLY_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; MAX_DATAGRAM].into_boxed_slice());
}

/// Carries the server's replies back to the client until aborted.
fn spawn_replies(
    port: &Port,
    client: SocketAddr,
    server: &Arc<ServerHandle>,
    pinned_epoch: u64,
    upstream: &Arc<UdpSocket>,
    state: &Arc<SessionShared>,
) -> JoinHandle<()> {
    let shared = port.shared.clone();
    let listen_socket = port.socket.clone();
    let server = server.clone();
    let upstream = upstream.clone();
    let state = state.clone();
    tokio::spawn(async move {
        loop {
            if upstream.readable().await.is_err() {
                return;
            }
            loop {
                let r: io::Result<()> = REPLY_BUF.with(|buf| {
                    let mut buf = buf.borrow_mut();
                    let n = upstream.try_recv(&mut buf)?;
                    let m = &shared.metrics;
                    if server.epoch() != pinned_epoch {
                        // The session has left this server; its late replies are discarded.
                        m.dropped_stale_server.inc();
                        return Ok(());
                    }
                    state
                        .last_activity_ms
                        .store(shared.now_ms(), Ordering::Relaxed);
                    match send_to_now(&listen_socket, &buf[..n], client) {
                        Ok(_) => {
                            m.packets_to_client.inc();
                            m.bytes_to_client.inc_by(n as u64);
                        }
                        Err(_) => {
                            m.dropped_send_error.inc();
                        }
                    }
                    Ok(())
                });
                match r {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        if let Some(reason) = passive_reason(&e)
                            && server.epoch() == pinned_epoch
                        {
                            shared.route.report_passive(&server, reason, e.to_string());
                        }
                        break;
                    }
                }
            }
        }
    })
}
