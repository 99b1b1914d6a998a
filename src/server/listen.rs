//! The listening sockets: bound here (one SO_REUSEPORT socket per shard and tunnel), passed
//! by systemd (socket activation: one socket shared by every shard), or taken over from a
//! predecessor (`handoff.rs`); and the check that nobody else serves a listen address first.
//!
//! Invariant: a tunnel is served only on a socket the kernel says is listening where the
//! configuration (or systemd's unit) says; an address someone else listens on is refused,
//! naming the holder, never joined silently.

use std::net::SocketAddr;
use std::os::fd::AsFd;

use super::ServerError;
use crate::config::Config;
use crate::reactor::listener::ListenerOptions;

/// Binds one listener per shard for the TCP address `addr` (SO_REUSEPORT); a port of 0 is
/// resolved by the first bind and reused by the others. (A Unix socket is bound by
/// `unix_listen`.)
/// `cpus[i]` is shard i's CPU when its listener steers by SO_INCOMING_CPU (`incoming_cpu`).
/// `inherited` listeners (from a handoff) take the first shards; the rest are bound anew.
/// Inherited ones get this process's SO_INCOMING_CPU choice too (the previous one may differ).
pub(super) fn bind_all(
    tunnel: &str,
    addr: SocketAddr,
    shards: usize,
    cpus: &[Option<usize>],
    inherited: Vec<std::net::TcpListener>,
) -> Result<(SocketAddr, Vec<std::net::TcpListener>), ServerError> {
    let mut out = Vec::with_capacity(shards);
    // The address bound (a port of 0 resolved by the first bind, or by the inherited socket).
    let mut addr = addr;
    if let Some(first) = inherited.first() {
        addr = first.local_addr().map_err(|source| ServerError::Listen {
            tunnel: tunnel.into(),
            addr,
            source,
        })?;
    }
    let start = inherited.len();
    for (i, l) in inherited.iter().enumerate() {
        crate::reactor::listener::set_incoming_cpu(l, cpus.get(i).copied().flatten());
    }
    out.extend(inherited);
    for i in start..shards {
        let opts = ListenerOptions {
            incoming_cpu: cpus.get(i).copied().flatten(),
            ..ListenerOptions::default()
        };
        let l =
            crate::reactor::listener::bind(addr, &opts).map_err(|source| ServerError::Listen {
                tunnel: tunnel.into(),
                addr,
                source,
            })?;
        if i == 0 {
            addr = l.local_addr().map_err(|source| ServerError::Listen {
                tunnel: tunnel.into(),
                addr,
                source,
            })?;
        }
        out.push(l);
    }
    Ok((addr, out))
}

/// systemd's sockets (socket activation), each matched to the tunnel of its name: per tunnel,
/// the socket and the address it listens on. A socket whose name is no tunnel's, or that is
/// not a listening TCP socket, is an error: serving something else than what the unit says
/// would be worse than not starting.
pub(super) fn activated_listeners(
    cfg: &Config,
) -> Result<Vec<Option<(SocketAddr, std::net::TcpListener)>>, ServerError> {
    let mut out: Vec<Option<(SocketAddr, std::net::TcpListener)>> =
        cfg.tunnels.iter().map(|_| None).collect();
    let fds = crate::sys::listen_fds().map_err(|e| ServerError::Activation(e.to_string()))?;
    for (name, fd) in fds {
        let Some(ti) = cfg.tunnels.iter().position(|t| t.name == name) else {
            let names: Vec<&str> = cfg.tunnels.iter().map(|t| t.name.as_str()).collect();
            return Err(ServerError::Activation(format!(
                "systemd passed a socket named {name:?} (FileDescriptorName=, LISTEN_FDNAMES) but no tunnel has that name (tunnels: {}); name each socket after the tunnel that serves it",
                names.join(", ")
            )));
        };
        let t = &cfg.tunnels[ti];
        let addr = crate::sys::check_any_tcp_listener(fd.as_fd())
            .map_err(|e| ServerError::Activation(format!("the socket named {name:?}: {e}")))?;
        if out[ti].is_some() {
            return Err(ServerError::Activation(format!(
                "systemd passed two sockets named {name:?}; a tunnel serves one"
            )));
        }
        if Some(addr) != t.listen.inet() {
            tracing::info!(tunnel = %t.name, listen = %t.listen, socket = %addr, "serving the socket systemd passed; the configured listen address is not bound");
        }
        out[ti] = Some((addr, std::net::TcpListener::from(fd)));
    }
    Ok(out)
}

