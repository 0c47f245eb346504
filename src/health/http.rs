//! HTTP probe (`type: http`): one HTTP/1.1 `GET path` on a fresh connection
//! (`Connection: close`), healthy when the status equals `expect_status`. With
//! `health.tls` the connection is HTTPS (see [`crate::tlsclient`]); a failed handshake or
//! certificate check fails the probe.
//!
//! Uses hyper's low-level HTTP/1 client so that parsing is hyper's, not ours. The
//! connection driver is polled inside the check's own future instead of being spawned:
//! when the caller's timeout drops the check, the connection goes with it, and a hung
//! target cannot leak a task. Only the status line and headers are awaited; the body is
//! never read.

use super::tcp::connect_error;
use super::{CheckFuture, HealthCheck, ProbeError, Reason};
use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper::header::{CONNECTION, HOST, USER_AGENT};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// HTTPS settings of the probe (`health.tls*`).
#[derive(Debug, Clone)]
pub struct Tls {
    /// Check the certificate (system CAs, server name).
    pub verify: bool,
    /// Name for SNI and the certificate check; default the target's IP.
    pub server_name: Option<String>,
}

/// `GET path`, healthy on `expect_status`.
pub struct HttpCheck {
    /// The request target, parsed once; an unusable path fails every check with the
    /// reason, rather than panicking or silently probing something else.
    uri: Result<Uri, String>,
    expect_status: u16,
    tls: Option<Tls>,
}

impl HttpCheck {
    pub fn new(path: String, expect_status: u16) -> Self {
        HttpCheck {
            uri: parse_path(&path),
            expect_status,
            tls: None,
        }
    }

    /// Speak HTTPS when `tls` is set.
    pub fn with_tls(mut self, tls: Option<Tls>) -> Self {
        self.tls = tls;
        self
    }
}

/// Accepts only an origin-form target (`/path?query`): anything else would make hyper
/// send an absolute or authority form request that the target may route differently.
fn parse_path(path: &str) -> Result<Uri, String> {
    let invalid = || format!("invalid http probe path {path:?}");
    if !path.starts_with('/') {
        return Err(invalid());
    }
    let uri: Uri = path.parse().map_err(|_| invalid())?;
    if uri.scheme().is_some() || uri.authority().is_some() {
        return Err(invalid());
    }
    Ok(uri)
}

fn failed(detail: String) -> ProbeError {
    ProbeError::new(Reason::ProbeFailed, detail)
}

impl HealthCheck for HttpCheck {
    fn check(&self, target: SocketAddr) -> CheckFuture<'_> {
        Box::pin(async move {
            let uri = self.uri.clone().map_err(failed)?;
            let stream = TcpStream::connect(target).await.map_err(connect_error)?;
            // The request is one small write; don't let Nagle hold it back.
            let _ = stream.set_nodelay(true);
            let Some(tls) = &self.tls else {
                // SocketAddr's Display brackets IPv6 literals, as Host requires.
                return self.get(stream, uri, target.to_string()).await;
            };
            let (name, host) = match &tls.server_name {
                Some(n) => (
                    crate::tlsclient::server_name(n).map_err(failed)?,
                    format!("{n}:{}", target.port()),
                ),
                None => (target.ip().into(), target.to_string()),
            };
            let stream = crate::tlsclient::connect(stream, name, tls.verify)
                .await
                .map_err(|e| failed(format!("tls: {}", error_chain(&e))))?;
            self.get(stream, uri, host).await
        })
    }
}

impl HttpCheck {
    /// `GET uri` over `io` (plain TCP or TLS), checked against `expect_status`.
    async fn get<S>(&self, io: S, uri: Uri, host: String) -> Result<(), ProbeError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| failed(format!("http handshake: {e}")))?;
        let request = Request::get(uri)
            .header(HOST, host)
            .header(CONNECTION, "close")
            .header(USER_AGENT, "mediagate-health-check")
            .body(Empty::<Bytes>::new())
            .map_err(|e| failed(format!("http request: {e}")))?;

        let send = sender.send_request(request);
        tokio::pin!(send, conn);
        let response = tokio::select! {
            res = &mut send => res,
            conn_res = &mut conn => {
                // The connection finished first (closed, or hit a parse error). A
                // response it parsed before that is already queued for `send`, so ask
                // it; if there is none, the connection's own error is the better story.
                match (send.await, conn_res) {
                    (Ok(resp), _) => Ok(resp),
                    (Err(_), Err(conn_err)) => Err(conn_err),
                    (Err(send_err), Ok(())) => Err(send_err),
                }
            }
        }
        .map_err(|e| failed(format!("http: {}", error_chain(&e))))?;

        let status = response.status().as_u16();
        if status == self.expect_status {
            Ok(())
        } else {
            Err(failed(format!(
                "status {status}, expected {}",
                self.expect_status
            )))
        }
    }
}

