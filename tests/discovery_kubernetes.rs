//! Kubernetes discovery against kube's mock service (tower-test): a small fake API server
//! answers the watchers' list and watch requests for EndpointSlices and Nodes, and the
//! tests change those objects and check the upstream's server list: endpoints appear and
//! disappear, readiness flips, a node turns NotReady, the API answers 500.
//!
//! The fake keeps what a watcher relies on and nothing more: a resource version per
//! change, lists, watch streams that replay the changes after the requested version, and
//! a switch that makes every request fail.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use mediagate::config::load_str;
use mediagate::discovery::{Discovery, Readiness, Target};
use mediagate::health::Reason;
use mediagate::metrics::Metrics;
use mediagate::upstream::Tier;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

type Body = UnsyncBoxBody<Bytes, Infallible>;
type Handle = tower_test::mock::Handle<Request<kube::client::Body>, Response<Body>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Slices,
    Nodes,
}

impl Kind {
    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Kind::Slices => ("discovery.k8s.io/v1", "EndpointSliceList"),
            Kind::Nodes => ("v1", "NodeList"),
        }
    }
}

/// The fake API server's state.
#[derive(Default)]
struct State {
    version: u64,
    objects: BTreeMap<(Kind, String), Value>,
    /// Every change as a watch event line, for replaying to a watch that starts later.
    log: Vec<(u64, Kind, Bytes)>,
    watches: Vec<(Kind, mpsc::UnboundedSender<Bytes>)>,
    failing: bool,
    /// The path and query of every request, for checking what the watchers ask for.
    requests: Vec<String>,
}

#[derive(Clone)]
struct FakeApi(Arc<Mutex<State>>);

impl FakeApi {
    /// A fake serving `handle` until the test ends.
    fn serve(mut handle: Handle) -> FakeApi {
        let api = FakeApi(Arc::default());
        let server = api.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                send.send_response(server.answer(&req));
            }
        });
        api
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().expect("fake api state")
    }

    fn answer(&self, req: &Request<kube::client::Body>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let mut st = self.state();
        st.requests.push(format!("{path}?{query}"));
        if st.failing {
            let status = json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500
            });
            return respond(StatusCode::INTERNAL_SERVER_ERROR, full(status.to_string()));
        }
        let kind = if path == "/apis/discovery.k8s.io/v1/namespaces/media/endpointslices" {
            Kind::Slices
        } else if path == "/api/v1/nodes" {
            Kind::Nodes
        } else {
            return respond(StatusCode::NOT_FOUND, full(String::new()));
        };
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_string)
        };
        if param("watch").as_deref() == Some("true") {
            let since: u64 = param("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let (tx, rx) = mpsc::unbounded_channel();
            for (v, k, line) in &st.log {
                if *k == kind && *v > since {
                    let _ = tx.send(line.clone());
                }
            }
            st.watches.push((kind, tx));
            let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                let line = rx.recv().await?;
                Some((Ok::<_, Infallible>(Frame::data(line)), rx))
            });
            return respond(StatusCode::OK, StreamBody::new(frames).boxed_unsync());
        }
        let (api_version, list_kind) = kind.list_kind();
        let items: Vec<&Value> = st
            .objects
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, v)| v)
            .collect();
        let list = json!({
            "apiVersion": api_version, "kind": list_kind,
            "metadata": { "resourceVersion": st.version.to_string() },
            "items": items,
        });
        respond(StatusCode::OK, full(list.to_string()))
    }

    /// Creates or replaces an object and tells the open watches.
    fn apply(&self, kind: Kind, mut object: Value) {
        let mut st = self.state();
        st.version += 1;
        let version = st.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let name = object["metadata"]["name"]
            .as_str()
            .expect("object name")
            .to_string();
        let event = if st.objects.contains_key(&(kind, name.clone())) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.objects.insert((kind, name), object.clone());
        st.publish(kind, version, event, object);
    }

    fn delete(&self, kind: Kind, name: &str) {
        let mut st = self.state();
        st.version += 1;
        let version = st.version;
        let mut object = st
            .objects
            .remove(&(kind, name.to_string()))
            .expect("deleting an existing object");
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        st.publish(kind, version, "DELETED", object);
    }

    /// While failing, every request gets a 500 and the open watches are closed (as when the
    /// API server goes away), so the watchers have to come back and fail.
    fn set_failing(&self, failing: bool) {
        let mut st = self.state();
        st.failing = failing;
        if failing {
            st.watches.clear();
        }
    }

    fn requests(&self) -> Vec<String> {
        self.state().requests.clone()
    }
}

impl State {
    fn publish(&mut self, kind: Kind, version: u64, event: &str, object: Value) {
        let mut line = json!({ "type": event, "object": object }).to_string();
        line.push('\n');
        let line = Bytes::from(line);
        self.log.push((version, kind, line.clone()));
        self.watches
            .retain(|(k, tx)| *k != kind || tx.send(line.clone()).is_ok());
    }
}

