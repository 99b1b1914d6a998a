//! `EventBase`: one event loop over `mio::Poll`, libevent's `event_base`.
//!
//! The loop owns every handler in a slab. A handler owns its I/O sources (a proxied connection
//! owns both of its sockets), so its callbacks reach everything they need through `&mut self`
//! and the [`Context`] the loop hands them — no shared pointers, no `Rc<RefCell<..>>`.
//!
//! Invariants:
//! - A `mio::Token` names (slot, generation, source). A slot's generation changes every time it
//!   is freed, so an event or timer for a closed handler can never reach the slot's next tenant.
//! - Callbacks never re-enter: work a callback asks for (close, start a new handler, notify a
//!   handler, re-drive a source after a suspension cleared) goes into a queue the loop drains
//!   after the callback returns.
//! - One loop per thread; other threads reach it only through a [`Handle`] (crossbeam channel +
//!   `mio::Waker`, wakeups coalesced by an atomic flag).
//! - `Events` is allocated once; EINTR is retried, never fatal.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::event::Source;
use mio::{Events, Interest, Poll, Registry, Token, Waker};

use super::clock::Clock;
use super::tag::Tag;
use super::timer::{TimerKey, TimerWheel};

/// Token reserved for the cross-thread waker.
const WAKER_TOKEN: Token = Token(usize::MAX);
const SLOT_BITS: u32 = 32;
const GEN_BITS: u32 = 24;
const GEN_MASK: u32 = (1 << GEN_BITS) - 1;
/// How many deferred items one turn runs before it polls again (fairness against a handler
/// that keeps re-queueing itself).
const DEFERRED_PER_TURN: usize = 65_536;

/// Names one handler in one loop: a slab slot plus the generation it had when inserted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HandlerId {
    slot: u32,
    generation: u32,
}

impl HandlerId {
    fn token(self, source: u8) -> Token {
        Token(
            self.slot as usize
                | ((self.generation as usize) << SLOT_BITS)
                | ((source as usize) << (SLOT_BITS + GEN_BITS)),
        )
    }

    fn from_token(token: Token) -> (HandlerId, u8) {
        let t = token.0;
        let slot = (t & 0xffff_ffff) as u32;
        let generation = ((t >> SLOT_BITS) as u32) & GEN_MASK;
        let source = (t >> (SLOT_BITS + GEN_BITS)) as u8;
        (HandlerId { slot, generation }, source)
    }
}

/// Readiness reported for one source, as mio saw it (edge-triggered: "became ready").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ready {
    pub readable: bool,
    pub writable: bool,
    pub read_closed: bool,
    pub write_closed: bool,
    pub error: bool,
}

impl Ready {
    fn from_event(ev: &mio::event::Event) -> Ready {
        Ready {
            readable: ev.is_readable(),
            writable: ev.is_writable(),
            read_closed: ev.is_read_closed(),
            write_closed: ev.is_write_closed(),
            error: ev.is_error(),
        }
    }

    /// Readiness in both directions, used to re-drive a source from its cached state.
    pub const ALL: Ready = Ready {
        readable: true,
        writable: true,
        read_closed: false,
        write_closed: false,
        error: false,
    };
}

