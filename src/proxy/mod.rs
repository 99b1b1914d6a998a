//! The proxy pipeline: joins the reactor and the protocol.
//!
//! Per connection, all on one shard: accept ([`listener::TunnelListener`]) -> client
//! `BufferEvent` -> connect to an upstream (connect timeout; on failure the next healthy
//! upstream) -> handshake on the sealed side (handshake timeout) -> pump both ways through the
//! codec ([`codec::SealFilter`]), sealing in place ([`conn::Conn`], whose decisions are its
//! I/O-free [`conn::ConnCore`]'s).
//!
//! Bounded memory per connection: a side reads only while its input holds less than
//! [`READ_HIGH`], and stops reading while the far side's output holds [`OUTPUT_HIGH`] or more,
//! until it drains to [`OUTPUT_LOW`]. Per direction that bounds buffered bytes to
//! `READ_HIGH + OUTPUT_HIGH + READ_HIGH` (one read batch may land just as the far side crosses
//! its mark) plus record framing (19 bytes per 16 KiB): 768 KiB, so 1.5 MiB per connection
//! in the worst case, and nothing at all when idle (empty buffers hold no chunks).
//! The pair harness's property tests hold every connection to this bound at every step
//! (`conn/pair.rs`, `MAX_BUFFERED`).

pub use sealpipe_codec as codec;
pub use sealpipe_proxy_header as proxy_header;
pub mod access_log;
pub mod cidr;
pub mod conn;
pub mod handoff;
pub mod health;
pub mod identity;
pub mod ids;
pub mod keepalive;
pub mod listener;
pub mod ratelimit;
pub mod upstream;
pub mod warm;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Mode, Tunnel};
use crate::metrics::{Bytes, Metrics, TunnelMetrics};
use crate::protocol::{HandshakeConfig, KeyId, KeySet};
use crate::reactor::{Context, HandlerId};
use prometheus::IntCounter;

pub use ids::{ListenAddr, ShardIdx, TargetAddr, TargetIdx, TunnelIdx};
use upstream::Upstreams;

/// Reading stops while this much input is pending.
pub const READ_HIGH: usize = 256 * 1024;
/// Reading from the near side stops while the far side has this much output pending...
pub const OUTPUT_HIGH: usize = 256 * 1024;
/// ...and resumes when it drains to this.
pub const OUTPUT_LOW: usize = 64 * 1024;
/// Ephemeral key pairs a shard keeps ready (each ~0.1 KiB), in its thread's pool
/// ([`codec::ephemeral`]). Enough for a burst of new connections between two idle moments;
/// beyond it, handshakes generate their own.
pub const EPHEMERAL_KEYS_READY: usize = codec::ephemeral::KEYS_READY;
/// At most one warning per tunnel and shard this often about sessions without forward secrecy
/// (the next one says how many sessions it covers).
pub const NO_FS_WARN_EVERY: Duration = Duration::from_secs(60);

/// Bytes carried, by direction (upstream = client to backend) and layer: one count per label
/// of `sealpipe_bytes_total`, indexed by the label ([`Bytes`]), not by a bare slot number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteCounts([u64; 4]);

impl ByteCounts {
    /// Every label, in slot order.
    pub const LABELS: [Bytes; 4] = [
        Bytes::UpPlain,
        Bytes::UpSealed,
        Bytes::DownPlain,
        Bytes::DownSealed,
    ];

    /// Each count less the same count of `earlier` (counts only grow).
    pub fn since(&self, earlier: &ByteCounts) -> ByteCounts {
        let mut d = *self;
        for (a, b) in d.0.iter_mut().zip(earlier.0) {
            *a -= b;
        }
        d
    }

    /// Adds each count of `other`.
    pub fn add(&mut self, other: &ByteCounts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    /// The counts with their labels.
    pub fn iter(&self) -> impl Iterator<Item = (Bytes, u64)> + '_ {
        Self::LABELS.into_iter().map(|l| (l, self[l]))
    }
}

