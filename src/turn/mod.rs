//! STUN/TURN service: clients behind NATs reach the media workers through the
//! gateway's public port, as with STUNner.
//!
//! Built on the `turn` crate (webrtc-rs) for the control messages: its allocation manager
//! owns relay sockets, lifetimes, permissions and channel bindings; the data is relayed
//! by the service's own data path (`datapath`, with the relay sockets in `relay`), and
//! the kernel's receive-queue drops are read in `kdrops`. This module adds what the crate
//! lacks (see `server` and `requests` for the split): TURN over TCP and TLS (`transport`,
//! `tls`) and DTLS (`dtls`), coturn-compatible credentials and 401 on failure (`auth`),
//! the peer policy (`policy`, enforced again on every relayed datagram in `relay`; it
//! also keeps relays off the gateway's own ports), per-user quotas and a global
//! allocation cap (`table`), RFC 8656 lifetimes, metrics (`metrics`), rate-limited logs
//! (`ratelog`), giving memory back after bursts of TCP connections (`trim`) and ICE
//! configurations (`ice`). [`fd_demand`] is what the service may hold in file
//! descriptors.
//!
//! `app` wires: [`PeerPolicy`] (fed with upstream IPs), [`TurnMetrics`] (process
//! registry), [`TurnService`] (started when `turn:` is configured; `allocations()` for
//! `/status`) and [`ice_config`] (`GET /ice`, `mediagate ice`).

mod auth;
mod datapath;
mod dtls;
mod dtls_cert;
mod ice;
mod kdrops;
mod kernel;
mod metrics;
mod outbox;
mod peer_reader;
mod policy;
mod relay;
mod requests;
mod server;
mod shards;
mod shared;
mod sink;
mod sources;
mod table;
mod tls;
mod transport;
mod trim;
mod wire;

use crate::ratelog;

pub use auth::{
    AuthFailure, ephemeral_expiry, ephemeral_password, ephemeral_username, long_term_key,
};
pub use ice::{IceRequest, ice_config, ice_config_for};
pub use metrics::TurnMetrics;
pub use policy::{PeerPolicy, Verdict};

use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use turn::allocation::allocation_manager::{Manager, ManagerConfig};
use turn::allocation::five_tuple::FiveTuple;
use turn::proto::PROTO_UDP;
use webrtc_util::Conn;

use crate::config::{TurnConfig, TurnTransport};
use relay::{RelayFactory, RelayGenerator};
use server::{Core, Listener};
use transport::{TcpOptions, TcpTransport, UdpTransport};

/// How often the service re-reads the host's addresses for the peer policy.
const HOST_IPS_REFRESH: Duration = Duration::from_secs(30);
/// How often expired EVEN-PORT reservations are swept (they live 30 s).
const RESERVATION_SWEEP: Duration = Duration::from_secs(1);

/// The global allocation cap in effect: `turn.quota.max_allocations` clipped to the size of
/// `turn.relay.port_range` (every allocation and every reservation holds one relay port).
pub fn effective_max_allocations(cfg: &TurnConfig) -> usize {
    let range = usize::from(cfg.relay.port_range.last - cfg.relay.port_range.first) + 1;
    cfg.quota.max_allocations.min(range)
}

/// File descriptors the TURN service may hold at most with this configuration, for the
/// process's descriptor budget: one relay socket per allocation or EVEN-PORT reservation
/// ([`effective_max_allocations`]), plus one more per allocation for the even port bound
/// together with a reservation while an Allocate is in progress (at most one per
/// listener), one socket per TURN-over-TCP connection (`turn.quota.max_tcp_connections`),
/// one socket per listener (a UDP listener: one per `turn.relay.threads` thread) and each
/// UDP thread's epoll instance and waker. The shared runtime's and the crate's own
/// descriptors are not counted.
pub fn fd_demand(cfg: &TurnConfig) -> usize {
    let listeners = cfg.listeners.len();
    let threads = shards::thread_count(cfg.relay.threads);
    let sockets: usize = cfg
        .listeners
        .iter()
        .map(|l| match l.protocol {
            TurnTransport::Udp => threads,
            _ => 1,
        })
        .sum();
    effective_max_allocations(cfg)
        + sockets
        + cfg.quota.max_tcp_connections
        + listeners
        + SHARD_FDS * threads
}

