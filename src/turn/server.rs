//! The per-listener request loop in front of the `turn` crate.
//!
//! The crate provides the allocation machinery (`allocation::Manager`: relay sockets,
//! lifetimes, permissions and channel bindings with their timers) and answers Binding
//! requests. The data (ChannelData, Send indications, and what peers send back) does not
//! go through it: the data path (`datapath`) sees every packet first, here for UDP
//! (received in `recvmmsg` batches) and other packet transports, in the connection's
//! reader for TCP/TLS. What is left is handled here; the authenticated TURN methods
//! (in `requests`) are the service's own, because the crate offers no hook for what the
//! service needs there:
//!
//! - long-term authentication with stateless nonces; wrong or expired credentials get
//!   401 (the crate answers 400) and are counted;
//! - Allocate (RFC 8656 §7.2): per-user quota (486) and global cap (508) with
//!   reservations counted (`table`), lifetime clamped to 600..3600 s, EVEN-PORT /
//!   RESERVATION-TOKEN, REQUESTED-ADDRESS-FAMILY, ADDITIONAL-ADDRESS-FAMILY (a dual
//!   allocation: its IPv6 relay socket is the service's own, beside the crate's IPv4
//!   one, see `requests`), idempotent retransmissions;
//! - Refresh (§7.3): lifetime 0 deletes, 437 without an allocation, 441 for other
//!   credentials;
//! - CreatePermission / ChannelBind (§9, §11): the peer policy answers 403 (counted;
//!   the gateway's own ports also in the loop counter);
//!   every XOR-PEER-ADDRESS of a CreatePermission is installed (the crate installs only
//!   the first);
//! - Send indications to refused peers are dropped and counted (the data path does
//!   that for the ones it relays).
//!
//! Malformed packets are dropped and counted; a panic inside the crate is caught and
//! counted as malformed instead of killing the listener.
//!
//! The crate keys allocations by a 5-tuple whose protocol is always UDP and whose
//! destination is the listener's local address; one `Manager` per listener keeps UDP and
//! TCP listeners on the same port apart.

use futures_util::FutureExt;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use stun::attributes::*;
use stun::error_code::{ErrorCode, ErrorCodeAttribute};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;
use stun::uattrs::UnknownAttributes;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use turn::allocation::allocation_manager::Manager;
use turn::allocation::five_tuple::FiveTuple;
use turn::auth::AuthHandler;
use turn::proto::PROTO_UDP;
use turn::server::request::Request;
use webrtc_util::Conn;

use super::auth::AuthFailure;
use super::datapath::{self, ClientSink, DataPath, RouteCache};
use super::metrics::DropReason;
use super::relay::RelayFactory;
pub(crate) use super::shared::Core;
use super::shared::loggable;
use super::transport::{TcpTransport, UdpTransport};
use super::wire::{self, Kind};
use crate::config::{Protocol, TurnTransport};
use crate::sockio::MsgBatch;

/// RFC 8656 §7.2: default allocation lifetime.
pub(crate) const DEFAULT_LIFETIME: u32 = 600;
/// RFC 8656 §7.2: the server's maximum allocation lifetime (3600 s recommended).
pub(crate) const MAX_LIFETIME: u32 = 3600;
/// RFC 8656 §11: channel bindings last 10 minutes.
pub(super) const CHANNEL_BIND_LIFETIME: Duration = super::relay::CHANNEL_LIFETIME;
/// Datagrams taken per `recvmmsg` on a UDP listener.
const UDP_BATCH: usize = 32;

/// Comprehension-required attributes this server understands (others get 420).
const KNOWN_REQUIRED: &[u16] = &[
    0x0001, // MAPPED-ADDRESS
    0x0006, // USERNAME
    0x0008, // MESSAGE-INTEGRITY
    0x0009, // ERROR-CODE
    0x000A, // UNKNOWN-ATTRIBUTES
    0x000C, // CHANNEL-NUMBER
    0x000D, // LIFETIME
    0x0012, // XOR-PEER-ADDRESS
    0x0013, // DATA
    0x0014, // REALM
    0x0015, // NONCE
    0x0016, // XOR-RELAYED-ADDRESS
    0x0017, // REQUESTED-ADDRESS-FAMILY
    0x0018, // EVEN-PORT
    0x0019, // REQUESTED-TRANSPORT
    0x0020, // XOR-MAPPED-ADDRESS
    0x0022, // RESERVATION-TOKEN
    0x0024, // PRIORITY
    0x0025, // USE-CANDIDATE
];

