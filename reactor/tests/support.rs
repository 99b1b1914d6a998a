//! Helpers for the reactor's socket tests (the sealpipe package's tests/common.rs has the
//! proxy-level ones). Everything on 127.0.0.1; every wait has a deadline.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

pub const TIMEOUT: Duration = Duration::from_secs(20);

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// Deterministic bytes for offset `i` of stream `seed`.
pub fn pattern(seed: u64, off: usize, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        let x = (off + k) as u64;
        *b = (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed).rotate_left(17) as u8;
    }
}

/// Writes `len` pattern bytes, half-closes, reads everything back and checks it is the same.
pub fn round_trip(addr: SocketAddr, seed: u64, len: usize) {
    let s = connect(addr);
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut off = 0;
        let mut block = vec![0u8; 64 * 1024];
        while off < len {
            let n = block.len().min(len - off);
            pattern(seed, off, &mut block[..n]);
            w.write_all(&block[..n]).unwrap();
            off += n;
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut r = s;
    let mut got = 0;
    let mut buf = vec![0u8; 256 * 1024];
    let mut want = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf).expect("read echo");
        if n == 0 {
            break;
        }
        pattern(seed, got, &mut want[..n]);
        assert!(buf[..n] == want[..n], "mismatch near offset {got}");
        got += n;
    }
    writer.join().unwrap();
    assert_eq!(got, len, "echoed byte count");
}

/// Reads until EOF or error; returns (bytes, the error kind if it ended in one).
pub fn read_to_end(s: &mut TcpStream) -> (Vec<u8>, Option<std::io::ErrorKind>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, Some(e.kind())),
        }
    }
}
