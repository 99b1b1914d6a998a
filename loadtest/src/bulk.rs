//! `bulk`: throughput with every byte verified.
//!
//! - `up` (against `backend --mode sink`): sends the 8-byte stream key, then the key's pattern
//!   stream; at the end half-closes and reads the sink's 16-byte report, which must confirm every
//!   byte arrived intact.
//! - `down` (against `--mode source`): sends the key and verifies the stream that comes back.
//! - `both` (against `--mode echo`): sends the stream and verifies the echo; at the end
//!   half-closes and expects exactly as many bytes back as it sent, then EOF.
//!
//! Stream keys are connection indexes, so every connection's bytes differ. Each connection keeps
//! one chunk of its stream ready to send, so a partial write never regenerates data, and reads
//! go into one per-thread chunk: the cost per byte is one generate or one verify and the copies
//! the kernel makes.

use crate::backend::{REPORT_LEN, read_some, write_some};
use crate::net::{self, classify, interrupted, token, untoken};
use crate::pattern::Pattern;
use crate::report::{Common, Failures, Live, Measure, Report, Show, run_workers, slice};
use crate::stats::{fmt_rate, gbit_per_s};
use anyhow::Result;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll};
use serde::Serialize;
use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Direction {
    Up,
    Down,
    Both,
}

/// `loadtest bulk` flags.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct BulkArgs {
    /// Address to load (a sealpipe listener or a backend).
    #[arg(long)]
    pub target: String,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub conns: u64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// up needs a sink backend, down a source, both an echo.
    #[arg(long, value_enum, default_value_t = Direction::Both)]
    pub direction: Direction,
    /// Bytes per read and write call.
    #[arg(long, default_value_t = 256 * 1024, value_parser = clap::value_parser!(u64).range(1024..=16 << 20))]
    pub chunk: u64,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BulkResults {
    /// Bytes sent and confirmed by the far end (up, both).
    pub bytes_up: u64,
    /// Bytes received and verified (down, both).
    pub bytes_down: u64,
    pub seconds: f64,
    pub gbit_per_s_up: f64,
    pub gbit_per_s_down: f64,
    /// Connections that ended with every byte verified.
    pub conns_ok: u64,
    pub mismatches: u64,
}

/// How long after the sending window to wait for confirmations before calling it a timeout.
const GRACE: Duration = Duration::from_secs(10);
const BUDGET: usize = 8;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub fn run(args: &BulkArgs, pattern: &Pattern) -> Result<Report<BulkArgs, BulkResults>> {
    let addr = net::resolve(&args.target)?;
    let measure = Measure::start(&args.common.metrics);
    let live = Live::default();
    let threads = args.common.threads.min(args.conns);
    let start = Instant::now();
    let outs = run_workers(
        "bulk",
        threads as usize,
        Duration::from_secs_f64(args.duration),
        args.common.quiet,
        &live,
        Show::Bytes,
        |i| {
            let (first, n) = slice(args.conns, threads, i as u64);
            worker(args, addr, pattern, &live, start, first, n)
        },
    );
    let mut r = BulkResults::default();
    let mut failures = Failures::default();
    for o in outs {
        r.bytes_up += o.up;
        r.bytes_down += o.down;
        r.conns_ok += o.ok;
        r.seconds = r.seconds.max(o.seconds);
        failures.merge(o.failures);
    }
    r.mismatches = failures.count("mismatch");
    r.gbit_per_s_up = gbit_per_s(r.bytes_up, r.seconds);
    r.gbit_per_s_down = gbit_per_s(r.bytes_down, r.seconds);
    Ok(measure.finish("bulk", args.clone(), r, failures))
}

pub fn rows(rep: &Report<BulkArgs, BulkResults>) -> Vec<(String, String)> {
    let (a, r) = (&rep.params, &rep.results);
    vec![
        (
            "target".into(),
            format!(
                "{} ({:?}, {} conns, {} threads)",
                a.target, a.direction, a.conns, a.common.threads
            ),
        ),
        (
            "up".into(),
            format!(
                "{:.2} Gbit/s ({} B verified)",
                r.gbit_per_s_up,
                fmt_rate(r.bytes_up as f64)
            ),
        ),
        (
            "down".into(),
            format!(
                "{:.2} Gbit/s ({} B verified)",
                r.gbit_per_s_down,
                fmt_rate(r.bytes_down as f64)
            ),
        ),
        (
            "conns ok".into(),
            format!("{}/{} in {:.2}s", r.conns_ok, a.conns, r.seconds),
        ),
        ("mismatches".into(), r.mismatches.to_string()),
    ]
}

