//! A shard's part in a live upgrade: handing its established connections to a successor
//! process, and taking over those a predecessor hands it (docs/OPERATIONS.md, "Upgrade
//! without downtime"; the exchange between the processes is `server/transfer.rs`).
//!
//! Old process: [`begin`] opens the shard's export window. Every connection tries to move at
//! once and again after each of its events until it can (its handshake done, its upstream
//! connected: `conn::core::migrate::NotReady`); one that moves is frozen — its sockets
//! detached, its timers cancelled, its state left as it was — and its state and descriptors
//! go to the transfer thread ([`Exported`]). The successor's answer comes back as an
//! [`Outcome`] ([`apply`]): a moved connection vanishes from this process without touching
//! its sockets (the successor owns them now: no FIN, no RST, no byte read or written here);
//! a kept one resumes exactly where it was and drains here as it would have. When no
//! connection is left to try, or the window closes (the longest handshake or connect timeout
//! of the tunnels), the shard says it is done ([`ExportMsg::Done`]); connections still
//! settling then stay and end here as they would have.
//!
//! New process: [`spawn_imported`] (in `conn/handoff.rs`) rebuilds a moved connection on the
//! shard.
//!
//! Invariants: a connection is frozen at most once and resolved exactly once (moved, kept or
//! failed); while frozen, nothing reads, writes, shuts down or closes its sockets; a kept
//! connection is never offered again; the window is bounded.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::protocol::Zeroizing;
use crate::reactor::{Context, HandlerId, Tag};

use super::{ShardIdx, ShardState};

/// Notify tags of a connection in a live upgrade.
pub const TAG_EXPORT: Tag = Tag::new(10);
pub const TAG_MOVED: Tag = Tag::new(11);
pub const TAG_KEPT: Tag = Tag::new(12);
pub const TAG_FAILED: Tag = Tag::new(13);

/// The longest an export window stays open, whatever the timeouts.
pub const MAX_WINDOW: Duration = Duration::from_secs(30);
/// Connections of one shard frozen at once, waiting for their outcome: one batch of the
/// transfer (`server/transfer.rs`, at most 126 connections: 252 descriptors in one message).
/// More would not move faster (the transfer sends one batch at a time) but would leave each
/// frozen longer, and each holds two more descriptors (the duplicates on their way) and its
/// encoded state: a shard with many connections moves them in waves. Measured at 4,000
/// connections (`scripts/upgrade-measure.py`, 2 shards a side): two batches in flight gave a
/// moved connection's longest pause a p99 of 53-61 ms, one batch 33-40 ms, with the old
/// process exiting 130-350 ms after its successor started either way.
pub const MAX_IN_FLIGHT: usize = 126;

/// A frozen connection on its way to the successor.
pub struct Exported {
    pub shard: ShardIdx,
    pub conn: HandlerId,
    /// Its state (`conn::core::migrate::ConnState`), encoded.
    pub state: Zeroizing<Vec<u8>>,
    /// Duplicates of its client and upstream sockets.
    pub fds: Vec<OwnedFd>,
    /// When it stopped running here (its pause starts).
    pub frozen_at: Instant,
}

/// What a shard tells the transfer thread.
pub enum ExportMsg {
    Conn(Exported),
    /// No more connections will come from this shard.
    Done {
        shard: ShardIdx,
    },
}

/// How a frozen connection's move ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The successor took it: it vanishes from this process.
    Moved,
    /// The successor refused it (or never answered): it resumes here.
    Kept,
    /// The successor may have taken it and did not confirm: this process lets go of it
    /// (never resumes it, which could repeat a record counter) and counts it lost.
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Moved => "moved",
            Outcome::Kept => "kept",
            Outcome::Failed => "failed",
        }
    }
    fn tag(self) -> Tag {
        match self {
            Outcome::Moved => TAG_MOVED,
            Outcome::Kept => TAG_KEPT,
            Outcome::Failed => TAG_FAILED,
        }
    }
}

/// A shard's export window.
pub struct ExportCtx {
    /// `None` once the shard said it is done.
    tx: Option<Sender<ExportMsg>>,
    deadline: Instant,
    /// Connections frozen, waiting for their outcome.
    pub frozen: usize,
    /// Connections that stay here: refused, or started after the window closed.
    pub kept: usize,
    /// Connections that were ready while [`MAX_IN_FLIGHT`] were frozen: offered again as
    /// outcomes come back.
    waiting: Vec<HandlerId>,
}

