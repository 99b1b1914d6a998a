//! sealpipe: an encrypting TCP proxy on a sharded, libevent-style reactor.
//!
//! Layers, lowest first (a layer never imports one above it; see ARCHITECTURE.md):
//!
//! - [`reactor`] (the `sealpipe-reactor` crate): libevent's model in Rust over `mio` —
//!   `EventBase`, timers, signals, `Buffer`, `BufferEvent`, `ConnListener`. It depends on no
//!   crate above it, so it cannot know of crypto, proxies or metrics.
//! - [`protocol`] (the `sealpipe-protocol` crate): the tunnel protocol, sans-I/O — keys,
//!   handshake, sealed records. No sockets, no clock, no file system ([`keyfile`] reads keys).
//! - [`proxy`]: joins the two: the per-connection pipeline, upstream selection, the codec layer.
//! - [`metrics`]: per-shard counters and the Prometheus endpoint.
//! - [`config`], [`server`], [`resolver`], [`unix_listen`]: configuration, shards, the control
//!   thread, the target names it resolves again, and the Unix sockets tunnels listen on.
#![deny(unsafe_code)]

pub mod config;
pub mod demo;
pub mod keyfile;
pub mod metrics;
pub mod proxy;
pub mod resolver;
pub mod server;
pub mod sys;
pub mod unix_listen;

pub use sealpipe_protocol as protocol;
pub use sealpipe_reactor as reactor;
