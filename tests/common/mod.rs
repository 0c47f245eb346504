//! Shared pieces of the end-to-end tests: the real `mediagate` binary with a config file,
//! echo workers as separate processes (so they can be killed or stopped), a blocking HTTP
//! client for the admin API, and deadline-bounded waiting.
#![allow(dead_code)]

pub mod cluster;
pub mod netns;
pub mod offload;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MEDIAGATE: &str = env!("CARGO_BIN_EXE_mediagate");
pub const TESTKIT: &str = env!("CARGO_BIN_EXE_mediagate-testkit");

/// A free UDP port on 127.0.0.1 in 10000–19999: outside the ephemeral range
/// (32768–60999), so between the pick and the bind of the process it is meant for no
/// other test's probe or session socket (bound to port 0) can take it, as one picked by
/// the kernel could be; and below the TURN tests' relay port ranges (20000 and up).
pub fn free_udp_port() -> u16 {
    loop {
        let port = 10_000 + rand::random::<u16>() % 10_000;
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// [`free_udp_port`] (the name the cluster tests use).
pub fn spare_udp_port() -> u16 {
    free_udp_port()
}

/// A free TCP port on 127.0.0.1 in 10000–19999 (see [`free_udp_port`]).
pub fn free_tcp_port() -> u16 {
    loop {
        let port = 10_000 + rand::random::<u16>() % 10_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The first port of a TURN relay range (up to 21 ports here) above the ephemeral range
/// (32768-60999), picked by `seed`: a range inside it can be taken whole by the UDP
/// sockets of tests running beside (a flood's 20,000 sessions), and then every Allocate
/// gets 508.
pub fn relay_range_above_ephemeral(seed: u16) -> u16 {
    61_000 + seed % 4_000
}

/// Polls `cond` every 10 ms until it holds or `limit` passes; panics with `what` then.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Async flavour of [`wait_until`].
pub async fn wait_until_async(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), sig).expect("signal");
    }
    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// Waits for exit with a deadline; returns the exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A stopped process must be continued to die cleanly under some init systems.
        let _ = nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGCONT);
        self.kill();
    }
}

/// Starts a testkit echo worker (`udp-echo` / `tcp-echo`), optionally inside a network
/// namespace, and waits for its `ready` line.
pub fn worker(kind: &str, name: &str, listen: SocketAddr, netns: Option<&str>) -> Proc {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, TESTKIT]);
            c
        }
        None => Command::new(TESTKIT),
    };
    cmd.args([kind, "--name", name, "--listen", &listen.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().expect("spawn testkit");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("worker {name} did not start"));
    assert!(line.starts_with("ready"), "worker {name}: {line:?}");
    Proc {
        child,
        name: name.to_string(),
    }
}

/// Two UDP echo workers ("primary" and "backup") on loopback, and free ports for a
/// balancer's listener and admin API: the fixture most failover tests start from.
pub struct UdpPair {
    pub primary: Proc,
    pub backup: Proc,
    pub primary_addr: SocketAddr,
    pub backup_addr: SocketAddr,
    pub listen: u16,
    pub admin: u16,
}

impl UdpPair {
    pub fn start() -> UdpPair {
        let primary_addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
        let backup_addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
        UdpPair {
            primary: worker("udp-echo", "primary", primary_addr, None),
            backup: worker("udp-echo", "backup", backup_addr, None),
            primary_addr,
            backup_addr,
            listen: free_udp_port(),
            admin: free_tcp_port(),
        }
    }

    /// The balancer's UDP listen address.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.listen))
    }
}

