//! The allocation table shared by every listener of the TURN service, and the quota
//! accounting on it.
//!
//! A quota unit is one relayed address of an allocation (being created or live: a dual
//! allocation holds two) or one EVEN-PORT reservation.
//! Each username may hold `turn.quota.allocations_per_user` units (486 beyond), all users
//! together the effective `turn.quota.max_allocations` (508 beyond). A reservation's unit
//! belongs to the user who asked for it until a RESERVATION-TOKEN Allocate takes the port
//! (the owner's unit becomes that allocation's; another user takes a unit of their own)
//! or it expires (the relay factory's sweep reports the owner).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use stun::agent::TransactionId;
use turn::allocation::five_tuple::FiveTuple;

use super::metrics::TurnMetrics;
use super::relay::RelayState;

/// Quota units an allocation holds: one per relayed address (two for a dual allocation).
fn units_of(meta: &AllocMeta) -> usize {
    meta.units
}

/// What the service remembers about one allocation.
pub(crate) struct AllocMeta {
    pub(crate) username: String,
    pub(crate) relay: Arc<RelayState>,
    /// The Allocate's transaction, to answer retransmissions with `response`.
    pub(crate) txid: TransactionId,
    pub(crate) response: Vec<u8>,
    /// Quota units held: one per live relayed address.
    pub(crate) units: usize,
}

/// Allocations of all listeners, with per-user counts for the quota.
///
/// A quota unit is one allocation (being created or live) or one EVEN-PORT reservation:
/// `per_user` counts them per username, `units` over all users (the global cap).
#[derive(Default)]
struct AllocTable {
    allocs: HashMap<(usize, FiveTuple), AllocMeta>,
    per_user: HashMap<String, usize>,
    total: usize,
    units: usize,
    reservations: usize,
}

impl AllocTable {
    fn release_user(&mut self, user: &str) {
        if let Some(n) = self.per_user.get_mut(user) {
            *n = n.saturating_sub(1);
            self.units = self.units.saturating_sub(1);
            if *n == 0 {
                self.per_user.remove(user);
            }
        }
    }
}

/// Why an Allocate gets no quota unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `allocations_per_user` reached: 486.
    Quota,
    /// `max_allocations` reached: 508.
    Capacity,
}

/// Allocations of all listeners with their quota units (one lock for all).
pub(crate) struct Allocations {
    table: Mutex<AllocTable>,
    metrics: TurnMetrics,
    /// `allocations_per_user` (0 = no limit).
    pub(crate) quota: usize,
    /// The effective `max_allocations`.
    pub(crate) max_units: usize,
}

