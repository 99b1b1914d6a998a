//! Warm sessions end to end (docs/OPERATIONS.md, "Warm sessions"): a real pair and a real
//! backend on loopback. A new client takes a session made ahead of it; the pool follows
//! demand (up to `warm_max` under load, none for an idle tunnel); the decrypt side's warm idle
//! limit and per-source cap; a decrypt side upgraded live (its warm sessions are declined and
//! replaced, its connections move, no failed client, nothing sent twice) or killed with
//! SIGKILL (clients reset promptly); an encrypt side upgraded live (its warm sessions end
//! unused, its connections move, the new process makes its own). Every wait polls a
//! condition with a deadline.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sealpipe::config::{Limits, Mode, TunnelFile};
use sealpipe::server::Running;

use crate::common::*;

/// A decrypt tunnel in front of `backend`, with `f` applied to its settings.
fn decrypt(backend: SocketAddr, key: &PathBuf, f: impl FnOnce(&mut TunnelFile)) -> TunnelFile {
    let mut t = tunnel(Mode::Decrypt, &[backend], std::slice::from_ref(key));
    f(&mut t);
    t
}

/// An encrypt tunnel towards `dec` with warm sessions: at most `max` per shard and target,
/// replaced after `refresh` seconds.
fn encrypt(dec: SocketAddr, key: &PathBuf, max: usize, refresh: f64) -> TunnelFile {
    let mut t = tunnel(Mode::Encrypt, &[dec], std::slice::from_ref(key));
    t.warm_max = Some(max);
    t.warm_refresh = Some(refresh);
    t
}

/// One exchange: connect, send `n` bytes, read them back, close.
fn exchange(addr: SocketAddr, n: usize) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let buf: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
    s.write_all(&buf)?;
    let mut back = vec![0u8; n];
    s.read_exact(&mut back)?;
    if back != buf {
        return Err(std::io::Error::other("the echo differs"));
    }
    s.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    if !rest.is_empty() {
        return Err(std::io::Error::other("bytes after the echo"));
    }
    Ok(())
}

fn warm_sessions(r: &Running, side: &str) -> f64 {
    metric(r, "sealpipe_warm_sessions", &[("side", side)])
}

fn warm_event(r: &Running, event: &str) -> f64 {
    metric(r, "sealpipe_warm_events_total", &[("event", event)])
}

#[test]
fn a_new_client_takes_a_warm_session_and_the_backend_is_reached_only_for_it() {
    let echo = echo_backend();
    let key = keygen("warm-take");
    let (dec, rd) = start(decrypt(echo.addr, &key, |_| {}), limits());
    let (enc, re) = start(encrypt(dec, &key, 4, 25.0), limits());
    // An idle tunnel keeps none: the first client finds none and connects as before.
    assert_eq!(warm_sessions(&re, "encrypt"), 0.0);
    exchange(enc, 1000).unwrap();
    assert_eq!(warm_event(&re, "missed"), 1.0);
    // Now the tunnel has seen a client: a session is made in spare time, and the decrypt
    // side holds it unopened, without a backend connection.
    wait_until("a ready warm session", || {
        warm_sessions(&re, "encrypt") >= 1.0
    });
    wait_until("the decrypt side holds it", || {
        warm_sessions(&rd, "decrypt") >= 1.0
    });
    assert_eq!(
        echo.conns.load(Ordering::SeqCst),
        1,
        "no backend connection for it"
    );
    assert_eq!(warm_event(&re, "made"), warm_sessions(&re, "encrypt"));
    // The next client takes it.
    exchange(enc, 1000).unwrap();
    assert_eq!(warm_event(&re, "used"), 1.0);
    wait_until("the decrypt side saw its OPEN", || {
        warm_event(&rd, "opened") == 1.0
    });
    assert_eq!(echo.conns.load(Ordering::SeqCst), 2);
    assert_eq!(echo.bytes.load(Ordering::SeqCst), 2000, "every byte once");
    // Both ended cleanly; the warm session was no connection until its client took it.
    wait_until("both connections closed", || {
        metric(
            &re,
            "sealpipe_connections_closed_total",
            &[("reason", "clean")],
        ) == 2.0
    });
    assert_eq!(metric(&re, "sealpipe_connections_accepted_total", &[]), 2.0);
}

