//! Discovery: turns the server references of an upstream (`10.0.0.1:5004`, DNS names,
//! `node/NAME`, `node/*`) into the concrete, ordered server list its controller runs.
//!
//! Each upstream gets a `watch` channel of [`Target`] lists: the full list in priority
//! order (primary refs first, in written order, then backup refs), re-sent whole on every
//! change. Static entries never change; DNS entries follow their records' TTL; `node/…`
//! entries follow Kubernetes EndpointSlices and Node readiness.
//!
//! Layout: the sources (`dns`, `kubernetes`) only fetch answers and put them into one
//! shared [`View`]; [`targets`] is the pure function that turns an upstream's references
//! and the view into its list, so every ordering and readiness rule is plain code with unit
//! tests. The [`Discovery`] hub recomputes the lists of the upstreams a source touches and
//! sends the ones that changed.

mod dns;
mod errors;
pub mod kubernetes;
mod target;

pub use kubernetes::{KubeView, NodeEndpoint, ServiceKey, node_targets};
pub use target::{Readiness, Target, Tier};

use crate::config::{Config, ServerRef, UpstreamConfig};
use crate::metrics::Metrics;
use indexmap::IndexMap;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

/// Everything the sources have learnt so far; the input of [`targets`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    /// The addresses of each DNS name (A and AAAA together). A name that has not answered
    /// yet is absent and yields no server; a name whose records are gone maps to `[]`.
    pub dns: HashMap<String, Vec<IpAddr>>,
    /// Endpoints of the watched Services and the readiness of the Nodes.
    pub kube: KubeView,
}

/// The server list of one upstream from the current view. Pure.
///
/// Primary refs in written order, then backup refs; a DNS name contributes all its
/// addresses, sorted; `node/…` refs are expanded by [`node_targets`]. An `(ip, port)` that
/// already appeared earlier in the list is skipped (the first occurrence, with its tier
/// and readiness, wins).
pub fn targets(upstream: &UpstreamConfig, view: &View) -> Vec<Target> {
    // `node/*` means the nodes not named elsewhere in the same upstream, whichever tier
    // names them: `primary: [node/a], backup: [node/*]` must not list node a twice.
    let named_nodes: HashSet<&str> = refs(upstream)
        .filter_map(|(_, r)| match r {
            ServerRef::Node(n) => Some(n.as_str()),
            _ => None,
        })
        .collect();
    let ready = |ip, port, tier| Target {
        ip,
        port,
        tier,
        readiness: Readiness::Ready,
    };

    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (tier, r) in refs(upstream) {
        let produced = match r {
            ServerRef::Static(sa) => vec![ready(sa.ip(), Some(sa.port()), tier)],
            ServerRef::StaticIp(ip) => vec![ready(*ip, None, tier)],
            ServerRef::Dns { host, port } => {
                let mut ips = view.dns.get(host).cloned().unwrap_or_default();
                ips.sort();
                ips.into_iter().map(|ip| ready(ip, *port, tier)).collect()
            }
            ServerRef::Node(_) | ServerRef::AllNodes => match &upstream.kubernetes {
                Some(k) => node_targets(r, tier, k, &named_nodes, &view.kube),
                // Validation rejects node refs without a kubernetes block; nothing to list.
                None => Vec::new(),
            },
        };
        for t in produced {
            if seen.insert((t.ip, t.port)) {
                out.push(t);
            }
        }
    }
    out
}

/// The references of an upstream with their tier, in priority order.
fn refs(upstream: &UpstreamConfig) -> impl Iterator<Item = (Tier, &ServerRef)> {
    let primary = upstream.primary.iter().map(|r| (Tier::Primary, r));
    let backup = upstream.backup.iter().map(|r| (Tier::Backup, r));
    primary.chain(backup)
}

fn has_node_refs(upstream: &UpstreamConfig) -> bool {
    refs(upstream).any(|(_, r)| matches!(r, ServerRef::Node(_) | ServerRef::AllNodes))
}

