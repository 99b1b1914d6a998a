//! A tunnel's listening Unix domain socket (`listen = "unix:/run/app/app.sock"`): binding it
//! where a stale file of an earlier run may lie, with the file mode and owner the
//! configuration asks for, and removing it when this process is done with it.
//!
//! Invariants:
//! - A file at the path is removed only when it is a socket that nothing serves: a connect to
//!   it is refused. A socket that accepts the connect belongs to a live process, and starting
//!   is refused, naming the path (spiped's issue 423 was deleting such a socket); a file that
//!   is not a socket is never touched; a probe that fails otherwise (no permission) refuses
//!   too, rather than guess.
//! - Nobody can connect before the file has its mode and owner: the socket is bound under a
//!   private name beside the path, given them, and only then linked to the path (a `link`,
//!   which fails rather than replace a file that appeared meanwhile), its private name removed.
//! - At exit the path is removed only if it is still the file this process made (same device
//!   and inode): a successor's socket is never removed.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::config::UnixListen;

/// Backlog of a listening Unix socket.
const BACKLOG: i32 = 1024;

/// Why a Unix socket could not be listened on.
#[derive(Debug, thiserror::Error)]
pub enum UnixListenError {
    #[error(
        "{path}: another process serves this socket (a connect to it was accepted); stop it first, or listen elsewhere"
    )]
    InUse { path: PathBuf },
    #[error("{path}: exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("{path}: cannot tell whether a process serves the socket there: {source}")]
    Probe { path: PathBuf, source: io::Error },
    #[error("{path}: cannot remove the stale socket there: {source}")]
    Stale { path: PathBuf, source: io::Error },
    #[error("{path}: {what} {name:?}: {source}")]
    Owner {
        path: PathBuf,
        what: &'static str,
        name: String,
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The file a listening socket was bound to: removed at exit if it is still that file.
#[derive(Debug)]
pub struct SocketFile {
    pub path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Removes the file if it is still the one this process bound (not a successor's).
    pub fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == (self.dev, self.ino) => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the Unix socket on exit");
                }
            }
            _ => {}
        }
    }
}

/// Binds a listening socket at `u.path` with `u`'s mode and owner, after removing a stale
/// socket there (see the module doc).
pub fn bind(u: &UnixListen) -> Result<(UnixListener, SocketFile), UnixListenError> {
    let path = &u.path;
    let io_err = |source| UnixListenError::Io {
        path: path.clone(),
        source,
    };
    clear_stale(path)?;
    let Some(private) = private_name(path) else {
        // No room beside it for a private name: bound in place, then given its mode and owner
        // (a connect in between finds the process's umask in force).
        let l = crate::reactor::listener::bind_unix(path, BACKLOG).map_err(io_err)?;
        set_file(path, u)?;
        let m = std::fs::symlink_metadata(path).map_err(io_err)?;
        let (dev, ino) = (m.dev(), m.ino());
        let path = path.clone();
        return Ok((l, SocketFile { path, dev, ino }));
    };
    let _ = std::fs::remove_file(&private);
    let l = crate::reactor::listener::bind_unix(&private, BACKLOG).map_err(io_err)?;
    let placed = set_file(&private, u).and_then(|()| {
        std::fs::hard_link(&private, path).map_err(|e| match e.kind() {
            // Someone bound the path since it was found free or stale.
            io::ErrorKind::AlreadyExists => UnixListenError::InUse { path: path.clone() },
            _ => io_err(e),
        })
    });
    let _ = std::fs::remove_file(&private);
    placed?;
    let m = std::fs::symlink_metadata(path).map_err(io_err)?;
    Ok((
        l,
        SocketFile {
            path: path.clone(),
            dev: m.dev(),
            ino: m.ino(),
        },
    ))
}

/// Gives the socket file at `path` the mode and owner `u` asks for (at bind, and on reload).
pub fn set_file(path: &Path, u: &UnixListen) -> Result<(), UnixListenError> {
    let owner = |what: &'static str, name: &Option<String>, group: bool| {
        name.as_deref()
            .map(|n| {
                crate::sys::account_id(n, group).map_err(|source| UnixListenError::Owner {
                    path: u.path.clone(),
                    what,
                    name: n.to_string(),
                    source,
                })
            })
            .transpose()
    };
    let uid = owner("listen_owner", &u.owner, false)?;
    let gid = owner("listen_group", &u.group, true)?;
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::chown(path, uid, gid).map_err(|source| UnixListenError::Owner {
            path: u.path.clone(),
            what: "listen_owner/listen_group",
            name: format!(
                "{}:{}",
                u.owner.as_deref().unwrap_or(""),
                u.group.as_deref().unwrap_or("")
            ),
            source,
        })?;
    }
    if let Some(mode) = u.mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
            |source| UnixListenError::Io {
                path: u.path.clone(),
                source,
            },
        )?;
    }
    Ok(())
}

/// A name beside `path` only this process uses, if a socket address can hold it.
fn private_name(path: &Path) -> Option<PathBuf> {
    let p = path.with_file_name(format!(".sealpipe-{}.sock", std::process::id()));
    (p.as_os_str().len() <= crate::config::MAX_UNIX_PATH).then_some(p)
}

/// Removes a stale socket at `path` (nothing accepts on it); refuses a live one, or anything
/// that is not a socket.
fn clear_stale(path: &Path) -> Result<(), UnixListenError> {
    use std::os::unix::fs::FileTypeExt;
    let m = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(UnixListenError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    if !m.file_type().is_socket() {
        return Err(UnixListenError::NotASocket {
            path: path.to_owned(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(UnixListenError::InUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|source| UnixListenError::Stale {
                path: path.to_owned(),
                source,
            })?;
            tracing::info!(path = %path.display(), "removed a stale Unix socket (nothing served it)");
            Ok(())
        }
        Err(source) => Err(UnixListenError::Probe {
            path: path.to_owned(),
            source,
        }),
    }
}
