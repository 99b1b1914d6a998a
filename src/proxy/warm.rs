//! Warm sessions on an encrypt side: connections to the decrypt targets made and handshaken
//! ahead of clients, so that a new client's first bytes leave at once behind the OPEN — one
//! round trip across a WAN instead of three (docs/OPERATIONS.md and docs/PROTOCOL.md, "Warm
//! sessions").
//!
//! Per shard, per tunnel, per target (an address the balance chooses), a [`Pool`] keeps the
//! warm sessions ([`WarmConn`] handlers) being made and those ready, and the demand they
//! follow: an exponentially weighted rate of the new clients the balance sent to the target
//! ([`Demand`], its time constant `warm_refresh`). The pool wants ([`wanted`]) enough ready
//! sessions for about a second of those clients (or for the time one takes to make, if
//! longer), at least one while clients come, at most `warm_max`, and none once no client came
//! for two `warm_refresh` intervals. Sessions are made one at a time in the shard's spare
//! time ([`idle_step`], the loop's idle hook, as the ephemeral key pool is filled), and each
//! is replaced after `warm_refresh` (a little less: spread so sessions made together do not
//! expire together) — before the decrypt side's `warm_idle_timeout` or an idle limit in
//! between can kill it. A surplus (demand fell, `warm_max` lowered by a reload, a target
//! removed) is retired at the next housekeeping pass ([`housekeep`]).
//!
//! A new client (`listener`) asks [`take`]: the balance's next choice of target
//! ([`Upstreams::peek`]) counts as an arrival there; if that target has a ready session, the
//! choice is made for real and the client's socket is handed to the session's handler (a
//! [`Handoff`], then a notification), which becomes the client's [`Conn`]
//! ([`Conn::adopt`]): the same slot, so the session's socket stays registered as it is.
//! Otherwise the client connects as before (`missed`).
//!
//! Invariants:
//! - A session is in its target's `ready` list only while its handler holds it ready: it
//!   leaves the list in the same callback that closes it or hands it to a client, so a client
//!   never gets a session that is closing, and a handoff always finds its handler.
//! - A handoff that finds no ready session (it cannot happen, but) gives its choice of
//!   target back and serves the client as a new connection: a client is never dropped here.
//! - Nothing is made while the shard drains; at drain start every warm session is retired.
//! - Warm sessions are not connections: they count in `sealpipe_warm_sessions`, not in
//!   `connections_active` or `max_conns`, until a client takes one.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::metrics::WarmEvent;
use crate::protocol::RandomSource;
use crate::reactor::{
    BevEvents, BufferEvent, Context, Handler, HandlerId, NoFilter, Ready, Socket, Stream, Tag,
    Timeouts, TimerKey,
};

use super::codec::{Role, SealFilter};
use super::conn::warm::{WarmAction, WarmCause, WarmCore, WarmEnd, WarmEnv};
use super::conn::{Conn, Make, Side};
use super::upstream::{ConnectOutcome, TargetId, Tried, Upstreams};
use super::{OptError, ShardState, TargetAddr, TunnelIdx};

// A warm session's handler becomes its client's `Conn` in the same slot, so these tags are
// kept apart from the connection's own (`conn::TAG_*` 1-4, `handoff::TAG_*` 10-13).

/// The warm session's own timer: its handshake deadline, then its refresh.
const TAG_WARM: Tag = Tag::new(8);
/// Notify tag: a client's socket waits in [`ShardState::warm_handoffs`] for this session.
pub const TAG_ADOPT: Tag = Tag::new(9);
/// Notify tag: retire (close unused) now: a drain, a surplus, a target removed.
pub const TAG_RETIRE: Tag = Tag::new(14);

/// The shortest demand window: ready sessions for about this long of new clients.
const COVER_MIN: Duration = Duration::from_secs(1);
/// When more sessions of a target than a whole pool (`warm_max`) in a row failed, or were lost
/// within [`QUICK_LOSS`] of their start (refused by the decrypt side's cap, say), the target
/// gets no new one for this long, doubling while that goes on, up to [`BACKOFF_MAX`]: never a
/// loop of sessions made only to be refused. (A whole pool lost at once — its decrypt side
/// drained — is replaced at once.)
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const QUICK_LOSS: Duration = Duration::from_secs(1);

/// The time constant of the fast rate (see [`Demand`]).
const FAST: Duration = Duration::from_secs(1);

/// New clients per second sent to one target, as two exponentially weighted rates: a fast one
/// (time constant one second), which follows a burst at once, and a slow one (time constant
/// `tau`, `warm_refresh`), which remembers it between bursts. Each arrival adds `1/tau` to a
/// rate, which decays by `e^(-t/tau)` in between. Read at any instant with [`Demand::rate`]:
/// the larger of the two, so the pool grows as fast as clients come and shrinks slowly.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Demand {
    /// The rates (fast, slow) as of `last`.
    rates: (f64, f64),
    /// The last arrival.
    last: Option<Instant>,
}

