//! The TURN relay's part of the kernel fast path (`turn.relay.offload: ebpf`): the data of
//! channel bindings of UDP allocations, relayed by the program of [`super`] instead of
//! the service's sockets.
//!
//! # Design
//!
//! User space keeps every TURN decision: authentication, Allocate, Refresh,
//! CreatePermission, ChannelBind, quotas, the peer policy, Send and Data indications, and
//! every datagram of an allocation before its channel is installed. The TURN service
//! (`crate::turn::kernel`) installs a channel once three things hold: the allocation's
//! client came over a UDP listener, the channel is bound, and the peer has a live
//! permission that the peer policy allows. It then writes two entries, in the same
//! program's maps as the UDP sessions:
//!
//! - `mg_turn_chan`: `(client ip:port → listener ip:port, channel number)` ⇒
//!   `(relay ip:port → peer ip:port)`. ChannelData from the client loses its 4-byte
//!   header (the payload moves up through a per-CPU buffer and the tail is trimmed) and
//!   leaves from the relay address to the peer.
//! - `mg_turn_peer`: `(peer ip:port → relay ip:port)` ⇒ `(listener ip:port → client
//!   ip:port, channel number)`. A datagram from the peer gets the ChannelData header and
//!   leaves for the client.
//!
//! Both carry `expires_ns`, the end of the channel or of the permission, whichever comes
//! first (`CLOCK_MONOTONIC`, as `bpf_ktime_get_ns`). From then on the program sends the
//! datagrams up, so the kernel never relays past a lifetime even between user space's
//! sweeps; a refresh (ChannelBind, CreatePermission) moves it. User space removes the
//! entries when the allocation ends, when the channel or permission lapses and when a
//! reload makes the policy refuse the peer (a sweep every second).
//!
//! The entries learn where their datagrams leave exactly as UDP sessions do: each from
//! the datagrams of its pair (the client's device from the client's ChannelData, the
//! peer's device from the peer's datagrams), so until the peer has sent once, both
//! directions go through user space. A listener or relay socket on `0.0.0.0` installs
//! its side with address 0, filled in by the first datagram that side receives.
//!
//! **Checksums.** The IP checksum and the UDP checksum (pseudo header, ports, length and
//! the header word) are updated incrementally; a zero UDP checksum stays zero;
//! `skb->csum` is kept exact for `CHECKSUM_COMPLETE` devices. The payload moves at the
//! tail end (`bpf_skb_change_tail` and a copy), never the headers, so a datagram that a
//! socket of this host sent with checksum offload (`CHECKSUM_PARTIAL`: only the
//! pseudo-header sum in the field, completed later from `csum_start`, which must keep
//! pointing at the UDP header) is relayed as well: `bpf_skb_adjust_room` would have moved
//! the headers away from `csum_start`.
//!
//! **IPv6.** An allocation whose client, listener, relayed address and peer are all IPv6
//! gets the same pair of entries in `mg_turn_chan6`/`mg_turn_peer6` (128-bit addresses; no
//! IP header checksum, the UDP checksum fixed through the pseudo header as for IPv4).
//!
//! **Left to user space:** mixed families (an IPv4 client relayed to an IPv6 peer, or the
//! reverse: the datagram would change its IP header, not only its addresses); TCP, TLS
//! and DTLS clients; padded ChannelData (padding
//! is optional over UDP and browsers send none); payloads over 2040 bytes or over the
//! egress device's MTU; GRO batches; link-layer padding (frames shorter than 60 bytes on
//! Ethernet). Counted like the rest: `mediagate_turn_relayed_packets_total` and
//! `mediagate_turn_relayed_bytes_total` include what the kernel relayed (summed from per-CPU counters at every scrape), and
//! `mediagate_turn_offload_packets_total` tells that part apart.

use super::engine::Slot;
use super::sys::{
    self, FlowKey, FlowKey6, FlowNat, MapKey, TurnChanKey, TurnChanKey6, TurnNat6, TurnPeerKey6,
};
use crate::metrics::Labels;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, Weak};

/// The TURN service's counters that the kernel's relaying adds to.
#[derive(Clone, Default)]
pub struct TurnCounters {
    pub packets_to_peer: Counter,
    pub bytes_to_peer: Counter,
    pub packets_to_client: Counter,
    pub bytes_to_client: Counter,
    pub offload_to_peer: Counter,
    pub offload_to_client: Counter,
    /// Channels installed now.
    pub channels: Gauge,
}

