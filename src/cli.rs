//! Client-side subcommands that talk to a running balancer's admin API: `status` (a table
//! read from `/status`, with the cluster's peers), `server` (admin state changes), `ice`,
//! `failback` and `events` (follows `GET /events`).

use crate::admin::client;
use crate::admin::status::Status;
use anyhow::{Context, Result, bail};
use std::fmt::Write as _;
use std::time::Duration;

/// `mediagate status [--watch]`. With `--watch` a failed fetch (balancer restarting,
/// network) is shown in place of the table and retried a second later.
pub async fn status(admin: String, token: Option<String>, watch: bool) -> Result<()> {
    loop {
        let table = fetch_status(&admin, token.as_deref()).await;
        if !watch {
            print!("{}", table?);
            return Ok(());
        }
        // Clear the screen and home the cursor, then redraw in place.
        match table {
            Ok(table) => print!("\x1b[2J\x1b[H{table}"),
            Err(e) => print!(
                "\x1b[2J\x1b[Hmediagate status: {e:#}\n(retrying every second; Ctrl-C to stop)\n"
            ),
        }
        let _ = std::io::Write::flush(&mut std::io::stdout());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One `GET /status`, rendered.
async fn fetch_status(admin: &str, token: Option<&str>) -> Result<String> {
    let (code, body) = client::request(admin, "GET", "/status", None, token).await?;
    if code != 200 {
        bail!("GET /status answered {code}: {}", body.trim());
    }
    let st: Status = serde_json::from_str(&body).context("unexpected /status document")?;
    Ok(render(&st))
}

/// `mediagate failback UPSTREAM`.
pub async fn failback(admin: String, token: Option<String>, upstream: String) -> Result<()> {
    let path = format!("/upstreams/{}/failback", encode_segment(&upstream));
    let (code, body) = client::request(&admin, "POST", &path, None, token.as_deref()).await?;
    expect_ok(code, &body)?;
    println!("{upstream}: failback done");
    Ok(())
}

/// `mediagate server STATE UPSTREAM SERVER`.
pub async fn set_server_state(
    admin: String,
    token: Option<String>,
    state: String,
    upstream: String,
    server: String,
) -> Result<()> {
    if !matches!(state.as_str(), "enable" | "drain" | "maint") {
        bail!("unknown state {state:?} (expected enable, drain or maint)");
    }
    let path = format!(
        "/upstreams/{}/servers/{}/state",
        encode_segment(&upstream),
        encode_segment(&server)
    );
    let body = serde_json::json!({ "state": state }).to_string();
    let (code, resp) = client::request(&admin, "POST", &path, Some(body), token.as_deref()).await?;
    expect_ok(code, &resp)?;
    // 202: published to the cluster, but some replicas had not confirmed it in time.
    let pending = serde_json::from_str::<serde_json::Value>(&resp)
        .ok()
        .and_then(|v| v.get("pending").cloned())
        .and_then(|p| serde_json::from_value::<Vec<String>>(p).ok())
        .filter(|p| code == 202 && !p.is_empty());
    match pending {
        Some(p) => println!(
            "{upstream} {server}: {state} (published; not yet confirmed by {})",
            p.join(", ")
        ),
        None => println!("{upstream} {server}: {state}"),
    }
    Ok(())
}

/// `mediagate ice`: prints the ICE configuration from `GET /ice`.
pub async fn ice(
    admin: String,
    token: Option<String>,
    user: String,
    ttl: Option<u64>,
) -> Result<()> {
    let mut path = format!("/ice?username={}", encode_segment(&user));
    if let Some(t) = ttl {
        path.push_str(&format!("&ttl={t}"));
    }
    let (code, body) = client::request(&admin, "GET", &path, None, token.as_deref()).await?;
    expect_ok(code, &body)?;
    let v: serde_json::Value = serde_json::from_str(&body).context("unexpected /ice answer")?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// Turns a non-2xx answer into an error carrying the API's message.
pub fn expect_ok(code: u16, body: &str) -> Result<()> {
    if (200..300).contains(&code) {
        return Ok(());
    }
    let msg = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string());
    bail!("admin API answered {code}: {msg}")
}

/// Percent-encodes a path segment (IPv6 brackets and colons stay readable to axum).
fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// The status table.
pub fn render(st: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "mediagate {}  up {:.0}s  {}  config {}{}",
        st.version,
        st.uptime_seconds,
        if st.ready { "ready" } else { "not ready" },
        st.config.path,
        st.config
            .last_reload_error
            .as_ref()
            .map(|e| format!("  (last reload failed: {e})"))
            .unwrap_or_default()
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<20} {:<24} {:<8} {:<8} {:<7} {:>8}  ACTIVE",
        "UPSTREAM", "SERVER", "TIER", "HEALTH", "ADMIN", "SESSIONS"
    );
    for u in &st.upstreams {
        for s in &u.servers {
            let active = if u.active.contains(&s.address) {
                "*"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "{:<20} {:<24} {:<8} {:<8} {:<7} {:>8}  {}",
                u.name, s.address, s.tier, s.health, s.admin_state, s.sessions, active
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<20} {:<5} {:<24} {:<20} {:>8}",
        "LISTENER", "PROTO", "LISTEN", "UPSTREAM", "SESSIONS"
    );
    for l in &st.listeners {
        let _ = writeln!(
            out,
            "{:<20} {:<5} {:<24} {:<20} {:>8}",
            l.name, l.protocol, l.listen, l.upstream, l.sessions
        );
    }
    let mut events: Vec<_> = st
        .upstreams
        .iter()
        .flat_map(|u| u.events.iter().map(move |e| (u.name.as_str(), e)))
        .collect();
    events.sort_by(|a, b| a.1.at.cmp(&b.1.at));
    if !events.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "RECENT EVENTS");
        for (name, e) in events.iter().rev().take(10).rev() {
            let mut line = format!(
                "{}  {:<8} {:<20} {} -> {}",
                e.at,
                e.kind,
                name,
                list(&e.from),
                list(&e.to)
            );
            if let Some(r) = &e.reason {
                let _ = write!(line, "  reason={r}");
            }
            if let Some(d) = e.detection_ms {
                let _ = write!(line, " detected_in={d}ms");
            }
            let _ = write!(line, " sessions_moved={}", e.sessions_moved);
            let _ = writeln!(out, "{line}");
        }
    }
    if let Some(c) = &st.cluster {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "CLUSTER  node {} at {}{}",
            c.node,
            c.address,
            if c.synced { "" } else { "  (not synced yet)" }
        );
        let _ = writeln!(
            out,
            "{:<24} {:<24} {:<6} {:>10}  {:<7} DOWN",
            "PEER", "ADDRESS", "ALIVE", "HEARD", "AGREES"
        );
        for p in &c.peers {
            let _ = writeln!(
                out,
                "{:<24} {:<24} {:<6} {:>10}  {:<7} {}",
                p.node,
                p.address,
                if p.alive { "yes" } else { "no" },
                p.last_heard_ms
                    .map(|ms| format!("{ms}ms ago"))
                    .unwrap_or_else(|| "never".into()),
                if p.agrees { "yes" } else { "NO" },
                list(&p.down)
            );
        }
    }
    out
}

