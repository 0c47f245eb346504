//! The per-server health state machine: probe results and passive signals in, `up`/`down`
//! transitions out. Pure code, no I/O and no clock: the caller passes `now`.
//!
//! Zero tolerance: with the default `fall: 1`, one failed probe marks a server down, and a
//! passive signal (ICMP unreachable, connection refused) marks it down regardless of `fall`.
//! A server that has never been probed is `Unknown` and not eligible; its first probe
//! decides at once (a worker that answers at start-up need not wait for `rise` probes).

use super::Reason;
use std::time::{Duration, Instant};

/// Health of one server as the balancer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not probed yet.
    Unknown,
    Up,
    Down,
}

impl Health {
    pub fn as_str(&self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

/// What a probe result or signal did to the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// Health did not change.
    None,
    /// The server became healthy.
    WentUp,
    /// The server was marked down; `detection` is the time since the last good probe or packet.
    WentDown {
        reason: Reason,
        detection: Option<Duration>,
    },
}

/// Health bookkeeping for one server.
#[derive(Debug, Clone)]
pub struct HealthState {
    health: Health,
    fall: u32,
    rise: u32,
    ok_in_row: u32,
    fail_in_row: u32,
    last_good: Option<Instant>,
    up_since: Option<Instant>,
    down_reason: Option<Reason>,
    last_error: Option<String>,
}

impl HealthState {
    /// A server not yet probed. `fall` and `rise` of 0 are treated as 1.
    pub fn new(fall: u32, rise: u32) -> Self {
        HealthState {
            health: Health::Unknown,
            fall: fall.max(1),
            rise: rise.max(1),
            ok_in_row: 0,
            fail_in_row: 0,
            last_good: None,
            up_since: None,
            down_reason: None,
            last_error: None,
        }
    }

    /// A server that needs no probe to be trusted (`type: none`): up from the start.
    pub fn assumed_up(fall: u32, rise: u32, now: Instant) -> Self {
        let mut s = Self::new(fall, rise);
        s.health = Health::Up;
        s.up_since = Some(now);
        s.last_good = Some(now);
        s
    }

    pub fn health(&self) -> Health {
        self.health
    }

    pub fn is_up(&self) -> bool {
        self.health == Health::Up
    }

    /// When the server last came up (None while down or unknown).
    pub fn up_since(&self) -> Option<Instant> {
        self.up_since
    }

    /// Why the server is down (None while up).
    pub fn down_reason(&self) -> Option<Reason> {
        self.down_reason
    }

    /// The last failure detail, kept after recovery for `/status`.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// A probe succeeded.
    pub fn probe_ok(&mut self, now: Instant) -> Transition {
        self.last_good = Some(now);
        self.fail_in_row = 0;
        self.ok_in_row = self.ok_in_row.saturating_add(1);
        let came_up = match self.health {
            Health::Up => false,
            Health::Unknown => true,
            Health::Down => self.ok_in_row >= self.rise,
        };
        if came_up {
            self.health = Health::Up;
            self.up_since = Some(now);
            self.down_reason = None;
            Transition::WentUp
        } else {
            Transition::None
        }
    }

    /// A probe failed (or timed out). A [`Reason::LocalError`] (the balancer ran out of
    /// descriptors or memory) says nothing about the server and changes nothing.
    pub fn probe_failed(&mut self, reason: Reason, detail: &str, now: Instant) -> Transition {
        if reason == Reason::LocalError {
            return Transition::None;
        }
        self.ok_in_row = 0;
        self.fail_in_row = self.fail_in_row.saturating_add(1);
        self.last_error = Some(format!("{reason}: {detail}"));
        let goes_down = match self.health {
            Health::Down => false,
            Health::Unknown => true,
            Health::Up => self.fail_in_row >= self.fall,
        };
        if goes_down {
            self.mark_down(reason, now)
        } else {
            Transition::None
        }
    }

    /// A passive signal from the data plane: down at once, whatever `fall` says (but
    /// never for a [`Reason::LocalError`]).
    pub fn passive_failure(&mut self, reason: Reason, detail: &str, now: Instant) -> Transition {
        if reason == Reason::LocalError {
            return Transition::None;
        }
        self.ok_in_row = 0;
        self.fail_in_row = self.fail_in_row.saturating_add(1);
        self.last_error = Some(format!("{reason}: {detail}"));
        if self.health == Health::Down {
            return Transition::None;
        }
        self.mark_down(reason, now)
    }

    /// Traffic from the server proves it alive; used for detection time only.
    pub fn traffic_seen(&mut self, now: Instant) {
        if self.health == Health::Up {
            self.last_good = Some(self.last_good.map_or(now, |t| t.max(now)));
        }
    }

    /// For `type: none`: bring a passively failed server back.
    pub fn force_up(&mut self, now: Instant) -> Transition {
        if self.health == Health::Up {
            return Transition::None;
        }
        self.health = Health::Up;
        self.ok_in_row = 0;
        self.fail_in_row = 0;
        self.up_since = Some(now);
        self.last_good = Some(now);
        self.down_reason = None;
        Transition::WentUp
    }

