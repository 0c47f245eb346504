//! The control plane of one upstream: a task that owns its [`UpstreamState`], receives
//! probe results, passive signals and admin commands on a channel, and after each one
//! publishes the routing snapshot, evicts sessions, logs and counts events.
//!
//! The data plane never waits on this task: it reads the last published snapshot and sends
//! passive signals with `try_send`.

use super::server::ServerHandle;
use super::snapshot::{Snapshot, UpstreamRoute};
use super::state::{AdminState, EventKind, Step, UpstreamState, UpstreamView};
use crate::config::{Balance, Failback, HealthType, UpstreamConfig};
use crate::health::prober::{ProbeCounters, Prober};
use crate::health::{self, ProbeError, Reason};
use crate::metrics::{Metrics, child, labels};
use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// Messages to an upstream's controller.
#[derive(Debug)]
pub enum Control {
    Probe {
        server: Arc<ServerHandle>,
        result: Result<(), ProbeError>,
        at: Instant,
    },
    Passive {
        server: Arc<ServerHandle>,
        reason: Reason,
        detail: String,
        at: Instant,
    },
    SetAdmin {
        server: String,
        state: AdminState,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Failback {
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// A running upstream: its route for the data plane and handles for the admin API.
pub struct UpstreamRuntime {
    pub name: String,
    pub balance: Balance,
    pub failback: Failback,
    pub route: Arc<UpstreamRoute>,
    view: Arc<ArcSwap<UpstreamView>>,
    control: mpsc::Sender<Control>,
    ready: watch::Receiver<bool>,
    cancel: CancellationToken,
}

/// Per-server metric handles, resolved once.
struct ServerMetrics {
    up: Gauge,
    active: Gauge,
}

impl UpstreamRuntime {
    /// Starts the controller and one prober per server. `servers` are in priority order;
    /// `default_port` is the port probed for port-less servers.
    pub fn start(
        name: &str,
        cfg: &UpstreamConfig,
        servers: Vec<Arc<ServerHandle>>,
        default_port: u16,
        metrics: &Metrics,
    ) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        let now = Instant::now();
        let wall = SystemTime::now();
        let health_cfg = &cfg.health;
        let probe_less = health_cfg.kind == HealthType::None;
        let state = UpstreamState::new(
            name.to_string(),
            servers.clone(),
            cfg.balance,
            cfg.failback,
            cfg.failback_delay.get(),
            health_cfg.fall,
            health_cfg.rise,
            probe_less,
            now,
            wall,
        );
        let route = Arc::new(UpstreamRoute::new(
            name.to_string(),
            tx.clone(),
            cfg.passive,
            cfg.connect_timeout.get(),
            metrics
                .sessions_migrated
                .get_or_create(&labels(&[("upstream", name)]))
                .clone(),
        ));
        let cancel = CancellationToken::new();
        let (ready_tx, ready_rx) = watch::channel(false);
        let view = Arc::new(ArcSwap::from_pointee(state.view()));

        if let Some(check) = health::build(health_cfg) {
            let check: Arc<dyn health::HealthCheck> = Arc::from(check);
            for server in &servers {
                let port = health_cfg.port.or(server.port).unwrap_or(default_port);
                let counter = |result: &str| -> Counter {
                    metrics
                        .probes
                        .get_or_create(&labels(&[
                            ("upstream", name),
                            ("server", &server.label),
                            ("result", result),
                        ]))
                        .clone()
                };
                let prober = Prober {
                    check: check.clone(),
                    server: server.clone(),
                    target: SocketAddr::new(server.ip, port),
                    interval: health_cfg.interval.get(),
                    timeout: health_cfg.timeout.get(),
                    counters: ProbeCounters {
                        ok: counter("ok"),
                        failed: counter("failed"),
                        timeout: counter("timeout"),
                    },
                };
                tokio::spawn(prober.run(tx.clone(), cancel.clone()));
            }
        }

        // Series exist from the start, so dashboards and alerts see zeros, not gaps.
        for reason in Reason::ALL {
            let _ = child(
                &metrics.failovers,
                &labels(&[("upstream", name), ("reason", reason.as_str())]),
            );
        }
        let _ = child(&metrics.failbacks, &labels(&[("upstream", name)]));
        let _ = child(&metrics.detection, &labels(&[("upstream", name)]));
        let server_metrics = servers
            .iter()
            .map(|s| ServerMetrics {
                up: metrics
                    .server_up
                    .get_or_create(&labels(&[
                        ("upstream", name),
                        ("server", &s.label),
                        ("tier", s.tier.as_str()),
                    ]))
                    .clone(),
                active: metrics
                    .upstream_active
                    .get_or_create(&labels(&[("upstream", name), ("server", &s.label)]))
                    .clone(),
            })
            .collect();
        let controller = Controller {
            state,
            route: route.clone(),
            view: view.clone(),
            ready: ready_tx,
            metrics: metrics.clone(),
            server_metrics,
            generation: 0,
            first_round_deadline: now + health_cfg.timeout.get() + health_cfg.interval.get(),
            pending_reply: None,
        };
        tokio::spawn(controller.run(rx, cancel.clone()));

        UpstreamRuntime {
            name: name.to_string(),
            balance: cfg.balance,
            failback: cfg.failback,
            route,
            view,
            control: tx,
            ready: ready_rx,
            cancel,
        }
    }

    /// Waits until every server has been probed once (or the first round timed out).
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.clone();
        let _ = rx.wait_for(|r| *r).await;
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// The last published status view.
    pub fn view(&self) -> Arc<UpstreamView> {
        self.view.load_full()
    }

    /// Sets a server's admin state (`enable`, `drain`, `maint`).
    pub async fn set_admin(&self, server: &str, state: AdminState) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.ask(Control::SetAdmin {
            server: server.to_string(),
            state,
            reply,
        })
        .await?;
        rx.await.map_err(|_| "controller stopped".to_string())?
    }

    /// `POST /upstreams/NAME/failback`.
    pub async fn failback_now(&self) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.ask(Control::Failback { reply }).await?;
        rx.await.map_err(|_| "controller stopped".to_string())?
    }

