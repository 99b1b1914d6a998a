//! Protocol v2 as an operator meets it: real `sealpipe` processes, their metrics endpoints and
//! their log lines (stderr, JSON), real sockets.
//!
//! - Aborts travel: a client's reset reaches the backend as a reset and is counted as
//!   `client_reset` on the decrypt side (not `truncated`, not a WARN line); a backend's reset
//!   reaches the client the same way and is counted as `upstream_reset` on the encrypt side.
//! - Handshake failures name their cause: the decrypt side says which check failed (unknown key
//!   id, forward secrecy required, not a sealpipe peer, protocol version), the encrypt side says
//!   what the decrypt side's silence most likely means — and the wire stays silent.
//! - An unauthenticated hello costs the decrypt side no X25519 key.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::*;

/// One sealpipe process: its data and metrics addresses and the file its stderr goes to.
struct Side {
    child: Proc,
    listen: SocketAddr,
    metrics: SocketAddr,
    log: PathBuf,
}

impl Side {
    fn start(mode: &str, target: SocketAddr, key: &Path, extra: &[&str]) -> Side {
        let listen = free_addr();
        let metrics = free_addr();
        let log = temp_dir("v2log").join(format!("{mode}.log"));
        // These tests count sessions, handshakes and connections one per client: an encrypt
        // side here makes no warm sessions (tests/warm.rs is about those).
        let warm_off: &[&str] = if mode == "encrypt" {
            &["--warm-max", "0"]
        } else {
            &[]
        };
        let child = sealpipe()
            .arg(mode)
            .args(["--listen", &listen.to_string()])
            .args(["--target", &target.to_string()])
            .arg("--key")
            .arg(key)
            .args(["--metrics", &metrics.to_string()])
            .args(["--threads", "1", "--log-format", "json"])
            .args(warm_off)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let side = Side {
            child: Proc(child),
            listen,
            metrics,
            log,
        };
        // Ready = listeners up, asked of the metrics endpoint: a probe connection to the data
        // port would be a real client (a session, a backend connection, log lines).
        wait_listening(metrics);
        wait_until(&format!("{mode} ready"), || {
            side.get("/readyz").starts_with("HTTP/1.0 200")
        });
        side
    }

    fn get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(self.metrics).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// Log lines (JSON) at `level`.
    /// The log's lines at `level`, but for the shard's stall warning: a callback that took
    /// over 100 ms of wall-clock time, which a loaded machine's scheduler alone can cause, and
    /// which says nothing of what these tests look at.
    fn lines_at(&self, level: &str) -> Vec<String> {
        let tag = format!("\"level\":\"{level}\"");
        self.log_text()
            .lines()
            .filter(|l| l.contains(&tag) && !l.contains("loop stalled in a callback"))
            .map(str::to_owned)
            .collect()
    }

    fn scrape(&self) -> String {
        self.get("/metrics")
    }

    /// The value of the one series `name{labels...}`; panics if it is absent, so a renamed
    /// series fails the test instead of reading as zero.
    fn series(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.scrape();
        series_in(&text, name, labels)
            .unwrap_or_else(|| panic!("no series {name}{labels:?} in:\n{text}"))
    }

    /// Waits until the log holds a line at `level` containing every one of `words`.
    fn wait_log(&self, level: &str, words: &[&str]) -> String {
        let mut found = String::new();
        wait_until(&format!("a {level} line with {words:?}"), || {
            match self
                .lines_at(level)
                .into_iter()
                .find(|l| words.iter().all(|w| l.contains(w)))
            {
                Some(l) => {
                    found = l;
                    true
                }
                None => false,
            }
        });
        found
    }
}

/// The sum of the samples of `name` whose labels include `labels`; `None` when there is none.
fn series_in(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labelset, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => match rest.strip_prefix(' ') {
                Some(v) => ("", v),
                None => continue,
            },
        };
        if labels
            .iter()
            .all(|(k, v)| labelset.contains(&format!("{k}=\"{v}\"")))
        {
            let v: f64 = value.trim().parse().expect("a number");
            sum = Some(sum.unwrap_or(0.0) + v);
        }
    }
    sum
}

/// A new key file and the key id `keygen` printed for it.
fn keygen_with_id(tag: &str) -> (PathBuf, String) {
    let p = temp_dir(tag).join("k.key");
    let out = sealpipe()
        .args(["keygen", "--out"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let id = text
        .split("key id ")
        .nth(1)
        .and_then(|s| s.get(..16))
        .unwrap_or_else(|| panic!("no key id in {text:?}"))
        .to_owned();
    (p, id)
}

/// An echo backend that reports how each connection's read side ended (None = clean EOF).
fn reporting_echo() -> (SocketAddr, mpsc::Receiver<Option<ErrorKind>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
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
        }
    });
    (addr, rx)
}

