//! A session's state on its way to a successor process: a live upgrade moves each established
//! connection, and the new process must seal the next record with the next counter under the
//! same traffic key, and open what the peer sends next, as if nothing had happened.
//!
//! [`Session::export`] takes what each direction needs to go on — its traffic secret, its
//! record counter, its key-update epoch, whether it ended or still owes the OPEN — and the
//! session's facts (key id, forward secrecy, hibernating). [`SessionState::encode`] writes it
//! as a fixed, versioned layout; [`SessionState::decode`] reads one through checked reads and
//! refuses anything [`encode`](SessionState::encode) would not write; [`Session::import`]
//! rebuilds the session. The IV, and the AEAD key unless the session was hibernating, are
//! derived from the secret again, exactly as the handshake or the last KEY_UPDATE derived them.
//! Whether an ABORT `unopened` may still come (a warm session's decline, only as the
//! responder's first record) is not carried: it follows from the counter, the epoch and the
//! flags (see `record::Direction::from_parts`).
//!
//! Layout (format 1, [`STATE_LEN`] bytes; integers big-endian):
//!
//! ```text
//! format (1) = 1 | key id (8) | flags (1: bit 0 forward secrecy, bit 1 hibernating)
//! sealer: direction (46) | key-update interval (8)
//! opener: direction (46)
//! direction: aead (1: 1 ring, 2 rustcrypto) | secret (32) | counter (8) | epoch (4)
//!            | flags (1: bit 0 ended, bit 1 OPEN still due)
//! ```
//!
//! Invariants:
//! - Secrets never appear in `Debug` output, and every copy this module makes is zeroed when
//!   dropped. The bytes `encode` appends are the caller's to wipe: it takes only a
//!   `Zeroizing` buffer, and reserves the whole state before writing, so no reallocation
//!   leaves a copy behind.
//! - `decode` never panics and never allocates; every field is checked: a counter beyond the
//!   per-key limit, a zero key-update interval, an OPEN still due after records, two AEAD
//!   backends in one session or an unknown flag bit is refused.
//! - An imported session continues the wire exactly: the same key, IV and counter, the same
//!   key-update schedule. Nothing here reads a clock or does I/O.

use std::fmt;

use zeroize::Zeroizing;

use super::aead::AeadKind;
use super::handshake::Session;
use super::keys::KeyId;
use super::record::{DirectionParts, Opener, RECORD_LIMIT, Sealer, Secret};

/// The format [`SessionState::encode`] writes and [`SessionState::decode`] reads.
pub const STATE_FORMAT: u8 = 1;
const DIRECTION_LEN: usize = 1 + 32 + 8 + 4 + 1;
/// Bytes of an encoded session state.
pub const STATE_LEN: usize = 1 + 8 + 1 + DIRECTION_LEN + 8 + DIRECTION_LEN;

/// Why an encoded session state was refused.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateError {
    /// Another format than [`STATE_FORMAT`]: written by a build this one cannot read.
    #[error("session state format {0}; this build reads format {STATE_FORMAT}")]
    Format(u8),
    /// Not exactly [`STATE_LEN`] bytes.
    #[error("session state of {0} bytes; format {STATE_FORMAT} has {STATE_LEN}")]
    Length(usize),
    /// A field holds what no session can have.
    #[error("session state field {0:?} is invalid")]
    Field(&'static str),
}

/// A session's state between two processes (see the module doc). `Debug` shows no secret.
pub struct SessionState {
    sealer: DirectionParts,
    interval: u64,
    opener: DirectionParts,
    key_id: KeyId,
    forward_secrecy: bool,
    hibernating: bool,
}

impl Session {
    /// This session's state, for a successor process to go on with ([`Session::import`]).
    pub fn export(&self) -> SessionState {
        let (sealer, interval) = self.sealer.parts();
        SessionState {
            sealer,
            interval,
            opener: self.opener.parts(),
            key_id: self.key_id,
            forward_secrecy: self.forward_secrecy,
            // Both directions drop their keys together; a session half awake is awake.
            hibernating: self.sealer.is_hibernating() && self.opener.is_hibernating(),
        }
    }

    /// The session that goes on from `state`: the next record sealed gets the next counter,
    /// the next one opened must carry the peer's next counter. A hibernating session stays
    /// hibernating (its keys come back with its next record).
    pub fn import(state: SessionState) -> Session {
        let SessionState {
            sealer,
            interval,
            opener,
            key_id,
            forward_secrecy,
            hibernating,
        } = state;
        Session {
            sealer: Sealer::from_parts(sealer, interval, hibernating),
            opener: Opener::from_parts(opener, hibernating),
            key_id,
            forward_secrecy,
        }
    }
}

