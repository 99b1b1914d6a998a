//! One proxied connection: a handler owning both of its `BufferEvent`s.
//!
//! `Conn<C, U>` is generic over the layer of each side: the client side `C` and the upstream
//! side `U` are each plain ([`NoFilter`]) or sealed ([`SealFilter`]). encrypt = `Conn<NoFilter,
//! SealFilter>`, decrypt = `Conn<SealFilter, NoFilter>`, forward = `Conn<NoFilter, NoFilter>`;
//! each is compiled to its own code, with no dynamic dispatch on the data path.
//!
//! Lifecycle: the decrypt side connects to its backend only after the handshake (including the
//! initiator's Finished) verified and the session's OPEN arrived, so a wrong key or a replayed
//! session never reaches the backend. Half-close flows through: a side's end (FIN, or an
//! authenticated END record on the sealed side) becomes a shutdown of the far side's write half
//! after its output drains, and the other direction keeps going. A FIN on a sealed side without
//! END is a truncation: the plaintext side is reset, not closed cleanly. A tampered record
//! resets both sides.
//!
//! Aborts travel: when a plaintext peer resets (or this side gives up on the connection: idle
//! timeout, no backend, drain deadline), the sealed side sends an authenticated ABORT before
//! closing, and the far side resets its own plaintext peer and counts the reason
//! (`client_reset`, `upstream_reset`, ...) instead of a truncation. Handshake failures are
//! logged where they can be told apart: the responder names the check that failed; the
//! initiator, which only sees the responder close, says what that most likely means.
//!
//! Quiet connections hibernate: after [`HIBERNATE_AFTER`] without activity the sealed side
//! drops its expanded AEAD keys (the next record re-derives them from the traffic secrets) and
//! both sides' empty buffers give back their chunk lists, so an idle connection costs little
//! more than this handler. The idle timer carries both deadlines (one timer, lazily re-armed),
//! so neither costs anything per read.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use crate::metrics::{Bytes, CloseReason};
use crate::protocol::{AbortReason, ForwardSecrecy, KeyId, OpenInfo, ProtocolError};
use crate::reactor::{
    BevEvents, BufferEvent, Context, Filter, Handler, NoFilter, Ready, Suspend, Timeouts, TimerKey,
    Watermarks,
};

use super::codec::{Role, SealFilter, peer_abort, protocol_error};
use super::identity::{self, ConnIdentity, HeaderError, HeaderStep};
use super::listener::Ticket;
use super::upstream::{ConnectOutcome, TargetId, Tried};
use super::{OUTPUT_HIGH, OUTPUT_LOW, READ_HIGH, ShardState, TunnelRt};

const CLIENT: u8 = 0;
const UPSTREAM: u8 = 1;
/// Timer tags of the connection itself (BufferEvent tags are `source | kind << 8`, kind <= 4).
const TAG_IDLE: u64 = 0x10 << 8;
const TAG_HANDSHAKE: u64 = 0x11 << 8;
/// Notify tag: the shard's drain deadline passed.
pub const TAG_ABORT: u64 = 0x12 << 8;

/// A connection with no activity for this long hibernates (see the module doc): about 1.1 KiB
/// of keys per sealed session and the buffers' chunk lists go back to the allocator. Long
/// against a request/response exchange, so traffic with shorter pauses never pays for it and
/// a chatty connection re-expands its keys (a microsecond or two) at most once per pause this
/// long; short against the seconds to hours that pooled and keep-alive connections sit idle,
/// which is where the memory of many connections is.
pub const HIBERNATE_AFTER: Duration = Duration::from_millis(250);

/// An optional error as its message, for log fields.
fn err_text(e: &Option<io::Error>) -> &dyn std::fmt::Display {
    match e {
        Some(e) => e,
        None => &"unknown",
    }
}

/// A target's address for log fields; a reload may have removed the target.
struct Upstream(Option<std::net::SocketAddr>);

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("(removed by a reload)"),
        }
    }
}

/// A side's layer: plain or sealed.
pub trait Layer: Filter + Sized + 'static {
    const SEALED: bool;
    /// The layer for a new connection (a sealed initiator takes an ephemeral key from the
    /// shard's pool; a responder only once a hello verifies).
    fn make(role: Role, t: &TunnelRt) -> Self;
    /// Handshake complete (always true for plain).
    fn is_open(&self) -> bool;
    /// The pre-shared key the session uses (none for plain).
    fn key_id(&self) -> Option<KeyId> {
        None
    }
    /// Whether the open session has forward secrecy (none for plain or before it opens).
    fn forward_secrecy(&self) -> Option<bool> {
        None
    }
    /// After a version mismatch: the version the peer spoke.
    fn peer_version(&self) -> Option<u8> {
        None
    }
    /// Initiator: the client's addresses for the session's OPEN record.
    fn set_open(&mut self, _open: OpenInfo) {}
    /// Responder: the OPEN record received, once.
    fn take_open(&mut self) -> Option<OpenInfo> {
        None
    }
    /// Queues an ABORT for the far side (flush to send it); false if there is no open session.
    fn abort(&mut self, _reason: AbortReason) -> bool {
        false
    }
    /// Drops what the layer can rebuild on its next use; true if it dropped keys.
    fn hibernate(&mut self) -> bool {
        false
    }
}

impl Layer for NoFilter {
    const SEALED: bool = false;
    fn make(_: Role, _: &TunnelRt) -> Self {
        NoFilter
    }
    fn is_open(&self) -> bool {
        true
    }
}

impl Layer for SealFilter {
    const SEALED: bool = true;
    fn make(role: Role, t: &TunnelRt) -> Self {
        let cfg = t
            .handshake
            .as_ref()
            .expect("sealed tunnels always carry a handshake config");
        let mut f = SealFilter::new(role, cfg);
        if let Some(n) = t.key_update_interval {
            f.set_key_update_interval(n);
        }
        f
    }
    fn is_open(&self) -> bool {
        SealFilter::is_open(self)
    }
    fn key_id(&self) -> Option<KeyId> {
        SealFilter::key_id(self)
    }
    fn forward_secrecy(&self) -> Option<bool> {
        SealFilter::forward_secrecy(self)
    }
    fn peer_version(&self) -> Option<u8> {
        SealFilter::peer_version(self)
    }
    fn set_open(&mut self, open: OpenInfo) {
        SealFilter::set_open(self, open);
    }
    fn take_open(&mut self) -> Option<OpenInfo> {
        SealFilter::take_open(self)
    }
    fn abort(&mut self, reason: AbortReason) -> bool {
        SealFilter::abort(self, reason)
    }
    fn hibernate(&mut self) -> bool {
        SealFilter::hibernate(self)
    }
}

