//! Per-source fairness for new UDP sessions: a token bucket of new sessions per source IP
//! (`session.new_per_source_per_second`) and a cap on one source's live sessions
//! (`session.max_per_source`), so that one source rotating its ports cannot take every
//! session of a listener and lock everyone else out.
//!
//! Each UDP worker thread keeps its own table (no lock, like its sessions) and enforces
//! its share of the limits: `limit / workers`, rounded up. The kernel spreads a source's
//! ports over the workers by 4-tuple hash, so a source with many ports (a corporate NAT,
//! or an attacker rotating ports) meets about the configured limit in total.
//!
//! Memory is bounded: an entry stays while its source has live sessions or its bucket is
//! refilling (one second), the idle sweep removes the rest, and a table never holds more
//! than [`MAX_SOURCES`] entries. A source that finds the table full shares one overflow
//! bucket with every other such source (spoofed floods from more addresses than that are
//! held by the fd budget and `max_sessions`, not here).

use std::collections::HashMap;
use std::net::IpAddr;

/// Entries per worker table (about 48 bytes each).
pub const MAX_SOURCES: usize = 16_384;

/// Why a new session was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source's bucket is empty.
    Rate,
    /// The source holds its share of `max_per_source` sessions.
    Sessions,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Tokens left, in thousandths of a session.
    milli_tokens: u64,
    /// When the bucket was last refilled, in the worker's ms clock.
    refilled_ms: u64,
    /// Live sessions of this source (only sessions admitted through this entry).
    live: u32,
}

/// Whether a session counts in its source's live sessions (and must be released there
/// when it closes): only with a `max_per_source`, and not through the overflow bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Tracked,
    Untracked,
}

/// One worker's per-source table.
#[derive(Debug)]
pub struct Sources {
    /// New sessions per second per source for this worker (0: no rate limit).
    rate: u64,
    /// Live sessions per source for this worker (0: no limit).
    max_live: u32,
    map: HashMap<IpAddr, Entry>,
    overflow: Entry,
}

impl Sources {
    /// Limits of the whole listener, split over `workers` threads.
    pub fn new(per_second: u32, max_per_source: usize, workers: usize) -> Sources {
        let workers = workers.max(1) as u64;
        let rate = u64::from(per_second).div_ceil(workers);
        let max_live = (max_per_source as u64)
            .div_ceil(workers)
            .min(u64::from(u32::MAX)) as u32;
        Sources {
            rate,
            max_live,
            map: HashMap::new(),
            overflow: Entry {
                milli_tokens: rate * 1000,
                refilled_ms: 0,
                live: 0,
            },
        }
    }

    /// Whether a new session of `ip` may open at `now_ms`; on success the source's
    /// token is taken and its live count raised (give it back with [`Sources::closed`]).
    pub fn admit(&mut self, ip: IpAddr, now_ms: u64) -> Result<Admission, Refusal> {
        if self.rate == 0 && self.max_live == 0 {
            return Ok(Admission::Untracked);
        }
        let full = self.rate * 1000;
        let room = self.map.len() < MAX_SOURCES;
        let (entry, admission) = if room || self.map.contains_key(&ip) {
            let e = self.map.entry(ip).or_insert(Entry {
                milli_tokens: full,
                refilled_ms: now_ms,
                live: 0,
            });
            (e, Admission::Tracked)
        } else {
            (&mut self.overflow, Admission::Untracked)
        };
        if admission == Admission::Tracked && self.max_live > 0 && entry.live >= self.max_live {
            return Err(Refusal::Sessions);
        }
        if self.rate > 0 {
            let elapsed = now_ms.saturating_sub(entry.refilled_ms);
            entry.milli_tokens = (entry.milli_tokens + elapsed * self.rate).min(full);
            entry.refilled_ms = now_ms;
            if entry.milli_tokens < 1000 {
                return Err(Refusal::Rate);
            }
            entry.milli_tokens -= 1000;
        }
        if admission == Admission::Tracked && self.max_live > 0 {
            entry.live += 1;
            return Ok(Admission::Tracked);
        }
        Ok(Admission::Untracked)
    }

    /// A session admitted as `admission` closed.
    pub fn closed(&mut self, ip: IpAddr, admission: Admission) {
        if admission == Admission::Tracked
            && let Some(e) = self.map.get_mut(&ip)
        {
            e.live = e.live.saturating_sub(1);
        }
    }

    /// Forgets sources with no live session whose bucket is full again.
    pub fn sweep(&mut self, now_ms: u64) {
        self.map
            .retain(|_, e| e.live > 0 || now_ms.saturating_sub(e.refilled_ms) < 1000);
    }

    /// Sources in the table.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x7f00_0000 + n))
    }

    #[test]
    fn a_source_gets_its_rate_and_others_are_not_affected() {
        let mut s = Sources::new(10, 0, 1);
        let admitted = (0..100).filter(|_| s.admit(ip(1), 0).is_ok()).count();
        assert_eq!(admitted, 10, "one second's worth at once");
        assert_eq!(s.admit(ip(1), 0), Err(Refusal::Rate));
        assert!(
            s.admit(ip(2), 0).is_ok(),
            "another source is not locked out"
        );
        // 500 ms refill 5 sessions.
        let later = (0..100).filter(|_| s.admit(ip(1), 500).is_ok()).count();
        assert_eq!(later, 5);
    }

    #[test]
    fn live_sessions_per_source_are_capped_and_released() {
        let mut s = Sources::new(0, 3, 1);
        for _ in 0..3 {
            assert_eq!(s.admit(ip(1), 0), Ok(Admission::Tracked));
        }
        assert_eq!(s.admit(ip(1), 0), Err(Refusal::Sessions));
        s.closed(ip(1), Admission::Tracked);
        assert!(s.admit(ip(1), 0).is_ok());
    }

    #[test]
    fn limits_are_split_over_workers() {
        let s = Sources::new(200, 10_000, 3);
        assert_eq!((s.rate, s.max_live), (67, 3334));
    }

    #[test]
    fn the_table_is_bounded_and_swept() {
        let mut s = Sources::new(1, 0, 1);
        for n in 0..(MAX_SOURCES as u32 + 1000) {
            let _ = s.admit(ip(n), 0);
        }
        assert_eq!(s.len(), MAX_SOURCES);
        // Sources beyond the table share the overflow bucket: one new session per second.
        let overflow = (0..10)
            .filter(|i| s.admit(ip(MAX_SOURCES as u32 + 2000 + i), 0).is_ok())
            .count();
        assert_eq!(
            overflow, 0,
            "the overflow bucket was emptied by the first extra sources"
        );
        s.sweep(500);
        assert_eq!(s.len(), MAX_SOURCES, "buckets still refilling are kept");
        s.sweep(1000);
        assert!(s.is_empty());
    }

    #[test]
    fn entries_with_live_sessions_survive_the_sweep() {
        let mut s = Sources::new(0, 10, 1);
        s.admit(ip(1), 0).unwrap();
        s.sweep(60_000);
        assert_eq!(s.len(), 1);
        s.closed(ip(1), Admission::Tracked);
        s.sweep(60_000);
        assert!(s.is_empty());
    }
}
