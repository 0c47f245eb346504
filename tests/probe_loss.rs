//! A lossy link is not a dead server: random loss on the primary's link (nftables
//! `numgen random` drops in the primary's network namespace, both directions; this kernel
//! has no netem) must move no session, while the same loss without confirmation does.
//!
//! Balancers run side by side for one minute, each group in front of its own primary in
//! its own namespace (100 ms UDP probes) and a backup on loopback:
//! - 2 % loss each way, default confirmation: no failover;
//! - 5 % loss each way, default confirmation: no failover;
//! - the same two as three replicas in cluster mode (`cluster:`, where a server is down
//!   for all when one replica says so): no failover on any replica;
//! - 5 % loss each way, `confirm: 0` (every failed probe counts, as before): failovers,
//!   which shows that the loss is real and that the others could fail.

mod common;

use common::netns::VethHost;
use common::*;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

/// How long each balancer runs under loss (the figure).
const RUN: Duration = Duration::from_secs(60);

/// A host behind a veth pair with random loss on its side of the link.
struct LossyHost {
    host: VethHost,
}

impl LossyHost {
    /// Host `idx` at 10.232.idx.2, dropping `per_mille`/1000 of the UDP datagrams that
    /// enter and of those that leave it.
    fn create(idx: u8, per_mille: u32) -> LossyHost {
        let host = VethHost::create("mg-loss", "mgl", 232, idx);
        let n = &host.ns_dev;
        let rules = format!(
            "table inet mgloss {{\n\
               chain rx {{ type filter hook input priority 0; policy accept;\n\
                 iifname \"{n}\" meta l4proto udp numgen random mod 1000 < {per_mille} counter drop\n\
               }}\n\
               chain tx {{ type filter hook output priority 0; policy accept;\n\
                 oifname \"{n}\" meta l4proto udp numgen random mod 1000 < {per_mille} counter drop\n\
               }}\n\
             }}\n"
        );
        let file = std::env::temp_dir().join(format!("mgloss{idx}-{}.nft", std::process::id()));
        std::fs::write(&file, rules).expect("write nft rules");
        host.exec(&["nft", "-f", file.to_str().expect("path")]);
        let _ = std::fs::remove_file(&file);
        LossyHost { host }
    }

    /// Datagrams nftables dropped so far (both directions).
    fn dropped(&self) -> u64 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.host.ns,
                "nft",
                "list",
                "table",
                "inet",
                "mgloss",
            ])
            .output()
            .expect("nft list");
        String::from_utf8_lossy(&out.stdout)
            .split("packets ")
            .skip(1)
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
}

/// The sum of a counter family's samples for `upstream="u"`, from a /metrics text.
fn counter(metrics: &str, family: &str, extra: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(family) && l.contains("upstream=\"u\"") && l.contains(extra))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Gives every thread of `proc` (and the threads it starts later) a real-time priority, so
/// that on a loaded machine (the rest of the suite runs beside this test on two cores) a
/// process waiting for the CPU does not look like a hung server: this test is about loss
/// on the link, and a CPU stall as long as the confirmation window (the probe, four
/// confirmations 10 ms apart and their timeouts: about 120 ms) is indistinguishable from a
/// hung server, which must fail over.
fn realtime(proc: &Proc) {
    let status = Command::new("chrt")
        .args(["--all-tasks", "--fifo", "--pid", "20"])
        .arg(proc.child.id().to_string())
        .status()
        .expect("chrt");
    assert!(status.success(), "chrt on {}", proc.name);
}

struct Scenario {
    host: LossyHost,
    _primary: Proc,
    _backup: Proc,
    /// One balancer, or the replicas of one cluster.
    balancers: Vec<Balancer>,
    primary: SocketAddr,
}

/// The `cluster:` section of replica `r` of `gossip.len()` replicas.
fn cluster_section(r: usize, gossip: &[u16]) -> String {
    let peers: Vec<String> = gossip
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != r)
        .map(|(_, p)| format!("\"127.0.0.1:{p}\""))
        .collect();
    format!(
        "cluster:\n  listen: \"127.0.0.1:{}\"\n  peers: [{}]\n  \
         secret: \"loss-test-secret-0123456789\"\n  node_id: r{r}\n  \
         peer_timeout: 1s\n  gossip_interval: 100ms\n",
        gossip[r],
        peers.join(", ")
    )
}

