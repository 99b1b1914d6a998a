//! The `sealpipe` command line: argument parsing, logging setup, and turning results into exit
//! statuses. Everything else (the demo too: `sealpipe::demo`) is in the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use clap::{Args, CommandFactory, Parser, Subcommand};
use tracing_subscriber::{EnvFilter, reload};

use sealpipe::config::{
    Balance, CliOverrides, Config, ConfigFile, FsSetting, Limits, LogConfig, MetricsConfig, Mode,
    SystemResolver, TunnelFile,
};
use sealpipe::protocol::ForwardSecrecy;
use sealpipe::server::{self, ExitReason, LogControl};

#[derive(Parser)]
#[command(
    name = "sealpipe",
    version,
    about = "An encrypting TCP proxy for fleets.",
    long_about = "\
sealpipe carries plaintext TCP protocols (Redis, Postgres, HTTP, ...) across untrusted networks.
Run it in pairs: `encrypt` accepts plaintext from local clients and sends sealed records to a
`decrypt` side, which opens them and talks plaintext to the real backend. Both sides share a
256-bit key file made by `sealpipe keygen`.

Durations are seconds (fractions allowed). 0 turns off what can be off: the idle and
half-closed timeouts, the drain wait, active health checks. The connect and handshake timeouts
must be > 0.

Start with `sealpipe demo` to see a pair working on loopback."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Keep the process dumpable, for debugging. By default sealpipe makes itself
    /// non-dumpable at start (PR_SET_DUMPABLE 0, core size limit 0): no core file, and no other
    /// process of the same user can attach a debugger or read its memory, so keys stay inside.
    #[arg(long, global = true, env = "SEALPIPE_DUMPABLE")]
    dumpable: bool,
}

/// What the two sides of a pair must agree on (shown by `encrypt --help` and `decrypt --help`).
const PAIRING: &str = "\
What the encrypt and decrypt sides must agree on:
  key              the encrypt side's first --key must be one of the decrypt side's --key files
                   (both log its key id; `sealpipe keygen` prints it)
  forward secrecy  --forward-secrecy off on the encrypt side needs allow or off on the decrypt
                   side (its default, require, refuses sessions without forward secrecy)
  protocol         the same sealpipe protocol version (2) on both sides: upgrade them together
  address          the encrypt side's --target is the decrypt side's --listen
Everything else (--aead, timeouts, --threads, limits) is each side's own choice. When a pair
does not agree, the decrypt side's log names the cause; the encrypt side's says where to look.";

