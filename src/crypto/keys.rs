//! Pre-shared keys: key files, key ids, key sets, and the randomness source.
//!
//! A key is 256 random bits stored as 64 lowercase hex characters and a newline in a file of
//! mode 0600. Its id is derived from the key itself (HMAC-SHA256(key, "sealpipe key id")
//! truncated to 8 bytes), so operators never assign ids and two sides that load the same file
//! agree on the id. A [`KeySet`] holds one primary key (used to initiate) and any number of
//! accepted keys (used to answer), which is how keys rotate without downtime.
//!
//! Invariants: key bytes never reach a `Debug` or `Display` output (only the id does); this is
//! the only file of `crypto/` that touches the file system, and only to load configuration.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::hmac;

/// Length of a pre-shared key.
pub const KEY_LEN: usize = 32;
/// Length of a key id.
pub const KEY_ID_LEN: usize = 8;
/// The HMAC label a key id is derived with.
pub const KEY_ID_LABEL: &[u8] = b"sealpipe key id";
/// Largest key file read: a valid one is 65 bytes; anything much larger is not a key file, and
/// bounding the read keeps a misconfigured path (say /dev/zero) from eating memory.
const MAX_KEY_FILE: u64 = 256;

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

/// A 256-bit pre-shared key. `Debug` shows only its id.
#[derive(Clone)]
pub struct Key {
    bytes: [u8; KEY_LEN],
    id: KeyId,
    // HMAC key schedule computed once: every handshake MACs under the key twice.
    mac: hmac::Key,
}

impl Key {
    /// Wraps raw key bytes and derives the id.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Key {
        let mac = hmac::Key::new(hmac::HMAC_SHA256, &bytes);
        let tag = hmac::sign(&mac, KEY_ID_LABEL);
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&tag.as_ref()[..KEY_ID_LEN]);
        Key {
            bytes,
            id: KeyId(id),
            mac,
        }
    }

    /// This key's id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The raw key bytes (for the key schedule).
    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    /// HMAC-SHA256 keyed with this key.
    pub(crate) fn mac_key(&self) -> &hmac::Key {
        &self.mac
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

    /// Loads key files; the first is the primary, all are accepted.
    pub fn load(paths: &[PathBuf]) -> Result<KeySet, KeyError> {
        let (first, rest) = paths.split_first().ok_or(KeyError::NoKeys)?;
        let primary = load_key_file(first)?;
        let accepted = rest
            .iter()
            .map(|p| load_key_file(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(KeySet::new(primary, accepted))
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

/// Why a key file could not be written or loaded. Every message names the file.
#[derive(thiserror::Error, Debug)]
pub enum KeyError {
    /// The key file could not be opened or read.
    #[error("key file {}: cannot read: {source}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file does not hold exactly 64 hex characters (plus optional trailing whitespace).
    #[error("key file {}: expected 64 hex characters, found {len} bytes", path.display())]
    WrongLength {
        /// The file.
        path: PathBuf,
        /// Bytes found after trimming whitespace.
        len: usize,
    },
    /// The file has the right length but a character that is not hex.
    #[error("key file {}: not hex-encoded", path.display())]
    BadEncoding {
        /// The file.
        path: PathBuf,
    },
    /// Others may access the file, or its group may write it; a secret must be 0600 (or 0640
    /// for a key group).
    #[error("key file {}: mode {mode:04o} is writable by its group or accessible to others (chmod 600, or 640 for a key group)", path.display())]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// `generate_key_file` refuses to replace an existing file.
    #[error("key file {}: already exists, refusing to overwrite", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// Creating or writing a new key file failed.
    #[error("key file {}: cannot write: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `KeySet::load` was given no files.
    #[error("no key files given")]
    NoKeys,
}

/// Writes a new random key to `path` (64 hex characters and a newline, mode 0600) and returns
/// its id. Refuses to overwrite an existing file.
pub fn generate_key_file(path: &Path, rng: &mut dyn RandomSource) -> Result<KeyId, KeyError> {
    let mut bytes = [0u8; KEY_LEN];
    rng.fill(&mut bytes);
    let key = Key::from_bytes(bytes);
    // create_new makes "does it exist" and "create it" one atomic step, and the mode is applied
    // at creation, so the key is never readable by others even for an instant.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => KeyError::Exists {
                path: path.to_owned(),
            },
            _ => KeyError::Write {
                path: path.to_owned(),
                source,
            },
        })?;
    let mut text = [0u8; 2 * KEY_LEN + 1];
    encode_hex(&bytes, &mut text[..2 * KEY_LEN]);
    text[2 * KEY_LEN] = b'\n';
    file.write_all(&text)
        .and_then(|()| file.sync_all())
        .map_err(|source| KeyError::Write {
            path: path.to_owned(),
            source,
        })?;
    Ok(key.id())
}

/// Loads one key file, checking its permissions before reading the secret.
pub fn load_key_file(path: &Path) -> Result<Key, KeyError> {
    let unreadable = |source| KeyError::Unreadable {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(unreadable)?;
    // fstat the open file, not the path, so the checked file is the one read.
    let mode = file.metadata().map_err(unreadable)?.permissions().mode() & 0o777;
    // Group read is allowed (a key group shared with a service's dynamic user, mode 0640);
    // anything for others, and group write, is refused.
    if mode & 0o037 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let mut raw = Vec::with_capacity(2 * KEY_LEN + 2);
    file.take(MAX_KEY_FILE)
        .read_to_end(&mut raw)
        .map_err(unreadable)?;
    parse_key_text(&raw).map_err(|e| match e {
        ParseError::Length(len) => KeyError::WrongLength {
            path: path.to_owned(),
            len,
        },
        ParseError::Encoding => KeyError::BadEncoding {
            path: path.to_owned(),
        },
    })
}

enum ParseError {
    Length(usize),
    Encoding,
}

fn parse_key_text(raw: &[u8]) -> Result<Key, ParseError> {
    let text = raw.trim_ascii();
    if text.len() != 2 * KEY_LEN {
        return Err(ParseError::Length(text.len()));
    }
    let mut bytes = [0u8; KEY_LEN];
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
    Ok(Key::from_bytes(bytes))
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
        assert_eq!(k.bytes(), &[0x0f; 32]);
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
    fn key_set_lookup_and_dedup() {
        let a = Key::from_bytes([1; 32]);
        let b = Key::from_bytes([2; 32]);
        let set = KeySet::new(a.clone(), vec![a.clone(), b.clone()]);
        assert_eq!(set.primary().id(), a.id());
        assert_eq!(set.ids().collect::<Vec<_>>(), vec![a.id(), b.id()]);
        assert!(set.get(&b.id()).is_some());
        assert!(set.get(&KeyId([0; 8])).is_none());
        assert!(matches!(KeySet::load(&[]), Err(KeyError::NoKeys)));
    }
}
