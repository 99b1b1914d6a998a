//! Upstreams across reloads and backend restarts, over real sockets (issue 14, items 1 and 2).
//!
//! Dead targets are real kernel behaviour, never mocks: a *blackhole* is a loopback listener
//! whose accept queue is full, so the kernel drops every further SYN and a connect to it waits
//! out the connect timeout; a *down port* is a bound socket that does not listen, so connects to
//! it are refused at once, and calling `listen` on it later is the backend coming back on the
//! same address (no window in which another test could take the port).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Socket, Type};

use sealpipe::config::{Config, Mode};
use sealpipe::metrics::Metrics;
use sealpipe::server::{self, Running};

use crate::common::*;

/// A loopback listener that never accepts and whose queue is full: connects to it hang.
struct Blackhole {
    addr: SocketAddr,
    _listener: Socket,
    _queued: Vec<TcpStream>,
}

fn blackhole() -> Blackhole {
    let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    l.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    // A backlog of 0 admits one connection to the accept queue; once it is full the kernel
    // drops SYNs (it neither answers nor refuses them).
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let mut queued = Vec::new();
    for _ in 0..16 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => queued.push(s),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::TimedOut, "filling the blackhole: {e}");
                return Blackhole {
                    addr,
                    _listener: l,
                    _queued: queued,
                };
            }
        }
    }
    panic!("the accept queue of {addr} never filled");
}

/// A port that refuses connections until [`DownPort::come_up`].
struct DownPort {
    addr: SocketAddr,
    sock: Socket,
}

impl DownPort {
    fn new() -> DownPort {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let addr = sock.local_addr().unwrap().as_socket().unwrap();
        DownPort { addr, sock }
    }

    /// The backend starts: an echo server on the same address. Returns its connection count.
    fn come_up(self) -> Arc<AtomicUsize> {
        self.sock.listen(128).unwrap();
        serve_echo(self.sock.into())
    }
}

/// Echoes every connection of `l`; counts connections.
fn serve_echo(l: TcpListener) -> Arc<AtomicUsize> {
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            c.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let (mut r, mut w) = (s.try_clone().unwrap(), s);
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
    conns
}

/// One round trip of 32 bytes on an open connection.
fn ping(s: &mut TcpStream, byte: u8) {
    s.write_all(&[byte; 32]).expect("ping write");
    let mut b = [0u8; 32];
    s.read_exact(&mut b).expect("ping read");
    assert_eq!(b, [byte; 32], "echo differs");
}

/// A client that the proxy turns away: it must see a reset promptly (not EOF, not a hang).
fn expect_reset(entry: SocketAddr) {
    let mut c = connect(entry);
    let (got, err) = write_then_read_to_end(&mut c, b"ping");
    assert!(got.is_empty(), "a turned-away client got {got:?}");
    assert_eq!(err, Some(ErrorKind::ConnectionReset), "turned-away client");
}

fn forward_toml(targets: &[SocketAddr], balance: &str) -> String {
    let t: Vec<String> = targets.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[log]\nlevel = \"warn\"\n[limits]\nthreads = 1\nconnect_timeout = 10\n\
         [[tunnel]]\nname = \"t\"\nmode = \"forward\"\nlisten = \"127.0.0.1:0\"\n\
         balance = \"{balance}\"\ntargets = [{}]\n",
        t.join(", ")
    )
}

fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Whether `m` exports any sample of `name` for upstream `addr`.
fn has_series(m: &Metrics, name: &str, addr: SocketAddr) -> bool {
    let text = String::from_utf8(m.render()).unwrap();
    let want = format!("upstream=\"{addr}\"");
    text.lines()
        .any(|l| l.starts_with(name) && l.contains(&want))
}

fn up_failures(r: &Running, addr: SocketAddr) -> f64 {
    let a = addr.to_string();
    metric(
        r,
        "sealpipe_upstream_connect_failures_total",
        &[("upstream", &a)],
    )
}

/// Watches `sealpipe_upstream_up` of one upstream from the moment it first reads 1: records
/// whether it ever read anything else afterwards (scrapes every 2 ms, far faster than the
/// shards' 250 ms publication, so a down period of a backoff cannot be missed).
struct UpWatch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<f64>>,
}

impl UpWatch {
    fn start(m: Arc<Metrics>, addr: SocketAddr) -> UpWatch {
        let a = addr.to_string();
        let read = move || {
            let text = String::from_utf8(m.render()).unwrap();
            metric_in(&text, "sealpipe_upstream_up", &[("upstream", &a)])
        };
        wait_until("upstream_up = 1 before the fault", || read() == 1.0);
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut other = Vec::new();
            while !s.load(Ordering::SeqCst) {
                let v = read();
                if v != 1.0 && other.len() < 16 {
                    other.push(v);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            other
        });
        UpWatch { stop, thread }
    }

