//! Synthetic UDP media flows: N clients, each from its own source port, sending a
//! datagram at a steady rate and timing the echoes. Used by `mediagate demo` and the
//! test tool to measure what a failover costs each flow: datagrams lost and the longest
//! silence between two replies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// What one flow saw.
#[derive(Debug, Default, Clone)]
pub struct FlowStats {
    pub sent: u64,
    pub received: u64,
    /// Replies per worker name (the part before `|` in an echo).
    pub by_worker: HashMap<String, u64>,
    /// The worker that sent the last reply.
    pub last_worker: String,
    /// Longest time between two replies (or from the first send to the first reply).
    pub max_gap: Duration,
    last_reply: Option<Instant>,
    /// `answered[seq]`: whether datagram `seq` was echoed.
    answered: Vec<bool>,
}

impl FlowStats {
    /// Datagrams sent and never answered.
    pub fn lost(&self) -> u64 {
        self.lost_between(0, self.sent)
    }

    /// Unanswered datagrams among sequence numbers `from..to`.
    pub fn lost_between(&self, from: u64, to: u64) -> u64 {
        (from..to.min(self.sent))
            .filter(|seq| !self.answered.get(*seq as usize).copied().unwrap_or(false))
            .count() as u64
    }
}

/// Running flows; stats can be read while they run.
pub struct Flows {
    stats: Vec<Arc<Mutex<FlowStats>>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Flows {
    /// Starts `n` flows to `target`, each sending `payload_len` bytes every `interval`.
    pub async fn start(target: SocketAddr, n: usize, interval: Duration, payload_len: usize) -> std::io::Result<Flows> {
        let stop = CancellationToken::new();
        let mut stats = Vec::with_capacity(n);
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let local: SocketAddr = if target.is_ipv4() { "127.0.0.1:0" } else { "[::1]:0" }
                .parse()
                .map_err(std::io::Error::other)?;
            let sock = UdpSocket::bind(local).await?;
            sock.connect(target).await?;
            let st = Arc::new(Mutex::new(FlowStats::default()));
            stats.push(st.clone());
            let stop = stop.clone();
            // Spread the flows over the interval so they do not all send at once.
            let offset = interval.mul_f64(i as f64 / n.max(1) as f64);
            tasks.push(tokio::spawn(run_flow(sock, st, interval, offset, payload_len, stop)));
        }
        Ok(Flows { stats, stop, tasks })
    }

    /// A copy of every flow's stats.
    pub fn snapshot(&self) -> Vec<FlowStats> {
        self.stats
            .iter()
            .map(|s| s.lock().map(|g| g.clone()).unwrap_or_default())
            .collect()
    }

    /// Forgets the longest gaps so far (to measure one phase).
    pub fn reset_gaps(&self) {
        for s in &self.stats {
            if let Ok(mut g) = s.lock() {
                g.max_gap = Duration::ZERO;
            }
        }
    }

    /// Stops sending, waits `settle` for replies in flight, then stops and reports.
    pub async fn finish(self, settle: Duration) -> Vec<FlowStats> {
        // Stop the senders first, keep receiving for `settle`.
        self.stop.cancel();
        tokio::time::sleep(settle).await;
        for t in &self.tasks {
            t.abort();
        }
        self.snapshot()
    }
}

async fn run_flow(
    sock: UdpSocket,
    stats: Arc<Mutex<FlowStats>>,
    interval: Duration,
    offset: Duration,
    payload_len: usize,
    stop: CancellationToken,
) {
    tokio::time::sleep(offset).await;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut payload = vec![b'x'; payload_len.max(8)];
    let mut seq: u64 = 0;
    let mut buf = vec![0u8; 65_536];
    let mut sending = true;
    let started = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled(), if sending => sending = false,
            _ = ticker.tick(), if sending => {
                payload[..8].copy_from_slice(&seq.to_be_bytes());
                seq += 1;
                if sock.send(&payload).await.is_ok()
                    && let Ok(mut s) = stats.lock()
                {
                    s.sent += 1;
                }
            }
            r = sock.recv(&mut buf) => {
                let Ok(n) = r else { continue };
                let now = Instant::now();
                let worker = buf[..n].iter().position(|b| *b == b'|').map(|p| &buf[..p]).unwrap_or(b"?");
                let seq = buf
                    .get(worker.len() + 1..worker.len() + 9)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes);
                if let Ok(mut s) = stats.lock() {
                    s.received += 1;
                    if let Some(seq) = seq.filter(|q| *q < s.sent) {
                        let i = seq as usize;
                        if s.answered.len() <= i {
                            s.answered.resize(i + 1, false);
                        }
                        s.answered[i] = true;
                    }
                    let gap = now - s.last_reply.unwrap_or(started);
                    s.max_gap = s.max_gap.max(gap);
                    s.last_reply = Some(now);
                    if s.last_worker.as_bytes() != worker {
                        s.last_worker = String::from_utf8_lossy(worker).into_owned();
                    }
                    let name = s.last_worker.clone();
                    *s.by_worker.entry(name).or_default() += 1;
                }
            }
        }
    }
}