impl std::ops::Index<Bytes> for ByteCounts {
    type Output = u64;
    fn index(&self, b: Bytes) -> &u64 {
        &self.0[b as usize]
    }
}

impl std::ops::IndexMut<Bytes> for ByteCounts {
    fn index_mut(&mut self, b: Bytes) -> &mut u64 {
        &mut self.0[b as usize]
    }
}

/// One tunnel as one shard runs it.
pub struct TunnelRt {
    pub index: TunnelIdx,
    pub cfg: Arc<Tunnel>,
    /// `None` for forward mode.
    pub handshake: Option<HandshakeConfig>,
    pub upstreams: Upstreams,
    pub metrics: TunnelMetrics,
    /// Shard-local byte counts not yet flushed to `metrics` (no atomics per read).
    pub bytes: ByteCounts,
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
    /// When a session without forward secrecy may next be warned about, and how many were
    /// accepted since the last warning.
    pub next_no_fs_warn: Instant,
    pub no_fs_unwarned: u64,
    /// The tunnel's access log writer (`access_log`; opened by the server, replaced on reload).
    pub access_log: Option<access_log::AccessLog>,
    /// An encrypt tunnel's warm sessions on this shard (`warm`).
    pub warm: warm::Pool,
    /// This shard's shares of the tunnel's rate limits (`ratelimit`).
    pub rates: ratelimit::ShardRates,
}

impl TunnelRt {
    pub fn new(
        index: TunnelIdx,
        cfg: Arc<Tunnel>,
        keys: Option<Arc<KeySet>>,
        metrics: &Metrics,
        shard: ShardIdx,
    ) -> TunnelRt {
        let upstreams = Upstreams::with_groups(&cfg.target_addrs(), cfg.balance);
        TunnelRt {
            rates: ratelimit::ShardRates::new(&cfg.rates, metrics.shards(), Instant::now()),
            index,
            key_sessions: Self::key_sessions(&cfg, keys.as_deref(), metrics),
            handshake: Self::handshake_config(&cfg, keys),
            metrics: metrics.tunnel(
                &cfg.name,
                shard.get(),
                &upstream_names(&upstreams),
                warm_side(cfg.mode),
            ),
            upstreams,
            bytes: ByteCounts::default(),
            active: 0,
            listener: None,
            listener_paused: false,
            key_update_interval: None,
            next_probe: None,
            next_no_fs_warn: Instant::now(),
            no_fs_unwarned: 0,
            access_log: None,
            warm: warm::Pool::default(),
            cfg,
        }
    }

    /// With the access log writer `access_log::open_all` opened for this tunnel.
    pub fn with_access_log(mut self, log: Option<access_log::AccessLog>) -> TunnelRt {
        self.access_log = log;
        self
    }

