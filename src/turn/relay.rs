//! Relay sockets: the `turn` crate's `RelayAddressGenerator` and the `Conn` it relays
//! through, wrapped so that the peer policy holds for every datagram.
//!
//! - `send_to` a peer the policy refuses: dropped, counted in
//!   `mediagate_turn_permission_denied_total`, never sent (this catches ChannelData and
//!   permissions created before the upstream list changed).
//! - datagrams from peers never reach the crate: the service's own reader
//!   (`peer_reader`, started with the allocation's client end) checks the policy and the
//!   permission and relays them to the client on the owned data path (`datapath`); the
//!   crate's per-allocation reader waits in `recv_from` until the allocation ends.
//! - relay sockets get `turn.relay.recv_buffer` bytes of receive buffer.
//! - relayed addresses are registered in the policy for `self` (headless mode).
//! - ports come from `relay.port_range`; EVEN-PORT and RESERVATION-TOKEN (RFC 8656 §7.2)
//!   are served from sockets bound in advance and handed over by port number. A reserved
//!   port belongs to the user who asked for it (it takes one unit of their quota, see
//!   `server`) and expires after 30 seconds ([`RelayFactory::take_expired`], called every
//!   second by the service).

use async_trait::async_trait;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use webrtc_util::Conn;

use super::kdrops::KernelDrops;
use super::kernel::{Installed, KernelChannels, Swept};
use super::metrics::{DropReason, TurnMetrics};
use super::policy::{PeerPolicy, Verdict};
use super::ratelog::RateLimit;
use super::sink::ClientSink;
use crate::config::PortRange;

tokio::task_local! {
    /// The relay state `allocate_conn` created while [`created_by`] polled its future.
    static CREATED: std::cell::RefCell<Option<Arc<RelayState>>>;
}

/// Runs `fut` (an allocation: the crate's `create_allocation`, or `allocate_conn`
/// directly) and returns with its output the relay state it created, if any. The state
/// travels in a task-local, not in the factory: Allocates run at once on every UDP
/// thread and on every TCP connection's task, so "the last one created" would be
/// another client's.
pub(crate) async fn created_by<F: std::future::Future>(
    fut: F,
) -> (F::Output, Option<Arc<RelayState>>) {
    CREATED
        .scope(std::cell::RefCell::new(None), async move {
            let out = fut.await;
            (out, CREATED.with(|c| c.borrow_mut().take()))
        })
        .await
}

/// RFC 8656 §9: permissions last 300 seconds unless refreshed.
pub(crate) const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// RFC 8656 §7.2: a reserved port is kept for about 30 seconds.
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// Random ports tried before an Allocate fails with 508.
const BIND_ATTEMPTS: usize = 64;

/// RFC 8656 §11: channel bindings last 10 minutes unless refreshed.
pub(crate) const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);

/// Channel bindings of one allocation, both ways, with their expiry.
#[derive(Default)]
struct Channels {
    by_number: HashMap<u16, (SocketAddr, Instant)>,
    by_peer: HashMap<SocketAddr, u16>,
}

/// Where an allocation's data goes back to: the client and its listener's transport.
pub(crate) struct ClientEnd {
    pub(crate) addr: SocketAddr,
    pub(crate) sink: Arc<dyn ClientSink>,
    /// The UDP listener the client sent to (None: TCP, TLS, DTLS), for the fast path.
    pub(crate) udp_listen: Option<SocketAddr>,
}

/// Per-allocation state shared by the relay socket, the data path and the request
/// handlers. Its locks are this allocation's only.
pub(crate) struct RelayState {
    /// The relayed transport address given to the client.
    pub(crate) advertised: SocketAddr,
    /// Mirror of the crate's permissions (peer IP → expiry).
    permissions: Mutex<HashMap<IpAddr, Instant>>,
    /// Mirror of the crate's channel bindings.
    channels: Mutex<Channels>,
    socket: Arc<UdpSocket>,
    /// Set when the Allocate succeeded.
    client: OnceLock<ClientEnd>,
    /// The crate closed the relay socket: the allocation ended.
    closed: AtomicBool,
    /// Cancelled when the allocation ends: stops the relay socket's reader.
    stop: CancellationToken,
    /// The kernel fast path (`turn.relay.offload: ebpf`) and this allocation's channels
    /// in it.
    kernel: Option<Arc<KernelChannels>>,
    installed: Mutex<HashMap<u16, Installed>>,
    /// A dual allocation's relayed address of the other family (RFC 8656
    /// ADDITIONAL-ADDRESS-FAMILY): its state, with its own permissions and channels.
    additional: OnceLock<Arc<RelayState>>,
    /// The additional relay's socket as created (its drop ends it): dropped when this
    /// allocation ends.
    additional_conn: Mutex<Option<Arc<dyn Conn + Send + Sync>>>,
}