/// The OPEN an encrypt side sends for its client: the addresses of the accepted socket.
fn client_open<C: Layer>(client: &BufferEvent<C>) -> OpenInfo {
    let addrs = client
        .stream()
        .and_then(|s| Some((s.peer_addr().ok()?, s.local_addr().ok()?)));
    match addrs {
        Some((source, destination)) => OpenInfo::from_socket(source, destination),
        None => OpenInfo::default(),
    }
}

/// Reads and discards what a socket that is about to close still holds, so that the kernel
/// closes it with a FIN after the queued bytes (an ABORT record) instead of a RST that would
/// drop them. Bounded: a peer that keeps sending is cut by the RST it then earns.
fn discard_unread(stream: Option<&TcpStream>) {
    let Some(mut s) = stream else {
        return;
    };
    let mut sink = [0u8; 4096];
    for _ in 0..64 {
        match s.read(&mut sink) {
            Ok(n) if n > 0 => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            _ => return,
        }
    }
}

/// The shard's shared log rate limit ([`ShardState::may_warn`]) for a line at `level`: a line
/// whose level is off costs none of the budget, so unseen debug lines (a load balancer's TCP
/// checks, say) never crowd out the warnings an operator does see.
fn may_log(cx: &mut Context<'_, ShardState>, level: tracing::Level) -> Option<u64> {
    let on = match level {
        tracing::Level::ERROR | tracing::Level::WARN => tracing::enabled!(tracing::Level::WARN),
        tracing::Level::INFO => tracing::enabled!(tracing::Level::INFO),
        _ => tracing::enabled!(tracing::Level::DEBUG),
    };
    if !on {
        return None;
    }
    let now = cx.now();
    cx.state.may_warn(now)
}

/// The abort a side sends its sealed peer when it closes for `reason` on its own account.
fn abort_for(reason: CloseReason) -> Option<AbortReason> {
    match reason {
        CloseReason::UpstreamFailed => Some(AbortReason::Unreachable),
        CloseReason::IdleTimeout => Some(AbortReason::Timeout),
        CloseReason::DrainDeadline => Some(AbortReason::Shutdown),
        _ => None,
    }
}

/// A proxied connection.
pub struct Conn<C: Layer, U: Layer> {
    tunnel: usize,
    client: BufferEvent<C>,
    /// Boxed: a decrypt-side connection has none until its handshake verifies, and an inline
    /// `None` would still cost every unauthenticated connection a BufferEvent's size.
    upstream: Option<Box<BufferEvent<U>>>,
    /// The target in use (by id: a reload may rebuild the list meanwhile), and those tried.
    target: Option<TargetId>,
    tried: Tried,
    started: Instant,
    connect_started: Instant,
    last_active: Instant,
    idle_timer: Option<TimerKey>,
    handshake_timer: Option<TimerKey>,
    handshake_done: bool,
    /// Hibernating: quiet since `last_active + HIBERNATE_AFTER`; cleared by any activity.
    asleep: bool,
    client_eof: bool,
    upstream_eof: bool,
    counted: [u64; 4],
    closed: Option<CloseReason>,
    /// Admission's hold on a pre-authentication slot, until the handshake completes.
    ticket: Option<Ticket>,
    /// Client identity (PROXY headers in or out, the access log): `identity.rs`; `None` for
    /// a tunnel that uses none of it.
    ident: Option<Box<ConnIdentity>>,
}

impl<C: Layer, U: Layer> Conn<C, U> {
    /// Builds the handler for an accepted client socket.
    pub fn new(t: &TunnelRt, stream: TcpStream, now: Instant) -> Self {
        let filter = C::make(Role::Responder, t);
        let ident = ConnIdentity::for_tunnel(&t.cfg.identity, || stream.peer_addr().ok());
        let mut client = BufferEvent::with_filter(stream, CLIENT, filter, !C::SEALED);
        client.set_watermarks(Watermarks {
            read_low: 0,
            read_high: READ_HIGH,
            write_low: OUTPUT_LOW,
        });
        Conn {
            tunnel: t.index,
            client,
            upstream: None,
            target: None,
            tried: Tried::default(),
            started: now,
            connect_started: now,
            last_active: now,
            idle_timer: None,
            handshake_timer: None,
            handshake_done: !C::SEALED && !U::SEALED,
            asleep: false,
            client_eof: false,
            upstream_eof: false,
            counted: [0; 4],
            closed: None,
            ticket: None,
            ident,
        }
    }

    /// Holds an admission ticket (see `listener::Admission`) until the handshake completes.
    pub fn with_ticket(mut self, ticket: Option<Ticket>) -> Self {
        self.ticket = ticket;
        self
    }

    fn release_ticket(&mut self, cx: &mut Context<'_, ShardState>) {
        if let Some(t) = self.ticket.take() {
            cx.state.admission.release(t);
        }
    }

    fn rt<'a>(&self, cx: &'a mut Context<'_, ShardState>) -> &'a mut TunnelRt {
        &mut cx.state.tunnels[self.tunnel]
    }