fn full(text: String) -> Body {
    Full::new(Bytes::from(text)).boxed_unsync()
}

fn respond(status: StatusCode, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// The EndpointSlice of Service media/janus with endpoints `(node, ip, ready)`.
fn slice(name: &str, endpoints: &[(&str, &str, bool)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(node, ip, ready)| {
            json!({ "addresses": [ip], "nodeName": node, "conditions": { "ready": ready } })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": "media",
            "labels": { "kubernetes.io/service-name": "janus" },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{ "name": "http", "port": 8088, "protocol": "TCP" }],
    })
}

fn node(name: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": name },
        "status": {
            "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }],
            "images": [{ "names": ["registry.example/janus:1"], "sizeBytes": 1 }],
        },
    })
}

/// Upstream `janus`: node b preferred, every other node as backup; port 8088.
fn config() -> mediagate::config::Config {
    let yaml = "
discovery: { kubernetes: { enabled: true } }
listeners:
  - { name: janus-http, protocol: tcp, listen: 127.0.0.1:8088, upstream: janus }
upstreams:
  janus:
    primary: [node/b]
    backup: [node/*, 10.9.9.9:8088]
    kubernetes: { namespace: media, service: janus, port: 8088 }
";
    load_str(yaml, "test.yaml").expect("valid test config")
}

async fn start(api_failing: bool) -> (FakeApi, Metrics, Discovery) {
    let (service, handle) = tower_test::mock::pair::<Request<kube::client::Body>, Response<Body>>();
    let api = FakeApi::serve(handle);
    api.set_failing(api_failing);
    let client = kube::Client::new(service, "default");
    let metrics = Metrics::new();
    let discovery = Discovery::start_with_kube(&config(), &metrics, Some(client))
        .await
        .expect("start discovery");
    (api, metrics, discovery)
}

fn t(ip: &str, tier: Tier, readiness: Readiness) -> Target {
    Target {
        ip: ip.parse().expect("test ip"),
        port: Some(8088),
        tier,
        readiness,
    }
}

const READY: Readiness = Readiness::Ready;
const EP_DOWN: Readiness = Readiness::NotReady(Reason::EndpointNotReady);
const NODE_DOWN: Readiness = Readiness::NotReady(Reason::NodeNotReady);

fn static_backup() -> Target {
    t("10.9.9.9", Tier::Backup, READY)
}

async fn wait_list(rx: &mut watch::Receiver<Vec<Target>>, want: &[Target], what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if *rx.borrow_and_update() == want {
            return;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("{what}: channel closed"),
            Err(_) => panic!(
                "{what}: list not reached within 20 s\nwant {want:?}\nhave {:?}",
                *rx.borrow()
            ),
        }
    }
}

fn kube_errors(metrics: &Metrics) -> u64 {
    let prefix = "mediagate_discovery_errors_total{source=\"kubernetes\",upstream=\"janus\"} ";
    metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map(|v| v.trim().parse().expect("counter value"))
        .unwrap_or_else(|| panic!("no series {prefix}"))
}

async fn wait_errors(metrics: &Metrics, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while kube_errors(metrics) < at_least {
        assert!(
            Instant::now() < deadline,
            "fewer than {at_least} Kubernetes errors counted within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn kubernetes_endpoints_and_nodes_map_to_server_states() {
    let (api, metrics, discovery) = start(false).await;
    for n in ["a", "b", "c"] {
        api.apply(Kind::Nodes, node(n, true));
    }
    let mut rx = discovery.watch("janus").expect("upstream janus");
    // The Service has no endpoints yet: only the static backup.
    wait_list(&mut rx, &[static_backup()], "no endpoints").await;

    // Endpoints appear: node b first (named), then node/* by node name, then the static one.
    api.apply(
        Kind::Slices,
        slice(
            "janus-1",
            &[
                ("c", "10.1.0.3", true),
                ("b", "10.1.0.2", true),
                ("a", "10.1.0.1", true),
            ],
        ),
    );
    wait_list(
        &mut rx,
        &[
            t("10.1.0.2", Tier::Primary, READY),
            t("10.1.0.1", Tier::Backup, READY),
            t("10.1.0.3", Tier::Backup, READY),
            static_backup(),
        ],
        "endpoints appeared",
    )
    .await;

    // b's endpoint turns not ready: still listed, down with endpoint_not_ready.
    api.apply(
        Kind::Slices,
        slice(
            "janus-1",
            &[
                ("c", "10.1.0.3", true),
                ("b", "10.1.0.2", false),
                ("a", "10.1.0.1", true),
            ],
        ),
    );
    wait_list(
        &mut rx,
        &[
            t("10.1.0.2", Tier::Primary, EP_DOWN),
            t("10.1.0.1", Tier::Backup, READY),
            t("10.1.0.3", Tier::Backup, READY),
            static_backup(),
        ],
        "endpoint b not ready",
    )
    .await;

    // Node a turns NotReady while its endpoint still says ready: node_not_ready.
    api.apply(Kind::Nodes, node("a", false));
    wait_list(
        &mut rx,
        &[
            t("10.1.0.2", Tier::Primary, EP_DOWN),
            t("10.1.0.1", Tier::Backup, NODE_DOWN),
            t("10.1.0.3", Tier::Backup, READY),
            static_backup(),
        ],
        "node a NotReady",
    )
    .await;

    // c's endpoint disappears: c leaves the list (the controller reports `removed`).
    api.apply(
        Kind::Slices,
        slice(
            "janus-1",
            &[("b", "10.1.0.2", false), ("a", "10.1.0.1", true)],
        ),
    );
    let before_outage = [
        t("10.1.0.2", Tier::Primary, EP_DOWN),
        t("10.1.0.1", Tier::Backup, NODE_DOWN),
        static_backup(),
    ];
    wait_list(&mut rx, &before_outage, "endpoint c removed").await;
    assert_eq!(kube_errors(&metrics), 0);

    // The API answers 500 (and drops the watches): the list stays, the errors are counted.
    api.set_failing(true);
    wait_errors(&metrics, 2).await;
    assert!(
        !rx.has_changed().expect("channel open"),
        "the list changed during the API outage: {:?}",
        *rx.borrow()
    );
    assert_eq!(*rx.borrow(), before_outage);

    // The API comes back; changes flow again (the watchers resume where they left off).
    api.set_failing(false);
    api.apply(Kind::Nodes, node("a", true));
    api.apply(
        Kind::Slices,
        slice(
            "janus-1",
            &[("b", "10.1.0.2", true), ("a", "10.1.0.1", true)],
        ),
    );
    wait_list(
        &mut rx,
        &[
            t("10.1.0.2", Tier::Primary, READY),
            t("10.1.0.1", Tier::Backup, READY),
            static_backup(),
        ],
        "after the API came back",
    )
    .await;

    // The whole slice goes: every node server goes.
    api.delete(Kind::Slices, "janus-1");
    wait_list(&mut rx, &[static_backup()], "slice deleted").await;

    // The watchers asked for the Service's slices in its namespace, and for all Nodes.
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.contains("labelSelector=kubernetes.io%2Fservice-name%3Djanus")),
        "{requests:#?}"
    );
    assert!(
        requests.iter().any(|r| r.starts_with("/api/v1/nodes?")),
        "{requests:#?}"
    );
    discovery.stop();
}

/// Several slices of one Service (the controller splits large Services, and a DaemonSet
/// pod being replaced can leave two endpoints on one node): one server per node.
#[tokio::test]
async fn kubernetes_endpoints_spread_over_slices() {
    let (api, _metrics, discovery) = start(false).await;
    let mut rx = discovery.watch("janus").expect("upstream janus");
    api.apply(Kind::Slices, slice("janus-1", &[("b", "10.1.0.2", true)]));
    api.apply(
        Kind::Slices,
        slice(
            "janus-2",
            &[("a", "10.1.0.1", true), ("b", "10.1.0.9", false)],
        ),
    );
    wait_list(
        &mut rx,
        &[
            t("10.1.0.2", Tier::Primary, READY),
            t("10.1.0.1", Tier::Backup, READY),
            static_backup(),
        ],
        "two slices",
    )
    .await;
    api.delete(Kind::Slices, "janus-1");
    wait_list(
        &mut rx,
        &[
            t("10.1.0.9", Tier::Primary, EP_DOWN),
            t("10.1.0.1", Tier::Backup, READY),
            static_backup(),
        ],
        "first slice deleted",
    )
    .await;
    discovery.stop();
}

/// The API fails from the start: `start` returns anyway (bounded wait) with the static
/// servers, counts the errors, and fills the node servers in once the API answers.
#[tokio::test]
async fn kubernetes_api_down_at_start_then_recovers() {
    let started = Instant::now();
    let (api, metrics, discovery) = start(true).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let mut rx = discovery.watch("janus").expect("upstream janus");
    assert_eq!(*rx.borrow_and_update(), vec![static_backup()]);
    wait_errors(&metrics, 1).await;

    api.apply(Kind::Nodes, node("b", true));
    api.apply(Kind::Slices, slice("janus-1", &[("b", "10.1.0.2", true)]));
    api.set_failing(false);
    wait_list(
        &mut rx,
        &[t("10.1.0.2", Tier::Primary, READY), static_backup()],
        "after the API came back",
    )
    .await;
    discovery.stop();
}
