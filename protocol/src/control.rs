//! Payloads of the control records of version 2: ABORT and OPEN (docs/PROTOCOL.md, "Records").
//!
//! Both travel sealed like DATA, so they are authenticated and ordered with the stream; this
//! module only encodes and strictly decodes their plaintext.
//!
//! - **ABORT** (one byte): the sender's side of the connection was aborted, and why. The
//!   receiver resets its plaintext peer instead of reporting a truncation.
//! - **OPEN** (2, 14 or 38 bytes): the first record the initiator sends, naming the client's
//!   source and destination addresses as the encrypt side saw them (or as a trusted PROXY
//!   header told it).
//!
//! Invariants: decoding accepts exactly the encodings [`AbortReason::to_byte`] and
//! [`OpenInfo::encode`] produce, nothing else (unknown codes, reserved bits, families and
//! lengths are `Malformed`), and never panics.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::error::ProtocolError;

/// Why a side aborted its connection (the one-byte payload of an ABORT record).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AbortReason {
    /// The sender's plaintext peer reset its connection: the encrypt side's client, or the
    /// decrypt side's backend.
    Reset,
    /// The sender (a decrypt side) could not connect to any backend.
    Unreachable,
    /// The sender's idle (or half-closed) timeout expired.
    Timeout,
    /// The sender closed for another reason of its own (a drain deadline at shutdown, a local
    /// error).
    Shutdown,
    /// (A responder only, as the first and last record of its direction.) The session never
    /// opened: the responder closes it (drain, restart, its warm idle limit, a per-source cap)
    /// without having acted on any OPEN, so nothing the initiator sent on it was delivered,
    /// and the initiator may send the same bytes again on another session. docs/PROTOCOL.md,
    /// "Warm sessions".
    Unopened,
}

impl AbortReason {
    /// Every reason, in code order.
    pub const ALL: [AbortReason; 5] = [
        AbortReason::Reset,
        AbortReason::Unreachable,
        AbortReason::Timeout,
        AbortReason::Shutdown,
        AbortReason::Unopened,
    ];

    /// The byte on the wire.
    pub fn to_byte(self) -> u8 {
        match self {
            AbortReason::Reset => 0x01,
            AbortReason::Unreachable => 0x02,
            AbortReason::Timeout => 0x03,
            AbortReason::Shutdown => 0x04,
            AbortReason::Unopened => 0x05,
        }
    }

    /// Parses a code byte.
    pub fn from_byte(b: u8) -> Option<AbortReason> {
        AbortReason::ALL.into_iter().find(|r| r.to_byte() == b)
    }

    /// An ABORT payload: exactly one known code byte.
    pub fn decode(payload: &[u8]) -> Result<AbortReason, ProtocolError> {
        match payload {
            [b] => AbortReason::from_byte(*b).ok_or(ProtocolError::Malformed),
            _ => Err(ProtocolError::Malformed),
        }
    }

    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            AbortReason::Reset => "reset",
            AbortReason::Unreachable => "unreachable",
            AbortReason::Timeout => "timeout",
            AbortReason::Shutdown => "shutdown",
            AbortReason::Unopened => "unopened",
        }
    }
}

/// OPEN flags bit 0: the addresses come from a PROXY protocol header sent by a load balancer
/// the encrypt side trusts, not from its own socket.
pub const OPEN_FLAG_PROXIED: u8 = 0x01;
/// OPEN family byte: no addresses (the encrypt side had none to give, e.g. a PROXY `LOCAL`).
pub const FAMILY_NONE: u8 = 0x00;
/// OPEN family byte: IPv4 addresses follow.
pub const FAMILY_IPV4: u8 = 0x04;
/// OPEN family byte: IPv6 addresses follow.
pub const FAMILY_IPV6: u8 = 0x06;
/// Largest OPEN payload: flags, family, two IPv6 addresses and two ports.
pub const MAX_OPEN_LEN: usize = 2 + 2 * (16 + 2);

/// The client's addresses as the encrypt side saw them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddrs {
    /// The client's address (the peer of the encrypt side's accepted socket).
    pub source: SocketAddr,
    /// The address the client connected to (the encrypt side's local address).
    pub destination: SocketAddr,
}

/// The payload of an OPEN record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct OpenInfo {
    /// The addresses come from a trusted PROXY header, not the encrypt side's socket.
    pub proxied: bool,
    /// The client's addresses; `None` when the encrypt side has none to give.
    pub addrs: Option<ClientAddrs>,
}

impl OpenInfo {
    /// An OPEN naming these addresses, as seen on the encrypt side's own socket. A connection's
    /// two ends are of one family; should they not be, IPv4 is written as IPv4-mapped IPv6.
    pub fn from_socket(source: SocketAddr, destination: SocketAddr) -> OpenInfo {
        OpenInfo {
            proxied: false,
            addrs: Some(ClientAddrs {
                source,
                destination,
            }),
        }
    }