/// A decrypt side in front of `backend` and an encrypt side in front of it, sharing one key.
fn pair_of_processes(backend: SocketAddr, enc_extra: &[&str], dec_extra: &[&str]) -> (Side, Side) {
    let (key, _) = keygen_with_id("v2pair");
    let dec = Side::start("decrypt", backend, &key, dec_extra);
    let enc = Side::start("encrypt", dec.listen, &key, enc_extra);
    (enc, dec)
}

#[test]
fn client_reset_reaches_the_backend_as_a_reset_and_is_counted_not_warned() {
    let (backend, ended) = reporting_echo();
    let (enc, dec) = pair_of_processes(backend, &[], &[]);
    let mut c = connect(enc.listen);
    c.write_all(&[7u8; 10_000]).unwrap();
    let mut back = vec![0u8; 10_000];
    c.read_exact(&mut back).unwrap();
    reset_close(c);
    assert_eq!(
        ended.recv_timeout(TIMEOUT).unwrap(),
        Some(ErrorKind::ConnectionReset),
        "the backend must see the client's abort as a reset"
    );
    wait_until("decrypt side counts client_reset", || {
        dec.series(
            "sealpipe_connections_closed_total",
            &[("reason", "client_reset")],
        ) >= 1.0
    });
    assert_eq!(
        dec.series(
            "sealpipe_connections_closed_total",
            &[("reason", "truncated")]
        ),
        0.0,
        "an abort told in an authenticated record is not a truncation"
    );
    wait_until("encrypt side closed it", || {
        enc.series("sealpipe_connections_active", &[]) == 0.0
    });
    let warns: Vec<String> = [&enc, &dec]
        .iter()
        .flat_map(|s| s.lines_at("WARN"))
        .collect();
    assert!(warns.is_empty(), "a client abort is no warning: {warns:#?}");
}

#[test]
fn backend_reset_reaches_the_client_as_a_reset_and_is_counted_upstream_reset() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut req = [0u8; 100];
            if s.read_exact(&mut req).is_ok() && s.write_all(&req).is_ok() {
                reset_close(s);
            }
        }
    });
    let (enc, dec) = pair_of_processes(backend, &[], &[]);
    let mut c = connect(enc.listen);
    c.write_all(&[3u8; 100]).unwrap();
    let mut back = [0u8; 100];
    c.read_exact(&mut back).unwrap();
    assert_eq!(back, [3u8; 100]);
    let (_, err) = read_to_end(&mut c);
    assert_eq!(err, Some(ErrorKind::ConnectionReset));
    wait_until("encrypt side counts upstream_reset", || {
        enc.series(
            "sealpipe_connections_closed_total",
            &[("reason", "upstream_reset")],
        ) >= 1.0
    });
    assert_eq!(
        enc.series(
            "sealpipe_connections_closed_total",
            &[("reason", "truncated")]
        ),
        0.0
    );
    wait_until("decrypt side closed it", || {
        dec.series("sealpipe_connections_active", &[]) == 0.0
    });
    let warns: Vec<String> = [&enc, &dec]
        .iter()
        .flat_map(|s| s.lines_at("WARN"))
        .collect();
    assert!(
        warns.is_empty(),
        "a backend abort is no warning: {warns:#?}"
    );
}

/// Connects a client through `enc`, sends a request and expects the plaintext side to be cut
/// without a single byte coming back.
fn client_is_refused(enc: &Side) {
    let mut c = connect(enc.listen);
    let _ = c.write_all(b"PING\r\n");
    let (got, _) = read_to_end(&mut c);
    assert!(got.is_empty(), "nothing may come back: {got:?}");
}

#[test]
fn wrong_key_is_named_on_both_sides() {
    let echo = echo_backend();
    let (dec_key, dec_id) = keygen_with_id("wk-d");
    let (enc_key, enc_id) = keygen_with_id("wk-e");
    let dec = Side::start("decrypt", echo.addr, &dec_key, &[]);
    let enc = Side::start("encrypt", dec.listen, &enc_key, &[]);
    client_is_refused(&enc);
    // The decrypt side knows exactly what happened, and which key id it was asked for.
    let line = dec.wait_log("WARN", &["unknown_key", &enc_id]);
    assert!(line.contains(&dec_id), "names the loaded key ids: {line}");
    // The encrypt side only saw the connection close; it says what that most likely means.
    let line = enc.wait_log("WARN", &["closed during the handshake", "wrong key"]);
    assert!(
        line.contains("forward-secrecy") && line.contains("decrypt side's log"),
        "{line}"
    );
    assert_eq!(
        echo.conns.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing reached the backend"
    );
    assert!(dec.series("sealpipe_handshakes_total", &[("result", "unknown_key")]) >= 1.0);
}