pub(super) struct Authed {
    pub(super) username: String,
    pub(super) key: Vec<u8>,
}

/// One TURN listener: its transport, its allocation manager and its request loop.
pub(crate) struct Listener {
    pub(crate) idx: usize,
    pub(crate) protocol: TurnTransport,
    pub(crate) local: SocketAddr,
    pub(super) core: Arc<Core>,
    pub(super) conn: Arc<dyn Conn + Send + Sync>,
    pub(crate) manager: Arc<Manager>,
    pub(super) relays: Arc<RelayFactory>,
    /// The TCP transport, to mark connections that made an allocation.
    pub(super) tcp: Option<Arc<TcpTransport>>,
    /// The UDP transport: received in batches by the request loop.
    udp: Option<Arc<UdpTransport>>,
    /// Where relay sockets send the data of this listener's allocations.
    pub(super) sink: Arc<dyn ClientSink>,
    datapath: Arc<DataPath>,
    crate_nonces: Arc<tokio::sync::Mutex<HashMap<String, tokio::time::Instant>>>,
    auth_handler: Arc<dyn AuthHandler + Send + Sync>,
}

pub(super) fn error_attr(code: u16, reason: &str) -> Box<dyn Setter> {
    Box::new(ErrorCodeAttribute {
        code: ErrorCode(code),
        reason: reason.as_bytes().to_vec(),
    })
}

pub(super) fn requested_lifetime(m: &Message) -> Option<u32> {
    let v = m.get(ATTR_LIFETIME).ok()?;
    let b: [u8; 4] = v.as_slice().try_into().ok()?;
    Some(u32::from_be_bytes(b))
}

