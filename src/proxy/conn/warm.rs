//! A warm session before its client: an encrypt side's connection to a decrypt target,
//! connected and handshaken ahead of time, its OPEN held, waiting for a new client to take it
//! ([`ConnCore::adopt`](super::ConnCore::adopt)). Like the connection core it does no I/O and
//! reads no clock: it is driven by its stream's [`BevEvents`], its one timer and `now`, and
//! acts through a [`WarmEnv`] (`proxy::warm` over the loop; the pair harness in tests).
//!
//! Its life (docs/PROTOCOL.md and docs/OPERATIONS.md, "Warm sessions"):
//! - Connecting, then handshaking, under one deadline (the tunnel's handshake timeout; the
//!   socket has its own connect timeout). The connect counts for the target's passive health
//!   as a client's would. Failing either, it is [`WarmEnd::Failed`].
//! - Ready: the handshake completed (its own ephemeral X25519 key: forward secrecy as any
//!   session), Finished sent, no OPEN ([`SealFilter::hold_open`]). It waits until a client
//!   takes it ([`WarmCore::into_parts`]) or its refresh instant, when it is retired: END
//!   before OPEN, which the decrypt side forgets without a trace ([`WarmEnd::Retired`]);
//!   likewise when its owner retires it early (less demand, the target removed, a drain).
//! - The decrypt side may close it first: an ABORT `unopened` (its drain, its warm idle
//!   limit, its per-source cap), or anything else that ends the stream (a reset, a FIN, a
//!   bad record, the kernel giving up). Either way it was never used: [`WarmEnd::Lost`].
//!
//! Invariants:
//! - Nothing of a client's ever passes through here: a warm session sends only its hello,
//!   its Finished and, retired, its END. Whatever ends it before a client took it costs no
//!   client anything.
//! - Once `closed` is set nothing more is decided.
//! - Generic over the layer and the transport, with no `dyn`.
//!
//! [`SealFilter::hold_open`]: crate::proxy::codec::SealFilter::hold_open

use std::io;
use std::time::{Duration, Instant};

use crate::reactor::{BevCore, BevEvents, Filter, Transport};

use super::super::codec::peer_abort;
use super::super::upstream::{ConnectOutcome, TargetId, Upstreams};
use super::core::Layer;
use crate::protocol::{AbortReason, KeyId};

/// How a warm session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WarmEnd {
    /// A client took it.
    Adopted,
    /// This side closed it unused (refresh, less demand, its target removed, a drain): END
    /// before OPEN.
    Retired,
    /// The decrypt side closed it (ABORT `unopened`) or the stream ended otherwise before a
    /// client took it.
    Lost,
    /// Its connect or handshake failed (or did not complete in time).
    Failed,
}

/// Why a warm session was lost or failed, for a log line.
#[derive(Debug)]
pub enum WarmCause<'a> {
    /// The decrypt side said why, in an ABORT.
    Abort(AbortReason),
    /// The stream failed: a protocol error or an I/O error, if it said.
    Error(Option<&'a io::Error>),
    /// The decrypt side ended the stream, or sent bytes a warm session never expects.
    Ended,
    /// The handshake did not complete within the handshake timeout.
    Timeout,
}

/// What a warm session decided, for the `Env` to carry out or record.
#[derive(Debug)]
pub enum WarmAction<'a> {
    /// Arm (or move) its timer to fire at this instant, or cancel it.
    Timer(Option<Instant>),
    /// The TCP connect to `target` completed (`was_down`: it had been marked down).
    Reached {
        target: TargetId,
        took: Duration,
        was_down: bool,
    },
    /// The TCP connect to `target` failed; `went_down`: that marked it down.
    ConnectFailed {
        target: TargetId,
        outcome: ConnectOutcome,
        error: Option<&'a io::Error>,
        went_down: bool,
    },
    /// The handshake completed: the session is ready for a client. Quiet until then, it has
    /// already dropped its expanded keys (as a hibernating connection does).
    Ready {
        took: Duration,
        key: Option<KeyId>,
        forward_secrecy: bool,
    },
    /// It was lost or failed after connecting, and why.
    Ended(WarmCause<'a>),
    /// It is over: remove it.
    Close(WarmEnd),
}

