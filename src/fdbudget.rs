//! The file-descriptor budget: how many descriptors the configuration may use, compared
//! with the open-file limit, and the process-wide count that the data plane takes its
//! descriptors from.
//!
//! Every UDP session holds one upstream socket and every TCP connection two (client and
//! server); those come and go with client traffic, which anyone on the internet controls.
//! Everything else (listen sockets, epoll instances, health probes, discovery, admin
//! connections, TURN relays, log files) is the balancer's own and must never be starved:
//! a probe that fails with EMFILE would mark a healthy server down, and an admin API that
//! cannot accept makes a liveness probe restart the pod.
//!
//! So at start and on every reload [`apply`] computes a [`Plan`]: the descriptors the
//! configuration reserves for itself ([`Demand::reserve`]) are taken off the open-file
//! limit (`RLIMIT_NOFILE`, after [`raise_nofile_limit`]), and what is left is the
//! data-plane budget. A UDP session or TCP connection takes a [`Permit`] from the
//! process-wide [`FdBudget`] before it opens its descriptors and gives it back when it
//! closes; beyond the budget, new sessions are refused and counted
//! (`reason="fd_budget"`) while existing sessions, probes and `/healthz` keep working.
//!
//! The budget sits below the modules that use descriptors (ARCHITECTURE.md): the UDP
//! worker count and TURN's demand come in as [`Consumers`], computed by whoever wires the
//! two (`app::fd_consumers`), and [`register_metrics`] adds its gauges to the registry.
//!
//! The admin API is the one consumer whose failure is worst (a liveness probe restarts
//! the pod), so it also holds a few descriptors nobody else can take ([`admin_spare`]):
//! when the process runs out anyway, its `accept` spends one of them.
//!
//! `mediagate check` only warns when the configuration's demand exceeds the limit (see
//! [`check_warning`]): limits differ between the machine that checks and the one that
//! runs, and the runtime budget enforces the limit where it applies.

use crate::config::{Config, Protocol, ServerRef};
use crate::metrics::Metrics;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Descriptors any process of ours holds besides what the configuration asks for: stdio,
/// the runtime's epoll and event descriptors, the DNS resolver, config file reads, logs.
pub const FIXED_RESERVE: usize = 64;
/// Descriptors set aside for discovery (DNS queries, the Kubernetes API connection).
pub const DISCOVERY_RESERVE: usize = 16;
/// Descriptors the admin API holds in reserve ([`admin_spare`]), counted in its part of
/// the reserve.
pub const ADMIN_SPARE: usize = 4;
/// Servers assumed behind one DNS name or `node/…` reference, for the probe reserve.
pub const SERVERS_PER_DYNAMIC_REF: usize = 16;

/// What a configuration may use, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Demand {
    /// UDP: one upstream socket per session, `session.max_sessions` per listener.
    pub udp_sessions: usize,
    /// TCP: two descriptors per connection, `max_connections` per listener.
    pub tcp_connections: usize,
    /// Listen sockets (one per UDP port and worker thread, one per TCP port) and the UDP
    /// workers' epoll instances.
    pub listeners: usize,
    /// One per server per probe in flight (a prober runs one probe at a time).
    pub probes: usize,
    /// The admin listener, `admin.max_connections` and [`ADMIN_SPARE`].
    pub admin: usize,
    /// TURN relays and clients ([`Consumers::turn`]).
    pub turn: usize,
    /// Discovery and [`FIXED_RESERVE`].
    pub other: usize,
}

impl Demand {
    /// What the configuration reserves for itself: everything but the data plane.
    pub fn reserve(&self) -> usize {
        self.listeners + self.probes + self.admin + self.turn + self.other
    }

    /// What the data plane may hold at most (all listeners at their caps).
    pub fn data_plane(&self) -> usize {
        self.udp_sessions + self.tcp_connections
    }

    /// Everything.
    pub fn total(&self) -> usize {
        self.reserve() + self.data_plane()
    }
}

/// What the consumers above the budget state for themselves: the budget computes the rest
/// from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Consumers {
    /// UDP worker threads per listener (each holds a listen socket per port and an epoll).
    pub udp_workers: usize,
    /// Descriptors the TURN service reserves (`turn::fd_demand`; 0 without `turn:`).
    pub turn: usize,
}

