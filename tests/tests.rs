//! Integration tests: one binary, real sockets on loopback.
mod alloc;
mod cli;
mod common;
mod crypto;
mod faults;
mod lifecycle;
mod proxy;
mod reactor;
