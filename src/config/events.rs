//! `events:` — where failover, failback, admin and server up/down events go besides
//! `GET /events` (see `crate::events`).

use super::types::Dur;
use serde::Deserialize;
use std::time::Duration;

/// `events:` settings. Default: no webhooks.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Each event is POSTed as JSON to every listed hook.
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
}

/// One webhook.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://host[:port]/path` or `https://host[:port]/path`. Required.
    pub url: String,
    /// `https://` hooks: a PEM file of the CA certificates that may sign the receiver's
    /// certificate, or of its own self-signed certificate (trusted instead of the
    /// system's). Default: the system's CA certificates.
    #[serde(default)]
    pub ca: Option<String>,
    /// When set, `X-Mediagate-Signature: sha256=<hex HMAC-SHA256 of the body>`. Default none.
    #[serde(default)]
    pub secret: Option<String>,
    /// Per attempt (connect, send, answer). Default 2s.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// Attempts after the first failed one, 100ms apart doubling each time. Default 3.
    #[serde(default = "default_retries")]
    pub retries: u32,
}

fn default_timeout() -> Dur {
    Dur(Duration::from_secs(2))
}
fn default_retries() -> u32 {
    3
}
