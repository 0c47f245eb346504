//! Kubernetes source: `node/NAME` and `node/*` servers from the EndpointSlices of each
//! upstream's Service and the readiness of the Nodes.
//!
//! Two layers. The pure one ([`endpoints_by_node`], [`node_ready`], [`node_targets`])
//! turns API objects into a [`KubeView`] and a view into targets; it has the unit tests.
//! The thin one ([`spawn`]) runs kube-runtime watchers with reflector stores (one per
//! Service, one for all Nodes) and, on every event, rebuilds the view entry from the store
//! and hands it to the hub. API errors leave the view as it was (the last known state),
//! are counted and logged once per outage; the watcher retries with kube's default backoff.

use super::Tier;
use super::errors::{ErrorCounters, Outage};
use super::{Hub, Readiness, Target};
use crate::config::{Config, KubernetesRef, ServerRef};
use crate::health::Reason;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, NodeStatus};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use prometheus_client::metrics::counter::Counter;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// A watched Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub service: String,
}

impl ServiceKey {
    pub fn new(namespace: &str, service: &str) -> ServiceKey {
        ServiceKey {
            namespace: namespace.to_string(),
            service: service.to_string(),
        }
    }

    fn of(k: &KubernetesRef) -> ServiceKey {
        ServiceKey::new(&k.namespace, &k.service)
    }
}

/// The endpoint of a Service on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeEndpoint {
    /// The endpoint's first address.
    pub ip: IpAddr,
    /// `conditions.ready` (absent counts as ready, as the API defines).
    pub ready: bool,
}

/// What the Kubernetes source knows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KubeView {
    /// The endpoint of each watched Service on each node, by node name. A Service not
    /// listed yet is absent.
    pub services: HashMap<ServiceKey, BTreeMap<String, NodeEndpoint>>,
    /// Each known Node: whether its `Ready` condition is `True`.
    pub nodes: HashMap<String, bool>,
}

/// One endpoint per node from a Service's EndpointSlices. Pure.
///
/// Endpoints without `nodeName` or without a parseable first address (FQDN slices) are
/// skipped. When a node has several (a DaemonSet pod being replaced, or the IPv4 and IPv6
/// slices of a dual-stack Service), a ready one wins, then the lowest address, so the
/// choice does not depend on the order the API lists them in.
pub fn endpoints_by_node<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> BTreeMap<String, NodeEndpoint> {
    let mut out: BTreeMap<String, NodeEndpoint> = BTreeMap::new();
    for slice in slices {
        // `endpoints` is optional since the 1.36 API (a slice may list none).
        for ep in slice.endpoints.iter().flatten() {
            let Some(node) = ep.node_name.as_deref() else {
                continue;
            };
            let Some(Ok(ip)) = ep.addresses.first().map(|a| a.parse::<IpAddr>()) else {
                continue;
            };
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let candidate = NodeEndpoint { ip, ready };
            out.entry(node.to_string())
                .and_modify(|current| {
                    let better = (candidate.ready && !current.ready)
                        || (candidate.ready == current.ready && candidate.ip < current.ip);
                    if better {
                        *current = candidate;
                    }
                })
                .or_insert(candidate);
        }
    }
    out
}

/// Whether a Node counts as ready. Pure.
///
/// `Ready` must be `True`: `False` and `Unknown` (the node controller's verdict when the
/// kubelet stops reporting) are not ready. A Node without a `Ready` condition yet is not
/// judged (ready), so a half-initialised Node object cannot take a server down.
pub fn node_ready(node: &Node) -> bool {
    let conditions = node.status.as_ref().and_then(|s| s.conditions.as_ref());
    match conditions.and_then(|cs| cs.iter().find(|c| c.type_ == "Ready")) {
        Some(c) => c.status == "True",
        None => true,
    }
}

/// The targets of one `node/NAME` or `node/*` reference. Pure.
///
/// - `node/NAME`: the Service's endpoint on node NAME, if it has one.
/// - `node/*`: every node with an endpoint that is not in `named_nodes` (the nodes named
///   explicitly elsewhere in the same upstream), sorted by node name.
///
/// A not-ready endpoint stays listed as `NotReady(endpoint_not_ready)`, an endpoint on a
/// Node whose `Ready` is not `True` as `NotReady(node_not_ready)` (the node is the cause
/// when both hold), so the server shows as down rather than vanishing; a Node the view does
/// not know is not judged. The port is `kubernetes.port` (`None`: the listener's). Other
/// references yield nothing.
pub fn node_targets(
    server: &ServerRef,
    tier: Tier,
    kube_ref: &KubernetesRef,
    named_nodes: &HashSet<&str>,
    view: &KubeView,
) -> Vec<Target> {
    let Some(endpoints) = view.services.get(&ServiceKey::of(kube_ref)) else {
        return Vec::new();
    };
    let target = |node: &str, ep: &NodeEndpoint| {
        let readiness = if view.nodes.get(node) == Some(&false) {
            Readiness::NotReady(Reason::NodeNotReady)
        } else if !ep.ready {
            Readiness::NotReady(Reason::EndpointNotReady)
        } else {
            Readiness::Ready
        };
        Target {
            ip: ep.ip,
            port: kube_ref.port,
            tier,
            readiness,
        }
    };
    match server {
        ServerRef::Node(name) => endpoints
            .get(name)
            .map(|ep| target(name, ep))
            .into_iter()
            .collect(),
        // BTreeMap iteration is the node-name order.
        ServerRef::AllNodes => endpoints
            .iter()
            .filter(|(node, _)| !named_nodes.contains(node.as_str()))
            .map(|(node, ep)| target(node, ep))
            .collect(),
        _ => Vec::new(),
    }
}

