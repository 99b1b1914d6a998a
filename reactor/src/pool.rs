//! Per-thread pool of fixed-size byte chunks, the storage behind every [`Buffer`].
//!
//! Each shard runs one event loop on one thread, so a thread-local free list *is* a per-loop
//! pool: taking and giving a chunk is a `Vec` pop/push with no lock and no atomic. Buffers
//! that drain to empty hand their chunks back at once, which is what makes an idle connection
//! cost almost nothing, and the free list is capped ([`set_max_cached`]) so a burst does not
//! pin memory forever.
//!
//! Invariants (per thread, checked by the tests):
//! - every pooled chunk is exactly [`CHUNK_SIZE`] bytes and holds valid data in `start..end`;
//!   a [`take_small`] chunk is smaller, never pooled and not in the statistics;
//! - a chunk handed out by [`take`] is empty with `start == end == 0`;
//! - `allocated_total - freed_total == live_chunks + cached_chunks`, where `live_chunks` counts
//!   chunks taken and not yet given back. [`Buffer`] gives its chunks back on drop, so normal
//!   use never leaks from the accounting; a bare [`Chunk`] dropped without [`give`] is counted
//!   as live forever (its memory is still freed).
//!
//! Beside the chunks, the pool keeps the small allocations that hold a [`Buffer`]'s chunk
//! list ([`take_list`], [`give_list`]): a connection's buffers take one each on first use and
//! hand it back when dropped or shrunk, so opening and closing connections allocates no lists
//! once the cache is warm. At most [`LISTS_CACHED`] are kept, each of at most
//! [`LIST_CAP_CACHED`] entries (a list a bulk transfer grew is freed instead).
//!
//! [`Chunk`] is deliberately `!Send`: a chunk taken on one thread and given back on another
//! would corrupt both threads' statistics, and a connection's buffers belong to its shard anyway.
//!
//! [`Buffer`]: super::buffer::Buffer

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;

/// Size of every chunk: large enough for one 16 KiB-class sealed record plus its framing, and
/// for a socket read to move a useful amount per `readv` iovec.
pub const CHUNK_SIZE: usize = 32 * 1024;

/// Default cap of a thread's free list: 64 chunks = 2 MiB (cached chunks stay resident).
pub const DEFAULT_MAX_CACHED: usize = 64;

/// A [`CHUNK_SIZE`]-byte block with the offsets of its valid data (`start..end`).
///
/// Bytes before `start` were already consumed; bytes after `end` are writable tail room.
pub struct Chunk {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    // `*const ()` makes the type !Send and !Sync: the pool accounting is per thread.
    _not_send: PhantomData<*const ()>,
}

impl Chunk {
    fn from_box(buf: Box<[u8]>) -> Chunk {
        debug_assert_eq!(buf.len(), CHUNK_SIZE);
        Chunk {
            buf,
            start: 0,
            end: 0,
            _not_send: PhantomData,
        }
    }

    /// Bytes of valid data.
    #[inline]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the chunk holds no valid data.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The valid data.
    #[inline]
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// The valid data, mutably.
    #[inline]
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    /// Writable bytes after the data.
    #[inline]
    pub fn room(&self) -> usize {
        self.buf.len() - self.end
    }

    /// Bytes the chunk can hold: [`CHUNK_SIZE`], or less for a [`take_small`] chunk.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// The writable tail room; [`commit`](Chunk::commit) turns a prefix of it into data.
    #[inline]
    pub(crate) fn tail_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.end..]
    }

    /// Appends as much of `data` as fits in the tail room; returns how many bytes were copied.
    #[inline]
    pub(crate) fn push_slice(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.room());
        self.buf[self.end..self.end + n].copy_from_slice(&data[..n]);
        self.end += n;
        n
    }

    /// Marks `n` bytes of the tail room as data.
    #[inline]
    pub(crate) fn commit(&mut self, n: usize) {
        assert!(
            n <= self.room(),
            "commit({n}) exceeds chunk room {}",
            self.room()
        );
        self.end += n;
    }

    /// Drops `n <= len()` bytes from the front. An emptied chunk rewinds to offset 0 so all of
    /// it is tail room again.
    #[inline]
    pub(crate) fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n;
        if self.start >= self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Keeps only the first `n <= len()` bytes of data.
    #[inline]
    pub(crate) fn truncate(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.end = self.start + n.min(self.len());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Moves the data to offset 0, maximising the tail room.
    pub(crate) fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }
}

impl fmt::Debug for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chunk")
            .field("start", &self.start)
            .field("end", &self.end)
            .finish()
    }
}

/// A snapshot of this thread's pool accounting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Chunks on the free list, ready for [`take`].
    pub cached_chunks: usize,
    /// Chunks taken and not given back (held by buffers).
    pub live_chunks: usize,
    /// Chunks ever allocated from the system allocator.
    pub allocated_total: u64,
    /// Chunks ever returned to the system allocator (given back while the free list was full,
    /// or trimmed by [`set_max_cached`]).
    pub freed_total: u64,
    /// [`take`] calls served from the free list rather than the allocator.
    pub reused_total: u64,
    /// The free list's cap.
    pub max_cached: usize,
}

