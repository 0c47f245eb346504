//! The threads that serve UDP listeners and their allocations' relay sockets.
//!
//! Each UDP listener binds one `SO_REUSEPORT` socket per thread; the kernel hashes a
//! client's 4-tuple to one of them, so a client always reaches the same thread. That
//! thread reads the client's packets, handles its Allocate, and so starts the
//! allocation's relay reader (`peer_reader`) on itself: from then on both directions of
//! the allocation's traffic stay on one thread, with one epoll instance of its own
//! (a current-thread tokio runtime per thread) and no cross-thread wakeups. On the
//! process's shared runtime a datagram relayed by one worker was often read back (the
//! peer's answer, the client's next packet) by the other, which first had to be woken:
//! measured, that cost more CPU per relayed packet than the relay code itself.
//!
//! TCP, TLS and DTLS listeners stay on the shared runtime (their connections are tasks
//! of their own). The threads stop when the service closes (or is dropped); tasks still
//! on them (relay readers of allocations that outlived the close) are dropped with them.

use std::io;
use tokio::runtime::{Builder, Handle};
use tokio_util::sync::{CancellationToken, DropGuard};

thread_local! {
    /// The index of the shard thread this is (0 on every other thread).
    static CURRENT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The index of the shard thread the caller runs on (0 off the shards): a UDP listener
/// sends from its socket of this index, so threads do not share one socket's send path.
pub(crate) fn current() -> usize {
    CURRENT.get()
}

/// The UDP data-plane threads of one TURN service.
pub(crate) struct Shards {
    handles: Vec<Handle>,
    stop: CancellationToken,
    _guard: DropGuard,
}

impl Shards {
    /// Starts `n` threads (at least one), each running its own current-thread runtime
    /// until [`Shards::stop`] or drop.
    pub(crate) fn start(n: usize) -> io::Result<Shards> {
        let stop = CancellationToken::new();
        let guard = stop.clone().drop_guard();
        let mut handles = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rt = Builder::new_current_thread().enable_all().build()?;
            handles.push(rt.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("turn-udp-{i}"))
                .spawn(move || {
                    CURRENT.set(i);
                    rt.block_on(stop.cancelled())
                })?;
        }
        Ok(Shards {
            handles,
            stop,
            _guard: guard,
        })
    }

    /// How many threads run.
    pub(crate) fn len(&self) -> usize {
        self.handles.len()
    }

    /// The runtime of thread `i`.
    pub(crate) fn handle(&self, i: usize) -> &Handle {
        &self.handles[i % self.handles.len()]
    }

    /// Stops every thread (what still runs on them is dropped).
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }
}

/// Threads for `configured` (`turn.relay.threads`; 0: one per CPU), at most 64.
pub(crate) fn thread_count(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .clamp(1, 64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_run_on_their_own_thread_and_stop_with_the_shards() {
        let shards = Shards::start(2).unwrap();
        assert_eq!(shards.len(), 2);
        let a = shards
            .handle(0)
            .spawn(async { std::thread::current().name().map(str::to_owned) })
            .await
            .unwrap();
        let b = shards
            .handle(1)
            .spawn(async { std::thread::current().name().map(str::to_owned) })
            .await
            .unwrap();
        assert_eq!(a.as_deref(), Some("turn-udp-0"));
        assert_eq!(b.as_deref(), Some("turn-udp-1"));
        assert_eq!(
            shards.handle(1).spawn(async { current() }).await.unwrap(),
            1
        );
        assert_eq!(current(), 0);
        let pending = shards.handle(0).spawn(std::future::pending::<()>());
        shards.stop();
        let e = pending.await.unwrap_err();
        assert!(e.is_cancelled(), "{e}");
    }

    #[test]
    fn zero_means_one_per_cpu_and_the_count_is_bounded() {
        assert!(thread_count(0) >= 1);
        assert_eq!(thread_count(3), 3);
        assert_eq!(thread_count(1000), 64);
    }
}
