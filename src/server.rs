//! Shards and the control plane.
//!
//! One shard per CPU of the process's affinity mask (or `threads`), each a thread (pinned to
//! one CPU with core_affinity if `pin`), owning an `EventBase`, one SO_REUSEPORT listener per
//! tunnel, its buffer pool (thread-local), its connections and its metric handles. The thread that calls
//! [`Running::wait`] is the control thread: it owns the signals (as reactor signal events) and
//! talks to shards only through their `Handle`s.
//!
//! - SIGTERM/SIGINT: drain — every listener accepts what the kernel already queued, then
//!   closes; open connections finish until the drain timeout, then are cut (counted as
//!   `drain_deadline`); exit 0. A second SIGTERM/SIGINT exits at once (status 1).
//! - SIGHUP: reload the config file (or, from the command line, the key files); a bad file is
//!   rejected whole and the old configuration stays.
//! - A shard that panics takes the process down (status 70) — never a half-alive process.
//! - A listen address another socket already listens on is refused at start (naming the
//!   process that holds it), unless this process takes that address over by handoff.
//! - Handoff (`--handoff PATH`, [`start_with`]): a new process takes the listening sockets of
//!   the one listening on PATH over SCM_RIGHTS; the old one lets go only after the new one's
//!   shards accept on them, then drains. The protocol is described above `take_listeners`
//!   and in docs/OPERATIONS.md.
//! - Shards run unpinned and their SO_REUSEPORT listeners share connections by hash, unless
//!   `pin` (each shard thread on one CPU of the mask) and `incoming_cpu` (each pinned shard's
//!   listener carries SO_INCOMING_CPU = its CPU) ask for CPU locality.
//! - `max_conns` is exact: per-shard shares add up to it, and a process never runs more shards
//!   than `max_conns` (a share of 0 would never accept).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{Config, ConfigError, Resolve, SystemResolver};
use crate::metrics::Metrics;
use crate::protocol::KeySet;
use crate::proxy::conn::{TAG_ABORT, TAG_LIMITS};
use crate::proxy::listener::{TAG_DRAIN, TAG_RESUME, TunnelListener};
use crate::proxy::ratelimit::{RateBoard, RateLimits, Rebalancer};
use crate::proxy::{ShardIdx, ShardState, TunnelIdx, TunnelRt};
use crate::reactor::listener::{ConnListener, ListenerOptions};
use crate::reactor::signal::SignalEvent;
use crate::reactor::{EventBase, Handle, HandlerId, LoopStats, pool};

/// How often a shard flushes counters and publishes its heartbeat.
const HOUSEKEEPING: Duration = Duration::from_millis(250);
/// Chunks freed (beyond the pool's cache) since the last heap trim that justify another.
const TRIM_AFTER_CHUNKS: u64 = 64;
/// Connections hibernated since the last heap trim that justify another, once no more are
/// hibernating: each freed 1-2 KiB of keys and buffer lists, holes that new connections reuse
/// while connections keep arriving, and that only a trim returns after the burst.
const TRIM_AFTER_HIBERNATIONS: u64 = 256;
/// A shard whose buffers hold at most this many chunks is quiet...
const QUIET_LIVE_CHUNKS: usize = 16;
/// ...and after this many quiet housekeeping ticks (2 s) its chunk cache shrinks to...
const QUIET_TICKS: u32 = 8;
/// ...this many chunks (cached chunks are resident memory an idle proxy does not need).
const QUIET_CACHED_CHUNKS: usize = 8;

/// Heap trims that shards ask for and the control thread does. `malloc_trim` walks every
/// glibc arena under that arena's lock: on a shard thread it would stall the shard, outside
/// any loop turn the stall metric sees. On the control thread it holds one arena's lock at a
/// time, and a shard that allocates meanwhile waits inside a callback, where a long wait
/// counts as a stall.
#[derive(Default)]
struct HeapTrim {
    wanted: AtomicBool,
}

/// Most heap trims per second of the whole process.
const TRIM_EVERY: Duration = Duration::from_secs(1);

impl HeapTrim {
    /// A shard freed enough since the last trim (see [`MemoryKeeper`]).
    fn request(&self) {
        self.wanted.store(true, Ordering::Release);
    }

    /// On the control thread: trims if a shard asked and the last trim was at least
    /// [`TRIM_EVERY`] ago. Returns how long the trim took.
    fn run_due(&self, now: Instant, next: &mut Instant) -> Option<Duration> {
        if now < *next || !self.wanted.swap(false, Ordering::AcqRel) {
            return None;
        }
        crate::sys::trim_heap();
        let took = now.elapsed();
        *next = now + TRIM_EVERY;
        Some(took)
    }
}

/// Gives memory back after bursts: freed heap pages to the kernel (by asking the control
/// thread for a trim), and the chunk cache of a shard that has gone quiet. A busy shard keeps
/// its cache (no allocation per chunk).
#[derive(Default)]
struct MemoryKeeper {
    next_trim: Option<Instant>,
    trimmed_at: u64,
    /// The shard's hibernation count at the last trim, and at the last tick.
    trimmed_hibernations: u64,
    seen_hibernations: u64,
    quiet_ticks: u32,
}

impl MemoryKeeper {
    /// `hibernations`: connections this shard has hibernated so far.
    fn tick(&mut self, now: Instant, hibernations: u64, trim: &HeapTrim) -> pool::PoolStats {
        let p = pool::stats();
        if p.live_chunks <= QUIET_LIVE_CHUNKS && p.cached_chunks > QUIET_CACHED_CHUNKS {
            self.quiet_ticks += 1;
        } else {
            self.quiet_ticks = 0;
        }
        if self.quiet_ticks >= QUIET_TICKS {
            self.quiet_ticks = 0;
            pool::set_max_cached(QUIET_CACHED_CHUNKS);
            pool::set_max_cached(pool::DEFAULT_MAX_CACHED);
        }
        let p = pool::stats();
        // Freed chunks and hibernated connections' keys stay resident in the heap: have them
        // handed back to the kernel, at most once a second, and only when a good number were
        // freed since the last time.
        let settled = hibernations == self.seen_hibernations;
        self.seen_hibernations = hibernations;
        let freed = p.freed_total >= self.trimmed_at + TRIM_AFTER_CHUNKS
            || (settled && hibernations >= self.trimmed_hibernations + TRIM_AFTER_HIBERNATIONS);
        if freed && self.next_trim.is_none_or(|t| now >= t) {
            trim.request();
            self.trimmed_at = p.freed_total;
            self.trimmed_hibernations = hibernations;
            self.next_trim = Some(now + Duration::from_secs(1));
        }
        p
    }
}
/// A callback that runs longer than this counts as a stall (`sealpipe_loop_stall_total`).
const STALL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("tunnel {tunnel:?}: cannot listen on {addr}: {source}")]
    Listen {
        tunnel: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "tunnel {tunnel:?}: cannot listen on {addr}: address in use by {holder}; stop it first, or start this process with --handoff PATH to take its sockets over"
    )]
    InUse {
        tunnel: String,
        addr: SocketAddr,
        /// Who listens there, as far as /proc tells.
        holder: String,
    },
    #[error("metrics endpoint: cannot listen on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start shard {shard}: {source}")]
    Shard {
        shard: usize,
        source: std::io::Error,
    },
    #[error("control loop failed: {0}")]
    Control(std::io::Error),
    #[error("handoff over {path}: {message}")]
    Handoff { path: PathBuf, message: String },
    #[error("socket activation: {0}")]
    Activation(String),
    #[error("tunnel {tunnel:?}: cannot listen on a Unix socket: {source}")]
    Unix {
        tunnel: String,
        source: crate::unix_listen::UnixListenError,
    },
}