impl PoolStats {
    /// Bytes held on the free list.
    pub fn cached_bytes(&self) -> usize {
        self.cached_chunks * CHUNK_SIZE
    }

    /// Bytes held by buffers.
    pub fn live_bytes(&self) -> usize {
        self.live_chunks * CHUNK_SIZE
    }
}

struct Pool {
    free: Vec<Box<[u8]>>,
    max_cached: usize,
    live: usize,
    allocated_total: u64,
    freed_total: u64,
    reused_total: u64,
}

impl Pool {
    const fn new() -> Pool {
        Pool {
            free: Vec::new(),
            max_cached: DEFAULT_MAX_CACHED,
            live: 0,
            allocated_total: 0,
            freed_total: 0,
            reused_total: 0,
        }
    }
}

thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool::new()) };
}

fn alloc_chunk() -> Box<[u8]> {
    vec![0u8; CHUNK_SIZE].into_boxed_slice()
}

/// Takes an empty chunk from this thread's free list, or allocates a fresh one.
pub fn take() -> Chunk {
    // `try_with` fails only while this thread's locals are being destroyed (a buffer stored
    // in another thread-local): then the chunk is simply allocated and left out of the stats.
    let cached = POOL
        .try_with(|p| {
            let mut p = p.borrow_mut();
            p.live += 1;
            match p.free.pop() {
                Some(b) => {
                    p.reused_total += 1;
                    Some(b)
                }
                None => {
                    p.allocated_total += 1;
                    None
                }
            }
        })
        .ok()
        .flatten();
    Chunk::from_box(cached.unwrap_or_else(alloc_chunk))
}

/// A chunk of `cap` bytes for a buffer that must stay small (a connection that has not
/// authenticated yet): a plain heap allocation outside the pool and its accounting, freed when
/// given back. A `cap` of [`CHUNK_SIZE`] or more is an ordinary [`take`].
pub fn take_small(cap: usize) -> Chunk {
    if cap >= CHUNK_SIZE {
        return take();
    }
    Chunk {
        buf: vec![0u8; cap].into_boxed_slice(),
        start: 0,
        end: 0,
        _not_send: PhantomData,
    }
}

/// Gives a chunk back to this thread's free list, or frees it if the list is at its cap (or
/// if it is a [`take_small`] chunk, which the pool never holds).
pub fn give(c: Chunk) {
    let buf = c.buf;
    if buf.len() != CHUNK_SIZE {
        return;
    }
    let _ = POOL.try_with(|p| {
        let mut p = p.borrow_mut();
        p.live = p.live.saturating_sub(1);
        if p.free.len() < p.max_cached {
            p.free.push(buf);
        } else {
            p.freed_total += 1;
            // `buf` is dropped here, returning its memory to the allocator.
        }
    });
}

/// Empty chunk lists this thread keeps for reuse ([`take_list`]); more are freed.
pub const LISTS_CACHED: usize = 256;
/// Capacity of a list made fresh, and the largest capacity [`give_list`] keeps: a
/// request/response buffer holds one or two chunks at a time.
pub const LIST_CAP_CACHED: usize = 4;

/// Counters of the list cache (per thread).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListStats {
    /// Lists on the cache, ready for [`take_list`].
    pub cached: usize,
    /// Lists ever made fresh (each one heap allocation).
    pub allocated_total: u64,
    /// [`take_list`] calls served from the cache.
    pub reused_total: u64,
}

struct Lists {
    free: Vec<VecDeque<Chunk>>,
    stats: ListStats,
}

thread_local! {
    static LISTS: RefCell<Lists> = const {
        RefCell::new(Lists { free: Vec::new(), stats: ListStats {
            cached: 0, allocated_total: 0, reused_total: 0,
        } })
    };
}

/// An empty chunk list with room for at least one chunk: from this thread's cache, or made
/// fresh with [`LIST_CAP_CACHED`] entries.
pub fn take_list() -> VecDeque<Chunk> {
    let cached = LISTS
        .try_with(|l| {
            let mut l = l.borrow_mut();
            let got = l.free.pop();
            if got.is_some() {
                l.stats.reused_total += 1;
            } else {
                l.stats.allocated_total += 1;
            }
            got
        })
        .ok()
        .flatten();
    cached.unwrap_or_else(|| VecDeque::with_capacity(LIST_CAP_CACHED))
}

/// Keeps an emptied chunk list for the next [`take_list`], unless it holds no allocation,
/// grew past [`LIST_CAP_CACHED`], or the cache is full (then it is freed). Its chunks, if any,
/// go back to the chunk pool first.
pub fn give_list(mut list: VecDeque<Chunk>) {
    for c in list.drain(..) {
        give(c);
    }
    if list.capacity() == 0 || list.capacity() > LIST_CAP_CACHED {
        return;
    }
    let _ = LISTS.try_with(|l| {
        let mut l = l.borrow_mut();
        if l.free.len() < LISTS_CACHED {
            l.free.push(list);
        }
    });
}

