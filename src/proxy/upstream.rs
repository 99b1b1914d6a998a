//! Upstream selection and health, per shard (shards share nothing; each learns health from
//! its own connects, and from active checks when configured).
//!
//! Choosing: a connection picks among the targets it has not tried yet, by the tunnel's
//! balance (round robin or least connections), preferring targets that are up. A configured
//! target given by name stands for every address it resolves to: those addresses form one
//! *group*, the unit the balance chooses among, and within a group addresses are tried in the
//! resolver's order (IPv6 before IPv4 where the resolver says so). A connection whose connect
//! to one address of a group failed tries the group's next address before any other group
//! (happy eyeballs, sequential: RFC 8305's fallback without the race). Every address keeps
//! its own health, so a dead address is skipped by the next connections while it is down. A target is
//! *down* for a backoff after a failed TCP connect or a failed active check (1 s doubling to
//! 30 s while it keeps failing); when the backoff ends it is up again and the next connect is
//! its probe, and a successful connect clears the backoff at once. When no untried target is
//! up, the connection tries the down ones anyway, by the same balance: being down steers the
//! choice, it never refuses a client (Envoy's panic mode, HAProxy with every server down). So
//! a backend that restarts serves the very next connection, and a tunnel whose targets all
//! failed recently still reaches the first one that is back.
//!
//! Only a failure of the TCP connect itself marks a target down: refused, timed out,
//! unreachable ([`ConnectOutcome`]). A peer that completed the connect and then reset it (a
//! decrypt side whose own backend refused, a backend shedding load) was reached; that is this
//! connection's failure, not the target's.
//!
//! Invariants:
//! - A connection names its target by [`TargetId`], never by index, because a reload
//!   ([`Upstreams::replace`]) may remove, add or reorder targets while connects are in flight.
//!   Ids are never reused by an `Upstreams`; a target whose address stays across a reload keeps
//!   its id, health and counts; the id of a removed target is found nowhere, and every lookup
//!   says so instead of landing on whichever target took its place.
//! - [`Tried`] belongs to one generation of the list: after a reload a connection may try each
//!   of the new targets once. Attempts per generation are bounded by the number of targets.
//! - Counts saturate: no reload, close or failure order can wrap one.
//! - `targets` lists each group's addresses contiguously, groups in configured order; a
//!   re-resolution is a [`Upstreams::replace_groups`] like a reload, so an address that stays
//!   keeps its id, health and counts, and no connection is dropped.
//! - Index `i` of [`Upstreams::targets`] is index `i` of the tunnel's per-upstream metric
//!   handles (`TunnelMetrics::upstreams`): both are built from the configured list, in one
//!   reload (`TunnelRt::reload`).

use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use super::ids::{TargetAddr, TargetIdx};
use crate::config::Balance;

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A target's identity within one tunnel on one shard: kept across reloads that keep its
/// address, never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TargetId(NonZeroU64);

#[derive(Clone, Debug)]
pub struct Target {
    pub addr: TargetAddr,
    id: TargetId,
    /// The configured target (its index) this address belongs to.
    group: usize,
    /// Down until this instant (passive or active check failure).
    down_until: Option<Instant>,
    backoff: Duration,
    /// Connections of this shard using the target, connecting ones included (least-conn).
    active: usize,
}

impl Target {
    pub fn id(&self) -> TargetId {
        self.id
    }
    pub fn group(&self) -> usize {
        self.group
    }
    pub fn active(&self) -> usize {
        self.active
    }
    pub fn is_up(&self, now: Instant) -> bool {
        self.down_until.is_none_or(|d| d <= now)
    }
    pub fn down_until(&self) -> Option<Instant> {
        self.down_until
    }
}

/// The targets one connection has tried in one generation of the list: a bitmask of indexes
/// (a target past the 64th is bounded by the attempt count alone).
#[derive(Clone, Copy, Debug, Default)]
pub struct Tried {
    mask: u64,
    generation: u32,
    attempts: u32,
    /// The group of the last attempt, plus one (0: none yet): its next address comes first.
    last_group: u32,
}

/// Why a connect failed: the `reason` label of `sealpipe_upstream_connect_failures_total`. The
/// discriminant is the label's slot in `metrics::CONNECT_FAILURES` and in each upstream's
/// `failures` handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectFailure {
    Refused = 0,
    Timeout = 1,
    Other = 2,
}

