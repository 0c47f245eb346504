//! Peer policy: who the TURN relay may send to ("no open relay").
//!
//! `relay.peers` lists `upstreams` (the IP of every server of every upstream, any port),
//! `self` (relayed addresses of other allocations on this gateway: headless mode) and
//! CIDRs. Some addresses are refused even when `upstreams` or a broad CIDR covers them:
//! loopback, link-local (with the cloud metadata addresses), unspecified, multicast,
//! broadcast and the admin listener. Such an address is allowed only when a CIDR names it
//! explicitly, i.e. the CIDR lies inside that special range (`127.0.0.1/32` opens
//! 127.0.0.1, `0.0.0.0/0` does not); the admin listener (its port on its address, or on
//! any host address when it binds the wildcard) only by a host route (`/32`, `/128`).
//!
//! No loops: the gateway's own ports are never relay targets unless `self` is listed — the
//! TURN listeners (registered by the service once bound), the relay port range on the relay
//! address, every `listeners[]` entry of the proxy (UDP and TCP) and the admin port. An own
//! port bound to a specific IP matches that IP; one bound to the wildcard (`0.0.0.0`, `::`)
//! matches every address of this host (interface addresses, re-read every 30 s by the
//! service; loopback and the unspecified address always count). The advertised
//! `public_address` (when it is an IP: a NAT or load balancer in front of this host)
//! matches every own port whatever address it binds. `self` opens exactly the relayed
//! addresses of live allocations (relay-to-relay between two clients of this gateway,
//! headless mode) and nothing else: the TURN listeners, free relay ports and proxy
//! listeners stay loops whatever else the list holds (`[upstreams, self, 10.0.0.0/8]` with
//! the gateway at 10.x does not open them). Refusals of own ports are [`Verdict::Loop`].
//!
//! The read side is lock-free for the upstream list (arc-swap); the control plane calls
//! [`PeerPolicy::set_upstream_ips`] whenever upstream server lists change.

use arc_swap::ArcSwap;
use ipnet::IpNet;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use crate::config::{ListenerConfig, RelayConfig};

/// Why [`PeerPolicy::verdict`] allows or refuses a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The peer may be relayed to.
    Allowed,
    /// Outside `relay.peers` (or a special-purpose address).
    Refused,
    /// One of the gateway's own ports (TURN listener, relay range, proxy listener, admin):
    /// relaying there would loop through the gateway.
    Loop,
}

/// A port range of the gateway itself; `ip` unspecified = every host address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OwnPorts {
    ip: IpAddr,
    first: u16,
    last: u16,
}

/// Decides whether a relay may exchange datagrams with a peer address.
#[derive(Debug)]
pub struct PeerPolicy {
    upstreams_enabled: bool,
    self_enabled: bool,
    cidrs: Vec<IpNet>,
    admin: SocketAddr,
    /// Host addresses, used for own ports bound to the unspecified address.
    local_ips: ArcSwap<HashSet<IpAddr>>,
    /// Addresses that reach this host from outside (the advertised `public_address`):
    /// every own port counts there, whatever address it binds.
    public_ips: ArcSwap<HashSet<IpAddr>>,
    /// The relay range and the proxy listeners (replaced by `set_proxy_listeners`).
    own_ports: ArcSwap<Vec<OwnPorts>>,
    /// TURN listeners, registered once bound (their ports may be 0 in the config).
    turn_ports: ArcSwap<Vec<OwnPorts>>,
    relay_ports: Vec<OwnPorts>,
    upstream_ips: ArcSwap<HashSet<IpAddr>>,
    /// Advertised relayed addresses of live allocations (for `self`).
    own_relays: RwLock<HashSet<SocketAddr>>,
}

