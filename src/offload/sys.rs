//! Map entries of the fast path and the `bpf(2)` calls that read and write them from any
//! thread (the layouts mirror `bpf/udp_offload.c`). Public for the benchmark of the idle
//! sweep (`benches/offload_sweep.rs`).

use std::io;
use std::net::{SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd};

/// A datagram's addresses as on the wire (`struct flow_key`, network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

impl FlowKey {
    pub fn new(src: SocketAddrV4, dst: SocketAddrV4) -> FlowKey {
        FlowKey {
            saddr: u32::from_ne_bytes(src.ip().octets()),
            daddr: u32::from_ne_bytes(dst.ip().octets()),
            sport: src.port().to_be(),
            dport: dst.port().to_be(),
        }
    }
}

/// What a matching datagram becomes, plus the entry's counters (`struct flow_nat`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowNat {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// `(listener slot << 1) | direction` (0: to the server, 1: to the client).
    pub slot: u32,
    /// Egress device, learned by the program from the other direction (0: not yet).
    pub ifindex: u32,
    /// Program bookkeeping: what this entry last taught its pair.
    pub taught: u32,
    pub taught_addr: u32,
    /// TURN: the channel number (network order) of a peer's entry.
    pub channel: u32,
    pub packets: u64,
    pub bytes: u64,
    /// `bpf_ktime_get_ns()` of the last datagram (0: none yet).
    pub last_ns: u64,
    /// TURN: `bpf_ktime_get_ns()` from which the entry no longer relays (0: never).
    pub expires_ns: u64,
}

impl FlowNat {
    pub fn new(src: SocketAddrV4, dst: SocketAddrV4, slot: u32) -> FlowNat {
        let k = FlowKey::new(src, dst);
        FlowNat {
            saddr: k.saddr,
            daddr: k.daddr,
            sport: k.sport,
            dport: k.dport,
            slot,
            ..FlowNat::default()
        }
    }
}

/// An IPv6 datagram's addresses as on the wire (`struct flow_key6`, network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

impl FlowKey6 {
    pub fn new(src: SocketAddrV6, dst: SocketAddrV6) -> FlowKey6 {
        FlowKey6 {
            saddr: src.ip().octets(),
            daddr: dst.ip().octets(),
            sport: src.port().to_be(),
            dport: dst.port().to_be(),
        }
    }
}

/// What a matching IPv6 datagram becomes, plus the entry's counters (`struct
/// flow_nat6`; the fields mean what [`FlowNat`]'s do).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowNat6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub slot: u32,
    pub ifindex: u32,
    pub taught: u32,
    pub taught_addr: [u8; 16],
    pub packets: u64,
    pub bytes: u64,
    pub last_ns: u64,
}

impl FlowNat6 {
    pub fn new(src: SocketAddrV6, dst: SocketAddrV6, slot: u32) -> FlowNat6 {
        let k = FlowKey6::new(src, dst);
        FlowNat6 {
            saddr: k.saddr,
            daddr: k.daddr,
            sport: k.sport,
            dport: k.dport,
            slot,
            ..FlowNat6::default()
        }
    }
}

/// A TURN client's ChannelData as on the wire (`struct turn_chan_key`): client →
/// listener, and the channel number (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TurnChanKey {
    pub flow: FlowKey,
    pub channel: u16,
    pub _pad: u16,
}

/// A TURN client's ChannelData over IPv6 (`struct turn_chan_key6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TurnChanKey6 {
    pub flow: FlowKey6,
    pub channel: u16,
    pub _pad: u16,
}

/// What a matching IPv6 TURN datagram becomes (`struct turn_nat6`; the fields mean what
/// [`FlowNat`]'s do).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TurnNat6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub slot: u32,
    pub ifindex: u32,
    pub taught: u32,
    pub channel: u32,
    pub taught_addr: [u8; 16],
    pub _pad: u32,
    pub packets: u64,
    pub bytes: u64,
    pub last_ns: u64,
    pub expires_ns: u64,
}

