//! The PROXY protocol, versions 1 and 2 (HAProxy's `doc/proxy-protocol.txt`), sans-I/O: a
//! strict, incremental parser and an encoder.
//!
//! A load balancer in front of an encrypt side names the client it relays in a PROXY header
//! ahead of the client's bytes ([`parse`]); a decrypt side names the same client to its
//! backend in a header it builds from the session's OPEN record ([`encode`]). This is a crate
//! of its own, below the proxy, so that the fuzz crate reaches the parser without the proxy's
//! runtime (tokio, hyper, prometheus).
//!
//! What is accepted, exactly:
//! - Version 1: `PROXY TCP4|TCP6 SRC DST SPORT DPORT\r\n` with exactly one space between
//!   fields, addresses of the announced family, decimal ports without leading zeroes, at most
//!   [`V1_MAX_LEN`] bytes including CRLF; or `PROXY UNKNOWN` followed by CRLF or by a space and
//!   anything up to the first CR, which must be followed by LF. A lone CR or LF never ends a
//!   line.
//! - Version 2: the 12-byte signature, version 2, command LOCAL or PROXY, a family and
//!   transport nibble the spec defines, and a length whose block fits [`MAX_HEADER_LEN`].
//!   PROXY over TCP (INET or INET6, STREAM) yields the addresses; the other defined
//!   combinations (UDP, Unix sockets, UNSPEC) yield none, as the spec's fallback to UNSPEC asks.
//!   After the addresses, the TLVs must tile the rest of the block exactly; their contents are
//!   skipped. LOCAL's block is ignored whole.
//!
//! Invariants:
//! - [`parse`] never panics on any input and never looks past [`MAX_HEADER_LEN`] bytes; every
//!   length read from the wire goes through the checked [`Reader`], nothing indexes by one.
//! - It is incremental and consistent: on every strict prefix of a header it would accept it
//!   answers [`Parse::NeedMore`], never [`Parse::Invalid`]; and it decides on nothing after the
//!   header's last byte (the client's own bytes that follow are not its business).
//! - What [`encode`] writes, [`parse`] accepts, with the same addresses (a pair that is IPv4
//!   or IPv4-mapped IPv6 on both ends as IPv4: see [`Addrs::normalized`]).
#![forbid(unsafe_code)]

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The version 2 signature: the first 12 bytes of every version 2 header.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 line, CRLF included (the spec's worst case, `PROXY UNKNOWN` with two
/// full IPv6 addresses and ports).
pub const V1_MAX_LEN: usize = 107;
/// The longest header accepted: a version 2 header whose 16 fixed bytes, addresses and TLVs
/// take more is refused. The spec allows 16 + 65,535; real senders (HAProxy with its TLS TLVs,
/// cloud load balancers with an endpoint id) stay far below this, and a receiver that stages
/// the header before it forwards anything must bound what it stages.
pub const MAX_HEADER_LEN: usize = 2048;
/// The longest header [`encode`] writes (version 1, two full IPv6 addresses).
pub const MAX_ENCODED_LEN: usize = V1_MAX_LEN;

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_FIXED_LEN: usize = 16;

/// The protocol version of a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// What the sender says the connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// Version 2 LOCAL: the sender opened this connection itself (a health check); the real
    /// connection's endpoints apply.
    Local,
    /// The connection relays a client's (version 1 is always this).
    Proxy,
}

/// The relayed connection's endpoints, as the sender saw them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Addrs {
    /// The client's address.
    pub source: SocketAddr,
    /// The address the client connected to.
    pub destination: SocketAddr,
}

impl Addrs {
    /// The pair in one family, as a header carries it: IPv4 when both ends are IPv4 or
    /// IPv4-mapped IPv6 (`::ffff:a.b.c.d`), else IPv6 with IPv4 ends mapped.
    pub fn normalized(self) -> Addrs {
        let v4 = |ip: IpAddr| match ip {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(a) => a.to_ipv4_mapped(),
        };
        let (s, d) = (self.source, self.destination);
        if let (Some(si), Some(di)) = (v4(s.ip()), v4(d.ip())) {
            return Addrs {
                source: SocketAddr::new(si.into(), s.port()),
                destination: SocketAddr::new(di.into(), d.port()),
            };
        }
        let v6 = |ip: IpAddr| match ip {
            IpAddr::V4(a) => a.to_ipv6_mapped(),
            IpAddr::V6(a) => a,
        };
        Addrs {
            source: SocketAddr::new(v6(s.ip()).into(), s.port()),
            destination: SocketAddr::new(v6(d.ip()).into(), d.port()),
        }
    }
}

