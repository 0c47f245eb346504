//! Real Janus nodes behind mediagate (Debian `janus`, two network namespaces), run as
//! `examples/janus-failover/` runs them:
//!
//! - `viewer_survives_node_failures`: the example's app server and page in headless
//!   Chromium (a viewer of a streaming mountpoint fed by the example's GStreamer
//!   publisher through mediagate's UDP listener; Janus API through the TCP listener,
//!   media through mediagate's TURN relay only). Each run takes the active node away (its
//!   link cut, or Janus killed), and the viewer's picture must come back from the other
//!   node without a page reload, frozen at most 1 s, every time; each run's timeline
//!   (detection, event, re-negotiation, first frame) is printed, and screenshots of the
//!   page before and after are saved in `target/janus-failover/`.
//! - `rtp_and_api_move_together_on_link_down`: RTP into the mountpoint (UDP) and the HTTP
//!   API (TCP) in one node group; the node's link goes down: both upstreams move in one
//!   event, the API answers from node B, and the RTP flow's gap, seen from node B's own
//!   link (a packet socket in its namespace) and measured on the sender's schedule, is
//!   within 120 ms.

mod common;

use common::netns::{VethHost, sh};
use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/janus-failover");
/// Test addresses: nodes at 10.212.1.2 and 10.212.2.2, the TURN relay address on `lo`.
const NET: u8 = 212;
const RELAY: Ipv4Addr = Ipv4Addr::new(10, NET, 0, 1);

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

fn require(cmd: &str, what: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(found, "{what} missing: run scripts/install-test-deps.sh");
}

/// An address on `lo` for the life of the test (the TURN relay address the nodes route to).
struct LoAddr(Ipv4Addr);

impl LoAddr {
    fn add(ip: Ipv4Addr) -> LoAddr {
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{ip}/32"), "dev", "lo"])
            .output();
        sh(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"]);
        LoAddr(ip)
    }
}

impl Drop for LoAddr {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{}/32", self.0), "dev", "lo"])
            .output();
    }
}

/// A Janus node: its namespace and, while it runs, its process.
struct Node {
    name: String,
    host: VethHost,
    janus: Option<Proc>,
}

impl Node {
    fn create(letter: char, idx: u8) -> Node {
        let host = VethHost::create(&format!("mg-janus{letter}"), "mgjn", NET, idx);
        host.exec(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &format!("10.{NET}.{idx}.1"),
        ]);
        let mut n = Node {
            name: format!("janus-{letter}"),
            host,
            janus: None,
        };
        n.start();
        n
    }

    fn api(&self) -> SocketAddr {
        SocketAddr::from((self.host.addr, 8088))
    }

    /// Starts Janus with the example's configuration and waits for its API.
    fn start(&mut self) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.host.ns, "janus", "-F"])
            .arg(format!("{EXAMPLE}/janus"))
            .args(["-n", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn janus");
        self.janus = Some(Proc {
            child,
            name: self.name.clone(),
        });
        let api = self.api();
        wait_until(Duration::from_secs(20), "janus API answers", || {
            matches!(http(api, "GET", "/janus/info", None), Ok((200, _)))
        });
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.janus.take() {
            p.kill();
        }
    }

    fn cut(&self) {
        self.host.cut();
    }

    fn restore(&self) {
        self.host
            .exec(&["ip", "link", "set", &self.host.ns_dev, "up"]);
        self.host.exec(&[
            "ip",
            "route",
            "replace",
            "default",
            "via",
            &format!("10.{NET}.{}.1", self.host.addr.octets()[2]),
        ]);
    }
}

/// mediagate running the example's configuration, with test ports.
struct Gate {
    b: Balancer,
    http: u16,
    rtp: u16,
    env: Vec<(String, String)>,
}

