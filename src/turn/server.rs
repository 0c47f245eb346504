//! The per-listener request loop in front of the `turn` crate.
//!
//! The crate provides the allocation machinery (`allocation::Manager`: relay sockets,
//! lifetimes, permissions and channel bindings with their timers, and the peer → client
//! direction) and handles the data path (ChannelData, Send indications) and Binding
//! requests. This loop sees every packet first and handles the authenticated TURN methods
//! itself, because the crate offers no hook for what the service needs there:
//!
//! - long-term authentication with stateless nonces; wrong or expired credentials get
//!   401 (the crate answers 400) and are counted;
//! - Allocate (RFC 8656 §7.2): per-user quota (486) and global cap (508) with
//!   reservations counted (`table`), lifetime clamped to 600..3600 s, EVEN-PORT /
//!   RESERVATION-TOKEN, REQUESTED-ADDRESS-FAMILY, idempotent retransmissions;
//! - Refresh (§7.3): lifetime 0 deletes, 437 without an allocation, 441 for other
//!   credentials;
//! - CreatePermission / ChannelBind (§9, §11): the peer policy answers 403 (counted;
//!   the gateway's own ports also in the loop counter);
//!   every XOR-PEER-ADDRESS of a CreatePermission is installed (the crate installs only
//!   the first);
//! - Send indications to refused peers are dropped and counted.
//!
//! Malformed packets are dropped and counted; a panic inside the crate is caught and
//! counted as malformed instead of killing the listener.
//!
//! The crate keys allocations by a 5-tuple whose protocol is always UDP and whose
//! destination is the listener's local address; one `Manager` per listener keeps UDP and
//! TCP listeners on the same port apart.

use futures_util::FutureExt;
use std::collections::HashMap;
use std::net::SocketAddr;
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
use stun::xoraddr::XorMappedAddress;
use tokio_util::sync::CancellationToken;
use turn::allocation::allocation_manager::Manager;
use turn::allocation::channel_bind::ChannelBind;
use turn::allocation::five_tuple::FiveTuple;
use turn::allocation::permission::Permission;
use turn::auth::AuthHandler;
use turn::proto::PROTO_UDP;
use turn::proto::channum::ChannelNumber;
use turn::proto::lifetime::Lifetime;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::rsrvtoken::ReservationToken;
use turn::server::request::Request;
use webrtc_util::Conn;

use super::auth::{AuthFailure, Authenticator, Nonces};
use super::metrics::{DropReason, TurnMetrics};
use super::policy::{PeerPolicy, Verdict};
use super::ratelog::RateLimit;
use super::relay::{RelayFactory, RelayState};
use super::table::{AllocMeta, Allocations, Refusal};
use super::transport::TcpTransport;
use super::wire::{self, Kind};
use crate::config::{Protocol, TurnTransport};

/// RFC 8656 §7.2: default allocation lifetime.
pub(crate) const DEFAULT_LIFETIME: u32 = 600;
/// RFC 8656 §7.2: the server's maximum allocation lifetime (3600 s recommended).
pub(crate) const MAX_LIFETIME: u32 = 3600;
/// RFC 8656 §11: channel bindings last 10 minutes.
const CHANNEL_BIND_LIFETIME: Duration = Duration::from_secs(600);
/// Channel numbers clients may bind (RFC 5766 range; RFC 8656 narrows it to 0x4FFF but
/// coturn clients pick from the whole range).
const CHANNEL_RANGE: std::ops::RangeInclusive<u16> = 0x4000..=0x7FFF;

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

