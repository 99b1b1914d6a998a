//! What std and socket2 lack, through rustix's safe wrappers: process resource limits, the
//! process's protection against dumps and tracing, passing descriptors over a Unix socket
//! (SCM_RIGHTS) for the handoff of listeners and established connections, and the checks a
//! received descriptor must pass.
//!
//! Invariants:
//! - Received descriptors become `OwnedFd`s inside rustix at once, so none leaks and none is
//!   closed twice; a message whose descriptors were truncated is refused (and those that did
//!   arrive are closed).
//! - The `unsafe` left in the crate is in three functions, each allowed on that function
//!   alone with its `// SAFETY:` lines: [`trim_heap`] (glibc's `malloc_trim` belongs to the C
//!   library's allocator, which rustix does not wrap: it talks to the kernel, not to libc's
//!   heap), [`listen_fds`] (systemd passes sockets as bare descriptor numbers, and nothing
//!   safe turns a number into an owned descriptor) and [`account_id`] (user and group names are
//!   the C library's, through NSS: `getpwnam_r`/`getgrnam_r`, which rustix does not wrap
//!   either).
//! - [`listen_fds`] takes systemd's descriptors once per process, only when `LISTEN_PID` names
//!   this process, and only descriptors that are open: none is owned twice, none that belongs
//!   to something else is wrapped.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketType, sockopt,
};
use rustix::process::{DumpableBehavior, Resource, Rlimit};

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns (old soft, new soft).
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let lim = rustix::process::getrlimit(Resource::Nofile);
    // `None` is RLIM_INFINITY.
    let old = lim.current.unwrap_or(u64::MAX);
    let max = lim.maximum.unwrap_or(u64::MAX);
    if old < max {
        rustix::process::setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        )?;
    }
    Ok((old, max.max(old)))
}

/// The soft RLIMIT_NOFILE now (`u64::MAX` when unlimited).
pub fn nofile_limit() -> u64 {
    rustix::process::getrlimit(Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

/// Makes this process refuse to be dumped or traced by others: `PR_SET_DUMPABLE` 0 (no core
/// file, no ptrace attach and no `/proc/PID/mem` for other processes of the same user, the
/// process's `/proc` files owned by root) and a soft core size limit of 0. Called once at
/// start, before any key is read; `sealpipe --dumpable` skips it for debugging.
pub fn protect_process() -> io::Result<()> {
    rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    let core = rustix::process::getrlimit(Resource::Core);
    rustix::process::setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: core.maximum,
        },
    )?;
    Ok(())
}

/// Whether this process is dumpable now (see [`protect_process`]).
pub fn is_dumpable() -> io::Result<bool> {
    Ok(rustix::process::dumpable_behavior()? != DumpableBehavior::NotDumpable)
}

/// Most descriptors one [`send_fds`] message carries (the handoff sends one per tunnel per
/// shard, plus the metrics listener).
pub const MAX_FDS: usize = 253;

/// Sends `data` and, as SCM_RIGHTS ancillary data, duplicates of `fds` over a Unix stream
/// socket in one `sendmsg`. The caller keeps its own copies.
pub fn send_fds(sock: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS || data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "send_fds: no data or too many descriptors",
        ));
    }
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("send_fds: control buffer too small"));
    }
    loop {
        match rustix::net::sendmsg(
            sock,
            &[IoSlice::new(data)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) if n < data.len() => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "send_fds: short write",
                ));
            }
            Ok(_) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends all of `data` with `fds` (SCM_RIGHTS, at most [`MAX_FDS`]) attached to its first
