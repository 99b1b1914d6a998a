//! The handshake of protocol version 2, both roles, as sans-I/O state machines.
//!
//! Three messages (layouts with byte offsets in docs/PROTOCOL.md, "Handshake"):
//!
//! ```text
//! initiator -> responder  HelloI   = version | flags | key id | nonce_i | [eph_i] | mac_i
//! responder -> initiator  HelloR   = version | flags | nonce_r | [eph_r] | mac_r
//! initiator -> responder  Finished = HMAC(initiator_finished_key, th)
//! ```
//!
//! `mac_i` is HMAC-SHA256 under the key's hello-MAC subkey over the initiator hello, so the
//! responder checks it with one HMAC before spending anything else. `mac_r` is keyed from the
//! handshake's key schedule, which takes in the PSK's secret subkey, both nonces and (with
//! forward secrecy) the X25519 result: a valid `mac_r` proves the responder holds the key and
//! computed the same shared secret (key confirmation in both directions, with Finished).
//!
//! Consumption contract: [`Handshake::advance`] is given all bytes received from the peer that
//! have not been consumed yet. `Status::NeedMore` consumes nothing: the caller keeps every byte
//! and calls again with the same bytes plus whatever arrives next. `Status::Done { consumed }`
//! says the first `consumed` bytes of that input were handshake; the rest (records the
//! initiator pipelined after Finished) belong to the record layer. The whole handshake reads at
//! most [`Handshake::max_message_len`] bytes, so a caller can bound its buffer.
//!
//! Invariants: the responder sends nothing, and takes no ephemeral key from its
//! [`EphemeralSource`], until the initiator's hello verifies under a loaded key and meets its
//! forward-secrecy policy; it is Done only after Finished verifies, so a replayed session never
//! reaches the backend; every failure is final (later calls return the same error); no panic on
//! any input; every secret of the key schedule is zeroed when dropped, except the HMAC/HKDF key
//! schedules ring keeps in its own types.

use std::fmt;
use std::mem;
use std::str::FromStr;
use std::sync::Arc;

use ring::{digest, hkdf, hmac};
use zeroize::Zeroizing;

use super::aead::AeadKind;
use super::ephemeral::{EphemeralKey, EphemeralSource, KeysFromRng, PUBLIC_KEY_LEN};
use super::error::ProtocolError;
use super::kdf::{
    LABEL_I2R, LABEL_INITIATOR_FINISHED, LABEL_R2I, LABEL_RESPONDER_FINISHED, expand_label,
};
use super::keys::{KEY_ID_LEN, Key, KeyId, KeySet, RandomSource};
use super::record::{Opener, Sealer, Secret};

/// The protocol version this implementation speaks, first byte of both hellos.
pub const VERSION: u8 = 2;
/// A first byte from 1 to this is read as another sealpipe version (`Version`); anything else
/// as another protocol altogether (`NotSealpipe`).
pub const MAX_PLAUSIBLE_VERSION: u8 = 15;
/// Flags bit 0: ephemeral X25519 (forward secrecy). Other bits must be zero.
pub const FLAG_FORWARD_SECRECY: u8 = 0x01;
/// Length of each side's random nonce.
pub const NONCE_LEN: usize = 32;
/// Length of every handshake MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// Length of the Finished message.
pub const FINISHED_LEN: usize = MAC_LEN;

/// Length of the initiator hello: 74 bytes, or 106 with forward secrecy.
pub const fn hello_i_len(forward_secrecy: bool) -> usize {
    2 + KEY_ID_LEN + NONCE_LEN + if forward_secrecy { PUBLIC_KEY_LEN } else { 0 } + MAC_LEN
}

/// Length of the responder hello: 66 bytes, or 98 with forward secrecy.
pub const fn hello_r_len(forward_secrecy: bool) -> usize {
    2 + NONCE_LEN + if forward_secrecy { PUBLIC_KEY_LEN } else { 0 } + MAC_LEN
}

const MAX_HELLO_I: usize = hello_i_len(true);
const MAX_HELLO_R: usize = hello_r_len(true);

/// A side's forward-secrecy policy (`forward_secrecy = "require" | "allow" | "off"`).
///
/// The initiator offers an ephemeral X25519 key unless the policy is `Off`; the responder
/// refuses an initiator that offers none only under `Require`. `Allow` and `Off` differ only in
/// what the proxy says about a session without forward secrecy (a warning under `Allow`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ForwardSecrecy {
    /// Offer forward secrecy; as a responder, refuse sessions without it (the default).
    #[default]
    Require,
    /// Offer forward secrecy; as a responder, accept sessions without it too (and say so).
    Allow,
    /// Do not offer forward secrecy; as a responder, accept sessions either way, quietly.
    Off,
}

impl ForwardSecrecy {
    /// Every policy, strongest first.
    pub const ALL: [ForwardSecrecy; 3] = [
        ForwardSecrecy::Require,
        ForwardSecrecy::Allow,
        ForwardSecrecy::Off,
    ];

    /// Whether an initiator with this policy sends an ephemeral key.
    pub fn offers(self) -> bool {
        self != ForwardSecrecy::Off
    }

    /// Whether a responder with this policy refuses a hello without an ephemeral key.
    pub fn requires(self) -> bool {
        self == ForwardSecrecy::Require
    }

    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardSecrecy::Require => "require",
            ForwardSecrecy::Allow => "allow",
            ForwardSecrecy::Off => "off",
        }
    }
}

impl fmt::Display for ForwardSecrecy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A forward-secrecy policy other than `require`, `allow` or `off`.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("unknown forward-secrecy policy {0:?} (expected \"require\", \"allow\" or \"off\")")]
pub struct UnknownForwardSecrecy(pub String);

