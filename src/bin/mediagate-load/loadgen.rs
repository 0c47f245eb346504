//! An open-loop UDP load generator and a fast echo worker, for benchmarking the data plane
//! against the direct path and other proxies (`mediagate-load`, `scripts/bench-udp.sh`).
//!
//! The generator opens N flows, each a socket of its own (its own source port, so a proxy
//! sees N sessions), and sends datagrams on a fixed schedule whatever comes back (open
//! loop: a slow proxy cannot slow the sender down and hide its latency). Every datagram
//! carries its flow, sequence number and send time; a receiver thread waits on all flow
//! sockets with one epoll and records round-trip times in a log-linear histogram, replies
//! per flow, and each flow's longest silence (longest time without a reply).
//!
//! The echo worker reflects each datagram unchanged with `recvmmsg`/`sendmmsg` on
//! `SO_REUSEPORT` sockets, one per thread, so the direct path is as cheap as it gets.

use crate::stats::{Histogram, SlowWindows, monotonic_ns, process_cpu_ns};
use mediagate::sockio::{self as sys, MsgBatch};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// First bytes of every generated datagram.
pub const MAGIC: u32 = 0x4d47_4c44; // "MGLD"
/// Header: magic u32, flow u32, seq u64, send time u64 (ns since the run's clock origin).
pub const HEADER: usize = 24;

/// What one measured run saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub flows: usize,
    pub size: usize,
    /// Asked-for total rate, datagrams per second.
    pub target_pps: u64,
    pub sent: u64,
    pub received: u64,
    pub seconds: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// Longest time any flow went without a reply while sending, ms.
    pub max_silence_ms: f64,
    /// Round-trip time of each flow's first datagram of the run (median and worst, µs):
    /// without priming, the datagram that opens the flow's session in a proxy (a mass
    /// join when every flow starts at once), also counted in the percentiles above.
    pub first_p50_us: f64,
    pub first_max_us: f64,
    /// Self-check: datagrams the kernel dropped in the generator's own receive queues
    /// (counted as loss, but the generator's, not the target's).
    pub local_drops: u64,
    /// Self-check: datagrams the echo peer's kernel dropped (its receive queue was full);
    /// when not zero the peer, not the target, lost them.
    pub peer_drops: u64,
    /// Self-check: how far the sender fell behind its schedule at worst, ms.
    pub max_lag_ms: f64,
    /// CPU time of this process (both threads, user and system, with the kernel's
    /// forwarding work done in its context) during the run, ms.
    pub cpu_ms: f64,
}

impl Report {
    /// Datagrams per second actually sent.
    pub fn sent_pps(&self) -> f64 {
        self.sent as f64 / self.seconds.max(1e-9)
    }
    /// Replies per second.
    pub fn pps(&self) -> f64 {
        self.received as f64 / self.seconds.max(1e-9)
    }
    /// Fraction of sent datagrams that never came back.
    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        self.sent.saturating_sub(self.received) as f64 / self.sent as f64
    }

    /// One line of `key=value` pairs (what scripts parse).
    pub fn line(&self) -> String {
        format!(
            "flows={} size={} target_pps={} sent={} received={} sent_pps={:.0} pps={:.0} loss={:.5} p50_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1} max_silence_ms={:.1} first_p50_us={:.1} first_max_us={:.1} local_drops={} peer_drops={} max_lag_ms={:.1} cpu_ms={:.1}",
            self.flows,
            self.size,
            self.target_pps,
            self.sent,
            self.received,
            self.sent_pps(),
            self.pps(),
            self.loss(),
            self.p50_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            self.max_silence_ms,
            self.first_p50_us,
            self.first_max_us,
            self.local_drops,
            self.peer_drops,
            self.max_lag_ms,
            self.cpu_ms
        )
    }
}

/// Something that can make one measured run at a given rate (what [`sweep`] drives).
pub trait Trial {
    /// Sends `rate` datagrams per second for `duration`, receives for `settle` more.
    fn run(&self, rate: u64, duration: Duration, settle: Duration) -> io::Result<Report>;
}

