//! The prober: one task per server that runs its probe on its own timer and reports every
//! result through a [`ProbeSink`] (the upstream's controller implements it). Probes of
//! different servers never wait on each other, and a probe never outlives `timeout`.
//!
//! Health sits below the upstream layer (ARCHITECTURE.md): it knows probes, not servers
//! or controllers, so whoever starts a prober hands it the sink its results go to.

use super::{HealthCheck, ProbeError, Reason};
use prometheus_client::metrics::counter::Counter;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Where a prober's results go.
pub trait ProbeSink: Send + Sync + 'static {
    /// Delivers one result, taken at `at`; resolves to false when nobody listens any more
    /// (the prober then stops).
    fn report(
        &self,
        result: Result<(), ProbeError>,
        at: Instant,
    ) -> impl Future<Output = bool> + Send;
}

/// `mediagate_probes_total{upstream,server,result}` handles for one server.
#[derive(Clone, Debug)]
pub struct ProbeCounters {
    pub ok: Counter,
    pub failed: Counter,
    pub timeout: Counter,
    /// The balancer's own resources ran out (`result="local_error"`): not the server's fault.
    pub local_error: Counter,
}

/// Log lines about probes that failed for local reasons: at most a few per second for the
/// whole process, however many servers are probed.
static LOCAL_ERROR_LOG: std::sync::LazyLock<crate::ratelog::RateLimit> =
    std::sync::LazyLock::new(|| {
        crate::ratelog::RateLimit::new("probe_local_error", Duration::from_secs(10), 5)
    });

/// Everything one prober needs.
pub struct Prober<S> {
    pub check: Arc<dyn HealthCheck>,
    /// The server as logs name it (`ip:port`).
    pub label: String,
    /// Where results go.
    pub sink: S,
    /// Address probed (the server's, or `health.port` on the same host).
    pub target: SocketAddr,
    pub interval: Duration,
    pub timeout: Duration,
    pub counters: ProbeCounters,
}

impl<S: ProbeSink> Prober<S> {
    /// Runs until `cancel` fires or the sink goes away. The first probe starts at once.
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            let started = Instant::now();
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = tokio::time::timeout(self.timeout, self.check.check(self.target)) => match r {
                    Ok(r) => r,
                    Err(_) => Err(ProbeError::new(
                        Reason::ProbeTimeout,
                        format!("no answer from {} within {:?}", self.target, self.timeout),
                    )),
                },
            };
            match &result {
                Ok(()) => self.counters.ok.inc(),
                Err(e) if e.reason == Reason::ProbeTimeout => self.counters.timeout.inc(),
                Err(e) if e.reason == Reason::LocalError => self.counters.local_error.inc(),
                Err(_) => self.counters.failed.inc(),
            };
            match &result {
                // The balancer could not probe (out of descriptors, buffers or ports): the
                // sink never hears of it, so it counts toward nothing.
                Err(e) if e.reason == Reason::LocalError => {
                    if LOCAL_ERROR_LOG.allow() {
                        tracing::warn!(server = %self.label, target = %self.target, error = %e.detail, "probe could not run: local resources exhausted (not counted against the server)");
                    }
                }
                _ => {
                    if !self.sink.report(result, Instant::now()).await {
                        return;
                    }
                }
            }
            // Fixed cadence from the probe's start: a slow probe shortens the pause, so a
            // hung server is re-probed right after its timeout when timeout == interval.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until((started + self.interval).into()) => {}
            }
        }
    }
}
