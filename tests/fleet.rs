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

/// The namespaces, or `None` when root-only tests are skipped on purpose (`root_or_skip`). As
/// root a failure is a test failure: CI runs as root.
fn netns(tag: &str) -> Option<Netns> {
    if !root_or_skip(tag, "network namespaces") {
        return None;
    }
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

// ---------------------------------------------------------------------------------------------
// Targets by name.

/// GET /metrics of a child process; `None` while its endpoint is not up.
fn scrape(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(TIMEOUT)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.contains(" 200 ").then_some(out)
}

/// Waits until the child's metrics satisfy `f`.
fn wait_scraped(addr: SocketAddr, what: &str, f: impl Fn(&str) -> bool) -> String {
    let mut last = None;
    wait_until(what, || {
        last = scrape(addr);
        last.as_deref().is_some_and(&f)
    });
    last.unwrap()
}

/// An echo backend on `addr` that counts its connections.
fn counting_echo(addr: SocketAddr) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = TcpListener::bind(addr).unwrap();
    let addr = l.local_addr().unwrap();
    let n = std::sync::Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            c.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let _ = std::io::copy(&mut s, &mut w);
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
    (addr, n)
}

fn count(n: &std::sync::atomic::AtomicUsize) -> usize {
    n.load(std::sync::atomic::Ordering::SeqCst)
}

/// Runs `sealpipe run --config CFG` in a mount namespace of its own where /etc/hosts is
/// `hosts` (bind-mounted; the test rewrites that file in place), so that the production
/// resolver (getaddrinfo) answers what the test says. `None` when this user cannot.
fn run_with_hosts(hosts: &std::path::Path, cfg: &std::path::Path) -> Option<Proc> {
    if !root_or_skip("run_with_hosts", "a mount namespace for /etc/hosts") {
        return None;
    }
    let probe = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        other => panic!("unshare --mount fails as root: {other:?}"),
    }
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$1" /etc/hosts && exec "$2" run --config "$3""#)
        .arg("sh")
        .arg(hosts)
        .arg(env!("CARGO_BIN_EXE_sealpipe"))
        .arg(cfg)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Some(Proc(child))
}

/// Item 3 of issue 19, with the system's resolver: a target name stands for every address
/// it resolves to, IPv6 and IPv4 in the resolver's order; a connect refused at the first
/// (nothing listens on [::1]) fails over to the next address of the same name. SIGHUP
/// resolves it again: new connections follow the new address, open ones stay; a name that
/// stops resolving keeps its last good address, and the failure is counted.
#[test]
fn a_name_uses_every_address_it_resolves_to_and_sighup_resolves_it_again() {
    let dir = temp_dir("dns");
    let hosts = dir.join("hosts");
    let name = "svc.sealpipe.test";
    // Both loopback addresses of one port: IPv4 listens, IPv6 refuses.
    let (b1, n1) = counting_echo("127.0.0.1:0".parse().unwrap());
    let port = b1.port();
    assert!(
        TcpStream::connect(("::1", port)).is_err(),
        "something listens on [::1]:{port}"
    );
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n::1 {name}\n127.0.0.1 {name}\n"),
    )
    .unwrap();
    let (entry, metrics) = (free_addr(), free_addr());
    let cfg = dir.join("sealpipe.toml");
    std::fs::write(
        &cfg,
        format!(
            "[log]\nlevel = \"warn\"\n[metrics]\nlisten = \"{metrics}\"\n\
             [limits]\nthreads = 1\nresolve_interval = 0\n\
             [[tunnel]]\nname = \"dns\"\nmode = \"forward\"\nlisten = \"{entry}\"\n\
             targets = [\"{name}:{port}\"]\n"
        ),
    )
    .unwrap();
    let Some(p) = run_with_hosts(&hosts, &cfg) else {
        return;
    };
    wait_listening(entry);
    let mut c1 = connect(entry);
    ping(&mut c1);
    // (wait_listening's probe connection reached the backend too.)
    let at_b1 = count(&n1);
    assert!(at_b1 >= 1);
    let target = format!("{name}:{port}");
    let text = wait_scraped(metrics, "both addresses of the name", |t| {
        metric_in(t, "sealpipe_target_addresses", &[("target", &target)]) == 2.0
    });
    // IPv6 first (the resolver's order), refused, then IPv4 (after one refusal [::1] is down
    // for a backoff, and the next connections go to IPv4 at once).
    let v6 = format!("[::1]:{port}");
    let refused = metric_in(
        &text,
        "sealpipe_upstream_connect_failures_total",
        &[("upstream", &v6), ("reason", "refused")],
    );
    assert!(refused >= 1.0, "[::1] never tried: {text}");

    // The name moves to 127.0.0.2 (same port); SIGHUP.
    let (_b2, n2) = counting_echo(format!("127.0.0.2:{port}").parse().unwrap());
    std::fs::write(&hosts, format!("127.0.0.1 localhost\n127.0.0.2 {name}\n")).unwrap();
    p.signal("HUP");
    wait_scraped(metrics, "the reload", |t| {
        metric_in(t, "sealpipe_config_reloads_total", &[("result", "ok")]) == 1.0
    });
    let mut c2 = connect(entry);
    ping(&mut c2);
    assert_eq!(
        (count(&n1), count(&n2)),
        (at_b1, 1),
        "the new connection went to the new address"
    );
    ping(&mut c1);

    // The name stops resolving: the last good address stays, the failure is counted.
    std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    p.signal("HUP");
    let text = wait_scraped(metrics, "the second reload", |t| {
        metric_in(t, "sealpipe_config_reloads_total", &[("result", "ok")]) == 2.0
    });
    assert_eq!(
        metric_in(
            &text,
            "sealpipe_resolve_failures_total",
            &[("tunnel", "dns")]
        ),
        1.0
    );
    assert_eq!(
        metric_in(&text, "sealpipe_target_addresses", &[("target", &target)]),
        1.0
    );
    let mut c3 = connect(entry);
    ping(&mut c3);
    assert_eq!(count(&n2), 2);
    ping(&mut c1);
    ping(&mut c2);
}

