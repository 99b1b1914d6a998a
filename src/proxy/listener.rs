//! The accept side of a tunnel on one shard: a [`ConnListener`] whose accepted sockets become
//! [`Conn`] handlers of the tunnel's mode.
//!
//! An accept pass takes no more than the room left under the shard's connection limit; at the
//! limit the listener pauses (the kernel keeps queueing) and resumes when a connection closes
//! or a reload raises the limit; each pause is counted as `rejected{reason="max_conns"}`. A
//! client is admitted even when every upstream is marked down: the connection tries them anyway
//! (see `upstream`), so a backend that is back serves it. When the shard drains, the
//! listener first accepts everything already queued in the kernel, then closes. When a
//! connection runs out of descriptors after its accept (its upstream connect fails with
//! EMFILE), it notifies the listener ([`TAG_EXHAUSTED`]), which pauses with the same backoff
//! as an exhausted accept — never an accept/close cycle while clients queue.
//!
//! Pre-authentication admission ([`Admission`], decrypt listeners): a peer that has proved
//! nothing is held to three caps before it costs more than an accept — new connections per
//! second from its source address (a token bucket), its source's connections still in their
//! handshake, and the shard's. A connection over one is reset at once and counted as
//! `rejected{reason="per_source_rate"|"per_source_handshakes"|"max_handshakes"}`; an admitted
//! one carries a [`Ticket`] that it hands back when its handshake completes or it closes. A
//! session whose handshake completes without an OPEN (a warm session, waiting for its client)
//! moves from its source's handshake count to its unopened count, under its own cap
//! (`max_unopened_per_source`), until its OPEN comes or it closes.
//! Sources are IPv4 addresses or IPv6 /64s; the per-source table is pruned of sources with
//! no handshake, no unopened session and a full bucket, so its size is bounded by the caps,
//! not by the peers.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use mio::net::{TcpListener, UnixListener};

use crate::config::Mode;
use crate::metrics::RejectReason;
use crate::reactor::listener::{Accept, AcceptPass, ConnListener};
use crate::reactor::{Context, Handler, NoFilter, Ready, Stream, Tag};

use super::codec::SealFilter;
use super::conn::Conn;
use super::{ShardState, TunnelIdx};

/// Notify tags for a tunnel listener.
pub const TAG_RESUME: Tag = Tag::new(1);
pub const TAG_DRAIN: Tag = Tag::new(2);
/// A connection of this shard met resource exhaustion after its accept (an upstream connect
/// failed with EMFILE, say): pause accepting with the exhaustion backoff.
pub const TAG_EXHAUSTED: Tag = Tag::new(3);

/// A listening socket a tunnel accepts on: TCP, or a Unix domain socket (whose peers have no
/// IP address: the access lists do not apply to them, `config` refuses them there, and the
/// pre-authentication caps count them all as one source, [`UNIX_SOURCE`]).
pub trait Listen: Accept + 'static {
    /// The peer's address, if it has an IP one.
    fn peer(p: &Self::Peer) -> Option<SocketAddr>;
    fn stream(s: Self::Stream) -> Stream;
}

impl Listen for TcpListener {
    fn peer(p: &SocketAddr) -> Option<SocketAddr> {
        Some(*p)
    }
    fn stream(s: mio::net::TcpStream) -> Stream {
        Stream::Tcp(s)
    }
}

impl Listen for UnixListener {
    fn peer(_: &std::os::unix::net::SocketAddr) -> Option<SocketAddr> {
        None
    }
    fn stream(s: mio::net::UnixStream) -> Stream {
        Stream::Unix(s)
    }
}

/// The source every peer of a Unix domain listener counts as, for the per-source caps.
pub const UNIX_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

pub struct TunnelListener<L: Listen = TcpListener> {
    tunnel: TunnelIdx,
    listener: ConnListener<L>,
}

impl<L: Listen> TunnelListener<L> {
    pub fn new(tunnel: TunnelIdx, listener: ConnListener<L>) -> Self {
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

/// A source address as the per-source caps count it: an IPv4 address, or an IPv6 /64 (one
/// host or one subnet usually holds a whole /64, so counting addresses would be no cap at
/// all). An IPv4-mapped IPv6 address counts as its IPv4 address.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SourceKey {
    V4(u32),
    V6Net(u64),
}

impl SourceKey {
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip {
            IpAddr::V4(a) => SourceKey::V4(u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(u32::from(v4)),
                None => SourceKey::V6Net((u128::from(a) >> 64) as u64),
            },
        }
    }
}