impl ConnectFailure {
    pub const ALL: [ConnectFailure; 3] = [
        ConnectFailure::Refused,
        ConnectFailure::Timeout,
        ConnectFailure::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "refused",
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Other => "other",
        }
    }
}

/// How a connect attempt that produced no connection ended, as health sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// The target answered the SYN with a reset: nothing listens there.
    Refused,
    /// No answer within the connect timeout (or the kernel's SYN retries ran out).
    TimedOut,
    /// Unreachable, or any other error of the connect itself.
    Other,
    /// This process is out of descriptors or memory: every target would fail the same way.
    Exhausted,
    /// The connect completed and the peer reset it before the outcome was read: the target
    /// was reached, so this is not a failed connect.
    ResetAfterConnect,
}

impl ConnectOutcome {
    /// Classifies the error a connect reported (`timed_out`: the connect timer fired).
    pub fn classify(err: Option<&io::Error>, timed_out: bool) -> ConnectOutcome {
        if timed_out {
            return ConnectOutcome::TimedOut;
        }
        let Some(e) = err else {
            return ConnectOutcome::Other;
        };
        if crate::reactor::listener::is_resource_exhaustion(e) {
            return ConnectOutcome::Exhausted;
        }
        match e.kind() {
            io::ErrorKind::ConnectionRefused => ConnectOutcome::Refused,
            io::ErrorKind::TimedOut => ConnectOutcome::TimedOut,
            // A SYN answered by a reset is ECONNREFUSED; a reset is only ECONNRESET (or an
            // abort, or EPIPE) once the connection was established.
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => ConnectOutcome::ResetAfterConnect,
            _ => ConnectOutcome::Other,
        }
    }

    /// Its `reason` label, for outcomes that are failed connects.
    pub fn failure_reason(self) -> Option<ConnectFailure> {
        match self {
            ConnectOutcome::Refused => Some(ConnectFailure::Refused),
            ConnectOutcome::TimedOut => Some(ConnectFailure::Timeout),
            ConnectOutcome::Other | ConnectOutcome::Exhausted => Some(ConnectFailure::Other),
            ConnectOutcome::ResetAfterConnect => None,
        }
    }

    /// Whether the target is to blame (and goes down for a backoff).
    pub fn marks_down(self) -> bool {
        matches!(
            self,
            ConnectOutcome::Refused | ConnectOutcome::TimedOut | ConnectOutcome::Other
        )
    }
}

/// The targets of one tunnel, as one shard sees them.
#[derive(Clone, Debug)]
pub struct Upstreams {
    targets: Vec<Target>,
    /// Per configured target (group): the range of `targets` holding its addresses.
    groups: Vec<std::ops::Range<usize>>,
    balance: Balance,
    /// The group where the next choice starts looking (round robin; least-conn's tie-break).
    next: usize,
    /// Ids handed out so far.
    issued: u64,
    /// Bumped by every reload, so a [`Tried`] of the old list is not read against the new one.
    generation: u32,
}

impl Upstreams {
    /// One target per address (each its own group).
    pub fn new(addrs: &[SocketAddr], balance: Balance) -> Upstreams {
        let groups: Vec<Vec<SocketAddr>> = addrs.iter().map(|a| vec![*a]).collect();
        Upstreams::with_groups(&groups, balance)
    }

    /// One group per configured target, each with its addresses in the resolver's order.
    pub fn with_groups<A: Copy + Into<TargetAddr>>(
        groups: &[Vec<A>],
        balance: Balance,
    ) -> Upstreams {
        let mut u = Upstreams {
            targets: Vec::new(),
            groups: Vec::new(),
            balance,
            next: 0,
            issued: 0,
            generation: 0,
        };
        u.replace_groups(groups, balance);
        u.generation = 0;
        u
    }

    fn fresh(&mut self, addr: TargetAddr, group: usize) -> Target {
        let id = TargetId(NonZeroU64::MIN.saturating_add(self.issued));
        self.issued += 1;
        Target {
            addr,
            id,
            group,
            down_until: None,
            backoff: Duration::ZERO,
            active: 0,
        }
    }

    /// Replaces the target list (reload), one address per target.
    pub fn replace(&mut self, addrs: &[SocketAddr], balance: Balance) {
        let groups: Vec<Vec<SocketAddr>> = addrs.iter().map(|a| vec![*a]).collect();
        self.replace_groups(&groups, balance);
    }

