//! [`BevCore`]: the part of a `BufferEvent` that needs no socket and no loop.
//!
//! It holds the user's buffers, the filter layer and its raw buffers, the watermarks, the
//! [`Suspend`] mask and the end-of-stream and shutdown state, and it runs the read and write
//! paths: how much to read next (watermarks, the filter's frame and staging limits, a budget),
//! decoding what arrived, encoding what the user wrote, and which [`BevEvents`] that makes. It
//! moves bytes only through its [`Transport`] (`Read + Write` and a readiness cache), so a
//! test can stand an in-memory pipe where the socket would be and choose every read's size,
//! every write's room, and where the FIN or the RST falls.
//!
//! Invariants:
//! - The core never registers, polls, arms a timer, reads a clock or closes its transport:
//!   those are the backend's ([`super::Socket`] for a `BufferEvent`). A step that wants the
//!   loop's help says so in its result (a read that used its budget asks for a re-drive;
//!   clearing the last suspension says reading may run again; a write that shut the stream
//!   reports [`BevEvents::SHUTDOWN`], on which the backend shuts its socket's write half).
//! - A cached readiness flag is cleared only when the transport proves it stale: `WouldBlock`,
//!   end of file, an error, or a short read while the peer has not closed.
//! - Pending bytes (what watermarks compare) count the filter's raw buffers too, so a filter
//!   cannot hide buffered bytes from backpressure.
//! - A pass-through stream reads into another stream's frames ([`Relay`]) only while nothing
//!   waits ahead of the bytes (its input and the far output are empty) and the far stream is
//!   under the relay's mark; a pass that filled the far stream to it stops suspended as at the
//!   high watermark, so the owner's next `consumed` resumes it (no stranded bytes, no spin).
//! - The read path never takes more from the transport than the read allowance the owner set
//!   (a rate limit's tokens); with none left it suspends ([`Suspend::Bandwidth`]) without a
//!   system call. An allowance is one counter compared per read, not a clock or a bucket: the
//!   owner keeps those.

use std::io::{self, Read, Write};

use super::{BevEvents, Filter, NoFilter, Suspend, Watermarks};
use crate::buffer::{Buffer, FrameSlots};
use crate::pool::CHUNK_SIZE;

/// Most bytes one read pass takes before yielding to other connections.
const READ_BUDGET: usize = 1 << 20;
/// Bytes offered to one `readv` call.
const READ_BATCH: usize = 256 * 1024;
/// A read shorter than this (and than what was offered) proves the socket is drained.
const SHORT_READ: usize = 128 * 1024;
/// Largest gap below the read high watermark that a pass which has already read leaves unread
/// (see `read_some`).
const SLIVER: usize = 4096;

/// The readiness a transport last reported, cached (mio is edge-triggered: an edge is not
/// repeated, so what it said stays true until a syscall says otherwise).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    pub readable: bool,
    pub writable: bool,
    /// The peer closed its write side (EPOLLRDHUP): read to EOF, never stop at a short read,
    /// or the FIN would be stranded (no further edge will come for it).
    pub peer_closed: bool,
}

/// What a [`BevCore`] reads from and writes to: a socket, or an in-memory pipe in tests.
pub trait Transport {
    type Stream: Read + Write;
    /// The byte stream (`None`: there is none, e.g. a connect that failed before a socket
    /// existed) and the readiness cache the core clears as reads and writes prove it stale.
    fn parts(&mut self) -> (Option<&mut Self::Stream>, &mut Readiness);
    /// Whether the stream is connected (an outgoing connect has completed).
    fn is_connected(&self) -> bool;
}

/// Where a pass-through stream's reads may go instead of its own input: straight into the
/// frames at the end of another stream's `raw_out`, which that stream's filter frames where
/// they lie ([`Filter::frame_slots`], [`Filter::frame_in_place`]) — a sealer's records,
/// so a proxy's plaintext is read into the payload slot of the record that carries it and
/// never copied. Made by [`BevCore::relay`] on the far stream; used by
/// [`BevCore::read_some_via`] on the near one.
///
/// Invariant: bytes take this way only while nothing is waiting ahead of them (the near
/// stream's input and the far stream's output are empty), so the order of the stream is
/// kept; and only while the far stream holds less than its `high` mark pending.
pub struct Relay<'a, G> {
    raw_out: &'a mut Buffer,
    filter: &'a mut G,
    high: usize,
}

