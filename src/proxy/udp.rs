//! The UDP proxy: where a client datagram goes.
//!
//! Each UDP listener runs `workers` threads. Every thread has its own `SO_REUSEPORT`
//! socket on each listen port (the kernel spreads clients over them by 4-tuple hash, so a
//! client always lands on the same thread), its own epoll instance, and its own share of
//! the sessions: a table no other thread touches, so the hot path takes no lock and
//! bounces no cache line between cores.
//!
//! A session is one client (listen port + client address) and one upstream socket
//! connected to its server, registered in the owning thread's epoll. Per wakeup a thread:
//!
//! - reads client datagrams in batches (`recvmmsg`) and sends each on its session's
//!   upstream socket (one `send`, no copy except a copy kept for a possible re-send);
//! - reads server replies straight into the slots of a per-port outgoing batch (one
//!   `recvmmsg` per ready upstream socket takes everything queued) and sends all replies
//!   of the wakeup back to their clients with one `sendmmsg` per listen port;
//! - adds its packet and byte counts to the shared counters once, not per packet.
//!
//! Before forwarding a client datagram the thread compares the session's pinned eviction
//! epoch with its server's: when the control plane evicted the server, the session
//! re-pins to the current active set through a new upstream socket right there, so a
//! failover takes effect on the next client datagram rather than at the idle timeout.
//! A datagram the old server refused (ICMP port unreachable, reported on the connected
//! socket) is re-sent to the new one from a ring of recent copies.
//!
//! A new session is admitted only within the listener's `max_sessions`, its source's
//! fair share (`sources`) and the process's file-descriptor budget (`crate::fdbudget`);
//! refusals are counted, never logged per datagram.
//!
//! With `offload: ebpf` an established session is also installed in the kernel fast path
//! (`crate::offload`): its datagrams then bypass this thread. The hooks are the
//! `offload_*` methods at the end of `impl Tables` (install after a forward, removal on
//! eviction, refusal, re-pin and close, last-seen times for the idle sweep).

use super::ports::{self, PortLease};
use super::sources::{Admission, Refusal, Sources};
use super::sys::{self, MsgBatch};
use crate::config::{Protocol, SessionConfig};
use crate::fdbudget::{self, Permit};
use crate::health::Reason;
use crate::metrics::ListenerMetrics;
use crate::offload::{ListenerOffload, SessionKeys};
use crate::ratelog::RateLimit;
use crate::upstream::{ServerHandle, UpstreamRoute};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Largest UDP payload (a slot holds any datagram).
const MAX_DATAGRAM: usize = 65_536;
/// Datagrams per `recvmmsg` on a listen socket, and per reply batch.
const BATCH: usize = 32;
/// Listen-socket batches read per wakeup before turning to replies (fairness).
const MAX_RX_ROUNDS: usize = 4;
/// Epoll events per wait.
const EVENTS: usize = 256;
/// Longest a worker sleeps in `epoll_wait`: the shutdown and idle-sweep latency.
const TICK_MS: u16 = 50;
/// Receive buffer limit of each upstream socket.
const UPSTREAM_RCVBUF: usize = 1 << 20;
/// Marks an epoll token as a listen socket (low bits: port index).
const LISTEN_TOKEN: u64 = 1 << 63;
/// The epoll token of the eviction eventfd (`offload: ebpf` only; see `crate::offload`).
const WAKE_TOKEN: u64 = u64::MAX;

/// What all worker threads of one UDP listener share.
pub struct UdpListener {
    pub name: String,
    pub route: Arc<UpstreamRoute>,
    pub idle_timeout: Duration,
    pub max_sessions: usize,
    /// `session.new_per_source_per_second` (0: off).
    pub new_per_source_per_second: u32,
    /// `session.max_per_source` (0: off).
    pub max_per_source: usize,
    pub metrics: ListenerMetrics,
    /// Failures to open an upstream socket: logged a few times per window, not per datagram.
    open_failures: RateLimit,
    /// Live sessions over all ports and threads of this listener.
    live: AtomicUsize,
    /// Set on shutdown: new sessions are refused, existing ones keep flowing.
    draining: AtomicBool,
    /// Reference point for the coarse per-session activity clock.
    epoch: Instant,
    /// The kernel fast path, when `offload: ebpf` and it is available.
    offload: OnceLock<Arc<ListenerOffload>>,
}

