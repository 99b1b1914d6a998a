//! Handoff: passing the listening sockets to a successor process (`--handoff PATH`,
//! docs/OPERATIONS.md, "Upgrade without downtime").
//!
//! Invariants: descriptors cross only a Unix socket of mode 0600 between processes of the same
//! uid (each end checks the other with SO_PEERCRED); the header is only a claim, and every
//! received descriptor is checked with the kernel before it is served on; the holder lets go
//! only after the successor said `OK`, so a failed successor leaves the holder serving.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::ServerError;
use crate::config::Config;
use crate::proxy::ListenAddr;

// ---------------------------------------------------------------------------------------------
// Handoff: passing listening sockets to a successor process (docs/OPERATIONS.md).
//
// Protocol over the Unix stream socket at PATH (mode 0600), one exchange per connection:
//   successor -> holder:  "sealpipe-handoff 1 take pid=N\n"
//   holder -> successor:  one sendmsg: the header below + SCM_RIGHTS descriptors
//       sealpipe-handoff 1
//       shards K
//       tunnel ADDR NAME        (one line per tunnel, in config order)
//       metrics ADDR            (if the holder serves metrics)
//       end
//     descriptors: per tunnel, K listeners (shard order), then the metrics listener.
//   successor -> holder:  "OK\n" once its shards accept on them (or "NO reason\n").
// On OK the holder closes its copies (the kernel accept queues live on in the successor's)
// and drains. Without OK (EOF, timeout, NO) the holder keeps serving as if nothing happened.
// Trust: each end checks the other's uid (SO_PEERCRED) equals its own, and the successor asks
// the kernel what each descriptor is (a listening TCP socket bound to the address its own
// config names: SO_TYPE, SO_DOMAIN, SO_ACCEPTCONN, getsockname); the header is only a claim.
// ---------------------------------------------------------------------------------------------

const HANDOFF_MAGIC: &str = "sealpipe-handoff 1";
/// Bound on every read and write of a handoff exchange.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a header or a reply line.
const HANDOFF_MAX_HEADER: usize = 64 * 1024;

/// A close-on-exec duplicate of a socket, kept to be sent in a handoff.
pub(super) fn dup(l: &impl AsFd) -> std::io::Result<OwnedFd> {
    l.as_fd().try_clone_to_owned()
}

fn handoff_err(path: &Path, message: impl std::fmt::Display) -> ServerError {
    ServerError::Handoff {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// Reads one `\n`-terminated line (bounded), without reading past it.
fn read_line(s: &mut UnixStream) -> std::io::Result<String> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "peer closed the handoff socket",
                ));
            }
            _ if b[0] == b'\n' => break,
            _ if out.len() >= 512 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "handoff line too long",
                ));
            }
            _ => out.push(b[0]),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Listening sockets received from a predecessor, not yet confirmed.
pub(super) struct Inherited {
    pub(super) shards: usize,
    /// Per tunnel of our config: the predecessor's listeners, shard order.
    pub(super) tunnels: Vec<Vec<std::net::TcpListener>>,
    pub(super) metrics: Option<std::net::TcpListener>,
    conn: UnixStream,
}

impl Inherited {
    /// Tells the predecessor our shards accept on its sockets: it closes its copies and drains.
    /// Returns the socket, on which the predecessor then hands over its established
    /// connections (`transfer.rs`), if it can.
    pub(super) fn confirm(mut self, path: &Path) -> Option<UnixStream> {
        match self.conn.write_all(b"OK\n") {
            Ok(()) => {
                tracing::info!(path = %path.display(), "handoff complete: the previous process hands over its connections and drains");
                Some(self.conn)
            }
            // Both processes accept on the same sockets then; the old one keeps serving.
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "handoff: could not confirm; the previous process keeps serving too");
                None
            }
        }
    }
}