/// A running balancer.
pub struct Balancer {
    pub proc: Proc,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Balancer {
    /// Writes `yaml` (which must use `admin.listen: 127.0.0.1:{admin_port}`) and runs
    /// `mediagate run`, waiting for /readyz.
    pub fn start(yaml: &str, admin_port: u16) -> Balancer {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("mediagate.yaml");
        std::fs::write(&config, yaml).expect("write config");
        Self::start_path(dir, config, admin_port)
    }

    /// Runs `mediagate run -c config` (a file the caller wrote inside `dir`).
    pub fn start_path(dir: tempfile::TempDir, config: PathBuf, admin_port: u16) -> Balancer {
        Self::start_path_with(dir, config, admin_port, None, &[])
    }

    /// [`Balancer::start_path`] with the open-file limit (soft and hard, so the process
    /// cannot raise it) set to `nofile`, and extra environment variables.
    pub fn start_path_with(
        dir: tempfile::TempDir,
        config: PathBuf,
        admin_port: u16,
        nofile: Option<u64>,
        env: &[(&str, &str)],
    ) -> Balancer {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(MEDIAGATE);
        cmd.args(["run", "-c"])
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(n) = nofile {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, n, n)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let child = cmd.spawn().expect("spawn mediagate");
        let b = Balancer {
            proc: Proc {
                child,
                name: "mediagate".into(),
            },
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            dir,
            config,
        };
        wait_until(Duration::from_secs(15), "mediagate /readyz", || {
            matches!(http(b.admin, "GET", "/readyz", None), Ok((200, _)))
        });
        b
    }

    /// GET /status as JSON.
    pub fn status(&self) -> serde_json::Value {
        let (code, body) = http(self.admin, "GET", "/status", None).expect("GET /status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status json")
    }

    /// The active set of `upstream`.
    pub fn active(&self, upstream: &str) -> Vec<String> {
        upstream_of(&self.status(), upstream)["active"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// GET /metrics text.
    pub fn metrics(&self) -> String {
        http(self.admin, "GET", "/metrics", None)
            .expect("metrics")
            .1
    }
}

/// The upstream named `name` in a /status document.
pub fn upstream_of<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["upstreams"]
        .as_array()
        .and_then(|a| a.iter().find(|u| u["name"] == name))
        .unwrap_or_else(|| panic!("no upstream {name} in {status}"))
}

/// One blocking HTTP/1.1 request (Connection: close).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    http_with(addr, method, path, body, &[])
}

pub fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    Ok((
        code,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    ))
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_string();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_string();
        };
        if n == 0 {
            return out;
        }
        if after.len() < n {
            return body.to_string();
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
}

/// Runs `mediagate` with arguments; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(MEDIAGATE)
        .args(args)
        .output()
        .expect("run mediagate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Open descriptors of process `pid` (0 once it is gone).
pub fn open_fds(pid: impl std::fmt::Display) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: impl std::fmt::Display) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// Polls `/healthz` every 50 ms on its own thread until [`HealthWatch::finish`].
pub struct HealthWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<HealthReport>>,
}

/// What a [`HealthWatch`] saw.
#[derive(Debug)]
pub struct HealthReport {
    pub ok: u64,
    pub failures: Vec<String>,
    pub slowest: Duration,
}

impl HealthWatch {
    pub fn start(admin: SocketAddr) -> HealthWatch {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut r = HealthReport {
                ok: 0,
                failures: Vec::new(),
                slowest: Duration::ZERO,
            };
            while !flag.load(Ordering::Relaxed) {
                let t = Instant::now();
                match http(admin, "GET", "/healthz", None) {
                    Ok((200, _)) => r.ok += 1,
                    other => r.failures.push(format!("{other:?}")),
                }
                r.slowest = r.slowest.max(t.elapsed());
                std::thread::sleep(Duration::from_millis(50));
            }
            r
        });
        HealthWatch {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops polling; what was seen.
    pub fn finish(mut self) -> HealthReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("healthz thread")
    }
}

impl Drop for HealthWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl HealthReport {
    /// (answered, failed, slowest answer).
    pub fn counts(&self) -> (u64, u64, Duration) {
        (self.ok, self.failures.len() as u64, self.slowest)
    }

    /// Asserts `/healthz` was polled and answered 200 every time, within 3 s.
    pub fn assert_healthy(&self, what: &str) {
        eprintln!(
            "{what}: /healthz answered {} times, slowest {:?}",
            self.ok, self.slowest
        );
        assert!(
            self.failures.is_empty(),
            "{what}: /healthz failed: {:?}",
            self.failures
        );
        assert!(self.ok > 0, "{what}: /healthz never polled");
        assert!(
            self.slowest < Duration::from_secs(3),
            "{what}: /healthz took {:?}",
            self.slowest
        );
    }
}

/// The value of the sample `name` (its exact label set) in a /metrics text; 0 if absent.
pub fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The sum of every sample whose line starts with `prefix` (a family, or a family with
/// some of its labels) in a /metrics text.
pub fn metric_sum(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
