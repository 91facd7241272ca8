//! Serving connections: accept loops that stop on shutdown, and HTTP connections that finish their
//! in-flight requests when asked to drain.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::pin::Pin;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::headers::ProxyBody;

/// A client gets this long to send request headers (guards against slowloris). hyper counts an
/// idle keep-alive connection's wait for its next request too, so this is also the idle close;
/// `upstream::POOL_IDLE` stays below it.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Which HTTP protocol to serve on a connection.
#[derive(Debug, Clone, Copy)]
pub enum HttpProtocol {
    /// HTTP/1.1 with upgrades (ALPN http/1.1, or none).
    Http1,
    /// HTTP/2 (ALPN h2).
    Http2,
    /// HTTP/1.1 or prior-knowledge HTTP/2, detected from the first bytes (plain-text listeners).
    Detect,
}

/// Binds a listener, naming the flag in the error so the user knows what to change.
pub async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("{flag} {addr}: cannot listen: {e}"))
}

/// Accepts until `cancel` fires, running `handle` for each connection under `tracker`.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    cancel: CancellationToken,
    tracker: TaskTracker,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tracker.spawn(handle(stream, peer));
                }
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Serves HTTP on one connection until it closes, or until `cancel` asks it to drain.
pub async fn serve_http<I, S, F>(
    io: I,
    protocol: HttpProtocol,
    cancel: CancellationToken,
    service: S,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static,
{
    let io = TokioIo::new(io);
    let service = hyper::service::service_fn(service);
    match protocol {
        HttpProtocol::Http1 => {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(io, service)
                .with_upgrades();
            drain_on_cancel(conn, cancel, |c| c.graceful_shutdown()).await
        }
        HttpProtocol::Http2 => {
            let conn = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(io, service);
            drain_on_cancel(conn, cancel, |c| c.graceful_shutdown()).await
        }
        HttpProtocol::Detect => {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection_with_upgrades(io, service);
            drain_on_cancel(conn, cancel, |c| c.graceful_shutdown()).await
        }
    }
}

/// Drives `conn`; when `cancel` fires, asks it to finish in-flight requests and close.
/// (hyper's upgradeable connections have no common trait for this, hence the closure.)
async fn drain_on_cancel<C, E>(
    conn: C,
    cancel: CancellationToken,
    shutdown: impl FnOnce(Pin<&mut C>),
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = cancel.cancelled() => {
            shutdown(conn.as_mut());
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
