//! `suite`: every scenario direct, through `sealpipe forward`, and through an encrypt/decrypt
//! pair, in one run, with the ratio to direct. README's Performance section is made from this.
//!
//! It starts its own processes (the built-in backend as a child `loadtest backend`, and the
//! sealpipe processes from the built binary), keeps them in a guard that kills exactly those
//! PIDs when the suite ends, also on error, and waits for each to accept connections by polling
//! with a deadline, never by sleeping a fixed time.

use crate::bulk::{self, BulkArgs, Direction};
use crate::churn::{self, ChurnArgs};
use crate::idle::{self, IdleArgs};
use crate::pattern::Pattern;
use crate::procfs;
use crate::report::{Common, write_json};
use crate::rr::{self, RrArgs};
use crate::stats::fmt_rate;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum PathKind {
    /// Client straight to the backend: the ceiling.
    Direct,
    /// One plaintext `sealpipe forward` hop.
    Forward,
    /// `sealpipe encrypt` -> `sealpipe decrypt` -> backend.
    Pair,
}

/// `loadtest suite` flags.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct SuiteArgs {
    /// Write every figure of every run to FILE as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the summary table to FILE as Markdown.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// The sealpipe binary to test.
    #[arg(long, default_value = "./target/release/sealpipe")]
    pub sealpipe: PathBuf,
    /// Short runs (about 1.5 s each, 2,000 idle connections) for a quick look or CI.
    #[arg(long)]
    pub quick: bool,
    /// Which paths to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,forward,pair"
    )]
    pub paths: Vec<PathKind>,
    /// Client threads for every scenario.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub threads: u64,
    /// Override the seconds each scenario runs.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Override the number of idle connections.
    #[arg(long)]
    pub idle_conns: Option<u64>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// Kills and reaps the processes the suite started (only those), however the suite ends.
#[derive(Default)]
struct Children(Vec<(String, Child)>);

impl Children {
    fn pid(&self, name: &str) -> Option<u32> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, c)| c.id())
    }

    /// Fails if any child has exited (it should serve until the suite ends).
    fn check_alive(&mut self, dir: &Path) -> Result<()> {
        for (name, c) in &mut self.0 {
            if let Some(status) = c.try_wait()? {
                bail!(
                    "{name} exited early ({status}); its log:\n{}",
                    log_tail(&dir.join(format!("{name}.log")))
                );
            }
        }
        Ok(())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn log_tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A port that was free a moment ago (the listener is closed before the child binds it).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls a TCP connect until it succeeds, a child dies, or the deadline passes.
fn wait_listening(addr: SocketAddr, children: &mut Children, dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        children.check_alive(dir)?;
        if Instant::now() >= deadline {
            bail!("nothing listens on {addr} after 15 s");
        }
        // Not a synchronisation sleep: a short back-off between connect probes.
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(children: &mut Children, dir: &Path, name: &str, cmd: &mut Command) -> Result<()> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name}: {cmd:?}"))?;
    children.0.push((name.to_string(), child));
    Ok(())
}

/// One path's figures, as the table shows them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    pub bulk_gbit_per_s: f64,
    pub bulk_proxy_cpu_s_per_gib: Option<f64>,
    pub rr1_req_per_s: f64,
    pub rr1_p99_us: f64,
    pub rr50_req_per_s: f64,
    pub rr50_p99_us: f64,
    pub churn_conns_per_s: f64,
    pub churn_connect_p99_us: f64,
    pub idle_ok: u64,
    pub idle_kib_per_conn: Option<f64>,
    pub ok: bool,
}

#[derive(Serialize)]
struct PathRun {
    path: PathKind,
    target: String,
    metrics: Vec<String>,
    pids: Vec<u32>,
    figures: Figures,
    runs: Vec<serde_json::Value>,
}

