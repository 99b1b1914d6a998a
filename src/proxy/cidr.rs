//! Address ranges in CIDR notation and lists of them: the `trusted_proxies` of a tunnel that
//! accepts PROXY headers, and the `allow` / `deny` access lists.
//!
//! Written as `10.0.0.0/8`, `2001:db8::/32`, or a bare address (`192.0.2.7`, `::1`: one host).
//!
//! Invariants:
//! - Families stay apart: an IPv4 range matches IPv4 clients, whether the socket reports them
//!   as IPv4 or as IPv4-mapped IPv6 (`::ffff:a.b.c.d`, which a dual-stack listener does); an
//!   IPv6 range matches IPv6 clients only, so `::/0` is "every IPv6 client", not everyone. An
//!   IPv6 range written inside `::ffff:0:0/96` is the IPv4 range it maps.
//! - Parsing is strict: a range with bits set below its prefix (`10.0.0.1/8`) is refused with
//!   the network it probably meant, rather than silently widened or narrowed.
//! - Matching allocates nothing; a list is checked in order, once per accepted connection.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// One address range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cidr {
    V4 { net: u32, prefix: u8 },
    V6 { net: u128, prefix: u8 },
}

/// Why a range did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error(
        "{0:?} is not an address or a CIDR range (like 10.0.0.0/8, 2001:db8::/32 or 192.0.2.7)"
    )]
    Syntax(String),
    #[error("{text:?}: the prefix length must be at most {max}")]
    Prefix { text: String, max: u8 },
    #[error("{text:?} has bits set after its prefix; the range is {net}")]
    HostBits { text: String, net: Cidr },
}

/// The mask of a `prefix`-bit network in a `BITS`-wide address (`prefix <= BITS <= 128`).
fn mask<const BITS: u32>(prefix: u8) -> u128 {
    match u32::from(prefix).min(BITS) {
        0 => 0,
        p => (u128::MAX << (128 - p)) >> (128 - BITS),
    }
}

/// An IPv4 address for matching: IPv4, or IPv4-mapped IPv6.
fn as_v4(ip: IpAddr) -> Result<u32, u128> {
    match ip {
        IpAddr::V4(a) => Ok(u32::from(a)),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => Ok(u32::from(v4)),
            None => Err(u128::from(a)),
        },
    }
}

impl Cidr {
    /// True if `ip` lies in this range (see the module doc for the families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (*self, as_v4(ip)) {
            (Cidr::V4 { net, prefix }, Ok(a)) => {
                u128::from(a) & mask::<32>(prefix) == u128::from(net)
            }
            (Cidr::V6 { net, prefix }, Err(a)) => a & mask::<128>(prefix) == net,
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let syntax = || CidrError::Syntax(text.to_owned());
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => {
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(syntax());
                }
                (a, Some(p.parse::<u8>().map_err(|_| syntax())?))
            }
            None => (text, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| syntax())?;
        let (bits, value) = match ip {
            IpAddr::V4(a) => (32u8, u128::from(u32::from(a))),
            IpAddr::V6(a) => (128u8, u128::from(a)),
        };
        let prefix = prefix.unwrap_or(bits);
        if prefix > bits {
            return Err(CidrError::Prefix {
                text: text.to_owned(),
                max: bits,
            });
        }
        let net = match ip {
            IpAddr::V4(_) => value & mask::<32>(prefix),
            IpAddr::V6(_) => value & mask::<128>(prefix),
        };
        let cidr = match ip {
            IpAddr::V4(_) => Cidr::V4 {
                net: net as u32,
                prefix,
            },
            // Inside ::ffff:0:0/96: the IPv4 range it maps.
            IpAddr::V6(_) if prefix >= 96 && net >> 32 == 0xffff => Cidr::V4 {
                net: net as u32,
                prefix: prefix - 96,
            },
            IpAddr::V6(_) => Cidr::V6 { net, prefix },
        };
        if net != value {
            return Err(CidrError::HostBits {
                text: text.to_owned(),
                net: cidr,
            });
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Cidr::V4 { net, prefix } => write!(f, "{}/{prefix}", Ipv4Addr::from(net)),
            Cidr::V6 { net, prefix } => write!(f, "{}/{prefix}", Ipv6Addr::from(net)),
        }
    }
}

/// A list of ranges; an address is in the list if it is in any of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CidrList(Box<[Cidr]>);

impl CidrList {
    /// Parses every entry; an error names the entry's index (from 0) and why.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<CidrList, (usize, CidrError)> {
        items
            .iter()
            .enumerate()
            .map(|(i, s)| s.as_ref().parse().map_err(|e| (i, e)))
            .collect::<Result<Vec<Cidr>, _>>()
            .map(|v| CidrList(v.into_boxed_slice()))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Cidr> {
        self.0.iter()
    }
}