    /// Connects to the next target (up ones first, then down ones: see `upstream`); closes
    /// the connection once every target has been tried.
    fn connect_upstream(&mut self, cx: &mut Context<'_, ShardState>) {
        let now = cx.now();
        let state = &mut *cx.state;
        let rt = &mut state.tunnels[self.tunnel];
        let Some((id, addr)) = rt.upstreams.pick(now, &mut self.tried) else {
            return self.finish(cx, CloseReason::UpstreamFailed);
        };
        self.target = Some(id);
        let timeouts = Timeouts {
            connect: Some(rt.cfg.connect_timeout),
            ..Timeouts::default()
        };
        let mut filter = U::make(Role::Initiator, rt);
        if U::SEALED {
            let open = client_open(&self.client);
            let ident = self.ident.as_deref_mut();
            filter.set_open(ident.map_or(open, |i| i.session_open(open)));
        }
        // send_proxy: the backend's PROXY header goes first, before any client byte.
        let header = (self.ident.as_deref_mut()).and_then(|i| i.backend_header(&rt.cfg.identity));
        self.connect_started = now;
        let keepalive = rt.cfg.keepalive;
        let mut up =
            BufferEvent::connect_filtered(cx, addr, UPSTREAM, filter, !U::SEALED, timeouts);
        if let Some(h) = header {
            up.output.append(h.as_bytes());
        }
        // Dead-peer detection on the upstream socket (the client's inherits its listener's).
        if let Some(Err(e)) = up.stream().map(|s| super::keepalive::apply(s, &keepalive)) {
            tracing::debug!(error = %e, "cannot set keepalive on the upstream socket");
        }
        up.set_watermarks(Watermarks {
            read_low: 0,
            read_high: READ_HIGH,
            write_low: OUTPUT_LOW,
        });
        if let Err(e) = up.register(cx) {
            tracing::debug!(error = %e, "cannot register upstream socket");
        }
        self.upstream = Some(Box::new(up));
    }

    /// The current upstream's connect failed: count it, mark the target down when it is to
    /// blame (see `upstream`), and try the next target.
    fn connect_failed(
        &mut self,
        cx: &mut Context<'_, ShardState>,
        err: Option<io::Error>,
        outcome: ConnectOutcome,
    ) {
        let now = cx.now();
        if let Some(mut up) = self.upstream.take() {
            // Client bytes already handed to this upstream go to the next one, in order.
            let mut unsent = std::mem::take(&mut up.output);
            if let Some(i) = self.ident.as_deref_mut() {
                i.unsend_header(&mut unsent);
            }
            self.client.input.move_all_to(&mut unsent);
            self.client.input = unsent;
            up.close(cx);
        }
        let Some(id) = self.target.take() else {
            return;
        };
        let warn = cx.state.may_warn(now);
        let rt = self.rt(cx);
        rt.upstreams.release(id);
        // `None`: a reload removed the target while its connect was in flight; nothing is
        // charged to the target that took its place, and the connection tries the new list.
        let index = rt.upstreams.index_of(id);
        let addr = index.map(|i| rt.upstreams.targets()[i].addr);
        let went_down = outcome.marks_down() && rt.upstreams.failed(id, now) == Some(true);
        if let (Some(i), Some(r)) = (index, outcome.failure_reason()) {
            if let Some(m) = rt.metrics.upstreams.get(i) {
                m.failures[r].inc();
            }
        }
        let tunnel = rt.cfg.name.clone();
        let upstream = Upstream(addr);
        let error = err_text(&err);
        if outcome == ConnectOutcome::Exhausted {
            // Every other target would fail the same way: end this client, and make the
            // listener back off so the freed fd does not just admit the next one to fail.
            if let Some(l) = rt.listener {
                cx.notify(l, super::listener::TAG_EXHAUSTED);
            }
            if let Some(skipped) = warn {
                tracing::debug!(%tunnel, %upstream, %error, skipped, "upstream connect: out of resources");
            }
            return self.finish(cx, CloseReason::UpstreamFailed);
        }
        let timed_out = outcome == ConnectOutcome::TimedOut;
        if went_down {
            tracing::warn!(%tunnel, %upstream, %error, timed_out, "upstream marked down");
        } else if let Some(skipped) = warn {
            tracing::debug!(%tunnel, %upstream, %error, skipped, "upstream connect failed");
        }
        self.connect_upstream(cx);
    }

    /// The TCP connect to the current target completed: the target is up, whatever happens
    /// next on this connection.
    fn upstream_reached(&mut self, cx: &mut Context<'_, ShardState>) {
        let took = cx.now() - self.connect_started;
        let Some(id) = self.target else {
            return;
        };
        let rt = self.rt(cx);
        let Some(i) = rt.upstreams.index_of(id) else {
            return;
        };
        if rt.upstreams.succeeded(id) == Some(true) {
            let (tunnel, upstream) = (&rt.cfg.name, rt.upstreams.targets()[i].addr);
            tracing::info!(%tunnel, %upstream, "upstream is up again");
        }
        if let Some(m) = rt.metrics.upstreams.get(i) {
            m.connect.observe(took.as_secs_f64());
        }
    }

    /// The idle limit now (the half-closed one once a direction has ended); `None`: off.
    fn idle_limit(&self, cx: &Context<'_, ShardState>) -> Option<Duration> {
        let cfg = &cx.state.tunnels[self.tunnel].cfg;
        cfg.idle_limit(self.client_eof || self.upstream_eof)
    }

    /// Arms the idle timer for `last_active + limit`, where the limit is [`HIBERNATE_AFTER`]
    /// while awake (if shorter than the idle limit). Activity only stores `last_active`; the
    /// timer re-arms itself when it finds the connection was busy (no wheel work per read).
    fn arm_idle(&mut self, cx: &mut Context<'_, ShardState>) {
        let mut t = self.idle_limit(cx);
        if !self.asleep {
            t = Some(t.map_or(HIBERNATE_AFTER, |t| t.min(HIBERNATE_AFTER)));
        }
        if let Some(k) = self.idle_timer.take() {
            cx.cancel_timer(k);
        }
        // Asleep with no idle timeout: nothing to wait for until the next activity.
        self.idle_timer =
            t.map(|t| cx.timer_at(self.last_active + t.max(Duration::from_millis(1)), TAG_IDLE));
    }

