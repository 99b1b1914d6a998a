//! The tunnel protocol, sans-I/O: keys, handshake, sealed records (see docs/PROTOCOL.md).
//!
//! This crate does no I/O and reads no clock: the pipeline hands it bytes and randomness and
//! sends what it appends to output buffers; timeouts are the pipeline's. Key files reach it as
//! bytes ([`Key::parse_text`]); the `sealpipe` package reads and writes the files.
//!
//! Invariants: bad input of any kind yields a [`ProtocolError`] and never a panic; key material
//! never appears in `Debug` output; sealing and opening a record never allocate, except to
//! expand a fresh key (after a KEY_UPDATE, or the first record after a hibernation).
#![forbid(unsafe_code)]

pub mod aead;
pub mod error;
pub mod handshake;
pub mod keys;
pub mod record;

pub use aead::{AeadKey, AeadKind};
pub use error::ProtocolError;
pub use handshake::{EphemeralKey, EphemeralPool, Handshake, HandshakeConfig, Session, Status};
pub use keys::{Key, KeyId, KeySet, KeyTextError, OsRandom, RandomSource};
pub use record::{HEADER_LEN, MAX_PAYLOAD, MAX_RECORD_LEN, Opener, RecordType, Sealer, TAG_LEN};
