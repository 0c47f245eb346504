//! Runs only mediagate's STUN/TURN service from a configuration file (its `turn:` block),
//! for `scripts/bench-turn.sh` and manual interop checks with coturn's tools.
//!
//! Usage: `turn_server CONFIG.yaml` — prints the bound listeners, serves until SIGINT or
//! SIGTERM, then prints the TURN metrics (OpenMetrics text) to stdout and exits 0.
//! Static upstream server IPs of the file feed the `upstreams` entry of `relay.peers`.

use mediagate::config::{ServerRef, load_file};
use mediagate::turn::{PeerPolicy, TurnMetrics, TurnService};
use prometheus_client::registry::Registry;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let Some(path) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: turn_server CONFIG.yaml");
        std::process::exit(2);
    };
    let cfg = match load_file(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let Some(turn) = cfg.turn.clone() else {
        eprintln!("{}: no turn: block", path.display());
        std::process::exit(2);
    };
    let policy = Arc::new(
        PeerPolicy::new(&turn.relay, cfg.admin.listen, &cfg.listeners)
            .map_err(anyhow::Error::msg)?,
    );
    let ips: Vec<IpAddr> = cfg
        .upstreams
        .values()
        .flat_map(|u| u.primary.iter().chain(u.backup.iter()))
        .filter_map(|s| match s {
            ServerRef::Static(sa) => Some(sa.ip()),
            ServerRef::StaticIp(ip) => Some(*ip),
            _ => None,
        })
        .collect();
    policy.set_upstream_ips(ips);
    let mut registry = Registry::default();
    let metrics = TurnMetrics::register(&mut registry);
    let service = TurnService::start(&turn, policy, metrics).await?;
    for (proto, addr) in service.local_addrs() {
        println!("listening {proto} {addr}");
    }
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    service.close().await;
    // What the kernel fast path relayed (turn.relay.offload: ebpf) is added at a scrape.
    mediagate::offload::refresh_metrics();
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    print!("{out}");
    Ok(())
}