/// Asks the process listening on `path` for its listening sockets. `Ok(None)`: nobody
/// listens there (first start): bind as usual. An error (the predecessor's tunnels differ from
/// ours, a protocol failure) leaves the predecessor serving and stops this start.
pub(super) fn take_listeners(path: &Path, cfg: &Config) -> Result<Option<Inherited>, ServerError> {
    let mut conn = match UnixStream::connect(path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            tracing::info!(path = %path.display(), "no process to take listeners from; binding");
            return Ok(None);
        }
        Err(e) => return Err(handoff_err(path, e)),
    };
    let io = |e: std::io::Error| handoff_err(path, e);
    // Descriptors are accepted only from our own user: anyone else listening at PATH (a
    // stale path in a shared directory, say) must not choose the sockets we serve on.
    let (theirs, ours) = (crate::sys::peer_uid(&conn).map_err(io)?, crate::sys::euid());
    if theirs != ours {
        return Err(handoff_err(
            path,
            format!(
                "the process listening there runs as uid {theirs}, this one as uid {ours}: refusing its descriptors (a handoff is only between processes of the same user)"
            ),
        ));
    }
    // A predecessor is serving: a Unix listener cannot be taken over from it (nor shared:
    // one of two processes would delete the other's socket file at exit), so refuse before
    // asking for anything; the predecessor keeps serving.
    if let Some(t) = cfg.tunnels.iter().find(|t| t.listen.unix().is_some()) {
        return Err(handoff_err(
            path,
            format!(
                "tunnel {:?} listens on a Unix socket ({}), which the handoff does not carry: restart the process instead",
                t.name, t.listen
            ),
        ));
    }
    conn.set_read_timeout(Some(HANDOFF_TIMEOUT)).map_err(io)?;
    conn.set_write_timeout(Some(HANDOFF_TIMEOUT)).map_err(io)?;
    conn.write_all(Hello::ours().encode().as_bytes())
        .map_err(io)?;
    let mut buf = vec![0u8; HANDOFF_MAX_HEADER];
    let (mut n, fds) = crate::sys::recv_fds(&conn, &mut buf).map_err(io)?;
    // A stream may split the header; the descriptors came with its first byte.
    while !buf[..n].ends_with(b"end\n") {
        if n == buf.len() {
            return Err(handoff_err(path, "header too long"));
        }
        match conn.read(&mut buf[n..]).map_err(io)? {
            0 => return Err(handoff_err(path, "the other process closed the connection")),
            k => n += k,
        }
    }
    let header = String::from_utf8_lossy(&buf[..n]).into_owned();
    match parse_and_match(&header, fds, cfg) {
        Ok((shards, tunnels, metrics)) => {
            tracing::info!(path = %path.display(), shards, "took listening sockets from the running process");
            Ok(Some(Inherited {
                shards,
                tunnels,
                metrics,
                conn,
            }))
        }
        Err(why) => {
            let _ = conn.write_all(format!("NO {why}\n").as_bytes());
            Err(handoff_err(path, why))
        }
    }
}

type Taken = (
    usize,
    Vec<Vec<std::net::TcpListener>>,
    Option<std::net::TcpListener>,
);

/// Why a handoff header cannot be used. The header comes from another process: every way it
/// can be wrong is one of these, never a panic.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum HeaderError {
    #[error("not a sealpipe handoff (or another version)")]
    NotHandoff,
    #[error("the header ends before its \"end\" line")]
    Truncated,
    #[error("bad line {0:?}")]
    BadLine(String),
    #[error("unknown header line {0:?}")]
    UnknownLine(String),
    #[error("{0:?} appears twice")]
    Repeated(&'static str),
    #[error(
        "{shards} shards x {tunnels} tunnels: more listening sockets than one handoff carries ({max})"
    )]
    TooMany {
        shards: usize,
        tunnels: usize,
        max: usize,
    },
    #[error("got {got} descriptors for {tunnels} tunnels x {shards} shards")]
    Count {
        got: usize,
        tunnels: usize,
        shards: usize,
    },
}

