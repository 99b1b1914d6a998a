//! The perimeter: what an unauthenticated peer, a scraper or another local process can make
//! sealpipe spend or reveal — pre-authentication admission caps, the metrics endpoint's
//! limits, the handoff's checks on its peer and on the descriptors it receives, and the
//! process's protection against dumps.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use sealpipe::config::{Config, Mode};
use sealpipe::server;

use crate::common::*;

/// The soft core size limit of process `pid`, as /proc/PID/limits shows it.
fn core_limit(pid: u32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap()
        .to_string();
    line.split_whitespace().nth(4).unwrap().to_string()
}

/// Starts `sealpipe decrypt` with its core limit raised to 4096 bytes first (so a limit of 0
/// afterwards is sealpipe's own doing), plus `extra` arguments; waits until it listens.
fn decrypt_process(extra: &[&str]) -> Proc {
    let key = keygen("dump");
    let listen = free_addr();
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "ulimit -c 4096 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_sealpipe"))
        .args(["decrypt", "--threads", "1", "--listen"])
        .arg(listen.to_string())
        .args(["--target", "127.0.0.1:9", "--key"])
        .arg(&key)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let p = Proc(cmd.spawn().unwrap());
    wait_listening(listen);
    p
}

#[test]
fn the_process_makes_itself_undumpable_unless_asked_not_to() {
    let p = decrypt_process(&[]);
    assert_eq!(
        core_limit(p.0.id()),
        "0",
        "sealpipe sets its core limit to 0"
    );
    drop(p);
    let p = decrypt_process(&["--dumpable"]);
    // `ulimit -c` counts 512-byte blocks.
    assert_eq!(
        core_limit(p.0.id()),
        "2097152",
        "--dumpable keeps the limit it was given"
    );
}

// ---- handoff: the peer's uid and the descriptors it sends --------------------------------

/// A fake handoff holder at a fresh path: answers one successor with `header` and `fds`
/// (whatever they are) and returns the successor's reply line.
fn fake_holder(header: String, fds: Vec<OwnedFd>) -> (PathBuf, std::thread::JoinHandle<String>) {
    let path = temp_dir("fakeholder").join("h.sock");
    let l = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        c.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while c.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        assert!(line.starts_with(b"sealpipe-handoff 1 take"), "{line:?}");
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        sealpipe::sys::send_fds(&c, header.as_bytes(), &borrowed).unwrap();
        let mut reply = String::new();
        let _ = c.read_to_string(&mut reply);
        reply
    });
    (path, t)
}

/// A forward tunnel listening on `listen` (its target is never reached in these tests).
fn forward_on(listen: SocketAddr) -> Config {
    let mut t = tunnel(Mode::Forward, &[free_addr()], &[]);
    t.listen = listen.to_string();
    config(t, limits())
}

/// Starts a successor for `cfg` against a fake holder that sends `fd` as tunnel "forward"'s
/// one listener while its header claims `claimed`; returns the successor's error and the
/// holder's reply.
fn hand_over_wrong(cfg: Config, claimed: SocketAddr, fd: OwnedFd) -> (String, String) {
    let header = format!("sealpipe-handoff 1\nshards 1\ntunnel {claimed} forward\nend\n");
    let (path, holder) = fake_holder(header, vec![fd]);
    let err = match server::start_with(cfg, None, Some(&path)) {
        Ok(_) => panic!("the successor accepted a descriptor that is not its listener"),
        Err(e) => e.to_string(),
    };
    (err, holder.join().unwrap())
}