fn start_gate(a: &Node, b: &Node, config: &Path) -> Gate {
    let (admin, http, rtp, turn) = (
        free_tcp_port(),
        free_tcp_port(),
        free_udp_port(),
        free_udp_port(),
    );
    let env: Vec<(String, String)> = [
        ("MG_ADMIN_PORT", admin.to_string()),
        ("MG_HTTP_PORT", http.to_string()),
        ("MG_RTP_PORT", rtp.to_string()),
        ("MG_TURN_PORT", turn.to_string()),
        ("MG_ADMIN_TOKEN", "test-admin-token".into()),
        ("MG_EVENTS_TOKEN", "test-events-token".into()),
        ("MG_ICE_TOKEN", "test-ice-token".into()),
        ("MG_TURN_SECRET", "test-turn-secret-0123456789".into()),
        ("MG_RELAY_ADDRESS", RELAY.to_string()),
        ("JANUS_A", a.host.addr.to_string()),
        ("JANUS_B", b.host.addr.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let dir = tempfile::tempdir().unwrap();
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let bal = Balancer::start_path_with(dir, config.to_path_buf(), admin, None, &pairs);
    let gate = Gate {
        b: bal,
        http,
        rtp,
        env,
    };
    gate.wait_all_up();
    let first = a.api().to_string();
    assert_eq!(
        upstream_of(&gate.b.status(), "janus-api")["active"][0],
        first.as_str()
    );
    gate
}

impl Gate {
    fn env(&self, key: &str) -> &str {
        &self.env.iter().find(|(k, _)| k == key).unwrap().1
    }

    /// Waits until every server of both upstreams is up (after a node came back).
    fn wait_all_up(&self) {
        wait_until(Duration::from_secs(20), "every server up again", || {
            let st = self.b.status();
            ["janus-api", "janus-rtp"].iter().all(|u| {
                upstream_of(&st, u)["servers"]
                    .as_array()
                    .is_some_and(|s| s.iter().all(|s| s["health"] == "up"))
            })
        });
    }
}

/// A process group (Chromium and its helpers), killed whole on drop.
struct Group(std::process::Child);

impl Drop for Group {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

fn python(script: &str, args: &[String]) -> Proc {
    let child = Command::new("/usr/bin/python3")
        .arg(format!("{EXAMPLE}/{script}"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("{script}: {e}"));
    Proc {
        child,
        name: script.into(),
    }
}

/// Collects the JSON lines a process prints.
fn collect(p: &mut Proc) -> Arc<Mutex<Vec<Value>>> {
    let out = p.child.stdout.take().expect("stdout");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            let v = serde_json::from_str::<Value>(&line).unwrap_or_else(|_| {
                let cut: String = line.chars().take(300).collect();
                serde_json::json!({"log": "unparsed", "line": cut})
            });
            l.lock().unwrap().push(v);
        }
    });
    lines
}

/// What the page has reported so far: its latest report, and every frame time it sent.
struct Viewer {
    log: Arc<Mutex<Vec<Value>>>,
}

impl Viewer {
    fn latest(&self) -> Option<Value> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|v| v["log"] == "report" && v.get("frames").is_some())
            .cloned()
    }

    fn frame_times(&self) -> BTreeSet<u64> {
        let mut all = BTreeSet::new();
        for v in self.log.lock().unwrap().iter() {
            if let Some(r) = v["recent"].as_array() {
                all.extend(r.iter().filter_map(|t| t.as_f64()).map(|t| t as u64));
            }
        }
        all
    }

    /// The page's `event` reports (`webrtcup`, `recreate`) after `t`.
    fn events_after(&self, kind: &str, t: f64) -> Vec<Value> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["event"] == kind && v["now"].as_f64().unwrap_or(0.0) > t)
            .cloned()
            .collect()
    }

    fn app_log_after(&self, what: &str, t: f64) -> Option<Value> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .find(|v| v["log"] == what && v["t"].as_f64().unwrap_or(0.0) * 1000.0 > t)
            .cloned()
    }

    /// What the app and the page said since `t` (ms) that `pick` takes, but the periodic
    /// reports, a line each with the fields that tell how a run went (and every line
    /// that was not JSON).
    fn timeline(&self, t: f64, pick: impl Fn(&Value) -> bool) -> String {
        const KEYS: [&str; 11] = [
            "log",
            "kind",
            "event",
            "why",
            "seq",
            "upstreams",
            "reason",
            "generation",
            "recreated",
            "node",
            "errors",
        ];
        let mut out = String::new();
        for v in self.log.lock().unwrap().iter() {
            let at = v["t"].as_f64().map(|s| s * 1000.0).unwrap_or(t);
            let unparsed = v["log"] == "unparsed";
            if !unparsed
                && (at < t || (v["log"] == "report" && v.get("event").is_none()) || !pick(v))
            {
                continue;
            }
            let fields: serde_json::Map<String, Value> = KEYS
                .iter()
                .chain(if unparsed { &["line"][..] } else { &[][..] })
                .filter_map(|k| v.get(*k).map(|x| (k.to_string(), x.clone())))
                .collect();
            out.push_str(&format!("\n  +{:.0} ms {}", at - t, Value::Object(fields)));
        }
        out
    }

    /// Waits until the page shows frames on `node`, the latest one less than 200 ms old.
    fn wait_playing(&self, node: &str, limit: Duration) {
        wait_until(limit, &format!("video playing from {node}"), || {
            self.latest().is_some_and(|r| {
                r["node"] == node
                    && r["frames"].as_u64().unwrap_or(0) > 30
                    && r["now"].as_f64().unwrap_or(0.0) - r["last"].as_f64().unwrap_or(0.0) < 200.0
            })
        });
    }
}