/// What a holder says about the listening sockets it sends: its shard count, each tunnel's
/// listen address and name (in its configuration's order), and its metrics address. The
/// descriptors follow in that order: per tunnel one listener per shard, then the metrics one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Header {
    pub shards: usize,
    pub tunnels: Vec<(SocketAddr, String)>,
    pub metrics: Option<SocketAddr>,
}

impl Header {
    /// The header as sent: one line each, ending with `end`.
    pub fn encode(&self) -> String {
        let mut out = format!("{HANDOFF_MAGIC}\nshards {}\n", self.shards);
        for (a, name) in &self.tunnels {
            out.push_str(&format!("tunnel {a} {name}\n"));
        }
        if let Some(a) = self.metrics {
            out.push_str(&format!("metrics {a}\n"));
        }
        out.push_str("end\n");
        out
    }

    /// Parses a header, refusing anything [`encode`](Self::encode) would not write: another
    /// magic or version, an unknown or malformed line, a line twice, no `end`, no shards, or
    /// more sockets than one message can carry.
    pub fn parse(text: &str) -> Result<Header, HeaderError> {
        // A last line without its newline was cut short, whatever it says.
        if !text.ends_with('\n') {
            return Err(HeaderError::Truncated);
        }
        let mut lines = text.lines();
        if lines.next() != Some(HANDOFF_MAGIC) {
            return Err(HeaderError::NotHandoff);
        }
        let bad = |line: &str| HeaderError::BadLine(line.to_string());
        let (mut shards, mut tunnels, mut metrics) = (None, Vec::new(), None);
        let mut ended = false;
        for line in lines.by_ref() {
            let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "shards" if shards.is_some() => return Err(HeaderError::Repeated("shards")),
                "shards" => shards = Some(rest.parse::<usize>().map_err(|_| bad(line))?),
                "tunnel" => {
                    let (addr, name) = rest.split_once(' ').ok_or_else(|| bad(line))?;
                    let addr = addr.parse().map_err(|_| bad(line))?;
                    if name.is_empty() {
                        return Err(bad(line));
                    }
                    tunnels.push((addr, name.to_string()));
                }
                "metrics" if metrics.is_some() => return Err(HeaderError::Repeated("metrics")),
                "metrics" => metrics = Some(rest.parse().map_err(|_| bad(line))?),
                "end" if rest.is_empty() => {
                    ended = true;
                    break;
                }
                _ => return Err(HeaderError::UnknownLine(line.to_string())),
            }
        }
        if !ended {
            return Err(HeaderError::Truncated);
        }
        let shards = match shards {
            Some(0) | None => return Err(bad("shards 0")),
            Some(n) => n,
        };
        let h = Header {
            shards,
            tunnels,
            metrics,
        };
        if h.descriptors().is_none() {
            return Err(HeaderError::TooMany {
                shards,
                tunnels: h.tunnels.len(),
                max: crate::sys::MAX_FDS,
            });
        }
        Ok(h)
    }

    /// The descriptors that come with this header; `None` if more than one message carries.
    pub fn descriptors(&self) -> Option<usize> {
        let n = self
            .tunnels
            .len()
            .checked_mul(self.shards)?
            .checked_add(usize::from(self.metrics.is_some()))?;
        (n <= crate::sys::MAX_FDS).then_some(n)
    }
}

fn parse_and_match(header: &str, fds: Vec<OwnedFd>, cfg: &Config) -> Result<Taken, String> {
    let h = Header::parse(header).map_err(|e| e.to_string())?;
    match_config(&h, fds, cfg).map_err(|e| e.to_string())
}

