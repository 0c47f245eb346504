//! Shared helpers for the TURN integration tests: an in-process gateway on loopback,
//! coturn's tools (`turnutils_uclient`, `turnutils_peer`, `turnserver`), a raw STUN/TURN
//! client for the cases the `turn` crate's client cannot express, a UDP tap that records
//! the error codes a client receives, and waiting on conditions with deadlines.

#![allow(dead_code)]

use mediagate::config::{
    Dur, PortRange, QuotaConfig, RelayConfig, TurnAuthConfig, TurnAuthType, TurnConfig,
    TurnListenerConfig, TurnTransport, TurnUser,
};
use mediagate::turn::{PeerPolicy, TurnMetrics, TurnService};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stun::agent::TransactionId;
use stun::attributes::*;
use stun::error_code::ErrorCodeAttribute;
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};
use turn::proto::channum::ChannelNumber;
use turn::proto::data::Data;
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::reqtrans::RequestedTransport;

pub const REALM: &str = "mediagate";
pub const SECRET: &str = "north-wind";
pub const USER: &str = "alice";
pub const PASSWORD: &str = "wonderland";

/// Path of a coturn tool; panics (the test fails) with the fix when it is missing.
pub fn tool(name: &str) -> String {
    let path = format!("/usr/bin/{name}");
    if !Path::new(&path).exists() {
        panic!(
            "{name} not found: the TURN interop tests need coturn's tools; \
             run scripts/install-test-deps.sh (Debian package `coturn`)"
        );
    }
    path
}

/// Polls `cond` every 20 ms until it holds or `within` passes.
pub async fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(20)).await;
    }
}

pub enum Auth {
    Static,
    Ephemeral,
}

/// Polls `presented` (the certificate a new handshake gets) every 200 ms for up to 20 s
/// until it differs from `first`: whether a certificate renewed in place is served.
pub async fn new_certificate_served<F, Fut>(first: &[u8], mut presented: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<Vec<u8>>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        if presented().await.is_some_and(|c| c != first) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// A TURN config on 127.0.0.1 with one UDP and one TCP listener on ephemeral ports.
pub fn config(auth: Auth, peers: &[&str], quota: usize) -> TurnConfig {
    TurnConfig {
        realm: REALM.into(),
        public_address: "127.0.0.1".into(),
        listeners: vec![
            TurnListenerConfig {
                protocol: TurnTransport::Udp,
                listen: "127.0.0.1:0".parse().unwrap(),
                cert: None,
                key: None,
                accept_proxy_protocol: false,
                trusted_proxies: Vec::new(),
            },
            TurnListenerConfig {
                protocol: TurnTransport::Tcp,
                listen: "127.0.0.1:0".parse().unwrap(),
                cert: None,
                key: None,
                accept_proxy_protocol: false,
                trusted_proxies: Vec::new(),
            },
        ],
        auth: match auth {
            Auth::Static => TurnAuthConfig {
                secret_file: None,
                kind: TurnAuthType::Static,
                secret: None,
                secrets: vec![],
                ttl: Dur(Duration::from_secs(3600)),
                users: vec![TurnUser {
                    username: USER.into(),
                    password: PASSWORD.into(),
                }],
            },
            Auth::Ephemeral => TurnAuthConfig {
                secret_file: None,
                kind: TurnAuthType::Ephemeral,
                secret: Some(SECRET.into()),
                secrets: vec![],
                ttl: Dur(Duration::from_secs(3600)),
                users: vec![],
            },
        },
        relay: RelayConfig {
            address: "127.0.0.1".parse().unwrap(),
            // Above the ephemeral range (32768-60999): peers of the tests bind ephemeral
            // ports, and a relay port is never a valid peer (no loops).
            port_range: PortRange {
                first: 61000,
                last: 64999,
            },
            peers: peers.iter().map(|s| s.to_string()).collect(),
            ..RelayConfig::default()
        },
        quota: QuotaConfig {
            allocations_per_user: quota,
            ..QuotaConfig::default()
        },
        ice: Default::default(),
    }
}

/// Adds a `tls` listener on an ephemeral port serving `cert` / `key`.
pub fn add_tls(cfg: &mut TurnConfig, cert: &Path, key: &Path, accept_proxy_protocol: bool) {
    cfg.listeners.push(TurnListenerConfig {
        protocol: TurnTransport::Tls,
        listen: "127.0.0.1:0".parse().unwrap(),
        cert: Some(cert.to_path_buf()),
        key: Some(key.to_path_buf()),
        accept_proxy_protocol,
        // The tests' PROXY headers come from loopback.
        trusted_proxies: if accept_proxy_protocol {
            vec!["127.0.0.0/8".into()]
        } else {
            Vec::new()
        },
    });
}

/// Adds a `dtls` listener on an ephemeral port serving `cert` / `key`.
pub fn add_dtls(cfg: &mut TurnConfig, cert: &Path, key: &Path) {
    cfg.listeners.push(TurnListenerConfig {
        protocol: TurnTransport::Dtls,
        listen: "127.0.0.1:0".parse().unwrap(),
        cert: Some(cert.to_path_buf()),
        key: Some(key.to_path_buf()),
        accept_proxy_protocol: false,
        trusted_proxies: Vec::new(),
    });
}

/// Writes a CA and a leaf certificate for `name` and 127.0.0.1 signed by it, with the
/// openssl CLI; returns (leaf certificate, leaf key, CA certificate) paths.
pub fn self_signed(dir: &Path, file: &str, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key, _) = cert_chain(dir, file, name);
    (cert, key)
}

