//! `Buffer`: libevent's evbuffer — a byte queue stored as a chain of pooled chunks.
//!
//! Data is appended at the tail and consumed from the front; socket I/O is vectored
//! ([`Buffer::read_from`] / [`Buffer::write_to`]), and whole chunks move between buffers
//! without copying ([`Buffer::move_all_to`]). [`Buffer::reserve`] / [`Buffer::commit`] let a
//! caller build a record in place (e.g. seal it with room for its header and tag).
//!
//! Invariants:
//! - `len` equals the sum of the chunks' data lengths;
//! - every chunk except the last holds at least one byte; the last may be empty only as a
//!   reservation (after [`reserve`](Buffer::reserve), before a [`commit`](Buffer::commit) or an
//!   operation that empties the buffer);
//! - writable tail room exists only in the last chunk;
//! - a buffer drained to empty holds no chunks: they go straight back to this thread's pool.
//!   `Buffer::new` allocates nothing; a buffer's first chunk brings a chunk list from the
//!   thread's list cache ([`pool::take_list`]), which the buffer keeps (so a busy buffer does
//!   not allocate per fill) until [`shrink_to_fit`](Buffer::shrink_to_fit) or drop hand it
//!   back: an empty buffer then holds no heap at all, and a new connection's buffers reuse the
//!   lists a closed one gave back.
//! - moving a chunk into a buffer whose tail room can hold its bytes copies them and recycles
//!   the chunk, so a stream of tiny moves never costs a chunk per move (bounded memory).
//!
//! A `Buffer` is `!Send` (its chunks belong to this thread's pool) and gives its chunks back to
//! the pool when dropped.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};

use super::pool::{self, CHUNK_SIZE, Chunk};

/// Most fresh chunks one [`Buffer::read_from`] offers, besides the current tail's room (so at
/// most `READ_IOVECS + 1` iovecs). The tail has an iovec of its own because a framed read
/// offers it only a frame's rest, often a few bytes: taking a fresh chunk's place would cut
/// the read a chunk short of its allowance and cost another syscall to read that chunk.
pub const READ_IOVECS: usize = 8;
/// Iovec slots of one read: the tail, then up to [`READ_IOVECS`] fresh chunks.
const READ_SLOTS: usize = READ_IOVECS + 1;
/// Most iovecs one [`Buffer::write_to`] offers.
pub const WRITE_IOVECS: usize = 16;
/// Data at most this long is moved to the front of its chunk by [`Buffer::reserve`] rather
/// than starting a new chunk: a short memcpy is cheaper than holding a second 32 KiB chunk.
const COMPACT_MAX: usize = 4 * 1024;

/// Most frames one [`Buffer::read_into_frames`] offers: two per fresh chunk of
/// [`READ_IOVECS`], and two in the current tail.
const FRAME_IOVECS: usize = 2 * READ_IOVECS + 2;

/// The layout of the frames [`Buffer::read_into_frames`] reads into: each is `head` bytes
/// reserved for a header, a body of at most `body` bytes that the read fills, and `tail` bytes
/// reserved after the body's end (a record's header, payload and tag).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameSlots {
    pub head: usize,
    pub body: usize,
    pub tail: usize,
    /// A chunk's leftover room becomes a frame only if its body can hold this many bytes
    /// (so bulk data is not cut into uselessly small frames to fill a chunk's last bytes).
    pub min_body: usize,
    /// The most frames this read may fill (e.g. until the framer must put something else
    /// between them).
    pub frames: usize,
}

/// A byte queue over a chain of pooled [`CHUNK_SIZE`] chunks.
#[derive(Default)]
pub struct Buffer {
    chunks: VecDeque<Chunk>,
    len: usize,
}

impl Buffer {
    /// An empty buffer; allocates nothing.
    pub fn new() -> Buffer {
        Buffer {
            chunks: VecDeque::new(),
            len: 0,
        }
    }

    /// Bytes of readable data.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is no readable data.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Chunks held, including an outstanding reservation.
    #[inline]
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Writable contiguous bytes after the data, without taking a new chunk.
    #[inline]
    pub fn tail_room(&self) -> usize {
        self.chunks.back().map_or(0, Chunk::room)
    }

    /// Copies `data` to the end: into the tail room first, then into new chunks.
    pub fn append(&mut self, mut data: &[u8]) {
        self.len += data.len();
        while !data.is_empty() {
            match self.chunks.back_mut() {
                Some(last) if last.room() > 0 => {
                    let n = last.push_slice(data);
                    data = &data[n..];
                }
                _ => self.list().push_back(pool::take()),
            }
        }
    }

