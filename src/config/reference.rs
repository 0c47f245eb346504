//! The configuration reference: one row per key (path, type, default, meaning), printed by
//! `mediagate config --reference` and committed as `docs/configuration.md`.
//!
//! The tests below keep the table and the serde types of `config` in step: every field
//! of every configuration struct must have a row, every row must be a field, and every
//! written default must deserialize to the value the code uses when the key is absent.
//! Adding a key means adding a serde field *and* a row here (then regenerating the doc).

use std::fmt::Write as _;

/// What the reference says about a key's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyDefault {
    /// The key must be written.
    Required,
    /// Absent means unset; the text says what that does ("none: the traffic port").
    Unset(&'static str),
    /// A sub-section or list whose keys have their own rows.
    Section,
    /// The value used when the key is absent, written as it would be in the file. The
    /// tests check that writing it changes nothing.
    Value(&'static str),
}

/// One row of the reference.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// Dotted path: `[]` marks a list entry, `NAME` a map key chosen by the user.
    pub path: &'static str,
    /// What may be written.
    pub kind: &'static str,
    /// The default.
    pub default: KeyDefault,
    /// What the key does.
    pub meaning: &'static str,
}

const fn key(
    path: &'static str,
    kind: &'static str,
    default: KeyDefault,
    meaning: &'static str,
) -> Key {
    Key {
        path,
        kind,
        default,
        meaning,
    }
}

use KeyDefault::{Required, Section, Unset, Value};

