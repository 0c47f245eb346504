//! Events for applications: every failover, failback, admin change and server up/down,
//! as one JSON object each, on a process-wide bus that `GET /events` (Server-Sent
//! Events) and the webhooks (`events.webhooks`, see [`webhook`]) subscribe to.
//!
//! Failover and failback objects are the `/status` events plus `upstream`; `admin`
//! adds `server` and `state`; `server_up` / `server_down` add `server` (and `reason`).
//! The bus holds at most [`BUS_CAPACITY`] events per subscriber: a subscriber that falls
//! further behind loses the oldest (SSE: its stream ends; a webhook: counted `dropped`).
//! Publishing never waits.
//!
//! Every event carries `seq`, a number that grows by one per event of this process, and
//! the last [`HISTORY`] events are kept, so that a subscriber that reconnects (SSE's
//! `Last-Event-ID`, which is [`event_id`]: this process's random boot id and the `seq`)
//! gets what it missed ([`subscribe_after`]), or is told plainly that the history no
//! longer reaches back, or that it reached another process (a restart, another replica).

pub mod webhook;

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;
use tokio::sync::broadcast;

/// A failover or failback as JSON, in `/status` and on the bus; mirrors the upstream's
/// `Event` (which converts into it) so that the CLI can read it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventStatus {
    pub at: String,
    pub kind: String,
    pub from: Vec<String>,
    pub to: Vec<String>,
    pub reason: Option<String>,
    pub detection_ms: Option<u64>,
    /// Confirmation probes that failed too before a probe failure counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_by: Option<u32>,
    /// From the first failed probe to the confirmed verdict, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm_ms: Option<u64>,
    pub sessions_moved: usize,
}

/// Events buffered per subscriber.
pub const BUS_CAPACITY: usize = 256;
/// Events kept for subscribers that reconnect (`Last-Event-ID`).
pub const HISTORY: usize = 1024;

/// One event, serialised once for every subscriber (its JSON includes `seq`).
pub type EventJson = Arc<str>;

struct Bus {
    tx: broadcast::Sender<EventJson>,
    /// The last [`HISTORY`] events with their `seq`, oldest first, and the next `seq`.
    /// Publishing and subscribing hold it, so a subscriber's replay and its live stream
    /// neither overlap nor leave a hole.
    history: Mutex<(VecDeque<(u64, EventJson)>, u64)>,
    /// This process's id in event ids: a reconnect that reaches another process (a
    /// restart, another replica behind the same Service) is told so.
    boot: String,
}

fn bus() -> &'static Bus {
    static BUS: OnceLock<Bus> = OnceLock::new();
    BUS.get_or_init(|| Bus {
        tx: broadcast::channel(BUS_CAPACITY).0,
        history: Mutex::new((VecDeque::new(), 1)),
        boot: format!("{:08x}", rand::random::<u32>()),
    })
}

/// A new subscription to every event from now on.
pub fn subscribe() -> broadcast::Receiver<EventJson> {
    bus().tx.subscribe()
}

/// The SSE `id` of event `seq` of this process: `<boot>-<seq>`.
pub fn event_id(seq: u64) -> String {
    format!("{}-{seq}", bus().boot)
}

/// What a subscriber that reconnects is owed before the live events.
#[derive(Debug, PartialEq)]
pub enum Replay {
    /// The events after the one it saw last, oldest first (possibly none).
    Missed(Vec<(u64, EventJson)>),
    /// The history cannot give it what it missed: `reason` is `history` (it no longer
    /// reaches back that far) or `restart` (the id is not this process's: a restart or
    /// another replica); it must read `/status` to catch up.
    Reset { reason: &'static str },
}

/// A subscription that starts after the event `last_id` (SSE `Last-Event-ID`; None: from
/// now on), with what it missed.
pub fn subscribe_after(last_id: Option<&str>) -> (Replay, broadcast::Receiver<EventJson>) {
    let b = bus();
    let history = b.history.lock().unwrap_or_else(|p| p.into_inner());
    let rx = b.tx.subscribe();
    let Some(last_id) = last_id else {
        return (Replay::Missed(Vec::new()), rx);
    };
    let seq = last_id
        .rsplit_once('-')
        .filter(|(boot, _)| *boot == b.boot)
        .and_then(|(_, seq)| seq.parse::<u64>().ok());
    let Some(seq) = seq.filter(|s| *s < history.1) else {
        return (Replay::Reset { reason: "restart" }, rx);
    };
    let oldest = history.0.front().map_or(history.1, |(s, _)| *s);
    if seq + 1 < oldest {
        return (Replay::Reset { reason: "history" }, rx);
    }
    let missed = history
        .0
        .iter()
        .filter(|(s, _)| *s > seq)
        .cloned()
        .collect();
    (Replay::Missed(missed), rx)
}

#[derive(Serialize)]
struct Envelope<'a, T: Serialize> {
    upstream: &'a str,
    seq: u64,
    #[serde(flatten)]
    body: T,
}

