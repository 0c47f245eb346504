//! Client-facing transports as the packet connections the `turn` crate serves.
//!
//! - [`UdpTransport`]: the listener's UDP sockets (one per shard thread, `SO_REUSEPORT`).
//! - [`TcpTransport`]: a TCP listener multiplexed into one packet connection. Each
//!   connection's byte stream is cut into STUN messages and ChannelData (RFC 8656 §12.5:
//!   over TCP, ChannelData is padded to four bytes), and each frame comes out of
//!   `recv_from` with the connection's remote address as source. `send_to(addr)` hands the
//!   frame to that connection's [`Outbox`] (bounded: a client that does not read loses
//!   packets, counted, instead of stalling everyone). A closed connection is reported so
//!   that its allocation is deleted.
//!
//! Memory and time an unauthenticated TCP client can hold are bounded: the read buffer
//! starts empty, grows only as far as the frame being read needs and is freed when a large
//! frame is done; before the connection has an allocation its frames may not exceed 4 KiB
//! (a STUN request needs far less); a started frame must complete within 10 s; a
//! connection must send its first complete STUN message within
//! `turn.quota.handshake_timeout` of accept (TLS handshake and PROXY header included) and
//! make an allocation within 30 s; at most `turn.quota.max_tcp_connections` connections
//! are open over all TCP listeners, and one source holds at most
//! `max_connections_per_source` of them and `max_handshakes_per_source` before their first
//! STUN message (`sources`; further ones are closed at once). Every such close is counted in
//! `mediagate_turn_tcp_closed_total{reason}`. After many connections closed, freed heap
//! memory is given back to the OS (`trim`).
//!
//! A `tls` listener is a [`TcpTransport`] whose connections first complete a TLS
//! handshake (within `handshake_timeout`, at most 10 s, else closed and counted as
//! `tls_handshake`); a `tcp` listener
//! given a certificate serves both on one port, by the first byte of each connection
//! (0x16, a TLS handshake record, or STUN/ChannelData); with
//! `accept_proxy_protocol` each connection must first send a PROXY v2 header (within 5 s,
//! else `proxy_header`), whose source address then stands for the client everywhere.
//!
//! Both are the [`ClientSink`] of the data path (`datapath`): frames from relay sockets
//! are sent without blocking (UDP: `sendto` on the listener socket; TCP: written to the
//! connection's socket on the spot by the relay socket's reader, see `outbox`; TLS:
//! appended to the connection's outbox, which its writer task encrypts and writes). A TCP connection's reader hands ChannelData and Send indications to the
//! data path itself (no hop through the listener task); only control frames (STUN
//! requests) travel to the listener's request loop.
//!
//! Both count the relayed payload they carry to clients and never fail a send towards
//! the crate (the crate would log every failure); failures are counted instead.
//! `close()` is a no-op because the crate closes the listener connection whenever one
//! allocation ends; the service shuts the transports down itself.

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use webrtc_util::Conn;

use crate::sockio::{SEND_MANY, send_many_to};
use std::os::fd::AsRawFd;

use super::datapath::{ClientSink, DataPath};
use super::metrics::{DropReason, TcpClose, TurnMetrics};
use super::outbox::{MANY, Outbox};
use super::ratelog::RateLimit;
use super::sources::{SourceLimits, SourceRefusal, SourceSlot};
use super::trim::Trimmer;
use super::wire::{self, Frame};

/// A TCP connection that sends nothing for this long is closed. Clients with an
/// allocation refresh their permissions every 5 minutes, so they are never idle this long.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// A frame whose first byte arrived must be complete within this time.
pub(crate) const TCP_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection must have made an allocation within this time.
pub(crate) const TCP_ALLOCATE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest frame a connection without an allocation may send (STUN requests are small).
pub(crate) const UNALLOCATED_MAX_FRAME: usize = 4096;
/// Read buffer while no frame is pending (several small frames fit in one read).
const READ_CHUNK: usize = 2048;
/// Room for each read once the connection has an allocation: under load several frames
/// (also of 1200 bytes) come in with one read, and a frame that arrived in parts is not
/// copied into a buffer of its own size.
const ALLOCATED_READ_ROOM: usize = 4096;
/// An empty read buffer larger than this is freed rather than kept.
const KEEP_CAPACITY: usize = 8192;

