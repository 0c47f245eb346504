//! Fate sharing (`node_group`): a UDP media upstream probed every 100 ms and a TCP
//! signalling upstream probed once a second front the same node, in a network namespace.
//! When the node's link goes down, both move to the backup node within 10 ms of each other
//! (the TCP upstream's own probe would take up to a second) and `/events` gets one event
//! that lists both.

mod common;

use common::netns::VethHost;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

/// Follows GET /events: every `data:` line.
fn sse(admin: SocketAddr) -> mpsc::Receiver<serde_json::Value> {
    let mut s = TcpStream::connect(admin).unwrap();
    s.write_all(b"GET /events HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { return };
            if let Some(json) = line.strip_prefix("data:")
                && let Ok(v) = serde_json::from_str(json.trim())
            {
                let _ = tx.send(v);
            }
        }
    });
    rx
}

fn at(v: &serde_json::Value) -> SystemTime {
    humantime::parse_rfc3339(v["at"].as_str().expect("at")).expect("rfc3339")
}

#[test]
fn upstreams_of_one_node_group_fail_over_together_with_one_event() {
    if !nix::unistd::Uid::effective().is_root() {
        panic!("this test needs root for ip netns");
    }
    let node = VethHost::create("mg-group", "mgg", 233, 1);
    let media_a = SocketAddr::from((node.addr, 7000));
    let api_a = SocketAddr::from((node.addr, 7001));
    let media_b = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let api_b = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let _w = [
        worker("udp-echo", "media-a", media_a, Some(&node.ns)),
        worker("tcp-echo", "api-a", api_a, Some(&node.ns)),
        worker("udp-echo", "media-b", media_b, None),
        worker("tcp-echo", "api-b", api_b, None),
    ];
    let (udp, tcp, admin) = (free_udp_port(), free_tcp_port(), free_tcp_port());
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:{admin} }}\n\
         listeners:\n\
         \x20 - {{ name: rtp, protocol: udp, listen: 127.0.0.1:{udp}, upstream: media }}\n\
         \x20 - {{ name: http, protocol: tcp, listen: 127.0.0.1:{tcp}, upstream: api }}\n\
         upstreams:\n\
         \x20 media:\n    primary: [\"{media_a}\"]\n    backup: [\"{media_b}\"]\n    node_group: janus\n    \
         health: {{ type: udp, interval: 100ms, timeout: 100ms }}\n\
         \x20 api:\n    primary: [\"{api_a}\"]\n    backup: [\"{api_b}\"]\n    node_group: janus\n    \
         health: {{ type: tcp, interval: 1s, timeout: 500ms }}\n"
    );
    let b = Balancer::start(&yaml, admin);
    wait_until(Duration::from_secs(10), "both on node A", || {
        b.active("media") == vec![media_a.to_string()] && b.active("api") == vec![api_a.to_string()]
    });
    let events = sse(b.admin);
    std::thread::sleep(Duration::from_millis(200)); // the subscription is in place
    node.cut();
    wait_until(Duration::from_secs(3), "both on node B", || {
        b.active("media") == vec![media_b.to_string()] && b.active("api") == vec![api_b.to_string()]
    });
    // Every event about the move, within a second of the last one.
    let mut moves = Vec::new();
    while let Ok(v) = events.recv_timeout(Duration::from_secs(1)) {
        if v["kind"] == "failover" {
            moves.push(v);
        }
    }
    assert_eq!(moves.len(), 1, "one event for the node: {moves:#?}");
    let ev = &moves[0];
    assert_eq!(ev["node_group"], "janus", "{ev}");
    let ups = ev["upstreams"].as_array().expect("upstreams");
    let find = |name: &str| {
        ups.iter()
            .find(|u| u["upstream"] == name)
            .unwrap_or_else(|| panic!("{name} missing in {ev}"))
    };
    let (media, api) = (find("media"), find("api"));
    assert_eq!(media["from"][0], media_a.to_string());
    assert_eq!(media["to"][0], media_b.to_string());
    assert_eq!(api["from"][0], api_a.to_string());
    assert_eq!(api["to"][0], api_b.to_string());
    assert_eq!(api["reason"], "node_group", "{api}");
    let gap = match at(media).duration_since(at(api)) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    eprintln!(
        "node group: media moved ({}), api followed {gap:?} apart",
        media["reason"]
    );
    assert!(gap <= Duration::from_millis(10), "{gap:?} apart: {ev}");
    // /status tells why the API server is down.
    let st = b.status();
    let servers = upstream_of(&st, "api")["servers"]
        .as_array()
        .unwrap()
        .clone();
    let a = servers
        .iter()
        .find(|s| s["address"] == api_a.to_string())
        .unwrap();
    assert_eq!(a["health"], "down");
    assert!(
        a["last_error"]
            .as_str()
            .unwrap_or("")
            .starts_with("group:media:"),
        "{a}"
    );
}
