//! [`Stream`]: the byte streams a [`Socket`](crate::Socket) carries, TCP or a Unix domain
//! socket, and [`Endpoint`], where one connects to.
//!
//! The two kinds differ in how they connect, name their ends and take socket options (TCP_NODELAY
//! and keepalive are TCP's); once connected, both are a file descriptor read and written with the
//! same system calls. So a `Stream` is an enum, not a trait object: every read and write matches
//! the kind once, a branch that is the same for the whole life of a socket (perfectly predicted)
//! beside a system call, and the TCP path keeps its vectored reads and writes as they were. A
//! listener's kind is a type parameter instead ([`crate::listener::Accept`]): accept loops are
//! compiled once per kind.
//!
//! Invariants: a `Stream` forwards every `Read`/`Write` method the buffers use (`read_vectored`
//! and `write_vectored` included) to the kind it holds, so nothing is lost to a default method;
//! it adds no state of its own.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;

use mio::event::Source;
use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};

/// A connected (or connecting) stream socket.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Where to connect: a TCP address, or the path of a Unix domain socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint<'a> {
    Tcp(SocketAddr),
    Unix(&'a Path),
}

impl From<SocketAddr> for Endpoint<'_> {
    fn from(a: SocketAddr) -> Self {
        Endpoint::Tcp(a)
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Stream {
        Stream::Tcp(s)
    }
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Stream {
        Stream::Unix(s)
    }
}

/// `$s` bound to the inner stream, whichever kind it is.
macro_rules! each {
    ($stream:expr, $s:ident => $e:expr) => {
        match $stream {
            Stream::Tcp($s) => $e,
            Stream::Unix($s) => $e,
        }
    };
}

impl Stream {
    /// Starts a non-blocking connect (a TCP one completes later; a Unix one at once, or fails).
    pub fn connect(to: Endpoint<'_>) -> io::Result<Stream> {
        Ok(match to {
            Endpoint::Tcp(a) => Stream::Tcp(TcpStream::connect(a)?),
            Endpoint::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
        })
    }

    /// A connected stream socket that came from elsewhere (another process passed it, in a
    /// live upgrade): TCP or Unix as the kernel says it is (`SO_DOMAIN`), made non-blocking.
    /// A socket that is not a stream, or of another family, is refused (`InvalidInput`).
    pub fn from_connected(fd: OwnedFd) -> io::Result<Stream> {
        let sock = socket2::SockRef::from(&fd);
        if sock.r#type()? != socket2::Type::STREAM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a stream socket",
            ));
        }
        let domain = sock.domain()?;
        sock.set_nonblocking(true)?;
        if domain == socket2::Domain::UNIX {
            let s = std::os::unix::net::UnixStream::from(fd);
            Ok(Stream::Unix(UnixStream::from_std(s)))
        } else if domain == socket2::Domain::IPV4 || domain == socket2::Domain::IPV6 {
            let s = std::net::TcpStream::from(fd);
            Ok(Stream::Tcp(TcpStream::from_std(s)))
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "neither a TCP nor a Unix domain socket",
            ))
        }
    }

    /// The TCP stream, if this is one (addresses, TCP options).
    pub fn as_tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Tcp(s) => Some(s),
            Stream::Unix(_) => None,
        }
    }

    pub fn as_unix(&self) -> Option<&UnixStream> {
        match self {
            Stream::Tcp(_) => None,
            Stream::Unix(s) => Some(s),
        }
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        each!(self, s => s.shutdown(how))
    }

    /// The pending error of the socket (SO_ERROR), clearing it.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        each!(self, s => s.take_error())
    }

    /// Whether the connect completed: `Ok(false)` while it is still in progress.
    pub fn connected(&self) -> io::Result<bool> {
        let peer = match self {
            Stream::Tcp(s) => s.peer_addr().map(drop),
            Stream::Unix(s) => s.peer_addr().map(drop),
        };
        match peer {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl Read for Stream {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        each!(self, s => s.read(buf))
    }
    #[inline]
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        each!(self, s => s.read_vectored(bufs))
    }
}

impl Read for &Stream {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        each!(*self, s => (&*s).read(buf))
    }
    #[inline]
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        each!(*self, s => (&*s).read_vectored(bufs))
    }
}

impl Write for Stream {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        each!(self, s => s.write(buf))
    }
    #[inline]
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        each!(self, s => s.write_vectored(bufs))
    }
    #[inline]
    fn flush(&mut self) -> io::Result<()> {
        each!(self, s => s.flush())
    }
}

impl Source for Stream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        each!(self, s => s.register(r, t, i))
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        each!(self, s => s.reregister(r, t, i))
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        each!(self, s => s.deregister(r))
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        each!(self, s => s.as_fd())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        each!(self, s => s.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unix_stream_reads_writes_and_shuts_down_like_a_tcp_one() {
        let dir = std::env::temp_dir().join(format!("sealpipe-stream-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut s = Stream::connect(Endpoint::Unix(&path)).unwrap();
        assert!(s.as_unix().is_some() && s.as_tcp().is_none());
        let (mut peer, _) = l.accept().unwrap();
        assert!(s.connected().unwrap(), "a Unix connect completes at once");
        assert_eq!(
            s.write_vectored(&[IoSlice::new(b"ab"), IoSlice::new(b"cd")])
                .unwrap(),
            4
        );
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"abcd");
        peer.write_all(b"xyz").unwrap();
        drop(peer);
        let mut buf = [0u8; 8];
        let n = loop {
            match (&s).read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break r.unwrap(),
            }
        };
        assert_eq!(&buf[..n], b"xyz");
        assert!(s.take_error().unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_passed_socket_is_taken_as_the_kind_the_kernel_says() {
        // Unix: one end of a pair, still blocking as passed.
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let s = Stream::from_connected(OwnedFd::from(a)).unwrap();
        assert!(s.as_unix().is_some());
        let mut buf = [0u8; 4];
        assert_eq!(
            (&s).read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "made non-blocking"
        );
        b.write_all(b"hi").unwrap();
        assert_eq!((&s).read(&mut buf).unwrap(), 2);
        // TCP.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let s = Stream::from_connected(OwnedFd::from(c)).unwrap();
        assert!(s.as_tcp().is_some() && s.connected().unwrap());
        // A datagram socket is refused.
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = Stream::from_connected(OwnedFd::from(u)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
