//! The `buffer` target: `Buffer` operations, read from the input as a program and checked
//! against a `Vec<u8>` model.
//!
//! Each operation is three bytes: an opcode, and a size that is below 512, or, when the third
//! byte is 0xff, up to 64 KiB (two chunks), so most programs are many small operations with
//! an occasional large one.
//! Invariants: nothing panics for any in-contract call (pullup and commit are called within
//! their documented bounds, as the codec calls them); contents and lengths always match the
//! model; an empty buffer holds no chunk; every chunk goes back to the pool in the end.

use sealpipe_reactor::Buffer;
use sealpipe_reactor::pool::{self, CHUNK_SIZE};

fn contents(b: &Buffer) -> Vec<u8> {
    b.slices().flatten().copied().collect()
}

/// Deterministic bytes for operation `k`.
fn bytes(n: usize, k: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(29) ^ k).collect()
}

/// A reader that returns at most `per_call` bytes per call, then `WouldBlock`.
struct Trickle<'a> {
    data: &'a [u8],
    per_call: usize,
}

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.data.is_empty() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.per_call).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// The target.
pub fn buffer(data: &[u8]) {
    let live0 = pool::stats().live_chunks;
    {
        let (mut a, mut b) = (Buffer::new(), Buffer::new());
        let (mut ma, mut mb): (Vec<u8>, Vec<u8>) = (Vec::new(), Vec::new());
        for (k, op) in data.chunks_exact(3).enumerate() {
            let n = if op[2] == 0xff {
                usize::from(op[1]) << 8
            } else {
                usize::from(op[1]) | usize::from(op[2] & 1) << 8
            };
            let k = k as u8;
            match op[0] % 14 {
                0 => {
                    let d = bytes(n, k);
                    a.append(&d);
                    ma.extend_from_slice(&d);
                }
                1 => {
                    a.drain(n);
                    ma.drain(..n.min(ma.len()));
                }
                2 => {
                    a.move_all_to(&mut b);
                    mb.append(&mut ma);
                }
                3 => {
                    a.move_to(&mut b, n);
                    mb.extend(ma.drain(..n.min(ma.len())));
                }
                4 => {
                    b.move_to(&mut a, n);
                    ma.extend(mb.drain(..n.min(mb.len())));
                }
                5 => {
                    let n = n % (CHUNK_SIZE + 1);
                    match a.pullup(n) {
                        Some(s) => assert_eq!(s, &ma[..n]),
                        None => assert!(ma.len() < n),
                    }
                }
                6 => {
                    // Reserve, write a pattern into part of it, commit that part.
                    let room = a.reserve(n);
                    assert!(room.len() >= n.min(CHUNK_SIZE));
                    let c = usize::from(op[1]) % (room.len() + 1);
                    let d = bytes(c, k);
                    room[..c].copy_from_slice(&d);
                    a.commit(c);
                    ma.extend_from_slice(&d);
                }
                7 => {
                    let mut out = vec![0u8; n];
                    let got = a.remove(&mut out);
                    assert_eq!(&out[..got], &ma[..got]);
                    ma.drain(..got);
                }
                8 => {
                    // A decoder that consumed `c` bytes of the front chunk and produced `p`.
                    let front = a.first_slice().len();
                    let c = n % (front + 1);
                    let p = usize::from(op[1]) % (c + 1);
                    let produced = ma[..p].to_vec();
                    a.split_front_to(&mut b, p, c);
                    mb.extend_from_slice(&produced);
                    ma.drain(..c);
                }
                9 => {
                    // A small staging read, as a pre-authentication connection does.
                    let cap = usize::from(op[1]).max(1);
                    let max = usize::from(op[2]).min(cap.saturating_sub(a.len()));
                    let d = bytes(max, k);
                    let got = a
                        .read_limited(&mut &d[..], max, cap)
                        .expect("reading a slice");
                    ma.extend_from_slice(&d[..got]);
                }
                10 => {
                    let d = bytes(n, k);
                    let mut r = Trickle {
                        data: &d,
                        per_call: usize::from(op[1]).max(1) * 97,
                    };
                    let mut read = 0;
                    while let Ok(got) = a.read_from(&mut r, n - read) {
                        if got == 0 {
                            break;
                        }
                        read += got;
                    }
                    assert!(read <= n);
                    ma.extend_from_slice(&d[..read]);
                }
                11 => {
                    let mut out: Vec<u8> = Vec::new();
                    let got = a.write_to(&mut out).expect("writing to a Vec");
                    assert_eq!(&out[..], &ma[..got]);
                    ma.drain(..got);
                }
                12 => {
                    a.shrink_to_fit();
                    std::mem::swap(&mut a, &mut b);
                    std::mem::swap(&mut ma, &mut mb);
                }
                _ => {
                    a.clear();
                    ma.clear();
                }
            }
            assert_eq!(a.len(), ma.len());
            assert_eq!(b.len(), mb.len());
            if a.is_empty() {
                assert_eq!(a.chunk_count(), 0, "an empty buffer holds a chunk");
            }
            let mut peek = vec![0u8; 64.min(ma.len())];
            assert_eq!(a.copy_out(&mut peek), peek.len());
            assert_eq!(peek, ma[..peek.len()]);
        }
        assert_eq!(contents(&a), ma);
        assert_eq!(contents(&b), mb);
    }
    assert_eq!(pool::stats().live_chunks, live0, "a chunk leaked");
}
