//! DNS source: resolves each configured host name's A and AAAA records with
//! hickory-resolver and re-resolves when their TTL runs out.
//!
//! Rules (README, "Discovery"):
//! - every address is a server; the set is published sorted;
//! - the next resolution is due after the smallest TTL of the answer, clamped to
//!   `discovery.dns.min_ttl..max_ttl`;
//! - a failure (timeout, SERVFAIL, REFUSED, no nameserver) keeps the last good addresses of
//!   that record type, is counted in `mediagate_discovery_errors_total{source="dns"}`,
//!   logged once per outage, and retried after `min_ttl`;
//! - an answer without records (NXDOMAIN, or NOERROR with no data) is an answer: the name
//!   now has no addresses of that type, and its servers are removed.
//!
//! A and AAAA are judged separately: a resolver that answers A but times out on AAAA keeps
//! the old IPv6 servers and still picks up IPv4 changes.

use super::Hub;
use super::errors::Outage;
use crate::config::DnsConfig;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::rr::RecordType;
use hickory_resolver::{Resolver, TokioResolver};
use prometheus_client::metrics::counter::Counter;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// How long one query may take. Below hickory's 5 s default: while a nameserver is gone,
/// each attempt should fail (and be counted) well within a `max_ttl` period.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// The resolver every host task shares: `nameservers` over UDP and TCP when configured
/// (then queries go only to them, without /etc/hosts), else the system configuration.
pub(super) fn build_resolver(config: &DnsConfig) -> anyhow::Result<TokioResolver> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = if config.nameservers.is_empty() {
        Resolver::builder(provider).map_err(|e| {
            anyhow::anyhow!("discovery.dns: cannot read the system resolver configuration: {e}")
        })?
    } else {
        let servers = config
            .nameservers
            .iter()
            .map(|ns| {
                let mut udp = ConnectionConfig::udp();
                udp.port = ns.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = ns.port();
                NameServerConfig::new(ns.ip(), true, vec![udp, tcp])
            })
            .collect();
        let mut b = Resolver::builder_with_config(
            ResolverConfig::from_parts(None, Vec::new(), servers),
            provider,
        );
        b.options_mut().use_hosts_file = ResolveHosts::Never;
        b
    };
    let opts = builder.options_mut();
    opts.timeout = QUERY_TIMEOUT;
    builder
        .build()
        .map_err(|e| anyhow::anyhow!("discovery.dns: cannot build the resolver: {e}"))
}

/// What one query (one record type) brought.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Answer {
    /// The addresses, and the smallest TTL among them.
    Records { ips: Vec<IpAddr>, ttl: Duration },
    /// The name has no records of this type; the negative TTL when the server sent an SOA.
    NoRecords { ttl: Option<Duration> },
    /// No usable answer; the last good addresses stay.
    Failed(String),
}

fn classify(result: Result<hickory_resolver::lookup::Lookup, NetError>) -> Answer {
    match result {
        Ok(lookup) => {
            let mut ips = Vec::new();
            let mut ttl = u32::MAX;
            // Answers may include the CNAME chain; only A/AAAA records carry addresses.
            for record in lookup.answers() {
                if let Some(ip) = record.data.ip_addr() {
                    ips.push(ip);
                    ttl = ttl.min(record.ttl);
                }
            }
            if ips.is_empty() {
                Answer::NoRecords { ttl: None }
            } else {
                Answer::Records {
                    ips,
                    ttl: Duration::from_secs(u64::from(ttl)),
                }
            }
        }
        Err(NetError::Dns(DnsError::NoRecordsFound(no))) => Answer::NoRecords {
            ttl: no.negative_ttl.map(|s| Duration::from_secs(u64::from(s))),
        },
        Err(e) => Answer::Failed(e.to_string()),
    }
}

/// The last good addresses of one name, per record type (`None`: never answered).
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct HostState {
    v4: Option<Vec<IpAddr>>,
    v6: Option<Vec<IpAddr>>,
}

/// The result of folding one resolution into a [`HostState`].
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Step {
    /// The addresses to publish, sorted; `None` while no record type ever answered.
    pub ips: Option<Vec<IpAddr>>,
    /// The failures of this round, if any (joined for the log).
    pub error: Option<String>,
    /// When to resolve again.
    pub next: Duration,
}

