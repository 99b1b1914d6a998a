//! Every fuzz target's logic over a generated corpus, on stable, in `cargo test`: 100,000
//! inputs per target per run (more with `SEALPIPE_FUZZ_INPUTS=N`), drawn deterministically
//! from a seeded generator that mixes sizes and plants plausible prefixes (a hello's version
//! byte, a record header) so the inputs reach past the first check. Then every file in
//! `fuzz/regressions/TARGET/`: an input a fuzzer once crashed on stays a test for good
//! (`cargo fuzz` leaves it in `fuzz/artifacts/TARGET/`; copy it there, keep the name).
//!
//! A failing input is named by target and index (the generator is deterministic) and written
//! to `target/fuzz-corpus-failures/`, ready to be copied into `regressions/`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use sealpipe_protocol::RandomSource;

use super::FuzzRandom;

const INPUTS: usize = 100_000;

fn inputs_per_target() -> usize {
    std::env::var("SEALPIPE_FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(INPUTS, |n: usize| n.max(INPUTS))
}

/// A length: mostly short (the parsers' first bytes), some long (records, many operations).
fn length(rng: &mut FuzzRandom, max: usize) -> usize {
    let mut b = [0u8; 3];
    rng.fill(&mut b);
    let r = usize::from(u16::from_le_bytes([b[0], b[1]]));
    let n = match b[2] % 100 {
        0..60 => r % 17,
        60..85 => 17 + r % 144,
        85..97 => 161 + r % 1040,
        _ => 1201 + r % 18_800,
    };
    n.min(max)
}

/// Runs `target` over the regression files and `inputs_per_target()` generated inputs;
/// `shape` plants a plausible prefix into about half of them.
fn run(name: &str, max_len: usize, target: fn(&[u8]), shape: fn(&mut FuzzRandom, &mut [u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions")
        .join(name);
    let mut replayed = 0;
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "md") {
                continue;
            }
            let data = std::fs::read(&p).expect("reading a regression input");
            if catch_unwind(|| target(&data)).is_err() {
                panic!("{name}: regression input {} fails again", p.display());
            }
            replayed += 1;
        }
    }
    let seed = name
        .bytes()
        .fold(0x5ea1_u64, |h, b| h.wrapping_mul(31) ^ u64::from(b));
    let mut rng = FuzzRandom(seed);
    let n = inputs_per_target();
    let started = std::time::Instant::now();
    let mut data = Vec::with_capacity(max_len);
    for i in 0..n {
        data.resize(length(&mut rng, max_len), 0);
        rng.fill(&mut data);
        let mut coin = [0u8];
        rng.fill(&mut coin);
        if coin[0] & 1 == 0 {
            shape(&mut rng, &mut data);
        }
        if catch_unwind(AssertUnwindSafe(|| target(&data))).is_err() {
            let saved = save_failure(name, i, &data);
            panic!(
                "{name}: generated input #{i} of {n} ({} bytes) panicked; saved as {} — copy it into fuzz/regressions/{name}/",
                data.len(),
                saved.display()
            );
        }
    }
    eprintln!(
        "{name}: {n} generated inputs and {replayed} regression inputs passed in {:?}",
        started.elapsed()
    );
}

fn save_failure(name: &str, i: usize, data: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/fuzz-corpus-failures")
        .join(name);
    let _ = std::fs::create_dir_all(&dir);
    let p = dir.join(format!("crash-generated-{i}"));
    let _ = std::fs::write(&p, data);
    p
}

/// A hello's version byte and a valid flags byte, after the mode byte.
fn hello_prefix(rng: &mut FuzzRandom, d: &mut [u8]) {
    let mut f = [0u8];
    rng.fill(&mut f);
    if let Some(v) = d.get_mut(1) {
        *v = sealpipe_protocol::handshake::VERSION;
    }
    if let Some(v) = d.get_mut(2) {
        *v = f[0] & 1;
    }
}

