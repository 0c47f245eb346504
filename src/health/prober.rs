//! The prober: one task per server that runs its probe on its own timer and reports every
//! result to the upstream's controller. Probes of different servers never wait on each
//! other, and a probe never outlives `timeout`.

use super::{HealthCheck, ProbeError, Reason};
use crate::upstream::{Control, ServerHandle};
use prometheus_client::metrics::counter::Counter;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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
pub struct Prober {
    pub check: Arc<dyn HealthCheck>,
    pub server: Arc<ServerHandle>,
    /// Address probed (the server's, or `health.port` on the same host).
    pub target: SocketAddr,
    pub interval: Duration,
    pub timeout: Duration,
    pub counters: ProbeCounters,
}

impl Prober {
    /// Runs until `cancel` fires or the controller goes away. The first probe starts at once.
    pub async fn run(self, control: mpsc::Sender<Control>, cancel: CancellationToken) {
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
                // controller never hears of it, so it counts toward nothing.
                Err(e) if e.reason == Reason::LocalError => {
                    if LOCAL_ERROR_LOG.allow() {
                        tracing::warn!(server = %self.server.label, target = %self.target, error = %e.detail, "probe could not run: local resources exhausted (not counted against the server)");
                    }
                }
                _ => {
                    let msg = Control::Probe {
                        server: self.server.clone(),
                        result,
                        at: Instant::now(),
                    };
                    if control.send(msg).await.is_err() {
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
