//! TURN over DTLS (RFC 7350, `turns:HOST:PORT?transport=udp`): a `dtls` listener's UDP
//! socket, demultiplexed per client address into DTLS 1.2 sessions and served to the
//! `turn` crate as one packet connection, like `TcpTransport`.
//!
//! DTLS is webrtc-rs's `dtls` crate (the crate formerly published as `webrtc-dtls`), the
//! release line of the `turn` and `webrtc-util` crates already in use: a session is a
//! `DTLSConn` over a small per-client [`webrtc_util::Conn`] ([`SessionConn`]) fed by the
//! demultiplexer. Each decrypted record (one STUN message or ChannelData) comes out of
//! [`DtlsTransport`]'s `recv_from` with the client's address as source; `send_to(addr)`
//! queues the frame on that session's writer (bounded, drops counted as
//! `client_backpressure`). A closed session is reported so that its allocation is
//! deleted, as for TCP.
//!
//! What an outside party can hold is bounded: a datagram from an unknown address opens a
//! session only if it is a DTLS ClientHello, at most [`MAX_HANDSHAKES`] handshakes run at
//! once and each must complete within [`HANDSHAKE_TIMEOUT`], at most
//! `turn.quota.max_dtls_sessions` sessions exist over all `dtls` listeners, a session
//! must make an allocation within 30 s and is closed after 10 minutes without a record.
//! Queues towards a session are bounded (64 datagrams of at most 8 KiB from the client,
//! 512 frames towards it); what overflows is dropped and counted. Every
//! close the server decides is counted in `mediagate_turn_dtls_closed_total{reason}`.
//! A new ClientHello (epoch 0) from the address of an established session replaces that
//! session (a client that restarted on the same port).
//!
//! [`DtlsCert`] is the listener's certificate: `cert` (PEM chain) and `key` (PEM, ECDSA
//! P-256 in PKCS#8 or SEC1, or Ed25519 in PKCS#8: the `dtls` crate signs with these only),
//! polled like the TLS certificate and swapped for new handshakes; established sessions
//! and their allocations are untouched.

use ::dtls::config::{Config as DtlsConfig, ExtendedMasterSecretType};
use ::dtls::conn::DTLSConn;
use ::dtls::crypto::{Certificate, CryptoPrivateKey, CryptoPrivateKeyKind};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use webrtc_util::Conn;

use super::datapath::ClientSink;
use super::metrics::{DropReason, DtlsClose, TurnMetrics};
use super::ratelog::RateLimit;
use super::transport::{TCP_ALLOCATE_TIMEOUT, count_to_client, not_applicable};

/// DTLS handshakes running at once per listener; further ClientHellos are dropped (the
/// client retransmits after a second).
pub(crate) const MAX_HANDSHAKES: usize = 256;
/// A handshake must complete within this time.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A session that receives nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Datagrams queued from the socket towards one session's DTLS layer (at most
/// [`MAX_DATAGRAM`] bytes each: 512 KiB per session at worst).
const INBOUND_QUEUE: usize = 64;
/// Largest datagram handed to a session: the `dtls` crate reads at most 8 KiB.
const MAX_DATAGRAM: usize = 8192;
/// Frames queued towards one client before further ones are dropped.
const SEND_QUEUE: usize = 512;
/// Largest UDP datagram read from the socket.
const DATAGRAM: usize = 65536;
/// Largest decrypted record (the `dtls` crate reads datagrams of at most 8 KiB).
const RECORD: usize = 16384;

/// A DTLS record header (13 bytes) followed by a handshake header whose type is
/// ClientHello (1). `epoch0`: the record is from epoch 0 (a new handshake).
fn is_client_hello(b: &[u8]) -> bool {
    b.len() >= 25 && b[0] == 22 && b[1] == 0xfe && b[3] == 0 && b[4] == 0 && b[13] == 1
}

/// An Allocate success response (type 0x0103) on its way to a client.
fn is_allocate_success(b: &[u8]) -> bool {
    b.len() >= 20 && b[0] == 0x01 && b[1] == 0x03
}

// ---------------------------------------------------------------------------------------
// Certificates