/// What a warm session asks of the world around it.
pub trait WarmEnv<U: Layer, T: Transport> {
    /// Writes what `bev` has for the wire now; returns the events that produced.
    fn flush(&mut self, bev: &mut BevCore<U, T>) -> BevEvents;
    /// Reads and discards what the transport still holds, so that it closes with a FIN after
    /// the queued bytes (the END) rather than a RST that would drop them.
    fn discard_unread(&mut self, io: &mut T);
    /// The tunnel's targets (passive health).
    fn upstreams(&mut self) -> &mut Upstreams;
    /// The handshake deadline, from the start.
    fn handshake_timeout(&self) -> Duration;
    /// When a ready session started at `now` is to be replaced (`warm_refresh`, spread a
    /// little so that sessions made together do not all expire together).
    fn refresh_at(&mut self, now: Instant) -> Instant;
    /// Carries out or records a decision.
    fn act(&mut self, action: WarmAction<'_>);
}

/// A warm session (see the module doc).
pub struct WarmCore<U: Filter, T> {
    up: BevCore<U, T>,
    target: TargetId,
    started: Instant,
    /// The handshake completed then: ready for a client.
    ready_at: Option<Instant>,
    closed: Option<WarmEnd>,
}

impl<U: Layer, T: Transport> WarmCore<U, T> {
    /// A warm session whose stream `up` is connecting (since `now`) to `target`; its layer
    /// holds its OPEN.
    pub fn new(up: BevCore<U, T>, target: TargetId, now: Instant) -> Self {
        WarmCore {
            up,
            target,
            started: now,
            ready_at: None,
            closed: None,
        }
    }

    pub fn stream(&self) -> &BevCore<U, T> {
        &self.up
    }
    pub fn stream_mut(&mut self) -> &mut BevCore<U, T> {
        &mut self.up
    }
    pub fn target(&self) -> TargetId {
        self.target
    }
    /// When it started connecting.
    pub fn started(&self) -> Instant {
        self.started
    }
    /// Connected and handshaken, not taken, not closed: a client may take it.
    pub fn is_ready(&self) -> bool {
        self.ready_at.is_some() && self.closed.is_none()
    }
    /// How it ended, once it did.
    pub fn closed(&self) -> Option<WarmEnd> {
        self.closed
    }

    /// It starts (its stream is registered): the handshake deadline.
    pub fn start(&mut self, now: Instant, env: &mut impl WarmEnv<U, T>) {
        let at = now + env.handshake_timeout();
        env.act(WarmAction::Timer(Some(at)));
    }

