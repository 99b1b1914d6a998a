//! The handshake, both roles, as sans-I/O state machines.
//!
//! Three messages (layouts with byte offsets in docs/PROTOCOL.md, "Handshake"):
//!
//! ```text
//! initiator -> responder  HelloI   = version | flags | key id | nonce_i | [eph_i] | mac_i
//! responder -> initiator  HelloR   = version | flags | nonce_r | [eph_r] | mac_r
//! initiator -> responder  Finished = HMAC(finished_key, "sealpipe v1 initiator finished" || th)
//! ```
//!
//! `mac_i` and `mac_r` are HMAC-SHA256 under the pre-shared key over the transcript so far;
//! `th` = SHA-256(HelloI || HelloR); traffic secrets come from HKDF-SHA256 over the PSK, both
//! nonces and (with forward secrecy) the X25519 shared secret.
//!
//! Consumption contract: [`Handshake::advance`] is given all bytes received from the peer that
//! have not been consumed yet. `Status::NeedMore` consumes nothing: the caller keeps every byte
//! and calls again with the same bytes plus whatever arrives next. `Status::Done { consumed }`
//! says the first `consumed` bytes of that input were handshake; the rest (records the
//! initiator pipelined after Finished) belong to the record layer. The whole handshake reads at
//! most [`Handshake::max_message_len`] bytes, so a caller can bound its buffer.
//!
//! Invariants: the responder sends nothing until the initiator's hello verifies under a loaded
//! key, and is Done only after Finished verifies, so a replayed session never reaches the
//! backend; every failure is final (later calls return the same error); no panic on any input.

use std::fmt;
use std::mem;
use std::sync::Arc;

use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::{digest, hkdf, hmac};

use super::aead::AeadKind;
use super::error::ProtocolError;
use super::keys::{KEY_ID_LEN, Key, KeyId, KeySet, RandomSource};
use super::record::{Opener, Sealer, hkdf_expand};

/// The protocol version this implementation speaks, first byte of both hellos.
pub const VERSION: u8 = 1;
/// Flags bit 0: ephemeral X25519 (forward secrecy). Other bits must be zero.
pub const FLAG_FORWARD_SECRECY: u8 = 0x01;
/// Length of each side's random nonce.
pub const NONCE_LEN: usize = 32;
/// Length of an X25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of every handshake MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// Length of the Finished message.
pub const FINISHED_LEN: usize = MAC_LEN;

/// HMAC label prefixed to the initiator hello's MAC input.
pub const LABEL_HELLO_I: &[u8] = b"sealpipe v1 initiator hello";
/// HMAC label prefixed to the responder hello's MAC input.
pub const LABEL_HELLO_R: &[u8] = b"sealpipe v1 responder hello";
/// HKDF-Expand label for the Finished key.
pub const LABEL_FINISHED_KEY: &[u8] = b"sealpipe v1 finished";
/// HKDF-Expand label for the initiator-to-responder traffic secret.
pub const LABEL_I2R: &[u8] = b"sealpipe v1 initiator traffic";
/// HKDF-Expand label for the responder-to-initiator traffic secret.
pub const LABEL_R2I: &[u8] = b"sealpipe v1 responder traffic";
/// HMAC label prefixed to the transcript hash in Finished.
pub const LABEL_FINISHED: &[u8] = b"sealpipe v1 initiator finished";

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

/// What a handshake needs from configuration.
#[derive(Clone, Debug)]
pub struct HandshakeConfig {
    /// Keys: the initiator sends with the primary, the responder accepts any.
    pub keys: Arc<KeySet>,
    /// Initiator: offer ephemeral X25519. Responder: require it (when false, the responder
    /// follows the initiator's choice).
    pub forward_secrecy: bool,
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
}

enum State {
    InitiatorWaitHello(Box<InitiatorWait>),
    ResponderWaitHello {
        keys: Arc<KeySet>,
        require_fs: bool,
        aead: AeadKind,
        eph: Option<Box<EphemeralKey>>,
    },
    ResponderWaitFinished(Box<ResponderWait>),
    Done,
    Failed(ProtocolError),
}

struct InitiatorWait {
    key: Key,
    flags: u8,
    hello_i: [u8; MAX_HELLO_I],
    nonce_i: [u8; NONCE_LEN],
    eph: Option<EphemeralPrivateKey>,
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
    /// Starts the initiator (encrypt side) and appends its hello to `out`.
    pub fn initiator(
        cfg: &HandshakeConfig,
        rng: &mut dyn RandomSource,
        out: &mut Vec<u8>,
    ) -> Handshake {
        Self::initiator_with(cfg, rng, None, out)
    }