impl UdpListener {
    pub fn new(
        name: String,
        route: Arc<UpstreamRoute>,
        session: &SessionConfig,
        metrics: ListenerMetrics,
    ) -> Arc<Self> {
        Arc::new(UdpListener {
            name,
            route,
            idle_timeout: session.idle_timeout.get(),
            max_sessions: session.max_sessions,
            new_per_source_per_second: session.new_per_source_per_second,
            max_per_source: session.max_per_source,
            metrics,
            open_failures: RateLimit::new("udp_open_upstream", Duration::from_secs(10), 5),
            live: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            epoch: Instant::now(),
            offload: OnceLock::new(),
        })
    }

    /// Turns the kernel fast path on for this listener (before [`UdpListener::serve`]).
    pub fn enable_offload(&self, offload: Arc<ListenerOffload>) {
        let _ = self.offload.set(offload);
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

    /// Serves the listener's ports until `stop` fires. `ports[p][w]` is worker `w`'s
    /// socket on port `p` (see [`bind_group`]); every port has the same number of sockets.
    /// The sockets are shared (a reload hands a port's sockets from the listener it
    /// replaces to the new one without closing them).
    ///
    /// Everything that can fail (epoll instances, registrations, threads) happens here;
    /// the threads then wait until `start` fires before they read a datagram, so a reload
    /// can prepare a listener and still drop it. Worker threads stop within a tick of
    /// `stop` firing or of the returned task being aborted or dropped.
    pub fn serve(
        self: &Arc<Self>,
        ports: Vec<Vec<Arc<UdpSocket>>>,
        stop: CancellationToken,
        start: CancellationToken,
    ) -> io::Result<JoinHandle<()>> {
        let workers = ports.first().map_or(0, Vec::len);
        if workers == 0 || ports.iter().any(|p| p.len() != workers) {
            return Err(io::Error::other("every port needs one socket per worker"));
        }
        // Transpose: worker w gets socket w of every port.
        let mut per_worker: Vec<Vec<Arc<UdpSocket>>> = (0..workers).map(|_| Vec::new()).collect();
        for port in ports {
            for (w, s) in port.into_iter().enumerate() {
                per_worker[w].push(s);
            }
        }
        // Workers watch a child token; the returned task holds a guard that cancels it
        // when the task ends or is dropped (shutdown, aborted start-up, runtime drop),
        // so the threads never outlive the listener's owner.
        let workers_stop = stop.child_token();
        // Created first: an error below drops it and stops the threads already started.
        let guard = workers_stop.clone().drop_guard();
        let runtime = tokio::runtime::Handle::current();
        for (w, socks) in per_worker.into_iter().enumerate() {
            let worker = Worker::new(self.clone(), socks, workers)?;
            let stop = workers_stop.clone();
            let start = start.clone();
            let runtime = runtime.clone();
            std::thread::Builder::new()
                .name(format!("udp-{}-{w}", self.name))
                .spawn(move || {
                    let go = runtime.block_on(async {
                        tokio::select! {
                            _ = start.cancelled() => true,
                            _ = stop.cancelled() => false,
                        }
                    });
                    if go {
                        worker.run(stop);
                    }
                })?;
        }
        Ok(tokio::spawn(async move {
            let _guard = guard;
            stop.cancelled().await;
        }))
    }
}

/// Worker threads per UDP listener: `$MEDIAGATE_UDP_WORKERS`, else one per CPU.
pub fn default_workers() -> usize {
    std::env::var("MEDIAGATE_UDP_WORKERS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .min(64)
}

/// Binds `workers` `SO_REUSEPORT` sockets on `addr`, with room for bursts. A port that
/// another socket already holds fails here, as a plain bind would.
pub fn bind_group(addr: SocketAddr, workers: usize) -> io::Result<Vec<UdpSocket>> {
    let new = || {
        let domain = socket2::Domain::for_address(addr);
        let sock =
            socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        if addr.is_ipv6() {
            sock.set_only_v6(false).ok();
        }
        // Media arrives in bursts; a bigger buffer absorbs them while the worker is busy.
        let _ = sock.set_recv_buffer_size(4 << 20);
        let _ = sock.set_send_buffer_size(4 << 20);
        io::Result::Ok(sock)
    };
    // Probe without SO_REUSEPORT first: a port in use (even by a reuseport group of
    // another process) must fail start-up, not silently share traffic.
    let mut addr = addr;
    {
        let probe = new()?;
        probe.bind(&addr.into())?;
        if addr.port() == 0 {
            addr = probe
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("bound socket has no address"))?;
        }
    }
    let mut out = Vec::with_capacity(workers.max(1));
    for _ in 0..workers.max(1) {
        let sock = new()?;
        sock.set_reuse_port(true)?;
        sock.bind(&addr.into())?;
        sock.set_nonblocking(true)?;
        out.push(sock.into());
    }
    Ok(out)
}

/// One client flow, owned by one worker thread.
struct Session {
    client: SocketAddr,
    /// Index of the listen port (into the worker's `ports`).
    port: u16,
    server: Arc<ServerHandle>,
    /// The server's eviction epoch when this session was pinned to it.
    pinned_epoch: u64,
    upstream: UdpSocket,
    /// The local port `upstream` holds for its server. Declared after `upstream`: the
    /// port is handed out again only once the socket is closed.
    lease: PortLease,
    /// Last packet either way, in ms since the listener's epoch.
    last_activity_ms: u64,
    /// Ring slot holding a copy of the last datagram sent to the server.
    last_sent: Option<u32>,
    /// The upstream socket reported a refusal (ICMP unreachable) on the reply side: the
    /// last datagram never arrived; move and re-send it with the next client datagram.
    refused: bool,
    /// How the session counts in its source's share (released when it closes).
    admission: Admission,
    /// Its entries in the kernel fast path, while installed.
    offload: Option<SessionKeys>,
    /// Installing was tried for the current server (not retried per datagram).
    offload_tried: bool,
    /// The descriptor `upstream` holds in the process's budget. Declared last: given
    /// back only once the socket is closed.
    _permit: Permit,
}

/// Where a worker finds a client's session: (listen port index, client address) to the
/// session's slab slot. Public for the micro-benchmarks of the per-packet path.
#[derive(Default)]
pub struct SessionIndex {
    map: HashMap<(u16, SocketAddr), u32>,
}

impl SessionIndex {
    #[inline]
    pub fn get(&self, port: u16, client: SocketAddr) -> Option<&u32> {
        self.map.get(&(port, client))
    }
    pub fn insert(&mut self, port: u16, client: SocketAddr, slot: u32) {
        self.map.insert((port, client), slot);
    }
    pub fn remove(&mut self, port: u16, client: SocketAddr) -> Option<u32> {
        self.map.remove(&(port, client))
    }
    pub fn clear(&mut self) {
        self.map.clear();
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A slab slot: the generation tells a stale epoll token from the slot's current session.
struct Slot {
    gen_: u32,
    session: Option<Session>,
}

/// Copies of recently forwarded datagrams, one fixed slot each, overwritten in turn.
///
/// When a server's port closes, the first datagram sent to it is refused by ICMP after
/// it left: the error only surfaces afterwards on the session's socket. Keeping a copy of
/// each session's last datagram lets that one be re-sent to the new server too, so a dead
/// server costs a flow only what was inside the dying process. One ring per worker keeps
/// the memory bounded (it does not grow with sessions).
pub struct Ring {
    data: Box<[u8]>,
    /// (session slot, generation, length) of each copy.
    owner: Box<[(u32, u32, u16)]>,
    next: usize,
}

/// Slots per worker and bytes per slot: 4 MiB, enough to cover the ~20 ms between two
/// packets of a flow at ~100k packets/s per worker.
const RING_SLOTS: usize = 2048;
const RING_SLOT_BYTES: usize = 2048;

impl Default for Ring {
    fn default() -> Self {
        Self::new()
    }
}

impl Ring {
    pub fn new() -> Self {
        Ring {
            data: vec![0u8; RING_SLOTS * RING_SLOT_BYTES].into_boxed_slice(),
            owner: vec![(u32::MAX, 0, 0); RING_SLOTS].into_boxed_slice(),
            next: 0,
        }
    }

    /// Stores a copy of `data` for session `(idx, gen_)`; returns the slot, or None if
    /// the datagram is too large to keep.
    #[inline]
    pub fn put(&mut self, idx: u32, gen_: u32, data: &[u8]) -> Option<u32> {
        if data.len() > RING_SLOT_BYTES {
            return None;
        }
        let slot = self.next;
        self.next = (self.next + 1) % RING_SLOTS;
        let start = slot * RING_SLOT_BYTES;
        self.data[start..start + data.len()].copy_from_slice(data);
        self.owner[slot] = (idx, gen_, data.len() as u16);
        Some(slot as u32)
    }

    /// The copy in `slot`, if it still belongs to session `(idx, gen_)`.
    pub fn get(&self, slot: u32, idx: u32, gen_: u32) -> Option<&[u8]> {
        let slot = slot as usize;
        match self.owner.get(slot)? {
            (i, g, len) if *i == idx && *g == gen_ => {
                let start = slot * RING_SLOT_BYTES;
                Some(&self.data[start..start + usize::from(*len)])
            }
            _ => None,
        }
    }
}

/// Packet and byte counts of one wakeup, added to the shared counters once.
#[derive(Default)]
struct Tally {
    packets_to_server: u64,
    bytes_to_server: u64,
    packets_to_client: u64,
    bytes_to_client: u64,
    send_errors: u64,
    stale: u64,
}

impl Tally {
    #[inline]
    fn add_to_server(&mut self, n: usize) {
        self.packets_to_server += 1;
        self.bytes_to_server += n as u64;
    }

    fn publish(&mut self, m: &ListenerMetrics) {
        if self.packets_to_server > 0 {
            m.packets_to_server.inc_by(self.packets_to_server);
            m.bytes_to_server.inc_by(self.bytes_to_server);
        }
        if self.packets_to_client > 0 {
            m.packets_to_client.inc_by(self.packets_to_client);
            m.bytes_to_client.inc_by(self.bytes_to_client);
        }
        if self.send_errors > 0 {
            m.dropped_send_error.inc_by(self.send_errors);
        }
        if self.stale > 0 {
            m.dropped_stale_server.inc_by(self.stale);
        }
        *self = Tally::default();
    }
}

/// A listen port as one worker sees it.
struct PortSock {
    sock: Arc<UdpSocket>,
    local_port: u16,
    /// The listen address (the fast path matches datagrams sent to it).
    local: SocketAddr,
    /// Replies of this wakeup waiting to go out through `sock`.
    out: MsgBatch,
}

/// Everything a worker owns except its receive batch (kept apart so a received
/// datagram can be borrowed while the tables are updated).
struct Tables {
    shared: Arc<UdpListener>,
    epoll: Epoll,
    ports: Vec<PortSock>,
    index: SessionIndex,
    slab: Vec<Slot>,
    free: Vec<u32>,
    ring: Ring,
    tally: Tally,
    now_ms: u64,
    /// This worker's share of the per-source limits.
    sources: Sources,
    /// The kernel fast path (`offload: ebpf`), if available.
    offload: Option<Arc<ListenerOffload>>,
    /// Woken when a server is evicted (with `offload` only).
    waker: Option<crate::offload::Waker>,
}

/// One worker thread of a UDP listener.
struct Worker {
    t: Tables,
    rx: MsgBatch,
}

#[inline]
fn token(idx: u32, gen_: u32) -> u64 {
    (u64::from(gen_ & 0x7fff_ffff) << 32) | u64::from(idx)
}

impl Worker {
    fn new(
        shared: Arc<UdpListener>,
        socks: Vec<Arc<UdpSocket>>,
        workers: usize,
    ) -> io::Result<Worker> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        let mut ports = Vec::with_capacity(socks.len());
        for (i, sock) in socks.into_iter().enumerate() {
            sock.set_nonblocking(true)?;
            epoll
                .add(
                    sock.as_fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN, LISTEN_TOKEN | i as u64),
                )
                .map_err(io::Error::from)?;
            let local = sock.local_addr()?;
            ports.push(PortSock {
                local_port: local.port(),
                local,
                sock,
                out: MsgBatch::new(BATCH, MAX_DATAGRAM),
            });
        }
        let waker = match shared.offload.get() {
            Some(_) => {
                let w = crate::offload::Waker::new()?;
                epoll
                    .add(w.fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN))
                    .map_err(io::Error::from)?;
                Some(w)
            }
            None => None,
        };
        Ok(Worker {
            t: Tables {
                waker,
                epoll,
                ports,
                index: SessionIndex::default(),
                slab: Vec::new(),
                free: Vec::new(),
                ring: Ring::new(),
                tally: Tally::default(),
                now_ms: 0,
                sources: Sources::new(
                    shared.new_per_source_per_second,
                    shared.max_per_source,
                    workers,
                ),
                offload: shared.offload.get().cloned(),
                shared,
            },
            rx: MsgBatch::new(BATCH, MAX_DATAGRAM),
        })
    }

