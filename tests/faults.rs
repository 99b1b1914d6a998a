//! Fault injection: what a sealpipe pair does when a backend, a client, the network between the
//! pair, a hostile peer or the process itself misbehaves. Each test states one expectation;
//! docs/RELIABILITY.md lists them in a table.
//!
//! Faults are real: resets are SO_LINGER-0 closes, silent peers hold their sockets and never
//! answer, processes are killed with real signals, and the network faults run in network
//! namespaces this test creates (and deletes). Every wait polls with a deadline.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use sealpipe::config::Mode;
use sealpipe::server::Running;

use crate::common::*;

fn closed(r: &Running, reason: &str) -> f64 {
    metric(
        r,
        "sealpipe_connections_closed_total",
        &[("reason", reason)],
    )
}

fn active(r: &Running) -> f64 {
    metric(r, "sealpipe_connections_active", &[])
}

/// Limits for one shard with short idle timeouts (seconds).
fn idle_limits(idle: f64) -> sealpipe::config::Limits {
    let mut l = limits();
    l.idle_timeout = idle;
    l.half_closed_timeout = idle;
    l
}

/// A backend that runs `serve` on every accepted connection, each in its own thread.
fn backend<F>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) + Send + Sync + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let serve = serve.clone();
            std::thread::spawn(move || serve(s));
        }
    });
    addr
}

/// Reads until the peer ends the stream; returns how it ended (None = clean EOF).
fn read_until_end(s: &mut TcpStream) -> Option<ErrorKind> {
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    read_to_end(s).1
}

/// As [`read_until_end`], also returning the bytes.
fn read_until_end_bytes(s: &mut TcpStream) -> (Vec<u8>, Option<ErrorKind>) {
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    read_to_end(s)
}

/// A thread writing 64 KiB blocks of `byte` to `s` until `stop` is set. Writes time out every
/// 100 ms so the thread notices `stop` even while backpressure holds; a write error ends it.
///
/// Tests stop and join it before they look at how the stream ended: a socket reports a reset
/// once, to whichever call comes first, and a concurrent writer would take it from the reader.
fn stoppable_writer(s: &TcpStream, byte: u8) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let mut w = s.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let h = std::thread::spawn(move || {
        let block = vec![byte; 64 * 1024];
        while !stop2.load(Ordering::Relaxed) {
            match w.write(&block) {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
    });
    (stop, h)
}

/// A one-way stream stalled through the pair `d` (decrypt side) after `total` bytes: every byte
/// is in a kernel queue on one of the three hops or in sealpipe, and what sealpipe holds is
/// within the documented bound for one direction in each of the two processes — and at least
/// the output high watermark in each (that is what stopped them reading).
fn assert_stall_held_within_bound(total: usize, plain_ports: [u16; 2], d: &Running) {
    let held = held_by_sealpipe(total, plain_ports, d.listen_addrs[0].port());
    assert!(
        held <= 2 * DIRECTION_BOUND as i64,
        "sealpipe holds {held} bytes of a stalled stream (bound {})",
        2 * DIRECTION_BOUND
    );
    assert!(
        held >= 2 * sealpipe::proxy::OUTPUT_HIGH as i64,
        "sealpipe holds only {held} bytes: the accounting is off"
    );
}

// ---------------------------------------------------------------------------------------------
// Backend faults

#[test]
fn backend_refuses_client_is_reset_promptly() {
    let dead = free_addr();
    let mut l = limits();
    // Far longer than the test allows: a refusal must not wait for a connect timeout.
    l.connect_timeout = 30.0;
    let (entry, _e, d) = pair_with(dead, l);
    let t = Instant::now();
    let mut c = connect(entry);
    let (got, err) = write_then_read_to_end(&mut c, b"hello?");
    assert!(got.is_empty());
    assert_eq!(
        err,
        Some(ErrorKind::ConnectionReset),
        "client must be reset"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "refusal took {:?}",
        t.elapsed()
    );
    wait_until("refused counted at the decrypt side", || {
        metric(
            &d,
            "sealpipe_upstream_connect_failures_total",
            &[("reason", "refused")],
        ) >= 1.0
    });
}

#[test]
fn backend_resets_mid_stream_client_is_reset_not_eof() {
    let backend = backend(|mut s| {
        let mut req = [0u8; 1000];
        if s.read_exact(&mut req).is_ok() && s.write_all(&req).is_ok() {
            reset_close(s);
        }
    });
    let (entry, e, d) = pair(backend);
    let mut c = connect(entry);
    let mut req = [0u8; 1000];
    pattern(1, 0, &mut req);
    c.write_all(&req).unwrap();
    let mut back = [0u8; 1000];
    c.read_exact(&mut back).unwrap();
    assert_eq!(back, req);
    assert_eq!(
        read_until_end(&mut c),
        Some(ErrorKind::ConnectionReset),
        "a backend reset must reach the client as a reset, not a clean EOF"
    );
    wait_until("decrypt counts peer_reset", || {
        closed(&d, "peer_reset") >= 1.0
    });
    wait_until("both sides closed", || {
        active(&e) == 0.0 && active(&d) == 0.0
    });
}

/// Writes 64 KiB blocks to `c` until a write stalls for 500 ms (or `cap` bytes); while it does,
/// tracks the highest live pool bytes of `procs`. Returns (bytes written, stalled, max live).
fn write_until_stall(c: &mut TcpStream, cap: usize, procs: &[&Running]) -> (usize, bool, f64) {
    c.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let block = vec![0x5au8; 64 * 1024];
    let (mut total, mut max_live) = (0usize, 0f64);
    let deadline = Instant::now() + TIMEOUT;
    let mut stalled = false;
    while total < cap && Instant::now() < deadline {
        match c.write(&block) {
            Ok(n) => total += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                stalled = true;
                break;
            }
            Err(e) => panic!("write failed: {e}"),
        }
        if total % (1 << 20) == 0 {
            for p in procs {
                max_live = max_live.max(pool_live(p));
            }
        }
    }
    (total, stalled, max_live)
}