/// Special-purpose ranges that are refused unless a CIDR inside them is configured.
fn special_range(ip: IpAddr) -> Option<IpNet> {
    const V4: &[(Ipv4Addr, u8)] = &[
        (Ipv4Addr::new(0, 0, 0, 0), 8), // "this network", includes unspecified
        (Ipv4Addr::new(127, 0, 0, 0), 8), // loopback
        (Ipv4Addr::new(169, 254, 0, 0), 16), // link-local, cloud metadata 169.254.169.254
        (Ipv4Addr::new(224, 0, 0, 0), 4), // multicast
        (Ipv4Addr::new(255, 255, 255, 255), 32), // limited broadcast
    ];
    const V6: &[(Ipv6Addr, u8)] = &[
        (Ipv6Addr::UNSPECIFIED, 128),
        (Ipv6Addr::LOCALHOST, 128),
        (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10), // link-local
        (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),  // multicast
        (Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254), 128), // AWS metadata (IPv6)
    ];
    match ip {
        IpAddr::V4(v4) => V4.iter().find_map(|&(net, len)| {
            let n = IpNet::new(IpAddr::V4(net), len).ok()?;
            n.contains(&IpAddr::V4(v4)).then_some(n)
        }),
        IpAddr::V6(v6) => V6.iter().find_map(|&(net, len)| {
            let n = IpNet::new(IpAddr::V6(net), len).ok()?;
            n.contains(&IpAddr::V6(v6)).then_some(n)
        }),
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are judged as the IPv4 address they carry.
pub(crate) fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical_ip(addr.ip()), addr.port())
}

