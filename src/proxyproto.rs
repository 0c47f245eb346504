//! PROXY protocol version 2 (HAProxy's binary header) on TCP connections, both ways:
//! [`header_v2`] builds the header a TCP listener with `proxy_protocol: v2` sends to the
//! server, and [`read_v2`] takes the client address from the header a cloud load balancer
//! (AWS NLB, GCP, HAProxy) puts in front of a connection (`accept_proxy_protocol: true`).
//!
//! The header codec is the `ppp` crate's; this module adds the bounded, timed read: exactly
//! the header's bytes are read (nothing of the payload behind it), its length is capped,
//! and it must arrive within [`HEADER_TIMEOUT`].

use ppp::v2::{Addresses, Builder, Command, Header, PROTOCOL_PREFIX, Protocol, Version};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// The sources a listener with `accept_proxy_protocol` takes a PROXY header from
/// (`trusted_proxies`, as nginx's `set_real_ip_from`): a connection from anywhere else is
/// refused before its header is read, so nobody can claim another client's address.
#[derive(Debug, Clone, Default)]
pub struct Trusted(Arc<[ipnet::IpNet]>);

impl Trusted {
    /// From the configured CIDRs (or plain addresses); entries that do not parse are
    /// skipped (the configuration's validation has refused them already).
    pub fn parse(list: &[String]) -> Trusted {
        Trusted(
            list.iter()
                .filter_map(|s| {
                    s.parse::<ipnet::IpNet>()
                        .ok()
                        .or_else(|| s.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
                })
                .collect(),
        )
    }

    /// Whether a connection from `ip` may send a PROXY header.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|n| n.contains(&ip))
    }
}
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// A connection must deliver its whole PROXY header within this time.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest header accepted (addresses plus TLVs; AWS adds a VPC endpoint TLV of ~30 bytes).
const MAX_HEADER: usize = 1024;
/// Signature (12) + version/command + family/protocol + length (2).
const FIXED: usize = 16;

/// The PROXY v2 header announcing a TCP connection from `client` to `local`.
pub fn header_v2(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    // Both addresses must be of one family: an IPv4 one is written IPv4-mapped next to IPv6.
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    let (src, dst) = match (client, local) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => {
            (client, local)
        }
        _ => (v6(client), v6(local)),
    };
    let addresses: Addresses = (src, dst).into();
    match Builder::with_addresses(
        Version::Two as u8 | Command::Proxy as u8,
        Protocol::Stream,
        addresses,
    )
    .build()
    {
        Ok(h) => h,
        // Writing into a Vec cannot fail.
        Err(_) => unreachable!("building a PROXY header in memory"),
    }
}

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// Nothing valid within [`HEADER_TIMEOUT`].
    #[error("no complete PROXY v2 header within {HEADER_TIMEOUT:?}")]
    Timeout,
    /// The connection closed or failed before the header was complete.
    #[error("connection ended before the PROXY v2 header was complete: {0}")]
    Io(#[from] std::io::Error),
    /// Not a PROXY v2 header (a v1 text header, or no header at all).
    #[error("not a PROXY protocol v2 header")]
    NotV2,
    /// A header longer than accepted.
    #[error("PROXY v2 header of {0} bytes is longer than {MAX_HEADER}")]
    TooLong(usize),
    /// The codec refused it.
    #[error("invalid PROXY v2 header: {0}")]
    Invalid(String),
}

/// Reads one PROXY v2 header from the start of `r` and returns the client (source)
/// address it carries, or `None` for a `LOCAL` header or a non-IP family (the load
/// balancer's own health checks: the connection's own peer address applies).
pub async fn read_v2<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    tokio::time::timeout(HEADER_TIMEOUT, read_v2_untimed(r))
        .await
        .map_err(|_| ProxyHeaderError::Timeout)?
}

async fn read_v2_untimed<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut fixed = [0u8; FIXED];
    r.read_exact(&mut fixed).await?;
    if &fixed[..PROTOCOL_PREFIX.len()] != PROTOCOL_PREFIX {
        return Err(ProxyHeaderError::NotV2);
    }
    let rest = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if FIXED + rest > MAX_HEADER {
        return Err(ProxyHeaderError::TooLong(FIXED + rest));
    }
    let mut buf = Vec::with_capacity(FIXED + rest);
    buf.extend_from_slice(&fixed);
    buf.resize(FIXED + rest, 0);
    r.read_exact(&mut buf[FIXED..]).await?;
    parse(&buf)
}

fn parse(buf: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let h = Header::try_from(buf).map_err(|e| ProxyHeaderError::Invalid(e.to_string()))?;
    if h.command == Command::Local {
        return Ok(None);
    }
    Ok(match h.addresses {
        Addresses::IPv4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        Addresses::IPv6(a) => {
            // An IPv4 client written IPv4-mapped is an IPv4 client.
            let ip = a
                .source_address
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(a.source_address));
            Some(SocketAddr::new(ip, a.source_port))
        }
        Addresses::Unspecified | Addresses::Unix(_) => None,
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn trusted_proxies_match_cidrs_addresses_and_mapped_ipv4() {
        let t = super::Trusted::parse(&[
            "10.0.0.0/8".into(),
            "192.0.2.7".into(),
            "2001:db8::/32".into(),
        ]);
        for ok in ["10.1.2.3", "192.0.2.7", "::ffff:10.9.9.9", "2001:db8::1"] {
            assert!(t.allows(ok.parse().unwrap()), "{ok}");
        }
        for no in ["11.0.0.1", "192.0.2.8", "127.0.0.1", "2001:db9::1"] {
            assert!(!t.allows(no.parse().unwrap()), "{no}");
        }
        assert!(!super::Trusted::default().allows("127.0.0.1".parse().unwrap()));
    }

    use super::*;

    #[tokio::test]
    async fn round_trip_leaves_the_payload_unread() {
        for (client, local) in [
            ("192.0.2.7:40000", "10.0.0.1:443"),
            ("[2001:db8::7]:40000", "[2001:db8::1]:443"),
            ("192.0.2.7:40000", "[2001:db8::1]:443"),
        ] {
            let client: SocketAddr = client.parse().unwrap();
            let mut bytes = header_v2(client, local.parse().unwrap());
            bytes.extend_from_slice(b"payload");
            let mut r = bytes.as_slice();
            assert_eq!(read_v2(&mut r).await.unwrap(), Some(client));
            assert_eq!(r, b"payload");
        }
    }

    #[tokio::test]
    async fn refuses_what_is_not_a_v2_header() {
        let mut v1 = b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 443\r\n".as_slice();
        assert!(matches!(
            read_v2(&mut v1).await,
            Err(ProxyHeaderError::NotV2)
        ));
        let mut stun = [0u8; 20].as_slice();
        assert!(matches!(
            read_v2(&mut stun).await,
            Err(ProxyHeaderError::NotV2)
        ));
        let mut short = &header_v2(
            "192.0.2.7:1".parse().unwrap(),
            "10.0.0.1:2".parse().unwrap(),
        )[..20];
        assert!(matches!(
            read_v2(&mut short).await,
            Err(ProxyHeaderError::Io(_))
        ));
        let mut long = PROTOCOL_PREFIX.to_vec();
        long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(
            read_v2(&mut long.as_slice()).await,
            Err(ProxyHeaderError::TooLong(_))
        ));
    }

    #[tokio::test]
    async fn local_command_keeps_the_socket_address() {
        let mut local = PROTOCOL_PREFIX.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(read_v2(&mut local.as_slice()).await.unwrap(), None);
    }
}
