//! `GET /events` as an application relies on it: it needs a token when tokens are set
//! (the admin token or `admin.events_token`), a flood of admin connections cannot take a
//! live stream away, a reconnect with `Last-Event-ID` gets what it missed (or a `reset`),
//! and `admin.max_event_streams` bounds the streams.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

/// One SSE event: its `event:`, `id:` and `data:` lines.
#[derive(Debug, Default, Clone)]
struct Sse {
    event: String,
    id: String,
    data: String,
}

/// Opens `GET /events` with extra header lines; returns the status code and, for a 200,
/// the events as they come.
fn open(admin: SocketAddr, headers: &str) -> (u16, mpsc::Receiver<Sse>, TcpStream) {
    let mut s = TcpStream::connect(admin).unwrap();
    write!(s, "GET /events HTTP/1.1\r\nHost: x\r\n{headers}\r\n").unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut cur = Sse::default();
        for line in reader.lines() {
            let Ok(line) = line else { return };
            if let Some(v) = line.strip_prefix("event:") {
                cur.event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("id:") {
                cur.id = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                cur.data = v.trim().to_string();
            } else if line.is_empty() && !cur.data.is_empty() {
                let _ = tx.send(std::mem::take(&mut cur));
            }
        }
    });
    (code, rx, s)
}

fn config(w: &UdpPair, admin_extra: &str) -> String {
    format!(
        "admin: {{ listen: \"127.0.0.1:{admin}\", max_connections: 16{admin_extra} }}\n\
         listeners:\n  - {{ name: rtp, protocol: udp, listen: \"127.0.0.1:{listen}\", upstream: media }}\n\
         upstreams:\n  media:\n    primary: [\"{primary}\"]\n    backup: [\"{backup}\"]\n    \
         health: {{ type: udp, interval: 100ms, timeout: 100ms }}\n",
        admin = w.admin,
        listen = w.listen,
        primary = w.primary_addr,
        backup = w.backup_addr,
    )
}

/// Sets the primary's admin state (an `admin` event), with the admin token.
fn set_state(b: &Balancer, w: &UdpPair, state: &str) {
    let path = format!("/upstreams/media/servers/{}/state", w.primary_addr);
    let (code, body) = http_with(
        b.admin,
        "POST",
        &path,
        Some(&format!("{{\"state\":\"{state}\"}}")),
        &[("Authorization", "Bearer admin-token-0123456789")],
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
}

fn next_admin(rx: &mpsc::Receiver<Sse>, state: &str) -> Sse {
    loop {
        let ev = rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("no admin event {state}"));
        if ev.event == "admin" && ev.data.contains(&format!("\"state\":\"{state}\"")) {
            return ev;
        }
    }
}

#[test]
fn events_need_a_token_survive_a_connection_flood_and_resume_with_last_event_id() {
    let w = UdpPair::start();
    let b = Balancer::start(
        &config(
            &w,
            ", token: admin-token-0123456789, events_token: events-token-0123456789, max_event_streams: 4",
        ),
        w.admin,
    );
    // Tokens: none or a wrong one is refused, either right one is taken (any case of
    // the scheme).
    assert_eq!(open(b.admin, "").0, 401);
    assert_eq!(open(b.admin, "Authorization: Bearer wrong\r\n").0, 401);
    let (code, _rx_admin, _s1) = open(b.admin, "Authorization: Bearer admin-token-0123456789\r\n");
    assert_eq!(code, 200);
    let (code, rx, s) = open(b.admin, "authorization: bearer events-token-0123456789\r\n");
    assert_eq!(code, 200);
    std::thread::sleep(Duration::from_millis(200));
    set_state(&b, &w, "drain");
    let seen = next_admin(&rx, "drain");
    assert!(!seen.id.is_empty(), "every event has an id: {seen:?}");
    assert!(seen.data.contains("\"seq\":"), "{seen:?}");

    // A flood of idle admin connections (more than max_connections) does not take the
    // stream away: it is never evicted as idle. (Each sends a request's first byte, which
    // takes it past the listener's TCP_DEFER_ACCEPT.)
    let flood: Vec<TcpStream> = (0..40)
        .filter_map(|_| {
            let mut s = TcpStream::connect(b.admin).ok()?;
            s.write_all(b"G").ok()?;
            Some(s)
        })
        .collect();
    // (A scrape may itself be refused while every slot holds a connection whose byte is
    // not read yet: that is a try that does not count.)
    wait_until(Duration::from_secs(10), "idle connections evicted", || {
        http(b.admin, "GET", "/metrics", None).is_ok_and(|(_, m)| {
            metric_sum(
                &m,
                "mediagate_admin_connections_closed_total{reason=\"evicted\"}",
            ) >= 20.0
        })
    });
    set_state(&b, &w, "maint");
    next_admin(&rx, "maint");
    drop(flood);

    // The stream drops; meanwhile two events happen; a reconnect with Last-Event-ID
    // gets both, in order, before anything new.
    drop(s);
    drop(rx);
    std::thread::sleep(Duration::from_millis(200));
    set_state(&b, &w, "drain");
    set_state(&b, &w, "enable");
    let (code, rx, _s) = open(
        b.admin,
        &format!(
            "Authorization: Bearer events-token-0123456789\r\nLast-Event-ID: {}\r\n",
            seen.id
        ),
    );
    assert_eq!(code, 200);
    // (Other events, the failover that `maint` caused among them, come in between.)
    let mut states = Vec::new();
    let mut last_seq = 0;
    while states.len() < 3 {
        let e = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("a replayed event");
        let v: serde_json::Value = serde_json::from_str(&e.data).unwrap();
        let seq = v["seq"].as_u64().expect("seq");
        assert!(seq > last_seq, "in order: {seq} after {last_seq}");
        last_seq = seq;
        if e.event == "admin" {
            states.push(v["state"].as_str().unwrap_or("").to_string());
        }
    }
    assert_eq!(states, vec!["maint", "drain", "enable"]);

    // An id this process never gave (a restart, another replica): one `reset` event.
    let (code, rx_reset, _s3) = open(
        b.admin,
        "Authorization: Bearer events-token-0123456789\r\nLast-Event-ID: 0-42\r\n",
    );
    assert_eq!(code, 200);
    let reset = rx_reset
        .recv_timeout(Duration::from_secs(5))
        .expect("reset");
    assert_eq!(reset.event, "reset", "{reset:?}");

    // Four streams hold a slot (max_event_streams: 4; the one dropped above until its
    // next write fails): a fifth is refused and counted.
    let (code, _, _) = open(b.admin, "Authorization: Bearer events-token-0123456789\r\n");
    assert_eq!(code, 503);
    let m = b.metrics();
    assert!(
        m.lines().any(|l| l
            .starts_with("mediagate_admin_connections_closed_total{reason=\"event_streams\"} 1")),
        "{m}"
    );
}

