//! `loadtest`: the load generator and built-in backend for sealpipe.
//!
//! Scenarios (`bulk`, `rr`, `churn`, `connect`, `idle`) each run a fixed time on mio event loops over plain
//! threads, print a table for people, optionally write JSON, and exit 0 only when nothing failed
//! and no byte was wrong. `suite` runs them all direct and through sealpipe and prints ratios.
//!
//! Modules: `pattern` (verifiable byte streams), `stats` (percentiles), `metrics` (Prometheus
//! scrape), `report` (shared flags, tallies, progress, output), `net` (socket helpers), `sys`
//! (the only unsafe code: rlimit, rusage), `procfs` (RSS and CPU of other processes), one module
//! per scenario, and `suite`.
#![deny(unsafe_code)]

mod backend;
mod bulk;
mod churn;
mod connect;
mod idle;
mod metrics;
mod net;
mod pattern;
mod procfs;
mod report;
mod rr;
mod stats;
mod suite;
mod sys;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(version, about = "Load generator and built-in backend for sealpipe")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve echo, sink or source on an address until killed (or --duration).
    Backend(backend::BackendArgs),
    /// Throughput with every byte verified.
    Bulk(bulk::BulkArgs),
    /// Request/response rate and latency percentiles (closed or open loop).
    Rr(rr::RrArgs),
    /// New connections per second, each with one small verified exchange.
    Churn(churn::ChurnArgs),
    /// Time from connect() to the first echoed byte, one connection at a time or a few at once.
    Connect(connect::ConnectArgs),
    /// Hold many idle connections, check they all still echo, report proxies' RSS.
    Idle(idle::IdleArgs),
    /// All scenarios direct, through sealpipe forward and through a sealpipe pair, with ratios.
    Suite(suite::SuiteArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadtest: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Ok(true) when the run had no failures.
fn run(cmd: Cmd) -> anyhow::Result<bool> {
    let pattern = pattern::Pattern::new();
    match cmd {
        Cmd::Backend(a) => backend::run(&a).map(|()| true),
        Cmd::Bulk(a) => {
            let rep = bulk::run(&a, &pattern)?;
            rep.emit(&bulk::rows(&rep), a.common.json.as_ref())?;
            Ok(rep.ok)
        }
        Cmd::Rr(a) => {
            let rep = rr::run(&a, &pattern)?;
            rep.emit(&rr::rows(&rep), a.common.json.as_ref())?;
            Ok(rep.ok)
        }
        Cmd::Churn(a) => {
            let rep = churn::run(&a, &pattern)?;
            rep.emit(&churn::rows(&rep), a.common.json.as_ref())?;
            Ok(rep.ok)
        }
        Cmd::Connect(a) => {
            let rep = connect::run(&a, &pattern)?;
            rep.emit(&connect::rows(&rep), a.common.json.as_ref())?;
            Ok(rep.ok)
        }
        Cmd::Idle(a) => {
            let rep = idle::run(&a, &pattern)?;
            rep.emit(&idle::rows(&rep), a.common.json.as_ref())?;
            Ok(rep.ok)
        }
        Cmd::Suite(a) => suite::run(&a, &pattern),
    }
}