impl Demand {
    /// A new client came at `now`.
    pub fn arrival(&mut self, now: Instant, tau: Duration) {
        let (fast, slow) = self.rates_at(now, tau);
        self.rates = (
            fast + 1.0 / FAST.as_secs_f64(),
            slow + 1.0 / tau.as_secs_f64(),
        );
        self.last = Some(now);
    }

    fn rates_at(&self, now: Instant, tau: Duration) -> (f64, f64) {
        let Some(t) = self.last else {
            return (0.0, 0.0);
        };
        let dt = now.saturating_duration_since(t).as_secs_f64();
        let decay = |tau: Duration| (-dt / tau.as_secs_f64()).exp();
        (self.rates.0 * decay(FAST), self.rates.1 * decay(tau))
    }

    /// The rate at `now`.
    pub fn rate(&self, now: Instant, tau: Duration) -> f64 {
        let (fast, slow) = self.rates_at(now, tau);
        fast.max(slow)
    }

    /// The last arrival.
    pub fn last(&self) -> Option<Instant> {
        self.last
    }
}

/// Ready sessions a target wants at `now` (see the module doc): none after two `refresh`
/// intervals without a new client; else enough for the clients of `cover` (the longer of a
/// second and twice the time one session takes to make, `fill`), at least one, at most
/// `max`.
pub fn wanted(
    demand: &Demand,
    now: Instant,
    max: usize,
    refresh: Duration,
    fill: Duration,
) -> usize {
    let Some(last) = demand.last() else {
        return 0;
    };
    if max == 0 || now.saturating_duration_since(last) > 2 * refresh {
        return 0;
    }
    let cover = COVER_MIN.max(2 * fill).as_secs_f64();
    let n = (demand.rate(now, refresh) * cover).ceil();
    // `n` is finite and at least 0; the clamp bounds it.
    (n as usize).clamp(1, max)
}

/// One target's warm sessions on one shard.
#[derive(Debug)]
struct TargetPool {
    id: TargetId,
    /// Every live warm handler of the target (made or being made).
    sessions: Vec<HandlerId>,
    /// Those ready for a client, oldest first.
    ready: VecDeque<HandlerId>,
    demand: Demand,
    /// How long one takes to make (connect and handshake), smoothed; zero until one was.
    fill: Duration,
    /// Sessions in a row that failed or were lost at once; the back-off after too many
    /// ([`BACKOFF_MIN`]): the current step, and until when.
    troubles: usize,
    backoff: Duration,
    paused_until: Option<Instant>,
}

impl TargetPool {
    fn new(id: TargetId) -> TargetPool {
        TargetPool {
            id,
            sessions: Vec::new(),
            ready: VecDeque::new(),
            demand: Demand::default(),
            fill: Duration::ZERO,
            troubles: 0,
            backoff: Duration::ZERO,
            paused_until: None,
        }
    }

    /// A session ended: `trouble` (it failed, or was lost soon after it started) counts, and
    /// past `allowed` in a row backs off making the next; anything else (used, retired, lost
    /// after a long life) clears the count and the back-off.
    fn ended(&mut self, trouble: bool, allowed: usize, now: Instant) {
        if !trouble {
            self.troubles = 0;
            self.backoff = Duration::ZERO;
            self.paused_until = None;
            return;
        }
        self.troubles += 1;
        if self.troubles > allowed {
            self.backoff = (self.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
            self.paused_until = Some(now + self.backoff);
        }
    }

    fn paused(&self, now: Instant) -> bool {
        self.paused_until.is_some_and(|t| now < t)
    }
}

/// A tunnel's warm sessions on one shard (encrypt tunnels; empty elsewhere).
#[derive(Debug, Default)]
pub struct Pool {
    targets: Vec<TargetPool>,
    /// Sessions to make, as last computed (`refresh`): the idle hook's question.
    short: usize,
}

impl Pool {
    fn target(&mut self, id: TargetId) -> &mut TargetPool {
        match self.targets.iter().position(|t| t.id == id) {
            Some(i) => &mut self.targets[i],
            None => {
                self.targets.push(TargetPool::new(id));
                self.targets.last_mut().expect("just pushed")
            }
        }
    }

    /// Ready sessions now, all targets.
    pub fn ready(&self) -> usize {
        self.targets.iter().map(|t| t.ready.len()).sum()
    }

