//! The configuration file's shape, as serde types with their defaults.
//!
//! Every struct rejects unknown keys so that a typo fails `mediagate check` instead of
//! silently falling back to a default. Values that need parsing beyond serde (addresses,
//! port ranges, server references, durations) have their own small types here.

use indexmap::IndexMap;
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::health::HealthConfig;
use super::turn::TurnConfig;
use super::values::default_true;
pub use super::values::{Dur, Offload, Protocol};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Admin HTTP API. Default: listen on 127.0.0.1:8086, no token.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Logging. Default: `info`, `text`.
    #[serde(default)]
    pub log: LogConfig,
    /// Client-facing listeners, each forwarding to one upstream.
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    /// Named upstreams, in written order.
    #[serde(default)]
    pub upstreams: IndexMap<String, UpstreamConfig>,
    /// The optional STUN/TURN service.
    #[serde(default)]
    pub turn: Option<TurnConfig>,
    /// DNS and Kubernetes discovery settings.
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    /// Graceful shutdown.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Replicas acting as one balancer (shared health and admin states). Default: none.
    #[serde(default)]
    pub cluster: Option<super::ClusterConfig>,
    /// Webhooks for failover events. Default: none.
    #[serde(default)]
    pub events: super::EventsConfig,
    /// The secret files (`*_file` keys) this configuration was read from, with a
    /// fingerprint of their content: a change reloads ([`super::secret_files`]).
    #[serde(skip)]
    pub secret_files: Vec<super::values::SecretFile>,
}

/// `admin:` — the HTTP API with /metrics, /status and the POST endpoints.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Default `127.0.0.1:8086` (loopback: the API can change server states).
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// When set, POST endpoints need `Authorization: Bearer <token>`.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding `token` (one line), re-read when it changes. Default none.
    #[serde(default)]
    pub token_file: Option<String>,
    /// Open admin connections at most; at the cap the oldest connection with no request
    /// in progress is closed to make room, or the new one when every connection is busy.
    /// Default 128.
    #[serde(default = "default_admin_max_connections")]
    pub max_connections: usize,
    /// A connection must deliver a request's headers within this time (also between two
    /// requests of a kept-alive connection), or it is closed. Default 5s.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: Dur,
    /// A bearer token accepted on `GET /events` only (besides `token`). Default none.
    #[serde(default)]
    pub events_token: Option<String>,
    /// A file holding `events_token` (one line), re-read when it changes. Default none.
    #[serde(default)]
    pub events_token_file: Option<String>,
    /// `GET /events` streams open at once (never evicted as idle connections); beyond,
    /// new ones are refused (503). At most `max_connections - 1`. Default 32.
    #[serde(default = "default_max_event_streams")]
    pub max_event_streams: usize,
}

fn default_max_event_streams() -> usize {
    32
}

fn default_admin_max_connections() -> usize {
    128
}
fn default_header_read_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8086))
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            token: None,
            token_file: None,
            max_connections: default_admin_max_connections(),
            header_read_timeout: default_header_read_timeout(),
            events_token: None,
            events_token_file: None,
            max_event_streams: default_max_event_streams(),
        }
    }
}

/// `log:` — level and format; `RUST_LOG` overrides the level.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Default `info`.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// Default `text`.
    #[serde(default)]
    pub format: LogFormat,
}

