//! `BufferEvent`: a socket with an input and an output [`Buffer`], libevent's `bufferevent`.
//!
//! A `BufferEvent` is not a handler of its own: the handler that owns it (an echo session, a
//! proxied connection owning two of them) feeds it readiness with [`BufferEvent::on_ready`] and
//! gets back the events that libevent would deliver to callbacks ([`BevEvents`]). That keeps
//! one owner for everything a connection touches.
//!
//! Level-triggered behaviour over edge-triggered mio:
//! - The socket is registered once for read and write interest and never re-registered; the
//!   readiness the kernel reported is cached (`readable`/`writable`) and cleared only when a
//!   syscall says `WouldBlock` (or a short read/write proves the socket is drained/full).
//! - Every reason reading is suspended is a bit in one mask ([`Suspend`]). Reading happens only
//!   when the mask is empty; clearing the last bit while the cache says "readable" queues a
//!   re-drive (through the loop's deferred queue), so data that arrived while suspended is never
//!   stranded and nothing spins.
//! - Reading stops at the read high watermark (input bytes pending, counted through the filter
//!   layer) and at a per-call budget (fairness); the owner calls [`BufferEvent::consumed`] after
//!   draining input, which resumes reading if the watermark had stopped it.
//!
//! A [`Filter`] (libevent's `bufferevent_filter`) may sit between the socket and the user's
//! buffers: it decodes what the socket delivered into `input` and encodes `output` for the
//! socket. Pending bytes, watermarks, end-of-stream and shutdown all flow through it.
//!
//! Timeouts are lazy: a read/write timeout arms one timer, and activity only stores a
//! timestamp; when the timer fires early relative to the last activity it re-arms itself.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::Interest;
use mio::net::TcpStream;

use super::base::{Context, Ready};
use super::buffer::Buffer;
use super::timer::TimerKey;

/// Most bytes one `on_ready` call reads before yielding to other connections.
const READ_BUDGET: usize = 1 << 20;
/// Bytes offered to one `readv` call.
const READ_BATCH: usize = 256 * 1024;
/// A read shorter than this (and than what was offered) proves the socket is drained.
const SHORT_READ: usize = 128 * 1024;
/// Largest gap below the read high watermark that a pass which has already read leaves unread
/// (see `read_path`).
const SLIVER: usize = 4096;

/// Events the owner receives from [`BufferEvent::on_ready`] and friends (libevent's callback
/// kinds). Several may be set at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BevEvents(u16);

impl BevEvents {
    /// New input is available (at least the read low watermark).
    pub const READ: BevEvents = BevEvents(1);
    /// Output drained to the write low watermark.
    pub const WRITE: BevEvents = BevEvents(1 << 1);
    /// An outgoing connection completed.
    pub const CONNECTED: BevEvents = BevEvents(1 << 2);
    /// The peer finished sending (and, with a filter, the filter accepted the end).
    pub const EOF: BevEvents = BevEvents(1 << 3);
    /// The socket or the filter failed; see [`BufferEvent::take_error`].
    pub const ERROR: BevEvents = BevEvents(1 << 4);
    pub const READ_TIMEOUT: BevEvents = BevEvents(1 << 5);
    pub const WRITE_TIMEOUT: BevEvents = BevEvents(1 << 6);
    pub const CONNECT_TIMEOUT: BevEvents = BevEvents(1 << 7);
    /// The filter has news for the owner (e.g. a handshake completed).
    pub const FILTER: BevEvents = BevEvents(1 << 8);
    /// Output fully flushed and the write side shut down.
    pub const SHUTDOWN: BevEvents = BevEvents(1 << 9);