    /// Warm handlers alive now (ready or being made), all targets.
    pub fn sessions(&self) -> usize {
        self.targets.iter().map(|t| t.sessions.len()).sum()
    }

    /// Whether a session should be made now (as of the last [`Pool::refresh`]).
    pub fn wants(&self) -> bool {
        self.short > 0
    }

    /// Works out what to make: the target (and its address) most short of sessions, among
    /// those up, and how many in all; forgets targets that are gone and hold nothing.
    fn refresh(&mut self, now: Instant, cfg: &WarmCfg, up: &Upstreams) -> Option<TargetId> {
        self.targets
            .retain(|t| !t.sessions.is_empty() || up.get(t.id).is_some());
        let mut short = 0;
        let mut best: Option<(usize, TargetId)> = None;
        for t in &self.targets {
            let Some(target) = up.get(t.id) else {
                continue;
            };
            let want = wanted(&t.demand, now, cfg.max, cfg.refresh, t.fill);
            // Those being made count as coming.
            let n = want.saturating_sub(t.sessions.len());
            if n > 0 && target.is_up(now) && !t.paused(now) {
                short += n;
                if best.is_none_or(|(m, _)| n > m) {
                    best = Some((n, t.id));
                }
            }
        }
        self.short = short;
        best.map(|(_, id)| id)
    }

    /// Ready sessions beyond what each target wants now (oldest first), and every session of
    /// a target that is gone: to retire.
    fn surplus(&self, now: Instant, cfg: &WarmCfg, up: &Upstreams) -> Vec<HandlerId> {
        let mut out = Vec::new();
        for t in &self.targets {
            if up.get(t.id).is_none() {
                out.extend(&t.sessions);
                continue;
            }
            let want = wanted(&t.demand, now, cfg.max, cfg.refresh, t.fill);
            let extra = t.ready.len().saturating_sub(want);
            out.extend(t.ready.iter().take(extra));
        }
        out
    }

