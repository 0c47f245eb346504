//! Map entries of the fast path and the `bpf(2)` calls that read and write them from any
//! thread (the layouts mirror `bpf/udp_offload.c`).

use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, OwnedFd};

/// A datagram's addresses as on the wire (`struct flow_key`, network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
    pub _pad: u32,
    pub packets: u64,
    pub bytes: u64,
    /// `bpf_ktime_get_ns()` of the last datagram (0: none yet).
    pub last_ns: u64,
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

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
/// `BPF_NOEXIST`: an update fails rather than overwrite another session's entry.
const BPF_NOEXIST: u64 = 1;

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

/// Inserts `key → nat`; fails with `EEXIST` if the key is taken, `E2BIG` when full.
pub fn insert(fd: &OwnedFd, key: &FlowKey, nat: &FlowNat) -> io::Result<()> {
    let mut v = *nat;
    elem(
        BPF_MAP_UPDATE_ELEM,
        fd,
        (key as *const FlowKey).cast(),
        (&mut v as *mut FlowNat).cast(),
        BPF_NOEXIST,
    )
}

/// Removes `key` (absent is fine).
pub fn remove(fd: &OwnedFd, key: &FlowKey) {
    let _ = elem(
        BPF_MAP_DELETE_ELEM,
        fd,
        (key as *const FlowKey).cast(),
        std::ptr::null_mut(),
        0,
    );
}

/// The entry for `key`, counters included.
pub fn lookup(fd: &OwnedFd, key: &FlowKey) -> Option<FlowNat> {
    let mut v = FlowNat::default();
    elem(
        BPF_MAP_LOOKUP_ELEM,
        fd,
        (key as *const FlowKey).cast(),
        (&mut v as *mut FlowNat).cast(),
        0,
    )
    .ok()?;
    Some(v)
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
    fn layouts_match_the_c_structs() {
        // struct flow_key is 12 bytes; struct flow_nat 56.
        assert_eq!(std::mem::size_of::<FlowKey>(), 12);
        assert_eq!(std::mem::size_of::<FlowNat>(), 56);
        assert_eq!(std::mem::offset_of!(FlowNat, packets), 32);
        let k = FlowKey::new(
            "127.0.0.1:258".parse().unwrap(),
            "10.0.0.2:1".parse().unwrap(),
        );
        assert_eq!(k.saddr.to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(k.sport.to_ne_bytes(), [1, 2]);
    }
}
