//! `events.webhooks`: each event POSTed as JSON to every hook, by one task per hook that
//! follows the event bus. A delivery that fails (connect, timeout, a non-2xx answer) is
//! retried `retries` times, 100ms apart doubling; a hook that falls [`super::BUS_CAPACITY`]
//! events behind loses the oldest. Nothing here can hold up the data plane or a
//! controller: publishing on the bus never waits.
//!
//! `mediagate_webhook_deliveries_total{result}`: `ok`, `failed` (after every retry),
//! `dropped` (lost while the hook was behind).

use crate::config::WebhookConfig;
use bytes::Bytes;
use http_body_util::Full;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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

/// `http://host:port/path` → (authority, path).
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    let authority = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
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

/// Starts one delivery task per hook; they stop with `stop`.
pub fn start(hooks: &[WebhookConfig], metrics: WebhookMetrics, stop: CancellationToken) {
    for hook in hooks {
        let Ok((authority, path)) = parse_url(&hook.url) else {
            continue;
        };
        let hook = hook.clone();
        let metrics = metrics.clone();
        let stop = stop.clone();
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
                    match deliver(&hook, &authority, &path, body.as_bytes()).await {
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
}

async fn deliver(
    hook: &WebhookConfig,
    authority: &str,
    path: &str,
    body: &[u8],
) -> Result<(), String> {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| format!("connect {authority}: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = hyper::Request::post(path)
            .header(hyper::header::HOST, authority)
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
    };
    tokio::time::timeout(hook.timeout.get(), attempt)
        .await
        .map_err(|_| "timeout".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_signatures() {
        assert_eq!(
            parse_url("http://127.0.0.1:9000/hook").unwrap(),
            ("127.0.0.1:9000".into(), "/hook".into())
        );
        assert_eq!(
            parse_url("http://hooks.local").unwrap(),
            ("hooks.local:80".into(), "/".into())
        );
        assert!(parse_url("https://x/").is_err());
        // echo -n '{}' | openssl dgst -sha256 -hmac key
        assert_eq!(
            sign("key", b"{}"),
            "a777724d943eb48dc69bca8a4a6d57a04db3f9ec7e1de4e581e860265bdf3032"
        );
    }
}