impl std::fmt::Debug for RelayState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayState")
            .field("advertised", &self.advertised)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Swept for RelayState {
    fn is_closed(&self) -> bool {
        RelayState::is_closed(self)
    }

    fn sync_kernel(&self) {
        RelayState::sync_kernel(self)
    }
}

impl RelayState {
    /// Makes `state` (created by [`RelayGenerator`] for the other family) this
    /// allocation's additional relayed address; it ends when this allocation does.
    pub(crate) fn set_additional(&self, state: Arc<RelayState>, conn: Arc<dyn Conn + Send + Sync>) {
        if self.additional.set(state).is_ok() {
            *self
                .additional_conn
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(conn);
        }
        if self.is_closed() {
            self.end_additional();
        }
    }

    /// The additional relayed address of a dual allocation, while it lives.
    pub(crate) fn additional(&self) -> Option<&Arc<RelayState>> {
        self.additional.get().filter(|a| !a.is_closed())
    }

    /// The relay of this allocation for peers of a family (`ipv4`: IPv4, else IPv6).
    pub(crate) fn for_family(&self, ipv4: bool) -> Option<&RelayState> {
        if self.advertised.is_ipv4() == ipv4 {
            Some(self)
        } else {
            self.additional().map(|a| &**a)
        }
    }

    /// The relay and peer of a live channel, whichever family the peer is.
    pub(crate) fn channel(&self, number: u16) -> Option<(&RelayState, SocketAddr)> {
        if let Some(p) = self.channel_peer(number) {
            return Some((self, p));
        }
        let a = self.additional()?;
        a.channel_peer(number).map(|p| (&**a, p))
    }

    /// Ends the additional relayed address (when the allocation ends, or a Refresh
    /// deletes that family alone).
    pub(crate) fn end_additional(&self) {
        let conn = self
            .additional_conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(conn);
    }

    /// The relay socket (non-blocking; sends of the data path).
    pub(crate) fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// The relay socket, for its reader to register.
    pub(crate) fn shared_socket(&self) -> Arc<UdpSocket> {
        Arc::clone(&self.socket)
    }

    /// Resolves when the allocation has ended.
    pub(crate) fn stopped(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.stop.clone().cancelled_owned()
    }

    /// Where the allocation's data goes back to, once known.
    pub(crate) fn client_end(&self) -> Option<&ClientEnd> {
        self.client.get()
    }

    /// Sets where the allocation's data goes back to (once: false when it was set before).
    pub(crate) fn set_client_end(&self, client: ClientEnd) -> bool {
        self.client.set(client).is_ok()
    }

    /// Whether the allocation ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Brings this allocation's channels in the kernel fast path in line with its
    /// bindings, permissions and the peer policy (see `kernel`).
    pub(crate) fn sync_kernel(&self) {
        let Some(k) = &self.kernel else {
            return;
        };
        let mut installed = self.installed.lock().unwrap_or_else(|e| e.into_inner());
        let end = self
            .client
            .get()
            .and_then(|c| c.udp_listen.map(|l| (c.addr, l)))
            .filter(|_| !self.is_closed());
        let (Some((client, listen)), Ok(relay)) = (end, self.socket.local_addr()) else {
            k.clear(&mut installed);
            return;
        };
        let now = Instant::now();
        let channels: Vec<(u16, SocketAddr, Instant)> = {
            let c = self.channels.lock().unwrap_or_else(|e| e.into_inner());
            c.by_number
                .iter()
                .filter(|(_, (_, exp))| *exp > now)
                .map(|(n, (p, exp))| (*n, *p, *exp))
                .collect()
        };
        let want: Vec<(u16, SocketAddr, Instant)> = {
            let perms = self.permissions.lock().unwrap_or_else(|e| e.into_inner());
            channels
                .into_iter()
                .filter_map(|(n, p, exp)| {
                    let perm = perms.get(&p.ip()).filter(|e| **e > now)?;
                    Some((n, p, exp.min(*perm)))
                })
                .collect()
        };
        k.apply(&mut installed, &want, client, listen, relay);
    }

