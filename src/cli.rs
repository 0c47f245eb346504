//! Client-side subcommands that talk to a running balancer's admin API: `status` (a table
//! read from `/status`, with the cluster's peers, or its JSON; `--all` asks every replica),
//! `server` (admin state changes), `reload`, `log-level`, `ice`, `failback` and `events`
//! (follows `GET /events`).

use crate::admin::client;
use crate::admin::status::Status;
use anyhow::{Context, Result, bail};
use std::fmt::Write as _;
use std::time::Duration;

/// How `mediagate status` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// The table.
    Table,
    /// The `/status` document as the API returns it (with `--all`: an array of
    /// `{"replica": ADDRESS, "status": DOCUMENT}` or `{"replica", "error"}`).
    Json,
}

/// `mediagate status [--watch] [-o json] [--all]`. With `--watch` a failed fetch (balancer
/// restarting, network) is shown in place of the table and retried a second later; the
/// screen is cleared between refreshes only when stdout is a terminal (a pipe or a file
/// gets each refresh after the other). With `--all` every address the admin URL's host
/// name resolves to is asked (a Kubernetes headless Service names every replica).
pub async fn status(
    admin: String,
    token: Option<String>,
    watch: bool,
    output: Output,
    all: bool,
) -> Result<()> {
    use std::io::IsTerminal as _;
    let terminal = std::io::stdout().is_terminal();
    loop {
        let shown = if all {
            fetch_all(&admin, token.as_deref(), output).await
        } else {
            fetch_status(&admin, token.as_deref(), output).await
        };
        if !watch {
            print!("{}", shown?);
            return Ok(());
        }
        let text = match shown {
            Ok(text) => text,
            Err(e) => {
                format!("mediagate status: {e:#}\n(retrying every second; Ctrl-C to stop)\n")
            }
        };
        if terminal {
            // Clear the screen and home the cursor, then redraw in place.
            print!("\x1b[2J\x1b[H{text}");
        } else {
            println!("{text}");
        }
        let _ = std::io::Write::flush(&mut std::io::stdout());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One `GET /status`, rendered.
async fn fetch_status(admin: &str, token: Option<&str>, output: Output) -> Result<String> {
    let body = get_status(admin, token).await?;
    match output {
        Output::Json => Ok(format!("{}\n", body.trim_end())),
        Output::Table => {
            let st: Status = serde_json::from_str(&body).context("unexpected /status document")?;
            Ok(render(&st))
        }
    }
}

async fn get_status(admin: &str, token: Option<&str>) -> Result<String> {
    let (code, body) = client::request(admin, "GET", "/status", None, token).await?;
    if code != 200 {
        bail!("GET /status answered {code}: {}", body.trim());
    }
    Ok(body)
}

/// `status --all`: every replica behind the admin URL's host name, one after the other.
async fn fetch_all(admin: &str, token: Option<&str>, output: Output) -> Result<String> {
    let replicas = replica_bases(admin).await?;
    let mut text = String::new();
    let mut docs = Vec::new();
    for (addr, base) in &replicas {
        let got = get_status(base, token).await;
        match output {
            Output::Json => docs.push(match got {
                Ok(body) => {
                    let v: serde_json::Value =
                        serde_json::from_str(&body).context("unexpected /status document")?;
                    serde_json::json!({ "replica": addr.to_string(), "status": v })
                }
                Err(e) => {
                    serde_json::json!({ "replica": addr.to_string(), "error": format!("{e:#}") })
                }
            }),
            Output::Table => {
                let _ = writeln!(text, "== replica {addr} ==");
                match got.and_then(|body| {
                    serde_json::from_str::<Status>(&body).context("unexpected /status document")
                }) {
                    Ok(st) => text.push_str(&render(&st)),
                    Err(e) => {
                        let _ = writeln!(text, "error: {e:#}");
                    }
                }
                text.push('\n');
            }
        }
    }
    if output == Output::Json {
        text = format!("{}\n", serde_json::to_string_pretty(&docs)?);
    }
    Ok(text)
}

/// The admin URL of every address its host name resolves to (sorted; an IP is itself).
async fn replica_bases(admin: &str) -> Result<Vec<(std::net::SocketAddr, String)>> {
    let uri: hyper::Uri = admin.parse().context("admin URL")?;
    let scheme = uri.scheme_str().unwrap_or("http");
    let host = uri.host().context("admin URL has no host")?;
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    let mut addrs: Vec<std::net::SocketAddr> =
        tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
            .await
            .with_context(|| format!("resolve {host}"))?
            .collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        bail!("{host} resolves to no address");
    }
    Ok(addrs
        .into_iter()
        .map(|a| (a, format!("{scheme}://{a}")))
        .collect())
}

/// `mediagate reload`: `POST /reload`; prints `reloaded`, or every error of the refused
/// file (the running configuration stays).
pub async fn reload(admin: String, token: Option<String>) -> Result<()> {
    let (code, body) = client::request(&admin, "POST", "/reload", None, token.as_deref()).await?;
    if code == 422 {
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let errors = v["errors"]
            .as_array()
            .map(|e| {
                e.iter()
                    .map(|e| {
                        e.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| e.to_string())
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_else(|| body.trim().to_string());
        bail!("reload refused, the running configuration stays:\n{errors}");
    }
    expect_ok(code, &body)?;
    println!("reloaded");
    Ok(())
}

/// `mediagate log-level [LEVEL]`: prints the log filter in force, or sets it
/// (`POST /log-level`) until the next change or a reload that changes `log.level`.
pub async fn log_level(admin: String, token: Option<String>, level: Option<String>) -> Result<()> {
    let (code, body) = match &level {
        None => client::request(&admin, "GET", "/log-level", None, token.as_deref()).await?,
        Some(l) => {
            let body = serde_json::json!({ "level": l }).to_string();
            client::request(&admin, "POST", "/log-level", Some(body), token.as_deref()).await?
        }
    };
    expect_ok(code, &body)?;
    let v: serde_json::Value = serde_json::from_str(&body).context("unexpected answer")?;
    println!("{}", v["level"].as_str().unwrap_or_default());
    Ok(())
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

/// `mediagate events`: follows `GET /events` and prints one JSON event per line. When the
/// stream ends (a restart, a network cut, a reader too far behind) it reconnects with
/// `Last-Event-ID`, so nothing in mediagate's history is missed; a `reset` event (printed
/// like the others) says when the history no longer reached back. It stops on an answer
/// that retrying cannot change (401, 403, 404).
pub async fn events(admin: String, token: Option<String>) -> Result<()> {
    let mut last_id: Option<String> = None;
    let mut pause = Duration::from_millis(200);
    loop {
        match follow_events(&admin, token.as_deref(), &mut last_id).await {
            Ok(Follow::Ended) => pause = Duration::from_millis(200),
            Ok(Follow::Refused(status)) => bail!("GET /events answered {status}"),
            Err(e) => {
                eprintln!("mediagate events: {e:#}; reconnecting in {pause:?}");
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
        tokio::time::sleep(pause).await;
    }
}

/// How one `GET /events` ended.
enum Follow {
    /// The stream closed: reconnect.
    Ended,
    /// An answer retrying cannot change.
    Refused(hyper::StatusCode),
}

/// One subscription: prints every event, keeps `last_id` current.
async fn follow_events(
    admin: &str,
    token: Option<&str>,
    last_id: &mut Option<String>,
) -> Result<Follow> {
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
    if let Some(id) = last_id.as_deref() {
        req = req.header("last-event-id", id);
    }
    let resp = sender
        .send_request(req.body(Empty::<bytes::Bytes>::new())?)
        .await?;
    let status = resp.status();
    if matches!(status.as_u16(), 401 | 403 | 404) {
        return Ok(Follow::Refused(status));
    }
    if !status.is_success() {
        bail!("GET /events answered {status}");
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
            let line = line.trim_end();
            if let Some(id) = line.strip_prefix("id:") {
                *last_id = Some(id.trim().to_string());
            } else if let Some(json) = line.strip_prefix("data:") {
                let _ = writeln!(stdout, "{}", json.trim_start());
                let _ = stdout.flush();
            }
        }
        if pending.len() > 1 << 20 {
            bail!("an event line longer than 1 MiB");
        }
    }
    Ok(Follow::Ended)
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "(none)".to_string()
    } else {
        v.join(",")
    }
}
