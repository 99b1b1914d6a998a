//! Shards and the control plane.
//!
//! One shard per CPU of the process's affinity mask (or `threads`), each a thread pinned with
//! core_affinity, owning an `EventBase`, one SO_REUSEPORT listener per tunnel, its buffer pool
//! (thread-local), its connections and its metric handles. The thread that calls
//! [`Running::wait`] is the control thread: it owns the signals (as reactor signal events) and
//! talks to shards only through their `Handle`s.
//!
//! - SIGTERM/SIGINT: drain — every listener accepts what the kernel already queued, then
//!   closes; open connections finish until the drain timeout, then are cut (counted as
//!   `drain_deadline`); exit 0. A second SIGTERM/SIGINT exits at once (status 1).
//! - SIGHUP: reload the config file (or, from the command line, the key files); a bad file is
//!   rejected whole and the old configuration stays.
//! - A shard that panics takes the process down (status 70) — never a half-alive process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{Config, ConfigError};
use crate::crypto::KeySet;
use crate::metrics::Metrics;
use crate::proxy::conn::TAG_ABORT;
use crate::proxy::listener::{TAG_DRAIN, TunnelListener};
use crate::proxy::{ShardState, TunnelRt};
use crate::reactor::listener::{ConnListener, ListenerOptions};
use crate::reactor::signal::SignalEvent;
use crate::reactor::{EventBase, Handle, HandlerId, pool};

/// How often a shard flushes counters and publishes its heartbeat.
const HOUSEKEEPING: Duration = Duration::from_millis(250);
/// A loop turn whose callbacks ran longer than this counts as a stall.
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
}

/// A callback the control thread runs on SIGHUP to change the log filter.
pub type LogReload = Box<dyn Fn(&str) -> Result<(), String> + Send>;

struct Shard {
    handle: Handle<ShardState>,
    thread: Option<JoinHandle<()>>,
}

/// A started server: shards running, listeners bound.
pub struct Running {
    cfg: Config,
    metrics: Arc<Metrics>,
    shards: Vec<Shard>,
    /// Per tunnel: the address actually bound (port 0 resolved).
    pub listen_addrs: Vec<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    running: Arc<AtomicUsize>,
    log_reload: Option<LogReload>,
}

