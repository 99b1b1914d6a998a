//! Live upgrade with established connections (issue 17), end to end with the real binary:
//! a new process started with `--handoff` takes the listening sockets *and* every established
//! connection, with its session state, from the running one; clients, the far side of the
//! pair and the backend never notice. Every wait polls a condition with a deadline.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;

/// Children's logs go nowhere, or to files under `$SEALPIPE_TEST_LOGS` when debugging.
pub(crate) fn spawn(cmd: &mut Command) -> Proc {
    let err = match std::env::var_os("SEALPIPE_TEST_LOGS") {
        Some(d) => {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = Path::new(&d).join(format!("upgrade-{}-{n}.log", std::process::id()));
            Stdio::from(std::fs::File::create(p).unwrap())
        }
        None => Stdio::null(),
    };
    Proc(cmd.stdout(Stdio::null()).stderr(err).spawn().unwrap())
}

/// GET /metrics; None while the endpoint is not up.
pub(crate) fn scrape(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(TIMEOUT)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.contains(" 200 ").then_some(out)
}

/// Polls the metrics endpoint until `f(text)` holds; returns that text.
pub(crate) fn wait_metrics(addr: SocketAddr, what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(t) = scrape(addr) {
            if f(&t) {
                return t;
            }
        }
        assert!(Instant::now() < deadline, "metrics never showed {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn handoff_count(text: &str, result: &str) -> f64 {
    metric_in(
        text,
        "sealpipe_handoff_connections_total",
        &[("result", result)],
    )
}

/// Waits until a handoff socket exists at `path` (the process listens for a successor).
fn wait_socket(path: &Path) {
    wait_until(&format!("{} to exist", path.display()), || path.exists());
}

/// One round trip of `n` bytes of stream `seed` on an open connection.
pub(crate) fn echo(s: &mut TcpStream, seed: u64, n: usize) -> std::io::Result<()> {
    let mut out = vec![0u8; n];
    pattern(seed, 0, &mut out);
    s.write_all(&out)?;
    let mut back = vec![0u8; n];
    s.read_exact(&mut back)?;
    if back != out {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

/// A `forward` (plain relay) process's arguments.
fn forward_args(listen: SocketAddr, target: SocketAddr, m: SocketAddr, sock: &Path) -> Vec<String> {
    forward_args_to(listen, &target.to_string(), m, sock)
}

/// [`forward_args`] to a target given as the command line takes it (`unix:PATH` too).
fn forward_args_to(listen: SocketAddr, target: &str, m: SocketAddr, sock: &Path) -> Vec<String> {
    [
        "forward",
        "--listen",
        &listen.to_string(),
        "--target",
        target,
        "--threads",
        "2",
        "--metrics",
        &m.to_string(),
        // Long: an old process that kept its connections would outlive every wait here.
        "--drain-timeout",
        "120",
        "--log-level",
        "info",
        "--handoff",
        &sock.display().to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// Plain `forward` connections move too: an upgrade in the middle of their life, and they
/// echo afterwards, with the old process gone long before its drain timeout.
#[test]
fn forward_connections_move_to_the_new_process() {
    let echo_b = echo_backend();
    let (listen, m1, m2) = (free_addr(), free_addr(), free_addr());
    let sock = temp_dir("upgrade-fwd").join("h.sock");
    let mut old = spawn(sealpipe().args(forward_args(listen, echo_b.addr, m1, &sock)));
    wait_listening(listen);
    wait_socket(&sock);
    let mut conns: Vec<TcpStream> = (0..20).map(|_| connect(listen)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        echo(c, i as u64, 1000).unwrap();
    }
    // One connection with a request in flight across the upgrade: half now, half after.
    let mut busy = connect(listen);
    let mut req = vec![0u8; 200_000];
    pattern(99, 0, &mut req);
    busy.write_all(&req[..100_000]).unwrap();
    wait_until("the backend has every connection", || {
        echo_b.conns.load(Ordering::SeqCst) >= 22
    });
    let backend_conns = echo_b.conns.load(Ordering::SeqCst);
    let mut new = spawn(sealpipe().args(forward_args(listen, echo_b.addr, m2, &sock)));
    assert_eq!(
        old.wait_exit(Duration::from_secs(30)).code(),
        Some(0),
        "the old process exits once its connections moved (its drain would take 120 s)"
    );
    busy.write_all(&req[100_000..]).unwrap();
    let mut back = vec![0u8; req.len()];
    busy.read_exact(&mut back).unwrap();
    assert!(
        back == req,
        "the request across the upgrade came back whole"
    );
    for (i, c) in conns.iter_mut().enumerate() {
        echo(c, 1000 + i as u64, 5000).unwrap();
    }
    let t = wait_metrics(m2, "the moved connections", |t| {
        handoff_count(t, "moved") >= 21.0
    });
    assert_eq!(handoff_count(&t, "moved"), 21.0);
    assert_eq!(handoff_count(&t, "kept") + handoff_count(&t, "failed"), 0.0);
    // The backend saw no new connection: the same ones go on.
    assert_eq!(echo_b.conns.load(Ordering::SeqCst), backend_conns);
    new.signal("TERM");
    drop(conns);
    drop(busy);
    assert_eq!(new.wait_exit(TIMEOUT).code(), Some(0));
}

/// A backend on a Unix socket at `path` that echoes every connection; counts those that
/// carried bytes (health probes connect and close).
fn unix_echo_backend(path: &Path) -> Arc<AtomicUsize> {
    let l = std::os::unix::net::UnixListener::bind(path).unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let seen = conns.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut buf = vec![0u8; 64 * 1024];
                let mut first = true;
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    if std::mem::take(&mut first) {
                        seen.fetch_add(1, Ordering::SeqCst);
                    }
                    if w.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
    conns
}

/// Connections whose backend is a Unix socket (`--target unix:PATH`) move too: the
/// successor takes each upstream as the Unix stream it is, and they echo afterwards through
/// the same backend connections.
#[test]
fn connections_to_a_unix_target_move_too() {
    let dir = temp_dir("upgrade-unix");
    let backend = dir.join("backend.sock");
    let seen = unix_echo_backend(&backend);
    let target = format!("unix:{}", backend.display());
    let (listen, m1, m2) = (free_addr(), free_addr(), free_addr());
    let sock = dir.join("h.sock");
    let mut old = spawn(sealpipe().args(forward_args_to(listen, &target, m1, &sock)));
    wait_listening(listen);
    wait_socket(&sock);
    let mut conns: Vec<TcpStream> = (0..6).map(|_| connect(listen)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        echo(c, i as u64, 1000).unwrap();
    }
    assert_eq!(seen.load(Ordering::SeqCst), 6);
    let mut new = spawn(sealpipe().args(forward_args_to(listen, &target, m2, &sock)));
    let t = wait_metrics(m2, "the transfer's end", |t| {
        handoff_count(t, "moved") + handoff_count(t, "kept") + handoff_count(t, "failed") >= 6.0
    });
    assert_eq!(
        (
            handoff_count(&t, "moved"),
            handoff_count(&t, "kept") + handoff_count(&t, "failed")
        ),
        (6.0, 0.0),
        "every connection to the Unix target moved"
    );
    assert_eq!(
        old.wait_exit(Duration::from_secs(30)).code(),
        Some(0),
        "the old process exits once its connections moved (its drain would take 120 s)"
    );
    for (i, c) in conns.iter_mut().enumerate() {
        echo(c, 100 + i as u64, 5000).unwrap();
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        6,
        "the same backend connections go on"
    );
    new.signal("TERM");
    drop(conns);
    assert_eq!(new.wait_exit(TIMEOUT).code(), Some(0));
}

/// A process with a Unix listening socket refuses `--handoff` at start, saying why: the
/// handoff carries TCP listeners only (its established connections could not move without
/// the listener either).
#[test]
fn a_unix_listener_starts_under_handoff_but_refuses_to_take_over_a_running_process() {
    let dir = temp_dir("upgrade-unix-listen");
    let (listen, sock) = (dir.join("in.sock"), dir.join("h.sock"));
    let backend = echo_backend();
    let args = [
        "forward".to_string(),
        "--listen".into(),
        format!("unix:{}", listen.display()),
        "--target".into(),
        backend.addr.to_string(),
        "--handoff".into(),
        sock.display().to_string(),
    ];
    // Nothing to take over (the shipped unit always passes --handoff): it starts and serves.
    let _first = spawn(sealpipe().args(&args));
    wait_socket(&sock);
    wait_until("the Unix listener to exist", || listen.exists());
    let unix_echo = || {
        let mut c = std::os::unix::net::UnixStream::connect(&listen)?;
        c.set_read_timeout(Some(TIMEOUT))?;
        c.write_all(b"ping")?;
        let mut got = [0u8; 4];
        c.read_exact(&mut got)?;
        std::io::Result::Ok(got)
    };
    assert_eq!(unix_echo().unwrap(), *b"ping");
    // A successor cannot take a Unix listener over: it says so and exits 2, taking nothing;
    // the running process keeps serving.
    let out = sealpipe().args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("listens on a Unix socket") && err.contains("restart the process instead"),
        "{err}"
    );
    assert_eq!(
        unix_echo().unwrap(),
        *b"ping",
        "the running process still serves"
    );
}

/// More connections than a shard freezes at once (`proxy::handoff::MAX_IN_FLIGHT`, 126) move
/// in waves, all of them, with one shard on each side.
#[test]
fn many_connections_move_in_waves() {
    let _ = sealpipe::sys::raise_nofile_limit();
    let echo_b = echo_backend();
    let (listen, m1, m2) = (free_addr(), free_addr(), free_addr());
    let sock = temp_dir("upgrade-waves").join("h.sock");
    let one_shard = |m| {
        let mut a = forward_args(listen, echo_b.addr, m, &sock);
        let i = a.iter().position(|x| x == "--threads").unwrap();
        a[i + 1] = "1".into();
        a
    };
    let mut old = spawn(sealpipe().args(one_shard(m1)));
    wait_listening(listen);
    wait_socket(&sock);
    let n = 1100;
    let mut conns: Vec<TcpStream> = (0..n).map(|_| connect(listen)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        echo(c, i as u64, 10).unwrap();
    }
    wait_metrics(m1, "every connection open", |t| {
        metric_in(t, "sealpipe_connections_active", &[]) == n as f64
    });
    let mut new = spawn(sealpipe().args(one_shard(m2)));
    assert_eq!(old.wait_exit(Duration::from_secs(60)).code(), Some(0));
    let t = wait_metrics(m2, "the moved connections", |t| {
        handoff_count(t, "moved") >= n as f64
    });
    assert_eq!(handoff_count(&t, "moved"), n as f64);
    for (i, c) in conns.iter_mut().enumerate() {
        echo(c, n as u64 + i as u64, 10).unwrap();
    }
    new.signal("TERM");
    drop(conns);
    assert_eq!(new.wait_exit(TIMEOUT).code(), Some(0));
}

/// A successor that refuses some connections (here: it has room for only 4) leaves them to
/// the old process, which resumes them exactly where they were and drains them as it always
/// did: none is dropped, and every one still echoes.
#[test]
fn refused_connections_stay_and_drain_in_the_old_process() {
    let echo_b = echo_backend();
    let (listen, m1, m2) = (free_addr(), free_addr(), free_addr());
    let sock = temp_dir("upgrade-kept").join("h.sock");
    let mut old = spawn(sealpipe().args(forward_args(listen, echo_b.addr, m1, &sock)));
    wait_listening(listen);
    wait_socket(&sock);
    let mut conns: Vec<TcpStream> = (0..10).map(|_| connect(listen)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        echo(c, i as u64, 1000).unwrap();
    }
    let mut args = forward_args(listen, echo_b.addr, m2, &sock);
    args.extend(["--max-conns".to_string(), "4".to_string()]);
    let mut new = spawn(sealpipe().args(args));
    let t = wait_metrics(m2, "the transfer's end", |t| {
        handoff_count(t, "moved") + handoff_count(t, "kept") >= 10.0
    });
    assert_eq!(
        (handoff_count(&t, "moved"), handoff_count(&t, "kept")),
        (4.0, 6.0)
    );
    for (i, c) in conns.iter_mut().enumerate() {
        echo(c, 100 + i as u64, 3000).unwrap();
    }
    assert!(
        old.0.try_wait().unwrap().is_none(),
        "the old process keeps serving the connections it kept"
    );
    drop(conns);
    assert_eq!(
        old.wait_exit(TIMEOUT).code(),
        Some(0),
        "it drains them, then exits"
    );
    new.signal("TERM");
    assert_eq!(new.wait_exit(TIMEOUT).code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// The test: a pair under mixed traffic, each side upgraded while it runs

use std::net::{Shutdown, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock};

/// The test's clock origin, shared by the backend (which stamps pub/sub messages) and the
/// clients (which measure their delay): one process, one clock.
fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

fn micros_now() -> u64 {
    epoch().elapsed().as_micros() as u64
}

/// The run's shape: the CI short form by default, the long form from the script
/// (`scripts/upgrade-soak.sh`) through the environment.
struct Shape {
    secs: u64,
    rounds: usize,
    idle: usize,
    churn_per_sec: u64,
    bulk_rate: u64,
}

impl Shape {
    fn from_env() -> Shape {
        let num = |k: &str, d: u64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        Shape {
            secs: num("SEALPIPE_UPGRADE_SECS", 20),
            rounds: num("SEALPIPE_UPGRADE_ROUNDS", 1) as usize,
            idle: num("SEALPIPE_UPGRADE_IDLE", 300) as usize,
            churn_per_sec: num("SEALPIPE_UPGRADE_CHURN", 25),
            bulk_rate: num("SEALPIPE_UPGRADE_BULK_RATE", 4 << 20),
        }
    }
}

/// Everything that went wrong, by kind, with the first few messages.
#[derive(Default)]
struct Faults {
    resets: AtomicUsize,
    mismatches: AtomicUsize,
    other: AtomicUsize,
    first: Mutex<Vec<String>>,
}

impl Faults {
    fn record(&self, what: &str, e: &std::io::Error) {
        let counter = match e.kind() {
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof => &self.resets,
            std::io::ErrorKind::InvalidData => &self.mismatches,
            _ => &self.other,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        let mut f = self.first.lock().unwrap();
        if f.len() < 10 {
            f.push(format!("{what}: {e}"));
        }
    }
    fn total(&self) -> usize {
        self.resets.load(Ordering::SeqCst)
            + self.mismatches.load(Ordering::SeqCst)
            + self.other.load(Ordering::SeqCst)
    }
}

fn mismatch(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

/// Reads a `\n`-terminated line (bounded), byte by byte.
fn read_line(s: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 256 {
        s.read_exact(&mut b)?;
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(b[0]);
    }
    Err(mismatch("line too long"))
}

/// What the backend counted on a bulk connection: bytes received and verified.
#[derive(Default)]
struct Bulk {
    up_verified: AtomicU64,
}

/// The backend: a connection's first line says what it is.
/// - `ECHO`: echoes everything (idle connections, churn).
/// - `BULK seed rate`: verifies the client's stream of `pattern(seed)` to its end, and sends
///   `pattern(seed + 1)` at `rate` bytes/s until the client's end, then its own.
/// - `SUB`: a publisher: `seq micros\n` every 10 ms until the client goes.
fn backend(bulk: Arc<Bulk>, faults: Arc<Faults>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let (bulk, faults) = (bulk.clone(), faults.clone());
            std::thread::spawn(move || {
                let Ok(line) = read_line(&mut s) else { return };
                let words: Vec<&str> = line.split(' ').collect();
                match words[..] {
                    ["ECHO"] => {
                        let mut w = s.try_clone().unwrap();
                        let _ = std::io::copy(&mut s, &mut w);
                        let _ = w.shutdown(Shutdown::Write);
                    }
                    ["BULK", seed, rate] => {
                        let seed: u64 = seed.parse().unwrap();
                        let rate: u64 = rate.parse().unwrap();
                        let done = Arc::new(AtomicBool::new(false));
                        let w = s.try_clone().unwrap();
                        let writer = {
                            let done = done.clone();
                            std::thread::spawn(move || paced_writer(w, seed + 1, rate, &done))
                        };
                        let mut off = 0usize;
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut want = vec![0u8; 64 * 1024];
                        loop {
                            match s.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    pattern(seed, off, &mut want[..n]);
                                    if buf[..n] != want[..n] {
                                        faults.record("bulk up", &mismatch("bytes differ"));
                                        return;
                                    }
                                    off += n;
                                    bulk.up_verified.store(off as u64, Ordering::SeqCst);
                                }
                                Err(e) => {
                                    faults.record("bulk up (backend)", &e);
                                    return;
                                }
                            }
                        }
                        done.store(true, Ordering::SeqCst);
                        let _ = writer.join();
                    }
                    ["SUB"] => {
                        let mut seq = 0u64;
                        let start = Instant::now();
                        loop {
                            let msg = format!("{seq} {}\n", micros_now());
                            if s.write_all(msg.as_bytes()).is_err() {
                                return;
                            }
                            seq += 1;
                            // The next message's slot: every 10 ms from the start, so a
                            // stalled write is followed by the messages it held up at once.
                            let next = start + Duration::from_millis(10 * seq);
                            std::thread::sleep(next.saturating_duration_since(Instant::now()));
                        }
                    }
                    _ => {}
                }
            });
        }
    });
    addr
}

/// Writes `pattern(seed)` at about `rate` bytes/s until `done`, then shuts down writing.
/// Returns the bytes written. (The pacing keeps a debug build's CPU for the proxies.)
fn paced_writer(mut w: TcpStream, seed: u64, rate: u64, done: &AtomicBool) -> u64 {
    let start = Instant::now();
    let mut off = 0usize;
    let mut buf = vec![0u8; 32 * 1024];
    while !done.load(Ordering::SeqCst) {
        pattern(seed, off, &mut buf);
        if w.write_all(&buf).is_err() {
            return off as u64;
        }
        off += buf.len();
        let due = Duration::from_secs_f64(off as f64 / rate as f64);
        std::thread::sleep(
            due.saturating_sub(start.elapsed())
                .min(Duration::from_millis(50)),
        );
    }
    let _ = w.shutdown(Shutdown::Write);
    off as u64
}

/// A pair's process: its arguments, its handoff socket and metrics address.
struct Side {
    mode: &'static str,
    listen: SocketAddr,
    target: SocketAddr,
    metrics: SocketAddr,
    sock: PathBuf,
}

impl Side {
    fn args(&self, keys: &[&Path]) -> Vec<String> {
        let mut a: Vec<String> = [
            self.mode,
            "--listen",
            &self.listen.to_string(),
            "--target",
            &self.target.to_string(),
            "--threads",
            "2",
            "--metrics",
            &self.metrics.to_string(),
            // Long: an old process that kept its connections would outlive every wait here.
            "--drain-timeout",
            "120",
            "--log-level",
            "info",
            "--handoff",
            &self.sock.display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        for k in keys {
            a.push("--key".into());
            a.push(k.display().to_string());
        }
        a
    }

    fn start(&self, keys: &[&Path]) -> Proc {
        spawn(sealpipe().args(self.args(keys)))
    }

    /// Upgrades this side: a new process with `keys` takes over; the old one must exit 0
    /// long before its drain timeout, which it could only do if its connections moved.
    /// Returns the new process and how long the old one took to exit after the new one
    /// started.
    fn upgrade(&self, old: &mut Proc, keys: &[&Path]) -> (Proc, Duration) {
        let started = Instant::now();
        let new = self.start(keys);
        let status = old.wait_exit(Duration::from_secs(60));
        assert_eq!(status.code(), Some(0), "the old {} process", self.mode);
        (new, started.elapsed())
    }
}

/// Waits until the process behind `m` shows at least `n` hibernating connections.
fn wait_hibernating(m: SocketAddr, n: usize) {
    wait_metrics(m, "hibernating connections", |t| {
        metric_in(t, "sealpipe_connections_hibernating", &[]) >= n as f64
    });
}

#[test]
fn connections_survive_an_upgrade_of_each_side_under_mixed_traffic() {
    let _ = sealpipe::sys::raise_nofile_limit();
    let shape = Shape::from_env();
    let _ = epoch();
    let bulk = Arc::new(Bulk::default());
    let faults = Arc::new(Faults::default());
    let backend = backend(bulk.clone(), faults.clone());
    let dir = temp_dir("upgrade-pair");
    let (k1, k2) = (dir.join("k1.key"), dir.join("k2.key"));
    for k in [&k1, &k2] {
        sealpipe::keyfile::generate_key_file(k, &mut sealpipe::protocol::OsRandom).unwrap();
    }
    let dec = Side {
        mode: "decrypt",
        listen: free_addr(),
        target: backend,
        metrics: free_addr(),
        sock: dir.join("dec.sock"),
    };
    let enc = Side {
        mode: "encrypt",
        listen: free_addr(),
        target: dec.listen,
        metrics: free_addr(),
        sock: dir.join("enc.sock"),
    };
    let mut dec_p = dec.start(&[&k1]);
    let mut enc_p = enc.start(&[&k1]);
    wait_socket(&dec.sock);
    wait_socket(&enc.sock);
    wait_listening(enc.listen);
    let entry = enc.listen;
    let stop = Arc::new(AtomicBool::new(false));

    // Idle connections: one echo now, one at the end.
    let mut idle: Vec<TcpStream> = (0..shape.idle)
        .map(|i| {
            let mut c = connect(entry);
            c.write_all(b"ECHO\n").unwrap();
            echo(&mut c, i as u64, 100).unwrap();
            c
        })
        .collect();

    // A bulk stream both ways, byte-verified at both ends; the client side measures the
    // longest pause between two reads.
    let mut b = connect(entry);
    b.write_all(format!("BULK 7 {}\n", shape.bulk_rate).as_bytes())
        .unwrap();
    let bulk_writer = {
        let (w, stop) = (b.try_clone().unwrap(), stop.clone());
        let rate = shape.bulk_rate;
        std::thread::spawn(move || paced_writer(w, 7, rate, &stop))
    };
    let bulk_reader = {
        let (mut r, faults) = (b.try_clone().unwrap(), faults.clone());
        std::thread::spawn(move || {
            let (mut off, mut buf, mut want) = (0usize, vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
            let mut gaps = Vec::new();
            let mut last = Instant::now();
            loop {
                match r.read(&mut buf) {
                    Ok(0) => return (off, gaps),
                    Ok(n) => {
                        gaps.push(last.elapsed());
                        last = Instant::now();
                        pattern(8, off, &mut want[..n]);
                        if buf[..n] != want[..n] {
                            faults.record("bulk down", &mismatch("bytes differ"));
                            return (off, gaps);
                        }
                        off += n;
                    }
                    Err(e) => {
                        faults.record("bulk down", &e);
                        return (off, gaps);
                    }
                }
            }
        })
    };

    // A subscriber: every message once, in order; its delay measured.
    let subscriber = {
        let (mut s, stop, faults) = (connect(entry), stop.clone(), faults.clone());
        s.write_all(b"SUB\n").unwrap();
        std::thread::spawn(move || {
            let (mut next, mut delays) = (0u64, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                match read_line(&mut s) {
                    Ok(l) => {
                        let (seq, at) = l.split_once(' ').unwrap_or(("x", "0"));
                        let seq: u64 = seq.parse().unwrap_or(u64::MAX);
                        if seq != next {
                            faults.record(
                                "pub/sub",
                                &mismatch(&format!("message {seq} where {next} was due")),
                            );
                            return (next, delays);
                        }
                        next += 1;
                        let at: u64 = at.parse().unwrap_or(0);
                        delays.push(Duration::from_micros(micros_now().saturating_sub(at)));
                    }
                    Err(e) => {
                        faults.record("pub/sub", &e);
                        return (next, delays);
                    }
                }
            }
            (next, delays)
        })
    };

    // Churn: new connections at a steady rate, each an echo check.
    let churn_ok = Arc::new(AtomicUsize::new(0));
    let churn = {
        let (stop, ok, faults) = (stop.clone(), churn_ok.clone(), faults.clone());
        let every = Duration::from_secs_f64(1.0 / shape.churn_per_sec.max(1) as f64);
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let r = TcpStream::connect(entry).and_then(|mut c| {
                    c.set_read_timeout(Some(TIMEOUT))?;
                    c.write_all(b"ECHO\n")?;
                    echo(&mut c, u64::from(n), 100)
                });
                match r {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => faults.record("churn", &e),
                }
                n += 1;
                let due = every * n;
                std::thread::sleep(due.saturating_sub(start.elapsed()));
            }
        })
    };

    // The upgrades, spread over the middle of the run: each round the encrypt side, then
    // the decrypt side. Before each, the idle connections have hibernated: they move asleep.
    let run_start = Instant::now();
    let total = Duration::from_secs(shape.secs);
    let slots = 2 * shape.rounds.max(1);
    let mut took = Vec::new();
    let moved_min = shape.idle + 2;
    let mut dec_keys: Vec<&Path> = vec![&k1];
    let mut enc_keys: Vec<&Path> = vec![&k1];
    for u in 0..slots {
        let at = total.mul_f64(0.2 + 0.6 * u as f64 / slots as f64);
        std::thread::sleep(at.saturating_sub(run_start.elapsed()));
        let (side, p, keys) = if u % 2 == 0 {
            // Rotation, encrypt side (second round on): the new key becomes primary.
            if u / 2 == 1 {
                enc_keys = vec![&k2, &k1];
            }
            (&enc, &mut enc_p, &enc_keys)
        } else {
            // Rotation, decrypt side: the new key is accepted first, then primary.
            dec_keys = if u / 2 == 0 {
                vec![&k1, &k2]
            } else {
                vec![&k2, &k1]
            };
            (&dec, &mut dec_p, &dec_keys)
        };
        wait_hibernating(side.metrics, shape.idle);
        let (new, t) = side.upgrade(p, keys);
        *p = new;
        took.push(t);
        // The new process holds every connection: nothing refused, nothing lost.
        let text = wait_metrics(side.metrics, "the moved connections", |t| {
            handoff_count(t, "moved") >= moved_min as f64
        });
        assert_eq!(
            handoff_count(&text, "kept"),
            0.0,
            "{} refused some",
            side.mode
        );
        assert_eq!(
            handoff_count(&text, "failed"),
            0.0,
            "{} lost some",
            side.mode
        );
        assert!(
            metric_in(&text, "sealpipe_connections_hibernating", &[]) >= shape.idle as f64,
            "the idle connections arrived asleep"
        );
    }
    std::thread::sleep(total.saturating_sub(run_start.elapsed()));

    // Stop the load, and check everything.
    stop.store(true, Ordering::SeqCst);
    let sent_up = bulk_writer.join().unwrap();
    churn.join().unwrap();
    let (messages, delays) = subscriber.join().unwrap();
    let (got_down, gaps) = bulk_reader.join().unwrap();
    wait_until("the backend verified the whole upstream", || {
        bulk.up_verified.load(Ordering::SeqCst) >= sent_up || faults.total() > 0
    });
    for (i, c) in idle.iter_mut().enumerate() {
        if let Err(e) = echo(c, 10_000 + i as u64, 100) {
            faults.record("idle after the upgrades", &e);
        }
    }
    let pct = |v: &mut Vec<Duration>, p: f64| -> Duration {
        v.sort();
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let (mut gaps, mut delays) = (gaps, delays);
    let report = format!(
        "{{\"secs\":{},\"upgrades\":{},\"idle\":{},\"churn_ok\":{},\"bulk_up_bytes\":{},\"bulk_down_bytes\":{},\"messages\":{},\"bulk_gap_p99_ms\":{:.1},\"bulk_gap_max_ms\":{:.1},\"pubsub_delay_p99_ms\":{:.1},\"pubsub_delay_max_ms\":{:.1},\"old_exit_ms\":[{}]}}",
        shape.secs,
        slots,
        shape.idle,
        churn_ok.load(Ordering::SeqCst),
        sent_up,
        got_down,
        messages,
        pct(&mut gaps, 0.99).as_secs_f64() * 1e3,
        gaps.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        pct(&mut delays, 0.99).as_secs_f64() * 1e3,
        delays.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        took.iter()
            .map(|t| t.as_millis().to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    eprintln!("upgrade under mixed traffic: {report}");
    if let Some(p) = std::env::var_os("SEALPIPE_UPGRADE_REPORT") {
        std::fs::write(p, &report).unwrap();
    }
    assert_eq!(
        faults.total(),
        0,
        "resets {}, mismatches {}, other {}: {:?}",
        faults.resets.load(Ordering::SeqCst),
        faults.mismatches.load(Ordering::SeqCst),
        faults.other.load(Ordering::SeqCst),
        faults.first.lock().unwrap()
    );
    assert!(
        messages > 100 && churn_ok.load(Ordering::SeqCst) > 50,
        "{report}"
    );
    assert!(sent_up > 0 && got_down > 0, "{report}");
    enc_p.signal("TERM");
    dec_p.signal("TERM");
    drop(idle);
    drop(b);
    assert_eq!(enc_p.wait_exit(TIMEOUT).code(), Some(0));
    assert_eq!(dec_p.wait_exit(TIMEOUT).code(), Some(0));
}
