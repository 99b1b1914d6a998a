//! The proxy pipeline over real sockets: a sealpipe pair (in this process) in front of real
//! backends, with man-in-the-middle relays for the hostile cases.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sealpipe::config::Mode;

use crate::common::*;

#[test]
fn pair_carries_64_mib_each_way_byte_exact() {
    let echo = echo_backend();
    let (entry, _e, _d) = pair(echo.addr);
    round_trip(entry, 1, 64 << 20);
}

#[test]
fn small_exchange_and_clean_close() {
    let echo = echo_backend();
    let (entry, e, d) = pair(echo.addr);
    for i in 0..20 {
        round_trip(entry, i, 100);
    }
    // Both sides count the 20 sessions under the one key they share.
    for side in [&e, &d] {
        let text = String::from_utf8(side.metrics().render()).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("sealpipe_key_sessions_total{"))
            .unwrap_or_else(|| panic!("no key_sessions_total in {text}"));
        assert!(line.ends_with(" 20"), "{line}");
    }
}

#[test]
fn half_close_request_then_long_reply() {
    // The backend reads the whole request (to EOF), then sends a long reply.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut req = Vec::new();
        s.read_to_end(&mut req).unwrap();
        assert_eq!(req, b"GET everything");
        let mut block = vec![0u8; 1 << 20];
        pattern(9, 0, &mut block);
        for _ in 0..8 {
            s.write_all(&block).unwrap();
        }
    });
    let (entry, _e, _d) = pair(backend);
    let mut c = connect(entry);
    c.write_all(b"GET everything").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let (got, err) = read_to_end(&mut c);
    assert_eq!(err, None, "reply must end with a clean EOF");
    assert_eq!(got.len(), 8 << 20);
}

#[test]
fn wrong_key_never_reaches_the_backend() {
    let echo = echo_backend();
    let (dec, _d) = start(
        tunnel(Mode::Decrypt, &[echo.addr], &[keygen("a")]),
        limits(),
    );
    let (enc, _e) = start(tunnel(Mode::Encrypt, &[dec], &[keygen("b")]), limits());
    let mut c = connect(enc);
    let (got, err) = write_then_read_to_end(&mut c, b"secret request");
    assert!(got.is_empty());
    assert_eq!(
        err,
        Some(ErrorKind::ConnectionReset),
        "the plaintext client must see a reset"
    );
    assert_eq!(
        echo.conns.load(Ordering::SeqCst),
        0,
        "nothing may reach the backend"
    );
}

#[test]
fn tampered_record_resets_the_client() {
    let echo = echo_backend();
    let key = keygen("t");
    let (dec, _d) = start(
        tunnel(Mode::Decrypt, &[echo.addr], std::slice::from_ref(&key)),
        limits(),
    );
    // Flip one bit well after the handshake, in the client-to-server direction.
    let relay = mitm(dec, |dir, off, buf| {
        let at = 5000usize;
        if dir == 0 && off <= at && at < off + buf.len() {
            buf[at - off] ^= 0x10;
        }
        true
    });
    let (enc, _e) = start(tunnel(Mode::Encrypt, &[relay], &[key]), limits());
    let mut c = connect(enc);
    let data = vec![7u8; 100_000];
    let (got, err) = write_then_read_to_end(&mut c, &data);
    assert!(
        got.len() < 5000,
        "nothing past the tampered record comes back"
    );
    assert_eq!(err, Some(ErrorKind::ConnectionReset));
}

#[test]
fn truncated_stream_resets_instead_of_clean_close() {
    // The backend sends 1 MiB; the relay cuts the server-to-client direction after 300 KiB.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    std::thread::spawn(move || {
        while let Ok((mut s, _)) = l.accept() {
            let _ = s.write_all(&vec![1u8; 1 << 20]);
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        }
    });
    let key = keygen("tr");
    let (dec, _d) = start(
        tunnel(Mode::Decrypt, &[backend], std::slice::from_ref(&key)),
        limits(),
    );
    let relay = mitm(dec, |dir, off, _buf| !(dir == 1 && off > 300_000));
    let (enc, _e) = start(tunnel(Mode::Encrypt, &[relay], &[key]), limits());
    let mut c = connect(enc);
    let (got, err) = read_to_end(&mut c);
    assert!(got.len() < 1 << 20);
    assert_eq!(
        err,
        Some(ErrorKind::ConnectionReset),
        "a cut stream must not look complete"
    );
}

