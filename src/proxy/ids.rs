//! Typed indices and address roles that cross module boundaries (linkerd2-proxy's `addrs.rs`
//! idea): a tunnel's index cannot be passed where a shard's or a target's is wanted, nor a
//! target's address where a listening one is.
//!
//! Invariants: each index wraps the plain value and nothing more (`Copy`, the same size), so
//! the types cost nothing at run time; the plain value comes out only through `get` (a
//! target's, through `endpoint`; a listen address's, through `inet` or `unix`), at the
//! boundary to code that does not know the type (metrics labels, the socket API). A listen
//! address is configuration, not a hot-path value: it carries a Unix socket's file settings
//! and is cloned, not copied.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::ops::{Index, IndexMut};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::config::UNIX_PREFIX;
use crate::reactor::Endpoint;

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

/// An address this process connects to (a tunnel's target), never one it listens on: a TCP
/// address, or the path of a Unix domain socket. `Copy`, like the address it wraps: a path is
/// interned ([`intern`]) once per configuration, so a connect copies a reference, and no
/// reference count is shared between shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TargetAddr {
    Inet(SocketAddr),
    Unix(&'static Path),
}

impl TargetAddr {
    pub const fn new(a: SocketAddr) -> TargetAddr {
        TargetAddr::Inet(a)
    }
    /// A Unix domain socket's path (interned: see [`intern`]).
    pub fn unix(path: &Path) -> TargetAddr {
        TargetAddr::Unix(intern(path))
    }
    /// The TCP address, if this is one.
    pub const fn inet(self) -> Option<SocketAddr> {
        match self {
            TargetAddr::Inet(a) => Some(a),
            TargetAddr::Unix(_) => None,
        }
    }
    /// What the socket layer connects to.
    pub fn endpoint(self) -> Endpoint<'static> {
        match self {
            TargetAddr::Inet(a) => Endpoint::Tcp(a),
            TargetAddr::Unix(p) => Endpoint::Unix(p),
        }
    }
}

impl From<SocketAddr> for TargetAddr {
    fn from(a: SocketAddr) -> TargetAddr {
        TargetAddr::Inet(a)
    }
}

/// The address, or the socket's path (the `upstream` label of the metrics).
impl fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetAddr::Inet(a) => a.fmt(f),
            TargetAddr::Unix(p) => p.display().fmt(f),
        }
    }
}

/// The paths [`intern`] keeps.
static PATHS: Mutex<BTreeSet<&'static Path>> = Mutex::new(BTreeSet::new());

/// `path`, kept for the life of the process: each distinct path once, however many reloads
/// name it (paths come from configuration, a handful; looked up only when one is read).
pub fn intern(path: &Path) -> &'static Path {
    let mut paths = PATHS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = paths.get(path) {
        return p;
    }
    let p: &'static Path = Box::leak(path.to_path_buf().into_boxed_path());
    paths.insert(p);
    p
}

/// An address a tunnel listens on, as configured, never one it connects to: a TCP address (a
/// port of 0: any free port, which the first bind resolves), or a Unix domain socket
/// (`unix:/run/app/x.sock`) with what its file should look like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Inet(SocketAddr),
    Unix(UnixListen),
}

/// A Unix domain socket to listen on, and what its file should look like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixListen {
    pub path: PathBuf,
    /// Permission bits (`listen_mode`); `None`: as the process's umask leaves them.
    pub mode: Option<u32>,
    /// Owner and group (`listen_owner`, `listen_group`): a name (looked up when the socket is
    /// bound) or a number; `None`: the process's.
    pub owner: Option<String>,
    pub group: Option<String>,
}

impl ListenAddr {
    /// A TCP listen address.
    pub const fn new(a: SocketAddr) -> ListenAddr {
        ListenAddr::Inet(a)
    }
    /// The TCP address, for a TCP listener.
    pub fn inet(&self) -> Option<SocketAddr> {
        match self {
            ListenAddr::Inet(a) => Some(*a),
            ListenAddr::Unix(_) => None,
        }
    }
    /// The Unix socket, for a Unix listener.
    pub fn unix(&self) -> Option<&UnixListen> {
        match self {
            ListenAddr::Inet(_) => None,
            ListenAddr::Unix(u) => Some(u),
        }
    }
    /// The same socket (address or path), whatever its file's mode and owner.
    pub fn same_socket(&self, other: &ListenAddr) -> bool {
        match (self, other) {
            (ListenAddr::Inet(a), ListenAddr::Inet(b)) => a == b,
            (ListenAddr::Unix(a), ListenAddr::Unix(b)) => a.path == b.path,
            _ => false,
        }
    }
    /// Whether a TCP socket bound to `bound` serves this address: the same, or any port of
    /// the same IP when the configured port is 0. Never a Unix socket's.
    pub fn matches(&self, bound: SocketAddr) -> bool {
        self.inet()
            .is_some_and(|a| a == bound || (a.port() == 0 && a.ip() == bound.ip()))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Inet(a) => a.fmt(f),
            ListenAddr::Unix(u) => write!(f, "{UNIX_PREFIX}{}", u.path.display()),
        }
    }
}

/// `path` as [`intern`] keeps it, if a configuration of this process ever named it; never
/// adds one (for paths that come from elsewhere: a moved connection's target).
pub fn interned(path: &Path) -> Option<&'static Path> {
    let paths = PATHS.lock().unwrap_or_else(|e| e.into_inner());
    paths.get(path).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unix_target_is_its_path_interned_once() {
        let a = TargetAddr::unix(Path::new("/run/app/redis.sock"));
        let b = TargetAddr::unix(&std::path::PathBuf::from("/run/app/redis.sock"));
        match (a, b) {
            (TargetAddr::Unix(x), TargetAddr::Unix(y)) => assert!(std::ptr::eq(x, y)),
            _ => panic!("not Unix targets"),
        }
        assert_eq!(a, b);
        assert_eq!(
            a.to_string(),
            "/run/app/redis.sock",
            "the metrics' upstream label"
        );
        assert_eq!(a.inet(), None);
        assert_eq!(
            a.endpoint(),
            Endpoint::Unix(Path::new("/run/app/redis.sock"))
        );
        let t = TargetAddr::from(SocketAddr::from(([10, 0, 0, 1], 80)));
        assert_eq!(t.to_string(), "10.0.0.1:80");
        assert_eq!(
            std::mem::size_of::<TargetAddr>(),
            std::mem::size_of::<SocketAddr>()
        );
    }

    #[test]
    fn a_listen_address_with_port_0_matches_any_port_of_its_ip() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let fixed: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        assert!(ListenAddr::new(any).matches(fixed));
        assert!(ListenAddr::new(fixed).matches(fixed));
        assert!(!ListenAddr::new(fixed).matches("127.0.0.1:7001".parse().unwrap()));
        assert!(!ListenAddr::new(any).matches("127.0.0.2:7000".parse().unwrap()));
        let unix = ListenAddr::Unix(UnixListen {
            path: PathBuf::from("/run/app/in.sock"),
            mode: Some(0o600),
            owner: None,
            group: None,
        });
        assert!(!unix.matches(fixed), "a Unix socket is no TCP address");
        assert_eq!(unix.to_string(), "unix:/run/app/in.sock");
        let other_mode = ListenAddr::Unix(UnixListen {
            mode: None,
            ..unix.unix().unwrap().clone()
        });
        assert!(unix.same_socket(&other_mode) && unix != other_mode);
    }
}