    /// Installs or refreshes channel `number` → `peer` and the peer's permission (called
    /// after the crate accepted the binding, so number and peer are consistent with the
    /// existing ones).
    pub(crate) fn bind_channel(&self, number: u16, peer: SocketAddr) {
        self.set_permission(peer.ip());
        let now = Instant::now();
        let mut c = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        c.by_number.retain(|_, (_, exp)| *exp > now);
        let Channels { by_number, by_peer } = &mut *c;
        by_peer.retain(|_, n| by_number.contains_key(n));
        c.by_number.insert(number, (peer, now + CHANNEL_LIFETIME));
        c.by_peer.insert(peer, number);
        drop(c);
        self.sync_kernel();
    }

    /// The peer of a live channel.
    pub(crate) fn channel_peer(&self, number: u16) -> Option<SocketAddr> {
        let c = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        c.by_number
            .get(&number)
            .filter(|(_, exp)| *exp > Instant::now())
            .map(|(p, _)| *p)
    }

    /// The live channel bound to `peer`, if any.
    pub(crate) fn peer_channel(&self, peer: SocketAddr) -> Option<u16> {
        let c = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let n = *c.by_peer.get(&peer)?;
        c.by_number
            .get(&n)
            .filter(|(p, exp)| *p == peer && *exp > Instant::now())
            .map(|_| n)
    }

    /// Installs or refreshes the permission for `ip` (called next to the crate's own).
    pub(crate) fn permit(&self, ip: IpAddr) {
        self.set_permission(ip);
        self.sync_kernel();
    }

    fn set_permission(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut p = self.permissions.lock().unwrap_or_else(|e| e.into_inner());
        p.retain(|_, exp| *exp > now);
        p.insert(ip, now + PERMISSION_LIFETIME);
    }

    pub(crate) fn has_permission(&self, ip: IpAddr) -> bool {
        let p = self.permissions.lock().unwrap_or_else(|e| e.into_inner());
        p.get(&ip).is_some_and(|exp| *exp > Instant::now())
    }
}

struct Prebound {
    socket: UdpSocket,
    /// RESERVATION-TOKEN for the odd port of an EVEN-PORT R=1 request.
    token: Option<[u8; 8]>,
    /// The user whose quota the reservation counts against; `None` for a socket bound
    /// for the Allocate in progress (not a reservation).
    owner: Option<String>,
    expires: Instant,
}

/// What the generator and the request handlers of one listener share.
pub(crate) struct RelayFactory {
    pub(crate) policy: Arc<PeerPolicy>,
    metrics: TurnMetrics,
    /// Where IPv4 relay sockets bind and the address advertised for them, if IPv4 is
    /// relayed.
    v4: Option<(IpAddr, IpAddr)>,
    /// The same for IPv6.
    v6: Option<(IpAddr, IpAddr)>,
    range: PortRange,
    /// `turn.relay.recv_buffer` (0: the OS default).
    recv_buffer: usize,
    kdrops: Arc<KernelDrops>,
    refusal_log: Arc<RateLimit>,
    /// Relay socket failures.
    error_log: Arc<RateLimit>,
    /// The kernel fast path, when on.
    kernel: Option<Arc<KernelChannels>>,
    /// Sockets bound in advance, by family (true: IPv4) and port.
    prebound: Mutex<HashMap<(bool, u16), Prebound>>,
    /// `turn.relay.default_family`.
    default_family: crate::config::DefaultFamily,
}