impl Allocations {
    pub(crate) fn new(metrics: TurnMetrics, quota: usize, max_units: usize) -> Self {
        Allocations {
            table: Mutex::new(AllocTable::default()),
            metrics,
            quota,
            max_units,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, AllocTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Live allocations over all listeners.
    pub(crate) fn allocations(&self) -> usize {
        self.table().total
    }

    /// Takes one quota unit for `user` (an allocation or a reservation): refused when the
    /// user's quota (0 = no limit) or the global cap is used up.
    pub(crate) fn reserve(&self, user: &str) -> Result<(), Refusal> {
        let mut t = self.table();
        let held = t.per_user.get(user).copied().unwrap_or(0);
        if self.quota > 0 && held >= self.quota {
            return Err(Refusal::Quota);
        }
        if t.units >= self.max_units {
            return Err(Refusal::Capacity);
        }
        *t.per_user.entry(user.to_string()).or_insert(0) += 1;
        t.units += 1;
        Ok(())
    }

    pub(crate) fn unreserve(&self, user: &str) {
        self.table().release_user(user);
    }

    /// Takes `n` quota units for `user` at once (a dual allocation takes two), or none.
    pub(crate) fn reserve_n(&self, user: &str, n: usize) -> Result<(), Refusal> {
        let mut t = self.table();
        let held = t.per_user.get(user).copied().unwrap_or(0);
        if self.quota > 0 && held + n > self.quota {
            return Err(Refusal::Quota);
        }
        if t.units + n > self.max_units {
            return Err(Refusal::Capacity);
        }
        *t.per_user.entry(user.to_string()).or_insert(0) += n;
        t.units += n;
        Ok(())
    }

    /// Gives back `n` units taken with [`Allocations::reserve_n`].
    pub(crate) fn unreserve_n(&self, user: &str, n: usize) {
        let mut t = self.table();
        for _ in 0..n {
            t.release_user(user);
        }
    }

    /// A unit taken with `reserve` now holds an EVEN-PORT reservation.
    pub(crate) fn reservation_added(&self) {
        let mut t = self.table();
        t.reservations += 1;
        self.metrics.reserved_ports.set(t.reservations as i64);
    }

    /// A reservation expired or was dropped: its owner's unit is released.
    pub(crate) fn reservation_released(&self, owner: &str) {
        let mut t = self.table();
        t.release_user(owner);
        t.reservations = t.reservations.saturating_sub(1);
        self.metrics.reserved_ports.set(t.reservations as i64);
    }

    /// A reservation was taken by a RESERVATION-TOKEN Allocate. Its unit becomes the
    /// allocation's when the owner allocates; else the new user took a unit of their own.
    pub(crate) fn reservation_used(&self, owner: &str, by_owner: bool) {
        let mut t = self.table();
        if !by_owner {
            t.release_user(owner);
        }
        t.reservations = t.reservations.saturating_sub(1);
        self.metrics.reserved_ports.set(t.reservations as i64);
    }

    pub(crate) fn commit(&self, key: (usize, FiveTuple), meta: AllocMeta) {
        let mut t = self.table();
        if let Some(old) = t.allocs.insert(key, meta) {
            // A stale entry whose close notification has not arrived yet.
            for _ in 0..units_of(&old) {
                t.release_user(&old.username);
            }
            t.total = t.total.saturating_sub(1);
        }
        t.total += 1;
        self.metrics.allocations.set(t.total as i64);
    }

    /// The additional relayed address of a dual allocation was deleted: its unit is given
    /// back.
    pub(crate) fn release_additional(&self, key: &(usize, FiveTuple)) {
        let mut t = self.table();
        let Some(meta) = t.allocs.get_mut(key).filter(|m| m.units > 1) else {
            return;
        };
        meta.units -= 1;
        let user = meta.username.clone();
        t.release_user(&user);
    }

    /// Forgets an allocation; with `relay`, only if it is still that allocation.
    pub(crate) fn remove(&self, key: &(usize, FiveTuple), relay: Option<SocketAddr>) {
        let mut t = self.table();
        let matches = match (t.allocs.get(key), relay) {
            (Some(meta), Some(addr)) => meta.relay.advertised == addr,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if matches && let Some(meta) = t.allocs.remove(key) {
            for _ in 0..units_of(&meta) {
                t.release_user(&meta.username);
            }
            t.total = t.total.saturating_sub(1);
            self.metrics.allocations.set(t.total as i64);
        }
    }

    /// Forgets every allocation (service shutdown).
    pub(crate) fn clear(&self) {
        let mut t = self.table();
        *t = AllocTable::default();
        self.metrics.allocations.set(0);
        self.metrics.reserved_ports.set(0);
    }

    pub(crate) fn lookup(&self, key: &(usize, FiveTuple)) -> Option<(String, Arc<RelayState>)> {
        self.table()
            .allocs
            .get(key)
            .map(|m| (m.username.clone(), Arc::clone(&m.relay)))
    }

    pub(crate) fn retransmission(
        &self,
        key: &(usize, FiveTuple),
        txid: TransactionId,
    ) -> Option<Vec<u8>> {
        self.table()
            .allocs
            .get(key)
            .filter(|m| m.txid == txid)
            .map(|m| m.response.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_take_units_of_their_owner_until_used_or_released() {
        let a = Allocations::new(TurnMetrics::unregistered(), 3, 5);
        // An EVEN-PORT R=1 Allocate: the allocation and the reservation.
        a.reserve("alice").unwrap();
        a.reserve("alice").unwrap();
        a.reservation_added();
        assert_eq!(a.metrics.reserved_ports.get(), 1);
        a.reserve("alice").unwrap();
        assert_eq!(a.reserve("alice"), Err(Refusal::Quota));
        // Bob uses Alice's token: Bob takes a unit, Alice's is released.
        a.reserve("bob").unwrap();
        a.reservation_used("alice", false);
        a.reserve("alice").unwrap();
        assert_eq!(a.reserve("alice"), Err(Refusal::Quota));
        assert_eq!(a.metrics.reserved_ports.get(), 0);
        // Four units in use; the fifth is the last under the global cap.
        a.reserve("carol").unwrap();
        assert_eq!(a.reserve("dave"), Err(Refusal::Capacity));
        // A reservation that expires gives its owner's unit back.
        a.reservation_added();
        a.reservation_released("carol");
        a.reserve("dave").unwrap();
        assert_eq!(a.reserve("erin"), Err(Refusal::Capacity));
        // The owner using its own token keeps the unit (it becomes the allocation's).
        a.unreserve("dave");
        a.reserve("dave").unwrap();
        a.reservation_added();
        a.reservation_used("dave", true);
        assert_eq!(a.reserve("erin"), Err(Refusal::Capacity));
        assert_eq!(a.metrics.reserved_ports.get(), 0);
        assert_eq!(a.table().units, 5);
    }
}
