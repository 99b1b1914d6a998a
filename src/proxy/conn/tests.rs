//! The connection core's tests: deterministic scenarios and a property test over random
//! schedules, all on the pair harness (`pair.rs`: in-memory links, a hand-driven clock), and
//! the size a connection costs.

use std::mem::size_of;
use std::time::Duration;

use super::core::{ConnTimer, Flow, Lifetime, Limits, Side};
use super::pair::{Kind, Opts, Rec, World};
use super::*;
use crate::metrics::{Bytes, CloseReason};
use crate::proxy::TargetIdx;
use crate::proxy::proxy_header::Invalid;

/// Runs a world to its end with nothing in the way.
fn run(opts: Opts) -> World {
    let mut w = World::new(opts);
    w.settle();
    w.check_settled();
    w
}

#[test]
fn a_clean_exchange_arrives_whole_and_closes_cleanly() {
    let w = run(Opts::default());
    w.check_complete();
    for n in [&w.enc.env, &w.dec.as_ref().unwrap().env] {
        assert!(n.recs.contains(&Rec::HandshakeOk {
            forward_secrecy: true
        }));
    }
    // Every byte each way was counted, plaintext and sealed.
    let e = &w.enc.env.bytes;
    assert_eq!(e[Bytes::UpPlain], 3000);
    assert_eq!(e[Bytes::DownPlain], 5000);
    assert!(e[Bytes::UpSealed] > 3000 && e[Bytes::DownSealed] > 5000);
    let closed = w.enc.env.recs.last().unwrap();
    assert!(
        matches!(closed, Rec::Closed { reason: CloseReason::Clean, bytes, .. } if bytes == e),
        "{closed:?}"
    );
}

/// Lengths and types of the records in `wire`, which starts at a record boundary.
fn records(wire: &[u8]) -> Vec<(usize, u8)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 3 <= wire.len() {
        let len = 3 + usize::from(u16::from_be_bytes([wire[at + 1], wire[at + 2]])) + 16;
        out.push((len, wire[at]));
        at += len;
    }
    assert_eq!(at, wire.len(), "whole records");
    out
}

/// A world whose handshake completed and whose backend is connected, nothing else sent.
fn opened(opts: Opts) -> World {
    let mut w = World::new(opts);
    w.net();
    assert!(w.backend.is_some(), "the backend is connected");
    assert!(w.wire_in_flight(0).is_empty() && w.wire_in_flight(1).is_empty());
    w
}

/// Sends `pieces` from the client (or the backend) one at a time, each sealed as it comes,
/// then the end of the stream; the sealed bytes wait on the wire, undelivered.
fn seal_pieces(w: &mut World, from_client: bool, pieces: &[usize]) {
    for &n in pieces {
        if from_client {
            assert!(w.client_write(n));
            w.deliver(0, 0, usize::MAX);
            w.ready(0, Side::Client);
        } else {
            assert!(w.backend_write(n));
            w.deliver(2, 1, usize::MAX);
            w.ready(1, Side::Upstream);
        }
    }
    if from_client {
        w.client_shut();
        w.deliver(0, 0, usize::MAX);
        w.ready(0, Side::Client);
    } else {
        w.backend_shut();
        w.deliver(2, 1, usize::MAX);
        w.ready(1, Side::Upstream);
    }
}

const PIECES: [usize; 5] = [1, 700, 16384, 40, 20000];

fn sealed_opts() -> Opts {
    let total: usize = PIECES.iter().sum();
    Opts {
        client_data: super::pair::pattern(total, 3),
        backend_data: super::pair::pattern(total, 4),
        ..Opts::default()
    }
}

#[test]
fn a_stream_cut_at_any_record_boundary_resets_instead_of_closing() {
    for from_client in [true, false] {
        let dir = if from_client { 0 } else { 1 };
        // The records as sealed: the same on every run (the worlds' randomness is fixed).
        let mut w = opened(sealed_opts());
        seal_pieces(&mut w, from_client, &PIECES);
        let wire = w.wire_in_flight(dir);
        let recs = records(&wire);
        assert_eq!(
            recs.last().map(|r| r.1),
            Some(0x02),
            "the stream ends with END"
        );
        let data: Vec<u8> = if from_client {
            w.client.data.clone()
        } else {
            w.backend.as_ref().unwrap().data.clone()
        };
        let mut boundary = 0;
        let mut plain = 0;
        // Every boundary before END (the first one: nothing of the stream got through).
        for &(len, ty) in &recs[..recs.len() - 1] {
            let mut w = opened(sealed_opts());
            seal_pieces(&mut w, from_client, &PIECES);
            assert_eq!(w.wire_in_flight(dir), wire, "the same bytes every run");
            w.cut_after(dir, boundary);
            w.settle();
            w.check_settled();
            let (receiver, got, sender_peer_reset, receiver_peer_reset) = if from_client {
                let b = w.backend.as_ref().unwrap();
                (
                    w.dec.as_ref().unwrap().reason(),
                    &b.got,
                    w.client.reset,
                    b.reset,
                )
            } else {
                let b = w.backend.as_ref().unwrap();
                (w.enc.reason(), &w.client.got, b.reset, w.client.reset)
            };
            assert_eq!(receiver, Some(CloseReason::Truncated), "cut at {boundary}");
            assert!(
                receiver_peer_reset,
                "the receiving peer is reset, not closed"
            );
            assert!(sender_peer_reset, "so is the sending one");
            assert_eq!(got[..], data[..plain], "exactly the records before the cut");
            boundary += len;
            if ty == 0x01 {
                plain += len - 19;
            }
        }
        assert_eq!(plain, data.len());
    }
}

#[test]
fn a_tampered_record_resets_both_sides_and_delivers_nothing_of_it() {
    for from_client in [true, false] {
        let dir = if from_client { 0 } else { 1 };
        let mut w = opened(sealed_opts());
        seal_pieces(&mut w, from_client, &PIECES);
        let recs = records(&w.wire_in_flight(dir));
        // Flip a bit in the third record's ciphertext: the first two arrive.
        let (before, plain): (usize, usize) = recs[..2].iter().fold((0, 0), |(b, p), r| {
            (b + r.0, p + if r.1 == 0x01 { r.0 - 19 } else { 0 })
        });
        assert!(w.tamper(dir, before + 10));
        w.settle();
        w.check_settled();
        let (detector, other) = if from_client {
            (w.dec.as_ref().unwrap(), w.enc.reason())
        } else {
            (w.dec.as_ref().unwrap(), w.dec.as_ref().unwrap().reason())
        };
        let detector_reason = if from_client {
            detector.reason()
        } else {
            w.enc.reason()
        };
        assert_eq!(detector_reason, Some(CloseReason::Tampered));
        // The far core sees its sealed peer reset.
        assert_eq!(other, Some(CloseReason::PeerReset));
        let b = w.backend.as_ref().unwrap();
        assert!(w.client.reset && b.reset, "both plaintext peers are reset");
        let got = if from_client { &b.got } else { &w.client.got };
        assert_eq!(
            got.len(),
            plain,
            "the records before the tampered one, none of it"
        );
    }
}

#[test]
fn a_bit_flipped_in_the_handshake_never_reaches_the_backend() {
    let mut w = World::new(Opts::default());
    w.establish();
    w.ready(0, Side::Upstream);
    assert!(w.tamper(0, 20), "the hello is in flight");
    w.settle();
    w.check_settled();
    assert!(
        w.backend.is_none(),
        "no backend connect for an unverified session"
    );
    assert_eq!(
        w.dec.as_ref().unwrap().reason(),
        Some(CloseReason::HandshakeFailed)
    );
    assert!(w.client.reset);
}

#[test]
fn a_client_reset_reaches_the_backend_as_a_reset_counted_client_reset() {
    let mut w = opened(Opts::default());
    assert!(w.client_write(1000));
    w.net();
    assert!(w.backend_read());
    assert!(w.client_reset());
    w.settle();
    w.check_settled();
    assert_eq!(w.enc.reason(), Some(CloseReason::PeerReset));
    assert_eq!(
        w.dec.as_ref().unwrap().reason(),
        Some(CloseReason::ClientReset)
    );
    let d = w.dec.as_ref().unwrap();
    assert!(d.recorded(&Rec::Failed {
        side: Side::Client,
        reason: CloseReason::ClientReset,
        cause: "abort"
    }));
    let b = w.backend.as_ref().unwrap();
    assert!(b.reset && !b.eof, "the backend sees a reset");
    assert_eq!(b.got.len(), 1000);
}

#[test]
fn a_client_the_kernel_gave_up_on_closes_peer_timeout_and_resets_the_backend() {
    let mut w = opened(Opts::default());
    assert!(w.client_write(100));
    exchange(&mut w);
    // No FIN, no RST: keepalive's probes (or TCP_USER_TIMEOUT) ran out.
    w.client_vanishes();
    assert!(w.ready(0, Side::Client));
    assert_eq!(w.enc.reason(), Some(CloseReason::PeerTimeout));
    assert!(w.enc.recorded(&Rec::Failed {
        side: Side::Client,
        reason: CloseReason::PeerTimeout,
        cause: "io",
    }));
    w.settle();
    w.check_settled();
    // The far side hears of it as the client's reset, and resets the backend in turn.
    let d = w.dec.as_ref().unwrap();
    assert_eq!(d.reason(), Some(CloseReason::ClientReset));
    assert!(w.backend.as_ref().unwrap().reset);
}

#[test]
fn a_backend_reset_reaches_the_client_as_a_reset_counted_upstream_reset() {
    let mut w = opened(Opts::default());
    assert!(w.backend_write(1000));
    w.net();
    assert!(w.client_read());
    assert!(w.backend_reset());
    w.settle();
    w.check_settled();
    assert_eq!(
        w.dec.as_ref().unwrap().reason(),
        Some(CloseReason::PeerReset)
    );
    assert_eq!(w.enc.reason(), Some(CloseReason::UpstreamReset));
    assert!(w.client.reset && !w.client.eof, "the client sees a reset");
    assert_eq!(w.client.got.len(), 1000);
}

