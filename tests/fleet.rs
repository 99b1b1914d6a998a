//! What fleet operators expect (issue 19): dead peers noticed by TCP keepalive and
//! TCP_USER_TIMEOUT, targets by DNS name, systemd socket activation, and the command line's
//! conventions.
//!
//! Peers that vanish without a FIN or a reset are made by network namespaces joined by a veth
//! pair whose path the test then cuts: nothing answers, nothing is refused. Namespaces are
//! this test process's own (named with its pid and the test's tag) and deleted on drop.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Instant;

use sealpipe::config::{Limits, Mode};
use sealpipe::server::Running;

use crate::common::*;

// ---------------------------------------------------------------------------------------------
// Two network namespaces joined by a veth pair: A has 10.214.0.1, B has 10.214.0.2 (each pair
// of namespaces is its own network, so tests running at once may use the same addresses).

struct Netns {
    a: String,
    b: String,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

const A_IP: &str = "10.214.0.1";
const B_IP: &str = "10.214.0.2";

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The namespaces, or `None` (with a line saying so) when this user cannot create them. As
/// root a failure is a test failure: CI runs as root.
fn netns(tag: &str) -> Option<Netns> {
    let id = std::process::id();
    let ns = Netns {
        a: format!("sp-fleet-{id}-{tag}-a"),
        b: format!("sp-fleet-{id}-{tag}-b"),
    };
    let setup = || -> Result<(), String> {
        ip(&["netns", "add", &ns.a])?;
        ip(&["netns", "add", &ns.b])?;
        ip(&[
            "-n", &ns.a, "link", "add", "spa", "type", "veth", "peer", "name", "spb", "netns",
            &ns.b,
        ])?;
        for (n, v, addr) in [(&ns.a, "spa", A_IP), (&ns.b, "spb", B_IP)] {
            ip(&["-n", n, "link", "set", "lo", "up"])?;
            ip(&["-n", n, "addr", "add", &format!("{addr}/30"), "dev", v])?;
            ip(&["-n", n, "link", "set", v, "up"])?;
        }
        Ok(())
    };
    match setup() {
        Ok(()) => Some(ns),
        Err(e) if sealpipe::sys::euid() != 0 => {
            eprintln!("SKIPPED: cannot create network namespaces as a non-root user ({e})");
            None
        }
        Err(e) => panic!("cannot create network namespaces as root: {e}"),
    }
}

impl Netns {
    /// The path between A and B dies: from either side the other vanishes. Each side routes
    /// the other's address into a blackhole, so whatever TCP sends is silently discarded
    /// after it left the socket (no FIN, no reset, no local error: a peer that lost power, a
    /// link or a NAT entry gone somewhere between).
    fn cut(&self) {
        for (n, peer) in [(&self.a, B_IP), (&self.b, A_IP)] {
            ip(&["-n", n, "route", "add", "blackhole", &format!("{peer}/32")]).unwrap();
        }
    }
}

/// Moves the calling thread (only) into network namespace `name`.
#[allow(unsafe_code)]
fn enter_netns(name: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    // SAFETY: `f` is an open namespace file for the duration of the call, and CLONE_NEWNET
    // only changes the network namespace of this thread; no memory is shared with the kernel.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Runs `f` on a thread inside namespace `ns` (threads it spawns stay there) and returns its
/// result.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns);
        f()
    })
    .join()
    .unwrap()
}

/// An echo backend listening on `ip`, in the caller's namespace.
fn echo_on(ip: &str) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let _ = std::io::copy(&mut s, &mut w);
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// One byte there and back.
fn ping(s: &mut TcpStream) {
    s.write_all(b"k").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"k");
}

/// Limits that notice a vanished peer in about 3 s (keepalive 1 s + 2 probes 1 s apart),
/// with an idle timeout far beyond any wait of these tests, so that only keepalive or the
/// user timeout can be what closes the connection.
fn dead_peer_limits() -> Limits {
    Limits {
        threads: 1,
        idle_timeout: 3600.0,
        half_closed_timeout: 0.0,
        keepalive_idle: 1.0,
        keepalive_interval: 1.0,
        keepalive_count: 2,
        ..Limits::default()
    }
}

/// Starts a forward tunnel in namespace `ns` listening on `listen_ip`.
fn forward_in(ns: &str, listen_ip: &str, target: SocketAddr, l: Limits) -> (SocketAddr, Running) {
    let listen = format!("{listen_ip}:0");
    in_netns(ns, move || {
        let mut t = tunnel(Mode::Forward, &[target], &[]);
        t.listen = listen;
        start(t, l)
    })
}

fn closed(r: &Running, reason: &str) -> f64 {
    metric(
        r,
        "sealpipe_connections_closed_total",
        &[("reason", reason)],
    )
}