    pub const fn empty() -> BevEvents {
        BevEvents(0)
    }
    pub fn contains(self, other: BevEvents) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for BevEvents {
    type Output = BevEvents;
    fn bitor(self, rhs: BevEvents) -> BevEvents {
        BevEvents(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for BevEvents {
    fn bitor_assign(&mut self, rhs: BevEvents) {
        self.0 |= rhs.0;
    }
}

/// Why reading is suspended. Reading runs only when no bit is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Suspend {
    /// The owner disabled reading (`disable_read`).
    User = 1,
    /// The input reached the read high watermark.
    HighWatermark = 1 << 1,
    /// The owner's far side is backed up (proxy backpressure).
    Peer = 1 << 2,
    /// Not connected yet.
    Connecting = 1 << 3,
    /// The read timeout fired.
    Timeout = 1 << 4,
}

/// Read low/high and write low watermarks, in bytes pending (counted through the filter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermarks {
    /// READ is reported only once at least this much input is pending.
    pub read_low: usize,
    /// Reading stops while this much input is pending (0 = no limit). After a read that
    /// handed the owner new input it may also stop up to min(read_high / 16, 4 KiB) short of
    /// it, rather than spend a syscall on a sliver; an owner that must see a message of M bytes
    /// whole should set read_high at least that much above M.
    pub read_high: usize,
    /// WRITE is reported when pending output falls to this or below.
    pub write_low: usize,
}

impl Default for Watermarks {
    fn default() -> Self {
        Watermarks {
            read_low: 0,
            read_high: 1 << 20,
            write_low: 0,
        }
    }
}

/// What a filter reports after decoding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilterStatus {
    /// The logical stream ended (e.g. an authenticated end-of-stream record).
    pub end: bool,
    /// Something the owner should look at happened (reported as [`BevEvents::FILTER`]).
    pub notify: bool,
}

/// A transform between the socket and the user's buffers (libevent's `bufferevent_filter`).
pub trait Filter {
    /// Bytes arrived in `raw_in` (or, with `eof`, the socket reached end of file): move what
    /// can be decoded into `input`. Bytes to send on the filter's own behalf (handshake
    /// answers) go into `raw_out`. An error fails the connection; `eof` without a proper
    /// logical end is an error the filter reports.
    fn decode(
        &mut self,
        raw_in: &mut Buffer,
        input: &mut Buffer,
        raw_out: &mut Buffer,
        eof: bool,
    ) -> io::Result<FilterStatus>;

    /// Move what can be encoded from `output` into `raw_out`. With `finish`, the user shut
    /// down writing: once `output` is empty, emit the end-of-stream marker (once).
    fn encode(&mut self, output: &mut Buffer, raw_out: &mut Buffer, finish: bool)
    -> io::Result<()>;

    /// For a filter that decodes frames in place: the bytes the frame at the end of `raw_in`
    /// still lacks, if known. The next read then fills the tail chunk only up to the frame's
    /// end and starts fresh chunks at a frame boundary ([`Buffer::read_from_framed`]).
    fn frame_rest(&self, _raw_in: &Buffer) -> Option<usize> {
        None
    }

    /// The most bytes `raw_in` may hold now, if the filter wants its input kept small (a
    /// handshake not yet authenticated): reads then stop at that many and go into a small
    /// buffer of that size instead of a pooled chunk ([`Buffer::read_limited`]), so a peer
    /// that has proved nothing costs a few hundred bytes, not a chunk. `None` (the default):
    /// no limit beyond the watermarks.
    fn read_limit(&self) -> Option<usize> {
        None
    }
}

/// The identity filter: no transform, no extra buffers.
pub struct NoFilter;

impl Filter for NoFilter {
    fn decode(
        &mut self,
        _: &mut Buffer,
        _: &mut Buffer,
        _: &mut Buffer,
        _: bool,
    ) -> io::Result<FilterStatus> {
        Ok(FilterStatus::default())
    }
    fn encode(&mut self, _: &mut Buffer, _: &mut Buffer, _: bool) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Connecting,
    Open,
    Closed,
}

/// Timer tags a `BufferEvent` arms are `source | kind << 8`.
const TIMER_READ: u64 = 1 << 8;
const TIMER_WRITE: u64 = 2 << 8;
const TIMER_CONNECT: u64 = 3 << 8;
/// Deferred-work tag for a re-drive.
const REDRIVE: u64 = 4 << 8;

/// Per-direction timeouts. `None` = no timeout.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timeouts {
    pub read: Option<Duration>,
    pub write: Option<Duration>,
    pub connect: Option<Duration>,
}

/// The read/write timeout state of a BufferEvent that has one. Boxed, and only when a read or
/// write timeout is set: most BufferEvents (a proxy's) never set one, and an idle connection
/// should not carry ~90 bytes it never uses.
struct IoTimeouts {
    read: Option<Duration>,
    write: Option<Duration>,
    last_read: Instant,
    last_write: Instant,
    read_timer: Option<TimerKey>,
    write_timer: Option<TimerKey>,
}