/// See [`self_signed`]; also returns the CA certificate.
pub fn cert_chain(
    dir: &Path,
    file: &str,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let p = |s: &str| dir.join(format!("{file}{s}"));
    let (ca, ca_key, csr, cert, key, ext) = (
        p("-ca.crt"),
        p("-ca.key"),
        p(".csr"),
        p(".crt"),
        p(".key"),
        p(".ext"),
    );
    std::fs::write(
        &ext,
        format!("subjectAltName=DNS:{name},IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"),
    )
    .unwrap();
    let run = |args: Vec<String>| {
        let out = std::process::Command::new("openssl")
            .args(&args)
            .output()
            .expect("openssl runs (Debian package openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let s = |x: &Path| x.to_str().unwrap().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a: Vec<String> = vec!["req".into(), "-x509".into()];
    a.extend(ec.iter().map(|x| x.to_string()));
    a.extend(["-days", "2", "-subj", &format!("/CN={file} test CA")].map(String::from));
    a.extend(["-keyout".into(), s(&ca_key), "-out".into(), s(&ca)]);
    run(a);
    let mut a: Vec<String> = vec!["req".into()];
    a.extend(ec.iter().map(|x| x.to_string()));
    a.extend(["-subj".to_string(), format!("/CN={name}")]);
    a.extend(["-keyout".into(), s(&key), "-out".into(), s(&csr)]);
    run(a);
    run(vec![
        "x509".into(),
        "-req".into(),
        "-in".into(),
        s(&csr),
        "-CA".into(),
        s(&ca),
        "-CAkey".into(),
        s(&ca_key),
        "-CAcreateserial".into(),
        "-days".into(),
        "2".into(),
        "-extfile".into(),
        s(&ext),
        "-out".into(),
        s(&cert),
    ]);
    (cert, key, ca)
}

/// A running in-process gateway.
pub struct Gateway {
    pub svc: TurnService,
    pub metrics: TurnMetrics,
    pub policy: Arc<PeerPolicy>,
    pub cfg: TurnConfig,
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    /// The `tls` listener, when the config has one.
    pub tls: Option<SocketAddr>,
    /// The `dtls` listener, when the config has one.
    pub dtls: Option<SocketAddr>,
}

impl Gateway {
    pub async fn start(cfg: TurnConfig) -> Gateway {
        let policy = Arc::new(
            PeerPolicy::new(&cfg.relay, "127.0.0.1:8086".parse().unwrap(), &[]).expect("policy"),
        );
        let metrics = TurnMetrics::unregistered();
        let svc = TurnService::start(&cfg, Arc::clone(&policy), metrics.clone())
            .await
            .expect("TURN service starts");
        let addrs = svc.local_addrs();
        let find = |p: TurnTransport| addrs.iter().find(|(q, _)| *q == p).map(|(_, a)| *a);
        Gateway {
            udp: find(TurnTransport::Udp).unwrap(),
            tcp: find(TurnTransport::Tcp).unwrap(),
            tls: find(TurnTransport::Tls),
            dtls: find(TurnTransport::Dtls),
            svc,
            metrics,
            policy,
            cfg,
        }
    }
}

/// Two consecutive free UDP ports on 127.0.0.1 (turnutils_peer listens on P and P+1).
pub fn free_port_pair() -> u16 {
    for _ in 0..200 {
        let p = 20000 + (rand_u16() % 9000) * 2;
        let a = std::net::UdpSocket::bind(("127.0.0.1", p));
        let b = std::net::UdpSocket::bind(("127.0.0.1", p + 1));
        if a.is_ok() && b.is_ok() {
            return p;
        }
    }
    panic!("no free UDP port pair");
}

/// The first port of a 300-port relay range below the ephemeral range (where the other
/// ports of the tests come from), so that it never overlaps a listener.
pub fn relay_range_below_ephemeral() -> u16 {
    loop {
        let p = free_port_pair();
        if p + 299 < 32768 {
            return p;
        }
    }
}

fn rand_u16() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    (t ^ (std::process::id() << 7)) as u16 ^ (t >> 16) as u16
}

/// `turnutils_peer` echoing on 127.0.0.1:P and P+1, ready when this returns.
pub async fn echo_peer() -> (Child, u16) {
    let bin = tool("turnutils_peer");
    for _ in 0..5 {
        let port = free_port_pair();
        let child = Command::new(&bin)
            .args(["-L", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn turnutils_peer");
        let probe = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let _ = probe.send_to(b"ping", ("127.0.0.1", port)).await;
            let mut buf = [0u8; 16];
            if let Ok(Ok((4, _))) =
                timeout(Duration::from_millis(100), probe.recv_from(&mut buf)).await
            {
                return (child, port);
            }
        }
    }
    panic!("turnutils_peer did not start echoing");
}

/// Output of one `turnutils_uclient` run.
#[derive(Debug)]
pub struct Uclient {
    pub ok: bool,
    pub out: String,
    pub sent: Option<u64>,
    pub received: Option<u64>,
}

/// Runs `turnutils_uclient ARGS 127.0.0.1` with a 40 s limit.
pub fn uclient(args: &[&str]) -> impl std::future::Future<Output = Uclient> + use<> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    run_uclient(args)
}

/// Runs `turnutils_uclient ARGS SERVER` inside network namespace `netns` (40 s limit).
pub async fn uclient_in(netns: &str, server: &str, args: &[&str]) -> Uclient {
    let mut full: Vec<String> = ["netns", "exec", netns, &tool("turnutils_uclient")]
        .iter()
        .map(|s| s.to_string())
        .collect();
    full.extend(args.iter().map(|s| s.to_string()));
    run_tool("ip", full, server).await
}

async fn run_uclient(args: Vec<String>) -> Uclient {
    run_tool(&tool("turnutils_uclient"), args, "127.0.0.1").await
}

async fn run_tool(bin: &str, args: Vec<String>, server: &str) -> Uclient {
    let mut cmd = Command::new(bin);
    cmd.args(&args).arg(server).kill_on_drop(true);
    let out = timeout(Duration::from_secs(40), cmd.output())
        .await
        .expect("turnutils_uclient finished in time")
        .expect("turnutils_uclient runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let total = |key: &str| -> Option<u64> {
        text.lines()
            .rfind(|l| l.contains("start_mclient: tot_send_msgs="))
            .and_then(|l| l.split(key).nth(1))
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
    };
    Uclient {
        ok: out.status.success(),
        sent: total("tot_send_msgs="),
        received: total("tot_recv_msgs="),
        out: text,
    }
}

/// Datagrams received, with their sources.
pub type Received = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

/// A UDP socket that records every datagram it receives.
pub struct Sink {
    pub addr: SocketAddr,
    pub received: Received,
    _task: tokio::task::JoinHandle<()>,
}

impl Sink {
    pub async fn bind(addr: &str) -> Sink {
        let sock = UdpSocket::bind(addr).await.expect("sink binds");
        let addr = sock.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let r = Arc::clone(&received);
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                r.lock().unwrap().push((from, buf[..n].to_vec()));
            }
        });
        Sink {
            addr,
            received,
            _task: task,
        }
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