/// Warm sessions to a decrypt side behind a Unix socket (`targets = ["unix:..."]`, issue 19):
/// made, held and taken through the same connect path as a connection's own.
#[test]
fn warm_sessions_reach_a_decrypt_side_on_a_unix_socket() {
    let echo = echo_backend();
    let key = keygen("warm-unix");
    let sock = temp_dir("warm-unix").join("dec.sock");
    let unix = format!("unix:{}", sock.display());
    let (_, rd) = start(
        decrypt(echo.addr, &key, |t| t.listen = unix.clone()),
        limits(),
    );
    let mut e = encrypt(echo.addr, &key, 4, 25.0);
    e.targets = vec![unix];
    let (enc, re) = start(e, limits());
    exchange(enc, 1000).unwrap();
    assert_eq!(warm_event(&re, "missed"), 1.0);
    wait_until("a ready warm session", || {
        warm_sessions(&re, "encrypt") >= 1.0
    });
    wait_until("the decrypt side holds it", || {
        warm_sessions(&rd, "decrypt") >= 1.0
    });
    exchange(enc, 1000).unwrap();
    assert_eq!(warm_event(&re, "used"), 1.0);
    wait_until("the decrypt side saw its OPEN", || {
        warm_event(&rd, "opened") == 1.0
    });
    assert_eq!(echo.bytes.load(Ordering::SeqCst), 2000, "every byte once");
    assert_eq!(warm_event(&re, "failed"), 0.0);
}

#[test]
fn the_pool_grows_to_warm_max_under_load_and_empties_when_the_tunnel_goes_idle() {
    let echo = echo_backend();
    let key = keygen("warm-size");
    let (dec, rd) = start(decrypt(echo.addr, &key, |_| {}), limits());
    // Demand is weighed over warm_refresh (0.5 s here): a tunnel without a new client for two
    // of those keeps none.
    let (enc, re) = start(encrypt(dec, &key, 3, 0.5), limits());
    let mut most = 0.0f64;
    let deadline = Instant::now() + TIMEOUT;
    let mut n = 0;
    while warm_sessions(&re, "encrypt") < 3.0 {
        assert!(Instant::now() < deadline, "the pool never reached warm_max");
        exchange(enc, 100).unwrap();
        n += 1;
        most = most.max(warm_sessions(&re, "encrypt"));
    }
    for _ in 0..20 {
        exchange(enc, 100).unwrap();
        n += 1;
        most = most.max(warm_sessions(&re, "encrypt"));
    }
    assert!(most <= 3.0, "never more than warm_max: {most}");
    assert!(warm_event(&re, "used") > 0.0);
    // Idle: the encrypt side retires them all (END before OPEN), and the decrypt side
    // forgets them as unused.
    wait_until("the encrypt side keeps none", || {
        warm_sessions(&re, "encrypt") == 0.0 && warm_event(&re, "retired") > 0.0
    });
    wait_until("the decrypt side holds none", || {
        warm_sessions(&rd, "decrypt") == 0.0
    });
    assert!(warm_event(&rd, "unused") > 0.0);
    assert_eq!(warm_event(&rd, "expired"), 0.0, "none waited for its limit");
    assert_eq!(
        echo.bytes.load(Ordering::SeqCst),
        100 * n,
        "every byte once"
    );
    // And it comes back with the next clients.
    exchange(enc, 100).unwrap();
    wait_until("a session again", || warm_sessions(&re, "encrypt") >= 1.0);
}