    /// Encodes into `out`, returning the payload length (2, 14 or 38).
    pub fn encode(&self, out: &mut [u8; MAX_OPEN_LEN]) -> usize {
        out[0] = if self.proxied { OPEN_FLAG_PROXIED } else { 0 };
        let Some(a) = self.addrs else {
            out[1] = FAMILY_NONE;
            return 2;
        };
        let (src, dst) = (a.source, a.destination);
        match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                out[1] = FAMILY_IPV4;
                put_v4(&mut out[2..8], s, src.port());
                put_v4(&mut out[8..14], d, dst.port());
                14
            }
            (s, d) => {
                out[1] = FAMILY_IPV6;
                put_v6(&mut out[2..20], to_v6(s), src.port());
                put_v6(&mut out[20..38], to_v6(d), dst.port());
                38
            }
        }
    }

    /// Strictly decodes an OPEN payload.
    pub fn decode(payload: &[u8]) -> Result<OpenInfo, ProtocolError> {
        let [flags, family, rest @ ..] = payload else {
            return Err(ProtocolError::Malformed);
        };
        if flags & !OPEN_FLAG_PROXIED != 0 {
            return Err(ProtocolError::Malformed);
        }
        let proxied = flags & OPEN_FLAG_PROXIED != 0;
        let addrs = match (*family, rest.len()) {
            (FAMILY_NONE, 0) => None,
            (FAMILY_IPV4, 12) => Some(ClientAddrs {
                source: get_v4(&rest[..6]),
                destination: get_v4(&rest[6..]),
            }),
            (FAMILY_IPV6, 36) => Some(ClientAddrs {
                source: get_v6(&rest[..18]),
                destination: get_v6(&rest[18..]),
            }),
            _ => return Err(ProtocolError::Malformed),
        };
        Ok(OpenInfo { proxied, addrs })
    }
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn put_v4(out: &mut [u8], ip: Ipv4Addr, port: u16) {
    out[..4].copy_from_slice(&ip.octets());
    out[4..6].copy_from_slice(&port.to_be_bytes());
}

fn put_v6(out: &mut [u8], ip: Ipv6Addr, port: u16) {
    out[..16].copy_from_slice(&ip.octets());
    out[16..18].copy_from_slice(&port.to_be_bytes());
}

/// `b` is exactly 6 bytes (the caller's match on lengths guarantees it).
fn get_v4(b: &[u8]) -> SocketAddr {
    let mut ip = [0u8; 4];
    ip.copy_from_slice(&b[..4]);
    SocketAddr::new(Ipv4Addr::from(ip).into(), u16::from_be_bytes([b[4], b[5]]))
}

/// `b` is exactly 18 bytes (the caller's match on lengths guarantees it).
fn get_v6(b: &[u8]) -> SocketAddr {
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&b[..16]);
    SocketAddr::new(
        Ipv6Addr::from(ip).into(),
        u16::from_be_bytes([b[16], b[17]]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(o: OpenInfo) -> Vec<u8> {
        let mut buf = [0u8; MAX_OPEN_LEN];
        let n = o.encode(&mut buf);
        assert_eq!(OpenInfo::decode(&buf[..n]), Ok(o));
        buf[..n].to_vec()
    }

    #[test]
    fn open_encodings_round_trip_with_exact_layouts() {
        let v4 = OpenInfo::from_socket(
            "192.0.2.7:40001".parse().unwrap(),
            "10.1.2.3:6379".parse().unwrap(),
        );
        assert_eq!(
            round_trip(v4),
            [0, 4, 192, 0, 2, 7, 0x9c, 0x41, 10, 1, 2, 3, 0x18, 0xeb]
        );
        let v6 = OpenInfo {
            proxied: true,
            ..OpenInfo::from_socket(
                "[2001:db8::1]:1".parse().unwrap(),
                "[::1]:65535".parse().unwrap(),
            )
        };
        let b = round_trip(v6);
        assert_eq!(b.len(), 38);
        assert_eq!(&b[..4], &[1, 6, 0x20, 0x01]);
        assert_eq!(&b[36..], &[0xff, 0xff]);
        assert_eq!(round_trip(OpenInfo::default()), [0, 0]);
        let local = OpenInfo {
            proxied: true,
            addrs: None,
        };
        assert_eq!(round_trip(local), [1, 0]);
    }

    #[test]
    fn mixed_families_become_mapped_ipv6() {
        let o = OpenInfo::from_socket(
            "192.0.2.7:1".parse().unwrap(),
            "[2001:db8::2]:2".parse().unwrap(),
        );
        let mut buf = [0u8; MAX_OPEN_LEN];
        let n = o.encode(&mut buf);
        let back = OpenInfo::decode(&buf[..n]).unwrap().addrs.unwrap();
        assert_eq!(
            back.source,
            "[::ffff:192.0.2.7]:1".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn open_decoding_is_strict() {
        let good = round_trip(OpenInfo::from_socket(
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        ));
        // Every length but the right one, every reserved flag bit, every unknown family.
        for n in 0..good.len() {
            assert_eq!(OpenInfo::decode(&good[..n]), Err(ProtocolError::Malformed));
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(OpenInfo::decode(&long), Err(ProtocolError::Malformed));
        for bit in 1..8 {
            let mut b = good.clone();
            b[0] |= 1 << bit;
            assert_eq!(OpenInfo::decode(&b), Err(ProtocolError::Malformed));
        }
        for family in 0..=255u8 {
            let mut b = good.clone();
            b[1] = family;
            let ok = OpenInfo::decode(&b).is_ok();
            assert_eq!(ok, family == FAMILY_IPV4, "family {family}");
        }
        assert_eq!(OpenInfo::decode(&[0, 0, 0]), Err(ProtocolError::Malformed));
        assert_eq!(
            OpenInfo::decode(&[0, FAMILY_IPV6, 0]),
            Err(ProtocolError::Malformed)
        );
    }

    #[test]
    fn abort_codes_are_strict() {
        for r in AbortReason::ALL {
            assert_eq!(AbortReason::decode(&[r.to_byte()]), Ok(r));
        }
        for b in [0u8, 6, 0x80, 0xff] {
            assert_eq!(AbortReason::decode(&[b]), Err(ProtocolError::Malformed));
        }
        assert_eq!(AbortReason::decode(&[]), Err(ProtocolError::Malformed));
        assert_eq!(AbortReason::decode(&[1, 1]), Err(ProtocolError::Malformed));
    }
}