/// A resolver the test controls: `name` resolves to what it holds now (`None`: fails).
struct Switch(std::sync::Mutex<Option<Vec<std::net::IpAddr>>>);

impl sealpipe::config::Resolve for Switch {
    fn lookup(&self, _host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        match &*self.0.lock().unwrap() {
            Some(ips) => Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect()),
            None => Err(std::io::Error::other("no such host (test)")),
        }
    }
}

/// Item 3 of issue 19, every `resolve_interval`: the control thread resolves the name again
/// and pushes new addresses to the shards; open connections stay; a failure keeps the last
/// good list and is counted. (The resolver here is the test's; the lookup path is the one
/// the system's resolver takes, tested above.)
#[test]
fn names_are_resolved_again_every_interval_without_dropping_connections() {
    use std::sync::Arc;
    let (b1, n1) = counting_echo("127.0.0.1:0".parse().unwrap());
    let port = b1.port();
    let (_b2, n2) = counting_echo(format!("127.0.0.3:{port}").parse().unwrap());
    let switch = Arc::new(Switch(std::sync::Mutex::new(Some(vec![b1.ip()]))));
    let mut t = tunnel(Mode::Forward, &[], &[]);
    t.targets = vec![format!("backend.test:{port}")];
    t.resolve_interval = Some(0.05);
    let mut cfg = config(t, limits());
    cfg.resolve_targets(None, &*switch).unwrap();
    let mut r = sealpipe::server::start(cfg, None).unwrap();
    r.set_resolver(switch.clone());
    let entry = r.listen_addrs[0];
    let m = r.metrics().clone();
    let control = std::thread::spawn(move || r.wait(Some(std::time::Duration::from_secs(60))));
    let mut c1 = connect(entry);
    ping(&mut c1);
    assert_eq!(count(&n1), 1);
    let addresses = |ip: &str| {
        let text = String::from_utf8(m.render()).unwrap();
        let up = format!("{ip}:{port}");
        text.contains(&format!("upstream=\"{up}\""))
    };

    *switch.0.lock().unwrap() = Some(vec!["127.0.0.3".parse().unwrap()]);
    wait_until("the shards use the new address", || {
        addresses("127.0.0.3") && !addresses("127.0.0.1")
    });
    let mut c2 = connect(entry);
    ping(&mut c2);
    assert_eq!((count(&n1), count(&n2)), (1, 1));
    ping(&mut c1);

    *switch.0.lock().unwrap() = None;
    let failures = || {
        let text = String::from_utf8(m.render()).unwrap();
        metric_in(&text, "sealpipe_resolve_failures_total", &[])
    };
    wait_until("resolution failures counted", || failures() >= 2.0);
    let mut c3 = connect(entry);
    ping(&mut c3);
    assert_eq!(count(&n2), 2, "the last good address is kept");
    ping(&mut c1);
    ping(&mut c2);
    drop(control);
}

