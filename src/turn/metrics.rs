//! TURN metrics, registered under their full names in the process registry.
//!
//! Label sets are resolved once here; the packet paths only touch pre-resolved counter
//! handles. prometheus-client writes OpenMetrics, where a counter family `X` is exposed
//! as `X_total`: so the allocation counter is the family `mediagate_turn_allocations_created`
//! (exposed as `mediagate_turn_allocations_created_total`) because a counter family
//! `mediagate_turn_allocations` would clash with the gauge of that name.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::auth::AuthFailure;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SocketLabels {
    socket: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

/// Why a packet from a client or a peer was dropped by the TURN service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropReason {
    /// Not STUN, not ChannelData, or a STUN message that does not parse.
    Malformed,
    /// A datagram from a peer the policy does not allow.
    PeerNotAllowed,
    /// A datagram from a peer without a permission on the allocation.
    NoPermission,
    /// A Send indication or ChannelData without an allocation.
    NoAllocation,
    /// A TCP/TLS/DTLS client does not read fast enough: the bytes waiting towards it (256 KiB
    /// per TCP/TLS connection) or its DTLS send queue are at their bound.
    ClientBackpressure,
    /// A socket error while sending.
    SendError,
}

impl DropReason {
    const ALL: [DropReason; 6] = [
        DropReason::Malformed,
        DropReason::PeerNotAllowed,
        DropReason::NoPermission,
        DropReason::NoAllocation,
        DropReason::ClientBackpressure,
        DropReason::SendError,
    ];

    fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::PeerNotAllowed => "peer_not_allowed",
            DropReason::NoPermission => "no_permission",
            DropReason::NoAllocation => "no_allocation",
            DropReason::ClientBackpressure => "client_backpressure",
            DropReason::SendError => "send_error",
        }
    }
}

/// Why the server closed (or refused) a TURN-over-TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TcpClose {
    /// `turn.quota.max_tcp_connections` reached: closed right after accept.
    Limit,
    /// A frame stayed incomplete for longer than the frame timeout.
    FrameTimeout,
    /// No allocation was made on the connection within the allocation timeout.
    NoAllocation,
    /// A frame larger than the connection may send (before an allocation: 4 KiB).
    OversizedFrame,
    /// Nothing was received for the idle timeout.
    Idle,
    /// tls listener: the TLS handshake failed or took longer than 10 s.
    TlsHandshake,
    /// `accept_proxy_protocol`: no valid PROXY v2 header within 5 s (or its client address
    /// is already connected).
    ProxyHeader,
    /// `turn.quota.max_connections_per_source` reached: closed right after accept.
    SourceLimit,
    /// `turn.quota.max_handshakes_per_source` reached: closed right after accept.
    SourceHandshakes,
    /// No complete STUN message within `turn.quota.handshake_timeout` of accept.
    NoRequest,
}

impl TcpClose {
    const ALL: [TcpClose; 10] = [
        TcpClose::Limit,
        TcpClose::FrameTimeout,
        TcpClose::NoAllocation,
        TcpClose::OversizedFrame,
        TcpClose::Idle,
        TcpClose::TlsHandshake,
        TcpClose::ProxyHeader,
        TcpClose::SourceLimit,
        TcpClose::SourceHandshakes,
        TcpClose::NoRequest,
    ];

    fn as_str(self) -> &'static str {
        match self {
            TcpClose::Limit => "limit",
            TcpClose::FrameTimeout => "frame_timeout",
            TcpClose::NoAllocation => "no_allocation",
            TcpClose::OversizedFrame => "oversized_frame",
            TcpClose::Idle => "idle",
            TcpClose::TlsHandshake => "tls_handshake",
            TcpClose::ProxyHeader => "proxy_header",
            TcpClose::SourceLimit => "source_limit",
            TcpClose::SourceHandshakes => "source_handshakes",
            TcpClose::NoRequest => "no_request",
        }
    }
}

