//! Byte-level helpers for the two kinds of TURN packets (RFC 8656): STUN messages and
//! ChannelData. Classification, TCP stream framing (§12.5: over TCP, ChannelData is padded
//! to a multiple of four bytes), XOR address decoding, and payload sizes for counting.
//! Everything here is pure and never panics on arbitrary input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub(crate) const STUN_HEADER: usize = 20;
pub(crate) const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
const CHANNEL_HEADER: usize = 4;
/// Largest STUN message or ChannelData (header + 16-bit length + padding).
pub(crate) const MAX_FRAME: usize = STUN_HEADER + 0xFFFF + 3;

/// What a client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A STUN message whose header is consistent with the datagram length.
    Stun,
    /// ChannelData whose length fits the datagram.
    ChannelData,
    /// Neither: dropped and counted.
    Invalid,
}

/// Classifies one datagram (UDP) or one frame (TCP).
pub(crate) fn classify(b: &[u8]) -> Kind {
    match b.first() {
        Some(0x00..=0x3F) => {
            if b.len() < STUN_HEADER || b[4..8] != MAGIC_COOKIE {
                return Kind::Invalid;
            }
            let len = u16::from_be_bytes([b[2], b[3]]) as usize;
            if !len.is_multiple_of(4) || STUN_HEADER + len != b.len() {
                return Kind::Invalid;
            }
            Kind::Stun
        }
        Some(0x40..=0x7F) => {
            if b.len() < CHANNEL_HEADER {
                return Kind::Invalid;
            }
            let len = u16::from_be_bytes([b[2], b[3]]) as usize;
            // Padding up to four bytes may follow the data (always does over TCP).
            if CHANNEL_HEADER + len > b.len() || b.len() > CHANNEL_HEADER + padded(len) {
                return Kind::Invalid;
            }
            Kind::ChannelData
        }
        _ => Kind::Invalid,
    }
}

fn padded(len: usize) -> usize {
    (len + 3) & !3
}

/// Result of looking for one frame at the start of a TCP byte stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// Need more bytes.
    Incomplete,
    /// The first `n` bytes are one frame.
    Complete(usize),
    /// The stream is not TURN: close the connection.
    Invalid,
}

/// Frames a TCP stream: a STUN message is `20 + length`; ChannelData is
/// `4 + length` rounded up to a multiple of four.
pub(crate) fn tcp_frame(b: &[u8]) -> Frame {
    let Some(&first) = b.first() else {
        return Frame::Incomplete;
    };
    match first {
        0x00..=0x3F => {
            if b.len() >= 8 && b[4..8] != MAGIC_COOKIE {
                return Frame::Invalid;
            }
            if b.len() < 4 {
                return Frame::Incomplete;
            }
            let len = u16::from_be_bytes([b[2], b[3]]) as usize;
            if !len.is_multiple_of(4) {
                return Frame::Invalid;
            }
            let total = STUN_HEADER + len;
            if b.len() >= total && b.len() >= 8 {
                Frame::Complete(total)
            } else {
                Frame::Incomplete
            }
        }
        0x40..=0x7F => {
            if b.len() < CHANNEL_HEADER {
                return Frame::Incomplete;
            }
            let len = u16::from_be_bytes([b[2], b[3]]) as usize;
            let total = CHANNEL_HEADER + padded(len);
            if b.len() >= total {
                Frame::Complete(total)
            } else {
                Frame::Incomplete
            }
        }
        _ => Frame::Invalid,
    }
}

/// Total length of the frame at the start of a TCP stream once its 4-byte header is in
/// (`None` before that, or when the first byte starts no frame).
pub(crate) fn tcp_frame_len(b: &[u8]) -> Option<usize> {
    if b.len() < 4 {
        return None;
    }
    let len = u16::from_be_bytes([b[2], b[3]]) as usize;
    match b[0] {
        0x00..=0x3F => Some(STUN_HEADER + len),
        0x40..=0x7F => Some(CHANNEL_HEADER + padded(len)),
        _ => None,
    }
}

/// Number of padding bytes a ChannelData frame needs before it goes on a TCP stream.
pub(crate) fn tcp_padding(b: &[u8]) -> usize {
    if matches!(b.first(), Some(0x40..=0x7F)) {
        padded(b.len()) - b.len()
    } else {
        0
    }
}

/// Relayed payload size of a packet the server sends to a client: the data of a
/// ChannelData message or of a Data indication; `None` for anything else.
pub(crate) fn relayed_payload_len(b: &[u8]) -> Option<usize> {
    match b.first() {
        Some(0x40..=0x7F) if b.len() >= CHANNEL_HEADER => {
            Some(u16::from_be_bytes([b[2], b[3]]) as usize)
        }
        // 0x0017: Data indication.
        Some(0x00) if b.len() >= STUN_HEADER && b[1] == 0x17 => attributes(b)
            .find(|(t, _)| *t == 0x0013)
            .map(|(_, v)| v.len()),
        _ => None,
    }
}