impl RelayFactory {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        policy: Arc<PeerPolicy>,
        metrics: TurnMetrics,
        addresses: crate::config::RelayAddresses,
        range: PortRange,
        recv_buffer: usize,
        kdrops: Arc<KernelDrops>,
        refusal_log: Arc<RateLimit>,
        error_log: Arc<RateLimit>,
        kernel: Option<Arc<KernelChannels>>,
        default_family: crate::config::DefaultFamily,
    ) -> Self {
        RelayFactory {
            default_family,
            kernel,
            policy,
            metrics,
            v4: addresses.v4.map(|ip| (ip, advertised_ip(ip))),
            v6: addresses.v6.map(|ip| (ip, advertised_ip(ip))),
            range,
            recv_buffer,
            kdrops,
            refusal_log,
            error_log,
            prebound: Mutex::new(HashMap::new()),
        }
    }

    /// The service's TURN metrics.
    pub(crate) fn metrics(&self) -> &TurnMetrics {
        &self.metrics
    }

    /// Rate limit of relay socket failure logs.
    pub(crate) fn error_log(&self) -> &RateLimit {
        &self.error_log
    }

    /// Whether an Allocate from `client` naming no family gets an IPv4 relayed address
    /// (`turn.relay.default_family`).
    pub(crate) fn default_ipv4(&self, client: SocketAddr) -> bool {
        self.default_family.ipv4_for(client)
    }

    /// Whether relayed addresses of a family (`ipv4`: IPv4, else IPv6) are served.
    pub(crate) fn serves(&self, ipv4: bool) -> bool {
        self.family(ipv4).is_some()
    }

    /// The bind and advertised address of a family, if it is served.
    fn family(&self, ipv4: bool) -> Option<(IpAddr, IpAddr)> {
        if ipv4 { self.v4 } else { self.v6 }
    }

    fn random_port(&self, even: bool) -> u16 {
        let (first, last) = (self.range.first, self.range.last);
        let span = u32::from(last - first) + 1;
        let mut p = first as u32 + rand::random::<u32>() % span;
        if even && p % 2 == 1 {
            p = if p > first as u32 { p - 1 } else { p + 1 };
        }
        p.min(last as u32) as u16
    }

    async fn bind(&self, port: u16, ipv4: bool) -> std::io::Result<UdpSocket> {
        let Some((ip, _)) = self.family(ipv4) else {
            return Err(std::io::Error::other("relay address family not served"));
        };
        let addr = SocketAddr::new(ip, port);
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        if addr.is_ipv6() {
            // IPv6 relays are IPv6 only: the IPv4 family has its own sockets and ports.
            s.set_only_v6(true)?;
        }
        if self.recv_buffer > 0 {
            // Best effort: the kernel caps it at net.core.rmem_max.
            let _ = s.set_recv_buffer_size(self.recv_buffer);
        }
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        Ok(s.into())
    }

    /// EVEN-PORT: binds an even port (and, when `reserve_next`, the next port under a
    /// fresh reservation token owned by `owner`). Returns the even port, to be passed to
    /// `create_allocation`.
    pub(crate) async fn prebind_even(
        &self,
        reserve_next: bool,
        owner: &str,
        ipv4: bool,
    ) -> Option<(u16, Option<[u8; 8]>)> {
        for _ in 0..BIND_ATTEMPTS {
            let port = self.random_port(true);
            if port % 2 == 1 || (reserve_next && port == u16::MAX) {
                continue;
            }
            let Ok(even) = self.bind(port, ipv4).await else {
                continue;
            };
            let odd = if reserve_next {
                match self.bind(port + 1, ipv4).await {
                    Ok(s) => Some(s),
                    Err(_) => continue,
                }
            } else {
                None
            };
            let expires = Instant::now() + RESERVATION_LIFETIME;
            let mut map = self.prebound.lock().unwrap_or_else(|e| e.into_inner());
            map.insert(
                (ipv4, port),
                Prebound {
                    socket: even,
                    token: None,
                    owner: None,
                    expires,
                },
            );
            let token = odd.map(|socket| {
                let token: [u8; 8] = rand::random();
                map.insert(
                    (ipv4, port + 1),
                    Prebound {
                        socket,
                        token: Some(token),
                        owner: Some(owner.to_string()),
                        expires,
                    },
                );
                token
            });
            return Some((port, token));
        }
        None
    }

    /// Removes the sockets whose 30 seconds have passed; returns the owners of the expired
    /// reservations (their quota units are to be released).
    pub(crate) fn take_expired(&self) -> Vec<String> {
        let now = Instant::now();
        let mut map = self.prebound.lock().unwrap_or_else(|e| e.into_inner());
        let expired: Vec<(bool, u16)> = map
            .iter()
            .filter(|(_, p)| p.expires <= now)
            .map(|(port, _)| *port)
            .collect();
        expired
            .into_iter()
            .filter_map(|port| map.remove(&port).and_then(|p| p.owner))
            .collect()
    }

    fn find_token<'a>(
        map: &'a HashMap<(bool, u16), Prebound>,
        token: &[u8],
    ) -> Option<((bool, u16), &'a Prebound)> {
        let now = Instant::now();
        map.iter()
            .find(|(_, p)| {
                p.expires > now && p.token.as_ref().is_some_and(|t| t.as_slice() == token)
            })
            .map(|(port, p)| (*port, p))
    }

    /// RESERVATION-TOKEN: the owner of the reservation, if the token is known and live.
    pub(crate) fn reservation_owner(&self, token: &[u8]) -> Option<String> {
        let map = self.prebound.lock().unwrap_or_else(|e| e.into_inner());
        Self::find_token(&map, token).and_then(|(_, p)| p.owner.clone())
    }

    /// RESERVATION-TOKEN: turns the reservation into the socket of the Allocate in
    /// progress; returns its port, former owner and family (true: IPv4).
    pub(crate) fn take_reservation(&self, token: &[u8]) -> Option<(u16, String, bool)> {
        let mut map = self.prebound.lock().unwrap_or_else(|e| e.into_inner());
        let (key, _) = Self::find_token(&map, token)?;
        let p = map.get_mut(&key)?;
        p.token = None;
        let owner = p.owner.take()?;
        Some((key.1, owner, key.0))
    }

    /// Drops a socket bound in advance that will not be used; returns the owner when it
    /// was a reservation.
    pub(crate) fn release_prebound(&self, port: u16, ipv4: bool) -> Option<String> {
        let mut map = self.prebound.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&(ipv4, port)).and_then(|p| p.owner)
    }

    async fn socket_for(&self, requested_port: u16, ipv4: bool) -> std::io::Result<UdpSocket> {
        if requested_port != 0 {
            let pre = {
                let mut map = self.prebound.lock().unwrap_or_else(|e| e.into_inner());
                map.remove(&(ipv4, requested_port))
            };
            return match pre {
                Some(p) => Ok(p.socket),
                None => self.bind(requested_port, ipv4).await,
            };
        }
        let mut last_err = None;
        for _ in 0..BIND_ATTEMPTS {
            match self.bind(self.random_port(false), ipv4).await {
                Ok(s) => return Ok(s),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| std::io::Error::other("no relay port available")))
    }
}

