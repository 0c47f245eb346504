//! The loaded fast path (program, links, maps), shared by every offloading listener, and
//! each listener's handle on it (its counter slot and its sessions' entries).

use super::sys::{self, FlowKey, FlowKey6, FlowNat, FlowNat6, MapKey};
use crate::metrics::{Labels, ListenerMetrics, Metrics, child, labels};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// The BPF object build.rs compiled (empty when clang was missing).
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/udp_offload.o"));

/// Listener slots in `mg_totals` (256 entries: two directions each).
const SLOTS: usize = 128;

/// The program attached to the namespace's interfaces and its maps. Dropping it (the last
/// listener that used it went away) detaches and unloads everything.
pub struct Engine {
    /// Owns the program and its TCX links; dropping it closes their descriptors.
    _ebpf: Mutex<aya::Ebpf>,
    flows: OwnedFd,
    /// `mg_flows6`: the IPv6 sessions.
    flows6: OwnedFd,
    totals: OwnedFd,
    /// TURN: `mg_turn_chan` (client ChannelData → peer) and `mg_turn_peer` (peer → client).
    pub(super) turn_chan: OwnedFd,
    pub(super) turn_peer: OwnedFd,
    /// The same over IPv6: `mg_turn_chan6` and `mg_turn_peer6`.
    pub(super) turn_chan6: OwnedFd,
    pub(super) turn_peer6: OwnedFd,
    cpus: usize,
    used: Mutex<[bool; SLOTS]>,
    /// The last pass over `mg_flows` (see [`Engine::last_seen`]) and when it was taken.
    seen_pass: Mutex<Option<(Instant, Arc<LastSeen>)>>,
    pub interfaces: Vec<String>,
}

/// Every flow entry's last-seen time, read from the kernel in one batched pass: the idle
/// sweeps of all workers and listeners look their sessions up here instead of making two
/// `bpf(2)` calls per session.
#[derive(Default)]
pub struct LastSeen {
    /// `bpf_ktime_get_ns()` of each entry's last datagram (entries that saw none are left
    /// out).
    last_ns: HashMap<FlowKey, u64>,
    /// The same for the IPv6 entries (`mg_flows6`).
    last_ns6: HashMap<FlowKey6, u64>,
}

impl LastSeen {
    /// Reads every entry's last-seen time from a flow map in one batched pass; returns
    /// them and the number of `bpf(2)` calls it took. `expected`: about how many entries
    /// saw a datagram (the previous pass's count), to size the table once.
    pub fn read(flows: &OwnedFd, expected: usize) -> io::Result<(LastSeen, usize)> {
        let mut seen = LastSeen {
            last_ns: HashMap::with_capacity(expected),
            last_ns6: HashMap::new(),
        };
        let calls = sys::for_each(flows, |k, v| {
            if v.last_ns > 0 {
                seen.last_ns.insert(*k, v.last_ns);
            }
        })?;
        Ok((seen, calls))
    }

    /// Adds the last-seen times of an IPv6 flow map (`mg_flows6`) to a pass; returns
    /// the number of `bpf(2)` calls it took.
    pub fn read6(&mut self, flows6: &OwnedFd) -> io::Result<usize> {
        sys::for_each_of(flows6, |k: &FlowKey6, v: &FlowNat6| {
            if v.last_ns > 0 {
                self.last_ns6.insert(*k, v.last_ns);
            }
        })
    }

    /// Nanoseconds from the session's last offloaded datagram either way to `now_ns`
    /// (`CLOCK_MONOTONIC`); None when neither entry saw a datagram.
    pub fn idle_ns(&self, keys: &SessionKeys, now_ns: u64) -> Option<u64> {
        let last = match keys {
            SessionKeys::V4 { fwd, rev } => [fwd, rev]
                .iter()
                .filter_map(|k| self.last_ns.get(k).copied())
                .max()?,
            SessionKeys::V6 { fwd, rev } => [fwd, rev]
                .iter()
                .filter_map(|k| self.last_ns6.get(k).copied())
                .max()?,
        };
        Some(now_ns.saturating_sub(last))
    }

    /// Entries that saw a datagram.
    pub fn len(&self) -> usize {
        self.last_ns.len() + self.last_ns6.len()
    }

    /// No entry saw a datagram.
    pub fn is_empty(&self) -> bool {
        self.last_ns.is_empty() && self.last_ns6.is_empty()
    }
}

/// Why the fast path is not available (a label of `mediagate_offload_errors_total`).
#[derive(Debug)]
struct Unavailable {
    reason: &'static str,
    detail: String,
}

