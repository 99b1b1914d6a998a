//! Signal events: a signal becomes an event on a loop, and the user's callback runs there,
//! never in signal context (signal-hook's self-pipe does the async-signal-safe part).
//!
//! A process has one set of signal dispositions, so one loop (the control thread's) should own
//! each signal and broadcast it to the others by message.

use std::io;

use mio::Interest;
use signal_hook_mio::v1_0::Signals;

use super::base::{Context, Handler, Ready};

/// A handler that calls `callback(cx, signo)` on its loop for every delivered signal.
pub struct SignalEvent<F> {
    signals: Signals,
    callback: F,
}

impl<F> SignalEvent<F> {
    /// Installs handlers for `signals` (e.g. `[libc::SIGTERM, libc::SIGHUP]`).
    pub fn new(signals: &[i32], callback: F) -> io::Result<Self> {
        Ok(SignalEvent {
            signals: Signals::new(signals)?,
            callback,
        })
    }
}

impl<S, F> Handler<S> for SignalEvent<F>
where
    F: FnMut(&mut Context<'_, S>, i32) + 'static,
{
    fn on_start(&mut self, cx: &mut Context<'_, S>) {
        if let Err(e) = cx.register(&mut self.signals, 0, Interest::READABLE) {
            tracing::error!(error = %e, "cannot register signal source");
        }
    }

    fn on_ready(&mut self, cx: &mut Context<'_, S>, _source: u8, _ready: Ready) {
        for signo in self.signals.pending() {
            (self.callback)(cx, signo);
        }
    }

    fn on_close(&mut self, cx: &mut Context<'_, S>) {
        let _ = cx.deregister(&mut self.signals);
    }
}