fn host_addresses() -> HashSet<IpAddr> {
    let mut set = HashSet::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for ifa in addrs {
            let Some(sa) = ifa.address else { continue };
            if let Some(v4) = sa.as_sockaddr_in() {
                set.insert(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = sa.as_sockaddr_in6() {
                set.insert(canonical_ip(IpAddr::V6(v6.ip())));
            }
        }
    }
    set
}

impl PeerPolicy {
    /// Builds the policy from `turn.relay`, the admin listener address and the proxy's
    /// `listeners[]` (own ports that relays must not reach).
    pub fn new(
        relay: &RelayConfig,
        admin_listen: SocketAddr,
        proxy_listeners: &[ListenerConfig],
    ) -> Result<Self, String> {
        let mut upstreams_enabled = false;
        let mut self_enabled = false;
        let mut cidrs = Vec::new();
        for (i, entry) in relay.peers.iter().enumerate() {
            let e = entry.trim();
            match e {
                "upstreams" => upstreams_enabled = true,
                "self" => self_enabled = true,
                _ => {
                    let net = e
                        .parse::<IpNet>()
                        .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                        .map_err(|_| {
                            format!(
                                "turn.relay.peers[{i}]: invalid entry {entry:?} \
                                 (expected upstreams, self or a CIDR such as 10.0.0.0/8)"
                            )
                        })?;
                    let net = match net {
                        IpNet::V6(v6) if v6.addr().to_ipv4_mapped().is_some() => {
                            return Err(format!(
                                "turn.relay.peers[{i}]: write IPv4-mapped range {entry:?} as IPv4"
                            ));
                        }
                        n => n.trunc(),
                    };
                    cidrs.push(net);
                }
            }
        }
        let relay_ports: Vec<OwnPorts> = relay
            .address
            .iter()
            .map(|ip| OwnPorts {
                ip: canonical_ip(ip),
                first: relay.port_range.first,
                last: relay.port_range.last,
            })
            .collect();
        let policy = PeerPolicy {
            upstreams_enabled,
            self_enabled,
            cidrs,
            admin: canonical(admin_listen),
            local_ips: ArcSwap::from_pointee(host_addresses()),
            public_ips: ArcSwap::from_pointee(HashSet::new()),
            own_ports: ArcSwap::from_pointee(Vec::new()),
            turn_ports: ArcSwap::from_pointee(Vec::new()),
            relay_ports,
            upstream_ips: ArcSwap::from_pointee(HashSet::new()),
            own_relays: RwLock::new(HashSet::new()),
        };
        policy.set_proxy_listeners(proxy_listeners);
        Ok(policy)
    }

    /// Replaces the proxy listeners whose ports relays must not reach (call on reload).
    pub fn set_proxy_listeners(&self, listeners: &[ListenerConfig]) {
        let mut v = self.relay_ports.clone();
        v.extend(listeners.iter().map(|l| OwnPorts {
            ip: canonical_ip(l.listen.ip),
            first: l.listen.first_port,
            last: l.listen.last_port,
        }));
        self.own_ports.store(Arc::new(v));
    }

    /// Records a bound TURN listener (its actual port) as an own port.
    pub(crate) fn register_listener(&self, addr: SocketAddr) {
        let addr = canonical(addr);
        let mut v = Vec::clone(&self.turn_ports.load());
        v.push(OwnPorts {
            ip: addr.ip(),
            first: addr.port(),
            last: addr.port(),
        });
        self.turn_ports.store(Arc::new(v));
    }

    /// Adds addresses that reach this host without being on an interface (the advertised
    /// `public_address` behind a NAT or a load balancer): own ports count there whatever
    /// address they bind.
    pub(crate) fn add_public_ips(&self, ips: impl IntoIterator<Item = IpAddr>) {
        let mut set = HashSet::clone(&self.public_ips.load());
        set.extend(ips.into_iter().map(canonical_ip));
        self.public_ips.store(Arc::new(set));
    }

    /// Re-reads the host's interface addresses (the service calls it every 30 s).
    pub(crate) fn refresh_host_ips(&self) {
        self.local_ips.store(Arc::new(host_addresses()));
    }

    /// Whether `ip` is an address of this host (for wildcard-bound own ports).
    fn is_host_ip(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || ip.is_unspecified() || self.local_ips.load().contains(&ip)
    }

    fn own_port_matches(&self, o: &OwnPorts, peer: SocketAddr) -> bool {
        let port = peer.port();
        if port < o.first || port > o.last {
            return false;
        }
        if self.public_ips.load().contains(&peer.ip()) {
            return true;
        }
        if o.ip.is_unspecified() {
            self.is_host_ip(peer.ip())
        } else {
            o.ip == peer.ip()
        }
    }

    /// Whether `peer` is one of the gateway's own ports (besides the admin listener).
    fn is_own_port(&self, peer: SocketAddr) -> bool {
        self.own_ports
            .load()
            .iter()
            .chain(self.turn_ports.load().iter())
            .any(|o| self.own_port_matches(o, peer))
    }

    /// Replaces the set of upstream server IPs (called whenever upstream lists change).
    pub fn set_upstream_ips(&self, ips: impl IntoIterator<Item = IpAddr>) {
        let set: HashSet<IpAddr> = ips.into_iter().map(canonical_ip).collect();
        self.upstream_ips.store(Arc::new(set));
    }

    /// Whether datagrams may be relayed to (and accepted from) `peer`.
    pub fn allows(&self, peer: SocketAddr) -> bool {
        self.verdict(peer) == Verdict::Allowed
    }

    /// Whether `peer` is allowed, and if not, whether because it is an own port.
    pub fn verdict(&self, peer: SocketAddr) -> Verdict {
        let peer = canonical(peer);
        // `self` names the relayed addresses of live allocations and nothing else; every
        // other own port (TURN listeners, free relay ports, proxy listeners) stays a loop
        // whatever CIDR covers this host's addresses.
        if self.self_enabled && self.is_own_relay(peer) {
            return Verdict::Allowed;
        }
        if self.is_own_port(peer) {
            return Verdict::Loop;
        }
        let admin = self.is_admin(peer);
        match self.allows_address(peer, admin) {
            true => Verdict::Allowed,
            false if admin => Verdict::Loop,
            false => Verdict::Refused,
        }
    }

    fn allows_address(&self, peer: SocketAddr, admin: bool) -> bool {
        let ip = peer.ip();
        let special = special_range(ip);
        if special.is_some() || admin {
            return self.cidrs.iter().any(|c| {
                c.contains(&ip)
                    && if admin {
                        // Only a host route names the admin listener's address.
                        c.prefix_len() == c.max_prefix_len()
                    } else {
                        // The CIDR must lie inside the special range to name it.
                        special.is_some_and(|range| c.prefix_len() >= range.prefix_len())
                    }
            });
        }
        if self.cidrs.iter().any(|c| c.contains(&ip)) {
            return true;
        }
        self.upstreams_enabled && self.upstream_ips.load().contains(&ip)
    }

    fn is_admin(&self, peer: SocketAddr) -> bool {
        if peer.port() != self.admin.port() {
            return false;
        }
        let ip = peer.ip();
        if self.admin.ip().is_unspecified() {
            self.is_host_ip(ip)
        } else {
            ip == self.admin.ip()
        }
    }

    fn is_own_relay(&self, peer: SocketAddr) -> bool {
        match self.own_relays.read() {
            Ok(set) => set.contains(&peer),
            Err(poisoned) => poisoned.into_inner().contains(&peer),
        }
    }

    /// Records a relayed address of this gateway (for `self`).
    pub(crate) fn register_relay(&self, addr: SocketAddr) {
        let mut set = self.own_relays.write().unwrap_or_else(|p| p.into_inner());
        set.insert(canonical(addr));
    }

    /// Forgets a relayed address when its allocation ends.
    pub(crate) fn unregister_relay(&self, addr: SocketAddr) {
        let mut set = self.own_relays.write().unwrap_or_else(|p| p.into_inner());
        set.remove(&canonical(addr));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(peers: &[&str], admin: &str) -> PeerPolicy {
        let relay = RelayConfig {
            peers: peers.iter().map(|s| s.to_string()).collect(),
            ..RelayConfig::default()
        };
        PeerPolicy::new(&relay, admin.parse().unwrap(), &[]).unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_policy_refuses_everything_until_upstreams_are_known() {
        let p = policy(&["upstreams"], "127.0.0.1:8086");
        assert!(!p.allows(sa("10.0.0.1:5004")));
        p.set_upstream_ips(["10.0.0.1".parse().unwrap()]);
        assert!(p.allows(sa("10.0.0.1:5004")));
        assert!(
            p.allows(sa("10.0.0.1:40000")),
            "any port of an upstream server"
        );
        assert!(!p.allows(sa("10.0.0.2:5004")));
        p.set_upstream_ips(["10.0.0.2".parse().unwrap()]);
        assert!(
            !p.allows(sa("10.0.0.1:5004")),
            "the list follows the upstreams"
        );
        assert!(p.allows(sa("10.0.0.2:5004")));
    }

    #[test]
    fn special_addresses_need_an_explicit_cidr() {
        let p = policy(&["upstreams", "0.0.0.0/0", "::/0"], "127.0.0.1:8086");
        p.set_upstream_ips([
            "127.0.0.1".parse().unwrap(),
            "169.254.169.254".parse().unwrap(),
        ]);
        for refused in [
            "127.0.0.1:3480",
            "127.5.5.5:1",
            "169.254.169.254:80",
            "0.0.0.0:9",
            "224.0.0.1:5000",
            "255.255.255.255:9",
            "[::1]:9",
            "[::]:9",
            "[fe80::1]:9",
            "[ff02::1]:9",
            "[fd00:ec2::254]:80",
            "[::ffff:127.0.0.1]:9",
            "[::ffff:169.254.169.254]:80",
        ] {
            assert!(!p.allows(sa(refused)), "{refused} must be refused");
        }
        assert!(
            p.allows(sa("8.8.8.8:3478")),
            "broad CIDR allows ordinary addresses"
        );
        assert!(p.allows(sa("[2001:db8::1]:3478")));
    }

    #[test]
    fn explicit_cidr_opens_a_special_address() {
        let p = policy(&["127.0.0.1/32", "169.254.169.254"], "127.0.0.1:8086");
        assert!(p.allows(sa("127.0.0.1:3480")));
        assert!(p.allows(sa("[::ffff:127.0.0.1]:3480")));
        assert!(!p.allows(sa("127.0.0.2:3480")));
        assert!(p.allows(sa("169.254.169.254:80")));
    }

    #[test]
    fn admin_listener_is_refused() {
        let p = policy(&["10.0.0.0/8"], "10.1.2.3:8086");
        assert!(!p.allows(sa("10.1.2.3:8086")));
        assert!(p.allows(sa("10.1.2.3:8087")));
        let p = policy(&["10.0.0.0/8", "10.1.2.3/32"], "10.1.2.3:8086");
        assert!(
            p.allows(sa("10.1.2.3:8086")),
            "a host route names the admin address"
        );

        let p = policy(&["127.0.0.0/8"], "0.0.0.0:8086");
        assert!(
            !p.allows(sa("127.0.0.1:8086")),
            "wildcard admin covers loopback"
        );
        assert!(p.allows(sa("127.0.0.1:8087")));
    }

    #[test]
    fn self_allows_only_live_relays() {
        let p = policy(&["self"], "127.0.0.1:8086");
        let relay = sa("127.0.0.1:50000");
        assert!(!p.allows(relay));
        p.register_relay(relay);
        assert!(p.allows(relay));
        assert!(!p.allows(sa("127.0.0.1:50001")));
        p.unregister_relay(relay);
        assert!(!p.allows(relay));
    }

    fn listener(listen: &str, protocol: crate::config::Protocol) -> ListenerConfig {
        ListenerConfig {
            name: "l".into(),
            protocol,
            listen: listen.parse().unwrap(),
            upstream: "u".into(),
            session: Default::default(),
            max_connections: 10_000,
            offload: Default::default(),
            proxy_protocol: None,
            accept_proxy_protocol: false,
            trusted_proxies: Vec::new(),
        }
    }

    #[test]
    fn own_ports_are_loops_unless_self() {
        use crate::config::{PortRange, Protocol};
        let relay = RelayConfig {
            address: "127.0.0.1".parse().unwrap(),
            port_range: PortRange {
                first: 40000,
                last: 40099,
            },
            peers: vec!["127.0.0.0/8".into(), "10.0.0.0/8".into()],
            ..RelayConfig::default()
        };
        let proxy = [
            listener("127.0.0.1:5000-5009", Protocol::Udp),
            listener("0.0.0.0:6000", Protocol::Tcp),
        ];
        let p = PeerPolicy::new(&relay, sa("127.0.0.1:8086"), &proxy).unwrap();
        p.register_listener(sa("0.0.0.0:3478"));
        p.add_public_ips(["10.9.9.9".parse().unwrap()]);
        for own in [
            "127.0.0.1:40000", // relay range on the relay address
            "127.0.0.1:40099", //
            "127.0.0.1:5004",  // UDP proxy listener range
            "127.0.0.2:6000",  // wildcard TCP proxy listener: loopback counts
            "10.9.9.9:6000",   // … and every host address
            "127.0.0.1:3478",  // wildcard TURN listener
            "[::ffff:127.0.0.1]:3478",
            "127.0.0.1:8086", // admin
        ] {
            assert_eq!(p.verdict(sa(own)), Verdict::Loop, "{own}");
        }
        for other in [
            "127.0.0.1:40100",
            "127.0.0.2:40000", // the relay binds 127.0.0.1 only
            "127.0.0.2:5004",
            "10.1.1.1:6000", // not a host address: another host's port 6000
            "10.1.1.1:3478",
            "127.0.0.1:5010",
        ] {
            assert_eq!(p.verdict(sa(other)), Verdict::Allowed, "{other}");
        }
        assert_eq!(p.verdict(sa("192.0.2.1:3478")), Verdict::Refused);

        // Reloaded listeners replace the old ones; the relay range stays.
        p.set_proxy_listeners(&[listener("127.0.0.1:7000", Protocol::Udp)]);
        assert_eq!(p.verdict(sa("127.0.0.1:5004")), Verdict::Allowed);
        assert_eq!(p.verdict(sa("127.0.0.1:7000")), Verdict::Loop);
        assert_eq!(p.verdict(sa("127.0.0.1:40000")), Verdict::Loop);

        // `self` opens live relayed addresses only: the other own ports stay loops even
        // with a CIDR covering the gateway's addresses.
        let relay = RelayConfig {
            peers: vec!["upstreams".into(), "self".into(), "127.0.0.0/8".into()],
            ..relay
        };
        let p = PeerPolicy::new(&relay, sa("127.0.0.1:8086"), &proxy).unwrap();
        p.register_listener(sa("0.0.0.0:3478"));
        p.register_relay(sa("127.0.0.1:40007"));
        assert!(
            p.allows(sa("127.0.0.1:40007")),
            "a live relay of this gateway"
        );
        for own in [
            "127.0.0.1:5004",  // UDP proxy listener
            "127.0.0.2:6000",  // TCP proxy listener (wildcard)
            "127.0.0.1:3478",  // TURN listener
            "127.0.0.1:40000", // a free relay port
            "127.0.0.1:8086",  // admin
        ] {
            assert_eq!(p.verdict(sa(own)), Verdict::Loop, "{own} with self");
        }
        p.unregister_relay(sa("127.0.0.1:40007"));
        assert_eq!(p.verdict(sa("127.0.0.1:40007")), Verdict::Loop);
        assert!(p.allows(sa("127.0.0.1:7777")), "other loopback ports");
    }

    #[test]
    fn bad_entries_are_errors() {
        let relay = RelayConfig {
            peers: vec!["upstreams".into(), "everyone".into()],
            ..RelayConfig::default()
        };
        let err = PeerPolicy::new(&relay, sa("127.0.0.1:8086"), &[]).unwrap_err();
        assert!(err.contains("turn.relay.peers[1]"), "{err}");
        assert!(err.contains("everyone"), "{err}");
    }
}