/// Binds one listener per shard for `addr` (SO_REUSEPORT); a port of 0 is resolved by the
/// first bind and reused by the others.
fn bind_all(
    tunnel: &str,
    addr: SocketAddr,
    shards: usize,
) -> Result<(SocketAddr, Vec<std::net::TcpListener>), ServerError> {
    let mut out = Vec::with_capacity(shards);
    let mut addr = addr;
    for i in 0..shards {
        let opts = ListenerOptions {
            incoming_cpu: None,
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
pub fn start(cfg: Config, log_reload: Option<LogReload>) -> Result<Running, ServerError> {
    match crate::sys::raise_nofile_limit() {
        Ok((old, new)) if old != new => {
            tracing::info!(from = old, to = new, "raised RLIMIT_NOFILE")
        }
        Ok((_, n)) => tracing::debug!(limit = n, "RLIMIT_NOFILE"),
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
    let nshards = cfg.shard_count();
    let keys = cfg.load_keys()?;
    let metrics = Metrics::new(nshards, cfg.tunnels.len());
    publish_keys(&metrics, &cfg, &keys);

    let mut listen_addrs = Vec::new();
    let mut per_shard: Vec<Vec<std::net::TcpListener>> = (0..nshards).map(|_| Vec::new()).collect();
    for t in &cfg.tunnels {
        let (addr, ls) = bind_all(&t.name, t.listen, nshards)?;
        listen_addrs.push(addr);
        for (i, l) in ls.into_iter().enumerate() {
            per_shard[i].push(l);
        }
    }
    let metrics_addr = match cfg.metrics {
        Some(addr) => Some(
            crate::metrics::http::spawn(addr, metrics.clone())
                .map_err(|source| ServerError::Metrics { addr, source })?,
        ),
        None => None,
    };

    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let conn_limit = cfg.max_conns.div_ceil(nshards).max(1);
    let running = Arc::new(AtomicUsize::new(nshards));
    let mut shards = Vec::with_capacity(nshards);
    for (i, listeners) in per_shard.into_iter().enumerate() {
        let tunnels: Vec<TunnelRt> = cfg
            .tunnels
            .iter()
            .enumerate()
            .map(|(ti, t)| TunnelRt::new(ti, Arc::new(t.clone()), keys[ti].clone(), &metrics, i))
            .collect();
        let state = ShardState::new(i, tunnels, metrics.clone(), conn_limit);
        let core = if cores.is_empty() {
            None
        } else {
            Some(cores[i % cores.len()])
        };
        let running = running.clone();
        // The loop is built on its own thread (handlers are !Send); it hands back its Handle.
        let (tx, rx) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name(format!("sealpipe-shard-{i}"))
            .spawn(move || {
                let mut base = match EventBase::new(state) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                for (ti, l) in listeners.into_iter().enumerate() {
                    let cl = ConnListener::from_std(l, ListenerOptions::default(), 0);
                    base.spawn(Box::new(TunnelListener::new(ti, cl)));
                }
                let _ = tx.send(Ok(base.handle()));
                shard_main(i, base, core, running)
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
        tracing::info!(tunnel = %t.name, mode = t.mode.as_str(), listen = %a, targets = ?t.targets, shards = nshards, "tunnel up");
    }
    Ok(Running {
        cfg,
        metrics,
        shards,
        listen_addrs,
        metrics_addr,
        running,
        log_reload,
    })
}

fn shard_main(
    i: usize,
    mut base: EventBase<ShardState>,
    core: Option<core_affinity::CoreId>,
    running: Arc<AtomicUsize>,
) {
    if let Some(c) = core {
        if !core_affinity::set_for_current(c) && i == 0 {
            tracing::warn!("cannot pin shard threads to CPUs; running unpinned");
        }
    }
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shard_loop(i, &mut base)));
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(shard = i, error = %e, "shard loop failed; exiting");
            std::process::exit(70);
        }
        Err(_) => {
            tracing::error!(
                shard = i,
                "shard panicked; exiting so the service manager restarts the process"
            );
            std::process::exit(70);
        }
    }
    running.fetch_sub(1, Ordering::AcqRel);
}

fn shard_loop(i: usize, base: &mut EventBase<ShardState>) -> std::io::Result<()> {
    let label = i.to_string();
    let m = base.state().metrics.clone();
    let busy = m.loop_busy.with_label_values(&[&label]);
    let idle = m.loop_idle.with_label_values(&[&label]);
    let stall = m.loop_stall.with_label_values(&[&label]);
    let cached = m.pool_bytes.with_label_values(&[&label, "cached"]);
    let live = m.pool_bytes.with_label_values(&[&label, "live"]);
    let mut last = base.stats();
    let mut next_flush = Instant::now();
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
        if s.longest_callback > STALL && s.longest_callback > last.longest_callback {
            stall.inc();
            tracing::warn!(shard = i, took = ?s.longest_callback, "loop stalled in a callback");
        }
        last = s;
        let p = pool::stats();
        cached.set((p.cached_chunks * pool::CHUNK_SIZE) as i64);
        live.set((p.live_chunks * pool::CHUNK_SIZE) as i64);
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
        let new = match &self.cfg.path {
            Some(p) => Config::from_file(p).map_err(|e| e.to_string())?,
            None => self.cfg.clone(),
        };
        if new.tunnels.len() != self.cfg.tunnels.len()
            || new
                .tunnels
                .iter()
                .zip(&self.cfg.tunnels)
                .any(|(a, b)| a.name != b.name || a.listen != b.listen || a.mode != b.mode)
        {
            return Err("adding, removing or renaming tunnels, or changing a listen address or mode, needs a restart".into());
        }
        let keys = new.load_keys().map_err(|e| e.to_string())?;
        if let Some(f) = &self.log_reload {
            f(&new.log.level)?;
        }
        publish_keys(&self.metrics, &new, &keys);
        let limit = new.max_conns.div_ceil(self.shards.len()).max(1);
        for s in &self.shards {
            let tunnels: Vec<(Arc<crate::config::Tunnel>, Option<Arc<KeySet>>)> = new
                .tunnels
                .iter()
                .zip(&keys)
                .map(|(t, k)| (Arc::new(t.clone()), k.clone()))
                .collect();
            let _ = s.handle.post(move |cx| {
                let st = &mut *cx.state;
                st.conn_limit = limit;
                let metrics = st.metrics.clone();
                let shard = st.shard;
                for (rt, (t, k)) in st.tunnels.iter_mut().zip(tunnels) {
                    rt.reload(t, k, &metrics, shard);
                }
            });
        }
        self.cfg = new;
        Ok(())
    }

    /// Runs the control loop until the shards have drained (after SIGTERM/SIGINT, or after
    /// `stop_after`). Returns when the process should exit 0.
    pub fn wait(mut self, stop_after: Option<Duration>) -> Result<(), ServerError> {
        let mut base = EventBase::new(Control {
            drain_started: None,
            reload: false,
            exit_now: false,
        })
        .map_err(ServerError::Control)?;
        let signals = SignalEvent::new(
            &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP],
            |cx: &mut crate::reactor::Context<'_, Control>, sig: i32| {
                if sig == libc::SIGHUP {
                    cx.state.reload = true;
                } else if cx.state.drain_started.is_some() {
                    cx.state.exit_now = true;
                } else {
                    cx.state.drain_started = Some(cx.now());
                }
            },
        )
        .map_err(ServerError::Control)?;
        base.spawn(Box::new(signals));
        let started = Instant::now();
        let mut draining = false;
        loop {
            base.loop_once(Some(Duration::from_millis(100)))
                .map_err(ServerError::Control)?;
            if base.state().exit_now {
                tracing::warn!("second stop signal: exiting at once");
                std::process::exit(1);
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
            if !draining && (base.state().drain_started.is_some() || timed_out) {
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
        tracing::info!("all shards drained; exiting");
        Ok(())
    }
}
