//! The reactor over real sockets: the echo example at scale, connect outcomes as events,
//! timers, signals, cross-thread posts, stale tokens, and EMFILE recovery.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sealpipe_reactor::listener::{ConnListener, ListenerOptions};
use sealpipe_reactor::{
    BevEvents, BufferEvent, Context, EventBase, Handler, Ready, Suspend, Tag, Timeouts,
};

mod support;
use support::*;

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn example(name: &str) -> PathBuf {
    // Integration tests live in target/<profile>/deps; cargo builds examples beside them.
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name)
}

/// Starts the echo example on a free port and waits for its banner.
fn echo_example() -> (SocketAddr, Kill) {
    let mut child = Command::new(example("echo"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("the echo example is built by cargo test");
    let mut out = child.stdout.take().unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while out.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    let line = String::from_utf8(line).unwrap();
    let addr = line.rsplit(' ').next().unwrap().parse().unwrap();
    (addr, Kill(child))
}

#[test]
fn echo_example_100_mib_from_one_client() {
    let (addr, _k) = echo_example();
    round_trip(addr, 11, 100 << 20);
}

#[test]
fn echo_example_serves_1000_concurrent_clients() {
    let (addr, _k) = echo_example();
    let mut conns: Vec<TcpStream> = (0..1000).map(|_| connect(addr)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        let mut msg = [0u8; 300];
        pattern(i as u64, 0, &mut msg);
        c.write_all(&msg).unwrap();
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let mut msg = [0u8; 300];
        let mut want = [0u8; 300];
        pattern(i as u64, 0, &mut want);
        c.read_exact(&mut msg).unwrap();
        assert_eq!(msg, want);
        c.shutdown(Shutdown::Write).unwrap();
        let (rest, err) = read_to_end(c);
        assert!(rest.is_empty() && err.is_none());
    }
}

#[test]
fn echo_backpressure_bounds_what_a_non_reader_can_push() {
    let (addr, _k) = echo_example();
    let mut c = connect(addr);
    c.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let block = vec![1u8; 64 * 1024];
    let mut sent = 0usize;
    while sent < 1 << 30 {
        match c.write(&block) {
            Ok(n) => sent += n,
            Err(_) => break, // the server stopped reading: writes stall
        }
    }
    assert!(
        sent < 64 << 20,
        "pushed {sent} bytes into a server whose client never reads"
    );
    // Reading resumes the flow: everything sent comes back.
    c.set_write_timeout(Some(TIMEOUT)).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let (got, err) = read_to_end(&mut c);
    assert_eq!(err, None);
    assert_eq!(got.len(), sent);
}

/// A handler that connects and records the events it gets.
struct Connector {
    addr: SocketAddr,
    timeout: Option<Duration>,
    bev: Option<BufferEvent>,
}

#[derive(Default)]
struct Seen {
    events: Vec<BevEvents>,
    error: Option<std::io::ErrorKind>,
}

impl Connector {
    fn handle(&mut self, cx: &mut Context<'_, Seen>, ev: BevEvents) {
        if ev.is_empty() {
            return;
        }
        cx.state.events.push(ev);
        if let Some(e) = self.bev.as_mut().and_then(|b| b.take_error()) {
            cx.state.error = Some(e.kind());
        }
        cx.loop_break();
    }
}

impl Handler<Seen> for Connector {
    fn on_start(&mut self, cx: &mut Context<'_, Seen>) {
        let t = Timeouts {
            connect: self.timeout,
            ..Timeouts::default()
        };
        let mut b =
            BufferEvent::connect_filtered(cx, self.addr, 0, sealpipe_reactor::NoFilter, true, t);
        b.register(cx).unwrap();
        self.bev = Some(b);
    }
    fn on_ready(&mut self, cx: &mut Context<'_, Seen>, _s: u8, r: Ready) {
        let ev = self.bev.as_mut().unwrap().on_ready(cx, r);
        self.handle(cx, ev);
    }
    fn on_timer(&mut self, cx: &mut Context<'_, Seen>, tag: Tag) {
        let ev = self.bev.as_mut().unwrap().on_timer(cx, tag);
        self.handle(cx, ev);
    }
    fn on_notify(&mut self, cx: &mut Context<'_, Seen>, tag: Tag) {
        let ev = self.bev.as_mut().unwrap().on_notify(cx, tag);
        self.handle(cx, ev);
    }
}

fn run_connector(addr: SocketAddr, timeout: Option<Duration>) -> Seen {
    let mut base = EventBase::new(Seen::default()).unwrap();
    base.spawn(Box::new(Connector {
        addr,
        timeout,
        bev: None,
    }));
    base.loop_exit(TIMEOUT);
    base.run().unwrap();
    std::mem::take(base.state_mut())
}

#[test]
fn connect_refused_arrives_as_an_event() {
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let seen = run_connector(dead, None);
    assert_eq!(seen.events, vec![BevEvents::ERROR]);
    assert_eq!(seen.error, Some(std::io::ErrorKind::ConnectionRefused));
}

#[test]
fn connect_success_arrives_as_an_event() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let seen = run_connector(l.local_addr().unwrap(), Some(Duration::from_secs(5)));
    assert!(seen.events[0].contains(BevEvents::CONNECTED));
}

#[test]
fn connect_timeout_arrives_as_an_event() {
    // A listener with a full accept queue drops further SYNs, so a connect hangs.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&addr.into());
        fillers.push(s);
    }
    let started = Instant::now();
    let seen = run_connector(addr, Some(Duration::from_millis(300)));
    assert!(
        seen.events == vec![BevEvents::CONNECT_TIMEOUT]
            || seen.events[0].contains(BevEvents::CONNECTED),
        "{:?}",
        seen.events
    );
    if seen.events == vec![BevEvents::CONNECT_TIMEOUT] {
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(seen.error, Some(std::io::ErrorKind::TimedOut));
    }
}

