//! The tunnel protocol, sans-I/O: keys, handshake, sealed records (see docs/PROTOCOL.md).
//!
//! This module does no I/O and reads no clock: the pipeline hands it bytes and randomness and
//! sends what it appends to output buffers; timeouts are the pipeline's. The one exception is
//! [`keys`], which loads key files at configuration time (never on the data path).
//!
//! Invariants: bad input of any kind yields a [`ProtocolError`] and never a panic; key material
//! never appears in `Debug` output; sealing and opening a record never allocate, except to
//! expand a fresh key (after a KEY_UPDATE, or the first record after a hibernation).

pub mod aead;
pub mod error;
pub mod handshake;
pub mod keys;
pub mod record;

pub use aead::{AeadKey, AeadKind};
pub use error::ProtocolError;
pub use handshake::{EphemeralKey, EphemeralPool, Handshake, HandshakeConfig, Session, Status};
pub use keys::{
    Key, KeyError, KeyId, KeySet, OsRandom, RandomSource, generate_key_file, load_key_file,
};
pub use record::{HEADER_LEN, MAX_PAYLOAD, MAX_RECORD_LEN, Opener, RecordType, Sealer, TAG_LEN};
