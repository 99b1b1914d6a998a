//! Sealed records: the framing and AEAD of the data phase, in place and allocation-free.
//!
//! Wire layout of one record (see docs/PROTOCOL.md, "Records"):
//!
//! ```text
//! offset 0      1            3                 3+len
//!        | type | length BE16 | ciphertext (len) | tag (16) |
//! ```
//!
//! Types: DATA (application bytes), END (the direction ended cleanly), KEY_UPDATE, ABORT (the
//! sender's side was aborted; [`super::control::AbortReason`]) and OPEN (the client's
//! addresses; [`super::control::OpenInfo`]), which is the initiator's first record and appears
//! nowhere else.
//!
//! The 3-byte header is the AEAD's associated data, so type and length are authenticated. The
//! nonce is the direction's 12-byte IV XOR the 64-bit big-endian record counter (TLS 1.3 style);
//! the counter starts at 0 for each traffic key and never wraps, because a direction refuses to
//! seal or open more than [`RECORD_LIMIT`] records under one key.
//!
//! Invariants:
//! - A nonce is never reused under a key: the counter only increases, and a KEY_UPDATE moves
//!   to a fresh key (and resets the counter) in both peers at the same record.
//! - `seal_in_place` / `open_in_place` do not allocate, except to expand a new key (the record
//!   after a KEY_UPDATE or after a hibernation); lengths read from the wire are checked before
//!   any slice is taken, and bad input returns an error, never panics.
//! - After END or ABORT, a direction accepts nothing more.
//! - The initiator-to-responder direction starts with exactly one OPEN, or ends at once with
//!   END (an initiator closing a session it never opened); a record of any other type first,
//!   or an OPEN later (or in the other direction), is refused by sealer and opener.
//! - An ABORT `unopened` is only ever the first record of the responder-to-initiator
//!   direction (a responder closing a session whose OPEN it never acted on: docs/PROTOCOL.md,
//!   "Warm sessions"); anywhere else sealer and opener refuse it.
//! - Control records carry exactly their payload: END and KEY_UPDATE none, ABORT one known
//!   code, OPEN a strictly valid address block; anything else is `Malformed` (the sealer
//!   refuses to make one, the opener to accept one).
//! - Traffic secrets and the AES keys expanded from them are zeroed when dropped or replaced
//!   (ring's own key schedule is not: docs/PROTOCOL.md, "Security properties").
//! - Hibernation ([`Sealer::hibernate`], [`Opener::hibernate`]) drops only the expanded AEAD
//!   key, which is a pure function of the direction's traffic secret; the secret, IV and
//!   counter stay, so the next record re-expands the same key and uses the next nonce as if
//!   nothing had happened. The wire cannot tell whether a side hibernated.

use std::fmt;
use std::ops::Range;

use zeroize::Zeroizing;

use super::aead::{AeadKey, AeadKind, NONCE_LEN};
use super::control::{AbortReason, OpenInfo};
use super::error::ProtocolError;
use super::kdf::{LABEL_IV, LABEL_KEY, LABEL_KEY_UPDATE, expand_label, prk};

/// Bytes of a record header: type (1) and payload length (2, big-endian).
pub const HEADER_LEN: usize = 3;
/// Bytes of the AES-GCM tag that ends every record.
pub const TAG_LEN: usize = super::aead::TAG_LEN;
/// Most plaintext bytes in one record.
pub const MAX_PAYLOAD: usize = 16384;
/// Largest record on the wire.
pub const MAX_RECORD_LEN: usize = HEADER_LEN + MAX_PAYLOAD + TAG_LEN;
/// Most records one direction may seal or open under one traffic key (the KEY_UPDATE that ends
/// a key counts). 2^24 full records keep AES-GCM's confidentiality and integrity advantage
/// under 2^-57 (TLS 1.3, RFC 8446 §5.5); see docs/PROTOCOL.md.
pub const RECORD_LIMIT: u64 = 1 << 24;
/// Records a sealer seals under one key before it asks for a KEY_UPDATE: half the hard limit,
/// so a peer that honours the request late still never reaches it.
pub const DEFAULT_KEY_UPDATE_INTERVAL: u64 = 1 << 23;

/// The kind of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordType {
    /// Application bytes.
    Data,
    /// Authenticated end of this direction; empty.
    End,
    /// The sender moves this direction to the next traffic key after this record; empty.
    KeyUpdate,
    /// The sender's side of the connection was aborted (one byte: the reason); the receiver
    /// resets its plaintext peer. Ends the direction like END.
    Abort,
    /// The client's addresses; the initiator's first record, and only there.
    Open,
}

impl RecordType {
    /// The type byte on the wire.
    pub fn to_byte(self) -> u8 {
        match self {
            RecordType::Data => 0x01,
            RecordType::End => 0x02,
            RecordType::KeyUpdate => 0x03,
            RecordType::Abort => 0x04,
            RecordType::Open => 0x05,
        }
    }

    /// Parses a type byte.
    pub fn from_byte(b: u8) -> Option<RecordType> {
        match b {
            0x01 => Some(RecordType::Data),
            0x02 => Some(RecordType::End),
            0x03 => Some(RecordType::KeyUpdate),
            0x04 => Some(RecordType::Abort),
            0x05 => Some(RecordType::Open),
            _ => None,
        }
    }
}

/// Total wire length of a record carrying `payload_len` bytes.
pub const fn record_len_for(payload_len: usize) -> usize {
    HEADER_LEN + payload_len + TAG_LEN
}

/// A 32-byte traffic secret; the key and IV are derived from it. Zeroed when dropped.
pub(crate) type Secret = Zeroizing<[u8; 32]>;

/// What must hold for a control record's payload; `Ok` for DATA.
fn check_payload(ty: RecordType, payload: &[u8]) -> Result<(), ProtocolError> {
    match ty {
        RecordType::Data => Ok(()),
        RecordType::End | RecordType::KeyUpdate if payload.is_empty() => Ok(()),
        RecordType::End | RecordType::KeyUpdate => Err(ProtocolError::Malformed),
        RecordType::Abort => AbortReason::decode(payload).map(|_| ()),
        RecordType::Open => OpenInfo::decode(payload).map(|_| ()),
    }
}