#[test]
fn replayed_session_reaches_nothing() {
    let echo = echo_backend();
    let key = keygen("r");
    let (dec, _d) = start(
        tunnel(Mode::Decrypt, &[echo.addr], std::slice::from_ref(&key)),
        limits(),
    );
    let recorded: Arc<Mutex<Vec<u8>>> = Arc::default();
    let rec = recorded.clone();
    let relay = mitm(dec, move |dir, _off, buf| {
        if dir == 0 {
            rec.lock().unwrap().extend_from_slice(buf);
        }
        true
    });
    let (enc, _e) = start(tunnel(Mode::Encrypt, &[relay], &[key]), limits());
    let mut c = connect(enc);
    c.write_all(b"transfer 100 coins").unwrap();
    let mut back = [0u8; 18];
    c.read_exact(&mut back).unwrap();
    drop(c);
    let before = echo.bytes.load(Ordering::SeqCst);
    assert_eq!(before, 18);
    // Replay everything the client side sent into a fresh connection to the decrypt side.
    let bytes = recorded.lock().unwrap().clone();
    let mut r = connect(dec);
    let _ = r.write_all(&bytes);
    let _ = r.shutdown(Shutdown::Write);
    let (_got, _err) = read_to_end(&mut r);
    assert_eq!(
        echo.bytes.load(Ordering::SeqCst),
        before,
        "replayed bytes reached the backend"
    );
    assert_eq!(
        echo.conns.load(Ordering::SeqCst),
        1,
        "the replay opened a backend connection"
    );
}

#[test]
fn garbage_at_the_decrypt_side_is_dropped() {
    let echo = echo_backend();
    let (dec, d) = start(
        tunnel(Mode::Decrypt, &[echo.addr], &[keygen("g")]),
        limits(),
    );
    for size in [1usize, 40, 300, 70_000] {
        let mut c = connect(dec);
        let _ = c.write_all(&vec![0xA5; size]);
        let _ = c.shutdown(Shutdown::Write);
        let (got, _) = read_to_end(&mut c);
        assert!(got.is_empty());
    }
    assert_eq!(echo.conns.load(Ordering::SeqCst), 0);
    // Each of the four is one failed handshake, under whichever reason the protocol gives
    // garbage (every result but `ok`), and one connection closed as `handshake_failed`.
    let failed = |r: &sealpipe::server::Running| {
        sealpipe::metrics::HANDSHAKE_RESULTS[1..]
            .iter()
            .map(|res| metric(r, "sealpipe_handshakes_total", &[("result", res)]))
            .sum::<f64>()
    };
    wait_until("four failed handshakes counted", || failed(&d) >= 4.0);
    assert_eq!(failed(&d), 4.0);
    assert_eq!(
        metric(&d, "sealpipe_handshakes_total", &[("result", "ok")]),
        0.0
    );
    assert_eq!(
        metric(
            &d,
            "sealpipe_connections_closed_total",
            &[("reason", "handshake_failed")]
        ),
        4.0
    );
}

#[test]
fn failover_to_the_next_upstream_and_backend_down_then_up() {
    let echo = echo_backend();
    // A port held (bound, never listening): connects to it are refused.
    let dead = Port::reserve();
    let (fwd, _f) = start(
        tunnel(Mode::Forward, &[dead.addr, echo.addr], &[]),
        limits(),
    );
    for i in 0..5 {
        round_trip(fwd, i, 1000);
    }
    // Backend down then up: the only target refuses, then starts listening on the same
    // socket (the port is never released in between).
    let port = Port::reserve();
    let (fwd2, r2) = start(tunnel(Mode::Forward, &[port.addr], &[]), limits());
    let mut c = connect(fwd2);
    let (got, err) = read_to_end(&mut c);
    assert!(got.is_empty());
    assert_eq!(err, Some(ErrorKind::ConnectionReset));
    let text = String::from_utf8(r2.metrics().render()).unwrap();
    assert!(text.contains("reason=\"refused\""), "{text}");
    let l = port.listen();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut w = s.try_clone().unwrap();
            let mut r = s;
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
    // The target is marked down, but connections still try it, so a client is served as
    // soon as it is back (tests/upstreams.rs asserts the very next one is). Wait on the
    // outcome with a deadline.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "backend never came back");
        let Ok(mut c) = std::net::TcpStream::connect(fwd2) else {
            continue;
        };
        let _ = c.set_read_timeout(Some(TIMEOUT));
        // Turned-away clients are reset, possibly before the write.
        let _ = c.write_all(b"ping");
        let _ = c.shutdown(Shutdown::Write);
        let (got, _) = read_to_end(&mut c);
        if got == b"ping" {
            break;
        }
        assert!(Instant::now() < deadline, "backend never came back");
        std::thread::yield_now();
    }
}

