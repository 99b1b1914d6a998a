//! `BufferEvent`: a socket with an input and an output [`Buffer`], libevent's `bufferevent`.
//!
//! A `BufferEvent` is two parts in one value, as libevent's generic `bufferevent` and its
//! `bufferevent_sock` backend are:
//! - [`BevCore`] (`bevcore.rs`) is everything that does not need a socket or a loop: the
//!   input and output buffers, the [`Filter`] layer with its own raw buffers, watermarks, the
//!   [`Suspend`] mask, end-of-stream and shutdown state, and pending bytes counted through the
//!   filter. It reads and writes only through the [`Transport`] it carries, which it never
//!   registers, polls, times or closes: a socket here, an in-memory pipe in a test. So the
//!   same read and write paths run under a unit test that decides how many bytes each read
//!   returns, and when the peer's FIN or RST arrives.
//! - [`Socket`] (`socket.rs`) is the `bufferevent_sock` backend: the mio socket, its
//!   readiness cache, registration with the loop, the async connect, read/write/connect
//!   timeouts and re-drives through the loop's deferred queue. [`BufferEvent<F>`] is
//!   `BevCore<F, Socket>`.
//!
//! A `BufferEvent` is not a handler of its own: the handler that owns it (an echo session, a
//! proxied connection owning two of them) feeds it readiness with [`BufferEvent::on_ready`] and
//! gets back the events that libevent would deliver to callbacks ([`BevEvents`]). That keeps
//! one owner for everything a connection touches.
//!
//! Level-triggered behaviour over edge-triggered mio:
//! - The socket is registered once for read and write interest and never re-registered; the
//!   readiness the kernel reported is cached ([`Readiness`]) and cleared only when a syscall
//!   says `WouldBlock` (or a short read/write proves the socket is drained/full).
//! - Every reason reading is suspended is a bit in one mask ([`Suspend`]). Reading happens only
//!   when the mask is empty; clearing the last bit while the cache says "readable" queues a
//!   re-drive (through the loop's deferred queue), so data that arrived while suspended is never
//!   stranded and nothing spins.
//! - A rate limit is the owner's: it sets a read allowance (what its bucket can spare) and,
//!   when reading suspended for lack of one ([`Suspend::Bandwidth`]), the instant reading may
//!   go on ([`BufferEvent::throttle_until`]); the BufferEvent wakes itself then. No bucket,
//!   clock or shared counter lives here.
//! - Reading stops at the read high watermark (input bytes pending, counted through the filter
//!   layer) and at a per-call budget (fairness: the rest is read in the loop's next turn, after
//!   the other handlers and due timers had theirs); the owner calls [`BufferEvent::consumed`]
//!   after draining input, which resumes reading if the watermark had stopped it.
//!
//! A [`Filter`] (libevent's `bufferevent_filter`) may sit between the socket and the user's
//! buffers: it decodes what the socket delivered into `input` and encodes `output` for the
//! socket. Pending bytes, watermarks, end-of-stream and shutdown all flow through it.
//!
//! Timeouts are lazy: a read/write timeout arms one timer, and activity only stores a
//! timestamp; when the timer fires early relative to the last activity it re-arms itself.

mod bevcore;
mod socket;

use std::io;
use std::time::Duration;

use super::buffer::{Buffer, FrameSlots};

pub use bevcore::{BevCore, BevState, Readiness, Relay, Transport};
pub use socket::{BufferEvent, Socket};

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
    /// The read allowance ran out (a rate limit's tokens, libevent's `BEV_SUSPEND_BW`): the
    /// owner grants more when its bucket refills ([`BevCore::set_read_allowance`],
    /// [`BufferEvent::throttle_until`]).
    Bandwidth = 1 << 5,
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

    /// For a filter that encodes by framing the user's bytes where they lie (a sealer): the
    /// layout of frames that a pass-through stream's reads may go straight into, at the end of
    /// `raw_out`, skipping `output` ([`BevCore::relay`]); `None` (the default) when it cannot
    /// take bytes that way now (it frames nothing in place, or something else must be encoded
    /// first). It may first add to `raw_out` what must come before those frames (a key
    /// update), exactly as `encode` would have.
    fn frame_slots(&mut self, _raw_out: &mut Buffer) -> Option<FrameSlots> {
        None
    }

    /// Frames one slot that [`Filter::frame_slots`] laid out, in place: `frame` is the slot's
    /// head, its `len` body bytes, and its tail. Called in order, once per filled slot; an
    /// error fails the stream, as one from `encode` does.
    fn frame_in_place(&mut self, _frame: &mut [u8], _len: usize) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
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

/// Per-direction timeouts. `None` = no timeout.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timeouts {
    pub read: Option<Duration>,
    pub write: Option<Duration>,
    pub connect: Option<Duration>,
}