    /// A session without forward secrecy was accepted: `Some(sessions covered)` when it is
    /// time to warn about them (at most once per [`NO_FS_WARN_EVERY`]).
    pub fn may_warn_no_fs(&mut self, now: Instant) -> Option<u64> {
        self.no_fs_unwarned += 1;
        if now < self.next_no_fs_warn {
            return None;
        }
        self.next_no_fs_warn = now + NO_FS_WARN_EVERY;
        Some(std::mem::take(&mut self.no_fs_unwarned))
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
    ///
    /// Connections and probes in flight name their target by id, not by index, so the list
    /// may change under them (see `upstream`). The per-upstream metric handles are rebuilt in
    /// the new list's order here, with the list, so index `i` of both stays the same target;
    /// the series of removed targets are dropped.
    pub fn reload(
        &mut self,
        cfg: Arc<Tunnel>,
        keys: Option<Arc<KeySet>>,
        metrics: &Metrics,
        shard: ShardIdx,
    ) {
        self.key_sessions = Self::key_sessions(&cfg, keys.as_deref(), metrics);
        self.handshake = Self::handshake_config(&cfg, keys);
        self.rates
            .reconfigure(&cfg.rates, metrics.shards(), Instant::now());
        self.set_targets(cfg, metrics, shard);
    }

    /// Applies new target addresses (a reload, or target names resolved again), keeping
    /// every connection, and the id, health and counts of every address that stays.
    pub fn set_targets(&mut self, cfg: Arc<Tunnel>, metrics: &Metrics, shard: ShardIdx) {
        let old = upstream_names(&self.upstreams);
        self.upstreams
            .replace_groups(&cfg.target_addrs(), cfg.balance);
        let names = upstream_names(&self.upstreams);
        for gone in old.iter().filter(|a| !names.contains(a)) {
            metrics.forget_upstream(&self.cfg.name, gone);
        }
        self.metrics = metrics.tunnel(&cfg.name, shard.get(), &names, warm_side(cfg.mode));
        self.cfg = cfg;
    }

    /// Moves shard-local counts into the Prometheus counters, and publishes the rate limits'
    /// shares (and, for the rebalancer, what they counted).
    pub fn flush(&mut self, shard: ShardIdx, board: Option<&ratelimit::RateBoard>) {
        for (label, n) in std::mem::take(&mut self.bytes).iter() {
            if n > 0 {
                self.metrics.bytes[label as usize].inc_by(n);
            }
        }
        for k in ratelimit::Kind::ALL {
            let share = self.rates.get(k).map_or(0.0, |l| l.share());
            self.metrics.rate_share[k as usize].set(share);
        }
        if self.cfg.rates.is_empty() {
            return;
        }
        for dir in conn::core::Flow::ALL {
            let (n, secs) = self.rates.take_throttled(dir);
            if n > 0 {
                self.metrics.throttled[dir as usize].inc_by(n);
                self.metrics.throttled_seconds[dir as usize].inc_by(secs);
            }
        }
        if let Some(b) = board {
            self.rates.publish(b.slots(self.index.get(), shard.get()));
        }
    }
}

/// The side of a pair a tunnel's warm sessions count on (`sealpipe_warm_sessions{side}`).
fn warm_side(mode: Mode) -> Option<&'static str> {
    match mode {
        Mode::Encrypt => Some(crate::metrics::WARM_SIDES[0]),
        Mode::Decrypt => Some(crate::metrics::WARM_SIDES[1]),
        Mode::Forward => None,
    }
}

/// The `upstream` label of each address, in the list's order (index `i` of both is the same
/// address: see `upstream`'s invariants).
fn upstream_names(u: &Upstreams) -> Vec<String> {
    u.targets().iter().map(|t| t.addr.to_string()).collect()
}

/// Where a handshake's ephemeral key came from: the `source` label of
/// `sealpipe_ephemeral_keys_total`; the discriminant is its slot in
/// `metrics::EPHEMERAL_SOURCES` and in [`ShardState`]'s handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// Made ahead of time in the shard's spare time.
    Pool = 0,
    /// Made when the handshake needed it.
    OnDemand = 1,
}

impl KeySource {
    pub const ALL: [KeySource; 2] = [KeySource::Pool, KeySource::OnDemand];

    pub fn as_str(self) -> &'static str {
        match self {
            KeySource::Pool => "pool",
            KeySource::OnDemand => "on_demand",
        }
    }
}

/// A shard's state: what every callback on its loop reaches as `cx.state`.
pub struct ShardState {
    pub shard: ShardIdx,
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
    /// Pre-authentication admission: handshake and per-source caps (`listener::Admission`).
    pub admission: listener::Admission,
    /// A live upgrade's export window, while this shard hands its connections over.
    pub export: Option<handoff::ExportCtx>,
    /// `sealpipe_ephemeral_keys_total` of this shard (pool, on demand), and the counts of the
    /// thread's pool ([`codec::ephemeral::handed_out`]) already added to them.
    ephemeral_keys: [IntCounter; 2],
    ephemeral_published: (u64, u64),
    /// Clients' sockets on their way to the ready warm sessions that take them
    /// (`warm::take`), each for one notification.
    pub warm_handoffs: Vec<(HandlerId, warm::Handoff)>,
    /// xorshift64 state for `max_lifetime`'s jitter (spread, not secrecy).
    jitter_state: u64,
    /// Where the tunnels' rate limits publish what they counted (`ratelimit::Rebalancer`).
    pub rate_board: Option<Arc<ratelimit::RateBoard>>,
}

