//! One proxied connection: a handler owning both of its `BufferEvent`s.
//!
//! `Conn<C, U>` is generic over the layer of each side: the client side `C` and the upstream
//! side `U` are each plain ([`NoFilter`]) or sealed ([`SealFilter`]). encrypt = `Conn<NoFilter,
//! SealFilter>`, decrypt = `Conn<SealFilter, NoFilter>`, forward = `Conn<NoFilter, NoFilter>`;
//! each is compiled to its own code, with no dynamic dispatch on the data path.
//!
//! Lifecycle: the decrypt side connects to its backend only after the handshake (including the
//! initiator's Finished) verified, so a wrong key or a replayed session never reaches the
//! backend. Half-close flows through: a side's end (FIN, or an authenticated END record on the
//! sealed side) becomes a shutdown of the far side's write half after its output drains, and
//! the other direction keeps going. A FIN on a sealed side without END is a truncation: the
//! plaintext side is reset, not closed cleanly. A tampered record resets both sides.
//!
//! Quiet connections hibernate: after [`HIBERNATE_AFTER`] without activity the sealed side
//! drops its expanded AEAD keys (the next record re-derives them from the traffic secrets) and
//! both sides' empty buffers give back their chunk lists, so an idle connection costs little
//! more than this handler. The idle timer carries both deadlines (one timer, lazily re-armed),
//! so neither costs anything per read.

use std::io;
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use crate::metrics::{Bytes, CloseReason};
use crate::protocol::{EphemeralPool, KeyId, ProtocolError};
use crate::reactor::{
    BevEvents, BufferEvent, Context, Filter, Handler, NoFilter, Ready, Suspend, Timeouts, TimerKey,
    Watermarks,
};

use super::codec::{Role, SealFilter, protocol_error};
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

/// A side's layer: plain or sealed.
pub trait Layer: Filter + Sized + 'static {
    const SEALED: bool;
    /// The layer for a new connection; sealed layers take an ephemeral key from `keys`.
    fn make(role: Role, t: &TunnelRt, keys: &mut EphemeralPool) -> Self;
    /// Handshake complete (always true for plain).
    fn is_open(&self) -> bool;
    /// The pre-shared key the session uses (none for plain).
    fn key_id(&self) -> Option<KeyId> {
        None
    }
    /// Drops what the layer can rebuild on its next use; true if it dropped keys.
    fn hibernate(&mut self) -> bool {
        false
    }
}

impl Layer for NoFilter {
    const SEALED: bool = false;
    fn make(_: Role, _: &TunnelRt, _: &mut EphemeralPool) -> Self {
        NoFilter
    }
    fn is_open(&self) -> bool {
        true
    }
}

impl Layer for SealFilter {
    const SEALED: bool = true;
    fn make(role: Role, t: &TunnelRt, keys: &mut EphemeralPool) -> Self {
        let cfg = t
            .handshake
            .as_ref()
            .expect("sealed tunnels always carry a handshake config");
        let mut f = SealFilter::with_pool(role, cfg, Some(keys));
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
    fn hibernate(&mut self) -> bool {
        SealFilter::hibernate(self)
    }
}

/// A proxied connection.
pub struct Conn<C: Layer, U: Layer> {
    tunnel: usize,
    client: BufferEvent<C>,
    upstream: Option<BufferEvent<U>>,
    /// Index of the target in use, and the targets already tried (bitmask).
    target: Option<usize>,
    tried: u64,
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
}

impl<C: Layer, U: Layer> Conn<C, U> {
    /// Builds the handler for an accepted client socket.
    pub fn new(t: &TunnelRt, keys: &mut EphemeralPool, stream: TcpStream, now: Instant) -> Self {
        let filter = C::make(Role::Responder, t, keys);
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
            tried: 0,
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
        }
    }