/// The demand of `cfg` with what its consumers state.
pub fn demand(cfg: &Config, consumers: &Consumers) -> Demand {
    let workers = consumers.udp_workers.max(1);
    let mut d = Demand {
        other: FIXED_RESERVE + DISCOVERY_RESERVE,
        admin: 1 + cfg.admin.max_connections + ADMIN_SPARE,
        ..Demand::default()
    };
    for l in &cfg.listeners {
        let ports = usize::from(l.listen.last_port - l.listen.first_port) + 1;
        match l.protocol {
            Protocol::Udp => {
                d.udp_sessions += l.session.max_sessions;
                d.listeners += ports * workers + workers;
            }
            Protocol::Tcp => {
                d.tcp_connections += 2 * l.max_connections;
                d.listeners += ports;
            }
        }
    }
    for u in cfg.upstreams.values() {
        if u.health.kind == crate::config::HealthType::None {
            continue;
        }
        for s in u.primary.iter().chain(&u.backup) {
            d.probes += match s {
                ServerRef::Static(_) | ServerRef::StaticIp(_) => 1,
                ServerRef::Dns { .. } | ServerRef::Node(_) | ServerRef::AllNodes => {
                    SERVERS_PER_DYNAMIC_REF
                }
            };
        }
    }
    d.turn = consumers.turn;
    d
}

/// The budget of one configuration under one open-file limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// The open-file limit (`RLIMIT_NOFILE` soft limit).
    pub limit: usize,
    pub demand: Demand,
    /// Descriptors the data plane may hold: `limit - demand.reserve()`.
    pub budget: usize,
}

impl Plan {
    pub fn new(cfg: &Config, limit: usize, consumers: &Consumers) -> Plan {
        let demand = demand(cfg, consumers);
        Plan {
            limit,
            demand,
            budget: limit.saturating_sub(demand.reserve()),
        }
    }

    /// Why this plan cannot run at all, if so: the configuration's own descriptors (listen
    /// sockets, probes, admin, TURN, discovery) take the whole open-file limit and leave the
    /// data plane nothing. `mediagate run` does not start with such a configuration and a
    /// reload refuses it (the running one stays). The message names what to change, TURN's
    /// keys first when TURN takes the most.
    pub fn refusal(&self) -> Option<String> {
        let d = &self.demand;
        (d.reserve() >= self.limit).then(|| {
            let fewer = if d.turn >= d.reserve() / 2 {
                "lower turn.quota.max_allocations (or narrow turn.relay.port_range) and \
                 turn.quota.max_tcp_connections, which TURN reserves descriptors for"
            } else {
                "use fewer servers, listeners or ports"
            };
            format!(
                "the configuration reserves {} file descriptors for itself (listen sockets {}, \
                 probes {}, admin {}, TURN {}, other {}) but the open-file limit is {}: no \
                 session could be served; raise the limit (ulimit -n, LimitNOFILE=, the \
                 container runtime's nofile) or {fewer}",
                d.reserve(),
                d.listeners,
                d.probes,
                d.admin,
                d.turn,
                d.other,
                self.limit
            )
        })
    }

    /// Whether every listener can reach its cap at once without running out.
    pub fn fits(&self) -> bool {
        self.demand.total() <= self.limit
    }

    /// A one-line explanation for operators when the configuration does not fit.
    pub fn shortfall(&self) -> Option<String> {
        if self.fits() {
            return None;
        }
        let d = &self.demand;
        Some(format!(
            "the configuration may use {} file descriptors (UDP sessions {}, TCP connections {}, \
             listen sockets {}, probes {}, admin {}, TURN {}, other {}) but the open-file limit \
             is {}: at most {} descriptors go to UDP sessions and TCP connections, and new \
             sessions beyond that are refused (reason=\"fd_budget\"); raise the limit \
             (ulimit -n, LimitNOFILE=, the container runtime's nofile) or lower \
             session.max_sessions / max_connections",
            d.total(),
            d.udp_sessions,
            d.tcp_connections,
            d.listeners,
            d.probes,
            d.admin,
            d.turn,
            d.other,
            self.limit,
            self.budget,
        ))
    }
}

