//! Advice on a configuration that loads: keys written where they mean nothing (errors,
//! like unknown keys, so a setting that would be ignored fails `check`) and what is
//! allowed but unwise (warnings: short secrets). Kept apart from `validate.rs`, which
//! checks values; these look at what the file says, not at what it is worth.

use super::health::HealthType;
use super::types::{Config, Protocol};
use super::validate::{Checker, Issue};
use super::yaml::{index_path, key_path};

/// Keys written in the file that mean nothing for what they sit in: a TCP-only key on a
/// UDP listener, an `http` probe's key on a `udp` probe, a TLS detail without `tls`. Like
/// an unknown key, each is an error, so a setting that would be silently ignored fails
/// `check` instead. `written` tells whether a key path appears in the file (a default
/// never counts).
pub fn meaningless_keys(cfg: &Config, written: &dyn Fn(&str) -> bool) -> Vec<Issue> {
    let mut v = Checker { issues: Vec::new() };
    for (i, l) in cfg.listeners.iter().enumerate() {
        let path = index_path("listeners", i);
        if l.protocol == Protocol::Udp && written(&key_path(&path, "max_connections")) {
            v.push(
                key_path(&path, "max_connections"),
                "max_connections is for tcp listeners; a UDP listener is bounded by \
                 session.max_sessions",
            );
        }
    }
    for (name, up) in &cfg.upstreams {
        let h = key_path(&key_path("upstreams", name), "health");
        let kind = up.health.kind;
        let only = |keys: &[&str], for_kind: HealthType, what: &str, v: &mut Checker| {
            if kind == for_kind {
                return;
            }
            for k in keys {
                let p = key_path(&h, k);
                if written(&p) {
                    v.push(
                        p,
                        format!("{k} is for {what} probes (this one is {kind:?})").to_lowercase(),
                    );
                }
            }
        };
        only(
            &[
                "path",
                "expect_status",
                "tls",
                "tls_verify",
                "tls_server_name",
            ],
            HealthType::Http,
            "http",
            &mut v,
        );
        only(&["send", "expect"], HealthType::Udp, "udp", &mut v);
        if kind == HealthType::Http && !up.health.tls {
            for k in ["tls_verify", "tls_server_name"] {
                let p = key_path(&h, k);
                if written(&p) {
                    v.push(p, format!("{k} needs tls: true"));
                }
            }
        }
    }
    v.issues
}

/// Shortest secret or token that draws no warning: 16 characters (128 bits of hex, or
/// ~96 of base64). A shorter one works, but `check` and start-up say so.
pub const SHORT_SECRET: usize = 16;

/// What is allowed but unwise: secrets and tokens shorter than [`SHORT_SECRET`]
/// (`mediagate check` prints them as warnings, `run` logs them).
pub fn warnings(cfg: &Config) -> Vec<Issue> {
    let mut v = Checker { issues: Vec::new() };
    let mut short = |path: String, value: &str| {
        let n = value.chars().count();
        if n > 0 && n < SHORT_SECRET {
            v.push(
                path,
                format!(
                    "only {n} characters: use at least {SHORT_SECRET} random ones (e.g. `openssl rand -hex 16`)"
                ),
            );
        }
    };
    if let Some(t) = &cfg.admin.token {
        short("admin.token".into(), t);
    }
    if let Some(t) = &cfg.admin.events_token {
        short("admin.events_token".into(), t);
    }
    if let Some(turn) = &cfg.turn {
        if let Some(s) = &turn.auth.secret {
            short("turn.auth.secret".into(), s);
        }
        for (i, s) in turn.auth.secrets.iter().enumerate() {
            short(index_path("turn.auth.secrets", i), s);
        }
        if let Some(t) = &turn.ice.token {
            short("turn.ice.token".into(), t);
        }
    }
    v.issues
}
