//! Per-source caps of the TURN connection transports (TCP, TLS, DTLS): how many
//! connections and how many unfinished handshakes one client address may hold at once
//! (`turn.quota.max_connections_per_source`, `turn.quota.max_handshakes_per_source`), so
//! that one host cannot take every slot of the global caps.
//!
//! A source is an IPv4 address, or the /64 of an IPv6 address (one host usually holds a
//! whole /64). IPv4-mapped IPv6 addresses count as their IPv4 address. A count lives as
//! long as the [`SourceSlot`] that holds it; entries of sources with nothing held are
//! removed, so the table is never larger than what the global caps admit.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// The key a client address is counted under.
fn source_of(ip: IpAddr) -> IpAddr {
    match super::policy::canonical_ip(ip) {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Counts per source against one limit.
#[derive(Debug)]
pub(crate) struct SourceCounts {
    limit: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One unit held by a source; given back on drop.
#[derive(Debug)]
pub(crate) struct SourceSlot {
    counts: Arc<SourceCounts>,
    source: IpAddr,
}

impl SourceCounts {
    pub(crate) fn new(limit: usize) -> Arc<SourceCounts> {
        Arc::new(SourceCounts {
            limit,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// One more unit for the source of `ip`, or None when it already holds `limit`.
    pub(crate) fn take(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let source = source_of(ip);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(source).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            counts: Arc::clone(self),
            source,
        })
    }

    #[cfg(test)]
    fn sources(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self.counts.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.source);
            }
        }
    }
}

/// The per-source caps shared by every TCP, TLS and DTLS listener of the service.
#[derive(Debug, Clone)]
pub(crate) struct SourceLimits {
    /// Connections (TCP, TLS) and DTLS sessions per source.
    pub(crate) connections: Arc<SourceCounts>,
    /// Connections that have not yet sent their first complete STUN request (PROXY
    /// header, TLS handshake) and DTLS handshakes in flight, per source.
    pub(crate) handshakes: Arc<SourceCounts>,
}

/// Which per-source cap refused a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SourceRefusal {
    /// `max_connections_per_source`.
    Connections,
    /// `max_handshakes_per_source`.
    Handshakes,
}

impl SourceLimits {
    pub(crate) fn new(connections: usize, handshakes: usize) -> SourceLimits {
        SourceLimits {
            connections: SourceCounts::new(connections),
            handshakes: SourceCounts::new(handshakes),
        }
    }

    /// A new connection's places: among its source's connections, and among its
    /// unfinished handshakes.
    pub(crate) fn admit(&self, ip: IpAddr) -> Result<(SourceSlot, SourceSlot), SourceRefusal> {
        let conn = self
            .connections
            .take(ip)
            .ok_or(SourceRefusal::Connections)?;
        let hs = self.handshakes.take(ip).ok_or(SourceRefusal::Handshakes)?;
        Ok((conn, hs))
    }
}

impl Default for SourceLimits {
    fn default() -> Self {
        let q = crate::config::QuotaConfig::default();
        SourceLimits::new(q.max_connections_per_source, q.max_handshakes_per_source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_source_and_forgets_sources_with_nothing_held() {
        let c = SourceCounts::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let s1 = c.take(a).unwrap();
        let s2 = c.take("::ffff:10.0.0.1".parse().unwrap()).unwrap();
        assert!(c.take(a).is_none(), "a mapped address is the same source");
        assert!(c.take("10.0.0.2".parse().unwrap()).is_some());
        drop(s1);
        let s3 = c.take(a).unwrap();
        drop((s2, s3));
        assert_eq!(c.sources(), 0);
    }

    #[test]
    fn an_ipv6_source_is_its_slash_64() {
        let c = SourceCounts::new(1);
        let _s = c.take("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(c.take("2001:db8:1:2:ffff::9".parse().unwrap()).is_none());
        assert!(c.take("2001:db8:1:3::1".parse().unwrap()).is_some());
    }
}
