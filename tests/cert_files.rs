//! Certificate files are read with bounds: a TLS listener's `cert` that becomes a symlink
//! to `/dev/zero` (or `/dev/urandom`) is refused without reading it (RSS stays put), the
//! certificate in use stays, and a good file put back is loaded again; `mediagate check`
//! refuses such a file too.

mod common;
mod turn_support;

use common::*;
use std::time::Duration;

fn counter(b: &Balancer, result: &str) -> u64 {
    b.metrics()
        .lines()
        .find(|l| {
            l.starts_with("mediagate_turn_tls_cert_reloads_total")
                && l.contains(&format!("result=\"{result}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

#[test]
fn a_certificate_turned_into_a_device_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = turn_support::self_signed(dir.path(), "server", "turn.test");
    let good = std::fs::read(&cert).unwrap();
    let admin = free_tcp_port();
    let tls = free_tcp_port();
    let relay = relay_range_above_ephemeral(admin + 700);
    let yaml = format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
turn:
  public_address: 127.0.0.1
  listeners:
    - {{ protocol: tls, listen: "127.0.0.1:{tls}", cert: "{}", key: "{}" }}
  auth: {{ type: ephemeral, secret: test-secret, ttl: 1h }}
  relay: {{ address: 127.0.0.1, port_range: {relay}-{}, peers: ["127.0.0.1/32"] }}
"#,
        cert.display(),
        key.display(),
        relay + 20
    );
    let b = Balancer::start(&yaml, admin);
    let pid = b.proc.pid();
    let rss_before = rss_kib(pid);
    assert_eq!(counter(&b, "ok"), 1);

    for device in ["/dev/zero", "/dev/urandom"] {
        std::fs::remove_file(&cert).unwrap();
        std::os::unix::fs::symlink(device, &cert).unwrap();
        let failed = counter(&b, "error");
        wait_until(Duration::from_secs(10), "the device refused", || {
            counter(&b, "error") > failed
        });
        let rss = rss_kib(pid);
        eprintln!("{device}: refused; RSS {rss_before} KiB before, {rss} KiB after");
        assert!(
            rss < rss_before + 20_000,
            "{device}: RSS {rss_before} KiB -> {rss} KiB"
        );
        // `mediagate check` refuses it as well, naming the file, at once.
        let path = b.config.to_str().unwrap().to_string();
        let (code, _, err) = run_cli(&["check", "-c", &path]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("not a regular file"), "{err}");
        // A good file put back is loaded again.
        std::fs::remove_file(&cert).unwrap();
        std::fs::write(&cert, &good).unwrap();
        let ok = counter(&b, "ok");
        wait_until(Duration::from_secs(10), "the good file loaded", || {
            counter(&b, "ok") > ok
        });
    }
    let (code, out, err) = run_cli(&["check", "-c", b.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
}
