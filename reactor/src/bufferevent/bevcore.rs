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
//! - The read path never takes more from the transport than the read allowance the owner set
//!   (a rate limit's tokens); with none left it suspends ([`Suspend::Bandwidth`]) without a
//!   system call. An allowance is one counter compared per read, not a clock or a bucket: the
//!   owner keeps those.

use std::io::{self, Read, Write};

use super::{BevEvents, Filter, Suspend, Watermarks};
use crate::buffer::Buffer;

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
    pub(super) watermarks: Watermarks,
    pub(super) error: Option<io::Error>,
    pub(super) bytes_read: u64,
    pub(super) bytes_written: u64,
    /// Bytes the read path may still take from the transport ([`UNLIMITED`]: no limit).
    pub(super) read_allowance: u32,
    pub(super) io: T,
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
        let mut budget = READ_BUDGET;
        let mut yielded = false;
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
                // Yield to other connections; the owner comes back on a deferred pass.
                yielded = true;
                break;
            }
            if self.read_allowance == 0 {
                // The owner's rate limit: it lifts this when its bucket refills.
                self.suspend_read(Suspend::Bandwidth);
                break;
            }
            let mut max = READ_BATCH.min(budget);
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
            let target = if self.passthrough {
                &mut self.input
            } else {
                &mut self.raw_in
            };
            let (stream, ready) = self.io.parts();
            let Some(stream) = stream else {
                break;
            };
            let got = match limit {
                Some(cap) => target.read_limited(stream, max, cap),
                None => target.read_from_framed(stream, max, frame_rest),
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
        if self.input.len() > before && self.input.len() >= self.watermarks.read_low {
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
}