    fn rt<'a>(&self, cx: &'a mut Context<'_, ShardState>) -> &'a mut TunnelRt {
        &mut cx.state.tunnels[self.tunnel]
    }

    /// Connects to the next healthy target; closes the connection when none is left.
    fn connect_upstream(&mut self, cx: &mut Context<'_, ShardState>) {
        let now = cx.now();
        let state = &mut *cx.state;
        let rt = &mut state.tunnels[self.tunnel];
        let Some(i) = rt.upstreams.pick(now, self.tried) else {
            return self.finish(cx, CloseReason::UpstreamFailed);
        };
        self.tried |= 1u64.checked_shl(i as u32).unwrap_or(0);
        self.target = Some(i);
        rt.upstreams.targets[i].active += 1;
        let addr = rt.upstreams.targets[i].addr;
        let timeouts = Timeouts {
            connect: Some(rt.cfg.connect_timeout),
            ..Timeouts::default()
        };
        let filter = U::make(Role::Initiator, rt, &mut state.ephemeral_keys);
        self.connect_started = now;
        let mut up =
            BufferEvent::connect_filtered(cx, addr, UPSTREAM, filter, !U::SEALED, timeouts);
        up.set_watermarks(Watermarks {
            read_low: 0,
            read_high: READ_HIGH,
            write_low: OUTPUT_LOW,
        });
        if let Err(e) = up.register(cx) {
            tracing::debug!(error = %e, "cannot register upstream socket");
        }
        self.upstream = Some(up);
    }