/// One direction's keying state.
struct Direction {
    /// The expanded key for `secret`; `None` while hibernating (see [`Direction::key`]).
    aead: Option<AeadKey>,
    kind: AeadKind,
    iv: [u8; NONCE_LEN],
    /// The current traffic secret: the next secret (KEY_UPDATE) and, after a hibernation, the
    /// key are derived from it.
    secret: Secret,
    /// Records processed under the current key; the next record's counter.
    seq: u64,
    /// KEY_UPDATEs so far: the current key is the `epoch`-th after the handshake's.
    epoch: u32,
    /// END or ABORT went through: nothing more.
    ended: bool,
    /// The next record must be OPEN (the initiator's direction, before its first record), or
    /// END: an initiator may close a session it never opened (a warm session).
    open_next: bool,
    /// An ABORT `unopened` may come next: the responder's direction, before its first record.
    unopened_ok: bool,
}

impl Direction {
    fn new(kind: AeadKind, secret: Secret, open_first: bool) -> Direction {
        let (aead, iv) = derive_key_iv(kind, &secret);
        Direction {
            aead: Some(aead),
            kind,
            iv,
            secret,
            seq: 0,
            epoch: 0,
            ended: false,
            open_next: open_first,
            unopened_ok: !open_first,
        }
    }

    /// The state a successor process needs to go on where this direction is
    /// (`crate::migrate`); the secret is copied into storage that is zeroed when dropped.
    fn parts(&self) -> DirectionParts {
        DirectionParts {
            kind: self.kind,
            secret: Secret::new(*self.secret),
            seq: self.seq,
            epoch: self.epoch,
            ended: self.ended,
            open_next: self.open_next,
        }
    }

    /// The direction again from [`Direction::parts`]: the IV (and, unless `hibernating`, the
    /// key) derived from the secret as the handshake or the last KEY_UPDATE did.
    fn from_parts(p: DirectionParts, hibernating: bool) -> Direction {
        let (aead, iv) = derive_key_iv(p.kind, &p.secret);
        Direction {
            aead: (!hibernating).then_some(aead),
            kind: p.kind,
            iv,
            secret: p.secret,
            seq: p.seq,
            epoch: p.epoch,
            ended: p.ended,
            open_next: p.open_next,
            // Not carried: it holds exactly while the responder's direction has sealed
            // nothing yet (the initiator's starts with OPEN due, so at counter 0 of epoch 0
            // with no OPEN due a direction can only be the responder's, untouched).
            unopened_ok: !p.open_next && p.seq == 0 && p.epoch == 0 && !p.ended,
        }
    }

    /// Whether a record of type `ty` may come next (before its payload is known).
    fn allows(&self, ty: RecordType) -> bool {
        if self.ended {
            return false;
        }
        if self.open_next {
            matches!(ty, RecordType::Open | RecordType::End)
        } else {
            ty != RecordType::Open
        }
    }

    /// [`check_payload`], and where in the direction the record may be: an ABORT `unopened`
    /// only as the responder's first record.
    fn check_control(&self, ty: RecordType, payload: &[u8]) -> Result<(), ProtocolError> {
        check_payload(ty, payload)?;
        if ty == RecordType::Abort
            && AbortReason::decode(payload) == Ok(AbortReason::Unopened)
            && !self.unopened_ok
        {
            return Err(ProtocolError::Malformed);
        }
        Ok(())
    }

    /// Bookkeeping after a record went through: counter, end, open, key update.
    fn advanced(&mut self, ty: RecordType) {
        self.seq += 1;
        self.open_next = false;
        self.unopened_ok = false;
        match ty {
            RecordType::Data | RecordType::Open => {}
            RecordType::End | RecordType::Abort => self.ended = true,
            RecordType::KeyUpdate => self.update(),
        }
    }

    /// The expanded key, re-derived from the secret first if the direction was hibernating.
    /// Awake, this is a branch and no allocation; the first record after a hibernation pays
    /// one HKDF and one key expansion (a microsecond or two) and one allocation.
    #[inline]
    fn key(&mut self) -> &AeadKey {
        let (kind, secret) = (self.kind, &self.secret);
        self.aead.get_or_insert_with(|| rederive_key(kind, secret))
    }

    /// `Debug` for the sealer or opener owning this direction: never key material.
    fn debug(&self, f: &mut fmt::Formatter<'_>, name: &str) -> fmt::Result {
        f.debug_struct(name)
            .field("aead", &self.kind)
            .field("hibernating", &self.aead.is_none())
            .field("seq", &self.seq)
            .field("epoch", &self.epoch)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }

    /// Drops the expanded key; true if there was one to drop.
    fn hibernate(&mut self) -> bool {
        self.aead.take().is_some()
    }

    fn nonce(&self) -> [u8; NONCE_LEN] {
        let mut nonce = self.iv;
        for (n, c) in nonce[NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= c;
        }
        nonce
    }

    /// KEY_UPDATE: next secret = HKDF-Expand-Label(secret, "key update", "", 32); the old
    /// secret is overwritten (and so zeroed) by the new one.
    fn update(&mut self) {
        let mut next = Secret::new([0u8; 32]);
        expand_label(&prk(&self.secret), LABEL_KEY_UPDATE, &[], &mut next[..]);
        let (aead, iv) = derive_key_iv(self.kind, &next);
        self.secret = next;
        self.aead = Some(aead);
        self.iv = iv;
        self.seq = 0;
        self.epoch = self.epoch.wrapping_add(1);
    }
}

/// The key of `secret` again, after a hibernation: exactly [`derive_key_iv`]'s key (the IV it
/// derives is the one the direction kept).
#[cold]
#[inline(never)]
fn rederive_key(kind: AeadKind, secret: &Secret) -> AeadKey {
    derive_key_iv(kind, secret).0
}

fn derive_key_iv(kind: AeadKind, secret: &Secret) -> (AeadKey, [u8; NONCE_LEN]) {
    let prk = prk(secret);
    let mut key = Zeroizing::new([0u8; 32]);
    let mut iv = [0u8; NONCE_LEN];
    expand_label(&prk, LABEL_KEY, &[], &mut key[..]);
    expand_label(&prk, LABEL_IV, &[], &mut iv);
    (AeadKey::new(kind, &key), iv)
}

