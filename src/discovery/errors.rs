//! Failure bookkeeping shared by the discovery sources: the
//! `mediagate_discovery_errors_total{source, upstream}` counter and the "log once per
//! outage" rule.
//!
//! A source failure never changes a server list (the last good answer is kept), so these
//! are the only traces it leaves: a count for alerting, and one WARN line when the outage
//! starts plus one INFO line when it ends, however often the source retries in between.

use crate::config::Config;
use crate::metrics::{Labels, Metrics, child, labels};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::Mutex;

/// The discovery error family of one metrics registry.
#[derive(Clone)]
pub(super) struct ErrorCounters {
    family: Family<Labels, Counter>,
}

/// A family registered into one registry.
struct Registered {
    /// The registry's address.
    key: usize,
    /// Keeps the registry alive, so its address cannot be reused by another.
    _metrics: Metrics,
    family: Family<Labels, Counter>,
}

/// Families already registered, by registry. `Discovery::start` runs again on every
/// reload with the same `Metrics`, and registering a family twice would put two `# TYPE`
/// blocks for one name into the exposition.
static REGISTERED: Mutex<Vec<Registered>> = Mutex::new(Vec::new());

impl ErrorCounters {
    /// The family of `metrics` (registered on first use), with a zero series pre-created for
    /// each upstream and the sources it uses, so dashboards see the series before the
    /// first failure.
    pub(super) fn new(metrics: &Metrics, config: &Config) -> ErrorCounters {
        let family = family_of(metrics);
        for (name, up) in &config.upstreams {
            if super::dns_hosts(up).next().is_some() {
                let _ = child(&family, &labels(&[("source", "dns"), ("upstream", name)]));
            }
            if super::has_node_refs(up) && config.discovery.kubernetes.enabled {
                let _ = child(
                    &family,
                    &labels(&[("source", "kubernetes"), ("upstream", name)]),
                );
            }
        }
        ErrorCounters { family }
    }

    /// The counters a source increments on each failure: one per upstream it feeds.
    pub(super) fn counters(&self, source: &str, upstreams: &[&str]) -> Vec<Counter> {
        upstreams
            .iter()
            .map(|u| {
                child(
                    &self.family,
                    &labels(&[("source", source), ("upstream", u)]),
                )
            })
            .collect()
    }
}

fn family_of(metrics: &Metrics) -> Family<Labels, Counter> {
    // Only the address is kept; the guard must be gone before `register` below locks the
    // registry again (written as one `let`, the cast would extend the guard's lifetime).
    let key = {
        let registry = metrics.registry();
        &*registry as *const Registry as usize
    };
    let mut registered = REGISTERED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = registered.iter().find(|r| r.key == key) {
        return r.family.clone();
    }
    let family = Family::<Labels, Counter>::default();
    metrics.registry().register(
        "mediagate_discovery_errors",
        "Failed DNS resolutions and Kubernetes API requests, by source and upstream; \
         the last good server list is kept meanwhile",
        family.clone(),
    );
    registered.push(Registered {
        key,
        _metrics: metrics.clone(),
        family: family.clone(),
    });
    family
}

/// Tracks one source's outage so that it is logged once, not on every retry.
#[derive(Debug, Default)]
pub(super) struct Outage {
    failures: u64,
}

impl Outage {
    /// Records a failure. True when it starts an outage: log it now.
    pub(super) fn fail(&mut self) -> bool {
        self.failures += 1;
        self.failures == 1
    }

    /// Records a success. `Some(failures)` when it ends an outage: log the recovery.
    pub(super) fn succeed(&mut self) -> Option<u64> {
        match std::mem::take(&mut self.failures) {
            0 => None,
            n => Some(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outage_logs_its_start_and_end_once() {
        let mut o = Outage::default();
        assert_eq!(o.succeed(), None);
        assert!(o.fail());
        assert!(!o.fail());
        assert!(!o.fail());
        assert_eq!(o.succeed(), Some(3));
        assert_eq!(o.succeed(), None);
        assert!(o.fail(), "a new outage is logged again");
    }

    #[test]
    fn family_registered_once_per_registry_and_series_precreated() {
        let yaml = "
discovery: { kubernetes: { enabled: true } }
listeners:
  - { name: l, protocol: udp, listen: 127.0.0.1:5004, upstream: u }
  - { name: m, protocol: udp, listen: 127.0.0.1:5005, upstream: s }
upstreams:
  u:
    primary: [janus.test:1, node/a]
    kubernetes: { namespace: media, service: janus, port: 1 }
  s:
    primary: [10.0.0.1:1]
";
        let config = crate::config::load_str(yaml, "t.yaml").expect("valid config");
        let metrics = Metrics::new();
        let a = ErrorCounters::new(&metrics, &config);
        let b = ErrorCounters::new(&metrics, &config);
        a.counters("dns", &["u"])[0].inc();
        b.counters("dns", &["u"])[0].inc();
        let text = metrics.encode();
        assert_eq!(
            text.matches("# TYPE mediagate_discovery_errors counter")
                .count(),
            1,
            "{text}"
        );
        assert!(
            text.contains("mediagate_discovery_errors_total{source=\"dns\",upstream=\"u\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "mediagate_discovery_errors_total{source=\"kubernetes\",upstream=\"u\"} 0"
            ),
            "{text}"
        );
        assert!(!text.contains("upstream=\"s\""), "{text}");

        // Another registry gets its own family.
        let other = Metrics::new();
        let _ = ErrorCounters::new(&other, &config);
        assert!(other.encode().contains("{source=\"dns\",upstream=\"u\"} 0"));
    }
}
