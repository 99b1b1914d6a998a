//! The seal/open codec as a reactor [`Filter`]: it runs the handshake on the sealed side of a
//! connection, then seals what the user writes and opens what the socket delivers.
//!
//! Sealing is in place: the record's header, payload and tag are laid out in one reservation of
//! the wire buffer's tail chunk, the payload copied in once and encrypted where it lies. Opening
//! authenticates a whole record where it lies in the read buffer (made contiguous only if it
//! straddles two chunks) and copies the plaintext once into the user's input. No heap
//! allocation per record.
//!
//! Errors leave as `io::Error`s wrapping a [`ProtocolError`], so the owner can name the cause
//! with [`protocol_error`] without the reactor knowing about crypto.

use std::io;

use crate::crypto::keys::OsRandom;
use crate::crypto::{
    EphemeralPool, HEADER_LEN, Handshake, HandshakeConfig, KeyId, MAX_PAYLOAD, ProtocolError,
    RecordType, Sealer, Session, Status, TAG_LEN,
};
use crate::reactor::{Buffer, Filter, FilterStatus};

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

/// The codec layer of one sealed connection.
pub struct SealFilter {
    phase: Phase,
    role: Role,
    /// The initiator's first hello, sent once the socket is writable.
    hello: Vec<u8>,
    key_id: Option<KeyId>,
    end_sent: bool,
    key_update_interval: Option<u64>,
}

/// The protocol error inside an `io::Error` produced by the codec, if it is one.
pub fn protocol_error(e: &io::Error) -> Option<ProtocolError> {
    e.get_ref()?.downcast_ref::<ProtocolError>().copied()
}

fn fail(e: ProtocolError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl SealFilter {
    pub fn new(role: Role, cfg: &HandshakeConfig) -> SealFilter {
        Self::with_pool(role, cfg, None)
    }

    /// [`SealFilter::new`] taking its ephemeral key from a shard's pool of keys made ahead of
    /// time, when the configuration asks for forward secrecy.
    pub fn with_pool(
        role: Role,
        cfg: &HandshakeConfig,
        pool: Option<&mut EphemeralPool>,
    ) -> SealFilter {
        let eph = match pool {
            Some(pool) if cfg.forward_secrecy => Some(pool.take(&mut OsRandom)),
            _ => None,
        };
        let mut hello = Vec::new();
        let hs = match role {
            Role::Initiator => Handshake::initiator_with(cfg, &mut OsRandom, eph, &mut hello),
            Role::Responder => Handshake::responder_with(cfg, eph),
        };
        SealFilter {
            key_id: hs.key_id(),
            phase: Phase::Handshake(hs),
            role,
            hello,
            end_sent: false,
            key_update_interval: None,
        }
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
        let status = match raw_in.pullup(n) {
            Some(input) => hs.advance(input, &mut OsRandom, &mut out),
            None => Ok(Status::NeedMore),
        };
        if !out.is_empty() {
            raw_out.append(&out);
        }
        match status {
            Err(e) => {
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
    let rec = raw_out.reserve(HEADER_LEN + TAG_LEN);
    let n = sealer
        .seal_in_place(ty, &mut rec[..HEADER_LEN + TAG_LEN], 0)
        .map_err(fail)?;
    raw_out.commit(n);
    Ok(())
}

impl Filter for SealFilter {
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
        while raw_in.len() >= HEADER_LEN {
            let header = raw_in.pullup(HEADER_LEN).unwrap_or_default();
            let total = match opener.record_len(header).map_err(fail)? {
                Some(t) => t,
                None => break,
            };
            if raw_in.len() < total {
                break;
            }
            let Some(record) = raw_in.pullup(total) else {
                break;
            };
            let (ty, range) = opener.open_in_place(record).map_err(fail)?;
            match ty {
                RecordType::Data => input.append(&record[range]),
                RecordType::End => status.end = true,
                RecordType::KeyUpdate => {}
            }
            raw_in.drain(total);
        }
        if eof {
            opener.eof(raw_in.len()).map_err(fail)?;
        }
        Ok(status)
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
        if finish && !self.end_sent {
            if sealer.key_update_due() {
                seal_empty(sealer, raw_out, RecordType::KeyUpdate)?;
            }
            seal_empty(sealer, raw_out, RecordType::End)?;
            self.end_sent = true;
        }
        Ok(())
    }
}
