//! Tests of the upstream control logic: health transitions, admin states, failover,
//! failback policies and the active set, as plain synchronous code.

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
        keep_last: false,
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
        "new_sessions must not move backup sessions"
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

fn keep_last_fixture(primary: u8, backup: u8) -> Fixture {
    let t0 = Instant::now();
    let wall = SystemTime::UNIX_EPOCH;
    let mut policy = policy(Balance::First, Failback::NewSessions, Duration::ZERO, false);
    policy.keep_last = true;
    let st = UpstreamState::new("u".into(), handles(primary, backup), policy, t0, wall);
    let mut f = Fixture { st, t0, wall };
    f.all_ok(0);
    f
}

#[test]
fn keep_last_keeps_the_last_server_serving_when_none_is_eligible() {
    let mut f = keep_last_fixture(1, 1);
    f.fail(0, 100);
    assert_eq!(f.active(), vec![B1], "an ordinary failover first");
    let s = f.fail(1, 200);
    assert_eq!(f.active(), vec![B1], "the last server keeps serving");
    assert!(labels(&s).is_empty(), "its sessions stay: {:?}", labels(&s));
    assert!(f.st.degraded() && f.st.view().degraded);
    let ev = s.event.expect("an all_down event");
    assert_eq!(ev.kind, EventKind::AllDown);
    assert_eq!(
        (ev.from.clone(), ev.to.clone()),
        (vec![B1.into()], vec![B1.into()])
    );
    assert_eq!(ev.reason, Some("probe_timeout"));
    assert!(s.publish);
    // Further failures of the kept server change nothing and say nothing.
    let s = f.fail(1, 300);
    assert!(s.event.is_none() && labels(&s).is_empty());
    // The kept server recovers: no longer degraded, no failover.
    f.ok(1, 400);
    let s = f.ok(1, 500);
    assert_eq!(f.active(), vec![B1]);
    assert!(!f.st.degraded());
    assert!(s.event.is_none(), "{:?}", s.event);
}

#[test]
fn leaving_degraded_for_another_server_is_a_failover_with_reason_degraded() {
    let mut f = keep_last_fixture(1, 1);
    f.fail(0, 100);
    f.fail(1, 200);
    assert!(f.st.degraded());
    f.ok(0, 300);
    let s = f.ok(0, 400);
    assert_eq!(f.active(), vec![P1]);
    assert!(!f.st.degraded());
    assert_eq!(labels(&s), vec![B1], "sessions leave the kept server");
    let ev = s.event.expect("failover");
    assert_eq!(ev.kind, EventKind::Failover);
    assert_eq!(ev.reason, Some("degraded"));
}

#[test]
fn drop_leaves_no_server_and_maint_is_never_kept() {
    // `drop`: today's behaviour.
    let mut f = fixture(1, 0, Balance::First, Failback::NewSessions, 0);
    f.all_ok(0);
    let s = f.fail(0, 100);
    assert!(f.active().is_empty());
    assert_eq!(labels(&s), vec![P1]);
    assert!(!f.st.degraded());
    // `keep_last`, but the server is put in maintenance: admin states win.
    let mut f = keep_last_fixture(1, 0);
    f.fail(0, 100);
    assert!(f.st.degraded());
    let now = f.at(200);
    let idx = 0;
    f.st.entries[idx].admin = AdminState::Maint;
    let s = f.st.reconcile(now, f.wall, None);
    assert!(f.active().is_empty(), "{:?}", f.active());
    assert_eq!(labels(&s), vec![P1]);
    assert!(!f.st.degraded());
}

#[test]
fn a_confirmed_failure_carries_its_confirmation_into_the_event() {
    let mut f = fixture(1, 1, Balance::First, Failback::NewSessions, 0);
    f.all_ok(0);
    let mut e = ProbeError::new(Reason::ProbeFailed, "HTTP 503");
    e.confirmed = Some(Confirmed {
        probes: 4,
        took: Duration::from_millis(42),
    });
    let s = f.st.probe_result(0, Err(e), f.at(100), f.wall);
    let ev = s.event.expect("failover");
    assert_eq!((ev.confirmed_by, ev.confirm_ms), (Some(4), Some(42)));
    let json = serde_json::to_value(&ev).unwrap();
    assert_eq!(json["confirmed_by"], 4);
    // A failure that needed no confirmation says nothing of it.
    let s = f.st.probe_result(
        1,
        Err(ProbeError::new(Reason::ConnectRefused, "refused")),
        f.at(200),
        f.wall,
    );
    let json = serde_json::to_value(s.event.unwrap()).unwrap();
    assert!(json.get("confirmed_by").is_none(), "{json}");
}

#[test]
fn the_node_groups_verdict_takes_the_host_down_and_back_up() {
    let mut f = fixture(1, 1, Balance::First, Failback::NewSessions, 0);
    f.all_ok(0);
    let host: std::net::IpAddr = "10.0.0.1".parse().unwrap();
    let down = [(host, "group:media:probe_timeout".to_string())].into();
    let s = f.st.set_group_down(&down, f.at(100), f.wall);
    assert_eq!(f.active(), vec![B1]);
    assert_eq!(labels(&s), vec![P1]);
    let ev = s.event.expect("failover");
    assert_eq!(ev.reason, Some("node_group"));
    assert_eq!(
        f.st.view_reason(&f.st.entries[0].handle).as_deref(),
        Some("group:media:probe_timeout")
    );
    // Its own probes still see it up, but the group's word holds it down.
    let s = f.ok(0, 200);
    assert!(s.event.is_none() && f.active() == vec![B1]);
    assert!(
        f.st.down_hosts().is_empty(),
        "a veto is not this upstream's own verdict"
    );
    // The group sees the host up again: back to the primary.
    let s = f.st.set_group_down(&Default::default(), f.at(300), f.wall);
    assert_eq!(f.active(), vec![P1]);
    assert_eq!(s.event.map(|e| e.kind), Some(EventKind::Failback));
    // What this upstream reports to its group: its own down hosts.
    f.fail(0, 400);
    assert_eq!(f.st.down_hosts().get(&host), Some(&"probe_timeout"));
}
