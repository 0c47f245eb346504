//! The hooks of the UDP workers into the kernel fast path (`offload: ebpf`, see
//! `crate::offload`): install a session after a datagram went out, remove its entries on
//! eviction, refusal, re-pin and close, and read its last-seen time for the idle sweep.

use super::session::{Session, Tables};
use crate::offload::ListenerOffload;
use std::time::Duration;

impl Tables {
    /// Installs session `idx` in the fast path once per server, after a datagram went out
    /// through its upstream socket (so the socket's addresses are final).
    pub(super) fn offload_install(&mut self, idx: u32) {
        let Some(off) = self.offload.as_deref() else {
            return;
        };
        let Some(session) = self
            .slab
            .get_mut(idx as usize)
            .and_then(|s| s.session.as_mut())
        else {
            return;
        };
        if session.offload_tried
            || session.refused
            || session.server.epoch() != session.pinned_epoch
        {
            return;
        }
        session.offload_tried = true;
        let (Ok(local), Ok(server)) = (session.upstream.local_addr(), session.upstream.peer_addr())
        else {
            return;
        };
        let listen = self.ports[usize::from(session.port)].local;
        session.offload = off.install(session.client, listen, local, server);
        if session.offload.is_some() {
            // The ring's copy predates the offloaded datagrams: re-sending it after a
            // refusal would replay old media.
            session.last_sent = None;
        }
    }

    /// Removes the entries of offloaded sessions whose server was evicted (epoch moved)
    /// or refused: their next datagram comes up here and re-pins. Runs every tick.
    pub(super) fn offload_scan(&mut self) {
        let Some(off) = self.offload.as_deref() else {
            return;
        };
        for slot in &mut self.slab {
            if let Some(s) = slot.session.as_mut()
                && s.offload.is_some()
                && (s.refused || s.server.epoch() != s.pinned_epoch)
            {
                offload_remove(Some(off), s);
            }
        }
    }

    /// Brings the activity time of each offloaded session that would otherwise expire up
    /// to its last datagram in the kernel (before the idle sweep decides), in two steps:
    ///
    /// 1. from one batched pass over the whole flow map (`ListenerOffload::last_seen`),
    ///    shared by every worker and listener that sweeps within `pass_age` of it, and
    ///    made only when some session needs it. A pass that old may miss a session's
    ///    latest datagrams, but what it shows happened: it only ever moves times forward.
    /// 2. The sessions that still look idle are confirmed one by one with a fresh lookup
    ///    of their two entries before they expire: only truly idle sessions cost
    ///    syscalls of their own, each once.
    pub(super) fn offload_last_seen(&mut self, idle_ms: u64, pass_age: Duration) {
        let Some(off) = self.offload.as_deref() else {
            return;
        };
        let now = self.now_ms;
        let expiring =
            |s: &Session| s.offload.is_some() && now.saturating_sub(s.last_activity_ms) >= idle_ms;
        if !self
            .slab
            .iter()
            .any(|slot| slot.session.as_ref().is_some_and(expiring))
        {
            return;
        }
        let seen = off.last_seen(pass_age);
        let now_ns = crate::offload::monotonic_ns();
        for slot in &mut self.slab {
            let Some(s) = slot.session.as_mut() else {
                continue;
            };
            if !expiring(s) {
                continue;
            }
            let Some(keys) = &s.offload else { continue };
            if let Some(idle_ns) = seen.idle_ns(keys, now_ns) {
                let seen = now.saturating_sub(idle_ns / 1_000_000);
                s.last_activity_ms = s.last_activity_ms.max(seen);
            }
            if expiring(s)
                && let Some(idle_ns) = off.idle_ns(keys)
            {
                let seen = now.saturating_sub(idle_ns / 1_000_000);
                s.last_activity_ms = s.last_activity_ms.max(seen);
            }
        }
    }
}

/// Takes a session out of the fast path (before its upstream socket closes or moves).
pub(super) fn offload_remove(off: Option<&ListenerOffload>, session: &mut Session) {
    if let (Some(off), Some(keys)) = (off, session.offload.take()) {
        off.remove(&keys);
    }
}
