//! Configuration: the TOML file format (`sealpipe run --config`) and its validation.
//!
//! The command line builds the same [`Config`] for a single tunnel, so both paths share one
//! validation. Unknown keys are errors that name the line; every check names the tunnel and
//! the field at fault. Nothing here opens sockets; key files are read by [`Config::load_keys`].

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::keyfile::KeyError;
use crate::protocol::{AeadKind, ForwardSecrecy, KeySet};
pub use crate::proxy::conn::core::Lifetime;
use crate::proxy::ids::TargetAddr;
pub use crate::proxy::ids::{ListenAddr, UnixListen};
pub use crate::proxy::ratelimit::{Limit, RateLimits};

/// Everything that can be wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("tunnel {tunnel:?}: {message}")]
    Tunnel { tunnel: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("tunnel {tunnel:?}: {source}")]
    Key { tunnel: String, source: KeyError },
}

/// What a tunnel does with the bytes it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Plaintext in, sealed records out (towards a decrypt side).
    Encrypt,
    /// Sealed records in, plaintext out (towards the real backend).
    Decrypt,
    /// Plaintext relay, no crypto.
    Forward,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Encrypt => "encrypt",
            Mode::Decrypt => "decrypt",
            Mode::Forward => "forward",
        }
    }
}

/// How a connection picks among several targets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConn,
}

impl std::str::FromStr for Balance {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round-robin" => Ok(Balance::RoundRobin),
            "least-conn" => Ok(Balance::LeastConn),
            _ => Err(format!(
                "unknown balance {s:?} (expected round-robin or least-conn)"
            )),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_log_level")]
    pub level: String,
    #[serde(default = "default_log_format")]
    pub format: String,
}

/// The levels a log filter may name (any case).
pub const LOG_LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];

/// Checks a log filter strictly: comma-separated directives, each a level (`warn`) or
/// `TARGET=LEVEL` (`sealpipe::proxy=debug`), levels from [`LOG_LEVELS`]. tracing's own
/// parser takes any bare word as a target to enable (`warning` = "trace for target
/// `warning`", which turns every other log line off): a typo would silence the process.
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    let bad = |what: String| {
        format!(
            "log level {filter:?}: {what}; a level is one of {} (or a comma-separated list of LEVEL and TARGET=LEVEL)",
            LOG_LEVELS.join(", ")
        )
    };
    let is_level = |l: &str| LOG_LEVELS.iter().any(|k| k.eq_ignore_ascii_case(l));
    for d in filter.split(',') {
        let d = d.trim();
        match d.split_once('=') {
            None if is_level(d) => {}
            None => return Err(bad(format!("{d:?} is not a level"))),
            Some((target, level)) => {
                let target_ok = !target.is_empty()
                    && target
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
                if !target_ok {
                    return Err(bad(format!("{target:?} is not a module path")));
                }
                if !is_level(level) {
                    return Err(bad(format!("{level:?} (for {target}) is not a level")));
                }
            }
        }
    }
    Ok(())
}

fn default_log_level() -> String {
    "info".into()
}
fn default_log_format() -> String {
    "text".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            format: default_log_format(),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the /metrics, /healthz, /readyz endpoint; none = no endpoint.
    pub listen: Option<String>,
}

/// Process-wide limits and timeouts (seconds). Tunnels may override the timeouts.
///
/// Durations follow one rule: 0 turns off what can be off (`idle_timeout`,
/// `half_closed_timeout`, `drain_timeout` = no wait, `health_check_interval`); a timeout that
/// must exist (`connect_timeout`, `handshake_timeout`) is rejected at 0, with the reason.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Shards; 0 = one per CPU in the process's affinity mask.
    #[serde(default)]
    pub threads: usize,
    /// Pin each shard thread to one CPU of the affinity mask (off: the scheduler places them).
    #[serde(default)]
    pub pin: bool,
    /// SO_INCOMING_CPU on each pinned shard's listener: a connection goes to the shard on the
    /// CPU that received its packets, instead of SO_REUSEPORT's hash. Needs `pin`.
    #[serde(default)]
    pub incoming_cpu: bool,
    /// Connections per process, exact: split into per-shard shares that add up to it.
    #[serde(default = "d_max_conns")]
    pub max_conns: usize,
    #[serde(default = "d_connect")]
    pub connect_timeout: f64,
    #[serde(default = "d_handshake")]
    pub handshake_timeout: f64,
    #[serde(default = "d_idle")]
    pub idle_timeout: f64,
    #[serde(default = "d_half")]
    pub half_closed_timeout: f64,
    #[serde(default = "d_drain")]
    pub drain_timeout: f64,
    // -- pre-authentication admission (decrypt listeners; see proxy::listener) --
    /// Connections still in their handshake, per process (split evenly across shards).
    #[serde(default = "d_max_handshakes")]
    pub max_handshakes: usize,
    /// Connections in their handshake from one source address (IPv6: one /64), per shard.
    #[serde(default = "d_per_source")]
    pub max_handshakes_per_source: usize,
    /// New connections per second from one source address, per shard (a token bucket);
    /// 0 = no limit.
    #[serde(default = "d_source_rate")]
    pub new_conns_per_source: f64,
    /// The bucket's size: how many new connections one source may open at once.
    #[serde(default = "d_source_burst")]
    pub new_conns_per_source_burst: usize,
    /// Warm sessions (handshaken, no OPEN yet) one source may hold open, per shard; more are
    /// closed with an ABORT `unopened` (their encrypt side replaces them elsewhere).
    #[serde(default = "d_unopened_per_source")]
    pub max_unopened_per_source: usize,
    // -- dead peers (both sockets of every connection; see [`Keepalive`]) --
    /// Seconds of quiet before the first keepalive probe; 0 = no keepalive.
    #[serde(default = "d_ka_idle")]
    pub keepalive_idle: f64,
    /// Seconds between unanswered keepalive probes.
    #[serde(default = "d_ka_interval")]
    pub keepalive_interval: f64,
    /// Unanswered probes before the connection is dropped.
    #[serde(default = "d_ka_count")]
    pub keepalive_count: u32,
    /// TCP_USER_TIMEOUT, seconds: how long sent data may stay unacknowledged; 0 = the
    /// kernel's retransmission limit (~15 min); absent = keepalive's own bound.
    #[serde(default)]
    pub tcp_user_timeout: Option<f64>,
    /// Seconds between re-resolutions of target names; 0 = at start and on SIGHUP only.
    #[serde(default = "d_resolve_interval")]
    pub resolve_interval: f64,
}

fn d_max_handshakes() -> usize {
    10_000
}
fn d_per_source() -> usize {
    2048
}
fn d_source_rate() -> f64 {
    2000.0
}
fn d_source_burst() -> usize {
    4000
}
fn d_unopened_per_source() -> usize {
    256
}

/// Validated pre-authentication admission limits (the `[limits]` keys above).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Admission {
    pub max_handshakes: usize,
    pub max_handshakes_per_source: usize,
    /// Per second; 0 = no limit.
    pub new_conns_per_source: f64,
    pub new_conns_per_source_burst: usize,
    pub max_unopened_per_source: usize,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            max_handshakes: d_max_handshakes(),
            max_handshakes_per_source: d_per_source(),
            new_conns_per_source: d_source_rate(),
            new_conns_per_source_burst: d_source_burst(),
            max_unopened_per_source: d_unopened_per_source(),
        }
    }
}

impl Limits {
    fn admission(&self, scope: Scope<'_>) -> Result<Admission, ConfigError> {
        let bad = |f: &str, m: String| Err(scope.error(f, m));
        if self.max_handshakes == 0 {
            return bad("max_handshakes", "must be > 0".into());
        }
        if self.max_handshakes_per_source == 0 {
            return bad("max_handshakes_per_source", "must be > 0".into());
        }
        if self.max_unopened_per_source == 0 {
            return bad(
                "max_unopened_per_source",
                "must be > 0 (an encrypt side's warm sessions need room; turn them off there with warm_max = 0)".into(),
            );
        }
        let r = self.new_conns_per_source;
        if !r.is_finite() || !(0.0..=1e9).contains(&r) {
            return bad(
                "new_conns_per_source",
                format!("must be between 0 (no limit) and 1e9 per second, got {r}"),
            );
        }
        if r > 0.0 && self.new_conns_per_source_burst == 0 {
            return bad(
                "new_conns_per_source_burst",
                format!(
                    "must be > 0 when {} is set",
                    scope.name("new_conns_per_source")
                ),
            );
        }
        Ok(Admission {
            max_handshakes: self.max_handshakes,
            max_handshakes_per_source: self.max_handshakes_per_source,
            new_conns_per_source: r,
            new_conns_per_source_burst: self.new_conns_per_source_burst,
            max_unopened_per_source: self.max_unopened_per_source,
        })
    }
}

