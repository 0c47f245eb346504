//! A reload whose own descriptors (probes, listen sockets, admin) exceed the open-file
//! limit cannot run: it is refused with the reason (422) and the running configuration
//! keeps serving, where before it was taken with a WARN and the admin API then failed
//! with EMFILE.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn a_reload_that_cannot_fit_the_open_file_limit_is_refused() {
    let w = UdpPair::start();
    let base = |servers: &str| {
        format!(
            "admin: {{ listen: \"127.0.0.1:{admin}\", max_connections: 16 }}\n\
             listeners:\n  - {{ name: rtp, protocol: udp, listen: \"127.0.0.1:{listen}\", upstream: media, session: {{ max_sessions: 100 }} }}\n\
             upstreams:\n  media:\n    primary: [{servers}]\n    \
             health: {{ type: udp, interval: 1s, timeout: 500ms }}\n",
            admin = w.admin,
            listen = w.listen,
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mediagate.yaml");
    std::fs::write(&path, base(&format!("\"{}\"", w.primary_addr))).unwrap();
    let b = Balancer::start_path_with(dir, path.clone(), w.admin, Some(1024), &[]);
    // 2,000 servers: 2,000 probe descriptors, twice the limit.
    let many: Vec<String> = (0..2000)
        .map(|i| format!("\"10.77.{}.{}:5004\"", i / 250, i % 250 + 1))
        .collect();
    std::fs::write(&path, base(&many.join(", "))).unwrap();
    let (code, body) = http(b.admin, "POST", "/reload", None).unwrap();
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("open-file limit is 1024"), "{body}");
    assert!(body.contains("probes 2000"), "{body}");
    // The running configuration still serves and still answers.
    assert_eq!(b.active("media"), vec![w.primary_addr.to_string()]);
    let st = b.status();
    assert!(
        st["config"]["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("reserves")),
        "{st}"
    );
    wait_until(Duration::from_secs(2), "healthz", || {
        matches!(http(b.admin, "GET", "/healthz", None), Ok((200, _)))
    });
}
