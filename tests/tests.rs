//! Integration tests: one binary, real sockets on loopback.
mod cli;
mod common;
mod crypto;
mod lifecycle;
mod proxy;
mod reactor;