impl ShardState {
    pub fn new(
        shard: ShardIdx,
        tunnels: Vec<TunnelRt>,
        metrics: Arc<Metrics>,
        conn_limit: usize,
    ) -> Self {
        ShardState {
            shard,
            tunnels,
            conns: 0,
            conn_limit,
            draining: false,
            drain_deadline: None,
            live_conns: HashSet::new(),
            hibernations: 0,
            next_warn: Instant::now(),
            suppressed_warnings: 0,
            admission: listener::Admission::new(&crate::config::Admission::default(), 1),
            export: None,
            ephemeral_keys: metrics.ephemeral_keys(shard.get()),
            ephemeral_published: (0, 0),
            warm_handoffs: Vec::new(),
            metrics,
            // Any nonzero seed; shards differ, so do their draws.
            jitter_state: 0x9e37_79b9_7f4a_7c15 ^ (shard.get() as u64 + 1),
            rate_board: None,
        }
    }

    /// A connection's `max_lifetime` jitter, in thousandths: uniform from -100 to 100.
    pub fn lifetime_jitter(&mut self) -> i8 {
        let x = &mut self.jitter_state;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        let max = i16::from(conn::core::MAX_JITTER_PERMILLE);
        let drawn = (*x % (2 * max as u64 + 1)) as i16 - max;
        drawn as i8
    }

    /// Whether the shard has spare-time work (see `EventBase::set_idle`): warm sessions to
    /// make (`warm`), or ephemeral key pairs, if any tunnel may use forward secrecy and the
    /// thread's pool is below its target.
    pub fn wants_idle_work(&self) -> bool {
        if warm::wants(self) {
            return true;
        }
        codec::ephemeral::wants_refill()
            && self.tunnels.iter().any(|t| {
                t.handshake.as_ref().is_some_and(|h| {
                    // An initiator uses a key when it offers one; a responder whenever its
                    // peers do, which it cannot know ahead unless it requires it.
                    t.cfg.mode == Mode::Decrypt || h.forward_secrecy.offers()
                })
            })
    }

    /// One step of spare-time work: one warm session started (a connect; its key pair comes
    /// from the pool), or one ephemeral key pair (~40 µs).
    pub fn idle_step(cx: &mut Context<'_, ShardState>) {
        if warm::wants(cx.state) {
            return warm::idle_step(cx);
        }
        codec::ephemeral::refill_one();
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

    /// Publishes health and flushes byte counters (called a few times a second, on the shard's
    /// own thread, whose key pool it reads).
    pub fn flush(&mut self, now: Instant) {
        let (pool, on_demand) = codec::ephemeral::handed_out();
        let (p0, d0) = self.ephemeral_published;
        self.ephemeral_keys[KeySource::Pool as usize].inc_by(pool.saturating_sub(p0));
        self.ephemeral_keys[KeySource::OnDemand as usize].inc_by(on_demand.saturating_sub(d0));
        self.ephemeral_published = (pool, on_demand);
        for t in &mut self.tunnels {
            t.flush(self.shard, self.rate_board.as_deref());
            let healthy = t.upstreams.healthy(now);
            self.metrics
                .health
                .set_healthy(t.index.get(), self.shard.get(), healthy);
            for (i, u) in t.metrics.upstreams.iter().enumerate() {
                u.up.set(t.upstreams.is_up(TargetIdx::new(i), now) as i64);
            }
        }
    }
}

/// An optional I/O error as a log field, by its message (`error = %OptError(err.as_ref())`):
/// log lines show "Connection refused (os error 111)", never Rust's Debug form; `none` without
/// one.
pub struct OptError<'a>(pub Option<&'a std::io::Error>);

