//! A connection's state on its way to a successor process (a live upgrade: `--handoff`,
//! docs/OPERATIONS.md, "Upgrade without downtime"): what the old process exports with the
//! connection's two descriptors, and what the new one rebuilds the connection from.
//!
//! [`ConnCore::export`] reads the core between two events — so at a record boundary: every
//! record the sealer made is whole in `raw_out` (the first perhaps partly written), and what
//! `raw_in` holds is at most one partial record, which travels as bytes for the successor's
//! opener — and copies it out without changing it, so a successor that refuses the connection
//! leaves it exactly as it was. [`ConnCore::import`] builds a core that goes on from there:
//! the same buffers, end-of-stream, half-close and backpressure flags, byte counts, the same
//! session (traffic secrets, record counters, key-update epochs, hibernation); its idle timer
//! counts from the same last activity, so the time left on it is what it was.
//!
//! The encoding ([`ConnState::encode`], [`ConnState::decode`]) is self-describing and
//! versioned: a magic, a version ([`STATE_VERSION`]), the length of what follows (so a state
//! cut at a field boundary is not taken for one without the rest), then fields as `tag (1) |
//! length (4) | value`, integers big-endian:
//!
//! | tag | field |
//! |---|---|
//! | 0x01 | tunnel name |
//! | 0x02 | mode (0 forward, 1 encrypt, 2 decrypt) |
//! | 0x03 | the shard it ran on (u32; a placement hint) |
//! | 0x04 | core: age and quiet time (µs, u64 each), flags (asleep, client ended, upstream ended), bytes accounted (4 × u64) |
//! | 0x05 | target (its id in the new process is found by address): an IP address (4 or 6, the address, the port), or a Unix socket's path (1, the path's bytes) |
//! | 0x06 | `max_lifetime` (optional): the connection's jitter (i8, thousandths), flags (past its lifetime, a request waiting for its reply) |
//! | 0x10, 0x11 | client, upstream stream: flags (end seen, shutdown asked, write shut), suspend reasons, bytes read and written, then input, output, raw in, raw out (u32 length + bytes each) |
//! | 0x20, 0x21 | client, upstream session: role, rekey interval (a flag + u64), the protocol's session state (`sealpipe_protocol::migrate`) |
//! | 0x30 | client identity: peer address, PROXY header bytes in and out, the session's OPEN |
//!
//! Invariants:
//! - Decoding never panics and never trusts a length: every field is read through checked
//!   reads, and a state that is cut short, of another version, with an unknown, repeated or
//!   missing field, or with a value no connection can have (a session on a plain side, a
//!   suspend reason that belongs to a socket, a partial record longer than a record, buffers
//!   beyond the documented bound) is refused as a whole.
//! - Secrets and buffered plaintext live only in storage zeroed when dropped
//!   ([`Zeroizing`]); the encoding is sized before it is written, so no reallocation leaves a
//!   copy behind; nothing here logs, and `Debug` shows no buffer or secret.
//! - Only a connection that is settled moves ([`NotReady`] otherwise): handshake done, no
//!   client preamble awaited, no warm session unopened or unanswered, upstream connected,
//!   nothing closing, no layer with something of its own pending (an ABORT queued, an OPEN
//!   not yet sealed or taken), not ended at its `max_lifetime` (it waits for its peers to
//!   close, and ends where it is).
//! - `max_lifetime` follows a moved connection: its age travels (its start is the same), and
//!   so do its jitter and where it stands (field 0x06), so its deadline is the one it had. The
//!   field is optional: a state without it (a tunnel without `max_lifetime` writes none, so
//!   its states are those a build without the field writes) gets a fresh jitter in the
//!   successor. The stream cores' read allowances (rate limits) do not travel: each process
//!   meters from its own buckets. A warm session's replay state never travels (it does not
//!   move until its decrypt side answered: [`NotReady::Warm`]), so it needs no field.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::{MAX_UNIX_PATH, Mode};
use crate::protocol::{MAX_OPEN_LEN, MAX_RECORD_LEN, OpenInfo, SessionState, Zeroizing};
use crate::reactor::{BevCore, BevState, Buffer, NoFilter, Suspend, Transport};

use super::super::super::codec::{Role, SealFilter, SealState};
use super::super::super::ids::interned;
use super::super::super::upstream::{TargetId, Upstreams};
use super::super::super::{ByteCounts, READ_HIGH, TargetAddr};
use super::{ConnCore, Ending, Env, Layer, LifetimeState, MAX_JITTER_PERMILLE, WATERMARKS};

/// The version [`ConnState::encode`] writes and [`ConnState::decode`] reads.
pub const STATE_VERSION: u16 = 1;
const MAGIC: &[u8; 4] = b"SPcs";
/// Most bytes one buffer of a moved connection may hold: the documented per-direction bound
/// (proxy/mod.rs) is well below it.
const MAX_BUFFER: usize = 4 * READ_HIGH;
/// Most bytes one connection's encoded state may hold.
pub const MAX_STATE: usize = 8 * MAX_BUFFER + 4096;
/// An upper bound on everything but the buffers' bytes.
const FIXED: usize = 2048;

const T_TUNNEL: u8 = 0x01;
const T_MODE: u8 = 0x02;
const T_SHARD: u8 = 0x03;
const T_CORE: u8 = 0x04;
const T_TARGET: u8 = 0x05;
const T_LIFETIME: u8 = 0x06;
const T_CLIENT: u8 = 0x10;
const T_UPSTREAM: u8 = 0x11;
const T_CLIENT_SEAL: u8 = 0x20;
const T_UPSTREAM_SEAL: u8 = 0x21;
const T_IDENT: u8 = 0x30;

