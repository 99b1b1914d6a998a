//! `TimerWheel`: a hierarchical timing wheel (as in tokio and the Linux kernel) with 1 ms ticks.
//!
//! The event loop arms every timeout here — idle, handshake, connect, `loop_exit(after)` — and
//! re-arms idle timeouts on every read, so insert and cancel are O(1) and allocation-free once
//! the slab has grown: a connection's timers cost nothing between firings.
//!
//! Layout: 6 levels of 64 slots. A slot at level `l` spans `64^l` ticks, so the wheel spans
//! `2^36` ms (about 795 days); a deadline further out sits in a top-level slot and is re-placed
//! each time that slot comes round. Entries live in a slab (`Vec` + free list) and each slot is
//! an intrusive doubly-linked list through it, so cancel unlinks in O(1) by key. A `u64`
//! occupancy bitmap per level lets [`TimerWheel::next_expiry`] find the next busy slot with a
//! rotate and a trailing-zeros count per level.
//!
//! Invariants:
//! - deadlines are rounded *up* to a whole tick and `now` *down*, so a timer never fires before
//!   its deadline (by at most one tick after it when driven by `next_expiry`);
//! - every tick `<= elapsed` has been processed; a timer whose tick is `<= elapsed` when
//!   inserted goes on a separate "due" list and fires on the next [`TimerWheel::expire`];
//! - an entry in level `l`, slot `s` has a tick in that slot's range relative to `elapsed`
//!   (`elapsed` and the tick agree on every bit above level `l`), so the slot's start is never
//!   after the entry's tick: processing a slot either fires an entry or moves it lower;
//! - a [`TimerKey`] carries the slab generation, bumped whenever an entry is freed, so a key of
//!   a fired or cancelled timer never reaches the timer that reuses its slot (up to `2^32`
//!   reuses of one slot).

use std::fmt;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

const LEVELS: usize = 6;
const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
/// Ticks the wheel spans; deadlines further out are clamped into the top level.
const WHEEL_SPAN: u64 = 1 << (SLOT_BITS as usize * LEVELS);
/// The list of timers that were already due when inserted.
const DUE: u16 = (LEVELS * SLOTS) as u16;
const LISTS: usize = LEVELS * SLOTS + 1;
/// Marks a free slab entry.
const FREE: u16 = u16::MAX;
const NIL: u32 = u32::MAX;
/// Ticks are kept well below `u64::MAX` so slot arithmetic cannot overflow.
const MAX_TICK: u64 = u64::MAX >> 2;
const NANOS_PER_TICK: u128 = 1_000_000;

/// Names one armed timer: its slab index and that entry's generation. Generations are never
/// zero, so an `Option<TimerKey>` (which every connection holds a few of) costs no more than
/// the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerKey {
    index: u32,
    generation: NonZeroU32,
}

struct Entry<T> {
    value: Option<T>,
    /// The deadline, in ticks since `start`, rounded up.
    when: u64,
    prev: u32,
    /// Next in the slot list; for a free entry, the next free entry.
    next: u32,
    generation: NonZeroU32,
    /// Which list the entry is on: `level * SLOTS + slot`, `DUE`, or `FREE`.
    list: u16,
}

#[derive(Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
}

const EMPTY_LIST: List = List {
    head: NIL,
    tail: NIL,
};

/// A hierarchical timer wheel holding values of type `T` (typically a token naming what to
/// wake), with 1 ms ticks.
pub struct TimerWheel<T> {
    start: Instant,
    /// Ticks since `start` already processed.
    elapsed: u64,
    entries: Vec<Entry<T>>,
    free_head: u32,
    lists: Box<[List]>,
    occupied: [u64; LEVELS],
    len: usize,
}

impl<T> TimerWheel<T> {
    /// An empty wheel whose tick 0 is `start`.
    pub fn new(start: Instant) -> Self {
        TimerWheel {
            start,
            elapsed: 0,
            entries: Vec::new(),
            free_head: NIL,
            lists: vec![EMPTY_LIST; LISTS].into_boxed_slice(),
            occupied: [0; LEVELS],
            len: 0,
        }
    }