/// A parsed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    pub version: Version,
    pub command: Command,
    /// The client's endpoints; `None` for LOCAL, version 1 `UNKNOWN`, and version 2 families
    /// or transports other than TCP over IPv4/IPv6 (the real connection's endpoints apply).
    pub addrs: Option<Addrs>,
}

/// Why a header was refused. The receiver must drop the connection: "any sequence which does
/// not exactly match the protocol must be discarded and cause the receiver to abort".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Invalid {
    /// Neither `PROXY ` nor the version 2 signature: the peer does not speak the protocol.
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// No CRLF within the first 107 bytes.
    #[error("version 1 line without CRLF in its first 107 bytes")]
    V1TooLong,
    /// A CR not followed by LF, or an LF without its CR.
    #[error("version 1 line ended by a lone CR or LF")]
    V1LineEnd,
    /// The protocol is not `TCP4`, `TCP6` or `UNKNOWN`.
    #[error("version 1 protocol is not TCP4, TCP6 or UNKNOWN")]
    V1Protocol,
    /// Missing or extra fields, or a separator other than exactly one space.
    #[error("version 1 line does not have exactly four fields after the protocol")]
    V1Fields,
    /// An address that is not of the announced family in its canonical text form.
    #[error("version 1 address is malformed or of the wrong family")]
    V1Address,
    /// A port that is not a decimal in 0..=65535 without leading zeroes.
    #[error("version 1 port is malformed")]
    V1Port,
    /// The version nibble is not 2.
    #[error("version 2 header with a version other than 2")]
    V2Version,
    /// A command other than LOCAL or PROXY.
    #[error("version 2 header with an unknown command")]
    V2Command,
    /// An address family or transport the spec does not define.
    #[error("version 2 header with an unknown address family or transport")]
    V2Family,
    /// The block is shorter than the announced family's addresses.
    #[error("version 2 address block shorter than its family's addresses")]
    V2Short,
    /// The header would be longer than [`MAX_HEADER_LEN`].
    #[error("version 2 header longer than 2048 bytes")]
    V2TooLong,
    /// The TLVs after the addresses do not tile the rest of the block.
    #[error("version 2 header with a malformed TLV")]
    V2Tlv,
}

impl Invalid {
    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Invalid::NotProxy => "not_proxy",
            Invalid::V1TooLong => "v1_too_long",
            Invalid::V1LineEnd => "v1_line_end",
            Invalid::V1Protocol => "v1_protocol",
            Invalid::V1Fields => "v1_fields",
            Invalid::V1Address => "v1_address",
            Invalid::V1Port => "v1_port",
            Invalid::V2Version => "v2_version",
            Invalid::V2Command => "v2_command",
            Invalid::V2Family => "v2_family",
            Invalid::V2Short => "v2_short",
            Invalid::V2TooLong => "v2_too_long",
            Invalid::V2Tlv => "v2_tlv",
        }
    }
}

/// The outcome of [`parse`] on the bytes received so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parse {
    /// Every byte so far is a valid start of a header: wait for more.
    NeedMore,
    /// A complete header in the first `consumed` bytes; what follows is the client's.
    Done { header: Header, consumed: usize },
    /// Not a valid header, whatever follows.
    Invalid(Invalid),
}

/// A checked reader over untrusted bytes: every read says whether the bytes were there.
#[derive(Clone, Copy, Debug)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    /// The next `n` bytes, or `None` (consuming nothing) if fewer are left.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.rest.split_at_checked(n)?;
        self.rest = rest;
        Some(head)
    }

    pub fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    pub fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

/// Parses the header at the start of `input`, the bytes received so far (see the module doc
/// for what is accepted). Call again with more bytes on [`Parse::NeedMore`].
pub fn parse(input: &[u8]) -> Parse {
    match input.first() {
        None => Parse::NeedMore,
        Some(b'P') => parse_v1(input),
        Some(&b) if b == SIGNATURE[0] => parse_v2(input),
        Some(_) => Parse::Invalid(Invalid::NotProxy),
    }
}