    fn run(mut self, stop: CancellationToken) {
        let mut events = vec![EpollEvent::empty(); EVENTS];
        let idle = self.t.shared.idle_timeout;
        let sweep_every = (idle.as_millis() as u64 / 4).clamp(100, 5000);
        let mut next_sweep = 0u64;
        let mut next_stop_check = 0u64;
        loop {
            let n = match self.t.epoll.wait(&mut events, EpollTimeout::from(TICK_MS)) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => {
                    tracing::error!(listener = %self.t.shared.name, error = %e, "epoll_wait failed; worker stops");
                    break;
                }
            };
            self.t.now_ms = self.t.shared.now_ms();
            // Replies first, and out before any client datagram is forwarded: a reply
            // then never waits behind a batch of upstream sends.
            for ev in &events[..n] {
                let tok = ev.data();
                if tok & LISTEN_TOKEN == 0 {
                    let idx = (tok & 0xffff_ffff) as u32;
                    let gen_ = (tok >> 32) as u32;
                    self.t.on_reply_ready(idx, gen_);
                }
            }
            self.t.flush_replies();
            for ev in &events[..n] {
                let tok = ev.data();
                if tok == WAKE_TOKEN {
                    if let Some(w) = &self.t.waker {
                        w.drain();
                    }
                    self.t.offload_scan();
                } else if tok & LISTEN_TOKEN != 0 {
                    self.on_listen_ready((tok & 0xffff) as usize);
                }
            }
            self.t.tally.publish(&self.t.shared.metrics);
            let now = self.t.now_ms;
            if now >= next_stop_check {
                // Checked at most every tick: the token's state sits behind a mutex.
                if stop.is_cancelled() {
                    break;
                }
                next_stop_check = now + u64::from(TICK_MS);
                self.t.offload_scan();
            }
            if now >= next_sweep {
                self.t.sweep_idle(idle.as_millis() as u64);
                next_sweep = now + sweep_every;
            }
        }
        self.t.close_all();
    }

    /// Reads client datagrams from listen port `p` in batches and forwards each.
    fn on_listen_ready(&mut self, p: usize) {
        let Some(fd) = self.t.ports.get(p).map(|s| s.sock.as_raw_fd()) else {
            return;
        };
        for _ in 0..MAX_RX_ROUNDS {
            let n = match self.rx.recv_from(fd) {
                Ok(n) => n,
                // ICMP errors for replies sent to clients surface here; they are the
                // client's problem, not the listener's.
                Err(e) => {
                    tracing::trace!(listener = %self.t.shared.name, error = %e, "udp recv");
                    continue;
                }
            };
            for i in 0..n {
                let (data, client, truncated) = self.rx.get(i);
                let Some(client) = client else { continue };
                if truncated {
                    self.t.tally.send_errors += 1;
                    continue;
                }
                self.t.on_datagram(p as u16, client, data);
            }
            if n < self.rx.capacity() {
                break;
            }
            // Replies may be piling up while clients keep us busy: send them now.
            self.t.flush_replies();
        }
    }
}

