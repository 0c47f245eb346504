//! What the kernel fast path tests share (`tests/udp_offload.rs`, its IPv6 twin): the
//! balancer's configuration with `offload: ebpf`, and the metric samples they read.

use std::net::SocketAddr;

/// One UDP listener on `listen` (`ip:port`, IPv6 in brackets) with `offload: ebpf`,
/// an upstream of `primary` and `backup` probed every 100 ms.
pub fn config(
    listen: &str,
    admin: u16,
    primary: SocketAddr,
    backup: SocketAddr,
    idle: &str,
) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:{admin}" }}
shutdown: {{ drain_timeout: 1s }}
listeners:
  - name: rtp
    protocol: udp
    listen: "{listen}"
    upstream: media
    offload: ebpf
    session: {{ idle_timeout: {idle} }}
upstreams:
  media:
    primary: ["{primary}"]
    backup: ["{backup}"]
    health: {{ type: udp, send: ping, interval: 100ms, timeout: 100ms }}
"#
    )
}

/// The offload and packet counter lines of a /metrics text (for failure messages).
pub fn offload_lines(m: &str) -> String {
    m.lines()
        .filter(|l| l.contains("offload") || l.contains("packets_total"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub const PKT_TO_SERVER: &str = "mediagate_packets_total{listener=\"rtp\",direction=\"to_server\"}";
pub const PKT_TO_CLIENT: &str = "mediagate_packets_total{listener=\"rtp\",direction=\"to_client\"}";
pub const OFF_TO_SERVER: &str =
    "mediagate_offload_packets_total{listener=\"rtp\",direction=\"to_server\"}";
pub const OFF_TO_CLIENT: &str =
    "mediagate_offload_packets_total{listener=\"rtp\",direction=\"to_client\"}";
pub const OFF_SESSIONS: &str = "mediagate_offload_sessions{listener=\"rtp\"}";
