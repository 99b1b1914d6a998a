//! The tunnel protocol, sans-I/O: keys, handshake, sealed records (see docs/PROTOCOL.md).
//!
//! This crate does no I/O and reads no clock: the pipeline hands it bytes and randomness and
//! sends what it appends to output buffers; timeouts are the pipeline's. Key files reach it as
//! bytes ([`Key::parse_text`]); the `sealpipe` package reads and writes the files.
//!
//! This is version 2 of the protocol: every derivation uses TLS 1.3-style length-prefixed labels
//! ([`kdf`]), the pre-shared key is used only through subkeys derived from it ([`keys`]), the
//! responder's hello MAC confirms the X25519 result, and the record layer has ABORT and OPEN
//! control records ([`control`]).
//!
//! Invariants: bad input of any kind yields a [`ProtocolError`] and never a panic; key material
//! never appears in `Debug` output and is zeroed when dropped (except inside ring's own key
//! types, which it does not wipe); sealing and opening a record never allocate, except to
//! expand a fresh key (after a KEY_UPDATE, or the first record after a hibernation).
//!
//! A session can leave this process for a successor ([`migrate`]: a live upgrade): its
//! secrets, counters and key-update epochs, encoded in a versioned layout that the successor
//! checks field by field, so the sealed stream goes on with the next record.
#![forbid(unsafe_code)]

pub mod aead;
pub mod control;
pub mod ephemeral;
pub mod error;
pub mod handshake;
pub mod kdf;
pub mod keys;
pub mod migrate;
pub mod record;

pub use aead::{AeadKey, AeadKind};
pub use control::{AbortReason, ClientAddrs, MAX_OPEN_LEN, OpenInfo};
pub use ephemeral::{EphemeralKey, EphemeralPool, EphemeralSource, KeysFromRng};
pub use error::ProtocolError;
pub use handshake::{ForwardSecrecy, Handshake, HandshakeConfig, Session, Status};
pub use keys::{Key, KeyId, KeySet, KeyTextError, OsRandom, RandomSource};
pub use migrate::{SessionState, StateError};
pub use record::{HEADER_LEN, MAX_PAYLOAD, MAX_RECORD_LEN, Opener, RecordType, Sealer, TAG_LEN};
/// Storage zeroed when dropped, which [`SessionState::encode`] writes secrets into.
pub use zeroize::Zeroizing;
