//! A shard's thread: its event loop, and the housekeeping between turns (metrics flushes,
//! heartbeats, active health checks, giving memory back after bursts, the drain).
//!
//! Invariants: a shard reaches other threads only through atomics (its heartbeat, the heap
//! trim it asks for, its failure) and its metric handles; a shard that fails or panics ends
//! the server (the control loop returns [`ExitReason`] for it) — never a half-alive process.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::ExitReason;
use crate::proxy::ShardState;
use crate::proxy::conn::TAG_ABORT;
use crate::reactor::{EventBase, LoopStats, pool};

/// How often a shard flushes counters and publishes its heartbeat.
const HOUSEKEEPING: Duration = Duration::from_millis(250);
/// Chunks freed (beyond the pool's cache) since the last heap trim that justify another.
const TRIM_AFTER_CHUNKS: u64 = 64;
/// Connections hibernated since the last heap trim that justify another, once no more are
/// hibernating: each freed 1-2 KiB of keys and buffer lists, holes that new connections reuse
/// while connections keep arriving, and that only a trim returns after the burst.
const TRIM_AFTER_HIBERNATIONS: u64 = 256;
/// A shard whose buffers hold at most this many chunks is quiet...
const QUIET_LIVE_CHUNKS: usize = 16;
/// ...and after this many quiet housekeeping ticks (2 s) its chunk cache shrinks to...
const QUIET_TICKS: u32 = 8;
/// ...this many chunks (cached chunks are resident memory an idle proxy does not need).
const QUIET_CACHED_CHUNKS: usize = 8;

/// Heap trims that shards ask for and the control thread does. `malloc_trim` walks every
/// glibc arena under that arena's lock: on a shard thread it would stall the shard, outside
/// any loop turn the stall metric sees. On the control thread it holds one arena's lock at a
/// time, and a shard that allocates meanwhile waits inside a callback, where a long wait
/// counts as a stall.
#[derive(Default)]
pub(super) struct HeapTrim {
    wanted: AtomicBool,
}

/// Most heap trims per second of the whole process.
const TRIM_EVERY: Duration = Duration::from_secs(1);

impl HeapTrim {
    /// A shard freed enough since the last trim (see [`MemoryKeeper`]).
    fn request(&self) {
        self.wanted.store(true, Ordering::Release);
    }

    /// On the control thread: trims if a shard asked and the last trim was at least
    /// [`TRIM_EVERY`] ago. Returns how long the trim took.
    pub(super) fn run_due(&self, now: Instant, next: &mut Instant) -> Option<Duration> {
        if now < *next || !self.wanted.swap(false, Ordering::AcqRel) {
            return None;
        }
        crate::sys::trim_heap();
        let took = now.elapsed();
        *next = now + TRIM_EVERY;
        Some(took)
    }
}

/// Gives memory back after bursts: freed heap pages to the kernel (by asking the control
/// thread for a trim), and the chunk cache of a shard that has gone quiet. A busy shard keeps
/// its cache (no allocation per chunk).
#[derive(Default)]
struct MemoryKeeper {
    next_trim: Option<Instant>,
    trimmed_at: u64,
    /// The shard's hibernation count at the last trim, and at the last tick.
    trimmed_hibernations: u64,
    seen_hibernations: u64,
    quiet_ticks: u32,
}