/// One source's state on one shard.
#[derive(Debug)]
struct Source {
    /// Its connections still in their handshake.
    handshakes: u32,
    /// Its sessions handshaken without an OPEN yet (warm sessions).
    unopened: u32,
    /// Token bucket for new connections, refilled at `last`.
    tokens: f64,
    last: Instant,
}

/// Proof that a connection passed admission: hand it back ([`Admission::release`]) when the
/// handshake completes or the connection closes, whichever comes first. Not `Clone`, so it is
/// released once.
#[derive(Debug)]
pub struct Ticket(SourceKey);

/// A shard's pre-authentication admission state (see the module doc).
#[derive(Debug)]
pub struct Admission {
    /// This shard's share of `[limits] max_handshakes`.
    max_handshakes: usize,
    per_source: u32,
    unopened_per_source: u32,
    rate: f64,
    burst: f64,
    /// Connections of this shard still in their handshake.
    handshakes: usize,
    sources: HashMap<SourceKey, Source>,
    /// Table size at which the next insertion prunes it.
    prune_at: usize,
}

/// The per-source table is pruned when it reaches at least this many entries.
const PRUNE_MIN: usize = 1024;

impl Admission {
    /// Per-shard admission from the process's limits, split across `shards`.
    pub fn new(limits: &crate::config::Admission, shards: usize) -> Admission {
        Admission {
            max_handshakes: limits.max_handshakes.div_ceil(shards.max(1)).max(1),
            per_source: u32::try_from(limits.max_handshakes_per_source).unwrap_or(u32::MAX),
            unopened_per_source: u32::try_from(limits.max_unopened_per_source).unwrap_or(u32::MAX),
            rate: limits.new_conns_per_source,
            burst: limits.new_conns_per_source_burst as f64,
            handshakes: 0,
            sources: HashMap::new(),
            prune_at: PRUNE_MIN,
        }
    }

    /// New limits from a reload, keeping what is in flight: the handshakes counted now and
    /// each source's bucket (clamped to the new burst) stay, so a reload neither frees a flood's
    /// slots nor refills its tokens.
    pub fn set_limits(&mut self, limits: &crate::config::Admission, shards: usize) {
        let fresh = Admission::new(limits, shards);
        self.max_handshakes = fresh.max_handshakes;
        self.per_source = fresh.per_source;
        self.unopened_per_source = fresh.unopened_per_source;
        self.rate = fresh.rate;
        self.burst = fresh.burst;
        for s in self.sources.values_mut() {
            s.tokens = s.tokens.min(self.burst);
        }
    }

    /// `max_unopened_per_source`.
    pub fn unopened_per_source(&self) -> u32 {
        self.unopened_per_source
    }

    /// Connections of this shard in their handshake now.
    pub fn handshakes(&self) -> usize {
        self.handshakes
    }

    /// Sources this shard tracks now (bounded; see the module doc).
    pub fn sources(&self) -> usize {
        self.sources.len()
    }

    /// Admits a new connection from `ip`, or says which cap it is over. A refused connection
    /// still spends its source's token: a flood drains its own bucket.
    pub fn admit(&mut self, ip: IpAddr, now: Instant) -> Result<Ticket, RejectReason> {
        let key = SourceKey::of(ip);
        if !self.sources.contains_key(&key) && self.sources.len() >= self.prune_at {
            self.prune(now);
        }
        let burst = self.burst;
        let src = self.sources.entry(key).or_insert(Source {
            handshakes: 0,
            unopened: 0,
            tokens: burst,
            last: now,
        });
        if self.rate > 0.0 {
            let dt = now.saturating_duration_since(src.last).as_secs_f64();
            src.tokens = (src.tokens + dt * self.rate).min(burst);
            src.last = now;
            if src.tokens < 1.0 {
                return Err(RejectReason::SourceRate);
            }
            src.tokens -= 1.0;
        }
        if src.handshakes >= self.per_source {
            return Err(RejectReason::SourceHandshakes);
        }
        if self.handshakes >= self.max_handshakes {
            return Err(RejectReason::MaxHandshakes);
        }
        src.handshakes += 1;
        self.handshakes += 1;
        Ok(Ticket(key))
    }

