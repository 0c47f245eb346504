//! The UDP proxy: where a client datagram goes.
//!
//! Each UDP listener runs `workers` threads. Every thread has its own `SO_REUSEPORT`
//! socket on each listen port (the kernel spreads clients over them by 4-tuple hash, so a
//! client always lands on the same thread), its own epoll instance, and its own share of
//! the sessions: a table no other thread touches, so the hot path takes no lock and
//! bounces no cache line between cores.
//!
//! A session is one client (listen port + client address) and one upstream socket
//! connected to its server, registered in the owning thread's epoll. Per wakeup a thread:
//!
//! - reads client datagrams in batches (`recvmmsg`) and sends each on its session's
//!   upstream socket (one `send`, no copy except a copy kept for a possible re-send);
//! - reads server replies straight into the slots of a per-port outgoing batch (one
//!   `recvmmsg` per ready upstream socket takes everything queued) and sends all replies
//!   of the wakeup back to their clients with one `sendmmsg` per listen port;
//! - adds its packet and byte counts to the shared counters once, not per packet.
//!
//! Before forwarding a client datagram the thread compares the session's pinned eviction
//! epoch with its server's: when the control plane evicted the server, the session
//! re-pins to the current active set through a new upstream socket right there, so a
//! failover takes effect on the next client datagram rather than at the idle timeout.
//! A datagram the old server refused (ICMP port unreachable, reported on the connected
//! socket) is re-sent to the new one from a ring of recent copies.
//!
//! A new session is admitted only within the listener's `max_sessions`, its source's
//! fair share (`sources`) and the process's file-descriptor budget (`crate::fdbudget`);
//! refusals are counted, never logged per datagram. Established sessions come first: a
//! datagram from a new client waits in the worker's bounded backlog until the wakeup's
//! established traffic is out, and a wakeup opens at most a few sessions (the rest wait,
//! counted in `mediagate_udp_new_sessions_deferred_total`), so a flood of new sources never
//! keeps a worker from draining its listen sockets.
//!
//! With `offload: ebpf` an established session is also installed in the kernel fast path
//! (`crate::offload`): its datagrams then bypass this thread. The hooks live in
//! `fastpath.rs` (install after a forward, removal on eviction, refusal, re-pin and close,
//! last-seen times for the idle sweep).
//!
//! Where each part lives:
//!
//! - `listener.rs`: what all threads of a listener share, binding ports;
//! - `session.rs`: the data a worker owns (sessions, the table's slab and index, listen
//!   ports, per-wakeup counts), which every file below builds on;
//! - `worker.rs`: starting a listener's threads and one thread's event loop (epoll,
//!   receive batches, ticks), on top of everything else;
//! - `table.rs`: admission of a new session, idle expiry, close;
//! - `forward.rs`: the client → server path;
//! - `reply.rs`: the server → client path;
//! - `failover.rs`: re-pinning a session whose server was evicted or refused;
//! - `ring.rs`: copies of recent datagrams for the re-send after a refusal;
//! - `fastpath.rs`: the hooks into the kernel fast path.

mod failover;
mod fastpath;
mod forward;
mod listener;
mod reply;
mod ring;
mod session;
mod table;
mod worker;

pub use listener::{UdpListener, bind_group, default_workers};
pub use ring::Ring;
pub use session::SessionIndex;
