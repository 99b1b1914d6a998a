//! The connection core: every per-connection decision, with no socket, no loop and no clock.
//!
//! [`ConnCore`] owns the two sides' I/O-free stream cores ([`BevCore`]: buffers, filter layer,
//! watermarks, the `Suspend` mask, end-of-stream and shutdown state) and the connection's own
//! state: which target it uses and which it tried, whether the handshake completed, which
//! direction ended, whether it sleeps, the bytes it already accounted, why it closed. It is
//! driven by what happened (a side's [`BevEvents`], a timer, the drain deadline, the end) and
//! by `now`, which the caller hands it; it never reads a clock.
//!
//! What it decides it asks of an [`Env`]: I/O that must happen before the next decision (write
//! side X now, re-drive side X's reads, connect to a target, reset side X when it closes) as
//! methods, and everything else (arm a timer for T, close for reason R, the facts that metrics
//! and logs are made of) as [`Action`]s handed to [`Env::act`]. `Conn` (the module above) is
//! the `Env` over two sockets and the shard's `Context`; the pair harness (`pair.rs`, tests
//! only) is one over in-memory pipes and a hand-driven clock, so every ordering of reads, EOFs,
//! resets and timers can be run in microseconds. The write stays a call, not an action,
//! because backpressure reads the output left *after* the write, as it always has: a pump
//! moves the near side's input to the far side's output, writes it, and only then compares
//! what is pending with [`OUTPUT_HIGH`].
//!
//! Decisions, as they were in `Conn`:
//! - Connect and failover: the next target comes from the tunnel's [`Upstreams`] (by
//!   [`TargetId`], never by index); a failed connect gives the target back, marks it down when
//!   it is to blame, moves the bytes already handed to it back in front of the client's
//!   input, and tries the next; with none left, or out of descriptors, the connection ends
//!   (`upstream_failed`). A plaintext client connects at once; a sealed one once its session's
//!   OPEN arrived (the handshake, Finished included, verified).
//! - Half-close: a side's end (FIN; on a sealed side an authenticated END) shuts the far
//!   side's write half once its output drained; the other direction keeps going; the
//!   connection closes cleanly when both directions ended and both write halves are shut.
//! - Failure: a FIN without END on a sealed side is a truncation, a bad record is tampering,
//!   an authenticated ABORT is the far plaintext peer's reset (`client_reset`,
//!   `upstream_reset`) or the far side giving up, and a socket the kernel gave up on (ETIMEDOUT:
//!   keepalive or TCP_USER_TIMEOUT) is `peer_timeout`. Anything but a clean end resets the
//!   plaintext side(s); tampering resets both. A plaintext peer's reset, and this side giving
//!   up on its own account (idle timeout, no backend, drain deadline), is told to the sealed
//!   far side with an ABORT.
//! - Backpressure: a side stops reading while the far side's output holds [`OUTPUT_HIGH`] or
//!   more, and resumes when that drains to [`OUTPUT_LOW`] (reads also stop at [`READ_HIGH`]
//!   of pending input, in the stream core). A plain side feeding a sealed one reads straight
//!   into the sealed side's records while nothing waits ahead of the bytes ([`Relay`], handed
//!   out with the side by [`ConnCore::client_reader`] / [`ConnCore::upstream_reader`]); the
//!   pumps treat those bytes as moved ones: flush, then the same mark.
//! - Client preamble: where the `Env` expects one (a PROXY header from a trusted load
//!   balancer, `accept_proxy`), the client's input stages no more than its limit and nothing
//!   connects until the `Env` says it is in ([`Env::client_preamble`]); a bad one, an end
//!   before it, or none within the handshake timeout closes the connection (`proxy_header`).
//!   Then the handshake gets its own whole timeout. The backend's preamble (`send_proxy`) is
//!   [`Env::upstream_preamble`], in front of the client's bytes on every target tried.
//! - Timers: one handshake deadline; one idle timer carrying both the idle (or, once a
//!   direction ended, the half-closed) limit and, while awake, [`HIBERNATE_AFTER`]. Activity
//!   only stores `last_active`; the timer re-arms itself when it finds the connection was
//!   busy, so a read costs no timer work. A limit may be off (`None`): then only hibernation
//!   arms the timer, and a sleeping connection arms none.
//! - Hibernation: quiet for [`HIBERNATE_AFTER`], the sealed side drops its expanded keys and
//!   both sides' empty buffers their chunk lists; the next activity wakes it.
//! - Lifetime (`max_lifetime`, [`Lifetime`]): once a connection is older than its lifetime
//!   (moved by a jitter of up to ±10% drawn per connection, [`Env::lifetime_jitter`], so a
//!   fleet does not reconnect in one wave), it ends at its first quiet moment: the session
//!   open, nothing moved for [`HIBERNATE_AFTER`], nothing buffered, and no request waiting for
//!   its reply (the last bytes moved were the backend's). It ends as if the client had
//!   finished: the upstream side is shut (the backend reads a FIN, directly or from the far
//!   side's END); the backend closes in turn, and its end reaches the client behind whatever
//!   was still on its way, so neither plaintext peer sees a cut stream or a reset. Client bytes
//!   that cross the end cannot be carried and reset the client. On a decrypt side the client
//!   learns of the end only from the backend's close: bytes it sent just before that may be
//!   on their way when the encrypt side closes cleanly, and are lost with no reset (the client
//!   read the end, with no reply for them); on an encrypt side every client byte either
//!   reaches the backend or resets the client. With no quiet moment within
//!   the grace, or a peer that has not closed its side within the grace after the end, both
//!   plaintext peers are reset (`max_lifetime`): never a truncation that looks complete. The
//!   deadline follows the limits in force, so a reload reaches open connections
//!   ([`ConnCore::limits_changed`]).
//!
//! Invariants:
//! - The core does no I/O and reads no clock: everything it learns arrives as an argument,
//!   everything it does leaves through its `Env`.
//! - Once `closed` is set nothing more is decided: events are ignored until
//!   [`ConnCore::on_close`], which gives the target back and reports the end once.
//! - Generic over both layers and the transport, with no `dyn`: each mode (and the harness)
//!   is compiled to its own code.

use std::io;
use std::time::{Duration, Instant};

use crate::metrics::CloseReason;
use crate::protocol::{AbortReason, KeyId, OpenInfo, ProtocolError};
use crate::reactor::{BevCore, BevEvents, Buffer, Filter, Relay, Suspend, Transport, Watermarks};

use super::super::codec::{peer_abort, protocol_error};
use super::super::upstream::{ConnectOutcome, TargetId, Tried, Upstreams};
use super::super::{ByteCounts, OUTPUT_HIGH, OUTPUT_LOW, READ_HIGH, TargetAddr};
use crate::metrics::Bytes;

/// Export and import of the core's state, for a live upgrade (its own file: `migrate.rs`).
#[path = "migrate.rs"]
pub mod migrate;

/// A connection with no activity for this long hibernates (see the module doc): about 1.1 KiB
/// of keys per sealed session and the buffers' chunk lists go back to the allocator. Long
/// against a request/response exchange, so traffic with shorter pauses never pays for it and
/// a chatty connection re-expands its keys (a microsecond or two) at most once per pause this
/// long; short against the seconds to hours that pooled and keep-alive connections sit idle,
/// which is where the memory of many connections is.
pub const HIBERNATE_AFTER: Duration = Duration::from_millis(250);

/// A side of a proxied connection. Its number is also the side's source number with the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The accepted connection.
    Client = 0,
    /// The connection this side made to a target.
    Upstream = 1,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }
}

/// A direction of traffic whose reading paused for backpressure: the `direction` label of
/// `sealpipe_flow_control_paused_total`; the discriminant is its slot in the family's value
/// list (`metrics::DIRECTIONS`) and in `TunnelMetrics::flow_paused`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Client to backend: the upstream's output is full.
    Upstream = 0,
    /// Backend to client: the client's output is full.
    Downstream = 1,
}

impl Flow {
    pub const ALL: [Flow; 2] = [Flow::Upstream, Flow::Downstream];

    pub fn as_str(self) -> &'static str {
        match self {
            Flow::Upstream => "upstream",
            Flow::Downstream => "downstream",
        }
    }
}

/// The connection's own timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnTimer {
    /// The idle, half-closed and hibernation deadlines (one timer, lazily re-armed).
    Idle,
    /// The handshake must complete by then.
    Handshake,
    /// `max_lifetime`: when the connection starts looking for a quiet moment to end, and the
    /// hard cap after it (see [`Lifetime`]). Armed only once the handshake (and the client's
    /// preamble) completed, after `Handshake` was cancelled: the two are never armed at once,
    /// so an `Env` may keep both in one slot.
    Lifetime,
}