#[test]
fn the_access_log_has_a_line_per_client_and_none_for_warm_sessions() {
    let echo = echo_backend();
    let key = keygen("warm-log");
    let dir = temp_dir("warm-log");
    let (enc_log, dec_log) = (dir.join("enc.log"), dir.join("dec.log"));
    let (dec, rd) = start(
        decrypt(echo.addr, &key, |t| {
            t.access_log = Some(dec_log.to_str().unwrap().into());
        }),
        limits(),
    );
    let mut e = encrypt(dec, &key, 2, 0.5);
    e.access_log = Some(enc_log.to_str().unwrap().into());
    e.accept_proxy = true;
    e.trusted_proxies = vec!["127.0.0.1".into()];
    let (enc, re) = start(e, limits());
    let header = b"PROXY TCP4 203.0.113.9 198.51.100.1 5555 6379\r\n";
    let request = |s: &mut TcpStream| {
        s.write_all(header).unwrap();
        s.write_all(b"hello").unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
    };
    let mut s = connect(enc);
    request(&mut s);
    drop(s);
    wait_until("a ready warm session", || {
        warm_sessions(&re, "encrypt") >= 1.0
    });
    // A client whose load balancer header is refused takes a session and fails before its
    // OPEN: the decrypt side sees that session end unused, not lost.
    let mut bad = connect(enc);
    bad.write_all(b"PROXY BOGUS\r\n").unwrap();
    let _ = read_to_end(&mut bad);
    wait_until("the decrypt side saw it unused", || {
        warm_event(&rd, "unused") >= 1.0
    });
    let mut s = connect(enc);
    request(&mut s);
    drop(s);
    // Idle: every warm session retires (the decrypt side closes them `unopened`: the refused
    // client's and at least the one ready after the last client). Both gauges read 0 too while
    // a replacement is still in its handshake, so the count is waited for with them.
    wait_until("all warm sessions gone, closed unopened", || {
        warm_sessions(&re, "encrypt") == 0.0
            && warm_sessions(&rd, "decrypt") == 0.0
            && metric(
                &rd,
                "sealpipe_connections_closed_total",
                &[("reason", "unopened")],
            ) >= 2.0
    });
    // A last client: its line comes after any line of those sessions (one writer, in order).
    let mut s = connect(enc);
    request(&mut s);
    drop(s);
    let lines = |p: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    wait_until("the last client's line", || lines(&dec_log).len() >= 3);
    let dec_lines = lines(&dec_log);
    assert_eq!(dec_lines.len(), 3, "one line per client: {dec_lines:#?}");
    for l in &dec_lines {
        assert!(l.contains("\"client\":\"203.0.113.9:5555\""), "{l}");
    }
    // The encrypt side logs its clients, the refused one included, and no warm session.
    wait_until("the encrypt side's lines", || lines(&enc_log).len() >= 4);
    assert_eq!(lines(&enc_log).len(), 4);
}

#[test]
fn the_decrypt_side_expires_unopened_sessions_and_the_encrypt_side_replaces_them() {
    let echo = echo_backend();
    let key = keygen("warm-idle");
    let (dec, rd) = start(
        decrypt(echo.addr, &key, |t| t.warm_idle_timeout = Some(0.3)),
        limits(),
    );
    // A refresh far longer than the decrypt side's limit: a misconfiguration, which the
    // decrypt side survives and the metrics show.
    let (enc, re) = start(encrypt(dec, &key, 1, 30.0), limits());
    exchange(enc, 10).unwrap();
    wait_until("a session expired and was replaced", || {
        warm_event(&rd, "expired") >= 1.0
            && warm_event(&re, "lost") >= 1.0
            && warm_event(&re, "made") >= 2.0
    });
    // Each expired session is closed `unopened` (the two counted in turn, and sessions go on
    // expiring every 0.3 s: the equality is waited for, not read once).
    wait_until("every expired session counted closed unopened", || {
        metric(
            &rd,
            "sealpipe_connections_closed_total",
            &[("reason", "unopened")],
        ) == warm_event(&rd, "expired")
    });
    // Clients are served whatever the pool's state.
    for _ in 0..5 {
        exchange(enc, 10).unwrap();
    }
    assert_eq!(echo.bytes.load(Ordering::SeqCst), 60);
}

