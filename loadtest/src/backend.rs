//! The built-in backend: echo, sink and source servers on mio event loops.
//!
//! - `echo` sends back every byte; when the client half-closes, it flushes and half-closes too.
//! - `sink` reads an 8-byte little-endian stream key, then verifies everything that follows
//!   against that key's pattern stream; at the client's half-close it answers with a 16-byte
//!   report (`bytes received`, `offset of the first bad byte` or `u64::MAX`), so an upload is
//!   verified end to end, not just counted.
//! - `source` reads an 8-byte key and then sends that key's pattern stream until the client goes.
//!
//! Each worker thread registers its own clone of the one listening socket, so the kernel spreads
//! accepts across loops. A connection drives until WouldBlock, but at most a few chunks per turn;
//! a connection that still had work goes on a ready queue, which keeps one fast peer from
//! starving the rest while staying correct under mio's edge-triggered readiness.

use crate::net::{self, interrupted, token, untoken};
use crate::pattern::Pattern;
use anyhow::{Context, Result};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

/// What a backend does with each connection.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Mode {
    Echo,
    Sink,
    Source,
}

/// `loadtest backend` flags.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct BackendArgs {
    /// Address to listen on; port 0 picks a free port (the chosen address is printed first).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    #[arg(long, value_enum, default_value_t = Mode::Echo)]
    pub mode: Mode,
    /// Event-loop threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub threads: u64,
    /// Exit after this many seconds (default: run until killed).
    #[arg(long)]
    pub duration: Option<f64>,
}

/// Bytes read or written per call: large, so a bulk stream costs few syscalls.
const CHUNK: usize = 256 * 1024;
/// Chunks one connection may move per turn before yielding to the others.
const BUDGET: usize = 8;
const LISTENER: Token = Token(usize::MAX);
/// The sink's answer to a half-close.
pub const REPORT_LEN: usize = 16;

pub fn run(args: &BackendArgs) -> Result<()> {
    // Backends hold one fd per client; idle runs want thousands.
    let _ = crate::sys::raise_nofile(1 << 20);
    let addr = net::resolve(&args.listen)?;
    let std_listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    std_listener.set_nonblocking(true)?;
    crate::sys::set_backlog(&std_listener, 4096)?;
    let local = std_listener.local_addr()?;
    {
        // Announce the bound address on one flushed line: parents wait for it instead of sleeping.
        let mut out = io::stdout().lock();
        writeln!(
            out,
            "loadtest backend listening on {local} mode {:?}",
            args.mode
        )?;
        out.flush()?;
    }
    let deadline = args
        .duration
        .map(|d| Instant::now() + Duration::from_secs_f64(d.max(0.0)));
    let pattern = Pattern::new();
    let mode = args.mode;
    std::thread::scope(|s| -> Result<()> {
        let mut handles = Vec::new();
        for _ in 0..args.threads {
            let l = TcpListener::from_std(std_listener.try_clone()?);
            let pattern = &pattern;
            handles.push(s.spawn(move || Worker::new(l, mode, pattern)?.run(deadline)));
        }
        for h in handles {
            match h.join() {
                Ok(r) => r.context("backend worker")?,
                Err(_) => anyhow::bail!("backend worker panicked"),
            }
        }
        Ok(())
    })
}

struct Conn {
    sock: TcpStream,
    /// Bytes accepted from the peer but not yet written back (echo) or the report (sink).
    pending: Vec<u8>,
    sent: usize,
    eof: bool,
    header: [u8; 8],
    header_len: usize,
    /// Stream offset: received (sink) or sent (source).
    offset: u64,
    first_bad: Option<u64>,
    /// The sink's report is queued; close once it is flushed.
    closing: bool,
}

enum Step {
    /// Wait for the next readiness event.
    Wait,
    /// Had more to do than one turn allows; run again next turn.
    Yield,
    Close,
}

struct Worker<'p> {
    poll: Poll,
    listener: TcpListener,
    mode: Mode,
    pattern: &'p Pattern,
    conns: Vec<Option<Conn>>,
    generations: Vec<u32>,
    free: Vec<usize>,
    ready: VecDeque<(usize, u32)>,
    scratch: Vec<u8>,
}

impl<'p> Worker<'p> {
    fn new(mut listener: TcpListener, mode: Mode, pattern: &'p Pattern) -> io::Result<Self> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Worker {
            poll,
            listener,
            mode,
            pattern,
            conns: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            ready: VecDeque::new(),
            scratch: vec![0; CHUNK],
        })
    }

    fn run(mut self, deadline: Option<Instant>) -> Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(());
            }
            let timeout = if !self.ready.is_empty() {
                Some(Duration::ZERO)
            } else {
                deadline.map(|d| d - now)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if interrupted(&e) {
                    continue;
                }
                return Err(e.into());
            }
            for ev in events.iter() {
                if ev.token() == LISTENER {
                    self.accept();
                } else {
                    self.drive(untoken(ev.token()));
                }
            }
            for _ in 0..self.ready.len() {
                if let Some(id) = self.ready.pop_front() {
                    self.drive(id);
                }
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut sock, _)) => {
                    let _ = sock.set_nodelay(true);
                    let slot = self.free.pop().unwrap_or_else(|| {
                        self.conns.push(None);
                        self.generations.push(0);
                        self.conns.len() - 1
                    });
                    let generation = self.generations[slot];
                    if self
                        .poll
                        .registry()
                        .register(
                            &mut sock,
                            token(slot, generation),
                            Interest::READABLE | Interest::WRITABLE,
                        )
                        .is_err()
                    {
                        self.free.push(slot);
                        continue;
                    }
                    self.conns[slot] = Some(Conn {
                        sock,
                        pending: Vec::new(),
                        sent: 0,
                        eof: false,
                        header: [0; 8],
                        header_len: 0,
                        offset: 0,
                        first_bad: None,
                        closing: false,
                    });
                    // Data may already be queued; an edge that came before registration is lost.
                    self.ready.push_back((slot, generation));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if interrupted(&e) => continue,
                // Out of fds or buffers: stop this round; the pending connections stay queued
                // in the backlog and the next readiness edge (or new client) retries.
                Err(_) => return,
            }
        }
    }

    fn drive(&mut self, (slot, generation): (usize, u32)) {
        if self.generations.get(slot) != Some(&generation) {
            return;
        }
        let Some(conn) = self.conns[slot].as_mut() else {
            return;
        };
        let step = match self.mode {
            Mode::Echo => echo(conn, &mut self.scratch),
            Mode::Sink => sink(conn, &mut self.scratch, self.pattern),
            Mode::Source => source(conn, &mut self.scratch, self.pattern),
        };
        match step {
            Ok(Step::Wait) => {}
            Ok(Step::Yield) => self.ready.push_back((slot, generation)),
            Ok(Step::Close) | Err(_) => {
                if let Some(mut c) = self.conns[slot].take() {
                    let _ = self.poll.registry().deregister(&mut c.sock);
                }
                self.generations[slot] = self.generations[slot].wrapping_add(1);
                self.free.push(slot);
            }
        }
    }
}

