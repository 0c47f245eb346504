//! `events:` — where failover, failback, admin and server up/down events go besides
//! `GET /events` (see `crate::events`).

use super::values::Dur;
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

/// A hook's URL, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookUrl {
    /// `https://`.
    pub tls: bool,
    /// The host as written (a name, an IPv4 address or a bracketed IPv6 address).
    pub host: String,
    /// `host:port`, to connect to and for the `Host` header.
    pub authority: String,
    /// The path and query, `/` at least.
    pub path: String,
}

/// `http://host[:port]/path` or `https://host[:port]/path` (ports 80 and 443 by default).
pub fn parse_url(url: &str) -> Result<HookUrl, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else {
        return Err(format!(
            "{url:?}: only http:// and https:// URLs are supported"
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    let (host, authority) = if has_port {
        let i = authority.rfind(':').expect("checked");
        if authority[i + 1..].parse::<u16>().is_err() {
            return Err(format!("{url:?}: bad port"));
        }
        (authority[..i].to_string(), authority.to_string())
    } else {
        let port = if tls { 443 } else { 80 };
        (authority.to_string(), format!("{authority}:{port}"))
    };
    Ok(HookUrl {
        tls,
        host,
        authority,
        path: path.to_string(),
    })
}