/// bytes: one `sendmsg`, and plain writes for whatever a blocking socket did not take at once
/// (a large message, a send timeout). The caller keeps its own copies of the descriptors.
pub fn send_all_with_fds(sock: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    use std::io::Write;
    if fds.len() > MAX_FDS || data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "send_all_with_fds: no data or too many descriptors",
        ));
    }
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other(
            "send_all_with_fds: control buffer too small",
        ));
    }
    let sent = loop {
        match rustix::net::sendmsg(
            sock,
            &[IoSlice::new(data)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) => break n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    // The descriptors went with the first byte; the rest is a plain byte stream.
    let mut s = sock;
    s.write_all(&data[sent..])
}

/// Receives one message sent by [`send_fds`]: its bytes into `buf` and its descriptors,
/// which are owned (closed on drop) and close-on-exec. Returns (bytes read, descriptors).
/// A message whose descriptors did not fit is an error (and those that did arrive are closed).
pub fn recv_fds(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = loop {
        match rustix::net::recvmsg(
            sock,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(m) => break m,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(got) = m {
            fds.extend(got);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "recv_fds: descriptors truncated",
        ));
    }
    Ok((msg.bytes, fds))
}

/// The uid of the process at the other end of a Unix stream socket (SO_PEERCRED: the
/// credentials it had when it connected, or when it listened for the accepting side).
pub fn peer_uid(sock: &UnixStream) -> io::Result<u32> {
    Ok(sockopt::socket_peercred(sock)?.uid.as_raw())
}

/// This process's effective uid (what SO_PEERCRED reports for it to a peer).
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Why a descriptor received in a handoff is not what it should be (the listener the
/// configuration expects, or an established connection).
#[derive(Debug, thiserror::Error)]
pub enum ListenerCheck {
    #[error("cannot inspect it: {0}")]
    Io(#[from] io::Error),
    #[error("it is not a TCP socket (type {0:?}, family {1:?})")]
    NotTcp(SocketType, AddressFamily),
    #[error("it is neither a TCP nor a Unix stream socket (type {0:?}, family {1:?})")]
    NotStream(SocketType, AddressFamily),
    #[error("it is a TCP socket that does not listen (SO_ACCEPTCONN is 0)")]
    NotListening,
    #[error("it is a listening socket, not a connection")]
    Listening,
    #[error("it listens on {got}, not on {want}")]
    WrongAddress { got: SocketAddr, want: SocketAddr },
}

/// Checks that `fd` is a listening TCP socket bound to `want` (a port of 0 in `want` accepts
/// any port on its address) by asking the kernel (SO_TYPE, SO_DOMAIN, SO_ACCEPTCONN,
/// getsockname), never by trusting what the sender said; returns the address it is bound to.
pub fn check_tcp_listener(
    fd: BorrowedFd<'_>,
    want: SocketAddr,
) -> Result<SocketAddr, ListenerCheck> {
    let ty = sockopt::socket_type(fd).map_err(io::Error::from)?;
    let family = sockopt::socket_domain(fd).map_err(io::Error::from)?;
    if ty != SocketType::STREAM
        || !(family == AddressFamily::INET || family == AddressFamily::INET6)
    {
        return Err(ListenerCheck::NotTcp(ty, family));
    }
    if !sockopt::socket_acceptconn(fd).map_err(io::Error::from)? {
        return Err(ListenerCheck::NotListening);
    }
    let got = socket2::SockRef::from(&fd)
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("getsockname returned no IP address"))?;
    let same = got == want || (want.port() == 0 && got.ip() == want.ip());
    if !same {
        return Err(ListenerCheck::WrongAddress { got, want });
    }
    Ok(got)
}

/// Checks that `fd` is a connection's stream socket, TCP or Unix (an established connection a
/// predecessor handed over: its client, or its upstream, which a `unix:` target makes a Unix
/// stream): SO_TYPE, SO_DOMAIN, not listening, and for a Unix stream a peer the kernel knows.
/// Returns the peer's address for a connected TCP socket, `None` for a Unix stream (its peer
/// has no IP address) and for a TCP socket the kernel no longer calls connected.
///
/// That last is a connection that ended on its way (its peer reset it, or it timed out,
/// between the predecessor's export and this check): routine with thousands of clients, and
/// taken like any other, to end on its first read in the successor with the kernel's error
/// (refusing it left it with the predecessor, under a warning, as if the move had failed). A
/// TCP socket never connected reads the same to getpeername and ends the same way; a
/// predecessor exports only established connections.
pub fn check_connection(fd: BorrowedFd<'_>) -> Result<Option<SocketAddr>, ListenerCheck> {
    let ty = sockopt::socket_type(fd).map_err(io::Error::from)?;
    let family = sockopt::socket_domain(fd).map_err(io::Error::from)?;
    let inet = family == AddressFamily::INET || family == AddressFamily::INET6;
    if ty != SocketType::STREAM || !(inet || family == AddressFamily::UNIX) {
        return Err(ListenerCheck::NotStream(ty, family));
    }
    if sockopt::socket_acceptconn(fd).map_err(io::Error::from)? {
        return Err(ListenerCheck::Listening);
    }
    // getpeername fails (ENOTCONN) on a socket that is not connected, of either family.
    let peer = match socket2::SockRef::from(&fd).peer_addr() {
        Err(e) if inet && e.raw_os_error() == Some(Errno::NOTCONN.raw_os_error()) => {
            return Ok(None);
        }
        r => r?,
    };
    if !inet {
        return Ok(None);
    }
    let peer = peer
        .as_socket()
        .ok_or_else(|| io::Error::other("getpeername returned no IP address"))?;
    Ok(Some(peer))
}

/// Borrows each descriptor of `fds` (what [`send_fds`] takes).
pub fn borrow_all(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(AsFd::as_fd).collect()
}

/// Why systemd's socket-activation variables cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("{var} is {value:?}, not a number")]
    NotANumber { var: &'static str, value: String },
    #[error("LISTEN_FDS says {count} sockets, but descriptor {fd} is not open")]
    NotOpen { count: usize, fd: i32 },
    #[error("descriptor {fd}: {source}")]
    Io { fd: i32, source: io::Error },
}

/// systemd's first passed descriptor (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// The sockets systemd passed to this process (socket activation, sd_listen_fds(3)): each
/// with its name from `LISTEN_FDNAMES` (`FileDescriptorName=` in the .socket unit,
/// `--fdname` of systemd-socket-activate; `unknown` when unnamed), owned and close-on-exec.
/// Empty unless `LISTEN_PID` is this process's id, and on every call after the first. The
/// variables are left in the environment (removing them is unsound once threads run);
/// `LISTEN_PID` keeps any child from taking them.
#[allow(unsafe_code)]
pub fn listen_fds() -> Result<Vec<(String, OwnedFd)>, ActivationError> {
    use std::os::fd::FromRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let var = |name| std::env::var(name).ok();
    let number = |name: &'static str, value: String| {
        value
            .trim()
            .parse::<usize>()
            .map_err(|_| ActivationError::NotANumber { var: name, value })
    };
    let Some(pid) = var("LISTEN_PID") else {
        return Ok(Vec::new());
    };
    if number("LISTEN_PID", pid)? != std::process::id() as usize
        || TAKEN.swap(true, Ordering::AcqRel)
    {
        return Ok(Vec::new());
    }
    let count = number("LISTEN_FDS", var("LISTEN_FDS").unwrap_or_default())?;
    let names: Vec<String> = match var("LISTEN_FDNAMES") {
        Some(n) if n.split(':').count() == count => n.split(':').map(str::to_owned).collect(),
        _ => vec!["unknown".to_owned(); count],
    };
    let mut out = Vec::with_capacity(count);
    for (i, name) in names.into_iter().enumerate() {
        let fd = LISTEN_FDS_START + i32::try_from(i).unwrap_or(i32::MAX - LISTEN_FDS_START);
        // SAFETY: `fd` is only borrowed for the duration of this F_GETFD, which fails with
        // EBADF rather than touching anything if it is not open.
        let open = rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(fd) }).is_ok();
        if !open {
            return Err(ActivationError::NotOpen { count, fd });
        }
        // SAFETY: systemd hands descriptors LISTEN_FDS_START.. to the process LISTEN_PID
        // names, which is this one (checked above), open (checked above) and used by nothing
        // else in it: this function takes them at most once per process (TAKEN), and nothing
        // else in sealpipe refers to descriptors by number.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC).map_err(|e| {
            ActivationError::Io {
                fd,
                source: e.into(),
            }
        })?;
        out.push((name, owned));
    }
    Ok(out)
}

