//! `ConnListener`: a listening socket and its accept loop, libevent's `evconnlistener`.
//!
//! Invariants:
//! - Accepting drains the kernel queue until `WouldBlock`, but at most `accept_batch`
//!   connections per wakeup; the rest are taken in the loop's next turn (fairness with the
//!   connections already served by this loop).
//! - Running out of descriptors or kernel memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) pauses
//!   accepting with an exponential backoff (10 ms .. 1 s) instead of spinning on a socket that
//!   stays readable; the error is reported once per pause, not once per attempt.
//! - `pause`/`resume` (connection limits, draining) keep the socket open, so the kernel keeps
//!   queueing; resuming re-drives the accept loop, since no new edge will come for connections
//!   that queued while paused.
//! - A listener is TCP or a Unix domain socket by its type ([`Accept`]): the accept loop is
//!   compiled once per kind, and the callback gets that kind's stream and peer address.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use mio::Interest;
use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use socket2::{Domain, Protocol, Socket, Type};

use super::base::Context;
use super::tag::{Component, Tag};
use super::timer::TimerKey;

const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Kinds of the listener's own tags (see `tag`).
const TAG_REDRIVE: u8 = 1;
const TAG_BACKOFF: u8 = 2;

/// How to open a listening socket.
#[derive(Clone, Debug)]
pub struct ListenerOptions {
    pub backlog: i32,
    /// SO_REUSEPORT: one listener per shard on the same address, the kernel spreads accepts.
    pub reuse_port: bool,
    /// TCP_NODELAY on accepted sockets.
    pub nodelay: bool,
    /// Most connections accepted per wakeup.
    pub accept_batch: usize,
    /// SO_INCOMING_CPU: prefer connections whose packets arrive on this CPU (Linux). `None`
    /// leaves the choice to SO_REUSEPORT's hash of the connection's addresses.
    pub incoming_cpu: Option<usize>,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        ListenerOptions {
            backlog: 1024,
            reuse_port: true,
            nodelay: true,
            accept_batch: 64,
            incoming_cpu: None,
        }
    }
}

/// What a [`ConnListener`] accepts from: a TCP or a Unix domain listening socket.
pub trait Accept: Source + AsFd {
    /// The accepted stream.
    type Stream;
    /// The peer's address.
    type Peer;
    fn accept_one(&self) -> io::Result<(Self::Stream, Self::Peer)>;
    /// Sets TCP_NODELAY on an accepted stream (no such thing on a Unix one).
    fn set_nodelay(_stream: &Self::Stream) {}
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    type Peer = SocketAddr;
    fn accept_one(&self) -> io::Result<(TcpStream, SocketAddr)> {
        self.accept()
    }
    fn set_nodelay(s: &TcpStream) {
        let _ = s.set_nodelay(true);
    }
}

impl Accept for UnixListener {
    type Stream = UnixStream;
    type Peer = std::os::unix::net::SocketAddr;
    fn accept_one(&self) -> io::Result<(UnixStream, std::os::unix::net::SocketAddr)> {
        self.accept()
    }
}

/// Opens a non-blocking listening Unix domain socket at `path`, which must not exist.
pub fn bind_unix(path: &Path, backlog: i32) -> io::Result<std::os::unix::net::UnixListener> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.bind(&socket2::SockAddr::unix(path)?)?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Opens a non-blocking listening socket with SO_REUSEADDR (and SO_REUSEPORT if asked).
pub fn bind(addr: SocketAddr, opts: &ListenerOptions) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if opts.reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if opts.incoming_cpu.is_some() {
        set_incoming_cpu(&socket, opts.incoming_cpu);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(opts.backlog)?;
    Ok(socket.into())
}

/// Sets (`Some(cpu)`) or clears (`None`) SO_INCOMING_CPU on a listening socket, for instance
/// one inherited from a process that chose otherwise. Best effort: older kernels lack it, and
/// it is only a steering hint.
pub fn set_incoming_cpu(l: &impl std::os::fd::AsFd, cpu: Option<usize>) {
    // The kernel takes an int and reads a negative one as "unset"; socket2 converts the
    // usize with `as c_int`, so usize::MAX arrives as -1.
    let _ = socket2::SockRef::from(l).set_cpu_affinity(cpu.unwrap_or(usize::MAX));
}

/// Is this accept error the kind that clears when descriptors or memory free up?
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Errors `accept` returns for a connection that died in the queue: skip it, keep accepting.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EPROTO | libc::EPERM | libc::EINTR)
    )
}

/// What one accept pass did.
#[derive(Debug, Default)]
pub struct AcceptPass {
    pub accepted: usize,
    /// Set when accepting paused itself on resource exhaustion (report it; it is not repeated
    /// until the next pause).
    pub exhausted: Option<io::Error>,
    /// Any other accept error (logged by the owner; accepting continues on the next edge).
    pub error: Option<io::Error>,
}