/// Handles to the TURN metrics. Cheap to clone (all handles are shared).
/// Why a DTLS session was closed or never opened (`mediagate_turn_dtls_closed_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DtlsClose {
    /// `turn.quota.max_dtls_sessions` reached: the ClientHello was dropped.
    Limit,
    /// Too many handshakes in flight: the ClientHello was dropped (the client retries).
    HandshakeLimit,
    /// The handshake failed or did not complete in time.
    Handshake,
    /// No allocation within 30 s of the handshake.
    NoAllocation,
    /// Nothing received for 10 minutes.
    Idle,
    /// The client did not answer the HelloVerifyRequest in time (a spoofed source).
    NoCookie,
    /// Too many clients that have not answered the HelloVerifyRequest yet: the
    /// ClientHello was dropped.
    UnverifiedLimit,
    /// `turn.quota.max_connections_per_source` reached: the ClientHello was dropped.
    SourceLimit,
    /// `turn.quota.max_handshakes_per_source` reached: the ClientHello was dropped.
    SourceHandshakes,
}

impl DtlsClose {
    const ALL: [DtlsClose; 9] = [
        DtlsClose::Limit,
        DtlsClose::HandshakeLimit,
        DtlsClose::Handshake,
        DtlsClose::NoAllocation,
        DtlsClose::Idle,
        DtlsClose::NoCookie,
        DtlsClose::UnverifiedLimit,
        DtlsClose::SourceLimit,
        DtlsClose::SourceHandshakes,
    ];