/// A UDP relay between one client and the gateway that records the STUN error codes
/// the gateway answers with.
pub struct Tap {
    pub addr: SocketAddr,
    pub codes: Arc<Mutex<Vec<u16>>>,
    pub successes: Arc<Mutex<u32>>,
    _task: tokio::task::JoinHandle<()>,
}

impl Tap {
    pub async fn start(gateway: SocketAddr) -> Tap {
        let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        back.connect(gateway).await.unwrap();
        let addr = front.local_addr().unwrap();
        let codes = Arc::new(Mutex::new(Vec::new()));
        let successes = Arc::new(Mutex::new(0));
        let (c, s) = (Arc::clone(&codes), Arc::clone(&successes));
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let mut a = vec![0u8; 65536];
            let mut b = vec![0u8; 65536];
            loop {
                tokio::select! {
                    r = front.recv_from(&mut a) => {
                        let Ok((n, from)) = r else { break };
                        client = Some(from);
                        let _ = back.send(&a[..n]).await;
                    }
                    r = back.recv(&mut b) => {
                        let Ok(n) = r else { break };
                        let mut m = Message::new();
                        m.raw = b[..n].to_vec();
                        if m.decode().is_ok() {
                            if m.typ.class == CLASS_ERROR_RESPONSE {
                                let mut e = ErrorCodeAttribute::default();
                                if e.get_from(&m).is_ok() {
                                    c.lock().unwrap().push(e.code.0);
                                }
                            } else if m.typ.class == CLASS_SUCCESS_RESPONSE {
                                *s.lock().unwrap() += 1;
                            }
                        }
                        if let Some(to) = client {
                            let _ = front.send_to(&b[..n], to).await;
                        }
                    }
                }
            }
        });
        Tap {
            addr,
            codes,
            successes,
            _task: task,
        }
    }
}