fn unavailable(reason: &'static str, detail: impl std::fmt::Display) -> Unavailable {
    Unavailable {
        reason,
        detail: detail.to_string(),
    }
}

/// Kernel refusals that mean missing privileges rather than a broken program.
fn denied(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return true;
        }
        cur = err.source();
    }
    let text = e.to_string();
    text.contains("Operation not permitted") || text.contains("Permission denied")
}

impl Engine {
    fn start() -> Result<Engine, Unavailable> {
        if std::env::var("MEDIAGATE_OFFLOAD").is_ok_and(|v| v == "off") {
            return Err(unavailable("disabled", "MEDIAGATE_OFFLOAD=off"));
        }
        if OBJECT.is_empty() {
            return Err(unavailable(
                "built_without_clang",
                "built without clang (install clang, llvm and libbpf-dev, then rebuild)",
            ));
        }
        // aya parses the ELF in place and wants it 8-byte aligned.
        let mut aligned = vec![0u64; OBJECT.len().div_ceil(8)];
        // SAFETY: `aligned` has at least OBJECT.len() bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(aligned.as_mut_ptr().cast::<u8>(), OBJECT.len())
        };
        bytes.copy_from_slice(OBJECT);
        let mut ebpf = aya::Ebpf::load(bytes).map_err(|e| {
            let reason = if denied(&e) { "permission" } else { "load" };
            unavailable(reason, format!("{e:#}"))
        })?;
        let map_fd = |ebpf: &aya::Ebpf, name: &str| -> Result<OwnedFd, Unavailable> {
            let data = match ebpf.map(name) {
                Some(aya::maps::Map::HashMap(d)) | Some(aya::maps::Map::PerCpuArray(d)) => d,
                _ => return Err(unavailable("load", format!("map {name} missing"))),
            };
            data.fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| unavailable("load", e))
        };
        let flows = map_fd(&ebpf, "mg_flows")?;
        let flows6 = map_fd(&ebpf, "mg_flows6")?;
        let totals = map_fd(&ebpf, "mg_totals")?;
        let turn_chan = map_fd(&ebpf, "mg_turn_chan")?;
        let turn_peer = map_fd(&ebpf, "mg_turn_peer")?;
        let turn_chan6 = map_fd(&ebpf, "mg_turn_chan6")?;
        let turn_peer6 = map_fd(&ebpf, "mg_turn_peer6")?;
        let cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| unavailable("load", format!("{what}: {e}")))?;
        let prog: &mut aya::programs::SchedClassifier = ebpf
            .program_mut("mg_ingress")
            .ok_or_else(|| unavailable("load", "program mg_ingress missing"))?
            .try_into()
            .map_err(|e| unavailable("load", e))?;
        prog.load().map_err(|e| {
            let reason = if denied(&e) { "permission" } else { "load" };
            unavailable(reason, format!("{e:#}"))
        })?;
        let mut interfaces = Vec::new();
        let mut last_err = None;
        for name in interface_names() {
            match prog.attach_with_options(
                &name,
                aya::programs::TcAttachType::Ingress,
                aya::programs::tc::TcAttachOptions::TcxOrder(aya::programs::LinkOrder::default()),
            ) {
                Ok(_) => interfaces.push(name),
                Err(e) => {
                    tracing::debug!(interface = %name, error = %e, "offload: attach failed");
                    let reason = if denied(&e) { "permission" } else { "attach" };
                    last_err = Some(unavailable(reason, format!("{name}: {e:#}")));
                }
            }
        }
        if interfaces.is_empty() {
            return Err(last_err.unwrap_or_else(|| unavailable("attach", "no interface")));
        }
        tracing::info!(interfaces = ?interfaces, "offload: kernel fast path attached (TCX ingress)");
        Ok(Engine {
            _ebpf: Mutex::new(ebpf),
            flows,
            flows6,
            totals,
            turn_chan,
            turn_peer,
            turn_chan6,
            turn_peer6,
            cpus,
            used: Mutex::new([false; SLOTS]),
            seen_pass: Mutex::new(None),
            interfaces,
        })
    }

    pub(super) fn take_slot(&self) -> Option<u32> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let i = used.iter().position(|u| !u)?;
        used[i] = true;
        Some(i as u32)
    }

    /// The last-seen times of every entry, from a pass at most `max_age` old (a newer pass
    /// is made when needed; concurrent callers wait for it and share it).
    pub fn last_seen(&self, max_age: Duration) -> Arc<LastSeen> {
        let mut pass = self.seen_pass.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, seen)) = pass.as_ref()
            && at.elapsed() <= max_age
        {
            return seen.clone();
        }
        let expected = pass.as_ref().map_or(0, |(_, seen)| seen.len());
        let started = Instant::now();
        let read = LastSeen::read(&self.flows, expected).and_then(|(mut seen, calls)| {
            let calls6 = seen.read6(&self.flows6)?;
            Ok((seen, calls + calls6))
        });
        let seen = match read {
            Ok((seen, calls)) => {
                tracing::trace!(entries = seen.len(), calls, took = ?started.elapsed(), "offload: last-seen pass");
                seen
            }
            Err(e) => {
                // Nothing is expired on a failed read: sessions only live longer.
                tracing::debug!(error = %e, "offload: last-seen pass failed");
                LastSeen::default()
            }
        };
        let seen = Arc::new(seen);
        *pass = Some((Instant::now(), seen.clone()));
        seen
    }

    pub(super) fn totals(&self, slot: u32, dir: u32) -> (u64, u64) {
        sys::percpu_totals(&self.totals, (slot << 1) | dir, self.cpus).unwrap_or((0, 0))
    }

    /// Gives a slot taken with [`Engine::take_slot`] back.
    pub(super) fn free_slot(&self, slot: u32) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used[slot as usize] = false;
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        tracing::info!(interfaces = ?self.interfaces, "offload: kernel fast path detached");
    }
}

