//! `events.webhooks`: each event POSTed as JSON to every hook, by one task per hook that
//! follows the event bus. A delivery that fails (connect, TLS, timeout, a non-2xx answer)
//! is retried `retries` times, 100ms apart doubling; a hook that falls
//! [`super::BUS_CAPACITY`] events behind loses the oldest. Nothing here can hold up the
//! data plane or a controller: publishing on the bus never waits.
//!
//! `https://` hooks use rustls (see `crate::tlsclient`): the server's certificate is
//! checked against the system's CA certificates, or those of the hook's `ca` file.
//!
//! Reload ([`Hooks::prepare`], then [`Hooks::commit`]): a hook whose settings and `ca`
//! file content did not change keeps its task (and its place in the stream); removed or
//! changed ones stop, new ones start.
//!
//! `mediagate_webhook_deliveries_total{result}`: `ok`, `failed` (after every retry),
//! `dropped` (lost while the hook was behind).

use crate::config::WebhookConfig;
pub use crate::config::events::{HookUrl, parse_url};
use bytes::Bytes;
use http_body_util::Full;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::pki_types::ServerName;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-mediagate-signature";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// `mediagate_webhook_deliveries_total{result}`.
#[derive(Clone, Debug, Default)]
pub struct WebhookMetrics {
    deliveries: Family<ResultLabels, Counter>,
}

impl WebhookMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = WebhookMetrics::default();
        for r in ["ok", "failed", "dropped"] {
            let _ = m.deliveries.get_or_create(&ResultLabels { result: r });
        }
        registry.register(
            "mediagate_webhook_deliveries",
            "Webhook deliveries by result (ok, failed after retries, dropped while behind)",
            m.deliveries.clone(),
        );
        m
    }

    fn count(&self, result: &'static str, n: u64) {
        self.deliveries
            .get_or_create(&ResultLabels { result })
            .inc_by(n);
    }
}

/// Hex HMAC-SHA256 of `body`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::sign(&key, body)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where and how one hook is reached.
#[derive(Clone)]
struct Target {
    url: HookUrl,
    /// `https://`: the client configuration and the name checked against the certificate.
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// The content of the `ca` file when it was read (a changed file is a changed hook).
    ca_pem: Option<Vec<u8>>,
}

impl Target {
    fn of(hook: &WebhookConfig) -> Result<Target, String> {
        let url = parse_url(&hook.url)?;
        let mut ca_pem = None;
        let tls = if url.tls {
            let config = match &hook.ca {
                Some(path) => {
                    let pem = crate::tlsclient::read_pem_file(std::path::Path::new(path))
                        .map_err(|e| format!("ca: {e}"))?;
                    let config = crate::tlsclient::client_config_with_ca(path, &pem)?;
                    ca_pem = Some(pem);
                    config
                }
                None => crate::tlsclient::client_config(true),
            };
            Some((config, crate::tlsclient::server_name(&url.host)?))
        } else {
            None
        };
        Ok(Target { url, tls, ca_pem })
    }
}

/// The webhooks in force, one delivery task each.
pub struct Hooks {
    metrics: WebhookMetrics,
    /// Every delivery task stops with it (the application's end).
    parent: CancellationToken,
    /// Each running hook: its settings, the `ca` file content it uses, its task's token.
    running: Mutex<Vec<Running>>,
}

type Running = (WebhookConfig, Option<Vec<u8>>, CancellationToken);

/// The hooks of a new configuration, checked (URLs, CA files), not started.
pub struct PreparedHooks(Vec<(WebhookConfig, Target)>);

impl Hooks {
    /// No hooks yet; every task it starts stops with `parent`.
    pub fn new(metrics: WebhookMetrics, parent: CancellationToken) -> Hooks {
        Hooks {
            metrics,
            parent,
            running: Mutex::new(Vec::new()),
        }
    }

    /// Checks `hooks` and reads their CA files; every error names its hook.
    pub fn prepare(&self, hooks: &[WebhookConfig]) -> anyhow::Result<PreparedHooks> {
        hooks
            .iter()
            .enumerate()
            .map(|(i, h)| {
                Target::of(h)
                    .map(|t| (h.clone(), t))
                    .map_err(|e| anyhow::anyhow!("events.webhooks[{i}]: {e}"))
            })
            .collect::<anyhow::Result<_>>()
            .map(PreparedHooks)
    }