// ---------------------------------------------------------------------------------------------
// systemd socket activation.

/// Plays systemd: `sealpipe run --config CFG` exec'd with `listener` as descriptor 3 and
/// LISTEN_PID / LISTEN_FDS / LISTEN_FDNAMES set as systemd sets them (sh moves the socket from
/// its stdin to descriptor 3, and names its own pid, which exec keeps).
fn activate(listener: TcpListener, fdname: &str, cfg: &std::path::Path) -> Proc {
    let child = Command::new("sh")
        .arg("-c")
        .arg(r#"exec 3<&0 0</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES="$1" exec "$2" run --config "$3""#)
        .arg("sh")
        .arg(fdname)
        .arg(env!("CARGO_BIN_EXE_sealpipe"))
        .arg(cfg)
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(listener)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    Proc(child)
}

fn forward_config(
    dir: &std::path::Path,
    name: &str,
    listen: SocketAddr,
    target: SocketAddr,
) -> std::path::PathBuf {
    let cfg = dir.join("sealpipe.toml");
    std::fs::write(
        &cfg,
        format!(
            "[limits]\nthreads = 2\n[[tunnel]]\nname = \"{name}\"\nmode = \"forward\"\n\
             listen = \"{listen}\"\ntargets = [\"{target}\"]\n"
        ),
    )
    .unwrap();
    cfg
}

/// Item 2 of issue 19: a tunnel whose name matches the socket systemd passed serves that
/// socket (shared by both shards) instead of binding its `listen` address, and a client
/// that connected before sealpipe started, while systemd held the socket, is served.
#[test]
fn socket_activation_serves_the_socket_systemd_passed() {
    let backend = echo_backend();
    let dir = temp_dir("sa");
    let configured = free_addr();
    let cfg = forward_config(&dir, "web", configured, backend.addr);
    let socket = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    // Queued in the socket's backlog before any sealpipe runs.
    let mut early = connect(addr);
    let mut p = activate(socket, "web", &cfg);
    early.write_all(b"k").unwrap();
    let mut b = [0u8; 1];
    early.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"k", "the connection made before start is served");
    for _ in 0..8 {
        let mut c = connect(addr);
        ping(&mut c);
    }
    assert!(
        TcpStream::connect(configured).is_err(),
        "the configured listen address {configured} is not bound"
    );
    drop(early);
    p.signal("TERM");
    let status = p.wait_exit(TIMEOUT);
    assert!(status.success(), "{status:?}");
}

/// Item 2 of issue 19: a socket named after no tunnel is refused at start, naming it.
#[test]
fn socket_activation_refuses_a_socket_no_tunnel_is_named_after() {
    let dir = temp_dir("sa-bad");
    let cfg = forward_config(&dir, "web", free_addr(), free_addr());
    let socket = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut p = activate(socket, "wbe", &cfg);
    let status = p.wait_exit(TIMEOUT);
    let mut err = String::new();
    p.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("socket named \"wbe\"") && err.contains("tunnels: web"),
        "{err}"
    );
}

/// Item 2 of issue 19, with systemd's own tool, as docs/OPERATIONS.md shows it:
/// `systemd-socket-activate -l ADDR --fdname=NAME sealpipe run --config FILE` (it execs
/// sealpipe when the first client connects; that client is served).
#[test]
fn systemd_socket_activate_starts_sealpipe_on_the_first_connection() {
    let tool = which("systemd-socket-activate").unwrap_or_else(|e| {
        panic!("systemd-socket-activate is needed (package systemd, as .ci/run installs): {e:?}")
    });
    let backend = echo_backend();
    let dir = temp_dir("ssa");
    let cfg = forward_config(&dir, "web", free_addr(), backend.addr);
    let addr = free_addr();
    let child = Command::new(tool)
        .args(["-l", &addr.to_string(), "--fdname=web"])
        .arg(env!("CARGO_BIN_EXE_sealpipe"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut p = Proc(child);
    wait_until("systemd-socket-activate listening", || {
        TcpStream::connect(addr).map(drop).is_ok()
    });
    let mut c = connect(addr);
    ping(&mut c);
    drop(c);
    p.signal("TERM");
    let status = p.wait_exit(TIMEOUT);
    assert!(status.success(), "{status:?}");
}

/// The path of `prog` on PATH.
fn which(prog: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(prog))
                .find(|p| p.is_file())
        })
        .ok_or(())
}
