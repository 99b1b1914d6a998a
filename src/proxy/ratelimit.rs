//! Per-tunnel rate limits: new connections per second, and bytes per second each way
//! (`conn_rate`, `upstream_rate`, `downstream_rate`; docs/OPERATIONS.md, "Rate limits").
//!
//! Each shard enforces its *share* of a tunnel's limit with its own token buckets
//! ([`ShardRates`], in the shard's `TunnelRt`): a new connection takes a token at accept or is
//! refused (`rejected{reason="rate"}`); a read takes the bytes it may read from the bucket of
//! its direction before it runs ([`metered`]): the stream core reads no more than that (its
//! read allowance) and, with none left, suspends reading ([`Suspend::Bandwidth`]) rather than
//! dropping anything. The connection then reserves the next chunk of the bucket and sleeps
//! until the refill covers it ([`BufferEvent::throttle_until`]); connections that run dry one
//! after another queue behind each other's reservations, so a shard wakes one reader per chunk
//! of its rate, never all of them at each refill.
//!
//! Shares: every shard starts with `limit / shards`. Since SO_REUSEPORT spreads connections by
//! hash, one shard may carry all of a tunnel's traffic (one connection always does) while the
//! others idle; so the control thread moves the shares ([`Rebalancer`], every
//! [`REBALANCE_EVERY`]) from what each shard used and whether it ran dry in the last period,
//! which shards publish a few times a second (their housekeeping, [`RateBoard`]): shards that
//! ran dry split what the others do not use, and a shard that idles keeps a floor
//! ([`FLOOR`] of the limit, split) so a connection arriving there starts at once, at a low
//! rate, until the next rebalance gives it its part. The shares always add up to the limit,
//! and so do the shards' parts of the burst, which follow the shares.
//!
//! Invariants:
//! - Nothing here takes a lock or touches a shared atomic on the data path: a shard reads and
//!   writes only its own buckets; its usage reaches the control thread through atomics it
//!   stores at housekeeping, and new shares come back as messages on the shard's loop.
//! - The shards' rates add up to the tunnel's limit; a bucket holds at most its burst share; a
//!   reservation is paid before the read it allows, and bytes a read did not use go back. So
//!   over any window the bytes read are at most `limit x window + burst`.
//! - A bucket is shared only by the connections of one tunnel on one shard.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::RejectReason;
use crate::reactor::{BevEvents, BufferEvent, Context, Filter, Suspend};

use super::conn::core::Flow;
use super::{ShardState, TunnelIdx};

/// How often the control thread moves the shares.
pub const REBALANCE_EVERY: Duration = Duration::from_millis(500);
/// What every shard keeps of a limit, whatever it used (split among the shards).
pub const FLOOR: f64 = 0.02;
/// A shard that did not run dry is given what it used, this much over.
const HEADROOM: f64 = 1.25;
/// The most one read pass may take from a bucket at once.
const GRANT: u32 = 256 * 1024;
/// The bytes a connection that ran dry reserves: about 10 ms of its shard's rate, within
/// these bounds (fewer wake-ups than a byte at a time, finer than the burst).
const CHUNK_MIN: f64 = 4.0 * 1024.0;
const CHUNK_MAX: f64 = 64.0 * 1024.0;
/// The least burst a shard's byte bucket gets (a reserved chunk must fit).
const BURST_MIN_BYTES: f64 = CHUNK_MAX;

/// A limit: so many per second, with room for a burst of so many.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limit {
    pub rate: f64,
    pub burst: f64,
}

/// A tunnel's rate limits, as configured (validated by `config`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RateLimits {
    /// New connections per second.
    pub conns: Option<Limit>,
    /// Bytes per second from the client towards the backend, and back.
    pub upstream: Option<Limit>,
    pub downstream: Option<Limit>,
}

/// What a limit counts: the `limit` label of `sealpipe_rate_limit_share`; the discriminant is
/// its slot in `metrics::RATE_LIMITS` and in [`RateBoard`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Conns = 0,
    Upstream = 1,
    Downstream = 2,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Conns, Kind::Upstream, Kind::Downstream];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Conns => "conns",
            Kind::Upstream => "upstream",
            Kind::Downstream => "downstream",
        }
    }

    fn of(dir: Flow) -> Kind {
        match dir {
            Flow::Upstream => Kind::Upstream,
            Flow::Downstream => Kind::Downstream,
        }
    }
}

