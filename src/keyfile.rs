//! Key files on disk: the only place sealpipe reads or writes a pre-shared key.
//!
//! The protocol crate parses and encodes key text ([`Key::parse_text`], [`Key::to_text`]);
//! this module owns the file-system policy around it: a key file is 64 hex characters and a
//! newline, mode 0600 (0640 for a key group), never overwritten.
//!
//! Invariants: permissions are checked on the open file (fstat), not the path, so the checked
//! file is the one read; reads are bounded, so a misconfigured path cannot eat memory.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::protocol::{Key, KeyId, KeySet, KeyTextError, RandomSource};

/// Largest key file read: a valid one is 65 bytes; anything much larger is not a key file, and
/// bounding the read keeps a misconfigured path (say /dev/zero) from eating memory.
const MAX_KEY_FILE: u64 = 256;

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
    /// `load_key_set` was given no files.
    #[error("no key files given")]
    NoKeys,
}

/// Writes a new random key to `path` (64 hex characters and a newline, mode 0600) and returns
/// its id. Refuses to overwrite an existing file.
pub fn generate_key_file(path: &Path, rng: &mut dyn RandomSource) -> Result<KeyId, KeyError> {
    let key = Key::generate(rng);
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
    file.write_all(&key.to_text())
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
    let mut raw = Vec::with_capacity(80);
    file.take(MAX_KEY_FILE)
        .read_to_end(&mut raw)
        .map_err(unreadable)?;
    Key::parse_text(&raw).map_err(|e| match e {
        KeyTextError::Length(len) => KeyError::WrongLength {
            path: path.to_owned(),
            len,
        },
        KeyTextError::Encoding => KeyError::BadEncoding {
            path: path.to_owned(),
        },
    })
}

/// Loads key files; the first is the primary, all are accepted.
pub fn load_key_set(paths: &[PathBuf]) -> Result<KeySet, KeyError> {
    let (first, rest) = paths.split_first().ok_or(KeyError::NoKeys)?;
    let primary = load_key_file(first)?;
    let accepted = rest
        .iter()
        .map(|p| load_key_file(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(KeySet::new(primary, accepted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_list_is_refused() {
        assert!(matches!(load_key_set(&[]), Err(KeyError::NoKeys)));
    }
}
