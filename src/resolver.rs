//! Target names resolved again while running, off the shards.
//!
//! A target given by name (`db.internal:5432`) stands for every address it resolves to
//! (`config::Target`). The control thread resolves the names again every tunnel's
//! `resolve_interval` (and a reload resolves them all), and hands changed address lists to
//! the shards, which apply them like a reload of the targets (`TunnelRt::set_targets`):
//! connections in flight keep going, addresses that stay keep their health.
//!
//! Invariants:
//! - Lookups block (getaddrinfo), so they never run on a shard, nor on the control thread's
//!   loop: a round runs on its own short-lived thread, at most one round at a time, and the
//!   control thread only polls for its answers. A lookup that hangs delays the next round,
//!   never a signal or a shard.
//! - A name that fails to resolve (an error, or no address) keeps its last good addresses;
//!   each failure is counted (`sealpipe_resolve_failures_total{tunnel}`) and logged at most
//!   once per [`WARN_EVERY`] per target while it keeps failing, and once when it recovers.
//! - Answers are matched to targets by name and port, so a round that started before a
//!   reload is applied to the reloaded configuration's targets of the same name, and to no
//!   other.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};

use crate::config::{Config, Resolve, ResolveFailure, lookup};
use crate::metrics::Metrics;

/// At most one warning per failing target this often.
pub const WARN_EVERY: Duration = Duration::from_secs(300);

/// One name's answer: its addresses in order, or why there are none.
pub type Answer = ((String, u16), Result<Vec<SocketAddr>, String>);

/// A target that is failing to resolve: for rate-limited logging.
struct Failing {
    since: Instant,
    failures: u64,
    next_warn: Instant,
    unwarned: u64,
}

/// The control thread's re-resolution state.
pub struct Refresher {
    resolver: Arc<dyn Resolve>,
    /// Per tunnel: when its names are due next; `None`: no names, or no interval.
    due: Vec<Option<Instant>>,
    round: Option<Receiver<Vec<Answer>>>,
    /// (tunnel, target as written) that failed last time.
    failing: HashMap<(String, String), Failing>,
}

impl Refresher {
    pub fn new(resolver: Arc<dyn Resolve>, cfg: &Config, now: Instant) -> Refresher {
        let mut r = Refresher {
            resolver,
            due: Vec::new(),
            round: None,
            failing: HashMap::new(),
        };
        r.schedule(cfg, now);
        r
    }

    pub fn resolver(&self) -> &dyn Resolve {
        &*self.resolver
    }

    pub fn set_resolver(&mut self, resolver: Arc<dyn Resolve>) {
        self.resolver = resolver;
    }

    /// Every tunnel's names are fresh as of `now` (start, reload): due one interval later.
    pub fn schedule(&mut self, cfg: &Config, now: Instant) {
        self.due = cfg
            .tunnels
            .iter()
            .map(|t| {
                t.resolve_interval
                    .filter(|_| t.has_names())
                    .map(|i| now + i)
            })
            .collect();
    }

    /// Called every control-loop turn: the answers of a finished round, if any; starts a
    /// round when a tunnel's names are due and none is running.
    pub fn poll(&mut self, cfg: &Config, now: Instant) -> Option<Vec<Answer>> {
        if let Some(rx) = &self.round {
            return match rx.try_recv() {
                Ok(answers) => {
                    self.round = None;
                    Some(answers)
                }
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => {
                    self.round = None;
                    None
                }
            };
        }
        let mut names: Vec<(String, u16)> = Vec::new();
        for (t, due) in cfg.tunnels.iter().zip(&mut self.due) {
            if due.is_none_or(|d| d > now) {
                continue;
            }
            *due = t.resolve_interval.map(|i| now + i);
            for (host, port) in t.targets.iter().filter_map(|x| x.host.as_ref()) {
                if !names.iter().any(|(h, p)| h == host && p == port) {
                    names.push((host.clone(), *port));
                }
            }
        }
        if names.is_empty() {
            return None;
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let resolver = self.resolver.clone();
        let spawned = std::thread::Builder::new()
            .name("sealpipe-resolve".into())
            .spawn(move || {
                let answers: Vec<Answer> = names
                    .into_iter()
                    .map(|(h, p)| {
                        let got = lookup(&*resolver, &h, p);
                        ((h, p), got)
                    })
                    .collect();
                let _ = tx.send(answers);
            });
        match spawned {
            Ok(_) => self.round = Some(rx),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a thread to resolve target names; trying again at the next interval")
            }
        }
        None
    }

