//! Admin states shared by the replicas (`a/<upstream>/<server>` keys, `cluster.state_file`,
//! `cluster.state_configmap`): which operator action wins, as pure functions.
//!
//! Every action carries a Lamport version: a replica that takes an action stamps it one
//! above the highest version it knows for that server, so an action always supersedes
//! every action its replica had seen, whatever the clocks say. Only actions taken
//! concurrently (the same version, on replicas that had not heard of each other's) are
//! ordered by time, then node id, then state. Times and versions are clamped where they
//! come in (state file, ConfigMap, peers): a time at most [`MAX_SKEW`] ahead of this
//! replica's clock, a version at most [`MAX_VERSION`]. A replica keeps the action it
//! holds while it is the winner (the same version, origin and state), so a clamped time
//! that creeps forward with the clock never makes it re-adopt, re-apply or re-write it.

use crate::upstream::AdminState;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// How far ahead of this replica's clock a stored or received time may be.
pub const MAX_SKEW: Duration = Duration::from_secs(1);

/// Highest version taken in (4 billion operator actions on one server).
pub const MAX_VERSION: u64 = u32::MAX as u64;

/// An admin state with the stamp of the action that set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamped {
    /// Lamport version (absent in files written before it existed: 0).
    #[serde(default)]
    pub version: u64,
    pub at_ms: u64,
    pub state: AdminState,
    pub origin: String,
}

/// `cluster.state_file`: upstream → server → stamped admin state.
pub type StateFile = BTreeMap<String, BTreeMap<String, Stamped>>;

impl Stamped {
    /// The gossip value: `<version> <unix ms> <state> <origin>`.
    pub fn encode(&self) -> String {
        format!(
            "{} {} {} {}",
            self.version,
            self.at_ms,
            self.state.as_str(),
            self.origin
        )
    }

    /// A gossip value as sent (not clamped yet).
    pub fn decode(s: &str) -> Option<Stamped> {
        let mut it = s.splitn(4, ' ');
        Some(Stamped {
            version: it.next()?.parse().ok()?,
            at_ms: it.next()?.parse().ok()?,
            state: it.next()?.parse().ok()?,
            origin: it.next()?.to_string(),
        })
    }

    /// Taken in at `now_ms`: time at most [`MAX_SKEW`] ahead, version at most
    /// [`MAX_VERSION`].
    pub fn clamped(mut self, now_ms: u64) -> Stamped {
        self.at_ms = self
            .at_ms
            .min(now_ms.saturating_add(MAX_SKEW.as_millis() as u64));
        self.version = self.version.min(MAX_VERSION);
        self
    }

    /// The same operator action (its time may have been clamped since).
    pub fn same_action(&self, other: &Stamped) -> bool {
        self.version == other.version && self.origin == other.origin && self.state == other.state
    }

    /// Whether this action wins over `other` (both clamped).
    pub fn beats(&self, other: &Stamped) -> bool {
        self.rank() > other.rank()
    }

    fn rank(&self) -> (u64, u64, &str, &'static str) {
        (
            self.version,
            self.at_ms,
            self.origin.as_str(),
            self.state.as_str(),
        )
    }
}

/// The winner among `values` (each clamped at `now_ms` first).
pub fn newest(values: impl IntoIterator<Item = Stamped>, now_ms: u64) -> Option<Stamped> {
    values
        .into_iter()
        .map(|v| v.clamped(now_ms))
        .fold(None, |best, v| match best {
            Some(b) if !v.beats(&b) => Some(b),
            _ => Some(v),
        })
}

/// A new action of `origin` at `now_ms`: one version above every action `known`.
pub fn next(
    known: impl IntoIterator<Item = Stamped>,
    state: AdminState,
    origin: &str,
    now_ms: u64,
) -> Stamped {
    let top = known
        .into_iter()
        .map(|v| v.clamped(now_ms).version)
        .max()
        .unwrap_or(0);
    Stamped {
        version: (top + 1).min(MAX_VERSION),
        at_ms: now_ms,
        state,
        origin: origin.to_string(),
    }
}

/// What a replica holds once `winner` is known: the action it already holds when that
/// is the winner (unchanged, so nothing is re-applied or re-written), else the winner.
pub fn keep(own: Option<Stamped>, winner: Stamped) -> Stamped {
    match own {
        Some(o) if o.same_action(&winner) => o,
        _ => winner,
    }
}