/// One socket, shared by every shard: each gets a duplicate (one accept queue; the shard
/// whose loop is free first takes each connection). A socket systemd made cannot be split
/// into per-shard SO_REUSEPORT sockets (a socket joins a reuseport group only when it binds,
/// and binding would need the unit's privileges and address again).
pub(super) fn share_activated(
    tunnel: &str,
    addr: SocketAddr,
    l: std::net::TcpListener,
    shards: usize,
) -> Result<(SocketAddr, Vec<std::net::TcpListener>), ServerError> {
    let mut out = Vec::with_capacity(shards);
    for _ in 1..shards {
        out.push(l.try_clone().map_err(|source| ServerError::Listen {
            tunnel: tunnel.into(),
            addr,
            source,
        })?);
    }
    out.insert(0, l);
    tracing::info!(%tunnel, %addr, shards, "listening on a socket passed by systemd");
    Ok((addr, out))
}

/// Refuses to bind `addr` if another socket already listens there. Our listeners set
/// SO_REUSEPORT, so a second process of the same user would otherwise join the first one's
/// group silently and the kernel would split clients between two configurations. A probe bind
/// without SO_REUSEPORT (with SO_REUSEADDR, so sockets in TIME_WAIT do not count) fails with
/// EADDRINUSE exactly when someone listens on the address (or on the wildcard address).
pub(super) fn check_not_served(tunnel: &str, addr: SocketAddr) -> Result<(), ServerError> {
    use socket2::{Domain, Protocol, Socket, Type};
    if addr.port() == 0 {
        return Ok(());
    }
    let listen_err = |source| ServerError::Listen {
        tunnel: tunnel.into(),
        addr,
        source,
    };
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(listen_err)?;
    probe.set_reuse_address(true).map_err(listen_err)?;
    if addr.is_ipv6() {
        probe.set_only_v6(true).map_err(listen_err)?;
    }
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(ServerError::InUse {
            tunnel: tunnel.into(),
            addr,
            holder: listener_process(addr).unwrap_or_else(|| {
                "another socket (its process is not visible to this user)".into()
            }),
        }),
        // The real bind would fail the same way; let it say so.
        Err(_) => Ok(()),
    }
}

/// "pid N (comm)" of a process with a socket listening on `addr` (or on the wildcard address
/// of its family, or a dual-stack one), from /proc/net/tcp{,6} and /proc/*/fd.
fn listener_process(addr: SocketAddr) -> Option<String> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    // /proc/net/tcp prints each 32-bit word of an address as a native-endian hex number.
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_ne_bytes);
    let parse_ip = |h: &str| -> Option<IpAddr> {
        match h.len() {
            8 => Some(IpAddr::V4(Ipv4Addr::from(word(h)?))),
            32 => {
                let mut b = [0u8; 16];
                for (i, c) in b.chunks_mut(4).enumerate() {
                    c.copy_from_slice(&word(&h[i * 8..i * 8 + 8])?);
                }
                Some(IpAddr::V6(Ipv6Addr::from(b)))
            }
            _ => None,
        }
    };
    let covers = |theirs: IpAddr| {
        let mapped = |ip: IpAddr| match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (theirs, ours) = (mapped(theirs), mapped(addr.ip()));
        theirs == ours || theirs.is_unspecified() || ours.is_unspecified()
    };
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... uid timeout inode; st 0A = LISTEN
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let Some((ip, port)) = f[1].split_once(':') else {
                continue;
            };
            let (Some(ip), Ok(port)) = (parse_ip(ip), u16::from_str_radix(port, 16)) else {
                continue;
            };
            if port == addr.port() && covers(ip) {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for proc_dir in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = proc_dir.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_dir.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                let comm =
                    std::fs::read_to_string(proc_dir.path().join("comm")).unwrap_or_default();
                return Some(format!("pid {pid} ({})", comm.trim()));
            }
        }
    }
    None
}