#[test]
fn a_source_over_its_unopened_cap_is_refused_and_its_clients_still_served() {
    let echo = echo_backend();
    let key = keygen("warm-cap");
    let l = Limits {
        max_unopened_per_source: 1,
        ..limits()
    };
    let (dec, rd) = start(decrypt(echo.addr, &key, |_| {}), l);
    let (enc, re) = start(encrypt(dec, &key, 4, 25.0), limits());
    let deadline = Instant::now() + TIMEOUT;
    while warm_event(&rd, "over_cap") == 0.0 {
        assert!(Instant::now() < deadline, "the cap was never reached");
        exchange(enc, 10).unwrap();
        assert!(warm_sessions(&rd, "decrypt") <= 1.0, "held over the cap");
    }
    // The refused sessions were closed with an ABORT `unopened`, which the encrypt side
    // counts as lost; clients go on.
    wait_until("the encrypt side saw it", || warm_event(&re, "lost") >= 1.0);
    for _ in 0..5 {
        exchange(enc, 10).unwrap();
    }
    // And the encrypt side does not make session after session to be refused: it backs off.
    // (A window of time to count in, not a wait for an event.)
    // Without back-off a session is refused every millisecond or so: thousands in 2 s. With
    // it, the window holds at most what was still in flight of the last burst (the last
    // client's take ends a run of troubles, so up to warm_max + 1 = 5 may be made and refused
    // before the first pause starts, some of them while the last exchange ran) and one attempt
    // after each pause (1 s, then 2 s): 10 at most, however the scheduler orders them.
    let before = warm_event(&rd, "over_cap");
    std::thread::sleep(Duration::from_secs(2));
    let refused = warm_event(&rd, "over_cap") - before;
    assert!(
        refused <= 10.0,
        "{refused} sessions refused in 2 s: no back-off"
    );
}

