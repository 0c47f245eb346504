//! The control logic of one upstream, as plain synchronous code: per-server health and
//! admin state in, active set, evictions and failover/failback events out.
//!
//! Every input (`probe_result`, `passive_failure`, `set_admin`, `manual_failback`, `tick`)
//! returns a [`Step`] saying what the controller must do: publish a new snapshot, evict
//! the sessions of some servers, record an event. Nothing here touches a socket or a
//! clock; `now` (monotonic) and `wall` (for display) are passed in.

use super::server::ServerHandle;
use crate::config::{Balance, Failback};
use crate::discovery::Readiness;
use crate::health::state::{HealthState, Transition};
use crate::health::{Confirmed, ProbeError, Reason};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Events kept per upstream.
pub const EVENTS_KEPT: usize = 100;

/// How long a passively failed server of a probe-less (`type: none`) upstream stays down.
pub const PASSIVE_RECOVERY: Duration = Duration::from_secs(10);

/// Operator-set state of a server.
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
    /// No server is eligible; the servers that served last keep serving (`keep_last`).
    AllDown,
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
    /// Confirmation probes that failed too before the probe failure counted
    /// (`health.confirm`); absent when the failure needed no confirmation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirmed_by: Option<u32>,
    /// From the first failed probe to the confirmed verdict, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirm_ms: Option<u64>,
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
    /// How the probe failure was confirmed (`health.confirm`), when it was.
    confirmed: Option<Confirmed>,
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
    /// No longer listed: kept for the one reconcile that evicts its sessions.
    removed: bool,
    /// A live peer replica sees it down (`peer:<node>:<reason>`): down whatever the
    /// local probes say, until every live peer sees it up again.
    peer_down: Option<String>,
    /// Another upstream of its `node_group` sees its host down
    /// (`group:<upstream>:<reason>`): down whatever the local probes say.
    group_down: Option<String>,
}

impl Entry {
    /// Up by probes and not vetoed by discovery, a peer or the node group.
    fn usable(&self) -> bool {
        self.health.is_up()
            && self.not_ready.is_none()
            && self.peer_down.is_none()
            && self.group_down.is_none()
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
    /// No server is eligible and the last ones keep serving (`when_all_down: keep_last`).
    pub degraded: bool,
}

/// The settings of an upstream that shape its control logic (a reload may change them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub balance: Balance,
    pub failback: Failback,
    pub failback_delay: Duration,
    /// `when_all_down: keep_last`.
    pub keep_last: bool,
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
    keep_last: bool,
    /// Serving from servers that are down because none is eligible (`keep_last`).
    degraded: bool,
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
    /// The node group's last verdict, by host, for servers listed after it came.
    group_verdict: std::collections::HashMap<std::net::IpAddr, String>,
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
            keep_last: policy.keep_last,
            degraded: false,
            fall: policy.fall,
            rise: policy.rise,
            probe_less: policy.probe_less,
            entries: Vec::new(),
            active: Vec::new(),
            first_round_done: false,
            events: VecDeque::new(),
            failovers: 0,
            peer_verdict: Default::default(),
            group_verdict: Default::default(),
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
            removed: false,
            peer_down: self.peer_verdict.get(&handle.label).cloned(),
            group_down: self.group_verdict.get(&handle.ip).cloned(),
            handle,
        }
    }

    /// Applies changed settings (a reload). Health state is kept; the active set is
    /// recomputed under the new policy.
    pub fn set_policy(&mut self, policy: Policy, now: Instant, wall: SystemTime) -> Step {
        self.balance = policy.balance;
        self.failback = policy.failback;
        self.failback_delay = policy.failback_delay;
        self.keep_last = policy.keep_last;
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
                        cause.get_or_insert(Cause {
                            reason,
                            detection,
                            confirmed: None,
                        });
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
            gone.removed = true;
            if gone
                .health
                .passive_failure(Reason::Removed, "no longer listed", now)
                != Transition::None
            {
                cause.get_or_insert(Cause {
                    reason: Reason::Removed,
                    detection: None,
                    confirmed: None,
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

    /// Whether every server has been probed once (readiness).
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
        let confirmed = result.as_ref().err().and_then(|e| e.confirmed);
        let mut step = self.apply_transition(idx, transition, confirmed, now, wall);
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
        self.apply_transition(idx, transition, None, now, wall)
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
            confirmed: None,
        });
        let mut step = self.reconcile(now, wall, cause);
        step.publish = true;
        Ok(step)
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
                let s = self.apply_transition(idx, tr, None, now, wall);
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
                    health: if e.not_ready.is_some()
                        || e.peer_down.is_some()
                        || e.group_down.is_some()
                    {
                        "down"
                    } else {
                        e.health.health().as_str()
                    },
                    admin_state: e.admin,
                    last_change: e.last_change,
                    last_error: e
                        .peer_down
                        .clone()
                        .or_else(|| e.group_down.clone())
                        .or_else(|| e.health.last_error().map(str::to_string)),
                })
                .collect(),
            active: self.active_labels(),
            events: self.events.iter().cloned().collect(),
            failovers: self.failovers,
            ready: self.first_round_done,
            degraded: self.degraded,
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

    /// Serving from servers that are down because none is eligible (`keep_last`).
    pub fn degraded(&self) -> bool {
        self.degraded
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

    /// Server `idx`'s admin state (for the `server_admin_state` gauge).
    pub fn admin_of(&self, idx: usize) -> Option<AdminState> {
        self.entries.get(idx).map(|e| e.admin)
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
        confirmed: Option<Confirmed>,
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
                let cause = Cause {
                    reason,
                    detection,
                    confirmed,
                };
                let mut step = self.reconcile(now, wall, Some(cause));
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
        let desired = self.desired(now);
        // No blackhole (`keep_last`): nothing is eligible, so the enabled servers that
        // served until now keep serving.
        let kept: Vec<usize> = if desired.is_empty() && self.keep_last {
            self.active
                .iter()
                .copied()
                .filter(|i| {
                    let e = &self.entries[*i];
                    e.admin == AdminState::Enable && !e.removed
                })
                .collect()
        } else {
            Vec::new()
        };
        // Servers that can no longer hold sessions lose them now, active or not.
        for (i, e) in self.entries.iter_mut().enumerate() {
            let can_hold = (e.usable() && e.admin != AdminState::Maint) || kept.contains(&i);
            if e.holds_sessions && !can_hold {
                step.evict.push(e.handle.clone());
            }
            e.holds_sessions = can_hold;
        }
        let was_degraded = self.degraded;
        self.degraded = !kept.is_empty();
        if self.degraded {
            if !was_degraded {
                step.publish = true;
                let cause = cause.unwrap_or(Cause {
                    reason: Reason::Removed,
                    detection: None,
                    confirmed: None,
                });
                step.event = Some(self.record(EventKind::AllDown, kept, Some(cause), &[], wall));
            }
            return step;
        }
        if was_degraded {
            // A server is eligible again: leave the degraded state whatever follows.
            step.publish = true;
        }
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
                    // Sessions leave the servers kept while degraded, or a removed one.
                    reason: if was_degraded {
                        Reason::Degraded
                    } else {
                        Reason::Removed
                    },
                    detection: None,
                    confirmed: None,
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
            confirmed_by: cause.and_then(|c| c.confirmed).map(|c| c.probes),
            confirm_ms: cause
                .and_then(|c| c.confirmed)
                .map(|c| c.took.as_millis() as u64),
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

mod verdicts;

#[cfg(test)]
mod tests;
