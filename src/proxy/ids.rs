//! Typed indices and address roles that cross module boundaries (linkerd2-proxy's `addrs.rs`
//! idea): a tunnel's index cannot be passed where a shard's or a target's is wanted, nor a
//! target's address where a listening one is.
//!
//! Invariants: each wraps the plain value and nothing more (`Copy`, the same size), so the
//! types cost nothing at run time; the plain value comes out only through `get`, at the
//! boundary to code that does not know the type (metrics labels, the socket API).

use std::fmt;
use std::net::SocketAddr;
use std::ops::{Index, IndexMut};

use super::TunnelRt;
use super::upstream::Target;

/// A tunnel's position in the configuration, and in each shard's `tunnels`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TunnelIdx(usize);

impl TunnelIdx {
    pub const fn new(i: usize) -> TunnelIdx {
        TunnelIdx(i)
    }
    pub const fn get(self) -> usize {
        self.0
    }
}

impl Index<TunnelIdx> for Vec<TunnelRt> {
    type Output = TunnelRt;
    fn index(&self, i: TunnelIdx) -> &TunnelRt {
        &self[i.0]
    }
}

impl IndexMut<TunnelIdx> for Vec<TunnelRt> {
    fn index_mut(&mut self, i: TunnelIdx) -> &mut TunnelRt {
        &mut self[i.0]
    }
}

/// A shard's number (its thread, its loop, its label on per-shard metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShardIdx(usize);

impl ShardIdx {
    pub const fn new(i: usize) -> ShardIdx {
        ShardIdx(i)
    }
    pub const fn get(self) -> usize {
        self.0
    }
}

impl fmt::Display for ShardIdx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A target's position in its tunnel's current list, and in the tunnel's per-upstream metric
/// handles. A reload may move a target: connections and probes hold its
/// [`TargetId`](super::upstream::TargetId), and find its index again when they need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TargetIdx(usize);

impl TargetIdx {
    pub const fn new(i: usize) -> TargetIdx {
        TargetIdx(i)
    }
    pub const fn get(self) -> usize {
        self.0
    }
}

impl Index<TargetIdx> for [Target] {
    type Output = Target;
    fn index(&self, i: TargetIdx) -> &Target {
        &self[i.0]
    }
}

/// An address this process connects to (a tunnel's target), never one it listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TargetAddr(SocketAddr);

impl TargetAddr {
    pub const fn new(a: SocketAddr) -> TargetAddr {
        TargetAddr(a)
    }
    pub const fn get(self) -> SocketAddr {
        self.0
    }
}

impl fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An address a tunnel listens on, as configured (a port of 0: any free port, which the first
/// bind resolves), never one it connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenAddr(SocketAddr);

impl ListenAddr {
    pub const fn new(a: SocketAddr) -> ListenAddr {
        ListenAddr(a)
    }
    pub const fn get(self) -> SocketAddr {
        self.0
    }
    /// Whether a socket bound to `bound` serves this address: the same, or any port of the
    /// same IP when the configured port is 0.
    pub fn matches(self, bound: SocketAddr) -> bool {
        self.0 == bound || (self.0.port() == 0 && self.0.ip() == bound.ip())
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listen_address_with_port_0_matches_any_port_of_its_ip() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let fixed: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        assert!(ListenAddr::new(any).matches(fixed));
        assert!(ListenAddr::new(fixed).matches(fixed));
        assert!(!ListenAddr::new(fixed).matches("127.0.0.1:7001".parse().unwrap()));
        assert!(!ListenAddr::new(any).matches("127.0.0.2:7000".parse().unwrap()));
    }
}