pub fn run(args: &SuiteArgs, pattern: &Pattern) -> Result<bool> {
    let duration = args.duration.unwrap_or(if args.quick { 1.5 } else { 5.0 });
    let wanted = args
        .idle_conns
        .unwrap_or(if args.quick { 2000 } else { 10_000 });
    let hold = if args.quick { 1.0 } else { 3.0 };
    // A proxy holds two fds per connection; children inherit the limit raised here.
    let limit = crate::sys::raise_nofile(wanted * 2 + 1024)?;
    let fits = limit.saturating_sub(1024) / 2;
    let idle_conns = if args.idle_conns.is_none() && wanted > fits {
        // The default must pass on the machine it runs on: size it to the fds we may have.
        eprintln!(
            "loadtest suite: fd limit {limit} fits {fits} idle connections through a proxy, not {wanted}; using {fits} (raise the hard limit, or pass --idle-conns)"
        );
        fits
    } else {
        if limit < wanted * 2 + 256 {
            eprintln!(
                "loadtest suite: warning: fd limit {limit} is low for {wanted} idle connections through a proxy"
            );
        }
        wanted
    };
    let needs_sealpipe = args.paths.iter().any(|p| *p != PathKind::Direct);
    if needs_sealpipe && !args.sealpipe.is_file() {
        bail!(
            "sealpipe binary not found at {} (build it with `cargo build --release`, pass \
             --sealpipe PATH, or run only `--paths direct`)",
            args.sealpipe.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("loadtest-suite-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut children = Children::default();

    // The backend: a child process, so its CPU and memory are its own.
    let exe = std::env::current_exe()?;
    let mut backend = Command::new(&exe)
        .args(["backend", "--mode", "echo", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the backend")?;
    let stdout = backend.stdout.take();
    children.0.push(("backend".into(), backend));
    let mut line = String::new();
    if let Some(out) = stdout {
        // The backend prints its bound address first; EOF here means it died.
        BufReader::new(out).read_line(&mut line)?;
    }
    let backend_addr: SocketAddr = line
        .split_whitespace()
        .nth(4)
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("backend did not announce its address: {line:?}"))?;

    let mut plan: Vec<(PathKind, SocketAddr, Vec<String>, Vec<u32>)> = Vec::new();
    for &path in &args.paths {
        match path {
            PathKind::Direct => plan.push((
                path,
                backend_addr,
                vec![],
                children.pid("backend").into_iter().collect(),
            )),
            PathKind::Forward => {
                let p = free_port()?;
                spawn(
                    &mut children,
                    &dir,
                    "forward",
                    Command::new(&args.sealpipe).args([
                        "forward",
                        "--listen",
                        &format!("127.0.0.1:{p}"),
                        "--target",
                        &backend_addr.to_string(),
                        "--threads",
                        "1",
                    ]),
                )?;
                let addr: SocketAddr = ([127, 0, 0, 1], p).into();
                wait_listening(addr, &mut children, &dir)?;
                plan.push((
                    path,
                    addr,
                    vec![],
                    children.pid("forward").into_iter().collect(),
                ));
            }
            PathKind::Pair => {
                let key = dir.join("k.key");
                let status = Command::new(&args.sealpipe)
                    .args(["keygen", "--out"])
                    .arg(&key)
                    .status()
                    .context("running sealpipe keygen")?;
                if !status.success() {
                    bail!("sealpipe keygen failed: {status}");
                }
                let (p1, p2, m1, m2) = (free_port()?, free_port()?, free_port()?, free_port()?);
                let key = key.to_string_lossy().into_owned();
                spawn(
                    &mut children,
                    &dir,
                    "decrypt",
                    Command::new(&args.sealpipe).args([
                        "decrypt",
                        "--listen",
                        &format!("127.0.0.1:{p1}"),
                        "--target",
                        &backend_addr.to_string(),
                        "--key",
                        &key,
                        "--threads",
                        "1",
                        "--metrics",
                        &format!("127.0.0.1:{m1}"),
                    ]),
                )?;
                spawn(
                    &mut children,
                    &dir,
                    "encrypt",
                    Command::new(&args.sealpipe).args([
                        "encrypt",
                        "--listen",
                        &format!("127.0.0.1:{p2}"),
                        "--target",
                        &format!("127.0.0.1:{p1}"),
                        "--key",
                        &key,
                        "--threads",
                        "1",
                        "--metrics",
                        &format!("127.0.0.1:{m2}"),
                    ]),
                )?;
                for port in [p1, p2, m1, m2] {
                    wait_listening(([127, 0, 0, 1], port).into(), &mut children, &dir)?;
                }
                let pids = ["encrypt", "decrypt"]
                    .iter()
                    .filter_map(|n| children.pid(n))
                    .collect();
                plan.push((
                    path,
                    ([127, 0, 0, 1], p2).into(),
                    vec![
                        format!("http://127.0.0.1:{m2}/metrics"),
                        format!("http://127.0.0.1:{m1}/metrics"),
                    ],
                    pids,
                ));
            }
        }
    }

    let mut results = Vec::new();
    for (path, addr, metrics, pids) in plan {
        println!("### path {path:?} -> {addr}");
        let common = Common {
            metrics: metrics.clone(),
            json: None,
            threads: args.threads,
            quiet: args.quiet,
        };
        let target = addr.to_string();
        let mut f = Figures {
            ok: true,
            ..Default::default()
        };
        let mut runs = Vec::new();

        let cpu0: Option<f64> = pids.iter().map(|&p| procfs::cpu_seconds(p)).sum();
        let b = bulk::run(
            &BulkArgs {
                target: target.clone(),
                conns: 1,
                duration,
                direction: Direction::Both,
                chunk: 256 * 1024,
                common: common.clone(),
            },
            pattern,
        )?;
        let cpu1: Option<f64> = pids.iter().map(|&p| procfs::cpu_seconds(p)).sum();
        b.emit(&bulk::rows(&b), None)?;
        f.bulk_gbit_per_s = b.results.gbit_per_s_down;
        let gib = (b.results.bytes_up + b.results.bytes_down) as f64 / (1u64 << 30) as f64;
        if path != PathKind::Direct && gib > 0.0 {
            f.bulk_proxy_cpu_s_per_gib = cpu0.zip(cpu1).map(|(a, z)| (z - a) / gib);
        }
        f.ok &= b.ok;
        runs.push(serde_json::to_value(&b)?);

        for conns in [1u64, 50] {
            let r = rr::run(
                &RrArgs {
                    target: target.clone(),
                    conns,
                    size: 64,
                    rate: None,
                    duration,
                    common: common.clone(),
                },
                pattern,
            )?;
            r.emit(&rr::rows(&r), None)?;
            if conns == 1 {
                (f.rr1_req_per_s, f.rr1_p99_us) =
                    (r.results.requests_per_s, r.results.latency.p99_us);
            } else {
                (f.rr50_req_per_s, f.rr50_p99_us) =
                    (r.results.requests_per_s, r.results.latency.p99_us);
            }
            f.ok &= r.ok;
            runs.push(serde_json::to_value(&r)?);
        }

        // Asked for more than loopback can give: the achieved rate is the capacity.
        let c = churn::run(
            &ChurnArgs {
                target: target.clone(),
                rate: 50_000.0,
                duration,
                size: 32,
                timeout: 2.0,
                max_inflight: 64,
                common: common.clone(),
            },
            pattern,
        )?;
        c.emit(&churn::rows(&c), None)?;
        f.churn_conns_per_s = c.results.conns_per_s;
        f.churn_connect_p99_us = c.results.connect.p99_us;
        f.ok &= c.ok;
        runs.push(serde_json::to_value(&c)?);

        let i = idle::run(
            &IdleArgs {
                target: target.clone(),
                conns: idle_conns,
                hold,
                pids: pids.clone(),
                concurrency: 128,
                phase_timeout: 60.0,
                common: common.clone(),
            },
            pattern,
        )?;
        i.emit(&idle::rows(&i), None)?;
        f.idle_ok = i.results.checked_ok;
        if path != PathKind::Direct {
            f.idle_kib_per_conn = Some(i.results.rss.iter().map(|r| r.kib_per_conn).sum());
        }
        f.ok &= i.ok;
        runs.push(serde_json::to_value(&i)?);

        children.check_alive(&dir)?;
        results.push(PathRun {
            path,
            target,
            metrics,
            pids,
            figures: f,
            runs,
        });
    }
    drop(children);
    let _ = std::fs::remove_dir_all(&dir);

    let table = markdown_table(&results, duration, idle_conns);
    println!("\n{table}");
    if let Some(p) = &args.markdown {
        std::fs::write(p, &table).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &args.json {
        #[derive(Serialize)]
        struct Out<'a> {
            params: &'a SuiteArgs,
            duration: f64,
            idle_conns: u64,
            paths: &'a [PathRun],
        }
        write_json(
            p,
            &Out {
                params: args,
                duration,
                idle_conns,
                paths: &results,
            },
        )?;
    }
    let ok = results.iter().all(|r| r.figures.ok);
    println!("suite: {}", if ok { "OK" } else { "FAILED" });
    Ok(ok)
}

/// The people's table: one row per figure, one column per path, ratios to direct.
fn markdown_table(results: &[PathRun], duration: f64, idle_conns: u64) -> String {
    type Get = fn(&Figures) -> Option<f64>;
    type Row = (&'static str, Get, fn(f64) -> String);
    let rows: [Row; 10] = [
        (
            "bulk Gbit/s each way (1 conn, echo)",
            |f| Some(f.bulk_gbit_per_s),
            |v| format!("{v:.2}"),
        ),
        (
            "bulk proxy CPU s/GiB",
            |f| f.bulk_proxy_cpu_s_per_gib,
            |v| format!("{v:.2}"),
        ),
        (
            "rr req/s (1 conn, 64 B)",
            |f| Some(f.rr1_req_per_s),
            fmt_rate,
        ),
        (
            "rr p99 us (1 conn)",
            |f| Some(f.rr1_p99_us),
            |v| format!("{v:.1}"),
        ),
        (
            "rr req/s (50 conns, 64 B)",
            |f| Some(f.rr50_req_per_s),
            fmt_rate,
        ),
        (
            "rr p99 us (50 conns)",
            |f| Some(f.rr50_p99_us),
            |v| format!("{v:.1}"),
        ),
        ("churn conn/s", |f| Some(f.churn_conns_per_s), fmt_rate),
        (
            "churn connect p99 us",
            |f| Some(f.churn_connect_p99_us),
            |v| format!("{v:.1}"),
        ),
        (
            "idle conns still echoing",
            |f| Some(f.idle_ok as f64),
            |v| format!("{v:.0}"),
        ),
        (
            "idle proxy KiB/conn (RSS)",
            |f| f.idle_kib_per_conn,
            |v| format!("{v:.1}"),
        ),
    ];
    let direct = results.iter().find(|r| r.path == PathKind::Direct);
    let mut s = format!(
        "loadtest suite: {duration} s per scenario, {idle_conns} idle connections, all on 127.0.0.1\n\n| figure |"
    );
    for r in results {
        s += &format!(" {:?} |", r.path).to_lowercase();
        if r.path != PathKind::Direct && direct.is_some() {
            s += " ratio |";
        }
    }
    s += "\n|---|";
    for r in results {
        s += "---|";
        if r.path != PathKind::Direct && direct.is_some() {
            s += "---|";
        }
    }
    s += "\n";
    for (name, get, fmt) in rows {
        s += &format!("| {name} |");
        for r in results {
            let v = get(&r.figures);
            s += &format!(" {} |", v.map_or("-".into(), fmt));
            if r.path != PathKind::Direct
                && let Some(d) = direct
            {
                let ratio = match (v, get(&d.figures)) {
                    (Some(v), Some(d)) if d > 0.0 => format!("{:.2}", v / d),
                    _ => "-".into(),
                };
                s += &format!(" {ratio} |");
            }
        }
        s += "\n";
    }
    s += "| all checks passed |";
    for r in results {
        s += if r.figures.ok { " yes |" } else { " NO |" };
        if r.path != PathKind::Direct && direct.is_some() {
            s += " |";
        }
    }
    s + "\n"
}
