//! The control half of the TURN load generator: one allocation with a permission and a
//! channel for a peer, made over UDP or TCP with long-term credentials (RFC 8656 §7.2,
//! §9, §11), encoded with the `stun`/`turn` crates. Blocking, bounded by timeouts and
//! retries; used once per allocation before the measured runs.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;
use stun::agent::TransactionId;
use stun::attributes::*;
use stun::error_code::ErrorCodeAttribute;
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;
use turn::proto::PROTO_UDP;
use turn::proto::channum::ChannelNumber;
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::reqtrans::RequestedTransport;

/// Long-term credentials of the load's user.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// The control connection of one allocation (its socket also carries the data).
pub enum Control {
    /// A UDP socket connected to the server.
    Udp(UdpSocket),
    /// A TCP connection to the server (STUN messages are self-delimiting).
    Tcp(TcpStream),
}

impl Control {
    fn send(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            Control::Udp(s) => s.send(b).map(|_| ()),
            Control::Tcp(s) => s.write_all(b),
        }
    }

    /// The next STUN message (ChannelData that races in over TCP is skipped).
    fn recv(&mut self) -> io::Result<Vec<u8>> {
        match self {
            Control::Udp(s) => {
                let mut buf = vec![0u8; 2048];
                let n = s.recv(&mut buf)?;
                buf.truncate(n);
                Ok(buf)
            }
            Control::Tcp(s) => loop {
                let mut head = [0u8; 4];
                s.read_exact(&mut head)?;
                let len = u16::from_be_bytes([head[2], head[3]]) as usize;
                if head[0] & 0xC0 == 0x40 {
                    let mut skip = vec![0u8; (len + 3) & !3];
                    s.read_exact(&mut skip)?;
                    continue;
                }
                let mut buf = vec![0u8; 20 + len];
                buf[..4].copy_from_slice(&head);
                s.read_exact(&mut buf[4..])?;
                return Ok(buf);
            },
        }
    }

    /// One request/response transaction, retransmitted over UDP.
    fn transact(&mut self, req: &Message) -> io::Result<Message> {
        let tries = if matches!(self, Control::Udp(_)) {
            4
        } else {
            1
        };
        for _ in 0..tries {
            self.send(&req.raw)?;
            loop {
                let raw = match self.recv() {
                    Ok(r) => r,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        break;
                    }
                    Err(e) => return Err(e),
                };
                let mut m = Message::new();
                m.raw = raw;
                if m.decode().is_ok() && m.transaction_id == req.transaction_id {
                    return Ok(m);
                }
            }
        }
        Err(io::Error::new(io::ErrorKind::TimedOut, "no STUN response"))
    }
}

fn build(setters: Vec<Box<dyn Setter>>) -> io::Result<Message> {
    let mut m = Message::new();
    m.build(&setters)
        .map_err(|e| io::Error::other(format!("build: {e}")))?;
    Ok(m)
}

fn check(m: &Message, what: &str) -> io::Result<()> {
    if m.typ.class == CLASS_SUCCESS_RESPONSE {
        return Ok(());
    }
    let mut e = ErrorCodeAttribute::default();
    let _ = e.get_from(m);
    Err(io::Error::other(format!(
        "{what}: error {} {}",
        e.code.0,
        String::from_utf8_lossy(&e.reason)
    )))
}

/// An allocation made: its relayed address and the control connection.
pub struct Allocation {
    pub control: Control,
    pub relayed: SocketAddr,
    realm: String,
    nonce: String,
    creds: Credentials,
}

impl Allocation {
    /// Allocate: the unauthenticated attempt gets REALM and NONCE, the second succeeds.
    pub fn new(mut control: Control, creds: &Credentials) -> io::Result<Allocation> {
        let first = build(vec![
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
            Box::new(RequestedTransport {
                protocol: PROTO_UDP,
            }),
            Box::new(FINGERPRINT),
        ])?;
        let challenge = control.transact(&first)?;
        let mut e = ErrorCodeAttribute::default();
        if challenge.typ.class == CLASS_ERROR_RESPONSE
            && e.get_from(&challenge).is_ok()
            && e.code.0 != 401
        {
            // 437: the server still holds an allocation of an earlier run on this source
            // port (its Refresh 0 lost); the caller retries from another port.
            let kind = if e.code.0 == 437 {
                io::ErrorKind::AddrInUse
            } else {
                io::ErrorKind::Other
            };
            return Err(io::Error::new(
                kind,
                format!(
                    "Allocate: error {} {}",
                    e.code.0,
                    String::from_utf8_lossy(&e.reason)
                ),
            ));
        }
        let realm = TextAttribute::get_from_as(&challenge, ATTR_REALM)
            .map_err(|_| io::Error::other("Allocate: no REALM in the challenge"))?
            .text;
        let nonce = TextAttribute::get_from_as(&challenge, ATTR_NONCE)
            .map_err(|_| io::Error::other("Allocate: no NONCE in the challenge"))?
            .text;
        let mut a = Allocation {
            control,
            relayed: SocketAddr::from(([0, 0, 0, 0], 0)),
            realm,
            nonce,
            creds: creds.clone(),
        };
        let resp = a.request(METHOD_ALLOCATE, |s| {
            s.push(Box::new(RequestedTransport {
                protocol: PROTO_UDP,
            }));
            s.push(Box::new(Lifetime(Duration::from_secs(600))));
        })?;
        check(&resp, "Allocate")?;
        let mut r = RelayedAddress::default();
        r.get_from(&resp)
            .map_err(|_| io::Error::other("Allocate: no XOR-RELAYED-ADDRESS"))?;
        a.relayed = SocketAddr::new(r.ip, r.port);
        Ok(a)
    }