/// Why an encoded connection state was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("not a connection state")]
    Magic,
    #[error("connection state version {0}; this build reads version {STATE_VERSION}")]
    Version(u16),
    #[error("connection state cut short")]
    Truncated,
    #[error("connection state of {0} bytes, more than a connection can hold")]
    TooLarge(usize),
    #[error("unknown field {0:#04x}")]
    UnknownField(u8),
    #[error("field {0} appears twice")]
    Repeated(&'static str),
    #[error("field {0} is missing")]
    Missing(&'static str),
    #[error("field {0} is invalid")]
    Invalid(&'static str),
    #[error("session: {0}")]
    Session(#[from] crate::protocol::StateError),
}

/// Why a connection cannot move now: it may later (its handshake completes, its connect
/// does), or it ends where it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotReady {
    /// It is closing (or failed, with its error not yet handled).
    Closing,
    /// Its handshake (or the client's PROXY header) is not done.
    Handshake,
    /// Its upstream is not connected yet.
    Connecting,
    /// Its sealed layer has something of its own pending (an OPEN, an ABORT).
    Layer,
    /// A warm session not settled yet (docs/PROTOCOL.md, "Warm sessions"): a decrypt side's
    /// held one, its OPEN still to come (it closes with an ABORT `unopened` at the drain a
    /// handoff starts with, and never moves); or an encrypt side's adopted one whose client's
    /// bytes are kept to go again if the decrypt side declines it, until it answers (that
    /// copy does not travel).
    Warm,
    /// It ended at its `max_lifetime` and waits for its peers to close their sides: it ends
    /// where it is, within the grace.
    Ending,
}

/// One side's stream, as it travels (see [`BevState`]).
#[derive(Default)]
pub struct SideState {
    pub input: Zeroizing<Vec<u8>>,
    pub output: Zeroizing<Vec<u8>>,
    pub raw_in: Zeroizing<Vec<u8>>,
    pub raw_out: Zeroizing<Vec<u8>>,
    pub eof: bool,
    pub shutdown_requested: bool,
    pub write_shut: bool,
    pub suspend: u8,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// The client identity of a connection (`identity::ConnIdentity`), as it travels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentState {
    pub peer: Option<SocketAddr>,
    pub header_in: u32,
    pub header_out: u32,
    pub open: Option<OpenInfo>,
}

/// The core's part of a connection's state.
pub struct CoreState {
    /// How long the connection has existed, and how long it has been quiet.
    pub age: Duration,
    pub quiet: Duration,
    pub asleep: bool,
    pub client_eof: bool,
    pub upstream_eof: bool,
    pub counted: ByteCounts,
    /// The target in use (found by address in the new process's list).
    pub target: Option<TargetAddr>,
    /// `max_lifetime`'s state; `None`: the successor draws a jitter (see the module doc).
    pub lifetime: Option<LifetimeMove>,
    pub client: SideState,
    pub upstream: SideState,
    pub client_seal: Option<SealState>,
    pub upstream_seal: Option<SealState>,
}

/// A connection's `max_lifetime` state, as it travels (the core's `LifetimeState` but the
/// end, which does not move: [`NotReady::Ending`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LifetimeMove {
    /// The jitter, in thousandths (within ±[`MAX_JITTER_PERMILLE`]).
    pub jitter: i8,
    /// Past its lifetime, waiting for a quiet moment to end.
    pub due: bool,
    /// A request waits for its reply (no quiet moment until it came).
    pub awaiting_reply: bool,
}

/// A connection's whole state: the core's, and what the adapter adds.
pub struct ConnState {
    pub tunnel: String,
    pub mode: Mode,
    /// The shard it ran on in the old process.
    pub shard: u32,
    pub core: CoreState,
    pub ident: Option<IdentState>,
}

impl std::fmt::Debug for ConnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnState")
            .field("tunnel", &self.tunnel)
            .field("mode", &self.mode)
            .field("shard", &self.shard)
            .field("age", &self.core.age)
            .field("asleep", &self.core.asleep)
            .finish_non_exhaustive()
    }
}

/// A layer that can move to a successor process: plain has nothing to carry, sealed its
/// session.
pub trait Migrate: Layer {
    /// Whether the layer can move now (what [`export_layer`](Self::export_layer) checks,
    /// without copying anything).
    fn movable(&self) -> bool;
    /// The layer's state, if it can move now.
    fn export_layer(&self) -> Result<Option<SealState>, NotReady>;
    /// The layer that goes on from `seal` (what [`export_layer`](Self::export_layer) gave).
    fn import_layer(seal: Option<SealState>) -> Result<Self, StateError>;
}

impl Migrate for NoFilter {
    fn movable(&self) -> bool {
        true
    }
    fn export_layer(&self) -> Result<Option<SealState>, NotReady> {
        Ok(None)
    }
    fn import_layer(seal: Option<SealState>) -> Result<Self, StateError> {
        match seal {
            None => Ok(NoFilter),
            Some(_) => Err(StateError::Invalid("a session on a plain side")),
        }
    }
}

impl Migrate for SealFilter {
    fn movable(&self) -> bool {
        SealFilter::movable(self)
    }
    fn export_layer(&self) -> Result<Option<SealState>, NotReady> {
        self.export().map(Some).ok_or(NotReady::Layer)
    }
    fn import_layer(seal: Option<SealState>) -> Result<Self, StateError> {
        let seal = seal.ok_or(StateError::Missing("session"))?;
        Ok(SealFilter::resume(seal))
    }
}

fn bytes_of(b: &Buffer) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(b.len()));
    for s in b.slices() {
        out.extend_from_slice(s);
    }
    out
}

fn buffer_of(bytes: &[u8]) -> Buffer {
    let mut b = Buffer::new();
    b.append(bytes);
    b
}

/// The suspend reasons that travel: the data's, not the socket's.
const DATA_SUSPEND: u8 = Suspend::User as u8 | Suspend::HighWatermark as u8 | Suspend::Peer as u8;

fn side_of<F: Layer, T>(b: &BevCore<F, T>) -> SideState {
    let (raw_in, raw_out) = b.raw_buffers();
    let (bytes_read, bytes_written) = b.wire_bytes();
    SideState {
        input: bytes_of(&b.input),
        output: bytes_of(&b.output),
        raw_in: bytes_of(raw_in),
        raw_out: bytes_of(raw_out),
        eof: b.eof_seen(),
        shutdown_requested: b.shutdown_requested(),
        write_shut: b.write_shut(),
        suspend: b.suspend_mask() & DATA_SUSPEND,
        bytes_read,
        bytes_written,
    }
}