    /// Forgets session `id`; true if it was ready (the gauge counts ready sessions).
    fn remove(&mut self, id: HandlerId) -> bool {
        let mut was_ready = false;
        for t in &mut self.targets {
            t.sessions.retain(|&s| s != id);
            let before = t.ready.len();
            t.ready.retain(|&s| s != id);
            was_ready |= t.ready.len() != before;
        }
        was_ready
    }
}

/// A tunnel's warm settings, as configured now.
struct WarmCfg {
    max: usize,
    refresh: Duration,
}

fn warm_cfg(rt: &super::TunnelRt) -> WarmCfg {
    WarmCfg {
        max: rt.cfg.warm_max,
        refresh: rt.cfg.warm_refresh,
    }
}

/// A client's socket on its way to a ready warm session's handler.
pub struct Handoff {
    pub stream: Stream,
    /// The balance's choice that named the session's target (counted as active there).
    pub tried: Tried,
    pub target: TargetId,
}

/// A new client of encrypt tunnel `tunnel` at `now`: counts it as an arrival at the target the
/// balance chooses next; if that target has a ready warm session, makes the choice and hands
/// the client's socket to it (true). False: the caller serves the client as a new connection
/// (which makes the same choice).
pub fn take(
    cx: &mut Context<'_, ShardState>,
    tunnel: TunnelIdx,
    stream: Stream,
    now: Instant,
) -> Result<(), Stream> {
    let st = &mut *cx.state;
    let rt = &mut st.tunnels[tunnel];
    if rt.cfg.warm_max == 0 || st.draining {
        return Err(stream);
    }
    let Some(target) = rt.upstreams.peek(now) else {
        return Err(stream);
    };
    let refresh = rt.cfg.warm_refresh;
    let pool = rt.warm.target(target);
    pool.demand.arrival(now, refresh);
    let Some(id) = pool.ready.pop_front() else {
        rt.metrics.warm_event(WarmEvent::Missed);
        let cfg = warm_cfg(rt);
        rt.warm.refresh(now, &cfg, &rt.upstreams);
        return Err(stream);
    };
    let mut tried = Tried::default();
    match rt.upstreams.pick(now, &mut tried) {
        Some((picked, _)) if picked == target => {}
        other => {
            // (peek and pick agree: this is only a guard.) The session goes back.
            if let Some((picked, _)) = other {
                rt.upstreams.release(picked);
            }
            rt.warm.target(target).ready.push_front(id);
            return Err(stream);
        }
    }
    rt.metrics.warm_add(-1);
    let cfg = warm_cfg(rt);
    rt.warm.refresh(now, &cfg, &rt.upstreams);
    st.warm_handoffs.push((
        id,
        Handoff {
            stream,
            tried,
            target,
        },
    ));
    cx.notify(id, TAG_ADOPT);
    Ok(())
}

/// Whether any encrypt tunnel of the shard wants a warm session made (the idle hook's
/// question; as of the last [`Pool::refresh`]).
pub fn wants(st: &ShardState) -> bool {
    !st.draining && st.tunnels.iter().any(|t| t.warm.wants())
}

/// Spare time: makes one warm session for the tunnel and target most short of them.
pub fn idle_step(cx: &mut Context<'_, ShardState>) {
    let now = cx.now();
    if cx.state.draining {
        return;
    }
    for i in 0..cx.state.tunnels.len() {
        let rt = &mut cx.state.tunnels[i];
        if !rt.warm.wants() || rt.handshake.is_none() {
            continue;
        }
        let cfg = warm_cfg(rt);
        let Some(target) = rt.warm.refresh(now, &cfg, &rt.upstreams) else {
            continue;
        };
        let Some(addr) = rt.upstreams.get(target).map(|t| t.addr) else {
            continue;
        };
        let tunnel = rt.index;
        let id = cx.spawn(Box::new(WarmConn::new(tunnel, target, addr)));
        let rt = &mut cx.state.tunnels[i];
        rt.warm.target(target).sessions.push(id);
        rt.warm.refresh(now, &cfg, &rt.upstreams);
        return;
    }
}

/// Housekeeping, a few times a second: demand decays, so pools are worked out again; a
/// surplus, and the sessions of targets a reload removed, retire.
pub fn housekeep(cx: &mut Context<'_, ShardState>, now: Instant) {
    let mut retire = Vec::new();
    for rt in &mut cx.state.tunnels {
        if rt.warm.targets.is_empty() {
            continue;
        }
        let cfg = warm_cfg(rt);
        rt.warm.refresh(now, &cfg, &rt.upstreams);
        retire.extend(rt.warm.surplus(now, &cfg, &rt.upstreams));
    }
    for id in retire {
        cx.notify(id, TAG_RETIRE);
    }
}

/// The shard drains: every warm session retires (END before OPEN), and none is made again.
pub fn drain(cx: &mut Context<'_, ShardState>) {
    let ids: Vec<HandlerId> = (cx.state.tunnels.iter())
        .flat_map(|t| {
            t.warm
                .targets
                .iter()
                .flat_map(|p| p.sessions.iter().copied())
        })
        .collect();
    for id in ids {
        cx.notify(id, TAG_RETIRE);
    }
}

/// A warm session's handler: the session until a client takes it, then that client's
/// connection, in the same slot.
pub struct WarmConn {
    tunnel: TunnelIdx,
    state: State,
    timer: Option<TimerKey>,
    /// A spread of the refresh interval, fixed per session.
    spread: f64,
}

enum State {
    /// Not started yet: where to connect.
    Start(TargetId, TargetAddr),
    Warm(Box<WarmCore<SealFilter, Socket>>),
    Live(Box<Conn<NoFilter, SealFilter>>),
    Gone,
}

impl WarmConn {
    fn new(tunnel: TunnelIdx, target: TargetId, addr: TargetAddr) -> WarmConn {
        // 75-100% of warm_refresh, at random, so that sessions made together do not expire
        // together.
        let mut r = [0u8; 2];
        crate::protocol::OsRandom.fill(&mut r);
        let spread = 0.75 + 0.25 * f64::from(u16::from_le_bytes(r)) / f64::from(u16::MAX);
        WarmConn {
            tunnel,
            state: State::Start(target, addr),
            timer: None,
            spread,
        }
    }

    fn rt<'c>(&self, cx: &'c mut Context<'_, ShardState>) -> &'c mut super::TunnelRt {
        &mut cx.state.tunnels[self.tunnel]
    }

    /// Feeds the warm session's stream events.
    fn handle(&mut self, cx: &mut Context<'_, ShardState>, ev: BevEvents) {
        let now = cx.now();
        let State::Warm(core) = &mut self.state else {
            return;
        };
        let mut env = Env {
            cx,
            tunnel: self.tunnel,
            timer: &mut self.timer,
            spread: self.spread,
        };
        core.handle(ev, now, &mut env);
    }

