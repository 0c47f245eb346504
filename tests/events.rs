//! `GET /events` (Server-Sent Events) and `events.webhooks` see a failover within 100 ms
//! of it, the webhook signed with its secret; an `https://` hook added by a reload is
//! verified against its `ca` file, and a bad hook in a reload changes nothing.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, mpsc};
use std::time::{Duration, SystemTime};

type Deliveries = mpsc::Receiver<(SystemTime, String, Option<String>)>;

/// A webhook receiver: every POST body with its signature header and arrival time.
fn hook_receiver() -> (u16, Deliveries) {
    hook_receiver_with(None)
}

/// [`hook_receiver`] over TLS when `tls` is given.
fn hook_receiver_with(tls: Option<Arc<rustls::ServerConfig>>) -> (u16, Deliveries) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(50) {
            let Ok(conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let delivery = match &tls {
                None => read_post(conn),
                Some(config) => match rustls::ServerConnection::new(config.clone()) {
                    Ok(c) => read_post(rustls::StreamOwned::new(c, conn)),
                    Err(_) => None,
                },
            };
            if let Some(d) = delivery {
                let _ = tx.send(d);
            }
        }
    });
    (port, rx)
}

/// Reads one POST and answers 200: (arrival, body, signature header).
fn read_post<S: Read + Write>(stream: S) -> Option<(SystemTime, String, Option<String>)> {
    let mut reader = BufReader::new(stream);
    let mut len = 0usize;
    let mut sig = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if let Some(v) = l.strip_prefix("x-mediagate-signature:") {
            sig = Some(v.trim().to_string());
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    let at = SystemTime::now();
    let conn = reader.get_mut();
    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    let _ = conn.flush();
    Some((at, String::from_utf8_lossy(&body).into_owned(), sig))
}

/// Follows GET /events: every `data:` line with its arrival time.
fn sse(admin: std::net::SocketAddr) -> mpsc::Receiver<(SystemTime, String)> {
    let mut s = TcpStream::connect(admin).unwrap();
    s.write_all(b"GET /events HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let reader = BufReader::new(s);
        for line in reader.lines() {
            let Ok(line) = line else { return };
            if let Some(json) = line.strip_prefix("data:") {
                let _ = tx.send((SystemTime::now(), json.trim().to_string()));
            }
        }
    });
    rx
}

fn failover_from(rx: &mpsc::Receiver<(SystemTime, String)>) -> (SystemTime, serde_json::Value) {
    loop {
        let (at, json) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a failover event");
        let v: serde_json::Value = serde_json::from_str(&json).expect("event JSON");
        if v["kind"] == "failover" {
            return (at, v);
        }
    }
}

fn lag(received: SystemTime, event: &serde_json::Value) -> Duration {
    let at = humantime::parse_rfc3339(event["at"].as_str().unwrap()).unwrap();
    received.duration_since(at).unwrap_or_default()
}

/// One UDP listener in front of a primary/backup pair probed every 100 ms.
fn base_config(w: &UdpPair) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - {{ name: rtp, protocol: udp, listen: "127.0.0.1:{listen}", upstream: media }}
upstreams:
  media:
    primary: ["{primary}"]
    backup: ["{backup}"]
    health: {{ type: udp, send: ping, interval: 100ms, timeout: 100ms }}