impl FromStr for ForwardSecrecy {
    type Err = UnknownForwardSecrecy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ForwardSecrecy::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownForwardSecrecy(s.to_owned()))
    }
}

/// What a handshake needs from configuration.
#[derive(Clone, Debug)]
pub struct HandshakeConfig {
    /// Keys: the initiator sends with the primary, the responder accepts any.
    pub keys: Arc<KeySet>,
    /// Whether to offer (initiator) or require (responder) an ephemeral X25519 exchange.
    pub forward_secrecy: ForwardSecrecy,
    /// Backend for the session's records (wire-compatible either way).
    pub aead: AeadKind,
}

/// The keys and facts of an established session.
pub struct Session {
    /// Seals what this side sends.
    pub sealer: Sealer,
    /// Opens what this side receives.
    pub opener: Opener,
    /// The pre-shared key the session was authenticated with.
    pub key_id: KeyId,
    /// Whether an ephemeral X25519 exchange went into the keys.
    pub forward_secrecy: bool,
}

impl Session {
    /// Drops both directions' expanded AEAD keys until the next record needs them (see
    /// [`Sealer::hibernate`]); what stays is the traffic secrets, IVs and counters, a few
    /// dozen bytes per direction. Returns true if any key was dropped.
    pub fn hibernate(&mut self) -> bool {
        // Both, not short-circuited.
        self.sealer.hibernate() | self.opener.hibernate()
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("sealer", &self.sealer)
            .field("opener", &self.opener)
            .field("key_id", &self.key_id)
            .field("forward_secrecy", &self.forward_secrecy)
            .finish()
    }
}

/// Progress of [`Handshake::advance`].
// `Done` carries the session by value: it is returned once per connection and moved straight
// into the connection's state, so boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Status {
    /// More bytes are needed; nothing was consumed (call again with the same input plus more).
    NeedMore,
    /// The handshake is complete: the first `consumed` bytes of `input` were handshake bytes.
    Done {
        /// Handshake bytes at the start of `input`.
        consumed: usize,
        /// The established session.
        session: Session,
    },
}

/// One side of a handshake.
pub struct Handshake {
    state: State,
    key_id: Option<KeyId>,
    peer_version: Option<u8>,
}

enum State {
    InitiatorWaitHello(Box<InitiatorWait>),
    ResponderWaitHello {
        keys: Arc<KeySet>,
        policy: ForwardSecrecy,
        aead: AeadKind,
    },
    ResponderWaitFinished(Box<ResponderWait>),
    Done,
    Failed(ProtocolError),
}

struct InitiatorWait {
    /// Shared with the configuration: the primary key is used where it lies, never copied.
    keys: Arc<KeySet>,
    flags: u8,
    hello_i: [u8; MAX_HELLO_I],
    nonce_i: [u8; NONCE_LEN],
    eph: Option<Box<EphemeralKey>>,
    aead: AeadKind,
}

struct ResponderWait {
    /// Bytes of input taken by the initiator hello; Finished follows them.
    offset: usize,
    finished_key: hmac::Key,
    th: [u8; 32],
    session: Session,
}

impl Handshake {
    /// Starts the initiator (encrypt side) and appends its hello to `out`. With forward
    /// secrecy the ephemeral key is drawn from `rng` ([`EphemeralKey::from_rng`]).
    pub fn initiator(
        cfg: &HandshakeConfig,
        rng: &mut dyn RandomSource,
        out: &mut Vec<u8>,
    ) -> Handshake {
        Self::initiator_with(cfg, rng, None, out)
    }

    /// [`Handshake::initiator`] with an ephemeral key made ahead of time (see
    /// [`super::EphemeralPool`]); without one, or if forward secrecy is off, it behaves exactly
    /// like `initiator`.
    pub fn initiator_with(
        cfg: &HandshakeConfig,
        rng: &mut dyn RandomSource,
        eph: Option<Box<EphemeralKey>>,
        out: &mut Vec<u8>,
    ) -> Handshake {
        let keys = Arc::clone(&cfg.keys);
        let key = keys.primary();
        let key_id = key.id();
        let fs = cfg.forward_secrecy.offers();
        let flags = if fs { FLAG_FORWARD_SECRECY } else { 0 };
        let mut nonce_i = [0u8; NONCE_LEN];
        rng.fill(&mut nonce_i);
        let mut hello_i = [0u8; MAX_HELLO_I];
        let mut w = Writer::new(&mut hello_i);
        w.put(&[VERSION, flags]);
        w.put(key_id.as_bytes());
        w.put(&nonce_i);
        let eph = fs.then(|| {
            let eph = eph.unwrap_or_else(|| Box::new(EphemeralKey::from_rng(rng)));
            w.put(eph.public());
            eph
        });
        let body = w.len();
        let tag = hmac::sign(key.hello_mac(), &hello_i[..body]);
        hello_i[body..body + MAC_LEN].copy_from_slice(tag.as_ref());
        out.extend_from_slice(&hello_i[..hello_i_len(fs)]);
        Handshake {
            key_id: Some(key_id),
            peer_version: None,
            state: State::InitiatorWaitHello(Box::new(InitiatorWait {
                keys,
                flags,
                hello_i,
                nonce_i,
                eph,
                aead: cfg.aead,
            })),
        }
    }

    /// Starts the responder (decrypt side); it speaks only after a valid initiator hello, and
    /// takes an ephemeral key only then.
    pub fn responder(cfg: &HandshakeConfig) -> Handshake {
        Handshake {
            key_id: None,
            peer_version: None,
            state: State::ResponderWaitHello {
                keys: Arc::clone(&cfg.keys),
                policy: cfg.forward_secrecy,
                aead: cfg.aead,
            },
        }
    }