impl HostState {
    /// Folds the A and AAAA answers of one round in. Pure.
    pub(super) fn apply(&mut self, a: Answer, aaaa: Answer, min: Duration, max: Duration) -> Step {
        let mut errors = Vec::new();
        let mut ttls = Vec::new();
        for (answer, slot, kind) in [(a, &mut self.v4, "A"), (aaaa, &mut self.v6, "AAAA")] {
            match answer {
                Answer::Records { ips, ttl } => {
                    *slot = Some(ips);
                    ttls.push(ttl);
                }
                Answer::NoRecords { ttl } => {
                    *slot = Some(Vec::new());
                    ttls.extend(ttl);
                }
                Answer::Failed(e) => errors.push(format!("{kind}: {e}")),
            }
        }
        let ips = match (&self.v4, &self.v6) {
            (None, None) => None,
            (v4, v6) => {
                let mut all: Vec<IpAddr> = v4.iter().chain(v6.iter()).flatten().copied().collect();
                all.sort();
                all.dedup();
                Some(all)
            }
        };
        // A failure is retried soon; otherwise the records say how long they hold. With no
        // TTL at all (an empty answer without SOA) the floor applies.
        let next = if errors.is_empty() {
            ttls.into_iter().min().unwrap_or(min).clamp(min, max)
        } else {
            min
        };
        Step {
            ips,
            error: (!errors.is_empty()).then(|| errors.join("; ")),
            next,
        }
    }
}

/// The task that keeps one host name resolved.
pub(super) struct HostTask {
    pub host: String,
    pub resolver: TokioResolver,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    /// One per upstream naming this host.
    pub errors: Vec<Counter>,
    pub hub: Arc<Hub>,
    pub cancel: CancellationToken,
}