/// Every configuration key, in the order of the file's sections: one row per line.
#[rustfmt::skip]
pub const KEYS: &[Key] = &[
    // ------------------------------------------------------------------ admin
    key("admin", "section", Section, "The admin HTTP API: `/metrics`, `/healthz`, `/readyz`, `/status`, `/ice` and the POST endpoints (see [admin-api.md](admin-api.md))."),
    key("admin.listen", "ip:port", Value("127.0.0.1:8086"), "Where the admin API listens. Loopback by default because the POST endpoints change server states; in Kubernetes bind `0.0.0.0:8086` and restrict it with a token and the `network-policy` component."),
    key("admin.token", "string", Unset("none: no check"), "When set, every POST endpoint (server state, failback, reload, `/log-level`), `GET /events` and `GET /ice` (it hands out TURN credentials) need `Authorization: Bearer <token>`; the other GET endpoints stay open. Use `${VAR}` to read it from a Secret."),
    key("admin.token_file", "path", Unset("none"), "A file holding `admin.token` (one line; e.g. a key of a Kubernetes Secret mounted as files). Checked every second: a new token is in force without a restart (the change is a reload). Not together with `admin.token`. Files are read up to 64 KiB."),
    key("admin.events_token", "string", Unset("none"), "A bearer token accepted on `GET /events` only (besides `admin.token`): give it to the application that follows failovers without giving it the admin API. When either token is set, `/events` needs one of them."),
    key("admin.events_token_file", "path", Unset("none"), "A file holding `admin.events_token` (one line), re-read when it changes like `admin.token_file`. Not together with `admin.events_token`."),
    key("admin.max_event_streams", "integer", Value("32"), "`GET /events` streams open at once. They are never closed as idle admin connections; beyond this number a new one is refused (503, counted in `mediagate_admin_connections_closed_total{reason=\"event_streams\"}`). Capped at `admin.max_connections - 1`, so streams never take every admin connection."),
    key("admin.max_connections", "integer", Value("128"), "Open admin connections at most. At the cap the oldest connection with no request in progress is closed to make room, or the new one when every connection stays busy for 250 ms."),
    key("admin.header_read_timeout", "duration", Value("5s"), "A connection must deliver a request's headers within this time (also between two requests of a kept-alive connection), or it is closed. A new connection that has sent nothing waits in the kernel for about this long first (`TCP_DEFER_ACCEPT`, rounded up to the kernel's SYN-ACK retransmissions), then gets this time again."),
    // ------------------------------------------------------------------ log
    key("log", "section", Section, "Logging to stderr."),
    key("log.level", "tracing filter", Value("info"), "`off`, `error`, `warn`, `info`, `debug`, `trace`, or a filter such as `info,mediagate::health=debug`. `RUST_LOG` overrides it. Applied live on reload and by `POST /log-level`."),
    key("log.format", "`text` or `json`", Value("text"), "`text`: human-readable lines, coloured only when stderr is a terminal (and `NO_COLOR` is unset). `json`: one flat JSON object per line for log collectors: `timestamp`, `level`, `target`, `message` and each field (`upstream`, `server`, …) at the top level."),
    // ------------------------------------------------------------------ listeners
    key("listeners", "list", Section, "Client-facing sockets; each forwards to one upstream. Default: none."),
    key("listeners[].name", "string", Required, "Unique; letters, digits, `.`, `-`, `_`. Used as the `listener` label of metrics."),
    key("listeners[].protocol", "`tcp` or `udp`", Required, "`tcp`: each accepted connection is a session. `udp`: each client `ip:port` is a session."),
    key("listeners[].listen", "ip:port or ip:first-last", Required, "Address to bind. A port range binds every port and maps each to the same port on the server. Listen addresses must not overlap (`0.0.0.0`/`::` overlap every address)."),
    key("listeners[].upstream", "string", Required, "Name of an entry of `upstreams`."),
    key("listeners[].session", "section", Section, "Session limits of this listener."),
    key("listeners[].session.idle_timeout", "duration", Value("60s"), "A session with no traffic either way for this long is removed (UDP) or reset (TCP: a connection that sends nothing does not hold its descriptors)."),
    key("listeners[].session.max_sessions", "integer", Value("100000"), "UDP: live sessions at most; new sessions beyond it are dropped and counted (`mediagate_sessions_rejected_total{reason=\"max_sessions\"}`)."),
    key("listeners[].session.new_per_source_per_second", "integer", Value("200"), "UDP: new sessions one source IP may open per second (a token bucket holding one second's worth); more are dropped and counted (`reason=\"source_rate\"`). `0` turns the limit off."),
    key("listeners[].session.max_per_source", "integer", Value("10000"), "UDP: live sessions of one source IP at most; more are dropped and counted (`reason=\"source_sessions\"`). `0` turns the limit off."),
    key("listeners[].max_connections", "integer", Value("10000"), "TCP: open connections at most (each holds two descriptors, client and server); connections beyond it are closed at once and counted."),
    key("listeners[].offload", "`none` or `ebpf`", Value("none"), "UDP only: `ebpf` forwards established sessions in the kernel (a TC program on every interface of the namespace; needs CAP_BPF and CAP_NET_ADMIN and a build with clang). IPv4 and IPv6 sessions (wildcard listeners included); mixed families (an IPv6 client of an IPv4 server) stay in user space. When the kernel or the capabilities refuse, it logs once, counts `mediagate_offload_errors_total` and runs in user space. See the README's \"Kernel fast path\"."),
    key("listeners[].proxy_protocol", "`v2`", Unset("none"), "TCP: send a PROXY protocol v2 header with the client's address to the server right after connecting (coturn 4.6 `--tcp-proxy-port`, HAProxy `accept-proxy`)."),
    key("listeners[].accept_proxy_protocol", "boolean", Value("false"), "TCP: every connection must start with a PROXY protocol v2 header (within 5 s, at most 1 KiB); its source address is the client address (and what `proxy_protocol: v2` passes on). Connections without one are reset and counted (`reason=\"proxy_header\"`)."),
    key("listeners[].trusted_proxies", "list of CIDRs or addresses", Unset("none"), "With `accept_proxy_protocol` (and required by it): the load balancers that may send the PROXY header, as nginx's `set_real_ip_from`. A connection from any other source is reset before its header is read and counted (`mediagate_sessions_rejected_total{reason=\"proxy_header\"}`): nobody else can claim a client address."),
    // ------------------------------------------------------------------ upstreams
    key("upstreams", "map", Section, "Named groups of servers, in written order. Each key is the upstream's name (used by listeners, metrics, `/status` and the CLI)."),
    key("upstreams.NAME.primary", "list of servers", Value("[]"), "Preferred servers, in order. A server is `ip:port`, `ip` (the listener's port, or each port of its range), `host[:port]` (DNS: every A/AAAA record is a server), `node/NODE` or `node/*` (Kubernetes endpoints, needs `kubernetes`). `primary` and `backup` together must not be empty."),
    key("upstreams.NAME.backup", "list of servers", Value("[]"), "Used, in order, when no primary server is eligible. Same forms as `primary`."),
    key("upstreams.NAME.balance", "`first`, `hash`, `round_robin`, `least_sessions`", Value("first"), "Choice among the eligible servers of the first tier that has one. `first`: strict active-passive, the first eligible server. `hash`: rendezvous hash of the client IP. `round_robin`: rotate. `least_sessions`: fewest live sessions."),
    key("upstreams.NAME.failback", "`new_sessions`, `all`, `manual`", Value("new_sessions"), "When a higher-priority server is eligible again: `new_sessions` sends new sessions there and leaves existing ones; `all` moves existing sessions back too; `manual` moves nothing until `mediagate failback NAME` (`POST /upstreams/NAME/failback`) or the server in use fails."),
    key("upstreams.NAME.failback_delay", "duration", Value("0s"), "A recovered server must stay up this long before it is used again."),
    key("upstreams.NAME.when_all_down", "`keep_last`, `drop`", Value("keep_last"), "When a verdict leaves the upstream no eligible server: `keep_last` keeps its sessions on (and sends new ones to) the servers that served last, marks the upstream `degraded` in `/status` (`mediagate_upstream_degraded`) and emits an event of kind `all_down`, so a failing probe never blackholes media that still flows; `drop` leaves the upstream without a server (datagrams and connections are dropped, `reason=\"no_server\"`). Servers in `drain` or `maint` are never kept."),
    key("upstreams.NAME.node_group", "string", Unset("none"), "Fate sharing: upstreams with the same `node_group` treat servers on the same host (IP) as one node. A host that one of them marks down (a confirmed probe failure, a passive signal) is down for all of them at once, and up again when the one that saw it down sees it up; `/events` and webhooks get one event listing every upstream that moved (`node_group`, `upstreams`). For example the RTP (UDP) and HTTP API (TCP) upstreams of the same Janus nodes, so signalling and media never point at different nodes. The reason of a server moved by its group is `node_group`."),
    key("upstreams.NAME.health", "section", Section, "Active health probe of every server of the upstream."),
    key("upstreams.NAME.health.type", "`tcp`, `udp`, `stun`, `http`, `none`", Value("tcp"), "`tcp`: a TCP connect. `udp`: send `send`, expect a reply (containing `expect` if set). `stun`: an RFC 5389 Binding request over UDP. `http`: `GET path`, expect `expect_status`. `none`: no probe; passive signals and discovery readiness only."),
    key("upstreams.NAME.health.interval", "duration", Value("1s"), "Time between two probes of a server."),
    key("upstreams.NAME.health.timeout", "duration", Value("500ms"), "A probe not answered within this time failed. Must not exceed `interval`. With `adaptive_timeout` it is the ceiling of the learnt timeout."),
    key("upstreams.NAME.health.fall", "integer >= 1", Value("1"), "Confirmed failures in a row that mark a server down (1: zero tolerance)."),
    key("upstreams.NAME.health.confirm", "integer 0-10", Value("4"), "An ambiguous failure (a timeout, a wrong or missing reply, an HTTP status) is confirmed by this many more probes at once, `confirm_interval` apart without waiting for each other; it counts only if they all fail, and any success cancels it. A refusal (ICMP unreachable, connection refused) needs no confirmation. 0: every failure counts at once. Counted in `mediagate_probe_confirmations_total`."),
    key("upstreams.NAME.health.confirm_interval", "duration", Value("10ms"), "Pause before each confirmation probe. At most `interval`."),
    key("upstreams.NAME.health.adaptive_timeout", "bool", Value("true"), "Learn each server's probe round-trip time (RFC 6298's smoothed RTT and variance) and let a probe take `3 × srtt + 4 × rttvar`, at least 25ms and at most `timeout`: a hung server is suspected after a few of its usual round trips. `false`: every probe may take `timeout`."),
    key("upstreams.NAME.health.rise", "integer >= 1", Value("2"), "Good probes in a row that bring a down server back."),
    key("upstreams.NAME.health.port", "port", Unset("none: the traffic port"), "Probe this port of the server's host instead of the port traffic goes to (for example a Janus HTTP port for an RTP upstream)."),
    key("upstreams.NAME.health.path", "string", Value("/"), "`http`: the request path."),
    key("upstreams.NAME.health.expect_status", "integer", Value("200"), "`http`: the status code that means healthy; any other status, or none, is a failed probe."),
    key("upstreams.NAME.health.tls", "bool", Value("false"), "`http`: speak HTTPS to the probe port (TLS 1.2/1.3, rustls). A failed handshake or certificate check fails the probe."),
    key("upstreams.NAME.health.tls_verify", "bool", Value("true"), "`http` with `tls`: check the certificate against the system's CA certificates (`/etc/ssl/certs`, or `SSL_CERT_FILE`) and `tls_server_name`. `false` accepts any certificate, e.g. a self-signed Janus admin certificate (the handshake is still checked)."),
    key("upstreams.NAME.health.tls_server_name", "string", Unset("none: the server's IP address"), "`http` with `tls`: the name sent as SNI, checked against the certificate and sent as `Host`."),
    key("upstreams.NAME.health.send", "string", Value("ping"), "`udp`: the payload sent."),
    key("upstreams.NAME.health.expect", "string", Unset("none: any reply"), "`udp`: the reply must contain this string."),
    key("upstreams.NAME.passive", "bool", Value("true"), "Passive health: an ICMP unreachable on a UDP session, or a refused / timed-out TCP connect, marks the server down at once, without waiting for the probe."),
    key("upstreams.NAME.passive_scope", "`protocol` or `server`", Value("protocol"), "Which passive failures mark the whole server down. `protocol`: only failures of the protocol that speaks for the server (the upstream's one listener protocol, or, when UDP and TCP listeners share the upstream, the probe's protocol: `udp`/`stun` probes UDP, `tcp`/`http` TCP, `none` both); a failure of the other protocol only steers that protocol's traffic away from the server for 10s. `server`: every passive failure marks the server down."),
    key("upstreams.NAME.connect_timeout", "duration", Value("1s"), "TCP connect timeout towards a server; a timeout is a passive failure."),
    key("upstreams.NAME.kubernetes", "section", Unset("none"), "The Service whose EndpointSlices `node/…` servers refer to. Required when the upstream names `node/…` servers; needs `discovery.kubernetes.enabled`."),
    key("upstreams.NAME.kubernetes.namespace", "string", Required, "Namespace of the Service."),
    key("upstreams.NAME.kubernetes.service", "string", Required, "Name of the Service whose ready endpoints are the workers."),
    key("upstreams.NAME.kubernetes.port", "port", Unset("none: the listener's port"), "Port to send traffic to on the endpoint."),
    // ------------------------------------------------------------------ turn
    key("turn", "section", Unset("none: no STUN/TURN service"), "The gateway's own STUN/TURN service (see the README's STUN/TURN chapter)."),
    key("turn.realm", "string", Value("mediagate"), "The realm of long-term credentials."),
    key("turn.public_address", "IP or host name, or a list of an IPv4 and an IPv6 address", Required, "The address browsers reach the TURN listeners at, advertised in `/ice` configurations. No port. A dual-stack gateway gives one address per family (`[203.0.113.7, '2001:db8::7']`): `/ice` then lists every listener once per address, so clients of either family get a URL they can reach (a host name with both A and AAAA records does the same alone)."),
    key("turn.listeners", "list", Required, "At least one TURN listener."),
    key("turn.listeners[].protocol", "`udp`, `tcp`, `tls` or `dtls`", Required, "Transport of this TURN listener; `tls` is TURN over TLS over TCP (`turns:` URLs), `dtls` TURN over DTLS 1.2 over UDP (RFC 7350, `turns:HOST:PORT?transport=udp`; browsers do not speak it, so `/ice` does not list it)."),
    key("turn.listeners[].listen", "ip:port", Required, "Address to bind."),
    key("turn.listeners[].cert", "path", Unset("none"), "`tls`/`dtls`: PEM certificate chain (required for `tls` and `dtls`; refused on `udp`). On a `tcp` listener, with `key`, the same port also serves TURN over TLS: each connection's first byte tells a TLS handshake (0x16) from STUN (so 443 can carry both). Re-read when the file changes (checked every 2 s); new handshakes use the new certificate, allocations stay."),
    key("turn.listeners[].key", "path", Unset("none"), "`tls`/`dtls`, and `tcp` with `cert`: PEM private key (required with `cert`; refused on `udp`); re-read with `cert`. `dtls` needs an ECDSA P-256 or Ed25519 key (PKCS#8, or SEC1 for P-256)."),
    key("turn.listeners[].accept_proxy_protocol", "boolean", Value("false"), "`tcp`/`tls`: every connection must start with a PROXY protocol v2 header (from a load balancer such as AWS NLB); its source address is the client address. Connections without a valid header are closed and counted."),
    key("turn.listeners[].trusted_proxies", "list of CIDRs or addresses", Unset("none"), "With `accept_proxy_protocol` (and required by it): the load balancers that may send the PROXY header. A connection from any other source is closed before its header is read and counted (`mediagate_turn_tcp_closed_total{reason=\"proxy_header\"}`), so nobody else can choose the client address TURN quotas, nonces and XOR-MAPPED-ADDRESS see."),
    key("turn.auth", "section", Required, "How TURN clients authenticate."),
    key("turn.auth.type", "`static` or `ephemeral`", Required, "`static`: fixed long-term credentials from `users`. `ephemeral`: TURN REST API credentials (`expiry:user` / HMAC-SHA1 of `secret`), compatible with coturn's `use-auth-secret`."),
    key("turn.auth.secret", "string", Unset("none"), "`ephemeral`: the shared secret (coturn `static-auth-secret`); required for that type. Use `${VAR}`."),
    key("turn.auth.secrets", "list of strings", Value("[]"), "`ephemeral`: several shared secrets for rotation (like several coturn `static-auth-secret`s): the first signs `/ice` credentials, all verify. Not together with `secret`."),
    key("turn.auth.secret_file", "path", Unset("none"), "`ephemeral`: a file holding the shared secret, or several, one a line (then as `secrets`: the first signs, all verify). Checked every second; a change is applied like a reload of `turn.auth` (rotation without a restart: write `new` and `old` lines first, then `new` alone). Not together with `secret` or `secrets`."),
    key("turn.auth.ttl", "duration", Value("24h"), "`ephemeral`: lifetime of credentials handed out by `/ice` and `mediagate ice`."),
    key("turn.auth.users", "list", Value("[]"), "`static`: the users; required (non-empty) for that type."),
    key("turn.auth.users[].username", "string", Required, "Non-empty, unique."),
    key("turn.auth.users[].password", "string", Required, "Non-empty."),
    key("turn.relay", "section", Section, "Relay sockets and who may be relayed to."),
    key("turn.relay.address", "IP or list of IPs", Value("0.0.0.0"), "Where relay sockets bind: one address, or a list of one IPv4 and one IPv6 address for dual-stack relaying (e.g. `[0.0.0.0, '::']`). An Allocate gets a relayed address of the family its REQUESTED-ADDRESS-FAMILY asks for (IPv4 without it), 440 Address Family not Supported when that family has no address here; ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §7.2) gets a dual allocation with one relayed address of each family (two quota units; without an IPv6 address here, the IPv4 one and ADDRESS-ERROR-CODE 440). Peers of a family the allocation has no relayed address of are refused with 443. IPv6 relay sockets are IPv6 only; the kernel fast path (`offload: ebpf`) relays either family when client, relay and peer share it."),
    key("turn.relay.port_range", "first-last", Value("49152-65535"), "Ports of relay sockets."),
    key("turn.relay.peers", "list", Value("[upstreams]"), "Who may be relayed to (no open relay): `upstreams` (the IP of every server of every upstream, any port), `self` (the relayed addresses of other allocations on this gateway, and no other own port: the gateway's TURN, proxy and admin listeners are never peers), or CIDRs such as `10.0.0.0/8`."),
    key("turn.relay.recv_buffer", "bytes", Value("1048576"), "Receive buffer of each relay socket (datagrams from peers); 0 keeps the OS default. The kernel caps it at `net.core.rmem_max`. Datagrams lost to a full buffer are counted in `mediagate_turn_kernel_drops_total{socket=\"relay\"}`."),
    key("turn.relay.listener_buffer", "bytes", Value("4194304"), "Receive and send buffer of each UDP TURN listener socket (datagrams from all clients of the listener); 0 keeps the OS default. Capped by `net.core.rmem_max`/`wmem_max`. Drops: `mediagate_turn_kernel_drops_total{socket=\"listener\"}`."),
    key("turn.relay.threads", "count", Value("0"), "Threads that serve the UDP listeners and the relay sockets of their allocations: each UDP listener binds one `SO_REUSEPORT` socket per thread, the kernel keeps a client on one thread, and the client's allocation is relayed by that thread in both directions (no wakeups across threads). 0: one per CPU; at most 64. TCP, TLS and DTLS listeners run on the shared runtime."),
    key("turn.relay.udp_gso", "bool", Value("true"), "Frames that one read of a relay socket brings for one UDP client leave with one segmented send where they are of one size (the last may be shorter): `UDP_SEGMENT` (generic segmentation offload), one pass through the network stack for the whole train, cut into the same datagrams at the device or by the NIC. Where the kernel refuses it (a path MTU smaller than a frame; a device without checksum offload can refuse it too) the frames go one by one; `false` always sends them one by one. The setting is the process's."),
    key("turn.relay.tcp_buffer", "bytes", Value("65536"), "Receive and send buffer of each TURN-over-TCP/TLS client connection (the kernel doubles it for its bookkeeping, as coturn's 64 KiB); 0 leaves both to the kernel's autotuning, which lets a client's backlog grow to `net.ipv4.tcp_rmem`'s maximum. Bounded, a client that sends faster than its data is relayed is slowed by TCP after about this many bytes instead of building up seconds of delay."),
    key("turn.relay.default_family", "`ipv4`, `ipv6` or `keep`", Value("ipv4"), "The family of the relayed address of an Allocate that names none (no REQUESTED-ADDRESS-FAMILY; browsers never send one). `ipv4` as RFC 8656 says; `keep`: the family the client reached the gateway over, so an IPv6 client of a gateway with an IPv6 `relay.address` gets an IPv6 relay (coturn's `allocation-default-address-family`). A family `relay.address` does not serve gets 440."),
    key("turn.relay.offload", "`none` or `ebpf`", Value("none"), "`ebpf`: the kernel fast path (the same TC program as `listeners[].offload`) relays the ChannelData of UDP allocations once a channel is bound and its peer has a live permission; user space keeps every decision and sends the rest. IPv4 and IPv6 channels; mixed families (an IPv4 client relayed to IPv6 peers or the reverse), TCP/TLS/DTLS clients and padded ChannelData stay in user space. `MEDIAGATE_TURN_OFFLOAD=ebpf` in the environment turns it on too. Needs CAP_BPF and CAP_NET_ADMIN; without them mediagate logs why and relays in user space. Part of the TURN section that takes effect at restart."),
    key("turn.quota", "section", Section, "Limits per user and over all users."),
    key("turn.quota.allocations_per_user", "integer >= 1", Value("10"), "Live allocations and EVEN-PORT reservations one user may hold; more are refused with 486 (Allocation Quota Reached). For ephemeral credentials the user is the whole `EXPIRY:USER` name, so the quota applies per issued credential, as in coturn."),
    key("turn.quota.max_allocations", "integer >= 1", Value("10000"), "Allocations plus EVEN-PORT reserved ports over all users; beyond it Allocate gets 508 (Insufficient Capacity). Clipped to the size of `turn.relay.port_range` (each holds one relay port); an info line says so. Counted in the file-descriptor budget."),
    key("turn.quota.max_tcp_connections", "integer >= 1", Value("4096"), "Concurrent TURN-over-TCP connections over all TCP listeners; further connections are closed at accept and counted in `mediagate_turn_tcp_closed_total{reason=\"limit\"}`."),
    key("turn.quota.max_dtls_sessions", "integer >= 1", Value("4096"), "Concurrent DTLS sessions (past the cookie exchange: handshaking or established) over all `dtls` listeners; a ClientHello that would open one more is dropped and counted in `mediagate_turn_dtls_closed_total{reason=\"limit\"}`. Only a ClientHello that echoes the cookie of the HelloVerifyRequest takes one of the 256 handshake slots of a listener (further ones are dropped, `reason=\"handshake_limit\"`, the client retransmits); clients that have not answered it yet are held apart (at most 1024 per listener, `reason=\"unverified_limit\"` beyond) and dropped after `handshake_timeout` (`reason=\"no_cookie\"`), so spoofed ClientHellos cannot take the handshake slots."),
    key("turn.quota.max_connections_per_source", "integer >= 1", Value("256"), "TURN-over-TCP/TLS connections plus DTLS sessions one source may hold at once (a source: an IPv4 address, or the /64 of an IPv6 address), so one host cannot take every slot of `max_tcp_connections` / `max_dtls_sessions`. Further TCP/TLS connections are closed at accept (`mediagate_turn_tcp_closed_total{reason=\"source_limit\"}`), further DTLS ClientHellos dropped (`mediagate_turn_dtls_closed_total{reason=\"source_limit\"}`). Clients behind one NAT share it."),
    key("turn.quota.max_handshakes_per_source", "integer >= 1", Value("16"), "Connections of one source that have not yet sent their first complete STUN message (PROXY header and TLS handshake not done, or nothing useful sent) plus its DTLS handshakes in flight; further TCP/TLS connections are closed at accept (`mediagate_turn_tcp_closed_total{reason=\"source_handshakes\"}`), further DTLS ClientHellos dropped (`mediagate_turn_dtls_closed_total{reason=\"source_handshakes\"}`)."),
    key("turn.quota.handshake_timeout", "duration", Value("5s"), "A TCP/TLS connection must have sent its first complete STUN message (PROXY header and TLS handshake included) within this time of accept, else it is closed (`mediagate_turn_tcp_closed_total{reason=\"tls_handshake\"}`, `\"proxy_header\"` or `\"no_request\"`); a DTLS client must answer the HelloVerifyRequest within it (`mediagate_turn_dtls_closed_total{reason=\"no_cookie\"}`). Once past it, the 30 s allocation and 10-minute idle limits apply."),
    key("turn.ice", "section", Section, "How `GET /ice` may be reached."),
    key("turn.ice.cors_origins", "list of origins", Value("[]"), "Origins (`https://app.example.com`, or `*`) allowed to fetch `/ice` from a page; the preflight `OPTIONS /ice` is answered for them."),
    key("turn.ice.token", "string", Unset("none"), "A bearer token accepted on `/ice` only (besides the admin token), so `/ice` can be exposed without exposing the admin API. Must differ from `admin.token`."),
    key("turn.ice.token_file", "path", Unset("none"), "A file holding `turn.ice.token` (one line), re-read when it changes like `admin.token_file`. Not together with `turn.ice.token`."),
    // ------------------------------------------------------------------ discovery
    key("discovery", "section", Section, "How DNS names and `node/…` servers are resolved."),
    key("discovery.dns", "section", Section, "DNS discovery of `host[:port]` servers."),
    key("discovery.dns.nameservers", "list of ip:port", Value("[]"), "Name servers to ask; empty means the system resolver (`/etc/resolv.conf`)."),
    key("discovery.dns.min_ttl", "duration", Value("1s"), "A name is re-resolved no sooner than this, whatever its TTL."),
    key("discovery.dns.max_ttl", "duration", Value("30s"), "A name is re-resolved at least this often, whatever its TTL. On a failed resolution the last good set is kept."),
    key("discovery.kubernetes", "section", Section, "Kubernetes discovery of `node/…` servers."),
    key("discovery.kubernetes.enabled", "bool", Value("false"), "Watch EndpointSlices and Nodes (in-cluster configuration, else `KUBECONFIG`). Needed by `node/…` servers."),
    // ------------------------------------------------------------------ shutdown
    key("cluster", "section", Unset("none: a single process"), "Replicas that act as one balancer: shared health view, shared admin states, peer protocol over UDP with an HMAC-SHA256 on every message. Reloadable: a changed section gets a new member in one step (same UDP socket when `listen` stays); a removed one leaves the cluster."),
    key("cluster.listen", "ip:port", Required, "UDP address of the peer (gossip) protocol."),
    key("cluster.advertise", "ip:port", Unset("`listen`"), "Address peers use to reach this replica; required when `listen` is a wildcard address (e.g. `${POD_IP}:7946`)."),
    key("cluster.peers", "list of host:port", Value("[]"), "Peers: static addresses or DNS names (a headless Service), re-resolved; this replica's own address in the list is ignored. Each must reach a replica at the address it advertises (frames name their destination; a load-balanced virtual IP does not work)."),
    key("cluster.secret", "string, >= 16 bytes", Unset("required unless `secret_file`"), "Shared key of the HMAC-SHA256 on every peer message; a message with a wrong MAC, too old (30 s), addressed to another replica or replayed is dropped and counted in `mediagate_cluster_messages_rejected_total`."),
    key("cluster.secret_file", "path", Unset("none"), "A file holding `cluster.secret` (one line), instead of `cluster.secret`. A change is a reload that restarts the membership with the new secret: until every replica has the new file, replicas with different secrets do not hear each other."),
    key("cluster.node_id", "string", Unset("`$HOSTNAME`, else the advertised address"), "Name of this replica in `/status` and in `peer:<node>:<reason>`."),
    key("cluster.peer_timeout", "duration", Value("3s"), "A peer not heard from for this long leaves the health vote (a dead replica never pins a server down). At least twice `gossip_interval`."),
    key("cluster.gossip_interval", "duration", Value("200ms"), "Periodic gossip round; changes are also pushed to every peer at once."),
    key("cluster.sync_timeout", "duration", Value("2s"), "Longest a starting replica waits for its peers' admin states before it turns ready."),
    key("cluster.state_file", "path", Unset("none"), "Keeps the admin states across restarts of every replica (JSON, written with a temporary file and a rename); it holds the action in force, with its version. Times read from it are clamped to at most 1 s ahead of the clock."),
    key("cluster.state_configmap", "namespace/name or name", Unset("none"), "In Kubernetes: a ConfigMap (key `state.json`) that keeps the admin states across restarts of every replica; needs get/create/patch on it."),
    key("events", "section", Section, "Where failover, failback, admin and server up/down events go besides `GET /events`. Reloadable: unchanged hooks keep running."),
    key("events.webhooks", "list", Value("[]"), "Each event is POSTed as JSON to every listed hook; a failing hook never blocks anything (bounded queue, dropped and counted when full)."),
    key("events.webhooks[].url", "http(s) URL", Required, "`http://host[:port]/path` or `https://host[:port]/path` (rustls)."),
    key("events.webhooks[].ca", "path", Unset("the system's CA certificates"), "`https://` hooks: PEM file of the CA certificates that may sign the receiver's certificate (or the receiver's own self-signed certificate), trusted instead of the system's."),
    key("events.webhooks[].secret", "string", Unset("none"), "When set, each POST carries `X-Mediagate-Signature: sha256=<hex HMAC-SHA256 of the body>`."),
    key("events.webhooks[].timeout", "duration", Value("2s"), "Per attempt (connect, send, answer)."),
    key("events.webhooks[].retries", "integer", Value("3"), "Attempts after the first failed one, 100 ms apart, doubling each time."),
    key("shutdown", "section", Section, "Graceful shutdown on SIGTERM/SIGINT."),
    key("shutdown.drain_timeout", "duration", Value("30s"), "After a termination signal: not ready, no new sessions, existing sessions keep flowing for at most this long. Keep the pod's `terminationGracePeriodSeconds` above it."),
];

