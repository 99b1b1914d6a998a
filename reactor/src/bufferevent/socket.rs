//! [`Socket`]: the socket backend of a `BufferEvent` (libevent's `bufferevent_sock`), and
//! [`BufferEvent`] itself: a [`BevCore`] over a `Socket`.
//!
//! The backend owns what needs the kernel or the loop: the mio socket, its readiness cache,
//! registration (once, read + write, edge-triggered), the async connect and its outcome,
//! read/write/connect timeouts, and re-drives through the loop's deferred queue. Everything
//! else is the core's, so the read and write paths here are the core's, run with the loop's
//! bookkeeping around them.
//!
//! Invariants: the socket is registered once, for read and write, and deregistered once (a
//! failed connect or `close`) — or, between [`BufferEvent::detach`] and
//! [`BufferEvent::attach`], not at all, and then nothing reads or writes it; a connect's every
//! outcome, an immediate failure included, arrives as an event, never as a return value; at
//! most one re-drive is queued at a time; a read throttled for bandwidth
//! ([`BufferEvent::throttle_until`]) wakes by its own timer, in the slot the connect timer used
//! (a socket never waits for both), and re-drives itself (while detached, the wake-up only
//! lifts the suspension: `attach` re-drives).

use std::io;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use mio::Interest;

use super::bevcore::{BevCore, Readiness, Relay, Transport};
use super::{BevEvents, Filter, NoFilter, Suspend, Timeouts};
use crate::base::{Context, Ready};
use crate::stream::{Endpoint, Stream};
use crate::tag::{Component, Tag};
use crate::timer::TimerKey;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Connecting,
    Open,
    Closed,
}

/// Kinds of the tags a `BufferEvent` arms timers and defers work with (see `tag`).
const TIMER_READ: u8 = 1;
const TIMER_WRITE: u8 = 2;
const TIMER_CONNECT: u8 = 3;
/// Deferred work: a re-drive.
const REDRIVE: u8 = 4;
/// A read throttled for bandwidth may go on.
const TIMER_BANDWIDTH: u8 = 5;

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

/// The socket backend of a [`BufferEvent`]: a TCP or a Unix domain stream ([`Stream`]).
pub struct Socket {
    /// `None` only when a connect failed before a socket existed.
    stream: Option<Stream>,
    source: u8,
    state: State,
    ready: Readiness,
    redrive_queued: bool,
    /// Deregistered and idle: another process may be using the socket (a live upgrade).
    detached: bool,
    /// `None` until a read or write timeout is set.
    io_timeouts: Option<Box<IoTimeouts>>,
    /// The connect timeout while connecting; once open, the wake-up of a read throttled for
    /// bandwidth ([`BufferEvent::throttle_until`]). One slot: a socket is never both.
    timer: Option<TimerKey>,
}

impl Transport for Socket {
    type Stream = Stream;
    #[inline]
    fn parts(&mut self) -> (Option<&mut Stream>, &mut Readiness) {
        (self.stream.as_mut(), &mut self.ready)
    }
    #[inline]
    fn is_connected(&self) -> bool {
        self.state == State::Open
    }
}

impl Socket {
    fn new(stream: Option<Stream>, source: u8) -> Socket {
        Socket {
            stream,
            source,
            state: State::Open,
            ready: Readiness::default(),
            redrive_queued: false,
            detached: false,
            io_timeouts: None,
            timer: None,
        }
    }

    /// The socket (`None` only after a connect that failed before a socket existed).
    pub fn stream(&self) -> Option<&Stream> {
        self.stream.as_ref()
    }

    pub fn source(&self) -> u8 {
        self.source
    }

    /// Sends a TCP RST instead of a FIN when the socket closes (SO_LINGER 0).
    pub fn set_reset_on_close(&self) {
        if let Some(s) = &self.stream {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
    }

    /// The readiness cached for the socket.
    pub fn readiness(&self) -> Readiness {
        self.ready
    }

    fn tag(&self, kind: u8) -> Tag {
        Tag::component(Component::BufferEvent, self.source, kind)
    }
}

/// A buffered socket, libevent's `bufferevent` over a socket: a [`BevCore`] whose transport is
/// a [`Socket`]. `F` is the filter layer ([`NoFilter`] for a plain socket).
pub type BufferEvent<F = NoFilter> = BevCore<F, Socket>;

impl BevCore<NoFilter, Socket> {
    /// Wraps an accepted (connected) socket: a `TcpStream`, or any [`Stream`].
    pub fn new(stream: impl Into<Stream>, source: u8) -> Self {
        Self::with_filter(stream, source, NoFilter, true)
    }

