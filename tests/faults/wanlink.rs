//! A wide-area link between two network namespaces, in user space: two TUN devices, one moved
//! into each namespace and addressed as a point-to-point link, and a relay thread in this
//! process that carries every IP packet from one to the other after a one-way delay, dropping
//! and reordering a share of them. Real kernel TCP runs at both ends, so SYNs, handshakes,
//! retransmissions and timeouts all meet the impairments, as on a WAN — without `sch_netem`.
//! (Modelled on ../shared/bench/tools/wanlink.py, which does delay and loss.)
//!
//! Invariants: the impairment can change while packets flow (atomics read per packet); the
//! relay's queue is bounded (beyond [`MAX_QUEUED`] packets it drops, and counts it); a cut link
//! forwards nothing; dropping the [`WanLink`] stops the thread and closes the devices (a
//! non-persistent TUN device disappears with its last descriptor). Device names carry the
//! process id, so parallel runs never clash.

use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use super::ip;

/// Packets waiting in the relay, both directions together (a 100 ms RTT at the speeds these
/// tests reach needs a few thousand).
pub const MAX_QUEUED: usize = 20_000;

/// What the link does to packets now; every field may change while it runs.
#[derive(Default)]
pub struct Impairment {
    /// One-way delay, each direction, in microseconds.
    pub delay_us: AtomicU64,
    /// Share of packets dropped, in parts per million.
    pub loss_ppm: AtomicU64,
    /// Share of packets held back an extra [`Impairment::reorder_gap_us`], so that the packets
    /// after them overtake them, in parts per million.
    pub reorder_ppm: AtomicU64,
    pub reorder_gap_us: AtomicU64,
    /// Forward nothing at all (the link is cut; devices stay up).
    pub cut: AtomicBool,
}

/// What the relay did, per packet.
#[derive(Default)]
pub struct Stats {
    pub forwarded: AtomicU64,
    pub lost: AtomicU64,
    /// Delivered after a packet read later in the same direction.
    pub reordered: AtomicU64,
    pub cut: AtomicU64,
    pub overflow: AtomicU64,
}

impl Stats {
    pub fn summary(&self) -> String {
        format!(
            "{} forwarded, {} lost, {} reordered, {} dropped while cut, {} dropped on overflow",
            self.forwarded.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
            self.reordered.load(Ordering::Relaxed),
            self.cut.load(Ordering::Relaxed),
            self.overflow.load(Ordering::Relaxed),
        )
    }
}

