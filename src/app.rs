//! Wires everything together: builds upstream controllers and listeners from a validated
//! configuration, serves the admin API, gates traffic on the first probe round, applies
//! reloads as a difference (SPEC §8) and runs the graceful shutdown of SPEC §11.

use crate::admin;
use crate::config::{self, Config, ListenerConfig, Protocol, UpstreamConfig};
use crate::discovery::{Discovery, Target};
use crate::metrics::{Metrics, child, labels};
use crate::proxy::{tcp, udp};
use crate::upstream::{Control, UpstreamRuntime, UpstreamSpec};
use anyhow::{Context, Result, anyhow};
use arc_swap::ArcSwap;
use indexmap::IndexMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The proxy behind a listener.
pub enum Proxy {
    Udp(Arc<udp::UdpListener>),
    Tcp(Arc<tcp::TcpListener>),
}

/// A running listener.
pub struct ListenerRuntime {
    pub config: ListenerConfig,
    pub proxy: Proxy,
    /// TCP: stop accepting. UDP: unused (UDP sessions live until `kill`).
    stop_accepting: CancellationToken,
    /// Ends every task and session of this listener.
    kill: CancellationToken,
}

impl ListenerRuntime {
    pub fn sessions(&self) -> usize {
        match &self.proxy {
            Proxy::Udp(p) => p.sessions(),
            Proxy::Tcp(p) => p.sessions(),
        }
    }

    fn stop(&self) {
        self.stop_accepting.cancel();
        self.kill.cancel();
    }
}

/// Everything the admin API reads.
pub struct AppState {
    pub config_path: String,
    pub config: ArcSwap<Config>,
    pub loaded_at: ArcSwap<SystemTime>,
    pub last_reload_error: ArcSwap<Option<String>>,
    pub started: Instant,
    pub metrics: Metrics,
    pub upstreams: ArcSwap<IndexMap<String, Arc<UpstreamRuntime>>>,
    pub listeners: ArcSwap<Vec<Arc<ListenerRuntime>>>,
    pub ready: AtomicBool,
    pub draining: AtomicBool,
    /// The admin token in force (a reload may change it).
    pub admin_token: ArcSwap<Option<String>>,
    /// App-wide tokens that listener tokens are children of.
    stop_accepting: CancellationToken,
    kill: CancellationToken,
    /// DNS and Kubernetes sources of the running config, and the token of the tasks that
    /// feed their server lists to the controllers.
    discovery: tokio::sync::Mutex<Option<(Discovery, CancellationToken)>>,
    /// The STUN/TURN service, when `turn:` is configured.
    pub turn: tokio::sync::Mutex<Option<crate::turn::TurnService>>,
    /// Who TURN may relay to; follows the upstreams' server lists.
    pub turn_policy: Option<Arc<crate::turn::PeerPolicy>>,
    /// One reload at a time.
    reload_lock: tokio::sync::Mutex<()>,
    /// Hash of the file content last loaded or rejected, so the watcher reacts to edits
    /// only, and tries a broken file once.
    seen_hash: std::sync::atomic::AtomicU64,
}

