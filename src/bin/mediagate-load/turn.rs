//! The TURN load generator (`mediagate-load turn`): N allocations on one TURN server, each
//! with a permission and a channel towards one echo peer, then open-loop ChannelData (or
//! Send indications) at a fixed total rate from several threads, whatever comes back.
//!
//! Each allocation is its own socket (UDP, connected to the server; or a TCP connection).
//! The allocations are split into shards, one sender and one receiver thread per shard.
//! The hot loop is hand-rolled: a ChannelData frame (4-byte header, padded to four bytes
//! over TCP) or a Send indication template whose payload is rewritten in place; the
//! payload is the load generator's header (flow, sequence, send time), so the receiver
//! measures round-trip times, replies and each allocation's longest silence exactly as
//! the plain UDP generator does ([`crate::loadgen::Report`]).
//!
//! Self-checks, so that the generator is not the bottleneck unnoticed: the kernel drops in
//! its own sockets' receive queues (the `drops` column of `/proc/net/udp` for its ports,
//! read before and after each run), the echo peer's drops (`--peer-pid`: the same column
//! in the peer's network namespace) and the sender's worst lag behind its schedule.
//!
//! Runs are independent: before each, the generator waits until the server has been idle
//! for 200 ms (TCP loses nothing, so an overloaded run leaves a backlog the server keeps
//! relaying), and a TCP stream is never cut between runs (unsent bytes and partly received
//! frames carry over), so a later run's frames stay aligned.

use crate::loadgen::{self, HEADER, Report, Trial};
use crate::stats::{self, Histogram};
use crate::turnctl::{self, Allocation, Control, Credentials};
use mediagate::sockio::{self as sys, MsgBatch};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::collections::HashSet;
use std::io;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What the generator sends the peer through each allocation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// ChannelData on a bound channel (the media path of every WebRTC client).
    Channel,
    /// Send indications (and Data indications back): no channel is bound.
    Send,
}

/// How the load is made.
#[derive(Clone)]
pub struct Options {
    pub server: SocketAddr,
    pub tcp: bool,
    pub allocations: usize,
    /// Payload bytes per packet (at least the generator's 24-byte header).
    pub size: usize,
    pub peer: SocketAddr,
    pub creds: Credentials,
    /// Sender/receiver thread pairs.
    pub threads: usize,
    pub mode: Mode,
    /// The echo peer's process, to read its socket drops (`/proc/PID/net/udp*`: its
    /// network namespace's table).
    pub peer_pid: Option<u32>,
}

/// One allocation's socket and its frame template.
struct Flow {
    fd: RawFd,
    /// Deleted (Refresh 0) when the generator is dropped.
    alloc: Allocation,
    /// Keeps the socket open.
    _sock: Sock,
    /// ChannelData header + payload (+ padding), or a Send indication.
    frame: Vec<u8>,
    payload_at: usize,
}

enum Sock {
    Udp(UdpSocket),
    Tcp(TcpStream),
}

/// A set of flows served by one sender and one receiver thread.
struct Shard {
    /// Index of the shard's first flow among all flows.
    base: usize,
    flows: Vec<Flow>,
    epoll: Epoll,
    /// TCP, per flow, kept from one run to the next so that no frame is ever cut: bytes
    /// the connection has not taken yet (the sender's) and the start of a frame not
    /// received whole yet (the receiver's).
    tx: Mutex<Vec<Vec<u8>>>,
    rx: Mutex<Vec<Vec<u8>>>,
}

/// The allocations, made once and reused by every run.
pub struct TurnGenerator {
    shards: Vec<Shard>,
    opts: Options,
    clock: Instant,
    /// Local ports of the UDP flows (for the drop self-check).
    ports: HashSet<u16>,
}

fn connect(o: &Options) -> io::Result<(Control, Sock, RawFd)> {
    let timeout = Some(Duration::from_millis(500));
    if o.tcp {
        let s = TcpStream::connect_timeout(&o.server, Duration::from_secs(3))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let fd = s.as_raw_fd();
        Ok((Control::Tcp(s.try_clone()?), Sock::Tcp(s), fd))
    } else {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(o.server),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        let _ = s.set_recv_buffer_size(1 << 20);
        let _ = s.set_send_buffer_size(1 << 20);
        let local: SocketAddr = if o.server.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        s.bind(&local.into())?;
        s.connect(&o.server.into())?;
        let s: UdpSocket = s.into();
        s.set_read_timeout(timeout)?;
        let fd = s.as_raw_fd();
        Ok((Control::Udp(s.try_clone()?), Sock::Udp(s), fd))
    }
}

