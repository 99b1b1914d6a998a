//! Integration tests: one binary, real sockets on loopback.
mod cli;
mod common;
mod crypto;
mod faults;
mod proxy;
mod reactor;