    /// Replaces the target list (reload, re-resolution). An address that stays keeps its id,
    /// health and counts (each old address is kept at most once, so duplicates stay
    /// distinct), even if it moved to another group; connections to removed addresses keep
    /// going, and find their target gone when they end.
    pub fn replace_groups<A: Copy + Into<TargetAddr>>(
        &mut self,
        groups: &[Vec<A>],
        balance: Balance,
    ) {
        let mut old: Vec<Option<Target>> = std::mem::take(&mut self.targets)
            .into_iter()
            .map(Some)
            .collect();
        let mut targets = Vec::with_capacity(groups.iter().map(Vec::len).sum());
        let mut ranges = Vec::with_capacity(groups.len());
        for (g, addrs) in groups.iter().enumerate() {
            let start = targets.len();
            for &addr in addrs {
                let addr: TargetAddr = addr.into();
                let kept = old
                    .iter_mut()
                    .find(|t| t.as_ref().is_some_and(|t| t.addr == addr))
                    .and_then(Option::take);
                let mut t = kept.unwrap_or_else(|| self.fresh(addr, g));
                t.group = g;
                targets.push(t);
            }
            ranges.push(start..targets.len());
        }
        self.targets = targets;
        self.groups = ranges;
        self.balance = balance;
        self.next = 0;
        self.generation = self.generation.wrapping_add(1);
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// The current index of target `id`; `None` once a reload removed it.
    pub fn index_of(&self, id: TargetId) -> Option<TargetIdx> {
        self.targets
            .iter()
            .position(|t| t.id == id)
            .map(TargetIdx::new)
    }

    pub fn get(&self, id: TargetId) -> Option<&Target> {
        self.targets.iter().find(|t| t.id == id)
    }

    fn get_mut(&mut self, id: TargetId) -> Option<&mut Target> {
        self.targets.iter_mut().find(|t| t.id == id)
    }

    pub fn is_up(&self, i: TargetIdx, now: Instant) -> bool {
        self.targets.get(i.get()).is_some_and(|t| t.is_up(now))
    }

    pub fn healthy(&self, now: Instant) -> usize {
        self.targets.iter().filter(|t| t.is_up(now)).count()
    }

    /// Chooses the target of a connection's next connect: the next untried address of the
    /// group its last attempt failed in, if up; else a group by the balance, among those with
    /// an untried address that is up, and that group's first such address; then the same
    /// with addresses that are down. Counts the choice as active (the connection gives it back
    /// with [`release`](Self::release)) and notes it in `tried`. `None` once the connection
    /// has tried every address.
    pub fn pick(&mut self, now: Instant, tried: &mut Tried) -> Option<(TargetId, TargetAddr)> {
        if tried.generation != self.generation {
            *tried = Tried {
                generation: self.generation,
                ..Tried::default()
            };
        }
        if tried.attempts as usize >= self.targets.len() {
            return None;
        }
        let mask = tried.mask;
        let untried = move |i: usize| i >= 64 || mask & (1 << i) == 0;
        let last = (tried.last_group as usize).checked_sub(1);
        let i = last
            .and_then(|g| self.first_in(g, |i, t| untried(i) && t.is_up(now)))
            .or_else(|| self.choose(|i, t| untried(i) && t.is_up(now)))
            .or_else(|| last.and_then(|g| self.first_in(g, |i, _| untried(i))))
            .or_else(|| self.choose(|i, _| untried(i)))?;
        tried.mask |= 1u64.checked_shl(i as u32).unwrap_or(0);
        tried.attempts += 1;
        let t = &mut self.targets[i];
        tried.last_group = u32::try_from(t.group + 1).unwrap_or(0);
        t.active = t.active.saturating_add(1);
        Some((t.id, t.addr))
    }

    /// The target a fresh connection's first [`pick`](Self::pick) would choose now, without
    /// choosing it (nothing moves, nothing is counted): where a warm session would serve the
    /// next client.
    pub fn peek(&self, now: Instant) -> Option<TargetId> {
        let (_, i) = self
            .choice(|_, t| t.is_up(now))
            .or_else(|| self.choice(|_, _| true))?;
        Some(self.targets[i].id)
    }

    /// The first address of group `g`, in order, that `eligible` accepts.
    fn first_in(&self, g: usize, eligible: impl Fn(usize, &Target) -> bool) -> Option<usize> {
        self.groups
            .get(g)?
            .clone()
            .find(|&i| eligible(i, &self.targets[i]))
    }

    /// The balance's choice among the groups with an address `eligible` accepts, and that
    /// group's first such address; advances the cursor.
    fn choose(&mut self, eligible: impl Fn(usize, &Target) -> bool) -> Option<usize> {
        let (g, i) = self.choice(eligible)?;
        self.next = (g + 1) % self.groups.len();
        Some(i)
    }

    /// The balance's choice (group, address) among the groups with an address `eligible`
    /// accepts, the cursor unmoved.
    fn choice(&self, eligible: impl Fn(usize, &Target) -> bool) -> Option<(usize, usize)> {
        let n = self.groups.len();
        if n == 0 {
            return None;
        }
        let start = self.next % n;
        let mut order = (0..n)
            .map(|k| (start + k) % n)
            .filter_map(|g| self.first_in(g, &eligible).map(|i| (g, i)));
        match self.balance {
            Balance::RoundRobin => order.next(),
            // The first of the least loaded, so ties rotate with the cursor.
            Balance::LeastConn => order.min_by_key(|&(g, _)| self.group_active(g)),
        }
    }

    /// Connections of this shard using any address of group `g`.
    fn group_active(&self, g: usize) -> usize {
        self.groups.get(g).map_or(0, |r| {
            self.targets[r.clone()]
                .iter()
                .fold(0usize, |n, t| n.saturating_add(t.active))
        })
    }

    /// A connection moved here from a predecessor process uses the target at `addr`, if it
    /// is still one of this list's: counted as active (least-conn), as a pick would. `None`
    /// if the address is no longer a target (the connection goes on; it has no target here).
    pub fn adopt(&mut self, addr: TargetAddr) -> Option<TargetId> {
        let t = self.targets.iter_mut().find(|t| t.addr == addr)?;
        t.active = t.active.saturating_add(1);
        Some(t.id)
    }

    /// A connection stops using target `id` (closed, or its connect failed).
    pub fn release(&mut self, id: TargetId) {
        if let Some(t) = self.get_mut(id) {
            t.active = t.active.saturating_sub(1);
        }
    }

    /// A connect to `id` failed: down for the backoff. `Some(true)` if it was up before,
    /// `None` if a reload removed it.
    pub fn failed(&mut self, id: TargetId, now: Instant) -> Option<bool> {
        let t = self.get_mut(id)?;
        let was_up = t.is_up(now);
        t.backoff = if t.backoff.is_zero() {
            BACKOFF_MIN
        } else {
            (t.backoff * 2).min(BACKOFF_MAX)
        };
        t.down_until = Some(now + t.backoff);
        Some(was_up)
    }

    /// A connect to `id` succeeded: up, backoff cleared. `Some(true)` if it was marked down
    /// before, `None` if a reload removed it.
    pub fn succeeded(&mut self, id: TargetId) -> Option<bool> {
        let t = self.get_mut(id)?;
        let was_down = t.down_until.is_some();
        t.down_until = None;
        t.backoff = Duration::ZERO;
        Some(was_down)
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

    fn addr(i: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1000 + i))
    }

