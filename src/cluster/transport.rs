//! The peer protocol's wire: chitchat's gossip messages inside an authenticated frame.
//!
//! Frame: `MGC1` | epoch (u64, the sender's start, random) | counter (u64, +1 per frame)
//! | sent-at (u64, Unix ms) | chitchat message | HMAC-SHA256 over everything before it.
//! A receiver drops (and counts) a frame whose MAC is wrong (`bad_mac`), that is too
//! short (`malformed`), that was sent more than [`MAX_AGE`] ago or ahead (`stale`), or
//! whose (sender epoch, counter) it has already accepted, that carries this process's
//! own epoch (its frames reflected back), or that is older than its window of [`WINDOW`]
//! counters (`replay`). The replay state is bounded ([`MAX_SENDERS`] sender epochs).
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
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const MAGIC: &[u8; 4] = b"MGC1";
const HEADER: usize = 4 + 8 + 8 + 8;
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

/// Builds one frame around `payload`.
pub fn seal(key: &[u8], epoch: u64, counter: u64, sent_ms: u64, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER + payload.len() + MAC_LEN);
    frame.extend_from_slice(MAGIC);
    frame.extend_from_slice(&epoch.to_be_bytes());
    frame.extend_from_slice(&counter.to_be_bytes());
    frame.extend_from_slice(&sent_ms.to_be_bytes());
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

/// Checks one frame; returns the chitchat payload.
pub fn open<'a>(
    key: &[u8],
    guard: &mut ReplayGuard,
    frame: &'a [u8],
    now_ms: u64,
) -> Result<&'a [u8], Reject> {
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
    if !guard.check(epoch, counter) {
        return Err(Reject::Replay);
    }
    Ok(&body[HEADER..])
}

/// A chitchat [`Transport`] that authenticates every message with the cluster secret.
///
/// The peer socket is bound (or handed over from the member this one replaces) by the
/// caller, so that opening cannot fail on a port in use. Nothing is read or sent before
/// `start` fires, and nothing after `stop`: a member prepared by a reload stays inert
/// until the reload commits, and the member it replaces goes quiet first.
pub struct HmacTransport {
    pub key: Arc<[u8]>,
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
        let receiver = receive(
            outer.clone(),
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
/// envelopes, attributed to the real sender.
async fn receive(
    outer: Arc<UdpSocket>,
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
        let (n, from) = match outer.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "cluster: recv error");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let payload = match open(&key, &mut guard, &buf[..n], now_ms()) {
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

    #[test]
    fn frames_verify_and_replays_are_refused() {
        let key = b"0123456789abcdef";
        let mut g = ReplayGuard::new(77);
        let now = now_ms();
        let f1 = seal(key, 5, 1, now, b"hello");
        assert_eq!(open(key, &mut g, &f1, now), Ok(&b"hello"[..]));
        assert_eq!(open(key, &mut g, &f1, now), Err(Reject::Replay));
        let f3 = seal(key, 5, 3, now, b"x");
        let f2 = seal(key, 5, 2, now, b"y");
        assert!(open(key, &mut g, &f3, now).is_ok());
        assert!(
            open(key, &mut g, &f2, now).is_ok(),
            "reordered within the window"
        );
        let mine = seal(key, 77, 100, now, b"z");
        assert_eq!(
            open(key, &mut g, &mine, now),
            Err(Reject::Replay),
            "own frame reflected back"
        );
        let far = seal(key, 5, 200, now, b"z");
        assert!(open(key, &mut g, &far, now).is_ok());
        let behind = seal(key, 5, 100, now, b"z");
        assert_eq!(
            open(key, &mut g, &behind, now),
            Err(Reject::Replay),
            "behind the window"
        );
        let mut bad = seal(key, 5, 209, now, b"hello");
        bad[HEADER] ^= 1;
        assert_eq!(open(key, &mut g, &bad, now), Err(Reject::BadMac));
        let other = seal(b"another-secret!!", 5, 210, now, b"hello");
        assert_eq!(open(key, &mut g, &other, now), Err(Reject::BadMac));
        let stale = seal(key, 5, 211, now - 60_000, b"hello");
        assert_eq!(open(key, &mut g, &stale, now), Err(Reject::Stale));
        assert_eq!(open(key, &mut g, b"junk", now), Err(Reject::Malformed));
    }
}