#[derive(Subcommand)]
enum Cmd {
    /// Accept plaintext on --listen, send sealed records to decrypt-side --target(s).
    #[command(after_help = PAIRING)]
    Encrypt(SealedArgs),
    /// Accept sealed records on --listen, send plaintext to backend --target(s).
    #[command(after_help = PAIRING)]
    Decrypt(SealedArgs),
    /// Plaintext relay from --listen to --target(s), no crypto.
    Forward(TunnelArgs),
    /// Run every tunnel of a TOML config file in one process.
    Run {
        /// The config file (TOML; deploy/sealpipe.example.toml documents every key). SIGHUP
        /// reads it again.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[command(flatten)]
        log: LogArgs,
        #[command(flatten)]
        handoff: HandoffArgs,
    },
    /// Validate a config file (and its key files, and that its target names resolve): exit
    /// 0, or 2 with the reason.
    Check {
        /// The config file to validate.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Do not read the key files (check a config on a machine that does not hold its
        /// keys, e.g. in CI): their paths must still be given.
        #[arg(long)]
        no_key_files: bool,
        /// Do not resolve target names (check a config away from the network it runs in).
        #[arg(long)]
        no_resolve: bool,
    },
    /// Write a new random 256-bit key (hex, mode 0600); refuses to overwrite.
    Keygen {
        /// Where to write the key. A missing parent directory is created with mode 0700.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Start an echo backend, a decrypt and an encrypt tunnel and a metrics endpoint on
    /// loopback, drive a traffic check through the pair, then serve until Ctrl-C.
    Demo {
        /// Exit after this many seconds instead of waiting for Ctrl-C.
        #[arg(long, value_name = "SECS")]
        duration: Option<f64>,
    },
    /// Print a shell completion script: `sealpipe completions bash >
    /// /usr/share/bash-completion/completions/sealpipe` (zsh: a `_sealpipe` file on $fpath;
    /// fish: ~/.config/fish/completions/sealpipe.fish).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) for `man -l -`, or write one page per subcommand into
    /// --dir (sealpipe.1, sealpipe-run.1, ...).
    Man {
        /// Write sealpipe.1 and a page per subcommand here instead of printing sealpipe.1.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
struct TunnelArgs {
    /// Address to accept connections on, e.g. 127.0.0.1:7000 or [::1]:7000, or a Unix domain
    /// socket, unix:/run/app/app.sock (a stale socket file there is replaced; a live one is
    /// an error).
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// With a unix: --listen: the socket file's permission bits, in octal (e.g. 0660).
    #[arg(long, value_name = "MODE")]
    listen_mode: Option<String>,
    /// With a unix: --listen: the socket file's owner (a user name or uid).
    #[arg(long, value_name = "USER")]
    listen_owner: Option<String>,
    /// With a unix: --listen: the socket file's group (a group name or gid).
    #[arg(long, value_name = "GROUP")]
    listen_group: Option<String>,
    /// Where to connect: HOST:PORT, or unix:/PATH (a Unix domain socket), or several,
    /// comma-separated. A host name stands for every address it resolves to (tried in the
    /// resolver's order), resolved again every --resolve-interval.
    #[arg(
        long,
        value_name = "HOST:PORT[,HOST:PORT...]",
        value_delimiter = ',',
        required = true
    )]
    target: Vec<String>,
    /// The tunnel's name: in logs and metric labels, and the name of a socket systemd passes
    /// (socket activation: LISTEN_FDNAMES), which is then served instead of binding --listen.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Seconds between active TCP health checks of each target; 0 = passive health only.
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    health_check_interval: f64,
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    identity: IdentityArgs,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// Fleet policy of the tunnel (the `[[tunnel]]` keys of the same names; docs/OPERATIONS.md,
/// "Connection lifetime").
#[derive(Args, Clone)]
struct PolicyArgs {
    /// End each connection once it is this old (seconds, moved by up to ±10% per connection
    /// so a fleet does not reconnect at once), at its first quiet moment: the backend reads an
    /// end of stream, closes, and the client then reads one too. 0 = no limit.
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    max_lifetime: f64,
    /// With --max-lifetime: how long a connection may wait for a quiet moment (and its peers
    /// then have to close) before it is reset instead. Default 60.
    #[arg(long, value_name = "SECS")]
    max_lifetime_grace: Option<f64>,
    /// New connections per second, whole tunnel; more are refused at accept (counted as
    /// rejected, reason rate). 0 = no limit.
    #[arg(long, value_name = "RATE", default_value_t = 0.0)]
    conn_rate: f64,
    /// With --conn-rate: how many new connections may arrive at once. Default: one second's
    /// worth.
    #[arg(long, value_name = "N")]
    conn_rate_burst: Option<f64>,
    /// Bytes per second from the clients towards the backend, whole tunnel: a number of bytes,
    /// or with a unit (100Mbit, 12.5MB, 64KiB). Connections over it are slowed (reading
    /// pauses), never dropped. 0 = no limit.
    #[arg(long, value_name = "RATE")]
    upstream_rate: Option<String>,
    /// Bytes per second from the backend towards the clients; as --upstream-rate.
    #[arg(long, value_name = "RATE")]
    downstream_rate: Option<String>,
    /// Bytes each direction may carry at once beyond its rate. Default: one second of the
    /// rate.
    #[arg(long, value_name = "BYTES")]
    rate_burst: Option<String>,
}

/// Client identity and access (the `[[tunnel]]` keys accept_proxy, trusted_proxies,
/// send_proxy, access_log, allow, deny; docs/OPERATIONS.md, "Client identity").
#[derive(Args, Clone)]
struct IdentityArgs {
    /// Encrypt side: every connection comes from a load balancer (one of --trusted-proxy) and
    /// starts with a PROXY protocol header (v1 or v2); the client it names is sent on to the
    /// decrypt side. Others are refused, as are connections without a valid header.
    #[arg(long)]
    accept_proxy: bool,
    /// With --accept-proxy: an address or CIDR range allowed to send PROXY headers, e.g.
    /// 10.0.0.0/8 (repeatable).
    #[arg(long, value_name = "CIDR")]
    trusted_proxy: Vec<String>,
    /// Decrypt side: send the backend a PROXY protocol header naming the client before its
    /// bytes: v1 (text) or v2 (binary). The backend must expect it (HAProxy accept-proxy,
    /// nginx proxy_protocol, Redis/pgbouncer behind one of those).
    #[arg(long, value_name = "v1|v2")]
    send_proxy: Option<String>,
    /// Write one JSON line per connection (client, target, bytes, duration, close reason, key
    /// id) to this file, or to stderr. Off by default.
    #[arg(long, value_name = "PATH|stderr")]
    access_log: Option<String>,
    /// Only sources in this address or CIDR range may connect (repeatable; default: any).
    #[arg(long, value_name = "CIDR")]
    allow: Vec<String>,
    /// Sources in this address or CIDR range may not connect (repeatable; checked first).
    #[arg(long, value_name = "CIDR")]
    deny: Vec<String>,
}

/// The tunnel and what only a sealed side (encrypt, decrypt) takes.
#[derive(Args, Clone)]
struct SealedArgs {
    #[command(flatten)]
    tunnel: TunnelArgs,
    /// Key file (repeatable; at least one). The first is the primary, the others are also
    /// accepted (key rotation). `sealpipe keygen --out FILE` makes one.
    #[arg(long, value_name = "FILE", required = true)]
    key: Vec<PathBuf>,
    /// Forward secrecy (an ephemeral X25519 exchange per connection): require (default:
    /// offer it, and as a decrypt side refuse peers without it), allow (offer it, and as a
    /// decrypt side also accept peers without it, with a warning), off (do not offer it: cheaper
    /// setup, and a later leak of the key exposes recorded traffic).
    #[arg(long, value_name = "POLICY", conflicts_with = "no_forward_secrecy")]
    forward_secrecy: Option<ForwardSecrecy>,
    /// Same as --forward-secrecy off (kept for existing scripts).
    #[arg(long)]
    no_forward_secrecy: bool,
    /// AEAD implementation: ring (fast) or rustcrypto (pure Rust).
    #[arg(long, value_name = "IMPL", default_value = "ring")]
    aead: String,
    /// Encrypt side: most warm sessions (connected and handshaken ahead of clients, so a new
    /// client's first bytes leave at once: one round trip across a WAN instead of three) per
    /// shard and target; fewer while new connections are rare, none for an idle tunnel.
    /// 0 = off. [default: 4]
    #[arg(long, value_name = "N")]
    warm_max: Option<usize>,
    /// Encrypt side: replace an unused warm session after this many seconds; keep it well
    /// below the decrypt side's --warm-idle-timeout and any idle limit of a NAT or load
    /// balancer in between. [default: 25]
    #[arg(long, value_name = "SECS")]
    warm_refresh: Option<f64>,
    /// Decrypt side: close a session still waiting for its OPEN (a warm session) after this
    /// many seconds (> 0). [default: 60]
    #[arg(long, value_name = "SECS")]
    warm_idle_timeout: Option<f64>,
}

#[derive(Args, Clone)]
struct HandoffArgs {
    /// Zero-downtime upgrades: take the listening sockets of the sealpipe listening on this
    /// Unix socket (if any), then listen on it to hand them to the next one.
    #[arg(long, value_name = "PATH")]
    handoff: Option<PathBuf>,
}

/// `run`'s logging flags: they override the file's `[log]` (across reloads too).
#[derive(Args, Clone)]
struct LogArgs {
    /// Overrides the file's [log] level: error, warn, info, debug, trace or off; or a
    /// comma-separated list of LEVEL and TARGET=LEVEL.
    #[arg(long, value_name = "LEVEL", env = "SEALPIPE_LOG")]
    log_level: Option<String>,
    /// Overrides the file's [log] format: text or json.
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
}

#[derive(Args, Clone)]
struct CommonArgs {
    #[command(flatten)]
    handoff: HandoffArgs,
    /// Shards (one event loop thread each); default: the CPUs this process may use.
    #[arg(long, value_name = "N", default_value_t = 0)]
    threads: usize,
    /// Pin each shard thread to one CPU of the affinity mask. For a dedicated proxy host
    /// whose NIC queues are spread over those CPUs; on a shared host (a sidecar) leave the
    /// shards to the scheduler, the default. See docs/OPERATIONS.md, "Shards and CPUs".
    #[arg(long, overrides_with = "no_pin")]
    pin: bool,
    /// Do not pin shard threads (the default).
    #[arg(long, overrides_with = "pin")]
    no_pin: bool,
    /// SO_INCOMING_CPU: hand each connection to the shard pinned on the CPU that received its
    /// packets, instead of spreading connections by SO_REUSEPORT's hash (the default).
    /// Needs --pin, and receive queues spread over the shards' CPUs.
    #[arg(long, overrides_with = "no_incoming_cpu", requires = "pin")]
    incoming_cpu: bool,
    /// Spread connections over shards by SO_REUSEPORT's hash (the default).
    #[arg(long, overrides_with = "incoming_cpu")]
    no_incoming_cpu: bool,
    /// Serve /metrics, /healthz and /readyz on this address.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Most connections open at once, per process (exact: split into per-shard shares that
    /// add up to it; never more shards than this).
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    max_conns: usize,
    /// Give up on an upstream connect after this long and try the next target (> 0).
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    connect_timeout: f64,
    /// Close a connection whose tunnel handshake has not completed after this long (> 0).
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    handshake_timeout: f64,
    /// Decrypt side: most connections still in their handshake (per process, split across
    /// shards); more are closed at once. Peers that have proved nothing cannot take more.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    max_handshakes: usize,
    /// Decrypt side: most connections in their handshake from one source address (an IPv6
    /// source counts by its /64), per shard.
    #[arg(long, value_name = "N", default_value_t = 2048)]
    max_handshakes_per_source: usize,
    /// Decrypt side: new connections per second from one source address, per shard (token
    /// bucket; 0 = no limit). An encrypt side fronting many clients is one source: size it so.
    #[arg(long, value_name = "RATE", default_value_t = 2000.0)]
    new_conns_per_source: f64,
    /// Decrypt side: how many new connections one source may open at once before the rate
    /// applies.
    #[arg(long, value_name = "N", default_value_t = 4000)]
    new_conns_per_source_burst: usize,
    /// Decrypt side: most warm sessions (handshaken, waiting for their OPEN) one source
    /// address may hold, per shard; more are closed at once, and their encrypt side replaces
    /// them.
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_unopened_per_source: usize,
    /// Close a connection with no traffic for this long; 0 = never.
    #[arg(long, value_name = "SECS", default_value_t = 300.0)]
    idle_timeout: f64,
    /// Close a half-closed connection with no traffic for this long; 0 = no separate limit
    /// (the idle timeout applies).
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    half_closed_timeout: f64,
    /// On SIGTERM, how long open connections may take to finish; 0 = cut them at once.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    drain_timeout: f64,
    /// TCP keepalive on both sockets of every connection: whole seconds of quiet before the
    /// first probe; 0 = no keepalive. A peer that vanished (no FIN, no reset) is dropped
    /// after idle + interval x count seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    keepalive_idle: f64,
    /// Whole seconds between unanswered keepalive probes.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    keepalive_interval: f64,
    /// Unanswered keepalive probes before the connection is dropped (1-127).
    #[arg(long, value_name = "N", default_value_t = 6)]
    keepalive_count: u32,
    /// TCP_USER_TIMEOUT: drop a connection whose sent data stays unacknowledged this long
    /// (a peer that vanished mid-transfer); 0 = the kernel's retransmission limit (~15 min).
    /// Default: keepalive's bound, idle + interval x count.
    #[arg(long, value_name = "SECS")]
    tcp_user_timeout: Option<f64>,
    /// Resolve target names again this often (seconds); 0 = at start and on SIGHUP only.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    resolve_interval: f64,
    /// round-robin or least-conn.
    #[arg(long, value_name = "POLICY", default_value = "round-robin")]
    balance: Balance,
    /// error, warn, info, debug, trace or off; or a comma-separated list of LEVEL and
    /// TARGET=LEVEL (e.g. `sealpipe::proxy=debug,warn`). Anything else is an error.
    #[arg(
        long,
        value_name = "LEVEL",
        default_value = "info",
        env = "SEALPIPE_LOG"
    )]
    log_level: String,
    /// text or json.
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    log_format: String,
}