    /// The connection went quiet: drop the sealed side's keys and the buffers' spare lists.
    /// Everything dropped comes back on its next use, so this is safe at any point.
    fn hibernate(&mut self, cx: &mut Context<'_, ShardState>) {
        self.asleep = true;
        let mut dropped = self.client.filter_mut().hibernate();
        self.client.shrink_to_fit();
        if let Some(up) = self.upstream.as_mut() {
            dropped |= up.filter_mut().hibernate();
            up.shrink_to_fit();
        }
        cx.state.hibernations += 1;
        let m = &cx.state.tunnels[self.tunnel].metrics;
        m.hibernating.inc();
        if dropped {
            m.key_hibernations.inc();
        }
    }

    /// Moves shard-local byte deltas for this connection into the tunnel's counters.
    fn account(&mut self, cx: &mut Context<'_, ShardState>) {
        let (cr, cw) = self.client.wire_bytes();
        let (ur, uw) = self.upstream.as_ref().map_or((0, 0), |u| u.wire_bytes());
        let (up_c, down_c) = if C::SEALED {
            (Bytes::UpSealed, Bytes::DownSealed)
        } else {
            (Bytes::UpPlain, Bytes::DownPlain)
        };
        let mut now = [0u64; 4];
        now[up_c as usize] += cr;
        now[down_c as usize] += cw;
        if U::SEALED != C::SEALED {
            let (up_u, down_u) = if U::SEALED {
                (Bytes::UpSealed, Bytes::DownSealed)
            } else {
                (Bytes::UpPlain, Bytes::DownPlain)
            };
            now[up_u as usize] += uw;
            now[down_u as usize] += ur;
        }
        let rt = &mut cx.state.tunnels[self.tunnel];
        for ((b, n), c) in rt.bytes.iter_mut().zip(now).zip(self.counted) {
            *b += n - c;
        }
        self.counted = now;
    }

    /// Handles events from both sides until none are left (no recursion between sides).
    fn process(&mut self, cx: &mut Context<'_, ShardState>, mut c: BevEvents, mut u: BevEvents) {
        let mut rounds = 0;
        while (!c.is_empty() || !u.is_empty()) && self.closed.is_none() && rounds < 64 {
            rounds += 1;
            let (c2, u2) = self.client_events(cx, c);
            c = c2;
            u |= u2;
            if self.closed.is_some() {
                break;
            }
            let (c3, u3) = self.upstream_events(cx, u);
            u = u3;
            c |= c3;
        }
        if self.closed.is_none() {
            self.account(cx);
            self.check_done(cx);
        }
    }

    /// Client-side events; returns follow-up events for (client, upstream).
    fn client_events(
        &mut self,
        cx: &mut Context<'_, ShardState>,
        ev: BevEvents,
    ) -> (BevEvents, BevEvents) {
        let (c, mut u) = (BevEvents::empty(), BevEvents::empty());
        if ev.is_empty() {
            return (c, u);
        }
        if ev.contains(BevEvents::ERROR) {
            // The read that completed the handshake may also carry a bad record: the handshake
            // still succeeded, and the failure is the record's (tampered), not the handshake's.
            if C::SEALED && self.client.filter().is_open() {
                self.handshake_ok(cx);
            }
            // Bytes that arrived before the error (a reply, then a reset) still go on.
            let _ = self.pump_up(cx);
            let err = self.client.take_error();
            self.side_failed(cx, CLIENT, err);
            return (c, u);
        }
        if ev.contains(BevEvents::FILTER) && C::SEALED && self.client.filter().is_open() {
            self.handshake_ok(cx);
            // The backend is connected for the session's OPEN (normally in the same read as
            // Finished), once.
            if let Some(open) = self.client.filter_mut().take_open() {
                if let Some(a) = open.addrs {
                    tracing::trace!(client = %a.source, via = %a.destination, proxied = open.proxied, "session opened");
                }
                if let Some(i) = self.ident.as_deref_mut() {
                    i.opened(open);
                }
                self.connect_upstream(cx);
                if self.closed.is_some() {
                    return (c, u);
                }
            }
        }
        if self.ident.as_ref().is_some_and(|i| i.awaiting_header())
            && !self.proxy_header_read(cx, ev.contains(BevEvents::EOF))
        {
            return (c, u);
        }
        if ev.contains(BevEvents::EOF) && !self.client_eof {
            self.client_eof = true;
            self.arm_idle(cx);
        }
        if ev.contains(BevEvents::READ) || ev.contains(BevEvents::EOF) {
            u |= self.pump_up(cx);
        }
        if ev.contains(BevEvents::WRITE) {
            if let Some(up) = self.upstream.as_mut() {
                if self.client.output_pending() <= OUTPUT_LOW && up.is_suspended(Suspend::Peer) {
                    up.resume_read(cx, Suspend::Peer);
                }
            }
        }
        (c, u)
    }

