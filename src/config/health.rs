//! `health:` — an upstream's active probe: its kind, timing and what counts as healthy.

use super::values::{Dur, default_true};
use serde::Deserialize;
use std::time::Duration;

/// Kind of active health probe.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum HealthType {
    /// TCP connect.
    #[default]
    Tcp,
    /// Send `send`, expect a reply containing `expect`.
    Udp,
    /// RFC 5389 Binding request.
    Stun,
    /// GET `path`, expect `expect_status`.
    Http,
    /// Passive signals and discovery readiness only.
    None,
}

impl HealthType {
    /// The name as written in the file.
    pub fn as_str(&self) -> &'static str {
        match self {
            HealthType::Tcp => "tcp",
            HealthType::Udp => "udp",
            HealthType::Stun => "stun",
            HealthType::Http => "http",
            HealthType::None => "none",
        }
    }
}

/// `upstreams.NAME.health:`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Default `tcp`.
    #[serde(rename = "type", default)]
    pub kind: HealthType,
    /// Default 1s.
    #[serde(default = "default_interval")]
    pub interval: Dur,
    /// Default 500ms; must not exceed `interval`.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// Confirmed failures in a row that mark a server down. Default 1 (zero tolerance).
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// More probes that must all fail before an ambiguous failure (a timeout, a wrong or
    /// missing reply, an HTTP status) counts; 0 counts every failure at once. Default 4.
    #[serde(default = "default_confirm")]
    pub confirm: u32,
    /// Pause before each confirmation probe. Default 10ms.
    #[serde(default = "default_confirm_interval")]
    pub confirm_interval: Dur,
    /// Learn each server's probe round-trip time and let a probe take a few of them
    /// (within 25ms and `timeout`) instead of `timeout`. Default true.
    #[serde(default = "default_true")]
    pub adaptive_timeout: bool,
    /// Good probes in a row that bring a server back. Default 2.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Probe this port of the server's host instead of the traffic port. Default none.
    #[serde(default)]
    pub port: Option<u16>,
    /// http: request path. Default `/`.
    #[serde(default = "default_path")]
    pub path: String,
    /// http: expected status. Default 200.
    #[serde(default = "default_expect_status")]
    pub expect_status: u16,
    /// udp: payload to send. Default `ping`.
    #[serde(default = "default_send")]
    pub send: String,
    /// http: speak HTTPS (TLS) to the probe port. Default false.
    #[serde(default)]
    pub tls: bool,
    /// http with `tls`: check the server's certificate against the system's CA
    /// certificates and the server name. `false` accepts any certificate (self-signed
    /// Janus admin certificates). Default true.
    #[serde(default = "default_true")]
    pub tls_verify: bool,
    /// http with `tls`: the name sent as SNI and checked against the certificate. Default:
    /// the server's IP address.
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// udp: the reply must contain this; default: any reply.
    #[serde(default)]
    pub expect: Option<String>,
}

fn default_interval() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_timeout() -> Dur {
    Dur(Duration::from_millis(500))
}
fn default_fall() -> u32 {
    1
}
fn default_confirm() -> u32 {
    4
}
fn default_confirm_interval() -> Dur {
    Dur(Duration::from_millis(10))
}
fn default_rise() -> u32 {
    2
}
fn default_path() -> String {
    "/".to_string()
}
fn default_expect_status() -> u16 {
    200
}
fn default_send() -> String {
    "ping".to_string()
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            kind: HealthType::default(),
            interval: default_interval(),
            timeout: default_timeout(),
            fall: default_fall(),
            confirm: default_confirm(),
            confirm_interval: default_confirm_interval(),
            adaptive_timeout: true,
            rise: default_rise(),
            port: None,
            path: default_path(),
            expect_status: default_expect_status(),
            tls: false,
            tls_verify: true,
            tls_server_name: None,
            send: default_send(),
            expect: None,
        }
    }
}
