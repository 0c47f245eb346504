//! Allocation-free wrappers over the batched socket syscalls of the UDP data plane, the
//! TURN relay and the load generator: `recvmmsg`/`sendmmsg` over a preallocated
//! [`MsgBatch`], segmented sends (`UDP_SEGMENT`) of equal-sized frames to one address,
//! single-datagram `recv`/`send` on raw descriptors, `SocketAddr` <-> `sockaddr`
//! conversion, binding a `SO_REUSEPORT` group of UDP sockets (one per thread: the UDP
//! proxy's workers, the TURN service's UDP threads), and TCP listen sockets (with
//! `TCP_DEFER_ACCEPT` for the admin API's).
//!
//! Every buffer is allocated once, when a batch is built; a call only fills in lengths.
//! All `unsafe` of the data plane lives here, next to the invariants it relies on. It sits
//! on the ground floor (ARCHITECTURE.md): it knows sockets, nothing of mediagate.

use nix::libc;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// `n` datagram slots of `slot_len` bytes each, with the `iovec`s, addresses and
/// `mmsghdr`s that `recvmmsg`/`sendmmsg` need, all pointing into this batch's own heap
/// allocations (which never move or grow after construction).
pub struct MsgBatch {
    slot_len: usize,
    /// Bytes kept free in front of each slot (see [`MsgBatch::with_headroom`]).
    headroom: usize,
    buf: Box<[u8]>,
    iov: Box<[libc::iovec]>,
    addrs: Box<[libc::sockaddr_storage]>,
    hdrs: Box<[libc::mmsghdr]>,
    /// Filled entries: datagrams received by the last `recv_from`, or queued for `send_to`.
    len: usize,
}

// SAFETY: the raw pointers inside `iov` and `hdrs` only point into the batch's own boxed
// allocations, which move with it; nothing is shared with another owner.
unsafe impl Send for MsgBatch {}

impl MsgBatch {
    /// A batch of `slots` datagrams of up to `slot_len` bytes.
    pub fn new(slots: usize, slot_len: usize) -> MsgBatch {
        MsgBatch::with_headroom(slots, slot_len, 0)
    }