/// Descriptors of one UDP thread's own runtime (its epoll instance and its waker).
const SHARD_FDS: usize = 2;

/// `mediagate check`: loads the certificate and key of every `tls` and `dtls` listener
/// (and of a `tcp` listener given one) as the service would, with the same bounded reads,
/// and says which fail: `turn.listeners[N]: certificate: FILE: why`.
pub fn check_certificates(cfg: &TurnConfig) -> Vec<String> {
    let mut errors = Vec::new();
    for (idx, l) in cfg.listeners.iter().enumerate() {
        let (Some(cert), Some(key)) = (&l.cert, &l.key) else {
            continue;
        };
        let result = match l.protocol {
            TurnTransport::Dtls => dtls::DtlsCert::load(cert, key).map(|_| ()),
            TurnTransport::Tcp | TurnTransport::Tls => tls::CertStore::load(cert, key).map(|_| ()),
            TurnTransport::Udp => Ok(()),
        };
        if let Err(e) = result {
            errors.push(format!("turn.listeners[{idx}]: certificate: {e}"));
        }
    }
    errors
}

/// The running STUN/TURN service.
pub struct TurnService {
    core: Arc<Core>,
    /// Shares its credentials with the one `core` checks requests with.
    auth: auth::Authenticator,
    listeners: Vec<Arc<Listener>>,
    cancel: CancellationToken,
    bookkeeping: CancellationToken,
    tasks: TaskTracker,
    /// The UDP listeners' threads, stopped last.
    shards: shards::Shards,
}