#[test]
fn the_drain_deadline_aborts_both_ends() {
    let mut w = opened(Opts::default());
    assert!(w.drain(0));
    w.settle();
    w.check_settled();
    assert_eq!(w.enc.reason(), Some(CloseReason::DrainDeadline));
    // ABORT(shutdown): the far side counts its peer's reset.
    assert_eq!(
        w.dec.as_ref().unwrap().reason(),
        Some(CloseReason::PeerReset)
    );
    assert!(w.client.reset && w.backend.as_ref().unwrap().reset);
}

#[test]
fn failover_tries_the_next_target_and_carries_the_bytes_already_sent() {
    let mut w = World::new(Opts {
        enc_targets: vec![Kind::Refused, Kind::Blackhole, Kind::Decrypt],
        dec_targets: vec![Kind::Refused, Kind::Backend],
        ..Opts::default()
    });
    // The client's whole request is in before any connect is answered.
    assert!(w.client_write(usize::MAX) && w.client_shut());
    w.deliver(0, 0, usize::MAX);
    w.ready(0, Side::Client);
    let t0 = w.now;
    // Refused: the target is down for its backoff, and the next is tried at once.
    assert!(w.establish());
    assert!(w.ready(0, Side::Upstream));
    assert!(w.enc.recorded(&Rec::ConnectFailed {
        outcome: ConnectOutcome::Refused,
        went_down: true
    }));
    assert!(!w.enc.upstreams().is_up(TargetIdx::new(0), w.now));
    w.advance(Duration::from_millis(999));
    assert!(
        !w.enc.upstreams().is_up(TargetIdx::new(0), w.now),
        "down for 1 s"
    );
    w.advance(Duration::from_millis(1));
    assert!(
        w.enc.upstreams().is_up(TargetIdx::new(0), w.now),
        "up again after 1 s"
    );
    // Blackhole: nothing until the connect timeout, then the next.
    assert!(w.establish(), "the blackhole does not answer");
    w.advance(Duration::from_millis(1999));
    assert!(!w.enc.recorded(&Rec::ConnectFailed {
        outcome: ConnectOutcome::TimedOut,
        went_down: true
    }));
    w.advance(Duration::from_millis(1));
    assert_eq!(
        w.now - t0,
        Duration::from_secs(3),
        "the connect timeout after the connect"
    );
    assert!(w.enc.recorded(&Rec::ConnectFailed {
        outcome: ConnectOutcome::TimedOut,
        went_down: true
    }));
    w.settle();
    w.check_settled();
    w.check_complete();
    let d = w.dec.as_ref().unwrap();
    assert!(d.recorded(&Rec::ConnectFailed {
        outcome: ConnectOutcome::Refused,
        went_down: true
    }));
}

#[test]
fn every_target_refusing_ends_the_client_with_upstream_failed() {
    let mut w = World::new(Opts {
        enc_targets: vec![Kind::Refused, Kind::Refused],
        ..Opts::default()
    });
    w.settle();
    w.check_settled();
    assert_eq!(w.enc.reason(), Some(CloseReason::UpstreamFailed));
    assert!(w.client.reset, "the client is reset, not closed");
}

#[test]
fn a_connect_given_up_at_its_timeout_resets_a_backend_that_accepted_it_late() {
    // The backend's kernel completes the handshake just as the connect timeout fires (the
    // SYN-ACK lands after the loop's last poll): the decrypt side gives the connect up with
    // the socket connected underneath. The backend must see a reset, never an empty stream
    // that ends cleanly (without its PROXY header, and before the client ended).
    let mut w = World::new(Opts {
        connect_timeout: Duration::from_millis(500),
        preamble: b"PROXY\r\n".to_vec(),
        ..Opts::default()
    });
    assert!(w.client_write(100));
    let mut opened = false;
    for _ in 0..100 {
        opened = w
            .dec
            .as_ref()
            .is_some_and(|d| d.recorded(&Rec::SessionOpened));
        if opened {
            break;
        }
        w.establish_from(0);
        w.deliver_all();
        w.ready_all();
    }
    assert!(opened, "the decrypt side connects to the backend");
    assert!(w.establish_from(1), "the backend accepts");
    w.advance(Duration::from_millis(500));
    let d = w.dec.as_ref().unwrap();
    assert!(d.recorded(&Rec::ConnectFailed {
        outcome: ConnectOutcome::TimedOut,
        went_down: true
    }));
    assert_eq!(d.reason(), Some(CloseReason::UpstreamFailed));
    w.settle();
    w.check_settled();
    let b = w.backend.as_ref().unwrap();
    assert!(b.got.is_empty(), "nothing was written to it");
    assert!(
        b.reset && !b.eof,
        "the backend saw a reset, not a clean end"
    );
    assert!(w.client.reset, "and the client a reset");
}

#[test]
fn the_backend_gets_the_preamble_first_even_after_a_failover() {
    let preamble = b"PROXY TCP4 192.0.2.10 192.0.2.1 5555 80\r\n".to_vec();
    let w = run(Opts {
        dec_targets: vec![Kind::Refused, Kind::Backend],
        preamble: preamble.clone(),
        ..Opts::default()
    });
    let b = w.backend.as_ref().unwrap();
    assert_eq!(b.got[..preamble.len()], preamble[..]);
    assert!(
        b.got[preamble.len()..] == w.client.data[..],
        "then the client's bytes"
    );
    assert!(b.eof && w.client.eof);
}

/// A load balancer's PROXY header naming its client (accept_proxy).
const CLIENT_HEADER: &[u8] = b"PROXY TCP4 192.0.2.7 10.0.0.1 40001 6379\r\n";

fn accept_proxy(opts: Opts) -> Opts {
    Opts {
        client_header: CLIENT_HEADER.to_vec(),
        ..opts
    }
}

#[test]
fn the_client_preamble_comes_off_first_and_names_the_client_in_the_open() {
    let mut w = World::new(accept_proxy(Opts::default()));
    // Part of the header: nothing connects yet.
    assert!(w.client_write(20));
    w.deliver(0, 0, usize::MAX);
    w.ready(0, Side::Client);
    assert!(w.enc.core.upstream().is_none() && !w.establish());
    // The rest of it, and the client's bytes behind it in the same writes.
    w.settle();
    w.check_settled();
    w.check_complete();
    let b = w.backend.as_ref().unwrap();
    assert!(
        b.got == w.opts.client_data,
        "the header never reaches the far side"
    );
    let open = w.dec.as_ref().unwrap().env.opened.expect("an OPEN");
    assert!(open.proxied);
    assert_eq!(
        open.addrs.map(|a| a.source),
        Some("192.0.2.7:40001".parse().unwrap())
    );
}

#[test]
fn a_bad_cut_or_late_client_preamble_closes_with_proxy_header_before_any_connect() {
    let bad = |w: &World, e: Option<HeaderError>| {
        assert_eq!(w.enc.reason(), Some(CloseReason::ProxyHeader));
        if let Some(e) = e {
            assert!(w.enc.recorded(&Rec::PreambleFailed(e)), "{e:?}");
        }
        assert!(w.client.reset, "the client is reset");
        assert!(
            w.dec.is_none() && w.enc.core.target().is_none(),
            "no connect"
        );
    };
    // Not a PROXY header at all.
    let mut w = World::new(Opts {
        client_header: b"GET / HTTP/1.1\r\n".to_vec(),
        ..Opts::default()
    });
    w.settle();
    w.check_settled();
    bad(&w, Some(HeaderError::Invalid(Invalid::NotProxy)));
    // The client ends in the middle of it.
    let mut w = World::new(accept_proxy(Opts::default()));
    assert!(w.client_write(20) && w.client_shut());
    w.settle();
    w.check_settled();
    bad(&w, Some(HeaderError::Eof));
    // Part of it, then silence: the handshake timeout is the header's.
    let mut w = World::new(accept_proxy(timeout_opts()));
    assert!(w.client_write(20));
    w.deliver(0, 0, usize::MAX);
    w.ready(0, Side::Client);
    w.advance(Duration::from_millis(1_999));
    assert!(!w.enc.closed, "not yet");
    w.advance(Duration::from_millis(1));
    assert!(w.enc.recorded(&Rec::PreambleTimeout { received: 20 }));
    w.settle();
    w.check_settled();
    bad(&w, None);
}

#[test]
fn after_the_client_preamble_the_handshake_gets_its_own_whole_timeout() {
    let mut w = World::new(accept_proxy(timeout_opts()));
    w.advance(Duration::from_millis(1_500));
    assert!(w.client_write(CLIENT_HEADER.len()));
    w.deliver(0, 0, usize::MAX);
    w.ready(0, Side::Client);
    assert!(
        w.enc.core.upstream().is_some(),
        "connecting once the header is in"
    );
    // The decrypt side accepts, and nothing ever crosses the wire.
    assert!(w.establish());
    w.ready(0, Side::Upstream);
    w.advance(Duration::from_millis(1_999));
    assert!(!w.enc.closed, "2 s from the header, not from the accept");
    w.advance(Duration::from_millis(1));
    assert!(w.enc.recorded(&Rec::HandshakeTimeout));
    assert_eq!(w.enc.reason(), Some(CloseReason::HandshakeFailed));
    w.settle();
    w.check_settled();
}

/// Runs the network and lets both peers read, until nothing moves.
fn exchange(w: &mut World) {
    loop {
        w.net();
        let a = w.client_read();
        let b = w.backend_read();
        if !a && !b {
            return;
        }
    }
}