impl MemoryKeeper {
    /// `hibernations`: connections this shard has hibernated so far.
    fn tick(&mut self, now: Instant, hibernations: u64, trim: &HeapTrim) -> pool::PoolStats {
        let p = pool::stats();
        if p.live_chunks <= QUIET_LIVE_CHUNKS && p.cached_chunks > QUIET_CACHED_CHUNKS {
            self.quiet_ticks += 1;
        } else {
            self.quiet_ticks = 0;
        }
        if self.quiet_ticks >= QUIET_TICKS {
            self.quiet_ticks = 0;
            pool::set_max_cached(QUIET_CACHED_CHUNKS);
            pool::set_max_cached(pool::DEFAULT_MAX_CACHED);
        }
        let p = pool::stats();
        // Freed chunks and hibernated connections' keys stay resident in the heap: have them
        // handed back to the kernel, at most once a second, and only when a good number were
        // freed since the last time.
        let settled = hibernations == self.seen_hibernations;
        self.seen_hibernations = hibernations;
        let freed = p.freed_total >= self.trimmed_at + TRIM_AFTER_CHUNKS
            || (settled && hibernations >= self.trimmed_hibernations + TRIM_AFTER_HIBERNATIONS);
        if freed && self.next_trim.is_none_or(|t| now >= t) {
            trim.request();
            self.trimmed_at = p.freed_total;
            self.trimmed_hibernations = hibernations;
            self.next_trim = Some(now + Duration::from_secs(1));
        }
        p
    }
}
/// A callback that runs longer than this counts as a stall (`sealpipe_loop_stall_total`).
const STALL: Duration = Duration::from_millis(100);

/// How a shard ended, if it failed: set once by the shard, read by the control loop, which
/// ends the process for it (a shard is never left dead in a running process).
#[derive(Default)]
pub(super) struct ShardFailure(AtomicU8);

impl ShardFailure {
    fn set(&self, r: ExitReason) {
        let code = match r {
            ExitReason::ShardPanicked => 2,
            _ => 1,
        };
        let _ = self
            .0
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The first shard failure, if any.
    pub(super) fn get(&self) -> Option<ExitReason> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            2 => Some(ExitReason::ShardPanicked),
            _ => Some(ExitReason::ShardFailed),
        }
    }
}

pub(super) fn shard_main(
    i: usize,
    mut base: EventBase<ShardState>,
    core: Option<core_affinity::CoreId>,
    running: Arc<AtomicUsize>,
    trim: &HeapTrim,
    failure: &ShardFailure,
) {
    if let Some(c) = core {
        if !core_affinity::set_for_current(c) && i == 0 {
            tracing::warn!("cannot pin shard threads to CPUs; running unpinned");
        }
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        shard_loop(i, &mut base, trim)
    }));
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(shard = i, error = %e, "shard loop failed; exiting");
            failure.set(ExitReason::ShardFailed);
        }
        Err(_) => {
            tracing::error!(
                shard = i,
                "shard panicked; exiting so the service manager restarts the process"
            );
            failure.set(ExitReason::ShardPanicked);
        }
    }
    running.fetch_sub(1, Ordering::AcqRel);
}

/// A shard's event loop, set up as every shard's is.
pub(super) fn shard_base<S: 'static>(state: S) -> std::io::Result<EventBase<S>> {
    let mut base = EventBase::new(state)?;
    base.set_stall_threshold(STALL);
    Ok(base)
}

/// Stalls (callbacks that ran longer than [`STALL`]) between two readings of a shard's loop
/// statistics: each one counts.
fn new_stalls(last: &LoopStats, now: &LoopStats) -> u64 {
    now.stalls - last.stalls
}