pub(crate) fn count_to_client(metrics: &TurnMetrics, buf: &[u8]) {
    if let Some(n) = wire::relayed_payload_len(buf) {
        metrics.packets_to_client.inc();
        metrics.bytes_to_client.inc_by(n as u64);
    }
}

pub(crate) fn not_applicable<T>() -> webrtc_util::Result<T> {
    Err(webrtc_util::Error::Other(
        "not applicable to a TURN listener".into(),
    ))
}

/// The UDP listener: one `SO_REUSEPORT` socket per shard thread (`shards`), all on the
/// listener's address. Each thread receives on its own; sends go out of the calling
/// thread's socket (any of them carries the listener's address).
pub(crate) struct UdpTransport {
    sockets: Vec<Arc<std::net::UdpSocket>>,
    /// Cached: the crate asks for it on every packet.
    local: SocketAddr,
    metrics: TurnMetrics,
}

impl UdpTransport {
    /// `sockets`: the listener's group, non-blocking, at least one.
    pub(crate) fn new(
        sockets: Vec<std::net::UdpSocket>,
        metrics: TurnMetrics,
    ) -> std::io::Result<Self> {
        let Some(first) = sockets.first() else {
            return Err(std::io::Error::other("a UDP listener needs a socket"));
        };
        let local = first.local_addr()?;
        Ok(UdpTransport {
            sockets: sockets.into_iter().map(Arc::new).collect(),
            local,
            metrics,
        })
    }

    /// The group's sockets, one per shard thread (each thread receives on its own).
    pub(crate) fn sockets(&self) -> &[Arc<std::net::UdpSocket>] {
        &self.sockets
    }

    /// The socket the calling thread sends from.
    fn out(&self) -> &std::net::UdpSocket {
        &self.sockets[super::shards::current() % self.sockets.len()]
    }
}

impl ClientSink for UdpTransport {
    fn send_frame(&self, frame: &[u8], client: SocketAddr) {
        match self.out().send_to(frame, client) {
            Ok(_) => count_to_client(&self.metrics, frame),
            Err(_) => {
                self.metrics.dropped(DropReason::SendError).inc();
            }
        }
    }

    /// One `sendmmsg` for the frames (they stay separate datagrams).
    fn send_frames(&self, frames: &[&[u8]], client: SocketAddr) {
        let fd = self.out().as_raw_fd();
        for chunk in frames.chunks(SEND_MANY) {
            let sent = send_many_to(fd, chunk, client);
            // Which ones a refusal skipped is not known (rare): count by number.
            for f in &chunk[..sent] {
                count_to_client(&self.metrics, f);
            }
            if sent < chunk.len() {
                self.metrics
                    .dropped(DropReason::SendError)
                    .inc_by((chunk.len() - sent) as u64);
            }
        }
    }
}

/// The crate's view: it only sends (answers to requests); the listener's shard threads
/// receive. A send that finds the socket's buffer full is dropped and counted, as the
/// data path's are (the client retransmits its request).
#[async_trait]
impl Conn for UdpTransport {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        not_applicable()
    }
    async fn recv(&self, _buf: &mut [u8]) -> webrtc_util::Result<usize> {
        not_applicable()
    }
    async fn recv_from(&self, _buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        not_applicable()
    }
    async fn send(&self, _buf: &[u8]) -> webrtc_util::Result<usize> {
        not_applicable()
    }
    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        self.send_frame(buf, target);
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

/// The outbox of one connection and whether it has an allocation.
struct Writer {
    out: Arc<Outbox>,
    allocated: Arc<AtomicBool>,
}