/// Attributes a raw request may carry.
#[derive(Clone, Debug)]
pub enum Attr {
    Transport(u8),
    Lifetime(u32),
    Peer(SocketAddr),
    Channel(u16),
    Raw(u16, Vec<u8>),
}

enum Link {
    Udp(UdpSocket),
    Tcp(TcpStream, Vec<u8>),
}

/// A STUN/TURN client speaking raw messages (built with the `stun` and `turn` crates'
/// attribute types) over UDP or TCP, for exact checks of error codes and lifetimes.
pub struct RawClient {
    link: Link,
    server: SocketAddr,
    pub username: String,
    password: String,
    realm: String,
    nonce: Option<String>,
}

/// The ERROR-CODE of a response, if it is an error.
pub fn code(m: &Message) -> Option<u16> {
    let mut e = ErrorCodeAttribute::default();
    e.get_from(m).ok().map(|_| e.code.0)
}

pub fn lifetime(m: &Message) -> u64 {
    let mut l = Lifetime::default();
    l.get_from(m).expect("LIFETIME");
    l.0.as_secs()
}

pub fn relayed(m: &Message) -> SocketAddr {
    let mut r = RelayedAddress::default();
    r.get_from(m).expect("XOR-RELAYED-ADDRESS");
    SocketAddr::new(r.ip, r.port)
}

impl RawClient {
    pub async fn udp(server: SocketAddr, username: &str, password: &str) -> RawClient {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        RawClient::with(Link::Udp(sock), server, username, password)
    }

    /// Over a UDP socket made elsewhere (in another network namespace, say).
    pub fn udp_socket(
        sock: std::net::UdpSocket,
        server: SocketAddr,
        username: &str,
        password: &str,
    ) -> RawClient {
        sock.set_nonblocking(true).unwrap();
        let sock = UdpSocket::from_std(sock).unwrap();
        RawClient::with(Link::Udp(sock), server, username, password)
    }

    pub async fn tcp(server: SocketAddr, username: &str, password: &str) -> RawClient {
        let s = TcpStream::connect(server).await.unwrap();
        RawClient::with(Link::Tcp(s, Vec::new()), server, username, password)
    }