const INTRO: &str = "\
# Configuration reference

<!-- Generated by `mediagate config --reference` from src/config/reference.rs; do not edit.
     A test fails when this file and the command's output differ. -->

The configuration file is YAML (`mediagate run -c FILE`, `mediagate check -c FILE`; the
default file is `$MEDIAGATE_CONFIG`, else `config/mediagate.yaml`). The rules:

- **Unknown keys are errors**, so a typo fails `mediagate check` instead of falling back to
  a default. Every error names the file, line, column and key path, and `check` reports
  every error of the file in one run. So are **keys that mean nothing where they are
  written**: `max_connections` on a UDP listener, an `http` probe's `path`,
  `expect_status` or `tls*` on another probe type, `send`/`expect` on a non-`udp` probe,
  `tls_verify`/`tls_server_name` without `tls: true`, PROXY protocol keys on UDP.
- **Names of choices** are written in snake_case (`round_robin`, `new_sessions`,
  `keep_last`); the kebab-case spelling (`round-robin`) is accepted as well.
- **Durations** are strings such as `250ms`, `5s`, `2m`, `24h` (a number and its unit
  written together).
- **`${VAR}`** in any string value is replaced by the environment variable `VAR`; a missing
  variable is an error. Use it for secrets (`admin.token`, `turn.auth.secret`).