/// The interfaces of this network namespace.
fn interface_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "bonding_masters")
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Whether a listener with `offload: <configured>` uses the fast path: `ebpf`, or `none`
/// while `$MEDIAGATE_UDP_OFFLOAD=ebpf` is set (how the Kubernetes component turns it on
/// without editing the config). An explicit `offload: none` cannot be told apart from
/// the default, so the variable turns on every UDP listener.
pub fn wanted(configured: crate::config::Offload) -> bool {
    configured == crate::config::Offload::Ebpf
        || std::env::var("MEDIAGATE_UDP_OFFLOAD").is_ok_and(|v| v.trim() == "ebpf")
}

/// Whether the TURN relay uses the fast path: `turn.relay.offload: ebpf`, or
/// `$MEDIAGATE_TURN_OFFLOAD=ebpf` (set by the Kubernetes component).
pub fn turn_wanted(configured: crate::config::Offload) -> bool {
    configured == crate::config::Offload::Ebpf
        || std::env::var("MEDIAGATE_TURN_OFFLOAD").is_ok_and(|v| v.trim() == "ebpf")
}

static ENGINE: Mutex<Weak<Engine>> = Mutex::new(Weak::new());
static LOGGED: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
static LISTENERS: Mutex<Vec<Weak<ListenerOffload>>> = Mutex::new(Vec::new());

fn engine() -> Result<Arc<Engine>, Unavailable> {
    let mut g = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = g.upgrade() {
        return Ok(e);
    }
    let e = Arc::new(Engine::start()?);
    *g = Arc::downgrade(&e);
    Ok(e)
}

fn count_error(errors: &Family<Labels, Counter>, reason: &'static str) {
    child(errors, &labels(&[("reason", reason)])).inc();
}

/// One user's share of the engine (a listener, or the TURN service): its counter slot in
/// `mg_totals`, what of those totals its counters already have, and the counters of
/// entries the kernel refused. Dropping it frees the slot.
pub(super) struct Slot {
    engine: Arc<Engine>,
    index: u32,
    /// Totals already added to the user's counters, per direction.
    seen: Mutex<[(u64, u64); 2]>,
    map_full: Counter,
    insert_failed: Counter,
}

impl Slot {
    /// The engine and a free slot for `name`, or None: logged once per reason, counted in
    /// `errors` by reason; `what` then runs in user space.
    pub(super) fn take(errors: &Family<Labels, Counter>, name: &str, what: &str) -> Option<Slot> {
        let engine = match engine() {
            Ok(e) => e,
            Err(u) => {
                count_error(errors, u.reason);
                let mut logged = LOGGED.lock().unwrap_or_else(|p| p.into_inner());
                if !logged.contains(&u.reason) {
                    logged.push(u.reason);
                    tracing::warn!(listener = %name, reason = u.reason, detail = %u.detail, "offload unavailable: {}; {what} runs in user space", u.detail);
                }
                return None;
            }
        };
        let Some(index) = engine.take_slot() else {
            count_error(errors, "slots");
            tracing::warn!(listener = %name, "offload unavailable: all {SLOTS} counter slots in use; {what} runs in user space");
            return None;
        };
        let seen = Mutex::new([engine.totals(index, 0), engine.totals(index, 1)]);
        let error = |reason| child(errors, &labels(&[("reason", reason)]));
        Some(Slot {
            engine,
            index,
            seen,
            map_full: error("map_full"),
            insert_failed: error("map_insert"),
        })
    }

