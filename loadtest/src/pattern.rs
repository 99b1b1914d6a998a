//! Deterministic pseudo-random byte streams that a receiver can check at any offset.
//!
//! Every stream is named by a 64-bit key (the connection index, or a key the client sends first)
//! and the byte at offset `o` depends only on `(key, o)`. So a sender can resume writing after a
//! short write and a receiver can verify whatever arrives, in any chunking, without keeping a copy
//! of what was sent.
//!
//! Speed matters more than statistical quality here: the generator runs on the same two cores as
//! the proxy under test, at tens of Gbit/s. A stream is therefore a walk through one shared 1 MiB
//! table of splitmix64 words, starting at a key-dependent word, XORed with a mask that changes
//! every lap of the table. Inner loops are plain slice zips that the compiler vectorises, and the
//! per-lap mask means that a dropped, duplicated or reordered chunk is caught even when its length
//! is a multiple of the table size.

/// Words in the shared table (1 MiB): large enough that a lap spans many socket reads.
const TABLE_WORDS: usize = 1 << 17;

/// splitmix64: a cheap, well-mixed 64-bit hash (Steele, Lea, Flood 2014).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The table every stream walks through; build it once and share it by reference.
pub struct Pattern {
    table: Box<[u64]>,
}

impl Default for Pattern {
    fn default() -> Self {
        Self::new()
    }
}

impl Pattern {
    /// Builds the table (about a millisecond).
    pub fn new() -> Self {
        let table = (0..TABLE_WORDS as u64)
            .map(|i| splitmix64(i ^ 0x5EA1_F1FE))
            .collect();
        Pattern { table }
    }

    /// The stream named by `key`.
    pub fn stream(&self, key: u64) -> Stream<'_> {
        let start = splitmix64(key) % TABLE_WORDS as u64;
        Stream {
            table: &self.table,
            start,
            lap_key: splitmix64(key.rotate_left(32) ^ 0xC0FF_EE00),
        }
    }
}

/// One keyed stream; cheap to copy.
#[derive(Clone, Copy)]
pub struct Stream<'a> {
    table: &'a [u64],
    start: u64,
    lap_key: u64,
}

/// Where a verified chunk first differs from the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Absolute stream offset of the first wrong byte.
    pub offset: u64,
    pub expected: u8,
    pub got: u8,
}