    /// The index a fresh connection's first pick lands on (released again at once).
    fn first_pick(u: &mut Upstreams, now: Instant) -> Option<usize> {
        let (id, _) = u.pick(now, &mut Tried::default())?;
        u.release(id);
        u.index_of(id).map(TargetIdx::get)
    }

    fn id(u: &Upstreams, i: usize) -> TargetId {
        u.targets()[i].id()
    }

    #[test]
    fn peek_names_the_next_first_pick_without_taking_it() {
        let t0 = Instant::now();
        for balance in [Balance::RoundRobin, Balance::LeastConn] {
            let mut u = Upstreams::new(&addrs(3), balance);
            let down = u.targets()[1].id();
            u.failed(down, t0);
            let mut held = Vec::new();
            for _ in 0..7 {
                let peeked = u.peek(t0);
                assert_eq!(u.peek(t0), peeked, "peeking moves nothing");
                let (id, _) = u.pick(t0, &mut Tried::default()).unwrap();
                assert_eq!(peeked, Some(id), "{balance:?}");
                assert_ne!(id, down, "a down target is not chosen while others are up");
                held.push(id);
            }
        }
        assert_eq!(Upstreams::new(&[], Balance::RoundRobin).peek(t0), None);
    }

    #[test]
    fn round_robin_prefers_up_then_tries_down_then_gives_up() {
        let now = Instant::now();
        let mut u = Upstreams::new(&addrs(3), Balance::RoundRobin);
        assert_eq!(first_pick(&mut u, now), Some(0));
        assert_eq!(first_pick(&mut u, now), Some(1));
        u.failed(id(&u, 2), now);
        // Target 2 is down: skipped while others are up.
        assert_eq!(first_pick(&mut u, now), Some(0));
        assert_eq!(first_pick(&mut u, now), Some(1));
        assert_eq!(first_pick(&mut u, now), Some(0));
        // One connection: both up ones, then the down one, then nothing.
        let mut tried = Tried::default();
        let mut picks = Vec::new();
        while let Some((id, _)) = u.pick(now, &mut tried) {
            picks.push(u.index_of(id).unwrap().get());
        }
        assert_eq!(picks, vec![1, 0, 2]);
        // The backoff ends: up again, in the rotation.
        let later = now + Duration::from_secs(2);
        assert!(u.is_up(TargetIdx::new(2), later));
    }

