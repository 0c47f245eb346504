//! The relay data path, owned by the service instead of the `turn` crate.
//!
//! The crate keeps the control messages (Allocate, Refresh, CreatePermission, ChannelBind
//! and their timers, see `server`); the data does not go through it. Measured with
//! `mediagate-load turn` (100 allocations, ChannelData, 160 B), the crate's path spent its
//! time in one task per listener that copied every packet into a fresh `Request`, took the
//! manager's allocation-map lock (one lock for every allocation) and awaited boxed futures
//! per packet, and in the peer → client direction allocated twice per packet.
//!
//! Here:
//! - client → peer: the listener's reader (UDP: `recvmmsg` batches; TCP/TLS: the
//!   connection's own reader task) calls [`DataPath::client_packet`] for every packet
//!   before anything else. ChannelData and Send indications are relayed right there, with
//!   one non-blocking `sendto` on the allocation's relay socket: no copy, no allocation, no
//!   task hop. The route (client → [`RelayState`]) is cached by the reader (a weak
//!   reference: an ended allocation's socket closes at once); a miss (first
//!   packet of an allocation) looks it up in the allocation table once.
//! - peer → client: the relay socket's reader ([`super::relay`]) builds the ChannelData
//!   header in front of the payload it received (or a Data indication for peers without
//!   a channel) and hands the frame to the listener's [`ClientSink`].
//!
//! What is enforced stays the same as on the crate's path: the peer policy on every
//! datagram (refusals counted in `permission_denied` and `loop_refused`), channel
//! bindings with their 10-minute lifetime, permissions with their 5-minute lifetime
//! (refreshed by CreatePermission and ChannelBind), the allocation's end (its relay
//! state is marked closed when the crate closes the relay socket) and the metrics.
//! Everything else (STUN requests, Send indications with FINGERPRINT) goes the control
//! path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use turn::allocation::five_tuple::FiveTuple;
use turn::proto::PROTO_UDP;

use super::metrics::DropReason;
use super::policy::Verdict;
use super::relay::RelayState;
use super::shared::Core;
pub(crate) use super::sink::ClientSink;
use super::wire;

/// A reader's cached route for one client: the allocation's relay state, held weakly so
/// that a cached route never keeps an ended allocation's relay socket (its descriptor and
/// port) open.
pub(crate) type Route = Option<Weak<RelayState>>;

/// Routes cached by one reader: client address → the allocation's relay state.
pub(crate) type RouteCache = HashMap<SocketAddr, Route>;

/// The data path of one listener.
pub(crate) struct DataPath {
    idx: usize,
    local: SocketAddr,
    core: Arc<Core>,
}

/// ATTR FINGERPRINT.
const FINGERPRINT: u16 = 0x8028;
const XOR_PEER_ADDRESS: u16 = 0x0012;
const DATA: u16 = 0x0013;

impl DataPath {
    pub(crate) fn new(idx: usize, local: SocketAddr, core: Arc<Core>) -> Self {
        DataPath { idx, local, core }
    }

    fn five_tuple(&self, client: SocketAddr) -> FiveTuple {
        FiveTuple {
            protocol: PROTO_UDP,
            src_addr: client,
            dst_addr: self.local,
        }
    }

    /// The live allocation of `client`, from `cached` or the allocation table.
    fn route(&self, client: SocketAddr, cached: &mut Route) -> Option<Arc<RelayState>> {
        if let Some(s) = cached
            .as_ref()
            .and_then(Weak::upgrade)
            .filter(|s| !s.is_closed())
        {
            return Some(s);
        }
        let live = self
            .core
            .allocs
            .lookup(&(self.idx, self.five_tuple(client)))
            .map(|(_, s)| s)
            .filter(|s| !s.is_closed());
        *cached = live.as_ref().map(Arc::downgrade);
        live
    }

