//! DNS discovery against a real dnsmasq on a free loopback port: the server lists follow
//! the records as they change (hosts file rewritten, SIGHUP), an authoritative "no such
//! name" removes the servers, and a dead nameserver keeps the last good list while the
//! failures are counted.
//!
//! dnsmasq must be installed (`scripts/install-test-deps.sh`); without it these tests fail.

mod common;

use mediagate::config::load_str;
use mediagate::discovery::{Discovery, Readiness, Target};
use mediagate::flows::Flows;
use mediagate::metrics::Metrics;
use mediagate::upstream::Tier;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::net::{IpAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::watch;

fn dnsmasq_path() -> PathBuf {
    let candidates = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq", "/sbin/dnsmasq"];
    match candidates.iter().map(Path::new).find(|p| p.exists()) {
        Some(p) => p.to_path_buf(),
        None => panic!(
            "dnsmasq is not installed; these tests need it: run scripts/install-test-deps.sh"
        ),
    }
}

/// A loopback port free for both UDP and TCP (dnsmasq serves both), below the ephemeral
/// range: the nameserver is killed and restarted on the same port, and in between no
/// other test's ephemeral socket may take it.
fn free_dns_port() -> u16 {
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0);
    for i in 0..200u64 {
        let port =
            12_000 + ((seed.wrapping_mul(2_654_435_761).wrapping_add(i * 7_919)) % 7_000) as u16;
        let Ok(_udp) = UdpSocket::bind(("127.0.0.1", port)) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port for dnsmasq");
}

/// A dnsmasq that answers only from its hosts file, for names under `.test`; anything
/// under `.test` not in the file is NXDOMAIN.
struct Dnsmasq {
    child: Option<Child>,
    hosts: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    fn start(port: u16, hosts: &str) -> Dnsmasq {
        let dir = tempfile::tempdir().expect("tempdir");
        // dnsmasq started as root drops to `nobody` and then re-reads the file on SIGHUP:
        // the directory and file must be readable by others.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
        let mut d = Dnsmasq {
            child: None,
            hosts: dir.path().join("hosts"),
            port,
            _dir: dir,
        };
        d.write_hosts(hosts);
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let child = Command::new(dnsmasq_path())
            .args([
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--local=/test/",
                "--local-ttl=1",
                "--pid-file=",
                "--log-facility=-",
            ])
            .arg(format!("--port={}", self.port))
            .arg(format!("--addn-hosts={}", self.hosts.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dnsmasq");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until dnsmasq answers a query (NXDOMAIN for a probe name is an answer).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        // Header: id 0x4242, RD, one question; then "probe.test" type A class IN.
        let mut query = vec![0x42, 0x42, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["probe", "test"] {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 1, 0, 1]);
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("dnsmasq exited at start: {status}");
            }
            let _ = sock.send_to(&query, ("127.0.0.1", self.port));
            if let Ok((n, _)) = sock.recv_from(&mut buf)
                && n >= 2
                && buf[..2] == [0x42, 0x42]
            {
                return;
            }
        }
        panic!(
            "dnsmasq did not answer on 127.0.0.1:{} within 10 s",
            self.port
        );
    }

    fn write_hosts(&self, hosts: &str) {
        // Written whole and renamed, so dnsmasq never reads half a file.
        let tmp = self.hosts.with_extension("new");
        std::fs::write(&tmp, hosts).expect("write hosts");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::rename(&tmp, &self.hosts).expect("rename hosts");
    }

    /// New records: rewrite the file and make dnsmasq re-read it.
    fn set_hosts(&self, hosts: &str) {
        self.write_hosts(hosts);
        let child = self.child.as_ref().expect("dnsmasq running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGHUP).expect("SIGHUP dnsmasq");
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config(port: u16) -> mediagate::config::Config {
    let yaml = format!(
        "
listeners:
  - {{ name: l, protocol: udp, listen: 127.0.0.1:5004, upstream: u }}
  - {{ name: m, protocol: udp, listen: 127.0.0.1:5005, upstream: v }}
upstreams:
  u:
    primary: [janus.test:5004]
    backup: [127.0.0.99:5004]
  v:
    primary: [127.0.0.98]
    backup: [janus.test]
discovery:
  dns:
    nameservers: [127.0.0.1:{port}]
    min_ttl: 200ms
    max_ttl: 1s
"
    );
    load_str(&yaml, "test.yaml").expect("valid test config")
}

fn target(ip: &str, port: Option<u16>, tier: Tier) -> Target {
    Target {
        ip: ip.parse::<IpAddr>().expect("test ip"),
        port,
        tier,
        readiness: Readiness::Ready,
    }
}

/// `u`'s list: the DNS addresses on 5004 as primaries, then the static backup.
fn u_list(ips: &[&str]) -> Vec<Target> {
    let mut l: Vec<Target> = ips
        .iter()
        .map(|i| target(i, Some(5004), Tier::Primary))
        .collect();
    l.push(target("127.0.0.99", Some(5004), Tier::Backup));
    l
}

/// Waits until the channel holds `want`, with a deadline.
async fn wait_list(rx: &mut watch::Receiver<Vec<Target>>, want: &[Target], what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if *rx.borrow_and_update() == want {
            return;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("{what}: channel closed"),
            Err(_) => panic!(
                "{what}: list not reached within 15 s\nwant {want:?}\nhave {:?}",
                *rx.borrow()
            ),
        }
    }
}

fn dns_errors(metrics: &Metrics, upstream: &str) -> u64 {
    let prefix =
        format!("mediagate_discovery_errors_total{{source=\"dns\",upstream=\"{upstream}\"}} ");
    metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|v| v.trim().parse().expect("counter value"))
        .unwrap_or_else(|| panic!("no series {prefix}"))
}

#[tokio::test]
async fn dns_servers_follow_records_and_survive_a_dead_nameserver() {
    // Shown with --nocapture: the outage must be logged once, not per retry.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let port = free_dns_port();
    let mut dnsmasq = Dnsmasq::start(port, "127.0.0.12 janus.test\n127.0.0.11 janus.test\n");
    let metrics = Metrics::new();
    let discovery = Discovery::start(&config(port), &metrics)
        .await
        .expect("start discovery");
    let mut u = discovery.watch("u").expect("upstream u");
    let mut v = discovery.watch("v").expect("upstream v");

    // `start` waited for the first answer: the list is complete at once, sorted.
    assert_eq!(
        *u.borrow_and_update(),
        u_list(&["127.0.0.11", "127.0.0.12"])
    );
    // The same name in another upstream, port-less and as a backup.
    assert_eq!(
        *v.borrow_and_update(),
        vec![
            target("127.0.0.98", None, Tier::Primary),
            target("127.0.0.11", None, Tier::Backup),
            target("127.0.0.12", None, Tier::Backup),
        ]
    );
    assert_eq!(dns_errors(&metrics, "u"), 0);

    // Records change: one address goes, an IPv4 and an IPv6 one come.
    dnsmasq.set_hosts("127.0.0.13 janus.test\n127.0.0.12 janus.test\nfd00::13 janus.test\n");
    let changed = u_list(&["127.0.0.12", "127.0.0.13", "fd00::13"]);
    wait_list(&mut u, &changed, "after the records changed").await;

    // The nameserver dies: failures are counted, the list stays as it was.
    dnsmasq.stop();
    let deadline = Instant::now() + Duration::from_secs(30);
    while dns_errors(&metrics, "u") < 2 {
        assert!(
            Instant::now() < deadline,
            "no DNS errors counted within 30 s of killing dnsmasq"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !u.has_changed().expect("channel open"),
        "the list changed while the nameserver was dead: {:?}",
        *u.borrow()
    );
    assert_eq!(*u.borrow(), changed);
    assert!(
        dns_errors(&metrics, "v") >= 2,
        "counted for every upstream of the name"
    );

    // It comes back with other records: the list follows again.
    dnsmasq.write_hosts("127.0.0.14 janus.test\n");
    dnsmasq.spawn();
    wait_list(
        &mut u,
        &u_list(&["127.0.0.14"]),
        "after the nameserver came back",
    )
    .await;
    discovery.stop();
}

#[tokio::test]
async fn dns_name_without_records_removes_its_servers() {
    let port = free_dns_port();
    let dnsmasq = Dnsmasq::start(port, "127.0.0.11 janus.test\n");
    let metrics = Metrics::new();
    let discovery = Discovery::start(&config(port), &metrics)
        .await
        .expect("start discovery");
    let mut u = discovery.watch("u").expect("upstream u");
    assert_eq!(*u.borrow_and_update(), u_list(&["127.0.0.11"]));

    // The name is gone from the zone: NXDOMAIN is an answer, so its servers go (the
    // controller reports them `removed`), and it is not an error.
    dnsmasq.set_hosts("127.0.0.50 other.test\n");
    wait_list(&mut u, &u_list(&[]), "after the name was removed").await;
    assert_eq!(dns_errors(&metrics, "u"), 0);

    // And it can come back.
    dnsmasq.set_hosts("127.0.0.15 janus.test\n");
    wait_list(&mut u, &u_list(&["127.0.0.15"]), "after the name came back").await;
    discovery.stop();
}

/// A configured nameserver that is not listening at all: `start` still returns (bounded
/// wait), only the static servers are listed, and the failures are counted.
#[tokio::test]
async fn dns_unreachable_from_the_start_lists_static_servers_only() {
    let port = free_dns_port();
    let metrics = Metrics::new();
    let started = Instant::now();
    let discovery = Discovery::start(&config(port), &metrics)
        .await
        .expect("start discovery");
    assert!(started.elapsed() < Duration::from_secs(10));
    let u = discovery.watch("u").expect("upstream u");
    assert_eq!(*u.borrow(), u_list(&[]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while dns_errors(&metrics, "u") < 1 {
        assert!(
            Instant::now() < deadline,
            "no DNS error counted within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    discovery.stop();
}

/// Through the real binary: an upstream named by DNS, a record that disappears, and the
/// flows on it failing over with reason `removed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_fails_over_when_a_server_leaves_dns() {
    let port = free_dns_port();
    let dnsmasq = Dnsmasq::start(port, "127.0.0.21 media.test\n127.0.0.22 media.test\n");
    let media_port = common::free_udp_port();
    let _a = common::worker(
        "udp-echo",
        "a",
        format!("127.0.0.21:{media_port}").parse().unwrap(),
        None,
    );
    let _b = common::worker(
        "udp-echo",
        "b",
        format!("127.0.0.22:{media_port}").parse().unwrap(),
        None,
    );
    let (listen, admin) = (common::free_udp_port(), common::free_tcp_port());
    let b = common::Balancer::start(
        &format!(
            r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
listeners:
  - {{ name: rtp, protocol: udp, listen: "127.0.0.1:{listen}", upstream: media }}
upstreams:
  media:
    primary: ["media.test:{media_port}"]
    health: {{ type: udp, interval: 100ms, timeout: 100ms }}
discovery:
  dns: {{ nameservers: ["127.0.0.1:{port}"], min_ttl: 1s, max_ttl: 2s }}
"#
        ),
        admin,
    );
    assert_eq!(b.active("media"), vec![format!("127.0.0.21:{media_port}")]);
    let flows = Flows::start(
        std::net::SocketAddr::from(([127, 0, 0, 1], listen)),
        10,
        Duration::from_millis(20),
        16,
    )
    .await
    .expect("flows");
    common::wait_until_async(Duration::from_secs(5), "flows on a", || {
        flows.snapshot().iter().all(|f| f.last_worker == "a")
    })
    .await;
    dnsmasq.set_hosts("127.0.0.22 media.test\n");
    common::wait_until_async(Duration::from_secs(10), "flows moved to b", || {
        flows.snapshot().iter().all(|f| f.last_worker == "b")
    })
    .await;
    let st = b.status();
    let up = common::upstream_of(&st, "media");
    assert_eq!(up["servers"].as_array().map(Vec::len), Some(1), "{st}");
    let ev = &up["events"][0];
    assert_eq!(
        (ev["kind"].as_str(), ev["reason"].as_str()),
        (Some("failover"), Some("removed")),
        "{st}"
    );
    assert_eq!(ev["sessions_moved"], 10);
}