fn d_max_conns() -> usize {
    100_000
}
fn d_connect() -> f64 {
    5.0
}
fn d_handshake() -> f64 {
    5.0
}
fn d_idle() -> f64 {
    300.0
}
fn d_half() -> f64 {
    60.0
}
fn d_drain() -> f64 {
    30.0
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            threads: 0,
            pin: false,
            incoming_cpu: false,
            max_conns: d_max_conns(),
            connect_timeout: d_connect(),
            handshake_timeout: d_handshake(),
            idle_timeout: d_idle(),
            half_closed_timeout: d_half(),
            drain_timeout: d_drain(),
            max_handshakes: d_max_handshakes(),
            max_handshakes_per_source: d_per_source(),
            new_conns_per_source: d_source_rate(),
            new_conns_per_source_burst: d_source_burst(),
            max_unopened_per_source: d_unopened_per_source(),
            keepalive_idle: d_ka_idle(),
            keepalive_interval: d_ka_interval(),
            keepalive_count: d_ka_count(),
            tcp_user_timeout: None,
            resolve_interval: d_resolve_interval(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dead peers: TCP keepalive and TCP_USER_TIMEOUT (docs/OPERATIONS.md, "Dead peers").

fn d_resolve_interval() -> f64 {
    30.0
}
fn d_ka_idle() -> f64 {
    60.0
}
fn d_ka_interval() -> f64 {
    10.0
}
fn d_ka_count() -> u32 {
    6
}

/// The kernel's limits on the keepalive options (`MAX_TCP_KEEPIDLE`, `MAX_TCP_KEEPINTVL`,
/// `MAX_TCP_KEEPCNT`) and on TCP_USER_TIMEOUT (an `int` of milliseconds).
const MAX_KEEPALIVE_SECS: f64 = 32_767.0;
const MAX_KEEPALIVE_COUNT: u32 = 127;
const MAX_USER_TIMEOUT_SECS: f64 = i32::MAX as f64 / 1000.0;

/// How a connection notices a peer that vanished without a FIN or a reset (a host that lost
/// power, a link or NAT entry that went away), set on both sockets of every connection: the
/// accepted client socket (through its listener, whose options accepted sockets inherit)
/// and the upstream socket (before its connect).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Quiet time before the first probe; `None`: keepalive off.
    pub idle: Option<Duration>,
    pub interval: Duration,
    pub count: u32,
    /// TCP_USER_TIMEOUT; `None`: the kernel's retransmission limit.
    pub user_timeout: Option<Duration>,
}

/// Whole seconds within the kernel's keepalive range (it takes seconds only).
fn keepalive_secs(scope: Scope<'_>, field: &str, v: f64, min: f64) -> Result<u32, ConfigError> {
    if !v.is_finite() || v.fract() != 0.0 || !(min..=MAX_KEEPALIVE_SECS).contains(&v) {
        return Err(scope.error(
            field,
            format!(
                "must be whole seconds from {min} to {MAX_KEEPALIVE_SECS} (the kernel's range), got {v}"
            ),
        ));
    }
    Ok(v as u32)
}

/// The keepalive settings of one scope: `[limits]`'s, or a tunnel's over `base`.
fn keepalive(
    scope: Scope<'_>,
    idle: f64,
    interval: f64,
    count: u32,
    user_timeout: Option<f64>,
) -> Result<Keepalive, ConfigError> {
    let idle = keepalive_secs(scope, "keepalive_idle", idle, 0.0)?;
    let interval = keepalive_secs(scope, "keepalive_interval", interval, 1.0)?;
    if !(1..=MAX_KEEPALIVE_COUNT).contains(&count) {
        return Err(scope.error(
            "keepalive_count",
            format!("must be from 1 to {MAX_KEEPALIVE_COUNT} (the kernel's range), got {count}"),
        ));
    }
    let idle = (idle > 0).then(|| Duration::from_secs(idle.into()));
    let interval = Duration::from_secs(interval.into());
    let user_timeout = match user_timeout {
        // Absent: as long as keepalive's probes take, so that a vanished peer is noticed in
        // the same bound whether the connection was idle or had data in flight.
        None => idle.map(|i| i + interval * count),
        Some(v) if !v.is_finite() || !(0.0..=MAX_USER_TIMEOUT_SECS).contains(&v) => {
            return Err(scope.error(
                "tcp_user_timeout",
                format!(
                    "must be between 0 (the kernel's default) and {MAX_USER_TIMEOUT_SECS:.0} seconds, got {v}"
                ),
            ));
        }
        Some(v) if v > 0.0 && v < 0.001 => {
            return Err(scope.error(
                "tcp_user_timeout",
                format!("must be 0 or at least 0.001 (the kernel counts milliseconds), got {v}"),
            ));
        }
        Some(v) => (v > 0.0).then(|| Duration::from_millis((v * 1000.0).round() as u64)),
    };
    Ok(Keepalive {
        idle,
        interval,
        count,
        user_timeout,
    })
}

/// `forward_secrecy` as written: a policy (`"require"`, `"allow"`, `"off"`), or the boolean of
/// earlier versions (`true` = require; `false` = off on an encrypt side, allow on a decrypt
/// side, which is what `false` did there: accept either, now with a warning per session).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FsSetting {
    Policy(String),
    Legacy(bool),
}