impl<G: Filter> Relay<'_, G> {
    /// The frames the far stream takes now, and how many more bytes it may hold; `None` if
    /// its filter cannot take bytes in place now.
    fn slots(&mut self) -> Option<(FrameSlots, usize)> {
        // A layout no fresh chunk can hold a frame of would offer the read nothing, which
        // would read as an end of file: not a relay then.
        let slots = self.filter.frame_slots(self.raw_out).filter(|s| {
            s.frames > 0
                && s.body > 0
                && s.head + s.tail + s.min_body.clamp(1, s.body) <= CHUNK_SIZE
        })?;
        Some((slots, self.high.saturating_sub(self.raw_out.len())))
    }
}

/// The I/O-free part of a buffered stream: buffers, filter, watermarks and state, carrying its
/// transport `T` (see the module doc). `F` is the filter layer.
pub struct BevCore<F: Filter, T> {
    /// Decoded bytes for the user.
    pub input: Buffer,
    /// Bytes the user wants sent (before the filter).
    pub output: Buffer,
    pub(super) raw_in: Buffer,
    pub(super) raw_out: Buffer,
    pub(super) filter: F,
    /// The filter never transforms bytes ([`super::NoFilter`]): the socket reads into `input`
    /// and writes from `output` directly.
    pub(super) passthrough: bool,
    pub(super) suspend: u8,
    pub(super) eof: bool,
    /// The user asked to shut down writing once output drains.
    pub(super) shutdown_requested: bool,
    pub(super) write_shut: bool,
    /// The last read took less than a chunk: the stream carries small messages, so the next
    /// pass's first read offers one chunk, not a whole batch (see `read_some_via`).
    pub(super) small_reads: bool,
    pub(super) watermarks: Watermarks,
    pub(super) error: Option<io::Error>,
    pub(super) bytes_read: u64,
    pub(super) bytes_written: u64,
    /// Bytes the read path may still take from the transport ([`UNLIMITED`]: no limit).
    pub(super) read_allowance: u32,
    pub(super) io: T,
}

/// A stream core's state apart from its transport and filter: what a live upgrade carries to
/// a successor process, which puts it into a core over the same (passed) socket with
/// [`BevCore::restore`]. The old process reads it through the core's getters
/// ([`BevCore::raw_buffers`], [`BevCore::wire_bytes`], ...), so a handoff refused by the
/// successor leaves its core as it was.
#[derive(Default)]
pub struct BevState {
    pub input: Buffer,
    pub output: Buffer,
    /// Read from the transport, not yet decoded (a partial frame).
    pub raw_in: Buffer,
    /// Encoded, not yet written (whole frames; the first possibly partly written already).
    pub raw_out: Buffer,
    pub eof: bool,
    pub shutdown_requested: bool,
    pub write_shut: bool,
    /// [`Suspend`] reasons (as `Suspend as u8` bits). Only those that belong to the data —
    /// `User`, `HighWatermark`, `Peer` — are restored; `Connecting` and `Timeout` belong to
    /// the transport and its timers, `Bandwidth` to the owner's rate limit, which meters the
    /// successor's reads afresh (the read allowance is not state of the stream either).
    pub suspend: u8,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// A read allowance of no limit (see [`BevCore::set_read_allowance`]).
const UNLIMITED: u32 = u32::MAX;

/// How a read step ended.
enum Got {
    /// `n` bytes; `drained`: a short read proved the stream empty for now.
    Bytes {
        n: usize,
        drained: bool,
    },
    Eof,
    Stop,
    Retry,
    Failed(io::Error),
}

impl<F: Filter, T> BevCore<F, T> {
    /// A core over `io`, with `filter` between it and the user (`passthrough`: the filter never
    /// transforms bytes; only [`super::NoFilter`] should pass `true`).
    pub fn with_io(io: T, filter: F, passthrough: bool) -> Self {
        BevCore {
            input: Buffer::new(),
            output: Buffer::new(),
            raw_in: Buffer::new(),
            raw_out: Buffer::new(),
            filter,
            passthrough,
            suspend: 0,
            eof: false,
            shutdown_requested: false,
            write_shut: false,
            watermarks: Watermarks::default(),
            error: None,
            bytes_read: 0,
            bytes_written: 0,
            small_reads: true,
            read_allowance: UNLIMITED,
            io,
        }
    }

    /// The transport.
    pub fn io(&self) -> &T {
        &self.io
    }
    pub fn io_mut(&mut self) -> &mut T {
        &mut self.io
    }

    /// Gives back the spare capacity of the four buffers' chunk lists, so a quiet stream whose
    /// buffers are empty holds no heap (see [`Buffer::shrink_to_fit`]). Owners call it when
    /// the connection has gone quiet, not per read.
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