/// What a loop's owner (a shard) implements for each kind of thing it runs.
///
/// Every callback receives `&mut self` and a [`Context`] through which it acts on the loop.
pub trait Handler<S>: 'static {
    /// Called once, after the handler was inserted; register sources and arm timers here.
    fn on_start(&mut self, _cx: &mut Context<'_, S>) {}
    /// One of this handler's sources became ready.
    fn on_ready(&mut self, cx: &mut Context<'_, S>, source: u8, ready: Ready);
    /// A timer this handler (or a component it owns) armed with [`Context::timer`] fired.
    fn on_timer(&mut self, _cx: &mut Context<'_, S>, _tag: Tag) {}
    /// Deferred work for this handler ([`Context::defer`] or [`Context::notify`]).
    fn on_notify(&mut self, _cx: &mut Context<'_, S>, _tag: Tag) {}
    /// The handler is being removed; deregister sources and cancel timers here.
    fn on_close(&mut self, _cx: &mut Context<'_, S>) {}
}

/// Work posted from another thread. It runs on the loop with a context that has no handler.
pub type Job<S> = Box<dyn FnOnce(&mut Context<'_, S>) + Send>;

enum Deferred {
    Start(HandlerId),
    Notify(HandlerId, Tag),
    Close(HandlerId),
}

struct Slot<S> {
    generation: u32,
    handler: Option<Box<dyn Handler<S>>>,
    /// Close was requested while the handler was out of the slab (running).
    closing: bool,
    live: bool,
}

#[derive(Clone, Copy)]
struct TimerEntry {
    id: HandlerId,
    tag: Tag,
}

/// Counters a shard exports: how busy the loop is, how long its worst callback took, and how
/// many callbacks ran past the stall threshold ([`EventBase::set_stall_threshold`]).
/// All are running totals: a reader compares two readings.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopStats {
    pub turns: u64,
    pub events: u64,
    pub callbacks: u64,
    pub busy: Duration,
    pub waiting: Duration,
    /// The longest callback since the loop started.
    pub longest_callback: Duration,
    /// Callbacks that ran longer than the stall threshold, each counted.
    pub stalls: u64,
    /// How long the most recent of those ran.
    pub last_stall: Duration,
}

/// The loop's state that callbacks may touch, split from the handler slab entry being run.
pub struct Core<S> {
    registry: Registry,
    slots: Vec<Slot<S>>,
    free: Vec<u32>,
    live: usize,
    timers: TimerWheel<TimerEntry>,
    deferred: VecDeque<Deferred>,
    /// Deferred work that waits for the next turn ([`Context::defer_next_turn`]).
    next_turn: VecDeque<Deferred>,
    now: Instant,
    exit_at: Option<Instant>,
    break_now: bool,
}

/// What a callback can do to the loop. Actions that would re-enter a handler are deferred.
pub struct Context<'a, S> {
    /// The loop owner's state (a shard's connections table, counters, configuration).
    pub state: &'a mut S,
    core: &'a mut Core<S>,
    id: Option<HandlerId>,
}

impl<S> Context<'_, S> {
    /// The handler this callback belongs to (`None` for jobs posted through a [`Handle`]).
    pub fn id(&self) -> Option<HandlerId> {
        self.id
    }

    fn my_id(&self) -> io::Result<HandlerId> {
        self.id
            .ok_or_else(|| io::Error::other("this context belongs to no handler"))
    }

    /// The loop's clock, read once per turn (cheap; callbacks should use it instead of
    /// `Instant::now()`).
    pub fn now(&self) -> Instant {
        self.core.now
    }

    /// Registers `src` for this handler as source number `source` (0..=255).
    pub fn register<T: Source + ?Sized>(
        &mut self,
        src: &mut T,
        source: u8,
        interest: Interest,
    ) -> io::Result<()> {
        let token = self.my_id()?.token(source);
        self.core.registry.register(src, token, interest)
    }

    pub fn reregister<T: Source + ?Sized>(
        &mut self,
        src: &mut T,
        source: u8,
        interest: Interest,
    ) -> io::Result<()> {
        let token = self.my_id()?.token(source);
        self.core.registry.reregister(src, token, interest)
    }

    pub fn deregister<T: Source + ?Sized>(&mut self, src: &mut T) -> io::Result<()> {
        self.core.registry.deregister(src)
    }

    /// Arms a one-shot timer for this handler; `on_timer(tag)` runs at or after `now + after`.
    pub fn timer(&mut self, after: Duration, tag: Tag) -> TimerKey {
        let deadline = self.core.now + after;
        self.timer_at(deadline, tag)
    }

    pub fn timer_at(&mut self, deadline: Instant, tag: Tag) -> TimerKey {
        let id = self.id.expect("timers belong to a handler");
        self.core.timers.insert(deadline, TimerEntry { id, tag })
    }

    /// Cancels a timer; a key that already fired or was cancelled is ignored.
    pub fn cancel_timer(&mut self, key: TimerKey) {
        self.core.timers.cancel(key);
    }

    /// Runs this handler's `on_notify(tag)` after the current callback returns.
    pub fn defer(&mut self, tag: Tag) {
        if let Some(id) = self.id {
            self.core.deferred.push_back(Deferred::Notify(id, tag));
        }
    }

    /// Runs this handler's `on_notify(tag)` in the loop's next turn, once it has polled for
    /// readiness and fired due timers again: for work that yields to the other handlers (a
    /// read pass that spent its budget), which [`defer`](Self::defer) would run again before
    /// any of them.
    pub fn defer_next_turn(&mut self, tag: Tag) {
        if let Some(id) = self.id {
            self.core.next_turn.push_back(Deferred::Notify(id, tag));
        }
    }

    /// Runs another handler's `on_notify(tag)` after the current callback returns.
    pub fn notify(&mut self, id: HandlerId, tag: Tag) {
        self.core.deferred.push_back(Deferred::Notify(id, tag));
    }

    /// Removes this handler after the current callback returns (its `on_close` runs first).
    pub fn close(&mut self) {
        if let Some(id) = self.id {
            self.close_handler(id);
        }
    }

    pub fn close_handler(&mut self, id: HandlerId) {
        self.core.deferred.push_back(Deferred::Close(id));
    }

    /// Inserts a new handler; its `on_start` runs after the current callback returns.
    pub fn spawn(&mut self, handler: Box<dyn Handler<S>>) -> HandlerId {
        self.core.spawn(handler)
    }

    /// Ends the loop after `after` (libevent's `event_base_loopexit`).
    pub fn loop_exit(&mut self, after: Duration) {
        let at = self.core.now + after;
        self.core.exit_at = Some(self.core.exit_at.map_or(at, |e| e.min(at)));
    }

    /// Ends the loop as soon as the current callback returns (`event_base_loopbreak`).
    pub fn loop_break(&mut self) {
        self.core.break_now = true;
    }

    /// Number of live handlers.
    pub fn handlers(&self) -> usize {
        self.core.live
    }

    /// Is `id` still a live handler of this loop?
    pub fn is_live(&self, id: HandlerId) -> bool {
        self.core
            .slots
            .get(id.slot as usize)
            .is_some_and(|s| s.live && s.generation == id.generation)
    }
}

impl<S> Core<S> {
    fn spawn(&mut self, handler: Box<dyn Handler<S>>) -> HandlerId {
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    handler: None,
                    closing: false,
                    live: false,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let s = &mut self.slots[slot as usize];
        s.handler = Some(handler);
        s.live = true;
        s.closing = false;
        self.live += 1;
        let id = HandlerId {
            slot,
            generation: s.generation,
        };
        self.deferred.push_back(Deferred::Start(id));
        id
    }

    fn release(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        s.live = false;
        s.closing = false;
        s.handler = None;
        s.generation = (s.generation + 1) & GEN_MASK;
        self.live -= 1;
        self.free.push(slot);
    }
}

/// Sends work to a loop from any thread.
pub struct Handle<S> {
    tx: Sender<Job<S>>,
    waker: Arc<Waker>,
    pending: Arc<AtomicBool>,
}

impl<S> Clone for Handle<S> {
    fn clone(&self) -> Self {
        Handle {
            tx: self.tx.clone(),
            waker: self.waker.clone(),
            pending: self.pending.clone(),
        }
    }
}

impl<S> Handle<S> {
    /// Queues `job` to run on the loop. Wakeups are coalesced: many posts between two turns
    /// cost one `eventfd` write.
    pub fn post(&self, job: impl FnOnce(&mut Context<'_, S>) + Send + 'static) -> io::Result<()> {
        self.tx
            .send(Box::new(job))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "event loop is gone"))?;
        if !self.pending.swap(true, Ordering::AcqRel) {
            self.waker.wake()?;
        }
        Ok(())
    }
}

/// One event loop. `S` is the owner's state, reachable from every callback as `cx.state`.
/// Spare-time work: (whether there is some, one step of it). See [`EventBase::set_idle`].
type IdleWork<S> = (fn(&S) -> bool, fn(&mut Context<'_, S>));

pub struct EventBase<S> {
    poll: Poll,
    events: Events,
    core: Core<S>,
    state: S,
    stats: LoopStats,
    rx: Receiver<Job<S>>,
    tx: Sender<Job<S>>,
    waker: Arc<Waker>,
    pending: Arc<AtomicBool>,
    ready: Vec<(Token, Ready)>,
    expired: Vec<(TimerKey, TimerEntry)>,
    idle: Option<IdleWork<S>>,
    idle_pending: bool,
    /// Where `Context::now` comes from (see `clock`); `stats` always use the real clock.
    clock: Clock,
    stall_threshold: Option<Duration>,
}

impl<S: 'static> EventBase<S> {
    pub fn new(state: S) -> io::Result<Self> {
        Self::with_capacity(state, 1024)
    }

    /// `events` bounds how many readiness events one `epoll_wait` returns.
    pub fn with_capacity(state: S, events: usize) -> io::Result<Self> {
        Self::with_clock(state, events, Clock::System)
    }

    /// A loop that reads the time from `clock` (a [`ManualClock`](super::clock::ManualClock)
    /// in tests: timers then fire when the test advances it, and the loop never waits for one).
    pub fn with_clock(state: S, events: usize, clock: Clock) -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER_TOKEN)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        let now = clock.now();
        Ok(EventBase {
            core: Core {
                registry: poll.registry().try_clone()?,
                slots: Vec::new(),
                free: Vec::new(),
                live: 0,
                timers: TimerWheel::new(now),
                deferred: VecDeque::new(),
                next_turn: VecDeque::new(),
                now,
                exit_at: None,
                break_now: false,
            },
            poll,
            events: Events::with_capacity(events),
            state,
            stats: LoopStats::default(),
            rx,
            tx,
            waker,
            pending: Arc::new(AtomicBool::new(false)),
            ready: Vec::with_capacity(events),
            expired: Vec::new(),
            idle: None,
            idle_pending: false,
            clock,
            stall_threshold: None,
        })
    }

    /// The clock this loop reads.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn handle(&self) -> Handle<S> {
        Handle {
            tx: self.tx.clone(),
            waker: self.waker.clone(),
            pending: self.pending.clone(),
        }
    }

    pub fn state(&self) -> &S {
        &self.state
    }

    pub fn state_mut(&mut self) -> &mut S {
        &mut self.state
    }

    pub fn stats(&self) -> LoopStats {
        self.stats
    }

    /// Number of live handlers.
    pub fn handlers(&self) -> usize {
        self.core.live
    }

    /// Number of armed timers (including ones whose handler has since closed).
    pub fn timers(&self) -> usize {
        self.core.timers.len()
    }

    pub fn spawn(&mut self, handler: Box<dyn Handler<S>>) -> HandlerId {
        self.core.spawn(handler)
    }

    /// Counts every callback that runs longer than `threshold` in [`LoopStats::stalls`]
    /// (none are counted until this is set).
    pub fn set_stall_threshold(&mut self, threshold: Duration) {
        self.stall_threshold = Some(threshold);
    }

    /// Work for the loop's spare time (libev's idle watcher). While `wants` says there is
    /// some, the loop only peeks for readiness (a zero timeout) instead of blocking, and a turn
    /// that finds nothing ready runs one `step`; so no event waits longer than one step, and
    /// steps should be small (tens of microseconds). `wants` is asked again after each step and
    /// after each turn that dispatched something, so it must be cheap. A step acts through a
    /// handler-less context (it may spawn handlers, arm nothing of its own); what it defers
    /// runs in the same turn.
    pub fn set_idle(&mut self, wants: fn(&S) -> bool, step: fn(&mut Context<'_, S>)) {
        self.idle = Some((wants, step));
        self.idle_pending = wants(&self.state);
    }

    /// Runs `f` with a handler-less context, as a posted job would (spare-time work is
    /// asked about again afterwards, as after a job).
    pub fn with_context<R>(&mut self, f: impl FnOnce(&mut Context<'_, S>) -> R) -> R {
        let mut cx = Context {
            state: &mut self.state,
            core: &mut self.core,
            id: None,
        };
        let r = f(&mut cx);
        if let Some((wants, _)) = self.idle {
            self.idle_pending = wants(&self.state);
        }
        r
    }

    pub fn loop_exit(&mut self, after: Duration) {
        self.with_context(|cx| cx.loop_exit(after));
    }

    pub fn loop_break(&mut self) {
        self.core.break_now = true;
    }

    /// True once `loop_break` or an expired `loop_exit` ended the loop.
    pub fn stopped(&self) -> bool {
        self.core.break_now || self.core.exit_at.is_some_and(|t| t <= self.core.now)
    }

    /// Runs until `loop_break` or `loop_exit`; clears the stop request when it returns, so the
    /// loop can be run again.
    pub fn run(&mut self) -> io::Result<()> {
        while !self.stopped() {
            self.loop_once(None)?;
        }
        self.core.break_now = false;
        self.core.exit_at = None;
        Ok(())
    }

    /// One turn: wait for readiness (at most `max_wait`, and never past the next timer), then
    /// dispatch events, posted jobs, expired timers and deferred work.
    pub fn loop_once(&mut self, max_wait: Option<Duration>) -> io::Result<()> {
        let before = Instant::now();
        self.core.now = self.clock_at(before);
        // Work that yielded last turn runs in this one (and this turn does not block).
        let yielded = std::mem::take(&mut self.core.next_turn);
        self.core.deferred.extend(yielded);
        let mut timeout = self.poll_timeout(max_wait);
        let idle_turn = self.idle_pending && timeout != Some(Duration::ZERO);
        if idle_turn {
            timeout = Some(Duration::ZERO);
        }
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        let woke = Instant::now();
        self.stats.waiting += woke - before;
        self.stats.turns += 1;
        self.core.now = self.clock_at(woke);

        self.ready.clear();
        let mut wake = false;
        for ev in self.events.iter() {
            if ev.token() == WAKER_TOKEN {
                wake = true;
            } else {
                self.ready.push((ev.token(), Ready::from_event(ev)));
            }
        }
        self.stats.events += self.ready.len() as u64;
        let mut mark = woke;
        if idle_turn && self.events.is_empty() {
            if let Some((wants, step)) = self.idle {
                self.with_context(step);
                self.run_deferred(&mut mark);
                self.idle_pending = wants(&self.state);
            }
        }

        let ready = std::mem::take(&mut self.ready);
        for &(token, r) in &ready {
            let (id, source) = HandlerId::from_token(token);
            self.dispatch(id, &mut mark, |h, cx| h.on_ready(cx, source, r));
            self.run_deferred(&mut mark);
        }
        self.ready = ready;

        if wake {
            self.pending.store(false, Ordering::Release);
            while let Ok(job) = self.rx.try_recv() {
                self.with_context(job);
                self.run_deferred(&mut mark);
            }
        }

        self.core.now = self.clock_at(Instant::now());
        self.expired.clear();
        self.core.timers.expire(self.core.now, &mut self.expired);
        let expired = std::mem::take(&mut self.expired);
        for &(_, entry) in &expired {
            self.dispatch(entry.id, &mut mark, |h, cx| h.on_timer(cx, entry.tag));
            self.run_deferred(&mut mark);
        }
        if let Some((wants, _)) = self.idle {
            if !self.ready.is_empty() || wake || !expired.is_empty() {
                self.idle_pending = wants(&self.state);
            }
        }
        self.expired = expired;
        self.run_deferred(&mut mark);

        let end = Instant::now();
        self.stats.busy += end - woke;
        Ok(())
    }

    /// The loop's time, given the real time just read (no second clock read on the system
    /// clock).
    #[inline]
    fn clock_at(&self, real: Instant) -> Instant {
        match &self.clock {
            Clock::System => real,
            c => c.now(),
        }
    }

    fn poll_timeout(&self, max_wait: Option<Duration>) -> Option<Duration> {
        if !self.core.deferred.is_empty() || self.core.break_now {
            return Some(Duration::ZERO);
        }
        let now = self.core.now;
        let mut deadline = self.core.timers.next_expiry();
        if let Some(exit) = self.core.exit_at {
            deadline = Some(deadline.map_or(exit, |d| d.min(exit)));
        }
        if self.clock.is_manual() {
            // Waiting does not move a manual clock: a due deadline needs a turn now, a later
            // one needs the test to advance time.
            deadline = deadline.filter(|&d| d <= now);
        }
        // Round up to the next millisecond: epoll's resolution is 1 ms, and waking a hair early
        // would spin through a turn that finds nothing expired.
        let until = deadline.map(|d| {
            let d = d.saturating_duration_since(now);
            let ms = d.as_nanos().div_ceil(1_000_000) as u64;
            Duration::from_millis(ms)
        });
        match (until, max_wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs one callback of handler `id`, if `id` is still the slot's tenant.
    fn dispatch(
        &mut self,
        id: HandlerId,
        mark: &mut Instant,
        f: impl FnOnce(&mut dyn Handler<S>, &mut Context<'_, S>),
    ) {
        let Some(slot) = self.core.slots.get_mut(id.slot as usize) else {
            return;
        };
        if !slot.live || slot.generation != id.generation {
            return;
        }
        let Some(mut h) = slot.handler.take() else {
            return;
        };
        {
            let mut cx = Context {
                state: &mut self.state,
                core: &mut self.core,
                id: Some(id),
            };
            f(&mut *h, &mut cx);
        }
        let slot = &mut self.core.slots[id.slot as usize];
        slot.handler = Some(h);
        let t = Instant::now();
        let took = t - *mark;
        *mark = t;
        self.stats.callbacks += 1;
        if took > self.stats.longest_callback {
            self.stats.longest_callback = took;
        }
        if self.stall_threshold.is_some_and(|t| took > t) {
            self.stats.stalls += 1;
            self.stats.last_stall = took;
        }
    }

    fn run_deferred(&mut self, mark: &mut Instant) {
        let mut budget = DEFERRED_PER_TURN;
        while budget > 0 {
            let Some(d) = self.core.deferred.pop_front() else {
                return;
            };
            budget -= 1;
            match d {
                Deferred::Start(id) => self.dispatch(id, mark, |h, cx| h.on_start(cx)),
                Deferred::Notify(id, tag) => self.dispatch(id, mark, |h, cx| h.on_notify(cx, tag)),
                Deferred::Close(id) => {
                    let Some(slot) = self.core.slots.get_mut(id.slot as usize) else {
                        continue;
                    };
                    if !slot.live || slot.generation != id.generation || slot.closing {
                        continue;
                    }
                    slot.closing = true;
                    self.dispatch(id, mark, |h, cx| h.on_close(cx));
                    self.core.release(id.slot);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs longer than the threshold in each of its first `n` timer callbacks.
    struct Slow(u32);

    impl Handler<u32> for Slow {
        fn on_start(&mut self, cx: &mut Context<'_, u32>) {
            cx.timer(Duration::ZERO, Tag::new(0));
        }
        fn on_ready(&mut self, _: &mut Context<'_, u32>, _: u8, _: Ready) {}
        fn on_timer(&mut self, cx: &mut Context<'_, u32>, _: Tag) {
            // The stall being measured, not a wait for anything.
            std::thread::sleep(Duration::from_millis(30));
            *cx.state += 1;
            if *cx.state < self.0 {
                cx.timer(Duration::ZERO, Tag::new(0));
            }
        }
    }

    #[test]
    fn every_callback_over_the_stall_threshold_counts() {
        let mut base = EventBase::new(0u32).unwrap();
        base.set_stall_threshold(Duration::from_millis(20));
        base.spawn(Box::new(Slow(3)));
        for _ in 0..100 {
            if *base.state() == 3 {
                break;
            }
            base.loop_once(Some(Duration::from_millis(5))).unwrap();
        }
        let s = base.stats();
        assert_eq!((*base.state(), s.stalls), (3, 3));
        assert!(s.last_stall >= Duration::from_millis(30), "{s:?}");
    }

    /// Yields once per pass (a reader with more to read than its budget); notes each pass and
    /// when its timer fired.
    struct Hog;

    #[derive(Default)]
    struct Passes {
        passes: u32,
        timer_after: Option<u32>,
    }

    impl Handler<Passes> for Hog {
        fn on_start(&mut self, cx: &mut Context<'_, Passes>) {
            cx.timer(Duration::ZERO, Tag::new(1));
            cx.defer_next_turn(Tag::new(2));
        }
        fn on_ready(&mut self, _: &mut Context<'_, Passes>, _: u8, _: Ready) {}
        fn on_timer(&mut self, cx: &mut Context<'_, Passes>, _: Tag) {
            cx.state.timer_after = Some(cx.state.passes);
        }
        fn on_notify(&mut self, cx: &mut Context<'_, Passes>, _: Tag) {
            cx.state.passes += 1;
            if cx.state.passes < 1_000_000 {
                cx.defer_next_turn(Tag::new(2));
            }
        }
    }

    #[test]
    fn work_deferred_to_the_next_turn_lets_timers_and_polls_in_between() {
        let mut base = EventBase::new(Passes::default()).unwrap();
        base.spawn(Box::new(Hog));
        let mut turn = 0;
        while base.state().timer_after.is_none() {
            turn += 1;
            base.loop_once(Some(Duration::ZERO)).unwrap();
            assert!(
                base.state().passes < turn,
                "{} passes in {turn} turns: a yielding handler ran again before the loop polled",
                base.state().passes
            );
        }
        // The timer (due from the first turn, at the next millisecond tick) fired long before
        // the hog's million passes were over.
        assert!(base.state().timer_after.unwrap() < 1_000_000);
    }

    #[test]
    fn token_round_trip() {
        let id = HandlerId {
            slot: 0xdead_beef,
            generation: 0xab_cdef,
        };
        for source in [0u8, 1, 200, 255] {
            let (back, s) = HandlerId::from_token(id.token(source));
            assert_eq!(back, id);
            assert_eq!(s, source);
            assert_ne!(id.token(source), WAKER_TOKEN);
        }
    }

    /// Counts its timer's firings.
    struct Alarm(Duration);

    impl Handler<Vec<Instant>> for Alarm {
        fn on_start(&mut self, cx: &mut Context<'_, Vec<Instant>>) {
            cx.timer(self.0, Tag::new(7));
        }
        fn on_ready(&mut self, _: &mut Context<'_, Vec<Instant>>, _: u8, _: Ready) {}
        fn on_timer(&mut self, cx: &mut Context<'_, Vec<Instant>>, tag: Tag) {
            assert_eq!(tag, Tag::new(7));
            let now = cx.now();
            cx.state.push(now);
        }
    }

    #[test]
    fn a_manual_clock_fires_timers_when_advanced_and_never_waits_for_them() {
        use crate::clock::{Clock, ManualClock};
        let clock = ManualClock::new();
        let t0 = clock.now();
        let mut base = EventBase::with_clock(Vec::new(), 16, Clock::Manual(clock.clone())).unwrap();
        base.spawn(Box::new(Alarm(Duration::from_secs(5))));
        for _ in 0..3 {
            base.loop_once(Some(Duration::ZERO)).unwrap();
        }
        assert!(base.state().is_empty(), "fired before time moved");
        clock.advance(Duration::from_millis(4_999));
        base.loop_once(Some(Duration::ZERO)).unwrap();
        assert!(base.state().is_empty(), "fired early");
        clock.advance(Duration::from_millis(1));
        // A due timer makes the loop turn without waiting, even with no bound.
        base.loop_once(None).unwrap();
        assert_eq!(base.state().as_slice(), &[t0 + Duration::from_secs(5)]);
    }
}