- **Reload**: `SIGHUP`, a change of the file's content, or `POST /reload` loads the file
  again; a file that fails the check is refused and the running configuration stays.
- In paths below, `[]` is an entry of a list and `NAME` a key of your choosing.

An annotated example is [`config/mediagate.yaml`](../config/mediagate.yaml); the README
explains each feature. Generate this page again with
`mediagate config --reference > docs/configuration.md`.
";

/// The reference as Markdown: one table per top-level section.
pub fn markdown() -> String {
    let mut out = String::from(INTRO);
    let mut section = "";
    for k in KEYS {
        let top = k.path.split(['.', '[']).next().unwrap_or(k.path);
        if top != section {
            section = top;
            let _ = write!(
                out,
                "\n## `{top}`\n\n| Key | Type | Default | Meaning |\n|---|---|---|---|\n"
            );
        }
        let default = match k.default {
            Required => "**required**".to_string(),
            Unset(text) => text.to_string(),
            Section => "see below".to_string(),
            Value(v) => format!("`{v}`"),
        };
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} |",
            k.path,
            k.kind,
            default,
            k.meaning.replace('|', "\\|")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;
    use serde::Deserialize;
    use serde::de::{self, Deserializer, Visitor};
    use std::collections::BTreeSet;

    /// A deserializer that records the field names a `#[derive(Deserialize)]` struct asks
    /// for, then fails: the real field list of a configuration type, renames included.
    struct Capture<'a>(&'a mut Vec<&'static str>);

    impl<'de> Deserializer<'de> for Capture<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            self.0.extend_from_slice(fields);
            Err(de::Error::custom("captured"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    fn fields<T: for<'de> Deserialize<'de>>() -> Vec<&'static str> {
        let mut v = Vec::new();
        let _ = T::deserialize(Capture(&mut v));
        assert!(
            !v.is_empty(),
            "{} is not a struct",
            std::any::type_name::<T>()
        );
        v
    }

    /// Every configuration struct and the path its fields live under. A new struct-valued
    /// key (a `section` row) needs its type listed here.
    fn structs() -> Vec<(&'static str, Vec<&'static str>)> {
        vec![
            ("", fields::<Config>()),
            ("admin", fields::<AdminConfig>()),
            ("log", fields::<LogConfig>()),
            ("listeners[]", fields::<ListenerConfig>()),
            ("listeners[].session", fields::<SessionConfig>()),
            ("upstreams.NAME", fields::<UpstreamConfig>()),
            ("upstreams.NAME.health", fields::<HealthConfig>()),
            ("upstreams.NAME.kubernetes", fields::<KubernetesRef>()),
            ("turn", fields::<TurnConfig>()),
            ("turn.listeners[]", fields::<TurnListenerConfig>()),
            ("turn.auth", fields::<TurnAuthConfig>()),
            ("turn.auth.users[]", fields::<TurnUser>()),
            ("turn.relay", fields::<RelayConfig>()),
            ("turn.quota", fields::<QuotaConfig>()),
            ("turn.ice", fields::<IceHttpConfig>()),
            ("discovery", fields::<DiscoveryConfig>()),
            ("discovery.dns", fields::<DnsConfig>()),
            (
                "discovery.kubernetes",
                fields::<KubernetesDiscoveryConfig>(),
            ),
            ("shutdown", fields::<ShutdownConfig>()),
            ("cluster", fields::<crate::config::ClusterConfig>()),
            ("events", fields::<crate::config::EventsConfig>()),
            (
                "events.webhooks[]",
                fields::<crate::config::WebhookConfig>(),
            ),
        ]
    }

    /// The struct path a row's key belongs to: `turn.auth.users[].username` ->
    /// `turn.auth.users[]`; the list and map rows themselves (`listeners`, `upstreams`)
    /// belong to the root.
    fn parent(path: &str) -> (&str, &str) {
        match path.rfind('.') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => ("", path),
        }
    }

    #[test]
    fn every_field_of_every_config_struct_has_a_row_and_every_row_is_a_field() {
        let rows: BTreeSet<&str> = KEYS.iter().map(|k| k.path).collect();
        assert_eq!(rows.len(), KEYS.len(), "a path appears twice in KEYS");
        let structs = structs();
        let mut missing = Vec::new();
        for (prefix, fields) in &structs {
            for f in fields {
                // `upstreams` is a map of UpstreamConfig: its row is `upstreams`, and the
                // fields of an entry live under `upstreams.NAME`.
                let path = if prefix.is_empty() {
                    f.to_string()
                } else {
                    format!("{prefix}.{f}")
                };
                if !rows.contains(path.as_str()) {
                    missing.push(path);
                }
            }
        }
        assert!(
            missing.is_empty(),
            "keys without a row in src/config/reference.rs KEYS: {missing:?}"
        );
        for k in KEYS {
            let (p, name) = parent(k.path);
            let p = p.trim_end_matches("[]");
            let owner = structs
                .iter()
                .find(|(prefix, _)| prefix.trim_end_matches("[]") == p)
                .unwrap_or_else(|| panic!("row {}: no struct for {p:?} in structs()", k.path));
            let name = name.trim_end_matches("[]");
            assert!(
                owner.1.contains(&name),
                "row {} names no field of the configuration types ({:?} has {:?})",
                k.path,
                owner.0,
                owner.1
            );
            // Sections, and lists/maps of sections, need their struct in structs(); lists
            // of scalars (`turn.relay.peers`, …) are `list` rows with a Value default.
            if k.default == Section || k.kind == "section" {
                let entry = [format!("{}[]", k.path), format!("{}.NAME", k.path)];
                let has_struct = structs
                    .iter()
                    .any(|(prefix, _)| *prefix == k.path || entry.iter().any(|s| s == prefix));
                assert!(
                    has_struct,
                    "section row {} has no type in structs()",
                    k.path
                );
            }
        }
    }

    /// A configuration using every section, with a user-chosen name `NAME`.
    fn base() -> serde_json::Value {
        serde_json::json!({
            "admin": {}, "log": {},
            "listeners": [{"name": "l", "protocol": "udp", "listen": "127.0.0.1:5004",
                           "upstream": "NAME", "session": {}}],
            "upstreams": {"NAME": {"primary": ["127.0.0.1:6000"], "health": {},
                                   "kubernetes": {"namespace": "n", "service": "s"}}},
            "turn": {"public_address": "127.0.0.1",
                     "listeners": [{"protocol": "udp", "listen": "127.0.0.1:3478"}],
                     "auth": {"type": "static", "users": [{"username": "u", "password": "p"}]},
                     "relay": {}, "quota": {}, "ice": {}},
            "discovery": {"dns": {}, "kubernetes": {}},
            "shutdown": {},
            "cluster": {"listen": "127.0.0.1:7946", "secret": "0123456789abcdef"},
            "events": {"webhooks": [{"url": "http://127.0.0.1:9/hook"}]}
        })
    }

    /// The JSON value of a default as written in the reference.
    fn written(v: &str) -> serde_json::Value {
        if let Ok(j) = serde_json::from_str::<serde_json::Value>(v) {
            return j;
        }
        if let Some(inner) = v.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            return inner
                .split(',')
                .map(|s| serde_json::Value::from(s.trim()))
                .collect();
        }
        v.into()
    }

    /// The object holding the key at `path` in `cfg`, and the key.
    fn slot<'a>(
        cfg: &'a mut serde_json::Value,
        path: &'a str,
    ) -> (&'a mut serde_json::Map<String, serde_json::Value>, &'a str) {
        let mut cur = cfg;
        let mut parts: Vec<&str> = path.split('.').collect();
        let last = parts.pop().unwrap();
        for p in parts {
            cur = match p.strip_suffix("[]") {
                Some(list) => &mut cur[list][0],
                None => &mut cur[p],
            };
        }
        (cur.as_object_mut().expect("an object"), last)
    }

    #[test]
    fn every_written_default_is_the_value_the_code_uses() {
        let parse = |v: serde_json::Value| -> Result<Config, String> {
            serde_json::from_value(v).map_err(|e| e.to_string())
        };
        parse(base()).expect("the test's base configuration parses");
        for k in KEYS {
            let Value(v) = k.default else { continue };
            let mut absent = base();
            let (obj, name) = slot(&mut absent, k.path);
            obj.remove(name);
            let mut written_out = base();
            let (obj, name) = slot(&mut written_out, k.path);
            obj.insert(name.to_string(), written(v));
            let absent = parse(absent).unwrap_or_else(|e| panic!("{} absent: {e}", k.path));
            let with = parse(written_out).unwrap_or_else(|e| panic!("{}: {v}: {e}", k.path));
            assert_eq!(
                absent, with,
                "{}: the documented default {v:?} is not the code's",
                k.path
            );
        }
    }

    #[test]
    fn docs_configuration_md_is_the_generated_reference() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == markdown(),
            "docs/configuration.md is stale: run `cargo run -- config --reference > docs/configuration.md`"
        );
    }
}