fn bev_state(s: &SideState) -> BevState {
    BevState {
        input: buffer_of(&s.input),
        output: buffer_of(&s.output),
        raw_in: buffer_of(&s.raw_in),
        raw_out: buffer_of(&s.raw_out),
        eof: s.eof,
        shutdown_requested: s.shutdown_requested,
        write_shut: s.write_shut,
        suspend: s.suspend,
        bytes_read: s.bytes_read,
        bytes_written: s.bytes_written,
    }
}

impl<C: Migrate, U: Migrate, T: Transport> ConnCore<C, U, T> {
    /// The connection's state at `now`, if it can move now (see the module doc); the core is
    /// left as it was. `upstreams` names the target's address.
    pub fn export(&self, now: Instant, upstreams: &Upstreams) -> Result<CoreState, NotReady> {
        self.movable()?;
        let up = self.upstream.as_deref().ok_or(NotReady::Connecting)?;
        let client_seal = self.client.filter().export_layer()?;
        let upstream_seal = up.filter().export_layer()?;
        Ok(CoreState {
            age: now.saturating_duration_since(self.started),
            quiet: now.saturating_duration_since(self.last_active),
            asleep: self.asleep,
            client_eof: self.client_eof,
            upstream_eof: self.upstream_eof,
            counted: self.counted,
            target: self.target.and_then(|id| upstreams.get(id)).map(|t| t.addr),
            lifetime: Some(LifetimeMove {
                jitter: self.lifetime.jitter,
                due: self.lifetime.ending() == Ending::Due,
                awaiting_reply: self.lifetime.awaiting_reply(),
            }),
            client: side_of(&self.client),
            upstream: side_of(up),
            client_seal,
            upstream_seal,
        })
    }

    /// Whether the connection can move now (see the module doc), without copying anything.
    pub fn movable(&self) -> Result<(), NotReady> {
        if self.closed.is_some() || self.client.has_error() {
            return Err(NotReady::Closing);
        }
        if !self.handshake_done || self.awaiting_preamble {
            return Err(NotReady::Handshake);
        }
        if self.unopened || self.replay.is_some() {
            return Err(NotReady::Warm);
        }
        let up = self.upstream.as_deref().ok_or(NotReady::Connecting)?;
        if !up.io().is_connected() {
            return Err(NotReady::Connecting);
        }
        if up.has_error() {
            return Err(NotReady::Closing);
        }
        if !self.client.filter().movable() || !up.filter().movable() {
            return Err(NotReady::Layer);
        }
        if self.lifetime.ending() == Ending::Ended {
            return Err(NotReady::Ending);
        }
        Ok(())
    }

    /// The core of a connection moved from a predecessor: `client` and `upstream` build each
    /// side's stream core over its (passed) socket from the side's layer; `target` is the
    /// target's id here, if its address is still one of the tunnel's. Call
    /// [`resume`](Self::resume) once the sockets are registered.
    pub fn import(
        st: CoreState,
        target: Option<TargetId>,
        now: Instant,
        client: impl FnOnce(C) -> BevCore<C, T>,
        upstream: impl FnOnce(U) -> BevCore<U, T>,
    ) -> Result<Self, StateError> {
        let mut c = client(C::import_layer(st.client_seal)?);
        let mut u = upstream(U::import_layer(st.upstream_seal)?);
        c.set_watermarks(WATERMARKS);
        u.set_watermarks(WATERMARKS);
        c.restore(bev_state(&st.client));
        u.restore(bev_state(&st.upstream));
        let earlier = |d: Duration| now.checked_sub(d).unwrap_or(now);
        let lifetime = match st.lifetime {
            Some(l) => {
                let mut s = LifetimeState {
                    bits: 0,
                    jitter: l.jitter,
                };
                s.set_ending(if l.due { Ending::Due } else { Ending::Live });
                s.set_awaiting_reply(l.awaiting_reply);
                s
            }
            None => LifetimeState {
                bits: LifetimeState::JITTER_PENDING,
                jitter: 0,
            },
        };
        Ok(ConnCore {
            client: c,
            upstream: Some(Box::new(u)),
            target,
            tried: Default::default(),
            started: earlier(st.age),
            connect_started: now,
            last_active: earlier(st.quiet),
            handshake_done: true,
            awaiting_preamble: false,
            asleep: st.asleep,
            client_eof: st.client_eof,
            upstream_eof: st.upstream_eof,
            counted: st.counted,
            closed: None,
            unopened: false,
            replay: None,
            lifetime,
        })
    }

    /// A moved connection starts here (its sockets registered), or a frozen one that stayed
    /// goes on: its idle timer is armed for the time it had left, and `max_lifetime`'s for
    /// its deadline under the limits in force here (with a jitter drawn now if none came
    /// with it). Its sockets' registration reports their readiness, which drives whatever was
    /// pending (bytes to write, bytes that arrived during the move).
    pub fn resume(&mut self, now: Instant, env: &mut impl Env<U, T>) {
        self.arm_idle(env);
        if self.lifetime.bits & LifetimeState::JITTER_PENDING != 0 {
            self.lifetime.bits &= !LifetimeState::JITTER_PENDING;
            self.lifetime.jitter = env
                .lifetime_jitter()
                .clamp(-MAX_JITTER_PERMILLE, MAX_JITTER_PERMILLE);
        }
        self.lifetime_step(now, env);
    }
}

// ---------------------------------------------------------------------------------------------
// The encoding

/// Bytes written into a buffer sized up front (so nothing is reallocated: see the invariants).
struct Out(Zeroizing<Vec<u8>>);