/// A started balancer.
pub struct App {
    pub state: Arc<AppState>,
    /// Where the admin API actually listens (useful with port 0).
    pub admin_addr: std::net::SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl App {
    /// Starts every part of the balancer; returns once listeners serve traffic (after the
    /// first probe round).
    pub async fn start(config: Config, config_path: String) -> Result<App> {
        let metrics = Metrics::new();
        let config_path_for_hash = config_path.clone();

        // Server lists: static entries at once, DNS names and node/… as their sources answer.
        let discovery = Discovery::start(&config, &metrics).await?;
        let mut feeds = Vec::new();
        // Upstreams first: probing starts while sockets are bound.
        let mut upstreams = IndexMap::new();
        for (name, ucfg) in &config.upstreams {
            let spec = spec_for(&config, name, ucfg);
            let (targets, feed) = subscribe(&discovery, name);
            let rt = Arc::new(UpstreamRuntime::start(name, spec, targets, &metrics));
            feeds.push((rt.control(), feed));
            upstreams.insert(name.clone(), rt);
        }
        let feeders = CancellationToken::new();
        for (control, feed) in feeds {
            spawn_feeder(feed, control, feeders.clone());
        }

        // Bind every listener before serving anything, so a port in use fails start-up.
        let mut bound = Vec::new();
        for l in &config.listeners {
            bound.push(bind_listener(l)?);
        }

        // TURN: relays only to the peers its policy allows, which follow the upstreams.
        let (turn, turn_policy) = match &config.turn {
            Some(tcfg) => {
                let policy = Arc::new(
                    crate::turn::PeerPolicy::new(
                        &tcfg.relay,
                        config.admin.listen,
                        &config.listeners,
                    )
                    .map_err(|e| anyhow!("turn.relay.peers: {e}"))?,
                );
                policy.set_upstream_ips(upstream_ips(&upstreams));
                let tm = crate::turn::TurnMetrics::register(&mut metrics.registry());
                let svc = crate::turn::TurnService::start(tcfg, policy.clone(), tm)
                    .await
                    .context("turn")?;
                (Some(svc), Some(policy))
            }
            None => (None, None),
        };

        let stop_accepting = CancellationToken::new();
        let kill = CancellationToken::new();
        let state = Arc::new(AppState {
            config_path,
            config: ArcSwap::from_pointee(config.clone()),
            loaded_at: ArcSwap::from_pointee(SystemTime::now()),
            last_reload_error: ArcSwap::from_pointee(None),
            started: Instant::now(),
            metrics,
            upstreams: ArcSwap::from_pointee(upstreams),
            listeners: ArcSwap::from_pointee(Vec::new()),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            admin_token: ArcSwap::from_pointee(config.admin.token.clone()),
            stop_accepting,
            kill,
            discovery: tokio::sync::Mutex::new(Some((discovery, feeders))),
            turn: tokio::sync::Mutex::new(turn),
            turn_policy,
            reload_lock: tokio::sync::Mutex::new(()),
            seen_hash: std::sync::atomic::AtomicU64::new(file_hash(&config_path_for_hash)),
        });

        let admin_listener = tokio::net::TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| format!("admin: bind {}", config.admin.listen))?;
        let admin_addr = admin_listener.local_addr()?;
        let mut tasks = vec![tokio::spawn(admin::serve(
            admin_listener,
            state.clone(),
            state.kill.clone(),
        ))];
        if state.turn_policy.is_some() {
            tasks.push(tokio::spawn(state.clone().follow_upstreams_for_turn()));
        }

        // SPEC §5: the first probe round completes before listeners accept traffic.
        for u in state.upstreams.load().values() {
            u.wait_ready().await;
        }
        let mut listeners = Vec::new();
        for (l, sockets) in config.listeners.iter().zip(bound) {
            listeners.push(state.serve_listener(l, sockets)?);
        }
        state.listeners.store(Arc::new(listeners));
        state.ready.store(true, Ordering::Release);
        tracing::info!(admin = %admin_addr, listeners = config.listeners.len(), upstreams = config.upstreams.len(), "mediagate ready");

        Ok(App {
            admin_addr,
            state,
            tasks,
        })
    }