struct Out {
    up: u64,
    down: u64,
    ok: u64,
    seconds: f64,
    failures: Failures,
}

struct Conn {
    sock: TcpStream,
    key: u64,
    /// Stream bytes written (the key header is not counted).
    tx: u64,
    /// Stream bytes received and verified.
    rx: u64,
    header_sent: usize,
    /// A chunk of the stream starting at `buf_at`, so partial writes resume without refilling.
    buf: Vec<u8>,
    buf_at: u64,
    shut: bool,
    report: [u8; REPORT_LEN],
    report_len: usize,
    done: bool,
}

fn worker(
    args: &BulkArgs,
    addr: SocketAddr,
    pattern: &Pattern,
    live: &Live,
    start: Instant,
    first: u64,
    n: u64,
) -> Out {
    let mut out = Out {
        up: 0,
        down: 0,
        ok: 0,
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
    let chunk = args.chunk as usize;
    let dir = args.direction;
    let mut conns: Vec<Conn> = Vec::new();
    for key in first..first + n {
        match net::connect(addr, CONNECT_TIMEOUT) {
            Ok(mut sock) => {
                let slot = conns.len();
                if let Err(e) = poll.registry().register(
                    &mut sock,
                    token(slot, 0),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    out.failures.add("other", format!("register: {e}"));
                    continue;
                }
                conns.push(Conn {
                    sock,
                    key,
                    tx: 0,
                    rx: 0,
                    // Echo carries no header: every byte sent is stream, and comes back.
                    header_sent: if dir == Direction::Both { 8 } else { 0 },
                    buf: if dir == Direction::Down {
                        Vec::new()
                    } else {
                        vec![0; chunk]
                    },
                    buf_at: u64::MAX,
                    shut: false,
                    report: [0; REPORT_LEN],
                    report_len: 0,
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
    let stop_at = start + Duration::from_secs_f64(args.duration);
    let give_up = stop_at + GRACE;
    let mut scratch = vec![0u8; chunk];
    let mut events = Events::with_capacity(1024);
    let mut ready: VecDeque<usize> = (0..conns.len()).collect();
    let mut remaining = conns.len();
    let mut stopping = false;
    while remaining > 0 {
        let now = Instant::now();
        if now >= give_up {
            for c in conns.iter().filter(|c| !c.done) {
                out.failures.add(
                    "timeout",
                    format!("conn {} unconfirmed {GRACE:?} after the end", c.key),
                );
            }
            break;
        }
        if !stopping && now >= stop_at {
            stopping = true;
            // Every connection must act on the end of the window, readiness or not.
            ready.extend(0..conns.len());
        }
        let timeout = if !ready.is_empty() {
            Duration::ZERO
        } else if stopping {
            give_up - now
        } else {
            stop_at - now
        };
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
        for _ in 0..ready.len() {
            let Some(slot) = ready.pop_front() else { break };
            let Some(c) = conns.get_mut(slot) else {
                continue;
            };
            if c.done {
                continue;
            }
            match drive(c, dir, stopping, pattern, &mut scratch, live) {
                Ok(Step::Wait) => {}
                Ok(Step::Yield) => ready.push_back(slot),
                Ok(Step::Done) => {
                    c.done = true;
                    remaining -= 1;
                    out.ok += 1;
                    let _ = poll.registry().deregister(&mut c.sock);
                }
                Err(f) => {
                    c.done = true;
                    remaining -= 1;
                    live.add_error();
                    out.failures
                        .add(f.kind, format!("conn {}: {}", c.key, f.msg));
                    let _ = poll.registry().deregister(&mut c.sock);
                }
            }
        }
    }
    out.seconds = start.elapsed().as_secs_f64();
    for c in &conns {
        out.down += c.rx;
        // Uploads count only what the far side confirmed (echo: bytes back; sink: its report).
        out.up += match dir {
            Direction::Up if c.done && c.report_len == REPORT_LEN => c.tx,
            Direction::Both => c.rx,
            _ => 0,
        };
    }
    out
}

enum Step {
    Wait,
    Yield,
    Done,
}

struct Fail {
    kind: &'static str,
    msg: String,
}

fn fail(kind: &'static str, msg: impl Into<String>) -> Fail {
    Fail {
        kind,
        msg: msg.into(),
    }
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Fail {
        fail(classify(&e), e.to_string())
    }
}

fn drive(
    c: &mut Conn,
    dir: Direction,
    stopping: bool,
    pattern: &Pattern,
    scratch: &mut [u8],
    live: &Live,
) -> Result<Step, Fail> {
    let stream = pattern.stream(c.key);
    let mut busy = false;
    // Key header first (sink and source need to know which stream to expect or send).
    while c.header_sent < 8 {
        let hdr = c.key.to_le_bytes();
        let n = write_some(&mut c.sock, &hdr[c.header_sent..])?;
        if n == 0 {
            return Ok(Step::Wait);
        }
        c.header_sent += n;
    }
    if dir == Direction::Down && stopping {
        return Ok(Step::Done);
    }
    // Send.
    if dir != Direction::Down && !stopping {
        let mut rounds = 0;
        loop {
            if rounds == BUDGET {
                busy = true;
                break;
            }
            rounds += 1;
            let len = c.buf.len() as u64;
            if c.buf_at == u64::MAX || c.tx >= c.buf_at + len {
                stream.fill(c.tx, &mut c.buf);
                c.buf_at = c.tx;
            }
            let from = (c.tx - c.buf_at) as usize;
            let n = write_some(&mut c.sock, &c.buf[from..])?;
            c.tx += n as u64;
            if dir == Direction::Up {
                live.add_bytes(n as u64);
            }
            if from + n < c.buf.len() {
                break;
            }
        }
    }
    if stopping && !c.shut && dir != Direction::Down {
        c.sock.shutdown(Shutdown::Write)?;
        c.shut = true;
    }
    // Receive.
    let mut rounds = 0;
    loop {
        if rounds == BUDGET {
            busy = true;
            break;
        }
        rounds += 1;
        if dir == Direction::Up {
            let at = c.report_len;
            match read_some(&mut c.sock, &mut c.report[at..])? {
                None => break,
                Some(0) if at < REPORT_LEN => {
                    return Err(fail("reset", "sink closed before its report"));
                }
                Some(0) => return Ok(Step::Done),
                Some(n) => {
                    if !c.shut {
                        return Err(fail("mismatch", "sink answered before the upload ended"));
                    }
                    c.report_len += n;
                    if c.report_len == REPORT_LEN {
                        let mut w = [0u8; 8];
                        w.copy_from_slice(&c.report[..8]);
                        let got = u64::from_le_bytes(w);
                        w.copy_from_slice(&c.report[8..]);
                        let bad = u64::from_le_bytes(w);
                        if bad != u64::MAX {
                            return Err(fail(
                                "mismatch",
                                format!("sink saw a wrong byte at offset {bad}"),
                            ));
                        }
                        if got != c.tx {
                            return Err(fail(
                                "mismatch",
                                format!("sent {} bytes, sink received {got}", c.tx),
                            ));
                        }
                        return Ok(Step::Done);
                    }
                }
            }
            continue;
        }
        match read_some(&mut c.sock, scratch) {
            Ok(None) => break,
            Ok(Some(0)) => {
                if dir == Direction::Both && c.shut && c.rx == c.tx {
                    return Ok(Step::Done);
                }
                return Err(fail(
                    "reset",
                    format!(
                        "EOF after {} of {} bytes{}",
                        c.rx,
                        c.tx,
                        if c.shut { "" } else { " before the end" }
                    ),
                ));
            }
            Ok(Some(n)) => {
                if let Err(m) = stream.verify(c.rx, &scratch[..n]) {
                    return Err(fail(
                        "mismatch",
                        format!(
                            "byte {} is {:#04x}, expected {:#04x}",
                            m.offset, m.got, m.expected
                        ),
                    ));
                }
                c.rx += n as u64;
                live.add_bytes(n as u64);
                if dir == Direction::Both && c.rx > c.tx {
                    return Err(fail("mismatch", "more bytes came back than were sent"));
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(if busy { Step::Yield } else { Step::Wait })
}