    /// Upstream-side events; returns follow-up events for (client, upstream).
    fn upstream_events(
        &mut self,
        cx: &mut Context<'_, ShardState>,
        ev: BevEvents,
    ) -> (BevEvents, BevEvents) {
        let (mut c, mut u) = (BevEvents::empty(), BevEvents::empty());
        if ev.is_empty() || self.upstream.is_none() {
            return (c, u);
        }
        let connected = self.upstream.as_ref().is_some_and(|x| x.is_connected());
        if ev.contains(BevEvents::CONNECT_TIMEOUT) {
            let err = self.upstream.as_mut().and_then(|x| x.take_error());
            self.connect_failed(cx, err, ConnectOutcome::TimedOut);
            return (c, u);
        }
        if ev.contains(BevEvents::ERROR) && !ev.contains(BevEvents::CONNECTED) && !connected {
            let err = self.upstream.as_mut().and_then(|x| x.take_error());
            let outcome = ConnectOutcome::classify(err.as_ref(), false);
            if outcome != ConnectOutcome::ResetAfterConnect {
                self.connect_failed(cx, err, outcome);
                return (c, u);
            }
            // The peer accepted and reset before the connect's outcome was read (a decrypt
            // side whose backend refused, say): the target is up; this connection failed.
            self.upstream_reached(cx);
            self.side_failed(cx, UPSTREAM, err);
            return (c, u);
        }
        if ev.contains(BevEvents::ERROR) {
            if ev.contains(BevEvents::CONNECTED) {
                self.upstream_reached(cx);
            }
            // As on the client side: a handshake completed in the failing read still counts.
            if U::SEALED && self.upstream.as_ref().is_some_and(|x| x.filter().is_open()) {
                self.handshake_ok(cx);
            }
            let _ = self.pump_down(cx);
            let err = self.upstream.as_mut().and_then(|x| x.take_error());
            self.side_failed(cx, UPSTREAM, err);
            return (c, u);
        }
        if ev.contains(BevEvents::CONNECTED) {
            self.upstream_reached(cx);
            if U::SEALED {
                // The hello goes out now; client data waits in `output` until the session opens.
                let up = self.upstream.as_mut().expect("checked above");
                u |= up.flush(cx);
            }
            u |= self.pump_up(cx);
        }
        if ev.contains(BevEvents::FILTER)
            && U::SEALED
            && self.upstream.as_ref().is_some_and(|x| x.filter().is_open())
        {
            self.handshake_ok(cx);
            u |= self.pump_up(cx);
        }
        if ev.contains(BevEvents::READ) || ev.contains(BevEvents::EOF) {
            c |= self.pump_down(cx);
        }
        if ev.contains(BevEvents::WRITE)
            && self
                .upstream
                .as_ref()
                .is_some_and(|x| x.output_pending() <= OUTPUT_LOW)
            && self.client.is_suspended(Suspend::Peer)
        {
            self.client.resume_read(cx, Suspend::Peer);
        }
        if ev.contains(BevEvents::EOF) && !self.upstream_eof {
            self.upstream_eof = true;
            self.arm_idle(cx);
            c |= self.client.shutdown_write(cx);
        }
        (c, u)
    }

    /// Client input -> upstream output. Returns upstream events from the flush.
    fn pump_up(&mut self, cx: &mut Context<'_, ShardState>) -> BevEvents {
        let Some(up) = self.upstream.as_mut() else {
            return BevEvents::empty();
        };
        let mut ev = BevEvents::empty();
        if !self.client.input.is_empty() {
            self.client.input.move_all_to(&mut up.output);
            ev |= up.flush(cx);
            if up.output_pending() >= OUTPUT_HIGH && !self.client.is_suspended(Suspend::Peer) {
                self.client.suspend_read(Suspend::Peer);
                cx.state.tunnels[self.tunnel].metrics.flow_paused[0].inc();
            }
            self.client.consumed(cx);
        }
        let ready = !U::SEALED || up.filter().is_open();
        if self.client_eof && up.is_connected() && ready && !up.write_shut() {
            ev |= up.shutdown_write(cx);
        }
        ev
    }

    /// Upstream input -> client output. Returns client events from the flush.
    fn pump_down(&mut self, cx: &mut Context<'_, ShardState>) -> BevEvents {
        let Some(up) = self.upstream.as_mut() else {
            return BevEvents::empty();
        };
        let mut ev = BevEvents::empty();
        if !up.input.is_empty() {
            up.input.move_all_to(&mut self.client.output);
            ev |= self.client.flush(cx);
            if self.client.output_pending() >= OUTPUT_HIGH && !up.is_suspended(Suspend::Peer) {
                up.suspend_read(Suspend::Peer);
                cx.state.tunnels[self.tunnel].metrics.flow_paused[1].inc();
            }
            up.consumed(cx);
        }
        ev
    }

    /// accept_proxy (encrypt side): reads the client's PROXY header (`identity.rs`); once it
    /// is in, reading goes on as usual and the upstream connect starts, its OPEN naming the
    /// header's client. False while the header is incomplete, or if it failed (closing).
    fn proxy_header_read(&mut self, cx: &mut Context<'_, ShardState>, eof: bool) -> bool {
        let Some(id) = self.ident.as_deref_mut() else {
            return true;
        };
        match id.read_header(&mut self.client.input, eof) {
            HeaderStep::Wait => {
                self.client.consumed(cx);
                false
            }
            HeaderStep::Failed(e) => {
                self.proxy_header_failed(cx, e);
                false
            }
            HeaderStep::Ready => {
                self.client.set_watermarks(Watermarks {
                    read_low: 0,
                    read_high: READ_HIGH,
                    write_low: OUTPUT_LOW,
                });
                self.client.consumed(cx);
                // The tunnel handshake gets its own whole timeout.
                if let Some(k) = self.handshake_timer.take() {
                    cx.cancel_timer(k);
                }
                let t = cx.state.tunnels[self.tunnel].cfg.handshake_timeout;
                self.handshake_timer = Some(cx.timer(t, TAG_HANDSHAKE));
                self.connect_upstream(cx);
                self.closed.is_none()
            }
        }
    }

    fn proxy_header_failed(&mut self, cx: &mut Context<'_, ShardState>, e: HeaderError) {
        let peer = self.ident.as_ref().and_then(|i| i.peer());
        let (got, _) = self.client.wire_bytes();
        identity::header_failed(cx, self.tunnel, peer, e, got);
        self.finish(cx, CloseReason::ProxyHeader);
    }

    /// The access log line of this connection, if the tunnel keeps one (`identity.rs`).
    fn log_access(&self, cx: &mut Context<'_, ShardState>, reason: CloseReason) {
        if cx.state.tunnels[self.tunnel].access_log.is_none() {
            return;
        }
        let up = self.upstream.as_deref();
        let (cr, cw) = self.client.wire_bytes();
        let (ur, uw) = up.map_or((0, 0), |u| u.wire_bytes());
        identity::log_close(
            cx,
            self.tunnel,
            identity::Ended {
                reason,
                started: self.started,
                target: self.target,
                // Plaintext bytes (to, from) the backend: the client's side unless it is sealed.
                plain: if C::SEALED { (uw, ur) } else { (cr, cw) },
                relay: !C::SEALED && !U::SEALED,
                key_id: (self.client.filter().key_id()).or(up.and_then(|u| u.filter().key_id())),
                fs: (self.client.filter().forward_secrecy())
                    .or(up.and_then(|u| u.filter().forward_secrecy())),
                ident: self.ident.as_deref(),
            },
        );
    }

