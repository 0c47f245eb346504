//! A minimal HTTP/1.1 client for the CLI (`status`, `server`, `ice`) over hyper.

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// Default admin API address for the CLI.
pub const DEFAULT_ADMIN: &str = "http://127.0.0.1:8086";

/// Checks an admin base URL (`http://host[:port]`) without contacting it.
pub fn check_base(base: &str) -> Result<(), String> {
    let uri: hyper::Uri = base
        .parse()
        .map_err(|e| format!("invalid admin URL {base:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("admin URL must start with http:// (got {base:?})"));
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
    let url = format!("{}{}", base.trim_end_matches('/'), path);
    let uri: hyper::Uri = url
        .parse()
        .with_context(|| format!("invalid admin URL {url:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("admin URL must start with http:// (got {base:?})");
    }
    let host = uri
        .host()
        .ok_or_else(|| anyhow!("admin URL {base:?} has no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let authority = format!("{host}:{port}");
    let fut = async {
        let stream =
            tokio::net::TcpStream::connect((host.trim_matches(|c| c == '[' || c == ']'), port))
                .await
                .with_context(|| format!("cannot reach the admin API at {authority}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
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
