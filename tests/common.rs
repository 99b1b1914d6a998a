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

/// A tunnel with defaults, but for warm sessions, which are off on an encrypt side here: most
/// tests count connections, handshakes and sessions, one per client, and a warm session is one
/// more of each, made whenever the shard has spare time. tests/warm.rs turns them on (as do the
/// tests that run the binary with its defaults).
pub fn tunnel(mode: Mode, targets: &[SocketAddr], keys: &[PathBuf]) -> TunnelFile {
    let mut t = TunnelFile::new(
        mode,
        "127.0.0.1:0".into(),
        targets.iter().map(|a| a.to_string()).collect(),
        keys.to_vec(),
    );
    if mode == Mode::Encrypt {
        t.warm_max = Some(0);
    }
    t
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

/// A connected client with read and write timeouts. The timeouts are set before the connect:
/// set after it, on a connection the proxy resets at once (an access list, a cap), the call
/// itself failed with the reset (seen in the release suite), instead of the read or write
/// that a test then makes to see it.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s.connect(&addr.into()).unwrap();
    s.into()
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

/// Writes `data` (ignoring a failed write), then [`read_to_end`]. A proxy that resets the
/// connection may do so before the write: the write then reports the reset and the read after
/// it sees only the end of a stream already reset (Linux reports a reset once), so a reset the
/// write saw is the error returned.
pub fn write_then_read_to_end(
    s: &mut TcpStream,
    data: &[u8],
) -> (Vec<u8>, Option<std::io::ErrorKind>) {
    let wrote = s.write_all(data).err().map(|e| e.kind());
    let (got, err) = read_to_end(s);
    let reset = wrote.filter(|k| *k == std::io::ErrorKind::ConnectionReset);
    (got, reset.or(err))
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

/// A loopback port held for one test: a socket bound to it with SO_REUSEADDR and SO_REUSEPORT
/// that never listens. While it is held no other bind to port 0 and no outgoing connect is
/// given the port, and connects to it are refused; yet the process under test can listen on
/// it, as the same user: its tunnel listeners bind with SO_REUSEPORT, and its metrics endpoint
/// (like any std or tokio listener) with SO_REUSEADDR, which Linux lets share a port with a
/// socket that is not listening. The port is never released between "found free" and "used",
/// so parallel tests cannot race for it.
pub struct Port {
    sock: socket2::Socket,
    pub addr: SocketAddr,
}

impl Port {
    pub fn reserve() -> Port {
        use socket2::{Domain, Socket, Type};
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        sock.set_reuse_address(true).unwrap();
        sock.set_reuse_port(true).unwrap();
        sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let addr = sock.local_addr().unwrap().as_socket().unwrap();
        Port { sock, addr }
    }

    /// Starts listening on the reserved socket itself: the port is handed over, never
    /// released and bound again.
    pub fn listen(self) -> TcpListener {
        self.sock.listen(128).unwrap();
        self.sock.into()
    }
}

/// A loopback address that refuses connections until a sealpipe listens on it, reserved (see
/// [`Port`]) until this test process exits, so no other test or connect is ever given it.
pub fn free_addr() -> SocketAddr {
    static HELD: std::sync::Mutex<Vec<Port>> = std::sync::Mutex::new(Vec::new());
    let p = Port::reserve();
    let addr = p.addr;
    HELD.lock().unwrap().push(p);
    addr
}

/// The sum of the samples of metric `name` whose labels include every pair of `labels`, as
/// `r`'s registry renders them now. Panics if no such series exists (a renamed metric or
/// label must fail the test, not read as 0).
pub fn metric(r: &Running, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = String::from_utf8(r.metrics().render()).unwrap();
    metric_in(&text, name, labels)
}

/// As [`metric`], but 0 when no series matches. Only for series whose absence legitimately
/// means zero (children created on first use, such as those of an upstream a reload adds);
/// every caller says why at the call site.
#[allow(dead_code)] // no test reads such a series yet
pub fn metric_or_zero(r: &Running, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = String::from_utf8(r.metrics().render()).unwrap();
    samples(&text, name, labels).map_or(0.0, |v| v.iter().sum())
}

/// As [`metric`], over Prometheus text already rendered.
pub fn metric_in(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    match samples(text, name, labels) {
        Some(v) => v.iter().sum(),
        None => {
            let family: Vec<&str> = text
                .lines()
                .filter(|l| sample_name(l) == Some(name))
                .collect();
            panic!(
                "no series {name}{labels:?}; the family has {} series:\n{}",
                family.len(),
                family.join("\n")
            )
        }
    }
}

/// The metric name of a sample line (None for comments and blank lines).
fn sample_name(line: &str) -> Option<&str> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    line.split(['{', ' ']).next()
}

/// One sample line of the text format: name, labels, value. Panics on a line it cannot read.
pub fn parse_sample(line: &str) -> (&str, Vec<(String, String)>, f64) {
    let bad = |why: &str| -> ! { panic!("unreadable sample ({why}): {line:?}") };
    let name = sample_name(line).unwrap_or_else(|| bad("not a sample"));
    let rest = &line[name.len()..];
    let mut labels = Vec::new();
    let value = if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = r.strip_prefix('}') {
                break after;
            }
            let (k, after) = r.split_once("=\"").unwrap_or_else(|| bad("label"));
            let mut v = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => v.push('\n'),
                        Some((_, c)) => v.push(c),
                        None => bad("escape"),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => v.push(c),
                    None => bad("unterminated value"),
                }
            };
            labels.push((k.trim_start_matches(',').to_string(), v));
            r = &after[end + 1..];
            r = r.strip_prefix(',').unwrap_or(r);
        }
    } else {
        rest
    };
    let value = value.trim();
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or_else(|_| bad("value")),
    };
    (name, labels, value)
}

