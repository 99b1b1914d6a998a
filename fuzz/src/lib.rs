//! Fuzz targets for the protocol core (version 2), the codec, the reactor's buffers and the
//! PROXY protocol parser; the
//! binaries in fuzz_targets/ are one-line wrappers. `corpus.rs` runs every target over 100,000
//! generated inputs (and every file in `regressions/TARGET/`) in `cargo test`, on stable.
//!
//! Invariant checked by every target: no input panics. The record target also checks that
//! whatever it seals opens to the same bytes, that the decoder never accepts bytes that were
//! not sealed by the peer (a garbage stream can never yield a record), and that the OPEN and
//! ABORT payload decoders accept only canonical encodings. The handshake target also checks
//! that a responder fed bytes nobody holding the key made never takes an ephemeral key.

mod buffer;
#[cfg(test)]
mod corpus;
mod filter;
mod proxy_header;

pub use buffer::buffer;
pub use filter::seal_filter;
pub use proxy_header::proxy_header;

use std::sync::Arc;

use sealpipe_protocol::record::{RecordType, record_len_for};
use sealpipe_protocol::{
    AbortReason, AeadKind, EphemeralKey, EphemeralSource, ForwardSecrecy, HEADER_LEN, Handshake,
    HandshakeConfig, Key, KeySet, MAX_OPEN_LEN, MAX_PAYLOAD, OpenInfo, RandomSource, Session,
    Status,
};

/// Deterministic randomness, so a crashing input reproduces.
pub struct FuzzRandom(pub u64);

impl RandomSource for FuzzRandom {
    fn fill(&mut self, dst: &mut [u8]) {
        for b in dst {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (self.0 >> 56) as u8;
        }
    }
}

fn config(fs: bool, aead: AeadKind) -> HandshakeConfig {
    HandshakeConfig {
        keys: Arc::new(KeySet::new(
            Key::from_bytes([0x11; 32]),
            vec![Key::from_bytes([0x22; 32])],
        )),
        forward_secrecy: if fs {
            ForwardSecrecy::Require
        } else {
            ForwardSecrecy::Off
        },
        aead,
    }
}

/// A key source that counts the keys it hands out.
struct Counting(usize);

impl EphemeralSource for Counting {
    fn ephemeral(&mut self, rng: &mut dyn RandomSource) -> Box<EphemeralKey> {
        self.0 += 1;
        Box::new(EphemeralKey::from_rng(rng))
    }
}

/// A completed handshake: (initiator, responder). With `open`, the initiator's OPEN has been
/// sealed and opened too, so both directions take any record type next. Without forward
/// secrecy: the record layer is the same either way, and four X25519 operations per input would
/// make the corpus run (`corpus.rs`, 100,000 inputs a target) ten times slower.
fn sessions(aead: AeadKind, open: bool) -> (Session, Session) {
    let (ic, rc) = (config(false, aead), config(false, aead));
    let mut rng = FuzzRandom(1);
    let mut to_r = Vec::new();
    let mut i = Handshake::initiator(&ic, &mut rng, &mut to_r);
    let mut r = Handshake::responder(&rc);
    let mut to_i = Vec::new();
    let _ = r.advance(&to_r, &mut rng, &mut to_i);
    let Ok(Status::Done {
        session: mut si, ..
    }) = i.advance(&to_i, &mut rng, &mut to_r)
    else {
        unreachable!("a handshake between matching configs completes");
    };
    let Ok(Status::Done {
        session: mut sr, ..
    }) = r.advance(&to_r, &mut rng, &mut to_i)
    else {
        unreachable!("a handshake between matching configs completes");
    };
    if open {
        let mut p = [0u8; MAX_OPEN_LEN];
        let n = OpenInfo::default().encode(&mut p);
        let mut out = Vec::new();
        roundtrip(&mut si, &mut sr, RecordType::Open, &p[..n], &mut out);
    }
    (si, sr)
}

/// The bytes as OPEN and ABORT payloads: decoding never panics and accepts only what encodes
/// back to the same bytes.
fn control_payloads(data: &[u8]) {
    if let Ok(info) = OpenInfo::decode(data) {
        let mut p = [0u8; MAX_OPEN_LEN];
        let n = info.encode(&mut p);
        assert_eq!(&p[..n], data, "a non-canonical OPEN payload was accepted");
    }
    if let Ok(reason) = AbortReason::decode(data) {
        assert_eq!(data, [reason.to_byte()]);
    }
}

