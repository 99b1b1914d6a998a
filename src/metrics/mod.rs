//! Metrics: the Prometheus registry, per-tunnel handles shards update, and the health state
//! behind `/healthz` and `/readyz`.
//!
//! Invariants:
//! - Labels are bounded by shards, tunnels, upstreams and fixed reason sets — never by peers.
//! - Nothing on the data path takes a lock: a shard resolves its label handles once
//!   ([`TunnelMetrics`]), bumps per-connection counters with one atomic add, and counts bytes in
//!   plain shard-local integers that it flushes a few times a second.
//! - Shards publish a heartbeat each loop turn; the endpoint only reads atomics.

pub mod http;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use prometheus::{
    CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Why a connection ended (label values of `sealpipe_connections_closed_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    Clean,
    IdleTimeout,
    PeerReset,
    UpstreamFailed,
    HandshakeFailed,
    Truncated,
    Tampered,
    DrainDeadline,
    /// The encrypt side's client aborted (reset): told to the decrypt side by an ABORT record.
    ClientReset,
    /// The decrypt side's backend aborted (reset): told to the encrypt side by an ABORT record.
    UpstreamReset,
    /// The kernel gave up on a peer that stopped answering (ETIMEDOUT): TCP keepalive's
    /// probes or TCP_USER_TIMEOUT (`proxy::keepalive`), or its retransmissions ran out.
    PeerTimeout,
}

impl CloseReason {
    pub const ALL: [CloseReason; 11] = [
        CloseReason::Clean,
        CloseReason::IdleTimeout,
        CloseReason::PeerReset,
        CloseReason::UpstreamFailed,
        CloseReason::HandshakeFailed,
        CloseReason::Truncated,
        CloseReason::Tampered,
        CloseReason::DrainDeadline,
        CloseReason::ClientReset,
        CloseReason::UpstreamReset,
        CloseReason::PeerTimeout,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Clean => "clean",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::PeerReset => "peer_reset",
            CloseReason::UpstreamFailed => "upstream_failed",
            CloseReason::HandshakeFailed => "handshake_failed",
            CloseReason::Truncated => "truncated",
            CloseReason::Tampered => "tampered",
            CloseReason::DrainDeadline => "drain_deadline",
            CloseReason::ClientReset => "client_reset",
            CloseReason::UpstreamReset => "upstream_reset",
            CloseReason::PeerTimeout => "peer_timeout",
        }
    }
}

/// Why a connection was turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    MaxConns,
    NoHealthyUpstream,
    Draining,
    /// The shard's cap on connections still in their handshake.
    MaxHandshakes,
    /// The cap on one source's connections in their handshake.
    SourceHandshakes,
    /// One source's new-connection rate (token bucket).
    SourceRate,
}

impl RejectReason {
    pub const ALL: [RejectReason; 6] = [
        RejectReason::MaxConns,
        RejectReason::NoHealthyUpstream,
        RejectReason::Draining,
        RejectReason::MaxHandshakes,
        RejectReason::SourceHandshakes,
        RejectReason::SourceRate,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MaxConns => "max_conns",
            RejectReason::NoHealthyUpstream => "no_healthy_upstream",
            RejectReason::Draining => "draining",
            RejectReason::MaxHandshakes => "max_handshakes",
            RejectReason::SourceHandshakes => "per_source_handshakes",
            RejectReason::SourceRate => "per_source_rate",
        }
    }
}

/// Handshake outcomes (`sealpipe_handshakes_total{result}`): `ok`, the protocol's error
/// reasons, and `timeout`.
pub const HANDSHAKE_RESULTS: [&str; 11] = [
    "ok",
    "bad_mac",
    "malformed",
    "unknown_key",
    "replay",
    "version",
    "truncated",
    "too_large",
    "timeout",
    "fs_required",
    "not_sealpipe",
];

/// Where a handshake's ephemeral key came from (`sealpipe_ephemeral_keys_total{source}`).
pub const EPHEMERAL_SOURCES: [&str; 2] = ["pool", "on_demand"];

pub const CONNECT_FAILURES: [&str; 3] = ["refused", "timeout", "other"];

/// Byte counter slots: direction (upstream = client to backend) x layer.
#[derive(Clone, Copy, Debug)]
pub enum Bytes {
    UpPlain = 0,
    UpSealed = 1,
    DownPlain = 2,
    DownSealed = 3,
}

/// All metric families of one process.
pub struct Metrics {
    pub registry: Registry,
    accepted: IntCounterVec,
    active: IntGaugeVec,
    hibernating: IntGaugeVec,
    rejected: IntCounterVec,
    closed: IntCounterVec,
    duration: HistogramVec,
    handshakes: IntCounterVec,
    sessions: IntCounterVec,
    ephemeral_keys: IntCounterVec,
    handshake_duration: HistogramVec,
    bytes: IntCounterVec,
    upstream_up: IntGaugeVec,
    upstream_failures: IntCounterVec,
    upstream_connect: HistogramVec,
    flow_paused: IntCounterVec,
    key_hibernations: IntCounterVec,
    pub pool_bytes: IntGaugeVec,
    pub loop_busy: CounterVec,
    pub loop_idle: CounterVec,
    pub loop_stall: IntCounterVec,
    pub heartbeat_age: GaugeVec,
    pub keys_loaded: IntGaugeVec,
    key_sessions: IntCounterVec,
    pub reloads: IntCounterVec,
    pub draining: IntGauge,
    pub accept_errors: IntCounterVec,
    pub log_lines_dropped: IntCounter,
    /// Target names that failed to resolve (the last good addresses were kept).
    pub resolve_failures: IntCounterVec,
    /// Addresses each configured target stands for now (1 for an IP address).
    pub target_addresses: IntGaugeVec,
    pub health: Health,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("sealpipe")
}

fn hopts(name: &str, help: &str, buckets: Vec<f64>) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace("sealpipe")
        .buckets(buckets)
}

macro_rules! reg {
    ($r:expr, $m:expr) => {{
        let m = $m.expect("metric definition");
        $r.register(Box::new(m.clone()))
            .expect("metric registration");
        m
    }};
}

impl Metrics {
    /// Builds every family; `shards` sizes the health state.
    pub fn new(shards: usize, tunnels: usize) -> Arc<Metrics> {
        let r = Registry::new();
        let lat = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0,
        ];
        let dur = vec![
            0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
        ];
        let m = Metrics {
            accepted: reg!(
                r,
                IntCounterVec::new(
                    opts("connections_accepted_total", "Connections accepted."),
                    &["tunnel", "shard"]
                )
            ),
            active: reg!(
                r,
                IntGaugeVec::new(
                    opts("connections_active", "Connections open now."),
                    &["tunnel", "shard"]
                )
            ),
            hibernating: reg!(
                r,
                IntGaugeVec::new(
                    opts(
                        "connections_hibernating",
                        "Open connections quiet long enough to have dropped their session keys and spare buffer lists."
                    ),
                    &["tunnel", "shard"]
                )
            ),
            rejected: reg!(
                r,
                IntCounterVec::new(
                    opts(
                        "connections_rejected_total",
                        "Connections turned away, by reason."
                    ),
                    &["tunnel", "reason"]
                )
            ),
            closed: reg!(
                r,
                IntCounterVec::new(
                    opts("connections_closed_total", "Connections ended, by reason."),
                    &["tunnel", "reason"]
                )
            ),
            duration: reg!(
                r,
                HistogramVec::new(
                    hopts(
                        "connection_duration_seconds",
                        "Lifetime of proxied connections.",
                        dur
                    ),
                    &["tunnel"]
                )
            ),
            handshakes: reg!(
                r,
                IntCounterVec::new(
                    opts("handshakes_total", "Tunnel handshakes, by result."),
                    &["tunnel", "result"]
                )
            ),
            sessions: reg!(
                r,
                IntCounterVec::new(
                    opts(
                        "sessions_total",
                        "Tunnel sessions established, by whether an ephemeral X25519 exchange gave them forward secrecy."
                    ),
                    &["tunnel", "fs"]
                )
            ),
            ephemeral_keys: reg!(
                r,
                IntCounterVec::new(
                    opts(
                        "ephemeral_keys_total",
                        "X25519 key pairs handshakes took, by source: made ahead in the shard's spare time (pool) or on the spot (on_demand)."
                    ),
                    &["shard", "source"]
                )
            ),
            handshake_duration: reg!(
                r,
                HistogramVec::new(
                    hopts(
                        "handshake_duration_seconds",
                        "Time from accept/connect to handshake completion.",
                        lat.clone()
                    ),
                    &["tunnel"]
                )
            ),
            bytes: reg!(
                r,
                IntCounterVec::new(
                    opts(
                        "bytes_total",
                        "Bytes carried, by direction (upstream = client to backend) and layer (plaintext or sealed wire bytes)."
                    ),
                    &["tunnel", "direction", "layer"]
                )
            ),
            upstream_up: reg!(
                r,
                IntGaugeVec::new(
                    opts(
                        "upstream_up",
                        "1 if the upstream is considered healthy by any shard."
                    ),
                    &["tunnel", "upstream"]
                )
            ),
            upstream_failures: reg!(
                r,
                IntCounterVec::new(
                    opts(
                        "upstream_connect_failures_total",
                        "Failed connects to an upstream, by reason."
                    ),
                    &["tunnel", "upstream", "reason"]
                )
            ),
            upstream_connect: reg!(
                r,
                HistogramVec::new(
                    hopts(
                        "upstream_connect_duration_seconds",
                        "Time to establish a TCP connection to an upstream.",
                        lat
                    ),
                    &["tunnel", "upstream"]
                )
            ),
            flow_paused: reg!(
                r,
                IntCounterVec::new(
                    opts(
                        "flow_control_paused_total",
                        "Times reading paused because the far side's output reached its high watermark."
                    ),
                    &["tunnel", "direction"]
                )
            ),
            key_hibernations: reg!(
                r,
                IntCounterVec::new(
                    opts(
                        "key_hibernations_total",
                        "Times a quiet connection dropped its expanded session keys (re-derived from the traffic secrets on its next record)."
                    ),
                    &["tunnel"]
                )
            ),
            pool_bytes: reg!(
                r,
                IntGaugeVec::new(
                    opts(
                        "buffer_pool_bytes",
                        "Buffer chunk memory per shard: cached (free) and live (in buffers)."
                    ),
                    &["shard", "state"]
                )
            ),
            loop_busy: reg!(
                r,
                CounterVec::new(
                    opts(
                        "loop_busy_seconds_total",
                        "Time the shard's loop spent running callbacks."
                    ),
                    &["shard"]
                )
            ),
            loop_idle: reg!(
                r,
                CounterVec::new(
                    opts(
                        "loop_idle_seconds_total",
                        "Time the shard's loop spent waiting for events."
                    ),
                    &["shard"]
                )
            ),
            loop_stall: reg!(
                r,
                IntCounterVec::new(
                    opts(
                        "loop_stall_total",
                        "Loop turns whose callbacks ran longer than the stall threshold (100 ms)."
                    ),
                    &["shard"]
                )
            ),
            heartbeat_age: reg!(
                r,
                GaugeVec::new(
                    opts(
                        "shard_heartbeat_age_seconds",
                        "Seconds since the shard's loop last turned."
                    ),
                    &["shard"]
                )
            ),
            key_sessions: reg!(
                r,
                IntCounterVec::new(
                    opts(
                        "key_sessions_total",
                        "Handshakes completed, by the pre-shared key they used (shows which keys are in use during a rotation)."
                    ),
                    &["tunnel", "key_id"]
                )
            ),
            keys_loaded: reg!(
                r,
                IntGaugeVec::new(
                    opts(
                        "keys_loaded",
                        "Keys loaded, by id and role (primary sends, accepted only receives)."
                    ),
                    &["tunnel", "key_id", "role"]
                )
            ),
            reloads: reg!(
                r,
                IntCounterVec::new(
                    opts(
                        "config_reloads_total",
                        "Configuration reloads (SIGHUP), by result."
                    ),
                    &["result"]
                )
            ),
            draining: reg!(
                r,
                IntGauge::with_opts(opts("draining", "1 while the process drains before exit."))
            ),
            accept_errors: reg!(
                r,
                IntCounterVec::new(
                    opts(
                        "accept_errors_total",
                        "accept() failures, by kind (exhausted = out of fds/memory: accepting paused with backoff)."
                    ),
                    &["tunnel", "kind"]
                )
            ),
            log_lines_dropped: reg!(
                r,
                IntCounter::with_opts(opts(
                    "log_lines_dropped_total",
                    "Log lines dropped because stderr did not keep up (the log queue was full)."
                ))
            ),
            resolve_failures: reg!(
                r,
                IntCounterVec::new(
                    opts(
                        "resolve_failures_total",
                        "Target name resolutions that failed (the target keeps its last good addresses)."
                    ),
                    &["tunnel"]
                )
            ),
            target_addresses: reg!(
                r,
                IntGaugeVec::new(
                    opts(
                        "target_addresses",
                        "Addresses a configured target stands for now (a name: what it last resolved to; an IP address: 1)."
                    ),
                    &["tunnel", "target"]
                )
            ),
            health: Health::new(shards, tunnels),
            registry: r,
        };
        let build = reg!(
            m.registry,
            IntGaugeVec::new(opts("build_info", "Build information."), &["version"])
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            m.registry
                .register(Box::new(pc))
                .expect("process collector");
        }
        for r in ["ok", "error"] {
            m.reloads.with_label_values(&[r]);
        }
        Arc::new(m)
    }

    /// Resolves every handle a shard needs for one tunnel (all label values pre-created, so
    /// queries return zeros instead of nothing before the first event).
    pub fn tunnel(&self, tunnel: &str, shard: usize, upstreams: &[String]) -> TunnelMetrics {
        let s = shard.to_string();
        TunnelMetrics {
            accepted: self.accepted.with_label_values(&[tunnel, &s]),
            active: self.active.with_label_values(&[tunnel, &s]),
            hibernating: self.hibernating.with_label_values(&[tunnel, &s]),
            rejected: RejectReason::ALL
                .map(|r| self.rejected.with_label_values(&[tunnel, r.as_str()])),
            closed: CloseReason::ALL.map(|r| self.closed.with_label_values(&[tunnel, r.as_str()])),
            duration: self.duration.with_label_values(&[tunnel]),
            handshakes: HANDSHAKE_RESULTS.map(|r| self.handshakes.with_label_values(&[tunnel, r])),
            sessions: ["yes", "no"].map(|fs| self.sessions.with_label_values(&[tunnel, fs])),
            handshake_duration: self.handshake_duration.with_label_values(&[tunnel]),
            bytes: [
                ("upstream", "plaintext"),
                ("upstream", "sealed"),
                ("downstream", "plaintext"),
                ("downstream", "sealed"),
            ]
            .map(|(d, l)| self.bytes.with_label_values(&[tunnel, d, l])),
            flow_paused: ["upstream", "downstream"]
                .map(|d| self.flow_paused.with_label_values(&[tunnel, d])),
            key_hibernations: self.key_hibernations.with_label_values(&[tunnel]),
            upstreams: upstreams
                .iter()
                .map(|u| UpstreamMetrics {
                    up: self.upstream_up.with_label_values(&[tunnel, u]),
                    failures: CONNECT_FAILURES
                        .map(|r| self.upstream_failures.with_label_values(&[tunnel, u, r])),
                    connect: self.upstream_connect.with_label_values(&[tunnel, u]),
                })
                .collect(),
            accept_exhausted: self.accept_errors.with_label_values(&[tunnel, "exhausted"]),
            accept_other: self.accept_errors.with_label_values(&[tunnel, "other"]),
        }
    }

    /// Drops the series of an upstream a reload removed from `tunnel`, so a target that is no
    /// longer configured leaves no stale `sealpipe_upstream_up` (nor an alert on it) behind.
    /// Shards that still hold its handles update detached children, which nothing exports.
    pub fn forget_upstream(&self, tunnel: &str, upstream: &str) {
        let _ = self.upstream_up.remove_label_values(&[tunnel, upstream]);
        for r in CONNECT_FAILURES {
            let _ = self
                .upstream_failures
                .remove_label_values(&[tunnel, upstream, r]);
        }
        let _ = self
            .upstream_connect
            .remove_label_values(&[tunnel, upstream]);
    }

    /// One shard's ephemeral-key counters, by [`EPHEMERAL_SOURCES`].
    pub fn ephemeral_keys(&self, shard: usize) -> [IntCounter; 2] {
        let s = shard.to_string();
        EPHEMERAL_SOURCES.map(|src| self.ephemeral_keys.with_label_values(&[&s, src]))
    }

    /// The per-key session counter of one tunnel's key (label values bounded by loaded keys).
    pub fn key_sessions(&self, tunnel: &str, key_id: &str) -> IntCounter {
        self.key_sessions.with_label_values(&[tunnel, key_id])
    }

    /// The text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// One upstream's handles.
#[derive(Clone)]
pub struct UpstreamMetrics {
    pub up: IntGauge,
    pub failures: [IntCounter; 3],
    pub connect: Histogram,
}

/// One tunnel's handles, resolved for one shard.
#[derive(Clone)]
pub struct TunnelMetrics {
    pub accepted: IntCounter,
    pub active: IntGauge,
    pub hibernating: IntGauge,
    pub rejected: [IntCounter; 6],
    pub closed: [IntCounter; 11],
    pub duration: Histogram,
    pub handshakes: [IntCounter; 11],
    /// Sessions established: `[fs="yes", fs="no"]`.
    pub sessions: [IntCounter; 2],
    pub handshake_duration: Histogram,
    pub bytes: [IntCounter; 4],
    pub flow_paused: [IntCounter; 2],
    pub key_hibernations: IntCounter,
    pub upstreams: Vec<UpstreamMetrics>,
    pub accept_exhausted: IntCounter,
    pub accept_other: IntCounter,
}

impl TunnelMetrics {
    pub fn closed(&self, r: CloseReason) {
        self.closed[r as usize].inc();
    }
    pub fn rejected(&self, r: RejectReason) {
        self.rejected[r as usize].inc();
    }
    pub fn handshake(&self, result: &str) {
        if let Some(i) = HANDSHAKE_RESULTS.iter().position(|r| *r == result) {
            self.handshakes[i].inc();
        }
    }
    pub fn session(&self, forward_secrecy: bool) {
        self.sessions[usize::from(!forward_secrecy)].inc();
    }
}

/// What `/healthz` and `/readyz` read: written by shards and the control thread, read by the
/// endpoint, all atomics.
pub struct Health {
    start: Instant,
    /// Per shard: milliseconds since `start` at the last loop turn.
    heartbeats: Vec<AtomicU64>,
    /// Per tunnel x shard: healthy upstreams in that shard's view.
    healthy: Vec<AtomicUsize>,
    tunnels: usize,
    pub listeners_up: AtomicUsize,
    pub listeners_expected: AtomicUsize,
    pub draining: AtomicBool,
    /// Set once this process handed its listeners (metrics included) to a successor: the
    /// endpoint stops accepting so that scrapes reach the new process.
    pub handed_off: AtomicBool,
}

impl Health {
    fn new(shards: usize, tunnels: usize) -> Health {
        Health {
            start: Instant::now(),
            heartbeats: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            healthy: (0..shards * tunnels)
                .map(|_| AtomicUsize::new(usize::MAX))
                .collect(),
            tunnels,
            listeners_up: AtomicUsize::new(0),
            listeners_expected: AtomicUsize::new(shards * tunnels),
            draining: AtomicBool::new(false),
            handed_off: AtomicBool::new(false),
        }
    }

    pub fn beat(&self, shard: usize, now: Instant) {
        if let Some(h) = self.heartbeats.get(shard) {
            h.store((now - self.start).as_millis() as u64, Ordering::Relaxed);
        }
    }

    pub fn set_healthy(&self, tunnel: usize, shard: usize, n: usize) {
        if let Some(h) = self.healthy.get(shard * self.tunnels + tunnel) {
            h.store(n, Ordering::Relaxed);
        }
    }

    /// Seconds since each shard's last turn.
    pub fn heartbeat_ages(&self, now: Instant) -> Vec<f64> {
        let now_ms = (now - self.start).as_millis() as u64;
        self.heartbeats
            .iter()
            .map(|h| now_ms.saturating_sub(h.load(Ordering::Relaxed)) as f64 / 1000.0)
            .collect()
    }

    /// `Ok` or the reason the process is not live.
    pub fn live(&self, stall: f64) -> Result<(), String> {
        for (i, age) in self.heartbeat_ages(Instant::now()).iter().enumerate() {
            if *age > stall {
                return Err(format!("shard {i} loop has not turned for {age:.1}s"));
            }
        }
        Ok(())
    }

    /// `Ok` or the reason the process should get no traffic.
    pub fn ready(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("draining".into());
        }
        let up = self.listeners_up.load(Ordering::Relaxed);
        let want = self.listeners_expected.load(Ordering::Relaxed);
        if up < want {
            return Err(format!("{up} of {want} listeners up"));
        }
        let shards = self.heartbeats.len();
        for t in 0..self.tunnels {
            let any =
                (0..shards).any(|s| self.healthy[s * self.tunnels + t].load(Ordering::Relaxed) > 0);
            if !any {
                return Err(format!("tunnel #{t} has no healthy upstream"));
            }
        }
        Ok(())
    }
}