    fn as_str(self) -> &'static str {
        match self {
            DtlsClose::Limit => "limit",
            DtlsClose::HandshakeLimit => "handshake_limit",
            DtlsClose::Handshake => "dtls_handshake",
            DtlsClose::NoAllocation => "no_allocation",
            DtlsClose::Idle => "idle",
            DtlsClose::NoCookie => "no_cookie",
            DtlsClose::UnverifiedLimit => "unverified_limit",
            DtlsClose::SourceLimit => "source_limit",
            DtlsClose::SourceHandshakes => "source_handshakes",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct TurnMetrics {
    /// `mediagate_turn_allocations`: live allocations.
    pub allocations: Gauge,
    /// `mediagate_turn_allocations_created_total`.
    pub allocations_created: Counter,
    auth_failures: Vec<(AuthFailure, Counter)>,
    /// `mediagate_turn_permission_denied_total`: peers refused by `relay.peers`.
    pub permission_denied: Counter,
    /// `mediagate_turn_quota_exceeded_total`: Allocate requests refused with 486.
    pub quota_exceeded: Counter,
    /// `mediagate_turn_relayed_bytes_total{direction="to_peer"}`.
    pub bytes_to_peer: Counter,
    /// `mediagate_turn_relayed_bytes_total{direction="to_client"}`.
    pub bytes_to_client: Counter,
    /// `mediagate_turn_relayed_packets_total{direction="to_peer"}`.
    pub packets_to_peer: Counter,
    /// `mediagate_turn_relayed_packets_total{direction="to_client"}`.
    pub packets_to_client: Counter,
    dropped: Vec<(DropReason, Counter)>,
    /// `mediagate_turn_loop_refused_total`: relay targets that are the gateway's own ports
    /// (also counted in `permission_denied`).
    pub loop_refused: Counter,
    /// `mediagate_turn_capacity_exceeded_total`: Allocate requests refused with 508 because
    /// `turn.quota.max_allocations` was reached.
    pub capacity_exceeded: Counter,
    /// `mediagate_turn_reserved_ports`: EVEN-PORT reservations held (each holds a port).
    pub reserved_ports: Gauge,
    /// `mediagate_turn_tcp_connections`: open TURN-over-TCP connections.
    pub tcp_connections: Gauge,
    tcp_closed: Vec<(TcpClose, Counter)>,
    /// `mediagate_turn_kernel_drops_total{socket="listener"}`: datagrams from clients the
    /// kernel dropped because a UDP listener's receive queue was full.
    pub kernel_drops_listener: Counter,
    /// `mediagate_turn_kernel_drops_total{socket="relay"}`: datagrams from peers the
    /// kernel dropped because a relay socket's receive queue was full.
    pub kernel_drops_relay: Counter,
    /// `mediagate_turn_dtls_sessions`: DTLS sessions established on `dtls` listeners.
    pub dtls_sessions: Gauge,
    dtls_closed: Vec<(DtlsClose, Counter)>,
    /// `mediagate_turn_offload_packets_total{direction="to_peer"}`: the part of
    /// `packets_to_peer` the kernel fast path relayed.
    pub offload_to_peer: Counter,
    /// `mediagate_turn_offload_packets_total{direction="to_client"}`.
    pub offload_to_client: Counter,
    /// `mediagate_turn_offload_channels`: channels installed in the kernel fast path.
    pub offload_channels: Gauge,
    /// `mediagate_turn_offload_errors_total{reason}`: the fast path was unavailable
    /// (`permission`, `load`, …) or refused an entry (`map_full`, `map_insert`).
    pub offload_errors: prometheus_client::metrics::family::Family<crate::metrics::Labels, Counter>,
    /// `mediagate_turn_tls_cert_reloads_total{result="ok"}`: certificates (re)loaded.
    pub cert_reloads_ok: Counter,
    /// `mediagate_turn_tls_cert_reloads_total{result="error"}`: changed certificate files
    /// that could not be loaded (the previous certificate stays in use).
    pub cert_reloads_failed: Counter,
}

impl TurnMetrics {
    /// Registers the TURN metrics under their full names (`mediagate_turn_…`).
    pub fn register(registry: &mut Registry) -> Self {
        let auth = Family::<ReasonLabels, Counter>::default();
        let dropped = Family::<ReasonLabels, Counter>::default();
        let bytes = Family::<DirectionLabels, Counter>::default();
        let packets = Family::<DirectionLabels, Counter>::default();
        let closed = Family::<ReasonLabels, Counter>::default();
        let dtls_closed = Family::<ReasonLabels, Counter>::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        let kernel = Family::<SocketLabels, Counter>::default();
        let offloaded = Family::<DirectionLabels, Counter>::default();
        let sock = |f: &Family<SocketLabels, Counter>, s: &'static str| {
            f.get_or_create(&SocketLabels { socket: s }).clone()
        };
        let reason = |f: &Family<ReasonLabels, Counter>, r: &'static str| {
            f.get_or_create(&ReasonLabels { reason: r }).clone()
        };
        // A closure, so that each read guard is dropped before the next `get_or_create`.
        let result = |f: &Family<ResultLabels, Counter>, r: &'static str| {
            f.get_or_create(&ResultLabels { result: r }).clone()
        };
        let dir = |f: &Family<DirectionLabels, Counter>, d: &'static str| {
            f.get_or_create(&DirectionLabels { direction: d }).clone()
        };
        let m = TurnMetrics {
            allocations: Gauge::default(),
            allocations_created: Counter::default(),
            auth_failures: AuthFailure::ALL
                .iter()
                .map(|r| (*r, reason(&auth, r.as_str())))
                .collect(),
            permission_denied: Counter::default(),
            quota_exceeded: Counter::default(),
            bytes_to_peer: dir(&bytes, "to_peer"),
            bytes_to_client: dir(&bytes, "to_client"),
            packets_to_peer: dir(&packets, "to_peer"),
            packets_to_client: dir(&packets, "to_client"),
            dropped: DropReason::ALL
                .iter()
                .map(|r| (*r, reason(&dropped, r.as_str())))
                .collect(),
            loop_refused: Counter::default(),
            capacity_exceeded: Counter::default(),
            reserved_ports: Gauge::default(),
            tcp_connections: Gauge::default(),
            tcp_closed: TcpClose::ALL
                .iter()
                .map(|r| (*r, reason(&closed, r.as_str())))
                .collect(),
            kernel_drops_listener: sock(&kernel, "listener"),
            kernel_drops_relay: sock(&kernel, "relay"),
            dtls_sessions: Gauge::default(),
            dtls_closed: DtlsClose::ALL
                .iter()
                .map(|r| (*r, reason(&dtls_closed, r.as_str())))
                .collect(),
            offload_to_peer: dir(&offloaded, "to_peer"),
            offload_to_client: dir(&offloaded, "to_client"),
            offload_channels: Gauge::default(),
            offload_errors: Default::default(),
            cert_reloads_ok: result(&reloads, "ok"),
            cert_reloads_failed: result(&reloads, "error"),
        };
        registry.register(
            "mediagate_turn_allocations",
            "Live TURN allocations",
            m.allocations.clone(),
        );
        registry.register(
            "mediagate_turn_allocations_created",
            "TURN allocations created",
            m.allocations_created.clone(),
        );
        registry.register(
            "mediagate_turn_auth_failures",
            "TURN requests that failed authentication (answered 401 or 441)",
            auth,
        );
        registry.register(
            "mediagate_turn_permission_denied",
            "Relaying to peers refused by turn.relay.peers (403 or dropped)",
            m.permission_denied.clone(),
        );
        registry.register(
            "mediagate_turn_quota_exceeded",
            "Allocate requests refused with 486 (allocations_per_user reached, reservations included)",
            m.quota_exceeded.clone(),
        );
        registry.register(
            "mediagate_turn_relayed_bytes",
            "Payload bytes relayed between TURN clients and peers",
            bytes,
        );
        registry.register(
            "mediagate_turn_relayed_packets",
            "Datagrams relayed between TURN clients and peers",
            packets,
        );
        registry.register(
            "mediagate_turn_dropped_packets",
            "Packets the TURN service dropped",
            dropped,
        );
        registry.register(
            "mediagate_turn_kernel_drops",
            "Datagrams the kernel dropped before the TURN service read them (a full socket receive queue)",
            kernel,
        );
        registry.register(
            "mediagate_turn_offload_packets",
            "Datagrams the kernel fast path relayed (turn.relay.offload: ebpf; included in mediagate_turn_relayed_packets)",
            offloaded,
        );
        registry.register(
            "mediagate_turn_offload_channels",
            "Channels of UDP allocations installed in the kernel fast path",
            m.offload_channels.clone(),
        );
        registry.register(
            "mediagate_turn_offload_errors",
            "Times the kernel fast path was unavailable to the TURN relay, or refused a channel, by reason",
            m.offload_errors.clone(),
        );
        registry.register(
            "mediagate_turn_loop_refused",
            "Relay targets refused because they are the gateway's own ports",
            m.loop_refused.clone(),
        );
        registry.register(
            "mediagate_turn_capacity_exceeded",
            "Allocate requests refused with 508 (turn.quota.max_allocations reached)",
            m.capacity_exceeded.clone(),
        );
        registry.register(
            "mediagate_turn_reserved_ports",
            "Relay ports held by EVEN-PORT reservations",
            m.reserved_ports.clone(),
        );
        registry.register(
            "mediagate_turn_tcp_connections",
            "Open TURN-over-TCP connections",
            m.tcp_connections.clone(),
        );
        registry.register(
            "mediagate_turn_tcp_closed",
            "TURN-over-TCP connections the server closed or refused",
            closed,
        );
        registry.register(
            "mediagate_turn_dtls_sessions",
            "Established TURN-over-DTLS sessions",
            m.dtls_sessions.clone(),
        );
        registry.register(
            "mediagate_turn_dtls_closed",
            "TURN-over-DTLS sessions the server closed or refused",
            dtls_closed,
        );
        registry.register(
            "mediagate_turn_tls_cert_reloads",
            "TLS and DTLS certificate loads of TURN tls/dtls listeners, by result",
            reloads,
        );
        m
    }

    /// Handles not attached to any registry (tests, tools).
    pub fn unregistered() -> Self {
        TurnMetrics {
            auth_failures: AuthFailure::ALL
                .iter()
                .map(|r| (*r, Counter::default()))
                .collect(),
            dropped: DropReason::ALL
                .iter()
                .map(|r| (*r, Counter::default()))
                .collect(),
            tcp_closed: TcpClose::ALL
                .iter()
                .map(|r| (*r, Counter::default()))
                .collect(),
            dtls_closed: DtlsClose::ALL
                .iter()
                .map(|r| (*r, Counter::default()))
                .collect(),
            ..Default::default()
        }
    }

    pub(crate) fn auth_failure(&self, reason: AuthFailure) -> &Counter {
        // ALL is exhaustive, so the lookup always succeeds; fall back to the first entry.
        self.auth_failures
            .iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, c)| c)
            .unwrap_or(&self.auth_failures[0].1)
    }

    pub(crate) fn dropped(&self, reason: DropReason) -> &Counter {
        self.dropped
            .iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, c)| c)
            .unwrap_or(&self.dropped[0].1)
    }

    pub(crate) fn tcp_closed(&self, reason: TcpClose) -> &Counter {
        self.tcp_closed
            .iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, c)| c)
            .unwrap_or(&self.tcp_closed[0].1)
    }

    /// Value of `mediagate_turn_tcp_closed_total{reason}` (label value, e.g. `tls_handshake`).
    pub fn tcp_closed_count(&self, reason: &str) -> u64 {
        self.tcp_closed
            .iter()
            .find(|(r, _)| r.as_str() == reason)
            .map(|(_, c)| c.get())
            .unwrap_or(0)
    }

    pub(crate) fn dtls_closed(&self, reason: DtlsClose) -> &Counter {
        self.dtls_closed
            .iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, c)| c)
            .unwrap_or(&self.dtls_closed[0].1)
    }

    /// Value of `mediagate_turn_dtls_closed_total{reason}` (label value, e.g. `dtls_handshake`).
    pub fn dtls_closed_count(&self, reason: &str) -> u64 {
        self.dtls_closed
            .iter()
            .find(|(r, _)| r.as_str() == reason)
            .map(|(_, c)| c.get())
            .unwrap_or(0)
    }

    /// Value of `mediagate_turn_auth_failures_total{reason}`.
    pub fn auth_failures_total(&self, reason: AuthFailure) -> u64 {
        self.auth_failure(reason).get()
    }

    /// Value of `mediagate_turn_dropped_packets_total{reason="malformed"}`.
    pub fn malformed_total(&self) -> u64 {
        self.dropped(DropReason::Malformed).get()
    }

    /// Value of `mediagate_turn_dropped_packets_total{reason="peer_not_allowed"}`.
    pub fn peer_not_allowed_total(&self) -> u64 {
        self.dropped(DropReason::PeerNotAllowed).get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn exposition_has_the_spec_names_and_is_valid() {
        let mut reg = Registry::default();
        let m = TurnMetrics::register(&mut reg);
        m.allocations.set(2);
        m.allocations_created.inc();
        m.auth_failure(AuthFailure::WrongPassword).inc();
        m.permission_denied.inc();
        m.bytes_to_peer.inc_by(100);
        m.dropped(DropReason::Malformed).inc();
        let mut out = String::new();
        encode(&mut out, &reg).unwrap();
        for line in [
            "mediagate_turn_allocations 2",
            "mediagate_turn_allocations_created_total 1",
            "mediagate_turn_auth_failures_total{reason=\"wrong_password\"} 1",
            "mediagate_turn_auth_failures_total{reason=\"expired\"} 0",
            "mediagate_turn_permission_denied_total 1",
            "mediagate_turn_relayed_bytes_total{direction=\"to_peer\"} 100",
            "mediagate_turn_relayed_bytes_total{direction=\"to_client\"} 0",
            "mediagate_turn_dropped_packets_total{reason=\"malformed\"} 1",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
        assert_eq!(m.auth_failures_total(AuthFailure::WrongPassword), 1);
        // One TYPE line per family: no two families share an exposed name.
        let types: Vec<&str> = out.lines().filter(|l| l.starts_with("# TYPE")).collect();
        let mut names: Vec<&str> = types.iter().filter_map(|l| l.split(' ').nth(2)).collect();
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "{types:?}");
    }
}
