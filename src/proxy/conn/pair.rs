//! The pair harness (tests only): an encrypt core and a decrypt core, real `SealFilter`s and
//! protocol v2 between them, a plaintext client and backend, all wired through in-memory TCP
//! links, with a hand-driven clock. Like quinn's `tests/util.rs` `Pair`, but the test decides
//! every step: which bytes arrive where and how many at a time, which side's readiness is
//! dispatched first, when a connect is answered, when time moves, where a FIN, a RST or a
//! flipped bit falls.
//!
//! The cores run exactly as in production: the same `ConnCore` and the same `BevCore` read
//! and write paths; only the transport (a [`Pipe`] over a [`Link`] instead of a mio socket)
//! and the loop (a [`World`] that dispatches readiness edges, deferred re-drives, closes and
//! timers in the loop's order) are stand-ins.
//!
//! The links model what the proxy relies on from TCP: bytes in order; a bounded buffer per
//! direction (a full one makes writes would-block, and reading from it gives the writer a
//! writable edge); readiness as edges; a FIN after the bytes before it; a RST that drops what
//! its sender had not yet sent and fails the peer's reads after the bytes already there; a
//! close with unread bytes, or bytes arriving at a closed end, turning into a RST; a refused
//! connect reported as an error, an unanswered one resolved only by the connect timeout.
//!
//! The encrypt node may expect a PROXY header ahead of the client's bytes (`accept_proxy`,
//! with the real `identity` parser behind `Env::client_preamble`, and the header's addresses
//! in the OPEN it seals), and the decrypt node may send its backend a preamble first.
//!
//! Invariants: a world reads the system clock once, for its starting instant, and no system
//! randomness (its time moves only by `advance`, its randomness is `TestRng`), so a schedule
//! replays exactly; the
//! loop's order is kept (a callback's deferred work, then the next), as `EventBase` keeps it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Balance;
use crate::metrics::CloseReason;
use crate::protocol::keys::{Key, KeySet};
use crate::protocol::{AeadKind, ForwardSecrecy, HandshakeConfig, OpenInfo, RandomSource};
use crate::reactor::{
    BevCore, BevEvents, Buffer, Filter, NoFilter, Readiness, Ready, Relay, Suspend, Transport,
};

use super::super::cidr::CidrList;
use super::super::codec::{Role, SealFilter};
use super::super::identity::{self, ConnIdentity, HeaderError, HeaderStep, Identity};
use super::super::upstream::{ConnectOutcome, Tried, Upstreams};
use super::super::{ByteCounts, OUTPUT_HIGH, READ_HIGH, TargetAddr};
use super::core::{
    Action, Cause, ConnCore, ConnTimer, Env, Flow, Layer, Limits, Preamble, Side, WarmStep,
};
use super::warm::{WarmAction, WarmCause, WarmCore, WarmEnd, WarmEnv};

/// The documented bound on what one connection buffers (proxy/mod.rs): per direction
/// `READ_HIGH + OUTPUT_HIGH + READ_HIGH` plus record framing, both directions.
pub const MAX_BUFFERED: usize = 2 * (2 * READ_HIGH + OUTPUT_HIGH) * 16403 / 16384;

/// A fixed random source (xorshift64*), so a world's every byte is the same on every run.
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> TestRng {
        TestRng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
}