    #[test]
    fn all_down_is_round_robin_over_the_down_ones_never_a_refusal() {
        let now = Instant::now();
        let mut u = Upstreams::new(&addrs(2), Balance::RoundRobin);
        for _ in 0..5 {
            u.failed(id(&u, 0), now);
            u.failed(id(&u, 1), now);
        }
        assert_eq!(u.healthy(now), 0);
        let picks: Vec<_> = (0..4).map(|_| first_pick(&mut u, now)).collect();
        assert_eq!(picks, vec![Some(0), Some(1), Some(0), Some(1)]);
        // One comes back: a connection that tries the dead one first reaches it next.
        let mut tried = Tried::default();
        let (a, _) = u.pick(now, &mut tried).unwrap();
        u.release(a);
        u.failed(a, now);
        let (b, _) = u.pick(now, &mut tried).unwrap();
        assert_ne!(a, b);
        assert_eq!(u.succeeded(b), Some(true));
        // ...and from then on it is preferred.
        assert_eq!(first_pick(&mut u, now), u.index_of(b).map(TargetIdx::get));
        assert_eq!(first_pick(&mut u, now), u.index_of(b).map(TargetIdx::get));
    }

    #[test]
    fn single_target_down_is_still_tried() {
        let now = Instant::now();
        let mut u = Upstreams::new(&addrs(1), Balance::LeastConn);
        for _ in 0..10 {
            u.failed(id(&u, 0), now);
        }
        assert_eq!(
            u.targets()[0].down_until(),
            Some(now + BACKOFF_MAX),
            "capped"
        );
        let mut tried = Tried::default();
        assert!(u.pick(now, &mut tried).is_some());
        assert!(
            u.pick(now, &mut tried).is_none(),
            "tried once per generation"
        );
    }

    #[test]
    fn least_conn_prefers_idle_and_up() {
        let now = Instant::now();
        let mut u = Upstreams::new(&addrs(3), Balance::LeastConn);
        for (i, n) in [5, 1, 3].into_iter().enumerate() {
            u.targets[i].active = n;
        }
        assert_eq!(first_pick(&mut u, now), Some(1));
        // Down steers away from the least loaded while another is up.
        u.failed(id(&u, 1), now);
        assert_eq!(first_pick(&mut u, now), Some(2));
        // Ties rotate.
        let mut u = Upstreams::new(&addrs(2), Balance::LeastConn);
        let mut got = Vec::new();
        for _ in 0..4 {
            let (id, _) = u.pick(now, &mut Tried::default()).unwrap();
            got.push(u.index_of(id).unwrap().get());
        }
        assert_eq!(got, vec![0, 1, 0, 1]);
        assert_eq!(u.targets()[0].active(), 2);
    }

