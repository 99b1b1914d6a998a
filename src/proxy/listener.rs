//! The accept side of a tunnel on one shard: a [`ConnListener`] whose accepted sockets become
//! [`Conn`] handlers of the tunnel's mode.
//!
//! An accept pass takes no more than the room left under the shard's connection limit; at the
//! limit the listener pauses (the kernel keeps queueing) and resumes when a connection closes
//! or a reload raises the limit; each pause is counted as `rejected{reason="max_conns"}`. With no
//! healthy upstream, a new client is closed at once and counted. When the shard drains, the
//! listener first accepts everything already queued in the kernel, then closes. When a
//! connection runs out of descriptors after its accept (its upstream connect fails with
//! EMFILE), it notifies the listener ([`TAG_EXHAUSTED`]), which pauses with the same backoff
//! as an exhausted accept — never an accept/close cycle while clients queue.

use std::net::SocketAddr;

use mio::net::TcpStream;

use crate::config::Mode;
use crate::metrics::RejectReason;
use crate::reactor::listener::{AcceptPass, ConnListener};
use crate::reactor::{Context, Handler, NoFilter, Ready};

use super::ShardState;
use super::codec::SealFilter;
use super::conn::Conn;

/// Notify tags for a tunnel listener.
pub const TAG_RESUME: u64 = 0x20 << 8;
pub const TAG_DRAIN: u64 = 0x21 << 8;
/// A connection of this shard met resource exhaustion after its accept (an upstream connect
/// failed with EMFILE, say): pause accepting with the exhaustion backoff.
pub const TAG_EXHAUSTED: u64 = 0x22 << 8;

pub struct TunnelListener {
    tunnel: usize,
    listener: ConnListener,
}

impl TunnelListener {
    pub fn new(tunnel: usize, listener: ConnListener) -> Self {
        TunnelListener { tunnel, listener }
    }

    fn report(&self, cx: &mut Context<'_, ShardState>, pass: AcceptPass) {
        let now = cx.now();
        if let Some(e) = pass.exhausted {
            cx.state.tunnels[self.tunnel].metrics.accept_exhausted.inc();
            if let Some(skipped) = cx.state.may_warn(now) {
                let rt = &cx.state.tunnels[self.tunnel];
                tracing::warn!(tunnel = %rt.cfg.name, error = %e, backoff = ?self.listener.backoff(), skipped, "accept paused: out of resources");
            }
        }
        if let Some(e) = pass.error {
            cx.state.tunnels[self.tunnel].metrics.accept_other.inc();
            if let Some(skipped) = cx.state.may_warn(now) {
                let rt = &cx.state.tunnels[self.tunnel];
                tracing::warn!(tunnel = %rt.cfg.name, error = %e, skipped, "accept failed");
            }
        }
        if self.listener.is_paused() && !cx.state.tunnels[self.tunnel].listener_paused {
            cx.state.tunnels[self.tunnel].listener_paused = true;
        }
    }
}

/// Builds the connection handler for the tunnel's mode and starts it; false if the client
/// was turned away instead.
fn admit(
    cx: &mut Context<'_, ShardState>,
    tunnel: usize,
    stream: TcpStream,
    _peer: SocketAddr,
) -> bool {
    let now = cx.now();
    let rt = &cx.state.tunnels[tunnel];
    if rt.upstreams.healthy(now) == 0 {
        rt.metrics.rejected(RejectReason::NoHealthyUpstream);
        if let Some(skipped) = cx.state.may_warn(now) {
            let rt = &cx.state.tunnels[tunnel];
            tracing::warn!(tunnel = %rt.cfg.name, skipped, "no healthy upstream: client closed");
        }
        let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
        return false;
    }
    let state = &mut *cx.state;
    let (rt, keys) = (&state.tunnels[tunnel], &mut state.ephemeral_keys);
    let conn: Box<dyn Handler<ShardState>> = match rt.cfg.mode {
        Mode::Encrypt => Box::new(Conn::<NoFilter, SealFilter>::new(rt, keys, stream, now)),
        Mode::Decrypt => Box::new(Conn::<SealFilter, NoFilter>::new(rt, keys, stream, now)),
        Mode::Forward => Box::new(Conn::<NoFilter, NoFilter>::new(rt, keys, stream, now)),
    };
    cx.spawn(conn);
    true
}

