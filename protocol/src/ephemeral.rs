//! Ephemeral X25519 key pairs: where a handshake's forward secrecy comes from.
//!
//! A key pair is made one of two ways, both plain X25519 (RFC 7748) and interchangeable on the
//! wire:
//! - [`EphemeralKey::generate`]: ring's X25519, private scalar from the operating system's
//!   random number generator. This is what the proxy uses ([`EphemeralPool`]): ring's
//!   assembly makes the key agreement about 1.4x faster than the pure-Rust one.
//! - [`EphemeralKey::from_rng`]: the private scalar is 32 bytes drawn from a [`RandomSource`]
//!   (x25519-dalek, which accepts a given scalar; ring does not). Deterministic for a given
//!   source, so the known-answer vectors, the tests and the fuzz targets reproduce byte for byte.
//!
//! A responder draws its key from an [`EphemeralSource`] only after the initiator's hello has
//! verified, so an unauthenticated peer never costs it an X25519 operation.
//!
//! Invariants: every key pair is handed out at most once and dropped with the handshake that
//! took it; the scalar of a [`EphemeralKey::from_rng`] key and every shared secret are zeroed
//! when dropped (ring's own private key type is not: see docs/PROTOCOL.md, "Security
//! properties"); an all-zero shared secret (a low-order peer point) is `Malformed`, never used.

use std::fmt;

use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use zeroize::Zeroizing;

use super::error::ProtocolError;
use super::keys::RandomSource;

/// Length of an X25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;

/// An X25519 key pair for one handshake.
pub struct EphemeralKey {
    private: Private,
    public: [u8; PUBLIC_KEY_LEN],
}

enum Private {
    Ring(EphemeralPrivateKey),
    Scalar(x25519_dalek::StaticSecret),
}

impl EphemeralKey {
    /// A fresh key pair from ring, its scalar from the operating system's RNG.
    ///
    /// # Panics
    /// If the operating system refuses randomness (as [`crate::OsRandom`] does).
    pub fn generate() -> EphemeralKey {
        let rng = ring::rand::SystemRandom::new();
        let private = EphemeralPrivateKey::generate(&X25519, &rng)
            .expect("the operating system's random number generator failed");
        let mut public = [0u8; PUBLIC_KEY_LEN];
        public.copy_from_slice(
            private
                .compute_public_key()
                .expect("X25519 public key from a freshly generated scalar")
                .as_ref(),
        );
        EphemeralKey {
            private: Private::Ring(private),
            public,
        }
    }

    /// A key pair whose private scalar is the next 32 bytes of `rng` (clamped as RFC 7748
    /// says). Deterministic for a deterministic source.
    pub fn from_rng(rng: &mut dyn RandomSource) -> EphemeralKey {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill(&mut seed[..]);
        let secret = x25519_dalek::StaticSecret::from(*seed);
        let public = *x25519_dalek::PublicKey::from(&secret).as_bytes();
        EphemeralKey {
            private: Private::Scalar(secret),
            public,
        }
    }

    /// The public key, as sent in a hello.
    pub fn public(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.public
    }

    /// X25519 with the peer's public key; consumes the key pair.
    pub(crate) fn agree(
        self,
        peer: &[u8; PUBLIC_KEY_LEN],
    ) -> Result<Zeroizing<[u8; 32]>, ProtocolError> {
        match self.private {
            // ring rejects an all-zero shared secret itself.
            Private::Ring(k) => {
                agreement::agree_ephemeral(k, &UnparsedPublicKey::new(&X25519, peer), |s| {
                    let mut out = Zeroizing::new([0u8; 32]);
                    out.copy_from_slice(s);
                    out
                })
                .map_err(|_| ProtocolError::Malformed)
            }
            Private::Scalar(k) => {
                let shared = k.diffie_hellman(&x25519_dalek::PublicKey::from(*peer));
                if !shared.was_contributory() {
                    return Err(ProtocolError::Malformed);
                }
                Ok(Zeroizing::new(*shared.as_bytes()))
            }
        }
    }
}

impl fmt::Debug for EphemeralKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EphemeralKey").finish_non_exhaustive()
    }
}

/// Where a responder gets the key pair for a hello that has verified.
pub trait EphemeralSource {
    /// One key pair, handed over for good.
    fn ephemeral(&mut self, rng: &mut dyn RandomSource) -> Box<EphemeralKey>;
}

/// Makes each key from the handshake's own random source ([`EphemeralKey::from_rng`]), so a
/// handshake driven by a deterministic source is deterministic.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeysFromRng;

