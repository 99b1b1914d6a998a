//! sealpipe: an encrypting TCP proxy on a sharded, libevent-style reactor.
//!
//! Layers, lowest first (a layer never imports one above it; see ARCHITECTURE.md):
//!
//! - [`reactor`]: libevent's model in Rust over `mio` — `EventBase`, timers, signals, `Buffer`,
//!   `BufferEvent`, `ConnListener`. Knows nothing of crypto, proxies or metrics.
//! - [`crypto`]: the tunnel protocol, sans-I/O — keys, handshake, sealed records. No sockets, no clock.
//! - [`proxy`]: joins the two: the per-connection pipeline, upstream selection, the codec layer.
//! - [`metrics`]: per-shard counters and the Prometheus endpoint.
//! - [`config`], [`server`]: configuration, shards, the control thread.
#![deny(unsafe_code)]

pub mod config;
pub mod crypto;
pub mod metrics;
pub mod proxy;
pub mod reactor;
pub mod server;
pub mod sys;
