//! Client identity end to end, over real sockets: PROXY headers sent to the backend (v1 and
//! v2, IPv4 and IPv6 clients), PROXY headers accepted from a trusted front load balancer and
//! refused from anyone else, the access lists, and the access log's lines field by field.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;

use sealpipe::config::{Mode, TunnelFile};
use sealpipe::proxy::proxy_header::{self, Addrs, Command, Header, Parse, Version};
use sealpipe::server::Running;

use crate::common::*;

/// What the recording backend saw at the start of one connection.
#[derive(Debug)]
enum Seen {
    Header(Header, Vec<u8>),
    /// The first bytes were not a PROXY header (the client's own bytes arrived first).
    Plain(Vec<u8>),
}

/// A backend that parses the PROXY header each connection starts with, reports it, then
/// echoes everything after it.
struct Recorder {
    addr: SocketAddr,
    seen: mpsc::Receiver<Seen>,
}

fn recorder(bind: &str) -> Recorder {
    let l = TcpListener::bind(bind).unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, seen) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let rest = loop {
                    match proxy_header::parse(&got) {
                        Parse::NeedMore => {}
                        Parse::Done { header, consumed } => {
                            let _ = tx.send(Seen::Header(header, got[..consumed].to_vec()));
                            break got[consumed..].to_vec();
                        }
                        Parse::Invalid(_) => {
                            let _ = tx.send(Seen::Plain(got.clone()));
                            break got;
                        }
                    }
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            let _ = tx.send(Seen::Plain(got.clone()));
                            return;
                        }
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                };
                let mut w = s.try_clone().unwrap();
                if w.write_all(&rest).is_err() {
                    return;
                }
                let _ = std::io::copy(&mut s, &mut w);
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
    Recorder { addr, seen }
}

impl Recorder {
    fn next(&self) -> Seen {
        self.seen
            .recv_timeout(TIMEOUT)
            .expect("the backend saw a connection")
    }

    fn header(&self) -> (Header, Vec<u8>) {
        match self.next() {
            Seen::Header(h, raw) => (h, raw),
            Seen::Plain(b) => panic!(
                "no PROXY header; the backend got {:?}",
                String::from_utf8_lossy(&b)
            ),
        }
    }

    /// Nothing has reached the backend.
    fn none_yet(&self) {
        if let Ok(s) = self.seen.try_recv() {
            panic!("the backend got a connection: {s:?}");
        }
    }
}

