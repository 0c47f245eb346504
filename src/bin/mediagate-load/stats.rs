//! What a run measured, apart from how it was driven: the round-trip histogram (log-linear,
//! shared by the UDP and TURN generators), the slow-reply windows (`--slow-us`: when the
//! slow replies were sent, to tell a stall from a slow path) and the clocks the reports use.

/// Round-trip times in nanoseconds: exact below 128 ns, then 64 sub-buckets per power of
/// two (under 1.6% error), up to 2^42 ns.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; Self::index(1 << 42) + 1],
            total: 0,
            max: 0,
        }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        if v < 2 * SUB {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let shift = msb - SUB_BITS;
        ((u64::from(shift) + 1) * SUB + ((v >> shift) - SUB)) as usize
    }

    /// Lowest value that falls in bucket `i`.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * SUB {
            return i;
        }
        let shift = i / SUB - 1;
        (i % SUB + SUB) << shift
    }

    pub fn record(&mut self, v: u64) {
        let i = Self::index(v).min(self.counts.len() - 1);
        self.counts[i] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    /// The largest value recorded (0 when empty).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Adds another histogram's samples to this one.
    pub fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.total += o.total;
        self.max = self.max.max(o.max);
    }

    /// The value at quantile `q` (0..=1); 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        if rank == self.total {
            return self.max;
        }
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i).min(self.max);
            }
        }
        self.max
    }
}

/// Replies slower than a threshold, counted per 10 ms window of their send time (from
/// the run's start): tells a stall (one window holds most of them) from a path that is
/// slow throughout. At most one entry per window of a run (runs are ≤ 120 s).
pub struct SlowWindows {
    threshold_ns: u64,
    /// window index → (replies over the threshold, the slowest of them in ns)
    windows: std::collections::BTreeMap<u64, (u64, u64)>,
}

impl SlowWindows {
    const WINDOW_NS: u64 = 10_000_000;

    pub fn new(threshold_us: Option<u64>) -> SlowWindows {
        SlowWindows {
            threshold_ns: threshold_us.map_or(u64::MAX, |us| us.saturating_mul(1000)),
            windows: Default::default(),
        }
    }

    pub fn record(&mut self, sent_at_ns: u64, rtt_ns: u64) {
        if rtt_ns > self.threshold_ns {
            let w = self
                .windows
                .entry(sent_at_ns / Self::WINDOW_NS)
                .or_default();
            w.0 += 1;
            w.1 = w.1.max(rtt_ns);
        }
    }

    /// `slow_us=T windows=N max_window=K [START_ms:COUNT<=SLOWEST_us ...]`
    pub fn line(&self, threshold_us: u64) -> String {
        let most = self.windows.values().map(|w| w.0).max().unwrap_or(0);
        let list: String = self
            .windows
            .iter()
            .map(|(k, (n, max))| format!(" {}ms:{n}<={}us", k * 10, max / 1000))
            .collect();
        format!(
            "slow_us={threshold_us} windows={} max_window={most}{list}",
            self.windows.len()
        )
    }
}

/// CLOCK_MONOTONIC now, ns (`Instant` reads the same clock but hides its value).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CPU time of this process so far (all threads), ns.
pub fn process_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_windows_group_slow_replies_by_send_time() {
        let mut w = SlowWindows::new(Some(1000));
        w.record(5_000_000, 900_000); // fast: not counted
        w.record(12_000_000, 2_000_000);
        w.record(19_999_999, 4_500_000);
        w.record(250_000_000, 1_500_000);
        assert_eq!(
            w.line(1000),
            "slow_us=1000 windows=2 max_window=2 10ms:2<=4500us 250ms:1<=1500us"
        );
        let off = SlowWindows::new(None);
        assert_eq!(off.threshold_ns, u64::MAX);
        assert_eq!(off.line(5), "slow_us=5 windows=0 max_window=0");
    }

    #[test]
    fn histogram_quantiles_are_close() {
        let mut h = Histogram::default();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        for (q, want) in [
            (0.5, 50_000_000.0),
            (0.99, 99_000_000.0),
            (0.999, 99_900_000.0),
        ] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.02, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.quantile(1.0), 100_000_000);
        for v in [0u64, 1, 127, 128, 129, 255, 256, 1 << 20, (1 << 20) + 12345] {
            let i = Histogram::index(v);
            assert!(
                Histogram::value(i) <= v && v - Histogram::value(i) <= v / 60,
                "{v}"
            );
        }
    }
}