/// Frames towards one connection's client, straight into its outbox (the sink of an
/// allocation made over TCP/TLS: no lookup in the listener's connection map per frame).
struct ConnSink {
    out: Arc<Outbox>,
    metrics: TurnMetrics,
}

impl ClientSink for ConnSink {
    fn send_frame(&self, frame: &[u8], _client: SocketAddr) {
        match self.out.send(frame, wire::tcp_padding(frame)) {
            Ok(()) => count_to_client(&self.metrics, frame),
            Err(reason) => {
                self.metrics.dropped(reason).inc();
            }
        }
    }

    fn send_frames(&self, frames: &[&[u8]], _client: SocketAddr) {
        let mut padded = [(&[][..], 0usize); MANY];
        for chunk in frames.chunks(MANY) {
            for (p, f) in padded.iter_mut().zip(chunk) {
                *p = (f, wire::tcp_padding(f));
            }
            let (taken, dropped) = self.out.send_many(&padded[..chunk.len()]);
            for f in &chunk[..taken] {
                count_to_client(&self.metrics, f);
            }
            if let Some(reason) = dropped {
                self.metrics
                    .dropped(reason)
                    .inc_by((chunk.len() - taken) as u64);
            }
        }
    }
}

type Writers = Arc<RwLock<HashMap<SocketAddr, Writer>>>;

/// How connections of a TCP listener start: TLS and/or a PROXY v2 header first.
#[derive(Clone)]
pub(crate) struct TcpOptions {
    /// `tls` listener: the handshake comes first (after the PROXY header, if any).
    pub(crate) tls: Option<TlsAcceptor>,
    /// `accept_proxy_protocol`: a PROXY v2 header is required first.
    pub(crate) accept_proxy: bool,
    /// `trusted_proxies`: who may send it.
    pub(crate) trusted: crate::proxyproto::Trusted,
    /// With `tls`: a connection whose first byte is not a TLS handshake record (0x16) is
    /// served as plain TURN over TCP (a `tcp` listener given a certificate).
    pub(crate) plain_too: bool,
    /// `turn.relay.tcp_buffer`: each connection's receive and send buffer (0: the
    /// kernel's autotuning).
    pub(crate) buffer: usize,
    /// The per-source caps (shared by every listener of the service).
    pub(crate) sources: SourceLimits,
    /// `turn.quota.handshake_timeout`: the first complete STUN message (PROXY header and
    /// TLS handshake included) must arrive within this time of accept.
    pub(crate) handshake_timeout: Duration,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            tls: None,
            accept_proxy: false,
            trusted: Default::default(),
            plain_too: false,
            buffer: 0,
            sources: SourceLimits::default(),
            handshake_timeout: crate::config::QuotaConfig::default().handshake_timeout.0,
        }
    }
}

/// A TCP listener seen as one packet connection.
pub(crate) struct TcpTransport {
    local: SocketAddr,
    frames: Mutex<mpsc::Receiver<(Bytes, SocketAddr)>>,
    writers: Writers,
    metrics: TurnMetrics,
    /// The listener's data path, set once the listener exists.
    datapath: Arc<OnceLock<Arc<DataPath>>>,
}