/// The process-wide count of data-plane descriptors.
#[derive(Debug)]
pub struct FdBudget {
    /// Descriptors the data plane may hold (`usize::MAX` until a plan is applied).
    budget: AtomicUsize,
    in_use: AtomicUsize,
    /// Sessions and connections refused for lack of budget.
    refused: AtomicU64,
    /// The plan in force, for `/status` and the metrics.
    limit: AtomicUsize,
    reserve: AtomicUsize,
    demand: AtomicUsize,
}

static GLOBAL: FdBudget = FdBudget::new(usize::MAX);

/// The budget of this process.
pub fn global() -> &'static FdBudget {
    &GLOBAL
}

impl FdBudget {
    pub const fn new(budget: usize) -> FdBudget {
        FdBudget {
            budget: AtomicUsize::new(budget),
            in_use: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            limit: AtomicUsize::new(0),
            reserve: AtomicUsize::new(0),
            demand: AtomicUsize::new(0),
        }
    }

    /// Takes `n` descriptors, or `None` (counted as refused) when that would exceed the
    /// budget. The permit gives them back when dropped.
    pub fn try_acquire(&'static self, n: usize) -> Option<Permit> {
        let budget = self.budget.load(Ordering::Relaxed);
        let mut cur = self.in_use.load(Ordering::Relaxed);
        loop {
            if cur.saturating_add(n) > budget {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            match self.in_use.compare_exchange_weak(
                cur,
                cur + n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(Permit { budget: self, n }),
                Err(now) => cur = now,
            }
        }
    }

    /// Puts `plan` in force. Descriptors already held stay held; a lower budget only
    /// refuses new sessions until enough have closed.
    pub fn set_plan(&self, plan: &Plan) {
        self.budget.store(plan.budget, Ordering::Relaxed);
        self.limit.store(plan.limit, Ordering::Relaxed);
        self.reserve.store(plan.demand.reserve(), Ordering::Relaxed);
        self.demand.store(plan.demand.total(), Ordering::Relaxed);
    }

    /// Whether the data plane holds its whole budget, so that a new session would be
    /// refused: then counted as refused, like a failed [`FdBudget::try_acquire`].
    pub fn refuses_new(&self) -> bool {
        let full = self.in_use() >= self.budget();
        if full {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        full
    }

    /// Data-plane descriptors allowed.
    pub fn budget(&self) -> usize {
        self.budget.load(Ordering::Relaxed)
    }

    /// Data-plane descriptors held now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Sessions and connections refused for lack of budget since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// The open-file limit of the plan in force (0 before any).
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Descriptors reserved for the balancer's own use by the plan in force.
    pub fn reserve(&self) -> usize {
        self.reserve.load(Ordering::Relaxed)
    }

    /// What the configuration in force may use in all.
    pub fn demand(&self) -> usize {
        self.demand.load(Ordering::Relaxed)
    }
}

/// Descriptors held for one consumer alone: placeholders (`/dev/null` opened read-only)
/// that nothing else can take. The kernel hands out the lowest free descriptor number and
/// refuses one at or above the open-file limit, so when the process has run out (a
/// consumer beyond its share, a limit lowered under a running process) closing a
/// placeholder frees a number below the limit for the very next `accept`.
#[derive(Debug)]
pub struct Spare {
    held: std::sync::Mutex<Vec<std::os::fd::OwnedFd>>,
    want: usize,
}

impl Spare {
    /// A reserve of `want` descriptors, empty until [`Spare::refill`].
    pub const fn new(want: usize) -> Spare {
        Spare {
            held: std::sync::Mutex::new(Vec::new()),
            want,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<std::os::fd::OwnedFd>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens placeholders until `want` are held or opening fails (out of descriptors:
    /// tried again at the next call).
    pub fn refill(&self) {
        let mut held = self.lock();
        while held.len() < self.want {
            match std::fs::File::open("/dev/null") {
                Ok(f) => held.push(f.into()),
                Err(_) => break,
            }
        }
    }

    /// Closes the lowest-numbered placeholder (the likeliest to be below a limit lowered
    /// since) so that its number can be taken at once; false when none is held.
    pub fn release(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut held = self.lock();
        let lowest = held
            .iter()
            .enumerate()
            .min_by_key(|(_, fd)| fd.as_raw_fd())
            .map(|(i, _)| i);
        lowest.map(|i| held.swap_remove(i)).is_some()
    }

    /// Placeholders held now.
    pub fn held(&self) -> usize {
        self.lock().len()
    }
}

static ADMIN: Spare = Spare::new(ADMIN_SPARE);

/// The admin API's reserve: opened at start (low descriptor numbers), spent by the admin
/// listener's `accept` when the process is out of descriptors, refilled as its
/// connections close.
pub fn admin_spare() -> &'static Spare {
    &ADMIN
}

/// Whether `e` says the process or the system is out of descriptors.
pub fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EMFILE) | Some(nix::libc::ENFILE)
    )
}

/// Descriptors taken from an [`FdBudget`]; given back on drop.
#[derive(Debug)]
pub struct Permit {
    budget: &'static FdBudget,
    n: usize,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.budget.in_use.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// The soft open-file limit in force now (`usize::MAX` when unlimited or unreadable).
pub fn current_limit() -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => usize::try_from(soft).unwrap_or(usize::MAX),
        Err(_) => usize::MAX,
    }
}