fn dns_hosts(upstream: &UpstreamConfig) -> impl Iterator<Item = &str> {
    refs(upstream).filter_map(|(_, r)| match r {
        ServerRef::Dns { host, .. } => Some(host.as_str()),
        _ => None,
    })
}

/// How long [`Discovery::start`] waits for every source's first answer (or first failure),
/// so that controllers start from complete lists instead of failing over to a backup and
/// back while the primary's DNS name or endpoints are still being looked up.
const STARTUP_WAIT: Duration = Duration::from_secs(5);

/// The shared state: the view, and one channel per upstream.
struct Hub {
    upstreams: IndexMap<String, Slot>,
    view: Mutex<View>,
}

struct Slot {
    config: UpstreamConfig,
    tx: watch::Sender<Vec<Target>>,
}

impl Hub {
    fn new(config: &Config) -> Hub {
        let view = View::default();
        let upstreams = config
            .upstreams
            .iter()
            .map(|(name, up)| {
                // Static refs resolve at once; the rest is filled in by the sources.
                let (tx, _) = watch::channel(targets(up, &view));
                let slot = Slot {
                    config: up.clone(),
                    tx,
                };
                (name.clone(), slot)
            })
            .collect();
        Hub {
            upstreams,
            view: Mutex::new(view),
        }
    }

    /// Applies `change` to the view, then recomputes and (when different) sends the list
    /// of every upstream `affected` selects.
    fn update(&self, change: impl FnOnce(&mut View), affected: impl Fn(&UpstreamConfig) -> bool) {
        // A panic elsewhere while holding the lock cannot leave the view half-written in a
        // way that matters: every change replaces whole entries.
        let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut view);
        for slot in self.upstreams.values() {
            if !affected(&slot.config) {
                continue;
            }
            let list = targets(&slot.config, &view);
            slot.tx.send_if_modified(|current| {
                if *current == list {
                    return false;
                }
                *current = list;
                true
            });
        }
    }
}

/// Watches every upstream's server list. Static refs resolve at once; DNS and node refs
/// as their sources answer.
///
/// Dropping it stops the sources, like [`Discovery::stop`].
pub struct Discovery {
    hub: Arc<Hub>,
    cancel: CancellationToken,
}

impl Discovery {
    /// Starts DNS and (if `discovery.kubernetes.enabled` and some upstream has `node/…`
    /// servers) Kubernetes sources for all upstreams of `config`. Kubernetes client:
    /// in-cluster config, else KUBECONFIG (`kube::Client::try_default`).
    ///
    /// Returns once every source has answered once (or failed once), at most after
    /// [`STARTUP_WAIT`]; sources that are slower fill their servers in later.
    pub async fn start(config: &Config, metrics: &Metrics) -> anyhow::Result<Discovery> {
        let needs_kube =
            config.discovery.kubernetes.enabled && config.upstreams.values().any(has_node_refs);
        let client = if needs_kube {
            let client = kube::Client::try_default().await.map_err(|e| {
                anyhow::anyhow!(
                    "discovery.kubernetes: no Kubernetes client (neither in-cluster \
                     configuration nor KUBECONFIG): {e}"
                )
            })?;
            Some(client)
        } else {
            None
        };
        Self::start_with_kube(config, metrics, client).await
    }