/// Counts notifications; used to check stale ids and cross-thread posts.
struct Counter;
impl Handler<Vec<u64>> for Counter {
    fn on_ready(&mut self, _: &mut Context<'_, Vec<u64>>, _: u8, _: Ready) {}
    fn on_notify(&mut self, cx: &mut Context<'_, Vec<u64>>, tag: Tag) {
        cx.state.push(tag.value().unwrap().into());
    }
}

#[test]
fn stale_id_never_reaches_the_slot_reused_by_another_handler() {
    let mut base = EventBase::new(Vec::new()).unwrap();
    let old = base.spawn(Box::new(Counter));
    base.loop_once(Some(Duration::ZERO)).unwrap();
    base.with_context(|cx| cx.close_handler(old));
    base.loop_once(Some(Duration::ZERO)).unwrap();
    let new = base.spawn(Box::new(Counter));
    base.loop_once(Some(Duration::ZERO)).unwrap();
    assert_ne!(old, new);
    base.with_context(|cx| {
        assert!(!cx.is_live(old));
        cx.notify(old, Tag::new(1));
        cx.notify(new, Tag::new(2));
    });
    base.loop_once(Some(Duration::ZERO)).unwrap();
    assert_eq!(base.state(), &vec![2]);
}

#[test]
fn posts_from_another_thread_run_on_the_loop() {
    let mut base = EventBase::new(Vec::new()).unwrap();
    let h = base.handle();
    let loop_thread = std::thread::current().id();
    let t = std::thread::spawn(move || {
        for i in 0..100u64 {
            h.post(move |cx| cx.state.push(i)).unwrap();
        }
        h.post(move |cx| {
            assert_eq!(std::thread::current().id(), loop_thread);
            cx.loop_break()
        })
        .unwrap();
    });
    base.loop_exit(TIMEOUT);
    base.run().unwrap();
    t.join().unwrap();
    assert_eq!(base.state(), &(0..100).collect::<Vec<_>>());
}

#[test]
fn a_signal_is_delivered_as_a_loop_event() {
    let mut base = EventBase::new(Vec::<u64>::new()).unwrap();
    let loop_thread = std::thread::current().id();
    let ev = sealpipe_reactor::signal::SignalEvent::new(
        &[libc::SIGUSR2],
        move |cx: &mut Context<'_, Vec<u64>>, sig: i32| {
            assert_eq!(std::thread::current().id(), loop_thread);
            cx.state.push(sig as u64);
            cx.loop_break();
        },
    )
    .unwrap();
    base.spawn(Box::new(ev));
    base.loop_once(Some(Duration::ZERO)).unwrap();
    signal_hook::low_level::raise(libc::SIGUSR2).unwrap();
    base.loop_exit(TIMEOUT);
    base.run().unwrap();
    assert_eq!(base.state(), &vec![libc::SIGUSR2 as u64]);
}