/// The limit `mediagate run` will have on this machine: the soft limit, raised towards
/// the hard one as [`raise_nofile_limit`] does.
pub fn limit_at_run() -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            usize::try_from(soft.max(NOFILE_WANTED.min(hard))).unwrap_or(usize::MAX)
        }
        Err(_) => usize::MAX,
    }
}

/// Computes the plan of `cfg` under the limit in force, puts it in force, and logs a
/// warning when the configuration does not fit. Called at start and on every reload.
pub fn apply(cfg: &Config, consumers: &Consumers) -> Plan {
    let plan = Plan::new(cfg, current_limit(), consumers);
    global().set_plan(&plan);
    match plan.shortfall() {
        Some(why) => tracing::warn!("{why}"),
        None => tracing::info!(
            limit = plan.limit,
            reserve = plan.demand.reserve(),
            budget = plan.budget,
            "file-descriptor budget"
        ),
    }
    plan
}

/// `mediagate check`: the warning to print when `cfg` does not fit the open-file limit
/// this machine would give `mediagate run` (a warning, not an error: see the module doc).
pub fn check_warning(cfg: &Config, consumers: &Consumers) -> Option<String> {
    Plan::new(cfg, limit_at_run(), consumers).shortfall()
}

/// The open-file limit [`raise_nofile_limit`] asks for (up to the hard limit).
pub const NOFILE_WANTED: u64 = 262_144;