#[test]
fn half_close_flows_through_when_the_client_ends_first() {
    let mut w = opened(Opts::default());
    assert!(w.client_write(usize::MAX) && w.client_shut());
    exchange(&mut w);
    let b = w.backend.as_ref().unwrap();
    assert!(
        b.eof && b.got == w.client.data,
        "the request arrived, ended"
    );
    assert_eq!(b.sent, 0, "before any reply");
    assert!(!w.enc.closed && !w.dec.as_ref().unwrap().closed);
    assert!(w.enc.core.ended(Side::Client) && !w.enc.core.ended(Side::Upstream));
    // The reply still flows, in several writes, then ends.
    for _ in 0..5 {
        assert!(w.backend_write(1000));
        exchange(&mut w);
    }
    assert!(w.backend_shut());
    exchange(&mut w);
    w.settle();
    w.check_settled();
    w.check_complete();
}

#[test]
fn half_close_flows_through_when_the_backend_ends_first() {
    let mut w = opened(Opts::default());
    assert!(w.backend_write(usize::MAX) && w.backend_shut());
    exchange(&mut w);
    assert!(w.client.eof && w.client.got == w.backend.as_ref().unwrap().data);
    assert_eq!(w.client.sent, 0);
    assert!(!w.enc.closed && !w.dec.as_ref().unwrap().closed);
    for _ in 0..3 {
        assert!(w.client_write(1000));
        exchange(&mut w);
    }
    assert!(w.client_shut());
    w.settle();
    w.check_settled();
    w.check_complete();
}

fn timeout_opts() -> Opts {
    Opts {
        limits: Limits {
            idle: Some(Duration::from_secs(10)),
            half_closed: Some(Duration::from_secs(4)),
            handshake: Duration::from_secs(2),
            unopened: Duration::from_secs(60),
            lifetime: None,
        },
        ..Opts::default()
    }
}

#[test]
fn an_idle_connection_times_out_at_its_limit_and_resets_both_ends() {
    let mut w = opened(timeout_opts());
    assert!(w.client_write(100));
    exchange(&mut w);
    w.advance(Duration::from_millis(9_999));
    assert!(!w.enc.closed && !w.dec.as_ref().unwrap().closed, "not yet");
    w.advance(Duration::from_millis(1));
    assert_eq!(w.enc.reason(), Some(CloseReason::IdleTimeout));
    assert_eq!(
        w.dec.as_ref().unwrap().reason(),
        Some(CloseReason::IdleTimeout)
    );
    w.settle();
    w.check_settled();
    assert!(w.client.reset && w.backend.as_ref().unwrap().reset);
}

#[test]
fn activity_moves_the_idle_deadline() {
    let mut w = opened(timeout_opts());
    for _ in 0..5 {
        w.advance(Duration::from_secs(6));
        assert!(w.client_write(10));
        exchange(&mut w);
    }
    assert!(!w.enc.closed, "30 s old, never 10 s quiet");
    w.advance(Duration::from_secs(10));
    assert_eq!(w.enc.reason(), Some(CloseReason::IdleTimeout));
}

#[test]
fn a_half_closed_connection_times_out_at_the_half_closed_limit() {
    let mut w = opened(timeout_opts());
    assert!(w.client_write(100) && w.client_shut());
    exchange(&mut w);
    w.advance(Duration::from_millis(3_999));
    assert!(!w.enc.closed, "not yet");
    w.advance(Duration::from_millis(1));
    assert_eq!(w.enc.reason(), Some(CloseReason::IdleTimeout));
    w.settle();
    w.check_settled();
}

#[test]
fn an_idle_timeout_of_zero_never_fires() {
    // 0 in the configuration: no limit (`config::Tunnel::idle_limit`).
    let off = Limits {
        idle: None,
        half_closed: None,
        handshake: Duration::from_secs(2),
        unopened: Duration::from_secs(60),
        lifetime: None,
    };
    let mut w = opened(Opts {
        limits: off,
        ..Opts::default()
    });
    assert!(w.client_write(100));
    exchange(&mut w);
    w.advance(Duration::from_secs(7 * 24 * 3600));
    assert!(!w.enc.closed && !w.dec.as_ref().unwrap().closed);
    // It hibernated, and then waits for nothing: no timer is armed until the next activity.
    assert!(w.enc.core.is_asleep());
    assert_eq!(w.enc.env.timer(ConnTimer::Idle), None);
    // Half-closed, with no half-closed limit either.
    assert!(w.client_write(100) && w.client_shut());
    exchange(&mut w);
    w.advance(Duration::from_secs(7 * 24 * 3600));
    assert!(!w.enc.closed && !w.dec.as_ref().unwrap().closed);
    // The stream is whole: the reply flows and both ends close cleanly.
    w.settle();
    w.check_settled();
    w.check_complete();
}

#[test]
fn with_the_idle_timeout_off_the_half_closed_one_still_applies() {
    let mut w = opened(Opts {
        limits: Limits {
            idle: None,
            half_closed: Some(Duration::from_secs(4)),
            handshake: Duration::from_secs(2),
            unopened: Duration::from_secs(60),
            lifetime: None,
        },
        ..Opts::default()
    });
    w.advance(Duration::from_secs(24 * 3600));
    assert!(!w.enc.closed, "open: no limit");
    assert!(w.client_write(100) && w.client_shut());
    exchange(&mut w);
    w.advance(Duration::from_millis(3_999));
    assert!(!w.enc.closed, "not yet");
    w.advance(Duration::from_millis(1));
    assert_eq!(w.enc.reason(), Some(CloseReason::IdleTimeout));
    w.settle();
    w.check_settled();
}

#[test]
fn a_handshake_that_never_completes_times_out() {
    let mut w = World::new(timeout_opts());
    // The decrypt side accepts, and nothing ever crosses the wire.
    assert!(w.establish());
    w.ready(0, Side::Upstream);
    w.advance(Duration::from_millis(1_999));
    assert!(!w.enc.closed && !w.dec.as_ref().unwrap().closed);
    w.advance(Duration::from_millis(1));
    for (n, reason) in [
        (&w.enc.env, w.enc.reason()),
        (
            &w.dec.as_ref().unwrap().env,
            w.dec.as_ref().unwrap().reason(),
        ),
    ] {
        assert!(n.recs.contains(&Rec::HandshakeTimeout));
        assert_eq!(reason, Some(CloseReason::HandshakeFailed));
    }
    w.settle();
    w.check_settled();
    assert!(w.backend.is_none() && w.client.reset);
}

#[test]
fn a_quiet_connection_hibernates_and_wakes_with_its_stream_intact() {
    let mut w = opened(Opts::default());
    assert!(w.client_write(500) && w.backend_write(500));
    exchange(&mut w);
    w.advance(Duration::from_millis(249));
    assert!(!w.enc.core.is_asleep(), "not before 250 ms");
    w.advance(Duration::from_millis(1));
    let d = w.dec.as_ref().unwrap();
    for (asleep, recs) in [
        (w.enc.core.is_asleep(), &w.enc.env.recs),
        (d.core.is_asleep(), &d.env.recs),
    ] {
        assert!(asleep);
        assert!(recs.contains(&Rec::Hibernated { dropped_keys: true }));
    }
    // The next bytes wake both sides, which rebuild their keys from the traffic secrets.
    assert!(w.client_write(500) && w.backend_write(500));
    exchange(&mut w);
    let d = w.dec.as_ref().unwrap();
    for (asleep, recs) in [
        (w.enc.core.is_asleep(), &w.enc.env.recs),
        (d.core.is_asleep(), &d.env.recs),
    ] {
        assert!(!asleep && recs.contains(&Rec::Woke));
    }
    // And they sleep again after another quiet spell.
    w.advance(Duration::from_millis(250));
    assert!(w.enc.core.is_asleep());
    w.settle();
    w.check_settled();
    w.check_complete();
}

#[test]
fn a_backend_that_stops_reading_stalls_the_client_within_the_memory_bound() {
    let mut w = opened(Opts {
        client_data: super::pair::pattern(4 << 20, 5),
        ..Opts::default()
    });
    let mut peak = 0;
    loop {
        let wrote = w.client_write(usize::MAX);
        w.net();
        peak = peak.max(w.buffered());
        w.check_always();
        if !wrote {
            break;
        }
    }
    assert!(w.client.sent < 4 << 20, "the client stalls");
    for recs in [&w.enc.env.recs, &w.dec.as_ref().unwrap().env.recs] {
        assert!(
            recs.contains(&Rec::FlowPaused(Flow::Upstream)),
            "both pause reading"
        );
    }
    // Filled to the far side's output mark, and no further than the bound allows.
    assert!(peak >= crate::proxy::OUTPUT_HIGH, "{peak}");
    // The backend reads again: everything arrives.
    w.settle();
    w.check_settled();
    w.check_complete();
}

#[test]
fn the_sealing_sides_read_plaintext_straight_into_their_records() {
    let big = 1 << 20;
    let mut w = opened(Opts {
        client_data: super::pair::pattern(big + 100, 9),
        backend_data: super::pair::pattern(big + 100, 10),
        ..Opts::default()
    });
    for (n, from_client) in [(100, true), (big, true), (100, false), (big, false)] {
        if from_client {
            assert!(w.client_write(n));
        } else {
            assert!(w.backend_write(n));
        }
        // Everything moves through, both peers reading.
        loop {
            w.net();
            let (c, b) = (w.client_read(), w.backend_read());
            if !c && !b {
                break;
            }
        }
    }
    // The plain side of each sealing core read its peer's bytes into the payload slots of
    // the records that carry them, sealed where they lie: none was staged in its input (from
    // where the sealer would have copied it into a record).
    assert_eq!(w.enc.env.input_peak[Side::Client as usize], 0, "encrypt");
    let dec = &w.dec.as_ref().unwrap().env;
    assert_eq!(dec.input_peak[Side::Upstream as usize], 0, "decrypt");
    // The other directions still stage what they opened (or read plain) in the input.
    assert!(w.enc.env.input_peak[Side::Upstream as usize] > 0);
    assert!(dec.input_peak[Side::Client as usize] > 0);
    w.settle();
    w.check_settled();
    w.check_complete();
}

