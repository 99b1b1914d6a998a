//! Timer wheel micro-benchmarks: the idle-timeout re-arm pattern (cancel + insert, and reset)
//! at 10k and 100k live timers, and expiry throughput.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sealpipe_reactor::timer::{TimerKey, TimerWheel};

/// A small deterministic generator, so runs are comparable.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn filled(n: usize, t0: Instant, rng: &mut XorShift) -> (TimerWheel<usize>, Vec<TimerKey>) {
    let mut w = TimerWheel::new(t0);
    let keys = (0..n)
        .map(|i| w.insert(t0 + Duration::from_millis(rng.next() % 60_000), i))
        .collect();
    (w, keys)
}

fn rearm(c: &mut Criterion) {
    let mut g = c.benchmark_group("timer");
    for n in [10_000usize, 100_000] {
        let t0 = Instant::now();
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let (mut w, mut keys) = filled(n, t0, &mut rng);
        let mut i = 0;
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("cancel_insert", n), &n, |b, &n| {
            b.iter(|| {
                i = (i + 1) % n;
                let v = w.cancel(keys[i]);
                let deadline = t0 + Duration::from_millis(rng.next() % 60_000);
                keys[i] = w.insert(deadline, black_box(v.unwrap_or(i)));
            })
        });
        g.bench_with_input(BenchmarkId::new("reset", n), &n, |b, &n| {
            b.iter(|| {
                i = (i + 1) % n;
                let deadline = t0 + Duration::from_millis(rng.next() % 60_000);
                black_box(w.reset(keys[i], deadline));
            })
        });
    }
    g.finish();
}

fn expire(c: &mut Criterion) {
    let mut g = c.benchmark_group("timer");
    let n = 100_000;
    g.throughput(Throughput::Elements(n as u64));
    // 100k timers spread over 60 s, expired by a loop ticking every millisecond.
    g.bench_function("expire_100k_over_60s_1ms_steps", |b| {
        let t0 = Instant::now();
        let mut out = Vec::with_capacity(1024);
        b.iter_batched_ref(
            || filled(n, t0, &mut XorShift(42)).0,
            |w| {
                let mut fired = 0;
                for ms in 0..=60_000 {
                    w.expire(t0 + Duration::from_millis(ms), &mut out);
                    fired += out.len();
                    out.clear();
                }
                assert_eq!(fired, n);
            },
            BatchSize::LargeInput,
        )
    });
    // The same timers, expired in one call an hour later.
    g.bench_function("expire_100k_one_call", |b| {
        let t0 = Instant::now();
        let mut out = Vec::with_capacity(n);
        b.iter_batched_ref(
            || filled(n, t0, &mut XorShift(42)).0,
            |w| {
                w.expire(t0 + Duration::from_secs(3600), &mut out);
                assert_eq!(out.len(), n);
                out.clear();
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, rearm, expire);
criterion_main!(benches);