impl fmt::Display for CidrList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            c.fmt(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_parse_and_print() {
        assert_eq!(
            c("10.0.0.0/8"),
            Cidr::V4 {
                net: 0x0a00_0000,
                prefix: 8
            }
        );
        assert_eq!(c("192.0.2.7").to_string(), "192.0.2.7/32");
        assert_eq!(c("::1").to_string(), "::1/128");
        assert_eq!(c("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(c("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(c("::/0").to_string(), "::/0");
        // Inside ::ffff:0:0/96: the IPv4 range it maps.
        assert_eq!(c("::ffff:10.0.0.0/104"), c("10.0.0.0/8"));
        assert_eq!(c("::ffff:192.0.2.7"), c("192.0.2.7/32"));
        assert_eq!(c("::ffff:0:0/96"), c("0.0.0.0/0"));
    }

    #[test]
    fn bad_ranges_say_why() {
        for bad in [
            "",
            "10.0.0.0/",
            "10.0.0.0/8/8",
            "10.0.0/8",
            "10.0.0.0/+8",
            "10.0.0.0/ 8",
            " 10.0.0.0/8",
            "10.0.0.0/-1",
            "example.com",
            "fe80::1%eth0",
            "[::1]",
            "::1/1280",
            "10.0.0.0/1000",
        ] {
            let e = bad.parse::<Cidr>().unwrap_err();
            assert!(matches!(e, CidrError::Syntax(_)), "{bad:?}: {e}");
        }
        assert_eq!(
            "10.0.0.0/33".parse::<Cidr>().unwrap_err().to_string(),
            "\"10.0.0.0/33\": the prefix length must be at most 32"
        );
        assert!(matches!(
            "::/129".parse::<Cidr>(),
            Err(CidrError::Prefix { max: 128, .. })
        ));
        assert_eq!(
            "10.0.0.1/8".parse::<Cidr>().unwrap_err().to_string(),
            "\"10.0.0.1/8\" has bits set after its prefix; the range is 10.0.0.0/8"
        );
        assert!(matches!(
            "2001:db8::1/32".parse::<Cidr>(),
            Err(CidrError::HostBits { .. })
        ));
    }

    #[test]
    fn matching_by_family_with_mapped_ipv4_as_ipv4() {
        let ten = c("10.0.0.0/8");
        assert!(ten.contains(ip("10.255.0.1")));
        assert!(ten.contains(ip("::ffff:10.1.2.3")), "mapped IPv4 is IPv4");
        assert!(!ten.contains(ip("11.0.0.1")));
        assert!(!ten.contains(ip("::a00:1")), "IPv4-compatible is IPv6");
        let host = c("192.0.2.7");
        assert!(host.contains(ip("192.0.2.7")));
        assert!(!host.contains(ip("192.0.2.8")));
        let all4 = c("0.0.0.0/0");
        assert!(all4.contains(ip("1.2.3.4")) && all4.contains(ip("::ffff:1.2.3.4")));
        assert!(!all4.contains(ip("::1")));
        let all6 = c("::/0");
        assert!(all6.contains(ip("2001:db8::1")) && all6.contains(ip("::1")));
        assert!(!all6.contains(ip("1.2.3.4")), "::/0 is every IPv6 client");
        assert!(!all6.contains(ip("::ffff:1.2.3.4")));
        let doc = c("2001:db8::/32");
        assert!(doc.contains(ip("2001:db8:ffff::1")));
        assert!(!doc.contains(ip("2001:db9::1")));
        let lo = c("::1");
        assert!(lo.contains(ip("::1")) && !lo.contains(ip("::2")));
        let odd = c("192.168.0.0/23");
        assert!(odd.contains(ip("192.168.1.255")) && !odd.contains(ip("192.168.2.0")));
        let odd6 = c("2001:db8:8000::/33");
        assert!(odd6.contains(ip("2001:db8:ffff::1")) && !odd6.contains(ip("2001:db8:7fff::1")));
    }

    #[test]
    fn lists_match_any_entry_and_name_the_bad_one() {
        let l = CidrList::parse(&["10.0.0.0/8", "::1", "192.0.2.0/24"]).unwrap();
        assert_eq!(l.len(), 3);
        assert!(l.contains(ip("10.1.1.1")) && l.contains(ip("::1")));
        assert!(l.contains(ip("::ffff:192.0.2.200")));
        assert!(!l.contains(ip("172.16.0.1")) && !l.contains(ip("::2")));
        assert_eq!(l.to_string(), "10.0.0.0/8, ::1/128, 192.0.2.0/24");
        let (i, e) = CidrList::parse(&["10.0.0.0/8", "nope"]).unwrap_err();
        assert_eq!(i, 1);
        assert!(matches!(e, CidrError::Syntax(_)));
        let empty = CidrList::parse::<&str>(&[]).unwrap();
        assert!(empty.is_empty() && !empty.contains(ip("1.2.3.4")));
    }
}