#[test]
fn handoff_refuses_descriptors_that_are_not_the_configured_listener() {
    let addr = free_addr();
    // A UDP socket bound to the very address the header claims.
    let udp = std::net::UdpSocket::bind(addr).unwrap();
    let (err, reply) = hand_over_wrong(forward_on(addr), addr, OwnedFd::from(udp));
    assert!(err.contains("not a TCP socket"), "{err}");
    assert!(
        reply.starts_with("NO ") && reply.contains("not a TCP socket"),
        "{reply}"
    );

    // A connected TCP socket (the right family and type, but it does not listen).
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let conn = TcpStream::connect(other.local_addr().unwrap()).unwrap();
    let (err, reply) = hand_over_wrong(forward_on(addr), addr, OwnedFd::from(conn));
    assert!(err.contains("does not listen"), "{err}");
    assert!(reply.starts_with("NO "), "{reply}");

    // A listener on another port, while the header claims the configured address.
    let elsewhere = TcpListener::bind("127.0.0.1:0").unwrap();
    let got = elsewhere.local_addr().unwrap();
    let (err, reply) = hand_over_wrong(forward_on(addr), addr, OwnedFd::from(elsewhere));
    assert!(
        err.contains(&format!("listens on {got}, not on {addr}")),
        "{err}"
    );
    assert!(reply.starts_with("NO "), "{reply}");

    // The real thing passes, so the refusals above are about the descriptors.
    let right = TcpListener::bind(addr).unwrap();
    let header = format!("sealpipe-handoff 1\nshards 1\ntunnel {addr} forward\nend\n");
    let (path, holder) = fake_holder(header, vec![OwnedFd::from(right)]);
    let r = server::start_with(forward_on(addr), None, Some(&path)).unwrap();
    assert_eq!(r.listen_addrs[0], addr);
    assert_eq!(holder.join().unwrap(), "OK\n");
}

/// `sealpipe forward --listen LISTEN --handoff PATH` run as the unprivileged uid 65534.
fn as_nobody(listen: SocketAddr, path: &Path) -> Proc {
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_sealpipe"))
        .args(["forward", "--threads", "1", "--listen"])
        .arg(listen.to_string())
        .args(["--target", "127.0.0.1:9", "--handoff"])
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Proc(cmd.spawn().unwrap())
}

/// Only root can run a peer under another uid here; say so rather than pass silently.
fn root_or_skip(test: &str) -> bool {
    if sealpipe::sys::euid() != 0 {
        eprintln!("SKIPPED: {test} runs a peer as another uid, which needs root");
        return false;
    }
    true
}

/// A directory every user may create sockets in (the handoff path of a test of two uids).
fn shared_dir() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = temp_dir("uids");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
    d
}

#[test]
fn handoff_successor_refuses_a_holder_of_another_user() {
    if !root_or_skip("handoff_successor_refuses_a_holder_of_another_user") {
        return;
    }
    let path = shared_dir().join("h.sock");
    let listen = free_addr();
    let _holder = as_nobody(listen, &path);
    wait_until("the holder listens for a handoff", || path.exists());
    wait_listening(listen);
    let err = match server::start_with(forward_on(listen), None, Some(&path)) {
        Ok(_) => panic!("took listeners from a process of another user"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("runs as uid 65534") && err.contains("refusing its descriptors"),
        "{err}"
    );
}

#[test]
fn handoff_holder_refuses_a_successor_of_another_user() {
    use std::os::unix::fs::PermissionsExt;
    if !root_or_skip("handoff_holder_refuses_a_successor_of_another_user") {
        return;
    }
    let dir = shared_dir();
    let (path, log) = (dir.join("h.sock"), dir.join("holder.log"));
    let listen = free_addr();
    let mut holder = Proc(
        sealpipe()
            .args(["forward", "--threads", "1", "--listen"])
            .arg(listen.to_string())
            .args(["--target", "127.0.0.1:9", "--handoff"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_until("the holder listens for a handoff", || path.exists());
    wait_listening(listen);
    // Open the socket up by mistake: the uid check must hold without the mode.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut successor = as_nobody(listen, &path);
    let status = successor.wait_exit(TIMEOUT);
    let mut stderr = String::new();
    successor
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "the successor must fail: {stderr}");
    assert!(stderr.contains("handoff"), "{stderr}");
    wait_until("the holder logs the refusal", || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("refused a successor running as uid 65534")
    });
    // The holder still serves: it did not hand over, so it neither drained nor exited.
    assert!(holder.0.try_wait().unwrap().is_none(), "the holder exited");
    TcpStream::connect(listen).expect("the holder still accepts");
}