/// Raises RLIMIT_NOFILE to what 100k sessions need, up to the hard limit, and logs it.
pub fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            let target = NOFILE_WANTED.min(hard);
            if soft < target
                && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, target, hard)
            {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
                return;
            }
            let now = soft.max(target);
            if now < 200_000 {
                tracing::info!(
                    limit = now,
                    hard,
                    "open-file limit in force (below the ~200k that 100k UDP sessions need: one socket each, plus the client side)"
                );
            } else {
                tracing::info!(limit = now, "open-file limit in force");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// Registers the budget's gauges (`mediagate_fd_*`) in `metrics`, refreshed from
/// [`global`] before every scrape.
pub fn register_metrics(metrics: &Metrics) {
    let g = FdGauges::default();
    {
        let mut r = metrics.registry();
        r.register(
            "mediagate_fd_limit",
            "The open-file limit (RLIMIT_NOFILE)",
            g.limit.clone(),
        );
        r.register(
            "mediagate_fd_reserve",
            "File descriptors reserved for listen sockets, probes, discovery, admin and TURN",
            g.reserve.clone(),
        );
        r.register(
            "mediagate_fd_budget",
            "File descriptors UDP sessions and TCP connections may hold",
            g.budget.clone(),
        );
        r.register(
            "mediagate_fd_in_use",
            "File descriptors UDP sessions and TCP connections hold",
            g.in_use.clone(),
        );
        r.register(
            "mediagate_fd_open",
            "File descriptors the process has open",
            g.open.clone(),
        );
    }
    metrics.on_scrape("fdbudget", Arc::new(move || g.refresh()));
}

/// Gauges of the file-descriptor budget.
#[derive(Clone, Debug, Default)]
struct FdGauges {
    /// `mediagate_fd_limit`: the open-file limit (RLIMIT_NOFILE).
    limit: Gauge,
    /// `mediagate_fd_reserve`: descriptors kept for listen sockets, probes, admin, TURN.
    reserve: Gauge,
    /// `mediagate_fd_budget`: descriptors UDP sessions and TCP connections may hold.
    budget: Gauge,
    /// `mediagate_fd_in_use`: descriptors UDP sessions and TCP connections hold now.
    in_use: Gauge,
    /// `mediagate_fd_open`: descriptors the process has open (all kinds).
    open: Gauge,
}

impl FdGauges {
    fn refresh(&self) {
        let b = global();
        let g = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.limit.set(g(b.limit()));
        self.reserve.set(g(b.reserve()));
        self.budget.set(g(b.budget()));
        self.in_use.set(g(b.in_use()));
        self.open.set(g(open_now()));
    }
}

/// Descriptors the process has open now (`/proc/self/fd`), or 0 when unreadable.
pub fn open_now() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_workers() -> Consumers {
        Consumers {
            udp_workers: 2,
            turn: 0,
        }
    }

    fn cfg(yaml: &str) -> Config {
        crate::config::load_str(yaml, "t.yaml").expect("valid config")
    }

    const BASE: &str = "admin: { listen: 127.0.0.1:9000, max_connections: 10 }\n\
        listeners:\n  - { name: a, protocol: udp, listen: 127.0.0.1:5000-5001, upstream: u, session: { max_sessions: 1000 } }\n  \
        - { name: b, protocol: tcp, listen: 127.0.0.1:6000, upstream: u, max_connections: 100 }\n\
        upstreams:\n  u:\n    primary: [127.0.0.1, janus.example]\n";

    #[test]
    fn demand_counts_every_part() {
        let d = demand(&cfg(BASE), &two_workers());
        assert_eq!(d.udp_sessions, 1000);
        assert_eq!(d.tcp_connections, 200);
        assert_eq!(d.listeners, 2 * 2 + 2 + 1);
        assert_eq!(d.probes, 1 + SERVERS_PER_DYNAMIC_REF);
        assert_eq!(d.admin, 11 + ADMIN_SPARE);
        assert_eq!(d.turn, 0);
        assert_eq!(d.data_plane(), 1200);
    }

    #[test]
    fn plan_subtracts_the_reserve_and_explains_a_shortfall() {
        let c = cfg(BASE);
        let big = Plan::new(&c, 100_000, &two_workers());
        assert!(big.fits());
        assert_eq!(big.shortfall(), None);
        assert_eq!(big.budget, 100_000 - big.demand.reserve());
        let small = Plan::new(&c, 1024, &two_workers());
        assert!(!small.fits());
        let why = small.shortfall().unwrap();
        assert!(why.contains("open-file limit is 1024"), "{why}");
        assert!(why.contains("fd_budget"), "{why}");
        assert_eq!(small.budget, 1024 - small.demand.reserve());
        // A limit below the reserve leaves the data plane nothing, not an underflow.
        assert_eq!(Plan::new(&c, 10, &two_workers()).budget, 0);
    }

    #[test]
    fn a_spare_gives_its_descriptor_numbers_back_and_refills() {
        let s = Spare::new(3);
        assert_eq!(s.held(), 0);
        s.refill();
        assert_eq!(s.held(), 3);
        assert!(s.release() && s.release() && s.release());
        assert!(!s.release());
        s.refill();
        assert_eq!(s.held(), 3);
    }

    #[test]
    fn permits_stop_at_the_budget_and_come_back_on_drop() {
        let b: &'static FdBudget = Box::leak(Box::new(FdBudget::new(5)));
        let a = b.try_acquire(2).unwrap();
        let c = b.try_acquire(2).unwrap();
        assert!(b.try_acquire(2).is_none(), "4 + 2 > 5");
        assert_eq!(b.refused(), 1);
        let d = b.try_acquire(1).unwrap();
        assert_eq!(b.in_use(), 5);
        drop((a, d));
        assert_eq!(b.in_use(), 2);
        assert!(b.try_acquire(3).is_some());
        drop(c);
        assert_eq!(b.in_use(), 0);
    }
}
