//! Cost of the idle sweep's read of the kernel fast path's last-seen times at 1k, 10k and
//! 100k offloaded sessions (two map entries each): one lookup per entry (how the sweep
//! read them before) against one batched pass over the map (`LastSeen::read`, what it
//! does now). Needs CAP_BPF (creates a map shaped like `mg_flows`; loads no program).
//!
//! `cargo bench --bench offload_sweep` (prints a table; `-- --quick` for 1k and 10k only)

use mediagate::offload::LastSeen;
use mediagate::offload::sys::{self, FlowKey, FlowNat};
use std::time::{Duration, Instant};

fn key(i: u32) -> FlowKey {
    FlowKey {
        saddr: 0x0a00_0000 | i,
        daddr: 0x0a4d_0101,
        sport: (i as u16).to_be(),
        dport: 7030u16.to_be(),
    }
}

/// The best of `runs` timings of `f` (the least disturbed by other work on the machine).
fn best(runs: usize, mut f: impl FnMut()) -> Duration {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let fd = match sys::create_flow_map(262_144) {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("offload_sweep: cannot create a BPF map ({e}); needs CAP_BPF");
            return;
        }
    };
    println!(
        "| sessions | map entries | per entry: calls | per entry: ms | batched pass: calls | batched pass: ms | of which the kernel's pass: ms | per-entry / batched |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut filled = 0u32;
    let sizes: &[u32] = if quick {
        &[1_000, 10_000]
    } else {
        &[1_000, 10_000, 100_000]
    };
    for &sessions in sizes {
        let entries = sessions * 2;
        while filled < entries {
            let nat = FlowNat {
                last_ns: u64::from(filled) + 1,
                ..FlowNat::default()
            };
            sys::insert(&fd, &key(filled), &nat).expect("insert");
            filled += 1;
        }
        let per_entry = best(5, || {
            let mut found = 0usize;
            for i in 0..entries {
                found += usize::from(sys::lookup(&fd, &key(i)).is_some());
            }
            assert_eq!(found, entries as usize);
        });
        let mut calls = 0;
        let batched = best(5, || {
            let (seen, c) = LastSeen::read(&fd, entries as usize).expect("pass");
            assert_eq!(seen.len(), entries as usize);
            calls = c;
        });
        // The kernel's part alone: the pass without building the table.
        let pass_only = best(5, || {
            let mut n = 0usize;
            sys::for_each(&fd, |_, _| n += 1).expect("pass");
            assert_eq!(n, entries as usize);
        });
        println!(
            "| {sessions} | {entries} | {entries} | {:.2} | {calls} | {:.2} | {:.2} | {:.1} |",
            per_entry.as_secs_f64() * 1e3,
            batched.as_secs_f64() * 1e3,
            pass_only.as_secs_f64() * 1e3,
            per_entry.as_secs_f64() / batched.as_secs_f64().max(1e-9)
        );
    }
}