impl TcpTransport {
    /// Starts accepting on `listener`; `limit` is shared by every TCP listener of the
    /// service (`turn.quota.max_tcp_connections`). Returns the transport and a channel that
    /// yields the remote address of every connection that closed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        listener: TcpListener,
        metrics: TurnMetrics,
        cancel: CancellationToken,
        tasks: &TaskTracker,
        log: Arc<RateLimit>,
        limit: Arc<Semaphore>,
        trimmer: Arc<Trimmer>,
        options: TcpOptions,
    ) -> std::io::Result<(Arc<TcpTransport>, mpsc::UnboundedReceiver<SocketAddr>)> {
        let local = listener.local_addr()?;
        let (frames_tx, frames_rx) = mpsc::channel(1024);
        let (closed_tx, closed_rx) = mpsc::unbounded_channel();
        let transport = Arc::new(TcpTransport {
            local,
            frames: Mutex::new(frames_rx),
            writers: Arc::new(RwLock::new(HashMap::new())),
            metrics: metrics.clone(),
            datapath: Arc::new(OnceLock::new()),
        });
        let writers = Arc::clone(&transport.writers);
        let datapath = Arc::clone(&transport.datapath);
        let tracker = tasks.clone();
        tasks.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = cancel.cancelled() => break,
                    r = listener.accept() => r,
                };
                let (stream, peer) = match accepted {
                    Ok(v) => v,
                    Err(e) => {
                        if log.allow() {
                            tracing::warn!(listen = %local, error = %e, "TURN TCP accept failed");
                        }
                        // EMFILE and friends: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                    metrics.tcp_closed(TcpClose::Limit).inc();
                    if log.allow() {
                        tracing::warn!(listen = %local, client = %peer, "TURN TCP connection limit reached (turn.quota.max_tcp_connections)");
                    }
                    drop(stream);
                    continue;
                };
                // Per source (with a PROXY header: the client it names, once read).
                let (source, source_handshake) = if options.accept_proxy {
                    (None, None)
                } else {
                    match take_source(&options.sources, peer) {
                        Ok((c, h)) => (Some(c), Some(h)),
                        Err(reason) => {
                            metrics.tcp_closed(reason).inc();
                            if log.allow() {
                                tracing::warn!(listen = %local, client = %peer, ?reason, "TURN TCP connection refused (turn.quota.max_connections_per_source or max_handshakes_per_source)");
                            }
                            drop(stream);
                            continue;
                        }
                    }
                };
                metrics.tcp_connections.inc();
                let conn = Connection {
                    handshake_by: Instant::now() + options.handshake_timeout,
                    source,
                    source_handshake: std::sync::Mutex::new(source_handshake),
                    peer,
                    writers: Arc::clone(&writers),
                    frames: frames_tx.clone(),
                    closed: closed_tx.clone(),
                    metrics: metrics.clone(),
                    cancel: cancel.child_token(),
                    log: Arc::clone(&log),
                    datapath: Arc::clone(&datapath),
                };
                let gauge = metrics.tcp_connections.clone();
                let trimmer = Arc::clone(&trimmer);
                let options = options.clone();
                tracker.spawn(async move {
                    conn.start(stream, options).await;
                    gauge.dec();
                    trimmer.closed();
                    drop(permit);
                });
            }
        });
        Ok((transport, closed_rx))
    }
}

/// A connection's places in the per-source caps, or the reason it is refused.
fn take_source(
    sources: &SourceLimits,
    peer: SocketAddr,
) -> Result<(SourceSlot, SourceSlot), TcpClose> {
    sources.admit(peer.ip()).map_err(|r| match r {
        SourceRefusal::Connections => TcpClose::SourceLimit,
        SourceRefusal::Handshakes => TcpClose::SourceHandshakes,
    })
}

struct Connection {
    /// The first complete STUN message must arrive before this (`handshake_timeout`).
    handshake_by: Instant,
    /// The connection's place among its source's connections.
    source: Option<SourceSlot>,
    /// Its place among its source's unfinished handshakes, until the first complete frame.
    source_handshake: std::sync::Mutex<Option<SourceSlot>>,
    peer: SocketAddr,
    writers: Writers,
    frames: mpsc::Sender<(Bytes, SocketAddr)>,
    closed: mpsc::UnboundedSender<SocketAddr>,
    metrics: TurnMetrics,
    cancel: CancellationToken,
    log: Arc<RateLimit>,
    datapath: Arc<OnceLock<Arc<DataPath>>>,
}