/// The DER of a PKCS#8 document wrapping a SEC1 P-256 private key.
fn sec1_p256_to_pkcs8(sec1: &[u8]) -> Vec<u8> {
    fn der_len(n: usize, out: &mut Vec<u8>) {
        if n < 0x80 {
            out.push(n as u8);
        } else if n <= 0xff {
            out.extend([0x81, n as u8]);
        } else {
            out.extend([0x82, (n >> 8) as u8, n as u8]);
        }
    }
    // version 0, AlgorithmIdentifier { id-ecPublicKey, prime256v1 }
    const HEAD: [u8; 24] = [
        0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
        0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ];
    let mut octets = vec![0x04];
    der_len(sec1.len(), &mut octets);
    octets.extend_from_slice(sec1);
    let mut out = vec![0x30];
    der_len(HEAD.len() + octets.len(), &mut out);
    out.extend_from_slice(&HEAD);
    out.extend_from_slice(&octets);
    out
}

/// A private key the `dtls` crate can sign with, from PKCS#8 DER.
fn private_key(pkcs8: Vec<u8>) -> Result<CryptoPrivateKey, String> {
    if let Ok(k) = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        &pkcs8,
        &SystemRandom::new(),
    ) {
        return Ok(CryptoPrivateKey {
            kind: CryptoPrivateKeyKind::Ecdsa256(k),
            serialized_der: pkcs8,
        });
    }
    if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8) {
        return Ok(CryptoPrivateKey {
            kind: CryptoPrivateKeyKind::Ed25519(k),
            serialized_der: pkcs8,
        });
    }
    Err("a dtls listener needs an ECDSA P-256 or Ed25519 private key, not RSA".to_string())
}

/// Reads a certificate chain and its key for DTLS.
fn load(cert: &Path, key: &Path) -> Result<Certificate, String> {
    let pem = crate::tlsclient::read_pem_file(cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no PEM certificate in the file",
            cert.display()
        ));
    }
    let key_pem = crate::tlsclient::read_pem_file(key)?;
    let der =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| format!("{}: {e}", key.display()))?;
    let pkcs8 = match der {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Sec1(k) => sec1_p256_to_pkcs8(k.secret_sec1_der()),
        _ => {
            return Err(format!(
                "{}: a dtls listener needs an ECDSA P-256 or Ed25519 private key (PKCS#8 or SEC1), not RSA",
                key.display()
            ));
        }
    };
    let private_key = private_key(pkcs8).map_err(|e| format!("{}: {e}", key.display()))?;
    Ok(Certificate {
        certificate: chain,
        private_key,
    })
}

/// The certificate of one `dtls` listener, swappable while sessions run.
pub(crate) struct DtlsCert {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<Certificate>,
}

impl DtlsCert {
    /// Loads the files; fails (with the file named) when they do not hold a certificate
    /// chain and a key the `dtls` crate can use.
    pub(crate) fn load(cert: &Path, key: &Path) -> Result<Arc<DtlsCert>, String> {
        let c = load(cert, key)?;
        Ok(Arc::new(DtlsCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: ArcSwap::from_pointee(c),
        }))
    }

    /// The configuration of one new server handshake, with the current certificate.
    fn config(&self) -> DtlsConfig {
        DtlsConfig {
            certificates: vec![(**self.current.load()).clone()],
            extended_master_secret: ExtendedMasterSecretType::Request,
            ..Default::default()
        }
    }

    /// Polls the files until `stop` and loads them again when they change.
    pub(crate) async fn watch(self: Arc<Self>, metrics: TurnMetrics, stop: CancellationToken) {
        let (cert, key, current) = (&self.cert, &self.key, &self.current);
        super::tls::watch_files(cert, key, current, load, "DTLS", metrics, stop).await
    }
}

// ---------------------------------------------------------------------------------------
// One client's datagrams, as the DTLS layer's connection

/// The datagrams of one client address, as the `Conn` a `DTLSConn` runs over: reads come
/// from the demultiplexer, writes go out of the listener socket to the client.
struct SessionConn {
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    inbound: Mutex<mpsc::Receiver<Bytes>>,
}

impl SessionConn {
    async fn next(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        let mut rx = self.inbound.lock().await;
        match rx.recv().await {
            Some(d) => {
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                Ok(n)
            }
            // The session is gone: the DTLS reader stops when its connection is closed or
            // dropped; an error here would only make it spin.
            None => std::future::pending().await,
        }
    }
}

#[async_trait]
impl Conn for SessionConn {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        not_applicable()
    }
    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        self.next(buf).await
    }
    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        Ok((self.next(buf).await?, self.peer))
    }
    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        // A failed send is a lost datagram, as on the wire; DTLS retransmits handshakes.
        Ok(self
            .socket
            .send_to(buf, self.peer)
            .await
            .unwrap_or(buf.len()))
    }
    async fn send_to(&self, buf: &[u8], _target: SocketAddr) -> webrtc_util::Result<usize> {
        self.send(buf).await
    }
    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }
    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.peer)
    }
    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }
    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

