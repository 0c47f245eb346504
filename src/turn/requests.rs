//! The authenticated TURN requests of a listener (RFC 8656): Allocate with quotas,
//! EVEN-PORT and RESERVATION-TOKEN; Refresh; CreatePermission and ChannelBind under the
//! peer policy; and Send indications that the data path left to the control path. The
//! allocation machinery is the `turn` crate's; the service mirrors what the data path
//! needs (the client end, permissions and channels) into the allocation's `RelayState`.
//!
//! Dual stack (`turn.relay.address` with one address per family): REQUESTED-ADDRESS-FAMILY
//! picks the family the crate allocates in (440 when it has no relay address);
//! ADDITIONAL-ADDRESS-FAMILY adds an IPv6 relay socket made by the same generator but kept
//! out of the crate, hung on the allocation's `RelayState` (it ends with it, or alone on a
//! Refresh 0 for IPv6) and counted as a second quota unit. Permissions and channels go to
//! the relay of the peer's family; a family without one is 443.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use stun::attributes::*;
use stun::message::*;
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;
use turn::allocation::channel_bind::ChannelBind;
use turn::allocation::permission::Permission;
use turn::proto::channum::ChannelNumber;
use turn::proto::lifetime::Lifetime;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::rsrvtoken::ReservationToken;

use super::auth::AuthFailure;
use super::metrics::DropReason;
use super::relay::{ClientEnd, RelayGenerator, RelayState};
use super::server::{
    Authed, CHANNEL_BIND_LIFETIME, DEFAULT_LIFETIME, Listener, MAX_LIFETIME, requested_lifetime,
};
use super::shared::loggable;
use super::table::{AllocMeta, Refusal};
use super::wire;
use turn::relay::RelayAddressGenerator;

/// RFC 8656 §18.11: ADDITIONAL-ADDRESS-FAMILY (comprehension-optional).
const ATTR_ADDITIONAL_ADDRESS_FAMILY: AttrType = AttrType(0x8000);
/// RFC 8656 §18.12: ADDRESS-ERROR-CODE (comprehension-optional).
const ATTR_ADDRESS_ERROR_CODE: AttrType = AttrType(0x8001);

/// ADDRESS-ERROR-CODE: why the IPv6 half of a dual allocation was not created.
struct AddressErrorCode {
    code: u16,
    reason: &'static str,
}

impl Setter for AddressErrorCode {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        // Family (IPv6), reserved, class, number, reason phrase.
        let mut v = vec![0x02, 0, (self.code / 100) as u8, (self.code % 100) as u8];
        v.extend_from_slice(self.reason.as_bytes());
        m.add(ATTR_ADDRESS_ERROR_CODE, &v);
        Ok(())
    }
}

/// Channel numbers clients may bind (RFC 5766 range; RFC 8656 narrows it to 0x4FFF but
/// coturn clients pick from the whole range).
const CHANNEL_RANGE: std::ops::RangeInclusive<u16> = 0x4000..=0x7FFF;