fn default_log_level() -> String {
    "info".to_string()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            format: LogFormat::Text,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// One entry of `listeners:`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Required, unique; letters, digits, `.`, `-`, `_` (used in metrics labels).
    pub name: String,
    /// Required: `tcp` or `udp`.
    pub protocol: Protocol,
    /// Required: `ip:port` or `ip:first-last`.
    pub listen: ListenAddr,
    /// Required: name of an entry of `upstreams:`.
    pub upstream: String,
    /// Session limits. Default: 60s idle timeout, 100000 sessions, 200 new sessions per
    /// source IP per second, 10000 sessions per source IP.
    #[serde(default)]
    pub session: SessionConfig,
    /// TCP: open connections at most (each holds two descriptors: client and server);
    /// connections beyond it are closed at once and counted. Default 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// UDP: `ebpf` forwards established sessions in the kernel (TC ingress eBPF, see
    /// `crate::offload`); user space keeps every decision. Needs CAP_BPF and
    /// CAP_NET_ADMIN, a kernel with TCX (6.6+), IPv4 and a specific listen address; when
    /// unavailable the listener runs in user space (logged once, counted). Default `none`.
    #[serde(default)]
    pub offload: Offload,
    /// TCP: `v2` sends a PROXY protocol v2 header carrying the client's address to the
    /// server before any data (for coturn 4.6 `--tcp-proxy-port`, Janus behind a proxy,
    /// HAProxy `accept-proxy`). Default none.
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocolVersion>,
    /// TCP: every connection must start with a PROXY protocol v2 header (from a cloud load
    /// balancer such as AWS NLB); its source address is the client address. Connections
    /// without a valid header within 5 s are closed and counted. Default false.
    #[serde(default)]
    pub accept_proxy_protocol: bool,
    /// With `accept_proxy_protocol`: the CIDRs (or addresses) of the load balancers that
    /// may send the header; a connection from elsewhere is refused and counted. Required
    /// with `accept_proxy_protocol`.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

/// `listeners[].proxy_protocol`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocolVersion {
    /// The binary PROXY protocol version 2.
    V2,
}

fn default_max_connections() -> usize {
    10_000
}

/// `listeners[].session:`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// A session with no traffic either way for this long is removed (UDP) or reset
    /// (TCP: a connection that sends nothing does not hold its descriptors). Default 60s.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Dur,
    /// UDP: new sessions beyond this are dropped and counted. Default 100000.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// UDP: new sessions one source IP may open per second (a token bucket holding one
    /// second's worth); more are dropped and counted (`reason="source_rate"`). 0 turns
    /// the limit off. Default 200.
    #[serde(default = "default_new_per_source_per_second")]
    pub new_per_source_per_second: u32,
    /// UDP: live sessions of one source IP at most; more are dropped and counted
    /// (`reason="source_sessions"`). 0 turns the limit off. Default 10000.
    #[serde(default = "default_max_per_source")]
    pub max_per_source: usize,
}

fn default_new_per_source_per_second() -> u32 {
    200
}
fn default_max_per_source() -> usize {
    10_000
}

fn default_idle_timeout() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_max_sessions() -> usize {
    100_000
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            idle_timeout: default_idle_timeout(),
            max_sessions: default_max_sessions(),
            new_per_source_per_second: default_new_per_source_per_second(),
            max_per_source: default_max_per_source(),
        }
    }
}

/// A listen address: one IP and an inclusive port range (a single port is `first == last`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenAddr {
    /// Address to bind; `0.0.0.0` / `::` overlap every address of the host.
    pub ip: IpAddr,
    /// First port of the range (never 0).
    pub first_port: u16,
    /// Last port, inclusive (`>= first_port`).
    pub last_port: u16,
}

impl ListenAddr {
    /// Every socket address this listener binds, in port order.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        (self.first_port..=self.last_port).map(move |p| SocketAddr::new(self.ip, p))
    }

    /// Whether the two listen addresses share a port on an overlapping IP.
    pub fn overlaps(&self, other: &ListenAddr) -> bool {
        let ips_overlap =
            self.ip == other.ip || self.ip.is_unspecified() || other.ip.is_unspecified();
        ips_overlap && self.first_port <= other.last_port && other.first_port <= self.last_port
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ip = match self.ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        if self.first_port == self.last_port {
            write!(f, "{ip}:{}", self.first_port)
        } else {
            write!(f, "{ip}:{}-{}", self.first_port, self.last_port)
        }
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid listen address {s:?} (expected ip:port or ip:first-last)");
        let (ip_part, port_part) = s.rsplit_once(':').ok_or_else(bad)?;
        let ip_part = ip_part
            .strip_prefix('[')
            .and_then(|p| p.strip_suffix(']'))
            .unwrap_or(ip_part);
        let ip: IpAddr = ip_part.parse().map_err(|_| bad())?;
        let parse_port = |p: &str| -> Result<u16, String> {
            match p.parse::<u16>() {
                Ok(0) | Err(_) => Err(format!("invalid port {p:?} in listen address {s:?}")),
                Ok(n) => Ok(n),
            }
        };
        let (first_port, last_port) = match port_part.split_once('-') {
            Some((a, b)) => (parse_port(a)?, parse_port(b)?),
            None => {
                let p = parse_port(port_part)?;
                (p, p)
            }
        };
        if first_port > last_port {
            return Err(format!(
                "invalid port range {port_part:?} in listen address {s:?} (first port above last)"
            ));
        }
        Ok(ListenAddr {
            ip,
            first_port,
            last_port,
        })
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Selection policy within the active tier. Every enum of the file is written in
/// snake_case (`round_robin`); the kebab-case spelling (`round-robin`) is accepted too.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Strict active-passive: the single first eligible server.
    #[default]
    First,
    /// Rendezvous hashing of the client IP over the first tier with an eligible server.
    Hash,
    /// Rotate over the eligible servers of the first tier that has one.
    #[serde(alias = "round-robin")]
    RoundRobin,
    /// The eligible server of the first tier with the fewest sessions.
    #[serde(alias = "least-sessions")]
    LeastSessions,
}

