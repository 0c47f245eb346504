//! Local ports for UDP upstream sockets, shared between destinations.
//!
//! A UDP session needs a 5-tuple of its own at its server, so it gets an upstream socket
//! of its own, connected to the server. When the kernel picks that socket's port (bind to
//! port 0), it picks one that no other socket on the host holds, so the ephemeral range
//! (28,232 ports by default) caps the sessions of the whole process, however many servers
//! there are: a pod in front of ten Janus nodes could not hold 30k sessions.
//!
//! Two connected sockets may share a local port when their destinations differ: the
//! kernel delivers a datagram to the socket whose remote address matches it, and maps an
//! ICMP error the same way. So the ports are handed out here, per destination: every
//! upstream socket is bound with `SO_REUSEADDR` to a port of the ephemeral range (minus
//! `ip_local_reserved_ports`) that no other session socket to the same destination holds.
//! The limit becomes one range of sessions per server. A port another program holds
//! without `SO_REUSEADDR` fails the bind and is skipped, so nothing of theirs is taken.
//!
//! The table is shared by every worker thread (a port for a destination must be unique
//! across all of them) but is locked only to open or close a session, never per datagram,
//! and never across a system call.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::{Mutex, OnceLock};

/// Destinations kept in the table past their last session (about 3.5 KiB each).
const MAX_IDLE_DESTS: usize = 1024;

/// The ports one destination's sockets hold, and where the next search starts.
#[derive(Debug)]
struct DestPorts {
    /// Bit `p - lo` is set while a session socket to this destination holds port `p`.
    held: Vec<u64>,
    /// Ports held.
    count: usize,
    /// Offset of the next port to try: the search goes round the range rather than back
    /// to its start, so a port is reused late, when late replies to the session that
    /// held it before have died out.
    cursor: usize,
}

/// The shared port table over one port range.
#[derive(Debug)]
pub struct PortTable {
    lo: u16,
    /// Ports the search may hand out, `lo..=hi` without the reserved ones.
    usable: Vec<bool>,
    dests: HashMap<SocketAddr, DestPorts>,
    /// Off when another process of the namespace shares ports (see [`claim`]): every
    /// socket then takes a kernel-picked port of its own.
    shared: bool,
}

impl PortTable {
    /// A table handing out `lo..=hi` except `reserved`.
    pub fn new(lo: u16, hi: u16, reserved: &[(u16, u16)]) -> PortTable {
        let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
        let usable = (lo..=hi)
            .map(|p| !reserved.iter().any(|&(a, b)| (a..=b).contains(&p)))
            .collect();
        PortTable {
            lo,
            usable,
            dests: HashMap::new(),
            shared: true,
        }
    }

    fn width(&self) -> usize {
        self.usable.len()
    }

    /// Reserves a port for a socket to `dest`, not one of `skip` (ports that failed to
    /// bind in this attempt). `None` when every usable port is taken for `dest`.
    pub fn reserve(&mut self, dest: SocketAddr, skip: &[u16]) -> Option<u16> {
        let width = self.width();
        // Every destination starts at the bottom of the range: sessions to different
        // servers then share the same few ports, leaving the rest of the range to others.
        let d = self.dests.entry(dest).or_insert_with(|| DestPorts {
            held: vec![0; width.div_ceil(64)],
            count: 0,
            cursor: 0,
        });
        for step in 0..width {
            let off = (d.cursor + step) % width;
            let port = self.lo + off as u16;
            let bit = 1u64 << (off % 64);
            if !self.usable[off] || d.held[off / 64] & bit != 0 || skip.contains(&port) {
                continue;
            }
            d.held[off / 64] |= bit;
            d.count += 1;
            d.cursor = (off + 1) % width;
            return Some(port);
        }
        None
    }