/// GET `path` from a metrics endpoint.
fn http_get(addr: SocketAddr, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let _ = s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Waits until the process whose metrics endpoint is `addr` has its listeners up (asked of
/// the endpoint: a probe of the data port would be a client of its own).
fn wait_ready(addr: SocketAddr) {
    wait_until(&format!("{addr} ready"), || {
        http_get(addr, "/readyz").starts_with("HTTP/1.0 200")
    });
}

/// Writes `data`, half-closes, and returns everything read back until EOF.
fn exchange(mut s: TcpStream, data: &[u8]) -> Vec<u8> {
    s.write_all(data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let (got, err) = read_to_end(&mut s);
    assert_eq!(err, None, "clean end");
    got
}

/// Starts one tunnel listening on `listen`.
fn start_on(listen: &str, mut t: TunnelFile) -> (SocketAddr, Running) {
    t.listen = listen.into();
    start(t, limits())
}

/// A decrypt side in front of `backend`, then an encrypt side in front of it, both on
/// `listen` (an address with port 0); `dec`/`enc` adjust each tunnel.
fn pair_on(
    listen: &str,
    backend: SocketAddr,
    dec: impl FnOnce(&mut TunnelFile),
    enc: impl FnOnce(&mut TunnelFile),
) -> (SocketAddr, Running, Running) {
    let key = keygen("ident");
    let mut d = tunnel(Mode::Decrypt, &[backend], std::slice::from_ref(&key));
    dec(&mut d);
    let (dec_addr, rd) = start_on(listen, d);
    let mut e = tunnel(Mode::Encrypt, &[dec_addr], &[key]);
    enc(&mut e);
    let (enc_addr, re) = start_on(listen, e);
    (enc_addr, re, rd)
}

#[test]
fn the_backend_learns_the_client_in_a_v1_or_v2_header_over_ipv4_and_ipv6() {
    for (listen, bind) in [("127.0.0.1:0", "127.0.0.1:0"), ("[::1]:0", "[::1]:0")] {
        for (setting, version) in [("v1", Version::V1), ("v2", Version::V2)] {
            let backend = recorder(bind);
            let (entry, _re, _rd) = pair_on(
                listen,
                backend.addr,
                |d| d.send_proxy = Some(setting.into()),
                |_| {},
            );
            let client = connect(entry);
            let me = client.local_addr().unwrap();
            let echoed = exchange(client, b"PING\r\n");
            assert_eq!(
                echoed, b"PING\r\n",
                "the header is not part of the client's stream"
            );
            let (h, raw) = backend.header();
            let want = Addrs {
                source: me,
                destination: entry,
            };
            assert_eq!(h.version, version, "{listen} {setting}");
            assert_eq!(h.command, Command::Proxy);
            assert_eq!(h.addrs, Some(want), "{listen} {setting}");
            if version == Version::V1 {
                let fam = if me.is_ipv4() { "TCP4" } else { "TCP6" };
                let line = format!(
                    "PROXY {fam} {} {} {} {}\r\n",
                    me.ip(),
                    entry.ip(),
                    me.port(),
                    entry.port()
                );
                assert_eq!(String::from_utf8(raw).unwrap(), line);
            } else {
                assert_eq!(
                    raw,
                    proxy_header::encode(Version::V2, Some(want)).as_bytes()
                );
            }
        }
    }
}

#[test]
fn a_retried_backend_connect_sends_the_header_once() {
    // The first target refuses; the client's first bytes (which arrive with the OPEN, so they
    // wait behind the header for the connect) go to the second, after one header.
    let backend = recorder("127.0.0.1:0");
    let dead = free_addr();
    let key = keygen("retry");
    let mut d = tunnel(
        Mode::Decrypt,
        &[dead, backend.addr],
        std::slice::from_ref(&key),
    );
    d.send_proxy = Some("v1".into());
    let (dec, rd) = start(d, limits());
    let (entry, _re) = start(tunnel(Mode::Encrypt, &[dec], &[key]), limits());
    let client = connect(entry);
    let me = client.local_addr().unwrap();
    assert_eq!(exchange(client, b"first bytes"), b"first bytes");
    let (h, raw) = backend.header();
    assert_eq!(h.addrs.unwrap().source, me);
    assert!(raw.starts_with(b"PROXY TCP4 "));
    let failed = metric(
        &rd,
        "sealpipe_upstream_connect_failures_total",
        &[("upstream", &dead.to_string())],
    );
    assert_eq!(failed, 1.0, "the first attempt went to the dead target");
}

#[test]
fn without_send_proxy_the_backend_gets_the_clients_bytes_only() {
    let backend = recorder("127.0.0.1:0");
    let (entry, _re, _rd) = pair_on("127.0.0.1:0", backend.addr, |_| {}, |_| {});
    assert_eq!(exchange(connect(entry), b"PING\r\n"), b"PING\r\n");
    match backend.next() {
        Seen::Plain(b) => assert_eq!(b, b"PING\r\n"),
        Seen::Header(h, _) => panic!("a header was sent: {h:?}"),
    }
}

/// An encrypt side taking PROXY headers from 127.0.0.1 (or `trusted`), a decrypt side sending
/// `send` headers to the recorder; `enc` adjusts the encrypt tunnel further.
fn lb_pair(
    trusted: &[&str],
    send: &str,
    enc: impl FnOnce(&mut TunnelFile),
) -> (SocketAddr, Recorder, Running, Running) {
    let backend = recorder("127.0.0.1:0");
    let trusted: Vec<String> = trusted.iter().map(|s| s.to_string()).collect();
    let (entry, re, rd) = pair_on(
        "127.0.0.1:0",
        backend.addr,
        |d| d.send_proxy = Some(send.into()),
        |e| {
            e.accept_proxy = true;
            e.trusted_proxies = trusted;
            enc(e);
        },
    );
    (entry, backend, re, rd)
}

fn addrs(s: &str, d: &str) -> Addrs {
    Addrs {
        source: s.parse().unwrap(),
        destination: d.parse().unwrap(),
    }
}

#[test]
fn a_front_load_balancers_header_reaches_the_backend() {
    let (entry, backend, re, _rd) = lb_pair(&["127.0.0.1"], "v2", |_| {});
    let cases = [
        (
            Version::V2,
            Some(addrs("203.0.113.9:4242", "198.51.100.1:443")),
        ),
        (Version::V1, Some(addrs("192.0.2.77:1", "192.0.2.1:6379"))),
        (
            Version::V2,
            Some(addrs("[2001:db8::77]:50000", "[2001:db8::1]:443")),
        ),
        (
            Version::V1,
            Some(addrs("[2001:db8::78]:50001", "[2001:db8::1]:443")),
        ),
    ];
    for (version, lb_says) in cases {
        // The test is the load balancer: its header, then its client's bytes, in one write.
        let mut first = proxy_header::encode(version, lb_says).as_bytes().to_vec();
        first.extend_from_slice(b"hello");
        let echoed = exchange(connect(entry), &first);
        assert_eq!(
            echoed, b"hello",
            "the LB's header never reaches the decrypt side"
        );
        let (h, _) = backend.header();
        assert_eq!(h.version, Version::V2, "the decrypt side's own header");
        assert_eq!(
            h.addrs, lb_says,
            "the backend sees the LB's client ({version:?})"
        );
    }
    // The header in small writes (segments of their own with TCP_NODELAY, as far as the
    // kernel keeps them apart), then the client's bytes: one header, then the data.
    let lb_says = addrs("198.51.100.200:7", "198.51.100.1:443");
    let header = proxy_header::encode(Version::V2, Some(lb_says));
    let mut s = connect(entry);
    s.set_nodelay(true).unwrap();
    for piece in header.as_bytes().chunks(5) {
        s.write_all(piece).unwrap();
    }
    assert_eq!(exchange(s, b"late bytes"), b"late bytes");
    assert_eq!(backend.header().0.addrs, Some(lb_says));
    // LOCAL (a health check of the LB's own): the backend is told no client.
    let local = proxy_header::encode(Version::V2, None);
    assert_eq!(
        exchange(connect(entry), &[local.as_bytes(), b"hc"].concat()),
        b"hc"
    );
    let (h, _) = backend.header();
    assert_eq!((h.command, h.addrs), (Command::Local, None));
    // The encrypt side counts a close once both its sides are done, after the client's EOF.
    wait_until("six clean closes on the encrypt side", || {
        metric(
            &re,
            "sealpipe_connections_closed_total",
            &[("reason", "clean")],
        ) == 6.0
    });
}

/// Sends `send` and the end of the stream: the connection ends without a byte for the client.
fn refused(entry: SocketAddr, send: &[u8]) {
    let mut s = connect(entry);
    let _ = s.write_all(send);
    let _ = s.shutdown(Shutdown::Write);
    let (got, _) = read_to_end(&mut s);
    assert!(got.is_empty(), "got {got:?}");
}

#[test]
fn a_forged_header_from_an_untrusted_source_is_refused() {
    // Only 192.0.2.1 may send headers; the test connects from 127.0.0.1.
    let (entry, backend, re, _rd) = lb_pair(&["192.0.2.1"], "v1", |_| {});
    let forged = proxy_header::encode(Version::V1, Some(addrs("10.0.0.1:1", "10.0.0.2:2")));
    refused(entry, &[forged.as_bytes(), b"GET /admin"].concat());
    // Without a header, too: an accept_proxy port takes no direct clients.
    refused(entry, b"GET /admin");
    let untrusted = || {
        metric(
            &re,
            "sealpipe_connections_rejected_total",
            &[("reason", "untrusted_proxy")],
        )
    };
    wait_until("two untrusted_proxy rejections", || untrusted() == 2.0);
    assert_eq!(metric(&re, "sealpipe_connections_accepted_total", &[]), 0.0);
    backend.none_yet();
}

#[test]
fn malformed_truncated_and_late_headers_close_the_connection() {
    let (entry, backend, re, rd) =
        lb_pair(&["127.0.0.0/8"], "v1", |e| e.handshake_timeout = Some(0.3));
    let closed = || {
        metric(
            &re,
            "sealpipe_connections_closed_total",
            &[("reason", "proxy_header")],
        )
    };
    // Not a header at all (a client sent straight to the port).
    refused(entry, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    // A v1 line with a leading zero, a v2 header with an unknown command.
    refused(entry, b"PROXY TCP4 010.0.0.1 10.0.0.2 1 2\r\nhello");
    let mut bad_cmd = proxy_header::encode(Version::V2, Some(addrs("10.0.0.1:1", "10.0.0.2:2")))
        .as_bytes()
        .to_vec();
    bad_cmd[12] = 0x22;
    refused(entry, &bad_cmd);
    // Half a header, then the end of the stream.
    refused(entry, b"PROXY TCP4 10.0.0.1 ");
    // More than a header may be without its end: refused without reading on.
    let mut long = b"PROXY UNKNOWN ".to_vec();
    long.resize(4096, b'x');
    refused(entry, &long);
    wait_until("five proxy_header closes", || closed() == 5.0);
    // Nothing at all, until handshake_timeout.
    let mut s = connect(entry);
    let (got, _) = read_to_end(&mut s);
    assert!(got.is_empty());
    wait_until("the silent client closed", || closed() == 6.0);
    assert_eq!(metric(&re, "sealpipe_connections_accepted_total", &[]), 6.0);
    assert_eq!(
        metric(&re, "sealpipe_handshakes_total", &[]),
        0.0,
        "no upstream session"
    );
    assert_eq!(metric(&rd, "sealpipe_connections_accepted_total", &[]), 0.0);
    backend.none_yet();
}

#[test]
fn access_lists_refuse_before_anything_else() {
    let backend = echo_backend();
    // Denied: 127.0.0.0/8 (the test's own address), even though allowed.
    let mut t = tunnel(Mode::Forward, &[backend.addr], &[]);
    t.allow = vec!["127.0.0.0/8".into()];
    t.deny = vec!["127.0.0.1".into()];
    let (deny, rdeny) = start(t, limits());
    refused(deny, b"hello");
    // Allowed elsewhere only.
    let mut t = tunnel(Mode::Forward, &[backend.addr], &[]);
    t.allow = vec!["10.0.0.0/8".into(), "::1".into()];
    let (other, rother) = start(t, limits());
    refused(other, b"hello");
    // Allowed: 127.0.0.1 matches; over IPv6, ::1 matches and an IPv4 range does not.
    let mut t = tunnel(Mode::Forward, &[backend.addr], &[]);
    t.allow = vec!["127.0.0.1".into()];
    let (ok, _r) = start(t, limits());
    assert_eq!(exchange(connect(ok), b"hello"), b"hello");
    let mut t = tunnel(Mode::Forward, &[backend.addr], &[]);
    t.allow = vec!["::1".into()];
    let (v6, _r6) = start_on("[::1]:0", t);
    assert_eq!(exchange(connect(v6), b"hi6"), b"hi6");
    let mut t = tunnel(Mode::Forward, &[backend.addr], &[]);
    t.allow = vec!["127.0.0.0/8".into()];
    let (v6_denied, r6d) = start_on("[::1]:0", t);
    refused(v6_denied, b"hello");
    for r in [&rdeny, &rother, &r6d] {
        wait_until("an acl rejection", || {
            metric(
                r,
                "sealpipe_connections_rejected_total",
                &[("reason", "acl")],
            ) == 1.0
        });
        assert_eq!(metric(r, "sealpipe_connections_accepted_total", &[]), 0.0);
    }
    assert_eq!(backend.conns.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[test]
fn a_reload_changes_the_access_lists_and_keeps_established_connections() {
    let backend = echo_backend();
    let dir = temp_dir("aclreload");
    let path = dir.join("c.toml");
    let write = |deny: &str| {
        let text = format!(
            "[limits]\nthreads = 1\n[[tunnel]]\nname = \"fw\"\nmode = \"forward\"\nlisten = \"127.0.0.1:0\"\ntargets = [\"{}\"]\ndeny = [{deny}]\n",
            backend.addr
        );
        std::fs::write(&path, text).unwrap();
    };
    write("\"10.0.0.0/8\"");
    let cfg = sealpipe::config::Config::from_file(&path).unwrap();
    let mut r = sealpipe::server::start(cfg, None).unwrap();
    let entry = r.listen_addrs[0];
    let mut open = connect(entry);
    open.write_all(b"before").unwrap();
    let mut got = [0u8; 6];
    open.read_exact(&mut got).unwrap();
    // Now deny the test's own address: new connections are refused, the open one goes on.
    write("\"127.0.0.0/8\"");
    r.reload().unwrap();
    // The shard applies a reload on its next loop turn: poll until a new connection is refused.
    let echoes = |mut s: TcpStream| {
        let _ = s.write_all(b"x");
        let _ = s.shutdown(Shutdown::Write);
        read_to_end(&mut s).0 == b"x"
    };
    wait_until("new connections refused", || !echoes(connect(entry)));
    let acl = metric(
        &r,
        "sealpipe_connections_rejected_total",
        &[("reason", "acl")],
    );
    assert!(acl >= 1.0);
    open.write_all(b"after!").unwrap();
    open.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"after!");
    // A bad list is rejected whole; the one in force stays.
    write("\"127.0.0.1/8\"");
    let e = r.reload().unwrap_err();
    assert!(e.contains("deny[0]"), "{e}");
    refused(entry, b"still denied");
    write("");
    r.reload().unwrap();
    wait_until("new connections allowed again", || echoes(connect(entry)));
}

/// The access log's lines, parsed; waits until there are `n`.
fn log_lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    wait_until(&format!("{n} lines in {}", path.display()), || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        lines = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        lines.len() >= n
    });
    assert_eq!(lines.len(), n);
    lines
}

#[test]
fn the_access_log_has_one_line_per_connection_field_by_field() {
    let dir = temp_dir("accesslog");
    let key = dir.join("k.key");
    let key_id = sealpipe::keyfile::generate_key_file(&key, &mut sealpipe::protocol::OsRandom)
        .unwrap()
        .to_string();
    let (enc_log, dec_log) = (dir.join("enc.log"), dir.join("dec.log"));
    let backend = recorder("127.0.0.1:0");
    let mut d = tunnel(Mode::Decrypt, &[backend.addr], std::slice::from_ref(&key));
    d.name = Some("dec".into());
    d.send_proxy = Some("v1".into());
    d.access_log = Some(dec_log.to_str().unwrap().into());
    let (dec_addr, _rd) = start(d, limits());
    let mut e = tunnel(Mode::Encrypt, &[dec_addr], &[key]);
    e.name = Some("enc".into());
    e.accept_proxy = true;
    e.trusted_proxies = vec!["127.0.0.1".into()];
    e.access_log = Some(enc_log.to_str().unwrap().into());
    let (entry, _re) = start(e, limits());

    let lb_says = addrs("203.0.113.5:5555", "198.51.100.1:6379");
    let s = connect(entry);
    let lb = s.local_addr().unwrap();
    let header = proxy_header::encode(Version::V2, Some(lb_says));
    let request = vec![b'r'; 1000];
    let got = exchange(s, &[header.as_bytes(), &request].concat());
    assert_eq!(got, request);
    let (_, sent_header) = backend.header();

    let enc = log_lines(&enc_log, 1).remove(0);
    let dec = log_lines(&dec_log, 1).remove(0);
    for (v, tunnel, mode) in [(&enc, "enc", "encrypt"), (&dec, "dec", "decrypt")] {
        assert_eq!(v["tunnel"], tunnel);
        assert_eq!(v["mode"], mode);
        assert_eq!(
            v["client"], "203.0.113.5:5555",
            "{mode}: the client as PROXY/OPEN named it"
        );
        assert_eq!(v["proxied"], true);
        assert_eq!(
            v["bytes_up"], 1000,
            "{mode}: the PROXY headers are not client bytes"
        );
        assert_eq!(v["bytes_down"], 1000);
        assert_eq!(v["reason"], "clean");
        assert_eq!(v["key_id"], key_id.as_str());
        assert_eq!(v["fs"], true);
        let secs = v["duration"].as_f64().unwrap();
        assert!(secs > 0.0 && secs < TIMEOUT.as_secs_f64(), "{secs}");
        let ts = v["ts"].as_str().unwrap();
        assert!(
            ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
            "{ts}"
        );
        assert_eq!(v.as_object().unwrap().len(), 13);
    }
    assert_eq!(
        enc["peer"],
        lb.to_string(),
        "the encrypt side's peer is the load balancer"
    );
    assert_eq!(enc["target"], dec_addr.to_string());
    assert_eq!(dec["target"], backend.addr.to_string());
    let dec_peer: SocketAddr = dec["peer"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        dec_peer.ip(),
        dec_addr.ip(),
        "the decrypt side's peer is the encrypt side"
    );
    assert!(!sent_header.is_empty());

    // A connection refused at its header is logged too, with no session.
    let mut s = connect(entry);
    s.write_all(b"NOT A HEADER\r\n").unwrap();
    let _ = read_to_end(&mut s);
    let lines = log_lines(&enc_log, 2);
    let bad = &lines[1];
    assert_eq!(bad["reason"], "proxy_header");
    assert_eq!(bad["client"], serde_json::Value::Null);
    assert_eq!(bad["target"], serde_json::Value::Null);
    assert_eq!(bad["key_id"], serde_json::Value::Null);
    assert_eq!(bad["fs"], serde_json::Value::Null);
    assert_eq!(bad["bytes_up"], 14);
}

/// `sealpipe check` names the key at fault; the flags of single-tunnel commands work end to
/// end (an encrypt process taking PROXY headers, a decrypt process sending them and logging).
#[test]
fn check_names_the_key_and_the_command_line_flags_work() {
    let dir = temp_dir("identcli");
    let key = keygen("identcli");
    let cases = [
        (
            "mode = \"encrypt\"\naccept_proxy = true\n",
            "accept_proxy = true (--accept-proxy) needs trusted_proxies",
        ),
        (
            "mode = \"encrypt\"\naccept_proxy = true\ntrusted_proxies = [\"10.0.0.1/8\"]\n",
            "trusted_proxies[0]",
        ),
        ("mode = \"decrypt\"\nsend_proxy = \"v3\"\n", "send_proxy"),
        (
            "mode = \"encrypt\"\nsend_proxy = \"v1\"\n",
            "send_proxy (--send-proxy) is for decrypt",
        ),
        ("mode = \"decrypt\"\naccess_log = \"\"\n", "access_log"),
        ("mode = \"decrypt\"\ndeny = [\"10.0.0.0/33\"]\n", "deny[0]"),
        (
            "mode = \"decrypt\"\nallow = \"10.0.0.0/8\"\n",
            "line 7: invalid type: string",
        ),
    ];
    for (i, (keys, want)) in cases.iter().enumerate() {
        let cfg = dir.join(format!("c{i}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[[tunnel]]\nname = \"t\"\nlisten = \"127.0.0.1:1\"\ntargets = [\"127.0.0.1:2\"]\nkeys = [{:?}]\n{keys}",
                key.to_str().unwrap()
            ),
        )
        .unwrap();
        let out = sealpipe()
            .args(["check", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{keys}: {err}");
        assert!(err.contains(want), "{keys}: want {want:?} in {err}");
    }

    let backend = recorder("127.0.0.1:0");
    let log = dir.join("dec.log");
    let (dec_listen, enc_listen) = (free_addr(), free_addr());
    let run = |mode: &str, listen: SocketAddr, target: SocketAddr, extra: &[&str]| {
        let metrics = free_addr();
        let mut c = sealpipe();
        c.arg(mode)
            .args([
                "--listen",
                &listen.to_string(),
                "--target",
                &target.to_string(),
            ])
            .arg("--key")
            .arg(&key)
            .args(["--threads", "1", "--metrics", &metrics.to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let p = Proc(c.spawn().unwrap());
        wait_ready(metrics);
        p
    };
    let log_arg = log.to_str().unwrap().to_string();
    let _dec = run(
        "decrypt",
        dec_listen,
        backend.addr,
        &["--send-proxy", "v1", "--access-log", &log_arg],
    );
    let _enc = run(
        "encrypt",
        enc_listen,
        dec_listen,
        &[
            "--accept-proxy",
            "--trusted-proxy",
            "10.0.0.0/8",
            "--trusted-proxy",
            "127.0.0.1",
        ],
    );
    let lb_says = addrs("192.0.2.99:1234", "192.0.2.1:80");
    let header = proxy_header::encode(Version::V1, Some(lb_says));
    let echoed = exchange(
        connect(enc_listen),
        &[header.as_bytes(), b"via cli"].concat(),
    );
    assert_eq!(echoed, b"via cli");
    assert_eq!(backend.header().0.addrs, Some(lb_says));
    let line = log_lines(&log, 1).remove(0);
    assert_eq!(line["client"], "192.0.2.99:1234");
    assert_eq!(line["proxied"], true);
}

/// SIGHUP reopens the access log: a rotated file (renamed away) gets no more lines, the new
/// one gets the next connection's.
#[test]
fn sighup_reopens_a_rotated_access_log() {
    let dir = temp_dir("rotate");
    let backend = echo_backend();
    let log = dir.join("access.log");
    let (listen, metrics) = (free_addr(), free_addr());
    let cfg = dir.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[limits]\nthreads = 1\n[metrics]\nlisten = \"{metrics}\"\n[[tunnel]]\nname = \"fw\"\nmode = \"forward\"\nlisten = \"{listen}\"\ntargets = [\"{}\"]\naccess_log = {:?}\n",
            backend.addr,
            log.to_str().unwrap()
        ),
    )
    .unwrap();
    let p = Proc(
        sealpipe()
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_ready(metrics);
    assert_eq!(exchange(connect(listen), b"one"), b"one");
    log_lines(&log, 1);
    let rotated: PathBuf = dir.join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    p.signal("HUP");
    // The reload is counted after the shards were handed the new writer; a connection
    // accepted after that is logged there.
    wait_until("the reload", || {
        metric_in(
            &http_get(metrics, "/metrics"),
            "sealpipe_config_reloads_total",
            &[("result", "ok")],
        ) == 1.0
    });
    assert!(log.exists());
    assert_eq!(exchange(connect(listen), b"two"), b"two");
    let new = log_lines(&log, 1);
    assert_eq!(new[0]["bytes_up"], 3);
    assert_eq!(
        log_lines(&rotated, 1).len(),
        1,
        "the rotated file got nothing more"
    );
}
