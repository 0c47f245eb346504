//! The control plane of one upstream: a task that owns its [`UpstreamState`] and its
//! probers, receives probe results, passive signals, admin commands, server lists
//! (discovery) and new settings (reload) on a channel, and after each one publishes the
//! routing snapshot, evicts sessions, and logs and counts events.
//!
//! The data plane never waits on this task: it reads the last published snapshot and sends
//! passive signals with `try_send`.

use super::server::ServerHandle;
use super::snapshot::{Snapshot, UpstreamRoute};
use super::state::{AdminState, EventKind, Policy, Step, UpstreamState, UpstreamView};
use crate::config::{HealthConfig, HealthType, UpstreamConfig};
use crate::discovery::{Readiness, Target};
use crate::health::prober::{ProbeCounters, Prober};
use crate::health::{self, HealthCheck, ProbeError, Reason};
use crate::metrics::{Labels, Metrics, child, labels};
use arc_swap::ArcSwap;
use prometheus_client::metrics::gauge::Gauge;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
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
    /// A new server list, in priority order (discovery, reload).
    Servers(Vec<Target>),
    /// New settings after a reload.
    Reconfigure {
        spec: Box<UpstreamSpec>,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// What a controller takes from the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSpec {
    pub config: UpstreamConfig,
    /// Port probed and shown for port-less servers (the first listener's port).
    pub default_port: u16,
    /// Protocols whose passive failures mark a server down.
    pub passive: crate::config::ProtocolSet,
}

impl UpstreamSpec {
    fn policy(&self) -> Policy {
        let c = &self.config;
        Policy {
            balance: c.balance,
            failback: c.failback,
            failback_delay: c.failback_delay.get(),
            fall: c.health.fall,
            rise: c.health.rise,
            probe_less: c.health.kind == HealthType::None,
        }
    }
}

/// A running upstream: its route for the data plane and handles for the admin API.
pub struct UpstreamRuntime {
    pub name: String,
    pub route: Arc<UpstreamRoute>,
    view: Arc<ArcSwap<UpstreamView>>,
    control: mpsc::Sender<Control>,
    ready: watch::Receiver<bool>,
    cancel: CancellationToken,
}

/// Per-server metric handles, resolved once.
struct ServerMetrics {
    handle: Arc<ServerHandle>,
    up_labels: Labels,
    active_labels: Labels,
    up: Gauge,
    active: Gauge,
}

impl UpstreamRuntime {
    /// Starts the controller (and through it one prober per server) with an initial
    /// server list.
    pub fn start(name: &str, spec: UpstreamSpec, targets: Vec<Target>, metrics: &Metrics) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        let now = Instant::now();
        let cfg = &spec.config;
        let route = Arc::new(UpstreamRoute::new(
            name.to_string(),
            tx.clone(),
            spec.passive,
            cfg.connect_timeout.get(),
            child(&metrics.sessions_migrated, &labels(&[("upstream", name)])),
        ));
        // Series exist from the start, so dashboards and alerts see zeros, not gaps.
        for reason in Reason::ALL {
            let _ = child(
                &metrics.failovers,
                &labels(&[("upstream", name), ("reason", reason.as_str())]),
            );
        }
        let _ = child(&metrics.failbacks, &labels(&[("upstream", name)]));
        let _ = child(&metrics.detection, &labels(&[("upstream", name)]));

        let cancel = CancellationToken::new();
        let (ready_tx, ready_rx) = watch::channel(false);
        let mut controller = Controller {
            state: UpstreamState::new(
                name.to_string(),
                Vec::new(),
                spec.policy(),
                now,
                SystemTime::now(),
            ),
            check: health::build(&cfg.health).map(Arc::from),
            spec,
            route: route.clone(),
            view: Arc::new(ArcSwap::from_pointee(UpstreamView::default())),
            ready: ready_tx,
            metrics: metrics.clone(),
            server_metrics: Vec::new(),
            probers: Vec::new(),
            control: tx.clone(),
            cancel: cancel.clone(),
            generation: 0,
            first_round_deadline: now,
            pending_reply: None,
        };
        controller.first_round_deadline = now + controller.first_round_budget();
        let view = controller.view.clone();
        let step = controller.set_servers(targets);
        controller.apply(step);
        tokio::spawn(controller.run(rx));

