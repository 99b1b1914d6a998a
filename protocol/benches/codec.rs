//! Record codec and handshake benchmarks.
//!
//! `raw` is the bare AES-256-GCM call of each backend over the same bytes; `codec` is
//! `Sealer::seal_in_place` / `Opener::open_batch_in_place` (header, nonce, counter, checks), so
//! the gap between them is the codec's overhead. `handshake` runs both roles of one complete
//! handshake per iteration (so its rate is per pair of peers, on one core), with ring's X25519
//! keys made on the spot as the proxy's pool makes them.
//!
//! Run: `cargo bench --bench codec -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sealpipe_protocol::record::{RecordType, record_len_for};
use sealpipe_protocol::{
    AeadKey, AeadKind, EphemeralKey, EphemeralPool, ForwardSecrecy, HEADER_LEN, Handshake,
    HandshakeConfig, Key, KeySet, MAX_OPEN_LEN, OpenInfo, OsRandom, Session, Status, TAG_LEN,
};

const SIZES: [usize; 2] = [1024, 16384];
const KINDS: [AeadKind; 2] = [AeadKind::Ring, AeadKind::RustCrypto];
/// Records prepared (untimed) per timed round of the open benches.
const BATCH: usize = 32;

fn config(fs: bool, aead: AeadKind) -> HandshakeConfig {
    HandshakeConfig {
        keys: Arc::new(KeySet::new(Key::from_bytes([0x5a; 32]), Vec::new())),
        forward_secrecy: if fs {
            ForwardSecrecy::Require
        } else {
            ForwardSecrecy::Off
        },
        aead,
    }
}

fn handshake(ic: &HandshakeConfig, rc: &HandshakeConfig) -> (Session, Session) {
    let mut rng = OsRandom;
    let mut to_r = Vec::with_capacity(Handshake::max_message_len());
    let mut to_i = Vec::with_capacity(Handshake::max_message_len());
    let eph = ic
        .forward_secrecy
        .offers()
        .then(|| Box::new(EphemeralKey::generate()));
    let mut i = Handshake::initiator_with(ic, &mut rng, eph, &mut to_r);
    let mut r = Handshake::responder(rc);
    // An empty pool: the responder's key is made on demand, with ring, once the hello verified.
    r.advance_with(&to_r, &mut rng, &mut EphemeralPool::new(0), &mut to_i)
        .expect("hello");
    let Ok(Status::Done { session: si, .. }) = i.advance(&to_i, &mut rng, &mut to_r) else {
        panic!("initiator not done");
    };
    let Ok(Status::Done { session: sr, .. }) = r.advance(&to_r, &mut rng, &mut to_i) else {
        panic!("responder not done");
    };
    (si, sr)
}

/// A handshake and the OPEN that starts the initiator's direction: what every connection pays
/// before its first DATA record.
fn opened(ic: &HandshakeConfig, rc: &HandshakeConfig) -> (Session, Session) {
    let (mut si, mut sr) = handshake(ic, rc);
    let mut payload = [0u8; MAX_OPEN_LEN];
    let n = OpenInfo::default().encode(&mut payload);
    let mut rec = vec![0u8; record_len_for(n)];
    rec[HEADER_LEN..HEADER_LEN + n].copy_from_slice(&payload[..n]);
    si.sealer
        .seal_in_place(RecordType::Open, &mut rec, n)
        .unwrap();
    sr.opener.open_in_place(&mut rec).unwrap();
    (si, sr)
}

fn seal(c: &mut Criterion) {
    let mut g = c.benchmark_group("seal");
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        for kind in KINDS {
            let key = AeadKey::new(kind, &[7; 32]);
            let nonce = [1u8; 12];
            let header = [0x01, 0, 0];
            let mut buf = vec![0xabu8; size];
            g.bench_function(BenchmarkId::new(format!("raw/{kind}"), size), |b| {
                b.iter(|| black_box(key.seal_in_place_separate_tag(&nonce, &header, &mut buf)))
            });
            let (mut s, _) = opened(&config(false, kind), &config(false, kind));
            let mut rec = vec![0xabu8; record_len_for(size)];
            g.bench_function(BenchmarkId::new(format!("codec/{kind}"), size), |b| {
                b.iter(|| {
                    if s.sealer.key_update_due() {
                        s.sealer
                            .seal_in_place(RecordType::KeyUpdate, &mut rec, 0)
                            .unwrap();
                    }
                    black_box(
                        s.sealer
                            .seal_in_place(RecordType::Data, &mut rec, size)
                            .unwrap(),
                    )
                })
            });
        }
    }
    g.finish();
}

