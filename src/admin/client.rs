//! A minimal HTTP/1.1 client for the CLI (`status`, `server`, `ice`) over hyper, plain or
//! over TLS (`https://` admin URLs: the server's certificate is checked against the system's
//! CA certificates, or the file named by `SSL_CERT_FILE`).

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// Default admin API address for the CLI.
pub const DEFAULT_ADMIN: &str = "http://127.0.0.1:8086";

/// Checks an admin base URL (`http://host[:port]` or `https://host[:port]`) without
/// contacting it.
pub fn check_base(base: &str) -> Result<(), String> {
    let uri: hyper::Uri = base
        .parse()
        .map_err(|e| format!("invalid admin URL {base:?}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!(
            "admin URL must start with http:// or https:// (got {base:?})"
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("admin URL {base:?} has no host"));
    }
    Ok(())
}

/// Sends one request to the admin API; returns the status code and body.
pub async fn request(
    base: &str,
    method: &str,
    path: &str,
    body: Option<String>,
    token: Option<&str>,
) -> Result<(u16, String)> {
    request_with(base, method, path, body, token, None).await
}

/// [`request`], with the TLS client configuration given (tests: a private CA); `None` is
/// the system's CA certificates.
pub(crate) async fn request_with(
    base: &str,
    method: &str,
    path: &str,
    body: Option<String>,
    token: Option<&str>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<(u16, String)> {
    let url = format!("{}{}", base.trim_end_matches('/'), path);
    let uri: hyper::Uri = url
        .parse()
        .with_context(|| format!("invalid admin URL {url:?}"))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => bail!("admin URL must start with http:// or https:// (got {base:?})"),
    };
    let host = uri
        .host()
        .ok_or_else(|| anyhow!("admin URL {base:?} has no host"))?;
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let authority = format!("{host}:{port}");
    let fut = async {
        let bare_host = host.trim_matches(|c| c == '[' || c == ']');
        let stream = tokio::net::TcpStream::connect((bare_host, port))
            .await
            .with_context(|| format!("cannot reach the admin API at {authority}"))?;
        let mut sender = if https {
            let name = crate::tlsclient::server_name(bare_host).map_err(|e| anyhow!(e))?;
            let config = tls.unwrap_or_else(|| crate::tlsclient::client_config(true));
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .with_context(|| format!("TLS with the admin API at {authority}"))?;
            handshake(stream).await?
        } else {
            handshake(stream).await?
        };
        let mut req = Request::builder()
            .method(method)
            .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .header("host", &authority);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = sender.send_request(req).await?;
        let code = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>((code, String::from_utf8_lossy(&bytes).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| anyhow!("the admin API at {authority} did not answer within 10s"))?
}

/// The HTTP/1 handshake over `io`; the connection is driven by its own task.
async fn handshake<S>(io: S) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tlsclient::testserver;

    #[test]
    fn admin_urls_http_and_https() {
        assert!(check_base("http://127.0.0.1:8086").is_ok());
        assert!(check_base("https://mediagate-admin.media:8443").is_ok());
        assert!(check_base("ftp://127.0.0.1").is_err());
        assert!(check_base("127.0.0.1:8086").is_err());
    }

    #[tokio::test]
    async fn https_admin_endpoint() {
        let (cert, key) = testserver::self_signed();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.clone()).unwrap();
        let trusting = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        let addr = testserver::serve(
            cert,
            key,
            b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\n{\"ok\":true}\n",
        )
        .await;
        let base = format!("https://localhost:{}", addr.port());
        let (code, body) = request_with(&base, "GET", "/status", None, None, Some(trusting))
            .await
            .expect("GET over https with the certificate trusted");
        assert_eq!((code, body.as_str()), (200, "{\"ok\":true}\n"));

        // The system's CAs do not know the self-signed certificate: a clear TLS error.
        let err = request(&base, "GET", "/status", None, None)
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("TLS"), "{err:#}");
    }
}