impl Connection {
    /// Reads the PROXY header and completes the TLS handshake as the listener requires,
    /// then serves the connection.
    async fn start(mut self, mut stream: TcpStream, options: TcpOptions) {
        let _ = stream.set_nodelay(true);
        if options.buffer > 0 {
            // Bounded, as coturn's (64 KiB): what a client sends faster than it is relayed
            // waits here, and an autotuned buffer (up to `tcp_rmem`'s maximum) would let
            // that backlog grow to seconds of media before TCP pushes back.
            let sock = socket2::SockRef::from(&stream);
            let _ = sock.set_recv_buffer_size(options.buffer);
            let _ = sock.set_send_buffer_size(options.buffer);
        }
        if options.accept_proxy {
            if !options.trusted.allows(self.peer.ip()) {
                return self.refuse(
                    TcpClose::ProxyHeader,
                    "a PROXY header from a source outside trusted_proxies",
                );
            }
            let header = tokio::select! {
                _ = self.cancel.cancelled() => return,
                h = tokio::time::timeout_at(self.handshake_by, crate::proxyproto::read_v2(&mut stream)) => h,
            };
            match header {
                Ok(Ok(Some(client))) => self.peer = client,
                Ok(Ok(None)) => {}
                Ok(Err(e)) => return self.refuse(TcpClose::ProxyHeader, &e.to_string()),
                Err(_) => return self.refuse(TcpClose::ProxyHeader, "handshake_timeout"),
            }
            match take_source(&options.sources, self.peer) {
                Ok((c, h)) => {
                    self.source = Some(c);
                    *self
                        .source_handshake
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(h);
                }
                Err(reason) => {
                    return self.refuse(reason, "per-source cap of the PROXY header's client");
                }
            }
            let taken = self
                .writers
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&self.peer);
            if taken {
                return self.refuse(
                    TcpClose::ProxyHeader,
                    "the PROXY header's client address is already connected",
                );
            }
        }
        if options.plain_too && options.tls.is_some() {
            // STUN and ChannelData start with 0x00-0x7F; a TLS ClientHello record with 0x16.
            let mut first = [0u8; 1];
            let peeked = tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = tokio::time::timeout_at(self.handshake_by.min(Instant::now() + super::tls::HANDSHAKE_TIMEOUT), stream.peek(&mut first)) => r,
            };
            match peeked {
                Ok(Ok(1)) if first[0] != 0x16 => return self.run_plain(stream).await,
                Ok(Ok(1)) => {}
                Ok(_) => return,
                Err(_) => return self.refuse(TcpClose::TlsHandshake, "nothing sent"),
            }
        }
        match options.tls {
            None => self.run_plain(stream).await,
            Some(acceptor) => {
                let hs = tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    r = tokio::time::timeout_at(self.handshake_by.min(Instant::now() + super::tls::HANDSHAKE_TIMEOUT), acceptor.accept(stream)) => r,
                };
                match hs {
                    Ok(Ok(tls)) => self.run(tls).await,
                    Ok(Err(e)) => self.refuse(TcpClose::TlsHandshake, &e.to_string()),
                    Err(_) => self.refuse(TcpClose::TlsHandshake, "handshake timed out"),
                }
            }
        }
    }

    /// Counts and logs a connection closed before it was served.
    fn refuse(&self, reason: TcpClose, why: &str) {
        self.metrics.tcp_closed(reason).inc();
        if self.log.allow() {
            tracing::debug!(client = %self.peer, ?reason, error = %why, "TURN TCP connection refused");
        }
    }

    /// Plain TCP: frames are written on the spot by whoever sends them (see [`Outbox`]);
    /// the writer task only flushes what the socket did not take at once.
    async fn run_plain(self, stream: TcpStream) {
        let (mut rd, wr) = stream.into_split();
        let wr = Arc::new(wr);
        let out = Arc::new(Outbox::new(Some(Arc::clone(&wr)), self.cancel.clone()));
        let flusher = Arc::clone(&out);
        let writer = tokio::spawn(async move { flusher.flush_direct(&wr).await });
        self.serve(&mut rd, out, writer).await;
    }

    /// TLS: frames are appended to the outbox; the writer task encrypts and writes
    /// everything pending in one go each time it is woken.
    async fn run<S>(self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (mut rd, wr) = tokio::io::split(stream);
        let out = Arc::new(Outbox::new(None, self.cancel.clone()));
        let flusher = Arc::clone(&out);
        let writer = tokio::spawn(async move { flusher.flush_queued(wr).await });
        self.serve(&mut rd, out, writer).await;
    }

    async fn serve<R: AsyncRead + Unpin>(
        self,
        rd: &mut R,
        out: Arc<Outbox>,
        writer: tokio::task::JoinHandle<()>,
    ) {
        let allocated = Arc::new(AtomicBool::new(false));
        self.writers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                self.peer,
                Writer {
                    out: Arc::clone(&out),
                    allocated: Arc::clone(&allocated),
                },
            );
        let closed = self.read_frames(rd, &allocated).await;
        if let Some(reason) = closed {
            self.metrics.tcp_closed(reason).inc();
            if self.log.allow() {
                tracing::debug!(client = %self.peer, ?reason, "TURN TCP connection closed by the server");
            }
        }
        self.cancel.cancel();
        out.close();
        let _ = writer.await;
        self.writers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.peer);
        let _ = self.closed.send(self.peer);
    }

    /// Cuts the stream into frames until it ends; returns why the server closed it, if it
    /// did so on its own (limits and timeouts).
    async fn read_frames<R: AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        allocated: &AtomicBool,
    ) -> Option<TcpClose> {
        let opened = Instant::now();
        let mut last_read = opened;
        let mut frame_started: Option<Instant> = None;
        // Until the first complete frame: `handshake_timeout` from accept.
        let mut first_by = Some(self.handshake_by);
        // Empty until bytes arrive; grows to what the current frame needs.
        let mut buf = BytesMut::new();
        // This connection's allocation, for the data path.
        let mut route: super::datapath::Route = None;
        // Registered once, not once per read.
        let cancelled = self.cancel.cancelled();
        tokio::pin!(cancelled);
        // One timer for the connection's deadlines. Reads do not touch it (a timer per
        // read is two operations on the runtime's timer wheel per packet): it is moved
        // only when a nearer deadline appears (a frame started) or when it fires before
        // the deadline in force (which then moved on).
        let timer = tokio::time::sleep_until(opened + TCP_ALLOCATE_TIMEOUT);
        tokio::pin!(timer);
        loop {
            loop {
                match wire::tcp_frame(&buf) {
                    Frame::Complete(n) => {
                        frame_started = None;
                        if first_by.take().is_some() {
                            // Something useful: no longer an unfinished handshake.
                            self.source_handshake
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .take();
                        }
                        if let Some(dp) = self.datapath.get()
                            && dp.client_packet(&buf[..n], self.peer, &mut route)
                        {
                            bytes::Buf::advance(&mut buf, n);
                            continue;
                        }
                        let frame = buf.split_to(n).freeze();
                        if self.frames.send((frame, self.peer)).await.is_err() {
                            return None;
                        }
                    }
                    Frame::Incomplete => break,
                    Frame::Invalid => {
                        self.metrics.dropped(DropReason::Malformed).inc();
                        if self.log.allow() {
                            tracing::warn!(client = %self.peer, "TURN TCP stream is not STUN/ChannelData; closing");
                        }
                        return None;
                    }
                }
            }
            let has_allocation = allocated.load(Ordering::Acquire);
            let needed = wire::tcp_frame_len(&buf);
            let cap = if has_allocation {
                wire::MAX_FRAME
            } else {
                UNALLOCATED_MAX_FRAME
            };
            if needed.is_some_and(|n| n > cap) {
                return Some(TcpClose::OversizedFrame);
            }
            if buf.is_empty() {
                frame_started = None;
                if buf.capacity() > KEEP_CAPACITY {
                    buf = BytesMut::new();
                }
            } else if frame_started.is_none() {
                frame_started = Some(Instant::now());
            }

            // The earliest of the deadlines that apply, with its reason.
            let mut deadline = (last_read + TCP_IDLE_TIMEOUT, TcpClose::Idle);
            if !has_allocation {
                let d = opened + TCP_ALLOCATE_TIMEOUT;
                if d < deadline.0 {
                    deadline = (d, TcpClose::NoAllocation);
                }
            }
            if let Some(started) = frame_started {
                let d = started + TCP_FRAME_TIMEOUT;
                if d < deadline.0 {
                    deadline = (d, TcpClose::FrameTimeout);
                }
            }
            if let Some(d) = first_by
                && d < deadline.0
            {
                deadline = (d, TcpClose::NoRequest);
            }

            // Room for the frame being read, allocated exactly once its header is in; a
            // small chunk while no frame (or only part of a header) is pending. With an
            // allocation: room for several frames per read, the buffer reused in place.
            match needed {
                _ if has_allocation => {
                    let must = needed.map_or(0, |n| n.saturating_sub(buf.len()));
                    if buf.capacity() - buf.len() < must.max(ALLOCATED_READ_ROOM / 2) {
                        buf.reserve(must.max(ALLOCATED_READ_ROOM));
                    }
                }
                Some(n) if buf.capacity() < n => {
                    let mut grown = BytesMut::with_capacity(n);
                    grown.extend_from_slice(&buf);
                    buf = grown;
                }
                Some(_) => {}
                None if buf.capacity() - buf.len() < wire::STUN_HEADER => {
                    buf.reserve(READ_CHUNK);
                }
                None => {}
            }
            if Instant::now() >= deadline.0 {
                return Some(deadline.1);
            }
            if timer.is_elapsed() || timer.deadline() > deadline.0 {
                timer.as_mut().reset(deadline.0);
            }
            let read = tokio::select! {
                _ = &mut cancelled => return None,
                () = &mut timer => continue,
                r = rd.read_buf(&mut buf) => r,
            };
            match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => last_read = Instant::now(),
            }
        }
    }
}

