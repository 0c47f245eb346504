//! Prometheus metrics on one prometheus-client registry.
//!
//! Label values are resolved once, when a listener or server is created: the data plane
//! holds plain `Counter`/`Gauge` handles (one atomic each) and never builds a label set
//! per packet.
//!
//! `/metrics` serves OpenMetrics to clients that ask for it and the Prometheus text
//! format 0.0.4 otherwise ([`prometheus_text`]); [`process`] adds the `process_*` family.

pub mod process;
pub mod prometheus_text;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex, MutexGuard};

/// `yes` when the kernel fast path was compiled in (clang was there at build time).
fn fast_path_label() -> &'static str {
    if env!("MEDIAGATE_FAST_PATH") == "compiled in" {
        "yes"
    } else {
        "no"
    }
}

/// A function run before every scrape ([`Metrics::on_scrape`]).
pub type ScrapeHook = Arc<dyn Fn() + Send + Sync>;

/// A label set: `[("listener", "janus-rtp"), ...]`.
pub type Labels = Vec<(String, String)>;

type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn detection_histogram() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0,
    ])
}

/// Builds a label set from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The child of `family` for `labels`, cloned. Going through this function matters:
/// `get_or_create` returns a read guard, and a guard kept alive until the end of a longer
/// expression deadlocks the next insert into the same family.
pub fn child<M, C>(family: &Family<Labels, M, C>, labels: &Labels) -> M
where
    M: Clone + prometheus_client::metrics::TypedMetric,
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    family.get_or_create(labels).clone()
}

