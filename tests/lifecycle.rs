//! Process lifecycle, end to end with the real binary: shards, SIGHUP reloads and key
//! rotation, the listener handoff under connection churn, connection limits, EMFILE.
//! Every wait polls a condition (a metric, a connect, a child's exit) with a deadline.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;

/// Children's logs go nowhere, or to files under `$SEALPIPE_TEST_LOGS` when debugging.
fn spawn(cmd: &mut Command) -> Proc {
    let err = match std::env::var_os("SEALPIPE_TEST_LOGS") {
        Some(d) => {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = Path::new(&d).join(format!("child-{n}.log"));
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

/// Sum of the samples of `name` whose labels include every `k="v"` of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls the endpoint until `f(text)` holds.
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

/// One short exchange: connect, send `n` bytes, read them back, close.
fn exchange(addr: SocketAddr, n: usize) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let buf = vec![0x5a; n];
    s.write_all(&buf)?;
    let mut back = vec![0u8; n];
    s.read_exact(&mut back)?;
    if back != buf {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

/// One round trip on an open connection.
fn ping(s: &mut TcpStream, byte: u8) -> std::io::Result<()> {
    s.write_all(&[byte; 32])?;
    let mut b = [0u8; 32];
    s.read_exact(&mut b)?;
    if b != [byte; 32] {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

fn write_config(path: &Path, text: &str) {
    // Write then rename, so a reload never reads a half-written file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn tunnel_toml(
    mode: &str,
    listen: SocketAddr,
    targets: &[SocketAddr],
    keys: &[&PathBuf],
) -> String {
    let targets: Vec<String> = targets.iter().map(|a| format!("\"{a}\"")).collect();
    let keys: Vec<String> = keys
        .iter()
        .map(|k| format!("{:?}", k.to_string_lossy()))
        .collect();
    format!(
        "[log]\nlevel = \"warn\"\n[metrics]\nlisten = \"{{METRICS}}\"\n[limits]\nthreads = 1\ndrain_timeout = 5\n\
         [[tunnel]]\nname = \"t\"\nmode = \"{mode}\"\nlisten = \"{listen}\"\ntargets = [{}]\nkeys = [{}]\n",
        targets.join(", "),
        keys.join(", ")
    )
}

fn with_metrics(text: String, m: SocketAddr) -> String {
    text.replace("{METRICS}", &m.to_string())
}

fn reloads(text: &str, result: &str) -> f64 {
    metric(text, "sealpipe_config_reloads_total", &[("result", result)])
}

#[test]
fn both_shards_of_two_accept_connections() {
    let echo = echo_backend();
    let (listen, metrics) = (free_addr(), free_addr());
    let _p = spawn(sealpipe().args([
        "forward",
        "--listen",
        &listen.to_string(),
        "--target",
        &echo.addr.to_string(),
        "--threads",
        "2",
        "--metrics",
        &metrics.to_string(),
        "--log-level",
        "warn",
    ]));
    wait_listening(listen);
    // Clients from one thread per CPU of our affinity mask: SO_REUSEPORT hashes the 4-tuple
    // (and with --incoming-cpu each CPU's clients would go to that CPU's shard). Either way
    // both shards must get some.
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let clients: Vec<_> = (0..2)
        .map(|i| {
            let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
            std::thread::spawn(move || {
                if let Some(c) = core {
                    core_affinity::set_for_current(c);
                }
                for _ in 0..100 {
                    exchange(listen, 16).unwrap();
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let per_shard =
        |t: &str, s: &str| metric(t, "sealpipe_connections_accepted_total", &[("shard", s)]);
    let t = wait_metrics(metrics, "200 accepted", |t| {
        metric(t, "sealpipe_connections_accepted_total", &[]) >= 200.0
    });
    let (s0, s1) = (per_shard(&t, "0"), per_shard(&t, "1"));
    assert!(s0 > 0.0 && s1 > 0.0, "shard 0: {s0}, shard 1: {s1}");
    eprintln!("two shards: {s0} and {s1} of {} connections", s0 + s1);
}

/// Connections accepted by each of two shards of `sealpipe forward --threads 2 EXTRA...` when
/// one client thread pinned to the first CPU of our affinity mask opens `n` of them.
fn accepted_per_shard_from_one_cpu(extra: &[&str], n: usize) -> (f64, f64) {
    let echo = echo_backend();
    let (listen, metrics) = (free_addr(), free_addr());
    let _p = spawn(
        sealpipe()
            .args([
                "forward",
                "--listen",
                &listen.to_string(),
                "--target",
                &echo.addr.to_string(),
                "--threads",
                "2",
                "--metrics",
                &metrics.to_string(),
                "--log-level",
                "warn",
            ])
            .args(extra),
    );
    wait_listening(listen);
    let accepted = |t: &str, shard: &str| {
        metric(
            t,
            "sealpipe_connections_accepted_total",
            &[("shard", shard)],
        )
    };
    // wait_listening's probe connection counts too: take the baseline after it.
    let before = wait_metrics(metrics, "the probe accepted", |t| {
        metric(t, "sealpipe_connections_accepted_total", &[]) >= 1.0
    });
    let (b0, b1) = (accepted(&before, "0"), accepted(&before, "1"));
    let cores = core_affinity::get_core_ids().expect("the test's affinity mask");
    let client = std::thread::spawn(move || {
        assert!(
            core_affinity::set_for_current(cores[0]),
            "cannot pin the client thread"
        );
        for _ in 0..n {
            exchange(listen, 16).unwrap();
        }
    });
    client.join().unwrap();
    let t = wait_metrics(metrics, "all connections accepted", |t| {
        metric(t, "sealpipe_connections_accepted_total", &[]) >= b0 + b1 + n as f64
    });
    let (s0, s1) = (accepted(&t, "0") - b0, accepted(&t, "1") - b1);
    assert_eq!(s0 + s1, n as f64, "shard 0: {s0}, shard 1: {s1}");
    (s0, s1)
}

/// Item 3 of issue 14: with the default settings (unpinned shards, plain SO_REUSEPORT hashing)
/// a client that runs on one CPU — a sidecar's application, `taskset -c 1` — still spreads
/// its connections over every shard. With SO_INCOMING_CPU they would all go to the shard on
/// the client's CPU (on loopback the SYN is processed on the sender's CPU).
#[test]
fn one_client_cpu_spreads_over_both_shards_by_default() {
    const N: usize = 1000;
    let (s0, s1) = accepted_per_shard_from_one_cpu(&[], N);
    let min = 0.3 * N as f64;
    assert!(
        s0 >= min && s1 >= min,
        "one client CPU, {N} connections: shard 0 got {s0}, shard 1 got {s1} (each should get >= 30%)"
    );
}

/// The opt-in: `--pin --incoming-cpu` hands a connection to the shard pinned on the CPU that
/// processed its packets — on loopback the client's CPU, which shard 0 is pinned to.
#[test]
fn incoming_cpu_keeps_connections_on_the_receiving_cpus_shard() {
    if core_affinity::get_core_ids().is_none_or(|c| c.len() < 2) {
        panic!("this test needs two CPUs in its affinity mask");
    }
    const N: usize = 200;
    let (s0, s1) = accepted_per_shard_from_one_cpu(&["--pin", "--incoming-cpu"], N);
    assert!(
        s0 >= 0.9 * N as f64,
        "--incoming-cpu, client on shard 0's CPU: shard 0 got {s0}, shard 1 got {s1}"
    );
}

#[test]
fn sighup_adds_an_upstream() {
    let (a, b) = (echo_backend(), echo_backend());
    let dir = temp_dir("hup-up");
    let cfg = dir.join("c.toml");
    let (listen, m) = (free_addr(), free_addr());
    // A forward tunnel takes no keys.
    let text = |targets: &[SocketAddr]| {
        with_metrics(tunnel_toml("forward", listen, targets, &[]), m).replace("keys = []\n", "")
    };
    write_config(&cfg, &text(&[a.addr]));
    let p = spawn(sealpipe().arg("run").arg("--config").arg(&cfg));
    wait_listening(listen);
    for _ in 0..4 {
        exchange(listen, 10).unwrap();
    }
    assert_eq!(b.conns.load(Ordering::SeqCst), 0);
    write_config(&cfg, &text(&[a.addr, b.addr]));
    p.signal("HUP");
    wait_metrics(m, "a good reload", |t| reloads(t, "ok") == 1.0);
    // Round robin: the new target gets its share at once.
    for _ in 0..4 {
        exchange(listen, 10).unwrap();
    }
    assert!(b.conns.load(Ordering::SeqCst) >= 1, "B never reached");
    assert!(a.conns.load(Ordering::SeqCst) >= 5);
}

/// Key ids of `sealpipe_keys_loaded`, as (id, role).
fn keys_loaded(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = text
        .lines()
        .filter(|l| l.starts_with("sealpipe_keys_loaded{") && l.ends_with(" 1"))
        .map(|l| {
            let get = |k: &str| {
                let start = l.find(&format!("{k}=\"")).unwrap() + k.len() + 2;
                l[start..start + l[start..].find('"').unwrap()].to_string()
            };
            (get("key_id"), get("role"))
        })
        .collect();
    out.sort();
    out
}

fn key_id(path: &Path) -> String {
    let ks = sealpipe::keyfile::load_key_set(&[path.to_path_buf()]).unwrap();
    ks.primary().id().to_string()
}

#[test]
fn sighup_rotates_keys_and_keeps_old_connections() {
    let echo = echo_backend();
    let old = keygen("rot-old");
    let new = keygen("rot-new");
    let (old_id, new_id) = (key_id(&old), key_id(&new));
    let dir = temp_dir("rot");
    let (dcfg, ecfg) = (dir.join("d.toml"), dir.join("e.toml"));
    let (dl, dm, el, em) = (free_addr(), free_addr(), free_addr(), free_addr());
    write_config(
        &dcfg,
        &with_metrics(tunnel_toml("decrypt", dl, &[echo.addr], &[&old]), dm),
    );
    write_config(
        &ecfg,
        &with_metrics(tunnel_toml("encrypt", el, &[dl], &[&old]), em),
    );
    let dec = spawn(sealpipe().arg("run").arg("--config").arg(&dcfg));
    let enc = spawn(sealpipe().arg("run").arg("--config").arg(&ecfg));
    wait_listening(dl);
    wait_listening(el);
    let mut before = connect(el);
    ping(&mut before, 1).unwrap();

    // 1. The decrypt side accepts both.
    write_config(
        &dcfg,
        &with_metrics(tunnel_toml("decrypt", dl, &[echo.addr], &[&new, &old]), dm),
    );
    dec.signal("HUP");
    let t = wait_metrics(dm, "decrypt reload", |t| reloads(t, "ok") == 1.0);
    let mut want = vec![
        (new_id.clone(), "primary".to_string()),
        (old_id.clone(), "accepted".to_string()),
    ];
    want.sort();
    assert_eq!(keys_loaded(&t), want);
    // 2. The encrypt side sends with the new key only.
    write_config(
        &ecfg,
        &with_metrics(tunnel_toml("encrypt", el, &[dl], &[&new]), em),
    );
    enc.signal("HUP");
    let t = wait_metrics(em, "encrypt reload", |t| reloads(t, "ok") == 1.0);
    assert_eq!(
        keys_loaded(&t),
        vec![(new_id.clone(), "primary".to_string())]
    );
    let mut after = connect(el);
    ping(&mut after, 2).unwrap();
    ping(&mut before, 3).unwrap();
    // 3. The decrypt side retires the old key.
    write_config(
        &dcfg,
        &with_metrics(tunnel_toml("decrypt", dl, &[echo.addr], &[&new]), dm),
    );
    dec.signal("HUP");
    let t = wait_metrics(dm, "second decrypt reload", |t| reloads(t, "ok") == 2.0);
    assert_eq!(keys_loaded(&t), vec![(new_id, "primary".to_string())]);
    // Established connections keep their session keys.
    ping(&mut before, 4).unwrap();
    ping(&mut after, 5).unwrap();
    exchange(el, 64).unwrap();
    // A client still sending with the old key is turned away at the handshake.
    let (stale, _r) = start(
        tunnel(sealpipe::config::Mode::Encrypt, &[dl], &[old]),
        limits(),
    );
    let mut s = connect(stale);
    let _ = s.write_all(b"hello");
    let (got, _) = read_to_end(&mut s);
    assert!(got.is_empty(), "old key still accepted");
    wait_metrics(dm, "unknown_key handshake", |t| {
        metric(t, "sealpipe_handshakes_total", &[("result", "unknown_key")]) >= 1.0
    });
}

#[test]
fn invalid_reload_is_rejected_whole_and_the_old_config_serves() {
    let echo = echo_backend();
    let key = keygen("bad-k");
    let (dec, _rd) = start(
        tunnel(
            sealpipe::config::Mode::Decrypt,
            &[echo.addr],
            std::slice::from_ref(&key),
        ),
        limits(),
    );
    let dir = temp_dir("bad");
    let cfg = dir.join("c.toml");
    let (listen, m) = (free_addr(), free_addr());
    write_config(
        &cfg,
        &with_metrics(tunnel_toml("encrypt", listen, &[dec], &[&key]), m),
    );
    let p = spawn(sealpipe().arg("run").arg("--config").arg(&cfg));
    wait_listening(listen);
    exchange(listen, 100).unwrap();

    // Bad TOML.
    write_config(&cfg, "[[tunnel]\nname = ");
    p.signal("HUP");
    wait_metrics(m, "a failed reload", |t| reloads(t, "error") == 1.0);
    exchange(listen, 100).unwrap();

    // A world-readable key file: the whole new config (here: also a second target) is refused.
    let loose = keygen("bad-loose");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let unused = free_addr();
    write_config(
        &cfg,
        &with_metrics(tunnel_toml("encrypt", listen, &[unused, dec], &[&loose]), m),
    );
    p.signal("HUP");
    let t = wait_metrics(m, "a second failed reload", |t| reloads(t, "error") == 2.0);
    assert_eq!(reloads(&t, "ok"), 0.0);
    // Still the old key (the decrypt side knows only it) and the old single target.
    for _ in 0..4 {
        exchange(listen, 100).unwrap();
    }
    assert_eq!(keys_loaded(&t), vec![(key_id(&key), "primary".to_string())]);
}

#[test]
fn max_conns_holds_the_next_client_until_one_closes() {
    let echo = echo_backend();
    let (listen, m) = (free_addr(), free_addr());
    let _p = spawn(sealpipe().args([
        "forward",
        "--listen",
        &listen.to_string(),
        "--target",
        &echo.addr.to_string(),
        "--threads",
        "1",
        "--max-conns",
        "4",
        "--metrics",
        &m.to_string(),
        "--log-level",
        "error",
    ]));
    wait_listening(listen);
    // wait_listening's probe connections count too: let them close first.
    wait_metrics(m, "probes closed", |t| {
        metric(t, "sealpipe_connections_active", &[]) == 0.0
    });
    let mut held: Vec<TcpStream> = (0..4u8)
        .map(|i| {
            let mut s = connect(listen);
            ping(&mut s, i).unwrap();
            s
        })
        .collect();
    // The fifth is queued by the kernel but not served.
    let mut fifth = connect(listen);
    fifth.write_all(&[9u8; 32]).unwrap();
    fifth
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 32];
    let e = fifth.read_exact(&mut b).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    wait_metrics(m, "a max_conns rejection", |t| {
        metric(
            t,
            "sealpipe_connections_rejected_total",
            &[("reason", "max_conns")],
        ) > 0.0
    });
    // One closes: the fifth is served.
    drop(held.remove(0));
    fifth.set_read_timeout(Some(TIMEOUT)).unwrap();
    fifth.read_exact(&mut b).unwrap();
    assert_eq!(b, [9u8; 32]);
    for (i, s) in held.iter_mut().enumerate() {
        ping(s, 20 + i as u8).unwrap();
    }
}

/// Which of `clients` got their 32-byte echo: read until `want` of them did (at most
/// [`TIMEOUT`]: an admitted client is served however slow the machine), then for `window` more,
/// to catch any served beyond `want`.
fn served_within(clients: &mut [TcpStream], want: usize, window: Duration) -> Vec<bool> {
    let mut got = vec![0usize; clients.len()];
    let mut deadline = Instant::now() + TIMEOUT;
    let mut settled = false;
    for c in clients.iter() {
        c.set_nonblocking(true).unwrap();
    }
    while Instant::now() < deadline {
        for (c, g) in clients.iter_mut().zip(got.iter_mut()) {
            let mut b = [0u8; 32];
            if *g < 32 {
                if let Ok(n) = c.read(&mut b[..32 - *g]) {
                    *g += n;
                }
            }
        }
        if !settled && got.iter().filter(|g| **g == 32).count() >= want {
            settled = true;
            deadline = Instant::now() + window;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for c in clients.iter() {
        c.set_nonblocking(false).unwrap();
    }
    got.iter().map(|g| *g == 32).collect()
}

/// Item 6 of issue 14: `max_conns` is a process-wide limit, exact whatever the shards: with
/// `threads` shards and a burst of clients queued at once, exactly `max` are served; when one
/// closes, exactly one more is.
fn max_conns_is_exact(threads: &str, max: usize) {
    let echo = echo_backend();
    let (listen, m) = (free_addr(), free_addr());
    let _p = spawn(sealpipe().args([
        "forward",
        "--listen",
        &listen.to_string(),
        "--target",
        &echo.addr.to_string(),
        "--threads",
        threads,
        "--max-conns",
        &max.to_string(),
        "--metrics",
        &m.to_string(),
        "--log-level",
        "error",
    ]));
    wait_listening(listen);
    wait_metrics(m, "the probe closed", |t| {
        metric(t, "sealpipe_connections_accepted_total", &[]) >= 1.0
            && metric(t, "sealpipe_connections_active", &[]) == 0.0
    });
    let probes = echo.conns.load(Ordering::SeqCst);
    // A burst: every client connected and its ping sent before any is read.
    let mut clients: Vec<TcpStream> = (0..16u8)
        .map(|i| {
            let mut s = connect(listen);
            s.write_all(&[i; 32]).unwrap();
            s
        })
        .collect();
    wait_until("the first clients served", || {
        echo.conns.load(Ordering::SeqCst) >= probes + max
    });
    let served = served_within(&mut clients, max, Duration::from_secs(1));
    let n = served.iter().filter(|s| **s).count();
    assert_eq!(
        (n, echo.conns.load(Ordering::SeqCst) - probes),
        (max, max),
        "--threads {threads} --max-conns {max}: clients served, upstream connections"
    );
    // One closes: exactly one more is served.
    let first = served.iter().position(|s| *s).unwrap();
    drop(clients.remove(first));
    wait_until("one more client served", || {
        echo.conns.load(Ordering::SeqCst) > probes + max
    });
    let again = served_within(&mut clients, 1, Duration::from_secs(1));
    let newly = again.iter().filter(|s| **s).count();
    assert_eq!(
        (newly, echo.conns.load(Ordering::SeqCst) - probes),
        (1, max + 1),
        "after one of {max} closed: clients served, upstream connections"
    );
}

#[test]
fn max_conns_one_with_two_shards_admits_one() {
    max_conns_is_exact("2", 1);
}

#[test]
fn max_conns_holds_for_a_burst_on_one_shard() {
    max_conns_is_exact("1", 2);
}

/// A reload recomputes the shares of max_conns, and a shard paused at its old share accepts
/// again at once when the new one leaves room (not only when one of its connections closes).
#[test]
fn reload_raising_max_conns_serves_the_waiting_client() {
    let echo = echo_backend();
    let dir = temp_dir("hup-max");
    let cfg = dir.join("c.toml");
    let (listen, m) = (free_addr(), free_addr());
    let text = |max: usize| {
        with_metrics(tunnel_toml("forward", listen, &[echo.addr], &[]), m)
            .replace("keys = []\n", "")
            .replace(
                "threads = 1\n",
                &format!("threads = 1\nmax_conns = {max}\n"),
            )
    };
    write_config(&cfg, &text(1));
    let p = spawn(sealpipe().arg("run").arg("--config").arg(&cfg));
    wait_listening(listen);
    wait_metrics(m, "the probe closed", |t| {
        metric(t, "sealpipe_connections_accepted_total", &[]) >= 1.0
            && metric(t, "sealpipe_connections_active", &[]) == 0.0
    });
    let mut first = connect(listen);
    ping(&mut first, 1).unwrap();
    let mut second = connect(listen);
    second.write_all(&[2u8; 32]).unwrap();
    wait_metrics(m, "the listener paused at max_conns", |t| {
        metric(
            t,
            "sealpipe_connections_rejected_total",
            &[("reason", "max_conns")],
        ) >= 1.0
    });
    write_config(&cfg, &text(2));
    p.signal("HUP");
    wait_metrics(m, "a good reload", |t| reloads(t, "ok") == 1.0);
    // `first` stays open: the second client is served because the limit rose.
    let mut b = [0u8; 32];
    second.read_exact(&mut b).unwrap();
    assert_eq!(b, [2u8; 32]);
    ping(&mut first, 3).unwrap();
}

/// Item 6 of issue 14: a mistyped log level in a reload is rejected like any other mistake
/// (before, it was taken, and the filter it made turned every log line off, errors included).
#[test]
fn reload_with_an_unknown_log_level_is_rejected() {
    let echo = echo_backend();
    let dir = temp_dir("hup-level");
    let cfg = dir.join("c.toml");
    let (listen, m) = (free_addr(), free_addr());
    let text = |level: &str| {
        with_metrics(tunnel_toml("forward", listen, &[echo.addr], &[]), m)
            .replace("keys = []\n", "")
            .replace("level = \"warn\"", &format!("level = \"{level}\""))
    };
    write_config(&cfg, &text("warn"));
    let p = spawn(sealpipe().arg("run").arg("--config").arg(&cfg));
    wait_listening(listen);
    write_config(&cfg, &text("loud"));
    p.signal("HUP");
    let t = wait_metrics(m, "a reload", |t| {
        reloads(t, "error") + reloads(t, "ok") >= 1.0
    });
    assert_eq!((reloads(&t, "error"), reloads(&t, "ok")), (1.0, 0.0));
    // A filter with a target is fine.
    write_config(&cfg, &text("sealpipe=debug,warn"));
    p.signal("HUP");
    wait_metrics(m, "a good reload", |t| reloads(t, "ok") == 1.0);
    exchange(listen, 10).unwrap();
}

/// Item 4 of issue 14: a log pipe nobody reads (a stuck journald or log shipper) must not
/// stall the proxy. Logs go through a bounded, non-blocking writer that drops what does not
/// fit and counts it. At `trace` every connection logs a few lines, so a 64 KiB pipe fills
/// within a few hundred connections.
#[test]
fn a_stalled_log_pipe_does_not_stall_the_proxy() {
    let echo = echo_backend();
    let (listen, m) = (free_addr(), free_addr());
    let mut child = sealpipe()
        .args([
            "forward",
            "--listen",
            &listen.to_string(),
            "--target",
            &echo.addr.to_string(),
            "--threads",
            "1",
            "--metrics",
            &m.to_string(),
            "--log-level",
            "trace",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Held, never read: the pipe fills and stays full.
    let _stalled = child.stderr.take().unwrap();
    let _p = Proc(child);
    wait_listening(listen);
    for i in 0..2000 {
        exchange(listen, 16).unwrap_or_else(|e| panic!("exchange {i}: {e}"));
    }
    let t = wait_metrics(m, "dropped log lines counted", |t| {
        metric(t, "sealpipe_log_lines_dropped_total", &[]) > 0.0
    });
    eprintln!(
        "log lines dropped: {}",
        metric(&t, "sealpipe_log_lines_dropped_total", &[])
    );
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn emfile_does_not_spin_and_recovers() {
    let echo = echo_backend();
    let listen = free_addr();
    let mut p = spawn(
        Command::new("prlimit")
            .args(["--nofile=64:64", env!("CARGO_BIN_EXE_sealpipe")])
            .args([
                "forward",
                "--listen",
                &listen.to_string(),
                "--target",
                &echo.addr.to_string(),
                "--threads",
                "1",
                "--log-level",
                "warn",
            ]),
    );
    // prlimit execs sealpipe: same pid.
    let pid = p.0.id();
    wait_listening(listen);
    // Held clients, each served (echo seen) before the next connects, until one is not:
    // 64 fds serve about 26 (two per proxied connection); at most 100 are tried.
    let mut held = Vec::new();
    let mut unserved = 0;
    for i in 0..100u8 {
        let mut s = connect(listen);
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        if ping(&mut s, i).is_ok() {
            held.push(s);
        } else {
            unserved += 1;
            if unserved == 3 {
                break;
            }
        }
    }
    assert!(
        (10..60).contains(&held.len()),
        "{} clients served with 64 fds",
        held.len()
    );
    // While exhausted, keep new clients arriving (bounded), as a busy fleet would.
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // Outcomes: connect failed, served, closed or reset, still waiting.
            let mut n = [0usize; 4];
            while !stop.load(Ordering::Relaxed) && n.iter().sum::<usize>() < 3000 {
                let Ok(mut s) = TcpStream::connect(listen) else {
                    n[0] += 1;
                    continue;
                };
                let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
                let _ = s.write_all(b"x");
                let mut b = [0u8; 1];
                match s.read(&mut b) {
                    Ok(1) => n[1] += 1,
                    Ok(_) => n[2] += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => n[3] += 1,
                    Err(_) => n[2] += 1,
                }
            }
            n
        })
    };
    // The held clients exhaust its descriptors; then measure a window.
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let deadline = Instant::now() + TIMEOUT;
    while fds() < 62 {
        assert!(
            Instant::now() < deadline,
            "never exhausted: {} fds open",
            fds()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let t0 = cpu_ticks(pid);
    let w0 = Instant::now();
    let window = Duration::from_secs(2);
    while w0.elapsed() < window {
        std::thread::sleep(Duration::from_millis(50));
        assert!(p.0.try_wait().unwrap().is_none(), "sealpipe died");
    }
    let ticks = cpu_ticks(pid) - t0;
    stop.store(true, Ordering::Relaxed);
    let attempts = churn.join().unwrap();
    // Clock ticks are 1/100 s: a spinning shard burns ~200 in 2 s; a backed-off one a few.
    assert!(
        ticks < 40,
        "sealpipe used {ticks} ticks of CPU in {window:?} while out of fds (client attempts: {attempts:?} = [connect failed, served, closed, waiting])"
    );
    // Free the fds: a new client is served.
    drop(held);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match exchange(listen, 100) {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "never recovered: {e}"),
        }
    }
    p.signal("TERM");
    assert_eq!(p.wait_exit(TIMEOUT).code(), Some(0));
}

#[test]
fn handoff_under_churn_loses_no_connection() {
    let echo = echo_backend();
    let (listen, m) = (free_addr(), free_addr());
    let sock = temp_dir("handoff").join("h.sock");
    let args = |cmd: &mut Command| {
        cmd.args([
            "forward",
            "--listen",
            &listen.to_string(),
            "--target",
            &echo.addr.to_string(),
            "--threads",
            "2",
            "--metrics",
            &m.to_string(),
            "--drain-timeout",
            "10",
            "--log-level",
            "warn",
            "--handoff",
        ])
        .arg(&sock);
    };
    let mut old = {
        let mut c = sealpipe();
        args(&mut c);
        spawn(&mut c)
    };
    wait_listening(listen);
    let deadline = Instant::now() + TIMEOUT;
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no handoff socket");
        std::thread::sleep(Duration::from_millis(5));
    }

    // Churn: connect, 100 bytes, read the echo, close — from two threads, bounded.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut errors = Vec::new();
                let end = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    match exchange(listen, 100) {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.push(e.to_string());
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
                errors
            })
        })
        .collect();
    let wait_ok = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while ok.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "churn too slow");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_ok(500);
    let mut new = {
        let mut c = sealpipe();
        args(&mut c);
        spawn(&mut c)
    };
    // The old process hands over, drains and exits 0; the new one serves meanwhile.
    assert_eq!(old.wait_exit(Duration::from_secs(30)).code(), Some(0));
    let at_exit = ok.load(Ordering::Relaxed);
    wait_ok((at_exit + 500).max(2000));
    stop.store(true, Ordering::Relaxed);
    let errors: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("handoff under churn: {ok} connections, {failed} failed");
    assert_eq!(
        failed,
        0,
        "failures during the upgrade: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert!(new.0.try_wait().unwrap().is_none(), "new process died");
    // The metrics port moved too: the new process answers and has served connections.
    wait_metrics(m, "the new process serving", |t| {
        metric(t, "sealpipe_connections_accepted_total", &[]) > 0.0
    });
    new.signal("TERM");
    assert_eq!(new.wait_exit(TIMEOUT).code(), Some(0));
}