/// A usage or configuration error: exit status 2.
struct UsageError(anyhow::Error);

/// Log lines queued for stderr at most; beyond that they are dropped and counted, so that a
/// stalled stderr (a stuck journald, a full pipe) never blocks a shard that logs.
const LOG_QUEUE_LINES: usize = 4096;

fn setup_logging(log: &LogConfig) -> Result<LogControl> {
    let filter = EnvFilter::try_new(&log.level)
        .map_err(|e| anyhow!("invalid log level {:?}: {e}", log.level))?;
    let (filter, handle) = reload::Layer::new(filter);
    use tracing_subscriber::prelude::*;
    let registry = tracing_subscriber::registry().with(filter);
    // Colour only for a person at a terminal: journald, files and log shippers get plain text.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("sealpipe-log")
        .finish(std::io::stderr());
    let errors = writer.error_counter();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(colour);
    if log.format == "json" {
        registry.with(fmt.json()).try_init().ok();
    } else {
        registry.with(fmt).try_init().ok();
    }
    // Dropping the guard writes out what is queued (waiting a bounded time).
    let guard = std::sync::Mutex::new(Some(guard));
    Ok(LogControl {
        reload: Box::new(move |level: &str| {
            let f = EnvFilter::try_new(level)
                .map_err(|e| format!("invalid log level {level:?}: {e}"))?;
            handle.reload(f).map_err(|e| e.to_string())
        }),
        dropped: Box::new(move || errors.dropped_lines() as u64),
        flush: std::sync::Arc::new(move || {
            drop(guard.lock().unwrap_or_else(|e| e.into_inner()).take());
        }),
    })
}