impl TunnelListener {
    fn accept(&mut self, cx: &mut Context<'_, ShardState>, tag: Option<u64>) {
        let tunnel = self.tunnel;
        // The shard's share of max_conns is exact: a pass accepts only what still fits (none
        // with a share of 0). `conns` counts started handlers; spawned ones start after this
        // callback, so count what this pass admitted too.
        let room = cx.state.conn_limit.saturating_sub(cx.state.conns);
        let mut admitted = 0;
        let on_accept = |cx: &mut Context<'_, ShardState>, s: TcpStream, p: SocketAddr| {
            admitted += usize::from(admit(cx, tunnel, s, p));
        };
        let pass = match tag {
            None => self.listener.on_ready_at_most(cx, room, on_accept),
            Some(t) => self.listener.on_tag_at_most(cx, t, room, on_accept),
        };
        self.report(cx, pass);
        let over_limit = cx.state.conns + admitted >= cx.state.conn_limit;
        if over_limit && !self.listener.is_paused() {
            self.listener.pause();
            let rt = &mut cx.state.tunnels[tunnel];
            rt.listener_paused = true;
            rt.metrics.rejected(RejectReason::MaxConns);
            let now = cx.now();
            if let Some(skipped) = cx.state.may_warn(now) {
                let rt = &cx.state.tunnels[tunnel];
                tracing::warn!(tunnel = %rt.cfg.name, limit = cx.state.conn_limit, skipped, "connection limit reached: accepting paused");
            }
        }
    }
}

impl Handler<ShardState> for TunnelListener {
    fn on_start(&mut self, cx: &mut Context<'_, ShardState>) {
        if let Err(e) = self.listener.register(cx) {
            tracing::error!(error = %e, "cannot register listener");
            cx.close();
            return;
        }
        let id = cx.id();
        cx.state.tunnels[self.tunnel].listener = id;
        cx.state
            .metrics
            .health
            .listeners_up
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn on_ready(&mut self, cx: &mut Context<'_, ShardState>, _source: u8, _ready: Ready) {
        self.accept(cx, None);
    }

    fn on_timer(&mut self, cx: &mut Context<'_, ShardState>, tag: u64) {
        if self.listener.owns_tag(tag) {
            self.accept(cx, Some(tag));
        }
    }

    fn on_notify(&mut self, cx: &mut Context<'_, ShardState>, tag: u64) {
        match tag {
            TAG_RESUME if cx.state.conns < cx.state.conn_limit && !cx.state.draining => {
                cx.state.tunnels[self.tunnel].listener_paused = false;
                self.listener.resume(cx);
            }
            TAG_EXHAUSTED => {
                if let Some(wait) = self.listener.pause_for_backoff(cx) {
                    let now = cx.now();
                    cx.state.tunnels[self.tunnel].metrics.accept_exhausted.inc();
                    if let Some(skipped) = cx.state.may_warn(now) {
                        let rt = &cx.state.tunnels[self.tunnel];
                        tracing::warn!(tunnel = %rt.cfg.name, backoff = ?wait, skipped, "accept paused: out of resources for upstream connections");
                    }
                }
            }
            TAG_DRAIN => {
                let tunnel = self.tunnel;
                let pass = self.listener.accept_all(cx, |cx, s, p| {
                    admit(cx, tunnel, s, p);
                });
                if pass.accepted > 0 {
                    tracing::info!(tunnel = %cx.state.tunnels[tunnel].cfg.name, accepted = pass.accepted, "drain: served connections already queued");
                }
                self.report(cx, pass);
                cx.close();
            }
            t if self.listener.owns_tag(t) => self.accept(cx, Some(t)),
            _ => {}
        }
    }

    fn on_close(&mut self, cx: &mut Context<'_, ShardState>) {
        self.listener.deregister(cx);
        let rt = &mut cx.state.tunnels[self.tunnel];
        rt.listener = None;
        cx.state
            .metrics
            .health
            .listeners_up
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
