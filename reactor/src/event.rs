//! `Event`: one source plus a callback, libevent's `event` — for code that wants a plain
//! callback rather than a handler of its own.
//!
//! Level-triggered semantics over edge-triggered mio: the callback says whether it drained the
//! source ([`Next::Wait`]: it saw `WouldBlock`) or left work behind ([`Next::Again`]: run me
//! again after other ready work). An event is persistent unless created one-shot, and may carry
//! a timeout that fires when the source stays quiet that long.

use std::time::Duration;

use mio::Interest;
use mio::event::Source;

use super::base::{Context, Handler, Ready};
use super::tag::Tag;
use super::timer::TimerKey;

/// Why the callback runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum What {
    Readable,
    Writable,
    Timeout,
}

/// What the callback wants next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// The source is drained; wait for the next readiness.
    Wait,
    /// Still ready (the callback stopped early); call again after other ready work.
    Again,
    /// Remove this event.
    Stop,
}

const TAG_TIMEOUT: Tag = Tag::new(1);
const TAG_AGAIN: Tag = Tag::new(2);

/// An I/O event (`source` is `Some`) or a pure timer (`source` is `None`).
pub struct Event<T, F> {
    source: Option<T>,
    interest: Interest,
    persist: bool,
    timeout: Option<Duration>,
    timer: Option<TimerKey>,
    last: What,
    callback: F,
}

impl<T: Source + 'static, F> Event<T, F> {
    /// An I/O event. `persist = false` removes it after its first callback.
    pub fn io(
        source: T,
        interest: Interest,
        persist: bool,
        timeout: Option<Duration>,
        cb: F,
    ) -> Self {
        Event {
            source: Some(source),
            interest,
            persist,
            timeout,
            timer: None,
            last: What::Readable,
            callback: cb,
        }
    }
}

impl<F> Event<mio::net::TcpStream, F> {
    /// A pure timer: fires after `after`, then every `after` if `persist`.
    pub fn timer(after: Duration, persist: bool, cb: F) -> Self {
        Event {
            source: None,
            interest: Interest::READABLE,
            persist,
            timeout: Some(after),
            timer: None,
            last: What::Timeout,
            callback: cb,
        }
    }
}

impl<T, F> Event<T, F> {
    fn rearm<S>(&mut self, cx: &mut Context<'_, S>) {
        if let Some(t) = self.timer.take() {
            cx.cancel_timer(t);
        }
        if let Some(d) = self.timeout {
            self.timer = Some(cx.timer(d, TAG_TIMEOUT));
        }
    }
}

impl<S, T, F> Handler<S> for Event<T, F>
where
    T: Source + 'static,
    F: FnMut(&mut Context<'_, S>, Option<&mut T>, What) -> Next + 'static,
{
    fn on_start(&mut self, cx: &mut Context<'_, S>) {
        if let Some(src) = self.source.as_mut() {
            if let Err(e) = cx.register(src, 0, self.interest) {
                tracing::warn!(error = %e, "event registration failed");
                cx.close();
                return;
            }
        }
        self.rearm(cx);
    }

    fn on_ready(&mut self, cx: &mut Context<'_, S>, _source: u8, ready: Ready) {
        let what = if ready.readable || ready.read_closed || ready.error {
            What::Readable
        } else {
            What::Writable
        };
        self.fire(cx, what);
    }

    fn on_timer(&mut self, cx: &mut Context<'_, S>, _tag: Tag) {
        self.timer = None;
        self.fire(cx, What::Timeout);
    }

    fn on_notify(&mut self, cx: &mut Context<'_, S>, tag: Tag) {
        if tag == TAG_AGAIN {
            self.fire(cx, self.last);
        }
    }

    fn on_close(&mut self, cx: &mut Context<'_, S>) {
        if let Some(t) = self.timer.take() {
            cx.cancel_timer(t);
        }
        if let Some(src) = self.source.as_mut() {
            let _ = cx.deregister(src);
        }
    }
}

impl<T, F> Event<T, F> {
    fn fire<S>(&mut self, cx: &mut Context<'_, S>, what: What)
    where
        F: FnMut(&mut Context<'_, S>, Option<&mut T>, What) -> Next,
    {
        self.last = what;
        let next = (self.callback)(cx, self.source.as_mut(), what);
        if !self.persist || next == Next::Stop {
            cx.close();
            return;
        }
        if next == Next::Again {
            cx.defer(TAG_AGAIN);
        }
        self.rearm(cx);
    }
}