impl Out {
    fn put(&mut self, b: &[u8]) {
        debug_assert!(
            self.0.len() + b.len() <= self.0.capacity(),
            "sized up front"
        );
        self.0.extend_from_slice(b);
    }
    fn u8(&mut self, v: u8) {
        self.put(&[v]);
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_be_bytes());
    }
    /// A field: its tag, then its value's length once `value` has written it.
    fn field(&mut self, tag: u8, value: impl FnOnce(&mut Out)) {
        self.u8(tag);
        let at = self.0.len();
        self.u32(0);
        value(self);
        let len = (self.0.len() - at - 4) as u32;
        self.0[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }
    fn addr(&mut self, a: SocketAddr) {
        match a.ip() {
            IpAddr::V4(ip) => {
                self.u8(4);
                self.put(&ip.octets());
            }
            IpAddr::V6(ip) => {
                self.u8(6);
                self.put(&ip.octets());
            }
        }
        self.put(&a.port().to_be_bytes());
    }
    fn target(&mut self, t: TargetAddr) {
        match t {
            TargetAddr::Inet(a) => self.addr(a),
            TargetAddr::Unix(p) => {
                self.u8(1);
                self.put(p.as_os_str().as_bytes());
            }
        }
    }
    fn side(&mut self, s: &SideState) {
        self.u8(u8::from(s.eof)
            | u8::from(s.shutdown_requested) << 1
            | u8::from(s.write_shut) << 2);
        self.u8(s.suspend);
        self.u64(s.bytes_read);
        self.u64(s.bytes_written);
        for b in [&s.input, &s.output, &s.raw_in, &s.raw_out] {
            self.u32(b.len() as u32);
            self.put(b);
        }
    }
    fn seal(&mut self, s: &SealState) {
        self.u8(match s.role {
            Role::Initiator => 0,
            Role::Responder => 1,
        });
        match s.key_update_interval {
            Some(n) => {
                self.u8(1);
                self.u64(n);
            }
            None => {
                self.u8(0);
                self.u64(0);
            }
        }
        s.session.encode(&mut self.0);
    }
}

fn mode_byte(m: Mode) -> u8 {
    match m {
        Mode::Forward => 0,
        Mode::Encrypt => 1,
        Mode::Decrypt => 2,
    }
}

impl ConnState {
    /// The state's bytes (see the module doc), in storage zeroed when dropped.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let buffered: usize = [&self.core.client, &self.core.upstream]
            .iter()
            .map(|s| s.input.len() + s.output.len() + s.raw_in.len() + s.raw_out.len())
            .sum();
        let mut o = Out(Zeroizing::new(Vec::with_capacity(FIXED + buffered)));
        o.put(MAGIC);
        o.put(&STATE_VERSION.to_be_bytes());
        let start = o.0.len();
        o.u32(0);
        o.field(T_TUNNEL, |o| o.put(self.tunnel.as_bytes()));
        o.field(T_MODE, |o| o.u8(mode_byte(self.mode)));
        o.field(T_SHARD, |o| o.u32(self.shard));
        let c = &self.core;
        o.field(T_CORE, |o| {
            o.u64(c.age.as_micros().min(u64::MAX as u128) as u64);
            o.u64(c.quiet.as_micros().min(u64::MAX as u128) as u64);
            o.u8(u8::from(c.asleep) | u8::from(c.client_eof) << 1 | u8::from(c.upstream_eof) << 2);
            for (_, n) in c.counted.iter() {
                o.u64(n);
            }
        });
        if let Some(t) = c.target {
            o.field(T_TARGET, |o| o.target(t));
        }
        if let Some(l) = c.lifetime {
            o.field(T_LIFETIME, |o| {
                o.put(&l.jitter.to_be_bytes());
                o.u8(u8::from(l.due) | u8::from(l.awaiting_reply) << 1);
            });
        }
        o.field(T_CLIENT, |o| o.side(&c.client));
        o.field(T_UPSTREAM, |o| o.side(&c.upstream));
        if let Some(s) = &c.client_seal {
            o.field(T_CLIENT_SEAL, |o| o.seal(s));
        }
        if let Some(s) = &c.upstream_seal {
            o.field(T_UPSTREAM_SEAL, |o| o.seal(s));
        }
        if let Some(i) = &self.ident {
            o.field(T_IDENT, |o| {
                o.u8(u8::from(i.peer.is_some()) | u8::from(i.open.is_some()) << 1);
                if let Some(p) = i.peer {
                    o.addr(p);
                }
                o.u32(i.header_in);
                o.u32(i.header_out);
                if let Some(open) = i.open {
                    let mut b = [0u8; MAX_OPEN_LEN];
                    let n = open.encode(&mut b);
                    o.u8(n as u8);
                    o.put(&b[..n]);
                }
            });
        }
        let len = (o.0.len() - start - 4) as u32;
        o.0[start..start + 4].copy_from_slice(&len.to_be_bytes());
        o.0
    }

    /// Reads a state [`encode`](Self::encode) wrote, refusing anything it would not write.
    pub fn decode(bytes: &[u8]) -> Result<ConnState, StateError> {
        if bytes.len() > MAX_STATE {
            return Err(StateError::TooLarge(bytes.len()));
        }
        let mut r = Reader(bytes);
        if r.take(MAGIC.len()).map_err(|_| StateError::Magic)? != MAGIC {
            return Err(StateError::Magic);
        }
        let version = u16::from_be_bytes(r.array()?);
        if version != STATE_VERSION {
            return Err(StateError::Version(version));
        }
        let len = r.u32()? as usize;
        if len != r.0.len() {
            return Err(StateError::Truncated);
        }
        let mut f = Fields::default();
        while !r.0.is_empty() {
            let tag = r.u8()?;
            let len = r.u32()? as usize;
            let value = Reader(r.take(len)?);
            let (slot, name) = match tag {
                T_TUNNEL => (&mut f.tunnel, "tunnel"),
                T_MODE => (&mut f.mode, "mode"),
                T_SHARD => (&mut f.shard, "shard"),
                T_CORE => (&mut f.core, "core"),
                T_TARGET => (&mut f.target, "target"),
                T_LIFETIME => (&mut f.lifetime, "lifetime"),
                T_CLIENT => (&mut f.client, "client stream"),
                T_UPSTREAM => (&mut f.upstream, "upstream stream"),
                T_CLIENT_SEAL => (&mut f.client_seal, "client session"),
                T_UPSTREAM_SEAL => (&mut f.upstream_seal, "upstream session"),
                T_IDENT => (&mut f.ident, "identity"),
                other => return Err(StateError::UnknownField(other)),
            };
            if slot.replace(value.0).is_some() {
                return Err(StateError::Repeated(name));
            }
        }
        f.parse()
    }
}