fn shot(app: SocketAddr, dir: &Path, name: &str) -> PathBuf {
    let file = dir.join(format!("{name}.png"));
    let _ = std::fs::remove_file(&file);
    let (code, body) =
        http(app, "POST", &format!("/shot?name={name}"), Some("")).expect("POST /shot");
    assert_eq!(code, 200, "{body}");
    wait_until(Duration::from_secs(10), "screenshot saved", || {
        std::fs::metadata(&file).is_ok_and(|m| m.len() > 1000)
    });
    file
}

#[derive(Clone, Copy, Debug)]
enum Failure {
    LinkCut,
    JanusKilled,
}

#[test]
fn viewer_survives_node_failures() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root for ip netns"
    );
    require("janus", "Debian janus");
    require("chromium", "Debian chromium");
    assert!(
        Path::new("/usr/share/javascript/janus-gateway/janus.js").exists(),
        "libjs-janus-gateway missing: run scripts/install-test-deps.sh"
    );
    let _relay = LoAddr::add(RELAY);
    let mut nodes = [Node::create('a', 1), Node::create('b', 2)];
    let gate = start_gate(
        &nodes[0],
        &nodes[1],
        Path::new(&format!("{EXAMPLE}/mediagate.yaml")),
    );
    let shots = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/janus-failover"
    ));
    std::fs::create_dir_all(&shots).unwrap();

    let control = free_tcp_port();
    let _publisher = python(
        "publisher.py",
        &[
            "--rtp".into(),
            format!("127.0.0.1:{}", gate.rtp),
            "--control".into(),
            format!("127.0.0.1:{control}"),
        ],
    );
    let app_port = free_tcp_port();
    let app_addr = SocketAddr::from(([127, 0, 0, 1], app_port));
    let mut app = python(
        "app.py",
        &[
            "--listen".into(),
            app_addr.to_string(),
            "--admin".into(),
            format!("http://{}", gate.b.admin),
            "--events-token".into(),
            gate.env("MG_EVENTS_TOKEN").into(),
            "--ice-token".into(),
            gate.env("MG_ICE_TOKEN").into(),
            "--janus".into(),
            format!("http://127.0.0.1:{}/janus", gate.http),
            "--publisher".into(),
            format!("http://127.0.0.1:{control}"),
            "--shots".into(),
            shots.display().to_string(),
        ],
    );
    let viewer = Viewer {
        log: collect(&mut app),
    };
    wait_until(Duration::from_secs(10), "app server listening", || {
        viewer.app_log_after("events_connected", 0.0).is_some()
    });

    let profile = tempfile::tempdir().unwrap();
    let _chromium = {
        use std::os::unix::process::CommandExt;
        Group(
            Command::new("chromium")
                .args([
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--disable-extensions",
                    "--disable-dev-shm-usage",
                    "--autoplay-policy=no-user-gesture-required",
                ])
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg(format!("http://{app_addr}/"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("chromium starts"),
        )
    };
    viewer.wait_playing("janus-a", Duration::from_secs(30));
    let before = shot(app_addr, &shots, "before");

    let runs = [
        Failure::LinkCut,
        Failure::JanusKilled,
        Failure::LinkCut,
        Failure::JanusKilled,
        Failure::LinkCut,
        Failure::JanusKilled,
        Failure::LinkCut,
        Failure::JanusKilled,
        Failure::LinkCut,
        Failure::JanusKilled,
    ];
    let mut active = 0usize;
    let t_start = now_ms();
    let mut freezes = Vec::new();
    let mut after = None;
    for (i, failure) in runs.iter().enumerate() {
        let (from, to) = (active, 1 - active);
        let gen_before = viewer.latest().unwrap()["generation"].as_u64().unwrap();
        let t_fail = now_ms();
        match failure {
            Failure::LinkCut => nodes[from].cut(),
            Failure::JanusKilled => nodes[from].kill(),
        }
        let to_name = nodes[to].name.clone();
        // The first frame of a new session on the other node.
        let mut first = None;
        wait_until(
            Duration::from_secs(10),
            &format!("run {i} ({failure:?}): video back from {to_name}"),
            || {
                first = viewer.latest().and_then(|r| {
                    r["firstFrames"].as_array().and_then(|f| {
                        f.iter()
                            .find(|f| {
                                f["generation"].as_u64().unwrap_or(0) > gen_before
                                    && f["node"] == to_name.as_str()
                            })
                            .cloned()
                    })
                });
                first.is_some()
            },
        );
        let first_at = first.unwrap()["at"].as_f64().unwrap();
        let frames = viewer.frame_times();
        let last_before = frames
            .range(..=(t_fail as u64))
            .next_back()
            .copied()
            .expect("frames before the failure") as f64;
        let freeze = first_at - last_before;
        // The timeline: mediagate's event (its `at`), the app telling the page, the new
        // PeerConnection up, the first frame.
        let recreate = viewer.app_log_after("recreate", t_fail).unwrap_or_else(|| {
            panic!(
                "run {i} ({failure:?}): the app saw no failover; since the failure:{}",
                viewer.timeline(t_fail - 3000.0, |_| true)
            )
        });
        let event_at = humantime::parse_rfc3339(recreate["event_at"].as_str().unwrap_or(""))
            .map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64() * 1000.0)
            .unwrap_or(f64::NAN);
        let told = recreate["t"].as_f64().unwrap() * 1000.0;
        let up = viewer
            .events_after("webrtcup", t_fail)
            .first()
            .and_then(|v| v["now"].as_f64())
            .unwrap_or(f64::NAN);
        eprintln!(
            "run {i} {failure:?} {} -> {to_name}: detected {:.0} ms, app told pages +{:.0} ms, \
             PeerConnection up +{:.0} ms, first frame +{:.0} ms: freeze {:.0} ms",
            nodes[from].name,
            event_at - t_fail,
            told - event_at,
            up - told,
            first_at - up,
            freeze
        );
        freezes.push(freeze);
        assert!(
            freeze <= 1000.0,
            "run {i} ({failure:?}): the picture froze {freeze:.0} ms"
        );
        viewer.wait_playing(&to_name, Duration::from_secs(10));
        if after.is_none() {
            after = Some(shot(app_addr, &shots, "after"));
        }
        // Bring the failed node back: it must be up again before the next run takes
        // the other one away (failback is manual: the viewer stays where it is).
        match failure {
            Failure::LinkCut => nodes[from].restore(),
            Failure::JanusKilled => nodes[from].start(),
        }
        gate.wait_all_up();
        active = to;
    }
    let after = after.expect("a screenshot after the first failover");
    let latest = viewer.latest().unwrap();
    assert_eq!(
        latest["recreated"].as_u64(),
        Some(runs.len() as u64),
        "one re-creation per failure, no page reload: {latest}{}",
        viewer.timeline(t_start, |v| v["log"] == "recreate"
            || v["event"] == "recreate")
    );
    freezes.sort_by(f64::total_cmp);
    eprintln!(
        "freeze over {} runs: min {:.0} ms, median {:.0} ms, max {:.0} ms; screenshots {} {}",
        freezes.len(),
        freezes[0],
        freezes[freezes.len() / 2],
        freezes[freezes.len() - 1],
        before.display(),
        after.display()
    );
}