    /// Timers armed.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no timer is armed.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Arms a timer; O(1). A deadline already past fires on the next [`expire`](Self::expire).
    ///
    /// # Panics
    /// If `u32::MAX - 1` timers are armed at once (tens of gigabytes of slab).
    pub fn insert(&mut self, deadline: Instant, value: T) -> TimerKey {
        let when = self.ceil_tick(deadline);
        let index = match self.free_head {
            NIL => {
                let index = u32::try_from(self.entries.len())
                    .ok()
                    .filter(|&i| i != NIL)
                    .expect("TimerWheel: more than u32::MAX - 1 timers");
                self.entries.push(Entry {
                    value: Some(value),
                    when,
                    prev: NIL,
                    next: NIL,
                    generation: NonZeroU32::MIN,
                    list: FREE,
                });
                index
            }
            index => {
                let e = &mut self.entries[index as usize];
                self.free_head = e.next;
                e.value = Some(value);
                e.when = when;
                index
            }
        };
        self.link(index);
        self.len += 1;
        TimerKey {
            index,
            generation: self.entries[index as usize].generation,
        }
    }

    /// Disarms a timer and returns its value; O(1). `None` if the key is stale (the timer
    /// fired or was cancelled, even if its slot was reused since).
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        self.live(key)?;
        self.unlink(key.index);
        self.release(key.index)
    }

    /// Moves an armed timer to a new deadline, keeping its key; O(1). `false` if the key is
    /// stale. Cheaper than cancel + insert for the idle-timeout re-arm pattern.
    pub fn reset(&mut self, key: TimerKey, deadline: Instant) -> bool {
        if self.live(key).is_none() {
            return false;
        }
        self.unlink(key.index);
        self.entries[key.index as usize].when = self.ceil_tick(deadline);
        self.link(key.index);
        true
    }

    /// The value of an armed timer.
    pub fn get_mut(&mut self, key: TimerKey) -> Option<&mut T> {
        let i = self.live(key)?;
        self.entries[i].value.as_mut()
    }

    /// When [`expire`](Self::expire) next has work: never later than the earliest deadline
    /// rounded up to its tick (so an event loop may sleep until then), possibly earlier when
    /// a higher level's slot must be cascaded first. `expire(next_expiry())` always makes
    /// progress — fires or cascades — so driving a loop by it never spins. `None` when empty.
    /// Cost: one rotate and count per level.
    pub fn next_expiry(&self) -> Option<Instant> {
        if self.lists[DUE as usize].head != NIL {
            return Some(self.tick_instant(self.elapsed));
        }
        let (_, deadline) = self.next_slot()?;
        Some(self.tick_instant(deadline))
    }

    /// Moves every timer whose deadline is `<= now` into `out`, cascading higher levels as
    /// time passes. Never fires a timer early. Order: timers that were already due when armed
    /// first (in arming order), then by deadline tick (ties in arming order).
    pub fn expire(&mut self, now: Instant, out: &mut Vec<(TimerKey, T)>) {
        let now_tick = self.floor_tick(now);
        self.fire_due(now_tick, out);
        while let Some((list, deadline)) = self.next_slot() {
            if deadline > now_tick {
                break;
            }
            // Advance first so entries that are not yet due are re-placed relative to the
            // slot's time, which puts them on a lower level.
            self.elapsed = deadline;
            let mut index = self.take_list(list);
            while index != NIL {
                let e = &self.entries[index as usize];
                let next = e.next;
                if e.when <= deadline {
                    self.fire(index, out);
                } else {
                    self.link(index);
                }
                index = next;
            }
        }
        // No occupied slot starts at or before `now_tick`, so every entry stays valid.
        self.elapsed = self.elapsed.max(now_tick);
    }

    fn live(&self, key: TimerKey) -> Option<usize> {
        let i = key.index as usize;
        let e = self.entries.get(i)?;
        (e.generation == key.generation && e.list != FREE).then_some(i)
    }

    fn ceil_tick(&self, t: Instant) -> u64 {
        let ns = t.saturating_duration_since(self.start).as_nanos();
        let ticks = ns.div_ceil(NANOS_PER_TICK);
        u64::try_from(ticks).unwrap_or(MAX_TICK).min(MAX_TICK)
    }

    fn floor_tick(&self, t: Instant) -> u64 {
        let ticks = t.saturating_duration_since(self.start).as_nanos() / NANOS_PER_TICK;
        u64::try_from(ticks).unwrap_or(MAX_TICK).min(MAX_TICK)
    }

    fn tick_instant(&self, tick: u64) -> Instant {
        // Only reachable ticks are passed in (at most `elapsed + WHEEL_SPAN`), so this cannot
        // overflow in practice; saturate to the last representable millisecond band anyway.
        let mut d = Duration::from_millis(tick);
        loop {
            if let Some(t) = self.start.checked_add(d) {
                return t;
            }
            d /= 2;
        }
    }

    /// The list a tick belongs on, relative to `elapsed`.
    fn list_for(&self, when: u64) -> u16 {
        if when <= self.elapsed {
            return DUE;
        }
        // The highest bit where `when` differs from `elapsed` picks the level; the low
        // SLOT_BITS are masked in so level 0 covers the current 64-tick block.
        let mut masked = (self.elapsed ^ when) | (SLOTS as u64 - 1);
        if masked >= WHEEL_SPAN {
            // Beyond the wheel: park in the top level, re-placed when its slot comes round.
            masked = WHEEL_SPAN - 1;
        }
        let significant = 63 - masked.leading_zeros();
        let level = significant / SLOT_BITS;
        let slot = (when >> (level * SLOT_BITS)) as usize & (SLOTS - 1);
        (level as usize * SLOTS + slot) as u16
    }

    /// The next occupied slot and the tick at which it must be processed.
    fn next_slot(&self) -> Option<(u16, u64)> {
        for level in 0..LEVELS {
            let occupied = self.occupied[level];
            if occupied == 0 {
                continue;
            }
            let shift = level as u32 * SLOT_BITS;
            let now_slot = (self.elapsed >> shift) & (SLOTS as u64 - 1);
            // Search from the slot after now's: below the top level now's slot is never
            // occupied, and at the top level an entry there is a full turn away, so every
            // other occupied slot comes first.
            let from = (now_slot + 1) & (SLOTS as u64 - 1);
            let slot = (u64::from(occupied.rotate_right(from as u32).trailing_zeros()) + from)
                & (SLOTS as u64 - 1);
            let level_range = 1u64 << (shift + SLOT_BITS);
            let level_start = self.elapsed & !(level_range - 1);
            let mut deadline = level_start + (slot << shift);
            if deadline <= self.elapsed {
                // Only the top level wraps: its slots form a ring for deadlines beyond the
                // wheel's span, so a slot "behind" now is one full turn ahead.
                deadline += level_range;
            }
            return Some(((level * SLOTS) as u16 + slot as u16, deadline));
        }
        None
    }

    fn link(&mut self, index: u32) {
        let list = self.list_for(self.entries[index as usize].when);
        let l = &mut self.lists[list as usize];
        let old_tail = l.tail;
        l.tail = index;
        if old_tail == NIL {
            l.head = index;
        }
        if list != DUE {
            let list = list as usize;
            self.occupied[list / SLOTS] |= 1 << (list % SLOTS);
        }
        if old_tail != NIL {
            self.entries[old_tail as usize].next = index;
        }
        let e = &mut self.entries[index as usize];
        e.prev = old_tail;
        e.next = NIL;
        e.list = list;
    }

    fn unlink(&mut self, index: u32) {
        let (prev, next, list) = {
            let e = &self.entries[index as usize];
            (e.prev, e.next, e.list as usize)
        };
        if prev == NIL {
            self.lists[list].head = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next == NIL {
            self.lists[list].tail = prev;
        } else {
            self.entries[next as usize].prev = prev;
        }
        if self.lists[list].head == NIL && list != DUE as usize {
            self.occupied[list / SLOTS] &= !(1 << (list % SLOTS));
        }
    }

    /// Detaches a whole slot list, returning its head; entries keep stale links that the
    /// caller overwrites by firing or re-linking each one.
    fn take_list(&mut self, list: u16) -> u32 {
        let list = list as usize;
        let head = self.lists[list].head;
        self.lists[list] = EMPTY_LIST;
        if list != DUE as usize {
            self.occupied[list / SLOTS] &= !(1 << (list % SLOTS));
        }
        head
    }

    fn fire_due(&mut self, now_tick: u64, out: &mut Vec<(TimerKey, T)>) {
        let mut index = self.lists[DUE as usize].head;
        while index != NIL {
            let e = &self.entries[index as usize];
            let next = e.next;
            // Only reachable if `expire` is given an earlier `now` than before.
            if e.when <= now_tick {
                self.unlink(index);
                self.fire(index, out);
            }
            index = next;
        }
    }

    /// Frees an entry already off its list and reports it.
    fn fire(&mut self, index: u32, out: &mut Vec<(TimerKey, T)>) {
        let key = TimerKey {
            index,
            generation: self.entries[index as usize].generation,
        };
        if let Some(value) = self.release(index) {
            out.push((key, value));
        }
    }

    /// Frees an entry already off its list, returning its value.
    fn release(&mut self, index: u32) -> Option<T> {
        let e = &mut self.entries[index as usize];
        e.generation = e.generation.checked_add(1).unwrap_or(NonZeroU32::MIN);
        e.list = FREE;
        e.prev = NIL;
        e.next = self.free_head;
        self.free_head = index;
        self.len -= 1;
        // Every linked entry holds a value (set by `insert`, taken only here), so this is
        // always `Some`.
        e.value.take()
    }
}

