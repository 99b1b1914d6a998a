//! Integration tests: one binary, real sockets on loopback.
mod alloc;
mod cli;
mod common;
mod faults;
mod keyfile;
mod lifecycle;
mod perimeter;
mod proxy;
mod upstreams;
