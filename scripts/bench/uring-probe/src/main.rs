//! A one-thread TCP relay (listen -> target), two ways: readiness (mio/epoll: read until a short
//! read, write at once, as sealpipe's BufferEvent does) or completion (io_uring: multishot recv
//! into provided buffers, send straight from them, one io_uring_enter per loop turn). The
//! ceiling of what an io_uring backend can save a sealpipe process on request/response: the
//! relay is a sealpipe process minus the crypto and the proxy logic, which cost the same either way.
//!
//! The io_uring side: one ring (SINGLE_ISSUER, DEFER_TASKRUN), 1024 provided buffers of 16 KiB
//! in a registered buffer ring, a multishot accept, a multishot recv per socket, each received
//! buffer sent to the peer socket as it is and given back to the ring when the send completes;
//! a turn waits for one completion beyond the sends it just submitted (their completions only
//! recycle buffers), so a request costs one io_uring_enter per arrival (PROBE_WANT1=1: wait
//! for any one completion instead). Unsafe code (the ring's contract) is confined to this
//! measurement tool, which is not part of the workspace.
//!
//! usage: uring-probe epoll|uring LISTEN_PORT TARGET_PORT
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let listen: SocketAddr = format!("127.0.0.1:{}", args[2]).parse().unwrap();
    let target: SocketAddr = format!("127.0.0.1:{}", args[3]).parse().unwrap();
    match args[1].as_str() {
        "epoll" => epoll(listen, target),
        "uring" => uring(listen, target),
        m => panic!("mode {m}"),
    }
}