impl Tables {
    /// Routes one client datagram that arrived on listen port `p`.
    fn on_datagram(&mut self, p: u16, client: SocketAddr, data: &[u8]) {
        if let Some(&idx) = self.index.get(p, client) {
            self.forward_existing(idx, data);
            return;
        }
        self.new_session(p, client, data);
    }

    fn forward_existing(&mut self, idx: u32, data: &[u8]) {
        let shared = &self.shared;
        let now_ms = self.now_ms;
        let Some(slot) = self.slab.get_mut(idx as usize) else {
            return;
        };
        let gen_ = slot.gen_;
        let Some(session) = slot.session.as_mut() else {
            return;
        };
        if session.refused || session.server.epoch() != session.pinned_epoch {
            // The server was evicted (down, maint, removed, failback) or refused the last
            // datagram: re-pin now. If the old socket holds a refusal, the previous
            // datagram never arrived.
            let pending = session.upstream.take_error();
            let refused = session.refused
                || matches!(pending, Ok(Some(ref e)) if passive_reason(e).is_some());
            tracing::debug!(client = %session.client, ?pending, refused, "re-pinning");
            let exclude = if refused {
                std::slice::from_ref(&session.server)
            } else {
                &[]
            };
            let Some(server) = shared.route.pick(session.client.ip(), exclude) else {
                shared.metrics.dropped_no_server.inc();
                return;
            };
            let local_port = self.ports[usize::from(session.port)].local_port;
            if let Err(e) = repin(shared, &self.epoll, local_port, idx, gen_, session, server) {
                tracing::debug!(listener = %shared.name, error = %e, "re-pin failed");
                self.tally.send_errors += 1;
                return;
            }
            shared.route.migrated.inc();
            if refused {
                resend_previous(&self.ring, idx, gen_, session, &mut self.tally);
            }
        }
        session.last_activity_ms = now_ms;
        forward(
            shared,
            &self.epoll,
            &self.ports,
            &mut self.ring,
            &mut self.tally,
            idx,
            gen_,
            session,
            data,
        );
        self.offload_install(idx);
    }