impl Stream<'_> {
    fn lap_mask(&self, lap: u64) -> u64 {
        splitmix64(lap ^ self.lap_key)
    }

    /// The word that holds stream bytes `8*i .. 8*i+8`.
    fn word(&self, i: u64) -> u64 {
        let g = i + self.start;
        self.table[(g % TABLE_WORDS as u64) as usize] ^ self.lap_mask(g / TABLE_WORDS as u64)
    }

    /// The byte at stream offset `off`.
    pub fn byte(&self, off: u64) -> u8 {
        self.word(off / 8).to_le_bytes()[(off % 8) as usize]
    }

    /// For word index `i`: the table run that starts there (up to the end of the lap) and the
    /// lap's mask.
    fn run(&self, i: u64) -> (&[u64], u64) {
        let g = i + self.start;
        let idx = (g % TABLE_WORDS as u64) as usize;
        (&self.table[idx..], self.lap_mask(g / TABLE_WORDS as u64))
    }

    /// Writes stream bytes `offset .. offset + buf.len()` into `buf`.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        let mut pos = 0;
        let mut off = offset;
        while pos < buf.len() && !off.is_multiple_of(8) {
            buf[pos] = self.byte(off);
            pos += 1;
            off += 1;
        }
        while buf.len() - pos >= 8 {
            let (run, mask) = self.run(off / 8);
            let words = run.len().min((buf.len() - pos) / 8);
            let dst = &mut buf[pos..pos + words * 8];
            for (chunk, w) in dst.chunks_exact_mut(8).zip(&run[..words]) {
                chunk.copy_from_slice(&(w ^ mask).to_le_bytes());
            }
            pos += words * 8;
            off += words as u64 * 8;
        }
        while pos < buf.len() {
            buf[pos] = self.byte(off);
            pos += 1;
            off += 1;
        }
    }

    /// Checks that `buf` holds stream bytes `offset .. offset + buf.len()`.
    pub fn verify(&self, offset: u64, buf: &[u8]) -> Result<(), Mismatch> {
        let mut pos = 0;
        let mut off = offset;
        let check_bytes = |from: usize, to: usize, off0: u64| -> Result<(), Mismatch> {
            for (k, &got) in buf[from..to].iter().enumerate() {
                let o = off0 + k as u64;
                let expected = self.byte(o);
                if got != expected {
                    return Err(Mismatch {
                        offset: o,
                        expected,
                        got,
                    });
                }
            }
            Ok(())
        };
        let head = ((8 - (off % 8)) % 8).min(buf.len() as u64) as usize;
        check_bytes(0, head, off)?;
        pos += head;
        off += head as u64;
        while buf.len() - pos >= 8 {
            let (run, mask) = self.run(off / 8);
            let words = run.len().min((buf.len() - pos) / 8);
            let src = &buf[pos..pos + words * 8];
            // OR of all differences: branch-free, so it vectorises; locate the byte only on error.
            let diff = src
                .chunks_exact(8)
                .zip(&run[..words])
                .fold(0u64, |acc, (c, w)| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    acc | (u64::from_le_bytes(b) ^ w ^ mask)
                });
            if diff != 0 {
                check_bytes(pos, pos + words * 8, off)?;
            }
            pos += words * 8;
            off += words as u64 * 8;
        }
        check_bytes(pos, buf.len(), off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_is_independent_of_chunking() {
        let p = Pattern::new();
        let s = p.stream(7);
        let n = TABLE_WORDS * 8 * 2 + 1234; // crosses two lap boundaries
        let mut whole = vec![0u8; n];
        s.fill(3, &mut whole);
        let mut pieces = vec![0u8; n];
        let mut pos = 0;
        let mut step = 1;
        while pos < n {
            let end = (pos + step).min(n);
            s.fill(3 + pos as u64, &mut pieces[pos..end]);
            pos = end;
            step = step * 7 % 100_003 + 1;
        }
        assert_eq!(whole, pieces);
        for (k, &b) in whole.iter().enumerate().step_by(997) {
            assert_eq!(b, s.byte(3 + k as u64));
        }
        assert_eq!(s.verify(3, &whole), Ok(()));
    }

    #[test]
    fn verify_finds_the_first_flipped_byte_at_any_alignment() {
        let p = Pattern::new();
        let s = p.stream(42);
        for start in [0u64, 1, 5, 8, 13, TABLE_WORDS as u64 * 8 - 3] {
            let mut buf = vec![0u8; 70_000];
            s.fill(start, &mut buf);
            for at in [0usize, 3, 7, 8, 4096, 69_999] {
                let mut bad = buf.clone();
                bad[at] ^= 0x10;
                if at + 9 < bad.len() {
                    bad[at + 9] ^= 0x01; // a later error must not hide the first
                }
                let m = s.verify(start, &bad).unwrap_err();
                assert_eq!(m.offset, start + at as u64);
                assert_eq!(m.got, buf[at] ^ 0x10);
                assert_eq!(m.expected, buf[at]);
            }
        }
    }

    #[test]
    fn streams_and_laps_differ() {
        let p = Pattern::new();
        let (a, b) = (p.stream(1), p.stream(2));
        let mut x = vec![0u8; 4096];
        let mut y = vec![0u8; 4096];
        a.fill(0, &mut x);
        b.fill(0, &mut y);
        assert_ne!(x, y);
        // The same table position one lap later must not verify: a lost lap is detected.
        let lap = TABLE_WORDS as u64 * 8;
        assert!(a.verify(lap, &x).is_err());
        // A chunk shifted by one byte must not verify either.
        assert!(a.verify(1, &x).is_err());
    }
}