/// This thread's list-cache counters.
pub fn list_stats() -> ListStats {
    LISTS
        .try_with(|l| {
            let l = l.borrow();
            ListStats {
                cached: l.free.len(),
                ..l.stats
            }
        })
        .unwrap_or_default()
}

/// Sets the cap of this thread's free list, freeing cached chunks above it at once.
pub fn set_max_cached(chunks: usize) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.max_cached = chunks;
        if p.free.len() > chunks {
            let excess = p.free.len() - chunks;
            p.free.truncate(chunks);
            p.free.shrink_to_fit();
            p.freed_total += excess as u64;
        }
    });
}

/// This thread's pool accounting.
pub fn stats() -> PoolStats {
    POOL.try_with(|p| {
        let p = p.borrow();
        PoolStats {
            cached_chunks: p.free.len(),
            live_chunks: p.live,
            allocated_total: p.allocated_total,
            freed_total: p.freed_total,
            reused_total: p.reused_total,
            max_cached: p.max_cached,
        }
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consistent(s: PoolStats) {
        assert_eq!(
            s.allocated_total - s.freed_total,
            (s.live_chunks + s.cached_chunks) as u64,
            "{s:?}"
        );
        assert!(s.cached_chunks <= s.max_cached, "{s:?}");
    }

    // Each test runs on its own thread, so the thread-local pool starts fresh.

    #[test]
    fn take_give_reuses() {
        let c = take();
        assert!(c.is_empty());
        assert_eq!(c.room(), CHUNK_SIZE);
        let s = stats();
        assert_eq!(
            (s.live_chunks, s.cached_chunks, s.allocated_total),
            (1, 0, 1)
        );
        give(c);
        let s = stats();
        assert_eq!((s.live_chunks, s.cached_chunks), (0, 1));
        assert_eq!(s.cached_bytes(), CHUNK_SIZE);
        let c = take();
        let s = stats();
        assert_eq!(
            (s.live_chunks, s.allocated_total, s.reused_total),
            (1, 1, 1)
        );
        give(c);
        consistent(stats());
    }

    #[test]
    fn given_chunk_comes_back_empty() {
        let mut c = take();
        assert_eq!(c.push_slice(b"hello"), 5);
        c.consume(2);
        assert_eq!(c.data(), b"llo");
        give(c);
        let c = take();
        assert_eq!((c.len(), c.room()), (0, CHUNK_SIZE));
        give(c);
    }

    #[test]
    fn cap_frees_excess() {
        set_max_cached(2);
        let cs: Vec<Chunk> = (0..5).map(|_| take()).collect();
        for c in cs {
            give(c);
        }
        let s = stats();
        assert_eq!((s.cached_chunks, s.live_chunks, s.freed_total), (2, 0, 3));
        consistent(s);
        set_max_cached(0);
        let s = stats();
        assert_eq!((s.cached_chunks, s.freed_total), (0, 5));
        consistent(s);
    }

    #[test]
    fn lists_are_reused_and_the_cache_is_bounded() {
        let mut l = take_list();
        assert!(l.is_empty() && l.capacity() >= 1);
        l.push_back(take());
        give_list(l); // its chunk goes back to the chunk pool, the list to the cache
        assert_eq!(stats().live_chunks, 0);
        let s = list_stats();
        assert_eq!((s.cached, s.allocated_total, s.reused_total), (1, 1, 0));
        let l = take_list();
        assert_eq!(list_stats().reused_total, 1);
        give_list(l);
        // A list a bulk transfer grew, and a list with no allocation, are not kept.
        let mut big = take_list();
        big.reserve(64);
        give_list(big);
        give_list(VecDeque::new());
        assert_eq!(list_stats().cached, 0, "the cached one was taken by `big`");
        // Never more than LISTS_CACHED.
        for _ in 0..LISTS_CACHED + 10 {
            give_list(VecDeque::with_capacity(1));
        }
        assert_eq!(list_stats().cached, LISTS_CACHED);
    }

    #[test]
    fn chunk_offsets() {
        let mut c = take();
        assert_eq!(c.push_slice(&[7u8; CHUNK_SIZE + 10]), CHUNK_SIZE);
        assert_eq!(c.room(), 0);
        c.consume(CHUNK_SIZE - 3);
        assert_eq!(c.len(), 3);
        c.compact();
        assert_eq!((c.len(), c.room()), (3, CHUNK_SIZE - 3));
        c.tail_mut()[0] = 9;
        c.commit(1);
        assert_eq!(c.data(), &[7, 7, 7, 9]);
        c.consume(4);
        assert_eq!(c.room(), CHUNK_SIZE, "an emptied chunk rewinds");
        give(c);
    }
}
