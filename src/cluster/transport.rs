//! The peer protocol's wire: chitchat's gossip messages inside an authenticated frame.
//!
//! Frame: `MGC2` | epoch (u64, the sender's start, random) | counter (u64, +1 per frame)
//! | sent-at (u64, Unix ms) | from (the sender's advertised address) | to (the address
//! it sent the frame to) | chitchat message | HMAC-SHA256 over everything before it; an
//! address is 16 bytes of IPv6 (IPv4 mapped) and a big-endian port.
//! A receiver drops (and counts) a frame whose MAC is wrong (`bad_mac`), that is too
//! short (`malformed`), that was sent more than [`MAX_AGE`] ago or ahead (`stale`), that
//! was addressed to another replica (`misdirected`: `to` is neither this replica's
//! `listen` nor its `advertise` address, so a frame captured on its way to one peer is
//! worth nothing at another), or whose (sender epoch, counter) it has already accepted,
//! that carries this process's own epoch (its frames reflected back), or that is older
//! than its window of [`WINDOW`] counters (`replay`). The replay state is bounded
//! ([`MAX_SENDERS`] sender epochs). chitchat answers the authenticated `from` address,
//! never the datagram's source: whoever re-sends a frame from elsewhere gets nothing.
//!
//! chitchat serialises its messages only inside the crate, so this transport lets two of
//! chitchat's own loopback UDP sockets do the (de)serialisation: an outgoing message is
//! sent by one to a private loopback socket, whose bytes are framed and sent to the
//! peer; a verified incoming payload is sent to the other, which decodes it. Both hops
//! stay on 127.0.0.1 inside this process.

use super::metrics::ClusterMetrics;
pub use super::metrics::Reject;
use anyhow::Context;
use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket as CodecSocket};
use ring::hmac;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const MAGIC: &[u8; 4] = b"MGC2";
/// An address in a frame: IPv6 (IPv4 mapped) and port.
const ADDR: usize = 16 + 2;
const HEADER: usize = 4 + 8 + 8 + 8 + ADDR + ADDR;
const MAC_LEN: usize = 32;
/// Largest frame; chitchat's own limit for a message is below it.
const MAX_FRAME: usize = 65_507;
/// Frames sent longer ago (or further ahead) than this are dropped as stale.
pub const MAX_AGE: Duration = Duration::from_secs(30);
/// Counters accepted out of order behind the highest one seen from a sender.
pub const WINDOW: u64 = 64;
/// Senders whose replay window is kept; the least recently heard one is forgotten first.
pub const MAX_SENDERS: usize = 256;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn put_addr(frame: &mut Vec<u8>, a: SocketAddr) {
    let ip = match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&a.port().to_be_bytes());
}

fn get_addr(b: &[u8]) -> SocketAddr {
    let ip: [u8; 16] = b[..16].try_into().expect("16 bytes");
    let port = u16::from_be_bytes([b[16], b[17]]);
    SocketAddr::new(Ipv6Addr::from(ip).to_canonical(), port)
}

/// The same address whatever its spelling (IPv4 or IPv4-mapped IPv6).
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Who sends a frame and whom it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The sender's advertised address: where an answer goes.
    pub from: SocketAddr,
    /// The address the sender sent the frame to.
    pub to: SocketAddr,
}

/// Builds one frame around `payload`.
pub fn seal(
    key: &[u8],
    epoch: u64,
    counter: u64,
    sent_ms: u64,
    route: Route,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER + payload.len() + MAC_LEN);
    frame.extend_from_slice(MAGIC);
    frame.extend_from_slice(&epoch.to_be_bytes());
    frame.extend_from_slice(&counter.to_be_bytes());
    frame.extend_from_slice(&sent_ms.to_be_bytes());
    put_addr(&mut frame, route.from);
    put_addr(&mut frame, route.to);
    frame.extend_from_slice(payload);
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), &frame);
    frame.extend_from_slice(tag.as_ref());
    frame
}

#[derive(Debug)]
struct Window {
    highest: u64,
    /// Bit i: counter `highest - i` was accepted.
    seen: u64,
    last_used: u64,
}

/// Replay protection: a sliding window of counters per sender epoch (a random number
/// each sender picks at start, so a frame replayed from another address is still
/// recognised), and this process's own epoch refused outright (its frames reflected
/// back at it).
#[derive(Debug, Default)]
pub struct ReplayGuard {
    own: u64,
    senders: HashMap<u64, Window>,
    tick: u64,
}