    /// A client's socket is here: the session becomes its connection.
    fn adopt(&mut self, cx: &mut Context<'_, ShardState>) {
        let Some(me) = cx.id() else {
            return;
        };
        let Some(i) = cx.state.warm_handoffs.iter().position(|(id, _)| *id == me) else {
            return;
        };
        let (_, h) = cx.state.warm_handoffs.swap_remove(i);
        let now = cx.now();
        let ready = matches!(&self.state, State::Warm(c) if c.is_ready());
        if !ready {
            // (Cannot happen: a session leaves the ready list as it stops being ready.) The
            // client is served as a new connection; its choice of target goes back.
            let rt = self.rt(cx);
            rt.upstreams.release(h.target);
            let conn = Conn::<NoFilter, SealFilter>::new(rt, h.stream, now);
            cx.spawn(Box::new(conn));
            return;
        }
        let State::Warm(core) = std::mem::replace(&mut self.state, State::Gone) else {
            return;
        };
        let mut env = Env {
            cx,
            tunnel: self.tunnel,
            timer: &mut self.timer,
            spread: self.spread,
        };
        let (up, target) = core.into_parts(&mut env);
        debug_assert_eq!(target, h.target);
        let rt = self.rt(cx);
        // (Taken off the ready list, and the gauge, by `take`.)
        rt.warm.remove(me);
        rt.warm.target(target).ended(false, 0, now);
        rt.metrics.warm_event(WarmEvent::Used);
        let cfg = warm_cfg(rt);
        rt.warm.refresh(now, &cfg, &rt.upstreams);
        let conn = Conn::adopt(rt, h.stream, up, target, h.tried, now);
        self.state = State::Live(Box::new(conn));
        if let State::Live(conn) = &mut self.state {
            conn.on_start(cx);
        }
    }
}

/// The warm session's `WarmEnv` over the loop.
struct Env<'s, 'b> {
    cx: &'s mut Context<'b, ShardState>,
    tunnel: TunnelIdx,
    timer: &'s mut Option<TimerKey>,
    spread: f64,
}

impl Env<'_, '_> {
    fn rt(&mut self) -> &mut super::TunnelRt {
        &mut self.cx.state.tunnels[self.tunnel]
    }

    fn ready(
        &mut self,
        took: Duration,
        forward_secrecy: bool,
        key: Option<crate::protocol::KeyId>,
    ) {
        let Some(me) = self.cx.id() else {
            return;
        };
        let rt = self.rt();
        let m = &rt.metrics;
        m.handshake("ok");
        m.session(forward_secrecy);
        m.handshake_duration.observe(took.as_secs_f64());
        m.warm_event(WarmEvent::Made);
        m.warm_add(1);
        rt.count_session(key);
        let target = rt
            .warm
            .targets
            .iter_mut()
            .find(|t| t.sessions.contains(&me));
        if let Some(t) = target {
            t.ready.push_back(me);
            // Smoothed, a quarter each time: a few sessions settle it.
            t.fill = if t.fill.is_zero() {
                took
            } else {
                (t.fill * 3 + took) / 4
            };
        }
        let now = self.cx.now();
        let rt = self.rt();
        let cfg = warm_cfg(rt);
        rt.warm.refresh(now, &cfg, &rt.upstreams);
    }

    fn connect_failed(
        &mut self,
        outcome: ConnectOutcome,
        error: Option<&std::io::Error>,
        went_down: bool,
        target: TargetId,
    ) {
        let now = self.cx.now();
        let warn = self.cx.state.may_warn(now);
        let rt = self.rt();
        let index = rt.upstreams.index_of(target);
        let addr = index.map(|i| rt.upstreams.targets()[i].addr);
        if let (Some(i), Some(r)) = (index, outcome.failure_reason()) {
            if let Some(m) = rt.metrics.upstreams.get(i.get()) {
                m.failures[r as usize].inc();
            }
        }
        let (tunnel, error) = (&rt.cfg.name, OptError(error));
        let upstream = addr.map(|a| a.to_string()).unwrap_or_default();
        if went_down {
            tracing::warn!(%tunnel, %upstream, %error, "upstream marked down (a warm session's connect failed)");
        } else if let Some(skipped) = warn {
            tracing::debug!(%tunnel, %upstream, %error, skipped, "warm session: connect failed");
        }
    }