impl HostTask {
    /// Resolves until cancelled; `first` is signalled after the first round, whatever it
    /// brought.
    pub(super) async fn run(self, first: oneshot::Sender<()>) {
        let mut first = Some(first);
        let mut state = HostState::default();
        let mut outage = Outage::default();
        let mut published: Option<Vec<IpAddr>> = None;
        loop {
            let round = tokio::select! {
                () = self.cancel.cancelled() => return,
                r = self.resolve() => r,
            };
            let step = state.apply(round.0, round.1, self.min_ttl, self.max_ttl);
            match &step.error {
                Some(error) => {
                    for c in &self.errors {
                        c.inc();
                    }
                    if outage.fail() {
                        tracing::warn!(
                            host = %self.host,
                            %error,
                            "DNS resolution failed; keeping the last good servers and retrying"
                        );
                    }
                }
                None => {
                    if let Some(failures) = outage.succeed() {
                        tracing::info!(host = %self.host, failures, "DNS resolution works again");
                    }
                }
            }
            if step.ips.is_some() && step.ips != published {
                let ips = step.ips.clone().unwrap_or_default();
                if ips.is_empty() {
                    tracing::warn!(host = %self.host, "DNS name has no addresses now; its servers are removed");
                } else {
                    tracing::info!(host = %self.host, servers = ?ips, "DNS name resolved");
                }
                let host = self.host.clone();
                self.hub.update(
                    |view| {
                        view.dns.insert(host, ips);
                    },
                    |up| super::dns_hosts(up).any(|h| h == self.host),
                );
                published = step.ips;
            }
            if let Some(tx) = first.take() {
                let _ = tx.send(());
            }
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = tokio::time::sleep(step.next) => {}
            }
        }
    }

    /// One round: A and AAAA in parallel, fresh from the nameserver.
    async fn resolve(&self) -> (Answer, Answer) {
        // Resolution timing is ours (TTL clamped to min..max): the resolver's cache would
        // hand back an answer the nameserver may already have changed.
        self.resolver
            .clear_lookup_cache(self.host.as_str(), RecordType::A);
        self.resolver
            .clear_lookup_cache(self.host.as_str(), RecordType::AAAA);
        let (a, aaaa) = tokio::join!(
            self.resolver.lookup(self.host.as_str(), RecordType::A),
            self.resolver.lookup(self.host.as_str(), RecordType::AAAA),
        );
        (classify(a), classify(aaaa))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().expect("test ip")).collect()
    }

    fn records(list: &[&str], ttl: u64) -> Answer {
        Answer::Records {
            ips: ips(list),
            ttl: Duration::from_secs(ttl),
        }
    }

    fn none() -> Answer {
        Answer::NoRecords { ttl: None }
    }

    fn failed() -> Answer {
        Answer::Failed("request timed out".into())
    }

    #[test]
    fn answers_are_merged_sorted_and_next_is_the_smallest_ttl() {
        let mut s = HostState::default();
        let step = s.apply(
            records(&["10.0.0.2", "10.0.0.1"], 20),
            records(&["fd00::1"], 10),
            MIN,
            MAX,
        );
        assert_eq!(step.ips, Some(ips(&["10.0.0.1", "10.0.0.2", "fd00::1"])));
        assert_eq!(step.error, None);
        assert_eq!(step.next, Duration::from_secs(10));
    }

    #[test]
    fn ttl_is_clamped_to_min_and_max() {
        let mut s = HostState::default();
        assert_eq!(
            s.apply(records(&["10.0.0.1"], 0), none(), MIN, MAX).next,
            MIN
        );
        assert_eq!(
            s.apply(records(&["10.0.0.1"], 3600), none(), MIN, MAX).next,
            MAX
        );
        let negative = Answer::NoRecords {
            ttl: Some(Duration::from_secs(5)),
        };
        assert_eq!(
            s.apply(records(&["10.0.0.1"], 3600), negative, MIN, MAX)
                .next,
            Duration::from_secs(5),
            "a negative TTL also bounds the next resolution"
        );
    }

    #[test]
    fn failure_keeps_the_last_good_set_and_retries_at_min_ttl() {
        let mut s = HostState::default();
        s.apply(
            records(&["10.0.0.1"], 20),
            records(&["fd00::1"], 20),
            MIN,
            MAX,
        );
        let step = s.apply(failed(), failed(), MIN, MAX);
        assert_eq!(step.ips, Some(ips(&["10.0.0.1", "fd00::1"])));
        assert!(
            step.error
                .as_deref()
                .is_some_and(|e| e.contains("A: request timed out"))
        );
        assert_eq!(step.next, MIN);
    }

    #[test]
    fn one_record_type_failing_keeps_only_its_own_last_set() {
        let mut s = HostState::default();
        s.apply(
            records(&["10.0.0.1"], 20),
            records(&["fd00::1"], 20),
            MIN,
            MAX,
        );
        let step = s.apply(records(&["10.0.0.2"], 20), failed(), MIN, MAX);
        assert_eq!(step.ips, Some(ips(&["10.0.0.2", "fd00::1"])));
        assert!(step.error.is_some());
        assert_eq!(step.next, MIN);
    }

    #[test]
    fn failure_before_any_answer_publishes_nothing() {
        let mut s = HostState::default();
        let step = s.apply(failed(), failed(), MIN, MAX);
        assert_eq!(step.ips, None);
        assert!(step.error.is_some());
    }

    #[test]
    fn empty_answer_after_a_good_one_removes_the_servers() {
        let mut s = HostState::default();
        s.apply(records(&["10.0.0.1"], 20), none(), MIN, MAX);
        let step = s.apply(none(), none(), MIN, MAX);
        assert_eq!(step.ips, Some(vec![]));
        assert_eq!(step.error, None);
        assert_eq!(step.next, MIN, "no TTL at all: the floor");
    }

    #[test]
    fn classify_maps_resolver_results() {
        use hickory_resolver::net::NoRecords;
        use hickory_resolver::proto::op::{Query, ResponseCode};
        let query = Query::query("janus.test.".parse().expect("name"), RecordType::A);
        let mut no = NoRecords::new(query, ResponseCode::NXDomain);
        no.negative_ttl = Some(7);
        assert_eq!(
            classify(Err(NetError::Dns(DnsError::NoRecordsFound(no)))),
            Answer::NoRecords {
                ttl: Some(Duration::from_secs(7))
            }
        );
        assert!(matches!(
            classify(Err(NetError::Timeout)),
            Answer::Failed(_)
        ));
        assert!(matches!(
            classify(Err(NetError::Dns(DnsError::ResponseCode(
                ResponseCode::ServFail
            )))),
            Answer::Failed(_)
        ));
    }
}
