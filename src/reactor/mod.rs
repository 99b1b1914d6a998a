//! The reactor: libevent's model in Rust over `mio`.
//!
//! This module is a library. It never imports `crypto`, `proxy`, `metrics` or `config`.

pub mod buffer;
pub mod pool;
pub mod timer;