    fn new_session(&mut self, p: u16, client: SocketAddr, data: &[u8]) {
        let shared = &self.shared;
        let m = &shared.metrics;
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
        let admission = match self.sources.admit(client.ip(), self.now_ms) {
            Ok(a) => a,
            Err(Refusal::Rate) => {
                m.dropped_source_rate.inc();
                m.rejected_source_rate.inc();
                return;
            }
            Err(Refusal::Sessions) => {
                m.dropped_source_sessions.inc();
                m.rejected_source_sessions.inc();
                return;
            }
        };
        // One descriptor: the session's upstream socket.
        let Some(permit) = fdbudget::global().try_acquire(1) else {
            self.sources.closed(client.ip(), admission);
            m.dropped_fd_budget.inc();
            m.rejected_fd_budget.inc();
            return;
        };
        let Some(server) = shared.route.pick(client.ip(), &[]) else {
            self.sources.closed(client.ip(), admission);
            m.dropped_no_server.inc();
            m.rejected_no_server.inc();
            return;
        };
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slab.push(Slot {
                    gen_: 0,
                    session: None,
                });
                (self.slab.len() - 1) as u32
            }
        };
        let slot = &mut self.slab[idx as usize];
        slot.gen_ = slot.gen_.wrapping_add(1) & 0x7fff_ffff;
        let gen_ = slot.gen_;
        let local_port = self.ports[usize::from(p)].local_port;
        let pinned_epoch = server.epoch();
        let (upstream, lease) = match open_upstream(
            &self.epoll,
            server.dest(local_port),
            token(idx, gen_),
        ) {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, buffers or local ports: the balancer's own problem,
                // never the server's; logged a few times per window, counted always.
                if shared.open_failures.allow() {
                    tracing::warn!(listener = %shared.name, server = %server.label, error = %e, "cannot open upstream socket; new session refused");
                }
                if crate::health::is_local_error(&e) {
                    m.dropped_local_error.inc();
                    m.rejected_local_error.inc();
                } else {
                    m.dropped_send_error.inc();
                }
                self.sources.closed(client.ip(), admission);
                self.free.push(idx);
                return;
            }
        };
        server.session_opened();
        shared.live.fetch_add(1, Ordering::Relaxed);
        m.sessions.inc();
        m.created.inc();
        let session = slot.session.insert(Session {
            client,
            port: p,
            server,
            pinned_epoch,
            upstream,
            lease,
            last_activity_ms: self.now_ms,
            last_sent: None,
            refused: false,
            admission,
            offload: None,
            offload_tried: false,
            _permit: permit,
        });
        self.index.insert(p, client, idx);
        forward(
            shared,
            &self.epoll,
            &self.ports,
            &mut self.ring,
            &mut self.tally,
            idx,
            gen_,
            session,
            data,
        );
        self.offload_install(idx);
    }

    /// Reads whatever the server of session `idx` sent, straight into the outgoing batch
    /// of the session's listen port.
    fn on_reply_ready(&mut self, idx: u32, gen_: u32) {
        let Some(slot) = self.slab.get_mut(idx as usize) else {
            return;
        };
        if slot.gen_ != gen_ {
            return; // the session that owned this token is gone
        }
        let Some(session) = slot.session.as_mut() else {
            return;
        };
        let port = &mut self.ports[usize::from(session.port)];
        let fd = session.upstream.as_raw_fd();
        // A few rounds at most, so one busy session cannot starve the others.
        for _ in 0..4 {
            if port.out.is_full() {
                let (_, dropped) = port.out.flush(port.sock.as_raw_fd());
                self.tally.send_errors += dropped as u64;
            }
            let room = port.out.capacity() - port.out.len();
            match port.out.recv_append(fd, room) {
                Ok(0) => return,
                Ok(n) => {
                    if session.server.epoch() != session.pinned_epoch {
                        // The session has left this server; its late replies are dropped.
                        port.out.truncate_by(n);
                        self.tally.stale += n as u64;
                    } else {
                        let bytes = port.out.address_last(n, session.client);
                        self.tally.packets_to_client += n as u64;
                        self.tally.bytes_to_client += bytes as u64;
                        session.last_activity_ms = self.now_ms;
                    }
                    if n < room {
                        return;
                    }
                }
                Err(e) => {
                    if passive_reason(&e).is_some() {
                        // A refused offloaded datagram: the next one must come up here
                        // now (to re-pin), not at the next tick's eviction scan.
                        offload_remove(self.offload.as_deref(), session);
                    }
                    if let Some(reason) = passive_reason(&e)
                        && session.server.epoch() == session.pinned_epoch
                    {
                        tracing::debug!(client = %session.client, server = %session.server.label, error = %e, "server refused");
                        self.shared.route.report_passive(
                            &session.server,
                            Protocol::Udp,
                            reason,
                            e.to_string(),
                        );
                        session.refused = true;
                    }
                    return;
                }
            }
        }
    }

    /// Sends the replies gathered in this wakeup.
    fn flush_replies(&mut self) {
        for port in &mut self.ports {
            if !port.out.is_empty() {
                let (_, dropped) = port.out.flush(port.sock.as_raw_fd());
                self.tally.send_errors += dropped as u64;
            }
        }
    }

    fn sweep_idle(&mut self, idle_ms: u64) {
        let now = self.now_ms;
        self.offload_last_seen();
        let mut removed = 0usize;
        for slot in &mut self.slab {
            let expired = slot
                .session
                .as_ref()
                .is_some_and(|s| now.saturating_sub(s.last_activity_ms) >= idle_ms);
            if expired && let Some(mut s) = slot.session.take() {
                offload_remove(self.offload.as_deref(), &mut s);
                self.index.remove(s.port, s.client);
                self.sources.closed(s.client.ip(), s.admission);
                s.server.session_closed();
                removed += 1;
            }
        }
        self.sources.sweep(now);
        if removed > 0 {
            self.shared.metrics.closed_idle.inc_by(removed as u64);
            self.free.clear();
            for (i, slot) in self.slab.iter().enumerate() {
                if slot.session.is_none() {
                    self.free.push(i as u32);
                }
            }
            self.forget(removed);
        }
    }

    fn close_all(&mut self) {
        let mut removed = 0;
        for slot in &mut self.slab {
            if let Some(mut s) = slot.session.take() {
                offload_remove(self.offload.as_deref(), &mut s);
                s.server.session_closed();
                removed += 1;
            }
        }
        self.index.clear();
        self.forget(removed);
    }

    fn forget(&self, removed: usize) {
        if removed > 0 {
            self.shared.live.fetch_sub(removed, Ordering::Relaxed);
            self.shared.metrics.sessions.dec_by(removed as i64);
        }
    }

    // ---- Kernel fast path hooks (`offload: ebpf`, see `crate::offload`) ----

    /// Installs session `idx` in the fast path once per server, after a datagram went out
    /// through its upstream socket (so the socket's addresses are final).
    fn offload_install(&mut self, idx: u32) {
        let Some(off) = self.offload.as_deref() else {
            return;
        };
        let Some(session) = self
            .slab
            .get_mut(idx as usize)
            .and_then(|s| s.session.as_mut())
        else {
            return;
        };
        if session.offload_tried
            || session.refused
            || session.server.epoch() != session.pinned_epoch
        {
            return;
        }
        session.offload_tried = true;
        let (Ok(local), Ok(server)) = (session.upstream.local_addr(), session.upstream.peer_addr())
        else {
            return;
        };
        let listen = self.ports[usize::from(session.port)].local;
        session.offload = off.install(session.client, listen, local, server);
        if session.offload.is_some() {
            // The ring's copy predates the offloaded datagrams: re-sending it after a
            // refusal would replay old media.
            session.last_sent = None;
        }
    }

    /// Removes the entries of offloaded sessions whose server was evicted (epoch moved)
    /// or refused: their next datagram comes up here and re-pins. Runs every tick.
    fn offload_scan(&mut self) {
        let Some(off) = self.offload.as_deref() else {
            return;
        };
        for slot in &mut self.slab {
            if let Some(s) = slot.session.as_mut()
                && s.offload.is_some()
                && (s.refused || s.server.epoch() != s.pinned_epoch)
            {
                offload_remove(Some(off), s);
            }
        }
    }

    /// Brings each offloaded session's activity time up to its last datagram in the
    /// kernel (before the idle sweep decides).
    fn offload_last_seen(&mut self) {
        let Some(off) = self.offload.as_deref() else {
            return;
        };
        let now = self.now_ms;
        for slot in &mut self.slab {
            if let Some(s) = slot.session.as_mut()
                && let Some(keys) = &s.offload
                && let Some(idle_ns) = off.idle_ns(keys)
            {
                let seen = now.saturating_sub(idle_ns / 1_000_000);
                s.last_activity_ms = s.last_activity_ms.max(seen);
            }
        }
    }
}