impl EphemeralSource for KeysFromRng {
    fn ephemeral(&mut self, rng: &mut dyn RandomSource) -> Box<EphemeralKey> {
        Box::new(EphemeralKey::from_rng(rng))
    }
}

/// Ephemeral key pairs generated before they are needed ([`EphemeralKey::generate`]).
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
    /// Keys handed out that came ready from the pool.
    pub hits: u64,
    /// Keys handed out that had to be generated on demand (the pool was empty).
    pub misses: u64,
}

impl EphemeralPool {
    /// A pool that refills up to `target` keys (0 disables pre-generation).
    pub fn new(target: usize) -> EphemeralPool {
        EphemeralPool {
            keys: Vec::with_capacity(target),
            target,
            hits: 0,
            misses: 0,
        }
    }

    /// A key pair, from the pool if it has one.
    pub fn take(&mut self) -> Box<EphemeralKey> {
        match self.keys.pop() {
            Some(k) => {
                self.hits += 1;
                k
            }
            None => {
                self.misses += 1;
                Box::new(EphemeralKey::generate())
            }
        }
    }

    /// Whether the pool is below its target.
    pub fn wants_refill(&self) -> bool {
        self.keys.len() < self.target
    }

    /// Generates one key if the pool is below its target; returns whether it still is.
    pub fn refill_one(&mut self) -> bool {
        if self.wants_refill() {
            self.keys.push(Box::new(EphemeralKey::generate()));
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

    /// Keys handed out so far (`hits + misses`).
    pub fn handed_out(&self) -> u64 {
        self.hits + self.misses
    }
}

impl EphemeralSource for EphemeralPool {
    fn ephemeral(&mut self, _: &mut dyn RandomSource) -> Box<EphemeralKey> {
        self.take()
    }
}

impl fmt::Debug for EphemeralPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EphemeralPool")
            .field("ready", &self.keys.len())
            .field("target", &self.target)
            .field("hits", &self.hits)
            .field("misses", &self.misses)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed([u8; 32]);
    impl RandomSource for Fixed {
        fn fill(&mut self, dst: &mut [u8]) {
            dst.copy_from_slice(&self.0[..dst.len()]);
        }
    }

    fn unhex(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn scalar_keys_match_rfc_7748() {
        // RFC 7748 §6.1: Alice's and Bob's key pairs and their shared secret.
        let a = unhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let a_pub = unhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        let b = unhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb");
        let b_pub = unhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
        let k = unhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
        let alice = EphemeralKey::from_rng(&mut Fixed(a));
        assert_eq!(alice.public(), &a_pub);
        assert_eq!(*alice.agree(&b_pub).unwrap(), k);
        let bob = EphemeralKey::from_rng(&mut Fixed(b));
        assert_eq!(bob.public(), &b_pub);
        assert_eq!(*bob.agree(&a_pub).unwrap(), k);
    }

    #[test]
    fn ring_and_scalar_keys_agree_with_each_other() {
        for seed in [1u8, 77, 200] {
            let ring_key = EphemeralKey::generate();
            let scalar_key = EphemeralKey::from_rng(&mut Fixed([seed; 32]));
            let (rp, sp) = (*ring_key.public(), *scalar_key.public());
            assert_eq!(
                *ring_key.agree(&sp).unwrap(),
                *scalar_key.agree(&rp).unwrap()
            );
        }
    }

    #[test]
    fn low_order_points_are_malformed_on_both_backends() {
        // The identity (0) and the point of order 2 (u = 1) give an all-zero shared secret.
        for point in [[0u8; 32], {
            let mut p = [0u8; 32];
            p[0] = 1;
            p
        }] {
            assert_eq!(
                EphemeralKey::generate().agree(&point).unwrap_err(),
                ProtocolError::Malformed
            );
            assert_eq!(
                EphemeralKey::from_rng(&mut Fixed([9; 32]))
                    .agree(&point)
                    .unwrap_err(),
                ProtocolError::Malformed
            );
        }
    }

    #[test]
    fn the_pool_hands_each_key_out_once_and_counts_hits_and_misses() {
        let mut pool = EphemeralPool::new(3);
        assert!(pool.is_empty() && pool.wants_refill());
        assert!(pool.refill_one());
        assert!(pool.refill_one());
        assert!(!pool.refill_one(), "the pool stops at its target");
        assert!(!pool.refill_one());
        assert_eq!(pool.len(), 3);
        let mut publics = std::collections::HashSet::new();
        for _ in 0..5 {
            assert!(publics.insert(*pool.take().public()));
        }
        assert_eq!((pool.hits, pool.misses, pool.handed_out()), (3, 2, 5));
        assert!(pool.is_empty());
    }
}
