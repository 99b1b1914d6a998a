//! Fleet policy (issue 19): `max_lifetime`, per-tunnel rate limits, Unix domain sockets, and
//! their reloads, over real sockets.

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use sealpipe::config::Mode;
use sealpipe::server::Running;

use crate::common::*;

/// Writes `text` to `path` whole (a reload never reads half a file).
fn write_config(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Connections of `r` closed for `reason`.
fn closed(r: &Running, reason: &str) -> f64 {
    metric(
        r,
        "sealpipe_connections_closed_total",
        &[("reason", reason)],
    )
}

/// One request and its echo.
fn ping(s: &mut std::net::TcpStream) {
    s.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
}

// ---------------------------------------------------------------------------------------------
// max_lifetime

#[test]
fn max_lifetime_ends_a_quiet_connection_cleanly_at_both_ends() {
    let backend = echo_backend();
    let key = keygen("life");
    let (dec, rd) = start_observed(
        tunnel(Mode::Decrypt, &[backend.addr], std::slice::from_ref(&key)),
        limits(),
    );
    let mut t = tunnel(Mode::Encrypt, &[dec], &[key]);
    t.max_lifetime = Some(1.0);
    t.max_lifetime_grace = Some(10.0);
    let (enc, re) = start_observed(t, limits());
    let mut c = connect(enc);
    let accepted = Instant::now();
    ping(&mut c);
    // Quiet from here: the connection ends on its own. The backend reads an end of stream
    // and closes (the echo backend does), and the client then reads a clean end too.
    let (rest, err) = read_to_end(&mut c);
    assert_eq!((rest.len(), err), (0, None), "a clean end, not a reset");
    assert!(
        accepted.elapsed() >= Duration::from_millis(900),
        "not before max_lifetime less its jitter: {:?}",
        accepted.elapsed()
    );
    drop(c);
    wait_until(
        "the encrypt side counted a graceful end and a clean close",
        || {
            metric(
                &re,
                "sealpipe_max_lifetime_ends_total",
                &[("end", "graceful")],
            ) == 1.0
                && closed(&re, "clean") == 1.0
        },
    );
    assert_eq!(
        metric(
            &re,
            "sealpipe_max_lifetime_ends_total",
            &[("end", "forced")]
        ),
        0.0
    );
    wait_until("the decrypt side closed cleanly", || {
        closed(&rd, "clean") == 1.0
    });
}

#[test]
fn a_reload_gives_open_connections_the_new_max_lifetime() {
    let backend = echo_backend();
    let dir = temp_dir("lifereload");
    let path = dir.join("sealpipe.toml");
    let text = |lifetime: &str| {
        format!(
            "[limits]\nthreads = 1\n[[tunnel]]\nname = \"t\"\nmode = \"forward\"\n\
             listen = \"127.0.0.1:0\"\ntargets = [\"{}\"]\n{lifetime}",
            backend.addr
        )
    };
    write_config(&path, &text(""));
    let mut r =
        sealpipe::server::start(sealpipe::config::Config::from_file(&path).unwrap(), None).unwrap();
    let entry = r.listen_addrs[0];
    let mut open = connect(entry);
    ping(&mut open);
    // A bad value is refused, and changes nothing.
    write_config(&path, &text("max_lifetime = 0.5\n"));
    let e = r.reload().unwrap_err();
    assert!(
        e.contains("max_lifetime") && e.contains("at least 1 second"),
        "{e}"
    );
    ping(&mut open);
    write_config(&path, &text("max_lifetime = 1\nmax_lifetime_grace = 30\n"));
    r.reload().unwrap();
    // The connection accepted before the reload ends by the new limit, cleanly.
    let (rest, err) = read_to_end(&mut open);
    assert_eq!((rest.len(), err), (0, None), "a clean end, not a reset");
    drop(open);
    wait_until("a clean close", || closed(&r, "clean") == 1.0);
    assert_eq!(closed(&r, "max_lifetime"), 0.0);
    // A reload that lifts the limit keeps the next connection open past it.
    write_config(&path, &text(""));
    r.reload().unwrap();
    let mut next = connect(entry);
    let started = Instant::now();
    ping(&mut next);
    next.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut b = [0u8; 1];
    let e = next.read(&mut b).unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{e}"
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));
    ping(&mut next);
}

