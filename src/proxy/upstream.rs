//! Upstream selection and health, per shard (shards share nothing; each learns health from
//! its own connects, and from active checks when configured).
//!
//! Passive health: a failed connect marks the target down for a backoff (1 s doubling to
//! 30 s); when the backoff ends the target is eligible again and the next connect is its probe.
//! A successful connect clears the backoff.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::config::Balance;

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    /// Down until this instant (passive or active check failure).
    pub down_until: Option<Instant>,
    backoff: Duration,
    /// Connections of this shard currently using the target (least-conn).
    pub active: usize,
}

/// The targets of one tunnel, as one shard sees them.
#[derive(Clone, Debug)]
pub struct Upstreams {
    pub targets: Vec<Target>,
    balance: Balance,
    next: usize,
}

impl Upstreams {
    pub fn new(addrs: &[SocketAddr], balance: Balance) -> Upstreams {
        Upstreams {
            targets: addrs
                .iter()
                .map(|&addr| Target {
                    addr,
                    down_until: None,
                    backoff: Duration::ZERO,
                    active: 0,
                })
                .collect(),
            balance,
            next: 0,
        }
    }

    /// Replaces the target list (reload), keeping health and counts of addresses that stay.
    pub fn replace(&mut self, addrs: &[SocketAddr], balance: Balance) {
        let old = std::mem::take(&mut self.targets);
        self.targets = addrs
            .iter()
            .map(|&addr| {
                old.iter()
                    .find(|t| t.addr == addr)
                    .cloned()
                    .unwrap_or(Target {
                        addr,
                        down_until: None,
                        backoff: Duration::ZERO,
                        active: 0,
                    })
            })
            .collect();
        self.balance = balance;
        self.next = 0;
    }

    pub fn is_up(&self, i: usize, now: Instant) -> bool {
        self.targets
            .get(i)
            .is_some_and(|t| t.down_until.is_none_or(|d| d <= now))
    }

    pub fn healthy(&self, now: Instant) -> usize {
        (0..self.targets.len())
            .filter(|&i| self.is_up(i, now))
            .count()
    }

    /// Picks a healthy target not in `tried` (a bitmask of indexes), or `None`.
    pub fn pick(&mut self, now: Instant, tried: u64) -> Option<usize> {
        let n = self.targets.len();
        let eligible = |i: usize, s: &Self| (i >= 64 || tried & (1 << i) == 0) && s.is_up(i, now);
        match self.balance {
            Balance::RoundRobin => {
                for k in 0..n {
                    let i = (self.next + k) % n;
                    if eligible(i, self) {
                        self.next = (i + 1) % n;
                        return Some(i);
                    }
                }
                None
            }
            Balance::LeastConn => {
                let start = self.next;
                self.next = (self.next + 1) % n.max(1);
                (0..n)
                    .map(|k| (start + k) % n)
                    .filter(|&i| eligible(i, self))
                    .min_by_key(|&i| self.targets[i].active)
            }
        }
    }

    /// A connect failed: down for the backoff. Returns true if it was up before.
    pub fn failed(&mut self, i: usize, now: Instant) -> bool {
        let Some(t) = self.targets.get_mut(i) else {
            return false;
        };
        let was_up = t.down_until.is_none_or(|d| d <= now);
        t.backoff = if t.backoff.is_zero() {
            BACKOFF_MIN
        } else {
            (t.backoff * 2).min(BACKOFF_MAX)
        };
        t.down_until = Some(now + t.backoff);
        was_up
    }

    /// A connect succeeded: up, backoff cleared. Returns true if it was down before.
    pub fn succeeded(&mut self, i: usize) -> bool {
        let Some(t) = self.targets.get_mut(i) else {
            return false;
        };
        let was_down = t.down_until.is_some();
        t.down_until = None;
        t.backoff = Duration::ZERO;
        was_down
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 1000 + i)))
            .collect()
    }

    #[test]
    fn round_robin_skips_down_and_tried() {
        let now = Instant::now();
        let mut u = Upstreams::new(&addrs(3), Balance::RoundRobin);
        assert_eq!(u.pick(now, 0), Some(0));
        assert_eq!(u.pick(now, 0), Some(1));
        u.failed(2, now);
        assert_eq!(u.pick(now, 0), Some(0));
        assert_eq!(u.pick(now, 0b001), Some(1));
        assert_eq!(u.pick(now, 0b011), None);
        // The backoff ends: the target is eligible again.
        assert_eq!(u.pick(now + Duration::from_secs(2), 0b011), Some(2));
    }

    #[test]
    fn least_conn_prefers_idle() {
        let now = Instant::now();
        let mut u = Upstreams::new(&addrs(3), Balance::LeastConn);
        u.targets[0].active = 5;
        u.targets[1].active = 1;
        u.targets[2].active = 3;
        assert_eq!(u.pick(now, 0), Some(1));
    }

    #[test]
    fn backoff_doubles_and_clears() {
        let now = Instant::now();
        let mut u = Upstreams::new(&addrs(1), Balance::RoundRobin);
        assert!(u.failed(0, now));
        assert!(!u.failed(0, now));
        assert_eq!(u.targets[0].down_until, Some(now + Duration::from_secs(2)));
        assert!(u.succeeded(0));
        assert!(u.is_up(0, now));
    }
}