/// The case a first attempt at reading into record slots hung on: reads that cut record
/// slots anywhere while the sealed side's output fills to its mark and drains again. A client
/// that sends a burst and waits for an answer gives no later edge (no more bytes, no FIN)
/// that would rescue bytes stranded on the way: once the network is quiet, the backend must
/// have every byte sent, whatever the pieces and the link sizes.
#[test]
fn partial_reads_into_record_slots_across_the_far_mark_never_strand_bytes() {
    // (bytes in all, link capacity, bytes per delivery to the encrypt side, burst)
    for (total, cap, piece, burst) in [
        (2 << 20, 1 << 20, usize::MAX, 600_000),
        (2 << 20, 300_000, 65_521, 100_000),
        (1 << 20, 270_000, 262_147, 1 << 20),
        (1 << 20, 65_536, 4093, 300_000),
        (20_000, 20_000, 1, 7_000),
    ] {
        let mut w = opened(Opts {
            cap,
            client_data: super::pair::pattern(total, 11),
            ..Opts::default()
        });
        while w.client.sent < total {
            let until = (w.client.sent + burst).min(total);
            while w.client.sent < until {
                // The burst goes out as the link takes it and arrives in pieces, each read
                // by the encrypt side as it comes.
                loop {
                    let wrote = w.client_write(until - w.client.sent);
                    let arrived = w.deliver(0, 0, piece);
                    if arrived {
                        w.ready(0, Side::Client);
                        w.check_always();
                    }
                    if !wrote && !arrived {
                        break;
                    }
                }
                // The rest of the network moves on; the backend reads.
                loop {
                    w.net();
                    if !w.backend_read() {
                        break;
                    }
                }
                w.check_always();
            }
            let got = w.backend.as_ref().map_or(0, |b| b.got.len());
            assert_eq!(
                got, w.client.sent,
                "bytes stranded on the way (links of {cap}, pieces of {piece}, bursts of {burst})"
            );
        }
        w.settle();
        w.check_settled();
        w.check_complete();
    }
}

// ---------------------------------------------------------------------------------------------
// max_lifetime

/// Limits with `max_lifetime` of `max` seconds and a grace of `grace` seconds.
fn with_lifetime(max: u64, grace: u64) -> Limits {
    Limits {
        lifetime: Some(Lifetime {
            max: Duration::from_secs(max),
            grace: Duration::from_secs(grace),
        }),
        ..Opts::default().limits
    }
}

/// An encrypt side with `max_lifetime` (the decrypt side has none), whose client sends 100
/// bytes and whose backend answers 200.
fn lifetime_opts(max: u64, grace: u64) -> Opts {
    Opts {
        limits: with_lifetime(max, grace),
        dec_limits: Some(Opts::default().limits),
        client_data: super::pair::pattern(4000, 11),
        backend_data: super::pair::pattern(4000, 12),
        ..Opts::default()
    }
}

/// A request of `n` bytes and its reply of `2n`, each read by its peer.
fn request_reply(w: &mut World, n: usize) {
    assert!(w.client_write(n));
    exchange(w);
    assert!(w.backend_write(2 * n));
    exchange(w);
}

/// The peers close their sides, as applications do on reading an end; the world settles.
fn peers_close(w: &mut World) {
    w.client_shut();
    w.backend_shut();
    w.settle();
    w.check_settled();
}

#[test]
fn max_lifetime_ends_a_quiet_connection_cleanly_both_ways() {
    let mut w = opened(lifetime_opts(60, 30));
    request_reply(&mut w, 100);
    w.advance(Duration::from_millis(59_999));
    exchange(&mut w);
    assert!(!w.client.eof && !w.backend.as_ref().unwrap().eof, "not yet");
    assert!(!w.enc.recorded(&Rec::LifetimeEnd { graceful: true }));
    w.advance(Duration::from_millis(1));
    assert!(w.enc.recorded(&Rec::LifetimeEnd { graceful: true }));
    exchange(&mut w);
    // The backend reads a clean end of stream, as from a client that is done...
    let b = w.backend.as_ref().unwrap();
    assert!(b.eof && !b.reset && !w.client.eof);
    // ...and closes, which the client reads as from a server closing an idle keep-alive
    // connection.
    assert!(w.backend_shut());
    exchange(&mut w);
    assert!(w.client.eof && !w.client.reset);
    let b = w.backend.as_ref().unwrap();
    assert_eq!((w.client.got.len(), b.got.len()), (200, 100));
    assert!(!w.enc.closed, "waiting for the client to close its side");
    peers_close(&mut w);
    w.check_complete();
    let d = w.dec.as_ref().unwrap();
    assert!(
        !d.env
            .recs
            .iter()
            .any(|r| matches!(r, Rec::LifetimeEnd { .. })),
        "the decrypt side has no max_lifetime: it only passed the end on"
    );
}

#[test]
fn the_decrypt_side_ends_its_connections_the_same_way() {
    let mut w = opened(Opts {
        limits: Opts::default().limits,
        dec_limits: Some(with_lifetime(60, 30)),
        ..lifetime_opts(60, 30)
    });
    request_reply(&mut w, 100);
    w.advance(Duration::from_secs(60));
    exchange(&mut w);
    let d = w.dec.as_ref().unwrap();
    assert!(d.recorded(&Rec::LifetimeEnd { graceful: true }));
    assert!(w.backend.as_ref().unwrap().eof);
    assert!(w.backend_shut());
    exchange(&mut w);
    assert!(w.client.eof);
    peers_close(&mut w);
    w.check_complete();
}

#[test]
fn a_busy_connection_ends_at_its_first_quiet_moment() {
    let mut w = opened(lifetime_opts(60, 30));
    // A request and its reply every 100 ms, from 55 s to 70 s: never 250 ms quiet.
    w.advance(Duration::from_secs(55));
    for _ in 0..150 {
        request_reply(&mut w, 10);
        w.advance(Duration::from_millis(100));
        assert!(!w.backend.as_ref().unwrap().eof, "busy: not ended");
    }
    // Quiet from now: it ends once HIBERNATE_AFTER has passed without activity.
    request_reply(&mut w, 10);
    w.advance(HIBERNATE_AFTER - Duration::from_millis(1));
    exchange(&mut w);
    assert!(
        !w.backend.as_ref().unwrap().eof,
        "not quiet long enough yet"
    );
    w.advance(Duration::from_millis(1));
    exchange(&mut w);
    assert!(w.enc.recorded(&Rec::LifetimeEnd { graceful: true }));
    assert!(w.backend.as_ref().unwrap().eof);
    peers_close(&mut w);
    w.check_complete();
}

#[test]
fn bytes_on_their_way_to_the_client_at_the_end_still_reach_it() {
    let mut w = opened(lifetime_opts(60, 30));
    request_reply(&mut w, 100);
    w.advance(Duration::from_secs(59));
    // The backend pushes bytes nobody asked for; the decrypt side seals them, and they are
    // on the wire when the encrypt side's quiet moment comes.
    assert!(w.backend_write(300));
    w.deliver(2, 1, usize::MAX);
    w.ready(1, Side::Upstream);
    assert!(!w.wire_in_flight(1).is_empty());
    w.advance(Duration::from_secs(1));
    assert!(w.enc.recorded(&Rec::LifetimeEnd { graceful: true }));
    exchange(&mut w);
    assert_eq!(w.client.got.len(), 500, "the pushed bytes arrived");
    assert!(w.backend_shut());
    exchange(&mut w);
    assert!(w.client.eof && !w.client.reset);
    peers_close(&mut w);
    w.check_complete();
}

#[test]
fn a_request_without_its_reply_holds_the_end_until_the_reply() {
    let mut w = opened(lifetime_opts(60, 60));
    w.advance(Duration::from_secs(59));
    // A slow request: the backend answers 41 s later, well after max_lifetime.
    assert!(w.client_write(100));
    exchange(&mut w);
    w.advance(Duration::from_secs(41));
    exchange(&mut w);
    assert!(
        !w.backend.as_ref().unwrap().eof,
        "a request is outstanding: no end before its reply"
    );
    assert!(w.backend_write(200));
    exchange(&mut w);
    w.advance(HIBERNATE_AFTER);
    exchange(&mut w);
    assert!(w.enc.recorded(&Rec::LifetimeEnd { graceful: true }));
    assert!(w.backend.as_ref().unwrap().eof && w.client.got.len() == 200);
    peers_close(&mut w);
    w.check_complete();
}

#[test]
fn a_connection_never_quiet_is_reset_at_the_grace_cap() {
    let mut w = opened(lifetime_opts(60, 10));
    w.advance(Duration::from_secs(59));
    // Traffic every 100 ms, for longer than max_lifetime + grace.
    while !w.enc.closed {
        request_reply(&mut w, 1);
        w.advance(Duration::from_millis(100));
        assert!(w.now - w.started <= Duration::from_secs(70), "past the cap");
    }
    assert_eq!(w.now - w.started, Duration::from_secs(70));
    assert_eq!(w.enc.reason(), Some(CloseReason::MaxLifetime));
    assert!(w.enc.recorded(&Rec::LifetimeEnd { graceful: false }));
    w.settle();
    w.check_settled();
    // Never a truncated stream that looks complete: both plaintext peers see an error.
    assert!(w.client.reset && w.backend.as_ref().unwrap().reset);
}

