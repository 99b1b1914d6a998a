//! The seal/open codec as a reactor [`Filter`]: it runs the handshake on the sealed side of a
//! connection, then seals what the user writes and opens what the socket delivers.
//!
//! Sealing is in place, and usually copies nothing: a plain side's reads go straight into the
//! payload slots of records laid out at the end of the wire buffer ([`Filter::frame_slots`],
//! a full record then one that fills the chunk's rest, as `encode` tiles them), and each slot
//! is sealed where it lies ([`Filter::frame_in_place`]; the reactor's `Relay`). Bytes that
//! had to wait in the user's output (before the session opened, behind the OPEN, or while the
//! far side was full) go through `encode`, which lays out the record in one reservation of
//! the wire buffer's tail chunk, copies the payload in once and encrypts it where it lies.
//!
//! Opening copies no plaintext: the whole records of the read buffer's front chunk are opened
//! where they lie, each decryption also moving its plaintext down to follow the previous
//! record's ([`sealpipe_protocol::Opener::open_shift`]), and the chunk then moves to the user's
//! input as it is ([`Buffer::split_front_to`]; a partial record left at the chunk's end is
//! copied out instead, or the plaintext is, whichever is smaller). A record that straddles two
//! chunks is made contiguous by a copy; [`Filter::frame_rest`] keeps that rare by having reads
//! start fresh chunks at a record boundary, where the sealer's chunk-filling record sizes tile
//! them. No heap allocation per record.
//!
//! Errors leave as `io::Error`s wrapping a [`ProtocolError`], so the owner can name the cause
//! with [`protocol_error`] without the reactor knowing about crypto. An authenticated ABORT
//! from the peer leaves the same way, as a [`PeerAborted`] ([`peer_abort`]): the connection
//! ends, and the owner resets its plaintext side rather than report a truncation.
//!
//! Control records: an initiator seals OPEN (the client's addresses, [`SealFilter::set_open`])
//! before anything else of the session; a responder reports the OPEN it received
//! ([`SealFilter::take_open`], with a notify). [`SealFilter::abort`] seals an ABORT after
//! whatever output is pending. A warm session's initiator ([`SealFilter::hold_open`]) completes
//! its handshake and then sends nothing until its client is named: then OPEN and the client's
//! first bytes go in one encode; closed before, it sends END alone.
//!
//! Forward secrecy: an initiator takes its X25519 key from the thread's pool ([`ephemeral`]) as
//! it starts; a responder takes one only when the initiator's hello has verified, so garbage or
//! a wrong key costs it no X25519 work.
//!
//! Randomness (handshake nonces, and X25519 keys made on the spot) comes from the
//! [`RandomSource`] the filter is built with: the operating system's ([`OsRandom`], with X25519
//! keys from the thread's pool, which [`SealFilter::new`] builds) or one a test fixes
//! ([`SealFilter::with_rng`], which then also makes the X25519 keys from it, so a test's whole
//! session is reproducible).
//!
//! Live upgrade: [`SealFilter::export`] gives an open session's state ([`SealState`]) to a
//! successor process, whose [`SealFilter::resume`] seals the next record with the next
//! counter and opens the peer's next record; only a session with nothing of its own still
//! pending (its OPEN sealed or taken, no ABORT queued) moves, so a warm session held unopened
//! never does (its held state does not travel).
//!
//! This crate is the codec layer (libevent's `bufferevent_filter`): it joins the reactor and the
//! protocol and nothing else (Architecture Invariant: no proxy policy, metrics or config), so
//! the fuzz targets can drive it without the proxy's dependencies.
#![forbid(unsafe_code)]

pub mod ephemeral;

use std::fmt;
use std::io;

use sealpipe_protocol::{
    AbortReason, EphemeralSource, HEADER_LEN, Handshake, HandshakeConfig, KeyId, KeysFromRng,
    MAX_OPEN_LEN, MAX_PAYLOAD, OpenInfo, OsRandom, ProtocolError, RandomSource, RecordType, Sealer,
    Session, SessionState, Status, TAG_LEN,
};
use sealpipe_reactor::{Buffer, Filter, FilterStatus, FrameSlots};

/// A record smaller than this is not worth splitting bulk data for (to fill a chunk's tail).
const MIN_SPLIT: usize = 4096;

enum Phase {
    Handshake(Handshake),
    Open(Box<Session>),
    Failed,
}

/// Which side of the handshake this connection plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The encrypt side: sends the first hello.
    Initiator,
    /// The decrypt side: answers only an authenticated hello.
    Responder,
}

/// The codec layer of one sealed connection. `R` is where its randomness comes from (see the
/// module doc): the operating system's unless a test fixes it.
pub struct SealFilter<R: RandomSource = OsRandom> {
    phase: Phase,
    role: Role,
    /// The initiator's first hello, sent once the socket is writable.
    hello: Vec<u8>,
    key_id: Option<KeyId>,
    /// After a `Version` failure: the version the peer spoke.
    peer_version: Option<u8>,
    /// Initiator: the OPEN to seal first. Responder: the OPEN received, until taken. Boxed:
    /// it lives only around the handshake, and every connection carries this field for good.
    open: Option<Box<OpenInfo>>,
    /// An ABORT to seal after the pending output (see [`SealFilter::abort`]).
    abort: Option<AbortReason>,
    key_update_interval: Option<u64>,
    rng: R,
    /// X25519 keys come from the thread's pool ([`ephemeral`]), not from `rng`.
    pooled: bool,
    /// Initiator: a warm session, unopened until its client is named (see `hold_open`).
    held: bool,
}

/// A sealed connection's codec state on its way to a successor process (see the module doc).
/// `Debug` shows no secret.
#[derive(Debug)]
pub struct SealState {
    pub role: Role,
    pub session: SessionState,
    /// The rekey interval a test set ([`SealFilter::set_key_update_interval`]); the session
    /// itself carries the interval in force.
    pub key_update_interval: Option<u64>,
}

