//! Node groups (`upstreams.NAME.node_group`): upstreams that front the same nodes share
//! their fate. Janus's RTP (a UDP upstream) and its HTTP API (a TCP upstream) run on the
//! same hosts; when one of them finds a host dead, the other must leave it in the same
//! breath, or signalling and media point at different nodes.
//!
//! Each group has one task. Every member controller reports, after each step that changed
//! them, the hosts (IPs) it sees down by itself (its own probes and passive signals, never
//! what the group told it) and the events of that step. The task then:
//!
//! 1. gives every other member the group's verdict: every host some *other* member sees
//!    down, as `group:<upstream>:<reason>` ([`Control::GroupDown`]); the member marks
//!    its servers on those hosts down at once (and up again when the verdict drops them)
//!    and answers with the events that caused;
//! 2. waits for those answers (at most [`ANSWER_WITHIN`]), takes in the same way the
//!    reports that came in meanwhile (members that found the same host dead by
//!    themselves, in the same moment; at most [`BATCH`] reports), and publishes all their
//!    events and answers as **one** event on the bus (`/events`, webhooks), with
//!    `node_group` and `upstreams` (one entry per upstream that moved).
//!
//! A member never blocks on the task (reports go on an unbounded channel, one per
//! controller step at most), and the task never holds a lock across an await.

use super::control::Control;
use crate::events::EventStatus;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long the group task waits for a member's answer before it publishes without it.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// Hosts an upstream sees down by itself, with the reason (`probe_timeout`, ...).
pub type DownHosts = BTreeMap<IpAddr, &'static str>;

/// What a member tells its group.
pub(crate) enum GroupMsg {
    /// After a step: the hosts the member sees down now, and the events of the step (to
    /// publish as one with the other members' reactions).
    Report {
        upstream: String,
        commands: mpsc::Sender<Control>,
        down: DownHosts,
        events: Vec<EventStatus>,
    },
    /// The member left the group (stopped, or a reload changed its `node_group`).
    Leave { upstream: String },
}

/// Every node group of the process, each with its task (started with its first member).
#[derive(Clone, Default)]
pub struct NodeGroups {
    groups: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<GroupMsg>>>>,
}

impl NodeGroups {
    /// The channel to group `name`'s task, starting it if needed.
    pub(crate) fn sender(&self, name: &str) -> mpsc::UnboundedSender<GroupMsg> {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = groups.get(name).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(name.to_string(), rx));
        groups.insert(name.to_string(), tx.clone());
        tx
    }
}

struct Member {
    commands: mpsc::Sender<Control>,
    down: DownHosts,
    /// The verdict last given to this member.
    told: HashMap<IpAddr, String>,
}

/// The verdict for member `me`: every host another member sees down.
fn verdict_for(me: &str, members: &BTreeMap<String, Member>) -> HashMap<IpAddr, String> {
    let mut v = HashMap::new();
    for (name, m) in members {
        if name == me {
            continue;
        }
        for (ip, reason) in &m.down {
            v.entry(*ip)
                .or_insert_with(|| format!("group:{name}:{reason}"));
        }
    }
    v
}

/// At most this many reports make one event (the ones already waiting when the group
/// is done with the first): members that found the same host dead by themselves in the
/// same moment make one event, and a stream of reports cannot hold an event back.
const BATCH: usize = 16;

