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
//! - A shard that fails or panics ends the server ([`ExitReason`]; `main` exits 70) — never a
//!   half-alive process. The library never calls `process::exit`: it returns why it stopped.
//! - A listen address another socket already listens on is refused at start (naming the
//!   process that holds it), unless this process takes that address over by handoff. A Unix
//!   socket's path is bound by `unix_listen` (a live one is refused, a stale one removed) and
//!   served by every shard from one socket.
//! - Handoff (`--handoff PATH`, [`start_with`]): a new process takes the listening sockets of
//!   the one listening on PATH over SCM_RIGHTS; the old one lets go only after the new one's
//!   shards accept on them, then drains. The protocol is described in `handoff.rs` and in
//!   docs/OPERATIONS.md. A configuration with a Unix listening socket refuses `--handoff` at
//!   start (the handoff carries TCP listeners only); established connections to a Unix
//!   target move like any other (`transfer.rs`).
//! - Rate limits: the control thread moves each limit's per-shard shares to where the
//!   traffic is (`proxy::ratelimit::Rebalancer`); shards publish what they used.
//! - Shards run unpinned and their SO_REUSEPORT listeners share connections by hash, unless
//!   `pin` (each shard thread on one CPU of the mask) and `incoming_cpu` (each pinned shard's
//!   listener carries SO_INCOMING_CPU = its CPU) ask for CPU locality.
//! - `max_conns` is exact: per-shard shares add up to it, and a process never runs more shards
//!   than `max_conns` (a share of 0 would never accept).
//!
//! The modules, by job: `listen.rs` binds (or takes from systemd) the listening sockets,
//! `shard.rs` runs a shard's loop and its housekeeping, `control.rs` is the control thread
//! (signals, reload, drain), `handoff.rs` passes the listening sockets to a successor. This
//! file starts them all.

mod control;
mod handoff;
mod listen;
mod shard;
mod transfer;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::config::{Config, ConfigError, SystemResolver};
use crate::metrics::Metrics;
use crate::protocol::KeySet;
use crate::proxy::listener::TunnelListener;
use crate::proxy::ratelimit::{RateBoard, RateLimits, Rebalancer};
use crate::proxy::{ShardIdx, ShardState, TunnelIdx, TunnelRt};
use crate::reactor::Handle;
use crate::reactor::listener::{ConnListener, ListenerOptions};

pub use control::ControlSignals;
use handoff::{HandoffServer, dup, take_listeners};
use listen::{activated_listeners, bind_all, check_not_served, share_activated};
use shard::{HeapTrim, ShardFailure, shard_base, shard_main};

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

/// Why a server stopped. The library never exits the process itself: `main` turns each
/// reason into the exit status docs/OPERATIONS.md documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// Every shard drained and exited (after SIGTERM/SIGINT, a handoff, or `stop_after`).
    Drained,
    /// A second SIGTERM/SIGINT during the drain: stop at once, open connections cut.
    SecondSignal,
    /// A shard's event loop failed (its poller returned an error).
    ShardFailed,
    /// A shard panicked.
    ShardPanicked,
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
    /// Set by a shard that failed or panicked: the control loop ends the process for it.
    failure: Arc<ShardFailure>,
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
    /// A live upgrade's transfer of established connections (`transfer.rs`): from the
    /// predecessor while this process starts, to the successor once it took over.
    transfer: Option<JoinHandle<()>>,
    /// The rate limits' shares, moved to the shards that carry the traffic (`ratelimit`).
    rates: Rebalancer,
    /// The Unix sockets this process bound, removed when it exits.
    unix_files: Vec<crate::unix_listen::SocketFile>,
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
/// listening sockets are taken over instead of bound (see `handoff.rs`); either way
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

    let mut inherited = match handoff {
        Some(path) => take_listeners(path, &cfg)?,
        None => None,
    };
    if let (Some(path), None, Some(t)) = (
        handoff,
        inherited.as_ref(),
        cfg.tunnels.iter().find(|t| t.listen.unix().is_some()),
    ) {
        // Nothing to take over: start as usual. A successor will be refused (a Unix listener
        // cannot be shared with it), so say now that upgrading this process means a restart.
        tracing::warn!(tunnel = %t.name, listen = %t.listen, handoff = %path.display(), "a tunnel listens on a Unix socket, which a handoff does not carry: a live upgrade of this process will be refused; restart it instead");
    }
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
    let failure = Arc::new(ShardFailure::default());
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
        let failure = failure.clone();
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
                shard_main(i, base, core, running, &trim, &failure)
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
    let mut transfer = None;
    if let Some(h) = inherited {
        // Our shards accept on the inherited sockets now: the predecessor may let go, and
        // hand us its established connections.
        if let Some(conn) = h.confirm(handoff.unwrap_or(Path::new(""))) {
            let handles = shards.iter().map(|s| s.handle.clone()).collect();
            let tunnels = transfer::Tunnels::of(&cfg);
            match transfer::receive_connections(
                conn,
                handles,
                tunnels,
                metrics.clone(),
                cfg.max_conns,
            ) {
                Ok(t) => transfer = Some(t),
                Err(e) => {
                    tracing::warn!(error = %e, "live upgrade: cannot start taking established connections; they stay with the previous process")
                }
            }
        }
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
        failure,
        log,
        handoff,
        trim,
        listeners,
        refresher,
        transfer,
        rates,
        unix_files,
    })
}

/// Each tunnel's rate limits, in tunnel order.
fn rate_limits(cfg: &Config) -> Vec<RateLimits> {
    cfg.tunnels.iter().map(|t| t.rates).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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

#[cfg(test)]
mod exit_tests {
    use super::*;

    #[test]
    fn a_shard_that_panics_ends_the_server_with_its_reason() {
        let text = "[limits]\nthreads = 2\n[[tunnel]]\nname = \"t\"\nmode = \"forward\"\nlisten = \"127.0.0.1:0\"\ntargets = [\"127.0.0.1:9\"]\n";
        let cfg = crate::config::ConfigFile::parse(Path::new("t.toml"), text)
            .unwrap()
            .validate(None)
            .unwrap();
        let running = start(cfg, None).unwrap();
        running.shards[1]
            .handle
            .post(|_| panic!("test: a shard panics"))
            .unwrap();
        let r = running.wait(Some(std::time::Duration::from_secs(30)));
        assert_eq!(r.unwrap(), ExitReason::ShardPanicked);
    }
}