    /// Graceful shutdown (SPEC §11): not ready, stop accepting, refuse new UDP sessions,
    /// let existing sessions finish until `drain_timeout` or `force` fires, then stop.
    pub async fn shutdown(self, force: impl std::future::Future<Output = ()>) {
        let st = &self.state;
        st.ready.store(false, Ordering::Release);
        st.draining.store(true, Ordering::Release);
        st.stop_accepting.cancel();
        let listeners = st.listeners.load_full();
        for l in listeners.iter() {
            if let Proxy::Udp(p) = &l.proxy {
                p.drain();
            }
        }
        let live = || listeners.iter().map(|l| l.sessions()).sum::<usize>();
        let drain_timeout = st.config.load().shutdown.drain_timeout.get();
        tracing::info!(sessions = live(), timeout = ?drain_timeout, "draining");
        let drained = async {
            while live() > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            _ = drained => tracing::info!("drained"),
            _ = tokio::time::sleep(drain_timeout) => tracing::info!(sessions = live(), "drain timeout reached"),
            _ = force => tracing::info!("second signal: stopping now"),
        }
        st.kill.cancel();
        if let Some((discovery, feeders)) = st.discovery.lock().await.take() {
            feeders.cancel();
            discovery.stop();
        }
        if let Some(turn) = st.turn.lock().await.take() {
            turn.close().await;
        }
        for u in st.upstreams.load().values() {
            u.stop();
        }
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Sockets bound for one listener, not yet served.
enum Bound {
    /// Per port, one socket per worker thread (SO_REUSEPORT).
    Udp(Vec<Vec<std::net::UdpSocket>>),
    Tcp(Vec<std::net::TcpListener>),
}

fn bind_listener(l: &ListenerConfig) -> Result<Bound> {
    Ok(match l.protocol {
        Protocol::Udp => {
            let workers = udp::default_workers();
            Bound::Udp(
                l.listen
                    .addrs()
                    .map(|a| {
                        udp::bind_group(a, workers)
                            .with_context(|| format!("listener {}: bind udp {a}", l.name))
                    })
                    .collect::<Result<_>>()?,
            )
        }
        Protocol::Tcp => Bound::Tcp(
            l.listen
                .addrs()
                .map(|a| tcp::bind(a).with_context(|| format!("listener {}: bind tcp {a}", l.name)))
                .collect::<Result<_>>()?,
        ),
    })
}

impl AppState {
    /// Starts serving one listener on already bound sockets.
    fn serve_listener(&self, l: &ListenerConfig, sockets: Bound) -> Result<Arc<ListenerRuntime>> {
        let route = self
            .upstreams
            .load()
            .get(&l.upstream)
            .ok_or_else(|| anyhow!("listener {}: unknown upstream {}", l.name, l.upstream))?
            .route
            .clone();
        let lm = self.metrics.listener(&l.name);
        let stop_accepting = self.stop_accepting.child_token();
        let kill = self.kill.child_token();
        let proxy = match sockets {
            Bound::Udp(socks) => {
                let p = udp::UdpListener::new(
                    l.name.clone(),
                    route,
                    l.session.idle_timeout.get(),
                    l.session.max_sessions,
                    lm,
                );
                // UDP sessions keep flowing during the drain; `kill` ends them.
                p.serve(socks, kill.clone())?;
                Proxy::Udp(p)
            }
            Bound::Tcp(socks) => {
                let p = tcp::TcpListener::new(l.name.clone(), route, lm);
                for s in socks {
                    p.serve(s, stop_accepting.clone(), kill.clone())?;
                }
                Proxy::Tcp(p)
            }
        };
        Ok(Arc::new(ListenerRuntime {
            config: l.clone(),
            proxy,
            stop_accepting,
            kill,
        }))
    }

    /// Reloads the configuration file (SIGHUP, file change, `POST /reload`): validates
    /// first and keeps the running config on any error; otherwise applies the difference.
    /// Unchanged listeners keep their sockets and sessions.
    pub async fn reload(&self) -> Result<(), Vec<String>> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let loaded = match std::fs::read_to_string(&self.config_path) {
            Ok(text) => {
                self.seen_hash.store(hash_text(&text), Ordering::Relaxed);
                config::load_str(&text, &self.config_path)
                    .map_err(|errors| errors.0.iter().map(|e| e.to_string()).collect::<Vec<_>>())
            }
            Err(e) => Err(vec![format!(
                "{}: cannot read the file: {e}",
                self.config_path
            )]),
        };
        let result = match loaded {
            Ok(new) => self.apply(new).await.map_err(|e| vec![format!("{e:#}")]),
            Err(errors) => Err(errors),
        };
        let outcome = if result.is_ok() { "ok" } else { "error" };
        child(
            &self.metrics.config_reloads,
            &labels(&[("result", outcome)]),
        )
        .inc();
        match &result {
            Ok(()) => {
                self.last_reload_error.store(Arc::new(None));
                self.loaded_at.store(Arc::new(SystemTime::now()));
                tracing::info!(path = %self.config_path, "configuration reloaded");
            }
            Err(errors) => {
                for e in errors {
                    tracing::error!("reload rejected, keeping the running configuration: {e}");
                }
                self.last_reload_error
                    .store(Arc::new(Some(errors.join("; "))));
            }
        }
        result
    }

    /// Keeps the TURN peer policy's `upstreams` set equal to the IPs of every server of
    /// every upstream, as discovery and reloads change them.
    async fn follow_upstreams_for_turn(self: Arc<Self>) {
        let Some(policy) = self.turn_policy.clone() else {
            return;
        };
        let mut last = Vec::new();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let ips = upstream_ips(&self.upstreams.load());
            if ips != last {
                tracing::info!(
                    servers = ips.len(),
                    "TURN peer policy follows the upstreams"
                );
                policy.set_upstream_ips(ips.iter().copied());
                last = ips;
            }
        }
    }

