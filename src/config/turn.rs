//! `turn:` — the gateway's own STUN/TURN service: listeners, credentials, relay ports and
//! the ICE configuration endpoint.

use super::values::{Dur, Protocol};
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// `turn:` — the gateway's own STUN/TURN service.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TurnConfig {
    /// Default `mediagate`.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Required: advertised in ICE configurations; an IP or a host name, no port, or a
    /// list of two (dual stack: an IPv4 and an IPv6 address).
    pub public_address: PublicAddresses,
    /// Required, at least one.
    pub listeners: Vec<TurnListenerConfig>,
    /// Required.
    pub auth: TurnAuthConfig,
    /// Default: bind 0.0.0.0, ports 49152-65535, peers `[upstreams]`.
    #[serde(default)]
    pub relay: RelayConfig,
    /// Default: 10 allocations per user, 10000 in all, 4096 TCP connections.
    #[serde(default)]
    pub quota: QuotaConfig,
    /// `GET /ice` settings. Default: no CORS origins, no separate token.
    #[serde(default)]
    pub ice: IceHttpConfig,
}

/// `turn.ice:` — how `GET /ice` may be reached.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct IceHttpConfig {
    /// Origins (`https://app.example.com`, or `*`) allowed to fetch `/ice` from a page
    /// (CORS); the preflight `OPTIONS /ice` is answered for them. Default none.
    #[serde(default)]
    pub cors_origins: Vec<String>,
    /// When set, `/ice` also accepts `Authorization: Bearer <this token>` (the admin token
    /// still works), so `/ice` can be exposed without exposing the admin API. Default none.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding `token` (one line), re-read when it changes. Default none.
    #[serde(default)]
    pub token_file: Option<String>,
}

fn default_realm() -> String {
    "mediagate".to_string()
}

/// `turn.listeners[]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TurnListenerConfig {
    /// Required: `udp`, `tcp`, `tls` (TURN over TLS over TCP, `turns:`) or `dtls` (TURN
    /// over DTLS over UDP, `turns:…?transport=udp`).
    pub protocol: TurnTransport,
    /// Required: `ip:port`.
    pub listen: SocketAddr,
    /// tls/dtls: PEM certificate chain file (re-read when it changes). Required for tls
    /// and dtls; on a tcp listener, the port also serves TLS (told apart by the first
    /// byte of each connection). Default none.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// tls/dtls (and tcp with `cert`): PEM private key file (re-read when it changes).
    /// Required with `cert` (dtls: an ECDSA P-256 or Ed25519 key). Default none.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// tcp/tls: every connection must start with a PROXY protocol v2 header, whose source
    /// address is then the client address (quota, nonces, XOR-MAPPED-ADDRESS). Default false.
    #[serde(default)]
    pub accept_proxy_protocol: bool,
    /// With `accept_proxy_protocol`: the CIDRs (or addresses) of the load balancers that
    /// may send the header; a connection from elsewhere is refused and counted. Required
    /// with `accept_proxy_protocol`.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

/// `turn.listeners[].protocol`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TurnTransport {
    /// STUN/TURN over UDP.
    Udp,
    /// STUN/TURN over TCP.
    Tcp,
    /// STUN/TURN over TLS over TCP (`turns:`).
    Tls,
    /// STUN/TURN over DTLS over UDP (`turns:…?transport=udp`, RFC 7350).
    Dtls,
}

impl TurnTransport {
    /// The socket protocol underneath.
    pub fn base(self) -> Protocol {
        match self {
            TurnTransport::Udp | TurnTransport::Dtls => Protocol::Udp,
            TurnTransport::Tcp | TurnTransport::Tls => Protocol::Tcp,
        }
    }
}

impl fmt::Display for TurnTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TurnTransport::Udp => "udp",
            TurnTransport::Tcp => "tcp",
            TurnTransport::Tls => "tls",
            TurnTransport::Dtls => "dtls",
        })
    }
}

/// `turn.auth.type`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TurnAuthType {
    /// Fixed long-term credentials from `users`.
    Static,
    /// TURN REST API credentials derived from `secret`.
    Ephemeral,
}