impl RandomSource for TestRng {
    fn fill(&mut self, dst: &mut [u8]) {
        for b in dst {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            *b = (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8;
        }
    }
}

/// The sealed layer of the harness.
pub type Sealed = SealFilter<TestRng>;

// ---------------------------------------------------------------------------------------------
// Links: in-memory TCP connections

/// One direction of a link.
#[derive(Default)]
struct Dir {
    /// Written, not yet arrived.
    in_flight: VecDeque<u8>,
    /// Arrived, not yet read.
    arrived: VecDeque<u8>,
    fin_sent: bool,
    fin_arrived: bool,
    rst_sent: bool,
    rst_arrived: bool,
    /// The receiving end closed: what arrives now is answered with a RST.
    reader_closed: bool,
    /// A middlebox cut the link: writes vanish.
    cut: bool,
}

impl Dir {
    fn buffered(&self) -> usize {
        self.in_flight.len() + self.arrived.len()
    }
    fn deliverable(&self) -> bool {
        !self.in_flight.is_empty()
            || (self.fin_sent && !self.fin_arrived)
            || (self.rst_sent && !self.rst_arrived)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Connect {
    Pending,
    Accepted,
    Refused,
}

/// An in-memory TCP connection between end 0 (the connecting one) and end 1.
pub struct Link {
    /// `dirs[e]` carries what end `e` sends.
    dirs: [Dir; 2],
    /// Readiness edges waiting to be dispatched to each end.
    edges: [Ready; 2],
    connect: Connect,
    /// Bytes a direction buffers (send and receive buffers together).
    cap: usize,
    closed: [bool; 2],
    /// The kernel gave up on end `e`'s peer (keepalive, TCP_USER_TIMEOUT): once what arrived
    /// is read, its reads and writes fail with ETIMEDOUT.
    gave_up: [bool; 2],
}

type LinkRef = Rc<RefCell<Link>>;

/// Moves the first `n` bytes of `from` to the end of `to`, a slice at a time.
fn move_front(from: &mut VecDeque<u8>, to: &mut VecDeque<u8>, n: usize) {
    let (a, b) = from.as_slices();
    let na = n.min(a.len());
    to.extend(&a[..na]);
    to.extend(&b[..n - na]);
    from.drain(..n);
}

fn edge_or(a: &mut Ready, b: Ready) {
    a.readable |= b.readable;
    a.writable |= b.writable;
    a.read_closed |= b.read_closed;
    a.write_closed |= b.write_closed;
    a.error |= b.error;
}

fn no_edge(r: Ready) -> bool {
    r == Ready::default()
}

impl Link {
    fn new(cap: usize) -> LinkRef {
        Rc::new(RefCell::new(Link {
            dirs: [Dir::default(), Dir::default()],
            edges: [Ready::default(); 2],
            connect: Connect::Pending,
            cap: cap.max(1),
            closed: [false; 2],
            gave_up: [false; 2],
        }))
    }

    /// Moves up to `max` bytes of direction `d` to its reader (and its FIN or RST once the
    /// bytes before it arrived). True if anything arrived.
    fn deliver(&mut self, d: usize, max: usize) -> bool {
        let to = 1 - d;
        let dir = &mut self.dirs[d];
        if !dir.deliverable() {
            return false;
        }
        let n = max.min(dir.in_flight.len());
        let mut edge = Ready::default();
        if n > 0 {
            if dir.reader_closed {
                // A closed socket answers data with a RST.
                dir.in_flight.clear();
                self.rst_from(to);
                return true;
            }
            move_front(&mut dir.in_flight, &mut dir.arrived, n);
            edge.readable = true;
        }
        if dir.in_flight.is_empty() {
            if dir.rst_sent && !dir.rst_arrived {
                dir.rst_arrived = true;
                edge.readable = true;
                edge.read_closed = true;
                edge.error = true;
            } else if dir.fin_sent && !dir.fin_arrived {
                dir.fin_arrived = true;
                edge.readable = true;
                edge.read_closed = true;
            }
        }
        edge_or(&mut self.edges[to], edge);
        true
    }

    /// End `e` sends a RST, behind the bytes it already sent (they were on the wire); the
    /// peer reads them, then `ECONNRESET`.
    fn rst_from(&mut self, e: usize) {
        self.dirs[e].rst_sent = true;
    }

    fn shutdown_write(&mut self, e: usize) {
        self.dirs[e].fin_sent = true;
    }

    /// End `e` closes: a RST if asked, or if it leaves bytes unread (as Linux does); else a
    /// FIN after what it sent.
    fn close(&mut self, e: usize, reset: bool) {
        if self.closed[e] {
            return;
        }
        self.closed[e] = true;
        let incoming = &mut self.dirs[1 - e];
        incoming.reader_closed = true;
        let unread = !incoming.arrived.is_empty() || !incoming.in_flight.is_empty();
        if self.dirs[e].rst_sent {
            return;
        }
        if reset || unread {
            self.rst_from(e);
        } else {
            self.dirs[e].fin_sent = true;
        }
    }

    /// A middlebox in the path dies: each side sees a FIN after what had already arrived;
    /// what was in flight, and anything written later, is lost.
    fn cut(&mut self) {
        for d in &mut self.dirs {
            d.in_flight.clear();
            d.cut = true;
            if !d.rst_sent {
                d.fin_sent = true;
            }
        }
    }
}

/// One end of a link, as a byte stream.
pub struct End {
    link: LinkRef,
    e: usize,
}

impl End {
    fn take_edge(&self) -> Ready {
        std::mem::take(&mut self.link.borrow_mut().edges[self.e])
    }
    fn add_edge(&self, r: Ready) {
        edge_or(&mut self.link.borrow_mut().edges[self.e], r);
    }
    fn shutdown_write(&self) {
        self.link.borrow_mut().shutdown_write(self.e);
    }
    fn close(&self, reset: bool) {
        self.link.borrow_mut().close(self.e, reset);
    }
    fn connect_state(&self) -> Connect {
        self.link.borrow().connect
    }
}

impl Read for End {
    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        self.read_each(bufs)
    }

    fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        let mut l = self.link.borrow_mut();
        let cap = l.cap;
        let from = 1 - self.e;
        let dir = &mut l.dirs[from];
        if !dir.arrived.is_empty() {
            let was_full = dir.buffered() >= cap;
            let n = dst.len().min(dir.arrived.len());
            let (a, b) = dir.arrived.as_slices();
            let na = n.min(a.len());
            dst[..na].copy_from_slice(&a[..na]);
            dst[na..n].copy_from_slice(&b[..n - na]);
            dir.arrived.drain(..n);
            if was_full && dir.buffered() < cap {
                l.edges[from].writable = true;
            }
            return Ok(n);
        }
        if l.gave_up[self.e] {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let dir = &l.dirs[from];
        if dir.rst_arrived {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        if dir.fin_arrived {
            return Ok(0);
        }
        Err(io::ErrorKind::WouldBlock.into())
    }
}

impl End {
    /// Like a socket's `readv`: fills the buffers in order with what has arrived, and answers
    /// as a plain read does when nothing has (so a vectored read proves "drained" exactly as
    /// a kernel's would: by falling short of what it offered).
    fn read_each(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        let mut total = 0;
        for b in bufs.iter_mut().filter(|b| !b.is_empty()) {
            match self.read(b) {
                Ok(n) => {
                    total += n;
                    if n < b.len() {
                        break;
                    }
                }
                Err(_) if total > 0 => break,
                other => return other,
            }
        }
        Ok(total)
    }
}

impl Write for End {
    fn write(&mut self, src: &[u8]) -> io::Result<usize> {
        let mut l = self.link.borrow_mut();
        let cap = l.cap;
        if l.gave_up[self.e] {
            return Err(io::ErrorKind::TimedOut.into());
        }
        if l.dirs[1 - self.e].rst_arrived || l.dirs[self.e].rst_sent {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        let dir = &mut l.dirs[self.e];
        if dir.cut {
            return Ok(src.len());
        }
        if dir.fin_sent {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let room = cap.saturating_sub(dir.buffered());
        if room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = room.min(src.len());
        dir.in_flight.extend(&src[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Pipes: a core side's transport

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PipeState {
    Connecting,
    Open,
    Closed,
}

/// A core side's transport: one end of a link, with the readiness cache and the state a
/// socket backend keeps.
pub struct Pipe {
    side: Side,
    end: End,
    ready: Readiness,
    state: PipeState,
    connect_deadline: Option<Instant>,
    /// Where it connects to (an upstream side).
    to: Option<SocketAddr>,
    reset: Cell<bool>,
    redrive_queued: bool,
}

impl Pipe {
    fn new(side: Side, end: End, state: PipeState) -> Pipe {
        Pipe {
            side,
            end,
            ready: Readiness::default(),
            state,
            connect_deadline: None,
            to: None,
            reset: Cell::new(false),
            redrive_queued: false,
        }
    }
    /// Set to close with a RST.
    pub fn reset_on_close(&self) -> bool {
        self.reset.get()
    }
}

impl Transport for Pipe {
    type Stream = End;
    fn parts(&mut self) -> (Option<&mut End>, &mut Readiness) {
        (Some(&mut self.end), &mut self.ready)
    }
    fn is_connected(&self) -> bool {
        self.state == PipeState::Open
    }
}

/// What the loop runs after a callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Deferred {
    Redrive(Side),
    Close,
}

fn write_path<F: Filter>(bev: &mut BevCore<F, Pipe>, ev: &mut BevEvents) {
    let was_shut = bev.write_shut();
    bev.write_some(ev);
    if bev.write_shut() && !was_shut {
        bev.io().end.shutdown_write();
    }
}

/// `BufferEvent::drive` over a pipe: applies a readiness edge, completes a connect, writes,
/// reads.
fn drive<F: Filter, G: Filter>(
    bev: &mut BevCore<F, Pipe>,
    edge: Ready,
    relay: Option<Relay<'_, G>>,
    deferred: &mut VecDeque<Deferred>,
) -> BevEvents {
    let cache = &mut bev.io_mut().ready;
    if edge.readable || edge.read_closed || edge.error {
        cache.readable = true;
    }
    if edge.read_closed || edge.error {
        cache.peer_closed = true;
    }
    if edge.writable || edge.write_closed || edge.error {
        cache.writable = true;
    }
    let mut ev = BevEvents::empty();
    match bev.io().state {
        PipeState::Closed => {
            if bev.has_error() {
                ev |= BevEvents::ERROR;
            }
            return ev;
        }
        PipeState::Connecting => {
            let r = bev.io().ready;
            if !(r.writable || r.readable || edge.error) {
                return ev;
            }
            match bev.io().end.connect_state() {
                Connect::Accepted => {
                    let io = bev.io_mut();
                    io.state = PipeState::Open;
                    io.connect_deadline = None;
                    bev.unsuspend(Suspend::Connecting);
                    ev |= BevEvents::CONNECTED;
                }
                Connect::Refused => {
                    let io = bev.io_mut();
                    io.state = PipeState::Closed;
                    io.connect_deadline = None;
                    bev.set_error(io::ErrorKind::ConnectionRefused.into());
                    return ev | BevEvents::ERROR;
                }
                Connect::Pending => {
                    let io = bev.io_mut();
                    io.ready.readable = false;
                    io.ready.writable = false;
                    return ev;
                }
            }
        }
        PipeState::Open => {}
    }
    if bev.io().ready.writable {
        write_path(bev, &mut ev);
    }
    let r = bev.io().ready;
    if r.readable && !bev.read_suspended() && !bev.eof_seen() && bev.io().state == PipeState::Open {
        if bev.read_some_via(&mut ev, relay) && !bev.io().redrive_queued {
            bev.io_mut().redrive_queued = true;
            deferred.push_back(Deferred::Redrive(bev.io().side));
        }
        if bev.has_filter_output() && bev.io().ready.writable {
            write_path(bev, &mut ev);
        }
    }
    ev
}

// ---------------------------------------------------------------------------------------------
// Nodes: a core with its Env

/// What a node's `Env` recorded, for tests to assert on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rec {
    Close(CloseReason),
    HandshakeOk {
        forward_secrecy: bool,
    },
    HandshakeTimeout,
    SessionOpened,
    /// The client's PROXY header was refused.
    PreambleFailed(HeaderError),
    PreambleTimeout {
        received: u64,
    },
    FlowPaused(Flow),
    Hibernated {
        dropped_keys: bool,
    },
    Woke,
    LifetimeEnd {
        graceful: bool,
    },
    Reached {
        was_down: bool,
    },
    ConnectFailed {
        outcome: ConnectOutcome,
        went_down: bool,
    },
    Failed {
        side: Side,
        reason: CloseReason,
        cause: &'static str,
    },
    Closed {
        reason: CloseReason,
        asleep: bool,
        bytes: ByteCounts,
    },
    Warm(WarmStep),
    /// An adopted session's socket went back to its dead-peer settings (`Env::confirmed`).
    Confirmed,
    /// A warm session (before its client): ready, ended (how it was lost or failed), closed.
    WarmReady,
    WarmEnded(&'static str),
    WarmClosed(WarmEnd),
}

/// How a layer is built in the harness.
pub trait Build: Layer {
    fn build(role: Role, l: &mut Layers) -> Self;
}

impl Build for NoFilter {
    fn build(_: Role, _: &mut Layers) -> Self {
        NoFilter
    }
}

impl Build for Sealed {
    fn build(role: Role, l: &mut Layers) -> Self {
        l.seed += 1;
        let mut f = SealFilter::with_rng(role, &l.cfg, TestRng::new(l.seed));
        if let Some(n) = l.key_update {
            f.set_key_update_interval(n);
        }
        if role == Role::Initiator {
            f.set_open(l.open);
        }
        f
    }
}

/// What a node's sealed layers are built from.
pub struct Layers {
    cfg: HandshakeConfig,
    seed: u64,
    key_update: Option<u64>,
    open: OpenInfo,
}

/// A node's `Env`: the loop's bookkeeping (timers, deferred work) and what it recorded.
pub struct NodeEnv {
    now: Instant,
    layers: Layers,
    upstreams: Upstreams,
    limits: Limits,
    /// This node's draw of `max_lifetime`'s jitter (`Env::lifetime_jitter`); a test changes
    /// it to give a "successor" (`Node::migrate`) another draw.
    pub jitter: i8,
    connect_timeout: Duration,
    cap: usize,
    timers: [Option<Instant>; 3],
    deferred: VecDeque<Deferred>,
    /// Connects started and not yet answered: the target, and the far end of the link.
    connects: VecDeque<(SocketAddr, End)>,
    pub recs: Vec<Rec>,
    close: Option<CloseReason>,
    /// A timer was armed after the connection decided to close.
    timer_after_close: bool,
    preamble: Vec<u8>,
    /// accept_proxy (the encrypt node): the client's PROXY header is read by `identity`.
    ident: Option<ConnIdentity>,
    /// The OPEN the session carried (the decrypt node).
    pub opened: Option<OpenInfo>,
    /// Bytes carried, as reported by `Action::Bytes`.
    pub bytes: ByteCounts,
    /// Targets whose connect timed out.
    pub timed_out: Vec<SocketAddr>,
    /// The most bytes a side's input held right after one of its reads, by side: what a
    /// read staged there rather than passing straight on (0 for a plain side whose reads
    /// went into the sealed far side's records).
    pub input_peak: [usize; 2],
    /// `Env::hold_unopened` says no (the source is over its cap).
    pub refuse_unopened: bool,
    /// `Env::admit_open` says no (over the tunnel's `conn_rate`).
    pub refuse_open: bool,
    /// `Env::draining`: the node's "process" started to drain ([`World::drain_started`]).
    pub draining: bool,
    /// A warm session's `warm_refresh`.
    warm_refresh: Duration,
}

const TIMERS: [ConnTimer; 3] = [ConnTimer::Idle, ConnTimer::Handshake, ConnTimer::Lifetime];

fn timer_index(t: ConnTimer) -> usize {
    match t {
        ConnTimer::Idle => 0,
        ConnTimer::Handshake => 1,
        ConnTimer::Lifetime => 2,
    }
}

impl NodeEnv {
    /// When the connection's timer `t` is armed for, if it is.
    pub fn timer(&self, t: ConnTimer) -> Option<Instant> {
        self.timers[timer_index(t)]
    }

    fn queue_redrive<F: Filter>(&mut self, bev: &mut BevCore<F, Pipe>) {
        let io = bev.io_mut();
        if !io.redrive_queued {
            io.redrive_queued = true;
            self.deferred.push_back(Deferred::Redrive(io.side));
        }
    }
}

impl<U: Build> Env<U, Pipe> for NodeEnv {
    fn flush<F: Filter>(&mut self, bev: &mut BevCore<F, Pipe>) -> BevEvents {
        let mut ev = BevEvents::empty();
        if bev.io().state == PipeState::Open {
            write_path(bev, &mut ev);
        }
        ev
    }
    fn resume_read<F: Filter>(&mut self, bev: &mut BevCore<F, Pipe>, why: Suspend) {
        if bev.unsuspend(why) && (bev.io().ready.readable || bev.eof_seen()) {
            self.queue_redrive(bev);
        }
    }
    fn consumed<F: Filter>(&mut self, bev: &mut BevCore<F, Pipe>) {
        if bev.input_drained() && (bev.io().ready.readable || bev.eof_seen()) {
            self.queue_redrive(bev);
        }
    }
    fn close_side<F: Filter>(&mut self, bev: &mut BevCore<F, Pipe>) {
        let io = bev.io_mut();
        io.state = PipeState::Closed;
        io.connect_deadline = None;
        // As a socket does: its SO_LINGER 0, if set, makes its close a RST.
        io.end.close(io.reset_on_close());
        bev.clear();
    }
    fn discard_unread(&mut self, io: &mut Pipe) {
        let mut sink = [0u8; 4096];
        for _ in 0..64 {
            match io.end.read(&mut sink) {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        }
    }
    fn reset_on_close(&mut self, io: &Pipe) {
        io.reset.set(true);
    }
    fn upstream_layer(&mut self, client: &Pipe) -> U {
        let mut layer = U::build(Role::Initiator, &mut self.layers);
        if self.ident.is_some() {
            layer.set_open(<Self as Env<U, Pipe>>::session_open(self, client));
        }
        layer
    }
    fn session_open(&mut self, _client: &Pipe) -> OpenInfo {
        match self.ident.as_mut() {
            Some(i) => i.session_open(self.layers.open),
            None => self.layers.open,
        }
    }
    fn hold_unopened(&mut self) -> bool {
        !self.refuse_unopened
    }
    fn admit_open(&mut self) -> bool {
        !self.refuse_open
    }
    fn draining(&self) -> bool {
        self.draining
    }
    fn confirmed(&mut self, _io: &Pipe) {
        self.recs.push(Rec::Confirmed);
    }
    fn connect(&mut self, addr: TargetAddr, layer: U) -> BevCore<U, Pipe> {
        let addr = addr.inet().expect("the harness's targets are IP addresses");
        let link = Link::new(self.cap);
        let mut pipe = Pipe::new(
            Side::Upstream,
            End {
                link: link.clone(),
                e: 0,
            },
            PipeState::Connecting,
        );
        pipe.connect_deadline = Some(self.now + self.connect_timeout);
        pipe.to = Some(addr);
        self.connects.push_back((addr, End { link, e: 1 }));
        let mut bev = BevCore::with_io(pipe, layer, !U::SEALED);
        bev.suspend_read(Suspend::Connecting);
        bev
    }
    fn upstream_preamble(&mut self, _open: &OpenInfo, output: &mut Buffer) {
        output.append(&self.preamble);
    }
    fn client_preamble(&mut self, input: &mut Buffer, eof: bool) -> Preamble {
        let Some(i) = self.ident.as_mut().filter(|i| i.awaiting_header()) else {
            return Preamble::Done;
        };
        match i.read_header(input, eof) {
            HeaderStep::Wait => Preamble::Wait {
                limit: identity::MAX_HEADER_LEN,
            },
            HeaderStep::Ready => Preamble::Done,
            HeaderStep::Failed(e) => {
                self.recs.push(Rec::PreambleFailed(e));
                Preamble::Failed
            }
        }
    }
    fn upstreams(&mut self) -> &mut Upstreams {
        &mut self.upstreams
    }
    fn limits(&self) -> Limits {
        self.limits
    }
    fn lifetime_jitter(&mut self) -> i8 {
        self.jitter
    }
    fn act(&mut self, action: Action<'_, Pipe>) {
        let rec = match action {
            Action::Timer(which, at) => {
                if at.is_some() && self.close.is_some() {
                    self.timer_after_close = true;
                }
                self.timers[timer_index(which)] = at;
                let [_, handshake, lifetime] = self.timers;
                assert!(
                    handshake.is_none() || lifetime.is_none(),
                    "the handshake's and the lifetime's timers armed at once (the adapter keeps them in one slot)"
                );
                return;
            }
            Action::Bytes(delta) => {
                self.bytes.add(&delta);
                return;
            }
            Action::Close(reason) => {
                assert!(self.close.is_none(), "closed twice");
                self.close = Some(reason);
                self.deferred.push_back(Deferred::Close);
                Rec::Close(reason)
            }
            Action::HandshakeOk {
                forward_secrecy, ..
            } => Rec::HandshakeOk { forward_secrecy },
            Action::HandshakeTimeout => Rec::HandshakeTimeout,
            Action::PreambleTimeout { received } => Rec::PreambleTimeout { received },
            Action::SessionOpened(open) => {
                self.opened = Some(*open);
                Rec::SessionOpened
            }
            Action::Warm(step) => Rec::Warm(step),
            Action::FlowPaused(f) => Rec::FlowPaused(f),
            Action::Hibernated { dropped_keys } => Rec::Hibernated { dropped_keys },
            Action::Woke => Rec::Woke,
            Action::LifetimeEnd { graceful } => Rec::LifetimeEnd { graceful },
            Action::UpstreamReached { was_down, .. } => Rec::Reached { was_down },
            Action::ConnectFailed {
                outcome, went_down, ..
            } => Rec::ConnectFailed { outcome, went_down },
            Action::Failed(f) => Rec::Failed {
                side: f.side,
                reason: f.reason,
                cause: match f.cause {
                    Cause::PeerAbort(_) => "abort",
                    Cause::Protocol(_) => "protocol",
                    Cause::Io(_) => "io",
                },
            },
            Action::Closed {
                reason,
                asleep,
                bytes,
                ..
            } => Rec::Closed {
                reason,
                asleep,
                bytes,
            },
        };
        self.recs.push(rec);
    }
}

/// A warm session's `Env` is its node's: the same loop bookkeeping and targets, handed to the
/// connection that adopts it.
impl WarmEnv<Sealed, Pipe> for NodeEnv {
    fn flush(&mut self, bev: &mut BevCore<Sealed, Pipe>) -> BevEvents {
        <Self as Env<Sealed, Pipe>>::flush(self, bev)
    }
    fn discard_unread(&mut self, io: &mut Pipe) {
        <Self as Env<Sealed, Pipe>>::discard_unread(self, io);
    }
    fn upstreams(&mut self) -> &mut Upstreams {
        &mut self.upstreams
    }
    fn handshake_timeout(&self) -> Duration {
        self.limits.handshake
    }
    fn refresh_at(&mut self, now: Instant) -> Instant {
        now + self.warm_refresh
    }
    fn act(&mut self, action: WarmAction<'_>) {
        let rec = match action {
            WarmAction::Timer(at) => {
                self.timers[0] = at;
                return;
            }
            WarmAction::Reached { was_down, .. } => Rec::Reached { was_down },
            WarmAction::ConnectFailed {
                outcome, went_down, ..
            } => Rec::ConnectFailed { outcome, went_down },
            WarmAction::Ready { .. } => Rec::WarmReady,
            WarmAction::Ended(cause) => Rec::WarmEnded(match cause {
                WarmCause::Abort(a) => a.as_str(),
                WarmCause::Error(_) => "error",
                WarmCause::Ended => "ended",
                WarmCause::Timeout => "timeout",
            }),
            WarmAction::Close(end) => {
                self.deferred.push_back(Deferred::Close);
                Rec::WarmClosed(end)
            }
        };
        self.recs.push(rec);
    }
}

/// An encrypt side's warm session before its client, run as the loop runs its handler.
pub struct WarmNode {
    pub core: WarmCore<Sealed, Pipe>,
    pub env: NodeEnv,
    pub closed: bool,
}

impl WarmNode {
    /// `Handler::on_ready` for its stream, if it has a pending edge. True if it had.
    fn dispatch(&mut self, now: Instant) -> bool {
        if self.closed {
            return false;
        }
        let edge = self.core.stream().io().end.take_edge();
        if no_edge(edge) {
            return false;
        }
        self.env.now = now;
        let ev = drive(
            self.core.stream_mut(),
            edge,
            None::<Relay<'_, Sealed>>,
            &mut self.env.deferred,
        );
        self.core.handle(ev, now, &mut self.env);
        self.run_deferred(now);
        true
    }

    fn run_deferred(&mut self, now: Instant) {
        while let Some(d) = self.env.deferred.pop_front() {
            if self.closed {
                continue;
            }
            match d {
                Deferred::Redrive(_) => {
                    let up = self.core.stream_mut();
                    up.io_mut().redrive_queued = false;
                    let ev = drive(
                        up,
                        Ready::default(),
                        None::<Relay<'_, Sealed>>,
                        &mut self.env.deferred,
                    );
                    self.core.handle(ev, now, &mut self.env);
                }
                Deferred::Close => {
                    self.closed = true;
                    self.env.timers = [None; 3];
                    let p = self.core.stream().io();
                    if p.state != PipeState::Closed {
                        p.end.close(p.reset_on_close());
                    }
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        let up = self.core.stream().io();
        let connect = (up.state == PipeState::Connecting)
            .then_some(up.connect_deadline)
            .flatten();
        self.env.timers[0].into_iter().chain(connect).min()
    }

    fn fire_due(&mut self, now: Instant) -> bool {
        let Some(at) = self.next_deadline().filter(|&t| t <= now) else {
            return false;
        };
        self.env.now = now;
        if self.env.timers[0] == Some(at) {
            self.env.timers[0] = None;
            self.core.on_timer(now, &mut self.env);
        } else {
            let up = self.core.stream_mut();
            let io = up.io_mut();
            io.connect_deadline = None;
            io.state = PipeState::Closed;
            up.set_error(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
            self.core
                .handle(BevEvents::CONNECT_TIMEOUT, now, &mut self.env);
        }
        self.run_deferred(now);
        true
    }
}

/// A core and its `Env`, run as the loop runs a handler.
pub struct Node<C: Build, U: Build> {
    pub core: ConnCore<C, U, Pipe>,
    pub env: NodeEnv,
    /// Its `on_close` ran.
    pub closed: bool,
}

impl<C: Build, U: Build> Node<C, U> {
    fn pipe(&self, side: Side) -> Option<&Pipe> {
        match side {
            Side::Client => Some(self.core.client().io()),
            Side::Upstream => self.core.upstream().map(|u| u.io()),
        }
    }

    /// `Handler::on_ready` for a side with a pending edge. True if there was one.
    fn dispatch(&mut self, side: Side, now: Instant) -> bool {
        if self.closed {
            return false;
        }
        let Some(pipe) = self.pipe(side) else {
            return false;
        };
        let edge = pipe.end.take_edge();
        if no_edge(edge) {
            return false;
        }
        self.env.now = now;
        self.core.activity(now, &mut self.env);
        let ev = match side {
            Side::Client => {
                let (c, relay) = self.core.client_reader();
                drive(c, edge, relay, &mut self.env.deferred)
            }
            Side::Upstream => match self.core.upstream_reader() {
                Some((up, relay)) => drive(up, edge, relay, &mut self.env.deferred),
                None => return true,
            },
        };
        self.note_input(side);
        self.core.handle(side, ev, now, &mut self.env);
        self.run_deferred(now);
        true
    }

    /// Records what a read left in `side`'s input ([`NodeEnv::input_peak`]).
    fn note_input(&mut self, side: Side) {
        let held = match side {
            Side::Client => self.core.client().input.len(),
            Side::Upstream => self.core.upstream().map_or(0, |u| u.input.len()),
        };
        let peak = &mut self.env.input_peak[side as usize];
        *peak = (*peak).max(held);
    }

    /// The loop's deferred queue, drained after every callback.
    fn run_deferred(&mut self, now: Instant) {
        for _ in 0..65_536 {
            let Some(d) = self.env.deferred.pop_front() else {
                return;
            };
            if self.closed {
                continue;
            }
            match d {
                Deferred::Redrive(side) => {
                    let ev = match side {
                        Side::Client => {
                            let (c, relay) = self.core.client_reader();
                            c.io_mut().redrive_queued = false;
                            drive(c, Ready::default(), relay, &mut self.env.deferred)
                        }
                        Side::Upstream => match self.core.upstream_reader() {
                            Some((up, relay)) => {
                                up.io_mut().redrive_queued = false;
                                drive(up, Ready::default(), relay, &mut self.env.deferred)
                            }
                            None => continue,
                        },
                    };
                    self.note_input(side);
                    self.core.handle(side, ev, now, &mut self.env);
                }
                Deferred::Close => self.on_close(now),
            }
        }
        panic!("the deferred queue never drains");
    }

    /// `Handler::on_close`: the core's end, then its transports close (a RST where it asked
    /// for one).
    fn on_close(&mut self, now: Instant) {
        self.env.now = now;
        self.core.on_close(now, &mut self.env);
        self.env.timers = [None; 3];
        self.closed = true;
        for side in [Side::Client, Side::Upstream] {
            if let Some(p) = self.pipe(side) {
                if p.state != PipeState::Closed {
                    p.end.close(p.reset_on_close());
                }
            }
        }
    }

    /// The earliest deadline this node waits for: a timer, or a connect's timeout.
    fn next_deadline(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        let connect = self
            .core
            .upstream()
            .filter(|u| u.io().state == PipeState::Connecting)
            .and_then(|u| u.io().connect_deadline);
        self.env
            .timers
            .iter()
            .flatten()
            .copied()
            .chain(connect)
            .min()
    }

    /// Fires the earliest deadline if it is due. True if one fired.
    fn fire_due(&mut self, now: Instant) -> bool {
        let Some(at) = self.next_deadline().filter(|&t| t <= now) else {
            return false;
        };
        self.env.now = now;
        if let Some(i) = self.env.timers.iter().position(|&t| t == Some(at)) {
            self.env.timers[i] = None;
            self.core.on_timer(TIMERS[i], now, &mut self.env);
        } else if let Some(up) = self.core.upstream_mut() {
            // The socket's connect timer.
            let io = up.io_mut();
            io.connect_deadline = None;
            io.state = PipeState::Closed;
            self.env.timed_out.extend(io.to);
            up.set_error(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
            self.core.handle(
                Side::Upstream,
                BevEvents::CONNECT_TIMEOUT,
                now,
                &mut self.env,
            );
        }
        self.run_deferred(now);
        true
    }

    /// Bytes this connection buffers now (input and output of both sides, through the filter).
    pub fn buffered(&self) -> usize {
        let c = self.core.client();
        let mut n = c.input_pending() + c.output_pending();
        if let Some(u) = self.core.upstream() {
            n += u.input_pending() + u.output_pending();
        }
        n
    }

    /// The reason it closed, once `on_close` ran.
    pub fn reason(&self) -> Option<CloseReason> {
        self.closed.then(|| self.core.closed()).flatten()
    }

    /// Whether the transport of `side` was set to close with a RST (true if there is none).
    pub fn reset(&self, side: Side) -> bool {
        self.pipe(side).is_none_or(|p| p.reset_on_close())
    }

    /// The tunnel's targets as this node sees them.
    pub fn upstreams(&self) -> &Upstreams {
        &self.env.upstreams
    }

    pub fn recorded(&self, r: &Rec) -> bool {
        self.env.recs.contains(r)
    }

    /// A reload changed the tunnel's limits (`ConnCore::limits_changed`).
    pub fn set_limits(&mut self, limits: Limits, now: Instant) {
        if self.closed {
            return;
        }
        self.env.limits = limits;
        self.env.now = now;
        self.core.limits_changed(now, &mut self.env);
        self.run_deferred(now);
    }

    fn start(&mut self, now: Instant) {
        self.env.now = now;
        self.core.start(now, &mut self.env);
        self.run_deferred(now);
    }
}

// ---------------------------------------------------------------------------------------------
// Peers: the plaintext client and backend

/// A plaintext application: sends `data` as told, reads what comes.
pub struct Peer {
    end: End,
    pub data: Vec<u8>,
    pub sent: usize,
    /// It shut down its write side (after `data[..sent]`).
    pub shut: bool,
    pub got: Vec<u8>,
    /// It read a clean end of stream.
    pub eof: bool,
    /// It saw a reset.
    pub reset: bool,
    /// It reset the connection itself.
    pub aborted: bool,
    pub closed: bool,
}

impl Peer {
    fn new(end: End, data: Vec<u8>) -> Peer {
        Peer {
            end,
            data,
            sent: 0,
            shut: false,
            got: Vec::new(),
            eof: false,
            reset: false,
            aborted: false,
            closed: false,
        }
    }

    fn live(&self) -> bool {
        !self.closed && !self.reset
    }

    /// Writes up to `n` more bytes of `data`. True if any went.
    fn write(&mut self, n: usize) -> bool {
        if !self.live() || self.shut {
            return false;
        }
        let end = self.sent.saturating_add(n).min(self.data.len());
        let mut progress = false;
        while self.sent < end {
            match self.end.write(&self.data[self.sent..end]) {
                Ok(k) => {
                    self.sent += k;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.reset = true;
                    return true;
                }
            }
        }
        progress
    }

    /// Reads everything that arrived. True if anything did.
    fn read(&mut self) -> bool {
        if self.closed || self.eof || self.reset {
            return false;
        }
        let mut buf = [0u8; 16 * 1024];
        let mut progress = false;
        loop {
            match self.end.read(&mut buf) {
                Ok(0) => {
                    self.eof = true;
                    return true;
                }
                Ok(n) => {
                    self.got.extend_from_slice(&buf[..n]);
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return progress,
                Err(_) => {
                    self.reset = true;
                    return true;
                }
            }
        }
    }

    fn shut(&mut self) -> bool {
        if !self.live() || self.shut {
            return false;
        }
        self.shut = true;
        self.end.shutdown_write();
        true
    }

    fn abort(&mut self) -> bool {
        if self.closed {
            return false;
        }
        self.aborted = true;
        self.closed = true;
        self.end.close(true);
        true
    }

    /// Closes once both directions are done.
    fn close_if_done(&mut self) -> bool {
        if self.closed || !(self.shut && (self.eof || self.reset)) {
            return false;
        }
        self.closed = true;
        self.end.close(false);
        true
    }

    /// Ended: its reads saw an end (clean or not) or it aborted.
    pub fn ended(&self) -> bool {
        self.eof || self.reset || self.aborted
    }
}

// ---------------------------------------------------------------------------------------------
// The world

/// What answers at a target address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Nothing listens: the connect is refused.
    Refused,
    /// Nothing answers: only the connect timeout ends it.
    Blackhole,
    /// The decrypt side.
    Decrypt,
    /// The backend.
    Backend,
}

/// A world's settings.
#[derive(Clone, Debug)]
pub struct Opts {
    pub enc_targets: Vec<Kind>,
    pub dec_targets: Vec<Kind>,
    pub limits: Limits,
    /// The decrypt node's limits, if not `limits`.
    pub dec_limits: Option<Limits>,
    /// Each node's draw of `max_lifetime`'s jitter (encrypt, decrypt), in thousandths.
    pub jitter: [i8; 2],
    pub connect_timeout: Duration,
    pub fs: ForwardSecrecy,
    pub aead: AeadKind,
    pub key_update: Option<u64>,
    /// Bytes a link buffers per direction.
    pub cap: usize,
    pub client_data: Vec<u8>,
    pub backend_data: Vec<u8>,
    /// Bytes the decrypt side sends its backend first (the PROXY header hook).
    pub preamble: Vec<u8>,
    /// accept_proxy: the encrypt side expects a PROXY header, which the client sends ahead of
    /// `client_data` (these bytes, valid or not); none if empty.
    pub client_header: Vec<u8>,
    /// A warm session's refresh interval ([`World::warm`]).
    pub warm_refresh: Duration,
}

/// `n` bytes of a stream that shows any reordering, loss or duplication.
pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
        .collect()
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            enc_targets: vec![Kind::Decrypt],
            dec_targets: vec![Kind::Backend],
            limits: Limits {
                idle: Some(Duration::from_secs(3600)),
                half_closed: Some(Duration::from_secs(3600)),
                handshake: Duration::from_secs(3600),
                unopened: Duration::from_secs(60),
                lifetime: None,
            },
            dec_limits: None,
            jitter: [0, 0],
            connect_timeout: Duration::from_secs(3),
            fs: ForwardSecrecy::Require,
            aead: AeadKind::Ring,
            key_update: None,
            cap: 64 * 1024,
            client_data: pattern(3000, 1),
            backend_data: pattern(5000, 2),
            preamble: Vec::new(),
            client_header: Vec::new(),
            warm_refresh: Duration::from_secs(25),
        }
    }
}

fn addr(node: u8, i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, node, i as u8 + 1], 4000))
}

/// An encrypt core and a decrypt core between a plaintext client and backend.
pub struct World {
    pub now: Instant,
    /// When the world began: the encrypt node's connection was accepted then.
    pub started: Instant,
    pub opts: Opts,
    pub enc: Node<NoFilter, Sealed>,
    pub dec: Option<Node<Sealed, NoFilter>>,
    pub client: Peer,
    pub backend: Option<Peer>,
    /// Every link, in the order made: the client's, then each connect's.
    links: Vec<LinkRef>,
    /// The link between the encrypt and the decrypt core, once made.
    wire: Option<LinkRef>,
    /// Faults injected (resets, tampering, cuts, drains).
    pub faults: u32,
    /// The decrypt node's `Env`, until a connect reaches it.
    dec_env: Option<NodeEnv>,
    /// A second decrypt node's `Env`: a connect that comes once the first decrypt node has
    /// closed (a warm session's client sent again on a fresh session) reaches it.
    dec_spare: Option<NodeEnv>,
    /// The first decrypt node, once a second replaced it.
    pub dec_old: Option<Node<Sealed, NoFilter>>,
    /// A warm world's session before its client ([`World::warm`]); the encrypt node is a
    /// closed stand-in until [`World::adopt`].
    pub warm: Option<WarmNode>,
    /// A warm world's client end, until it is accepted ([`World::adopt`]).
    pending_client: Option<End>,
}

/// One step of a schedule.
#[derive(Clone, Debug)]
pub enum Step {
    /// Up to `max` bytes (and then the FIN or RST behind them) of a link's direction arrive.
    Deliver {
        link: u8,
        dir: u8,
        max: u16,
    },
    /// A core side's pending readiness is dispatched (node 0: encrypt, 1: decrypt).
    Ready {
        node: u8,
        side: u8,
    },
    /// The oldest unanswered connect is answered (refused, accepted, or left unanswered).
    Establish,
    ClientWrite(u32),
    ClientRead,
    ClientShut,
    BackendWrite(u32),
    BackendRead,
    BackendShut,
    /// Time passes; due timers fire in deadline order.
    Advance(u16),
    /// The network runs until it quiesces (`World::net`).
    Net,
    /// The client (or the backend) writes and the network runs until its writes stall or
    /// its data is all sent; the far peer reads nothing meanwhile.
    Flood {
        client: bool,
    },
    /// Faults.
    ClientReset,
    BackendReset,
    Tamper {
        dir: u8,
        at: u16,
    },
    Cut,
    Drain {
        node: u8,
    },
    /// The decrypt side starts to drain (its unopened sessions close).
    DrainStart,
}

impl World {
    pub fn new(opts: Opts) -> World {
        World::build(opts, false)
    }

    /// A world whose encrypt side first makes a warm session to its first target (connect,
    /// handshake, OPEN held: run [`World::net`] to get it ready); its client is accepted and
    /// takes it at [`World::adopt`]. Until then the encrypt node is a closed stand-in, and the
    /// client may already send (its bytes wait in its link).
    pub fn warm(opts: Opts) -> World {
        World::build(opts, true)
    }

    fn build(opts: Opts, warm: bool) -> World {
        let now = Instant::now();
        let keys = Arc::new(KeySet::new(Key::from_bytes([7; 32]), vec![]));
        let cfg = HandshakeConfig {
            keys,
            forward_secrecy: opts.fs,
            aead: opts.aead,
        };
        let open = OpenInfo::from_socket(
            "192.0.2.10:5555".parse().expect("literal"),
            "192.0.2.1:80".parse().expect("literal"),
        );
        let env = |node: u8, targets: &[Kind], seed: u64| {
            let addrs: Vec<SocketAddr> = (0..targets.len()).map(|i| addr(node, i)).collect();
            NodeEnv {
                now,
                layers: Layers {
                    cfg: cfg.clone(),
                    seed,
                    key_update: opts.key_update,
                    open,
                },
                upstreams: Upstreams::new(&addrs, Balance::RoundRobin),
                limits: match node {
                    0 => opts.limits,
                    _ => opts.dec_limits.unwrap_or(opts.limits),
                },
                jitter: opts.jitter[usize::from(node)],
                connect_timeout: opts.connect_timeout,
                cap: opts.cap,
                timers: [None; 3],
                deferred: VecDeque::new(),
                connects: VecDeque::new(),
                recs: Vec::new(),
                close: None,
                timer_after_close: false,
                preamble: Vec::new(),
                ident: None,
                opened: None,
                bytes: ByteCounts::default(),
                timed_out: Vec::new(),
                input_peak: [0; 2],
                refuse_unopened: false,
                refuse_open: false,
                draining: false,
                warm_refresh: opts.warm_refresh,
            }
        };
        let link = Link::new(opts.cap);
        link.borrow_mut().connect = Connect::Accepted;
        let client = Peer::new(
            End {
                link: link.clone(),
                e: 0,
            },
            [&opts.client_header[..], &opts.client_data].concat(),
        );
        let end = End {
            link: link.clone(),
            e: 1,
        };
        end.add_edge(Ready {
            writable: true,
            ..Ready::default()
        });
        let pipe = Pipe::new(Side::Client, end, PipeState::Open);
        let mut enc_env = env(0, &opts.enc_targets, 1000);
        if !opts.client_header.is_empty() {
            let accept_proxy = Identity {
                trusted_proxies: Some(CidrList::parse(&["0.0.0.0/0"]).expect("literal")),
                ..Identity::default()
            };
            let peer = open.addrs.map(|a| a.source);
            enc_env.ident = ConnIdentity::for_tunnel(&accept_proxy, || peer).map(|b| *b);
        }
        let (enc, warm, pending_client) = if warm {
            // The warm session: a sealed initiator to the first target, its OPEN held.
            let t = &enc_env.upstreams.targets()[0];
            let (target, to) = (t.id(), t.addr);
            let mut layer = Sealed::build(Role::Initiator, &mut enc_env.layers);
            layer.hold_open();
            let bev = <NodeEnv as Env<Sealed, Pipe>>::connect(&mut enc_env, to, layer);
            let mut node = WarmNode {
                core: WarmCore::new(bev, target, now),
                env: enc_env,
                closed: false,
            };
            node.core.start(now, &mut node.env);
            // The encrypt node until the client is accepted: closed, on a link of its own.
            let stand_in = Pipe::new(
                Side::Client,
                End {
                    link: Link::new(1),
                    e: 1,
                },
                PipeState::Open,
            );
            let enc = Node {
                core: ConnCore::new(BevCore::with_io(stand_in, NoFilter, true), now),
                env: env(0, &opts.enc_targets, 1000),
                closed: true,
            };
            (enc, Some(node), Some(pipe.end))
        } else {
            let enc = Node {
                core: ConnCore::new(BevCore::with_io(pipe, NoFilter, true), now),
                env: enc_env,
                closed: false,
            };
            (enc, None, None)
        };
        let mut dec_env = env(1, &opts.dec_targets, 2000);
        dec_env.preamble = opts.preamble.clone();
        let mut dec_spare = env(1, &opts.dec_targets, 3000);
        dec_spare.preamble = opts.preamble.clone();
        let mut w = World {
            now,
            started: now,
            enc,
            dec: None,
            client,
            backend: None,
            links: vec![link],
            wire: None,
            faults: 0,
            dec_env: Some(dec_env),
            dec_spare: Some(dec_spare),
            dec_old: None,
            warm,
            pending_client,
            opts,
        };
        if w.warm.is_none() {
            w.enc.start(now);
        }
        w
    }

    /// A warm world's client is accepted and takes the ready warm session (the balance
    /// names its target, as the listener's choice would).
    pub fn adopt(&mut self) {
        let mut warm = self.warm.take().expect("a warm world");
        assert!(warm.core.is_ready(), "the warm session is not ready");
        let now = self.now;
        let (bev, target) = warm.core.into_parts(&mut warm.env);
        let mut tried = Tried::default();
        let picked = warm.env.upstreams.pick(now, &mut tried).map(|p| p.0);
        assert_eq!(
            picked,
            Some(target),
            "the balance names the warm session's target"
        );
        let end = self
            .pending_client
            .take()
            .expect("the client is not accepted yet");
        let pipe = Pipe::new(Side::Client, end, PipeState::Open);
        self.enc = Node {
            core: ConnCore::adopt(
                BevCore::with_io(pipe, NoFilter, true),
                bev,
                target,
                tried,
                now,
            ),
            env: warm.env,
            closed: false,
        };
        self.enc.start(now);
    }

    /// Answers the oldest unanswered connect of either core. True if there was one.
    pub fn establish(&mut self) -> bool {
        let warm = self.warm.as_mut().and_then(|w| w.env.connects.pop_front());
        if let Some((to, end)) = warm {
            let kind = self.opts.enc_targets[target_index(to)];
            self.answer(kind, end);
            return true;
        }
        if let Some((to, end)) = self.enc.env.connects.pop_front() {
            let kind = self.opts.enc_targets[target_index(to)];
            self.answer(kind, end);
            return true;
        }
        if let Some(dec) = self.dec.as_mut() {
            if let Some((to, end)) = dec.env.connects.pop_front() {
                let kind = self.opts.dec_targets[target_index(to)];
                self.answer(kind, end);
                return true;
            }
        }
        false
    }

    fn answer(&mut self, kind: Kind, end: End) {
        let link = end.link.clone();
        if link.borrow().closed[0] {
            // The connecting side gave up before the answer came.
            return;
        }
        let connector = End {
            link: link.clone(),
            e: 0,
        };
        let accepted = match kind {
            Kind::Blackhole => return,
            Kind::Refused => false,
            // One decrypt side per world: a second connect to it is refused.
            Kind::Decrypt => {
                let replace = self.dec.as_ref().is_some_and(|d| d.closed);
                if self.dec_env.is_none() && replace && self.dec_spare.is_some() {
                    self.dec_env = self.dec_spare.take();
                    self.dec_old = self.dec.take();
                }
                self.dec_env.is_some()
            }
            Kind::Backend => true,
        };
        if !accepted {
            link.borrow_mut().connect = Connect::Refused;
            connector.add_edge(Ready {
                error: true,
                ..Ready::default()
            });
            return;
        }
        link.borrow_mut().connect = Connect::Accepted;
        connector.add_edge(Ready {
            writable: true,
            ..Ready::default()
        });
        end.add_edge(Ready {
            writable: true,
            ..Ready::default()
        });
        self.links.push(link.clone());
        if kind == Kind::Backend {
            if let Some(prev) = &self.backend {
                // Only a client's bytes sent again on a fresh session make a second backend
                // connection, and only if none reached the first: anything there was sent
                // twice.
                let l = prev.end.link.borrow();
                let pending = l.dirs[0].in_flight.len() + l.dirs[0].arrived.len();
                assert!(
                    prev.got.is_empty() && pending == 0,
                    "a second backend connection after the first got bytes: sent twice"
                );
            }
            self.backend = Some(Peer::new(end, self.opts.backend_data.clone()));
            return;
        }
        let mut env = self.dec_env.take().expect("checked above");
        let filter = Sealed::build(Role::Responder, &mut env.layers);
        let pipe = Pipe::new(Side::Client, end, PipeState::Open);
        let mut node = Node {
            core: ConnCore::new(BevCore::with_io(pipe, filter, false), self.now),
            env,
            closed: false,
        };
        node.start(self.now);
        self.wire = Some(link);
        self.dec = Some(node);
    }

    /// Answers the oldest unanswered connect of the encrypt side (`node` 0: its warm session's
    /// or its connection's) or of the decrypt side (1). True if there was one.
    pub fn establish_from(&mut self, node: usize) -> bool {
        let pending = if node == 0 {
            let warm = self.warm.as_mut().and_then(|w| w.env.connects.pop_front());
            warm.or_else(|| self.enc.env.connects.pop_front())
                .map(|(to, end)| (self.opts.enc_targets[target_index(to)], end))
        } else {
            let dec = self.dec.as_mut().and_then(|d| d.env.connects.pop_front());
            dec.map(|(to, end)| (self.opts.dec_targets[target_index(to)], end))
        };
        match pending {
            Some((kind, end)) => {
                self.answer(kind, end);
                true
            }
            None => false,
        }
    }

    /// Everything in flight on the wire between the encrypt and the decrypt side arrives
    /// (both directions). True if anything did.
    pub fn deliver_wire(&mut self) -> bool {
        let Some(wire) = self.wire.clone() else {
            return false;
        };
        let mut l = wire.borrow_mut();
        let a = l.deliver(0, usize::MAX);
        let b = l.deliver(1, usize::MAX);
        a || b
    }

    /// Everything in flight on every link but the wire arrives. True if anything did.
    pub fn deliver_local(&mut self) -> bool {
        let mut progress = false;
        for l in &self.links {
            if self.wire.as_ref().is_some_and(|w| Rc::ptr_eq(w, l)) {
                continue;
            }
            for d in 0..2 {
                progress |= l.borrow_mut().deliver(d, usize::MAX);
            }
        }
        progress
    }

    /// Up to `max` bytes of direction `dir` of link `link` (both taken modulo what exists)
    /// arrive. True if anything did.
    pub fn deliver(&mut self, link: usize, dir: usize, max: usize) -> bool {
        let l = &self.links[link % self.links.len()];
        l.borrow_mut().deliver(dir % 2, max)
    }

    /// Everything in flight on every link arrives.
    pub fn deliver_all(&mut self) -> bool {
        let mut progress = false;
        for l in &self.links {
            for d in 0..2 {
                progress |= l.borrow_mut().deliver(d, usize::MAX);
            }
        }
        progress
    }

    /// Dispatches the pending readiness of one core side. True if there was some.
    pub fn ready(&mut self, node: usize, side: Side) -> bool {
        let now = self.now;
        match node % 2 {
            0 => self.enc.dispatch(side, now),
            _ => self.dec.as_mut().is_some_and(|d| d.dispatch(side, now)),
        }
    }

    /// Dispatches every pending readiness, encrypt side first. True if there was some.
    pub fn ready_all(&mut self) -> bool {
        let now = self.now;
        let mut progress = self.warm.as_mut().is_some_and(|w| w.dispatch(now));
        for node in 0..2 {
            for side in [Side::Client, Side::Upstream] {
                progress |= self.ready(node, side);
            }
        }
        progress
    }

    /// Runs the network without the peers: answers connects, delivers everything, dispatches
    /// every readiness, until nothing moves.
    pub fn net(&mut self) {
        for _ in 0..10_000 {
            let mut progress = false;
            while self.establish() {
                progress = true;
            }
            progress |= self.deliver_all();
            progress |= self.ready_all();
            if !progress {
                return;
            }
        }
        panic!("the network never quiesces");
    }

    /// The wire's bytes in flight in direction `dir` (0: encrypt to decrypt).
    pub fn wire_in_flight(&self, dir: usize) -> Vec<u8> {
        self.wire
            .as_ref()
            .map(|l| l.borrow().dirs[dir].in_flight.iter().copied().collect())
            .unwrap_or_default()
    }

    /// A middlebox on the wire forwards the first `keep` bytes in flight in direction `dir`,
    /// then dies (see `Link::cut`).
    pub fn cut_after(&mut self, dir: usize, keep: usize) {
        if let Some(wire) = &self.wire {
            let mut l = wire.borrow_mut();
            l.deliver(dir, keep);
            l.cut();
        }
    }

    /// Time passes: deadlines that come due fire in order, each at its own instant.
    pub fn advance(&mut self, d: Duration) {
        let until = self.now + d;
        loop {
            let next = self.next_deadline().filter(|&t| t <= until);
            let Some(at) = next else {
                break;
            };
            self.now = self.now.max(at);
            let now = self.now;
            if self.warm.as_mut().is_some_and(|w| w.fire_due(now)) {
                continue;
            }
            if !self.enc.fire_due(now) {
                if let Some(dec) = self.dec.as_mut() {
                    dec.fire_due(now);
                }
            }
        }
        self.now = until;
    }

    /// The earliest deadline any core waits for.
    pub fn next_deadline(&self) -> Option<Instant> {
        [
            self.enc.next_deadline(),
            self.dec.as_ref().and_then(|n| n.next_deadline()),
            self.warm.as_ref().and_then(|w| w.next_deadline()),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Flips a bit of what the wire carries in direction `dir` (0: encrypt to decrypt) and
    /// the receiver has not read yet. True if there was a byte to flip.
    pub fn tamper(&mut self, dir: usize, at: usize) -> bool {
        let Some(wire) = &self.wire else {
            return false;
        };
        let mut l = wire.borrow_mut();
        let d = &mut l.dirs[dir % 2];
        let n = d.arrived.len() + d.in_flight.len();
        if n == 0 {
            return false;
        }
        let i = at % n;
        match d.arrived.get_mut(i) {
            Some(b) => *b ^= 0x10,
            None => d.in_flight[i - d.arrived.len()] ^= 0x10,
        }
        true
    }

    /// A middlebox on the wire dies (see `Link::cut`). True if there was a wire.
    pub fn cut(&mut self) -> bool {
        let Some(wire) = &self.wire else {
            return false;
        };
        wire.borrow_mut().cut();
        true
    }

    /// The client vanished without a FIN or a RST, and the encrypt side's kernel gave up on
    /// it (keepalive or TCP_USER_TIMEOUT): its socket reports ETIMEDOUT.
    pub fn client_vanishes(&mut self) {
        let link = &self.links[0];
        let mut l = link.borrow_mut();
        l.gave_up[1] = true;
        l.dirs[0].cut = true;
        edge_or(
            &mut l.edges[1],
            Ready {
                readable: true,
                error: true,
                ..Ready::default()
            },
        );
    }

    pub fn client_write(&mut self, n: usize) -> bool {
        self.client.write(n)
    }
    pub fn client_read(&mut self) -> bool {
        self.client.read()
    }
    pub fn client_shut(&mut self) -> bool {
        self.client.shut()
    }
    pub fn backend_write(&mut self, n: usize) -> bool {
        self.backend.as_mut().is_some_and(|b| b.write(n))
    }
    pub fn backend_read(&mut self) -> bool {
        self.backend.as_mut().is_some_and(|b| b.read())
    }
    pub fn client_reset(&mut self) -> bool {
        self.client.abort()
    }
    pub fn backend_reset(&mut self) -> bool {
        self.backend.as_mut().is_some_and(|b| b.abort())
    }
    pub fn backend_shut(&mut self) -> bool {
        self.backend.as_mut().is_some_and(|b| b.shut())
    }

    /// The decrypt side refuses to hold unopened sessions (its source is over its cap).
    pub fn refuse_unopened(&mut self) {
        for e in self.dec_env.iter_mut().chain(self.dec_spare.iter_mut()) {
            e.refuse_unopened = true;
        }
    }

    /// The decrypt side starts to drain: an unopened (warm) session of it closes now, and one
    /// whose handshake completes later is not held. True if it had an open core.
    pub fn drain_started(&mut self) -> bool {
        let now = self.now;
        let Some(d) = self.dec.as_mut().filter(|d| !d.closed) else {
            return false;
        };
        d.env.now = now;
        d.env.draining = true;
        d.core.drain_started(&mut d.env);
        d.run_deferred(now);
        true
    }

    /// The decrypt host vanished without a word: what the encrypt side sends on the wire is
    /// lost from now on, nothing comes back; once its kernel gives up (TCP_USER_TIMEOUT),
    /// its socket reports ETIMEDOUT. True if there was a wire.
    pub fn decrypt_vanishes(&mut self) -> bool {
        let Some(wire) = self.wire.clone() else {
            return false;
        };
        let mut l = wire.borrow_mut();
        l.dirs[0].cut = true;
        l.dirs[0].in_flight.clear();
        l.dirs[1].in_flight.clear();
        l.gave_up[0] = true;
        edge_or(
            &mut l.edges[0],
            Ready {
                readable: true,
                error: true,
                ..Ready::default()
            },
        );
        true
    }

    /// A reload gives both nodes new limits.
    pub fn set_limits(&mut self, limits: Limits) {
        let now = self.now;
        self.enc.set_limits(limits, now);
        if let Some(d) = self.dec.as_mut() {
            d.set_limits(limits, now);
        }
    }

    /// The drain deadline passed on a node (0: encrypt, 1: decrypt). True if it was open.
    pub fn drain(&mut self, node: usize) -> bool {
        let now = self.now;
        fn close<C: Build, U: Build>(n: &mut Node<C, U>, now: Instant) -> bool {
            if n.closed {
                return false;
            }
            n.env.now = now;
            n.core.close(CloseReason::DrainDeadline, &mut n.env);
            n.run_deferred(now);
            true
        }
        match node % 2 {
            0 => close(&mut self.enc, now),
            _ => self.dec.as_mut().is_some_and(|d| close(d, now)),
        }
    }

    /// Runs one step; counts the faults it injected.
    pub fn apply(&mut self, step: &Step) {
        let side = |s: u8| {
            if s % 2 == 0 {
                Side::Client
            } else {
                Side::Upstream
            }
        };
        let fault = match *step {
            Step::Deliver { link, dir, max } => {
                self.deliver(link.into(), dir.into(), max.into());
                false
            }
            Step::Ready { node, side: s } => {
                self.ready(node.into(), side(s));
                false
            }
            Step::Establish => {
                self.establish();
                false
            }
            Step::ClientWrite(n) => {
                self.client_write(n as usize);
                false
            }
            Step::ClientRead => {
                self.client_read();
                false
            }
            Step::ClientShut => {
                self.client_shut();
                false
            }
            Step::BackendWrite(n) => {
                self.backend_write(n as usize);
                false
            }
            Step::BackendRead => {
                self.backend_read();
                false
            }
            Step::BackendShut => {
                self.backend_shut();
                false
            }
            Step::Advance(ms) => {
                self.advance(Duration::from_millis(ms.into()));
                false
            }
            Step::Net => {
                self.net();
                false
            }
            Step::Flood { client } => {
                for _ in 0..1000 {
                    let wrote = if client {
                        self.client_write(usize::MAX)
                    } else {
                        self.backend_write(usize::MAX)
                    };
                    self.net();
                    if !wrote {
                        break;
                    }
                }
                false
            }
            Step::ClientReset => self.client.abort(),
            Step::BackendReset => self.backend.as_mut().is_some_and(|b| b.abort()),
            Step::Tamper { dir, at } => self.tamper(dir.into(), at.into()),
            Step::Cut => self.cut(),
            Step::Drain { node } => self.drain(node.into()),
            Step::DrainStart => self.drain_started(),
        };
        if fault {
            self.faults += 1;
        }
    }

    /// Lets everything finish: the peers send the rest of their data and shut down, every
    /// byte is delivered, every readiness dispatched; when nothing moves, time passes to the
    /// next deadline. Ends when every core has closed and every peer ended, or nothing is
    /// left to happen.
    pub fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut progress = false;
            while self.establish() {
                progress = true;
            }
            progress |= self.deliver_all();
            progress |= self.ready_all();
            for p in std::iter::once(&mut self.client).chain(self.backend.as_mut()) {
                progress |= p.write(usize::MAX);
                if p.sent == p.data.len() {
                    progress |= p.shut();
                }
                progress |= p.read();
                progress |= p.close_if_done();
            }
            if progress {
                continue;
            }
            match self.next_deadline() {
                Some(at) => {
                    let d = at.saturating_duration_since(self.now);
                    self.advance(d);
                }
                None => return,
            }
        }
        panic!("the world never settles");
    }

    /// What the backend should get of what the client sent so far: the preamble, then it
    /// (after its PROXY header, which the encrypt side takes off).
    fn upstream_sent(&self) -> Vec<u8> {
        let header = self.opts.client_header.len();
        let sent = self
            .client
            .data
            .get(header..self.client.sent)
            .unwrap_or(&[]);
        [&self.opts.preamble[..], sent].concat()
    }

    /// Whether a connect to a target that would have answered timed out (time ran past the
    /// connect timeout before the test let the answer come).
    pub fn live_connect_timed_out(&self) -> bool {
        let enc = self
            .enc
            .env
            .timed_out
            .iter()
            .map(|&a| self.opts.enc_targets[target_index(a)]);
        let dec = self.dec.iter().flat_map(|d| &d.env.timed_out);
        let dec = dec.map(|&a| self.opts.dec_targets[target_index(a)]);
        enc.chain(dec).any(|k| k != Kind::Blackhole)
    }

    /// The client ended before the whole PROXY header the encrypt side expects (which then
    /// refuses it, as it must).
    pub fn client_header_cut(&self) -> bool {
        self.client.sent < self.opts.client_header.len()
    }

    /// The cores that exist.
    pub fn closed(&self) -> bool {
        self.enc.closed
            && self.dec.as_ref().is_none_or(|d| d.closed)
            && self.warm.as_ref().is_none_or(|w| w.closed)
    }

    /// Bytes the busiest core buffers now.
    pub fn buffered(&self) -> usize {
        let d = self.dec.as_ref().map_or(0, |d| d.buffered());
        self.enc.buffered().max(d)
    }

    /// The invariants that hold at every point of every schedule.
    pub fn check_always(&self) {
        let b = self.buffered();
        assert!(
            b <= MAX_BUFFERED,
            "a connection buffers {b} bytes, over the bound of {MAX_BUFFERED}"
        );
        let backend_got = self.backend.as_ref().map_or(&[][..], |b| &b.got[..]);
        let upstream: Vec<u8> = [&self.opts.preamble[..], &self.opts.client_data].concat();
        assert!(
            upstream.starts_with(backend_got),
            "the backend got bytes the client never sent in that order"
        );
        if let Some(b) = &self.backend {
            assert!(
                b.data.starts_with(&self.client.got),
                "the client got bytes the backend never sent in that order"
            );
        }
        assert!(
            self.client.got.is_empty() || self.backend.is_some(),
            "the client got bytes with no backend"
        );
    }

    /// The invariants of a settled world (see the property test).
    pub fn check_settled(&self) {
        self.check_always();
        assert!(self.closed(), "a core never closed");
        for n in [&self.enc.env]
            .into_iter()
            .chain(self.dec.as_ref().map(|d| &d.env))
            .chain(self.dec_old.as_ref().map(|d| &d.env))
        {
            assert!(!n.timer_after_close, "a timer armed after the close");
            assert_eq!(n.timers, [None; 3], "a timer outlived its connection");
            assert!(
                n.deferred.is_empty(),
                "deferred work outlived its connection"
            );
            for t in n.upstreams.targets() {
                assert_eq!(t.active(), 0, "a target still counts a closed connection");
            }
        }
        // (A warm world's client that was never accepted has nothing to end.)
        assert!(
            self.client.ended() || self.pending_client.is_some(),
            "the client never saw an end"
        );
        if let Some(b) = &self.backend {
            assert!(b.ended(), "the backend never saw an end");
        }
        // A clean end of stream only ever follows the whole stream, ended on purpose: by the
        // far peer, or, towards the backend, by `max_lifetime` at a quiet moment, which ends
        // the client's stream with everything it sent so far; bytes it sends after that
        // cannot be carried, and when the encrypt side ended it the client is reset for them
        // (whether it reads again to see it or not), unless it aborted itself. When the
        // decrypt side ended it, bytes already on their way to it as the client read the end
        // may be lost instead (core.rs, "Lifetime"; docs/OPERATIONS.md).
        let enc_end = self.enc.recorded(&Rec::LifetimeEnd { graceful: true });
        let dec_end = self
            .dec
            .as_ref()
            .is_some_and(|d| d.recorded(&Rec::LifetimeEnd { graceful: true }));
        if self.client.eof {
            let b = self.backend.as_ref().expect("a clean end needs a backend");
            assert!(
                b.shut && self.client.got == b.data[..b.sent],
                "the client saw a cut stream end cleanly"
            );
        }
        if let Some(b) = &self.backend {
            if b.eof {
                let c = &self.client;
                let all = b.got == self.upstream_sent();
                let told = c.reset || c.aborted || self.enc.reset(Side::Client);
                assert!(
                    (c.shut && all) || (enc_end && (all || told)) || dec_end,
                    "the backend saw a cut stream end cleanly"
                );
            }
        }
        // Tampering resets both sides of the core that found it (those it has).
        for (reason, resets) in [
            (
                self.enc.reason(),
                [self.enc.reset(Side::Client), self.enc.reset(Side::Upstream)],
            ),
            (
                self.dec.as_ref().and_then(|d| d.reason()),
                self.dec.as_ref().map_or([false; 2], |d| {
                    [d.reset(Side::Client), d.reset(Side::Upstream)]
                }),
            ),
        ] {
            if reason == Some(CloseReason::Tampered) {
                assert_eq!(resets, [true, true], "tampering must reset both sides");
            }
        }
    }

    /// With no fault and no limit reached, everything arrives and both ends are clean.
    pub fn check_complete(&self) {
        let b = self.backend.as_ref().expect("the backend was reached");
        assert!(self.client.eof && b.eof, "both ends must close cleanly");
        assert!(b.got == self.upstream_sent(), "the backend's stream");
        assert!(self.client.got == b.data[..b.sent], "the client's stream");
        assert_eq!(self.enc.reason(), Some(CloseReason::Clean));
        assert_eq!(
            self.dec.as_ref().and_then(|d| d.reason()),
            Some(CloseReason::Clean)
        );
    }
}

/// The index of a target address in its node's target list (see `addr`).
fn target_index(a: SocketAddr) -> usize {
    match a.ip() {
        std::net::IpAddr::V4(v4) => usize::from(v4.octets()[3]) - 1,
        std::net::IpAddr::V6(_) => unreachable!("the harness uses IPv4 targets"),
    }
}

// ---------------------------------------------------------------------------------------------
// Live upgrade: a node's connection moves to a "successor process"

impl super::core::migrate::Migrate for Sealed {
    fn movable(&self) -> bool {
        SealFilter::movable(self)
    }
    fn export_layer(
        &self,
    ) -> Result<Option<super::super::codec::SealState>, super::core::migrate::NotReady> {
        self.export()
            .map(Some)
            .ok_or(super::core::migrate::NotReady::Layer)
    }
    fn import_layer(
        seal: Option<super::super::codec::SealState>,
    ) -> Result<Self, super::core::migrate::StateError> {
        let seal = seal.ok_or(super::core::migrate::StateError::Missing("session"))?;
        Ok(SealFilter::resume_with(seal, TestRng::new(0), false))
    }
}

impl<C, U> Node<C, U>
where
    C: Build + super::core::migrate::Migrate,
    U: Build + super::core::migrate::Migrate,
{
    /// The connection moves, as a live upgrade moves it: its state is exported (at this point
    /// between two callbacks), encoded and decoded, and a new core over the same transports
    /// goes on from it; the old core is dropped without closing anything. The new "process"
    /// registers the transports afresh: its loop has no re-drive queued and no timer armed,
    /// and the registration reports the transports' readiness. False (nothing changed) if the
    /// connection cannot move now.
    pub fn migrate(&mut self, now: Instant) -> bool {
        self.migrate_with(now, |_| {})
    }

    /// [`migrate`](Self::migrate), with `edit` changing the exported state before it is
    /// encoded (what another build of the old process would have written).
    pub fn migrate_with(
        &mut self,
        now: Instant,
        edit: impl FnOnce(&mut super::core::migrate::CoreState),
    ) -> bool {
        use super::core::migrate::ConnState;
        if self.closed {
            return false;
        }
        let Ok(mut core) = self.core.export(now, &self.env.upstreams) else {
            return false;
        };
        edit(&mut core);
        let mode = match (C::SEALED, U::SEALED) {
            (false, true) => crate::config::Mode::Encrypt,
            (true, false) => crate::config::Mode::Decrypt,
            _ => crate::config::Mode::Forward,
        };
        let bytes = ConnState {
            tunnel: "t".into(),
            mode,
            shard: 0,
            core,
            ident: None,
        }
        .encode();
        let st = ConnState::decode(&bytes).expect("a state decodes as encoded");
        let placeholder = |side| {
            Pipe::new(
                side,
                End {
                    link: Link::new(1),
                    e: 0,
                },
                PipeState::Closed,
            )
        };
        let mut client =
            std::mem::replace(self.core.client_mut().io_mut(), placeholder(Side::Client));
        let up = self
            .core
            .upstream_mut()
            .expect("a settled connection has one");
        let mut upstream = std::mem::replace(up.io_mut(), placeholder(Side::Upstream));
        for p in [&mut client, &mut upstream] {
            p.ready = Readiness::default();
            p.redrive_queued = false;
            let closed = {
                let l = p.end.link.borrow();
                let d = &l.dirs[1 - p.end.e];
                d.fin_arrived || d.rst_arrived
            };
            p.end.add_edge(Ready {
                readable: true,
                writable: true,
                read_closed: closed,
                ..Ready::default()
            });
        }
        self.env.deferred.retain(|d| *d == Deferred::Close);
        self.env.timers = [None, None, None];
        self.env.now = now;
        let target = st
            .core
            .target
            .and_then(|a| self.env.upstreams.targets().iter().find(|t| t.addr == a))
            .map(|t| t.id());
        self.core = ConnCore::import(
            st.core,
            target,
            now,
            |l| BevCore::with_io(client, l, !C::SEALED),
            |l| BevCore::with_io(upstream, l, !U::SEALED),
        )
        .expect("a state imports as exported");
        self.core.resume(now, &mut self.env);
        true
    }
}

impl World {
    /// The encrypt (node 0) or decrypt (node 1) side's connection moves to a successor (see
    /// `Node::migrate`). True if it could.
    pub fn migrate(&mut self, node: usize) -> bool {
        let now = self.now;
        match node % 2 {
            0 => self.enc.migrate(now),
            _ => self.dec.as_mut().is_some_and(|d| d.migrate(now)),
        }
    }
}
