//! Events for applications: every failover, failback, admin change and server up/down,
//! as one JSON object each, on a process-wide bus that `GET /events` (Server-Sent
//! Events) and the webhooks (`events.webhooks`, see [`webhook`]) subscribe to.
//!
//! Failover and failback objects are the `/status` events plus `upstream`; `admin`
//! adds `server` and `state`; `server_up` / `server_down` add `server` (and `reason`).
//! The bus holds at most [`BUS_CAPACITY`] events per subscriber: a subscriber that falls
//! further behind loses the oldest (SSE: its stream ends; a webhook: counted `dropped`).
//! Publishing never waits.

pub mod webhook;

use serde::{Deserialize, Serialize};
use std::sync::{Arc, OnceLock};
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

/// One event, serialised once for every subscriber.
pub type EventJson = Arc<str>;

fn bus() -> &'static broadcast::Sender<EventJson> {
    static BUS: OnceLock<broadcast::Sender<EventJson>> = OnceLock::new();
    BUS.get_or_init(|| broadcast::channel(BUS_CAPACITY).0)
}

/// A new subscription to every event from now on.
pub fn subscribe() -> broadcast::Receiver<EventJson> {
    bus().subscribe()
}

#[derive(Serialize)]
struct Envelope<'a, T: Serialize> {
    upstream: &'a str,
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
    if bus.receiver_count() == 0 {
        return;
    }
    if let Ok(json) = serde_json::to_string(&Envelope { upstream, body }) {
        let _ = bus.send(Arc::from(json));
    }
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