impl Balance {
    /// The name as written in the file.
    pub fn as_str(&self) -> &'static str {
        match self {
            Balance::First => "first",
            Balance::Hash => "hash",
            Balance::RoundRobin => "round_robin",
            Balance::LeastSessions => "least_sessions",
        }
    }
}

/// What happens when a higher-priority server becomes eligible again.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Failback {
    /// New sessions go to the recovered server; existing ones stay.
    #[default]
    #[serde(alias = "new-sessions")]
    NewSessions,
    /// Existing sessions move back too.
    All,
    /// Nothing moves until `POST /upstreams/NAME/failback` or the server in use fails.
    Manual,
}

impl Failback {
    /// The name as written in the file.
    pub fn as_str(&self) -> &'static str {
        match self {
            Failback::NewSessions => "new_sessions",
            Failback::All => "all",
            Failback::Manual => "manual",
        }
    }
}

/// What an upstream does when a verdict leaves it no eligible server.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum WhenAllDown {
    /// Sessions stay on (and new ones go to) the servers that served last, and the
    /// upstream is marked `degraded`: a probe that fails while the media path works must
    /// not drop the media. Servers in `drain` or `maint` are never kept.
    #[default]
    #[serde(alias = "keep-last")]
    KeepLast,
    /// The upstream has no server: datagrams and connections are dropped until one is up.
    Drop,
}

impl WhenAllDown {
    /// The name as written in the file.
    pub fn as_str(&self) -> &'static str {
        match self {
            WhenAllDown::KeepLast => "keep_last",
            WhenAllDown::Drop => "drop",
        }
    }
}

/// Which passive failures (a refused TCP connect, an ICMP error on a UDP session) mark a
/// server down for every listener of its upstream.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum PassiveScope {
    /// Only failures of the protocol that speaks for the server: the one protocol of the
    /// upstream's listeners, or, when UDP and TCP listeners share the upstream, the
    /// protocol its health probe uses (`udp`/`stun` probes: UDP; `tcp`/`http`: TCP;
    /// `none`: both). A failure of the other protocol only steers that protocol's traffic
    /// away from the server for a while; the probe decides the server's state.
    #[default]
    Protocol,
    /// Every passive failure marks the server down, whatever protocol saw it.
    Server,
}

/// One entry of `upstreams:`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Preferred servers, in order. Default empty (but primary + backup must not be).
    #[serde(default)]
    pub primary: Vec<ServerRef>,
    /// Used when no primary server is eligible, in order. Default empty.
    #[serde(default)]
    pub backup: Vec<ServerRef>,
    /// Default `first`.
    #[serde(default)]
    pub balance: Balance,
    /// Default `new_sessions`.
    #[serde(default)]
    pub failback: Failback,
    /// A recovered server must stay up this long before it is used again. Default 0s.
    #[serde(default)]
    pub failback_delay: Dur,
    /// When no server is eligible: `keep_last` (default) or `drop`.
    #[serde(default)]
    pub when_all_down: WhenAllDown,
    /// Upstreams with the same `node_group` front the same nodes: a host one of them
    /// sees down (or up again) is down (or up) for all of them. Default none.
    #[serde(default)]
    pub node_group: Option<String>,
    /// Active probing. Default: `tcp` every 1s, timeout 500ms, fall 1, rise 2.
    #[serde(default)]
    pub health: HealthConfig,
    /// ICMP unreachable / connection refused marks a server down at once. Default true.
    #[serde(default = "default_true")]
    pub passive: bool,
    /// Which passive failures mark the whole server down. Default `protocol`.
    #[serde(default)]
    pub passive_scope: PassiveScope,
    /// TCP connect timeout; a timeout is a passive failure. Default 1s.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Needed by `node/NAME` and `node/*` servers. Default none.
    #[serde(default)]
    pub kubernetes: Option<KubernetesRef>,
}