    /// Gives `port` back for `dest`.
    pub fn release(&mut self, dest: SocketAddr, port: u16) {
        let Some(off) = port.checked_sub(self.lo).map(usize::from) else {
            return;
        };
        let Some(d) = self.dests.get_mut(&dest) else {
            return;
        };
        let bit = 1u64 << (off % 64);
        if let Some(word) = d.held.get_mut(off / 64)
            && *word & bit != 0
        {
            *word &= !bit;
            d.count -= 1;
        }
        if d.count == 0 && self.dests.len() > MAX_IDLE_DESTS {
            // Servers come and go with discovery: the tables of gone ones must not pile
            // up. An idle one is kept otherwise, for its cursor.
            self.dests.remove(&dest);
        }
    }

    /// Ports held for `dest`.
    pub fn held(&self, dest: SocketAddr) -> usize {
        self.dests.get(&dest).map_or(0, |d| d.count)
    }
}

/// Parses `ip_local_port_range` ("32768\t60999").
pub fn parse_range(s: &str) -> Option<(u16, u16)> {
    let mut it = s.split_whitespace().map(|x| x.parse::<u16>());
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo > 0 && lo <= hi => Some((lo, hi)),
        _ => None,
    }
}

/// Parses `ip_local_reserved_ports` ("8080,9000-9010" or empty).
pub fn parse_reserved(s: &str) -> Vec<(u16, u16)> {
    s.trim()
        .split(',')
        .filter_map(|part| {
            let part = part.trim();
            match part.split_once('-') {
                Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
                None => {
                    let p = part.parse().ok()?;
                    Some((p, p))
                }
            }
        })
        .collect()
}

/// The name (abstract, so scoped to the network namespace) whose holder shares ports.
const CLAIM_NAME: &[u8] = b"mediagate-udp-port-sharing";

/// Binds the abstract Unix socket `name`: `None` when another process of this network
/// namespace holds it.
///
/// Sharing is safe only within one process, whose table sees every socket: two processes
/// sharing ports by `SO_REUSEADDR` could both connect port P to the same server, and one
/// of them would get the other's replies. So only the first mediagate of a namespace
/// shares; a second one (two instances with host networking on one node, or two tests on
/// one machine) takes exclusive kernel-picked ports, which the first one's binds skip.
fn claim(name: &[u8]) -> Option<std::os::unix::net::UnixDatagram> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).ok()?;
    std::os::unix::net::UnixDatagram::bind_addr(&addr).ok()
}

/// The process's table, over the ephemeral range of the network namespace the process
/// started in (the kernel's default range if that cannot be read).
fn table() -> &'static Mutex<PortTable> {
    static TABLE: OnceLock<Mutex<PortTable>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| parse_range(&s))
            .unwrap_or((32768, 60999));
        let reserved = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports")
            .map(|s| parse_reserved(&s))
            .unwrap_or_default();
        let mut t = PortTable::new(range.0, range.1, &reserved);
        match claim(CLAIM_NAME) {
            // Held for the life of the process.
            Some(sock) => std::mem::forget(sock),
            None => {
                tracing::warn!(
                    "another mediagate shares UDP ports in this network namespace: this one uses \
                     one ephemeral port per session (at most the ephemeral range of sessions)"
                );
                t.shared = false;
            }
        }
        Mutex::new(t)
    })
}

fn lock(table: &Mutex<PortTable>) -> std::sync::MutexGuard<'_, PortTable> {
    // A panic while holding the lock leaves the table consistent (every change is one
    // step), so a poisoned lock is used as it is.
    table.lock().unwrap_or_else(|e| e.into_inner())
}

/// A port held for one destination; given back when dropped.
#[derive(Debug)]
pub struct PortLease {
    table: &'static Mutex<PortTable>,
    dest: SocketAddr,
    /// `None` for a kernel-picked port (nothing to give back).
    port: Option<u16>,
}

impl Drop for PortLease {
    fn drop(&mut self) {
        if let Some(port) = self.port {
            lock(self.table).release(self.dest, port);
        }
    }
}

/// A non-blocking UDP socket connected to `dest` from a port no other session socket to
/// `dest` holds.
///
/// The caller must drop the socket before the lease, so that the port is free in the
/// table only once the socket holding it is closed.
pub fn connect_shared(dest: SocketAddr, rcvbuf: usize) -> io::Result<(UdpSocket, PortLease)> {
    connect_with(table(), dest, rcvbuf)
}