        UpstreamRuntime {
            name: name.to_string(),
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

    /// Applies new settings from a reload.
    pub async fn reconfigure(&self, spec: UpstreamSpec) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.ask(Control::Reconfigure {
            spec: Box::new(spec),
            reply,
        })
        .await?;
        rx.await.map_err(|_| "controller stopped".to_string())?
    }

    /// Replaces the server list.
    pub async fn set_servers(&self, targets: Vec<Target>) -> Result<(), String> {
        self.ask(Control::Servers(targets)).await
    }

    /// The channel for a discovery feeder.
    pub fn control(&self) -> mpsc::Sender<Control> {
        self.control.clone()
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
    spec: UpstreamSpec,
    check: Option<Arc<dyn HealthCheck>>,
    route: Arc<UpstreamRoute>,
    view: Arc<ArcSwap<UpstreamView>>,
    ready: watch::Sender<bool>,
    metrics: Metrics,
    server_metrics: Vec<ServerMetrics>,
    probers: Vec<(Arc<ServerHandle>, CancellationToken)>,
    control: mpsc::Sender<Control>,
    cancel: CancellationToken,
    generation: u64,
    first_round_deadline: Instant,
    pending_reply: Option<oneshot::Sender<Result<(), String>>>,
}

impl Controller {
    async fn run(mut self, mut rx: mpsc::Receiver<Control>) {
        let cancel = self.cancel.clone();
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

    /// Start-up waits at most one probe (timeout) plus a little scheduling slack.
    fn first_round_budget(&self) -> Duration {
        self.spec.config.health.timeout.get() + Duration::from_millis(100)
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
            Control::Servers(targets) => self.set_servers(targets),
            Control::Reconfigure { spec, reply } => {
                let health_changed = spec.config.health != self.spec.config.health
                    || spec.default_port != self.spec.default_port;
                self.route
                    .set_options(spec.passive, spec.config.connect_timeout.get());
                let policy = spec.policy();
                self.spec = *spec;
                if health_changed {
                    // New probe settings: restart every prober with them.
                    self.check = health::build(&self.spec.config.health).map(Arc::from);
                    for (_, token) in self.probers.drain(..) {
                        token.cancel();
                    }
                    self.sync_probers();
                }
                self.pending_reply = Some(reply);
                self.state.set_policy(policy, Instant::now(), wall)
            }
        }
    }

