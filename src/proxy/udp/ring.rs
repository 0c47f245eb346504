//! Copies of recently forwarded datagrams, so the one a dying server refused can be sent
//! again to the server its session moves to (see `failover.rs`).

///
/// When a server's port closes, the first datagram sent to it is refused by ICMP after
/// it left: the error only surfaces afterwards on the session's socket. Keeping a copy of
/// each session's last datagram lets that one be re-sent to the new server too, so a dead
/// server costs a flow only what was inside the dying process. One ring per worker keeps
/// the memory bounded (it does not grow with sessions).
pub struct Ring {
    data: Box<[u8]>,
    /// (session slot, generation, length) of each copy.
    owner: Box<[(u32, u32, u16)]>,
    next: usize,
}

/// Slots per worker and bytes per slot: 4 MiB, enough to cover the ~20 ms between two
/// packets of a flow at ~100k packets/s per worker.
const RING_SLOTS: usize = 2048;
const RING_SLOT_BYTES: usize = 2048;

impl Default for Ring {
    fn default() -> Self {
        Self::new()
    }
}

impl Ring {
    pub fn new() -> Self {
        Ring {
            data: vec![0u8; RING_SLOTS * RING_SLOT_BYTES].into_boxed_slice(),
            owner: vec![(u32::MAX, 0, 0); RING_SLOTS].into_boxed_slice(),
            next: 0,
        }
    }

    /// Stores a copy of `data` for session `(idx, gen_)`; returns the slot, or None if
    /// the datagram is too large to keep.
    #[inline]
    pub fn put(&mut self, idx: u32, gen_: u32, data: &[u8]) -> Option<u32> {
        if data.len() > RING_SLOT_BYTES {
            return None;
        }
        let slot = self.next;
        self.next = (self.next + 1) % RING_SLOTS;
        let start = slot * RING_SLOT_BYTES;
        self.data[start..start + data.len()].copy_from_slice(data);
        self.owner[slot] = (idx, gen_, data.len() as u16);
        Some(slot as u32)
    }

    /// The copy in `slot`, if it still belongs to session `(idx, gen_)`.
    pub fn get(&self, slot: u32, idx: u32, gen_: u32) -> Option<&[u8]> {
        let slot = slot as usize;
        match self.owner.get(slot)? {
            (i, g, len) if *i == idx && *g == gen_ => {
                let start = slot * RING_SLOT_BYTES;
                Some(&self.data[start..start + usize::from(*len)])
            }
            _ => None,
        }
    }
}
