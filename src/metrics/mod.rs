//! Metrics: every family declared once in [`FAMILIES`], the Prometheus registry built from it,
//! the per-tunnel handles shards update, and the health state behind `/healthz` and `/readyz`.
//!
//! Invariants:
//! - [`FAMILIES`] is the one declaration of what the endpoint exports: name, type, label names,
//!   the values of enumerated labels, who writes the family, and its help text. Registration
//!   goes through it ([`Metrics::new`] builds each family from its row and refuses a row whose
//!   type does not match the handle), and tests hold docs/METRICS.md and a live scrape to it.
//! - Labels are bounded by shards, tunnels, upstreams, loaded keys and the fixed value lists
//!   below — never by peers.
//! - Nothing on the data path takes a lock. A family written by shards either has a `shard`
//!   label (one child per shard, written by that shard alone: [`Written::Shard`]) or is one
//!   atomic shared by the tunnel's shards and bumped once per event — a connection, a
//!   handshake, a pause — never per byte ([`Written::Shared`]); bytes are counted in shard-local
//!   integers and flushed a few times a second ([`Written::Flushed`]). No gauge is shared: a
//!   gauge that several shards set would show whichever wrote last.
//! - Shards publish a heartbeat each loop turn; the endpoint only reads atomics.
//!
//! Adding a metric:
//! 1. a row in [`FAMILIES`] (full name with the `sealpipe_` prefix, kind, labels in the order
//!    the code passes their values, who writes it, help);
//! 2. a field built with `b.family("sealpipe_...")` in [`Metrics::new`] (a per-tunnel handle in
//!    [`TunnelMetrics`] if shards bump it), with every enumerated value created at start-up;
//! 3. the same row in the tables of docs/METRICS.md. `cargo test -p sealpipe --lib metrics`
//!    names any difference, and prints the row it expects for a missing one.

pub mod http;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use prometheus::core::Collector;
use prometheus::{
    CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

// ---------------------------------------------------------------------------------------------
// The table

/// A family's Prometheus type (histograms with their bucket bounds, in seconds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram(&'static [f64]),
}

impl Kind {
    /// The word of the `# TYPE` line (and of docs/METRICS.md's type column).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram(_) => "histogram",
        }
    }
}

/// Who writes a family, which says what one sample means when a process runs several shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// One child per shard (the family has a `shard` label), written by that shard alone.
    Shard,
    /// One atomic per label set, shared by all shards: one add per event (a connection, a
    /// handshake, a pause, a failed connect), never per byte.
    Shared,
    /// Counted in shard-local integers, added to a shared counter a few times a second.
    Flushed,
    /// Written by the control thread: at start-up, on reload, on drain.
    Control,
    /// Computed by the endpoint when it is scraped.
    Scrape,
    /// The process collector's, read from /proc when scraped.
    Process,
}

impl Written {
    /// The word of docs/METRICS.md's "written" column.
    pub fn as_str(self) -> &'static str {
        match self {
            Written::Shard => "shard",
            Written::Shared => "shared",
            Written::Flushed => "flushed",
            Written::Control => "control",
            Written::Scrape => "scrape",
            Written::Process => "process",
        }
    }
}

/// A label: its name and, for an enumerated label, every value it takes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Label {
    pub name: &'static str,
    /// `None` for labels bounded by configuration (tunnel, shard, upstream, key id, version).
    pub values: Option<&'static [&'static str]>,
}

const fn label(name: &'static str) -> Label {
    Label { name, values: None }
}

const fn one_of(name: &'static str, values: &'static [&'static str]) -> Label {
    Label {
        name,
        values: Some(values),
    }
}

/// One metric family, as registered and as documented.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    /// In the order the code passes their values.
    pub labels: &'static [Label],
    pub written: Written,
    pub help: &'static str,
}

impl Family {
    pub fn label_names(&self) -> Vec<&'static str> {
        self.labels.iter().map(|l| l.name).collect()
    }
}

const TUNNEL: Label = label("tunnel");
const SHARD: Label = label("shard");
const UPSTREAM: Label = label("upstream");
const KEY_ID: Label = label("key_id");

/// Why a connection ended (label values of `sealpipe_connections_closed_total`), in
/// [`CloseReason`] order.
pub const CLOSE_REASONS: [&str; 14] = [
    "clean",
    "idle_timeout",
    "peer_reset",
    "upstream_failed",
    "handshake_failed",
    "truncated",
    "tampered",
    "drain_deadline",
    "client_reset",
    "upstream_reset",
    "proxy_header",
    "peer_timeout",
    "unopened",
    "max_lifetime",
];

/// Why a connection was turned away, in [`RejectReason`] order.
pub const REJECT_REASONS: [&str; 9] = [
    "max_conns",
    "no_healthy_upstream",
    "draining",
    "max_handshakes",
    "per_source_handshakes",
    "per_source_rate",
    "untrusted_proxy",
    "acl",
    "rate",
];

/// Handshake outcomes (`sealpipe_handshakes_total{result}`): `ok`, every reason of the
/// protocol's errors (`ProtocolError::reason`; a unit test keeps this list complete), and
/// `timeout`.
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

/// Whether a session has forward secrecy (`sealpipe_sessions_total{fs}`), in the order of
/// [`TunnelMetrics::sessions`].
pub const FS_VALUES: [&str; 2] = ["yes", "no"];

/// Where a handshake's ephemeral key came from (`sealpipe_ephemeral_keys_total{source}`).
pub const EPHEMERAL_SOURCES: [&str; 2] = ["pool", "on_demand"];

/// How `max_lifetime` ended a connection (`sealpipe_max_lifetime_ends_total{end}`), in the order
/// of [`TunnelMetrics::lifetime_ends`].
pub const LIFETIME_ENDS: [&str; 2] = ["graceful", "forced"];

/// What a tunnel's rate limit counts (`sealpipe_rate_limit_share{limit}`), in the order of
/// `proxy::ratelimit::Kind`.
pub const RATE_LIMITS: [&str; 3] = ["conns", "upstream", "downstream"];

/// Why an access log line was lost (`sealpipe_access_log_dropped_total{reason}`).
pub const ACCESS_LOG_DROPS: [&str; 2] = ["queue_full", "write_error"];

/// Why the metrics endpoint closed or refused a connection
/// (`sealpipe_metrics_endpoint_closed_total{reason}`).
pub const ENDPOINT_CLOSE_REASONS: [&str; 5] = [
    "header_timeout",
    "request_timeout",
    "evicted",
    "fd_reserve",
    "accept_error",
];

