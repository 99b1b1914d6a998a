//! Client identity: who the client of a connection is, from the first socket to the backend.
//!
//! - **accept_proxy** (encrypt side, with `trusted_proxies`): a load balancer in front names
//!   its client in a PROXY header (v1 or v2, [`sealpipe_proxy_header`]) ahead of the client's
//!   bytes. A connection from a source outside `trusted_proxies` is refused at accept
//!   (`rejected{reason="untrusted_proxy"}`); a trusted one must send a valid header within the
//!   handshake timeout, or it is closed (`closed{reason="proxy_header"}`). The header's bytes
//!   never reach the decrypt side: its addresses go into the session's OPEN record with
//!   `proxied` set (LOCAL and UNKNOWN headers: an OPEN naming no client).
//! - **send_proxy** (decrypt side): the backend receives a PROXY header (v1 or v2) built from
//!   the OPEN before any client byte (an OPEN naming no client: `UNKNOWN` or `LOCAL`).
//! - **allow / deny** (any side): access lists checked at accept, before anything is allocated
//!   (`rejected{reason="acl"}`).
//! - **access_log**: see [`super::access_log`].
//!
//! The connection (`conn/mod.rs`, through its core's extension points) keeps an optional
//! [`ConnIdentity`] and calls in at four points: accept (the listener: [`admit_source`]), the
//! first client bytes (encrypt side: [`ConnIdentity::read_header`] as the core's client
//! preamble), the upstream connect (the OPEN to seal, or the header to send as the core's
//! upstream preamble), and close (the access log line, [`log_close`]). Everything else about
//! identity lives here.
//!
//! Invariants: at most [`MAX_HEADER_LEN`] client bytes are staged before the header is
//! parsed; the decrypt side's header is at the front of the backend's stream on every connect
//! attempt, once (the connection core moves it back in front of the client's bytes when a
//! connect fails); nothing here allocates for a tunnel that uses none of these settings.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use crate::config::{Mode, TunnelFile};
use crate::metrics::{CloseReason, RejectReason};
use crate::protocol::{ClientAddrs, KeyId, OpenInfo};
use crate::reactor::{Buffer, Context};

use super::access_log::{Dest, Record};
use super::cidr::CidrList;
use super::conn::core::migrate::IdentState;
pub use super::proxy_header::MAX_HEADER_LEN;
use super::proxy_header::{self, Addrs, Command, Encoded, Invalid, Parse, Version};
use super::upstream::TargetId;
use super::{ShardState, TunnelIdx};

/// A tunnel's identity settings, validated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Identity {
    /// `accept_proxy = true`: the sources allowed to send PROXY headers (every connection must
    /// come from one, and start with a header).
    pub trusted_proxies: Option<CidrList>,
    /// `send_proxy`: the header the backend receives.
    pub send_proxy: Option<Version>,
    pub access_log: Option<Dest>,
    /// `allow`: if not empty, only these sources may connect.
    pub allow: CidrList,
    /// `deny`: these sources may not connect (checked before `allow`).
    pub deny: CidrList,
}