impl RateLimits {
    pub fn get(&self, k: Kind) -> Option<Limit> {
        match k {
            Kind::Conns => self.conns,
            Kind::Upstream => self.upstream,
            Kind::Downstream => self.downstream,
        }
    }

    pub fn is_empty(&self) -> bool {
        Kind::ALL.iter().all(|k| self.get(*k).is_none())
    }
}

// ---------------------------------------------------------------------------------------------
// Token buckets

/// A token bucket refilled lazily from the instants it is used at. Tokens may go below zero:
/// a reservation ([`Bucket::reserve`]) pays for bytes before they are read, and the next
/// reservation waits behind it.
#[derive(Clone, Debug)]
pub struct Bucket {
    rate: f64,
    cap: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: f64, cap: f64, now: Instant) -> Bucket {
        Bucket {
            rate,
            cap,
            tokens: cap,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.cap);
        self.last = self.last.max(now);
    }

    /// Takes up to `max` whole tokens, as many as there are.
    pub fn take(&mut self, now: Instant, max: u64) -> u64 {
        self.refill(now);
        let n = (self.tokens.max(0.0).floor() as u64).min(max);
        self.tokens -= n as f64;
        n
    }

    /// Tokens taken and not used come back.
    pub fn give_back(&mut self, n: u64) {
        self.tokens = (self.tokens + n as f64).min(self.cap);
    }

    /// Pays for `n` tokens now, whether there are that many or not, and returns when the
    /// refill will have covered them (`now` if it already has).
    pub fn reserve(&mut self, now: Instant, n: u64) -> Instant {
        self.refill(now);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 || self.rate <= 0.0 {
            return now;
        }
        now + Duration::from_secs_f64(-self.tokens / self.rate)
    }

    /// A new rate and size, from `now` on (tokens earned at the old rate are kept).
    pub fn set(&mut self, now: Instant, rate: f64, cap: f64) {
        self.refill(now);
        self.rate = rate;
        self.cap = cap;
        self.tokens = self.tokens.min(cap);
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }
}

/// One limit of one tunnel on one shard: its bucket, and what it counted since the start (for
/// the rebalancer and the metrics).
#[derive(Clone, Debug)]
pub struct Limiter {
    bucket: Bucket,
    /// The tunnel's limit (all shards).
    limit: Limit,
    shards: usize,
    /// It counts bytes (not connections).
    bytes: bool,
    /// Bytes a connection that ran dry reserves.
    chunk: u32,
    /// Tokens used (taken less given back), and times it ran dry (a reservation, a refused
    /// connection), since the start: cumulative, published as they are.
    used: u64,
    starved: u64,
    /// Throttling not yet added to the metrics: pauses, and the time they wait.
    pub(crate) unflushed: (u64, f64),
}

impl Limiter {
    fn new(limit: Limit, shards: usize, bytes: bool, now: Instant) -> Limiter {
        let shards = shards.max(1);
        let rate = limit.rate / shards as f64;
        let cap = Self::cap(limit, rate, bytes);
        Limiter {
            bucket: Bucket::new(rate, cap, now),
            limit,
            shards,
            bytes,
            chunk: Self::chunk(rate),
            used: 0,
            starved: 0,
            unflushed: (0, 0.0),
        }
    }

    /// A shard's part of the burst, in the proportion of its share of the rate (so the parts
    /// add up to the burst): at least one connection, or a chunk of bytes.
    fn cap(limit: Limit, share: f64, bytes: bool) -> f64 {
        let part = limit.burst * share / limit.rate;
        if bytes {
            part.max(BURST_MIN_BYTES)
        } else {
            part.max(1.0)
        }
    }

    fn chunk(rate: f64) -> u32 {
        (rate / 100.0).clamp(CHUNK_MIN, CHUNK_MAX) as u32
    }

    /// This shard's rate now (per second).
    pub fn share(&self) -> f64 {
        self.bucket.rate()
    }