/// A shard's listening socket for one tunnel: TCP, or a Unix domain socket.
enum Bound {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// A callback the control thread runs on SIGHUP to change the log filter.
pub type LogReload = Box<dyn Fn(&str) -> Result<(), String> + Send>;

/// What the server needs of the process's logging (set up by the command line).
pub struct LogControl {
    /// Changes the log filter (on SIGHUP).
    pub reload: LogReload,
    /// Log lines dropped so far because the writer's bounded queue was full (stderr not
    /// keeping up): counted in `sealpipe_log_lines_dropped_total`.
    pub dropped: Box<dyn Fn() -> u64 + Send>,
    /// Writes out the queued lines (a bounded wait); run before an abrupt exit, so that the
    /// line saying why is not lost.
    pub flush: Arc<dyn Fn() + Send + Sync>,
}

/// Exits at once with `code`, after flushing the logs.
fn exit_now(code: i32, flush: Option<&(dyn Fn() + Send + Sync)>) -> ! {
    if let Some(f) = flush {
        f();
    }
    std::process::exit(code)
}

struct Shard {
    handle: Handle<ShardState>,
    thread: Option<JoinHandle<()>>,
}

/// A started server: shards running, listeners bound.
pub struct Running {
    cfg: Config,
    metrics: Arc<Metrics>,
    shards: Vec<Shard>,
    /// Per tunnel: the address actually bound (port 0 resolved); `0.0.0.0:0` for a tunnel
    /// that listens on a Unix socket (its path is the configuration's).
    pub listen_addrs: Vec<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    running: Arc<AtomicUsize>,
    log: Option<LogControl>,
    /// Present while this process can hand its listeners to a successor.
    handoff: Option<HandoffServer>,
    /// Heap trims the shards ask the control thread for.
    trim: Arc<HeapTrim>,
    /// Per tunnel: a duplicate of each shard's listening socket, on which a reload sets the
    /// tunnel's new socket options (keepalive); dropped when draining starts, so that a
    /// stopped process keeps no listening socket open.
    listeners: Vec<Vec<OwnedFd>>,
    /// Target names resolved again while running (`resolver`).
    refresher: crate::resolver::Refresher,
    /// The rate limits' shares, moved to the shards that carry the traffic (`ratelimit`).
    rates: Rebalancer,
    /// The Unix sockets this process bound, removed when it exits.
    unix_files: Vec<crate::unix_listen::SocketFile>,
}

/// Binds one listener per shard for `addr` (SO_REUSEPORT); a port of 0 is resolved by the
/// first bind and reused by the others.
/// `cpus[i]` is shard i's CPU when its listener steers by SO_INCOMING_CPU (`incoming_cpu`).
/// `inherited` listeners (from a handoff) take the first shards; the rest are bound anew.
/// Inherited ones get this process's SO_INCOMING_CPU choice too (the previous one may differ).
fn bind_all(
    tunnel: &str,
    addr: SocketAddr,
    shards: usize,
    cpus: &[Option<usize>],
    inherited: Vec<std::net::TcpListener>,
) -> Result<(SocketAddr, Vec<std::net::TcpListener>), ServerError> {
    let mut out = Vec::with_capacity(shards);
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
fn activated_listeners(
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
fn share_activated(
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

/// Splits the process-wide `max_conns` into per-shard limits that add up to it exactly: the
/// first `max_conns % shards` shards get one more.
fn conn_shares(max_conns: usize, shards: usize) -> Vec<usize> {
    let (each, extra) = (max_conns / shards, max_conns % shards);
    (0..shards).map(|i| each + usize::from(i < extra)).collect()
}

/// Shards with a share of 0 (more shards than max_conns: inherited in a handoff, or a reload
/// that lowered max_conns) never accept; connections the kernel queues on them wait.
fn warn_idle_shards(limits: &[usize]) {
    let idle = limits.iter().filter(|l| **l == 0).count();
    if idle > 0 {
        tracing::warn!(
            idle_shards = idle,
            shards = limits.len(),
            "max_conns is below the number of running shards: shards with no share do not accept, and connections queued on their listeners wait; restart to run fewer shards"
        );
    }
}

/// Refuses to bind `addr` if another socket already listens there. Our listeners set
/// SO_REUSEPORT, so a second process of the same user would otherwise join the first one's
/// group silently and the kernel would split clients between two configurations. A probe bind
/// without SO_REUSEPORT (with SO_REUSEADDR, so sockets in TIME_WAIT do not count) fails with
/// EADDRINUSE exactly when someone listens on the address (or on the wildcard address).
fn check_not_served(tunnel: &str, addr: SocketAddr) -> Result<(), ServerError> {
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

fn publish_keys(metrics: &Metrics, cfg: &Config, keys: &[Option<Arc<KeySet>>]) {
    metrics.keys_loaded.reset();
    for (t, k) in cfg.tunnels.iter().zip(keys) {
        if let Some(k) = k {
            let primary = k.primary().id();
            for id in k.ids() {
                let role = if id == primary { "primary" } else { "accepted" };
                metrics
                    .keys_loaded
                    .with_label_values(&[&t.name, &id.to_string(), role])
                    .set(1);
            }
        }
    }
}

/// Starts shards and the metrics endpoint. Errors (a busy port, a bad key file) are reported
/// before anything runs.
pub fn start(cfg: Config, log: Option<LogControl>) -> Result<Running, ServerError> {
    start_with(cfg, log, None)
}

/// [`start`], with a handoff socket: if a running sealpipe listens on `handoff`, its
/// listening sockets are taken over instead of bound (see [`take_listeners`]); either way
/// this process then listens on `handoff` for its own successor.
pub fn start_with(
    cfg: Config,
    log: Option<LogControl>,
    handoff: Option<&Path>,
) -> Result<Running, ServerError> {
    match crate::sys::raise_nofile_limit() {
        Ok((old, new)) if old != new => {
            tracing::info!(from = old, to = new, "raised RLIMIT_NOFILE")
        }
        Ok((_, n)) => tracing::debug!(limit = n, "RLIMIT_NOFILE"),
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
    let mut nshards = cfg.shard_count();
    if cfg.max_conns < nshards {
        // A shard whose share of max_conns is 0 would never accept, and the connections the
        // kernel hashes to its listener would wait for nothing.
        tracing::info!(
            max_conns = cfg.max_conns,
            threads = nshards,
            "max_conns is below the shard count: running one shard per allowed connection"
        );
        nshards = cfg.max_conns;
    }
    let mut cfg = cfg;
    if !cfg.resolved() {
        cfg.resolve_targets(None, &SystemResolver)?;
    }
    let keys = cfg.load_keys()?;
    let access_logs = crate::proxy::access_log::open_all(&cfg)?;

    if let (Some(path), Some(t)) = (
        handoff,
        cfg.tunnels.iter().find(|t| t.listen.unix().is_some()),
    ) {
        return Err(handoff_err(
            path,
            format!(
                "tunnel {:?} listens on a Unix socket ({}), which the handoff does not carry: restart the process instead",
                t.name, t.listen
            ),
        ));
    }
    let mut inherited = match handoff {
        Some(path) => take_listeners(path, &cfg)?,
        None => None,
    };
    // A predecessor with more shards hands over more listeners per tunnel than we would bind:
    // run that many shards, since closing a SO_REUSEPORT listener drops its queued clients.
    let nshards = match &inherited {
        Some(h) if h.shards > nshards => {
            tracing::warn!(
                configured = nshards,
                inherited = h.shards,
                "the previous process ran more shards; running as many, so that no queued connection is lost"
            );
            h.shards
        }
        _ => nshards,
    };
    let metrics = Metrics::new(nshards, cfg.tunnels.len());
    publish_keys(&metrics, &cfg, &keys);
    crate::resolver::publish(&metrics, &cfg);
    let refresher = crate::resolver::Refresher::new(Arc::new(SystemResolver), &cfg, Instant::now());

    // Pinning and SO_INCOMING_CPU are opt-in: on a host shared with other work (a sidecar),
    // pinned shards fight the scheduler, and steering by receiving CPU collapses onto one
    // shard whenever packets arrive on one CPU (docs/OPERATIONS.md, "Shards and CPUs").
    let cores = if cfg.pin {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let core_of = |i: usize| (!cores.is_empty()).then(|| cores[i % cores.len()]);
    let cpus: Vec<Option<usize>> = (0..nshards)
        .map(|i| core_of(i).filter(|_| cfg.incoming_cpu).map(|c| c.id))
        .collect();
    let mut activated = activated_listeners(&cfg)?;
    let mut listen_addrs = Vec::new();
    let mut per_shard: Vec<Vec<Bound>> = (0..nshards).map(|_| Vec::new()).collect();
    let mut unix_files = Vec::new();
    let mut dups: Vec<Vec<OwnedFd>> = Vec::new();
    let mut listeners: Vec<Vec<OwnedFd>> = Vec::new();
    for (ti, t) in cfg.tunnels.iter().enumerate() {
        if let Some(u) = t.listen.unix() {
            if activated[ti].is_some() {
                return Err(ServerError::Activation(format!(
                    "tunnel {:?} listens on a Unix socket ({}); serving one systemd passes is not supported yet: drop its .socket unit, or listen on TCP",
                    t.name, t.listen
                )));
            }
            // One socket for every shard (Unix sockets have no SO_REUSEPORT groups): each
            // shard accepts from the same queue, as with a socket systemd passes.
            let unix_err = |source| ServerError::Unix {
                tunnel: t.name.clone(),
                source,
            };
            let (l, file) = crate::unix_listen::bind(u).map_err(unix_err)?;
            let io_err = |source| {
                unix_err(crate::unix_listen::UnixListenError::Io {
                    path: u.path.clone(),
                    source,
                })
            };
            for shard in per_shard.iter_mut().skip(1) {
                shard.push(Bound::Unix(l.try_clone().map_err(io_err)?));
            }
            per_shard[0].push(Bound::Unix(l));
            tracing::info!(tunnel = %t.name, path = %u.path.display(), mode = ?u.mode.map(|m| format!("{m:04o}")), "listening on a Unix socket");
            unix_files.push(file);
            listen_addrs.push(SocketAddr::from(([0, 0, 0, 0], 0)));
            dups.push(Vec::new());
            listeners.push(Vec::new());
            continue;
        }
        let listen = t.listen.inet().expect("not a Unix socket: checked above");
        let got = inherited
            .as_mut()
            .map(|h| std::mem::take(&mut h.tunnels[ti]))
            .unwrap_or_default();
        let (addr, ls) = match activated[ti].take() {
            Some((addr, l)) => {
                if !got.is_empty() {
                    tracing::warn!(tunnel = %t.name, "systemd passed this tunnel's socket: serving it, not the one taken by handoff");
                }
                share_activated(&t.name, addr, l, nshards)?
            }
            None => {
                if got.is_empty() {
                    // Not taking this address over by handoff: nobody else may be serving it.
                    check_not_served(&t.name, listen)?;
                }
                bind_all(&t.name, listen, nshards, &cpus, got)?
            }
        };
        listen_addrs.push(addr);
        let listen_err = |source| ServerError::Listen {
            tunnel: t.name.clone(),
            addr,
            source,
        };
        let mut d = Vec::with_capacity(ls.len());
        let mut own = Vec::with_capacity(ls.len());
        for (i, l) in ls.into_iter().enumerate() {
            // Accepted sockets inherit these (see proxy::keepalive).
            crate::proxy::keepalive::apply(&l, &t.keepalive).map_err(listen_err)?;
            own.push(dup(&l).map_err(listen_err)?);
            if handoff.is_some() {
                d.push(dup(&l).map_err(listen_err)?);
            }
            per_shard[i].push(Bound::Tcp(l));
        }
        dups.push(d);
        listeners.push(own);
    }
    let mut metrics_fd = None;
    let metrics_addr = match cfg.metrics {
        Some(addr) => {
            let l = match inherited.as_mut().and_then(|h| h.metrics.take()) {
                Some(l) => l,
                None => crate::metrics::http::bind(addr)
                    .map_err(|source| ServerError::Metrics { addr, source })?,
            };
            let fd = match handoff {
                Some(_) => Some(dup(&l).map_err(|source| ServerError::Metrics { addr, source })?),
                None => None,
            };
            let local = crate::metrics::http::serve_on(l, metrics.clone())
                .map_err(|source| ServerError::Metrics { addr, source })?;
            metrics_fd = fd.map(|fd| (local, fd));
            Some(local)
        }
        None => None,
    };

    let limits = conn_shares(cfg.max_conns, nshards);
    warn_idle_shards(&limits);
    let board = Arc::new(RateBoard::new(cfg.tunnels.len(), nshards));
    let rates = Rebalancer::new(board.clone(), &rate_limits(&cfg), Instant::now());
    let running = Arc::new(AtomicUsize::new(nshards));
    let trim = Arc::new(HeapTrim::default());
    let mut shards = Vec::with_capacity(nshards);
    for (i, listeners) in per_shard.into_iter().enumerate() {
        let tunnels: Vec<TunnelRt> = cfg
            .tunnels
            .iter()
            .enumerate()
            .map(|(ti, t)| {
                let (ti, shard) = (TunnelIdx::new(ti), ShardIdx::new(i));
                TunnelRt::new(
                    ti,
                    Arc::new(t.clone()),
                    keys[ti.get()].clone(),
                    &metrics,
                    shard,
                )
                .with_access_log(access_logs[ti.get()].clone())
            })
            .collect();
        let mut state = ShardState::new(ShardIdx::new(i), tunnels, metrics.clone(), limits[i]);
        state.admission = crate::proxy::listener::Admission::new(&cfg.admission, nshards);
        state.rate_board = Some(board.clone());
        let core = core_of(i);
        let running = running.clone();
        let trim = trim.clone();
        let flush = log.as_ref().map(|l| l.flush.clone());
        // The loop is built on its own thread (handlers are !Send); it hands back its Handle.
        let (tx, rx) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name(format!("sealpipe-shard-{i}"))
            .spawn(move || {
                let mut base = match shard_base(state) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                base.set_idle(ShardState::wants_idle_work, ShardState::idle_step);
                for (ti, l) in listeners.into_iter().enumerate() {
                    let (ti, opts) = (TunnelIdx::new(ti), ListenerOptions::default());
                    let h: Box<dyn crate::reactor::Handler<ShardState>> = match l {
                        Bound::Tcp(l) => {
                            Box::new(TunnelListener::new(ti, ConnListener::from_std(l, opts, 0)))
                        }
                        Bound::Unix(l) => {
                            Box::new(TunnelListener::new(ti, ConnListener::from_unix(l, opts, 0)))
                        }
                    };
                    base.spawn(h);
                }
                let _ = tx.send(Ok(base.handle()));
                shard_main(i, base, core, running, &trim, flush.as_deref())
            })
            .map_err(|source| ServerError::Shard { shard: i, source })?;
        let handle = rx
            .recv()
            .map_err(|_| ServerError::Shard {
                shard: i,
                source: std::io::Error::other("shard thread died at start"),
            })?
            .map_err(|source| ServerError::Shard { shard: i, source })?;
        shards.push(Shard {
            handle,
            thread: Some(thread),
        });
    }
    for (t, a) in cfg.tunnels.iter().zip(&listen_addrs) {
        let targets: Vec<String> = t.targets.iter().map(|x| x.to_string()).collect();
        // The address bound (a port of 0 resolved), or the Unix socket's path.
        let a = t
            .listen
            .unix()
            .map_or(a.to_string(), |_| t.listen.to_string());
        tracing::info!(tunnel = %t.name, mode = t.mode.as_str(), listen = %a, targets = %targets.join(", "), shards = nshards, pin = cfg.pin, incoming_cpu = cfg.incoming_cpu, "tunnel up");
    }
    if let Some(h) = inherited {
        // Our shards accept on the inherited sockets now: the predecessor may let go.
        h.confirm(handoff.unwrap_or(Path::new("")));
    }
    let handoff = handoff.and_then(|path| {
        match HandoffServer::listen(path, &cfg, &listen_addrs, dups, metrics_fd, nshards) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot listen for a handoff; the next upgrade will have to bind anew");
                None
            }
        }
    });
    Ok(Running {
        cfg,
        metrics,
        shards,
        listen_addrs,
        metrics_addr,
        running,
        log,
        handoff,
        trim,
        listeners,
        refresher,
        rates,
        unix_files,
    })
}

/// Each tunnel's rate limits, in tunnel order.
fn rate_limits(cfg: &Config) -> Vec<RateLimits> {
    cfg.tunnels.iter().map(|t| t.rates).collect()
}

fn shard_main(
    i: usize,
    mut base: EventBase<ShardState>,
    core: Option<core_affinity::CoreId>,
    running: Arc<AtomicUsize>,
    trim: &HeapTrim,
    flush: Option<&(dyn Fn() + Send + Sync)>,
) {
    if let Some(c) = core {
        if !core_affinity::set_for_current(c) && i == 0 {
            tracing::warn!("cannot pin shard threads to CPUs; running unpinned");
        }
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        shard_loop(i, &mut base, trim)
    }));
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(shard = i, error = %e, "shard loop failed; exiting");
            exit_now(70, flush);
        }
        Err(_) => {
            tracing::error!(
                shard = i,
                "shard panicked; exiting so the service manager restarts the process"
            );
            exit_now(70, flush);
        }
    }
    running.fetch_sub(1, Ordering::AcqRel);
}

/// A shard's event loop, set up as every shard's is.
fn shard_base<S: 'static>(state: S) -> std::io::Result<EventBase<S>> {
    let mut base = EventBase::new(state)?;
    base.set_stall_threshold(STALL);
    Ok(base)
}