impl Identity {
    /// Validates the identity keys of a `[[tunnel]]`; errors name the key (and the command
    /// line flag, for single-tunnel commands).
    pub fn validate(t: &TunnelFile) -> Result<Identity, String> {
        let list = |key: &str, items: &[String]| {
            CidrList::parse(items).map_err(|(i, e)| format!("{key}[{i}]: {e}"))
        };
        let trusted = list("trusted_proxies", &t.trusted_proxies)?;
        let trusted_proxies = match (t.accept_proxy, trusted.is_empty()) {
            (false, true) => None,
            (false, false) => {
                return Err("trusted_proxies is set but accept_proxy is not: set accept_proxy = true (--accept-proxy) to take client addresses from PROXY headers".into());
            }
            (true, true) => {
                return Err("accept_proxy = true (--accept-proxy) needs trusted_proxies (--trusted-proxy): the load balancers' addresses or ranges, e.g. [\"10.0.0.0/8\"]. Anyone else could claim any client address".into());
            }
            (true, false) if t.mode != Mode::Encrypt => {
                return Err(format!(
                    "accept_proxy (--accept-proxy) is for encrypt tunnels, where a load balancer relays plaintext clients; this tunnel is {}",
                    t.mode.as_str()
                ));
            }
            (true, false) => Some(trusted),
        };
        let send_proxy = match t.send_proxy.as_deref() {
            None => None,
            Some(_) if t.mode != Mode::Decrypt => {
                return Err(format!(
                    "send_proxy (--send-proxy) is for decrypt tunnels, which tell their backend who the client is; this tunnel is {}",
                    t.mode.as_str()
                ));
            }
            Some("v1") => Some(Version::V1),
            Some("v2") => Some(Version::V2),
            Some(v) => {
                return Err(format!(
                    "send_proxy (--send-proxy) must be \"v1\" or \"v2\", got {v:?}"
                ));
            }
        };
        let access_log = match t.access_log.as_deref() {
            None => None,
            Some(s) => Some(Dest::parse(s).map_err(|e| format!("{e} (--access-log)"))?),
        };
        Ok(Identity {
            trusted_proxies,
            send_proxy,
            access_log,
            allow: list("allow", &t.allow)?,
            deny: list("deny", &t.deny)?,
        })
    }

    /// True if a connection needs per-connection identity state.
    pub fn per_connection(&self) -> bool {
        self.trusted_proxies.is_some() || self.send_proxy.is_some() || self.access_log.is_some()
    }
}

/// Accept-time checks on the source address, before anything is allocated: the access lists,
/// then `trusted_proxies`.
pub fn admit_source(id: &Identity, source: IpAddr) -> Result<(), RejectReason> {
    if id.deny.contains(source) || (!id.allow.is_empty() && !id.allow.contains(source)) {
        return Err(RejectReason::Acl);
    }
    if id
        .trusted_proxies
        .as_ref()
        .is_some_and(|t| !t.contains(source))
    {
        return Err(RejectReason::UntrustedProxy);
    }
    Ok(())
}

/// Counts and logs (rate-limited) a connection [`admit_source`] refused.
pub fn refused(
    cx: &mut Context<'_, ShardState>,
    tunnel: TunnelIdx,
    reason: RejectReason,
    peer: SocketAddr,
) {
    cx.state.tunnels[tunnel].metrics.rejected(reason);
    let now = cx.now();
    let level_on = match reason {
        RejectReason::UntrustedProxy => tracing::enabled!(tracing::Level::WARN),
        _ => tracing::enabled!(tracing::Level::INFO),
    };
    if !level_on {
        return;
    }
    let Some(skipped) = cx.state.may_warn(now) else {
        return;
    };
    let name = &cx.state.tunnels[tunnel].cfg.name;
    match reason {
        RejectReason::UntrustedProxy => {
            tracing::warn!(tunnel = %name, source = %peer, skipped, "connection refused: accept_proxy is on and the source is not in trusted_proxies (it could claim any client address)")
        }
        _ => {
            tracing::info!(tunnel = %name, source = %peer, skipped, "connection refused by the access list (allow / deny)")
        }
    }
}

/// Logs (rate-limited) why a client's PROXY header was refused; `got`: bytes it sent. A
/// connection closed before a single byte (a TCP health check) is a debug line.
pub fn header_failed(
    cx: &mut Context<'_, ShardState>,
    tunnel: TunnelIdx,
    peer: Option<SocketAddr>,
    e: HeaderError,
    got: u64,
) {
    let quiet = e == HeaderError::Eof && got == 0;
    let on = if quiet {
        tracing::enabled!(tracing::Level::DEBUG)
    } else {
        tracing::enabled!(tracing::Level::WARN)
    };
    let now = cx.now();
    if !on {
        return;
    }
    let Some(skipped) = cx.state.may_warn(now) else {
        return;
    };
    let name = &cx.state.tunnels[tunnel].cfg.name;
    let peer = peer.map(|p| p.to_string()).unwrap_or_default();
    if quiet {
        tracing::debug!(tunnel = %name, %peer, skipped, "PROXY header: the peer closed without sending one");
    } else {
        tracing::warn!(tunnel = %name, %peer, error = %e, bytes = got, skipped, "PROXY header refused (accept_proxy = true): the load balancer must send a valid PROXY v1 or v2 header first");
    }
}

