//! Live upgrade in the pair harness: connections that move to a "successor process" at any
//! point of any schedule (mid-record, with sealed records waiting to be written, half-closed,
//! asleep, across key updates) go on as if nothing had happened — the peers get every byte
//! once and in order, the sealed stream never shows a gap, a repeat or a rekey it did not
//! ask for (either would fail the far side's record check and reset the connection), and the
//! bytes accounted across both "processes" add up to the wire's.

use std::time::Duration;

use super::core::{ConnTimer, HIBERNATE_AFTER, Lifetime, Limits, Side, UnopenedEnd, WarmStep};
use super::pair::{Kind, Opts, Rec, World, pattern};
use super::warm::WarmEnd;
use crate::metrics::CloseReason;
use crate::protocol::AeadKind;

/// The bytes the node's `Action::Bytes` reported over its life, across every move, match
/// those its end reported (`Action::Closed`): nothing counted twice, nothing lost. (Not for
/// an encrypt side whose warm session was declined and its client's bytes sent again: the
/// declined session's wire bytes stay reported, and its end reports the last session's.)
fn accounted_once(w: &World) {
    for env in [&w.enc.env]
        .into_iter()
        .chain(w.dec.as_ref().map(|d| &d.env))
        .filter(|e| !e.recs.contains(&Rec::Warm(WarmStep::Retried)))
    {
        let closed = env.recs.iter().find_map(|r| match r {
            Rec::Closed { bytes, .. } => Some(*bytes),
            _ => None,
        });
        if let Some(total) = closed {
            assert_eq!(env.bytes, total, "bytes reported across moves");
        }
    }
}

#[test]
fn connections_move_mid_stream_and_nobody_notices() {
    for aead in [AeadKind::Ring, AeadKind::RustCrypto] {
        let mut w = World::new(Opts {
            aead,
            // A rekey every 3 records each way: moves land on every epoch and counter.
            key_update: Some(3),
            // Small links: sealed records wait in the sealer's buffer when a move comes.
            cap: 3000,
            client_data: pattern(200_000, 3),
            backend_data: pattern(150_000, 4),
            ..Opts::default()
        });
        w.net();
        let mut moves = [0usize; 2];
        for i in 0..4000usize {
            // A little of everything, and a move of one side or the other every few steps.
            match i % 7 {
                0 => {
                    w.client_write(1 + i * 37 % 5000);
                }
                1 => {
                    w.backend_write(1 + i * 53 % 4000);
                }
                // Partial deliveries: records arrive cut anywhere.
                2 | 3 => {
                    w.deliver(i / 7, i / 3, 1 + i * 101 % 700);
                }
                4 => {
                    w.ready_all();
                }
                5 => {
                    w.client_read();
                    w.backend_read();
                }
                _ => {}
            }
            if i % 5 == 0 && w.migrate(i / 5) {
                moves[i / 5 % 2] += 1;
            }
            w.check_always();
        }
        // Half-closed, then asleep, and moved in both states.
        w.net();
        w.client_write(usize::MAX);
        w.client_shut();
        w.net();
        assert!(w.enc.core.ended(Side::Client));
        assert!(w.migrate(0) && w.migrate(1), "half-closed connections move");
        w.advance(Duration::from_secs(1));
        assert!(w.enc.core.is_asleep() && w.dec.as_ref().unwrap().core.is_asleep());
        assert!(w.migrate(0) && w.migrate(1), "sleeping connections move");
        assert!(
            w.enc.core.is_asleep(),
            "and stay asleep until their next activity"
        );
        w.settle();
        w.check_settled();
        w.check_complete();
        accounted_once(&w);
        assert!(moves[0] > 50 && moves[1] > 50, "{moves:?}");
    }
}

#[test]
fn connections_in_their_handshake_or_connecting_do_not_move() {
    let mut w = World::new(Opts {
        enc_targets: vec![Kind::Decrypt],
        ..Opts::default()
    });
    assert!(!w.migrate(0), "connecting");
    w.establish();
    w.ready_all();
    assert!(!w.migrate(0), "in its handshake");
    assert!(!w.migrate(1), "in its handshake (or not yet there)");
    w.net();
    assert!(w.migrate(0) && w.migrate(1));
    // A connection that is closing stays to close where it is.
    w.client_reset();
    w.net();
    assert!(!w.migrate(0));
    w.settle();
    assert_eq!(w.enc.reason(), Some(CloseReason::PeerReset));
}