/// Each field's value, as found (at most once each).
#[derive(Default)]
struct Fields<'a> {
    tunnel: Option<&'a [u8]>,
    mode: Option<&'a [u8]>,
    shard: Option<&'a [u8]>,
    core: Option<&'a [u8]>,
    target: Option<&'a [u8]>,
    lifetime: Option<&'a [u8]>,
    client: Option<&'a [u8]>,
    upstream: Option<&'a [u8]>,
    client_seal: Option<&'a [u8]>,
    upstream_seal: Option<&'a [u8]>,
    ident: Option<&'a [u8]>,
}

fn need<'a>(v: Option<&'a [u8]>, name: &'static str) -> Result<Reader<'a>, StateError> {
    v.map(Reader).ok_or(StateError::Missing(name))
}

impl Fields<'_> {
    fn parse(self) -> Result<ConnState, StateError> {
        let tunnel = need(self.tunnel, "tunnel")?.0;
        if tunnel.is_empty() || tunnel.len() > 255 || !tunnel.iter().all(u8::is_ascii_graphic) {
            return Err(StateError::Invalid("tunnel"));
        }
        let tunnel = String::from_utf8_lossy(tunnel).into_owned();
        let mut m = need(self.mode, "mode")?;
        let mode = match m.u8()? {
            0 => Mode::Forward,
            1 => Mode::Encrypt,
            2 => Mode::Decrypt,
            _ => return Err(StateError::Invalid("mode")),
        };
        m.end("mode")?;
        let mut s = need(self.shard, "shard")?;
        let shard = s.u32()?;
        s.end("shard")?;
        let mut c = need(self.core, "core")?;
        let age = Duration::from_micros(c.u64()?);
        let quiet = Duration::from_micros(c.u64()?);
        let flags = c.u8()?;
        if flags & !0b111 != 0 {
            return Err(StateError::Invalid("core flags"));
        }
        let mut counted = ByteCounts::default();
        for label in ByteCounts::LABELS {
            counted[label] = c.u64()?;
        }
        c.end("core")?;
        let target = match self.target {
            Some(t) => Reader(t).target()?,
            None => None,
        };
        let lifetime = match self.lifetime {
            Some(l) => {
                let mut l = Reader(l);
                let jitter = i8::from_be_bytes(l.array()?);
                let flags = l.u8()?;
                l.end("lifetime")?;
                if flags & !0b11 != 0 || jitter.unsigned_abs() > MAX_JITTER_PERMILLE.unsigned_abs()
                {
                    return Err(StateError::Invalid("lifetime"));
                }
                Some(LifetimeMove {
                    jitter,
                    due: flags & 1 != 0,
                    awaiting_reply: flags & 2 != 0,
                })
            }
            None => None,
        };
        let (client_sealed, upstream_sealed) = match mode {
            Mode::Forward => (false, false),
            Mode::Encrypt => (false, true),
            Mode::Decrypt => (true, false),
        };
        let client = need(self.client, "client stream")?.side(client_sealed)?;
        let upstream = need(self.upstream, "upstream stream")?.side(upstream_sealed)?;
        let seal = |v: Option<&[u8]>, sealed: bool, role: Role| match (v, sealed) {
            (None, false) => Ok(None),
            (Some(v), true) => Reader(v).seal(role).map(Some),
            (None, true) => Err(StateError::Missing("session")),
            (Some(_), false) => Err(StateError::Invalid("a session on a plain side")),
        };
        let client_seal = seal(self.client_seal, client_sealed, Role::Responder)?;
        let upstream_seal = seal(self.upstream_seal, upstream_sealed, Role::Initiator)?;
        let ident = match self.ident {
            Some(v) => Some(Reader(v).ident()?),
            None => None,
        };
        Ok(ConnState {
            tunnel,
            mode,
            shard,
            core: CoreState {
                age,
                quiet,
                asleep: flags & 1 != 0,
                client_eof: flags & 2 != 0,
                upstream_eof: flags & 4 != 0,
                counted,
                target,
                lifetime,
                client,
                upstream,
                client_seal,
                upstream_seal,
            },
            ident,
        })
    }
}