    fn ended(&mut self, cause: &WarmCause<'_>) {
        let now = self.cx.now();
        let level_warn = matches!(cause, WarmCause::Timeout)
            || matches!(cause, WarmCause::Error(Some(e)) if super::codec::protocol_error(e).is_some());
        let skipped = self.cx.state.may_warn(now);
        let rt = self.rt();
        let tunnel = &rt.cfg.name;
        let Some(skipped) = skipped else {
            return;
        };
        match cause {
            WarmCause::Abort(a) => {
                tracing::debug!(%tunnel, abort = a.as_str(), skipped, "warm session closed by the decrypt side before use")
            }
            WarmCause::Error(e) if level_warn => {
                tracing::warn!(%tunnel, error = %OptError(*e), skipped, "warm session: handshake failed (see the decrypt side's log; the same cause fails new connections)")
            }
            WarmCause::Error(e) => {
                tracing::debug!(%tunnel, error = %OptError(*e), skipped, "warm session lost before use")
            }
            WarmCause::Ended => {
                tracing::debug!(%tunnel, skipped, "warm session ended by the decrypt side before use")
            }
            WarmCause::Timeout => {
                tracing::warn!(%tunnel, skipped, "warm session: no handshake answer within handshake_timeout; is the target a sealpipe decrypt side, and not overloaded?")
            }
        }
    }
}

impl WarmEnv<SealFilter, Socket> for Env<'_, '_> {
    fn flush(&mut self, bev: &mut BufferEvent<SealFilter>) -> BevEvents {
        bev.flush(self.cx)
    }
    fn discard_unread(&mut self, io: &mut Socket) {
        super::conn::discard_unread(io.stream());
    }
    fn upstreams(&mut self) -> &mut Upstreams {
        &mut self.rt().upstreams
    }
    fn handshake_timeout(&self) -> Duration {
        self.cx.state.tunnels[self.tunnel].cfg.handshake_timeout
    }
    fn refresh_at(&mut self, now: Instant) -> Instant {
        now + self.rt().cfg.warm_refresh.mul_f64(self.spread)
    }
    fn act(&mut self, action: WarmAction<'_>) {
        match action {
            WarmAction::Timer(at) => {
                if let Some(k) = self.timer.take() {
                    self.cx.cancel_timer(k);
                }
                if let Some(at) = at {
                    *self.timer = Some(self.cx.timer_at(at, TAG_WARM));
                }
            }
            WarmAction::Reached {
                target,
                took,
                was_down,
            } => {
                let rt = self.rt();
                let Some(i) = rt.upstreams.index_of(target) else {
                    return;
                };
                if let Some(m) = rt.metrics.upstreams.get(i.get()) {
                    m.connect.observe(took.as_secs_f64());
                }
                if was_down {
                    let (tunnel, upstream) = (&rt.cfg.name, rt.upstreams.targets()[i].addr);
                    tracing::info!(%tunnel, %upstream, "upstream is up again");
                }
            }
            WarmAction::ConnectFailed {
                target,
                outcome,
                error,
                went_down,
            } => self.connect_failed(outcome, error, went_down, target),
            WarmAction::Ready {
                took,
                key,
                forward_secrecy,
            } => self.ready(took, forward_secrecy, key),
            WarmAction::Ended(cause) => self.ended(&cause),
            WarmAction::Close(_) => self.cx.close(),
        }
    }
}

impl Handler<ShardState> for WarmConn {
    fn on_start(&mut self, cx: &mut Context<'_, ShardState>) {
        let State::Start(target, addr) = self.state else {
            return;
        };
        let now = cx.now();
        let rt = &mut cx.state.tunnels[self.tunnel];
        let mut layer = SealFilter::make(Role::Initiator, rt);
        layer.hold_open();
        let timeouts = Timeouts {
            connect: Some(rt.cfg.connect_timeout),
            ..Timeouts::default()
        };
        let keepalive = rt.cfg.keepalive;
        // Until a client's first bytes are answered, unacknowledged data fails the session
        // within the handshake timeout, as a connect to a dead host fails within the connect
        // timeout (`Env::confirmed` puts the tunnel's own setting back).
        let short = rt.cfg.handshake_timeout;
        // Through the same path as a connection's own (`ConnEnv::connect`): a TCP or a Unix
        // socket target alike; dead-peer settings are TCP's (a Unix socket's peer is on this
        // host, and its end is always told).
        let mut up = BufferEvent::connect_filtered(
            cx,
            addr.endpoint(),
            Side::Upstream as u8,
            layer,
            false,
            timeouts,
        );
        if let Some(s) = up.stream().and_then(Stream::as_tcp) {
            let set = super::keepalive::apply(s, &keepalive)
                .and_then(|()| socket2::SockRef::from(s).set_tcp_user_timeout(Some(short)));
            if let Err(e) = set {
                tracing::debug!(error = %e, "cannot set keepalive on a warm session's socket");
            }
        }
        if let Err(e) = up.register(cx) {
            tracing::debug!(error = %e, "cannot register a warm session's socket");
        }
        let mut core = Box::new(WarmCore::new(up, target, now));
        let mut env = Env {
            cx,
            tunnel: self.tunnel,
            timer: &mut self.timer,
            spread: self.spread,
        };
        core.start(now, &mut env);
        self.state = State::Warm(core);
    }

    fn on_ready(&mut self, cx: &mut Context<'_, ShardState>, source: u8, ready: Ready) {
        match &mut self.state {
            State::Live(conn) => conn.on_ready(cx, source, ready),
            State::Warm(core) if source == Side::Upstream as u8 => {
                let ev = core.stream_mut().on_ready(cx, ready);
                self.handle(cx, ev);
            }
            _ => {}
        }
    }