/// The sealed side's settings, or none for forward.
struct Crypto {
    keys: Vec<PathBuf>,
    forward_secrecy: ForwardSecrecy,
    aead: String,
    warm_max: Option<usize>,
    warm_refresh: Option<f64>,
    warm_idle_timeout: Option<f64>,
}

impl From<SealedArgs> for (TunnelArgs, Crypto) {
    fn from(a: SealedArgs) -> Self {
        let forward_secrecy = match (a.forward_secrecy, a.no_forward_secrecy) {
            (_, true) => ForwardSecrecy::Off,
            (Some(p), false) => p,
            (None, false) => ForwardSecrecy::default(),
        };
        (
            a.tunnel,
            Crypto {
                keys: a.key,
                forward_secrecy,
                aead: a.aead,
                warm_max: a.warm_max,
                warm_refresh: a.warm_refresh,
                warm_idle_timeout: a.warm_idle_timeout,
            },
        )
    }
}

fn tunnel_config(
    mode: Mode,
    a: TunnelArgs,
    crypto: Option<Crypto>,
) -> std::result::Result<Config, UsageError> {
    let c = &a.common;
    let (keys, fs, aead, warm) = match crypto {
        Some(k) => (
            k.keys,
            Some(FsSetting::Policy(k.forward_secrecy.as_str().to_owned())),
            Some(k.aead),
            (k.warm_max, k.warm_refresh, k.warm_idle_timeout),
        ),
        None => (Vec::new(), None, None, (None, None, None)),
    };
    let file = ConfigFile {
        log: LogConfig {
            level: c.log_level.clone(),
            format: c.log_format.clone(),
        },
        metrics: MetricsConfig {
            listen: c.metrics.clone(),
        },
        limits: Limits {
            threads: c.threads,
            pin: c.pin && !c.no_pin,
            incoming_cpu: c.incoming_cpu && !c.no_incoming_cpu,
            max_conns: c.max_conns,
            connect_timeout: c.connect_timeout,
            handshake_timeout: c.handshake_timeout,
            idle_timeout: c.idle_timeout,
            half_closed_timeout: c.half_closed_timeout,
            drain_timeout: c.drain_timeout,
            max_handshakes: c.max_handshakes,
            max_handshakes_per_source: c.max_handshakes_per_source,
            new_conns_per_source: c.new_conns_per_source,
            new_conns_per_source_burst: c.new_conns_per_source_burst,
            max_unopened_per_source: c.max_unopened_per_source,
            keepalive_idle: c.keepalive_idle,
            keepalive_interval: c.keepalive_interval,
            keepalive_count: c.keepalive_count,
            tcp_user_timeout: c.tcp_user_timeout,
            resolve_interval: c.resolve_interval,
        },
        tunnel: vec![TunnelFile {
            name: Some(a.name.clone().unwrap_or_else(|| mode.as_str().into())),
            balance: c.balance,
            forward_secrecy: fs,
            aead,
            health_check_interval: a.health_check_interval,
            accept_proxy: a.identity.accept_proxy,
            trusted_proxies: a.identity.trusted_proxy.clone(),
            send_proxy: a.identity.send_proxy.clone(),
            access_log: a.identity.access_log.clone(),
            allow: a.identity.allow.clone(),
            deny: a.identity.deny.clone(),
            warm_max: warm.0,
            warm_refresh: warm.1,
            warm_idle_timeout: warm.2,
            listen_mode: a.listen_mode.as_deref().map(Into::into),
            listen_owner: a.listen_owner.clone(),
            listen_group: a.listen_group.clone(),
            max_lifetime: Some(a.policy.max_lifetime),
            max_lifetime_grace: a.policy.max_lifetime_grace,
            conn_rate: Some(a.policy.conn_rate),
            conn_rate_burst: a.policy.conn_rate_burst,
            upstream_rate: a.policy.upstream_rate.as_deref().map(Into::into),
            downstream_rate: a.policy.downstream_rate.as_deref().map(Into::into),
            rate_burst: a.policy.rate_burst.as_deref().map(Into::into),
            ..TunnelFile::new(mode, a.listen.clone(), a.target.clone(), keys)
        }],
    };
    let mut cfg = file.validate_cli().map_err(|e| UsageError(e.into()))?;
    cfg.resolve_targets(None, &SystemResolver)
        .map_err(|e| UsageError(e.into()))?;
    cfg.load_keys().map_err(|e| UsageError(e.into()))?;
    Ok(cfg)
}

