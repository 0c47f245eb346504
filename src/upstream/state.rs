//! The control logic of one upstream, as plain synchronous code: per-server health and
//! admin state in, active set, evictions and failover/failback events out (SPEC §4).
//!
//! Every input (`probe_result`, `passive_failure`, `set_admin`, `manual_failback`, `tick`)
//! returns a [`Step`] saying what the controller must do: publish a new snapshot, evict
//! the sessions of some servers, record an event. Nothing here touches a socket or a
//! clock; `now` (monotonic) and `wall` (for display) are passed in.

use super::server::ServerHandle;
use crate::config::{Balance, Failback};
use crate::discovery::Readiness;
use crate::health::state::{HealthState, Transition};
use crate::health::{ProbeError, Reason};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Events kept per upstream (SPEC §4).
pub const EVENTS_KEPT: usize = 100;

/// How long a passively failed server of a probe-less (`type: none`) upstream stays down.
pub const PASSIVE_RECOVERY: Duration = Duration::from_secs(10);

/// Operator-set state of a server (SPEC §4, §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Normal operation.
    Enable,
    /// No new sessions; existing ones stay until they end.
    Drain,
    /// No sessions at all: existing ones move away at once.
    Maint,
}

impl AdminState {
    pub fn as_str(&self) -> &'static str {
        match self {
            AdminState::Enable => "enable",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }
}

impl std::str::FromStr for AdminState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "enable" => Ok(AdminState::Enable),
            "drain" => Ok(AdminState::Drain),
            "maint" => Ok(AdminState::Maint),
            other => Err(format!(
                "unknown state {other:?} (expected enable, drain or maint)"
            )),
        }
    }
}

/// Whether an active-set change moved traffic off failed servers or back onto recovered ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Failover,
    Failback,
}

/// One change of an upstream's active set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    #[serde(serialize_with = "serialize_time")]
    pub at: SystemTime,
    pub kind: EventKind,
    pub from: Vec<String>,
    pub to: Vec<String>,
    /// Failure reason for failovers; `None` for failbacks.
    pub reason: Option<&'static str>,
    /// Time from the failed server's last good probe or packet to it being marked down.
    pub detection_ms: Option<u64>,
    /// Sessions that were on the servers whose sessions had to move.
    pub sessions_moved: usize,
}

/// Serialises a wall-clock time as RFC 3339 (UTC, milliseconds).
pub fn serialize_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string())
}

/// What the controller must do after one input.
#[derive(Debug, Default)]
pub struct Step {
    /// The snapshot (active set or eligibility) changed: publish a new one.
    pub publish: bool,
    /// Servers whose sessions must move now.
    pub evict: Vec<Arc<ServerHandle>>,
    /// The active-set change, if there was one after start-up.
    pub event: Option<Event>,
    /// Servers that just came up (their passive reporting is re-armed).
    pub came_up: Vec<Arc<ServerHandle>>,
}

/// The failure that triggered a reconcile, for the event record.
#[derive(Debug, Clone, Copy)]
struct Cause {
    reason: Reason,
    detection: Option<Duration>,
}

#[derive(Debug)]
struct Entry {
    handle: Arc<ServerHandle>,
    health: HealthState,
    admin: AdminState,
    last_change: SystemTime,
    /// failback_delay: a recovered server takes new sessions only from this instant on.
    ready_at: Option<Instant>,
    /// type none: when a passively failed server is trusted again.
    recover_at: Option<Instant>,
    probed: bool,
    /// Could hold sessions at the last reconcile (up and not in maintenance).
    holds_sessions: bool,
    /// Discovery says not ready (endpoint or node): down whatever the probes say.
    not_ready: Option<Reason>,
    /// A live peer replica sees it down (`peer:<node>:<reason>`): down whatever the
    /// local probes say, until every live peer sees it up again.
    peer_down: Option<String>,
}

impl Entry {
    /// Up by probes and not vetoed by discovery.
    fn usable(&self) -> bool {
        self.health.is_up() && self.not_ready.is_none() && self.peer_down.is_none()
    }
}

/// Status of one server, for `/status`.
#[derive(Debug, Clone)]
pub struct ServerView {
    pub handle: Arc<ServerHandle>,
    pub health: &'static str,
    pub admin_state: AdminState,
    pub last_change: SystemTime,
    pub last_error: Option<String>,
}

/// Status of one upstream, published by the controller after every change.
#[derive(Debug, Clone, Default)]
pub struct UpstreamView {
    pub balance: &'static str,
    pub failback: &'static str,
    pub servers: Vec<ServerView>,
    pub active: Vec<String>,
    pub events: Vec<Event>,
    pub failovers: u64,
    pub ready: bool,
}