    fn handshake_ok(&mut self, cx: &mut Context<'_, ShardState>) {
        if self.handshake_done {
            return;
        }
        self.handshake_done = true;
        self.release_ticket(cx);
        if let Some(k) = self.handshake_timer.take() {
            cx.cancel_timer(k);
        }
        let took = cx.now() - self.started;
        let key = self
            .client
            .filter()
            .key_id()
            .or_else(|| self.upstream.as_ref().and_then(|u| u.filter().key_id()));
        let fs = self
            .client
            .filter()
            .forward_secrecy()
            .or_else(|| {
                self.upstream
                    .as_ref()
                    .and_then(|u| u.filter().forward_secrecy())
            })
            .unwrap_or(false);
        let now = cx.now();
        let rt = &mut cx.state.tunnels[self.tunnel];
        rt.count_session(key);
        let m = &rt.metrics;
        m.handshake("ok");
        m.session(fs);
        m.handshake_duration.observe(took.as_secs_f64());
        let allowed =
            rt.handshake.as_ref().map(|h| h.forward_secrecy) == Some(ForwardSecrecy::Allow);
        if !fs && C::SEALED && allowed {
            if let Some(sessions) = rt.may_warn_no_fs(now) {
                tracing::warn!(
                    tunnel = %rt.cfg.name,
                    key_id = %key.map(|k| k.to_string()).unwrap_or_default(),
                    sessions,
                    "accepted sessions without forward secrecy (forward_secrecy = \"allow\"): an encrypt side runs with forward secrecy off; a later leak of the key would expose their traffic. Turn it on there, then set forward_secrecy = \"require\" here"
                );
            }
        }
    }

    /// A side failed after connecting: classify, tell the far side, reset what must be reset,
    /// close.
    fn side_failed(&mut self, cx: &mut Context<'_, ShardState>, side: u8, err: Option<io::Error>) {
        let sealed = if side == CLIENT { C::SEALED } else { U::SEALED };
        let name = if side == CLIENT { "client" } else { "upstream" };
        if let Some(abort) = err.as_ref().and_then(peer_abort) {
            // The far sealpipe ended the session in an authenticated record: its plaintext peer
            // reset, it had no backend, or it gave up. Not an attack and not a truncation.
            let reason = match abort {
                AbortReason::Reset if side == CLIENT => CloseReason::ClientReset,
                AbortReason::Reset => CloseReason::UpstreamReset,
                AbortReason::Unreachable => CloseReason::UpstreamFailed,
                AbortReason::Timeout => CloseReason::IdleTimeout,
                AbortReason::Shutdown => CloseReason::PeerReset,
            };
            let level = if abort == AbortReason::Unreachable {
                tracing::Level::INFO
            } else {
                tracing::Level::DEBUG
            };
            if let Some(skipped) = may_log(cx, level) {
                let tunnel = &cx.state.tunnels[self.tunnel].cfg.name;
                if abort == AbortReason::Unreachable {
                    tracing::info!(%tunnel, side = name, skipped, "the decrypt side could not connect to its backend: client reset");
                } else {
                    tracing::debug!(%tunnel, side = name, abort = abort.as_str(), reason = reason.as_str(), skipped, "the far side aborted the connection");
                }
            }
            return self.finish_with(cx, reason, None);
        }
        let pe = err.as_ref().and_then(protocol_error);
        let reason = match pe {
            Some(e) if !self.handshake_done => {
                cx.state.tunnels[self.tunnel].metrics.handshake(e.reason());
                CloseReason::HandshakeFailed
            }
            Some(ProtocolError::Truncated) => CloseReason::Truncated,
            Some(_) => CloseReason::Tampered,
            // The kernel gave up on the peer: keepalive or TCP_USER_TIMEOUT (`keepalive`).
            None if err
                .as_ref()
                .is_some_and(|e| e.kind() == io::ErrorKind::TimedOut) =>
            {
                CloseReason::PeerTimeout
            }
            None => CloseReason::PeerReset,
        };
        let in_handshake = sealed && !self.handshake_done;
        let level = match pe {
            // A peer that connects and closes without a byte: port probes, TCP health checks.
            Some(ProtocolError::Truncated) if in_handshake && side == CLIENT => {
                tracing::Level::DEBUG
            }
            Some(_) => tracing::Level::WARN,
            None if in_handshake && side == UPSTREAM => tracing::Level::WARN,
            None => tracing::Level::DEBUG,
        };
        if let Some(skipped) = may_log(cx, level) {
            let tunnel = &cx.state.tunnels[self.tunnel].cfg.name;
            match pe {
                Some(e) if sealed && !self.handshake_done => {
                    self.log_handshake_failure(cx, side, e, skipped)
                }
                Some(e) => {
                    tracing::warn!(%tunnel, side = name, reason = reason.as_str(), error = e.reason(), skipped, "connection closed on bad input")
                }
                // The sealed peer reset the TCP connection during the handshake: on the encrypt
                // side that is the decrypt side refusing, as a close would be.
                None if sealed && !self.handshake_done && side == UPSTREAM => {
                    self.log_handshake_failure(cx, side, ProtocolError::Truncated, skipped)
                }
                None => match &err {
                    Some(e) => {
                        tracing::debug!(%tunnel, side = name, error = %e, skipped, "connection failed")
                    }
                    None => tracing::debug!(%tunnel, side = name, skipped, "connection failed"),
                },
            }
        }
        // A plaintext peer's failure (a reset, mostly) is told to the sealed far side, which
        // resets its own plaintext peer in turn.
        let abort = (!sealed).then_some(AbortReason::Reset);
        self.finish_with(cx, reason, abort)
    }