/// Takes a session out of the fast path (before its upstream socket closes or moves).
fn offload_remove(off: Option<&ListenerOffload>, session: &mut Session) {
    if let (Some(off), Some(keys)) = (off, session.offload.take()) {
        off.remove(&keys);
    }
}

/// Sends one client datagram to the session's server. A send refused by the server's host
/// (ICMP port unreachable reported on the connected socket) marks the server down and
/// re-sends both the refused previous datagram and this one to the next server.
#[allow(clippy::too_many_arguments)]
#[inline]
fn forward(
    shared: &UdpListener,
    epoll: &Epoll,
    ports: &[PortSock],
    ring: &mut Ring,
    tally: &mut Tally,
    idx: u32,
    gen_: u32,
    session: &mut Session,
    data: &[u8],
) {
    for _attempt in 0..3 {
        match sys::send(session.upstream.as_raw_fd(), data) {
            Ok(_) => {
                tally.add_to_server(data.len());
                session.last_sent = ring.put(idx, gen_, data);
                return;
            }
            Err(e) => {
                let Some(reason) = passive_reason(&e) else {
                    // A full send buffer: drop, as the network would.
                    tally.send_errors += 1;
                    return;
                };
                let failed = session.server.clone();
                tracing::debug!(client = %session.client, server = %failed.label, error = %e, "send refused");
                shared
                    .route
                    .report_passive(&failed, Protocol::Udp, reason, e.to_string());
                let Some(next) = shared
                    .route
                    .pick(session.client.ip(), std::slice::from_ref(&failed))
                else {
                    shared.metrics.dropped_no_server.inc();
                    return;
                };
                let local_port = ports[usize::from(session.port)].local_port;
                if repin(shared, epoll, local_port, idx, gen_, session, next).is_err() {
                    tally.send_errors += 1;
                    return;
                }
                shared.route.migrated.inc();
                resend_previous(ring, idx, gen_, session, tally);
            }
        }
    }
    tally.send_errors += 1;
}