/// Stalls (callbacks that ran longer than [`STALL`]) between two readings of a shard's loop
/// statistics: each one counts.
fn new_stalls(last: &LoopStats, now: &LoopStats) -> u64 {
    now.stalls - last.stalls
}

fn shard_loop(i: usize, base: &mut EventBase<ShardState>, trim: &HeapTrim) -> std::io::Result<()> {
    let label = i.to_string();
    let m = base.state().metrics.clone();
    let busy = m.loop_busy.with_label_values(&[&label]);
    let idle = m.loop_idle.with_label_values(&[&label]);
    let stall = m.loop_stall.with_label_values(&[&label]);
    let cached = m.pool_bytes.with_label_values(&[&label, "cached"]);
    let live = m.pool_bytes.with_label_values(&[&label, "live"]);
    let mut last = base.stats();
    let mut next_flush = Instant::now();
    let mut keeper = MemoryKeeper::default();
    loop {
        base.loop_once(Some(HOUSEKEEPING))?;
        let now = Instant::now();
        m.health.beat(i, now);
        if now < next_flush {
            continue;
        }
        next_flush = now + HOUSEKEEPING;
        let s = base.stats();
        busy.inc_by((s.busy - last.busy).as_secs_f64());
        idle.inc_by((s.waiting - last.waiting).as_secs_f64());
        let stalls = new_stalls(&last, &s);
        if stalls > 0 {
            stall.inc_by(stalls);
            tracing::warn!(shard = i, stalls, took = ?s.last_stall, "loop stalled in a callback");
        }
        last = s;
        let p = keeper.tick(now, base.state().hibernations, trim);
        cached.set((p.cached_chunks * pool::CHUNK_SIZE) as i64);
        live.set((p.live_chunks * pool::CHUNK_SIZE) as i64);
        if !base.state().draining {
            base.with_context(|cx| crate::proxy::health::run_due(cx, now));
        }
        let st = base.state_mut();
        st.flush(now);
        if let Some(deadline) = st.drain_deadline {
            if st.conns == 0 {
                return Ok(());
            }
            if now >= deadline {
                tracing::warn!(
                    shard = i,
                    open = st.conns,
                    "drain timeout: closing remaining connections"
                );
                let ids = std::mem::take(&mut st.live_conns);
                base.with_context(|cx| {
                    for id in ids {
                        cx.notify(id, TAG_ABORT);
                    }
                });
                // Let the aborts run, then exit whatever is left.
                base.loop_once(Some(Duration::ZERO))?;
                base.state_mut().flush(now);
                return Ok(());
            }
        }
    }
}