/// State shared by all listeners of the service.
pub(crate) struct Core {
    auth: Authenticator,
    nonces: Nonces,
    pub(crate) policy: Arc<PeerPolicy>,
    pub(crate) metrics: TurnMetrics,
    /// Allocations, reservations and their quota units.
    pub(crate) allocs: Allocations,
    auth_log: RateLimit,
    pub(crate) refusal_log: Arc<RateLimit>,
    /// TURN-over-TCP accept errors, refused and closed connections.
    pub(crate) tcp_log: Arc<RateLimit>,
    malformed_log: RateLimit,
    pub(crate) misc_log: Arc<RateLimit>,
    /// Debug lines about allocations being created and deleted.
    pub(crate) alloc_log: RateLimit,
}

impl Core {
    pub(crate) fn new(
        auth: Authenticator,
        policy: Arc<PeerPolicy>,
        metrics: TurnMetrics,
        quota: usize,
        max_units: usize,
    ) -> Self {
        let window = Duration::from_secs(10);
        Core {
            auth,
            nonces: Nonces::new(),
            policy,
            allocs: Allocations::new(metrics.clone(), quota, max_units),
            metrics,
            auth_log: RateLimit::new("turn_auth_failure", window, 10),
            refusal_log: Arc::new(RateLimit::new("turn_peer_refused", window, 10)),
            tcp_log: Arc::new(RateLimit::new("turn_tcp", window, 10)),
            malformed_log: RateLimit::new("turn_malformed", window, 5),
            misc_log: Arc::new(RateLimit::new("turn_other", window, 10)),
            alloc_log: RateLimit::new("turn_allocation", window, 20),
        }
    }
}

struct Authed {
    username: String,
    key: Vec<u8>,
}

/// One TURN listener: its transport, its allocation manager and its request loop.
pub(crate) struct Listener {
    pub(crate) idx: usize,
    pub(crate) protocol: TurnTransport,
    pub(crate) local: SocketAddr,
    core: Arc<Core>,
    conn: Arc<dyn Conn + Send + Sync>,
    pub(crate) manager: Arc<Manager>,
    relays: Arc<RelayFactory>,
    /// The TCP transport, to mark connections that made an allocation.
    tcp: Option<Arc<TcpTransport>>,
    crate_nonces: Arc<tokio::sync::Mutex<HashMap<String, tokio::time::Instant>>>,
    auth_handler: Arc<dyn AuthHandler + Send + Sync>,
}

fn error_attr(code: u16, reason: &str) -> Box<dyn Setter> {
    Box::new(ErrorCodeAttribute {
        code: ErrorCode(code),
        reason: reason.as_bytes().to_vec(),
    })
}

/// A username fit for a log line: bounded and escaped by `Debug` formatting.
fn loggable(username: &str) -> String {
    username.chars().take(64).collect()
}

fn requested_lifetime(m: &Message) -> Option<u32> {
    let v = m.get(ATTR_LIFETIME).ok()?;
    let b: [u8; 4] = v.as_slice().try_into().ok()?;
    Some(u32::from_be_bytes(b))
}