    /// Like [`MsgBatch::new`], with `headroom` bytes free in front of each received
    /// datagram, where a header can be written without moving it
    /// ([`MsgBatch::frame_mut`]).
    pub fn with_headroom(slots: usize, slot_len: usize, headroom: usize) -> MsgBatch {
        let slots = slots.max(1);
        let stride = headroom + slot_len;
        let mut buf = vec![0u8; slots * stride].into_boxed_slice();
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut addrs: Box<[libc::sockaddr_storage]> =
            (0..slots).map(|_| unsafe { zeroed() }).collect();
        let mut iov: Box<[libc::iovec]> = (0..slots)
            .map(|i| libc::iovec {
                // SAFETY: `i * stride + headroom` is inside `buf` (slots * stride bytes),
                // with `slot_len` bytes after it.
                iov_base: unsafe { buf.as_mut_ptr().add(i * stride + headroom) }.cast(),
                iov_len: slot_len,
            })
            .collect();
        let hdrs: Box<[libc::mmsghdr]> = (0..slots)
            .map(|i| {
                // SAFETY: all-zero is a valid msghdr; the pointers set below stay valid
                // because the boxed slices they point into never reallocate.
                let mut h: libc::mmsghdr = unsafe { zeroed() };
                h.msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                h.msg_hdr.msg_iov = &mut iov[i];
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        MsgBatch {
            slot_len,
            headroom,
            buf,
            iov,
            addrs,
            hdrs,
            len: 0,
        }
    }

    /// Slots in the batch.
    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Filled entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == self.hdrs.len()
    }

    /// Largest datagram a slot holds.
    pub fn slot_len(&self) -> usize {
        self.slot_len
    }

    /// Receives up to a batch of datagrams without blocking; returns how many (0 when
    /// none is queued). `WouldBlock` is mapped to `Ok(0)`.
    pub fn recv_from(&mut self, fd: RawFd) -> io::Result<usize> {
        self.recv_flags(fd, libc::MSG_DONTWAIT)
    }

    /// Like [`MsgBatch::recv_from`], but blocks (up to the socket's receive timeout) until
    /// at least one datagram is there, then takes what is queued.
    pub fn recv_wait(&mut self, fd: RawFd) -> io::Result<usize> {
        self.recv_flags(fd, libc::MSG_WAITFORONE)
    }

    /// Sends each datagram of the last receive back to where it came from, unchanged
    /// (an echo without a copy). Returns how many were sent.
    pub fn reflect(&mut self, fd: RawFd) -> usize {
        for i in 0..self.len {
            self.iov[i].iov_len = (self.hdrs[i].msg_len as usize).min(self.slot_len);
        }
        self.flush(fd).0
    }

    fn recv_flags(&mut self, fd: RawFd, flags: libc::c_int) -> io::Result<usize> {
        for i in 0..self.hdrs.len() {
            self.iov[i].iov_len = self.slot_len;
            self.hdrs[i].msg_hdr.msg_namelen =
                size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            self.hdrs[i].msg_hdr.msg_flags = 0;
        }
        self.len = 0;
        // SAFETY: every header points at valid, writable buffers of the lengths it states.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                self.hdrs.len() as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        self.len = n as usize;
        Ok(self.len)
    }

    /// Datagram `i` of the last receive: its bytes, its source, and whether the kernel
    /// truncated it (it was larger than a slot).
    #[inline]
    pub fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>, bool) {
        let h = &self.hdrs[i];
        let n = (h.msg_len as usize).min(self.slot_len);
        let start = i * (self.headroom + self.slot_len) + self.headroom;
        let addr = from_storage(&self.addrs[i], h.msg_hdr.msg_namelen);
        let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        (&self.buf[start..start + n], addr, truncated)
    }

    /// Datagram `i` of the last receive with the headroom in front of it (writable):
    /// `headroom + len` bytes, its source, and whether it was truncated.
    #[inline]
    pub fn frame_mut(&mut self, i: usize) -> (&mut [u8], Option<SocketAddr>, bool) {
        let h = &self.hdrs[i];
        let n = (h.msg_len as usize).min(self.slot_len);
        let start = i * (self.headroom + self.slot_len);
        let addr = from_storage(&self.addrs[i], h.msg_hdr.msg_namelen);
        let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        (
            &mut self.buf[start..start + self.headroom + n],
            addr,
            truncated,
        )
    }

    /// Datagram `i` of the last receive with the headroom in front of it: `headroom + len`
    /// bytes (what [`MsgBatch::frame_mut`] wrote there).
    #[inline]
    pub fn frame(&self, i: usize) -> &[u8] {
        let n = (self.hdrs[i].msg_len as usize).min(self.slot_len);
        let start = i * (self.headroom + self.slot_len);
        &self.buf[start..start + self.headroom + n]
    }

    /// The next free slot, to receive a datagram into before [`MsgBatch::commit`]ting it.
    /// Panics if the batch is full (callers flush first).
    #[inline]
    pub fn next_slot(&mut self) -> &mut [u8] {
        let start = self.len * (self.headroom + self.slot_len) + self.headroom;
        &mut self.buf[start..start + self.slot_len]
    }

    /// Queues the first `len` bytes of the next slot for `to`.
    #[inline]
    pub fn commit(&mut self, len: usize, to: SocketAddr) {
        let i = self.len;
        self.iov[i].iov_len = len.min(self.slot_len);
        self.hdrs[i].msg_hdr.msg_namelen = to_storage(to, &mut self.addrs[i]);
        self.len += 1;
    }