/// Checks that `fd` is a listening TCP socket (what systemd passes for a `ListenStream=` of
/// an IP address) and returns the address it listens on.
pub fn check_any_tcp_listener(fd: BorrowedFd<'_>) -> Result<SocketAddr, ListenerCheck> {
    let any = SocketAddr::from(([0, 0, 0, 0], 0));
    match check_tcp_listener(fd, any) {
        Err(ListenerCheck::WrongAddress { got, .. }) => Ok(got),
        other => other,
    }
}

/// Returns freed heap memory to the kernel (glibc keeps freed pages of its heap resident;
/// after a burst of connections that is most of the process's RSS). Cheap when there is
/// little to trim; callers rate-limit it anyway.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim_heap() {
    // SAFETY: malloc_trim takes a plain integer and only touches the allocator's own state,
    // which is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim_heap() {}

/// A user (`group` false) or group id from a name or a number, for a Unix socket's owner
/// (`listen_owner`, `listen_group`): a number is taken as it is, a name looked up as the C
/// library does (`/etc/passwd`, `/etc/group`, and whatever NSS adds: LDAP, systemd's dynamic
/// users).
#[allow(unsafe_code)]
pub fn account_id(name: &str, group: bool) -> io::Result<u32> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let what = if group { "group" } else { "user" };
    let missing = || io::Error::new(io::ErrorKind::NotFound, format!("no {what} named {name:?}"));
    let c_name = std::ffi::CString::new(name).map_err(|_| missing())?;
    let mut buf = vec![0 as libc::c_char; 1024];
    loop {
        let mut id = None;
        // SAFETY: `c_name` is a NUL-terminated string, `buf` a writable buffer of `buf.len()`
        // bytes and the record and result pointers point at locals: all outlive the call,
        // which writes the record's strings into `buf` only. The record is read (its id, a
        // plain integer) only when the call returned 0 and set `found` to the record.
        let rc = unsafe {
            if group {
                let mut rec = MaybeUninit::<libc::group>::uninit();
                let mut found: *mut libc::group = std::ptr::null_mut();
                let rc = libc::getgrnam_r(
                    c_name.as_ptr(),
                    rec.as_mut_ptr(),
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut found,
                );
                if rc == 0 && !found.is_null() {
                    id = Some((*found).gr_gid);
                }
                rc
            } else {
                let mut rec = MaybeUninit::<libc::passwd>::uninit();
                let mut found: *mut libc::passwd = std::ptr::null_mut();
                let rc = libc::getpwnam_r(
                    c_name.as_ptr(),
                    rec.as_mut_ptr(),
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut found,
                );
                if rc == 0 && !found.is_null() {
                    id = Some((*found).pw_uid);
                }
                rc
            }
        };
        match rc {
            0 => return id.ok_or_else(missing),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// The accepted end of a loopback TCP connection its peer has reset (SO_LINGER 0), once the
/// kernel no longer calls it connected (tests of what a moved, reset connection does).
#[cfg(test)]
pub(crate) fn reset_connection() -> std::net::TcpStream {
    use std::time::{Duration, Instant};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (a, _) = l.accept().unwrap();
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.peer_addr().is_ok() {
        assert!(Instant::now() < deadline, "the reset never arrived");
        std::thread::yield_now();
    }
    a
}

#[cfg(test)]
mod tests {
    #[test]
    fn accounts_are_numbers_or_names_the_system_knows() {
        use super::account_id;
        assert_eq!(account_id("0", false).unwrap(), 0);
        assert_eq!(account_id("4242", true).unwrap(), 4242);
        // Every Linux system has root, user and group.
        assert_eq!(account_id("root", false).unwrap(), 0);
        assert_eq!(account_id("root", true).unwrap(), 0);
        let e = account_id("no-such-user-sealpipe", false).unwrap_err();
        assert!(e.to_string().contains("no user named"), "{e}");
        let e = account_id("no-such-group-sealpipe", true).unwrap_err();
        assert!(e.to_string().contains("no group named"), "{e}");
    }

    use super::*;

    #[test]
    fn descriptors_cross_a_socket_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        send_fds(&a, b"hello", &[l.as_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = recv_fds(&b, &mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"hello"[..], 1));
        assert_eq!(check_tcp_listener(fds[0].as_fd(), addr).unwrap(), addr);
        assert_eq!(peer_uid(&b).unwrap(), euid());
    }

    #[test]
    fn listener_check_refuses_what_is_not_the_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(matches!(
            check_tcp_listener(udp.as_fd(), addr),
            Err(ListenerCheck::NotTcp(..))
        ));
        let conn = std::net::TcpStream::connect(addr).unwrap();
        assert!(matches!(
            check_tcp_listener(conn.as_fd(), addr),
            Err(ListenerCheck::NotListening)
        ));
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(matches!(
            check_tcp_listener(other.as_fd(), addr),
            Err(ListenerCheck::WrongAddress { .. })
        ));
        let (ua, _ub) = UnixStream::pair().unwrap();
        assert!(matches!(
            check_tcp_listener(ua.as_fd(), addr),
            Err(ListenerCheck::NotTcp(..))
        ));
        let any_port = SocketAddr::new(addr.ip(), 0);
        assert_eq!(check_tcp_listener(l.as_fd(), any_port).unwrap(), addr);
    }

    #[test]
    fn a_large_message_and_its_descriptors_cross_whole() {
        let (a, b) = UnixStream::pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sender = {
            let data = data.clone();
            let fd = c.as_fd().try_clone_to_owned().unwrap();
            std::thread::spawn(move || send_all_with_fds(&a, &data, &[fd.as_fd()]).unwrap())
        };
        let mut got = vec![0u8; data.len()];
        let mut fds = Vec::new();
        let mut n = 0;
        while n < got.len() {
            let (k, f) = recv_fds(&b, &mut got[n..]).unwrap();
            assert!(k > 0);
            fds.extend(f);
            n += k;
        }
        sender.join().unwrap();
        assert!(got == data);
        assert_eq!(fds.len(), 1);
        assert_eq!(
            check_connection(fds[0].as_fd()).unwrap(),
            Some(l.local_addr().unwrap())
        );
        assert!(matches!(
            check_connection(l.as_fd()),
            Err(ListenerCheck::Listening)
        ));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(matches!(
            check_connection(udp.as_fd()),
            Err(ListenerCheck::NotStream(..))
        ));
        // A connected Unix stream (a `unix:` target's upstream) passes; a listening one and
        // one that is not connected do not.
        let (x, _y) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(check_connection(x.as_fd()).unwrap(), None);
        let dir = std::env::temp_dir().join(format!("sealpipe-sys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ul = std::os::unix::net::UnixListener::bind(dir.join("l.sock")).unwrap();
        assert!(matches!(
            check_connection(ul.as_fd()),
            Err(ListenerCheck::Listening)
        ));
        let unconnected =
            socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        assert!(check_connection(unconnected.as_fd()).is_err());
        // A TCP connection reset since (it ended on its way) passes, with no peer.
        let a = reset_connection();
        assert_eq!(check_connection(a.as_fd()).unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_protected_process_is_not_dumpable_and_writes_no_core() {
        // Changes this test process too: nothing in the unit tests needs a core file.
        protect_process().unwrap();
        assert!(!is_dumpable().unwrap());
        assert_eq!(rustix::process::getrlimit(Resource::Core).current, Some(0));
    }

    #[test]
    fn nofile_limit_is_raised_to_the_hard_limit() {
        let (_, now) = raise_nofile_limit().unwrap();
        assert_eq!(nofile_limit(), now);
        let hard = rustix::process::getrlimit(Resource::Nofile).maximum;
        assert_eq!(Some(now), hard.or(Some(u64::MAX)));
    }
}