// ---------------------------------------------------------------------------------------------
// Rate limits

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A backend that reads and discards everything, counting the bytes.
fn sink() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicU64::new(0));
    let count = n.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let count = count.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(k) = s.read(&mut buf) {
                    if k == 0 {
                        return;
                    }
                    count.fetch_add(k as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (addr, n)
}

/// `conns` clients writing into `entry` as fast as it takes, until `stop`.
fn firehose(
    entry: std::net::SocketAddr,
    conns: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<std::net::TcpStream>> {
    (0..conns)
        .map(|_| {
            let mut c = connect(entry);
            let stop = stop.clone();
            std::thread::spawn(move || {
                let block = vec![0x5au8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = c.write_all(&block) {
                        panic!("a throttled connection must not be dropped: {e}");
                    }
                }
                c
            })
        })
        .collect()
}

/// Bytes per second `counter` grows by over `window`.
fn rate_over(counter: &AtomicU64, window: Duration) -> f64 {
    let (t0, n0) = (Instant::now(), counter.load(Ordering::Relaxed));
    let end = t0 + window;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (t1, n1) = (Instant::now(), counter.load(Ordering::Relaxed));
    (n1 - n0) as f64 / (t1 - t0).as_secs_f64()
}

/// 100 Mbit/s, in bytes per second.
const LIMIT: f64 = 12_500_000.0;

/// The sum of `name`'s samples with `labels` in `metrics`'s registry now.
fn sample(metrics: &sealpipe::metrics::Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_in(&String::from_utf8(metrics.render()).unwrap(), name, labels)
}

/// Item 2 of issue 19: a tunnel limited to 100 Mbit/s upstream carries that, within 5%, over
/// 10 s, with one connection and with eight spread over two shards, while an unlimited tunnel
/// in the same process runs at full speed. One process (its control loop running, which moves
/// the limits' shares to the shards that carry the traffic), three forward tunnels, all at
/// once.
///
/// A rate test by nature: it measures bytes over a window of time. The bound is the limit's
/// own: a bucket lets through its rate times the window plus what it held when the window
/// began, and the clients keep the buckets empty. The default burst (a second of the rate) is
/// what rides out a shard thread this busy machine did not schedule for a while: the bucket
/// keeps what it earned meanwhile (with a tenth of a second, runs here lost up to 12%). The
/// window starts once the shares have settled (polled, not slept for). The unlimited tunnel
/// runs flat out for three seconds in the middle of the window, measured over two of them:
/// it only has to show it is not held to the limit (more than twice it), as it competes for
/// the two shared cores with everything else on this machine.
#[test]
fn a_byte_rate_limit_holds_within_5_percent_and_leaves_other_tunnels_alone() {
    let (one_sink, one_n) = sink();
    let (eight_sink, eight_n) = sink();
    let (free_sink, free_n) = sink();
    let limited = |name: &str, to| {
        let mut t = tunnel(Mode::Forward, &[to], &[]);
        t.name = Some(name.into());
        t.listen = free_addr().to_string();
        t.upstream_rate = Some("100Mbit".into());
        t
    };
    let mut free = tunnel(Mode::Forward, &[free_sink], &[]);
    free.name = Some("free".into());
    free.listen = free_addr().to_string();
    let cfg = sealpipe::config::ConfigFile {
        limits: sealpipe::config::Limits {
            threads: 2,
            drain_timeout: 5.0,
            ..limits()
        },
        tunnel: vec![limited("one", one_sink), limited("eight", eight_sink), free],
        ..Default::default()
    }
    .validate(None)
    .unwrap();
    let r = sealpipe::server::start(cfg, None).unwrap();
    let (entries, m) = (r.listen_addrs.clone(), r.metrics().clone());
    let control = std::thread::spawn(move || r.wait(Some(Duration::from_secs(60))));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = firehose(entries[0], 1, &stop);
    clients.extend(firehose(entries[1], 8, &stop));
    // The one connection's shard gets (nearly) the whole limit.
    wait_until("the shares followed the one connection", || {
        (0..2).any(|s| {
            let shard = s.to_string();
            let labels = [("tunnel", "one"), ("limit", "upstream"), ("shard", &shard)];
            sample(&m, "sealpipe_rate_limit_share", &labels) > 0.95 * LIMIT
        })
    });
    let spread: Vec<f64> = (0..2)
        .map(|s| {
            let shard = s.to_string();
            let labels = [("tunnel", "eight"), ("shard", shard.as_str())];
            sample(&m, "sealpipe_connections_active", &labels)
        })
        .collect();
    eprintln!("the eight connections per shard: {spread:?}");
    let counters = [&one_n, &eight_n];
    let t0 = Instant::now();
    let n0: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    // The unlimited tunnel runs flat out through the middle of the window: seconds 4 to 7.
    // (Not all ten: it takes every cycle of both cores, and the other tests running beside
    // this one on this machine need some.)
    let free_stop = Arc::new(AtomicBool::new(false));
    let mut free_client = Vec::new();
    let mut free_rate = 0.0;
    while t0.elapsed() < Duration::from_secs(10) {
        let at = t0.elapsed();
        if at >= Duration::from_secs(4) && free_client.is_empty() && free_rate == 0.0 {
            free_client = firehose(entries[2], 1, &free_stop);
        }
        if at >= Duration::from_secs(5) && free_rate == 0.0 {
            free_rate = rate_over(&free_n, Duration::from_secs(2));
            free_stop.store(true, Ordering::Relaxed);
            for c in free_client.drain(..) {
                drop(c.join().unwrap());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut rates: Vec<f64> = counters
        .iter()
        .zip(&n0)
        .map(|(c, n)| (c.load(Ordering::Relaxed) - n) as f64 / secs)
        .collect();
    rates.push(free_rate);
    // No limited connection was dropped or refused meanwhile.
    let counted = |name: &str| {
        ["one", "eight"]
            .map(|t| sample(&m, name, &[("tunnel", t)]))
            .iter()
            .sum::<f64>()
    };
    let closed = counted("sealpipe_connections_closed_total");
    let rejected = counted("sealpipe_connections_rejected_total");
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        drop(c.join().unwrap());
    }
    assert_eq!((closed, rejected), (0.0, 0.0), "no connection dropped");
    let mbit = |r: f64| r * 8.0 / 1e6;
    eprintln!(
        "over {secs:.2} s: one {:.2} Mbit/s, eight {:.2} Mbit/s, free {:.0} Mbit/s",
        mbit(rates[0]),
        mbit(rates[1]),
        mbit(rates[2])
    );
    for (name, rate) in [
        ("one connection", rates[0]),
        ("eight connections", rates[1]),
    ] {
        assert!(
            (rate - LIMIT).abs() <= 0.05 * LIMIT,
            "{name}: {:.2} Mbit/s, not within 5% of 100",
            mbit(rate)
        );
    }
    assert!(
        rates[2] > 2.0 * LIMIT,
        "the unlimited tunnel was held near the others' limit: {:.0} Mbit/s",
        mbit(rates[2])
    );
    // Throttled and counted, never dropped; the shares of each limit add up to it.
    for name in ["one", "eight"] {
        let labels = [("tunnel", name), ("direction", "upstream")];
        assert!(sample(&m, "sealpipe_throttled_total", &labels) > 0.0);
        assert!(sample(&m, "sealpipe_throttled_seconds_total", &labels) > 0.0);
        // New shares reach the shards as messages, one shard after the other: a scrape between
        // two of them sees the old share of one beside the new share of the other. Once a
        // round has reached every shard they add up again.
        let total = || {
            sample(
                &m,
                "sealpipe_rate_limit_share",
                &[("tunnel", name), ("limit", "upstream")],
            )
        };
        wait_until(
            &format!("{name}: the shares to add up to the limit"),
            || (total() - LIMIT).abs() < 1.0,
        );
    }
    assert_eq!(
        sample(&m, "sealpipe_throttled_total", &[("tunnel", "free")]),
        0.0
    );
    // The control loop drains the process in the background when its time is up.
    drop(control);
}

/// GET /metrics of a child process; `None` while its endpoint is not up.
fn scrape(addr: std::net::SocketAddr) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(TIMEOUT)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.contains(" 200 ").then_some(out)
}

/// Polls a child's metrics until `f(text)` holds.
fn wait_scraped(addr: std::net::SocketAddr, what: &str, f: impl Fn(&str) -> bool) -> String {
    let mut last = None;
    wait_until(what, || {
        last = scrape(addr).filter(|t| f(t));
        last.is_some()
    });
    last.unwrap()
}

/// Item 4 of issue 19: SIGHUP changes a tunnel's byte rate, and the connection open across
/// the reloads is slowed, sped up and set free without being dropped.
#[test]
fn sighup_changes_the_byte_rate_of_an_open_connection_and_drops_none() {
    let (to, n) = sink();
    let (listen, metrics) = (free_addr(), free_addr());
    let dir = temp_dir("ratereload");
    let path = dir.join("sealpipe.toml");
    let text = |rate: &str| {
        format!(
            "[metrics]\nlisten = \"{metrics}\"\n[limits]\nthreads = 1\n\
             [[tunnel]]\nname = \"t\"\nmode = \"forward\"\nlisten = \"{listen}\"\n\
             targets = [\"{to}\"]\n{rate}"
        )
    };
    write_config(&path, &text("upstream_rate = \"20Mbit\"\n"));
    let p = Proc(
        sealpipe()
            .args(["run", "--config"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(listen);
    // That probe was a connection: let it be counted closed first.
    let closed = |t: &str| metric_in(t, "sealpipe_connections_closed_total", &[]);
    wait_scraped(metrics, "the probe closed", |t| closed(t) == 1.0);
    let stop = Arc::new(AtomicBool::new(false));
    let client = firehose(listen, 1, &stop);
    let within = |rate: f64, limit: f64| (rate - limit).abs() <= 0.05 * limit;
    // 20 Mbit/s, after a second to empty the bucket.
    let _ = rate_over(&n, Duration::from_secs(1));
    let slow = rate_over(&n, Duration::from_secs(3));
    assert!(
        within(slow, 2_500_000.0),
        "{:.2} Mbit/s, not 20",
        slow * 8e-6
    );
    // 80 Mbit/s.
    write_config(&path, &text("upstream_rate = \"80Mbit\"\n"));
    p.signal("HUP");
    let reloads = |t: &str| metric_in(t, "sealpipe_config_reloads_total", &[("result", "ok")]);
    wait_scraped(metrics, "the first reload", |t| reloads(t) == 1.0);
    let _ = rate_over(&n, Duration::from_secs(1));
    let fast = rate_over(&n, Duration::from_secs(3));
    assert!(
        within(fast, 10_000_000.0),
        "{:.2} Mbit/s, not 80",
        fast * 8e-6
    );
    // No limit.
    write_config(&path, &text(""));
    p.signal("HUP");
    wait_scraped(metrics, "the second reload", |t| reloads(t) == 2.0);
    let _ = rate_over(&n, Duration::from_millis(500));
    let free = rate_over(&n, Duration::from_secs(1));
    assert!(free > 4.0 * 10_000_000.0, "{:.0} Mbit/s", free * 8e-6);
    // One connection all along (besides the probe): never dropped, nor refused.
    let t = scrape(metrics).unwrap();
    assert_eq!(
        metric_in(&t, "sealpipe_connections_accepted_total", &[]),
        2.0
    );
    assert_eq!(closed(&t), 1.0);
    assert!(metric_in(&t, "sealpipe_throttled_total", &[("direction", "upstream")]) > 0.0);
    stop.store(true, Ordering::Relaxed);
    for c in client {
        drop(c.join().unwrap());
    }
}

/// One request and its echo on a new connection, or the error that refused it.
fn try_ping(entry: std::net::SocketAddr) -> std::io::Result<()> {
    let mut s = std::net::TcpStream::connect(entry)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(b"ping")?;
    let mut b = [0u8; 4];
    s.read_exact(&mut b)
}

/// Item 2 of issue 19: over `conn_rate`, new connections are refused at accept and counted;
/// the bucket refills at the rate.
#[test]
fn connections_over_the_conn_rate_are_refused_at_accept_and_counted() {
    let backend = echo_backend();
    let mut t = tunnel(Mode::Forward, &[backend.addr], &[]);
    t.conn_rate = Some(2.0);
    t.conn_rate_burst = Some(5.0);
    let (entry, r) = start(t, limits());
    let started = Instant::now();
    let ok = (0..20).filter(|_| try_ping(entry).is_ok()).count();
    let took = started.elapsed().as_secs_f64();
    // The burst of 5, and what 2 per second refilled meanwhile.
    let most = 5 + (took * 2.0).ceil() as usize;
    assert!((5..=most).contains(&ok), "{ok} of 20 in {took:.2} s");
    let rejected = metric(
        &r,
        "sealpipe_connections_rejected_total",
        &[("reason", "rate")],
    );
    assert_eq!(rejected as usize, 20 - ok);
    assert_eq!(backend.conns.load(std::sync::atomic::Ordering::SeqCst), ok);
    // Half a second later there is room again.
    wait_until("the bucket refilled", || try_ping(entry).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Unix domain sockets

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};

/// A backend on a Unix socket at `path` that echoes every connection.
fn unix_echo(path: &std::path::Path) {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let _ = std::io::copy(&mut s, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

fn unix_connect(path: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// Item 3 of issue 19: a pair whose encrypt side listens on a Unix socket and whose decrypt
/// side's target is one: the client and the backend never touch TCP; the sealed hop does.
#[test]
fn a_pair_from_a_unix_socket_to_a_unix_socket() {
    let dir = temp_dir("unixpair");
    let (entry, backend) = (dir.join("entry.sock"), dir.join("backend.sock"));
    unix_echo(&backend);
    let key = keygen("unixpair");
    let mut d = tunnel(Mode::Decrypt, &[], std::slice::from_ref(&key));
    d.targets = vec![format!("unix:{}", backend.display())];
    let (dec, rd) = start_observed(d, limits());
    let mut e = tunnel(Mode::Encrypt, &[dec], &[key]);
    e.listen = format!("unix:{}", entry.display());
    e.listen_mode = Some("0600".into());
    let (_, re) = start_observed(e, limits());
    let mut c = unix_connect(&entry);
    let msg: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    let mut w = c.try_clone().unwrap();
    let sent = msg.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&sent).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert!(got == msg, "echoed {} of {} bytes", got.len(), msg.len());
    // The backend's path is the upstream's label; the close was clean on both sides.
    let up = backend.display().to_string();
    assert_eq!(
        metric(&rd, "sealpipe_upstream_up", &[("upstream", &up)]),
        1.0
    );
    wait_until("both sides closed cleanly", || {
        closed(&re, "clean") == 1.0 && closed(&rd, "clean") == 1.0
    });
}

/// A forward tunnel listening on `listen` (a Unix socket), and what starting it says.
fn start_unix(
    listen: &std::path::Path,
    file: impl FnOnce(&mut sealpipe::config::TunnelFile),
) -> Result<Running, String> {
    let mut t = tunnel(Mode::Forward, &[echo_backend().addr], &[]);
    t.listen = format!("unix:{}", listen.display());
    file(&mut t);
    sealpipe::server::start(config(t, limits()), None).map_err(|e| e.to_string())
}

/// The error starting it gives (it must fail).
fn refused(r: Result<Running, String>) -> String {
    match r {
        Ok(_) => panic!("it started"),
        Err(e) => e,
    }
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_is_never_deleted() {
    let dir = temp_dir("unixstale");
    let path = dir.join("app.sock");
    // Stale: a socket file nobody serves (its listener is gone).
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let r = start_unix(&path, |_| {}).unwrap();
    let mut c = unix_connect(&path);
    c.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping", "served on the path the stale file held");
    drop(c);
    // Live: another process (here, this test) serves the path: refused, and the socket stays.
    let live_path = dir.join("live.sock");
    let live = UnixListener::bind(&live_path).unwrap();
    let e = refused(start_unix(&live_path, |_| {}));
    assert!(
        e.contains(&live_path.display().to_string()) && e.contains("another process serves"),
        "{e}"
    );
    assert!(live_path.exists(), "the live socket was not deleted");
    let probe = UnixStream::connect(&live_path).unwrap();
    let (_accepted, _) = live.accept().unwrap();
    drop(probe);
    // Not a socket: never replaced.
    let file = dir.join("file.sock");
    std::fs::write(&file, b"data").unwrap();
    let e = refused(start_unix(&file, |_| {}));
    assert!(e.contains("is not a socket"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
    // When the process is done, its socket goes.
    r.wait(Some(Duration::ZERO)).unwrap();
    assert!(!path.exists(), "the socket file was removed at exit");
}

#[test]
fn the_socket_file_gets_its_mode_and_owner_before_anyone_can_connect() {
    let dir = temp_dir("unixmode");
    let path = dir.join("app.sock");
    let (uid, gid) = {
        let m = std::fs::metadata(&dir).unwrap();
        (m.uid(), m.gid())
    };
    let r = start_unix(&path, |t| {
        t.listen_mode = Some(sealpipe::config::FileMode::Number(0o640));
        t.listen_owner = Some(uid.to_string());
        t.listen_group = Some(gid.to_string());
    })
    .unwrap();
    let m = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o640);
    assert_eq!((m.uid(), m.gid()), (uid, gid));
    // The private name it was bound under is gone.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["app.sock"]);
    drop(r);
    // A name nobody has is refused, naming the key and the name.
    let e = refused(start_unix(&dir.join("b.sock"), |t| {
        t.listen_owner = Some("no-such-user-sealpipe".into())
    }));
    assert!(
        e.contains("listen_owner") && e.contains("no user named \"no-such-user-sealpipe\""),
        "{e}"
    );
    assert!(!dir.join("b.sock").exists(), "nothing left behind");
}

// ---------------------------------------------------------------------------------------------
// `sealpipe check` and reloads of the new keys

/// Item 4 of issue 19: `sealpipe check` refuses each new key's bad values with a line naming
/// the key and the reason (exit status 2), and accepts them all when good.
#[test]
fn check_names_the_key_and_the_reason_for_each_bad_value() {
    let dir = temp_dir("checkkeys");
    let tcp = "[[tunnel]]\nname = \"t\"\nmode = \"forward\"\nlisten = \"127.0.0.1:7000\"\ntargets = [\"127.0.0.1:7001\"]\n";
    let unix = "[[tunnel]]\nname = \"t\"\nmode = \"forward\"\nlisten = \"unix:/run/app/in.sock\"\ntargets = [\"unix:/run/app/out.sock\"]\n";
    let check = |text: &str| {
        let path = dir.join("c.toml");
        std::fs::write(&path, text).unwrap();
        let out = sealpipe()
            .args(["check", "--no-key-files", "--no-resolve", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), err)
    };
    let good = format!(
        "{unix}listen_mode = \"0660\"\nlisten_owner = \"0\"\nlisten_group = \"0\"\n\
         max_lifetime = 3600\nmax_lifetime_grace = 30\nconn_rate = 100\nconn_rate_burst = 200\n\
         upstream_rate = \"100Mbit\"\ndownstream_rate = \"12.5MB/s\"\nrate_burst = \"4MiB\"\n"
    );
    let (code, err) = check(&good);
    assert_eq!(code, Some(0), "{err}");
    for (base, bad, key, why) in [
        (
            tcp,
            "max_lifetime = 0.5",
            "max_lifetime",
            "at least 1 second",
        ),
        (
            tcp,
            "max_lifetime = -3",
            "max_lifetime",
            "between 0 and one year",
        ),
        (
            tcp,
            "max_lifetime_grace = 5",
            "max_lifetime_grace",
            "no effect without max_lifetime",
        ),
        (tcp, "conn_rate = -1", "conn_rate", "between 0 (no limit)"),
        (
            tcp,
            "conn_rate_burst = 10",
            "conn_rate_burst",
            "no effect without conn_rate",
        ),
        (
            tcp,
            "upstream_rate = \"10Mb\"",
            "upstream_rate",
            "unknown unit \"Mb\"",
        ),
        (tcp, "downstream_rate = 10", "downstream_rate", "from 1000"),
        (
            tcp,
            "rate_burst = \"1MB\"",
            "rate_burst",
            "no effect without upstream_rate",
        ),
        (
            tcp,
            "listen_mode = \"0600\"",
            "listen_mode",
            "applies to a Unix socket",
        ),
        (
            unix,
            "listen_mode = \"0999\"",
            "listen_mode",
            "permission bits from 0 to 0777",
        ),
        (
            unix,
            "listen_owner = \"no body\"",
            "listen_owner",
            "not a user or group name",
        ),
        (
            unix,
            "deny = [\"10.0.0.0/8\"]",
            "deny",
            "needs an IP listen address",
        ),
    ] {
        let (code, err) = check(&format!("{base}{bad}\n"));
        assert_eq!(code, Some(2), "{bad}: {err}");
        let line = err.lines().find(|l| l.contains("error")).unwrap_or("");
        assert!(
            line.contains("tunnel \"t\"") && line.contains(key) && line.contains(why),
            "{bad}: {err}"
        );
    }
    let (code, err) = check(
        "[[tunnel]]\nmode = \"forward\"\nlisten = \"unix:relative.sock\"\ntargets = [\"127.0.0.1:1\"]\n",
    );
    assert_eq!(code, Some(2));
    assert!(
        err.contains("listen") && err.contains("must be absolute"),
        "{err}"
    );
}

/// Item 4 of issue 19: a reload gives a Unix socket's file its new mode (its path stays; a new
/// path needs a restart, as a new TCP address does), and the connection open across it stays.
#[test]
fn a_reload_sets_the_unix_socket_mode_again_and_keeps_connections() {
    let dir = temp_dir("unixreload");
    let sock = dir.join("app.sock");
    let path = dir.join("sealpipe.toml");
    let backend = echo_backend();
    let text = |mode: &str| {
        format!(
            "[limits]\nthreads = 1\n[[tunnel]]\nname = \"t\"\nmode = \"forward\"\n\
             listen = \"unix:{}\"\ntargets = [\"{}\"]\nlisten_mode = \"{mode}\"\n",
            sock.display(),
            backend.addr
        )
    };
    write_config(&path, &text("0600"));
    let mut r =
        sealpipe::server::start(sealpipe::config::Config::from_file(&path).unwrap(), None).unwrap();
    let mode = || {
        std::fs::symlink_metadata(&sock)
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(), 0o600);
    let mut c = unix_connect(&sock);
    c.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    c.read_exact(&mut b).unwrap();
    write_config(&path, &text("0666"));
    r.reload().unwrap();
    assert_eq!(mode(), 0o666);
    c.write_all(b"pong").unwrap();
    c.read_exact(&mut b).unwrap();
    assert_eq!(
        &b, b"pong",
        "the connection open across the reload carries on"
    );
    // Another path is another socket: that needs a restart.
    let moved = text("0666").replace("app.sock", "other.sock");
    write_config(&path, &moved);
    let e = r.reload().unwrap_err();
    assert!(e.contains("needs a restart"), "{e}");
}