/// The crate's hook: creates one relay socket per allocation.
pub(crate) struct RelayGenerator(pub(crate) Arc<RelayFactory>);

#[async_trait]
impl turn::relay::RelayAddressGenerator for RelayGenerator {
    fn validate(&self) -> Result<(), turn::Error> {
        Ok(())
    }

    async fn allocate_conn(
        &self,
        use_ipv4: bool,
        requested_port: u16,
    ) -> Result<(Arc<dyn Conn + Send + Sync>, SocketAddr), turn::Error> {
        let f = &self.0;
        let Some((_, advertised_ip)) = f.family(use_ipv4) else {
            return Err(turn::Error::Other(
                "relay address family not available".into(),
            ));
        };
        let socket = f
            .socket_for(requested_port, use_ipv4)
            .await
            .map_err(|e| turn::Error::Other(format!("relay socket: {e}")))?;
        let port = socket
            .local_addr()
            .map_err(|e| turn::Error::Other(format!("relay socket: {e}")))?
            .port();
        let advertised = SocketAddr::new(advertised_ip, port);
        let socket = Arc::new(socket);
        f.kdrops.watch(&*socket, super::kdrops::Kind::Relay);
        // Both families: the fast path installs a channel whose client, listener, relay
        // and peer share one family (see `crate::offload::turn`); mixed ones stay here.
        let kernel = f.kernel.clone();
        let state = Arc::new(RelayState {
            advertised,
            permissions: Mutex::new(HashMap::new()),
            channels: Mutex::new(Channels::default()),
            socket: Arc::clone(&socket),
            client: OnceLock::new(),
            closed: AtomicBool::new(false),
            stop: CancellationToken::new(),
            kernel: kernel.clone(),
            installed: Mutex::new(HashMap::new()),
            additional: OnceLock::new(),
            additional_conn: Mutex::new(None),
        });
        if let Some(k) = &kernel {
            k.register(Arc::downgrade(&state) as std::sync::Weak<dyn Swept>);
        }
        f.policy.register_relay(advertised);
        // Handed to the Allocate that asked for it (see `created_by`); outside one, the
        // state lives on in the connection alone.
        let _ = CREATED.try_with(|c| *c.borrow_mut() = Some(Arc::clone(&state)));
        let conn = RelayConn {
            socket,
            state,
            factory: Arc::clone(f),
        };
        Ok((Arc::new(conn), advertised))
    }
}