/// Checked reads: a short read is [`StateError::Truncated`], never a panic.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let (head, tail) = self.0.split_at_checked(n).ok_or(StateError::Truncated)?;
        self.0 = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let (head, tail) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(StateError::Truncated)?;
        self.0 = tail;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.array::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    /// Nothing may follow a fixed-size field's value.
    fn end(&self, name: &'static str) -> Result<(), StateError> {
        match self.0.is_empty() {
            true => Ok(()),
            false => Err(StateError::Invalid(name)),
        }
    }
    fn addr(&mut self) -> Result<SocketAddr, StateError> {
        let ip = match self.u8()? {
            4 => IpAddr::from(self.array::<4>()?),
            6 => IpAddr::from(self.array::<16>()?),
            _ => return Err(StateError::Invalid("address family")),
        };
        Ok(SocketAddr::new(ip, u16::from_be_bytes(self.array()?)))
    }
    /// A target: an IP address, or a Unix socket's path. A path this process never interned
    /// (no configuration of its named it) is no target of its: `None`, and the table of
    /// interned paths never grows from a state.
    fn target(mut self) -> Result<Option<TargetAddr>, StateError> {
        if self.0.first() != Some(&1) {
            let a = self.addr()?;
            self.end("target")?;
            return Ok(Some(TargetAddr::new(a)));
        }
        let path = &self.0[1..];
        if path.is_empty() || path.len() > MAX_UNIX_PATH || path.contains(&0) {
            return Err(StateError::Invalid("target path"));
        }
        let path = Path::new(std::ffi::OsStr::from_bytes(path));
        Ok(interned(path).map(TargetAddr::Unix))
    }
    fn bytes(&mut self) -> Result<Zeroizing<Vec<u8>>, StateError> {
        let n = self.u32()? as usize;
        if n > MAX_BUFFER {
            return Err(StateError::Invalid("buffer length"));
        }
        Ok(Zeroizing::new(self.take(n)?.to_vec()))
    }
    fn side(mut self, sealed: bool) -> Result<SideState, StateError> {
        let flags = self.u8()?;
        if flags & !0b111 != 0 {
            return Err(StateError::Invalid("stream flags"));
        }
        let suspend = self.u8()?;
        if suspend & !DATA_SUSPEND != 0 {
            return Err(StateError::Invalid("suspend reasons"));
        }
        let s = SideState {
            eof: flags & 1 != 0,
            shutdown_requested: flags & 2 != 0,
            write_shut: flags & 4 != 0,
            suspend,
            bytes_read: self.u64()?,
            bytes_written: self.u64()?,
            input: self.bytes()?,
            output: self.bytes()?,
            raw_in: self.bytes()?,
            raw_out: self.bytes()?,
        };
        self.end("stream")?;
        if s.write_shut && !s.shutdown_requested {
            return Err(StateError::Invalid("write shut without a shutdown"));
        }
        // A plain side has no filter buffers; a sealed one holds at most one partial record
        // read, and what it sealed (bounded as any buffer).
        let raw = !s.raw_in.is_empty() || !s.raw_out.is_empty();
        if raw && !sealed {
            return Err(StateError::Invalid("raw bytes on a plain side"));
        }
        if s.raw_in.len() >= MAX_RECORD_LEN {
            return Err(StateError::Invalid("partial record"));
        }
        Ok(s)
    }
    fn seal(mut self, role: Role) -> Result<SealState, StateError> {
        let r = match self.u8()? {
            0 => Role::Initiator,
            1 => Role::Responder,
            _ => return Err(StateError::Invalid("role")),
        };
        if r != role {
            return Err(StateError::Invalid("role"));
        }
        let key_update_interval = match (self.u8()?, self.u64()?) {
            (0, 0) => None,
            (1, n) if n > 0 => Some(n),
            _ => return Err(StateError::Invalid("rekey interval")),
        };
        let session = SessionState::decode(self.0)?;
        Ok(SealState {
            role,
            session,
            key_update_interval,
        })
    }
    fn ident(mut self) -> Result<IdentState, StateError> {
        let flags = self.u8()?;
        if flags & !0b11 != 0 {
            return Err(StateError::Invalid("identity flags"));
        }
        let peer = match flags & 1 {
            0 => None,
            _ => Some(self.addr()?),
        };
        let header_in = self.u32()?;
        let header_out = self.u32()?;
        let open = match flags & 2 {
            0 => None,
            _ => {
                let n = usize::from(self.u8()?);
                let b = self.take(n)?;
                Some(OpenInfo::decode(b).map_err(|_| StateError::Invalid("OPEN"))?)
            }
        };
        self.end("identity")?;
        Ok(IdentState {
            peer,
            header_in,
            header_out,
            open,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::protocol::keys::{Key, KeySet};
    use crate::protocol::{AeadKind, ForwardSecrecy, HandshakeConfig};
    use crate::reactor::Filter;

    /// The states of both ends of an open session (the responder's OPEN taken).
    fn sessions() -> (SealState, SealState) {
        let cfg = HandshakeConfig {
            keys: Arc::new(KeySet::new(Key::from_bytes([3; 32]), vec![])),
            forward_secrecy: ForwardSecrecy::Require,
            aead: AeadKind::Ring,
        };
        let mut i = SealFilter::new(Role::Initiator, &cfg);
        let mut r = SealFilter::new(Role::Responder, &cfg);
        let (mut i2r, mut r2i, mut none) = (Buffer::new(), Buffer::new(), Buffer::new());
        for _ in 0..4 {
            i.encode(&mut none, &mut i2r, false).unwrap();
            r.decode(&mut i2r, &mut none, &mut r2i, false).unwrap();
            i.decode(&mut r2i, &mut none, &mut i2r, false).unwrap();
        }
        r.take_open();
        (i.export().unwrap(), r.export().unwrap())
    }

    fn side(tag: u8, sealed: bool) -> SideState {
        let z = |b: &[u8]| Zeroizing::new(b.to_vec());
        SideState {
            input: z(&[tag; 5]),
            output: z(&[tag + 1; 300]),
            raw_in: if sealed { z(&[tag + 2; 7]) } else { z(&[]) },
            raw_out: if sealed {
                z(&[tag + 3; 70_000])
            } else {
                z(&[])
            },
            eof: true,
            shutdown_requested: true,
            write_shut: false,
            suspend: Suspend::Peer as u8,
            bytes_read: 1234,
            bytes_written: 5678,
        }
    }

    fn state(mode: Mode) -> ConnState {
        let (i, r) = sessions();
        let mut counted = ByteCounts::default();
        counted[crate::metrics::Bytes::UpSealed] = 99;
        let (client_seal, upstream_seal) = match mode {
            Mode::Encrypt => (None, Some(i)),
            Mode::Decrypt => (Some(r), None),
            Mode::Forward => (None, None),
        };
        ConnState {
            tunnel: "redis-1".into(),
            mode,
            shard: 3,
            core: CoreState {
                age: Duration::from_secs(3600),
                quiet: Duration::from_millis(1500),
                asleep: true,
                client_eof: false,
                upstream_eof: true,
                counted,
                target: Some(TargetAddr::new("[2001:db8::7]:6379".parse().unwrap())),
                lifetime: Some(LifetimeMove {
                    jitter: -37,
                    due: true,
                    awaiting_reply: true,
                }),
                client: side(10, client_seal.is_some()),
                upstream: side(20, upstream_seal.is_some()),
                client_seal,
                upstream_seal,
            },
            ident: Some(IdentState {
                peer: Some("192.0.2.4:50000".parse().unwrap()),
                header_in: 52,
                header_out: 0,
                open: Some(OpenInfo::from_socket(
                    "192.0.2.4:50000".parse().unwrap(),
                    "192.0.2.1:6379".parse().unwrap(),
                )),
            }),
        }
    }

    fn same_side(a: &SideState, b: &SideState) {
        assert_eq!(*a.input, *b.input);
        assert_eq!(*a.output, *b.output);
        assert_eq!(*a.raw_in, *b.raw_in);
        assert_eq!(*a.raw_out, *b.raw_out);
        assert_eq!(
            (a.eof, a.shutdown_requested, a.write_shut, a.suspend),
            (b.eof, b.shutdown_requested, b.write_shut, b.suspend)
        );
        assert_eq!(
            (a.bytes_read, a.bytes_written),
            (b.bytes_read, b.bytes_written)
        );
    }

    #[test]
    fn a_connection_state_round_trips_in_every_mode() {
        for mode in [Mode::Encrypt, Mode::Decrypt, Mode::Forward] {
            let st = state(mode);
            let bytes = st.encode();
            assert!(bytes.len() <= bytes.capacity() && bytes.len() < FIXED + 2 * 70_400);
            let got = ConnState::decode(&bytes).unwrap();
            assert_eq!((&got.tunnel, got.mode, got.shard), (&st.tunnel, mode, 3));
            let (a, b) = (&st.core, &got.core);
            assert_eq!((a.age, a.quiet), (b.age, b.quiet));
            assert_eq!(
                (a.asleep, a.client_eof, a.upstream_eof),
                (b.asleep, b.client_eof, b.upstream_eof)
            );
            assert_eq!((a.counted, a.target), (b.counted, b.target));
            assert_eq!(a.lifetime, b.lifetime);
            same_side(&a.client, &b.client);
            same_side(&a.upstream, &b.upstream);
            assert_eq!(got.ident, st.ident);
            for (x, y) in [
                (&a.client_seal, &b.client_seal),
                (&a.upstream_seal, &b.upstream_seal),
            ] {
                assert_eq!(x.is_some(), y.is_some());
                if let (Some(x), Some(y)) = (x, y) {
                    assert_eq!(x.role, y.role);
                    assert_eq!(x.session.key_id(), y.session.key_id());
                    // The session's own bytes, which the protocol's tests hold to the wire.
                    let (mut ex, mut ey) = (Zeroizing::new(Vec::new()), Zeroizing::new(Vec::new()));
                    x.session.encode(&mut ex);
                    y.session.encode(&mut ey);
                    assert_eq!(*ex, *ey);
                }
            }
            // Debug shows neither buffers nor secrets.
            assert!(!format!("{got:?}").contains("raw_out"));
        }
    }

    #[test]
    fn a_unix_target_travels_as_its_path_and_an_unknown_path_is_no_target() {
        let path = Path::new("/run/sealpipe-migrate-test/redis.sock");
        let mut st = state(Mode::Decrypt);
        st.core.target = Some(TargetAddr::unix(path));
        let got = ConnState::decode(&st.encode()).unwrap();
        assert_eq!(got.core.target, st.core.target);
        // A path no configuration of this process named is no target here, and decoding it
        // does not make it one.
        let other = Path::new("/run/sealpipe-migrate-test/never-configured.sock");
        let mut bytes = st.encode().to_vec();
        let at = field_at(&bytes, T_TARGET);
        let len = u32::from_be_bytes(bytes[at - 4..at].try_into().unwrap()) as usize;
        let mut value = vec![1u8];
        value.extend_from_slice(other.as_os_str().as_bytes());
        bytes.splice(at..at + len, value.iter().copied());
        bytes[at - 4..at].copy_from_slice(&(value.len() as u32).to_be_bytes());
        let total = (bytes.len() - 10) as u32;
        bytes[6..10].copy_from_slice(&total.to_be_bytes());
        assert_eq!(ConnState::decode(&bytes).unwrap().core.target, None);
        assert_eq!(interned(other), None);
        // An empty path, or one with a NUL, is refused.
        for bad in [&[1u8][..], &[1, b'/', 0, b'x'][..]] {
            let mut b = bytes.clone();
            let at = field_at(&b, T_TARGET);
            let len = u32::from_be_bytes(b[at - 4..at].try_into().unwrap()) as usize;
            b.splice(at..at + len, bad.iter().copied());
            b[at - 4..at].copy_from_slice(&(bad.len() as u32).to_be_bytes());
            let total = (b.len() - 10) as u32;
            b[6..10].copy_from_slice(&total.to_be_bytes());
            assert_eq!(
                ConnState::decode(&b).unwrap_err(),
                StateError::Invalid("target path")
            );
        }
    }

    #[test]
    fn a_state_without_the_lifetime_field_reads_as_one_to_draw_afresh() {
        let mut st = state(Mode::Forward);
        st.core.lifetime = None;
        let bytes = st.encode();
        assert!(
            ConnState::decode(&bytes).unwrap().core.lifetime.is_none(),
            "optional: a state written without it (as a build before it writes) reads"
        );
    }

    #[test]
    fn a_truncated_state_is_refused() {
        let bytes = state(Mode::Decrypt).encode();
        for n in 0..bytes.len() {
            // Cut between two fields, the rest is missing; inside one, it is short.
            let e = ConnState::decode(&bytes[..n]).unwrap_err();
            assert!(
                matches!(e, StateError::Magic | StateError::Truncated),
                "cut at {n}: {e:?}"
            );
        }
    }

    #[test]
    fn another_version_or_magic_is_refused() {
        let mut bytes = state(Mode::Encrypt).encode();
        bytes[5] = 2;
        assert_eq!(
            ConnState::decode(&bytes).unwrap_err(),
            StateError::Version(2)
        );
        bytes[0] = b'X';
        assert_eq!(ConnState::decode(&bytes).unwrap_err(), StateError::Magic);
        assert_eq!(
            ConnState::decode(&vec![0u8; MAX_STATE + 1]).unwrap_err(),
            StateError::TooLarge(MAX_STATE + 1)
        );
    }

    /// The offset of field `tag`'s value in an encoded state.
    fn field_at(bytes: &[u8], tag: u8) -> usize {
        let mut at = 10;
        loop {
            let len = u32::from_be_bytes(bytes[at + 1..at + 5].try_into().unwrap()) as usize;
            if bytes[at] == tag {
                return at + 5;
            }
            at += 5 + len;
        }
    }

    #[test]
    fn corrupted_fields_are_refused() {
        let good = state(Mode::Encrypt).encode();
        let cases: &[(u8, usize, u8, StateError)] = &[
            (T_MODE, 0, 7, StateError::Invalid("mode")),
            // A decrypt connection with an initiator's session on its upstream side.
            (
                T_MODE,
                0,
                2,
                StateError::Invalid("raw bytes on a plain side"),
            ),
            (
                T_MODE,
                0,
                0,
                StateError::Invalid("raw bytes on a plain side"),
            ),
            (T_CORE, 16, 0x08, StateError::Invalid("core flags")),
            (T_TARGET, 0, 5, StateError::Invalid("address family")),
            (T_LIFETIME, 0, 101, StateError::Invalid("lifetime")),
            (T_LIFETIME, 0, 0x80, StateError::Invalid("lifetime")),
            (T_LIFETIME, 1, 0x04, StateError::Invalid("lifetime")),
            (T_CLIENT, 0, 0x08, StateError::Invalid("stream flags")),
            (
                T_CLIENT,
                0,
                0x04,
                StateError::Invalid("write shut without a shutdown"),
            ),
            (
                T_CLIENT,
                1,
                Suspend::Connecting as u8,
                StateError::Invalid("suspend reasons"),
            ),
            (T_UPSTREAM_SEAL, 0, 1, StateError::Invalid("role")),
            (T_UPSTREAM_SEAL, 1, 2, StateError::Invalid("rekey interval")),
            (
                T_UPSTREAM_SEAL,
                10,
                9,
                StateError::Session(crate::protocol::StateError::Format(9)),
            ),
            (T_IDENT, 0, 0x04, StateError::Invalid("identity flags")),
            (T_TUNNEL, 2, b' ', StateError::Invalid("tunnel")),
        ];
        for (tag, off, value, want) in cases {
            let mut b = good.clone();
            let at = field_at(&b, *tag) + off;
            b[at] = *value;
            assert_eq!(
                &ConnState::decode(&b).unwrap_err(),
                want,
                "field {tag:#x}+{off}"
            );
        }
        // A buffer length beyond the bound, and one beyond the field.
        let mut b = good.clone();
        let at = field_at(&b, T_CLIENT) + 18;
        b[at..at + 4].copy_from_slice(&(MAX_BUFFER as u32 + 1).to_be_bytes());
        assert_eq!(
            ConnState::decode(&b).unwrap_err(),
            StateError::Invalid("buffer length")
        );
        b[at..at + 4].copy_from_slice(&1000u32.to_be_bytes());
        assert_eq!(ConnState::decode(&b).unwrap_err(), StateError::Truncated);
        // Raw bytes on the plain client side.
        let mut st = state(Mode::Encrypt);
        st.core.client.raw_in = Zeroizing::new(vec![1]);
        assert_eq!(
            ConnState::decode(&st.encode()).unwrap_err(),
            StateError::Invalid("raw bytes on a plain side")
        );
        // A "partial" record as long as a whole one.
        let mut st = state(Mode::Decrypt);
        st.core.client.raw_in = Zeroizing::new(vec![1; MAX_RECORD_LEN]);
        assert_eq!(
            ConnState::decode(&st.encode()).unwrap_err(),
            StateError::Invalid("partial record")
        );
    }

    #[test]
    fn unknown_repeated_and_missing_fields_are_refused() {
        let good = state(Mode::Forward).encode();
        // Appends a field, keeping the length right.
        let with = |extra: &[u8]| {
            let mut b = good.to_vec();
            b.extend_from_slice(extra);
            let len = (b.len() - 10) as u32;
            b[6..10].copy_from_slice(&len.to_be_bytes());
            b
        };
        let unknown = with(&[0x7f, 0, 0, 0, 1, 0]);
        assert_eq!(
            ConnState::decode(&unknown).unwrap_err(),
            StateError::UnknownField(0x7f)
        );
        let twice = with(&[T_SHARD, 0, 0, 0, 4, 0, 0, 0, 1]);
        assert_eq!(
            ConnState::decode(&twice).unwrap_err(),
            StateError::Repeated("shard")
        );
        // Without the core (rewrite its tag to an unknown one and drop it from the end).
        let at = field_at(&good, T_CORE) - 5;
        let len = u32::from_be_bytes(good[at + 1..at + 5].try_into().unwrap()) as usize;
        let mut without = good[..at].to_vec();
        without.extend_from_slice(&good[at + 5 + len..]);
        let total = (without.len() - 10) as u32;
        without[6..10].copy_from_slice(&total.to_be_bytes());
        assert_eq!(
            ConnState::decode(&without).unwrap_err(),
            StateError::Missing("core")
        );
    }

    #[test]
    fn flipped_bits_never_panic() {
        let good = state(Mode::Decrypt).encode();
        // Every bit of the fixed fields (the buffers' bytes are opaque).
        let end = field_at(&good, T_CLIENT) + 40;
        for i in 0..end * 8 {
            let mut b = good.to_vec();
            b[i / 8] ^= 1 << (i % 8);
            let _ = ConnState::decode(&b);
        }
        let seal = field_at(&good, T_CLIENT_SEAL);
        for i in seal * 8..good.len().min(seal + 140) * 8 {
            let mut b = good.to_vec();
            b[i / 8] ^= 1 << (i % 8);
            let _ = ConnState::decode(&b);
        }
    }
}