/// A decrypt process as a child: `decrypt --listen dec --target backend --key key`, one
/// shard, `extra` flags.
fn decrypt_process(dec: SocketAddr, backend: SocketAddr, key: &PathBuf, extra: &[&str]) -> Proc {
    Proc(
        sealpipe()
            .args([
                "decrypt",
                "--listen",
                &dec.to_string(),
                "--target",
                &backend.to_string(),
                "--threads",
                "1",
                "--log-level",
                "warn",
            ])
            .args(extra)
            .arg("--key")
            .arg(key)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Two exchange threads against `enc` until `stop` (or a minute): each counts its successes
/// in `ok` and returns its failures.
fn churn(
    enc: SocketAddr,
    stop: &Arc<AtomicBool>,
    ok: &Arc<AtomicUsize>,
) -> Vec<std::thread::JoinHandle<Vec<String>>> {
    (0..2)
        .map(|_| {
            let (stop, ok) = (stop.clone(), ok.clone());
            std::thread::spawn(move || {
                let mut errors = Vec::new();
                let end = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    match exchange(enc, 200) {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                errors
            })
        })
        .collect()
}

/// Waits until `ok` reaches `n`.
fn wait_ok(ok: &AtomicUsize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while ok.load(Ordering::Relaxed) < n {
        assert!(Instant::now() < deadline, "churn too slow");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A decrypt side upgraded under churn (a live upgrade: the new process takes the listening
/// socket and every established connection). The old process's warm sessions, held unopened,
/// do not move: the drain the upgrade starts with closes them with an ABORT `unopened` (and
/// any that completes its handshake later, at once), so the encrypt side replaces them with
/// the new process's and sends no client on them; a client racing that decline is sent again
/// on a fresh session. A connection made through a warm session before the upgrade moves.
/// No client fails, nothing reaches the backend twice, and the old process exits long before
/// its drain timeout: it holds no session for a client that would keep it (the encrypt side
/// would replace one only after its `warm_refresh` of 300 s).
///
/// Whether the churning side holds an unopened session at the instant of the upgrade is a
/// race (its clients may have taken every one), so the decline is shown on a second encrypt
/// side whose pool sits idle through the upgrade: its sessions are certainly at the old
/// process, must be declined (`lost`), and replaced by the new process's.
#[test]
fn warm_sessions_move_to_a_new_decrypt_process_across_an_upgrade_with_no_failed_client() {
    let echo = echo_backend();
    let key = keygen("warm-drain");
    let (dec, m_old, m_new) = (free_addr(), free_addr(), free_addr());
    let sock = temp_dir("warm-handoff").join("h.sock");
    let flags = |m: SocketAddr| {
        [
            "--metrics".to_string(),
            m.to_string(),
            "--drain-timeout".into(),
            "120".into(),
            "--handoff".into(),
            sock.to_string_lossy().into_owned(),
        ]
    };
    let f_old = flags(m_old);
    let f_old: Vec<&str> = f_old.iter().map(String::as_str).collect();
    let mut old = decrypt_process(dec, echo.addr, &key, &f_old);
    wait_listening(dec);
    wait_until("the handoff socket", || sock.exists());
    let (enc, re) = start(encrypt(dec, &key, 4, 300.0), limits());
    // The idle side: one client makes it keep a pool, and none comes again until the upgrade.
    let (quiet, rq) = start(encrypt(dec, &key, 2, 300.0), limits());
    exchange(quiet, 10).unwrap();
    wait_until("a warm session on the idle side", || {
        warm_sessions(&rq, "encrypt") >= 1.0
    });
    assert_eq!(warm_event(&rq, "lost"), 0.0);
    // A connection that lives across the upgrade, opened through a warm session.
    exchange(enc, 10).unwrap();
    wait_until("a warm session", || warm_sessions(&re, "encrypt") >= 1.0);
    let used = warm_event(&re, "used");
    let mut long = connect(enc);
    crate::upgrade::echo(&mut long, 1, 1000).unwrap();
    assert_eq!(
        warm_event(&re, "used"),
        used + 1.0,
        "it took a warm session"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let workers = churn(enc, &stop, &ok);
    wait_ok(&ok, 200);
    assert!(warm_event(&re, "used") > 0.0, "clients take warm sessions");
    // The upgrade.
    let f_new = flags(m_new);
    let f_new: Vec<&str> = f_new.iter().map(String::as_str).collect();
    let _new = decrypt_process(dec, echo.addr, &key, &f_new);
    assert_eq!(
        old.wait_exit(Duration::from_secs(30)).code(),
        Some(0),
        "the old process exits once its connections moved (its drain would take 120 s)"
    );
    let at_exit = ok.load(Ordering::Relaxed);
    let used_at_exit = warm_event(&re, "used");
    wait_ok(&ok, at_exit + 300);
    stop.store(true, Ordering::Relaxed);
    let errors: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let n = ok.load(Ordering::Relaxed);
    eprintln!(
        "upgrade under churn: {n} exchanges, {} failed; warm used {} missed {} lost {} retried {}",
        errors.len(),
        warm_event(&re, "used"),
        warm_event(&re, "missed"),
        warm_event(&re, "lost"),
        warm_event(&re, "retried"),
    );
    assert!(
        errors.is_empty(),
        "failed clients: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert!(
        warm_event(&rq, "lost") >= 1.0,
        "the old process's sessions were declined"
    );
    assert!(
        warm_event(&re, "used") > used_at_exit,
        "the new process's are used"
    );
    // The idle side replaced its declined sessions with the new process's, and its next client
    // takes one.
    wait_until("the idle side's pool is made again", || {
        warm_sessions(&rq, "encrypt") >= 1.0
    });
    let quiet_used = warm_event(&rq, "used");
    exchange(quiet, 10).unwrap();
    assert!(
        warm_event(&rq, "used") > quiet_used,
        "it took a warm session"
    );
    // The long-lived connection moved with its session and goes on.
    crate::upgrade::echo(&mut long, 2, 5000).unwrap();
    let t = crate::upgrade::wait_metrics(m_new, "the moved connection", |t| {
        crate::upgrade::handoff_count(t, "moved") >= 1.0
    });
    assert_eq!(crate::upgrade::handoff_count(&t, "failed"), 0.0);
    drop(long);
    // Nothing was sent twice: the backend got exactly the clients' bytes.
    wait_until("the backend's count settles", || {
        echo.bytes.load(Ordering::SeqCst) == 10 + 10 + 6000 + 200 * n + 10
    });
}

/// An encrypt process with warm sessions, itself upgraded under churn. The old process
/// retires its warm sessions as its drain starts (END before OPEN: the decrypt side counts
/// them `unused`, none `lost`), and takes none for a client after; its established
/// connections move, one made through a warm session among them; the new process makes its
/// own pool as clients come and hands them out. No client fails, nothing is sent twice.
///
/// Whether the churned tunnel holds a ready session at the instant of the upgrade is a race
/// (its clients may have taken every one), so the process has a second tunnel to the same
/// decrypt side whose pool sits idle through the upgrade: its sessions are certainly ready
/// when the drain starts, and each must end with an END before OPEN.
#[test]
fn an_encrypt_process_with_warm_sessions_is_upgraded_with_no_failed_client() {
    let echo = echo_backend();
    let key = keygen("warm-enc-upgrade");
    let (dec, rd) = start(decrypt(echo.addr, &key, |_| {}), limits());
    let (enc, quiet, m_old, m_new) = (free_addr(), free_addr(), free_addr(), free_addr());
    let dir = temp_dir("warm-enc-handoff");
    let sock = dir.join("h.sock");
    let args = |m: SocketAddr| {
        let tunnel = |name: &str, listen: SocketAddr| {
            format!(
                "[[tunnel]]\nname = \"{name}\"\nmode = \"encrypt\"\nlisten = \"{listen}\"\n\
                 targets = [\"{dec}\"]\nkeys = [\"{}\"]\nwarm_max = 4\nwarm_refresh = 300\n",
                key.display()
            )
        };
        let cfg = dir.join(format!("{}.toml", m.port()));
        std::fs::write(
            &cfg,
            format!(
                "[log]\nlevel = \"warn\"\n[metrics]\nlisten = \"{m}\"\n\
                 [limits]\nthreads = 1\ndrain_timeout = 120\n{}{}",
                tunnel("churn", enc),
                tunnel("quiet", quiet)
            ),
        )
        .unwrap();
        let mut c = sealpipe();
        c.arg("run")
            .arg("--config")
            .arg(cfg)
            .arg("--handoff")
            .arg(&sock);
        c
    };
    let mut old = crate::upgrade::spawn(&mut args(m_old));
    wait_listening(enc);
    wait_until("the handoff socket", || sock.exists());
    let warm_in = |m: SocketAddr, what: &str| {
        crate::upgrade::scrape(m).map_or(0.0, |t| {
            metric_in(&t, "sealpipe_warm_events_total", &[("event", what)])
        })
    };
    let ready_in = |m: SocketAddr, tunnel: &str| {
        crate::upgrade::scrape(m).map_or(0.0, |t| {
            metric_in(
                &t,
                "sealpipe_warm_sessions",
                &[("side", "encrypt"), ("tunnel", tunnel)],
            )
        })
    };
    // The quiet tunnel: one client makes it keep a pool, and none comes again.
    exchange(quiet, 10).unwrap();
    wait_until("a warm session on the quiet tunnel", || {
        ready_in(m_old, "quiet") >= 1.0
    });
    exchange(enc, 10).unwrap();
    wait_until("a warm session", || ready_in(m_old, "churn") >= 1.0);
    let used = warm_in(m_old, "used");
    let mut long = connect(enc);
    crate::upgrade::echo(&mut long, 1, 1000).unwrap();
    assert_eq!(warm_in(m_old, "used"), used + 1.0, "it took a warm session");
    let lost = warm_event(&rd, "lost");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let workers = churn(enc, &stop, &ok);
    wait_ok(&ok, 200);
    assert!(
        warm_in(m_old, "used") > used + 1.0,
        "clients take warm sessions"
    );
    let (unused, quiet_ready) = (warm_event(&rd, "unused"), ready_in(m_old, "quiet"));
    assert!(quiet_ready >= 1.0, "the quiet tunnel's pool is still there");
    let mut new = crate::upgrade::spawn(&mut args(m_new));
    assert_eq!(
        old.wait_exit(Duration::from_secs(30)).code(),
        Some(0),
        "the old process exits once its connections moved (its drain would take 120 s)"
    );
    let at_exit = ok.load(Ordering::Relaxed);
    wait_ok(&ok, at_exit + 300);
    stop.store(true, Ordering::Relaxed);
    let errors: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let n = ok.load(Ordering::Relaxed);
    assert!(
        errors.is_empty(),
        "failed clients: {:?}",
        &errors[..errors.len().min(5)]
    );
    crate::upgrade::echo(&mut long, 2, 5000).unwrap();
    let t = crate::upgrade::wait_metrics(m_new, "the moved connection", |t| {
        crate::upgrade::handoff_count(t, "moved") >= 1.0
    });
    assert_eq!(crate::upgrade::handoff_count(&t, "failed"), 0.0);
    assert!(
        warm_in(m_new, "used") > 0.0,
        "the new process's pool is used"
    );
    // The old process's sessions ended as retired ones do; none vanished without a word.
    // Once quiet, the decrypt side holds exactly the new process's ready sessions.
    assert!(
        warm_event(&rd, "unused") >= unused + quiet_ready,
        "END before OPEN for each of the quiet tunnel's {quiet_ready} sessions"
    );
    assert_eq!(warm_event(&rd, "lost"), lost, "no session was abandoned");
    wait_until("the decrypt side holds the new process's sessions", || {
        crate::upgrade::scrape(m_new).is_some_and(|t| {
            let ready = metric_in(&t, "sealpipe_warm_sessions", &[("side", "encrypt")]);
            warm_sessions(&rd, "decrypt") == ready
        })
    });
    drop(long);
    wait_until("the backend's count settles", || {
        echo.bytes.load(Ordering::SeqCst) == 10 + 10 + 6000 + 200 * n
    });
    new.signal("TERM");
    assert_eq!(new.wait_exit(TIMEOUT).code(), Some(0));
}

#[test]
fn a_decrypt_side_killed_while_holding_warm_sessions_resets_clients_promptly() {
    let echo = echo_backend();
    let key = keygen("warm-kill");
    let dec = free_addr();
    let mut child = decrypt_process(dec, echo.addr, &key, &[]);
    wait_listening(dec);
    let (enc, re) = start(encrypt(dec, &key, 4, 25.0), limits());
    for _ in 0..10 {
        exchange(enc, 100).unwrap();
    }
    wait_until("warm sessions", || warm_sessions(&re, "encrypt") >= 1.0);
    let before = echo.bytes.load(Ordering::SeqCst);
    child.signal("KILL");
    child.wait_exit(TIMEOUT);
    // Every client from now on is reset (as a connect to a dead host ends), promptly, and
    // nothing reaches the backend.
    for i in 0..8 {
        let started = Instant::now();
        let mut s = connect(enc);
        let sent = s.write_all(b"PING");
        let mut b = [0u8; 16];
        let got = match sent {
            Ok(()) => s.read(&mut b),
            Err(e) => Err(e),
        };
        let took = started.elapsed();
        match got {
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ),
                "client {i}: {e}"
            ),
            Ok(n) => panic!("client {i}: read {n} bytes (a clean end or data) instead of a reset"),
        }
        assert!(
            took < Duration::from_secs(3),
            "client {i}: reset after {took:?}"
        );
    }
    assert_eq!(
        echo.bytes.load(Ordering::SeqCst),
        before,
        "nothing after the kill"
    );
    wait_until("the warm sessions are gone", || {
        warm_sessions(&re, "encrypt") == 0.0
    });
}