/// A buffered socket. `F` is the filter layer ([`NoFilter`] for a plain socket).
pub struct BufferEvent<F: Filter = NoFilter> {
    /// `None` only when a connect failed before a socket existed.
    stream: Option<TcpStream>,
    source: u8,
    state: State,
    /// Decoded bytes for the user.
    pub input: Buffer,
    /// Bytes the user wants sent (before the filter).
    pub output: Buffer,
    raw_in: Buffer,
    raw_out: Buffer,
    filter: F,
    passthrough: bool,
    readable: bool,
    writable: bool,
    /// The kernel said the peer closed its write side (EPOLLRDHUP): read to EOF, never stop at
    /// a short read, or the FIN would be stranded (no further edge will come for it).
    peer_closed: bool,
    suspend: u8,
    eof: bool,
    /// The user asked to shut down writing once output drains.
    shutdown_requested: bool,
    write_shut: bool,
    watermarks: Watermarks,
    /// `None` until a read or write timeout is set.
    io_timeouts: Option<Box<IoTimeouts>>,
    connect_timer: Option<TimerKey>,
    error: Option<io::Error>,
    redrive_queued: bool,
    bytes_read: u64,
    bytes_written: u64,
}

impl BufferEvent<NoFilter> {
    /// Wraps an accepted (connected) socket.
    pub fn new(stream: TcpStream, source: u8) -> Self {
        Self::with_filter(stream, source, NoFilter, true)
    }

    /// Starts a non-blocking connect. Every outcome — success, refusal, unreachable, timeout —
    /// arrives later as an event; an immediate failure is reported on the first turn.
    pub fn connect<S>(cx: &mut Context<'_, S>, addr: SocketAddr, source: u8) -> Self {
        Self::connect_filtered(cx, addr, source, NoFilter, true, Timeouts::default())
    }
}

impl<F: Filter> BufferEvent<F> {
    /// Wraps an accepted socket with a filter layer. `passthrough` = the filter never
    /// transforms bytes (only [`NoFilter`] should pass `true`).
    pub fn with_filter(stream: TcpStream, source: u8, filter: F, passthrough: bool) -> Self {
        Self::build(Some(stream), source, filter, passthrough)
    }

    fn build(stream: Option<TcpStream>, source: u8, filter: F, passthrough: bool) -> Self {
        BufferEvent {
            stream,
            source,
            state: State::Open,
            input: Buffer::new(),
            output: Buffer::new(),
            raw_in: Buffer::new(),
            raw_out: Buffer::new(),
            filter,
            passthrough,
            readable: false,
            writable: false,
            peer_closed: false,
            suspend: 0,
            eof: false,
            shutdown_requested: false,
            write_shut: false,
            watermarks: Watermarks::default(),
            io_timeouts: None,
            connect_timer: None,
            error: None,
            redrive_queued: false,
            bytes_read: 0,
            bytes_written: 0,
        }
    }

    /// Connects with a filter. See [`BufferEvent::connect`].
    pub fn connect_filtered<S>(
        cx: &mut Context<'_, S>,
        addr: SocketAddr,
        source: u8,
        filter: F,
        passthrough: bool,
        timeouts: Timeouts,
    ) -> Self {
        // An immediate failure is delivered as an event on the next deferred pass, like every
        // other connect outcome.
        let (stream, err) = match TcpStream::connect(addr) {
            Ok(s) => {
                // Small writes go out at once; coalescing is done in user space (one vectored
                // write per turn), so Nagle would only add latency.
                let _ = s.set_nodelay(true);
                (Some(s), None)
            }
            Err(e) => (None, Some(e)),
        };
        let mut bev = Self::build(stream, source, filter, passthrough);
        bev.state = State::Connecting;
        bev.suspend |= Suspend::Connecting as u8;
        bev.store_timeouts(timeouts);
        if let Some(e) = err {
            bev.error = Some(e);
            bev.state = State::Closed;
            cx.defer(REDRIVE | source as u64);
            bev.redrive_queued = true;
        } else if let Some(t) = timeouts.connect {
            bev.connect_timer = Some(cx.timer(t, TIMER_CONNECT | source as u64));
        }
        bev
    }