    pub(super) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The `slot` value of this user's entries in direction `dir` (0 or 1).
    pub(super) fn entry_slot(&self, dir: u32) -> u32 {
        (self.index << 1) | dir
    }

    /// Inserts the two entries of one session or channel, both or neither; a refusal is
    /// counted (`map_full`, `map_insert`).
    pub(super) fn insert_pair<A: MapKey, B: MapKey>(
        &self,
        first: (&OwnedFd, &A, &A::Value),
        second: (&OwnedFd, &B, &B::Value),
    ) -> bool {
        let inserted = sys::insert(first.0, first.1, first.2).and_then(|()| {
            sys::insert(second.0, second.1, second.2).inspect_err(|_| sys::remove(first.0, first.1))
        });
        match inserted {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) => {
                self.map_full.inc();
                false
            }
            Err(_) => {
                self.insert_failed.inc();
                false
            }
        }
    }

    /// Adds what the kernel counted since the last call to the user's counters:
    /// `counters[dir]` = (packets, bytes, offloaded packets) of direction `dir`.
    pub(super) fn refresh(&self, counters: [[&Counter; 3]; 2]) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for (dir, [packets, bytes, offloaded]) in counters.into_iter().enumerate() {
            let (p, b) = self.engine.totals(self.index, dir as u32);
            let (sp, sb) = seen[dir];
            seen[dir] = (p, b);
            let (dp, db) = (p.saturating_sub(sp), b.saturating_sub(sb));
            packets.inc_by(dp);
            bytes.inc_by(db);
            offloaded.inc_by(dp);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.engine.free_slot(self.index);
    }
}

/// The fast path for listener `name`, or None (logged once per reason, counted in
/// `mediagate_offload_errors_total{reason}`): the listener then runs in user space.
pub fn acquire(
    metrics: &Metrics,
    name: &str,
    lm: &ListenerMetrics,
) -> Option<Arc<ListenerOffload>> {
    let l = ListenerOffload {
        slot: Slot::take(&metrics.offload_errors, name, "UDP")?,
        lm: lm.clone(),
    };
    let l = Arc::new(l);
    let mut all = LISTENERS.lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|w| w.strong_count() > 0);
    all.push(Arc::downgrade(&l));
    Some(l)
}

/// Adds the kernel's per-CPU totals of every offloading listener to its packet and byte
/// counters (part of [`super::refresh_metrics`]).
pub(super) fn refresh_listeners() {
    let all: Vec<Arc<ListenerOffload>> = {
        let all = LISTENERS.lock().unwrap_or_else(|p| p.into_inner());
        all.iter().filter_map(Weak::upgrade).collect()
    };
    for l in all {
        l.refresh();
    }
}

/// The two map entries of one offloaded session: `fwd` is client → listener, `rev`
/// server → balancer session port; in `mg_flows` (IPv4) or `mg_flows6` (IPv6).
#[derive(Clone, Copy, Debug)]
pub enum SessionKeys {
    V4 { fwd: FlowKey, rev: FlowKey },
    V6 { fwd: FlowKey6, rev: FlowKey6 },
}

/// One listener's use of the engine.
pub struct ListenerOffload {
    slot: Slot,
    lm: ListenerMetrics,
}

fn v4(a: SocketAddr) -> Option<SocketAddrV4> {
    match a {
        SocketAddr::V4(a) if !a.ip().is_unspecified() => Some(a),
        SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .filter(|ip| !ip.is_unspecified())
            .map(|ip| SocketAddrV4::new(ip, a.port())),
        _ => None,
    }
}

/// A native IPv6 address (not IPv4-mapped, not `::`).
fn v6(a: SocketAddr) -> Option<SocketAddrV6> {
    match a {
        SocketAddr::V6(a) if !a.ip().is_unspecified() && a.ip().to_ipv4_mapped().is_none() => {
            Some(a)
        }
        _ => None,
    }
}