/// A timer event fires after its delay, never before.
#[test]
fn timers_fire_in_order_and_not_early() {
    use sealpipe_reactor::event::{Event, Next};
    let mut base = EventBase::new(Vec::<(u64, Duration)>::new()).unwrap();
    let start = Instant::now();
    for (i, ms) in [(0u64, 30u64), (1, 10), (2, 20)] {
        base.spawn(Box::new(Event::timer(
            Duration::from_millis(ms),
            false,
            move |cx: &mut Context<'_, Vec<(u64, Duration)>>,
                  _: Option<&mut mio::net::TcpStream>,
                  _| {
                cx.state.push((i, start.elapsed()));
                Next::Stop
            },
        )));
    }
    let deadline = Instant::now() + TIMEOUT;
    while base.state().len() < 3 && Instant::now() < deadline {
        base.loop_once(None).unwrap();
    }
    let order: Vec<u64> = base.state().iter().map(|x| x.0).collect();
    assert_eq!(order, vec![1, 2, 0]);
    for (i, at) in base.state() {
        let want = Duration::from_millis([30, 10, 20][*i as usize]);
        assert!(*at >= want, "timer {i} fired at {at:?}, before {want:?}");
    }
}

/// Connects, then (optionally) queues a large write, and records timeout events.
struct Quiet {
    addr: SocketAddr,
    timeouts: Timeouts,
    write: usize,
    bev: Option<BufferEvent>,
}

impl Quiet {
    fn handle(&mut self, cx: &mut Context<'_, Seen>, ev: BevEvents) {
        let bev = self.bev.as_mut().unwrap();
        if ev.contains(BevEvents::CONNECTED) && self.write > 0 {
            bev.output.append(&vec![9u8; self.write]);
            let more = bev.flush(cx);
            if !more.is_empty() {
                cx.state.events.push(more);
            }
        }
        for t in [BevEvents::READ_TIMEOUT, BevEvents::WRITE_TIMEOUT] {
            if ev.contains(t) {
                cx.state.events.push(t);
                cx.loop_break();
            }
        }
    }
}

impl Handler<Seen> for Quiet {
    fn on_start(&mut self, cx: &mut Context<'_, Seen>) {
        let mut b = BufferEvent::connect_filtered(
            cx,
            self.addr,
            0,
            sealpipe_reactor::NoFilter,
            true,
            self.timeouts,
        );
        b.register(cx).unwrap();
        self.bev = Some(b);
    }
    fn on_ready(&mut self, cx: &mut Context<'_, Seen>, _s: u8, r: Ready) {
        let ev = self.bev.as_mut().unwrap().on_ready(cx, r);
        self.handle(cx, ev);
    }
    fn on_timer(&mut self, cx: &mut Context<'_, Seen>, tag: Tag) {
        let ev = self.bev.as_mut().unwrap().on_timer(cx, tag);
        self.handle(cx, ev);
    }
}

fn run_quiet(timeouts: Timeouts, write: usize) -> (Seen, Duration) {
    // A peer that accepts, never sends and never reads.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let held = std::thread::spawn(move || l.accept().map(|(s, _)| s));
    let mut base = EventBase::new(Seen::default()).unwrap();
    base.spawn(Box::new(Quiet {
        addr,
        timeouts,
        write,
        bev: None,
    }));
    let t = Instant::now();
    base.loop_exit(TIMEOUT);
    base.run().unwrap();
    let _peer = held.join().unwrap();
    (std::mem::take(base.state_mut()), t.elapsed())
}

/// Reads what a peer sends, granting itself `grant` bytes per `every`: a rate limit in the
/// owner's hands, over the read allowance and `throttle_until`.
struct Throttled {
    addr: SocketAddr,
    grant: u32,
    every: Duration,
    bev: Option<BufferEvent>,
    got: usize,
    throttles: u32,
}

#[derive(Default)]
struct Paced {
    got: usize,
    throttles: u32,
    eof: bool,
}

impl Throttled {
    fn handle(&mut self, cx: &mut Context<'_, Paced>, ev: BevEvents) {
        let bev = self.bev.as_mut().unwrap();
        self.got += bev.input.len();
        bev.input.clear();
        bev.consumed(cx);
        if bev.is_suspended(Suspend::Bandwidth) && !bev.is_throttled() {
            self.throttles += 1;
            bev.set_read_allowance(Some(self.grant));
            let at = cx.now() + self.every;
            bev.throttle_until(cx, at);
        }
        if ev.contains(BevEvents::EOF) || ev.contains(BevEvents::ERROR) {
            *cx.state = Paced {
                got: self.got,
                throttles: self.throttles,
                eof: ev.contains(BevEvents::EOF),
            };
            cx.loop_break();
        }
    }
}