/// A TCP relay to `to` whose connections the test can cut (and that refuses new ones
/// while cut): a network cut between `mediagate events` and the admin API.
struct Relay {
    addr: SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(to: SocketAddr) -> Relay {
        use std::sync::atomic::Ordering;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (u, c) = (up.clone(), conns.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(client) = s else { return };
                if !u.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection closed
                }
                let Ok(server) = TcpStream::connect(to) else {
                    continue;
                };
                c.lock().unwrap().push(client.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Relay { addr, up, conns }
    }

    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn mediagate_events_reconnects_with_last_event_id_and_misses_nothing() {
    let w = UdpPair::start();
    let b = Balancer::start(
        &config(
            &w,
            ", token: admin-token-0123456789, events_token: events-token-0123456789",
        ),
        w.admin,
    );
    let relay = Relay::start(b.admin);
    let mut child = std::process::Command::new(MEDIAGATE)
        .args([
            "events",
            "--admin",
            &format!("http://{}", relay.addr),
            "--token",
            "events-token-0123456789",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    // Every event printed after the first one, by its seq.
    let printed = std::cell::RefCell::new(Vec::new());
    let next = |state: &str| loop {
        let v = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("mediagate events printed no {state}: {e}"));
        printed.borrow_mut().push(v["seq"].as_u64().unwrap_or(0));
        if v["kind"] == "admin" && v["state"] == state {
            return v;
        }
        assert_ne!(v["kind"], "reset", "nothing was lost: {v}");
    };
    // Subscribed once the first change shows (until then a change may go unseen).
    let mut first = None;
    for i in 0..20 {
        let state = if i % 2 == 0 { "drain" } else { "enable" };
        set_state(&b, &w, state);
        if let Ok(v) = rx.recv_timeout(Duration::from_millis(300)) {
            first = Some(v);
            break;
        }
    }
    let first = first.expect("mediagate events printed nothing");
    let seq = first["seq"].as_u64().expect("seq");
    // Cut the connection; three changes happen while the CLI cannot see them.
    relay.cut();
    std::thread::sleep(Duration::from_millis(100));
    set_state(&b, &w, "maint");
    set_state(&b, &w, "drain");
    set_state(&b, &w, "enable");
    relay.restore();
    // They come after the reconnect, in order, right after the one seen before the cut.
    let missed: Vec<_> = ["maint", "drain", "enable"]
        .iter()
        .map(|s| next(s))
        .collect();
    let seqs: Vec<u64> = missed.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert!(seqs[0] > seq, "{seqs:?} after {seq}");
    // Nothing in between went missing: every seq from the one before the cut on.
    let printed = printed.into_inner();
    let want: Vec<u64> = (seq + 1..=seq + printed.len() as u64).collect();
    assert_eq!(printed, want, "printed after seq {seq}");
    let _ = child.kill();
    let _ = child.wait();
}