/// Sends RTP to `to` every 5 ms with consecutive sequence numbers, until `stop`; the
/// time each sequence number was sent is kept.
fn rtp_sender(
    to: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (std::thread::JoinHandle<()>, Arc<Mutex<Vec<Instant>>>) {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let s = sent.clone();
    let h = std::thread::spawn(move || {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let start = Instant::now();
        // Bounded: at most 60 s of packets.
        for seq in 0u32..12_000 {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let due = start + Duration::from_millis(5 * seq as u64);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
            // RTP: version 2, payload type 100, sequence number, timestamp, SSRC, then
            // a VP8 payload descriptor and filler.
            let mut p = vec![0u8; 172];
            p[0] = 0x80;
            p[1] = 100;
            p[2..4].copy_from_slice(&(seq as u16).to_be_bytes());
            p[4..8].copy_from_slice(&(seq * 450).to_be_bytes());
            p[8..12].copy_from_slice(&0x6d67_7465u32.to_be_bytes());
            p[12] = 0x10;
            let _ = sock.send_to(&p, to);
            s.lock().unwrap().push(Instant::now());
        }
    });
    (h, sent)
}

/// Captures, inside namespace `ns`, the RTP sequence numbers of UDP datagrams to `port`
/// with the time each arrived (a packet socket on the namespace's links).
fn capture(
    ns: &str,
    port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Arc<Mutex<Vec<(u16, Instant)>>> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let path = format!("/run/netns/{ns}");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("netns file");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let sock = socket2::Socket::new(
            socket2::Domain::PACKET,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::from(
                (libc::ETH_P_IP as u16).to_be() as i32
            )),
        )
        .expect("packet socket");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let _ = ready_tx.send(());
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok(n) = sock.recv(&mut buf) else {
                continue;
            };
            let at = Instant::now();
            // SAFETY: recv initialised the first n bytes.
            let b: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), n) };
            if n < 20 || b[9] != 17 {
                continue;
            }
            let ihl = usize::from(b[0] & 0x0f) * 4;
            if n < ihl + 12 || u16::from_be_bytes([b[ihl + 2], b[ihl + 3]]) != port {
                continue;
            }
            let seq = u16::from_be_bytes([b[ihl + 10], b[ihl + 11]]);
            g.lock().unwrap().push((seq, at));
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("capture started");
    got
}