#[test]
fn forward_secrecy_mismatch_is_named_on_both_sides() {
    let echo = echo_backend();
    let (key, _) = keygen_with_id("fsm");
    // The decrypt side requires forward secrecy (the default); the encrypt side turned it off.
    let dec = Side::start("decrypt", echo.addr, &key, &[]);
    let enc = Side::start("encrypt", dec.listen, &key, &["--no-forward-secrecy"]);
    client_is_refused(&enc);
    dec.wait_log("WARN", &["fs_required", "forward secrecy"]);
    enc.wait_log("WARN", &["closed during the handshake", "forward-secrecy"]);
    assert!(dec.series("sealpipe_handshakes_total", &[("result", "fs_required")]) >= 1.0);
}

#[test]
fn plaintext_to_a_decrypt_port_is_named_not_a_sealpipe_peer() {
    let echo = echo_backend();
    let (key, _) = keygen_with_id("pt");
    let dec = Side::start("decrypt", echo.addr, &key, &[]);
    let mut c = connect(dec.listen);
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (got, _) = read_to_end(&mut c);
    assert!(got.is_empty(), "the responder says nothing: {got:?}");
    dec.wait_log("WARN", &["not_sealpipe", "not a sealpipe"]);
    assert!(dec.series("sealpipe_handshakes_total", &[("result", "not_sealpipe")]) >= 1.0);
}

/// What a version-1 initiator sends first: version byte 1, FS flag, a key id, nonce, key, MAC.
fn v1_hello() -> Vec<u8> {
    let mut h = vec![0x01, 0x01];
    h.extend_from_slice(&[0x5a; 104]);
    h
}

#[test]
fn a_version_1_peer_gets_a_version_error_at_once_not_a_hang() {
    let echo = echo_backend();
    let (key, _) = keygen_with_id("v1");
    // A long handshake timeout: a hang would show as a connection still open after seconds.
    let dec = Side::start("decrypt", echo.addr, &key, &["--handshake-timeout", "60"]);
    let mut c = connect(dec.listen);
    let t = Instant::now();
    c.write_all(&v1_hello()).unwrap();
    let (got, _) = read_to_end(&mut c);
    let took = t.elapsed();
    assert!(got.is_empty());
    assert!(
        took < Duration::from_secs(10),
        "the decrypt side closed only after {took:?}"
    );
    let line = dec.wait_log("WARN", &["\"error\":\"version\""]);
    assert!(
        line.contains("version 1") && line.contains("version 2"),
        "names both versions: {line}"
    );
    assert!(dec.series("sealpipe_handshakes_total", &[("result", "version")]) >= 1.0);
}

#[test]
fn unauthenticated_hellos_cost_the_decrypt_side_no_ephemeral_key() {
    let echo = echo_backend();
    let (key, _) = keygen_with_id("eph");
    let (other, _) = keygen_with_id("eph-other");
    let dec = Side::start("decrypt", echo.addr, &key, &[]);
    // A wrong-key encrypt side (its hellos are well-formed and fail the key id / MAC checks),
    // garbage, and half a hello.
    let wrong = Side::start("encrypt", dec.listen, &other, &[]);
    for _ in 0..20 {
        client_is_refused(&wrong);
    }
    for payload in [&b"\x02\x01"[..], &[0x02; 300], b"GET / HTTP/1.0\r\n\r\n"] {
        let mut c = connect(dec.listen);
        let _ = c.write_all(payload);
        let _ = c.shutdown(Shutdown::Write);
        let _ = read_to_end(&mut c);
    }
    wait_until("every failed handshake counted", || {
        dec.series(
            "sealpipe_connections_closed_total",
            &[("reason", "handshake_failed")],
        ) >= 23.0
    });
    assert_eq!(
        dec.series("sealpipe_ephemeral_keys_total", &[]),
        0.0,
        "no X25519 key may be spent before a hello authenticates"
    );
    // One good client: exactly one key.
    let good = Side::start("encrypt", dec.listen, &key, &[]);
    round_trip(good.listen, 3, 1000);
    wait_until("one key used", || {
        dec.series("sealpipe_ephemeral_keys_total", &[]) == 1.0
    });
}