impl ReplayGuard {
    pub fn new(own_epoch: u64) -> Self {
        ReplayGuard {
            own: own_epoch,
            ..Default::default()
        }
    }

    /// Accepts (and records) or refuses one (epoch, counter).
    pub fn check(&mut self, epoch: u64, counter: u64) -> bool {
        if epoch == self.own {
            return false;
        }
        self.tick += 1;
        let tick = self.tick;
        if !self.senders.contains_key(&epoch)
            && self.senders.len() >= MAX_SENDERS
            && let Some(oldest) = self
                .senders
                .iter()
                .min_by_key(|(_, w)| w.last_used)
                .map(|(e, _)| *e)
        {
            self.senders.remove(&oldest);
        }
        let Some(w) = self.senders.get_mut(&epoch) else {
            self.senders.insert(
                epoch,
                Window {
                    highest: counter,
                    seen: 1,
                    last_used: tick,
                },
            );
            return true;
        };
        w.last_used = tick;
        if counter > w.highest {
            let shift = counter - w.highest;
            w.seen = if shift >= 64 { 0 } else { w.seen << shift };
            w.seen |= 1;
            w.highest = counter;
            return true;
        }
        let back = w.highest - counter;
        if back >= WINDOW {
            return false;
        }
        let bit = 1u64 << back;
        if w.seen & bit != 0 {
            return false;
        }
        w.seen |= bit;
        true
    }
}

/// Checks one frame received by the replica reachable at `me` (its `listen` and
/// `advertise` addresses); returns the sender's address and the chitchat payload.
pub fn open<'a>(
    key: &[u8],
    guard: &mut ReplayGuard,
    me: &[SocketAddr],
    frame: &'a [u8],
    now_ms: u64,
) -> Result<(SocketAddr, &'a [u8]), Reject> {
    if frame.len() < HEADER + MAC_LEN || &frame[..4] != MAGIC {
        return Err(Reject::Malformed);
    }
    let (body, tag) = frame.split_at(frame.len() - MAC_LEN);
    // Constant-time comparison inside ring.
    if hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, key), body, tag).is_err() {
        return Err(Reject::BadMac);
    }
    let u64_at = |i: usize| u64::from_be_bytes(body[i..i + 8].try_into().expect("8 bytes"));
    let (epoch, counter, sent) = (u64_at(4), u64_at(12), u64_at(20));
    if sent.abs_diff(now_ms) > MAX_AGE.as_millis() as u64 {
        return Err(Reject::Stale);
    }
    let from = get_addr(&body[28..28 + ADDR]);
    let to = get_addr(&body[28 + ADDR..HEADER]);
    if !me.iter().any(|m| canonical(*m) == to) {
        return Err(Reject::Misdirected);
    }
    if !guard.check(epoch, counter) {
        return Err(Reject::Replay);
    }
    Ok((from, &body[HEADER..]))
}

/// A chitchat [`Transport`] that authenticates every message with the cluster secret.
///
/// `advertise` is this replica's address as its peers know it (the `from` of its
/// frames); frames addressed to neither it nor the socket's own address are refused.
/// The peer socket is bound (or handed over from the member this one replaces) by the
/// caller, so that opening cannot fail on a port in use. Nothing is read or sent before
/// `start` fires, and nothing after `stop`: a member prepared by a reload stays inert
/// until the reload commits, and the member it replaces goes quiet first.
pub struct HmacTransport {
    pub key: Arc<[u8]>,
    pub advertise: SocketAddr,
    pub metrics: ClusterMetrics,
    pub socket: Arc<UdpSocket>,
    pub start: CancellationToken,
    pub stop: CancellationToken,
}