/// The control thread's handler of SIGTERM, SIGINT and SIGHUP.
type OnSignal = fn(&mut crate::reactor::Context<'_, Control>, i32);

fn on_signal(cx: &mut crate::reactor::Context<'_, Control>, sig: i32) {
    if sig == libc::SIGHUP {
        cx.state.reload = true;
    } else if cx.state.drain_started.is_some() {
        cx.state.exit_now = true;
    } else {
        cx.state.drain_started = Some(cx.now());
    }
}

/// SIGTERM, SIGINT and SIGHUP, caught from [`install`](Self::install) on and delivered to
/// the control loop when [`Running::wait_with`] runs it. A process installs them before
/// [`start_with`]: shards accept as soon as they start, and a stop or reload signal that
/// arrived between then and the control loop would otherwise take its default action (a
/// SIGTERM would kill the process instead of draining it).
pub struct ControlSignals(SignalEvent<OnSignal>);

impl ControlSignals {
    pub fn install() -> Result<ControlSignals, ServerError> {
        let handler: OnSignal = on_signal;
        SignalEvent::new(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP], handler)
            .map(ControlSignals)
            .map_err(ServerError::Control)
    }
}

/// Messages the control thread's loop reacts to.
struct Control {
    drain_started: Option<Instant>,
    reload: bool,
    exit_now: bool,
}