/// Matches a parsed header and its descriptors against our configuration: the same tunnels,
/// each descriptor the listener the kernel says it is.
fn match_config(h: &Header, fds: Vec<OwnedFd>, cfg: &Config) -> Result<Taken, String> {
    let shards = h.shards;
    let tunnels = &h.tunnels;
    let metrics = h.metrics;
    if h.descriptors() != Some(fds.len()) {
        return Err(HeaderError::Count {
            got: fds.len(),
            tunnels: tunnels.len(),
            shards,
        }
        .to_string());
    }
    let mut ours: Vec<(ListenAddr, &str)> = Vec::with_capacity(cfg.tunnels.len());
    for t in &cfg.tunnels {
        if t.listen.unix().is_some() {
            return Err(format!(
                "tunnel {:?} listens on a Unix socket, which the handoff does not carry",
                t.name
            ));
        }
        ours.push((t.listen.clone(), t.name.as_str()));
    }
    let same = ours.len() == tunnels.len()
        && ours
            .iter()
            .zip(tunnels)
            .all(|((la, ln), (ra, rn))| ln == rn && la.matches(*ra));
    if !same {
        let list = |t: Vec<(String, String)>| {
            let t: Vec<String> = t
                .into_iter()
                .map(|(n, a)| format!("{n:?} on {a}"))
                .collect();
            t.join(", ")
        };
        let theirs = tunnels.iter().map(|(a, n)| (n.clone(), a.to_string()));
        let ours = ours.iter().map(|(a, n)| (n.to_string(), a.to_string()));
        return Err(format!(
            "the running process serves tunnels [{}], this config [{}]; hand over only between the same tunnels (same names and listen addresses), or stop the old process first",
            list(theirs.collect()),
            list(ours.collect())
        ));
    }
    // The header only says what the sender claims: each descriptor itself must be a
    // listening TCP socket bound where our configuration listens (the kernel says so), or we
    // would serve a tunnel on whatever socket a confused or hostile holder passed.
    let mut fds = fds.into_iter();
    let mut out = Vec::with_capacity(tunnels.len());
    for (t, (listen, _)) in cfg.tunnels.iter().zip(&ours) {
        let mut want = listen.inet().expect("TCP: checked above");
        let mut ls = Vec::with_capacity(shards);
        for (shard, fd) in fds.by_ref().take(shards).enumerate() {
            // A configured port of 0 is resolved by the first listener; the others share it.
            want = crate::sys::check_tcp_listener(fd.as_fd(), want).map_err(|e| {
                format!(
                    "descriptor for tunnel {:?} (shard {shard}, configured {}): {e}",
                    t.name, t.listen
                )
            })?;
            ls.push(std::net::TcpListener::from(fd));
        }
        out.push(ls);
    }
    let m = fds.next();
    // The metrics socket is reused only if we serve metrics on the same address.
    let m = match (m, metrics, cfg.metrics) {
        (Some(fd), Some(theirs), Some(mine)) if ListenAddr::new(mine).matches(theirs) => {
            crate::sys::check_tcp_listener(fd.as_fd(), mine)
                .map_err(|e| format!("descriptor for the metrics endpoint ({mine}): {e}"))?;
            Some(std::net::TcpListener::from(fd))
        }
        _ => None,
    };
    Ok((shards, out, m))
}

/// A successor that took the listening sockets: the socket it asked on, on which the
/// established connections go next (`transfer.rs`), and what it said it can read.
pub(super) struct Successor {
    pub conn: UnixStream,
    pub hello: Hello,
}

/// What a successor says first: `sealpipe-handoff 1 take pid=N [conns=V,...]`, the versions
/// of connection state it reads (`conn::core::migrate`). A successor of an earlier release
/// lists none: it takes the listening sockets only, and the old process drains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Hello {
    pub pid: u32,
    pub conn_versions: Vec<u16>,
}

impl Hello {
    /// This process's hello.
    pub fn ours() -> Hello {
        Hello {
            pid: std::process::id(),
            conn_versions: vec![crate::proxy::conn::core::migrate::STATE_VERSION],
        }
    }