impl ListenerOffload {
    /// Installs a session: `client` sent to `listen`; its upstream socket is `local`
    /// connected to `server`. IPv4 sessions go to `mg_flows`, IPv6 ones (all four
    /// addresses native IPv6) to `mg_flows6`. None when the addresses are not offloadable
    /// (mixed families) or the map refused the entries (counted).
    pub fn install(
        &self,
        client: SocketAddr,
        listen: SocketAddr,
        local: SocketAddr,
        server: SocketAddr,
    ) -> Option<SessionKeys> {
        // A wildcard listener (0.0.0.0, ::) installs its client entry with address 0;
        // the program fills in the address the client used on its first datagram. A
        // listener on :: also takes IPv4 clients (IPv4-mapped): IPv4 sessions.
        let listen6 = match listen {
            SocketAddr::V6(a) if a.ip().is_unspecified() => Some(a),
            a => v6(a),
        };
        if let (Some(client), Some(listen), Some(local), Some(server)) =
            (v6(client), listen6, v6(local), v6(server))
        {
            return self.install6(client, listen, local, server);
        }
        let listen = match listen {
            SocketAddr::V4(a) if a.ip().is_unspecified() => a,
            SocketAddr::V6(a) if a.ip().is_unspecified() => {
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, a.port())
            }
            a => v4(a)?,
        };
        let (client, local, server) = (v4(client)?, v4(local)?, v4(server)?);
        let (kf, kr) = (FlowKey::new(client, listen), FlowKey::new(server, local));
        let fwd = FlowNat::new(local, server, self.slot.entry_slot(0));
        let rev = FlowNat::new(listen, client, self.slot.entry_slot(1));
        let flows = &self.slot.engine().flows;
        if !self
            .slot
            .insert_pair((flows, &kf, &fwd), (flows, &kr, &rev))
        {
            return None;
        }
        self.lm.offload_sessions.inc();
        Some(SessionKeys::V4 { fwd: kf, rev: kr })
    }

    /// [`ListenerOffload::install`] for an IPv6 session (`mg_flows6`).
    fn install6(
        &self,
        client: SocketAddrV6,
        listen: SocketAddrV6,
        local: SocketAddrV6,
        server: SocketAddrV6,
    ) -> Option<SessionKeys> {
        let (kf, kr) = (FlowKey6::new(client, listen), FlowKey6::new(server, local));
        let fwd = FlowNat6::new(local, server, self.slot.entry_slot(0));
        let rev = FlowNat6::new(listen, client, self.slot.entry_slot(1));
        let flows = &self.slot.engine().flows6;
        if !self
            .slot
            .insert_pair((flows, &kf, &fwd), (flows, &kr, &rev))
        {
            return None;
        }
        self.lm.offload_sessions.inc();
        Some(SessionKeys::V6 { fwd: kf, rev: kr })
    }

    /// Removes a session's entries: its next datagram goes up to user space.
    pub fn remove(&self, keys: &SessionKeys) {
        let engine = self.slot.engine();
        match keys {
            SessionKeys::V4 { fwd, rev } => {
                sys::remove(&engine.flows, fwd);
                sys::remove(&engine.flows, rev);
            }
            SessionKeys::V6 { fwd, rev } => {
                sys::remove(&engine.flows6, fwd);
                sys::remove(&engine.flows6, rev);
            }
        }
        self.lm.offload_sessions.dec();
    }

    /// Nanoseconds since the session's last offloaded datagram either way (None: none),
    /// read now: two lookups.
    pub fn idle_ns(&self, keys: &SessionKeys) -> Option<u64> {
        let engine = self.slot.engine();
        let last = match keys {
            SessionKeys::V4 { fwd, rev } => [fwd, rev]
                .iter()
                .filter_map(|k| sys::lookup(&engine.flows, *k))
                .map(|n| n.last_ns)
                .max(),
            SessionKeys::V6 { fwd, rev } => [fwd, rev]
                .iter()
                .filter_map(|k| sys::lookup(&engine.flows6, *k))
                .map(|n| n.last_ns)
                .max(),
        }
        .filter(|&ns| ns > 0)?;
        Some(sys::monotonic_ns().saturating_sub(last))
    }

    /// The last-seen times of every offloaded session (of every listener), from one
    /// batched pass over the kernel's map at most `max_age` old.
    pub fn last_seen(&self, max_age: Duration) -> Arc<LastSeen> {
        self.slot.engine().last_seen(max_age)
    }

    /// Adds what the kernel forwarded since the last call to the listener's counters.
    pub fn refresh(&self) {
        let lm = &self.lm;
        self.slot.refresh([
            [
                &lm.packets_to_server,
                &lm.bytes_to_server,
                &lm.offload_packets_to_server,
            ],
            [
                &lm.packets_to_client,
                &lm.bytes_to_client,
                &lm.offload_packets_to_client,
            ],
        ]);
    }
}

impl Drop for ListenerOffload {
    fn drop(&mut self) {
        self.refresh();
    }
}