    /// Turns targets into handles (reusing the handle of a server that stays) and hands
    /// the list to the state; starts and stops probers and metric series to match.
    fn set_servers(&mut self, targets: Vec<Target>) -> Step {
        let existing = self.state.handles();
        let default_port = self.spec.default_port;
        let list: Vec<(Arc<ServerHandle>, Readiness)> = targets
            .into_iter()
            .map(|t| {
                let handle = existing
                    .iter()
                    .find(|h| h.ip == t.ip && h.port == t.port && h.tier == t.tier)
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(ServerHandle::new(t.ip, t.port, default_port, t.tier))
                    });
                (handle, t.readiness)
            })
            .collect();
        let step = self
            .state
            .replace_servers(list, Instant::now(), SystemTime::now());
        self.sync_probers();
        self.sync_metrics();
        step
    }

    fn sync_probers(&mut self) {
        let handles = self.state.handles();
        self.probers.retain(|(h, token)| {
            let keep = handles.iter().any(|x| Arc::ptr_eq(x, h));
            if !keep {
                token.cancel();
            }
            keep
        });
        let Some(check) = self.check.clone() else {
            return;
        };
        let hc: &HealthConfig = &self.spec.config.health;
        let name = self.state.name.clone();
        for server in handles {
            if self.probers.iter().any(|(h, _)| Arc::ptr_eq(h, &server)) {
                continue;
            }
            let port = hc.port.or(server.port).unwrap_or(self.spec.default_port);
            let counter = |result: &str| {
                child(
                    &self.metrics.probes,
                    &labels(&[
                        ("upstream", &name),
                        ("server", &server.label),
                        ("result", result),
                    ]),
                )
            };
            let prober = Prober {
                check: check.clone(),
                server: server.clone(),
                target: SocketAddr::new(server.ip, port),
                interval: hc.interval.get(),
                timeout: hc.timeout.get(),
                counters: ProbeCounters {
                    ok: counter("ok"),
                    failed: counter("failed"),
                    timeout: counter("timeout"),
                    local_error: counter("local_error"),
                },
            };
            let token = self.cancel.child_token();
            tokio::spawn(prober.run(self.control.clone(), token.clone()));
            self.probers.push((server, token));
        }
    }

    fn sync_metrics(&mut self) {
        let handles = self.state.handles();
        let m = &self.metrics;
        self.server_metrics.retain(|sm| {
            let keep = handles.iter().any(|h| Arc::ptr_eq(h, &sm.handle));
            if !keep {
                m.server_up.remove(&sm.up_labels);
                m.upstream_active.remove(&sm.active_labels);
            }
            keep
        });
        let name = self.state.name.as_str();
        for h in handles {
            if self
                .server_metrics
                .iter()
                .any(|sm| Arc::ptr_eq(&sm.handle, &h))
            {
                continue;
            }
            let up_labels = labels(&[
                ("upstream", name),
                ("server", &h.label),
                ("tier", h.tier.as_str()),
            ]);
            let active_labels = labels(&[("upstream", name), ("server", &h.label)]);
            self.server_metrics.push(ServerMetrics {
                up: child(&m.server_up, &up_labels),
                active: child(&m.upstream_active, &active_labels),
                up_labels,
                active_labels,
                handle: h,
            });
        }
    }

    fn apply(&mut self, step: Step) {
        if step.publish {
            self.generation += 1;
            let active = self.state.active_handles();
            self.route.publish(Snapshot {
                generation: self.generation,
                balance: self.state.balance(),
                servers: self.state.handles(),
                active: active.clone(),
                eligible: self.state.eligible_handles(),
            });
            for sm in &self.server_metrics {
                let up = self
                    .state
                    .index_of(&sm.handle)
                    .is_some_and(|i| self.state.is_up(i));
                sm.up.set(i64::from(up));
                sm.active
                    .set(i64::from(active.iter().any(|a| Arc::ptr_eq(a, &sm.handle))));
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
                    child(
                        &self.metrics.failovers,
                        &labels(&[("upstream", upstream), ("reason", reason)]),
                    )
                    .inc();
                    if let Some(ms) = ev.detection_ms {
                        child(&self.metrics.detection, &labels(&[("upstream", upstream)]))
                            .observe(ms as f64 / 1000.0);
                    }
                }
                EventKind::Failback => {
                    tracing::info!(upstream, from = ?ev.from, to = ?ev.to, sessions_moved = ev.sessions_moved, "failback");
                    child(&self.metrics.failbacks, &labels(&[("upstream", upstream)])).inc();
                }
            }
        }
        if self.state.first_round_done() && !*self.ready.borrow() {
            let _ = self.ready.send(true);
        }
        let mut view = self.state.view();
        view.balance = self.spec.config.balance.as_str();
        view.failback = self.spec.config.failback.as_str();
        self.view.store(Arc::new(view));
        // Answer commands only now, so the caller sees their effect in the view.
        if let Some(reply) = self.pending_reply.take() {
            let _ = reply.send(Ok(()));
        }
    }
}
