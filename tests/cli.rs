//! The `sealpipe` command: keygen, check, usage errors, and signals on a real process.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;

#[test]
fn keygen_writes_0600_and_refuses_to_overwrite() {
    let p = temp_dir("kg").join("new.key");
    let out = sealpipe()
        .args(["keygen", "--out"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = sealpipe()
        .args(["keygen", "--out"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains(&*p.to_string_lossy()));
}

#[test]
fn world_readable_key_is_refused_with_its_name() {
    let p = keygen("wr");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = sealpipe()
        .args([
            "encrypt",
            "--listen",
            "127.0.0.1:0",
            "--target",
            "127.0.0.1:9",
            "--key",
        ])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&*p.to_string_lossy()));
}

#[test]
fn check_accepts_the_example_and_rejects_bad_configs() {
    let dir = temp_dir("chk");
    let key = keygen("chk");
    // The example config with its key paths pointed at a real key.
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/sealpipe.example.toml"
    ))
    .unwrap();
    let mut text = String::new();
    for line in example.lines() {
        // Point every key path of the example at a real key file.
        let mut l = line.to_string();
        while let Some(start) = l.find("\"/etc/sealpipe/keys/") {
            let end = start + 1 + l[start + 1..].find('"').unwrap();
            l.replace_range(start..=end, &format!("{:?}", key.to_string_lossy()));
        }
        text.push_str(&l);
        text.push('\n');
    }
    let good = dir.join("good.toml");
    std::fs::write(&good, text).unwrap();
    let out = sealpipe()
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[limits]\nthreads = 1\nfrobnicate = true\n").unwrap();
    let out = sealpipe()
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 3") && err.contains("frobnicate"),
        "{err}"
    );
}

#[test]
fn address_in_use_is_one_clear_error() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let out = sealpipe()
        .args([
            "forward",
            "--listen",
            &addr,
            "--target",
            "127.0.0.1:9",
            "--threads",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&addr) && err.to_lowercase().contains("in use"),
        "{err}"
    );
}

