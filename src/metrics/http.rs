//! The metrics endpoint: `/metrics`, `/healthz`, `/readyz` over hyper 1.x on a current-thread
//! tokio runtime in its own thread — the only place tokio runs. It reads atomics and the
//! registry; it never touches a shard's data.
//!
//! Whoever can reach the port must not be able to use it against the proxy:
//! - at most [`EndpointLimits::max_conns`] connections; over it, the one quiet the longest
//!   (accepted or last requested earliest) is closed at once to make room, so idle
//!   connections can hold neither memory nor a scraper out;
//! - a request's headers must arrive within `header_timeout` (hyper's timer; it also bounds
//!   an idle keep-alive connection), and a connection lives at most `request_timeout` (a
//!   client that stops reading its response cannot hold the connection);
//! - descriptors: an accepted socket that leaves the process within `fd_reserve` of its
//!   RLIMIT_NOFILE is closed at once: the reserve is the data path's (see [`FdBudget`] for how
//!   the count stays cheap);
//! - accept errors (EMFILE above all: tokio clears readiness only on WouldBlock, so retrying
//!   at once would spin a core) back off from 10 ms to 1 s.
//!
//! Each of these is counted in `sealpipe_metrics_endpoint_closed_total{reason}` and logged at
//! most once a second.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{IntCounter, IntGauge};

use super::Metrics;

/// A shard whose loop has not turned for this long makes `/healthz` fail.
pub const STALL_SECONDS: f64 = 5.0;

/// What the endpoint lets one peer cost (see the module doc).
#[derive(Clone, Copy, Debug)]
pub struct EndpointLimits {
    /// Connections open at once.
    pub max_conns: usize,
    /// A request's headers must arrive within this (and a keep-alive connection idles no
    /// longer).
    pub header_timeout: Duration,
    /// Longest life of one connection.
    pub request_timeout: Duration,
    /// Descriptors below RLIMIT_NOFILE the endpoint never uses: `None` = an eighth of the
    /// limit, at least 16.
    pub fd_reserve: Option<u64>,
}

impl Default for EndpointLimits {
    fn default() -> Self {
        EndpointLimits {
            max_conns: 64,
            header_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            fd_reserve: None,
        }
    }
}

/// Indexes into [`super::ENDPOINT_CLOSE_REASONS`].
const HEADER_TIMEOUT: usize = 0;
const REQUEST_TIMEOUT: usize = 1;
const EVICTED: usize = 2;
const FD_RESERVE: usize = 3;
const ACCEPT_ERROR: usize = 4;

/// Shortest and longest wait after an accept error or a refusal for want of descriptors.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The endpoint's own counters, registered beside the proxy's families.
#[derive(Clone)]
struct EndpointMetrics {
    closed: [IntCounter; 5],
    open: IntGauge,
}

impl EndpointMetrics {
    fn new(m: &Metrics) -> EndpointMetrics {
        EndpointMetrics {
            closed: super::ENDPOINT_CLOSE_REASONS
                .map(|r| m.endpoint_closed.with_label_values(&[r])),
            open: m.endpoint_connections.clone(),
        }
    }
}

/// Binds `addr` now (so a busy port is reported at startup) and serves on a new thread.
pub fn spawn(addr: SocketAddr, metrics: Arc<Metrics>) -> io::Result<SocketAddr> {
    serve_on(bind(addr)?, metrics)
}

/// Binds the endpoint's listening socket.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr)
}

/// Serves on an already-listening socket (bound by [`bind`], or inherited in a handoff) on a
/// new thread. After `health.handed_off` is set, the endpoint serves at most one more request
/// and closes its copy of the socket (the successor holds the other).
pub fn serve_on(
    std_listener: std::net::TcpListener,
    metrics: Arc<Metrics>,
) -> io::Result<SocketAddr> {
    serve_with(std_listener, metrics, EndpointLimits::default())
}

/// [`serve_on`] with explicit limits (tests shorten the timeouts).
pub fn serve_with(
    std_listener: std::net::TcpListener,
    metrics: Arc<Metrics>,
    limits: EndpointLimits,
) -> io::Result<SocketAddr> {
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    // Registered before the thread starts, so the families exist from the first scrape on.
    let em = EndpointMetrics::new(&metrics);
    std::thread::Builder::new()
        .name("sealpipe-metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "metrics endpoint: cannot start runtime");
                    return;
                }
            };
            rt.block_on(serve(std_listener, metrics, limits, em));
        })?;
    Ok(local)
}

/// One open connection, as the cap sees it.
struct Slot {
    /// Milliseconds since the endpoint started at accept or at the last request.
    active: Arc<AtomicU64>,
    task: tokio::task::AbortHandle,
}

/// At most one warning a second from the endpoint; counts what it holds back.
struct Warn {
    next: Instant,
    skipped: u64,
}

impl Warn {
    fn may(&mut self) -> Option<u64> {
        let now = Instant::now();
        if now < self.next {
            self.skipped += 1;
            return None;
        }
        self.next = now + Duration::from_secs(1);
        Some(std::mem::take(&mut self.skipped))
    }
}

/// The descriptor reserve check. Descriptor numbers are handed out lowest first, so an
/// accepted socket's number `n` proves `n + 1` are open, at no cost; but closes leave holes
/// below, so the number alone can undercount. An exact count (`/proc/self/fd`) bounds that: it
/// is taken at most every 250 ms — less often when it is slow (a few hundred thousand
/// descriptors), so it never costs more than 1% of the thread — and the sockets this endpoint
/// accepted since are added to it.
struct FdBudget {
    reserve: Option<u64>,
    counted: u64,
    accepted_since: u64,
    next_count: Instant,
}