/// A relay socket that enforces the peer policy in both directions.
struct RelayConn {
    socket: Arc<UdpSocket>,
    state: Arc<RelayState>,
    factory: Arc<RelayFactory>,
}

impl RelayConn {
    fn unregister(&self) {
        if !self.state.closed.swap(true, Ordering::AcqRel) {
            self.state.stop.cancel();
            self.state.sync_kernel();
            self.factory.policy.unregister_relay(self.state.advertised);
            self.factory.kdrops.unwatch(&*self.socket);
            self.state.end_additional();
        }
    }
}

impl Drop for RelayConn {
    fn drop(&mut self) {
        self.unregister();
    }
}

#[async_trait]
impl Conn for RelayConn {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(webrtc_util::Error::Other(
            "relay sockets are not connected".into(),
        ))
    }

    async fn recv(&self, _buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Err(webrtc_util::Error::Other("use recv_from".into()))
    }

    /// The crate's per-allocation reader: it never gets a datagram. The relay socket is
    /// read by the service's own reader (`peer_reader`), started with the client end; the
    /// crate stops waiting here when the allocation ends.
    async fn recv_from(&self, _out: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        std::future::pending().await
    }

    async fn send(&self, _buf: &[u8]) -> webrtc_util::Result<usize> {
        Err(webrtc_util::Error::Other("use send_to".into()))
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        let m = &self.factory.metrics;
        let verdict = self.factory.policy.verdict(target);
        if verdict != Verdict::Allowed {
            m.permission_denied.inc();
            if verdict == Verdict::Loop {
                m.loop_refused.inc();
            }
            if self.factory.refusal_log.allow() {
                tracing::warn!(
                    relay = %self.state.advertised,
                    peer = %target,
                    "TURN: datagram to a peer outside turn.relay.peers dropped"
                );
            }
            // Pretend success: the datagram is dropped on purpose and counted.
            return Ok(buf.len());
        }
        match self.socket.send_to(buf, target) {
            Ok(n) => {
                m.packets_to_peer.inc();
                m.bytes_to_peer.inc_by(n as u64);
                Ok(n)
            }
            Err(_) => {
                m.dropped(DropReason::SendError).inc();
                Ok(buf.len())
            }
        }
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        self.unregister();
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// The relayed address to advertise: `relay.address` when it is specific, else the first
/// global-looking address of this host of the same family (a pod IP in Kubernetes), else
/// loopback.
pub(crate) fn advertised_ip(bind_ip: IpAddr) -> IpAddr {
    if !bind_ip.is_unspecified() {
        return bind_ip;
    }
    let mut candidates: Vec<IpAddr> = Vec::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for ifa in addrs {
            let Some(sa) = ifa.address else { continue };
            let ip = if let Some(v4) = sa.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = sa.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                continue;
            };
            let usable = match ip {
                IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
                IpAddr::V6(v6) => {
                    !v6.is_loopback()
                        && !v6.is_unspecified()
                        && (v6.segments()[0] & 0xffc0) != 0xfe80
                }
            };
            if usable && ip.is_ipv4() == bind_ip.is_ipv4() {
                candidates.push(ip);
            }
        }
    }
    candidates.into_iter().next().unwrap_or(match bind_ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    })
}