    #[test]
    fn backoff_doubles_and_clears() {
        let now = Instant::now();
        let mut u = Upstreams::new(&addrs(1), Balance::RoundRobin);
        let a = id(&u, 0);
        assert_eq!(u.failed(a, now), Some(true));
        assert_eq!(u.failed(a, now), Some(false));
        assert_eq!(
            u.targets()[0].down_until(),
            Some(now + Duration::from_secs(2))
        );
        assert_eq!(u.succeeded(a), Some(true));
        assert!(u.is_up(TargetIdx::new(0), now));
        assert_eq!(u.succeeded(a), Some(false));
    }

    #[test]
    fn reload_keeps_ids_health_and_counts_of_addresses_that_stay() {
        let now = Instant::now();
        let mut u = Upstreams::new(&[addr(0), addr(1)], Balance::RoundRobin);
        let (dead, b) = (id(&u, 0), id(&u, 1));
        // A connection in flight to each.
        let mut t0 = Tried::default();
        let (p0, _) = u.pick(now, &mut t0).unwrap();
        let (p1, _) = u.pick(now, &mut Tried::default()).unwrap();
        assert_eq!((p0, p1), (dead, b));
        u.failed(b, now);
        // Reload: the first target removed, a new one appended; the list keeps its length.
        u.replace(&[addr(1), addr(2)], Balance::LeastConn);
        assert_eq!(u.index_of(b), Some(TargetIdx::new(0)));
        assert_eq!(u.index_of(dead), None);
        let c = id(&u, 1);
        assert!(c != dead && c != b, "ids are never reused");
        assert_eq!(u.targets()[0].active(), 1, "b's count kept");
        assert!(!u.is_up(TargetIdx::new(0), now), "b's health kept");
        // The removed target's connect fails: nothing is charged to anyone.
        assert_eq!(u.failed(dead, now), None);
        u.release(dead);
        assert_eq!(u.targets()[0].active(), 1);
        assert_eq!(u.targets()[1].active(), 0);
        assert!(u.is_up(TargetIdx::new(1), now));
        // Its connection fails over within the new list, as a fresh generation.
        let (next, a) = u.pick(now, &mut t0).unwrap();
        assert_eq!((next, a), (c, TargetAddr::new(addr(2))));
        assert_eq!(u.succeeded(dead), None);
    }

    #[test]
    fn reload_shrinking_the_list_never_lands_out_of_bounds() {
        let now = Instant::now();
        let mut u = Upstreams::new(&addrs(3), Balance::RoundRobin);
        let mut tried = Tried::default();
        let mut ids = Vec::new();
        while let Some((id, _)) = u.pick(now, &mut tried) {
            ids.push(id);
        }
        u.replace(&[addr(0)], Balance::RoundRobin);
        for &id in &ids {
            u.failed(id, now);
            u.release(id);
            u.release(id);
        }
        assert_eq!(u.targets().len(), 1);
        assert_eq!(u.targets()[0].active(), 0, "saturates");
        // Only the kept target (id 0) was charged.
        assert!(!u.is_up(TargetIdx::new(0), now));
        // The stale `tried` mask (all three bits) does not hide the new list.
        assert!(u.pick(now, &mut tried).is_some());
        assert!(u.pick(now, &mut tried).is_none());
    }

    #[test]
    fn attempts_are_bounded_past_64_targets() {
        let now = Instant::now();
        let mut u = Upstreams::new(&addrs(70), Balance::RoundRobin);
        let mut tried = Tried::default();
        let mut n = 0;
        while let Some((id, _)) = u.pick(now, &mut tried) {
            u.release(id);
            u.failed(id, now);
            n += 1;
        }
        assert_eq!(n, 70);
    }

    #[test]
    fn connect_outcomes() {
        use io::ErrorKind as K;
        let c = |k: K| ConnectOutcome::classify(Some(&io::Error::from(k)), false);
        assert_eq!(c(K::ConnectionRefused), ConnectOutcome::Refused);
        assert_eq!(c(K::TimedOut), ConnectOutcome::TimedOut);
        assert_eq!(c(K::HostUnreachable), ConnectOutcome::Other);
        assert_eq!(c(K::NetworkUnreachable), ConnectOutcome::Other);
        for k in [K::ConnectionReset, K::ConnectionAborted, K::BrokenPipe] {
            assert_eq!(c(k), ConnectOutcome::ResetAfterConnect);
            assert!(!c(k).marks_down());
            assert_eq!(c(k).failure_reason(), None);
        }
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let o = ConnectOutcome::classify(Some(&emfile), false);
        assert_eq!(o, ConnectOutcome::Exhausted);
        assert!(!o.marks_down());
        assert_eq!(
            ConnectOutcome::classify(Some(&io::Error::from(K::ConnectionReset)), true),
            ConnectOutcome::TimedOut
        );
        assert!(ConnectOutcome::Refused.marks_down());
        assert_eq!(
            ConnectOutcome::TimedOut.failure_reason(),
            Some(ConnectFailure::Timeout)
        );
    }