impl FdBudget {
    fn new(reserve: Option<u64>) -> FdBudget {
        FdBudget {
            reserve,
            counted: 0,
            accepted_since: 0,
            next_count: Instant::now(),
        }
    }

    /// Whether the socket just accepted as descriptor `fd` leaves the process its reserve;
    /// also returns the reserve.
    fn allows(&mut self, fd: u64) -> (bool, u64) {
        let limit = crate::sys::nofile_limit();
        let reserve = self.reserve.unwrap_or((limit / 8).max(16));
        let now = Instant::now();
        if now >= self.next_count {
            match std::fs::read_dir("/proc/self/fd") {
                // Less the directory's own descriptor; the new socket is among them.
                Ok(d) => self.counted = (d.count() as u64).saturating_sub(1),
                // Cannot even open a directory: out of descriptors.
                Err(_) => return (false, reserve),
            }
            self.accepted_since = 0;
            let took = now.elapsed();
            self.next_count = now + (took * 100).max(Duration::from_millis(250));
        } else {
            self.accepted_since += 1;
        }
        let used = (fd + 1).max(self.counted + self.accepted_since);
        (used + reserve <= limit, reserve)
    }
}

async fn serve(
    l: std::net::TcpListener,
    metrics: Arc<Metrics>,
    limits: EndpointLimits,
    em: EndpointMetrics,
) {
    let listener = match tokio::net::TcpListener::from_std(l) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "metrics endpoint: cannot listen");
            return;
        }
    };
    let epoch = Instant::now();
    let slots: Arc<Mutex<VecDeque<Slot>>> = Arc::default();
    let mut warn = Warn {
        next: epoch,
        skipped: 0,
    };
    let mut backoff = BACKOFF_MIN;
    let mut budget = FdBudget::new(limits.fd_reserve);
    let max_conns = limits.max_conns.max(1);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                em.closed[ACCEPT_ERROR].inc();
                if let Some(skipped) = warn.may() {
                    tracing::warn!(error = %e, backoff = ?backoff, skipped, "metrics endpoint: accept failed; backing off");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let (ok, reserve) = budget.allows(stream.as_raw_fd() as u64);
        if !ok {
            drop(stream);
            em.closed[FD_RESERVE].inc();
            if let Some(skipped) = warn.may() {
                tracing::warn!(reserve, backoff = ?backoff, skipped, "metrics endpoint: the process is near its descriptor limit; scrape refused so the proxy keeps its reserve");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            continue;
        }
        backoff = BACKOFF_MIN;
        {
            let mut slots = slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.retain(|s| !s.task.is_finished());
            if slots.len() >= max_conns {
                // Close the connection quiet the longest, never the new one: a scraper that
                // just connected always gets its turn.
                let oldest = slots
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| s.active.load(Ordering::Relaxed))
                    .map(|(i, _)| i);
                if let Some(old) = oldest.and_then(|i| slots.remove(i)) {
                    old.task.abort();
                    em.closed[EVICTED].inc();
                    em.open.dec();
                    if let Some(skipped) = warn.may() {
                        tracing::warn!(
                            max_conns,
                            skipped,
                            "metrics endpoint: connection cap reached; closed the longest-quiet connection"
                        );
                    }
                }
            }
            let now_ms = || epoch.elapsed().as_millis() as u64;
            let active = Arc::new(AtomicU64::new(now_ms()));
            let task = tokio::task::spawn(connection(
                stream,
                metrics.clone(),
                active.clone(),
                epoch,
                limits,
                em.clone(),
            ));
            em.open.inc();
            slots.push_back(Slot {
                active,
                task: task.abort_handle(),
            });
        }
        let last = metrics
            .health
            .handed_off
            .load(std::sync::atomic::Ordering::Acquire);
        if last {
            break;
        }
        // Let the new connection read its request before the next accept may need a slot.
        tokio::task::yield_now().await;
    }
    // Handed over: stop accepting; connections already open are served until the process exits.
    drop(listener);
    std::future::pending::<()>().await
}

/// Serves one connection until it closes, times out or is evicted (aborted: then its
/// gauge was already decremented by the evictor).
async fn connection(
    stream: tokio::net::TcpStream,
    metrics: Arc<Metrics>,
    active: Arc<AtomicU64>,
    epoch: Instant,
    limits: EndpointLimits,
    em: EndpointMetrics,
) {
    let io = hyper_util::rt::TokioIo::new(stream);
    let svc = hyper::service::service_fn(move |req| {
        active.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        let m = metrics.clone();
        async move { Ok::<_, Infallible>(route(&m, &req)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(16 * 1024)
        .serve_connection(io, svc);
    match tokio::time::timeout(limits.request_timeout, conn).await {
        Err(_) => em.closed[REQUEST_TIMEOUT].inc(),
        Ok(Err(e)) if e.is_timeout() => em.closed[HEADER_TIMEOUT].inc(),
        Ok(_) => {}
    }
    em.open.dec();
}

fn reply(status: StatusCode, ctype: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn route(m: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            b"GET only\n".to_vec(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            for (i, age) in m.health.heartbeat_ages(Instant::now()).iter().enumerate() {
                m.heartbeat_age
                    .with_label_values(&[&i.to_string()])
                    .set(*age);
            }
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                m.render(),
            )
        }
        "/healthz" => match m.health.live(STALL_SECONDS) {
            Ok(()) => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            Err(why) => {
                tracing::warn!(reason = %why, "healthz failing");
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("{why}\n").into_bytes(),
                )
            }
        },
        "/readyz" => match m.health.ready() {
            Ok(()) => reply(StatusCode::OK, "text/plain", b"ready\n".to_vec()),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n").into_bytes(),
            ),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
    }
}
