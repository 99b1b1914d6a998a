//! The thread's pool of X25519 key pairs made in spare time (one per shard, as the reactor's
//! chunk pool is one per thread).
//!
//! Each shard runs one event loop on one thread, so a thread-local pool *is* a per-shard pool:
//! no lock, no atomic, and a [`super::SealFilter`] can draw from it at the moment it needs a key
//! — for a responder, only once the initiator's hello has verified — without holding a handle
//! to shard state. The shard refills it from its idle hook ([`refill_one`]).
//!
//! Invariants: the `RefCell` is borrowed only inside this module's functions, never across a
//! call out of it, so no borrow can overlap another; every key leaves the pool once.

use std::cell::RefCell;

use sealpipe_protocol::{EphemeralKey, EphemeralPool, EphemeralSource, RandomSource};

/// Key pairs a thread keeps ready (each ~0.1 KiB). Enough for a burst of new connections
/// between two idle moments; beyond it, handshakes generate their own.
pub const KEYS_READY: usize = 16;

thread_local! {
    static POOL: RefCell<EphemeralPool> = RefCell::new(EphemeralPool::new(KEYS_READY));
}

/// A key pair from this thread's pool, or made now if it is empty.
pub fn take() -> Box<EphemeralKey> {
    POOL.with(|p| p.borrow_mut().take())
}

/// Whether this thread's pool is below its target.
pub fn wants_refill() -> bool {
    POOL.with(|p| p.borrow().wants_refill())
}

/// Makes one key pair if the pool is below its target (~40 µs); returns whether it still is.
pub fn refill_one() -> bool {
    POOL.with(|p| p.borrow_mut().refill_one())
}

/// Keys this thread has handed out: (ready from the pool, made on demand).
pub fn handed_out() -> (u64, u64) {
    POOL.with(|p| {
        let p = p.borrow();
        (p.hits, p.misses)
    })
}

/// The thread's pool as a handshake's key source.
#[derive(Debug, Default, Clone, Copy)]
pub struct ThreadPool;

impl EphemeralSource for ThreadPool {
    fn ephemeral(&mut self, _: &mut dyn RandomSource) -> Box<EphemeralKey> {
        take()
    }
}
