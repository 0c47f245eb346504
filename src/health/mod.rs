//! Health probing: the probe trait, one file per probe type, the per-server
//! state machine (`state`), and the prober task that runs a probe on its own timer.
//!
//! A probe answers one question — is this target healthy right now? — and knows nothing
//! about fall/rise, timers or failover. The caller bounds every probe with the configured
//! `timeout`, so a probe may simply wait.

pub mod http;
pub mod prober;
pub mod rtt;
pub mod state;
pub mod stun;
pub mod tcp;
pub mod udp;

use crate::config::{HealthConfig, HealthType};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

/// Why a server was marked down (or left the active set). The strings are the
/// `reason` label values of `mediagate_failovers_total` (docs/metrics.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    ProbeFailed,
    ProbeTimeout,
    IcmpUnreachable,
    ConnectRefused,
    ConnectTimeout,
    EndpointNotReady,
    NodeNotReady,
    Admin,
    Removed,
    /// A live peer replica sees the server down (`cluster:`; the detail says which peer
    /// and why: `peer:<node>:<reason>`).
    Peer,
    /// Another upstream of the same `node_group` sees the server's host down.
    NodeGroup,
    /// The balancer's own resources ran out (EMFILE, ENFILE, ENOBUFS, ENOMEM,
    /// EADDRNOTAVAIL): says nothing about the server, so it never counts toward `fall`,
    /// never marks a server down and never triggers a failover (see [`is_local_error`]).
    LocalError,
    /// Not a reason to mark a server down: the sessions left the servers that were kept
    /// while no server was eligible (`when_all_down: keep_last`) once one was again.
    Degraded,
}

impl Reason {
    /// Every reason a server can be marked down for ([`Reason::LocalError`] never does).
    pub const ALL: [Reason; 11] = [
        Reason::ProbeFailed,
        Reason::ProbeTimeout,
        Reason::IcmpUnreachable,
        Reason::ConnectRefused,
        Reason::ConnectTimeout,
        Reason::EndpointNotReady,
        Reason::NodeNotReady,
        Reason::Admin,
        Reason::Removed,
        Reason::Peer,
        Reason::NodeGroup,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::ProbeFailed => "probe_failed",
            Reason::ProbeTimeout => "probe_timeout",
            Reason::IcmpUnreachable => "icmp_unreachable",
            Reason::ConnectRefused => "connect_refused",
            Reason::ConnectTimeout => "connect_timeout",
            Reason::EndpointNotReady => "endpoint_not_ready",
            Reason::NodeNotReady => "node_not_ready",
            Reason::Admin => "admin",
            Reason::Removed => "removed",
            Reason::Peer => "peer",
            Reason::NodeGroup => "node_group",
            Reason::LocalError => "local_error",
            Reason::Degraded => "degraded",
        }
    }
}

/// Whether a socket error is the balancer's own problem rather than the peer's: out of
/// descriptors (EMFILE, ENFILE), of buffer or kernel memory (ENOBUFS, ENOMEM), or of
/// local ports (EADDRNOTAVAIL). Such an error on a probe or a proxy connect says nothing
/// about the server.
pub fn is_local_error(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM | Errno::EADDRNOTAVAIL)
    )
}

/// A [`ProbeError`] for `e`: [`Reason::LocalError`] when [`is_local_error`], else
/// `otherwise`.
pub fn probe_error(e: &std::io::Error, otherwise: Reason, detail: String) -> ProbeError {
    let reason = if is_local_error(e) {
        Reason::LocalError
    } else {
        otherwise
    };
    ProbeError::new(reason, detail)
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed probe: the label-friendly reason plus a human-readable detail for `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeError {
    pub reason: Reason,
    pub detail: String,
    /// Set by the prober when the failure was confirmed by more probes before it was
    /// reported (`health.confirm`); `None` for a failure that needs no confirmation.
    pub confirmed: Option<Confirmed>,
}

/// How a failure was confirmed: every confirmation probe failed too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmed {
    /// Confirmation probes that failed after the first failure.
    pub probes: u32,
    /// From the start of the first failed probe to the verdict.
    pub took: std::time::Duration,
}

impl ProbeError {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        ProbeError {
            reason,
            detail: detail.into(),
            confirmed: None,
        }
    }

    /// Whether the failure may be a lost packet or a slow answer rather than a dead
    /// server (a timeout, a wrong or missing reply, an HTTP status), so that it must be
    /// confirmed; a refusal (ICMP unreachable, connection refused) speaks for itself.
    pub fn is_ambiguous(&self) -> bool {
        matches!(
            self.reason,
            Reason::ProbeFailed | Reason::ProbeTimeout | Reason::ConnectTimeout
        )
    }
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// Boxed future returned by [`HealthCheck::check`].
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<(), ProbeError>> + Send + 'a>>;

/// One kind of active probe. Implementations hold their settings (path, payload…) and
/// probe whatever target they are given; the prober applies the timeout.
pub trait HealthCheck: Send + Sync {
    /// Probe `target` once.
    fn check(&self, target: SocketAddr) -> CheckFuture<'_>;
}

/// Builds the probe the configuration asks for; `None` for `type: none`.
pub fn build(cfg: &HealthConfig) -> Option<Box<dyn HealthCheck>> {
    match cfg.kind {
        HealthType::Tcp => Some(Box::new(tcp::TcpCheck)),
        HealthType::Udp => Some(Box::new(udp::UdpCheck::new(
            cfg.send.clone().into_bytes(),
            cfg.expect.clone().map(String::into_bytes),
        ))),
        HealthType::Stun => Some(Box::new(stun::StunCheck)),
        HealthType::Http => Some(Box::new(
            http::HttpCheck::new(cfg.path.clone(), cfg.expect_status).with_tls(cfg.tls.then(
                || http::Tls {
                    verify: cfg.tls_verify,
                    server_name: cfg.tls_server_name.clone(),
                },
            )),
        )),
        HealthType::None => None,
    }
}
