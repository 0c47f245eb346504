//! The adaptive probe timeout: a server's probe round-trip time learnt as TCP learns its
//! retransmission timeout (RFC 6298 §2: smoothed RTT with gain 1/8, variance with gain
//! 1/4), turned into how long the next probe may take.
//!
//! timeout = clamp(3 × SRTT + 4 × RTTVAR, floor, ceiling)
//!
//! with `floor` = [`FLOOR`] (or the ceiling, when that is lower) and `ceiling` = the
//! configured `health.timeout`. Before the first answer the timeout is the ceiling: a
//! server that never answered has taught nothing. Only successes are samples, so a failed
//! probe never shrinks the next one (confirmation probes run under the same timeout). A
//! probe that runs into an adaptive timeout is only an ambiguous failure: the prober
//! confirms it before anyone hears of it (see `prober`), so a tight timeout buys speed on
//! a hung node, not false verdicts.
//!
//! Pure: no clock, no I/O; the prober feeds it measured durations.

use std::time::Duration;

/// The shortest adaptive timeout: below it, scheduling noise on a loaded machine, not the
/// server, decides.
pub const FLOOR: Duration = Duration::from_millis(25);

/// One server's probe round-trip estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RttEstimate {
    /// Smoothed RTT and its mean deviation, in seconds; `None` before the first sample.
    srtt_var: Option<(f64, f64)>,
}

impl Default for RttEstimate {
    fn default() -> Self {
        Self::new()
    }
}

impl RttEstimate {
    pub const fn new() -> Self {
        RttEstimate { srtt_var: None }
    }

    /// Takes the round-trip time of a probe that succeeded (RFC 6298 §2.2 and §2.3).
    pub fn sample(&mut self, rtt: Duration) {
        let r = rtt.as_secs_f64();
        self.srtt_var = Some(match self.srtt_var {
            None => (r, r / 2.0),
            Some((srtt, var)) => {
                let var = 0.75 * var + 0.25 * (srtt - r).abs();
                (0.875 * srtt + 0.125 * r, var)
            }
        });
    }

    /// The smoothed RTT, once there is one.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt_var.map(|(s, _)| Duration::from_secs_f64(s))
    }

    /// How long the next probe may take, at most `ceiling` (the configured timeout).
    pub fn timeout(&self, ceiling: Duration) -> Duration {
        let Some((srtt, var)) = self.srtt_var else {
            return ceiling;
        };
        let t = Duration::from_secs_f64((3.0 * srtt + 4.0 * var).min(ceiling.as_secs_f64()));
        t.max(FLOOR).min(ceiling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn no_sample_means_the_ceiling() {
        assert_eq!(RttEstimate::new().timeout(500 * MS), 500 * MS);
    }

    #[test]
    fn the_first_sample_sets_srtt_and_half_of_it_as_variance() {
        let mut e = RttEstimate::new();
        e.sample(20 * MS);
        assert_eq!(e.srtt(), Some(20 * MS));
        // 3 × 20 + 4 × 10 = 100 ms.
        assert_eq!(e.timeout(500 * MS), 100 * MS);
    }

    #[test]
    fn steady_fast_answers_settle_on_the_floor_and_never_pass_the_ceiling() {
        let mut e = RttEstimate::new();
        for _ in 0..50 {
            e.sample(MS / 10);
        }
        assert_eq!(e.timeout(500 * MS), FLOOR);
        // A ceiling below the floor wins: the configured timeout is never exceeded.
        assert_eq!(e.timeout(10 * MS), 10 * MS);
        let mut slow = RttEstimate::new();
        slow.sample(400 * MS);
        assert_eq!(slow.timeout(500 * MS), 500 * MS);
    }

    #[test]
    fn variance_widens_the_timeout_for_a_jittery_server() {
        let (mut steady, mut jittery) = (RttEstimate::new(), RttEstimate::new());
        for i in 0..40 {
            steady.sample(10 * MS);
            jittery.sample(if i % 2 == 0 { 2 * MS } else { 18 * MS });
        }
        let ceiling = 1000 * MS;
        assert!(
            jittery.timeout(ceiling) > steady.timeout(ceiling),
            "{:?} vs {:?}",
            jittery.timeout(ceiling),
            steady.timeout(ceiling)
        );
        // The RFC's gains: after a jump the smoothed value moves by 1/8 of the gap.
        let mut e = RttEstimate::new();
        e.sample(10 * MS);
        e.sample(90 * MS);
        assert_eq!(e.srtt(), Some(20 * MS));
    }
}