    /// Stops watching; panics if the gauge ever left 1.
    fn assert_never_moved(self, what: &str) {
        self.stop.store(true, Ordering::SeqCst);
        let other = self.thread.join().unwrap();
        assert!(
            other.is_empty(),
            "{what}: sealpipe_upstream_up left 1 (read {other:?})"
        );
    }
}

/// Starts a forward tunnel from a config file (so `Running::reload` re-reads it), with 400
/// clients connected: round robin gives 200 to `alive` and 200 to the blackhole, whose
/// connects are then in flight. Returns the server and the clients.
fn two_hundred_in_flight(
    path: &Path,
    targets: &[SocketAddr],
    alive: &Echo,
) -> (Running, Vec<TcpStream>) {
    // 400 clients and 200 echo connections in this process, 800 descriptors in the server.
    let _ = sealpipe::sys::raise_nofile_limit();
    write_config(path, &forward_toml(targets, "round-robin"));
    let r = server::start(Config::from_file(path).unwrap(), None).unwrap();
    let entry = r.listen_addrs[0];
    let clients: Vec<TcpStream> = (0..400).map(|_| connect(entry)).collect();
    wait_until("200 connections at the live target", || {
        alive.conns.load(Ordering::SeqCst) == 200
    });
    wait_until("400 connections open", || {
        metric(&r, "sealpipe_connections_active", &[]) == 400.0
    });
    // The precondition of the test: the blackhole's connects are all still waiting.
    assert_eq!(
        metric(&r, "sealpipe_upstream_connect_failures_total", &[]),
        0.0,
        "connects timed out before the reload (is the machine that slow?)"
    );
    (r, clients)
}

/// Item 1: a reload that shrinks the target list while connects to the removed target are in
/// flight. Those connects time out after the reload; each must be charged to no one (the
/// target is gone), fail over to what is configured now, and be served.
#[test]
fn reload_removing_a_target_with_200_connects_in_flight_keeps_serving() {
    let alive = echo_backend();
    let dead = blackhole();
    let path = temp_dir("up-shrink").join("c.toml");
    let (mut r, mut clients) = two_hundred_in_flight(&path, &[alive.addr, dead.addr], &alive);
    let watch = UpWatch::start(r.metrics().clone(), alive.addr);

    write_config(&path, &forward_toml(&[alive.addr], "round-robin"));
    r.reload().unwrap();
    wait_until("the removed target's series dropped", || {
        !has_series(r.metrics(), "sealpipe_upstream_up", dead.addr)
    });
    // Every client is served: those whose connect was in flight after their connect timeout
    // (10 s), on the target that remains.
    for (i, c) in clients.iter_mut().enumerate() {
        ping(c, i as u8);
    }
    assert_eq!(alive.conns.load(Ordering::SeqCst), 400);
    assert_eq!(
        up_failures(&r, alive.addr),
        0.0,
        "charged to the live target"
    );
    let mut c = connect(r.listen_addrs[0]);
    ping(&mut c, 1);
    watch.assert_never_moved("the live target");
    drop(c);
    drop(clients);
    wait_until("every connection closed", || {
        metric(&r, "sealpipe_connections_active", &[]) == 0.0
    });
}

/// Item 1, the list keeping its length: [dead, B] becomes [B, C] with least-conn. The dead
/// target's timeouts must not land on B (which took its index), and the least-conn counts
/// must stay right: B holds 200 connections, so all 200 failed-over connections go to C, and
/// once everything has closed, new connections split evenly.
#[test]
fn reload_reordering_targets_charges_no_one_else_and_keeps_least_conn_counts() {
    let (b, c) = (echo_backend(), echo_backend());
    let dead = blackhole();
    let path = temp_dir("up-reorder").join("c.toml");
    let (mut r, mut clients) = two_hundred_in_flight(&path, &[dead.addr, b.addr], &b);
    let watch = UpWatch::start(r.metrics().clone(), b.addr);

    write_config(&path, &forward_toml(&[b.addr, c.addr], "least-conn"));
    r.reload().unwrap();
    wait_until("the new target's series", || {
        has_series(r.metrics(), "sealpipe_upstream_up", c.addr)
    });
    for (i, s) in clients.iter_mut().enumerate() {
        ping(s, i as u8);
    }
    assert_eq!(
        up_failures(&r, b.addr),
        0.0,
        "the dead target's timeouts charged to B"
    );
    assert_eq!(b.conns.load(Ordering::SeqCst), 200, "B");
    assert_eq!(
        c.conns.load(Ordering::SeqCst),
        200,
        "C (least-conn after the reload)"
    );
    watch.assert_never_moved("B");

    drop(clients);
    wait_until("every connection closed", || {
        metric(&r, "sealpipe_connections_active", &[]) == 0.0
    });
    let mut held: Vec<TcpStream> = (0..10).map(|_| connect(r.listen_addrs[0])).collect();
    for (i, s) in held.iter_mut().enumerate() {
        ping(s, i as u8);
    }
    assert_eq!(
        b.conns.load(Ordering::SeqCst),
        205,
        "B after everything closed"
    );
    assert_eq!(
        c.conns.load(Ordering::SeqCst),
        205,
        "C after everything closed"
    );
}