fn shard_loop(i: usize, base: &mut EventBase<ShardState>, trim: &HeapTrim) -> std::io::Result<()> {
    let label = i.to_string();
    let m = base.state().metrics.clone();
    let busy = m.loop_busy.with_label_values(&[&label]);
    let idle = m.loop_idle.with_label_values(&[&label]);
    let stall = m.loop_stall.with_label_values(&[&label]);
    let cached = m.pool_bytes.with_label_values(&[&label, "cached"]);
    let live = m.pool_bytes.with_label_values(&[&label, "live"]);
    let mut last = base.stats();
    let mut next_flush = Instant::now();
    let mut keeper = MemoryKeeper::default();
    loop {
        base.loop_once(Some(HOUSEKEEPING))?;
        let now = Instant::now();
        m.health.beat(i, now);
        let st = base.state();
        if st.drain_deadline.is_some() && st.conns == 0 {
            // Drained (its last connection closed or moved to a successor): exit now, not
            // at the next housekeeping tick.
            base.state_mut().flush(now);
            return Ok(());
        }
        if now < next_flush {
            continue;
        }
        next_flush = now + HOUSEKEEPING;
        let s = base.stats();
        busy.inc_by((s.busy - last.busy).as_secs_f64());
        idle.inc_by((s.waiting - last.waiting).as_secs_f64());
        let stalls = new_stalls(&last, &s);
        if stalls > 0 {
            stall.inc_by(stalls);
            tracing::warn!(shard = i, stalls, took = ?s.last_stall, "loop stalled in a callback");
        }
        last = s;
        let p = keeper.tick(now, base.state().hibernations, trim);
        cached.set((p.cached_chunks * pool::CHUNK_SIZE) as i64);
        live.set((p.live_chunks * pool::CHUNK_SIZE) as i64);
        if !base.state().draining {
            base.with_context(|cx| crate::proxy::health::run_due(cx, now));
            base.with_context(|cx| crate::proxy::warm::housekeep(cx, now));
        }
        if base.state().export.is_some() {
            base.with_context(|cx| crate::proxy::handoff::tick(cx, now));
        }
        let st = base.state_mut();
        st.flush(now);
        if let Some(deadline) = st.drain_deadline {
            if st.conns == 0 {
                return Ok(());
            }
            if now >= deadline {
                tracing::warn!(
                    shard = i,
                    open = st.conns,
                    "drain timeout: closing remaining connections"
                );
                let ids = std::mem::take(&mut st.live_conns);
                base.with_context(|cx| {
                    for id in ids {
                        cx.notify(id, TAG_ABORT);
                    }
                });
                // Let the aborts run, then exit whatever is left.
                base.loop_once(Some(Duration::ZERO))?;
                base.state_mut().flush(now);
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reactor::{Context, Handler, Ready, Tag};

    /// Stalls its loop twice, in two turns (a timer each); the state counts the stalls done.
    struct Staller;

    impl Handler<u32> for Staller {
        fn on_start(&mut self, cx: &mut Context<'_, u32>) {
            cx.timer(Duration::ZERO, Tag::new(1));
        }
        fn on_ready(&mut self, _: &mut Context<'_, u32>, _: u8, _: Ready) {}
        fn on_timer(&mut self, cx: &mut Context<'_, u32>, tag: Tag) {
            // The stall itself (not a wait for anything).
            std::thread::sleep(STALL + Duration::from_millis(20));
            *cx.state += 1;
            if tag == Tag::new(1) {
                cx.timer(Duration::ZERO, Tag::new(2));
            }
        }
    }

    /// Item 4 of issue 14: every stall counts, not only a new all-time longest callback.
    #[test]
    fn a_shard_loop_that_stalls_twice_counts_two_stalls() {
        let mut base = shard_base(0u32).unwrap();
        base.spawn(Box::new(Staller));
        let last = base.stats();
        for _ in 0..100 {
            if *base.state() == 2 {
                break;
            }
            base.loop_once(Some(Duration::from_millis(10))).unwrap();
        }
        assert_eq!(*base.state(), 2, "the handler stalled twice");
        assert_eq!(new_stalls(&last, &base.stats()), 2);
    }

    #[test]
    fn heap_trims_run_when_asked_at_most_once_a_second() {
        let trim = HeapTrim::default();
        let t0 = Instant::now();
        let mut next = t0;
        assert!(trim.run_due(t0, &mut next).is_none(), "nobody asked");
        trim.request();
        assert!(trim.run_due(t0, &mut next).is_some());
        trim.request();
        assert!(trim.run_due(t0 + TRIM_EVERY / 2, &mut next).is_none());
        assert!(
            trim.run_due(t0 + TRIM_EVERY, &mut next).is_some(),
            "still asked"
        );
        assert!(trim.run_due(t0 + TRIM_EVERY * 3, &mut next).is_none());
    }
}
