//! `sealpipe demo`: a pair on loopback in one process, with a traffic check — the main job on
//! an embedded default, as README's first command shows it.
//!
//! Everything here uses the library as an operator's config would: a key file, a decrypt tunnel,
//! an encrypt tunnel, the metrics endpoint. Nothing listens beyond 127.0.0.1.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::config::{ConfigError, ConfigFile, Limits, LogConfig, MetricsConfig, Mode, TunnelFile};
use crate::keyfile::KeyError;
use crate::server::{self, ExitReason, LogControl, ServerError};

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("traffic check through the pair: {0}")]
    TrafficCheck(String),
}

/// Binds `preferred`, or any free port on loopback if it is taken.
fn pick_addr(preferred: u16) -> SocketAddr {
    let want = SocketAddr::from(([127, 0, 0, 1], preferred));
    match TcpListener::bind(want) {
        Ok(_) => want,
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 0)),
    }
}

/// Runs the demo: an echo backend, a decrypt tunnel in front of it and an encrypt tunnel in front
/// of that, in this process on loopback; prints the addresses and commands to try, runs a
/// byte-checked traffic check, then serves for `duration` (or until SIGINT/SIGTERM). `log` is
/// the process's log control (the command line sets logging up), handed to the encrypt side.
/// Returns why the encrypt side stopped (the command line turns it into the exit status).
pub fn run(duration: Option<Duration>, log: LogControl) -> Result<ExitReason, DemoError> {
    let dir = std::env::temp_dir().join(format!("sealpipe-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| DemoError::Io(format!("creating {}", dir.display()), e))?;
    let key = dir.join("demo.key");
    let _ = std::fs::remove_file(&key);
    crate::keyfile::generate_key_file(&key, &mut crate::protocol::OsRandom)?;

    // The backend: a plain echo server on its own thread.
    let io = |what: &str| {
        let what = what.to_string();
        move |e| DemoError::Io(what, e)
    };
    let backend = TcpListener::bind("127.0.0.1:0").map_err(io("binding the echo backend"))?;
    let backend_addr = backend
        .local_addr()
        .map_err(io("binding the echo backend"))?;
    std::thread::spawn(move || {
        for s in backend.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = s;
                let mut w = match r.try_clone() {
                    Ok(w) => w,
                    Err(_) => return,
                };
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });

    let entry = pick_addr(7000);
    let metrics = pick_addr(9750);
    let decrypt_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    // Start the decrypt side first: the encrypt side needs its address.
    let mk =
        |mode: Mode, name: &str, listen: SocketAddr, target: SocketAddr, keys: Vec<PathBuf>| {
            TunnelFile {
                name: Some(name.into()),
                ..TunnelFile::new(mode, listen.to_string(), vec![target.to_string()], keys)
            }
        };
    let threads = 1;
    let dec_cfg = ConfigFile {
        log: LogConfig::default(),
        metrics: MetricsConfig {
            listen: Some(metrics.to_string()),
        },
        limits: Limits {
            threads,
            drain_timeout: 2.0,
            ..Limits::default()
        },
        tunnel: vec![mk(
            Mode::Decrypt,
            "demo-decrypt",
            decrypt_listen,
            backend_addr,
            vec![key.clone()],
        )],
    }
    .validate(None)?;
    let dec = server::start(dec_cfg, None)?;
    let dec_addr = dec.listen_addrs[0];
    let metrics_addr = dec.metrics_addr;
    let enc_cfg = ConfigFile {
        log: LogConfig::default(),
        metrics: MetricsConfig::default(),
        limits: Limits {
            threads,
            drain_timeout: 2.0,
            ..Limits::default()
        },
        tunnel: vec![mk(
            Mode::Encrypt,
            "demo-encrypt",
            entry,
            dec_addr,
            vec![key.clone()],
        )],
    }
    .validate(None)?;
    let enc = server::start(enc_cfg, Some(log))?;
    let entry = enc.listen_addrs[0];

    println!("sealpipe demo — everything on loopback, in this one process:");
    println!("  echo backend       {backend_addr}");
    println!(
        "  decrypt tunnel     {dec_addr} -> {backend_addr}   (sealed records in, plaintext out)"
    );
    println!("  encrypt tunnel     {entry} -> {dec_addr}   (plaintext in, sealed records out)");
    println!("  key file           {}", key.display());
    if let Some(m) = metrics_addr {
        println!("  metrics            http://{m}/metrics   (also /healthz, /readyz)");
    }
    // `nc -q1` is Debian's netcat only; `-N` is OpenBSD's; bash's /dev/tcp needs no netcat.
    println!(
        "  try it:            exec 3<>/dev/tcp/{ip}/{port}; echo hello >&3; head -n1 <&3; exec 3>&-",
        ip = entry.ip(),
        port = entry.port()
    );
    println!(
        "                     (bash), or: echo hello | ncat {ip} {port}   or: socat - TCP:{ip}:{port}",
        ip = entry.ip(),
        port = entry.port()
    );
    println!();

    let report = traffic_check(entry).map_err(DemoError::TrafficCheck)?;
    println!("traffic check through the pair (client -> encrypt -> decrypt -> echo and back):");
    println!(
        "  bulk   {:>8.1} MiB echoed, byte-exact, {:.2} Gbit/s each way",
        report.mib, report.gbits
    );
    println!(
        "  rr     {} requests of 64 bytes, p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        report.requests, report.p50_us, report.p99_us, report.max_us
    );
    println!();
    match duration {
        Some(d) => println!("serving for {:.0} s more (or Ctrl-C)", d.as_secs_f64()),
        None => println!("serving until Ctrl-C"),
    }
    let stop = duration.unwrap_or(Duration::MAX / 4);
    // This thread drives the encrypt side (signals, reload, drain); the decrypt side drains
    // once the encrypt side has gone, as a pair is stopped in production: the other way round,
    // the encrypt side would see its warm sessions closed and its target refuse new ones.
    let reason = enc.wait(Some(stop))?;
    let _ = dec.wait(Some(Duration::ZERO));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(reason)
}

struct Report {
    mib: f64,
    gbits: f64,
    requests: usize,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

fn traffic_check(entry: SocketAddr) -> Result<Report, String> {
    check(entry).map_err(|e| e.to_string())
}

/// Why the traffic check failed: the socket's error, or what the bytes were.
#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Data(String),
}

fn check(entry: SocketAddr) -> Result<Report, CheckError> {
    // Bulk: 64 MiB of a deterministic pattern, echoed back and compared.
    const BULK: usize = 64 << 20;
    let s = TcpStream::connect(entry)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut w = s.try_clone()?;
    let started = Instant::now();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut block = vec![0u8; 64 * 1024];
        let mut off = 0usize;
        while off < BULK {
            for (i, b) in block.iter_mut().enumerate() {
                *b = ((off + i) % 251) as u8;
            }
            w.write_all(&block)?;
            off += block.len();
        }
        w.shutdown(std::net::Shutdown::Write)
    });
    let mut r = s;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            if *b != ((got + i) % 251) as u8 {
                return Err(CheckError::Data(format!(
                    "byte {} differs after the round trip",
                    got + i
                )));
            }
        }
        got += n;
    }
    writer
        .join()
        .map_err(|_| CheckError::Data("the writer thread panicked".into()))??;
    let secs = started.elapsed().as_secs_f64();
    if got != BULK {
        return Err(CheckError::Data(format!("echoed {got} bytes of {BULK}")));
    }
    // Request/response: 2,000 small round trips on one connection.
    let mut s = TcpStream::connect(entry)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut lat = Vec::with_capacity(2000);
    let req = [7u8; 64];
    let mut resp = [0u8; 64];
    for _ in 0..2000 {
        let t = Instant::now();
        s.write_all(&req)?;
        s.read_exact(&mut resp)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    Ok(Report {
        mib: (BULK >> 20) as f64,
        gbits: BULK as f64 * 8.0 / secs / 1e9,
        requests: lat.len(),
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        max_us: lat[lat.len() - 1],
    })
}
