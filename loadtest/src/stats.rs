//! Latency percentiles and the small numeric helpers every scenario reports with.
//!
//! Latencies are recorded in nanoseconds into an HdrHistogram (3 significant digits, so any
//! percentile is within 0.1% of the true value, in constant memory) and reported in
//! microseconds. Each worker thread owns its histogram; they are merged once at the end, so the
//! hot path never shares a cache line.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::time::Duration;

/// Largest latency a histogram can hold; longer samples are clamped (and still show as max).
const MAX_NS: u64 = 120_000_000_000;

/// A histogram of nanoseconds with the bounds every scenario uses.
pub fn new_histogram() -> Histogram<u64> {
    // The bounds are constants that HdrHistogram accepts; failure here is a programming error.
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid histogram bounds")
}

/// Records one sample, clamping to the histogram's range instead of dropping it.
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let ns = (d.as_nanos().min(MAX_NS as u128) as u64).max(1);
    h.saturating_record(ns);
}

/// What people and JSON see of a latency distribution, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl LatencySummary {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencySummary {
            count: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }

    /// "p50/p90/p99/p99.9/max" in the unit that keeps the numbers short.
    pub fn short(&self) -> String {
        if self.count == 0 {
            return "-".into();
        }
        format!(
            "{} / {} / {} / {} / {}",
            fmt_us(self.p50_us),
            fmt_us(self.p90_us),
            fmt_us(self.p99_us),
            fmt_us(self.p999_us),
            fmt_us(self.max_us)
        )
    }
}

/// A duration given in microseconds, as people read it.
pub fn fmt_us(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.2}s", us / 1_000_000.0)
    } else if us >= 1000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{us:.1}us")
    }
}

/// A count per second with a k/M suffix.
pub fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.1}k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

/// Bytes over seconds as Gbit/s.
pub fn gbit_per_s(bytes: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        bytes as f64 * 8.0 / secs / 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = new_histogram();
        // 1..=1000 microseconds, once each.
        for us in 1..=1000u64 {
            record(&mut h, Duration::from_micros(us));
        }
        let s = LatencySummary::from_histogram(&h);
        assert_eq!(s.count, 1000);
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.002 + 0.01;
        assert!(close(s.p50_us, 500.0), "p50 {}", s.p50_us);
        assert!(close(s.p90_us, 900.0), "p90 {}", s.p90_us);
        assert!(close(s.p99_us, 990.0), "p99 {}", s.p99_us);
        assert!(close(s.p999_us, 999.0), "p99.9 {}", s.p999_us);
        assert!(close(s.max_us, 1000.0), "max {}", s.max_us);
        assert!(close(s.mean_us, 500.5), "mean {}", s.mean_us);
    }

    #[test]
    fn merged_histograms_and_tail_outliers() {
        let mut a = new_histogram();
        let mut b = new_histogram();
        for _ in 0..9990 {
            record(&mut a, Duration::from_micros(100));
        }
        for _ in 0..10 {
            record(&mut b, Duration::from_millis(50));
        }
        record(&mut b, Duration::from_secs(1000)); // clamped, not dropped
        a.add(&b).unwrap();
        let s = LatencySummary::from_histogram(&a);
        assert_eq!(s.count, 10_001);
        assert!((s.p99_us - 100.0).abs() < 0.2);
        assert!((s.p999_us - 50_000.0).abs() < 50.0, "p99.9 {}", s.p999_us);
        assert!(s.max_us >= 119_000_000.0);
    }

    #[test]
    fn empty_and_formatting() {
        let s = LatencySummary::from_histogram(&new_histogram());
        assert_eq!(s.count, 0);
        assert_eq!(s.short(), "-");
        assert_eq!(fmt_us(12.34), "12.3us");
        assert_eq!(fmt_us(2500.0), "2.50ms");
        assert_eq!(fmt_rate(89_500.0), "89.5k");
        assert!((gbit_per_s(1_250_000_000, 1.0) - 10.0).abs() < 1e-9);
    }
}