    /// Copies `data` into the next slot and queues it for `to`; false if it does not fit.
    #[inline]
    pub fn push(&mut self, data: &[u8], to: SocketAddr) -> bool {
        if self.is_full() || data.len() > self.slot_len {
            return false;
        }
        self.next_slot()[..data.len()].copy_from_slice(data);
        self.commit(data.len(), to);
        true
    }

    /// Sends every queued datagram on `fd` (unconnected) with as few `sendmmsg` calls as
    /// the kernel allows; a datagram the kernel refuses (full buffer, unreachable client)
    /// is skipped. Returns (sent, dropped) and empties the batch.
    pub fn flush(&mut self, fd: RawFd) -> (usize, usize) {
        let total = self.len;
        let (mut sent, mut dropped, mut at) = (0, 0, 0);
        while at < total {
            // SAFETY: entries `at..total` were filled by `commit` and point at live buffers.
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs.as_mut_ptr().add(at),
                    (total - at) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                // The datagram at `at` failed: drop it, go on with the rest.
                dropped += 1;
                at += 1;
            } else {
                sent += n as usize;
                at += n as usize;
            }
        }
        self.len = 0;
        (sent, dropped)
    }

    /// Receives what is queued on `fd` (up to `max` datagrams, without blocking) into
    /// the next free slots and queues them; returns how many. The caller then either
    /// addresses them ([`MsgBatch::address_last`]) or drops them
    /// ([`MsgBatch::truncate_by`]) before the next flush.
    pub fn recv_append(&mut self, fd: RawFd, max: usize) -> io::Result<usize> {
        let start = self.len;
        let max = max.min(self.hdrs.len() - start);
        if max == 0 {
            return Ok(0);
        }
        for i in start..start + max {
            self.iov[i].iov_len = self.slot_len;
            self.hdrs[i].msg_hdr.msg_namelen =
                size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            self.hdrs[i].msg_hdr.msg_flags = 0;
        }
        // SAFETY: entries `start..start + max` point at valid, writable buffers.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr().add(start),
                max as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        self.len += n as usize;
        Ok(n as usize)
    }

    /// Sets the destination of the last `n` queued entries (just received with
    /// [`MsgBatch::recv_append`]) to `to`, sized to what was received; returns their bytes.
    #[inline]
    pub fn address_last(&mut self, n: usize, to: SocketAddr) -> usize {
        let mut bytes = 0;
        for i in self.len - n..self.len {
            let len = (self.hdrs[i].msg_len as usize).min(self.slot_len);
            self.iov[i].iov_len = len;
            bytes += len;
            self.hdrs[i].msg_hdr.msg_namelen = to_storage(to, &mut self.addrs[i]);
        }
        bytes
    }

    /// Drops the last `n` queued entries.
    #[inline]
    pub fn truncate_by(&mut self, n: usize) {
        self.len = self.len.saturating_sub(n);
    }

    /// Forgets queued entries without sending them.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// Most datagrams [`send_many_to`] passes to one `sendmmsg` call.
pub const SEND_MANY: usize = 16;

/// Whether [`send_many_to`] may send a run of equal-sized frames as one segmented send
/// (`UDP_SEGMENT`); on by default, off by [`set_udp_gso`] or once the kernel said it
/// does not know the option.
static UDP_GSO: AtomicBool = AtomicBool::new(true);

/// Turns segmented sends in [`send_many_to`] on or off (for the whole process).
pub fn set_udp_gso(on: bool) {
    UDP_GSO.store(on, Ordering::Relaxed);
}

