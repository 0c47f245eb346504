//! A real browser call relayed over `turns:`: headless Chromium (Debian `chromium`,
//! installed by scripts/install-test-deps.sh) opens a page with two RTCPeerConnections
//! whose only ICE server is mediagate's TLS TURN listener, with
//! `iceTransportPolicy: 'relay'`; a data channel message crosses, the page reports the
//! message and the selected candidate pair (relay, over `tls`) back to the test's small
//! HTTP server, and mediagate's metrics show the allocations and relayed bytes, with no
//! listener but the TLS one.
//!
//! Then the same call over IPv6: a UDP listener on `::1` only; Chromium names no address
//! family in its Allocate, so its relay is IPv4 by default and IPv6 with
//! `turn.relay.default_family: keep` (the relayed address checked in the selected pair).
//!
//! The page reports back with `fetch` instead of being driven over the DevTools protocol:
//! nothing to install beside the browser, and no websocket client in the test.
//! The self-signed certificate is trusted through `--ignore-certificate-errors`, which
//! Chromium's TURN client honours.

mod turn_support;

use mediagate::config::TurnTransport;
use mediagate::turn::{PeerPolicy, TurnMetrics, TurnService};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::mpsc;
use turn_support::*;

const PAGE: &str = r#"<!doctype html><meta charset="utf-8"><title>turns call</title>
<script>
(async () => {
  const q = new URLSearchParams(location.search);
  const report = (o) => fetch('/result', {method: 'POST', body: JSON.stringify(o)});
  try {
    const cfg = {
      iceServers: [{urls: [q.get('url')], username: q.get('u'), credential: q.get('p')}],
      iceTransportPolicy: 'relay',
    };
    const a = new RTCPeerConnection(cfg), b = new RTCPeerConnection(cfg);
    a.onicecandidate = (e) => e.candidate && b.addIceCandidate(e.candidate);
    b.onicecandidate = (e) => e.candidate && a.addIceCandidate(e.candidate);
    const got = new Promise((res) => {
      b.ondatachannel = (e) => { e.channel.onmessage = (m) => res(m.data); };
    });
    const ch = a.createDataChannel('t');
    ch.onopen = () => ch.send('hello over turns');
    const offer = await a.createOffer();
    await a.setLocalDescription(offer);
    await b.setRemoteDescription(offer);
    const answer = await b.createAnswer();
    await b.setLocalDescription(answer);
    await a.setRemoteDescription(answer);
    const data = await Promise.race([got, new Promise((_, rej) =>
      setTimeout(() => rej(new Error('no data channel message in 20 s')), 20000))]);
    // The selected pair shows in the stats a little after the first message: ask again
    // for up to 5 s (the transport's selected pair, else a nominated succeeded one).
    let local = null;
    for (let i = 0; i < 50 && !local; i++) {
      const stats = await a.getStats();
      stats.forEach((s) => {
        if (s.type === 'transport' && s.selectedCandidatePairId) {
          const pair = stats.get(s.selectedCandidatePairId);
          if (pair) local = stats.get(pair.localCandidateId) || local;
        }
      });
      stats.forEach((s) => {
        if (!local && s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') {
          local = stats.get(s.localCandidateId);
        }
      });
      if (!local) await new Promise((r) => setTimeout(r, 100));
    }
    report({ok: true, data,
            candidateType: local && local.candidateType,
            relayProtocol: local && local.relayProtocol,
            address: local && local.address});
  } catch (e) {
    report({ok: false, error: String(e)});
  }
})();
</script>"#;