/// Balancers in front of a primary behind a lossy link: one, or `replicas` > 1 acting as
/// one cluster.
fn scenario(idx: u8, per_mille: u32, health_extra: &str, replicas: usize) -> Scenario {
    let host = LossyHost::create(idx, per_mille);
    let primary = SocketAddr::from((host.host.addr, 7000));
    let primary_proc = worker(
        "udp-echo",
        &format!("primary{idx}"),
        primary,
        Some(&host.host.ns),
    );
    let backup = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let backup_proc = worker("udp-echo", &format!("backup{idx}"), backup, None);
    let gossip: Vec<u16> = (0..replicas).map(|_| free_udp_port()).collect();
    realtime(&primary_proc);
    realtime(&backup_proc);
    let balancers: Vec<Balancer> = (0..replicas)
        .map(|r| {
            let (listen, admin) = (free_udp_port(), free_tcp_port());
            let cluster = if replicas > 1 {
                cluster_section(r, &gossip)
            } else {
                String::new()
            };
            let yaml = format!(
                "admin: {{ listen: 127.0.0.1:{admin} }}\n\
                 listeners:\n  - {{ name: media, protocol: udp, listen: 127.0.0.1:{listen}, upstream: u }}\n\
                 upstreams:\n  u:\n    primary: [\"{primary}\"]\n    backup: [\"{backup}\"]\n    \
                 health: {{ type: udp, interval: 100ms, timeout: 100ms{health_extra} }}\n{cluster}"
            );
            let b = Balancer::start(&yaml, admin);
            realtime(&b.proc);
            b
        })
        .collect();
    Scenario {
        host,
        _primary: primary_proc,
        _backup: backup_proc,
        balancers,
        primary,
    }
}

#[test]
fn random_loss_on_the_primary_link_moves_no_session_once_confirmed() {
    if !nix::unistd::Uid::effective().is_root() {
        panic!("this test needs root for ip netns and nft");
    }
    let runs = [
        (scenario(1, 20, "", 1), "2% loss, default confirmation"),
        (scenario(2, 50, "", 1), "5% loss, default confirmation"),
        (
            scenario(4, 20, "", 3),
            "2% loss, 3 replicas, default confirmation",
        ),
        (
            scenario(5, 50, "", 3),
            "5% loss, 3 replicas, default confirmation",
        ),
        (
            scenario(3, 50, ", confirm: 0, adaptive_timeout: false", 1),
            "5% loss, confirm: 0",
        ),
    ];
    for (s, what) in &runs {
        let want = vec![s.primary.to_string()];
        for b in &s.balancers {
            wait_until(Duration::from_secs(10), what, || b.active("u") == want);
        }
    }
    let start = Instant::now();
    let before: Vec<u64> = runs.iter().map(|(s, _)| s.host.dropped()).collect();
    while start.elapsed() < RUN {
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut report = Vec::new();
    for ((s, what), before) in runs.iter().zip(before) {
        let (mut failovers, mut cancelled, mut probes) = (0, 0, 0);
        for b in &s.balancers {
            let m = b.metrics();
            failovers += counter(&m, "mediagate_failovers_total", "");
            cancelled += counter(&m, "mediagate_probe_confirmations_total", "cancelled");
            probes += counter(&m, "mediagate_probes_total", "");
        }
        let dropped = s.host.dropped() - before;
        report.push(format!(
            "{what}: {failovers} failovers, {cancelled} failures cancelled by confirmation, \
             {probes} probes, {dropped} datagrams dropped by nftables"
        ));
        check(what, failovers, cancelled, dropped, &report);
    }
    eprintln!("{}", report.join("\n"));
}

/// The assertions of one run, with the figures of the runs so far in the message.
fn check(what: &str, failovers: u64, cancelled: u64, dropped: u64, report: &[String]) {
    let all = report.join("\n");
    assert!(dropped > 0, "no loss was injected\n{all}");
    if what.contains("confirm: 0") {
        assert!(
            failovers > 0,
            "without confirmation the loss must cause failovers (else the test proves nothing)\n{all}"
        );
    } else {
        assert_eq!(failovers, 0, "{what}: false failovers\n{all}");
        assert!(
            cancelled > 0,
            "{what}: the loss never hit a probe, so confirmation was not tested\n{all}"
        );
    }
}