    fn on_timer(&mut self, cx: &mut Context<'_, ShardState>, tag: Tag) {
        match &mut self.state {
            State::Live(conn) => conn.on_timer(cx, tag),
            State::Warm(core) if tag == TAG_WARM => {
                self.timer = None;
                let now = cx.now();
                let mut env = Env {
                    cx,
                    tunnel: self.tunnel,
                    timer: &mut self.timer,
                    spread: self.spread,
                };
                core.on_timer(now, &mut env);
            }
            State::Warm(core) if core.stream().owns_tag(tag) => {
                let ev = core.stream_mut().on_timer(cx, tag);
                self.handle(cx, ev);
            }
            _ => {}
        }
    }

    fn on_notify(&mut self, cx: &mut Context<'_, ShardState>, tag: Tag) {
        match &mut self.state {
            State::Live(conn) => conn.on_notify(cx, tag),
            State::Warm(_) if tag == TAG_ADOPT => self.adopt(cx),
            State::Warm(core) if tag == TAG_RETIRE => {
                if let Some(me) = cx.id() {
                    let rt = &mut cx.state.tunnels[self.tunnel];
                    if rt.warm.remove(me) {
                        rt.metrics.warm_add(-1);
                    }
                }
                let mut env = Env {
                    cx,
                    tunnel: self.tunnel,
                    timer: &mut self.timer,
                    spread: self.spread,
                };
                core.retire(&mut env);
            }
            State::Warm(core) if core.stream().owns_tag(tag) => {
                let ev = core.stream_mut().on_notify(cx, tag);
                self.handle(cx, ev);
            }
            _ => {}
        }
    }