/// A DATA record header with a small length, after the mode byte.
fn record_prefix(rng: &mut FuzzRandom, d: &mut [u8]) {
    let mut l = [0u8];
    rng.fill(&mut l);
    if d.len() > 4 {
        d[1..4].copy_from_slice(&[0x01, 0x00, l[0]]);
    }
}

/// For the filter target: the scenario's plausible prefix after its two leading bytes.
fn filter_prefix(rng: &mut FuzzRandom, d: &mut [u8]) {
    if d.len() < 4 {
        return;
    }
    match (d[0] >> 1) % 4 {
        0 => {
            d[2] = sealpipe_protocol::handshake::VERSION;
            d[3] &= 1;
        }
        1 if d.len() > 5 => {
            let len = d[4];
            d[2..5].copy_from_slice(&[0x01, 0x00, len]);
        }
        _ => {
            // Small pieces, so records are cut everywhere.
            let mut s = [0u8];
            rng.fill(&mut s);
            d[1] = s[0] % 8;
        }
    }
}

/// For the buffer target: a large operation every few, so chunk boundaries are crossed.
fn buffer_prefix(_: &mut FuzzRandom, d: &mut [u8]) {
    for op in d.chunks_exact_mut(3).step_by(5) {
        op[2] = 0xff;
    }
}

/// For the PROXY header target: a plausible start of a version 1 line or a version 2 header
/// (signature, a defined version/command and family, a length that fits what follows).
fn proxy_prefix(rng: &mut FuzzRandom, d: &mut [u8]) {
    let mut pick = [0u8; 3];
    rng.fill(&mut pick);
    let v1: [&[u8]; 5] = [
        b"PROXY TCP4 192.0.2.1 198.51.100.7 ",
        b"PROXY TCP6 2001:db8::1 ::1 ",
        b"PROXY UNKNOWN",
        b"PROXY UNKNOWN ",
        b"PROXY TCP4 ",
    ];
    if pick[0] & 1 == 0 {
        let p = v1[usize::from(pick[1]) % v1.len()];
        let n = p.len().min(d.len());
        d[..n].copy_from_slice(&p[..n]);
        // End the line somewhere, as a sender would, mostly within the 107 bytes allowed.
        if d.len() > n + 2 {
            let room = (d.len() - n - 1).min(if pick[2] & 0x80 == 0 { 100 } else { 4096 });
            let at = n + usize::from(pick[2]) % room;
            d[at..at + 2].copy_from_slice(b"\r\n");
        }
        return;
    }
    let sig = sealpipe_proxy_header::SIGNATURE;
    let n = sig.len().min(d.len());
    d[..n].copy_from_slice(&sig[..n]);
    let fams = [0x11u8, 0x21, 0x00, 0x12, 0x31];
    let fixed = [
        0x20 | (pick[1] & 1),
        fams[usize::from(pick[2]) % fams.len()],
    ];
    for (i, b) in fixed.into_iter().enumerate() {
        if let Some(x) = d.get_mut(12 + i) {
            *x = b;
        }
    }
    if d.len() >= 16 {
        let len = u16::try_from(d.len() - 16).unwrap_or(u16::MAX);
        // Mostly exactly what follows, sometimes a little less (bytes after the header).
        let len = len.saturating_sub(u16::from(pick[0] >> 5));
        d[14..16].copy_from_slice(&len.to_be_bytes());
    }
}

#[test]
fn corpus_proxy_header() {
    run("proxy_header", 2200, super::proxy_header, proxy_prefix);
}

#[test]
fn corpus_record() {
    run("record", 4096, super::record, record_prefix);
}

#[test]
fn corpus_handshake() {
    run("handshake", 1024, super::handshake, hello_prefix);
}

#[test]
fn corpus_seal_filter() {
    run("seal_filter", 4096, super::seal_filter, filter_prefix);
}

#[test]
fn corpus_buffer() {
    run("buffer", 600, super::buffer, buffer_prefix);
}
