//! Log setup: `log.level` (overridden by `RUST_LOG` at start) and `log.format` (text or
//! json), to stderr. Text is coloured only when stderr is a terminal (and `NO_COLOR` is
//! not set), so files, pipes, `kubectl logs` and journald get plain lines.
//!
//! The level filter sits behind a reload handle: a reload that changes `log.level`
//! applies it at once ([`apply_config`]), and `POST /log-level` sets any filter at run
//! time ([`set_level`]). The format is fixed at start (changing it needs a restart).

use crate::config::{LogConfig, LogFormat};
use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// The filter in force and the `log.level` it last took from the configuration.
struct Live {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The filter directive in force, as given.
    current: Mutex<String>,
    /// `log.level` of the configuration last applied; a reload changes the filter only
    /// when this changes, so an unchanged file keeps a `RUST_LOG` or `POST /log-level`.
    configured: Mutex<String>,
}

static LIVE: OnceLock<Live> = OnceLock::new();

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Parses a filter: a level (`debug`) or comma-separated directives such as
/// `info,mediagate::health=debug`. Each directive must name a level, so a mistyped
/// level (`debgu`) is an error instead of a target filter that matches nothing.
pub fn parse_filter(directive: &str) -> Result<EnvFilter, String> {
    let d = directive.trim();
    let valid = !d.is_empty()
        && d.split(',').all(|part| {
            let part = part.trim();
            let lvl = match part.rsplit_once('=') {
                Some((target, lvl)) if !target.trim().is_empty() => lvl,
                Some(_) => return false,
                None => part,
            };
            LEVELS.contains(&lvl.trim().to_ascii_lowercase().as_str())
        });
    if !valid {
        return Err(format!(
            "invalid log level {d:?} (expected one of: trace, debug, info, warn, error, off; \
             or directives such as info,mediagate=debug)"
        ));
    }
    EnvFilter::try_new(d).map_err(|e| format!("invalid log filter {d:?}: {e}"))
}

/// Installs the global subscriber; a second call is a no-op.
pub fn init(cfg: &LogConfig) {
    let (filter, current) = match std::env::var("RUST_LOG") {
        Ok(env) if EnvFilter::try_new(&env).is_ok() => (EnvFilter::new(&env), env),
        _ => match parse_filter(&cfg.level) {
            Ok(f) => (f, cfg.level.clone()),
            Err(_) => (EnvFilter::new("info"), "info".to_string()),
        },
    };
    let (filter, handle) = reload::Layer::new(filter);
    // Colour for a person at a terminal only, and not when NO_COLOR asks otherwise.
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let installed = match cfg.format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            // Flat: `message`, `level`, `target` and every field at the top level, the
            // shape Loki, Elasticsearch and Cloud Logging expect (not nested in `fields`).
            .with(
                fmt.json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Text => tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .try_init(),
    };
    if installed.is_ok() {
        let _ = LIVE.set(Live {
            handle,
            current: Mutex::new(current),
            configured: Mutex::new(cfg.level.clone()),
        });
    }
}

/// Sets the filter in force (`POST /log-level`); returns the directive now in force.
/// Without [`init`] (library use, tests) the filter is only checked.
pub fn set_level(directive: &str) -> Result<String, String> {
    let filter = parse_filter(directive)?;
    let directive = directive.trim().to_string();
    if let Some(live) = LIVE.get() {
        live.handle
            .reload(filter)
            .map_err(|e| format!("cannot change the log filter: {e}"))?;
        *live.current.lock().unwrap_or_else(|p| p.into_inner()) = directive.clone();
    }
    Ok(directive)
}

/// The filter directive in force (`None` before [`init`]).
pub fn current_level() -> Option<String> {
    LIVE.get()
        .map(|l| l.current.lock().unwrap_or_else(|p| p.into_inner()).clone())
}

/// Called after a successful configuration reload: applies `log.level` when it differs
/// from the level of the previous configuration.
pub fn apply_config(cfg: &LogConfig) {
    let Some(live) = LIVE.get() else { return };
    let mut configured = live.configured.lock().unwrap_or_else(|p| p.into_inner());
    if *configured == cfg.level {
        return;
    }
    match set_level(&cfg.level) {
        Ok(level) => {
            *configured = cfg.level.clone();
            tracing::info!(%level, "log level changed by the configuration");
        }
        Err(e) => tracing::error!("log.level not applied: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_need_a_level_in_every_directive() {
        for ok in ["debug", " info ", "warn,mediagate::health=debug", "OFF"] {
            assert!(parse_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "debgu", "info,mediagate", "=debug", "info,x=loud"] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
    }
}