impl SealFilter {
    /// The codec of a connection moved from a predecessor process: its session goes on where
    /// [`SealFilter::export`] left it, with the operating system's randomness (a session needs
    /// none, but a test's filter keeps its own: [`SealFilter::resume_with`]).
    pub fn resume(state: SealState) -> SealFilter {
        SealFilter::resume_with(state, OsRandom, true)
    }
}

/// The protocol error inside an `io::Error` produced by the codec, if it is one.
pub fn protocol_error(e: &io::Error) -> Option<ProtocolError> {
    e.get_ref()?.downcast_ref::<ProtocolError>().copied()
}

/// The peer sent an authenticated ABORT: its side of the connection was aborted, for this
/// reason. Not a failure of the protocol: the stream up to it was authentic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAborted(pub AbortReason);

impl fmt::Display for PeerAborted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the peer aborted the connection ({})", self.0.as_str())
    }
}

impl std::error::Error for PeerAborted {}

/// The peer's abort reason inside an `io::Error` produced by the codec, if it is one.
pub fn peer_abort(e: &io::Error) -> Option<AbortReason> {
    e.get_ref()?.downcast_ref::<PeerAborted>().map(|a| a.0)
}

fn fail(e: ProtocolError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl SealFilter {
    /// The codec of a new connection, with the operating system's randomness. An initiator
    /// with forward secrecy takes its ephemeral key from the thread's pool
    /// ([`ephemeral::take`]) now, to send its hello; a responder takes none until a hello
    /// verifies.
    pub fn new(role: Role, cfg: &HandshakeConfig) -> SealFilter {
        SealFilter::build(role, cfg, OsRandom, true)
    }
}

impl<R: RandomSource> SealFilter<R> {
    /// The codec of a new connection whose nonces and X25519 keys all come from `rng` (no
    /// pool): a test's fixed source makes the whole session reproducible.
    pub fn with_rng(role: Role, cfg: &HandshakeConfig, rng: R) -> SealFilter<R> {
        SealFilter::build(role, cfg, rng, false)
    }

    fn build(role: Role, cfg: &HandshakeConfig, mut rng: R, pooled: bool) -> SealFilter<R> {
        let mut hello = Vec::new();
        let hs = match role {
            Role::Initiator => {
                let eph = (pooled && cfg.forward_secrecy.offers()).then(ephemeral::take);
                Handshake::initiator_with(cfg, &mut rng, eph, &mut hello)
            }
            Role::Responder => Handshake::responder(cfg),
        };
        SealFilter {
            key_id: hs.key_id(),
            peer_version: None,
            phase: Phase::Handshake(hs),
            role,
            hello,
            open: None,
            abort: None,
            key_update_interval: None,
            rng,
            pooled,
            held: false,
        }
    }

    /// Initiator: the client's addresses, sent in the OPEN that starts the session (without
    /// this, an OPEN with no addresses).
    pub fn set_open(&mut self, open: OpenInfo) {
        if self.role == Role::Initiator {
            self.open = Some(Box::new(open));
            self.held = false;
        }
    }

    /// Initiator: a warm session. Once the handshake completes, the session stays unopened
    /// (Finished goes out, no OPEN) until [`SealFilter::set_open`] names its client; the OPEN
    /// then leads the client's first bytes in one encode. Closed before that (a finishing
    /// encode), it sends END alone: a session the responder may forget without a trace.
    pub fn hold_open(&mut self) {
        if self.role == Role::Initiator {
            self.held = true;
        }
    }

    /// Initiator: the session is held unopened ([`SealFilter::hold_open`]).
    pub fn is_held(&self) -> bool {
        self.held
    }

    /// Responder: the OPEN the initiator sent, once (the decode that received it notifies).
    pub fn take_open(&mut self) -> Option<OpenInfo> {
        match self.role {
            Role::Responder => self.open.take().map(|o| *o),
            Role::Initiator => None,
        }
    }

    /// Ends the session with an ABORT for `reason`, sealed after the output already given
    /// (on the next encode: flush the BufferEvent). False, and nothing is sent, if the session
    /// is not open or this direction already ended.
    pub fn abort(&mut self, reason: AbortReason) -> bool {
        match &self.phase {
            Phase::Open(s) if !s.sealer.end_sent() => {
                self.abort = Some(reason);
                true
            }
            _ => false,
        }
    }

    /// The open session's state for a successor process, if it can move now: its handshake
    /// is done, its OPEN sealed (initiator) or taken (responder), and no ABORT is queued.
    /// `None` otherwise (it may later). The filter is left as it was.
    pub fn export(&self) -> Option<SealState> {
        let Phase::Open(session) = &self.phase else {
            return None;
        };
        if !self.movable() {
            return None;
        }
        Some(SealState {
            role: self.role,
            session: session.export(),
            key_update_interval: self.key_update_interval,
        })
    }

    /// Whether [`export`](Self::export) would give the session's state now (without making
    /// it).
    pub fn movable(&self) -> bool {
        let Phase::Open(session) = &self.phase else {
            return false;
        };
        let open_pending =
            self.open.is_some() || (self.role == Role::Initiator && session.sealer.open_due());
        self.abort.is_none() && !open_pending && self.hello.is_empty()
    }

    /// [`SealFilter::resume`] with randomness from `rng` (`pooled`: X25519 keys would come
    /// from the thread's pool; a resumed session makes none).
    pub fn resume_with(state: SealState, rng: R, pooled: bool) -> SealFilter<R> {
        let session = Session::import(state.session);
        SealFilter {
            key_id: Some(session.key_id),
            peer_version: None,
            phase: Phase::Open(Box::new(session)),
            role: state.role,
            hello: Vec::new(),
            open: None,
            abort: None,
            key_update_interval: state.key_update_interval,
            rng,
            pooled,
            held: false,
        }
    }

    /// After a `Version` failure: the version byte the peer sent.
    pub fn peer_version(&self) -> Option<u8> {
        self.peer_version
    }

    /// Rekey after this many records per direction (tests use tiny values).
    pub fn set_key_update_interval(&mut self, records: u64) {
        self.key_update_interval = Some(records);
        if let Phase::Open(s) = &mut self.phase {
            s.sealer.set_key_update_interval(records);
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// True once the handshake completed on this side.
    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open(_))
    }

    /// The pre-shared key the peer used (known after its hello).
    pub fn key_id(&self) -> Option<KeyId> {
        self.key_id
    }

    pub fn forward_secrecy(&self) -> Option<bool> {
        match &self.phase {
            Phase::Open(s) => Some(s.forward_secrecy),
            _ => None,
        }
    }

    /// Drops the open session's expanded AEAD keys until the next record needs them (see
    /// `Session::hibernate`); true if keys were dropped. Nothing to drop before the handshake
    /// completes.
    pub fn hibernate(&mut self) -> bool {
        match &mut self.phase {
            Phase::Open(s) => s.hibernate(),
            _ => false,
        }
    }

    fn handshake(
        &mut self,
        raw_in: &mut Buffer,
        raw_out: &mut Buffer,
        eof: bool,
    ) -> io::Result<bool> {
        let Phase::Handshake(hs) = &mut self.phase else {
            return Ok(false);
        };
        let n = raw_in.len().min(Handshake::max_message_len());
        let mut out = Vec::new();
        let keys: &mut dyn EphemeralSource = if self.pooled {
            &mut ephemeral::ThreadPool
        } else {
            &mut KeysFromRng
        };
        let status = match raw_in.pullup(n) {
            Some(input) => hs.advance_with(input, &mut self.rng, keys, &mut out),
            None => Ok(Status::NeedMore),
        };
        if !out.is_empty() {
            raw_out.append(&out);
        }
        match status {
            Err(e) => {
                // What the failed hello said, for the owner's log line.
                self.peer_version = hs.peer_version();
                self.key_id = hs.key_id().or(self.key_id);
                self.phase = Phase::Failed;
                Err(fail(e))
            }
            Ok(Status::NeedMore) => {
                if eof {
                    self.phase = Phase::Failed;
                    return Err(fail(ProtocolError::Truncated));
                }
                if raw_in.len() >= Handshake::max_message_len() {
                    // A complete handshake fits in max_message_len; more without progress is
                    // not a handshake.
                    self.phase = Phase::Failed;
                    return Err(fail(ProtocolError::Malformed));
                }
                Ok(false)
            }
            Ok(Status::Done { consumed, session }) => {
                raw_in.drain(consumed);
                self.key_id = Some(session.key_id);
                let mut session = Box::new(session);
                if let Some(n) = self.key_update_interval {
                    session.sealer.set_key_update_interval(n);
                }
                self.phase = Phase::Open(session);
                Ok(true)
            }
        }
    }
}

/// Seals a record with no payload (END, KEY_UPDATE) at the tail of `raw_out`.
fn seal_empty(sealer: &mut Sealer, raw_out: &mut Buffer, ty: RecordType) -> io::Result<()> {
    seal_control(sealer, raw_out, ty, &[])
}

/// Seals a control record (END, KEY_UPDATE, ABORT, OPEN) with `payload` at the tail of
/// `raw_out`, after a KEY_UPDATE if one is due.
fn seal_control(
    sealer: &mut Sealer,
    raw_out: &mut Buffer,
    ty: RecordType,
    payload: &[u8],
) -> io::Result<()> {
    if ty != RecordType::KeyUpdate && sealer.key_update_due() {
        seal_empty(sealer, raw_out, RecordType::KeyUpdate)?;
    }
    let len = HEADER_LEN + payload.len() + TAG_LEN;
    let rec = raw_out.reserve(len);
    rec[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
    let n = sealer
        .seal_in_place(ty, &mut rec[..len], payload.len())
        .map_err(fail)?;
    raw_out.commit(n);
    Ok(())
}

impl<R: RandomSource> Filter for SealFilter<R> {
    fn decode(
        &mut self,
        raw_in: &mut Buffer,
        input: &mut Buffer,
        raw_out: &mut Buffer,
        eof: bool,
    ) -> io::Result<FilterStatus> {
        let mut status = FilterStatus::default();
        if matches!(self.phase, Phase::Handshake(_)) {
            status.notify = self.handshake(raw_in, raw_out, eof)?;
            if !status.notify {
                return Ok(status);
            }
            // The initiator's Finished went into raw_out with the hello answer; user data
            // waiting in output is sealed on the next encode.
        }
        let Phase::Open(session) = &mut self.phase else {
            return Err(fail(ProtocolError::Malformed));
        };
        let opener = &mut session.opener;
        let mut aborted = None;
        // Each pass opens the whole records of raw_in's front chunk where they lie, packing
        // their plaintexts at the chunk's front (`w` bytes; `r` bytes of records consumed),
        // then hands the plaintext to `input` — by moving the chunk when it was all records.
        loop {
            let chunk = raw_in.first_slice_mut();
            let (mut r, mut w) = (0, 0);
            let mut failed = None;
            loop {
                let total = match opener.record_len(&chunk[r..]) {
                    Ok(Some(t)) if t <= chunk.len() - r => t,
                    Ok(_) => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                };
                match opener.open_shift(&mut chunk[w..r + total], r - w) {
                    Ok((RecordType::Data, n)) => w += n,
                    Ok((RecordType::End, _)) => status.end = true,
                    Ok((RecordType::KeyUpdate, _)) => {}
                    // Control payloads lie at chunk[w..w + n] until the next record's
                    // plaintext overwrites them; the opener has checked them already.
                    Ok((RecordType::Open, n)) => {
                        self.open = OpenInfo::decode(&chunk[w..w + n]).ok().map(Box::new);
                        status.notify = true;
                    }
                    Ok((RecordType::Abort, n)) => {
                        aborted = AbortReason::decode(&chunk[w..w + n]).ok();
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
                r += total;
                if aborted.is_some() {
                    // Whatever follows an ABORT is never looked at: the connection is over.
                    break;
                }
            }
            // Plaintext of records before a bad one is delivered, as it was authenticated;
            // none of the bad record's bytes are (they lie beyond `w`).
            raw_in.split_front_to(input, w, r);
            if let Some(e) = failed {
                return Err(fail(e));
            }
            if let Some(reason) = aborted {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    PeerAborted(reason),
                ));
            }
            if r > 0 {
                continue;
            }
            // The front chunk starts with an incomplete record: it straddles into the next
            // chunk (made contiguous by a copy) or has not fully arrived.
            let mut header = [0u8; HEADER_LEN];
            let got = raw_in.copy_out(&mut header);
            let total = match opener.record_len(&header[..got]).map_err(fail)? {
                Some(t) if t <= raw_in.len() => t,
                _ => break,
            };
            if raw_in.pullup(total).is_none() {
                break;
            }
        }
        if eof {
            opener.eof(raw_in.len()).map_err(fail)?;
        }
        Ok(status)
    }

    fn read_limit(&self) -> Option<usize> {
        // A responder's peer has proved nothing until its handshake verifies: stage no more
        // than the handshake can use, in a small buffer rather than a pooled chunk.
        match (&self.phase, self.role) {
            (Phase::Handshake(_), Role::Responder) => Some(Handshake::max_message_len()),
            _ => None,
        }
    }

    fn frame_slots(&mut self, raw_out: &mut Buffer) -> Option<FrameSlots> {
        // Only an open session with nothing to seal ahead of the user's bytes: the hello, the
        // OPEN and an ABORT go through `encode`; after END or ABORT nothing more is sealed.
        if !self.hello.is_empty() || self.abort.is_some() {
            return None;
        }
        let Phase::Open(session) = &mut self.phase else {
            return None;
        };
        let sealer = &mut session.sealer;
        if sealer.end_sent() || sealer.open_due() {
            return None;
        }
        if sealer.key_update_due() {
            seal_empty(sealer, raw_out, RecordType::KeyUpdate).ok()?;
        }
        // Records tile chunks as `encode`'s do: a full one, then one that fills the rest.
        Some(FrameSlots {
            head: HEADER_LEN,
            body: MAX_PAYLOAD,
            tail: TAG_LEN,
            min_body: MIN_SPLIT,
            frames: usize::try_from(sealer.records_before_key_update()).unwrap_or(usize::MAX),
        })
    }

    fn frame_in_place(&mut self, frame: &mut [u8], len: usize) -> io::Result<()> {
        let Phase::Open(session) = &mut self.phase else {
            return Err(fail(ProtocolError::Malformed));
        };
        session
            .sealer
            .seal_in_place(RecordType::Data, frame, len)
            .map_err(fail)?;
        Ok(())
    }

    fn frame_rest(&self, raw_in: &Buffer) -> Option<usize> {
        let Phase::Open(session) = &self.phase else {
            return None;
        };
        // After a decode raw_in holds at most one record, incomplete, at its front.
        let mut header = [0u8; HEADER_LEN];
        let got = raw_in.copy_out(&mut header);
        let total = session.opener.record_len(&header[..got]).ok()??;
        total.checked_sub(raw_in.len()).filter(|&n| n > 0)
    }

    fn encode(
        &mut self,
        output: &mut Buffer,
        raw_out: &mut Buffer,
        finish: bool,
    ) -> io::Result<()> {
        if !self.hello.is_empty() {
            raw_out.append(&self.hello);
            self.hello = Vec::new();
        }
        let Phase::Open(session) = &mut self.phase else {
            return Ok(());
        };
        let sealer = &mut session.sealer;
        if sealer.end_sent() {
            // END or ABORT went out: this direction carries nothing more.
            output.clear();
            return Ok(());
        }
        if sealer.open_due() && self.held {
            // A warm session waits for its client: what the client already sent stays in
            // `output` for the OPEN to lead; closed unused, the session ends with END alone
            // (docs/PROTOCOL.md, "Warm sessions").
            if finish || self.abort.take().is_some() {
                output.clear();
                seal_empty(sealer, raw_out, RecordType::End)?;
            }
            return Ok(());
        }
        if sealer.open_due() {
            let mut payload = [0u8; MAX_OPEN_LEN];
            let n = self
                .open
                .take()
                .map_or_else(OpenInfo::default, |o| *o)
                .encode(&mut payload);
            seal_control(sealer, raw_out, RecordType::Open, &payload[..n])?;
        }
        while !output.is_empty() {
            if sealer.key_update_due() {
                seal_empty(sealer, raw_out, RecordType::KeyUpdate)?;
            }
            let mut n = output.len().min(MAX_PAYLOAD);
            // Fill the tail chunk's room with a smaller record rather than leave it empty,
            // unless that would make a uselessly small record out of bulk data.
            let fit = raw_out.tail_room().saturating_sub(HEADER_LEN + TAG_LEN);
            if fit < n && fit >= MIN_SPLIT {
                n = fit;
            }
            let rec = raw_out.reserve(HEADER_LEN + n + TAG_LEN);
            let copied = output.copy_out(&mut rec[HEADER_LEN..HEADER_LEN + n]);
            debug_assert_eq!(copied, n);
            let len = sealer
                .seal_in_place(RecordType::Data, &mut rec[..HEADER_LEN + n + TAG_LEN], n)
                .map_err(fail)?;
            raw_out.commit(len);
            output.drain(n);
        }
        if let Some(reason) = self.abort.take() {
            seal_control(sealer, raw_out, RecordType::Abort, &[reason.to_byte()])?;
        } else if finish {
            seal_empty(sealer, raw_out, RecordType::End)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use sealpipe_protocol::keys::{Key, KeySet};
    use sealpipe_protocol::{AeadKind, ForwardSecrecy, MAX_RECORD_LEN, record::record_len_for};

    fn config(key: u8, fs: ForwardSecrecy, aead: AeadKind) -> HandshakeConfig {
        HandshakeConfig {
            keys: Arc::new(KeySet::new(Key::from_bytes([key; 32]), vec![])),
            forward_secrecy: fs,
            aead,
        }
    }

    /// Two filters with a completed handshake, built by shuttling their raw buffers.
    fn open_pair(aead: AeadKind) -> (SealFilter, SealFilter) {
        let cfg = config(3, ForwardSecrecy::Off, aead);
        let (mut i, mut r) = (
            SealFilter::new(Role::Initiator, &cfg),
            SealFilter::new(Role::Responder, &cfg),
        );
        let (mut i2r, mut r2i, mut none) = (Buffer::new(), Buffer::new(), Buffer::new());
        for _ in 0..4 {
            i.encode(&mut none, &mut i2r, false).unwrap();
            r.decode(&mut i2r, &mut none, &mut r2i, false).unwrap();
            i.decode(&mut r2i, &mut none, &mut i2r, false).unwrap();
        }
        r.decode(&mut i2r, &mut none, &mut r2i, false).unwrap();
        assert!(i.is_open() && r.is_open() && none.is_empty());
        (i, r)
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn contents(b: &Buffer) -> Vec<u8> {
        b.slices().flatten().copied().collect()
    }

    /// Seals `sizes` as records (one encode each) into one wire byte string.
    fn wire(tx: &mut SealFilter, data: &[u8], sizes: &[usize]) -> Vec<u8> {
        let (mut plain, mut out) = (Buffer::new(), Buffer::new());
        let mut at = 0;
        for &n in sizes {
            plain.append(&data[at..at + n]);
            at += n;
            tx.encode(&mut plain, &mut out, false).unwrap();
        }
        contents(&out)
    }

    #[test]
    fn opens_records_however_the_chunks_cut_them() {
        // Many small records per chunk, full ones, and everything between.
        let sizes: Vec<usize> = (0..120)
            .map(|i| [1, 10, 700, MAX_PAYLOAD, 5000, 0, 16000, 33][i % 8])
            .collect();
        let data = pattern(sizes.iter().sum(), 1);
        for aead in [AeadKind::Ring, AeadKind::RustCrypto] {
            // Pieces of every size class: partial headers, records straddling chunks, records
            // ending exactly at a chunk's end, several chunks at once.
            for piece in [1usize, 2, 3, 1000, 16403, 32768, 40000, 100_000] {
                let (mut tx, mut rx) = open_pair(aead);
                tx.set_key_update_interval(7);
                let bytes = wire(&mut tx, &data, &sizes);
                let (mut raw, mut input, mut none) = (Buffer::new(), Buffer::new(), Buffer::new());
                for p in bytes.chunks(piece) {
                    raw.append(p);
                    rx.decode(&mut raw, &mut input, &mut none, false).unwrap();
                    assert!(raw.len() < MAX_RECORD_LEN, "only a partial record is left");
                }
                assert_eq!(raw.len(), 0);
                assert!(contents(&input) == data, "{aead:?}, pieces of {piece}");
            }
        }
    }

    #[test]
    fn framed_reads_deliver_everything() {
        let (mut tx, mut rx) = open_pair(AeadKind::Ring);
        let data = pattern(3 << 20, 2);
        // Bulk records as the proxy seals them (16 KiB and chunk-filling ones).
        let bytes = wire(&mut tx, &data, &[1 << 20, 1 << 20, 1 << 20]);
        let (mut raw, mut input, mut none) = (Buffer::new(), Buffer::new(), Buffer::new());
        let mut src = &bytes[..];
        let mut step = 1usize;
        while !src.is_empty() {
            // Reads of odd sizes, as a socket gives them.
            step = (step * 7919 + 13) % 300_000 + 1;
            let rest = rx.frame_rest(&raw);
            raw.read_from_framed(&mut src, step, rest).unwrap();
            rx.decode(&mut raw, &mut input, &mut none, false).unwrap();
        }
        assert_eq!(input.len(), data.len());
        assert!(contents(&input) == data);
    }

    #[test]
    fn a_tampered_record_mid_chunk_delivers_only_what_came_before() {
        for aead in [AeadKind::Ring, AeadKind::RustCrypto] {
            let (mut tx, mut rx) = open_pair(aead);
            let data = pattern(10 * 1000, 3);
            let mut bytes = wire(&mut tx, &data, &[1000; 10]);
            // Flip a ciphertext byte of the sixth record; all ten share one chunk.
            bytes[5 * record_len_for(1000) + HEADER_LEN + 10] ^= 1;
            let (mut raw, mut input, mut none) = (Buffer::new(), Buffer::new(), Buffer::new());
            raw.append(&bytes);
            let e = rx
                .decode(&mut raw, &mut input, &mut none, false)
                .unwrap_err();
            assert_eq!(protocol_error(&e), Some(ProtocolError::BadMac));
            assert_eq!(contents(&input), &data[..5000], "{aead:?}");
        }
    }

    #[test]
    fn end_then_bytes_is_malformed_and_eof_checks_the_rest() {
        let (mut tx, mut rx) = open_pair(AeadKind::Ring);
        let (mut plain, mut out) = (Buffer::new(), Buffer::new());
        plain.append(b"last words");
        tx.encode(&mut plain, &mut out, true).unwrap();
        let (mut input, mut none) = (Buffer::new(), Buffer::new());
        let st = rx.decode(&mut out, &mut input, &mut none, true).unwrap();
        assert!(st.end);
        assert_eq!(contents(&input), b"last words");
        out.append(b"\x01");
        let e = rx
            .decode(&mut out, &mut input, &mut none, false)
            .unwrap_err();
        assert_eq!(protocol_error(&e), Some(ProtocolError::Malformed));
    }

    #[test]
    fn unauthenticated_hellos_take_no_ephemeral_key() {
        let cfg = config(3, ForwardSecrecy::Require, AeadKind::Ring);
        let mut wrong = Vec::new();
        Handshake::initiator(
            &config(4, ForwardSecrecy::Require, AeadKind::Ring),
            &mut OsRandom,
            &mut wrong,
        );
        let mut no_fs = Vec::new();
        Handshake::initiator(
            &config(3, ForwardSecrecy::Off, AeadKind::Ring),
            &mut OsRandom,
            &mut no_fs,
        );
        let before = ephemeral::handed_out();
        for bytes in [&b"GET / HTTP/1.1\r\n\r\n"[..], &wrong, &no_fs, &[0x02; 300]] {
            let mut r = SealFilter::new(Role::Responder, &cfg);
            let (mut raw, mut input, mut out) = (Buffer::new(), Buffer::new(), Buffer::new());
            raw.append(bytes);
            assert!(r.decode(&mut raw, &mut input, &mut out, false).is_err());
            assert!(out.is_empty(), "the responder answered");
        }
        assert_eq!(
            ephemeral::handed_out(),
            before,
            "keys were spent on unauthenticated hellos"
        );
        // A hello that verifies takes exactly one, and the responder answers it.
        let mut good = Vec::new();
        Handshake::initiator(&cfg, &mut OsRandom, &mut good);
        let mut r = SealFilter::new(Role::Responder, &cfg);
        let (mut raw, mut input, mut out) = (Buffer::new(), Buffer::new(), Buffer::new());
        raw.append(&good);
        assert!(r.decode(&mut raw, &mut input, &mut out, false).is_ok());
        let (h0, m0) = before;
        let (h1, m1) = ephemeral::handed_out();
        assert_eq!(h1 + m1, h0 + m0 + 1);
        assert!(!out.is_empty());
    }

    #[test]
    fn the_initiator_opens_with_the_client_addresses() {
        let cfg = config(5, ForwardSecrecy::Require, AeadKind::Ring);
        let (mut i, mut r) = (
            SealFilter::new(Role::Initiator, &cfg),
            SealFilter::new(Role::Responder, &cfg),
        );
        let info = OpenInfo::from_socket(
            "[2001:db8::5]:5555".parse().unwrap(),
            "[2001:db8::1]:80".parse().unwrap(),
        );
        i.set_open(info);
        let (mut i2r, mut r2i, mut plain, mut got) =
            (Buffer::new(), Buffer::new(), Buffer::new(), Buffer::new());
        plain.append(b"GET /");
        let mut notified = false;
        for _ in 0..4 {
            i.encode(&mut plain, &mut i2r, false).unwrap();
            notified |= r
                .decode(&mut i2r, &mut got, &mut r2i, false)
                .unwrap()
                .notify;
            i.decode(&mut r2i, &mut Buffer::new(), &mut i2r, false)
                .unwrap();
        }
        assert!(notified);
        assert_eq!(r.take_open(), Some(info));
        assert_eq!(r.take_open(), None, "taken once");
        assert_eq!(contents(&got), b"GET /");
        assert_eq!(r.forward_secrecy(), Some(true));
    }

    #[test]
    fn abort_reaches_the_peer_after_the_data_before_it() {
        // (`unopened` is only a responder's first record: the next test.)
        let after_data = AbortReason::ALL
            .into_iter()
            .filter(|r| *r != AbortReason::Unopened);
        for reason in after_data {
            let (mut tx, mut rx) = open_pair(AeadKind::Ring);
            let (mut plain, mut wire, mut got, mut none) =
                (Buffer::new(), Buffer::new(), Buffer::new(), Buffer::new());
            plain.append(b"last bytes");
            assert!(tx.abort(reason));
            tx.encode(&mut plain, &mut wire, false).unwrap();
            assert!(!tx.abort(reason), "one ABORT, then nothing");
            let e = rx
                .decode(&mut wire, &mut got, &mut none, false)
                .unwrap_err();
            assert_eq!(peer_abort(&e), Some(reason));
            assert_eq!(protocol_error(&e), None);
            assert_eq!(contents(&got), b"last bytes");
            // Nothing more is sealed after it.
            plain.append(b"more");
            tx.encode(&mut plain, &mut wire, true).unwrap();
            assert!(wire.is_empty());
        }
        // Before the session is open there is nothing to abort.
        let cfg = config(3, ForwardSecrecy::Off, AeadKind::Ring);
        assert!(!SealFilter::new(Role::Initiator, &cfg).abort(AbortReason::Reset));
    }

    #[test]
    fn a_responder_closes_an_unopened_session_with_abort_unopened() {
        let cfg = config(5, ForwardSecrecy::Off, AeadKind::Ring);
        let (mut i, mut r) = (
            SealFilter::new(Role::Initiator, &cfg),
            SealFilter::new(Role::Responder, &cfg),
        );
        i.hold_open();
        handshake_with(&mut i, &mut r, &mut Buffer::new());
        assert!(r.abort(AbortReason::Unopened));
        let mut wire = Buffer::new();
        r.encode(&mut Buffer::new(), &mut wire, false).unwrap();
        let e = i
            .decode(&mut wire, &mut Buffer::new(), &mut Buffer::new(), false)
            .unwrap_err();
        assert_eq!(peer_abort(&e), Some(AbortReason::Unopened));
    }

    /// A fixed random source: a counter's bytes.
    struct Counter(u8);

    impl RandomSource for Counter {
        fn fill(&mut self, dst: &mut [u8]) {
            for b in dst {
                self.0 = self.0.wrapping_add(1);
                *b = self.0;
            }
        }
    }

    /// The wire bytes of a whole session (both handshake directions and one record each
    /// way) between filters built with `rng`.
    fn session_bytes(rng: impl Fn(u8) -> Counter) -> Vec<u8> {
        let cfg = config(3, ForwardSecrecy::Require, AeadKind::Ring);
        let mut i = SealFilter::with_rng(Role::Initiator, &cfg, rng(1));
        let mut r = SealFilter::with_rng(Role::Responder, &cfg, rng(100));
        let (mut i2r, mut r2i, mut wire) = (Buffer::new(), Buffer::new(), Vec::new());
        let (mut plain, mut got) = (Buffer::new(), Buffer::new());
        plain.append(b"hello");
        for _ in 0..4 {
            i.encode(&mut plain, &mut i2r, false).unwrap();
            wire.extend(contents(&i2r));
            r.decode(&mut i2r, &mut got, &mut r2i, false).unwrap();
            wire.extend(contents(&r2i));
            i.decode(&mut r2i, &mut Buffer::new(), &mut i2r, false)
                .unwrap();
        }
        assert!(i.is_open() && r.is_open());
        assert_eq!(contents(&got), b"hello");
        wire
    }

    #[test]
    fn a_fixed_random_source_makes_the_whole_session_reproducible() {
        let a = session_bytes(Counter);
        assert_eq!(a, session_bytes(Counter), "same source, same bytes");
        assert_ne!(
            a,
            session_bytes(|s| Counter(s + 1)),
            "the nonces and keys come from the source"
        );
        // The default filter draws from the operating system: two sessions never match.
        let cfg = config(3, ForwardSecrecy::Require, AeadKind::Ring);
        let mut hellos = [Buffer::new(), Buffer::new()];
        for h in &mut hellos {
            SealFilter::new(Role::Initiator, &cfg)
                .encode(&mut Buffer::new(), h, false)
                .unwrap();
        }
        assert_ne!(contents(&hellos[0]), contents(&hellos[1]));
    }

    #[test]
    fn a_version_1_hello_is_a_version_error_naming_version_1() {
        let cfg = config(3, ForwardSecrecy::Require, AeadKind::Ring);
        let mut r = SealFilter::new(Role::Responder, &cfg);
        let (mut raw, mut input, mut out) = (Buffer::new(), Buffer::new(), Buffer::new());
        raw.append(&[0x01, 0x01, 0x00]);
        let e = r.decode(&mut raw, &mut input, &mut out, false).unwrap_err();
        assert_eq!(protocol_error(&e), Some(ProtocolError::Version));
        assert_eq!(r.peer_version(), Some(1));
    }

    #[test]
    fn a_failed_hello_leaves_the_key_id_it_named_for_the_log() {
        let other = config(9, ForwardSecrecy::Require, AeadKind::Ring);
        let mut hello = Vec::new();
        Handshake::initiator(&other, &mut OsRandom, &mut hello);
        let mut r = SealFilter::new(
            Role::Responder,
            &config(3, ForwardSecrecy::Require, AeadKind::Ring),
        );
        let (mut raw, mut input, mut out) = (Buffer::new(), Buffer::new(), Buffer::new());
        raw.append(&hello);
        let e = r.decode(&mut raw, &mut input, &mut out, false).unwrap_err();
        assert_eq!(protocol_error(&e), Some(ProtocolError::UnknownKey));
        assert_eq!(r.key_id(), Some(other.keys.primary().id()));
    }

    /// The filter as a successor process gets it: exported, encoded, decoded, resumed.
    fn moved(f: &SealFilter) -> SealFilter {
        let st = f.export().expect("movable");
        let mut bytes = sealpipe_protocol::Zeroizing::new(Vec::new());
        st.session.encode(&mut bytes);
        let session = SessionState::decode(&bytes).unwrap();
        SealFilter::resume(SealState {
            role: st.role,
            session,
            key_update_interval: st.key_update_interval,
        })
    }

    #[test]
    fn a_moved_filter_continues_mid_record_and_across_key_updates() {
        let (mut tx, mut rx) = open_pair(AeadKind::Ring);
        rx.take_open();
        tx.set_key_update_interval(3);
        let data = pattern(200_000, 9);
        let bytes = wire(&mut tx, &data[..100_000], &[1000; 100]);
        let (mut raw, mut input, mut none) = (Buffer::new(), Buffer::new(), Buffer::new());
        // Half of the stream, cut inside a record: the opener moves with a partial record
        // in its raw buffer, which travels as bytes.
        let cut = bytes.len() / 2 + 7;
        raw.append(&bytes[..cut]);
        rx.decode(&mut raw, &mut input, &mut none, false).unwrap();
        assert!(!raw.is_empty(), "a partial record waits");
        let mut rx = moved(&rx);
        raw.append(&bytes[cut..]);
        rx.decode(&mut raw, &mut input, &mut none, false).unwrap();
        // The sealer moves too, and goes on with the next counter and key.
        let mut tx = moved(&tx);
        let rest = wire(&mut tx, &data[100_000..], &[5000; 20]);
        raw.append(&rest);
        rx.decode(&mut raw, &mut input, &mut none, false).unwrap();
        assert!(raw.is_empty());
        assert!(contents(&input) == data);
        // And the end.
        let (mut plain, mut out) = (Buffer::new(), Buffer::new());
        tx.encode(&mut plain, &mut out, true).unwrap();
        let st = rx.decode(&mut out, &mut input, &mut none, true).unwrap();
        assert!(st.end);
    }

    #[test]
    fn only_a_session_with_nothing_pending_moves() {
        let cfg = config(3, ForwardSecrecy::Off, AeadKind::Ring);
        let i = SealFilter::new(Role::Initiator, &cfg);
        assert!(i.export().is_none(), "still in its handshake");
        let (mut tx, _) = open_pair(AeadKind::Ring);
        assert!(tx.export().is_some());
        tx.abort(AbortReason::Reset);
        assert!(tx.export().is_none(), "an ABORT is queued");
        // A responder whose OPEN was not taken yet.
        let (mut i, mut r) = (
            SealFilter::new(Role::Initiator, &cfg),
            SealFilter::new(Role::Responder, &cfg),
        );
        let (mut i2r, mut r2i, mut none) = (Buffer::new(), Buffer::new(), Buffer::new());
        for _ in 0..4 {
            i.encode(&mut none, &mut i2r, false).unwrap();
            r.decode(&mut i2r, &mut none, &mut r2i, false).unwrap();
            i.decode(&mut r2i, &mut none, &mut i2r, false).unwrap();
        }
        assert!(
            r.is_open() && r.export().is_none(),
            "its OPEN waits to be taken"
        );
        r.take_open();
        let st = r.export().unwrap();
        assert_eq!(st.role, Role::Responder);
        assert_eq!(st.session.key_id(), r.key_id().unwrap());
        assert!(!format!("{st:?}").is_empty());
    }

    /// Runs the handshake between `i` and `r` (an initiator and a responder) to completion,
    /// `plain` waiting in the initiator's output; returns the bytes the responder decoded and
    /// whether it was notified of an OPEN.
    fn handshake_with(
        i: &mut SealFilter,
        r: &mut SealFilter,
        plain: &mut Buffer,
    ) -> (Buffer, bool) {
        let (mut i2r, mut r2i, mut got) = (Buffer::new(), Buffer::new(), Buffer::new());
        let mut notified = false;
        for _ in 0..4 {
            i.encode(plain, &mut i2r, false).unwrap();
            notified |= r
                .decode(&mut i2r, &mut got, &mut r2i, false)
                .unwrap()
                .notify;
            i.decode(&mut r2i, &mut Buffer::new(), &mut i2r, false)
                .unwrap();
        }
        (got, notified)
    }

    #[test]
    fn a_held_open_waits_for_its_client_then_leads_its_first_bytes() {
        let cfg = config(5, ForwardSecrecy::Require, AeadKind::Ring);
        let (mut i, mut r) = (
            SealFilter::new(Role::Initiator, &cfg),
            SealFilter::new(Role::Responder, &cfg),
        );
        i.hold_open();
        let (got, _) = handshake_with(&mut i, &mut r, &mut Buffer::new());
        assert!(i.is_open() && r.is_open(), "the handshake completes");
        assert!(got.is_empty(), "nothing while held");
        assert_eq!(r.take_open(), None, "no OPEN while held");
        // A client arrives: its OPEN and first bytes are sealed by one encode, OPEN first.
        let info = OpenInfo::from_socket(
            "192.0.2.9:4000".parse().unwrap(),
            "192.0.2.1:80".parse().unwrap(),
        );
        // Its first bytes may reach the layer before it is named: they wait.
        let (mut plain, mut wire) = (Buffer::new(), Buffer::new());
        plain.append(b"PING");
        i.encode(&mut plain, &mut wire, false).unwrap();
        assert!(
            wire.is_empty() && plain.len() == 4,
            "held: nothing sealed, nothing lost"
        );
        i.set_open(info);
        i.encode(&mut plain, &mut wire, false).unwrap();
        let types: Vec<u8> = {
            let w = contents(&wire);
            let mut at = 0;
            let mut t = Vec::new();
            while at < w.len() {
                t.push(w[at]);
                at += 3 + usize::from(u16::from_be_bytes([w[at + 1], w[at + 2]])) + 16;
            }
            t
        };
        assert_eq!(types, [0x05, 0x01], "OPEN, then DATA, in one write");
        let (mut got, mut none) = (Buffer::new(), Buffer::new());
        let st = r.decode(&mut wire, &mut got, &mut none, false).unwrap();
        assert!(st.notify);
        assert_eq!(r.take_open(), Some(info));
        assert_eq!(contents(&got), b"PING");
    }

    /// A live upgrade never moves a warm session while it is held: its OPEN is still to be
    /// sealed (ahead of whatever its client sent meanwhile, which waits in the output), and
    /// a successor's filter would not know it holds one. Once its client is named and the
    /// OPEN sealed with the first bytes, it moves like any session.
    #[test]
    fn a_held_session_does_not_move_until_its_open_is_sealed() {
        let cfg = config(5, ForwardSecrecy::Off, AeadKind::Ring);
        let (mut i, mut r) = (
            SealFilter::new(Role::Initiator, &cfg),
            SealFilter::new(Role::Responder, &cfg),
        );
        i.hold_open();
        handshake_with(&mut i, &mut r, &mut Buffer::new());
        assert!(i.is_open() && !i.movable() && i.export().is_none(), "held");
        let (mut plain, mut wire) = (Buffer::new(), Buffer::new());
        plain.append(b"first bytes");
        i.encode(&mut plain, &mut wire, false).unwrap();
        assert!(
            !plain.is_empty() && !i.movable(),
            "held, its client's bytes pending"
        );
        i.set_open(OpenInfo::default());
        assert!(!i.movable(), "named, its OPEN not sealed yet");
        i.encode(&mut plain, &mut wire, false).unwrap();
        assert!(plain.is_empty() && i.movable());
        let mut tx = moved(&i);
        assert!(!tx.is_held());
        // The responder takes the OPEN and the bytes, then what the moved sealer sends.
        let (mut got, mut none) = (Buffer::new(), Buffer::new());
        r.decode(&mut wire, &mut got, &mut none, false).unwrap();
        assert!(r.take_open().is_some());
        plain.append(b", then more");
        tx.encode(&mut plain, &mut wire, false).unwrap();
        r.decode(&mut wire, &mut got, &mut none, false).unwrap();
        assert_eq!(contents(&got), b"first bytes, then more");
    }

    #[test]
    fn a_held_session_closed_unused_sends_end_alone() {
        let cfg = config(5, ForwardSecrecy::Off, AeadKind::Ring);
        let (mut i, mut r) = (
            SealFilter::new(Role::Initiator, &cfg),
            SealFilter::new(Role::Responder, &cfg),
        );
        i.hold_open();
        handshake_with(&mut i, &mut r, &mut Buffer::new());
        let mut wire = Buffer::new();
        i.encode(&mut Buffer::new(), &mut wire, true).unwrap();
        let w = contents(&wire);
        assert_eq!(w.first(), Some(&0x02), "END, with no OPEN before it");
        let (mut got, mut none) = (Buffer::new(), Buffer::new());
        let st = r.decode(&mut wire, &mut got, &mut none, true).unwrap();
        assert!(st.end && got.is_empty());
        assert_eq!(r.take_open(), None);
    }
}