    fn with(link: Link, server: SocketAddr, username: &str, password: &str) -> RawClient {
        RawClient {
            link,
            server,
            username: username.into(),
            password: password.into(),
            realm: REALM.into(),
            nonce: None,
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        match &self.link {
            Link::Udp(s) => s.local_addr().unwrap(),
            Link::Tcp(s, _) => s.local_addr().unwrap(),
        }
    }

    fn build(&self, method: Method, class: MessageClass, attrs: &[Attr], auth: bool) -> Message {
        let mut setters: Vec<Box<dyn Setter>> = vec![
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(method, class)),
        ];
        for a in attrs {
            setters.push(match a.clone() {
                Attr::Transport(p) => Box::new(RequestedTransport {
                    protocol: turn::proto::Protocol(p),
                }),
                Attr::Lifetime(s) => Box::new(Lifetime(Duration::from_secs(s.into()))),
                Attr::Peer(p) => Box::new(PeerAddress {
                    ip: p.ip(),
                    port: p.port(),
                }),
                Attr::Channel(n) => Box::new(ChannelNumber(n)),
                Attr::Raw(t, v) => Box::new(RawAttr(t, v)),
            });
        }
        if auth && let Some(nonce) = &self.nonce {
            setters.push(Box::new(TextAttribute::new(
                ATTR_USERNAME,
                self.username.clone(),
            )));
            setters.push(Box::new(TextAttribute::new(ATTR_REALM, self.realm.clone())));
            setters.push(Box::new(TextAttribute::new(ATTR_NONCE, nonce.clone())));
            setters.push(Box::new(MessageIntegrity::new_long_term_integrity(
                self.username.clone(),
                self.realm.clone(),
                self.password.clone(),
            )));
        }
        setters.push(Box::new(FINGERPRINT));
        let mut m = Message::new();
        m.build(&setters).expect("build request");
        m
    }

    pub async fn send_raw(&mut self, b: &[u8]) {
        match &mut self.link {
            Link::Udp(s) => {
                s.send_to(b, self.server).await.unwrap();
            }
            Link::Tcp(s, _) => s.write_all(b).await.unwrap(),
        }
    }

    /// The next packet from the server (a STUN message or ChannelData).
    pub async fn recv_raw(&mut self, within: Duration) -> Option<Vec<u8>> {
        match &mut self.link {
            Link::Udp(s) => {
                let mut buf = vec![0u8; 65536];
                let (n, _) = timeout(within, s.recv_from(&mut buf)).await.ok()?.ok()?;
                Some(buf[..n].to_vec())
            }
            Link::Tcp(s, pending) => {
                let deadline = Instant::now() + within;
                loop {
                    if pending.len() >= 4 {
                        let len = u16::from_be_bytes([pending[2], pending[3]]) as usize;
                        let total = if pending[0] & 0xC0 == 0 {
                            20 + len
                        } else {
                            (4 + len + 3) & !3
                        };
                        if pending.len() >= total {
                            let frame: Vec<u8> = pending.drain(..total).collect();
                            return Some(frame);
                        }
                    }
                    let mut buf = [0u8; 4096];
                    let left = deadline.saturating_duration_since(Instant::now());
                    let n = timeout(left, s.read(&mut buf)).await.ok()?.ok()?;
                    if n == 0 {
                        return None;
                    }
                    pending.extend_from_slice(&buf[..n]);
                }
            }
        }
    }

    /// Sends a request and returns the final response, answering the 401/438 challenge.
    pub async fn request(&mut self, method: Method, attrs: &[Attr]) -> Message {
        for _ in 0..3 {
            let req = self.build(method, CLASS_REQUEST, attrs, true);
            self.send_raw(&req.raw).await;
            let resp = loop {
                let raw = self
                    .recv_raw(Duration::from_secs(3))
                    .await
                    .expect("a response within 3 s");
                let mut m = Message::new();
                m.raw = raw;
                if m.decode().is_ok() && m.transaction_id == req.transaction_id {
                    break m;
                }
            };
            let c = code(&resp);
            let challenged = (c == Some(401) && self.nonce.is_none()) || c == Some(438);
            if challenged {
                let nonce = TextAttribute::get_from_as(&resp, ATTR_NONCE).expect("NONCE");
                let realm = TextAttribute::get_from_as(&resp, ATTR_REALM).expect("REALM");
                self.nonce = Some(nonce.text);
                self.realm = realm.text;
                continue;
            }
            return resp;
        }
        panic!("challenge loop did not settle");
    }