impl<'de> Deserialize<'de> for FsSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = FsSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"require\", \"allow\" or \"off\" (or the older true / false)")
            }
            fn visit_bool<E>(self, v: bool) -> Result<FsSetting, E> {
                Ok(FsSetting::Legacy(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<FsSetting, E> {
                Ok(FsSetting::Policy(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

impl FsSetting {
    fn policy(&self, mode: Mode) -> Result<ForwardSecrecy, String> {
        match self {
            FsSetting::Policy(s) => s.parse().map_err(|e| format!("forward_secrecy: {e}")),
            FsSetting::Legacy(true) => Ok(ForwardSecrecy::Require),
            FsSetting::Legacy(false) if mode == Mode::Encrypt => Ok(ForwardSecrecy::Off),
            FsSetting::Legacy(false) => Ok(ForwardSecrecy::Allow),
        }
    }
}

/// One `[[tunnel]]` table as written in the file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelFile {
    pub name: Option<String>,
    pub mode: Mode,
    pub listen: String,
    pub targets: Vec<String>,
    #[serde(default)]
    pub keys: Vec<PathBuf>,
    #[serde(default)]
    pub balance: Balance,
    /// `"require"` (default), `"allow"` or `"off"`; see [`FsSetting`].
    #[serde(default)]
    pub forward_secrecy: Option<FsSetting>,
    #[serde(default)]
    pub aead: Option<String>,
    /// Seconds between active TCP health checks; 0 = passive health only.
    #[serde(default)]
    pub health_check_interval: f64,
    pub connect_timeout: Option<f64>,
    pub handshake_timeout: Option<f64>,
    pub idle_timeout: Option<f64>,
    pub half_closed_timeout: Option<f64>,
    // -- client identity and access lists (validated by proxy::identity) --
    /// Encrypt side: every connection starts with a PROXY header (v1 or v2) and comes from
    /// one of `trusted_proxies` (CIDRs).
    #[serde(default)]
    pub accept_proxy: bool,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Decrypt side: `"v1"` or `"v2"`: the backend receives a PROXY header naming the client.
    #[serde(default)]
    pub send_proxy: Option<String>,
    /// `"stderr"` or a file path: one JSON line per connection.
    #[serde(default)]
    pub access_log: Option<String>,
    /// Sources (CIDRs) that may connect (empty: all), and sources that may not.
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
    /// Overrides of the `[limits]` keys of the same names.
    pub keepalive_idle: Option<f64>,
    pub keepalive_interval: Option<f64>,
    pub keepalive_count: Option<u32>,
    pub tcp_user_timeout: Option<f64>,
    pub resolve_interval: Option<f64>,
    // -- warm sessions (docs/OPERATIONS.md, "Warm sessions") --
    /// Encrypt side: most warm sessions per shard and target (0 = none).
    pub warm_max: Option<usize>,
    /// Encrypt side: seconds after which an unused warm session is replaced.
    pub warm_refresh: Option<f64>,
    /// Decrypt side: seconds a session may wait for its OPEN.
    pub warm_idle_timeout: Option<f64>,
    // -- fleet policy (docs/OPERATIONS.md, "Connection lifetime") --
    /// Seconds after which a connection ends at its next quiet moment (±10% per connection);
    /// 0 or absent = no limit.
    pub max_lifetime: Option<f64>,
    /// Seconds a connection past `max_lifetime` may wait for a quiet moment, and its peers
    /// then have to close, before it is reset.
    pub max_lifetime_grace: Option<f64>,
    /// New connections per second, whole tunnel (over it: refused at accept); 0 = no limit.
    pub conn_rate: Option<f64>,
    /// How many new connections may arrive at once (default: one second's worth).
    pub conn_rate_burst: Option<f64>,
    /// Bytes per second client to backend, and back, whole tunnel: a number of bytes or a
    /// string with a unit ("100Mbit", "12.5MB"); 0 = no limit.
    pub upstream_rate: Option<Amount>,
    pub downstream_rate: Option<Amount>,
    /// Bytes either direction may carry at once beyond its rate (default: one second of it).
    pub rate_burst: Option<Amount>,
    // -- a Unix domain socket to listen on (`listen = "unix:/path"`; "Unix domain sockets") --
    /// Permission bits of the socket file: `0o660` or `"0660"` (octal).
    pub listen_mode: Option<FileMode>,
    /// Owner and group of the socket file: a name or a number.
    pub listen_owner: Option<String>,
    pub listen_group: Option<String>,
}

/// Permission bits as written: a TOML integer (`0o660`) or an octal string (`"0660"`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum FileMode {
    Number(i64),
    Text(String),
}

impl From<&str> for FileMode {
    fn from(s: &str) -> FileMode {
        FileMode::Text(s.to_string())
    }
}

/// How an address names a Unix domain socket.
pub const UNIX_PREFIX: &str = "unix:";
/// The longest path a Unix domain socket address holds (`sun_path`, less its NUL).
pub const MAX_UNIX_PATH: usize = 107;

/// The path of `unix:PATH` (`what`: the setting, for the message), if `s` is one.
pub fn unix_path(what: &str, s: &str) -> Option<Result<PathBuf, String>> {
    let p = s.strip_prefix(UNIX_PREFIX)?;
    let path = PathBuf::from(p);
    Some(if !path.is_absolute() {
        Err(format!(
            "{what} {s:?}: a Unix socket's path must be absolute (unix:/run/app/app.sock)"
        ))
    } else if p.len() > MAX_UNIX_PATH {
        Err(format!(
            "{what} {s:?}: the path is {} bytes, over the {MAX_UNIX_PATH} a Unix socket address holds",
            p.len()
        ))
    } else if p.ends_with('/') {
        Err(format!("{what} {s:?}: the path names a directory"))
    } else {
        Ok(path)
    })
}

/// `listen_mode`: permission bits, 0 to 0777.
fn file_mode(sc: Scope<'_>, v: &FileMode) -> Result<u32, ConfigError> {
    let bits = match v {
        FileMode::Number(n) => u32::try_from(*n).ok(),
        FileMode::Text(t) => u32::from_str_radix(t.trim_start_matches("0o"), 8).ok(),
    };
    match bits {
        Some(b) if b <= 0o777 => Ok(b),
        _ => Err(sc.error(
            "listen_mode",
            format!(
                "must be permission bits from 0 to 0777 (octal: \"0660\" or 0o660), got {}",
                match v {
                    FileMode::Number(n) => format!("{n} (0o{n:o})"),
                    FileMode::Text(t) => format!("{t:?}"),
                }
            ),
        )),
    }
}

/// A user or group as written: a name, or a number.
fn owner_name(
    sc: Scope<'_>,
    field: &str,
    v: &Option<String>,
) -> Result<Option<String>, ConfigError> {
    match v.as_deref() {
        None => Ok(None),
        Some(n)
            if !n.is_empty()
                && n.len() <= 256
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.$".contains(c)) =>
        {
            Ok(Some(n.to_string()))
        }
        Some(n) => Err(sc.error(
            field,
            format!("{n:?} is not a user or group name, nor a number"),
        )),
    }
}

/// A byte amount as written: a number of bytes, or a string with a unit (see [`bytes`]).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Amount {
    Number(f64),
    Text(String),
}

impl From<&str> for Amount {
    fn from(s: &str) -> Amount {
        Amount::Text(s.to_string())
    }
}

/// The units a byte amount may carry, and what each is worth in bytes.
const BYTE_UNITS: [(&str, f64); 14] = [
    ("B", 1.0),
    ("kB", 1e3),
    ("KB", 1e3),
    ("MB", 1e6),
    ("GB", 1e9),
    ("KiB", 1024.0),
    ("MiB", 1048576.0),
    ("GiB", 1073741824.0),
    ("bit", 0.125),
    ("kbit", 125.0),
    ("Kbit", 125.0),
    ("Mbit", 125e3),
    ("Gbit", 125e6),
    ("", 1.0),
];

/// Bytes (`per_second`: per second, and a `/s` suffix is allowed) from a number or a string:
/// `12500000`, `"100Mbit"`, `"12.5MB/s"`, `"64KiB"`. Decimal units are powers of 1000, binary
/// ones of 1024; bits are an eighth of a byte.
pub fn bytes(v: &Amount, per_second: bool) -> Result<f64, String> {
    let s = match v {
        Amount::Number(n) => return Ok(*n),
        Amount::Text(s) => s.trim(),
    };
    let s = if per_second {
        s.strip_suffix("/s").unwrap_or(s)
    } else {
        s
    };
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    let (num, unit) = (&s[..split], s[split..].trim());
    let units = || {
        let names: Vec<&str> = BYTE_UNITS
            .iter()
            .map(|u| u.0)
            .filter(|u| !u.is_empty())
            .collect();
        names.join(", ")
    };
    let n: f64 = num.replace('_', "").parse().map_err(|_| {
        format!("{s:?} is not a number of bytes with a unit, e.g. \"100Mbit\" or \"12.5MB\"")
    })?;
    let Some((_, scale)) = BYTE_UNITS.iter().find(|u| u.0 == unit) else {
        return Err(format!("{s:?}: unknown unit {unit:?} (one of {})", units()));
    };
    Ok(n * scale)
}

impl TunnelFile {
    /// A tunnel with every optional field at its default, as if written with only the
    /// required keys (the command line and the demo start from this).
    pub fn new(mode: Mode, listen: String, targets: Vec<String>, keys: Vec<PathBuf>) -> Self {
        TunnelFile {
            name: Some(mode.as_str().into()),
            mode,
            listen,
            targets,
            keys,
            balance: Balance::default(),
            forward_secrecy: None,
            aead: None,
            health_check_interval: 0.0,
            connect_timeout: None,
            handshake_timeout: None,
            idle_timeout: None,
            half_closed_timeout: None,
            accept_proxy: false,
            trusted_proxies: Vec::new(),
            send_proxy: None,
            access_log: None,
            allow: Vec::new(),
            deny: Vec::new(),
            keepalive_idle: None,
            keepalive_interval: None,
            keepalive_count: None,
            tcp_user_timeout: None,
            resolve_interval: None,
            warm_max: None,
            warm_refresh: None,
            warm_idle_timeout: None,
            listen_mode: None,
            listen_owner: None,
            listen_group: None,
            max_lifetime: None,
            max_lifetime_grace: None,
            conn_rate: None,
            conn_rate_burst: None,
            upstream_rate: None,
            downstream_rate: None,
            rate_burst: None,
        }
    }
}

/// The file as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub tunnel: Vec<TunnelFile>,
}

/// A validated tunnel, ready for shards.
#[derive(Clone, Debug)]
pub struct Tunnel {
    pub name: String,
    pub mode: Mode,
    pub listen: ListenAddr,
    /// In configured order; a name's addresses are filled by [`Config::resolve_targets`].
    pub targets: Vec<Target>,
    pub key_files: Vec<PathBuf>,
    pub balance: Balance,
    pub forward_secrecy: ForwardSecrecy,
    pub aead: AeadKind,
    pub health_check_interval: Option<Duration>,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// `None`: no idle timeout.
    pub idle_timeout: Option<Duration>,
    /// `None`: no separate limit once half-closed (the idle timeout, if any, applies).
    pub half_closed_timeout: Option<Duration>,
    /// PROXY headers in and out, the access log, the access lists.
    pub identity: crate::proxy::identity::Identity,
    pub keepalive: Keepalive,
    /// How often target names are resolved again; `None`: at start and on SIGHUP only.
    pub resolve_interval: Option<Duration>,
    /// `max_lifetime` and its grace; `None`: no limit.
    pub lifetime: Option<Lifetime>,
    /// `conn_rate`, `upstream_rate`, `downstream_rate` and their bursts.
    pub rates: RateLimits,
    /// Encrypt side: most warm sessions per shard and target (0: off; always 0 elsewhere).
    pub warm_max: usize,
    /// Encrypt side: an unused warm session is replaced after this long.
    pub warm_refresh: Duration,
    /// Decrypt side: how long a session may wait for its OPEN.
    pub warm_idle_timeout: Duration,
}

/// Warm sessions an encrypt side keeps per shard and target, at most, by default.
pub const WARM_MAX_DEFAULT: usize = 4;
/// The most `warm_max` may be: warm sessions are a latency tool, not a connection pool.
pub const WARM_MAX_LIMIT: usize = 64;
/// Default `warm_refresh`: well below the decrypt side's default `warm_idle_timeout` and the
/// shortest idle limits of NAT devices and load balancers in the path (docs/OPERATIONS.md).
pub const WARM_REFRESH_DEFAULT: Duration = Duration::from_secs(25);
/// Default `warm_idle_timeout`.
pub const WARM_IDLE_DEFAULT: Duration = Duration::from_secs(60);

/// The warm session settings of one tunnel: each belongs to one side, and is refused on the
/// other (where it would do nothing).
fn warm_settings(
    scope: Scope<'_>,
    mode: Mode,
    t: &TunnelFile,
) -> Result<(usize, Duration, Duration), ConfigError> {
    let side = |field: &str, want: Mode| {
        scope.error(
            field,
            format!(
                "belongs to the {} side (this tunnel is {}): remove it here",
                want.as_str(),
                mode.as_str()
            ),
        )
    };
    if mode != Mode::Encrypt {
        if t.warm_max.is_some() {
            return Err(side("warm_max", Mode::Encrypt));
        }
        if t.warm_refresh.is_some() {
            return Err(side("warm_refresh", Mode::Encrypt));
        }
    }
    if mode != Mode::Decrypt && t.warm_idle_timeout.is_some() {
        return Err(side("warm_idle_timeout", Mode::Decrypt));
    }
    let max = match (mode, t.warm_max) {
        (Mode::Encrypt, None) => WARM_MAX_DEFAULT,
        (Mode::Encrypt, Some(n)) if n <= WARM_MAX_LIMIT => n,
        (Mode::Encrypt, Some(n)) => {
            return Err(scope.error(
                "warm_max",
                format!("must be from 0 (off) to {WARM_MAX_LIMIT}, got {n}"),
            ));
        }
        _ => 0,
    };
    let refresh = match t.warm_refresh {
        None => WARM_REFRESH_DEFAULT,
        Some(v) => timeout(
            scope,
            "warm_refresh",
            v,
            "an unused warm session must be replaced before an idle limit in the path kills it",
        )?,
    };
    let idle = match t.warm_idle_timeout {
        None => WARM_IDLE_DEFAULT,
        Some(v) => timeout(
            scope,
            "warm_idle_timeout",
            v,
            "a session waiting for its OPEN must be closed some time, or it holds a slot forever",
        )?,
    };
    Ok((max, refresh, idle))
}

impl Tunnel {
    /// Every target's addresses, one list per target (what `proxy::upstream` balances over).
    pub fn target_addrs(&self) -> Vec<Vec<TargetAddr>> {
        self.targets.iter().map(Target::target_addrs).collect()
    }

    /// Whether any target is a name (resolved, and re-resolved while running).
    pub fn has_names(&self) -> bool {
        self.targets.iter().any(|t| t.host.is_some())
    }

    /// How long a connection may be quiet before it is closed, if at all: the half-closed
    /// limit once one direction has ended (whichever of the two limits is shorter).
    pub fn idle_limit(&self, half_closed: bool) -> Option<Duration> {
        match (self.idle_timeout, self.half_closed_timeout) {
            (Some(i), Some(h)) if half_closed => Some(i.min(h)),
            (None, Some(h)) if half_closed => Some(h),
            (i, _) => i,
        }
    }
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub log: LogConfig,
    pub metrics: Option<SocketAddr>,
    pub threads: usize,
    /// Shard threads are pinned to CPUs.
    pub pin: bool,
    /// Shard listeners steer connections by receiving CPU (implies `pin`).
    pub incoming_cpu: bool,
    pub max_conns: usize,
    pub drain_timeout: Duration,
    pub admission: Admission,
    pub tunnels: Vec<Tunnel>,
    /// The file it came from (reloads read it again).
    pub path: Option<PathBuf>,
    /// `sealpipe run`'s flags that win over the file (applied again on every reload).
    pub overrides: CliOverrides,
}

/// Settings given on `sealpipe run`'s command line: they win over the file's `[log]`, at
/// start and across reloads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CliOverrides {
    pub log_level: Option<String>,
    pub log_format: Option<String>,
}

/// Where a setting is written, for error messages.
#[derive(Clone, Copy)]
enum Scope<'a> {
    Limits,
    Log,
    Tunnel(&'a str),
    /// The command line (`sealpipe encrypt --listen ...`): settings are flags.
    Cli,
}

impl Scope<'_> {
    /// `field` as the operator wrote it: the key in a file, the flag on the command line.
    fn name(self, field: &str) -> String {
        match self {
            Scope::Cli => match field {
                "keys" => "--key".into(),
                "targets" => "--target".into(),
                f => format!("--{}", f.replace('_', "-")),
            },
            _ => field.into(),
        }
    }

    /// A message about this scope (it names the setting itself).
    fn wrap(self, message: String) -> ConfigError {
        match self {
            Scope::Limits => ConfigError::Invalid(format!("[limits] {message}")),
            Scope::Log => ConfigError::Invalid(format!("[log] {message}")),
            Scope::Tunnel(t) => ConfigError::Tunnel {
                tunnel: t.into(),
                message,
            },
            Scope::Cli => ConfigError::Invalid(message),
        }
    }

    fn error(self, field: &str, message: String) -> ConfigError {
        self.wrap(format!("{} {message}", self.name(field)))
    }
}