    pub fn encode(&self) -> String {
        let mut s = format!("{HANDOFF_MAGIC} take pid={}", self.pid);
        if !self.conn_versions.is_empty() {
            let v: Vec<String> = self.conn_versions.iter().map(u16::to_string).collect();
            s.push_str(&format!(" conns={}", v.join(",")));
        }
        s.push('\n');
        s
    }

    /// Parses a hello line (without its newline). Unknown `key=value` words are ignored: a
    /// later release may say more.
    pub fn parse(line: &str) -> Result<Hello, HeaderError> {
        let rest = line
            .strip_prefix(HANDOFF_MAGIC)
            .and_then(|r| r.strip_prefix(" take"))
            .ok_or(HeaderError::NotHandoff)?;
        let bad = || HeaderError::BadLine(line.to_string());
        let (mut pid, mut conn_versions) = (None, Vec::new());
        for word in rest.split_whitespace() {
            match word.split_once('=') {
                Some(("pid", v)) => pid = Some(v.parse().map_err(|_| bad())?),
                Some(("conns", v)) => {
                    conn_versions = v
                        .split(',')
                        .map(|v| v.parse::<u16>())
                        .collect::<Result<_, _>>()
                        .map_err(|_| bad())?;
                    if conn_versions.len() > 16 {
                        return Err(bad());
                    }
                }
                Some(_) => {}
                None => return Err(bad()),
            }
        }
        Ok(Hello {
            pid: pid.ok_or_else(bad)?,
            conn_versions,
        })
    }

    /// Whether the successor reads connection state of `version`.
    pub fn reads(&self, version: u16) -> bool {
        self.conn_versions.contains(&version)
    }
}

/// The running side: listens on the handoff path and answers a successor.
pub(super) struct HandoffServer {
    path: PathBuf,
    listener: UnixListener,
    header: String,
    /// Duplicates of every listening socket (tunnel-major, shard order, then metrics): what
    /// is sent. Dropped when this process hands over or drains, so that a drained process
    /// does not keep a listening socket open that nobody accepts on.
    fds: Vec<OwnedFd>,
}