fn epoll(listen: SocketAddr, target: SocketAddr) -> io::Result<()> {
    use mio::net::{TcpListener, TcpStream};
    use mio::{Events, Interest, Poll, Token};
    let mut poll = Poll::new()?;
    let mut l = TcpListener::bind(listen)?;
    poll.registry()
        .register(&mut l, Token(usize::MAX), Interest::READABLE)?;
    let mut socks: HashMap<usize, (TcpStream, usize, Vec<u8>)> = HashMap::new();
    let mut next = 0usize;
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match poll.poll(&mut events, None) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => r?,
        }
        for ev in events.iter() {
            if ev.token() == Token(usize::MAX) {
                while let Ok((c, _)) = l.accept() {
                    let u = TcpStream::from_std(std::net::TcpStream::connect(target)?);
                    u.set_nodelay(true)?;
                    c.set_nodelay(true)?;
                    let (a, b) = (next, next + 1);
                    next += 2;
                    let mut c = c;
                    let mut u = u;
                    poll.registry().register(
                        &mut c,
                        Token(a),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    poll.registry().register(
                        &mut u,
                        Token(b),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    socks.insert(a, (c, b, Vec::new()));
                    socks.insert(b, (u, a, Vec::new()));
                }
                continue;
            }
            let t = ev.token().0;
            if ev.is_writable() {
                // flush what waited for this socket
                if let Some((s, _, pend)) = socks.get_mut(&t) {
                    while !pend.is_empty() {
                        match s.write(pend) {
                            Ok(n) => {
                                pend.drain(..n);
                            }
                            Err(_) => break,
                        }
                    }
                }
            }
            if !(ev.is_readable() || ev.is_read_closed()) {
                continue;
            }
            let Some(peer) = socks.get(&t).map(|x| x.1) else {
                continue;
            };
            let mut closed = false;
            loop {
                let r = socks.get_mut(&t).unwrap().0.read(&mut buf);
                match r {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => {
                        let (p, _, pend) = socks.get_mut(&peer).unwrap();
                        if pend.is_empty() {
                            match p.write(&buf[..n]) {
                                Ok(k) if k == n => {}
                                Ok(k) => pend.extend_from_slice(&buf[k..n]),
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                    pend.extend_from_slice(&buf[..n])
                                }
                                Err(_) => closed = true,
                            }
                        } else {
                            pend.extend_from_slice(&buf[..n]);
                        }
                        if n < buf.len() / 2 {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            if closed {
                socks.remove(&t);
                socks.remove(&peer);
            }
        }
    }
}

const BUFS: u16 = 1024;
const BUF_SIZE: usize = 16 * 1024;
const ACCEPT: u64 = u64::MAX;
const SEND: u64 = 1 << 63;

struct Bufs {
    ring: *mut io_uring::types::BufRingEntry,
    mem: Vec<u8>,
    tail: u16,
}

impl Bufs {
    fn give(&mut self, bid: u16) {
        let mask = BUFS - 1;
        // SAFETY: ring points at BUFS entries we own; bid < BUFS.
        unsafe {
            let e = &mut *self.ring.add((self.tail & mask) as usize);
            e.set_addr(self.mem.as_ptr().add(bid as usize * BUF_SIZE) as u64);
            e.set_len(BUF_SIZE as u32);
            e.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }
    fn publish(&self) {
        // SAFETY: the tail field of the first entry, written with release ordering.
        unsafe {
            let t = io_uring::types::BufRingEntry::tail(self.ring)
                as *const std::sync::atomic::AtomicU16;
            (*t).store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }
}

struct Send {
    fd: RawFd,
    bid: u16,
    off: usize,
    len: usize,
}

fn uring(listen: SocketAddr, target: SocketAddr) -> io::Result<()> {
    use io_uring::{IoUring, cqueue, opcode, types};
    let mut ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(4096)?;
    let layout = std::alloc::Layout::from_size_align(BUFS as usize * 16, 4096).unwrap();
    // SAFETY: non-zero size; zeroed ring entries.
    let rp = unsafe { std::alloc::alloc_zeroed(layout) } as *mut types::BufRingEntry;
    let mut bufs = Bufs {
        ring: rp,
        mem: vec![0u8; BUFS as usize * BUF_SIZE],
        tail: 0,
    };
    // SAFETY: the ring memory lives for the whole program.
    unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(rp as u64, BUFS, 0, 0)?
    };
    for b in 0..BUFS {
        bufs.give(b);
    }
    bufs.publish();
    let l = TcpListener::bind(listen)?;
    let lfd = l.as_raw_fd();
    let mut peer: HashMap<RawFd, RawFd> = HashMap::new();
    let mut sends: Vec<Option<Send>> = Vec::new();
    let mut free_sends: Vec<usize> = Vec::new();
    let push = |ring: &mut IoUring, e: io_uring::squeue::Entry| {
        // SAFETY: every buffer an entry names outlives its completion (provided buffers are
        // recycled only on the send's completion).
        unsafe {
            while ring.submission().push(&e).is_err() {
                ring.submit()?;
            }
        }
        Ok::<(), io::Error>(())
    };
    push(
        &mut ring,
        opcode::AcceptMulti::new(types::Fd(lfd))
            .build()
            .user_data(ACCEPT),
    )?;
    let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(4096);
    // Sends submitted in the last turn: their completions (usually posted inline) only give a
    // buffer back, so the wait asks for one event beyond them (one io_uring_enter per turn).
    let mut sent = 0usize;
    let want1 = std::env::var_os("PROBE_WANT1").is_some();
    loop {
        let want = if want1 { 1 } else { sent + 1 };
        sent = 0;
        match ring.submit_and_wait(want) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => r?,
        };
        cqes.clear();
        cqes.extend(
            ring.completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        let mut gave = false;
        for &(ud, res, flags) in &cqes {
            if ud == ACCEPT {
                if res >= 0 {
                    let c: RawFd = res;
                    let u = TcpStream::connect(target)?;
                    u.set_nodelay(true)?;
                    let ufd = u.into_raw_fd();
                    // SAFETY: c is a fresh socket from accept.
                    let cs = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(c) };
                    cs.set_nodelay(true)?;
                    let c = cs.into_raw_fd();
                    peer.insert(c, ufd);
                    peer.insert(ufd, c);
                    for fd in [c, ufd] {
                        push(
                            &mut ring,
                            opcode::RecvMulti::new(types::Fd(fd), 0)
                                .build()
                                .user_data(fd as u64),
                        )?;
                    }
                }
                if !cqueue::more(flags) {
                    push(
                        &mut ring,
                        opcode::AcceptMulti::new(types::Fd(lfd))
                            .build()
                            .user_data(ACCEPT),
                    )?;
                }
                continue;
            }
            if ud & SEND != 0 {
                let i = (ud & !SEND) as usize;
                let Some(s) = sends[i].as_mut() else { continue };
                if res > 0 && s.off + (res as usize) < s.len {
                    s.off += res as usize;
                    let p = bufs.mem[s.bid as usize * BUF_SIZE + s.off..].as_ptr();
                    let e = opcode::Send::new(types::Fd(s.fd), p, (s.len - s.off) as u32)
                        .build()
                        .user_data(ud);
                    push(&mut ring, e)?;
                    continue;
                }
                let bid = s.bid;
                sends[i] = None;
                free_sends.push(i);
                bufs.give(bid);
                gave = true;
                continue;
            }
            let fd = ud as RawFd;
            if res <= 0 {
                if res == -libc::ENOBUFS {
                    push(
                        &mut ring,
                        opcode::RecvMulti::new(types::Fd(fd), 0)
                            .build()
                            .user_data(ud),
                    )?;
                    continue;
                }
                if let Some(p) = peer.remove(&fd) {
                    peer.remove(&p);
                    // SAFETY: our fds.
                    unsafe {
                        libc::close(fd);
                        libc::close(p);
                    }
                }
                continue;
            }
            let bid = cqueue::buffer_select(flags).expect("a provided buffer");
            let Some(&to) = peer.get(&fd) else {
                bufs.give(bid);
                gave = true;
                continue;
            };
            let s = Send {
                fd: to,
                bid,
                off: 0,
                len: res as usize,
            };
            let i = match free_sends.pop() {
                Some(i) => {
                    sends[i] = Some(s);
                    i
                }
                None => {
                    sends.push(Some(s));
                    sends.len() - 1
                }
            };
            let p = bufs.mem[bid as usize * BUF_SIZE..].as_ptr();
            push(
                &mut ring,
                opcode::Send::new(types::Fd(to), p, res as u32)
                    .build()
                    .user_data(SEND | i as u64),
            )?;
            sent += 1;
            if !cqueue::more(flags) {
                push(
                    &mut ring,
                    opcode::RecvMulti::new(types::Fd(fd), 0)
                        .build()
                        .user_data(ud),
                )?;
            }
        }
        if gave {
            bufs.publish();
        }
    }
}