/// Re-sends the session's previous datagram (refused by its old server) to its new one.
fn resend_previous(ring: &Ring, idx: u32, gen_: u32, session: &Session, tally: &mut Tally) {
    let Some(prev) = session.last_sent.and_then(|slot| ring.get(slot, idx, gen_)) else {
        tracing::debug!(client = %session.client, "no copy of the refused datagram left to re-send");
        return;
    };
    tracing::debug!(client = %session.client, len = prev.len(), "re-sending the datagram the old server refused");
    if sys::send(session.upstream.as_raw_fd(), prev).is_ok() {
        tally.add_to_server(prev.len());
    }
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

/// A non-blocking socket connected to `dest`, from a local port no other session to
/// `dest` holds (see [`ports`]), registered in `epoll` under `tok`.
fn open_upstream(epoll: &Epoll, dest: SocketAddr, tok: u64) -> io::Result<(UdpSocket, PortLease)> {
    let (sock, lease) = ports::connect_shared(dest, UPSTREAM_RCVBUF)?;
    epoll
        .add(sock.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, tok))
        .map_err(io::Error::from)?;
    Ok((sock, lease))
}

/// Moves `session` to `server` through a new upstream socket; replies still in flight
/// from the old server die with the old socket.
fn repin(
    shared: &UdpListener,
    epoll: &Epoll,
    local_port: u16,
    idx: u32,
    gen_: u32,
    session: &mut Session,
    server: Arc<ServerHandle>,
) -> io::Result<()> {
    let pinned_epoch = server.epoch();
    let (upstream, lease) = open_upstream(epoll, server.dest(local_port), token(idx, gen_))?;
    offload_remove(shared.offload.get().map(|o| &**o), session);
    session.offload_tried = false;
    session.server.session_closed();
    server.session_opened();
    // Dropping the old socket closes it, which also removes it from the epoll set; then
    // its port goes back to the table.
    session.upstream = upstream;
    session.lease = lease;
    session.server = server;
    session.pinned_epoch = pinned_epoch;
    session.refused = false;
    Ok(())
}