/// A new socket and its allocation. A source port on which the server still holds an
/// allocation of an earlier run (437: that run's Refresh 0 was lost under load) is left
/// for another one, a few times.
fn allocate(o: &Options) -> io::Result<(Allocation, Sock, RawFd)> {
    let mut tries = 0;
    loop {
        let (control, sock, fd) = connect(o)?;
        match Allocation::new(control, &o.creds) {
            Ok(a) => return Ok((a, sock, fd)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries < 8 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

impl TurnGenerator {
    /// Makes every allocation (Allocate, CreatePermission, ChannelBind) before returning.
    pub fn new(opts: Options) -> io::Result<TurnGenerator> {
        let size = opts.size.max(HEADER);
        let threads = opts.threads.clamp(1, 64).min(opts.allocations.max(1));
        let per = opts.allocations.div_ceil(threads);
        let mut shards = Vec::new();
        let mut ports = HashSet::new();
        for t in 0..threads {
            let base = t * per;
            let end = ((t + 1) * per).min(opts.allocations);
            let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
            let mut flows = Vec::new();
            for i in base..end {
                let (mut a, sock, fd) = allocate(&opts)
                    .map_err(|e| io::Error::other(format!("allocation {i}: {e}")))?;
                a.permit(opts.peer)
                    .map_err(|e| io::Error::other(format!("allocation {i}: {e}")))?;
                let (frame, payload_at) = match opts.mode {
                    Mode::Channel => {
                        let number = 0x4000 + (i % 0x3FFF) as u16;
                        a.bind(number, opts.peer)
                            .map_err(|e| io::Error::other(format!("allocation {i}: {e}")))?;
                        let padded = if opts.tcp { (size + 3) & !3 } else { size };
                        let mut f = vec![0u8; 4 + padded];
                        f[0..2].copy_from_slice(&number.to_be_bytes());
                        f[2..4].copy_from_slice(&(size as u16).to_be_bytes());
                        (f, 4)
                    }
                    Mode::Send => turnctl::send_indication(opts.peer, size)?,
                };
                match &sock {
                    Sock::Udp(s) => {
                        s.set_nonblocking(true)?;
                        ports.insert(s.local_addr()?.port());
                    }
                    Sock::Tcp(s) => s.set_nonblocking(true)?,
                }
                epoll
                    .add(
                        sock_fd(&sock),
                        EpollEvent::new(EpollFlags::EPOLLIN, flows.len() as u64),
                    )
                    .map_err(io::Error::from)?;
                flows.push(Flow {
                    fd,
                    alloc: a,
                    _sock: sock,
                    frame,
                    payload_at,
                });
            }
            let streams = vec![Vec::new(); if opts.tcp { flows.len() } else { 0 }];
            shards.push(Shard {
                base,
                flows,
                epoll,
                tx: Mutex::new(streams.clone()),
                rx: Mutex::new(streams),
            });
        }
        Ok(TurnGenerator {
            shards,
            opts: Options { size, ..opts },
            clock: Instant::now(),
            ports,
        })
    }

    fn stamp(&self, d: &mut [u8], flow: u32, seq: u64) {
        d[0..4].copy_from_slice(&loadgen::MAGIC.to_be_bytes());
        d[4..8].copy_from_slice(&flow.to_be_bytes());
        d[8..16].copy_from_slice(&seq.to_be_bytes());
        let now = self.clock.elapsed().as_nanos() as u64;
        d[16..24].copy_from_slice(&now.to_be_bytes());
    }

    /// One shard's sender at `rate` per second: (sent, worst lag in ns).
    fn send(&self, shard: &Shard, rate: u64, duration: Duration) -> (u64, u64) {
        let n = shard.flows.len();
        if n == 0 || rate == 0 {
            return (0, 0);
        }
        let mut frames: Vec<Vec<u8>> = shard.flows.iter().map(|f| f.frame.clone()).collect();
        // TCP: bytes a connection could not take yet (sent before its next frame).
        let mut pending = std::mem::take(&mut *lock(&shard.tx));
        let mut seq = 0u64;
        let mut sent = 0u64;
        let mut total = 0u64;
        let mut worst_lag = 0u64;
        let mut next = 0usize;
        let start = Instant::now();
        let dur_ns = duration.as_nanos() as u64;
        loop {
            let now_ns = start.elapsed().as_nanos() as u64;
            if now_ns >= dur_ns {
                break;
            }
            let due = ((u128::from(now_ns) * u128::from(rate)) / 1_000_000_000) as u64 + 1;
            let next_ns = ((u128::from(total) * 1_000_000_000) / u128::from(rate)) as u64;
            if total >= due {
                let wait = next_ns.saturating_sub(now_ns);
                if wait > 20_000 {
                    std::thread::sleep(Duration::from_nanos(wait.min(1_000_000)));
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            worst_lag = worst_lag.max(now_ns.saturating_sub(next_ns));
            let mut budget = (due - total).min(256);
            while budget > 0 {
                let i = next;
                next = (next + 1) % n;
                let f = &shard.flows[i];
                let at = f.payload_at;
                self.stamp(&mut frames[i][at..], (shard.base + i) as u32, seq);
                seq += 1;
                if self.opts.tcp {
                    if tcp_send(f.fd, &mut pending[i], &frames[i]) {
                        sent += 1;
                    }
                } else if sys::send(f.fd, &frames[i]).is_ok() {
                    sent += 1;
                }
                total += 1;
                budget -= 1;
            }
        }
        // Attempts count as sent: a frame the server's queues refused is lost.
        let _ = sent;
        *lock(&shard.tx) = pending;
        (total, worst_lag)
    }

    /// One shard's receiver until `stop`.
    fn receive(&self, shard: &Shard, stop: &AtomicBool, epoch_ns: u64) -> io::Result<Got> {
        let n = shard.flows.len();
        let mut got = Got {
            rtt: Histogram::default(),
            received: 0,
            last: vec![epoch_ns; n],
            max_gap: vec![0; n],
        };
        let mut batch = MsgBatch::new(32, 2048.max(self.opts.size + 128));
        let mut streams = std::mem::take(&mut *lock(&shard.rx));
        let mut chunk = vec![0u8; 65_536];
        let mut events = vec![EpollEvent::empty(); 1024];
        while !stop.load(Ordering::Acquire) {
            let k = match shard.epoll.wait(&mut events, EpollTimeout::from(10u16)) {
                Ok(k) => k,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            for ev in &events[..k] {
                let i = ev.data() as usize;
                let Some(f) = shard.flows.get(i) else {
                    continue;
                };
                if self.opts.tcp {
                    let buf = &mut streams[i];
                    loop {
                        match sys::recv(f.fd, &mut chunk) {
                            Ok(0) | Err(_) => break,
                            Ok(r) => buf.extend_from_slice(&chunk[..r]),
                        }
                    }
                    let now = self.clock.elapsed().as_nanos() as u64;
                    let mut at = 0;
                    while let Some(len) = frame_len(&buf[at..]) {
                        got.record(i, &buf[at..at + len], now, epoch_ns);
                        at += len;
                    }
                    buf.drain(..at);
                } else {
                    loop {
                        let r = batch.recv_from(f.fd).unwrap_or(0);
                        let now = self.clock.elapsed().as_nanos() as u64;
                        for j in 0..r {
                            let (d, _, _) = batch.get(j);
                            got.record(i, d, now, epoch_ns);
                        }
                        if r < batch.capacity() {
                            break;
                        }
                    }
                }
            }
        }
        *lock(&shard.rx) = streams;
        Ok(got)
    }

    /// Datagrams dropped in the generator's own UDP receive queues so far.
    fn local_drops(&self) -> u64 {
        udp_drops("/proc/net", &self.ports)
    }

    /// Datagrams dropped in the echo peer's receive queues so far.
    fn peer_drops(&self) -> u64 {
        match self.opts.peer_pid {
            Some(pid) => udp_drops(
                &format!("/proc/{pid}/net"),
                &HashSet::from([self.opts.peer.port()]),
            ),
            None => 0,
        }
    }
}

/// Sum of the `drops` column of `DIR/udp` and `DIR/udp6` over sockets bound to `ports`.
fn udp_drops(dir: &str, ports: &HashSet<u16>) -> u64 {
    {
        if ports.is_empty() {
            return 0;
        }
        let mut total = 0;
        for file in [format!("{dir}/udp"), format!("{dir}/udp6")] {
            let Ok(text) = std::fs::read_to_string(file) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                let (Some(local), Some(drops)) = (cols.get(1), cols.last()) else {
                    continue;
                };
                let port = local
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok());
                if port.is_some_and(|p| ports.contains(&p)) {
                    total += drops.parse::<u64>().unwrap_or(0);
                }
            }
        }
        total
    }
}

impl TurnGenerator {
    /// Waits for the server to be idle before a run: sends what TCP connections have not
    /// taken yet and discards whatever still arrives (stragglers of an earlier run, whole
    /// frames only), until nothing has arrived for [`QUIET`] (at most [`MAX_DRAIN`]).
    /// Over TCP nothing is lost: after an overloaded run the server may still be relaying
    /// its backlog, and a run started then would measure that run's leftovers.
    fn drain(&self) {
        let mut chunk = vec![0u8; 65_536];
        let started = Instant::now();
        let mut last_data = Instant::now();
        while started.elapsed() < MAX_DRAIN && last_data.elapsed() < QUIET {
            let mut busy = false;
            for s in &self.shards {
                let mut tx = lock(&s.tx);
                let mut rx = lock(&s.rx);
                for (i, f) in s.flows.iter().enumerate() {
                    if let Some(p) = tx.get_mut(i).filter(|p| !p.is_empty()) {
                        if let Ok(n) = sys::send(f.fd, p) {
                            p.drain(..n);
                        }
                        busy |= !p.is_empty();
                    }
                    loop {
                        match sys::recv(f.fd, &mut chunk) {
                            Ok(0) | Err(_) => break,
                            Ok(r) => {
                                busy = true;
                                if let Some(buf) = rx.get_mut(i) {
                                    buf.extend_from_slice(&chunk[..r]);
                                    let mut at = 0;
                                    while let Some(len) = frame_len(&buf[at..]) {
                                        at += len;
                                    }
                                    buf.drain(..at);
                                }
                            }
                        }
                    }
                }
            }
            if busy {
                last_data = Instant::now();
            } else {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// How long nothing must arrive before a run starts.
const QUIET: Duration = Duration::from_millis(200);
/// Longest wait for the server to become idle before a run.
const MAX_DRAIN: Duration = Duration::from_secs(20);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for TurnGenerator {
    /// Deletes the allocations, so a later run that reuses a source port is not refused
    /// (437) by a leftover allocation.
    fn drop(&mut self) {
        for s in &mut self.shards {
            for f in &mut s.flows {
                f.alloc.release();
            }
        }
    }
}

fn sock_fd(s: &Sock) -> std::os::fd::BorrowedFd<'_> {
    match s {
        Sock::Udp(s) => s.as_fd(),
        Sock::Tcp(s) => s.as_fd(),
    }
}

/// Writes `frame` (after what is pending) to a non-blocking TCP socket; keeps what the
/// socket does not take. Returns false when the frame was dropped (over 256 KiB pending).
fn tcp_send(fd: RawFd, pending: &mut Vec<u8>, frame: &[u8]) -> bool {
    if !pending.is_empty() {
        if let Ok(n) = sys::send(fd, pending) {
            pending.drain(..n);
        }
        if !pending.is_empty() {
            if pending.len() > 256 * 1024 {
                return false;
            }
            pending.extend_from_slice(frame);
            return true;
        }
    }
    match sys::send(fd, frame) {
        Ok(n) => {
            pending.extend_from_slice(&frame[n..]);
            true
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            pending.extend_from_slice(frame);
            true
        }
        Err(_) => false,
    }
}

/// Length of the complete TURN frame at the start of a TCP stream, if it is complete.
fn frame_len(b: &[u8]) -> Option<usize> {
    if b.len() < 4 {
        return None;
    }
    let len = u16::from_be_bytes([b[2], b[3]]) as usize;
    let total = if b[0] & 0xC0 == 0x40 {
        4 + ((len + 3) & !3)
    } else {
        20 + len
    };
    (b.len() >= total).then_some(total)
}

/// The generator's payload inside a ChannelData or Data indication.
fn payload(d: &[u8]) -> Option<&[u8]> {
    match d.first()? {
        0x40..=0x7F => d.get(4..),
        0x00..=0x3F => d.get(turnctl::data_offset(d)?..),
        _ => None,
    }
}

struct Got {
    rtt: Histogram,
    received: u64,
    last: Vec<u64>,
    max_gap: Vec<u64>,
}

impl Got {
    fn record(&mut self, i: usize, d: &[u8], now: u64, epoch_ns: u64) {
        let Some((_, _, sent_ns)) = payload(d).and_then(loadgen::parse) else {
            return;
        };
        if sent_ns < epoch_ns || i >= self.last.len() {
            return; // a straggler from an earlier run
        }
        self.received += 1;
        self.rtt.record(now.saturating_sub(sent_ns));
        self.max_gap[i] = self.max_gap[i].max(now.saturating_sub(self.last[i]));
        self.last[i] = now;
    }
}

impl Trial for TurnGenerator {
    fn run(&self, rate: u64, duration: Duration, settle: Duration) -> io::Result<Report> {
        self.drain();
        let drops0 = self.local_drops();
        let peer0 = self.peer_drops();
        let cpu0 = stats::process_cpu_ns();
        let stop = AtomicBool::new(false);
        let epoch_ns = self.clock.elapsed().as_nanos() as u64;
        let total_flows = self.opts.allocations.max(1) as u64;
        let started = Instant::now();
        let (sends, gots) = std::thread::scope(|scope| {
            let receivers: Vec<_> = self
                .shards
                .iter()
                .map(|s| scope.spawn(|| self.receive(s, &stop, epoch_ns)))
                .collect();
            let senders: Vec<_> = self
                .shards
                .iter()
                .map(|s| {
                    // The shard's share of the rate, by its number of flows.
                    let r = rate * s.flows.len() as u64 / total_flows;
                    scope.spawn(move || self.send(s, r, duration))
                })
                .collect();
            let sends: Vec<(u64, u64)> = senders
                .into_iter()
                .map(|h| h.join().unwrap_or((0, 0)))
                .collect();
            std::thread::sleep(settle);
            stop.store(true, Ordering::Release);
            let gots: Vec<io::Result<Got>> = receivers
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(io::Error::other("receiver panicked")))
                })
                .collect();
            (sends, gots)
        });
        let seconds = (started.elapsed().saturating_sub(settle)).as_secs_f64();
        let mut rtt = Histogram::default();
        let mut received = 0;
        let mut max_gap = 0;
        for g in gots {
            let g = g?;
            rtt.merge(&g.rtt);
            received += g.received;
            max_gap = max_gap.max(g.max_gap.iter().copied().max().unwrap_or(0));
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Ok(Report {
            flows: self.opts.allocations,
            size: self.opts.size,
            target_pps: rate,
            sent: sends.iter().map(|s| s.0).sum(),
            received,
            seconds,
            p50_us: us(rtt.quantile(0.50)),
            p99_us: us(rtt.quantile(0.99)),
            p999_us: us(rtt.quantile(0.999)),
            max_us: us(rtt.quantile(1.0)),
            max_silence_ms: max_gap as f64 / 1e6,
            local_drops: self.local_drops().saturating_sub(drops0),
            peer_drops: self.peer_drops().saturating_sub(peer0),
            max_lag_ms: sends.iter().map(|s| s.1).max().unwrap_or(0) as f64 / 1e6,
            cpu_ms: stats::process_cpu_ns().saturating_sub(cpu0) as f64 / 1e6,
            // Allocations are made before the run: no datagram opens anything.
            ..Report::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
    use stun::error_code::{ErrorCode, ErrorCodeAttribute};
    use stun::message::{
        CLASS_ERROR_RESPONSE, CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE, Message, MessageType, Setter,
    };
    use stun::textattrs::TextAttribute;

    /// A TURN server that answers the first `stale` source ports' Allocates with `code`
    /// (as a server still holding an earlier run's allocation there answers 437), other
    /// ports' with a 401 challenge, and authenticated Allocates with success. Returns its
    /// address and the source ports it refused.
    fn fake_server(stale: usize, code: u16) -> (SocketAddr, std::sync::mpsc::Receiver<u16>) {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut refused = Vec::new();
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let mut req = Message::new();
                req.raw = buf[..n].to_vec();
                if req.decode().is_err() || req.typ.method != METHOD_ALLOCATE {
                    continue;
                }
                let authenticated = req.contains(ATTR_USERNAME);
                if !authenticated && refused.len() < stale && !refused.contains(&from.port()) {
                    refused.push(from.port());
                    let _ = tx.send(from.port());
                }
                let setters: Vec<Box<dyn Setter>> = if authenticated {
                    vec![
                        Box::new(req.clone()),
                        Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_SUCCESS_RESPONSE)),
                        Box::new(turn::proto::relayaddr::RelayedAddress {
                            ip: [127, 0, 0, 1].into(),
                            port: 40000,
                        }),
                    ]
                } else if refused.contains(&from.port()) {
                    vec![
                        Box::new(req.clone()),
                        Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_ERROR_RESPONSE)),
                        Box::new(ErrorCodeAttribute {
                            code: ErrorCode(code),
                            reason: b"Refused".to_vec(),
                        }),
                    ]
                } else {
                    vec![
                        Box::new(req.clone()),
                        Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_ERROR_RESPONSE)),
                        Box::new(ErrorCodeAttribute {
                            code: ErrorCode(401),
                            reason: b"Unauthorized".to_vec(),
                        }),
                        Box::new(TextAttribute::new(ATTR_REALM, "bench".into())),
                        Box::new(TextAttribute::new(ATTR_NONCE, "n0".into())),
                    ]
                };
                let mut resp = Message::new();
                resp.build(&setters).unwrap();
                let _ = sock.send_to(&resp.raw, from);
            }
        });
        (addr, rx)
    }

    fn options(server: SocketAddr) -> Options {
        Options {
            server,
            tcp: false,
            allocations: 1,
            size: 64,
            peer: "127.0.0.1:9".parse().unwrap(),
            creds: Credentials {
                username: "bench".into(),
                password: "bench".into(),
            },
            threads: 1,
            mode: Mode::Channel,
            peer_pid: None,
        }
    }

    #[test]
    fn a_port_with_a_leftover_allocation_is_left_for_another() {
        let (server, refused) = fake_server(2, 437);
        let (a, _sock, _) = allocate(&options(server)).unwrap();
        assert_eq!(a.relayed, "127.0.0.1:40000".parse::<SocketAddr>().unwrap());
        let refused: Vec<u16> = refused.try_iter().collect();
        assert_eq!(refused.len(), 2, "{refused:?}");
    }

    #[test]
    fn another_error_is_named_and_not_retried() {
        let (server, refused) = fake_server(1, 486);
        let e = allocate(&options(server)).err().expect("refused");
        assert!(e.to_string().contains("error 486"), "{e}");
        assert_eq!(refused.try_iter().count(), 1);
    }

    #[test]
    fn frames_are_cut_from_a_stream() {
        // ChannelData of 5 bytes is padded to 8 over TCP.
        let mut b = vec![0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0];
        assert_eq!(frame_len(&b), Some(12));
        b.truncate(11);
        assert_eq!(frame_len(&b), None);
        let stun = [
            0u8, 0x17, 0, 0, 0x21, 0x12, 0xA4, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(frame_len(&stun), Some(20));
    }

    #[test]
    fn send_indication_payload_round_trips() {
        let peer: SocketAddr = "10.0.0.2:9000".parse().unwrap();
        let (mut m, at) = turnctl::send_indication(peer, 40).unwrap();
        m[at..at + 4].copy_from_slice(&loadgen::MAGIC.to_be_bytes());
        assert_eq!(
            payload(&m).map(|p| &p[..4]),
            Some(&loadgen::MAGIC.to_be_bytes()[..])
        );
        let mut cd = vec![0x40, 0x01, 0, 4];
        cd.extend_from_slice(&loadgen::MAGIC.to_be_bytes());
        assert_eq!(payload(&cd), Some(&loadgen::MAGIC.to_be_bytes()[..]));
    }
}
