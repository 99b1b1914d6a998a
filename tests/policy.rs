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