    /// Applies a round's answers to `cfg`: new address lists where they changed, the last
    /// good ones kept where a name failed (counted and logged). Returns the tunnels whose
    /// lists changed, for the shards.
    pub fn apply(
        &mut self,
        cfg: &mut Config,
        answers: &[Answer],
        metrics: &Metrics,
        now: Instant,
    ) -> Vec<usize> {
        let mut changed = Vec::new();
        for (ti, t) in cfg.tunnels.iter_mut().enumerate() {
            for target in &mut t.targets {
                let Some(name) = &target.host else {
                    continue;
                };
                let Some((_, answer)) = answers.iter().find(|(n, _)| n == name) else {
                    continue;
                };
                match answer {
                    Ok(addrs) => {
                        self.recovered(&t.name, &target.spec);
                        if *addrs != target.addrs {
                            // DNS round robin reorders answers: only a new set is news.
                            let same_set = addrs.len() == target.addrs.len()
                                && addrs.iter().all(|a| target.addrs.contains(a));
                            if same_set {
                                tracing::debug!(tunnel = %t.name, target = %target.spec, addresses = ?addrs, "target name's addresses reordered");
                            } else {
                                tracing::info!(tunnel = %t.name, target = %target.spec, addresses = ?addrs, previous = ?target.addrs, "target name resolves to new addresses");
                            }
                            target.addrs = addrs.clone();
                            if !changed.contains(&ti) {
                                changed.push(ti);
                            }
                        }
                    }
                    Err(error) => {
                        let f = ResolveFailure {
                            tunnel: t.name.clone(),
                            target: target.spec.clone(),
                            error: error.clone(),
                        };
                        self.failed(&f, target.addrs.len(), metrics, now);
                    }
                }
            }
        }
        publish(metrics, cfg);
        changed
    }

    /// A name failed to resolve and keeps `kept` addresses: counted; logged unless it was
    /// logged less than [`WARN_EVERY`] ago.
    pub fn failed(&mut self, f: &ResolveFailure, kept: usize, metrics: &Metrics, now: Instant) {
        metrics
            .resolve_failures
            .with_label_values(&[&f.tunnel])
            .inc();
        let s = self
            .failing
            .entry((f.tunnel.clone(), f.target.clone()))
            .or_insert(Failing {
                since: now,
                failures: 0,
                next_warn: now,
                unwarned: 0,
            });
        s.failures += 1;
        s.unwarned += 1;
        if now >= s.next_warn {
            tracing::warn!(tunnel = %f.tunnel, target = %f.target, error = %f.error, kept_addresses = kept, failures = s.unwarned, "target name cannot be resolved; keeping its last good addresses");
            s.next_warn = now + WARN_EVERY;
            s.unwarned = 0;
        }
    }

    fn recovered(&mut self, tunnel: &str, target: &str) {
        if let Some(s) = self
            .failing
            .remove(&(tunnel.to_string(), target.to_string()))
        {
            tracing::info!(%tunnel, %target, failures = s.failures, failing_for = ?s.since.elapsed(), "target name resolves again");
        }
    }

    /// A reload resolved every name: failures are counted and logged as a round's are, and
    /// targets that resolved are no longer failing.
    pub fn reloaded(
        &mut self,
        cfg: &Config,
        failures: &[ResolveFailure],
        metrics: &Metrics,
        now: Instant,
    ) {
        for t in &cfg.tunnels {
            for target in t.targets.iter().filter(|x| x.host.is_some()) {
                match failures
                    .iter()
                    .find(|f| f.tunnel == t.name && f.target == target.spec)
                {
                    Some(f) => self.failed(f, target.addrs.len(), metrics, now),
                    None => self.recovered(&t.name, &target.spec),
                }
            }
        }
        self.failing.retain(|(tn, ts), _| {
            cfg.tunnels
                .iter()
                .any(|t| &t.name == tn && t.targets.iter().any(|x| &x.spec == ts))
        });
        self.schedule(cfg, now);
        metrics.target_addresses.reset();
        publish(metrics, cfg);
    }
}

/// Sets `sealpipe_target_addresses` from `cfg` (and creates each tunnel's
/// `sealpipe_resolve_failures_total` at 0, so it reads 0 rather than nothing before a failure).
pub fn publish(metrics: &Metrics, cfg: &Config) {
    for t in &cfg.tunnels {
        metrics.resolve_failures.with_label_values(&[&t.name]);
        for target in &t.targets {
            metrics
                .target_addresses
                .with_label_values(&[&t.name, &target.spec])
                .set(target.target_addrs().len() as i64);
        }
    }
}
