//! `idle`: hold many quiet connections, then prove each still works; proxies' memory per conn.
//!
//! Raises the process's fd limit first (one fd per connection). Connections are opened with
//! non-blocking connects, a bounded number at a time so the target's accept backlog is not
//! overrun (an overflow costs a one-second SYN retry, which would look like a slow proxy). While
//! holding, any byte, EOF or error on a connection counts as a drop. At the end every surviving
//! connection sends 8 bytes and must get them back. With `--pid`, each process's VmRSS is read
//! before connecting and at the end of the hold, and reported as KiB per connection.

use crate::backend::{read_some, write_some};
use crate::net::{self, classify, interrupted, token, untoken};
use crate::pattern::Pattern;
use crate::procfs;
use crate::report::{Common, Failures, Measure, Report};
use anyhow::{Result, bail};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll};
use serde::Serialize;
use std::io::ErrorKind;
use std::time::{Duration, Instant};

/// `loadtest idle` flags.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct IdleArgs {
    /// Address of an echo service.
    #[arg(long)]
    pub target: String,
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub conns: u64,
    /// Seconds to hold the connections idle.
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
    /// A process whose RSS to report (repeatable), e.g. each sealpipe.
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// Connects in progress at once.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub concurrency: u64,
    /// Seconds allowed for each phase (connecting all, checking all).
    #[arg(long, default_value_t = 30.0)]
    pub phase_timeout: f64,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Rss {
    pub pid: u32,
    pub before_kib: u64,
    pub after_kib: u64,
    pub kib_per_conn: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct IdleResults {
    pub nofile_limit: u64,
    pub established: u64,
    pub connect_seconds: f64,
    pub dropped: u64,
    pub checked_ok: u64,
    pub rss: Vec<Rss>,
}

#[derive(PartialEq)]
enum State {
    Connecting,
    Idle,
    Checking,
    Ok,
    Failed,
}

struct Conn {
    sock: TcpStream,
    state: State,
    msg: [u8; 8],
    wrote: usize,
    got: usize,
}

pub fn run(args: &IdleArgs, pattern: &Pattern) -> Result<Report<IdleArgs, IdleResults>> {
    let addr = net::resolve(&args.target)?;
    let want = args.conns + 64;
    let limit = crate::sys::raise_nofile(want)?;
    if limit < want {
        bail!(
            "need about {want} file descriptors for {} connections, the limit is {limit}",
            args.conns
        );
    }
    let measure = Measure::start(&args.common.metrics);
    let mut r = IdleResults {
        nofile_limit: limit,
        ..Default::default()
    };
    let mut failures = Failures::default();
    let before: Vec<(u32, Option<u64>)> =
        args.pids.iter().map(|&p| (p, procfs::rss_kib(p))).collect();
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(4096);
    let mut conns: Vec<Conn> = Vec::with_capacity(args.conns as usize);
    let phase = Duration::from_secs_f64(args.phase_timeout);

    // Phase 1: connect, `concurrency` at a time.
    let t0 = Instant::now();
    let mut connecting = 0u64;
    let mut launched = 0u64;
    while launched < args.conns || connecting > 0 {
        if t0.elapsed() > phase {
            failures.add(
                "timeout",
                format!("{connecting} connects unfinished after {phase:?}"),
            );
            for c in conns.iter_mut().filter(|c| c.state == State::Connecting) {
                c.state = State::Failed;
            }
            break;
        }
        while launched < args.conns && connecting < args.concurrency {
            launched += 1;
            match TcpStream::connect(addr) {
                Ok(mut sock) => {
                    let i = conns.len();
                    poll.registry().register(
                        &mut sock,
                        token(i, 0),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    let mut msg = [0u8; 8];
                    pattern.stream(i as u64).fill(0, &mut msg);
                    conns.push(Conn {
                        sock,
                        state: State::Connecting,
                        msg,
                        wrote: 0,
                        got: 0,
                    });
                    connecting += 1;
                }
                Err(e) => failures.add(classify(&e), format!("connect: {e}")),
            }
        }
        poll_once(&mut poll, &mut events, Duration::from_millis(100))?;
        for ev in events.iter() {
            let Some(c) = conns.get_mut(untoken(ev.token()).0) else {
                continue;
            };
            if c.state != State::Connecting {
                continue;
            }
            match connected(&c.sock) {
                Ok(false) => {}
                Ok(true) => {
                    c.state = State::Idle;
                    connecting -= 1;
                    r.established += 1;
                }
                Err(e) => {
                    c.state = State::Failed;
                    connecting -= 1;
                    failures.add(classify(&e), format!("connect: {e}"));
                }
            }
        }
    }
    r.connect_seconds = t0.elapsed().as_secs_f64();

    // Phase 2: hold. Anything arriving on an idle connection means it was dropped.
    let hold_end = Instant::now() + Duration::from_secs_f64(args.hold);
    let mut sink = [0u8; 64];
    loop {
        let now = Instant::now();
        if now >= hold_end {
            break;
        }
        poll_once(&mut poll, &mut events, hold_end - now)?;
        for ev in events.iter() {
            let Some(c) = conns.get_mut(untoken(ev.token()).0) else {
                continue;
            };
            if c.state != State::Idle || !ev.is_readable() {
                continue;
            }
            let why = match read_some(&mut c.sock, &mut sink) {
                Ok(None) => continue,
                Ok(Some(0)) => ("reset", "closed by the far side while idle".to_string()),
                Ok(Some(n)) => ("mismatch", format!("{n} unexpected bytes while idle")),
                Err(e) => (classify(&e), format!("while idle: {e}")),
            };
            c.state = State::Failed;
            r.dropped += 1;
            failures.add(why.0, why.1);
        }
    }
    r.rss = before
        .iter()
        .map(|&(pid, b)| {
            let a = procfs::rss_kib(pid);
            if b.is_none() || a.is_none() {
                failures.add("other", format!("cannot read RSS of pid {pid}"));
            }
            let (b, a) = (b.unwrap_or(0), a.unwrap_or(0));
            Rss {
                pid,
                before_kib: b,
                after_kib: a,
                kib_per_conn: if r.established > 0 {
                    (a as f64 - b as f64) / r.established as f64
                } else {
                    0.0
                },
            }
        })
        .collect();

    // Phase 3: every surviving connection must still echo.
    let mut checking = 0u64;
    for c in conns.iter_mut().filter(|c| c.state == State::Idle) {
        c.state = State::Checking;
        checking += 1;
        if let Err((k, m)) = check(c) {
            c.state = State::Failed;
            checking -= 1;
            failures.add(k, m);
        } else if c.state == State::Ok {
            checking -= 1;
            r.checked_ok += 1;
        }
    }
    let t1 = Instant::now();
    while checking > 0 {
        if t1.elapsed() > phase {
            failures.add(
                "timeout",
                format!("{checking} connections did not echo in {phase:?}"),
            );
            break;
        }
        poll_once(&mut poll, &mut events, Duration::from_millis(100))?;
        for ev in events.iter() {
            let Some(c) = conns.get_mut(untoken(ev.token()).0) else {
                continue;
            };
            if c.state != State::Checking {
                continue;
            }
            match check(c) {
                Ok(()) if c.state == State::Ok => {
                    checking -= 1;
                    r.checked_ok += 1;
                }
                Ok(()) => {}
                Err((k, m)) => {
                    c.state = State::Failed;
                    checking -= 1;
                    failures.add(k, m);
                }
            }
        }
    }
    if r.established < args.conns && failures.total() == 0 {
        failures.add("other", "fewer connections established than asked");
    }
    drop(conns);
    Ok(measure.finish("idle", args.clone(), r, failures))
}

fn poll_once(poll: &mut Poll, events: &mut Events, timeout: Duration) -> Result<()> {
    match poll.poll(events, Some(timeout)) {
        Err(e) if !interrupted(&e) => Err(e.into()),
        _ => Ok(()),
    }
}

fn connected(sock: &TcpStream) -> std::io::Result<bool> {
    if let Some(e) = sock.take_error()? {
        return Err(e);
    }
    match sock.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

fn check(c: &mut Conn) -> Result<(), (&'static str, String)> {
    let io = |e: std::io::Error| (classify(&e), format!("check: {e}"));
    if c.wrote < 8 {
        c.wrote += write_some(&mut c.sock, &c.msg[c.wrote..]).map_err(io)?;
    }
    let mut buf = [0u8; 8];
    while c.got < 8 {
        match read_some(&mut c.sock, &mut buf[..8 - c.got]).map_err(io)? {
            None => return Ok(()),
            Some(0) => return Err(("reset", "check: EOF instead of echo".into())),
            Some(n) => {
                if buf[..n] != c.msg[c.got..c.got + n] {
                    return Err(("mismatch", "check: wrong echo".into()));
                }
                c.got += n;
            }
        }
    }
    c.state = State::Ok;
    Ok(())
}

pub fn rows(rep: &Report<IdleArgs, IdleResults>) -> Vec<(String, String)> {
    let (a, r) = (&rep.params, &rep.results);
    let mut rows = vec![
        (
            "target".into(),
            format!(
                "{} ({} conns, hold {}s, fd limit {})",
                a.target, a.conns, a.hold, r.nofile_limit
            ),
        ),
        (
            "established".into(),
            format!("{}/{} in {:.2}s", r.established, a.conns, r.connect_seconds),
        ),
        ("dropped while idle".into(), r.dropped.to_string()),
        (
            "echo ok at the end".into(),
            format!("{}/{}", r.checked_ok, a.conns),
        ),
    ];
    for m in &r.rss {
        rows.push((
            format!("pid {} RSS", m.pid),
            format!(
                "{} -> {} KiB = {:.1} KiB/conn",
                m.before_kib, m.after_kib, m.kib_per_conn
            ),
        ));
    }
    rows
}