/// Starts the watchers the upstreams of `config` need: one per distinct Service named by an
/// upstream with `node/…` servers, and one for the Nodes. Returns the first-answer signals.
pub(super) fn spawn(
    client: Client,
    config: &Config,
    hub: Arc<Hub>,
    errors: &ErrorCounters,
    cancel: &CancellationToken,
) -> Vec<oneshot::Receiver<()>> {
    // Which upstreams each Service feeds (for the error counters' upstream label).
    let mut services: BTreeMap<ServiceKey, Vec<&str>> = BTreeMap::new();
    let mut all: Vec<&str> = Vec::new();
    for (name, up) in &config.upstreams {
        if let (true, Some(k)) = (super::has_node_refs(up), &up.kubernetes) {
            services.entry(ServiceKey::of(k)).or_default().push(name);
            all.push(name);
        }
    }
    let mut firsts = Vec::new();
    for (key, users) in services {
        let (tx, rx) = oneshot::channel();
        firsts.push(rx);
        let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &key.namespace);
        // The label the EndpointSlice controller puts on every slice of a Service.
        let selector = format!("kubernetes.io/service-name={}", key.service);
        let (store, writer) = reflector::store();
        let stream = watcher(api, watcher::Config::default().labels(&selector))
            .reflect(writer)
            .default_backoff();
        let feed = Feed {
            what: format!("EndpointSlices of {}/{}", key.namespace, key.service),
            errors: errors.counters("kubernetes", &users),
            hub: hub.clone(),
            cancel: cancel.clone(),
        };
        tokio::spawn(feed.run(stream, store, tx, move |store, view| {
            let slices = store.state();
            let eps = endpoints_by_node(slices.iter().map(|s| s.as_ref()));
            view.kube.services.insert(key.clone(), eps);
        }));
    }

    let (tx, rx) = oneshot::channel();
    firsts.push(rx);
    let api: Api<Node> = Api::all(client);
    let (store, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        // A Node object carries images, volumes, capacity and more; only the name and the
        // conditions matter here, so the store keeps nothing else.
        .modify(|node: &mut Node| {
            node.metadata.managed_fields = None;
            node.metadata.annotations = None;
            node.metadata.labels = None;
            node.spec = None;
            node.status = node.status.take().map(|s| NodeStatus {
                conditions: s.conditions,
                ..NodeStatus::default()
            });
        })
        .reflect(writer)
        .default_backoff();
    let feed = Feed {
        what: "Nodes".to_string(),
        errors: errors.counters("kubernetes", &all),
        hub,
        cancel: cancel.clone(),
    };
    tokio::spawn(feed.run(stream, store, tx, |store, view| {
        view.kube.nodes = store
            .state()
            .iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, node_ready(n))))
            .collect();
    }));
    firsts
}

/// One watcher's loop: events refresh the view, errors are counted and logged once.
struct Feed {
    what: String,
    errors: Vec<Counter>,
    hub: Arc<Hub>,
    cancel: CancellationToken,
}

