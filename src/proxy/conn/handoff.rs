//! A proxied connection's side of a live upgrade (`proxy/handoff.rs` is the shard's):
//! freezing it and handing its state and sockets to the transfer thread, resuming it if the
//! successor refused it, vanishing once the successor took it; and, in the successor,
//! rebuilding it from what arrived.
//!
//! Invariants:
//! - A frozen connection does nothing: its sockets are detached (deregistered; readiness,
//!   re-drives and flushes ignored), its own timers cancelled, and every event for it is
//!   dropped but the outcome; a drain deadline that passes meanwhile is remembered and
//!   applied if it is kept.
//! - A moved connection leaves without its end being recorded here (no close reason, no
//!   access log line, no ABORT, no shutdown, no SO_LINGER): the successor records its end.
//!   Its sockets close here, which only drops this process's references.
//! - An imported connection is counted as active, not as accepted; its target counts it
//!   (least-conn) if its address is still a target.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use crate::config::Mode;
use crate::metrics::CloseReason;
use crate::reactor::{BufferEvent, Context, NoFilter, Stream};

use super::super::codec::SealFilter;
use super::super::handoff::{self, Exported, Outcome};
use super::super::identity::ConnIdentity;
use super::super::{ShardState, TunnelIdx, TunnelRt};
use super::core::migrate::{ConnState, NotReady, StateError};
use super::core::{ConnTimer, Side};
use super::{Conn, Make, Shell};

/// Where a connection stands in a live upgrade.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Moving {
    /// Running here as usual.
    Live,
    /// Running here as usual, ready to move and queued for room (see
    /// `proxy::handoff::MAX_IN_FLIGHT`): offered again with a notification.
    Queued,
    /// Moved here from a predecessor, not yet started.
    Imported,
    /// Handed to the transfer thread, waiting for the successor's answer; `aborted`: the
    /// drain deadline passed meanwhile.
    Frozen { aborted: bool },
    /// The successor refused it: it runs here to its end and is never offered again.
    Kept,
    /// It left (moved, or lost in the move): its `on_close` only lets go.
    Gone(Outcome),
}

impl Shell {
    pub(super) fn frozen(&self) -> bool {
        matches!(self.moving, Moving::Frozen { .. })
    }
}

impl<C: Make, U: Make> Conn<C, U> {
    /// After an event: if the shard's export window is open and this connection is live,
    /// it tries to move (see `proxy::handoff`).
    pub(super) fn after_event(&mut self, cx: &mut Context<'_, ShardState>) {
        if self.shell.moving == Moving::Live && cx.state.export.as_ref().is_some_and(|e| e.open()) {
            self.try_export(cx);
        }
    }

    /// Freezes the connection and hands it to the transfer thread, if it can move now.
    pub(super) fn try_export(&mut self, cx: &mut Context<'_, ShardState>) {
        if self.shell.moving != Moving::Live {
            return;
        }
        let Some(id) = cx.id() else {
            return;
        };
        match self.core.movable() {
            Ok(()) => {}
            // Ended at its max_lifetime: it ends here, within its grace.
            Err(NotReady::Ending) => return self.keep(cx),
            Err(_) => return,
        }
        match cx.state.export.as_mut().map(|e| e.room_for(id)) {
            Some(true) => {}
            Some(false) => {
                self.shell.moving = Moving::Queued;
                return;
            }
            None => return,
        }
        let now = cx.now();
        let rt = &cx.state.tunnels[self.shell.tunnel];
        let Ok(mut core) = self.core.export(now, &rt.upstreams) else {
            return;
        };
        if rt.cfg.lifetime.is_none() {
            // Nothing a successor needs (it draws a jitter should a reload set a lifetime),
            // and the state is then the one a build without the field writes and reads.
            core.lifetime = None;
        }
        let state = ConnState {
            tunnel: rt.cfg.name.clone(),
            mode: rt.cfg.mode,
            shard: u32::try_from(cx.state.shard.get()).unwrap_or(u32::MAX),
            core,
            ident: self.shell.ident.as_deref().map(ConnIdentity::export),
        };
        let bytes = state.encode();
        drop(state);
        let fds = match self.dup_sockets() {
            Ok(fds) => fds,
            Err(e) => {
                // Out of descriptors, most likely: this one stays here, as it would have.
                let now = cx.now();
                if let Some(skipped) = cx.state.may_warn(now) {
                    tracing::warn!(error = %e, skipped, "live upgrade: cannot duplicate a connection's sockets; it stays in this process");
                }
                self.keep(cx);
                return;
            }
        };
        if let Err(e) = self.detach(cx) {
            tracing::debug!(error = %e, "live upgrade: cannot detach a connection's sockets; it stays");
            self.attach(cx);
            self.keep(cx);
            return;
        }
        let (_, mut env) = self.parts(cx);
        env.set_timer(ConnTimer::Idle, None);
        env.set_timer(ConnTimer::Handshake, None);
        let e = Exported {
            shard: cx.state.shard,
            conn: id,
            state: bytes,
            fds,
            frozen_at: now,
        };
        let sent = cx.state.export.as_mut().map(|x| x.send(e));
        match sent {
            Some(Ok(())) => {
                self.shell.moving = Moving::Frozen { aborted: false };
                handoff::check_done(cx);
            }
            // The transfer is over: back to work, as if nothing happened.
            _ => {
                self.attach(cx);
                self.shell.moving = Moving::Live;
                let (core, mut env) = self.parts(cx);
                core.resume(now, &mut env);
            }
        }
    }

