//! The loop's clock: the system's monotonic clock, or a manual one that tests move by hand.
//!
//! An [`EventBase`](super::EventBase) reads its notion of "now" (what callbacks get from
//! `Context::now`, what timers are armed against and expire by) from the [`Clock`] it was built
//! with. In production that is [`Clock::System`] (`Instant::now()`). A test builds the base with
//! a [`ManualClock`] instead and advances it: timers fire when the test moves time past them,
//! never because the test slept, so a 5-second handshake timeout is tested in microseconds and
//! never flakes on a loaded machine.
//!
//! Invariants:
//! - A manual clock only moves forward, and only when told to ([`ManualClock::advance`],
//!   [`ManualClock::set`] to a later instant); it never moves by itself.
//! - The loop's own accounting (`LoopStats`: busy and waiting time, the longest callback)
//!   always uses the real clock: it measures the machine, not the test's story.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where an event loop reads the time.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// The system's monotonic clock.
    #[default]
    System,
    /// A clock that moves only when the test advances it.
    Manual(ManualClock),
}

impl Clock {
    /// The current time by this clock.
    #[inline]
    pub fn now(&self) -> Instant {
        match self {
            Clock::System => Instant::now(),
            Clock::Manual(m) => m.now(),
        }
    }

    /// Whether time moves only by hand (then the loop never waits for a timer: waiting would
    /// not bring it closer).
    pub fn is_manual(&self) -> bool {
        matches!(self, Clock::Manual(_))
    }
}

/// A hand-driven clock. Clones share the same time, so a test keeps one and gives the other
/// to the loop (it is `Send`, so the loop may run on another thread).
#[derive(Clone, Debug)]
pub struct ManualClock {
    start: Instant,
    /// Nanoseconds past `start`.
    offset: Arc<AtomicU64>,
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new()
    }
}

impl ManualClock {
    /// A clock standing at the real time of its creation (so instants it hands out mix
    /// safely with ones taken from `Instant::now()` elsewhere, e.g. rate limits).
    pub fn new() -> ManualClock {
        ManualClock::starting_at(Instant::now())
    }

    /// A clock standing at `start`.
    pub fn starting_at(start: Instant) -> ManualClock {
        ManualClock {
            start,
            offset: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn now(&self) -> Instant {
        self.start + Duration::from_nanos(self.offset.load(Ordering::Acquire))
    }

    /// Moves time forward by `d`.
    pub fn advance(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .offset
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| {
                Some(o.saturating_add(ns))
            });
    }

    /// Moves time forward to `t`; an instant at or before the current time changes nothing
    /// (the clock never goes back).
    pub fn set(&self, t: Instant) {
        let ns =
            u64::try_from(t.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX);
        self.offset.fetch_max(ns, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_forward_and_only_by_hand() {
        let m = ManualClock::new();
        let c = Clock::Manual(m.clone());
        let t0 = c.now();
        assert_eq!(c.now(), t0, "it never moves by itself");
        m.advance(Duration::from_millis(250));
        assert_eq!(c.now(), t0 + Duration::from_millis(250));
        m.set(t0);
        assert_eq!(c.now(), t0 + Duration::from_millis(250), "never back");
        m.set(t0 + Duration::from_secs(5));
        assert_eq!(c.now(), t0 + Duration::from_secs(5));
        assert!(c.is_manual() && !Clock::System.is_manual());
    }
}
