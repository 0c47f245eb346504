//! The control plane of one upstream: a task that owns its [`UpstreamState`] and its
//! probers, receives probe results, passive signals, admin commands, server lists
//! (discovery) and new settings (reload) on a channel, and after each one publishes the
//! routing snapshot, evicts sessions, and logs and counts events.
//!
//! The data plane never waits on this task: it reads the last published snapshot and sends
//! passive signals with `try_send`.
//!
//! The task stays responsive with thousands of servers: commands (reload, discovery,
//! admin) arrive on their own small channel that is served before probe results, so they
//! never queue behind a full probe channel; every per-message step is O(1) or O(changed
//! servers) (servers are found through an index, not a scan); and the O(servers) work
//! (routing snapshot, gauges, the `/status` view, the next timer) runs once per batch of
//! queued messages, the view at most every [`VIEW_EVERY`] unless a command waits for it.

use super::control::{Control, UpstreamSpec};
use super::group::{DownHosts, GroupMsg, NodeGroups};
use super::server::ServerHandle;
use super::snapshot::{Snapshot, UpstreamRoute};
use super::state::{AdminState, EventKind, Step, UpstreamState, UpstreamView};
use crate::config::{HealthConfig, HealthType};
use crate::discovery::{Readiness, Target};
use crate::health::prober::{Confirm, ProbeCounters, Prober};
use crate::health::{self, HealthCheck, Reason};
use crate::metrics::{Metrics, child, labels};
use arc_swap::ArcSwap;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

mod gauges;
mod reports;
use gauges::ServerMetrics;
use reports::ProbeReports;

/// Messages handled per wakeup before the O(servers) publishing work runs.
const BATCH: usize = 256;
/// Longest the `/status` view lags behind probe results (commands refresh it at once).
const VIEW_EVERY: Duration = Duration::from_millis(100);
/// Probers started at once beyond this number have their first probes spread out.
const SPREAD_ABOVE: usize = 100;
/// Capacity of the command channel (reload, discovery, admin); probe results and passive
/// signals have their own channel of 1024.
const COMMANDS: usize = 64;

/// The identity of a server handle (its address), for the controller's indexes.
fn key(h: &Arc<ServerHandle>) -> usize {
    Arc::as_ptr(h) as usize
}

/// A running upstream: its route for the data plane and handles for the admin API.
pub struct UpstreamRuntime {
    pub name: String,
    pub route: Arc<UpstreamRoute>,
    view: Arc<ArcSwap<UpstreamView>>,
    /// Commands: served before probe results.
    commands: mpsc::Sender<Control>,
    ready: watch::Receiver<bool>,
    cancel: CancellationToken,
    /// What this replica's own probes see down (label, reason), for `cluster:`.
    local_down: watch::Receiver<LocalDown>,
}