/// Which side of a pair a warm session is counted on (`sealpipe_warm_sessions{side}`): the
/// encrypt side's ready sessions, the decrypt side's unopened ones.
pub const WARM_SIDES: [&str; 2] = ["encrypt", "decrypt"];

/// What happened to warm sessions (`sealpipe_warm_events_total{event}`), in [`WarmEvent`]
/// order: the encrypt side's events, then the decrypt side's.
pub const WARM_EVENTS: [&str; 13] = [
    "made", "used", "missed", "retired", "lost", "failed", "retried", "held", "opened", "unused",
    "expired", "shutdown", "over_cap",
];

/// Why a connect to an upstream failed, in the order of [`UpstreamMetrics::failures`].
pub const CONNECT_FAILURES: [&str; 3] = ["refused", "timeout", "other"];
/// `upstream` = client to backend.
pub const DIRECTIONS: [&str; 2] = ["upstream", "downstream"];
pub const LAYERS: [&str; 2] = ["plaintext", "sealed"];
pub const POOL_STATES: [&str; 2] = ["cached", "live"];
pub const KEY_ROLES: [&str; 2] = ["primary", "accepted"];
pub const RELOAD_RESULTS: [&str; 2] = ["ok", "error"];
pub const HANDOFF_RESULTS: [&str; 3] = ["moved", "kept", "failed"];
pub const ACCEPT_ERROR_KINDS: [&str; 2] = ["exhausted", "other"];

/// Seconds: 100 µs to 10 s (handshakes, connects).
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Seconds: 1 ms to 4 h (connection lifetimes).
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
];