/// The TURN service's use of the engine: its counter slot and its channels' entries.
pub struct TurnOffload {
    slot: Slot,
    counters: TurnCounters,
}

/// The two entries of one installed channel (IPv4 or IPv6 maps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelEntries {
    V4 {
        /// Client ChannelData → peer (`mg_turn_chan`).
        chan: TurnChanKey,
        /// Peer → client (`mg_turn_peer`).
        peer: FlowKey,
    },
    V6 {
        /// `mg_turn_chan6`.
        chan: TurnChanKey6,
        /// `mg_turn_peer6`.
        peer: TurnPeerKey6,
    },
}

static USERS: Mutex<Vec<Weak<TurnOffload>>> = Mutex::new(Vec::new());

/// The fast path for the TURN service, or None (logged once per reason, counted in
/// `errors`, `mediagate_turn_offload_errors_total{reason}`): the relay then runs in user
/// space.
pub fn acquire_turn(
    errors: &Family<Labels, Counter>,
    counters: TurnCounters,
) -> Option<Arc<TurnOffload>> {
    let t = Arc::new(TurnOffload {
        slot: Slot::take(errors, "turn", "the TURN relay")?,
        counters,
    });
    let mut all = USERS.lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|w| w.strong_count() > 0);
    all.push(Arc::downgrade(&t));
    Some(t)
}

/// Adds what the kernel relayed to the TURN counters of every user (each scrape).
pub(super) fn refresh_all() {
    let all: Vec<Arc<TurnOffload>> = {
        let all = USERS.lock().unwrap_or_else(|p| p.into_inner());
        all.iter().filter_map(Weak::upgrade).collect()
    };
    for t in all {
        t.refresh();
    }
}

/// An IPv4 address for an entry: specific, `0.0.0.0` (a wildcard socket, also `[::]`) or
/// IPv4-mapped; None for IPv6.
fn entry_addr(a: SocketAddr) -> Option<SocketAddrV4> {
    match a {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            Some(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, a.port()))
        }
        SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .map(|ip| SocketAddrV4::new(ip, a.port())),
    }
}

/// A specific IPv4 address (a client or a peer).
fn host_addr(a: SocketAddr) -> Option<SocketAddrV4> {
    entry_addr(a).filter(|a| !a.ip().is_unspecified())
}

/// An IPv6 address for an entry: specific or `::` (a wildcard socket); None for IPv4 and
/// IPv4-mapped addresses.
fn entry_addr6(a: SocketAddr) -> Option<SocketAddrV6> {
    match a {
        SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_none() => {
            Some(SocketAddrV6::new(*a.ip(), a.port(), 0, 0))
        }
        _ => None,
    }
}

/// A specific IPv6 address (a client or a peer).
fn host_addr6(a: SocketAddr) -> Option<SocketAddrV6> {
    entry_addr6(a).filter(|a| *a.ip() != Ipv6Addr::UNSPECIFIED)
}

impl TurnOffload {
    /// Installs channel `channel` (client `client` → `listen`, relay socket bound to
    /// `relay`, bound to `peer`), relaying until `expires_ns` (`CLOCK_MONOTONIC`). None when
    /// the addresses mix families (an IPv4 client relayed to an IPv6 peer or the reverse:
    /// user space relays those) or the map refused the entries (counted).
    pub fn install(
        &self,
        client: SocketAddr,
        listen: SocketAddr,
        relay: SocketAddr,
        peer: SocketAddr,
        channel: u16,
        expires_ns: u64,
    ) -> Option<ChannelEntries> {
        let v4 = (
            host_addr(client),
            entry_addr(listen),
            entry_addr(relay),
            host_addr(peer),
        );
        let installed = match v4 {
            (Some(client), Some(listen), Some(relay), Some(peer)) => {
                self.install4(client, listen, relay, peer, channel, expires_ns)
            }
            _ => self.install6(
                host_addr6(client)?,
                entry_addr6(listen)?,
                entry_addr6(relay)?,
                host_addr6(peer)?,
                channel,
                expires_ns,
            ),
        }?;
        self.counters.channels.inc();
        Some(installed)
    }

