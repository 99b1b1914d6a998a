//! `connect`: what a new connection costs the user — the time from `connect()` to the first byte
//! of the answer — one connection at a time (`--concurrency 1`) or several at once.
//!
//! Closed loop: each of `--concurrency` workers opens a connection, writes `--size` pattern
//! bytes, times the first echoed byte, reads and verifies the rest, closes, and starts the next,
//! until `--count` connections are done or `--deadline` passes. This is the figure a WAN makes
//! visible (through a tunnel every round trip of its handshake is on this path); `--rtt-ms`
//! reports the percentiles in round trips of that link too. Blocking sockets with timeouts: one
//! connection per worker at a time, so there is nothing to multiplex and the clock reads are
//! taken right around the system calls.

use crate::pattern::Pattern;
use crate::report::{Common, Failures, Live, Measure, Report, Show, run_workers, slice};
use crate::stats::{LatencySummary, new_histogram, record};
use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// `loadtest connect` flags.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct ConnectArgs {
    /// Address of an echo service (direct, or a proxy in front of one).
    #[arg(long)]
    pub target: String,
    /// Connections to make in all.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub count: u64,
    /// Connections in progress at once (1 = strictly one after another).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub concurrency: u64,
    /// Bytes written on each connection and verified when echoed.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub size: u64,
    /// Seconds one connection may take from connect() to its verified echo.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
    /// Stop starting new connections after this many seconds, whatever `--count` says.
    #[arg(long, default_value_t = 60.0)]
    pub deadline: f64,
    /// The link's round-trip time in milliseconds, to report latencies in round trips as well.
    #[arg(long)]
    pub rtt_ms: Option<f64>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnectResults {
    pub attempted: u64,
    pub completed: u64,
    pub seconds: f64,
    /// connect() called -> connection established.
    pub connect: LatencySummary,
    /// connect() called -> first byte of the echo read.
    pub first_byte: LatencySummary,
    /// `first_byte` percentiles divided by `--rtt-ms`, when given.
    pub first_byte_rtts: Option<RttSummary>,
}

/// First-byte latency in round trips of the link.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RttSummary {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

pub fn run(args: &ConnectArgs, pattern: &Pattern) -> Result<Report<ConnectArgs, ConnectResults>> {
    let positive = |v: f64| v > 0.0 && v.is_finite();
    if !positive(args.timeout) || !positive(args.deadline) {
        bail!("--timeout and --deadline must be positive");
    }
    if args.rtt_ms.is_some_and(|r| !positive(r)) {
        bail!("--rtt-ms must be positive");
    }
    let addr = crate::net::resolve(&args.target)?;
    let measure = Measure::start(&args.common.metrics);
    let live = Live::default();
    let workers = args.concurrency.min(args.count);
    let start = Instant::now();
    let outs = run_workers(
        "connect",
        workers as usize,
        Duration::from_secs_f64(args.deadline.min(args.count as f64 * 0.01 + 1.0)),
        args.common.quiet,
        &live,
        Show::Ops("conn/s"),
        |i| {
            let (first, n) = slice(args.count, workers, i as u64);
            worker(args, addr, pattern, &live, start, first, n)
        },
    );
    let (mut connect, mut first) = (new_histogram(), new_histogram());
    let mut r = ConnectResults::default();
    let mut failures = Failures::default();
    for o in outs {
        let _ = connect.add(&o.connect);
        let _ = first.add(&o.first_byte);
        r.attempted += o.attempted;
        r.completed += o.completed;
        failures.merge(o.failures);
    }
    r.seconds = start.elapsed().as_secs_f64();
    r.connect = LatencySummary::from_histogram(&connect);
    r.first_byte = LatencySummary::from_histogram(&first);
    r.first_byte_rtts = args.rtt_ms.map(|rtt| {
        let us = rtt * 1000.0;
        RttSummary {
            p50: r.first_byte.p50_us / us,
            p90: r.first_byte.p90_us / us,
            p99: r.first_byte.p99_us / us,
        }
    });
    if r.completed < args.count && failures.total() == 0 {
        failures.add(
            "deadline",
            format!(
                "{} of {} connections done when --deadline {}s passed",
                r.completed, args.count, args.deadline
            ),
        );
    }
    Ok(measure.finish("connect", args.clone(), r, failures))
}