/// Servers this replica sees down by itself: (label, reason).
pub type LocalDown = Arc<Vec<(String, &'static str)>>;

impl UpstreamRuntime {
    /// Starts the controller (and through it one prober per server) with an initial
    /// server list.
    pub fn start(
        name: &str,
        spec: UpstreamSpec,
        targets: Vec<Target>,
        metrics: &Metrics,
        groups: &NodeGroups,
    ) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        let (commands, commands_rx) = mpsc::channel(COMMANDS);
        let now = Instant::now();
        let cfg = &spec.config;
        let route = Arc::new(UpstreamRoute::new(
            name.to_string(),
            tx.clone(),
            spec.passive,
            cfg.connect_timeout.get(),
            child(&metrics.sessions_migrated, &labels(&[("upstream", name)])),
        ));
        route.set_probed(cfg.health.kind != HealthType::None);
        // Series exist from the start, so dashboards and alerts see zeros, not gaps.
        for reason in Reason::ALL.into_iter().chain([Reason::Degraded]) {
            let _ = child(
                &metrics.failovers,
                &labels(&[("upstream", name), ("reason", reason.as_str())]),
            );
        }
        let _ = child(&metrics.failbacks, &labels(&[("upstream", name)]));
        let _ = child(&metrics.detection, &labels(&[("upstream", name)]));

        let cancel = CancellationToken::new();
        let (ready_tx, ready_rx) = watch::channel(false);
        let (local_down_tx, local_down_rx) = watch::channel(LocalDown::default());
        let group = cfg
            .node_group
            .as_deref()
            .map(|g| (g.to_string(), groups.sender(g)));
        let mut controller = Controller {
            groups: groups.clone(),
            group,
            reported_hosts: None,
            outgoing: Vec::new(),
            commands: commands.clone(),
            local_down: local_down_tx,
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
            replies: Vec::new(),
            index: HashMap::new(),
            publish_due: false,
            evict_due: Vec::new(),
            came_up_due: Vec::new(),
            view_dirty: true,
            view_built: now,
            next_timer: None,
            timer_stale: true,
        };
        controller.first_round_deadline =
            now + controller.first_round_budget() + controller.start_spread(targets.len());
        let view = controller.view.clone();
        let step = controller.set_servers(targets);
        controller.absorb(step);
        controller.flush();
        tokio::spawn(controller.run(commands_rx, rx));

        UpstreamRuntime {
            name: name.to_string(),
            route,
            view,
            commands,
            ready: ready_rx,
            cancel,
            local_down: local_down_rx,
        }
    }

    /// What this replica's own probes see down, as last published (`cluster:`).
    pub fn local_down(&self) -> LocalDown {
        self.local_down.borrow().clone()
    }

    /// Hands the peers' health verdict to the controller without waiting: `false` when
    /// the command channel is full (the caller retries at its next round).
    pub fn peer_down(&self, down: HashMap<String, String>) -> bool {
        self.commands.try_send(Control::PeerDown(down)).is_ok()
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

    /// The command channel, for a discovery feeder (`Control::Servers`).
    pub fn control(&self) -> mpsc::Sender<Control> {
        self.commands.clone()
    }

    /// A reload's new settings and server list in one step, answered once applied (the
    /// `/status` view shows them). Fails only when the controller has stopped.
    pub async fn reload(&self, spec: UpstreamSpec, targets: Vec<Target>) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.ask(Control::Reload {
            spec: Box::new(spec),
            targets,
            reply,
        })
        .await?;
        rx.await.map_err(|_| "controller stopped".to_string())?
    }

    async fn ask(&self, msg: Control) -> Result<(), String> {
        self.commands
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
    /// Every node group of the process, and this upstream's (`node_group`) with its task.
    groups: NodeGroups,
    group: Option<(String, mpsc::UnboundedSender<GroupMsg>)>,
    /// The hosts last reported to the group (None: not yet).
    reported_hosts: Option<DownHosts>,
    /// Events of the steps since the last flush: published on the bus, or handed to the
    /// node group to publish with the other members' reactions.
    outgoing: Vec<crate::events::EventStatus>,
    /// This controller's own command channel (the group answers through it).
    commands: mpsc::Sender<Control>,
    local_down: watch::Sender<LocalDown>,
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
    /// Commands answered at the next flush, so callers see their effect in the view.
    replies: Vec<oneshot::Sender<Result<(), String>>>,
    /// Position of each server handle in the state (by [`key`]).
    index: HashMap<usize, usize>,
    /// Work gathered from a batch of messages, done once by [`Controller::flush`].
    publish_due: bool,
    evict_due: Vec<Arc<ServerHandle>>,
    came_up_due: Vec<Arc<ServerHandle>>,
    view_dirty: bool,
    view_built: Instant,
    /// The state's next timer, recomputed only after a message that may move it.
    next_timer: Option<Instant>,
    timer_stale: bool,
}

impl Controller {
    async fn run(mut self, mut commands: mpsc::Receiver<Control>, mut rx: mpsc::Receiver<Control>) {
        let cancel = self.cancel.clone();
        loop {
            let deadline = self.deadline();
            let sleep = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            // Commands first, then timers, then probe results: a flood of probe results
            // delays neither a reload nor a failback timer.
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                msg = commands.recv() => match msg {
                    Some(msg) => self.handle_and_absorb(msg),
                    None => return,
                },
                _ = sleep => self.on_timer(),
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle_and_absorb(msg),
                    None => return,
                },
            }
            // Take what else is queued, then do the O(servers) work once.
            for _ in 0..BATCH {
                let msg = match commands.try_recv() {
                    Ok(m) => m,
                    Err(_) => match rx.try_recv() {
                        Ok(m) => m,
                        Err(_) => break,
                    },
                };
                self.handle_and_absorb(msg);
            }
            self.flush();
        }
    }

    /// When the loop must wake without a message: the state's timer, the first round's
    /// deadline, or a pending view refresh.
    fn deadline(&mut self) -> Option<Instant> {
        let state = if self.state.first_round_done() {
            if self.timer_stale {
                self.next_timer = self.state.next_deadline(Instant::now());
                self.timer_stale = false;
            }
            self.next_timer
        } else {
            Some(self.first_round_deadline)
        };
        let view = self.view_dirty.then_some(self.view_built + VIEW_EVERY);
        match (state, view) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        let step = if self.state.first_round_done() {
            if self.next_timer.is_some_and(|t| t <= now) {
                self.timer_stale = true;
                self.state.tick(now, SystemTime::now())
            } else {
                Step::default()
            }
        } else if now >= self.first_round_deadline {
            tracing::warn!(upstream = %self.state.name, "first probe round incomplete at its deadline; starting with the answers so far");
            self.timer_stale = true;
            self.state.finish_first_round(now)
        } else {
            Step::default()
        };
        self.absorb(step);
    }

    fn handle_and_absorb(&mut self, msg: Control) {
        if let Control::GroupDown { down, reply } = msg {
            // The events this verdict causes go back to the group, which publishes them
            // with the reporting member's as one.
            let step = self
                .state
                .set_group_down(&down, Instant::now(), SystemTime::now());
            self.timer_stale = true;
            let before = self.outgoing.len();
            self.absorb(step);
            let _ = reply.send(self.outgoing.split_off(before));
            return;
        }
        // A probe result or passive signal that changed nothing visible moves no timer:
        // timers (failback delay, probe-less recovery) change only with a transition.
        let signal = matches!(msg, Control::Probe { .. } | Control::Passive { .. });
        let step = self.handle(msg);
        let trivial = signal
            && self.state.first_round_done()
            && !step.publish
            && step.evict.is_empty()
            && step.came_up.is_empty()
            && step.event.is_none();
        if !trivial {
            self.timer_stale = true;
        }
        self.absorb(step);
    }

    /// How long the first probes of `n` new probers are spread over: nothing below
    /// [`SPREAD_ABOVE`], else half a probe timeout, so that thousands of servers arriving
    /// at once (start-up, a reload) do not start thousands of probes in one burst that
    /// holds up every other task (the admin API among them).
    fn start_spread(&self, n: usize) -> Duration {
        if n <= SPREAD_ABOVE || self.check.is_none() {
            return Duration::ZERO;
        }
        self.spec.config.health.timeout.get() / 2
    }

    /// Start-up waits at most one probe (timeout) plus a little scheduling slack.
    fn first_round_budget(&self) -> Duration {
        self.spec.config.health.timeout.get() + Duration::from_millis(100)
    }

    fn handle(&mut self, msg: Control) -> Step {
        let wall = SystemTime::now();
        match msg {
            Control::Probe { server, result, at } => match self.index.get(&key(&server)).copied() {
                Some(i) => self.state.probe_result(i, result, at, wall),
                None => Step::default(),
            },
            Control::Passive {
                server,
                reason,
                detail,
                at,
            } => match self.index.get(&key(&server)).copied() {
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
                    if step.publish {
                        crate::events::admin_changed(&self.state.name, &server, state.as_str());
                    }
                    tracing::info!(upstream = %self.state.name, %server, state = state.as_str(), "admin state changed");
                    self.replies.push(reply);
                    step
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                    Step::default()
                }
            },
            Control::Failback { reply } => {
                self.replies.push(reply);
                self.state.manual_failback(Instant::now(), wall)
            }
            Control::Servers(targets) => self.set_servers(targets),
            Control::PeerDown(down) => self.state.set_peer_down(&down, Instant::now(), wall),
            // Handled by `handle_and_absorb` (it answers with the events).
            Control::GroupDown { down, reply } => {
                let step = self.state.set_group_down(&down, Instant::now(), wall);
                let _ = reply.send(Vec::new());
                step
            }
            Control::Reload {
                spec,
                targets,
                reply,
            } => {
                self.replies.push(reply);
                // Settings first: new servers get the new default port.
                let step = self.reconfigure(*spec, wall);
                self.absorb(step);
                self.set_servers(targets)
            }
        }
    }

    fn reconfigure(&mut self, spec: UpstreamSpec, wall: SystemTime) -> Step {
        let health_changed = spec.config.health != self.spec.config.health
            || spec.default_port != self.spec.default_port;
        self.route
            .set_options(spec.passive, spec.config.connect_timeout.get());
        self.route
            .set_probed(spec.config.health.kind != HealthType::None);
        let policy = spec.policy();
        let group_changed = spec.config.node_group != self.spec.config.node_group;
        self.spec = spec;
        let mut group_step = Step::default();
        if group_changed {
            self.leave_group();
            self.group = self
                .spec
                .config
                .node_group
                .as_deref()
                .map(|g| (g.to_string(), self.groups.sender(g)));
            self.reported_hosts = None;
            // The old group's word no longer counts here.
            group_step =
                self.state
                    .set_group_down(&HashMap::new(), Instant::now(), SystemTime::now());
        }
        self.absorb(group_step);
        if health_changed {
            // New probe settings: restart every prober with them.
            self.check = health::build(&self.spec.config.health).map(Arc::from);
            for (_, token) in self.probers.drain(..) {
                token.cancel();
            }
            self.sync_probers();
        }
        self.state.set_policy(policy, Instant::now(), wall)
    }

    /// Turns targets into handles (reusing the handle of a server that stays) and hands
    /// the list to the state; starts and stops probers and metric series to match.
    fn set_servers(&mut self, targets: Vec<Target>) -> Step {
        let existing: HashMap<_, Arc<ServerHandle>> = self
            .state
            .handles()
            .into_iter()
            .map(|h| ((h.ip, h.port, h.tier), h))
            .collect();
        let default_port = self.spec.default_port;
        let list: Vec<(Arc<ServerHandle>, Readiness)> = targets
            .into_iter()
            .map(|t| {
                let handle = existing
                    .get(&(t.ip, t.port, t.tier))
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
        self.index = self
            .state
            .handles()
            .iter()
            .enumerate()
            .map(|(i, h)| (key(h), i))
            .collect();
        self.sync_probers();
        self.sync_metrics();
        step
    }

    fn sync_probers(&mut self) {
        let handles = self.state.handles();
        let listed: HashSet<usize> = handles.iter().map(key).collect();
        // Cancelling a token only wakes the prober; nothing here waits for it to end.
        self.probers.retain(|(h, token)| {
            let keep = listed.contains(&key(h));
            if !keep {
                token.cancel();
            }
            keep
        });
        let probed: HashSet<usize> = self.probers.iter().map(|(h, _)| key(h)).collect();
        let new = handles.iter().filter(|h| !probed.contains(&key(h))).count();
        let spread = self.start_spread(new);
        let mut started = 0u32;
        let Some(check) = self.check.clone() else {
            return;
        };
        let hc: &HealthConfig = &self.spec.config.health;
        let name = self.state.name.clone();
        for server in handles {
            if probed.contains(&key(&server)) {
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
            let confirmation = |result: &str| {
                child(
                    &self.metrics.probe_confirmations,
                    &labels(&[("upstream", &name), ("result", result)]),
                )
            };
            let prober = Prober {
                check: check.clone(),
                label: server.label.clone(),
                sink: ProbeReports {
                    server: server.clone(),
                    control: self.control.clone(),
                },
                target: SocketAddr::new(server.ip, port),
                interval: hc.interval.get(),
                timeout: hc.timeout.get(),
                adaptive: hc.adaptive_timeout,
                confirm: Confirm {
                    probes: hc.confirm,
                    interval: hc.confirm_interval.get(),
                },
                counters: ProbeCounters {
                    ok: counter("ok"),
                    failed: counter("failed"),
                    timeout: counter("timeout"),
                    local_error: counter("local_error"),
                    confirmed: confirmation("confirmed"),
                    cancelled: confirmation("cancelled"),
                    suspected: child(
                        &self.metrics.silence_suspicions,
                        &labels(&[("upstream", &name)]),
                    ),
                },
            };
            let token = self.cancel.child_token();
            let delay = spread * started / (new as u32).max(1);
            started += 1;
            let cancel = token.clone();
            tokio::spawn(async move {
                if !delay.is_zero() {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                prober.run(cancel).await
            });
            self.probers.push((server, token));
        }
    }

    /// Takes one message's step: events are logged and counted now; publishing,
    /// evictions and the view wait for [`Controller::flush`].
    fn absorb(&mut self, step: Step) {
        self.view_dirty = true;
        self.publish_due |= step.publish;
        self.evict_due.extend(step.evict);
        self.came_up_due.extend(step.came_up);
        if let Some(ev) = &step.event {
            let upstream = self.state.name.as_str();
            self.outgoing.push(ev.into());
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
                EventKind::AllDown => {
                    tracing::warn!(
                        upstream,
                        servers = ?ev.to,
                        reason = ev.reason.unwrap_or("removed"),
                        "no server is eligible: the last ones keep serving (when_all_down: keep_last)"
                    );
                    child(&self.metrics.all_down, &labels(&[("upstream", upstream)])).inc();
                }
            }
        }
    }

    /// Publishes what the absorbed steps asked for: the routing snapshot and gauges, then
    /// the evictions (so sessions re-pin onto the new active set), the view, the replies.
    fn flush(&mut self) {
        let published = std::mem::take(&mut self.publish_due);
        if published {
            self.generation += 1;
            let active = self.state.active_handles();
            self.route.publish(Snapshot {
                generation: self.generation,
                balance: self.state.balance(),
                servers: self.state.handles(),
                active: active.clone(),
                eligible: self.state.eligible_handles(),
            });
            self.set_server_gauges(&active);
            child(
                &self.metrics.degraded,
                &labels(&[("upstream", &self.state.name)]),
            )
            .set(i64::from(self.state.degraded()));
            let down = self.state.local_down();
            if **self.local_down.borrow() != down {
                self.local_down.send_replace(Arc::new(down));
            }
        }
        for h in self.evict_due.drain(..) {
            h.evict();
        }
        for h in self.came_up_due.drain(..) {
            h.rearm_passive_report();
        }
        if self.state.first_round_done() && !*self.ready.borrow() {
            let _ = self.ready.send(true);
        }
        let now = Instant::now();
        let view_due = self.view_dirty && now >= self.view_built + VIEW_EVERY;
        if view_due || published || !self.replies.is_empty() || !*self.ready.borrow() {
            let mut view = self.state.view();
            view.balance = self.spec.config.balance.as_str();
            view.failback = self.spec.config.failback.as_str();
            self.view.store(Arc::new(view));
            self.view_dirty = false;
            self.view_built = now;
        }
        self.send_events(published);
        // Answer commands only now, so the caller sees their effect in the view.
        for reply in self.replies.drain(..) {
            let _ = reply.send(Ok(()));
        }
    }
}