/// Sends each of `frames` (at most [`SEND_MANY`]; more are not sent) as its own datagram
/// to `to` on the unconnected socket `fd`, in order and without copying them; a datagram
/// the kernel refuses is skipped. Returns how many were sent.
///
/// A run of two or more frames of one size (the run's last may be shorter) leaves with
/// one `sendmsg` carrying `UDP_SEGMENT` (generic segmentation offload): the kernel
/// builds one packet train that goes through the stack once and is cut into the same
/// datagrams at the device, or by the NIC. Receivers see exactly the datagrams they
/// would otherwise. Where the kernel refuses that (a segment larger than the path's MTU:
/// `EMSGSIZE`; a device without checksum offload can answer `EIO`), the run goes out as
/// separate datagrams; other frames go with as few `sendmmsg` calls as the kernel allows.
pub fn send_many_to(fd: RawFd, frames: &[&[u8]], to: SocketAddr) -> usize {
    let frames = &frames[..frames.len().min(SEND_MANY)];
    // SAFETY: all-zero is a valid value for this plain C struct.
    let mut addr: libc::sockaddr_storage = unsafe { zeroed() };
    let namelen = to_storage(to, &mut addr);
    if !UDP_GSO.load(Ordering::Relaxed) {
        return send_each(fd, frames, &mut addr, namelen);
    }
    let (mut sent, mut at, mut single_from) = (0, 0, 0);
    while at < frames.len() {
        let run = gso_run(&frames[at..]);
        if run < 2 {
            at += 1;
            continue;
        }
        sent += send_each(fd, &frames[single_from..at], &mut addr, namelen);
        let train = &frames[at..at + run];
        sent += match send_segmented(fd, train, &mut addr, namelen) {
            Ok(()) => run,
            Err(e) => {
                if matches!(e.raw_os_error(), Some(libc::ENOPROTOOPT | libc::EOPNOTSUPP)) {
                    set_udp_gso(false); // a kernel without UDP_SEGMENT (before 4.18)
                }
                send_each(fd, train, &mut addr, namelen)
            }
        };
        at += run;
        single_from = at;
    }
    sent + send_each(fd, &frames[single_from..], &mut addr, namelen)
}

/// How many frames from the first can leave as one segmented send: those of the first
/// one's size, then at most one shorter (non-empty) frame, which ends the train.
/// At most [`GSO_BYTES`] in all (one UDP datagram's worth, as the kernel requires).
fn gso_run(frames: &[&[u8]]) -> usize {
    let seg = frames[0].len();
    if seg == 0 {
        return 1;
    }
    let most = (GSO_BYTES / seg).max(1);
    let same = frames
        .iter()
        .take(most)
        .take_while(|f| f.len() == seg)
        .count();
    match frames.get(same) {
        Some(f) if same < most && !f.is_empty() && f.len() < seg => same + 1,
        _ => same,
    }
}

/// Most payload bytes in one segmented send.
const GSO_BYTES: usize = 60_000;

