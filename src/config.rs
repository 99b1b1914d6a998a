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

/// Validated pre-authentication admission limits (the `[limits]` keys above).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Admission {
    pub max_handshakes: usize,
    pub max_handshakes_per_source: usize,
    /// Per second; 0 = no limit.
    pub new_conns_per_source: f64,
    pub new_conns_per_source_burst: usize,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            max_handshakes: d_max_handshakes(),
            max_handshakes_per_source: d_per_source(),
            new_conns_per_source: d_source_rate(),
            new_conns_per_source_burst: d_source_burst(),
        }
    }
}

impl Limits {
    fn admission(&self) -> Result<Admission, ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(format!("[limits] {m}")));
        if self.max_handshakes == 0 {
            return bad("max_handshakes must be > 0");
        }
        if self.max_handshakes_per_source == 0 {
            return bad("max_handshakes_per_source must be > 0");
        }
        let r = self.new_conns_per_source;
        if !r.is_finite() || !(0.0..=1e9).contains(&r) {
            return bad(&format!(
                "new_conns_per_source must be between 0 (no limit) and 1e9 per second, got {r}"
            ));
        }
        if r > 0.0 && self.new_conns_per_source_burst == 0 {
            return bad("new_conns_per_source_burst must be > 0 when new_conns_per_source is set");
        }
        Ok(Admission {
            max_handshakes: self.max_handshakes,
            max_handshakes_per_source: self.max_handshakes_per_source,
            new_conns_per_source: r,
            new_conns_per_source_burst: self.new_conns_per_source_burst,
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
        }
    }
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
    pub listen: SocketAddr,
    pub targets: Vec<SocketAddr>,
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
}

impl Tunnel {
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
}

/// Where a setting is written, for error messages.
#[derive(Clone, Copy)]
enum Scope<'a> {
    Limits,
    Tunnel(&'a str),
}

impl Scope<'_> {
    fn error(self, field: &str, message: String) -> ConfigError {
        match self {
            Scope::Limits => ConfigError::Invalid(format!("[limits] {field} {message}")),
            Scope::Tunnel(t) => ConfigError::Tunnel {
                tunnel: t.into(),
                message: format!("{field} {message}"),
            },
        }
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

const CONNECT_NOT_ZERO: &str = "a connect that never gives up never tries the next target";
const HANDSHAKE_NOT_ZERO: &str = "a peer that never completes its handshake must be closed, or it holds a connection slot forever";

/// Resolves `host:port` (one address; the first the resolver returns).
pub fn resolve(what: &str, s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    match s.to_socket_addrs() {
        Ok(mut it) => it
            .next()
            .ok_or_else(|| format!("{what} {s:?} resolves to no address")),
        Err(e) => Err(format!("{what} {s:?} cannot be resolved: {e}")),
    }
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
        let l = &self.limits;
        let g = Scope::Limits;
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
        let admission = l.admission()?;
        if l.max_conns == 0 {
            return Err(ConfigError::Invalid(
                "[limits] max_conns must be > 0".into(),
            ));
        }
        if l.threads > 1024 {
            return Err(ConfigError::Invalid(
                "[limits] threads must be at most 1024".into(),
            ));
        }
        if l.incoming_cpu && !l.pin {
            return Err(ConfigError::Invalid(
                "[limits] incoming_cpu = true needs pin = true: it hands a connection to the shard pinned on the CPU that received it".into(),
            ));
        }
        match self.log.format.as_str() {
            "text" | "json" => {}
            f => {
                return Err(ConfigError::Invalid(format!(
                    "[log] format {f:?} is not text or json"
                )));
            }
        }
        check_log_filter(&self.log.level)
            .map_err(|e| ConfigError::Invalid(format!("[log] {e}")))?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::Invalid(format!(
                "[log] level {:?}: {e}",
                self.log.level
            )));
        }
        let metrics = match &self.metrics.listen {
            Some(s) => Some(resolve("[metrics] listen", s).map_err(ConfigError::Invalid)?),
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
            let bad = |message: String| ConfigError::Tunnel {
                tunnel: name.clone(),
                message,
            };
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(bad(
                    "name must be non-empty ASCII letters, digits, '-', '_' or '.'".into(),
                ));
            }
            if tunnels.iter().any(|o| o.name == name) {
                return Err(bad("duplicate tunnel name".into()));
            }
            let listen = resolve("listen", &t.listen).map_err(bad)?;
            if tunnels.iter().any(|o| o.listen == listen) {
                return Err(bad(format!("listen address {listen} is used twice")));
            }
            if t.targets.is_empty() {
                return Err(bad("targets is empty".into()));
            }
            let mut targets = Vec::new();
            for s in &t.targets {
                targets.push(resolve("target", s).map_err(bad)?);
            }
            match t.mode {
                Mode::Forward if !t.keys.is_empty() => {
                    return Err(bad(
                        "forward mode carries plaintext and takes no keys".into()
                    ));
                }
                Mode::Encrypt | Mode::Decrypt if t.keys.is_empty() => {
                    return Err(bad(format!(
                        "{} mode needs at least one key file (sealpipe keygen --out FILE)",
                        t.mode.as_str()
                    )));
                }
                _ => {}
            }
            let aead = match t.aead.as_deref() {
                None => AeadKind::default(),
                Some(s) => s
                    .parse()
                    .map_err(|_| bad(format!("aead {s:?} is not ring or rustcrypto")))?,
            };
            let forward_secrecy = match &t.forward_secrecy {
                None => ForwardSecrecy::default(),
                Some(s) => s.policy(t.mode).map_err(bad)?,
            };
            let sc = Scope::Tunnel(&name);
            let hc = seconds_or_off(sc, "health_check_interval", t.health_check_interval)?;
            let identity = crate::proxy::identity::Identity::validate(&t).map_err(bad)?;
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
        })
    }
}

impl Config {
    /// Reads, parses and validates a config file (keys are checked too).
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg = ConfigFile::parse(path, &text)?.validate(Some(path.to_owned()))?;
        cfg.load_keys()?;
        Ok(cfg)
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
}