impl Handler<Paced> for Throttled {
    fn on_start(&mut self, cx: &mut Context<'_, Paced>) {
        let mut b = BufferEvent::connect(cx, self.addr, 0);
        b.set_read_allowance(Some(self.grant));
        b.register(cx).unwrap();
        self.bev = Some(b);
    }
    fn on_ready(&mut self, cx: &mut Context<'_, Paced>, _s: u8, r: Ready) {
        let ev = self.bev.as_mut().unwrap().on_ready(cx, r);
        self.handle(cx, ev);
    }
    fn on_timer(&mut self, cx: &mut Context<'_, Paced>, tag: Tag) {
        let ev = self.bev.as_mut().unwrap().on_timer(cx, tag);
        self.handle(cx, ev);
    }
    fn on_notify(&mut self, cx: &mut Context<'_, Paced>, tag: Tag) {
        let ev = self.bev.as_mut().unwrap().on_notify(cx, tag);
        self.handle(cx, ev);
    }
}

#[test]
fn a_throttled_read_sleeps_until_its_wake_up_and_reads_on() {
    // The peer sends 100,000 bytes at once and closes.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&[7u8; 100_000]).unwrap();
    });
    let mut base = EventBase::new(Paced::default()).unwrap();
    base.spawn(Box::new(Throttled {
        addr,
        grant: 10_000,
        every: Duration::from_millis(20),
        bev: None,
        got: 0,
        throttles: 0,
    }));
    let t = Instant::now();
    base.loop_exit(TIMEOUT);
    base.run().unwrap();
    peer.join().unwrap();
    let seen = base.state();
    assert!(seen.eof, "read to the end");
    assert_eq!(seen.got, 100_000);
    // 10,000 bytes per grant: the first grant, then nine (or ten, if one pass ended exactly
    // on a grant) wake-ups; never sooner than they allow.
    assert!((9..=10).contains(&seen.throttles), "{}", seen.throttles);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(9 * 20),
        "read faster than granted: {took:?}"
    );
}

#[test]
fn read_timeout_fires_when_the_peer_stays_silent() {
    let t = Timeouts {
        read: Some(Duration::from_millis(150)),
        ..Timeouts::default()
    };
    let (seen, took) = run_quiet(t, 0);
    assert_eq!(seen.events, vec![BevEvents::READ_TIMEOUT]);
    assert!(took >= Duration::from_millis(150), "fired early: {took:?}");
}

#[test]
fn write_timeout_fires_when_the_peer_stops_reading() {
    // 64 MiB cannot fit in loopback socket buffers, so output stays pending.
    let t = Timeouts {
        write: Some(Duration::from_millis(200)),
        ..Timeouts::default()
    };
    let (seen, took) = run_quiet(t, 64 << 20);
    assert_eq!(seen.events, vec![BevEvents::WRITE_TIMEOUT]);
    assert!(took >= Duration::from_millis(200), "fired early: {took:?}");
}

/// State for the idle-work test: steps done, steps wanted, and jobs seen (with the step count
/// at the time each ran).
#[derive(Default)]
struct Spare {
    steps: u32,
    want: u32,
    jobs: Vec<u32>,
    /// Handlers a step spawned that started.
    started: u32,
}

/// A handler a spare-time step spawns: it starts, counts itself and closes.
struct Spawned;