    pub async fn allocate(&mut self) -> Message {
        self.request(METHOD_ALLOCATE, &[Attr::Transport(17)]).await
    }

    /// A Send indication carrying `data` to `peer`.
    pub async fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) {
        let mut m = self.build(METHOD_SEND, CLASS_INDICATION, &[Attr::Peer(peer)], false);
        // DATA after the peer address, rebuilt without FINGERPRINT for simplicity.
        let mut m2 = Message::new();
        m2.build(&[
            Box::new(m.transaction_id),
            Box::new(MessageType::new(METHOD_SEND, CLASS_INDICATION)),
            Box::new(PeerAddress {
                ip: peer.ip(),
                port: peer.port(),
            }),
            Box::new(Data(data.to_vec())),
        ])
        .unwrap();
        m = m2;
        self.send_raw(&m.raw).await;
    }

    /// Binds `channel` to `peer`; the binding must succeed.
    pub async fn bind_channel(&mut self, channel: u16, peer: SocketAddr) {
        let r = self
            .request(
                METHOD_CHANNEL_BIND,
                &[Attr::Channel(channel), Attr::Peer(peer)],
            )
            .await;
        assert_eq!(code(&r), None, "channel {channel:#x} bound to {peer}: {r}");
    }

    /// ChannelData on `channel`.
    pub async fn channel_data(&mut self, channel: u16, data: &[u8]) {
        let mut b = channel.to_be_bytes().to_vec();
        b.extend_from_slice(&(data.len() as u16).to_be_bytes());
        b.extend_from_slice(data);
        while !b.len().is_multiple_of(4) {
            b.push(0);
        }
        self.send_raw(&b).await;
    }
}

struct RawAttr(u16, Vec<u8>);

impl Setter for RawAttr {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        m.add(AttrType(self.0), &self.1);
        Ok(())
    }
}

/// A non-loopback IPv4 address of this host that the test itself creates (on a veth pair
/// of its own; the kernel here has no dummy interfaces), so "another host" traffic never depends on, or
/// reaches, the machine's real interfaces. Removed on drop. Needs root (CI runs as root).
pub struct TestAddr {
    pub ip: std::net::IpAddr,
    ifname: String,
}

impl TestAddr {
    pub fn create() -> TestAddr {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() % 50) * 5 + n % 5;
        let ifname = format!("mgturn{id}");
        let ip: std::net::IpAddr = format!("10.213.{id}.1").parse().expect("ip");
        let run = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .expect("run ip");
            assert!(
                out.status.success(),
                "ip {}: {} (this test needs root to create a veth interface)",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &ifname])
            .output();
        run(&[
            "link",
            "add",
            &ifname,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{ifname}p"),
        ]);
        run(&["addr", "add", &format!("{ip}/32"), "dev", &ifname]);
        run(&["link", "set", &ifname, "up"]);
        TestAddr { ip, ifname }
    }
}

impl Drop for TestAddr {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.ifname])
            .output();
    }
}

/// The value of the sample `name` (with its labels, if any) in a /metrics text; 0 if absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The XOR-PEER-ADDRESS and DATA of a Data indication.
pub fn data_indication(raw: &[u8]) -> Option<(std::net::SocketAddr, Vec<u8>)> {
    let mut m = Message::new();
    m.raw = raw.to_vec();
    m.decode().ok()?;
    if m.typ != MessageType::new(METHOD_DATA, CLASS_INDICATION) {
        return None;
    }
    let mut p = PeerAddress::default();
    p.get_from(&m).ok()?;
    let mut d = Data::default();
    d.get_from(&m).ok()?;
    Some((std::net::SocketAddr::new(p.ip, p.port), d.0))
}

/// Data indications received within `within`.
pub async fn collect(c: &mut RawClient, within: Duration) -> Vec<(std::net::SocketAddr, Vec<u8>)> {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return got;
        }
        match c.recv_raw(left).await {
            Some(raw) => got.extend(data_indication(&raw)),
            None => return got,
        }
    }
}
