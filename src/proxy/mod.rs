//! The proxy pipeline: joins the reactor and the protocol.
//!
//! Per connection, all on one shard: accept ([`listener::TunnelListener`]) -> client
//! `BufferEvent` -> connect to an upstream (connect timeout; on failure the next healthy
//! upstream) -> handshake on the sealed side (handshake timeout) -> pump both ways through the
//! codec ([`codec::SealFilter`]), sealing in place ([`conn::Conn`]).
//!
//! Bounded memory per connection: a side reads only while its input holds less than
//! [`READ_HIGH`], and stops reading while the far side's output holds [`OUTPUT_HIGH`] or more,
//! until it drains to [`OUTPUT_LOW`]. Per direction that bounds buffered bytes to
//! `READ_HIGH + OUTPUT_HIGH + READ_HIGH` (one read batch may land just as the far side crosses
//! its mark) plus record framing (19 bytes per 16 KiB): 768 KiB, so 1.5 MiB per connection
//! in the worst case, and nothing at all when idle (empty buffers hold no chunks).

pub use sealpipe_codec as codec;
pub mod conn;
pub mod health;
pub mod listener;
pub mod upstream;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use crate::config::{Mode, Tunnel};
use crate::metrics::{Metrics, TunnelMetrics};
use crate::protocol::{EphemeralPool, HandshakeConfig, KeyId, KeySet, OsRandom};
use crate::reactor::HandlerId;
use prometheus::IntCounter;

use upstream::Upstreams;

/// Reading stops while this much input is pending.
pub const READ_HIGH: usize = 256 * 1024;
/// Reading from the near side stops while the far side has this much output pending...
pub const OUTPUT_HIGH: usize = 256 * 1024;
/// ...and resumes when it drains to this.
pub const OUTPUT_LOW: usize = 64 * 1024;
/// Ephemeral key pairs a shard keeps ready (each ~0.1 KiB). Enough for a burst of new
/// connections between two idle moments; beyond it, handshakes generate their own.
pub const EPHEMERAL_KEYS_READY: usize = 16;

/// One tunnel as one shard runs it.
pub struct TunnelRt {
    pub index: usize,
    pub cfg: Arc<Tunnel>,
    /// `None` for forward mode.
    pub handshake: Option<HandshakeConfig>,
    pub upstreams: Upstreams,
    pub metrics: TunnelMetrics,
    /// Shard-local byte counts not yet flushed to `metrics` (no atomics per read).
    pub bytes: [u64; 4],
    /// Connections of this tunnel open on this shard.
    pub active: usize,
    pub listener: Option<HandlerId>,
    pub listener_paused: bool,
    /// Sessions counted per pre-shared key (resolved when keys load, not per handshake).
    pub key_sessions: Vec<(KeyId, IntCounter)>,
    /// When this shard next probes the targets (active health checks).
    pub next_probe: Option<Instant>,
    /// Tests shrink the rekey interval to exercise key updates.
    pub key_update_interval: Option<u64>,
}

impl TunnelRt {
    pub fn new(
        index: usize,
        cfg: Arc<Tunnel>,
        keys: Option<Arc<KeySet>>,
        metrics: &Metrics,
        shard: usize,
    ) -> TunnelRt {
        let names: Vec<String> = cfg.targets.iter().map(|a| a.to_string()).collect();
        TunnelRt {
            index,
            key_sessions: Self::key_sessions(&cfg, keys.as_deref(), metrics),
            handshake: Self::handshake_config(&cfg, keys),
            upstreams: Upstreams::new(&cfg.targets, cfg.balance),
            metrics: metrics.tunnel(&cfg.name, shard, &names),
            bytes: [0; 4],
            active: 0,
            listener: None,
            listener_paused: false,
            key_update_interval: None,
            next_probe: None,
            cfg,
        }
    }

    fn key_sessions(cfg: &Tunnel, keys: Option<&KeySet>, m: &Metrics) -> Vec<(KeyId, IntCounter)> {
        keys.map(|k| {
            k.ids()
                .map(|id| (id, m.key_sessions(&cfg.name, &id.to_string())))
                .collect()
        })
        .unwrap_or_default()
    }

    /// Counts a completed handshake under the key it used.
    pub fn count_session(&self, id: Option<KeyId>) {
        if let Some((_, c)) = id.and_then(|id| self.key_sessions.iter().find(|(k, _)| *k == id)) {
            c.inc();
        }
    }

    fn handshake_config(cfg: &Tunnel, keys: Option<Arc<KeySet>>) -> Option<HandshakeConfig> {
        match (cfg.mode, keys) {
            (Mode::Forward, _) | (_, None) => None,
            (_, Some(keys)) => Some(HandshakeConfig {
                keys,
                forward_secrecy: cfg.forward_secrecy,
                aead: cfg.aead,
            }),
        }
    }

