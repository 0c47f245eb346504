//! Wires everything together: builds upstream controllers and listeners from a validated
//! configuration, serves the admin API, gates traffic on the first probe round, and runs
//! the graceful shutdown of SPEC §11.

use crate::admin;
use crate::config::{Config, ListenAddr, Protocol, ServerRef};
use crate::metrics::Metrics;
use crate::proxy::{tcp, udp};
use crate::upstream::{ServerHandle, Tier, UpstreamRuntime};
use anyhow::{Context, Result, anyhow};
use arc_swap::ArcSwap;
use indexmap::IndexMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running listener, as `/status` shows it.
pub enum ListenerRuntime {
    Udp {
        listen: ListenAddr,
        upstream: String,
        proxy: Arc<udp::UdpListener>,
    },
    Tcp {
        listen: ListenAddr,
        upstream: String,
        proxy: Arc<tcp::TcpListener>,
    },
}

impl ListenerRuntime {
    pub fn name(&self) -> &str {
        match self {
            ListenerRuntime::Udp { proxy, .. } => &proxy.name,
            ListenerRuntime::Tcp { proxy, .. } => &proxy.name,
        }
    }
    pub fn protocol(&self) -> Protocol {
        match self {
            ListenerRuntime::Udp { .. } => Protocol::Udp,
            ListenerRuntime::Tcp { .. } => Protocol::Tcp,
        }
    }
    pub fn listen(&self) -> ListenAddr {
        match self {
            ListenerRuntime::Udp { listen, .. } | ListenerRuntime::Tcp { listen, .. } => *listen,
        }
    }
    pub fn upstream(&self) -> &str {
        match self {
            ListenerRuntime::Udp { upstream, .. } | ListenerRuntime::Tcp { upstream, .. } => upstream,
        }
    }
    pub fn sessions(&self) -> usize {
        match self {
            ListenerRuntime::Udp { proxy, .. } => proxy.sessions(),
            ListenerRuntime::Tcp { proxy, .. } => proxy.sessions(),
        }
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
    pub upstreams: IndexMap<String, Arc<UpstreamRuntime>>,
    pub listeners: Vec<ListenerRuntime>,
    pub ready: AtomicBool,
    pub draining: AtomicBool,
}

/// A started balancer.
pub struct App {
    pub state: Arc<AppState>,
    /// Where the admin API actually listens (useful with port 0).
    pub admin_addr: std::net::SocketAddr,
    stop_accepting: CancellationToken,
    kill: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    drain_timeout: Duration,
}

impl App {
    /// Starts every part of the balancer; returns once listeners serve traffic (after the
    /// first probe round).
    pub async fn start(config: Config, config_path: String) -> Result<App> {
        let metrics = Metrics::new();

        // Upstreams first: probing starts while sockets are bound.
        let mut upstreams = IndexMap::new();
        for (name, ucfg) in &config.upstreams {
            let default_port = default_port(&config, name, ucfg);
            let servers = static_servers(name, ucfg, default_port)?;
            let rt = UpstreamRuntime::start(name, ucfg, servers, default_port, &metrics);
            upstreams.insert(name.clone(), Arc::new(rt));
        }

        // Bind every listener before serving anything, so a port in use fails start-up.
        enum Bound {
            /// Per port, one socket per worker thread.
            Udp(Vec<Vec<std::net::UdpSocket>>),
            Tcp(Vec<std::net::TcpListener>),
        }
        let mut bound = Vec::new();
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let route = upstreams
                .get(&l.upstream)
                .ok_or_else(|| anyhow!("listener {}: unknown upstream {}", l.name, l.upstream))?
                .route
                .clone();
            let lm = metrics.listener(&l.name);
            match l.protocol {
                Protocol::Udp => {
                    let workers = udp::default_workers();
                    let socks = l
                        .listen
                        .addrs()
                        .map(|a| {
                            udp::bind_group(a, workers).with_context(|| format!("listener {}: bind udp {a}", l.name))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    bound.push(Bound::Udp(socks));
                    listeners.push(ListenerRuntime::Udp {
                        listen: l.listen,
                        upstream: l.upstream.clone(),
                        proxy: udp::UdpListener::new(
                            l.name.clone(),
                            route,
                            l.session.idle_timeout.get(),
                            l.session.max_sessions,
                            lm,
                        ),
                    });
                }
                Protocol::Tcp => {
                    let socks = l
                        .listen
                        .addrs()
                        .map(|a| tcp::bind(a).with_context(|| format!("listener {}: bind tcp {a}", l.name)))
                        .collect::<Result<Vec<_>>>()?;
                    bound.push(Bound::Tcp(socks));
                    listeners.push(ListenerRuntime::Tcp {
                        listen: l.listen,
                        upstream: l.upstream.clone(),
                        proxy: tcp::TcpListener::new(l.name.clone(), route, lm),
                    });
                }
            }
        }

        let state = Arc::new(AppState {
            config_path,
            config: ArcSwap::from_pointee(config.clone()),
            loaded_at: ArcSwap::from_pointee(SystemTime::now()),
            last_reload_error: ArcSwap::from_pointee(None),
            started: Instant::now(),
            metrics,
            upstreams,
            listeners,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        });

        let admin_listener = tokio::net::TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| format!("admin: bind {}", config.admin.listen))?;
        let admin_addr = admin_listener.local_addr()?;
        let stop_accepting = CancellationToken::new();
        let kill = CancellationToken::new();
        let mut tasks = vec![tokio::spawn(admin::serve(
            admin_listener,
            state.clone(),
            config.admin.token.clone(),
            kill.clone(),
        ))];

        // SPEC §5: the first probe round completes before listeners accept traffic.
        for u in state.upstreams.values() {
            u.wait_ready().await;
        }

        for (rt, socks) in state.listeners.iter().zip(bound) {
            match (rt, socks) {
                (ListenerRuntime::Udp { proxy, .. }, Bound::Udp(socks)) => {
                    // UDP sessions keep flowing during the drain; `kill` ends them.
                    tasks.push(proxy.serve(socks, kill.clone())?);
                }
                (ListenerRuntime::Tcp { proxy, .. }, Bound::Tcp(socks)) => {
                    for s in socks {
                        tasks.push(proxy.serve(s, stop_accepting.clone(), kill.clone())?);
                    }
                }
                _ => unreachable!("listeners and sockets are built in the same order"),
            }
        }
        state.ready.store(true, Ordering::Release);
        tracing::info!(admin = %admin_addr, listeners = state.listeners.len(), upstreams = state.upstreams.len(), "mediagate ready");

        Ok(App {
            admin_addr,
            drain_timeout: config.shutdown.drain_timeout.get(),
            state,
            stop_accepting,
            kill,
            tasks,
        })
    }