/// The settings of an upstream that shape its control logic (a reload may change them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub balance: Balance,
    pub failback: Failback,
    pub failback_delay: Duration,
    pub fall: u32,
    pub rise: u32,
    /// `type: none`: servers start up, and a passively failed one returns after 10 s.
    pub probe_less: bool,
}

/// The control state of one upstream.
#[derive(Debug)]
pub struct UpstreamState {
    pub name: String,
    balance: Balance,
    failback: Failback,
    failback_delay: Duration,
    fall: u32,
    rise: u32,
    probe_less: bool,
    entries: Vec<Entry>,
    active: Vec<usize>,
    first_round_done: bool,
    events: VecDeque<Event>,
    failovers: u64,
    /// The peers' last verdict (`cluster:`), for servers listed after it came.
    peer_verdict: std::collections::HashMap<String, String>,
}

impl UpstreamState {
    /// `servers` in priority order.
    pub fn new(
        name: String,
        servers: Vec<Arc<ServerHandle>>,
        policy: Policy,
        now: Instant,
        wall: SystemTime,
    ) -> Self {
        let mut st = UpstreamState {
            name,
            balance: policy.balance,
            failback: policy.failback,
            failback_delay: policy.failback_delay,
            fall: policy.fall,
            rise: policy.rise,
            probe_less: policy.probe_less,
            entries: Vec::new(),
            active: Vec::new(),
            first_round_done: false,
            events: VecDeque::new(),
            failovers: 0,
            peer_verdict: Default::default(),
        };
        st.entries = servers
            .into_iter()
            .map(|h| st.new_entry(h, now, wall))
            .collect();
        // Probe-less servers need no first round; an empty list waits for its servers
        // (discovery), so that their arrival is not mistaken for a failback.
        if policy.probe_less && !st.entries.is_empty() {
            st.finish_first_round(now);
        }
        st
    }

    fn new_entry(&self, handle: Arc<ServerHandle>, now: Instant, wall: SystemTime) -> Entry {
        Entry {
            health: if self.probe_less {
                HealthState::assumed_up(self.fall, self.rise, now)
            } else {
                HealthState::new(self.fall, self.rise)
            },
            admin: AdminState::Enable,
            last_change: wall,
            ready_at: None,
            recover_at: None,
            probed: self.probe_less,
            holds_sessions: false,
            not_ready: None,
            peer_down: self.peer_verdict.get(&handle.label).cloned(),
            handle,
        }
    }

    /// Applies changed settings (a reload). Health state is kept; the active set is
    /// recomputed under the new policy.
    pub fn set_policy(&mut self, policy: Policy, now: Instant, wall: SystemTime) -> Step {
        self.balance = policy.balance;
        self.failback = policy.failback;
        self.failback_delay = policy.failback_delay;
        self.fall = policy.fall;
        self.rise = policy.rise;
        self.probe_less = policy.probe_less;
        let mut step = self.reconcile(now, wall, None);
        step.publish = self.first_round_done;
        step
    }

