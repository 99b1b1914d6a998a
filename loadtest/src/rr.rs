//! `rr`: request/response latency and rate over persistent connections.
//!
//! Each connection has one request in flight: `--size` bytes of its pattern stream, which the
//! echo backend returns and the client compares. Closed loop (default): the next request leaves
//! when the previous answer is in, so the rate is the system's capacity. Open loop (`--rate R`,
//! total over all connections): requests are due on a fixed schedule, and latency is measured
//! from when a request was *due*, not when it could be sent. That is the coordinated-omission
//! correction (as in wrk2): a stall delays every queued request and each one shows it.
//!
//! Buffers are allocated once per connection; the hot path allocates nothing. mio's poll timeout
//! has millisecond resolution, so when the next request is due in under a millisecond the loop
//! polls without blocking rather than oversleep and charge its own lateness to the target.

use crate::backend::{read_some, write_some};
use crate::net::{self, classify, interrupted, token, untoken};
use crate::pattern::Pattern;
use crate::report::{
    Common, Failures, Live, Measure, Report, Show, per_second, run_workers, slice,
};
use crate::stats::{LatencySummary, fmt_rate, new_histogram, record};
use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll};
use serde::Serialize;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// `loadtest rr` flags.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct RrArgs {
    /// Address of an echo service (a sealpipe listener in front of one, or the backend).
    #[arg(long)]
    pub target: String,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub conns: u64,
    /// Request (and response) size in bytes.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=16 << 20))]
    pub size: u64,
    /// Requests per second over all connections (open loop); default: closed loop, flat out.
    #[arg(long)]
    pub rate: Option<f64>,
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RrResults {
    pub requests: u64,
    pub seconds: f64,
    pub requests_per_s: f64,
    /// Open loop: requests that were due in the window (sent or not).
    pub scheduled: u64,
    pub latency: LatencySummary,
    pub mismatches: u64,
}

const GRACE: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub fn run(args: &RrArgs, pattern: &Pattern) -> Result<Report<RrArgs, RrResults>> {
    if let Some(r) = args.rate
        && !(r > 0.0 && r.is_finite())
    {
        bail!("--rate must be a positive number");
    }
    let addr = net::resolve(&args.target)?;
    let measure = Measure::start(&args.common.metrics);
    let live = Live::default();
    let threads = args.common.threads.min(args.conns);
    let start = Instant::now();
    let outs = run_workers(
        "rr",
        threads as usize,
        Duration::from_secs_f64(args.duration),
        args.common.quiet,
        &live,
        Show::Ops("req/s"),
        |i| {
            let (first, n) = slice(args.conns, threads, i as u64);
            worker(args, addr, pattern, &live, start, first, n)
        },
    );
    let mut hist = new_histogram();
    let mut r = RrResults::default();
    let mut failures = Failures::default();
    for o in outs {
        // Same bounds on both sides, so adding cannot fail.
        let _ = hist.add(&o.hist);
        r.requests += o.requests;
        r.scheduled += o.scheduled;
        r.seconds = r.seconds.max(o.seconds);
        failures.merge(o.failures);
    }
    r.latency = LatencySummary::from_histogram(&hist);
    r.requests_per_s = per_second(r.requests, r.seconds);
    r.mismatches = failures.count("mismatch");
    Ok(measure.finish("rr", args.clone(), r, failures))
}

pub fn rows(rep: &Report<RrArgs, RrResults>) -> Vec<(String, String)> {
    let (a, r) = (&rep.params, &rep.results);
    let mode = match a.rate {
        Some(rate) => format!("open loop at {} req/s", fmt_rate(rate)),
        None => "closed loop".into(),
    };
    vec![
        (
            "target".into(),
            format!(
                "{} ({} conns, {} B, {mode}, {} threads)",
                a.target, a.conns, a.size, a.common.threads
            ),
        ),
        (
            "requests".into(),
            format!(
                "{} in {:.2}s = {} req/s",
                r.requests,
                r.seconds,
                fmt_rate(r.requests_per_s)
            ),
        ),
        ("latency p50/p90/p99/p99.9/max".into(), r.latency.short()),
        ("mismatches".into(), r.mismatches.to_string()),
    ]
}

struct Out {
    hist: Histogram<u64>,
    requests: u64,
    scheduled: u64,
    seconds: f64,
    failures: Failures,
}

struct Conn {
    sock: TcpStream,
    key: u64,
    req: Vec<u8>,
    resp: Vec<u8>,
    wrote: usize,
    got: usize,
    /// Request number (its stream offset is `n * size`).
    n: u64,
    in_flight: bool,
    /// Latency origin of the request in flight: when it was due (open loop) or sent.
    origin: Instant,
    /// Open loop: when the next request is due.
    due: Instant,
    done: bool,
}