    /// The connection holding `t` completed its handshake without an OPEN (a warm session):
    /// it leaves the handshake counts for its source's unopened count, if that is below
    /// `max_unopened_per_source`. False if not: the ticket still holds a handshake slot, and
    /// the session is to be closed.
    pub fn hold_unopened(&mut self, t: &Ticket) -> bool {
        let Some(src) = self.sources.get_mut(&t.0) else {
            return false;
        };
        if src.unopened >= self.unopened_per_source {
            return false;
        }
        src.unopened += 1;
        src.handshakes = src.handshakes.saturating_sub(1);
        self.handshakes = self.handshakes.saturating_sub(1);
        true
    }

    /// The unopened session holding `t` ([`Admission::hold_unopened`]) opened or closed.
    pub fn release_unopened(&mut self, t: Ticket) {
        if let Some(src) = self.sources.get_mut(&t.0) {
            src.unopened = src.unopened.saturating_sub(1);
        }
    }

    /// The connection holding `t` finished its handshake or closed.
    pub fn release(&mut self, t: Ticket) {
        self.handshakes = self.handshakes.saturating_sub(1);
        if let Some(src) = self.sources.get_mut(&t.0) {
            src.handshakes = src.handshakes.saturating_sub(1);
        }
    }

    /// Forgets sources with no handshake whose bucket has refilled: they are as if new.
    fn prune(&mut self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        self.sources.retain(|_, s| {
            let full = rate <= 0.0
                || s.tokens + now.saturating_duration_since(s.last).as_secs_f64() * rate >= burst;
            s.handshakes > 0 || s.unopened > 0 || !full
        });
        self.prune_at = (self.sources.len() * 2).max(PRUNE_MIN);
    }
}

/// Builds the connection handler for the tunnel's mode and starts it; false if the client
/// was turned away instead.
fn admit(
    cx: &mut Context<'_, ShardState>,
    tunnel: TunnelIdx,
    stream: Stream,
    peer: Option<SocketAddr>,
) -> bool {
    let now = cx.now();
    let rt = &cx.state.tunnels[tunnel];
    let reset = |s: &Stream| {
        let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
    };
    // Access lists and trusted_proxies (proxy::identity), before anything is allocated.
    if let Some(peer) = peer {
        if let Err(reason) = super::identity::admit_source(&rt.cfg.identity, peer.ip()) {
            super::identity::refused(cx, tunnel, reason, peer);
            reset(&stream);
            return false;
        }
    }
    // The tunnel's new-connection rate (after the access lists: a refused source spends none).
    if !super::ratelimit::admit(cx, tunnel) {
        reset(&stream);
        return false;
    }
    // Only a sealed client side has a pre-authentication phase to protect.
    let ticket = if cx.state.tunnels[tunnel].cfg.mode == Mode::Decrypt {
        let source = peer.map_or(UNIX_SOURCE, |p| p.ip());
        match cx.state.admission.admit(source, now) {
            Ok(t) => Some(t),
            Err(reason) => {
                cx.state.tunnels[tunnel].metrics.rejected(reason);
                if let Some(skipped) = cx.state.may_warn(now) {
                    let rt = &cx.state.tunnels[tunnel];
                    tracing::warn!(tunnel = %rt.cfg.name, reason = reason.as_str(), %source, skipped, "unauthenticated connection refused");
                }
                reset(&stream);
                return false;
            }
        }
    } else {
        None
    };
    // An encrypt side's client takes a warm session if one is ready (proxy::warm).
    let stream = if cx.state.tunnels[tunnel].cfg.mode == Mode::Encrypt {
        match super::warm::take(cx, tunnel, stream, now) {
            Ok(()) => return true,
            Err(stream) => stream,
        }
    } else {
        stream
    };
    let rt = &cx.state.tunnels[tunnel];
    let conn: Box<dyn Handler<ShardState>> = match rt.cfg.mode {
        Mode::Encrypt => Box::new(Conn::<NoFilter, SealFilter>::new(rt, stream, now)),
        Mode::Decrypt => {
            Box::new(Conn::<SealFilter, NoFilter>::new(rt, stream, now).with_ticket(ticket))
        }
        Mode::Forward => Box::new(Conn::<NoFilter, NoFilter>::new(rt, stream, now)),
    };
    cx.spawn(conn);
    true
}