/// True if `input` and `expected` agree on their common length.
fn agrees(input: &[u8], expected: &[u8]) -> bool {
    input.iter().zip(expected).all(|(a, b)| a == b)
}

/// After `PROXY `: the `UNKNOWN` form, whose rest of line is ignored?
fn unknown_form(after_prefix: &[u8]) -> bool {
    match after_prefix.strip_prefix(b"UNKNOWN") {
        Some(rest) => rest.is_empty() || rest.starts_with(b" "),
        None => false,
    }
}

fn parse_v1(input: &[u8]) -> Parse {
    if !agrees(input, V1_PREFIX) {
        return Parse::Invalid(Invalid::NotProxy);
    }
    let window = input.get(..V1_MAX_LEN).unwrap_or(input);
    let after = window.get(V1_PREFIX.len()..).unwrap_or_default();
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        if window.len() >= V1_MAX_LEN {
            return Parse::Invalid(Invalid::V1TooLong);
        }
        // An LF with no CR before it can end no valid line, except inside UNKNOWN's ignored
        // rest (whose token is complete once an LF follows it).
        if after.contains(&b'\n') && !unknown_form(after) {
            return Parse::Invalid(Invalid::V1LineEnd);
        }
        return Parse::NeedMore;
    };
    // The line, CRLF included, is cr + 2 bytes.
    if cr + 2 > V1_MAX_LEN {
        return Parse::Invalid(Invalid::V1TooLong);
    }
    match input.get(cr + 1) {
        None => return Parse::NeedMore,
        Some(b'\n') => {}
        Some(_) => return Parse::Invalid(Invalid::V1LineEnd),
    }
    let consumed = cr + 2;
    // `cr` lies past the prefix: the prefix agreed and holds no CR.
    let line = window.get(V1_PREFIX.len()..cr).unwrap_or_default();
    if unknown_form(line) {
        return done(Version::V1, Command::Proxy, None, consumed);
    }
    if line.contains(&b'\n') {
        return Parse::Invalid(Invalid::V1LineEnd);
    }
    let (v6, fields) = if let Some(f) = line.strip_prefix(b"TCP4 ") {
        (false, f)
    } else if let Some(f) = line.strip_prefix(b"TCP6 ") {
        (true, f)
    } else {
        return Parse::Invalid(Invalid::V1Protocol);
    };
    let mut it = fields.split(|&b| b == b' ');
    let (Some(src), Some(dst), Some(sport), Some(dport), None) =
        (it.next(), it.next(), it.next(), it.next(), it.next())
    else {
        return Parse::Invalid(Invalid::V1Fields);
    };
    let (Some(s), Some(d)) = (v1_ip(src, v6), v1_ip(dst, v6)) else {
        return Parse::Invalid(Invalid::V1Address);
    };
    let (Some(sp), Some(dp)) = (v1_port(sport), v1_port(dport)) else {
        return Parse::Invalid(Invalid::V1Port);
    };
    let addrs = Addrs {
        source: SocketAddr::new(s, sp),
        destination: SocketAddr::new(d, dp),
    };
    done(Version::V1, Command::Proxy, Some(addrs), consumed)
}

/// An address of the announced family in text. IPv4: four decimals without leading zeroes
/// (std's parser refuses those, and anything but digits and dots). IPv6: hex groups, colons,
/// one `::` at most, and an embedded dotted IPv4 tail, which senders write for mapped
/// addresses (`::ffff:192.0.2.1`, as `inet_ntop` does).
fn v1_ip(field: &[u8], v6: bool) -> Option<IpAddr> {
    let text = std::str::from_utf8(field).ok()?;
    if v6 {
        let allowed = |c: char| c.is_ascii_hexdigit() || c == ':' || c == '.';
        if !text.chars().all(allowed) {
            return None;
        }
        text.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
    } else {
        if !text.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return None;
        }
        text.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
    }
}

/// A decimal port in 0..=65535 without leading zeroes (and without the sign `u16`'s parser
/// would take).
fn v1_port(field: &[u8]) -> Option<u16> {
    let leading_zero = field.len() > 1 && field.first() == Some(&b'0');
    if field.is_empty() || field.len() > 5 || leading_zero {
        return None;
    }
    if !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(field).ok()?.parse().ok()
}

