//! Live upgrade with established connections (issue 17), end to end with the real binary:
//! a new process started with `--handoff` takes the listening sockets *and* every established
//! connection, with its session state, from the running one; clients, the far side of the
//! pair and the backend never notice. Every wait polls a condition with a deadline.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;

/// Children's logs go nowhere, or to files under `$SEALPIPE_TEST_LOGS` when debugging.
fn spawn(cmd: &mut Command) -> Proc {
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
fn scrape(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(TIMEOUT)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.contains(" 200 ").then_some(out)
}

/// Polls the metrics endpoint until `f(text)` holds; returns that text.
fn wait_metrics(addr: SocketAddr, what: &str, f: impl Fn(&str) -> bool) -> String {
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

fn handoff_count(text: &str, result: &str) -> f64 {
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
fn echo(s: &mut TcpStream, seed: u64, n: usize) -> std::io::Result<()> {
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
    [
        "forward",
        "--listen",
        &listen.to_string(),
        "--target",
        &target.to_string(),
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