    /// [`Handshake::initiator`] with an ephemeral key made ahead of time (see [`EphemeralPool`]);
    /// without one, or if forward secrecy is off, it behaves exactly like `initiator`.
    pub fn initiator_with(
        cfg: &HandshakeConfig,
        rng: &mut dyn RandomSource,
        eph: Option<Box<EphemeralKey>>,
        out: &mut Vec<u8>,
    ) -> Handshake {
        let key = cfg.keys.primary().clone();
        let fs = cfg.forward_secrecy;
        let flags = if fs { FLAG_FORWARD_SECRECY } else { 0 };
        let mut nonce_i = [0u8; NONCE_LEN];
        rng.fill(&mut nonce_i);
        let mut hello_i = [0u8; MAX_HELLO_I];
        let mut w = Writer::new(&mut hello_i);
        w.put(&[VERSION, flags]);
        w.put(key.id().as_bytes());
        w.put(&nonce_i);
        let eph = fs.then(|| {
            let eph = eph.unwrap_or_else(|| Box::new(EphemeralKey::generate(rng)));
            w.put(&eph.public);
            eph.private
        });
        let body = w.len();
        let tag = mac(key.mac_key(), &[LABEL_HELLO_I, &hello_i[..body]]);
        hello_i[body..body + MAC_LEN].copy_from_slice(tag.as_ref());
        out.extend_from_slice(&hello_i[..hello_i_len(fs)]);
        Handshake {
            key_id: Some(key.id()),
            state: State::InitiatorWaitHello(Box::new(InitiatorWait {
                key,
                flags,
                hello_i,
                nonce_i,
                eph,
                aead: cfg.aead,
            })),
        }
    }

    /// Starts the responder (decrypt side); it speaks only after a valid initiator hello.
    pub fn responder(cfg: &HandshakeConfig) -> Handshake {
        Self::responder_with(cfg, None)
    }