impl TcpTransport {
    /// Connects the listener's data path: from now on the connections' readers relay
    /// ChannelData and Send indications themselves.
    pub(crate) fn set_datapath(&self, dp: Arc<DataPath>) {
        let _ = self.datapath.set(dp);
    }

    /// Sends one frame to `target`'s connection without blocking (padded to four bytes
    /// if it is ChannelData); a full outbox drops it, counted.
    fn queue(&self, buf: &[u8], target: SocketAddr) {
        let sent = {
            let writers = self.writers.read().unwrap_or_else(|e| e.into_inner());
            match writers.get(&target) {
                Some(w) => w.out.send(buf, wire::tcp_padding(buf)),
                None => Err(DropReason::SendError),
            }
        };
        match sent {
            Ok(()) => count_to_client(&self.metrics, buf),
            Err(reason) => {
                self.metrics.dropped(reason).inc();
            }
        }
    }

    /// Where an allocation of the connection from `peer` sends its frames: straight to
    /// the connection's outbox; None once the connection has closed.
    pub(crate) fn connection_sink(&self, peer: SocketAddr) -> Option<Arc<dyn ClientSink>> {
        let writers = self.writers.read().unwrap_or_else(|e| e.into_inner());
        let w = writers.get(&peer)?;
        Some(Arc::new(ConnSink {
            out: Arc::clone(&w.out),
            metrics: self.metrics.clone(),
        }))
    }

    /// Marks the connection from `peer` as having an allocation: the allocation timeout
    /// and the 4 KiB frame limit no longer apply to it.
    pub(crate) fn mark_allocated(&self, peer: SocketAddr) {
        if let Some(w) = self
            .writers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer)
        {
            w.allocated.store(true, Ordering::Release);
        }
    }
}

#[async_trait]
impl Conn for TcpTransport {
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
                return Err(webrtc_util::Error::Other("TURN TCP listener closed".into()));
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

impl ClientSink for TcpTransport {
    fn send_frame(&self, frame: &[u8], client: SocketAddr) {
        self.queue(frame, client);
    }
}