#[test]
fn non_forward_secret_sessions_are_counted_and_warned_where_allowed() {
    let echo = echo_backend();
    let (key, _) = keygen_with_id("fsallow");
    let dec = Side::start("decrypt", echo.addr, &key, &["--forward-secrecy", "allow"]);
    let plain = Side::start("encrypt", dec.listen, &key, &["--forward-secrecy", "off"]);
    let fs = Side::start("encrypt", dec.listen, &key, &[]);
    round_trip(fs.listen, 1, 100);
    round_trip(plain.listen, 2, 100);
    round_trip(plain.listen, 3, 100);
    wait_until("sessions counted by forward secrecy", || {
        dec.series("sealpipe_sessions_total", &[("fs", "no")]) == 2.0
            && dec.series("sealpipe_sessions_total", &[("fs", "yes")]) == 1.0
    });
    assert_eq!(
        plain.series("sealpipe_sessions_total", &[("fs", "no")]),
        2.0
    );
    dec.wait_log("WARN", &["without forward secrecy"]);
}

// ---------------------------------------------------------------------------------------------
// Key files

#[test]
fn a_key_path_that_became_a_fifo_fails_the_reload_instead_of_hanging_it() {
    let echo = echo_backend();
    let (key, _) = keygen_with_id("fifo");
    let dec = Side::start("decrypt", echo.addr, &key, &[]);
    let copy = key.with_file_name("copy.key");
    std::fs::copy(&key, &copy).unwrap();
    // The key file is replaced by a FIFO nobody writes to: opening it for reading would block.
    std::fs::remove_file(&key).unwrap();
    let ok = std::process::Command::new("mkfifo")
        .arg("-m")
        .arg("600")
        .arg(&key)
        .status()
        .unwrap();
    assert!(ok.success(), "mkfifo");
    dec.child.signal("HUP");
    let line = dec.wait_log("ERROR", &["reload rejected"]);
    assert!(
        line.contains(&*key.to_string_lossy()) && line.contains("regular file"),
        "{line}"
    );
    // The control thread is free: the old key still serves and SIGTERM is obeyed at once.
    let good = Side::start("encrypt", dec.listen, &copy, &[]);
    round_trip(good.listen, 9, 100);
    let mut dec = dec;
    dec.child.signal("TERM");
    assert_eq!(dec.child.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn keygen_never_leaves_half_a_key() {
    let dir = temp_dir("kg-full");
    let out = dir.join("new.key");
    // A file-size limit of 0: the write fails as it would on a full disk (EFBIG, with SIGXFSZ
    // ignored so the process sees the error).
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 0; exec \"$0\" keygen --out \"$1\"")
        .arg(env!("CARGO_BIN_EXE_sealpipe"))
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(2), "{status:?}");
    assert!(
        !out.exists(),
        "a failed keygen left {} behind ({} bytes)",
        out.display(),
        std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0)
    );
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    // And a normal run still refuses to overwrite.
    let ok = sealpipe()
        .args(["keygen", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(ok.status.success());
    let again = sealpipe()
        .args(["keygen", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}

#[test]
fn encrypt_and_decrypt_help_say_what_both_sides_must_agree_on() {
    for mode in ["encrypt", "decrypt"] {
        let out = sealpipe().args([mode, "--help"]).output().unwrap();
        assert!(out.status.success());
        let help = String::from_utf8(out.stdout).unwrap();
        for must in [
            "must agree on",
            "key",
            "forward secrecy",
            "protocol version (2)",
            "--forward-secrecy <POLICY>",
        ] {
            assert!(help.contains(must), "{mode} --help lacks {must:?}:\n{help}");
        }
    }
}

/// A TCP server that sends `banner` on every connection (or nothing), then holds it open.
fn banner_server(banner: &'static [u8]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let _ = s.write_all(banner);
            held.push(s);
        }
    });
    addr
}

#[test]
fn an_encrypt_side_pointed_at_the_wrong_server_says_so() {
    let (key, _) = keygen_with_id("wrongtarget");
    // A plaintext service that speaks first (SSH, SMTP, a Redis error): not a sealpipe hello.
    let banner = banner_server(b"SSH-2.0-OpenSSH_9.6\r\n");
    let enc = Side::start("encrypt", banner, &key, &[]);
    client_is_refused(&enc);
    enc.wait_log(
        "WARN",
        &[
            "not_sealpipe",
            "not a sealpipe hello",
            "decrypt side's listen",
        ],
    );
    assert!(enc.series("sealpipe_handshakes_total", &[("result", "not_sealpipe")]) >= 1.0);
    // A service that says nothing: the handshake times out, and the warning says where to look.
    let silent = banner_server(b"");
    let enc = Side::start("encrypt", silent, &key, &["--handshake-timeout", "0.5"]);
    client_is_refused(&enc);
    enc.wait_log(
        "WARN",
        &["no answer from the target within handshake_timeout"],
    );
    assert!(enc.series("sealpipe_handshakes_total", &[("result", "timeout")]) >= 1.0);
}