    fn on_close(&mut self, cx: &mut Context<'_, ShardState>) {
        if let State::Live(conn) = &mut self.state {
            return conn.on_close(cx);
        }
        if let Some(k) = self.timer.take() {
            cx.cancel_timer(k);
        }
        let me = cx.id();
        let now = cx.now();
        let rt = &mut cx.state.tunnels[self.tunnel];
        if let Some(me) = me {
            if rt.warm.remove(me) {
                rt.metrics.warm_add(-1);
            }
        }
        if let State::Warm(core) = &mut self.state {
            let end = core.closed();
            let event = match end {
                Some(WarmEnd::Retired) => Some(WarmEvent::Retired),
                Some(WarmEnd::Lost) => Some(WarmEvent::Lost),
                Some(WarmEnd::Failed) | None => Some(WarmEvent::Failed),
                Some(WarmEnd::Adopted) => None,
            };
            if let Some(e) = event {
                rt.metrics.warm_event(e);
            }
            let quick = now.saturating_duration_since(core.started()) < QUICK_LOSS;
            let trouble = match end {
                Some(WarmEnd::Failed) | None => true,
                Some(WarmEnd::Lost) => quick,
                _ => false,
            };
            let (target, allowed) = (core.target(), rt.cfg.warm_max);
            if let Some(t) = rt.warm.targets.iter_mut().find(|t| t.id == target) {
                t.ended(trouble, allowed, now);
            }
            core.stream_mut().close(cx);
        }
        let rt = &mut cx.state.tunnels[self.tunnel];
        let cfg = warm_cfg(rt);
        rt.warm.refresh(now, &cfg, &rt.upstreams);
        // A client whose handoff missed this session (it cannot, but) is served anyway.
        if let Some(me) = me {
            if let Some(i) = cx.state.warm_handoffs.iter().position(|(id, _)| *id == me) {
                let (_, h) = cx.state.warm_handoffs.swap_remove(i);
                let rt = &mut cx.state.tunnels[self.tunnel];
                rt.upstreams.release(h.target);
                let conn = Conn::<NoFilter, SealFilter>::new(rt, h.stream, now);
                cx.spawn(Box::new(conn));
            }
        }
        self.state = State::Gone;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFRESH: Duration = Duration::from_secs(25);

    #[test]
    fn troubled_targets_back_off_doubling_and_a_good_session_clears_it() {
        let t0 = Instant::now();
        let up = Upstreams::new(&["127.0.0.1:1".parse().unwrap()], Default::default());
        let mut t = TargetPool::new(up.targets()[0].id());
        // A whole pool (4) lost at once, as when its decrypt side drains: no pause.
        for _ in 0..4 {
            t.ended(true, 4, t0);
            assert!(!t.paused(t0));
        }
        // One more in a row: a loop; it backs off, doubling.
        let mut at = t0;
        for want in [1u64, 2, 4, 8, 16, 30, 30] {
            t.ended(true, 4, at);
            assert!(t.paused(at + Duration::from_secs(want) - Duration::from_millis(1)));
            assert!(!t.paused(at + Duration::from_secs(want)), "{want}");
            at += Duration::from_secs(want);
        }
        // A good session clears it.
        t.ended(false, 4, at);
        assert!(!t.paused(at));
        for _ in 0..5 {
            t.ended(true, 4, at);
        }
        assert!(!t.paused(at + BACKOFF_MIN), "back to the first step");
    }

    #[test]
    fn a_paused_target_wants_nothing_made() {
        let t0 = Instant::now();
        let up = Upstreams::new(&["127.0.0.1:1".parse().unwrap()], Default::default());
        let id = up.targets()[0].id();
        let cfg = WarmCfg {
            max: 4,
            refresh: REFRESH,
        };
        let mut pool = Pool::default();
        pool.target(id).demand.arrival(t0, REFRESH);
        assert_eq!(pool.refresh(t0, &cfg, &up), Some(id));
        assert!(pool.wants());
        pool.target(id).ended(true, 0, t0);
        assert_eq!(pool.refresh(t0, &cfg, &up), None);
        assert!(!pool.wants(), "the idle hook has nothing to do: no spin");
        assert_eq!(pool.refresh(t0 + BACKOFF_MIN, &cfg, &up), Some(id));
    }

    #[test]
    fn no_clients_want_no_warm_sessions() {
        let t0 = Instant::now();
        assert_eq!(
            wanted(&Demand::default(), t0, 4, REFRESH, Duration::ZERO),
            0
        );
    }

    #[test]
    fn a_burst_wants_more_at_once_and_the_slow_rate_keeps_some() {
        let t0 = Instant::now();
        let mut d = Demand::default();
        let fill = Duration::from_millis(40);
        // A client every 20 ms (a WAN client reconnecting each round trip), half a second.
        for i in 0..25u64 {
            d.arrival(t0 + Duration::from_millis(20 * i), REFRESH);
        }
        let end = t0 + Duration::from_millis(480);
        assert_eq!(wanted(&d, end, 4, REFRESH, fill), 4);
        // Ten seconds later the burst is forgotten by the fast rate, not by the slow one.
        assert_eq!(
            wanted(&d, end + Duration::from_secs(10), 4, REFRESH, fill),
            1
        );
    }

    #[test]
    fn one_client_wants_one_until_two_refresh_intervals_pass() {
        let t0 = Instant::now();
        let mut d = Demand::default();
        d.arrival(t0, REFRESH);
        let w = |at: Duration| wanted(&d, t0 + at, 4, REFRESH, Duration::from_millis(40));
        assert_eq!(w(Duration::ZERO), 1);
        assert_eq!(w(2 * REFRESH), 1);
        assert_eq!(w(2 * REFRESH + Duration::from_millis(1)), 0, "idle: none");
    }

    #[test]
    fn a_busy_target_wants_up_to_warm_max_and_the_wish_decays() {
        let t0 = Instant::now();
        let mut d = Demand::default();
        // 100 new clients a second for ten seconds.
        for i in 0..1000u64 {
            d.arrival(t0 + Duration::from_millis(10 * i), REFRESH);
        }
        let end = t0 + Duration::from_secs(10);
        let fill = Duration::from_millis(40);
        let rate = d.rate(end, REFRESH);
        assert!(
            (99.0..101.0).contains(&rate),
            "{rate}: the fast rate follows at once"
        );
        assert_eq!(wanted(&d, end, 4, REFRESH, fill), 4, "capped at warm_max");
        assert_eq!(wanted(&d, end, 128, REFRESH, fill), 100);
        // A slow link (a session takes 2 s to make) wants more for the same rate.
        let slow_link = wanted(&d, end, 1000, REFRESH, Duration::from_secs(2));
        assert!(
            (395..=400).contains(&slow_link),
            "{slow_link}: four seconds of clients"
        );
        // Quiet: the fast rate is gone within seconds; the slow one (what ten seconds at 100
        // a second left: 100 x (1 - e^-0.4) = 33) decays with warm_refresh as its time
        // constant...
        let later = end + REFRESH;
        assert_eq!(
            wanted(&d, end + Duration::from_secs(10), 128, REFRESH, fill),
            23
        );
        assert_eq!(wanted(&d, later, 128, REFRESH, fill), 13);
        // ...and after two refresh intervals without a client, none.
        assert_eq!(
            wanted(
                &d,
                end + 2 * REFRESH + Duration::from_secs(1),
                64,
                REFRESH,
                fill
            ),
            0
        );
        assert_eq!(wanted(&d, end, 0, REFRESH, fill), 0, "warm_max = 0: off");
    }
}