"#,
        admin = w.admin,
        listen = w.listen,
        primary = w.primary_addr,
        backup = w.backup_addr,
    )
}
#[test]
fn sse_and_webhook_see_a_failover_within_100ms() {
    let mut w = UdpPair::start();
    let (hook_port, hook_rx) = hook_receiver();
    let secret = "hook-secret";
    let yaml = format!(
        r#"{base}events:
  webhooks:
    - {{ url: "http://127.0.0.1:{hook_port}/hook", secret: {secret}, timeout: 1s, retries: 2 }}
"#,
        base = base_config(&w),
    );
    let b = Balancer::start(&yaml, w.admin);
    let events = sse(b.admin);
    std::thread::sleep(Duration::from_millis(200)); // the SSE subscription is in place

    w.primary.kill();
    let (got, ev) = failover_from(&events);
    assert_eq!(ev["upstream"], "media");
    assert_eq!(ev["from"][0], w.primary_addr.to_string());
    assert_eq!(ev["to"][0], w.backup_addr.to_string());
    let sse_lag = lag(got, &ev);

    let (hook_at, hook_ev, sig) = loop {
        let (at, body, sig) = hook_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a webhook delivery");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["kind"] == "failover" {
            // The signature covers the exact body; computed by openssl, not by our code.
            let want = openssl_hmac_sha256(secret, body.as_bytes());
            assert_eq!(sig.as_deref(), Some(format!("sha256={want}").as_str()));
            break (at, v, sig);
        }
    };
    assert!(sig.is_some());
    assert_eq!(hook_ev, ev, "the webhook gets the same event as the stream");
    let hook_lag = lag(hook_at, &hook_ev);
    eprintln!("failover seen by SSE after {sse_lag:?}, by the webhook after {hook_lag:?}");
    assert!(sse_lag <= Duration::from_millis(100), "{sse_lag:?}");
    assert!(hook_lag <= Duration::from_millis(100), "{hook_lag:?}");
    // The status event has the same content.
    let st = b.status();
    let last = upstream_of(&st, "media")["events"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["at"], ev["at"]);
    assert!(
        b.metrics()
            .contains("mediagate_webhook_deliveries_total{result=\"ok\"}")
    );
}