    /// As [`Discovery::start`], with the Kubernetes client given (tests: a tower-test mock
    /// service). `None`: no Kubernetes source; `node/…` servers then stay unresolved.
    pub async fn start_with_kube(
        config: &Config,
        metrics: &Metrics,
        client: Option<kube::Client>,
    ) -> anyhow::Result<Discovery> {
        let hub = Arc::new(Hub::new(config));
        let cancel = CancellationToken::new();
        let errors = errors::ErrorCounters::new(metrics, config);
        let mut first_answers: Vec<oneshot::Receiver<()>> = Vec::new();

        // One task per distinct DNS name, shared by every upstream that names it.
        let mut hosts: IndexMap<&str, Vec<&str>> = IndexMap::new();
        for (name, up) in &config.upstreams {
            for host in dns_hosts(up) {
                let users = hosts.entry(host).or_default();
                if !users.contains(&name.as_str()) {
                    users.push(name);
                }
            }
        }
        if !hosts.is_empty() {
            let resolver = dns::build_resolver(&config.discovery.dns)?;
            for (host, users) in hosts {
                let (tx, rx) = oneshot::channel();
                first_answers.push(rx);
                let task = dns::HostTask {
                    host: host.to_string(),
                    resolver: resolver.clone(),
                    min_ttl: config.discovery.dns.min_ttl.get(),
                    max_ttl: config.discovery.dns.max_ttl.get(),
                    errors: errors.counters("dns", &users),
                    hub: hub.clone(),
                    cancel: cancel.clone(),
                };
                tokio::spawn(task.run(tx));
            }
        }

        let node_upstreams: Vec<&str> = config
            .upstreams
            .iter()
            .filter(|(_, up)| has_node_refs(up))
            .map(|(name, _)| name.as_str())
            .collect();
        match client {
            Some(client) if !node_upstreams.is_empty() => {
                first_answers.extend(kubernetes::spawn(
                    client,
                    config,
                    hub.clone(),
                    &errors,
                    &cancel,
                ));
            }
            _ if !node_upstreams.is_empty() => tracing::warn!(
                upstreams = ?node_upstreams,
                "no Kubernetes client: node/… servers stay unresolved"
            ),
            _ => {}
        }

        // A source that ends before answering drops its sender; that counts as answered.
        let _ =
            tokio::time::timeout(STARTUP_WAIT, futures_util::future::join_all(first_answers)).await;
        Ok(Discovery { hub, cancel })
    }

    /// The list of one upstream: full list in priority order, re-sent on change. `None`
    /// for an upstream that is not in the configuration `start` was given.
    pub fn watch(&self, upstream: &str) -> Option<watch::Receiver<Vec<Target>>> {
        self.hub.upstreams.get(upstream).map(|s| s.tx.subscribe())
    }

    /// Stops every source. The channels keep their last lists.
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KubernetesRef;

    fn upstream(primary: &[&str], backup: &[&str]) -> UpstreamConfig {
        let parse = |l: &[&str]| -> Vec<ServerRef> {
            l.iter().map(|s| s.parse().expect("test ref")).collect()
        };
        let mut up: UpstreamConfig =
            serde_json::from_value(serde_json::json!({ "primary": [] })).expect("defaults");
        up.primary = parse(primary);
        up.backup = parse(backup);
        up
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test ip")
    }

    fn t(ip_s: &str, port: Option<u16>, tier: Tier) -> Target {
        Target {
            ip: ip(ip_s),
            port,
            tier,
            readiness: Readiness::Ready,
        }
    }

    #[test]
    fn static_refs_in_written_order_primary_then_backup() {
        let up = upstream(
            &["10.0.0.2:5004", "10.0.0.1"],
            &["[fd00::1]:5004", "10.0.0.3"],
        );
        assert_eq!(
            targets(&up, &View::default()),
            vec![
                t("10.0.0.2", Some(5004), Tier::Primary),
                t("10.0.0.1", None, Tier::Primary),
                t("fd00::1", Some(5004), Tier::Backup),
                t("10.0.0.3", None, Tier::Backup),
            ]
        );
    }