/// Seconds, 0 to one year.
fn seconds(scope: Scope<'_>, field: &str, v: f64) -> Result<Duration, ConfigError> {
    if !v.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&v) {
        return Err(scope.error(
            field,
            format!("must be between 0 and one year of seconds, got {v}"),
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

/// A duration whose 0 means off.
fn seconds_or_off(scope: Scope<'_>, field: &str, v: f64) -> Result<Option<Duration>, ConfigError> {
    let d = seconds(scope, field, v)?;
    Ok((!d.is_zero()).then_some(d))
}

/// A timeout that must exist: 0 is rejected with `why`.
fn timeout(scope: Scope<'_>, field: &str, v: f64, why: &str) -> Result<Duration, ConfigError> {
    let d = seconds(scope, field, v)?;
    if d.is_zero() {
        return Err(scope.error(field, format!("cannot be 0: {why}")));
    }
    Ok(d)
}

/// A tunnel's `listen`, with the Unix socket file's keys (which only a Unix socket takes).
fn listen_addr(sc: Scope<'_>, t: &TunnelFile) -> Result<ListenAddr, ConfigError> {
    let field = sc.name("listen");
    let Some(path) = unix_path(&field, &t.listen) else {
        for (key, set) in [
            ("listen_mode", t.listen_mode.is_some()),
            ("listen_owner", t.listen_owner.is_some()),
            ("listen_group", t.listen_group.is_some()),
        ] {
            if set {
                return Err(sc.error(
                    key,
                    format!(
                        "applies to a Unix socket's file ({} = \"unix:/path\"), not to {}",
                        sc.name("listen"),
                        t.listen
                    ),
                ));
            }
        }
        return resolve(&field, &t.listen)
            .map(ListenAddr::Inet)
            .map_err(|m| sc.wrap(m));
    };
    let path = path.map_err(|m| sc.wrap(m))?;
    // A Unix socket's peers have no address to check.
    for (key, set) in [
        ("allow", !t.allow.is_empty()),
        ("deny", !t.deny.is_empty()),
        ("accept_proxy", t.accept_proxy),
    ] {
        if set {
            return Err(sc.error(
                key,
                format!(
                    "needs an IP listen address: the peers of a Unix socket ({}) have none (control who connects with {}, {} and {})",
                    t.listen,
                    sc.name("listen_mode"),
                    sc.name("listen_owner"),
                    sc.name("listen_group")
                ),
            ));
        }
    }
    Ok(ListenAddr::Unix(UnixListen {
        path,
        mode: t
            .listen_mode
            .as_ref()
            .map(|m| file_mode(sc, m))
            .transpose()?,
        owner: owner_name(sc, "listen_owner", &t.listen_owner)?,
        group: owner_name(sc, "listen_group", &t.listen_group)?,
    }))
}

/// `max_lifetime_grace` when not given.
pub const DEFAULT_LIFETIME_GRACE: Duration = Duration::from_secs(60);

/// `max_lifetime` and `max_lifetime_grace` of one tunnel.
fn lifetime(
    sc: Scope<'_>,
    max: Option<f64>,
    grace: Option<f64>,
) -> Result<Option<Lifetime>, ConfigError> {
    let max = max.map_or(Ok(None), |v| seconds_or_off(sc, "max_lifetime", v))?;
    let grace = grace
        .map(|v| seconds(sc, "max_lifetime_grace", v))
        .transpose()?;
    match (max, grace) {
        (None, Some(_)) => Err(sc.error(
            "max_lifetime_grace",
            format!(
                "has no effect without {}: set both, or neither",
                sc.name("max_lifetime")
            ),
        )),
        (Some(m), _) if m < Duration::from_secs(1) => Err(sc.error(
            "max_lifetime",
            format!(
                "must be 0 (no limit) or at least 1 second, got {}: a connection ends only after 250 ms of quiet, so shorter lifetimes would end every connection at its first pause",
                m.as_secs_f64()
            ),
        )),
        (Some(max), grace) => Ok(Some(Lifetime {
            max,
            grace: grace.unwrap_or(DEFAULT_LIFETIME_GRACE),
        })),
        (None, None) => Ok(None),
    }
}

/// The most a rate may be: 1e9 connections, or 1e12 bytes, per second.
const MAX_CONN_RATE: f64 = 1e9;
const MAX_BYTE_RATE: f64 = 1e12;
/// The least byte rate: reads are paced in chunks of at least 4 KiB, so much less than this
/// would be bursts a second apart rather than a rate.
const MIN_BYTE_RATE: f64 = 1000.0;

/// A tunnel's rate limits.
fn rate_limits(sc: Scope<'_>, t: &TunnelFile) -> Result<RateLimits, ConfigError> {
    let mut out = RateLimits::default();
    let conn = t.conn_rate.unwrap_or(0.0);
    if !conn.is_finite() || !(0.0..=MAX_CONN_RATE).contains(&conn) {
        return Err(sc.error(
            "conn_rate",
            format!("must be between 0 (no limit) and {MAX_CONN_RATE} connections per second, got {conn}"),
        ));
    }
    match (conn > 0.0, t.conn_rate_burst) {
        (false, Some(_)) => {
            return Err(sc.error(
                "conn_rate_burst",
                format!("has no effect without {}", sc.name("conn_rate")),
            ));
        }
        (true, Some(b)) if !b.is_finite() || !(1.0..=MAX_CONN_RATE).contains(&b) => {
            return Err(sc.error(
                "conn_rate_burst",
                format!("must be between 1 and {MAX_CONN_RATE} connections, got {b}"),
            ));
        }
        (true, burst) => {
            out.conns = Some(Limit {
                rate: conn,
                burst: burst.unwrap_or(conn.max(1.0)),
            })
        }
        (false, None) => {}
    }
    let amount = |field: &str, v: &Option<Amount>, per_second: bool| -> Result<f64, ConfigError> {
        v.as_ref()
            .map_or(Ok(0.0), |v| bytes(v, per_second))
            .map_err(|e| sc.error(field, e))
    };
    let burst = amount("rate_burst", &t.rate_burst, false)?;
    let mut any = false;
    for (field, v, slot) in [
        ("upstream_rate", &t.upstream_rate, &mut out.upstream),
        ("downstream_rate", &t.downstream_rate, &mut out.downstream),
    ] {
        let rate = amount(field, v, true)?;
        if !rate.is_finite() || (rate != 0.0 && !(MIN_BYTE_RATE..=MAX_BYTE_RATE).contains(&rate)) {
            return Err(sc.error(
                field,
                format!("must be 0 (no limit) or from {MIN_BYTE_RATE} to {MAX_BYTE_RATE} bytes per second (\"8kbit\" to \"8Tbit\"), got {rate} bytes"),
            ));
        }
        if rate > 0.0 {
            any = true;
            *slot = Some(Limit {
                rate,
                // One second's worth, as for connections: enough to ride out a shard that
                // was not scheduled for a while without losing rate.
                burst: if burst > 0.0 { burst } else { rate },
            });
        }
    }
    if t.rate_burst.is_some() {
        if !any {
            return Err(sc.error(
                "rate_burst",
                format!(
                    "has no effect without {} or {}",
                    sc.name("upstream_rate"),
                    sc.name("downstream_rate")
                ),
            ));
        }
        if !burst.is_finite() || !(1024.0..=MAX_BYTE_RATE).contains(&burst) {
            return Err(sc.error(
                "rate_burst",
                format!("must be from 1024 to {MAX_BYTE_RATE} bytes, got {burst}"),
            ));
        }
    }
    Ok(out)
}

const CONNECT_NOT_ZERO: &str = "a connect that never gives up never tries the next target";
const HANDSHAKE_NOT_ZERO: &str = "a peer that never completes its handshake must be closed, or it holds a connection slot forever";

/// `HOST:PORT` split and checked, without resolving: `(host, port)`, the host without
/// brackets. The messages say what is missing (the port, the host) rather than "invalid
/// socket address".
pub fn split_host_port(what: &str, s: &str) -> Result<(String, u16), String> {
    let example = "write HOST:PORT, e.g. 127.0.0.1:7000, [::1]:7000 or db.internal:5432";
    let (host, port) = match s.rsplit_once(':') {
        // `[v6]:port`; a bare IPv6 address (`::1`) has colons but no port.
        Some((h, p)) if !h.contains(':') || (h.starts_with('[') && h.ends_with(']')) => (h, p),
        _ => return Err(format!("{what} {s:?} has no port: {example}")),
    };
    if port.is_empty() {
        return Err(format!("{what} {s:?} has no port: {example}"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{what} {s:?}: the port {port:?} is not a number from 0 to 65535"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(format!("{what} {s:?} has no host: {example}"));
    }
    if host.parse::<std::net::IpAddr>().is_err() {
        // A DNS name: labels of letters, digits, '-' and '_', joined by dots.
        let ok = host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        if !ok || s.starts_with('[') {
            return Err(format!(
                "{what} {s:?}: {host:?} is neither an IP address nor a host name"
            ));
        }
    }
    Ok((host.to_string(), port))
}

/// Resolves `host:port` to one address (the first the resolver returns): listen and metrics
/// addresses, which are this machine's.
pub fn resolve(what: &str, s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    let (host, port) = split_host_port(what, s)?;
    match (host.as_str(), port).to_socket_addrs() {
        Ok(mut it) => it
            .next()
            .ok_or_else(|| format!("{what} {s:?} resolves to no address")),
        Err(e) => Err(format!("{what} {s:?} cannot be resolved: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Targets by name (docs/OPERATIONS.md, "Targets by name").

/// One entry of a tunnel's `targets`: an IP address, or a host name that stands for every
/// address it resolves to (IPv6 and IPv4, in the resolver's order), resolved at start, every
/// `resolve_interval` and on SIGHUP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// As written (`db.internal:5432`); names it in logs and in `sealpipe_target_addresses`.
    pub spec: String,
    /// The name and port to resolve; `None` for an IP address.
    pub host: Option<(String, u16)>,
    /// Its addresses, in the resolver's order, without duplicates: the one address of an IP
    /// target; empty for a name not resolved yet, and for a Unix socket.
    pub addrs: Vec<SocketAddr>,
    /// A Unix domain socket's path (`unix:/run/app/x.sock`), interned.
    pub unix: Option<&'static std::path::Path>,
}

impl Target {
    /// Parses `HOST:PORT` (an IP address is final; a name is resolved later) or `unix:PATH`.
    pub fn parse(s: &str) -> Result<Target, String> {
        if let Some(path) = unix_path("target", s) {
            return Ok(Target {
                spec: s.to_string(),
                host: None,
                addrs: Vec::new(),
                unix: Some(crate::proxy::ids::intern(&path?)),
            });
        }
        if let Ok(a) = s.parse::<SocketAddr>() {
            if a.port() == 0 {
                return Err(format!("target {s:?}: port 0 is not a port to connect to"));
            }
            return Ok(Target {
                spec: s.to_string(),
                host: None,
                addrs: vec![a],
                unix: None,
            });
        }
        let (host, port) = split_host_port("target", s)?;
        if port == 0 {
            return Err(format!("target {s:?}: port 0 is not a port to connect to"));
        }
        Ok(Target {
            spec: s.to_string(),
            host: Some((host, port)),
            addrs: Vec::new(),
            unix: None,
        })
    }

    /// What it stands for now: its addresses, or its Unix socket.
    pub fn target_addrs(&self) -> Vec<TargetAddr> {
        match self.unix {
            Some(p) => vec![TargetAddr::Unix(p)],
            None => self.addrs.iter().map(|a| TargetAddr::new(*a)).collect(),
        }
    }

    /// Whether it has something to connect to (a name is resolved, or it is a socket path).
    pub fn is_resolved(&self) -> bool {
        self.unix.is_some() || !self.addrs.is_empty()
    }
}

/// `db.internal:5432 (::1 10.0.0.5)` for a name, the address alone for an address.
impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.spec)?;
        if self.host.is_none() {
            return Ok(());
        }
        if self.addrs.is_empty() {
            return f.write_str(" (not resolved)");
        }
        f.write_str(" (")?;
        for (i, a) in self.addrs.iter().enumerate() {
            write!(f, "{}{}", if i > 0 { " " } else { "" }, a.ip())?;
        }
        f.write_str(")")
    }
}

/// Looks a host name up: every address, in the resolver's order. The system's resolver
/// ([`SystemResolver`]: getaddrinfo, so /etc/hosts, DNS and nsswitch as configured) in
/// production; tests may hand the server another.
pub trait Resolve: Send + Sync {
    fn lookup(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>>;
}

/// getaddrinfo(3), through std.
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn lookup(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        Ok((host, port).to_socket_addrs()?.collect())
    }
}

/// What a lookup gave: its addresses in order without duplicates (getaddrinfo lists an
/// address once per /etc/hosts line naming it), or why there are none.
pub fn lookup(r: &dyn Resolve, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let got = r.lookup(host, port).map_err(|e| e.to_string())?;
    let mut out: Vec<SocketAddr> = Vec::with_capacity(got.len());
    for a in got {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    if out.is_empty() {
        return Err("it resolves to no address".into());
    }
    Ok(out)
}

/// A name that did not resolve, whose previous addresses were kept.
#[derive(Clone, Debug)]
pub struct ResolveFailure {
    pub tunnel: String,
    pub target: String,
    pub error: String,
}

impl ConfigFile {
    /// Parses TOML text; errors carry the line and column.
    pub fn parse(path: &Path, text: &str) -> Result<ConfigFile, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let mut message = e.message().to_string();
            if let Some(span) = e.span() {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                message = format!("line {line}: {message}");
            }
            ConfigError::Parse {
                path: path.to_owned(),
                message,
            }
        })
    }

    pub fn validate(self, path: Option<PathBuf>) -> Result<Config, ConfigError> {
        self.validate_in(path, false)
    }

    /// [`validate`](Self::validate) for a configuration the command line built
    /// (`sealpipe encrypt --listen ...`): errors name the flags (`--connect-timeout`), not
    /// the file's keys.
    pub fn validate_cli(self) -> Result<Config, ConfigError> {
        self.validate_in(None, true)
    }

    fn validate_in(self, path: Option<PathBuf>, cli: bool) -> Result<Config, ConfigError> {
        let l = &self.limits;
        let g = if cli { Scope::Cli } else { Scope::Limits };
        let connect = timeout(g, "connect_timeout", l.connect_timeout, CONNECT_NOT_ZERO)?;
        let handshake = timeout(
            g,
            "handshake_timeout",
            l.handshake_timeout,
            HANDSHAKE_NOT_ZERO,
        )?;
        let idle = seconds_or_off(g, "idle_timeout", l.idle_timeout)?;
        let half = seconds_or_off(g, "half_closed_timeout", l.half_closed_timeout)?;
        // 0: no drain wait; open connections are cut at once.
        let drain = seconds(g, "drain_timeout", l.drain_timeout)?;
        let admission = l.admission(g)?;
        // Checked here too, so that a bad [limits] value is named as [limits]'s even when
        // every tunnel overrides it.
        keepalive(
            g,
            l.keepalive_idle,
            l.keepalive_interval,
            l.keepalive_count,
            l.tcp_user_timeout,
        )?;
        let resolve_every = seconds_or_off(g, "resolve_interval", l.resolve_interval)?;
        if l.max_conns == 0 {
            return Err(g.error("max_conns", "must be > 0".into()));
        }
        if l.threads > 1024 {
            return Err(g.error("threads", "must be at most 1024".into()));
        }
        if l.incoming_cpu && !l.pin {
            return Err(g.wrap(format!(
                "{} needs {}: it hands a connection to the shard pinned on the CPU that received it",
                if cli { "--incoming-cpu" } else { "incoming_cpu = true" },
                if cli { "--pin" } else { "pin = true" },
            )));
        }
        let lg = if cli { Scope::Cli } else { Scope::Log };
        let level = if cli { "log_level" } else { "level" };
        match self.log.format.as_str() {
            "text" | "json" => {}
            f => {
                let field = if cli { "log_format" } else { "format" };
                return Err(lg.error(field, format!("{f:?} is not text or json")));
            }
        }
        // check_log_filter's message starts "log level ...".
        check_log_filter(&self.log.level).map_err(|e| match lg {
            Scope::Cli => ConfigError::Invalid(format!("--{}", e.replacen(' ', "-", 1))),
            _ => lg.wrap(e),
        })?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(lg.error(level, format!("{:?}: {e}", self.log.level)));
        }
        let metrics = match &self.metrics.listen {
            Some(s) => {
                let what = if cli { "--metrics" } else { "[metrics] listen" };
                Some(resolve(what, s).map_err(ConfigError::Invalid)?)
            }
            None => None,
        };
        if self.tunnel.is_empty() {
            return Err(ConfigError::Invalid(
                "no [[tunnel]] defined: nothing to do".into(),
            ));
        }
        let mut tunnels: Vec<Tunnel> = Vec::new();
        for (i, t) in self.tunnel.into_iter().enumerate() {
            let name = t.name.clone().unwrap_or_else(|| format!("tunnel{i}"));
            let sc = if cli {
                Scope::Cli
            } else {
                Scope::Tunnel(&name)
            };
            let bad = |message: String| sc.wrap(message);
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(sc.error(
                    "name",
                    format!("{name:?} must be non-empty ASCII letters, digits, '-', '_' or '.'"),
                ));
            }
            if tunnels.iter().any(|o| o.name == name) {
                return Err(bad("duplicate tunnel name".into()));
            }
            let listen = listen_addr(sc, &t)?;
            if tunnels.iter().any(|o| o.listen.same_socket(&listen)) {
                return Err(bad(format!("listen address {listen} is used twice")));
            }
            if t.targets.is_empty() {
                return Err(sc.error("targets", "is empty".into()));
            }
            let mut targets = Vec::new();
            for s in &t.targets {
                let mut target = Target::parse(s);
                if cli {
                    target = target.map_err(|e| format!("--{e}"));
                }
                targets.push(target.map_err(bad)?);
            }
            match t.mode {
                Mode::Forward if !t.keys.is_empty() => {
                    return Err(bad(format!(
                        "forward mode carries plaintext and takes no {}",
                        sc.name("keys")
                    )));
                }
                Mode::Encrypt | Mode::Decrypt if t.keys.is_empty() => {
                    return Err(bad(format!(
                        "{} mode needs at least one key file ({}; sealpipe keygen --out FILE makes one)",
                        t.mode.as_str(),
                        sc.name("keys")
                    )));
                }
                _ => {}
            }
            let aead = match t.aead.as_deref() {
                None => AeadKind::default(),
                Some(s) => s
                    .parse()
                    .map_err(|_| sc.error("aead", format!("{s:?} is not ring or rustcrypto")))?,
            };
            let forward_secrecy = match &t.forward_secrecy {
                None => ForwardSecrecy::default(),
                Some(s) => s.policy(t.mode).map_err(|e| match sc {
                    Scope::Cli => ConfigError::Invalid(format!("--{}", e.replacen('_', "-", 1))),
                    _ => bad(e),
                })?,
            };
            let hc = seconds_or_off(sc, "health_check_interval", t.health_check_interval)?;
            let identity = crate::proxy::identity::Identity::validate(&t).map_err(bad)?;
            let ka = keepalive(
                sc,
                t.keepalive_idle.unwrap_or(l.keepalive_idle),
                t.keepalive_interval.unwrap_or(l.keepalive_interval),
                t.keepalive_count.unwrap_or(l.keepalive_count),
                t.tcp_user_timeout.or(l.tcp_user_timeout),
            )?;
            let resolve_interval = t.resolve_interval.map_or(Ok(resolve_every), |v| {
                seconds_or_off(sc, "resolve_interval", v)
            })?;
            let (warm_max, warm_refresh, warm_idle_timeout) = warm_settings(sc, t.mode, &t)?;
            let lifetime = lifetime(sc, t.max_lifetime, t.max_lifetime_grace)?;
            let rates = rate_limits(sc, &t)?;
            tunnels.push(Tunnel {
                identity,
                mode: t.mode,
                listen,
                targets,
                key_files: t.keys,
                balance: t.balance,
                forward_secrecy,
                aead,
                health_check_interval: hc,
                connect_timeout: t.connect_timeout.map_or(Ok(connect), |v| {
                    timeout(sc, "connect_timeout", v, CONNECT_NOT_ZERO)
                })?,
                handshake_timeout: t.handshake_timeout.map_or(Ok(handshake), |v| {
                    timeout(sc, "handshake_timeout", v, HANDSHAKE_NOT_ZERO)
                })?,
                idle_timeout: t
                    .idle_timeout
                    .map_or(Ok(idle), |v| seconds_or_off(sc, "idle_timeout", v))?,
                half_closed_timeout: t
                    .half_closed_timeout
                    .map_or(Ok(half), |v| seconds_or_off(sc, "half_closed_timeout", v))?,
                keepalive: ka,
                resolve_interval,
                warm_max,
                warm_refresh,
                warm_idle_timeout,
                lifetime,
                rates,
                name,
            });
        }
        Ok(Config {
            log: self.log,
            metrics,
            threads: self.limits.threads,
            pin: self.limits.pin,
            incoming_cpu: self.limits.incoming_cpu,
            max_conns: self.limits.max_conns,
            drain_timeout: drain,
            admission,
            tunnels,
            path,
            overrides: CliOverrides::default(),
        })
    }
}

impl Config {
    /// Reads, parses and validates a config file (keys are checked too).
    /// (Target names resolved, with the system's resolver.)
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let mut cfg = Config::read(path)?;
        cfg.resolve_targets(None, &SystemResolver)?;
        cfg.load_keys()?;
        Ok(cfg)
    }

    /// [`from_file`](Self::from_file), with command-line settings over the file's.
    pub fn from_file_with(path: &Path, overrides: CliOverrides) -> Result<Config, ConfigError> {
        let mut cfg = Config::read(path)?;
        cfg.apply_overrides(overrides)?;
        cfg.resolve_targets(None, &SystemResolver)?;
        cfg.load_keys()?;
        Ok(cfg)
    }

    /// Puts command-line settings over the file's (errors name the flag) and keeps them for
    /// reloads.
    pub fn apply_overrides(&mut self, o: CliOverrides) -> Result<(), ConfigError> {
        if let Some(level) = &o.log_level {
            check_log_filter(level)
                .map_err(|e| ConfigError::Invalid(format!("--{}", e.replacen(' ', "-", 1))))?;
            self.log.level = level.clone();
        }
        if let Some(format) = &o.log_format {
            if format != "text" && format != "json" {
                return Err(ConfigError::Invalid(format!(
                    "--log-format {format:?} is not text or json"
                )));
            }
            self.log.format = format.clone();
        }
        self.overrides = o;
        Ok(())
    }

    /// Reads, parses and validates a config file, without reading its key files or
    /// resolving its target names.
    pub fn read(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        ConfigFile::parse(path, &text)?.validate(Some(path.to_owned()))
    }

    /// Resolves every target name. A name that does not resolve keeps the addresses it has
    /// in `previous` (the running configuration: same tunnel, same target as written), and
    /// is returned as a failure to count and log; without previous addresses it is an error
    /// (there would be nothing to connect to).
    pub fn resolve_targets(
        &mut self,
        previous: Option<&Config>,
        resolver: &dyn Resolve,
    ) -> Result<Vec<ResolveFailure>, ConfigError> {
        let mut failures = Vec::new();
        for t in &mut self.tunnels {
            for target in &mut t.targets {
                let Some((host, port)) = &target.host else {
                    continue;
                };
                match lookup(resolver, host, *port) {
                    Ok(addrs) => target.addrs = addrs,
                    Err(error) => {
                        let kept = previous
                            .and_then(|p| p.tunnels.iter().find(|o| o.name == t.name))
                            .and_then(|o| o.targets.iter().find(|o| o.spec == target.spec))
                            .map(|o| o.addrs.clone())
                            .filter(|a| !a.is_empty());
                        match kept {
                            Some(addrs) => {
                                target.addrs = addrs;
                                failures.push(ResolveFailure {
                                    tunnel: t.name.clone(),
                                    target: target.spec.clone(),
                                    error,
                                });
                            }
                            None => {
                                return Err(ConfigError::Tunnel {
                                    tunnel: t.name.clone(),
                                    message: format!(
                                        "target {:?} cannot be resolved: {error}",
                                        target.spec
                                    ),
                                });
                            }
                        }
                    }
                }
            }
        }
        Ok(failures)
    }

    /// Whether every target has addresses (names resolved).
    pub fn resolved(&self) -> bool {
        self.tunnels
            .iter()
            .all(|t| t.targets.iter().all(Target::is_resolved))
    }

    /// Loads every tunnel's key set (one per tunnel, in tunnel order; `None` for forward).
    pub fn load_keys(&self) -> Result<Vec<Option<Arc<KeySet>>>, ConfigError> {
        self.tunnels
            .iter()
            .map(|t| {
                if t.mode == Mode::Forward {
                    return Ok(None);
                }
                crate::keyfile::load_key_set(&t.key_files)
                    .map(|k| Some(Arc::new(k)))
                    .map_err(|source| ConfigError::Key {
                        tunnel: t.name.clone(),
                        source,
                    })
            })
            .collect()
    }

    /// Shards to run: `threads`, or the CPUs this process may run on.
    pub fn shard_count(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        ConfigFile::parse(Path::new("t.toml"), s)?.validate(None)
    }

    #[test]
    fn unknown_key_names_the_line() {
        let e = parse("[limits]\nthreads = 1\nbogus = 2\n").unwrap_err();
        let m = e.to_string();
        assert!(m.contains("line 3"), "{m}");
        assert!(m.contains("bogus"), "{m}");
    }

    #[test]
    fn minimal_forward_tunnel() {
        let c = parse(
            "[[tunnel]]\nmode = \"forward\"\nlisten = \"127.0.0.1:1\"\ntargets = [\"127.0.0.1:2\"]\n",
        )
        .unwrap();
        assert_eq!(c.tunnels[0].name, "tunnel0");
        assert_eq!(c.tunnels[0].idle_timeout, Some(Duration::from_secs(300)));
    }

    #[test]
    fn encrypt_needs_keys_and_forward_refuses_them() {
        let e = parse(
            "[[tunnel]]\nmode = \"encrypt\"\nlisten = \"127.0.0.1:1\"\ntargets = [\"127.0.0.1:2\"]\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("key"), "{e}");
        let e = parse(
            "[[tunnel]]\nmode = \"forward\"\nlisten = \"127.0.0.1:1\"\ntargets = [\"127.0.0.1:2\"]\nkeys = [\"k\"]\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("no keys"), "{e}");
    }

    #[test]
    fn admission_limits_are_checked_and_named() {
        let t = "[[tunnel]]\nmode = \"forward\"\nlisten = \"127.0.0.1:1\"\ntargets = [\"127.0.0.1:2\"]\n";
        let c = parse(t).unwrap();
        assert_eq!(c.admission.max_handshakes_per_source, 2048);
        assert_eq!(c.tunnels[0].handshake_timeout, Duration::from_secs(5));
        for (bad, name) in [
            ("max_handshakes = 0", "max_handshakes"),
            ("max_handshakes_per_source = 0", "max_handshakes_per_source"),
            ("new_conns_per_source = -1.0", "new_conns_per_source"),
            (
                "new_conns_per_source = 10.0\nnew_conns_per_source_burst = 0",
                "burst",
            ),
        ] {
            let e = parse(&format!("[limits]\n{bad}\n{t}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(name), "{bad}: {e}");
        }
        let c = parse(&format!("[limits]\nnew_conns_per_source = 0\n{t}")).unwrap();
        assert_eq!(c.admission.new_conns_per_source, 0.0);
    }

    #[test]
    fn incoming_cpu_needs_pin() {
        let t = "[[tunnel]]\nmode = \"forward\"\nlisten = \"127.0.0.1:1\"\ntargets = [\"127.0.0.1:2\"]\n";
        let c = parse(t).unwrap();
        assert!(!c.pin && !c.incoming_cpu, "unpinned, hashed by default");
        let e = parse(&format!("[limits]\nincoming_cpu = true\n{t}")).unwrap_err();
        assert!(e.to_string().contains("needs pin = true"), "{e}");
        let c = parse(&format!("[limits]\npin = true\nincoming_cpu = true\n{t}")).unwrap();
        assert!(c.pin && c.incoming_cpu);
    }

    #[test]
    fn bad_values_are_named() {
        let e = parse("[limits]\nidle_timeout = -1\n[[tunnel]]\nmode = \"forward\"\nlisten = \"127.0.0.1:1\"\ntargets = [\"127.0.0.1:2\"]\n").unwrap_err();
        assert!(e.to_string().contains("idle_timeout"), "{e}");
        let e =
            parse("[[tunnel]]\nmode = \"sideways\"\nlisten = \"x\"\ntargets = []\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn forward_secrecy_takes_a_policy_or_the_old_boolean() {
        let tunnel = |mode: &str, fs: &str| {
            parse(&format!(
                "[[tunnel]]\nmode = \"{mode}\"\nlisten = \"127.0.0.1:1\"\ntargets = [\"127.0.0.1:2\"]\nkeys = [\"k\"]\n{fs}"
            ))
            .map(|c| c.tunnels[0].forward_secrecy)
        };
        use ForwardSecrecy::*;
        for mode in ["encrypt", "decrypt"] {
            assert_eq!(tunnel(mode, "").unwrap(), Require);
            assert_eq!(tunnel(mode, "forward_secrecy = true").unwrap(), Require);
            for p in [Require, Allow, Off] {
                let line = format!("forward_secrecy = \"{}\"", p.as_str());
                assert_eq!(tunnel(mode, &line).unwrap(), p);
            }
        }
        // `false` keeps its old meaning on each side.
        assert_eq!(tunnel("encrypt", "forward_secrecy = false").unwrap(), Off);
        assert_eq!(tunnel("decrypt", "forward_secrecy = false").unwrap(), Allow);
        let e = tunnel("decrypt", "forward_secrecy = \"maybe\"").unwrap_err();
        assert!(
            e.to_string().contains("forward_secrecy") && e.to_string().contains("maybe"),
            "{e}"
        );
        let e = tunnel("decrypt", "forward_secrecy = 1").unwrap_err();
        assert!(e.to_string().contains("require"), "{e}");
    }

    const FWD: &str =
        "[[tunnel]]\nmode = \"forward\"\nlisten = \"127.0.0.1:1\"\ntargets = [\"127.0.0.1:2\"]\n";

    #[test]
    fn warm_settings_have_defaults_ranges_and_a_side() {
        let tunnel = |mode: &str, extra: &str| {
            parse(&format!(
                "[[tunnel]]\nmode = \"{mode}\"\nlisten = \"127.0.0.1:1\"\ntargets = [\"127.0.0.1:2\"]\nkeys = [\"k\"]\n{extra}"
            ))
        };
        // On by default on an encrypt side, with a small pool; the decrypt side's limit.
        let e = tunnel("encrypt", "").unwrap();
        assert_eq!(e.tunnels[0].warm_max, 4);
        assert_eq!(e.tunnels[0].warm_refresh, Duration::from_secs(25));
        let d = tunnel("decrypt", "").unwrap();
        assert_eq!(d.tunnels[0].warm_idle_timeout, Duration::from_secs(60));
        assert_eq!(d.admission.max_unopened_per_source, 256);
        assert_eq!(d.tunnels[0].warm_max, 0, "a decrypt side makes none");
        // 0 turns them off.
        let off = tunnel("encrypt", "warm_max = 0").unwrap();
        assert_eq!(off.tunnels[0].warm_max, 0);
        let c = tunnel("encrypt", "warm_max = 8\nwarm_refresh = 0.5").unwrap();
        assert_eq!(c.tunnels[0].warm_max, 8);
        assert_eq!(c.tunnels[0].warm_refresh, Duration::from_millis(500));
        for (mode, bad, says) in [
            ("encrypt", "warm_max = 65", "warm_max"),
            ("encrypt", "warm_refresh = 0", "warm_refresh"),
            ("encrypt", "warm_refresh = -1", "warm_refresh"),
            ("decrypt", "warm_idle_timeout = 0", "warm_idle_timeout"),
            ("decrypt", "warm_max = 2", "encrypt side"),
            ("decrypt", "warm_refresh = 10", "encrypt side"),
            ("encrypt", "warm_idle_timeout = 10", "decrypt side"),
        ] {
            let e = tunnel(mode, bad).unwrap_err().to_string();
            assert!(e.contains(says), "{mode} {bad}: {e}");
        }
        let e = parse(&format!("[limits]\nmax_unopened_per_source = 0\n{FWD}")).unwrap_err();
        assert!(e.to_string().contains("max_unopened_per_source"), "{e}");
    }

    #[test]
    fn keepalive_defaults_overrides_and_bad_values_named() {
        let c = parse(FWD).unwrap();
        let k = c.tunnels[0].keepalive;
        assert_eq!(k.idle, Some(Duration::from_secs(60)));
        assert_eq!((k.interval, k.count), (Duration::from_secs(10), 6));
        assert_eq!(
            k.user_timeout,
            Some(Duration::from_secs(120)),
            "idle + interval x count"
        );
        let c = parse(&format!("[limits]\nkeepalive_idle = 0\n{FWD}")).unwrap();
        assert_eq!(c.tunnels[0].keepalive.idle, None);
        assert_eq!(c.tunnels[0].keepalive.user_timeout, None, "kernel default");
        let c = parse(&format!(
            "{FWD}keepalive_idle = 5\ntcp_user_timeout = 0.5\n"
        ))
        .unwrap();
        let k = c.tunnels[0].keepalive;
        assert_eq!(k.idle, Some(Duration::from_secs(5)));
        assert_eq!(k.user_timeout, Some(Duration::from_millis(500)));
        let c = parse(&format!("{FWD}tcp_user_timeout = 0\n")).unwrap();
        assert_eq!(c.tunnels[0].keepalive.user_timeout, None);
        for (bad, key, why) in [
            ("keepalive_idle = 1.5", "keepalive_idle", "whole seconds"),
            ("keepalive_idle = 40000", "keepalive_idle", "32767"),
            ("keepalive_interval = 0", "keepalive_interval", "from 1"),
            ("keepalive_count = 0", "keepalive_count", "from 1 to 127"),
            ("keepalive_count = 200", "keepalive_count", "from 1 to 127"),
            ("tcp_user_timeout = -1", "tcp_user_timeout", "between 0"),
            (
                "tcp_user_timeout = 0.0001",
                "tcp_user_timeout",
                "milliseconds",
            ),
            ("resolve_interval = -1", "resolve_interval", "between 0"),
        ] {
            let e = parse(&format!("[limits]\n{bad}\n{FWD}"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("[limits] {key}")) && e.contains(why),
                "{bad}: {e}"
            );
            let e = parse(&format!("{FWD}{bad}\n")).unwrap_err().to_string();
            assert!(
                e.contains("tunnel0") && e.contains(key) && e.contains(why),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn max_lifetime_defaults_overrides_and_bad_values_named() {
        let c = parse(FWD).unwrap();
        assert_eq!(c.tunnels[0].lifetime, None, "no limit by default");
        let c = parse(&format!("{FWD}max_lifetime = 0\n")).unwrap();
        assert_eq!(c.tunnels[0].lifetime, None, "0 = no limit");
        let c = parse(&format!("{FWD}max_lifetime = 3600\n")).unwrap();
        assert_eq!(
            c.tunnels[0].lifetime,
            Some(Lifetime {
                max: Duration::from_secs(3600),
                grace: DEFAULT_LIFETIME_GRACE
            })
        );
        let c = parse(&format!("{FWD}max_lifetime = 60\nmax_lifetime_grace = 0\n")).unwrap();
        assert_eq!(c.tunnels[0].lifetime.unwrap().grace, Duration::ZERO);
        for (bad, key, why) in [
            (
                "max_lifetime = -1",
                "max_lifetime",
                "between 0 and one year",
            ),
            ("max_lifetime = 0.5", "max_lifetime", "at least 1 second"),
            (
                "max_lifetime_grace = 10",
                "max_lifetime_grace",
                "no effect without max_lifetime",
            ),
            (
                "max_lifetime = 60\nmax_lifetime_grace = -5",
                "max_lifetime_grace",
                "between 0 and one year",
            ),
        ] {
            let e = parse(&format!("{FWD}{bad}\n")).unwrap_err().to_string();
            assert!(
                e.contains("tunnel0") && e.contains(key) && e.contains(why),
                "{bad}: {e}"
            );
        }
        let mut f = ConfigFile::parse(Path::new("t.toml"), FWD).unwrap();
        f.tunnel[0].max_lifetime_grace = Some(5.0);
        let e = f.validate_cli().unwrap_err().to_string();
        assert!(
            e.starts_with("--max-lifetime-grace has no effect without --max-lifetime"),
            "{e}"
        );
    }

    #[test]
    fn byte_amounts_take_units_and_name_the_bad_ones() {
        let b = |s: &str| bytes(&Amount::from(s), true);
        assert_eq!(b("100Mbit").unwrap(), 12_500_000.0);
        assert_eq!(b("100Mbit/s").unwrap(), 12_500_000.0);
        assert_eq!(b("12.5MB").unwrap(), 12_500_000.0);
        assert_eq!(b("64KiB").unwrap(), 65_536.0);
        assert_eq!(b("1_000").unwrap(), 1000.0);
        assert_eq!(b("2 GiB").unwrap(), 2.0 * 1073741824.0);
        assert_eq!(bytes(&Amount::Number(5e6), true).unwrap(), 5e6);
        let e = b("100Mb").unwrap_err();
        assert!(
            e.contains("unknown unit \"Mb\"") && e.contains("Mbit"),
            "{e}"
        );
        assert!(b("fast").unwrap_err().contains("not a number"));
        assert!(
            bytes(&Amount::from("1MB/s"), false).is_err(),
            "a size has no /s"
        );
    }

    #[test]
    fn rate_limits_defaults_and_bad_values_named() {
        let c = parse(FWD).unwrap();
        assert!(c.tunnels[0].rates.is_empty(), "no limits by default");
        let c = parse(&format!(
            "{FWD}conn_rate = 100\nupstream_rate = \"100Mbit\"\ndownstream_rate = 1000000\n"
        ))
        .unwrap();
        let r = c.tunnels[0].rates;
        let l = |rate: f64, burst: f64| Some(Limit { rate, burst });
        assert_eq!(r.conns, l(100.0, 100.0), "a second's worth of burst");
        assert_eq!(r.upstream, l(12_500_000.0, 12_500_000.0));
        assert_eq!(r.downstream, l(1_000_000.0, 1_000_000.0));
        let c = parse(&format!(
            "{FWD}conn_rate = 0.5\nconn_rate_burst = 3\nupstream_rate = \"8Mbit\"\nrate_burst = \"64KiB\"\n"
        ))
        .unwrap();
        let r = c.tunnels[0].rates;
        assert_eq!(r.conns, l(0.5, 3.0));
        assert_eq!(r.upstream, l(1_000_000.0, 65_536.0));
        assert_eq!(r.downstream, None);
        let c = parse(&format!("{FWD}conn_rate = 0\nupstream_rate = 0\n")).unwrap();
        assert!(c.tunnels[0].rates.is_empty(), "0 = no limit");
        for (bad, key, why) in [
            ("conn_rate = -1", "conn_rate", "between 0 (no limit)"),
            (
                "conn_rate_burst = 5",
                "conn_rate_burst",
                "no effect without conn_rate",
            ),
            (
                "conn_rate = 10\nconn_rate_burst = 0",
                "conn_rate_burst",
                "between 1",
            ),
            ("upstream_rate = \"10Mb\"", "upstream_rate", "unknown unit"),
            ("downstream_rate = 10", "downstream_rate", "from 1000"),
            (
                "upstream_rate = -5",
                "upstream_rate",
                "0 (no limit) or from",
            ),
            (
                "rate_burst = \"1MB\"",
                "rate_burst",
                "no effect without upstream_rate",
            ),
            (
                "upstream_rate = \"1MB\"\nrate_burst = 10",
                "rate_burst",
                "from 1024",
            ),
        ] {
            let e = parse(&format!("{FWD}{bad}\n")).unwrap_err().to_string();
            assert!(
                e.contains("tunnel0") && e.contains(key) && e.contains(why),
                "{bad}: {e}"
            );
        }
        let mut f = ConfigFile::parse(Path::new("t.toml"), FWD).unwrap();
        f.tunnel[0].upstream_rate = Some("lots".into());
        let e = f.validate_cli().unwrap_err().to_string();
        assert!(e.starts_with("--upstream-rate \"lots\""), "{e}");
    }

    #[test]
    fn unix_sockets_listen_and_connect_and_their_keys_are_checked() {
        let unix = "[[tunnel]]\nmode = \"forward\"\nlisten = \"unix:/run/app/in.sock\"\ntargets = [\"unix:/run/app/redis.sock\", \"127.0.0.1:2\"]\n";
        let c = parse(&format!(
            "{unix}listen_mode = 0o660\nlisten_owner = \"app\"\nlisten_group = \"1000\"\n"
        ))
        .unwrap();
        let t = &c.tunnels[0];
        let u = t.listen.unix().unwrap();
        assert_eq!(u.path, Path::new("/run/app/in.sock"));
        assert_eq!(
            (u.mode, u.owner.as_deref(), u.group.as_deref()),
            (Some(0o660), Some("app"), Some("1000"))
        );
        assert_eq!(t.listen.to_string(), "unix:/run/app/in.sock");
        assert!(c.resolved(), "a socket path needs no resolving");
        assert_eq!(
            t.target_addrs()[0],
            vec![TargetAddr::unix(Path::new("/run/app/redis.sock"))]
        );
        assert_eq!(t.targets[0].to_string(), "unix:/run/app/redis.sock");
        let c = parse(&format!("{unix}listen_mode = \"0600\"\n")).unwrap();
        assert_eq!(c.tunnels[0].listen.unix().unwrap().mode, Some(0o600));
        for (bad, key, why) in [
            ("listen_mode = \"999\"", "listen_mode", "permission bits"),
            (
                "listen_mode = 0o4755",
                "listen_mode",
                "permission bits from 0 to 0777",
            ),
            (
                "listen_owner = \"a b\"",
                "listen_owner",
                "not a user or group name",
            ),
            (
                "allow = [\"10.0.0.0/8\"]",
                "allow",
                "needs an IP listen address",
            ),
        ] {
            let e = parse(&format!("{unix}{bad}\n")).unwrap_err().to_string();
            assert!(
                e.contains("tunnel0") && e.contains(key) && e.contains(why),
                "{bad}: {e}"
            );
        }
        for (listen, why) in [
            ("unix:run/app.sock", "must be absolute"),
            ("unix:/run/app/", "names a directory"),
        ] {
            let text = format!(
                "[[tunnel]]\nmode = \"forward\"\nlisten = \"{listen}\"\ntargets = [\"127.0.0.1:2\"]\n"
            );
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains("listen") && e.contains(why), "{listen}: {e}");
        }
        let long = format!("unix:/{}", "x".repeat(120));
        let e = Target::parse(&long).unwrap_err();
        assert!(e.contains("over the 107"), "{e}");
        let e = parse(&format!("{FWD}listen_group = \"app\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("listen_group applies to a Unix socket's file"),
            "{e}"
        );
        let e = parse(&format!("{unix}[[tunnel]]\nname = \"b\"\nmode = \"forward\"\nlisten = \"unix:/run/app/in.sock\"\ntargets = [\"127.0.0.1:3\"]\n")).unwrap_err().to_string();
        assert!(e.contains("used twice"), "{e}");
    }

    #[test]
    fn targets_are_addresses_or_names_and_a_missing_port_is_named() {
        let t = Target::parse("10.0.0.5:80").unwrap();
        assert_eq!((t.host, t.addrs.len()), (None, 1));
        let t = Target::parse("[::1]:80").unwrap();
        assert_eq!(t.addrs, vec!["[::1]:80".parse().unwrap()]);
        let t = Target::parse("db.internal:5432").unwrap();
        assert_eq!(t.host, Some(("db.internal".into(), 5432)));
        assert!(t.addrs.is_empty(), "resolved later");
        for (bad, why) in [
            ("10.0.0.5", "has no port"),
            ("db.internal", "has no port"),
            ("db.internal:", "has no port"),
            ("::1", "has no port"),
            ("[::1]", "has no port"),
            (":80", "has no host"),
            ("db:http", "is not a number"),
            ("db:70000", "is not a number"),
            ("db:0", "port 0"),
            ("bad host:80", "neither an IP address nor a host name"),
            ("[db.internal]:80", "neither an IP address nor a host name"),
        ] {
            let e = Target::parse(bad).unwrap_err();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
        let e = resolve("listen", "127.0.0.1").unwrap_err();
        assert!(e.contains("has no port"), "{e}");
    }

    /// Resolves names from a table; counts lookups.
    struct Table(Vec<(&'static str, Result<Vec<SocketAddr>, ()>)>);

    impl Resolve for Table {
        fn lookup(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
            match self.0.iter().find(|(h, _)| *h == host) {
                Some((_, Ok(a))) => Ok(a.iter().map(|a| SocketAddr::new(a.ip(), port)).collect()),
                _ => Err(std::io::Error::other("no such host")),
            }
        }
    }

    #[test]
    fn names_resolve_to_every_address_and_a_failure_keeps_the_last_good_list() {
        let text = "[[tunnel]]\nname = \"t\"\nmode = \"forward\"\nlisten = \"127.0.0.1:1\"\ntargets = [\"db:5432\", \"10.0.0.9:1\"]\n";
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let mut c = parse(text).unwrap();
        assert!(!c.resolved());
        let both = Table(vec![(
            "db",
            Ok(vec![a("[::1]:0"), a("127.0.0.1:0"), a("[::1]:0")]),
        )]);
        assert!(c.resolve_targets(None, &both).unwrap().is_empty());
        assert_eq!(
            c.tunnels[0].targets[0].addrs,
            vec![a("[::1]:5432"), a("127.0.0.1:5432")]
        );
        assert_eq!(
            c.tunnels[0].target_addrs()[1],
            vec![TargetAddr::new(a("10.0.0.9:1"))]
        );
        // The name stops resolving: the running list is kept, and the failure reported.
        let mut next = parse(text).unwrap();
        let failures = next.resolve_targets(Some(&c), &Table(vec![])).unwrap();
        assert_eq!(failures.len(), 1);
        assert_eq!(
            (failures[0].tunnel.as_str(), failures[0].target.as_str()),
            ("t", "db:5432")
        );
        assert_eq!(
            next.tunnels[0].targets[0].addrs,
            c.tunnels[0].targets[0].addrs
        );
        // Without a previous list there is nothing to keep: an error naming the target.
        let e = parse(text)
            .unwrap()
            .resolve_targets(None, &Table(vec![]))
            .unwrap_err();
        assert!(
            e.to_string().contains("\"db:5432\" cannot be resolved"),
            "{e}"
        );
        let empty = Table(vec![("db", Ok(vec![]))]);
        let e = parse(text)
            .unwrap()
            .resolve_targets(None, &empty)
            .unwrap_err();
        assert!(e.to_string().contains("resolves to no address"), "{e}");
    }

    #[test]
    fn cli_errors_name_the_flags() {
        let mut f = ConfigFile::parse(Path::new("t.toml"), FWD).unwrap();
        f.limits.connect_timeout = 0.0;
        let e = f.validate_cli().unwrap_err().to_string();
        assert!(e.starts_with("--connect-timeout cannot be 0"), "{e}");
        let mut f = ConfigFile::parse(Path::new("t.toml"), FWD).unwrap();
        f.limits.keepalive_count = 0;
        let e = f.validate_cli().unwrap_err().to_string();
        assert!(e.starts_with("--keepalive-count must be"), "{e}");
        let mut f = ConfigFile::parse(Path::new("t.toml"), FWD).unwrap();
        f.tunnel[0].listen = "127.0.0.1".into();
        let e = f.validate_cli().unwrap_err().to_string();
        assert!(e.starts_with("--listen \"127.0.0.1\" has no port"), "{e}");
        let mut f = ConfigFile::parse(Path::new("t.toml"), FWD).unwrap();
        f.tunnel[0].targets = vec!["db".into()];
        let e = f.validate_cli().unwrap_err().to_string();
        assert!(e.starts_with("--target \"db\" has no port"), "{e}");
        let mut f = ConfigFile::parse(Path::new("t.toml"), FWD).unwrap();
        f.log.level = "warning".into();
        let e = f.validate_cli().unwrap_err().to_string();
        assert!(e.starts_with("--log-level \"warning\""), "{e}");
        let mut f = ConfigFile::parse(Path::new("t.toml"), FWD).unwrap();
        f.limits.new_conns_per_source_burst = 0;
        let e = f.validate_cli().unwrap_err().to_string();
        assert!(
            e.contains("--new-conns-per-source-burst must be > 0 when --new-conns-per-source"),
            "{e}"
        );
    }
}