#[async_trait]
impl Transport for HmacTransport {
    async fn open(&self, _listen: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let outer = self.socket.clone();
        let local = outer.local_addr()?;
        let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
        let encoder = CodecSocket::open(loopback).await?;
        let sink = UdpSocket::bind(loopback).await?;
        let decoder = CodecSocket::open(loopback).await?;
        let feeder = UdpSocket::bind(loopback).await?;
        let (tx, rx) = mpsc::channel(64);
        let epoch = rand::random::<u64>() >> 1 | (now_ms() << 20);
        let start = self.start.clone();
        let stop = self.stop.clone();
        // A wildcard `listen` names no replica: only `advertise` does then.
        let me: Vec<SocketAddr> = [local, self.advertise]
            .into_iter()
            .filter(|a| !a.ip().is_unspecified())
            .collect();
        let receiver = receive(
            outer.clone(),
            me,
            self.key.clone(),
            self.metrics.clone(),
            decoder,
            feeder,
            tx,
            epoch,
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = async { start.cancelled().await; receiver.await } => {}
            }
        });
        Ok(Box::new(HmacSocket {
            outer,
            local,
            key: self.key.clone(),
            advertise: self.advertise,
            metrics: self.metrics.clone(),
            sink_addr: sink.local_addr()?,
            encoder_addr: encoder.local_addr()?,
            encoder,
            sink,
            epoch,
            counter: 0,
            incoming: rx,
            buf: vec![0; MAX_FRAME],
            start: self.start.clone(),
            stop: self.stop.clone(),
        }))
    }
}

struct HmacSocket {
    outer: Arc<UdpSocket>,
    local: SocketAddr,
    key: Arc<[u8]>,
    advertise: SocketAddr,
    metrics: ClusterMetrics,
    encoder: CodecSocket,
    encoder_addr: SocketAddr,
    sink: UdpSocket,
    sink_addr: SocketAddr,
    epoch: u64,
    counter: u64,
    incoming: mpsc::Receiver<RecvOutcome>,
    buf: Vec<u8>,
    start: CancellationToken,
    stop: CancellationToken,
}

#[async_trait]
impl Socket for HmacSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.local)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        // Prepared but not started, or replaced: silent.
        if !self.start.is_cancelled() || self.stop.is_cancelled() {
            return Ok(SendOutcome { num_bytes_sent: 0 });
        }
        // Leftovers of a cancelled send would be sent to the wrong peer: drop them.
        while self.sink.try_recv_from(&mut self.buf).is_ok() {}
        self.encoder.send(self.sink_addr, envelope).await?;
        let n = loop {
            let (n, from) =
                tokio::time::timeout(Duration::from_secs(1), self.sink.recv_from(&mut self.buf))
                    .await
                    .context("cluster: local encoder did not answer")??;
            if from == self.encoder_addr {
                break n;
            }
        };
        self.counter += 1;
        let frame = seal(
            &self.key,
            self.epoch,
            self.counter,
            now_ms(),
            Route {
                from: self.advertise,
                to,
            },
            &self.buf[..n],
        );
        // A peer that is away is no reason to stop gossiping with the others.
        match self.outer.send_to(&frame, to).await {
            Ok(_) => {
                self.metrics.sent.inc();
            }
            Err(e) => tracing::debug!(peer = %to, error = %e, "cluster: send failed"),
        }
        Ok(SendOutcome {
            num_bytes_sent: frame.len(),
        })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        match self.incoming.recv().await {
            Some(m) => Ok(m),
            // Stopped on purpose: chitchat's loop ends by its own shutdown, quietly.
            None if self.stop.is_cancelled() => std::future::pending().await,
            None => anyhow::bail!("cluster: receive task stopped"),
        }
    }
}

