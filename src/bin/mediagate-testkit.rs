//! Test and benchmark helpers that must run as their own processes (so that tests can
//! kill, stop or isolate them): echo workers standing in for media workers.
//!
//! `mediagate-testkit udp-echo --name primary --listen 127.0.0.1:7000`
//! `mediagate-testkit tcp-echo --name backup --listen 127.0.0.1:7001`
//!
//! Each prints `ready ADDR` on stdout once bound and runs until killed.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "mediagate-testkit")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// UDP echo worker: answers `NAME|payload`.
    UdpEcho {
        #[arg(long)]
        name: String,
        #[arg(long)]
        listen: SocketAddr,
    },
    /// TCP echo worker: sends `NAME|`, then echoes.
    TcpEcho {
        #[arg(long)]
        name: String,
        #[arg(long)]
        listen: SocketAddr,
        /// Also answer `HTTP 200` on this port of the same IP (a health endpoint).
        #[arg(long)]
        http_port: Option<u16>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("testkit: {e}");
            return ExitCode::from(1);
        }
    };
    let r: std::io::Result<()> = rt.block_on(async {
        match cli.command {
            Command::UdpEcho { name, listen } => {
                let w = mediagate::workers::UdpEcho::start(&name, listen).await?;
                println!("ready {}", w.addr);
                std::future::pending::<()>().await;
                Ok(())
            }
            Command::TcpEcho {
                name,
                listen,
                http_port,
            } => {
                if let Some(p) = http_port {
                    mediagate::workers::http_ok(SocketAddr::new(listen.ip(), p)).await?;
                }
                let (addr, task) = mediagate::workers::tcp_echo(&name, listen).await?;
                println!("ready {addr}");
                let _ = task.await;
                Ok(())
            }
        }
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("testkit: {e}");
            ExitCode::from(1)
        }
    }
}