fn bind_udp(addr: SocketAddr, buffer: usize) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort: a larger buffer absorbs bursts; the kernel caps it at rmem_max.
    if buffer > 0 {
        let _ = s.set_recv_buffer_size(buffer);
        let _ = s.set_send_buffer_size(buffer);
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

impl TurnService {
    /// Binds every `turn.listeners` entry and starts serving.
    pub async fn start(
        cfg: &TurnConfig,
        policy: Arc<PeerPolicy>,
        metrics: TurnMetrics,
    ) -> anyhow::Result<TurnService> {
        if cfg.listeners.is_empty() {
            anyhow::bail!("turn.listeners: at least one listener is needed");
        }
        let authenticator =
            auth::Authenticator::new(&cfg.realm, &cfg.auth).map_err(anyhow::Error::msg)?;
        let core = Arc::new(Core::new(
            authenticator.clone(),
            Arc::clone(&policy),
            metrics.clone(),
            cfg.quota.allocations_per_user,
            effective_max_allocations(cfg),
        ));
        if effective_max_allocations(cfg) < cfg.quota.max_allocations {
            tracing::info!(
                max_allocations = cfg.quota.max_allocations,
                effective = effective_max_allocations(cfg),
                "turn.quota.max_allocations is clipped to the size of turn.relay.port_range"
            );
        }
        let tcp_limit = Arc::new(Semaphore::new(cfg.quota.max_tcp_connections));

        let dtls_limit = Arc::new(Semaphore::new(cfg.quota.max_dtls_sessions));
        // Per-source caps, shared by every TCP, TLS and DTLS listener.
        let sources = sources::SourceLimits::new(
            cfg.quota.max_connections_per_source,
            cfg.quota.max_handshakes_per_source,
        );
        let trimmer = Arc::new(trim::Trimmer::default());
        // The advertised address behind a NAT also reaches this host's own ports.
        let extra_ips: Vec<std::net::IpAddr> = cfg.public_address.ips().collect();
        policy.add_public_ips(extra_ips);
        let advertised: Vec<String> = cfg
            .relay
            .address
            .iter()
            .map(|ip| relay::advertised_ip(ip).to_string())
            .collect();
        let advertised = advertised.join(",");
        let cancel = CancellationToken::new();
        let bookkeeping = CancellationToken::new();
        // If a later listener fails to bind, stop what the earlier ones started.
        let stop_on_error = (
            cancel.clone().drop_guard(),
            bookkeeping.clone().drop_guard(),
        );
        let tasks = TaskTracker::new();
        let kdrops = Arc::new(kdrops::KernelDrops::new(
            metrics.kernel_drops_listener.clone(),
            metrics.kernel_drops_relay.clone(),
        ));
        let kernel = if crate::offload::turn_wanted(cfg.relay.offload) {
            kernel::KernelChannels::start(&metrics, Arc::clone(&policy))
        } else {
            None
        };
        crate::sockio::set_udp_gso(cfg.relay.udp_gso);
        let shards = shards::Shards::start(shards::thread_count(cfg.relay.threads))
            .context("turn.relay.threads: cannot start the UDP threads")?;
        let mut listeners = Vec::new();
        for (idx, l) in cfg.listeners.iter().enumerate() {
            let relays = Arc::new(RelayFactory::new(
                Arc::clone(&policy),
                metrics.clone(),
                cfg.relay.address,
                cfg.relay.port_range,
                cfg.relay.recv_buffer,
                Arc::clone(&kdrops),
                Arc::clone(&core.refusal_log),
                Arc::clone(&core.misc_log),
                kernel.clone(),
                cfg.relay.default_family,
            ));
            let (notify_tx, mut notify_rx) = mpsc::channel(4096);
            let manager = Arc::new(Manager::new(ManagerConfig {
                relay_addr_generator: Box::new(RelayGenerator(Arc::clone(&relays))),
                alloc_close_notify: Some(notify_tx),
            }));
            type Transports = (
                Arc<dyn Conn + Send + Sync>,
                Arc<dyn datapath::ClientSink>,
                SocketAddr,
                Option<mpsc::UnboundedReceiver<SocketAddr>>,
                Option<Arc<UdpTransport>>,
                Option<Arc<TcpTransport>>,
            );
            let (conn, sink, local, closed_rx, udp, tcp): Transports = match l.protocol {
                TurnTransport::Udp => {
                    let sockets = crate::sockio::bind_reuseport_group(
                        l.listen,
                        shards.len(),
                        cfg.relay.listener_buffer,
                    )
                    .with_context(|| format!("turn.listeners[{idx}]: bind udp {}", l.listen))?;
                    for s in &sockets {
                        kdrops.watch(s, kdrops::Kind::Listener);
                    }
                    let t = Arc::new(UdpTransport::new(sockets, metrics.clone())?);
                    let local = t.local_addr()?;
                    (t.clone(), t.clone(), local, None, Some(t), None)
                }
                TurnTransport::Dtls => {
                    let (Some(cert), Some(key)) = (&l.cert, &l.key) else {
                        anyhow::bail!("turn.listeners[{idx}]: a dtls listener needs cert and key")
                    };
                    let store = dtls::DtlsCert::load(cert, key)
                        .map_err(anyhow::Error::msg)
                        .with_context(|| format!("turn.listeners[{idx}]: certificate"))?;
                    metrics.cert_reloads_ok.inc();
                    tasks.spawn(Arc::clone(&store).watch(metrics.clone(), cancel.clone()));
                    let socket =
                        bind_udp(l.listen, cfg.relay.listener_buffer).with_context(|| {
                            format!("turn.listeners[{idx}]: bind dtls {}", l.listen)
                        })?;
                    kdrops.watch(&socket, kdrops::Kind::Listener);
                    let (t, closed) = dtls::DtlsTransport::start(
                        socket,
                        store,
                        metrics.clone(),
                        cancel.clone(),
                        &tasks,
                        Arc::clone(&core.tcp_log),
                        Arc::clone(&dtls_limit),
                        sources.clone(),
                    )?;
                    let local = t.local_addr()?;
                    (t.clone(), t, local, Some(closed), None, None)
                }
                TurnTransport::Tcp | TurnTransport::Tls => {
                    // A tcp listener given a certificate also speaks TLS on its port.
                    let tls = match (&l.cert, &l.key) {
                        (Some(cert), Some(key)) => {
                            let store = tls::CertStore::load(cert, key)
                                .map_err(anyhow::Error::msg)
                                .with_context(|| format!("turn.listeners[{idx}]: certificate"))?;
                            metrics.cert_reloads_ok.inc();
                            let acceptor = store.acceptor().map_err(anyhow::Error::msg)?;
                            tasks.spawn(store.watch(metrics.clone(), cancel.clone()));
                            Some(acceptor)
                        }
                        _ if l.protocol == TurnTransport::Tls => {
                            anyhow::bail!(
                                "turn.listeners[{idx}]: a tls listener needs cert and key"
                            )
                        }
                        _ => None,
                    };
                    let listener = TcpListener::bind(l.listen).await.with_context(|| {
                        format!("turn.listeners[{idx}]: bind {} {}", l.protocol, l.listen)
                    })?;
                    let (t, closed) = TcpTransport::start(
                        listener,
                        metrics.clone(),
                        cancel.clone(),
                        &tasks,
                        Arc::clone(&core.tcp_log),
                        Arc::clone(&tcp_limit),
                        Arc::clone(&trimmer),
                        TcpOptions {
                            plain_too: l.protocol == TurnTransport::Tcp && tls.is_some(),
                            tls,
                            accept_proxy: l.accept_proxy_protocol,
                            trusted: crate::proxyproto::Trusted::parse(&l.trusted_proxies),
                            buffer: cfg.relay.tcp_buffer,
                            sources: sources.clone(),
                            handshake_timeout: cfg.quota.handshake_timeout.0,
                        },
                    )?;
                    let local = t.local_addr()?;
                    (t.clone(), t.clone(), local, Some(closed), None, Some(t))
                }
            };
            policy.register_listener(local);
            let listener = Arc::new(Listener::new(
                idx,
                l.protocol,
                local,
                Arc::clone(&core),
                conn,
                sink,
                Arc::clone(&manager),
                relays,
                udp,
                tcp,
            ));
            if l.protocol == TurnTransport::Udp {
                for i in 0..shards.len() {
                    let run = Arc::clone(&listener).run_udp(i, cancel.clone());
                    tasks.spawn_on(run, shards.handle(i));
                }
            } else {
                tasks.spawn(Arc::clone(&listener).run(cancel.clone()));
            }

            // EVEN-PORT reservations expire on their own, Allocate or not.
            let l2 = Arc::clone(&listener);
            let stop = cancel.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(RESERVATION_SWEEP);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => l2.expire_reservations(),
                    }
                }
            });

            // Allocations that end (expiry, Refresh 0, TCP close, shutdown) leave the table.
            let c = Arc::clone(&core);
            let stop = bookkeeping.clone();
            tasks.spawn(async move {
                loop {
                    let info = tokio::select! {
                        _ = stop.cancelled() => break,
                        i = notify_rx.recv() => match i { Some(i) => i, None => break },
                    };
                    c.allocs.remove(&(idx, info.five_tuple), Some(info.relay_addr));
                    if c.alloc_log.allow() {
                        tracing::debug!(client = %info.five_tuple.src_addr, relay = %info.relay_addr, "TURN allocation closed");
                    }
                }
            });

            // RFC 8656: an allocation made over TCP ends with its connection.
            if let Some(mut closed_rx) = closed_rx {
                let m = Arc::clone(&manager);
                let stop = cancel.clone();
                tasks.spawn(async move {
                    loop {
                        let peer = tokio::select! {
                            _ = stop.cancelled() => break,
                            p = closed_rx.recv() => match p { Some(p) => p, None => break },
                        };
                        let ft = FiveTuple {
                            protocol: PROTO_UDP,
                            src_addr: peer,
                            dst_addr: local,
                        };
                        m.delete_allocation(&ft).await;
                    }
                });
            }
            tracing::info!(
                transport = %l.protocol,
                listen = %local,
                relay = %advertised,
                ports = %format!("{}-{}", cfg.relay.port_range.first, cfg.relay.port_range.last),
                "TURN listener started"
            );
            listeners.push(listener);
        }
        // Memory freed by a burst of closed TCP connections goes back to the OS.
        let stop = cancel.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(trim::TRIM_EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        if trimmer.maybe_trim().await {
                            tracing::debug!("TURN: freed memory returned to the OS after TCP connections closed");
                        }
                    }
                }
            }
        });

        // Channels in the kernel fast path follow lapsed channels, permissions and policy.
        if let Some(k) = kernel {
            let stop = cancel.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => k.sweep(),
                    }
                }
            });
        }

        // Datagrams the kernel dropped in front of the service's sockets.
        let stop = cancel.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(kdrops::SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        let k = Arc::clone(&kdrops);
                        let _ = tokio::task::spawn_blocking(move || k.sample()).await;
                    }
                }
            }
        });

        // Interface addresses may change (a new pod IP, an added address).
        let p = Arc::clone(&policy);
        let stop = cancel.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(HOST_IPS_REFRESH);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        let p = Arc::clone(&p);
                        let _ = tokio::task::spawn_blocking(move || p.refresh_host_ips()).await;
                    }
                }
            }
        });
        let (g1, g2) = stop_on_error;
        g1.disarm();
        g2.disarm();
        Ok(TurnService {
            core,
            auth: authenticator,
            listeners,
            cancel,
            bookkeeping,
            tasks,
            shards,
        })
    }

    /// Replaces the credentials in force (`turn.auth` on reload: secret rotation, users
    /// added or removed); the realm and everything else stay as started. Fails, changing
    /// nothing, when `auth` lacks its secret or users.
    pub fn set_auth(&self, auth: &crate::config::TurnAuthConfig) -> Result<(), String> {
        self.auth.update(auth)
    }

    /// Live allocations (for `/status`).
    pub fn allocations(&self) -> usize {
        self.core.allocs.allocations()
    }

    /// The bound address of every listener, in configuration order (useful with port 0).
    pub fn local_addrs(&self) -> Vec<(TurnTransport, SocketAddr)> {
        self.listeners
            .iter()
            .map(|l| (l.protocol, l.local))
            .collect()
    }

    /// Stops the listeners, deletes every allocation and waits for the tasks to end.
    pub async fn close(self) {
        self.cancel.cancel();
        for l in &self.listeners {
            let _ = l.manager.close().await;
        }
        self.core.allocs.clear();
        self.bookkeeping.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.shards.stop();
        tracing::info!("TURN service stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PortRange, QuotaConfig, RelayConfig, TurnListenerConfig};

    fn cfg(range: (u16, u16), max_allocations: usize, tcp: usize) -> TurnConfig {
        TurnConfig {
            realm: "r".into(),
            public_address: "127.0.0.1".into(),
            listeners: vec![
                TurnListenerConfig {
                    protocol: TurnTransport::Udp,
                    listen: "0.0.0.0:3478".parse().unwrap(),
                    cert: None,
                    key: None,
                    accept_proxy_protocol: false,
                    trusted_proxies: Vec::new(),
                },
                TurnListenerConfig {
                    protocol: TurnTransport::Tcp,
                    listen: "0.0.0.0:3478".parse().unwrap(),
                    cert: None,
                    key: None,
                    accept_proxy_protocol: false,
                    trusted_proxies: Vec::new(),
                },
            ],
            auth: crate::config::TurnAuthConfig {
                secret_file: None,
                kind: crate::config::TurnAuthType::Ephemeral,
                secret: Some("s".into()),
                secrets: vec![],
                ttl: crate::config::Dur(Duration::from_secs(60)),
                users: vec![],
            },
            relay: RelayConfig {
                port_range: PortRange {
                    first: range.0,
                    last: range.1,
                },
                ..RelayConfig::default()
            },
            quota: QuotaConfig {
                max_allocations,
                max_tcp_connections: tcp,
                ..QuotaConfig::default()
            },
            ice: Default::default(),
        }
    }

    #[test]
    fn the_cap_is_clipped_to_the_port_range_and_counted_in_fd_demand() {
        let c = cfg((49152, 65535), 10_000, 4096);
        assert_eq!(effective_max_allocations(&c), 10_000);
        // A UDP listener binds one socket per thread, and each thread has its runtime's
        // epoll instance and waker.
        let mut c = c;
        c.relay.threads = 3;
        assert_eq!(fd_demand(&c), 10_000 + (3 + 1) + 4096 + 2 + 2 * 3);
        let mut c = cfg((40000, 40099), 10_000, 10);
        c.relay.threads = 1;
        assert_eq!(effective_max_allocations(&c), 100);
        assert_eq!(fd_demand(&c), 100 + 2 + 10 + 2 + 2);
    }
}