/// `max_lifetime` and its grace (see the module doc, "Lifetime").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    /// From accept until the connection looks for a quiet moment to end, before each
    /// connection's jitter (at most [`MAX_JITTER_PERMILLE`] either way).
    pub max: Duration,
    /// How long after that it may wait for a quiet moment, and how long the peers then have
    /// to close their sides, before it is reset.
    pub grace: Duration,
}

/// The most a connection's lifetime is moved either way by its jitter, in thousandths (10%).
pub const MAX_JITTER_PERMILLE: i8 = 100;

/// The tunnel's timeouts, as configured now (a reload may change them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// How long the connection may be quiet; `None`: as long as it likes (a 0 in the
    /// configuration turns the limit off).
    pub idle: Option<Duration>,
    /// The same once one direction ended (`config::Tunnel::idle_limit`: the shorter of the
    /// idle and half-closed limits, whichever are on).
    pub half_closed: Option<Duration>,
    /// The handshake's deadline, and that of the client's preamble before it.
    pub handshake: Duration,
    /// How long a decrypt side holds a session whose handshake completed without an OPEN (a
    /// warm session, waiting for its client): `warm_idle_timeout`.
    pub unopened: Duration,
    /// `max_lifetime`; `None`: connections live as long as their peers like.
    pub lifetime: Option<Lifetime>,
}

/// Where the client's preamble stands (see [`Env::client_preamble`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preamble {
    /// None is expected, or it was read and taken off the input: the client's stream starts.
    Done,
    /// Incomplete: stage at most `limit` bytes of the client's input and read on.
    Wait { limit: usize },
    /// Unacceptable (the `Env` said why): the connection closes (`proxy_header`).
    Failed,
}

/// A side's layer, as the core sees it: plain or sealed.
pub trait Layer: Filter + Sized + 'static {
    const SEALED: bool;
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

/// A step in a warm session's life that a connection core sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WarmStep {
    /// (A responder.) The handshake completed without an OPEN: a warm session, held
    /// unopened (`warm_idle_timeout`) until its client comes.
    Held,
    /// (A responder.) A held session's OPEN came: it is an ordinary session from now on.
    Opened,
    /// (A responder.) A held session closed without opening, and why.
    Closed(UnopenedEnd),
    /// (An initiator.) An adopted session was declined before its OPEN was acted on (an ABORT
    /// `unopened`): what the client sent goes again on a fresh session.
    Retried,
}

/// How a responder's unopened (warm) session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnopenedEnd {
    /// The initiator closed it unused (END before OPEN).
    Unused,
    /// Its `warm_idle_timeout` passed.
    Expired,
    /// This side closed it: the drain started, or its deadline passed.
    Shutdown,
    /// Its source holds as many unopened sessions as it may (`max_unopened_per_source`).
    OverCap,
    /// The initiator went away without a word (a reset, a FIN without END, a timeout).
    Lost,
}

/// Why a side failed.
#[derive(Clone, Copy, Debug)]
pub enum Cause<'a> {
    /// The far sealpipe ended the session with an authenticated ABORT.
    PeerAbort(AbortReason),
    /// The sealed layer failed: the handshake, a bad or truncated record.
    Protocol(ProtocolError),
    /// The socket failed (a reset, mostly); `None` if it said nothing.
    Io(Option<&'a io::Error>),
}

/// A side failed (see [`Action::Failed`]).
#[derive(Clone, Copy, Debug)]
pub struct Failure<'a, T> {
    pub side: Side,
    /// The side's layer is sealed.
    pub sealed: bool,
    /// The handshake had completed before this failure.
    pub handshake_done: bool,
    /// How the connection ends for it.
    pub reason: CloseReason,
    pub cause: Cause<'a>,
    /// The key the failing side's hello named, and the version its peer spoke (for the log).
    pub key_id: Option<KeyId>,
    pub peer_version: Option<u8>,
    /// The failing side's transport (for the peer's address in a log line).
    pub io: Option<&'a T>,
}