impl SessionState {
    /// The pre-shared key the session was authenticated with.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    pub fn forward_secrecy(&self) -> bool {
        self.forward_secrecy
    }

    /// Appends the state's [`STATE_LEN`] bytes to `out` (see the module doc for who wipes
    /// them).
    pub fn encode(&self, out: &mut Zeroizing<Vec<u8>>) {
        out.reserve(STATE_LEN);
        out.push(STATE_FORMAT);
        out.extend_from_slice(self.key_id.as_bytes());
        out.push(u8::from(self.forward_secrecy) | u8::from(self.hibernating) << 1);
        put_direction(out, &self.sealer);
        out.extend_from_slice(&self.interval.to_be_bytes());
        put_direction(out, &self.opener);
    }

    /// Reads a state [`encode`](Self::encode) wrote, checking every field.
    pub fn decode(bytes: &[u8]) -> Result<SessionState, StateError> {
        // The format first: a longer or shorter state of another format is that format's.
        match bytes.first() {
            Some(&STATE_FORMAT) => {}
            Some(&other) => return Err(StateError::Format(other)),
            None => return Err(StateError::Length(0)),
        }
        if bytes.len() != STATE_LEN {
            return Err(StateError::Length(bytes.len()));
        }
        let mut r = Reader(&bytes[1..]);
        let key_id = KeyId(r.array()?);
        let flags = r.u8()?;
        if flags & !0b11 != 0 {
            return Err(StateError::Field("flags"));
        }
        let sealer = r.direction()?;
        let interval = u64::from_be_bytes(r.array()?);
        if interval == 0 || interval >= RECORD_LIMIT {
            return Err(StateError::Field("key-update interval"));
        }
        let opener = r.direction()?;
        if sealer.kind != opener.kind {
            return Err(StateError::Field("aead"));
        }
        Ok(SessionState {
            sealer,
            interval,
            opener,
            key_id,
            forward_secrecy: flags & 1 != 0,
            hibernating: flags & 2 != 0,
        })
    }
}

impl fmt::Debug for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionState")
            .field("key_id", &self.key_id)
            .field("forward_secrecy", &self.forward_secrecy)
            .field("hibernating", &self.hibernating)
            .field("aead", &self.sealer.kind)
            .field("sealed", &(self.sealer.epoch, self.sealer.seq))
            .field("opened", &(self.opener.epoch, self.opener.seq))
            .finish_non_exhaustive()
    }
}

fn put_direction(out: &mut Vec<u8>, d: &DirectionParts) {
    out.push(match d.kind {
        AeadKind::Ring => 1,
        AeadKind::RustCrypto => 2,
    });
    out.extend_from_slice(&d.secret[..]);
    out.extend_from_slice(&d.seq.to_be_bytes());
    out.extend_from_slice(&d.epoch.to_be_bytes());
    out.push(u8::from(d.ended) | u8::from(d.open_next) << 1);
}