pub struct WanLink {
    pub impairment: Arc<Impairment>,
    pub stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for WanLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the rest of the 40-byte
/// union unused).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}

/// Opens a new TUN device `name` (IP packets, no packet-information header), non-blocking.
#[allow(unsafe_code)]
fn open_tun(name: &str) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .map_err(|e| format!("/dev/net/tun: {e}"))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _rest: [0; 22],
    };
    if name.len() >= libc::IFNAMSIZ {
        return Err(format!("device name {name} too long"));
    }
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `f` is an open /dev/net/tun descriptor and `req` a live, properly laid out
    // `struct ifreq` (name, flags, padding to its full 40 bytes) that the kernel reads and
    // writes only for the duration of the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
    if rc != 0 {
        return Err(format!(
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(f)
}

/// A packet due at `due`; the heap pops the earliest (then the one read first).
struct Queued {
    due: Instant,
    seq: u64,
    to: usize,
    packet: Vec<u8>,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

/// xorshift64*: reproducible loss and reordering from a fixed seed.
struct Rng(u64);

impl Rng {
    /// True with probability `ppm` parts per million.
    fn chance(&mut self, ppm: u64) -> bool {
        if ppm == 0 {
            return false;
        }
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % 1_000_000 < ppm
    }
}

impl WanLink {
    /// Creates the two devices, moves them into `ns[0]` and `ns[1]` (which must exist) with
    /// addresses `addr[0]` <-> `addr[1]` (point to point), and starts relaying with no
    /// impairment.
    pub fn new(ns: [&str; 2], addr: [&str; 2]) -> Result<WanLink, String> {
        let pid = std::process::id();
        let names = [format!("spwa{pid}"), format!("spwb{pid}")];
        let mut tuns = Vec::new();
        for i in 0..2 {
            tuns.push(open_tun(&names[i])?);
            ip(&["link", "set", &names[i], "netns", ns[i]])?;
            ip(&[
                "-n",
                ns[i],
                "addr",
                "add",
                addr[i],
                "peer",
                addr[1 - i],
                "dev",
                &names[i],
            ])?;
            ip(&["-n", ns[i], "link", "set", &names[i], "mtu", "1500", "up"])?;
        }
        let impairment = Arc::new(Impairment::default());
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (imp, st, stp) = (impairment.clone(), stats.clone(), stop.clone());
        let tuns: [File; 2] = tuns.try_into().unwrap();
        let thread = std::thread::Builder::new()
            .name("wanlink".into())
            .spawn(move || relay(tuns, &imp, &st, &stp))
            .map_err(|e| format!("spawn: {e}"))?;
        Ok(WanLink {
            impairment,
            stats,
            stop,
            thread: Some(thread),
        })
    }

    /// Sets delay, loss and reordering (each direction).
    pub fn impair(&self, delay: Duration, loss_ppm: u64, reorder_ppm: u64, reorder_gap: Duration) {
        let i = &self.impairment;
        i.delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
        i.loss_ppm.store(loss_ppm, Ordering::Relaxed);
        i.reorder_ppm.store(reorder_ppm, Ordering::Relaxed);
        i.reorder_gap_us
            .store(reorder_gap.as_micros() as u64, Ordering::Relaxed);
    }
}

/// The relay loop: reads every packet either device offers, queues it with its due time, and
/// writes it to the other device when due. Ends when `stop` is set.
fn relay(mut tuns: [File; 2], imp: &Impairment, stats: &Stats, stop: &AtomicBool) {
    let mut poll = Poll::new().expect("poll");
    for (i, t) in tuns.iter().enumerate() {
        poll.registry()
            .register(&mut SourceFd(&t.as_raw_fd()), Token(i), Interest::READABLE)
            .expect("register tun");
    }
    let mut events = Events::with_capacity(4);
    let mut queue: BinaryHeap<Queued> = BinaryHeap::new();
    let mut rng = Rng(0x5ea1_b1be_5eed_0001);
    let mut seq = 0u64;
    // Per direction: the highest read sequence delivered so far (reordering detector).
    let mut delivered_max = [0u64; 2];
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wait = queue
            .peek()
            .map_or(Duration::from_millis(50), |q| {
                q.due.saturating_duration_since(now)
            })
            .min(Duration::from_millis(50));
        if let Err(e) = poll.poll(&mut events, Some(wait)) {
            assert_eq!(e.kind(), ErrorKind::Interrupted, "poll: {e}");
        }
        // Edge-triggered: drain both devices every turn, bounded.
        for (from, tun) in tuns.iter_mut().enumerate() {
            for _ in 0..1024 {
                let n = match tun.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => panic!("read tun: {e}"),
                };
                let now = Instant::now();
                if imp.cut.load(Ordering::Relaxed) {
                    stats.cut.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if rng.chance(imp.loss_ppm.load(Ordering::Relaxed)) {
                    stats.lost.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if queue.len() >= MAX_QUEUED {
                    stats.overflow.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let mut delay = Duration::from_micros(imp.delay_us.load(Ordering::Relaxed));
                if rng.chance(imp.reorder_ppm.load(Ordering::Relaxed)) {
                    delay += Duration::from_micros(imp.reorder_gap_us.load(Ordering::Relaxed));
                }
                seq += 1;
                queue.push(Queued {
                    due: now + delay,
                    seq,
                    to: 1 - from,
                    packet: buf[..n].to_vec(),
                });
            }
        }
        let now = Instant::now();
        while queue.peek().is_some_and(|q| q.due <= now) {
            let q = queue.pop().unwrap();
            if imp.cut.load(Ordering::Relaxed) {
                stats.cut.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let dir = 1 - q.to;
            if q.seq < delivered_max[dir] {
                stats.reordered.fetch_add(1, Ordering::Relaxed);
            }
            delivered_max[dir] = delivered_max[dir].max(q.seq);
            // A full device queue or a vanished route drops the packet, as a router would.
            match tuns[q.to].write(&q.packet) {
                Ok(n) if n == q.packet.len() => stats.forwarded.fetch_add(1, Ordering::Relaxed),
                _ => stats.overflow.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
}