/// Every family this process exports. docs/METRICS.md has one row per entry, in its tables.
pub const FAMILIES: &[Family] = &[
    // Connections
    Family {
        name: "sealpipe_connections_accepted_total",
        kind: Kind::Counter,
        labels: &[TUNNEL, SHARD],
        written: Written::Shard,
        help: "Connections accepted.",
    },
    Family {
        name: "sealpipe_connections_active",
        kind: Kind::Gauge,
        labels: &[TUNNEL, SHARD],
        written: Written::Shard,
        help: "Connections open now.",
    },
    Family {
        name: "sealpipe_connections_hibernating",
        kind: Kind::Gauge,
        labels: &[TUNNEL, SHARD],
        written: Written::Shard,
        help: "Open connections quiet long enough to have dropped their session keys and spare buffer lists.",
    },
    Family {
        name: "sealpipe_connections_rejected_total",
        kind: Kind::Counter,
        labels: &[TUNNEL, one_of("reason", &REJECT_REASONS)],
        written: Written::Shared,
        help: "Connections turned away, by reason.",
    },
    Family {
        name: "sealpipe_connections_closed_total",
        kind: Kind::Counter,
        labels: &[TUNNEL, one_of("reason", &CLOSE_REASONS)],
        written: Written::Shared,
        help: "Connections ended, by reason.",
    },
    Family {
        name: "sealpipe_accept_errors_total",
        kind: Kind::Counter,
        labels: &[TUNNEL, one_of("kind", &ACCEPT_ERROR_KINDS)],
        written: Written::Shared,
        help: "accept() failures, by kind (exhausted = out of fds/memory: accepting paused with backoff).",
    },
    Family {
        name: "sealpipe_connection_duration_seconds",
        kind: Kind::Histogram(DURATION_BUCKETS),
        labels: &[TUNNEL],
        written: Written::Shared,
        help: "Lifetime of proxied connections.",
    },
    Family {
        name: "sealpipe_max_lifetime_ends_total",
        kind: Kind::Counter,
        labels: &[TUNNEL, one_of("end", &LIFETIME_ENDS)],
        written: Written::Shared,
        help: "Connections max_lifetime ended: graceful (at a quiet moment, a clean end both ways) or forced (reset at the end of max_lifetime_grace).",
    },
    Family {
        name: "sealpipe_throttled_total",
        kind: Kind::Counter,
        labels: &[TUNNEL, one_of("direction", &DIRECTIONS)],
        written: Written::Flushed,
        help: "Times a connection's reading paused because the tunnel's byte rate limit (upstream_rate, downstream_rate) had no bytes left on its shard.",
    },
    Family {
        name: "sealpipe_throttled_seconds_total",
        kind: Kind::Counter,
        labels: &[TUNNEL, one_of("direction", &DIRECTIONS)],
        written: Written::Flushed,
        help: "Time connections spent paused by the tunnel's byte rate limit, summed over connections.",
    },
    Family {
        name: "sealpipe_rate_limit_share",
        kind: Kind::Gauge,
        labels: &[TUNNEL, SHARD, one_of("limit", &RATE_LIMITS)],
        written: Written::Shard,
        help: "This shard's share of the tunnel's rate limit now, per second (connections, or bytes each way); the shards' shares add up to the limit. 0 without that limit.",
    },
    Family {
        name: "sealpipe_warm_sessions",
        kind: Kind::Gauge,
        labels: &[TUNNEL, SHARD, one_of("side", &WARM_SIDES)],
        written: Written::Shard,
        help: "Warm sessions held now: on an encrypt side, connected and handshaken sessions ready for new clients; on a decrypt side, sessions handshaken without an OPEN yet.",
    },
    Family {
        name: "sealpipe_warm_events_total",
        kind: Kind::Counter,
        labels: &[TUNNEL, one_of("event", &WARM_EVENTS)],
        written: Written::Shared,
        help: "Warm sessions, by event. Encrypt side: made (ready), used (a new client took one), missed (a new client found none: it connected as usual), retired (closed unused: refresh, less demand, drain), lost (closed by the decrypt side or the network before use), failed (connect or handshake failed), retried (declined before its OPEN was acted on: the client's bytes went again on a fresh session). Decrypt side: held (handshaken without an OPEN), opened (its OPEN came), unused (closed unused by the encrypt side), expired (warm_idle_timeout), shutdown (closed at drain), over_cap (max_unopened_per_source).",
    },
    Family {
        name: "sealpipe_flow_control_paused_total",
        kind: Kind::Counter,
        labels: &[TUNNEL, one_of("direction", &DIRECTIONS)],
        written: Written::Shared,
        help: "Times reading paused because the far side's output reached its high watermark.",
    },
    // Handshakes and keys
    Family {
        name: "sealpipe_handshakes_total",
        kind: Kind::Counter,
        labels: &[TUNNEL, one_of("result", &HANDSHAKE_RESULTS)],
        written: Written::Shared,
        help: "Tunnel handshakes, by result.",
    },
    Family {
        name: "sealpipe_sessions_total",
        kind: Kind::Counter,
        labels: &[TUNNEL, one_of("fs", &FS_VALUES)],
        written: Written::Shared,
        help: "Tunnel sessions established, by whether an ephemeral X25519 exchange gave them forward secrecy.",
    },
    Family {
        name: "sealpipe_ephemeral_keys_total",
        kind: Kind::Counter,
        labels: &[SHARD, one_of("source", &EPHEMERAL_SOURCES)],
        written: Written::Shard,
        help: "X25519 key pairs handshakes took, by source: made ahead in the shard's spare time (pool) or on the spot (on_demand).",
    },
    Family {
        name: "sealpipe_handshake_duration_seconds",
        kind: Kind::Histogram(LATENCY_BUCKETS),
        labels: &[TUNNEL],
        written: Written::Shared,
        help: "Time from accept/connect to handshake completion.",
    },
    Family {
        name: "sealpipe_key_sessions_total",
        kind: Kind::Counter,
        labels: &[TUNNEL, KEY_ID],
        written: Written::Shared,
        help: "Handshakes completed, by the pre-shared key they used (shows which keys are in use during a rotation).",
    },
    Family {
        name: "sealpipe_key_hibernations_total",
        kind: Kind::Counter,
        labels: &[TUNNEL],
        written: Written::Shared,
        help: "Times a quiet connection dropped its expanded session keys (re-derived from the traffic secrets on its next record).",
    },
    Family {
        name: "sealpipe_keys_loaded",
        kind: Kind::Gauge,
        labels: &[TUNNEL, KEY_ID, one_of("role", &KEY_ROLES)],
        written: Written::Control,
        help: "Keys loaded, by id and role (primary sends, accepted only receives).",
    },
    Family {
        name: "sealpipe_config_reloads_total",
        kind: Kind::Counter,
        labels: &[one_of("result", &RELOAD_RESULTS)],
        written: Written::Control,
        help: "Configuration reloads (SIGHUP), by result.",
    },
    Family {
        name: "sealpipe_handoff_connections_total",
        kind: Kind::Counter,
        labels: &[one_of("result", &HANDOFF_RESULTS)],
        written: Written::Shared,
        help: "Established connections in a live upgrade (--handoff), by result, as this process saw it: moved (to the successor), kept (refused by the successor, or not settled in time: the old process keeps and drains it), failed (lost in the move).",
    },
    // Traffic
    Family {
        name: "sealpipe_bytes_total",
        kind: Kind::Counter,
        labels: &[
            TUNNEL,
            one_of("direction", &DIRECTIONS),
            one_of("layer", &LAYERS),
        ],
        written: Written::Flushed,
        help: "Bytes carried, by direction (upstream = client to backend) and layer (plaintext or sealed wire bytes).",
    },
    // Upstreams
    Family {
        name: "sealpipe_upstream_up",
        kind: Kind::Gauge,
        labels: &[TUNNEL, UPSTREAM, SHARD],
        written: Written::Shard,
        help: "1 if this shard considers the upstream healthy (its own connects, and active checks if enabled).",
    },
    Family {
        name: "sealpipe_upstream_connect_failures_total",
        kind: Kind::Counter,
        labels: &[TUNNEL, UPSTREAM, one_of("reason", &CONNECT_FAILURES)],
        written: Written::Shared,
        help: "Failed connects to an upstream, by reason.",
    },
    Family {
        name: "sealpipe_target_addresses",
        kind: Kind::Gauge,
        labels: &[TUNNEL, label("target")],
        written: Written::Control,
        help: "Addresses a configured target stands for now (a name: what it last resolved to; an IP address: 1).",
    },
    Family {
        name: "sealpipe_resolve_failures_total",
        kind: Kind::Counter,
        labels: &[TUNNEL],
        written: Written::Control,
        help: "Target name resolutions that failed (the target keeps its last good addresses).",
    },
    Family {
        name: "sealpipe_upstream_connect_duration_seconds",
        kind: Kind::Histogram(LATENCY_BUCKETS),
        labels: &[TUNNEL, UPSTREAM],
        written: Written::Shared,
        help: "Time to establish a TCP connection to an upstream.",
    },
    // Shards, memory, process
    Family {
        name: "sealpipe_loop_busy_seconds_total",
        kind: Kind::Counter,
        labels: &[SHARD],
        written: Written::Shard,
        help: "Time the shard's loop spent running callbacks.",
    },
    Family {
        name: "sealpipe_loop_idle_seconds_total",
        kind: Kind::Counter,
        labels: &[SHARD],
        written: Written::Shard,
        help: "Time the shard's loop spent waiting for events.",
    },
    Family {
        name: "sealpipe_loop_stall_total",
        kind: Kind::Counter,
        labels: &[SHARD],
        written: Written::Shard,
        help: "Loop turns whose callbacks ran longer than the stall threshold (100 ms).",
    },
    Family {
        name: "sealpipe_shard_heartbeat_age_seconds",
        kind: Kind::Gauge,
        labels: &[SHARD],
        written: Written::Scrape,
        help: "Seconds since the shard's loop last turned.",
    },
    Family {
        name: "sealpipe_buffer_pool_bytes",
        kind: Kind::Gauge,
        labels: &[SHARD, one_of("state", &POOL_STATES)],
        written: Written::Shard,
        help: "Buffer chunk memory per shard: cached (free) and live (in buffers).",
    },
    Family {
        name: "sealpipe_access_log_dropped_total",
        kind: Kind::Counter,
        labels: &[TUNNEL, one_of("reason", &ACCESS_LOG_DROPS)],
        written: Written::Shared,
        help: "Access log lines lost: the writer's queue was full (queue_full) or its write failed (write_error).",
    },
    Family {
        name: "sealpipe_log_lines_dropped_total",
        kind: Kind::Counter,
        labels: &[],
        written: Written::Control,
        help: "Log lines dropped because stderr did not keep up (the log queue was full).",
    },
    Family {
        name: "sealpipe_metrics_endpoint_closed_total",
        kind: Kind::Counter,
        labels: &[one_of("reason", &ENDPOINT_CLOSE_REASONS)],
        written: Written::Scrape,
        help: "Connections to the metrics endpoint it closed or refused, by reason (header_timeout, request_timeout, evicted = over the connection cap, fd_reserve = the process was near its descriptor limit, accept_error).",
    },
    Family {
        name: "sealpipe_metrics_endpoint_connections",
        kind: Kind::Gauge,
        labels: &[],
        written: Written::Scrape,
        help: "Connections open to the metrics endpoint.",
    },
    Family {
        name: "sealpipe_draining",
        kind: Kind::Gauge,
        labels: &[],
        written: Written::Control,
        help: "1 while the process drains before exit.",
    },
    Family {
        name: "sealpipe_build_info",
        kind: Kind::Gauge,
        labels: &[label("version")],
        written: Written::Control,
        help: "Build information.",
    },
    Family {
        name: "process_cpu_seconds_total",
        kind: Kind::Counter,
        labels: &[],
        written: Written::Process,
        help: "Total user and system CPU time spent in seconds.",
    },
    Family {
        name: "process_open_fds",
        kind: Kind::Gauge,
        labels: &[],
        written: Written::Process,
        help: "Number of open file descriptors.",
    },
    Family {
        name: "process_max_fds",
        kind: Kind::Gauge,
        labels: &[],
        written: Written::Process,
        help: "Maximum number of open file descriptors.",
    },
    Family {
        name: "process_virtual_memory_bytes",
        kind: Kind::Gauge,
        labels: &[],
        written: Written::Process,
        help: "Virtual memory size in bytes.",
    },
    Family {
        name: "process_resident_memory_bytes",
        kind: Kind::Gauge,
        labels: &[],
        written: Written::Process,
        help: "Resident memory size in bytes.",
    },
    Family {
        name: "process_start_time_seconds",
        kind: Kind::Gauge,
        labels: &[],
        written: Written::Process,
        help: "Start time of the process since unix epoch in seconds.",
    },
    Family {
        name: "process_threads",
        kind: Kind::Gauge,
        labels: &[],
        written: Written::Process,
        help: "Number of OS threads in the process.",
    },
];