    /// Drops the first `n` bytes (clamped to `len()`); emptied chunks go back to the pool.
    pub fn drain(&mut self, n: usize) {
        let mut n = n.min(self.len);
        self.len -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let l = front.len();
            if l <= n {
                n -= l;
                self.pop_front_give();
            } else {
                front.consume(n);
                n = 0;
            }
        }
        if self.len == 0 {
            // Also returns an empty reservation: an empty buffer holds no chunks.
            self.clear();
        }
    }

    /// Drops all data and gives every chunk back to the pool.
    pub fn clear(&mut self) {
        for c in self.chunks.drain(..) {
            pool::give(c);
        }
        self.len = 0;
    }

    /// Gives back the chunk list's spare capacity: an empty buffer then holds no heap at all
    /// (its list goes back to the thread's list cache). For owners of quiet buffers (an idle
    /// connection); a busy buffer would only take a list again on the next fill.
    pub fn shrink_to_fit(&mut self) {
        if self.chunks.is_empty() {
            pool::give_list(std::mem::take(&mut self.chunks));
        } else {
            self.chunks.shrink_to_fit();
        }
    }

    /// The chunk list, taken from the thread's list cache if this buffer holds none yet.
    #[inline]
    fn list(&mut self) -> &mut VecDeque<Chunk> {
        if self.chunks.capacity() == 0 {
            self.chunks = pool::take_list();
        }
        &mut self.chunks
    }

    /// The first contiguous readable slice (empty if the buffer is).
    #[inline]
    pub fn first_slice(&self) -> &[u8] {
        self.chunks.front().map_or(&[], Chunk::data)
    }

    /// The first contiguous readable slice, mutably, for a decoder that transforms bytes where
    /// they lie (see [`split_front_to`](Buffer::split_front_to)).
    #[inline]
    pub fn first_slice_mut(&mut self) -> &mut [u8] {
        self.chunks.front_mut().map_or(&mut [], Chunk::data_mut)
    }

    /// For a decoder that rewrote the front chunk in place: its first `produced` bytes are
    /// output, the rest of its first `consumed` bytes are spent input. Drops the first
    /// `consumed` bytes and appends the `produced` ones to `dst`, copying as little as it can:
    /// when the front chunk was consumed whole it moves to `dst` (as in
    /// [`move_all_to`](Buffer::move_all_to)); otherwise the smaller side is copied — the
    /// output to `dst`, or the unconsumed rest into a fresh chunk that stays here (a pool
    /// chunk, no heap allocation once the pool is warm).
    ///
    /// # Panics
    /// If `produced > consumed` or `consumed` exceeds the front chunk's data.
    pub fn split_front_to(&mut self, dst: &mut Buffer, produced: usize, consumed: usize) {
        let l = self.chunks.front().map_or(0, Chunk::len);
        assert!(
            produced <= consumed && consumed <= l,
            "Buffer::split_front_to({produced}, {consumed}) with a {l}-byte front chunk"
        );
        if consumed == 0 {
            return;
        }
        let rest = l - consumed;
        if rest == 0 || (produced > rest && rest <= CHUNK_SIZE / 2) {
            let Some(mut c) = self.chunks.pop_front() else {
                return;
            };
            if rest > 0 {
                let mut keep = pool::take();
                keep.push_slice(&c.data()[consumed..]);
                self.list().push_front(keep);
            }
            c.truncate(produced);
            dst.push_chunk(c);
        } else if let Some(front) = self.chunks.front_mut() {
            dst.append(&front.data()[..produced]);
            front.consume(consumed);
        }
        self.len -= consumed;
        if self.len == 0 {
            self.clear();
        }
    }

    /// All readable slices, in order; never yields an empty slice.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.chunks
            .iter()
            .map(Chunk::data)
            .filter(|s| !s.is_empty())
    }

    /// Copies up to `dst.len()` bytes from the front without draining; returns the count.
    pub fn copy_out(&self, dst: &mut [u8]) -> usize {
        let mut n = 0;
        for s in self.slices() {
            if n == dst.len() {
                break;
            }
            let k = s.len().min(dst.len() - n);
            dst[n..n + k].copy_from_slice(&s[..k]);
            n += k;
        }
        n
    }

    /// Copies up to `dst.len()` bytes from the front and drains them; returns the count.
    pub fn remove(&mut self, dst: &mut [u8]) -> usize {
        let n = self.copy_out(dst);
        self.drain(n);
        n
    }

    /// Moves all data to the end of `dst`, leaving `self` empty and chunk-free.
    ///
    /// Whole chunks change hands without a byte copy, except that a chunk whose bytes fit in
    /// `dst`'s tail room is copied there and recycled (see the module's bounded-memory rule).
    pub fn move_all_to(&mut self, dst: &mut Buffer) {
        while let Some(c) = self.chunks.pop_front() {
            dst.push_chunk(c);
        }
        self.len = 0;
    }

    /// Moves the first `n` bytes (clamped to `len()`) to the end of `dst`.
    ///
    /// Whole chunks move as in [`move_all_to`](Buffer::move_all_to); only the boundary chunk
    /// is split, by copying its first part.
    pub fn move_to(&mut self, dst: &mut Buffer, n: usize) {
        let mut n = n.min(self.len);
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let l = front.len();
            if l <= n {
                n -= l;
                self.len -= l;
                if let Some(c) = self.chunks.pop_front() {
                    dst.push_chunk(c);
                }
            } else {
                dst.append(&front.data()[..n]);
                front.consume(n);
                self.len -= n;
                n = 0;
            }
        }
        if self.len == 0 {
            self.clear();
        }
    }

    /// Makes the first `n` bytes contiguous and returns them mutably; `None` if `len() < n`.
    ///
    /// Copies nothing when the first chunk already holds `n` bytes. Otherwise the first
    /// chunk's data is moved to its front if needed (at most `n` bytes copied in all) and
    /// topped up from the following chunks; no new chunk is taken.
    ///
    /// # Panics
    /// If `n > CHUNK_SIZE`: no chunk can hold that many contiguous bytes. Check lengths read
    /// from the wire against your record bound before calling.
    pub fn pullup(&mut self, n: usize) -> Option<&mut [u8]> {
        assert!(
            n <= CHUNK_SIZE,
            "Buffer::pullup({n}) exceeds CHUNK_SIZE ({CHUNK_SIZE})"
        );
        if self.len < n {
            return None;
        }
        if n == 0 {
            return Some(&mut []);
        }
        let first_len = self.chunks.front().map_or(0, Chunk::len);
        if first_len < n {
            let mut first = self.chunks.pop_front()?;
            if first.capacity() < n {
                // A small chunk (see `read_limited`) cannot hold the span: a pooled one can.
                let mut big = pool::take();
                big.push_slice(first.data());
                pool::give(first);
                first = big;
            } else if first.len() + first.room() < n {
                first.compact();
            }
            let mut need = n - first.len();
            while need > 0 {
                let Some(next) = self.chunks.front_mut() else {
                    break;
                };
                let k = first.push_slice(&next.data()[..need.min(next.len())]);
                next.consume(k);
                need -= k;
                if next.is_empty() {
                    self.pop_front_give();
                }
            }
            self.list().push_front(first);
        }
        self.chunks.front_mut().map(|c| &mut c.data_mut()[..n])
    }

    /// Returns contiguous writable tail space of at least `n` bytes — all of the tail room, so
    /// the caller may write more — taking a new chunk if the tail has less than `n`.
    /// [`commit`](Buffer::commit) then turns a prefix of it into data.
    ///
    /// If `n > CHUNK_SIZE` the returned slice is shorter than `n` (at most `CHUNK_SIZE`): no
    /// chunk can offer more contiguous space.
    pub fn reserve(&mut self, n: usize) -> &mut [u8] {
        let n = n.min(CHUNK_SIZE);
        let need_new = match self.chunks.back_mut() {
            None => true,
            Some(last) if last.room() >= n => false,
            Some(last) if last.len() <= COMPACT_MAX && last.capacity() - last.len() >= n => {
                last.compact();
                false
            }
            Some(_) => true,
        };
        if need_new {
            self.list().push_back(pool::take());
        }
        match self.chunks.back_mut() {
            Some(last) => last.tail_mut(),
            None => &mut [],
        }
    }

    /// Turns the first `n` bytes of the tail room into data (after writing them through the
    /// slice [`reserve`](Buffer::reserve) returned). `commit(0)` gives back a chunk that
    /// `reserve` took and nothing was written to.
    ///
    /// # Panics
    /// If `n > tail_room()`: committing bytes that were never reserved is API misuse.
    pub fn commit(&mut self, n: usize) {
        let room = self.tail_room();
        assert!(
            n <= room,
            "Buffer::commit({n}) exceeds the reserved tail room ({room})"
        );
        if n == 0 {
            if self.chunks.back().is_some_and(Chunk::is_empty) {
                if let Some(c) = self.chunks.pop_back() {
                    pool::give(c);
                }
            }
            return;
        }
        if let Some(last) = self.chunks.back_mut() {
            last.commit(n);
            self.len += n;
        }
    }

    /// Reads once from `r` with one `read_vectored` call, offering the current tail room plus
    /// as many fresh chunks as it takes to offer `max` bytes (at most [`READ_IOVECS`] of them,
    /// so one call offers at most the tail room plus `8 * CHUNK_SIZE` bytes). Returns the bytes
    /// read and appended.
    ///
    /// Fresh chunks that receive nothing go straight back to the pool, so a read that fails
    /// (`WouldBlock` included) or hits EOF leaves the buffer exactly as it was. `EINTR` is
    /// retried; every other error is returned unchanged. With `max > 0`, `Ok(0)` means EOF;
    /// `max == 0` does no I/O and returns `Ok(0)`.
    pub fn read_from<R: Read + ?Sized>(&mut self, r: &mut R, max: usize) -> io::Result<usize> {
        self.read_from_framed(r, max, None)
    }

    /// [`read_from`](Buffer::read_from) for a reader of frames that must be contiguous to be
    /// decoded: `frame_rest` is what the frame at the end of the buffer still lacks. The tail
    /// chunk is offered only that much, so the fresh chunks start at a frame boundary and
    /// frames that tile a chunk never straddle two (the decoder then copies nothing to make
    /// them contiguous). When the tail chunk lacks room for the rest but would have it with
    /// its data moved to its front, it is compacted first (a copy of at most one frame).
    pub fn read_from_framed<R: Read + ?Sized>(
        &mut self,
        r: &mut R,
        max: usize,
        frame_rest: Option<usize>,
    ) -> io::Result<usize> {
        if max == 0 {
            return Ok(0);
        }
        let mut tail = self.tail_room();
        if let Some(need) = frame_rest.filter(|&n| n > 0) {
            if let Some(last) = self.chunks.back_mut() {
                if tail < need && last.len() + need <= last.capacity() {
                    last.compact();
                    tail = last.room();
                }
            }
            if tail >= need {
                tail = need;
            }
        }
        // What each iovec offers: [0] is the current tail (0 if none), then the fresh chunks.
        let mut offer = [0usize; READ_SLOTS];
        let mut fresh: [Option<Chunk>; READ_SLOTS] = [const { None }; READ_SLOTS];
        offer[0] = tail.min(max);
        let mut offered = offer[0];
        // Slot 0 holds the current tail when it has room; otherwise a fresh chunk uses it.
        let first_fresh = usize::from(offer[0] > 0);
        let mut nslots = first_fresh;
        while offered < max && nslots < first_fresh + READ_IOVECS {
            let o = (max - offered).min(CHUNK_SIZE);
            fresh[nslots] = Some(pool::take());
            offer[nslots] = o;
            offered += o;
            nslots += 1;
        }

        let result = retry_eintr(|| {
            let mut iov: [IoSliceMut<'_>; READ_SLOTS] =
                std::array::from_fn(|_| IoSliceMut::new(&mut []));
            let mut used = 0;
            if first_fresh == 1 {
                if let Some(last) = self.chunks.back_mut() {
                    iov[0] = IoSliceMut::new(&mut last.tail_mut()[..offer[0]]);
                    used = 1;
                }
            }
            for (slot, c) in fresh.iter_mut().enumerate().take(nslots).skip(first_fresh) {
                if let Some(c) = c {
                    iov[used] = IoSliceMut::new(&mut c.tail_mut()[..offer[slot]]);
                    used += 1;
                }
            }
            r.read_vectored(&mut iov[..used])
        });

        let n = match result {
            Ok(n) => n.min(offered), // a misbehaving reader must not make us panic
            Err(e) => {
                give_back(fresh);
                return Err(e);
            }
        };
        let mut rest = n;
        if first_fresh == 1 {
            let m = rest.min(offer[0]);
            if m > 0 {
                if let Some(last) = self.chunks.back_mut() {
                    last.commit(m);
                }
            }
            rest -= m;
        }
        for (slot, c) in fresh.into_iter().enumerate() {
            if let Some(mut c) = c {
                let m = rest.min(offer[slot]);
                rest -= m;
                if m > 0 {
                    c.commit(m);
                    self.list().push_back(c);
                } else {
                    pool::give(c);
                }
            }
        }
        self.len += n;
        Ok(n)
    }

    /// Reads once from `r`, at most `max` bytes, straight into frames laid out at the end of
    /// the buffer (see [`FrameSlots`]), and frames each one where it lies: for a reader whose
    /// bytes are sealed into records on their way out, this is the whole copy-free path (read
    /// into the record's payload slot, seal in place, commit).
    ///
    /// The read is one `read_vectored` call whose iovecs are the frames' body slots: first in
    /// the tail chunk's room, then in up to [`READ_IOVECS`] fresh chunks, each chunk carved
    /// into frames from its end of data (a frame's body is at most `slots.body`, and a chunk's
    /// leftover room becomes a frame only if its body can hold at least `slots.min_body`, so
    /// no chunk but the last is less than `CHUNK_SIZE - head - tail - min_body` full; a stream
    /// of tiny reads fills one chunk before it takes the next).
    /// The kernel fills the slots in order, so every frame but the last filled one is full;
    /// `frame(slot, len)` is then called, in order, for each frame with `len > 0` body bytes,
    /// on the frame's `head + len + tail` bytes with the body at `slot[head..head + len]`; it
    /// fills the head and tail (and may transform the body) in place, and the whole frame is
    /// committed. Returns the body bytes read and the body bytes the read offered (less than
    /// `max` when the frames or iovecs ran out first: a read shorter than `max` does not by
    /// itself prove the reader drained).
    ///
    /// Errors: as [`read_from`](Buffer::read_from) — a read that fails (`WouldBlock`
    /// included) or hits EOF leaves the buffer exactly as it was, fresh chunks that receive
    /// nothing go straight back to the pool. An error from `frame` ends the call at that
    /// frame, with the frames before it committed and its bytes and those after it dropped
    /// (the reader consumed them: the caller's stream is broken and must close).
    pub fn read_into_frames<R: Read + ?Sized>(
        &mut self,
        r: &mut R,
        max: usize,
        slots: FrameSlots,
        mut frame: impl FnMut(&mut [u8], usize) -> io::Result<()>,
    ) -> io::Result<(usize, usize)> {
        let overhead = slots.head + slots.tail;
        if max == 0 || slots.frames == 0 || slots.body == 0 || overhead >= CHUNK_SIZE {
            return Ok((0, 0));
        }
        let min_body = slots.min_body.clamp(1, slots.body);
        // The plan: which chunk each frame is in (0: the current tail, k > 0: fresh[k - 1])
        // and its body length; frames of one chunk lie back to back from its end of data.
        let mut plan = [(0usize, 0usize); FRAME_IOVECS];
        let mut nplan = 0;
        let mut offered = 0;
        let limit = slots.frames.min(FRAME_IOVECS);
        // Carves frames out of `room` bytes of chunk `at` into the plan; false if none fit.
        let mut carve = |at: usize, mut room: usize| {
            let before = nplan;
            while nplan < limit && offered < max {
                let Some(body) = room.checked_sub(overhead).filter(|&b| b >= min_body) else {
                    break;
                };
                let body = body.min(slots.body).min(max - offered);
                plan[nplan] = (at, body);
                nplan += 1;
                offered += body;
                room -= body + overhead;
            }
            nplan > before
        };
        let mut fresh: [Option<Chunk>; READ_IOVECS] = [const { None }; READ_IOVECS];
        let mut nfresh = 0;
        carve(0, self.tail_room());
        while nfresh < READ_IOVECS && carve(nfresh + 1, CHUNK_SIZE) {
            fresh[nfresh] = Some(pool::take());
            nfresh += 1;
        }
        let plan = &plan[..nplan];
        if plan.is_empty() {
            return Ok((0, 0));
        }

        let result = retry_eintr(|| {
            let mut iov: [IoSliceMut<'_>; FRAME_IOVECS] =
                std::array::from_fn(|_| IoSliceMut::new(&mut []));
            let mut used = 0;
            let mut rest: &mut [u8] = match self.chunks.back_mut() {
                Some(last) => last.tail_mut(),
                None => &mut [],
            };
            let mut fresh_iter = fresh.iter_mut().flatten();
            let mut cur = 0;
            for &(at, body) in plan {
                while cur != at {
                    rest = match fresh_iter.next() {
                        Some(c) => c.tail_mut(),
                        None => &mut [],
                    };
                    cur += 1;
                }
                let (_, after_head) = std::mem::take(&mut rest).split_at_mut(slots.head);
                let (b, after_body) = after_head.split_at_mut(body);
                rest = after_body.get_mut(slots.tail..).unwrap_or_default();
                iov[used] = IoSliceMut::new(b);
                used += 1;
            }
            r.read_vectored(&mut iov[..used])
        });
        let n = match result {
            Ok(n) => n.min(offered), // a misbehaving reader must not make us panic
            Err(e) => {
                give_back(fresh);
                return Err(e);
            }
        };

        // Frame and commit, in order: each frame starts at its chunk's (new) end of data.
        let mut left = n;
        let mut failed = None;
        let mut committed_fresh = 0;
        for &(at, body) in plan {
            let len = left.min(body);
            if len == 0 || failed.is_some() {
                break;
            }
            left -= len;
            let chunk = if at == 0 {
                self.chunks.back_mut()
            } else {
                if committed_fresh < at {
                    if let Some(c) = fresh[at - 1].take() {
                        self.list().push_back(c);
                    }
                    committed_fresh = at;
                }
                self.chunks.back_mut()
            };
            let Some(chunk) = chunk else {
                break;
            };
            match frame(&mut chunk.tail_mut()[..len + overhead], len) {
                Ok(()) => {
                    chunk.commit(len + overhead);
                    self.len += len + overhead;
                }
                Err(e) => failed = Some(e),
            }
        }
        give_back(fresh);
        // A fresh chunk pushed for a frame that then failed holds nothing: never leave an
        // empty chunk behind.
        if self.chunks.back().is_some_and(Chunk::is_empty) {
            if let Some(c) = self.chunks.pop_back() {
                pool::give(c);
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok((n, offered)),
        }
    }

    /// Reads once from `r`, at most `max` bytes, into the tail chunk only — which, for an
    /// empty buffer, is a small chunk of `cap` bytes ([`pool::take_small`]) instead of a
    /// pooled [`CHUNK_SIZE`] one. For a reader that must stage little until its peer proves
    /// something (a handshake): with `max` at most `cap - len()`, the buffer never holds more
    /// than `cap` bytes. Errors and EOF leave the buffer as it was (an empty buffer keeps no
    /// chunk). `EINTR` is retried; `max == 0` does no I/O and returns `Ok(0)`.
    pub fn read_limited<R: Read + ?Sized>(
        &mut self,
        r: &mut R,
        max: usize,
        cap: usize,
    ) -> io::Result<usize> {
        if max == 0 {
            return Ok(0);
        }
        if self.chunks.is_empty() {
            self.list().push_back(pool::take_small(cap));
        }
        let result = match self.chunks.back_mut() {
            Some(last) => {
                if last.room() < max {
                    last.compact();
                }
                let n = max.min(last.room());
                let got = retry_eintr(|| r.read(&mut last.tail_mut()[..n]));
                got.map(|k| {
                    // A misbehaving reader must not make us panic.
                    let k = k.min(n);
                    last.commit(k);
                    k
                })
            }
            None => Ok(0),
        };
        if let Ok(k) = result {
            self.len += k;
        }
        if self.len == 0 {
            self.clear();
        }
        result
    }

    /// Writes once to `w` with one `write_vectored` call over up to [`WRITE_IOVECS`] slices
    /// from the front, and drains what was written. Returns the bytes written.
    ///
    /// `EINTR` is retried; every other error (`WouldBlock` included) is returned unchanged and
    /// the buffer is left as it was. An empty buffer does no I/O and returns `Ok(0)`.
    pub fn write_to<W: Write + ?Sized>(&mut self, w: &mut W) -> io::Result<usize> {
        if self.len == 0 {
            return Ok(0);
        }
        let n = {
            let mut iov = [IoSlice::new(&[]); WRITE_IOVECS];
            let mut used = 0;
            for (slot, s) in iov.iter_mut().zip(self.slices()) {
                *slot = IoSlice::new(s);
                used += 1;
            }
            retry_eintr(|| w.write_vectored(&iov[..used]))?
        };
        // A misbehaving writer claiming more than offered must not make us panic.
        let n = n.min(self.len);
        self.drain(n);
        Ok(n)
    }

    /// Appends a chunk taken from another buffer, applying the bounded-memory move rule.
    fn push_chunk(&mut self, c: Chunk) {
        let l = c.len();
        if l == 0 {
            pool::give(c);
            return;
        }
        match self.chunks.back_mut() {
            // An empty reservation always has room, so it is never left in the middle.
            Some(last) if last.room() >= l => {
                last.push_slice(c.data());
                pool::give(c);
            }
            _ => {
                // A small chunk drained from the front of its old buffer may have no room
                // left; compacting it gives later small moves somewhere to be copied to.
                let mut c = c;
                if l <= COMPACT_MAX {
                    c.compact();
                }
                self.list().push_back(c);
            }
        }
        self.len += l;
    }

    fn pop_front_give(&mut self) {
        if let Some(c) = self.chunks.pop_front() {
            pool::give(c);
        }
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        let sum: usize = self.chunks.iter().map(Chunk::len).sum();
        assert_eq!(sum, self.len, "len matches chunks");
        let n = self.chunks.len();
        for (i, c) in self.chunks.iter().enumerate() {
            assert!(i + 1 == n || !c.is_empty(), "empty chunk {i} of {n}");
        }
    }
}

/// Runs one system call, again for as long as it is interrupted by a signal (`EINTR`).
#[inline]
fn retry_eintr<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Gives the fresh chunks a read offered back to the pool (those that received nothing, or
/// all of them when the read failed).
fn give_back<const N: usize>(fresh: [Option<Chunk>; N]) {
    for c in fresh.into_iter().flatten() {
        pool::give(c);
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.len = 0;
        pool::give_list(std::mem::take(&mut self.chunks));
    }
}

impl fmt::Debug for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buffer")
            .field("len", &self.len)
            .field("chunks", &self.chunks.len())
            .finish()
    }
}

/// Appending through `io::Write` never fails and never blocks.
impl Write for Buffer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.append(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::net::UnixStream;

    fn contents(b: &Buffer) -> Vec<u8> {
        b.slices().flatten().copied().collect()
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[test]
    fn new_and_empty_hold_no_chunks() {
        let live0 = pool::stats().live_chunks;
        let mut b = Buffer::new();
        assert_eq!((b.len(), b.chunk_count(), b.tail_room()), (0, 0, 0));
        assert!(b.first_slice().is_empty());
        b.append(&pattern(CHUNK_SIZE * 2 + 5, 1));
        assert_eq!(b.chunk_count(), 3);
        assert_eq!(pool::stats().live_chunks, live0 + 3);
        b.drain(CHUNK_SIZE);
        assert_eq!(b.chunk_count(), 2);
        b.drain(usize::MAX);
        assert_eq!((b.len(), b.chunk_count()), (0, 0));
        assert_eq!(pool::stats().live_chunks, live0);
    }

    #[test]
    fn append_drain_roundtrip() {
        let data = pattern(100_000, 7);
        let mut b = Buffer::new();
        b.append(&data[..10]);
        b.append(&data[10..]);
        assert_eq!(b.len(), data.len());
        assert_eq!(contents(&b), data);
        assert_eq!(b.first_slice(), &data[..CHUNK_SIZE]);
        b.drain(99_990);
        assert_eq!(contents(&b), &data[99_990..]);
        let mut out = [0u8; 20];
        assert_eq!(b.copy_out(&mut out), 10);
        assert_eq!(b.len(), 10);
        assert_eq!(b.remove(&mut out), 10);
        assert_eq!(&out[..10], &data[99_990..]);
        assert!(b.is_empty());
        b.check_invariants();
    }

    #[test]
    fn tiny_moves_stay_bounded() {
        let mut src = Buffer::new();
        let mut dst = Buffer::new();
        for i in 0..10_000u32 {
            src.append(&[i as u8]);
            src.move_all_to(&mut dst);
            assert_eq!(src.chunk_count(), 0);
        }
        assert_eq!(dst.len(), 10_000);
        assert!(
            dst.chunk_count() <= dst.len() / CHUNK_SIZE + 1,
            "{} chunks",
            dst.chunk_count()
        );
        let want: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        assert_eq!(contents(&dst), want);

        // Same with move_to, one byte at a time out of a larger source.
        let mut dst2 = Buffer::new();
        dst.move_to(&mut dst2, 3);
        for _ in 0..5000 {
            dst.move_to(&mut dst2, 1);
        }
        assert!(dst2.chunk_count() <= 2, "{}", dst2.chunk_count());
        assert_eq!(dst.len() + dst2.len(), 10_000);
        dst.check_invariants();
        dst2.check_invariants();
    }

    #[test]
    fn shrink_to_fit_leaves_an_empty_buffer_without_heap() {
        let mut b = Buffer::new();
        assert_eq!(b.chunks.capacity(), 0);
        b.append(&[1; 3 * CHUNK_SIZE]);
        b.drain(b.len());
        assert!(
            b.chunks.capacity() > 0,
            "the list keeps its allocation for reuse"
        );
        b.shrink_to_fit();
        assert_eq!(b.chunks.capacity(), 0);
        // Still a working buffer; a non-empty one keeps what its chunks need.
        b.append(&[2; 10]);
        b.shrink_to_fit();
        assert_eq!(contents(&b), vec![2; 10]);
        b.check_invariants();
    }

    #[test]
    fn drained_front_chunks_do_not_pile_up() {
        // Each source chunk is full-then-drained: one byte, no tail room.
        let mut dst = Buffer::new();
        for i in 0..100u8 {
            let mut src = Buffer::new();
            src.append(&[i; CHUNK_SIZE]);
            src.drain(CHUNK_SIZE - 1);
            src.move_all_to(&mut dst);
        }
        assert_eq!(dst.len(), 100);
        assert_eq!(dst.chunk_count(), 1);
        assert_eq!(contents(&dst), (0..100u8).collect::<Vec<_>>());
    }

    #[test]
    fn big_moves_do_not_copy_chunks() {
        let data = pattern(CHUNK_SIZE * 3, 3);
        let mut src = Buffer::new();
        src.append(&data);
        let mut dst = Buffer::new();
        dst.append(b"x");
        src.move_all_to(&mut dst);
        // The first full chunk does not fit dst's tail room: it moves, as do the others.
        assert_eq!(dst.chunk_count(), 4);
        assert_eq!(dst.len(), data.len() + 1);
        assert_eq!(src.chunk_count(), 0);
        let mut want = b"x".to_vec();
        want.extend_from_slice(&data);
        assert_eq!(contents(&dst), want);

        let mut third = Buffer::new();
        dst.move_to(&mut third, CHUNK_SIZE + 100);
        assert_eq!(contents(&third), &want[..CHUNK_SIZE + 100]);
        assert_eq!(contents(&dst), &want[CHUNK_SIZE + 100..]);
        third.check_invariants();
        dst.check_invariants();
    }

    #[test]
    fn pullup_across_chunks() {
        let data = pattern(CHUNK_SIZE + 500, 9);
        let mut b = Buffer::new();
        b.append(&data);
        b.drain(CHUNK_SIZE - 100);
        assert_eq!(b.first_slice().len(), 100);
        let got = b.pullup(300).expect("enough data");
        assert_eq!(got, &data[CHUNK_SIZE - 100..CHUNK_SIZE + 200]);
        got[0] = 0xAA;
        assert_eq!(b.first_slice()[0], 0xAA);
        assert_eq!(b.len(), 600);
        b.check_invariants();
        assert!(b.pullup(601).is_none());
        assert_eq!(b.pullup(600).map(|s| s.len()), Some(600));
        assert_eq!(b.chunk_count(), 1, "the drained second chunk went back");
        assert_eq!(b.pullup(0).map(|s| s.len()), Some(0));
        b.check_invariants();
    }

    #[test]
    fn pullup_full_chunk_compacts() {
        let data = pattern(CHUNK_SIZE * 2, 5);
        let mut b = Buffer::new();
        b.append(&data);
        b.drain(10);
        let got = b.pullup(CHUNK_SIZE).expect("enough data");
        assert_eq!(got, &data[10..CHUNK_SIZE + 10]);
        assert_eq!(contents(&b), &data[10..]);
        b.check_invariants();
    }

    #[test]
    #[should_panic(expected = "exceeds CHUNK_SIZE")]
    fn pullup_too_large_panics() {
        let mut b = Buffer::new();
        let _ = b.pullup(CHUNK_SIZE + 1);
    }

    #[test]
    fn reserve_commit() {
        let live0 = pool::stats().live_chunks;
        let mut b = Buffer::new();
        let s = b.reserve(5);
        assert_eq!(s.len(), CHUNK_SIZE);
        s[..5].copy_from_slice(b"hello");
        b.commit(5);
        assert_eq!(contents(&b), b"hello");
        assert_eq!(b.tail_room(), CHUNK_SIZE - 5);
        // Enough room: no new chunk.
        b.reserve(100)[..3].copy_from_slice(b"abc");
        b.commit(3);
        assert_eq!((b.chunk_count(), contents(&b)), (1, b"helloabc".to_vec()));
        // Reserve without writing, then commit(0): the buffer is as before.
        b.append(&vec![1u8; b.tail_room() - 10]);
        assert_eq!(b.reserve(20).len(), CHUNK_SIZE);
        assert_eq!(b.chunk_count(), 2);
        b.commit(0);
        assert_eq!(b.chunk_count(), 1);
        b.check_invariants();
        // Oversized reserve returns a whole chunk rather than panicking.
        assert_eq!(b.reserve(CHUNK_SIZE * 4).len(), CHUNK_SIZE);
        b.commit(0);
        drop(b);
        assert_eq!(pool::stats().live_chunks, live0);
        // An uncommitted reservation on an empty buffer is released by drain/clear/drop.
        let mut e = Buffer::new();
        e.reserve(1);
        assert_eq!(e.chunk_count(), 1);
        e.drain(0);
        assert_eq!(e.chunk_count(), 0);
    }

    #[test]
    fn reserve_compacts_small_tail() {
        let mut b = Buffer::new();
        b.append(&pattern(CHUNK_SIZE, 2));
        b.drain(CHUNK_SIZE - 10);
        assert_eq!(b.tail_room(), 0);
        let room = b.reserve(1000).len();
        assert_eq!(room, CHUNK_SIZE - 10);
        assert_eq!(b.chunk_count(), 1);
        assert_eq!(contents(&b), &pattern(CHUNK_SIZE, 2)[CHUNK_SIZE - 10..]);
    }

    #[test]
    fn split_front_moves_or_copies_the_smaller_side() {
        let live0 = pool::stats().live_chunks;
        let data = pattern(CHUNK_SIZE + 100, 9);
        let (mut a, mut out) = (Buffer::new(), Buffer::new());
        a.append(&data);
        // A decoder rewrote the front chunk: 20 bytes of output from 30 consumed.
        a.first_slice_mut()[..20].copy_from_slice(&[0xAB; 20]);
        // The rest (CHUNK_SIZE - 30) is larger: the output is copied, the chunk stays.
        a.split_front_to(&mut out, 20, 30);
        assert_eq!(contents(&out), vec![0xAB; 20]);
        assert_eq!(contents(&a), &data[30..]);
        assert_eq!(a.chunk_count(), 2);
        // Output larger than the rest: the chunk moves, its 100-byte rest goes to a fresh one.
        let l = a.first_slice().len();
        let mut out2 = Buffer::new();
        a.split_front_to(&mut out2, l - 200, l - 100);
        assert_eq!(contents(&out2), &data[30..30 + l - 200]);
        assert_eq!(contents(&a), &data[CHUNK_SIZE - 100..]);
        assert_eq!((a.chunk_count(), a.first_slice().len()), (2, 100));
        // A chunk consumed whole moves; nothing produced gives it back.
        let mut out3 = Buffer::new();
        a.split_front_to(&mut out3, 0, 100);
        assert_eq!((out3.chunk_count(), a.len()), (0, 100));
        a.split_front_to(&mut out3, 60, 100);
        assert_eq!(contents(&out3), &data[CHUNK_SIZE..CHUNK_SIZE + 60]);
        assert_eq!((a.len(), a.chunk_count()), (0, 0));
        for b in [&a, &out, &out2, &out3] {
            b.check_invariants();
        }
        drop((a, out, out2, out3));
        assert_eq!(pool::stats().live_chunks, live0);
    }

    #[test]
    #[should_panic(expected = "split_front_to")]
    fn split_front_beyond_the_chunk_panics() {
        let mut b = Buffer::new();
        b.append(b"abc");
        b.split_front_to(&mut Buffer::new(), 1, 4);
    }

    #[test]
    fn framed_read_starts_fresh_chunks_at_the_frame_end() {
        let data = pattern(4 * CHUNK_SIZE, 3);
        let mut b = Buffer::new();
        b.append(&data[..CHUNK_SIZE - 500]);
        b.drain(CHUNK_SIZE - 1000);
        // 500 bytes of a 1000-byte frame's rest fit the tail: the tail takes only those.
        let mut r = &data[CHUNK_SIZE - 500..];
        let n = b.read_from_framed(&mut r, usize::MAX, Some(300)).unwrap();
        assert_eq!(n, 3 * CHUNK_SIZE + 500, "everything the reader had");
        assert_eq!(
            b.first_slice().len(),
            500 + 300,
            "the tail took the frame's rest only"
        );
        assert_eq!(b.chunk_count(), 5);
        assert_eq!(contents(&b), &data[CHUNK_SIZE - 1000..]);
        b.check_invariants();
        // A frame rest larger than the tail room: the tail is compacted to make room.
        let mut c = Buffer::new();
        c.append(&data[..CHUNK_SIZE]);
        c.drain(CHUNK_SIZE - 10);
        let mut r = &data[CHUNK_SIZE..CHUNK_SIZE + 5000];
        assert_eq!(
            c.read_from_framed(&mut r, usize::MAX, Some(4000)).unwrap(),
            5000
        );
        assert_eq!(c.first_slice().len(), 4010);
        assert_eq!(contents(&c), &data[CHUNK_SIZE - 10..CHUNK_SIZE + 5000]);
        c.check_invariants();
    }

    #[test]
    #[should_panic(expected = "exceeds the reserved tail room")]
    fn commit_without_reserve_panics() {
        let mut b = Buffer::new();
        b.commit(1);
    }

    /// A reader that hands out a fixed script of results.
    struct Script {
        data: Vec<u8>,
        pos: usize,
        steps: Vec<io::Result<usize>>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let step = if self.steps.is_empty() {
                Ok(usize::MAX)
            } else {
                self.steps.remove(0)
            };
            let want = step?;
            let n = want.min(buf.len()).min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }

        fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
            let step = if self.steps.is_empty() {
                Ok(usize::MAX)
            } else {
                self.steps.remove(0)
            };
            let mut want = step?;
            let mut total = 0;
            for b in bufs {
                let n = want.min(b.len()).min(self.data.len() - self.pos);
                b[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
                self.pos += n;
                want -= n;
                total += n;
            }
            Ok(total)
        }
    }

    #[test]
    fn read_from_scripted() {
        let data = pattern(600_000, 4);
        let mut r = Script {
            data: data.clone(),
            pos: 0,
            steps: vec![
                Err(io::ErrorKind::Interrupted.into()),
                Ok(10),
                Err(io::ErrorKind::WouldBlock.into()),
                Ok(CHUNK_SIZE * 2),
                Ok(usize::MAX),
                Ok(usize::MAX),
            ],
        };
        let live0 = pool::stats().live_chunks;
        let mut b = Buffer::new();
        // EINTR is retried transparently.
        assert_eq!(b.read_from(&mut r, 1 << 20).unwrap(), 10);
        assert_eq!(b.chunk_count(), 1);
        // WouldBlock: nothing taken, nothing kept.
        let e = b.read_from(&mut r, 1 << 20).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!((b.len(), b.chunk_count()), (10, 1));
        assert_eq!(pool::stats().live_chunks, live0 + 1);
        // Fills the tail first, then fresh chunks; unused fresh chunks go back.
        assert_eq!(b.read_from(&mut r, 1 << 20).unwrap(), CHUNK_SIZE * 2);
        assert_eq!(b.chunk_count(), 3);
        assert_eq!(pool::stats().live_chunks, live0 + 3);
        // `max` bounds what is offered.
        assert_eq!(b.read_from(&mut r, 1000).unwrap(), 1000);
        // At most the tail + READ_IOVECS fresh chunks.
        let tail = b.tail_room();
        assert!(tail > 0);
        let got = b.read_from(&mut r, usize::MAX).unwrap();
        assert_eq!(got, tail + READ_IOVECS * CHUNK_SIZE);
        let mut total = 10 + CHUNK_SIZE * 2 + 1000 + got;
        assert_eq!(contents(&b), &data[..total]);
        b.check_invariants();
        // Read to EOF; EOF leaves the buffer unchanged.
        loop {
            let before = (b.len(), b.chunk_count());
            match b.read_from(&mut r, usize::MAX).unwrap() {
                0 => {
                    assert_eq!((b.len(), b.chunk_count()), before);
                    break;
                }
                n => total += n,
            }
        }
        assert_eq!(total, data.len());
        assert_eq!(contents(&b), data);
        assert_eq!(b.read_from(&mut r, 0).unwrap(), 0);
        drop(b);
        assert_eq!(pool::stats().live_chunks, live0);
    }

    /// Records as a sealer lays them out: a 3-byte header, at most 16 KiB, a 16-byte tag.
    const RECORDS: FrameSlots = FrameSlots {
        head: 3,
        body: 16384,
        tail: 16,
        min_body: 4096,
        frames: usize::MAX,
    };

    /// Frames in place as a test framer: the body length in the head, 0xEE in the tail.
    fn frame_test(f: &mut [u8], len: usize) -> io::Result<()> {
        assert_eq!(f.len(), len + 19);
        f[..3].copy_from_slice(&[0xAA, (len >> 8) as u8, len as u8]);
        f[3 + len..].fill(0xEE);
        Ok(())
    }

    /// The bodies of the test frames in `b`, checked, and each frame's length.
    fn unframe_test(b: &Buffer) -> (Vec<u8>, Vec<usize>) {
        let bytes = contents(b);
        let (mut body, mut lens, mut at) = (Vec::new(), Vec::new(), 0);
        while at < bytes.len() {
            assert_eq!(bytes[at], 0xAA, "a frame starts at {at}");
            let len = usize::from(bytes[at + 1]) << 8 | usize::from(bytes[at + 2]);
            assert!(
                bytes[at + 3 + len..at + 19 + len]
                    .iter()
                    .all(|&x| x == 0xEE)
            );
            body.extend_from_slice(&bytes[at + 3..at + 3 + len]);
            lens.push(len + 19);
            at += len + 19;
        }
        (body, lens)
    }

    #[test]
    fn framed_reads_tile_chunks_with_whole_frames() {
        let data = pattern(300_000, 6);
        let live0 = pool::stats().live_chunks;
        let mut r = Script {
            data: data.clone(),
            pos: 0,
            steps: vec![Ok(100_000), Ok(5), Ok(usize::MAX)],
        };
        let mut b = Buffer::new();
        let (n, offered) = b
            .read_into_frames(&mut r, 1 << 20, RECORDS, frame_test)
            .unwrap();
        assert_eq!(n, 100_000);
        assert_eq!(
            offered,
            READ_IOVECS * (16384 + 16346),
            "two frames per fresh chunk"
        );
        b.check_invariants();
        // Each full chunk holds a full frame and one that fills it exactly.
        let (body, lens) = unframe_test(&b);
        assert_eq!(body, &data[..100_000]);
        assert_eq!(&lens[..6], &[16403, 16365, 16403, 16365, 16403, 16365]);
        assert_eq!(b.chunk_count(), 4);
        // A tiny read finishes nothing: it is a frame of its own in the tail's room.
        assert_eq!(
            b.read_into_frames(&mut r, 1 << 20, RECORDS, frame_test)
                .unwrap()
                .0,
            5
        );
        assert_eq!(b.chunk_count(), 4);
        let (body, _) = unframe_test(&b);
        assert_eq!(body, &data[..100_005]);
        // `max` and `frames` bound what is offered.
        let few = FrameSlots {
            frames: 2,
            ..RECORDS
        };
        let frames_before = unframe_test(&b).1.len();
        let (n, offered) = b
            .read_into_frames(&mut r, 1 << 20, few, frame_test)
            .unwrap();
        assert!(n == offered && n <= 2 * 16384, "{n} of {offered}");
        assert_eq!(unframe_test(&b).1.len(), frames_before + 2);
        let (n2, offered2) = b
            .read_into_frames(&mut r, 777, RECORDS, frame_test)
            .unwrap();
        assert_eq!((n2, offered2), (777, 777));
        let (body, _) = unframe_test(&b);
        assert_eq!(body, &data[..100_005 + n + 777]);
        b.check_invariants();
        drop(b);
        assert_eq!(pool::stats().live_chunks, live0);
    }

    #[test]
    fn tiny_framed_reads_fill_a_chunk_before_taking_another() {
        let data = pattern(50_000, 8);
        let mut b = Buffer::new();
        let mut src = &data[..];
        let mut total = 0;
        while total < data.len() {
            // Reads of 1 to 97 bytes, as a chatty peer's requests arrive.
            let n = (total * 31 % 97) + 1;
            let mut piece = &src[..n.min(src.len())];
            let (got, _) = b
                .read_into_frames(&mut piece, 1 << 20, RECORDS, frame_test)
                .unwrap();
            src = &src[got..];
            total += got;
        }
        let (body, _) = unframe_test(&b);
        assert!(body == data);
        // Every chunk but the last is full to within a frame's minimum.
        let bound = b.len().div_ceil(CHUNK_SIZE - 4096 - 19) + 1;
        assert!(
            b.chunk_count() <= bound,
            "{} chunks for {}",
            b.chunk_count(),
            b.len()
        );
        b.check_invariants();
    }

    #[test]
    fn a_failed_framed_read_or_framer_leaves_no_stray_chunk() {
        let live0 = pool::stats().live_chunks;
        let mut b = Buffer::new();
        let mut r = Script {
            data: pattern(100_000, 9),
            pos: 0,
            steps: vec![Err(io::ErrorKind::WouldBlock.into()), Ok(40_000)],
        };
        let e = b
            .read_into_frames(&mut r, 1 << 20, RECORDS, frame_test)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!((b.len(), b.chunk_count()), (0, 0));
        assert_eq!(pool::stats().live_chunks, live0);
        // The framer fails on the third frame: the two before it stay, nothing else.
        let mut calls = 0;
        let e = b
            .read_into_frames(&mut r, 1 << 20, RECORDS, |f, len| {
                calls += 1;
                if calls == 3 {
                    return Err(io::ErrorKind::InvalidData.into());
                }
                frame_test(f, len)
            })
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(b.len(), 16403 + 16365);
        assert_eq!(b.chunk_count(), 1);
        b.check_invariants();
        // EOF: nothing changes.
        let mut empty: &[u8] = &[];
        let got = b
            .read_into_frames(&mut empty, 1 << 20, RECORDS, frame_test)
            .unwrap();
        assert_eq!(got, (0, READ_IOVECS * (16384 + 16346)));
        assert_eq!((b.len(), b.chunk_count()), (16403 + 16365, 1));
        drop(b);
        assert_eq!(pool::stats().live_chunks, live0);
    }

    #[test]
    fn read_from_empty_would_block_takes_nothing() {
        let (mut a, _peer) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let live0 = pool::stats().live_chunks;
        let mut b = Buffer::new();
        let e = b.read_from(&mut a, 1 << 20).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(b.chunk_count(), 0);
        assert_eq!(pool::stats().live_chunks, live0);
    }

    /// A writer that accepts at most `step` bytes per call, and WouldBlock every other call.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
        block_next: bool,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }

        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
            let block = self.block_next;
            self.block_next = !block;
            if block {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut left = self.step;
            for b in bufs {
                let n = left.min(b.len());
                self.out.extend_from_slice(&b[..n]);
                left -= n;
            }
            Ok(self.step - left)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn write_to_partial_and_would_block() {
        let data = pattern(CHUNK_SIZE + 50, 8);
        let mut b = Buffer::new();
        b.append(&data);
        let mut w = Trickle {
            out: Vec::new(),
            step: 7,
            block_next: false,
            calls: 0,
        };
        // Move the chunk boundary into the middle of a 7-byte write.
        b.drain(3);
        let mut written = 0;
        loop {
            match b.write_to(&mut w) {
                Ok(0) => break,
                Ok(n) => {
                    assert!(n <= 7);
                    written += n;
                }
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                }
            }
            b.check_invariants();
        }
        assert_eq!(written, data.len() - 3);
        assert_eq!(w.out, &data[3..]);
        assert_eq!(b.chunk_count(), 0);
    }

    #[test]
    fn a_limited_read_stages_bytes_in_a_small_chunk_not_a_pooled_one() {
        let s0 = pool::stats();
        let mut b = Buffer::new();
        let data = pattern(10_000, 4);
        let mut src = &data[..];
        // A peer offers 10,000 bytes; the reader takes at most 138 in all.
        let mut got = 0;
        while b.len() < 138 {
            got += b.read_limited(&mut src, 138 - b.len(), 138).unwrap();
        }
        assert_eq!((got, b.len(), b.chunk_count()), (138, 138, 1));
        assert_eq!(b.chunks[0].capacity(), 138, "a small chunk");
        let s1 = pool::stats();
        assert_eq!(
            (s1.live_chunks, s1.allocated_total),
            (s0.live_chunks, s0.allocated_total),
            "no pooled chunk taken"
        );
        assert_eq!(b.read_limited(&mut src, 0, 138).unwrap(), 0);
        assert_eq!(contents(&b), &data[..138]);
        // Once the limit is lifted, ordinary reads continue after it; a span across the small
        // chunk and a pooled one can still be made contiguous.
        b.read_from(&mut src, 1000).unwrap();
        assert_eq!(b.pullup(500).unwrap(), &data[..500]);
        assert_eq!(contents(&b), &data[..1138]);
        b.check_invariants();
        // A small chunk never joins the pool's free list.
        let mut c = Buffer::new();
        c.read_limited(&mut &data[..], 10, 50).unwrap();
        c.clear();
        assert_eq!(pool::stats().cached_chunks, s1.cached_chunks);
        // EOF and errors leave an empty buffer chunk-free.
        assert_eq!(c.read_limited(&mut &[][..], 10, 50).unwrap(), 0);
        assert_eq!(c.chunk_count(), 0);
    }

    #[test]
    fn socket_roundtrip() {
        let (mut a, mut z) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        z.set_nonblocking(true).unwrap();
        let data = pattern(1 << 20, 6);
        let mut out = Buffer::new();
        out.append(&data);
        let mut inb = Buffer::new();
        let mut eof = false;
        while !eof {
            match out.write_to(&mut a) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("write: {e}"),
            }
            if out.is_empty() {
                // Half-close so the reader sees EOF once it has everything.
                a.shutdown(std::net::Shutdown::Write).unwrap();
            }
            loop {
                match inb.read_from(&mut z, 1 << 20) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("read: {e}"),
                }
            }
        }
        assert_eq!(inb.len(), data.len());
        assert_eq!(contents(&inb), data);
        inb.check_invariants();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(usize),
        Drain(usize),
        MoveAllRoundTrip,
        MoveTo(usize),
        MoveBack(usize),
        Pullup(usize),
        ReserveCommit(usize, usize),
        Remove(usize),
        SplitFront(usize, usize),
        ReadLimited(usize, usize),
        ReadFrames(usize, usize, usize),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        let size = prop_oneof![0usize..64, 0usize..(CHUNK_SIZE * 3)];
        prop_oneof![
            4 => size.clone().prop_map(Op::Append),
            3 => size.clone().prop_map(Op::Drain),
            1 => Just(Op::MoveAllRoundTrip),
            2 => size.clone().prop_map(Op::MoveTo),
            2 => size.clone().prop_map(Op::MoveBack),
            2 => (0usize..=CHUNK_SIZE).prop_map(Op::Pullup),
            2 => (0usize..=CHUNK_SIZE, 0usize..=CHUNK_SIZE).prop_map(|(r, c)| Op::ReserveCommit(r, c)),
            2 => size.clone().prop_map(Op::Remove),
            2 => (0usize..=CHUNK_SIZE, 0usize..=CHUNK_SIZE).prop_map(|(p, c)| Op::SplitFront(p, c)),
            2 => (0usize..300, 1usize..300).prop_map(|(m, c)| Op::ReadLimited(m, c)),
            2 => (size, 1usize..20_000, 1usize..20)
                .prop_map(|(m, body, frames)| Op::ReadFrames(m, body, frames)),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn matches_vec_model(ops in proptest::collection::vec(op(), 1..40)) {
            let live0 = pool::stats().live_chunks;
            {
                let mut a = Buffer::new();
                let mut b = Buffer::new();
                let mut ma: Vec<u8> = Vec::new();
                let mut mb: Vec<u8> = Vec::new();
                let mut seed = 0u8;
                for op in ops {
                    seed = seed.wrapping_add(1);
                    match op {
                        Op::Append(n) => {
                            let d = pattern(n, seed);
                            a.append(&d);
                            ma.extend_from_slice(&d);
                        }
                        Op::Drain(n) => {
                            a.drain(n);
                            ma.drain(..n.min(ma.len()));
                        }
                        Op::MoveAllRoundTrip => {
                            a.move_all_to(&mut b);
                            mb.append(&mut ma);
                            b.move_all_to(&mut a);
                            ma.append(&mut mb);
                        }
                        Op::MoveTo(n) => {
                            a.move_to(&mut b, n);
                            let n = n.min(ma.len());
                            mb.extend(ma.drain(..n));
                        }
                        Op::MoveBack(n) => {
                            b.move_to(&mut a, n);
                            let n = n.min(mb.len());
                            ma.extend(mb.drain(..n));
                        }
                        Op::Pullup(n) => {
                            match a.pullup(n) {
                                Some(s) => {
                                    prop_assert_eq!(&*s, &ma[..n]);
                                    if n > 0 {
                                        s[0] = s[0].wrapping_add(1);
                                        ma[0] = ma[0].wrapping_add(1);
                                    }
                                }
                                None => prop_assert!(ma.len() < n),
                            }
                        }
                        Op::ReserveCommit(r, c) => {
                            let s = a.reserve(r);
                            prop_assert!(s.len() >= r);
                            let c = c.min(s.len());
                            let d = pattern(c, seed);
                            s[..c].copy_from_slice(&d);
                            a.commit(c);
                            ma.extend_from_slice(&d);
                        }
                        Op::Remove(n) => {
                            let mut out = vec![0u8; n];
                            let got = a.remove(&mut out);
                            prop_assert_eq!(got, n.min(ma.len()));
                            prop_assert_eq!(&out[..got], &ma[..got]);
                            ma.drain(..got);
                        }
                        Op::SplitFront(p, c) => {
                            let c = c % (a.first_slice().len() + 1);
                            let p = p % (c + 1);
                            a.split_front_to(&mut b, p, c);
                            mb.extend_from_slice(&ma[..p]);
                            ma.drain(..c);
                        }
                        Op::ReadLimited(max, cap) => {
                            let d = pattern(max, seed);
                            let got = a.read_limited(&mut &d[..], max, cap).unwrap();
                            ma.extend_from_slice(&d[..got]);
                        }
                        Op::ReadFrames(max, body, frames) => {
                            // Frames of a 2-byte head (the body's length) and a 1-byte tail.
                            let d = pattern(max, seed);
                            let slots = FrameSlots { head: 2, body, tail: 1, min_body: 50, frames };
                            let (got, offered) = a
                                .read_into_frames(&mut &d[..], max, slots, |f, len| {
                                    f[..2].copy_from_slice(&(len as u16).to_be_bytes());
                                    f[2 + len] = 0xEE;
                                    Ok(())
                                })
                                .unwrap();
                            // The reader holds `max` bytes: the read takes all it is offered.
                            prop_assert!(got == offered && offered <= max);
                            // A frame may hold less than `body` (a chunk's end): read each
                            // frame's length from the buffer.
                            let mut at = 0;
                            let bytes = contents(&a);
                            let mut pos = ma.len();
                            while at < got {
                                let len = usize::from(u16::from_be_bytes([bytes[pos], bytes[pos + 1]]));
                                prop_assert!(len >= 1 && len <= body);
                                prop_assert_eq!(&bytes[pos + 2..pos + 2 + len], &d[at..at + len]);
                                prop_assert_eq!(bytes[pos + 2 + len], 0xEE);
                                ma.extend_from_slice(&bytes[pos..pos + 3 + len]);
                                pos += 3 + len;
                                at += len;
                            }
                        }
                        Op::Clear => {
                            a.clear();
                            ma.clear();
                        }
                    }
                    a.check_invariants();
                    b.check_invariants();
                    prop_assert_eq!(a.len(), ma.len());
                    prop_assert_eq!(contents(&a), ma.clone());
                    prop_assert_eq!(contents(&b), mb.clone());
                    if a.is_empty() {
                        prop_assert_eq!(a.chunk_count(), 0);
                    }
                }
            }
            let s = pool::stats();
            prop_assert_eq!(s.live_chunks, live0);
            prop_assert_eq!(s.allocated_total - s.freed_total, (s.live_chunks + s.cached_chunks) as u64);
        }
    }
}