#[test]
fn a_thousand_concurrent_connections() {
    let echo = echo_backend();
    let (entry, _e, _d) = pair(echo.addr);
    let mut conns = Vec::new();
    for i in 0..1000u32 {
        let mut c = connect(entry);
        c.write_all(&i.to_be_bytes()).unwrap();
        conns.push(c);
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
        assert_eq!(u32::from_be_bytes(b), i as u32);
    }
}

#[test]
fn slow_reader_is_bounded() {
    // The backend streams forever (bounded by its own deadline); the client reads nothing.
    // sealpipe must stop reading from the backend, so the backend's writes stall.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_write_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let block = vec![3u8; 64 * 1024];
        let mut total = 0usize;
        let deadline = Instant::now() + TIMEOUT;
        let mut stalled = false;
        while Instant::now() < deadline && total < 1 << 30 {
            match s.write(&block) {
                Ok(n) => total += n,
                Err(e) => {
                    // stalled for 500 ms: backpressure held
                    stalled = matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
                    break;
                }
            }
        }
        tx.send((total, stalled)).unwrap();
        // Held open (its queue stays where it is) until the test has looked.
        let _ = done_rx.recv_timeout(TIMEOUT);
    });
    let (entry, e, d) = pair(backend);
    let c = connect(entry);
    let (total, stalled) = rx.recv_timeout(TIMEOUT * 2).unwrap();
    assert!(stalled, "backend wrote {total} bytes without stalling");
    // Every byte the backend wrote sits in a kernel queue on one of the three hops or in
    // sealpipe: what sealpipe holds is within the documented bound, one direction in each of
    // the two processes, and at least the output high watermark in each (that is what
    // stopped them reading).
    let held = held_by_sealpipe(
        total,
        [backend.port(), entry.port()],
        d.listen_addrs[0].port(),
    );
    assert!(
        held <= 2 * DIRECTION_BOUND as i64,
        "sealpipe holds {held} bytes of a stalled stream (bound {})",
        2 * DIRECTION_BOUND
    );
    assert!(
        held >= 2 * sealpipe::proxy::OUTPUT_HIGH as i64,
        "sealpipe holds only {held} bytes: the accounting is off"
    );
    for (side, r) in [("encrypt", &e), ("decrypt", &d)] {
        let live = settle_max_live(r);
        eprintln!("{side}: live pool {live}");
        assert!(
            live <= DIRECTION_BOUND_CHUNKS as f64,
            "{side}: live pool bytes {live} over the bound {DIRECTION_BOUND_CHUNKS}"
        );
    }
    let _ = done_tx.send(());
    drop(c);
}

#[test]
fn forward_mode_relays_plaintext() {
    let echo = echo_backend();
    let (fwd, _f) = start(tunnel(Mode::Forward, &[echo.addr], &[]), limits());
    round_trip(fwd, 3, 8 << 20);
}

#[test]
fn idle_timeout_closes_the_pair() {
    let echo = echo_backend();
    let mut l = limits();
    // Long enough that the first echo (a backend thread spawned for it) beats the timer on a
    // loaded machine.
    l.idle_timeout = 1.5;
    let (fwd, f) = start(tunnel(Mode::Forward, &[echo.addr], &[]), l);
    let mut c = connect(fwd);
    // The connection's last activity is the echo of this byte, so its idle timer cannot fire
    // before `sent + 1.5 s`.
    let sent = Instant::now();
    c.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).unwrap();
    let (_got, err) = read_to_end(&mut c);
    let took = sent.elapsed();
    assert_eq!(
        err,
        Some(ErrorKind::ConnectionReset),
        "an idle timeout resets the client"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "closed after {took:?}, before the 1.5 s idle timeout could fire"
    );
    // The close was the idle timer's, and nothing else's.
    let closed = || metric(&f, "sealpipe_connections_closed_total", &[]);
    wait_until("the close is counted", || closed() >= 1.0);
    for reason in sealpipe::metrics::CLOSE_REASONS {
        let n = metric(
            &f,
            "sealpipe_connections_closed_total",
            &[("reason", reason)],
        );
        let want = if reason == "idle_timeout" { 1.0 } else { 0.0 };
        assert_eq!(n, want, "connections closed as {reason}");
    }
}