/// The row of `name`.
pub fn family(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name)
}

// ---------------------------------------------------------------------------------------------
// Registration from the table

/// A handle type that can be built from a [`Family`] row of a matching kind.
trait FromFamily: Collector + Clone + 'static {
    fn fits(f: &Family) -> bool;
    fn build(f: &Family) -> prometheus::Result<Self>;
}

fn opts(f: &Family) -> Opts {
    Opts::new(f.name, f.help)
}

macro_rules! from_family {
    ($t:ty, $kind:pat, |$f:ident| $build:expr) => {
        impl FromFamily for $t {
            fn fits(f: &Family) -> bool {
                matches!(f.kind, $kind)
            }
            fn build($f: &Family) -> prometheus::Result<Self> {
                $build
            }
        }
    };
}

from_family!(IntCounterVec, Kind::Counter, |f| IntCounterVec::new(
    opts(f),
    &f.label_names()
));
from_family!(CounterVec, Kind::Counter, |f| CounterVec::new(
    opts(f),
    &f.label_names()
));
from_family!(IntGaugeVec, Kind::Gauge, |f| IntGaugeVec::new(
    opts(f),
    &f.label_names()
));
from_family!(GaugeVec, Kind::Gauge, |f| GaugeVec::new(
    opts(f),
    &f.label_names()
));
from_family!(IntGauge, Kind::Gauge, |f| {
    assert!(f.labels.is_empty(), "{}: IntGauge has no labels", f.name);
    IntGauge::with_opts(opts(f))
});
from_family!(IntCounter, Kind::Counter, |f| {
    assert!(f.labels.is_empty(), "{}: IntCounter has no labels", f.name);
    IntCounter::with_opts(opts(f))
});
from_family!(HistogramVec, Kind::Histogram(_), |f| {
    let Kind::Histogram(buckets) = f.kind else {
        unreachable!()
    };
    HistogramVec::new(
        HistogramOpts::new(f.name, f.help).buckets(buckets.to_vec()),
        &f.label_names(),
    )
});

/// Registers families by name from [`FAMILIES`], and remembers which it registered.
struct Builder {
    registry: Registry,
    registered: Vec<&'static str>,
}

impl Builder {
    /// Builds and registers the family `name`. Panics (a programming error, seen by every test
    /// that starts a server) when `name` has no row or its row's kind does not fit `T`.
    fn family<T: FromFamily>(&mut self, name: &str) -> T {
        let f = family(name).unwrap_or_else(|| panic!("metric {name} has no row in FAMILIES"));
        assert!(
            T::fits(f),
            "metric {name}: the handle type does not fit kind {:?}",
            f.kind
        );
        let m = T::build(f).expect("metric definition");
        self.registry
            .register(Box::new(m.clone()))
            .expect("metric registration");
        self.registered.push(f.name);
        m
    }

    /// Registers a collector whose families (all in [`FAMILIES`]) are not built here.
    fn collector(&mut self, c: Box<dyn Collector>) {
        let names: Vec<&'static str> = c
            .desc()
            .iter()
            .map(|d| {
                family(&d.fq_name)
                    .unwrap_or_else(|| panic!("metric {} has no row in FAMILIES", d.fq_name))
                    .name
            })
            .collect();
        self.registry.register(c).expect("collector registration");
        self.registered.extend(names);
    }
}

// ---------------------------------------------------------------------------------------------
// Label enums

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
    /// accept_proxy: the client's PROXY header was malformed, incomplete or late.
    ProxyHeader,
    /// The kernel gave up on a peer that stopped answering (ETIMEDOUT): TCP keepalive's
    /// probes or TCP_USER_TIMEOUT (`proxy::keepalive`), or its retransmissions ran out.
    PeerTimeout,
    /// (A decrypt side.) A warm session closed before its OPEN: unused by the encrypt side,
    /// or by this side (`warm_idle_timeout`, drain, `max_unopened_per_source`); no client and
    /// no backend was involved (`sealpipe_warm_events_total` says which).
    Unopened,
    /// `max_lifetime` (+ its grace) passed and the connection could not end gracefully: it
    /// never went quiet, a peer sent bytes after the end, or did not close its side.
    MaxLifetime,
}

impl CloseReason {
    pub const ALL: [CloseReason; 14] = [
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
        CloseReason::ProxyHeader,
        CloseReason::PeerTimeout,
        CloseReason::Unopened,
        CloseReason::MaxLifetime,
    ];
    pub fn as_str(self) -> &'static str {
        CLOSE_REASONS[self as usize]
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
    /// accept_proxy: the source is not in `trusted_proxies`.
    UntrustedProxy,
    /// The tunnel's `allow` / `deny` access lists.
    Acl,
    /// The tunnel's new-connection rate limit (`conn_rate`).
    Rate,
}