fn default_connect_timeout() -> Dur {
    Dur(Duration::from_secs(1))
}

/// `upstreams.NAME.kubernetes:` — the Service whose endpoints `node/…` servers refer to.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesRef {
    /// Required: namespace of the Service.
    pub namespace: String,
    /// Required: the Service whose EndpointSlices list the workers.
    pub service: String,
    /// Port to send traffic to; default: the listener's port.
    #[serde(default)]
    pub port: Option<u16>,
}

/// A server as written in a `primary` / `backup` list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ServerRef {
    /// `10.0.0.1:5004` or `[fd00::1]:5004`.
    Static(SocketAddr),
    /// `10.0.0.1`: the port is the listener's (or each port of its range).
    StaticIp(IpAddr),
    /// `janus.media.svc.cluster.local:5004` or a bare host name.
    Dns { host: String, port: Option<u16> },
    /// `node/NAME`: the ready endpoint on that node.
    Node(String),
    /// `node/*`: every other node with an endpoint, sorted by node name.
    AllNodes,
}

impl fmt::Display for ServerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerRef::Static(a) => write!(f, "{a}"),
            ServerRef::StaticIp(ip) => write!(f, "{ip}"),
            ServerRef::Dns {
                host,
                port: Some(p),
            } => write!(f, "{host}:{p}"),
            ServerRef::Dns { host, port: None } => write!(f, "{host}"),
            ServerRef::Node(n) => write!(f, "node/{n}"),
            ServerRef::AllNodes => write!(f, "node/*"),
        }
    }
}

impl std::str::FromStr for ServerRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty server address".to_string());
        }
        if let Some(node) = s.strip_prefix("node/") {
            return match node {
                "*" => Ok(ServerRef::AllNodes),
                "" => Err(format!("invalid server {s:?}: node name missing")),
                n if n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') =>
                {
                    Ok(ServerRef::Node(n.to_string()))
                }
                _ => Err(format!("invalid server {s:?}: bad node name")),
            };
        }
        if let Ok(sa) = s.parse::<SocketAddr>() {
            if sa.port() == 0 {
                return Err(format!("invalid server {s:?}: port 0"));
            }
            return Ok(ServerRef::Static(sa));
        }
        let unbracketed = s
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(ServerRef::StaticIp(ip));
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(format!("invalid server {s:?}: bad port {p:?}")),
                Ok(n) => (h, Some(n)),
            },
            None => (s, None),
        };
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
            // A name made only of digits and dots is a mistyped IP address, not a host name.
            && !host.chars().all(|c| c.is_ascii_digit() || c == '.');
        if !host_ok {
            return Err(format!("invalid server address {s:?}"));
        }
        Ok(ServerRef::Dns {
            host: host.to_string(),
            port,
        })
    }
}

impl<'de> Deserialize<'de> for ServerRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `discovery:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// Default: system resolver, TTL clamped to 1s..30s.
    #[serde(default)]
    pub dns: DnsConfig,
    /// Default: disabled.
    #[serde(default)]
    pub kubernetes: KubernetesDiscoveryConfig,
}

/// `discovery.dns:`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Default: the system resolver.
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
    /// Default 1s.
    #[serde(default = "default_min_ttl")]
    pub min_ttl: Dur,
    /// Default 30s.
    #[serde(default = "default_max_ttl")]
    pub max_ttl: Dur,
}

fn default_min_ttl() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_max_ttl() -> Dur {
    Dur(Duration::from_secs(30))
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            min_ttl: default_min_ttl(),
            max_ttl: default_max_ttl(),
        }
    }
}

/// `discovery.kubernetes:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct KubernetesDiscoveryConfig {
    /// Default false. In-cluster config, else KUBECONFIG.
    #[serde(default)]
    pub enabled: bool,
}

/// `shutdown:`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Default 30s.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Dur,
}

fn default_drain_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: default_drain_timeout(),
        }
    }
}