impl TurnNat6 {
    pub fn new(src: SocketAddrV6, dst: SocketAddrV6, slot: u32) -> TurnNat6 {
        let k = FlowKey6::new(src, dst);
        TurnNat6 {
            saddr: k.saddr,
            daddr: k.daddr,
            sport: k.sport,
            dport: k.dport,
            slot,
            ..TurnNat6::default()
        }
    }
}

/// The TURN peer map over IPv6 (`mg_turn_peer6`) has [`FlowKey6`]'s layout as its key but
/// [`TurnNat6`] as its value: its own key type.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TurnPeerKey6(pub FlowKey6);

/// The key types of the fast path's hash maps, each with its map's value type.
pub trait MapKey: Copy + Default {
    type Value: Copy + Default;
}
impl MapKey for FlowKey {
    type Value = FlowNat;
}
impl MapKey for TurnChanKey {
    type Value = FlowNat;
}
impl MapKey for FlowKey6 {
    type Value = FlowNat6;
}
impl MapKey for TurnChanKey6 {
    type Value = TurnNat6;
}
impl MapKey for TurnPeerKey6 {
    type Value = TurnNat6;
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `BPF_NOEXIST`: an update fails rather than overwrite another session's entry.
const BPF_NOEXIST: u64 = 1;
/// `BPF_EXIST`: an update only replaces an entry that is there.
const BPF_EXIST: u64 = 2;

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn elem(
    cmd: libc::c_long,
    fd: &OwnedFd,
    key: *const u8,
    value: *mut u8,
    flags: u64,
) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key as u64,
        value: value as u64,
        flags,
    };
    // SAFETY: `attr` points at valid key/value buffers of the map's sizes (the callers
    // pass the repr(C) types the map was declared with) for the duration of the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A new, empty hash map shaped like the program's `mg_flows` (`FlowKey` → `FlowNat`,