#[test]
fn each_connection_draws_its_own_jitter_within_ten_percent() {
    for (jitter, at) in [(100, 66_000), (-100, 54_000), (25, 61_500), (127, 66_000)] {
        let mut w = opened(Opts {
            jitter: [jitter, 0],
            ..lifetime_opts(60, 30)
        });
        request_reply(&mut w, 10);
        w.advance(Duration::from_millis(at - 1));
        assert!(
            !w.enc.recorded(&Rec::LifetimeEnd { graceful: true }),
            "{jitter}"
        );
        w.advance(Duration::from_millis(1));
        assert!(
            w.enc.recorded(&Rec::LifetimeEnd { graceful: true }),
            "{jitter}"
        );
    }
}

#[test]
fn bytes_after_the_lifetime_end_reset_their_sender() {
    let mut w = opened(lifetime_opts(60, 30));
    request_reply(&mut w, 100);
    w.advance(Duration::from_secs(60));
    // The client sends a request that crossed the end on the wire: it cannot be carried (the
    // decrypt side was told the stream ended), so the client gets an error, not silence.
    assert!(w.client_write(50));
    exchange(&mut w);
    assert_eq!(w.enc.reason(), Some(CloseReason::MaxLifetime));
    w.settle();
    w.check_settled();
    assert!(w.client.reset);
    let b = w.backend.as_ref().unwrap();
    assert_eq!(
        b.got.len(),
        100,
        "none of the late bytes reached the backend"
    );
    assert_eq!(w.client.got.len(), 200, "the reply had arrived before");
}

#[test]
fn bytes_that_cross_a_decrypt_side_end_reset_the_client_through_the_pair() {
    let mut w = opened(Opts {
        limits: Opts::default().limits,
        dec_limits: Some(with_lifetime(60, 30)),
        ..lifetime_opts(60, 30)
    });
    request_reply(&mut w, 100);
    w.advance(Duration::from_secs(60));
    exchange(&mut w);
    assert!(w.backend.as_ref().unwrap().eof, "the backend was told");
    // Before the backend closes, the client sends another request: the decrypt side cannot
    // carry it, and tells the encrypt side (ABORT), which resets the client.
    assert!(w.client_write(50));
    exchange(&mut w);
    let d = w.dec.as_ref().unwrap();
    assert_eq!(d.reason(), Some(CloseReason::MaxLifetime));
    w.settle();
    w.check_settled();
    assert!(
        w.client.reset,
        "the client learns its bytes were not carried"
    );
    assert_eq!(w.backend.as_ref().unwrap().got.len(), 100);
}

#[test]
fn a_peer_that_never_closes_after_the_end_is_reset_after_the_grace() {
    let mut w = opened(lifetime_opts(60, 30));
    request_reply(&mut w, 100);
    w.advance(Duration::from_secs(60));
    exchange(&mut w);
    assert!(w.backend.as_ref().unwrap().eof);
    // Neither peer closes its side.
    w.advance(Duration::from_millis(29_999));
    assert!(!w.enc.closed);
    w.advance(Duration::from_millis(1));
    assert_eq!(w.enc.reason(), Some(CloseReason::MaxLifetime));
}

#[test]
fn a_reload_moves_the_lifetime_of_open_connections() {
    // Shortened: the open connection ends at the new limit.
    let mut w = opened(lifetime_opts(3600, 30));
    request_reply(&mut w, 10);
    w.advance(Duration::from_secs(10));
    w.set_limits(with_lifetime(60, 30));
    w.advance(Duration::from_millis(49_999));
    assert!(!w.enc.recorded(&Rec::LifetimeEnd { graceful: true }));
    w.advance(Duration::from_millis(1));
    assert!(w.enc.recorded(&Rec::LifetimeEnd { graceful: true }));
    // Shortened below its age: it ends at once.
    let mut w = opened(lifetime_opts(3600, 30));
    request_reply(&mut w, 10);
    w.advance(Duration::from_secs(100));
    w.set_limits(with_lifetime(60, 30));
    exchange(&mut w);
    assert!(w.backend.as_ref().unwrap().eof);
    // Lengthened, or turned off: it lives on.
    for later in [Some(3600), None] {
        let mut w = opened(lifetime_opts(60, 30));
        request_reply(&mut w, 10);
        w.advance(Duration::from_secs(30));
        w.set_limits(match later {
            Some(s) => with_lifetime(s, 30),
            None => Opts::default().limits,
        });
        w.advance(Duration::from_secs(600));
        exchange(&mut w);
        assert!(
            !w.backend.as_ref().unwrap().eof && !w.enc.closed,
            "{later:?}"
        );
        assert_eq!(
            w.enc.env.timer(ConnTimer::Lifetime).is_some(),
            later.is_some()
        );
    }
}

mod schedules {
    //! The property test: random schedules of deliveries (any sizes), readiness in any order,
    //! connects answered or not, peers writing, reading, half-closing and resetting, time
    //! passing, bits flipped on the wire, the wire cut, drains. After every step the memory
    //! bound and the order of bytes hold; once the world settles every connection ended with
    //! nothing left behind, a clean end of stream only ever follows the whole stream,
    //! tampering reset both sides of the core that found it, and a schedule with no fault and
    //! no limit reached delivered everything both ways and closed cleanly.

    use std::time::Duration;

    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::super::core::{Lifetime, Limits};
    use super::super::pair::{Kind, Opts, Step, World, pattern};
    use super::CLIENT_HEADER;
    use crate::protocol::{AeadKind, ForwardSecrecy};

    /// Schedules per `cargo test` run (CI runs them all).
    const CASES: u32 = 10_000;

    fn fault() -> impl Strategy<Value = Step> {
        prop_oneof![
            Just(Step::ClientReset),
            Just(Step::BackendReset),
            (0u8..2, any::<u16>()).prop_map(|(dir, at)| Step::Tamper { dir, at }),
            Just(Step::Cut),
            (0u8..2).prop_map(|node| Step::Drain { node }),
        ]
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            10 => (0u8..4, 0u8..2, prop_oneof![1u16..64, 64u16..4096, Just(u16::MAX)])
                .prop_map(|(link, dir, max)| Step::Deliver { link, dir, max }),
            10 => (0u8..2, 0u8..2).prop_map(|(node, side)| Step::Ready { node, side }),
            3 => Just(Step::Establish),
            4 => (1u32..3000).prop_map(Step::ClientWrite),
            3 => Just(Step::ClientRead),
            1 => Just(Step::ClientShut),
            4 => (1u32..3000).prop_map(Step::BackendWrite),
            3 => Just(Step::BackendRead),
            1 => Just(Step::BackendShut),
            2 => prop_oneof![0u16..300, 300u16..1500].prop_map(Step::Advance),
            1 => fault(),
        ]
    }

    fn opts() -> impl Strategy<Value = Opts> {
        let enc = prop_oneof![
            Just(vec![Kind::Decrypt]),
            Just(vec![Kind::Refused, Kind::Decrypt]),
            Just(vec![Kind::Blackhole, Kind::Decrypt]),
            Just(vec![Kind::Refused, Kind::Blackhole, Kind::Decrypt]),
        ];
        let dec = prop_oneof![
            Just(vec![Kind::Backend]),
            Just(vec![Kind::Refused, Kind::Backend])
        ];
        let secrecy = prop_oneof![
            3 => Just(ForwardSecrecy::Off),
            1 => Just(ForwardSecrecy::Require)
        ];
        let aead = prop_oneof![Just(AeadKind::Ring), Just(AeadKind::RustCrypto)];
        (
            (enc, dec, any::<bool>(), 500u64..3000),
            (secrecy, aead, proptest::option::of(1u64..5), any::<bool>()),
            (512usize..65536, 0usize..6000, 0usize..6000, any::<bool>()),
            // max_lifetime on a third of the schedules: seconds, grace, each node's jitter.
            (
                prop_oneof![2 => Just(None), 1 => (1u64..6, 0u64..3).prop_map(Some)],
                any::<i8>(),
                any::<i8>(),
            ),
        )
            .prop_map(
                |(
                    (enc, dec, short, connect_ms),
                    (fs, aead, key_update, accept_proxy),
                    (cap, up, down, pre),
                    (lifetime, enc_jitter, dec_jitter),
                )| {
                    let mut limits = if short {
                        Limits {
                            idle: Some(Duration::from_secs(2)),
                            half_closed: Some(Duration::from_secs(1)),
                            handshake: Duration::from_secs(1),
                            unopened: Duration::from_secs(60),
                            lifetime: None,
                        }
                    } else {
                        Opts::default().limits
                    };
                    limits.lifetime = lifetime.map(|(max, grace)| Lifetime {
                        max: Duration::from_secs(max),
                        grace: Duration::from_secs(grace),
                    });
                    Opts {
                        enc_targets: enc,
                        dec_targets: dec,
                        limits,
                        dec_limits: None,
                        jitter: [enc_jitter, dec_jitter],
                        connect_timeout: Duration::from_millis(connect_ms),
                        fs,
                        aead,
                        key_update,
                        cap,
                        client_data: pattern(up, 1),
                        backend_data: pattern(down, 2),
                        preamble: if pre {
                            b"PROXY\r\n".to_vec()
                        } else {
                            Vec::new()
                        },
                        client_header: if accept_proxy {
                            CLIENT_HEADER.to_vec()
                        } else {
                            Vec::new()
                        },
                        ..Opts::default()
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: CASES,
            max_shrink_iters: 20_000,
            // The default (ChaCha) costs more than the schedules themselves in a debug build.
            rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
            .. ProptestConfig::default()
        })]

        #[test]
        fn random_schedules_keep_the_invariants(
            opts in opts(),
            opened in any::<bool>(),
            steps in vec(step(), 0..48),
        ) {
            // Long limits and no max_lifetime: nothing but a fault ends the connection early.
            let long =
                opts.limits.idle > Some(Duration::from_secs(60)) && opts.limits.lifetime.is_none();
            let mut w = World::new(opts);
            if opened {
                // Half the schedules start with the session open and the backend connected,
                // so their faults land mid-stream rather than in the handshake.
                w.net();
            }
            for s in &steps {
                w.apply(s);
                w.check_always();
            }
            w.settle();
            w.check_settled();
            if w.faults == 0 && long && !w.live_connect_timed_out() && !w.client_header_cut() {
                w.check_complete();
            }
        }
    }

    fn warm_step() -> impl Strategy<Value = Step> {
        prop_oneof![
            8 => step(),
            1 => Just(Step::DrainStart),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: CASES / 4,
            max_shrink_iters: 20_000,
            rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
            .. ProptestConfig::default()
        })]

        /// Warm sessions: the session is made, then some of the schedule runs before the
        /// client is accepted and takes it (if it is still there), the rest after; the
        /// decrypt side may start to drain at any point, racing the OPEN.
        #[test]
        fn random_schedules_on_warm_sessions_keep_the_invariants(
            opts in opts(),
            before in vec(warm_step(), 0..8),
            steps in vec(warm_step(), 0..40),
        ) {
            let opts = Opts { enc_targets: vec![Kind::Decrypt], client_header: Vec::new(), ..opts };
            // As for other schedules: long limits and no max_lifetime (which `opts` sets on a
            // third of them: it ends adopted sessions too), or only the invariants are checked.
            let long = opts.limits.idle > Some(Duration::from_secs(60))
                && opts.limits.lifetime.is_none();
            let mut w = World::warm(opts);
            w.net();
            for s in &before {
                w.apply(s);
                w.check_always();
            }
            let adopted = w.warm.as_ref().is_some_and(|x| x.core.is_ready());
            if adopted {
                w.adopt();
            }
            for s in &steps {
                w.apply(s);
                w.check_always();
            }
            w.settle();
            w.check_settled();
            if adopted && w.faults == 0 && long && !w.live_connect_timed_out() {
                w.check_complete();
            }
        }
    }

    /// Bulk schedules: megabytes each way, peers that write far more than the far side reads
    /// for a while, to hold the memory bound against every interleaving of backpressure.
    fn bulk_step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (1u32..1 << 20).prop_map(Step::ClientWrite),
            4 => (1u32..1 << 20).prop_map(Step::BackendWrite),
            4 => Just(Step::Net),
            2 => any::<bool>().prop_map(|client| Step::Flood { client }),
            2 => (0u8..4, 0u8..2, any::<u16>())
                .prop_map(|(link, dir, max)| Step::Deliver { link, dir, max }),
            2 => (0u8..2, 0u8..2).prop_map(|(node, side)| Step::Ready { node, side }),
            2 => Just(Step::ClientRead),
            2 => Just(Step::BackendRead),
            1 => (0u16..400).prop_map(Step::Advance),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 16,
            rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
            .. ProptestConfig::default()
        })]

        #[test]
        fn bulk_schedules_stay_within_the_memory_bound(
            up in (1usize << 20)..(3 << 20),
            down in (1usize << 20)..(3 << 20),
            cap in 4096usize..262_144,
            steps in vec(bulk_step(), 8..32),
        ) {
            let mut w = World::new(Opts {
                fs: ForwardSecrecy::Off,
                cap,
                client_data: pattern(up, 7),
                backend_data: pattern(down, 8),
                ..Opts::default()
            });
            for s in &steps {
                w.apply(s);
                w.check_always();
            }
            w.settle();
            w.check_settled();
            w.check_complete();
        }
    }
}

