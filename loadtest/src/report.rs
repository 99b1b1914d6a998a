//! What every scenario shares: common flags, failure tallies, the progress bar, the table for
//! people, the JSON for machines, and the worker-thread runner.

use crate::metrics::{self, EndpointReport, Scraper};
use crate::sys;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Flags every scenario takes.
#[derive(clap::Args, Debug, Clone, Serialize, Default)]
pub struct Common {
    /// A sealpipe /metrics URL to scrape before and after the run (repeatable).
    #[arg(long = "metrics", value_name = "URL")]
    pub metrics: Vec<String>,
    /// Write every figure and the run's parameters to FILE as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Client event-loop threads. One leaves the other core of a 2-core box to the proxy.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub threads: u64,
    /// No progress bar even on a terminal.
    #[arg(long)]
    pub quiet: bool,
}

/// Failures by kind, with the first few messages kept for the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Failures {
    pub by_kind: BTreeMap<String, u64>,
    pub samples: Vec<String>,
}

impl Failures {
    const SAMPLES: usize = 8;

    pub fn add(&mut self, kind: &str, msg: impl std::fmt::Display) {
        *self.by_kind.entry(kind.to_string()).or_default() += 1;
        if self.samples.len() < Self::SAMPLES {
            self.samples.push(format!("{kind}: {msg}"));
        }
    }

