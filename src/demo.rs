//! `mediagate demo`: a self-contained failover showcase on loopback.
//!
//! Two embedded UDP echo workers (primary, backup), the real balancer with 100 ms probes
//! in front of them, and 20 synthetic media flows. The demo kills the primary, then
//! restarts it, then hangs it, and prints what each step cost the flows.

use crate::app::App;
use crate::config;
use crate::flows::{FlowStats, Flows};
use crate::workers::UdpEcho;
use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const FLOWS: usize = 20;
const SEND_EVERY: Duration = Duration::from_millis(10);

/// Runs the showcase; returns an error if failover does not happen as promised.
pub async fn run() -> Result<()> {
    crate::logging::init(&config::LogConfig {
        level: "error".into(),
        format: config::LogFormat::Text,
    });
    let t0 = Instant::now();
    let stamp = || format!("[{:>6} ms]", t0.elapsed().as_millis());

    let primary = UdpEcho::start("primary", "127.0.0.1:0".parse()?).await?;
    let backup = UdpEcho::start("backup", "127.0.0.1:0".parse()?).await?;
    let primary_addr = primary.addr;
    let listen = free_udp_port().await?;
    let admin = if std::net::TcpListener::bind("127.0.0.1:8086").is_ok() {
        "127.0.0.1:8086"
    } else {
        "127.0.0.1:0"
    };
    let yaml = format!(
        r#"
admin: {{ listen: "{admin}" }}
listeners:
  - name: demo-rtp
    protocol: udp
    listen: {listen}
    upstream: media
upstreams:
  media:
    primary: [{primary_addr}]
    backup: [{backup}]
    failback: all
    health: {{ type: udp, send: ping, interval: 100ms, timeout: 100ms, fall: 1, rise: 2 }}
shutdown: {{ drain_timeout: 1s }}
"#,
        backup = backup.addr
    );
    let cfg = config::load_str(&yaml, "demo").map_err(|e| anyhow::anyhow!("{e}"))?;
    let app = App::start(cfg, "(embedded demo config)".into()).await?;

    println!("mediagate demo: active-passive failover on loopback\n");
    println!("  primary worker   udp {primary_addr}");
    println!("  backup worker    udp {}", backup.addr);
    println!(
        "  balancer         udp {listen} -> upstream \"media\" (udp probe every 100 ms, timeout 100 ms, fall 1, rise 2, failback: all)"
    );
    println!(
        "  admin API        http://{}/status  (try: mediagate status --admin http://{})",
        app.admin_addr, app.admin_addr
    );
    println!(
        "  clients          {FLOWS} flows, one datagram every {} ms each\n",
        SEND_EVERY.as_millis()
    );

    let flows = Flows::start(listen, FLOWS, SEND_EVERY, 64).await?;
    wait_for(&flows, "primary", Duration::from_secs(5))
        .await
        .context("flows never reached the primary")?;
    println!("{} {FLOWS} sessions flowing through the primary", stamp());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. Process death: the port closes and the kernel answers ICMP port unreachable.
    let before = flows.snapshot();
    flows.reset_gaps();
    primary.stop().await;
    let killed = Instant::now();
    println!(
        "{} primary killed (its port now answers ICMP port unreachable)",
        stamp()
    );
    wait_for(&flows, "backup", Duration::from_secs(3))
        .await
        .context("flows did not move to the backup")?;
    let moved_after = killed.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    print_event(&app, "failover", &stamp());
    let after = flows.snapshot();
    println!(
        "{} all {FLOWS} flows answered by the backup {} ms after the kill; {}",
        stamp(),
        moved_after.as_millis(),
        loss_line(&before, &after)
    );

    // 2. Recovery: the primary comes back on the same port; failback: all moves flows home.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let primary = UdpEcho::start("primary", primary_addr)
        .await
        .context("restart the primary")?;
    let restarted = Instant::now();
    println!("{} primary restarted", stamp());
    wait_for(&flows, "primary", Duration::from_secs(3))
        .await
        .context("flows did not fail back")?;
    println!(
        "{} failback: all {FLOWS} flows back on the primary {} ms after its restart (rise 2 x 100 ms)",
        stamp(),
        restarted.elapsed().as_millis()
    );
    print_event(&app, "failback", &stamp());

    // 3. Hung worker: the port stays open but nothing answers, no ICMP; probes time out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = flows.snapshot();
    flows.reset_gaps();
    primary.pause(true);
    let hung = Instant::now();
    println!(
        "{} primary hung (no replies, no ICMP: the silence of its flows and the probes tell)",
        stamp()
    );
    wait_for(&flows, "backup", Duration::from_secs(3))
        .await
        .context("flows did not leave the hung primary")?;
    let moved_after = hung.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    print_event(&app, "failover", &stamp());
    let after = flows.snapshot();
    let worst_gap = after.iter().map(|f| f.max_gap).max().unwrap_or_default();
    println!(
        "{} all {FLOWS} flows answered by the backup {} ms after the hang; longest silence of a flow {} ms",
        stamp(),
        moved_after.as_millis(),
        worst_gap.as_millis()
    );
    let _ = before;

    let stats = flows.finish(Duration::from_millis(100)).await;
    let sent: u64 = stats.iter().map(|f| f.sent).sum();
    let received: u64 = stats.iter().map(|f| f.received).sum();
    println!(
        "\nsummary: {sent} datagrams sent, {received} answered, {} lost over two failovers and one failback",
        sent.saturating_sub(received)
    );
    app.shutdown(std::future::pending()).await;
    drop(primary);
    drop(backup);
    Ok(())
}

/// Waits until every flow's latest reply came from `worker`.
async fn wait_for(flows: &Flows, worker: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if flows.snapshot().iter().all(|f| f.last_worker == worker) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for every flow to be served by {worker}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn loss_line(before: &[FlowStats], after: &[FlowStats]) -> String {
    // The last few datagrams may still be in flight at the snapshot: leave them out.
    let lost: Vec<u64> = before
        .iter()
        .zip(after)
        .map(|(b, a)| a.lost_between(b.sent, a.sent.saturating_sub(5)))
        .collect();
    let total: u64 = lost.iter().sum();
    let worst = lost.iter().max().copied().unwrap_or(0);
    let gap = after.iter().map(|f| f.max_gap).max().unwrap_or_default();
    format!(
        "datagrams lost: {total} in total, at most {worst} per flow; longest silence of a flow {} ms",
        gap.as_millis()
    )
}

fn print_event(app: &App, kind: &str, stamp: &str) {
    let status = crate::admin::status::build(app.state.as_ref());
    let Some(ev) = status
        .upstreams
        .iter()
        .flat_map(|u| u.events.iter())
        .rev()
        .find(|e| e.kind == kind)
    else {
        println!("{stamp} (no {kind} event recorded)");
        return;
    };
    let mut line = format!(
        "{stamp} event: {} {} -> {}",
        ev.kind,
        ev.from.join(","),
        ev.to.join(",")
    );
    if let Some(r) = &ev.reason {
        line.push_str(&format!(", reason {r}"));
    }
    if let Some(d) = ev.detection_ms {
        line.push_str(&format!(", detected {d} ms after the last good probe"));
    }
    line.push_str(&format!(", {} sessions moved", ev.sessions_moved));
    println!("{line}");
}

async fn free_udp_port() -> Result<SocketAddr> {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    Ok(s.local_addr()?)
}