impl Listener {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        idx: usize,
        protocol: TurnTransport,
        local: SocketAddr,
        core: Arc<Core>,
        conn: Arc<dyn Conn + Send + Sync>,
        manager: Arc<Manager>,
        relays: Arc<RelayFactory>,
        tcp: Option<Arc<TcpTransport>>,
    ) -> Self {
        let auth_handler: Arc<dyn AuthHandler + Send + Sync> = Arc::new(core.auth.clone());
        Listener {
            idx,
            protocol,
            local,
            core,
            conn,
            manager,
            relays,
            tcp,
            crate_nonces: Arc::new(tokio::sync::Mutex::new(HashMap::new())),
            auth_handler,
        }
    }

    fn five_tuple(&self, src: SocketAddr) -> FiveTuple {
        FiveTuple {
            protocol: PROTO_UDP,
            src_addr: src,
            dst_addr: self.local,
        }
    }

    /// Reads and handles packets until cancelled or the transport closes.
    pub(crate) async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut buf = vec![0u8; wire::MAX_FRAME + 64];
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
            let handled = AssertUnwindSafe(self.handle(pkt, src)).catch_unwind().await;
            if handled.is_err() {
                self.core.metrics.dropped(DropReason::Malformed).inc();
                if self.core.malformed_log.allow() {
                    tracing::error!(client = %src, listen = %self.local, "TURN: panic while handling a packet (dropped)");
                }
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

    fn malformed(&self, src: SocketAddr, what: &'static str) {
        self.core.metrics.dropped(DropReason::Malformed).inc();
        if self.core.malformed_log.allow() {
            tracing::debug!(client = %src, listen = %self.local, what, "TURN: malformed packet dropped");
        }
    }

    /// Hands a packet to the crate's request handler (data path and Binding).
    async fn to_crate(&self, pkt: &[u8], src: SocketAddr) {
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

    fn build(
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
    fn reply(
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

    fn fail(
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

    fn auth_failed(&self, reason: AuthFailure, username: &str, src: SocketAddr) {
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

    fn refused(&self, src: SocketAddr, username: &str, peers: &[SocketAddr], what: &'static str) {
        self.core
            .metrics
            .permission_denied
            .inc_by(peers.len() as u64);
        let loops = peers
            .iter()
            .filter(|p| self.core.policy.verdict(**p) == Verdict::Loop)
            .count();
        self.core.metrics.loop_refused.inc_by(loops as u64);
        if self.core.refusal_log.allow() {
            tracing::warn!(
                client = %src,
                username = ?loggable(username),
                peers = ?peers,
                request = what,
                own_ports = loops,
                "TURN: peer outside turn.relay.peers refused (own_ports: the gateway's own ports, a loop)"
            );
        }
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

    /// Drops EVEN-PORT reservations whose 30 seconds have passed and gives their quota
    /// units back (called every second by the service and before each Allocate).
    pub(crate) fn expire_reservations(&self) {
        for owner in self.relays.take_expired() {
            self.core.allocs.reservation_released(&owner);
        }
    }

    /// Answers an Allocate that got no quota unit: 486 (per-user quota) or 508 (global cap).
    fn refuse(
        &self,
        m: &Message,
        src: SocketAddr,
        user: &str,
        why: Refusal,
        k: &[u8],
    ) -> impl Future<Output = ()> + Send + '_ {
        let (counter, code, reason, what) = match why {
            Refusal::Quota => (
                &self.core.metrics.quota_exceeded,
                486,
                "Allocation Quota Reached",
                "TURN allocation quota reached (turn.quota.allocations_per_user)",
            ),
            Refusal::Capacity => (
                &self.core.metrics.capacity_exceeded,
                508,
                "Insufficient Capacity",
                "TURN allocation cap reached (turn.quota.max_allocations)",
            ),
        };
        counter.inc();
        if self.core.misc_log.allow() {
            tracing::warn!(
                client = %src,
                username = ?loggable(user),
                quota = self.core.allocs.quota,
                max_allocations = self.core.allocs.max_units,
                "{what}"
            );
        }
        self.fail(m, src, code, reason, k)
    }

    /// RFC 8656 §7.2.
    async fn allocate(&self, m: &Message, src: SocketAddr, auth: Authed) {
        let ft = self.five_tuple(src);
        let key = (self.idx, ft);
        let k = auth.key.as_slice();
        self.expire_reservations();
        if self.manager.get_allocation(&ft).await.is_some() {
            match self.core.allocs.retransmission(&key, m.transaction_id) {
                Some(resp) => {
                    let _ = self.conn.send_to(&resp, src).await;
                }
                None => self.fail(m, src, 437, "Allocation Mismatch", k).await,
            }
            return;
        }
        match m.get(ATTR_REQUESTED_TRANSPORT) {
            Ok(v) if v.len() == 4 => {
                if v[0] != 17 {
                    return self
                        .fail(m, src, 442, "Unsupported Transport Protocol", k)
                        .await;
                }
            }
            _ => return self.fail(m, src, 400, "Bad Request", k).await,
        }
        let token = m.get(ATTR_RESERVATION_TOKEN).ok();
        let even = m.get(ATTR_EVEN_PORT).ok();
        let family = m.get(ATTR_REQUESTED_ADDRESS_FAMILY).ok();
        if token.is_some() && (even.is_some() || family.is_some()) {
            return self.fail(m, src, 400, "Bad Request", k).await;
        }
        if even.as_ref().is_some_and(|e| e.len() != 1)
            || token.as_ref().is_some_and(|t| t.len() != 8)
        {
            return self.fail(m, src, 400, "Bad Request", k).await;
        }
        let want_ipv4 = match family.as_deref() {
            None => true,
            Some([1, 0, 0, 0]) => true,
            Some([2, 0, 0, 0]) => false,
            Some(_) => {
                return self
                    .fail(m, src, 440, "Address Family not Supported", k)
                    .await;
            }
        };
        if want_ipv4 != self.relays.is_ipv4() {
            return self
                .fail(m, src, 440, "Address Family not Supported", k)
                .await;
        }
        let user = auth.username.as_str();
        // Quota units: one for the allocation, one more for an EVEN-PORT reservation.
        let mut reservation = None;
        let requested_port = if let Some(t) = &token {
            let Some(owner) = self.relays.reservation_owner(t) else {
                return self.fail(m, src, 508, "Insufficient Capacity", k).await;
            };
            let by_owner = owner == user;
            if !by_owner && let Err(r) = self.core.allocs.reserve(user) {
                return self.refuse(m, src, user, r, k).await;
            }
            match self.relays.take_reservation(t) {
                Some((port, owner)) => {
                    self.core.allocs.reservation_used(&owner, by_owner);
                    port
                }
                None => {
                    if !by_owner {
                        self.core.allocs.unreserve(user);
                    }
                    return self.fail(m, src, 508, "Insufficient Capacity", k).await;
                }
            }
        } else {
            if let Err(r) = self.core.allocs.reserve(user) {
                return self.refuse(m, src, user, r, k).await;
            }
            match &even {
                Some(e) => {
                    let reserve_next = e[0] & 0x80 != 0;
                    if reserve_next && let Err(r) = self.core.allocs.reserve(user) {
                        self.core.allocs.unreserve(user);
                        return self.refuse(m, src, user, r, k).await;
                    }
                    match self.relays.prebind_even(reserve_next, user).await {
                        Some((p, tok)) => {
                            if tok.is_some() {
                                self.core.allocs.reservation_added();
                            }
                            reservation = tok;
                            p
                        }
                        None => {
                            self.core.allocs.unreserve(user);
                            if reserve_next {
                                self.core.allocs.unreserve(user);
                            }
                            return self.fail(m, src, 508, "Insufficient Capacity", k).await;
                        }
                    }
                }
                None => 0,
            }
        };
        let lifetime = requested_lifetime(m)
            .unwrap_or(DEFAULT_LIFETIME)
            .clamp(DEFAULT_LIFETIME, MAX_LIFETIME);
        let lifetime = Duration::from_secs(lifetime.into());
        let created = self
            .manager
            .create_allocation(
                ft,
                Arc::clone(&self.conn),
                requested_port,
                lifetime,
                TextAttribute::new(ATTR_USERNAME, auth.username.clone()),
                want_ipv4,
            )
            .await;
        let relay = self.relays.take_last_created();
        let relay = match (created, relay) {
            (Ok(_), Some(relay)) => relay,
            (result, _) => {
                self.core.allocs.unreserve(&auth.username);
                if requested_port != 0 {
                    self.relays.release_prebound(requested_port);
                }
                if reservation.is_some()
                    && let Some(owner) = self.relays.release_prebound(requested_port + 1)
                {
                    self.core.allocs.reservation_released(&owner);
                }
                if let Err(e) = result
                    && self.core.misc_log.allow()
                {
                    tracing::warn!(client = %src, error = %e, "TURN allocation failed");
                }
                return self.fail(m, src, 508, "Insufficient Capacity", k).await;
            }
        };
        // Setters are not `Send`: build the response in a block that ends before any await.
        let response = {
            let mut attrs: Vec<Box<dyn Setter>> = vec![
                Box::new(RelayedAddress {
                    ip: relay.advertised.ip(),
                    port: relay.advertised.port(),
                }),
                Box::new(Lifetime(lifetime)),
                Box::new(XorMappedAddress {
                    ip: src.ip(),
                    port: src.port(),
                }),
            ];
            if let Some(t) = reservation {
                attrs.push(Box::new(ReservationToken(t.to_vec())));
            }
            self.build(m, CLASS_SUCCESS_RESPONSE, attrs, Some(k))
                .unwrap_or_default()
        };
        if self.core.alloc_log.allow() {
            tracing::debug!(
                client = %src,
                transport = %self.protocol,
                username = ?loggable(&auth.username),
                relay = %relay.advertised,
                lifetime_s = lifetime.as_secs(),
                "TURN allocation created"
            );
        }
        self.core.allocs.commit(
            key,
            AllocMeta {
                username: auth.username,
                relay,
                txid: m.transaction_id,
                response: response.clone(),
            },
        );
        self.core.metrics.allocations_created.inc();
        if let Some(t) = &self.tcp {
            t.mark_allocated(src);
        }
        let _ = self.conn.send_to(&response, src).await;
    }

    /// The allocation of `src` and its relay state, or the error already answered.
    async fn existing(
        &self,
        m: &Message,
        src: SocketAddr,
        auth: &Authed,
    ) -> Option<(Arc<turn::allocation::Allocation>, Arc<RelayState>)> {
        let ft = self.five_tuple(src);
        let k = auth.key.as_slice();
        let alloc = self.manager.get_allocation(&ft).await;
        let meta = self.core.allocs.lookup(&(self.idx, ft));
        let (Some(alloc), Some((owner, relay))) = (alloc, meta) else {
            self.fail(m, src, 437, "Allocation Mismatch", k).await;
            return None;
        };
        if owner != auth.username {
            self.auth_failed(AuthFailure::WrongCredentials, &auth.username, src);
            self.fail(m, src, 441, "Wrong Credentials", k).await;
            return None;
        }
        Some((alloc, relay))
    }

    fn peers(m: &Message) -> Option<Vec<SocketAddr>> {
        wire::attributes(&m.raw)
            .filter(|(t, _)| *t == ATTR_XOR_PEER_ADDRESS.value())
            .map(|(_, v)| wire::xor_address(v, &m.transaction_id.0))
            .collect()
    }

    /// RFC 8656 §7.3.
    async fn refresh(&self, m: &Message, src: SocketAddr, auth: Authed) {
        let Some((alloc, relay)) = self.existing(m, src, &auth).await else {
            return;
        };
        let k = auth.key.as_slice();
        if let Ok(v) = m.get(ATTR_REQUESTED_ADDRESS_FAMILY) {
            let ipv4 = v.first() == Some(&1);
            if ipv4 != relay.advertised.is_ipv4() {
                return self
                    .fail(m, src, 443, "Peer Address Family Mismatch", k)
                    .await;
            }
        }
        let lifetime = requested_lifetime(m).map_or(DEFAULT_LIFETIME, |l| l.min(MAX_LIFETIME));
        let lifetime = Duration::from_secs(lifetime.into());
        if lifetime.is_zero() {
            drop(alloc);
            let ft = self.five_tuple(src);
            self.manager.delete_allocation(&ft).await;
            self.core.allocs.remove(&(self.idx, ft), None);
            if self.core.alloc_log.allow() {
                tracing::debug!(client = %src, relay = %relay.advertised, "TURN allocation deleted by the client");
            }
        } else {
            alloc.refresh(lifetime).await;
        }
        let attrs: Vec<Box<dyn Setter>> = vec![Box::new(Lifetime(lifetime))];
        self.reply(m, src, CLASS_SUCCESS_RESPONSE, attrs, Some(k))
            .await;
    }

    /// RFC 8656 §9.2.
    async fn create_permission(&self, m: &Message, src: SocketAddr, auth: Authed) {
        let Some((alloc, relay)) = self.existing(m, src, &auth).await else {
            return;
        };
        let k = auth.key.as_slice();
        let peers = match Self::peers(m) {
            Some(p) if !p.is_empty() => p,
            _ => return self.fail(m, src, 400, "Bad Request", k).await,
        };
        if peers
            .iter()
            .any(|p| p.is_ipv4() != relay.advertised.is_ipv4())
        {
            return self
                .fail(m, src, 443, "Peer Address Family Mismatch", k)
                .await;
        }
        let refused: Vec<SocketAddr> = peers
            .iter()
            .copied()
            .filter(|p| !self.core.policy.allows(*p))
            .collect();
        if !refused.is_empty() {
            self.refused(src, &auth.username, &refused, "CreatePermission");
            return self.fail(m, src, 403, "Forbidden", k).await;
        }
        for p in peers {
            alloc.add_permission(Permission::new(p)).await;
            relay.permit(p.ip());
        }
        self.reply(m, src, CLASS_SUCCESS_RESPONSE, vec![], Some(k))
            .await;
    }

    /// RFC 8656 §11.2.
    async fn channel_bind(&self, m: &Message, src: SocketAddr, auth: Authed) {
        let Some((alloc, relay)) = self.existing(m, src, &auth).await else {
            return;
        };
        let k = auth.key.as_slice();
        let number = match m.get(ATTR_CHANNEL_NUMBER) {
            Ok(v) if v.len() == 4 => u16::from_be_bytes([v[0], v[1]]),
            _ => return self.fail(m, src, 400, "Bad Request", k).await,
        };
        let peer = match Self::peers(m).and_then(|p| p.first().copied()) {
            Some(p) => p,
            None => return self.fail(m, src, 400, "Bad Request", k).await,
        };
        if !CHANNEL_RANGE.contains(&number) {
            return self.fail(m, src, 400, "Bad Request", k).await;
        }
        if peer.is_ipv4() != relay.advertised.is_ipv4() {
            return self
                .fail(m, src, 443, "Peer Address Family Mismatch", k)
                .await;
        }
        if !self.core.policy.allows(peer) {
            self.refused(src, &auth.username, &[peer], "ChannelBind");
            return self.fail(m, src, 403, "Forbidden", k).await;
        }
        let bound = alloc
            .add_channel_bind(
                ChannelBind::new(ChannelNumber(number), peer),
                CHANNEL_BIND_LIFETIME,
            )
            .await;
        if bound.is_err() {
            // The channel is bound to another peer, or the peer to another channel.
            return self.fail(m, src, 400, "Bad Request", k).await;
        }
        relay.permit(peer.ip());
        self.reply(m, src, CLASS_SUCCESS_RESPONSE, vec![], Some(k))
            .await;
    }

    /// Send indication: the policy first, then the crate relays it.
    async fn send_indication(&self, m: &Message, pkt: &[u8], src: SocketAddr) {
        let Some(peer) = Self::peers(m).and_then(|p| p.first().copied()) else {
            return self.malformed(src, "Send indication without XOR-PEER-ADDRESS");
        };
        if !self.core.policy.allows(peer) {
            let user = self
                .core
                .allocs
                .lookup(&(self.idx, self.five_tuple(src)))
                .map(|(u, _)| u)
                .unwrap_or_default();
            self.refused(src, &user, &[peer], "Send");
            return;
        }
        self.to_crate(pkt, src).await;
    }
}