/// Feeds `data` to an opener as a byte stream split at the points `data[0]` suggests, and
/// seals-then-opens `data` as payload.
pub fn record(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let aead = if mode & 1 == 0 {
        AeadKind::Ring
    } else {
        AeadKind::RustCrypto
    };
    // Bit 1: the garbage meets an opener that still expects the session's OPEN.
    let (i, mut r) = sessions(aead, mode & 2 == 0);
    control_payloads(rest);

    // 1. Garbage as a record stream: must end in an error, never in a record.
    let step = usize::from(mode >> 2).max(1);
    let mut buf = Vec::new();
    for chunk in rest.chunks(step) {
        buf.extend_from_slice(chunk);
        // The first complete record decides: a record nobody sealed must never open.
        match r.opener.record_len(&buf) {
            Ok(Some(n)) if n <= buf.len() => {
                assert!(
                    r.opener.open_in_place(&mut buf[..n]).is_err(),
                    "opened a record that was never sealed"
                );
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }

    // 2. The bytes as payload: sealed in records, they open to themselves.
    let (mut i, mut r) = if i.sealer.open_due() {
        sessions(aead, true)
    } else {
        (i, r)
    };
    let payload = &rest[..rest.len().min(4 * MAX_PAYLOAD)];
    i.sealer.set_key_update_interval(u64::from(mode % 4) + 1);
    let mut out = Vec::with_capacity(payload.len());
    for chunk in payload.chunks(step.min(MAX_PAYLOAD)) {
        if i.sealer.key_update_due() {
            roundtrip(&mut i, &mut r, RecordType::KeyUpdate, b"", &mut out);
        }
        roundtrip(&mut i, &mut r, RecordType::Data, chunk, &mut out);
    }
    if i.sealer.key_update_due() {
        roundtrip(&mut i, &mut r, RecordType::KeyUpdate, b"", &mut out);
    }
    roundtrip(&mut i, &mut r, RecordType::End, b"", &mut out);
    assert_eq!(out, payload);
    assert!(r.opener.eof(0).is_ok());
}

fn roundtrip(i: &mut Session, r: &mut Session, ty: RecordType, p: &[u8], out: &mut Vec<u8>) {
    let mut rec = vec![0u8; record_len_for(p.len())];
    rec[HEADER_LEN..HEADER_LEN + p.len()].copy_from_slice(p);
    let n = i
        .sealer
        .seal_in_place(ty, &mut rec, p.len())
        .expect("sealing a bounded record");
    assert_eq!(r.opener.record_len(&rec[..HEADER_LEN]), Ok(Some(n)));
    let (got, range) = r
        .opener
        .open_in_place(&mut rec)
        .expect("opening own record");
    assert_eq!(got, ty);
    out.extend_from_slice(&rec[range]);
}

/// Feeds `data` to a handshake: `data[0]` picks the role and the starting point.
pub fn handshake(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let fs = mode & 1 != 0;
    let mut rng = FuzzRandom(u64::from(mode));
    let mut out = Vec::new();
    match (mode >> 1) % 3 {
        // Responder from its first byte: bytes made without the key never cost it a key.
        0 => {
            let mut r = Handshake::responder(&config(fs, AeadKind::Ring));
            let mut keys = Counting(0);
            drive(&mut r, rest, &mut rng, &mut keys, &mut out);
            assert_eq!(
                keys.0, 0,
                "an ephemeral key was taken for an unauthenticated hello"
            );
            assert!(
                out.is_empty(),
                "the responder answered an unauthenticated hello"
            );
        }
        // Initiator given an arbitrary responder hello.
        1 => {
            let mut i = Handshake::initiator(&config(fs, AeadKind::Ring), &mut rng, &mut out);
            drive(&mut i, rest, &mut rng, &mut Counting(0), &mut out);
        }
        // Responder after a valid hello: the fuzz bytes are the Finished (and what follows).
        _ => {
            let mut hello = Vec::new();
            let _ = Handshake::initiator(&config(fs, AeadKind::Ring), &mut rng, &mut hello);
            let mut r = Handshake::responder(&config(false, AeadKind::Ring));
            let n = hello.len();
            hello.extend_from_slice(rest);
            if let Ok(Status::Done { .. }) = r.advance(&hello, &mut rng, &mut out) {
                panic!("responder done without a valid Finished (n = {n})");
            }
        }
    }
}

/// Feeds `input` a byte at a time, as a slow peer would, checking the consumption contract.
fn drive(
    hs: &mut Handshake,
    input: &[u8],
    rng: &mut FuzzRandom,
    keys: &mut Counting,
    out: &mut Vec<u8>,
) {
    for n in 0..=input.len() {
        match hs.advance_with(&input[..n], rng, keys, out) {
            Ok(Status::NeedMore) => {}
            Ok(Status::Done { consumed, .. }) => {
                assert!(consumed <= n && consumed <= Handshake::max_message_len());
                return;
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_survive_sample_inputs() {
        let mut rng = FuzzRandom(42);
        for len in [0usize, 1, 2, 3, 19, 74, 106, 138, 300, 20_000] {
            for mode in 0..8u8 {
                let mut data = vec![0u8; len];
                rng.fill(&mut data);
                if let Some(first) = data.first_mut() {
                    *first = mode;
                }
                record(&data);
                handshake(&data);
                // Plausible headers, too: a DATA type byte and a small length.
                if len > 4 {
                    data[1..4].copy_from_slice(&[0x01, 0x00, 0x10]);
                    record(&data);
                    data[1..3].copy_from_slice(&[0x01, 0x01]);
                    handshake(&data);
                }
            }
        }
    }
}