    /// Duplicates of the client's and the upstream's sockets, for the successor.
    fn dup_sockets(&self) -> std::io::Result<Vec<OwnedFd>> {
        let mut fds = Vec::with_capacity(2);
        let up = self.core.upstream().and_then(|u| u.stream());
        for s in [self.core.client().stream(), up] {
            let s = s.ok_or_else(|| std::io::Error::other("a side has no socket"))?;
            fds.push(s.as_fd().try_clone_to_owned()?);
        }
        Ok(fds)
    }

    fn detach(&mut self, cx: &mut Context<'_, ShardState>) -> std::io::Result<()> {
        self.core.client_mut().detach(cx)?;
        if let Some(up) = self.core.upstream_mut() {
            up.detach(cx)?;
        }
        Ok(())
    }

    fn attach(&mut self, cx: &mut Context<'_, ShardState>) {
        let mut failed = self.core.client_mut().attach(cx).err();
        if let Some(up) = self.core.upstream_mut() {
            failed = failed.or(up.attach(cx).err());
        }
        if let Some(e) = failed {
            tracing::debug!(error = %e, "cannot register a connection's socket again");
            let (core, mut env) = self.parts(cx);
            core.close(CloseReason::PeerReset, &mut env);
        }
    }

    /// This connection stays here for good (counted as kept).
    fn keep(&mut self, cx: &mut Context<'_, ShardState>) {
        self.shell.moving = Moving::Kept;
        if let Some(e) = cx.state.export.as_mut() {
            e.kept += 1;
        }
        count(cx, Outcome::Kept);
        handoff::check_done(cx);
    }

    /// Handles the tags of a live upgrade, and drops what a frozen connection must not act
    /// on. True if `tag` was handled.
    pub(super) fn handoff_notify(
        &mut self,
        cx: &mut Context<'_, ShardState>,
        tag: crate::reactor::Tag,
    ) -> bool {
        let outcome = match tag {
            handoff::TAG_EXPORT => {
                if self.shell.moving == Moving::Queued {
                    self.shell.moving = Moving::Live;
                }
                self.try_export(cx);
                return true;
            }
            handoff::TAG_MOVED => Outcome::Moved,
            handoff::TAG_KEPT => Outcome::Kept,
            handoff::TAG_FAILED => Outcome::Failed,
            _ => {
                if !self.shell.frozen() {
                    return false;
                }
                if tag == super::TAG_ABORT {
                    self.shell.moving = Moving::Frozen { aborted: true };
                } else if self.core.client().owns_tag(tag) {
                    // A re-drive queued before the freeze: the detached socket drops it.
                    self.core.client_mut().on_notify(cx, tag);
                } else if let Some(up) = self.core.upstream_mut() {
                    if up.owns_tag(tag) {
                        up.on_notify(cx, tag);
                    }
                }
                return true;
            }
        };
        let Moving::Frozen { aborted } = self.shell.moving else {
            return true;
        };
        if let Some(e) = cx.state.export.as_mut() {
            e.frozen = e.frozen.saturating_sub(1);
        }
        match outcome {
            Outcome::Kept => {
                self.attach(cx);
                self.keep(cx);
                let now = cx.now();
                let (core, mut env) = self.parts(cx);
                core.resume(now, &mut env);
                if aborted {
                    core.close(CloseReason::DrainDeadline, &mut env);
                }
            }
            Outcome::Moved | Outcome::Failed => {
                count(cx, outcome);
                self.shell.moving = Moving::Gone(outcome);
                cx.close();
            }
        }
        true
    }

    /// `on_close` of a connection that left: lets go of it without recording an end.
    pub(super) fn gone(&mut self, cx: &mut Context<'_, ShardState>) {
        if let Some(id) = self.core.target() {
            cx.state.tunnels[self.shell.tunnel].upstreams.release(id);
        }
        let asleep = self.core.is_asleep();
        self.core.client_mut().close(cx);
        if let Some(up) = self.core.upstream_mut() {
            up.close(cx);
        }
        if let Some(id) = cx.id() {
            cx.state.live_conns.remove(&id);
        }
        let state = &mut *cx.state;
        state.conns -= 1;
        let rt = &mut state.tunnels[self.shell.tunnel];
        rt.active -= 1;
        rt.metrics.active.dec();
        if asleep {
            rt.metrics.hibernating.dec();
        }
        handoff::check_done(cx);
    }