/// Serves PAGE at `/` and sends the body of every `POST /result` on `results`.
async fn serve(listener: TcpListener, results: mpsc::Sender<String>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let results = results.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Headers, then as much body as Content-Length says.
            let (head_end, len) = loop {
                let Ok(n) = s.read(&mut chunk).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    break (i + 4, len);
                }
                if buf.len() > 65536 {
                    return;
                }
            };
            while buf.len() < head_end + len {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let (status, ctype, body) = if buf.starts_with(b"POST /result") {
                let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string();
                let _ = results.send(body).await;
                ("204 No Content", "text/plain", String::new())
            } else if buf.starts_with(b"GET / ") || buf.starts_with(b"GET /?") {
                ("200 OK", "text/html", PAGE.to_string())
            } else {
                ("404 Not Found", "text/plain", String::new())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}

/// A running page: its parsed report and text, the browser (still running: its
/// allocations stay) and the page server.
struct Call {
    v: serde_json::Value,
    report: String,
    child: tokio::process::Child,
    server: tokio::task::JoinHandle<()>,
}

impl Call {
    /// The page's call went through a relay over `protocol` and carried its message.
    /// A call that did not connect shows the gateway's TURN metrics beside the page's
    /// report (how many allocations were made, what was dropped).
    fn assert_relayed(&self, protocol: &str, metrics: &TurnMetrics) {
        let (v, report) = (&self.v, &self.report);
        assert_eq!(v["ok"], true, "page: {report}\nTURN metrics: {metrics:?}");
        assert_eq!(v["data"], "hello over turns", "page: {report}");
        assert_eq!(v["candidateType"], "relay", "page: {report}");
        assert_eq!(v["relayProtocol"], protocol, "page: {report}");
    }

    async fn end(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        self.server.abort();
    }
}

/// Starts the TURN service of `cfg`, which must have one listener: the service, its
/// metrics and that listener's transport and address.
async fn start(
    cfg: &mediagate::config::TurnConfig,
) -> (
    TurnService,
    TurnMetrics,
    TurnTransport,
    std::net::SocketAddr,
) {
    let policy =
        Arc::new(PeerPolicy::new(&cfg.relay, "127.0.0.1:8086".parse().unwrap(), &[]).unwrap());
    let metrics = TurnMetrics::unregistered();
    let svc = TurnService::start(cfg, policy, metrics.clone())
        .await
        .expect("TURN service starts");
    let addrs = svc.local_addrs();
    assert_eq!(addrs.len(), 1, "{addrs:?}");
    let (transport, addr) = addrs[0];
    (svc, metrics, transport, addr)
}

/// Opens the page in headless Chromium with `turn_url` (percent-encoded) as its only ICE
/// server and waits (40 s at most) for its report.
async fn call(browser: &str, dir: &std::path::Path, turn_url: &str) -> Call {
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    let (tx, mut results) = mpsc::channel(4);
    let server = tokio::spawn(serve(http, tx));
    let url = format!("http://{http_addr}/?url={turn_url}&u={USER}&p={PASSWORD}");
    let profile = dir.join("profile");
    let mut child = Command::new(browser)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            "--ignore-certificate-errors",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(&url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("chromium starts");
    let got = tokio::time::timeout(Duration::from_secs(40), results.recv()).await;
    let report = match got {
        Ok(Some(r)) => r,
        _ => {
            let _ = child.start_kill();
            let out = child.wait_with_output().await.unwrap();
            panic!(
                "no report from the page in 40 s; chromium stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    let v = serde_json::from_str(&report).expect("JSON report");
    Call {
        v,
        report,
        child,
        server,
    }
}

fn chromium() -> Option<String> {
    ["chromium", "chromium-browser"].iter().find_map(|b| {
        std::process::Command::new(b)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|_| b.to_string())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_calls_through_the_tls_listener_only() {
    let Some(browser) = chromium() else {
        // install-test-deps.sh installs it; a machine without it cannot run this test.
        eprintln!("SKIP: chromium is not installed (scripts/install-test-deps.sh installs it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _ca) = cert_chain(dir.path(), "server", "turn.test");
    // Only the TLS listener; relays may reach each other (`self`): both peers are relayed.
    let mut cfg = config(Auth::Static, &["self"], 10);
    cfg.listeners.clear();
    add_tls(&mut cfg, &cert, &key, false);
    let (svc, metrics, transport, tls) = start(&cfg).await;
    assert_eq!(transport, TurnTransport::Tls);

    // url = turns:127.0.0.1:PORT?transport=tcp, percent-encoded.
    let page = call(
        &browser,
        dir.path(),
        &format!("turns%3A127.0.0.1%3A{}%3Ftransport%3Dtcp", tls.port()),
    )
    .await;
    page.assert_relayed("tls", &metrics);

    // mediagate saw it: two allocations (one per peer connection) over its only listener,
    // the TLS one, with relayed data, while the browser still holds its TLS connections.
    assert!(metrics.allocations_created.get() >= 2, "allocations");
    assert!(metrics.tcp_connections.get() >= 2, "TLS connections");
    assert!(metrics.bytes_to_client.get() > 0, "relayed bytes");
    assert_eq!(metrics.tcp_closed_count("tls_handshake"), 0);

    page.end().await;
    svc.close().await;
}

/// A call from Chromium to a UDP TURN listener on `::1` only, relays (reaching each other,
/// `self`) on `relays` with `default_family`: the page's report.
async fn ipv6_call(
    browser: &str,
    relays: &[&str],
    default_family: mediagate::config::DefaultFamily,
) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(Auth::Static, &["self"], 10);
    cfg.listeners.truncate(1);
    cfg.listeners[0].listen = "[::1]:0".parse().unwrap();
    cfg.public_address = "::1".into();
    let ips: Vec<std::net::IpAddr> = relays.iter().map(|r| r.parse().unwrap()).collect();
    cfg.relay.address = mediagate::config::RelayAddresses::from_list(&ips).unwrap();
    cfg.relay.default_family = default_family;
    let (svc, metrics, _, addr) = start(&cfg).await;
    assert!(addr.is_ipv6(), "{addr}");
    // url = turn:[::1]:PORT?transport=udp, percent-encoded.
    let page = call(
        browser,
        dir.path(),
        &format!("turn%3A%5B%3A%3A1%5D%3A{}%3Ftransport%3Dudp", addr.port()),
    )
    .await;
    page.assert_relayed("udp", &metrics);
    // Both peer connections allocated over IPv6 and data was relayed.
    assert!(metrics.allocations_created.get() >= 2, "allocations");
    assert!(metrics.bytes_to_client.get() > 0, "relayed bytes");
    let v = page.v.clone();
    page.end().await;
    svc.close().await;
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_calls_over_ipv6() {
    let Some(browser) = chromium() else {
        eprintln!("SKIP: chromium is not installed (scripts/install-test-deps.sh installs it)");
        return;
    };
    use mediagate::config::DefaultFamily;
    // Chromium names no family in its Allocate: by default (RFC 8656) its relay is IPv4,
    // although it reached the gateway over IPv6.
    let v = ipv6_call(&browser, &["127.0.0.1", "::1"], DefaultFamily::Ipv4).await;
    assert_eq!(v["address"], "127.0.0.1", "{v}");
    // With `default_family: keep` the relay is of the family the client came over: an
    // IPv6-only gateway serves it.
    let v = ipv6_call(&browser, &["::1"], DefaultFamily::Keep).await;
    assert_eq!(v["address"], "::1", "{v}");
}