fn done(version: Version, command: Command, addrs: Option<Addrs>, consumed: usize) -> Parse {
    Parse::Done {
        header: Header {
            version,
            command,
            addrs,
        },
        consumed,
    }
}

const AF_INET: u8 = 0x1;
const AF_INET6: u8 = 0x2;
const AF_UNIX: u8 = 0x3;
const TRANSPORT_STREAM: u8 = 0x1;
const TRANSPORT_DGRAM: u8 = 0x2;

fn parse_v2(input: &[u8]) -> Parse {
    if !agrees(input, &SIGNATURE) {
        return Parse::Invalid(Invalid::NotProxy);
    }
    let mut r = Reader::new(input);
    if r.take(SIGNATURE.len()).is_none() {
        return Parse::NeedMore;
    }
    let Some(ver_cmd) = r.u8() else {
        return Parse::NeedMore;
    };
    if ver_cmd >> 4 != 2 {
        return Parse::Invalid(Invalid::V2Version);
    }
    let command = match ver_cmd & 0x0f {
        0 => Command::Local,
        1 => Command::Proxy,
        _ => return Parse::Invalid(Invalid::V2Command),
    };
    let Some(fam) = r.u8() else {
        return Parse::NeedMore;
    };
    let (family, transport) = (fam >> 4, fam & 0x0f);
    if family > AF_UNIX || transport > TRANSPORT_DGRAM {
        return Parse::Invalid(Invalid::V2Family);
    }
    let Some(len) = r.u16() else {
        return Parse::NeedMore;
    };
    let len = usize::from(len);
    if V2_FIXED_LEN + len > MAX_HEADER_LEN {
        return Parse::Invalid(Invalid::V2TooLong);
    }
    // The addresses' size by family (ports included for INET and INET6, whatever the
    // transport); UNSPEC has none of its own, and its block is ignored.
    let addr_len = match family {
        AF_INET => Some(2 * 4 + 2 * 2),
        AF_INET6 => Some(2 * 16 + 2 * 2),
        AF_UNIX => Some(2 * 108),
        // AF_UNSPEC
        _ => None,
    };
    if command == Command::Proxy && addr_len.is_some_and(|n| len < n) {
        return Parse::Invalid(Invalid::V2Short);
    }
    let Some(block) = r.take(len) else {
        return Parse::NeedMore;
    };
    let consumed = V2_FIXED_LEN + len;
    let (Command::Proxy, Some(addr_len)) = (command, addr_len) else {
        // LOCAL ("discard the protocol block including the family"), or UNSPEC.
        return done(Version::V2, command, None, consumed);
    };
    let mut b = Reader::new(block);
    let addrs = match (b.take(addr_len), family, transport) {
        (Some(a), AF_INET, TRANSPORT_STREAM) => v2_addrs(a, |b: [u8; 4]| Ipv4Addr::from(b).into()),
        (Some(a), AF_INET6, TRANSPORT_STREAM) => {
            v2_addrs(a, |b: [u8; 16]| Ipv6Addr::from(b).into())
        }
        (Some(_), _, _) => None,
        (None, _, _) => return Parse::Invalid(Invalid::V2Short),
    };
    while !b.is_empty() {
        let tlv = (|| {
            let _kind = b.u8()?;
            let n = b.u16()?;
            b.take(usize::from(n))
        })();
        if tlv.is_none() {
            return Parse::Invalid(Invalid::V2Tlv);
        }
    }
    done(Version::V2, command, addrs, consumed)
}

/// Two addresses of `N` bytes (4 or 16), then two ports.
fn v2_addrs<const N: usize>(block: &[u8], ip: fn([u8; N]) -> IpAddr) -> Option<Addrs> {
    let mut r = Reader::new(block);
    let (s, d) = (ip(r.array()?), ip(r.array()?));
    let (sp, dp) = (r.u16()?, r.u16()?);
    Some(Addrs {
        source: SocketAddr::new(s, sp),
        destination: SocketAddr::new(d, dp),
    })
}

/// An encoded header: at most [`MAX_ENCODED_LEN`] bytes, no allocation.
#[derive(Clone, Copy)]
pub struct Encoded {
    buf: [u8; MAX_ENCODED_LEN],
    len: usize,
}