    async fn ask(&self, msg: Control) -> Result<(), String> {
        self.control
            .send(msg)
            .await
            .map_err(|_| "controller stopped".to_string())
    }

    /// Stops the controller and probers.
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

impl Drop for UpstreamRuntime {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

struct Controller {
    state: UpstreamState,
    route: Arc<UpstreamRoute>,
    view: Arc<ArcSwap<UpstreamView>>,
    ready: watch::Sender<bool>,
    metrics: Metrics,
    server_metrics: Vec<ServerMetrics>,
    generation: u64,
    first_round_deadline: Instant,
    pending_reply: Option<oneshot::Sender<Result<(), String>>>,
}

impl Controller {
    async fn run(mut self, mut rx: mpsc::Receiver<Control>, cancel: CancellationToken) {
        if self.state.first_round_done() {
            self.apply(Step {
                publish: true,
                ..Step::default()
            });
        }
        loop {
            let now = Instant::now();
            let deadline = if self.state.first_round_done() {
                self.state.next_deadline(now)
            } else {
                Some(self.first_round_deadline)
            };
            let sleep = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            let step = tokio::select! {
                _ = cancel.cancelled() => return,
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => return,
                },
                _ = sleep => {
                    let now = Instant::now();
                    if self.state.first_round_done() {
                        self.state.tick(now, SystemTime::now())
                    } else {
                        tracing::warn!(upstream = %self.state.name, "first probe round incomplete at its deadline; starting with the answers so far");
                        self.state.finish_first_round(now)
                    }
                }
            };
            self.apply(step);
        }
    }

    fn handle(&mut self, msg: Control) -> Step {
        let wall = SystemTime::now();
        match msg {
            Control::Probe { server, result, at } => match self.state.index_of(&server) {
                Some(i) => self.state.probe_result(i, result, at, wall),
                None => Step::default(),
            },
            Control::Passive {
                server,
                reason,
                detail,
                at,
            } => match self.state.index_of(&server) {
                Some(i) => {
                    let step = self.state.passive_failure(i, reason, &detail, at, wall);
                    if self.state.is_up(i) {
                        // The signal raced with recovery; allow the next one through.
                        server.rearm_passive_report();
                    }
                    step
                }
                None => Step::default(),
            },
            Control::SetAdmin {
                server,
                state,
                reply,
            } => match self.state.set_admin(&server, state, Instant::now(), wall) {
                Ok(step) => {
                    tracing::info!(upstream = %self.state.name, %server, state = state.as_str(), "admin state changed");
                    self.pending_reply = Some(reply);
                    step
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                    Step::default()
                }
            },
            Control::Failback { reply } => {
                self.pending_reply = Some(reply);
                self.state.manual_failback(Instant::now(), wall)
            }
        }
    }

    fn apply(&mut self, step: Step) {
        if step.publish {
            self.generation += 1;
            self.route.publish(Snapshot {
                generation: self.generation,
                balance: self.state.balance(),
                servers: self.state.handles(),
                active: self.state.active_handles(),
                eligible: self.state.eligible_handles(),
            });
            let active = self.state.active_handles();
            for (i, (h, m)) in self
                .state
                .handles()
                .iter()
                .zip(&self.server_metrics)
                .enumerate()
            {
                m.up.set(i64::from(self.state.is_up(i)));
                m.active
                    .set(i64::from(active.iter().any(|a| Arc::ptr_eq(a, h))));
            }
        }
        // Evict after publishing so that sessions re-pin onto the new active set.
        for h in &step.evict {
            h.evict();
        }
        for h in &step.came_up {
            h.rearm_passive_report();
        }
        if let Some(ev) = &step.event {
            let upstream = self.state.name.as_str();
            match ev.kind {
                EventKind::Failover => {
                    let reason = ev.reason.unwrap_or("removed");
                    tracing::warn!(
                        upstream,
                        from = ?ev.from,
                        to = ?ev.to,
                        reason,
                        detection_ms = ev.detection_ms,
                        sessions_moved = ev.sessions_moved,
                        "failover"
                    );
                    self.metrics
                        .failovers
                        .get_or_create(&labels(&[("upstream", upstream), ("reason", reason)]))
                        .inc();
                    if let Some(ms) = ev.detection_ms {
                        self.metrics
                            .detection
                            .get_or_create(&labels(&[("upstream", upstream)]))
                            .observe(ms as f64 / 1000.0);
                    }
                }
                EventKind::Failback => {
                    tracing::info!(upstream, from = ?ev.from, to = ?ev.to, sessions_moved = ev.sessions_moved, "failback");
                    self.metrics
                        .failbacks
                        .get_or_create(&labels(&[("upstream", upstream)]))
                        .inc();
                }
            }
        }
        if self.state.first_round_done() && !*self.ready.borrow() {
            let _ = self.ready.send(true);
        }
        self.view.store(Arc::new(self.state.view()));
        // Answer commands only now, so the caller sees their effect in the view.
        if let Some(reply) = self.pending_reply.take() {
            let _ = reply.send(Ok(()));
        }
    }
}