impl Listener {
    /// `conn` is the transport as the crate sees it, `sink` the same transport as the
    /// data path sends through; `udp`/`tcp` are set for those transports.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        idx: usize,
        protocol: TurnTransport,
        local: SocketAddr,
        core: Arc<Core>,
        conn: Arc<dyn Conn + Send + Sync>,
        sink: Arc<dyn ClientSink>,
        manager: Arc<Manager>,
        relays: Arc<RelayFactory>,
        udp: Option<Arc<UdpTransport>>,
        tcp: Option<Arc<TcpTransport>>,
    ) -> Self {
        let auth_handler: Arc<dyn AuthHandler + Send + Sync> = Arc::new(core.auth.clone());
        let datapath = Arc::new(DataPath::new(idx, local, Arc::clone(&core)));
        if let Some(t) = &tcp {
            t.set_datapath(Arc::clone(&datapath));
        }
        Listener {
            idx,
            protocol,
            local,
            core,
            conn,
            sink,
            datapath,
            manager,
            relays,
            udp,
            tcp,
            crate_nonces: Arc::new(tokio::sync::Mutex::new(HashMap::new())),
            auth_handler,
        }
    }

    pub(super) fn five_tuple(&self, src: SocketAddr) -> FiveTuple {
        FiveTuple {
            protocol: PROTO_UDP,
            src_addr: src,
            dst_addr: self.local,
        }
    }

    /// Reads and handles packets until cancelled or the transport closes.
    /// (TCP, TLS and DTLS; a UDP listener runs [`Listener::run_udp`] on every shard.)
    pub(crate) async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut buf = vec![0u8; wire::MAX_FRAME + 64];
        let mut routes = RouteCache::new();
        let mut prune_at = 64;
        loop {
            let received = tokio::select! {
                _ = cancel.cancelled() => break,
                r = self.conn.recv_from(&mut buf) => r,
            };
            let (n, src) = match received {
                Ok(v) => v,
                Err(e) => {
                    if self.protocol.base() == Protocol::Tcp {
                        break; // the TCP transport only fails when it is shut down
                    }
                    if self.core.misc_log.allow() {
                        tracing::warn!(listen = %self.local, error = %e, "TURN UDP receive failed");
                    }
                    // Do not spin on a persistent error.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            };
            let pkt = &buf[..n];
            if !self.relay_data(pkt, src, &mut routes, &mut prune_at) {
                self.guarded(pkt, src).await;
            }
        }
    }

    /// The UDP listener's socket `shard`, on that shard's thread: `recvmmsg` batches;
    /// data relayed on the spot, the rest handled in order (an Allocate handled here
    /// starts its relay reader on this thread too). Ends when cancelled; does nothing
    /// for a listener that is not UDP.
    pub(crate) async fn run_udp(self: Arc<Self>, shard: usize, cancel: CancellationToken) {
        let Some(socket) = self.udp.as_ref().and_then(|u| u.sockets().get(shard)) else {
            return;
        };
        // Registered here, so with the reactor of the thread this runs on.
        // SAFETY: the `Arc` held by the `AsyncFd` keeps the socket, and so its descriptor,
        // open and unchanged for the `AsyncFd`'s whole life.
        let registered =
            unsafe { AsyncFd::register_with_interest(Arc::clone(socket), Interest::READABLE) };
        let socket = match registered {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(listen = %self.local, error = %e, "TURN UDP listener: cannot register its socket");
                return;
            }
        };
        let fd = socket.as_raw_fd();
        let mut batch = MsgBatch::new(UDP_BATCH, wire::MAX_FRAME);
        let mut routes = RouteCache::new();
        let mut prune_at = 64;
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        loop {
            let ready = tokio::select! {
                _ = &mut cancelled => break,
                r = socket.readable() => r,
            };
            // A batch that is not full emptied the queue: its `WouldBlock` clears the
            // readiness at once (`try_io` gives `Err` for it), without a second call
            // that only says so.
            let mut n = 0;
            let received = ready.and_then(|mut guard| {
                guard
                    .try_io(|_| {
                        n = batch.recv_from(fd)?;
                        if n < batch.capacity() {
                            Err(io::ErrorKind::WouldBlock.into())
                        } else {
                            Ok(())
                        }
                    })
                    .unwrap_or(Ok(()))
            });
            if let Err(e) = received {
                if self.core.misc_log.allow() {
                    tracing::warn!(listen = %self.local, error = %e, "TURN UDP receive failed");
                }
                // Do not spin on a persistent error.
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            for i in 0..n {
                let (pkt, src, truncated) = batch.get(i);
                let Some(src) = src else { continue };
                if truncated {
                    self.malformed(src, "datagram larger than any TURN message");
                    continue;
                }
                if !self.relay_data(pkt, src, &mut routes, &mut prune_at) {
                    self.guarded(pkt, src).await;
                }
            }
        }
    }

    /// The data path first: true when `pkt` was data and is dealt with.
    fn relay_data(
        &self,
        pkt: &[u8],
        src: SocketAddr,
        routes: &mut RouteCache,
        prune_at: &mut usize,
    ) -> bool {
        let slot = routes.entry(src).or_default();
        let done = self.datapath.client_packet(pkt, src, slot);
        if slot.is_none() {
            routes.remove(&src);
        }
        datapath::prune(routes, prune_at);
        done
    }

    /// Handles one control packet; a panic inside the crate is counted, not fatal.
    async fn guarded(&self, pkt: &[u8], src: SocketAddr) {
        let handled = AssertUnwindSafe(self.handle(pkt, src)).catch_unwind().await;
        if handled.is_err() {
            self.core.metrics.dropped(DropReason::Malformed).inc();
            if self.core.malformed_log.allow() {
                tracing::error!(client = %src, listen = %self.local, "TURN: panic while handling a packet (dropped)");
            }
        }
    }

    async fn handle(&self, pkt: &[u8], src: SocketAddr) {
        match wire::classify(pkt) {
            Kind::ChannelData => self.to_crate(pkt, src).await,
            Kind::Stun => self.handle_stun(pkt, src).await,
            Kind::Invalid => self.malformed(src, "neither STUN nor ChannelData"),
        }
    }

    pub(super) fn malformed(&self, src: SocketAddr, what: &'static str) {
        self.core.metrics.dropped(DropReason::Malformed).inc();
        if self.core.malformed_log.allow() {
            tracing::debug!(client = %src, listen = %self.local, what, "TURN: malformed packet dropped");
        }
    }

    /// Hands a packet to the crate's request handler (data path and Binding).
    pub(super) async fn to_crate(&self, pkt: &[u8], src: SocketAddr) {
        let mut r = Request {
            conn: Arc::clone(&self.conn),
            src_addr: src,
            buff: pkt.to_vec(),
            allocation_manager: Arc::clone(&self.manager),
            nonces: Arc::clone(&self.crate_nonces),
            auth_handler: Arc::clone(&self.auth_handler),
            realm: String::new(),
            channel_bind_timeout: CHANNEL_BIND_LIFETIME,
        };
        if let Err(e) = r.handle_request().await {
            let reason = match e {
                turn::Error::ErrNoAllocationFound => DropReason::NoAllocation,
                turn::Error::ErrNoPermission | turn::Error::ErrNoSuchChannelBind => {
                    DropReason::NoPermission
                }
                _ => DropReason::Malformed,
            };
            self.core.metrics.dropped(reason).inc();
        }
    }

    async fn handle_stun(&self, pkt: &[u8], src: SocketAddr) {
        let mut m = Message::new();
        m.raw.clear();
        m.raw.extend_from_slice(pkt);
        if m.decode().is_err() {
            return self.malformed(src, "undecodable STUN message");
        }
        if m.contains(ATTR_FINGERPRINT) && FINGERPRINT.check(&m).is_err() {
            return self.malformed(src, "bad FINGERPRINT");
        }
        match (m.typ.class, m.typ.method) {
            (CLASS_REQUEST, METHOD_BINDING) => self.to_crate(pkt, src).await,
            (CLASS_INDICATION, METHOD_SEND) => self.send_indication(&m, pkt, src).await,
            // Binding indications are keepalives; other indications mean nothing here.
            (CLASS_INDICATION, _) => {}
            (
                CLASS_REQUEST,
                METHOD_ALLOCATE | METHOD_REFRESH | METHOD_CREATE_PERMISSION | METHOD_CHANNEL_BIND,
            ) => self.authenticated(m, src).await,
            (CLASS_REQUEST, _) => {
                self.reply(
                    &m,
                    src,
                    CLASS_ERROR_RESPONSE,
                    vec![error_attr(400, "Bad Request")],
                    None,
                )
                .await;
            }
            _ => self.malformed(src, "STUN response sent to the server"),
        }
    }

    pub(super) fn build(
        &self,
        req: &Message,
        class: MessageClass,
        mut attrs: Vec<Box<dyn Setter>>,
        key: Option<&[u8]>,
    ) -> Option<Vec<u8>> {
        let mut setters: Vec<Box<dyn Setter>> = vec![
            Box::new(req.transaction_id),
            Box::new(MessageType::new(req.typ.method, class)),
        ];
        setters.append(&mut attrs);
        if let Some(k) = key {
            setters.push(Box::new(MessageIntegrity(k.to_vec())));
        }
        if req.contains(ATTR_FINGERPRINT) {
            setters.push(Box::new(FINGERPRINT));
        }
        let mut msg = Message::new();
        msg.build(&setters).ok()?;
        Some(msg.raw)
    }

    /// Builds the response now (attribute setters are not `Send`) and returns the send.
    pub(super) fn reply(
        &self,
        req: &Message,
        src: SocketAddr,
        class: MessageClass,
        attrs: Vec<Box<dyn Setter>>,
        key: Option<&[u8]>,
    ) -> impl Future<Output = ()> + Send + '_ {
        let raw = self.build(req, class, attrs, key);
        async move {
            if let Some(raw) = raw {
                let _ = self.conn.send_to(&raw, src).await;
            }
        }
    }

    pub(super) fn fail(
        &self,
        req: &Message,
        src: SocketAddr,
        code: u16,
        reason: &str,
        key: &[u8],
    ) -> impl Future<Output = ()> + Send + '_ {
        self.reply(
            req,
            src,
            CLASS_ERROR_RESPONSE,
            vec![error_attr(code, reason)],
            Some(key),
        )
    }

    /// 401 or 438 with a fresh NONCE and the REALM.
    fn challenge(
        &self,
        req: &Message,
        src: SocketAddr,
        code: u16,
        reason: &str,
    ) -> impl Future<Output = ()> + Send + '_ {
        let nonce = self.core.nonces.issue(src.ip(), SystemTime::now());
        let attrs: Vec<Box<dyn Setter>> = vec![
            error_attr(code, reason),
            Box::new(TextAttribute::new(
                ATTR_REALM,
                self.core.auth.realm().to_string(),
            )),
            Box::new(TextAttribute::new(ATTR_NONCE, nonce)),
        ];
        self.reply(req, src, CLASS_ERROR_RESPONSE, attrs, None)
    }

    pub(super) fn auth_failed(&self, reason: AuthFailure, username: &str, src: SocketAddr) {
        self.core.metrics.auth_failure(reason).inc();
        if self.core.auth_log.allow() {
            tracing::warn!(
                client = %src,
                transport = %self.protocol,
                username = ?loggable(username),
                reason = reason.as_str(),
                "TURN authentication failed"
            );
        }
    }

    pub(super) fn refused(
        &self,
        src: SocketAddr,
        username: &str,
        peers: &[SocketAddr],
        what: &'static str,
    ) {
        self.core.refused(src, username, peers, what);
    }

    /// Long-term credential check (RFC 8489 §9.2). Answers the client itself on failure.
    async fn authenticate(&self, m: &mut Message, src: SocketAddr) -> Option<Authed> {
        let now = SystemTime::now();
        if !m.contains(ATTR_MESSAGE_INTEGRITY) {
            self.challenge(m, src, 401, "Unauthorized").await;
            return None;
        }
        let fields = (
            TextAttribute::get_from_as(m, ATTR_USERNAME),
            TextAttribute::get_from_as(m, ATTR_REALM),
            TextAttribute::get_from_as(m, ATTR_NONCE),
        );
        let (Ok(username), Ok(realm), Ok(nonce)) = fields else {
            self.auth_failed(AuthFailure::Malformed, "", src);
            self.reply(
                m,
                src,
                CLASS_ERROR_RESPONSE,
                vec![error_attr(400, "Bad Request")],
                None,
            )
            .await;
            return None;
        };
        if !self.core.nonces.is_valid(&nonce.text, src.ip(), now) {
            self.challenge(m, src, 438, "Stale Nonce").await;
            return None;
        }
        let keys = match self.core.auth.keys(&username.text, &realm.text, now) {
            Ok(k) => k,
            Err(reason) => {
                self.auth_failed(reason, &username.text, src);
                self.challenge(m, src, 401, "Unauthorized").await;
                return None;
            }
        };
        let mi_len_ok = m.get(ATTR_MESSAGE_INTEGRITY).is_ok_and(|v| v.len() == 20);
        // With several secrets (rotation) any of them may have signed the credential.
        let matching = keys
            .into_iter()
            .find(|k| mi_len_ok && MessageIntegrity(k.clone()).check(m).is_ok());
        let Some(key) = matching else {
            self.auth_failed(AuthFailure::WrongPassword, &username.text, src);
            self.challenge(m, src, 401, "Unauthorized").await;
            return None;
        };
        Some(Authed {
            username: username.text,
            key,
        })
    }

    async fn authenticated(&self, mut m: Message, src: SocketAddr) {
        let Some(auth) = self.authenticate(&mut m, src).await else {
            return;
        };
        let unknown: Vec<AttrType> = m
            .attributes
            .0
            .iter()
            .map(|a| a.typ)
            .filter(|t| t.value() < 0x8000 && !KNOWN_REQUIRED.contains(&t.value()))
            .collect();
        if !unknown.is_empty() {
            let attrs: Vec<Box<dyn Setter>> = vec![
                error_attr(420, "Unknown Attribute"),
                Box::new(UnknownAttributes(unknown)),
            ];
            self.reply(&m, src, CLASS_ERROR_RESPONSE, attrs, Some(&auth.key))
                .await;
            return;
        }
        match m.typ.method {
            METHOD_ALLOCATE => self.allocate(&m, src, auth).await,
            METHOD_REFRESH => self.refresh(&m, src, auth).await,
            METHOD_CREATE_PERMISSION => self.create_permission(&m, src, auth).await,
            _ => self.channel_bind(&m, src, auth).await,
        }
    }
}