    /// Applies a reloaded configuration of the same tunnel (targets, timeouts, keys).
    pub fn reload(
        &mut self,
        cfg: Arc<Tunnel>,
        keys: Option<Arc<KeySet>>,
        metrics: &Metrics,
        shard: usize,
    ) {
        let names: Vec<String> = cfg.targets.iter().map(|a| a.to_string()).collect();
        self.metrics = metrics.tunnel(&cfg.name, shard, &names);
        self.upstreams.replace(&cfg.targets, cfg.balance);
        self.key_sessions = Self::key_sessions(&cfg, keys.as_deref(), metrics);
        self.handshake = Self::handshake_config(&cfg, keys);
        self.cfg = cfg;
    }

    /// Moves shard-local byte counts into the Prometheus counters.
    pub fn flush(&mut self) {
        for (i, b) in self.bytes.iter_mut().enumerate() {
            if *b > 0 {
                self.metrics.bytes[i].inc_by(*b);
                *b = 0;
            }
        }
    }
}

/// A shard's state: what every callback on its loop reaches as `cx.state`.
pub struct ShardState {
    pub shard: usize,
    pub tunnels: Vec<TunnelRt>,
    pub metrics: Arc<Metrics>,
    /// Proxied connections open on this shard.
    pub conns: usize,
    /// This shard's share of the process's connection limit.
    pub conn_limit: usize,
    pub draining: bool,
    /// When draining: the instant open connections are cut.
    pub drain_deadline: Option<Instant>,
    /// Open connections, so a drain deadline can close them (and count them).
    pub live_conns: HashSet<HandlerId>,
    /// Connections that hibernated on this shard so far (the memory keeper trims after many).
    pub hibernations: u64,
    /// Rate limit for warnings about bad peers: next instant a warning may be logged.
    pub next_warn: Instant,
    pub suppressed_warnings: u64,
    /// X25519 key pairs made in the loop's spare time for this shard's handshakes.
    pub ephemeral_keys: EphemeralPool,
}

impl ShardState {
    pub fn new(
        shard: usize,
        tunnels: Vec<TunnelRt>,
        metrics: Arc<Metrics>,
        conn_limit: usize,
    ) -> Self {
        ShardState {
            shard,
            tunnels,
            metrics,
            conns: 0,
            conn_limit,
            draining: false,
            drain_deadline: None,
            live_conns: HashSet::new(),
            hibernations: 0,
            next_warn: Instant::now(),
            suppressed_warnings: 0,
            ephemeral_keys: EphemeralPool::new(EPHEMERAL_KEYS_READY),
        }
    }

    /// Whether the shard has spare-time work (see `EventBase::set_idle`): ephemeral key pairs
    /// to make, if any tunnel uses forward secrecy and the pool is below its target.
    pub fn wants_idle_work(&self) -> bool {
        self.ephemeral_keys.wants_refill()
            && self
                .tunnels
                .iter()
                .any(|t| t.handshake.as_ref().is_some_and(|h| h.forward_secrecy))
    }

    /// One step of spare-time work: one ephemeral key pair (~40 µs).
    pub fn idle_step(&mut self) {
        self.ephemeral_keys.refill_one(&mut OsRandom);
    }

    /// True if a warning may be logged now (at most 10 per second per shard); counts the
    /// ones it suppresses so the next logged line can say how many were skipped.
    pub fn may_warn(&mut self, now: Instant) -> Option<u64> {
        if now >= self.next_warn {
            self.next_warn = now + std::time::Duration::from_millis(100);
            let skipped = self.suppressed_warnings;
            self.suppressed_warnings = 0;
            Some(skipped)
        } else {
            self.suppressed_warnings += 1;
            None
        }
    }

    /// Publishes health and flushes byte counters (called a few times a second).
    pub fn flush(&mut self, now: Instant) {
        for t in &mut self.tunnels {
            t.flush();
            let healthy = t.upstreams.healthy(now);
            self.metrics
                .health
                .set_healthy(t.index, self.shard, healthy);
            for (i, u) in t.metrics.upstreams.iter().enumerate() {
                u.up.set(t.upstreams.is_up(i, now) as i64);
            }
        }
    }
}

/// An optional I/O error as a log field, by its message (`error = %OptError(&err)`): log
/// lines show "Connection refused (os error 111)", never Rust's Debug form; `none` without one.
pub struct OptError<'a>(pub &'a Option<std::io::Error>);

impl std::fmt::Display for OptError<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(e) => e.fmt(f),
            None => f.write_str("none"),
        }
    }
}