/// `mediagate events`: follows `GET /events` and prints one JSON event per line until
/// the balancer closes the stream.
pub async fn events(admin: String, token: Option<String>) -> Result<()> {
    use http_body_util::{BodyExt, Empty};
    use std::io::Write as _;
    let uri: hyper::Uri = format!("{}/events", admin.trim_end_matches('/'))
        .parse()
        .context("admin URL")?;
    let host = uri.host().context("admin URL has no host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .with_context(|| format!("connect {host}:{port}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req =
        hyper::Request::get("/events").header(hyper::header::HOST, format!("{host}:{port}"));
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp = sender
        .send_request(req.body(Empty::<bytes::Bytes>::new())?)
        .await?;
    if !resp.status().is_success() {
        bail!("GET /events answered {}", resp.status());
    }
    let mut body = resp.into_body();
    let mut pending = String::new();
    let mut stdout = std::io::stdout();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.push_str(&String::from_utf8_lossy(&data));
        while let Some(i) = pending.find('\n') {
            let line: String = pending.drain(..=i).collect();
            if let Some(json) = line.trim_end().strip_prefix("data:") {
                let _ = writeln!(stdout, "{}", json.trim_start());
                let _ = stdout.flush();
            }
        }
    }
    Ok(())
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "(none)".to_string()
    } else {
        v.join(",")
    }
}
