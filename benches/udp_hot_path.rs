//! Micro-benchmarks of the UDP per-packet decision path: what a worker does for each
//! client datagram besides the syscalls (session lookup, eviction-epoch check, keeping a
//! copy for a possible re-send, address conversion for the batch), and the balancing
//! decision made once per new session.
//!
//! `cargo bench --bench udp_hot_path`

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mediagate::config::Balance;
use mediagate::proxy::sys::{MsgBatch, from_storage, to_storage};
use mediagate::proxy::udp::{Ring, SessionIndex};
use mediagate::upstream::select;
use mediagate::upstream::{ServerHandle, Tier};
use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

fn client(i: u32) -> SocketAddr {
    SocketAddr::new(
        IpAddr::from((0x0a00_0000u32 + (i >> 14)).to_be_bytes()),
        1024 + (i & 0x3fff) as u16,
    )
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("session_lookup");
    for n in [1_000u32, 100_000] {
        let mut idx = SessionIndex::default();
        for i in 0..n {
            idx.insert(0, client(i), i);
        }
        let probes: Vec<SocketAddr> = (0..1024).map(|i| client((i * 7919) % n)).collect();
        g.throughput(Throughput::Elements(probes.len() as u64));
        g.bench_with_input(BenchmarkId::new("hit", n), &probes, |b, probes| {
            b.iter(|| {
                let mut s = 0u64;
                for p in probes {
                    s += u64::from(*idx.get(0, black_box(*p)).unwrap_or(&0));
                }
                s
            })
        });
        let misses: Vec<SocketAddr> = (0..1024).map(|i| client(n + i)).collect();
        g.bench_with_input(BenchmarkId::new("miss", n), &misses, |b, probes| {
            b.iter(|| {
                probes
                    .iter()
                    .filter(|p| idx.get(0, black_box(**p)).is_some())
                    .count()
            })
        });
    }
    g.finish();
}

fn decision(c: &mut Criterion) {
    // The whole per-datagram decision for an existing session: look it up, check its
    // server's eviction epoch, keep a copy of the datagram for a possible re-send.
    let server = Arc::new(ServerHandle::new(
        IpAddr::from([10, 0, 0, 1]),
        Some(5004),
        5004,
        Tier::Primary,
    ));
    let n = 10_000u32;
    let mut idx = SessionIndex::default();
    let mut pinned = Vec::new();
    for i in 0..n {
        idx.insert(0, client(i), i);
        pinned.push((server.clone(), server.epoch()));
    }
    let mut ring = Ring::new();
    let mut g = c.benchmark_group("per_datagram_decision");
    for size in [64usize, 1200] {
        let data = vec![0x5au8; size];
        g.throughput(Throughput::Elements(1));
        let mut i = 0u32;
        g.bench_function(BenchmarkId::new("lookup_epoch_copy", size), |b| {
            b.iter(|| {
                i = (i + 7919) % n;
                let &slot = idx.get(0, black_box(client(i)))?;
                let (srv, epoch) = &pinned[slot as usize];
                if srv.epoch() != *epoch {
                    return None;
                }
                ring.put(slot, 1, black_box(&data))
            })
        });
    }
    g.finish();
}

fn batch_addressing(c: &mut Criterion) {
    // Filling a reply batch: address conversion per datagram, as `address_last` does.
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage = unsafe { std::mem::zeroed() };
    let a = client(42);
    c.bench_function("sockaddr_to_storage_and_back", |b| {
        b.iter(|| {
            let len = to_storage(black_box(a), &mut storage);
            from_storage(&storage, len)
        })
    });
    let mut batch = MsgBatch::new(32, 2048);
    let data = [7u8; 64];
    c.bench_function("batch_push_32x64B", |b| {
        b.iter(|| {
            for _ in 0..32 {
                batch.push(black_box(&data), a);
            }
            batch.clear();
        })
    });
}

fn new_session_pick(c: &mut Criterion) {
    let servers: Vec<Arc<ServerHandle>> = (1..=3)
        .map(|i| {
            Arc::new(ServerHandle::new(
                IpAddr::from([10, 0, 0, i]),
                Some(5004),
                5004,
                if i == 1 { Tier::Primary } else { Tier::Backup },
            ))
        })
        .collect();
    let mut g = c.benchmark_group("new_session_pick");
    for balance in [Balance::First, Balance::Hash, Balance::LeastSessions] {
        g.bench_function(format!("{balance:?}"), |b| {
            let mut i = 0u32;
            b.iter(|| {
                i = i.wrapping_add(1);
                select::pick(
                    balance,
                    servers.iter(),
                    black_box(client(i).ip()),
                    i as usize,
                )
                .map(|s| s.ip)
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    lookup,
    decision,
    batch_addressing,
    new_session_pick
);
criterion_main!(benches);
