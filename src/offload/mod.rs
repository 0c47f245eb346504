//! Kernel fast path for established UDP sessions (`listeners[].offload: ebpf`) and for
//! the TURN relay's channel data (`turn.relay.offload: ebpf`, see [`turn`]; this page
//! describes the UDP part, which the TURN part shares the program and engine with).
//!
//! # Design
//!
//! User space keeps every decision: the first datagram of a session, server selection,
//! health, failover and failback, admin states, limits and idle expiry all stay in
//! `crate::proxy::udp`. Once a session exists and its datagram went out through the
//! session's connected upstream socket, the worker *installs* the session in the kernel;
//! from then on an eBPF program at the TC ingress hook forwards its datagrams without
//! waking user space:
//!
//! - **Program** (`bpf/udp_offload.c`, `mg_ingress`), attached with TCX (a BPF link per
//!   interface, kernel ≥ 6.6) to the ingress of every interface of the network namespace
//!   at start (`lo` included). It parses Ethernet/IPv4/UDP (no options, no fragments),
//!   or Ethernet/IPv6/UDP (see **IPv6** below), looks the 4-tuple up in `mg_flows`, rewrites addresses and ports, fixes the IP and
//!   UDP checksums with `bpf_l3_csum_replace`/`bpf_l4_csum_replace` (a zero UDP
//!   checksum stays zero) and sends it out of the device the session's *other*
//!   direction arrives on: each entry learns that device from the datagrams of its pair
//!   (no FIB lookup, which would need IP forwarding on the ingress device). To `lo`:
//!   delivered in place (`TC_ACT_OK`) or redirected to `lo` from another device (a
//!   loopback address must not arrive on a real device); to any other device:
//!   `bpf_redirect_neigh`, which routes from that device and resolves the next hop (a
//!   hairpin on a pod's single `eth0` included). Until an entry has learned its device
//!   (the first reply of a session), its datagrams go through user space as before. A
//!   datagram that matches no entry returns `TC_ACT_UNSPEC` ("next"), so other programs
//!   on the device still run.
//! - **`mg_flows`** (hash, 262 144 entries = 131 072 sessions): two entries per session,
//!   keyed by the wire 4-tuple:
//!   `(client ip:port → listener ip:port)` ⇒ `(balancer ip:session port → server ip:port)`
//!   and `(server ip:port → balancer ip:session port)` ⇒ `(listener ip:port → client ip:port)`.
//!   Each value carries the session's counters, updated in place by the program (atomic
//!   packet and byte adds, last-seen `bpf_ktime_get_ns`, which is `CLOCK_MONOTONIC`).
//! - **`mg_totals`** (per-CPU array): packets and bytes per listener slot and direction,
//!   no atomics on the hot path; summed over CPUs at every `/metrics` scrape
//!   ([`refresh_metrics`]) and added to `mediagate_packets_total`/`bytes_total` (so those
//!   stay exact) and to `mediagate_offload_packets_total`.
//!
//! The session's upstream socket stays open: it reserves the session port (no other
//! socket can take it and receive the offloaded replies) and it still receives the ICMP
//! errors for offloaded datagrams, because the kernel matches the ICMP's inner header
//! against connected sockets. A refusal found there removes the session's entries at
//! once, so the next datagram reaches user space and re-pins.
//!
//! **Failover.** Offloaded datagrams never reach the worker, so it cannot notice a moved
//! server epoch on the next datagram. Instead, every worker tick (50 ms) scans its
//! offloaded sessions and removes the entries of those whose server epoch moved
//! (`ServerHandle::evict`: down, maint, removed, failback) or whose upstream socket
//! reported a refusal; the hot path stays lock-free (one atomic load per session per
//! tick). The next datagram then goes up, re-pins exactly as without the fast path, and
//! the session is installed again for its new server. A session's entries are always
//! removed before its upstream socket closes, so a reused port never inherits them.
//!
//! **Idle expiry.** The idle sweep takes, for each session, the newer of user space's own
//! activity time and both entries' last-seen times; expiry then works as without the fast
//! path. The kernel's times are read in batches, not per session: a sweep first picks
//! the offloaded sessions that would expire on user space's time alone (a session whose
//! time was brought up to date is not asked again before another idle timeout), and only
//! if there are any, it takes the engine's pass over the whole flow map
//! (`BPF_MAP_LOOKUP_BATCH`, 8192 entries per call; a key walk on kernels without batch
//! operations), which every worker and listener sweeping within one sweep interval
//! shares ([`LastSeen`]). A shared pass may be up to that interval old, so it is used
//! only to move times forward; the sessions that still look idle afterwards are
//! confirmed with a fresh lookup of their two entries before they expire. The sweeps of
//! all workers together thus make about one pass per sweep interval plus two lookups per
//! session that really expires, instead of two lookups per offloaded session per sweep
//! (`benches/offload_sweep.rs` measures a pass against per-entry lookups).
//!
//! **Safety.** Nothing is pinned: the links and maps live as long as the process holds
//! their descriptors, so a crash or `kill -9` detaches everything (no qdisc is created;
//! TCX needs none). When the object is empty (built without clang), the kernel refuses
//! the program (no CAP_BPF/CAP_NET_ADMIN, old kernel) or `MEDIAGATE_OFFLOAD=off` is set,
//! mediagate logs the reason once, counts it in `mediagate_offload_errors_total{reason}`
//! and the listener runs in user space. The engine is shared by every offloading
//! listener and detached when the last one goes (shutdown, or a reload that turns
//! `offload` off).
//!
//! **Loader.** aya (pure Rust): it loads the ELF object clang produced and needs no C
//! toolchain or libbpf at cargo build time, so `cargo build` works without clang; the
//! per-packet map operations from worker threads use the map descriptors directly
//! (`bpf(2)` is thread-safe), not aya's `&mut` map wrappers. libbpf-rs would compile
//! vendored libbpf C and tie the build to a C compiler.
//!
//! **Wildcard listeners** (`0.0.0.0`): user space does not know which local address a
//! client sent to, so the client entry is installed with destination 0 (the program
//! tries the exact key, then the wildcard one) and the reply entry with source 0; the
//! first client datagram the program forwards writes the address it was sent to into
//! the reply entry, and until then replies go through user space.
//!
//! **IPv6.** A session whose client, listener, upstream local address and server are
//! all native IPv6 (not IPv4-mapped) is installed in `mg_flows6` instead (`struct
//! flow_key6`/`flow_nat6`: 16-byte addresses, no TURN fields), with the same two
//! entries, counters, device learning, wildcard listeners (`::`: address `::` in the
//! keys, taught as for `0.0.0.0`), removal and idle expiry
//! ([`SessionKeys::V6`]; the last-seen pass reads both maps). The program takes
//! Ethernet/IPv6 with UDP as the next header (any extension header, fragments included,
//! goes to the stack), rewrites the addresses (`bpf_skb_store_bytes` of 16 bytes; the
//! UDP checksum, mandatory in IPv6, fixed one 32-bit word at a time with
//! `bpf_l4_csum_replace(BPF_F_PSEUDO_HDR)`) and ports, and delivers as for IPv4
//! (`bpf_redirect_neigh` resolves IPv6 neighbours too). Stay in user space: mixed
//! families (an IPv6 client of an IPv4 server or the reverse; the program does not
//! translate between families). IPv4 clients of a listener on `::` arrive
//! IPv4-mapped and are installed as IPv4 sessions of a `0.0.0.0` listener.
//!
//! **Limits.** TURN channels of mixed families (an IPv4 client relayed to IPv6 peers or the
//! reverse) stay in user space; interfaces created after start are not covered; the re-send of a refused datagram
//! needs a copy user space no longer has once a session is offloaded, so a dead server
//! costs an offloaded flow one datagram (the bound of the failover tests).

mod engine;
pub mod sys;
mod turn;
mod wake;

pub use engine::{Engine, LastSeen, ListenerOffload, SessionKeys, acquire, turn_wanted, wanted};
pub use sys::{FlowKey, FlowNat, monotonic_ns};
pub use turn::{ChannelEntries, TurnCounters, TurnOffload, acquire_turn};
pub use wake::{Waker, evicted};

/// Adds what the kernel forwarded since the last call to the counters of every offloading
/// listener and TURN service, so `/metrics` is exact when read; [`register_metrics`] runs
/// it before every scrape.
pub fn refresh_metrics() {
    engine::refresh_listeners();
    turn::refresh_all();
}

/// Registers the fast path's scrape hook ([`refresh_metrics`]) with `metrics`: the owner
/// registers its own, `metrics` knows nothing of the fast path.
pub fn register_metrics(metrics: &crate::metrics::Metrics) {
    metrics.on_scrape("offload", std::sync::Arc::new(refresh_metrics));
}