/// `max_entries` entries), for tests and benchmarks of the user-space side without
/// loading the program. Needs CAP_BPF.
pub fn create_flow_map(max_entries: u32) -> io::Result<OwnedFd> {
    // `union bpf_attr` for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries,
    // then fields that must be zero.
    let mut attr = [0u32; 18];
    attr[0] = 1; // BPF_MAP_TYPE_HASH
    attr[1] = std::mem::size_of::<FlowKey>() as u32;
    attr[2] = std::mem::size_of::<FlowNat>() as u32;
    attr[3] = max_entries;
    // SAFETY: `attr` is a zero-padded bpf_attr of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// Inserts `key → nat`; fails with `EEXIST` if the key is taken, `E2BIG` when full.
pub fn insert<K: MapKey>(fd: &OwnedFd, key: &K, nat: &K::Value) -> io::Result<()> {
    write(fd, key, nat, BPF_NOEXIST)
}

/// Replaces the entry of `key`, which must exist (`ENOENT` otherwise).
pub fn replace<K: MapKey>(fd: &OwnedFd, key: &K, nat: &K::Value) -> io::Result<()> {
    write(fd, key, nat, BPF_EXIST)
}

fn write<K: MapKey>(fd: &OwnedFd, key: &K, nat: &K::Value, flags: u64) -> io::Result<()> {
    let mut v = *nat;
    elem(
        BPF_MAP_UPDATE_ELEM,
        fd,
        (key as *const K).cast(),
        (&mut v as *mut K::Value).cast(),
        flags,
    )
}

/// Removes `key` (absent is fine).
pub fn remove<K: MapKey>(fd: &OwnedFd, key: &K) {
    let _ = elem(
        BPF_MAP_DELETE_ELEM,
        fd,
        (key as *const K).cast(),
        std::ptr::null_mut(),
        0,
    );
}

/// The entry for `key`, counters included.
pub fn lookup<K: MapKey>(fd: &OwnedFd, key: &K) -> Option<K::Value> {
    let mut v = K::Value::default();
    elem(
        BPF_MAP_LOOKUP_ELEM,
        fd,
        (key as *const K).cast(),
        (&mut v as *mut K::Value).cast(),
        0,
    )
    .ok()?;
    Some(v)
}

/// `union bpf_attr` as the `BPF_MAP_*_BATCH` commands read it.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries read per `BPF_MAP_LOOKUP_BATCH` call (one pass over 100k sessions, i.e.
/// 200k entries, takes 25 calls).
pub const BATCH_ENTRIES: usize = 8192;

/// Calls `f` with every entry of the flow map, read [`BATCH_ENTRIES`] at a time with
/// `BPF_MAP_LOOKUP_BATCH` (kernel ≥ 5.6); where the kernel has no batch operations, one
/// key walk (`BPF_MAP_GET_NEXT_KEY` and a lookup per entry). Returns the number of
/// `bpf(2)` calls made. Entries inserted or removed during the pass may be missed or seen.
pub fn for_each(fd: &OwnedFd, f: impl FnMut(&FlowKey, &FlowNat)) -> io::Result<usize> {
    for_each_of(fd, f)
}

/// [`for_each`] over a map of any key type (`mg_flows6`: [`FlowKey6`]).
pub fn for_each_of<K: MapKey>(fd: &OwnedFd, mut f: impl FnMut(&K, &K::Value)) -> io::Result<usize> {
    let mut keys = vec![K::default(); BATCH_ENTRIES];
    let mut values = vec![K::Value::default(); BATCH_ENTRIES];
    // The hash map's batch cursor is a bucket index (u32).
    let (mut cursor_in, mut cursor_out) = (0u32, 0u32);
    let mut calls = 0usize;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                (&cursor_in as *const u32) as u64
            },
            out_batch: (&mut cursor_out as *mut u32) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH_ENTRIES as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: keys and values hold `count` entries of the map's key and value sizes
        // (the repr(C) types the map was declared with); the cursors are u32, as the
        // hash map's batch operations expect; all outlive the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        calls += 1;
        let err = (r < 0).then(io::Error::last_os_error);
        match err.as_ref().and_then(io::Error::raw_os_error) {
            None | Some(libc::ENOENT) => {
                // ENOENT: the pass is complete; `count` still says what this call read.
                let n = (attr.count as usize).min(BATCH_ENTRIES);
                for (k, v) in keys[..n].iter().zip(&values[..n]) {
                    f(k, v);
                }
                if err.is_some() {
                    return Ok(calls);
                }
            }
            Some(libc::EINVAL | libc::ENOTSUP | libc::EOPNOTSUPP) if first => {
                return walk(fd, f).map(|c| c + calls);
            }
            _ => return Err(err.unwrap_or_else(|| io::Error::other("bpf batch"))),
        }
        cursor_in = cursor_out;
        first = false;
    }
}

/// [`for_each`] without batch operations: one `GET_NEXT_KEY` and one lookup per entry.
pub fn walk<K: MapKey>(fd: &OwnedFd, mut f: impl FnMut(&K, &K::Value)) -> io::Result<usize> {
    let mut calls = 0usize;
    let mut prev: Option<K> = None;
    loop {
        let mut next = K::default();
        let key = prev
            .as_ref()
            .map_or(std::ptr::null(), |k| (k as *const K).cast());
        calls += 1;
        match elem(
            BPF_MAP_GET_NEXT_KEY,
            fd,
            key,
            (&mut next as *mut K).cast(),
            0,
        ) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(calls),
            Err(e) => return Err(e),
        }
        calls += 1;
        if let Some(v) = lookup(fd, &next) {
            f(&next, &v);
        }
        prev = Some(next);
    }
}