    fn set_share(&mut self, now: Instant, rate: f64) {
        let cap = Self::cap(self.limit, rate, self.bytes);
        self.bucket.set(now, rate, cap);
        self.chunk = Self::chunk(rate);
    }

    fn take(&mut self, now: Instant, max: u32) -> u32 {
        let n = self.bucket.take(now, max.into()) as u32;
        self.used += u64::from(n);
        n
    }

    fn give_back(&mut self, n: u32) {
        self.bucket.give_back(n.into());
        self.used = self.used.saturating_sub(n.into());
    }

    /// Ran dry: pays for the next chunk; returns it and when it is covered.
    fn reserve(&mut self, now: Instant) -> (u32, Instant) {
        let at = self.bucket.reserve(now, self.chunk.into());
        self.used += u64::from(self.chunk);
        self.starved += 1;
        let wait = at.saturating_duration_since(now).as_secs_f64();
        self.unflushed.0 += 1;
        self.unflushed.1 += wait;
        (self.chunk, at)
    }
}

/// One tunnel's limits on one shard.
#[derive(Clone, Debug, Default)]
pub struct ShardRates {
    limiters: [Option<Limiter>; 3],
}

impl ShardRates {
    /// Each limit of `limits` with an equal share of `shards`, its bucket full.
    pub fn new(limits: &RateLimits, shards: usize, now: Instant) -> ShardRates {
        let mut r = ShardRates::default();
        r.reconfigure(limits, shards, now);
        r
    }

    /// A reload: new limits take effect at once, as equal shares (the rebalancer moves them
    /// again); a limit that stays keeps its tokens and what it counted.
    pub fn reconfigure(&mut self, limits: &RateLimits, shards: usize, now: Instant) {
        for k in Kind::ALL {
            let slot = &mut self.limiters[k as usize];
            let bytes = k != Kind::Conns;
            match (limits.get(k), slot.as_mut()) {
                (None, _) => *slot = None,
                (Some(l), None) => *slot = Some(Limiter::new(l, shards, bytes, now)),
                (Some(l), Some(lim)) if lim.limit != l || lim.shards != shards.max(1) => {
                    let fresh = Limiter::new(l, shards, bytes, now);
                    lim.bucket.set(now, fresh.bucket.rate, fresh.bucket.cap);
                    lim.chunk = fresh.chunk;
                    lim.limit = l;
                    lim.shards = fresh.shards;
                }
                (Some(_), Some(_)) => {}
            }
        }
    }

    pub fn get(&self, k: Kind) -> Option<&Limiter> {
        self.limiters[k as usize].as_ref()
    }

    fn get_mut(&mut self, k: Kind) -> Option<&mut Limiter> {
        self.limiters[k as usize].as_mut()
    }

    /// A new share of limit `k` for this shard (from the rebalancer); ignored if the tunnel
    /// no longer has that limit.
    pub fn set_share(&mut self, k: Kind, now: Instant, rate: f64) {
        if let Some(l) = self.get_mut(k) {
            l.set_share(now, rate);
        }
    }

    /// A new connection: true if the connection rate allows it (always, without a limit).
    pub fn admit(&mut self, now: Instant) -> bool {
        let Some(l) = self.get_mut(Kind::Conns) else {
            return true;
        };
        if l.take(now, 1) == 1 {
            return true;
        }
        l.starved += 1;
        false
    }

    /// A connection admitted at accept turned out to be no client's (a decrypt side's warm
    /// session, held until its OPEN): its token goes back; its OPEN takes one ([`admit`]).
    pub fn give_back_conn(&mut self) {
        if let Some(l) = self.get_mut(Kind::Conns) {
            l.give_back(1);
        }
    }

    /// Pauses of the byte limits not yet in the metrics, by direction: (count, seconds).
    pub fn take_throttled(&mut self, dir: Flow) -> (u64, f64) {
        self.get_mut(Kind::of(dir))
            .map_or((0, 0.0), |l| std::mem::take(&mut l.unflushed))
    }