impl Encoded {
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

impl std::fmt::Debug for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Encoded({:?})", self.as_bytes())
    }
}

/// The header a sender writes for a relayed connection: with `addrs`, version 1 `TCP4`/`TCP6`
/// or version 2 PROXY over TCP (the pair [`Addrs::normalized`] to one family); without,
/// version 1 `PROXY UNKNOWN` or version 2 LOCAL (the receiver then uses the real connection's
/// endpoints).
pub fn encode(version: Version, addrs: Option<Addrs>) -> Encoded {
    let mut e = Encoded {
        buf: [0; MAX_ENCODED_LEN],
        len: 0,
    };
    let mut w = &mut e.buf[..];
    let room = w.len();
    // Writes into the fixed buffer cannot fail: the longest header (version 1, two full IPv6
    // addresses, 104 bytes) fits it.
    let _ = write_header(&mut w, version, addrs.map(Addrs::normalized));
    e.len = room - w.len();
    e
}

fn write_header(w: &mut &mut [u8], version: Version, addrs: Option<Addrs>) -> std::io::Result<()> {
    match (version, addrs) {
        (Version::V1, None) => w.write_all(b"PROXY UNKNOWN\r\n"),
        (Version::V1, Some(a)) => {
            let fam = if a.source.is_ipv4() { "TCP4" } else { "TCP6" };
            write!(
                w,
                "PROXY {fam} {} {} {} {}\r\n",
                a.source.ip(),
                a.destination.ip(),
                a.source.port(),
                a.destination.port()
            )
        }
        (Version::V2, None) => {
            w.write_all(&SIGNATURE)?;
            w.write_all(&[0x20, 0x00, 0, 0])
        }
        (Version::V2, Some(a)) => v2_write(w, a),
    }
}