impl<L: Listen> TunnelListener<L> {
    fn accept(&mut self, cx: &mut Context<'_, ShardState>, tag: Option<Tag>) {
        let tunnel = self.tunnel;
        // The shard's share of max_conns is exact: a pass accepts only what still fits (none
        // with a share of 0). `conns` counts started handlers; spawned ones start after this
        // callback, so count what this pass admitted too.
        let room = cx.state.conn_limit.saturating_sub(cx.state.conns);
        let mut admitted = 0;
        let on_accept = |cx: &mut Context<'_, ShardState>, s: L::Stream, p: L::Peer| {
            admitted += usize::from(admit(cx, tunnel, L::stream(s), L::peer(&p)));
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

impl<L: Listen> Handler<ShardState> for TunnelListener<L> {
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

    fn on_timer(&mut self, cx: &mut Context<'_, ShardState>, tag: Tag) {
        if self.listener.owns_tag(tag) {
            self.accept(cx, Some(tag));
        }
    }

    fn on_notify(&mut self, cx: &mut Context<'_, ShardState>, tag: Tag) {
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
                    admit(cx, tunnel, L::stream(s), L::peer(&p));
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
        // A live upgrade's export window waits for the last accept.
        super::handoff::check_done(cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(total: usize, per_source: usize, rate: f64, burst: usize) -> Admission {
        Admission::new(
            &crate::config::Admission {
                max_handshakes: total,
                max_handshakes_per_source: per_source,
                new_conns_per_source: rate,
                new_conns_per_source_burst: burst,
                max_unopened_per_source: 2,
            },
            1,
        )
    }

    #[test]
    fn an_unopened_session_moves_from_the_handshake_count_to_its_own_cap() {
        let now = Instant::now();
        let mut a = limits(3, 3, 0.0, 0);
        let t: Vec<Ticket> = (0..3)
            .map(|_| a.admit(ip("10.0.0.1"), now).unwrap())
            .collect();
        assert_eq!(a.handshakes(), 3);
        // Two may wait for their OPEN (max_unopened_per_source = 2); each frees its
        // handshake slot, so new handshakes are admitted meanwhile.
        assert!(a.hold_unopened(&t[0]));
        assert!(a.hold_unopened(&t[1]));
        assert_eq!(a.handshakes(), 1);
        assert!(
            !a.hold_unopened(&t[2]),
            "the source's third is over its cap"
        );
        assert_eq!(
            a.handshakes(),
            1,
            "a refused one still holds its handshake slot"
        );
        a.admit(ip("10.0.0.1"), now).unwrap();
        // Another source has its own cap.
        let other = a.admit(ip("10.0.0.2"), now).unwrap();
        assert!(a.hold_unopened(&other));
        // An OPEN (or a close) frees the slot: the source may hold another.
        let mut t = t.into_iter();
        a.release_unopened(t.next().unwrap());
        let next = a.admit(ip("10.0.0.3"), now).unwrap();
        a.release(next);
        let again = a.admit(ip("10.0.0.1"), now).unwrap();
        assert!(a.hold_unopened(&again));
    }

    #[test]
    fn sources_holding_unopened_sessions_are_not_forgotten() {
        let t0 = Instant::now();
        let mut a = limits(1 << 20, 4, 100.0, 10);
        let held = a.admit(ip("192.0.2.1"), t0).unwrap();
        assert!(a.hold_unopened(&held));
        for i in 0..(4 * PRUNE_MIN as u32) {
            let now = t0 + Duration::from_secs(10);
            let t = a
                .admit(IpAddr::from(((i + 1) << 8).to_be_bytes()), now)
                .unwrap();
            a.release(t);
        }
        // The held source still counts its session: two more fit, not three.
        let now = t0 + Duration::from_secs(20);
        let b = a.admit(ip("192.0.2.1"), now).unwrap();
        assert!(a.hold_unopened(&b));
        let c = a.admit(ip("192.0.2.1"), now).unwrap();
        assert!(!a.hold_unopened(&c));
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_cap_refuses_with_its_reason_and_release_frees_the_slot() {
        let now = Instant::now();
        let mut a = limits(3, 2, 0.0, 0);
        let t1 = a.admit(ip("10.0.0.1"), now).unwrap();
        let _t2 = a.admit(ip("10.0.0.1"), now).unwrap();
        assert_eq!(
            a.admit(ip("10.0.0.1"), now).unwrap_err(),
            RejectReason::SourceHandshakes
        );
        let _t3 = a.admit(ip("10.0.0.2"), now).unwrap();
        assert_eq!(
            a.admit(ip("10.0.0.3"), now).unwrap_err(),
            RejectReason::MaxHandshakes
        );
        a.release(t1);
        assert_eq!(a.handshakes(), 2);
        a.admit(ip("10.0.0.1"), now).unwrap();
    }

    #[test]
    fn a_reload_changes_the_caps_and_keeps_what_is_in_flight() {
        let now = Instant::now();
        let mut a = limits(10, 10, 0.0, 0);
        let _held: Vec<_> = (0..4)
            .map(|_| a.admit(ip("10.0.0.1"), now).unwrap())
            .collect();
        a.set_limits(
            &crate::config::Admission {
                max_handshakes: 10,
                max_handshakes_per_source: 3,
                new_conns_per_source: 0.0,
                new_conns_per_source_burst: 0,
                max_unopened_per_source: 2,
            },
            1,
        );
        // The four in flight still count against the new per-source cap of 3.
        assert_eq!(a.handshakes(), 4);
        assert_eq!(
            a.admit(ip("10.0.0.1"), now).unwrap_err(),
            RejectReason::SourceHandshakes
        );
        a.admit(ip("10.0.0.2"), now).unwrap();
    }

    #[test]
    fn the_rate_is_a_token_bucket_per_source() {
        let t0 = Instant::now();
        let mut a = limits(1000, 1000, 10.0, 5);
        for _ in 0..5 {
            a.admit(ip("10.0.0.1"), t0).unwrap();
        }
        assert_eq!(
            a.admit(ip("10.0.0.1"), t0).unwrap_err(),
            RejectReason::SourceRate
        );
        // Another source has its own bucket; time refills this one at 10 per second.
        a.admit(ip("10.0.0.2"), t0).unwrap();
        let t1 = t0 + Duration::from_millis(250);
        a.admit(ip("10.0.0.1"), t1).unwrap();
        a.admit(ip("10.0.0.1"), t1).unwrap();
        assert_eq!(
            a.admit(ip("10.0.0.1"), t1).unwrap_err(),
            RejectReason::SourceRate
        );
    }

    #[test]
    fn ipv6_sources_count_by_their_64_and_mapped_v4_as_v4() {
        let now = Instant::now();
        let mut a = limits(1000, 2, 0.0, 0);
        a.admit(ip("2001:db8:1:2::1"), now).unwrap();
        a.admit(ip("2001:db8:1:2:ffff::9"), now).unwrap();
        assert_eq!(
            a.admit(ip("2001:db8:1:2::77"), now).unwrap_err(),
            RejectReason::SourceHandshakes
        );
        a.admit(ip("2001:db8:1:3::1"), now).unwrap();
        assert_eq!(
            SourceKey::of(ip("::ffff:192.0.2.7")),
            SourceKey::of(ip("192.0.2.7"))
        );
    }

    #[test]
    fn the_source_table_stays_bounded_under_many_sources() {
        let t0 = Instant::now();
        let mut a = limits(1 << 20, 4, 100.0, 10);
        // 100,000 sources, one connection each, whose handshakes complete at once; a second
        // later every bucket is full again and the table forgets them.
        for i in 0..100_000u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 20);
            let t = a.admit(IpAddr::from(i.to_be_bytes()), now).unwrap();
            a.release(t);
            assert!(a.sources() <= 2 * PRUNE_MIN, "{}", a.sources());
        }
    }
}
