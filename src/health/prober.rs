//! The prober: one task per server that runs its probe on its own timer and reports every
//! verdict through a [`ProbeSink`] (the upstream's controller implements it). Probes of
//! different servers never wait on each other, and a probe never outlives `timeout`.
//!
//! **Confirmed verdicts.** A failure that may be a lost datagram or a slow answer (a
//! timeout, a wrong or missing reply, an HTTP status: [`ProbeError::is_ambiguous`]) is not
//! reported at once: the prober sends `confirm.probes` more probes right away,
//! `confirm.interval` apart, each without waiting for the one before (so a hung server
//! costs one timeout after the last launch). Any success cancels it (the round reports
//! success); the failure is reported only when every confirmation failed too, carrying
//! how it was confirmed. A refusal (ICMP unreachable, connection refused) is reported at once. So
//! one lost probe never moves a session, and a dead server is still known within a few
//! tens of milliseconds of its first failed probe.
//!
//! **Adaptive timeouts.** Each probe may take what the server's learnt round-trip time
//! allows ([`RttEstimate::timeout`], within a floor and the configured `timeout`), so a
//! hung server is suspected after a few of its usual round trips, not after `timeout`.
//!
//! Health sits below the upstream layer (ARCHITECTURE.md): it knows probes, not servers
//! or controllers, so whoever starts a prober hands it the sink its results go to.

use super::rtt::RttEstimate;
use super::{Confirmed, HealthCheck, ProbeError, Reason};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use prometheus_client::metrics::counter::Counter;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Where a prober's results go.
pub trait ProbeSink: Send + Sync + 'static {
    /// Resolves when the data plane suspects the server went silent (sessions that were
    /// getting replies get none): the prober then probes at once. Never, by default.
    fn suspected(&self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }

    /// Delivers one result, taken at `at`; resolves to false when nobody listens any more
    /// (the prober then stops).
    fn report(
        &self,
        result: Result<(), ProbeError>,
        at: Instant,
    ) -> impl Future<Output = bool> + Send;
}

/// `mediagate_probes_total{upstream,server,result}` handles for one server.
#[derive(Clone, Debug)]
pub struct ProbeCounters {
    pub ok: Counter,
    pub failed: Counter,
    pub timeout: Counter,
    /// The balancer's own resources ran out (`result="local_error"`): not the server's fault.
    pub local_error: Counter,
    /// `mediagate_probe_confirmations_total{result="confirmed"}`: ambiguous failures that
    /// every confirmation probe confirmed (reported as failures).
    pub confirmed: Counter,
    /// `mediagate_probe_confirmations_total{result="cancelled"}`: ambiguous failures that
    /// a confirmation probe cancelled (never reported).
    pub cancelled: Counter,
    /// `mediagate_silence_suspicions_total`: rounds started at once because the data
    /// plane saw the server fall silent.
    pub suspected: Counter,
}

/// How an ambiguous failure is confirmed (`health.confirm`, `health.confirm_interval`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirm {
    /// More probes that must all fail; 0 reports every failure at once.
    pub probes: u32,
    /// Pause before each confirmation probe.
    pub interval: Duration,
}

/// Log lines about probes that failed for local reasons: at most a few per second for the
/// whole process, however many servers are probed.
static LOCAL_ERROR_LOG: std::sync::LazyLock<crate::ratelog::RateLimit> =
    std::sync::LazyLock::new(|| {
        crate::ratelog::RateLimit::new("probe_local_error", Duration::from_secs(10), 5)
    });

/// Everything one prober needs.
pub struct Prober<S> {
    pub check: Arc<dyn HealthCheck>,
    /// The server as logs name it (`ip:port`).
    pub label: String,
    /// Where results go.
    pub sink: S,
    /// Address probed (the server's, or `health.port` on the same host).
    pub target: SocketAddr,
    pub interval: Duration,
    /// The longest a probe may take (`health.timeout`): the ceiling of the adaptive one.
    pub timeout: Duration,
    /// Learn the server's round-trip time and probe with an adaptive timeout
    /// (`health.adaptive_timeout`).
    pub adaptive: bool,
    pub confirm: Confirm,
    pub counters: ProbeCounters,
}