    /// The current upstream failed to connect: count it, mark it down, try the next one.
    fn connect_failed(
        &mut self,
        cx: &mut Context<'_, ShardState>,
        err: Option<io::Error>,
        timed_out: bool,
    ) {
        let now = cx.now();
        if let Some(mut up) = self.upstream.take() {
            // Client bytes already handed to this upstream go to the next one, in order.
            let mut unsent = std::mem::take(&mut up.output);
            self.client.input.move_all_to(&mut unsent);
            self.client.input = unsent;
            up.close(cx);
        }
        let Some(i) = self.target.take() else {
            return;
        };
        let reason = if timed_out {
            1
        } else {
            match err.as_ref().map(|e| e.kind()) {
                Some(io::ErrorKind::ConnectionRefused) => 0,
                Some(io::ErrorKind::TimedOut) => 1,
                _ => 2,
            }
        };
        let warn = cx.state.may_warn(now);
        let rt = self.rt(cx);
        rt.upstreams.targets[i].active -= 1;
        let addr = rt.upstreams.targets[i].addr;
        // Out of descriptors or memory is this process's trouble, not the upstream's.
        let ours = err
            .as_ref()
            .is_some_and(crate::reactor::listener::is_resource_exhaustion);
        let went_down = !ours && rt.upstreams.failed(i, now);
        if let Some(m) = rt.metrics.upstreams.get(i) {
            m.failures[reason].inc();
        }
        let tunnel = rt.cfg.name.clone();
        if ours {
            // Every other target would fail the same way: end this client, and make the
            // listener back off so the freed fd does not just admit the next one to fail.
            if let Some(l) = rt.listener {
                cx.notify(l, super::listener::TAG_EXHAUSTED);
            }
            if let Some(skipped) = warn {
                tracing::debug!(%tunnel, upstream = %addr, error = %super::OptError(&err), skipped, "upstream connect: out of resources");
            }
            return self.finish(cx, CloseReason::UpstreamFailed);
        }
        if went_down {
            tracing::warn!(%tunnel, upstream = %addr, error = %super::OptError(&err), timed_out, "upstream marked down");
        } else if let Some(skipped) = warn {
            tracing::debug!(%tunnel, upstream = %addr, error = %super::OptError(&err), skipped, "upstream connect failed");
        }
        self.connect_upstream(cx);
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
            self.connect_upstream(cx);
            if self.closed.is_some() {
                return (c, u);
            }
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
            self.connect_failed(cx, err, true);
            return (c, u);
        }
        if ev.contains(BevEvents::ERROR) && !ev.contains(BevEvents::CONNECTED) && !connected {
            let err = self.upstream.as_mut().and_then(|x| x.take_error());
            self.connect_failed(cx, err, false);
            return (c, u);
        }
        if ev.contains(BevEvents::ERROR) {
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
            let took = cx.now() - self.connect_started;
            if let Some(i) = self.target {
                let rt = self.rt(cx);
                if rt.upstreams.succeeded(i) {
                    let (tunnel, addr) = (rt.cfg.name.clone(), rt.upstreams.targets[i].addr);
                    tracing::info!(%tunnel, upstream = %addr, "upstream is up again");
                }
                if let Some(m) = rt.metrics.upstreams.get(i) {
                    m.connect.observe(took.as_secs_f64());
                }
            }
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

    fn handshake_ok(&mut self, cx: &mut Context<'_, ShardState>) {
        if self.handshake_done {
            return;
        }
        self.handshake_done = true;
        if let Some(k) = self.handshake_timer.take() {
            cx.cancel_timer(k);
        }
        let took = cx.now() - self.started;
        let key = self
            .client
            .filter()
            .key_id()
            .or_else(|| self.upstream.as_ref().and_then(|u| u.filter().key_id()));
        let rt = &cx.state.tunnels[self.tunnel];
        rt.count_session(key);
        let m = &rt.metrics;
        m.handshake("ok");
        m.handshake_duration.observe(took.as_secs_f64());
    }

    /// A side failed after connecting: classify, reset what must be reset, close.
    fn side_failed(&mut self, cx: &mut Context<'_, ShardState>, side: u8, err: Option<io::Error>) {
        let pe = err.as_ref().and_then(protocol_error);
        let reason = match pe {
            Some(e) if !self.handshake_done => {
                cx.state.tunnels[self.tunnel].metrics.handshake(e.reason());
                CloseReason::HandshakeFailed
            }
            Some(ProtocolError::Truncated) => CloseReason::Truncated,
            Some(_) => CloseReason::Tampered,
            None => CloseReason::PeerReset,
        };
        let now = cx.now();
        if let Some(skipped) = cx.state.may_warn(now) {
            let tunnel = &cx.state.tunnels[self.tunnel].cfg.name;
            let side = if side == CLIENT { "client" } else { "upstream" };
            match pe {
                Some(e) => {
                    tracing::warn!(%tunnel, side, reason = reason.as_str(), error = e.reason(), skipped, "connection closed on bad input")
                }
                None => {
                    tracing::debug!(%tunnel, side, error = %super::OptError(&err), skipped, "connection failed")
                }
            }
        }
        self.finish(cx, reason);
    }

    /// Both directions ended cleanly and everything was written: close.
    fn check_done(&mut self, cx: &mut Context<'_, ShardState>) {
        let up_done = self.upstream.as_ref().is_some_and(|u| u.write_shut());
        if self.client_eof && self.upstream_eof && up_done && self.client.write_shut() {
            self.finish(cx, CloseReason::Clean);
        }
    }

    /// Ends the connection with `reason`. Anything but a clean end resets the plaintext side(s)
    /// so their applications see an error, never a truncated stream that looks complete.
    fn finish(&mut self, cx: &mut Context<'_, ShardState>, reason: CloseReason) {
        if self.closed.is_some() {
            return;
        }
        self.closed = Some(reason);
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
        if !C::SEALED {
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
                if !self.handshake_done {
                    cx.state.tunnels[self.tunnel].metrics.handshake("timeout");
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
        self.account(cx);
        let reason = self.closed.unwrap_or(CloseReason::DrainDeadline);
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
        if let Some(i) = self.target {
            if let Some(t) = rt.upstreams.targets.get_mut(i) {
                t.active = t.active.saturating_sub(1);
            }
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