impl Handler<Spare> for Spawned {
    fn on_start(&mut self, cx: &mut Context<'_, Spare>) {
        cx.state.started += 1;
        cx.close();
    }
    fn on_ready(&mut self, _: &mut Context<'_, Spare>, _: u8, _: Ready) {}
}

#[test]
fn idle_work_runs_only_in_turns_with_nothing_ready() {
    let mut base = EventBase::new(Spare {
        want: 3,
        ..Spare::default()
    })
    .unwrap();
    // Each step may act through a context: it spawns a handler, which starts in that turn.
    base.set_idle(
        |s| s.steps < s.want,
        |cx| {
            cx.state.steps += 1;
            cx.spawn(Box::new(Spawned));
        },
    );

    // A posted job is ready: the turn runs it, not a step.
    let h = base.handle();
    h.post(|cx| {
        let steps = cx.state.steps;
        cx.state.jobs.push(steps)
    })
    .unwrap();
    base.loop_once(Some(TIMEOUT)).unwrap();
    assert_eq!(base.state().jobs, [0]);
    assert_eq!(base.state().steps, 0);

    // Nothing ready: each turn peeks and does one step (none of these turns may block for
    // TIMEOUT, or the test would take minutes), until the work is done.
    for n in 1..=3 {
        base.loop_once(Some(TIMEOUT)).unwrap();
        assert_eq!(base.state().steps, n);
        assert_eq!(
            base.state().started,
            n,
            "the step's handler started in its turn"
        );
    }
    assert_eq!(base.handlers(), 0, "and closed");

    // Done: the loop blocks again, and a job wakes it without a step.
    let t = std::thread::spawn(move || {
        h.post(|cx| {
            let steps = cx.state.steps;
            cx.state.jobs.push(steps)
        })
        .unwrap()
    });
    base.loop_once(Some(TIMEOUT)).unwrap();
    t.join().unwrap();
    assert_eq!(base.state().jobs, [0, 3]);

    // New work that a context (the owner's housekeeping) made is seen at the next turn.
    base.with_context(|cx| cx.state.want = 5);
    base.loop_once(Some(TIMEOUT)).unwrap();
    base.loop_once(Some(TIMEOUT)).unwrap();
    assert_eq!(base.state().steps, 5);

    // New work becomes visible after a dispatched turn.
    base.state_mut().want = 6;
    let h = base.handle();
    h.post(|_| {}).unwrap();
    base.loop_once(Some(TIMEOUT)).unwrap();
    base.loop_once(Some(TIMEOUT)).unwrap();
    assert_eq!(base.state().steps, 6);
}

/// Accepts and records each accepted socket's TCP_NODELAY.
struct NodelayProbe(ConnListener);

impl Handler<Vec<bool>> for NodelayProbe {
    fn on_start(&mut self, cx: &mut Context<'_, Vec<bool>>) {
        self.0.register(cx).unwrap();
    }
    fn on_ready(&mut self, cx: &mut Context<'_, Vec<bool>>, _: u8, _: Ready) {
        self.0
            .on_ready(cx, |cx, s, _| cx.state.push(s.nodelay().unwrap()));
    }
}

#[test]
fn accepted_sockets_have_nodelay_without_a_call_per_socket() {
    let mut base = EventBase::new(Vec::new()).unwrap();
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    for nodelay in [true, false] {
        let opts = ListenerOptions {
            nodelay,
            ..ListenerOptions::default()
        };
        let l = ConnListener::bind(addr, opts, 0).unwrap();
        let at = l.local_addr().unwrap();
        base.spawn(Box::new(NodelayProbe(l)));
        let clients: Vec<_> = (0..3).map(|_| TcpStream::connect(at).unwrap()).collect();
        let deadline = Instant::now() + TIMEOUT;
        while base.state().len() < 3 && Instant::now() < deadline {
            base.loop_once(Some(Duration::from_millis(50))).unwrap();
        }
        assert_eq!(base.state(), &vec![nodelay; 3]);
        base.state_mut().clear();
        drop(clients);
    }
}

/// A filter that strips a one-byte length prefix from each frame (`[n][n bytes]`), so decoding
/// shrinks what is pending the way record overhead does, and reports the rest of a partial frame.
struct Unframe;

fn frame_at(raw: &sealpipe_reactor::Buffer) -> Option<usize> {
    let mut len = [0u8; 1];
    (raw.copy_out(&mut len) == 1).then(|| 1 + len[0] as usize)
}

impl sealpipe_reactor::Filter for Unframe {
    fn decode(
        &mut self,
        raw_in: &mut sealpipe_reactor::Buffer,
        input: &mut sealpipe_reactor::Buffer,
        _raw_out: &mut sealpipe_reactor::Buffer,
        _eof: bool,
    ) -> std::io::Result<sealpipe_reactor::FilterStatus> {
        while let Some(total) = frame_at(raw_in).filter(|&t| raw_in.len() >= t) {
            let frame = raw_in.pullup(total).unwrap();
            input.append(&frame[1..]);
            raw_in.drain(total);
        }
        Ok(Default::default())
    }
    fn encode(
        &mut self,
        _: &mut sealpipe_reactor::Buffer,
        _: &mut sealpipe_reactor::Buffer,
        _: bool,
    ) -> std::io::Result<()> {
        Ok(())
    }
    fn frame_rest(&self, raw_in: &sealpipe_reactor::Buffer) -> Option<usize> {
        frame_at(raw_in).map(|t| t.saturating_sub(raw_in.len()))
    }
}

/// Reads through `Unframe` under a small high watermark, draining at most `bite` per READ.
struct SlowUnframer {
    bev: BufferEvent<Unframe>,
    bite: usize,
    got: Vec<u8>,
    done: bool,
}

impl Handler<Vec<u8>> for SlowUnframer {
    fn on_start(&mut self, cx: &mut Context<'_, Vec<u8>>) {
        self.bev.register(cx).unwrap();
    }
    fn on_ready(&mut self, cx: &mut Context<'_, Vec<u8>>, _: u8, r: Ready) {
        let ev = self.bev.on_ready(cx, r);
        self.take(cx, ev);
    }
    fn on_notify(&mut self, cx: &mut Context<'_, Vec<u8>>, tag: Tag) {
        let ev = self.bev.on_notify(cx, tag);
        self.take(cx, ev);
    }
}

impl SlowUnframer {
    fn take(&mut self, cx: &mut Context<'_, Vec<u8>>, ev: BevEvents) {
        // After EOF no further event comes: take the rest at once.
        let eof = ev.contains(BevEvents::EOF);
        let n = match eof {
            true => self.bev.input.len(),
            false => self.bev.input.len().min(self.bite),
        };
        if n > 0 {
            let start = self.got.len();
            self.got.resize(start + n, 0);
            self.bev.input.copy_out(&mut self.got[start..]);
            self.bev.input.drain(n);
            self.bev.consumed(cx);
        }
        if eof && !self.done {
            self.done = true;
            *cx.state = std::mem::take(&mut self.got);
            cx.loop_break();
        }
    }
}

#[test]
fn a_shrinking_filter_under_a_small_high_watermark_delivers_everything() {
    // 16 MiB of frames of 1..=255 bytes: decoding shrinks pending input by a byte a frame, so
    // reads keep stopping just short of the watermark and must be resumed by `consumed`.
    let payload: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut wire = Vec::with_capacity(payload.len() + payload.len() / 100);
    let mut sizes = (1..=255u8).cycle();
    let mut rest = &payload[..];
    while !rest.is_empty() {
        let n = (sizes.next().unwrap() as usize).min(rest.len());
        wire.push(n as u8);
        wire.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let writer = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        // Fails only if the reader gave up (the asserts below say why).
        let _ = s.write_all(&wire);
    });
    let client = mio::net::TcpStream::from_std({
        let s = TcpStream::connect(addr).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    });
    let mut bev = BufferEvent::with_filter(client, 0, Unframe, false);
    bev.set_watermarks(sealpipe_reactor::Watermarks {
        read_low: 0,
        read_high: 64 << 10,
        write_low: 0,
    });
    let mut base = EventBase::new(Vec::new()).unwrap();
    base.spawn(Box::new(SlowUnframer {
        bev,
        bite: 40 << 10,
        got: Vec::new(),
        done: false,
    }));
    base.loop_exit(TIMEOUT);
    base.run().unwrap();
    let got = std::mem::take(base.state_mut());
    drop(base); // closes the socket, so a writer stuck on a stalled reader returns
    writer.join().unwrap();
    assert_eq!(got.len(), payload.len(), "stalled or lost bytes");
    assert!(got == payload, "bytes differ");
}