/// The exit status for why the server stopped (docs/OPERATIONS.md, "Exit statuses").
fn exit_status(reason: ExitReason) -> u8 {
    match reason {
        ExitReason::Drained => 0,
        ExitReason::SecondSignal => 1,
        // EX_SOFTWARE: an internal error; the service manager restarts the process.
        ExitReason::ShardFailed | ExitReason::ShardPanicked => 70,
    }
}

fn serve(cfg: Config, handoff: Option<PathBuf>) -> Result<u8> {
    let log = setup_logging(&cfg.log)?;
    // Before the shards accept: a SIGTERM from then on drains instead of killing.
    let signals = server::ControlSignals::install()?;
    let running = server::start_with(cfg, Some(log), handoff.as_deref())?;
    if let Some(m) = running.metrics_addr {
        tracing::info!(metrics = %format!("http://{m}/metrics"), "metrics endpoint up");
    }
    Ok(exit_status(running.wait_with(signals, None)?))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !cli.dumpable {
        // Before any key is read. Failing to protect is worth a line, not a refusal to run.
        if let Err(e) = sealpipe::sys::protect_process() {
            eprintln!("sealpipe: warning: cannot make the process non-dumpable: {e}");
        }
    }
    let result: std::result::Result<u8, UsageError> = (|| match cli.cmd {
        Cmd::Encrypt(a) => {
            let (a, crypto) = a.into();
            let h = a.common.handoff.handoff.clone();
            serve(tunnel_config(Mode::Encrypt, a, Some(crypto))?, h).map_err(runtime)
        }
        Cmd::Decrypt(a) => {
            let (a, crypto) = a.into();
            let h = a.common.handoff.handoff.clone();
            serve(tunnel_config(Mode::Decrypt, a, Some(crypto))?, h).map_err(runtime)
        }
        Cmd::Forward(a) => {
            let h = a.common.handoff.handoff.clone();
            serve(tunnel_config(Mode::Forward, a, None)?, h).map_err(runtime)
        }
        Cmd::Run {
            config,
            log,
            handoff,
        } => {
            let overrides = CliOverrides {
                log_level: log.log_level,
                log_format: log.log_format,
            };
            let cfg =
                Config::from_file_with(&config, overrides).map_err(|e| UsageError(e.into()))?;
            serve(cfg, handoff.handoff).map_err(runtime)
        }
        Cmd::Check {
            config,
            no_key_files,
            no_resolve,
        } => {
            let mut cfg = Config::read(&config).map_err(|e| UsageError(e.into()))?;
            if !no_resolve {
                cfg.resolve_targets(None, &SystemResolver)
                    .map_err(|e| UsageError(e.into()))?;
            }
            if !no_key_files {
                cfg.load_keys().map_err(|e| {
                    UsageError(anyhow!(
                        "{e} (to check a config on a machine without its key files: sealpipe check --no-key-files)"
                    ))
                })?;
            }
            let skipped: Vec<&str> = [
                (no_key_files, "key files not read"),
                (no_resolve, "target names not resolved"),
            ]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, what)| *what)
            .collect();
            println!(
                "{}: ok ({} tunnel{}: {}){}",
                config.display(),
                cfg.tunnels.len(),
                if cfg.tunnels.len() == 1 { "" } else { "s" },
                cfg.tunnels
                    .iter()
                    .map(|t| format!(
                        "{} {} {} -> {}",
                        t.name,
                        t.mode.as_str(),
                        t.listen,
                        t.targets
                            .iter()
                            .map(|t| t.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                    .collect::<Vec<_>>()
                    .join("; "),
                if skipped.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", skipped.join(", "))
                }
            );
            Ok(0)
        }
        Cmd::Keygen { out } => {
            let dir = out.parent().filter(|d| !d.as_os_str().is_empty());
            let made = dir.filter(|d| !d.exists());
            let id = sealpipe::keyfile::generate_key_file(&out, &mut sealpipe::protocol::OsRandom)
                .map_err(|e| UsageError(e.into()))?;
            if let Some(d) = made {
                println!(
                    "created {} (mode 0700: only its owner can read the keys in it; docs/OPERATIONS.md, \"Rotate keys\", shows how to let the service's group in)",
                    d.display()
                );
            }
            println!("wrote {} (key id {id})", out.display());
            Ok(0)
        }
        Cmd::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "sealpipe", &mut std::io::stdout());
            Ok(0)
        }
        Cmd::Man { dir } => {
            let cmd = Cli::command();
            match dir {
                Some(d) => {
                    std::fs::create_dir_all(&d)
                        .and_then(|()| clap_mangen::generate_to(cmd, &d))
                        .with_context(|| format!("writing manual pages into {}", d.display()))
                        .map_err(runtime)?;
                }
                None => clap_mangen::Man::new(cmd)
                    .render(&mut std::io::stdout())
                    .context("writing the manual page")
                    .map_err(runtime)?,
            }
            Ok(0)
        }
        Cmd::Demo { duration } => setup_logging(&LogConfig {
            level: "warn".into(),
            format: "text".into(),
        })
        .and_then(|log| {
            sealpipe::demo::run(duration.map(Duration::from_secs_f64), log)
                .map(exit_status)
                .map_err(Into::into)
        })
        .map_err(runtime),
    })();
    match result {
        Ok(status) => ExitCode::from(status),
        Err(UsageError(e)) => {
            let code = if e.downcast_ref::<Runtime>().is_some() {
                1
            } else {
                2
            };
            // The chain, without repeating a cause the message above it already quotes.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            eprintln!("sealpipe: error: {msg}");
            ExitCode::from(code)
        }
    }
}

/// Marks an error as a runtime failure (exit 1) rather than a usage error (exit 2).
#[derive(Debug)]
struct Runtime(anyhow::Error);

impl std::fmt::Display for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}
impl std::error::Error for Runtime {}

fn runtime(e: anyhow::Error) -> UsageError {
    // Startup failures caused by the configuration (a busy port, a bad key) are still usage
    // errors; everything else is a runtime failure.
    if e.downcast_ref::<server::ServerError>().is_some() {
        return UsageError(e);
    }
    UsageError(anyhow::Error::new(Runtime(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statuses README.md documents: 0 after a drain, 1 for a second stop signal, 70 when
    /// a shard fails.
    #[test]
    fn exit_reasons_map_to_the_documented_statuses() {
        assert_eq!(exit_status(ExitReason::Drained), 0);
        assert_eq!(exit_status(ExitReason::SecondSignal), 1);
        assert_eq!(exit_status(ExitReason::ShardFailed), 70);
        assert_eq!(exit_status(ExitReason::ShardPanicked), 70);
    }
}
