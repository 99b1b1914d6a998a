//! The tunnel protocol, sans-I/O: keys, handshake, sealed records (see docs/PROTOCOL.md).
//!
//! This module does no I/O and reads no clock.
