//! The `mediagate` command line (SPEC §2). Only argument handling lives here.

use clap::{Parser, Subcommand};
use mediagate::admin::client::{self, DEFAULT_ADMIN};
use mediagate::{app, cli, config, demo};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "mediagate",
    version,
    about = "Active-passive failover load balancer for WebRTC media gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the balancer.
    Run {
        /// Configuration file [default: $MEDIAGATE_CONFIG, else config/mediagate.yaml]
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file: prints `ok` or every error; exit 0 or 2.
    Check {
        /// Configuration file [default: $MEDIAGATE_CONFIG, else config/mediagate.yaml]
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Self-contained failover showcase on loopback.
    Demo,
    /// Show upstreams, servers, active servers, sessions and recent failovers.
    Status {
        /// Admin API base URL.
        #[arg(long, env = "MEDIAGATE_ADMIN", default_value = DEFAULT_ADMIN)]
        admin: String,
        /// Refresh every second.
        #[arg(long)]
        watch: bool,
    },
    /// Set a server's admin state.
    Server {
        /// enable | drain | maint
        state: String,
        upstream: String,
        /// Server address as shown by `mediagate status` (ip:port), or its IP.
        server: String,
        /// Admin API base URL.
        #[arg(long, env = "MEDIAGATE_ADMIN", default_value = DEFAULT_ADMIN)]
        admin: String,
        /// Bearer token for the admin API.
        #[arg(long, env = "MEDIAGATE_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Print an ICE configuration (JSON) with fresh TURN credentials.
    Ice {
        #[arg(long, env = "MEDIAGATE_ADMIN", default_value = DEFAULT_ADMIN)]
        admin: String,
        /// User name embedded in ephemeral credentials.
        #[arg(long, default_value = "")]
        user: String,
        /// Credential lifetime in seconds [default: turn.auth.ttl].
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Manual failback of an upstream (for `failback: manual`).
    Failback {
        upstream: String,
        #[arg(long, env = "MEDIAGATE_ADMIN", default_value = DEFAULT_ADMIN)]
        admin: String,
        #[arg(long, env = "MEDIAGATE_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(config),
        Command::Run { config } => run(config),
        Command::Demo => with_runtime(demo::run()),
        Command::Status { admin, watch } => with_runtime(cli::status(admin, watch)),
        Command::Server {
            state,
            upstream,
            server,
            admin,
            token,
        } => with_runtime(cli::set_server_state(admin, token, state, upstream, server)),
        Command::Ice { admin, user, ttl } => with_runtime(cli::ice(admin, user, ttl)),
        Command::Failback {
            upstream,
            admin,
            token,
        } => with_runtime(async move {
            let (code, body) = client::request(
                &admin,
                "POST",
                &format!("/upstreams/{upstream}/failback"),
                None,
                token.as_deref(),
            )
            .await?;
            cli::expect_ok(code, &body)
        }),
    }
}

fn check(path: Option<PathBuf>) -> ExitCode {
    let path = app::config_path(path);
    match config::load_file(&path) {
        Ok(cfg) => {
            // A warning, not an error: the limit where `check` runs need not be the one
            // where the balancer runs, and the runtime budget enforces the real one.
            if let Some(why) = mediagate::fdbudget::check_warning(&cfg) {
                eprintln!("warning: {why}");
            }
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::from(2)
        }
    }
}

fn run(path: Option<PathBuf>) -> ExitCode {
    let path = app::config_path(path);
    let cfg = match config::load_file(&path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    mediagate::logging::init(&cfg.log);
    app::raise_nofile_limit();
    with_runtime(mediagate::run::serve(cfg, path))
}

/// Runs a future on a multi-threaded runtime and maps its error to exit code 1.
fn with_runtime(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mediagate: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mediagate: {e:#}");
            ExitCode::from(1)
        }
    }
}
