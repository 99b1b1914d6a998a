//! An echo server on the sealpipe reactor, the way libevent's samples show its API:
//! a `ConnListener` accepts, each connection is a handler owning one `BufferEvent`, and
//! everything read is written back. Backpressure: when the client stops reading, the output
//! reaches its high watermark and reading from that client stops until it drains.
//!
//! ```text
//! cargo run --release --example echo -- --listen 127.0.0.1:7000
//! ```

use std::net::SocketAddr;

use sealpipe_reactor::listener::{ConnListener, ListenerOptions};
use sealpipe_reactor::{BevEvents, BufferEvent, Context, EventBase, Handler, Ready, Suspend, Tag};

/// Stop reading from a client once this much echo is waiting for it.
const OUTPUT_HIGH: usize = 1 << 20;

struct Acceptor {
    listener: ConnListener,
}

impl Handler<()> for Acceptor {
    fn on_start(&mut self, cx: &mut Context<'_, ()>) {
        self.listener.register(cx).expect("register listener");
    }

    fn on_ready(&mut self, cx: &mut Context<'_, ()>, _source: u8, _ready: Ready) {
        let pass = self.listener.on_ready(cx, spawn_session);
        report(&pass);
    }

    fn on_notify(&mut self, cx: &mut Context<'_, ()>, tag: Tag) {
        let pass = self.listener.on_tag(cx, tag, spawn_session);
        report(&pass);
    }

    fn on_timer(&mut self, cx: &mut Context<'_, ()>, tag: Tag) {
        self.on_notify(cx, tag);
    }
}

fn report(pass: &sealpipe_reactor::listener::AcceptPass) {
    if let Some(e) = &pass.exhausted {
        eprintln!("echo: accept paused: {e}");
    }
    if let Some(e) = &pass.error {
        eprintln!("echo: accept failed: {e}");
    }
}

fn spawn_session(cx: &mut Context<'_, ()>, stream: mio::net::TcpStream, _peer: SocketAddr) {
    cx.spawn(Box::new(Session {
        bev: BufferEvent::new(stream, 0),
    }));
}

struct Session {
    bev: BufferEvent,
}

impl Session {
    fn handle(&mut self, cx: &mut Context<'_, ()>, ev: BevEvents) {
        if ev.contains(BevEvents::READ) {
            // Echo: input chunks move to output without copying bytes.
            let Session { bev } = self;
            bev.input.move_all_to(&mut bev.output);
            let more = bev.flush(cx);
            if bev.output_pending() >= OUTPUT_HIGH {
                bev.suspend_read(Suspend::Peer);
            }
            bev.consumed(cx);
            if !more.is_empty() {
                self.handle(cx, more);
            }
        }
        if ev.contains(BevEvents::WRITE) && self.bev.output_pending() < OUTPUT_HIGH / 2 {
            self.bev.resume_read(cx, Suspend::Peer);
        }
        if ev.contains(BevEvents::EOF) {
            let e = self.bev.shutdown_write(cx);
            if e.contains(BevEvents::SHUTDOWN) {
                cx.close();
            }
        }
        if ev.contains(BevEvents::SHUTDOWN) || ev.contains(BevEvents::ERROR) {
            cx.close();
        }
    }
}

impl Handler<()> for Session {
    fn on_start(&mut self, cx: &mut Context<'_, ()>) {
        if self.bev.register(cx).is_err() {
            cx.close();
        }
    }
    fn on_ready(&mut self, cx: &mut Context<'_, ()>, _source: u8, ready: Ready) {
        let ev = self.bev.on_ready(cx, ready);
        self.handle(cx, ev);
    }
    fn on_notify(&mut self, cx: &mut Context<'_, ()>, tag: Tag) {
        if self.bev.owns_tag(tag) {
            let ev = self.bev.on_notify(cx, tag);
            self.handle(cx, ev);
        }
    }
    fn on_close(&mut self, cx: &mut Context<'_, ()>) {
        self.bev.close(cx);
    }
}

fn main() -> std::io::Result<()> {
    let mut listen: SocketAddr = "127.0.0.1:7000".parse().expect("default address");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => {
                let v = args.next().unwrap_or_default();
                listen = v.parse().unwrap_or_else(|_| {
                    eprintln!("echo: --listen wants an address like 127.0.0.1:7000, got {v:?}");
                    std::process::exit(2)
                });
            }
            "-h" | "--help" => {
                println!("echo [--listen ADDR]   (default 127.0.0.1:7000)");
                return Ok(());
            }
            other => {
                eprintln!("echo: unknown argument {other:?} (try --help)");
                std::process::exit(2);
            }
        }
    }
    let listener = ConnListener::bind(listen, ListenerOptions::default(), 0)?;
    println!("echo listening on {}", listener.local_addr()?);
    let mut base = EventBase::new(())?;
    base.spawn(Box::new(Acceptor { listener }));
    base.run()
}