    /// Puts the prepared hooks in force: unchanged ones keep running, the others stop,
    /// new ones start.
    pub fn commit(&self, prepared: PreparedHooks) {
        let mut running = self.running.lock().expect("hooks lock");
        let mut next = Vec::new();
        for (hook, target) in prepared.0 {
            if let Some(i) = running
                .iter()
                .position(|(h, ca, _)| *h == hook && *ca == target.ca_pem)
            {
                next.push(running.remove(i));
                continue;
            }
            let stop = self.parent.child_token();
            let ca = target.ca_pem.clone();
            spawn_hook(hook.clone(), target, self.metrics.clone(), stop.clone());
            next.push((hook, ca, stop));
        }
        for (hook, _, stop) in running.drain(..) {
            tracing::info!(url = %hook.url, "webhook removed");
            stop.cancel();
        }
        *running = next;
    }
}

/// One hook's delivery task: follows the bus until `stop`.
fn spawn_hook(
    hook: WebhookConfig,
    target: Target,
    metrics: WebhookMetrics,
    stop: CancellationToken,
) {
    let mut rx = super::subscribe();
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return,
                e = rx.recv() => e,
            };
            let body = match event {
                Ok(b) => b,
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(url = %hook.url, lost = n, "webhook behind: events dropped");
                    metrics.count("dropped", n);
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            let mut delay = Duration::from_millis(100);
            let mut attempt = 0;
            loop {
                let result = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = deliver(&hook, &target, body.as_bytes()) => r,
                };
                match result {
                    Ok(()) => {
                        metrics.count("ok", 1);
                        break;
                    }
                    Err(e) if attempt < hook.retries => {
                        tracing::debug!(url = %hook.url, error = %e, attempt, "webhook delivery failed; retrying");
                        attempt += 1;
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                    Err(e) => {
                        tracing::warn!(url = %hook.url, error = %e, "webhook delivery failed");
                        metrics.count("failed", 1);
                        break;
                    }
                }
            }
        }
    });
}

async fn deliver(hook: &WebhookConfig, target: &Target, body: &[u8]) -> Result<(), String> {
    let url = &target.url;
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(&url.authority)
            .await
            .map_err(|e| format!("connect {}: {e}", url.authority))?;
        let _ = tcp.set_nodelay(true);
        match &target.tls {
            None => post(hook, url, tcp, body).await,
            Some((config, name)) => {
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS with {}: {e}", url.authority))?;
                post(hook, url, tls, body).await
            }
        }
    };
    tokio::time::timeout(hook.timeout.get(), attempt)
        .await
        .map_err(|_| "timeout".to_string())?
}

/// One POST on an open connection.
async fn post<S>(hook: &WebhookConfig, url: &HookUrl, stream: S, body: &[u8]) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::post(url.path.as_str())
        .header(hyper::header::HOST, url.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(secret) = &hook.secret {
        req = req.header(SIGNATURE_HEADER, format!("sha256={}", sign(secret, body)));
    }
    let req = req
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("answered {}", resp.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_signatures() {
        let u = parse_url("http://127.0.0.1:9000/hook").unwrap();
        assert_eq!(
            (u.tls, u.authority.as_str(), u.path.as_str()),
            (false, "127.0.0.1:9000", "/hook")
        );
        let u = parse_url("http://hooks.local").unwrap();
        assert_eq!(
            (u.host.as_str(), u.authority.as_str(), u.path.as_str()),
            ("hooks.local", "hooks.local:80", "/")
        );
        let u = parse_url("https://hooks.local/a?b=1").unwrap();
        assert_eq!(
            (u.tls, u.authority.as_str(), u.path.as_str()),
            (true, "hooks.local:443", "/a?b=1")
        );
        let u = parse_url("https://[::1]:8443/h").unwrap();
        assert_eq!(
            (u.host.as_str(), u.authority.as_str()),
            ("[::1]", "[::1]:8443")
        );
        assert_eq!(parse_url("https://[::1]/").unwrap().authority, "[::1]:443");
        assert!(parse_url("ftp://x/").is_err());
        assert!(parse_url("http:///x").is_err());
        assert!(parse_url("http://x:port/").is_err());
        // echo -n '{}' | openssl dgst -sha256 -hmac key
        assert_eq!(
            sign("key", b"{}"),
            "a777724d943eb48dc69bca8a4a6d57a04db3f9ec7e1de4e581e860265bdf3032"
        );
    }
}