#[test]
fn backend_never_reads_client_writes_stall_and_memory_stays_bounded() {
    let (hold_tx, hold_rx) = mpsc::channel::<TcpStream>();
    let backend = backend(move |s| {
        let _ = hold_tx.clone().send(s); // held, never read, until the test ends
    });
    let (entry, e, d) = pair(backend);
    let mut c = connect(entry);
    let cap = 256 << 20;
    let (total, stalled, live) = write_until_stall(&mut c, cap, &[&e, &d]);
    let live = live.max(settle_max_live(&e)).max(settle_max_live(&d));
    assert!(stalled, "client wrote {total} bytes without stalling");
    assert_stall_held_within_bound(total, [backend.port(), entry.port()], &d);
    assert!(
        live <= DIRECTION_BOUND_CHUNKS as f64,
        "live pool bytes reached {live} in one process (bound {DIRECTION_BOUND_CHUNKS})"
    );
    assert!(
        live > 0.0,
        "sealpipe buffered nothing: the gauge is not being read"
    );
    assert!(
        metric(&e, "sealpipe_flow_control_paused_total", &[]) >= 1.0,
        "encrypt side never paused reading"
    );
    // Nothing was lost while reading was paused: the backend now reads every byte.
    let mut b = hold_rx.recv_timeout(TIMEOUT).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let (got, err) = read_until_end_bytes(&mut b);
    assert_eq!(err, None);
    assert_eq!(got.len(), total, "bytes lost under backpressure");
    assert!(got.iter().all(|&x| x == 0x5a));
}

#[test]
fn slow_backend_reply_trickles_through_complete() {
    // 48 pieces of 2 KiB, 50 ms apart: 2.4 s in all, longer than the 1 s idle timeout, so the
    // reply also proves that activity (not only the first byte) re-arms the idle timer.
    const PIECES: usize = 48;
    const PIECE: usize = 2048;
    let backend = backend(|mut s| {
        let mut req = [0u8; 3];
        if s.read_exact(&mut req).is_err() {
            return;
        }
        let mut piece = [0u8; PIECE];
        for i in 0..PIECES {
            pattern(4, i * PIECE, &mut piece);
            if s.write_all(&piece).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50)); // the fault: a slow backend
        }
        let _ = s.shutdown(Shutdown::Write);
    });
    let (entry, _e, _d) = pair_with(backend, idle_limits(1.0));
    let mut c = connect(entry);
    c.write_all(b"GET").unwrap();
    let (got, err) = read_to_end(&mut c);
    assert_eq!(err, None, "reply must end with a clean EOF");
    let mut want = vec![0u8; PIECES * PIECE];
    pattern(4, 0, &mut want);
    assert_eq!(got.len(), want.len());
    assert!(got == want, "reply bytes differ");
}

#[test]
fn backend_goes_silent_idle_timeout_resets_both_ends() {
    let (ended_tx, ended_rx) = mpsc::channel();
    let backend = backend(move |mut s| {
        let mut req = [0u8; 4];
        if s.read_exact(&mut req).is_err() {
            return;
        }
        // Never answers, never closes: from sealpipe's side a backend that vanished.
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let end = read_to_end(&mut s).1;
        let _ = ended_tx.send(end);
    });
    let (entry, e, d) = pair_with(backend, idle_limits(1.5));
    let mut c = connect(entry);
    c.write_all(b"ping").unwrap();
    assert_eq!(
        read_until_end(&mut c),
        Some(ErrorKind::ConnectionReset),
        "the client must see the timeout as a reset"
    );
    let end = ended_rx.recv_timeout(TIMEOUT).unwrap();
    assert_eq!(
        end,
        Some(ErrorKind::ConnectionReset),
        "the backend must see a reset"
    );
    wait_until("idle timeout counted", || {
        closed(&e, "idle_timeout") + closed(&d, "idle_timeout") >= 1.0
    });
    wait_until("both sides closed", || {
        active(&e) == 0.0 && active(&d) == 0.0
    });
}

