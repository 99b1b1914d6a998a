//! Socket helpers shared by the scenarios: address parsing, connecting, error kinds, tokens.

use anyhow::{Context, Result};
use std::io;
use std::net::{SocketAddr, TcpStream as StdStream, ToSocketAddrs};
use std::time::Duration;

/// Resolves a `host:port` target to its first address.
pub fn resolve(target: &str) -> Result<SocketAddr> {
    target
        .to_socket_addrs()
        .with_context(|| format!("bad address {target:?}"))?
        .next()
        .with_context(|| format!("{target:?} resolves to nothing"))
}

/// A blocking connect with a deadline, handed over to mio as a non-blocking stream.
pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<mio::net::TcpStream> {
    let s = StdStream::connect_timeout(&addr, timeout)?;
    s.set_nodelay(true)?;
    s.set_nonblocking(true)?;
    Ok(mio::net::TcpStream::from_std(s))
}

/// The failure kinds reports count by.
pub fn classify(e: &io::Error) -> &'static str {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "refused",
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => "reset",
        TimedOut => "timeout",
        _ => "other",
    }
}

/// True when an I/O call should simply be retried (EINTR) rather than treated as a failure.
pub fn interrupted(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
}

/// Tokens carry a generation in their upper half so that an event for a closed connection never
/// reaches the connection that later reuses its slot.
pub fn token(slot: usize, generation: u32) -> mio::Token {
    mio::Token(slot | ((generation as usize) << 32))
}

/// The (slot, generation) a token names.
pub fn untoken(t: mio::Token) -> (usize, u32) {
    (t.0 & 0xFFFF_FFFF, (t.0 >> 32) as u32)
}
