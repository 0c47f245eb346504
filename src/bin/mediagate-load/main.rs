//! `mediagate-load`: open-loop UDP load generator and fast echo worker for benchmarks.
//!
//! `mediagate-load echo --listen 127.0.0.1:7000 [--threads 1]`
//!     reflects every datagram unchanged (recvmmsg/sendmmsg); prints `ready ADDR`.
//! `mediagate-load run --target 127.0.0.1:5004 --flows 1000 --size 1200 --rate 50000 --duration 5s`
//!     N flows, each from its own source port, `rate` datagrams/s in total; prints achieved
//!     packets per second, loss, RTT p50/p99/p99.9 and the longest per-flow silence;
//!     `--slow-us 1500` also prints (stderr) when the replies slower than that were sent,
//!     per 10 ms window (a stall shows as one window holding most of them).
//! `mediagate-load sweep --target ... --flows 1000 --size 64 [--max-loss 0.001]`
//!     the highest rate with loss under `max-loss` (doubling, then bisection).
//!
//! `mediagate-load turn --server 127.0.0.1:3478 --peer 10.0.0.2:9000 --allocations 100 [--rate N]`
//!     N TURN allocations (UDP or `--transport tcp`), each with a permission and a channel
//!     to the echo peer; open-loop ChannelData (or `--send-indications`) at `rate`, or
//!     without `--rate` a sweep to the highest rate under `--max-loss`.
//!
//! Every mode is bounded in time; output lines are `key=value` pairs for scripts.

use clap::{Parser, Subcommand};
mod loadgen;
mod stats;
mod turn;
mod turnctl;

use loadgen::Generator;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "mediagate-load",
    about = "Open-loop UDP load generator and echo worker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Flows {
    /// Where to send (a proxy's listener or the echo worker itself).
    #[arg(long)]
    target: SocketAddr,
    /// Concurrent flows, each from its own source port.
    #[arg(long, default_value_t = 1)]
    flows: usize,
    /// Datagram size in bytes (at least 24: the header).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Seconds to wait for every flow's first reply before measuring.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    prime: Duration,
    /// Bind flow i to source port BASE+i (0: ephemeral ports).
    #[arg(long, default_value_t = 0)]
    src_base: u16,
    /// Sleep whenever ahead of schedule instead of spinning for short waits (datagrams
    /// then leave in small bursts; the reported cpu_ms is the work, not the waiting).
    #[arg(long)]
    sleep_only: bool,
    /// After the run, print to stderr when the replies slower than this many µs were
    /// sent, per 10 ms window (tells a stall from a slow path).
    #[arg(long)]
    slow_us: Option<u64>,
}