impl HandoffServer {
    pub(super) fn listen(
        path: &Path,
        cfg: &Config,
        addrs: &[SocketAddr],
        dups: Vec<Vec<OwnedFd>>,
        metrics: Option<(SocketAddr, OwnedFd)>,
        shards: usize,
    ) -> std::io::Result<HandoffServer> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        // A stale socket from a process that is gone (the connect in `take_listeners`
        // failed, or it handed over to us) is replaced; anything else at the path is not.
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.file_type().is_socket() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "path exists and is not a socket",
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        // Whoever connects takes our listeners: only our own user may.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let mut fds: Vec<OwnedFd> = dups.into_iter().flatten().collect();
        let header = Header {
            shards,
            tunnels: (cfg.tunnels.iter())
                .zip(addrs)
                .map(|(t, a)| (*a, t.name.clone()))
                .collect(),
            metrics: metrics.as_ref().map(|(a, _)| *a),
        }
        .encode();
        fds.extend(metrics.map(|(_, fd)| fd));
        tracing::info!(path = %path.display(), "listening for a handoff");
        Ok(HandoffServer {
            path: path.to_owned(),
            listener,
            header,
            fds,
        })
    }

    /// Answers a successor if one connected: `Some` when it took the listeners.
    pub(super) fn poll(&mut self) -> Option<Successor> {
        let mut conn = match self.listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "handoff: accept failed");
                return None;
            }
        };
        match self.answer(&mut conn) {
            Ok(hello) => {
                tracing::info!(path = %self.path.display(), successor_pid = hello.pid, "listening sockets handed over; draining");
                Some(Successor { conn, hello })
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "handoff failed; still serving");
                None
            }
        }
    }

    fn answer(&self, conn: &mut UnixStream) -> std::io::Result<Hello> {
        // The socket's mode (0600) already keeps other users out; this holds even if the path
        // or its directory were opened up by mistake.
        let (theirs, ours) = (crate::sys::peer_uid(conn)?, crate::sys::euid());
        if theirs != ours {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "refused a successor running as uid {theirs} (this process runs as uid {ours})"
                ),
            ));
        }
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(HANDOFF_TIMEOUT))?;
        conn.set_write_timeout(Some(HANDOFF_TIMEOUT))?;
        let line = read_line(conn)?;
        let hello = Hello::parse(&line).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unexpected request {line:?}: {e}"),
            )
        })?;
        crate::sys::send_fds(
            conn,
            self.header.as_bytes(),
            &crate::sys::borrow_all(&self.fds),
        )?;
        let reply = read_line(conn)?;
        if reply == "OK" {
            Ok(hello)
        } else {
            Err(std::io::Error::other(format!(
                "the successor declined: {reply}"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let text = "[[tunnel]]\nname = \"a\"\nmode = \"forward\"\nlisten = \"127.0.0.1:1\"\ntargets = [\"127.0.0.1:2\"]\n[[tunnel]]\nname = \"b.c\"\nmode = \"forward\"\nlisten = \"127.0.0.1:3\"\ntargets = [\"127.0.0.1:2\"]\n";
        crate::config::ConfigFile::parse(Path::new("t.toml"), text)
            .unwrap()
            .validate(None)
            .unwrap()
    }

    fn header() -> Header {
        Header {
            shards: 3,
            tunnels: vec![
                ("127.0.0.1:1".parse().unwrap(), "a".into()),
                ("[::1]:3".parse().unwrap(), "b.c".into()),
            ],
            metrics: Some("127.0.0.1:9".parse().unwrap()),
        }
    }

    #[test]
    fn a_hello_round_trips_and_an_older_one_moves_no_connection() {
        let ours = Hello::ours();
        let line = ours.encode();
        assert!(line.ends_with('\n'));
        assert_eq!(Hello::parse(line.trim_end()), Ok(ours));
        // Today's release before this one: listeners only.
        let old = Hello::parse(&format!("{HANDOFF_MAGIC} take pid=42")).unwrap();
        assert_eq!(old.pid, 42);
        assert!(!old.reads(crate::proxy::conn::core::migrate::STATE_VERSION));
        // A later one, saying more.
        let later = Hello::parse(&format!("{HANDOFF_MAGIC} take pid=7 conns=1,2 x=y")).unwrap();
        assert!(later.reads(1) && later.reads(2));
        for bad in [
            "GET /".to_string(),
            format!("{HANDOFF_MAGIC} take"),
            format!("{HANDOFF_MAGIC} take pid=x"),
            format!("{HANDOFF_MAGIC} take pid=1 conns=70000"),
            format!("{HANDOFF_MAGIC} take pid=1 conns="),
            format!("{HANDOFF_MAGIC} take pid=1 junk"),
        ] {
            assert!(Hello::parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_header_round_trips() {
        let h = header();
        assert_eq!(Header::parse(&h.encode()), Ok(h.clone()));
        assert_eq!(h.descriptors(), Some(7));
        let bare = Header {
            metrics: None,
            tunnels: Vec::new(),
            ..h
        };
        assert_eq!(Header::parse(&bare.encode()), Ok(bare));
    }

    #[test]
    fn a_truncated_header_is_refused() {
        let text = header().encode();
        for cut in 0..text.len() {
            let e = Header::parse(&text[..cut]);
            assert_eq!(e, Err(HeaderError::Truncated), "cut at {cut}");
        }
    }

    #[test]
    fn another_magic_or_version_is_refused() {
        for first in [
            "sealpipe-handoff 2",
            "sealpipe-handoff",
            "GET / HTTP/1.1",
            "",
        ] {
            let text = header().encode().replacen(HANDOFF_MAGIC, first, 1);
            assert_eq!(
                Header::parse(&text),
                Err(HeaderError::NotHandoff),
                "{first:?}"
            );
        }
    }

    #[test]
    fn unknown_and_malformed_lines_are_refused() {
        let text = header().encode();
        let with = |extra: &str| text.replacen("end\n", &format!("{extra}\nend\n"), 1);
        assert_eq!(
            Header::parse(&with("conns 5")),
            Err(HeaderError::UnknownLine("conns 5".into()))
        );
        for bad in [
            "shards x",
            "tunnel 127.0.0.1:1",
            "tunnel nowhere a",
            "tunnel 127.0.0.1:1 ",
            "metrics 9",
        ] {
            let e = Header::parse(&with(bad)).unwrap_err();
            assert!(
                matches!(e, HeaderError::BadLine(_) | HeaderError::Repeated(_)),
                "{bad:?}: {e:?}"
            );
        }
        assert_eq!(
            Header::parse(&text.replacen("shards 3", "shards 0", 1)),
            Err(HeaderError::BadLine("shards 0".into()))
        );
    }

    #[test]
    fn absurd_numbers_are_refused_not_a_panic() {
        for shards in [usize::MAX, usize::MAX / 2 + 1, 127, 254] {
            let text = header()
                .encode()
                .replacen("shards 3", &format!("shards {shards}"), 1);
            assert!(
                matches!(Header::parse(&text), Err(HeaderError::TooMany { .. })),
                "{shards}"
            );
        }
        let huge = format!("{HANDOFF_MAGIC}\nshards 99999999999999999999999\nend\n");
        assert!(matches!(Header::parse(&huge), Err(HeaderError::BadLine(_))));
        let h = format!(
            "{HANDOFF_MAGIC}\nshards {}\ntunnel 127.0.0.1:1 a\ntunnel 127.0.0.1:3 b.c\nend\n",
            usize::MAX
        );
        assert!(parse_and_match(&h, Vec::new(), &config()).is_err());
    }

    #[test]
    fn descriptor_counts_that_do_not_match_are_refused() {
        let h = Header {
            shards: 2,
            tunnels: vec![
                ("127.0.0.1:1".parse().unwrap(), "a".into()),
                ("127.0.0.1:3".parse().unwrap(), "b.c".into()),
            ],
            metrics: None,
        };
        let fds: Vec<OwnedFd> = (0..3)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .as_fd()
                    .try_clone_to_owned()
                    .unwrap()
            })
            .collect();
        let e = match_config(&h, fds, &config()).unwrap_err();
        assert_eq!(e, "got 3 descriptors for 2 tunnels x 2 shards");
    }

    #[test]
    fn other_tunnels_are_refused_before_any_descriptor_is_looked_at() {
        let mut h = header();
        h.metrics = None;
        h.shards = 1;
        h.tunnels[1].1 = "renamed".into();
        let fds: Vec<OwnedFd> = (0..2)
            .map(|_| std::io::stdin().as_fd().try_clone_to_owned().unwrap())
            .collect();
        let e = match_config(&h, fds, &config()).unwrap_err();
        assert!(e.contains("hand over only between the same tunnels"), "{e}");
    }

    #[test]
    fn a_unix_listener_of_ours_refuses_the_listeners_offered() {
        let text = "[[tunnel]]\nname = \"a\"\nmode = \"forward\"\nlisten = \"unix:/run/sealpipe-test/a.sock\"\ntargets = [\"127.0.0.1:2\"]\n";
        let cfg = crate::config::ConfigFile::parse(Path::new("t.toml"), text)
            .unwrap()
            .validate(None)
            .unwrap();
        let h = Header {
            shards: 1,
            tunnels: vec![("127.0.0.1:1".parse().unwrap(), "a".into())],
            metrics: None,
        };
        let fds = vec![std::io::stdin().as_fd().try_clone_to_owned().unwrap()];
        let e = match_config(&h, fds, &cfg).unwrap_err();
        assert!(
            e.contains("tunnel \"a\" listens on a Unix socket, which the handoff does not carry"),
            "{e}"
        );
    }
}