impl Running {
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Asks every shard to drain (stop accepting, finish connections, exit).
    pub fn drain(&self, timeout: Duration) {
        self.metrics.health.draining.store(true, Ordering::Relaxed);
        self.metrics.draining.set(1);
        let deadline = Instant::now() + timeout;
        for s in &self.shards {
            let _ = s.handle.post(move |cx| {
                let st = &mut *cx.state;
                st.draining = true;
                st.drain_deadline = Some(deadline);
                let ids: Vec<HandlerId> = st.tunnels.iter().filter_map(|t| t.listener).collect();
                for id in ids {
                    cx.notify(id, TAG_DRAIN);
                }
            });
        }
    }

    /// Reloads configuration and keys; on any error the old configuration stays.
    pub fn reload(&mut self) -> Result<(), String> {
        let mut new = match &self.cfg.path {
            Some(p) => {
                let mut c = Config::read(p).map_err(|e| e.to_string())?;
                c.apply_overrides(self.cfg.overrides.clone())
                    .map_err(|e| e.to_string())?;
                c
            }
            None => self.cfg.clone(),
        };
        // Every name again; one that fails keeps the addresses it has now.
        let failures = new
            .resolve_targets(Some(&self.cfg), self.refresher.resolver())
            .map_err(|e| e.to_string())?;
        if new.tunnels.len() != self.cfg.tunnels.len()
            || new.tunnels.iter().zip(&self.cfg.tunnels).any(|(a, b)| {
                a.name != b.name || !a.listen.same_socket(&b.listen) || a.mode != b.mode
            })
        {
            return Err("adding, removing or renaming tunnels, or changing a listen address or mode, needs a restart".into());
        }
        let keys = new.load_keys().map_err(|e| e.to_string())?;
        // Opened anew on every reload: a rotated access log file is picked up by a SIGHUP.
        let access_logs = crate::proxy::access_log::open_all(&new).map_err(|e| e.to_string())?;
        if (new.threads, new.pin, new.incoming_cpu)
            != (self.cfg.threads, self.cfg.pin, self.cfg.incoming_cpu)
        {
            tracing::warn!(
                "[limits] threads, pin and incoming_cpu take effect at the next start (or handoff); the running shards keep theirs"
            );
        }
        let new = Config {
            threads: self.cfg.threads,
            pin: self.cfg.pin,
            incoming_cpu: self.cfg.incoming_cpu,
            ..new
        };
        if let Some(l) = &self.log {
            (l.reload)(&new.log.level)?;
        }
        for (t, old) in new.tunnels.iter().zip(&self.cfg.tunnels) {
            // A Unix socket's mode and owner, changed: its file gets them now.
            if let Some(u) = t.listen.unix().filter(|_| t.listen != old.listen) {
                match crate::unix_listen::set_file(&u.path, u) {
                    Ok(()) => {
                        tracing::info!(tunnel = %t.name, path = %u.path.display(), "Unix socket's mode and owner set again")
                    }
                    Err(e) => {
                        tracing::warn!(tunnel = %t.name, error = %e, "cannot set the reloaded mode or owner on the Unix socket; it keeps the previous ones")
                    }
                }
            }
        }
        for ((t, old), fds) in new
            .tunnels
            .iter()
            .zip(&self.cfg.tunnels)
            .zip(&self.listeners)
        {
            if t.keepalive == old.keepalive {
                continue;
            }
            // Connections accepted from now on inherit the new settings; open ones keep theirs.
            for fd in fds {
                if let Err(e) = crate::proxy::keepalive::apply(fd, &t.keepalive) {
                    tracing::warn!(tunnel = %t.name, error = %e, "cannot set the reloaded keepalive settings on a listener; new connections keep the previous ones");
                }
            }
        }
        publish_keys(&self.metrics, &new, &keys);
        let limits = conn_shares(new.max_conns, self.shards.len());
        warn_idle_shards(&limits);
        let nshards = self.shards.len();
        for (s, limit) in self.shards.iter().zip(limits) {
            let admission = new.admission;
            let tunnels: Vec<(Arc<crate::config::Tunnel>, Option<Arc<KeySet>>)> = new
                .tunnels
                .iter()
                .zip(&keys)
                .map(|(t, k)| (Arc::new(t.clone()), k.clone()))
                .collect();
            let logs = access_logs.clone();
            let _ = s.handle.post(move |cx| {
                let st = &mut *cx.state;
                st.conn_limit = limit;
                st.admission.set_limits(&admission, nshards);
                let metrics = st.metrics.clone();
                let shard = st.shard;
                let lifetimes = st
                    .tunnels
                    .iter()
                    .zip(&tunnels)
                    .any(|(rt, (t, _))| rt.cfg.lifetime != t.lifetime);
                for (rt, (t, k)) in st.tunnels.iter_mut().zip(tunnels) {
                    rt.reload(t, k, &metrics, shard);
                }
                // Open connections take the new max_lifetime (a shorter one ends them).
                let conns: Vec<HandlerId> = match lifetimes {
                    true => st.live_conns.iter().copied().collect(),
                    false => Vec::new(),
                };
                for (rt, log) in st.tunnels.iter_mut().zip(logs) {
                    rt.access_log = log;
                }
                // A listener paused at the old limit resumes if the new one leaves room.
                let ids: Vec<HandlerId> = st.tunnels.iter().filter_map(|t| t.listener).collect();
                for id in ids {
                    cx.notify(id, TAG_RESUME);
                }
                for id in conns {
                    cx.notify(id, TAG_LIMITS);
                }
            });
        }
        self.refresher
            .reloaded(&new, &failures, &self.metrics, Instant::now());
        // The shards start the reloaded limits from equal shares; so does the rebalancer.
        self.rates.reloaded(&rate_limits(&new), Instant::now());
        self.cfg = new;
        Ok(())
    }