/// hyper's top-level messages are terse ("error trying to parse…"); the sources say why.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;
    use tokio::time::timeout;

    /// A one-shot HTTP server: reads one request head, writes `response` verbatim, closes.
    /// The receiver yields the request head it saw.
    async fn serve_once(response: &'static [u8]) -> (SocketAddr, oneshot::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
            let _ = stream.write_all(response).await;
            let _ = stream.shutdown().await;
        });
        (addr, rx)
    }

    async fn probe(check: &HttpCheck, target: SocketAddr) -> Result<(), ProbeError> {
        timeout(Duration::from_secs(2), check.check(target))
            .await
            .expect("probe should have finished well before 2 s")
    }

    #[tokio::test]
    async fn http_expected_status_is_ok_and_request_is_well_formed() {
        let (target, head) =
            serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await;
        let check = HttpCheck::new("/healthz?full=1".into(), 200);
        assert_eq!(probe(&check, target).await, Ok(()));
        let head = head.await.unwrap().to_ascii_lowercase();
        assert!(
            head.starts_with("get /healthz?full=1 http/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!("\r\nhost: {target}\r\n")), "{head}");
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    }

    #[tokio::test]
    async fn http_other_status_is_probe_failed() {
        let (target, _) =
            serve_once(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").await;
        let err = probe(&HttpCheck::new("/".into(), 200), target)
            .await
            .unwrap_err();
        assert_eq!(err.reason, Reason::ProbeFailed);
        assert_eq!(err.detail, "status 503, expected 200");
    }

    #[tokio::test]
    async fn http_non_200_expectation_is_honoured() {
        let (target, _) = serve_once(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        assert_eq!(
            probe(&HttpCheck::new("/".into(), 204), target).await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn http_garbage_response_is_probe_failed() {
        let (target, _) = serve_once(b"\x16\x03\x01 this is not http\r\n\r\n").await;
        let err = probe(&HttpCheck::new("/".into(), 200), target)
            .await
            .unwrap_err();
        assert_eq!(err.reason, Reason::ProbeFailed, "{err}");
        assert!(err.detail.starts_with("http: "), "{err}");
    }

    #[tokio::test]
    async fn http_close_without_response_is_probe_failed() {
        let (target, _) = serve_once(b"").await;
        let err = probe(&HttpCheck::new("/".into(), 200), target)
            .await
            .unwrap_err();
        assert_eq!(err.reason, Reason::ProbeFailed, "{err}");
    }

    #[tokio::test]
    async fn http_closed_port_is_connect_refused_quickly() {
        let target = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let started = Instant::now();
        let err = probe(&HttpCheck::new("/".into(), 200), target)
            .await
            .unwrap_err();
        assert_eq!(err.reason, Reason::ConnectRefused, "{err}");
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[tokio::test]
    async fn http_invalid_path_fails_every_check() {
        let (target, _) = serve_once(b"HTTP/1.1 200 OK\r\n\r\n").await;
        for path in ["healthz", "http://elsewhere/", "/a b", ""] {
            let err = probe(&HttpCheck::new(path.into(), 200), target)
                .await
                .unwrap_err();
            assert_eq!(err.reason, Reason::ProbeFailed);
            assert!(err.detail.starts_with("invalid http probe path"), "{err}");
        }
    }

    #[tokio::test]
    async fn https_probe_checks_a_tls_endpoint() {
        use crate::tlsclient::testserver;
        let (cert, key) = testserver::self_signed();
        let addr =
            testserver::serve(cert, key, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let check = |tls: Option<Tls>, expect: u16| {
            HttpCheck::new("/janus/info".into(), expect).with_tls(tls)
        };
        let run = |c: HttpCheck| async move {
            timeout(Duration::from_secs(5), c.check(addr))
                .await
                .expect("the probe finishes")
        };

        // tls_verify: false accepts the self-signed certificate and reads the status.
        let insecure = || {
            Some(Tls {
                verify: false,
                server_name: None,
            })
        };
        run(check(insecure(), 200))
            .await
            .expect("https probe with tls_verify: false");
        let e = run(check(insecure(), 204)).await.unwrap_err();
        assert!(e.detail.contains("status 200"), "{}", e.detail);
        let named = Some(Tls {
            verify: false,
            server_name: Some("localhost".into()),
        });
        run(check(named, 200)).await.expect("with tls_server_name");

        // Verification against the system's CAs refuses a self-signed certificate.
        let e = run(check(
            Some(Tls {
                verify: true,
                server_name: None,
            }),
            200,
        ))
        .await
        .unwrap_err();
        assert!(e.detail.starts_with("tls:"), "{}", e.detail);

        // Plain HTTP to a TLS port is not healthy either.
        assert!(run(check(None, 200)).await.is_err());
    }
}