/// Every metric family of the process.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    pub server_up: Family<Labels, Gauge>,
    pub upstream_active: Family<Labels, Gauge>,
    /// `mediagate_server_admin_state{upstream,server,state}`: 1 on the server's admin state
    /// (`enable`, `drain`, `maint`), 0 on the other two.
    pub server_admin_state: Family<Labels, Gauge>,
    pub failovers: Family<Labels, Counter>,
    pub failbacks: Family<Labels, Counter>,
    pub detection: HistogramFamily,
    pub probes: Family<Labels, Counter>,
    /// `mediagate_silence_suspicions_total{upstream}`: probe rounds started at once
    /// because sessions that were getting replies got none (passive silence detection).
    pub silence_suspicions: Family<Labels, Counter>,
    /// `mediagate_upstream_all_down_total{upstream}`: times no server was eligible and the
    /// last ones kept serving (`when_all_down: keep_last`).
    pub all_down: Family<Labels, Counter>,
    /// `mediagate_upstream_degraded{upstream}`: 1 while an upstream serves from servers
    /// that are down because none is eligible.
    pub degraded: Family<Labels, Gauge>,
    /// `mediagate_probe_confirmations_total{upstream,result}`: ambiguous probe failures
    /// `confirmed` by every confirmation probe or `cancelled` by one that succeeded.
    pub probe_confirmations: Family<Labels, Counter>,
    pub sessions: Family<Labels, Gauge>,
    pub sessions_created: Family<Labels, Counter>,
    pub sessions_migrated: Family<Labels, Counter>,
    pub sessions_rejected: Family<Labels, Counter>,
    /// `mediagate_udp_new_sessions_deferred_total{listener}`: datagrams of new clients a
    /// UDP worker set aside for a later wakeup (its new-session work per wakeup was spent).
    pub new_sessions_deferred: Family<Labels, Counter>,
    pub packets: Family<Labels, Counter>,
    pub bytes: Family<Labels, Counter>,
    pub dropped: Family<Labels, Counter>,
    pub config_reloads: Family<Labels, Counter>,
    /// Sessions the balancer closed itself, by listener and reason (`idle_timeout`).
    pub sessions_closed: Family<Labels, Counter>,
    /// Called before every scrape by the owners of values that are read, not counted
    /// (the fd budget, the kernel fast path): see [`Metrics::on_scrape`].
    scrape_hooks: Arc<Mutex<Vec<(&'static str, ScrapeHook)>>>,
    /// Open admin API connections.
    pub admin_connections: Gauge,
    /// Admin connections closed by the balancer: `evicted` (an idle one, to make room at
    /// the cap), `refused` (at the cap with every connection busy), `header_timeout`.
    pub admin_closed: Family<Labels, Counter>,
    /// `mediagate_offload_sessions{listener}`: sessions the kernel fast path forwards.
    pub offload_sessions: Family<Labels, Gauge>,
    /// `mediagate_offload_packets_total{listener,direction}`: datagrams the kernel fast
    /// path forwarded (also counted in `mediagate_packets_total`).
    pub offload_packets: Family<Labels, Counter>,
    /// `mediagate_offload_errors_total{reason}`: the fast path was unavailable
    /// (`built_without_clang`, `disabled`, `permission`, `load`, `attach`, `slots`) or
    /// refused a session (`map_full`, `map_insert`); that traffic stays in user space.
    pub offload_errors: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        // An info metric: `mediagate_build_info{version="...",fast_path="yes"|"no"} 1`
        // (`fast_path`: the kernel fast path was compiled in, see build.rs).
        r.register(
            "mediagate_build",
            "Build information",
            Info::new(labels(&[
                ("version", env!("CARGO_PKG_VERSION")),
                ("fast_path", fast_path_label()),
            ])),
        );
        r.register_collector(Box::new(process::ProcessCollector::new()));

        macro_rules! fam {
            ($name:literal, $help:literal) => {{
                let f = Family::default();
                r.register($name, $help, f.clone());
                f
            }};
        }
        let detection = HistogramFamily::new_with_constructor(detection_histogram);
        r.register(
            "mediagate_failover_detection_seconds",
            "Time from a failed server's last good probe or packet to it being marked down",
            detection.clone(),
        );
        let server_up = fam!("mediagate_server_up", "1 when the server is healthy");
        let upstream_active = fam!(
            "mediagate_upstream_active",
            "1 when the server is in its upstream's active set"
        );
        let server_admin_state = fam!(
            "mediagate_server_admin_state",
            "1 on the server's admin state (enable, drain, maint), 0 on the others"
        );
        let failovers = fam!("mediagate_failovers", "Failovers, by upstream and reason");
        let failbacks = fam!("mediagate_failbacks", "Failbacks, by upstream");
        let probes = fam!("mediagate_probes", "Health probes, by result");
        let silence_suspicions = fam!(
            "mediagate_silence_suspicions",
            "Probe rounds started at once because answered sessions fell silent"
        );
        let all_down = fam!(
            "mediagate_upstream_all_down",
            "Times no server was eligible and the last ones kept serving"
        );
        let degraded = fam!(
            "mediagate_upstream_degraded",
            "1 while the upstream serves from servers that are down because none is eligible"
        );
        let probe_confirmations = fam!(
            "mediagate_probe_confirmations",
            "Ambiguous probe failures, confirmed by more probes or cancelled by a success"
        );
        let sessions = fam!("mediagate_sessions", "Live sessions, by listener");
        let sessions_created = fam!("mediagate_sessions_created", "Sessions created");
        let sessions_migrated = fam!(
            "mediagate_sessions_migrated",
            "Sessions moved to another server"
        );
        let sessions_rejected = fam!("mediagate_sessions_rejected", "Sessions refused, by reason");
        let new_sessions_deferred = fam!(
            "mediagate_udp_new_sessions_deferred",
            "Datagrams of new clients a UDP worker left for a later wakeup (established flows first)"
        );
        let packets = fam!("mediagate_packets", "Datagrams forwarded, by direction");
        let bytes = fam!("mediagate_bytes", "Bytes forwarded, by direction");
        let dropped = fam!("mediagate_dropped_packets", "Datagrams dropped, by reason");
        let config_reloads = fam!(
            "mediagate_config_reloads",
            "Configuration reloads, by result"
        );
        for result in ["ok", "error"] {
            let _ = child(&config_reloads, &labels(&[("result", result)]));
        }
        let sessions_closed = fam!(
            "mediagate_sessions_closed",
            "Sessions the balancer closed itself, by reason"
        );
        let admin_connections = Gauge::default();
        r.register(
            "mediagate_admin_connections",
            "Open admin API connections",
            admin_connections.clone(),
        );
        let admin_closed = fam!(
            "mediagate_admin_connections_closed",
            "Admin API connections closed by the balancer, by reason"
        );
        for reason in ["evicted", "refused", "header_timeout"] {
            let _ = child(&admin_closed, &labels(&[("reason", reason)]));
        }
        let offload_sessions = fam!(
            "mediagate_offload_sessions",
            "Sessions forwarded by the kernel fast path, by listener"
        );
        let offload_packets = fam!(
            "mediagate_offload_packets",
            "Datagrams forwarded by the kernel fast path, by listener and direction"
        );
        let offload_errors = fam!(
            "mediagate_offload_errors",
            "Kernel fast path unavailable or refusing a session, by reason"
        );
        Metrics {
            registry: Arc::new(Mutex::new(r)),
            server_up,
            upstream_active,
            server_admin_state,
            failovers,
            failbacks,
            detection,
            probes,
            silence_suspicions,
            all_down,
            degraded,
            probe_confirmations,
            sessions,
            sessions_created,
            sessions_migrated,
            sessions_rejected,
            new_sessions_deferred,
            packets,
            bytes,
            dropped,
            config_reloads,
            sessions_closed,
            scrape_hooks: Arc::default(),
            admin_connections,
            admin_closed,
            offload_sessions,
            offload_packets,
            offload_errors,
        }
    }

    /// The registry, for subsystems that register their own families (TURN).
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `hook` before every scrape, so values that are read rather than counted (a
    /// limit, what the kernel forwarded) are current when `/metrics` is encoded. The owner of
    /// those values registers its own hook; a second hook under the same `name` replaces
    /// nothing and is dropped, so registering is idempotent.
    pub fn on_scrape(&self, name: &'static str, hook: ScrapeHook) {
        let mut hooks = self.scrape_hooks.lock().unwrap_or_else(|p| p.into_inner());
        if !hooks.iter().any(|(n, _)| *n == name) {
            hooks.push((name, hook));
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let hooks: Vec<ScrapeHook> = {
            let hooks = self.scrape_hooks.lock().unwrap_or_else(|p| p.into_inner());
            hooks.iter().map(|(_, h)| h.clone()).collect()
        };
        for hook in hooks {
            hook();
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry());
        out
    }

    /// The Prometheus text exposition, format 0.0.4.
    pub fn encode_prometheus(&self) -> String {
        prometheus_text::from_openmetrics(&self.encode())
    }

    /// Handles for one listener.
    pub fn listener(&self, name: &str) -> ListenerMetrics {
        let l = |extra: &[(&str, &str)]| {
            let mut v = labels(&[("listener", name)]);
            v.extend(labels(extra));
            v
        };
        let dropped = |reason| child(&self.dropped, &l(&[("reason", reason)]));
        let rejected = |reason| child(&self.sessions_rejected, &l(&[("reason", reason)]));
        let packets = |direction| child(&self.packets, &l(&[("direction", direction)]));
        let bytes = |direction| child(&self.bytes, &l(&[("direction", direction)]));
        ListenerMetrics {
            sessions: child(&self.sessions, &l(&[])),
            created: child(&self.sessions_created, &l(&[])),
            packets_to_server: packets("to_server"),
            packets_to_client: packets("to_client"),
            bytes_to_server: bytes("to_server"),
            bytes_to_client: bytes("to_client"),
            dropped_no_server: dropped("no_server"),
            dropped_max_sessions: dropped("max_sessions"),
            dropped_draining: dropped("draining"),
            dropped_send_error: dropped("send_error"),
            dropped_stale_server: dropped("stale_server"),
            rejected_no_server: rejected("no_server"),
            rejected_max_sessions: rejected("max_sessions"),
            rejected_draining: rejected("draining"),
            dropped_fd_budget: dropped("fd_budget"),
            rejected_fd_budget: rejected("fd_budget"),
            dropped_source_rate: dropped("source_rate"),
            rejected_source_rate: rejected("source_rate"),
            dropped_source_sessions: dropped("source_sessions"),
            rejected_source_sessions: rejected("source_sessions"),
            dropped_local_error: dropped("local_error"),
            rejected_local_error: rejected("local_error"),
            dropped_backlog: dropped("new_session_backlog"),
            rejected_backlog: rejected("new_session_backlog"),
            deferred_new: child(&self.new_sessions_deferred, &l(&[])),
            rejected_max_connections: rejected("max_connections"),
            rejected_proxy_header: rejected("proxy_header"),
            closed_idle: child(&self.sessions_closed, &l(&[("reason", "idle_timeout")])),
            offload_sessions: child(&self.offload_sessions, &l(&[])),
            offload_packets_to_server: child(
                &self.offload_packets,
                &l(&[("direction", "to_server")]),
            ),
            offload_packets_to_client: child(
                &self.offload_packets,
                &l(&[("direction", "to_client")]),
            ),
        }
    }
}

/// Content type of [`Metrics::encode`].
pub const OPENMETRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of [`Metrics::encode_prometheus`].
pub const PROMETHEUS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics (any `application/openmetrics-text`
/// range not refused with `q=0`); everything else gets the Prometheus text format.
pub fn wants_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("");
        media.eq_ignore_ascii_case("application/openmetrics-text")
            && !parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            })
    })
}