    /// Events of its stream.
    pub fn handle(&mut self, ev: BevEvents, now: Instant, env: &mut impl WarmEnv<U, T>) {
        if self.closed.is_some() || ev.is_empty() {
            return;
        }
        let connected = self.up.io().is_connected();
        if ev.contains(BevEvents::CONNECT_TIMEOUT) {
            let err = self.up.take_error();
            return self.connect_failed(err, ConnectOutcome::TimedOut, now, env);
        }
        if ev.contains(BevEvents::ERROR) && !ev.contains(BevEvents::CONNECTED) && !connected {
            let err = self.up.take_error();
            let outcome = ConnectOutcome::classify(err.as_ref(), false);
            if outcome != ConnectOutcome::ResetAfterConnect {
                return self.connect_failed(err, outcome, now, env);
            }
            self.reached(now, env);
            env.act(WarmAction::Ended(WarmCause::Error(err.as_ref())));
            return self.end(WarmEnd::Failed, env);
        }
        if ev.contains(BevEvents::CONNECTED) {
            self.reached(now, env);
            // The hello goes out now.
            env.flush(&mut self.up);
        }
        if ev.contains(BevEvents::ERROR) {
            let err = self.up.take_error();
            let ended = if self.ready_at.is_some() || self.up.filter().is_open() {
                WarmEnd::Lost
            } else {
                WarmEnd::Failed
            };
            let cause = match err.as_ref().and_then(peer_abort) {
                Some(a) => WarmCause::Abort(a),
                None => WarmCause::Error(err.as_ref()),
            };
            env.act(WarmAction::Ended(cause));
            return self.end(ended, env);
        }
        if ev.contains(BevEvents::FILTER) && self.ready_at.is_none() && self.up.filter().is_open() {
            self.ready_at = Some(now);
            // Nothing happens until a client comes: the session keeps its traffic secrets,
            // not its expanded keys, and no spare buffer memory.
            self.up.filter_mut().hibernate();
            self.up.shrink_to_fit();
            env.act(WarmAction::Ready {
                took: now - self.started,
                key: self.up.filter().key_id(),
                forward_secrecy: self.up.filter().forward_secrecy() == Some(true),
            });
            let at = env.refresh_at(now);
            env.act(WarmAction::Timer(Some(at)));
        }
        if ev.contains(BevEvents::EOF) || !self.up.input.is_empty() {
            // The decrypt side ended it (END) or sent what no session before its OPEN
            // carries: either way it cannot serve a client.
            env.act(WarmAction::Ended(WarmCause::Ended));
            self.end(WarmEnd::Lost, env);
        }
    }

    /// Its timer fired: the handshake deadline (before it is ready), or its refresh.
    pub fn on_timer(&mut self, _now: Instant, env: &mut impl WarmEnv<U, T>) {
        if self.closed.is_some() {
            return;
        }
        if self.ready_at.is_none() {
            env.act(WarmAction::Ended(WarmCause::Timeout));
            return self.end(WarmEnd::Failed, env);
        }
        self.retire(env);
    }

    /// Closes it unused: END before OPEN (once ready; before, there is no session to end),
    /// then a FIN.
    pub fn retire(&mut self, env: &mut impl WarmEnv<U, T>) {
        if self.closed.is_some() {
            return;
        }
        if self.ready_at.is_some() {
            self.up.request_shutdown();
            env.flush(&mut self.up);
            env.discard_unread(self.up.io_mut());
        }
        self.end(WarmEnd::Retired, env);
    }

    /// A client takes it: its stream and target, for [`ConnCore::adopt`]. Only when
    /// [`WarmCore::is_ready`].
    ///
    /// [`ConnCore::adopt`]: super::ConnCore::adopt
    pub fn into_parts(mut self, env: &mut impl WarmEnv<U, T>) -> (BevCore<U, T>, TargetId) {
        debug_assert!(self.is_ready());
        self.closed = Some(WarmEnd::Adopted);
        env.act(WarmAction::Timer(None));
        (self.up, self.target)
    }

    fn end(&mut self, how: WarmEnd, env: &mut impl WarmEnv<U, T>) {
        self.closed = Some(how);
        env.act(WarmAction::Timer(None));
        env.act(WarmAction::Close(how));
    }

    fn reached(&mut self, now: Instant, env: &mut impl WarmEnv<U, T>) {
        let Some(was_down) = env.upstreams().succeeded(self.target) else {
            return;
        };
        env.act(WarmAction::Reached {
            target: self.target,
            took: now - self.started,
            was_down,
        });
    }

    fn connect_failed(
        &mut self,
        err: Option<io::Error>,
        outcome: ConnectOutcome,
        now: Instant,
        env: &mut impl WarmEnv<U, T>,
    ) {
        let upstreams = env.upstreams();
        let went_down = outcome.marks_down() && upstreams.failed(self.target, now) == Some(true);
        env.act(WarmAction::ConnectFailed {
            target: self.target,
            outcome,
            error: err.as_ref(),
            went_down,
        });
        self.end(WarmEnd::Failed, env);
    }
}