impl std::fmt::Display for OptError<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(e) => e.fmt(f),
            None => f.write_str("none"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_enums_sit_in_their_metric_slots() {
        for k in KeySource::ALL {
            assert_eq!(crate::metrics::EPHEMERAL_SOURCES[k as usize], k.as_str());
        }
        let mut counts = ByteCounts::default();
        counts[Bytes::DownSealed] += 5;
        counts[Bytes::UpPlain] += 2;
        let slots: Vec<(usize, u64)> = counts.iter().map(|(b, n)| (b as usize, n)).collect();
        assert_eq!(slots, [(0, 2), (1, 0), (2, 0), (3, 5)]);
        let later = ByteCounts([3, 1, 0, 5]);
        assert_eq!(later.since(&counts), ByteCounts([1, 1, 0, 0]));
    }

    /// The values of `label` as the metric's row in `metrics::FAMILIES` declares them.
    fn declared(family: &str, label: &str) -> &'static [&'static str] {
        let f = crate::metrics::family(family).unwrap_or_else(|| panic!("no row {family}"));
        let l = f.labels.iter().find(|l| l.name == label);
        l.and_then(|l| l.values)
            .unwrap_or_else(|| panic!("{family} declares no values of {label}"))
    }

    #[test]
    fn lifetime_jitter_is_spread_over_plus_minus_ten_percent() {
        let metrics = Metrics::new(1, 0);
        let mut st = ShardState::new(ShardIdx::new(0), Vec::new(), metrics, 1);
        let draws: Vec<i8> = (0..20_000).map(|_| st.lifetime_jitter()).collect();
        let (lo, hi) = (draws.iter().min().unwrap(), draws.iter().max().unwrap());
        assert_eq!(
            (*lo, *hi),
            (-100, 100),
            "the whole range, and nothing beyond"
        );
        // Spread: each tenth of the range gets its share (2,000 expected; ±25%).
        for tenth in 0..10 {
            let from = -100 + tenth * 20;
            let n = draws
                .iter()
                .filter(|&&d| i32::from(d) >= from && i32::from(d) < from + 20)
                .count();
            assert!((1500..2500).contains(&n), "[{from}, {}): {n}", from + 20);
        }
    }

    /// Each label enum's discriminant is its value's slot in the family's declared list, so
    /// a handle array built from that list is indexed by the enum.
    #[test]
    fn label_enums_follow_the_declared_value_lists() {
        let sources = declared("sealpipe_ephemeral_keys_total", "source");
        assert_eq!(sources.len(), KeySource::ALL.len());
        for k in KeySource::ALL {
            assert_eq!(sources[k as usize], k.as_str());
        }
        let directions = declared("sealpipe_flow_control_paused_total", "direction");
        assert_eq!(directions.len(), conn::core::Flow::ALL.len());
        for f in conn::core::Flow::ALL {
            assert_eq!(directions[f as usize], f.as_str());
        }
        let limits = declared("sealpipe_rate_limit_share", "limit");
        assert_eq!(limits.len(), ratelimit::Kind::ALL.len());
        for k in ratelimit::Kind::ALL {
            assert_eq!(limits[k as usize], k.as_str());
        }
        let reasons = declared("sealpipe_upstream_connect_failures_total", "reason");
        assert_eq!(reasons.len(), upstream::ConnectFailure::ALL.len());
        for r in upstream::ConnectFailure::ALL {
            assert_eq!(reasons[r as usize], r.as_str());
        }
        // Bytes: direction x layer, the direction major.
        let (dirs, layers) = (
            declared("sealpipe_bytes_total", "direction"),
            declared("sealpipe_bytes_total", "layer"),
        );
        let want = [
            (Bytes::UpPlain, "upstream", "plaintext"),
            (Bytes::UpSealed, "upstream", "sealed"),
            (Bytes::DownPlain, "downstream", "plaintext"),
            (Bytes::DownSealed, "downstream", "sealed"),
        ];
        assert_eq!(want.len(), dirs.len() * layers.len());
        for (i, (b, d, l)) in want.into_iter().enumerate() {
            assert_eq!(ByteCounts::LABELS[i] as usize, b as usize);
            let slot = b as usize;
            assert_eq!(
                (dirs[slot / layers.len()], layers[slot % layers.len()]),
                (d, l)
            );
        }
    }
}