    fn install4(
        &self,
        client: SocketAddrV4,
        listen: SocketAddrV4,
        relay: SocketAddrV4,
        peer: SocketAddrV4,
        channel: u16,
        expires_ns: u64,
    ) -> Option<ChannelEntries> {
        let chan = TurnChanKey {
            flow: FlowKey::new(client, listen),
            channel: channel.to_be(),
            _pad: 0,
        };
        let peer_key = FlowKey::new(peer, relay);
        let to_peer = FlowNat {
            expires_ns,
            ..FlowNat::new(relay, peer, self.slot.entry_slot(0))
        };
        let to_client = FlowNat {
            channel: u32::from(channel.to_be()),
            expires_ns,
            ..FlowNat::new(listen, client, self.slot.entry_slot(1))
        };
        let engine = self.slot.engine();
        self.slot
            .insert_pair(
                (&engine.turn_chan, &chan, &to_peer),
                (&engine.turn_peer, &peer_key, &to_client),
            )
            .then_some(ChannelEntries::V4 {
                chan,
                peer: peer_key,
            })
    }

    fn install6(
        &self,
        client: SocketAddrV6,
        listen: SocketAddrV6,
        relay: SocketAddrV6,
        peer: SocketAddrV6,
        channel: u16,
        expires_ns: u64,
    ) -> Option<ChannelEntries> {
        let chan = TurnChanKey6 {
            flow: FlowKey6::new(client, listen),
            channel: channel.to_be(),
            _pad: 0,
        };
        let peer_key = TurnPeerKey6(FlowKey6::new(peer, relay));
        let to_peer = TurnNat6 {
            expires_ns,
            ..TurnNat6::new(relay, peer, self.slot.entry_slot(0))
        };
        let to_client = TurnNat6 {
            channel: u32::from(channel.to_be()),
            expires_ns,
            ..TurnNat6::new(listen, client, self.slot.entry_slot(1))
        };
        let engine = self.slot.engine();
        self.slot
            .insert_pair(
                (&engine.turn_chan6, &chan, &to_peer),
                (&engine.turn_peer6, &peer_key, &to_client),
            )
            .then_some(ChannelEntries::V6 {
                chan,
                peer: peer_key,
            })
    }

    /// Moves the end of an installed channel (a refresh). The entries re-learn their
    /// devices on their next datagrams (what the program learned meanwhile may be
    /// overwritten).
    pub fn set_expiry(&self, e: &ChannelEntries, expires_ns: u64) {
        let engine = self.slot.engine();
        match e {
            ChannelEntries::V4 { chan, peer } => {
                set_expiry(&engine.turn_chan, chan, expires_ns);
                set_expiry(&engine.turn_peer, peer, expires_ns);
            }
            ChannelEntries::V6 { chan, peer } => {
                set_expiry(&engine.turn_chan6, chan, expires_ns);
                set_expiry(&engine.turn_peer6, peer, expires_ns);
            }
        }
    }

    /// Removes a channel's entries: its datagrams go through user space again.
    pub fn remove(&self, e: &ChannelEntries) {
        let engine = self.slot.engine();
        match e {
            ChannelEntries::V4 { chan, peer } => {
                sys::remove(&engine.turn_chan, chan);
                sys::remove(&engine.turn_peer, peer);
            }
            ChannelEntries::V6 { chan, peer } => {
                sys::remove(&engine.turn_chan6, chan);
                sys::remove(&engine.turn_peer6, peer);
            }
        }
        self.counters.channels.dec();
    }

    /// Adds what the kernel relayed since the last call to the TURN counters.
    pub fn refresh(&self) {
        let c = &self.counters;
        self.slot.refresh([
            [&c.packets_to_peer, &c.bytes_to_peer, &c.offload_to_peer],
            [
                &c.packets_to_client,
                &c.bytes_to_client,
                &c.offload_to_client,
            ],
        ]);
    }
}

/// A TURN entry's value: its end can move.
trait Expiring {
    /// Sets the end and forgets what the entry taught its pair (it re-learns its device
    /// on its next datagram).
    fn expire_at(&mut self, ns: u64);
}

impl Expiring for FlowNat {
    fn expire_at(&mut self, ns: u64) {
        self.expires_ns = ns;
        self.taught = 0;
    }
}

impl Expiring for TurnNat6 {
    fn expire_at(&mut self, ns: u64) {
        self.expires_ns = ns;
        self.taught = 0;
    }
}

/// Moves one entry's end.
fn set_expiry<K: MapKey>(fd: &OwnedFd, key: &K, expires_ns: u64)
where
    K::Value: Expiring,
{
    if let Some(mut nat) = sys::lookup(fd, key) {
        nat.expire_at(expires_ns);
        let _ = sys::replace(fd, key, &nat);
    }
}

impl Drop for TurnOffload {
    fn drop(&mut self) {
        self.refresh();
    }
}