/// One direction's keying state on its way to a successor process (`crate::migrate`): what
/// [`Direction`] holds apart from what derives from it. The secret is zeroed when dropped.
pub(crate) struct DirectionParts {
    pub(crate) kind: AeadKind,
    pub(crate) secret: Secret,
    pub(crate) seq: u64,
    pub(crate) epoch: u32,
    pub(crate) ended: bool,
    pub(crate) open_next: bool,
}

/// Seals the records this side sends.
pub struct Sealer {
    dir: Direction,
    interval: u64,
}

impl Sealer {
    /// A sealer for the direction whose traffic secret is `secret`; `open_first` for the
    /// initiator's direction, which starts with OPEN.
    pub(crate) fn new(kind: AeadKind, secret: Secret, open_first: bool) -> Sealer {
        Sealer {
            dir: Direction::new(kind, secret, open_first),
            interval: DEFAULT_KEY_UPDATE_INTERVAL,
        }
    }

    /// Seals one record in place.
    ///
    /// `record[..HEADER_LEN]` is reserved for the header, `record[HEADER_LEN..][..payload_len]`
    /// holds the plaintext, and the `TAG_LEN` bytes after it are reserved for the tag. Returns
    /// the record's total length, `record_len_for(payload_len)`; bytes of `record` beyond that
    /// are untouched.
    ///
    /// Errors: `TooLarge` if `payload_len > MAX_PAYLOAD`, or if [`Sealer::key_update_due`] and
    /// `ty` is not `KeyUpdate` (the caller must seal the KEY_UPDATE first); `Malformed` if
    /// `record` is too short, a control record's payload is not exactly what its type carries,
    /// the record is out of order (OPEN first in the initiator's direction, or END there to
    /// close a session never opened; OPEN nowhere else; ABORT `unopened` only as the first
    /// record of the responder's direction), or END or ABORT was already sealed. On error nothing is sealed and the counter does not move.
    pub fn seal_in_place(
        &mut self,
        ty: RecordType,
        record: &mut [u8],
        payload_len: usize,
    ) -> Result<usize, ProtocolError> {
        if payload_len > MAX_PAYLOAD {
            return Err(ProtocolError::TooLarge);
        }
        if !self.dir.allows(ty) {
            return Err(ProtocolError::Malformed);
        }
        if (ty != RecordType::KeyUpdate && self.key_update_due()) || self.dir.seq >= RECORD_LIMIT {
            return Err(ProtocolError::TooLarge);
        }
        let total = record_len_for(payload_len);
        let record = record.get_mut(..total).ok_or(ProtocolError::Malformed)?;
        let (header, rest) = record.split_at_mut(HEADER_LEN);
        let (payload, tag_out) = rest.split_at_mut(payload_len);
        self.dir.check_control(ty, payload)?;
        header[0] = ty.to_byte();
        // payload_len <= MAX_PAYLOAD < 2^16, checked above.
        header[1..].copy_from_slice(&(payload_len as u16).to_be_bytes());
        let nonce = self.dir.nonce();
        let tag = self
            .dir
            .key()
            .seal_in_place_separate_tag(&nonce, header, payload);
        tag_out.copy_from_slice(&tag);
        self.dir.advanced(ty);
        Ok(total)
    }

    /// This direction's state for a successor process, with the key-update interval.
    pub(crate) fn parts(&self) -> (DirectionParts, u64) {
        (self.dir.parts(), self.interval)
    }

    /// A sealer that goes on from [`Sealer::parts`]: the next record gets the next counter.
    pub(crate) fn from_parts(p: DirectionParts, interval: u64, hibernating: bool) -> Sealer {
        let mut s = Sealer {
            dir: Direction::from_parts(p, hibernating),
            interval: DEFAULT_KEY_UPDATE_INTERVAL,
        };
        s.set_key_update_interval(interval);
        s
    }

    /// True while the next record must be OPEN (the initiator's direction, before anything
    /// else was sealed; END is the one alternative: the session closes unopened).
    pub fn open_due(&self) -> bool {
        self.dir.open_next
    }

    /// True when the next record must be a KEY_UPDATE: the caller seals an empty
    /// `RecordType::KeyUpdate` record, which moves this direction to the next key.
    pub fn key_update_due(&self) -> bool {
        self.dir.seq >= self.interval
    }

    /// How many more records may be sealed before [`Sealer::key_update_due`] (0 when it is).
    pub fn records_before_key_update(&self) -> u64 {
        self.interval.saturating_sub(self.dir.seq)
    }

    /// Records sealed under one key before [`Sealer::key_update_due`]; clamped to
    /// `1..RECORD_LIMIT` so the KEY_UPDATE itself always fits under the hard limit.
    pub fn set_key_update_interval(&mut self, records: u64) {
        self.interval = records.clamp(1, RECORD_LIMIT - 1);
    }

    /// True once END or ABORT has been sealed: nothing more can be.
    pub fn end_sent(&self) -> bool {
        self.dir.ended
    }

    /// Drops the expanded AEAD key (about 540 bytes of heap with ring) until the next record
    /// needs it; the next seal re-derives it from the traffic secret. Nothing else changes:
    /// counter, IV, key-update schedule and the wire are as if this was never called. Returns
    /// true if a key was dropped (false if already hibernating).
    pub fn hibernate(&mut self) -> bool {
        self.dir.hibernate()
    }

    /// True while hibernating: the key is dropped and the next record re-derives it.
    pub fn is_hibernating(&self) -> bool {
        self.dir.aead.is_none()
    }

    /// The backend in use.
    pub fn aead_kind(&self) -> AeadKind {
        self.dir.kind
    }

