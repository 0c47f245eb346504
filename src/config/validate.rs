//! Semantic checks of a parsed [`Config`]: everything serde cannot see, such as
//! names that must match, addresses that must not collide and settings that only make
//! sense together. Plain synchronous code; every problem is reported, not just the first.
//!
//! Deliberate choices, as operators should know them:
//! - `health.timeout` may equal `interval` (the original contract called `timeout >= interval` an error):
//!   probes of one server run one after another, so a probe that uses its whole interval
//!   never overlaps the next one. Only `timeout > interval` is refused.
//! - `log.level` is a level (`trace`..`error`, or `off`) or an EnvFilter-style list of
//!   `target=level` directives, e.g. `info,mediagate::health=debug`.
//! - Names of listeners and upstreams are limited to letters, digits, `.`, `-` and `_`,
//!   as they appear in metrics labels and in admin URLs (`/upstreams/NAME/...`).

use super::health::HealthType;
use super::turn::{TurnAuthType, TurnTransport};
use super::types::{Config, ListenAddr, Protocol, ServerRef, UpstreamConfig};
use super::yaml::{index_path, key_path};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// One semantic problem: the key path it concerns and what is wrong. The loader adds the
/// file position of that path (or of its nearest written ancestor, for a default value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Key path, e.g. `upstreams.janus-rtp.health.timeout` or `listeners[1].listen`.
    pub path: String,
    /// What is wrong, readable on its own after the path.
    pub message: String,
}

/// Every semantic problem of `cfg`, in the order the checks find them (empty: valid).
pub fn validate(cfg: &Config) -> Vec<Issue> {
    let mut v = Checker { issues: Vec::new() };
    v.admin(cfg);
    v.log(cfg);
    v.listeners(cfg);
    v.upstreams(cfg);
    v.turn(cfg);
    v.addresses(cfg);
    v.discovery(cfg);
    v.cluster(cfg);
    v.events(cfg);
    v.issues
}

pub(super) struct Checker {
    pub(super) issues: Vec<Issue>,
}

const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