/// What the core decided, for the `Env` to carry out or record. None of these needs an answer.
#[derive(Debug)]
pub enum Action<'a, T> {
    /// Arm (or move) a timer to fire at this instant, or cancel it (`None`).
    Timer(ConnTimer, Option<Instant>),
    /// The connection is over: remove it (its end, [`ConnCore::on_close`], follows).
    Close(CloseReason),
    /// The handshake completed: the admission ticket goes back, unless the session is `held`
    /// unopened ([`Env::hold_unopened`] said yes: the ticket now counts it as unopened, until
    /// its OPEN or its end).
    HandshakeOk {
        key: Option<KeyId>,
        forward_secrecy: bool,
        took: Duration,
        held: bool,
    },
    /// The handshake did not complete in time (the connection closes `handshake_failed`).
    HandshakeTimeout,
    /// The client's preamble did not complete within the handshake timeout (the connection
    /// closes `proxy_header`); `received`: the bytes the client sent.
    PreambleTimeout { received: u64 },
    /// The session's OPEN arrived (a responder); the backend is connected for it next.
    SessionOpened(&'a OpenInfo),
    /// A warm session's step (see [`WarmStep`]).
    Warm(WarmStep),
    /// Reading paused for backpressure in this direction.
    FlowPaused(Flow),
    /// Quiet: keys and spare buffer lists were dropped (`dropped_keys`: a session's keys).
    Hibernated { dropped_keys: bool },
    /// Activity after hibernation.
    Woke,
    /// `max_lifetime` ended the connection: `graceful`, at a quiet moment, with a FIN (or an
    /// END) towards each peer; otherwise by resetting it (the connection closes
    /// `max_lifetime`).
    LifetimeEnd { graceful: bool },
    /// Bytes carried since the last report, by direction and layer.
    Bytes(ByteCounts),
    /// The TCP connect to a target completed (`was_down`: it had been marked down).
    UpstreamReached {
        target: TargetId,
        took: Duration,
        was_down: bool,
    },
    /// A connect to a target failed; `went_down`: that marked it down. With
    /// [`ConnectOutcome::Exhausted`] the connection ends instead of trying the next.
    ConnectFailed {
        target: TargetId,
        outcome: ConnectOutcome,
        error: Option<&'a io::Error>,
        went_down: bool,
    },
    /// A side failed; the connection closes for `reason`.
    Failed(Failure<'a, T>),
    /// The connection ended (from [`ConnCore::on_close`], once): what an access log records.
    Closed {
        reason: CloseReason,
        duration: Duration,
        /// It was hibernating.
        asleep: bool,
        /// Bytes carried over its life, by direction and layer.
        bytes: ByteCounts,
        /// The target it used last, if it got as far as choosing one.
        target: Option<TargetId>,
        /// The session's key and whether it had forward secrecy (none for plain, or before
        /// the sealed side's hello).
        key: Option<KeyId>,
        forward_secrecy: Option<bool>,
    },
}

/// What the core asks of the world around it (see the module doc). `U` is the upstream
/// side's layer, `T` both sides' transport.
pub trait Env<U: Layer, T: Transport> {
    /// Writes what `bev` has for the wire now (encoding through its filter), as far as the
    /// transport takes it; returns the events that produced (WRITE, SHUTDOWN, ERROR).
    fn flush<F: Filter>(&mut self, bev: &mut BevCore<F, T>) -> BevEvents;
    /// Lifts a suspension of `bev`'s reading; if that was the last one and data may be
    /// waiting, reading runs again later (never inside this call).
    fn resume_read<F: Filter>(&mut self, bev: &mut BevCore<F, T>, why: Suspend);
    /// The owner drained `bev`'s input: as `resume_read` for the high watermark.
    fn consumed<F: Filter>(&mut self, bev: &mut BevCore<F, T>);
    /// `bev` is given up (a failed connect): stop watching its transport, which closes with
    /// a RST if [`Env::reset_on_close`] asked for one.
    fn close_side<F: Filter>(&mut self, bev: &mut BevCore<F, T>);
    /// Reads and discards what the transport still holds, so that it closes with a FIN after
    /// the queued bytes (an ABORT record) rather than a RST that would drop them.
    fn discard_unread(&mut self, io: &mut T);
    /// The transport sends a RST, not a FIN, when it closes.
    fn reset_on_close(&mut self, io: &T);
    /// The layer for a new upstream connection (an initiator's carries the client's addresses
    /// from `client`, for its OPEN).
    fn upstream_layer(&mut self, client: &T) -> U;
    /// Starts connecting the upstream side to `addr`; every outcome arrives later as events of
    /// the returned side (CONNECTED, ERROR, CONNECT_TIMEOUT).
    fn connect(&mut self, addr: TargetAddr, layer: U) -> BevCore<U, T>;
    /// Bytes to send the backend before anything of the client's, once the session's OPEN
    /// arrived and the upstream side exists (a PROXY protocol header). None by default. A
    /// failed connect moves them back in front of the client's bytes, with those, so every
    /// target tried gets them first, and once.
    fn upstream_preamble(&mut self, _open: &OpenInfo, _output: &mut Buffer) {}
    /// The client's preamble (a PROXY header a load balancer puts ahead of its client's
    /// bytes): reads what the client's `input` holds (`eof`: the client finished sending) and
    /// takes the preamble off it once it is complete; on [`Preamble::Failed`] it says why (in
    /// its logs). Asked when the connection starts, then on each client event until it is
    /// [`Preamble::Done`]; nothing connects before. `Done` by default: none is expected.
    fn client_preamble(&mut self, _input: &mut Buffer, _eof: bool) -> Preamble {
        Preamble::Done
    }
    /// A responder's session completed its handshake without an OPEN (a warm session): may
    /// it be held unopened? False when its source holds too many (`max_unopened_per_source`);
    /// the session then closes with an ABORT `unopened`. Asked before [`Action::HandshakeOk`].
    fn hold_unopened(&mut self) -> bool {
        true
    }
    /// A held (warm) session's OPEN came: its client is here. May it be served? False when
    /// the tunnel's `conn_rate` has no connection to spare: it counts clients, and a warm
    /// session's connection is not one until its OPEN (its token went back when it was
    /// held). The session then closes with an ABORT `unopened`, as it was not acted on.
    fn admit_open(&mut self) -> bool {
        true
    }
    /// This side drains (a stop, or a live upgrade's handoff): a session whose handshake
    /// completes without an OPEN from now on is not held for a client, but closed as those
    /// held when the drain started were ([`ConnCore::drain_started`]).
    fn draining(&self) -> bool {
        false
    }
    /// An initiator's adopted (warm) session: the OPEN for the client on `client` (its PROXY
    /// header's addresses if it sent one, else the socket's).
    fn session_open(&mut self, client: &T) -> OpenInfo;
    /// An adopted session's first bytes were answered (or their grace passed): the upstream
    /// socket `io` goes back to the tunnel's own dead-peer settings.
    fn confirmed(&mut self, _io: &T) {}
    /// The tunnel's targets (shared by the shard's connections).
    fn upstreams(&mut self) -> &mut Upstreams;
    /// The tunnel's timeouts now.
    fn limits(&self) -> Limits;
    /// This connection's jitter of `max_lifetime`, in thousandths of it (the core clamps it to
    /// ±[`MAX_JITTER_PERMILLE`]): drawn once per connection, so that connections accepted
    /// together do not all end together. None (0) by default.
    fn lifetime_jitter(&mut self) -> i8 {
        0
    }
    /// Carries out or records a decision.
    fn act(&mut self, action: Action<'_, T>);
}

/// The abort a side sends its sealed peer when it closes for `reason` on its own account.
fn abort_for(reason: CloseReason) -> Option<AbortReason> {
    match reason {
        CloseReason::UpstreamFailed => Some(AbortReason::Unreachable),
        CloseReason::IdleTimeout => Some(AbortReason::Timeout),
        // The protocol has no reason of its own for a lifetime's end (a new code would be
        // `malformed` to older peers): the far side counts it `peer_reset`.
        CloseReason::DrainDeadline | CloseReason::MaxLifetime => Some(AbortReason::Shutdown),
        CloseReason::Unopened => Some(AbortReason::Unopened),
        _ => None,
    }
}

/// Watermarks of both sides (see `proxy` for the bound they give).
const WATERMARKS: Watermarks = Watermarks {
    read_low: 0,
    read_high: READ_HIGH,
    write_low: OUTPUT_LOW,
};

/// A side to read from, and where its reads may go straight to ([`ConnCore::client_reader`],
/// [`ConnCore::upstream_reader`]): the side's stream core (layer `F`) and, if the far side
/// (layer `G`) takes them, the relay into it.
pub type Reader<'a, F, G, T> = (&'a mut BevCore<F, T>, Option<Relay<'a, G>>);

/// Where a connection stands with `max_lifetime` (see the module doc, "Lifetime").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// Younger than its lifetime, or none is set.
    Live,
    /// Past its lifetime: it ends at its first quiet moment, or is reset at the cap.
    Due,
    /// Ended at a quiet moment: each peer was sent a FIN (or an END); the connection waits for
    /// theirs, for at most the grace.
    Ended,
}

/// `max_lifetime`'s per-connection state in two bytes, which fit beside the core's flags: an
/// idle connection costs no more than it did without it (`tests.rs` holds the size).
#[derive(Clone, Copy, Debug)]
struct LifetimeState {
    /// The [`Ending`] (bits 0-1) and whether a request waits for its reply (bit 2: client
    /// bytes moved towards the backend since the last bytes moved back, so this is no moment
    /// to end); bit 3: the jitter is still to be drawn (a connection moved from a process
    /// that did not carry it: `migrate`, drawn when it resumes).
    bits: u8,
    /// This connection's jitter, in thousandths (drawn at start, clamped).
    jitter: i8,
}

impl LifetimeState {
    const ENDING: u8 = 0b11;
    const AWAITING_REPLY: u8 = 0b100;
    const JITTER_PENDING: u8 = 0b1000;

    fn ending(self) -> Ending {
        match self.bits & Self::ENDING {
            0 => Ending::Live,
            1 => Ending::Due,
            _ => Ending::Ended,
        }
    }
    fn set_ending(&mut self, e: Ending) {
        self.bits = (self.bits & !Self::ENDING) | e as u8;
    }
    fn awaiting_reply(self) -> bool {
        self.bits & Self::AWAITING_REPLY != 0
    }
    fn set_awaiting_reply(&mut self, on: bool) {
        self.bits = (self.bits & !Self::AWAITING_REPLY) | if on { Self::AWAITING_REPLY } else { 0 };
    }
}

/// The state of one proxied connection (see the module doc).
pub struct ConnCore<C: Layer, U: Layer, T> {
    client: BevCore<C, T>,
    /// Boxed: a decrypt-side connection has none until its handshake verifies, and an inline
    /// `None` would still cost every unauthenticated connection a stream core's size.
    upstream: Option<Box<BevCore<U, T>>>,
    /// The target in use (by id: a reload may rebuild the list meanwhile), and those tried.
    target: Option<TargetId>,
    tried: Tried,
    started: Instant,
    connect_started: Instant,
    last_active: Instant,
    handshake_done: bool,
    /// The client's preamble is still expected ([`Env::client_preamble`]).
    awaiting_preamble: bool,
    /// Hibernating: quiet since `last_active + HIBERNATE_AFTER`; cleared by any activity.
    asleep: bool,
    client_eof: bool,
    upstream_eof: bool,
    lifetime: LifetimeState,
    /// Wire bytes already reported ([`Action::Bytes`]).
    counted: ByteCounts,
    closed: Option<CloseReason>,
    /// The session's OPEN is yet to be sent (an initiator: an adopted warm session, until the
    /// client's first event) or received (a responder: a warm session, until its client).
    unopened: bool,
    /// An initiator's adopted session that may still be declined: see [`Replay`].
    replay: Option<Box<Replay>>,
}

/// Most bytes of the client's an adopted session keeps for sending again (see [`Replay`]).
/// A request's first flight; beyond it the session is not replayable, and a decline resets
/// the client as a dead host would.
pub const REPLAY_MAX: usize = 64 * 1024;
/// Fresh sessions a client's first bytes may go on after declines.
const RETRIES_MAX: u8 = 2;

/// What an initiator keeps of an adopted (warm) session until the responder has shown it
/// acted on the OPEN (its first record back, anything but an ABORT `unopened`) or the grace
/// of twice the handshake timeout passed: every byte the client sent since, so that a decline
/// (an ABORT `unopened`, which promises that nothing of the session was delivered) sends them
/// again on a fresh session, once, in order, and never after anything came back.
struct Replay {
    bytes: Buffer,
    /// More than [`REPLAY_MAX`] went: not replayable any more.
    overflowed: bool,
    retries: u8,
}

impl<C: Layer, U: Layer, T: Transport> ConnCore<C, U, T> {
    /// The core of a connection whose client side is `client` (accepted at `now`).
    pub fn new(mut client: BevCore<C, T>, now: Instant) -> Self {
        client.set_watermarks(WATERMARKS);
        ConnCore {
            client,
            upstream: None,
            target: None,
            tried: Tried::default(),
            started: now,
            connect_started: now,
            last_active: now,
            handshake_done: !C::SEALED && !U::SEALED,
            awaiting_preamble: false,
            asleep: false,
            client_eof: false,
            upstream_eof: false,
            lifetime: LifetimeState { bits: 0, jitter: 0 },
            counted: ByteCounts::default(),
            closed: None,
            unopened: false,
            replay: None,
        }
    }

    /// The core of an encrypt side's connection whose client (`client`, accepted at `now`)
    /// takes a warm session: `upstream`, connected to `target` and handshaken, its OPEN held
    /// ([`crate::proxy::codec::SealFilter::hold_open`]). `tried` is the balance's choice that
    /// named the target (the target counts the connection as active). Nothing connects: the
    /// OPEN leads the client's first bytes at the client's first event (see
    /// [`ConnCore::start`]).
    pub fn adopt(
        client: BevCore<C, T>,
        mut upstream: BevCore<U, T>,
        target: TargetId,
        tried: Tried,
        now: Instant,
    ) -> Self {
        let mut core = ConnCore::new(client, now);
        upstream.set_watermarks(WATERMARKS);
        core.upstream = Some(Box::new(upstream));
        core.target = Some(target);
        core.tried = tried;
        core.handshake_done = true;
        core.unopened = true;
        core.replay = Some(Box::new(Replay {
            bytes: Buffer::new(),
            overflowed: false,
            retries: 0,
        }));
        core
    }

    pub fn client(&self) -> &BevCore<C, T> {
        &self.client
    }
    pub fn client_mut(&mut self) -> &mut BevCore<C, T> {
        &mut self.client
    }
    pub fn upstream(&self) -> Option<&BevCore<U, T>> {
        self.upstream.as_deref()
    }
    pub fn upstream_mut(&mut self) -> Option<&mut BevCore<U, T>> {
        self.upstream.as_deref_mut()
    }

    /// The client side, to read from, with where its reads may go straight to (see
    /// `relays`).
    pub fn client_reader(&mut self) -> Reader<'_, C, U, T> {
        let relays = self.relays();
        let relay = match self.upstream.as_deref_mut() {
            Some(up) if relays => up.relay(OUTPUT_HIGH),
            _ => None,
        };
        (&mut self.client, relay)
    }

    /// The upstream side (if there is one), to read from, with where its reads may go
    /// straight to (see `relays`).
    pub fn upstream_reader(&mut self) -> Option<Reader<'_, U, C, T>> {
        let relays = self.relays();
        let up = self.upstream.as_deref_mut()?;
        let relay = if relays {
            self.client.relay(OUTPUT_HIGH)
        } else {
            None
        };
        Some((up, relay))
    }

    /// Whether a plain side's reads may go straight into the sealed far side's records (the
    /// copy-free path: read into the record's payload slot, seal in place). The streams
    /// decide when bytes can take it (nothing waiting ahead of them, the far side open and
    /// under [`OUTPUT_HIGH`]: `BevCore::read_some_via`); the core rules out only the times
    /// its pumps must see the bytes: while the client's preamble is read, while an adopted
    /// warm session's OPEN is held or the client's bytes are kept for a replay ([`Replay`]:
    /// a relayed byte would be sealed without a copy kept, and lost if the session is
    /// declined; once more than [`REPLAY_MAX`] went nothing is kept, and reads relay again),
    /// and once closed. A relayed read reports READ like any other, and the pump
    /// then flushes the far side and holds reading back for it exactly as for bytes it moved.
    fn relays(&self) -> bool {
        (C::SEALED || U::SEALED)
            && !self.awaiting_preamble
            && !self.unopened
            && self.replay.as_ref().is_none_or(|r| r.overflowed)
            && self.closed.is_none()
    }

    /// Why the connection closed, once it did.
    pub fn closed(&self) -> Option<CloseReason> {
        self.closed
    }
    pub fn is_asleep(&self) -> bool {
        self.asleep
    }
    pub fn handshake_done(&self) -> bool {
        self.handshake_done
    }
    /// The session's OPEN is yet to be sent (an adopted warm session) or received (a held
    /// one, on a decrypt side).
    pub fn is_unopened(&self) -> bool {
        self.unopened
    }
    /// An adopted session keeps the client's bytes for a fresh session (see [`Replay`]).
    pub fn replayable(&self) -> bool {
        self.replay.as_ref().is_some_and(|r| !r.overflowed)
    }
    /// The target in use.
    pub fn target(&self) -> Option<TargetId> {
        self.target
    }
    /// Whether the client (`Side::Client`) or the upstream finished sending.
    pub fn ended(&self, side: Side) -> bool {
        match side {
            Side::Client => self.client_eof,
            Side::Upstream => self.upstream_eof,
        }
    }

    /// The connection starts (its client side is registered): the handshake deadline, the
    /// idle timer, and for a plaintext client the connect to the first target (once its
    /// preamble, if one is expected, is in: until then the client's input stages no more
    /// than the preamble's limit, and the handshake deadline is the preamble's).
    pub fn start(&mut self, now: Instant, env: &mut impl Env<U, T>) {
        let preamble = env.client_preamble(&mut self.client.input, false);
        self.awaiting_preamble = preamble != Preamble::Done;
        // (An adopted warm session's handshake is done: only a preamble has a deadline.)
        if !self.handshake_done || self.awaiting_preamble {
            let at = now + env.limits().handshake;
            env.act(Action::Timer(ConnTimer::Handshake, Some(at)));
        }
        self.arm_idle(env);
        // Drawn whether or not a lifetime is set now: a reload may set one.
        self.lifetime.jitter = env
            .lifetime_jitter()
            .clamp(-MAX_JITTER_PERMILLE, MAX_JITTER_PERMILLE);
        self.lifetime_step(now, env);
        match preamble {
            Preamble::Wait { limit } => self.client.set_watermarks(Watermarks {
                read_high: limit,
                ..WATERMARKS
            }),
            Preamble::Failed => self.finish(CloseReason::ProxyHeader, env),
            Preamble::Done if !C::SEALED && self.upstream.is_none() => {
                self.connect_upstream(now, env)
            }
            Preamble::Done => {}
        }
    }

    /// Something happened on one of the sockets at `now` (before its events are handled):
    /// the connection is active, and awake.
    pub fn activity(&mut self, now: Instant, env: &mut impl Env<U, T>) {
        self.last_active = now;
        if self.asleep {
            // Awake again: watch for the next quiet spell (one timer move per wake-up).
            self.asleep = false;
            env.act(Action::Woke);
            self.arm_idle(env);
        }
    }

    /// Events of one side (from its readiness, a re-drive or its own timer).
    pub fn handle(&mut self, side: Side, ev: BevEvents, now: Instant, env: &mut impl Env<U, T>) {
        match side {
            Side::Client => {
                self.process(ev, BevEvents::empty(), now, env);
                if U::SEALED && self.unopened {
                    self.send_open(now, env);
                }
            }
            Side::Upstream => self.process(BevEvents::empty(), ev, now, env),
        }
    }

    /// An adopted warm session's OPEN goes, at the client's first event (its first readiness
    /// comes as soon as its socket is registered): with the client's first bytes if that
    /// event brought them, so OPEN and data leave in one write; alone otherwise (a protocol
    /// whose server speaks first), since waiting for bytes that may never come would stall
    /// it. Not while the client's preamble is still expected: the OPEN carries its addresses.
    fn send_open(&mut self, now: Instant, env: &mut impl Env<U, T>) {
        if self.closed.is_some() || self.awaiting_preamble {
            return;
        }
        let Some(up) = self.upstream.as_mut() else {
            return;
        };
        self.unopened = false;
        let open = env.session_open(self.client.io());
        up.filter_mut().set_open(open);
        // The client's first bytes are already in `output` (pump_up kept them, held).
        let mut u = env.flush(up);
        u |= self.pump_up(env);
        // Until the decrypt side shows it acted on the OPEN, what the client sends is kept
        // for a fresh session ([`Replay`]); the grace ends this long after the OPEN left.
        let grace = now + 2 * env.limits().handshake;
        env.act(Action::Timer(ConnTimer::Handshake, Some(grace)));
        self.process(BevEvents::empty(), u, now, env);
    }

    /// The drain started: a decrypt side's unopened (warm) session closes now, with an ABORT
    /// `unopened`, so its encrypt side replaces it elsewhere before a client takes it. Others
    /// go on until they end or the drain deadline passes.
    pub fn drain_started(&mut self, env: &mut impl Env<U, T>) {
        if C::SEALED && self.unopened && self.closed.is_none() {
            self.close_unopened(UnopenedEnd::Shutdown, env);
        }
    }

    /// A timer of the connection's own fired (the `Env` forgets it: it is no longer armed).
    pub fn on_timer(&mut self, timer: ConnTimer, now: Instant, env: &mut impl Env<U, T>) {
        if self.closed.is_some() {
            return;
        }
        match timer {
            ConnTimer::Idle => {
                if self
                    .idle_limit(env)
                    .is_some_and(|l| now >= self.last_active + l)
                {
                    if C::SEALED && self.unopened {
                        return self.close_unopened(UnopenedEnd::Expired, env);
                    }
                    self.finish(CloseReason::IdleTimeout, env);
                } else {
                    if self.lifetime.ending() == Ending::Due {
                        // Quiet since the last activity, perhaps: the moment to end.
                        self.lifetime_step(now, env);
                        if self.closed.is_some() {
                            return;
                        }
                    }
                    if !self.asleep && now >= self.last_active + HIBERNATE_AFTER {
                        self.hibernate(env);
                    }
                    self.arm_idle(env);
                }
            }
            ConnTimer::Handshake if self.awaiting_preamble => {
                let (received, _) = self.client.wire_bytes();
                env.act(Action::PreambleTimeout { received });
                self.finish(CloseReason::ProxyHeader, env);
            }
            ConnTimer::Lifetime if self.lifetime.ending() == Ending::Ended => {
                // A peer did not close its side within the grace after the end.
                self.finish(CloseReason::MaxLifetime, env);
            }
            ConnTimer::Lifetime => self.lifetime_step(now, env),
            ConnTimer::Handshake => {
                if !self.handshake_done {
                    env.act(Action::HandshakeTimeout);
                    self.finish(CloseReason::HandshakeFailed, env);
                } else if self.replay.is_some() {
                    // An adopted session's grace passed: it is an ordinary one from now on.
                    self.confirm(now, env);
                }
            }
        }
    }

    /// The tunnel's limits changed (a reload): the timers are armed again for them, so a
    /// shorter `max_lifetime` reaches connections already open.
    pub fn limits_changed(&mut self, now: Instant, env: &mut impl Env<U, T>) {
        if self.closed.is_some() {
            return;
        }
        self.arm_idle(env);
        self.lifetime_step(now, env);
    }

    /// Ends the connection for a reason of this side's own (the drain deadline passed, a
    /// socket could not be registered): the sealed far side is told with an ABORT where the
    /// reason calls for one.
    pub fn close(&mut self, reason: CloseReason, env: &mut impl Env<U, T>) {
        if C::SEALED && self.unopened && reason == CloseReason::DrainDeadline {
            return self.close_unopened(UnopenedEnd::Shutdown, env);
        }
        self.finish(reason, env);
    }

    /// The connection is being removed (after [`Action::Close`], or by the loop): reports the
    /// last bytes, gives the target back and reports the end ([`Action::Closed`]). The
    /// transports are the caller's to close.
    pub fn on_close(&mut self, now: Instant, env: &mut impl Env<U, T>) {
        self.account(env);
        let reason = self.closed.unwrap_or(CloseReason::DrainDeadline);
        self.closed = Some(reason);
        if let Some(id) = self.target {
            env.upstreams().release(id);
        }
        let (key, forward_secrecy) = self.session();
        env.act(Action::Closed {
            reason,
            duration: now - self.started,
            asleep: self.asleep,
            bytes: self.counted,
            target: self.target,
            key,
            forward_secrecy,
        });
    }

    /// The sealed side's session: its key and whether it has forward secrecy.
    fn session(&self) -> (Option<KeyId>, Option<bool>) {
        let up = self.upstream.as_deref();
        let key = (self.client.filter().key_id()).or_else(|| up.and_then(|u| u.filter().key_id()));
        let fs = (self.client.filter().forward_secrecy())
            .or_else(|| up.and_then(|u| u.filter().forward_secrecy()));
        (key, fs)
    }

    /// Ends a responder's unopened (warm) session: an ABORT `unopened` when this side gives
    /// up on it (nothing of it was acted on, so its initiator may use the bytes it sent on
    /// it elsewhere); nothing more when the initiator ended it or went away.
    fn close_unopened(&mut self, end: UnopenedEnd, env: &mut impl Env<U, T>) {
        env.act(Action::Warm(WarmStep::Closed(end)));
        let abort = match end {
            UnopenedEnd::Unused | UnopenedEnd::Lost => None,
            _ => Some(AbortReason::Unopened),
        };
        self.finish_with(CloseReason::Unopened, abort, env);
    }

    /// An adopted session's OPEN was acted on (or its grace passed): no replay from now on,
    /// its socket gets the tunnel's own dead-peer settings back, and `max_lifetime` (counted
    /// from the client's adoption, its `started`) takes the timer slot the grace held.
    fn confirm(&mut self, now: Instant, env: &mut impl Env<U, T>) {
        if self.replay.take().is_none() {
            return;
        }
        env.act(Action::Timer(ConnTimer::Handshake, None));
        if let Some(up) = self.upstream.as_deref() {
            env.confirmed(up.io());
        }
        self.lifetime_step(now, env);
    }

    /// The decrypt side declined an adopted session (an ABORT `unopened`: none of it was
    /// delivered): everything the client sent on it goes again, in order, on a fresh session
    /// (today's path: connect, handshake, OPEN with Finished) to the balance's next choice.
    fn retry(&mut self, now: Instant, env: &mut impl Env<U, T>) {
        let Some(mut r) = self.replay.take() else {
            return;
        };
        env.act(Action::Warm(WarmStep::Retried));
        // Its wire bytes stay reported; the next session's count from zero on top.
        self.account(env);
        if let Some(mut up) = self.upstream.take() {
            self.forget_upstream_bytes(&up);
            env.close_side(&mut up);
        }
        let mut again = std::mem::take(&mut r.bytes);
        self.client.input.move_all_to(&mut again);
        self.client.input = again;
        if let Some(id) = self.target.take() {
            env.upstreams().release(id);
        }
        self.tried = Tried::default();
        self.handshake_done = false;
        self.unopened = false;
        if r.retries + 1 < RETRIES_MAX {
            // The fresh session may be declined too (a drain between its Finished and OPEN).
            r.retries += 1;
            r.overflowed = false;
            self.replay = Some(r);
        }
        let at = now + env.limits().handshake;
        env.act(Action::Timer(ConnTimer::Handshake, Some(at)));
        self.connect_upstream(now, env);
    }

    /// Connects to the next target (up ones first, then down ones: see `upstream`); closes
    /// the connection once every target has been tried.
    fn connect_upstream(&mut self, now: Instant, env: &mut impl Env<U, T>) {
        let Some((id, addr)) = env.upstreams().pick(now, &mut self.tried) else {
            return self.finish(CloseReason::UpstreamFailed, env);
        };
        self.target = Some(id);
        let layer = env.upstream_layer(self.client.io());
        self.connect_started = now;
        let mut up = env.connect(addr, layer);
        up.set_watermarks(WATERMARKS);
        self.upstream = Some(Box::new(up));
    }

    /// The current upstream's connect failed: give the target back, mark it down when it is
    /// to blame (see `upstream`), and try the next target.
    fn connect_failed(
        &mut self,
        err: Option<io::Error>,
        outcome: ConnectOutcome,
        now: Instant,
        env: &mut impl Env<U, T>,
    ) {
        if let Some(mut up) = self.upstream.take() {
            // Client bytes already handed to this upstream go to the next one, in order.
            let mut unsent = std::mem::take(&mut up.output);
            self.client.input.move_all_to(&mut unsent);
            self.client.input = unsent;
            // A connect given up at its timeout may have completed in the kernel meanwhile
            // (the answer landed after the loop's last poll): the target then holds an
            // accepted connection that a FIN would end as an empty, clean stream. A RST says
            // it was cut (and still sends nothing to a target that never answered).
            env.reset_on_close(up.io());
            env.close_side(&mut up);
        }
        let Some(id) = self.target.take() else {
            return;
        };
        let upstreams = env.upstreams();
        upstreams.release(id);
        // A reload may have removed the target while its connect was in flight: then nothing
        // is charged to the target that took its place, and the connection tries the new list.
        let went_down = outcome.marks_down() && upstreams.failed(id, now) == Some(true);
        env.act(Action::ConnectFailed {
            target: id,
            outcome,
            error: err.as_ref(),
            went_down,
        });
        if outcome == ConnectOutcome::Exhausted {
            // Every other target would fail the same way: end this client.
            return self.finish(CloseReason::UpstreamFailed, env);
        }
        self.connect_upstream(now, env);
    }

    /// The TCP connect to the current target completed: the target is up, whatever happens
    /// next on this connection.
    fn upstream_reached(&mut self, now: Instant, env: &mut impl Env<U, T>) {
        let took = now - self.connect_started;
        let Some(id) = self.target else {
            return;
        };
        let upstreams = env.upstreams();
        if upstreams.index_of(id).is_none() {
            return;
        }
        let was_down = upstreams.succeeded(id) == Some(true);
        env.act(Action::UpstreamReached {
            target: id,
            took,
            was_down,
        });
    }

    /// The idle limit now (the half-closed one once a direction has ended); `None`: off.
    fn idle_limit(&self, env: &impl Env<U, T>) -> Option<Duration> {
        let l = env.limits();
        if C::SEALED && self.unopened {
            return Some(l.unopened);
        }
        if self.client_eof || self.upstream_eof {
            l.half_closed
        } else {
            l.idle
        }
    }

    /// Arms the idle timer for `last_active + limit`, where the limit is [`HIBERNATE_AFTER`]
    /// while awake (if shorter than the idle limit, or with none). Activity only stores
    /// `last_active`; the timer re-arms itself when it finds the connection was busy (no timer
    /// work per read). Asleep with no idle limit, nothing is armed: there is nothing to wait
    /// for until the next activity, which wakes the connection and arms it again.
    fn arm_idle(&mut self, env: &mut impl Env<U, T>) {
        let mut t = self.idle_limit(env);
        if !self.asleep {
            t = Some(t.map_or(HIBERNATE_AFTER, |t| t.min(HIBERNATE_AFTER)));
        }
        let at = t.map(|t| self.last_active + t.max(Duration::from_millis(1)));
        env.act(Action::Timer(ConnTimer::Idle, at));
    }

    /// When this connection's `max_lifetime` is reached: the configured one moved by the
    /// connection's jitter.
    fn lifetime_due(&self, l: &Lifetime) -> Instant {
        let jitter = self.lifetime.jitter;
        let step = (l.max / 1000) * u32::from(jitter.unsigned_abs());
        let max = if jitter >= 0 {
            l.max + step
        } else {
            l.max.saturating_sub(step)
        };
        self.started + max
    }

    /// Where `max_lifetime` stands now, under the limits in force (a reload may have moved
    /// it): before it, the timer waits for it; past it, the connection ends if this is a
    /// quiet moment, is reset if the grace is spent, and otherwise waits for a quiet moment
    /// (the idle timer looks) until the cap.
    fn lifetime_step(&mut self, now: Instant, env: &mut impl Env<U, T>) {
        if self.closed.is_some() || self.lifetime.ending() == Ending::Ended {
            return;
        }
        if !self.handshake_done || self.awaiting_preamble || self.unopened || self.replay.is_some()
        {
            // Armed once the handshake completed (no moment before it is quiet anyway), so
            // the handshake's timer and this one are never armed at once; likewise not while
            // a warm session waits for its OPEN (a decrypt side's: its client is yet to come,
            // and `warm_idle_timeout` applies) or an adopted one's replay grace holds the
            // handshake's timer (`confirm` arms it then).
            return;
        }
        let Some(l) = env.limits().lifetime else {
            self.lifetime.set_ending(Ending::Live);
            return env.act(Action::Timer(ConnTimer::Lifetime, None));
        };
        let due = self.lifetime_due(&l);
        if now < due {
            self.lifetime.set_ending(Ending::Live);
            return env.act(Action::Timer(ConnTimer::Lifetime, Some(due)));
        }
        if self.quiet(now) {
            return self.end_gracefully(now, l.grace, env);
        }
        let cap = due + l.grace;
        if now >= cap {
            env.act(Action::LifetimeEnd { graceful: false });
            return self.finish(CloseReason::MaxLifetime, env);
        }
        self.lifetime.set_ending(Ending::Due);
        env.act(Action::Timer(ConnTimer::Lifetime, Some(cap)));
    }

    /// A moment to end without cutting anything: the session is open and connected, nothing
    /// moved for [`HIBERNATE_AFTER`], nothing is buffered either way, and the last bytes moved
    /// were the backend's (no request waits for its reply).
    fn quiet(&self, now: Instant) -> bool {
        let Some(up) = self.upstream.as_deref() else {
            return false;
        };
        self.handshake_done
            && !self.awaiting_preamble
            && !self.lifetime.awaiting_reply()
            && up.io().is_connected()
            && now >= self.last_active + HIBERNATE_AFTER
            && self.client.input_pending() == 0
            && self.client.output_pending() == 0
            && up.input_pending() == 0
            && up.output_pending() == 0
    }

    /// Ends the connection at a quiet moment, as if the client had finished sending: the
    /// upstream side is shut (a FIN to the backend, or an END the far side turns into one).
    /// The backend then closes, as servers do at the end of their client's stream, and its
    /// end reaches the client the usual way, behind any bytes still on their way to it. The
    /// peers have `grace` to close their sides (the connection then closes `clean`); client
    /// bytes that arrive meanwhile cannot be carried and reset the client.
    fn end_gracefully(&mut self, now: Instant, grace: Duration, env: &mut impl Env<U, T>) {
        self.lifetime.set_ending(Ending::Ended);
        env.act(Action::LifetimeEnd { graceful: true });
        env.act(Action::Timer(ConnTimer::Lifetime, Some(now + grace)));
        let mut u = BevEvents::empty();
        if let Some(up) = self.upstream.as_mut() {
            if !up.shutdown_requested() {
                up.request_shutdown();
                u = env.flush(up);
            }
        }
        self.process(BevEvents::empty(), u, now, env);
    }

    /// The connection went quiet: drop the sealed side's keys and the buffers' spare lists.
    /// Everything dropped comes back on its next use, so this is safe at any point.
    fn hibernate(&mut self, env: &mut impl Env<U, T>) {
        self.asleep = true;
        let mut dropped = self.client.filter_mut().hibernate();
        self.client.shrink_to_fit();
        if let Some(up) = self.upstream.as_mut() {
            dropped |= up.filter_mut().hibernate();
            up.shrink_to_fit();
        }
        env.act(Action::Hibernated {
            dropped_keys: dropped,
        });
    }

    /// The upstream side `up`, accounted, is replaced by another (a declined warm session's):
    /// its counts leave the running totals, so that the next upstream side's, counted from
    /// zero, add on.
    fn forget_upstream_bytes(&mut self, up: &BevCore<U, T>) {
        let (ur, uw) = up.wire_bytes();
        if U::SEALED != C::SEALED {
            let (up_u, down_u) = if U::SEALED {
                (Bytes::UpSealed, Bytes::DownSealed)
            } else {
                (Bytes::UpPlain, Bytes::DownPlain)
            };
            self.counted[up_u] -= uw;
            self.counted[down_u] -= ur;
        }
    }

    /// Reports the wire bytes carried since the last report.
    fn account(&mut self, env: &mut impl Env<U, T>) {
        let (cr, cw) = self.client.wire_bytes();
        let (ur, uw) = self.upstream.as_ref().map_or((0, 0), |u| u.wire_bytes());
        let (up_c, down_c) = if C::SEALED {
            (Bytes::UpSealed, Bytes::DownSealed)
        } else {
            (Bytes::UpPlain, Bytes::DownPlain)
        };
        let mut now = ByteCounts::default();
        now[up_c] += cr;
        now[down_c] += cw;
        if U::SEALED != C::SEALED {
            let (up_u, down_u) = if U::SEALED {
                (Bytes::UpSealed, Bytes::DownSealed)
            } else {
                (Bytes::UpPlain, Bytes::DownPlain)
            };
            now[up_u] += uw;
            now[down_u] += ur;
        }
        let delta = now.since(&self.counted);
        self.counted = now;
        env.act(Action::Bytes(delta));
    }

    /// Handles events from both sides until none are left (no recursion between sides).
    fn process(
        &mut self,
        mut c: BevEvents,
        mut u: BevEvents,
        now: Instant,
        env: &mut impl Env<U, T>,
    ) {
        let mut rounds = 0;
        while (!c.is_empty() || !u.is_empty()) && self.closed.is_none() && rounds < 64 {
            rounds += 1;
            let (c2, u2) = self.client_events(c, now, env);
            c = c2;
            u |= u2;
            if self.closed.is_some() {
                break;
            }
            let (c3, u3) = self.upstream_events(u, now, env);
            u = u3;
            c |= c3;
        }
        if self.closed.is_none() {
            self.account(env);
            self.check_done(env);
        }
    }

    /// Client-side events; returns follow-up events for (client, upstream).
    fn client_events(
        &mut self,
        ev: BevEvents,
        now: Instant,
        env: &mut impl Env<U, T>,
    ) -> (BevEvents, BevEvents) {
        let (c, mut u) = (BevEvents::empty(), BevEvents::empty());
        if ev.is_empty() {
            return (c, u);
        }
        // A read reports READ with nothing in the input only when its bytes went straight
        // into the upstream's records (the relay: never while a preamble is read, and never
        // once the upstream side is shutting): client bytes moved all the same.
        let relayed = ev.contains(BevEvents::READ) && self.client.input.is_empty();
        if ev.contains(BevEvents::ERROR) {
            // The read that completed the handshake may also carry a bad record: the handshake
            // still succeeded, and the failure is the record's (tampered), not the handshake's.
            if C::SEALED && self.client.filter().is_open() {
                self.handshake_ok(now, env);
            }
            // Bytes that arrived before the error (a reply, then a reset) still go on.
            let _ = self.pump_up(env);
            let err = self.client.take_error();
            self.side_failed(Side::Client, err, env);
            return (c, u);
        }
        if ev.contains(BevEvents::FILTER) && C::SEALED && self.client.filter().is_open() {
            let open = self.client.filter_mut().take_open();
            if open.is_none() && !self.handshake_done {
                // A warm session: handshaken, its OPEN to come with its client.
                self.unopened = true;
                let held = env.hold_unopened();
                self.handshake_ok_held(now, held, env);
                if !held {
                    self.close_unopened(UnopenedEnd::OverCap, env);
                    return (c, u);
                }
                env.act(Action::Warm(WarmStep::Held));
                if env.draining() {
                    // Its handshake completed after the drain's notice went round (it was in
                    // its handshake then): no client is to come to this process on it.
                    self.close_unopened(UnopenedEnd::Shutdown, env);
                    return (c, u);
                }
                // The unopened limit applies from now (and the quiet session hibernates).
                self.arm_idle(env);
            }
            self.handshake_ok(now, env);
            // The backend is connected for the session's OPEN (normally in the same read as
            // Finished; a warm session's when its client comes), once.
            if let Some(open) = open {
                if self.unopened {
                    self.unopened = false;
                    env.act(Action::Warm(WarmStep::Opened));
                    if !env.admit_open() {
                        // Over `conn_rate`: turned away before anything was acted on, so its
                        // encrypt side may send the client's bytes again on a fresh
                        // connection, which the rate meets at accept like any other.
                        self.finish_with(CloseReason::Unopened, Some(AbortReason::Unopened), env);
                        return (c, u);
                    }
                    self.arm_idle(env);
                    // The client's connection starts with its OPEN: its age (`max_lifetime`,
                    // its duration) counts from now, not from when the warm session was made.
                    self.started = now;
                    self.lifetime_step(now, env);
                }
                env.act(Action::SessionOpened(&open));
                self.connect_upstream(now, env);
                if let Some(up) = self.upstream.as_mut() {
                    env.upstream_preamble(&open, &mut up.output);
                }
                if self.closed.is_some() {
                    return (c, u);
                }
            }
        }
        if self.awaiting_preamble && !self.preamble_read(ev.contains(BevEvents::EOF), now, env) {
            return (c, u);
        }
        if C::SEALED && self.unopened && ev.contains(BevEvents::EOF) {
            // The encrypt side closed its warm session unused (END before OPEN).
            self.client_eof = true;
            self.close_unopened(UnopenedEnd::Unused, env);
            return (c, u);
        }
        if ev.contains(BevEvents::EOF) && !self.client_eof {
            self.client_eof = true;
            self.arm_idle(env);
        }
        if ev.contains(BevEvents::READ) || ev.contains(BevEvents::EOF) {
            if relayed {
                self.lifetime.set_awaiting_reply(true);
            }
            u |= self.pump_up(env);
            if self.closed.is_some() {
                // Bytes after a `max_lifetime` end.
                return (c, u);
            }
        }
        if ev.contains(BevEvents::WRITE) {
            if let Some(up) = self.upstream.as_mut() {
                if self.client.output_pending() <= OUTPUT_LOW && up.is_suspended(Suspend::Peer) {
                    env.resume_read(up, Suspend::Peer);
                }
            }
        }
        (c, u)
    }

    /// Upstream-side events; returns follow-up events for (client, upstream).
    fn upstream_events(
        &mut self,
        ev: BevEvents,
        now: Instant,
        env: &mut impl Env<U, T>,
    ) -> (BevEvents, BevEvents) {
        let (mut c, mut u) = (BevEvents::empty(), BevEvents::empty());
        if ev.is_empty() || self.upstream.is_none() {
            return (c, u);
        }
        // As on the client side: bytes the backend's reads relayed into the client's records.
        let relayed = ev.contains(BevEvents::READ)
            && self.upstream.as_ref().is_some_and(|x| x.input.is_empty());
        let connected = self
            .upstream
            .as_ref()
            .is_some_and(|x| x.io().is_connected());
        if ev.contains(BevEvents::CONNECT_TIMEOUT) {
            let err = self.upstream.as_mut().and_then(|x| x.take_error());
            self.connect_failed(err, ConnectOutcome::TimedOut, now, env);
            return (c, u);
        }
        if ev.contains(BevEvents::ERROR) && !ev.contains(BevEvents::CONNECTED) && !connected {
            let err = self.upstream.as_mut().and_then(|x| x.take_error());
            let outcome = ConnectOutcome::classify(err.as_ref(), false);
            if outcome != ConnectOutcome::ResetAfterConnect {
                self.connect_failed(err, outcome, now, env);
                return (c, u);
            }
            // The peer accepted and reset before the connect's outcome was read (a decrypt
            // side whose backend refused, say): the target is up; this connection failed.
            self.upstream_reached(now, env);
            self.side_failed(Side::Upstream, err, env);
            return (c, u);
        }
        if ev.contains(BevEvents::ERROR) && self.replayable() {
            let up = self.upstream.as_mut().expect("checked above");
            match up.take_error() {
                Some(e) if peer_abort(&e) == Some(AbortReason::Unopened) => {
                    self.retry(now, env);
                    return (c, u);
                }
                Some(e) => up.set_error(e),
                None => {}
            }
        }
        if ev.contains(BevEvents::ERROR) {
            if ev.contains(BevEvents::CONNECTED) {
                self.upstream_reached(now, env);
            }
            // As on the client side: a handshake completed in the failing read still counts.
            if U::SEALED && self.upstream.as_ref().is_some_and(|x| x.filter().is_open()) {
                self.handshake_ok(now, env);
            }
            let _ = self.pump_down(env);
            let err = self.upstream.as_mut().and_then(|x| x.take_error());
            self.side_failed(Side::Upstream, err, env);
            return (c, u);
        }
        if ev.contains(BevEvents::CONNECTED) {
            self.upstream_reached(now, env);
            if U::SEALED {
                // The hello goes out now; client data waits in `output` until the session opens.
                let up = self.upstream.as_mut().expect("checked above");
                u |= env.flush(up);
            }
            u |= self.pump_up(env);
        }
        if ev.contains(BevEvents::FILTER)
            && U::SEALED
            && self.upstream.as_ref().is_some_and(|x| x.filter().is_open())
        {
            self.handshake_ok(now, env);
            u |= self.pump_up(env);
        }
        if ev.contains(BevEvents::READ) || ev.contains(BevEvents::EOF) {
            // The decrypt side acted on the OPEN: nothing will be sent again.
            self.confirm(now, env);
            if relayed {
                self.lifetime.set_awaiting_reply(false);
            }
            c |= self.pump_down(env);
            if self.closed.is_some() {
                // Bytes after a `max_lifetime` end.
                return (c, u);
            }
        }
        if ev.contains(BevEvents::WRITE)
            && self
                .upstream
                .as_ref()
                .is_some_and(|x| x.output_pending() <= OUTPUT_LOW)
            && self.client.is_suspended(Suspend::Peer)
        {
            env.resume_read(&mut self.client, Suspend::Peer);
        }
        if ev.contains(BevEvents::EOF) && !self.upstream_eof {
            self.upstream_eof = true;
            self.arm_idle(env);
            self.client.request_shutdown();
            c |= env.flush(&mut self.client);
        }
        (c, u)
    }

    /// Reads the client's preamble ([`Env::client_preamble`]); once it is in, the client's
    /// input is staged as usual, the handshake gets its own whole deadline from now, and the
    /// upstream connect starts. False while it is incomplete, or if it failed (closing).
    fn preamble_read(&mut self, eof: bool, now: Instant, env: &mut impl Env<U, T>) -> bool {
        match env.client_preamble(&mut self.client.input, eof) {
            Preamble::Wait { .. } => {
                env.consumed(&mut self.client);
                false
            }
            Preamble::Failed => {
                self.finish(CloseReason::ProxyHeader, env);
                false
            }
            Preamble::Done => {
                self.awaiting_preamble = false;
                self.client.set_watermarks(WATERMARKS);
                env.consumed(&mut self.client);
                let at = (C::SEALED || U::SEALED).then(|| now + env.limits().handshake);
                env.act(Action::Timer(ConnTimer::Handshake, at));
                self.lifetime_step(now, env);
                if !C::SEALED && self.upstream.is_none() {
                    self.connect_upstream(now, env);
                }
                self.closed.is_none()
            }
        }
    }

    /// Client input -> upstream output. Returns upstream events from the flush.
    fn pump_up(&mut self, env: &mut impl Env<U, T>) -> BevEvents {
        let Some(up) = self.upstream.as_mut() else {
            return BevEvents::empty();
        };
        let mut ev = BevEvents::empty();
        // Bytes the client's reads relayed straight into the upstream's records are pending
        // there as if they had been moved: flushed, and counted for backpressure, the same
        // (`client_events` notes them for `max_lifetime`; the relay never takes bytes once the
        // upstream side is shutting, so those that cross an end always arrive in the input).
        // (No read relays while an adopted session keeps the client's bytes for a replay:
        // see `relays`.)
        if !self.client.input.is_empty() || up.output_pending() > 0 {
            if !self.client.input.is_empty() {
                if self.lifetime.ending() == Ending::Ended {
                    // Sent after the end crossed it: carrying it is impossible (the backend
                    // was told the client's stream ended), dropping it silent: the client gets
                    // a reset, as from a server that closed an idle connection it was writing
                    // to.
                    if C::SEALED && self.client.write_shut() {
                        // A decrypt side that already passed the backend's end on (END)
                        // cannot ABORT any more: a reset of the sealed connection tells the
                        // encrypt side, if it has not closed yet.
                        env.reset_on_close(self.client.io());
                    }
                    self.finish(CloseReason::MaxLifetime, env);
                    return ev;
                }
                self.lifetime.set_awaiting_reply(true);
            }
            if let Some(r) = self.replay.as_mut().filter(|r| !r.overflowed) {
                if r.bytes.len() + self.client.input.len() > REPLAY_MAX {
                    r.overflowed = true;
                    r.bytes = Buffer::new();
                } else {
                    for s in self.client.input.slices() {
                        r.bytes.append(s);
                    }
                }
            }
            self.client.input.move_all_to(&mut up.output);
            ev |= env.flush(up);
            if up.output_pending() >= OUTPUT_HIGH && !self.client.is_suspended(Suspend::Peer) {
                self.client.suspend_read(Suspend::Peer);
                env.act(Action::FlowPaused(Flow::Upstream));
            }
            env.consumed(&mut self.client);
        }
        // A held OPEN must lead the end of the stream too.
        let ready = !U::SEALED || (up.filter().is_open() && !self.unopened);
        if self.client_eof && up.io().is_connected() && ready && !up.write_shut() {
            up.request_shutdown();
            ev |= env.flush(up);
        }
        ev
    }

    /// Upstream input -> client output. Returns client events from the flush.
    fn pump_down(&mut self, env: &mut impl Env<U, T>) -> BevEvents {
        let Some(up) = self.upstream.as_mut() else {
            return BevEvents::empty();
        };
        let mut ev = BevEvents::empty();
        // As in `pump_up`, for bytes relayed straight into the client's records.
        if !up.input.is_empty() || self.client.output_pending() > 0 {
            if !up.input.is_empty() {
                self.lifetime.set_awaiting_reply(false);
            }
            up.input.move_all_to(&mut self.client.output);
            ev |= env.flush(&mut self.client);
            if self.client.output_pending() >= OUTPUT_HIGH && !up.is_suspended(Suspend::Peer) {
                up.suspend_read(Suspend::Peer);
                env.act(Action::FlowPaused(Flow::Downstream));
            }
            env.consumed(up);
        }
        ev
    }

    fn handshake_ok(&mut self, now: Instant, env: &mut impl Env<U, T>) {
        self.handshake_ok_held(now, false, env);
    }

    /// The handshake completed; `held`: the session waits unopened for its OPEN.
    fn handshake_ok_held(&mut self, now: Instant, held: bool, env: &mut impl Env<U, T>) {
        if self.handshake_done {
            return;
        }
        self.handshake_done = true;
        env.act(Action::Timer(ConnTimer::Handshake, None));
        self.lifetime_step(now, env);
        let (key, forward_secrecy) = self.session();
        env.act(Action::HandshakeOk {
            key,
            forward_secrecy: forward_secrecy.unwrap_or(false),
            took: now - self.started,
            held,
        });
    }

    /// A side failed after connecting: classify, tell the far side, reset what must be reset,
    /// close.
    fn side_failed(&mut self, side: Side, err: Option<io::Error>, env: &mut impl Env<U, T>) {
        if C::SEALED && self.unopened && side == Side::Client {
            let pe = err.as_ref().and_then(protocol_error);
            if matches!(pe, None | Some(ProtocolError::Truncated)) {
                // A warm session whose encrypt side went away (its process died, a reset):
                // nothing was opened, nothing is lost.
                return self.close_unopened(UnopenedEnd::Lost, env);
            }
        }
        let (sealed, key_id, peer_version, io) = match side {
            Side::Client => {
                let f = self.client.filter();
                (
                    C::SEALED,
                    f.key_id(),
                    f.peer_version(),
                    Some(self.client.io()),
                )
            }
            Side::Upstream => {
                let up = self.upstream.as_deref();
                let f = up.map(|u| u.filter());
                let key_id = f.and_then(|f| f.key_id());
                (
                    U::SEALED,
                    key_id,
                    f.and_then(|f| f.peer_version()),
                    up.map(|u| u.io()),
                )
            }
        };
        let handshake_done = self.handshake_done;
        let (reason, cause, abort) = if let Some(abort) = err.as_ref().and_then(peer_abort) {
            // The far sealpipe ended the session in an authenticated record: its plaintext peer
            // reset, it had no backend, or it gave up. Not an attack and not a truncation.
            let reason = match abort {
                AbortReason::Reset if side == Side::Client => CloseReason::ClientReset,
                AbortReason::Reset => CloseReason::UpstreamReset,
                AbortReason::Unreachable => CloseReason::UpstreamFailed,
                AbortReason::Timeout => CloseReason::IdleTimeout,
                // Declined before its OPEN, and not replayable: as a peer that reset.
                AbortReason::Shutdown | AbortReason::Unopened => CloseReason::PeerReset,
            };
            (reason, Cause::PeerAbort(abort), None)
        } else {
            let pe = err.as_ref().and_then(protocol_error);
            let reason = match pe {
                Some(_) if !handshake_done => CloseReason::HandshakeFailed,
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
            let cause = pe.map_or(Cause::Io(err.as_ref()), Cause::Protocol);
            // A plaintext peer's failure (a reset, mostly) is told to the sealed far side,
            // which resets its own plaintext peer in turn.
            (reason, cause, (!sealed).then_some(AbortReason::Reset))
        };
        env.act(Action::Failed(Failure {
            side,
            sealed,
            handshake_done,
            reason,
            cause,
            key_id,
            peer_version,
            io,
        }));
        self.finish_with(reason, abort, env)
    }

    /// Both directions ended cleanly and everything was written: close.
    fn check_done(&mut self, env: &mut impl Env<U, T>) {
        let up_done = self.upstream.as_ref().is_some_and(|u| u.write_shut());
        if self.client_eof && self.upstream_eof && up_done && self.client.write_shut() {
            self.finish(CloseReason::Clean, env);
        }
    }

    /// Ends the connection with `reason`, telling the sealed far side with an ABORT when this
    /// side gives up on its own account (idle timeout, no backend, drain deadline).
    fn finish(&mut self, reason: CloseReason, env: &mut impl Env<U, T>) {
        self.finish_with(reason, abort_for(reason), env);
    }

    /// Ends the connection with `reason`, first sending `abort` on the sealed side if its
    /// session is open. Anything but a clean end resets the plaintext side(s) so their
    /// applications see an error, never a truncated stream that looks complete.
    fn finish_with(
        &mut self,
        reason: CloseReason,
        abort: Option<AbortReason>,
        env: &mut impl Env<U, T>,
    ) {
        if self.closed.is_some() {
            return;
        }
        self.closed = Some(reason);
        // A responder that never acted on an OPEN says exactly that, whatever else it would
        // have said: the initiator may then send the same bytes on another session.
        let abort = match abort {
            Some(_) if C::SEALED && self.unopened => Some(AbortReason::Unopened),
            a => a,
        };
        if U::SEALED && self.unopened {
            // An adopted warm session whose client failed before its OPEN went (a bad PROXY
            // header, a reset): it ends unused, END before OPEN, so the decrypt side forgets
            // it as such.
            if let Some(up) = self.upstream.as_mut() {
                up.request_shutdown();
                let _ = env.flush(up);
                env.discard_unread(up.io_mut());
            }
        }
        if let Some(a) = abort {
            if C::SEALED && self.client.filter_mut().abort(a) {
                let _ = env.flush(&mut self.client);
                env.discard_unread(self.client.io_mut());
            }
            if let Some(up) = self.upstream.as_mut() {
                if U::SEALED && up.filter_mut().abort(a) {
                    let _ = env.flush(up);
                    env.discard_unread(up.io_mut());
                }
            }
        }
        if reason != CloseReason::Clean {
            let tampered = reason == CloseReason::Tampered;
            if !C::SEALED || tampered {
                env.reset_on_close(self.client.io());
            }
            if let Some(up) = &self.upstream {
                if !U::SEALED || tampered {
                    env.reset_on_close(up.io());
                }
            }
        }
        env.act(Action::Close(reason));
    }
}