    /// Seals consecutive DATA records laid out back to back in `buf`: record `i` starts where
    /// record `i - 1` ends and holds `payload_lens[i]` plaintext bytes after its reserved header
    /// (see [`Sealer::seal_in_place`]). Stops early, without error, when a KEY_UPDATE is due, so
    /// the caller can seal one and go on. Returns `(records sealed, bytes used)`.
    pub fn seal_batch_in_place(
        &mut self,
        buf: &mut [u8],
        payload_lens: &[usize],
    ) -> Result<(usize, usize), ProtocolError> {
        let mut used = 0;
        for (i, &len) in payload_lens.iter().enumerate() {
            if self.key_update_due() {
                return Ok((i, used));
            }
            let rest = buf.get_mut(used..).ok_or(ProtocolError::Malformed)?;
            used += self.seal_in_place(RecordType::Data, rest, len)?;
        }
        Ok((payload_lens.len(), used))
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.dir.debug(f, "Sealer")
    }
}

/// Opens the records this side receives.
pub struct Opener {
    dir: Direction,
}

impl Opener {
    /// An opener for the direction whose traffic secret is `secret`; `open_first` for the
    /// initiator's direction, which starts with OPEN.
    pub(crate) fn new(kind: AeadKind, secret: Secret, open_first: bool) -> Opener {
        Opener {
            dir: Direction::new(kind, secret, open_first),
        }
    }

    /// From the first bytes of a record (possibly fewer than `HEADER_LEN`): `Ok(None)` when
    /// more bytes are needed to know, `Ok(Some(total))` with the record's whole length.
    ///
    /// Errors: `TooLarge` for a length above `MAX_PAYLOAD`; `Malformed` for an unknown type, a
    /// record out of order (not OPEN or END first in the initiator's direction, OPEN anywhere
    /// else) or any byte after END or ABORT.
    pub fn record_len(&self, header: &[u8]) -> Result<Option<usize>, ProtocolError> {
        let Some(&ty) = header.first() else {
            return Ok(None);
        };
        if !RecordType::from_byte(ty).is_some_and(|ty| self.dir.allows(ty)) {
            return Err(ProtocolError::Malformed);
        }
        let Some(&[hi, lo]) = header.get(1..HEADER_LEN) else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if len > MAX_PAYLOAD {
            return Err(ProtocolError::TooLarge);
        }
        Ok(Some(record_len_for(len)))
    }

    /// Opens exactly one whole record in place and returns its type and the plaintext's range
    /// inside `record`. A KEY_UPDATE moves this direction to the next key (the caller ignores
    /// it); END and ABORT mark the direction ended. The payload of an ABORT or OPEN has been
    /// checked: [`AbortReason::decode`] / [`OpenInfo::decode`] on it cannot fail.
    ///
    /// Errors: `Malformed` if `record` is not exactly one record, is out of order, carries a
    /// control payload its type does not allow, or follows END or ABORT; `TooLarge` as in
    /// [`Opener::record_len`] or when the peer exceeded
    /// `RECORD_LIMIT` records under one key; `BadMac` when the tag does not verify (a modified,
    /// dropped, duplicated or reordered record). After an error the connection must close.
    pub fn open_in_place(
        &mut self,
        record: &mut [u8],
    ) -> Result<(RecordType, Range<usize>), ProtocolError> {
        let (ty, payload_len) = self.check(record)?;
        let (header, rest) = record.split_at_mut(HEADER_LEN);
        let (payload, tag) = rest.split_at_mut(payload_len);
        let tag: &[u8; TAG_LEN] = (&*tag).try_into().map_err(|_| ProtocolError::Malformed)?;
        let nonce = self.dir.nonce();
        self.dir
            .key()
            .open_in_place(&nonce, header, payload, tag)
            .map_err(|()| ProtocolError::BadMac)?;
        self.opened(ty, payload)?;
        Ok((ty, HEADER_LEN..HEADER_LEN + payload_len))
    }

    /// What must hold before a record's tag is checked: `record` is exactly one whole record
    /// of a known type, and the peer is within `RECORD_LIMIT`. Returns the type and payload
    /// length.
    fn check(&self, record: &[u8]) -> Result<(RecordType, usize), ProtocolError> {
        let total = self.record_len(record)?.ok_or(ProtocolError::Malformed)?;
        if record.len() != total {
            return Err(ProtocolError::Malformed);
        }
        if self.dir.seq >= RECORD_LIMIT {
            return Err(ProtocolError::TooLarge);
        }
        let ty = RecordType::from_byte(record[0]).ok_or(ProtocolError::Malformed)?;
        Ok((ty, total - HEADER_LEN - TAG_LEN))
    }

    /// Bookkeeping after a record's tag verified: the counter moves, END and ABORT end the
    /// direction, KEY_UPDATE moves to the next key.
    fn opened(&mut self, ty: RecordType, payload: &[u8]) -> Result<(), ProtocolError> {
        // The tag verified, so the peer really sent this payload: a wrong one is a protocol
        // violation, not tampering.
        self.dir.check_control(ty, payload)?;
        self.dir.advanced(ty);
        Ok(())
    }