/// `turn.auth:`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TurnAuthConfig {
    /// Required: `static` or `ephemeral`.
    #[serde(rename = "type")]
    pub kind: TurnAuthType,
    /// ephemeral: shared secret (coturn `static-auth-secret`). Default none.
    #[serde(default)]
    pub secret: Option<String>,
    /// ephemeral: several shared secrets for rotation; the first signs `/ice` credentials,
    /// every one verifies. Exclusive with `secret`. Default empty.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// ephemeral: a file with the secret, or several (one a line, as `secrets`), re-read
    /// when it changes. Exclusive with `secret` and `secrets`. Default none.
    #[serde(default)]
    pub secret_file: Option<String>,
    /// ephemeral: lifetime of credentials handed out by /ice. Default 24h.
    #[serde(default = "default_ttl")]
    pub ttl: Dur,
    /// static: the users. Default empty.
    #[serde(default)]
    pub users: Vec<TurnUser>,
}

impl TurnAuthConfig {
    /// The ephemeral secrets in order (`secret` alone, else `secrets`); the first signs.
    pub fn all_secrets(&self) -> Vec<&str> {
        match &self.secret {
            Some(s) => vec![s.as_str()],
            None => self.secrets.iter().map(String::as_str).collect(),
        }
    }
}

fn default_ttl() -> Dur {
    Dur(Duration::from_secs(24 * 3600))
}

/// `turn.auth.users[]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TurnUser {
    /// Required, non-empty, unique.
    pub username: String,
    /// Required, non-empty.
    pub password: String,
}

/// `turn.relay:`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Where relay sockets bind: one address, or a list of at most one IPv4 and one IPv6
    /// address (dual stack). Default 0.0.0.0.
    #[serde(default = "default_relay_address")]
    pub address: RelayAddresses,
    /// Default 49152-65535.
    #[serde(default = "default_port_range")]
    pub port_range: PortRange,
    /// `upstreams`, `self`, or CIDRs. Default `[upstreams]`.
    #[serde(default = "default_peers")]
    pub peers: Vec<String>,
    /// Receive buffer of each relay socket, bytes (0: the OS default). Default 1 MiB.
    #[serde(default = "default_relay_recv_buffer")]
    pub recv_buffer: usize,
    /// Receive and send buffer of each UDP listener socket, bytes (0: the OS default).
    /// Default 4 MiB.
    #[serde(default = "default_listener_buffer")]
    pub listener_buffer: usize,
    /// Threads serving the UDP listeners and their allocations' relay sockets (each UDP
    /// listener binds one `SO_REUSEPORT` socket per thread); 0: one per CPU. At most 64.
    /// Default 0.
    #[serde(default)]
    pub threads: usize,
    /// Send a run of equal-sized frames for one UDP client as one segmented send
    /// (`UDP_SEGMENT`, generic segmentation offload) instead of one datagram each.
    /// Default true.
    #[serde(default = "super::values::default_true")]
    pub udp_gso: bool,
    /// `ebpf`: the kernel fast path relays the channel data of UDP allocations. Default
    /// `none`.
    #[serde(default)]
    pub offload: super::values::Offload,
    /// Receive and send buffer of each TURN-over-TCP/TLS connection, bytes (0: the
    /// kernel's autotuning). Default 64 KiB.
    #[serde(default = "default_tcp_buffer")]
    pub tcp_buffer: usize,
    /// The family of an allocation's relayed address when its Allocate names none
    /// (no REQUESTED-ADDRESS-FAMILY). Default `ipv4` (RFC 8656 §7.2).
    #[serde(default)]
    pub default_family: DefaultFamily,
}

/// `turn.relay.default_family` (coturn's `allocation-default-address-family`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DefaultFamily {
    /// IPv4, as RFC 8656 says.
    #[default]
    Ipv4,
    /// IPv6.
    Ipv6,
    /// The family the client reached the gateway over (an IPv4-mapped address counts as
    /// IPv4): browsers never send REQUESTED-ADDRESS-FAMILY, so an IPv6-only client of a
    /// gateway that relays IPv6 gets an IPv6 relay.
    Keep,
}

