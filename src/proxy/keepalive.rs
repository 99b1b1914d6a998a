//! TCP keepalive and TCP_USER_TIMEOUT ([`Keepalive`]) on a socket: how a connection notices a
//! peer that vanished without a FIN or a reset.
//!
//! Invariants:
//! - Both sockets of every connection carry the tunnel's settings: a listener's, which the
//!   sockets it accepts inherit from it (Linux copies SO_KEEPALIVE, TCP_KEEPIDLE,
//!   TCP_KEEPINTVL, TCP_KEEPCNT and TCP_USER_TIMEOUT from the listener at accept, so accepting
//!   costs no system call for them), and an upstream socket's, set right after its
//!   non-blocking connect starts (the connection's `Env::connect`, in `conn/mod.rs`).
//! - A reload sets them again on the listeners (`server`): connections accepted afterwards get
//!   the new values; open ones keep theirs.
//! - When the kernel gives up on a peer, the socket reports ETIMEDOUT; the connection counts it
//!   as `peer_timeout` (`sealpipe_connections_closed_total`).

use std::io;
use std::os::fd::AsFd;

use socket2::{SockRef, TcpKeepalive};

use crate::config::Keepalive;

/// Sets `k` on `sock` (a listener, or a connecting or connected TCP socket).
pub fn apply(sock: &impl AsFd, k: &Keepalive) -> io::Result<()> {
    let s = SockRef::from(sock);
    match k.idle {
        Some(idle) => s.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(idle)
                .with_interval(k.interval)
                .with_retries(k.count),
        )?,
        None => s.set_keepalive(false)?,
    }
    s.set_tcp_user_timeout(k.user_timeout)
}
