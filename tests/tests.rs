//! Integration tests: one binary, real sockets on loopback.
mod alloc;
mod cli;
mod common;
mod faults;
mod fleet;
mod identity;
mod keyfile;
mod lifecycle;
mod perimeter;
mod policy;
mod protocol_v2;
mod proxy;
mod upgrade;
mod upstreams;
mod warm;