    #[test]
    fn dns_name_yields_every_address_sorted_with_its_port() {
        let up = upstream(&["janus.test:5004"], &["coturn.test", "10.0.0.9:1"]);
        let mut view = View::default();
        view.dns.insert(
            "janus.test".into(),
            vec![ip("10.0.0.12"), ip("fd00::1"), ip("10.0.0.11")],
        );
        view.dns.insert("coturn.test".into(), vec![ip("10.0.1.1")]);
        assert_eq!(
            targets(&up, &view),
            vec![
                t("10.0.0.11", Some(5004), Tier::Primary),
                t("10.0.0.12", Some(5004), Tier::Primary),
                t("fd00::1", Some(5004), Tier::Primary),
                t("10.0.1.1", None, Tier::Backup),
                t("10.0.0.9", Some(1), Tier::Backup),
            ]
        );
    }

    #[test]
    fn unresolved_and_empty_dns_names_yield_nothing() {
        let up = upstream(&["janus.test:5004"], &["gone.test:5004", "10.0.0.9:1"]);
        let mut view = View::default();
        view.dns.insert("gone.test".into(), vec![]);
        assert_eq!(
            targets(&up, &view),
            vec![t("10.0.0.9", Some(1), Tier::Backup)]
        );
    }

    #[test]
    fn identical_ip_and_port_listed_once_first_wins() {
        let up = upstream(
            &["10.0.0.1:5004", "janus.test:5004"],
            &["10.0.0.1:5004", "10.0.0.1", "10.0.0.2:5004"],
        );
        let mut view = View::default();
        view.dns
            .insert("janus.test".into(), vec![ip("10.0.0.2"), ip("10.0.0.1")]);
        assert_eq!(
            targets(&up, &view),
            vec![
                t("10.0.0.1", Some(5004), Tier::Primary),
                t("10.0.0.2", Some(5004), Tier::Primary),
                // Same IP without a port is another server (the listener's port).
                t("10.0.0.1", None, Tier::Backup),
            ]
        );
    }

    #[test]
    fn node_refs_mix_with_static_refs_in_order() {
        let mut up = upstream(&["node/b"], &["10.0.0.9:8088", "node/*"]);
        up.kubernetes = Some(KubernetesRef {
            namespace: "media".into(),
            service: "janus".into(),
            port: Some(8088),
        });
        let mut view = View::default();
        let eps = [("a", "10.1.0.1"), ("b", "10.1.0.2"), ("c", "10.1.0.3")]
            .into_iter()
            .map(|(n, i)| {
                let ep = NodeEndpoint {
                    ip: ip(i),
                    ready: true,
                };
                (n.to_string(), ep)
            })
            .collect();
        view.kube
            .services
            .insert(ServiceKey::new("media", "janus"), eps);
        assert_eq!(
            targets(&up, &view),
            vec![
                t("10.1.0.2", Some(8088), Tier::Primary),
                t("10.0.0.9", Some(8088), Tier::Backup),
                t("10.1.0.1", Some(8088), Tier::Backup),
                t("10.1.0.3", Some(8088), Tier::Backup),
            ]
        );
    }

    #[test]
    fn node_refs_without_kubernetes_block_yield_nothing() {
        let up = upstream(&["node/a", "10.0.0.1:1"], &[]);
        assert_eq!(
            targets(&up, &View::default()),
            vec![t("10.0.0.1", Some(1), Tier::Primary)]
        );
    }

    #[tokio::test]
    async fn static_only_config_starts_without_sources_and_lists_at_once() {
        let yaml = "
listeners:
  - { name: l, protocol: udp, listen: 127.0.0.1:5004, upstream: u }
upstreams:
  u:
    primary: [10.0.0.1]
    backup: [10.0.0.2:6000]
";
        let config = crate::config::load_str(yaml, "test.yaml").expect("valid config");
        let metrics = Metrics::new();
        let d = Discovery::start(&config, &metrics).await.expect("start");
        let rx = d.watch("u").expect("upstream u");
        assert_eq!(
            *rx.borrow(),
            vec![
                t("10.0.0.1", None, Tier::Primary),
                t("10.0.0.2", Some(6000), Tier::Backup)
            ]
        );
        assert!(d.watch("nope").is_none());
        d.stop();
    }
}