/// Reads frames, checks them, and has chitchat's decoder turn valid payloads into
/// envelopes, attributed to the authenticated sender (chitchat answers that address).
#[allow(clippy::too_many_arguments)]
async fn receive(
    outer: Arc<UdpSocket>,
    me: Vec<SocketAddr>,
    key: Arc<[u8]>,
    metrics: ClusterMetrics,
    mut decoder: CodecSocket,
    feeder: UdpSocket,
    tx: mpsc::Sender<RecvOutcome>,
    epoch: u64,
) {
    let mut guard = ReplayGuard::new(epoch);
    let mut buf = vec![0u8; MAX_FRAME];
    let Ok(decoder_addr) = decoder.local_addr() else {
        return;
    };
    let Ok(feeder_addr) = feeder.local_addr() else {
        return;
    };
    loop {
        let (n, _source) = match outer.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "cluster: recv error");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (from, payload) = match open(&key, &mut guard, &me, &buf[..n], now_ms()) {
            Ok(p) => p,
            Err(r) => {
                metrics.rejected(r);
                continue;
            }
        };
        if feeder.send_to(payload, decoder_addr).await.is_err() {
            continue;
        }
        match tokio::time::timeout(Duration::from_millis(200), decoder.recv()).await {
            Ok(Ok(outcome)) if outcome.from_addr == feeder_addr => {
                metrics.received.inc();
                let out = RecvOutcome {
                    from_addr: from,
                    envelope: outcome.envelope,
                    num_bytes_received: n,
                };
                if tx.send(out).await.is_err() {
                    return;
                }
            }
            _ => metrics.rejected(Reject::Malformed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "10.0.0.1:7946";
    const B: &str = "10.0.0.2:7946";
    const C: &str = "10.0.0.3:7946";

    fn route(from: &str, to: &str) -> Route {
        Route {
            from: from.parse().unwrap(),
            to: to.parse().unwrap(),
        }
    }

    #[test]
    fn frames_verify_and_replays_are_refused() {
        let key = b"0123456789abcdef";
        let me: [SocketAddr; 1] = [B.parse().unwrap()];
        let mut g = ReplayGuard::new(77);
        let now = now_ms();
        let ab = route(A, B);
        let f1 = seal(key, 5, 1, now, ab, b"hello");
        assert_eq!(
            open(key, &mut g, &me, &f1, now),
            Ok((ab.from, &b"hello"[..]))
        );
        assert_eq!(open(key, &mut g, &me, &f1, now), Err(Reject::Replay));
        let f3 = seal(key, 5, 3, now, ab, b"x");
        let f2 = seal(key, 5, 2, now, ab, b"y");
        assert!(open(key, &mut g, &me, &f3, now).is_ok());
        assert!(
            open(key, &mut g, &me, &f2, now).is_ok(),
            "reordered within the window"
        );
        let mine = seal(key, 77, 100, now, ab, b"z");
        assert_eq!(
            open(key, &mut g, &me, &mine, now),
            Err(Reject::Replay),
            "own frame reflected back"
        );
        let far = seal(key, 5, 200, now, ab, b"z");
        assert!(open(key, &mut g, &me, &far, now).is_ok());
        let behind = seal(key, 5, 100, now, ab, b"z");
        assert_eq!(
            open(key, &mut g, &me, &behind, now),
            Err(Reject::Replay),
            "behind the window"
        );
        let mut bad = seal(key, 5, 209, now, ab, b"hello");
        bad[HEADER] ^= 1;
        assert_eq!(open(key, &mut g, &me, &bad, now), Err(Reject::BadMac));
        let other = seal(b"another-secret!!", 5, 210, now, ab, b"hello");
        assert_eq!(open(key, &mut g, &me, &other, now), Err(Reject::BadMac));
        let stale = seal(key, 5, 211, now - 60_000, ab, b"hello");
        assert_eq!(open(key, &mut g, &me, &stale, now), Err(Reject::Stale));
        assert_eq!(open(key, &mut g, &me, b"junk", now), Err(Reject::Malformed));
    }

    #[test]
    fn a_frame_for_another_replica_is_refused_and_leaves_no_trace() {
        let key = b"0123456789abcdef";
        let now = now_ms();
        // A sends counter 1 to C; an attacker replays it to B.
        let to_c = seal(key, 5, 1, now, route(A, C), b"hello");
        let me_b: [SocketAddr; 2] = ["127.0.0.1:7946".parse().unwrap(), B.parse().unwrap()];
        let mut g = ReplayGuard::new(77);
        assert_eq!(
            open(key, &mut g, &me_b, &to_c, now),
            Err(Reject::Misdirected)
        );
        // The refused frame took no place in the window: A's genuine frame 1 to B passes.
        let to_b = seal(key, 5, 1, now, route(A, B), b"hello");
        assert!(open(key, &mut g, &me_b, &to_b, now).is_ok());
        // An IPv4 destination written as IPv4-mapped IPv6 is the same address.
        let mapped: SocketAddr = "[::ffff:10.0.0.2]:7946".parse().unwrap();
        let f = seal(key, 5, 2, now, route(A, &mapped.to_string()), b"x");
        assert!(open(key, &mut g, &me_b, &f, now).is_ok());
        // The answer goes to the authenticated sender, IPv6 included.
        let v6 = route("[2001:db8::1]:7946", B);
        let f = seal(key, 6, 1, now, v6, b"x");
        assert_eq!(
            open(key, &mut g, &me_b, &f, now).map(|(f, _)| f),
            Ok(v6.from)
        );
    }
}