/// Polls the server's metrics until `line` (a full sample line) appears.
fn wait_metric(r: &sealpipe::server::Running, line: &str) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = String::from_utf8(r.metrics().render()).unwrap();
        if text.lines().any(|l| l == line) {
            return;
        }
        assert!(Instant::now() < deadline, "never saw {line:?} in\n{text}");
        std::thread::yield_now();
    }
}

#[test]
fn active_health_checks_mark_targets_down_and_up_without_clients() {
    let echo = echo_backend();
    let dead_port = Port::reserve();
    let dead = dead_port.addr;
    let mut t = tunnel(Mode::Forward, &[dead, echo.addr], &[]);
    t.health_check_interval = 0.1;
    let (fwd, r) = start(t, limits());
    let up = |addr: std::net::SocketAddr, v: u8| {
        format!("sealpipe_upstream_up{{shard=\"0\",tunnel=\"forward\",upstream=\"{addr}\"}} {v}")
    };
    // Gauges start at 0; the live target at 1 proves a flush happened, and the dead one then
    // goes to 0 without any client having been sent there.
    wait_metric(&r, &up(echo.addr, 1));
    wait_metric(&r, &up(dead, 0));
    // No client has been sent to the dead target: every connection works first time.
    for i in 0..10 {
        round_trip(fwd, i, 100);
    }
    // The target comes to life: the next probe marks it up again.
    let _l = dead_port.listen();
    wait_metric(&r, &up(dead, 1));
}

/// Open connections of `r` that are hibernating now.
fn hibernating(r: &sealpipe::server::Running) -> f64 {
    metric(r, "sealpipe_connections_hibernating", &[])
}

/// Exchanges through `c` (an echo behind it) rounds of data that each start with every side in
/// `sides` hibernating, so each round runs on state the quiet connection rebuilt.
fn exchange_across_hibernation(c: &mut std::net::TcpStream, sides: &[&sealpipe::server::Running]) {
    for (round, len) in [10usize, 100_000, 1].into_iter().enumerate() {
        let mut msg = vec![0u8; len];
        pattern(round as u64, 0, &mut msg);
        c.write_all(&msg).unwrap();
        let mut back = vec![0u8; len];
        c.read_exact(&mut back).unwrap();
        assert!(back == msg, "round {round}: echo differs");
        // Quiet past the hibernation interval: every side hibernates (and the next round wakes
        // it: only that round's data can, so the gauge reads 1 only after a fresh hibernation).
        wait_until(&format!("round {round}: every side hibernates"), || {
            sides.iter().all(|r| hibernating(r) == 1.0)
        });
    }
    let mut last = *b"after";
    c.write_all(&last).unwrap();
    c.read_exact(&mut last).unwrap();
    assert_eq!(&last, b"after");
}

#[test]
fn quiet_connection_hibernates_and_keeps_working_both_ways() {
    let echo = echo_backend();
    let (entry, e, d) = pair(echo.addr);
    let mut c = connect(entry);
    exchange_across_hibernation(&mut c, &[&e, &d]);
    // Each hibernation of the encrypt and the decrypt side dropped that side's session keys,
    // and every round after the first ran on keys re-derived from the traffic secrets.
    for (side, r) in [("encrypt", &e), ("decrypt", &d)] {
        let dropped = metric(r, "sealpipe_key_hibernations_total", &[]);
        assert!(dropped >= 3.0, "{side}: keys dropped {dropped} times");
    }
    // Still a proper stream: the half-close ends it cleanly end to end, and the gauges follow.
    c.shutdown(Shutdown::Write).unwrap();
    let (got, err) = read_to_end(&mut c);
    assert_eq!((got.len(), err), (0, None));
    wait_until("closed connections leave the gauge", || {
        hibernating(&e) == 0.0 && hibernating(&d) == 0.0
    });
}

#[test]
fn quiet_forward_connection_keeps_working() {
    let echo = echo_backend();
    let (fwd, f) = start(tunnel(Mode::Forward, &[echo.addr], &[]), limits());
    let mut c = connect(fwd);
    exchange_across_hibernation(&mut c, &[&f]);
    // No session keys in forward mode: only buffer lists were given back.
    assert_eq!(metric(&f, "sealpipe_key_hibernations_total", &[]), 0.0);
}