#[derive(Subcommand)]
enum Command {
    /// Fast UDP echo worker: reflects datagrams unchanged.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Exit after this long (bounded runs).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        lifetime: Duration,
    },
    /// One run at a fixed total rate.
    Run {
        #[command(flatten)]
        flows: Flows,
        /// Datagrams per second, over all flows.
        #[arg(long)]
        rate: u64,
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Highest rate with loss below `max-loss`.
    Sweep {
        #[command(flatten)]
        flows: Flows,
        #[arg(long, default_value_t = 0.001)]
        max_loss: f64,
        /// First rate tried, datagrams/s.
        #[arg(long, default_value_t = 20_000)]
        start: u64,
        /// Never try above this rate.
        #[arg(long, default_value_t = 2_000_000)]
        max: u64,
        /// Length of each trial.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Bisection steps after the first failing rate.
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
    /// TURN relay load: allocations with channels, open-loop ChannelData through them.
    Turn {
        /// The TURN server's listener (loopback, or inside the caller's own namespace).
        #[arg(long)]
        server: SocketAddr,
        /// The echo peer every allocation sends to (`mediagate-load echo`).
        #[arg(long)]
        peer: SocketAddr,
        /// `udp` or `tcp` between the generator and the server.
        #[arg(long, default_value = "udp")]
        transport: String,
        #[arg(long, default_value_t = 100)]
        allocations: usize,
        /// Payload bytes per packet (at least 24).
        #[arg(long, default_value_t = 160)]
        size: usize,
        #[arg(long, default_value = "bench")]
        user: String,
        #[arg(long, default_value = "bench")]
        password: String,
        /// Sender/receiver thread pairs.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// The echo peer's process id: its socket drops are reported (`peer_drops`).
        #[arg(long)]
        peer_pid: Option<u32>,
        /// Send indications instead of ChannelData (no channel is bound).
        #[arg(long)]
        send_indications: bool,
        /// One run at this total rate (packets/s sent); without it, a sweep.
        #[arg(long)]
        rate: Option<u64>,
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Sweep: highest rate with loss below this.
        #[arg(long, default_value_t = 0.005)]
        max_loss: f64,
        #[arg(long, default_value_t = 20_000)]
        start: u64,
        #[arg(long, default_value_t = 2_000_000)]
        max: u64,
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
    /// TCP backend: swallows streams that start with `S`, echoes those that start with `E`.
    TcpServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        lifetime: Duration,
    },
    /// TCP bulk throughput through `target` to a tcp-server: prints bytes per second.
    TcpThroughput {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// TCP connections per second through `target` to a tcp-server.
    TcpCps {
        #[arg(long)]
        target: SocketAddr,
        /// Concurrent connect loops.
        #[arg(long, default_value_t = 16)]
        workers: usize,
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
}

/// Runs `f` on a small multi-threaded tokio runtime.
fn tokio_run<F: std::future::Future<Output = Result<(), String>>>(
    threads: usize,
    f: F,
) -> Result<(), String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?
        .block_on(f)
}

/// Whether this process runs in a network namespace other than init's (the namespaced
/// benchmark's clients): there any target address stays inside the namespaces the
/// benchmark created, so the loopback-only rule does not apply.
/// (`ip netns exec` denies reading init's namespace link: that counts as "another".)
fn in_own_netns() -> bool {
    let Ok(own) = std::fs::read_link("/proc/self/ns/net") else {
        return false;
    };
    match std::fs::read_link("/proc/1/ns/net") {
        Ok(init) => init != own,
        Err(e) => e.kind() == std::io::ErrorKind::PermissionDenied,
    }
}

fn loopback(a: SocketAddr) -> Result<SocketAddr, String> {
    if a.ip().is_loopback() || in_own_netns() {
        Ok(a)
    } else {
        Err(format!(
            "--target must be a loopback address (or the process in its own network namespace), not {a}"
        ))
    }
}

fn generator(f: &Flows) -> Result<Generator, String> {
    if f.flows == 0 || f.flows > 20_000 {
        return Err(format!("--flows must be 1..=20000, not {}", f.flows));
    }
    if !f.target.ip().is_loopback() && !in_own_netns() {
        return Err(format!(
            "--target must be a loopback address (or the process in its own network namespace), not {}",
            f.target
        ));
    }
    let mut g = Generator::with_source_ports(f.target, f.flows, f.size, f.src_base)
        .map_err(|e| format!("open flows: {e}"))?;
    g.sleep_only = f.sleep_only;
    g.slow_us = f.slow_us;
    let answered = g.prime(f.prime).map_err(|e| format!("prime: {e}"))?;
    if answered < f.flows {
        eprintln!(
            "warning: only {answered} of {} flows answered while priming",
            f.flows
        );
    }
    Ok(g)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r: Result<(), String> = match cli.command {
        Command::Echo {
            listen,
            threads,
            lifetime,
        } => {
            let stop = Arc::new(AtomicBool::new(false));
            match loadgen::echo(listen, threads, stop) {
                Ok(addr) => {
                    println!("ready {addr}");
                    std::thread::sleep(lifetime);
                    Ok(())
                }
                Err(e) => Err(format!("echo: {e}")),
            }
        }
        Command::Run {
            flows,
            rate,
            duration,
        } => generator(&flows).and_then(|g| {
            let r = g
                .run(
                    rate,
                    duration.min(Duration::from_secs(120)),
                    Duration::from_millis(300),
                )
                .map_err(|e| format!("run: {e}"))?;
            println!("{}", r.line());
            Ok(())
        }),
        Command::Sweep {
            flows,
            max_loss,
            start,
            max,
            duration,
            steps,
        } => generator(&flows).and_then(|g| {
            let duration = duration.min(Duration::from_secs(30));
            let s = loadgen::sweep(&g, start, max, max_loss, duration, steps.min(12), |r| {
                eprintln!("  trial {}", r.line());
 if r.local_drops > 0 || r.peer_drops > 0 {
 eprintln!("  warning: the generator or the echo peer dropped packets: this trial measured the load, not the server");
 }
            })
            .map_err(|e| format!("sweep: {e}"))?;
            match s.best {
                Some(b) => println!("best {}", b.line()),
                None => println!("best none runs={}", s.runs.len()),
            }
            Ok(())
        }),
        Command::Turn {
            server,
            peer,
            transport,
            allocations,
            size,
            user,
            password,
            threads,
            peer_pid,
            send_indications,
            rate,
            duration,
            max_loss,
            start,
            max,
            steps,
        } => (|| {
            let server = loopback(server)?;
            let tcp = match transport.as_str() {
                "udp" => false,
                "tcp" => true,
                t => return Err(format!("--transport must be udp or tcp, not {t}")),
            };
            if allocations == 0 || allocations > 20_000 {
                return Err(format!(
                    "--allocations must be 1..=20000, not {allocations}"
                ));
            }
            let opts = turn::Options {
                server,
                tcp,
                allocations,
                size: size.clamp(loadgen::HEADER, 8000),
                peer,
                creds: turnctl::Credentials {
                    username: user,
                    password,
                },
                threads,
                peer_pid,
                mode: if send_indications {
                    turn::Mode::Send
                } else {
                    turn::Mode::Channel
                },
            };
            let t0 = std::time::Instant::now();
            let g = turn::TurnGenerator::new(opts).map_err(|e| format!("setup: {e}"))?;
            eprintln!(
                "{allocations} allocations ready in {:.1} s",
                t0.elapsed().as_secs_f64()
            );
            let duration = duration.min(Duration::from_secs(60));
            let settle = Duration::from_millis(300);
            use loadgen::Trial;
            match rate {
                Some(rate) => {
                    let r = g
                        .run(rate, duration, settle)
                        .map_err(|e| format!("run: {e}"))?;
                    println!("{}", r.line());
                }
                None => {
                    let s =
                        loadgen::sweep(&g, start, max, max_loss, duration, steps.min(12), |r| {
                            eprintln!("  trial {}", r.line());
 if r.local_drops > 0 || r.peer_drops > 0 {
 eprintln!("  warning: the generator or the echo peer dropped packets: this trial measured the load, not the server");
 }
                        })
                        .map_err(|e| format!("sweep: {e}"))?;
                    match s.best {
                        Some(b) => println!("best {}", b.line()),
                        None => println!("best none runs={}", s.runs.len()),
                    }
                }
            }
            Ok(())
        })(),
        Command::TcpServer { listen, lifetime } => tokio_run(1, async move {
            let addr = loadgen::tcp::server(listen)
                .await
                .map_err(|e| format!("tcp-server: {e}"))?;
            println!("ready {addr}");
            tokio::time::sleep(lifetime).await;
            Ok(())
        }),
        Command::TcpThroughput {
            target,
            conns,
            duration,
        } => tokio_run(1, async move {
            let target = loopback(target)?;
            let d = duration.min(Duration::from_secs(60));
            let bps = loadgen::tcp::throughput(target, conns.clamp(1, 1000), d)
                .await
                .map_err(|e| format!("tcp-throughput: {e}"))?;
            println!(
                "conns={conns} bytes_per_sec={bps:.0} gbit_per_sec={:.3}",
                bps * 8.0 / 1e9
            );
            Ok(())
        }),
        Command::TcpCps {
            target,
            workers,
            duration,
        } => tokio_run(1, async move {
            let target = loopback(target)?;
            let d = duration.min(Duration::from_secs(60));
            let (cps, failed) = loadgen::tcp::cps(target, workers.clamp(1, 1000), d)
                .await
                .map_err(|e| format!("tcp-cps: {e}"))?;
            println!("workers={workers} conn_per_sec={cps:.0} failed={failed}");
            Ok(())
        }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mediagate-load: {e}");
            ExitCode::from(1)
        }
    }
}
