//! Datagrams the kernel dropped before the TURN service could read them: the receive
//! queue of a listener or relay socket was full. These never reach mediagate's own
//! counters, so they are read from the kernel: the `drops` column of `/proc/net/udp` and
//! `/proc/net/udp6` (this network namespace's sockets) for the inodes of the service's
//! sockets, sampled every [`SAMPLE_EVERY`], and added to
//! `mediagate_turn_kernel_drops_total{socket="listener"|"relay"}`.
//!
//! Drops of a relay socket in its last sampling interval before it closes are not seen.

use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::Duration;

/// How often `/proc/net/udp*` is read.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// Which kind of socket a drop happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A UDP listener socket (client → server).
    Listener,
    /// A relay socket (peer → server).
    Relay,
}

/// The service's UDP sockets by inode, with the drops already counted.
pub(crate) struct KernelDrops {
    watched: Mutex<HashMap<u64, (Kind, u64)>>,
    listener: Counter,
    relay: Counter,
}

fn inode(fd: &impl AsRawFd) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    let s = link.to_str()?;
    s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// (inode, drops) of every socket in a `/proc/net/udp`-format table.
fn parse(table: &str) -> impl Iterator<Item = (u64, u64)> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
        let inode = cols.get(9)?.parse().ok()?;
        let drops = cols.get(12)?.parse().ok()?;
        Some((inode, drops))
    })
}

impl KernelDrops {
    pub(crate) fn new(listener: Counter, relay: Counter) -> Self {
        KernelDrops {
            watched: Mutex::new(HashMap::new()),
            listener,
            relay,
        }
    }

    /// Starts counting the drops of `socket`.
    pub(crate) fn watch(&self, socket: &impl AsRawFd, kind: Kind) {
        if let Some(ino) = inode(socket) {
            let mut w = self.watched.lock().unwrap_or_else(|e| e.into_inner());
            w.insert(ino, (kind, 0));
        }
    }

    /// Stops counting `socket` (it is about to close).
    pub(crate) fn unwatch(&self, socket: &impl AsRawFd) {
        if let Some(ino) = inode(socket) {
            let mut w = self.watched.lock().unwrap_or_else(|e| e.into_inner());
            w.remove(&ino);
        }
    }

    /// Reads the kernel's tables once and adds new drops to the counters (blocking I/O:
    /// call it off the runtime's workers).
    pub(crate) fn sample(&self) {
        let mut tables = String::new();
        for f in ["/proc/net/udp", "/proc/net/udp6"] {
            if let Ok(t) = std::fs::read_to_string(f) {
                tables.push_str(&t);
                tables.push('\n');
            }
        }
        self.apply(&tables);
    }

    fn apply(&self, tables: &str) {
        let mut w = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_empty() {
            return;
        }
        for (ino, drops) in parse(tables) {
            if let Some((kind, seen)) = w.get_mut(&ino)
                && drops > *seen
            {
                let c = match kind {
                    Kind::Listener => &self.listener,
                    Kind::Relay => &self.relay,
                };
                c.inc_by(drops - *seen);
                *seen = drops;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_of_watched_sockets_are_counted_once() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let ino = inode(&s).unwrap();
        let (l, r) = (Counter::default(), Counter::default());
        let k = KernelDrops::new(l.clone(), r.clone());
        k.watch(&s, Kind::Relay);
        let table = |d: u64| {
            format!(
                "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                 1: 0100007F:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 {ino} 2 0000000000000000 {d}\n\
                 2: 0100007F:1F91 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 99\n"
            )
        };
        k.apply(&table(5));
        k.apply(&table(5));
        k.apply(&table(7));
        assert_eq!((l.get(), r.get()), (0, 7));
        k.sample(); // the real table: this socket has no drops, nothing changes
        assert_eq!(r.get(), 7);
    }
}