#[test]
fn mediagate_events_prints_an_admin_change() {
    let w = UdpPair::start();
    let yaml = base_config(&w);
    let b = Balancer::start(&yaml, w.admin);
    let mut child = std::process::Command::new(MEDIAGATE)
        .args(["events", "--admin", &format!("http://{}", b.admin)])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Until the CLI is subscribed, a change may go unseen: repeat drain/enable.
    let path = format!("/upstreams/media/servers/{}/state", w.primary_addr);
    let mut seen = None;
    for i in 0..20 {
        let state = if i % 2 == 0 { "drain" } else { "enable" };
        let (code, body) = http(
            b.admin,
            "POST",
            &path,
            Some(&format!("{{\"state\":\"{state}\"}}")),
        )
        .unwrap();
        assert_eq!(code, 200, "{body}");
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
            seen = Some(line);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let line = seen.expect("mediagate events printed nothing");
    let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
    assert_eq!(v["kind"], "admin");
    assert_eq!(v["upstream"], "media");
    assert_eq!(v["server"], w.primary_addr.to_string());
}

/// Hex HMAC-SHA256 of `body` with `key`, by the `openssl` command.
fn openssl_hmac_sha256(key: &str, body: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", key, "-r"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body)
        .expect("write body");
    let out = child.wait_with_output().expect("openssl output");
    assert!(out.status.success(), "openssl dgst failed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A CA and a certificate it signed for 127.0.0.1, made by the `openssl` command: the
/// receiver's TLS configuration and the CA file's path.
fn test_pki(dir: &std::path::Path) -> (Arc<rustls::ServerConfig>, std::path::PathBuf) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl command");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=mediagate test CA",
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    ]
    .concat());
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "other-ca.key",
            "-out",
            "other-ca.pem",
            "-subj",
            "/CN=another CA",
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
    ]);
    run(&[
        "pkcs8", "-topk8", "-nocrypt", "-in", "leaf.key", "-out", "leaf.pk8",
    ]);
    let certs = CertificateDer::pem_file_iter(dir.join("leaf.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("leaf.pk8")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    (Arc::new(config), dir.join("ca.pem"))
}

fn deliveries(b: &Balancer, result: &str) -> f64 {
    let needle = format!("mediagate_webhook_deliveries_total{{result=\"{result}\"}} ");
    b.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(needle.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The next admin event among the deliveries, with its lag behind the event's time.
fn next_admin(rx: &Deliveries, state: &str) -> (serde_json::Value, Duration, Option<String>) {
    loop {
        let (at, body, sig) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("a webhook delivery");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["kind"] == "admin" && v["state"] == state {
            let lag = lag(at, &v);
            return (v, lag, sig);
        }
    }
}

#[test]
fn https_webhook_added_by_a_reload_is_verified_with_its_ca() {
    let w = UdpPair::start();
    let pki_dir = tempfile::tempdir().unwrap();
    let (tls, ca) = test_pki(pki_dir.path());
    let (port, rx) = hook_receiver_with(Some(tls));
    let base = base_config(&w);
    let b = Balancer::start(&base, w.admin);
    let reload = |yaml: &str| {
        std::fs::write(&b.config, yaml).unwrap();
        http(b.admin, "POST", "/reload", None).expect("POST /reload")
    };
    let set = |state: &str| {
        let (code, body) = http(
            b.admin,
            "POST",
            &format!("/upstreams/media/servers/{}/state", w.primary_addr),
            Some(&format!("{{\"state\":\"{state}\"}}")),
        )
        .unwrap();
        assert_eq!(code, 200, "{body}");
    };
    let hook = |extra: &str| {
        format!(
            "{base}events:\n  webhooks:\n    - {{ url: \"https://127.0.0.1:{port}/hook\", secret: s3cret, timeout: 1s, retries: 0{extra} }}\n"
        )
    };

    // A reload adds the https hook, trusting the test CA: it gets the next event, signed.
    let with_ca = hook(&format!(", ca: \"{}\"", ca.display()));
    let (code, body) = reload(&with_ca);
    assert_eq!(code, 200, "{body}");
    set("drain");
    let (v, lag1, sig) = next_admin(&rx, "drain");
    assert_eq!(v["server"], w.primary_addr.to_string());
    assert!(sig.is_some_and(|s| s.starts_with("sha256=")));

    // A reload whose hook is bad (a CA file that does not exist) changes nothing.
    let (code, body) = reload(&hook(", ca: /nonexistent/ca.pem"));
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("events.webhooks[0]"), "{body}");
    set("enable");
    let (_, lag2, _) = next_admin(&rx, "enable");
    eprintln!("https webhook: admin events delivered {lag1:?} and {lag2:?} after them");
    assert!(lag1 <= Duration::from_millis(100) && lag2 <= Duration::from_millis(100));

    // Without `ca` the system's CA certificates do not know the test CA: refused.
    let failed = deliveries(&b, "failed");
    let (code, body) = reload(&hook(""));
    assert_eq!(code, 200, "{body}");
    let cut = SystemTime::now();
    set("drain");
    wait_until(Duration::from_secs(3), "the delivery failed on TLS", || {
        deliveries(&b, "failed") > failed
    });
    // Whatever still arrives is from before the reload (the failback that followed
    // `enable`), never the drain.
    while let Ok((_, body, _)) = rx.recv_timeout(Duration::from_millis(200)) {
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let at = humantime::parse_rfc3339(v["at"].as_str().unwrap()).unwrap();
        assert!(at < cut, "an unverified receiver got {v}");
    }

    // A CA file rotated in place (as a mounted Secret is): the next reload, with the
    // configuration file unchanged, takes the new content.
    let rotated = pki_dir.path().join("rotated.pem");
    std::fs::copy(pki_dir.path().join("other-ca.pem"), &rotated).unwrap();
    let (code, body) = reload(&hook(&format!(", ca: \"{}\"", rotated.display())));
    assert_eq!(code, 200, "{body}");
    let failed = deliveries(&b, "failed");
    set("enable");
    wait_until(Duration::from_secs(3), "refused: another CA", || {
        deliveries(&b, "failed") > failed
    });
    std::fs::copy(&ca, &rotated).unwrap();
    let (code, body) = http(b.admin, "POST", "/reload", None).unwrap();
    assert_eq!(code, 200, "{body}");
    set("drain");
    next_admin(&rx, "drain");
}
