//! The control thread: signals (SIGTERM/SIGINT drain, a second one exits, SIGHUP reloads),
//! reloads of the configuration and keys, target names resolved again, the rate limits'
//! shares moved between shards, heap trims, the Unix sockets' files removed at exit, and the
//! handoff to a successor. It reaches shards only by posting to their `Handle`s.
//!
//! Invariants: a reload is applied whole or not at all (the old configuration stays on any
//! error); signals never run user code in signal context (they are events on the control
//! loop); the control thread returns only once every shard has drained.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{
    ExitReason, Running, ServerError, conn_shares, publish_keys, rate_limits, warn_idle_shards,
};
use crate::config::{Config, Resolve};
use crate::metrics::Metrics;
use crate::protocol::KeySet;
use crate::proxy::conn::TAG_DRAIN_STARTED;
use crate::proxy::conn::TAG_LIMITS;
use crate::proxy::listener::{TAG_DRAIN, TAG_RESUME};
use crate::reactor::signal::SignalEvent;
use crate::reactor::{EventBase, HandlerId};

/// The control thread's handler of SIGTERM, SIGINT and SIGHUP.
type OnSignal = fn(&mut crate::reactor::Context<'_, Control>, i32);

/// How long a reload waits for every shard to have its new configuration before it counts
/// itself done anyway (a shard busy for this long is stalled, and its own log says so; it
/// applies the reload when it runs again).
const RELOAD_APPLY_WAIT: Duration = Duration::from_secs(5);

/// Waits until `n` shards said they applied a reload on `applied`, or `wait` passed; a shard
/// gone (its message dropped unrun) counts as done.
fn wait_applied(applied: &crossbeam_channel::Receiver<()>, n: usize, wait: Duration) {
    let deadline = Instant::now() + wait;
    for done in 0..n {
        match applied.recv_deadline(deadline) {
            Ok(()) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    applied = done,
                    shards = n,
                    waited = ?wait,
                    "reload: not every shard has applied the new configuration yet; the others do when they next run"
                );
                return;
            }
        }
    }
}

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
/// [`start_with`](super::start_with): shards accept as soon as they start, and a stop or reload signal that
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
                // Warm sessions: an encrypt side retires its own; a decrypt side closes those
                // still waiting for their OPEN (ABORT unopened), so their encrypt sides
                // replace them elsewhere before a client takes one.
                crate::proxy::warm::drain(cx);
                let conns: Vec<HandlerId> = cx.state.live_conns.iter().copied().collect();
                for id in conns {
                    cx.notify(id, TAG_DRAIN_STARTED);
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
        // Each shard says when it has the new configuration: a reload is counted, logged and
        // answered once it is in force, so a connection that follows it gets the new targets.
        let (applied_tx, applied) = crossbeam_channel::bounded::<()>(nshards);
        for (s, limit) in self.shards.iter().zip(limits) {
            let applied_tx = applied_tx.clone();
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
                let _ = applied_tx.send(());
            });
        }
        drop(applied_tx);
        wait_applied(&applied, nshards, RELOAD_APPLY_WAIT);
        self.refresher
            .reloaded(&new, &failures, &self.metrics, Instant::now());
        // The shards start the reloaded limits from equal shares; so does the rebalancer.
        self.rates.reloaded(&rate_limits(&new), Instant::now());
        self.cfg = new;
        Ok(())
    }

    /// Posts `f` to shard `i` (tests: a shard held busy).
    #[cfg(test)]
    pub(crate) fn post_to_shard(
        &self,
        i: usize,
        f: impl FnOnce(&mut crate::reactor::Context<'_, super::ShardState>) + Send + 'static,
    ) {
        let _ = self.shards[i].handle.post(f);
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
    /// `stop_after`), a second stop signal, or a shard's failure: returns why, for `main` to
    /// turn into the exit status.
    pub fn wait(self, stop_after: Option<Duration>) -> Result<ExitReason, ServerError> {
        let signals = ControlSignals::install()?;
        self.wait_with(signals, stop_after)
    }

    /// [`wait`](Self::wait) with signals caught since before the server started (see
    /// [`ControlSignals`]).
    pub fn wait_with(
        mut self,
        signals: ControlSignals,
        stop_after: Option<Duration>,
    ) -> Result<ExitReason, ServerError> {
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
            if let Some(reason) = self.failure.get() {
                // The shard said why in its log line; the rest of the process goes with it.
                return Ok(self.abandon(reason));
            }
            if base.state().exit_now {
                tracing::warn!("second stop signal: exiting at once");
                return Ok(self.abandon(ExitReason::SecondSignal));
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
            // A process still taking connections from its predecessor answers no successor yet.
            let taking = self.transfer.as_ref().is_some_and(|t| !t.is_finished());
            let successor = match self.handoff.as_mut() {
                Some(h) if !draining && !taking => h.poll(),
                _ => None,
            };
            let handed_off = successor.is_some();
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
                if let Some(s) = successor {
                    self.hand_over_connections(s);
                }
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
        // Every connection was resolved (the shards waited for theirs): the transfer thread
        // has posted its last outcome.
        if let Some(t) = self.transfer.take() {
            let _ = t.join();
        }
        for f in &self.unix_files {
            f.remove();
        }
        // The shards' access log handles are gone: let the writers write what is queued.
        if !crate::proxy::access_log::finish_writers(Duration::from_secs(5)) {
            tracing::warn!("access log writers still blocked after 5 s; exiting without them");
        }
        tracing::info!("all shards drained; exiting");
        Ok(ExitReason::Drained)
    }

    /// After a handoff: the established connections go to the successor too, if it can read
    /// their state; else they stay and drain here.
    fn hand_over_connections(&mut self, s: super::handoff::Successor) {
        use crate::proxy::conn::core::migrate::STATE_VERSION;
        if !s.hello.reads(STATE_VERSION) {
            tracing::info!(
                successor_reads = ?s.hello.conn_versions,
                this_writes = STATE_VERSION,
                "live upgrade: the successor cannot read this release's connection state; established connections stay here and drain"
            );
            for h in &self.shards {
                let _ = h.handle.post(|cx| {
                    let n = cx.state.conns as u64;
                    cx.state
                        .metrics
                        .handoff_conns
                        .with_label_values(&["kept"])
                        .inc_by(n);
                });
            }
            return;
        }
        // A predecessor's transfer that is still running ends with it (it has to be done
        // for a successor to be answered at all: see `wait_with`).
        if let Some(t) = self.transfer.take() {
            let _ = t.join();
        }
        let handles = self.shards.iter().map(|s| s.handle.clone()).collect();
        let window = super::transfer::window(&self.cfg);
        match super::transfer::send_connections(s.conn, handles, window) {
            Ok(t) => self.transfer = Some(t),
            Err(e) => {
                tracing::warn!(error = %e, "live upgrade: cannot start handing over established connections; they stay here and drain")
            }
        }
    }

    /// Stops without waiting for the shards (they end with the process, which `main` exits
    /// next): writes out the queued log lines first, so the line saying why is not lost.
    fn abandon(self, reason: ExitReason) -> ExitReason {
        if let Some(l) = &self.log {
            (l.flush)();
        }
        reason
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn upstream_series(m: &Metrics, addr: SocketAddr) -> bool {
        let want = format!("upstream=\"{addr}\"");
        String::from_utf8(m.render())
            .unwrap()
            .lines()
            .any(|l| l.starts_with("sealpipe_upstream_up{") && l.contains(&want))
    }

    /// A reload is in force when it returns (and is counted): a shard busy when it was asked
    /// has applied it by then. Before, the reload was only posted to the shards, and a client
    /// that came right after `reloads_total{result="ok"}` moved could still be sent to the old
    /// targets (seen in a loaded full-suite run of
    /// fleet::a_name_uses_every_address_it_resolves_to_and_sighup_resolves_it_again).
    #[test]
    fn a_reload_returns_once_every_shard_has_applied_it() {
        let dir = std::env::temp_dir().join(format!("sealpipe-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:9".parse().unwrap(),
            "127.0.0.2:9".parse().unwrap(),
        );
        let toml = |t: SocketAddr| {
            format!(
                "[log]\nlevel = \"warn\"\n[limits]\nthreads = 1\n[[tunnel]]\nname = \"t\"\n\
                 mode = \"forward\"\nlisten = \"127.0.0.1:0\"\ntargets = [\"{t}\"]\n"
            )
        };
        std::fs::write(&path, toml(a)).unwrap();
        let mut r = crate::server::start(Config::from_file(&path).unwrap(), None).unwrap();
        assert!(upstream_series(r.metrics(), a));
        // The shard is held busy until released.
        let (release_tx, release) = crossbeam_channel::bounded::<()>(1);
        r.post_to_shard(0, move |_| {
            let _ = release.recv_timeout(Duration::from_secs(20));
        });
        std::fs::write(&path, toml(b)).unwrap();
        let (done_tx, done) = crossbeam_channel::bounded(1);
        std::thread::scope(|sc| {
            let r = &mut r;
            sc.spawn(move || {
                r.reload().unwrap();
                let m = r.metrics();
                let _ = done_tx.send((upstream_series(m, a), upstream_series(m, b)));
            });
            // A reload that returns while the shard is still held returns too early: given
            // half a second to do that, then the shard goes on.
            let early = done.recv_timeout(Duration::from_millis(500)).ok();
            release_tx.send(()).unwrap();
            let seen = early.unwrap_or_else(|| done.recv_timeout(Duration::from_secs(20)).unwrap());
            assert_eq!(
                seen,
                (false, true),
                "(old target's series, new target's series) when the reload returned"
            );
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