    /// Starts a non-blocking connect (to a `SocketAddr`, or any [`Endpoint`]). Every outcome —
    /// success, refusal, unreachable, timeout — arrives later as an event; an immediate
    /// failure is reported on the first turn.
    pub fn connect<'a, S>(
        cx: &mut Context<'_, S>,
        to: impl Into<Endpoint<'a>>,
        source: u8,
    ) -> Self {
        Self::connect_filtered(cx, to, source, NoFilter, true, Timeouts::default())
    }
}

impl<F: Filter> BevCore<F, Socket> {
    /// Wraps an accepted socket with a filter layer. `passthrough` = the filter never
    /// transforms bytes (only [`NoFilter`] should pass `true`).
    pub fn with_filter(
        stream: impl Into<Stream>,
        source: u8,
        filter: F,
        passthrough: bool,
    ) -> Self {
        BevCore::with_io(
            Socket::new(Some(stream.into()), source),
            filter,
            passthrough,
        )
    }

    /// Connects with a filter. See [`BufferEvent::connect`].
    pub fn connect_filtered<'a, S>(
        cx: &mut Context<'_, S>,
        to: impl Into<Endpoint<'a>>,
        source: u8,
        filter: F,
        passthrough: bool,
        timeouts: Timeouts,
    ) -> Self {
        // An immediate failure is delivered as an event on the next deferred pass, like every
        // other connect outcome.
        let (stream, err) = match Stream::connect(to.into()) {
            Ok(s) => {
                // Small writes go out at once; coalescing is done in user space (one vectored
                // write per turn), so Nagle would only add latency.
                if let Some(tcp) = s.as_tcp() {
                    let _ = tcp.set_nodelay(true);
                }
                (Some(s), None)
            }
            Err(e) => (None, Some(e)),
        };
        let mut bev = BevCore::with_io(Socket::new(stream, source), filter, passthrough);
        bev.io.state = State::Connecting;
        bev.suspend_read(Suspend::Connecting);
        bev.store_timeouts(timeouts);
        if let Some(e) = err {
            bev.error = Some(e);
            bev.io.state = State::Closed;
            cx.defer(bev.io.tag(REDRIVE));
            bev.io.redrive_queued = true;
        } else if let Some(t) = timeouts.connect {
            bev.io.timer = Some(cx.timer(t, bev.io.tag(TIMER_CONNECT)));
        }
        bev
    }

    /// Registers the socket with the loop (read + write, edge-triggered, once).
    pub fn register<S>(&mut self, cx: &mut Context<'_, S>) -> io::Result<()> {
        let io = &mut self.io;
        let Some(stream) = io.stream.as_mut() else {
            return Ok(());
        };
        if io.state == State::Closed {
            return Ok(());
        }
        cx.register(stream, io.source, Interest::READABLE | Interest::WRITABLE)?;
        if io.state == State::Open {
            // A freshly accepted socket may already hold data whose edge we will never see
            // again if it arrived before registration; epoll reports current readiness on
            // registration, so nothing to do here.
            self.arm_timeouts(cx);
        }
        Ok(())
    }

    /// Deregisters and cancels timers. Call from the owner's `on_close`.
    pub fn close<S>(&mut self, cx: &mut Context<'_, S>) {
        let io = &mut self.io;
        let (read_timer, write_timer) = io.io_timeouts.as_deref_mut().map_or((None, None), |t| {
            (t.read_timer.take(), t.write_timer.take())
        });
        for t in [read_timer, write_timer, io.timer.take()]
            .into_iter()
            .flatten()
        {
            cx.cancel_timer(t);
        }
        if let Some(s) = io.stream.as_mut() {
            if io.state != State::Closed && !io.detached {
                let _ = cx.deregister(s);
            }
        }
        io.state = State::Closed;
        self.clear();
    }

    /// Stops all I/O on an open socket and deregisters it, keeping everything else: a live
    /// upgrade hands the socket (a duplicate of it) to another process, which may use it
    /// meanwhile. Until [`attach`](Self::attach) readiness and timers are ignored, a queued
    /// re-drive is dropped when it comes, and flushes do nothing. Not for a socket still
    /// connecting.
    pub fn detach<S>(&mut self, cx: &mut Context<'_, S>) -> io::Result<()> {
        let io = &mut self.io;
        if io.detached || io.state != State::Open {
            return Ok(());
        }
        if let Some(s) = io.stream.as_mut() {
            cx.deregister(s)?;
        }
        io.detached = true;
        Ok(())
    }

    /// Resumes a detached socket: registers it again (the registration reports its current
    /// readiness, which drives it as usual) and re-arms its timeouts.
    pub fn attach<S>(&mut self, cx: &mut Context<'_, S>) -> io::Result<()> {
        if !self.io.detached {
            return Ok(());
        }
        self.io.detached = false;
        self.io.ready = Readiness::default();
        self.register(cx)
    }

    /// Whether the socket is detached (see [`detach`](Self::detach)).
    pub fn is_detached(&self) -> bool {
        self.io.detached
    }

    /// Sends a TCP RST instead of a FIN when the socket closes (SO_LINGER 0).
    pub fn set_reset_on_close(&self) {
        self.io.set_reset_on_close();
    }

    pub fn source(&self) -> u8 {
        self.io.source
    }
    /// The socket (`None` only after a connect that failed before a socket existed).
    pub fn stream(&self) -> Option<&Stream> {
        self.io.stream.as_ref()
    }
    pub fn set_timeouts<S>(&mut self, cx: &mut Context<'_, S>, t: Timeouts) {
        self.store_timeouts(t);
        if self.io.state == State::Open {
            self.arm_timeouts(cx);
        }
    }

    /// Keeps the read/write timeouts of `t` (the connect timeout is armed by the connect
    /// itself), allocating their state only if one is set. Armed timers stay: they re-arm
    /// lazily against the new values.
    fn store_timeouts(&mut self, t: Timeouts) {
        match self.io.io_timeouts.as_deref_mut() {
            Some(io) => {
                io.read = t.read;
                io.write = t.write;
            }
            None if t.read.is_some() || t.write.is_some() => {
                // Overwritten by `arm_timeouts` when the socket is (or becomes) open.
                let now = Instant::now();
                self.io.io_timeouts = Some(Box::new(IoTimeouts {
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
    pub fn is_connected(&self) -> bool {
        self.io.state == State::Open
    }

    /// Removes a reason not to read; if it was the last and data is waiting, reading resumes
    /// on a deferred pass (never from inside the caller's stack).
    pub fn resume_read<S>(&mut self, cx: &mut Context<'_, S>, why: Suspend) {
        if self.unsuspend(why) && (self.io.ready.readable || self.eof) {
            self.queue_redrive(cx);
        }
    }

    /// Suspends reading for bandwidth ([`Suspend::Bandwidth`]) until `at`, when it resumes by
    /// itself (a re-drive, as [`resume_read`](Self::resume_read) does): the owner's rate limit
    /// has no bytes to grant before then. The owner sets the read allowance the read at `at`
    /// may use now ([`BevCore::set_read_allowance`]). A later call moves the wake-up.
    pub fn throttle_until<S>(&mut self, cx: &mut Context<'_, S>, at: Instant) {
        if self.io.state != State::Open {
            // Connecting (the slot holds the connect timer) or closed: nothing reads anyway.
            return;
        }
        self.suspend_read(Suspend::Bandwidth);
        if let Some(t) = self.io.timer.take() {
            cx.cancel_timer(t);
        }
        self.io.timer = Some(cx.timer_at(at, self.io.tag(TIMER_BANDWIDTH)));
    }

    /// Whether a wake-up of [`throttle_until`](Self::throttle_until) is pending.
    pub fn is_throttled(&self) -> bool {
        self.io.state == State::Open && self.io.timer.is_some()
    }

    pub fn enable_read<S>(&mut self, cx: &mut Context<'_, S>) {
        self.resume_read(cx, Suspend::User);
    }

    /// The owner drained some input: resume reading if the high watermark had stopped it.
    pub fn consumed<S>(&mut self, cx: &mut Context<'_, S>) {
        if self.input_drained() && (self.io.ready.readable || self.eof) {
            self.queue_redrive(cx);
        }
    }

    fn queue_redrive<S>(&mut self, cx: &mut Context<'_, S>) {
        if !self.io.redrive_queued {
            self.io.redrive_queued = true;
            cx.defer(self.io.tag(REDRIVE));
        }
    }

    /// Is this `on_notify`/`on_timer` tag one of this BufferEvent's?
    pub fn owns_tag(&self, tag: Tag) -> bool {
        self.kind_of(tag).is_some()
    }

    fn kind_of(&self, tag: Tag) -> Option<u8> {
        tag.kind_for(Component::BufferEvent, self.io.source)
    }

    /// Feed an `on_notify` tag that [`owns_tag`](Self::owns_tag) accepted.
    pub fn on_notify<S>(&mut self, cx: &mut Context<'_, S>, tag: Tag) -> BevEvents {
        self.on_notify_via::<S, NoFilter>(cx, tag, None)
    }

    /// [`on_notify`](Self::on_notify), with reads going through `relay` while it takes them
    /// (see [`BevCore::read_some_via`]).
    pub fn on_notify_via<S, G: Filter>(
        &mut self,
        cx: &mut Context<'_, S>,
        tag: Tag,
        relay: Option<Relay<'_, G>>,
    ) -> BevEvents {
        if self.kind_of(tag) == Some(REDRIVE) {
            self.io.redrive_queued = false;
            if self.io.detached {
                return BevEvents::empty();
            }
            return self.drive(cx, false, relay);
        }
        BevEvents::empty()
    }

    /// Feed an `on_timer` tag that [`owns_tag`](Self::owns_tag) accepted.
    pub fn on_timer<S>(&mut self, cx: &mut Context<'_, S>, tag: Tag) -> BevEvents {
        if self.io.detached {
            // Forgotten; `attach` arms the timeouts again. A bandwidth wake-up still lifts
            // its suspension (nothing else would), and `attach`'s registration re-drives.
            let kind = self.kind_of(tag);
            if kind == Some(TIMER_BANDWIDTH) {
                self.io.timer = None;
                self.unsuspend(Suspend::Bandwidth);
            }
            if let Some(io) = self.io.io_timeouts.as_deref_mut() {
                match kind {
                    Some(TIMER_READ) => io.read_timer = None,
                    Some(TIMER_WRITE) => io.write_timer = None,
                    _ => {}
                }
            }
            return BevEvents::empty();
        }
        let now = cx.now();
        let (read_tag, write_tag) = (self.io.tag(TIMER_READ), self.io.tag(TIMER_WRITE));
        match self.kind_of(tag) {
            Some(TIMER_CONNECT) => {
                self.io.timer = None;
                if self.io.state == State::Connecting {
                    self.io.state = State::Closed;
                    if let Some(s) = self.io.stream.as_mut() {
                        let _ = cx.deregister(s);
                    }
                    self.error = Some(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
                    return BevEvents::CONNECT_TIMEOUT;
                }
            }
            Some(TIMER_BANDWIDTH) => {
                self.io.timer = None;
                self.resume_read(cx, Suspend::Bandwidth);
            }
            Some(TIMER_READ) => {
                let reading = self.io.state == State::Open && !self.eof;
                let Some(io) = self.io.io_timeouts.as_deref_mut() else {
                    return BevEvents::empty();
                };
                io.read_timer = None;
                if let Some(t) = io.read {
                    let due = io.last_read + t;
                    if due > now {
                        io.read_timer = Some(cx.timer_at(due, read_tag));
                    } else if reading {
                        self.suspend_read(Suspend::Timeout);
                        return BevEvents::READ_TIMEOUT;
                    }
                }
            }
            Some(TIMER_WRITE) => {
                let pending = self.output_pending();
                let open = self.io.state == State::Open;
                let Some(io) = self.io.io_timeouts.as_deref_mut() else {
                    return BevEvents::empty();
                };
                io.write_timer = None;
                if let Some(t) = io.write {
                    let due = io.last_write + t;
                    if pending == 0 || due > now {
                        io.write_timer = Some(cx.timer_at(due.max(now + t / 2), write_tag));
                    } else if open {
                        return BevEvents::WRITE_TIMEOUT;
                    }
                }
            }
            _ => {}
        }
        BevEvents::empty()
    }

    fn arm_timeouts<S>(&mut self, cx: &mut Context<'_, S>) {
        let (read_tag, write_tag) = (self.io.tag(TIMER_READ), self.io.tag(TIMER_WRITE));
        let Some(io) = self.io.io_timeouts.as_deref_mut() else {
            return;
        };
        let now = cx.now();
        io.last_read = now;
        io.last_write = now;
        if let (Some(t), None) = (io.read, io.read_timer) {
            io.read_timer = Some(cx.timer(t, read_tag));
        }
        if let (Some(t), None) = (io.write, io.write_timer) {
            io.write_timer = Some(cx.timer(t, write_tag));
        }
    }

    /// Feed readiness the loop reported for this BufferEvent's source.
    pub fn on_ready<S>(&mut self, cx: &mut Context<'_, S>, ready: Ready) -> BevEvents {
        self.on_ready_via::<S, NoFilter>(cx, ready, None)
    }

    /// [`on_ready`](Self::on_ready), with reads going through `relay` while it takes them
    /// (see [`BevCore::read_some_via`]).
    pub fn on_ready_via<S, G: Filter>(
        &mut self,
        cx: &mut Context<'_, S>,
        ready: Ready,
        relay: Option<Relay<'_, G>>,
    ) -> BevEvents {
        if self.io.detached {
            return BevEvents::empty();
        }
        let cache = &mut self.io.ready;
        if ready.readable || ready.read_closed || ready.error {
            cache.readable = true;
        }
        if ready.read_closed || ready.error {
            cache.peer_closed = true;
        }
        if ready.writable || ready.write_closed || ready.error {
            cache.writable = true;
        }
        self.drive(cx, ready.error, relay)
    }

    /// Runs the write path now (call after appending to `output`).
    pub fn flush<S>(&mut self, cx: &mut Context<'_, S>) -> BevEvents {
        let mut ev = BevEvents::empty();
        if self.io.state == State::Open && !self.io.detached {
            self.write_path(cx, &mut ev);
        }
        ev
    }

    /// Flush the output, then shut down the write side (a FIN; with a filter, after its
    /// end-of-stream marker).
    pub fn shutdown_write<S>(&mut self, cx: &mut Context<'_, S>) -> BevEvents {
        self.request_shutdown();
        self.flush(cx)
    }

    fn drive<S, G: Filter>(
        &mut self,
        cx: &mut Context<'_, S>,
        error: bool,
        relay: Option<Relay<'_, G>>,
    ) -> BevEvents {
        let mut ev = BevEvents::empty();
        match self.io.state {
            State::Closed => {
                if self.has_error() {
                    ev |= BevEvents::ERROR;
                }
                return ev;
            }
            State::Connecting => {
                let r = self.io.ready;
                if !(r.writable || error || r.readable) {
                    return ev;
                }
                match self.io.connect_result() {
                    Ok(true) => {
                        self.io.state = State::Open;
                        if let Some(t) = self.io.timer.take() {
                            cx.cancel_timer(t);
                        }
                        self.unsuspend(Suspend::Connecting);
                        self.arm_timeouts(cx);
                        ev |= BevEvents::CONNECTED;
                    }
                    Ok(false) => return ev,
                    Err(e) => {
                        if let Some(t) = self.io.timer.take() {
                            cx.cancel_timer(t);
                        }
                        self.io.state = State::Closed;
                        if let Some(s) = self.io.stream.as_mut() {
                            let _ = cx.deregister(s);
                        }
                        self.error = Some(e);
                        return ev | BevEvents::ERROR;
                    }
                }
            }
            State::Open => {}
        }
        if self.io.ready.writable {
            self.write_path(cx, &mut ev);
        }
        if self.io.ready.readable && self.suspend == 0 && !self.eof && self.io.state == State::Open
        {
            self.read_path(cx, &mut ev, relay);
        }
        ev
    }

    fn read_path<S, G: Filter>(
        &mut self,
        cx: &mut Context<'_, S>,
        ev: &mut BevEvents,
        relay: Option<Relay<'_, G>>,
    ) {
        let read_before = self.bytes_read;
        if self.read_some_via(ev, relay) {
            // The budget ran out: yield to other connections; come back next turn (a plain
            // deferred pass would run before any of them, as often as the socket has more).
            if !self.io.redrive_queued {
                self.io.redrive_queued = true;
                cx.defer_next_turn(self.io.tag(REDRIVE));
            }
        }
        if self.bytes_read != read_before {
            if let Some(io) = self.io.io_timeouts.as_deref_mut() {
                io.last_read = cx.now();
            }
        }
        if self.has_filter_output() && self.io.ready.writable {
            // The filter answered on its own behalf (handshake).
            self.write_path(cx, ev);
        }
    }

    fn write_path<S>(&mut self, cx: &mut Context<'_, S>, ev: &mut BevEvents) {
        let written_before = self.bytes_written;
        let was_shut = self.write_shut;
        self.write_some(ev);
        if self.bytes_written != written_before {
            if let Some(io) = self.io.io_timeouts.as_deref_mut() {
                io.last_write = cx.now();
            }
        }
        if self.write_shut && !was_shut {
            if let Some(s) = &self.io.stream {
                let _ = s.shutdown(Shutdown::Write);
            }
        }
    }
}

impl Socket {
    fn connect_result(&mut self) -> io::Result<bool> {
        let Some(stream) = self.stream.as_ref() else {
            return Err(io::Error::from(io::ErrorKind::NotConnected));
        };
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
        let connected = stream.connected()?;
        if !connected {
            // Spurious wakeup before the handshake finished.
            self.ready.writable = false;
            self.ready.readable = false;
        }
        Ok(connected)
    }
}