impl<T> fmt::Debug for TimerWheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerWheel")
            .field("len", &self.len)
            .field("elapsed_ms", &self.elapsed)
            .field("slab", &self.entries.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_optional_key_costs_nothing_more_than_a_key() {
        assert_eq!(
            std::mem::size_of::<Option<TimerKey>>(),
            std::mem::size_of::<TimerKey>()
        );
    }

    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashSet};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn drain(w: &mut TimerWheel<u64>, now: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        w.expire(now, &mut out);
        out.into_iter().map(|(_, v)| v).collect()
    }

    #[test]
    fn fires_in_order() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let ds = [500u64, 3, 70, 4097, 64, 65, 1, 300_000, 63, 4096];
        for &d in &ds {
            w.insert(t0 + ms(d), d);
        }
        assert_eq!(w.len(), ds.len());
        let got = drain(&mut w, t0 + ms(1_000_000));
        let mut want = ds.to_vec();
        want.sort();
        assert_eq!(got, want);
        assert!(w.is_empty());
        assert_eq!(w.next_expiry(), None);
    }

    #[test]
    fn never_early_and_rounds_up() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let d = t0 + Duration::from_micros(1500);
        w.insert(d, 1);
        assert_eq!(w.next_expiry(), Some(t0 + ms(2)));
        assert!(drain(&mut w, t0 + ms(1)).is_empty());
        assert!(drain(&mut w, d - Duration::from_nanos(1)).is_empty());
        // At the deadline but before its tick: still not fired (rounded up, never early).
        assert!(drain(&mut w, d).is_empty());
        assert_eq!(drain(&mut w, t0 + ms(2)), vec![1]);
    }

    #[test]
    fn past_deadlines_fire_next_expire() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0 + ms(10));
        w.insert(t0, 1); // before the wheel's start
        assert!(w.next_expiry().is_some_and(|t| t <= t0 + ms(10)));
        assert_eq!(drain(&mut w, t0 + ms(10)), vec![1]);
        assert!(drain(&mut w, t0 + ms(100)).is_empty());
        w.insert(t0 + ms(50), 2); // already processed time
        w.insert(t0 + ms(100), 3); // exactly now
        assert_eq!(w.next_expiry(), Some(t0 + ms(100)));
        assert_eq!(drain(&mut w, t0 + ms(100)), vec![2, 3]);
    }

    #[test]
    fn cancel_and_stale_keys() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let a = w.insert(t0 + ms(10), 1);
        assert_eq!(w.cancel(a), Some(1));
        assert_eq!(w.cancel(a), None);
        assert!(w.is_empty());
        // The slot is reused; the old key must not reach the new timer.
        let b = w.insert(t0 + ms(10), 2);
        assert_eq!(a.index, b.index);
        assert_ne!(a, b);
        assert_eq!(w.cancel(a), None);
        assert!(!w.reset(a, t0));
        assert!(w.get_mut(a).is_none());
        assert_eq!(w.get_mut(b).copied(), Some(2));
        assert!(drain(&mut w, t0 + ms(9)).is_empty());
        let mut out = Vec::new();
        w.expire(t0 + ms(10), &mut out);
        assert_eq!(out, vec![(b, 2)]);
        // A fired timer's key is stale too.
        assert_eq!(w.cancel(b), None);
        assert!(w.is_empty());
    }

    #[test]
    fn cancel_in_middle_of_slot_list() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let keys: Vec<_> = (0..5).map(|i| w.insert(t0 + ms(7), i)).collect();
        assert_eq!(w.cancel(keys[2]), Some(2));
        assert_eq!(w.cancel(keys[0]), Some(0));
        assert_eq!(w.cancel(keys[4]), Some(4));
        assert_eq!(drain(&mut w, t0 + ms(7)), vec![1, 3]);
        // Empty slots leave no occupancy bit behind.
        assert_eq!(w.occupied, [0; LEVELS]);
    }

    #[test]
    fn reset_moves_deadline() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let k = w.insert(t0 + ms(5), 1);
        assert!(w.reset(k, t0 + ms(5000)));
        assert!(drain(&mut w, t0 + ms(4999)).is_empty());
        assert_eq!(w.len(), 1);
        assert!(w.reset(k, t0 + ms(6000)));
        assert!(drain(&mut w, t0 + ms(5999)).is_empty());
        let mut out = Vec::new();
        w.expire(t0 + ms(6000), &mut out);
        assert_eq!(out, vec![(k, 1)]);
    }

    #[test]
    fn far_deadlines() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let day = 86_400_000u64;
        // Three days, and 2000 days: beyond the 2^36 ms span, so it wraps the top level.
        let ds = [
            3 * day + 17,
            2000 * day + 5,
            795 * day,
            WHEEL_SPAN - 1,
            WHEEL_SPAN + 1,
        ];
        for &d in &ds {
            w.insert(t0 + ms(d), d);
        }
        let mut sorted = ds.to_vec();
        sorted.sort();
        // Jump straight to each deadline: one tick short, then on it.
        for &d in &sorted {
            assert!(drain(&mut w, t0 + ms(d - 1)).is_empty(), "{d} early");
            assert_eq!(drain(&mut w, t0 + ms(d)), vec![d]);
        }
        assert!(w.is_empty());
    }

    #[test]
    fn driving_by_next_expiry_reaches_far_deadlines() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let day = 86_400_000u64;
        let ds = [1u64, 2 * day, 1000 * day + 3];
        for &d in &ds {
            w.insert(t0 + ms(d), d);
        }
        let mut fired = Vec::new();
        let mut steps = 0;
        while let Some(t) = w.next_expiry() {
            steps += 1;
            assert!(steps < 100, "next_expiry must make progress");
            let due = w.next_expiry();
            let got = drain(&mut w, t);
            for &d in &got {
                assert_eq!(due, Some(t0 + ms(d)), "woke exactly on the tick");
            }
            fired.extend(got);
        }
        assert_eq!(fired, ds);
    }

    #[test]
    fn many_timers_fire_exactly_once() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let n = 100_000u64;
        let mut cancelled = HashSet::new();
        let mut keys = Vec::new();
        // A deterministic spread over ~20 minutes with sub-millisecond offsets.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for i in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let deadline = t0 + Duration::from_micros(x % 1_200_000_000);
            keys.push((w.insert(deadline, i), deadline));
        }
        for (i, &(k, _)) in keys.iter().enumerate().step_by(7) {
            assert_eq!(w.cancel(k), Some(i as u64));
            cancelled.insert(i as u64);
        }
        let mut seen = vec![false; n as usize];
        let mut now = t0;
        let mut out = Vec::new();
        while !w.is_empty() {
            now += Duration::from_micros(x % 3_000_000);
            x = x.rotate_left(11) ^ 0x5555;
            w.expire(now, &mut out);
            for (k, v) in out.drain(..) {
                let (key, deadline) = keys[v as usize];
                assert_eq!(k, key);
                assert!(deadline <= now, "fired early");
                assert!(!std::mem::replace(&mut seen[v as usize], true), "twice");
                assert!(!cancelled.contains(&v));
            }
        }
        let fired = seen.iter().filter(|&&s| s).count();
        assert_eq!(fired as u64, n - cancelled.len() as u64);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Deadline offset from the current time in microseconds (may be negative).
        Insert(i64),
        Cancel(usize),
        Reset(usize, u64),
        /// Advance by microseconds.
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let offset = prop_oneof![
            -5_000i64..5_000,
            0i64..200_000,
            0i64..100_000_000,
            0i64..100_000_000_000,
            // Up to ~3 years: beyond the wheel's 2^36 ms span.
            0i64..100_000_000_000_000,
        ];
        prop_oneof![
            4 => offset.prop_map(Op::Insert),
            2 => any::<usize>().prop_map(Op::Cancel),
            1 => (any::<usize>(), 0u64..10_000_000).prop_map(|(i, d)| Op::Reset(i, d)),
            3 => prop_oneof![
                0u64..3_000,
                0u64..300_000,
                0u64..1_000_000_000,
                0u64..100_000_000_000_000,
            ]
            .prop_map(Op::Advance),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn matches_btreemap_model(ops in proptest::collection::vec(op(), 1..80)) {
            let t0 = Instant::now();
            let base = t0 + Duration::from_secs(10);
            let mut w = TimerWheel::new(base);
            let tick = |t: Instant| t.saturating_duration_since(base).as_nanos().div_ceil(1_000_000);
            // Model: (rounded-up tick, sequence) -> (key, deadline).
            let mut model: BTreeMap<(u128, u64), (TimerKey, Instant)> = BTreeMap::new();
            let mut now = base;
            let mut seq = 0u64;
            let mut out = Vec::new();
            for op in ops {
                match op {
                    Op::Insert(off) => {
                        let d = if off >= 0 {
                            now + Duration::from_micros(off as u64)
                        } else {
                            now - Duration::from_micros(off.unsigned_abs())
                        };
                        seq += 1;
                        let k = w.insert(d, seq);
                        model.insert((tick(d), seq), (k, d));
                    }
                    Op::Cancel(i) | Op::Reset(i, _) if model.is_empty() => {
                        let _ = i;
                    }
                    Op::Cancel(i) => {
                        let id = *model.keys().nth(i % model.len()).unwrap();
                        let (k, _) = model.remove(&id).unwrap();
                        prop_assert_eq!(w.cancel(k), Some(id.1));
                        prop_assert_eq!(w.cancel(k), None);
                    }
                    Op::Reset(i, off) => {
                        let id = *model.keys().nth(i % model.len()).unwrap();
                        let (k, _) = model.remove(&id).unwrap();
                        let d = now + Duration::from_micros(off);
                        prop_assert!(w.reset(k, d));
                        model.insert((tick(d), id.1), (k, d));
                    }
                    Op::Advance(us) => {
                        now += Duration::from_micros(us);
                        let now_tick = now.saturating_duration_since(base).as_nanos() / 1_000_000;
                        w.expire(now, &mut out);
                        let mut want = Vec::new();
                        while let Some(e) = model.first_entry() {
                            if e.key().0 > now_tick {
                                break;
                            }
                            let ((_, v), (k, d)) = e.remove_entry();
                            prop_assert!(d <= now);
                            want.push((k, v));
                        }
                        // Same set; the wheel's order is by tick, so compare sorted by tick.
                        let mut got = std::mem::take(&mut out);
                        got.sort_by_key(|&(_, v)| v);
                        want.sort_by_key(|&(_, v)| v);
                        prop_assert_eq!(got, want);
                    }
                }
                prop_assert_eq!(w.len(), model.len());
                if let Some((&(t, _), _)) = model.first_key_value() {
                    let earliest = base + Duration::from_millis(t as u64);
                    let next = w.next_expiry();
                    prop_assert!(next.is_some_and(|n| n <= earliest.max(now)));
                } else {
                    prop_assert_eq!(w.next_expiry(), None);
                }
            }
        }
    }
}