    pub fn merge(&mut self, other: Failures) {
        for (k, v) in other.by_kind {
            *self.by_kind.entry(k).or_default() += v;
        }
        for s in other.samples {
            if self.samples.len() < Self::SAMPLES {
                self.samples.push(s);
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.by_kind.values().sum()
    }

    pub fn count(&self, kind: &str) -> u64 {
        self.by_kind.get(kind).copied().unwrap_or(0)
    }

    pub fn summary(&self) -> String {
        if self.by_kind.is_empty() {
            return "none".into();
        }
        self.by_kind
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Counters the workers bump so the progress bar can show a live rate.
#[derive(Default)]
pub struct Live {
    pub bytes: AtomicU64,
    pub ops: AtomicU64,
    pub errors: AtomicU64,
}

impl Live {
    pub fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }
    pub fn add_ops(&self, n: u64) {
        self.ops.fetch_add(n, Ordering::Relaxed);
    }
    pub fn add_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the progress line shows.
#[derive(Clone, Copy)]
pub enum Show {
    Bytes,
    Ops(&'static str),
}

/// Runs `work(i)` on `threads` scoped threads while the calling thread draws progress, and
/// returns the results in thread order. Waits on the workers' completion channel (with a timeout
/// that paces redraws), never on a fixed sleep.
pub fn run_workers<R: Send>(
    label: &str,
    threads: usize,
    expected: Duration,
    quiet: bool,
    live: &Live,
    show: Show,
    work: impl Fn(usize) -> R + Sync,
) -> Vec<R> {
    let bar = progress_bar(label, expected, quiet);
    let start = Instant::now();
    let mut results: Vec<Option<R>> = (0..threads).map(|_| None).collect();
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        for i in 0..threads {
            let tx = tx.clone();
            let work = &work;
            s.spawn(move || {
                let r = work(i);
                // The receiver lives until every worker has reported.
                let _ = tx.send((i, r));
            });
        }
        drop(tx);
        let mut done = 0;
        let (mut last_t, mut last_b, mut last_o) = (start, 0u64, 0u64);
        while done < threads {
            match rx.recv_timeout(Duration::from_millis(250)) {
                Ok((i, r)) => {
                    results[i] = Some(r);
                    done += 1;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // Every sender is gone only after all results arrived or a worker panicked; the
                // scope then re-raises the panic.
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            let (b, o) = (
                live.bytes.load(Ordering::Relaxed),
                live.ops.load(Ordering::Relaxed),
            );
            let dt = now.duration_since(last_t).as_secs_f64();
            if dt >= 0.2 {
                let msg = match show {
                    Show::Bytes => {
                        format!("{:.2} Gbit/s", crate::stats::gbit_per_s(b - last_b, dt))
                    }
                    Show::Ops(unit) => {
                        format!(
                            "{} {unit}",
                            crate::stats::fmt_rate((o - last_o) as f64 / dt)
                        )
                    }
                };
                let errs = live.errors.load(Ordering::Relaxed);
                bar.set_message(if errs > 0 {
                    format!("{msg}  errors {errs}")
                } else {
                    msg
                });
                (last_t, last_b, last_o) = (now, b, o);
            }
            bar.set_position(now.duration_since(start).as_millis() as u64);
        }
    });
    bar.finish_and_clear();
    results.into_iter().flatten().collect()
}

fn progress_bar(label: &str, expected: Duration, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(
        Some(expected.as_millis().max(1) as u64),
        ProgressDrawTarget::stderr_with_hz(4),
    );
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{label:>8} [{{bar:30}}] {{elapsed}}/{:.0}s {{msg}}",
        expected.as_secs_f64()
    )) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// One scenario's outcome: parameters, typed results, failures, server-side deltas.
#[derive(Debug, Clone, Serialize)]
pub struct Report<P: Serialize, R: Serialize> {
    pub scenario: &'static str,
    pub params: P,
    pub results: R,
    pub failures: Failures,
    pub metrics: Vec<EndpointReport>,
    /// CPU seconds the load generator itself used (all its threads), to judge its headroom.
    pub client_cpu_seconds: f64,
    pub wall_seconds: f64,
    pub ok: bool,
}

/// Measures the client's wall and CPU time around a run and scrapes metrics before and after.
pub struct Measure {
    scraper: Scraper,
    cpu0: f64,
    t0: Instant,
}

impl Measure {
    pub fn start(urls: &[String]) -> Measure {
        Measure {
            scraper: Scraper::before(urls),
            cpu0: sys::self_cpu_seconds(),
            t0: Instant::now(),
        }
    }

    pub fn finish<P: Serialize, R: Serialize>(
        self,
        scenario: &'static str,
        params: P,
        results: R,
        failures: Failures,
    ) -> Report<P, R> {
        let wall_seconds = self.t0.elapsed().as_secs_f64();
        let client_cpu_seconds = sys::self_cpu_seconds() - self.cpu0;
        let metrics = self.scraper.after();
        // A failed scrape is an error: the operator asked for server-side numbers.
        let ok = failures.total() == 0 && metrics.iter().all(|m| m.error.is_none());
        Report {
            scenario,
            params,
            results,
            failures,
            metrics,
            client_cpu_seconds,
            wall_seconds,
            ok,
        }
    }
}

impl<P: Serialize, R: Serialize> Report<P, R> {
    /// Prints the people's table (rows from the scenario) and writes JSON when asked.
    pub fn emit(&self, rows: &[(String, String)], json: Option<&PathBuf>) -> Result<()> {
        println!("== {} ==", self.scenario);
        let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0).max(12);
        for (k, v) in rows {
            println!("  {k:<w$}  {v}");
        }
        println!(
            "  {:<w$}  {:.2}s wall, {:.2}s CPU",
            "client", self.wall_seconds, self.client_cpu_seconds
        );
        println!("  {:<w$}  {}", "failures", self.failures.summary());
        for s in &self.failures.samples {
            println!("    {s}");
        }
        metrics::print_reports(&self.metrics);
        println!(
            "  {:<w$}  {}",
            "result",
            if self.ok { "OK" } else { "FAILED" }
        );
        if let Some(path) = json {
            write_json(path, self)?;
        }
        Ok(())
    }
}

pub fn write_json<T: Serialize>(path: &PathBuf, v: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// Splits `total` as evenly as possible over `parts` and returns part `i`'s share.
pub fn share(total: u64, parts: u64, i: u64) -> u64 {
    total / parts + u64::from(i < total % parts)
}

/// Worker `i` of `parts`: the index of its first connection and how many it runs.
pub fn slice(total: u64, parts: u64, i: u64) -> (u64, u64) {
    let first = (0..i).map(|j| share(total, parts, j)).sum();
    (first, share(total, parts, i))
}

/// `n` events over `secs` seconds, or 0 for an empty interval.
pub fn per_second(n: u64, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        for (t, p) in [(10, 3), (1, 4), (0, 2), (50, 1)] {
            assert_eq!((0..p).map(|i| share(t, p, i)).sum::<u64>(), t);
        }
    }

    #[test]
    fn failures_tally() {
        let mut a = Failures::default();
        a.add("reset", "x");
        let mut b = Failures::default();
        b.add("reset", "y");
        b.add("timeout", "z");
        a.merge(b);
        assert_eq!(a.total(), 3);
        assert_eq!(a.count("reset"), 2);
        assert_eq!(a.summary(), "reset=2 timeout=1");
    }
}
