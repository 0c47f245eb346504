//! What the replicas-as-one tests share (`tests/cluster.rs`, `tests/cluster_hostile.rs`):
//! each replica's ports, how many peers a replica sees alive, and a metric sample.

use super::{Balancer, free_tcp_port, spare_udp_port};

/// One replica's admin (TCP), listener and cluster (UDP) ports.
pub struct Ports {
    pub admin: u16,
    pub listen: u16,
    pub cluster: u16,
}

/// Ports for `n` replicas.
pub fn ports(n: usize) -> Vec<Ports> {
    (0..n)
        .map(|_| Ports {
            admin: free_tcp_port(),
            listen: spare_udp_port(),
            cluster: spare_udp_port(),
        })
        .collect()
}

/// Peers this replica's `/status` shows alive.
pub fn alive_peers(b: &Balancer) -> usize {
    b.status()["cluster"]["peers"]
        .as_array()
        .map(|a| a.iter().filter(|p| p["alive"] == true).count())
        .unwrap_or(0)
}

/// The value of the first /metrics line that starts with `line_start`; 0 if none.
pub fn metric(b: &Balancer, line_start: &str) -> f64 {
    b.metrics()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