    /// An authenticated request; a 438 (stale nonce) is retried once with the new nonce.
    fn request(
        &mut self,
        method: Method,
        attrs: impl Fn(&mut Vec<Box<dyn Setter>>),
    ) -> io::Result<Message> {
        for _ in 0..2 {
            let mut s: Vec<Box<dyn Setter>> = vec![
                Box::new(TransactionId::new()),
                Box::new(MessageType::new(method, CLASS_REQUEST)),
            ];
            attrs(&mut s);
            s.push(Box::new(TextAttribute::new(
                ATTR_USERNAME,
                self.creds.username.clone(),
            )));
            s.push(Box::new(TextAttribute::new(ATTR_REALM, self.realm.clone())));
            s.push(Box::new(TextAttribute::new(ATTR_NONCE, self.nonce.clone())));
            s.push(Box::new(MessageIntegrity::new_long_term_integrity(
                self.creds.username.clone(),
                self.realm.clone(),
                self.creds.password.clone(),
            )));
            s.push(Box::new(FINGERPRINT));
            let resp = self.control.transact(&build(s)?)?;
            let mut e = ErrorCodeAttribute::default();
            if resp.typ.class == CLASS_ERROR_RESPONSE
                && e.get_from(&resp).is_ok()
                && e.code.0 == 438
                && let Ok(n) = TextAttribute::get_from_as(&resp, ATTR_NONCE)
            {
                self.nonce = n.text;
                continue;
            }
            return Ok(resp);
        }
        Err(io::Error::other("stale nonce twice"))
    }

    /// Refresh with lifetime 0: deletes the allocation. Sent once, not waited for (the
    /// socket may be non-blocking by now; a lost one expires on the server in 10 min).
    pub fn release(&mut self) {
        let msg = {
            let mut s: Vec<Box<dyn Setter>> = vec![
                Box::new(TransactionId::new()),
                Box::new(MessageType::new(METHOD_REFRESH, CLASS_REQUEST)),
                Box::new(Lifetime(Duration::ZERO)),
                Box::new(TextAttribute::new(
                    ATTR_USERNAME,
                    self.creds.username.clone(),
                )),
                Box::new(TextAttribute::new(ATTR_REALM, self.realm.clone())),
                Box::new(TextAttribute::new(ATTR_NONCE, self.nonce.clone())),
            ];
            s.push(Box::new(MessageIntegrity::new_long_term_integrity(
                self.creds.username.clone(),
                self.realm.clone(),
                self.creds.password.clone(),
            )));
            s.push(Box::new(FINGERPRINT));
            build(s)
        };
        if let Ok(m) = msg {
            let _ = self.control.send(&m.raw);
        }
    }

    /// CreatePermission for `peer`.
    pub fn permit(&mut self, peer: SocketAddr) -> io::Result<()> {
        let resp = self.request(METHOD_CREATE_PERMISSION, |s| {
            s.push(Box::new(PeerAddress {
                ip: peer.ip(),
                port: peer.port(),
            }));
        })?;
        check(&resp, "CreatePermission")
    }

    /// ChannelBind `number` to `peer`.
    pub fn bind(&mut self, number: u16, peer: SocketAddr) -> io::Result<()> {
        let resp = self.request(METHOD_CHANNEL_BIND, |s| {
            s.push(Box::new(ChannelNumber(number)));
            s.push(Box::new(PeerAddress {
                ip: peer.ip(),
                port: peer.port(),
            }));
        })?;
        check(&resp, "ChannelBind")
    }
}

/// A Send indication towards `peer` carrying `payload_len` bytes, as a template: the
/// payload starts at the returned offset and may be rewritten in place for every packet
/// (indications have no integrity, so the rest stays valid).
pub fn send_indication(peer: SocketAddr, payload_len: usize) -> io::Result<(Vec<u8>, usize)> {
    let m = build(vec![
        Box::new(TransactionId::new()),
        Box::new(MessageType::new(METHOD_SEND, CLASS_INDICATION)),
        Box::new(PeerAddress {
            ip: peer.ip(),
            port: peer.port(),
        }),
        Box::new(turn::proto::data::Data(vec![0u8; payload_len])),
    ])?;
    let at = data_offset(&m.raw).ok_or_else(|| io::Error::other("no DATA attribute"))?;
    Ok((m.raw, at))
}

/// Where the DATA attribute's value starts in a STUN message (Send or Data indication).
pub fn data_offset(b: &[u8]) -> Option<usize> {
    let len = u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize;
    let end = (20 + len).min(b.len());
    let mut at = 20;
    while at + 4 <= end {
        let typ = u16::from_be_bytes([b[at], b[at + 1]]);
        let alen = u16::from_be_bytes([b[at + 2], b[at + 3]]) as usize;
        if typ == ATTR_DATA.value() {
            return Some(at + 4);
        }
        at += 4 + ((alen + 3) & !3);
    }
    None
}
