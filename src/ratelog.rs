//! Rate limiting for log lines that a client can trigger at will (auth failures, refused
//! peers, malformed packets, local resource exhaustion under a flood): at most `burst` lines per window, then one summary line with
//! the number suppressed when the next window opens. Counters are never rate limited.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One limiter per kind of event.
#[derive(Debug)]
pub(crate) struct RateLimit {
    kind: &'static str,
    window: Duration,
    burst: u32,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

impl RateLimit {
    pub(crate) fn new(kind: &'static str, window: Duration, burst: u32) -> Self {
        RateLimit {
            kind,
            window,
            burst,
            state: Mutex::new(State {
                window_start: Instant::now(),
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether the caller may log this event now. Logs the summary of the previous window
    /// itself when a new window opens.
    pub(crate) fn allow(&self) -> bool {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(st.window_start) >= self.window {
            if st.suppressed > 0 {
                tracing::warn!(
                    kind = self.kind,
                    suppressed = st.suppressed,
                    "similar log lines suppressed by rate limit"
                );
            }
            st.window_start = now;
            st.logged = 0;
            st.suppressed = 0;
        }
        if st.logged < self.burst {
            st.logged += 1;
            true
        } else {
            st.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_per_window() {
        let r = RateLimit::new("t", Duration::from_millis(50), 3);
        let allowed = (0..10).filter(|_| r.allow()).count();
        assert_eq!(allowed, 3);
        std::thread::sleep(Duration::from_millis(60));
        assert!(r.allow(), "a new window opens");
    }
}