    /// Stores what each limit counted, for the rebalancer (housekeeping).
    pub fn publish(&self, slots: &[Slot; 3]) {
        for k in Kind::ALL {
            if let Some(l) = self.get(k) {
                slots[k as usize].used.store(l.used, Ordering::Relaxed);
                slots[k as usize]
                    .starved
                    .store(l.starved, Ordering::Relaxed);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The data path

/// Runs `drive`, a pass of `bev` (which reads the `dir` bytes of `tunnel`), under the tunnel's
/// byte limit, if it has one: the pass may read what the shard's bucket can spare; what it
/// does not read goes back; if it ran out, it reserves the next chunk and sleeps until the
/// bucket covers it (reading suspended, [`Suspend::Bandwidth`]: the connection is throttled,
/// not dropped; its peer's sends back up in TCP).
pub fn metered<F: Filter>(
    cx: &mut Context<'_, ShardState>,
    tunnel: TunnelIdx,
    dir: Flow,
    bev: &mut BufferEvent<F>,
    drive: impl FnOnce(&mut BufferEvent<F>, &mut Context<'_, ShardState>) -> BevEvents,
) -> BevEvents {
    let now = cx.now();
    let kind = Kind::of(dir);
    let Some(lim) = cx.state.tunnels[tunnel].rates.get_mut(kind) else {
        if bev.read_allowance().is_some() {
            // A reload lifted the limit.
            bev.set_read_allowance(None);
            bev.resume_read(cx, Suspend::Bandwidth);
        }
        return drive(bev, cx);
    };
    if !bev.is_suspended(Suspend::Bandwidth) {
        let have = bev.read_allowance().unwrap_or(0);
        let more = lim.take(now, GRANT.saturating_sub(have));
        bev.set_read_allowance(Some(have + more));
    }
    let ev = drive(bev, cx);
    let Some(lim) = cx.state.tunnels[tunnel].rates.get_mut(kind) else {
        return ev;
    };
    if !bev.is_suspended(Suspend::Bandwidth) {
        if let Some(left) = bev.read_allowance() {
            lim.give_back(left);
            bev.set_read_allowance(Some(0));
        }
    } else if !bev.is_throttled() {
        let left = bev.read_allowance().unwrap_or(0);
        let (chunk, at) = lim.reserve(now);
        bev.set_read_allowance(Some(left.saturating_add(chunk)));
        bev.throttle_until(cx, at);
    }
    ev
}

/// The connection closes: the bytes `bev` holds of its bucket go back.
pub fn release<F: Filter>(
    cx: &mut Context<'_, ShardState>,
    tunnel: TunnelIdx,
    dir: Flow,
    bev: &BufferEvent<F>,
) {
    if let (Some(lim), Some(left)) = (
        cx.state.tunnels[tunnel].rates.get_mut(Kind::of(dir)),
        bev.read_allowance(),
    ) {
        lim.give_back(left);
    }
}

/// The connection rate at accept: false (counted and logged, rate-limited) if `tunnel`'s
/// bucket on this shard is empty.
pub fn admit(cx: &mut Context<'_, ShardState>, tunnel: TunnelIdx) -> bool {
    let now = cx.now();
    let rt = &mut cx.state.tunnels[tunnel];
    if rt.rates.admit(now) {
        return true;
    }
    rt.metrics.rejected(RejectReason::Rate);
    if let Some(skipped) = cx.state.may_warn(now) {
        let rt = &cx.state.tunnels[tunnel];
        let limit = rt.cfg.rates.conns.map_or(0.0, |l| l.rate);
        tracing::warn!(tunnel = %rt.cfg.name, conn_rate = limit, skipped, "new connection refused: over the tunnel's conn_rate");
    }
    false
}

// ---------------------------------------------------------------------------------------------
// Shares

/// What one shard counted of one limit, published at its housekeeping.
#[derive(Debug, Default)]
pub struct Slot {
    used: AtomicU64,
    starved: AtomicU64,
}

/// Every shard's counts of every tunnel's limits: written by each shard for its own slots,
/// read by the control thread.
#[derive(Debug)]
pub struct RateBoard {
    shards: usize,
    /// Per tunnel, per shard.
    slots: Vec<[Slot; 3]>,
}

impl RateBoard {
    pub fn new(tunnels: usize, shards: usize) -> RateBoard {
        RateBoard {
            shards,
            slots: (0..tunnels * shards).map(|_| Default::default()).collect(),
        }
    }

    pub fn slots(&self, tunnel: usize, shard: usize) -> &[Slot; 3] {
        &self.slots[tunnel * self.shards + shard]
    }

    fn read(&self, tunnel: usize, shard: usize, k: Kind) -> (u64, u64) {
        let s = &self.slots(tunnel, shard)[k as usize];
        (
            s.used.load(Ordering::Relaxed),
            s.starved.load(Ordering::Relaxed),
        )
    }
}

/// One shard's demand on a limit over the last period.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Demand {
    /// What it used, per second.
    pub used: f64,
    /// It ran dry (a connection waited, or one was refused).
    pub hungry: bool,
}

/// The shares of `limit` for shards with these demands, adding up to `limit`: max-min fair
/// (water-filling) over what each asks — a shard that did not run dry asks for what it used
/// plus [`HEADROOM`], one that did asks for all it can get — with [`FLOOR`] of the limit,
/// split, for each; what nobody asks for is split evenly.
pub fn shares(limit: f64, demand: &[Demand]) -> Vec<f64> {
    let n = demand.len();
    if n == 0 {
        return Vec::new();
    }
    let floor = limit * FLOOR / n as f64;
    let asks: Vec<f64> = demand
        .iter()
        .map(|d| match d.hungry {
            true => f64::INFINITY,
            false => (d.used * HEADROOM).max(floor),
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| asks[a].total_cmp(&asks[b]));
    let mut out = vec![0.0; n];
    let mut left = limit;
    for (k, &i) in order.iter().enumerate() {
        let fair = left / (n - k) as f64;
        out[i] = asks[i].min(fair);
        left -= out[i];
    }
    if left > 0.0 {
        for s in &mut out {
            *s += left / n as f64;
        }
    }
    out
}

/// The control thread's side: every [`REBALANCE_EVERY`], each limited tunnel's shares from
/// what its shards published.
#[derive(Debug)]
pub struct Rebalancer {
    board: std::sync::Arc<RateBoard>,
    next: Instant,
    last: Instant,
    /// Per tunnel, per shard, per kind: the counts at the last rebalance, and the share given.
    seen: Vec<[(u64, u64, f64); 3]>,
}

/// New shares to post: (tunnel, kind, one rate per shard).
pub type NewShares = Vec<(usize, Kind, Vec<f64>)>;

impl Rebalancer {
    pub fn new(board: std::sync::Arc<RateBoard>, tunnels: &[RateLimits], now: Instant) -> Self {
        let shards = board.shards;
        let mut seen = vec![[(0, 0, 0.0); 3]; tunnels.len() * shards];
        for (t, l) in tunnels.iter().enumerate() {
            for k in Kind::ALL {
                for s in 0..shards {
                    seen[t * shards + s][k as usize].2 =
                        l.get(k).map_or(0.0, |l| l.rate / shards as f64);
                }
            }
        }
        Rebalancer {
            board,
            next: now + REBALANCE_EVERY,
            last: now,
            seen,
        }
    }

    pub fn board(&self) -> &std::sync::Arc<RateBoard> {
        &self.board
    }

    /// A reload: every limit starts again from equal shares (as the shards do); what the
    /// shards counted so far stays the baseline of the next period.
    pub fn reloaded(&mut self, tunnels: &[RateLimits], now: Instant) {
        let fresh = Rebalancer::new(self.board.clone(), tunnels, now);
        for (seen, new) in self.seen.iter_mut().zip(fresh.seen) {
            for (s, n) in seen.iter_mut().zip(new) {
                s.2 = n.2;
            }
        }
        self.next = fresh.next;
        self.last = now;
    }

    /// Whether a period has passed since the last rebalance.
    pub fn is_due(&self, now: Instant) -> bool {
        now >= self.next
    }

    /// The shares that changed by more than 1% of their limit since they were last given,
    /// when a period has passed.
    pub fn due(&mut self, tunnels: &[RateLimits], now: Instant) -> NewShares {
        if now < self.next {
            return Vec::new();
        }
        let period = now.saturating_duration_since(self.last).as_secs_f64();
        self.next = now + REBALANCE_EVERY;
        self.last = now;
        let shards = self.board.shards;
        let mut out = Vec::new();
        for (t, limits) in tunnels.iter().enumerate() {
            for k in Kind::ALL {
                let Some(limit) = limits.get(k) else {
                    continue;
                };
                let demand: Vec<Demand> = (0..shards)
                    .map(|s| {
                        let (used, starved) = self.board.read(t, s, k);
                        let seen = &mut self.seen[t * shards + s][k as usize];
                        let d = Demand {
                            used: used.saturating_sub(seen.0) as f64 / period.max(1e-3),
                            hungry: starved > seen.1,
                        };
                        (seen.0, seen.1) = (used, starved);
                        d
                    })
                    .collect();
                let new = shares(limit.rate, &demand);
                let moved = (0..shards).any(|s| {
                    (new[s] - self.seen[t * shards + s][k as usize].2).abs() > limit.rate / 100.0
                });
                if moved {
                    for (s, r) in new.iter().enumerate() {
                        self.seen[t * shards + s][k as usize].2 = *r;
                    }
                    out.push((t, k, new));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_size() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000.0, 500.0, t0);
        assert_eq!(b.take(t0, 10_000), 500, "starts full");
        assert_eq!(b.take(t0, 10_000), 0);
        assert_eq!(b.take(t0 + ms(100), 10_000), 100, "100 ms at 1000/s");
        assert_eq!(
            b.take(t0 + ms(10_000), 10_000),
            500,
            "never more than its size"
        );
        b.give_back(42);
        assert_eq!(b.take(t0 + ms(10_000), 10), 10, "what came back is there");
        assert_eq!(b.take(t0 + ms(10_000), 100), 32);
    }

    #[test]
    fn reservations_queue_behind_each_other() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000.0, 100.0, t0);
        assert_eq!(b.take(t0, 100), 100);
        // Three readers run dry at once: each waits for its own 100 tokens, in turn.
        let at: Vec<Instant> = (0..3).map(|_| b.reserve(t0, 100)).collect();
        assert_eq!(at, [t0 + ms(100), t0 + ms(200), t0 + ms(300)]);
        // Meanwhile nothing is left to take.
        assert_eq!(b.take(t0 + ms(250), 1000), 0);
        assert_eq!(
            b.take(t0 + ms(400), 1000),
            100,
            "after the debt, the refill"
        );
    }

    #[test]
    fn a_warm_sessions_token_goes_back_until_its_open_takes_one() {
        let t0 = Instant::now();
        let limits = RateLimits {
            conns: Some(Limit {
                rate: 1.0,
                burst: 1.0,
            }),
            ..RateLimits::default()
        };
        let mut r = ShardRates::new(&limits, 1, t0);
        // Accepted: a warm session, as far as anyone can tell at accept.
        assert!(r.admit(t0));
        assert!(!r.admit(t0), "the bucket is empty");
        // Held without an OPEN: not a client; its token goes back for the next client.
        r.give_back_conn();
        assert!(r.admit(t0), "its OPEN (or any client) takes it");
        assert!(!r.admit(t0));
        assert_eq!(r.get(Kind::Conns).unwrap().used, 1, "one client counted");
    }

    #[test]
    fn a_new_rate_applies_from_now_and_keeps_what_was_earned() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000.0, 10_000.0, t0);
        b.take(t0, 10_000);
        b.set(t0 + ms(100), 10.0, 10_000.0);
        // 100 earned at the old rate, then 1 s at 10/s.
        assert_eq!(b.take(t0 + ms(1100), 10_000), 110);
        b.set(t0 + ms(1100), 10.0, 5.0);
        assert_eq!(b.take(t0 + ms(60_000), 10_000), 5, "the new size caps it");
    }

    #[test]
    fn the_bytes_read_over_a_window_are_the_rate_times_the_window_plus_the_burst() {
        // A shard's bucket drained by readers that take, reserve and give back as `metered`
        // does, against a reader that always has more to read: over 10 s at 1 MB/s it reads
        // 10 MB and what the bucket held at the start, give or take a chunk.
        let t0 = Instant::now();
        let limit = Limit {
            rate: 2_000_000.0,
            burst: 200_000.0,
        };
        let mut lim = Limiter::new(limit, 2, true, t0);
        let mut read: u64 = 0;
        let mut now = t0;
        let mut allowance: u32 = 0;
        let mut wake = t0;
        let end = t0 + Duration::from_secs(10);
        while now < end {
            if now >= wake {
                // A pass: the reserved chunk and what the bucket can spare, all read (the
                // reader always has more), then a reservation and a sleep.
                allowance += lim.take(now, GRANT.saturating_sub(allowance));
                read += u64::from(allowance);
                let (chunk, at) = lim.reserve(now);
                allowance = chunk;
                wake = at;
            }
            now += ms(1);
        }
        let want = 1_000_000.0 * 10.0 + 100_000.0;
        let got = read as f64;
        assert!(
            (got - want).abs() <= CHUNK_MAX,
            "read {got}, want {want} (± a chunk)"
        );
        assert!(lim.unflushed.0 > 100, "it paused, many times");
    }

    fn d(used: f64, hungry: bool) -> Demand {
        Demand { used, hungry }
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    #[test]
    fn shares_follow_the_shards_that_ran_dry_and_add_up_to_the_limit() {
        // One connection, on shard 0: it gets all but shard 1's floor.
        let s = shares(100.0, &[d(50.0, true), d(0.0, false)]);
        assert!(close(&s, &[99.0, 1.0]), "{s:?}");
        // Both ran dry: even halves, whatever they used.
        let s = shares(100.0, &[d(70.0, true), d(30.0, true)]);
        assert!(close(&s, &[50.0, 50.0]), "{s:?}");
        // One is content with 20 (asks 25): the other gets the rest.
        let s = shares(100.0, &[d(20.0, false), d(50.0, true)]);
        assert!(close(&s, &[25.0, 75.0]), "{s:?}");
        // Nobody ran dry: each gets its use and headroom, and the rest is split evenly.
        let s = shares(100.0, &[d(10.0, false), d(30.0, false), d(0.0, false)]);
        let sum: f64 = s.iter().sum();
        assert!(
            (sum - 100.0).abs() < 1e-9 && s[1] > s[0] && s[0] > s[2],
            "{s:?}"
        );
        assert!(s[2] >= 100.0 * FLOOR / 3.0);
        // Content shards that together ask for more than the limit share it fairly.
        let s = shares(100.0, &[d(90.0, false), d(90.0, false)]);
        assert!(close(&s, &[50.0, 50.0]), "{s:?}");
    }

    #[test]
    fn the_rebalancer_moves_shares_to_where_the_traffic_is() {
        let t0 = Instant::now();
        let board = std::sync::Arc::new(RateBoard::new(1, 2));
        let limits = [RateLimits {
            upstream: Some(Limit {
                rate: 1000.0,
                burst: 1000.0,
            }),
            ..RateLimits::default()
        }];
        let mut r = Rebalancer::new(board.clone(), &limits, t0);
        assert!(r.due(&limits, t0 + ms(100)).is_empty(), "not yet a period");
        // Shard 0 used 250 and ran dry; shard 1 used nothing.
        let mut shard0 = ShardRates::new(&limits[0], 2, t0);
        let up = shard0.get_mut(Kind::Upstream).unwrap();
        up.take(t0, 250);
        up.reserve(t0);
        shard0.publish(board.slots(0, 0));
        let new = r.due(&limits, t0 + REBALANCE_EVERY);
        assert_eq!(new.len(), 1);
        let (t, k, s) = &new[0];
        assert_eq!((*t, *k), (0, Kind::Upstream));
        assert!(close(s, &[990.0, 10.0]), "{s:?}");
        // Shard 0 runs dry again: the shares stay, and nothing is posted.
        let up = shard0.get_mut(Kind::Upstream).unwrap();
        up.take(t0 + REBALANCE_EVERY, 400);
        up.reserve(t0 + REBALANCE_EVERY);
        shard0.publish(board.slots(0, 0));
        assert!(r.due(&limits, t0 + REBALANCE_EVERY * 2).is_empty());
        // Its traffic stops: the shares go back towards even halves.
        let new = r.due(&limits, t0 + REBALANCE_EVERY * 3);
        assert!(close(&new[0].2, &[500.0, 500.0]), "{new:?}");
    }
}
