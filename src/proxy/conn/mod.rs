//! One proxied connection: the handler that joins a connection core to two sockets and the
//! shard.
//!
//! `Conn<C, U>` is generic over the layer of each side: the client side `C` and the upstream
//! side `U` are each plain ([`NoFilter`]) or sealed ([`SealFilter`]). encrypt = `Conn<NoFilter,
//! SealFilter>`, decrypt = `Conn<SealFilter, NoFilter>`, forward = `Conn<NoFilter, NoFilter>`;
//! each is compiled to its own code, with no dynamic dispatch on the data path.
//!
//! The decisions — connect and failover, half-close, END vs truncation vs tamper vs ABORT,
//! resets, backpressure, timeouts, hibernation — are the [`ConnCore`]'s (`core.rs`, where the
//! lifecycle is described), which does no I/O and reads no clock. `Conn` is its adapter
//! ([`Env`] over the loop's [`Context`]): it feeds the core the sockets' events and the loop's
//! `now`, carries out what the core asks of the sockets (write, re-drive, connect, reset),
//! arms and cancels its timers, and turns the core's [`Action`]s into metrics, rate-limited log
//! lines and admission bookkeeping. Handshake failures are logged where they can be told
//! apart: the responder names the check that failed; the initiator, which only sees the
//! responder close, says what that most likely means.
//!
//! Client identity (`identity.rs`) joins through the core's extension points, with its state
//! in an optional box beside the core (`None` for a tunnel that uses none of it): the client's
//! PROXY header (`accept_proxy`) is [`Env::client_preamble`], and its timeout
//! [`Action::PreambleTimeout`]; the OPEN an encrypt side seals comes from
//! [`Env::upstream_layer`]; a decrypt side learns the session's OPEN from
//! [`Action::SessionOpened`] and puts the backend's PROXY header (`send_proxy`) in
//! [`Env::upstream_preamble`]; the access log line is written at [`Action::Closed`].

pub mod core;
mod handoff;
#[cfg(test)]
mod migrate_tests;
#[cfg(test)]
mod pair;
#[cfg(test)]
mod tests;
pub mod warm;

use std::io::{self, Read};
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use crate::metrics::{Bytes, CloseReason};
use crate::protocol::{AbortReason, ForwardSecrecy, KeyId, OpenInfo, ProtocolError, RandomSource};
use crate::reactor::{
    BevCore, BevEvents, Buffer, BufferEvent, Context, Filter, Handler, NoFilter, Ready, Socket,
    Stream, Suspend, Tag, Timeouts, TimerKey,
};

use self::core::migrate::Migrate;
pub use self::core::{Action, ConnCore, Env, HIBERNATE_AFTER, Layer, Side};
use self::core::{Cause, ConnTimer, Failure, Flow, Limits, Preamble, UnopenedEnd, WarmStep};
use self::handoff::Moving;
pub use self::handoff::{ImportError, spawn_imported, tunnel_for};
use crate::metrics::WarmEvent;

use super::codec::{Role, SealFilter};
use super::identity::{self, ConnIdentity, HeaderError, HeaderStep};
use super::listener::Ticket;
use super::ratelimit::{self, metered};
use super::upstream::{ConnectOutcome, TargetId, Tried, Upstreams};
use super::{ByteCounts, OptError, ShardState, TargetAddr, TunnelIdx, TunnelRt};

/// Timer tags of the connection itself (its BufferEvents' are theirs: see `reactor::tag`).
const TAG_IDLE: Tag = Tag::new(1);
const TAG_HANDSHAKE: Tag = Tag::new(2);
/// Notify tag: the shard's drain deadline passed.
pub const TAG_ABORT: Tag = Tag::new(3);
/// Notify tag: the shard started to drain (a decrypt side's unopened warm session closes now).
pub const TAG_DRAIN_STARTED: Tag = Tag::new(4);
const TAG_LIFETIME: Tag = Tag::new(5);
/// Notify tag: a reload changed the tunnel's limits (`max_lifetime`): timers are armed again.
pub const TAG_LIMITS: Tag = Tag::new(6);

/// A target's address for log fields; a reload may have removed the target.
struct Upstream(Option<TargetAddr>);

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("(removed by a reload)"),
        }
    }
}

/// A layer the shard can make for a tunnel's connection (and move to a successor process).
pub trait Make: Layer + Migrate {
    /// The layer for a new connection (a sealed initiator takes an ephemeral key from the
    /// shard's pool; a responder only once a hello verifies).
    fn make(role: Role, t: &TunnelRt) -> Self;
}