    /// The most bytes `advance` reads from the peer over the whole handshake (the responder's
    /// hello plus Finished: 138). A caller that buffers at least this much never stalls one.
    pub fn max_message_len() -> usize {
        MAX_HELLO_I + FINISHED_LEN
    }

    /// The key id this handshake uses: the primary's for an initiator, the one named by the
    /// peer's hello for a responder (once parsed; also after a failure, for the log line).
    pub fn key_id(&self) -> Option<KeyId> {
        self.key_id
    }

    /// After a `Version` failure: the version byte the peer sent (for the log line).
    pub fn peer_version(&self) -> Option<u8> {
        self.peer_version
    }

    /// Feeds the peer's unconsumed bytes; appends anything to send to `out`. A responder that
    /// needs an ephemeral key draws it from `rng` ([`KeysFromRng`]).
    ///
    /// See the module doc for the consumption contract. Errors are final: the connection must
    /// close, and later calls return the same error. Calling again after `Done` is `Malformed`.
    pub fn advance(
        &mut self,
        input: &[u8],
        rng: &mut dyn RandomSource,
        out: &mut Vec<u8>,
    ) -> Result<Status, ProtocolError> {
        self.advance_with(input, rng, &mut KeysFromRng, out)
    }

    /// [`Handshake::advance`] for a responder that takes its ephemeral key from `keys` (a
    /// shard's pool of keys made ahead of time), which it does only once the initiator's hello
    /// has verified and met the policy. An initiator ignores `keys`.
    pub fn advance_with(
        &mut self,
        input: &[u8],
        rng: &mut dyn RandomSource,
        keys: &mut dyn EphemeralSource,
        out: &mut Vec<u8>,
    ) -> Result<Status, ProtocolError> {
        let result = self.step(input, rng, keys, out);
        if let Err(e) = result {
            if e == ProtocolError::Version && self.peer_version.is_none() {
                self.peer_version = input.first().copied();
            }
            self.state = State::Failed(e);
        }
        result
    }

    fn step(
        &mut self,
        input: &[u8],
        rng: &mut dyn RandomSource,
        keys: &mut dyn EphemeralSource,
        out: &mut Vec<u8>,
    ) -> Result<Status, ProtocolError> {
        match &mut self.state {
            State::Failed(e) => Err(*e),
            State::Done => Err(ProtocolError::Malformed),
            State::InitiatorWaitHello(w) => {
                let Some((consumed, session, finished)) = initiator_on_hello(w, input)? else {
                    return Ok(Status::NeedMore);
                };
                out.extend_from_slice(&finished);
                self.state = State::Done;
                Ok(Status::Done { consumed, session })
            }
            State::ResponderWaitHello {
                keys: loaded,
                policy,
                aead,
            } => {
                let Some(hello) = parse_hello_i(input)? else {
                    return Ok(Status::NeedMore);
                };
                self.key_id = Some(hello.key_id);
                let wait = responder_on_hello(loaded, *policy, *aead, &hello, keys, rng, out)?;
                self.state = State::ResponderWaitFinished(wait);
                // Finished cannot have arrived yet (the initiator needs our hello first), but
                // checking costs nothing and keeps the contract simple.
                self.step(input, rng, keys, out)
            }
            State::ResponderWaitFinished(w) => {
                let Some(got) = input.get(w.offset..w.offset + FINISHED_LEN) else {
                    return Ok(Status::NeedMore);
                };
                if hmac::verify(&w.finished_key, &w.th, got).is_err() {
                    return Err(ProtocolError::Replay);
                }
                let consumed = w.offset + FINISHED_LEN;
                let State::ResponderWaitFinished(w) = mem::replace(&mut self.state, State::Done)
                else {
                    return Err(ProtocolError::Malformed);
                };
                Ok(Status::Done {
                    consumed,
                    session: w.session,
                })
            }
        }
    }
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::InitiatorWaitHello(_) => "initiator: wait hello",
            State::ResponderWaitHello { .. } => "responder: wait hello",
            State::ResponderWaitFinished(_) => "responder: wait finished",
            State::Done => "done",
            State::Failed(_) => "failed",
        };
        f.debug_struct("Handshake")
            .field("state", &state)
            .field("key_id", &self.key_id)
            .finish()
    }
}

/// A parsed initiator hello (MAC not yet verified).
struct HelloI<'a> {
    bytes: &'a [u8],
    flags: u8,
    key_id: KeyId,
    nonce_i: [u8; NONCE_LEN],
    eph_i: Option<[u8; PUBLIC_KEY_LEN]>,
    mac: &'a [u8],
}

/// Parses the initiator hello at the start of `input`; `None` if it is not all there yet.
/// Checks the version as soon as one byte is in, and flags as soon as two are.
fn parse_hello_i(input: &[u8]) -> Result<Option<HelloI<'_>>, ProtocolError> {
    let Some(fs) = check_prefix(input, None)? else {
        return Ok(None);
    };
    let Some(bytes) = input.get(..hello_i_len(fs)) else {
        return Ok(None);
    };
    let mut r = Reader::new(bytes);
    let (_, flags) = (r.u8()?, r.u8()?);
    let key_id = KeyId(r.array()?);
    let nonce_i = r.array()?;
    let eph_i = if fs { Some(r.array()?) } else { None };
    let mac = r.take(MAC_LEN)?;
    Ok(Some(HelloI {
        bytes,
        flags,
        key_id,
        nonce_i,
        eph_i,
        mac,
    }))
}