/// What a connection knows as it ends, for its access log line.
pub struct Ended<'a> {
    pub reason: CloseReason,
    /// How long the connection lived.
    pub duration: Duration,
    pub target: Option<TargetId>,
    /// Plaintext bytes (towards, from) the backend, as the wire counted them.
    pub plain: (u64, u64),
    /// A plaintext relay (forward): the socket's peer is the client.
    pub relay: bool,
    pub key_id: Option<KeyId>,
    pub fs: Option<bool>,
    pub ident: Option<&'a ConnIdentity>,
}

/// Writes the access log line of a connection that ended (the tunnel has an access log).
/// Never blocks: a line the writer cannot take is dropped, counted and warned about.
pub fn log_close(cx: &mut Context<'_, ShardState>, tunnel: TunnelIdx, e: Ended<'_>) {
    let now = cx.now();
    let rt = &cx.state.tunnels[tunnel];
    let Some(log) = &rt.access_log else {
        return;
    };
    let (header_in, header_out) = e.ident.map_or((0, 0), |i| i.header_bytes());
    let open = e.ident.and_then(|i| i.open());
    let peer = e.ident.and_then(|i| i.peer());
    let client = match open {
        Some(o) => o.addrs.map(|a| a.source),
        None if e.relay => peer,
        None => None,
    };
    let target = e
        .target
        .and_then(|id| rt.upstreams.index_of(id))
        .and_then(|i| rt.upstreams.targets().get(i.get()))
        .map(|t| t.addr);
    let line = Record {
        time: SystemTime::now(),
        tunnel: &rt.cfg.name,
        mode: rt.cfg.mode.as_str(),
        client,
        proxied: open.is_some_and(|o| o.proxied),
        peer,
        target,
        bytes_up: e.plain.0.saturating_sub((header_in + header_out) as u64),
        bytes_down: e.plain.1,
        duration: e.duration,
        reason: e.reason.as_str(),
        key_id: e.key_id.map(|k| k.to_string()),
        fs: e.fs,
    }
    .to_json();
    if log.send(line, &rt.metrics.access_log_dropped[1]).is_ok() {
        return;
    }
    rt.metrics.access_log_dropped[0].inc();
    let dest = log.dest().to_string();
    if tracing::enabled!(tracing::Level::WARN) {
        if let Some(skipped) = cx.state.may_warn(now) {
            let name = &cx.state.tunnels[tunnel].cfg.name;
            tracing::warn!(tunnel = %name, access_log = %dest, skipped, "access log line dropped: the writer is behind (sealpipe_access_log_dropped_total{{reason=\"queue_full\"}})");
        }
    }
}

/// Why a client's PROXY header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("{0}")]
    Invalid(Invalid),
    #[error("the client closed before a complete PROXY header")]
    Eof,
    #[error("no complete PROXY header within handshake_timeout")]
    Timeout,
}

/// Where reading the client's PROXY header stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderStep {
    /// Incomplete: keep reading (at most [`MAX_HEADER_LEN`] bytes are staged).
    Wait,
    /// Parsed and removed from the input: connect, with [`ConnIdentity::open`] as the OPEN.
    Ready,
    Failed(HeaderError),
}

/// A connection's identity state (boxed in the connection, only for tunnels that use it).
#[derive(Clone, Debug, Default)]
pub struct ConnIdentity {
    /// Encrypt side with accept_proxy: the header is not parsed yet.
    awaiting: bool,
    /// PROXY header bytes read from the client (encrypt side).
    header_in: usize,
    /// PROXY header bytes put in front of the current backend connection's output (decrypt).
    header_out: usize,
    /// The session's OPEN: the one sealed (encrypt) or received (decrypt).
    open: Option<OpenInfo>,
    /// The accepted socket's peer, read at accept (once the peer has closed, the socket no
    /// longer says).
    peer: Option<SocketAddr>,
}