impl Trial for Generator {
    fn run(&self, rate: u64, duration: Duration, settle: Duration) -> io::Result<Report> {
        Generator::run(self, rate, duration, settle)
    }
}

/// N flow sockets towards one target, reused across runs (so a proxy keeps its sessions).
pub struct Generator {
    socks: Vec<UdpSocket>,
    epoll: Epoll,
    target: SocketAddr,
    size: usize,
    clock: Instant,
    /// Never spin while ahead of schedule: sleep (the wakeups batch a few datagrams), so
    /// the process's CPU time is the work of sending and receiving, not waiting.
    pub sleep_only: bool,
    /// Report when the slow replies were sent: round trips above this many µs, counted
    /// per 10 ms window of send time (printed to stderr after a run). A stall of the
    /// path shows as one window with many; a slow path as slow replies everywhere.
    pub slow_us: Option<u64>,
}

impl Generator {
    /// Opens `flows` sockets on loopback (of the target's family), each connected to `target`.
    #[cfg(test)]
    pub fn new(target: SocketAddr, flows: usize, size: usize) -> io::Result<Generator> {
        Self::with_source_ports(target, flows, size, 0)
    }

    /// Like [`Generator::new`], but flow `i` binds source port `src_base + i` when free
    /// (an ephemeral port otherwise, and always when `src_base` is 0). Ports below the
    /// ephemeral range leave that range to the proxy's upstream sockets: with many flows
    /// on one machine, both ends otherwise compete for the same ~28k ephemeral ports.
    pub fn with_source_ports(
        target: SocketAddr,
        flows: usize,
        size: usize,
        src_base: u16,
    ) -> io::Result<Generator> {
        let size = size.max(HEADER);
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        // Loopback targets get a loopback source; any other (the namespaced benchmark)
        // the address the route picks.
        let local: SocketAddr = match (target.is_ipv4(), target.ip().is_loopback()) {
            (true, true) => ([127, 0, 0, 1], 0).into(),
            (true, false) => ([0, 0, 0, 0], 0).into(),
            (false, true) => (std::net::Ipv6Addr::LOCALHOST, 0).into(),
            (false, false) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let mut socks = Vec::with_capacity(flows);
        for i in 0..flows {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(target),
                socket2::Type::DGRAM,
                Some(socket2::Protocol::UDP),
            )?;
            let _ = s.set_recv_buffer_size(1 << 20);
            let _ = s.set_send_buffer_size(1 << 20);
            let fixed = u16::try_from(usize::from(src_base) + i)
                .ok()
                .filter(|_| src_base != 0)
                .map(|p| SocketAddr::new(local.ip(), p));
            if fixed.is_none_or(|a| s.bind(&a.into()).is_err()) {
                s.bind(&local.into())?;
            }
            s.connect(&target.into())?;
            s.set_nonblocking(true)?;
            let s: UdpSocket = s.into();
            epoll
                .add(s.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, i as u64))
                .map_err(io::Error::from)?;
            socks.push(s);
        }
        Ok(Generator {
            socks,
            epoll,
            target,
            size,
            clock: Instant::now(),
            sleep_only: false,
            slow_us: None,
        })
    }

    /// Sends one datagram per flow and waits up to `limit` for every flow to be answered
    /// once (creates the proxy's sessions before measuring). Returns flows answered.
    pub fn prime(&self, limit: Duration) -> io::Result<usize> {
        let mut answered = vec![false; self.socks.len()];
        let mut n_answered = 0;
        let mut buf = vec![0u8; 65_536];
        let deadline = Instant::now() + limit;
        let mut next_send = Instant::now();
        while n_answered < self.socks.len() && Instant::now() < deadline {
            if Instant::now() >= next_send {
                for (i, s) in self.socks.iter().enumerate() {
                    if !answered[i] {
                        let mut d = vec![0u8; self.size];
                        self.header(&mut d, i as u32, u64::MAX);
                        let _ = s.send(&d);
                    }
                }
                next_send = Instant::now() + Duration::from_millis(200);
            }
            let mut events = [EpollEvent::empty(); 256];
            let n = self
                .epoll
                .wait(&mut events, EpollTimeout::from(20u16))
                .map_err(io::Error::from)?;
            for ev in &events[..n] {
                let i = ev.data() as usize;
                let Some(s) = self.socks.get(i) else { continue };
                while sys::recv(s.as_raw_fd(), &mut buf).is_ok() {
                    if !answered[i] {
                        answered[i] = true;
                        n_answered += 1;
                    }
                }
            }
        }
        Ok(n_answered)
    }

    fn header(&self, d: &mut [u8], flow: u32, seq: u64) {
        d[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        d[4..8].copy_from_slice(&flow.to_be_bytes());
        d[8..16].copy_from_slice(&seq.to_be_bytes());
        let now = self.clock.elapsed().as_nanos() as u64;
        d[16..24].copy_from_slice(&now.to_be_bytes());
    }

    /// Drains whatever is still queued on the flow sockets.
    fn drain(&self) {
        let mut buf = vec![0u8; 65_536];
        for s in &self.socks {
            while sys::recv(s.as_raw_fd(), &mut buf).is_ok() {}
        }
    }

    /// Sends `rate` datagrams per second in total (spread round-robin over the flows) for
    /// `duration`, keeps receiving for `settle` afterwards, and reports.
    pub fn run(&self, rate: u64, duration: Duration, settle: Duration) -> io::Result<Report> {
        self.drain();
        let cpu_before = process_cpu_ns();
        let flows = self.socks.len();
        let stop = AtomicBool::new(false);
        let epoch_ns = self.clock.elapsed().as_nanos() as u64;
        let (sent, send_secs, recv) = std::thread::scope(|scope| {
            let receiver = scope.spawn(|| self.receive(&stop, epoch_ns));
            let (sent, secs) = self.send(rate, duration);
            std::thread::sleep(settle);
            stop.store(true, Ordering::Release);
            let recv = receiver
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("receiver panicked")));
            (sent, secs, recv)
        });
        let recv = recv?;
        if let Some(us) = self.slow_us {
            // The run's start on CLOCK_MONOTONIC (what `perf record -k CLOCK_MONOTONIC`
            // stamps events with), to line the windows up with a trace.
            let since_start = self.clock.elapsed().as_nanos() as u64 - epoch_ns;
            let start_s = monotonic_ns().saturating_sub(since_start) as f64 / 1e9;
            eprintln!("{} start={start_s:.6}", recv.slow.line(us));
        }
        let cpu_ms = process_cpu_ns().saturating_sub(cpu_before) as f64 / 1e6;
        let sent_total: u64 = sent.iter().sum();
        let us = |ns: u64| ns as f64 / 1000.0;
        Ok(Report {
            flows,
            size: self.size,
            target_pps: rate,
            sent: sent_total,
            received: recv.received,
            seconds: send_secs,
            p50_us: us(recv.rtt.quantile(0.50)),
            p99_us: us(recv.rtt.quantile(0.99)),
            p999_us: us(recv.rtt.quantile(0.999)),
            max_us: us(recv.rtt.max()),
            max_silence_ms: recv.max_silence_ns as f64 / 1e6,
            first_p50_us: us(recv.first.quantile(0.50)),
            first_max_us: us(recv.first.max()),
            cpu_ms,
            ..Report::default()
        })
    }

    /// The sender: returns datagrams sent per flow and the seconds it sent for.
    fn send(&self, rate: u64, duration: Duration) -> (Vec<u64>, f64) {
        let flows = self.socks.len();
        let mut sent = vec![0u64; flows];
        let mut seq = vec![0u64; flows];
        let mut batch = MsgBatch::new(64, self.size);
        let mut data = vec![0u8; self.size];
        let start = Instant::now();
        let dur_ns = duration.as_nanos() as u64;
        let rate = rate.max(1);
        let mut total: u64 = 0;
        let mut next_flow = 0usize;
        loop {
            let now_ns = start.elapsed().as_nanos() as u64;
            if now_ns >= dur_ns {
                break;
            }
            let due = ((u128::from(now_ns) * u128::from(rate)) / 1_000_000_000) as u64 + 1;
            if total >= due {
                // Ahead of schedule: sleep until the next datagram is due (coarse sleeps
                // only; the kernel rounds small ones up anyway).
                let next_ns = ((u128::from(total) * 1_000_000_000) / u128::from(rate)) as u64;
                let wait = next_ns.saturating_sub(now_ns);
                if wait > 20_000 || self.sleep_only {
                    std::thread::sleep(Duration::from_nanos(wait.min(1_000_000)));
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            // Behind: send what is due, at most 256 per pass.
            let mut budget = (due - total).min(256);
            while budget > 0 {
                let f = next_flow;
                let fd = self.socks[f].as_raw_fd();
                if flows == 1 {
                    // One flow: batch its datagrams in one sendmmsg.
                    let k = budget.min(batch.capacity() as u64);
                    for _ in 0..k {
                        let slot = batch.next_slot();
                        self.header(slot, f as u32, seq[f]);
                        seq[f] += 1;
                        batch.commit(self.size, self.target);
                    }
                    let (ok, _) = batch.flush(fd);
                    sent[f] += ok as u64;
                    total += k;
                    budget -= k;
                } else {
                    self.header(&mut data, f as u32, seq[f]);
                    seq[f] += 1;
                    if sys::send(fd, &data).is_ok() {
                        sent[f] += 1;
                    }
                    total += 1;
                    budget -= 1;
                    next_flow = (next_flow + 1) % flows;
                }
            }
        }
        (sent, start.elapsed().as_secs_f64())
    }

    /// The receiver: every flow socket under one epoll, until `stop`.
    fn receive(&self, stop: &AtomicBool, epoch_ns: u64) -> io::Result<Received> {
        let flows = self.socks.len();
        let (mut rtt, mut first) = (Histogram::default(), Histogram::default());
        let mut received = 0u64;
        let mut last = vec![epoch_ns; flows];
        let mut max_gap = vec![0u64; flows];
        let mut batch = MsgBatch::new(16, 65_536.min(self.size.max(2048) + 256));
        let mut events = vec![EpollEvent::empty(); 1024];
        let mut slow = SlowWindows::new(self.slow_us);
        while !stop.load(Ordering::Acquire) {
            let n = match self.epoll.wait(&mut events, EpollTimeout::from(10u16)) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let now = self.clock.elapsed().as_nanos() as u64;
            for ev in &events[..n] {
                let Some(s) = self.socks.get(ev.data() as usize) else {
                    continue;
                };
                let got = batch.recv_from(s.as_raw_fd()).unwrap_or(0);
                for i in 0..got {
                    let (d, _, _) = batch.get(i);
                    let Some((flow, seq, sent_ns)) = parse(d) else {
                        continue;
                    };
                    let flow = flow as usize;
                    if flow >= flows || sent_ns < epoch_ns {
                        continue; // a straggler from priming or an earlier run
                    }
                    received += 1;
                    rtt.record(now.saturating_sub(sent_ns));
                    slow.record(sent_ns - epoch_ns, now.saturating_sub(sent_ns));
                    if seq == 0 {
                        first.record(now.saturating_sub(sent_ns));
                    }
                    max_gap[flow] = max_gap[flow].max(now.saturating_sub(last[flow]));
                    last[flow] = now;
                }
            }
        }
        Ok(Received {
            rtt,
            first,
            received,
            max_silence_ns: max_gap.iter().copied().max().unwrap_or(0),
            slow,
        })
    }
}

struct Received {
    rtt: Histogram,
    first: Histogram,
    received: u64,
    max_silence_ns: u64,
    slow: SlowWindows,
}

/// (flow, seq, send time) of a generated datagram, also when an echo worker prefixed it
/// with `NAME|` (the testkit echo does).
pub fn parse(d: &[u8]) -> Option<(u32, u64, u64)> {
    let at = if d.get(0..4) == Some(&MAGIC.to_be_bytes()[..]) {
        0
    } else {
        d.iter().take(64).position(|b| *b == b'|')? + 1
    };
    let h = d.get(at..at + HEADER)?;
    if h[0..4] != MAGIC.to_be_bytes() {
        return None;
    }
    let u32_at = |o: usize| {
        h.get(o..o + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes)
    };
    let u64_at = |o: usize| {
        h.get(o..o + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
    };
    Some((u32_at(4)?, u64_at(8)?, u64_at(16)?))
}

/// Outcome of a sweep: the best passing run, if any, and every run made.
pub struct Sweep {
    pub best: Option<Report>,
    pub runs: Vec<Report>,
}

/// Finds the highest rate with loss under `max_loss`: doubles from `start` until a run
/// fails (or `max` is reached), then bisects `steps` times between the last pass and
/// the first failure. `on_run` sees every run as it completes.
pub fn sweep(
    g: &impl Trial,
    start: u64,
    max: u64,
    max_loss: f64,
    duration: Duration,
    steps: usize,
    mut on_run: impl FnMut(&Report),
) -> io::Result<Sweep> {
    let settle = Duration::from_millis(200);
    let mut runs = Vec::new();
    let mut best: Option<Report> = None;
    let passes = |r: &Report| r.loss() < max_loss && r.sent_pps() >= 0.97 * r.target_pps as f64;
    let mut lo = 0u64;
    let mut hi = None;
    let mut rate = start.max(100);
    // Exponential phase.
    for _ in 0..24 {
        let r = g.run(rate, duration, settle)?;
        on_run(&r);
        let ok = passes(&r);
        runs.push(r.clone());
        if ok {
            lo = rate;
            best = Some(r);
            if rate >= max {
                break;
            }
            rate = (rate * 2).min(max);
        } else {
            hi = Some(rate);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Bisection.
    if let Some(mut hi) = hi {
        for _ in 0..steps {
            if hi <= lo + lo / 50 + 1 {
                break;
            }
            let mid = if lo == 0 { hi / 2 } else { lo + (hi - lo) / 2 };
            std::thread::sleep(Duration::from_millis(100));
            let r = g.run(mid, duration, settle)?;
            on_run(&r);
            let ok = passes(&r);
            runs.push(r.clone());
            if ok {
                lo = mid;
                best = Some(r);
            } else {
                hi = mid;
            }
        }
    }
    Ok(Sweep { best, runs })
}

/// Runs an echo worker with `threads` `SO_REUSEPORT` sockets on `listen` until `stop`.
/// Each thread reflects what it receives, in batches, unchanged.
pub fn echo(listen: SocketAddr, threads: usize, stop: Arc<AtomicBool>) -> io::Result<SocketAddr> {
    let mut socks = Vec::new();
    let mut addr = listen;
    for _ in 0..threads.max(1) {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(listen),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        s.set_reuse_port(true)?;
        let _ = s.set_recv_buffer_size(4 << 20);
        let _ = s.set_send_buffer_size(4 << 20);
        // A receive timeout lets the thread notice `stop`.
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        s.bind(&addr.into())?;
        // Later sockets join the port the first one got.
        addr = s
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("no address"))?;
        socks.push(UdpSocket::from(s));
    }
    for s in socks {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("echo".into())
            .spawn(move || {
                let mut batch = MsgBatch::new(64, 65_536);
                while !stop.load(Ordering::Relaxed) {
                    match batch.recv_wait(s.as_raw_fd()) {
                        Ok(0) | Err(_) => continue,
                        Ok(_) => {
                            batch.reflect(s.as_raw_fd());
                        }
                    }
                }
            })?;
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_plain_and_prefixed() {
        let g_hdr = |d: &mut [u8]| {
            d[0..4].copy_from_slice(&MAGIC.to_be_bytes());
            d[4..8].copy_from_slice(&7u32.to_be_bytes());
            d[8..16].copy_from_slice(&9u64.to_be_bytes());
            d[16..24].copy_from_slice(&11u64.to_be_bytes());
        };
        let mut d = vec![0u8; 64];
        g_hdr(&mut d);
        assert_eq!(parse(&d), Some((7, 9, 11)));
        let mut p = b"primary|".to_vec();
        p.extend_from_slice(&d);
        assert_eq!(parse(&p), Some((7, 9, 11)));
        assert_eq!(parse(b"garbage"), None);
        assert_eq!(parse(&d[..10]), None);
    }

    #[test]
    fn generator_against_echo_has_no_loss_at_low_rate() {
        let stop = Arc::new(AtomicBool::new(false));
        let addr = echo("127.0.0.1:0".parse().unwrap(), 1, stop.clone()).unwrap();
        let g = Generator::new(addr, 10, 64).unwrap();
        assert_eq!(g.prime(Duration::from_secs(2)).unwrap(), 10);
        let r = g
            .run(2000, Duration::from_millis(300), Duration::from_millis(100))
            .unwrap();
        stop.store(true, Ordering::Relaxed);
        assert!(r.sent > 500, "{}", r.line());
        assert_eq!(r.received, r.sent, "{}", r.line());
        assert!(r.p50_us > 0.0 && r.p99_us >= r.p50_us, "{}", r.line());
    }
}

/// TCP load: a backend that either swallows a stream (first byte `S`) or answers each
/// request byte with one byte (first byte `E`), and clients for bulk throughput and for
/// connections per second.
pub mod tcp {
    use std::io;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Serves the backend on `listen` until the runtime stops; returns the bound address.
    pub async fn server(listen: SocketAddr) -> io::Result<SocketAddr> {
        let l = TcpListener::bind(listen).await?;
        let addr = l.local_addr()?;
        tokio::spawn(async move {
            loop {
                let Ok((mut c, _)) = l.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                tokio::spawn(async move {
                    let _ = c.set_nodelay(true);
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut mode = 0u8;
                    loop {
                        let n = match c.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if mode == 0 {
                            mode = buf[0];
                        }
                        if mode == b'E' && c.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(addr)
    }

    /// Bulk throughput: `conns` connections each write 64 KiB chunks for `duration`.
    /// Returns bytes per second written (and so carried: the sink reads everything).
    pub async fn throughput(
        target: SocketAddr,
        conns: usize,
        duration: Duration,
    ) -> io::Result<f64> {
        let total = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..conns.max(1) {
            let mut c = TcpStream::connect(target).await?;
            c.write_all(b"S").await?;
            let (total, stop) = (total.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let chunk = vec![b'x'; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    if c.write_all(&chunk).await.is_err() {
                        return;
                    }
                    total.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            }));
        }
        // Measure after a short warm-up.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (b0, t0) = (total.load(Ordering::Relaxed), Instant::now());
        tokio::time::sleep(duration).await;
        let (b1, secs) = (total.load(Ordering::Relaxed), t0.elapsed().as_secs_f64());
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        Ok((b1 - b0) as f64 / secs)
    }

    /// Connections per second: `workers` loops of connect, one-byte request, one-byte
    /// answer, close, for `duration`. Returns (completed per second, failures).
    pub async fn cps(
        target: SocketAddr,
        workers: usize,
        duration: Duration,
    ) -> io::Result<(f64, u64)> {
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + duration;
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..workers.max(1) {
            let (done, failed) = (done.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    let one = async {
                        let mut c = TcpStream::connect(target).await?;
                        c.set_nodelay(true)?;
                        // SO_LINGER 0: close with RST, so the client side leaves no
                        // TIME_WAIT behind to exhaust ephemeral ports over a long run.
                        socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO))?;
                        c.write_all(b"E").await?;
                        let mut b = [0u8; 1];
                        c.read_exact(&mut b).await?;
                        io::Result::Ok(())
                    };
                    match tokio::time::timeout(Duration::from_secs(2), one).await {
                        Ok(Ok(())) => done.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let secs = t0.elapsed().as_secs_f64();
        Ok((
            done.load(Ordering::Relaxed) as f64 / secs,
            failed.load(Ordering::Relaxed),
        ))
    }
}