    /// Moves the rate limits' shares to where the traffic is (`ratelimit::Rebalancer`), once
    /// per period: new shares go to the shards as messages.
    fn rebalance_rates(&mut self, now: Instant) {
        if !self.rates.is_due(now) || self.cfg.tunnels.iter().all(|t| t.rates.is_empty()) {
            return;
        }
        for (t, kind, shares) in self.rates.due(&rate_limits(&self.cfg), now) {
            for (shard, rate) in self.shards.iter().zip(shares) {
                let _ = shard.handle.post(move |cx| {
                    let now = cx.now();
                    if let Some(rt) = cx.state.tunnels.get_mut(t) {
                        rt.rates.set_share(kind, now, rate);
                    }
                });
            }
        }
    }

    /// Resolves target names with `resolver` from now on (tests; the system's resolver is
    /// the default).
    pub fn set_resolver(&mut self, resolver: Arc<dyn Resolve>) {
        self.refresher.set_resolver(resolver);
    }

    /// Applies a finished round of name resolutions: changed address lists go to the shards
    /// (as a reload of the targets: no connection is dropped).
    fn refresh_targets(&mut self, now: Instant) {
        let Some(answers) = self.refresher.poll(&self.cfg, now) else {
            return;
        };
        let changed = self
            .refresher
            .apply(&mut self.cfg, &answers, &self.metrics, now);
        if changed.is_empty() {
            return;
        }
        let tunnels: Vec<(usize, Arc<crate::config::Tunnel>)> = changed
            .into_iter()
            .map(|i| (i, Arc::new(self.cfg.tunnels[i].clone())))
            .collect();
        for s in &self.shards {
            let tunnels = tunnels.clone();
            let _ = s.handle.post(move |cx| {
                let st = &mut *cx.state;
                let metrics = st.metrics.clone();
                let shard = st.shard;
                for (i, t) in tunnels {
                    if let Some(rt) = st.tunnels.get_mut(i) {
                        rt.set_targets(t, &metrics, shard);
                    }
                }
            });
        }
    }

    /// Runs the control loop until the shards have drained (after SIGTERM/SIGINT, or after
    /// `stop_after`). Returns when the process should exit 0.
    pub fn wait(self, stop_after: Option<Duration>) -> Result<(), ServerError> {
        let signals = ControlSignals::install()?;
        self.wait_with(signals, stop_after)
    }

    /// [`wait`](Self::wait) with signals caught since before the server started (see
    /// [`ControlSignals`]).
    pub fn wait_with(
        mut self,
        signals: ControlSignals,
        stop_after: Option<Duration>,
    ) -> Result<(), ServerError> {
        let mut base = EventBase::new(Control {
            drain_started: None,
            reload: false,
            exit_now: false,
        })
        .map_err(ServerError::Control)?;
        base.spawn(Box::new(signals.0));
        let started = Instant::now();
        let mut draining = false;
        let mut next_trim = started;
        loop {
            base.loop_once(Some(Duration::from_millis(100)))
                .map_err(ServerError::Control)?;
            if !draining {
                self.refresh_targets(Instant::now());
                self.rebalance_rates(Instant::now());
            }
            if let Some(took) = self.trim.run_due(Instant::now(), &mut next_trim) {
                tracing::debug!(?took, "heap trimmed");
            }
            if let Some(l) = &self.log {
                let dropped = (l.dropped)();
                let counted = self.metrics.log_lines_dropped.get();
                if dropped > counted {
                    self.metrics.log_lines_dropped.inc_by(dropped - counted);
                }
            }
            if base.state().exit_now {
                tracing::warn!("second stop signal: exiting at once");
                exit_now(1, self.log.as_ref().map(|l| &*l.flush));
            }
            if std::mem::take(&mut base.state_mut().reload) {
                match self.reload() {
                    Ok(()) => {
                        self.metrics.reloads.with_label_values(&["ok"]).inc();
                        tracing::info!("configuration reloaded");
                    }
                    Err(e) => {
                        self.metrics.reloads.with_label_values(&["error"]).inc();
                        tracing::error!(error = %e, "reload rejected; the previous configuration stays in force");
                    }
                }
            }
            let timed_out = stop_after.is_some_and(|d| started.elapsed() >= d);
            let handed_off = !draining && self.handoff.as_mut().is_some_and(|h| h.poll());
            if handed_off {
                // The metrics endpoint stops accepting after one more request; the successor
                // holds the other copy of its socket.
                self.metrics
                    .health
                    .handed_off
                    .store(true, Ordering::Release);
                if let Some(a) = self.metrics_addr {
                    let _ = std::net::TcpStream::connect_timeout(&a, Duration::from_millis(100));
                }
            }
            if !draining && (base.state().drain_started.is_some() || timed_out || handed_off) {
                // Our copies of the listening sockets go now: after a handoff the successor
                // holds them; after a stop, nobody must keep a socket open that no one accepts on.
                self.handoff = None;
                self.listeners.clear();
                draining = true;
                let t = self.cfg.drain_timeout;
                tracing::info!(timeout = ?t, "draining: no new connections, waiting for open ones");
                self.drain(t);
            }
            if self.running.load(Ordering::Acquire) == 0 {
                break;
            }
        }
        for s in &mut self.shards {
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
        }
        for f in &self.unix_files {
            f.remove();
        }
        // The shards' access log handles are gone: let the writers write what is queued.
        if !crate::proxy::access_log::finish_writers(Duration::from_secs(5)) {
            tracing::warn!("access log writers still blocked after 5 s; exiting without them");
        }
        tracing::info!("all shards drained; exiting");
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Handoff: passing listening sockets to a successor process (docs/OPERATIONS.md).
//
// Protocol over the Unix stream socket at PATH (mode 0600), one exchange per connection:
//   successor -> holder:  "sealpipe-handoff 1 take pid=N\n"
//   holder -> successor:  one sendmsg: the header below + SCM_RIGHTS descriptors
//       sealpipe-handoff 1
//       shards K
//       tunnel ADDR NAME        (one line per tunnel, in config order)
//       metrics ADDR            (if the holder serves metrics)
//       end
//     descriptors: per tunnel, K listeners (shard order), then the metrics listener.
//   successor -> holder:  "OK\n" once its shards accept on them (or "NO reason\n").
// On OK the holder closes its copies (the kernel accept queues live on in the successor's)
// and drains. Without OK (EOF, timeout, NO) the holder keeps serving as if nothing happened.
// Trust: each end checks the other's uid (SO_PEERCRED) equals its own, and the successor asks
// the kernel what each descriptor is (a listening TCP socket bound to the address its own
// config names: SO_TYPE, SO_DOMAIN, SO_ACCEPTCONN, getsockname); the header is only a claim.
// ---------------------------------------------------------------------------------------------

const HANDOFF_MAGIC: &str = "sealpipe-handoff 1";
/// Bound on every read and write of a handoff exchange.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a header or a reply line.
const HANDOFF_MAX_HEADER: usize = 64 * 1024;

/// A close-on-exec duplicate of a socket, kept to be sent in a handoff.
fn dup(l: &impl AsFd) -> std::io::Result<OwnedFd> {
    l.as_fd().try_clone_to_owned()
}

fn handoff_err(path: &Path, message: impl std::fmt::Display) -> ServerError {
    ServerError::Handoff {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// Reads one `\n`-terminated line (bounded), without reading past it.
fn read_line(s: &mut UnixStream) -> std::io::Result<String> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "peer closed the handoff socket",
                ));
            }
            _ if b[0] == b'\n' => break,
            _ if out.len() >= 512 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "handoff line too long",
                ));
            }
            _ => out.push(b[0]),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Listening sockets received from a predecessor, not yet confirmed.