// ---------------------------------------------------------------------------------------------
// Client faults

/// An echo backend that reports how each connection ended (None = clean EOF).
fn reporting_echo() -> (SocketAddr, mpsc::Receiver<Option<ErrorKind>>) {
    let (tx, rx) = mpsc::channel();
    let addr = backend(move |mut s| {
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let end = loop {
            match s.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        break Some(ErrorKind::BrokenPipe);
                    }
                }
                Err(e) => break Some(e.kind()),
            }
        };
        let _ = tx.send(end);
    });
    (addr, rx)
}

#[test]
fn client_resets_mid_stream_backend_sees_reset_and_nothing_leaks() {
    let (backend, ended) = reporting_echo();
    let (entry, e, d) = pair(backend);
    let mut c = connect(entry);
    let mut block = vec![0u8; 100_000];
    pattern(6, 0, &mut block);
    c.write_all(&block).unwrap();
    let mut back = vec![0u8; 50_000];
    c.read_exact(&mut back).unwrap();
    assert!(back[..] == block[..50_000]);
    reset_close(c);
    assert_eq!(
        ended.recv_timeout(TIMEOUT).unwrap(),
        Some(ErrorKind::ConnectionReset),
        "an aborted client must not look like a finished request to the backend"
    );
    wait_until("encrypt counts peer_reset", || {
        closed(&e, "peer_reset") >= 1.0
    });
    // The encrypt side tells the decrypt side in an authenticated ABORT: a client reset, not a
    // truncation. Never clean.
    wait_until("decrypt counts the client's reset", || {
        closed(&d, "client_reset") >= 1.0
    });
    assert_eq!(closed(&d, "clean"), 0.0);
    wait_until("no connection left open", || {
        active(&e) == 0.0 && active(&d) == 0.0
    });
}

#[test]
fn client_goes_silent_idle_timeout_closes_the_pair() {
    let (backend, ended) = reporting_echo();
    let (entry, e, d) = pair_with(backend, idle_limits(1.5));
    let mut c = connect(entry);
    c.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).unwrap();
    // The client now says nothing and never closes.
    assert_eq!(
        ended.recv_timeout(TIMEOUT).unwrap(),
        Some(ErrorKind::ConnectionReset),
        "the backend's connection must be reset by the idle timeout"
    );
    assert_eq!(read_until_end(&mut c), Some(ErrorKind::ConnectionReset));
    wait_until("idle timeout counted", || {
        closed(&e, "idle_timeout") + closed(&d, "idle_timeout") >= 1.0
    });
    wait_until("no connection left open", || {
        active(&e) == 0.0 && active(&d) == 0.0
    });
}

#[test]
fn client_reads_nothing_backend_stalls_and_memory_stays_bounded() {
    let (tx, rx) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    let released = std::sync::Mutex::new(released);
    let backend = backend(move |mut s| {
        let r = write_until_stall(&mut s, 256 << 20, &[]);
        let _ = tx.send((r.0, r.1));
        // The queues stay as they are until the test has looked at them.
        let _ = released.lock().unwrap().recv_timeout(TIMEOUT);
        let _ = s.shutdown(Shutdown::Write);
        let _ = s.set_read_timeout(Some(TIMEOUT));
        let _ = s.read(&mut [0u8; 1]); // hold until the client side goes away
    });
    let (entry, e, d) = pair(backend);
    let c = connect(entry);
    let mut max_live = 0f64;
    let (total, stalled) = loop {
        for p in [&e, &d] {
            max_live = max_live.max(pool_live(p));
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(r) => break r,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(err) => panic!("{err}"),
        }
    };
    max_live = max_live.max(settle_max_live(&e)).max(settle_max_live(&d));
    assert!(stalled, "backend wrote {total} bytes without stalling");
    assert_stall_held_within_bound(total, [backend.port(), entry.port()], &d);
    let _ = release.send(());
    assert!(
        max_live <= DIRECTION_BOUND_CHUNKS as f64,
        "live pool bytes reached {max_live} (bound {DIRECTION_BOUND_CHUNKS})"
    );
    assert!(max_live > 0.0);
    // Nothing was lost while reading was paused: the client now reads every byte.
    let mut c = c;
    let (got, err) = read_until_end_bytes(&mut c);
    assert_eq!(err, None);
    assert_eq!(got.len(), total, "bytes lost under backpressure");
    assert!(got.iter().all(|&x| x == 0x5a));
}