/// Reads whatever arrives into the loop's state; detaches and attaches its socket on notify.
struct Detachable(BufferEvent);

const DETACH: Tag = Tag::new(1);
const ATTACH: Tag = Tag::new(2);
/// Throttles reading for bandwidth for 30 ms, then detaches.
const THROTTLE_AND_DETACH: Tag = Tag::new(3);

impl Handler<Vec<u8>> for Detachable {
    fn on_start(&mut self, cx: &mut Context<'_, Vec<u8>>) {
        self.0.register(cx).unwrap();
    }
    fn on_ready(&mut self, cx: &mut Context<'_, Vec<u8>>, _: u8, ready: Ready) {
        self.0.on_ready(cx, ready);
        self.take(cx);
    }
    fn on_notify(&mut self, cx: &mut Context<'_, Vec<u8>>, tag: Tag) {
        match tag {
            DETACH => self.0.detach(cx).unwrap(),
            ATTACH => self.0.attach(cx).unwrap(),
            THROTTLE_AND_DETACH => {
                let at = cx.now() + Duration::from_millis(30);
                self.0.throttle_until(cx, at);
                self.0.detach(cx).unwrap();
            }
            _ if self.0.owns_tag(tag) => {
                self.0.on_notify(cx, tag);
                self.take(cx);
            }
            _ => {}
        }
    }
    fn on_timer(&mut self, cx: &mut Context<'_, Vec<u8>>, tag: Tag) {
        if self.0.owns_tag(tag) {
            self.0.on_timer(cx, tag);
            self.take(cx);
        }
    }
}

