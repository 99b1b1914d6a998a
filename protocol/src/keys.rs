//! Pre-shared keys: key files, key ids, key sets, and the randomness source.
//!
//! A key is 256 random bits stored as 64 lowercase hex characters and a newline in a file of
//! mode 0600. Nothing uses the key's bytes directly: on load it is expanded into three subkeys
//! (docs/PROTOCOL.md, "Keys"), each for one purpose —
//!
//! ```text
//! psk_prk    = HKDF-Extract(salt = "sealpipe v2 psk", IKM = psk)
//! key_id     = HKDF-Expand-Label(psk_prk, "key id", "", 8)      sent in clear in the hello
//! hello_mac  = HKDF-Expand-Label(psk_prk, "hello mac", "", 32)  HMAC key of the initiator hello
//! psk_secret = HKDF-Expand-Label(psk_prk, "psk secret", "", 32) the PSK's share of the key schedule
//! ```
//!
//! — so operators never assign ids and two sides that load the same file agree on the id. A
//! [`KeySet`] holds one primary key (used to initiate) and any number of accepted keys (used to
//! answer), which is how keys rotate without downtime. Handshakes share a key set by `Arc`:
//! a connection never copies key material.
//!
//! Key files are parsed from bytes and encoded to bytes here ([`Key::parse_text`],
//! [`Key::to_text`]); reading and writing the files is the caller's (the `sealpipe` package's
//! `keyfile` module): this crate touches no file system.
//!
//! Invariants: key bytes never reach a `Debug` or `Display` output (only the id does); the key's
//! bytes, its subkeys and every text encoding of it are zeroed when dropped, except the HMAC
//! key schedule ring keeps for `hello_mac` (ring does not wipe its key types; see
//! docs/PROTOCOL.md, "Security properties").

use std::fmt;

use ring::{hkdf, hmac};
use zeroize::Zeroizing;

use super::kdf::{LABEL_HELLO_MAC, LABEL_KEY_ID, LABEL_PSK_SECRET, PSK_SALT, expand_label};

/// Length of a pre-shared key.
pub const KEY_LEN: usize = 32;
/// Length of a key id.
pub const KEY_ID_LEN: usize = 8;
/// Length of a key file's text: 64 lowercase hex characters and a newline.
pub const KEY_TEXT_LEN: usize = 2 * KEY_LEN + 1;

/// Where randomness comes from. Passed in so tests can fix it.
pub trait RandomSource {
    /// Fills `dst` with random bytes.
    fn fill(&mut self, dst: &mut [u8]);
}

/// The operating system's CSPRNG (ring's `SystemRandom`, i.e. `getrandom`).
#[derive(Debug, Default, Clone, Copy)]
pub struct OsRandom;

impl RandomSource for OsRandom {
    /// # Panics
    /// If the OS refuses randomness, which on Linux means the process cannot run safely at all;
    /// continuing with weak nonces would be worse than stopping.
    fn fill(&mut self, dst: &mut [u8]) {
        use ring::rand::SecureRandom;
        ring::rand::SystemRandom::new()
            .fill(dst)
            .expect("the operating system's random number generator failed");
    }
}

/// A key's identifier: 8 bytes derived from the key. Displayed as 16 hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl KeyId {
    /// The raw bytes, as sent in the initiator's hello.
    pub fn as_bytes(&self) -> &[u8; KEY_ID_LEN] {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A 256-bit pre-shared key and the subkeys derived from it. `Debug` shows only its id.
#[derive(Clone)]
pub struct Key {
    /// The key itself, kept only to write it out again ([`Key::to_text`]).
    bytes: Zeroizing<[u8; KEY_LEN]>,
    id: KeyId,
    /// HMAC key schedule for the initiator hello, computed once per key load.
    hello_mac: hmac::Key,
    /// The PSK's input to each handshake's key schedule.
    psk_secret: Zeroizing<[u8; 32]>,
}

impl Key {
    /// Wraps raw key bytes and derives the id and subkeys.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Key {
        let bytes = Zeroizing::new(bytes);
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, PSK_SALT).extract(&bytes[..]);
        let mut id = [0u8; KEY_ID_LEN];
        expand_label(&prk, LABEL_KEY_ID, &[], &mut id);
        let mut mac = Zeroizing::new([0u8; 32]);
        expand_label(&prk, LABEL_HELLO_MAC, &[], &mut mac[..]);
        let mut psk_secret = Zeroizing::new([0u8; 32]);
        expand_label(&prk, LABEL_PSK_SECRET, &[], &mut psk_secret[..]);
        Key {
            bytes,
            id: KeyId(id),
            hello_mac: hmac::Key::new(hmac::HMAC_SHA256, &mac[..]),
            psk_secret,
        }
    }

    /// This key's id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The PSK's share of the handshake's input keying material.
    pub(crate) fn psk_secret(&self) -> &[u8; 32] {
        &self.psk_secret
    }

    /// HMAC-SHA256 keyed with the hello MAC subkey.
    pub(crate) fn hello_mac(&self) -> &hmac::Key {
        &self.hello_mac
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(id={})", self.id)
    }
}