// ---------------------------------------------------------------------------------------
// The listener

/// What the demultiplexer keeps per client address.
struct Session {
    /// Datagrams towards the session's DTLS layer.
    inbound: mpsc::Sender<Bytes>,
    /// Decrypted frames towards the client, once the handshake is done.
    outbound: Option<mpsc::Sender<Bytes>>,
    allocated: Arc<AtomicBool>,
    cancel: CancellationToken,
}

type Sessions = Arc<RwLock<HashMap<SocketAddr, Session>>>;

/// A `dtls` listener seen as one packet connection.
pub(crate) struct DtlsTransport {
    local: SocketAddr,
    frames: Mutex<mpsc::Receiver<(Bytes, SocketAddr)>>,
    sessions: Sessions,
    metrics: TurnMetrics,
}

/// What every session task of one listener needs.
#[derive(Clone)]
struct Shared {
    socket: Arc<UdpSocket>,
    sessions: Sessions,
    frames: mpsc::Sender<(Bytes, SocketAddr)>,
    closed: mpsc::UnboundedSender<SocketAddr>,
    metrics: TurnMetrics,
    log: Arc<RateLimit>,
    cert: Arc<DtlsCert>,
}

impl DtlsTransport {
    /// Starts reading `socket`; `limit` is shared by every `dtls` listener of the service
    /// (`turn.quota.max_dtls_sessions`). Returns the transport and a channel that yields
    /// the address of every session that closed.
    pub(crate) fn start(
        socket: UdpSocket,
        cert: Arc<DtlsCert>,
        metrics: TurnMetrics,
        cancel: CancellationToken,
        tasks: &TaskTracker,
        log: Arc<RateLimit>,
        limit: Arc<Semaphore>,
    ) -> std::io::Result<(Arc<DtlsTransport>, mpsc::UnboundedReceiver<SocketAddr>)> {
        let local = socket.local_addr()?;
        let socket = Arc::new(socket);
        let (frames_tx, frames_rx) = mpsc::channel(1024);
        let (closed_tx, closed_rx) = mpsc::unbounded_channel();
        let transport = Arc::new(DtlsTransport {
            local,
            frames: Mutex::new(frames_rx),
            sessions: Arc::new(RwLock::new(HashMap::new())),
            metrics: metrics.clone(),
        });
        let shared = Shared {
            socket: Arc::clone(&socket),
            sessions: Arc::clone(&transport.sessions),
            frames: frames_tx,
            closed: closed_tx,
            metrics,
            log,
            cert,
        };
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let tracker = tasks.clone();
        tasks.spawn(async move {
            let mut buf = vec![0u8; DATAGRAM];
            loop {
                let received = tokio::select! {
                    _ = cancel.cancelled() => break,
                    r = socket.recv_from(&mut buf) => r,
                };
                let Ok((n, peer)) = received else {
                    // ICMP errors surface here on Linux; nothing to do but go on.
                    continue;
                };
                let datagram = &buf[..n];
                shared.demux(datagram, peer, &limit, &handshakes, &cancel, &tracker);
            }
            // Shutdown: every session ends with the listener.
            let all: Vec<CancellationToken> = shared
                .sessions
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .map(|s| s.cancel.clone())
                .collect();
            for c in all {
                c.cancel();
            }
        });
        Ok((transport, closed_rx))
    }
}