impl ExportCtx {
    /// Whether connections may still move.
    pub fn open(&self) -> bool {
        self.tx.is_some()
    }

    /// Whether another connection may be frozen now; if not, `id` is offered again later.
    pub fn room_for(&mut self, id: HandlerId) -> bool {
        if self.frozen < MAX_IN_FLIGHT {
            return true;
        }
        self.waiting.push(id);
        false
    }

    /// Sends a frozen connection to the transfer thread; gives it back if the thread is gone.
    pub fn send(&mut self, e: Exported) -> Result<(), Exported> {
        let Some(tx) = &self.tx else {
            return Err(e);
        };
        tx.send(ExportMsg::Conn(e)).map_err(|e| match e.0 {
            ExportMsg::Conn(e) => e,
            ExportMsg::Done { .. } => unreachable!("only connections are sent here"),
        })?;
        self.frozen += 1;
        Ok(())
    }
}

/// Opens the shard's export window (see the module doc): every open connection tries to
/// move now.
pub fn begin(cx: &mut Context<'_, ShardState>, tx: Sender<ExportMsg>, window: Duration) {
    let now = cx.now();
    cx.state.export = Some(ExportCtx {
        tx: Some(tx),
        deadline: now + window.min(MAX_WINDOW),
        frozen: 0,
        kept: 0,
        waiting: Vec::new(),
    });
    let ids: Vec<HandlerId> = cx.state.live_conns.iter().copied().collect();
    for id in ids {
        cx.notify(id, TAG_EXPORT);
    }
    check_done(cx);
}

/// The successor's answers for some of this shard's frozen connections.
pub fn apply(cx: &mut Context<'_, ShardState>, outcomes: Vec<(HandlerId, Outcome)>) {
    let n = outcomes.len();
    for (id, o) in outcomes {
        cx.notify(id, o.tag());
    }
    // Queued connections are offered again for the room these outcomes free (their
    // notifications run after the outcomes', which free it); one that finds none queues
    // again.
    let room = cx.state.export.as_ref().map_or(0, |e| {
        MAX_IN_FLIGHT.saturating_sub(e.frozen.saturating_sub(n))
    });
    offer_queued(cx, room);
}

/// Offers up to `room` queued connections again.
fn offer_queued(cx: &mut Context<'_, ShardState>, room: usize) {
    let again: Vec<HandlerId> = match cx.state.export.as_mut() {
        Some(e) => {
            let k = e.waiting.len().min(room);
            e.waiting.drain(..k).collect()
        }
        None => Vec::new(),
    };
    for id in again {
        cx.notify(id, TAG_EXPORT);
    }
}

/// Housekeeping: closes the window once its time is up.
pub fn tick(cx: &mut Context<'_, ShardState>, now: Instant) {
    let Some(e) = cx.state.export.as_ref() else {
        return;
    };
    if e.open() && now >= e.deadline {
        close_window(cx);
    } else {
        // A safety net: nothing frozen, yet some queued (they went quiet meanwhile).
        if e.frozen == 0 && !e.waiting.is_empty() {
            offer_queued(cx, MAX_IN_FLIGHT);
        }
        check_done(cx);
    }
}

/// Says the shard is done once no connection is left to try and no listener accepts more.
pub fn check_done(cx: &mut Context<'_, ShardState>) {
    let st = &*cx.state;
    let Some(e) = st.export.as_ref().filter(|e| e.open()) else {
        return;
    };
    let listening = st.tunnels.iter().any(|t| t.listener.is_some());
    if !listening && st.conns <= e.frozen + e.kept {
        close_window(cx);
    }
}

/// No connection moves from now on; the ones still settling stay (counted as kept).
fn close_window(cx: &mut Context<'_, ShardState>) {
    let shard = cx.state.shard;
    let st = &mut *cx.state;
    let Some(e) = st.export.as_mut() else {
        return;
    };
    let staying = st.conns.saturating_sub(e.frozen + e.kept);
    e.kept += staying;
    if staying > 0 {
        st.metrics
            .handoff_conns
            .with_label_values(&[Outcome::Kept.as_str()])
            .inc_by(staying as u64);
        tracing::info!(
            shard = shard.get(),
            connections = staying,
            "live upgrade: connections still in their handshake or connecting when the window closed stay here and end as they would have"
        );
    }
    if let Some(tx) = e.tx.take() {
        let _ = tx.send(ExportMsg::Done { shard });
    }
}
