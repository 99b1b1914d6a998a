//! STUB (replaced by the prims branch)
use std::collections::BTreeMap;
use std::time::Instant;
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerKey(u64);
pub struct TimerWheel<T> {
    m: BTreeMap<(Instant, u64), T>,
    k: std::collections::HashMap<u64, Instant>,
    n: u64,
}
impl<T> TimerWheel<T> {
    pub fn new(_s: Instant) -> Self {
        TimerWheel {
            m: BTreeMap::new(),
            k: Default::default(),
            n: 0,
        }
    }
    pub fn insert(&mut self, d: Instant, v: T) -> TimerKey {
        self.n += 1;
        self.m.insert((d, self.n), v);
        self.k.insert(self.n, d);
        TimerKey(self.n)
    }
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        let d = self.k.remove(&key.0)?;
        self.m.remove(&(d, key.0))
    }
    pub fn next_expiry(&self) -> Option<Instant> {
        self.m.keys().next().map(|k| k.0)
    }
    pub fn expire(&mut self, now: Instant, out: &mut Vec<(TimerKey, T)>) {
        while let Some(e) = self.m.first_entry() {
            if e.key().0 > now {
                break;
            }
            let ((_, k), v) = e.remove_entry();
            self.k.remove(&k);
            out.push((TimerKey(k), v));
        }
    }
    pub fn len(&self) -> usize {
        self.m.len()
    }
    pub fn is_empty(&self) -> bool {
        self.m.is_empty()
    }
}
