//! Active health checks: every `health_check_interval`, each shard opens a TCP connection to
//! each target of the tunnel. A completed connect marks the target up (even if the peer resets
//! it at once); a refusal, timeout or unreachable target marks it down (with the same backoff as
//! a failed client connect), so clients are sent to other targets before one of them has to
//! fail. Like every connect, probes name their target by [`TargetId`]: a probe that outlives
//! its target (removed by a reload) changes nothing.

use std::time::{Duration, Instant};

use crate::reactor::{BevEvents, BufferEvent, Context, Handler, Ready, Tag, Timeouts};

use super::upstream::{ConnectOutcome, TargetId};
use super::{ShardState, TargetAddr, TunnelIdx};

/// One probe of one target.
pub struct Probe {
    tunnel: TunnelIdx,
    target: TargetId,
    addr: TargetAddr,
    timeout: Duration,
    started: Instant,
    bev: Option<BufferEvent>,
}

impl Probe {
    pub fn new(
        tunnel: TunnelIdx,
        target: TargetId,
        addr: TargetAddr,
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
        let err = self.bev.as_mut().and_then(|b| b.take_error());
        let outcome = if ev.contains(BevEvents::CONNECTED) {
            None
        } else {
            let timed_out = ev.contains(BevEvents::CONNECT_TIMEOUT);
            Some(ConnectOutcome::classify(err.as_ref(), timed_out))
        };
        let rt = &mut cx.state.tunnels[self.tunnel];
        // `None`: a reload removed the target since the probe started.
        if let Some(i) = rt.upstreams.index_of(self.target) {
            let (tunnel, upstream) = (&rt.cfg.name, self.addr);
            match outcome {
                None | Some(ConnectOutcome::ResetAfterConnect) => {
                    if rt.upstreams.succeeded(self.target) == Some(true) {
                        tracing::info!(%tunnel, %upstream, "health check: upstream is up");
                    }
                    if let Some(m) = rt.metrics.upstreams.get(i.get()) {
                        m.connect.observe((now - self.started).as_secs_f64());
                    }
                }
                Some(o) => {
                    if let (Some(m), Some(r)) =
                        (rt.metrics.upstreams.get(i.get()), o.failure_reason())
                    {
                        m.failures[r as usize].inc();
                    }
                    if o.marks_down() && rt.upstreams.failed(self.target, now) == Some(true) {
                        let error = err.as_ref().map(|e| e.to_string()).unwrap_or_default();
                        tracing::warn!(%tunnel, %upstream, %error, "health check failed: upstream marked down");
                    }
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
        let mut bev = BufferEvent::connect_filtered(
            cx,
            self.addr.endpoint(),
            0,
            crate::reactor::NoFilter,
            true,
            t,
        );
        let _ = bev.register(cx);
        self.bev = Some(bev);
    }

    fn on_ready(&mut self, cx: &mut Context<'_, ShardState>, _source: u8, ready: Ready) {
        if let Some(b) = self.bev.as_mut() {
            let ev = b.on_ready(cx, ready);
            self.outcome(cx, ev);
        }
    }

    fn on_timer(&mut self, cx: &mut Context<'_, ShardState>, tag: Tag) {
        if let Some(b) = self.bev.as_mut() {
            let ev = b.on_timer(cx, tag);
            self.outcome(cx, ev);
        }
    }

    fn on_notify(&mut self, cx: &mut Context<'_, ShardState>, tag: Tag) {
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
        for t in rt.upstreams.targets() {
            due.push(Probe::new(rt.index, t.id(), t.addr, timeout, now));
        }
    }
    for p in due {
        cx.spawn(Box::new(p));
    }
}