/// What an idle connection costs beyond its buffers (which hold no chunks when empty):
/// the handler in the loop's slab, and the upstream side's box. Bounds are the sizes before
/// the connection core was split out (debug build; a release build's are smaller), so the
/// split cannot have grown a connection, plus the 8 bytes the failover state (`Tried`) gained
/// since, on main, for targets by name (`last_group`), which every connection holds split or
/// not. (The identity box main added to its unsplit `Conn` fits within the old bounds here.)
/// Then, one feature each:
/// - `MOVING`: the live upgrade's `Moving` state is one byte, which costs every `Conn` one
///   more 8-byte word of alignment (the upstream side's box is unchanged);
/// - `REPLAY`: warm sessions' replay box (`Option<Box<Replay>>`: `None` but for an adopted
///   session until its decrypt side answered);
/// - `FLAGS`: warm sessions' `unopened` flag and `max_lifetime`'s state (two bytes) each fit
///   in the padding beside the connection core's one-byte flags on its own, together they do
///   not: one more word;
/// - `RATE`: the read allowance each stream core carries for rate limits (a `u32` the core's
///   flags leave no room for);
/// - `STREAM`: the kind of a socket's stream (TCP or Unix): nothing in a release build, where
///   a stream is its descriptor and the enum's tag fits the padding, 8 in a debug build, where
///   mio adds a selector id to each stream.
///
/// Free: `max_lifetime`'s timer (it shares the handshake's slot), the stream core's small-reads
/// flag (sealing in place) and the socket's detached flag (live upgrade), which fit in
/// padding. With all of them, a debug build's sizes are exactly the bounds: encrypt 472 and
/// 368, decrypt 568 and 272, forward 472 and 272.
#[test]
fn a_connection_costs_no_more_than_before_the_core_split() {
    /// What the live upgrade's `Moving` state costs a `Conn` (see above).
    const MOVING: usize = 8;
    /// What warm sessions' replay box costs a `Conn` (see above).
    const REPLAY: usize = 8;
    /// Warm sessions' `unopened` flag and `max_lifetime`'s two bytes each fit in the padding
    /// after the connection core's one-byte flags alone; together they pass into a new word.
    const FLAGS: usize = 8;
    /// What a stream core's read allowance costs it (a `u32`, aligned).
    const RATE: usize = 8;
    /// What the stream's kind costs a socket (see above).
    const STREAM: usize = if cfg!(debug_assertions) { 8 } else { 0 };
    let sizes = [
        (
            "encrypt",
            size_of::<Conn<NoFilter, SealFilter>>(),
            size_of::<BufferEvent<SealFilter>>(),
            (
                424 + 8 + MOVING + REPLAY + FLAGS + RATE + STREAM,
                352 + RATE + STREAM,
            ),
        ),
        (
            "decrypt",
            size_of::<Conn<SealFilter, NoFilter>>(),
            size_of::<BufferEvent<NoFilter>>(),
            (
                520 + 8 + MOVING + REPLAY + FLAGS + RATE + STREAM,
                256 + RATE + STREAM,
            ),
        ),
        (
            "forward",
            size_of::<Conn<NoFilter, NoFilter>>(),
            size_of::<BufferEvent<NoFilter>>(),
            (
                424 + 8 + MOVING + REPLAY + FLAGS + RATE + STREAM,
                256 + RATE + STREAM,
            ),
        ),
    ];
    for (mode, conn, upstream, (conn_max, upstream_max)) in sizes {
        println!("{mode}: Conn {conn} bytes, upstream side {upstream} bytes");
        assert!(
            conn <= conn_max && upstream <= upstream_max,
            "{mode}: Conn {conn} (was {conn_max}), upstream {upstream} (was {upstream_max})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Warm sessions (docs/PROTOCOL.md, "Warm sessions")

use super::core::{UnopenedEnd, WarmStep};
use super::warm::WarmEnd;

/// A warm world whose warm session is ready (handshaken, held), the decrypt side holding it.
fn warm_ready(opts: Opts) -> World {
    let mut w = World::warm(opts);
    w.net();
    let warm = w.warm.as_ref().unwrap();
    assert!(warm.core.is_ready(), "the warm session is ready");
    assert!(warm.env.recs.contains(&Rec::WarmReady));
    w
}

#[test]
fn a_warm_session_is_handshaken_and_held_without_an_open() {
    let w = warm_ready(Opts::default());
    let dec = w.dec.as_ref().unwrap();
    assert!(dec.recorded(&Rec::HandshakeOk {
        forward_secrecy: true
    }));
    assert!(dec.recorded(&Rec::Warm(WarmStep::Held)));
    assert!(dec.core.is_unopened());
    assert!(!dec.recorded(&Rec::SessionOpened), "no OPEN yet");
    assert!(w.backend.is_none(), "and no backend");
    assert!(w.wire_in_flight(0).is_empty() && w.wire_in_flight(1).is_empty());
    // Held and quiet, it hibernates like any session (its keys go until its OPEN).
    let mut w = w;
    w.advance(HIBERNATE_AFTER * 2);
    assert!(w.dec.as_ref().unwrap().core.is_asleep());
}

#[test]
fn a_client_taking_a_warm_session_sends_open_and_its_first_bytes_in_one_write() {
    let mut w = warm_ready(Opts::default());
    // The client connected and sent its request before it was accepted.
    assert!(w.client_write(100));
    w.deliver(0, 0, usize::MAX);
    w.adopt();
    assert!(
        w.wire_in_flight(0).is_empty(),
        "nothing before the client's first event"
    );
    assert!(w.ready(0, Side::Client));
    // One dispatch, one write: the OPEN, then the request, nothing else.
    let recs = records(&w.wire_in_flight(0));
    assert_eq!(
        recs.iter().map(|r| r.1).collect::<Vec<_>>(),
        [0x05, 0x01],
        "OPEN and DATA"
    );
    assert_eq!(recs[1].0, 100 + 19);
    w.settle();
    w.check_settled();
    w.check_complete();
    let dec = w.dec.as_ref().unwrap();
    assert!(dec.recorded(&Rec::Warm(WarmStep::Opened)));
    assert_eq!(
        dec.env.opened,
        Some(crate::protocol::OpenInfo::from_socket(
            "192.0.2.10:5555".parse().unwrap(),
            "192.0.2.1:80".parse().unwrap(),
        ))
    );
}

/// Runs a world as two sites joined by a wide-area link: the client and the encrypt side at
/// one, the decrypt side and the backend at the other; crossing the link takes `one_way`,
/// everything else no time. The client has sent its request; returns how long until it has
/// the first byte of the answer (the backend answers as soon as it has the whole request).
fn first_byte_across(w: &mut World, one_way: Duration) -> Duration {
    let start = w.now;
    let request = w.client.sent;
    for _ in 0..1000 {
        // Everything local, until nothing moves.
        loop {
            let mut progress = w.establish_from(1);
            progress |= w.deliver_local();
            progress |= w.ready_all();
            progress |= w.client_read() | w.backend_read();
            if w.backend
                .as_ref()
                .is_some_and(|b| b.got.len() >= request && b.sent == 0)
            {
                progress |= w.backend_write(usize::MAX);
            }
            if !progress {
                break;
            }
        }
        if !w.client.got.is_empty() {
            return w.now - start;
        }
        // Across the link: a connect to the decrypt side takes a round trip (its SYN and
        // SYN-ACK; the ACK travels with the first bytes), bytes one way.
        let at = w.now + one_way;
        if w.establish_from(0) {
            w.advance(2 * one_way);
        } else {
            assert!(w.deliver_wire() || w.wire_in_flight(0).is_empty(), "stuck");
            w.advance(at - w.now);
        }
    }
    panic!("no answer");
}

#[test]
fn across_a_wan_a_warm_session_answers_in_one_round_trip_and_a_cold_one_in_three() {
    let one_way = Duration::from_millis(10);
    let rtt = 2 * one_way;
    // Warm: the session was made ahead of the client.
    let mut w = warm_ready(Opts::default());
    assert!(w.client_write(100));
    w.adopt();
    let warm = first_byte_across(&mut w, one_way);
    // Cold (today's path): connect, HelloI -> HelloR, Finished + OPEN + request, answer.
    let mut w = World::new(Opts::default());
    assert!(w.client_write(100));
    let cold = first_byte_across(&mut w, one_way);
    assert_eq!((warm, cold), (rtt, 3 * rtt), "round trips: warm, cold");
}

#[test]
fn a_server_first_protocol_gets_its_open_without_any_client_bytes() {
    let mut w = warm_ready(Opts::default());
    w.adopt();
    assert!(w.ready(0, Side::Client));
    let recs = records(&w.wire_in_flight(0));
    assert_eq!(
        recs.iter().map(|r| r.1).collect::<Vec<_>>(),
        [0x05],
        "OPEN alone"
    );
    w.net();
    // The backend is connected and speaks first; the client gets it.
    assert!(w.backend_write(50));
    w.net();
    assert!(w.client_read());
    assert_eq!(w.client.got.len(), 50);
    w.settle();
    w.check_settled();
    w.check_complete();
}

#[test]
fn a_refreshed_warm_session_ends_unused_and_the_decrypt_side_forgets_it() {
    let refresh = Duration::from_secs(20);
    let mut w = warm_ready(Opts {
        warm_refresh: refresh,
        ..Opts::default()
    });
    w.advance(refresh);
    let warm = w.warm.as_ref().unwrap();
    assert!(warm.env.recs.contains(&Rec::WarmClosed(WarmEnd::Retired)));
    assert_eq!(
        records(&w.wire_in_flight(0))
            .iter()
            .map(|r| r.1)
            .collect::<Vec<_>>(),
        [0x02],
        "END before OPEN"
    );
    w.settle();
    w.check_settled();
    let dec = w.dec.as_ref().unwrap();
    assert!(dec.recorded(&Rec::Warm(WarmStep::Closed(UnopenedEnd::Unused))));
    assert_eq!(dec.reason(), Some(CloseReason::Unopened));
    assert!(w.wire_in_flight(1).is_empty(), "nothing said back");
    assert!(w.backend.is_none());
}

#[test]
fn the_decrypt_side_closes_a_held_session_at_its_limit_drain_or_cap_with_abort_unopened() {
    let limits = Limits {
        unopened: Duration::from_secs(5),
        ..Opts::default().limits
    };
    for how in ["limit", "drain", "drain deadline", "cap"] {
        let mut w = World::warm(Opts {
            limits,
            warm_refresh: Duration::from_secs(60),
            ..Opts::default()
        });
        if how == "cap" {
            w.refuse_unopened();
        }
        w.net();
        match how {
            "limit" => w.advance(Duration::from_secs(5)),
            "drain" => assert!(w.drain_started()),
            "drain deadline" => assert!(w.drain(1)),
            _ => {}
        }
        w.settle();
        w.check_settled();
        let end = match how {
            "limit" => UnopenedEnd::Expired,
            "cap" => UnopenedEnd::OverCap,
            _ => UnopenedEnd::Shutdown,
        };
        let dec = w.dec.as_ref().unwrap();
        assert!(dec.recorded(&Rec::Warm(WarmStep::Closed(end))), "{how}");
        assert_eq!(dec.reason(), Some(CloseReason::Unopened), "{how}");
        // The encrypt side learns it in an authenticated ABORT and never uses the session.
        let warm = w.warm.as_ref().unwrap();
        assert!(warm.env.recs.contains(&Rec::WarmEnded("unopened")), "{how}");
        assert!(
            warm.env.recs.contains(&Rec::WarmClosed(WarmEnd::Lost)),
            "{how}"
        );
        assert!(w.backend.is_none(), "{how}");
    }
}

#[test]
fn a_decline_racing_the_open_sends_the_clients_bytes_again_on_a_fresh_session_once() {
    let mut w = warm_ready(Opts::default());
    assert!(w.client_write(1000));
    w.deliver(0, 0, usize::MAX);
    w.adopt();
    assert!(w.ready(0, Side::Client));
    assert!(
        !w.wire_in_flight(0).is_empty(),
        "OPEN and the request are on their way"
    );
    // Meanwhile the decrypt side began to drain: it declines the session before reading it.
    assert!(w.drain_started());
    w.settle();
    w.check_settled();
    assert!(w.enc.recorded(&Rec::Warm(WarmStep::Retried)));
    let old = w.dec_old.as_ref().expect("the first decrypt node");
    assert!(old.recorded(&Rec::Warm(WarmStep::Closed(UnopenedEnd::Shutdown))));
    assert!(
        !old.recorded(&Rec::SessionOpened),
        "the declined OPEN was never acted on"
    );
    // The fresh session carried the request, once, in order; the exchange completed.
    w.check_complete();
    let b = w.backend.as_ref().unwrap();
    assert_eq!(b.got, w.client.data);
}

/// What a client sends after its OPEN left, while the session may still be declined, is kept
/// for the replay as its first bytes are: such a read is never relayed straight into sealed
/// records (sealing in place, issue 20), which would send it with no copy kept, lost to a
/// decline.
#[test]
fn bytes_sent_after_the_open_are_kept_for_a_decline_too() {
    let mut w = warm_ready(Opts::default());
    assert!(w.client_write(10));
    w.deliver(0, 0, usize::MAX);
    w.adopt();
    assert!(w.ready(0, Side::Client), "OPEN and the first bytes go");
    assert!(w.client_write(usize::MAX));
    w.deliver(0, 0, usize::MAX);
    assert!(w.ready(0, Side::Client), "the rest is read");
    assert!(w.enc.core.replayable(), "nothing came back yet");
    assert!(w.drain_started());
    w.settle();
    w.check_settled();
    assert!(w.enc.recorded(&Rec::Warm(WarmStep::Retried)));
    w.check_complete();
    assert_eq!(
        w.backend.as_ref().unwrap().got,
        w.client.data,
        "all of it, once"
    );
}

#[test]
fn an_open_that_was_acted_on_is_never_sent_again() {
    let mut w = warm_ready(Opts::default());
    assert!(w.client_write(1000));
    w.deliver(0, 0, usize::MAX);
    w.adopt();
    w.net();
    // The decrypt side opened the session and handed the request to its backend; then its
    // drain deadline passes before the backend answers (ABORT shutdown, not unopened).
    assert_eq!(w.backend.as_ref().unwrap().got.len(), 0);
    assert!(w.backend_read());
    assert_eq!(w.backend.as_ref().unwrap().got.len(), 1000);
    assert!(w.enc.core.replayable(), "nothing came back yet");
    assert!(w.drain(1));
    w.settle();
    w.check_settled();
    assert!(!w.enc.recorded(&Rec::Warm(WarmStep::Retried)));
    assert!(w.dec_old.is_none(), "no second session");
    assert!(
        w.client.reset,
        "the client is reset, as for any aborted connection"
    );
    assert_eq!(
        w.backend.as_ref().unwrap().got.len(),
        1000,
        "delivered once"
    );
}

#[test]
fn a_warm_session_whose_decrypt_host_vanished_resets_the_client_and_sends_nothing_twice() {
    let mut w = warm_ready(Opts::default());
    assert!(w.client_write(1000));
    w.deliver(0, 0, usize::MAX);
    w.adopt();
    assert!(w.decrypt_vanishes());
    w.settle();
    w.check_settled();
    assert_eq!(w.enc.reason(), Some(CloseReason::PeerTimeout));
    assert!(
        w.client.reset,
        "reset, as a connect to a dead host would end"
    );
    assert!(!w.enc.recorded(&Rec::Warm(WarmStep::Retried)));
    assert!(w.backend.is_none());
}

#[test]
fn an_adopted_session_is_ordinary_once_answered_or_after_its_grace() {
    // Answered: the first record back ends the replay and restores the socket's settings.
    let mut w = warm_ready(Opts::default());
    assert!(w.client_write(10));
    w.adopt();
    w.net();
    assert!(w.enc.core.replayable());
    assert!(w.backend_read() && w.backend_write(10));
    w.net();
    assert!(!w.enc.core.replayable());
    assert!(w.enc.recorded(&Rec::Confirmed));
    // Unanswered: after twice the handshake timeout, the same.
    let mut w = warm_ready(Opts {
        limits: Limits {
            handshake: Duration::from_secs(2),
            ..Opts::default().limits
        },
        ..Opts::default()
    });
    assert!(w.client_write(10));
    w.adopt();
    w.net();
    assert!(w.enc.core.replayable());
    w.advance(Duration::from_secs(4));
    assert!(!w.enc.core.replayable());
    assert!(w.enc.recorded(&Rec::Confirmed));
    // More than REPLAY_MAX unanswered: not replayable (a decline then resets the client).
    let mut w = warm_ready(Opts {
        client_data: super::pair::pattern(super::core::REPLAY_MAX + 1, 5),
        cap: 1 << 20,
        ..Opts::default()
    });
    assert!(w.client_write(usize::MAX));
    w.deliver(0, 0, usize::MAX);
    w.adopt();
    assert!(w.ready(0, Side::Client));
    assert!(!w.enc.core.replayable());
}

/// An adopted session keeps the client's bytes for a replay only up to `REPLAY_MAX`; past it
/// a decline resets the client (the session is not replayable), so nothing is left to keep and
/// the client's reads go straight into records again (sealing in place). An upload through a
/// warm session (iperf3, a backup) gets no answer to confirm its session before the grace
/// ends, and every byte of its first 10 seconds used to be staged and copied into records.
#[test]
fn an_adopted_session_past_its_replay_limit_reads_into_records_again() {
    let total = 4 * super::core::REPLAY_MAX;
    let mut w = warm_ready(Opts {
        client_data: super::pair::pattern(total, 12),
        cap: 1 << 20,
        ..Opts::default()
    });
    assert!(w.client_write(10));
    w.deliver(0, 0, usize::MAX);
    w.adopt();
    assert!(w.ready(0, Side::Client), "OPEN and the first bytes go");
    while w.enc.core.replayable() {
        assert!(w.client_write(16 * 1024), "the client sends on, unanswered");
        w.net();
        w.backend_read();
    }
    w.enc.env.input_peak = [0; 2];
    while w.client.sent < total {
        assert!(w.client_write(16 * 1024));
        w.net();
        w.backend_read();
    }
    loop {
        w.net();
        if !w.backend_read() {
            break;
        }
    }
    assert!(
        !w.enc.recorded(&Rec::Confirmed),
        "nothing came back: still in its grace"
    );
    assert_eq!(
        w.enc.env.input_peak[Side::Client as usize],
        0,
        "past the replay limit, reads go into records: none staged in the input"
    );
    assert_eq!(
        w.backend.as_ref().unwrap().got,
        w.client.data,
        "all of it, once, in order"
    );
    w.settle();
    w.check_settled();
    w.check_complete();
}

#[test]
fn an_adopted_session_whose_client_fails_before_its_open_ends_unused() {
    // A client reset, and a load balancer's PROXY header that is refused: no OPEN ever goes,
    // and the decrypt side learns the session ended unused (END before OPEN), not lost.
    for bad_header in [false, true] {
        let opts = if bad_header {
            Opts {
                client_header: b"PROXY BOGUS\r\n".to_vec(),
                ..Opts::default()
            }
        } else {
            Opts::default()
        };
        let mut w = warm_ready(opts);
        w.adopt();
        if bad_header {
            assert!(w.client_write(usize::MAX));
        } else {
            assert!(w.client_reset());
        }
        w.settle();
        w.check_settled();
        let want = if bad_header {
            CloseReason::ProxyHeader
        } else {
            CloseReason::PeerReset
        };
        assert_eq!(w.enc.reason(), Some(want));
        let dec = w.dec.as_ref().unwrap();
        assert!(
            dec.recorded(&Rec::Warm(WarmStep::Closed(UnopenedEnd::Unused))),
            "bad header {bad_header}: {:?}",
            dec.env.recs
        );
        assert!(!dec.recorded(&Rec::SessionOpened));
        assert!(w.backend.is_none());
    }
}

// ---------------------------------------------------------------------------------------------
// Warm sessions and max_lifetime

/// Limits with `max_lifetime` of 60 s (grace 30 s), or none, where a warm session may wait an
/// hour for its client.
fn held_long(lifetime: bool) -> Limits {
    let limits = if lifetime {
        with_lifetime(60, 30)
    } else {
        Opts::default().limits
    };
    Limits {
        unopened: Duration::from_secs(3600),
        ..limits
    }
}

/// A warm world whose session waited 50 s for its client (`enc` and `dec`: whether each side
/// has `max_lifetime`), then the client came, sent a request and had its reply. Returns the
/// world and when the client was adopted.
fn adopted_after_50s(enc: bool, dec: bool) -> (World, std::time::Instant) {
    let mut w = warm_ready(Opts {
        limits: held_long(enc),
        dec_limits: Some(held_long(dec)),
        warm_refresh: Duration::from_secs(3600),
        client_data: super::pair::pattern(4000, 11),
        backend_data: super::pair::pattern(4000, 12),
        ..Opts::default()
    });
    w.advance(Duration::from_secs(50));
    assert!(w.warm.as_ref().unwrap().core.is_ready(), "still held");
    let d = w.dec.as_ref().unwrap();
    assert!(
        d.core.is_unopened() && !d.closed,
        "held by the decrypt side"
    );
    let adopted = w.now;
    assert!(w.client_write(100));
    w.deliver(0, 0, usize::MAX);
    w.adopt();
    assert!(w.ready(0, Side::Client));
    exchange(&mut w);
    assert!(w.backend_write(200));
    exchange(&mut w);
    (w, adopted)
}

/// An adopted warm session's `max_lifetime` counts from its client's adoption, not from when
/// the session was made; and it is armed once the decrypt side answered (until then, the
/// replay's grace holds the timer slot the two share).
#[test]
fn max_lifetime_of_an_adopted_warm_session_counts_from_its_client() {
    let (mut w, adopted) = adopted_after_50s(true, false);
    assert_eq!(
        w.enc.env.timer(ConnTimer::Lifetime),
        Some(adopted + Duration::from_secs(60)),
        "armed from the adoption"
    );
    w.advance(adopted + Duration::from_millis(59_999) - w.now);
    exchange(&mut w);
    assert!(!w.enc.recorded(&Rec::LifetimeEnd { graceful: true }));
    assert!(!w.client.eof && !w.backend.as_ref().unwrap().eof, "not yet");
    w.advance(Duration::from_millis(1));
    assert!(w.enc.recorded(&Rec::LifetimeEnd { graceful: true }));
    exchange(&mut w);
    assert!(
        w.backend.as_ref().unwrap().eof,
        "the backend reads a clean end"
    );
    assert!(w.backend_shut());
    exchange(&mut w);
    assert!(w.client.eof && !w.client.reset);
    peers_close(&mut w);
    w.check_complete();
}

/// On a decrypt side, a warm session's client starts with its OPEN: a session held for 50 s
/// is neither ended at its lifetime while it waits (no quiet moment comes before a backend)
/// nor 10 s after its client came; its lifetime counts from the OPEN.
#[test]
fn max_lifetime_of_a_held_session_counts_from_its_open_on_a_decrypt_side() {
    let (mut w, adopted) = adopted_after_50s(false, true);
    let d = w.dec.as_ref().unwrap();
    assert!(d.recorded(&Rec::Warm(WarmStep::Opened)));
    assert_eq!(
        d.env.timer(ConnTimer::Lifetime),
        Some(adopted + Duration::from_secs(60)),
        "armed from the OPEN"
    );
    w.advance(adopted + Duration::from_millis(59_999) - w.now);
    exchange(&mut w);
    let d = w.dec.as_ref().unwrap();
    assert!(!d.recorded(&Rec::LifetimeEnd { graceful: true }));
    w.advance(Duration::from_millis(1));
    exchange(&mut w);
    let d = w.dec.as_ref().unwrap();
    assert!(d.recorded(&Rec::LifetimeEnd { graceful: true }));
    assert!(
        w.backend.as_ref().unwrap().eof,
        "the backend reads a clean end"
    );
    assert!(w.backend_shut());
    exchange(&mut w);
    assert!(w.client.eof && !w.client.reset);
    peers_close(&mut w);
    w.check_complete();
}

/// `conn_rate` on a decrypt side counts clients, not warm sessions: a held session's token
/// went back (`ratelimit`), and its OPEN takes one. Over the rate at the OPEN, the session is
/// declined with an ABORT `unopened` (nothing was acted on), and the encrypt side sends the
/// client's bytes again on a fresh connection, which the rate then meets at accept.
#[test]
fn an_open_over_the_conn_rate_is_declined_and_its_bytes_go_again() {
    let mut w = warm_ready(Opts::default());
    w.dec.as_mut().unwrap().env.refuse_open = true;
    assert!(w.client_write(1000));
    w.deliver(0, 0, usize::MAX);
    w.adopt();
    assert!(w.ready(0, Side::Client));
    w.settle();
    w.check_settled();
    let old = w.dec_old.as_ref().expect("the first decrypt node");
    assert!(old.recorded(&Rec::Warm(WarmStep::Opened)));
    assert!(
        !old.recorded(&Rec::SessionOpened),
        "the refused OPEN was never acted on"
    );
    assert_eq!(old.reason(), Some(CloseReason::Unopened));
    assert!(w.enc.recorded(&Rec::Warm(WarmStep::Retried)));
    // (The harness's fresh connection is admitted.)
    w.check_complete();
    assert_eq!(w.backend.as_ref().unwrap().got, w.client.data);
}
