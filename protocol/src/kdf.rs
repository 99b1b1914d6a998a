//! Key derivation: HKDF-SHA256 with TLS 1.3's length-prefixed labels.
//!
//! Every derivation of protocol version 2 is `HKDF-Expand-Label(secret, label, context, len)`
//! (RFC 8446 §7.1 with our own prefix):
//!
//! ```text
//! HkdfLabel = length (u16 BE) || u8 len(L) || L || u8 len(context) || context
//! L         = "sealpipe v2 " || label
//! ```
//!
//! Because the output length, the label and the context are each length-prefixed, two
//! derivations with different (label, context, length) can never feed HKDF-Expand the same
//! info string: in version 1, "key" was a prefix of "key update" expanded from the same secret.
//!
//! Invariants: labels and contexts are at most 255 bytes and outputs at most 255 * 32 bytes
//! (checked in debug builds; every caller in this crate passes constants far below that).

use ring::hkdf;

/// Prefix of every label (the version is in it, so no key of another version can coincide).
pub const LABEL_PREFIX: &[u8] = b"sealpipe v2 ";
/// HKDF-Extract salt that turns a pre-shared key into the PRK its subkeys come from.
pub const PSK_SALT: &[u8] = b"sealpipe v2 psk";

/// PSK PRK -> key id (8 bytes).
pub const LABEL_KEY_ID: &[u8] = b"key id";
/// PSK PRK -> HMAC key of the initiator hello.
pub const LABEL_HELLO_MAC: &[u8] = b"hello mac";
/// PSK PRK -> the PSK's share of the handshake's input keying material.
pub const LABEL_PSK_SECRET: &[u8] = b"psk secret";
/// Handshake PRK -> HMAC key of the responder hello (its proof, covering the DH result).
pub const LABEL_RESPONDER_FINISHED: &[u8] = b"responder finished";
/// Handshake PRK -> HMAC key of the initiator's Finished.
pub const LABEL_INITIATOR_FINISHED: &[u8] = b"initiator finished";
/// Handshake PRK -> first initiator-to-responder traffic secret.
pub const LABEL_I2R: &[u8] = b"i2r traffic";
/// Handshake PRK -> first responder-to-initiator traffic secret.
pub const LABEL_R2I: &[u8] = b"r2i traffic";
/// Traffic secret -> AES-256-GCM key.
pub const LABEL_KEY: &[u8] = b"key";
/// Traffic secret -> 12-byte IV.
pub const LABEL_IV: &[u8] = b"iv";
/// Traffic secret -> next traffic secret (KEY_UPDATE).
pub const LABEL_KEY_UPDATE: &[u8] = b"key update";

/// Every label, for the tests that hold them distinct.
pub const ALL_LABELS: [&[u8]; 10] = [
    LABEL_KEY_ID,
    LABEL_HELLO_MAC,
    LABEL_PSK_SECRET,
    LABEL_RESPONDER_FINISHED,
    LABEL_INITIATOR_FINISHED,
    LABEL_I2R,
    LABEL_R2I,
    LABEL_KEY,
    LABEL_IV,
    LABEL_KEY_UPDATE,
];

struct OkmLen(usize);

impl hkdf::KeyType for OkmLen {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label(prk, label, context, out.len()) with SHA-256.
pub(crate) fn expand_label(prk: &hkdf::Prk, label: &[u8], context: &[u8], out: &mut [u8]) {
    debug_assert!(LABEL_PREFIX.len() + label.len() <= 255 && context.len() <= 255);
    let length = (out.len() as u16).to_be_bytes();
    let label_len = [(LABEL_PREFIX.len() + label.len()) as u8];
    let context_len = [context.len() as u8];
    let info: [&[u8]; 6] = [
        &length,
        &label_len,
        LABEL_PREFIX,
        label,
        &context_len,
        context,
    ];
    // Output lengths here are 8, 12 or 32 bytes, far below HKDF's 255*32 limit, so ring cannot
    // fail; zeroing instead of panicking would only hide a bug, so the expect is the honest form.
    prk.expand(&info, OkmLen(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF output within 255 * 32 bytes");
}

/// A secret used directly as an HKDF PRK (traffic secrets are uniformly random 32 bytes).
pub(crate) fn prk(secret: &[u8; 32]) -> hkdf::Prk {
    hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The info string HKDF-Expand sees, built independently of `expand_label`.
    fn info(label: &[u8], context: &[u8], len: u16) -> Vec<u8> {
        let mut v = len.to_be_bytes().to_vec();
        v.push((LABEL_PREFIX.len() + label.len()) as u8);
        v.extend_from_slice(LABEL_PREFIX);
        v.extend_from_slice(label);
        v.push(context.len() as u8);
        v.extend_from_slice(context);
        v
    }

    #[test]
    fn no_info_string_is_a_prefix_of_another() {
        // Every label with the contexts and lengths it is used with: none is a prefix of
        // another (version 1 had "key" a prefix of "key update" under the same secret).
        let mut all = Vec::new();
        for l in ALL_LABELS {
            for (ctx, len) in [
                (&[][..], 8u16),
                (&[][..], 12),
                (&[][..], 32),
                (&[7u8; 32][..], 32),
            ] {
                all.push(info(l, ctx, len));
            }
        }
        for (i, a) in all.iter().enumerate() {
            for (j, b) in all.iter().enumerate() {
                if i != j {
                    assert!(!b.starts_with(a), "{a:?} is a prefix of {b:?}");
                }
            }
        }
    }

    #[test]
    fn expand_label_is_hkdf_expand_over_the_encoded_label() {
        // RFC 5869 HKDF-Expand, computed with HMAC alone, over the HkdfLabel encoding.
        let secret = [0x42u8; 32];
        let mut ours = [0u8; 32];
        expand_label(&prk(&secret), LABEL_KEY_UPDATE, &[], &mut ours);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
        let mut t1 = info(LABEL_KEY_UPDATE, &[], 32);
        t1.push(1);
        let want = ring::hmac::sign(&key, &t1);
        assert_eq!(&ours[..], want.as_ref());
        // And "key" really is a different derivation from "key update".
        let mut key_bytes = [0u8; 32];
        expand_label(&prk(&secret), LABEL_KEY, &[], &mut key_bytes);
        assert_ne!(key_bytes, ours);
    }
}