impl ConnIdentity {
    /// The state for a new connection (whose socket's peer `peer` reads) of a tunnel with
    /// these settings, if it needs any (only then is the peer read).
    pub fn for_tunnel(
        id: &Identity,
        peer: impl FnOnce() -> Option<SocketAddr>,
    ) -> Option<Box<ConnIdentity>> {
        id.per_connection().then(|| {
            Box::new(ConnIdentity {
                awaiting: id.trusted_proxies.is_some(),
                peer: peer(),
                ..ConnIdentity::default()
            })
        })
    }

    /// The accepted socket's peer.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// Encrypt side: still waiting for the client's PROXY header (no upstream yet).
    pub fn awaiting_header(&self) -> bool {
        self.awaiting
    }

    /// Parses the PROXY header at the front of the client's `input` (`eof`: the client has
    /// finished sending). On success the header's bytes are drained from `input` and its
    /// addresses become the session's OPEN.
    pub fn read_header(&mut self, input: &mut Buffer, eof: bool) -> HeaderStep {
        let mut staged = [0u8; MAX_HEADER_LEN];
        let n = input.copy_out(&mut staged);
        match proxy_header::parse(staged.get(..n).unwrap_or_default()) {
            Parse::NeedMore if eof => HeaderStep::Failed(HeaderError::Eof),
            // The parser decides within MAX_HEADER_LEN bytes; more cannot be staged.
            Parse::NeedMore if n >= MAX_HEADER_LEN => {
                HeaderStep::Failed(HeaderError::Invalid(Invalid::V2TooLong))
            }
            Parse::NeedMore => HeaderStep::Wait,
            Parse::Invalid(e) => HeaderStep::Failed(HeaderError::Invalid(e)),
            Parse::Done { header, consumed } => {
                input.drain(consumed);
                self.awaiting = false;
                self.header_in = consumed;
                let addrs = match header.command {
                    Command::Local => None,
                    Command::Proxy => header.addrs.map(|a| ClientAddrs {
                        source: a.source,
                        destination: a.destination,
                    }),
                };
                self.open = Some(OpenInfo {
                    proxied: true,
                    addrs,
                });
                HeaderStep::Ready
            }
        }
    }

    /// Encrypt side: the OPEN to seal — the header's, else the client socket's (`socket`).
    pub fn session_open(&mut self, socket: OpenInfo) -> OpenInfo {
        *self.open.get_or_insert(socket)
    }

    /// Decrypt side: the OPEN the session received.
    pub fn opened(&mut self, open: OpenInfo) {
        self.open = Some(open);
    }

    pub fn open(&self) -> Option<OpenInfo> {
        self.open
    }

    /// Decrypt side, at each backend connect: the header to put in front of the client's
    /// bytes, if the tunnel sends one.
    pub fn backend_header(&mut self, id: &Identity) -> Option<Encoded> {
        let version = id.send_proxy?;
        let addrs = self.open.and_then(|o| o.addrs).map(|a| Addrs {
            source: a.source,
            destination: a.destination,
        });
        let h = proxy_header::encode(version, addrs);
        self.header_out = h.as_bytes().len();
        Some(h)
    }

    /// Decrypt side: a backend connect failed with `unsent` (header first, then client bytes)
    /// never written; drops the header, which the next attempt sends anew.
    pub fn unsend_header(&mut self, unsent: &mut Buffer) {
        unsent.drain(std::mem::take(&mut self.header_out).min(unsent.len()));
    }

    /// (bytes the client sent, bytes written to the backend) that were PROXY headers, to take
    /// off the wire counts for the access log.
    pub fn header_bytes(&self) -> (usize, usize) {
        (self.header_in, self.header_out)
    }

    /// The state a successor process needs for this connection (a live upgrade moves only
    /// connections whose header, if any, was read).
    pub fn export(&self) -> IdentState {
        IdentState {
            peer: self.peer,
            header_in: u32::try_from(self.header_in).unwrap_or(u32::MAX),
            header_out: u32::try_from(self.header_out).unwrap_or(u32::MAX),
            open: self.open,
        }
    }