impl Layer for NoFilter {
    const SEALED: bool = false;
    fn is_open(&self) -> bool {
        true
    }
}

impl Make for NoFilter {
    fn make(_: Role, _: &TunnelRt) -> Self {
        NoFilter
    }
}

impl<R: RandomSource + 'static> Layer for SealFilter<R> {
    const SEALED: bool = true;
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

impl Make for SealFilter {
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
}

/// The OPEN an encrypt side sends for its client: the addresses of the accepted socket (none
/// for a Unix domain socket's client).
fn client_open(client: &Socket) -> OpenInfo {
    let addrs = client
        .stream()
        .and_then(Stream::as_tcp)
        .and_then(|s| Some((s.peer_addr().ok()?, s.local_addr().ok()?)));
    match addrs {
        Some((source, destination)) => OpenInfo::from_socket(source, destination),
        None => OpenInfo::default(),
    }
}

/// Reads and discards what a socket that is about to close still holds, so that the kernel
/// closes it with a FIN after the queued bytes (an ABORT record) instead of a RST that would
/// drop them. Bounded: a peer that keeps sending is cut by the RST it then earns.
pub(crate) fn discard_unread(stream: Option<&Stream>) {
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

/// What the adapter keeps beside the core: the loop's handles and the shard's bookkeeping.
struct Shell {
    tunnel: TunnelIdx,
    idle_timer: Option<TimerKey>,
    /// The handshake's timer, then `max_lifetime`'s: the core never arms both at once
    /// ([`ConnTimer::Lifetime`]), and one slot keeps the connection's size.
    deadline_timer: Option<TimerKey>,
    /// Admission's hold on a pre-authentication slot, until the handshake completes.
    ticket: Option<Ticket>,
    /// Client identity (PROXY headers in or out, the access log): `identity.rs`; `None` for
    /// a tunnel that uses none of it.
    ident: Option<Box<ConnIdentity>>,
    /// Where it stands in a live upgrade (`handoff.rs`).
    moving: Moving,
}

impl Shell {
    /// A new connection's shell: no timer armed, no ticket held, live in this process.
    fn new(tunnel: TunnelIdx, ident: Option<Box<ConnIdentity>>, moving: Moving) -> Shell {
        Shell {
            tunnel,
            idle_timer: None,
            deadline_timer: None,
            ticket: None,
            ident,
            moving,
        }
    }

    /// The shell of a connection accepted here from `stream`: its identity as the tunnel's
    /// settings ask for it.
    fn accepted(t: &TunnelRt, stream: &Stream) -> Shell {
        let peer = || stream.as_tcp()?.peer_addr().ok();
        let ident = ConnIdentity::for_tunnel(&t.cfg.identity, peer);
        Shell::new(t.index, ident, Moving::Live)
    }
}

/// A proxied connection.
pub struct Conn<C: Make, U: Make> {
    core: ConnCore<C, U, Socket>,
    shell: Shell,
}

impl<C: Make, U: Make> Conn<C, U> {
    /// Builds the handler for an accepted client socket.
    pub fn new(t: &TunnelRt, stream: Stream, now: Instant) -> Self {
        let filter = C::make(Role::Responder, t);
        let shell = Shell::accepted(t, &stream);
        let client = BufferEvent::with_filter(stream, Side::Client as u8, filter, !C::SEALED);
        Conn {
            core: ConnCore::new(client, now),
            shell,
        }
    }

    /// Holds an admission ticket (see `listener::Admission`) until the handshake completes.
    pub fn with_ticket(mut self, ticket: Option<Ticket>) -> Self {
        self.shell.ticket = ticket;
        self
    }
}

impl Conn<NoFilter, SealFilter> {
    /// An encrypt side's connection for an accepted client that takes a warm session
    /// (`proxy::warm`): `upstream`, connected to `target` and handshaken, its OPEN held.
    /// `tried` is the balance's choice that named the target.
    pub fn adopt(
        t: &TunnelRt,
        stream: Stream,
        upstream: BufferEvent<SealFilter>,
        target: TargetId,
        tried: Tried,
        now: Instant,
    ) -> Self {
        let shell = Shell::accepted(t, &stream);
        let client = BufferEvent::with_filter(stream, Side::Client as u8, NoFilter, true);
        Conn {
            core: ConnCore::adopt(client, upstream, target, tried, now),
            shell,
        }
    }
}

impl<C: Make, U: Make> Conn<C, U> {
    /// The core, and the `Env` it acts through.
    fn parts<'s, 'b>(
        &'s mut self,
        cx: &'s mut Context<'b, ShardState>,
    ) -> (&'s mut ConnCore<C, U, Socket>, ConnEnv<'s, 'b, C, U>) {
        let env = ConnEnv {
            cx,
            shell: &mut self.shell,
            layers: PhantomData,
        };
        (&mut self.core, env)
    }

    /// Feeds events of `side` to the core.
    fn handle(&mut self, cx: &mut Context<'_, ShardState>, side: Side, ev: BevEvents) {
        let now = cx.now();
        let (core, mut env) = self.parts(cx);
        core.handle(side, ev, now, &mut env);
    }
}

/// The core's [`Env`] over the loop: the sockets are the core's sides' [`Socket`]s.
struct ConnEnv<'s, 'b, C, U> {
    cx: &'s mut Context<'b, ShardState>,
    shell: &'s mut Shell,
    layers: PhantomData<fn() -> (C, U)>,
}

impl<C: Make, U: Make> ConnEnv<'_, '_, C, U> {
    fn rt(&mut self) -> &mut TunnelRt {
        &mut self.cx.state.tunnels[self.shell.tunnel]
    }

    /// Gives the admission ticket back: a handshake slot, or (`unopened`: the handshake
    /// completed and the ticket was kept) an unopened session's slot.
    fn release_ticket(&mut self, unopened: bool) {
        if let Some(t) = self.shell.ticket.take() {
            if unopened {
                self.cx.state.admission.release_unopened(t);
            } else {
                self.cx.state.admission.release(t);
            }
        }
    }

    /// A step of a warm session's life (see `WarmStep`): the gauge, the counters, and an
    /// unopened session's admission slot.
    fn warm_step(&mut self, step: WarmStep) {
        // (gauge move, event); a session refused over its cap was never held.
        let (held, event) = match step {
            WarmStep::Held => (1, WarmEvent::Held),
            WarmStep::Opened => {
                self.release_ticket(true);
                (-1, WarmEvent::Opened)
            }
            WarmStep::Closed(UnopenedEnd::OverCap) => (0, WarmEvent::OverCap),
            WarmStep::Closed(end) => (
                -1,
                match end {
                    UnopenedEnd::Unused => WarmEvent::Unused,
                    UnopenedEnd::Expired => WarmEvent::Expired,
                    UnopenedEnd::Shutdown => WarmEvent::Shutdown,
                    UnopenedEnd::OverCap | UnopenedEnd::Lost => WarmEvent::Lost,
                },
            ),
            WarmStep::Retried => (0, WarmEvent::Retried),
        };
        let m = &self.rt().metrics;
        if held != 0 {
            m.warm_add(held);
        }
        m.warm_event(event);
        if step == WarmStep::Retried {
            if let Some(skipped) = may_log(self.cx, tracing::Level::DEBUG) {
                let tunnel = &self.rt().cfg.name;
                tracing::debug!(%tunnel, skipped, "a warm session was declined (ABORT unopened) as its client's OPEN left: the client's bytes go again on a fresh session");
            }
        }
        if matches!(step, WarmStep::Closed(UnopenedEnd::OverCap)) {
            let now = self.cx.now();
            if let Some(skipped) = self.cx.state.may_warn(now) {
                let rt = &self.cx.state.tunnels[self.shell.tunnel];
                let cap = self.cx.state.admission.unopened_per_source();
                tracing::warn!(tunnel = %rt.cfg.name, cap, skipped, "warm session refused: its source holds max_unopened_per_source sessions without an OPEN; its encrypt side replaces it elsewhere (raise the cap, or lower warm_max there)");
            }
        }
    }

    fn set_timer(&mut self, which: ConnTimer, at: Option<Instant>) {
        let (slot, tag) = match which {
            ConnTimer::Idle => (&mut self.shell.idle_timer, TAG_IDLE),
            ConnTimer::Handshake => (&mut self.shell.deadline_timer, TAG_HANDSHAKE),
            ConnTimer::Lifetime => (&mut self.shell.deadline_timer, TAG_LIFETIME),
        };
        if let Some(k) = slot.take() {
            self.cx.cancel_timer(k);
        }
        if let Some(at) = at {
            *slot = Some(self.cx.timer_at(at, tag));
        }
    }

    fn handshake_ok(&mut self, key: Option<KeyId>, fs: bool, took: Duration, held: bool) {
        if !held {
            self.release_ticket(false);
        }
        let now = self.cx.now();
        let rt = self.rt();
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

    fn handshake_timeout(&mut self) {
        let level = if U::SEALED {
            tracing::Level::WARN
        } else {
            tracing::Level::DEBUG
        };
        let warn = may_log(self.cx, level);
        let rt = self.rt();
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
    }

    fn upstream_reached(&mut self, id: TargetId, took: Duration, was_down: bool) {
        let rt = self.rt();
        let Some(i) = rt.upstreams.index_of(id) else {
            return;
        };
        let i_metrics = i.get();
        if was_down {
            let (tunnel, upstream) = (&rt.cfg.name, rt.upstreams.targets()[i].addr);
            tracing::info!(%tunnel, %upstream, "upstream is up again");
        }
        if let Some(m) = rt.metrics.upstreams.get(i_metrics) {
            m.connect.observe(took.as_secs_f64());
        }
    }

    fn connect_failed(
        &mut self,
        id: TargetId,
        outcome: ConnectOutcome,
        err: Option<&io::Error>,
        went_down: bool,
    ) {
        let now = self.cx.now();
        let warn = self.cx.state.may_warn(now);
        let rt = &mut self.cx.state.tunnels[self.shell.tunnel];
        // `None`: a reload removed the target while its connect was in flight.
        let index = rt.upstreams.index_of(id);
        let addr = index.map(|i| rt.upstreams.targets()[i].addr);
        if let (Some(i), Some(r)) = (index, outcome.failure_reason()) {
            if let Some(m) = rt.metrics.upstreams.get(i.get()) {
                m.failures[r as usize].inc();
            }
        }
        let tunnel = &rt.cfg.name;
        let upstream = Upstream(addr);
        let error = OptError(err);
        if outcome == ConnectOutcome::Exhausted {
            // Every other target would fail the same way: the core ends this client, and the
            // listener backs off so the freed fd does not just admit the next one to fail.
            if let Some(skipped) = warn {
                tracing::debug!(%tunnel, %upstream, %error, skipped, "upstream connect: out of resources");
            }
            if let Some(l) = rt.listener {
                self.cx.notify(l, super::listener::TAG_EXHAUSTED);
            }
            return;
        }
        let timed_out = outcome == ConnectOutcome::TimedOut;
        if went_down {
            tracing::warn!(%tunnel, %upstream, %error, timed_out, "upstream marked down");
        } else if let Some(skipped) = warn {
            tracing::debug!(%tunnel, %upstream, %error, skipped, "upstream connect failed");
        }
    }

    /// Counts and logs a side's failure (the core closes the connection).
    fn failed(&mut self, f: Failure<'_, Socket>) {
        let name = f.side.as_str();
        let pe = match f.cause {
            Cause::PeerAbort(abort) => {
                let level = if abort == AbortReason::Unreachable {
                    tracing::Level::INFO
                } else {
                    tracing::Level::DEBUG
                };
                if let Some(skipped) = may_log(self.cx, level) {
                    let tunnel = &self.rt().cfg.name;
                    if abort == AbortReason::Unreachable {
                        tracing::info!(%tunnel, side = name, skipped, "the decrypt side could not connect to its backend: client reset");
                    } else {
                        tracing::debug!(%tunnel, side = name, abort = abort.as_str(), reason = f.reason.as_str(), skipped, "the far side aborted the connection");
                    }
                }
                return;
            }
            Cause::Protocol(e) => Some(e),
            Cause::Io(_) => None,
        };
        if let Some(e) = pe {
            if !f.handshake_done {
                self.rt().metrics.handshake(e.reason());
            }
        }
        let in_handshake = f.sealed && !f.handshake_done;
        let level = match pe {
            // A peer that connects and closes without a byte: port probes, TCP health checks.
            Some(ProtocolError::Truncated) if in_handshake && f.side == Side::Client => {
                tracing::Level::DEBUG
            }
            Some(_) => tracing::Level::WARN,
            None if in_handshake && f.side == Side::Upstream => tracing::Level::WARN,
            None => tracing::Level::DEBUG,
        };
        let Some(skipped) = may_log(self.cx, level) else {
            return;
        };
        let tunnel = &self.cx.state.tunnels[self.shell.tunnel].cfg.name;
        match (pe, f.cause) {
            (Some(e), _) if in_handshake => self.log_handshake_failure(&f, e, skipped),
            (Some(e), _) => {
                tracing::warn!(%tunnel, side = name, reason = f.reason.as_str(), error = e.reason(), skipped, "connection closed on bad input")
            }
            // The sealed peer reset the TCP connection during the handshake: on the encrypt
            // side that is the decrypt side refusing, as a close would be.
            (None, _) if in_handshake && f.side == Side::Upstream => {
                self.log_handshake_failure(&f, ProtocolError::Truncated, skipped)
            }
            (None, Cause::Io(Some(e))) => {
                tracing::debug!(%tunnel, side = name, error = %e, skipped, "connection failed")
            }
            (None, _) => tracing::debug!(%tunnel, side = name, skipped, "connection failed"),
        }
    }

    /// The log line of a failed handshake, by role: the responder knows which check failed;
    /// the initiator only sees the responder close (it says nothing to an unauthenticated
    /// peer) and says what that most likely means.
    fn log_handshake_failure(&mut self, f: &Failure<'_, Socket>, e: ProtocolError, skipped: u64) {
        let rt = self.rt();
        let tunnel = &rt.cfg.name;
        let error = e.reason();
        let policy = rt
            .handshake
            .as_ref()
            .map_or("", |h| h.forward_secrecy.as_str());
        let this_version = crate::protocol::handshake::VERSION;
        let peer =
            f.io.and_then(|s| s.stream())
                .and_then(Stream::as_tcp)
                .and_then(|s| s.peer_addr().ok())
                .map(|p| p.to_string())
                .unwrap_or_default();
        if f.side == Side::Client {
            // Responder (decrypt side): the precise cause.
            let key_id = f.key_id.map(|k| k.to_string()).unwrap_or_default();
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
                    let theirs = f.peer_version.unwrap_or(0);
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
        let target = peer;
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
                let theirs = f.peer_version.unwrap_or(0);
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

    /// `max_lifetime` ended the connection (gracefully, or by a reset: see the core).
    fn lifetime_end(&mut self, graceful: bool) {
        let level = if graceful {
            tracing::Level::DEBUG
        } else {
            tracing::Level::INFO
        };
        let log = may_log(self.cx, level);
        let rt = self.rt();
        rt.metrics.lifetime_end(graceful);
        if let Some(skipped) = log {
            let tunnel = &rt.cfg.name;
            if graceful {
                tracing::debug!(%tunnel, skipped, "max_lifetime: ended at a quiet moment");
            } else {
                tracing::info!(%tunnel, skipped, "max_lifetime: reset, as the connection did not end gracefully within max_lifetime_grace (never quiet, bytes after the end, or a peer that did not close)");
            }
        }
    }

    fn closed(&mut self, reason: CloseReason, duration: Duration, asleep: bool) {
        let m = &self.rt().metrics;
        m.active.dec();
        if asleep {
            m.hibernating.dec();
        }
        m.closed(reason);
        m.duration.observe(duration.as_secs_f64());
    }

    /// The client's PROXY header was refused, or did not come in time (`received`: the bytes
    /// the client sent).
    fn header_failed(&mut self, e: HeaderError, received: u64) {
        let peer = self.shell.ident.as_ref().and_then(|i| i.peer());
        identity::header_failed(self.cx, self.shell.tunnel, peer, e, received);
    }

    /// The access log line of this connection, if the tunnel keeps one (`identity.rs`).
    fn log_access(
        &mut self,
        reason: CloseReason,
        duration: Duration,
        bytes: &ByteCounts,
        session: (Option<TargetId>, Option<KeyId>, Option<bool>),
    ) {
        // A warm session that closed before its OPEN (a decrypt side's `unopened`) served no
        // client: the access log is one line per client connection.
        if self.rt().access_log.is_none() || reason == CloseReason::Unopened {
            return;
        }
        let (target, key_id, fs) = session;
        identity::log_close(
            self.cx,
            self.shell.tunnel,
            identity::Ended {
                reason,
                duration,
                target,
                // Plaintext bytes (to, from) the backend: the client's side unless it is sealed.
                plain: (bytes[Bytes::UpPlain], bytes[Bytes::DownPlain]),
                relay: !C::SEALED && !U::SEALED,
                key_id,
                fs,
                ident: self.shell.ident.as_deref(),
            },
        );
    }
}

impl<C: Make, U: Make> Env<U, Socket> for ConnEnv<'_, '_, C, U> {
    fn flush<F: Filter>(&mut self, bev: &mut BevCore<F, Socket>) -> BevEvents {
        bev.flush(self.cx)
    }
    fn resume_read<F: Filter>(&mut self, bev: &mut BevCore<F, Socket>, why: Suspend) {
        bev.resume_read(self.cx, why);
    }
    fn consumed<F: Filter>(&mut self, bev: &mut BevCore<F, Socket>) {
        bev.consumed(self.cx);
    }
    fn close_side<F: Filter>(&mut self, bev: &mut BevCore<F, Socket>) {
        bev.close(self.cx);
    }
    fn discard_unread(&mut self, io: &mut Socket) {
        discard_unread(io.stream());
    }
    fn reset_on_close(&mut self, io: &Socket) {
        io.set_reset_on_close();
    }
    fn upstream_layer(&mut self, client: &Socket) -> U {
        let mut layer = U::make(Role::Initiator, self.rt());
        if U::SEALED {
            layer.set_open(self.session_open(client));
        }
        layer
    }
    fn session_open(&mut self, client: &Socket) -> OpenInfo {
        // The client's PROXY header's addresses if it sent one, else the socket's.
        let open = client_open(client);
        let ident = self.shell.ident.as_deref_mut();
        ident.map_or(open, |i| i.session_open(open))
    }
    fn hold_unopened(&mut self) -> bool {
        // Its source's unopened count (listener::Admission), or no slot at all (a
        // connection admitted without a ticket: none is counted).
        let held = match &self.shell.ticket {
            Some(t) => self.cx.state.admission.hold_unopened(t),
            None => true,
        };
        if held {
            // Not a client's connection (yet): `conn_rate` counts it at its OPEN instead.
            self.rt().rates.give_back_conn();
        }
        held
    }
    fn admit_open(&mut self) -> bool {
        super::ratelimit::admit(self.cx, self.shell.tunnel)
    }
    fn draining(&self) -> bool {
        self.cx.state.draining
    }
    fn confirmed(&mut self, io: &Socket) {
        // Back from the warm session's short TCP_USER_TIMEOUT to the tunnel's own (TCP's: a
        // Unix socket's peer is on this host, and its end is always told).
        let keepalive = self.rt().cfg.keepalive;
        if let Some(Err(e)) = io
            .stream()
            .and_then(Stream::as_tcp)
            .map(|s| socket2::SockRef::from(s).set_tcp_user_timeout(keepalive.user_timeout))
        {
            tracing::debug!(error = %e, "cannot restore TCP_USER_TIMEOUT on an adopted warm session");
        }
    }
    fn connect(&mut self, addr: TargetAddr, layer: U) -> BevCore<U, Socket> {
        let timeouts = Timeouts {
            connect: Some(self.rt().cfg.connect_timeout),
            ..Timeouts::default()
        };
        let source = Side::Upstream as u8;
        let keepalive = self.rt().cfg.keepalive;
        let to = addr.endpoint();
        let mut up =
            BufferEvent::connect_filtered(self.cx, to, source, layer, !U::SEALED, timeouts);
        // Dead-peer detection on the upstream socket (the client's inherits its listener's);
        // TCP's: a Unix socket's peer is on this host, and its end is always told.
        let tcp = up.stream().and_then(Stream::as_tcp);
        if let Some(Err(e)) = tcp.map(|s| super::keepalive::apply(s, &keepalive)) {
            tracing::debug!(error = %e, "cannot set keepalive on the upstream socket");
        }
        if let Err(e) = up.register(self.cx) {
            tracing::debug!(error = %e, "cannot register upstream socket");
        }
        up
    }
    fn upstream_preamble(&mut self, _open: &OpenInfo, output: &mut Buffer) {
        // send_proxy: the backend's PROXY header, built from the OPEN (`SessionOpened`).
        let Some(i) = self.shell.ident.as_deref_mut() else {
            return;
        };
        let cfg = &self.cx.state.tunnels[self.shell.tunnel].cfg;
        if let Some(h) = i.backend_header(&cfg.identity) {
            output.append(h.as_bytes());
        }
    }
    fn client_preamble(&mut self, input: &mut Buffer, eof: bool) -> Preamble {
        // accept_proxy: the load balancer's PROXY header.
        let Some(i) = (self.shell.ident.as_deref_mut()).filter(|i| i.awaiting_header()) else {
            return Preamble::Done;
        };
        match i.read_header(input, eof) {
            HeaderStep::Wait => Preamble::Wait {
                limit: identity::MAX_HEADER_LEN,
            },
            HeaderStep::Ready => Preamble::Done,
            HeaderStep::Failed(e) => {
                // Nothing was taken off the input yet: it holds every byte the client sent.
                self.header_failed(e, input.len() as u64);
                Preamble::Failed
            }
        }
    }
    fn upstreams(&mut self) -> &mut Upstreams {
        &mut self.rt().upstreams
    }
    fn limits(&self) -> Limits {
        let cfg = &self.cx.state.tunnels[self.shell.tunnel].cfg;
        Limits {
            idle: cfg.idle_limit(false),
            half_closed: cfg.idle_limit(true),
            handshake: cfg.handshake_timeout,
            unopened: cfg.warm_idle_timeout,
            lifetime: cfg.lifetime,
        }
    }
    fn lifetime_jitter(&mut self) -> i8 {
        self.cx.state.lifetime_jitter()
    }
    fn act(&mut self, action: Action<'_, Socket>) {
        match action {
            Action::Timer(which, at) => self.set_timer(which, at),
            Action::Close(_) => self.cx.close(),
            Action::HandshakeOk {
                key,
                forward_secrecy,
                took,
                held,
            } => self.handshake_ok(key, forward_secrecy, took, held),
            Action::Warm(step) => self.warm_step(step),
            Action::HandshakeTimeout => self.handshake_timeout(),
            Action::PreambleTimeout { received } => {
                self.header_failed(HeaderError::Timeout, received)
            }
            Action::SessionOpened(open) => {
                if let Some(a) = open.addrs {
                    tracing::trace!(client = %a.source, via = %a.destination, proxied = open.proxied, "session opened");
                }
                if let Some(i) = self.shell.ident.as_deref_mut() {
                    i.opened(*open);
                }
            }
            Action::FlowPaused(flow) => self.rt().metrics.flow_paused[flow as usize].inc(),
            Action::Hibernated { dropped_keys } => {
                self.cx.state.hibernations += 1;
                let m = &self.rt().metrics;
                m.hibernating.inc();
                if dropped_keys {
                    m.key_hibernations.inc();
                }
            }
            Action::Woke => self.rt().metrics.hibernating.dec(),
            Action::LifetimeEnd { graceful } => self.lifetime_end(graceful),
            Action::Bytes(delta) => self.rt().bytes.add(&delta),
            Action::UpstreamReached {
                target,
                took,
                was_down,
            } => self.upstream_reached(target, took, was_down),
            Action::ConnectFailed {
                target,
                outcome,
                error,
                went_down,
            } => self.connect_failed(target, outcome, error, went_down),
            Action::Failed(f) => self.failed(f),
            Action::Closed {
                reason,
                duration,
                asleep,
                bytes,
                target,
                key,
                forward_secrecy,
            } => {
                self.closed(reason, duration, asleep);
                self.log_access(reason, duration, &bytes, (target, key, forward_secrecy));
            }
        }
    }
}

impl<C: Make, U: Make> Handler<ShardState> for Conn<C, U> {
    fn on_start(&mut self, cx: &mut Context<'_, ShardState>) {
        if self.shell.moving == Moving::Imported {
            return self.start_imported(cx);
        }
        let rt = &mut cx.state.tunnels[self.shell.tunnel];
        rt.active += 1;
        rt.metrics.accepted.inc();
        rt.metrics.active.inc();
        cx.state.conns += 1;
        if let Some(id) = cx.id() {
            cx.state.live_conns.insert(id);
        }
        let now = cx.now();
        let registered = self.core.client_mut().register(cx);
        let (core, mut env) = self.parts(cx);
        if let Err(e) = registered {
            tracing::debug!(error = %e, "cannot register client socket");
            return core.close(CloseReason::PeerReset, &mut env);
        }
        core.start(now, &mut env);
    }

    fn on_ready(&mut self, cx: &mut Context<'_, ShardState>, source: u8, ready: Ready) {
        if self.shell.frozen() {
            return;
        }
        let now = cx.now();
        // A sleeping connection with nothing to write is not woken by a writable edge alone:
        // one comes only when its socket is registered (a connection moved here asleep).
        let pending = self.core.client().output_pending()
            + self.core.upstream().map_or(0, |u| u.output_pending());
        let quiet = !ready.readable && !ready.read_closed && !ready.error && pending == 0;
        if !(quiet && self.core.is_asleep()) {
            let (core, mut env) = self.parts(cx);
            core.activity(now, &mut env);
        }
        // Reads are metered by the tunnel's byte rate limits, if any (`ratelimit`): the
        // client's bytes go upstream, the upstream's downstream.
        let t = self.shell.tunnel;
        if source == Side::Client as u8 {
            let (c, relay) = self.core.client_reader();
            let ev = metered(cx, t, Flow::Upstream, c, |b, cx| {
                b.on_ready_via(cx, ready, relay)
            });
            self.handle(cx, Side::Client, ev);
        } else if let Some((up, relay)) = self.core.upstream_reader() {
            let ev = metered(cx, t, Flow::Downstream, up, |b, cx| {
                b.on_ready_via(cx, ready, relay)
            });
            self.handle(cx, Side::Upstream, ev);
        }
        self.after_event(cx);
    }

    fn on_notify(&mut self, cx: &mut Context<'_, ShardState>, tag: Tag) {
        if self.handoff_notify(cx, tag) {
            return;
        }
        if tag == TAG_ABORT {
            let (core, mut env) = self.parts(cx);
            return core.close(CloseReason::DrainDeadline, &mut env);
        }
        if tag == TAG_DRAIN_STARTED {
            let (core, mut env) = self.parts(cx);
            return core.drain_started(&mut env);
        }
        if tag == TAG_LIMITS {
            let now = cx.now();
            let (core, mut env) = self.parts(cx);
            return core.limits_changed(now, &mut env);
        }
        let t = self.shell.tunnel;
        if self.core.client().owns_tag(tag) {
            let (c, relay) = self.core.client_reader();
            let ev = metered(cx, t, Flow::Upstream, c, |b, cx| {
                b.on_notify_via(cx, tag, relay)
            });
            self.handle(cx, Side::Client, ev);
        } else if let Some((up, relay)) = self.core.upstream_reader() {
            if up.owns_tag(tag) {
                let ev = metered(cx, t, Flow::Downstream, up, |b, cx| {
                    b.on_notify_via(cx, tag, relay)
                });
                self.handle(cx, Side::Upstream, ev);
            }
        }
        self.after_event(cx);
    }

    fn on_timer(&mut self, cx: &mut Context<'_, ShardState>, tag: Tag) {
        if self.shell.frozen() {
            // Its own timers were cancelled; a socket's is forgotten by the detached socket.
            if self.core.client().owns_tag(tag) {
                self.core.client_mut().on_timer(cx, tag);
            } else if let Some(up) = self.core.upstream_mut() {
                if up.owns_tag(tag) {
                    up.on_timer(cx, tag);
                }
            }
            return;
        }
        let timer = match tag {
            TAG_IDLE => {
                self.shell.idle_timer = None;
                ConnTimer::Idle
            }
            TAG_HANDSHAKE => {
                self.shell.deadline_timer = None;
                ConnTimer::Handshake
            }
            TAG_LIFETIME => {
                self.shell.deadline_timer = None;
                ConnTimer::Lifetime
            }
            _ => {
                if self.core.client().owns_tag(tag) {
                    let ev = self.core.client_mut().on_timer(cx, tag);
                    self.handle(cx, Side::Client, ev);
                } else if let Some(up) = self.core.upstream_mut() {
                    if up.owns_tag(tag) {
                        let ev = up.on_timer(cx, tag);
                        self.handle(cx, Side::Upstream, ev);
                    }
                }
                return;
            }
        };
        let now = cx.now();
        let (core, mut env) = self.parts(cx);
        core.on_timer(timer, now, &mut env);
        self.after_event(cx);
    }

    fn on_close(&mut self, cx: &mut Context<'_, ShardState>) {
        if let Moving::Gone(_) = self.shell.moving {
            return self.gone(cx);
        }
        let now = cx.now();
        {
            let (core, mut env) = self.parts(cx);
            // A ticket kept past the handshake is an unopened session's.
            let unopened = core.handshake_done();
            env.release_ticket(unopened);
            core.on_close(now, &mut env);
            env.set_timer(ConnTimer::Idle, None);
            // The handshake's and the lifetime's share one slot.
            env.set_timer(ConnTimer::Handshake, None);
        }
        let t = self.shell.tunnel;
        ratelimit::release(cx, t, Flow::Upstream, self.core.client());
        if let Some(up) = self.core.upstream() {
            ratelimit::release(cx, t, Flow::Downstream, up);
        }
        self.core.client_mut().close(cx);
        if let Some(up) = self.core.upstream_mut() {
            up.close(cx);
        }
        if let Some(id) = cx.id() {
            cx.state.live_conns.remove(&id);
        }
        let state = &mut *cx.state;
        state.conns -= 1;
        let rt = &mut state.tunnels[self.shell.tunnel];
        rt.active -= 1;
        if rt.listener_paused && state.conns < state.conn_limit && !state.draining {
            if let Some(l) = rt.listener {
                cx.notify(l, super::listener::TAG_RESUME);
            }
        }
        if self.shell.moving == Moving::Kept {
            if let Some(e) = cx.state.export.as_mut() {
                e.kept = e.kept.saturating_sub(1);
            }
        }
        super::handoff::check_done(cx);
    }
}
