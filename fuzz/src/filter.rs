//! The `seal_filter` target: `SealFilter` decoding, as the reactor drives it.
//!
//! `data[0]` picks the AEAD (bit 0), the scenario (bits 1-2) and forward secrecy for the
//! handshake scenario (bit 3); with bit 4 the sealed scenarios seal every other piece in
//! place, read straight into record slots (`Buffer::read_into_frames` through
//! `Filter::frame_slots`), as a relayed read does; `data[1]` the size of the pieces bytes
//! arrive in. Invariants:
//! - nothing panics, whatever arrives and however it is cut;
//! - a responder stages no more than its read limit while its handshake is unverified (the
//!   reactor reads no more than [`Filter::read_limit`] asks), and a garbage handshake never
//!   opens;
//! - after a decode, at most one incomplete record is left in `raw_in`;
//! - bytes nobody sealed never become plaintext; sealed bytes open to exactly what was sealed,
//!   and a flipped bit delivers at most the records before it, then fails.

use std::sync::Arc;

use sealpipe_codec::{Role, SealFilter};
use sealpipe_protocol::{AeadKind, ForwardSecrecy, HandshakeConfig, Key, KeySet, MAX_RECORD_LEN};
use sealpipe_reactor::{Buffer, Filter};

fn config(fs: bool, aead: AeadKind) -> HandshakeConfig {
    HandshakeConfig {
        keys: Arc::new(KeySet::new(Key::from_bytes([0x33; 32]), vec![])),
        forward_secrecy: if fs {
            ForwardSecrecy::Require
        } else {
            ForwardSecrecy::Off
        },
        aead,
    }
}

fn contents(b: &Buffer) -> Vec<u8> {
    b.slices().flatten().copied().collect()
}

/// Two filters with a completed handshake (no forward secrecy: cheap, and the record layer
/// is the same).
fn open_pair(aead: AeadKind) -> (SealFilter, SealFilter) {
    let cfg = config(false, aead);
    let (mut i, mut r) = (
        SealFilter::new(Role::Initiator, &cfg),
        SealFilter::new(Role::Responder, &cfg),
    );
    let (mut i2r, mut r2i, mut none) = (Buffer::new(), Buffer::new(), Buffer::new());
    for _ in 0..4 {
        let _ = i.encode(&mut none, &mut i2r, false);
        let _ = r.decode(&mut i2r, &mut none, &mut r2i, false);
        let _ = i.decode(&mut r2i, &mut none, &mut i2r, false);
    }
    let _ = r.decode(&mut i2r, &mut none, &mut r2i, false);
    assert!(
        i.is_open() && r.is_open(),
        "matching configs complete a handshake"
    );
    (i, r)
}

/// Feeds `bytes` to `rx.decode` in pieces of `step`, each read bounded by the filter's read
/// limit as the reactor bounds it, then EOF. Returns whether decoding failed.
fn feed(rx: &mut SealFilter, bytes: &[u8], step: usize, input: &mut Buffer) -> bool {
    let (mut raw, mut out) = (Buffer::new(), Buffer::new());
    let mut src = bytes;
    while !src.is_empty() {
        let mut n = step.min(src.len());
        if let Some(cap) = rx.read_limit() {
            n = n.min(cap.saturating_sub(raw.len()));
            if n == 0 {
                // The reactor stops reading here; the filter must have failed by now.
                return true;
            }
            let got = raw
                .read_limited(&mut &src[..n], n, cap)
                .expect("reading a slice");
            assert_eq!(got, n);
            assert!(
                raw.len() <= cap,
                "staged {} over the limit {cap}",
                raw.len()
            );
        } else {
            raw.append(&src[..n]);
        }
        src = &src[n..];
        if rx.decode(&mut raw, input, &mut out, false).is_err() {
            return true;
        }
        if rx.is_open() {
            assert!(
                raw.len() < MAX_RECORD_LEN,
                "more than one partial record left"
            );
        }
    }
    rx.decode(&mut raw, input, &mut out, true).is_err()
}

/// The target.
pub fn seal_filter(data: &[u8]) {
    let [mode, step, rest @ ..] = data else {
        return;
    };
    let aead = if mode & 1 == 0 {
        AeadKind::Ring
    } else {
        AeadKind::RustCrypto
    };
    let step = usize::from(*step).max(1) * if mode & 0x80 != 0 { 97 } else { 1 };
    let mut input = Buffer::new();
    match (mode >> 1) % 4 {
        // A responder from its first byte: garbage must never open a session.
        0 => {
            let mut r = SealFilter::new(Role::Responder, &config(mode & 8 != 0, aead));
            feed(&mut r, rest, step, &mut input);
            assert!(!r.is_open(), "a handshake nobody keyed completed");
            assert!(input.is_empty());
        }
        // An open session fed bytes nobody sealed: they never become plaintext.
        1 => {
            let (_, mut r) = open_pair(aead);
            feed(&mut r, rest, step, &mut input);
            assert!(input.is_empty(), "unsealed bytes became plaintext");
        }
        // Sealed by the peer, maybe with one flipped bit: all of it, or a prefix then failure.
        _ => {
            let (mut i, mut r) = open_pair(aead);
            let flip = (mode >> 1) % 4 == 3;
            let (payload, at) = match rest {
                [a, b, p @ ..] if flip => (p, Some(usize::from(*a) << 8 | usize::from(*b))),
                p => (p, None),
            };
            let (mut plain, mut wire) = (Buffer::new(), Buffer::new());
            for (k, chunk) in payload.chunks(step * 37).enumerate() {
                if mode & 0x10 != 0 && k % 2 == 0 {
                    // Read straight into record slots and sealed in place, as a relayed read
                    // does; interleaved with records `encode` copies.
                    let mut src = chunk;
                    while !src.is_empty() {
                        let slots = i.frame_slots(&mut wire).expect("an open session");
                        let (n, _) = wire
                            .read_into_frames(&mut src, usize::MAX, slots, |f, len| {
                                i.frame_in_place(f, len)
                            })
                            .expect("sealing in place");
                        assert!(n > 0);
                    }
                } else {
                    plain.append(chunk);
                    i.encode(&mut plain, &mut wire, false).expect("sealing");
                }
            }
            i.encode(&mut plain, &mut wire, true)
                .expect("sealing the end");
            let mut bytes = contents(&wire);
            if let Some(at) = at.filter(|_| !bytes.is_empty()) {
                let k = at % bytes.len();
                bytes[k] ^= 1 << (at % 8);
            }
            let failed = feed(&mut r, &bytes, step, &mut input);
            let got = contents(&input);
            if at.is_some() {
                assert!(failed, "a flipped bit went unnoticed");
                assert!(
                    payload.starts_with(&got),
                    "delivered bytes that were not sent"
                );
            } else {
                assert!(!failed, "an intact stream failed");
                assert_eq!(got, payload);
            }
        }
    }
}