    /// The log line of a failed handshake, by role: the responder knows which check failed;
    /// the initiator only sees the responder close (it says nothing to an unauthenticated
    /// peer) and says what that most likely means.
    fn log_handshake_failure(
        &self,
        cx: &Context<'_, ShardState>,
        side: u8,
        e: ProtocolError,
        skipped: u64,
    ) {
        let rt = &cx.state.tunnels[self.tunnel];
        let tunnel = &rt.cfg.name;
        let error = e.reason();
        let policy = rt
            .handshake
            .as_ref()
            .map_or("", |h| h.forward_secrecy.as_str());
        let this_version = crate::protocol::handshake::VERSION;
        if side == CLIENT {
            // Responder (decrypt side): the precise cause.
            let peer = self.client.stream().and_then(|s| s.peer_addr().ok());
            let peer = peer.map(|p| p.to_string()).unwrap_or_default();
            let key_id = self
                .client
                .filter()
                .key_id()
                .map(|k| k.to_string())
                .unwrap_or_default();
            match e {
                ProtocolError::UnknownKey => {
                    let loaded = rt.handshake.as_ref().map_or(String::new(), |h| {
                        h.keys
                            .ids()
                            .map(|k| k.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    });
                    tracing::warn!(%tunnel, %peer, error, %key_id, %loaded, skipped, "handshake failed: the encrypt side uses key id {key_id}, which is not loaded here (loaded: {loaded}); load its key file here, or give it one of these keys")
                }
                ProtocolError::ForwardSecrecyRequired => {
                    tracing::warn!(%tunnel, %peer, error, %key_id, skipped, "handshake failed: the encrypt side did not offer forward secrecy, which this side requires (forward_secrecy = \"require\"); turn it on there, or set forward_secrecy = \"allow\" here")
                }
                ProtocolError::NotSealpipe => {
                    tracing::warn!(%tunnel, %peer, error, skipped, "handshake failed: not a sealpipe peer (plaintext or another protocol sent to this decrypt port; point plaintext clients at the encrypt side)")
                }
                ProtocolError::Version => {
                    let theirs = self.client.filter().peer_version().unwrap_or(0);
                    tracing::warn!(%tunnel, %peer, error, skipped, "handshake failed: the encrypt side speaks sealpipe protocol version {theirs}, this side speaks version {this_version}; run the same sealpipe release on both sides")
                }
                ProtocolError::BadMac => {
                    tracing::warn!(%tunnel, %peer, error, %key_id, skipped, "handshake failed: the hello names loaded key id {key_id} but its MAC does not verify (modified in flight, or a forged key id)")
                }
                ProtocolError::Replay => {
                    tracing::warn!(%tunnel, %peer, error, %key_id, skipped, "handshake failed: Finished did not verify (a recorded handshake replayed, or modified in flight)")
                }
                ProtocolError::Truncated => {
                    tracing::debug!(%tunnel, %peer, error, skipped, "handshake failed: the peer closed before completing the handshake")
                }
                _ => {
                    tracing::warn!(%tunnel, %peer, error, skipped, "handshake failed: malformed handshake")
                }
            }
            return;
        }
        // Initiator (encrypt side).
        let target = self
            .upstream
            .as_ref()
            .and_then(|u| u.stream())
            .and_then(|s| s.peer_addr().ok())
            .map(|p| p.to_string())
            .unwrap_or_default();
        let key_id = rt
            .handshake
            .as_ref()
            .map(|h| h.keys.primary().id().to_string())
            .unwrap_or_default();
        match e {
            ProtocolError::NotSealpipe => {
                tracing::warn!(%tunnel, %target, error, skipped, "handshake failed: the target answered with something that is not a sealpipe hello; is it the decrypt side's listen address (and not the backend itself)?")
            }
            ProtocolError::Version => {
                let theirs = self
                    .upstream
                    .as_ref()
                    .and_then(|u| u.filter().peer_version())
                    .unwrap_or(0);
                tracing::warn!(%tunnel, %target, error, skipped, "handshake failed: the decrypt side speaks sealpipe protocol version {theirs}, this side speaks version {this_version}; run the same sealpipe release on both sides")
            }
            ProtocolError::Truncated => {
                tracing::warn!(%tunnel, %target, error, %key_id, forward_secrecy = policy, skipped, "handshake failed: the decrypt side closed during the handshake: wrong key, key id {key_id} not loaded there, forward-secrecy policy mismatch (this side: {policy}), or a protocol version mismatch — see the decrypt side's log for which")
            }
            _ => {
                tracing::warn!(%tunnel, %target, error, %key_id, skipped, "handshake failed: the decrypt side's answer did not verify (modified in flight, or not the decrypt side holding this key)")
            }
        }
    }

    /// Both directions ended cleanly and everything was written: close.
    fn check_done(&mut self, cx: &mut Context<'_, ShardState>) {
        let up_done = self.upstream.as_ref().is_some_and(|u| u.write_shut());
        if self.client_eof && self.upstream_eof && up_done && self.client.write_shut() {
            self.finish(cx, CloseReason::Clean);
        }
    }

    /// Ends the connection with `reason`, telling the sealed far side with an ABORT when this
    /// side gives up on its own account (idle timeout, no backend, drain deadline).
    fn finish(&mut self, cx: &mut Context<'_, ShardState>, reason: CloseReason) {
        self.finish_with(cx, reason, abort_for(reason));
    }

    /// Ends the connection with `reason`, first sending `abort` on the sealed side if its
    /// session is open. Anything but a clean end resets the plaintext side(s) so their
    /// applications see an error, never a truncated stream that looks complete.
    fn finish_with(
        &mut self,
        cx: &mut Context<'_, ShardState>,
        reason: CloseReason,
        abort: Option<AbortReason>,
    ) {
        if self.closed.is_some() {
            return;
        }
        self.closed = Some(reason);
        if let Some(a) = abort {
            if C::SEALED && self.client.filter_mut().abort(a) {
                let _ = self.client.flush(cx);
                discard_unread(self.client.stream());
            }
            if let Some(up) = self.upstream.as_mut() {
                if U::SEALED && up.filter_mut().abort(a) {
                    let _ = up.flush(cx);
                    discard_unread(up.stream());
                }
            }
        }
        if reason != CloseReason::Clean {
            let tampered = reason == CloseReason::Tampered;
            if !C::SEALED || tampered {
                self.client.set_reset_on_close();
            }
            if let Some(up) = &self.upstream {
                if !U::SEALED || tampered {
                    up.set_reset_on_close();
                }
            }
        }
        cx.close();
    }
}

impl<C: Layer, U: Layer> Handler<ShardState> for Conn<C, U> {
    fn on_start(&mut self, cx: &mut Context<'_, ShardState>) {
        let rt = &mut cx.state.tunnels[self.tunnel];
        rt.active += 1;
        rt.metrics.accepted.inc();
        rt.metrics.active.inc();
        let hs_timeout = rt.cfg.handshake_timeout;
        cx.state.conns += 1;
        if let Some(id) = cx.id() {
            cx.state.live_conns.insert(id);
        }
        if let Err(e) = self.client.register(cx) {
            tracing::debug!(error = %e, "cannot register client socket");
            return self.finish(cx, CloseReason::PeerReset);
        }
        if C::SEALED || U::SEALED {
            self.handshake_timer = Some(cx.timer(hs_timeout, TAG_HANDSHAKE));
        }
        self.arm_idle(cx);
        if self.ident.as_ref().is_some_and(|i| i.awaiting_header()) {
            // accept_proxy: stage no more than a PROXY header until it is parsed; the upstream
            // connect waits for its addresses.
            self.client.set_watermarks(Watermarks {
                read_low: 0,
                read_high: identity::MAX_HEADER_LEN,
                write_low: OUTPUT_LOW,
            });
        } else if !C::SEALED {
            self.connect_upstream(cx);
        }
    }