fn worker(
    args: &RrArgs,
    addr: SocketAddr,
    pattern: &Pattern,
    live: &Live,
    start: Instant,
    first: u64,
    n: u64,
) -> Out {
    let mut out = Out {
        hist: new_histogram(),
        requests: 0,
        scheduled: 0,
        seconds: 0.0,
        failures: Failures::default(),
    };
    let mut poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => {
            out.failures.add("other", format!("poll: {e}"));
            return out;
        }
    };
    let size = args.size as usize;
    // Per-connection interval; connections are phased evenly across it.
    let interval = args
        .rate
        .map(|r| Duration::from_secs_f64(args.conns as f64 / r));
    let mut conns = Vec::new();
    for key in first..first + n {
        match net::connect(addr, CONNECT_TIMEOUT) {
            Ok(mut sock) => {
                if let Err(e) = poll.registry().register(
                    &mut sock,
                    token(conns.len(), 0),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    out.failures.add("other", format!("register: {e}"));
                    continue;
                }
                let phase = interval.map_or(Duration::ZERO, |iv| {
                    iv.mul_f64(key as f64 / args.conns as f64)
                });
                conns.push(Conn {
                    sock,
                    key,
                    req: vec![0; size],
                    resp: vec![0; size],
                    wrote: 0,
                    got: 0,
                    n: 0,
                    in_flight: false,
                    origin: start,
                    due: start + phase,
                    done: false,
                });
            }
            Err(e) => {
                live.add_error();
                out.failures
                    .add(classify(&e), format!("connect {addr}: {e}"));
            }
        }
    }
    // Connecting is not part of the measured window; the schedule starts now.
    let start = Instant::now().max(start);
    for c in &mut conns {
        c.due = start + (c.due - c.origin.min(c.due));
    }
    let stop_at = start + Duration::from_secs_f64(args.duration);
    let give_up = stop_at + GRACE;
    let mut events = Events::with_capacity(1024);
    let mut ready: VecDeque<usize> = VecDeque::new();
    let mut remaining = conns.len();
    // Closed loop: everyone starts at once.
    if interval.is_none() {
        for (i, c) in conns.iter_mut().enumerate() {
            begin(c, pattern, start);
            ready.push_back(i);
        }
    }
    let mut last_done = start;
    while remaining > 0 {
        let now = Instant::now();
        if now >= give_up {
            for c in conns.iter().filter(|c| !c.done) {
                out.failures.add(
                    "timeout",
                    format!("conn {}: no answer {GRACE:?} after the end", c.key),
                );
            }
            break;
        }
        // Open loop: start whatever is due, close whoever is idle past the window.
        let mut next_due: Option<Instant> = None;
        for (i, c) in conns.iter_mut().enumerate() {
            if c.done || c.in_flight {
                continue;
            }
            if c.due >= stop_at || now >= stop_at {
                c.done = true;
                remaining -= 1;
                let _ = poll.registry().deregister(&mut c.sock);
                continue;
            }
            if c.due <= now {
                out.scheduled += 1;
                let due = c.due;
                begin(c, pattern, due);
                if let Some(iv) = interval {
                    c.due += iv;
                }
                ready.push_back(i);
            } else {
                next_due = Some(next_due.map_or(c.due, |d: Instant| d.min(c.due)));
            }
        }
        if remaining == 0 {
            break;
        }
        let mut timeout = give_up - now;
        if let Some(d) = next_due {
            let wait = d.saturating_duration_since(now);
            timeout = if wait < Duration::from_millis(1) {
                Duration::ZERO
            } else {
                wait.min(timeout)
            };
        }
        if !ready.is_empty() {
            timeout = Duration::ZERO;
        }
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if interrupted(&e) {
                continue;
            }
            out.failures.add("other", format!("poll: {e}"));
            break;
        }
        for ev in events.iter() {
            ready.push_back(untoken(ev.token()).0);
        }
        while let Some(i) = ready.pop_front() {
            let Some(c) = conns.get_mut(i) else { continue };
            if c.done || !c.in_flight {
                continue;
            }
            match drive(c) {
                Ok(false) => {}
                Ok(true) => {
                    let now = Instant::now();
                    record(&mut out.hist, now - c.origin);
                    out.requests += 1;
                    live.add_ops(1);
                    last_done = now;
                    c.in_flight = false;
                    c.n += 1;
                    // Closed loop sends the next one now; past the window, or in open loop,
                    // the scan at the top of the loop decides.
                    if interval.is_none() && now < stop_at {
                        out.scheduled += 1;
                        begin(c, pattern, now);
                        ready.push_back(i);
                    }
                }
                Err(f) => {
                    c.done = true;
                    remaining -= 1;
                    live.add_error();
                    out.failures
                        .add(f.0, format!("conn {} request {}: {}", c.key, c.n, f.1));
                    let _ = poll.registry().deregister(&mut c.sock);
                }
            }
        }
    }
    out.seconds = (last_done - start).as_secs_f64();
    out
}

/// Prepares request `c.n` (no allocation: the buffer is reused) and marks it in flight.
fn begin(c: &mut Conn, pattern: &Pattern, origin: Instant) {
    pattern
        .stream(c.key)
        .fill(c.n * c.req.len() as u64, &mut c.req);
    c.wrote = 0;
    c.got = 0;
    c.in_flight = true;
    c.origin = origin;
}

/// Moves the request and its answer as far as the socket allows; true when the answer is in.
fn drive(c: &mut Conn) -> Result<bool, (&'static str, String)> {
    let io = |e: std::io::Error| (classify(&e), e.to_string());
    if c.wrote < c.req.len() {
        c.wrote += write_some(&mut c.sock, &c.req[c.wrote..]).map_err(io)?;
    }
    while c.got < c.resp.len() {
        match read_some(&mut c.sock, &mut c.resp[c.got..]).map_err(io)? {
            None => return Ok(false),
            Some(0) => {
                return Err((
                    "reset",
                    format!("EOF after {} of {} bytes", c.got, c.resp.len()),
                ));
            }
            Some(n) => c.got += n,
        }
    }
    if c.resp != c.req {
        let at = c
            .resp
            .iter()
            .zip(&c.req)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return Err(("mismatch", format!("answer differs at byte {at}")));
    }
    Ok(true)
}
