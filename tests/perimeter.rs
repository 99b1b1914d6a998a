//! The perimeter: what an unauthenticated peer, a scraper or another local process can make
//! sealpipe spend or reveal — pre-authentication admission caps, the metrics endpoint's
//! limits, the handoff's checks on its peer and on the descriptors it receives, and the
//! process's protection against dumps.

use std::process::Stdio;

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