    /// Empties all four buffers (the stream is closing).
    pub fn clear(&mut self) {
        self.input.clear();
        self.output.clear();
        self.raw_in.clear();
        self.raw_out.clear();
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
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
    }
    /// Records a failure of the transport for the owner ([`BevEvents::ERROR`]).
    pub fn set_error(&mut self, e: io::Error) {
        self.error = Some(e);
    }
    /// Whether a failure waits for the owner to take it.
    pub fn has_error(&self) -> bool {
        self.error.is_some()
    }
    pub fn eof_seen(&self) -> bool {
        self.eof
    }
    pub fn write_shut(&self) -> bool {
        self.write_shut
    }
    /// Whether the user asked to shut down writing (done once output drains).
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown_requested
    }
    /// Asks for the write side to shut down once output drains (with a filter, after its
    /// end-of-stream marker); the next write step does it.
    pub fn request_shutdown(&mut self) {
        self.shutdown_requested = true;
    }
    /// The filter layer's own buffers: read but not yet decoded, and encoded but not yet
    /// written (both empty for a passthrough stream).
    pub fn raw_buffers(&self) -> (&Buffer, &Buffer) {
        (&self.raw_in, &self.raw_out)
    }

    /// The [`Suspend`] reasons set now, as `Suspend as u8` bits.
    pub fn suspend_mask(&self) -> u8 {
        self.suspend
    }

    /// Puts a predecessor's state into this core (see [`BevState`]): its buffers replace
    /// this core's, and its flags and counts are taken as they were.
    pub fn restore(&mut self, st: BevState) {
        const DATA: u8 = Suspend::User as u8 | Suspend::HighWatermark as u8 | Suspend::Peer as u8;
        self.input = st.input;
        self.output = st.output;
        self.raw_in = st.raw_in;
        self.raw_out = st.raw_out;
        self.eof = st.eof;
        self.shutdown_requested = st.shutdown_requested;
        self.write_shut = st.write_shut;
        self.suspend = (self.suspend & !DATA) | (st.suspend & DATA);
        self.bytes_read = st.bytes_read;
        self.bytes_written = st.bytes_written;
    }

    /// Limits what the read path takes from the transport from now on to `bytes` (`None`, the
    /// default: no limit; at most `u32::MAX - 1`): each read is capped by what is left, and
    /// when none is, reading suspends with [`Suspend::Bandwidth`] until the owner grants more
    /// and lifts it. A rate limit in the owner's hands (libevent's `bufferevent_ratelim`):
    /// the owner decides how many bytes its bucket can spare before a read pass, and takes
    /// back what the pass left ([`read_allowance`](Self::read_allowance)).
    pub fn set_read_allowance(&mut self, bytes: Option<u32>) {
        self.read_allowance = bytes.map_or(UNLIMITED, |b| b.min(UNLIMITED - 1));
    }
    /// What is left of the read allowance (`None`: no limit).
    pub fn read_allowance(&self) -> Option<u32> {
        (self.read_allowance != UNLIMITED).then_some(self.read_allowance)
    }

    /// Bytes read from / written to the transport (the wire, after the filter).
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

    /// Removes a reason not to read. True if it was the last one and the stream may have
    /// something to read (the owner re-drives reading, from outside the caller's stack).
    pub fn unsuspend(&mut self, why: Suspend) -> bool {
        let before = self.suspend;
        self.suspend &= !(why as u8);
        before != 0 && self.suspend == 0
    }

    /// The owner drained some input: true if that lifted the high watermark's suspension and
    /// reading may run again (see [`BevCore::unsuspend`]).
    pub fn input_drained(&mut self) -> bool {
        if self.is_suspended(Suspend::HighWatermark)
            && (self.watermarks.read_high == 0 || self.input_pending() < self.watermarks.read_high)
        {
            return self.unsuspend(Suspend::HighWatermark);
        }
        false
    }

    pub fn disable_read(&mut self) {
        self.suspend_read(Suspend::User);
    }

    /// Whether a filter answered on its own behalf (a handshake message) and has bytes for
    /// the wire that no user write will flush.
    pub fn has_filter_output(&self) -> bool {
        !self.passthrough && !self.raw_out.is_empty()
    }

    /// This stream as a [`Relay`] for a pass-through stream's reads, while it may be one: its
    /// filter transforms (and may frame in place), its user's output is empty, its write side
    /// is neither shut nor shutting, and it has not failed. Reads through it stop once `high`
    /// bytes are pending here (as [`BevCore::output_pending`] counts them).
    pub fn relay(&mut self, high: usize) -> Option<Relay<'_, F>> {
        if self.passthrough
            || !self.output.is_empty()
            || self.shutdown_requested
            || self.write_shut
            || self.error.is_some()
        {
            return None;
        }
        Some(Relay {
            raw_out: &mut self.raw_out,
            filter: &mut self.filter,
            high,
        })
    }

    /// Runs the filter's decode over what `raw_in` holds (`eof`: the transport ended).
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
}