impl Feed {
    async fn run<K, S>(
        self,
        stream: S,
        store: Store<K>,
        first: oneshot::Sender<()>,
        refresh: impl Fn(&Store<K>, &mut super::View),
    ) where
        K: kube::Resource + Clone + 'static,
        K::DynamicType: Eq + std::hash::Hash + Clone,
        S: futures_util::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    {
        let mut stream = std::pin::pin!(stream);
        let mut first = Some(first);
        let mut outage = Outage::default();
        loop {
            let item = tokio::select! {
                () = self.cancel.cancelled() => return,
                item = stream.next() => item,
            };
            let Some(item) = item else {
                // The watcher stream never ends by itself; nothing left to do if it does.
                return;
            };
            match item {
                Ok(event) => {
                    if let Some(failures) = outage.succeed() {
                        tracing::info!(what = %self.what, failures, "Kubernetes API reachable again");
                    }
                    // During a (re)list the store swaps its contents only at InitDone; the
                    // events before it would recompute from the old state for nothing.
                    if matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
                        continue;
                    }
                    self.hub
                        .update(|view| refresh(&store, view), super::has_node_refs);
                }
                Err(error) => {
                    for c in &self.errors {
                        c.inc();
                    }
                    if outage.fail() {
                        tracing::warn!(
                            what = %self.what,
                            %error,
                            "Kubernetes API request failed; keeping the last known servers and retrying"
                        );
                    }
                }
            }
            if let Some(tx) = first.take() {
                let _ = tx.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": { "name": "janus-abc", "namespace": "media" },
            "addressType": "IPv4",
            "endpoints": endpoints,
        }))
        .expect("test slice")
    }

    fn node(name: &str, ready: Option<&str>) -> Node {
        let conditions = match ready {
            Some(status) => json!([
                { "type": "MemoryPressure", "status": "False" },
                { "type": "Ready", "status": status },
            ]),
            None => json!([]),
        };
        serde_json::from_value(json!({
            "metadata": { "name": name },
            "status": { "conditions": conditions },
        }))
        .expect("test node")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test ip")
    }

    fn kref(port: Option<u16>) -> KubernetesRef {
        KubernetesRef {
            namespace: "media".into(),
            service: "janus".into(),
            port,
        }
    }

    /// A view with the Service's endpoints `(node, ip, ready)` and the given node states.
    fn view(eps: &[(&str, &str, bool)], nodes: &[(&str, bool)]) -> KubeView {
        let eps = eps
            .iter()
            .map(|(n, i, r)| {
                let ep = NodeEndpoint {
                    ip: ip(i),
                    ready: *r,
                };
                (n.to_string(), ep)
            })
            .collect();
        KubeView {
            services: HashMap::from([(ServiceKey::new("media", "janus"), eps)]),
            nodes: nodes.iter().map(|(n, r)| (n.to_string(), *r)).collect(),
        }
    }

    fn tgt(i: &str, port: Option<u16>, tier: Tier, readiness: Readiness) -> Target {
        Target {
            ip: ip(i),
            port,
            tier,
            readiness,
        }
    }

    const READY: Readiness = Readiness::Ready;
    const EP_DOWN: Readiness = Readiness::NotReady(Reason::EndpointNotReady);
    const NODE_DOWN: Readiness = Readiness::NotReady(Reason::NodeNotReady);

    fn all() -> ServerRef {
        ServerRef::AllNodes
    }

    fn named(n: &str) -> ServerRef {
        ServerRef::Node(n.to_string())
    }

    #[test]
    fn endpoints_by_node_reads_node_ready_and_first_address() {
        let s = slice(json!([
            { "addresses": ["10.1.0.2", "10.9.9.9"], "nodeName": "b", "conditions": { "ready": true } },
            { "addresses": ["10.1.0.1"], "nodeName": "a", "conditions": { "ready": false } },
            { "addresses": ["10.1.0.3"], "nodeName": "c" },
            { "addresses": ["10.1.0.4"], "conditions": { "ready": true } },
            { "addresses": ["not-an-ip"], "nodeName": "d" },
            { "addresses": [], "nodeName": "e" },
        ]));
        let eps = endpoints_by_node([&s]);
        assert_eq!(
            eps.into_iter().collect::<Vec<_>>(),
            vec![
                (
                    "a".into(),
                    NodeEndpoint {
                        ip: ip("10.1.0.1"),
                        ready: false
                    }
                ),
                (
                    "b".into(),
                    NodeEndpoint {
                        ip: ip("10.1.0.2"),
                        ready: true
                    }
                ),
                // No conditions: ready, as the API defines a missing `ready`.
                (
                    "c".into(),
                    NodeEndpoint {
                        ip: ip("10.1.0.3"),
                        ready: true
                    }
                ),
            ]
        );
    }

    #[test]
    fn endpoints_by_node_prefers_ready_then_lowest_address_across_slices() {
        let old = slice(json!([
            { "addresses": ["10.1.0.9"], "nodeName": "a", "conditions": { "ready": false } },
            { "addresses": ["10.1.0.7"], "nodeName": "b", "conditions": { "ready": true } },
        ]));
        let new = slice(json!([
            { "addresses": ["10.1.0.10"], "nodeName": "a", "conditions": { "ready": true } },
            { "addresses": ["10.1.0.6"], "nodeName": "b", "conditions": { "ready": true } },
        ]));
        for order in [[&old, &new], [&new, &old]] {
            let eps = endpoints_by_node(order);
            assert_eq!(
                eps["a"],
                NodeEndpoint {
                    ip: ip("10.1.0.10"),
                    ready: true
                }
            );
            assert_eq!(
                eps["b"],
                NodeEndpoint {
                    ip: ip("10.1.0.6"),
                    ready: true
                }
            );
        }
    }

    #[test]
    fn node_ready_needs_ready_true() {
        assert!(node_ready(&node("a", Some("True"))));
        assert!(!node_ready(&node("a", Some("False"))));
        assert!(!node_ready(&node("a", Some("Unknown"))));
        assert!(
            node_ready(&node("a", None)),
            "no Ready condition: not judged"
        );
    }

    #[test]
    fn named_node_yields_its_endpoint_with_the_configured_port() {
        let v = view(&[("a", "10.1.0.1", true), ("b", "10.1.0.2", true)], &[]);
        let none = HashSet::new();
        assert_eq!(
            node_targets(&named("b"), Tier::Primary, &kref(Some(8088)), &none, &v),
            vec![tgt("10.1.0.2", Some(8088), Tier::Primary, READY)]
        );
        assert_eq!(
            node_targets(&named("b"), Tier::Backup, &kref(None), &none, &v),
            vec![tgt("10.1.0.2", None, Tier::Backup, READY)],
            "no kubernetes.port: the listener's port"
        );
        assert_eq!(
            node_targets(&named("zz"), Tier::Primary, &kref(None), &none, &v),
            vec![],
            "a node without an endpoint yields nothing"
        );
    }

    #[test]
    fn all_nodes_skips_named_ones_and_sorts_by_node_name() {
        let v = view(
            &[
                ("node-c", "10.1.0.1", true),
                ("node-a", "10.1.0.3", true),
                ("node-b", "10.1.0.2", true),
            ],
            &[],
        );
        let named_nodes = HashSet::from(["node-b"]);
        assert_eq!(
            node_targets(&all(), Tier::Backup, &kref(Some(1)), &named_nodes, &v),
            vec![
                tgt("10.1.0.3", Some(1), Tier::Backup, READY),
                tgt("10.1.0.1", Some(1), Tier::Backup, READY),
            ]
        );
    }

    #[test]
    fn not_ready_endpoint_stays_listed_as_endpoint_not_ready() {
        let v = view(&[("a", "10.1.0.1", false), ("b", "10.1.0.2", true)], &[]);
        assert_eq!(
            node_targets(&all(), Tier::Primary, &kref(None), &HashSet::new(), &v),
            vec![
                tgt("10.1.0.1", None, Tier::Primary, EP_DOWN),
                tgt("10.1.0.2", None, Tier::Primary, READY),
            ]
        );
    }

    #[test]
    fn node_not_ready_wins_over_endpoint_readiness() {
        let v = view(
            &[
                ("a", "10.1.0.1", true),
                ("b", "10.1.0.2", false),
                ("c", "10.1.0.3", true),
            ],
            &[("a", false), ("b", false), ("c", true)],
        );
        assert_eq!(
            node_targets(&all(), Tier::Primary, &kref(None), &HashSet::new(), &v),
            vec![
                tgt("10.1.0.1", None, Tier::Primary, NODE_DOWN),
                tgt("10.1.0.2", None, Tier::Primary, NODE_DOWN),
                tgt("10.1.0.3", None, Tier::Primary, READY),
            ]
        );
    }

    #[test]
    fn unknown_node_is_not_judged() {
        let v = view(&[("a", "10.1.0.1", true)], &[("other", false)]);
        assert_eq!(
            node_targets(&named("a"), Tier::Primary, &kref(None), &HashSet::new(), &v),
            vec![tgt("10.1.0.1", None, Tier::Primary, READY)]
        );
    }

    #[test]
    fn unwatched_service_and_other_refs_yield_nothing() {
        let v = view(&[("a", "10.1.0.1", true)], &[]);
        let other = KubernetesRef {
            namespace: "media".into(),
            service: "coturn".into(),
            port: None,
        };
        let none = HashSet::new();
        assert_eq!(
            node_targets(&all(), Tier::Primary, &other, &none, &v),
            vec![]
        );
        let static_ref: ServerRef = "10.0.0.1:1".parse().expect("ref");
        assert_eq!(
            node_targets(&static_ref, Tier::Primary, &kref(None), &none, &v),
            vec![]
        );
    }

    #[test]
    fn removed_endpoint_disappears_from_the_list() {
        let before = view(&[("a", "10.1.0.1", true), ("b", "10.1.0.2", true)], &[]);
        let after = view(&[("b", "10.1.0.2", true)], &[]);
        let none = HashSet::new();
        assert_eq!(
            node_targets(&all(), Tier::Primary, &kref(None), &none, &before).len(),
            2
        );
        assert_eq!(
            node_targets(&all(), Tier::Primary, &kref(None), &none, &after),
            vec![tgt("10.1.0.2", None, Tier::Primary, READY)]
        );
        assert_eq!(
            node_targets(&named("a"), Tier::Primary, &kref(None), &none, &after),
            vec![]
        );
    }
}