fn connect_with(
    table: &'static Mutex<PortTable>,
    dest: SocketAddr,
    rcvbuf: usize,
) -> io::Result<(UdpSocket, PortLease)> {
    let any: IpAddr = match dest {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let open = || -> io::Result<socket2::Socket> {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(dest),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        if dest.is_ipv6() {
            sock.set_only_v6(true)?;
        }
        // Room for a burst of replies while the worker is busy. A limit, not an
        // allocation: idle sessions cost nothing.
        let _ = sock.set_recv_buffer_size(rcvbuf);
        Ok(sock)
    };
    let finish = |sock: socket2::Socket, lease: PortLease| -> io::Result<(UdpSocket, PortLease)> {
        sock.connect(&dest.into())?;
        let sock: UdpSocket = sock.into();
        sock.set_nonblocking(true)?;
        Ok((sock, lease))
    };
    if !lock(table).shared {
        let sock = open()?;
        sock.bind(&SocketAddr::new(any, 0).into())?;
        let lease = PortLease {
            table,
            dest,
            port: None,
        };
        return finish(sock, lease);
    }
    let mut skipped: Vec<u16> = Vec::new();
    // Ports other programs hold are skipped; give up after a bounded number of them.
    for _ in 0..64 {
        let Some(port) = lock(table).reserve(dest, &skipped) else {
            break;
        };
        let lease = PortLease {
            table,
            dest,
            port: Some(port),
        };
        let sock = open()?;
        sock.set_reuse_address(true)?;
        match sock.bind(&SocketAddr::new(any, port).into()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                skipped.push(port);
                continue; // dropping `lease` gives the port back
            }
            Err(e) => return Err(e),
        }
        let (sock, lease) = finish(sock, lease)?;
        // Between bind and connect the socket took datagrams from anyone; drop those.
        let mut scratch = [0u8; 64];
        while sock.recv(&mut scratch).is_ok() {}
        return Ok((sock, lease));
    }
    Err(io::Error::new(
        io::ErrorKind::AddrNotAvailable,
        format!("no local port left for another session to {dest}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn each_destination_gets_every_port_once() {
        let mut t = PortTable::new(40000, 40009, &[]);
        let a: Vec<u16> = (0..10).filter_map(|_| t.reserve(dest(1), &[])).collect();
        let b: Vec<u16> = (0..10).filter_map(|_| t.reserve(dest(2), &[])).collect();
        for got in [&a, &b] {
            let mut s = got.clone();
            s.sort();
            assert_eq!(s, (40000..=40009).collect::<Vec<_>>());
        }
        assert_eq!(t.reserve(dest(1), &[]), None, "range exhausted for dest 1");
        t.release(dest(1), a[3]);
        assert_eq!(t.reserve(dest(1), &[]), Some(a[3]));
        assert_eq!(t.held(dest(2)), 10);
    }

    #[test]
    fn reserved_and_skipped_ports_are_not_handed_out() {
        let mut t = PortTable::new(40000, 40009, &[(40002, 40005), (40009, 40009)]);
        let mut got: Vec<u16> = std::iter::from_fn(|| t.reserve(dest(1), &[40000])).collect();
        got.sort();
        assert_eq!(got, vec![40001, 40006, 40007, 40008]);
    }

    #[test]
    fn the_search_goes_round_instead_of_reusing_the_port_just_freed() {
        let mut t = PortTable::new(40000, 40099, &[]);
        let first = t.reserve(dest(7), &[]).unwrap();
        let second = t.reserve(dest(7), &[]).unwrap();
        t.release(dest(7), first);
        let third = t.reserve(dest(7), &[]).unwrap();
        assert_ne!(third, first);
        assert_eq!(t.held(dest(7)), 2);
        t.release(dest(7), second);
        t.release(dest(7), third);
        assert_eq!(t.held(dest(7)), 0);
        assert_ne!(
            t.reserve(dest(7), &[]),
            Some(first),
            "an idle destination keeps its cursor"
        );
    }

    #[test]
    fn release_of_a_foreign_port_changes_nothing() {
        let mut t = PortTable::new(40000, 40009, &[]);
        let p = t.reserve(dest(1), &[]).unwrap();
        t.release(dest(1), 39999);
        t.release(dest(1), 50000);
        t.release(dest(2), p);
        assert_eq!(t.held(dest(1)), 1);
    }

    #[test]
    fn proc_formats_parse() {
        assert_eq!(parse_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_range("60999 32768"), None);
        assert_eq!(parse_range("x"), None);
        assert_eq!(parse_reserved("\n"), vec![]);
        assert_eq!(
            parse_reserved("8080,9000-9010\n"),
            vec![(8080, 8080), (9000, 9010)]
        );
    }

    /// A table of this test's own (the process's one decides sharing per namespace).
    fn own_table(lo: u16, hi: u16, shared: bool) -> &'static Mutex<PortTable> {
        let mut t = PortTable::new(lo, hi, &[]);
        t.shared = shared;
        Box::leak(Box::new(Mutex::new(t)))
    }

    /// Two echo servers; every socket in `socks` sends its index and must get exactly
    /// its own index back.
    fn replies_reach_their_own_socket(servers: [&UdpSocket; 2], socks: &[(UdpSocket, PortLease)]) {
        for (i, (s, _)) in socks.iter().enumerate() {
            s.send(&[i as u8]).unwrap();
        }
        let mut buf = [0u8; 8];
        for srv in servers {
            srv.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            for _ in 0..socks.len() / 2 {
                let (n, from) = srv.recv_from(&mut buf).unwrap();
                srv.send_to(&buf[..n], from).unwrap();
            }
        }
        for (i, (s, _)) in socks.iter().enumerate() {
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            let n = s.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[i as u8], "reply reached the socket that asked");
        }
    }

    #[test]
    fn two_sockets_share_a_port_towards_different_destinations() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (da, db) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        // A narrow range far from the kernel's ephemeral one: three ports for six sockets.
        let table = own_table(17311, 17313, true);
        let socks: Vec<_> = (0..6)
            .map(|i| connect_with(table, if i % 2 == 0 { da } else { db }, 1 << 16).unwrap())
            .collect();
        assert_eq!(lock(table).held(da), 3);
        assert!(
            connect_with(table, da, 1 << 16).is_err(),
            "the range is spent for a"
        );
        let ports = |i: usize| -> Vec<u16> {
            let mut p: Vec<u16> = socks
                .iter()
                .skip(i)
                .step_by(2)
                .map(|(s, _)| s.local_addr().unwrap().port())
                .collect();
            p.sort();
            p
        };
        assert_eq!(ports(0), vec![17311, 17312, 17313]);
        assert_eq!(
            ports(1),
            ports(0),
            "sessions to different servers share ports"
        );
        replies_reach_their_own_socket([&a, &b], &socks);
        drop(socks);
        assert_eq!(lock(table).held(da), 0);
    }

    #[test]
    fn without_sharing_every_socket_has_a_port_of_its_own() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (da, db) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let table = own_table(17321, 17323, false);
        let socks: Vec<_> = (0..6)
            .map(|i| connect_with(table, if i % 2 == 0 { da } else { db }, 1 << 16).unwrap())
            .collect();
        let mut ports: Vec<u16> = socks
            .iter()
            .map(|(s, _)| s.local_addr().unwrap().port())
            .collect();
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), 6);
        assert_eq!(
            lock(table).held(da),
            0,
            "kernel-picked ports are not in the table"
        );
        replies_reach_their_own_socket([&a, &b], &socks);
    }

    #[test]
    fn one_process_per_namespace_shares() {
        let name = format!("mediagate-claim-test-{}", std::process::id());
        let first = claim(name.as_bytes());
        assert!(first.is_some());
        assert!(
            claim(name.as_bytes()).is_none(),
            "a second claimant is refused"
        );
        drop(first);
        assert!(
            claim(name.as_bytes()).is_some(),
            "free again once the holder is gone"
        );
    }
}