    /// A moved connection's identity, from [`ConnIdentity::export`].
    pub fn import(st: IdentState) -> ConnIdentity {
        ConnIdentity {
            awaiting: false,
            header_in: st.header_in as usize,
            header_out: st.header_out as usize,
            open: st.open,
            peer: st.peer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnel(mode: Mode, f: impl FnOnce(&mut TunnelFile)) -> Result<Identity, String> {
        let mut t = TunnelFile::new(
            mode,
            "127.0.0.1:1".into(),
            vec!["127.0.0.1:2".into()],
            vec![],
        );
        f(&mut t);
        Identity::validate(&t)
    }

    #[test]
    fn settings_are_validated_and_name_their_key() {
        let ok = tunnel(Mode::Encrypt, |t| {
            t.accept_proxy = true;
            t.trusted_proxies = vec!["10.0.0.0/8".into(), "::1".into()];
        })
        .unwrap();
        assert_eq!(ok.trusted_proxies.unwrap().len(), 2);
        type Edit = Box<dyn Fn(&mut TunnelFile)>;
        let cases: Vec<(Mode, Edit, &str)> = vec![
            (
                Mode::Encrypt,
                Box::new(|t| t.accept_proxy = true),
                "needs trusted_proxies",
            ),
            (
                Mode::Encrypt,
                Box::new(|t| t.trusted_proxies = vec!["10.0.0.0/8".into()]),
                "accept_proxy is not",
            ),
            (
                Mode::Decrypt,
                Box::new(|t| {
                    t.accept_proxy = true;
                    t.trusted_proxies = vec!["10.0.0.0/8".into()];
                }),
                "accept_proxy (--accept-proxy) is for encrypt tunnels",
            ),
            (
                Mode::Encrypt,
                Box::new(|t| {
                    t.accept_proxy = true;
                    t.trusted_proxies = vec!["10.0.0.0/8".into(), "10.0.0.1/8".into()];
                }),
                "trusted_proxies[1]: \"10.0.0.1/8\" has bits set",
            ),
            (
                Mode::Encrypt,
                Box::new(|t| t.send_proxy = Some("v2".into())),
                "send_proxy (--send-proxy) is for decrypt",
            ),
            (
                Mode::Decrypt,
                Box::new(|t| t.send_proxy = Some("v3".into())),
                "must be \"v1\" or \"v2\", got \"v3\"",
            ),
            (
                Mode::Forward,
                Box::new(|t| t.access_log = Some(String::new())),
                "access_log must be",
            ),
            (
                Mode::Forward,
                Box::new(|t| t.allow = vec!["nope".into()]),
                "allow[0]: \"nope\" is not",
            ),
            (
                Mode::Decrypt,
                Box::new(|t| t.deny = vec!["::/129".into()]),
                "deny[0]: \"::/129\"",
            ),
        ];
        for (mode, f, want) in cases {
            let e = tunnel(mode, f).unwrap_err();
            assert!(e.contains(want), "want {want:?} in: {e}");
        }
        let d = tunnel(Mode::Decrypt, |t| {
            t.send_proxy = Some("v1".into());
            t.access_log = Some("stderr".into());
        })
        .unwrap();
        assert_eq!(d.send_proxy, Some(Version::V1));
        assert_eq!(d.access_log, Some(Dest::Stderr));
        assert!(d.per_connection());
        assert!(!tunnel(Mode::Forward, |_| {}).unwrap().per_connection());
    }

    #[test]
    fn sources_are_checked_deny_then_allow_then_trusted_proxies() {
        let id = tunnel(Mode::Encrypt, |t| {
            t.accept_proxy = true;
            t.trusted_proxies = vec!["10.0.0.0/8".into()];
            t.allow = vec!["10.0.0.0/8".into(), "192.0.2.0/24".into()];
            t.deny = vec!["10.9.0.0/16".into()];
        })
        .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(admit_source(&id, ip("10.1.2.3")), Ok(()));
        assert_eq!(admit_source(&id, ip("::ffff:10.1.2.3")), Ok(()));
        assert_eq!(admit_source(&id, ip("10.9.0.1")), Err(RejectReason::Acl));
        assert_eq!(admit_source(&id, ip("172.16.0.1")), Err(RejectReason::Acl));
        assert_eq!(
            admit_source(&id, ip("192.0.2.1")),
            Err(RejectReason::UntrustedProxy)
        );
        assert_eq!(admit_source(&Identity::default(), ip("::1")), Ok(()));
    }

    fn buffer(b: &[u8]) -> Buffer {
        let mut buf = Buffer::new();
        buf.append(b);
        buf
    }

    #[test]
    fn the_header_is_taken_off_the_client_bytes_and_becomes_the_open() {
        let mut c = ConnIdentity {
            awaiting: true,
            ..ConnIdentity::default()
        };
        let mut input = buffer(b"PROXY TCP4 192.0.2.7 10.0.0.1 40001 ");
        assert_eq!(c.read_header(&mut input, false), HeaderStep::Wait);
        input.append(b"6379\r\nPING\r\n");
        assert_eq!(c.read_header(&mut input, false), HeaderStep::Ready);
        assert!(!c.awaiting_header());
        let rest: Vec<u8> = input.slices().flatten().copied().collect();
        assert_eq!(rest, b"PING\r\n");
        let socket =
            OpenInfo::from_socket("10.0.0.9:1".parse().unwrap(), "10.0.0.1:2".parse().unwrap());
        let open = c.session_open(socket);
        assert!(open.proxied);
        assert_eq!(
            open.addrs.unwrap().source,
            "192.0.2.7:40001".parse().unwrap()
        );
        assert_eq!(c.header_bytes(), (42, 0));
        // LOCAL: an OPEN that names no client.
        let mut local = ConnIdentity::default();
        let mut input = buffer(proxy_header::encode(Version::V2, None).as_bytes());
        assert_eq!(local.read_header(&mut input, false), HeaderStep::Ready);
        assert_eq!(
            local.session_open(socket),
            OpenInfo {
                proxied: true,
                addrs: None
            }
        );
        // Without a header the socket's addresses are the OPEN.
        assert_eq!(ConnIdentity::default().session_open(socket), socket);
    }

    #[test]
    fn bad_truncated_and_oversized_headers_fail() {
        let mut c = ConnIdentity::default();
        assert_eq!(
            c.read_header(&mut buffer(b"GET / HTTP/1.1\r\n"), false),
            HeaderStep::Failed(HeaderError::Invalid(Invalid::NotProxy))
        );
        assert_eq!(
            c.read_header(&mut buffer(b"PROXY TCP4 1.2."), true),
            HeaderStep::Failed(HeaderError::Eof)
        );
        assert_eq!(c.read_header(&mut buffer(b""), false), HeaderStep::Wait);
        let mut big = proxy_header::SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0x07, 0xf0]);
        big.resize(MAX_HEADER_LEN, 0);
        // 16 + 0x7f0 = 2048 bytes declared, and 2048 staged: complete, TLVs malformed.
        assert!(matches!(
            c.read_header(&mut buffer(&big), false),
            HeaderStep::Failed(HeaderError::Invalid(_))
        ));
    }

