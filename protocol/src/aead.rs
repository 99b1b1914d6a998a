//! AES-256-GCM backends behind one enum-dispatched key.
//!
//! Two implementations are wire-compatible and interchangeable at run time: `ring` (the default,
//! fastest on CPUs with AES-NI/VAES) and the pure-Rust `aes-gcm` crate. Dispatch is a `match` on
//! an enum rather than `Box<dyn Trait>`, so the hot path has no indirect call and no allocation.
//!
//! Invariants: this module never chooses nonces; the caller ([`super::record`]) guarantees that
//! a nonce is never reused under one key. Opening either verifies the tag and decrypts, or
//! leaves the caller with an error and no plaintext it may use.

use std::fmt;
use std::str::FromStr;

use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};

/// Length of an AES-256-GCM key.
pub const KEY_LEN: usize = 32;
/// Length of an AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Length of an AES-GCM tag.
pub const TAG_LEN: usize = 16;

/// Which AES-256-GCM implementation seals and opens records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub enum AeadKind {
    /// `ring` (BoringSSL's assembly): the default.
    #[default]
    Ring,
    /// The pure-Rust `aes-gcm` crate.
    RustCrypto,
}

impl AeadKind {
    /// The name accepted by [`FromStr`] and shown in logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            AeadKind::Ring => "ring",
            AeadKind::RustCrypto => "rustcrypto",
        }
    }
}

impl fmt::Display for AeadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An AEAD name other than `ring` or `rustcrypto`.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("unknown AEAD backend {0:?} (expected \"ring\" or \"rustcrypto\")")]
pub struct UnknownAeadKind(pub String);

impl FromStr for AeadKind {
    type Err = UnknownAeadKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ring" => Ok(AeadKind::Ring),
            "rustcrypto" => Ok(AeadKind::RustCrypto),
            other => Err(UnknownAeadKind(other.to_owned())),
        }
    }
}

/// An AES-256-GCM key bound to one backend.
///
/// The expanded key schedule (ring: ~544 bytes of round keys and GHASH table; aes-gcm: ~624)
/// lives in its own heap allocation and an `AeadKey` is a two-word handle to it, so dropping
/// one gives that memory back on its own: the record layer drops the keys of a quiet
/// connection and keeps only the small state it needs to expand them again.
pub struct AeadKey {
    inner: Inner,
}

enum Inner {
    Ring(Box<LessSafeKey>),
    RustCrypto(Box<Aes256Gcm>),
}

impl AeadKey {
    /// Expands `key` for the chosen backend.
    pub fn new(kind: AeadKind, key: &[u8; KEY_LEN]) -> AeadKey {
        let inner = match kind {
            AeadKind::Ring => match UnboundKey::new(&AES_256_GCM, key) {
                Ok(k) => Inner::Ring(Box::new(LessSafeKey::new(k))),
                // ring only rejects a key of the wrong length, which the type rules out; fall
                // back to the other backend rather than panic.
                Err(_) => Inner::RustCrypto(Box::new(Aes256Gcm::new(key.into()))),
            },
            AeadKind::RustCrypto => Inner::RustCrypto(Box::new(Aes256Gcm::new(key.into()))),
        };
        AeadKey { inner }
    }

    /// The backend this key runs on.
    pub fn kind(&self) -> AeadKind {
        match self.inner {
            Inner::Ring(_) => AeadKind::Ring,
            Inner::RustCrypto(_) => AeadKind::RustCrypto,
        }
    }

    /// Encrypts `in_out` in place and returns the tag over `aad` and the ciphertext.
    ///
    /// # Panics
    /// Only if `in_out` exceeds AES-GCM's message limit (about 64 GiB), which the record layer's
    /// 16 KiB bound makes impossible.
    pub fn seal_in_place_separate_tag(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> [u8; TAG_LEN] {
        match &self.inner {
            Inner::Ring(k) => {
                let tag = k
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(*nonce),
                        Aad::from(aad),
                        in_out,
                    )
                    .expect("AES-GCM input within the algorithm's length limit");
                let mut out = [0u8; TAG_LEN];
                out.copy_from_slice(tag.as_ref());
                out
            }
            Inner::RustCrypto(k) => k
                .encrypt_inout_detached(nonce.into(), aad, in_out.into())
                .expect("AES-GCM input within the algorithm's length limit")
                .into(),
        }
    }