    /// Relays `pkt` from `client` if it is ChannelData or a Send indication; returns
    /// false for anything else (the control path takes it). `cached` is the reader's
    /// route for this client.
    pub(crate) fn client_packet(&self, pkt: &[u8], client: SocketAddr, cached: &mut Route) -> bool {
        match pkt.first() {
            Some(0x40..=0x7F) => {
                if wire::classify(pkt) != wire::Kind::ChannelData {
                    return false; // the control path counts it as malformed
                }
                self.channel_data(pkt, client, cached);
                true
            }
            // A Send indication: method 0x006, class indication (type 0x0016).
            Some(0x00) if pkt.get(1) == Some(&0x16) => {
                if wire::classify(pkt) != wire::Kind::Stun {
                    return false;
                }
                self.send_indication(pkt, client, cached)
            }
            _ => false,
        }
    }

    fn channel_data(&self, pkt: &[u8], client: SocketAddr, cached: &mut Route) {
        let m = &self.core.metrics;
        let Some(state) = self.route(client, cached) else {
            m.dropped(DropReason::NoAllocation).inc();
            return;
        };
        let number = u16::from_be_bytes([pkt[0], pkt[1]]);
        let len = u16::from_be_bytes([pkt[2], pkt[3]]) as usize;
        let Some((relay, peer)) = state.channel(number) else {
            m.dropped(DropReason::NoPermission).inc();
            return;
        };
        self.to_peer(relay, &pkt[4..4 + len], peer);
    }

    /// Send indications without FINGERPRINT (checking one needs the full decoder: those
    /// go the control path).
    fn send_indication(&self, pkt: &[u8], client: SocketAddr, cached: &mut Route) -> bool {
        let Ok(txid) = <[u8; 12]>::try_from(&pkt[8..20]) else {
            return false;
        };
        let mut peer = None;
        let mut data = None;
        for (t, v) in wire::attributes(pkt) {
            match t {
                FINGERPRINT => return false,
                XOR_PEER_ADDRESS if peer.is_none() => peer = wire::xor_address(v, &txid),
                DATA if data.is_none() => data = Some(v),
                _ => {}
            }
        }
        let (Some(peer), Some(data)) = (peer, data) else {
            return false; // malformed or without data: the control path answers/counts
        };
        let m = &self.core.metrics;
        if !self.core.policy.allows(peer) {
            let user = self
                .core
                .allocs
                .lookup(&(self.idx, self.five_tuple(client)))
                .map(|(u, _)| u)
                .unwrap_or_default();
            self.core.refused(client, &user, &[peer], "Send");
            return true;
        }
        let Some(state) = self.route(client, cached) else {
            m.dropped(DropReason::NoAllocation).inc();
            return true;
        };
        // A dual allocation relays each family from its own relayed address; a peer of
        // a family the allocation has no relay for has no permission.
        let Some(relay) = state
            .for_family(peer.is_ipv4())
            .filter(|r| r.has_permission(peer.ip()))
        else {
            m.dropped(DropReason::NoPermission).inc();
            return true;
        };
        self.to_peer(relay, data, peer);
        true
    }

    /// One datagram out of the allocation's relay socket, policy first.
    fn to_peer(&self, state: &RelayState, data: &[u8], peer: SocketAddr) {
        let m = &self.core.metrics;
        let verdict = self.core.policy.verdict(peer);
        if verdict != Verdict::Allowed {
            m.permission_denied.inc();
            if verdict == Verdict::Loop {
                m.loop_refused.inc();
            }
            if self.core.refusal_log.allow() {
                tracing::warn!(
                    relay = %state.advertised,
                    peer = %peer,
                    "TURN: datagram to a peer outside turn.relay.peers dropped"
                );
            }
            return;
        }
        match state.socket().send_to(data, peer) {
            Ok(n) => {
                m.packets_to_peer.inc();
                m.bytes_to_peer.inc_by(n as u64);
            }
            Err(_) => {
                m.dropped(DropReason::SendError).inc();
            }
        }
    }
}

/// Drops cached routes of allocations that ended, each time the cache has doubled since
/// the last pass (routes only exist for allocations, so it stays near their number).
/// What a stale route holds is only a weak reference: the relay socket closed with its
/// allocation.
pub(crate) fn prune(cache: &mut RouteCache, prune_at: &mut usize) {
    if cache.len() > *prune_at {
        cache.retain(|_, s| {
            s.as_ref()
                .and_then(Weak::upgrade)
                .is_some_and(|s| !s.is_closed())
        });
        *prune_at = 2 * cache.len() + 64;
    }
}