async fn run(group: String, mut rx: mpsc::UnboundedReceiver<GroupMsg>) {
    let mut members: BTreeMap<String, Member> = BTreeMap::new();
    while let Some(first) = rx.recv().await {
        let mut origin = None;
        let mut events = Vec::new();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(msg) = next.take() {
            let (upstream, own) = take_in(&mut members, msg);
            origin.get_or_insert(upstream);
            events.extend(own);
            events.extend(tell(&mut members).await);
            taken += 1;
            // Reports that came in meanwhile (another member that saw the host dead by
            // itself, at the same moment) join this event.
            if taken < BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !events.is_empty() {
            let origin = origin.unwrap_or_default();
            tracing::debug!(node_group = %group, origin = %origin, upstreams = events.len(), "node group moved");
            crate::events::node_group_changed(&group, &events);
        }
    }
}

/// Folds a member's message into the group: its upstream, and the events it reports.
fn take_in(
    members: &mut BTreeMap<String, Member>,
    msg: GroupMsg,
) -> (String, Vec<(String, EventStatus)>) {
    match msg {
        GroupMsg::Report {
            upstream,
            commands,
            down,
            events,
        } => {
            let m = members.entry(upstream.clone()).or_insert_with(|| Member {
                commands: commands.clone(),
                down: DownHosts::new(),
                told: HashMap::new(),
            });
            m.commands = commands;
            m.down = down;
            let events = events.into_iter().map(|e| (upstream.clone(), e)).collect();
            (upstream, events)
        }
        GroupMsg::Leave { upstream } => {
            members.remove(&upstream);
            (upstream, Vec::new())
        }
    }
}

/// Tells every member whose verdict changed, and returns the events of their answers
/// (each waited for at most [`ANSWER_WITHIN`]).
async fn tell(members: &mut BTreeMap<String, Member>) -> Vec<(String, EventStatus)> {
    let mut answers = Vec::new();
    let names: Vec<String> = members.keys().cloned().collect();
    for name in names {
        let verdict = verdict_for(&name, members);
        let m = members.get_mut(&name).expect("listed");
        if verdict == m.told {
            continue;
        }
        m.told = verdict.clone();
        let (reply, answer) = oneshot::channel();
        let msg = Control::GroupDown {
            down: verdict,
            reply,
        };
        if m.commands.send(msg).await.is_ok() {
            answers.push((name, answer));
        }
    }
    let mut events = Vec::new();
    for (name, answer) in answers {
        if let Ok(Ok(evs)) = tokio::time::timeout(ANSWER_WITHIN, answer).await {
            events.extend(evs.into_iter().map(|e| (name.clone(), e)));
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_is_told_what_the_others_see_down_never_its_own() {
        let (tx, _rx) = mpsc::channel(1);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut members = BTreeMap::new();
        members.insert(
            "rtp".to_string(),
            Member {
                commands: tx.clone(),
                down: [(ip("10.0.0.1"), "probe_timeout")].into(),
                told: HashMap::new(),
            },
        );
        members.insert(
            "api".to_string(),
            Member {
                commands: tx,
                down: DownHosts::new(),
                told: HashMap::new(),
            },
        );
        let api = verdict_for("api", &members);
        assert_eq!(
            api.get(&ip("10.0.0.1")).map(String::as_str),
            Some("group:rtp:probe_timeout")
        );
        assert!(verdict_for("rtp", &members).is_empty());
    }

    fn failover(at: &str) -> EventStatus {
        EventStatus {
            at: at.to_string(),
            kind: "failover".to_string(),
            from: vec!["10.0.0.1:1".to_string()],
            to: vec!["10.0.0.2:1".to_string()],
            reason: Some("probe_timeout".to_string()),
            detection_ms: Some(300),
            confirmed_by: None,
            confirm_ms: None,
            sessions_moved: 1,
        }
    }

    /// A member that answers every verdict with no event of its own (it already moved).
    fn answering_member() -> mpsc::Sender<Control> {
        let (tx, mut rx) = mpsc::channel(8);
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                if let Control::GroupDown { reply, .. } = msg {
                    let _ = reply.send(Vec::new());
                }
            }
        });
        tx
    }

    #[tokio::test]
    async fn members_that_see_a_host_down_at_the_same_moment_make_one_event() {
        let group = "same-moment-test-group";
        let mut bus = crate::events::subscribe();
        let tx = NodeGroups::default().sender(group);
        let down: DownHosts = [("10.0.0.1".parse().unwrap(), "probe_timeout")].into();
        // Both members found the host dead by themselves: their reports are queued
        // before the group task gets to the first.
        for name in ["rtp", "api"] {
            let _ = tx.send(GroupMsg::Report {
                upstream: name.to_string(),
                commands: answering_member(),
                down: down.clone(),
                events: vec![failover("2026-12-08T00:00:00.000Z")],
            });
        }
        let ev = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let json = bus.recv().await.expect("bus open");
                let v: serde_json::Value = serde_json::from_str(&json).unwrap();
                if v["node_group"] == group {
                    return v;
                }
            }
        })
        .await
        .expect("the group published");
        let ups: Vec<&str> = ev["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["upstream"].as_str().unwrap())
            .collect();
        assert_eq!(ups, ["rtp", "api"], "one event for both: {ev}");
    }
}