struct Inherited {
    shards: usize,
    /// Per tunnel of our config: the predecessor's listeners, shard order.
    tunnels: Vec<Vec<std::net::TcpListener>>,
    metrics: Option<std::net::TcpListener>,
    conn: UnixStream,
}

impl Inherited {
    /// Tells the predecessor our shards accept on its sockets: it closes its copies and drains.
    fn confirm(mut self, path: &Path) {
        match self.conn.write_all(b"OK\n") {
            Ok(()) => {
                tracing::info!(path = %path.display(), "handoff complete: the previous process drains")
            }
            // Both processes accept on the same sockets then; the old one keeps serving.
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "handoff: could not confirm; the previous process keeps serving too")
            }
        }
    }
}

fn addr_matches(configured: SocketAddr, got: SocketAddr) -> bool {
    configured == got || (configured.port() == 0 && configured.ip() == got.ip())
}

/// Asks the process listening on `path` for its listening sockets. `Ok(None)`: nobody
/// listens there (first start): bind as usual. An error (the predecessor's tunnels differ from
/// ours, a protocol failure) leaves the predecessor serving and stops this start.
fn take_listeners(path: &Path, cfg: &Config) -> Result<Option<Inherited>, ServerError> {
    let mut conn = match UnixStream::connect(path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            tracing::info!(path = %path.display(), "no process to take listeners from; binding");
            return Ok(None);
        }
        Err(e) => return Err(handoff_err(path, e)),
    };
    let io = |e: std::io::Error| handoff_err(path, e);
    // Descriptors are accepted only from our own user: anyone else listening at PATH (a
    // stale path in a shared directory, say) must not choose the sockets we serve on.
    let (theirs, ours) = (crate::sys::peer_uid(&conn).map_err(io)?, crate::sys::euid());
    if theirs != ours {
        return Err(handoff_err(
            path,
            format!(
                "the process listening there runs as uid {theirs}, this one as uid {ours}: refusing its descriptors (a handoff is only between processes of the same user)"
            ),
        ));
    }
    conn.set_read_timeout(Some(HANDOFF_TIMEOUT)).map_err(io)?;
    conn.set_write_timeout(Some(HANDOFF_TIMEOUT)).map_err(io)?;
    conn.write_all(format!("{HANDOFF_MAGIC} take pid={}\n", std::process::id()).as_bytes())
        .map_err(io)?;
    let mut buf = vec![0u8; HANDOFF_MAX_HEADER];
    let (mut n, fds) = crate::sys::recv_fds(&conn, &mut buf).map_err(io)?;
    // A stream may split the header; the descriptors came with its first byte.
    while !buf[..n].ends_with(b"end\n") {
        if n == buf.len() {
            return Err(handoff_err(path, "header too long"));
        }
        match conn.read(&mut buf[n..]).map_err(io)? {
            0 => return Err(handoff_err(path, "the other process closed the connection")),
            k => n += k,
        }
    }
    let header = String::from_utf8_lossy(&buf[..n]).into_owned();
    match parse_and_match(&header, fds, cfg) {
        Ok((shards, tunnels, metrics)) => {
            tracing::info!(path = %path.display(), shards, "took listening sockets from the running process");
            Ok(Some(Inherited {
                shards,
                tunnels,
                metrics,
                conn,
            }))
        }
        Err(why) => {
            let _ = conn.write_all(format!("NO {why}\n").as_bytes());
            Err(handoff_err(path, why))
        }
    }
}

type Taken = (
    usize,
    Vec<Vec<std::net::TcpListener>>,
    Option<std::net::TcpListener>,
);

fn parse_and_match(header: &str, fds: Vec<OwnedFd>, cfg: &Config) -> Result<Taken, String> {
    let mut lines = header.lines();
    if lines.next() != Some(HANDOFF_MAGIC) {
        return Err("not a sealpipe handoff (or another version)".into());
    }
    let mut shards = 0usize;
    let mut tunnels: Vec<(SocketAddr, String)> = Vec::new();
    let mut metrics: Option<SocketAddr> = None;
    for line in lines {
        let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
        match key {
            "shards" => shards = rest.parse().map_err(|_| format!("bad line {line:?}"))?,
            "tunnel" => {
                let (addr, name) = rest
                    .split_once(' ')
                    .ok_or_else(|| format!("bad line {line:?}"))?;
                let addr = addr.parse().map_err(|_| format!("bad line {line:?}"))?;
                tunnels.push((addr, name.to_string()));
            }
            "metrics" => metrics = Some(rest.parse().map_err(|_| format!("bad line {line:?}"))?),
            "end" => break,
            _ => return Err(format!("unknown header line {line:?}")),
        }
    }
    let want = tunnels.len() * shards + usize::from(metrics.is_some());
    if shards == 0 || fds.len() != want {
        return Err(format!(
            "got {} descriptors for {} tunnels x {shards} shards",
            fds.len(),
            tunnels.len()
        ));
    }
    let mut ours: Vec<(SocketAddr, &str)> = Vec::with_capacity(cfg.tunnels.len());
    for t in &cfg.tunnels {
        let Some(a) = t.listen.inet() else {
            return Err(format!(
                "tunnel {:?} listens on a Unix socket, which the handoff does not carry",
                t.name
            ));
        };
        ours.push((a, t.name.as_str()));
    }
    let same = ours.len() == tunnels.len()
        && ours
            .iter()
            .zip(&tunnels)
            .all(|((la, ln), (ra, rn))| ln == rn && addr_matches(*la, *ra));
    if !same {
        return Err(format!(
            "the running process serves tunnels {:?}, this config {:?}; hand over only between the same tunnels (same names and listen addresses), or stop the old process first",
            tunnels, ours
        ));
    }
    // The header only says what the sender claims: each descriptor itself must be a
    // listening TCP socket bound where our configuration listens (the kernel says so), or we
    // would serve a tunnel on whatever socket a confused or hostile holder passed.
    let mut fds = fds.into_iter();
    let mut out = Vec::with_capacity(tunnels.len());
    for (t, (listen, _)) in cfg.tunnels.iter().zip(&ours) {
        let mut want = *listen;
        let mut ls = Vec::with_capacity(shards);
        for (shard, fd) in fds.by_ref().take(shards).enumerate() {
            // A configured port of 0 is resolved by the first listener; the others share it.
            want = crate::sys::check_tcp_listener(fd.as_fd(), want).map_err(|e| {
                format!(
                    "descriptor for tunnel {:?} (shard {shard}, configured {}): {e}",
                    t.name, t.listen
                )
            })?;
            ls.push(std::net::TcpListener::from(fd));
        }
        out.push(ls);
    }
    let m = fds.next();
    // The metrics socket is reused only if we serve metrics on the same address.
    let m = match (m, metrics, cfg.metrics) {
        (Some(fd), Some(theirs), Some(mine)) if addr_matches(mine, theirs) => {
            crate::sys::check_tcp_listener(fd.as_fd(), mine)
                .map_err(|e| format!("descriptor for the metrics endpoint ({mine}): {e}"))?;
            Some(std::net::TcpListener::from(fd))
        }
        _ => None,
    };
    Ok((shards, out, m))
}