impl DefaultFamily {
    /// Whether an Allocate from `client` that names no family gets an IPv4 relay.
    pub fn ipv4_for(self, client: SocketAddr) -> bool {
        match self {
            DefaultFamily::Ipv4 => true,
            DefaultFamily::Ipv6 => false,
            DefaultFamily::Keep => match client.ip() {
                IpAddr::V4(_) => true,
                IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
            },
        }
    }
}

fn default_relay_recv_buffer() -> usize {
    1 << 20
}

fn default_tcp_buffer() -> usize {
    64 << 10
}

fn default_listener_buffer() -> usize {
    4 << 20
}

fn default_relay_address() -> RelayAddresses {
    RelayAddresses {
        v4: Some(IpAddr::from([0, 0, 0, 0])),
        v6: None,
    }
}

/// `turn.relay.address`: where relay sockets bind, at most one address per family. An
/// allocation's relayed address is of the family its Allocate asks for (RFC 8656
/// REQUESTED-ADDRESS-FAMILY, IPv4 by default); a dual allocation (ADDITIONAL-ADDRESS-FAMILY)
/// takes one of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayAddresses {
    /// The IPv4 relay address, if IPv4 is relayed.
    pub v4: Option<IpAddr>,
    /// The IPv6 relay address, if IPv6 is relayed.
    pub v6: Option<IpAddr>,
}

impl RelayAddresses {
    /// The relay address of a family (`ipv4`: IPv4, else IPv6), if configured.
    pub fn family(&self, ipv4: bool) -> Option<IpAddr> {
        if ipv4 { self.v4 } else { self.v6 }
    }

    /// The configured addresses, IPv4 first.
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.v4.into_iter().chain(self.v6)
    }

    /// Builds from a list: one or two addresses, at most one per family.
    pub fn from_list(ips: &[IpAddr]) -> Result<Self, String> {
        let mut out = RelayAddresses { v4: None, v6: None };
        if ips.is_empty() {
            return Err("expected an IP address or a list of one IPv4 and one IPv6 address".into());
        }
        for ip in ips {
            let slot = if ip.is_ipv4() {
                &mut out.v4
            } else {
                &mut out.v6
            };
            if slot.is_some() {
                return Err(format!(
                    "two {} addresses (at most one per family)",
                    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
                ));
            }
            *slot = Some(*ip);
        }
        Ok(out)
    }
}

impl From<IpAddr> for RelayAddresses {
    /// One address: its family only.
    fn from(ip: IpAddr) -> Self {
        RelayAddresses {
            v4: Some(ip).filter(|ip| ip.is_ipv4()),
            v6: Some(ip).filter(|ip| ip.is_ipv6()),
        }
    }
}

impl std::str::FromStr for RelayAddresses {
    type Err = String;
    /// One address, or one of each family separated by a comma.
    fn from_str(s: &str) -> Result<Self, String> {
        let ips = s
            .split(',')
            .map(|t| {
                t.trim()
                    .parse::<IpAddr>()
                    .map_err(|_| format!("invalid IP address {t:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        RelayAddresses::from_list(&ips)
    }
}

impl std::fmt::Display for RelayAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let all: Vec<String> = self.iter().map(|ip| ip.to_string()).collect();
        match all.as_slice() {
            [one] => f.write_str(one),
            _ => write!(f, "[{}]", all.join(", ")),
        }
    }
}

/// A YAML string or a list of strings, as the entries of a list (`expecting` names what
/// was expected in the error of anything else).
fn one_or_list<'de, D: Deserializer<'de>>(
    d: D,
    expecting: &'static str,
) -> Result<Vec<String>, D::Error> {
    struct V(&'static str);
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![v.to_string()])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(s) = seq.next_element::<String>()? {
                out.push(s);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V(expecting))
}

impl<'de> Deserialize<'de> for RelayAddresses {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let texts = one_or_list(
            d,
            "an IP address or a list of one IPv4 and one IPv6 address",
        )?;
        let mut ips = Vec::new();
        for t in &texts {
            let ip: IpAddr = t
                .trim()
                .parse()
                .map_err(|_| serde::de::Error::custom(format!("invalid IP address {t:?}")))?;
            ips.push(ip);
        }
        RelayAddresses::from_list(&ips).map_err(serde::de::Error::custom)
    }
}

/// `turn.public_address`: where clients reach the TURN listeners, as advertised by `/ice`:
/// one IP address or host name, or two (an IPv4 and an IPv6 address of a dual-stack
/// gateway, so that clients of either family get a server URL they can use). Checked by
/// the validator (`validate.rs`), which reports each entry with its own message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicAddresses(pub Vec<String>);

impl PublicAddresses {
    /// The entries, in the configured order.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        self.0.iter().map(String::as_str)
    }