/// Iterates over the (type, value) attributes of a STUN message, stopping at the first
/// inconsistency.
pub(crate) fn attributes(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let end = if b.len() >= STUN_HEADER {
        (STUN_HEADER + u16::from_be_bytes([b[2], b[3]]) as usize).min(b.len())
    } else {
        0
    };
    let mut pos = STUN_HEADER.min(end);
    std::iter::from_fn(move || {
        if pos + 4 > end {
            return None;
        }
        let t = u16::from_be_bytes([b[pos], b[pos + 1]]);
        let l = u16::from_be_bytes([b[pos + 2], b[pos + 3]]) as usize;
        let v = b.get(pos + 4..pos + 4 + l)?;
        if pos + 4 + l > end {
            return None;
        }
        pos += 4 + padded(l);
        Some((t, v))
    })
}

/// Builds into `out` (cleared first) a Data indication (RFC 8656 §11.4) carrying `data`
/// (at most 65,000 bytes) from `peer`: XOR-PEER-ADDRESS and DATA, a random transaction
/// ID, no FINGERPRINT (as the `turn` crate builds them).
pub(crate) fn data_indication(out: &mut Vec<u8>, peer: SocketAddr, data: &[u8]) {
    let txid: [u8; 12] = rand::random();
    let addr_len: usize = if peer.is_ipv4() { 8 } else { 20 };
    let body = 4 + addr_len + 4 + padded(data.len());
    out.clear();
    out.extend_from_slice(&[0x00, 0x17]);
    out.extend_from_slice(&(body as u16).to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE);
    out.extend_from_slice(&txid);
    out.extend_from_slice(&0x0012u16.to_be_bytes());
    out.extend_from_slice(&(addr_len as u16).to_be_bytes());
    out.push(0);
    out.push(if peer.is_ipv4() { 1 } else { 2 });
    out.extend_from_slice(&(peer.port() ^ 0x2112).to_be_bytes());
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE);
    key[4..].copy_from_slice(&txid);
    match peer.ip() {
        IpAddr::V4(ip) => out.extend(ip.octets().iter().zip(key).map(|(b, k)| b ^ k)),
        IpAddr::V6(ip) => out.extend(ip.octets().iter().zip(key).map(|(b, k)| b ^ k)),
    }
    out.extend_from_slice(&0x0013u16.to_be_bytes());
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len() + padded(data.len()) - data.len(), 0);
}

