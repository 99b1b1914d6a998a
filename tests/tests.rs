//! Integration tests: one binary, real sockets on loopback.
mod crypto;