/// The error for a first byte that is not our version.
fn version_error(v: u8) -> ProtocolError {
    if (1..=MAX_PLAUSIBLE_VERSION).contains(&v) {
        ProtocolError::Version
    } else {
        ProtocolError::NotSealpipe
    }
}

/// Checks version and flags of a hello prefix. `expect_flags`: the responder hello must echo
/// the initiator's flags exactly. Returns whether forward secrecy is on, or `None` if fewer than
/// two bytes are in.
fn check_prefix(input: &[u8], expect_flags: Option<u8>) -> Result<Option<bool>, ProtocolError> {
    match input {
        [] => Ok(None),
        [v, ..] if *v != VERSION => Err(version_error(*v)),
        [_] => Ok(None),
        [_, flags, ..] => {
            let ok = match expect_flags {
                Some(want) => *flags == want,
                None => flags & !FLAG_FORWARD_SECRECY == 0,
            };
            if ok {
                Ok(Some(flags & FLAG_FORWARD_SECRECY != 0))
            } else {
                Err(ProtocolError::Malformed)
            }
        }
    }
}

fn responder_on_hello(
    loaded: &KeySet,
    policy: ForwardSecrecy,
    aead: AeadKind,
    hello: &HelloI<'_>,
    source: &mut dyn EphemeralSource,
    rng: &mut dyn RandomSource,
    out: &mut Vec<u8>,
) -> Result<Box<ResponderWait>, ProtocolError> {
    let key = loaded.get(&hello.key_id).ok_or(ProtocolError::UnknownKey)?;
    let body = &hello.bytes[..hello.bytes.len() - MAC_LEN];
    if hmac::verify(key.hello_mac(), body, hello.mac).is_err() {
        return Err(ProtocolError::BadMac);
    }
    // Policy is checked after the MAC, so an unauthenticated peer learns nothing about it.
    if policy.requires() && hello.eph_i.is_none() {
        return Err(ProtocolError::ForwardSecrecyRequired);
    }
    let mut nonce_r = [0u8; NONCE_LEN];
    rng.fill(&mut nonce_r);
    let mut hello_r = [0u8; MAX_HELLO_R];
    let mut w = Writer::new(&mut hello_r);
    w.put(&[VERSION, hello.flags]);
    w.put(&nonce_r);
    let dh = match &hello.eph_i {
        Some(eph_i) => {
            // The first and only X25519 work a responder does for a hello: it verified.
            let eph = source.ephemeral(rng);
            w.put(eph.public());
            Some(eph.agree(eph_i)?)
        }
        None => None,
    };
    let body_r = w.len();
    let schedule = Schedule::new(key, &hello.nonce_i, &nonce_r, dh.as_deref());
    let mut transcript = digest::Context::new(&digest::SHA256);
    transcript.update(hello.bytes);
    transcript.update(&hello_r[..body_r]);
    let th_r = hash(transcript.clone());
    let mac_r = hmac::sign(&schedule.mac_key(LABEL_RESPONDER_FINISHED, &th_r), &th_r);
    hello_r[body_r..body_r + MAC_LEN].copy_from_slice(mac_r.as_ref());
    transcript.update(mac_r.as_ref());
    let th = hash(transcript);
    out.extend_from_slice(&hello_r[..body_r + MAC_LEN]);
    let (i2r, r2i) = schedule.traffic(&th);
    Ok(Box::new(ResponderWait {
        offset: hello.bytes.len(),
        finished_key: schedule.mac_key(LABEL_INITIATOR_FINISHED, &th),
        th,
        session: Session {
            sealer: Sealer::new(aead, r2i, false),
            opener: Opener::new(aead, i2r, true),
            key_id: key.id(),
            forward_secrecy: dh.is_some(),
        },
    }))
}

/// On the responder hello: `(bytes consumed, session, Finished to send)`.
fn initiator_on_hello(
    w: &mut InitiatorWait,
    input: &[u8],
) -> Result<Option<(usize, Session, [u8; FINISHED_LEN])>, ProtocolError> {
    let Some(fs) = check_prefix(input, Some(w.flags))? else {
        return Ok(None);
    };
    let len = hello_r_len(fs);
    let Some(hello_r) = input.get(..len) else {
        return Ok(None);
    };
    let hello_i = &w.hello_i[..hello_i_len(fs)];
    let mut r = Reader::new(hello_r);
    r.take(2)?;
    let nonce_r: [u8; NONCE_LEN] = r.array()?;
    let eph_r: Option<[u8; PUBLIC_KEY_LEN]> = if fs { Some(r.array()?) } else { None };
    let mac_r = r.take(MAC_LEN)?;
    let dh = match (eph_r, w.eph.take()) {
        (Some(peer), Some(eph)) => Some(eph.agree(&peer)?),
        (None, None) => None,
        // Flags were checked equal, so this cannot happen; refuse rather than panic.
        _ => return Err(ProtocolError::Malformed),
    };
    let key = w.keys.primary();
    let schedule = Schedule::new(key, &w.nonce_i, &nonce_r, dh.as_deref());
    let mut transcript = digest::Context::new(&digest::SHA256);
    transcript.update(hello_i);
    transcript.update(&hello_r[..len - MAC_LEN]);
    let th_r = hash(transcript.clone());
    // mac_r is keyed from the schedule: it verifies only if the responder holds the key and
    // derived the same X25519 result.
    let r_key = schedule.mac_key(LABEL_RESPONDER_FINISHED, &th_r);
    if hmac::verify(&r_key, &th_r, mac_r).is_err() {
        return Err(ProtocolError::BadMac);
    }
    transcript.update(mac_r);
    let th = hash(transcript);
    let mut finished = [0u8; FINISHED_LEN];
    finished.copy_from_slice(
        hmac::sign(&schedule.mac_key(LABEL_INITIATOR_FINISHED, &th), &th).as_ref(),
    );
    let (i2r, r2i) = schedule.traffic(&th);
    let session = Session {
        sealer: Sealer::new(w.aead, i2r, true),
        opener: Opener::new(w.aead, r2i, false),
        key_id: key.id(),
        forward_secrecy: fs,
    };
    Ok(Some((len, session, finished)))
}

