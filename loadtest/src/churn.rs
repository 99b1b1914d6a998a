//! `churn`: new connections per second, each doing one small exchange and closing.
//!
//! Connections are opened on an open-loop schedule (`--rate` per second over all threads) with
//! non-blocking connects, at most `--max-inflight` at once per thread so an overloaded target
//! cannot make the client grow without bound. For each: connect latency (start to established),
//! first-byte latency (start to the first byte of the echo), the echo is verified, then the
//! client closes. Failures are counted by kind: refused, reset (including an early EOF),
//! timeout, mismatch, other.

use crate::backend::{read_some, write_some};
use crate::net::{self, classify, interrupted, token, untoken};
use crate::pattern::Pattern;
use crate::report::{
    Common, Failures, Live, Measure, Report, Show, per_second, run_workers, share,
};
use crate::stats::{LatencySummary, fmt_rate, new_histogram, record};
use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll};
use serde::Serialize;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// `loadtest churn` flags.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct ChurnArgs {
    /// Address of an echo service.
    #[arg(long)]
    pub target: String,
    /// New connections per second (all threads together).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Bytes exchanged per connection.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub size: u64,
    /// Seconds a connection may take from start to verified echo.
    #[arg(long, default_value_t = 2.0)]
    pub timeout: f64,
    /// Connections in progress at once per thread; the schedule waits beyond it.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_inflight: u64,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ChurnResults {
    pub attempted: u64,
    pub completed: u64,
    pub seconds: f64,
    pub conns_per_s: f64,
    pub connect: LatencySummary,
    pub first_byte: LatencySummary,
    pub refused: u64,
    pub reset: u64,
    pub timeout: u64,
    pub mismatch: u64,
}

pub fn run(args: &ChurnArgs, pattern: &Pattern) -> Result<Report<ChurnArgs, ChurnResults>> {
    let positive = |v: f64| v > 0.0 && v.is_finite();
    if !positive(args.rate) || !positive(args.timeout) {
        bail!("--rate and --timeout must be positive");
    }
    let addr = net::resolve(&args.target)?;
    let measure = Measure::start(&args.common.metrics);
    let live = Live::default();
    let threads = args.common.threads;
    let total = (args.rate * args.duration).round().max(1.0) as u64;
    let start = Instant::now();
    let outs = run_workers(
        "churn",
        threads as usize,
        Duration::from_secs_f64(args.duration),
        args.common.quiet,
        &live,
        Show::Ops("conn/s"),
        |i| {
            let n = share(total, threads, i as u64);
            worker(args, addr, pattern, &live, start, i as u64, n)
        },
    );
    let (mut connect, mut first) = (new_histogram(), new_histogram());
    let mut r = ChurnResults::default();
    let mut failures = Failures::default();
    for o in outs {
        let _ = connect.add(&o.connect);
        let _ = first.add(&o.first_byte);
        r.attempted += o.attempted;
        r.completed += o.completed;
        r.seconds = r.seconds.max(o.seconds);
        failures.merge(o.failures);
    }
    r.connect = LatencySummary::from_histogram(&connect);
    r.first_byte = LatencySummary::from_histogram(&first);
    r.conns_per_s = per_second(r.completed, r.seconds);
    r.refused = failures.count("refused");
    r.reset = failures.count("reset");
    r.timeout = failures.count("timeout");
    r.mismatch = failures.count("mismatch");
    Ok(measure.finish("churn", args.clone(), r, failures))
}

pub fn rows(rep: &Report<ChurnArgs, ChurnResults>) -> Vec<(String, String)> {
    let (a, r) = (&rep.params, &rep.results);
    vec![
        (
            "target".into(),
            format!(
                "{} (asked {} conn/s, {} B each, {} threads)",
                a.target,
                fmt_rate(a.rate),
                a.size,
                a.common.threads
            ),
        ),
        (
            "connections".into(),
            format!(
                "{}/{} in {:.2}s = {} conn/s",
                r.completed,
                r.attempted,
                r.seconds,
                fmt_rate(r.conns_per_s)
            ),
        ),
        ("connect p50/p90/p99/p99.9/max".into(), r.connect.short()),
        (
            "first byte p50/p90/p99/p99.9/max".into(),
            r.first_byte.short(),
        ),
        (
            "refused/reset/timeout/mismatch".into(),
            format!("{}/{}/{}/{}", r.refused, r.reset, r.timeout, r.mismatch),
        ),
    ]
}

struct Out {
    connect: Histogram<u64>,
    first_byte: Histogram<u64>,
    attempted: u64,
    completed: u64,
    seconds: f64,
    failures: Failures,
}

struct Conn {
    sock: TcpStream,
    key: u64,
    started: Instant,
    connected: bool,
    wrote: usize,
    got: usize,
    buf: [u8; 256],
}

enum Step {
    Wait,
    Done,
}