    /// [`Handshake::responder`] holding an ephemeral key made ahead of time for the initiator's
    /// hello (see [`EphemeralPool`]). It is used for this handshake only, or dropped unused.
    pub fn responder_with(cfg: &HandshakeConfig, eph: Option<Box<EphemeralKey>>) -> Handshake {
        Handshake {
            key_id: None,
            state: State::ResponderWaitHello {
                keys: Arc::clone(&cfg.keys),
                require_fs: cfg.forward_secrecy,
                aead: cfg.aead,
                eph,
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

    /// Feeds the peer's unconsumed bytes; appends anything to send to `out`.
    ///
    /// See the module doc for the consumption contract. Errors are final: the connection must
    /// close, and later calls return the same error. Calling again after `Done` is `Malformed`.
    pub fn advance(
        &mut self,
        input: &[u8],
        rng: &mut dyn RandomSource,
        out: &mut Vec<u8>,
    ) -> Result<Status, ProtocolError> {
        let result = self.step(input, rng, out);
        if let Err(e) = result {
            self.state = State::Failed(e);
        }
        result
    }

    fn step(
        &mut self,
        input: &[u8],
        rng: &mut dyn RandomSource,
        out: &mut Vec<u8>,
    ) -> Result<Status, ProtocolError> {
        match &mut self.state {
            State::Failed(e) => Err(*e),
            State::Done => Err(ProtocolError::Malformed),
            State::InitiatorWaitHello(w) => {
                let Some((consumed, session)) = initiator_on_hello(w, input)? else {
                    return Ok(Status::NeedMore);
                };
                out.extend_from_slice(&session.1);
                self.state = State::Done;
                Ok(Status::Done {
                    consumed,
                    session: session.0,
                })
            }
            State::ResponderWaitHello {
                keys,
                require_fs,
                aead,
                eph,
            } => {
                let Some(hello) = parse_hello_i(input)? else {
                    return Ok(Status::NeedMore);
                };
                self.key_id = Some(hello.key_id);
                let eph = eph.take();
                let wait = responder_on_hello(keys, *require_fs, *aead, &hello, eph, rng, out)?;
                self.state = State::ResponderWaitFinished(wait);
                // Finished cannot have arrived yet (the initiator needs our hello first), but
                // checking costs nothing and keeps the contract simple.
                self.step(input, rng, out)
            }
            State::ResponderWaitFinished(w) => {
                let Some(got) = input.get(w.offset..w.offset + FINISHED_LEN) else {
                    return Ok(Status::NeedMore);
                };
                if !verify(&w.finished_key, &[LABEL_FINISHED, &w.th], got) {
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

/// Checks version and flags of a hello prefix. `expect_flags`: the responder hello must echo
/// the initiator's flags exactly. Returns whether forward secrecy is on, or `None` if fewer than
/// two bytes are in.
fn check_prefix(input: &[u8], expect_flags: Option<u8>) -> Result<Option<bool>, ProtocolError> {
    match input {
        [] => Ok(None),
        [v, ..] if *v != VERSION => Err(ProtocolError::Version),
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
    keys: &KeySet,
    require_fs: bool,
    aead: AeadKind,
    hello: &HelloI<'_>,
    eph: Option<Box<EphemeralKey>>,
    rng: &mut dyn RandomSource,
    out: &mut Vec<u8>,
) -> Result<Box<ResponderWait>, ProtocolError> {
    let key = keys.get(&hello.key_id).ok_or(ProtocolError::UnknownKey)?;
    let body = &hello.bytes[..hello.bytes.len() - MAC_LEN];
    if !verify(key.mac_key(), &[LABEL_HELLO_I, body], hello.mac) {
        return Err(ProtocolError::BadMac);
    }
    // Policy is checked after the MAC, so an unauthenticated peer learns nothing about it.
    if require_fs && hello.eph_i.is_none() {
        return Err(ProtocolError::Malformed);
    }
    let mut nonce_r = [0u8; NONCE_LEN];
    rng.fill(&mut nonce_r);
    let mut hello_r = [0u8; MAX_HELLO_R];
    let mut w = Writer::new(&mut hello_r);
    w.put(&[VERSION, hello.flags]);
    w.put(&nonce_r);
    let mut shared = None;
    if let Some(eph_i) = &hello.eph_i {
        let eph = eph.unwrap_or_else(|| Box::new(EphemeralKey::generate(rng)));
        w.put(&eph.public);
        shared = Some(agree(eph.private, eph_i)?);
    }
    let body_r = w.len();
    let tag = mac(
        key.mac_key(),
        &[LABEL_HELLO_R, hello.bytes, &hello_r[..body_r]],
    );
    hello_r[body_r..body_r + MAC_LEN].copy_from_slice(tag.as_ref());
    let hello_r = &hello_r[..body_r + MAC_LEN];
    let th = transcript_hash(hello.bytes, hello_r);
    let ks = KeySchedule::new(key, &hello.nonce_i, &nonce_r, shared.as_ref(), &th);
    out.extend_from_slice(hello_r);
    Ok(Box::new(ResponderWait {
        offset: hello.bytes.len(),
        finished_key: hmac::Key::new(hmac::HMAC_SHA256, &ks.finished),
        th,
        session: Session {
            sealer: Sealer::new(aead, ks.r2i),
            opener: Opener::new(aead, ks.i2r),
            key_id: key.id(),
            forward_secrecy: shared.is_some(),
        },
    }))
}

/// On the responder hello: returns (bytes consumed, (session, Finished to send)).
#[allow(clippy::type_complexity)]
fn initiator_on_hello(
    w: &mut InitiatorWait,
    input: &[u8],
) -> Result<Option<(usize, (Session, [u8; FINISHED_LEN]))>, ProtocolError> {
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
    if !verify(
        w.key.mac_key(),
        &[LABEL_HELLO_R, hello_i, &hello_r[..len - MAC_LEN]],
        mac_r,
    ) {
        return Err(ProtocolError::BadMac);
    }
    let shared = match (eph_r, w.eph.take()) {
        (Some(peer), Some(eph)) => Some(agree(eph, &peer)?),
        (None, None) => None,
        // Flags were checked equal, so this cannot happen; refuse rather than panic.
        _ => return Err(ProtocolError::Malformed),
    };
    let th = transcript_hash(hello_i, hello_r);
    let ks = KeySchedule::new(&w.key, &w.nonce_i, &nonce_r, shared.as_ref(), &th);
    let finished_key = hmac::Key::new(hmac::HMAC_SHA256, &ks.finished);
    let mut finished = [0u8; FINISHED_LEN];
    finished.copy_from_slice(mac(&finished_key, &[LABEL_FINISHED, &th]).as_ref());
    let session = Session {
        sealer: Sealer::new(w.aead, ks.i2r),
        opener: Opener::new(w.aead, ks.r2i),
        key_id: w.key.id(),
        forward_secrecy: fs,
    };
    Ok(Some((len, (session, finished))))
}

/// The secrets derived from one handshake.
struct KeySchedule {
    finished: [u8; 32],
    i2r: [u8; 32],
    r2i: [u8; 32],
}

impl KeySchedule {
    /// PRK = HKDF-Extract(salt = nonce_i || nonce_r, IKM = psk || dh);
    /// each secret = HKDF-Expand(PRK, label || th, 32).
    fn new(
        psk: &Key,
        nonce_i: &[u8; NONCE_LEN],
        nonce_r: &[u8; NONCE_LEN],
        dh: Option<&[u8; 32]>,
        th: &[u8; 32],
    ) -> KeySchedule {
        let mut salt = [0u8; 2 * NONCE_LEN];
        salt[..NONCE_LEN].copy_from_slice(nonce_i);
        salt[NONCE_LEN..].copy_from_slice(nonce_r);
        let mut ikm = [0u8; 64];
        ikm[..32].copy_from_slice(psk.bytes());
        let ikm_len = match dh {
            Some(dh) => {
                ikm[32..].copy_from_slice(dh);
                64
            }
            None => 32,
        };
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(&ikm[..ikm_len]);
        let mut ks = KeySchedule {
            finished: [0; 32],
            i2r: [0; 32],
            r2i: [0; 32],
        };
        hkdf_expand(&prk, LABEL_FINISHED_KEY, th, &mut ks.finished);
        hkdf_expand(&prk, LABEL_I2R, th, &mut ks.i2r);
        hkdf_expand(&prk, LABEL_R2I, th, &mut ks.r2i);
        ks
    }
}

fn transcript_hash(hello_i: &[u8], hello_r: &[u8]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(hello_i);
    ctx.update(hello_r);
    let mut th = [0u8; 32];
    th.copy_from_slice(ctx.finish().as_ref());
    th
}

/// An X25519 key pair for one handshake. Made on demand, or ahead of time by an
/// [`EphemeralPool`]; either way it is consumed by the handshake that takes it.
pub struct EphemeralKey {
    private: EphemeralPrivateKey,
    public: [u8; PUBLIC_KEY_LEN],
}

impl EphemeralKey {
    /// A fresh key pair whose private scalar comes from `rng`.
    pub fn generate(rng: &mut dyn RandomSource) -> EphemeralKey {
        let mut seed = [0u8; 32];
        rng.fill(&mut seed);
        // ring draws ephemeral keys only from its own sealed `SecureRandom`; its fixed-slice
        // implementation lets our `RandomSource` (and so the known-answer tests) supply the
        // scalar. It is marked as an internal API, hence the allow; it is stable across 0.17.
        #[allow(deprecated)]
        let fixed = ring::test::rand::FixedSliceRandom { bytes: &seed };
        let private = EphemeralPrivateKey::generate(&X25519, &fixed)
            .expect("X25519 key generation from a 32-byte seed cannot fail");
        seed.fill(0);
        let mut public = [0u8; PUBLIC_KEY_LEN];
        public.copy_from_slice(
            private
                .compute_public_key()
                .expect("X25519 public key from a valid scalar")
                .as_ref(),
        );
        EphemeralKey { private, public }
    }
}

impl fmt::Debug for EphemeralKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EphemeralKey").finish_non_exhaustive()
    }
}

/// Ephemeral key pairs generated before they are needed.
///
/// A key pair costs a fixed-base scalar multiplication (about half of a side's X25519 work).
/// A shard refills its pool while it has nothing else to do, so a handshake in the critical
/// path of a new connection only pays for the key agreement. Every key is handed out once and
/// then belongs to one handshake: forward secrecy is unchanged (a key waits in the pool for at
/// most as long as the shard is busy, and is never reused). An empty pool generates on demand.
pub struct EphemeralPool {
    // Boxed: a handshake holds the key it takes as a `Box`, so taking one never allocates.
    #[allow(clippy::vec_box)]
    keys: Vec<Box<EphemeralKey>>,
    target: usize,
    /// Keys handed out that had to be generated on demand (the pool was empty).
    pub misses: u64,
}

impl EphemeralPool {
    /// A pool that refills up to `target` keys (0 disables pre-generation).
    pub fn new(target: usize) -> EphemeralPool {
        EphemeralPool {
            keys: Vec::with_capacity(target),
            target,
            misses: 0,
        }
    }

    /// A key pair, from the pool if it has one.
    pub fn take(&mut self, rng: &mut dyn RandomSource) -> Box<EphemeralKey> {
        self.keys.pop().unwrap_or_else(|| {
            self.misses += 1;
            Box::new(EphemeralKey::generate(rng))
        })
    }

    /// Whether the pool is below its target.
    pub fn wants_refill(&self) -> bool {
        self.keys.len() < self.target
    }

    /// Generates one key if the pool is below its target; returns whether it still is.
    pub fn refill_one(&mut self, rng: &mut dyn RandomSource) -> bool {
        if self.wants_refill() {
            self.keys.push(Box::new(EphemeralKey::generate(rng)));
        }
        self.wants_refill()
    }

    /// Keys ready to hand out.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl fmt::Debug for EphemeralPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EphemeralPool")
            .field("ready", &self.keys.len())
            .field("target", &self.target)
            .field("misses", &self.misses)
            .finish()
    }
}

/// X25519; ring rejects an all-zero shared secret (a low-order peer point), which is Malformed.
fn agree(eph: EphemeralPrivateKey, peer: &[u8; PUBLIC_KEY_LEN]) -> Result<[u8; 32], ProtocolError> {
    agreement::agree_ephemeral(eph, &UnparsedPublicKey::new(&X25519, peer), |s| {
        let mut out = [0u8; 32];
        out.copy_from_slice(s);
        out
    })
    .map_err(|_| ProtocolError::Malformed)
}

/// Largest MAC input: the responder hello's label, the initiator hello and the responder body.
const MAC_INPUT_MAX: usize = 256;

fn mac(key: &hmac::Key, parts: &[&[u8]]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    for p in parts {
        ctx.update(p);
    }
    ctx.sign()
}

/// Constant-time check of `tag` against HMAC(key, concat(parts)).
fn verify(key: &hmac::Key, parts: &[&[u8]], tag: &[u8]) -> bool {
    let mut buf = [0u8; MAC_INPUT_MAX];
    let mut w = Writer::new(&mut buf);
    for p in parts {
        if !w.put(p) {
            return false;
        }
    }
    let n = w.len();
    hmac::verify(key, &buf[..n], tag).is_ok()
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

    fn cfg(keys: &[[u8; 32]], fs: bool) -> HandshakeConfig {
        let mut ks = keys.iter().map(|k| Key::from_bytes(*k));
        let primary = ks.next().unwrap();
        HandshakeConfig {
            keys: Arc::new(KeySet::new(primary, ks.collect())),
            forward_secrecy: fs,
            aead: AeadKind::Ring,
        }
    }

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

    fn exchange(a: &mut Session, b: &mut Session) {
        let msg = b"ping";
        let mut rec = vec![0u8; record_len_for(msg.len())];
        rec[HEADER_LEN..HEADER_LEN + msg.len()].copy_from_slice(msg);
        a.sealer
            .seal_in_place(RecordType::Data, &mut rec, msg.len())
            .unwrap();
        let (ty, range) = b.opener.open_in_place(&mut rec).unwrap();
        assert_eq!((ty, &rec[range]), (RecordType::Data, &msg[..]));
    }

    #[test]
    fn handshake_both_modes_and_both_directions() {
        for fs in [true, false] {
            let (mut i, mut r) = run(&cfg(&[[1; 32]], fs), &cfg(&[[1; 32]], false)).unwrap();
            assert_eq!(i.forward_secrecy, fs);
            assert_eq!(r.forward_secrecy, fs);
            assert_eq!(i.key_id, r.key_id);
            exchange(&mut i, &mut r);
            exchange(&mut r, &mut i);
        }
    }

    #[test]
    fn sessions_hibernate_both_directions_and_keep_talking() {
        let (mut i, mut r) = run(&cfg(&[[1; 32]], true), &cfg(&[[1; 32]], true)).unwrap();
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
        let (mut i, mut r) = run(&cfg(&[[2; 32]], true), &cfg(&[[1; 32], [2; 32]], true)).unwrap();
        assert_eq!(r.key_id, Key::from_bytes([2; 32]).id());
        exchange(&mut i, &mut r);
    }

    #[test]
    fn wrong_or_unknown_key_fails() {
        assert_eq!(
            run(&cfg(&[[1; 32]], true), &cfg(&[[2; 32]], true)).unwrap_err(),
            ProtocolError::UnknownKey
        );
        // Same id, different key: impossible in practice (ids derive from keys), so forge the
        // id by sending key 1's id with key 2's MAC.
        let mut rng = TestRng(3);
        let mut hello = Vec::new();
        Handshake::initiator(&cfg(&[[2; 32]], true), &mut rng, &mut hello);
        hello[2..10].copy_from_slice(Key::from_bytes([1; 32]).id().as_bytes());
        let mut r = Handshake::responder(&cfg(&[[1; 32]], true));
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
        let mut r = Handshake::responder(&cfg(&[[1; 32]], true));
        assert_eq!(
            r.advance(&[2], &mut rng, &mut out).unwrap_err(),
            ProtocolError::Version
        );
        let mut r = Handshake::responder(&cfg(&[[1; 32]], true));
        assert_eq!(
            r.advance(&[1, 0x80], &mut rng, &mut out).unwrap_err(),
            ProtocolError::Malformed
        );
        // A responder that requires forward secrecy refuses an initiator without it.
        assert_eq!(
            run(&cfg(&[[1; 32]], false), &cfg(&[[1; 32]], true)).unwrap_err(),
            ProtocolError::Malformed
        );
        assert!(out.is_empty());
    }

    #[test]
    fn low_order_point_is_rejected() {
        let key = Key::from_bytes([1; 32]);
        let mut hello = vec![VERSION, FLAG_FORWARD_SECRECY];
        hello.extend_from_slice(key.id().as_bytes());
        hello.extend_from_slice(&[5; NONCE_LEN]);
        hello.extend_from_slice(&[0; PUBLIC_KEY_LEN]); // the identity: order 1
        let tag = mac(key.mac_key(), &[LABEL_HELLO_I, &hello]);
        hello.extend_from_slice(tag.as_ref());
        let mut r = Handshake::responder(&cfg(&[[1; 32]], true));
        let mut out = Vec::new();
        assert_eq!(
            r.advance(&hello, &mut TestRng(0), &mut out).unwrap_err(),
            ProtocolError::Malformed
        );
        assert!(out.is_empty());
    }

    #[test]
    fn replayed_session_fails_at_finished() {
        let ic = cfg(&[[1; 32]], true);
        let rc = cfg(&[[1; 32]], true);
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
        let ic = cfg(&[[1; 32]], false);
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
        let c = cfg(&[[1; 32]], true);
        let mut pool = EphemeralPool::new(3);
        assert!(pool.is_empty() && pool.wants_refill());
        let mut os = crate::OsRandom;
        assert!(pool.refill_one(&mut os));
        assert!(pool.refill_one(&mut os));
        assert!(!pool.refill_one(&mut os), "the pool stops at its target");
        assert!(!pool.refill_one(&mut os));
        assert_eq!(pool.len(), 3);

        // A pooled key is exactly what the handshake would have drawn itself: with the same
        // random stream (nonce, then the key's seed), the hello is byte for byte the same.
        let mut plain = Vec::new();
        Handshake::initiator(&c, &mut TestRng(3), &mut plain);
        let mut ahead = Vec::new();
        let mut rng = TestRng(3);
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce);
        let key = Box::new(EphemeralKey::generate(&mut rng));
        Handshake::initiator_with(&c, &mut TestRng(3), Some(key), &mut ahead);
        assert_eq!(plain, ahead);

        // Both sides on pooled keys complete and agree; every key is handed out once.
        let mut publics = std::collections::HashSet::new();
        for _ in 0..4 {
            let ik = pool.take(&mut os);
            let rk = pool.take(&mut os);
            assert!(publics.insert(ik.public) && publics.insert(rk.public));
            let mut to_r = Vec::new();
            let mut i = Handshake::initiator_with(&c, &mut TestRng(4), Some(ik), &mut to_r);
            let mut r = Handshake::responder_with(&c, Some(rk));
            let mut to_i = Vec::new();
            r.advance(&to_r, &mut TestRng(5), &mut to_i).unwrap();
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
        assert_eq!(pool.misses, 5);
        assert!(pool.is_empty());
    }
}