/// The running side: listens on the handoff path and answers a successor.
struct HandoffServer {
    path: PathBuf,
    listener: UnixListener,
    header: String,
    /// Duplicates of every listening socket (tunnel-major, shard order, then metrics): what
    /// is sent. Dropped when this process hands over or drains, so that a drained process
    /// does not keep a listening socket open that nobody accepts on.
    fds: Vec<OwnedFd>,
}

impl HandoffServer {
    fn listen(
        path: &Path,
        cfg: &Config,
        addrs: &[SocketAddr],
        dups: Vec<Vec<OwnedFd>>,
        metrics: Option<(SocketAddr, OwnedFd)>,
        shards: usize,
    ) -> std::io::Result<HandoffServer> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        // A stale socket from a process that is gone (the connect in `take_listeners`
        // failed, or it handed over to us) is replaced; anything else at the path is not.
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.file_type().is_socket() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "path exists and is not a socket",
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        // Whoever connects takes our listeners: only our own user may.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let mut header = format!("{HANDOFF_MAGIC}\nshards {shards}\n");
        for (t, a) in cfg.tunnels.iter().zip(addrs) {
            header.push_str(&format!("tunnel {a} {}\n", t.name));
        }
        let mut fds: Vec<OwnedFd> = dups.into_iter().flatten().collect();
        if let Some((a, fd)) = metrics {
            header.push_str(&format!("metrics {a}\n"));
            fds.push(fd);
        }
        header.push_str("end\n");
        tracing::info!(path = %path.display(), "listening for a handoff");
        Ok(HandoffServer {
            path: path.to_owned(),
            listener,
            header,
            fds,
        })
    }

    /// Answers a successor if one connected. True when it took the listeners.
    fn poll(&mut self) -> bool {
        let mut conn = match self.listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "handoff: accept failed");
                return false;
            }
        };
        match self.answer(&mut conn) {
            Ok(who) => {
                tracing::info!(path = %self.path.display(), successor = %who, "listening sockets handed over; draining");
                true
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "handoff failed; still serving");
                false
            }
        }
    }

    fn answer(&self, conn: &mut UnixStream) -> std::io::Result<String> {
        // The socket's mode (0600) already keeps other users out; this holds even if the path
        // or its directory were opened up by mistake.
        let (theirs, ours) = (crate::sys::peer_uid(conn)?, crate::sys::euid());
        if theirs != ours {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "refused a successor running as uid {theirs} (this process runs as uid {ours})"
                ),
            ));
        }
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(HANDOFF_TIMEOUT))?;
        conn.set_write_timeout(Some(HANDOFF_TIMEOUT))?;
        let hello = read_line(conn)?;
        let Some(who) = hello.strip_prefix(HANDOFF_MAGIC) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unexpected request {hello:?}"),
            ));
        };
        crate::sys::send_fds(
            conn,
            self.header.as_bytes(),
            &crate::sys::borrow_all(&self.fds),
        )?;
        let reply = read_line(conn)?;
        if reply == "OK" {
            Ok(who.trim().to_string())
        } else {
            Err(std::io::Error::other(format!(
                "the successor declined: {reply}"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reactor::{Context, Handler, Ready, Tag};

    /// Stalls its loop twice, in two turns (a timer each); the state counts the stalls done.
    struct Staller;

    impl Handler<u32> for Staller {
        fn on_start(&mut self, cx: &mut Context<'_, u32>) {
            cx.timer(Duration::ZERO, Tag::new(1));
        }
        fn on_ready(&mut self, _: &mut Context<'_, u32>, _: u8, _: Ready) {}
        fn on_timer(&mut self, cx: &mut Context<'_, u32>, tag: Tag) {
            // The stall itself (not a wait for anything).
            std::thread::sleep(STALL + Duration::from_millis(20));
            *cx.state += 1;
            if tag == Tag::new(1) {
                cx.timer(Duration::ZERO, Tag::new(2));
            }
        }
    }

    /// Item 4 of issue 14: every stall counts, not only a new all-time longest callback.
    #[test]
    fn a_shard_loop_that_stalls_twice_counts_two_stalls() {
        let mut base = shard_base(0u32).unwrap();
        base.spawn(Box::new(Staller));
        let last = base.stats();
        for _ in 0..100 {
            if *base.state() == 2 {
                break;
            }
            base.loop_once(Some(Duration::from_millis(10))).unwrap();
        }
        assert_eq!(*base.state(), 2, "the handler stalled twice");
        assert_eq!(new_stalls(&last, &base.stats()), 2);
    }

    #[test]
    fn heap_trims_run_when_asked_at_most_once_a_second() {
        let trim = HeapTrim::default();
        let t0 = Instant::now();
        let mut next = t0;
        assert!(trim.run_due(t0, &mut next).is_none(), "nobody asked");
        trim.request();
        assert!(trim.run_due(t0, &mut next).is_some());
        trim.request();
        assert!(trim.run_due(t0 + TRIM_EVERY / 2, &mut next).is_none());
        assert!(
            trim.run_due(t0 + TRIM_EVERY, &mut next).is_some(),
            "still asked"
        );
        assert!(trim.run_due(t0 + TRIM_EVERY * 3, &mut next).is_none());
    }

    #[test]
    fn conn_shares_add_up_to_max_conns() {
        assert_eq!(conn_shares(1, 2), vec![1, 0]);
        assert_eq!(conn_shares(5, 2), vec![3, 2]);
        assert_eq!(conn_shares(100_000, 3), vec![33_334, 33_333, 33_333]);
        for (max, shards) in [(1, 1), (7, 4), (1023, 16), (3, 8)] {
            let s = conn_shares(max, shards);
            assert_eq!(s.len(), shards);
            assert_eq!(s.iter().sum::<usize>(), max, "{max} over {shards}");
        }
    }
}