/// Starts `sealpipe forward` on a free port in front of `target`.
fn forward(target: SocketAddr, threads: &str, drain: &str) -> (SocketAddr, Proc) {
    let listen = free_addr();
    let child = sealpipe()
        .args([
            "forward",
            "--listen",
            &listen.to_string(),
            "--target",
            &target.to_string(),
        ])
        .args([
            "--threads",
            threads,
            "--drain-timeout",
            drain,
            "--log-level",
            "error",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(listen);
    (listen, Proc(child))
}

/// Waits until `addr` refuses connections (its listeners closed).
fn wait_refusing(addr: SocketAddr) {
    wait_until(&format!("{addr} refusing"), || {
        TcpStream::connect(addr).is_err()
    });
}

#[test]
fn sigterm_drains_in_flight_transfer_then_exits_zero() {
    let echo = echo_backend();
    let (listen, mut p) = forward(echo.addr, "2", "20");
    // An in-flight exchange: half of the request now, the rest after SIGTERM.
    let mut c = connect(listen);
    c.write_all(&[5u8; 100_000]).unwrap();
    let mut first = vec![0u8; 100_000];
    c.read_exact(&mut first).unwrap();
    p.signal("TERM");
    // New connections are refused once the listeners closed.
    wait_refusing(listen);
    c.write_all(&[6u8; 100_000]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let (rest, err) = read_to_end(&mut c);
    assert_eq!(err, None);
    assert_eq!(rest.len(), 100_000);
    assert!(rest.iter().all(|b| *b == 6));
    assert_eq!(p.wait_exit(TIMEOUT).code(), Some(0));
}

#[test]
fn second_sigterm_exits_at_once() {
    let echo = echo_backend();
    let (listen, mut p) = forward(echo.addr, "1", "60");
    let mut c = connect(listen); // held open: the drain would wait 60 s for it
    c.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).unwrap();
    p.signal("TERM");
    wait_refusing(listen);
    p.signal("TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(10)).code(), Some(1));
}

#[test]
fn bad_target_and_missing_key_are_one_clear_line_each() {
    let out = sealpipe()
        .args([
            "forward",
            "--listen",
            "127.0.0.1:0",
            "--target",
            "127.0.0.1:notaport",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("127.0.0.1:notaport") && err.lines().count() == 1,
        "{err}"
    );

    let missing = temp_dir("mk").join("nope.key");
    let out = sealpipe()
        .args([
            "decrypt",
            "--listen",
            "127.0.0.1:0",
            "--target",
            "127.0.0.1:9",
            "--key",
        ])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&*missing.to_string_lossy()) && err.lines().count() == 1,
        "{err}"
    );
}

/// Runs a sealpipe command that should refuse to start: its output, once it exits (a process
/// still running after the deadline fails the test and is killed).
fn refused(args: &[&str]) -> std::process::Output {
    let mut p = Proc(
        sealpipe()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let status = p.wait_exit(TIMEOUT);
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    p.0.stdout.take().unwrap().read_to_end(&mut stdout).unwrap();
    p.0.stderr.take().unwrap().read_to_end(&mut stderr).unwrap();
    std::process::Output {
        status,
        stdout,
        stderr,
    }
}

/// Writes `text` as a config file and runs `sealpipe check` on it.
fn check(tag: &str, text: &str) -> std::process::Output {
    let p = temp_dir(tag).join("c.toml");
    std::fs::write(&p, text).unwrap();
    sealpipe()
        .args(["check", "--config"])
        .arg(&p)
        .output()
        .unwrap()
}

const FORWARD: &str =
    "[[tunnel]]\nmode = \"forward\"\nlisten = \"127.0.0.1:1\"\ntargets = [\"127.0.0.1:2\"]\n";

/// Item 6 of issue 14: one rule for durations. 0 turns off what can be off (idle,
/// half-closed, health checks, the drain wait); a timeout that must exist is rejected at 0 by
/// `check`, naming the setting and why.
#[test]
fn zero_durations_are_off_or_rejected_with_the_reason() {
    for key in ["idle_timeout", "half_closed_timeout", "drain_timeout"] {
        let out = check("dur-off", &format!("[limits]\n{key} = 0\n{FORWARD}"));
        assert!(
            out.status.success(),
            "[limits] {key} = 0 (off): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = check("dur-off", &format!("{FORWARD}health_check_interval = 0\n"));
    assert!(out.status.success(), "{out:?}");
    for key in ["handshake_timeout", "connect_timeout"] {
        for text in [
            format!("[limits]\n{key} = 0\n{FORWARD}"),
            format!("{FORWARD}{key} = 0\n"),
        ] {
            let out = check("dur-bad", &text);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{key} = 0 accepted: {text}");
            assert!(
                err.contains(key) && err.contains("cannot be 0") && err.lines().count() == 1,
                "{err}"
            );
        }
    }
    // The command line follows the same rule.
    let out = refused(&[
        "forward",
        "--listen",
        "127.0.0.1:0",
        "--target",
        "127.0.0.1:9",
        "--handshake-timeout",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    // Worded as the flag it was given as (issue 19), not as a config file's key.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--handshake-timeout cannot be 0") && !err.contains("[limits]"),
        "{err}"
    );
}

/// `--idle-timeout 0` is "no idle timeout", not "close every connection at once": a
/// connection outlives hibernation (250 ms quiet, seen in the metrics) and still echoes.
#[test]
fn idle_timeout_zero_keeps_connections_open() {
    let echo = echo_backend();
    let (listen, metrics) = (free_addr(), free_addr());
    let child = sealpipe()
        .args([
            "forward",
            "--listen",
            &listen.to_string(),
            "--target",
            &echo.addr.to_string(),
            "--threads",
            "1",
            "--idle-timeout",
            "0",
            "--metrics",
            &metrics.to_string(),
            "--log-level",
            "error",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _p = Proc(child);
    wait_listening(listen);
    let mut c = connect(listen);
    let mut b = [0u8; 4];
    c.write_all(b"ping").unwrap();
    c.read_exact(&mut b).unwrap();
    wait_until("the connection hibernates", || {
        let mut s = connect(metrics);
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        metric_in(&text, "sealpipe_connections_hibernating", &[]) >= 1.0
    });
    c.write_all(b"pong").unwrap();
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");
}

/// Item 6 of issue 14: an unknown log level is an error that lists the accepted ones, on the
/// command line and in a config file (before, `warning` or `loud` silently turned off all
/// logging, errors included).
#[test]
fn unknown_log_levels_are_rejected_naming_the_accepted_ones() {
    let accepted = "error, warn, info, debug, trace, off";
    let out = refused(&[
        "forward",
        "--listen",
        "127.0.0.1:0",
        "--target",
        "127.0.0.1:9",
        "--log-level",
        "warning",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("warning") && err.contains(accepted) && err.lines().count() == 1,
        "{err}"
    );
    for level in ["loud", "sealpipe=loud", "warn,", "=info", "info debug"] {
        let out = check("lvl", &format!("[log]\nlevel = {level:?}\n{FORWARD}"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "level {level:?} accepted");
        assert!(err.contains(accepted), "{err}");
    }
    for level in [
        "warn",
        "INFO",
        "off",
        "sealpipe=debug,warn",
        "sealpipe::proxy=trace",
    ] {
        let out = check("lvl", &format!("[log]\nlevel = {level:?}\n{FORWARD}"));
        assert!(out.status.success(), "level {level:?}: {out:?}");
    }
}

/// Item 6 of issue 14: logs written to a pipe or a file (journald, a log shipper) carry no
/// ANSI colour codes, and errors in log fields are their messages, not Rust's Debug form
/// (`error=Some(Os { code: 111, .. })`).
#[test]
fn logs_to_a_pipe_are_plain_and_show_errors_as_messages() {
    use std::io::BufRead;
    let dead = free_addr(); // nothing listens: every upstream connect is refused
    let listen = free_addr();
    let mut p = Proc(
        sealpipe()
            .args([
                "forward",
                "--listen",
                &listen.to_string(),
                "--target",
                &dead.to_string(),
                "--threads",
                "1",
                "--log-level",
                "debug",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = p.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    wait_listening(listen);
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !lines
        .iter()
        .any(|l: &String| l.contains("error=") && l.contains("refused"))
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => panic!("no log line with the refused connect's error: {lines:#?}"),
        }
    }
    p.signal("TERM");
    assert_eq!(p.wait_exit(TIMEOUT).code(), Some(0));
    lines.extend(rx.try_iter());
    let text = lines.join("\n");
    assert!(!text.contains('\u{1b}'), "colour codes on a pipe:\n{text}");
    for l in lines.iter().filter(|l| l.contains("error=")) {
        assert!(
            !l.contains("Os {") && !l.contains("Some("),
            "an error logged with Debug: {l}"
        );
    }
}

/// Item 6 of issue 14: a second sealpipe on an address a live sealpipe already serves must
/// not quietly join its SO_REUSEPORT group (the kernel would split clients between an old and
/// a new configuration): it refuses, naming the address and the process that holds it.
#[test]
fn a_second_instance_on_a_served_address_refuses_to_start() {
    let echo = echo_backend();
    let (listen, first) = forward(echo.addr, "2", "5");
    let out = refused(&[
        "forward",
        "--listen",
        &listen.to_string(),
        "--target",
        &echo.addr.to_string(),
        "--threads",
        "2",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&listen.to_string())
            && err.contains(&format!("pid {} (sealpipe)", first.0.id()))
            && err.lines().count() == 1,
        "{err}"
    );
    // The first one still serves every connection.
    for _ in 0..20 {
        let mut c = connect(listen);
        c.write_all(b"still").unwrap();
        let mut b = [0u8; 5];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"still");
    }
}

// ---------------------------------------------------------------------------------------------
// What a new operator tripped on (issue 19).

/// `sealpipe ARGS` run to completion.
fn run_cli(args: &[&str]) -> std::process::Output {
    sealpipe().args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// README's quick start: `sealpipe check --no-key-files --config deploy/sealpipe.example.toml`
/// works on a machine without the example's key files; without the flag the error says
/// which key file is missing and how to check without it.
#[test]
fn check_validates_the_example_without_its_key_files() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/sealpipe.example.toml");
    let out = run_cli(&["check", "--no-key-files", "--config", example]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("key files not read"),
        "{}",
        text(&out.stdout)
    );
    let out = run_cli(&["check", "--config", example]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("/etc/sealpipe/keys/") && err.contains("--no-key-files"),
        "{err}"
    );
    // --no-resolve leaves target names alone (a name that resolves nowhere).
    let dir = temp_dir("chk-nr");
    let cfg = dir.join("c.toml");
    std::fs::write(
        &cfg,
        "[[tunnel]]\nmode = \"forward\"\nlisten = \"127.0.0.1:0\"\ntargets = [\"db.invalid:5432\"]\n",
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let out = run_cli(&["check", "--config", cfg]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("\"db.invalid:5432\" cannot be resolved"),
        "{}",
        text(&out.stderr)
    );
    let out = run_cli(&["check", "--no-resolve", "--config", cfg]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("db.invalid:5432 (not resolved)"),
        "{}",
        text(&out.stdout)
    );
}

/// README's `sealpipe keygen --out /etc/sealpipe/redis.key` on a fresh machine: the missing
/// directory is created, private (0700), and the output says so.
#[test]
fn keygen_creates_a_missing_directory_private() {
    let base = temp_dir("kg-dir");
    let key = base.join("etc-sealpipe").join("keys").join("redis.key");
    let out = sealpipe()
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    for d in [
        key.parent().unwrap(),
        key.parent().unwrap().parent().unwrap(),
    ] {
        let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", d.display());
    }
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(text(&out.stdout).contains("0700"), "{}", text(&out.stdout));
}

/// The option block of `flag` in `help`: its line and the indented lines under it.
fn help_entry(help: &str, flag: &str) -> Option<String> {
    let mut lines = help.lines();
    let first = lines.find(|l| {
        let t = l.trim_start();
        t.starts_with(flag) && t[flag.len()..].starts_with([' ', ',', '\0']) || t == flag
    })?;
    let mut out = first.trim().to_string();
    for l in lines {
        if l.trim_start().starts_with('-') || l.trim().is_empty() {
            break;
        }
        out.push(' ');
        out.push_str(l.trim());
    }
    Some(out)
}

/// `--help`: every option of every subcommand says what it does; forward lists no key,
/// forward-secrecy or AEAD option; --key is required for encrypt and decrypt.
#[test]
fn help_describes_every_option_and_lists_only_what_a_subcommand_takes() {
    let subcommands = [
        "encrypt",
        "decrypt",
        "forward",
        "run",
        "check",
        "keygen",
        "demo",
        "completions",
        "man",
    ];
    for sub in subcommands {
        let out = run_cli(&[sub, "--help"]);
        assert!(out.status.success(), "{sub} --help");
        let help = text(&out.stdout);
        for l in help.lines().filter(|l| l.trim_start().starts_with("--")) {
            let flag = l.trim_start().split([' ', '\t']).next().unwrap();
            let entry = help_entry(&help, flag).unwrap();
            let described = entry
                .split_once(flag)
                .map(|(_, rest)| {
                    rest.trim_start()
                        .trim_start_matches(|c: char| c != ' ' && c != '>')
                })
                .is_some_and(|rest| rest.trim_start_matches('>').trim().len() > 3);
            assert!(
                described,
                "`sealpipe {sub} --help`: {flag} has no description: {entry:?}"
            );
        }
    }
    let forward = text(&run_cli(&["forward", "--help"]).stdout);
    for flag in [
        "--key",
        "--forward-secrecy",
        "--no-forward-secrecy",
        "--aead",
    ] {
        assert!(
            help_entry(&forward, flag).is_none(),
            "forward --help lists {flag}"
        );
    }
    for sub in ["encrypt", "decrypt"] {
        let help = text(&run_cli(&[sub, "--help"]).stdout);
        let usage = help.lines().find(|l| l.starts_with("Usage:")).unwrap();
        assert!(
            usage.contains("--key <FILE>"),
            "{sub}: --key not required: {usage}"
        );
        for flag in [
            "--name",
            "--health-check-interval",
            "--keepalive-idle",
            "--tcp-user-timeout",
        ] {
            assert!(
                help_entry(&help, flag).is_some(),
                "{sub} --help lacks {flag}"
            );
        }
    }
    let out = run_cli(&[
        "forward",
        "--listen",
        "127.0.0.1:0",
        "--target",
        "127.0.0.1:9",
        "--key",
        "k",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--key"), "{}", text(&out.stderr));
    let out = run_cli(&[
        "encrypt",
        "--listen",
        "127.0.0.1:0",
        "--target",
        "127.0.0.1:9",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--key <FILE>"),
        "{}",
        text(&out.stderr)
    );
}

/// Warm session settings: on the side they belong to, in range, named as given.
#[test]
fn warm_settings_are_checked_on_their_side_and_named() {
    let sealed = |sub: &str, extra: &[&str]| {
        let mut args = vec![
            sub,
            "--listen",
            "127.0.0.1:0",
            "--target",
            "127.0.0.1:9",
            "--key",
            "/nonexistent/k.key",
        ];
        args.extend_from_slice(extra);
        let out = run_cli(&args);
        (out.status.code(), text(&out.stderr))
    };
    for (sub, extra, says) in [
        (
            "encrypt",
            &["--warm-max", "65"][..],
            "--warm-max must be from 0 (off) to 64",
        ),
        (
            "encrypt",
            &["--warm-refresh", "0"][..],
            "--warm-refresh cannot be 0",
        ),
        (
            "decrypt",
            &["--warm-idle-timeout", "0"][..],
            "--warm-idle-timeout cannot be 0",
        ),
        (
            "decrypt",
            &["--warm-max", "2"][..],
            "--warm-max belongs to the encrypt side",
        ),
        (
            "encrypt",
            &["--warm-idle-timeout", "9"][..],
            "belongs to the decrypt side",
        ),
    ] {
        let (code, err) = sealed(sub, extra);
        assert_eq!(code, Some(2), "{sub} {extra:?}: {err}");
        assert!(err.contains(says), "{sub} {extra:?}: {err}");
    }
    // In range, the next error is the missing key file: the warm settings passed.
    let (code, err) = sealed("encrypt", &["--warm-max", "0", "--warm-refresh", "5"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("k.key") && !err.contains("warm"), "{err}");
    let forward = text(&run_cli(&["forward", "--help"]).stdout);
    assert!(
        help_entry(&forward, "--warm-max").is_none(),
        "forward lists --warm-max"
    );
    let out = check("warm-check", &format!("{FORWARD}warm_idle_timeout = 5\n"));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("warm_idle_timeout belongs to the decrypt side"),
        "{}",
        text(&out.stderr)
    );
}

/// Errors about command-line values name the flag, and a missing port says so.
#[test]
fn a_missing_port_is_named_as_such_on_the_flag_given() {
    for (flag, value, want) in [
        (
            "--listen",
            "127.0.0.1",
            "--listen \"127.0.0.1\" has no port",
        ),
        (
            "--target",
            "backend.internal",
            "--target \"backend.internal\" has no port",
        ),
        (
            "--metrics",
            "127.0.0.1",
            "--metrics \"127.0.0.1\" has no port",
        ),
    ] {
        let mut args = vec![
            "forward",
            "--listen",
            "127.0.0.1:0",
            "--target",
            "127.0.0.1:9",
        ];
        match flag {
            "--listen" => args[2] = value,
            "--target" => args[4] = value,
            _ => args.extend([flag, value]),
        }
        let out = run_cli(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(want) && !err.contains("invalid socket address"),
            "{err}"
        );
        assert!(
            !err.contains("tunnel \"") && !err.contains("[limits]"),
            "{err}"
        );
    }
    let out = run_cli(&[
        "forward",
        "--listen",
        "127.0.0.1:0",
        "--target",
        "127.0.0.1:9",
        "--keepalive-count",
        "0",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--keepalive-count must be from 1 to 127"),
        "{err}"
    );
}

/// Reads `child`'s stderr until a line contains `want`; returns every line read.
fn stderr_until(child: &mut std::process::Child, want: &str) -> Result<String, String> {
    use std::io::BufRead;
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while let Ok(line) =
        rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(want) {
            return Ok(seen);
        }
    }
    Err(seen)
}

/// `run --log-level` and `--log-format` win over the file's [log] (README: options work on
/// the command line and in the file alike).
#[test]
fn run_takes_log_flags_over_the_file() {
    let dir = temp_dir("run-log");
    let cfg = dir.join("c.toml");
    std::fs::write(
        &cfg,
        format!("[log]\nlevel = \"error\"\nformat = \"text\"\n[limits]\nthreads = 1\n{FORWARD}"),
    )
    .unwrap();
    let mut child = sealpipe()
        .args([
            "run",
            "--log-level",
            "info",
            "--log-format",
            "json",
            "--config",
        ])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let got = stderr_until(&mut child, "tunnel up");
    let p = Proc(child);
    let seen = got.unwrap_or_else(|seen| panic!("no info line with --log-level info: {seen}"));
    let line = seen.lines().find(|l| l.contains("tunnel up")).unwrap();
    assert!(line.starts_with('{'), "--log-format json: {line}");
    drop(p);
    let out = sealpipe()
        .args(["run", "--log-level", "verbose", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--log-level \"verbose\""),
        "{}",
        text(&out.stderr)
    );
}

/// `encrypt --name` names the tunnel (metric labels); `--health-check-interval` probes the
/// targets (a dead one is marked down before any client tried it).
#[test]
fn encrypt_takes_a_name_and_a_health_check_interval() {
    let key = keygen("enc-name");
    let dead = free_addr();
    let metrics = free_addr();
    let listen = free_addr();
    let child = sealpipe()
        .args([
            "encrypt",
            "--name",
            "redis-east",
            "--health-check-interval",
            "0.2",
        ])
        .args([
            "--listen",
            &listen.to_string(),
            "--target",
            &dead.to_string(),
        ])
        .args(["--metrics", &metrics.to_string(), "--threads", "1", "--key"])
        .arg(&key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _p = Proc(child);
    let up =
        format!("sealpipe_upstream_up{{shard=\"0\",tunnel=\"redis-east\",upstream=\"{dead}\"}} 0");
    let failed =
        "sealpipe_upstream_connect_failures_total{reason=\"refused\",tunnel=\"redis-east\"";
    wait_until("the named tunnel's target probed and marked down", || {
        let Ok(mut s) = TcpStream::connect(metrics) else {
            return false;
        };
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut t = String::new();
        let _ = s.read_to_string(&mut t);
        t.contains(&up) && t.contains(failed)
    });
}

/// `sealpipe completions bash|zsh|fish` and `sealpipe man` (issue 19).
#[test]
fn completions_and_man_pages_are_generated_from_the_flags() {
    for (shell, marker) in [
        ("bash", "complete -F _sealpipe"),
        ("zsh", "#compdef sealpipe"),
        ("fish", "complete -c sealpipe"),
    ] {
        let out = run_cli(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = text(&out.stdout);
        assert!(script.contains(marker), "{shell}: {marker}");
        assert!(
            script.contains("keepalive-idle") && script.contains("no-key-files"),
            "{shell}"
        );
    }
    let out = run_cli(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run_cli(&["man"]);
    assert!(out.status.success());
    let page = text(&out.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH sealpipe 1"),
        "{}",
        &page[..page.len().min(200)]
    );
    assert!(page.contains("keygen"), "subcommands listed");
    let dir = temp_dir("man");
    let out = sealpipe()
        .args(["man", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    for page in [
        "sealpipe.1",
        "sealpipe-run.1",
        "sealpipe-encrypt.1",
        "sealpipe-check.1",
    ] {
        let p = dir.join(page);
        assert!(
            std::fs::metadata(&p).is_ok_and(|m| m.len() > 100),
            "{}",
            p.display()
        );
    }
    let run = std::fs::read_to_string(dir.join("sealpipe-run.1")).unwrap();
    assert!(
        run.contains("log\\-level"),
        "run's page documents --log-level"
    );
}

/// A SIGTERM that arrives as soon as the listener accepts, before the control loop runs,
/// drains and exits 0: the stop and reload signals are caught from before the shards start,
/// never left to their default action (which kills the process).
#[test]
fn sigterm_right_after_start_drains_instead_of_killing() {
    for _ in 0..10 {
        let listen = free_addr();
        let child = sealpipe()
            .args([
                "forward",
                "--threads",
                "1",
                "--log-level",
                "error",
                "--listen",
            ])
            .arg(listen.to_string())
            .args(["--target", "127.0.0.1:9"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut p = Proc(child);
        wait_until("listening", || TcpStream::connect(listen).is_ok());
        p.signal("TERM");
        let status = p.wait_exit(TIMEOUT);
        assert!(status.success(), "{status:?}");
    }
}

/// README's first command, short: the demo checks traffic through its pair, serves, and stops
/// cleanly, exit 0, with nothing logged at warn or error on the way (stopping the decrypt side
/// first would have the encrypt side's warm sessions closed under it and their replacements
/// refused: "upstream marked down").
#[test]
fn the_demo_checks_its_pair_and_stops_without_a_warning() {
    let out = run_cli(&["demo", "--duration", "1"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("byte-exact"), "{stdout}");
    assert!(
        !stderr.contains("WARN") && !stderr.contains("ERROR"),
        "the demo logged: {stderr}"
    );
}
