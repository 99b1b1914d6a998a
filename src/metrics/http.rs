//! The metrics endpoint: `/metrics`, `/healthz`, `/readyz` over hyper 1.x on a current-thread
//! tokio runtime in its own thread — the only place tokio runs. It reads atomics and the
//! registry; it never touches a shard's data.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};

use super::Metrics;

/// A shard whose loop has not turned for this long makes `/healthz` fail.
pub const STALL_SECONDS: f64 = 5.0;

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
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    std::thread::Builder::new()
        .name("sealpipe-metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "metrics endpoint: cannot start runtime");
                    return;
                }
            };
            rt.block_on(serve(std_listener, metrics));
        })?;
    Ok(local)
}

async fn serve(l: std::net::TcpListener, metrics: Arc<Metrics>) {
    let listener = match tokio::net::TcpListener::from_std(l) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "metrics endpoint: cannot listen");
            return;
        }
    };
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "metrics endpoint: accept failed");
                continue;
            }
        };
        let m = metrics.clone();
        let last = metrics
            .health
            .handed_off
            .load(std::sync::atomic::Ordering::Acquire);
        tokio::task::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc = hyper::service::service_fn(move |req| {
                let m = m.clone();
                async move { Ok::<_, Infallible>(route(&m, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
        if last {
            break;
        }
    }
    // Handed over: stop accepting; connections already open are served until the process exits.
    drop(listener);
    std::future::pending::<()>().await
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