    /// Registers the socket with the loop (read + write, edge-triggered, once).
    pub fn register<S>(&mut self, cx: &mut Context<'_, S>) -> io::Result<()> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        if self.state == State::Closed {
            return Ok(());
        }
        cx.register(stream, self.source, Interest::READABLE | Interest::WRITABLE)?;
        if self.state == State::Open {
            // A freshly accepted socket may already hold data whose edge we will never see
            // again if it arrived before registration; epoll reports current readiness on
            // registration, so nothing to do here.
            self.arm_timeouts(cx);
        }
        Ok(())
    }

    /// Deregisters and cancels timers. Call from the owner's `on_close`.
    pub fn close<S>(&mut self, cx: &mut Context<'_, S>) {
        let (read_timer, write_timer) =
            self.io_timeouts.as_deref_mut().map_or((None, None), |io| {
                (io.read_timer.take(), io.write_timer.take())
            });
        for t in [read_timer, write_timer, self.connect_timer.take()]
            .into_iter()
            .flatten()
        {
            cx.cancel_timer(t);
        }
        if let Some(s) = self.stream.as_mut() {
            if self.state != State::Closed {
                let _ = cx.deregister(s);
            }
        }
        self.state = State::Closed;
        self.input.clear();
        self.output.clear();
        self.raw_in.clear();
        self.raw_out.clear();
    }

    /// Gives back the spare capacity of the four buffers' chunk lists, so a quiet BufferEvent
    /// whose buffers are empty holds no heap (see [`Buffer::shrink_to_fit`]). Owners call it
    /// when the connection has gone quiet, not per read.
    pub fn shrink_to_fit(&mut self) {
        for b in [
            &mut self.input,
            &mut self.output,
            &mut self.raw_in,
            &mut self.raw_out,
        ] {
            b.shrink_to_fit();
        }
    }

    /// Sends a TCP RST instead of a FIN when the socket closes (SO_LINGER 0).
    pub fn set_reset_on_close(&self) {
        if let Some(s) = &self.stream {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
    }

    pub fn source(&self) -> u8 {
        self.source
    }
    /// The socket (`None` only after a connect that failed before a socket existed).
    pub fn stream(&self) -> Option<&TcpStream> {
        self.stream.as_ref()
    }
    pub fn filter(&self) -> &F {
        &self.filter
    }
    pub fn filter_mut(&mut self) -> &mut F {
        &mut self.filter
    }
    pub fn watermarks(&self) -> Watermarks {
        self.watermarks
    }
    pub fn set_watermarks(&mut self, wm: Watermarks) {
        self.watermarks = wm;
    }
    pub fn set_timeouts<S>(&mut self, cx: &mut Context<'_, S>, t: Timeouts) {
        self.store_timeouts(t);
        if self.state == State::Open {
            self.arm_timeouts(cx);
        }
    }

    /// Keeps the read/write timeouts of `t` (the connect timeout is armed by the connect
    /// itself), allocating their state only if one is set. Armed timers stay: they re-arm
    /// lazily against the new values.
    fn store_timeouts(&mut self, t: Timeouts) {
        match self.io_timeouts.as_deref_mut() {
            Some(io) => {
                io.read = t.read;
                io.write = t.write;
            }
            None if t.read.is_some() || t.write.is_some() => {
                // Overwritten by `arm_timeouts` when the socket is (or becomes) open.
                let now = Instant::now();
                self.io_timeouts = Some(Box::new(IoTimeouts {
                    read: t.read,
                    write: t.write,
                    last_read: now,
                    last_write: now,
                    read_timer: None,
                    write_timer: None,
                }));
            }
            None => {}
        }
    }
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
    }
    pub fn is_connected(&self) -> bool {
        self.state == State::Open
    }
    pub fn eof_seen(&self) -> bool {
        self.eof
    }
    pub fn write_shut(&self) -> bool {
        self.write_shut
    }
    /// Bytes read from / written to the socket (the wire, after the filter).
    pub fn wire_bytes(&self) -> (u64, u64) {
        (self.bytes_read, self.bytes_written)
    }
    /// Input pending, counted through the filter layer.
    pub fn input_pending(&self) -> usize {
        self.input.len() + self.raw_in.len()
    }
    /// Output pending, counted through the filter layer.
    pub fn output_pending(&self) -> usize {
        self.output.len() + self.raw_out.len()
    }
    pub fn read_suspended(&self) -> bool {
        self.suspend != 0
    }
    pub fn is_suspended(&self, why: Suspend) -> bool {
        self.suspend & why as u8 != 0
    }

    /// Adds a reason not to read.
    pub fn suspend_read(&mut self, why: Suspend) {
        self.suspend |= why as u8;
    }

    /// Removes a reason not to read; if it was the last and data is waiting, reading resumes
    /// on a deferred pass (never from inside the caller's stack).
    pub fn resume_read<S>(&mut self, cx: &mut Context<'_, S>, why: Suspend) {
        let before = self.suspend;
        self.suspend &= !(why as u8);
        if before != 0 && self.suspend == 0 && (self.readable || self.eof) {
            self.queue_redrive(cx);
        }
    }

    pub fn disable_read(&mut self) {
        self.suspend_read(Suspend::User);
    }

    pub fn enable_read<S>(&mut self, cx: &mut Context<'_, S>) {
        self.resume_read(cx, Suspend::User);
    }

    /// The owner drained some input: resume reading if the high watermark had stopped it.
    pub fn consumed<S>(&mut self, cx: &mut Context<'_, S>) {
        if self.is_suspended(Suspend::HighWatermark)
            && (self.watermarks.read_high == 0 || self.input_pending() < self.watermarks.read_high)
        {
            self.resume_read(cx, Suspend::HighWatermark);
        }
    }

    fn queue_redrive<S>(&mut self, cx: &mut Context<'_, S>) {
        if !self.redrive_queued {
            self.redrive_queued = true;
            cx.defer(REDRIVE | self.source as u64);
        }
    }

    /// Is this `on_notify`/`on_timer` tag one of this BufferEvent's?
    pub fn owns_tag(&self, tag: u64) -> bool {
        tag & 0xff == self.source as u64 && tag >> 8 != 0 && tag >> 8 <= 4
    }

    /// Feed an `on_notify` tag that [`owns_tag`](Self::owns_tag) accepted.
    pub fn on_notify<S>(&mut self, cx: &mut Context<'_, S>, tag: u64) -> BevEvents {
        if tag & !0xff == REDRIVE {
            self.redrive_queued = false;
            return self.drive(cx, false, false);
        }
        BevEvents::empty()
    }

    /// Feed an `on_timer` tag that [`owns_tag`](Self::owns_tag) accepted.
    pub fn on_timer<S>(&mut self, cx: &mut Context<'_, S>, tag: u64) -> BevEvents {
        let now = cx.now();
        match tag & !0xff {
            TIMER_CONNECT => {
                self.connect_timer = None;
                if self.state == State::Connecting {
                    self.state = State::Closed;
                    if let Some(s) = self.stream.as_mut() {
                        let _ = cx.deregister(s);
                    }
                    self.error = Some(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
                    return BevEvents::CONNECT_TIMEOUT;
                }
            }
            TIMER_READ => {
                let reading = self.state == State::Open && !self.eof;
                let Some(io) = self.io_timeouts.as_deref_mut() else {
                    return BevEvents::empty();
                };
                io.read_timer = None;
                if let Some(t) = io.read {
                    let due = io.last_read + t;
                    if due > now {
                        io.read_timer = Some(cx.timer_at(due, TIMER_READ | self.source as u64));
                    } else if reading {
                        self.suspend_read(Suspend::Timeout);
                        return BevEvents::READ_TIMEOUT;
                    }
                }
            }
            TIMER_WRITE => {
                let pending = self.output_pending();
                let Some(io) = self.io_timeouts.as_deref_mut() else {
                    return BevEvents::empty();
                };
                io.write_timer = None;
                if let Some(t) = io.write {
                    let due = io.last_write + t;
                    if pending == 0 || due > now {
                        io.write_timer = Some(
                            cx.timer_at(due.max(now + t / 2), TIMER_WRITE | self.source as u64),
                        );
                    } else if self.state == State::Open {
                        return BevEvents::WRITE_TIMEOUT;
                    }
                }
            }
            _ => {}
        }
        BevEvents::empty()
    }

    fn arm_timeouts<S>(&mut self, cx: &mut Context<'_, S>) {
        let Some(io) = self.io_timeouts.as_deref_mut() else {
            return;
        };
        let now = cx.now();
        io.last_read = now;
        io.last_write = now;
        if let (Some(t), None) = (io.read, io.read_timer) {
            io.read_timer = Some(cx.timer(t, TIMER_READ | self.source as u64));
        }
        if let (Some(t), None) = (io.write, io.write_timer) {
            io.write_timer = Some(cx.timer(t, TIMER_WRITE | self.source as u64));
        }
    }

    /// Feed readiness the loop reported for this BufferEvent's source.
    pub fn on_ready<S>(&mut self, cx: &mut Context<'_, S>, ready: Ready) -> BevEvents {
        if ready.readable || ready.read_closed || ready.error {
            self.readable = true;
        }
        if ready.read_closed || ready.error {
            self.peer_closed = true;
        }
        if ready.writable || ready.write_closed || ready.error {
            self.writable = true;
        }
        self.drive(cx, ready.error, ready.write_closed)
    }

    /// Runs the write path now (call after appending to `output`).
    pub fn flush<S>(&mut self, cx: &mut Context<'_, S>) -> BevEvents {
        let mut ev = BevEvents::empty();
        if self.state == State::Open {
            self.write_path(cx, &mut ev);
        }
        ev
    }

    /// Flush the output, then shut down the write side (a FIN; with a filter, after its
    /// end-of-stream marker).
    pub fn shutdown_write<S>(&mut self, cx: &mut Context<'_, S>) -> BevEvents {
        self.shutdown_requested = true;
        self.flush(cx)
    }

    fn drive<S>(&mut self, cx: &mut Context<'_, S>, error: bool, _hup: bool) -> BevEvents {
        let mut ev = BevEvents::empty();
        match self.state {
            State::Closed => {
                if self.error.is_some() {
                    ev |= BevEvents::ERROR;
                }
                return ev;
            }
            State::Connecting => {
                if !(self.writable || error || self.readable) {
                    return ev;
                }
                match self.connect_result() {
                    Ok(true) => {
                        self.state = State::Open;
                        if let Some(t) = self.connect_timer.take() {
                            cx.cancel_timer(t);
                        }
                        self.suspend &= !(Suspend::Connecting as u8);
                        self.arm_timeouts(cx);
                        ev |= BevEvents::CONNECTED;
                    }
                    Ok(false) => return ev,
                    Err(e) => {
                        if let Some(t) = self.connect_timer.take() {
                            cx.cancel_timer(t);
                        }
                        self.state = State::Closed;
                        if let Some(s) = self.stream.as_mut() {
                            let _ = cx.deregister(s);
                        }
                        self.error = Some(e);
                        return ev | BevEvents::ERROR;
                    }
                }
            }
            State::Open => {}
        }
        if self.writable {
            self.write_path(cx, &mut ev);
        }
        if self.readable && self.suspend == 0 && !self.eof && self.state == State::Open {
            self.read_path(cx, &mut ev);
        }
        ev
    }

    fn connect_result(&mut self) -> io::Result<bool> {
        let Some(stream) = self.stream.as_ref() else {
            return Err(io::Error::from(io::ErrorKind::NotConnected));
        };
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
        match stream.peer_addr() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                // Spurious wakeup before the handshake finished.
                self.writable = false;
                self.readable = false;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn read_path<S>(&mut self, cx: &mut Context<'_, S>, ev: &mut BevEvents) {
        let mut budget = READ_BUDGET;
        let before = self.input.len();
        let read_at_start = self.bytes_read;
        loop {
            let high = self.watermarks.read_high;
            let pending = self.input_pending();
            if high != 0 && pending >= high {
                self.suspend_read(Suspend::HighWatermark);
                break;
            }
            // A filter's decoding shrinks what is pending (record overhead), so a read that
            // filled up to the watermark leaves a gap of a few hundred bytes: reading it would
            // cost a syscall for a sliver. Stop as if at the watermark when this pass already
            // read and the user is being handed data (so it will consume, and `consumed` resume
            // reading). A fresh pass still reads the gap, so reading never stalls on it.
            if high != 0
                && self.bytes_read != read_at_start
                && high - pending < (high / 16).min(SLIVER)
                && self.input.len() > before
                && self.input.len() >= self.watermarks.read_low
            {
                self.suspend_read(Suspend::HighWatermark);
                break;
            }
            if budget == 0 {
                // Yield to other connections; come back on a deferred pass.
                self.queue_redrive(cx);
                break;
            }
            let mut max = READ_BATCH.min(budget);
            if high != 0 {
                max = max.min(high - pending);
            }
            let limit = if self.passthrough {
                None
            } else {
                self.filter.read_limit()
            };
            if let Some(cap) = limit {
                max = max.min(cap.saturating_sub(self.raw_in.len()));
                if max == 0 {
                    // The filter holds all it asked for and wants no more until it decides
                    // (it fails a stuck handshake itself): stop without spinning.
                    break;
                }
            }
            let frame_rest = if self.passthrough {
                None
            } else {
                self.filter.frame_rest(&self.raw_in)
            };
            let target = if self.passthrough {
                &mut self.input
            } else {
                &mut self.raw_in
            };
            let Some(stream) = self.stream.as_mut() else {
                break;
            };
            let got = match limit {
                Some(cap) => target.read_limited(stream, max, cap),
                None => target.read_from_framed(stream, max, frame_rest),
            };
            match got {
                Ok(0) => {
                    self.readable = false;
                    self.eof = true;
                    self.decode(true, ev);
                    if self.error.is_none() {
                        *ev |= BevEvents::EOF;
                    }
                    break;
                }
                Ok(n) => {
                    self.bytes_read += n as u64;
                    budget = budget.saturating_sub(n);
                    if let Some(io) = self.io_timeouts.as_deref_mut() {
                        io.last_read = cx.now();
                    }
                    if !self.passthrough {
                        self.decode(false, ev);
                        if ev.contains(BevEvents::ERROR) {
                            break;
                        }
                    }
                    if n < max.min(SHORT_READ) && !self.peer_closed {
                        self.readable = false;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.readable = false;
                    self.error = Some(e);
                    *ev |= BevEvents::ERROR;
                    break;
                }
            }
        }
        if self.input.len() > before && self.input.len() >= self.watermarks.read_low {
            *ev |= BevEvents::READ;
        }
        if !self.passthrough && !self.raw_out.is_empty() && self.writable {
            // The filter answered on its own behalf (handshake).
            self.write_path(cx, ev);
        }
    }

    fn decode(&mut self, eof: bool, ev: &mut BevEvents) {
        if self.passthrough {
            return;
        }
        match self
            .filter
            .decode(&mut self.raw_in, &mut self.input, &mut self.raw_out, eof)
        {
            Ok(st) => {
                if st.notify {
                    *ev |= BevEvents::FILTER;
                }
                if st.end && !self.eof {
                    self.eof = true;
                    *ev |= BevEvents::EOF;
                }
            }
            Err(e) => {
                self.error = Some(e);
                *ev |= BevEvents::ERROR;
            }
        }
    }

    fn write_path<S>(&mut self, cx: &mut Context<'_, S>, ev: &mut BevEvents) {
        if self.write_shut {
            return;
        }
        if !self.passthrough {
            let finish = self.shutdown_requested;
            if let Err(e) = self
                .filter
                .encode(&mut self.output, &mut self.raw_out, finish)
            {
                self.error = Some(e);
                *ev |= BevEvents::ERROR;
                return;
            }
        }
        let had = self.output_pending();
        while self.writable {
            let Some(stream) = self.stream.as_mut() else {
                break;
            };
            let out = if self.passthrough {
                &mut self.output
            } else {
                &mut self.raw_out
            };
            if out.is_empty() {
                break;
            }
            match out.write_to(stream) {
                Ok(0) => {
                    self.writable = false;
                }
                Ok(n) => {
                    self.bytes_written += n as u64;
                    if let Some(io) = self.io_timeouts.as_deref_mut() {
                        io.last_write = cx.now();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.writable = false;
                    self.error = Some(e);
                    *ev |= BevEvents::ERROR;
                    return;
                }
            }
        }
        let now = self.output_pending();
        if now < had && now <= self.watermarks.write_low {
            *ev |= BevEvents::WRITE;
        }
        if now == 0 && self.shutdown_requested && !self.write_shut {
            self.write_shut = true;
            if let Some(s) = &self.stream {
                let _ = s.shutdown(Shutdown::Write);
            }
            *ev |= BevEvents::SHUTDOWN;
        }
    }
}
