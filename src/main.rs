//! The `mediagate` command line. Only argument handling lives here.

use clap::{Args, Parser, Subcommand};
use mediagate::admin::client::{self, DEFAULT_ADMIN};
use mediagate::{app, cli, config, demo};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "mediagate",
    version = concat!(
        env!("CARGO_PKG_VERSION"),
        " (kernel fast path: ",
        env!("MEDIAGATE_FAST_PATH"),
        ")"
    ),
    about = "Active-passive failover load balancer for WebRTC media gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How a client command reaches the admin API; accepted by every client command.
#[derive(Args)]
struct AdminArgs {
    /// Admin API base URL (http:// or https://).
    #[arg(long, env = "MEDIAGATE_ADMIN", default_value = DEFAULT_ADMIN, value_parser = admin_url)]
    admin: String,
    /// Bearer token for the admin API (needed by the POST endpoints when `admin.token` is set).
    #[arg(long, env = "MEDIAGATE_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// Checks the admin URL at parse time, so a malformed one is a usage error (exit 2).
fn admin_url(s: &str) -> Result<String, String> {
    client::check_base(s).map(|()| s.to_string())
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
    /// Print the configuration reference (every key, its default and meaning) as Markdown.
    Config {
        /// Print the reference (the only mode; the same text as docs/configuration.md).
        #[arg(long, required = true)]
        reference: bool,
    },
    /// Self-contained failover showcase on loopback.
    Demo,
    /// Show upstreams, servers, active servers, sessions and recent failovers.
    Status {
        #[command(flatten)]
        api: AdminArgs,
        /// Refresh every second; a failed fetch is shown and retried. The screen is
        /// redrawn in place only on a terminal.
        #[arg(long)]
        watch: bool,
        /// `table`, or `json`: the /status document as the API returns it.
        #[arg(short, long, value_enum, default_value = "table")]
        output: cli::Output,
        /// Ask every replica: every address the admin URL's host name resolves to (in
        /// Kubernetes, a headless Service of the admin port).
        #[arg(long)]
        all: bool,
    },
    /// Reload the configuration file (`POST /reload`); a refused file changes nothing and
    /// its errors are printed (exit 1).
    Reload {
        #[command(flatten)]
        api: AdminArgs,
    },
    /// Print the log filter in force, or set it: `mediagate log-level debug`,
    /// `mediagate log-level info,mediagate::health=debug`.
    LogLevel {
        /// The new filter (a level, or tracing directives); none: print the current one.
        level: Option<String>,
        #[command(flatten)]
        api: AdminArgs,
    },
    /// Set a server's admin state.
    Server {
        #[arg(value_parser = ["enable", "drain", "maint"])]
        state: String,
        upstream: String,
        /// Server address as shown by `mediagate status` (ip:port), or its IP.
        server: String,
        #[command(flatten)]
        api: AdminArgs,
    },
    /// Print an ICE configuration (JSON) with fresh TURN credentials.
    Ice {
        #[command(flatten)]
        api: AdminArgs,
        /// User name embedded in ephemeral credentials.
        #[arg(long, default_value = "")]
        user: String,
        /// Credential lifetime in seconds [default: turn.auth.ttl].
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Follow the event stream (failover, failback, admin, server up/down): one JSON
    /// object per line. Reconnects with Last-Event-ID when the stream ends, so nothing
    /// is missed (a `reset` event says when the history no longer reached back).
    Events {
        #[command(flatten)]
        api: AdminArgs,
    },
    /// Manual failback of an upstream (for `failback: manual`).
    Failback {
        upstream: String,
        #[command(flatten)]
        api: AdminArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(config),
        Command::Run { config } => run(config),
        Command::Config { reference: _ } => {
            print!("{}", config::reference::markdown());
            ExitCode::SUCCESS
        }
        Command::Demo => with_runtime(demo::run()),
        Command::Status {
            api,
            watch,
            output,
            all,
        } => with_runtime(cli::status(api.admin, api.token, watch, output, all)),
        Command::Reload { api } => with_runtime(cli::reload(api.admin, api.token)),
        Command::LogLevel { level, api } => {
            with_runtime(cli::log_level(api.admin, api.token, level))
        }
        Command::Server {
            state,
            upstream,
            server,
            api,
        } => with_runtime(cli::set_server_state(
            api.admin, api.token, state, upstream, server,
        )),
        Command::Ice { api, user, ttl } => with_runtime(cli::ice(api.admin, api.token, user, ttl)),
        Command::Events { api } => with_runtime(cli::events(api.admin, api.token)),
        Command::Failback { upstream, api } => {
            with_runtime(cli::failback(api.admin, api.token, upstream))
        }
    }
}

fn check(path: Option<PathBuf>) -> ExitCode {
    let path = app::config_path(path);
    match config::load_file(&path) {
        Ok(cfg) => {
            // A warning, not an error: the limit where `check` runs need not be the one
            // where the balancer runs, and the runtime budget enforces the real one.
            if let Some(why) = mediagate::fdbudget::check_warning(&cfg, &app::fd_consumers(&cfg)) {
                eprintln!("warning: {why}");
            }
            for w in config::advice::warnings(&cfg) {
                eprintln!("warning: {}: {}: {}", path.display(), w.path, w.message);
            }
            // Certificates are read as `run` would (bounded: a regular file of a few
            // hundred KiB at most).
            let cert_errors = cfg
                .turn
                .as_ref()
                .map(mediagate::turn::check_certificates)
                .unwrap_or_default();
            if !cert_errors.is_empty() {
                eprintln!("{}: {}", path.display(), cert_errors.join("\n"));
                return ExitCode::from(2);
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
    mediagate::fdbudget::raise_nofile_limit();
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