/// Writes until done or WouldBlock; returns how much was written.
pub fn write_some(sock: &mut TcpStream, buf: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match sock.write(&buf[done..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if interrupted(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// One read; `None` means WouldBlock.
pub fn read_some(sock: &mut TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match sock.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
            Err(e) if interrupted(&e) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Flushes `pending`; true when it is empty afterwards.
fn flush(conn: &mut Conn) -> io::Result<bool> {
    if conn.sent < conn.pending.len() {
        conn.sent += write_some(&mut conn.sock, &conn.pending[conn.sent..])?;
        if conn.sent < conn.pending.len() {
            return Ok(false);
        }
    }
    conn.pending.clear();
    conn.sent = 0;
    Ok(true)
}

/// Half-closes after the last byte, then lets the caller drop the socket: the peer has sent
/// its FIN already, so closing now loses nothing and sends no reset.
fn finish(conn: &mut Conn) -> io::Result<Step> {
    let _ = conn.sock.shutdown(Shutdown::Write);
    Ok(Step::Close)
}

fn echo(conn: &mut Conn, scratch: &mut [u8]) -> io::Result<Step> {
    for _ in 0..BUDGET {
        // Reading stops while anything is unsent: memory per connection stays at one chunk.
        if !flush(conn)? {
            return Ok(Step::Wait);
        }
        if conn.eof {
            return finish(conn);
        }
        match read_some(&mut conn.sock, scratch)? {
            None => return Ok(Step::Wait),
            Some(0) => conn.eof = true,
            Some(n) => {
                let w = write_some(&mut conn.sock, &scratch[..n])?;
                conn.pending.extend_from_slice(&scratch[w..n]);
            }
        }
    }
    Ok(Step::Yield)
}

/// Reads the 8-byte stream key; true once it is complete.
fn read_header(conn: &mut Conn) -> io::Result<bool> {
    while conn.header_len < 8 {
        let at = conn.header_len;
        match read_some(&mut conn.sock, &mut conn.header[at..])? {
            None => return Ok(false),
            Some(0) => {
                conn.eof = true;
                return Ok(false);
            }
            Some(n) => conn.header_len += n,
        }
    }
    Ok(true)
}

fn sink(conn: &mut Conn, scratch: &mut [u8], pattern: &Pattern) -> io::Result<Step> {
    if conn.closing {
        return if flush(conn)? {
            finish(conn)
        } else {
            Ok(Step::Wait)
        };
    }
    if !read_header(conn)? {
        return Ok(if conn.eof { Step::Close } else { Step::Wait });
    }
    let stream = pattern.stream(u64::from_le_bytes(conn.header));
    for _ in 0..BUDGET {
        match read_some(&mut conn.sock, scratch)? {
            None => return Ok(Step::Wait),
            Some(0) => {
                let bad = conn.first_bad.unwrap_or(u64::MAX);
                conn.pending.extend_from_slice(&conn.offset.to_le_bytes());
                conn.pending.extend_from_slice(&bad.to_le_bytes());
                conn.closing = true;
                return if flush(conn)? {
                    finish(conn)
                } else {
                    Ok(Step::Wait)
                };
            }
            Some(n) => {
                if conn.first_bad.is_none()
                    && let Err(m) = stream.verify(conn.offset, &scratch[..n])
                {
                    conn.first_bad = Some(m.offset);
                }
                conn.offset += n as u64;
            }
        }
    }
    Ok(Step::Yield)
}

fn source(conn: &mut Conn, scratch: &mut [u8], pattern: &Pattern) -> io::Result<Step> {
    if !read_header(conn)? {
        return Ok(if conn.eof { Step::Close } else { Step::Wait });
    }
    // Anything the client sends after the key is ignored; its EOF or reset ends the stream.
    let mut discard = [0u8; 512];
    if let Some(0) = read_some(&mut conn.sock, &mut discard)? {
        return Ok(Step::Close);
    }
    let stream = pattern.stream(u64::from_le_bytes(conn.header));
    for _ in 0..BUDGET {
        stream.fill(conn.offset, scratch);
        let n = write_some(&mut conn.sock, scratch)?;
        conn.offset += n as u64;
        if n < scratch.len() {
            return Ok(Step::Wait);
        }
    }
    Ok(Step::Yield)
}