impl Shared {
    /// Routes one datagram to its session, or opens a session for a ClientHello.
    fn demux(
        &self,
        datagram: &[u8],
        peer: SocketAddr,
        limit: &Arc<Semaphore>,
        handshakes: &Arc<Semaphore>,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) {
        if datagram.len() > MAX_DATAGRAM {
            self.metrics.dropped(DropReason::Malformed).inc();
            return;
        }
        let hello = is_client_hello(datagram);
        {
            let sessions = self.sessions.read().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = sessions.get(&peer) {
                if hello && s.outbound.is_some() {
                    // A client that restarted on the same address: the old session goes;
                    // the ClientHello's retransmission opens the new one.
                    s.cancel.cancel();
                    return;
                }
                if s.inbound
                    .try_send(Bytes::copy_from_slice(datagram))
                    .is_err()
                {
                    self.metrics.dropped(DropReason::ClientBackpressure).inc();
                }
                return;
            }
        }
        if !hello {
            self.metrics.dropped(DropReason::Malformed).inc();
            return;
        }
        let Ok(session_permit) = Arc::clone(limit).try_acquire_owned() else {
            self.refused(DtlsClose::Limit, peer);
            return;
        };
        let Ok(handshake_permit) = Arc::clone(handshakes).try_acquire_owned() else {
            self.refused(DtlsClose::HandshakeLimit, peer);
            return;
        };
        let (in_tx, in_rx) = mpsc::channel(INBOUND_QUEUE);
        let _ = in_tx.try_send(Bytes::copy_from_slice(datagram));
        let allocated = Arc::new(AtomicBool::new(false));
        let session_cancel = cancel.child_token();
        self.sessions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                peer,
                Session {
                    inbound: in_tx,
                    outbound: None,
                    allocated: Arc::clone(&allocated),
                    cancel: session_cancel.clone(),
                },
            );
        let conn = Arc::new(SessionConn {
            socket: Arc::clone(&self.socket),
            peer,
            inbound: Mutex::new(in_rx),
        });
        let shared = self.clone();
        tracker.spawn(async move {
            shared
                .session(
                    conn,
                    peer,
                    allocated,
                    session_cancel,
                    handshake_permit,
                    session_permit,
                )
                .await;
        });
    }

    fn refused(&self, reason: DtlsClose, peer: SocketAddr) {
        self.metrics.dtls_closed(reason).inc();
        if self.log.allow() {
            tracing::warn!(client = %peer, ?reason, "TURN DTLS ClientHello dropped (turn.quota.max_dtls_sessions or handshakes in flight)");
        }
    }

    /// One session: handshake, then frames both ways until it ends; then the allocation
    /// is deleted.
    async fn session(
        self,
        conn: Arc<SessionConn>,
        peer: SocketAddr,
        allocated: Arc<AtomicBool>,
        cancel: CancellationToken,
        handshake_permit: OwnedSemaphorePermit,
        _session_permit: OwnedSemaphorePermit,
    ) {
        let config = self.cert.config();
        let hs = tokio::select! {
            _ = cancel.cancelled() => None,
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, DTLSConn::new(conn, config, false, None)) => Some(r),
        };
        drop(handshake_permit);
        let dtls = match hs {
            Some(Ok(Ok(c))) => Arc::new(c),
            Some(failed) => {
                self.metrics.dtls_closed(DtlsClose::Handshake).inc();
                if self.log.allow() {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "handshake timed out".to_string(),
                    };
                    tracing::debug!(client = %peer, error = %why, "TURN DTLS handshake failed");
                }
                self.forget(peer);
                return;
            }
            None => {
                self.forget(peer);
                return;
            }
        };
        let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(SEND_QUEUE);
        if let Some(s) = self
            .sessions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&peer)
        {
            s.outbound = Some(out_tx);
        }
        self.metrics.dtls_sessions.inc();

        let writer_dtls = Arc::clone(&dtls);
        let writer_cancel = cancel.clone();
        let writer = tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    _ = writer_cancel.cancelled() => break,
                    f = out_rx.recv() => match f { Some(f) => f, None => break },
                };
                if writer_dtls.write(&frame, None).await.is_err() {
                    writer_cancel.cancel();
                    break;
                }
            }
        });

        if let Some(reason) = self.read_records(&dtls, peer, &allocated, &cancel).await {
            self.metrics.dtls_closed(reason).inc();
            if self.log.allow() {
                tracing::debug!(client = %peer, ?reason, "TURN DTLS session closed by the server");
            }
        }
        cancel.cancel();
        let _ = writer.await;
        let _ = tokio::time::timeout(Duration::from_secs(1), dtls.close()).await;
        self.metrics.dtls_sessions.dec();
        self.forget(peer);
        let _ = self.closed.send(peer);
    }

    /// Hands decrypted records to the TURN server until the session ends; returns why the
    /// server ended it, if it did so on its own.
    async fn read_records(
        &self,
        dtls: &DTLSConn,
        peer: SocketAddr,
        allocated: &AtomicBool,
        cancel: &CancellationToken,
    ) -> Option<DtlsClose> {
        let opened = Instant::now();
        let mut last_read = opened;
        let mut buf = vec![0u8; RECORD];
        loop {
            let mut deadline = (last_read + IDLE_TIMEOUT, DtlsClose::Idle);
            if !allocated.load(Ordering::Acquire) {
                let d = opened + TCP_ALLOCATE_TIMEOUT;
                if d < deadline.0 {
                    deadline = (d, DtlsClose::NoAllocation);
                }
            }
            let read = tokio::select! {
                _ = cancel.cancelled() => return None,
                r = tokio::time::timeout_at(deadline.0, dtls.read(&mut buf, None)) => r,
            };
            match read {
                Err(_) => return Some(deadline.1),
                Ok(Err(::dtls::Error::ErrBufferTooSmall)) => {
                    self.metrics.dropped(DropReason::Malformed).inc();
                }
                Ok(Err(_)) => return None,
                Ok(Ok(n)) => {
                    last_read = Instant::now();
                    let frame = Bytes::copy_from_slice(&buf[..n]);
                    if self.frames.send((frame, peer)).await.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    fn forget(&self, peer: SocketAddr) {
        self.sessions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer);
    }
}

impl DtlsTransport {
    /// Queues one frame for `target`'s session without blocking; a full queue or a
    /// session that is gone drops it, counted.
    fn queue(&self, buf: &[u8], target: SocketAddr) {
        let sent = {
            let sessions = self.sessions.read().unwrap_or_else(|e| e.into_inner());
            match sessions.get(&target) {
                Some(Session {
                    outbound: Some(tx),
                    allocated,
                    ..
                }) => {
                    if is_allocate_success(buf) {
                        allocated.store(true, Ordering::Release);
                    }
                    tx.try_send(Bytes::copy_from_slice(buf))
                        .map_err(|e| match e {
                            mpsc::error::TrySendError::Full(_) => DropReason::ClientBackpressure,
                            mpsc::error::TrySendError::Closed(_) => DropReason::SendError,
                        })
                }
                _ => Err(DropReason::SendError),
            }
        };
        match sent {
            Ok(()) => count_to_client(&self.metrics, buf),
            Err(reason) => {
                self.metrics.dropped(reason).inc();
            }
        }
    }
}

/// Frames from relay sockets (the data path) go into the session's queue like replies.
impl ClientSink for DtlsTransport {
    fn send_frame(&self, frame: &[u8], client: SocketAddr) {
        self.queue(frame, client);
    }
}

#[async_trait]
impl Conn for DtlsTransport {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        not_applicable()
    }
    async fn recv(&self, _buf: &mut [u8]) -> webrtc_util::Result<usize> {
        not_applicable()
    }
    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let mut frames = self.frames.lock().await;
        loop {
            let Some((frame, peer)) = frames.recv().await else {
                // Shut down: the listener loop is being cancelled; an error would be
                // logged and retried as a UDP receive failure.
                return std::future::pending().await;
            };
            if frame.len() > buf.len() {
                self.metrics.dropped(DropReason::Malformed).inc();
                continue;
            }
            buf[..frame.len()].copy_from_slice(&frame);
            return Ok((frame.len(), peer));
        }
    }
    async fn send(&self, _buf: &[u8]) -> webrtc_util::Result<usize> {
        not_applicable()
    }
    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        self.queue(buf, target);
        Ok(buf.len())
    }
    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.local)
    }
    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }
    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }
    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_client_hellos() {
        let mut hello = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 100, 1];
        hello.resize(40, 0);
        assert!(is_client_hello(&hello));
        let mut later_epoch = hello.clone();
        later_epoch[4] = 1;
        assert!(!is_client_hello(&later_epoch));
        let mut app_data = hello.clone();
        app_data[0] = 23;
        assert!(!is_client_hello(&app_data));
        assert!(!is_client_hello(&hello[..20]));
        assert!(!is_client_hello(&[0u8; 20]));
    }

    #[test]
    fn loads_sec1_and_pkcs8_p256_keys_and_refuses_rsa() {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let ok = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap()
                .success();
            assert!(ok, "openssl {args:?}");
        };
        run(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "sec1.key",
        ]);
        run(&[
            "pkcs8", "-topk8", "-nocrypt", "-in", "sec1.key", "-out", "p8.key",
        ]);
        run(&["genrsa", "-out", "rsa.key", "2048"]);
        for key in ["sec1.key", "p8.key"] {
            run(&[
                "req", "-x509", "-key", key, "-days", "1", "-subj", "/CN=t", "-out", "c.crt",
            ]);
            let c = load(&dir.path().join("c.crt"), &dir.path().join(key)).expect(key);
            assert!(matches!(
                c.private_key.kind,
                CryptoPrivateKeyKind::Ecdsa256(_)
            ));
        }
        run(&[
            "req", "-x509", "-key", "rsa.key", "-days", "1", "-subj", "/CN=t", "-out", "r.crt",
        ]);
        let e = load(&dir.path().join("r.crt"), &dir.path().join("rsa.key")).unwrap_err();
        assert!(e.contains("not RSA"), "{e}");
    }
}
