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
//! session only if it is a DTLS ClientHello. The `dtls` crate answers it with a
//! HelloVerifyRequest (RFC 6347 §4.2.1); until the client echoes that cookie the session
//! is *unverified*: it holds none of the listener's [`MAX_HANDSHAKES`] handshake slots and
//! no place in `turn.quota.max_dtls_sessions`, at most [`MAX_UNVERIFIED`] such sessions
//! exist per listener and each is dropped after [`COOKIE_TIMEOUT`] (counted as
//! `no_cookie`), so ClientHellos from spoofed sources, which never see the cookie, cannot
//! lock legitimate clients out. The cookie is read from the crate's HelloVerifyRequest on
//! its way out; only a ClientHello that carries it takes a handshake slot (the crate then
//! checks it again). Why not a stateless cookie in front of the crate: the crate always
//! sends its own HelloVerifyRequest with a random cookie kept in its private state, and
//! the ClientHello that carries the cookie is part of the Finished transcript, so a cookie
//! issued outside the crate can never be the one it accepts. A verified handshake must
//! complete within [`HANDSHAKE_TIMEOUT`], at most `turn.quota.max_dtls_sessions`
//! verified sessions exist over all `dtls` listeners, one source holds at most
//! `turn.quota.max_connections_per_source` sessions and
//! `turn.quota.max_handshakes_per_source` of them unfinished (`sources`), a session
//! must make an allocation within 30 s and is closed after 10 minutes without a record.
//! Queues towards a session are bounded (64 datagrams of at most 8 KiB from the client,
//! 512 frames towards it); what overflows is dropped and counted. Every
//! close the server decides is counted in `mediagate_turn_dtls_closed_total{reason}`.
//! A new ClientHello (epoch 0) from the address of an established session replaces that
//! session (a client that restarted on the same port).
//!
//! The listener's certificate is [`DtlsCert`] (`dtls_cert`).

use ::dtls::conn::DTLSConn;
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
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
pub(crate) use super::dtls_cert::DtlsCert;
use super::metrics::{DropReason, DtlsClose, TurnMetrics};
use super::ratelog::RateLimit;
use super::sources::{SourceLimits, SourceRefusal, SourceSlot};
use super::transport::{TCP_ALLOCATE_TIMEOUT, count_to_client, not_applicable};

/// DTLS handshakes past the cookie exchange running at once per listener; further
/// ClientHellos with a cookie are dropped (the client retransmits after a second).
pub(crate) const MAX_HANDSHAKES: usize = 256;
/// Sessions per listener whose client has not yet echoed the HelloVerifyRequest's cookie;
/// ClientHellos that would open more are dropped.
pub(crate) const MAX_UNVERIFIED: usize = 1024;
/// A client must echo the cookie within this time: two retransmission intervals of a
/// client whose first ClientHello or the HelloVerifyRequest was lost. A source that never
/// sees the HelloVerifyRequest (a spoofed one) is dropped after it.
pub(crate) const COOKIE_TIMEOUT: Duration = Duration::from_secs(2);
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

/// The body of an unfragmented epoch-0 handshake message of type `typ` in a DTLS record
/// (13-byte record header, 12-byte handshake header), as far as the record holds it.
fn handshake_body(b: &[u8], typ: u8) -> Option<&[u8]> {
    if b.len() < 25 || b[0] != 22 || b[1] != 0xfe || b[3] != 0 || b[4] != 0 || b[13] != typ {
        return None;
    }
    let len = u32::from_be_bytes([0, b[14], b[15], b[16]]) as usize;
    let frag_off = u32::from_be_bytes([0, b[19], b[20], b[21]]);
    let frag_len = u32::from_be_bytes([0, b[22], b[23], b[24]]) as usize;
    if frag_off != 0 || frag_len != len {
        return None;
    }
    b.get(25..25 + len)
}

/// The cookie of a ClientHello (empty when it has none); None if the datagram is not an
/// unfragmented ClientHello.
fn client_hello_cookie(b: &[u8]) -> Option<&[u8]> {
    let body = handshake_body(b, 1)?;
    // client_version (2), random (32), session_id <0..32>, cookie <0..255>
    let sid = *body.get(34)? as usize;
    let at = 35 + sid;
    let n = *body.get(at)? as usize;
    body.get(at + 1..at + 1 + n)
}

/// The cookie of a HelloVerifyRequest (handshake type 3).
fn hello_verify_cookie(b: &[u8]) -> Option<&[u8]> {
    let body = handshake_body(b, 3)?;
    // server_version (2), cookie <0..255>
    let n = *body.get(2)? as usize;
    body.get(3..3 + n)
}

/// An Allocate success response (type 0x0103) on its way to a client.
fn is_allocate_success(b: &[u8]) -> bool {
    b.len() >= 20 && b[0] == 0x01 && b[1] == 0x03
}

// ---------------------------------------------------------------------------------------
// One client's datagrams, as the DTLS layer's connection