    #[test]
    fn connect_failure_labels_sit_in_their_metric_slots() {
        for f in ConnectFailure::ALL {
            assert_eq!(crate::metrics::CONNECT_FAILURES[f as usize], f.as_str());
        }
        assert_eq!(
            crate::metrics::CONNECT_FAILURES.len(),
            ConnectFailure::ALL.len()
        );
    }

    #[test]
    fn a_name_is_one_group_tried_in_resolver_order_before_the_next_target() {
        let now = Instant::now();
        let v6: SocketAddr = "[::1]:1000".parse().unwrap();
        // Target 0 is a name with two addresses (IPv6 first), target 1 an address.
        let groups = vec![vec![v6, addr(0)], vec![addr(1)]];
        let mut u = Upstreams::with_groups(&groups, Balance::RoundRobin);
        // New connections alternate between the two targets, each name from its first address.
        let firsts: Vec<SocketAddr> = (0..4)
            .map(|_| {
                let (id, a) = u.pick(now, &mut Tried::default()).unwrap();
                u.release(id);
                a.inet().unwrap()
            })
            .collect();
        assert_eq!(firsts, vec![v6, addr(1), v6, addr(1)]);
        // A connection whose connect to the IPv6 address fails tries the name's IPv4 address
        // next, not the other target.
        let mut tried = Tried::default();
        let (a, got) = u.pick(now, &mut tried).unwrap();
        assert_eq!(got.inet().unwrap(), v6);
        u.release(a);
        u.failed(a, now);
        let (b, got) = u.pick(now, &mut tried).unwrap();
        assert_eq!(got.inet().unwrap(), addr(0), "the same name's next address");
        u.release(b);
        u.failed(b, now);
        assert_eq!(
            u.pick(now, &mut tried).map(|p| p.1.inet().unwrap()),
            Some(addr(1))
        );
        assert_eq!(u.pick(now, &mut tried), None, "every address tried once");
        // While the IPv6 address is down, new connections to the name start with IPv4.
        u.succeeded(b);
        let mut t = Tried::default();
        let picks: Vec<SocketAddr> = (0..2)
            .map(|_| u.pick(now, &mut t).unwrap().1.inet().unwrap())
            .collect();
        assert!(
            picks.contains(&addr(0)) && !picks.contains(&v6),
            "{picks:?}"
        );
    }

    #[test]
    fn least_conn_weighs_a_name_by_all_its_addresses() {
        let now = Instant::now();
        let groups = vec![vec![addr(0), addr(1)], vec![addr(2)]];
        let mut u = Upstreams::with_groups(&groups, Balance::LeastConn);
        u.targets[0].active = 1;
        u.targets[1].active = 1;
        u.targets[2].active = 1;
        assert_eq!(first_pick(&mut u, now), Some(2), "2 < 1 + 1");
    }

    #[test]
    fn a_re_resolution_keeps_the_health_of_addresses_that_stay() {
        let now = Instant::now();
        let mut u = Upstreams::with_groups(&[vec![addr(0), addr(1)]], Balance::RoundRobin);
        let (a0, a1) = (id(&u, 0), id(&u, 1));
        u.failed(a1, now);
        let (busy, _) = u.pick(now, &mut Tried::default()).unwrap();
        assert_eq!(busy, a0);
        // The name now resolves to addr(1) and a new addr(2); addr(0) is gone.
        u.replace_groups(&[vec![addr(1), addr(2)]], Balance::RoundRobin);
        assert_eq!(u.index_of(a1), Some(TargetIdx::new(0)));
        assert!(!u.is_up(TargetIdx::new(0), now), "addr(1) is still down");
        assert_eq!(u.index_of(a0), None);
        u.release(a0);
        assert_eq!(
            first_pick(&mut u, now),
            Some(1),
            "the up address of the name"
        );
    }
}
