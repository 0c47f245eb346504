//! Which protocols' passive failures speak for a server (`upstreams.NAME.passive_scope`):
//! a refused TCP connect must not fail over the UDP media of the same address when UDP
//! is what the upstream is really about, and the other way round.

use super::health::HealthType;
use super::types::{Config, PassiveScope, Protocol, UpstreamConfig};

/// The protocols whose passive failures mark a server of one upstream down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProtocolSet {
    pub udp: bool,
    pub tcp: bool,
}

impl ProtocolSet {
    pub const BOTH: ProtocolSet = ProtocolSet {
        udp: true,
        tcp: true,
    };

    pub fn contains(&self, p: Protocol) -> bool {
        match p {
            Protocol::Udp => self.udp,
            Protocol::Tcp => self.tcp,
        }
    }
}

/// The protocols whose passive failures mark a server of upstream `name` down.
///
/// `passive: false`: none. `passive_scope: server`: both. `protocol` (the default): the
/// protocol of the upstream's listeners when they all use one; when UDP and TCP listeners
/// share the upstream, the protocol of its health probe (`none` probes: both).
pub fn authoritative_protocols(config: &Config, name: &str, u: &UpstreamConfig) -> ProtocolSet {
    if !u.passive {
        return ProtocolSet::default();
    }
    if u.passive_scope == PassiveScope::Server {
        return ProtocolSet::BOTH;
    }
    let mut used = ProtocolSet::default();
    for l in config.listeners.iter().filter(|l| l.upstream == name) {
        match l.protocol {
            Protocol::Udp => used.udp = true,
            Protocol::Tcp => used.tcp = true,
        }
    }
    if used != ProtocolSet::BOTH {
        // One protocol (or no listener yet): its failures are the server's failures.
        return if used == ProtocolSet::default() {
            ProtocolSet::BOTH
        } else {
            used
        };
    }
    match u.health.kind {
        HealthType::Udp | HealthType::Stun => ProtocolSet {
            udp: true,
            tcp: false,
        },
        HealthType::Tcp | HealthType::Http => ProtocolSet {
            udp: false,
            tcp: true,
        },
        HealthType::None => ProtocolSet::BOTH,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(yaml: &str) -> ProtocolSet {
        let c = crate::config::load_str(yaml, "t.yaml").expect("valid");
        let u = &c.upstreams["u"];
        authoritative_protocols(&c, "u", u)
    }

    const UDP: ProtocolSet = ProtocolSet {
        udp: true,
        tcp: false,
    };
    const TCP: ProtocolSet = ProtocolSet {
        udp: false,
        tcp: true,
    };

    fn mixed(extra: &str) -> String {
        format!(
            "listeners:\n  - {{ name: a, protocol: udp, listen: 127.0.0.1:5000, upstream: u }}\n  - {{ name: b, protocol: tcp, listen: 127.0.0.1:5000, upstream: u }}\nupstreams:\n  u:\n    primary: [127.0.0.1:6000]\n{extra}"
        )
    }

    #[test]
    fn one_protocol_upstreams_count_their_own_failures() {
        let udp_only = "listeners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5000, upstream: u }\nupstreams:\n  u:\n    primary: [127.0.0.1:6000]\n    health: { type: tcp }\n";
        assert_eq!(of(udp_only), UDP);
        let tcp_only = udp_only.replace("protocol: udp", "protocol: tcp");
        assert_eq!(of(&tcp_only), TCP);
    }

    #[test]
    fn mixed_upstreams_follow_the_probe() {
        assert_eq!(of(&mixed("    health: { type: udp }\n")), UDP);
        assert_eq!(of(&mixed("    health: { type: stun }\n")), UDP);
        assert_eq!(of(&mixed("    health: { type: tcp }\n")), TCP);
        assert_eq!(
            of(&mixed("    health: { type: none }\n")),
            ProtocolSet::BOTH
        );
    }

    #[test]
    fn scope_server_and_passive_off() {
        assert_eq!(
            of(&mixed(
                "    health: { type: udp }\n    passive_scope: server\n"
            )),
            ProtocolSet::BOTH
        );
        assert_eq!(
            of(&mixed("    health: { type: udp }\n    passive: false\n")),
            ProtocolSet::default()
        );
    }
}