    /// Opens the one whole record at `buf[from..]` and leaves its plaintext at the front of
    /// `buf`, in the same pass as the decryption: returns the type and the plaintext's length
    /// `n`, the plaintext being `buf[..n]`. Bytes of `buf` between `n` and the record's end are
    /// unspecified afterwards. A reader packs the plaintexts of consecutive records this way
    /// (`from` = bytes of headers and tags opened so far), with no separate copy.
    ///
    /// Checks and errors as [`Opener::open_in_place`] (`Malformed` also when `from` is out of
    /// range). After an error `buf` holds nothing usable and the connection must close.
    pub fn open_shift(
        &mut self,
        buf: &mut [u8],
        from: usize,
    ) -> Result<(RecordType, usize), ProtocolError> {
        let record = buf.get(from..).ok_or(ProtocolError::Malformed)?;
        let (ty, payload_len) = self.check(record)?;
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&record[..HEADER_LEN]);
        let nonce = self.dir.nonce();
        let n = self
            .dir
            .key()
            .open_shift(&nonce, &header, buf, from + HEADER_LEN)
            .map_err(|()| ProtocolError::BadMac)?;
        debug_assert_eq!(n, payload_len);
        self.opened(ty, buf.get(..n).unwrap_or_default())?;
        Ok((ty, n))
    }

    /// This direction's state for a successor process.
    pub(crate) fn parts(&self) -> DirectionParts {
        self.dir.parts()
    }

    /// An opener that goes on from [`Opener::parts`]: it expects the next counter.
    pub(crate) fn from_parts(p: DirectionParts, hibernating: bool) -> Opener {
        Opener {
            dir: Direction::from_parts(p, hibernating),
        }
    }

    /// True once an authenticated END (or ABORT) has been opened.
    pub fn end_received(&self) -> bool {
        self.dir.ended
    }

    /// As [`Sealer::hibernate`]: drops the expanded key until the next record is opened.
    pub fn hibernate(&mut self) -> bool {
        self.dir.hibernate()
    }

    /// True while hibernating: the key is dropped and the next record re-derives it.
    pub fn is_hibernating(&self) -> bool {
        self.dir.aead.is_none()
    }

    /// Call at the peer's EOF with the number of received bytes not yet opened: `Ok` only if
    /// END was received and nothing follows it; `Truncated` if the stream stopped before END;
    /// `Malformed` if bytes follow END.
    pub fn eof(&self, unconsumed: usize) -> Result<(), ProtocolError> {
        match (self.dir.ended, unconsumed) {
            (false, _) => Err(ProtocolError::Truncated),
            (true, 0) => Ok(()),
            (true, _) => Err(ProtocolError::Malformed),
        }
    }

    /// The backend in use.
    pub fn aead_kind(&self) -> AeadKind {
        self.dir.kind
    }

    /// Opens every complete record at the start of `buf`, in place, calling `on_record` with
    /// each record's type and plaintext. Stops at an incomplete record or after END. Returns
    /// the bytes consumed; the caller keeps `buf[consumed..]` for the next call.
    pub fn open_batch_in_place(
        &mut self,
        buf: &mut [u8],
        mut on_record: impl FnMut(RecordType, &[u8]),
    ) -> Result<usize, ProtocolError> {
        let mut used = 0;
        while !self.dir.ended {
            let Some(rest) = buf.get_mut(used..) else {
                break;
            };
            let Some(total) = self.record_len(rest)? else {
                break;
            };
            let Some(record) = rest.get_mut(..total) else {
                break;
            };
            let (ty, range) = self.open_in_place(record)?;
            on_record(ty, record.get(range).unwrap_or_default());
            used += total;
        }
        Ok(used)
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.dir.debug(f, "Opener")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Sealer, Opener) {
        pair_of(AeadKind::Ring)
    }

    fn seal(s: &mut Sealer, ty: RecordType, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; record_len_for(payload.len())];
        buf[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
        let n = s.seal_in_place(ty, &mut buf, payload.len()).unwrap();
        assert_eq!(n, buf.len());
        buf
    }

    #[test]
    fn round_trip_and_end() {
        let (mut s, mut o) = pair();
        let mut r = seal(&mut s, RecordType::Data, b"hello");
        assert_eq!(o.record_len(&r[..2]).unwrap(), None);
        assert_eq!(o.record_len(&r).unwrap(), Some(r.len()));
        let (ty, range) = o.open_in_place(&mut r).unwrap();
        assert_eq!((ty, &r[range]), (RecordType::Data, &b"hello"[..]));
        assert_eq!(o.eof(0), Err(ProtocolError::Truncated));
        let mut end = seal(&mut s, RecordType::End, b"");
        assert_eq!(o.open_in_place(&mut end).unwrap().0, RecordType::End);
        assert!(o.end_received());
        assert_eq!(o.eof(0), Ok(()));
        assert_eq!(o.eof(1), Err(ProtocolError::Malformed));
        // Nothing after END, either way.
        let mut buf = [0u8; 32];
        assert_eq!(
            s.seal_in_place(RecordType::Data, &mut buf, 1),
            Err(ProtocolError::Malformed)
        );
        assert_eq!(o.record_len(&[1]), Err(ProtocolError::Malformed));
    }

    #[test]
    fn rejects_bad_lengths_and_types() {
        let (mut s, o) = pair();
        assert_eq!(o.record_len(&[0x09]), Err(ProtocolError::Malformed));
        assert_eq!(
            o.record_len(&[0x01, 0x40, 0x01]),
            Err(ProtocolError::TooLarge)
        );
        assert_eq!(o.record_len(&[0x01, 0x40, 0x00]), Ok(Some(MAX_RECORD_LEN)));
        let mut big = vec![0u8; MAX_RECORD_LEN + 1];
        assert_eq!(
            s.seal_in_place(RecordType::Data, &mut big, MAX_PAYLOAD + 1),
            Err(ProtocolError::TooLarge)
        );
        let mut small = [0u8; 10];
        assert_eq!(
            s.seal_in_place(RecordType::Data, &mut small, 5),
            Err(ProtocolError::Malformed)
        );
        assert_eq!(
            s.seal_in_place(RecordType::End, &mut big, 1),
            Err(ProtocolError::Malformed)
        );
    }

    #[test]
    fn key_update_is_required_and_rotates() {
        let (mut s, mut o) = pair();
        s.set_key_update_interval(2);
        for _ in 0..3 {
            for _ in 0..2 {
                let mut r = seal(&mut s, RecordType::Data, b"x");
                o.open_in_place(&mut r).unwrap();
            }
            assert!(s.key_update_due());
            let mut buf = [0u8; 32];
            assert_eq!(
                s.seal_in_place(RecordType::Data, &mut buf, 1),
                Err(ProtocolError::TooLarge)
            );
            let mut ku = seal(&mut s, RecordType::KeyUpdate, b"");
            assert!(!s.key_update_due());
            assert_eq!(o.open_in_place(&mut ku).unwrap().0, RecordType::KeyUpdate);
        }
        // The new key really differs: a record sealed under it does not open under the old one.
        let (_, mut stale) = pair();
        let mut r = seal(&mut s, RecordType::Data, b"y");
        assert_eq!(
            stale.open_in_place(&mut r.clone()),
            Err(ProtocolError::BadMac)
        );
        assert!(o.open_in_place(&mut r).is_ok());
    }

    #[test]
    fn nonce_is_iv_xor_counter() {
        let (mut s, _) = pair();
        let iv = s.dir.iv;
        assert_eq!(s.dir.nonce(), iv);
        s.dir.seq = 0x0102;
        let n = s.dir.nonce();
        assert_eq!(n[..10], iv[..10]);
        assert_eq!(n[10], iv[10] ^ 0x01);
        assert_eq!(n[11], iv[11] ^ 0x02);
    }

    #[test]
    fn hard_record_limit_stops_both_sides() {
        let (mut s, mut o) = pair();
        s.dir.seq = RECORD_LIMIT - 1;
        s.interval = RECORD_LIMIT; // as if the caller ignored key_update_due
        o.dir.seq = RECORD_LIMIT - 1;
        let mut r = seal(&mut s, RecordType::KeyUpdate, b"");
        assert!(o.open_in_place(&mut r).is_ok());
        let (mut s, mut o) = pair();
        s.dir.seq = RECORD_LIMIT;
        s.interval = u64::MAX;
        let mut buf = [0u8; 32];
        assert_eq!(
            s.seal_in_place(RecordType::KeyUpdate, &mut buf, 0),
            Err(ProtocolError::TooLarge)
        );
        o.dir.seq = RECORD_LIMIT;
        let mut r = [0x01u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(o.open_in_place(&mut r), Err(ProtocolError::TooLarge));
    }

    fn pair_of(kind: AeadKind) -> (Sealer, Opener) {
        (
            Sealer::new(kind, Secret::new([9; 32]), false),
            Opener::new(kind, Secret::new([9; 32]), false),
        )
    }

    #[test]
    fn hibernation_at_any_point_changes_nothing_on_the_wire() {
        for kind in [AeadKind::Ring, AeadKind::RustCrypto] {
            // Every pattern of "hibernate the sealer / the opener before record i" over 4
            // records: the records are byte for byte those of a sealer that never hibernated,
            // and they open.
            for pattern in 0u32..1 << 8 {
                let (mut reference, _) = pair_of(kind);
                let (mut s, mut o) = pair_of(kind);
                for i in 0..4 {
                    if pattern & (1 << (2 * i)) != 0 {
                        assert!(s.hibernate());
                        assert!(s.is_hibernating());
                        assert!(!s.hibernate(), "a second hibernate has nothing to drop");
                    }
                    if pattern & (1 << (2 * i + 1)) != 0 {
                        assert!(o.hibernate());
                        assert!(o.is_hibernating());
                    }
                    let payload = [i as u8; 5];
                    let want = seal(&mut reference, RecordType::Data, &payload);
                    let mut got = seal(&mut s, RecordType::Data, &payload);
                    assert!(!s.is_hibernating());
                    assert_eq!(got, want, "{kind:?} pattern {pattern:#x} record {i}");
                    let (ty, range) = o.open_in_place(&mut got).unwrap();
                    assert_eq!((ty, &got[range]), (RecordType::Data, &payload[..]));
                    assert!(!o.is_hibernating());
                }
            }
        }
    }

    #[test]
    fn hibernation_keeps_the_same_key_and_iv() {
        for kind in [AeadKind::Ring, AeadKind::RustCrypto] {
            let (mut s, _) = pair_of(kind);
            let iv = s.dir.iv;
            s.hibernate();
            assert_eq!(s.aead_kind(), kind);
            let _ = s.dir.key();
            assert_eq!(s.aead_kind(), kind);
            assert_eq!(s.dir.key().kind(), kind);
            assert_eq!(derive_key_iv(kind, &s.dir.secret).1, iv);
            assert_eq!(s.dir.iv, iv);
            // Debug output says so, and still shows no key material.
            s.hibernate();
            let d = format!("{s:?}");
            assert!(d.contains("hibernating: true"), "{d}");
        }
    }

    #[test]
    fn key_update_across_hibernation() {
        for kind in [AeadKind::Ring, AeadKind::RustCrypto] {
            let (mut reference, _) = pair_of(kind);
            let (mut s, mut o) = pair_of(kind);
            reference.set_key_update_interval(2);
            s.set_key_update_interval(2);
            // Hibernate both sides at every step: before data, right before the KEY_UPDATE,
            // and right after it (the new key is then dropped before its first use).
            for round in 0..4 {
                for _ in 0..2 {
                    s.hibernate();
                    o.hibernate();
                    let want = seal(&mut reference, RecordType::Data, b"abc");
                    let mut r = seal(&mut s, RecordType::Data, b"abc");
                    assert_eq!(r, want, "{kind:?} round {round}");
                    o.open_in_place(&mut r).unwrap();
                }
                assert!(s.key_update_due());
                s.hibernate();
                o.hibernate();
                let want = seal(&mut reference, RecordType::KeyUpdate, b"");
                let mut ku = seal(&mut s, RecordType::KeyUpdate, b"");
                assert_eq!(ku, want);
                assert_eq!(o.open_in_place(&mut ku).unwrap().0, RecordType::KeyUpdate);
                assert!(s.hibernate() && o.hibernate(), "the new key was expanded");
            }
            // Under the updated key, a stale opener fails: the update really happened.
            let (_, mut stale) = pair_of(kind);
            let mut r = seal(&mut s, RecordType::Data, b"z");
            assert_eq!(
                stale.open_in_place(&mut r.clone()),
                Err(ProtocolError::BadMac)
            );
            o.hibernate();
            assert!(o.open_in_place(&mut r).is_ok());
            // END after a hibernation, then nothing.
            s.hibernate();
            o.hibernate();
            let mut end = seal(&mut s, RecordType::End, b"");
            assert_eq!(o.open_in_place(&mut end).unwrap().0, RecordType::End);
            assert_eq!(o.eof(0), Ok(()));
        }
    }

    #[test]
    fn tampering_is_still_caught_after_hibernation() {
        let (mut s, mut o) = pair();
        let mut r = seal(&mut s, RecordType::Data, b"hello");
        r[4] ^= 1;
        o.hibernate();
        assert_eq!(o.open_in_place(&mut r), Err(ProtocolError::BadMac));
    }

    #[test]
    fn open_shift_packs_plaintexts() {
        for kind in [AeadKind::Ring, AeadKind::RustCrypto] {
            let (mut s, mut o) = (
                Sealer::new(kind, Secret::new([5; 32]), false),
                Opener::new(kind, Secret::new([5; 32]), false),
            );
            s.set_key_update_interval(2);
            let payloads: [&[u8]; 3] = [b"first", b"", b"third record"];
            let mut stream = Vec::new();
            for p in payloads {
                if s.key_update_due() {
                    stream.extend_from_slice(&seal(&mut s, RecordType::KeyUpdate, b""));
                }
                stream.extend_from_slice(&seal(&mut s, RecordType::Data, p));
            }
            // Open them one after the other, packing the plaintexts at the front.
            let (mut r, mut w) = (0, 0);
            let mut types = Vec::new();
            while r < stream.len() {
                let total = o.record_len(&stream[r..]).unwrap().unwrap();
                let (ty, n) = o.open_shift(&mut stream[w..r + total], r - w).unwrap();
                types.push(ty);
                w += n;
                r += total;
            }
            assert_eq!(&stream[..w], b"firstthird record", "{kind}");
            assert_eq!(types.len(), 4);
            assert_eq!(types[2], RecordType::KeyUpdate);
            // Tampered, or not exactly one record: errors, counter unmoved.
            let mut bad = seal(&mut s, RecordType::Data, b"x");
            let mut good = bad.clone();
            bad[HEADER_LEN] ^= 1;
            let mut buf = vec![0u8; 7];
            buf.extend_from_slice(&bad);
            assert_eq!(o.open_shift(&mut buf, 7), Err(ProtocolError::BadMac));
            assert_eq!(o.open_shift(&mut good, 1), Err(ProtocolError::Malformed));
            assert_eq!(o.open_shift(&mut good, 99), Err(ProtocolError::Malformed));
            let mut short = good[..good.len() - 1].to_vec();
            assert_eq!(o.open_shift(&mut short, 0), Err(ProtocolError::Malformed));
        }
    }

    #[test]
    fn batch_seals_and_opens() {
        let (mut s, mut o) = pair();
        s.set_key_update_interval(3);
        let lens = [5usize, 0, 100, 7];
        let mut buf = vec![0u8; lens.iter().map(|&l| record_len_for(l)).sum()];
        let (n, used) = s.seal_batch_in_place(&mut buf, &lens).unwrap();
        assert_eq!(n, 3);
        let mut ku = [0u8; HEADER_LEN + TAG_LEN];
        s.seal_in_place(RecordType::KeyUpdate, &mut ku, 0).unwrap();
        let mut stream = buf[..used].to_vec();
        stream.extend_from_slice(&ku);
        let used = stream.len();
        let mut last = vec![0u8; record_len_for(7)];
        s.seal_in_place(RecordType::Data, &mut last, 7).unwrap();
        // A partial record at the end stays for the next call.
        stream.extend_from_slice(&last[..2]);
        let mut got = Vec::new();
        let consumed = o
            .open_batch_in_place(&mut stream, |ty, p| got.push((ty, p.len())))
            .unwrap();
        assert_eq!(consumed, used);
        assert_eq!(
            got,
            vec![
                (RecordType::Data, 5),
                (RecordType::Data, 0),
                (RecordType::Data, 100),
                (RecordType::KeyUpdate, 0)
            ]
        );
    }

    /// The initiator's direction: a sealer and opener that start with OPEN.
    fn opening_pair() -> (Sealer, Opener) {
        (
            Sealer::new(AeadKind::Ring, Secret::new([4; 32]), true),
            Opener::new(AeadKind::Ring, Secret::new([4; 32]), true),
        )
    }

    fn open_payload() -> Vec<u8> {
        let mut b = [0u8; crate::control::MAX_OPEN_LEN];
        let info = OpenInfo::from_socket(
            "192.0.2.1:5000".parse().unwrap(),
            "192.0.2.2:6379".parse().unwrap(),
        );
        let n = info.encode(&mut b);
        b[..n].to_vec()
    }

    #[test]
    fn open_comes_first_in_the_initiators_direction_and_nowhere_else() {
        // The sealer refuses anything before OPEN (but END: see the next test), and OPEN
        // after the first record.
        let (mut s, mut o) = opening_pair();
        assert!(s.open_due());
        let mut buf = [0u8; 64];
        for ty in [RecordType::Data, RecordType::KeyUpdate] {
            assert_eq!(
                s.seal_in_place(ty, &mut buf, 0),
                Err(ProtocolError::Malformed),
                "{ty:?} before OPEN"
            );
        }
        let mut open = seal(&mut s, RecordType::Open, &open_payload());
        assert!(!s.open_due());
        let p = open_payload();
        let mut again = vec![0u8; record_len_for(p.len())];
        again[HEADER_LEN..HEADER_LEN + p.len()].copy_from_slice(&p);
        assert_eq!(
            s.seal_in_place(RecordType::Open, &mut again, p.len()),
            Err(ProtocolError::Malformed)
        );
        // The opener: DATA first is refused from the header alone; OPEN opens and checks out.
        let mut data_first = seal(&mut pair().0, RecordType::Data, b"x");
        assert_eq!(o.record_len(&data_first), Err(ProtocolError::Malformed));
        assert_eq!(
            o.open_in_place(&mut data_first),
            Err(ProtocolError::Malformed)
        );
        let (ty, range) = o.open_in_place(&mut open).unwrap();
        assert_eq!(ty, RecordType::Open);
        assert_eq!(
            OpenInfo::decode(&open[range]).unwrap(),
            OpenInfo::decode(&p).unwrap()
        );
        let mut d = seal(&mut s, RecordType::Data, b"after");
        assert_eq!(o.open_in_place(&mut d).unwrap().0, RecordType::Data);
        // A second OPEN (sealed by a sealer that thinks it is first) is refused.
        let (mut s2, _) = opening_pair();
        let mut second = seal(&mut s2, RecordType::Open, &p);
        assert_eq!(o.record_len(&second), Err(ProtocolError::Malformed));
        assert_eq!(o.open_in_place(&mut second), Err(ProtocolError::Malformed));
        // The other direction never carries OPEN.
        let (mut rs, ro) = pair();
        assert!(!rs.open_due());
        assert_eq!(
            rs.seal_in_place(RecordType::Open, &mut again, p.len()),
            Err(ProtocolError::Malformed)
        );
        assert_eq!(ro.record_len(&[0x05]), Err(ProtocolError::Malformed));
    }

    #[test]
    fn abort_carries_one_known_code_and_ends_the_direction() {
        let (mut s, mut o) = pair();
        let mut d = seal(&mut s, RecordType::Data, b"before");
        o.open_in_place(&mut d).unwrap();
        // Bad payloads are refused by the sealer (nothing sealed, counter unmoved).
        let mut buf = [0u8; 64];
        for payload in [&[][..], &[0u8][..], &[6u8][..], &[1u8, 1][..]] {
            buf[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
            assert_eq!(
                s.seal_in_place(RecordType::Abort, &mut buf, payload.len()),
                Err(ProtocolError::Malformed),
                "{payload:?}"
            );
        }
        let mut abort = seal(&mut s, RecordType::Abort, &[AbortReason::Timeout.to_byte()]);
        assert!(s.end_sent());
        assert_eq!(
            s.seal_in_place(RecordType::Data, &mut buf, 1),
            Err(ProtocolError::Malformed)
        );
        let (ty, range) = o.open_in_place(&mut abort).unwrap();
        assert_eq!(ty, RecordType::Abort);
        assert_eq!(AbortReason::decode(&abort[range]), Ok(AbortReason::Timeout));
        assert!(o.end_received());
        assert_eq!(o.record_len(&[0x01]), Err(ProtocolError::Malformed));
    }

    #[test]
    fn a_control_record_with_a_bad_payload_that_authenticates_is_malformed() {
        // Made with a sealer that skips the payload check: what a buggy or hostile peer that
        // holds the key could send.
        for (ty, payload) in [
            (RecordType::Abort, &[9u8][..]),
            (RecordType::Abort, &[][..]),
            (RecordType::End, &[1u8][..]),
            (RecordType::KeyUpdate, &[0u8, 0][..]),
        ] {
            let (mut raw, mut o) = pair();
            let mut rec = forge(&mut raw, ty, payload);
            let mut shifted = rec.clone();
            assert_eq!(
                o.open_in_place(&mut rec),
                Err(ProtocolError::Malformed),
                "{ty:?}"
            );
            let (_, mut o2) = pair();
            assert_eq!(
                o2.open_shift(&mut shifted, 0),
                Err(ProtocolError::Malformed)
            );
        }
    }

    #[test]
    fn an_unopened_session_may_end_before_its_open() {
        // The initiator closes a warm session it never used: END is its first record, and
        // nothing follows (no OPEN, no DATA).
        let (mut s, mut o) = opening_pair();
        let mut end = seal(&mut s, RecordType::End, b"");
        assert!(s.end_sent());
        let mut buf = [0u8; 64];
        assert_eq!(
            s.seal_in_place(RecordType::Data, &mut buf, 1),
            Err(ProtocolError::Malformed)
        );
        assert_eq!(o.open_in_place(&mut end).unwrap().0, RecordType::End);
        assert!(o.end_received());
        assert_eq!(o.record_len(&[0x05]), Err(ProtocolError::Malformed));
        // KEY_UPDATE and ABORT still may not come before OPEN.
        let (mut s, _) = opening_pair();
        for (ty, p) in [
            (RecordType::KeyUpdate, &[][..]),
            (RecordType::Abort, &[1u8][..]),
        ] {
            buf[HEADER_LEN..HEADER_LEN + p.len()].copy_from_slice(p);
            assert_eq!(
                s.seal_in_place(ty, &mut buf, p.len()),
                Err(ProtocolError::Malformed),
                "{ty:?} before OPEN"
            );
        }
    }

    /// A record of `ty` with `payload`, sealed by a sealer that checks nothing (a buggy or
    /// hostile peer holding the key), as the next record of `raw`'s direction.
    fn forge(raw: &mut Sealer, ty: RecordType, payload: &[u8]) -> Vec<u8> {
        let mut rec = vec![0u8; record_len_for(payload.len())];
        rec[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
        rec[0] = ty.to_byte();
        rec[1..3].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        let nonce = raw.dir.nonce();
        let (header, rest) = rec.split_at_mut(HEADER_LEN);
        let (body, tag) = rest.split_at_mut(payload.len());
        tag.copy_from_slice(
            &raw.dir
                .key()
                .seal_in_place_separate_tag(&nonce, header, body),
        );
        raw.dir.advanced(ty);
        rec
    }

    #[test]
    fn abort_unopened_is_only_the_responders_first_record() {
        let unopened = [AbortReason::Unopened.to_byte()];
        // The responder's direction, first record: sealed and opened.
        let (mut s, mut o) = pair();
        let mut a = seal(&mut s, RecordType::Abort, &unopened);
        let (ty, range) = o.open_in_place(&mut a).unwrap();
        assert_eq!(ty, RecordType::Abort);
        assert_eq!(AbortReason::decode(&a[range]), Ok(AbortReason::Unopened));
        // After any record of the direction (a KEY_UPDATE included) it is refused both ways.
        for first in [RecordType::Data, RecordType::KeyUpdate] {
            let (mut s, mut o) = pair();
            let mut r = seal(&mut s, first, b"");
            o.open_in_place(&mut r).unwrap();
            let mut buf = [0u8; 64];
            buf[HEADER_LEN] = unopened[0];
            assert_eq!(
                s.seal_in_place(RecordType::Abort, &mut buf, 1),
                Err(ProtocolError::Malformed),
                "sealed after {first:?}"
            );
            let mut forged = forge(&mut s, RecordType::Abort, &unopened);
            assert_eq!(
                o.open_in_place(&mut forged),
                Err(ProtocolError::Malformed),
                "opened after {first:?}"
            );
        }
        // The initiator's direction never carries it, not even after its OPEN.
        let (mut s, mut o) = opening_pair();
        let mut open = seal(&mut s, RecordType::Open, &open_payload());
        o.open_in_place(&mut open).unwrap();
        let mut forged = forge(&mut s, RecordType::Abort, &unopened);
        assert_eq!(o.open_in_place(&mut forged), Err(ProtocolError::Malformed));
    }
}