/// The datagrams of one client address, as the `Conn` a `DTLSConn` runs over: reads come
/// from the demultiplexer, writes go out of the listener socket to the client.
struct SessionConn {
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    inbound: Mutex<mpsc::Receiver<Bytes>>,
    gate: Arc<std::sync::Mutex<Gate>>,
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
        if let Some(cookie) = hello_verify_cookie(buf) {
            // The cookie the client must echo before the session takes a handshake slot.
            let mut gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
            if !gate.verified {
                gate.cookie = Some(cookie.to_vec());
            }
        }
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

/// What a session holds before and during its handshake: the cookie it must see, and
/// its places in the limits (released by dropping them).
#[derive(Default)]
struct Gate {
    /// The cookie of the HelloVerifyRequest the DTLS layer sent (seen on its way out).
    cookie: Option<Vec<u8>>,
    /// The client echoed the cookie: the session holds a handshake slot.
    verified: bool,
    /// A place among the unverified sessions of the listener, until verified.
    unverified: Option<OwnedSemaphorePermit>,
    /// A handshake slot, from verification to the end of the handshake.
    handshake: Option<OwnedSemaphorePermit>,
    /// A place in `turn.quota.max_dtls_sessions`, from verification to the end.
    session: Option<OwnedSemaphorePermit>,
    /// The source's unfinished handshakes, until the handshake ends.
    source_handshake: Option<SourceSlot>,
    /// The source's connections, until the session ends.
    _source_session: Option<SourceSlot>,
}

/// What the demultiplexer keeps per client address.
struct Session {
    /// Datagrams towards the session's DTLS layer.
    inbound: mpsc::Sender<Bytes>,
    /// Decrypted frames towards the client, once the handshake is done.
    outbound: Option<mpsc::Sender<Bytes>>,
    allocated: Arc<AtomicBool>,
    cancel: CancellationToken,
    gate: Arc<std::sync::Mutex<Gate>>,
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
    /// Places of the listener's unverified sessions ([`MAX_UNVERIFIED`]).
    unverified: Arc<Semaphore>,
    sources: SourceLimits,
}

impl DtlsTransport {
    /// Starts reading `socket`; `limit` (`turn.quota.max_dtls_sessions`) and `sources`
    /// (the per-source caps) are shared by every `dtls` listener of the service. Returns
    /// the transport and a channel that yields the address of every session that closed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        socket: UdpSocket,
        cert: Arc<DtlsCert>,
        metrics: TurnMetrics,
        cancel: CancellationToken,
        tasks: &TaskTracker,
        log: Arc<RateLimit>,
        limit: Arc<Semaphore>,
        sources: SourceLimits,
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
            unverified: Arc::new(Semaphore::new(MAX_UNVERIFIED)),
            sources,
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
                if hello && !self.admit(&s.gate, datagram, peer, limit, handshakes) {
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
        // A new client: it holds no handshake slot until it echoes the cookie.
        let (source_session, source_handshake) = match self.sources.admit(peer.ip()) {
            Ok(slots) => slots,
            Err(SourceRefusal::Connections) => return self.refused(DtlsClose::SourceLimit, peer),
            Err(SourceRefusal::Handshakes) => {
                return self.refused(DtlsClose::SourceHandshakes, peer);
            }
        };
        let Ok(unverified) = Arc::clone(&self.unverified).try_acquire_owned() else {
            self.refused(DtlsClose::UnverifiedLimit, peer);
            return;
        };
        let gate = Arc::new(std::sync::Mutex::new(Gate {
            unverified: Some(unverified),
            source_handshake: Some(source_handshake),
            _source_session: Some(source_session),
            ..Gate::default()
        }));
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
                    gate: Arc::clone(&gate),
                },
            );
        let conn = Arc::new(SessionConn {
            socket: Arc::clone(&self.socket),
            peer,
            inbound: Mutex::new(in_rx),
            gate: Arc::clone(&gate),
        });
        let shared = self.clone();
        tracker.spawn(async move {
            shared
                .session(conn, peer, allocated, session_cancel, gate)
                .await;
        });
    }

    /// A ClientHello for an unverified session: one that carries the cookie the session's
    /// HelloVerifyRequest gave takes a handshake slot and a place in
    /// `max_dtls_sessions`; false (dropped, counted) when none is free. Others (a
    /// retransmitted first ClientHello, a wrong cookie) go on to the DTLS layer, which
    /// answers or fails them.
    fn admit(
        &self,
        gate: &std::sync::Mutex<Gate>,
        datagram: &[u8],
        peer: SocketAddr,
        limit: &Arc<Semaphore>,
        handshakes: &Arc<Semaphore>,
    ) -> bool {
        let mut g = gate.lock().unwrap_or_else(|e| e.into_inner());
        if g.verified {
            return true;
        }
        let echoed = match (client_hello_cookie(datagram), &g.cookie) {
            (Some(c), Some(issued)) => !c.is_empty() && c == issued.as_slice(),
            _ => false,
        };
        if !echoed {
            return true;
        }
        let Ok(session) = Arc::clone(limit).try_acquire_owned() else {
            drop(g);
            self.refused(DtlsClose::Limit, peer);
            return false;
        };
        let Ok(handshake) = Arc::clone(handshakes).try_acquire_owned() else {
            drop(g);
            self.refused(DtlsClose::HandshakeLimit, peer);
            return false;
        };
        g.verified = true;
        g.unverified = None;
        g.session = Some(session);
        g.handshake = Some(handshake);
        true
    }

    fn refused(&self, reason: DtlsClose, peer: SocketAddr) {
        self.metrics.dtls_closed(reason).inc();
        if self.log.allow() {
            tracing::warn!(client = %peer, ?reason, "TURN DTLS ClientHello dropped (turn.quota.max_dtls_sessions, a per-source cap, handshakes in flight or clients still to answer the cookie)");
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
        gate: Arc<std::sync::Mutex<Gate>>,
    ) {
        self.serve_session(conn, peer, allocated, &cancel, &gate)
            .await;
        // Every place the session held is given back.
        *gate.lock().unwrap_or_else(|e| e.into_inner()) = Gate::default();
    }

    /// The handshake: unverified for at most [`COOKIE_TIMEOUT`], complete within
    /// [`HANDSHAKE_TIMEOUT`]; then the session.
    async fn serve_session(
        &self,
        conn: Arc<SessionConn>,
        peer: SocketAddr,
        allocated: Arc<AtomicBool>,
        cancel: &CancellationToken,
        gate: &std::sync::Mutex<Gate>,
    ) {
        let config = self.cert.config();
        let opened = Instant::now();
        let handshake = DTLSConn::new(conn, config, false, None);
        tokio::pin!(handshake);
        let timer = tokio::time::sleep_until(opened + COOKIE_TIMEOUT);
        tokio::pin!(timer);
        let hs = loop {
            tokio::select! {
                _ = cancel.cancelled() => break None,
                r = &mut handshake => break Some(r.map_err(|e| e.to_string())),
                () = &mut timer => {
                    let verified = gate.lock().unwrap_or_else(|e| e.into_inner()).verified;
                    if !verified {
                        self.metrics.dtls_closed(DtlsClose::NoCookie).inc();
                        self.forget(peer);
                        return;
                    }
                    if Instant::now() >= opened + HANDSHAKE_TIMEOUT {
                        break Some(Err("handshake timed out".to_string()));
                    }
                    timer.as_mut().reset(opened + HANDSHAKE_TIMEOUT);
                }
            }
        };
        {
            let mut g = gate.lock().unwrap_or_else(|e| e.into_inner());
            g.handshake = None;
            g.source_handshake = None;
        }
        let dtls = match hs {
            Some(Ok(c)) => Arc::new(c),
            Some(Err(why)) => {
                self.metrics.dtls_closed(DtlsClose::Handshake).inc();
                if self.log.allow() {
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

        if let Some(reason) = self.read_records(&dtls, peer, &allocated, cancel).await {
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

    /// A DTLS record holding one unfragmented handshake message.
    fn record(typ: u8, body: &[u8]) -> Vec<u8> {
        let n = body.len() as u32;
        let mut b = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0];
        b.extend_from_slice(&((n + 12) as u16).to_be_bytes());
        b.push(typ);
        b.extend_from_slice(&n.to_be_bytes()[1..]);
        b.extend_from_slice(&[0, 0, 0, 0, 0]);
        b.extend_from_slice(&n.to_be_bytes()[1..]);
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn reads_the_cookies_of_client_hellos_and_hello_verify_requests() {
        let hello = |sid: &[u8], cookie: &[u8]| {
            let mut body = vec![0xfe, 0xfd];
            body.extend_from_slice(&[9u8; 32]);
            body.push(sid.len() as u8);
            body.extend_from_slice(sid);
            body.push(cookie.len() as u8);
            body.extend_from_slice(cookie);
            body.extend_from_slice(&[0, 2, 0xc0, 0x2b, 1, 0]);
            record(1, &body)
        };
        assert_eq!(client_hello_cookie(&hello(&[], &[])), Some(&[][..]));
        assert_eq!(
            client_hello_cookie(&hello(&[5; 4], &[1, 2, 3])),
            Some(&[1, 2, 3][..])
        );
        let mut fragment = hello(&[], &[1, 2, 3]);
        fragment[24] -= 1; // fragment_length short of the length
        assert_eq!(client_hello_cookie(&fragment), None);
        let truncated = hello(&[], &[1, 2, 3]);
        assert_eq!(client_hello_cookie(&truncated[..60]), None);

        let hvr = record(3, &[0xfe, 0xff, 4, 7, 7, 7, 7]);
        assert_eq!(hello_verify_cookie(&hvr), Some(&[7, 7, 7, 7][..]));
        assert_eq!(client_hello_cookie(&hvr), None);
        assert_eq!(hello_verify_cookie(&hello(&[], &[1])), None);
    }

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
}
