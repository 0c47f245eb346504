//! Replicas that act as one balancer (`cluster:`): membership and state dissemination by
//! chitchat (scuttlebutt gossip) over an HMAC-authenticated UDP transport
//! ([`transport`]), a shared health view and shared admin states.
//!
//! Each replica publishes in its own chitchat key space:
//! - `h/<upstream>/<server>` = the reason its own probes see the server down, or `""`;
//! - `a/<upstream>/<server>` = `<version> <unix ms> <state> <origin node>`, the admin
//!   state it applies; the newest action over every known replica wins (Lamport
//!   version first, times clamped where they come in: [`admin_state`]), and a replica
//!   that adopts a state publishes it too, so it outlives the replica that set it. An
//!   action given to this replica's API is answered once the cluster holds it
//!   ([`Cluster::set_admin`]);
//! - `f/<upstream>` = `<version> <unix ms> <origin node>`, the last manual failback
//!   (newest by version, then origin).
//!
//! A sync task reads them every [`TICK`] (and at once when a peer's key changes): a
//! server is down for this replica when any live peer sees it down (`peer:<node>:<reason>`,
//! fed to the controller as [`Control::PeerDown`](crate::upstream::Control)), up again
//! when no live peer does. A peer is live while its heartbeat advances within
//! `peer_timeout`. Every local change is pushed to every peer at once (a gossip round
//! started towards each), besides the periodic gossip.
//!
//! Reload: a changed `cluster:` section gets a new member ([`Cluster::prepare`], inert,
//! on the same peer socket when `listen` stays), which takes over in one step at commit
//! ([`Cluster::launch`]): the old member goes quiet, the new one carries its admin states
//! on and keeps the peers' last health verdict until the peers it knew are heard again
//! (or `sync_timeout`), so a reload never flaps a server. Its peers see a new generation
//! of the same node, which replaces the old one as soon as it is heard.

pub mod admin_state;
pub mod kube_state;
pub mod metrics;
pub mod transport;

use crate::config::ClusterConfig;
use crate::upstream::{AdminState, UpstreamRuntime};
use admin_state::{Stamped, StateFile, parse_state};
use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ListenerHandle};
use indexmap::IndexMap;
use metrics::ClusterMetrics;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// How the sync task reads the upstreams in force (a reload replaces the map).
pub type Upstreams = Arc<dyn Fn() -> Arc<IndexMap<String, Arc<UpstreamRuntime>>> + Send + Sync>;

/// Longest time between two passes of the sync task.
pub const TICK: Duration = Duration::from_millis(20);

/// One peer, for `/status` and `mediagate status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub node: String,
    pub address: String,
    /// Heard within `peer_timeout`.
    pub alive: bool,
    /// Milliseconds since its heartbeat last advanced (absent: not yet).
    pub last_heard_ms: Option<u64>,
    /// Servers it sees down, `upstream/server`.
    pub down: Vec<String>,
    /// Whether its own view of down servers equals this replica's own.
    pub agrees: bool,
}

