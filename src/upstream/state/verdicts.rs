//! What others say about an upstream's servers, and what it tells them: the verdicts of
//! peer replicas (`cluster:`) and of the node group (`node_group`) veto servers whatever
//! the local probes say ([`UpstreamState::set_peer_down`],
//! [`UpstreamState::set_group_down`]); what this upstream itself sees down is what it
//! shares with them ([`UpstreamState::local_down`], [`UpstreamState::down_hosts`]).

use super::{Cause, Entry, Step, UpstreamState};
use crate::health::Reason;
use crate::upstream::ServerHandle;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

impl UpstreamState {
    /// The servers this replica's own probes and passive signals see down, with the
    /// reason (`cluster:` shares them with the peers; peer verdicts are not included).
    pub fn local_down(&self) -> Vec<(String, &'static str)> {
        self.entries
            .iter()
            .filter(|e| e.health.health() == crate::health::state::Health::Down)
            .map(|e| {
                let reason = e.health.down_reason().unwrap_or(Reason::ProbeFailed);
                (e.handle.label.clone(), reason.as_str())
            })
            .collect()
    }

    /// Why a server is down, for the `server_down` event: the peer's verdict, the
    /// discovery reason or the local probe reason.
    pub fn view_reason(&self, handle: &Arc<ServerHandle>) -> Option<String> {
        let e = self
            .entries
            .iter()
            .find(|e| Arc::ptr_eq(&e.handle, handle))?;
        e.peer_down
            .clone()
            .or_else(|| e.group_down.clone())
            .or_else(|| e.not_ready.map(|r| r.as_str().to_string()))
            .or_else(|| e.health.down_reason().map(|r| r.as_str().to_string()))
    }

    /// The peers' verdict (`cluster:`): `down` maps the label of every server that some
    /// live peer sees down to `peer:<node>:<reason>`; every other server is up as far as
    /// the peers are concerned (its own probes and `rise` still decide locally).
    pub fn set_peer_down(
        &mut self,
        down: &std::collections::HashMap<String, String>,
        now: Instant,
        wall: SystemTime,
    ) -> Step {
        self.peer_verdict = down.clone();
        self.apply_veto(
            |e| &mut e.peer_down,
            |e| down.get(&e.handle.label).cloned(),
            Reason::Peer,
            now,
            wall,
        )
    }

    /// Applies a word from outside the local probes (a peer replica's verdict, the node
    /// group's) to every server: `slot` is the field it lives in, `verdict` what it says
    /// of a server now. A server it takes down is a failover with `reason`.
    fn apply_veto(
        &mut self,
        slot: fn(&mut Entry) -> &mut Option<String>,
        verdict: impl Fn(&Entry) -> Option<String>,
        reason: Reason,
        now: Instant,
        wall: SystemTime,
    ) -> Step {
        let mut changed = false;
        let mut cause = None;
        for e in &mut self.entries {
            let v = verdict(e);
            if v == *slot(e) {
                continue;
            }
            changed = true;
            let was_usable = e.usable();
            *slot(e) = v;
            if was_usable != e.usable() {
                e.last_change = wall;
            }
            if was_usable && !e.usable() {
                e.ready_at = None;
                cause.get_or_insert(Cause {
                    reason,
                    detection: None,
                    confirmed: None,
                });
            }
        }
        if !changed {
            return Step::default();
        }
        let mut step = self.reconcile(now, wall, cause);
        step.publish = self.first_round_done;
        step
    }

    /// The hosts this upstream itself sees down (its own probes and passive signals: not
    /// what a peer or the node group said), with the reason: what it tells its node group.
    pub fn down_hosts(&self) -> std::collections::BTreeMap<std::net::IpAddr, &'static str> {
        self.entries
            .iter()
            .filter(|e| e.health.health() == crate::health::state::Health::Down)
            .map(|e| {
                let reason = e.health.down_reason().unwrap_or(Reason::ProbeFailed);
                (e.handle.ip, reason.as_str())
            })
            .collect()
    }

    /// The node group's verdict: `down` maps every host another upstream of the group sees
    /// down to `group:<upstream>:<reason>`; the servers on those hosts are down here too,
    /// whatever the local probes say, until the group sees the host up again.
    pub fn set_group_down(
        &mut self,
        down: &std::collections::HashMap<std::net::IpAddr, String>,
        now: Instant,
        wall: SystemTime,
    ) -> Step {
        self.group_verdict = down.clone();
        self.apply_veto(
            |e| &mut e.group_down,
            |e| down.get(&e.handle.ip).cloned(),
            Reason::NodeGroup,
            now,
            wall,
        )
    }
}
