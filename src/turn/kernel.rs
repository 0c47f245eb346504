//! Channels of UDP allocations relayed by the kernel fast path (`turn.relay.offload:
//! ebpf`; the program's side is described in `crate::offload::turn`).
//!
//! A channel is installed while all of these hold: the allocation's client came over a
//! UDP listener, the channel is bound, its peer has a live permission, the peer
//! policy allows the peer, and client, relayed address and peer share one family (IPv4
//! or IPv6; `crate::offload::turn` refuses mixed ones). [`RelayState::sync_kernel`] brings the kernel's entries of one
//! allocation in line with that: called when a channel is bound, a permission is made or
//! refreshed and the allocation ends, and for every allocation once a second by
//! [`KernelChannels::sweep`] (lapsed channels and permissions, policy changes by reload).
//! Each entry carries the channel's or permission's end, whichever is first, and the
//! program stops relaying at that moment by itself, so the sweep is housekeeping, not a
//! deadline.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use super::metrics::TurnMetrics;
use super::policy::PeerPolicy;
use crate::offload::{ChannelEntries, TurnCounters, TurnOffload};

/// An allocation the sweep brings in line (the relay state implements it; this file sits
/// below `relay` and knows it only through this trait).
pub(crate) trait Swept: Send + Sync {
    /// Whether the allocation ended (it is then dropped from the sweep).
    fn is_closed(&self) -> bool;
    /// Brings the allocation's channels in the kernel in line with its bindings,
    /// permissions and the peer policy.
    fn sync_kernel(&self);
}

/// One channel in the kernel.
pub(crate) struct Installed {
    peer: SocketAddr,
    entries: ChannelEntries,
    expires: Instant,
}

/// The service's handle on the fast path and the allocations that may use it.
pub(crate) struct KernelChannels {
    offload: Arc<TurnOffload>,
    policy: Arc<PeerPolicy>,
    states: Mutex<Vec<Weak<dyn Swept>>>,
}

impl KernelChannels {
    /// The fast path for the TURN service, or None when it is unavailable (logged and
    /// counted by `crate::offload`).
    pub(crate) fn start(
        turn: &TurnMetrics,
        policy: Arc<PeerPolicy>,
    ) -> Option<Arc<KernelChannels>> {
        let counters = TurnCounters {
            packets_to_peer: turn.packets_to_peer.clone(),
            bytes_to_peer: turn.bytes_to_peer.clone(),
            packets_to_client: turn.packets_to_client.clone(),
            bytes_to_client: turn.bytes_to_client.clone(),
            offload_to_peer: turn.offload_to_peer.clone(),
            offload_to_client: turn.offload_to_client.clone(),
            channels: turn.offload_channels.clone(),
        };
        let offload = crate::offload::acquire_turn(&turn.offload_errors, counters)?;
        tracing::info!("TURN: the kernel fast path relays the channel data of UDP allocations");
        Some(Arc::new(KernelChannels {
            offload,
            policy,
            states: Mutex::new(Vec::new()),
        }))
    }

    /// A new allocation's relay state, to be swept.
    pub(crate) fn register(&self, state: Weak<dyn Swept>) {
        let mut s = self.states.lock().unwrap_or_else(|e| e.into_inner());
        s.push(state);
    }

    /// Brings every allocation's entries in line (once a second).
    pub(crate) fn sweep(&self) {
        let live: Vec<Arc<dyn Swept>> = {
            let mut s = self.states.lock().unwrap_or_else(|e| e.into_inner());
            s.retain(|w| w.upgrade().is_some_and(|st| !st.is_closed()));
            s.iter().filter_map(Weak::upgrade).collect()
        };
        for st in live {
            st.sync_kernel();
        }
    }

    /// Makes `installed` (one allocation's channels in the kernel) match `want`: (channel
    /// number, peer, end) of the channels that qualify, with `client` → `listen` the
    /// allocation's client end and `relay` its relay socket's address.
    pub(crate) fn apply(
        &self,
        installed: &mut HashMap<u16, Installed>,
        want: &[(u16, SocketAddr, Instant)],
        client: SocketAddr,
        listen: SocketAddr,
        relay: SocketAddr,
    ) {
        let wanted = |n: &u16, i: &Installed| {
            want.iter()
                .any(|(wn, wp, _)| wn == n && *wp == i.peer && self.policy.allows(*wp))
        };
        installed.retain(|n, i| {
            let keep = wanted(n, i);
            if !keep {
                self.offload.remove(&i.entries);
            }
            keep
        });
        let now = Instant::now();
        for &(number, peer, expires) in want {
            let ns = crate::offload::monotonic_ns()
                + expires.saturating_duration_since(now).as_nanos() as u64;
            match installed.get_mut(&number) {
                Some(i) if i.expires != expires => {
                    self.offload.set_expiry(&i.entries, ns);
                    i.expires = expires;
                }
                Some(_) => {}
                None if self.policy.allows(peer) => {
                    if let Some(entries) = self
                        .offload
                        .install(client, listen, relay, peer, number, ns)
                    {
                        installed.insert(
                            number,
                            Installed {
                                peer,
                                entries,
                                expires,
                            },
                        );
                    }
                }
                None => {}
            }
        }
    }

    /// Removes every channel of an allocation that ended.
    pub(crate) fn clear(&self, installed: &mut HashMap<u16, Installed>) {
        for (_, i) in installed.drain() {
            self.offload.remove(&i.entries);
        }
    }
}
