//! The reactor: libevent's model in Rust over `mio`.
//!
//! | libevent | here |
//! |---|---|
//! | `event_base` | [`EventBase`] (+ [`Handle`] for other threads) |
//! | `event` | [`Handler`] (a slab entry owning sources; its timers and notifications carry a [`Tag`]), [`event::Event`] (a callback) |
//! | signal events | [`signal::SignalEvent`] |
//! | `evbuffer` | [`Buffer`] (chunks from a per-thread [`pool`]) |
//! | `bufferevent` / `bufferevent_filter` | [`BufferEvent`] with a [`Filter`]: an I/O-free [`BevCore`] over a [`Socket`] (`bufferevent_sock`), whose [`Stream`] is TCP or a Unix domain socket |
//! | `evconnlistener` | [`listener::ConnListener`] |
//!
//! This crate is a library. It depends on no crypto, proxy, metrics or config crate, so it cannot
//! import them (Architecture Invariant, kept by the compiler).
#![forbid(unsafe_code)]

pub mod base;
pub mod buffer;
pub mod bufferevent;
pub mod clock;
pub mod event;
pub mod listener;
pub mod pool;
pub mod signal;
pub mod stream;
pub mod tag;
pub mod timer;

pub use base::{Context, EventBase, Handle, Handler, HandlerId, LoopStats, Ready};
pub use buffer::{Buffer, FrameSlots};
pub use bufferevent::{
    BevCore, BevEvents, BevState, BufferEvent, Filter, FilterStatus, NoFilter, Readiness, Relay,
    Socket, Suspend, Timeouts, Transport, Watermarks,
};
pub use clock::{Clock, ManualClock};
pub use listener::{ConnListener, ListenerOptions};
pub use stream::{Endpoint, Stream};
pub use tag::Tag;
pub use timer::TimerKey;