fn open(c: &mut Criterion) {
    let mut g = c.benchmark_group("open");
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        for kind in KINDS {
            // Raw: BATCH ciphertexts under distinct nonces, restored (untimed) before each round
            // because opening decrypts in place.
            let key = AeadKey::new(kind, &[7; 32]);
            let header = [0x01, 0, 0];
            let pristine: Vec<(Vec<u8>, [u8; TAG_LEN], [u8; 12])> = (0..BATCH)
                .map(|n| {
                    let mut nonce = [0u8; 12];
                    nonce[11] = n as u8;
                    let mut ct = vec![0xabu8; size];
                    let tag = key.seal_in_place_separate_tag(&nonce, &header, &mut ct);
                    (ct, tag, nonce)
                })
                .collect();
            let mut work: Vec<Vec<u8>> = pristine.iter().map(|p| p.0.clone()).collect();
            g.bench_function(BenchmarkId::new(format!("raw/{kind}"), size), |b| {
                b.iter_custom(|iters| {
                    let mut spent = Duration::ZERO;
                    let mut done = 0;
                    while done < iters {
                        for (w, p) in work.iter_mut().zip(&pristine) {
                            w.copy_from_slice(&p.0);
                        }
                        let n = (iters - done).min(BATCH as u64) as usize;
                        let t = Instant::now();
                        for (w, p) in work.iter_mut().zip(&pristine).take(n) {
                            key.open_in_place(&p.2, &header, w, &p.1).unwrap();
                        }
                        spent += t.elapsed();
                        done += n as u64;
                    }
                    spent
                })
            });
            // Codec: BATCH records sealed (untimed) into one buffer, then opened in one call.
            let (mut s, mut r) = opened(&config(false, kind), &config(false, kind));
            let stride = record_len_for(size);
            let mut buf = vec![0xabu8; stride * BATCH];
            g.bench_function(BenchmarkId::new(format!("codec/{kind}"), size), |b| {
                b.iter_custom(|iters| {
                    let mut spent = Duration::ZERO;
                    let mut done = 0;
                    while done < iters {
                        let n = (iters - done).min(BATCH as u64) as usize;
                        let mut used = 0;
                        for _ in 0..n {
                            if s.sealer.key_update_due() {
                                used += s
                                    .sealer
                                    .seal_in_place(RecordType::KeyUpdate, &mut buf[used..], 0)
                                    .unwrap();
                            }
                            used += s
                                .sealer
                                .seal_in_place(RecordType::Data, &mut buf[used..], size)
                                .unwrap();
                        }
                        let t = Instant::now();
                        let opened = r
                            .opener
                            .open_batch_in_place(&mut buf[..used], |_, p| {
                                black_box(p);
                            })
                            .unwrap();
                        spent += t.elapsed();
                        assert_eq!(opened, used);
                        done += n as u64;
                    }
                    spent
                })
            });
        }
    }
    g.finish();
}

fn handshakes(c: &mut Criterion) {
    let mut g = c.benchmark_group("handshake");
    g.throughput(Throughput::Elements(1));
    for fs in [true, false] {
        let name = if fs { "forward_secrecy" } else { "psk_only" };
        let (ic, rc) = (config(fs, AeadKind::Ring), config(fs, AeadKind::Ring));
        g.bench_function(name, |b| b.iter(|| black_box(handshake(&ic, &rc))));
    }
    g.finish();
}

fn header_only(c: &mut Criterion) {
    // The incremental parser alone: what the pipeline calls on every read.
    let (mut s, r) = opened(
        &config(false, AeadKind::Ring),
        &config(false, AeadKind::Ring),
    );
    let mut rec = vec![0u8; record_len_for(100)];
    s.sealer
        .seal_in_place(RecordType::Data, &mut rec, 100)
        .unwrap();
    c.bench_function("record_len", |b| {
        b.iter(|| black_box(r.opener.record_len(black_box(&rec[..HEADER_LEN]))))
    });
}

criterion_group!(benches, seal, open, handshakes, header_only);
criterion_main!(benches);