/// Item 2: the only backend stops, clients are reset promptly, it starts again, and the very
/// next connection through the pair is served. The decrypt side's failures never count as
/// failed connects of the encrypt side, nor move its `sealpipe_upstream_up`.
#[test]
fn backend_restart_the_next_connection_through_the_pair_is_served() {
    let backend = DownPort::new();
    let (entry, e, d) = pair(backend.addr);
    let dec = d.listen_addrs[0];
    let watch = UpWatch::start(e.metrics().clone(), dec);
    for _ in 0..3 {
        expect_reset(entry);
    }
    let refused = metric(
        &d,
        "sealpipe_upstream_connect_failures_total",
        &[("reason", "refused")],
    );
    assert_eq!(
        refused, 3.0,
        "the decrypt side's connects to the stopped backend"
    );
    let conns = backend.come_up();
    round_trip(entry, 14, 1000);
    assert_eq!(conns.load(Ordering::SeqCst), 1);
    assert_eq!(
        up_failures(&e, dec),
        0.0,
        "the encrypt side counted failed connects"
    );
    watch.assert_never_moved("the encrypt side's upstream");
}

/// Item 2 with two targets: both down, then one comes back; the next connection succeeds.
#[test]
fn two_targets_both_down_one_comes_back_the_next_connection_succeeds() {
    let (p1, p2) = (DownPort::new(), DownPort::new());
    let key = keygen("up-two");
    let (dec, d) = start(
        tunnel(
            Mode::Decrypt,
            &[p1.addr, p2.addr],
            std::slice::from_ref(&key),
        ),
        limits(),
    );
    let (entry, e) = start(tunnel(Mode::Encrypt, &[dec], &[key]), limits());
    let watch = UpWatch::start(e.metrics().clone(), dec);
    for _ in 0..3 {
        expect_reset(entry);
    }
    assert!(up_failures(&d, p1.addr) >= 1.0 && up_failures(&d, p2.addr) >= 1.0);
    let conns = p2.come_up();
    round_trip(entry, 2, 1000);
    assert_eq!(conns.load(Ordering::SeqCst), 1);
    // A second one too (round robin may try the dead one first; either way it is served).
    round_trip(entry, 3, 1000);
    assert_eq!(
        up_failures(&e, dec),
        0.0,
        "the encrypt side counted failed connects"
    );
    watch.assert_never_moved("the encrypt side's upstream");
}

/// Item 2: a peer that accepts and then resets at once (as a decrypt side may) completed the
/// TCP connect; however soon the reset follows, it is not a failed connect. A burst of clients
/// makes the reset often arrive before the encrypt shard has looked at the connect's outcome.
#[test]
fn a_peer_that_accepts_then_resets_is_not_a_failed_connect() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = l.local_addr().unwrap();
    let resets = Arc::new(AtomicUsize::new(0));
    let n = resets.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            // Counted before the reset: the client that sees it may be read before this
            // thread runs again.
            n.fetch_add(1, Ordering::SeqCst);
            reset_close(s);
        }
    });
    let key = keygen("up-rst");
    let (entry, e) = start(tunnel(Mode::Encrypt, &[peer], &[key]), limits());
    let watch = UpWatch::start(e.metrics().clone(), peer);
    let mut clients: Vec<TcpStream> = (0..200).map(|_| connect(entry)).collect();
    for c in &mut clients {
        let (got, err) = read_to_end(c);
        assert!(got.is_empty());
        assert_eq!(err, Some(ErrorKind::ConnectionReset));
    }
    assert_eq!(
        resets.load(Ordering::SeqCst),
        200,
        "every client reached the peer"
    );
    assert_eq!(
        up_failures(&e, peer),
        0.0,
        "resets counted as failed connects"
    );
    watch.assert_never_moved("the resetting peer");
}