impl<F: Filter, T: Transport> BevCore<F, T> {
    /// The read path: reads from the transport and decodes, until it would block, the input
    /// reaches the high watermark, the filter wants no more, or the budget is spent. Adds
    /// READ (new input of at least the low watermark), EOF, FILTER and ERROR to `ev`. Returns
    /// true if it stopped for the budget alone: the owner re-drives it later, after other
    /// connections had their turn.
    pub fn read_some(&mut self, ev: &mut BevEvents) -> bool {
        self.read_some_via::<NoFilter>(ev, None)
    }

    /// [`read_some`](Self::read_some) for a pass-through stream whose bytes go on to the far
    /// stream that made `relay`: while the relay takes them (nothing waits ahead of them, the
    /// far stream has room and its filter frames in place), reads go straight into the far
    /// stream's frames instead of this stream's input, and READ reports that bytes went
    /// through; the owner then flushes the far stream as it would after moving the input
    /// there. A pass that read into the far stream and found it full stops as at the high
    /// watermark, so the owner's next [`consumed`](Self::input_drained) lifts it and reading
    /// resumes (or stays stopped while the owner holds it back for the far side). Otherwise,
    /// and for a stream that is not pass-through or has a read low watermark, exactly
    /// `read_some`.
    pub fn read_some_via<G: Filter>(
        &mut self,
        ev: &mut BevEvents,
        mut relay: Option<Relay<'_, G>>,
    ) -> bool {
        let mut budget = READ_BUDGET;
        let mut yielded = false;
        let before = self.input.len();
        let read_at_start = self.bytes_read;
        if !self.passthrough || self.watermarks.read_low != 0 {
            relay = None;
        }
        let mut relayed = false;
        // A stream of small messages (requests, replies) is offered one chunk at first, not
        // a batch of them: a read that fills it proves there is more, and the next offers the
        // whole batch. Taking and planning eight chunks to read 64 bytes into one of them
        // costs more than the rare extra read of a stream that turns to bulk.
        let mut offer_cap = if self.small_reads {
            CHUNK_SIZE
        } else {
            usize::MAX
        };
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
                // Yield to other connections; the owner comes back on a deferred pass.
                yielded = true;
                break;
            }
            if self.read_allowance == 0 {
                // The owner's rate limit: it lifts this when its bucket refills.
                self.suspend_read(Suspend::Bandwidth);
                break;
            }
            let mut max = READ_BATCH.min(budget).min(offer_cap);
            if self.read_allowance != UNLIMITED {
                max = max.min(self.read_allowance as usize);
            }
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
            // Straight into the far stream's frames, while nothing waits ahead of the bytes.
            let frames = match relay.as_mut() {
                Some(r) if self.input.is_empty() => r.slots(),
                _ => None,
            };
            if let Some((_, 0)) = frames {
                if relayed {
                    // The far stream is full: stop as at the watermark (see the doc).
                    self.suspend_read(Suspend::HighWatermark);
                    break;
                }
                // Full before this pass read anything: read into the input as usual, so the
                // owner sees the bytes and holds reading back for the far side.
            }
            let target = if self.passthrough {
                &mut self.input
            } else {
                &mut self.raw_in
            };
            let (stream, ready) = self.io.parts();
            let Some(stream) = stream else {
                break;
            };
            let got = match (frames, relay.as_mut(), limit) {
                (Some((slots, room)), Some(r), _) if room > 0 => {
                    let Relay {
                        raw_out, filter, ..
                    } = r;
                    let got = raw_out.read_into_frames(stream, max.min(room), slots, |f, len| {
                        filter.frame_in_place(f, len)
                    });
                    got.map(|(n, offered)| {
                        // Drained only if the read fell short of what it was offered.
                        max = offered;
                        relayed |= n > 0;
                        n
                    })
                }
                (_, _, Some(cap)) => target.read_limited(stream, max, cap),
                _ => target.read_from_framed(stream, max, frame_rest),
            };
            let got = match got {
                Ok(0) => {
                    ready.readable = false;
                    Got::Eof
                }
                Ok(n) => Got::Bytes {
                    n,
                    drained: n < max.min(SHORT_READ) && !ready.peer_closed,
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready.readable = false;
                    Got::Stop
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Got::Retry,
                Err(e) => {
                    ready.readable = false;
                    Got::Failed(e)
                }
            };
            match got {
                Got::Eof => {
                    self.eof = true;
                    self.decode(true, ev);
                    if self.error.is_none() {
                        *ev |= BevEvents::EOF;
                    }
                    break;
                }
                Got::Bytes { n, drained } => {
                    self.small_reads = n < CHUNK_SIZE;
                    if !drained {
                        offer_cap = usize::MAX;
                    }
                    self.bytes_read += n as u64;
                    budget = budget.saturating_sub(n);
                    if self.read_allowance != UNLIMITED {
                        // `max` was capped by it: n fits.
                        self.read_allowance -= n as u32;
                    }
                    if !self.passthrough {
                        self.decode(false, ev);
                        if ev.contains(BevEvents::ERROR) {
                            break;
                        }
                    }
                    if drained {
                        self.io.parts().1.readable = false;
                        break;
                    }
                }
                Got::Stop => break,
                Got::Retry => continue,
                Got::Failed(e) => {
                    self.error = Some(e);
                    *ev |= BevEvents::ERROR;
                    break;
                }
            }
        }
        if relayed || (self.input.len() > before && self.input.len() >= self.watermarks.read_low) {
            *ev |= BevEvents::READ;
        }
        yielded
    }

    /// The write path: encodes the user's output through the filter and writes until the
    /// transport would block or nothing is left. Adds WRITE (output fell to the write low
    /// watermark), ERROR, and SHUTDOWN (everything went out after a requested shutdown: the
    /// owner shuts the transport's write half now, once) to `ev`.
    pub fn write_some(&mut self, ev: &mut BevEvents) {
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
        let out = if self.passthrough {
            &mut self.output
        } else {
            &mut self.raw_out
        };
        let (stream, ready) = self.io.parts();
        if let Some(stream) = stream {
            while ready.writable && !out.is_empty() {
                match out.write_to(stream) {
                    Ok(0) => ready.writable = false,
                    Ok(n) => self.bytes_written += n as u64,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.writable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        ready.writable = false;
                        self.error = Some(e);
                        *ev |= BevEvents::ERROR;
                        return;
                    }
                }
            }
        }
        let now = self.output_pending();
        if now < had && now <= self.watermarks.write_low {
            *ev |= BevEvents::WRITE;
        }
        if now == 0 && self.shutdown_requested && !self.write_shut {
            self.write_shut = true;
            *ev |= BevEvents::SHUTDOWN;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::bufferevent::NoFilter;

    /// An in-memory transport: reads return at most `per_read` bytes of what was delivered,
    /// then `WouldBlock` (or EOF once `fin`); writes take at most `room` bytes.
    #[derive(Default)]
    struct Mem {
        inbound: VecDeque<u8>,
        fin: bool,
        per_read: usize,
        sent: Vec<u8>,
        room: usize,
        reads: usize,
        /// Bytes each vectored read offered.
        offers: Vec<usize>,
    }

    impl Read for Mem {
        fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            if self.inbound.is_empty() {
                return if self.fin {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            }
            let n = dst.len().min(self.per_read).min(self.inbound.len());
            for (d, b) in dst.iter_mut().zip(self.inbound.drain(..n)) {
                *d = b;
            }
            Ok(n)
        }

        fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
            self.read_each(bufs)
        }
    }

    impl Mem {
        /// A `readv`: at most `per_read` bytes in all, filling the buffers in order.
        fn read_each(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
            self.reads += 1;
            self.offers.push(bufs.iter().map(|b| b.len()).sum());
            if self.inbound.is_empty() {
                return if self.fin {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            }
            let mut left = self.per_read.min(self.inbound.len());
            let mut n = 0;
            for b in bufs.iter_mut() {
                let k = b.len().min(left);
                for (d, x) in b.iter_mut().zip(self.inbound.drain(..k)) {
                    *d = x;
                }
                left -= k;
                n += k;
            }
            Ok(n)
        }
    }

    impl Write for Mem {
        fn write(&mut self, src: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = src.len().min(self.room);
            self.room -= n;
            self.sent.extend_from_slice(&src[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct MemIo(Mem, Readiness);

    impl Transport for MemIo {
        type Stream = Mem;
        fn parts(&mut self) -> (Option<&mut Mem>, &mut Readiness) {
            (Some(&mut self.0), &mut self.1)
        }
        fn is_connected(&self) -> bool {
            true
        }
    }

    fn core() -> BevCore<NoFilter, MemIo> {
        BevCore::with_io(MemIo(Mem::default(), Readiness::default()), NoFilter, true)
    }

    fn contents(b: &Buffer) -> Vec<u8> {
        b.slices().flatten().copied().collect()
    }

    #[test]
    fn reads_stop_at_the_high_watermark_and_resume_once_drained() {
        let mut c = core();
        c.set_watermarks(Watermarks {
            read_low: 0,
            read_high: 1000,
            write_low: 0,
        });
        c.io.0.inbound.extend((0..3000u32).map(|i| i as u8));
        c.io.0.per_read = 300;
        c.io.1.readable = true;
        c.io.1.peer_closed = true;
        let mut ev = BevEvents::empty();
        assert!(!c.read_some(&mut ev), "no budget yield");
        assert!(ev.contains(BevEvents::READ));
        assert_eq!(c.input.len(), 1000, "exactly up to the watermark");
        assert!(c.is_suspended(Suspend::HighWatermark));
        assert!(c.io.1.readable, "data is still there: the cache stays set");
        c.input.drain(600);
        assert!(
            c.input_drained(),
            "below the watermark: reading may run again"
        );
        let mut ev = BevEvents::empty();
        c.read_some(&mut ev);
        assert_eq!(c.input.len(), 1000);
        c.input.drain(1000);
        assert!(c.input_drained());
        c.io.0.fin = true;
        let mut ev = BevEvents::empty();
        c.read_some(&mut ev);
        assert_eq!(c.input.len(), 1000, "2600 of 3000 bytes read");
        assert!(
            !ev.contains(BevEvents::EOF) && !c.eof_seen(),
            "EOF is behind 400 more"
        );
        c.input.drain(1000);
        assert!(c.input_drained());
        let mut ev = BevEvents::empty();
        c.read_some(&mut ev);
        assert_eq!(ev, BevEvents::READ | BevEvents::EOF);
        assert_eq!(c.input.len(), 400);
        assert!(c.eof_seen() && !c.io.1.readable);
        assert_eq!(c.wire_bytes().0, 3000);
    }

    #[test]
    fn a_short_read_clears_readable_unless_the_peer_closed() {
        let mut c = core();
        c.io.0.inbound.extend([1u8; 10]);
        c.io.0.per_read = 4;
        c.io.1.readable = true;
        let mut ev = BevEvents::empty();
        c.read_some(&mut ev);
        // 4 < what was offered: the stream is drained as far as an edge-triggered poll can
        // tell, so the core stops after one read and waits for the next edge.
        assert_eq!((c.input.len(), c.io.0.reads), (4, 1));
        assert!(!c.io.1.readable);
        // With the peer's FIN announced, a short read proves nothing: read to the end.
        c.io.1 = Readiness {
            readable: true,
            writable: false,
            peer_closed: true,
        };
        c.io.0.fin = true;
        let mut ev = BevEvents::empty();
        c.read_some(&mut ev);
        assert_eq!(c.input.len(), 10);
        assert!(ev.contains(BevEvents::EOF));
    }

    #[test]
    fn a_read_allowance_caps_reading_and_suspends_for_bandwidth() {
        let mut c = core();
        c.io.0.inbound.extend([5u8; 10_000]);
        c.io.0.per_read = 4096;
        c.io.0.fin = true;
        c.io.1.readable = true;
        c.io.1.peer_closed = true;
        c.set_read_allowance(Some(6000));
        let mut ev = BevEvents::empty();
        c.read_some(&mut ev);
        assert_eq!(c.input.len(), 6000, "exactly the allowance");
        assert_eq!(c.read_allowance(), Some(0));
        assert!(
            c.is_suspended(Suspend::Bandwidth),
            "out of allowance: suspended"
        );
        assert!(ev.contains(BevEvents::READ) && !ev.contains(BevEvents::EOF));
        assert!(c.io.1.readable, "the rest is still there");
        // No allowance: a pass reads nothing, and says why.
        let mut c2 = core();
        c2.io.0.inbound.extend([1u8; 10]);
        c2.io.0.per_read = 10;
        c2.io.1.readable = true;
        c2.set_read_allowance(Some(0));
        let mut ev = BevEvents::empty();
        c2.read_some(&mut ev);
        assert_eq!(
            (c2.input.len(), c2.io.0.reads),
            (0, 0),
            "not even a syscall"
        );
        assert!(c2.is_suspended(Suspend::Bandwidth));
        // The owner grants more and lifts the suspension: reading goes on to the end.
        c.set_read_allowance(Some(100_000));
        assert!(c.unsuspend(Suspend::Bandwidth));
        let mut ev = BevEvents::empty();
        c.read_some(&mut ev);
        assert_eq!(c.input.len(), 10_000);
        assert!(ev.contains(BevEvents::EOF));
        assert_eq!(
            c.read_allowance(),
            Some(96_000),
            "what it did not use is left"
        );
        // Unlimited (the default) counts nothing down.
        c.set_read_allowance(None);
        assert_eq!(c.read_allowance(), None);
    }

    #[test]
    fn writes_report_the_low_watermark_and_shut_down_after_the_last_byte() {
        let mut c = core();
        c.set_watermarks(Watermarks {
            read_low: 0,
            read_high: 0,
            write_low: 100,
        });
        c.output.append(&[7u8; 500]);
        c.io.0.room = 300;
        c.io.1.writable = true;
        c.request_shutdown();
        let mut ev = BevEvents::empty();
        c.write_some(&mut ev);
        assert!(ev.is_empty(), "200 left is above the low watermark: {ev:?}");
        assert!(!c.io.1.writable, "the transport said WouldBlock");
        c.io.0.room = 150;
        c.io.1.writable = true;
        let mut ev = BevEvents::empty();
        c.write_some(&mut ev);
        assert_eq!(ev, BevEvents::WRITE, "50 left");
        assert!(!c.write_shut());
        c.io.0.room = 1000;
        c.io.1.writable = true;
        let mut ev = BevEvents::empty();
        c.write_some(&mut ev);
        assert!(ev.contains(BevEvents::SHUTDOWN) && ev.contains(BevEvents::WRITE));
        assert!(c.write_shut());
        assert_eq!(contents(&c.output).len(), 0);
        assert_eq!(c.io.0.sent, vec![7u8; 500]);
        // Once shut, nothing more is reported.
        let mut ev = BevEvents::empty();
        c.write_some(&mut ev);
        assert!(ev.is_empty());
    }

    /// A toy framer: frames of a 2-byte big-endian length, at most `BODY` bytes, and a 0xEE
    /// tail byte, made in place (a relay's reads) or by copying (`encode`), the same either way.
    struct Frames;

    const BODY: usize = 100;

    fn frame_into(frame: &mut [u8], len: usize) {
        frame[..2].copy_from_slice(&(len as u16).to_be_bytes());
        frame[2 + len] = 0xEE;
    }

    impl Filter for Frames {
        fn decode(
            &mut self,
            _: &mut Buffer,
            _: &mut Buffer,
            _: &mut Buffer,
            _: bool,
        ) -> io::Result<FilterStatus> {
            Ok(FilterStatus::default())
        }
        fn encode(&mut self, output: &mut Buffer, raw_out: &mut Buffer, _: bool) -> io::Result<()> {
            while !output.is_empty() {
                let n = output.len().min(BODY);
                let f = raw_out.reserve(n + 3);
                output.copy_out(&mut f[2..2 + n]);
                frame_into(f, n);
                raw_out.commit(n + 3);
                output.drain(n);
            }
            Ok(())
        }
        fn frame_slots(&mut self, _: &mut Buffer) -> Option<FrameSlots> {
            Some(FrameSlots {
                head: 2,
                body: BODY,
                tail: 1,
                min_body: 10,
                frames: usize::MAX,
            })
        }
        fn frame_in_place(&mut self, frame: &mut [u8], len: usize) -> io::Result<()> {
            assert_eq!(frame.len(), len + 3);
            frame_into(frame, len);
            Ok(())
        }
    }

    /// Takes the whole frames off `raw`, checking each, and appends their bodies to `out`.
    fn unframe(raw: &mut Buffer, out: &mut Vec<u8>) {
        let bytes = contents(raw);
        let mut at = 0;
        while at < bytes.len() {
            let len = usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]]));
            assert!(len > 0 && len <= BODY, "frame body {len}");
            assert_eq!(bytes[at + 2 + len], 0xEE, "frame tail");
            out.extend_from_slice(&bytes[at + 2..at + 2 + len]);
            at += len + 3;
        }
        assert_eq!(at, bytes.len(), "whole frames only");
        raw.clear();
    }

    use super::super::FilterStatus;

    #[test]
    fn relayed_reads_fill_the_far_frames_and_stop_at_its_mark_until_consumed() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + i / 300) as u8).collect();
        let mut near = core();
        near.set_watermarks(Watermarks {
            read_low: 0,
            read_high: 1 << 20,
            write_low: 0,
        });
        near.io.0.inbound.extend(&data);
        // Reads cut frames anywhere: a partial frame is finished at the next read.
        near.io.0.per_read = 37;
        near.io.1.readable = true;
        near.io.1.peer_closed = true;
        let mut far = BevCore::with_io(MemIo(Mem::default(), Readiness::default()), Frames, false);
        let (high, mut got, mut passes) = (1000, Vec::new(), 0);
        while got.len() < data.len() {
            passes += 1;
            assert!(passes < 1000, "reading stalled at {} bytes", got.len());
            let mut ev = BevEvents::empty();
            near.read_some_via(&mut ev, far.relay(high));
            assert!(near.input.is_empty(), "nothing was copied into the input");
            if got.len() + far.raw_out.len() * BODY / (BODY + 3) + BODY < data.len() {
                // The far side filled to its mark (a read may land a frame past it).
                assert!(ev.contains(BevEvents::READ), "{ev:?}");
                assert!(far.raw_out.len() >= high && far.raw_out.len() < high + 37 + 3 * 37);
                assert!(
                    near.is_suspended(Suspend::HighWatermark),
                    "a full relay stops the pass as the watermark does"
                );
            }
            // The owner flushes the far side and says it consumed: reading may run again.
            unframe(&mut far.raw_out, &mut got);
            if near.is_suspended(Suspend::HighWatermark) {
                assert!(near.input_drained(), "consumed lifts the stop");
            }
        }
        assert!(got == data, "the stream arrived whole and in order");
        assert_eq!(near.wire_bytes().0, data.len() as u64);
    }

    #[test]
    fn a_relay_never_overtakes_bytes_already_waiting() {
        let mut near = core();
        near.io.0.per_read = 1000;
        near.io.1.readable = true;
        near.io.1.peer_closed = true;
        let mut far = BevCore::with_io(MemIo(Mem::default(), Readiness::default()), Frames, false);
        let mut got = Vec::new();
        // Bytes in the near input go first: the relay stays unused until they moved on.
        near.input.append(b"first");
        near.io.0.inbound.extend(b"second");
        let mut ev = BevEvents::empty();
        near.read_some_via(&mut ev, far.relay(1 << 20));
        assert_eq!(contents(&near.input), b"firstsecond");
        assert!(far.raw_out.is_empty());
        // And bytes in the far output (not yet framed) go before relayed ones: no relay then.
        near.input.move_all_to(&mut far.output);
        assert!(far.relay(1 << 20).is_none());
        let mut ev = BevEvents::empty();
        far.write_some(&mut ev);
        assert!(far.output.is_empty());
        // Full before the pass read anything: the bytes go to the input, for the owner to
        // see and hold reading back.
        near.io.0.inbound.extend(b"third");
        let mut ev = BevEvents::empty();
        near.read_some_via(&mut ev, far.relay(10));
        assert_eq!(contents(&near.input), b"third");
        assert!(ev.contains(BevEvents::READ));
        near.input.move_all_to(&mut far.output);
        far.write_some(&mut BevEvents::empty());
        near.io.0.inbound.extend(b"fourth");
        let mut ev = BevEvents::empty();
        near.read_some_via(&mut ev, far.relay(1 << 20));
        assert!(ev.contains(BevEvents::READ) && near.input.is_empty());
        unframe(&mut far.raw_out, &mut got);
        assert_eq!(got, b"firstsecondthirdfourth");
    }

    #[test]
    fn a_small_message_stream_is_offered_one_chunk_and_a_bulk_one_a_batch() {
        let mut c = core();
        c.io.0.per_read = usize::MAX;
        // A request: the first read of a fresh stream offers one chunk.
        c.io.0.inbound.extend([1u8; 100]);
        c.io.1.readable = true;
        c.read_some(&mut BevEvents::empty());
        assert_eq!(c.io.0.offers, [CHUNK_SIZE]);
        assert_eq!(c.input.len(), 100);
        // Bulk arrives: the one-chunk read fills, so the same pass goes on with whole batches,
        // and the next pass starts with one.
        c.input.clear();
        c.io.0.offers.clear();
        c.io.0.inbound.extend(vec![2u8; 600_000]);
        c.io.1.readable = true;
        c.read_some(&mut BevEvents::empty());
        assert_eq!(c.io.0.offers[0], CHUNK_SIZE);
        assert!(
            c.io.0.offers[1..]
                .iter()
                .all(|&o| o >= READ_BATCH - CHUNK_SIZE)
        );
        assert_eq!(c.input.len(), 600_000, "read to the end in one pass");
        c.input.clear();
        c.io.0.offers.clear();
        c.io.0.inbound.extend(vec![3u8; 300_000]);
        c.io.1.readable = true;
        c.read_some(&mut BevEvents::empty());
        assert!(
            c.io.0.offers[0] >= READ_BATCH - CHUNK_SIZE,
            "{:?}",
            c.io.0.offers
        );
    }
}
