//! Helpers shared by the integration tests: key files, in-process tunnels, echo backends,
//! man-in-the-middle relays. Everything on 127.0.0.1; every wait has a deadline.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sealpipe::config::{Config, ConfigFile, Limits, LogConfig, MetricsConfig, Mode, TunnelFile};
use sealpipe::server::{self, Running};

pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A fresh directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "sealpipe-test-{}-{}-{}",
        std::process::id(),
        tag,
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn keygen(tag: &str) -> PathBuf {
    let p = temp_dir(tag).join("k.key");
    sealpipe::keyfile::generate_key_file(&p, &mut sealpipe::protocol::OsRandom).unwrap();
    p
}

pub fn tunnel(mode: Mode, targets: &[SocketAddr], keys: &[PathBuf]) -> TunnelFile {
    TunnelFile::new(
        mode,
        "127.0.0.1:0".into(),
        targets.iter().map(|a| a.to_string()).collect(),
        keys.to_vec(),
    )
}

pub fn config(t: TunnelFile, limits: Limits) -> Config {
    ConfigFile {
        log: LogConfig::default(),
        metrics: MetricsConfig::default(),
        limits,
        tunnel: vec![t],
    }
    .validate(None)
    .unwrap()
}

pub fn limits() -> Limits {
    Limits {
        threads: 1,
        ..Limits::default()
    }
}

/// Starts one tunnel in this process; returns its listen address and the server.
pub fn start(t: TunnelFile, l: Limits) -> (SocketAddr, Running) {
    let r = server::start(config(t, l), None).unwrap();
    (r.listen_addrs[0], r)
}

/// A backend that echoes every connection; counts connections and bytes.
pub struct Echo {
    pub addr: SocketAddr,
    pub conns: Arc<AtomicUsize>,
    pub bytes: Arc<AtomicUsize>,
}

pub fn echo_backend() -> Echo {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let bytes = Arc::new(AtomicUsize::new(0));
    let (c, b) = (conns.clone(), bytes.clone());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            c.fetch_add(1, Ordering::SeqCst);
            let b = b.clone();
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            b.fetch_add(n, Ordering::SeqCst);
                            if w.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
    Echo { addr, conns, bytes }
}

/// An encrypt -> decrypt pair in front of `backend`; returns the plaintext entry address.
pub fn pair(backend: SocketAddr) -> (SocketAddr, Running, Running) {
    let key = keygen("pair");
    let (dec, rd) = start(
        tunnel(Mode::Decrypt, &[backend], std::slice::from_ref(&key)),
        limits(),
    );
    let (enc, re) = start(tunnel(Mode::Encrypt, &[dec], &[key]), limits());
    (enc, re, rd)
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// Deterministic bytes for offset `i` of stream `seed`.
pub fn pattern(seed: u64, off: usize, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        let x = (off + k) as u64;
        *b = (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed).rotate_left(17) as u8;
    }
}

/// Writes `len` pattern bytes, half-closes, reads everything back and checks it is the same.
pub fn round_trip(addr: SocketAddr, seed: u64, len: usize) {
    let s = connect(addr);
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut off = 0;
        let mut block = vec![0u8; 64 * 1024];
        while off < len {
            let n = block.len().min(len - off);
            pattern(seed, off, &mut block[..n]);
            w.write_all(&block[..n]).unwrap();
            off += n;
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut r = s;
    let mut got = 0;
    let mut buf = vec![0u8; 256 * 1024];
    let mut want = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf).expect("read echo");
        if n == 0 {
            break;
        }
        pattern(seed, got, &mut want[..n]);
        assert!(buf[..n] == want[..n], "mismatch near offset {got}");
        got += n;
    }
    writer.join().unwrap();
    assert_eq!(got, len, "echoed byte count");
}

/// A relay between `from` clients and `to`, passing bytes through `mangle(direction, offset,
/// bytes)` (direction 0 = client to server); returning false cuts the connection with a FIN.
pub fn mitm<F>(to: SocketAddr, mangle: F) -> SocketAddr
where
    F: Fn(u8, usize, &mut [u8]) -> bool + Send + Sync + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let mangle = Arc::new(mangle);
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let Ok(u) = TcpStream::connect(to) else {
                return;
            };
            for (dir, (mut a, mut b)) in [
                (0u8, (c.try_clone().unwrap(), u.try_clone().unwrap())),
                (1u8, (u.try_clone().unwrap(), c.try_clone().unwrap())),
            ] {
                let m = mangle.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut off = 0;
                    loop {
                        let n = match a.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let keep = m(dir, off, &mut buf[..n]);
                        off += n;
                        if !keep || b.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = b.shutdown(Shutdown::Write);
                });
            }
        }
    });
    addr
}

/// Reads until EOF or error; returns (bytes, the error kind if it ended in one).
pub fn read_to_end(s: &mut TcpStream) -> (Vec<u8>, Option<std::io::ErrorKind>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, Some(e.kind())),
        }
    }
}

/// An encrypt -> decrypt pair in front of `backend`, both with limits `l`.
pub fn pair_with(backend: SocketAddr, l: Limits) -> (SocketAddr, Running, Running) {
    let key = keygen("pairw");
    let (dec, rd) = start(
        tunnel(Mode::Decrypt, &[backend], std::slice::from_ref(&key)),
        l.clone(),
    );
    let (enc, re) = start(tunnel(Mode::Encrypt, &[dec], &[key]), l);
    (enc, re, rd)
}

/// A loopback address with nothing listening on it (bound, noted, released).
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The sum of the samples of metric `name` whose labels include every pair of `labels`, as
/// `r`'s registry renders them now.
pub fn metric(r: &Running, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = String::from_utf8(r.metrics().render()).unwrap();
    metric_in(&text, name, labels)
}

/// As [`metric`], over Prometheus text already rendered.
pub fn metric_in(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labelset, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once("} ") {
                Some(x) => x,
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(v) => ("", v),
                None => continue, // a longer name with this prefix
            },
        };
        if labels
            .iter()
            .all(|(k, v)| labelset.contains(&format!("{k}=\"{v}\"")))
        {
            sum += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

/// Polls `cond` (every few milliseconds) until it holds; panics with `what` after [`TIMEOUT`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Closes `s` with a TCP reset instead of a FIN (SO_LINGER 0).
pub fn reset_close(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

/// Live bytes in the buffer pools of `r`'s shards (the gauge is refreshed every 250 ms).
pub fn pool_live(r: &Running) -> f64 {
    metric(r, "sealpipe_buffer_pool_bytes", &[("state", "live")])
}

/// The sealpipe binary built for this test run.
pub fn sealpipe() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_sealpipe"))
}

/// A child process of ours, killed and reaped when dropped so a failing test leaves nothing.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Proc {
    /// Sends a signal by name ("TERM", "HUP", "KILL") to this child.
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// Waits for the child to exit, at most `within`.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "process did not exit in {within:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Waits until something accepts on `addr`.
pub fn wait_listening(addr: SocketAddr) {
    wait_until(&format!("{addr} listening"), || {
        TcpStream::connect(addr).is_ok()
    });
}