/// A listening socket driven by an [`EventBase`](super::EventBase) handler: TCP (the default)
/// or a Unix domain socket (`ConnListener<UnixListener>`).
pub struct ConnListener<L: Accept = TcpListener> {
    listener: L,
    source: u8,
    opts: ListenerOptions,
    /// Readiness cache: the kernel may have queued connections we have not accepted yet.
    ready: bool,
    paused: bool,
    backoff: Option<Duration>,
    backoff_timer: Option<TimerKey>,
    /// When the last backoff pause ends: exhaustion that recurs soon after grows the backoff.
    backoff_ends: Option<std::time::Instant>,
    redrive_queued: bool,
    /// TCP_NODELAY is set on the listening socket, and Linux copies it to every accepted one,
    /// which saves a setsockopt per connection.
    nodelay_inherited: bool,
}

impl ConnListener<UnixListener> {
    /// Wraps a listening Unix domain socket ([`bind_unix`]); `opts.nodelay` and the TCP options
    /// do not apply.
    pub fn from_unix(
        l: std::os::unix::net::UnixListener,
        opts: ListenerOptions,
        source: u8,
    ) -> Self {
        let _ = l.set_nonblocking(true);
        ConnListener::wrap(UnixListener::from_std(l), opts, source, false)
    }
}

impl ConnListener {
    /// Binds `addr` with `opts`.
    pub fn bind(addr: SocketAddr, opts: ListenerOptions, source: u8) -> io::Result<Self> {
        let l = bind(addr, &opts)?;
        Ok(Self::from_std(l, opts, source))
    }