/// The handshake's key schedule:
/// `PRK = HKDF-Extract(salt = nonce_i || nonce_r, IKM = psk_secret || dh)`; every handshake
/// key and traffic secret is `HKDF-Expand-Label(PRK, label, transcript hash, 32)`.
struct Schedule {
    prk: hkdf::Prk,
}

impl Schedule {
    fn new(
        key: &Key,
        nonce_i: &[u8; NONCE_LEN],
        nonce_r: &[u8; NONCE_LEN],
        dh: Option<&[u8; 32]>,
    ) -> Schedule {
        let mut salt = [0u8; 2 * NONCE_LEN];
        salt[..NONCE_LEN].copy_from_slice(nonce_i);
        salt[NONCE_LEN..].copy_from_slice(nonce_r);
        let mut ikm = Zeroizing::new([0u8; 64]);
        ikm[..32].copy_from_slice(key.psk_secret());
        let ikm_len = match dh {
            Some(dh) => {
                ikm[32..].copy_from_slice(dh);
                64
            }
            None => 32,
        };
        Schedule {
            prk: hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(&ikm[..ikm_len]),
        }
    }

    /// An HMAC key (responder or initiator finished) bound to a transcript hash.
    fn mac_key(&self, label: &[u8], th: &[u8; 32]) -> hmac::Key {
        let mut k = Zeroizing::new([0u8; 32]);
        expand_label(&self.prk, label, th, &mut k[..]);
        hmac::Key::new(hmac::HMAC_SHA256, &k[..])
    }

    /// The first traffic secrets: (initiator to responder, responder to initiator).
    fn traffic(&self, th: &[u8; 32]) -> (Secret, Secret) {
        let mut i2r = Secret::new([0u8; 32]);
        let mut r2i = Secret::new([0u8; 32]);
        expand_label(&self.prk, LABEL_I2R, th, &mut i2r[..]);
        expand_label(&self.prk, LABEL_R2I, th, &mut r2i[..]);
        (i2r, r2i)
    }
}

fn hash(ctx: digest::Context) -> [u8; 32] {
    let mut th = [0u8; 32];
    th.copy_from_slice(ctx.finish().as_ref());
    th
}

/// A checked reader over untrusted bytes: every read is bounds-checked and a short read is
/// `Malformed`, never a panic.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        let (head, tail) = self
            .buf
            .split_at_checked(n)
            .ok_or(ProtocolError::Malformed)?;
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>()?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        self.take(N)?
            .try_into()
            .map_err(|_| ProtocolError::Malformed)
    }
}