    fn on_ready(&mut self, cx: &mut Context<'_, ShardState>, source: u8, ready: Ready) {
        self.last_active = cx.now();
        if self.asleep {
            // Awake again: watch for the next quiet spell (one timer move per wake-up).
            self.asleep = false;
            cx.state.tunnels[self.tunnel].metrics.hibernating.dec();
            self.arm_idle(cx);
        }
        if source == CLIENT {
            let ev = self.client.on_ready(cx, ready);
            self.process(cx, ev, BevEvents::empty());
        } else if let Some(up) = self.upstream.as_mut() {
            let ev = up.on_ready(cx, ready);
            self.process(cx, BevEvents::empty(), ev);
        }
    }

    fn on_notify(&mut self, cx: &mut Context<'_, ShardState>, tag: u64) {
        if tag == TAG_ABORT {
            return self.finish(cx, CloseReason::DrainDeadline);
        }
        if self.client.owns_tag(tag) {
            let ev = self.client.on_notify(cx, tag);
            self.process(cx, ev, BevEvents::empty());
        } else if let Some(up) = self.upstream.as_mut() {
            if up.owns_tag(tag) {
                let ev = up.on_notify(cx, tag);
                self.process(cx, BevEvents::empty(), ev);
            }
        }
    }

    fn on_timer(&mut self, cx: &mut Context<'_, ShardState>, tag: u64) {
        match tag {
            TAG_IDLE => {
                self.idle_timer = None;
                let now = cx.now();
                if self
                    .idle_limit(cx)
                    .is_some_and(|l| now >= self.last_active + l)
                {
                    self.finish(cx, CloseReason::IdleTimeout);
                } else {
                    if !self.asleep && now >= self.last_active + HIBERNATE_AFTER {
                        self.hibernate(cx);
                    }
                    self.arm_idle(cx);
                }
            }
            TAG_HANDSHAKE => {
                self.handshake_timer = None;
                if self.ident.as_ref().is_some_and(|i| i.awaiting_header()) {
                    return self.proxy_header_failed(cx, HeaderError::Timeout);
                }
                if !self.handshake_done {
                    let level = if U::SEALED {
                        tracing::Level::WARN
                    } else {
                        tracing::Level::DEBUG
                    };
                    let warn = may_log(cx, level);
                    let rt = &cx.state.tunnels[self.tunnel];
                    rt.metrics.handshake("timeout");
                    if let Some(skipped) = warn {
                        let (tunnel, limit) = (&rt.cfg.name, rt.cfg.handshake_timeout);
                        if U::SEALED {
                            // Our own connection to the decrypt side: connected, and silent.
                            tracing::warn!(%tunnel, timeout = ?limit, skipped, "handshake failed: no answer from the target within handshake_timeout; is it a sealpipe decrypt side (and not the backend itself), and not overloaded?");
                        } else {
                            tracing::debug!(%tunnel, timeout = ?limit, skipped, "handshake failed: the peer sent no complete handshake within handshake_timeout");
                        }
                    }
                    self.finish(cx, CloseReason::HandshakeFailed);
                }
            }
            _ => {
                if self.client.owns_tag(tag) {
                    let ev = self.client.on_timer(cx, tag);
                    self.process(cx, ev, BevEvents::empty());
                } else if let Some(up) = self.upstream.as_mut() {
                    if up.owns_tag(tag) {
                        let ev = up.on_timer(cx, tag);
                        self.process(cx, BevEvents::empty(), ev);
                    }
                }
            }
        }
    }

    fn on_close(&mut self, cx: &mut Context<'_, ShardState>) {
        self.release_ticket(cx);
        self.account(cx);
        let reason = self.closed.unwrap_or(CloseReason::DrainDeadline);
        self.log_access(cx, reason);
        for k in [self.idle_timer.take(), self.handshake_timer.take()]
            .into_iter()
            .flatten()
        {
            cx.cancel_timer(k);
        }
        self.client.close(cx);
        if let Some(up) = self.upstream.as_mut() {
            up.close(cx);
        }
        let now = cx.now();
        if let Some(id) = cx.id() {
            cx.state.live_conns.remove(&id);
        }
        let state = &mut *cx.state;
        state.conns -= 1;
        let rt = &mut state.tunnels[self.tunnel];
        if let Some(id) = self.target {
            rt.upstreams.release(id);
        }
        rt.active -= 1;
        rt.metrics.active.dec();
        if self.asleep {
            rt.metrics.hibernating.dec();
        }
        rt.metrics.closed(reason);
        rt.metrics
            .duration
            .observe((now - self.started).as_secs_f64());
        if rt.listener_paused && state.conns < state.conn_limit && !state.draining {
            if let Some(l) = rt.listener {
                cx.notify(l, super::listener::TAG_RESUME);
            }
        }
    }
}