fn worker(
    args: &ChurnArgs,
    addr: SocketAddr,
    pattern: &Pattern,
    live: &Live,
    start: Instant,
    thread: u64,
    total: u64,
) -> Out {
    let mut out = Out {
        connect: new_histogram(),
        first_byte: new_histogram(),
        attempted: 0,
        completed: 0,
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
    let threads = args.common.threads;
    let interval = Duration::from_secs_f64(threads as f64 / args.rate);
    let timeout = Duration::from_secs_f64(args.timeout);
    let size = args.size as usize;
    let window_end = start + Duration::from_secs_f64(args.duration);
    let give_up = window_end + timeout + Duration::from_secs(1);
    let mut slots: Vec<Option<Conn>> = Vec::new();
    let mut generations: Vec<u32> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut inflight = 0u64;
    let mut launched = 0u64;
    let mut events = Events::with_capacity(1024);
    let mut last_sweep = start;
    let mut last_done = start;
    // Threads are phased across one interval so their connects interleave.
    let phase = interval.mul_f64(thread as f64 / threads as f64);
    loop {
        let now = Instant::now();
        if (launched == total || now >= window_end) && inflight == 0 {
            break;
        }
        if now >= give_up {
            for c in slots.iter().flatten() {
                out.failures
                    .add("timeout", format!("conn {} unfinished at the end", c.key));
            }
            break;
        }
        // Launch whatever is due, but nothing after the window: a target slower than the asked
        // rate gets fewer attempts, not a run that never ends.
        let open = now < window_end;
        while open && launched < total && inflight < args.max_inflight {
            let due = start + phase + interval.mul_f64(launched as f64);
            if due > now {
                break;
            }
            let key = thread << 40 | launched;
            launched += 1;
            out.attempted += 1;
            let started = Instant::now();
            let mut sock = match TcpStream::connect(addr) {
                Ok(s) => s,
                Err(e) => {
                    live.add_error();
                    out.failures.add(classify(&e), format!("connect: {e}"));
                    continue;
                }
            };
            let slot = free.pop().unwrap_or_else(|| {
                slots.push(None);
                generations.push(0);
                slots.len() - 1
            });
            if let Err(e) = poll.registry().register(
                &mut sock,
                token(slot, generations[slot]),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                out.failures.add("other", format!("register: {e}"));
                free.push(slot);
                continue;
            }
            let mut buf = [0u8; 256];
            pattern.stream(key).fill(0, &mut buf[..size]);
            slots[slot] = Some(Conn {
                sock,
                key,
                started,
                connected: false,
                wrote: 0,
                got: 0,
                buf,
            });
            inflight += 1;
        }
        // Sweep for timeouts every few milliseconds, not every turn.
        if now.duration_since(last_sweep) >= Duration::from_millis(5) {
            last_sweep = now;
            for slot in 0..slots.len() {
                if slots[slot]
                    .as_ref()
                    .is_some_and(|c| now.duration_since(c.started) > timeout)
                {
                    if let Some(mut c) = slots[slot].take() {
                        let _ = poll.registry().deregister(&mut c.sock);
                        live.add_error();
                        out.failures
                            .add("timeout", format!("conn {} exceeded {timeout:?}", c.key));
                    }
                    generations[slot] = generations[slot].wrapping_add(1);
                    free.push(slot);
                    inflight -= 1;
                }
            }
        }
        let mut wait = Duration::from_millis(5);
        if open && launched < total && inflight < args.max_inflight {
            let due = start + phase + interval.mul_f64(launched as f64);
            let until = due.saturating_duration_since(Instant::now());
            // mio sleeps in whole milliseconds; closer deadlines are polled without blocking.
            wait = if until < Duration::from_millis(1) {
                Duration::ZERO
            } else {
                until.min(wait)
            };
        }
        if let Err(e) = poll.poll(&mut events, Some(wait)) {
            if interrupted(&e) {
                continue;
            }
            out.failures.add("other", format!("poll: {e}"));
            break;
        }
        for ev in events.iter() {
            let (slot, generation) = untoken(ev.token());
            if generations.get(slot) != Some(&generation) {
                continue;
            }
            let Some(c) = slots[slot].as_mut() else {
                continue;
            };
            let step = drive(c, size, &mut out);
            let finished = match step {
                Ok(Step::Wait) => false,
                Ok(Step::Done) => {
                    out.completed += 1;
                    live.add_ops(1);
                    last_done = Instant::now();
                    true
                }
                Err((kind, msg)) => {
                    live.add_error();
                    out.failures.add(kind, format!("conn {}: {msg}", c.key));
                    true
                }
            };
            if finished {
                if let Some(mut c) = slots[slot].take() {
                    let _ = poll.registry().deregister(&mut c.sock);
                }
                generations[slot] = generations[slot].wrapping_add(1);
                free.push(slot);
                inflight -= 1;
            }
        }
    }
    out.seconds = (last_done - start).as_secs_f64();
    out
}

fn drive(c: &mut Conn, size: usize, out: &mut Out) -> Result<Step, (&'static str, String)> {
    let io = |e: std::io::Error| (classify(&e), e.to_string());
    if !c.connected {
        // A non-blocking connect's outcome: a pending socket error, else connected once the
        // peer address is known (mio's documented way; ENOTCONN means not yet).
        if let Some(e) = c.sock.take_error().map_err(io)? {
            return Err(io(e));
        }
        match c.sock.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(Step::Wait),
            Err(e) => return Err(io(e)),
        }
        c.connected = true;
        record(&mut out.connect, c.started.elapsed());
        let _ = c.sock.set_nodelay(true);
    }
    if c.wrote < size {
        c.wrote += write_some(&mut c.sock, &c.buf[c.wrote..size]).map_err(io)?;
    }
    let mut reply = [0u8; 256];
    while c.got < size {
        match read_some(&mut c.sock, &mut reply[..size - c.got]).map_err(io)? {
            None => return Ok(Step::Wait),
            Some(0) => return Err(("reset", format!("EOF after {} of {size} bytes", c.got))),
            Some(n) => {
                if c.got == 0 {
                    record(&mut out.first_byte, c.started.elapsed());
                }
                if reply[..n] != c.buf[c.got..c.got + n] {
                    return Err(("mismatch", format!("echo differs near byte {}", c.got)));
                }
                c.got += n;
            }
        }
    }
    Ok(Step::Done)
}
