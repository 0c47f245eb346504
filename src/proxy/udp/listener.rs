//! A UDP listener as a whole: the state its worker threads share (route, limits, live
//! session count, drain flag, fast path) and binding the `SO_REUSEPORT` socket group of a
//! listen port. Starting the threads ([`UdpListener::serve`]) is in `worker`, on top.

use crate::config::SessionConfig;
use crate::metrics::ListenerMetrics;
use crate::offload::ListenerOffload;
use crate::ratelog::RateLimit;
use crate::upstream::UpstreamRoute;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

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
    pub(super) open_failures: RateLimit,
    /// Live sessions over all ports and threads of this listener.
    pub(super) live: AtomicUsize,
    /// Set on shutdown: new sessions are refused, existing ones keep flowing.
    pub(super) draining: AtomicBool,
    /// Reference point for the coarse per-session activity clock.
    epoch: Instant,
    /// The kernel fast path, when `offload: ebpf` and it is available.
    pub(super) offload: OnceLock<Arc<ListenerOffload>>,
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

    pub(super) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
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

/// Binds `workers` `SO_REUSEPORT` sockets on `addr`, with room for bursts (4 MiB buffers).
/// A port that another socket already holds fails here, as a plain bind would.
pub fn bind_group(addr: SocketAddr, workers: usize) -> io::Result<Vec<UdpSocket>> {
    crate::sockio::bind_reuseport_group(addr, workers, 4 << 20)
}
