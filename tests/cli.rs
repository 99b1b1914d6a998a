//! The `sealpipe` command: keygen, check, usage errors, and signals on a real process.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

#[test]
fn sigterm_drains_in_flight_transfer_then_exits_zero() {
    let echo = echo_backend();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = sealpipe()
        .args([
            "forward",
            "--listen",
            &listen.to_string(),
            "--target",
            &echo.addr.to_string(),
            "--threads",
            "2",
            "--drain-timeout",
            "20",
            "--log-level",
            "warn",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(listen);
    // An in-flight exchange: half of the request now, the rest after SIGTERM.
    let mut c = connect(listen);
    c.write_all(&[5u8; 100_000]).unwrap();
    let mut first = vec![0u8; 100_000];
    c.read_exact(&mut first).unwrap();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    // New connections are refused once the listeners closed.
    let deadline = Instant::now() + TIMEOUT;
    while TcpStream::connect(listen).is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        std::thread::yield_now();
    }
    c.write_all(&[6u8; 100_000]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let (rest, err) = read_to_end(&mut c);
    assert_eq!(err, None);
    assert_eq!(rest.len(), 100_000);
    assert!(rest.iter().all(|b| *b == 6));
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit after draining");
        std::thread::yield_now();
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn second_sigterm_exits_at_once() {
    let echo = echo_backend();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = sealpipe()
        .args([
            "forward",
            "--listen",
            &listen.to_string(),
            "--target",
            &echo.addr.to_string(),
            "--threads",
            "1",
            "--drain-timeout",
            "60",
            "--log-level",
            "error",
        ])
        .spawn()
        .unwrap();
    wait_listening(listen);
    let mut c = connect(listen); // held open: the drain would wait 60 s for it
    c.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).unwrap();
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while TcpStream::connect(listen).is_ok() {
        assert!(Instant::now() < deadline);
        std::thread::yield_now();
    }
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "second SIGTERM did not end the process"
        );
        std::thread::yield_now();
    };
    assert_eq!(status.code(), Some(1));
}