/// One primary key (sent by the initiator) and the keys accepted from peers.
#[derive(Clone, Debug)]
pub struct KeySet {
    // Primary first; ids are unique (a key given twice is kept once).
    keys: Vec<Key>,
}

impl KeySet {
    /// A set whose primary is `primary`; `accepted` may or may not include it.
    pub fn new(primary: Key, accepted: Vec<Key>) -> KeySet {
        let mut keys = Vec::with_capacity(1 + accepted.len());
        keys.push(primary);
        for k in accepted {
            if keys.iter().all(|have| have.id != k.id) {
                keys.push(k);
            }
        }
        KeySet { keys }
    }

    /// The key an initiator uses.
    pub fn primary(&self) -> &Key {
        // `keys` is never empty: `new` always pushes the primary.
        &self.keys[0]
    }

    /// The loaded key with this id, if any.
    pub fn get(&self, id: &KeyId) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == *id)
    }

    /// Ids of every loaded key, primary first.
    pub fn ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.iter().map(|k| k.id)
    }
}

/// Why bytes are not a key file's text.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyTextError {
    /// Not exactly 64 characters after trimming whitespace.
    #[error("expected 64 hex characters, found {0} bytes")]
    Length(usize),
    /// The right length, but a character that is not hex.
    #[error("not hex-encoded")]
    Encoding,
}

impl Key {
    /// Parses a key file's text: 64 hex characters, surrounding whitespace ignored.
    pub fn parse_text(raw: &[u8]) -> Result<Key, KeyTextError> {
        parse_key_text(raw)
    }

    /// Makes a new random key.
    pub fn generate(rng: &mut dyn RandomSource) -> Key {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        rng.fill(&mut bytes[..]);
        Key::from_bytes(*bytes)
    }

    /// The key file's text: 64 lowercase hex characters and a newline (zeroed when dropped).
    pub fn to_text(&self) -> Zeroizing<[u8; KEY_TEXT_LEN]> {
        let mut text = Zeroizing::new([0u8; KEY_TEXT_LEN]);
        encode_hex(&self.bytes[..], &mut text[..2 * KEY_LEN]);
        text[2 * KEY_LEN] = b'\n';
        text
    }
}

use KeyTextError as ParseError;

fn parse_key_text(raw: &[u8]) -> Result<Key, ParseError> {
    let text = raw.trim_ascii();
    if text.len() != 2 * KEY_LEN {
        return Err(ParseError::Length(text.len()));
    }
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    for (out, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
        let (hi, lo) = match pair {
            [hi, lo] => (hex_val(*hi), hex_val(*lo)),
            _ => (None, None),
        };
        match (hi, lo) {
            (Some(hi), Some(lo)) => *out = hi << 4 | lo,
            _ => return Err(ParseError::Encoding),
        }
    }
    Ok(Key::from_bytes(*bytes))
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn encode_hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_derived_and_debug_hides_the_key() {
        let k = Key::from_bytes([0xab; 32]);
        assert_eq!(k.id(), Key::from_bytes([0xab; 32]).id());
        assert_ne!(k.id(), Key::from_bytes([0xac; 32]).id());
        let dbg = format!("{k:?}");
        assert!(!dbg.contains("abab"), "{dbg}");
        assert!(dbg.contains(&k.id().to_string()));
        assert_eq!(k.id().to_string().len(), 16);
    }

    #[test]
    fn parses_hex_with_trailing_newline() {
        let text = format!("{}\n", "0f".repeat(32));
        let k = parse_key_text(text.as_bytes()).ok().unwrap();
        assert_eq!(*k.bytes, [0x0f; 32]);
        assert!(matches!(
            parse_key_text(b"abcd"),
            Err(ParseError::Length(4))
        ));
        let bad = format!("{}zz", "00".repeat(31));
        assert!(matches!(
            parse_key_text(bad.as_bytes()),
            Err(ParseError::Encoding)
        ));
    }

    #[test]
    fn text_round_trip() {
        let k = Key::from_bytes([0x5a; 32]);
        let text = k.to_text();
        assert_eq!(&text[..4], b"5a5a");
        assert_eq!(text[64], b'\n');
        assert_eq!(Key::parse_text(&text[..]).unwrap().id(), k.id());
    }

    #[test]
    fn key_set_lookup_and_dedup() {
        let a = Key::from_bytes([1; 32]);
        let b = Key::from_bytes([2; 32]);
        let set = KeySet::new(a.clone(), vec![a.clone(), b.clone()]);
        assert_eq!(set.primary().id(), a.id());
        assert_eq!(set.ids().collect::<Vec<_>>(), vec![a.id(), b.id()]);
        assert!(set.get(&b.id()).is_some());
        assert!(set.get(&KeyId([0; 8])).is_none());
    }
}
