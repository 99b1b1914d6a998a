//! Key files on a real file system (the protocol crate parses key text; `sealpipe::keyfile`
//! owns the files).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use sealpipe::keyfile::{KeyError, generate_key_file, load_key_file, load_key_set};
use sealpipe::protocol::{Key, RandomSource};

/// A cheap deterministic stream for tests that need "some" randomness.
struct CountingRandom(u64);

impl RandomSource for CountingRandom {
    fn fill(&mut self, dst: &mut [u8]) {
        for b in dst {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (self.0 >> 56) as u8;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Key files

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sealpipe-crypto-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn write_mode(path: &std::path::Path, text: &[u8], mode: u32) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn keygen_writes_0600_and_refuses_to_overwrite() {
    let dir = TempDir::new("keygen");
    let path = dir.0.join("k.key");
    let id = generate_key_file(&path, &mut CountingRandom(1)).unwrap();
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(text.len(), 65);
    assert!(text.ends_with('\n'));
    assert!(
        text[..64]
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    let key = load_key_file(&path).unwrap();
    assert_eq!(key.id(), id);
    assert!(
        !format!("{key:?}").contains(&text[..16]),
        "Debug leaks key bytes"
    );
    let err = generate_key_file(&path, &mut CountingRandom(2)).unwrap_err();
    assert!(matches!(err, KeyError::Exists { .. }), "{err}");
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        text,
        "file was modified"
    );
    let set = load_key_set(&[path.clone(), path]).unwrap();
    assert_eq!(set.ids().collect::<Vec<_>>(), vec![id]);
}

#[test]
fn load_rejects_bad_key_files_naming_the_file() {
    let dir = TempDir::new("load");
    let good = "ab".repeat(32) + "\n";
    type Case<'a> = (&'a str, &'a [u8], u32, fn(&KeyError) -> bool);
    let cases: [Case; 5] = [
        ("open.key", good.as_bytes(), 0o644, |e| {
            matches!(e, KeyError::Permissions { mode: 0o644, .. })
        }),
        ("groupw.key", good.as_bytes(), 0o660, |e| {
            matches!(e, KeyError::Permissions { .. })
        }),
        ("short.key", b"abcdef\n", 0o600, |e| {
            matches!(e, KeyError::WrongLength { len: 6, .. })
        }),
        ("long.key", &[b'a'; 66], 0o600, |e| {
            matches!(e, KeyError::WrongLength { len: 66, .. })
        }),
        ("nothex.key", &[b'g'; 64], 0o600, |e| {
            matches!(e, KeyError::BadEncoding { .. })
        }),
    ];
    for (name, text, mode, ok) in cases {
        let path = dir.0.join(name);
        write_mode(&path, text, mode);
        let err = load_key_file(&path).unwrap_err();
        assert!(ok(&err), "{name}: {err:?}");
        assert!(
            err.to_string().contains(name),
            "{name}: message does not name the file: {err}"
        );
    }
    // Readable by a key group (0640) is fine: the group is how a service user gets the key.
    let shared = dir.0.join("shared.key");
    write_mode(&shared, good.as_bytes(), 0o640);
    assert!(load_key_file(&shared).is_ok());
    let missing = dir.0.join("missing.key");
    let err = load_key_file(&missing).unwrap_err();
    assert!(matches!(err, KeyError::Unreadable { .. }));
    assert!(err.to_string().contains("missing.key"));
    let fine = dir.0.join("fine.key");
    write_mode(&fine, good.as_bytes(), 0o400);
    assert_eq!(
        load_key_file(&fine).unwrap().id(),
        Key::from_bytes([0xab; 32]).id()
    );
}