impl<S: ProbeSink> Prober<S> {
    /// Runs until `cancel` fires or the sink goes away. The first probe starts at once.
    pub async fn run(self, cancel: CancellationToken) {
        let mut rtt = RttEstimate::new();
        let mut suspected = false;
        loop {
            let started = tokio::time::Instant::now();
            let round = if suspected {
                self.burst(&mut rtt, started, &cancel).await
            } else {
                self.verdict(&mut rtt, started, &cancel).await
            };
            let Some(result) = round else {
                return;
            };
            match &result {
                // The balancer could not probe (out of descriptors, buffers or ports): the
                // sink never hears of it, so it counts toward nothing.
                Err(e) if e.reason == Reason::LocalError => {
                    if LOCAL_ERROR_LOG.allow() {
                        tracing::warn!(server = %self.label, target = %self.target, error = %e.detail, "probe could not run: local resources exhausted (not counted against the server)");
                    }
                }
                _ => {
                    if !self.sink.report(result, Instant::now()).await {
                        return;
                    }
                }
            }
            // Fixed cadence from the probe's start: a slow probe (or a confirmation)
            // shortens the pause, so a hung server is re-probed right after its verdict.
            suspected = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(started + self.interval) => false,
                _ = self.sink.suspected() => {
                    self.counters.suspected.inc();
                    true
                }
            };
        }
    }

    /// A round after a suspicion of silence: the probe and its confirmations all at once
    /// (the silence is already evidence, so nothing waits for a first failure). Any
    /// success clears the server; a refusal, or every probe failing, confirms it down.
    async fn burst(
        &self,
        rtt: &mut RttEstimate,
        started: tokio::time::Instant,
        cancel: &CancellationToken,
    ) -> Option<Result<(), ProbeError>> {
        self.confirm(
            None,
            self.confirm.probes + 1,
            Duration::ZERO,
            rtt,
            started,
            cancel,
        )
        .await
    }

    /// One round: a probe and, when it failed ambiguously, its confirmation. None when
    /// `cancel` fired.
    async fn verdict(
        &self,
        rtt: &mut RttEstimate,
        started: tokio::time::Instant,
        cancel: &CancellationToken,
    ) -> Option<Result<(), ProbeError>> {
        let timeout = self.timeout_now(rtt);
        let (first, took) = tokio::select! {
            _ = cancel.cancelled() => return None,
            r = self.probe(timeout) => r,
        };
        self.count(&first, took, rtt);
        match first {
            Err(e) if e.is_ambiguous() && self.confirm.probes > 0 => {
                let (n, spacing) = (self.confirm.probes, self.confirm.interval);
                self.confirm(Some(e), n, spacing, rtt, started, cancel)
                    .await
            }
            r => Some(r),
        }
    }

    /// Confirms a failure: `probes` probes, launched `spacing` apart without waiting for
    /// each other (a hung server costs one timeout after the last launch, not one per
    /// probe). `first` is the ambiguous failure being confirmed (None: a burst after a
    /// suspicion, whose first probe is among the `probes`). The first success clears the
    /// server; a refusal, or every probe failing, confirms the failure.
    async fn confirm(
        &self,
        first: Option<ProbeError>,
        probes: u32,
        spacing: Duration,
        rtt: &mut RttEstimate,
        started: tokio::time::Instant,
        cancel: &CancellationToken,
    ) -> Option<Result<(), ProbeError>> {
        let timeout = self.timeout_now(rtt);
        let mut running = FuturesUnordered::new();
        let (mut launched, mut failed) = (0u32, 0u32);
        let mut next = tokio::time::Instant::now() + spacing;
        if first.is_none() {
            // A burst: the first probe goes now.
            next = tokio::time::Instant::now();
        }
        // Confirmation probes that failed besides the one being confirmed.
        let extra = |failed: u32| {
            if first.is_some() {
                failed
            } else {
                failed.saturating_sub(1)
            }
        };
        let mut last = first.clone();
        while failed < probes {
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep_until(next), if launched < probes => {
                    launched += 1;
                    next += spacing;
                    running.push(self.probe(timeout));
                }
                Some((result, took)) = running.next(), if !running.is_empty() => {
                    self.count(&result, took, rtt);
                    match result {
                        Ok(()) => {
                            if first.is_some() {
                                self.counters.cancelled.inc();
                            }
                            return Some(Ok(()));
                        }
                        // Our own resources ran out: this round proves nothing either way.
                        Err(e) if e.reason == Reason::LocalError => return Some(Err(e)),
                        // A refusal speaks for itself: no need to wait for the rest.
                        Err(e) if !e.is_ambiguous() => {
                            return Some(Err(self.confirmed(e, extra(failed + 1), started)));
                        }
                        Err(e) => {
                            failed += 1;
                            last = Some(e);
                        }
                    }
                }
            }
        }
        let last = last.expect("every probe failed");
        if probes <= 1 && first.is_none() {
            return Some(Err(last)); // `confirm: 0`: nothing was confirmed
        }
        Some(Err(self.confirmed(last, extra(failed), started)))
    }

    fn confirmed(
        &self,
        mut e: ProbeError,
        probes: u32,
        started: tokio::time::Instant,
    ) -> ProbeError {
        self.counters.confirmed.inc();
        e.confirmed = Some(Confirmed {
            probes,
            took: started.elapsed(),
        });
        e
    }

    /// The timeout of the next probe: adaptive, or the configured one.
    fn timeout_now(&self, rtt: &RttEstimate) -> Duration {
        if self.adaptive {
            rtt.timeout(self.timeout)
        } else {
            self.timeout
        }
    }

    /// One probe bounded by `timeout`, and how long it took.
    async fn probe(&self, timeout: Duration) -> (Result<(), ProbeError>, Duration) {
        let sent = tokio::time::Instant::now();
        let result = match tokio::time::timeout(timeout, self.check.check(self.target)).await {
            Ok(r) => r,
            Err(_) => Err(ProbeError::new(
                Reason::ProbeTimeout,
                format!("no answer from {} within {:?}", self.target, timeout),
            )),
        };
        (result, sent.elapsed())
    }

    /// Counts a probe in `mediagate_probes_total`; a success teaches the RTT estimate.
    fn count(&self, result: &Result<(), ProbeError>, took: Duration, rtt: &mut RttEstimate) {
        match result {
            Ok(()) => {
                rtt.sample(took);
                self.counters.ok.inc();
            }
            Err(e) if e.reason == Reason::ProbeTimeout => {
                self.counters.timeout.inc();
            }
            Err(e) if e.reason == Reason::LocalError => {
                self.counters.local_error.inc();
            }
            Err(_) => {
                self.counters.failed.inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::CheckFuture;
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use tokio::sync::mpsc;

    /// What the scripted server does on one probe.
    #[derive(Clone, Copy, Debug)]
    enum Answer {
        Ok,
        /// A wrong reply or an HTTP status: ambiguous.
        Bad,
        /// Connection refused: definite.
        Refused,
        /// Never answers: the prober's timeout decides.
        Hang,
    }

    struct Script {
        answers: Mutex<VecDeque<Answer>>,
        probes: Mutex<u32>,
    }

    impl HealthCheck for Script {
        fn check(&self, _target: SocketAddr) -> CheckFuture<'_> {
            *self.probes.lock().unwrap() += 1;
            let a = self
                .answers
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Answer::Ok);
            Box::pin(async move {
                match a {
                    Answer::Ok => Ok(()),
                    Answer::Bad => Err(ProbeError::new(Reason::ProbeFailed, "HTTP 503")),
                    Answer::Refused => Err(ProbeError::new(Reason::ConnectRefused, "refused")),
                    Answer::Hang => std::future::pending().await,
                }
            })
        }
    }

    struct Sink(mpsc::UnboundedSender<Result<(), ProbeError>>);

    impl ProbeSink for Sink {
        async fn report(&self, result: Result<(), ProbeError>, _at: Instant) -> bool {
            self.0.send(result).is_ok()
        }
    }

    fn counters() -> ProbeCounters {
        ProbeCounters {
            ok: Counter::default(),
            failed: Counter::default(),
            timeout: Counter::default(),
            local_error: Counter::default(),
            confirmed: Counter::default(),
            cancelled: Counter::default(),
            suspected: Counter::default(),
        }
    }

    /// Runs a prober over `answers` and returns the first `rounds` verdicts, the probes
    /// sent and the counters.
    async fn run(
        answers: &[Answer],
        confirm: u32,
        adaptive: bool,
        rounds: usize,
    ) -> (Vec<Result<(), ProbeError>>, u32, ProbeCounters) {
        let script = Arc::new(Script {
            answers: Mutex::new(answers.iter().copied().collect()),
            probes: Mutex::new(0),
        });
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = counters();
        let prober = Prober {
            check: script.clone(),
            label: "s".into(),
            sink: Sink(tx),
            target: "127.0.0.1:1".parse().unwrap(),
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(100),
            adaptive,
            confirm: Confirm {
                probes: confirm,
                interval: Duration::from_millis(10),
            },
            counters: c.clone(),
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn(prober.run(cancel.clone()));
        let mut out = Vec::new();
        for _ in 0..rounds {
            out.push(rx.recv().await.expect("a verdict"));
        }
        cancel.cancel();
        let _ = task.await;
        let probes = *script.probes.lock().unwrap();
        (out, probes, c)
    }

    #[tokio::test(start_paused = true)]
    async fn one_lost_probe_is_cancelled_by_its_confirmation() {
        let (v, _, c) = run(&[Answer::Ok, Answer::Hang, Answer::Ok], 2, true, 2).await;
        assert_eq!(v, vec![Ok(()), Ok(())], "the lost probe is never reported");
        assert_eq!(c.cancelled.get(), 1);
        assert_eq!(c.confirmed.get(), 0);
        assert_eq!(c.timeout.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_is_reported_once_every_confirmation_failed() {
        let started = tokio::time::Instant::now();
        let (v, probes, c) = run(&[Answer::Bad, Answer::Bad, Answer::Bad], 2, true, 1).await;
        let e = v[0].clone().unwrap_err();
        assert_eq!(e.reason, Reason::ProbeFailed);
        let confirmed = e.confirmed.expect("confirmed");
        assert_eq!(confirmed.probes, 2);
        assert_eq!(probes, 3);
        assert_eq!(c.confirmed.get(), 1);
        // Launched 10 ms apart, answered at once: the verdict comes with the last launch.
        assert_eq!(started.elapsed(), Duration::from_millis(20));
        assert_eq!(confirmed.took, Duration::from_millis(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_needs_no_confirmation() {
        let (v, probes, c) = run(&[Answer::Refused], 2, true, 1).await;
        let e = v[0].clone().unwrap_err();
        assert_eq!(e.reason, Reason::ConnectRefused);
        assert_eq!(e.confirmed, None);
        assert_eq!(probes, 1);
        assert_eq!(c.confirmed.get() + c.cancelled.get(), 0);
        // A refusal during the confirmation ends it at once.
        let (v, probes, _) = run(&[Answer::Bad, Answer::Refused], 2, true, 1).await;
        let e = v[0].clone().unwrap_err();
        assert_eq!(e.reason, Reason::ConnectRefused);
        assert_eq!(e.confirmed.map(|c| c.probes), Some(1));
        assert_eq!(probes, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn confirm_zero_reports_every_failure_at_once() {
        let (v, probes, _) = run(&[Answer::Bad, Answer::Ok], 0, true, 2).await;
        assert!(v[0].is_err() && v[1].is_ok());
        assert_eq!(v[0].clone().unwrap_err().confirmed, None);
        assert_eq!(probes, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_server_is_suspected_after_the_adaptive_timeout() {
        // Answers instantly while healthy: the timeout shrinks to the floor, so the hang
        // is confirmed one floor after the last confirmation probe was launched.
        let mut answers = vec![Answer::Ok; 5];
        answers.extend([Answer::Hang; 3]);
        let started = tokio::time::Instant::now();
        let (v, _, _) = run(&answers, 2, true, 6).await;
        let e = v[5].clone().unwrap_err();
        assert_eq!(e.reason, Reason::ProbeTimeout);
        assert!(e.detail.contains("25ms"), "{}", e.detail);
        let took = e.confirmed.unwrap().took;
        assert_eq!(
            took,
            2 * crate::health::rtt::FLOOR + Duration::from_millis(20)
        );
        assert_eq!(started.elapsed(), 5 * Duration::from_millis(100) + took);
        // Without adaptive timeouts each probe waits the full configured timeout.
        let (v, _, _) = run(&answers, 2, false, 6).await;
        assert_eq!(
            v[5].clone().unwrap_err().confirmed.unwrap().took,
            Duration::from_millis(220)
        );
    }

    struct SuspiciousSink {
        tx: mpsc::UnboundedSender<Result<(), ProbeError>>,
        suspicion: Arc<tokio::sync::Notify>,
    }

    impl ProbeSink for SuspiciousSink {
        async fn suspected(&self) {
            self.suspicion.notified().await
        }
        async fn report(&self, result: Result<(), ProbeError>, _at: Instant) -> bool {
            self.tx.send(result).is_ok()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_suspicion_starts_a_burst_at_once_that_confirms_a_hang_in_one_timeout() {
        let script = Arc::new(Script {
            answers: Mutex::new([Answer::Ok, Answer::Hang, Answer::Hang, Answer::Hang].into()),
            probes: Mutex::new(0),
        });
        let (tx, mut rx) = mpsc::unbounded_channel();
        let suspicion = Arc::new(tokio::sync::Notify::new());
        let c = counters();
        let prober = Prober {
            check: script.clone(),
            label: "s".into(),
            sink: SuspiciousSink {
                tx,
                suspicion: suspicion.clone(),
            },
            target: "127.0.0.1:1".parse().unwrap(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            adaptive: true,
            confirm: Confirm {
                probes: 2,
                interval: Duration::from_millis(10),
            },
            counters: c.clone(),
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn(prober.run(cancel.clone()));
        assert!(rx.recv().await.unwrap().is_ok());
        // 200 ms into a 1 s interval, the data plane suspects the server.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = tokio::time::Instant::now();
        suspicion.notify_one();
        let e = rx.recv().await.unwrap().unwrap_err();
        assert_eq!(e.reason, Reason::ProbeTimeout);
        // All three probes at once, each under the adaptive timeout (the floor).
        assert_eq!(t.elapsed(), crate::health::rtt::FLOOR);
        assert_eq!(e.confirmed.map(|c| c.probes), Some(2));
        assert_eq!(*script.probes.lock().unwrap(), 4);
        assert_eq!(c.suspected.get(), 1);
        cancel.cancel();
        let _ = task.await;
    }
}