    /// Replaces the server list (discovery or reload), in priority order, each with
    /// discovery's readiness verdict. Servers that stay keep their handle, health and
    /// admin state; servers that left lose their sessions (reason `removed`); new ones
    /// start unknown until probed. A `NotReady` server is down at once with its reason.
    pub fn replace_servers(
        &mut self,
        servers: Vec<(Arc<ServerHandle>, Readiness)>,
        now: Instant,
        wall: SystemTime,
    ) -> Step {
        let active: Vec<Arc<ServerHandle>> = self.active_handles();
        let mut old: Vec<Option<Entry>> = std::mem::take(&mut self.entries)
            .into_iter()
            .map(Some)
            .collect();
        // Old entries by handle identity: one lookup per server, not a scan.
        let position: std::collections::HashMap<*const ServerHandle, usize> = old
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|e| (Arc::as_ptr(&e.handle), i)))
            .collect();
        let mut cause: Option<Cause> = None;
        let mut entries = Vec::with_capacity(servers.len());
        for (handle, readiness) in servers {
            let kept = position
                .get(&Arc::as_ptr(&handle))
                .and_then(|i| old[*i].take());
            let mut entry = kept.unwrap_or_else(|| self.new_entry(handle, now, wall));
            match readiness {
                Readiness::NotReady(reason) if entry.not_ready != Some(reason) => {
                    entry.not_ready = Some(reason);
                    entry.probed = true;
                    if let Transition::WentDown { reason, detection } =
                        entry.health.passive_failure(reason, "discovery", now)
                    {
                        entry.last_change = wall;
                        entry.ready_at = None;
                        cause.get_or_insert(Cause { reason, detection });
                    }
                }
                Readiness::Ready if entry.not_ready.is_some() => {
                    entry.not_ready = None;
                    // Probes bring it back (rise); without probes, discovery's word is enough.
                    if self.probe_less && entry.health.force_up(now) == Transition::WentUp {
                        entry.last_change = wall;
                    }
                }
                _ => {}
            }
            entries.push(entry);
        }
        // Servers that left stay for this one reconcile, marked down, so that their
        // sessions are evicted and a lost active member is recorded as a failover.
        let kept_len = entries.len();
        for mut gone in old.into_iter().flatten() {
            if gone
                .health
                .passive_failure(Reason::Removed, "no longer listed", now)
                != Transition::None
            {
                cause.get_or_insert(Cause {
                    reason: Reason::Removed,
                    detection: None,
                });
            }
            entries.push(gone);
        }
        self.entries = entries;
        self.active = active.iter().filter_map(|h| self.index_of(h)).collect();
        if !self.first_round_done
            && self.entries[..kept_len].iter().all(|e| e.probed)
            && kept_len > 0
        {
            self.entries.truncate(kept_len);
            self.finish_first_round(now);
            return Step {
                publish: true,
                ..Step::default()
            };
        }
        let mut step = self.reconcile(now, wall, cause);
        step.publish = self.first_round_done;
        self.entries.truncate(kept_len);
        // Removed servers were not eligible during the reconcile, so they are not active.
        self.active.retain(|i| *i < kept_len);
        step
    }

    /// Index of a server handle.
    pub fn index_of(&self, handle: &Arc<ServerHandle>) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| Arc::ptr_eq(&e.handle, handle))
    }

    /// Whether every server has been probed once (readiness, SPEC §5).
    pub fn first_round_done(&self) -> bool {
        self.first_round_done
    }

    /// Ends the start-up phase even if some probes have not answered (they are bounded by
    /// the probe timeout, so the controller calls this after it).
    pub fn finish_first_round(&mut self, now: Instant) -> Step {
        if self.first_round_done {
            return Step::default();
        }
        self.first_round_done = true;
        // Seeding the active set is not a failover: no event, nothing to evict.
        for e in &mut self.entries {
            e.holds_sessions = e.usable() && e.admin != AdminState::Maint;
        }
        self.active = self.desired(now);
        Step {
            publish: true,
            ..Step::default()
        }
    }

    /// Feed one probe result.
    pub fn probe_result(
        &mut self,
        idx: usize,
        result: Result<(), ProbeError>,
        now: Instant,
        wall: SystemTime,
    ) -> Step {
        let Some(entry) = self.entries.get_mut(idx) else {
            return Step::default();
        };
        entry.probed = true;
        let transition = match &result {
            Ok(()) => entry.health.probe_ok(now),
            Err(e) => entry.health.probe_failed(e.reason, &e.detail, now),
        };
        let mut step = self.apply_transition(idx, transition, now, wall);
        if !self.first_round_done && self.entries.iter().all(|e| e.probed) {
            self.finish_first_round(now);
            step.publish = true;
        }
        step
    }

    /// Feed a passive signal (connection refused, ICMP unreachable, connect timeout).
    pub fn passive_failure(
        &mut self,
        idx: usize,
        reason: Reason,
        detail: &str,
        now: Instant,
        wall: SystemTime,
    ) -> Step {
        let probe_less = self.probe_less;
        let Some(entry) = self.entries.get_mut(idx) else {
            return Step::default();
        };
        let transition = entry.health.passive_failure(reason, detail, now);
        if probe_less && matches!(transition, Transition::WentDown { .. }) {
            entry.recover_at = Some(now + PASSIVE_RECOVERY);
        }
        self.apply_transition(idx, transition, now, wall)
    }

    /// Set a server's admin state; `server` is its label (`ip:port`) or IP.
    pub fn set_admin(
        &mut self,
        server: &str,
        state: AdminState,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Step, String> {
        let idx = self
            .entries
            .iter()
            .position(|e| e.handle.label == server || e.handle.ip.to_string() == server)
            .ok_or_else(|| format!("upstream {} has no server {server}", self.name))?;
        let entry = &mut self.entries[idx];
        if entry.admin == state {
            return Ok(Step::default());
        }
        entry.admin = state;
        entry.last_change = wall;
        let cause = (state != AdminState::Enable).then_some(Cause {
            reason: Reason::Admin,
            detection: None,
        });
        let mut step = self.reconcile(now, wall, cause);
        step.publish = true;
        Ok(step)
    }

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
        let mut changed = false;
        let mut cause = None;
        self.peer_verdict = down.clone();
        for e in &mut self.entries {
            let verdict = down.get(&e.handle.label).cloned();
            if verdict == e.peer_down {
                continue;
            }
            changed = true;
            let was_usable = e.usable();
            e.peer_down = verdict;
            if was_usable != e.usable() {
                e.last_change = wall;
            }
            if was_usable && !e.usable() {
                e.ready_at = None;
                cause.get_or_insert(Cause {
                    reason: Reason::Peer,
                    detection: None,
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

    /// `POST /upstreams/NAME/failback`: make the best eligible servers active and move
    /// every session there (servers in `drain` keep theirs).
    pub fn manual_failback(&mut self, now: Instant, wall: SystemTime) -> Step {
        let desired = self.desired(now);
        let mut step = Step {
            publish: true,
            ..Step::default()
        };
        if desired == self.active {
            return step;
        }
        for (i, e) in self.entries.iter().enumerate() {
            if !desired.contains(&i) && e.holds_sessions && e.admin == AdminState::Enable {
                step.evict.push(e.handle.clone());
            }
        }
        step.event = Some(self.record(EventKind::Failback, desired, None, &step.evict, wall));
        step
    }

    /// Timers: failback_delay expiry and the recovery of probe-less servers.
    pub fn tick(&mut self, now: Instant, wall: SystemTime) -> Step {
        let mut step = Step::default();
        for idx in 0..self.entries.len() {
            if self.entries[idx].recover_at.is_some_and(|t| t <= now) {
                self.entries[idx].recover_at = None;
                let tr = self.entries[idx].health.force_up(now);
                let s = self.apply_transition(idx, tr, now, wall);
                merge(&mut step, s);
            }
        }
        let s = self.reconcile(now, wall, None);
        merge(&mut step, s);
        step
    }

    /// The next instant at which `tick` has something to do.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        self.entries
            .iter()
            .flat_map(|e| [e.ready_at.filter(|t| *t > now), e.recover_at])
            .flatten()
            .min()
    }

    /// A view for `/status`.
    pub fn view(&self) -> UpstreamView {
        UpstreamView {
            balance: self.balance.as_str(),
            failback: self.failback.as_str(),
            servers: self
                .entries
                .iter()
                .map(|e| ServerView {
                    handle: e.handle.clone(),
                    health: if e.not_ready.is_some() || e.peer_down.is_some() {
                        "down"
                    } else {
                        e.health.health().as_str()
                    },
                    admin_state: e.admin,
                    last_change: e.last_change,
                    last_error: e
                        .peer_down
                        .clone()
                        .or_else(|| e.health.last_error().map(str::to_string)),
                })
                .collect(),
            active: self.active_labels(),
            events: self.events.iter().cloned().collect(),
            failovers: self.failovers,
            ready: self.first_round_done,
        }
    }

    /// Handles of every server, in priority order.
    pub fn handles(&self) -> Vec<Arc<ServerHandle>> {
        self.entries.iter().map(|e| e.handle.clone()).collect()
    }

    /// Handles of the active set.
    pub fn active_handles(&self) -> Vec<Arc<ServerHandle>> {
        self.active
            .iter()
            .map(|i| self.entries[*i].handle.clone())
            .collect()
    }

    /// Handles of every up and enabled server (ignoring failback_delay), priority order.
    pub fn eligible_handles(&self) -> Vec<Arc<ServerHandle>> {
        self.entries
            .iter()
            .filter(|e| e.usable() && e.admin == AdminState::Enable)
            .map(|e| e.handle.clone())
            .collect()
    }

    /// Whether server `idx` is up (for the `server_up` gauge).
    pub fn is_up(&self, idx: usize) -> bool {
        self.entries.get(idx).is_some_and(Entry::usable)
    }

    pub fn balance(&self) -> Balance {
        self.balance
    }

    fn active_labels(&self) -> Vec<String> {
        self.active
            .iter()
            .map(|i| self.entries[*i].handle.label.clone())
            .collect()
    }

    fn apply_transition(
        &mut self,
        idx: usize,
        transition: Transition,
        now: Instant,
        wall: SystemTime,
    ) -> Step {
        let delay = self.failback_delay;
        let first_round_done = self.first_round_done;
        let entry = &mut self.entries[idx];
        match transition {
            Transition::None => Step::default(),
            Transition::WentUp => {
                entry.last_change = wall;
                // Only a *recovered* server waits; one found up at start-up is used at once.
                entry.ready_at = (first_round_done && !delay.is_zero()).then(|| now + delay);
                let handle = entry.handle.clone();
                let mut step = self.reconcile(now, wall, None);
                step.publish = first_round_done;
                step.came_up.push(handle);
                step
            }
            Transition::WentDown { reason, detection } => {
                entry.last_change = wall;
                entry.ready_at = None;
                // A server that held no sessions was no candidate for the active set
                // either (down, or in maintenance, at the last reconcile): its fall
                // changes nothing a reconcile decides, so skip that O(servers) pass (a
                // reload adding thousands of unreachable servers makes thousands of these).
                let held = entry.holds_sessions;
                if first_round_done && !held && !self.active.contains(&idx) {
                    return Step {
                        publish: true,
                        ..Step::default()
                    };
                }
                let mut step = self.reconcile(now, wall, Some(Cause { reason, detection }));
                step.publish = first_round_done;
                step
            }
        }
    }

    /// Takes new sessions now: up, enabled and past its failback delay.
    fn takes_new(&self, idx: usize, now: Instant) -> bool {
        let e = &self.entries[idx];
        e.usable() && e.admin == AdminState::Enable && e.ready_at.is_none_or(|t| now >= t)
    }

    /// The active set the balance policy wants now, ignoring failback stickiness.
    fn desired(&self, now: Instant) -> Vec<usize> {
        let mut candidates = (0..self.entries.len()).filter(|i| self.takes_new(*i, now));
        let Some(first) = candidates.next() else {
            return Vec::new();
        };
        match self.balance {
            Balance::First => vec![first],
            _ => {
                let tier = self.entries[first].handle.tier;
                std::iter::once(first)
                    .chain(candidates.filter(|i| self.entries[*i].handle.tier == tier))
                    .collect()
            }
        }
    }

    fn reconcile(&mut self, now: Instant, wall: SystemTime, cause: Option<Cause>) -> Step {
        let mut step = Step::default();
        if !self.first_round_done {
            return step;
        }
        // Servers that can no longer hold sessions lose them now, active or not.
        for e in &mut self.entries {
            let can_hold = e.usable() && e.admin != AdminState::Maint;
            if e.holds_sessions && !can_hold {
                step.evict.push(e.handle.clone());
            }
            e.holds_sessions = can_hold;
        }
        let desired = self.desired(now);
        let keep_current = self.failback == Failback::Manual
            && !self.active.is_empty()
            && self.active.iter().all(|i| self.takes_new(*i, now));
        let new_active = if keep_current {
            self.active.clone()
        } else {
            desired
        };
        if new_active == self.active {
            return step;
        }
        step.publish = true;
        let lost_member = self
            .active
            .iter()
            .any(|i| !new_active.contains(i) && !self.takes_new(*i, now));
        if self.failback == Failback::All {
            for (i, e) in self.entries.iter().enumerate() {
                let already = step.evict.iter().any(|h| Arc::ptr_eq(h, &e.handle));
                if !new_active.contains(&i)
                    && e.holds_sessions
                    && e.admin == AdminState::Enable
                    && !already
                {
                    step.evict.push(e.handle.clone());
                }
            }
        }
        let (kind, cause) = if lost_member {
            (
                EventKind::Failover,
                Some(cause.unwrap_or(Cause {
                    reason: Reason::Removed,
                    detection: None,
                })),
            )
        } else {
            (EventKind::Failback, None)
        };
        step.event = Some(self.record(kind, new_active, cause, &step.evict, wall));
        step
    }

    fn record(
        &mut self,
        kind: EventKind,
        new_active: Vec<usize>,
        cause: Option<Cause>,
        evicted: &[Arc<ServerHandle>],
        wall: SystemTime,
    ) -> Event {
        let from = self.active_labels();
        self.active = new_active;
        let event = Event {
            at: wall,
            kind,
            from,
            to: self.active_labels(),
            reason: cause.map(|c| c.reason.as_str()),
            detection_ms: cause
                .and_then(|c| c.detection)
                .map(|d| d.as_millis() as u64),
            sessions_moved: evicted.iter().map(|h| h.sessions()).sum(),
        };
        if kind == EventKind::Failover {
            self.failovers += 1;
        }
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(event.clone());
        event
    }
}

fn merge(into: &mut Step, from: Step) {
    into.publish |= from.publish;
    for h in from.evict {
        if !into.evict.iter().any(|x| Arc::ptr_eq(x, &h)) {
            into.evict.push(h);
        }
    }
    if from.event.is_some() {
        into.event = from.event;
    }
    into.came_up.extend(from.came_up);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Tier;
    use std::net::IpAddr;

    struct Fixture {
        st: UpstreamState,
        t0: Instant,
        wall: SystemTime,
    }

    /// The policy the tests use: fall 1, rise 2.
    fn policy(
        balance: Balance,
        failback: Failback,
        failback_delay: Duration,
        probe_less: bool,
    ) -> Policy {
        Policy {
            balance,
            failback,
            failback_delay,
            fall: 1,
            rise: 2,
            probe_less,
        }
    }

    fn handles(primary: u8, backup: u8) -> Vec<Arc<ServerHandle>> {
        let mk = |i: u8, tier| {
            Arc::new(ServerHandle::new(
                IpAddr::from([10, 0, 0, i]),
                Some(5004),
                5004,
                tier,
            ))
        };
        (1..=primary)
            .map(|i| mk(i, Tier::Primary))
            .chain((1..=backup).map(|i| mk(100 + i, Tier::Backup)))
            .collect()
    }

    fn fixture(
        primary: u8,
        backup: u8,
        balance: Balance,
        failback: Failback,
        delay_ms: u64,
    ) -> Fixture {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH;
        let policy = policy(balance, failback, Duration::from_millis(delay_ms), false);
        let st = UpstreamState::new("u".into(), handles(primary, backup), policy, t0, wall);
        Fixture { st, t0, wall }
    }

    impl Fixture {
        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }
        fn ok(&mut self, idx: usize, ms: u64) -> Step {
            let now = self.at(ms);
            self.st.probe_result(idx, Ok(()), now, self.wall)
        }
        fn fail(&mut self, idx: usize, ms: u64) -> Step {
            let now = self.at(ms);
            self.st.probe_result(
                idx,
                Err(ProbeError::new(Reason::ProbeTimeout, "no reply")),
                now,
                self.wall,
            )
        }
        fn all_ok(&mut self, ms: u64) {
            for i in 0..self.st.entries.len() {
                self.ok(i, ms);
            }
        }
        fn active(&self) -> Vec<String> {
            self.st.active_labels()
        }
    }

    fn labels(step: &Step) -> Vec<String> {
        step.evict.iter().map(|h| h.label.clone()).collect()
    }

    const P1: &str = "10.0.0.1:5004";
    const P2: &str = "10.0.0.2:5004";
    const B1: &str = "10.0.0.101:5004";
    const B2: &str = "10.0.0.102:5004";

    #[test]
    fn start_up_waits_for_every_first_probe_and_records_no_event() {
        let mut f = fixture(1, 1, Balance::First, Failback::NewSessions, 0);
        let s = f.ok(1, 0);
        assert!(
            f.active().is_empty(),
            "no active set before the first round"
        );
        assert!(!s.publish);
        let s = f.ok(0, 1);
        assert!(s.publish);
        assert!(s.event.is_none());
        assert_eq!(f.active(), vec![P1]);
        assert!(f.st.first_round_done());
    }

    #[test]
    fn failover_to_first_backup_evicts_and_records_detection() {
        let mut f = fixture(1, 2, Balance::First, Failback::NewSessions, 0);
        f.all_ok(0);
        f.st.entries[0].handle.session_opened();
        f.ok(0, 100);
        let s = f.fail(0, 250);
        assert_eq!(f.active(), vec![B1]);
        assert_eq!(labels(&s), vec![P1]);
        let ev = s.event.expect("failover event");
        assert_eq!(ev.kind, EventKind::Failover);
        assert_eq!(ev.reason, Some("probe_timeout"));
        assert_eq!(ev.detection_ms, Some(150));
        assert_eq!(ev.sessions_moved, 1);
        assert_eq!(
            (ev.from, ev.to),
            (vec![P1.to_string()], vec![B1.to_string()])
        );
        assert_eq!(f.st.view().failovers, 1);
    }

    #[test]
    fn failback_new_sessions_keeps_existing_sessions() {
        let mut f = fixture(1, 1, Balance::First, Failback::NewSessions, 0);
        f.all_ok(0);
        f.fail(0, 10);
        f.ok(0, 20);
        let s = f.ok(0, 30); // rise 2
        assert_eq!(f.active(), vec![P1]);
        assert!(
            s.evict.is_empty(),
            "new-sessions must not move backup sessions"
        );
        assert_eq!(s.event.map(|e| e.kind), Some(EventKind::Failback));
    }

    #[test]
    fn failback_all_moves_backup_sessions_home() {
        let mut f = fixture(1, 1, Balance::First, Failback::All, 0);
        f.all_ok(0);
        f.fail(0, 10);
        f.ok(0, 20);
        let s = f.ok(0, 30);
        assert_eq!(f.active(), vec![P1]);
        assert_eq!(labels(&s), vec![B1]);
    }

    #[test]
    fn failback_manual_waits_for_the_operator_or_a_failure() {
        let mut f = fixture(1, 2, Balance::First, Failback::Manual, 0);
        f.all_ok(0);
        f.fail(0, 10);
        f.ok(0, 20);
        let s = f.ok(0, 30);
        assert_eq!(f.active(), vec![B1], "manual: stays on backup");
        assert!(s.event.is_none());
        let s = f.st.manual_failback(f.at(40), f.wall);
        assert_eq!(f.active(), vec![P1]);
        assert_eq!(
            labels(&s),
            vec![B1, B2],
            "every session moves to the primary"
        );
        assert_eq!(s.event.map(|e| e.kind), Some(EventKind::Failback));

        // Or the backup in use fails: the best server takes over.
        let mut f = fixture(1, 2, Balance::First, Failback::Manual, 0);
        f.all_ok(0);
        f.fail(0, 10);
        f.ok(0, 20);
        f.ok(0, 30);
        f.fail(1, 40);
        assert_eq!(f.active(), vec![P1]);
    }

    #[test]
    fn failback_delay_holds_a_recovered_server_back() {
        let mut f = fixture(1, 1, Balance::First, Failback::NewSessions, 500);
        f.all_ok(0);
        assert_eq!(f.active(), vec![P1], "start-up servers are used at once");
        f.fail(0, 10);
        f.ok(0, 20);
        f.ok(0, 30);
        assert_eq!(f.active(), vec![B1]);
        assert_eq!(f.st.next_deadline(f.at(30)), Some(f.at(530)));
        let s = f.st.tick(f.at(529), f.wall);
        assert!(s.event.is_none());
        let s = f.st.tick(f.at(530), f.wall);
        assert_eq!(f.active(), vec![P1]);
        assert_eq!(s.event.map(|e| e.kind), Some(EventKind::Failback));
    }

    #[test]
    fn drain_takes_no_new_sessions_but_keeps_old_ones() {
        let mut f = fixture(1, 1, Balance::First, Failback::All, 0);
        f.all_ok(0);
        let s =
            f.st.set_admin(P1, AdminState::Drain, f.at(1), f.wall)
                .unwrap();
        assert_eq!(f.active(), vec![B1]);
        assert!(
            s.evict.is_empty(),
            "drain keeps sessions even with failback: all"
        );
        assert_eq!(s.event.as_ref().and_then(|e| e.reason), Some("admin"));
        let s =
            f.st.set_admin(P1, AdminState::Maint, f.at(2), f.wall)
                .unwrap();
        assert_eq!(labels(&s), vec![P1], "maint moves sessions at once");
        let s =
            f.st.set_admin("10.0.0.1", AdminState::Enable, f.at(3), f.wall)
                .unwrap();
        assert_eq!(f.active(), vec![P1]);
        assert_eq!(labels(&s), vec![B1]);
        assert!(
            f.st.set_admin("10.9.9.9:1", AdminState::Maint, f.at(4), f.wall)
                .is_err()
        );
    }

    #[test]
    fn hash_uses_whole_first_tier_and_falls_to_backup_tier() {
        let mut f = fixture(2, 2, Balance::Hash, Failback::NewSessions, 0);
        f.all_ok(0);
        assert_eq!(f.active(), vec![P1, P2]);
        f.fail(0, 10);
        assert_eq!(f.active(), vec![P2]);
        let s = f.fail(1, 20);
        assert_eq!(f.active(), vec![B1, B2]);
        assert_eq!(s.event.map(|e| e.kind), Some(EventKind::Failover));
    }

    #[test]
    fn everything_down_empties_the_active_set_and_recovery_refills_it() {
        let mut f = fixture(1, 1, Balance::First, Failback::NewSessions, 0);
        f.all_ok(0);
        f.fail(0, 10);
        f.fail(1, 20);
        assert!(f.active().is_empty());
        assert!(f.st.active_handles().is_empty());
        f.ok(1, 30);
        let s = f.ok(1, 40);
        assert_eq!(f.active(), vec![B1]);
        assert_eq!(s.came_up.len(), 1);
    }

    #[test]
    fn a_failed_non_active_server_still_loses_its_sessions() {
        let mut f = fixture(1, 1, Balance::First, Failback::NewSessions, 0);
        f.all_ok(0);
        let s = f.fail(1, 10);
        assert_eq!(f.active(), vec![P1]);
        assert_eq!(labels(&s), vec![B1]);
        assert!(s.event.is_none(), "active set unchanged: no event");
    }

    #[test]
    fn probe_less_servers_recover_after_passive_failure() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH;
        let policy = policy(Balance::First, Failback::NewSessions, Duration::ZERO, true);
        let mut st = UpstreamState::new("u".into(), handles(1, 1), policy, t0, wall);
        assert_eq!(st.active_labels(), vec![P1]);
        let s = st.passive_failure(0, Reason::ConnectRefused, "refused", t0, wall);
        assert_eq!(
            s.event.as_ref().and_then(|e| e.reason),
            Some("connect_refused")
        );
        assert_eq!(st.active_labels(), vec![B1]);
        assert_eq!(st.next_deadline(t0), Some(t0 + PASSIVE_RECOVERY));
        st.tick(t0 + PASSIVE_RECOVERY, wall);
        assert_eq!(st.active_labels(), vec![P1]);
    }

    #[test]
    fn events_are_bounded() {
        let mut f = fixture(1, 1, Balance::First, Failback::NewSessions, 0);
        f.all_ok(0);
        for i in 0..120u64 {
            f.fail(0, i * 10);
            f.ok(0, i * 10 + 1);
            f.ok(0, i * 10 + 2);
        }
        let v = f.st.view();
        assert_eq!(v.events.len(), EVENTS_KEPT);
        assert_eq!(v.failovers, 120);
    }

    fn ready(handles: &[Arc<ServerHandle>]) -> Vec<(Arc<ServerHandle>, Readiness)> {
        handles
            .iter()
            .map(|h| (h.clone(), Readiness::Ready))
            .collect()
    }

    #[test]
    fn replacing_servers_keeps_state_and_removes_with_reason() {
        let mut f = fixture(1, 1, Balance::First, Failback::NewSessions, 0);
        f.all_ok(0);
        let old = f.st.handles();
        f.st.set_admin(B1, AdminState::Drain, f.at(1), f.wall)
            .unwrap();
        // Add a second backup: P1 and B1 keep their health and admin state.
        let extra = Arc::new(ServerHandle::new(
            IpAddr::from([10, 0, 0, 102]),
            Some(5004),
            5004,
            Tier::Backup,
        ));
        let mut list = ready(&old);
        list.push((extra.clone(), Readiness::Ready));
        let s = f.st.replace_servers(list, f.at(2), f.wall);
        assert!(s.event.is_none() && s.evict.is_empty());
        assert_eq!(f.active(), vec![P1]);
        let v = f.st.view();
        assert_eq!(v.servers.len(), 3);
        assert_eq!(v.servers[1].admin_state, AdminState::Drain);
        assert_eq!(
            v.servers[2].health, "unknown",
            "a new server waits for its first probe"
        );
        // Remove the active primary: failover with reason removed, its sessions evicted.
        old[0].session_opened();
        let s =
            f.st.replace_servers(ready(&[old[1].clone(), extra.clone()]), f.at(3), f.wall);
        assert_eq!(labels(&s), vec![P1]);
        let ev = s.event.expect("event");
        assert_eq!((ev.kind, ev.reason), (EventKind::Failover, Some("removed")));
        assert_eq!(ev.sessions_moved, 1);
        assert!(f.active().is_empty(), "B1 drains and B2 is not probed yet");
        f.ok(1, 4);
        assert_eq!(f.active(), vec![B2]);
        assert_eq!(f.st.handles().len(), 2);
    }

    #[test]
    fn discovery_not_ready_is_down_at_once_and_probes_bring_it_back() {
        let mut f = fixture(1, 1, Balance::First, Failback::NewSessions, 0);
        f.all_ok(0);
        let h = f.st.handles();
        let s = f.st.replace_servers(
            vec![
                (h[0].clone(), Readiness::NotReady(Reason::NodeNotReady)),
                (h[1].clone(), Readiness::Ready),
            ],
            f.at(1),
            f.wall,
        );
        assert_eq!(f.active(), vec![B1]);
        assert_eq!(s.event.and_then(|e| e.reason), Some("node_not_ready"));
        // Probes alone cannot bring back a server discovery says is not ready...
        f.ok(0, 2);
        f.ok(0, 3);
        assert_eq!(f.active(), vec![B1]);
        // ...once it is ready again, it is used (its probes have been passing).
        let s = f.st.replace_servers(ready(&h), f.at(4), f.wall);
        assert_eq!(f.active(), vec![P1]);
        assert_eq!(s.event.map(|e| e.kind), Some(EventKind::Failback));
    }

    #[test]
    fn policy_change_recomputes_the_active_set() {
        let mut f = fixture(2, 0, Balance::First, Failback::NewSessions, 0);
        f.all_ok(0);
        assert_eq!(f.active(), vec![P1]);
        let policy = policy(Balance::Hash, Failback::NewSessions, Duration::ZERO, false);
        f.st.set_policy(policy, f.at(1), f.wall);
        assert_eq!(f.active(), vec![P1, P2]);
    }

    #[test]
    fn servers_arriving_after_start_are_no_event() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH;
        let policy = policy(Balance::First, Failback::NewSessions, Duration::ZERO, true);
        let mut st = UpstreamState::new("u".into(), Vec::new(), policy, t0, wall);
        assert!(!st.first_round_done());
        let s = st.replace_servers(ready(&handles(1, 1)), t0, wall);
        assert!(s.event.is_none());
        assert!(st.first_round_done());
        assert_eq!(st.active_labels(), vec![P1]);
        assert!(st.view().events.is_empty());
    }
}