    /// A connection moved here from a predecessor (see `core::migrate`).
    pub fn import(
        rt: &mut TunnelRt,
        st: ConnState,
        client: Stream,
        upstream: Stream,
        now: Instant,
    ) -> Result<Self, StateError> {
        let target = st.core.target.and_then(|a| rt.upstreams.adopt(a));
        let core = super::ConnCore::import(
            st.core,
            target,
            now,
            |l| BufferEvent::with_filter(client, Side::Client as u8, l, !C::SEALED),
            |l| BufferEvent::with_filter(upstream, Side::Upstream as u8, l, !U::SEALED),
        );
        let core = match core {
            Ok(c) => c,
            Err(e) => {
                if let Some(id) = target {
                    rt.upstreams.release(id);
                }
                return Err(e);
            }
        };
        Ok(Conn {
            core,
            shell: Shell::new(
                rt.index,
                st.ident.map(|i| Box::new(ConnIdentity::import(i))),
                Moving::Imported,
            ),
        })
    }

    /// `on_start` of an imported connection: registers its sockets, counts it as active (not
    /// as accepted), and resumes it (its sockets' registration drives what was pending).
    pub(super) fn start_imported(&mut self, cx: &mut Context<'_, ShardState>) {
        self.shell.moving = Moving::Live;
        let asleep = self.core.is_asleep();
        let rt = &mut cx.state.tunnels[self.shell.tunnel];
        rt.active += 1;
        rt.metrics.active.inc();
        if asleep {
            rt.metrics.hibernating.inc();
        }
        cx.state.conns += 1;
        if let Some(id) = cx.id() {
            cx.state.live_conns.insert(id);
        }
        let mut failed = self.core.client_mut().register(cx).err();
        if let Some(up) = self.core.upstream_mut() {
            failed = failed.or(up.register(cx).err());
        }
        let now = cx.now();
        let (core, mut env) = self.parts(cx);
        if let Some(e) = failed {
            // Counted as failed: it was taken, and cannot run here.
            tracing::warn!(error = %e, "live upgrade: cannot register a moved connection's socket; it ends");
            count(cx, Outcome::Failed);
            let (core, mut env) = self.parts(cx);
            return core.close(CloseReason::PeerReset, &mut env);
        }
        core.resume(now, &mut env);
        count(cx, Outcome::Moved);
    }
}

fn count(cx: &mut Context<'_, ShardState>, o: Outcome) {
    cx.state
        .metrics
        .handoff_conns
        .with_label_values(&[o.as_str()])
        .inc();
}

/// Why a moved connection could not be rebuilt on a shard.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("no tunnel named {0:?} here")]
    NoTunnel(String),
    #[error("tunnel {tunnel:?} is {here} here, {there} in the previous process")]
    Mode {
        tunnel: String,
        here: &'static str,
        there: &'static str,
    },
    #[error("{0}")]
    State(#[from] StateError),
    #[error("a socket: {0}")]
    Io(#[from] std::io::Error),
}

/// The tunnel a moved connection belongs to here: the same name and mode.
pub fn tunnel_for(tunnels: &[TunnelRt], st: &ConnState) -> Result<TunnelIdx, ImportError> {
    let rt = tunnels
        .iter()
        .find(|t| t.cfg.name == st.tunnel)
        .ok_or_else(|| ImportError::NoTunnel(st.tunnel.clone()))?;
    if rt.cfg.mode != st.mode {
        return Err(ImportError::Mode {
            tunnel: st.tunnel.clone(),
            here: rt.cfg.mode.as_str(),
            there: st.mode.as_str(),
        });
    }
    Ok(rt.index)
}

/// Rebuilds a moved connection on this shard and starts it. `fds`: its client's and its
/// upstream's sockets.
pub fn spawn_imported(
    cx: &mut Context<'_, ShardState>,
    st: ConnState,
    fds: [OwnedFd; 2],
) -> Result<(), ImportError> {
    let ti = tunnel_for(&cx.state.tunnels, &st)?;
    let [c, u] = fds;
    // Each as the kind it is: a client accepted on TCP (a Unix listener refuses a handoff),
    // an upstream over TCP or a Unix socket (a `unix:` target).
    let (c, u) = (Stream::from_connected(c)?, Stream::from_connected(u)?);
    let now = cx.now();
    let rt = &mut cx.state.tunnels[ti];
    let conn: Box<dyn crate::reactor::Handler<ShardState>> = match st.mode {
        Mode::Encrypt => Box::new(Conn::<NoFilter, SealFilter>::import(rt, st, c, u, now)?),
        Mode::Decrypt => Box::new(Conn::<SealFilter, NoFilter>::import(rt, st, c, u, now)?),
        Mode::Forward => Box::new(Conn::<NoFilter, NoFilter>::import(rt, st, c, u, now)?),
    };
    cx.spawn(conn);
    Ok(())
}