    fn mark_down(&mut self, reason: Reason, now: Instant) -> Transition {
        self.health = Health::Down;
        self.up_since = None;
        self.down_reason = Some(reason);
        let detection = self.last_good.map(|t| now.saturating_duration_since(t));
        Transition::WentDown { reason, detection }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(base: Instant, n: u64) -> Instant {
        base + Duration::from_millis(n)
    }

    #[test]
    fn first_probe_decides_at_once() {
        let t = Instant::now();
        let mut up = HealthState::new(1, 2);
        assert_eq!(up.health(), Health::Unknown);
        assert_eq!(up.probe_ok(t), Transition::WentUp);
        let mut down = HealthState::new(3, 2);
        assert!(matches!(
            down.probe_failed(Reason::ProbeTimeout, "x", t),
            Transition::WentDown {
                reason: Reason::ProbeTimeout,
                detection: None
            }
        ));
    }

    #[test]
    fn one_failure_marks_down_with_default_fall() {
        let t = Instant::now();
        let mut s = HealthState::new(1, 2);
        s.probe_ok(t);
        let tr = s.probe_failed(Reason::ProbeFailed, "status 503", ms(t, 100));
        assert_eq!(
            tr,
            Transition::WentDown {
                reason: Reason::ProbeFailed,
                detection: Some(Duration::from_millis(100))
            }
        );
        assert_eq!(s.down_reason(), Some(Reason::ProbeFailed));
        assert_eq!(s.last_error(), Some("probe_failed: status 503"));
    }

    #[test]
    fn fall_counts_consecutive_failures() {
        let t = Instant::now();
        let mut s = HealthState::new(3, 1);
        s.probe_ok(t);
        assert_eq!(s.probe_failed(Reason::ProbeFailed, "", t), Transition::None);
        assert_eq!(s.probe_failed(Reason::ProbeFailed, "", t), Transition::None);
        s.probe_ok(t);
        assert_eq!(s.probe_failed(Reason::ProbeFailed, "", t), Transition::None);
        assert_eq!(s.probe_failed(Reason::ProbeFailed, "", t), Transition::None);
        assert!(matches!(
            s.probe_failed(Reason::ProbeFailed, "", t),
            Transition::WentDown { .. }
        ));
    }

    #[test]
    fn rise_needs_consecutive_successes() {
        let t = Instant::now();
        let mut s = HealthState::new(1, 2);
        s.probe_ok(t);
        s.probe_failed(Reason::ProbeTimeout, "", t);
        assert_eq!(s.probe_ok(ms(t, 1)), Transition::None);
        s.probe_failed(Reason::ProbeTimeout, "", ms(t, 2));
        assert_eq!(s.probe_ok(ms(t, 3)), Transition::None);
        assert_eq!(s.probe_ok(ms(t, 4)), Transition::WentUp);
        assert_eq!(s.up_since(), Some(ms(t, 4)));
    }

    #[test]
    fn passive_signal_ignores_fall_and_measures_from_last_traffic() {
        let t = Instant::now();
        let mut s = HealthState::new(5, 2);
        s.probe_ok(t);
        s.traffic_seen(ms(t, 40));
        let tr = s.passive_failure(Reason::IcmpUnreachable, "refused", ms(t, 45));
        assert_eq!(
            tr,
            Transition::WentDown {
                reason: Reason::IcmpUnreachable,
                detection: Some(Duration::from_millis(5))
            }
        );
        // A second signal while down changes nothing.
        assert_eq!(
            s.passive_failure(Reason::IcmpUnreachable, "refused", ms(t, 46)),
            Transition::None
        );
    }

    #[test]
    fn local_errors_never_count_toward_fall() {
        let t = Instant::now();
        let mut s = HealthState::new(2, 1);
        s.probe_ok(t);
        s.probe_failed(Reason::ProbeFailed, "", t);
        for _ in 0..10 {
            assert_eq!(
                s.probe_failed(Reason::LocalError, "Too many open files", t),
                Transition::None
            );
            assert_eq!(
                s.passive_failure(Reason::LocalError, "Too many open files", t),
                Transition::None
            );
        }
        assert!(s.is_up());
        assert_eq!(s.last_error(), Some("probe_failed: "));
        // A server never probed stays unknown rather than going down.
        let mut fresh = HealthState::new(1, 1);
        assert_eq!(
            fresh.probe_failed(Reason::LocalError, "", t),
            Transition::None
        );
        assert_eq!(fresh.health(), Health::Unknown);
    }

    #[test]
    fn force_up_for_probe_less_servers() {
        let t = Instant::now();
        let mut s = HealthState::assumed_up(1, 2, t);
        assert!(s.is_up());
        s.passive_failure(Reason::ConnectRefused, "", t);
        assert!(!s.is_up());
        assert_eq!(s.force_up(ms(t, 10_000)), Transition::WentUp);
    }
}