    /// Reloads when the file's content changed since it was last loaded. Polling (rather
    /// than inotify) also sees the atomic symlink swap a mounted ConfigMap does.
    pub async fn watch_file(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if self.draining.load(Ordering::Acquire) {
                return;
            }
            let now = file_hash(&self.config_path);
            if now != 0 && now != self.seen_hash.load(Ordering::Relaxed) {
                tracing::info!(path = %self.config_path, "configuration file changed");
                let _ = self.reload().await;
            }
        }
    }

    async fn apply(&self, new: Config) -> Result<()> {
        let old = self.config.load_full();
        if new.turn != old.turn {
            tracing::warn!("changes to the turn section take effect at the next restart");
        }
        if new.admin.listen != old.admin.listen {
            tracing::warn!(old = %old.admin.listen, new = %new.admin.listen, "admin.listen changes take effect at the next restart");
        }
        // Sources for the new config first: a source that cannot start fails the reload
        // before anything moves.
        let discovery = Discovery::start(&new, &self.metrics).await?;
        let feeders = CancellationToken::new();

        // Upstreams: reconfigure the ones that stay, start new ones.
        let current = self.upstreams.load_full();
        let mut next = IndexMap::new();
        let mut feeds = Vec::new();
        for (name, ucfg) in &new.upstreams {
            let spec = spec_for(&new, name, ucfg);
            let (list, feed) = subscribe(&discovery, name);
            let rt = match current.get(name) {
                Some(rt) => {
                    rt.reconfigure(spec)
                        .await
                        .map_err(|e| anyhow!("upstream {name}: {e}"))?;
                    rt.set_servers(list)
                        .await
                        .map_err(|e| anyhow!("upstream {name}: {e}"))?;
                    rt.clone()
                }
                None => {
                    let rt = Arc::new(UpstreamRuntime::start(name, spec, list, &self.metrics));
                    rt.wait_ready().await;
                    rt
                }
            };
            feeds.push((rt.control(), feed));
            next.insert(name.clone(), rt);
        }
        self.upstreams.store(Arc::new(next));
        // The old sources stop feeding; the new ones take over.
        if let Some((old, old_feeders)) = self
            .discovery
            .lock()
            .await
            .replace((discovery, feeders.clone()))
        {
            old_feeders.cancel();
            old.stop();
        }
        for (control, feed) in feeds {
            spawn_feeder(feed, control, feeders.clone());
        }

        // Listeners: keep identical ones, stop changed and removed ones, start the rest.
        let running = self.listeners.load_full();
        let mut keep: Vec<Option<Arc<ListenerRuntime>>> = new
            .listeners
            .iter()
            .map(|l| running.iter().find(|r| r.config == *l).cloned())
            .collect();
        for r in running.iter() {
            if !keep.iter().flatten().any(|k| Arc::ptr_eq(k, r)) {
                tracing::info!(listener = %r.config.name, "stopping listener (changed or removed)");
                r.stop();
            }
        }
        let mut out = Vec::with_capacity(new.listeners.len());
        for (l, kept) in new.listeners.iter().zip(keep.iter_mut()) {
            match kept.take() {
                Some(r) => out.push(r),
                None => {
                    let sockets = bind_with_retry(l).await?;
                    out.push(self.serve_listener(l, sockets)?);
                    tracing::info!(listener = %l.name, listen = %l.listen, "listener started");
                }
            }
        }
        self.listeners.store(Arc::new(out));

        // Upstreams no longer named anywhere stop last, after no listener uses them.
        for (name, rt) in current.iter() {
            if !new.upstreams.contains_key(name) {
                rt.stop();
            }
        }
        self.admin_token.store(Arc::new(new.admin.token.clone()));
        self.config.store(Arc::new(new));
        Ok(())
    }
}