/// Item 1 of issue 19, client side: a client that vanishes from an idle connection is
/// noticed by keepalive (set on the listener, inherited by the accepted socket) and the
/// connection to the backend is closed, counted as `peer_timeout`.
#[test]
fn keepalive_notices_an_idle_client_that_vanished() {
    let Some(ns) = netns("kacl") else { return };
    let backend = in_netns(&ns.b, || echo_on("127.0.0.1"));
    let (entry, r) = forward_in(&ns.b, B_IP, backend, dead_peer_limits());
    let mut c = in_netns(&ns.a, move || connect(entry));
    ping(&mut c);
    ns.cut();
    let t = Instant::now();
    wait_until(
        "the vanished client's connection closed as peer_timeout",
        || closed(&r, "peer_timeout") == 1.0,
    );
    eprintln!(
        "vanished client noticed after {:?} (bound 3 s)",
        t.elapsed()
    );
    assert_eq!(closed(&r, "idle_timeout"), 0.0);
    assert_eq!(metric(&r, "sealpipe_connections_active", &[]), 0.0);
}

/// Item 1 of issue 19, upstream side: a backend that vanishes from an idle connection is
/// noticed by keepalive on the upstream socket; the client is reset, not left hanging.
#[test]
fn keepalive_notices_an_idle_backend_that_vanished() {
    let Some(ns) = netns("kaup") else { return };
    let backend = in_netns(&ns.a, || echo_on(A_IP));
    let (entry, r) = forward_in(&ns.b, "127.0.0.1", backend, dead_peer_limits());
    let mut c = in_netns(&ns.b, move || connect(entry));
    ping(&mut c);
    ns.cut();
    let t = Instant::now();
    let (_, err) = read_to_end(&mut c);
    eprintln!(
        "vanished backend noticed after {:?} (bound 3 s)",
        t.elapsed()
    );
    assert_eq!(err, Some(ErrorKind::ConnectionReset), "the client is reset");
    wait_until("counted as peer_timeout", || {
        closed(&r, "peer_timeout") == 1.0
    });
}

/// Item 1 of issue 19: with keepalive off, TCP_USER_TIMEOUT alone bounds how long data sent
/// to a vanished backend may stay unacknowledged (the kernel would retransmit for ~15 min,
/// and the client's writes keep the idle timer from firing).
#[test]
fn user_timeout_notices_a_backend_that_vanished_with_data_in_flight() {
    let Some(ns) = netns("uto") else { return };
    let backend = in_netns(&ns.a, || echo_on(A_IP));
    let l = Limits {
        keepalive_idle: 0.0,
        tcp_user_timeout: Some(2.0),
        ..dead_peer_limits()
    };
    let (entry, r) = forward_in(&ns.b, "127.0.0.1", backend, l);
    let mut c = in_netns(&ns.b, move || connect(entry));
    ping(&mut c);
    ns.cut();
    let t = Instant::now();
    // Data in flight towards the vanished backend, the proxy's idle timer kept busy.
    c.write_all(&[7u8; 4096]).unwrap();
    let (_, err) = read_to_end(&mut c);
    eprintln!(
        "backend vanished with data in flight: noticed after {:?} (user timeout 2 s)",
        t.elapsed()
    );
    assert_eq!(err, Some(ErrorKind::ConnectionReset), "the client is reset");
    wait_until("counted as peer_timeout", || {
        closed(&r, "peer_timeout") == 1.0
    });
}

/// Item 1 of issue 19, reload: new keepalive settings apply to connections accepted after the
/// reload (set on the listeners again); connections already open keep theirs and are not
/// dropped.
#[test]
fn reloaded_keepalive_applies_to_new_connections_and_drops_none() {
    let Some(ns) = netns("karl") else { return };
    let backend = in_netns(&ns.b, || echo_on("127.0.0.1"));
    let dir = temp_dir("karl");
    let path = dir.join("sealpipe.toml");
    let write = |keepalive_idle: u32| {
        let text = format!(
            "[limits]\nthreads = 1\nidle_timeout = 3600\nkeepalive_idle = {keepalive_idle}\n\
             keepalive_interval = 1\nkeepalive_count = 2\n\
             [[tunnel]]\nname = \"ka\"\nmode = \"forward\"\nlisten = \"{B_IP}:0\"\n\
             targets = [\"{backend}\"]\n"
        );
        std::fs::write(&path, text).unwrap();
    };
    write(0);
    let p = path.clone();
    let mut r = in_netns(&ns.b, move || {
        let cfg = sealpipe::config::Config::from_file(&p).unwrap();
        sealpipe::server::start(cfg, None).unwrap()
    });
    let entry = r.listen_addrs[0];
    let mut before = in_netns(&ns.a, move || connect(entry));
    ping(&mut before);
    write(1);
    r.reload().unwrap();
    let mut after = in_netns(&ns.a, move || connect(entry));
    ping(&mut after);
    ping(&mut before);
    ns.cut();
    wait_until(
        "the connection accepted after the reload noticed the cut",
        || closed(&r, "peer_timeout") == 1.0,
    );
    // The one accepted before the reload has no keepalive: it stays (idle timeout 1 h).
    assert_eq!(metric(&r, "sealpipe_connections_active", &[]), 1.0);
    assert_eq!(metric(&r, "sealpipe_connections_closed_total", &[]), 1.0);
}
