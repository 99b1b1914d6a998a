//! Integration tests: the built binary against its own backend on 127.0.0.1, real sockets only.
//! Runs are short (about a second) so the whole file stays well under the 30 s budget; nothing
//! here times speed, only correctness and exit codes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::thread;

const BIN: &str = env!("CARGO_BIN_EXE_loadtest");

/// A backend child, killed when the test ends however it ends.
struct Backend {
    child: Child,
    addr: String,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn backend(mode: &str) -> Backend {
    let mut child = Command::new(BIN)
        .args([
            "backend",
            "--listen",
            "127.0.0.1:0",
            "--mode",
            mode,
            "--duration",
            "60",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn backend");
    // The first stdout line names the bound address: wait on it, not on a timer.
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.split_whitespace().nth(4).expect("address").to_string();
    Backend { child, addr }
}

fn loadtest(args: &[&str]) -> Output {
    let out = Command::new(BIN).args(args).output().expect("run loadtest");
    eprintln!(
        "loadtest {args:?} -> {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("loadtest-test-{}-{name}", std::process::id()))
}

#[test]
fn bulk_all_directions_verify_and_pass() {
    for (mode, dir) in [("echo", "both"), ("sink", "up"), ("source", "down")] {
        let b = backend(mode);
        let j = tmp(&format!("bulk-{dir}.json"));
        let o = loadtest(&[
            "bulk",
            "--target",
            &b.addr,
            "--conns",
            "3",
            "--duration",
            "0.7",
            "--direction",
            dir,
            "--threads",
            "2",
            "--json",
            j.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "bulk {dir}");
        let v = json(&j);
        assert_eq!(v["ok"], true);
        assert_eq!(v["results"]["conns_ok"], 3);
        let moved = v["results"]["bytes_up"].as_u64().unwrap()
            + v["results"]["bytes_down"].as_u64().unwrap();
        assert!(moved > 0, "no bytes moved {dir}");
        let _ = std::fs::remove_file(j);
    }
}

#[test]
fn rr_closed_and_open_loop() {
    let b = backend("echo");
    let j = tmp("rr.json");
    let o = loadtest(&[
        "rr",
        "--target",
        &b.addr,
        "--conns",
        "4",
        "--size",
        "100",
        "--duration",
        "0.7",
        "--json",
        j.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let v = json(&j);
    let lat = &v["results"]["latency"];
    assert!(v["results"]["requests"].as_u64().unwrap() > 0);
    assert!(lat["p50_us"].as_f64().unwrap() <= lat["p99_us"].as_f64().unwrap());
    assert!(lat["p99_us"].as_f64().unwrap() <= lat["max_us"].as_f64().unwrap());

    let o = loadtest(&[
        "rr",
        "--target",
        &b.addr,
        "--conns",
        "2",
        "--rate",
        "400",
        "--duration",
        "0.7",
        "--json",
        j.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let v = json(&j);
    // Open loop sends on schedule: 400/s for 0.7 s is 280 requests; a starved client may lose
    // a few at the window's end, never send more.
    let n = v["results"]["requests"].as_u64().unwrap();
    assert!((200..=300).contains(&n), "open loop sent {n}");
    let _ = std::fs::remove_file(j);
}

#[test]
fn churn_counts_connections_and_refusals() {
    let b = backend("echo");
    let j = tmp("churn.json");
    let o = loadtest(&[
        "churn",
        "--target",
        &b.addr,
        "--rate",
        "300",
        "--duration",
        "0.7",
        "--json",
        j.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let v = json(&j);
    // 210 are scheduled; on a loaded machine the last few may miss the window, never fail.
    let (done, tried) = (&v["results"]["completed"], &v["results"]["attempted"]);
    assert_eq!(done, tried);
    assert!(done.as_u64().unwrap() >= 150 && done.as_u64().unwrap() <= 210);
    assert!(v["results"]["connect"]["count"].as_u64().unwrap() >= 150);
    let _ = std::fs::remove_file(j);

    // A port nobody listens on: every attempt is refused, and the run fails.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let j = tmp("churn-refused.json");
    let o = loadtest(&[
        "churn",
        "--target",
        &format!("127.0.0.1:{port}"),
        "--rate",
        "100",
        "--duration",
        "0.3",
        "--json",
        j.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let v = json(&j);
    let r = &v["results"];
    assert!(r["attempted"].as_u64().unwrap() >= 20);
    assert_eq!(r["refused"], r["attempted"]);
    assert_eq!(r["completed"], 0);
    let _ = std::fs::remove_file(j);
}

#[test]
fn connect_times_every_connection_and_reports_round_trips() {
    let b = backend("echo");
    let j = tmp("connect.json");
    let o = loadtest(&[
        "connect",
        "--target",
        &b.addr,
        "--count",
        "40",
        "--concurrency",
        "3",
        "--size",
        "100",
        "--rtt-ms",
        "20",
        "--json",
        j.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("first byte in RTTs of 20 ms"));
    let v = json(&j);
    let r = &v["results"];
    assert_eq!(r["attempted"], 40);
    assert_eq!(r["completed"], 40);
    assert_eq!(r["first_byte"]["count"], 40);
    assert_eq!(r["connect"]["count"], 40);
    let (fb, c) = (
        r["first_byte"]["p50_us"].as_f64().unwrap(),
        r["connect"]["p50_us"].as_f64().unwrap(),
    );
    assert!(fb >= c && c > 0.0, "first byte {fb} us, connect {c} us");
    let rtts = r["first_byte_rtts"]["p50"].as_f64().unwrap();
    assert!((rtts - fb / 20_000.0).abs() < 1e-9);
    let _ = std::fs::remove_file(j);

    // A backend that sends back something else: counted as a mismatch, and the run fails.
    let wrong = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = wrong.local_addr().unwrap().to_string();
    let t = thread::spawn(move || {
        let (mut s, _) = wrong.accept().unwrap();
        let mut buf = [0u8; 8];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"XXXXXXXX").unwrap();
    });
    let j = tmp("connect-bad.json");
    let o = loadtest(&[
        "connect",
        "--target",
        &addr,
        "--count",
        "1",
        "--size",
        "8",
        "--json",
        j.to_str().unwrap(),
    ]);
    t.join().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(json(&j)["failures"]["by_kind"]["mismatch"], 1);
    let _ = std::fs::remove_file(j);
}

#[test]
fn idle_holds_and_reports_rss() {
    let b = backend("echo");
    let pid = b.child.id().to_string();
    let j = tmp("idle.json");
    let o = loadtest(&[
        "idle",
        "--target",
        &b.addr,
        "--conns",
        "300",
        "--hold",
        "0.3",
        "--pid",
        &pid,
        "--json",
        j.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let v = json(&j);
    assert_eq!(v["results"]["established"], 300);
    assert_eq!(v["results"]["checked_ok"], 300);
    assert!(v["results"]["rss"][0]["after_kib"].as_u64().unwrap() > 0);
    let _ = std::fs::remove_file(j);
}

#[test]
fn idle_detects_connections_closed_while_held() {
    // A server that accepts and closes at once: every held connection is dropped.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    thread::spawn(move || {
        for s in l.incoming().take(20) {
            drop(s);
        }
    });
    let o = loadtest(&["idle", "--target", &addr, "--conns", "20", "--hold", "0.5"]);
    assert_eq!(o.status.code(), Some(1));
    // How many of the 20 are seen as dropped during the hold (rather than at the final
    // check) depends on scheduling; the run must fail either way.
    assert!(stdout(&o).contains("dropped while idle"), "{}", stdout(&o));
}

/// A relay that copies both ways and flips one bit of the client->server stream at `flip_at`.
fn corrupting_relay(upstream: String, flip_at: usize) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    thread::spawn(move || {
        let Ok((client, _)) = l.accept() else { return };
        let server = TcpStream::connect(&upstream).unwrap();
        let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        thread::spawn(move || {
            // server -> client, untouched
            let _ = std::io::copy(&mut s2, &mut c2);
            let _ = c2.shutdown(Shutdown::Write);
        });
        let (mut client, mut server) = (client, server);
        let mut buf = vec![0u8; 65536];
        let mut seen = 0usize;
        loop {
            let n = match client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if (seen..seen + n).contains(&flip_at) {
                buf[flip_at - seen] ^= 0x04;
            }
            seen += n;
            if server.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = server.shutdown(Shutdown::Write);
    });
    addr
}

#[test]
fn corrupting_relay_is_detected() {
    // Echo path: the flipped byte comes back and the client's verifier catches it.
    let b = backend("echo");
    let relay = corrupting_relay(b.addr.clone(), 100_003);
    let o = loadtest(&[
        "bulk",
        "--target",
        &relay,
        "--duration",
        "0.5",
        "--direction",
        "both",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("mismatch=1"));
    assert!(stdout(&o).contains("byte 100003"), "names the offset");

    // Upload path: the sink catches it and says so in its report.
    let s = backend("sink");
    let relay = corrupting_relay(s.addr.clone(), 8 + 5000); // 8 bytes of key, then the stream
    let o = loadtest(&[
        "bulk",
        "--target",
        &relay,
        "--duration",
        "0.5",
        "--direction",
        "up",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("wrong byte at offset 5000"));

    // Request/response: a corrupted request comes back different.
    let relay = corrupting_relay(b.addr.clone(), 1000);
    let o = loadtest(&[
        "rr",
        "--target",
        &relay,
        "--size",
        "64",
        "--duration",
        "0.5",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("mismatch=1"));
}

/// Serves two scrapes of a fake sealpipe /metrics page with growing counters.
fn fake_metrics() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for (i, s) in l.incoming().take(2).enumerate() {
            let mut s = s.unwrap();
            // Read the whole request: closing with unread bytes would reset the connection.
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.ends_with(b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let body = format!(
                "# TYPE sealpipe_bytes_total counter\nsealpipe_bytes_total{{direction=\"up\"}} {}\n\
                 sealpipe_handshakes_total{{result=\"ok\"}} {}\n",
                1000 + i * 500,
                7 + i * 3
            );
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{body}"
            );
        }
    });
    format!("http://{addr}/metrics")
}

#[test]
fn metrics_deltas_are_reported() {
    let b = backend("echo");
    let url = fake_metrics();
    let j = tmp("metrics.json");
    let o = loadtest(&[
        "rr",
        "--target",
        &b.addr,
        "--duration",
        "0.3",
        "--metrics",
        &url,
        "--json",
        j.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let v = json(&j);
    let d = &v["metrics"][0]["deltas"];
    assert_eq!(d[0]["series"], "sealpipe_bytes_total{direction=\"up\"}");
    assert_eq!(d[0]["delta"], 500.0);
    assert_eq!(d[1]["delta"], 3.0);

    // An unreachable metrics endpoint fails the run rather than silently reporting nothing.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = loadtest(&[
        "rr",
        "--target",
        &b.addr,
        "--duration",
        "0.2",
        "--metrics",
        &format!("http://127.0.0.1:{port}/metrics"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let _ = std::fs::remove_file(j);
}

#[test]
fn suite_runs_direct_and_refuses_a_missing_sealpipe() {
    let md = tmp("suite.md");
    let j = tmp("suite.json");
    let o = loadtest(&[
        "suite",
        "--paths",
        "direct",
        "--duration",
        "0.4",
        "--idle-conns",
        "200",
        "--markdown",
        md.to_str().unwrap(),
        "--json",
        j.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let table = std::fs::read_to_string(&md).unwrap();
    assert!(table.contains("| rr req/s (50 conns, 64 B) |"));
    assert!(table.contains("| idle conns still echoing | 200 |"));
    let v = json(&j);
    assert_eq!(v["paths"][0]["path"], "Direct");
    assert_eq!(v["paths"][0]["runs"].as_array().unwrap().len(), 5);

    let o = loadtest(&["suite", "--quick", "--sealpipe", "/nonexistent/sealpipe"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("sealpipe binary not found"));
    let _ = std::fs::remove_file(md);
    let _ = std::fs::remove_file(j);
}