pub fn rows(rep: &Report<ConnectArgs, ConnectResults>) -> Vec<(String, String)> {
    let (a, r) = (&rep.params, &rep.results);
    let mut rows = vec![
        (
            "target".into(),
            format!(
                "{} ({} connections, {} at a time, {} B each)",
                a.target, a.count, a.concurrency, a.size
            ),
        ),
        (
            "connections".into(),
            format!("{}/{} in {:.2}s", r.completed, r.attempted, r.seconds),
        ),
        ("connect p50/p90/p99/p99.9/max".into(), r.connect.short()),
        (
            "first byte p50/p90/p99/p99.9/max".into(),
            r.first_byte.short(),
        ),
    ];
    if let (Some(rtt), Some(x)) = (a.rtt_ms, r.first_byte_rtts) {
        rows.push((
            format!("first byte in RTTs of {rtt} ms"),
            format!("p50 {:.2} / p90 {:.2} / p99 {:.2}", x.p50, x.p90, x.p99),
        ));
    }
    rows
}

struct Out {
    connect: Histogram<u64>,
    first_byte: Histogram<u64>,
    attempted: u64,
    completed: u64,
    failures: Failures,
}

/// Runs connections `first..first + n` one after another.
fn worker(
    args: &ConnectArgs,
    addr: SocketAddr,
    pattern: &Pattern,
    live: &Live,
    start: Instant,
    first: u64,
    n: u64,
) -> Out {
    let mut out = Out {
        connect: new_histogram(),
        first_byte: new_histogram(),
        attempted: 0,
        completed: 0,
        failures: Failures::default(),
    };
    let deadline = start + Duration::from_secs_f64(args.deadline);
    let timeout = Duration::from_secs_f64(args.timeout);
    let mut sent = vec![0u8; args.size as usize];
    let mut got = vec![0u8; args.size as usize];
    for key in first..first + n {
        if Instant::now() >= deadline {
            break;
        }
        out.attempted += 1;
        pattern.stream(key).fill(0, &mut sent);
        match one(addr, timeout, &sent, &mut got) {
            Ok((connected, first_byte)) => {
                record(&mut out.connect, connected);
                record(&mut out.first_byte, first_byte);
                out.completed += 1;
                live.add_ops(1);
            }
            Err((kind, msg)) => {
                out.failures.add(kind, msg);
                live.add_error();
            }
        }
    }
    out
}

/// One connection: returns (time to established, time to the first echoed byte).
fn one(
    addr: SocketAddr,
    timeout: Duration,
    sent: &[u8],
    got: &mut [u8],
) -> Result<(Duration, Duration), (&'static str, String)> {
    let fail = |e: std::io::Error| {
        let kind = match e.kind() {
            ErrorKind::WouldBlock => "timeout",
            _ => crate::net::classify(&e),
        };
        (kind, e.to_string())
    };
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(fail)?;
    let connected = t0.elapsed();
    s.set_nodelay(true).map_err(fail)?;
    let left = timeout
        .saturating_sub(connected)
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(left)).map_err(fail)?;
    s.set_write_timeout(Some(left)).map_err(fail)?;
    s.write_all(sent).map_err(fail)?;
    let mut have = 0;
    let mut first_byte = None;
    while have < got.len() {
        match s.read(&mut got[have..]) {
            Ok(0) => return Err(("reset", format!("EOF after {have} of {} bytes", got.len()))),
            Ok(k) => {
                first_byte.get_or_insert_with(|| t0.elapsed());
                have += k;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(e)),
        }
    }
    if let Some(at) = got.iter().zip(sent).position(|(a, b)| a != b) {
        return Err(("mismatch", format!("echo differs at byte {at}")));
    }
    // `have == got.len() >= 1`, so the first read happened.
    Ok((connected, first_byte.unwrap_or_else(|| t0.elapsed())))
}