/// The keys of a state file's (or ConfigMap's) JSON, clamped at `now_ms`; a broken one
/// is logged and ignored.
pub fn parse_state(text: &str, source: &str, now_ms: u64) -> Vec<(String, String)> {
    match serde_json::from_str::<StateFile>(text) {
        Ok(file) => file
            .into_iter()
            .flat_map(|(up, servers)| {
                servers.into_iter().map(move |(server, st)| {
                    let clamped = st.clone().clamped(now_ms);
                    if clamped != st {
                        tracing::warn!(source, upstream = %up, server = %server, at_ms = st.at_ms, version = st.version, "stored admin state dated ahead of this clock; clamped");
                    }
                    (format!("a/{up}/{server}"), clamped.encode())
                })
            })
            .collect(),
        Err(e) => {
            tracing::warn!(source, error = %e, "stored admin states unreadable; ignored");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AdminState::*;

    const NOW: u64 = 1_800_000_000_000;

    fn st(version: u64, at_ms: u64, state: AdminState, origin: &str) -> Stamped {
        Stamped {
            version,
            at_ms,
            state,
            origin: origin.to_string(),
        }
    }

    #[test]
    fn a_later_action_beats_a_future_dated_one() {
        let day = 86_400_000;
        let future = st(0, NOW + day, Maint, "r1");
        let held = future.clone().clamped(NOW);
        assert_eq!(held.at_ms, NOW + MAX_SKEW.as_millis() as u64);
        let enable = next([future.clone()], Enable, "r2", NOW + 5);
        assert_eq!(enable.version, 1);
        let w = newest([future.clone(), enable.clone()], NOW + 5).unwrap();
        assert!(w.same_action(&enable), "{w:?}");
        // Whichever replica holds which copy, and however the clock moves.
        for now in [NOW, NOW + 10, NOW + day, NOW + 2 * day] {
            let w = newest([enable.clone(), held.clone(), future.clone()], now).unwrap();
            assert!(w.same_action(&enable));
        }
    }

    #[test]
    fn concurrent_actions_order_by_clamped_time_then_node() {
        let a = st(3, NOW, Drain, "r1");
        let b = st(3, NOW + 10, Maint, "r2");
        assert!(newest([a.clone(), b.clone()], NOW).unwrap().same_action(&b));
        // A clock an hour ahead buys at most MAX_SKEW where it is taken in.
        let ahead = st(3, NOW + 3_600_000, Maint, "r0");
        let held = ahead.clamped(NOW);
        assert_eq!(held.at_ms, NOW + 1_000);
        let later = st(3, NOW + 1_500, Enable, "r1");
        assert!(
            newest([held, later.clone()], NOW + 1_500)
                .unwrap()
                .same_action(&later)
        );
        // A version past the cap is taken in as the cap.
        let huge = st(u64::MAX, NOW, Maint, "r9");
        assert_eq!(huge.clamped(NOW).version, MAX_VERSION);
    }

    #[test]
    fn a_held_action_is_kept_while_it_wins() {
        let future = st(4, NOW + 60_000, Maint, "r1");
        let held = future.clone().clamped(NOW);
        // Later, the clamp lets more of the raw time through: still the same action.
        let winner = newest([future.clone(), held.clone()], NOW + 500).unwrap();
        assert_eq!(keep(Some(held.clone()), winner), held);
        let other = st(5, NOW, Enable, "r2");
        assert_eq!(keep(Some(held), other.clone()), other);
    }

    #[test]
    fn gossip_values_and_files_round_trip_clamped() {
        let s = st(7, NOW, Drain, "node with spaces");
        assert_eq!(Stamped::decode(&s.encode()), Some(s));
        assert_eq!(Stamped::decode("1700000000000 drain r1"), None);
        let file = format!(
            r#"{{"media":{{"10.0.0.1:5000":{{"at_ms":{},"state":"maint","origin":"r1"}}}}}}"#,
            NOW + 86_400_000
        );
        let keys = parse_state(&file, "test", NOW);
        let (k, v) = &keys[0];
        assert_eq!(k, "a/media/10.0.0.1:5000");
        let v = Stamped::decode(v).unwrap();
        assert_eq!((v.version, v.state), (0, Maint));
        assert!(v.at_ms <= NOW + MAX_SKEW.as_millis() as u64);
        assert!(parse_state("not json", "test", NOW).is_empty());
    }
}