impl Checker {
    pub(super) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue {
            path: path.into(),
            message: message.into(),
        });
    }

    fn positive(&mut self, path: String, d: std::time::Duration) {
        if d.is_zero() {
            self.push(path, "must be longer than 0s");
        }
    }

    fn at_least_one(&mut self, path: String, n: u64) {
        if n == 0 {
            self.push(path, "must be at least 1");
        }
    }

    fn name(&mut self, path: String, name: &str) {
        if name.is_empty() {
            self.push(path, "the name is empty");
        } else if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            self.push(
                path,
                format!("invalid name {name:?} (use letters, digits, '.', '-' and '_')"),
            );
        }
    }

    fn admin(&mut self, cfg: &Config) {
        self.at_least_one(
            "admin.max_connections".to_string(),
            cfg.admin.max_connections as u64,
        );
        self.positive(
            "admin.header_read_timeout".to_string(),
            cfg.admin.header_read_timeout.get(),
        );
        if cfg.admin.listen.port() == 0 {
            self.push("admin.listen", "port 0 is not allowed");
        }
        if cfg.admin.token.as_deref() == Some("") {
            self.push(
                "admin.token",
                "the token is empty (remove the key to leave the POST endpoints open)",
            );
        }
    }

    fn log(&mut self, cfg: &Config) {
        let level = cfg.log.level.trim();
        let valid = !level.is_empty()
            && level.split(',').all(|directive| {
                let directive = directive.trim();
                let lvl = match directive.rsplit_once('=') {
                    Some((target, lvl)) if !target.trim().is_empty() => lvl,
                    Some(_) => return false,
                    None => directive,
                };
                LOG_LEVELS.contains(&lvl.trim().to_ascii_lowercase().as_str())
            });
        if !valid {
            self.push(
                "log.level",
                format!(
                    "invalid log level {:?} (expected one of: trace, debug, info, warn, error, off; \
                     or directives such as info,mediagate=debug)",
                    cfg.log.level
                ),
            );
        }
    }

    fn listeners(&mut self, cfg: &Config) {
        if cfg.listeners.is_empty() && cfg.turn.is_none() {
            self.push(
                "listeners",
                "no listeners and no turn section: there is nothing to serve",
            );
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, l) in cfg.listeners.iter().enumerate() {
            let path = index_path("listeners", i);
            self.name(key_path(&path, "name"), &l.name);
            if let Some(first) = names.get(l.name.as_str()) {
                self.push(
                    key_path(&path, "name"),
                    format!(
                        "duplicate listener name {:?} (also listeners[{first}])",
                        l.name
                    ),
                );
            } else {
                names.insert(&l.name, i);
            }
            if !cfg.upstreams.contains_key(&l.upstream) {
                let known: Vec<&str> = cfg.upstreams.keys().map(String::as_str).collect();
                let hint = if known.is_empty() {
                    "no upstreams are defined".to_string()
                } else {
                    format!("defined: {}", known.join(", "))
                };
                self.push(
                    key_path(&path, "upstream"),
                    format!("unknown upstream {:?} ({hint})", l.upstream),
                );
            }
            let session = key_path(&path, "session");
            self.positive(
                key_path(&session, "idle_timeout"),
                l.session.idle_timeout.get(),
            );
            self.at_least_one(
                key_path(&session, "max_sessions"),
                l.session.max_sessions as u64,
            );
            self.at_least_one(key_path(&path, "max_connections"), l.max_connections as u64);
            if l.offload != super::types::Offload::None && l.protocol != Protocol::Udp {
                self.push(
                    key_path(&path, "offload"),
                    "offload: ebpf is only for UDP listeners",
                );
            }
            if l.protocol == Protocol::Udp {
                if l.proxy_protocol.is_some() {
                    self.push(
                        key_path(&path, "proxy_protocol"),
                        "PROXY protocol is only sent on tcp listeners",
                    );
                }
                if l.accept_proxy_protocol {
                    self.push(
                        key_path(&path, "accept_proxy_protocol"),
                        "PROXY protocol is only accepted on tcp listeners",
                    );
                }
            }
            self.trusted_proxies(
                &path,
                l.accept_proxy_protocol && l.protocol == Protocol::Tcp,
                &l.trusted_proxies,
            );
        }
    }

    fn upstreams(&mut self, cfg: &Config) {
        for (name, up) in &cfg.upstreams {
            let path = key_path("upstreams", name);
            self.name(path.clone(), name);
            if up.primary.is_empty() && up.backup.is_empty() {
                self.push(
                    path.clone(),
                    "no servers (primary and backup are both empty)",
                );
            }
            self.positive(key_path(&path, "connect_timeout"), up.connect_timeout.get());
            self.servers(cfg, name, up, &path);
            self.health(up, &key_path(&path, "health"));
        }
    }

    fn servers(&mut self, cfg: &Config, name: &str, up: &UpstreamConfig, path: &str) {
        let users: Vec<(usize, &super::types::ListenerConfig)> = cfg
            .listeners
            .iter()
            .enumerate()
            .filter(|(_, l)| l.upstream == name)
            .collect();
        let range_user = users
            .iter()
            .find(|(_, l)| l.listen.first_port != l.listen.last_port);

        if let Some(k) = &up.kubernetes {
            let kpath = key_path(path, "kubernetes");
            if k.namespace.is_empty() {
                self.push(key_path(&kpath, "namespace"), "the namespace is empty");
            }
            if k.service.is_empty() {
                self.push(key_path(&kpath, "service"), "the service name is empty");
            }
            match (k.port, range_user) {
                (Some(0), _) => self.push(key_path(&kpath, "port"), "port 0 is not allowed"),
                (Some(p), Some((i, l))) => self.push(
                    key_path(&kpath, "port"),
                    format!(
                        "port {p} conflicts with listeners[{i}] {:?}, whose port range {} \
                         forwards each port to the same port on the server; remove the port",
                        l.name, l.listen
                    ),
                ),
                _ => {}
            }
        }

        let mut seen: HashMap<&ServerRef, String> = HashMap::new();
        let tiers = [("primary", &up.primary), ("backup", &up.backup)];
        for (tier, list) in tiers {
            for (j, server) in list.iter().enumerate() {
                let spath = index_path(&key_path(path, tier), j);
                let short = index_path(tier, j);
                if let Some(first) = seen.get(server) {
                    self.push(
                        spath.clone(),
                        format!("duplicate server {server} (also {first})"),
                    );
                } else {
                    seen.insert(server, short);
                }
                let is_node = matches!(server, ServerRef::Node(_) | ServerRef::AllNodes);
                if is_node && up.kubernetes.is_none() {
                    self.push(
                        spath.clone(),
                        format!(
                            "{server} needs a kubernetes block (namespace, service) in upstream {name:?}"
                        ),
                    );
                }
                if is_node && !cfg.discovery.kubernetes.enabled {
                    self.push(
                        spath.clone(),
                        format!("{server} needs discovery.kubernetes.enabled: true"),
                    );
                }
                let has_port = match server {
                    ServerRef::Static(_) | ServerRef::Dns { port: Some(_), .. } => true,
                    ServerRef::StaticIp(_) | ServerRef::Dns { port: None, .. } => false,
                    ServerRef::Node(_) | ServerRef::AllNodes => {
                        up.kubernetes.as_ref().is_some_and(|k| k.port.is_some())
                    }
                };
                if !has_port && users.is_empty() {
                    self.push(
                        spath.clone(),
                        format!(
                            "server {server} has no port, and no listener uses upstream \
                             {name:?} to supply one"
                        ),
                    );
                }
                let explicit = matches!(
                    server,
                    ServerRef::Static(_) | ServerRef::Dns { port: Some(_), .. }
                );
                if let (true, Some((i, l))) = (explicit, range_user) {
                    self.push(
                        spath,
                        format!(
                            "server {server} has a port, but listeners[{i}] {:?} listens on \
                             the port range {}, which forwards each port to the same port on \
                             the server; remove the port",
                            l.name, l.listen
                        ),
                    );
                }
            }
        }
    }

    /// `trusted_proxies`: CIDRs or addresses, required with `accept_proxy_protocol`.
    fn trusted_proxies(&mut self, path: &str, accept: bool, list: &[String]) {
        if accept && list.is_empty() {
            self.push(
                key_path(path, "trusted_proxies"),
                "accept_proxy_protocol takes the client address from whoever sends the header: \
                 list the load balancers that may send it (CIDRs, as nginx's set_real_ip_from)",
            );
        }
        if !accept && !list.is_empty() {
            self.push(
                key_path(path, "trusted_proxies"),
                "only with accept_proxy_protocol: true",
            );
        }
        for (i, entry) in list.iter().enumerate() {
            if entry.parse::<ipnet::IpNet>().is_err() && entry.parse::<std::net::IpAddr>().is_err()
            {
                self.push(
                    index_path(&key_path(path, "trusted_proxies"), i),
                    format!("{entry:?} is not a CIDR or an IP address"),
                );
            }
        }
    }

    fn health(&mut self, up: &UpstreamConfig, path: &str) {
        let h = &up.health;
        let interval = h.interval.get();
        let timeout = h.timeout.get();
        self.positive(key_path(path, "interval"), interval);
        self.positive(key_path(path, "timeout"), timeout);
        if timeout > interval && !interval.is_zero() {
            self.push(
                key_path(path, "timeout"),
                format!(
                    "timeout {} is longer than interval {} (a probe must finish before the next one)",
                    h.timeout, h.interval
                ),
            );
        }
        self.at_least_one(key_path(path, "fall"), u64::from(h.fall));
        self.at_least_one(key_path(path, "rise"), u64::from(h.rise));
        if h.confirm > 10 {
            self.push(
                key_path(path, "confirm"),
                format!("{} confirmation probes is too many (at most 10)", h.confirm),
            );
        }
        if h.confirm_interval.get() > interval && !interval.is_zero() {
            self.push(
                key_path(path, "confirm_interval"),
                format!(
                    "confirm_interval {} is longer than interval {}",
                    h.confirm_interval, h.interval
                ),
            );
        }
        if h.port == Some(0) {
            self.push(key_path(path, "port"), "port 0 is not allowed");
        }
        match h.kind {
            HealthType::Http => {
                if !h.path.starts_with('/') {
                    self.push(
                        key_path(path, "path"),
                        format!("the HTTP path must start with \"/\" (got {:?})", h.path),
                    );
                }
                if !(100..=599).contains(&h.expect_status) {
                    self.push(
                        key_path(path, "expect_status"),
                        format!("{} is not an HTTP status (100-599)", h.expect_status),
                    );
                }
                if let Some(name) = &h.tls_server_name
                    && let Err(why) = crate::tlsclient::server_name(name)
                {
                    self.push(key_path(path, "tls_server_name"), why);
                }
            }
            HealthType::Udp if h.send.is_empty() => {
                self.push(
                    key_path(path, "send"),
                    "the probe payload is empty (a UDP probe must send something)",
                );
            }
            _ => {}
        }
    }

    fn events(&mut self, cfg: &Config) {
        for (i, h) in cfg.events.webhooks.iter().enumerate() {
            match super::events::parse_url(&h.url) {
                Err(e) => self.push(key_path(&index_path("events.webhooks", i), "url"), e),
                Ok(u) if !u.tls && h.ca.is_some() => self.push(
                    key_path(&index_path("events.webhooks", i), "ca"),
                    "only for https:// URLs",
                ),
                Ok(_) => {}
            }
        }
    }

    fn cluster(&mut self, cfg: &Config) {
        let Some(c) = &cfg.cluster else { return };
        if c.secret.is_empty() && c.secret_file.is_none() {
            self.push("cluster.secret", "required (or cluster.secret_file)");
        } else if c.secret.len() < 16 {
            self.push("cluster.secret", "the secret must be at least 16 bytes");
        }
        if c.listen.port() == 0 {
            self.push("cluster.listen", "a port is required");
        }
        if c.listen.ip().is_unspecified() && c.advertise.is_none() {
            self.push(
                "cluster.advertise",
                "required when cluster.listen is a wildcard address (peers must know where to reach this replica, e.g. ${POD_IP}:7946)",
            );
        }
        for (i, p) in c.peers.iter().enumerate() {
            let ok = p
                .rsplit_once(':')
                .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok_and(|x| x > 0));
            if !ok {
                self.push(
                    index_path("cluster.peers", i),
                    format!("{p:?} is not host:port"),
                );
            }
        }
        if c.peer_timeout.get() < c.gossip_interval.get() * 2 {
            self.push(
                "cluster.peer_timeout",
                "must be at least twice cluster.gossip_interval",
            );
        }
    }

    fn turn(&mut self, cfg: &Config) {
        let Some(turn) = &cfg.turn else { return };
        if turn.realm.is_empty() {
            self.push("turn.realm", "the realm is empty");
        }
        self.public_addresses(&turn.public_address);
        if turn.listeners.is_empty() {
            self.push("turn.listeners", "no TURN listeners (add at least one)");
        }
        for (i, l) in turn.listeners.iter().enumerate() {
            let path = index_path("turn.listeners", i);
            if l.listen.port() == 0 {
                self.push(key_path(&path, "listen"), "port 0 is not allowed");
            }
            let tls = matches!(l.protocol, TurnTransport::Tls | TurnTransport::Dtls);
            if l.protocol == TurnTransport::Tcp && l.cert.is_some() != l.key.is_some() {
                self.push(
                    path.clone(),
                    "a tcp listener that also serves TLS needs both cert and key",
                );
            }
            for (key, value) in [("cert", &l.cert), ("key", &l.key)] {
                match value {
                    None if tls => self.push(
                        key_path(&path, key),
                        format!("a {} listener needs {key} (a PEM file path)", l.protocol),
                    ),
                    Some(_) if l.protocol == TurnTransport::Udp => self.push(
                        key_path(&path, key),
                        format!("{key} is only used with protocol tcp, tls or dtls"),
                    ),
                    Some(p) if p.as_os_str().is_empty() => {
                        self.push(key_path(&path, key), "the path is empty")
                    }
                    _ => {}
                }
            }
            let takes_headers = matches!(l.protocol, TurnTransport::Tcp | TurnTransport::Tls);
            self.trusted_proxies(
                &path,
                l.accept_proxy_protocol && takes_headers,
                &l.trusted_proxies,
            );
            if l.accept_proxy_protocol
                && matches!(l.protocol, TurnTransport::Udp | TurnTransport::Dtls)
            {
                self.push(
                    key_path(&path, "accept_proxy_protocol"),
                    "PROXY protocol is only accepted on tcp and tls listeners",
                );
            }
        }
        for (i, o) in turn.ice.cors_origins.iter().enumerate() {
            let ok = o == "*"
                || ((o.starts_with("https://") || o.starts_with("http://"))
                    && !o.ends_with('/')
                    && o.split_once("://")
                        .is_some_and(|(_, h)| !h.is_empty() && !h.contains('/'))
                    && !o.chars().any(|c| c.is_whitespace() || c.is_control()));
            if !ok {
                self.push(
                    index_path("turn.ice.cors_origins", i),
                    format!(
                        "invalid origin {o:?} (expected scheme://host[:port] without a path, or *)"
                    ),
                );
            }
        }
        if turn.ice.token.as_deref() == Some("") {
            self.push("turn.ice.token", "the token is empty");
        }
        if turn.ice.token.is_some() && turn.ice.token == cfg.admin.token {
            self.push(
                "turn.ice.token",
                "the /ice token must differ from admin.token (it is handed to web pages)",
            );
        }

        let auth = &turn.auth;
        match auth.kind {
            TurnAuthType::Ephemeral => {
                match auth.secret.as_deref() {
                    None if auth.secrets.is_empty() => self.push(
                        "turn.auth.secret",
                        "auth type ephemeral needs a secret (or secrets)",
                    ),
                    None => {}
                    Some("") => self.push("turn.auth.secret", "the secret is empty"),
                    Some(_) if !auth.secrets.is_empty() => self.push(
                        "turn.auth.secrets",
                        "set either secret or secrets, not both (secret is a one-element secrets)",
                    ),
                    Some(_) => {}
                }
                for (i, s) in auth.secrets.iter().enumerate() {
                    if s.is_empty() {
                        self.push(index_path("turn.auth.secrets", i), "the secret is empty");
                    }
                }
                self.positive("turn.auth.ttl".to_string(), auth.ttl.get());
                if !auth.users.is_empty() {
                    self.push(
                        "turn.auth.users",
                        "users are only used with auth type static (remove them, or set type: static)",
                    );
                }
            }
            TurnAuthType::Static => {
                if auth.users.is_empty() {
                    self.push(
                        "turn.auth.users",
                        "auth type static needs at least one user",
                    );
                }
                if auth.secret.is_some() || !auth.secrets.is_empty() {
                    self.push(
                        "turn.auth.secret",
                        "a secret is only used with auth type ephemeral (remove it, or set type: ephemeral)",
                    );
                }
                let mut names: HashMap<&str, usize> = HashMap::new();
                for (i, u) in auth.users.iter().enumerate() {
                    let upath = index_path("turn.auth.users", i);
                    if u.username.is_empty() {
                        self.push(key_path(&upath, "username"), "the username is empty");
                    } else if let Some(first) = names.get(u.username.as_str()) {
                        self.push(
                            key_path(&upath, "username"),
                            format!(
                                "duplicate user {:?} (also turn.auth.users[{first}])",
                                u.username
                            ),
                        );
                    } else {
                        names.insert(&u.username, i);
                    }
                    if u.password.is_empty() {
                        self.push(key_path(&upath, "password"), "the password is empty");
                    }
                }
            }
        }

        for (i, peer) in turn.relay.peers.iter().enumerate() {
            let ok = matches!(peer.as_str(), "upstreams" | "self")
                || peer.parse::<ipnet::IpNet>().is_ok()
                || peer.parse::<IpAddr>().is_ok();
            if !ok {
                self.push(
                    index_path("turn.relay.peers", i),
                    format!(
                        "invalid peer {peer:?} (expected upstreams, self, an IP address or a CIDR)"
                    ),
                );
            }
        }
        self.at_least_one(
            "turn.quota.allocations_per_user".to_string(),
            turn.quota.allocations_per_user as u64,
        );
        self.at_least_one(
            "turn.quota.max_allocations".to_string(),
            turn.quota.max_allocations as u64,
        );
        self.at_least_one(
            "turn.quota.max_tcp_connections".to_string(),
            turn.quota.max_tcp_connections as u64,
        );
        self.at_least_one(
            "turn.quota.max_dtls_sessions".to_string(),
            turn.quota.max_dtls_sessions as u64,
        );
        self.at_least_one(
            "turn.quota.max_connections_per_source".to_string(),
            turn.quota.max_connections_per_source as u64,
        );
        self.at_least_one(
            "turn.quota.max_handshakes_per_source".to_string(),
            turn.quota.max_handshakes_per_source as u64,
        );
        self.positive(
            "turn.quota.handshake_timeout".to_string(),
            turn.quota.handshake_timeout.0,
        );
    }

    /// One or two entries; two only as one IPv4 and one IPv6 address.
    fn public_addresses(&mut self, addrs: &crate::config::PublicAddresses) {
        const PATH: &str = "turn.public_address";
        let n = addrs.0.len();
        if n == 0 || n > 2 {
            self.push(
                PATH,
                format!("{n} addresses: give one IP address or host name, or an IPv4 and an IPv6 address"),
            );
            return;
        }
        for a in addrs.iter() {
            self.public_address(a);
        }
        if n == 2 {
            let ips: Vec<IpAddr> = addrs.ips().collect();
            if ips.len() != 2 || ips[0].is_ipv4() == ips[1].is_ipv4() {
                self.push(
                    PATH,
                    format!("{addrs}: two entries must be an IPv4 and an IPv6 address (one host name with both A and AAAA records serves both families alone)"),
                );
            }
        }
    }

    fn public_address(&mut self, addr: &str) {
        const PATH: &str = "turn.public_address";
        if addr.is_empty() {
            self.push(PATH, "the public address is empty");
            return;
        }
        match addr.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() => self.push(
                PATH,
                format!("{addr} is not an address clients can reach (use the public IP)"),
            ),
            Ok(_) => {}
            Err(_) if is_host_name(addr) => {}
            Err(_) => self.push(
                PATH,
                format!("invalid public address {addr:?} (expected an IP address or a host name, without a port)"),
            ),
        }
    }

    /// Sockets this process binds must not collide, within one protocol: a UDP and a TCP
    /// socket may share a port. Each clash is reported once, at the later of the two.
    fn addresses(&mut self, cfg: &Config) {
        struct Bound {
            path: String,
            label: String,
            protocol: Protocol,
            addr: ListenAddr,
        }
        let single = |a: SocketAddr| ListenAddr {
            ip: a.ip(),
            first_port: a.port(),
            last_port: a.port(),
        };
        let mut bound = vec![Bound {
            path: "admin.listen".to_string(),
            label: "admin.listen".to_string(),
            protocol: Protocol::Tcp,
            addr: single(cfg.admin.listen),
        }];
        for (i, l) in cfg.listeners.iter().enumerate() {
            let path = index_path("listeners", i);
            bound.push(Bound {
                label: format!("{path} {:?}", l.name),
                path: key_path(&path, "listen"),
                protocol: l.protocol,
                addr: l.listen,
            });
        }
        if let Some(turn) = &cfg.turn {
            for (i, l) in turn.listeners.iter().enumerate() {
                let path = index_path("turn.listeners", i);
                bound.push(Bound {
                    label: path.clone(),
                    path: key_path(&path, "listen"),
                    protocol: l.protocol.base(),
                    addr: single(l.listen),
                });
            }
            // Relay sockets are UDP and take ports from this range at run time.
            let r = &turn.relay;
            for ip in r.address.iter() {
                bound.push(Bound {
                    path: "turn.relay.port_range".to_string(),
                    label: "turn.relay.port_range".to_string(),
                    protocol: Protocol::Udp,
                    addr: ListenAddr {
                        ip,
                        first_port: r.port_range.first,
                        last_port: r.port_range.last,
                    },
                });
            }
        }
        for (j, b) in bound.iter().enumerate() {
            let clash = bound[..j]
                .iter()
                .find(|a| a.protocol == b.protocol && a.path != b.path && a.addr.overlaps(&b.addr));
            if let Some(a) = clash {
                self.push(
                    b.path.clone(),
                    format!(
                        "{} {} overlaps {} {} of {}",
                        b.protocol, b.addr, a.protocol, a.addr, a.label
                    ),
                );
            }
        }
    }

    fn discovery(&mut self, cfg: &Config) {
        let dns = &cfg.discovery.dns;
        for (i, ns) in dns.nameservers.iter().enumerate() {
            if ns.port() == 0 {
                self.push(
                    index_path("discovery.dns.nameservers", i),
                    "port 0 is not allowed",
                );
            }
        }
        self.positive("discovery.dns.min_ttl".to_string(), dns.min_ttl.get());
        if dns.min_ttl > dns.max_ttl {
            self.push(
                "discovery.dns.min_ttl",
                format!(
                    "min_ttl {} is longer than max_ttl {}",
                    dns.min_ttl, dns.max_ttl
                ),
            );
        }
    }
}

/// RFC 1123 host name; a dotted run of digits is a mistyped IP, not a name.
fn is_host_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
        && !s.chars().all(|c| c.is_ascii_digit() || c == '.')
}