    /// Verifies `tag` over `aad` and the ciphertext `in_out`, then decrypts `in_out` in place.
    ///
    /// On `Err` the contents of `in_out` are unspecified and must not be used.
    // The single failure carries no information by design (no oracle on why a tag failed), so
    // the unit error is the honest type.
    #[allow(clippy::result_unit_err)]
    pub fn open_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), ()> {
        match &self.inner {
            Inner::Ring(k) => k
                .open_in_place_separate_tag(
                    Nonce::assume_unique_for_key(*nonce),
                    Aad::from(aad),
                    Tag::from(*tag),
                    in_out,
                    0..,
                )
                .map(|_| ())
                .map_err(|_| ()),
            Inner::RustCrypto(k) => k
                .decrypt_inout_detached(nonce.into(), aad, in_out.into(), tag.into())
                .map_err(|_| ()),
        }
    }

    /// Verifies and decrypts the ciphertext-and-tag at `in_out[src..]` and leaves the
    /// plaintext at `in_out[..len]`, returning `len` (`in_out.len() - src - TAG_LEN`): the
    /// move towards the front is part of the decryption pass with `ring` (its `open_within`);
    /// the pure-Rust backend decrypts in place and then moves the plaintext.
    ///
    /// On `Err` the contents of `in_out` are unspecified and must not be used.
    #[allow(clippy::result_unit_err)] // as open_in_place: no oracle on why a tag failed
    pub fn open_shift(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
        src: usize,
    ) -> Result<usize, ()> {
        let Some(len) = in_out
            .len()
            .checked_sub(src)
            .and_then(|n| n.checked_sub(TAG_LEN))
        else {
            return Err(());
        };
        match &self.inner {
            Inner::Ring(k) => k
                .open_within(
                    Nonce::assume_unique_for_key(*nonce),
                    Aad::from(aad),
                    in_out,
                    src..,
                )
                .map(|p| p.len())
                .map_err(|_| ()),
            Inner::RustCrypto(k) => {
                let (ct, tag) = in_out[src..].split_at_mut(len);
                let tag: &[u8; TAG_LEN] = (&*tag).try_into().map_err(|_| ())?;
                k.decrypt_inout_detached(nonce.into(), aad, ct.into(), tag.into())
                    .map_err(|_| ())?;
                in_out.copy_within(src..src + len, 0);
                Ok(len)
            }
        }
    }
}

impl fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("AeadKey")
            .field("kind", &self.kind())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // NIST GCM test vector (gcmEncryptExtIV256, Count 0 with 16-byte plaintext and AAD), used to
    // pin both backends to the standard, not only to each other.
    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn both_backends_match_a_known_answer() {
        // RFC-style vector from the GCM spec (Test Case 16, AES-256, 60-byte plaintext, AAD).
        let key: [u8; 32] =
            unhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
                .try_into()
                .unwrap();
        let nonce: [u8; 12] = unhex("cafebabefacedbaddecaf888").try_into().unwrap();
        let pt = unhex(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        );
        let aad = unhex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let ct = unhex(
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
        );
        let tag = unhex("76fc6ece0f4e1768cddf8853bb2d551b");
        for kind in [AeadKind::Ring, AeadKind::RustCrypto] {
            let k = AeadKey::new(kind, &key);
            let mut buf = pt.clone();
            let t = k.seal_in_place_separate_tag(&nonce, &aad, &mut buf);
            assert_eq!(buf, ct, "{kind}");
            assert_eq!(t.to_vec(), tag, "{kind}");
            k.open_in_place(&nonce, &aad, &mut buf, &t).unwrap();
            assert_eq!(buf, pt, "{kind}");
            let mut bad = t;
            bad[0] ^= 1;
            let mut buf2 = ct.clone();
            assert!(k.open_in_place(&nonce, &aad, &mut buf2, &bad).is_err());
        }
    }

    #[test]
    fn open_shift_moves_the_plaintext_to_the_front() {
        let key = [9u8; KEY_LEN];
        let nonce = [3u8; NONCE_LEN];
        let pt: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        for kind in [AeadKind::Ring, AeadKind::RustCrypto] {
            let k = AeadKey::new(kind, &key);
            for src in [0usize, 1, 19, 500] {
                let mut ct = pt.clone();
                let tag = k.seal_in_place_separate_tag(&nonce, b"hdr", &mut ct);
                let mut buf = vec![0xEE; src];
                buf.extend_from_slice(&ct);
                buf.extend_from_slice(&tag);
                let mut bad = buf.clone();
                let n = k.open_shift(&nonce, b"hdr", &mut buf, src).unwrap();
                assert_eq!((n, &buf[..n]), (pt.len(), &pt[..]), "{kind} src={src}");
                let last = bad.len() - 1;
                bad[last] ^= 1;
                assert!(k.open_shift(&nonce, b"hdr", &mut bad, src).is_err());
                assert!(k.open_shift(&nonce, b"hdr", &mut buf[..10], 0).is_err());
                assert!(k.open_shift(&nonce, b"hdr", &mut buf[..20], 10).is_err());
            }
        }
    }

    #[test]
    fn parses_names() {
        assert_eq!("ring".parse::<AeadKind>().unwrap(), AeadKind::Ring);
        assert_eq!(
            "rustcrypto".parse::<AeadKind>().unwrap(),
            AeadKind::RustCrypto
        );
        assert!("aes".parse::<AeadKind>().is_err());
        assert_eq!(AeadKind::default(), AeadKind::Ring);
    }

    #[test]
    fn debug_hides_key() {
        let k = AeadKey::new(AeadKind::Ring, &[7u8; 32]);
        let s = format!("{k:?}");
        assert!(!s.contains("07"), "{s}");
    }
}