/// Per-CPU `(packets, bytes)` of `mg_totals[slot]`, summed over `cpus` CPUs.
pub fn percpu_totals(fd: &OwnedFd, slot: u32, cpus: usize) -> io::Result<(u64, u64)> {
    let mut buf = vec![[0u64; 2]; cpus.max(1)];
    elem(
        BPF_MAP_LOOKUP_ELEM,
        fd,
        (&slot as *const u32).cast(),
        buf.as_mut_ptr().cast(),
        0,
    )?;
    Ok(buf.iter().fold((0, 0), |(p, b), v| {
        (p.wrapping_add(v[0]), b.wrapping_add(v[1]))
    }))
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_over_the_map_reads_every_entry_in_batches() {
        let fd = match create_flow_map(16_384) {
            Ok(fd) => fd,
            Err(e) => {
                eprintln!("skipped: cannot create a BPF map here ({e})");
                return;
            }
        };
        let n = 10_000u32;
        for i in 0..n {
            let key = FlowKey {
                saddr: i,
                ..FlowKey::default()
            };
            let nat = FlowNat {
                last_ns: u64::from(i) + 1,
                ..FlowNat::default()
            };
            insert(&fd, &key, &nat).expect("insert");
        }
        for batched in [true, false] {
            let mut seen = vec![false; n as usize];
            let check = |k: &FlowKey, v: &FlowNat| {
                assert_eq!(v.last_ns, u64::from(k.saddr) + 1);
                seen[k.saddr as usize] = true;
            };
            let calls = if batched {
                for_each(&fd, check)
            } else {
                walk(&fd, check)
            }
            .expect("pass");
            assert!(seen.iter().all(|s| *s), "every entry read once");
            assert!(calls >= 2, "{calls} calls");
        }
        // Batched: a couple of calls for 10k entries, not one or two per entry.
        let calls = for_each(&fd, |_, _| {}).expect("pass");
        assert!(calls <= 3, "{calls} calls for {n} entries");
    }

    #[test]
    fn layouts_match_the_c_structs() {
        // struct flow_key is 12 bytes, struct turn_chan_key 16, struct flow_nat 64.
        assert_eq!(std::mem::size_of::<FlowKey>(), 12);
        assert_eq!(std::mem::size_of::<TurnChanKey>(), 16);
        assert_eq!(std::mem::offset_of!(TurnChanKey, channel), 12);
        assert_eq!(std::mem::size_of::<FlowNat>(), 64);
        assert_eq!(std::mem::offset_of!(FlowNat, channel), 28);
        assert_eq!(std::mem::offset_of!(FlowNat, packets), 32);
        assert_eq!(std::mem::offset_of!(FlowNat, expires_ns), 56);
        // struct flow_key6 is 36 bytes, struct flow_nat6 88.
        assert_eq!(std::mem::size_of::<FlowKey6>(), 36);
        assert_eq!(std::mem::size_of::<FlowNat6>(), 88);
        assert_eq!(std::mem::offset_of!(FlowNat6, slot), 36);
        assert_eq!(std::mem::offset_of!(FlowNat6, taught_addr), 48);
        assert_eq!(std::mem::offset_of!(FlowNat6, packets), 64);
        // struct turn_chan_key6 is 40 bytes, struct turn_nat6 104.
        assert_eq!(std::mem::size_of::<TurnChanKey6>(), 40);
        assert_eq!(std::mem::offset_of!(TurnChanKey6, channel), 36);
        assert_eq!(std::mem::size_of::<TurnPeerKey6>(), 36);
        assert_eq!(std::mem::size_of::<TurnNat6>(), 104);
        assert_eq!(std::mem::offset_of!(TurnNat6, channel), 48);
        assert_eq!(std::mem::offset_of!(TurnNat6, taught_addr), 52);
        assert_eq!(std::mem::offset_of!(TurnNat6, packets), 72);
        assert_eq!(std::mem::offset_of!(TurnNat6, expires_ns), 96);
        let k = FlowKey::new(
            "127.0.0.1:258".parse().unwrap(),
            "10.0.0.2:1".parse().unwrap(),
        );
        assert_eq!(k.saddr.to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(k.sport.to_ne_bytes(), [1, 2]);
    }
}