/// `cluster` in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterStatus {
    pub node: String,
    pub address: String,
    pub synced: bool,
    pub peers: Vec<PeerStatus>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How an admin state set through the API fared ([`Cluster::set_admin`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminOutcome {
    /// Applied by this replica and held by every live peer.
    Applied,
    /// A newer action, taken on another replica before this one was heard, wins: the
    /// cluster applies that one.
    Superseded(Stamped),
    /// Published, but these replicas (this one first, when it has not applied it) did
    /// not confirm within `sync_timeout`; they take it when they hear it.
    Unconfirmed(Vec<String>),
}

/// A running cluster member.
pub struct Cluster {
    handle: ChitchatHandle,
    pub node_id: String,
    pub address: SocketAddr,
    cfg: ClusterConfig,
    pub metrics: ClusterMetrics,
    wake: Arc<Notify>,
    status: ArcSwap<Vec<PeerStatus>>,
    synced: watch::Sender<bool>,
    /// The latest admin states for the ConfigMap writer (`cluster.state_configmap`).
    store: Option<watch::Sender<String>>,
    _listener: ListenerHandle,
    /// The peer socket (handed to the member that replaces this one on the same address).
    socket: Arc<tokio::net::UdpSocket>,
    /// Fires at [`Cluster::launch`]: reading, sending and syncing begin.
    start: CancellationToken,
    /// Fires at [`Cluster::stop`]: everything of this member ends.
    stop: CancellationToken,
    /// Peers that must be heard again before the health verdict is handed on (the live
    /// peers of the member this one replaced).
    expect: std::sync::Mutex<BTreeSet<String>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Cluster {
    /// Builds a member of `cfg` that reads, sends and does nothing until
    /// [`launch`](Cluster::launch): binds the peer port, or takes the socket of
    /// `previous` (the member it replaces) when the address is the same, reads
    /// `state_file` / `state_configmap`. Every step that can fail is here. Admin states
    /// of the state file are published at launch (they compete with the peers' by time).
    pub async fn prepare(
        cfg: &ClusterConfig,
        metrics: ClusterMetrics,
        previous: Option<&Cluster>,
    ) -> Result<Arc<Cluster>> {
        let socket = match previous {
            Some(p) if p.cfg.listen == cfg.listen => p.socket.clone(),
            _ => Arc::new(
                tokio::net::UdpSocket::bind(cfg.listen)
                    .await
                    .with_context(|| format!("cluster: bind {}/udp", cfg.listen))?,
            ),
        };
        let address = cfg.advertise.unwrap_or(cfg.listen);
        let node_id = cfg
            .node_id
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| address.to_string());
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let chitchat_cfg = ChitchatConfig {
            chitchat_id: ChitchatId::new(node_id.clone(), generation, address),
            cluster_id: "mediagate".to_string(),
            gossip_interval: cfg.gossip_interval.get(),
            listen_addr: cfg.listen,
            seed_nodes: cfg.peers.clone(),
            failure_detector_config: FailureDetectorConfig {
                initial_interval: cfg.gossip_interval.get(),
                dead_node_grace_period: cfg.peer_timeout.get() * 20,
                ..FailureDetectorConfig::default()
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V0,
        };
        let mut initial = Vec::new();
        if let Some(path) = &cfg.state_file {
            match std::fs::read_to_string(path) {
                Ok(text) => initial.extend(parse_state(&text, path, now_ms())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path, error = %e, "cluster.state_file unreadable; ignored")
                }
            }
        }
        let mut store_tx = None;
        if let Some(reference) = &cfg.state_configmap {
            let (ns, name) = kube_state::split_ref(reference);
            match kube::Client::try_default().await {
                Ok(client) => {
                    let store = kube_state::ConfigMapStore::new(client, &ns, &name);
                    match store.load().await {
                        Ok(Some(text)) => initial.extend(parse_state(&text, reference, now_ms())),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(configmap = %reference, error = %e, "cluster.state_configmap unreadable; starting without it")
                        }
                    }
                    store_tx = Some(spawn_store_writer(store, reference.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cluster.state_configmap: no Kubernetes client; admin states are not kept there")
                }
            }
        }
        let start = CancellationToken::new();
        let stop = CancellationToken::new();
        let transport = transport::HmacTransport {
            key: Arc::from(cfg.secret.as_bytes()),
            advertise: address,
            metrics: metrics.clone(),
            socket: socket.clone(),
            start: start.clone(),
            stop: stop.clone(),
        };
        let handle = chitchat::spawn_chitchat(chitchat_cfg, initial, &transport)
            .await
            .context("cluster")?;
        let wake = Arc::new(Notify::new());
        let w = wake.clone();
        let listener = handle
            .with_chitchat(|c| {
                let w = w.clone();
                c.subscribe_event("", move |_| w.notify_one())
            })
            .await;
        Ok(Arc::new(Cluster {
            handle,
            node_id,
            address,
            cfg: cfg.clone(),
            metrics,
            wake,
            status: ArcSwap::from_pointee(Vec::new()),
            synced: watch::channel(false).0,
            store: store_tx,
            _listener: listener,
            socket,
            start,
            stop,
            expect: std::sync::Mutex::new(BTreeSet::new()),
        }))
    }

    /// The settings of this member.
    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    /// Takes over from `previous` (stopped first, so one member at a time reads the
    /// socket) and starts: reading, gossip, and the task that keeps this replica and its
    /// peers in step. Cannot fail.
    pub async fn launch(self: &Arc<Self>, upstreams: Upstreams, previous: Option<Arc<Cluster>>) {
        let mut reach: Vec<SocketAddr> = Vec::new();
        if let Some(old) = &previous {
            old.stop();
            // Its admin states and last failbacks live on in this member.
            let carried: Vec<(String, String)> = old
                .handle
                .with_chitchat(|c| {
                    c.self_node_state()
                        .key_values()
                        .filter(|(k, _)| k.starts_with("a/") || k.starts_with("f/"))
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()
                })
                .await;
            self.handle
                .with_chitchat(|c| {
                    let me = c.self_node_state();
                    let now = now_ms();
                    for (k, v) in &carried {
                        let newer = if k.starts_with("a/") {
                            match (Stamped::decode(v), me.get(k).and_then(Stamped::decode)) {
                                (Some(a), Some(b)) => a.clamped(now).beats(&b.clamped(now)),
                                _ => me.get(k).is_none(),
                            }
                        } else {
                            match (failback_rank(v), me.get(k).and_then(failback_rank)) {
                                (Some(a), Some(b)) => a > b,
                                _ => me.get(k).is_none(),
                            }
                        };
                        if newer {
                            me.set(k.clone(), v.clone());
                        }
                    }
                })
                .await;
            let status = old.status.load();
            let live = status.iter().filter(|p| p.alive);
            *self.expect.lock().expect("expect lock") =
                live.clone().map(|p| p.node.clone()).collect();
            reach = live.filter_map(|p| p.address.parse().ok()).collect();
        }
        self.start.cancel();
        // The peers the old member talked to hear of this one at once, whatever the new
        // `peers` list says (it only seeds the membership).
        for addr in reach {
            let _ = self.handle.gossip(addr);
        }
        let me = self.clone();
        tokio::spawn(async move { me.sync(upstreams).await });
        tracing::info!(node = %self.node_id, listen = %self.cfg.listen, peers = ?self.cfg.peers, replaces = previous.is_some(), "cluster member started");
    }

    /// Stops this member: nothing is read, sent or applied any more. Its peers drop it
    /// after their `peer_timeout`.
    pub fn stop(&self) {
        if !self.stop.is_cancelled() {
            self.stop.cancel();
            let _ = self.handle.initiate_shutdown();
        }
    }

    /// An admin state set through this replica's API, for every replica: published one
    /// version above every action known for the server (so it supersedes them), applied
    /// here by the sync task like any other, then confirmed: [`AdminOutcome::Applied`]
    /// once this replica applied it and every live peer holds it, within
    /// `sync_timeout`. `up` is the upstream in force, `label` the server's label.
    pub async fn set_admin(
        &self,
        up: &UpstreamRuntime,
        label: &str,
        state: AdminState,
    ) -> AdminOutcome {
        let key = format!("a/{}/{label}", up.name);
        let node = self.node_id.clone();
        let mine = self
            .handle
            .with_chitchat(|c| {
                let now = now_ms();
                let known: Vec<Stamped> = c
                    .node_states()
                    .values()
                    .filter_map(|ns| ns.get(&key).and_then(Stamped::decode))
                    .collect();
                let st = admin_state::next(known, state, &node, now);
                c.self_node_state().set(key.clone(), st.encode());
                st
            })
            .await;
        self.wake.notify_one();
        let deadline = Instant::now() + self.cfg.sync_timeout.get();
        loop {
            let live: BTreeSet<String> = self
                .status
                .load()
                .iter()
                .filter(|p| p.alive)
                .map(|p| p.node.clone())
                .collect();
            let (winner, pending) = self
                .handle
                .with_chitchat(|c| {
                    let now = now_ms();
                    let winner = admin_state::newest(
                        c.node_states()
                            .values()
                            .filter_map(|ns| ns.get(&key).and_then(Stamped::decode)),
                        now,
                    );
                    // The newest generation of each live peer.
                    let mut newest: BTreeMap<String, &ChitchatId> = BTreeMap::new();
                    for id in c.node_states().keys() {
                        let node: &str = &id.node_id;
                        if live.contains(node)
                            && newest
                                .get(node)
                                .is_none_or(|n| n.generation_id < id.generation_id)
                        {
                            newest.insert(node.to_string(), id);
                        }
                    }
                    let pending: Vec<String> = newest
                        .iter()
                        .filter(|(_, id)| {
                            !c.node_state(id)
                                .and_then(|ns| ns.get(&key))
                                .and_then(Stamped::decode)
                                .is_some_and(|v| v.same_action(&mine))
                        })
                        .map(|(n, _)| n.clone())
                        .collect();
                    (winner, pending)
                })
                .await;
            if let Some(w) = winner
                && !w.same_action(&mine)
            {
                return AdminOutcome::Superseded(w);
            }
            let here = up.view().servers.iter().any(|sv| {
                (sv.handle.label == label || sv.handle.ip.to_string() == label)
                    && sv.admin_state == state
            });
            if here && pending.is_empty() {
                return AdminOutcome::Applied;
            }
            if Instant::now() >= deadline || self.stop.is_cancelled() {
                let mut waiting = pending;
                if !here {
                    waiting.insert(0, self.node_id.clone());
                }
                return AdminOutcome::Unconfirmed(waiting);
            }
            tokio::time::sleep(TICK).await;
        }
    }

    /// A manual failback made through this replica's API: the peers do it too. Stamped
    /// one version above every failback known (a clock ahead does not hide it).
    pub async fn failback_requested(&self, upstream: &str) {
        let key = format!("f/{upstream}");
        let node = self.node_id.clone();
        self.handle
            .with_chitchat(|c| {
                let top = c
                    .node_states()
                    .values()
                    .filter_map(|ns| ns.get(&key).and_then(failback_rank))
                    .map(|(v, _)| v)
                    .max()
                    .unwrap_or(0);
                let v = format!(
                    "{} {} {node}",
                    (top + 1).min(admin_state::MAX_VERSION),
                    now_ms()
                );
                c.self_node_state().set(key.clone(), v)
            })
            .await;
        self.wake.notify_one();
    }

    /// Waits until the peers' admin states are applied (or `sync_timeout` passed).
    pub async fn wait_synced(&self) {
        let _ = self.synced.subscribe().wait_for(|s| *s).await;
    }

    /// `cluster` in `/status`.
    pub fn status(&self) -> ClusterStatus {
        ClusterStatus {
            node: self.node_id.clone(),
            address: self.address.to_string(),
            synced: *self.synced.borrow(),
            peers: self.status.load().as_ref().clone(),
        }
    }

    async fn sync(self: Arc<Self>, upstreams: Upstreams) {
        let started = Instant::now();
        let timeout = self.cfg.peer_timeout.get();
        let mut s = SyncState::default();
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
            let now = Instant::now();
            let ups = upstreams();
            let chitchat = self.handle.chitchat();
            let mut cc = chitchat.lock().await;
            let mut push = false;
            // 1. What this replica sees down, for the peers.
            let mut own_down = BTreeSet::new();
            for (name, up) in ups.iter() {
                let down = up.local_down();
                let prefix = format!("h/{name}/");
                let me = cc.self_node_state();
                for (label, reason) in down.iter() {
                    own_down.insert(format!("{name}/{label}"));
                    let k = format!("{prefix}{label}");
                    if me.get(&k) != Some(*reason) {
                        me.set(k, *reason);
                        push = true;
                    }
                }
                let stale: Vec<String> = me
                    .iter_prefix(&prefix)
                    .filter(|(k, v)| {
                        !v.value.is_empty() && !down.iter().any(|(l, _)| k[prefix.len()..] == **l)
                    })
                    .map(|(k, _)| k.to_string())
                    .collect();
                for k in stale {
                    me.set(k, "");
                    push = true;
                }
            }
            // 2. Which peers are live: heartbeat advanced within peer_timeout. A replica
            //    that restarted its membership (a restart, a reload) shows up as a newer
            //    generation of the same node: once that one is live, the older is gone.
            let self_id = cc.self_chitchat_id().clone();
            let mut known: Vec<(ChitchatId, bool, Option<Instant>)> = Vec::new();
            for (id, ns) in cc.node_states() {
                if id.node_id == self_id.node_id {
                    continue;
                }
                let hb = ns.heartbeat();
                let e = s.seen.entry(id.clone()).or_insert((hb, None));
                if e.0 != hb {
                    *e = (hb, Some(now));
                }
                let heard = e.1;
                let alive = heard.is_some_and(|t| now.duration_since(t) < timeout);
                known.push((id.clone(), alive, heard));
            }
            let superseded = |id: &ChitchatId| {
                known.iter().any(|(other, alive, _)| {
                    *alive && other.node_id == id.node_id && other.generation_id > id.generation_id
                })
            };
            let mut live = Vec::new();
            let mut peers = Vec::new();
            for (id, alive, heard) in &known {
                if superseded(id) {
                    continue;
                }
                if *alive {
                    live.push(id.clone());
                }
                let Some(ns) = cc.node_state(id) else {
                    continue;
                };
                let mut down: Vec<String> = Vec::new();
                for (k, v) in ns.iter_prefix("h/") {
                    if !v.value.is_empty() {
                        down.push(k[2..].to_string());
                    }
                }
                let agrees = down.iter().cloned().collect::<BTreeSet<_>>() == own_down;
                peers.push(PeerStatus {
                    node: id.node_id.to_string(),
                    address: id.gossip_advertise_addr.to_string(),
                    alive: *alive,
                    last_heard_ms: heard.map(|t| now.duration_since(t).as_millis() as u64),
                    down,
                    agrees,
                });
            }
            s.seen.retain(|id, (_, t)| {
                cc.node_state(id).is_some() || t.is_some_and(|t| now.duration_since(t) < timeout)
            });
            // Synced: a peer answered (after a reload: every peer the replaced member
            // heard), or sync_timeout passed.
            let alive = peers.iter().filter(|p| p.alive).count();
            if !*self.synced.borrow() {
                let expect = self.expect.lock().expect("expect lock").clone();
                let heard_all = if expect.is_empty() {
                    alive > 0
                } else {
                    expect
                        .iter()
                        .all(|n| peers.iter().any(|p| p.alive && p.node == *n))
                };
                if heard_all || now.duration_since(started) >= self.cfg.sync_timeout.get() {
                    if !heard_all {
                        tracing::warn!(
                            "cluster: peers did not answer within cluster.sync_timeout; going on with the ones heard"
                        );
                    }
                    self.synced.send_replace(true);
                }
            }
            // 3. The peers' health verdict, per upstream; held back until synced, so that
            //    a member that replaces another keeps the verdict in force meanwhile.
            for (name, up) in ups.iter().filter(|_| *self.synced.borrow()) {
                let prefix = format!("h/{name}/");
                let mut verdict: HashMap<String, String> = HashMap::new();
                for id in &live {
                    let Some(ns) = cc.node_state(id) else {
                        continue;
                    };
                    for (k, v) in ns.iter_prefix(&prefix) {
                        if !v.value.is_empty() {
                            verdict
                                .entry(k[prefix.len()..].to_string())
                                .or_insert_with(|| format!("peer:{}:{}", id.node_id, v.value));
                        }
                    }
                }
                let key = Arc::as_ptr(up) as usize;
                if s.sent
                    .get(name)
                    .is_none_or(|(k, v)| *k != key || *v != verdict)
                    && up.peer_down(verdict.clone())
                {
                    s.sent.insert(name.clone(), (key, verdict));
                }
            }
            // 4. Admin states: the newest action over every known replica wins
            //    (admin_state: Lamport version, then clamped time, node, state). A
            //    server that is not in the upstream (yet) gets its state when it appears
            //    (discovery, a reload), and again if it leaves and comes back; one whose
            //    state differs from the winner's (whatever set it) is set again.
            let mut apply: Vec<(Arc<UpstreamRuntime>, String, AdminState)> = Vec::new();
            let mut failbacks: Vec<Arc<UpstreamRuntime>> = Vec::new();
            let wall = now_ms();
            for (name, up) in ups.iter() {
                let prefix = format!("a/{name}/");
                let mut candidates: BTreeMap<String, Vec<Stamped>> = BTreeMap::new();
                for ns in cc.node_states().values() {
                    for (k, v) in ns.iter_prefix(&prefix) {
                        if let Some(st) = Stamped::decode(&v.value) {
                            candidates
                                .entry(k[prefix.len()..].to_string())
                                .or_default()
                                .push(st);
                        }
                    }
                }
                let key = Arc::as_ptr(up) as usize;
                let view = up.view();
                let current = |label: &str| {
                    view.servers
                        .iter()
                        .find(|sv| sv.handle.label == label || sv.handle.ip.to_string() == label)
                        .map(|sv| sv.admin_state)
                };
                let mut best: BTreeMap<String, Stamped> = BTreeMap::new();
                for (label, values) in candidates {
                    let Some(winner) = admin_state::newest(values, wall) else {
                        continue;
                    };
                    let k = format!("{prefix}{label}");
                    let me = cc.self_node_state();
                    let st = admin_state::keep(me.get(&k).and_then(Stamped::decode), winner);
                    let encoded = st.encode();
                    if me.get(&k) != Some(encoded.as_str()) {
                        me.set(k, encoded);
                        push = true;
                    }
                    let id = (key, label.clone());
                    match current(&label) {
                        None => {
                            s.applied.remove(&id);
                        }
                        Some(now_state) => {
                            if now_state != st.state
                                || s.applied.get(&id).is_none_or(|a| !a.same_action(&st))
                            {
                                s.applied.insert(id, st.clone());
                                apply.push((up.clone(), label.clone(), st.state));
                            }
                        }
                    }
                    best.insert(label, st);
                }
                if s.file.get(name) != Some(&best) {
                    s.file.insert(name.clone(), best);
                    s.file_dirty = true;
                }
                // Manual failback from another replica.
                let fkey = format!("f/{name}");
                let newest = cc
                    .node_states()
                    .values()
                    .filter_map(|ns| ns.get(&fkey))
                    .max_by_key(|v| failback_rank(v))
                    .map(str::to_string);
                if let Some(v) = newest {
                    let first = !s.failback_seen.contains_key(name);
                    if s.failback_seen.get(name) != Some(&v) {
                        s.failback_seen.insert(name.clone(), v.clone());
                        if !first && !v.ends_with(&format!(" {}", self.node_id)) {
                            failbacks.push(up.clone());
                        }
                    }
                } else {
                    s.failback_seen.insert(name.clone(), String::new());
                }
            }
            // 5. Push changes to every peer now.
            let mut targets: BTreeSet<SocketAddr> = cc.seed_nodes().into_iter().collect();
            targets.extend(cc.node_states().keys().map(|id| id.gossip_advertise_addr));
            targets.remove(&self.address);
            targets.remove(&self.cfg.listen);
            drop(cc);
            if push {
                for addr in &targets {
                    let _ = self.handle.gossip(*addr);
                }
            }
            for (up, label, state) in apply {
                if let Err(e) = up.set_admin(&label, state).await {
                    tracing::debug!(upstream = %up.name, server = %label, error = %e, "cluster: admin state not applied");
                } else {
                    tracing::info!(upstream = %up.name, server = %label, state = state.as_str(), "cluster: admin state applied");
                }
            }
            for up in failbacks {
                tracing::info!(upstream = %up.name, "cluster: manual failback from a peer");
                let _ = up.failback_now().await;
            }
            if s.file_dirty {
                s.file_dirty = false;
                if let Some(path) = &self.cfg.state_file
                    && let Err(e) = write_state_file(path, &s.file)
                {
                    tracing::warn!(path, error = %e, "cluster.state_file not written");
                }
                if let Some(tx) = &self.store
                    && let Ok(json) = serde_json::to_string_pretty(&s.file)
                {
                    tx.send_replace(json);
                }
            }
            if self.stop.is_cancelled() {
                return;
            }
            self.metrics.peers_known.set(peers.len() as i64);
            self.metrics.peers_alive.set(alive as i64);
            self.metrics
                .disagreements
                .set(peers.iter().filter(|p| p.alive && !p.agrees).count() as i64);
            self.status.store(Arc::new(peers));
        }
    }
}

#[derive(Default)]
struct SyncState {
    /// Last heartbeat of each peer and when it last advanced.
    seen: HashMap<ChitchatId, (chitchat::Heartbeat, Option<Instant>)>,
    /// Peer verdict last handed to each upstream's controller (by runtime identity).
    sent: HashMap<String, (usize, HashMap<String, String>)>,
    /// Admin state last applied per (runtime, server).
    applied: HashMap<(usize, String), Stamped>,
    failback_seen: HashMap<String, String>,
    file: StateFile,
    file_dirty: bool,
}

/// The order of manual failbacks (`f/<upstream>` = `<version> <unix ms> <origin>`):
/// Lamport version, then origin; the time is for the log only. The version is capped
/// like an admin state's.
fn failback_rank(v: &str) -> Option<(u64, String)> {
    let mut it = v.splitn(3, ' ');
    let version: u64 = it.next()?.parse().ok()?;
    let _at: u64 = it.next()?.parse().ok()?;
    Some((
        version.min(admin_state::MAX_VERSION),
        it.next()?.to_string(),
    ))
}

/// Writes the latest admin states to the ConfigMap, one write at a time: changes that
/// arrive during a write are merged into the next one (only the newest is written).
fn spawn_store_writer(
    store: kube_state::ConfigMapStore,
    reference: String,
) -> watch::Sender<String> {
    let (tx, mut rx) = watch::channel(String::new());
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let json = rx.borrow_and_update().clone();
            if let Err(e) = store.save(&json).await {
                tracing::warn!(configmap = %reference, error = %e, "cluster.state_configmap not written");
            }
        }
    });
    tx
}

/// Writes the admin states with a temporary file and a rename (never half a file).
fn write_state_file(path: &str, file: &StateFile) -> std::io::Result<()> {
    let tmp = format!("{path}.tmp");
    let text = serde_json::to_string_pretty(file).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