/// One `sendmsg` of `train` (frames of `train[0]`'s size, the last maybe shorter) with
/// `UDP_SEGMENT` set to that size: all of it or nothing is sent.
fn send_segmented(
    fd: RawFd,
    train: &[&[u8]],
    addr: &mut libc::sockaddr_storage,
    namelen: libc::socklen_t,
) -> io::Result<()> {
    // SAFETY: all-zero is a valid value for these plain C structs.
    let mut iov: [libc::iovec; SEND_MANY] = unsafe { zeroed() };
    for (v, f) in iov.iter_mut().zip(train) {
        v.iov_base = f.as_ptr() as *mut libc::c_void;
        v.iov_len = f.len();
    }
    // Room for one cmsg with a u16, aligned for cmsghdr.
    let mut control = [0u64; 4];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (addr as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = namelen;
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = train.len().min(SEND_MANY) as _;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as _;
    // SAFETY: `msg_control` points at `control`, which holds CMSG_SPACE(2) bytes (32 >=
    // 16 + 8), so CMSG_FIRSTHDR is that buffer's start and CMSG_DATA lies within it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), train[0].len() as u16);
    }
    // SAFETY: `msg` points at `iov` (which points at the frames, only read by the
    // kernel), `addr` and `control`; all outlive the call.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sends each of `frames` as its own datagram with as few `sendmmsg` calls as the kernel
/// allows; a datagram the kernel refuses is skipped. Returns how many were sent.
fn send_each(
    fd: RawFd,
    frames: &[&[u8]],
    addr: &mut libc::sockaddr_storage,
    namelen: libc::socklen_t,
) -> usize {
    let count = frames.len().min(SEND_MANY);
    // SAFETY: all-zero is a valid value for these plain C structs.
    let mut iov: [libc::iovec; SEND_MANY] = unsafe { zeroed() };
    let mut hdrs: [libc::mmsghdr; SEND_MANY] = unsafe { zeroed() };
    for i in 0..count {
        iov[i].iov_base = frames[i].as_ptr() as *mut libc::c_void;
        iov[i].iov_len = frames[i].len();
        hdrs[i].msg_hdr.msg_iov = &mut iov[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
        hdrs[i].msg_hdr.msg_name = (addr as *mut libc::sockaddr_storage).cast();
        hdrs[i].msg_hdr.msg_namelen = namelen;
    }
    let (mut sent, mut at) = (0, 0);
    while at < count {
        // SAFETY: entries `at..count` point at `iov` entries, which point at the frames
        // (only read by the kernel), and at `addr`; all outlive the call.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                hdrs.as_mut_ptr().add(at),
                (count - at) as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            at += 1; // refused: skip it, go on with the rest
        } else {
            sent += n as usize;
            at += n as usize;
        }
    }
    sent
}

/// `recv` on a connected socket, without blocking.
#[inline]
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `send` on a connected socket, without blocking.
#[inline]
pub fn send(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is valid for reads of `data.len()` bytes.
    let n = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A TCP listen socket on `addr` with `SO_REUSEADDR` (dual-stack when `addr` is IPv6)
/// and a listen queue of `backlog` (the kernel caps it at `net.core.somaxconn`).
pub fn bind_tcp_listener(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(false).ok();
    }
    sock.bind(&addr.into())?;
    sock.listen(backlog)?;
    Ok(sock.into())
}

/// `TCP_DEFER_ACCEPT` on a listening socket: the kernel hands a connection to `accept`
/// only once its first bytes arrived, or after about `secs` seconds (rounded up to the
/// next SYN-ACK retransmission) without any. For protocols where the client speaks
/// first (HTTP): a connection that sends nothing waits in the kernel, not in the process.
pub fn set_defer_accept(fd: RawFd, secs: u32) -> io::Result<()> {
    let v = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
    // SAFETY: `v` lives across the call and the length given is its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads a socket address the kernel wrote; `None` for families other than IPv4/IPv6.
#[inline]
pub fn from_storage(s: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, and storage is
            // aligned and large enough for any sockaddr.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Writes `addr` into `s`; returns its length.
#[inline]
pub fn to_storage(addr: SocketAddr, s: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: storage is aligned and large enough for a sockaddr_in.
            let out =
                unsafe { &mut *(s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            out.sin_family = libc::AF_INET as libc::sa_family_t;
            out.sin_port = a.port().to_be();
            out.sin_addr = libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            };
            out.sin_zero = [0; 8];
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: storage is aligned and large enough for a sockaddr_in6.
            let out =
                unsafe { &mut *(s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            out.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            out.sin6_port = a.port().to_be();
            out.sin6_flowinfo = a.flowinfo();
            out.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            out.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Binds `n` (at least one) non-blocking UDP sockets on `addr` as one `SO_REUSEPORT`
/// group: the kernel spreads senders over them by 4-tuple hash, so one sender always
/// lands on the same socket. `buffer` (bytes, 0: the system's default) is asked for as
/// receive and send buffer, capped by the kernel. An IPv6 address also takes IPv4
/// (mapped). A port that another socket already holds fails, as a plain bind would (it
/// is probed without `SO_REUSEPORT` first, so a group of another process does not
/// silently share the traffic); port 0 picks one port for the whole group.
pub fn bind_reuseport_group(
    addr: SocketAddr,
    n: usize,
    buffer: usize,
) -> io::Result<Vec<std::net::UdpSocket>> {
    let new = || {
        let domain = socket2::Domain::for_address(addr);
        let sock =
            socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        if addr.is_ipv6() {
            sock.set_only_v6(false).ok();
        }
        if buffer > 0 {
            let _ = sock.set_recv_buffer_size(buffer);
            let _ = sock.set_send_buffer_size(buffer);
        }
        io::Result::Ok(sock)
    };
    let mut addr = addr;
    {
        let probe = new()?;
        probe.bind(&addr.into())?;
        if addr.port() == 0 {
            addr = probe
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("bound socket has no address"))?;
        }
    }
    let mut out = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        let sock = new()?;
        sock.set_reuse_port(true)?;
        sock.bind(&addr.into())?;
        sock.set_nonblocking(true)?;
        out.push(sock.into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn send_many_to_sends_each_frame_as_its_own_datagram() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let frames: Vec<Vec<u8>> = (0..SEND_MANY + 3)
            .map(|i| vec![i as u8; 1 + i * 37])
            .collect();
        let refs: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
        let to = rx.local_addr().unwrap();
        // At most SEND_MANY per call: the rest is the caller's.
        assert_eq!(send_many_to(tx.as_raw_fd(), &refs, to), SEND_MANY);
        assert_eq!(send_many_to(tx.as_raw_fd(), &refs[SEND_MANY..], to), 3);
        let mut buf = [0u8; 2048];
        for want in frames[..SEND_MANY].iter().chain(&frames[SEND_MANY..]) {
            let (n, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(from, tx.local_addr().unwrap());
            assert_eq!(&buf[..n], &want[..]);
        }
    }

    #[test]
    fn trains_are_cut_where_sizes_change() {
        let f = |n: usize| vec![0u8; n];
        let (a, b, c, e) = (f(100), f(40), f(7), f(0));
        assert_eq!(gso_run(&[&a, &a, &a, &b, &a]), 4);
        assert_eq!(gso_run(&[&a, &b, &b]), 2);
        assert_eq!(gso_run(&[&b, &a]), 1);
        assert_eq!(gso_run(&[&a, &a, &e]), 2);
        assert_eq!(gso_run(&[&e, &e]), 1);
        assert_eq!(gso_run(&[&c]), 1);
        let big = f(20_000);
        assert_eq!(gso_run(&[&big, &big, &big, &big]), 3);
        assert_eq!(gso_run(&[&big, &big, &big, &c]), 3);
    }

    /// Frames in trains and alone, in the order a relay read hands them over.
    fn mixed_frames() -> Vec<Vec<u8>> {
        let sizes = [100, 100, 100, 40, 7, 55, 55, 55, 55, 1200, 3, 3, 1, 9, 9, 2];
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![i as u8; n])
            .collect()
    }

    /// Sends `frames` with `send_many_to` on loopback; returns what arrived, in order.
    fn send_and_receive(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_millis(500)))
            .unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let refs: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
        assert_eq!(
            send_many_to(tx.as_raw_fd(), &refs, rx.local_addr().unwrap()),
            frames.len()
        );
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = rx.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    }

    #[test]
    fn trains_arrive_as_the_datagrams_they_were() {
        assert!(UDP_GSO.load(Ordering::Relaxed), "on by default");
        let frames = mixed_frames();
        assert_eq!(send_and_receive(&frames), frames);
        set_udp_gso(false);
        assert_eq!(send_and_receive(&frames), frames);
    }

    /// A segment larger than the path's MTU makes the kernel refuse a segmented send
    /// (EMSGSIZE): the train goes out frame by frame (IP fragments them). A network
    /// namespace of the test's own whose loopback has an MTU of 1000 (root; `ip`).
    #[test]
    fn a_refused_train_goes_out_frame_by_frame() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root (a network namespace)");
            return;
        }
        let ns = format!("mgsockio{}", std::process::id());
        let sh = |cmd: &str| {
            let ok = std::process::Command::new("sh")
                .args(["-c", cmd])
                .status()
                .unwrap()
                .success();
            assert!(ok, "{cmd}");
        };
        sh(&format!(
            "ip netns add {ns} && ip -n {ns} link set lo mtu 1000 up"
        ));
        let path = format!("/var/run/netns/{ns}");
        let mut frames = mixed_frames();
        frames.splice(2..2, [vec![0xAA; 1200], vec![0xBB; 1200], vec![0xCC; 1100]]);
        frames.truncate(SEND_MANY);
        let sent = frames.clone();
        let got = std::thread::spawn(move || {
            let f = std::fs::File::open(path).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            // The refusal itself, so that the test knows it tests the fallback.
            let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            // SAFETY: all-zero is valid.
            let mut addr: libc::sockaddr_storage = unsafe { zeroed() };
            let len = to_storage(rx.local_addr().unwrap(), &mut addr);
            let train: Vec<&[u8]> = sent[2..5].iter().map(|f| &f[..]).collect();
            let e = send_segmented(tx.as_raw_fd(), &train, &mut addr, len).unwrap_err();
            assert!(
                matches!(e.raw_os_error(), Some(libc::EMSGSIZE | libc::EINVAL)),
                "{e}"
            );
            send_and_receive(&sent)
        })
        .join();
        sh(&format!("ip netns del {ns}"));
        assert_eq!(got.unwrap(), frames);
        assert!(
            UDP_GSO.load(Ordering::Relaxed),
            "EINVAL is the path's, not the kernel's"
        );
    }

    #[test]
    fn addresses_round_trip() {
        for a in ["127.0.0.1:5004", "[fd00::1]:443", "0.0.0.0:0"] {
            let a: SocketAddr = a.parse().unwrap();
            // SAFETY: all-zero is valid.
            let mut s: libc::sockaddr_storage = unsafe { zeroed() };
            let len = to_storage(a, &mut s);
            assert_eq!(from_storage(&s, len), Some(a));
        }
    }

    #[test]
    fn batch_sends_and_receives() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut out = MsgBatch::new(4, 64);
        assert!(out.push(b"one", to));
        assert!(out.push(b"two", to));
        assert!(!out.push(&[0u8; 65], to), "too large for a slot");
        assert_eq!(out.flush(tx.as_raw_fd()), (2, 0));
        assert!(out.is_empty());
        let mut inb = MsgBatch::new(4, 64);
        let mut got = Vec::new();
        for _ in 0..100 {
            let n = inb.recv_from(rx.as_raw_fd()).unwrap();
            for i in 0..n {
                let (d, from, trunc) = inb.get(i);
                assert_eq!(from, Some(tx.local_addr().unwrap()));
                assert!(!trunc);
                got.push(d.to_vec());
            }
            if got.len() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(got, vec![b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(inb.recv_from(rx.as_raw_fd()).unwrap(), 0);
    }

    #[test]
    fn headroom_stays_free_in_front_of_each_datagram() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        tx.send_to(b"abc", to).unwrap();
        tx.send_to(b"defgh", to).unwrap();
        let mut b = MsgBatch::with_headroom(2, 16, 4);
        let mut n = 0;
        for _ in 0..100 {
            n += b.recv_append(rx.as_raw_fd(), 2).unwrap();
            if n == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(n, 2);
        assert_eq!(b.get(1).0, b"defgh");
        let (frame, from, trunc) = b.frame_mut(0);
        assert_eq!(
            (frame.len(), from, trunc),
            (7, Some(tx.local_addr().unwrap()), false)
        );
        frame[..4].copy_from_slice(b"HDR:");
        assert_eq!(&b.frame_mut(0).0[..], b"HDR:abc");
        // Writing the header of one datagram leaves the next one alone.
        assert_eq!(b.get(1).0, b"defgh");
        assert_eq!(&b.frame_mut(1).0[4..], b"defgh");
    }
}