impl Listener {
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
    pub(super) async fn allocate(&self, m: &Message, src: SocketAddr, auth: Authed) {
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
        let additional = m.get(ATTR_ADDITIONAL_ADDRESS_FAMILY).ok();
        if token.is_some() && (even.is_some() || family.is_some() || additional.is_some())
            || family.is_some() && additional.is_some()
        {
            return self.fail(m, src, 400, "Bad Request", k).await;
        }
        // RFC 8656 §7.2: ADDITIONAL-ADDRESS-FAMILY asks for an IPv6 relayed address beside
        // the IPv4 one; any other value is a bad request.
        let want_dual = match additional.as_deref() {
            None => false,
            Some([2, 0, 0, 0]) => true,
            Some(_) => return self.fail(m, src, 400, "Bad Request", k).await,
        };
        if even.as_ref().is_some_and(|e| e.len() != 1)
            || token.as_ref().is_some_and(|t| t.len() != 8)
        {
            return self.fail(m, src, 400, "Bad Request", k).await;
        }
        let mut want_ipv4 = match family.as_deref() {
            // Without a family the default one (`turn.relay.default_family`); a dual
            // allocation's first relayed address is IPv4 whatever the default.
            None => want_dual || self.relays.default_ipv4(src),
            Some([1, 0, 0, 0]) => true,
            Some([2, 0, 0, 0]) => false,
            Some(_) => {
                return self
                    .fail(m, src, 440, "Address Family not Supported", k)
                    .await;
            }
        };
        if token.is_none() && !self.relays.serves(want_ipv4) {
            return self
                .fail(m, src, 440, "Address Family not Supported", k)
                .await;
        }
        // Without an IPv6 relay address the allocation is IPv4 only, and the response
        // says why (ADDRESS-ERROR-CODE 440).
        let dual = want_dual && self.relays.serves(false);
        let units = 1 + usize::from(dual);
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
                Some((port, owner, ipv4)) => {
                    self.core.allocs.reservation_used(&owner, by_owner);
                    want_ipv4 = ipv4;
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
            if let Err(r) = self.core.allocs.reserve_n(user, units) {
                return self.refuse(m, src, user, r, k).await;
            }
            match &even {
                Some(e) => {
                    let reserve_next = e[0] & 0x80 != 0;
                    if reserve_next && let Err(r) = self.core.allocs.reserve(user) {
                        self.core.allocs.unreserve_n(user, units);
                        return self.refuse(m, src, user, r, k).await;
                    }
                    match self
                        .relays
                        .prebind_even(reserve_next, user, want_ipv4)
                        .await
                    {
                        Some((p, tok)) => {
                            if tok.is_some() {
                                self.core.allocs.reservation_added();
                            }
                            reservation = tok;
                            p
                        }
                        None => {
                            self.core.allocs.unreserve_n(user, units);
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
        let (created, relay) = super::relay::created_by(self.manager.create_allocation(
            ft,
            Arc::clone(&self.conn),
            requested_port,
            lifetime,
            TextAttribute::new(ATTR_USERNAME, auth.username.clone()),
            want_ipv4,
        ))
        .await;
        let relay = match (created, relay) {
            (Ok(_), Some(relay)) => relay,
            (result, _) => {
                self.core.allocs.unreserve_n(&auth.username, units);
                if requested_port != 0 {
                    self.relays.release_prebound(requested_port, want_ipv4);
                }
                if reservation.is_some()
                    && let Some(owner) = self.relays.release_prebound(requested_port + 1, want_ipv4)
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
        // The IPv6 half of a dual allocation: a relay socket of its own, outside the
        // crate, ending with the allocation. Without one the allocation stays IPv4 only.
        let address_error = if dual {
            let extra = super::relay::created_by(
                RelayGenerator(Arc::clone(&self.relays)).allocate_conn(false, 0),
            )
            .await;
            match extra {
                (Ok((conn, _)), Some(state)) => {
                    relay.set_additional(state, conn);
                    None
                }
                (result, _) => {
                    self.core.allocs.unreserve(&auth.username);
                    if let Err(e) = result
                        && self.core.misc_log.allow()
                    {
                        tracing::warn!(client = %src, error = %e, "TURN: IPv6 relay of a dual allocation failed");
                    }
                    Some(AddressErrorCode {
                        code: 508,
                        reason: "Insufficient Capacity",
                    })
                }
            }
        } else if want_dual {
            Some(AddressErrorCode {
                code: 440,
                reason: "Address Family not Supported",
            })
        } else {
            None
        };
        // Setters are not `Send`: build the response in a block that ends before any await.
        let response = {
            let mut attrs: Vec<Box<dyn Setter>> = vec![Box::new(RelayedAddress {
                ip: relay.advertised.ip(),
                port: relay.advertised.port(),
            })];
            if let Some(a) = relay.additional() {
                attrs.push(Box::new(RelayedAddress {
                    ip: a.advertised.ip(),
                    port: a.advertised.port(),
                }));
            }
            if let Some(e) = address_error {
                attrs.push(Box::new(e));
            }
            attrs.push(Box::new(Lifetime(lifetime)));
            attrs.push(Box::new(XorMappedAddress {
                ip: src.ip(),
                port: src.port(),
            }));
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
                additional = ?relay.additional().map(|a| a.advertised),
                lifetime_s = lifetime.as_secs(),
                "TURN allocation created"
            );
        }
        let udp_listen = (self.protocol == crate::config::TurnTransport::Udp).then_some(self.local);
        // Over TCP/TLS frames go straight to the connection's outbox.
        let sink = self
            .tcp
            .as_ref()
            .and_then(|t| t.connection_sink(src))
            .unwrap_or_else(|| Arc::clone(&self.sink));
        if let Some(a) = relay.additional() {
            super::peer_reader::start(
                &self.relays,
                a,
                ClientEnd {
                    addr: src,
                    sink: Arc::clone(&sink),
                    udp_listen,
                },
            );
        }
        super::peer_reader::start(
            &self.relays,
            &relay,
            ClientEnd {
                addr: src,
                sink,
                udp_listen,
            },
        );
        let units = 1 + usize::from(relay.additional().is_some());
        self.core.allocs.commit(
            key,
            AllocMeta {
                username: auth.username,
                relay,
                txid: m.transaction_id,
                response: response.clone(),
                units,
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
    pub(super) async fn refresh(&self, m: &Message, src: SocketAddr, auth: Authed) {
        let Some((alloc, relay)) = self.existing(m, src, &auth).await else {
            return;
        };
        let k = auth.key.as_slice();
        let family = m
            .get(ATTR_REQUESTED_ADDRESS_FAMILY)
            .ok()
            .map(|v| v.first() == Some(&1));
        if let Some(ipv4) = family
            && relay.for_family(ipv4).is_none()
        {
            return self
                .fail(m, src, 443, "Peer Address Family Mismatch", k)
                .await;
        }
        let lifetime = requested_lifetime(m).map_or(DEFAULT_LIFETIME, |l| l.min(MAX_LIFETIME));
        let lifetime = Duration::from_secs(lifetime.into());
        let additional_alone = family == Some(false) && relay.advertised.is_ipv4();
        if lifetime.is_zero() && additional_alone {
            // RFC 8656 §7.3: the IPv6 relayed address of a dual allocation alone ends;
            // its quota unit is given back.
            relay.end_additional();
            self.core
                .allocs
                .release_additional(&(self.idx, self.five_tuple(src)));
            if self.core.alloc_log.allow() {
                tracing::debug!(client = %src, relay = %relay.advertised, "TURN: IPv6 relayed address of a dual allocation deleted by the client");
            }
        } else if lifetime.is_zero() {
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
    pub(super) async fn create_permission(&self, m: &Message, src: SocketAddr, auth: Authed) {
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
            .any(|p| relay.for_family(p.is_ipv4()).is_none())
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
            if let Some(r) = relay.for_family(p.is_ipv4()) {
                r.permit(p.ip());
            }
        }
        self.reply(m, src, CLASS_SUCCESS_RESPONSE, vec![], Some(k))
            .await;
    }

    /// RFC 8656 §11.2.
    pub(super) async fn channel_bind(&self, m: &Message, src: SocketAddr, auth: Authed) {
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
        if relay.for_family(peer.is_ipv4()).is_none() {
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
        if let Some(r) = relay.for_family(peer.is_ipv4()) {
            r.bind_channel(number, peer);
        }
        self.reply(m, src, CLASS_SUCCESS_RESPONSE, vec![], Some(k))
            .await;
    }

    /// Send indication: the policy first, then the crate relays it.
    pub(super) async fn send_indication(&self, m: &Message, pkt: &[u8], src: SocketAddr) {
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
        let state = self
            .core
            .allocs
            .lookup(&(self.idx, self.five_tuple(src)))
            .map(|(_, s)| s);
        if let Some(state) = state
            && peer.is_ipv4() != state.advertised.is_ipv4()
        {
            // The other family: the additional relay of a dual allocation, which the
            // crate does not know; else no relay for this peer (dropped, RFC 8656 §10.2).
            let metrics = &self.core.metrics;
            let data = wire::attributes(pkt)
                .find(|(t, _)| *t == ATTR_DATA.value())
                .map(|(_, v)| v);
            match (state.for_family(peer.is_ipv4()), data) {
                (Some(r), Some(data)) if r.has_permission(peer.ip()) => {
                    match r.socket().send_to(data, peer) {
                        Ok(n) => {
                            metrics.packets_to_peer.inc();
                            metrics.bytes_to_peer.inc_by(n as u64);
                        }
                        Err(_) => {
                            metrics.dropped(DropReason::SendError).inc();
                        }
                    }
                }
                _ => {
                    metrics.dropped(DropReason::NoPermission).inc();
                }
            }
            return;
        }
        self.to_crate(pkt, src).await;
    }
}