/// Decodes an XOR-PEER-ADDRESS / XOR-MAPPED-ADDRESS / XOR-RELAYED-ADDRESS value.
pub(crate) fn xor_address(value: &[u8], txid: &[u8; 12]) -> Option<SocketAddr> {
    if value.len() < 4 {
        return None;
    }
    let port = u16::from_be_bytes([value[2], value[3]]) ^ 0x2112;
    match (value[1], value.len()) {
        (0x01, 8) => {
            let mut ip = [0u8; 4];
            for (i, o) in ip.iter_mut().enumerate() {
                *o = value[4 + i] ^ MAGIC_COOKIE[i];
            }
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        (0x02, 20) => {
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&MAGIC_COOKIE);
            key[4..].copy_from_slice(txid);
            let mut ip = [0u8; 16];
            for (i, o) in ip.iter_mut().enumerate() {
                *o = value[4 + i] ^ key[i];
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stun(len: u16) -> Vec<u8> {
        let mut b = vec![0x00, 0x01];
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&MAGIC_COOKIE);
        b.extend_from_slice(&[7; 12]);
        b.extend(std::iter::repeat_n(0, len as usize));
        b
    }

    #[test]
    fn frame_length_is_known_from_the_header() {
        assert_eq!(tcp_frame_len(&[0x00, 0x01, 0x00]), None);
        assert_eq!(tcp_frame_len(&stun(8)[..4]), Some(28));
        assert_eq!(tcp_frame_len(&[0x00, 0x01, 0xFF, 0xFC]), Some(20 + 0xFFFC));
        assert_eq!(tcp_frame_len(&[0x40, 0x00, 0x00, 0x05]), Some(12));
        assert_eq!(tcp_frame_len(&[0xC0, 0x00, 0x00, 0x05]), None);
    }

    #[test]
    fn classifies_datagrams() {
        assert_eq!(classify(&stun(0)), Kind::Stun);
        assert_eq!(classify(&stun(8)), Kind::Stun);
        let mut truncated = stun(8);
        truncated.pop();
        assert_eq!(classify(&truncated), Kind::Invalid);
        let mut bad_cookie = stun(0);
        bad_cookie[4] = 0;
        assert_eq!(classify(&bad_cookie), Kind::Invalid);
        assert_eq!(
            classify(&[0x40, 0x00, 0x00, 0x03, 1, 2, 3]),
            Kind::ChannelData
        );
        assert_eq!(
            classify(&[0x40, 0x00, 0x00, 0x03, 1, 2, 3, 0]),
            Kind::ChannelData
        );
        assert_eq!(classify(&[0x40, 0x00, 0x00, 0x03, 1, 2]), Kind::Invalid);
        assert_eq!(
            classify(&[0x40, 0x00, 0x00, 0x01, 1, 0, 0, 0, 0]),
            Kind::Invalid
        );
        assert_eq!(classify(&[0x80, 0, 0, 0]), Kind::Invalid);
        assert_eq!(classify(&[]), Kind::Invalid);
        assert_eq!(classify(&[0x41]), Kind::Invalid);
    }

    #[test]
    fn frames_a_tcp_stream() {
        assert_eq!(tcp_frame(&[]), Frame::Incomplete);
        assert_eq!(tcp_frame(&stun(8)[..10]), Frame::Incomplete);
        assert_eq!(tcp_frame(&stun(8)), Frame::Complete(28));
        let mut two = stun(4);
        two.extend_from_slice(&stun(0));
        assert_eq!(tcp_frame(&two), Frame::Complete(24));
        // ChannelData with 3 bytes of data is padded to 8 bytes on TCP.
        assert_eq!(tcp_frame(&[0x40, 0, 0, 3, 1, 2, 3]), Frame::Incomplete);
        assert_eq!(
            tcp_frame(&[0x40, 0, 0, 3, 1, 2, 3, 0, 0x40]),
            Frame::Complete(8)
        );
        assert_eq!(tcp_frame(&[0xC0, 0, 0, 0]), Frame::Invalid);
        let mut odd = stun(0);
        odd[3] = 2;
        assert_eq!(tcp_frame(&odd), Frame::Invalid);
        assert_eq!(tcp_padding(&[0x40, 0, 0, 3, 1, 2, 3]), 1);
        assert_eq!(tcp_padding(&stun(0)), 0);
    }

    #[test]
    fn payload_sizes() {
        assert_eq!(relayed_payload_len(&[0x40, 0, 0, 3, 1, 2, 3, 0]), Some(3));
        // Data indication with XOR-PEER-ADDRESS (8) and DATA (5, padded to 8).
        let mut d = vec![0x00, 0x17, 0x00, 24];
        d.extend_from_slice(&MAGIC_COOKIE);
        d.extend_from_slice(&[0; 12]);
        d.extend_from_slice(&[0x00, 0x12, 0x00, 0x08, 0, 1, 0, 0, 0, 0, 0, 0]);
        d.extend_from_slice(&[0x00, 0x13, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0]);
        assert_eq!(relayed_payload_len(&d), Some(5));
        assert_eq!(relayed_payload_len(&stun(0)), None);
        // A lying attribute length stops the walk instead of panicking.
        let mut bad = d.clone();
        bad[34] = 0xFF;
        assert_eq!(relayed_payload_len(&bad[..30]), None);
        let _ = attributes(&bad).count();
    }

    #[test]
    fn data_indications_decode() {
        for peer in ["10.1.2.3:4000", "[2001:db8::7]:5000"] {
            let peer: SocketAddr = peer.parse().unwrap();
            let mut out = Vec::new();
            data_indication(&mut out, peer, b"hello");
            assert_eq!(classify(&out), Kind::Stun);
            assert_eq!(relayed_payload_len(&out), Some(5));
            let txid: [u8; 12] = out[8..20].try_into().unwrap();
            let got: Vec<(u16, Vec<u8>)> = attributes(&out).map(|(t, v)| (t, v.to_vec())).collect();
            assert_eq!(got.len(), 2);
            assert_eq!(xor_address(&got[0].1, &txid), Some(peer));
            assert_eq!(got[1], (0x0013, b"hello".to_vec()));
        }
    }

    #[test]
    fn xor_addresses() {
        let txid = [0u8; 12];
        // 192.0.2.1:32853 as in RFC 5769 test vectors (IPv4 part).
        let v = [0x00, 0x01, 0xA1, 0x47, 0xE1, 0x12, 0xA6, 0x43];
        assert_eq!(
            xor_address(&v, &txid),
            Some("192.0.2.1:32853".parse().unwrap())
        );
        assert_eq!(xor_address(&v[..7], &txid), None);
        assert_eq!(xor_address(&[0, 3, 0, 0, 0, 0, 0, 0], &txid), None);
    }
}