impl RejectReason {
    pub const ALL: [RejectReason; 9] = [
        RejectReason::MaxConns,
        RejectReason::NoHealthyUpstream,
        RejectReason::Draining,
        RejectReason::MaxHandshakes,
        RejectReason::SourceHandshakes,
        RejectReason::SourceRate,
        RejectReason::UntrustedProxy,
        RejectReason::Acl,
        RejectReason::Rate,
    ];
    pub fn as_str(self) -> &'static str {
        REJECT_REASONS[self as usize]
    }
}

/// What happened to a warm session: the `event` label of `sealpipe_warm_events_total`, its
/// discriminant the value's slot in [`WARM_EVENTS`] (see that family's help).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WarmEvent {
    Made,
    Used,
    Missed,
    Retired,
    Lost,
    Failed,
    Retried,
    Held,
    Opened,
    Unused,
    Expired,
    Shutdown,
    OverCap,
}

impl WarmEvent {
    pub const ALL: [WarmEvent; 13] = [
        WarmEvent::Made,
        WarmEvent::Used,
        WarmEvent::Missed,
        WarmEvent::Retired,
        WarmEvent::Lost,
        WarmEvent::Failed,
        WarmEvent::Retried,
        WarmEvent::Held,
        WarmEvent::Opened,
        WarmEvent::Unused,
        WarmEvent::Expired,
        WarmEvent::Shutdown,
        WarmEvent::OverCap,
    ];
    pub fn as_str(self) -> &'static str {
        WARM_EVENTS[self as usize]
    }
}

/// Byte counter slots: direction (upstream = client to backend) x layer, in the order of
/// [`DIRECTIONS`] x [`LAYERS`].
#[derive(Clone, Copy, Debug)]
pub enum Bytes {
    UpPlain = 0,
    UpSealed = 1,
    DownPlain = 2,
    DownSealed = 3,
}

// ---------------------------------------------------------------------------------------------
// The registry and the handles

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
    access_log_dropped: IntCounterVec,
    sessions: IntCounterVec,
    ephemeral_keys: IntCounterVec,
    handshake_duration: HistogramVec,
    bytes: IntCounterVec,
    upstream_up: IntGaugeVec,
    upstream_failures: IntCounterVec,
    upstream_connect: HistogramVec,
    flow_paused: IntCounterVec,
    lifetime_ends: IntCounterVec,
    throttled: IntCounterVec,
    throttled_seconds: CounterVec,
    rate_share: GaugeVec,
    key_hibernations: IntCounterVec,
    warm_sessions: IntGaugeVec,
    warm_events: IntCounterVec,
    pub pool_bytes: IntGaugeVec,
    pub loop_busy: CounterVec,
    pub loop_idle: CounterVec,
    pub loop_stall: IntCounterVec,
    pub heartbeat_age: GaugeVec,
    pub keys_loaded: IntGaugeVec,
    key_sessions: IntCounterVec,
    pub reloads: IntCounterVec,
    /// Connections handed to (or taken from) another process in a live upgrade.
    pub handoff_conns: IntCounterVec,
    pub draining: IntGauge,
    pub accept_errors: IntCounterVec,
    pub log_lines_dropped: IntCounter,
    /// The metrics endpoint's own series (written by its thread).
    pub endpoint_closed: IntCounterVec,
    pub endpoint_connections: IntGauge,
    /// Target names that failed to resolve (the last good addresses were kept).
    pub resolve_failures: IntCounterVec,
    /// Addresses each configured target stands for now (1 for an IP address).
    pub target_addresses: IntGaugeVec,
    pub health: Health,
    /// Names of the families registered, in order (each row of [`FAMILIES`] exactly once).
    registered: Vec<&'static str>,
}