    /// The entries that are IP addresses.
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.iter().filter_map(|a| a.parse().ok())
    }
}

impl From<&str> for PublicAddresses {
    fn from(s: &str) -> Self {
        PublicAddresses(vec![s.to_string()])
    }
}

impl fmt::Display for PublicAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => f.write_str(one),
            all => write!(f, "[{}]", all.join(", ")),
        }
    }
}

impl<'de> Deserialize<'de> for PublicAddresses {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        one_or_list(
            d,
            "an IP address or host name, or a list of an IPv4 and an IPv6 address",
        )
        .map(PublicAddresses)
    }
}

fn default_port_range() -> PortRange {
    PortRange {
        first: 49152,
        last: 65535,
    }
}
fn default_peers() -> Vec<String> {
    vec!["upstreams".to_string()]
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            address: default_relay_address(),
            port_range: default_port_range(),
            peers: default_peers(),
            recv_buffer: default_relay_recv_buffer(),
            listener_buffer: default_listener_buffer(),
            threads: 0,
            udp_gso: true,
            offload: super::values::Offload::None,
            tcp_buffer: default_tcp_buffer(),
            default_family: DefaultFamily::Ipv4,
        }
    }
}

/// An inclusive port range `first-last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port (never 0).
    pub first: u16,
    /// Last port, inclusive (`>= first`).
    pub last: u16,
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid port range {s:?} (expected first-last)");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 || first > last {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `turn.quota:`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// Allocations plus EVEN-PORT reserved ports one username may hold. Default 10.
    #[serde(default = "default_allocations_per_user")]
    pub allocations_per_user: usize,
    /// Allocations plus reserved ports over all users; beyond it Allocate gets 508. Clipped
    /// to the size of `turn.relay.port_range` (each holds one relay port). Default 10000.
    #[serde(default = "default_max_allocations")]
    pub max_allocations: usize,
    /// Concurrent TURN-over-TCP connections over all TCP listeners; further connections
    /// are closed at once and counted. Default 4096.
    #[serde(default = "default_max_tcp_connections")]
    pub max_tcp_connections: usize,
    /// Concurrent DTLS sessions (handshaking or established) over all `dtls` listeners;
    /// datagrams that would open more are dropped and counted. Default 4096.
    #[serde(default = "default_max_dtls_sessions")]
    pub max_dtls_sessions: usize,
    /// TURN-over-TCP/TLS connections plus DTLS sessions one source (an IPv4 address, an
    /// IPv6 /64) may hold at once; more are refused and counted. Default 256.
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: usize,
    /// Connections of one source that have not yet sent their first complete STUN
    /// message (TLS handshake, PROXY header) plus its DTLS handshakes in flight. Default 16.
    #[serde(default = "default_max_handshakes_per_source")]
    pub max_handshakes_per_source: usize,
    /// Within this time of accept a TCP/TLS connection must have sent its first complete
    /// STUN message (PROXY header and TLS handshake included), and a DTLS client must
    /// answer the HelloVerifyRequest; else it is closed and counted. Default 5 s.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: Dur,
}

fn default_max_connections_per_source() -> usize {
    256
}

fn default_max_handshakes_per_source() -> usize {
    16
}

fn default_handshake_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}

fn default_max_dtls_sessions() -> usize {
    4096
}

fn default_allocations_per_user() -> usize {
    10
}
fn default_max_allocations() -> usize {
    10_000
}
fn default_max_tcp_connections() -> usize {
    4096
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            allocations_per_user: default_allocations_per_user(),
            max_allocations: default_max_allocations(),
            max_tcp_connections: default_max_tcp_connections(),
            max_dtls_sessions: default_max_dtls_sessions(),
            max_connections_per_source: default_max_connections_per_source(),
            max_handshakes_per_source: default_max_handshakes_per_source(),
            handshake_timeout: default_handshake_timeout(),
        }
    }
}
