//! No heap allocation per record on the data path: sealing and opening through the codec layer
//! into pooled buffers allocates nothing once the pool is warm. Counted by a global allocator
//! that only counts the thread that asked it to.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use sealpipe::protocol::keys::{Key, KeySet};
use sealpipe::protocol::{AeadKind, HandshakeConfig};
use sealpipe::proxy::codec::{Role, SealFilter};
use sealpipe::reactor::{Buffer, Filter};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; the bookkeeping touches only
// const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.with(|c| c.get()) {
            COUNT.with(|n| n.set(n.get() + 1));
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if COUNTING.with(|c| c.get()) {
            COUNT.with(|n| n.set(n.get() + 1));
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn allocations(f: impl FnOnce()) -> u64 {
    COUNT.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    COUNT.with(|n| n.get())
}

/// Runs a handshake between two filters by shuttling their raw buffers.
fn open_pair(aead: AeadKind) -> (SealFilter, SealFilter) {
    let keys = Arc::new(KeySet::new(Key::from_bytes([7; 32]), vec![]));
    let cfg = HandshakeConfig {
        keys,
        forward_secrecy: sealpipe::protocol::ForwardSecrecy::Require,
        aead,
    };
    let (mut i, mut r) = (
        SealFilter::new(Role::Initiator, &cfg),
        SealFilter::new(Role::Responder, &cfg),
    );
    let (mut i2r, mut r2i) = (Buffer::new(), Buffer::new());
    let (mut user, mut sink) = (Buffer::new(), Buffer::new());
    for _ in 0..4 {
        i.encode(&mut user, &mut i2r, false).unwrap();
        r.decode(&mut i2r, &mut sink, &mut r2i, false).unwrap();
        i.decode(&mut r2i, &mut sink, &mut i2r, false).unwrap();
    }
    r.decode(&mut i2r, &mut sink, &mut r2i, false).unwrap();
    assert!(i.is_open() && r.is_open());
    (i, r)
}

#[test]
fn sealing_and_opening_allocate_nothing_per_record() {
    for aead in [AeadKind::Ring, AeadKind::RustCrypto] {
        let (mut tx, mut rx) = open_pair(aead);
        let (mut plain, mut wire, mut back, mut none) =
            (Buffer::new(), Buffer::new(), Buffer::new(), Buffer::new());
        let block = vec![0x5a; 64 * 1024];
        // Warm the pool: the first pass takes chunks from the allocator.
        for _ in 0..4 {
            plain.append(&block);
            tx.encode(&mut plain, &mut wire, false).unwrap();
            rx.decode(&mut wire, &mut back, &mut none, false).unwrap();
            back.clear();
        }
        let n = allocations(|| {
            for _ in 0..32 {
                // 2 MiB in 128 records, through both directions of the codec.
                plain.append(&block);
                tx.encode(&mut plain, &mut wire, false).unwrap();
                rx.decode(&mut wire, &mut back, &mut none, false).unwrap();
                assert_eq!(back.len(), block.len());
                back.clear();
            }
        });
        assert_eq!(n, 0, "{aead:?}: {n} heap allocations for 128 records");
    }
}

#[test]
fn sealing_reads_in_place_allocate_nothing_per_record() {
    for aead in [AeadKind::Ring, AeadKind::RustCrypto] {
        let (mut tx, mut rx) = open_pair(aead);
        let (mut wire, mut back, mut none) = (Buffer::new(), Buffer::new(), Buffer::new());
        let block = vec![0x3c; 64 * 1024];
        // Reads straight into record slots (a relayed read), sealed in place, then opened.
        let mut pass = |wire: &mut Buffer, back: &mut Buffer| {
            let mut src = &block[..];
            while !src.is_empty() {
                let slots = tx.frame_slots(wire).expect("an open session");
                wire.read_into_frames(&mut src, usize::MAX, slots, |f, n| tx.frame_in_place(f, n))
                    .unwrap();
            }
            rx.decode(wire, back, &mut none, false).unwrap();
            assert_eq!(back.len(), block.len());
            back.clear();
        };
        for _ in 0..4 {
            pass(&mut wire, &mut back);
        }
        let n = allocations(|| {
            for _ in 0..32 {
                pass(&mut wire, &mut back);
            }
        });
        assert_eq!(n, 0, "{aead:?}: {n} heap allocations for 128 records");
    }
}

/// A connection's buffers take their chunk lists from the thread's list cache and give them
/// back when dropped or shrunk (hibernation), so a shard that opens and closes connections
/// allocates no lists once warm. (Before the cache, every buffer of every connection
/// allocated its list on first use: 4 allocations per cycle here.)
#[test]
fn a_connections_buffers_allocate_nothing_once_warm() {
    let cycle = || {
        // Client input -> far side output, and back; then the connection goes quiet
        // (hibernates: its empty buffers give their lists back) and later closes.
        let (mut c_in, mut u_out, mut u_in, mut c_out) =
            (Buffer::new(), Buffer::new(), Buffer::new(), Buffer::new());
        c_in.append(b"PING\r\n");
        c_in.move_all_to(&mut u_out);
        u_out.drain(6);
        u_in.append(b"+PONG\r\n");
        u_in.move_all_to(&mut c_out);
        c_out.drain(7);
        for b in [&mut c_in, &mut u_out, &mut u_in, &mut c_out] {
            b.shrink_to_fit();
        }
        // Awake again: one more exchange, then the close drops the buffers.
        c_in.append(b"QUIT\r\n");
        c_in.move_all_to(&mut u_out);
        u_in.append(b"+OK\r\n");
        u_in.move_all_to(&mut c_out);
    };
    for _ in 0..4 {
        cycle();
    }
    let n = allocations(|| {
        for _ in 0..100 {
            cycle();
        }
    });
    assert_eq!(n, 0, "{n} heap allocations for 100 connections' buffers");
}