impl Metrics {
    /// Builds every family of [`FAMILIES`]; `shards` sizes the health state.
    pub fn new(shards: usize, tunnels: usize) -> Arc<Metrics> {
        let mut b = Builder {
            registry: Registry::new(),
            registered: Vec::new(),
        };
        let mut m = Metrics {
            registry: b.registry.clone(),
            accepted: b.family("sealpipe_connections_accepted_total"),
            active: b.family("sealpipe_connections_active"),
            hibernating: b.family("sealpipe_connections_hibernating"),
            rejected: b.family("sealpipe_connections_rejected_total"),
            closed: b.family("sealpipe_connections_closed_total"),
            accept_errors: b.family("sealpipe_accept_errors_total"),
            duration: b.family("sealpipe_connection_duration_seconds"),
            flow_paused: b.family("sealpipe_flow_control_paused_total"),
            warm_sessions: b.family("sealpipe_warm_sessions"),
            warm_events: b.family("sealpipe_warm_events_total"),
            lifetime_ends: b.family("sealpipe_max_lifetime_ends_total"),
            throttled: b.family("sealpipe_throttled_total"),
            throttled_seconds: b.family("sealpipe_throttled_seconds_total"),
            rate_share: b.family("sealpipe_rate_limit_share"),
            handshakes: b.family("sealpipe_handshakes_total"),
            sessions: b.family("sealpipe_sessions_total"),
            access_log_dropped: b.family("sealpipe_access_log_dropped_total"),
            ephemeral_keys: b.family("sealpipe_ephemeral_keys_total"),
            handshake_duration: b.family("sealpipe_handshake_duration_seconds"),
            key_sessions: b.family("sealpipe_key_sessions_total"),
            key_hibernations: b.family("sealpipe_key_hibernations_total"),
            keys_loaded: b.family("sealpipe_keys_loaded"),
            reloads: b.family("sealpipe_config_reloads_total"),
            handoff_conns: b.family("sealpipe_handoff_connections_total"),
            bytes: b.family("sealpipe_bytes_total"),
            upstream_up: b.family("sealpipe_upstream_up"),
            upstream_failures: b.family("sealpipe_upstream_connect_failures_total"),
            upstream_connect: b.family("sealpipe_upstream_connect_duration_seconds"),
            loop_busy: b.family("sealpipe_loop_busy_seconds_total"),
            loop_idle: b.family("sealpipe_loop_idle_seconds_total"),
            loop_stall: b.family("sealpipe_loop_stall_total"),
            heartbeat_age: b.family("sealpipe_shard_heartbeat_age_seconds"),
            pool_bytes: b.family("sealpipe_buffer_pool_bytes"),
            draining: b.family("sealpipe_draining"),
            log_lines_dropped: b.family("sealpipe_log_lines_dropped_total"),
            endpoint_closed: b.family("sealpipe_metrics_endpoint_closed_total"),
            endpoint_connections: b.family("sealpipe_metrics_endpoint_connections"),
            resolve_failures: b.family("sealpipe_resolve_failures_total"),
            target_addresses: b.family("sealpipe_target_addresses"),
            health: Health::new(shards, tunnels),
            registered: Vec::new(),
        };
        let build: IntGaugeVec = b.family("sealpipe_build_info");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        #[cfg(target_os = "linux")]
        b.collector(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        for r in RELOAD_RESULTS {
            m.reloads.with_label_values(&[r]);
        }
        for r in HANDOFF_RESULTS {
            m.handoff_conns.with_label_values(&[r]);
        }
        for r in ENDPOINT_CLOSE_REASONS {
            m.endpoint_closed.with_label_values(&[r]);
        }
        // Every shard's series exist from start-up, before its thread first writes them.
        for shard in 0..shards {
            let s = shard.to_string();
            m.loop_busy.with_label_values(&[&s]);
            m.loop_idle.with_label_values(&[&s]);
            m.loop_stall.with_label_values(&[&s]);
            m.heartbeat_age.with_label_values(&[&s]);
            for state in POOL_STATES {
                m.pool_bytes.with_label_values(&[&s, state]);
            }
            for src in EPHEMERAL_SOURCES {
                m.ephemeral_keys.with_label_values(&[&s, src]);
            }
        }
        m.registered = b.registered;
        Arc::new(m)
    }

    /// Shards this process runs: the values the `shard` label takes are `0..shards()` (a
    /// series kept per shard, such as `sealpipe_upstream_up`, is removed shard by shard).
    pub fn shards(&self) -> usize {
        self.health.heartbeats.len()
    }

    /// The families registered, by name, in registration order.
    pub fn registered(&self) -> &[&'static str] {
        &self.registered
    }

    /// Resolves every handle a shard needs for one tunnel (all label values pre-created, so
    /// queries return zeros instead of nothing before the first event). `side`: the tunnel's
    /// side of a pair for its warm sessions ([`WARM_SIDES`]; none for forward).
    pub fn tunnel(
        &self,
        tunnel: &str,
        shard: usize,
        upstreams: &[String],
        side: Option<&str>,
    ) -> TunnelMetrics {
        let s = shard.to_string();
        TunnelMetrics {
            warm: side.map(|side| self.warm_sessions.with_label_values(&[tunnel, &s, side])),
            warm_events: side
                .map(|_| WARM_EVENTS.map(|e| self.warm_events.with_label_values(&[tunnel, e]))),
            accepted: self.accepted.with_label_values(&[tunnel, &s]),
            active: self.active.with_label_values(&[tunnel, &s]),
            hibernating: self.hibernating.with_label_values(&[tunnel, &s]),
            rejected: REJECT_REASONS.map(|r| self.rejected.with_label_values(&[tunnel, r])),
            closed: CLOSE_REASONS.map(|r| self.closed.with_label_values(&[tunnel, r])),
            duration: self.duration.with_label_values(&[tunnel]),
            handshakes: HANDSHAKE_RESULTS.map(|r| self.handshakes.with_label_values(&[tunnel, r])),
            sessions: FS_VALUES.map(|fs| self.sessions.with_label_values(&[tunnel, fs])),
            access_log_dropped: ACCESS_LOG_DROPS
                .map(|r| self.access_log_dropped.with_label_values(&[tunnel, r])),
            handshake_duration: self.handshake_duration.with_label_values(&[tunnel]),
            bytes: [
                (DIRECTIONS[0], LAYERS[0]),
                (DIRECTIONS[0], LAYERS[1]),
                (DIRECTIONS[1], LAYERS[0]),
                (DIRECTIONS[1], LAYERS[1]),
            ]
            .map(|(d, l)| self.bytes.with_label_values(&[tunnel, d, l])),
            flow_paused: DIRECTIONS.map(|d| self.flow_paused.with_label_values(&[tunnel, d])),
            lifetime_ends: LIFETIME_ENDS
                .map(|e| self.lifetime_ends.with_label_values(&[tunnel, e])),
            throttled: DIRECTIONS.map(|d| self.throttled.with_label_values(&[tunnel, d])),
            throttled_seconds: DIRECTIONS
                .map(|d| self.throttled_seconds.with_label_values(&[tunnel, d])),
            rate_share: RATE_LIMITS.map(|l| self.rate_share.with_label_values(&[tunnel, &s, l])),
            key_hibernations: self.key_hibernations.with_label_values(&[tunnel]),
            upstreams: upstreams
                .iter()
                .map(|u| UpstreamMetrics {
                    up: self.upstream_up.with_label_values(&[tunnel, u, &s]),
                    failures: CONNECT_FAILURES
                        .map(|r| self.upstream_failures.with_label_values(&[tunnel, u, r])),
                    connect: self.upstream_connect.with_label_values(&[tunnel, u]),
                })
                .collect(),
            accept_exhausted: self
                .accept_errors
                .with_label_values(&[tunnel, ACCEPT_ERROR_KINDS[0]]),
            accept_other: self
                .accept_errors
                .with_label_values(&[tunnel, ACCEPT_ERROR_KINDS[1]]),
        }
    }

    /// Drops the series of an upstream a reload removed from `tunnel`, so a target that is no
    /// longer configured leaves no stale `sealpipe_upstream_up` (nor an alert on it) behind.
    /// Shards that still hold its handles update detached children, which nothing exports.
    pub fn forget_upstream(&self, tunnel: &str, upstream: &str) {
        for shard in 0..self.shards() {
            let _ = self
                .upstream_up
                .remove_label_values(&[tunnel, upstream, &shard.to_string()]);
        }
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
    /// This shard's view of the upstream's health.
    pub up: IntGauge,
    /// By reason, in [`CONNECT_FAILURES`] order.
    pub failures: [IntCounter; 3],
    pub connect: Histogram,
}

/// One tunnel's handles, resolved for one shard.
#[derive(Clone)]
pub struct TunnelMetrics {
    /// Warm sessions held by this shard (none for a forward tunnel).
    pub warm: Option<IntGauge>,
    /// Warm session events, by [`WARM_EVENTS`] (none for a forward tunnel).
    pub warm_events: Option<[IntCounter; 13]>,
    pub accepted: IntCounter,
    pub active: IntGauge,
    pub hibernating: IntGauge,
    pub rejected: [IntCounter; 9],
    pub closed: [IntCounter; 14],
    pub duration: Histogram,
    pub handshakes: [IntCounter; 11],
    /// Sessions established, in [`FS_VALUES`] order.
    pub sessions: [IntCounter; 2],
    /// Access log lines lost, by [`ACCESS_LOG_DROPS`].
    pub access_log_dropped: [IntCounter; 2],
    pub handshake_duration: Histogram,
    pub bytes: [IntCounter; 4],
    pub flow_paused: [IntCounter; 2],
    /// By [`LIFETIME_ENDS`].
    pub lifetime_ends: [IntCounter; 2],
    /// Byte rate limit pauses and their time, by [`DIRECTIONS`].
    pub throttled: [IntCounter; 2],
    pub throttled_seconds: [prometheus::Counter; 2],
    /// This shard's share of each rate limit, by [`RATE_LIMITS`] (0 without it).
    pub rate_share: [prometheus::Gauge; 3],
    pub key_hibernations: IntCounter,
    pub upstreams: Vec<UpstreamMetrics>,
    pub accept_exhausted: IntCounter,
    pub accept_other: IntCounter,
}

impl TunnelMetrics {
    /// Counts a warm session event.
    pub fn warm_event(&self, e: WarmEvent) {
        if let Some(w) = &self.warm_events {
            w[e as usize].inc();
        }
    }
    /// Moves the warm session gauge by `d`.
    pub fn warm_add(&self, d: i64) {
        if let Some(w) = &self.warm {
            w.add(d);
        }
    }
    pub fn closed(&self, r: CloseReason) {
        self.closed[r as usize].inc();
    }
    pub fn rejected(&self, r: RejectReason) {
        self.rejected[r as usize].inc();
    }
    /// Counts a connection `max_lifetime` ended, by how.
    pub fn lifetime_end(&self, graceful: bool) {
        self.lifetime_ends[usize::from(!graceful)].inc();
    }
    /// Counts an established session by whether it has forward secrecy.
    pub fn session(&self, forward_secrecy: bool) {
        self.sessions[usize::from(!forward_secrecy)].inc();
    }
    /// Counts a handshake outcome: one of [`HANDSHAKE_RESULTS`] (a result missing from the
    /// list is a programming error: debug builds panic, release builds count it nowhere).
    pub fn handshake(&self, result: &str) {
        let i = HANDSHAKE_RESULTS.iter().position(|r| *r == result);
        debug_assert!(
            i.is_some(),
            "handshake result {result:?} is not a label value"
        );
        if let Some(i) = i {
            self.handshakes[i].inc();
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One row of a table in docs/METRICS.md:
    /// `| `name` | type | labels | written | meaning | alert on |`.
    #[derive(Debug, PartialEq)]
    struct DocRow {
        name: String,
        kind: String,
        /// (label, enumerated values if the row lists them)
        labels: Vec<(String, Option<Vec<String>>)>,
        written: String,
    }

    /// The cells of a Markdown table row, split on `|` but not on `\|`.
    fn cells(line: &str) -> Vec<String> {
        let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
        let mut out = vec![String::new()];
        let mut chars = inner.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek() == Some(&'|') => {
                    out.last_mut().unwrap().push('|');
                    chars.next();
                }
                '|' => out.push(String::new()),
                c => out.last_mut().unwrap().push(c),
            }
        }
        out.iter().map(|c| c.trim().to_string()).collect()
    }

    fn unquote(s: &str) -> Option<String> {
        s.trim()
            .strip_prefix('`')?
            .strip_suffix('`')
            .filter(|v| !v.contains('`'))
            .map(str::to_string)
    }

    /// Every metric row of docs/METRICS.md, or the first line it cannot read.
    fn doc_rows(text: &str) -> Result<Vec<DocRow>, String> {
        let mut rows = Vec::new();
        for line in text.lines() {
            let c = cells(line);
            let Some(name) = c.first().and_then(|n| unquote(n)) else {
                continue;
            };
            if !(name.starts_with("sealpipe_") || name.starts_with("process_")) {
                continue;
            }
            if c.len() != 6 {
                return Err(format!("want 6 cells: {line}"));
            }
            let kind = c[1].split_whitespace().next().unwrap_or("").to_string();
            let mut labels = Vec::new();
            if c[2] != "—" {
                for entry in c[2].split(", ") {
                    let (l, values) = match entry.split_once(" = ") {
                        Some((l, v)) => {
                            let vs: Option<Vec<String>> = v.split(" | ").map(unquote).collect();
                            (l, Some(vs.ok_or(format!("bad values `{v}` in: {line}"))?))
                        }
                        None => (entry, None),
                    };
                    let l = unquote(l).ok_or(format!("bad label `{entry}` in: {line}"))?;
                    labels.push((l, values));
                }
            }
            rows.push(DocRow {
                name,
                kind,
                labels,
                written: c[3].clone(),
            });
        }
        Ok(rows)
    }

    /// The row docs/METRICS.md should have for `f` (its first four cells).
    fn expected_row(f: &Family) -> DocRow {
        DocRow {
            name: f.name.to_string(),
            kind: f.kind.as_str().to_string(),
            labels: f
                .labels
                .iter()
                .map(|l| {
                    let values = l.values.map(|v| v.iter().map(|s| s.to_string()).collect());
                    (l.name.to_string(), values)
                })
                .collect(),
            written: f.written.as_str().to_string(),
        }
    }

    fn markdown(r: &DocRow) -> String {
        let labels = if r.labels.is_empty() {
            "—".to_string()
        } else {
            r.labels
                .iter()
                .map(|(l, v)| match v {
                    None => format!("`{l}`"),
                    Some(v) => {
                        let v: Vec<String> = v.iter().map(|x| format!("`{x}`")).collect();
                        format!("`{l}` = {}", v.join(" \\| "))
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!("| `{}` | {} | {labels} | {} |", r.name, r.kind, r.written)
    }

    #[test]
    fn docs_list_every_family_with_its_type_labels_values_and_writer() {
        let text = include_str!("../../docs/METRICS.md");
        let docs = doc_rows(text).unwrap();
        let mut problems = Vec::new();
        for f in FAMILIES {
            let want = expected_row(f);
            match docs.iter().filter(|d| d.name == f.name).collect::<Vec<_>>()[..] {
                [] => problems.push(format!(
                    "missing from docs/METRICS.md: {} meaning | alert on |",
                    markdown(&want)
                )),
                [got] if *got != want => problems.push(format!(
                    "{}: docs say\n    {}\n  the table says\n    {}",
                    f.name,
                    markdown(got),
                    markdown(&want)
                )),
                [_] => {}
                _ => problems.push(format!("{}: documented more than once", f.name)),
            }
        }
        for d in &docs {
            if family(&d.name).is_none() {
                problems.push(format!("documented but not exported: {}", d.name));
            }
        }
        assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
    }

    #[test]
    fn the_doc_parser_reads_what_it_is_given() {
        let rows = doc_rows(
            "| `sealpipe_x_total` | counter | `tunnel`, `reason` = `a` \\| `b_c` | shared | m | — |\n\
             | `process_y` | gauge (1) | — | process | m | — |\n\
             | `not_ours` | counter | — | shared | m | — |\n",
        )
        .unwrap();
        assert_eq!(
            rows,
            vec![
                DocRow {
                    name: "sealpipe_x_total".into(),
                    kind: "counter".into(),
                    labels: vec![
                        ("tunnel".into(), None),
                        ("reason".into(), Some(vec!["a".into(), "b_c".into()]))
                    ],
                    written: "shared".into(),
                },
                DocRow {
                    name: "process_y".into(),
                    kind: "gauge".into(),
                    labels: vec![],
                    written: "process".into(),
                },
            ]
        );
        assert!(doc_rows("| `sealpipe_x` | counter | tunnel | shared | m | — |").is_err());
        assert!(doc_rows("| `sealpipe_x` | counter | `tunnel` | shared |").is_err());
    }

    #[test]
    fn the_table_keeps_its_own_rules() {
        let mut names: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FAMILIES.len(), "a family is declared twice");
        for f in FAMILIES {
            let has_shard = f.labels.iter().any(|l| l.name == "shard");
            // A gauge several shards set would show whichever wrote last.
            if f.kind == Kind::Gauge && matches!(f.written, Written::Shared | Written::Flushed) {
                panic!("{}: a gauge cannot be shared by shards", f.name);
            }
            if f.written == Written::Shard {
                assert!(
                    has_shard,
                    "{}: written per shard without a shard label",
                    f.name
                );
            }
            assert_eq!(
                f.kind == Kind::Counter,
                f.name.ends_with("_total"),
                "{}: counters, and only counters, end in _total",
                f.name
            );
            assert_eq!(
                f.written == Written::Process,
                f.name.starts_with("process_"),
                "{}",
                f.name
            );
            assert!(
                f.name.starts_with("sealpipe_") || f.name.starts_with("process_"),
                "{}",
                f.name
            );
            let mut labels = f.label_names();
            labels.sort_unstable();
            labels.dedup();
            assert_eq!(labels.len(), f.labels.len(), "{}: a label twice", f.name);
            for l in f.labels {
                if let Some(v) = l.values {
                    let mut v = v.to_vec();
                    v.sort_unstable();
                    v.dedup();
                    assert_eq!(v.len(), l.values.unwrap().len(), "{}: {}", f.name, l.name);
                    assert!(
                        v.iter()
                            .all(|x| x.chars().all(|c| c.is_ascii_lowercase() || c == '_')),
                        "{}: {} values must be snake_case",
                        f.name,
                        l.name
                    );
                }
            }
        }
    }

    #[test]
    fn every_row_is_registered_once_and_nothing_else() {
        let m = Metrics::new(2, 1);
        let mut got = m.registered().to_vec();
        got.sort_unstable();
        let mut want: Vec<&str> = FAMILIES
            .iter()
            .filter(|f| cfg!(target_os = "linux") || f.written != Written::Process)
            .map(|f| f.name)
            .collect();
        want.sort_unstable();
        assert_eq!(got, want);
        // What the registry exports carries the row's type and help.
        let t = m.tunnel("t", 0, &["u:1".into()], Some("encrypt"));
        t.handshake("ok");
        m.key_sessions("t", "k").inc();
        m.keys_loaded
            .with_label_values(&["t", "k", "primary"])
            .set(1);
        m.resolve_failures.with_label_values(&["t"]);
        m.target_addresses
            .with_label_values(&["t", "db:5432"])
            .set(1);
        let gathered = m.registry.gather();
        assert_eq!(gathered.len(), want.len());
        for mf in gathered {
            let f = family(mf.name()).unwrap();
            assert_eq!(mf.help(), f.help, "{}", f.name);
            let kind = format!("{:?}", mf.get_field_type()).to_lowercase();
            assert_eq!(kind, f.kind.as_str(), "{}", f.name);
            for sample in mf.get_metric() {
                let names: Vec<&str> = sample.get_label().iter().map(|l| l.name()).collect();
                let mut want = f.label_names();
                want.sort_unstable();
                assert_eq!(names, want, "{}", f.name);
            }
        }
    }

    #[test]
    fn handshake_results_cover_every_protocol_error() {
        for e in crate::protocol::ProtocolError::ALL {
            assert!(
                HANDSHAKE_RESULTS.contains(&e.reason()),
                "{:?} ({}) would be counted nowhere",
                e,
                e.reason()
            );
        }
        assert_eq!(HANDSHAKE_RESULTS[0], "ok");
        assert!(HANDSHAKE_RESULTS.contains(&"timeout"));
    }

    #[test]
    fn label_enums_index_their_value_lists() {
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        assert_eq!(CloseReason::ALL.len(), CLOSE_REASONS.len());
        assert_eq!(RejectReason::ALL.len(), REJECT_REASONS.len());
        assert_eq!(CloseReason::IdleTimeout.as_str(), "idle_timeout");
        assert_eq!(RejectReason::Draining.as_str(), "draining");
    }

    /// Each shard's view of an upstream is its own series: two shards that disagree are both
    /// visible, and neither overwrites the other.
    #[test]
    fn upstream_health_is_one_series_per_shard() {
        let m = Metrics::new(2, 1);
        let ups = ["10.0.0.1:80".to_string()];
        let (s0, s1) = (m.tunnel("t", 0, &ups, None), m.tunnel("t", 1, &ups, None));
        s0.upstreams[0].up.set(0);
        s1.upstreams[0].up.set(1);
        s0.upstreams[0].up.set(0);
        assert_eq!(m.shards(), 2);
        let text = String::from_utf8(m.render()).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("sealpipe_upstream_up{"))
            .collect();
        assert_eq!(
            lines,
            [
                "sealpipe_upstream_up{shard=\"0\",tunnel=\"t\",upstream=\"10.0.0.1:80\"} 0",
                "sealpipe_upstream_up{shard=\"1\",tunnel=\"t\",upstream=\"10.0.0.1:80\"} 1",
            ]
        );
    }
}