// ---------------------------------------------------------------------------------------------
// Hostile peers at the decrypt listener

#[test]
fn oversized_record_length_after_handshake_is_rejected() {
    let echo = echo_backend();
    let key = keygen("os");
    let (dec, d) = start(
        tunnel(Mode::Decrypt, &[echo.addr], std::slice::from_ref(&key)),
        limits(),
    );
    // HelloI (106 bytes with forward secrecy) + Finished (32): the first record's header
    // starts at offset 138; its length field is bytes 139..141. Claim 65535 (> 16384).
    let relay = mitm(dec, |dir, off, buf| {
        for at in [139usize, 140] {
            if dir == 0 && off <= at && at < off + buf.len() {
                buf[at - off] = 0xff;
            }
        }
        true
    });
    let (enc, _e) = start(tunnel(Mode::Encrypt, &[relay], &[key]), limits());
    let mut c = connect(enc);
    let (got, err) = write_then_read_to_end(&mut c, &[1u8; 5000]);
    assert!(got.is_empty());
    assert_eq!(err, Some(ErrorKind::ConnectionReset));
    assert_eq!(
        echo.bytes.load(Ordering::SeqCst),
        0,
        "bytes reached the backend"
    );
    // The handshake itself verified: the failure is the record's, not the handshake's.
    wait_until("counted as tampered", || closed(&d, "tampered") >= 1.0);
    let hs = |r| metric(&d, "sealpipe_handshakes_total", &[("result", r)]);
    assert_eq!(hs("ok"), 1.0);
    assert_eq!(hs("too_large"), 0.0);
    assert_eq!(closed(&d, "handshake_failed"), 0.0);
}

#[test]
fn bit_flips_in_the_handshake_never_reach_the_backend() {
    let echo = echo_backend();
    let key = keygen("bf");
    let (dec, d) = start(
        tunnel(Mode::Decrypt, &[echo.addr], std::slice::from_ref(&key)),
        limits(),
    );
    // Offsets in the initiator's hello (version, key id, nonce, ephemeral key, mac) and in its
    // Finished (106..138).
    for at in [0usize, 3, 20, 60, 100, 110, 137] {
        let relay = mitm(dec, move |dir, off, buf| {
            if dir == 0 && off <= at && at < off + buf.len() {
                buf[at - off] ^= 0x01;
            }
            true
        });
        let (enc, _e) = start(
            tunnel(Mode::Encrypt, &[relay], std::slice::from_ref(&key)),
            limits(),
        );
        let mut c = connect(enc);
        let (got, err) = write_then_read_to_end(&mut c, b"must not arrive");
        assert!(got.is_empty(), "flip at {at}");
        assert_eq!(err, Some(ErrorKind::ConnectionReset), "flip at {at}");
    }
    assert_eq!(echo.conns.load(Ordering::SeqCst), 0);
    wait_until("every flip counted as a failed handshake", || {
        closed(&d, "handshake_failed") >= 7.0
    });
}

#[test]
fn two_thousand_half_open_handshakes_are_bounded_and_time_out() {
    const N: usize = 2000;
    let echo = echo_backend();
    let key = keygen("ho");
    let mut t = tunnel(Mode::Decrypt, &[echo.addr], std::slice::from_ref(&key));
    // Long enough for 2,000 connects, their accepts and a legitimate exchange on a loaded
    // 2-core machine (a debug build) before the first of them times out; short enough to wait
    // for (wait_until: 20 s).
    t.handshake_timeout = Some(12.0);
    let (dec, d) = start(t, limits());
    let (enc, _e) = start(
        tunnel(Mode::Encrypt, &[dec], std::slice::from_ref(&key)),
        limits(),
    );
    // Half a real hello under the right key: the responder must wait for the rest.
    let cfg = sealpipe::protocol::HandshakeConfig {
        keys: Arc::new(sealpipe::keyfile::load_key_set(std::slice::from_ref(&key)).unwrap()),
        forward_secrecy: sealpipe::protocol::ForwardSecrecy::Require,
        aead: Default::default(),
    };
    let mut hello = Vec::new();
    let _hs = sealpipe::protocol::Handshake::initiator(
        &cfg,
        &mut sealpipe::protocol::keys::OsRandom,
        &mut hello,
    );
    let half = &hello[..hello.len() / 2];
    let mut held = Vec::with_capacity(N);
    for i in 0..N {
        let mut s = connect(dec);
        if i % 2 == 1 {
            s.write_all(half).unwrap();
        }
        held.push(s);
    }
    wait_until("all half-open connections accepted", || {
        metric(&d, "sealpipe_connections_accepted_total", &[]) >= N as f64
    });
    // A legitimate client, meanwhile, is served at once: before any half-open one timed out.
    let t = Instant::now();
    round_trip(enc, 11, 64 * 1024);
    let served_in = t.elapsed();
    assert!(
        active(&d) >= N as f64,
        "half-open connections closed before the legitimate exchange ended ({served_in:?})"
    );
    assert_eq!(
        metric(&d, "sealpipe_handshakes_total", &[("result", "timeout")]),
        0.0
    );
    // Memory: a silent connection holds no chunk, a half hello at most one.
    let mut max_live = 0f64;
    wait_until("every half-open connection timed out", || {
        max_live = max_live.max(pool_live(&d));
        metric(&d, "sealpipe_handshakes_total", &[("result", "timeout")]) >= N as f64
    });
    let bound = ((N / 2 + 4) * 32 * 1024) as f64;
    assert!(
        max_live <= bound,
        "live pool bytes {max_live} > {bound} for {N} half-open connections"
    );
    wait_until("half-open connections closed", || active(&d) == 0.0);
    for mut s in held {
        let (got, _) = read_to_end(&mut s);
        assert!(got.is_empty());
    }
    assert_eq!(
        echo.conns.load(Ordering::SeqCst),
        1,
        "only the legitimate client"
    );
    eprintln!("legitimate round trip among {N} half-open handshakes took {served_in:?}");
}