impl Detachable {
    fn take(&mut self, cx: &mut Context<'_, Vec<u8>>) {
        let n = self.0.input.len();
        let mut b = vec![0u8; n];
        self.0.input.copy_out(&mut b);
        self.0.input.drain(n);
        cx.state.extend(b);
        self.0.consumed(cx);
    }
}

/// A live upgrade's socket pause: while detached, nothing is read (another process may own
/// the socket meanwhile) and a write goes nowhere; attached again, the bytes that arrived
/// meanwhile are read at once, from the registration's own readiness.
#[test]
fn a_detached_socket_is_left_alone_until_attached() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (server, _) = l.accept().unwrap();
    server.set_nonblocking(true).unwrap();
    let mut base = EventBase::new(Vec::new()).unwrap();
    let bev = BufferEvent::new(mio::net::TcpStream::from_std(server), 0);
    let id = base.spawn(Box::new(Detachable(bev)));
    let turn_until = |base: &mut EventBase<Vec<u8>>, want: &[u8]| {
        let deadline = Instant::now() + TIMEOUT;
        while base.state() != want {
            assert!(Instant::now() < deadline, "read {:?}", base.state());
            base.loop_once(Some(Duration::from_millis(10))).unwrap();
        }
    };
    client.write_all(b"a").unwrap();
    turn_until(&mut base, b"a");
    base.with_context(|cx| cx.notify(id, DETACH));
    base.loop_once(Some(Duration::ZERO)).unwrap();
    client.write_all(b"b").unwrap();
    // The byte waits in the kernel: a turn sees no readiness for a deregistered socket, and
    // the bytes are still there for whoever reads them next.
    for _ in 0..5 {
        base.loop_once(Some(Duration::from_millis(20))).unwrap();
    }
    assert_eq!(base.state(), b"a");
    base.with_context(|cx| cx.notify(id, ATTACH));
    turn_until(&mut base, b"ab");
    client.write_all(b"c").unwrap();
    turn_until(&mut base, b"abc");
}

/// A socket throttled for bandwidth and detached (a live upgrade freezes a connection whose
/// rate limit made it wait) whose wake-up comes while it is detached: attached again, it
/// reads (the wake-up lifted the suspension and freed the timer's slot; the registration
/// re-drives).
#[test]
fn a_bandwidth_wake_up_while_detached_is_not_lost() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (server, _) = l.accept().unwrap();
    server.set_nonblocking(true).unwrap();
    let mut base = EventBase::new(Vec::new()).unwrap();
    let bev = BufferEvent::new(mio::net::TcpStream::from_std(server), 0);
    let id = base.spawn(Box::new(Detachable(bev)));
    let turn_until = |base: &mut EventBase<Vec<u8>>, want: &[u8]| {
        let deadline = Instant::now() + TIMEOUT;
        while base.state() != want {
            assert!(Instant::now() < deadline, "read {:?}", base.state());
            base.loop_once(Some(Duration::from_millis(10))).unwrap();
        }
    };
    client.write_all(b"a").unwrap();
    turn_until(&mut base, b"a");
    base.with_context(|cx| cx.notify(id, THROTTLE_AND_DETACH));
    base.loop_once(Some(Duration::ZERO)).unwrap();
    client.write_all(b"b").unwrap();
    // The wake-up's time passes while detached (the loop runs its timer).
    let until = Instant::now() + Duration::from_millis(100);
    while Instant::now() < until {
        base.loop_once(Some(Duration::from_millis(10))).unwrap();
    }
    assert_eq!(base.state(), b"a", "nothing read while detached");
    base.with_context(|cx| cx.notify(id, ATTACH));
    turn_until(&mut base, b"ab");
    client.write_all(b"c").unwrap();
    turn_until(&mut base, b"abc");
}