/// A live scrape of each side of a pair (2 shards, after traffic) exports exactly what
/// `sealpipe::metrics::FAMILIES` declares — the table docs/METRICS.md is held to: every family
/// with its type and help, every sample with the family's label names, enumerated labels only
/// with declared values (a counter's all of them from start-up), and configuration-bound labels
/// only with configured values (so label values passed in the wrong order cannot pass).
#[test]
fn live_scrape_matches_the_metrics_table() {
    use sealpipe::metrics::{FAMILIES, Kind, family};
    use std::collections::{BTreeMap, BTreeSet};
    let echo = echo_backend();
    let key = keygen("scrape");
    let key_id = sealpipe::keyfile::load_key_set(std::slice::from_ref(&key))
        .unwrap()
        .primary()
        .id()
        .to_string();
    let mut l = limits();
    l.threads = 2;
    let (dec, d) = start_observed(
        tunnel(Mode::Decrypt, &[echo.addr], std::slice::from_ref(&key)),
        l.clone(),
    );
    let (enc, e) = start_observed(tunnel(Mode::Encrypt, &[dec], &[key]), l);
    for i in 0..4 {
        round_trip(enc, i, 1000);
    }
    for (side, r, upstream) in [("decrypt", &d, echo.addr), ("encrypt", &e, dec)] {
        let (status, text) = http_get(r.metrics_addr.unwrap(), "/metrics");
        assert_eq!(status, 200);
        let allowed = |label: &str, value: &str| match label {
            "tunnel" => value == side,
            "shard" => value == "0" || value == "1",
            "upstream" => value == upstream.to_string(),
            // A target as configured: here an address, so the same as `upstream`.
            "target" => value == upstream.to_string(),
            "key_id" => value == key_id,
            "version" => value == env!("CARGO_PKG_VERSION"),
            _ => false,
        };
        // family -> (label -> values seen)
        let mut seen: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
        let mut current: Option<&sealpipe::metrics::Family> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap();
                let f = family(name).unwrap_or_else(|| panic!("{side}: undeclared family {name}"));
                assert_eq!(help, f.help, "{side}: help of {name}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                let f = family(name).unwrap_or_else(|| panic!("{side}: undeclared family {name}"));
                assert_eq!(kind, f.kind.as_str(), "{side}: type of {name}");
                assert!(
                    seen.insert(name.to_string(), BTreeMap::new()).is_none(),
                    "{side}: {name} twice"
                );
                current = Some(f);
                continue;
            }
            if line.is_empty() {
                continue;
            }
            let f = current.unwrap_or_else(|| panic!("{side}: sample before any TYPE: {line}"));
            let (name, labels, _) = parse_sample(line);
            let histogram = matches!(f.kind, Kind::Histogram(_));
            let suffix_ok = name == f.name
                || (histogram
                    && [
                        f.name.to_string() + "_bucket",
                        f.name.to_string() + "_sum",
                        f.name.to_string() + "_count",
                    ]
                    .iter()
                    .any(|n| n == name));
            assert!(suffix_ok, "{side}: sample {name} under family {}", f.name);
            let mut names: Vec<&str> = labels
                .iter()
                .map(|(k, _)| k.as_str())
                .filter(|k| !(histogram && *k == "le"))
                .collect();
            names.sort_unstable();
            let mut want = f.label_names();
            want.sort_unstable();
            assert_eq!(names, want, "{side}: labels of {line}");
            for (k, v) in labels.iter().filter(|(k, _)| k != "le") {
                let declared = f.labels.iter().find(|l| l.name == k).unwrap();
                match declared.values {
                    Some(values) => assert!(
                        values.contains(&v.as_str()),
                        "{side}: {k}={v:?} is not a declared value of {}",
                        f.name
                    ),
                    None => assert!(allowed(k, v), "{side}: {k}={v:?} in {line}"),
                }
                seen.get_mut(f.name)
                    .unwrap()
                    .entry(k.clone())
                    .or_default()
                    .insert(v.clone());
            }
        }
        let exported: BTreeSet<&str> = seen.keys().map(String::as_str).collect();
        let declared: BTreeSet<&str> = FAMILIES.iter().map(|f| f.name).collect();
        assert_eq!(exported, declared, "{side}: families exported vs declared");
        for f in FAMILIES.iter().filter(|f| f.kind == Kind::Counter) {
            for l in f.labels {
                if let Some(values) = l.values {
                    let got: BTreeSet<&str> =
                        seen[f.name][l.name].iter().map(String::as_str).collect();
                    let want: BTreeSet<&str> = values.iter().copied().collect();
                    assert_eq!(got, want, "{side}: {}{{{}}} from start-up", f.name, l.name);
                }
            }
        }
        assert_eq!(
            seen["sealpipe_upstream_up"]["shard"].len(),
            2,
            "{side}: one upstream_up series per shard"
        );
    }
}