    /// Wraps an already-listening socket (inherited across an upgrade, for instance).
    pub fn from_std(l: std::net::TcpListener, opts: ListenerOptions, source: u8) -> Self {
        let _ = l.set_nonblocking(true);
        let nodelay_inherited = cfg!(target_os = "linux")
            && opts.nodelay
            && socket2::SockRef::from(&l).set_tcp_nodelay(true).is_ok();
        ConnListener::wrap(TcpListener::from_std(l), opts, source, nodelay_inherited)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

impl<L: Accept> ConnListener<L> {
    fn wrap(listener: L, opts: ListenerOptions, source: u8, nodelay_inherited: bool) -> Self {
        ConnListener {
            nodelay_inherited,
            listener,
            source,
            opts,
            ready: true,
            paused: false,
            backoff: None,
            backoff_timer: None,
            backoff_ends: None,
            redrive_queued: false,
        }
    }

    pub fn source(&self) -> u8 {
        self.source
    }

    pub fn inner(&self) -> &L {
        &self.listener
    }

    pub fn register<S>(&mut self, cx: &mut Context<'_, S>) -> io::Result<()> {
        cx.register(&mut self.listener, self.source, Interest::READABLE)?;
        // Connections may have queued before registration (an inherited socket).
        self.queue_redrive(cx);
        Ok(())
    }

    pub fn deregister<S>(&mut self, cx: &mut Context<'_, S>) {
        let _ = cx.deregister(&mut self.listener);
        if let Some(t) = self.backoff_timer.take() {
            cx.cancel_timer(t);
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Stop accepting (connection limit, drain). Queued connections stay in the kernel.
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// Accept again; connections that queued meanwhile are taken on a deferred pass.
    pub fn resume<S>(&mut self, cx: &mut Context<'_, S>) {
        if self.paused {
            self.paused = false;
            self.ready = true;
            self.queue_redrive(cx);
        }
    }

    fn queue_redrive<S>(&mut self, cx: &mut Context<'_, S>) {
        if !self.redrive_queued {
            self.redrive_queued = true;
            cx.defer(self.tag(TAG_REDRIVE));
        }
    }

    fn tag(&self, kind: u8) -> Tag {
        Tag::component(Component::Listener, self.source, kind)
    }

    /// Is this tag (from `on_notify` or `on_timer`) this listener's?
    pub fn owns_tag(&self, tag: Tag) -> bool {
        tag.kind_for(Component::Listener, self.source).is_some()
    }

    /// Feed readiness for this listener's source; accepts a batch.
    pub fn on_ready<S>(
        &mut self,
        cx: &mut Context<'_, S>,
        on_accept: impl FnMut(&mut Context<'_, S>, L::Stream, L::Peer),
    ) -> AcceptPass {
        self.on_ready_at_most(cx, usize::MAX, on_accept)
    }

    /// [`on_ready`](Self::on_ready), accepting at most `max` connections: for an owner with
    /// that much room left under its connection limit (it pauses when full).
    pub fn on_ready_at_most<S>(
        &mut self,
        cx: &mut Context<'_, S>,
        max: usize,
        on_accept: impl FnMut(&mut Context<'_, S>, L::Stream, L::Peer),
    ) -> AcceptPass {
        self.ready = true;
        self.accept(cx, self.opts.accept_batch, max, on_accept)
    }

    /// Feed an `on_notify`/`on_timer` tag this listener owns.
    pub fn on_tag<S>(
        &mut self,
        cx: &mut Context<'_, S>,
        tag: Tag,
        on_accept: impl FnMut(&mut Context<'_, S>, L::Stream, L::Peer),
    ) -> AcceptPass {
        self.on_tag_at_most(cx, tag, usize::MAX, on_accept)
    }

    /// [`on_tag`](Self::on_tag), accepting at most `max` connections (see
    /// [`on_ready_at_most`](Self::on_ready_at_most)).
    pub fn on_tag_at_most<S>(
        &mut self,
        cx: &mut Context<'_, S>,
        tag: Tag,
        max: usize,
        on_accept: impl FnMut(&mut Context<'_, S>, L::Stream, L::Peer),
    ) -> AcceptPass {
        match tag.kind_for(Component::Listener, self.source) {
            Some(TAG_REDRIVE) => self.redrive_queued = false,
            Some(TAG_BACKOFF) => {
                self.backoff_timer = None;
                self.ready = true;
            }
            _ => return AcceptPass::default(),
        }
        self.accept(cx, self.opts.accept_batch, max, on_accept)
    }

    /// Accepts everything queued now, ignoring the batch limit and the pause (used when
    /// draining: what the kernel already queued is served, then the listener closes).
    pub fn accept_all<S>(
        &mut self,
        cx: &mut Context<'_, S>,
        on_accept: impl FnMut(&mut Context<'_, S>, L::Stream, L::Peer),
    ) -> AcceptPass {
        let paused = self.paused;
        self.paused = false;
        self.ready = true;
        let pass = self.accept(cx, usize::MAX, usize::MAX, on_accept);
        self.paused = paused;
        pass
    }

    fn accept<S>(
        &mut self,
        cx: &mut Context<'_, S>,
        batch: usize,
        max: usize,
        mut on_accept: impl FnMut(&mut Context<'_, S>, L::Stream, L::Peer),
    ) -> AcceptPass {
        let mut pass = AcceptPass::default();
        if self.paused || self.backoff_timer.is_some() || !self.ready {
            return pass;
        }
        while pass.accepted < batch.min(max) {
            match self.listener.accept_one() {
                Ok((stream, peer)) => {
                    if self.opts.nodelay && !self.nodelay_inherited {
                        L::set_nodelay(&stream);
                    }
                    pass.accepted += 1;
                    on_accept(cx, stream, peer);
                    if self.paused {
                        return pass;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.ready = false;
                    return pass;
                }
                Err(e) if is_transient(&e) => continue,
                Err(e) if is_resource_exhaustion(&e) => {
                    let wait = self.next_backoff(cx.now());
                    self.backoff_timer = Some(cx.timer(wait, self.tag(TAG_BACKOFF)));
                    pass.exhausted = Some(e);
                    return pass;
                }
                Err(e) => {
                    pass.error = Some(e);
                    return pass;
                }
            }
        }
        // Batch (or the owner's `max`) full with more possibly queued: continue next turn,
        // after the connections already served had theirs. An owner that paused meanwhile
        // makes that pass a no-op; resuming re-drives.
        if !self.redrive_queued {
            self.redrive_queued = true;
            cx.defer_next_turn(self.tag(TAG_REDRIVE));
        }
        pass
    }

    /// The next pause after resource exhaustion: it doubles (up to 1 s) when the exhaustion
    /// recurs within twice the last pause after that pause ended, and starts again at 10 ms
    /// otherwise. Successful accepts in between do not reset it: with one fd free, accept
    /// succeeds and the next step (another accept, an upstream connect) fails, so "an accept
    /// worked" says nothing about recovery; only time without exhaustion does.
    fn next_backoff(&mut self, now: std::time::Instant) -> Duration {
        let wait = match (self.backoff, self.backoff_ends) {
            (Some(b), Some(end)) if now <= end + b * 2 => (b * 2).min(BACKOFF_MAX),
            _ => BACKOFF_MIN,
        };
        self.backoff = Some(wait);
        self.backoff_ends = Some(now + wait);
        wait
    }

    /// Pauses accepting with the resource-exhaustion backoff, for exhaustion the owner met
    /// after an accept succeeded (an upstream `connect` failing with EMFILE, say): without it,
    /// each accepted client would be closed at once, freeing the fd that lets the next queued
    /// client in — a busy accept/close cycle. Returns the pause chosen, or `None` if a backoff was already in force.
    pub fn pause_for_backoff<S>(&mut self, cx: &mut Context<'_, S>) -> Option<Duration> {
        if self.backoff_timer.is_some() {
            return None;
        }
        let wait = self.next_backoff(cx.now());
        self.backoff_timer = Some(cx.timer(wait, self.tag(TAG_BACKOFF)));
        Some(wait)
    }

    /// The backoff currently in force after resource exhaustion, if any.
    pub fn backoff(&self) -> Option<Duration> {
        self.backoff_timer.and(self.backoff)
    }
}
