//! Buffer micro-benchmarks: the copy paths (append/drain, pullup), the no-copy move path, and
//! vectored socket I/O over a Unix stream pair. Reported as bytes/s.

use std::hint::black_box;
use std::io;
use std::os::unix::net::UnixStream;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sealpipe_reactor::buffer::Buffer;
use sealpipe_reactor::pool::CHUNK_SIZE;

fn append_drain(c: &mut Criterion) {
    let data = vec![0x5au8; 16 * 1024];
    let mut g = c.benchmark_group("buffer");
    g.throughput(Throughput::Bytes(data.len() as u64));
    let mut buf = Buffer::new();
    g.bench_function("append_drain_16k", |b| {
        b.iter(|| {
            buf.append(black_box(&data));
            buf.drain(data.len());
        })
    });
    g.finish();
}

fn move_all(c: &mut Criterion) {
    let len = 256 * 1024;
    let mut a = Buffer::new();
    a.append(&vec![1u8; len]);
    let mut b = Buffer::new();
    let mut g = c.benchmark_group("buffer");
    // Two moves of `len` bytes per iteration.
    g.throughput(Throughput::Bytes(2 * len as u64));
    g.bench_function("move_all_to_256k_x2", |bench| {
        bench.iter(|| {
            a.move_all_to(&mut b);
            b.move_all_to(&mut a);
        })
    });
    g.finish();
}

fn pullup(c: &mut Criterion) {
    let data = vec![7u8; CHUNK_SIZE + 4096];
    let mut g = c.benchmark_group("buffer");
    g.throughput(Throughput::Bytes(1024));
    // 256 bytes at the end of the first chunk, the rest of 1 KiB in the next one.
    g.bench_function("pullup_1k_across_boundary", |b| {
        b.iter_batched_ref(
            || {
                let mut buf = Buffer::new();
                buf.append(&data);
                buf.drain(CHUNK_SIZE - 256);
                buf
            },
            |buf| black_box(buf.pullup(1024).map(|s| s[1023])),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn socket_io(c: &mut Criterion) {
    let (mut tx, mut rx) = UnixStream::pair().expect("socketpair");
    tx.set_nonblocking(true).expect("nonblocking");
    rx.set_nonblocking(true).expect("nonblocking");
    let total = 4 << 20;
    let mut out = Buffer::new();
    out.append(&vec![3u8; total]);
    let mut inb = Buffer::new();
    let mut g = c.benchmark_group("buffer");
    g.throughput(Throughput::Bytes(total as u64));
    // Each iteration pushes `total` bytes through the socket pair with write_to/read_from,
    // then moves them back to the output buffer (no copy) for the next round.
    g.bench_function("unix_stream_write_to_read_from_4m", |b| {
        b.iter(|| {
            while inb.len() < total {
                match out.write_to(&mut tx) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("write: {e}"),
                }
                loop {
                    match inb.read_from(&mut rx, 1 << 20) {
                        Ok(0) => panic!("eof"),
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("read: {e}"),
                    }
                }
            }
            inb.move_all_to(&mut out);
        })
    });
    g.finish();
}

criterion_group!(benches, append_drain, move_all, pullup, socket_io);
criterion_main!(benches);
