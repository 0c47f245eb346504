//! Wires everything together: builds upstream controllers and listeners from a validated
//! configuration, serves the admin API, gates traffic on the first probe round, applies
//! reloads as a transaction ([`reload`]) and runs the graceful shutdown (drain, then
//! stop). What the admin API sees of it is in [`backend`].

mod backend;
mod reload;

use crate::admin;
use crate::config::{self, Config, ListenerConfig, Protocol, UpstreamConfig};
use crate::discovery::{Discovery, Target};
use crate::metrics::{Metrics, child, labels};
use crate::proxy::{tcp, udp};
use crate::upstream::{Control, UpstreamRoute, UpstreamRuntime, UpstreamSpec};
use anyhow::{Context, Result, anyhow};
use arc_swap::{ArcSwap, ArcSwapOption};
use indexmap::IndexMap;
use std::net::SocketAddr;
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
    /// The listen sockets, kept so that a reload can hand them to the listener that
    /// replaces this one without closing them (see [`reload`]).
    sockets: Bound,
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
    /// Shared with the cluster's sync task (see [`AppState::upstreams_fn`]).
    pub upstreams: Arc<ArcSwap<IndexMap<String, Arc<UpstreamRuntime>>>>,
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
    /// Membership of the replicas acting as one balancer, when `cluster:` is set (a
    /// reload may add, replace or remove it).
    pub cluster: ArcSwapOption<crate::cluster::Cluster>,
    /// The cluster's metrics, shared by every member a reload starts.
    cluster_metrics: crate::cluster::metrics::ClusterMetrics,
    /// The node groups (`upstreams.NAME.node_group`) every upstream, old or reloaded,
    /// joins.
    node_groups: crate::upstream::NodeGroups,
    /// `events.webhooks` in force.
    hooks: crate::events::webhook::Hooks,
    /// One reload at a time.
    reload_lock: tokio::sync::Mutex<()>,
    /// Hash of the file content last loaded or rejected, so the watcher reacts to edits
    /// only, and tries a broken file once.
    seen_hash: std::sync::atomic::AtomicU64,
    /// The secret files (`*_file` keys) as last loaded or rejected: the watcher reloads when
    /// one's content changes, and tries a broken one once.
    seen_secrets: std::sync::Mutex<Vec<crate::config::secret_files::SecretFile>>,
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
        // Values read at each scrape register with their owners' hooks.
        crate::fdbudget::register_metrics(&metrics);
        crate::offload::register_metrics(&metrics);
        let config_path_for_hash = config_path.clone();
        // The fd budget of this configuration (see `fdbudget`), before any socket opens.
        // A configuration whose own descriptors take the whole open-file limit could serve
        // nobody: refused, as a reload of it would be.
        let consumers = fd_consumers(&config);
        let plan =
            crate::fdbudget::Plan::new(&config, crate::fdbudget::current_limit(), &consumers);
        if let Some(why) = plan.refusal() {
            return Err(anyhow!("{why}"));
        }
        crate::fdbudget::apply(&config, &consumers);
        // The admin API's spare descriptors, while the numbers are low (see `fdbudget`).
        crate::fdbudget::admin_spare().refill();

        // Server lists: static entries at once, DNS names and node/… as their sources answer.
        let discovery = Discovery::start(&config, &metrics).await?;
        let mut feeds = Vec::new();
        // Upstreams first: probing starts while sockets are bound.
        let mut upstreams = IndexMap::new();
        let node_groups = crate::upstream::NodeGroups::default();
        for (name, ucfg) in &config.upstreams {
            let spec = spec_for(&config, name, ucfg);
            let (targets, feed) = subscribe(&discovery, name);
            let rt = Arc::new(UpstreamRuntime::start(
                name,
                spec,
                targets,
                &metrics,
                &node_groups,
            ));
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
            bound.push(bind_listener(l, &|_| Vec::new())?);
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

        // The cluster series exist (at zero) without `cluster:` too, for dashboards.
        let cluster_metrics =
            crate::cluster::metrics::ClusterMetrics::register(&mut metrics.registry());
        let cluster = match &config.cluster {
            Some(c) => {
                Some(crate::cluster::Cluster::prepare(c, cluster_metrics.clone(), None).await?)
            }
            None => None,
        };

        let stop_accepting = CancellationToken::new();
        let kill = CancellationToken::new();
        // Webhooks follow the event bus from now on.
        let hook_metrics =
            crate::events::webhook::WebhookMetrics::register(&mut metrics.registry());
        let hooks = crate::events::webhook::Hooks::new(hook_metrics, kill.clone());
        hooks.commit(hooks.prepare(&config.events.webhooks)?);
        let state = Arc::new(AppState {
            cluster: ArcSwapOption::from(None),
            cluster_metrics,
            node_groups,
            hooks,
            config_path,
            config: ArcSwap::from_pointee(config.clone()),
            loaded_at: ArcSwap::from_pointee(SystemTime::now()),
            last_reload_error: ArcSwap::from_pointee(None),
            started: Instant::now(),
            metrics,
            upstreams: Arc::new(ArcSwap::from_pointee(upstreams)),
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
            seen_hash: std::sync::atomic::AtomicU64::new(reload::file_hash(&config_path_for_hash)),
            seen_secrets: std::sync::Mutex::new(config.secret_files.clone()),
        });

        // The member joins now (peers' admin states arrive during the first probe round).
        if let Some(c) = cluster {
            c.launch(state.upstreams_fn(), None).await;
            state.cluster.store(Some(c));
        }

        let admin_listener = admin::conns::bind(config.admin.listen)
            .with_context(|| format!("admin: bind {}", config.admin.listen))?;
        let admin_addr = admin_listener.local_addr()?;
        let mut tasks = vec![tokio::spawn(admin::serve(
            admin_listener,
            state.clone() as Arc<dyn admin::Backend>,
            state.kill.clone(),
        ))];
        if state.turn_policy.is_some() {
            tasks.push(tokio::spawn(state.clone().follow_upstreams_for_turn()));
        }

        // The first probe round completes before listeners accept traffic.
        for u in state.upstreams.load().values() {
            u.wait_ready().await;
        }
        // A replica takes its peers' admin states before it turns ready.
        if let Some(c) = state.cluster.load_full() {
            c.wait_synced().await;
        }
        let mut listeners = Vec::new();
        let start = CancellationToken::new();
        start.cancel();
        for (l, sockets) in config.listeners.iter().zip(bound) {
            let route = state
                .upstreams
                .load()
                .get(&l.upstream)
                .ok_or_else(|| anyhow!("listener {}: unknown upstream {}", l.name, l.upstream))?
                .route
                .clone();
            listeners.push(state.serve_listener(l, route, sockets, start.clone())?);
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

    /// Graceful shutdown: not ready, stop accepting, refuse new UDP sessions,
    /// let existing sessions and TURN allocations finish until `drain_timeout` or `force`
    /// fires, then stop.
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
        let sessions = || listeners.iter().map(|l| l.sessions()).sum::<usize>();
        // TURN allocations are calls too: the drain waits for them (their clients keep
        // refreshing them; the listeners stay open until the end). A service whose lock is
        // taken right now counts as one allocation, so the drain never ends on a guess.
        let allocations = || {
            st.turn
                .try_lock()
                .map(|t| t.as_ref().map_or(0, |t| t.allocations()))
                .unwrap_or(1)
        };
        let live = || sessions() + allocations();
        let drain_timeout = st.config.load().shutdown.drain_timeout.get();
        tracing::info!(sessions = sessions(), allocations = allocations(), timeout = ?drain_timeout, "draining");
        let drained = async {
            while live() > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            _ = drained => tracing::info!("drained"),
            _ = tokio::time::sleep(drain_timeout) => tracing::info!(sessions = sessions(), allocations = allocations(), "drain timeout reached"),
            _ = force => tracing::info!("second signal: stopping now"),
        }
        st.kill.cancel();
        if let Some(c) = st.cluster.swap(None) {
            c.stop();
        }
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

/// The listen sockets of one listener, per configured address (shared: a reload hands
/// them over from one listener to the next).
#[derive(Clone)]
enum Bound {
    /// Per port, one socket per worker thread (SO_REUSEPORT).
    Udp(Vec<(SocketAddr, Vec<Arc<std::net::UdpSocket>>)>),
    Tcp(Vec<(SocketAddr, Arc<std::net::TcpListener>)>),
}

/// Binds every address of a listener, except those `held` already has a socket for (the
/// sockets of a listener this one replaces): those are taken over as they are.
fn bind_listener(
    l: &ListenerConfig,
    held: &dyn Fn(&ListenerConfig) -> Vec<Bound>,
) -> Result<Bound> {
    // Held sockets by address (port 0 means "any free port": never another's socket).
    let mut udp_held = std::collections::HashMap::new();
    let mut tcp_held = std::collections::HashMap::new();
    for b in held(l) {
        match b {
            Bound::Udp(ports) => udp_held.extend(ports.into_iter().filter(|(a, _)| a.port() != 0)),
            Bound::Tcp(ports) => tcp_held.extend(ports.into_iter().filter(|(a, _)| a.port() != 0)),
        }
    }
    Ok(match l.protocol {
        Protocol::Udp => {
            let workers = udp::default_workers();
            Bound::Udp(
                l.listen
                    .addrs()
                    .map(|a| {
                        if let Some(s) = udp_held.remove(&a) {
                            return Ok((a, s));
                        }
                        udp::bind_group(a, workers)
                            .map(|g| (a, g.into_iter().map(Arc::new).collect()))
                            .with_context(|| format!("listener {}: bind udp {a}", l.name))
                    })
                    .collect::<Result<_>>()?,
            )
        }
        Protocol::Tcp => Bound::Tcp(
            l.listen
                .addrs()
                .map(|a| {
                    if let Some(s) = tcp_held.remove(&a) {
                        return Ok((a, s));
                    }
                    tcp::bind(a)
                        .map(|s| (a, Arc::new(s)))
                        .with_context(|| format!("listener {}: bind tcp {a}", l.name))
                })
                .collect::<Result<_>>()?,
        ),
    })
}

impl AppState {
    /// How the cluster's sync task reads the upstreams in force.
    fn upstreams_fn(&self) -> crate::cluster::Upstreams {
        let upstreams = self.upstreams.clone();
        Arc::new(move || upstreams.load_full())
    }

    /// Builds one listener on already bound sockets, routing to `route`; it serves once
    /// `start` fires (see [`udp::UdpListener::serve`]). Everything fallible happens here.
    fn serve_listener(
        &self,
        l: &ListenerConfig,
        route: Arc<UpstreamRoute>,
        sockets: Bound,
        start: CancellationToken,
    ) -> Result<Arc<ListenerRuntime>> {
        let held = sockets.clone();
        let lm = self.metrics.listener(&l.name);
        let stop_accepting = self.stop_accepting.child_token();
        let kill = self.kill.child_token();
        let proxy = match sockets {
            Bound::Udp(ports) => {
                let socks = ports.into_iter().map(|(_, g)| g).collect();
                let offload = crate::offload::wanted(l.offload)
                    .then(|| crate::offload::acquire(&self.metrics, &l.name, &lm))
                    .flatten();
                let p = udp::UdpListener::new(l.name.clone(), route, &l.session, lm);
                if let Some(o) = offload {
                    p.enable_offload(o);
                }
                // UDP sessions keep flowing during the drain; `kill` ends them.
                p.serve(socks, kill.clone(), start)?;
                Proxy::Udp(p)
            }
            Bound::Tcp(socks) => {
                let p = tcp::TcpListener::new(
                    l.name.clone(),
                    route,
                    l.session.idle_timeout.get(),
                    l.max_connections,
                    lm,
                    tcp::ProxyProtocol::of(l),
                );
                for (a, s) in socks {
                    // The accept loop owns a duplicate; the original stays with `sockets`.
                    let dup = s
                        .try_clone()
                        .with_context(|| format!("listener {}: tcp {a}", l.name))?;
                    p.serve(dup, stop_accepting.clone(), kill.clone(), start.clone())?;
                }
                Proxy::Tcp(p)
            }
        };
        Ok(Arc::new(ListenerRuntime {
            config: l.clone(),
            proxy,
            sockets: held,
            stop_accepting,
            kill,
        }))
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
        passive: config::authoritative_protocols(config, name, ucfg),
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

/// What each consumer of file descriptors above the fd budget asks for under `cfg`: the
/// budget itself knows none of them (ARCHITECTURE.md).
pub fn fd_consumers(cfg: &Config) -> crate::fdbudget::Consumers {
    crate::fdbudget::Consumers {
        udp_workers: udp::default_workers(),
        turn: cfg.turn.as_ref().map_or(0, crate::turn::fd_demand),
    }
}

/// Where the config file is: `-c`, else `$MEDIAGATE_CONFIG`, else `config/mediagate.yaml`.
pub fn config_path(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("MEDIAGATE_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("config/mediagate.yaml"))
}