/// Per-listener handles, resolved once.
#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    pub sessions: Gauge,
    pub created: Counter,
    pub packets_to_server: Counter,
    pub packets_to_client: Counter,
    pub bytes_to_server: Counter,
    pub bytes_to_client: Counter,
    pub dropped_no_server: Counter,
    pub dropped_max_sessions: Counter,
    pub dropped_draining: Counter,
    pub dropped_send_error: Counter,
    /// Replies from a server the session has already left.
    pub dropped_stale_server: Counter,
    pub rejected_no_server: Counter,
    pub rejected_max_sessions: Counter,
    pub rejected_draining: Counter,
    /// The process's file-descriptor budget was used up (`crate::fdbudget`).
    pub dropped_fd_budget: Counter,
    pub rejected_fd_budget: Counter,
    /// UDP: the source IP's new-session rate (`session.new_per_source_per_second`).
    pub dropped_source_rate: Counter,
    pub rejected_source_rate: Counter,
    /// UDP: the source IP's live sessions (`session.max_per_source`).
    pub dropped_source_sessions: Counter,
    pub rejected_source_sessions: Counter,
    /// Opening the server side failed for a local reason (EMFILE, ENOBUFS, no port).
    pub dropped_local_error: Counter,
    pub rejected_local_error: Counter,
    /// UDP: a new client's datagram found the worker's backlog of deferred new-session
    /// datagrams full.
    pub dropped_backlog: Counter,
    pub rejected_backlog: Counter,
    /// UDP: a new client's datagram was deferred to a later wakeup.
    pub deferred_new: Counter,
    /// TCP: the listener's `max_connections`.
    pub rejected_max_connections: Counter,
    /// TCP `accept_proxy_protocol`: no valid PROXY v2 header within 5 s.
    pub rejected_proxy_header: Counter,
    /// Sessions closed for inactivity (`session.idle_timeout`).
    pub closed_idle: Counter,
    /// Sessions the kernel fast path forwards now (`offload: ebpf`).
    pub offload_sessions: Gauge,
    /// Datagrams the kernel fast path forwarded (also in `packets_to_*`).
    pub offload_packets_to_server: Counter,
    pub offload_packets_to_client: Counter,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_spec_names() {
        let m = Metrics::new();
        let l = m.listener("rtp");
        l.packets_to_server.inc();
        m.failovers
            .get_or_create(&labels(&[("upstream", "u"), ("reason", "probe_timeout")]))
            .inc();
        m.detection
            .get_or_create(&labels(&[("upstream", "u")]))
            .observe(0.1);
        let text = m.encode();
        for name in [
            "mediagate_build_info{version=",
            "fast_path=\"",
            "mediagate_packets_total{listener=\"rtp\",direction=\"to_server\"} 1",
            "mediagate_failovers_total{upstream=\"u\",reason=\"probe_timeout\"} 1",
            "mediagate_failover_detection_seconds_bucket",
            "mediagate_dropped_packets_total{listener=\"rtp\",reason=\"no_server\"} 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        let prom = m.encode_prometheus();
        for line in [
            "# TYPE mediagate_build_info gauge",
            "# TYPE mediagate_packets_total counter",
            "# TYPE process_cpu_seconds_total counter",
            "# TYPE process_open_fds gauge",
        ] {
            assert!(prom.contains(line), "missing {line} in\n{prom}");
        }
        assert!(!prom.contains("# EOF"));
    }

    #[test]
    fn scrape_hooks_run_before_every_encode_once_per_name() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let m = Metrics::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let g = Gauge::<i64>::default();
        m.registry()
            .register("test_read", "Read at scrape", g.clone());
        for _ in 0..2 {
            let (runs, g) = (runs.clone(), g.clone());
            m.on_scrape(
                "test",
                Arc::new(move || {
                    runs.fetch_add(1, Ordering::Relaxed);
                    g.set(42);
                }),
            );
        }
        assert!(m.encode().contains("test_read 42"));
        assert_eq!(runs.load(Ordering::Relaxed), 1, "one hook per name");
        m.encode();
        assert_eq!(runs.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn accept_negotiation() {
        assert!(!wants_openmetrics(""));
        assert!(!wants_openmetrics("text/plain"));
        assert!(!wants_openmetrics("*/*"));
        assert!(wants_openmetrics("application/openmetrics-text"));
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3"
        ));
        assert!(!wants_openmetrics(
            "application/openmetrics-text; q=0, text/plain"
        ));
    }
}
