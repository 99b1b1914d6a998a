//! Key files on disk: the only place sealpipe reads or writes a pre-shared key.
//!
//! The protocol crate parses and encodes key text ([`Key::parse_text`], [`Key::to_text`]);
//! this module owns the file-system policy around it: a key file is 64 hex characters and a
//! newline, mode 0600 (0640 for a key group), never overwritten.
//!
//! Invariants: a key file is a regular file, checked on the open file (fstat), not the path, so
//! the checked file is the one read; opening never blocks (a FIFO or device at a key path is
//! refused at once instead of hanging a reload); reads are bounded, so a misconfigured path
//! cannot eat memory; the key's text is zeroed once parsed; `keygen` writes the whole key to a
//! temporary file, syncs it and only then links it into place, so a failed write (a full disk)
//! never leaves a partial key under the name, and an existing file is never replaced.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use zeroize::Zeroizing;

use crate::protocol::{Key, KeyId, KeySet, KeyTextError, RandomSource};

/// Largest key file read: a valid one is 65 bytes; anything much larger is not a key file, and
/// bounding the read keeps a misconfigured path from eating memory.
const MAX_KEY_FILE: usize = 256;

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
    /// The path is not a regular file (a FIFO, a device, a socket, a directory).
    #[error("key file {}: is a {kind}, not a regular file", path.display())]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
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
///
/// The key is written to a temporary file beside `path` (created with `O_EXCL` and mode 0600,
/// so it is never readable by others even for an instant), synced, then hard-linked to `path`
/// — which fails if `path` exists, so nothing is ever replaced — and the temporary name is
/// removed, and the directory synced. A failure at any step leaves no file at `path`.
pub fn generate_key_file(path: &Path, rng: &mut dyn RandomSource) -> Result<KeyId, KeyError> {
    let exists = || KeyError::Exists {
        path: path.to_owned(),
    };
    let write_err = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    if path.symlink_metadata().is_ok() {
        return Err(exists());
    }
    let key = Key::generate(rng);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // A missing directory is made private (0700, and so are its missing parents): it holds
    // keys. Whoever else must read them (the service's group) is granted that deliberately.
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(write_err)?;
    }
    let name = path
        .file_name()
        .ok_or_else(|| write_err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    static N: AtomicU32 = AtomicU32::new(0);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(&key.to_text()[..])?;
            file.sync_all()
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(exists()),
        Err(e) => return Err(write_err(e)),
    }
    // The new name is durable once its directory is.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err)?;
    Ok(key.id())
}

/// What a file type is, for the error that refuses it.
fn file_kind(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

/// Loads one key file, checking its type and permissions before reading the secret.
pub fn load_key_file(path: &Path) -> Result<Key, KeyError> {
    let unreadable = |source| KeyError::Unreadable {
        path: path.to_owned(),
        source,
    };
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer (forever, on
    // the control thread, during a reload). It changes nothing for a regular file.
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(unreadable)?;
    // fstat the open file, not the path, so the checked file is the one read.
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.file_type().is_file() {
        return Err(KeyError::NotRegular {
            path: path.to_owned(),
            kind: file_kind(meta.file_type()),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    // Group read is allowed (a key group shared with a service's dynamic user, mode 0640);
    // anything for others, and group write, is refused.
    if mode & 0o037 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    // A fixed buffer, zeroed when dropped: the key's text never lands in a growable one that
    // could leave copies behind as it reallocates.
    let mut raw = Zeroizing::new([0u8; MAX_KEY_FILE]);
    let mut n = 0;
    while n < raw.len() {
        match file.read(&mut raw[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(unreadable(e)),
        }
    }
    Key::parse_text(&raw[..n]).map_err(|e| match e {
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

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sealpipe-kf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Runs `f` on another thread and fails if it does not return within 10 s: a blocking open
    /// would hang the test instead of failing it.
    fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("loading the key file blocked")
    }

    #[test]
    fn a_fifo_or_device_is_refused_at_once() {
        let dir = temp_dir("fifo");
        let fifo = dir.join("k.key");
        let ok = std::process::Command::new("mkfifo")
            .args(["-m", "600"])
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(ok.success());
        let f = fifo.clone();
        match within_10s(move || load_key_file(&f)) {
            Err(KeyError::NotRegular { path, kind }) => {
                assert_eq!((path, kind), (fifo.clone(), "FIFO"));
            }
            other => panic!("{other:?}"),
        }
        let e = within_10s(|| load_key_file(Path::new("/dev/zero"))).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let e = within_10s(move || load_key_file(&dir)).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
    }

    #[test]
    fn keygen_leaves_only_the_key() {
        let dir = temp_dir("gen");
        let path = dir.join("k.key");
        let id = generate_key_file(&path, &mut crate::protocol::OsRandom).unwrap();
        assert_eq!(load_key_file(&path).unwrap().id(), id);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("k.key")]);
        assert!(matches!(
            generate_key_file(&path, &mut crate::protocol::OsRandom),
            Err(KeyError::Exists { .. })
        ));
        // Refused also when the name is a dangling symlink (it is not replaced).
        let link = dir.join("dangling.key");
        std::os::unix::fs::symlink(dir.join("nowhere"), &link).unwrap();
        assert!(matches!(
            generate_key_file(&link, &mut crate::protocol::OsRandom),
            Err(KeyError::Exists { .. })
        ));
        assert!(!dir.join("nowhere").exists());
    }
}