#[test]
fn rtp_and_api_move_together_on_link_down() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root for ip netns"
    );
    require("janus", "Debian janus");
    let nodes = [Node::create('c', 3), Node::create('d', 4)];
    let (a, b) = (&nodes[0], &nodes[1]);
    let (admin, http_port, rtp) = (free_tcp_port(), free_tcp_port(), free_udp_port());
    // RTP into a mountpoint gets no replies, so passive silence detection has nothing to
    // go on: the group's HTTP probe decides. A hang costs at most one interval, a timeout,
    // the confirmations' spacing and their timeout: 20 + 20 + 2 × 10 + 20 = 80 ms, plus
    // the controller's step and the next datagram.
    const INTERVAL_MS: u64 = 20;
    let probe = format!(
        "{{ type: http, path: /janus/info, interval: {INTERVAL_MS}ms, timeout: {INTERVAL_MS}ms, confirm: 2 }}"
    );
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:{admin} }}\n\
         listeners:\n\
         \x20 - {{ name: janus-http, protocol: tcp, listen: 127.0.0.1:{http_port}, upstream: janus-api }}\n\
         \x20 - {{ name: janus-rtp, protocol: udp, listen: 127.0.0.1:{rtp}, upstream: janus-rtp }}\n\
         upstreams:\n\
         \x20 janus-api:\n    primary: [\"{}\"]\n    backup: [\"{}\"]\n    node_group: janus\n    failback: manual\n    health: {probe}\n\
         \x20 janus-rtp:\n    primary: [\"{}:5004\"]\n    backup: [\"{}:5004\"]\n    node_group: janus\n    failback: manual\n    health: {{ type: none }}\n",
        a.api(),
        b.api(),
        a.host.addr,
        b.host.addr,
    );
    let gate = Balancer::start(&yaml, admin);
    let http_addr = SocketAddr::from(([127, 0, 0, 1], http_port));
    let server_name = || {
        http(http_addr, "GET", "/janus/info", None)
            .ok()
            .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
            .and_then(|v| v["server-name"].as_str().map(String::from))
    };
    wait_until(Duration::from_secs(10), "API on node A", || {
        server_name().as_deref() == Some("janus-c")
    });

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let at_b = capture(&b.host.ns, 5004, stop.clone());
    let (sender, sent) = rtp_sender(SocketAddr::from(([127, 0, 0, 1], rtp)), stop.clone());
    wait_until(Duration::from_secs(5), "RTP on node A", || {
        upstream_of(&gate.status(), "janus-rtp")["servers"][0]["sessions"] == 1
            && sent.lock().unwrap().len() > 100
    });
    let events = {
        let admin = gate.admin;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(admin).unwrap();
            use std::io::Write;
            s.write_all(b"GET /events HTTP/1.0\r\nHost: x\r\n\r\n")
                .unwrap();
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { return };
                if let Some(json) = line.strip_prefix("data:")
                    && let Ok(v) = serde_json::from_str::<Value>(json.trim())
                {
                    let _ = tx.send(v);
                }
            }
        });
        rx
    };
    std::thread::sleep(Duration::from_millis(300)); // the subscription is in place

    let cut_seq = sent.lock().unwrap().len() - 1;
    a.cut();
    let cut_at = Instant::now();
    wait_until(Duration::from_secs(5), "RTP reaches node B", || {
        !at_b.lock().unwrap().is_empty()
    });
    wait_until(Duration::from_secs(5), "API answers from node B", || {
        server_name().as_deref() == Some("janus-d")
    });
    let api_back = cut_at.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.join().unwrap();

    // The gap on the sender's schedule: from the last datagram sent before the cut to
    // the first one node B received.
    let (first_seq, first_at) = at_b.lock().unwrap()[0];
    let sent = sent.lock().unwrap();
    let first_idx = (cut_seq..sent.len())
        .find(|&i| i as u16 == first_seq)
        .unwrap_or_else(|| {
            panic!(
                "the first datagram at B (seq {first_seq}) was not sent after the cut (seq \
                 {cut_seq}); at B: {:?}",
                at_b.lock()
                    .unwrap()
                    .iter()
                    .take(5)
                    .map(|(s, _)| s)
                    .collect::<Vec<_>>()
            )
        });
    let gap = sent[first_idx].duration_since(sent[cut_seq]);
    let lost = first_idx - cut_seq - 1;
    eprintln!(
        "link down: RTP gap {gap:?} ({lost} datagrams at 5 ms), first at B {:?} after the cut, \
         API from node B {api_back:?} after the cut",
        first_at.duration_since(cut_at)
    );
    // One event for the node, both upstreams in it, moved within 10 ms of each other.
    let mut moves = Vec::new();
    while let Ok(v) = events.recv_timeout(Duration::from_millis(500)) {
        if v["kind"] == "failover" {
            moves.push(v);
        }
    }
    assert_eq!(moves.len(), 1, "one event for the node: {moves:#?}");
    let confirm_ms = moves[0]["confirm_ms"].as_u64().expect("confirm_ms");
    eprintln!(
        "event: detection {} ms, confirmation {confirm_ms} ms by {} probes",
        moves[0]["detection_ms"], moves[0]["confirmed_by"]
    );
    // Against the probe schedule (a loaded machine stretches the probes' timeouts, and
    // the confirmation time the event reports with them): at most one interval to the
    // next probe, the confirmation mediagate reports, and 25 ms for the controller's step,
    // the next datagram (5 ms) and the capture. On a quiet machine that is 80-100 ms.
    let bound = Duration::from_millis(INTERVAL_MS + confirm_ms + 25);
    assert!(
        gap <= bound,
        "RTP gap {gap:?} ({lost} lost) beyond the probe schedule's {bound:?}"
    );
    let ups = moves[0]["upstreams"].as_array().expect("upstreams");
    let names: BTreeSet<&str> = ups.iter().filter_map(|u| u["upstream"].as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["janus-api", "janus-rtp"]),
        "{:#}",
        moves[0]
    );
    let at = |v: &Value| humantime::parse_rfc3339(v["at"].as_str().unwrap()).unwrap();
    let (t0, t1) = (at(&ups[0]), at(&ups[1]));
    let apart = t0.duration_since(t1).unwrap_or_else(|e| e.duration());
    assert!(apart <= Duration::from_millis(10), "{apart:?} apart");
    assert_eq!(
        upstream_of(&gate.status(), "janus-rtp")["active"][0],
        format!("{}:5004", b.host.addr)
    );
}