/// FNV-1a of the file's content (0 when unreadable).
fn file_hash(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .map(|t| hash_text(&t))
        .unwrap_or(0)
}

fn hash_text(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    }) | 1
}

/// Binding a port the previous listener just released can race with the kernel tearing
/// the old socket down; a few quick retries cover that.
async fn bind_with_retry(l: &ListenerConfig) -> Result<Bound> {
    let mut last = None;
    for _ in 0..20 {
        match bind_listener(l) {
            Ok(b) => return Ok(b),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(last.unwrap_or_else(|| anyhow!("listener {}: bind failed", l.name)))
}

/// Every server IP of every upstream, sorted and deduplicated.
fn upstream_ips(upstreams: &IndexMap<String, Arc<UpstreamRuntime>>) -> Vec<std::net::IpAddr> {
    let mut ips: Vec<_> = upstreams
        .values()
        .flat_map(|u| {
            u.route
                .snapshot()
                .servers
                .iter()
                .map(|s| s.ip)
                .collect::<Vec<_>>()
        })
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// The controller's view of an upstream's configuration.
fn spec_for(config: &Config, name: &str, ucfg: &UpstreamConfig) -> UpstreamSpec {
    UpstreamSpec {
        config: ucfg.clone(),
        default_port: default_port(config, name, ucfg),
    }
}

/// The port probed and shown for port-less servers: the first port of the first listener
/// that uses the upstream.
fn default_port(config: &Config, name: &str, ucfg: &UpstreamConfig) -> u16 {
    config
        .listeners
        .iter()
        .find(|l| l.upstream == name)
        .map(|l| l.listen.first_port)
        .or_else(|| ucfg.kubernetes.as_ref().and_then(|k| k.port))
        .unwrap_or(0)
}

/// The current server list of an upstream, and the channel that carries its changes.
fn subscribe(
    discovery: &Discovery,
    name: &str,
) -> (
    Vec<Target>,
    Option<tokio::sync::watch::Receiver<Vec<Target>>>,
) {
    match discovery.watch(name) {
        Some(mut rx) => {
            let now = rx.borrow_and_update().clone();
            (now, Some(rx))
        }
        None => (Vec::new(), None),
    }
}

/// Forwards every new server list of one upstream to its controller until `stop`.
fn spawn_feeder(
    feed: Option<tokio::sync::watch::Receiver<Vec<Target>>>,
    control: tokio::sync::mpsc::Sender<Control>,
    stop: CancellationToken,
) {
    let Some(mut rx) = feed else {
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let list = rx.borrow_and_update().clone();
                    if control.send(Control::Servers(list)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// Raises RLIMIT_NOFILE to what 100k sessions need, up to the hard limit, and logs it.
pub fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const WANTED: u64 = 262_144;
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            let target = WANTED.min(hard);
            if soft < target
                && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, target, hard)
            {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
                return;
            }
            let now = soft.max(target);
            if now < 200_000 {
                tracing::info!(
                    limit = now,
                    hard,
                    "open-file limit in force (below the ~200k that 100k UDP sessions need: one socket each, plus the client side)"
                );
            } else {
                tracing::info!(limit = now, "open-file limit in force");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// Where the config file is: `-c`, else `$MEDIAGATE_CONFIG`, else `config/mediagate.yaml`.
pub fn config_path(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("MEDIAGATE_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("config/mediagate.yaml"))
}
