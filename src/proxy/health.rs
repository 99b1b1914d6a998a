//! Active health checks: every `health_check_interval`, each shard opens a TCP connection to
//! each target of the tunnel. Success marks the target up; refusal or a timeout marks it down
//! (with the same backoff as a failed client connect), so clients stop being sent there before
//! one of them has to fail.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::reactor::{BevEvents, BufferEvent, Context, Handler, Ready, Timeouts};

use super::ShardState;

/// One probe of one target.
pub struct Probe {
    tunnel: usize,
    target: usize,
    addr: SocketAddr,
    timeout: Duration,
    started: Instant,
    bev: Option<BufferEvent>,
}

impl Probe {
    pub fn new(
        tunnel: usize,
        target: usize,
        addr: SocketAddr,
        timeout: Duration,
        now: Instant,
    ) -> Self {
        Probe {
            tunnel,
            target,
            addr,
            timeout,
            started: now,
            bev: None,
        }
    }

    fn outcome(&mut self, cx: &mut Context<'_, ShardState>, ev: BevEvents) {
        if ev.is_empty() {
            return;
        }
        let now = cx.now();
        let rt = &mut cx.state.tunnels[self.tunnel];
        // The target list may have changed on reload; only act on the same address.
        let same = rt
            .upstreams
            .targets
            .get(self.target)
            .is_some_and(|t| t.addr == self.addr);
        if same {
            if ev.contains(BevEvents::CONNECTED) {
                if rt.upstreams.succeeded(self.target) {
                    tracing::info!(tunnel = %rt.cfg.name, upstream = %self.addr, "health check: upstream is up");
                }
                if let Some(m) = rt.metrics.upstreams.get(self.target) {
                    m.connect.observe((now - self.started).as_secs_f64());
                }
            } else {
                let reason = if ev.contains(BevEvents::CONNECT_TIMEOUT) {
                    1
                } else {
                    0
                };
                if let Some(m) = rt.metrics.upstreams.get(self.target) {
                    m.failures[reason].inc();
                }
                if rt.upstreams.failed(self.target, now) {
                    tracing::warn!(tunnel = %rt.cfg.name, upstream = %self.addr, "health check failed: upstream marked down");
                }
            }
        }
        cx.close();
    }
}

impl Handler<ShardState> for Probe {
    fn on_start(&mut self, cx: &mut Context<'_, ShardState>) {
        let t = Timeouts {
            connect: Some(self.timeout),
            ..Timeouts::default()
        };
        let mut bev =
            BufferEvent::connect_filtered(cx, self.addr, 0, crate::reactor::NoFilter, true, t);
        let _ = bev.register(cx);
        self.bev = Some(bev);
    }

    fn on_ready(&mut self, cx: &mut Context<'_, ShardState>, _source: u8, ready: Ready) {
        if let Some(b) = self.bev.as_mut() {
            let ev = b.on_ready(cx, ready);
            self.outcome(cx, ev);
        }
    }

    fn on_timer(&mut self, cx: &mut Context<'_, ShardState>, tag: u64) {
        if let Some(b) = self.bev.as_mut() {
            let ev = b.on_timer(cx, tag);
            self.outcome(cx, ev);
        }
    }

    fn on_notify(&mut self, cx: &mut Context<'_, ShardState>, tag: u64) {
        if let Some(b) = self.bev.as_mut() {
            let ev = b.on_notify(cx, tag);
            self.outcome(cx, ev);
        }
    }

    fn on_close(&mut self, cx: &mut Context<'_, ShardState>) {
        if let Some(b) = self.bev.as_mut() {
            b.close(cx);
        }
    }
}

/// Starts the probes that are due on this shard.
pub fn run_due(cx: &mut Context<'_, ShardState>, now: Instant) {
    let mut due = Vec::new();
    for rt in &mut cx.state.tunnels {
        let Some(every) = rt.cfg.health_check_interval else {
            continue;
        };
        if rt.next_probe.is_some_and(|t| t > now) {
            continue;
        }
        rt.next_probe = Some(now + every);
        let timeout = rt.cfg.connect_timeout.min(every);
        for (i, t) in rt.upstreams.targets.iter().enumerate() {
            due.push(Probe::new(rt.index, i, t.addr, timeout, now));
        }
    }
    for p in due {
        cx.spawn(Box::new(p));
    }
}
