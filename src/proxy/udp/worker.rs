//! One worker thread of a UDP listener: starting the threads of a listener
//! ([`UdpListener::serve`]), the event loop (epoll wait, replies first, then client
//! datagrams in receive batches) and its ticks (stop check, eviction scan, idle sweep).

use super::listener::UdpListener;
use super::ring::Ring;
use super::session::{PortSock, SessionIndex, Tables, Tally};
use crate::proxy::sources::Sources;
use crate::sockio::MsgBatch;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Largest UDP payload (a slot holds any datagram).
const MAX_DATAGRAM: usize = 65_536;
/// Datagrams per `recvmmsg` on a listen socket, and per reply batch.
const BATCH: usize = 32;
/// Listen-socket batches read per wakeup before turning to replies (fairness).
const MAX_RX_ROUNDS: usize = 4;
/// New sessions a worker opens per wakeup at most, after the wakeup's datagrams of
/// established sessions went out; the rest of the new clients wait in the backlog.
const NEW_PER_WAKEUP: usize = 32;
/// Epoll events per wait.
const EVENTS: usize = 256;
/// Longest a worker sleeps in `epoll_wait`: the shutdown and idle-sweep latency.
const TICK_MS: u16 = 50;
/// Marks an epoll token as a listen socket (low bits: port index).
const LISTEN_TOKEN: u64 = 1 << 63;
/// The epoll token of the eviction eventfd (`offload: ebpf` only; see `crate::offload`).
const WAKE_TOKEN: u64 = u64::MAX;

impl UdpListener {
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

/// One worker thread of a UDP listener.
pub(super) struct Worker {
    t: Tables,
    rx: MsgBatch,
}

impl Worker {
    pub(super) fn new(
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
                backlog: Default::default(),
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

    pub(super) fn run(mut self, stop: CancellationToken) {
        let mut events = vec![EpollEvent::empty(); EVENTS];
        let idle = self.t.shared.idle_timeout;
        let sweep_every = (idle.as_millis() as u64 / 4).clamp(100, 5000);
        let mut next_sweep = 0u64;
        let mut next_stop_check = 0u64;
        loop {
            // New clients left waiting: look again at once (after whatever is ready).
            let wait = if self.t.backlog.is_empty() {
                EpollTimeout::from(TICK_MS)
            } else {
                EpollTimeout::ZERO
            };
            let n = match self.t.epoll.wait(&mut events, wait) {
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
            // Established flows are out: now a bounded number of new sessions.
            self.t.admit_backlog(NEW_PER_WAKEUP);
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
                self.t
                    .sweep_idle(idle.as_millis() as u64, Duration::from_millis(sweep_every));
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