    #[test]
    fn the_backend_header_is_built_from_the_open_and_unsent_on_a_failed_connect() {
        let id = Identity {
            send_proxy: Some(Version::V1),
            ..Identity::default()
        };
        let mut c = ConnIdentity::default();
        c.opened(OpenInfo {
            proxied: false,
            addrs: Some(ClientAddrs {
                source: "[2001:db8::7]:5000".parse().unwrap(),
                destination: "[2001:db8::1]:6379".parse().unwrap(),
            }),
        });
        let h = c.backend_header(&id).unwrap();
        assert_eq!(
            h.as_bytes(),
            b"PROXY TCP6 2001:db8::7 2001:db8::1 5000 6379\r\n"
        );
        let mut out = buffer(h.as_bytes());
        out.append(b"client bytes");
        c.unsend_header(&mut out);
        let rest: Vec<u8> = out.slices().flatten().copied().collect();
        assert_eq!(rest, b"client bytes");
        assert_eq!(c.header_bytes(), (0, 0));
        c.opened(OpenInfo::default());
        let v2 = Identity {
            send_proxy: Some(Version::V2),
            ..Identity::default()
        };
        assert_eq!(
            c.backend_header(&v2).unwrap().as_bytes(),
            proxy_header::encode(Version::V2, None).as_bytes()
        );
        assert_eq!(c.header_bytes(), (0, 16));
        assert!(c.backend_header(&Identity::default()).is_none());
    }
}