/// A bounded writer into a fixed array (no allocation while building messages).
struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Writer<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, len: 0 }
    }

    /// Appends `bytes`; false (and nothing written) if they do not fit.
    fn put(&mut self, bytes: &[u8]) -> bool {
        match self.buf.get_mut(self.len..self.len + bytes.len()) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.len += bytes.len();
                true
            }
            None => false,
        }
    }

    fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::OpenInfo;
    use crate::ephemeral::EphemeralPool;
    use crate::record::{HEADER_LEN, RecordType, record_len_for};

    /// Deterministic randomness: a counter-mode stream from a seed.
    struct TestRng(u8);
    impl RandomSource for TestRng {
        fn fill(&mut self, dst: &mut [u8]) {
            for b in dst {
                *b = self.0;
                self.0 = self.0.wrapping_mul(31).wrapping_add(7);
            }
        }
    }

    /// A key source that counts what it hands out.
    #[derive(Default)]
    struct Counting(usize);
    impl EphemeralSource for Counting {
        fn ephemeral(&mut self, rng: &mut dyn RandomSource) -> Box<EphemeralKey> {
            self.0 += 1;
            Box::new(EphemeralKey::from_rng(rng))
        }
    }

    fn cfg(keys: &[[u8; 32]], fs: ForwardSecrecy) -> HandshakeConfig {
        let mut ks = keys.iter().map(|k| Key::from_bytes(*k));
        let primary = ks.next().unwrap();
        HandshakeConfig {
            keys: Arc::new(KeySet::new(primary, ks.collect())),
            forward_secrecy: fs,
            aead: AeadKind::Ring,
        }
    }

    use ForwardSecrecy::{Allow, Off, Require};

    /// Runs a full handshake, feeding bytes one at a time to exercise NeedMore.
    fn run(
        ic: &HandshakeConfig,
        rc: &HandshakeConfig,
    ) -> Result<(Session, Session), ProtocolError> {
        let mut rng = TestRng(1);
        let mut to_r = Vec::new();
        let mut i = Handshake::initiator(ic, &mut rng, &mut to_r);
        let mut r = Handshake::responder(rc);
        let mut to_i = Vec::new();
        for n in 1..to_r.len() {
            assert!(matches!(
                r.advance(&to_r[..n], &mut rng, &mut to_i)?,
                Status::NeedMore
            ));
            assert!(
                to_i.is_empty(),
                "responder spoke before the hello was complete"
            );
        }
        assert!(matches!(
            r.advance(&to_r, &mut rng, &mut to_i)?,
            Status::NeedMore
        ));
        for n in 1..to_i.len() {
            assert!(matches!(
                i.advance(&to_i[..n], &mut rng, &mut to_r)?,
                Status::NeedMore
            ));
        }
        let hello_len = to_r.len();
        let Status::Done {
            consumed,
            session: si,
        } = i.advance(&to_i, &mut rng, &mut to_r)?
        else {
            panic!("initiator not done");
        };
        assert_eq!(consumed, to_i.len());
        let mut last = Err(ProtocolError::Truncated);
        for n in hello_len + 1..=to_r.len() {
            last = r.advance(&to_r[..n], &mut rng, &mut to_i);
        }
        let Status::Done {
            consumed,
            session: sr,
        } = last?
        else {
            panic!("responder not done");
        };
        assert_eq!(consumed, to_r.len());
        Ok((si, sr))
    }

    fn seal(s: &mut Session, ty: RecordType, msg: &[u8]) -> Vec<u8> {
        let mut rec = vec![0u8; record_len_for(msg.len())];
        rec[HEADER_LEN..HEADER_LEN + msg.len()].copy_from_slice(msg);
        s.sealer.seal_in_place(ty, &mut rec, msg.len()).unwrap();
        rec
    }

    /// `a` sends b"ping" to `b` (after the OPEN the initiator's first record must be).
    fn exchange(a: &mut Session, b: &mut Session) {
        if a.sealer.open_due() {
            let mut open = [0u8; crate::control::MAX_OPEN_LEN];
            let n = OpenInfo::default().encode(&mut open);
            let mut rec = seal(a, RecordType::Open, &open[..n]);
            assert_eq!(
                b.opener.open_in_place(&mut rec).unwrap().0,
                RecordType::Open
            );
        }
        let mut rec = seal(a, RecordType::Data, b"ping");
        let (ty, range) = b.opener.open_in_place(&mut rec).unwrap();
        assert_eq!((ty, &rec[range]), (RecordType::Data, &b"ping"[..]));
    }

    #[test]
    fn handshake_both_modes_and_both_directions() {
        for fs in ForwardSecrecy::ALL {
            let (mut i, mut r) = run(&cfg(&[[1; 32]], fs), &cfg(&[[1; 32]], Off)).unwrap();
            assert_eq!(i.forward_secrecy, fs.offers());
            assert_eq!(r.forward_secrecy, fs.offers());
            assert_eq!(i.key_id, r.key_id);
            exchange(&mut i, &mut r);
            exchange(&mut r, &mut i);
        }
    }

    #[test]
    fn sessions_hibernate_both_directions_and_keep_talking() {
        let (mut i, mut r) = run(&cfg(&[[1; 32]], Require), &cfg(&[[1; 32]], Require)).unwrap();
        exchange(&mut i, &mut r);
        for _ in 0..2 {
            assert!(i.hibernate());
            assert!(i.sealer.is_hibernating() && i.opener.is_hibernating());
            assert!(!i.hibernate(), "nothing left to drop");
            assert!(r.hibernate());
            exchange(&mut i, &mut r);
            exchange(&mut r, &mut i);
            assert!(!i.sealer.is_hibernating() && !i.opener.is_hibernating());
        }
        // One direction used since: only its keys come back, and only they are dropped again.
        assert!(i.hibernate() && r.hibernate());
        exchange(&mut i, &mut r);
        assert!(!i.sealer.is_hibernating() && i.opener.is_hibernating());
        assert!(i.hibernate());
    }

    #[test]
    fn responder_accepts_any_loaded_key() {
        let (mut i, mut r) = run(
            &cfg(&[[2; 32]], Require),
            &cfg(&[[1; 32], [2; 32]], Require),
        )
        .unwrap();
        assert_eq!(r.key_id, Key::from_bytes([2; 32]).id());
        exchange(&mut i, &mut r);
    }

    #[test]
    fn wrong_or_unknown_key_fails() {
        assert_eq!(
            run(&cfg(&[[1; 32]], Require), &cfg(&[[2; 32]], Require)).unwrap_err(),
            ProtocolError::UnknownKey
        );
        // Same id, different key: impossible in practice (ids derive from keys), so forge the
        // id by sending key 1's id with key 2's MAC.
        let mut rng = TestRng(3);
        let mut hello = Vec::new();
        Handshake::initiator(&cfg(&[[2; 32]], Require), &mut rng, &mut hello);
        hello[2..10].copy_from_slice(Key::from_bytes([1; 32]).id().as_bytes());
        let mut r = Handshake::responder(&cfg(&[[1; 32]], Require));
        let mut out = Vec::new();
        assert_eq!(
            r.advance(&hello, &mut rng, &mut out).unwrap_err(),
            ProtocolError::BadMac
        );
        assert!(out.is_empty());
        // Failure is final.
        assert_eq!(
            r.advance(&hello, &mut rng, &mut out).unwrap_err(),
            ProtocolError::BadMac
        );
    }

    #[test]
    fn version_flags_and_policy() {
        let mut rng = TestRng(4);
        let mut out = Vec::new();
        // Another sealpipe version, or not sealpipe at all: named apart, at the first byte.
        for (first, want) in [
            (1u8, ProtocolError::Version),
            (3, ProtocolError::Version),
            (15, ProtocolError::Version),
            (0, ProtocolError::NotSealpipe),
            (16, ProtocolError::NotSealpipe),
            (b'G', ProtocolError::NotSealpipe),
            (0x16, ProtocolError::NotSealpipe),
        ] {
            let mut r = Handshake::responder(&cfg(&[[1; 32]], Require));
            assert_eq!(r.advance(&[first], &mut rng, &mut out).unwrap_err(), want);
            let seen = (want == ProtocolError::Version).then_some(first);
            assert_eq!(r.peer_version(), seen);
        }
        let mut r = Handshake::responder(&cfg(&[[1; 32]], Require));
        assert_eq!(
            r.advance(&[VERSION, 0x80], &mut rng, &mut out).unwrap_err(),
            ProtocolError::Malformed
        );
        // A responder that requires forward secrecy refuses an initiator without it, and says
        // so precisely; one that allows it or has it off accepts.
        assert_eq!(
            run(&cfg(&[[1; 32]], Off), &cfg(&[[1; 32]], Require)).unwrap_err(),
            ProtocolError::ForwardSecrecyRequired
        );
        for policy in [Allow, Off] {
            let (i, r) = run(&cfg(&[[1; 32]], Off), &cfg(&[[1; 32]], policy)).unwrap();
            assert!(!i.forward_secrecy && !r.forward_secrecy);
        }
        assert!(out.is_empty());
        // The initiator reads the responder's first byte the same way.
        let mut to_r = Vec::new();
        let mut i = Handshake::initiator(&cfg(&[[1; 32]], Require), &mut rng, &mut to_r);
        assert_eq!(
            i.advance(b"-ERR unknown command", &mut rng, &mut out)
                .unwrap_err(),
            ProtocolError::NotSealpipe
        );
    }

    #[test]
    fn no_ephemeral_key_is_taken_before_the_hello_verifies() {
        let rc = cfg(&[[1; 32]], Require);
        let mut rng = TestRng(8);
        let mut valid = Vec::new();
        Handshake::initiator(&cfg(&[[1; 32]], Require), &mut rng, &mut valid);
        let mut wrong_key = Vec::new();
        Handshake::initiator(&cfg(&[[2; 32]], Require), &mut rng, &mut wrong_key);
        let mut bad_mac = valid.clone();
        bad_mac[50] ^= 1;
        let mut no_fs = Vec::new();
        Handshake::initiator(&cfg(&[[1; 32]], Off), &mut rng, &mut no_fs);
        let garbage: Vec<u8> = (0..200u8).collect();
        let mut keys = Counting::default();
        for (input, want) in [
            (&garbage[..], ProtocolError::NotSealpipe),
            (&b"\x02\x01"[..], ProtocolError::Truncated),
            (&valid[..valid.len() - 1], ProtocolError::Truncated),
            (&wrong_key[..], ProtocolError::UnknownKey),
            (&bad_mac[..], ProtocolError::BadMac),
            (&no_fs[..], ProtocolError::ForwardSecrecyRequired),
        ] {
            let mut r = Handshake::responder(&rc);
            let mut out = Vec::new();
            match r.advance_with(input, &mut rng, &mut keys, &mut out) {
                Ok(Status::NeedMore) => assert_eq!(want, ProtocolError::Truncated),
                Ok(Status::Done { .. }) => panic!("done on {want:?}"),
                Err(e) => assert_eq!(e, want),
            }
            assert!(out.is_empty(), "the responder answered ({want:?})");
            assert_eq!(
                keys.0, 0,
                "a key was taken for an unverified hello ({want:?})"
            );
        }
        // A valid hello takes exactly one, from the source it is given.
        let mut r = Handshake::responder(&rc);
        let mut out = Vec::new();
        assert!(matches!(
            r.advance_with(&valid, &mut rng, &mut keys, &mut out),
            Ok(Status::NeedMore)
        ));
        assert_eq!(keys.0, 1);
        assert_eq!(out.len(), hello_r_len(true));
        // And none without forward secrecy, where it is allowed.
        let mut r = Handshake::responder(&cfg(&[[1; 32]], Allow));
        let mut out = Vec::new();
        r.advance_with(&no_fs, &mut rng, &mut keys, &mut out)
            .unwrap();
        assert_eq!(keys.0, 1);
    }

    #[test]
    fn low_order_point_is_rejected() {
        let key = Key::from_bytes([1; 32]);
        let mut hello = vec![VERSION, FLAG_FORWARD_SECRECY];
        hello.extend_from_slice(key.id().as_bytes());
        hello.extend_from_slice(&[5; NONCE_LEN]);
        hello.extend_from_slice(&[0; PUBLIC_KEY_LEN]); // the identity: order 1
        let tag = hmac::sign(key.hello_mac(), &hello);
        hello.extend_from_slice(tag.as_ref());
        let mut r = Handshake::responder(&cfg(&[[1; 32]], Require));
        let mut out = Vec::new();
        assert_eq!(
            r.advance(&hello, &mut TestRng(0), &mut out).unwrap_err(),
            ProtocolError::Malformed
        );
        assert!(out.is_empty());
    }

    /// A responder hello made by a holder of the key whose keys come from another X25519
    /// result than the one its public key implies (a broken or malicious responder): version 1's
    /// PSK-only mac_r accepted it and the session failed later; version 2's does not verify.
    #[test]
    fn the_responder_proof_covers_the_dh_result() {
        let c = cfg(&[[1; 32]], Require);
        let mut to_r = Vec::new();
        let mut i = Handshake::initiator(&c, &mut TestRng(1), &mut to_r);
        let hello_i = to_r.clone();
        let eph_i: [u8; 32] = hello_i[42..74].try_into().unwrap();
        let key = Key::from_bytes([1; 32]);
        let sent = EphemeralKey::from_rng(&mut TestRng(40));
        let used = EphemeralKey::from_rng(&mut TestRng(41));
        let nonce_r = [9u8; NONCE_LEN];
        let mut hello_r = vec![VERSION, FLAG_FORWARD_SECRECY];
        hello_r.extend_from_slice(&nonce_r);
        hello_r.extend_from_slice(sent.public());
        let make = |dh: &[u8; 32], hello_r: &[u8]| {
            let s = Schedule::new(
                &key,
                hello_i[10..42].try_into().unwrap(),
                &nonce_r,
                Some(dh),
            );
            let mut t = digest::Context::new(&digest::SHA256);
            t.update(&hello_i);
            t.update(hello_r);
            let th_r = hash(t);
            let mut out = hello_r.to_vec();
            out.extend_from_slice(
                hmac::sign(&s.mac_key(LABEL_RESPONDER_FINISHED, &th_r), &th_r).as_ref(),
            );
            out
        };
        let wrong = make(&used.agree(&eph_i).unwrap(), &hello_r);
        assert_eq!(
            i.advance(&wrong, &mut TestRng(2), &mut Vec::new())
                .unwrap_err(),
            ProtocolError::BadMac
        );
        // The same construction with the right X25519 result completes.
        let mut i = Handshake::initiator(&c, &mut TestRng(1), &mut Vec::new());
        let right = make(&sent.agree(&eph_i).unwrap(), &hello_r);
        assert!(matches!(
            i.advance(&right, &mut TestRng(2), &mut Vec::new()),
            Ok(Status::Done { .. })
        ));
    }

    #[test]
    fn replayed_session_fails_at_finished() {
        let ic = cfg(&[[1; 32]], Require);
        let rc = cfg(&[[1; 32]], Require);
        // Record a genuine session's initiator bytes.
        let mut rng = TestRng(9);
        let mut to_r = Vec::new();
        let mut i = Handshake::initiator(&ic, &mut rng, &mut to_r);
        let mut r = Handshake::responder(&rc);
        let mut to_i = Vec::new();
        r.advance(&to_r, &mut rng, &mut to_i).unwrap();
        i.advance(&to_i, &mut rng, &mut to_r).unwrap();
        // Replay them into a new responder, whose nonce differs.
        let mut r2 = Handshake::responder(&rc);
        let mut sink = Vec::new();
        assert_eq!(
            r2.advance(&to_r, &mut TestRng(77), &mut sink).unwrap_err(),
            ProtocolError::Replay
        );
    }

    #[test]
    fn advance_after_done_is_an_error() {
        let ic = cfg(&[[1; 32]], Off);
        let mut rng = TestRng(5);
        let mut to_r = Vec::new();
        let mut i = Handshake::initiator(&ic, &mut rng, &mut to_r);
        let mut r = Handshake::responder(&ic);
        let mut to_i = Vec::new();
        r.advance(&to_r, &mut rng, &mut to_i).unwrap();
        assert!(matches!(
            i.advance(&to_i, &mut rng, &mut to_r).unwrap(),
            Status::Done { .. }
        ));
        assert_eq!(
            i.advance(&to_i, &mut rng, &mut to_r).unwrap_err(),
            ProtocolError::Malformed
        );
        assert_eq!(Handshake::max_message_len(), 138);
        assert_eq!(hello_i_len(true), 106);
        assert_eq!(hello_r_len(false), 66);
    }

    #[test]
    fn keys_made_ahead_give_the_same_handshake_and_are_used_once() {
        let c = cfg(&[[1; 32]], Require);
        // A key made ahead from the same random stream (nonce, then the key's scalar) gives
        // the hello the handshake would have made itself, byte for byte.
        let mut plain = Vec::new();
        Handshake::initiator(&c, &mut TestRng(3), &mut plain);
        let mut ahead = Vec::new();
        let mut rng = TestRng(3);
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce);
        let key = Box::new(EphemeralKey::from_rng(&mut rng));
        Handshake::initiator_with(&c, &mut TestRng(3), Some(key), &mut ahead);
        assert_eq!(plain, ahead);

        // Both sides on pooled (ring) keys complete and agree; every key is handed out once.
        let mut pool = EphemeralPool::new(3);
        while pool.refill_one() {}
        for _ in 0..4 {
            let mut to_r = Vec::new();
            let mut i =
                Handshake::initiator_with(&c, &mut TestRng(4), Some(pool.take()), &mut to_r);
            let mut r = Handshake::responder(&c);
            let mut to_i = Vec::new();
            r.advance_with(&to_r, &mut TestRng(5), &mut pool, &mut to_i)
                .unwrap();
            let Status::Done {
                session: mut si, ..
            } = i.advance(&to_i, &mut TestRng(6), &mut to_r).unwrap()
            else {
                panic!("initiator not done");
            };
            let Status::Done {
                session: mut sr, ..
            } = r.advance(&to_r, &mut TestRng(7), &mut to_i).unwrap()
            else {
                panic!("responder not done");
            };
            assert!(si.forward_secrecy && sr.forward_secrecy);
            exchange(&mut si, &mut sr);
            exchange(&mut sr, &mut si);
        }
        // 3 came from the pool; the other 5 were made on demand.
        assert_eq!((pool.hits, pool.misses), (3, 5));
        assert!(pool.is_empty());
    }

    #[test]
    fn policies_parse_and_print() {
        for p in ForwardSecrecy::ALL {
            assert_eq!(p.as_str().parse::<ForwardSecrecy>(), Ok(p));
        }
        assert!("true".parse::<ForwardSecrecy>().is_err());
        assert_eq!(ForwardSecrecy::default(), Require);
        assert!(Require.offers() && Allow.offers() && !Off.offers());
        assert!(Require.requires() && !Allow.requires() && !Off.requires());
    }
}