/// Checked reads over the state's bytes (the length was checked before, so a short read is a
/// bug in this module, still refused rather than a panic).
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let (head, tail) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(StateError::Length(STATE_LEN - 1))?;
        self.0 = tail;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.array::<1>()?[0])
    }

    fn direction(&mut self) -> Result<DirectionParts, StateError> {
        let kind = match self.u8()? {
            1 => AeadKind::Ring,
            2 => AeadKind::RustCrypto,
            _ => return Err(StateError::Field("aead")),
        };
        let secret = Secret::new(self.array()?);
        let seq = u64::from_be_bytes(self.array()?);
        let epoch = u32::from_be_bytes(self.array()?);
        let flags = self.u8()?;
        if flags & !0b11 != 0 {
            return Err(StateError::Field("direction flags"));
        }
        let (ended, open_next) = (flags & 1 != 0, flags & 2 != 0);
        if seq > RECORD_LIMIT {
            return Err(StateError::Field("counter"));
        }
        // OPEN is a direction's first record: it cannot still be due once records went by,
        // or once the direction ended.
        if open_next && (seq != 0 || epoch != 0 || ended) {
            return Err(StateError::Field("OPEN due"));
        }
        Ok(DirectionParts {
            kind,
            secret,
            seq,
            epoch,
            ended,
            open_next,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{HEADER_LEN, RecordType, record_len_for};

    /// Two ends of a session keyed from fixed secrets (the initiator's direction starts with
    /// OPEN, as a handshake leaves it).
    fn pair(kind: AeadKind) -> (Session, Session) {
        let (i2r, r2i) = ([7u8; 32], [8u8; 32]);
        let id = KeyId([1, 2, 3, 4, 5, 6, 7, 8]);
        let i = Session {
            sealer: Sealer::new(kind, Secret::new(i2r), true),
            opener: Opener::new(kind, Secret::new(r2i), false),
            key_id: id,
            forward_secrecy: true,
        };
        let r = Session {
            sealer: Sealer::new(kind, Secret::new(r2i), false),
            opener: Opener::new(kind, Secret::new(i2r), true),
            key_id: id,
            forward_secrecy: true,
        };
        (i, r)
    }

    /// An OPEN without addresses.
    fn open_payload() -> Vec<u8> {
        let mut b = [0u8; crate::MAX_OPEN_LEN];
        let n = crate::OpenInfo::default().encode(&mut b);
        b[..n].to_vec()
    }

    fn seal(s: &mut Session, ty: RecordType, msg: &[u8]) -> Vec<u8> {
        if ty != RecordType::KeyUpdate && s.sealer.key_update_due() {
            let mut ku = seal(s, RecordType::KeyUpdate, b"");
            assert_eq!(ku.len(), record_len_for(0));
            let mut rec = seal(s, ty, msg);
            ku.append(&mut rec);
            return ku;
        }
        let mut buf = vec![0u8; record_len_for(msg.len())];
        buf[HEADER_LEN..HEADER_LEN + msg.len()].copy_from_slice(msg);
        s.sealer.seal_in_place(ty, &mut buf, msg.len()).unwrap();
        buf
    }

    /// Opens every record of `wire`; returns the DATA payloads.
    fn open(s: &mut Session, wire: &mut [u8]) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let n = s
            .opener
            .open_batch_in_place(wire, |ty, p| {
                if ty == RecordType::Data {
                    got.push(p.to_vec());
                }
            })
            .unwrap();
        assert_eq!(n, wire.len());
        got
    }

    fn moved(s: &Session) -> Session {
        let mut bytes = Zeroizing::new(Vec::new());
        s.export().encode(&mut bytes);
        assert_eq!(bytes.len(), STATE_LEN);
        Session::import(SessionState::decode(&bytes).unwrap())
    }

    #[test]
    fn a_moved_session_continues_the_stream_both_ways() {
        for kind in [AeadKind::Ring, AeadKind::RustCrypto] {
            let (mut i, mut r) = pair(kind);
            i.sealer.set_key_update_interval(3);
            r.sealer.set_key_update_interval(3);
            let mut w = seal(&mut i, RecordType::Open, &open_payload());
            let _ = r.opener.open_batch_in_place(&mut w, |_, _| {}).unwrap();
            for round in 0..10u8 {
                let mut up = seal(&mut i, RecordType::Data, &[round; 5]);
                let mut down = seal(&mut r, RecordType::Data, &[round + 100; 7]);
                // Move one end or the other (or both) between every pair of records,
                // hibernating now and then: the peer never notices.
                if round % 3 != 1 {
                    i = moved(&i);
                }
                if round % 2 == 0 {
                    r = moved(&r);
                }
                if round % 4 == 3 {
                    i.hibernate();
                    r.hibernate();
                }
                assert_eq!(open(&mut r, &mut up), vec![vec![round; 5]], "{kind:?}");
                assert_eq!(open(&mut i, &mut down), vec![vec![round + 100; 7]]);
            }
            // Ten records of three per key, both ways: the epochs moved with the sessions.
            let st = i.export();
            assert_eq!((st.sealer.epoch, st.opener.epoch), (3, 3));
            let mut end = seal(&mut i, RecordType::End, b"");
            let i2 = moved(&i);
            assert!(i2.sealer.end_sent());
            open(&mut r, &mut end);
            assert!(moved(&r).opener.end_received());
        }
    }

    #[test]
    fn a_moved_session_seals_byte_for_byte_what_the_original_would() {
        let (mut a, _) = pair(AeadKind::Ring);
        let (mut b, _) = pair(AeadKind::Ring);
        seal(&mut a, RecordType::Open, &open_payload());
        seal(&mut b, RecordType::Open, &open_payload());
        a.sealer.set_key_update_interval(2);
        b.sealer.set_key_update_interval(2);
        for n in 0..7u8 {
            b = moved(&b);
            assert_eq!(
                seal(&mut a, RecordType::Data, &[n; 9]),
                seal(&mut b, RecordType::Data, &[n; 9])
            );
        }
    }

    #[test]
    fn hibernation_and_the_open_still_due_travel() {
        let (mut i, _) = pair(AeadKind::Ring);
        let fresh = moved(&i);
        assert!(
            fresh.sealer.open_due(),
            "nothing sealed yet: OPEN still due"
        );
        assert!(!fresh.sealer.is_hibernating());
        seal(&mut i, RecordType::Open, &open_payload());
        i.hibernate();
        let slept = moved(&i);
        assert!(slept.sealer.is_hibernating() && slept.opener.is_hibernating());
        assert!(!slept.sealer.open_due());
        assert_eq!(slept.key_id, i.key_id);
        assert!(slept.forward_secrecy);
    }

    /// A warm session's decline (an ABORT `unopened`: docs/PROTOCOL.md, "Warm sessions") is
    /// allowed only as the responder's first record; that rule survives a move on both ends.
    #[test]
    fn an_abort_unopened_stays_allowed_first_and_only_first_after_a_move() {
        let unopened = [crate::AbortReason::Unopened.to_byte()];
        let (mut i, mut r) = pair(AeadKind::Ring);
        let mut w = seal(&mut i, RecordType::Open, &open_payload());
        open(&mut r, &mut w);
        let (mut i, mut r) = (moved(&i), moved(&r));
        let mut abort = seal(&mut r, RecordType::Abort, &unopened);
        let n = i
            .opener
            .open_batch_in_place(&mut abort, |ty, _| assert_eq!(ty, RecordType::Abort))
            .unwrap();
        assert_eq!(n, abort.len(), "the moved initiator takes the decline");
        // Once the responder sealed anything, never again: not after a move either.
        let (mut i, mut r) = pair(AeadKind::Ring);
        let mut w = seal(&mut i, RecordType::Open, &open_payload());
        open(&mut r, &mut w);
        let mut d = seal(&mut r, RecordType::Data, b"answer");
        open(&mut i, &mut d);
        let mut r = moved(&r);
        let mut buf = vec![0u8; record_len_for(1)];
        buf[HEADER_LEN] = unopened[0];
        assert_eq!(
            r.sealer.seal_in_place(RecordType::Abort, &mut buf, 1),
            Err(crate::ProtocolError::Malformed)
        );
    }

    fn encoded() -> Zeroizing<Vec<u8>> {
        let (mut i, _) = pair(AeadKind::RustCrypto);
        seal(&mut i, RecordType::Open, &open_payload());
        seal(&mut i, RecordType::Data, b"x");
        let mut bytes = Zeroizing::new(Vec::new());
        i.export().encode(&mut bytes);
        bytes
    }

    #[test]
    fn a_truncated_or_padded_state_is_refused() {
        let bytes = encoded();
        for n in 0..bytes.len() {
            assert_eq!(
                SessionState::decode(&bytes[..n]).unwrap_err(),
                StateError::Length(n)
            );
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(
            SessionState::decode(&longer).unwrap_err(),
            StateError::Length(STATE_LEN + 1)
        );
    }

    #[test]
    fn another_format_is_refused() {
        let mut bytes = encoded();
        for v in [0u8, 2, 255] {
            bytes[0] = v;
            assert_eq!(
                SessionState::decode(&bytes).unwrap_err(),
                StateError::Format(v)
            );
        }
    }

    #[test]
    fn corrupted_fields_are_refused() {
        let sealer = 1 + 8 + 1;
        let opener = sealer + DIRECTION_LEN + 8;
        let cases: [(usize, u8, &str); 8] = [
            (9, 0x04, "flags"),
            (sealer, 3, "aead"),
            (sealer, 1, "aead"), // a ring sealer with a rustcrypto opener
            (opener, 0, "aead"),
            (sealer + 45, 0x80, "direction flags"),
            // OPEN due after a record went by.
            (sealer + 45, 0x02, "OPEN due"),
            // A counter past the per-key limit (its top byte set).
            (sealer + 33, 0x01, "counter"),
            (opener + 33, 0xff, "counter"),
        ];
        for (at, value, field) in cases {
            let mut bytes = encoded();
            bytes[at] = value;
            assert_eq!(
                SessionState::decode(&bytes).unwrap_err(),
                StateError::Field(field),
                "byte {at} = {value:#x}"
            );
        }
        let mut bytes = encoded();
        let interval = sealer + DIRECTION_LEN;
        bytes[interval..interval + 8].fill(0);
        assert_eq!(
            SessionState::decode(&bytes).unwrap_err(),
            StateError::Field("key-update interval")
        );
        // Every single flipped bit is refused or decodes to a state without a panic.
        let good = encoded();
        for i in 0..good.len() * 8 {
            let mut b = good.to_vec();
            b[i / 8] ^= 1 << (i % 8);
            let _ = SessionState::decode(&b);
        }
    }

    #[test]
    fn debug_shows_no_secret() {
        let (i, _) = pair(AeadKind::Ring);
        let st = i.export();
        let text = format!("{st:?}");
        assert!(text.contains("SessionState") && text.contains("key_id"));
        // The secret is 32 bytes of 7: neither its bytes nor its hex appear.
        assert!(!text.contains("[7, 7") && !text.contains("0707"), "{text}");
    }
}