// ---------------------------------------------------------------------------------------------
// Process faults (real processes, real signals, only our own children)

/// Spawns `sealpipe <mode> --listen <listen> --target <target> --key <key> ...extra`.
fn spawn_side(
    mode: &str,
    listen: SocketAddr,
    target: SocketAddr,
    key: &std::path::Path,
    extra: &[&str],
    stderr: Stdio,
) -> Proc {
    let child = sealpipe()
        .args([mode, "--listen", &listen.to_string()])
        .args(["--target", &target.to_string(), "--threads", "1", "--key"])
        .arg(key)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let p = Proc(child);
    wait_listening(listen);
    p
}

#[test]
fn sigkill_of_the_decrypt_process_resets_the_client_promptly() {
    let echo = echo_backend();
    let key = keygen("kill");
    let dec = free_addr();
    let dproc = spawn_side(
        "decrypt",
        dec,
        echo.addr,
        &key,
        &["--log-level", "error"],
        Stdio::null(),
    );
    let (enc, e) = start(tunnel(Mode::Encrypt, &[dec], &[key]), limits());
    let c = connect(enc);
    let (stop, writer) = stoppable_writer(&c, 9);
    let mut r = c;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    while got < 1 << 20 {
        got += r.read(&mut buf).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    // Mid-transfer (bytes in flight both ways, no end in sight): the decrypt process dies
    // without a word.
    let mut dproc = dproc;
    dproc.0.kill().unwrap();
    let killed_at = Instant::now();
    let (_rest, err) = read_to_end(&mut r);
    let took = killed_at.elapsed();
    assert_eq!(
        err,
        Some(ErrorKind::ConnectionReset),
        "the client must see a reset, not {err:?}"
    );
    assert!(took < Duration::from_secs(5), "reset took {took:?}");
    wait_until("encrypt side closed it", || active(&e) == 0.0);
    let cut = closed(&e, "truncated") + closed(&e, "peer_reset");
    assert!(cut >= 1.0, "counted as truncated or reset");
}

#[test]
fn sigterm_under_request_load_answers_everything_and_exits_zero() {
    const CLIENTS: usize = 16;
    const BEFORE: usize = 20;
    const AFTER: usize = 20;
    let echo = echo_backend();
    let key = keygen("term");
    let (dec, _d) = start(
        tunnel(Mode::Decrypt, &[echo.addr], std::slice::from_ref(&key)),
        limits(),
    );
    let enc = free_addr();
    let mut eproc = spawn_side(
        "encrypt",
        enc,
        dec,
        &key,
        // Room for the 320 round trips after SIGTERM on a loaded machine (they take ~50 ms
        // on an idle one); the straggler is cut when it runs out.
        &["--drain-timeout", "8", "--log-level", "warn"],
        Stdio::null(),
    );
    let done_before = Arc::new(AtomicUsize::new(0));
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(0);
    let mut clients = Vec::new();
    for id in 0..CLIENTS {
        let done_before = done_before.clone();
        let go = go_rx.clone();
        let mut c = connect(enc);
        clients.push(std::thread::spawn(move || {
            let mut req = [0u8; 512];
            let mut back = [0u8; 512];
            for i in 0..BEFORE + AFTER {
                if i == BEFORE {
                    done_before.fetch_add(1, Ordering::SeqCst);
                    // Wait for the drain to have begun; a closed channel means go.
                    let _ = go.recv();
                }
                pattern((id * 1000 + i) as u64, 0, &mut req);
                c.write_all(&req).unwrap();
                c.read_exact(&mut back).unwrap();
                assert_eq!(back, req, "client {id} request {i}");
            }
            c.shutdown(Shutdown::Write).unwrap();
            let (rest, err) = read_to_end(&mut c);
            assert!(rest.is_empty() && err.is_none(), "client {id}: {err:?}");
            BEFORE + AFTER
        }));
    }
    // A straggler that never finishes: the drain deadline must cut it with a reset.
    let mut straggler = connect(enc);
    straggler.write_all(b"hi").unwrap();
    let mut b = [0u8; 2];
    straggler.read_exact(&mut b).unwrap();
    wait_until("every client mid-way", || {
        done_before.load(Ordering::SeqCst) == CLIENTS
    });
    eproc.signal("TERM");
    let t = Instant::now();
    wait_until("listener closed after SIGTERM", || {
        TcpStream::connect(enc).is_err()
    });
    drop(go_tx); // open connections keep working while draining
    let answered: usize = clients.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(answered, CLIENTS * (BEFORE + AFTER));
    assert_eq!(
        read_until_end(&mut straggler),
        Some(ErrorKind::ConnectionReset),
        "a connection cut by the drain deadline must be reset, not closed cleanly"
    );
    let status = eproc.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(0));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(7),
        "exited before the drain timeout: {took:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Security: no key material in logs

fn base64(data: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(alphabet[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn trace_logs_never_contain_key_material() {
    let echo = echo_backend();
    let key = keygen("logs");
    let hex = std::fs::read_to_string(&key).unwrap().trim().to_string();
    assert_eq!(hex.len(), 64);
    let bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let dir = temp_dir("logs");
    let (dlog, elog) = (dir.join("decrypt.log"), dir.join("encrypt.log"));
    let dec = free_addr();
    let enc = free_addr();
    let trace = ["--log-level", "trace", "--drain-timeout", "2"];
    let mut dproc = spawn_side(
        "decrypt",
        dec,
        echo.addr,
        &key,
        &trace,
        std::fs::File::create(&dlog).unwrap().into(),
    );
    let mut eproc = spawn_side(
        "encrypt",
        enc,
        dec,
        &key,
        &trace,
        std::fs::File::create(&elog).unwrap().into(),
    );
    round_trip(enc, 21, 256 * 1024);
    // Raw garbage and wrong-key clients at the decrypt side. Warnings about bad peers are
    // rate-limited (10 a second), so wrong-key clients keep coming until one is logged.
    let mut g = connect(dec);
    let _ = g.write_all(&[0x42; 300]);
    let _ = read_to_end(&mut g);
    let (wrong, _w) = start(tunnel(Mode::Encrypt, &[dec], &[keygen("other")]), limits());
    wait_until("the wrong key named in the decrypt log", || {
        let mut c = connect(wrong);
        let _ = c.write_all(b"with the wrong key");
        let _ = read_to_end(&mut c);
        std::fs::read_to_string(&dlog)
            .unwrap()
            .contains("unknown_key")
    });
    for p in [&mut eproc, &mut dproc] {
        p.signal("TERM");
        assert_eq!(p.wait_exit(TIMEOUT).code(), Some(0));
    }
    let std_alpha: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let url_alpha: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let decimal: Vec<String> = bytes.iter().map(|b| b.to_string()).collect();
    let forbidden = [
        ("hex", hex.to_lowercase()),
        ("HEX", hex.to_uppercase()),
        // A prefix is enough to catch a truncated or wrapped dump.
        ("hex prefix", hex[..16].to_lowercase()),
        ("base64", base64(&bytes, std_alpha, true)),
        (
            "base64 prefix",
            base64(&bytes, std_alpha, false)[..16].to_string(),
        ),
        ("base64url", base64(&bytes, url_alpha, false)),
        ("Debug bytes", decimal[..6].join(", ")),
    ];
    for (path, side) in [(&dlog, "decrypt"), (&elog, "encrypt")] {
        let log = std::fs::read_to_string(path).unwrap();
        assert!(
            log.lines().count() > 5,
            "{side} logged almost nothing at trace"
        );
        for (what, s) in &forbidden {
            assert!(
                !log.contains(s.as_str()),
                "{side} log contains the key as {what}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The network between the pair: two network namespaces joined by a user-space WAN link
//
//   [ns A: client, encrypt on 127.0.0.1:7000] --tun 10.213.0.1 <== relay ==> 10.213.0.2 tun--
//   [ns B: decrypt on 10.213.0.2:7001, echo backend on 127.0.0.1]
//
// The relay (faults/wanlink.rs) is a thread of this process holding both TUN devices: it
// delays, drops and reorders real IP packets, so the kernels' TCP on both sides meets a WAN
// (these kernels have no sch_netem). Addresses exist only inside the namespaces this test
// creates; nothing is routed out of them. The test's own threads join a namespace with
// setns(2) to open their sockets there.

mod wanlink;

/// Namespaces, link and processes of one run; torn down on drop, even on failure: processes
/// killed, relay stopped (its devices vanish with their descriptors), namespaces deleted.
struct Netns {
    names: Vec<String>,
    link: Option<wanlink::WanLink>,
    procs: Vec<Proc>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.procs.clear(); // kill our sealpipe children first
        self.link = None;
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

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

/// Runs `f` on a thread inside namespace `ns` and returns its result.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns);
        f()
    })
    .join()
    .unwrap()
}

const ADDR_A: &str = "10.213.0.1";
const ADDR_B: &str = "10.213.0.2";

/// Creates the two namespaces and the relayed TUN link between them; Err when this host or
/// user cannot.
fn netns_setup() -> Result<Netns, String> {
    let id = std::process::id();
    let mut ns = Netns {
        names: Vec::new(),
        link: None,
        procs: Vec::new(),
    };
    for side in ["a", "b"] {
        let name = format!("sp-faults-{id}-{side}");
        ip(&["netns", "add", &name])?;
        ns.names.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
    }
    ns.link = Some(wanlink::WanLink::new(
        [&ns.names[0], &ns.names[1]],
        [ADDR_A, ADDR_B],
    )?);
    Ok(ns)
}

/// `/metrics` of the sealpipe serving its endpoint on 127.0.0.1:9750 inside namespace `ns`.
fn scrape_in(ns: &str) -> String {
    in_netns(ns, || {
        let (status, text) = http_get("127.0.0.1:9750".parse().unwrap(), "/metrics");
        assert_eq!(status, 200);
        text
    })
}

/// One echoed transfer of `len` bytes each way from namespace `ns`; returns how long it took.
fn timed_round_trip(ns: &str, to: SocketAddr, seed: u64, len: usize) -> Duration {
    in_netns(ns, move || {
        let t = Instant::now();
        round_trip(to, seed, len);
        t.elapsed()
    })
}

#[test]
fn network_between_the_pair_delay_loss_reordering_then_link_cut() {
    if !root_or_skip(
        "network_between_the_pair_delay_loss_reordering_then_link_cut",
        "network namespaces and TUN devices",
    ) {
        return;
    }
    let mut ns = match netns_setup() {
        Ok(ns) => ns,
        Err(e) => panic!(
            "cannot build the two network namespaces and the TUN link this test needs: {e}\n\
             It needs root (CAP_NET_ADMIN and /dev/net/tun), as in CI."
        ),
    };
    let (a, b) = (ns.names[0].clone(), ns.names[1].clone());
    let ns_names = [a.clone(), b.clone()];
    let key = keygen("netns");
    // The echo backend lives in B; its threads inherit B's namespace.
    let backend: SocketAddr = in_netns(&b, || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
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
    });
    let dec: SocketAddr = format!("{ADDR_B}:7001").parse().unwrap();
    let enc: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    let timeouts = ["--idle-timeout", "2", "--half-closed-timeout", "2"];
    // (The encrypt side without warm sessions: this test counts every session's close.)
    for (n, mode, listen, target) in [(&b, "decrypt", dec, backend), (&a, "encrypt", enc, dec)] {
        let warm_off: &[&str] = if mode == "encrypt" {
            &["--warm-max", "0"]
        } else {
            &[]
        };
        let child = Command::new("ip")
            .args(["netns", "exec", n, env!("CARGO_BIN_EXE_sealpipe"), mode])
            .args([
                "--listen",
                &listen.to_string(),
                "--target",
                &target.to_string(),
            ])
            .args(["--threads", "1", "--log-level", "error", "--key"])
            .arg(&key)
            .args(timeouts)
            .args(warm_off)
            .args(["--metrics", "127.0.0.1:9750"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        ns.procs.push(Proc(child));
        // The decrypt side must listen before the encrypt side's first connect, or that
        // connect is refused and the target marked down.
        in_netns(n, move || {
            wait_listening(listen);
            wait_listening("127.0.0.1:9750".parse().unwrap());
        });
    }
    let link = ns.link.as_ref().unwrap();
    // Closes so far, by side and reason (wait_listening's probes were connections too).
    let closes = |n: &str| {
        let text = scrape_in(n);
        sealpipe::metrics::CLOSE_REASONS
            .map(|r| metric_in(&text, "sealpipe_connections_closed_total", &[("reason", r)]))
    };
    for n in [&a, &b] {
        wait_until("the listening probes closed", || {
            metric_in(&scrape_in(n), "sealpipe_connections_active", &[]) == 0.0
        });
    }
    let closes_at_start = [closes(&a), closes(&b)];
    let closed_since_start = |side: usize, reason: &str| {
        let i = sealpipe::metrics::CLOSE_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap();
        closes(&ns_names[side])[i] - closes_at_start[side][i]
    };

    // The same transfer over the clean link, then with 50 ms each way (100 ms RTT), then
    // also 1 % loss and 5 % of packets held back 5 ms (overtaken by the ones after them):
    // byte-exact every time. Throughput is reported, not asserted.
    const LEN: usize = 1 << 20;
    let steps = [
        ("clean link", Duration::ZERO, 0, 0),
        ("50 ms each way", Duration::from_millis(50), 0, 0),
        (
            "50 ms + 1 % loss + 5 % reordered",
            Duration::from_millis(50),
            10_000,
            50_000,
        ),
    ];
    for (seed, (what, delay, loss_ppm, reorder_ppm)) in steps.into_iter().enumerate() {
        link.impair(delay, loss_ppm, reorder_ppm, Duration::from_millis(5));
        let lost_before = link.stats.lost.load(Ordering::Relaxed);
        let took = timed_round_trip(&a, enc, 30 + seed as u64, LEN);
        eprintln!(
            "1 MiB each way byte-exact over the {what}: {took:?}, {:.2} MiB/s ({} packets lost)",
            (2 * LEN) as f64 / (1 << 20) as f64 / took.as_secs_f64(),
            link.stats.lost.load(Ordering::Relaxed) - lost_before,
        );
    }
    eprintln!("relay: {}", link.stats.summary());
    // The impairment was real: packets of the transfer were lost and reordered on the way.
    let (lost, reordered) = (
        link.stats.lost.load(Ordering::Relaxed),
        link.stats.reordered.load(Ordering::Relaxed),
    );
    assert!(lost > 0, "no packet lost: the link was not impaired");
    assert!(
        reordered > 0,
        "no packet reordered: the link was not impaired"
    );
    // Loss and reordering are TCP's to repair: both transfers ended cleanly, and no record
    // was seen as tampered or a stream as truncated.
    for (i, side) in ["encrypt", "decrypt"].into_iter().enumerate() {
        wait_until(
            &format!("{side} counts every transfer as a clean close"),
            || closed_since_start(i, "clean") == steps.len() as f64,
        );
        for reason in sealpipe::metrics::CLOSE_REASONS {
            if reason != "clean" {
                assert_eq!(
                    closed_since_start(i, reason),
                    0.0,
                    "{side}: closed as {reason}"
                );
            }
        }
    }

    // Link cut mid-transfer (the relay forwards nothing more; devices stay up): noticed by
    // the idle timeout (2 s) on both sides — the client is reset, not left hanging and not
    // given an EOF that would make the cut stream look complete.
    let (cut_tx, cut_rx) = mpsc::channel::<Instant>();
    let client = std::thread::spawn({
        let a = a.clone();
        let impairment = link.impairment.clone();
        move || {
            enter_netns(&a);
            let c = connect(enc);
            let (stop, writer) = stoppable_writer(&c, 7);
            let mut r = c;
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0;
            while got < 256 * 1024 {
                got += r.read(&mut buf).unwrap();
            }
            impairment.cut.store(true, Ordering::Relaxed);
            let cut_at = Instant::now();
            let _ = cut_tx.send(cut_at);
            stop.store(true, Ordering::Relaxed);
            writer.join().unwrap();
            let err = read_to_end(&mut r).1;
            (err, cut_at.elapsed())
        }
    });
    cut_rx.recv_timeout(TIMEOUT).expect("link never cut");
    let (err, took) = client.join().unwrap();
    eprintln!("link cut noticed after {took:?} (idle timeout 2 s)");
    assert_eq!(
        err,
        Some(ErrorKind::ConnectionReset),
        "after the link cut the client must be reset by the idle timeout (after {took:?})"
    );
    // The idle timer did it: not before its 2 s, and counted as such on both sides.
    assert!(
        took >= Duration::from_secs(2),
        "reset {took:?} after the cut, before the 2 s idle timeout"
    );
    for (i, side) in ["encrypt", "decrypt"].into_iter().enumerate() {
        wait_until(
            &format!("{side} closes the cut connection on its idle timer"),
            || closed_since_start(i, "idle_timeout") == 1.0,
        );
        let active = metric_in(&scrape_in(&ns_names[i]), "sealpipe_connections_active", &[]);
        assert_eq!(active, 0.0, "{side}: connections left open");
    }
    eprintln!("relay at the end: {}", link.stats.summary());
}