/// The values of the samples of `name` whose labels include every pair of `labels`, or None
/// when there are none. Panics on a line it cannot read.
fn samples(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<Vec<f64>> {
    let mut out = Vec::new();
    for line in text.lines() {
        if sample_name(line) != Some(name) {
            continue;
        }
        let (_, have, value) = parse_sample(line);
        if labels
            .iter()
            .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
        {
            out.push(value);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// GET `path` from a metrics endpoint; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = connect(addr);
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    (status, body.to_string())
}

/// As [`start`], with the metrics endpoint on an ephemeral loopback port
/// (`Running::metrics_addr`).
pub fn start_observed(t: TunnelFile, limits: Limits) -> (SocketAddr, Running) {
    let cfg = ConfigFile {
        log: LogConfig::default(),
        metrics: MetricsConfig {
            listen: Some("127.0.0.1:0".into()),
        },
        limits,
        tunnel: vec![t],
    }
    .validate(None)
    .unwrap();
    let r = server::start(cfg, None).unwrap();
    (r.listen_addrs[0], r)
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

/// What the documented bound allows sealpipe to buffer for one direction of one connection in
/// one process (proxy/mod.rs: `READ_HIGH + OUTPUT_HIGH + READ_HIGH` plus record framing).
pub const DIRECTION_BOUND: usize = {
    use sealpipe::protocol::{HEADER_LEN, MAX_PAYLOAD, TAG_LEN};
    use sealpipe::proxy::{OUTPUT_HIGH, READ_HIGH};
    let plain = 2 * READ_HIGH + OUTPUT_HIGH;
    plain + plain.div_ceil(MAX_PAYLOAD) * (HEADER_LEN + TAG_LEN)
};

/// One connection of `/proc/net/tcp` (IPv4), listeners left out.
pub struct TcpRow {
    pub local_port: u16,
    pub remote_port: u16,
    /// Written but not yet acknowledged.
    pub tx_queue: usize,
    /// Received but not yet read.
    pub rx_queue: usize,
    /// The socket's inode: `socket:[INODE]` among a process's descriptors.
    pub inode: String,
}

/// The IPv4 TCP connections the kernel has now (`/proc/net/tcp`: sl local rem st
/// tx_queue:rx_queue tr:when retrnsmt uid timeout inode ...), listeners (state 0A, whose rx_queue
/// counts connections waiting for accept, not bytes) left out.
pub fn tcp_table() -> Vec<TcpRow> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let port_of = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 9 && f[3] != "0A")
        .map(|f| {
            let (tx, rx) = f[4].split_once(':').unwrap();
            TcpRow {
                local_port: port_of(f[1]),
                remote_port: port_of(f[2]),
                tx_queue: usize::from_str_radix(tx, 16).unwrap(),
                rx_queue: usize::from_str_radix(rx, 16).unwrap(),
                inode: f[9].to_string(),
            }
        })
        .collect()
}

/// Payload bytes the kernel holds in the send and receive queues of the IPv4 TCP connections
/// with `port` as their local or remote port, listeners aside (a half-closed socket keeps
/// both, plus one for a FIN not yet acknowledged).
pub fn kernel_queued(port: u16) -> usize {
    tcp_table()
        .iter()
        .filter(|r| r.local_port == port || r.remote_port == port)
        .map(|r| r.tx_queue + r.rx_queue)
        .sum()
}

/// The plaintext bytes a stalled one-way stream through a pair holds in sealpipe's buffers:
/// `written` bytes entered the chain, none left it, and the kernel holds the rest on the three
/// hops (plaintext on the hops touching `plain_ports`, records on the one touching
/// `sealed_port`, converted back to their payload).
///
/// The writer's stall (a write that waited 500 ms) is not proof the stream stands still: a
/// shard the scheduler left out for as long may still be moving bytes. So the queues are read
/// until two readings 50 ms apart agree (at most [`TIMEOUT`]).
pub fn held_by_sealpipe(written: usize, plain_ports: [u16; 2], sealed_port: u16) -> i64 {
    use sealpipe::protocol::{HEADER_LEN, MAX_PAYLOAD, TAG_LEN};
    let read = || {
        let plain: usize = plain_ports.iter().map(|p| kernel_queued(*p)).sum();
        (plain, kernel_queued(sealed_port))
    };
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut last = read();
    let (plain, sealed) = loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = read();
        if now == last {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stalled stream never stood still: kernel queues {last:?} then {now:?}"
        );
        last = now;
    };
    let sealed_payload = sealed * MAX_PAYLOAD / (MAX_PAYLOAD + HEADER_LEN + TAG_LEN);
    eprintln!(
        "stalled stream: {written} bytes written; kernel queues: {plain} plaintext, {sealed} sealed"
    );
    written as i64 - plain as i64 - sealed_payload as i64
}

/// [`DIRECTION_BOUND`] as whole pool chunks, plus one partly filled chunk at each end of each
/// of the three buffers it spans: what the live pool gauge of one process may show.
pub const DIRECTION_BOUND_CHUNKS: usize = {
    use sealpipe::reactor::pool::CHUNK_SIZE;
    (DIRECTION_BOUND.div_ceil(CHUNK_SIZE) + 6) * CHUNK_SIZE
};

/// Samples the live pool bytes of `r` across a few housekeeping periods (the gauge is
/// refreshed every 250 ms) and returns the largest value seen.
pub fn settle_max_live(r: &Running) -> f64 {
    let mut max_live = 0f64;
    let until = std::time::Instant::now() + Duration::from_secs(1);
    while std::time::Instant::now() < until {
        max_live = max_live.max(pool_live(r));
        std::thread::sleep(Duration::from_millis(50));
    }
    max_live
}

/// Set to skip, on purpose, the tests that need root (network namespaces and TUN devices, a peer
/// run as another uid). Without it such a test fails as another user and says why: a run that
/// cannot test something never passes as if it had. CI runs as root and unsets it.
pub const SKIP_ROOT_TESTS: &str = "SEALPIPE_SKIP_ROOT_TESTS";

/// Whether the root-only test `test` should run: true as root; false (printing SKIPPED) when
/// [`SKIP_ROOT_TESTS`] is set; otherwise the test fails here, naming what it needs.
pub fn root_or_skip(test: &str, needs: &str) -> bool {
    if sealpipe::sys::euid() == 0 {
        return true;
    }
    if std::env::var_os(SKIP_ROOT_TESTS).is_some() {
        eprintln!("SKIPPED {test} because {SKIP_ROOT_TESTS} is set (it needs root: {needs})");
        return false;
    }
    panic!(
        "{test} needs root ({needs}), as CI has; run it as root, or set {SKIP_ROOT_TESTS}=1 to \
         skip the root-only tests on purpose"
    );
}