#[derive(Serialize)]
struct ServerEvent<'a> {
    at: String,
    kind: &'a str,
    server: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

fn send<T: Serialize>(upstream: &str, body: T) {
    let bus = bus();
    let mut history = bus.history.lock().unwrap_or_else(|p| p.into_inner());
    let seq = history.1;
    let Ok(json) = serde_json::to_string(&Envelope {
        upstream,
        seq,
        body,
    }) else {
        return;
    };
    let json: EventJson = Arc::from(json);
    history.1 += 1;
    if history.0.len() == HISTORY {
        history.0.pop_front();
    }
    history.0.push_back((seq, json.clone()));
    let _ = bus.tx.send(json);
}

/// A failover or failback.
pub fn active_set_changed(upstream: &str, event: impl Into<EventStatus>) {
    send(upstream, event.into());
}

/// The events of the upstreams of one node group that moved together, as one object:
/// the first event's fields and `upstream` at the top (so a reader of single events
/// understands it), plus `node_group` and `upstreams`, one entry per upstream event.
pub fn node_group_changed(group: &str, events: &[(String, EventStatus)]) {
    #[derive(Serialize)]
    struct Member<'a> {
        upstream: &'a str,
        #[serde(flatten)]
        body: &'a EventStatus,
    }
    #[derive(Serialize)]
    struct Grouped<'a> {
        #[serde(flatten)]
        first: &'a EventStatus,
        node_group: &'a str,
        upstreams: Vec<Member<'a>>,
    }
    let Some((upstream, first)) = events.first() else {
        return;
    };
    send(
        upstream,
        Grouped {
            first,
            node_group: group,
            upstreams: events
                .iter()
                .map(|(u, e)| Member {
                    upstream: u,
                    body: e,
                })
                .collect(),
        },
    );
}

/// An admin state change (`kind: admin`).
pub fn admin_changed(upstream: &str, server: &str, state: &str) {
    send(
        upstream,
        ServerEvent {
            at: now(),
            kind: "admin",
            server,
            state: Some(state),
            reason: None,
        },
    );
}

/// A server went up or down (`kind: server_up` / `server_down`) for this replica.
pub fn server_health(upstream: &str, server: &str, up: bool, reason: Option<&str>) {
    send(
        upstream,
        ServerEvent {
            at: now(),
            kind: if up { "server_up" } else { "server_down" },
            server,
            state: None,
            reason,
        },
    );
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `seq` of an event's JSON.
    fn seq_of(json: &str) -> Option<u64> {
        serde_json::from_str::<serde_json::Value>(json)
            .ok()?
            .get("seq")?
            .as_u64()
    }

    fn seqs(r: &Replay) -> Vec<u64> {
        match r {
            Replay::Missed(m) => m.iter().map(|(s, _)| *s).collect(),
            Replay::Reset { .. } => panic!("a reset: {r:?}"),
        }
    }

    #[test]
    fn a_reconnect_gets_what_it_missed_or_a_reset() {
        admin_changed("u", "10.0.0.1:1", "drain");
        let (_, mut rx) = subscribe_after(None);
        admin_changed("u", "10.0.0.1:1", "enable");
        let first = rx.try_recv().expect("a live event");
        let seen = seq_of(&first).expect("seq in the JSON");
        admin_changed("u", "10.0.0.1:1", "maint");
        admin_changed("u", "10.0.0.1:1", "enable");
        let (replay, _) = subscribe_after(Some(&event_id(seen)));
        assert_eq!(seqs(&replay), vec![seen + 1, seen + 2]);
        if let Replay::Missed(m) = &replay {
            assert!(m[0].1.contains("\"state\":\"maint\""), "{}", m[0].1);
        }
        // Up to date: nothing missed.
        let (replay, _) = subscribe_after(Some(&event_id(seen + 2)));
        assert!(seqs(&replay).is_empty());
        // Another process's id, a future one, or garbage: a reset.
        for id in ["0-1".to_string(), event_id(seen + 1000), "nonsense".into()] {
            assert_eq!(
                subscribe_after(Some(&id)).0,
                Replay::Reset { reason: "restart" },
                "{id}"
            );
        }
        // Older than the history: a reset.
        for _ in 0..HISTORY {
            admin_changed("u", "10.0.0.1:1", "drain");
        }
        assert_eq!(
            subscribe_after(Some(&event_id(seen))).0,
            Replay::Reset { reason: "history" }
        );
    }
}