// ---------------------------------------------------------------------------------------------
// max_lifetime across a move

/// An encrypt side with `max_lifetime` of `max` s and a grace of `grace` s, whose handshake
/// is done (the decrypt side has no lifetime), and whose encrypt node draws `jitter`.
fn with_lifetime(max: u64, grace: u64, jitter: i8) -> World {
    let limits = Limits {
        lifetime: Some(Lifetime {
            max: Duration::from_secs(max),
            grace: Duration::from_secs(grace),
        }),
        ..Opts::default().limits
    };
    let mut w = World::new(Opts {
        limits,
        dec_limits: Some(Opts::default().limits),
        jitter: [jitter, 0],
        client_data: pattern(4000, 11),
        backend_data: pattern(4000, 12),
        ..Opts::default()
    });
    w.net();
    assert!(w.backend.is_some());
    w
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

fn request_reply(w: &mut World, n: usize) {
    assert!(w.client_write(n));
    exchange(w);
    assert!(w.backend_write(2 * n));
    exchange(w);
}

fn ended(w: &World) -> bool {
    w.enc.recorded(&Rec::LifetimeEnd { graceful: true })
}

/// The peers close their sides, as applications do on reading an end; the world settles.
fn peers_close(w: &mut World) {
    w.client_shut();
    w.backend_shut();
    w.settle();
    w.check_settled();
    w.check_complete();
}

#[test]
fn a_moved_connection_keeps_its_max_lifetime_deadline() {
    // Its own jitter (+5%: 63 s) travels; the successor would draw -5% (57 s).
    let mut w = with_lifetime(60, 30, 50);
    request_reply(&mut w, 100);
    w.advance(Duration::from_secs(30));
    w.enc.env.jitter = -50;
    assert!(w.migrate(0));
    exchange(&mut w);
    assert_eq!(
        w.enc.env.timer(ConnTimer::Lifetime),
        Some(w.started + Duration::from_secs(63)),
        "the successor armed the deadline the connection had"
    );
    w.advance(Duration::from_secs(33) - Duration::from_millis(1));
    exchange(&mut w);
    assert!(!ended(&w) && !w.backend.as_ref().unwrap().eof);
    w.advance(Duration::from_millis(1));
    exchange(&mut w);
    assert!(ended(&w) && w.backend.as_ref().unwrap().eof);
    peers_close(&mut w);
    assert_eq!(w.enc.reason(), Some(CloseReason::Clean));
}

#[test]
fn a_state_without_its_lifetime_gets_a_jitter_drawn_by_the_successor() {
    // What a predecessor that carries no lifetime state (a tunnel without max_lifetime until
    // a reload set one here) hands over: the age still travels, the jitter is drawn anew.
    let mut w = with_lifetime(60, 30, 50);
    request_reply(&mut w, 100);
    w.advance(Duration::from_secs(30));
    w.enc.env.jitter = -50;
    let now = w.now;
    assert!(w.enc.migrate_with(now, |c| c.lifetime = None));
    assert_eq!(
        w.enc.env.timer(ConnTimer::Lifetime),
        Some(w.started + Duration::from_secs(57))
    );
    w.advance(Duration::from_secs(27));
    exchange(&mut w);
    assert!(ended(&w));
    peers_close(&mut w);
}

#[test]
fn a_request_waiting_for_its_reply_still_holds_the_end_after_a_move() {
    let mut w = with_lifetime(60, 60, 0);
    w.advance(Duration::from_secs(59));
    // A slow request, sent (relayed straight into a record) before the move.
    assert!(w.client_write(100));
    exchange(&mut w);
    assert!(w.migrate(0));
    eprintln!(
        "T {:?}",
        w.enc.env.timer(ConnTimer::Lifetime).map(|t| t - w.started)
    );
    w.advance(Duration::from_secs(41));
    eprintln!("R {:?}", w.enc.env.recs);
    exchange(&mut w);
    assert!(
        !ended(&w) && !w.backend.as_ref().unwrap().eof,
        "a request is outstanding: no end before its reply"
    );
    assert!(w.backend_write(200));
    exchange(&mut w);
    w.advance(HIBERNATE_AFTER);
    exchange(&mut w);
    assert!(ended(&w) && w.client.got.len() == 200);
    peers_close(&mut w);
}

#[test]
fn a_connection_past_its_lifetime_keeps_its_grace_cap_across_a_move() {
    let mut w = with_lifetime(60, 10, 0);
    w.advance(Duration::from_secs(59));
    // Never quiet: reset at 70 s, wherever it runs by then.
    let mut moved = false;
    while !w.enc.closed {
        request_reply(&mut w, 1);
        if !moved && w.now - w.started >= Duration::from_secs(62) {
            assert!(w.migrate(0), "due, not ended: it moves");
            moved = true;
        }
        w.advance(Duration::from_millis(100));
        assert!(w.now - w.started <= Duration::from_secs(70), "past the cap");
    }
    assert!(moved);
    assert_eq!(w.now - w.started, Duration::from_secs(70));
    assert_eq!(w.enc.reason(), Some(CloseReason::MaxLifetime));
    w.settle();
    w.check_settled();
}

#[test]
fn a_connection_that_ended_at_its_lifetime_stays_to_close_where_it_is() {
    let mut w = with_lifetime(60, 30, 0);
    request_reply(&mut w, 100);
    w.advance(Duration::from_secs(60));
    exchange(&mut w);
    assert!(ended(&w) && w.backend.as_ref().unwrap().eof);
    assert!(
        !w.migrate(0),
        "waiting for its peers to close: it ends here"
    );
    peers_close(&mut w);
    assert_eq!(w.enc.reason(), Some(CloseReason::Clean));
}

mod properties {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::super::pair::{Opts, Step, World, pattern};
    use super::accounted_once;
    use crate::protocol::{AeadKind, ForwardSecrecy};

    /// Schedules per `cargo test` run.
    const CASES: u32 = 2_000;

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            10 => (0u8..4, 0u8..2, prop_oneof![1u16..64, 64u16..4096, Just(u16::MAX)])
                .prop_map(|(link, dir, max)| Step::Deliver { link, dir, max }),
            10 => (0u8..2, 0u8..2).prop_map(|(node, side)| Step::Ready { node, side }),
            3 => Just(Step::Establish),
            4 => (1u32..20_000).prop_map(Step::ClientWrite),
            3 => Just(Step::ClientRead),
            1 => Just(Step::ClientShut),
            4 => (1u32..20_000).prop_map(Step::BackendWrite),
            3 => Just(Step::BackendRead),
            1 => Just(Step::BackendShut),
            2 => prop_oneof![0u16..300, 300u16..1500].prop_map(Step::Advance),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: CASES,
            max_shrink_iters: 20_000,
            rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
            .. ProptestConfig::default()
        })]

        /// Any schedule with moves of either side at any point, between any two steps, ends
        /// exactly as it would without them: every byte once and in order, both ends clean.
        #[test]
        fn moves_at_any_point_change_nothing(
            steps in vec((step(), 0u8..4), 0..64),
            key_update in proptest::option::of(1u64..5),
            rustcrypto in any::<bool>(),
            fs in any::<bool>(),
            cap in 512usize..65536,
            up in 0usize..40_000,
            down in 0usize..40_000,
        ) {
            let mut w = World::new(Opts {
                key_update,
                aead: if rustcrypto { AeadKind::RustCrypto } else { AeadKind::Ring },
                fs: if fs { ForwardSecrecy::Require } else { ForwardSecrecy::Off },
                cap,
                client_data: pattern(up, 5),
                backend_data: pattern(down, 6),
                ..Opts::default()
            });
            for (s, mv) in &steps {
                w.apply(s);
                // 0: none, 1: encrypt, 2: decrypt, 3: both.
                if mv & 1 != 0 {
                    w.migrate(0);
                }
                if mv & 2 != 0 {
                    w.migrate(1);
                }
                w.check_always();
            }
            w.settle();
            w.check_settled();
            // Unless time ran past a connect before the test let it be answered (as in the
            // harness's own property test), everything arrives.
            if !w.live_connect_timed_out() {
                w.check_complete();
            }
            accounted_once(&w);
        }
    }

    fn warm_step() -> impl Strategy<Value = Step> {
        prop_oneof![
            12 => step(),
            1 => Just(Step::DrainStart),
        ]
    }

    /// Applies `steps`, moving the encrypt side's connection, the decrypt side's, or both
    /// after each as its number says (each only if it can move then).
    fn run(w: &mut World, steps: &[(Step, u8)]) {
        for (s, mv) in steps {
            w.apply(s);
            if mv & 1 != 0 {
                w.migrate(0);
            }
            if mv & 2 != 0 {
                w.migrate(1);
            }
            w.check_always();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: CASES / 4,
            max_shrink_iters: 20_000,
            rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
            .. ProptestConfig::default()
        })]

        /// Warm sessions and live upgrade: a warm session is made, some of the schedule runs
        /// before a client takes it (if it is still there), the rest after; the connection's
        /// two sides move at any point they can (an adopted session once answered, a held one
        /// never), and the decrypt side may start to drain at any point, racing the OPEN.
        /// Every byte still arrives once and in order, and each end's bytes add up.
        #[test]
        fn warm_sessions_with_moves_at_any_point_change_nothing(
            before in vec((warm_step(), 0u8..4), 0..8),
            steps in vec((warm_step(), 0u8..4), 0..48),
            key_update in proptest::option::of(1u64..5),
            cap in 512usize..65536,
            up in 0usize..40_000,
            down in 0usize..40_000,
        ) {
            let mut w = World::warm(Opts {
                key_update,
                cap,
                client_data: pattern(up, 5),
                backend_data: pattern(down, 6),
                ..Opts::default()
            });
            w.net();
            run(&mut w, &before);
            let adopted = w.warm.as_ref().is_some_and(|x| x.core.is_ready());
            if adopted {
                w.adopt();
            }
            run(&mut w, &steps);
            w.settle();
            w.check_settled();
            if adopted && w.faults == 0 && !w.live_connect_timed_out() {
                w.check_complete();
            }
            accounted_once(&w);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Live upgrade and warm sessions (issue 18)

/// An encrypt side's adopted warm session moves only once the decrypt side answered it: until
/// then its client's bytes are kept to go again on a fresh session if the session is declined
/// (an ABORT `unopened`), and that copy is not part of what moves. Answered, it moves as any
/// connection does, and both ends finish as if nothing happened.
#[test]
fn an_adopted_warm_session_moves_only_once_answered() {
    let mut w = World::warm(Opts::default());
    w.net();
    assert!(w.client_write(100));
    w.deliver(0, 0, usize::MAX);
    w.adopt();
    assert!(!w.migrate(0), "its OPEN is still held");
    assert!(w.ready(0, Side::Client));
    assert!(w.enc.core.replayable());
    assert!(!w.migrate(0), "its client's bytes are kept for a decline");
    w.net();
    assert!(w.backend_read() && w.backend_write(100));
    w.net();
    assert!(!w.enc.core.replayable(), "answered");
    assert!(w.migrate(0) && w.migrate(1), "both sides move now");
    w.settle();
    w.check_settled();
    w.check_complete();
    accounted_once(&w);
}

/// A decrypt side's held (unopened) session does not move: the drain a live upgrade starts
/// with closes it with an ABORT `unopened`, so its encrypt side never sends a client on it
/// (and replaces it, with the successor that holds the listening socket now).
#[test]
fn a_held_warm_session_never_moves_and_closes_unopened_at_the_drain() {
    let mut w = World::warm(Opts::default());
    w.net();
    assert!(w.warm.as_ref().unwrap().core.is_ready());
    assert!(!w.migrate(1), "held, unopened");
    assert!(w.drain_started());
    w.net();
    let dec = w.dec.as_ref().unwrap();
    assert!(dec.recorded(&Rec::Warm(WarmStep::Closed(UnopenedEnd::Shutdown))));
    let warm = w.warm.as_ref().unwrap();
    assert!(warm.env.recs.contains(&Rec::WarmEnded("unopened")));
    assert!(warm.env.recs.contains(&Rec::WarmClosed(WarmEnd::Lost)));
}

/// A session whose handshake completes after the drain started (it was in its handshake when
/// the drain's notice went round) is not held for a client either: it closes at once, with
/// an ABORT `unopened`, as those held then did.
#[test]
fn a_session_handshaken_after_the_drain_started_is_not_held() {
    let mut w = World::warm(Opts::default());
    assert!(
        w.establish(),
        "the warm session's connect reaches the decrypt side"
    );
    assert!(
        w.drain_started(),
        "which starts to drain during the handshake"
    );
    w.net();
    let dec = w.dec.as_ref().unwrap();
    assert!(dec.recorded(&Rec::Warm(WarmStep::Held)));
    assert!(dec.recorded(&Rec::Warm(WarmStep::Closed(UnopenedEnd::Shutdown))));
    assert_eq!(dec.reason(), Some(CloseReason::Unopened));
    let warm = w.warm.as_ref().unwrap();
    assert!(warm.env.recs.contains(&Rec::WarmEnded("unopened")));
    assert!(!warm.core.is_ready());
}