fn v2_write(w: &mut &mut [u8], a: Addrs) -> std::io::Result<()> {
    w.write_all(&SIGNATURE)?;
    match (a.source.ip(), a.destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            w.write_all(&[0x21, (AF_INET << 4) | TRANSPORT_STREAM, 0, 12])?;
            w.write_all(&s.octets())?;
            w.write_all(&d.octets())?;
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            w.write_all(&[0x21, (AF_INET6 << 4) | TRANSPORT_STREAM, 0, 36])?;
            w.write_all(&v6(s).octets())?;
            w.write_all(&v6(d).octets())?;
        }
    }
    w.write_all(&a.source.port().to_be_bytes())?;
    w.write_all(&a.destination.port().to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn addrs(s: &str, d: &str) -> Addrs {
        Addrs {
            source: sa(s),
            destination: sa(d),
        }
    }

    fn ok(input: &[u8]) -> (Header, usize) {
        match parse(input) {
            Parse::Done { header, consumed } => (header, consumed),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(input)),
        }
    }

    fn bad(input: &[u8]) -> Invalid {
        match parse(input) {
            Parse::Invalid(e) => e,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(input)),
        }
    }

    /// Every strict prefix of `input` needs more.
    fn prefixes_need_more(input: &[u8]) {
        for n in 0..input.len() {
            assert_eq!(parse(&input[..n]), Parse::NeedMore, "prefix of {n}");
        }
    }

    #[test]
    fn the_specs_version_1_examples() {
        // Section 2.1's example, before an HTTP request that is not the parser's business.
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
        let mut input = line.to_vec();
        input.extend_from_slice(b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n");
        let (h, n) = ok(&input);
        assert_eq!(n, line.len());
        assert_eq!(h.version, Version::V1);
        assert_eq!(h.command, Command::Proxy);
        assert_eq!(
            h.addrs,
            Some(addrs("192.168.0.1:56324", "192.168.0.11:443"))
        );
        prefixes_need_more(line);
        // The maximum line lengths of the spec: 56, 104, 15 and 107 bytes.
        let f = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let cases = [
            "PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n".to_string(),
            format!("PROXY TCP6 {f} {f} 65535 65535\r\n"),
            "PROXY UNKNOWN\r\n".to_string(),
            format!("PROXY UNKNOWN {f} {f} 65535 65535\r\n"),
        ];
        for (c, len) in cases.iter().zip([56, 104, 15, 107]) {
            assert_eq!(c.len(), len);
            let (h, n) = ok(c.as_bytes());
            assert_eq!(n, len);
            prefixes_need_more(c.as_bytes());
            assert_eq!(h.addrs.is_none(), c.contains("UNKNOWN"));
        }
        let (h, _) = ok(cases[1].as_bytes());
        assert_eq!(
            h.addrs.unwrap().source.ip(),
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
                .parse::<IpAddr>()
                .unwrap()
        );
    }

    #[test]
    fn version_1_is_parsed_strictly() {
        let cases: &[(&[u8], Invalid)] = &[
            (b"GET / HTTP/1.1\r\n", Invalid::NotProxy),
            (b"PROXYTCP4", Invalid::NotProxy),
            (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", Invalid::NotProxy),
            (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", Invalid::V1Protocol),
            (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", Invalid::V1Protocol),
            (b"PROXY UNKNOWNX\r\n", Invalid::V1Protocol),
            (b"PROXY \r\n", Invalid::V1Protocol),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", Invalid::V1Fields),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", Invalid::V1Fields),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", Invalid::V1Fields),
            (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", Invalid::V1Fields),
            (b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", Invalid::V1Fields),
            // Leading zeroes (octal confusion), wrong families, names, short forms.
            (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", Invalid::V1Address),
            (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", Invalid::V1Address),
            (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", Invalid::V1Address),
            (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", Invalid::V1Address),
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", Invalid::V1Address),
            (b"PROXY TCP6 ::1 ::1::2 1 2\r\n", Invalid::V1Address),
            (b"PROXY TCP6 [::1] ::1 1 2\r\n", Invalid::V1Address),
            (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", Invalid::V1Address),
            (b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", Invalid::V1Address),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", Invalid::V1Port),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", Invalid::V1Port),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", Invalid::V1Port),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", Invalid::V1Port),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 000002\r\n", Invalid::V1Port),
            // A lone CR or LF never ends the line.
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", Invalid::V1LineEnd),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", Invalid::V1LineEnd),
            (b"PROXY TCP4 1.2.3.4\n", Invalid::V1LineEnd),
            (b"PROXY UNKNOWN\rX", Invalid::V1LineEnd),
        ];
        for (input, want) in cases {
            assert_eq!(bad(input), *want, "{:?}", String::from_utf8_lossy(input));
        }
        // Port 0 and 65535, an IPv4-mapped IPv6 address as inet_ntop writes it, upper case hex.
        let (h, _) = ok(b"PROXY TCP6 ::ffff:192.0.2.1 2001:DB8::1 0 65535\r\n");
        let a = h.addrs.unwrap();
        assert_eq!(a.source, sa("[::ffff:192.0.2.1]:0"));
        assert_eq!(a.destination, sa("[2001:db8::1]:65535"));
        // UNKNOWN's rest of line is ignored, whatever it holds (an LF included); its first CR
        // must still be followed by LF.
        let (h, n) = ok(b"PROXY UNKNOWN what\never \x01\xff\r\nrest");
        assert_eq!((h.addrs, n), (None, 28));
        prefixes_need_more(b"PROXY UNKNOWN what\never \x01\xff\r\n");
        // No CRLF in the first 107 bytes: refused as soon as 107 bytes are in.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(106, b'a');
        assert_eq!(parse(&long), Parse::NeedMore);
        long.push(b'\r');
        assert_eq!(bad(&long), Invalid::V1TooLong, "CRLF would end at byte 108");
        long.pop();
        long.push(b'a');
        assert_eq!(bad(&long), Invalid::V1TooLong);
        long.truncate(105);
        long.extend_from_slice(b"\r\n");
        assert_eq!(ok(&long).1, 107);
    }

    /// A version 2 header: `ver_cmd`, `fam`, then `block` with its length.
    fn v2(ver_cmd: u8, fam: u8, block: &[u8]) -> Vec<u8> {
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[ver_cmd, fam]);
        h.extend_from_slice(&(block.len() as u16).to_be_bytes());
        h.extend_from_slice(block);
        h
    }

    #[test]
    fn version_2_over_ipv4_and_ipv6_with_tlvs() {
        let mut block = vec![192, 0, 2, 1, 198, 51, 100, 7, 0x9c, 0x41, 0x01, 0xbb];
        let h4 = v2(0x21, 0x11, &block);
        let (h, n) = ok(&[&h4[..], b"client bytes"].concat());
        assert_eq!(n, 28);
        assert_eq!(h.version, Version::V2);
        assert_eq!(h.command, Command::Proxy);
        assert_eq!(h.addrs, Some(addrs("192.0.2.1:40001", "198.51.100.7:443")));
        prefixes_need_more(&h4);
        // TLVs after the addresses are skipped: an ALPN, a NOOP with padding, an empty one.
        block.extend_from_slice(&[0x01, 0, 2, b'h', b'2', 0x04, 0, 3, 0, 0, 0, 0xea, 0, 0]);
        let with_tlvs = v2(0x21, 0x11, &block);
        let (h, n) = ok(&with_tlvs);
        assert_eq!(n, with_tlvs.len());
        assert_eq!(h.addrs, Some(addrs("192.0.2.1:40001", "198.51.100.7:443")));
        prefixes_need_more(&with_tlvs);
        let mut b6 = Vec::new();
        b6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        b6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        b6.extend_from_slice(&[0xff, 0xff, 0, 0]);
        let h6 = v2(0x21, 0x21, &b6);
        let (h, n) = ok(&h6);
        assert_eq!(n, 52);
        assert_eq!(h.addrs, Some(addrs("[2001:db8::1]:65535", "[::1]:0")));
    }

    #[test]
    fn version_2_local_unspec_and_the_fallback_families() {
        // LOCAL: the block (here an IPv4 one) is ignored, its length still skipped.
        let local = v2(0x20, 0x11, &[1; 12]);
        let (h, n) = ok(&local);
        assert_eq!((h.command, h.addrs, n), (Command::Local, None, 28));
        let (h, n) = ok(&v2(0x20, 0x00, &[]));
        assert_eq!((h.command, h.addrs, n), (Command::Local, None, 16));
        // LOCAL's block is not looked at: not even TLVs.
        assert_eq!(ok(&v2(0x20, 0x00, &[9, 9, 9])).1, 19);
        // PROXY over UDP, Unix sockets or UNSPEC: valid, and no addresses to use.
        for fam in [0x12u8, 0x22, 0x31, 0x32, 0x00, 0x10, 0x01] {
            let len = match fam >> 4 {
                1 => 12,
                2 => 36,
                3 => 216,
                _ => 0,
            };
            let (h, n) = ok(&v2(0x21, fam, &vec![7; len]));
            assert_eq!((h.command, h.addrs, n), (Command::Proxy, None, 16 + len));
        }
    }

    #[test]
    fn version_2_is_parsed_strictly() {
        let block4 = [1u8; 12];
        // Version nibbles other than 2, commands other than LOCAL and PROXY.
        for vc in [0x11u8, 0x31, 0x01, 0xf1, 0x22, 0x2f] {
            let want = if vc >> 4 != 2 {
                Invalid::V2Version
            } else {
                Invalid::V2Command
            };
            assert_eq!(bad(&v2(vc, 0x11, &block4)), want, "{vc:#x}");
            // Refused at the 13th byte already.
            assert_eq!(bad(&v2(vc, 0x11, &block4)[..13]), want);
        }
        // Undefined families and transports, refused at the 14th byte.
        for fam in [0x41u8, 0xf1, 0x13, 0x1f] {
            assert_eq!(bad(&v2(0x21, fam, &block4)[..14]), Invalid::V2Family);
        }
        // Blocks too short for their family, refused as soon as the length is read.
        assert_eq!(bad(&v2(0x21, 0x11, &[0; 11])[..16]), Invalid::V2Short);
        assert_eq!(bad(&v2(0x21, 0x21, &[0; 12])[..16]), Invalid::V2Short);
        assert_eq!(bad(&v2(0x21, 0x31, &[0; 36])[..16]), Invalid::V2Short);
        // Too long for the bound: refused at the 16th byte, without waiting for the block.
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(bad(&h), Invalid::V2TooLong);
        let max = vec![0u8; MAX_HEADER_LEN - 16 - 12 - 3];
        let mut block = block4.to_vec();
        block.extend_from_slice(&[0x20, ((max.len() >> 8) as u8), max.len() as u8]);
        block.extend_from_slice(&max);
        assert_eq!(ok(&v2(0x21, 0x11, &block)).1, MAX_HEADER_LEN);
        block.push(0);
        assert_eq!(bad(&v2(0x21, 0x11, &block)[..16]), Invalid::V2TooLong);
        // TLVs must tile the rest of the block exactly.
        for tail in [
            &[0x01u8][..],
            &[0x01, 0x00],
            &[0x01, 0x00, 0x02, b'x'],
            &[0, 0, 0, 9],
        ] {
            let mut b = block4.to_vec();
            b.extend_from_slice(tail);
            assert_eq!(bad(&v2(0x21, 0x11, &b)), Invalid::V2Tlv, "{tail:?}");
        }
        // A broken signature is refused at its first wrong byte.
        let mut sig = v2(0x21, 0x11, &block4);
        sig[6] = b'X';
        assert_eq!(bad(&sig[..7]), Invalid::NotProxy);
        assert_eq!(bad(b"\r\n\r\nGET"), Invalid::NotProxy);
    }

    #[test]
    fn encodings_are_exact() {
        let a = addrs("192.0.2.1:40001", "198.51.100.7:443");
        assert_eq!(
            encode(Version::V1, Some(a)).as_bytes(),
            b"PROXY TCP4 192.0.2.1 198.51.100.7 40001 443\r\n"
        );
        assert_eq!(
            encode(Version::V2, Some(a)).as_bytes(),
            v2(
                0x21,
                0x11,
                &[192, 0, 2, 1, 198, 51, 100, 7, 0x9c, 0x41, 0x01, 0xbb]
            )
        );
        assert_eq!(encode(Version::V1, None).as_bytes(), b"PROXY UNKNOWN\r\n");
        assert_eq!(encode(Version::V2, None).as_bytes(), v2(0x20, 0x00, &[]));
        let v6 = addrs("[2001:db8::5]:1", "[::1]:2");
        assert_eq!(
            encode(Version::V1, Some(v6)).as_bytes(),
            b"PROXY TCP6 2001:db8::5 ::1 1 2\r\n"
        );
        // A mapped pair goes out as IPv4; a mixed pair as IPv6.
        let mapped = addrs("[::ffff:192.0.2.1]:1", "[::ffff:10.0.0.1]:2");
        assert_eq!(
            encode(Version::V1, Some(mapped)).as_bytes(),
            b"PROXY TCP4 192.0.2.1 10.0.0.1 1 2\r\n"
        );
        let mixed = addrs("192.0.2.1:1", "[2001:db8::1]:2");
        assert_eq!(
            encode(Version::V1, Some(mixed)).as_bytes(),
            b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::1 1 2\r\n"
        );
    }

    #[test]
    fn the_reader_never_reads_past_its_bytes() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16(), Some(0x0102));
        assert_eq!(r.u16(), None);
        assert_eq!(r.take(2), None);
        assert_eq!(r.u8(), Some(3));
        assert!(r.is_empty());
        assert_eq!(r.take(0), Some(&[][..]));
        assert_eq!(r.take(usize::MAX), None);
    }

    proptest! {
        #[test]
        fn encoded_headers_parse_back(
            src in any::<SocketAddr>(),
            dst in any::<SocketAddr>(),
            v2 in any::<bool>(),
            some in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let version = if v2 { Version::V2 } else { Version::V1 };
            let a = some.then_some(Addrs { source: src, destination: dst });
            let e = encode(version, a);
            let mut input = e.as_bytes().to_vec();
            input.extend_from_slice(&tail);
            let Parse::Done { header, consumed } = parse(&input) else {
                panic!("{:?} did not parse", e);
            };
            prop_assert_eq!(consumed, e.as_bytes().len());
            prop_assert_eq!(header.version, version);
            prop_assert_eq!(header.addrs, a.map(Addrs::normalized));
            let local = v2 && !some;
            prop_assert_eq!(header.command == Command::Local, local);
            for n in 0..consumed {
                prop_assert_eq!(parse(&input[..n]), Parse::NeedMore);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_done_is_consistent(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            v1 in any::<bool>(),
        ) {
            let mut input = if v1 { b"PROXY ".to_vec() } else { SIGNATURE.to_vec() };
            input.extend_from_slice(&bytes);
            for n in 0..=input.len() {
                if let Parse::Done { consumed, .. } = parse(&input[..n]) {
                    prop_assert!(consumed <= n && consumed <= MAX_HEADER_LEN);
                }
            }
        }
    }
}