    /// Graceful shutdown (SPEC §11): not ready, stop accepting, refuse new UDP sessions,
    /// let existing sessions finish until `drain_timeout` or `force` fires, then stop.
    pub async fn shutdown(self, force: impl std::future::Future<Output = ()>) {
        let st = &self.state;
        st.ready.store(false, Ordering::Release);
        st.draining.store(true, Ordering::Release);
        self.stop_accepting.cancel();
        for l in &st.listeners {
            if let ListenerRuntime::Udp { proxy, .. } = l {
                proxy.drain();
            }
        }
        let live = || st.listeners.iter().map(|l| l.sessions()).sum::<usize>();
        tracing::info!(sessions = live(), timeout = ?self.drain_timeout, "draining");
        let drained = async {
            while live() > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            _ = drained => tracing::info!("drained"),
            _ = tokio::time::sleep(self.drain_timeout) => tracing::info!(sessions = live(), "drain timeout reached"),
            _ = force => tracing::info!("second signal: stopping now"),
        }
        self.kill.cancel();
        for u in st.upstreams.values() {
            u.stop();
        }
        for t in self.tasks {
            t.abort();
        }
    }
}

/// The port probed and shown for port-less servers: the first port of the first listener
/// that uses the upstream.
fn default_port(config: &Config, name: &str, ucfg: &crate::config::UpstreamConfig) -> u16 {
    config
        .listeners
        .iter()
        .find(|l| l.upstream == name)
        .map(|l| l.listen.first_port)
        .or_else(|| ucfg.kubernetes.as_ref().and_then(|k| k.port))
        .unwrap_or(0)
}

/// Server handles for the static entries of an upstream. DNS names and `node/…`
/// references are filled in by discovery, which is not wired yet.
fn static_servers(
    name: &str,
    ucfg: &crate::config::UpstreamConfig,
    default_port: u16,
) -> Result<Vec<Arc<ServerHandle>>> {
    let tiers = ucfg
        .primary
        .iter()
        .map(|s| (s, Tier::Primary))
        .chain(ucfg.backup.iter().map(|s| (s, Tier::Backup)));
    let mut out = Vec::new();
    for (s, tier) in tiers {
        let handle = match s {
            ServerRef::Static(sa) => ServerHandle::new(sa.ip(), Some(sa.port()), default_port, tier),
            ServerRef::StaticIp(ip) => ServerHandle::new(*ip, None, default_port, tier),
            other => {
                return Err(anyhow!(
                    "upstream {name}: server {other} needs discovery, which this build does not run yet"
                ));
            }
        };
        out.push(Arc::new(handle));
    }
    Ok(out)
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
                tracing::warn!(limit = now, hard, "open-file limit in force is below what 100k UDP sessions need (one socket each)");
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
